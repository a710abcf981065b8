//! The only place the agent starts or signals processes. It takes an argv — never a
//! shell string — and a timeout, and returns stdout or a typed error that carries the
//! argv, the exit status and stderr. A process that outlives its timeout is killed.
//! [`signal`] sends one of the few signals the agent uses to one process by pid.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Output kept from a child, per stream; more is read and dropped.
const MAX_OUTPUT: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started (missing, not executable).
    #[error("cannot start {argv:?}: {source}")]
    Spawn {
        argv: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    /// The program ran and failed.
    #[error("{argv:?} exited with {status}: {stderr}")]
    Failed {
        argv: Vec<String>,
        status: String,
        /// Exit code when it exited normally.
        code: Option<i32>,
        stderr: String,
    },
    /// The program did not finish in time and was killed.
    #[error("{argv:?} did not finish within {timeout:?}")]
    Timeout {
        argv: Vec<String>,
        timeout: Duration,
    },
    /// Reading its output failed.
    #[error("reading the output of {argv:?}: {source}")]
    Io {
        argv: Vec<String>,
        #[source]
        source: std::io::Error,
    },
}

impl ProcessError {
    /// True when the program itself is not installed.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ProcessError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self {
            ProcessError::Failed { code, .. } => *code,
            _ => None,
        }
    }
}

/// Runs `argv[0]` with the rest as arguments, optional stdin, and returns stdout.
pub async fn run(
    argv: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, ProcessError> {
    run_with_env(argv, stdin, timeout, &[]).await
}

/// [`run`] with extra environment variables, e.g. `TZ=UTC0` for nft, whose
/// time-of-day syntax is otherwise read in the agent's local time.
pub async fn run_with_env(
    argv: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
    env: &[(&str, &str)],
) -> Result<String, ProcessError> {
    run_capture(argv, stdin, timeout, env)
        .await
        .map(|o| o.stdout)
}

/// What a successful run printed. Some tools report failures on stderr with exit
/// status 0 (`uci batch` does), so their adapters need both streams.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// [`run_with_env`], also returning stderr of a successful run.
pub async fn run_capture(
    argv: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
    env: &[(&str, &str)],
) -> Result<Output, ProcessError> {
    let owned = || argv.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (program, args) = argv.split_first().ok_or_else(|| ProcessError::Spawn {
        argv: Vec::new(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv"),
    })?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            argv: owned(),
            source,
        })?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let input = stdin.map(|b| b.to_vec());
    let mut child_in = child.stdin.take();
    let work = async {
        let feed = async {
            if let (Some(mut w), Some(bytes)) = (child_in.take(), input) {
                use tokio::io::AsyncWriteExt;
                // A child that exits early closes its stdin; its status tells why.
                let _ = w.write_all(&bytes).await;
            }
        };
        let (_, o, e, status) = tokio::join!(
            feed,
            read_capped(&mut out),
            read_capped(&mut err),
            child.wait()
        );
        Ok::<_, std::io::Error>((o?, e?, status?))
    };
    let (stdout, stderr, status) = match tokio::time::timeout(timeout, work).await {
        Err(_) => {
            return Err(ProcessError::Timeout {
                argv: owned(),
                timeout,
            })
        }
        Ok(Err(source)) => {
            return Err(ProcessError::Io {
                argv: owned(),
                source,
            })
        }
        Ok(Ok(r)) => r,
    };
    if !status.success() {
        return Err(ProcessError::Failed {
            argv: owned(),
            status: status.to_string(),
            code: status.code(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        });
    }
    Ok(Output {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

/// The signals the agent sends to processes it did not start in this run (daemons
/// found through their pid files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Reload (dnsmasq re-reads its servers file).
    Hangup,
    /// Ask to exit.
    Terminate,
    /// Force an exit.
    Kill,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Hangup => "SIGHUP",
            Signal::Terminate => "SIGTERM",
            Signal::Kill => "SIGKILL",
        }
    }

    fn raw(self) -> libc::c_int {
        match self {
            Signal::Hangup => libc::SIGHUP,
            Signal::Terminate => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// Zero and negative pids name process groups (or every process); a pid read
    /// from a stale or corrupt file must never widen a signal to those.
    #[error("refusing to send {} to pid {pid}: not a single process", signal.name())]
    NotAProcess { pid: i32, signal: Signal },
    /// `kill(2)` failed: the process is gone (ESRCH) or not ours to signal.
    #[error("cannot send {} to process {pid}: {source}", signal.name())]
    Send {
        pid: i32,
        signal: Signal,
        #[source]
        source: std::io::Error,
    },
}

impl SignalError {
    /// True when there is no such process (any more).
    pub fn is_gone(&self) -> bool {
        matches!(self, SignalError::Send { source, .. } if source.raw_os_error() == Some(libc::ESRCH))
    }
}

/// Sends `signal` to the one process `pid`. Over `kill(2)` from libc, which is
/// linked anyway: nix's `kill` maps errno through its table of every errno value,
/// 4 KB more (x86_64 release, measured) for the same call.
pub fn signal(pid: i32, signal: Signal) -> Result<(), SignalError> {
    if pid <= 0 {
        return Err(SignalError::NotAProcess { pid, signal });
    }
    // SAFETY: kill takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal.raw()) } == 0 {
        Ok(())
    } else {
        Err(SignalError::Send {
            pid,
            signal,
            source: std::io::Error::last_os_error(),
        })
    }
}

async fn read_capped<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            return Ok(buf);
        }
        if buf.len() < MAX_OUTPUT {
            buf.extend_from_slice(&chunk[..n.min(MAX_OUTPUT - buf.len())]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn returns_stdout_and_passes_arguments_verbatim() {
        // An argument with shell metacharacters arrives as one argument, unexpanded.
        let out = run(&["printf", "%s|", "a b", "$(id)", ";rm"], None, T)
            .await
            .unwrap();
        assert_eq!(out, "a b|$(id)|;rm|");
    }

    #[tokio::test]
    async fn feeds_stdin() {
        assert_eq!(run(&["cat"], Some(b"batch\n"), T).await.unwrap(), "batch\n");
    }

    #[tokio::test]
    async fn failure_carries_argv_status_and_stderr() {
        let err = run(&["ls", "/nonexistent/netpilot"], None, T)
            .await
            .unwrap_err();
        match &err {
            ProcessError::Failed {
                argv, code, stderr, ..
            } => {
                assert_eq!(argv, &["ls", "/nonexistent/netpilot"]);
                assert_eq!(*code, Some(2));
                assert!(stderr.contains("No such file"), "{stderr}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("/nonexistent/netpilot"));
    }

    #[tokio::test]
    async fn passes_extra_environment() {
        let out = run_with_env(&["printenv", "TZ"], None, T, &[("TZ", "UTC0")])
            .await
            .unwrap();
        assert_eq!(out, "UTC0\n");
    }

    #[test]
    fn signals_reach_one_process_and_never_a_group() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        signal(pid, Signal::Kill).unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        // Above any pid_max (at most 2^22): no such process.
        assert!(signal(i32::MAX, Signal::Hangup).unwrap_err().is_gone());
        for pid in [0, -1, -pid] {
            let err = signal(pid, Signal::Terminate).unwrap_err();
            assert!(matches!(err, SignalError::NotAProcess { .. }), "{err}");
            assert!(err.to_string().contains("SIGTERM"), "{err}");
        }
    }

    #[tokio::test]
    async fn missing_program_and_timeout() {
        let err = run(&["netpilot-no-such-tool"], None, T).await.unwrap_err();
        assert!(err.is_not_found());
        let started = std::time::Instant::now();
        let err = run(&["sleep", "5"], None, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::Timeout { .. }));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
