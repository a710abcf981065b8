//! The only place the agent starts processes. It takes an argv — never a shell
//! string — and a timeout, and returns stdout or a typed error that carries the argv,
//! the exit status and stderr. A process that outlives its timeout is killed.

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
