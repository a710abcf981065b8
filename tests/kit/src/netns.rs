//! Throwaway network namespaces for tests that drive the real kernel tools, and the
//! one check of what such a test needs.
//!
//! **The marker.** A test that needs root, a network namespace or a Debian tool
//! beyond a Rust toolchain has a name starting with [`MARKER`] (`netns_`). `tests/run`
//! lists those tests and, where it cannot run them (not root), skips them by name and
//! reports them as skipped. Such a test calls [`require`] (or makes a [`Netns`],
//! which does): run without what it needs it fails, naming what is missing; it never
//! returns early as if it had passed. A test that makes a namespace without the
//! marker in its name fails too, so the convention cannot drift.
//!
//! **One mechanism.** Namespaces are named (`ip netns add`, a file under
//! `/run/netns`): programs run in one with `ip netns exec`, and in-process code runs
//! in one on a thread that has entered it (`setns`; what that thread spawns is in
//! the namespace too). Names carry the test process's pid, so parallel tests never
//! meet, and every new namespace first sweeps those left by test processes that
//! died. Dropping a [`Netns`] kills what it started and deletes it. Nothing outside
//! the namespaces a test made is touched.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// What a test's name starts with when it needs root, namespaces or Debian tools.
pub const MARKER: &str = "netns_";

/// The tools such tests drive and the Debian package of each. `tests/run` installs
/// these packages (a test of this crate checks its list covers them all).
pub const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ss", "iproute2"),
    ("nft", "nftables"),
    ("iperf3", "iperf3"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("sysctl", "procps"),
];

/// Where tools are looked for besides `PATH` (a non-root `PATH` often lacks sbin).
const SBIN: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The Debian package that has `tool`.
pub fn package(tool: &str) -> Option<&'static str> {
    TOOLS.iter().find(|(t, _)| *t == tool).map(|(_, p)| *p)
}

/// The executable `tool` on `PATH` or in an sbin directory.
pub fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What this process lacks to run a test needing root and `tools`, one entry per
/// missing thing with how to get it; empty when nothing is missing.
pub fn missing(tools: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        out.push("root (network namespaces and the kernel's nftables and tc)".to_owned());
    }
    for t in tools {
        if find(t).is_none() {
            out.push(match package(t) {
                Some(p) => format!("`{t}` (Debian package {p})"),
                None => format!("`{t}`"),
            });
        }
    }
    out
}

/// The check every marked test makes before it touches anything: root and `tools`
/// present, and the calling test's name carries the marker. Panics naming what is
/// missing otherwise.
pub fn require(tools: &[&str]) {
    let test = std::thread::current().name().map(str::to_owned);
    if let Some(name) = test.as_deref().filter(|n| is_test_name(n)) {
        let last = name.rsplit("::").next().unwrap_or(name);
        assert!(
            last.starts_with(MARKER),
            "test `{name}` needs root and network namespaces, but its name does not start \
             with `{MARKER}`: rename it so `tests/run` can skip it where it cannot run"
        );
    }
    let missing = missing(tools);
    assert!(
        missing.is_empty(),
        "{} needs {}. `tests/run` as root installs what is missing and runs it; as \
         another user it skips every `{MARKER}` test by name.",
        test.as_deref().unwrap_or("this program"),
        missing.join(", ")
    );
}

/// libtest names each test's thread after the test; other threads (a program's
/// `main`, unnamed helpers) are not tests.
fn is_test_name(name: &str) -> bool {
    name != "main" && !name.starts_with("tokio-")
}

/// Runs `argv` to completion; its stdout, or an error with its stderr.
pub fn run(argv: &[&str]) -> io::Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {argv:?}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{argv:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program` to be run inside the namespace called `netns` (through `ip netns
/// exec`, which execs it: the child is the program itself).
pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).arg(program);
    c
}

/// Namespace names start with this, then the pid of the test process.
const PREFIX: &str = "npl";

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Deletes namespaces of earlier test processes that died before cleaning up.
fn sweep() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: Option<u32> = rest.split('x').next().and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| !pid_alive(p)) {
            let _ = run(&["ip", "netns", "del", &name]);
        }
    }
}

/// A named network namespace with `lo` up, deleted on drop.
pub struct Netns {
    name: String,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    /// Checks the requirements ([`require`] with `ip`), sweeps dead tests'
    /// namespaces and makes a new one; `tag` ends its name (for people reading
    /// `ip netns list`).
    pub fn new(tag: &str) -> io::Result<Netns> {
        require(&["ip"]);
        sweep();
        static N: AtomicU32 = AtomicU32::new(0);
        let ns = Netns {
            name: format!(
                "{PREFIX}{}x{}{tag}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            children: Mutex::new(Vec::new()),
        };
        run(&["ip", "netns", "add", &ns.name])?;
        // From here on Drop deletes it.
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` to be run inside the namespace (see [`command_in`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.name, program)
    }

    /// Runs a program in the namespace to completion; its stdout.
    pub fn exec(&self, argv: &[&str]) -> io::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run(&full)
    }

    /// Starts a program in the namespace; it is killed when the namespace drops.
    pub fn spawn(&self, argv: &[&str]) -> io::Result<()> {
        let child = self
            .command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {argv:?}: {e}")))?;
        self.children.lock().expect("children").push(child);
        Ok(())
    }

    /// Moves the calling thread into the namespace; threads and processes it
    /// starts afterwards are in it too. For programs that live there (benches).
    pub fn enter(&self) -> io::Result<()> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }

    /// Runs `f` on a thread inside the namespace and returns what it returns; a
    /// panic in `f` is the caller's panic.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                self.enter()
                    .unwrap_or_else(|e| panic!("cannot enter namespace {}: {e}", self.name));
                f()
            });
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Netns {
    /// Runs the future `make` returns on a current-thread tokio runtime on a
    /// thread inside the namespace ([`Netns::run`]): every socket it opens and
    /// every process it spawns is in the namespace.
    pub fn block_on<F: std::future::Future>(&self, make: impl FnOnce() -> F + Send) -> F::Output
    where
        F::Output: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(make())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for mut c in self
            .children
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tests_run_installs_the_package_of_every_tool() {
        let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../run"))
            .expect("tests/run");
        let installed: Vec<&str> = script
            .lines()
            .find_map(|l| l.strip_prefix("TOOL_PACKAGES=("))
            .and_then(|l| l.strip_suffix(')'))
            .expect("a TOOL_PACKAGES=(...) line in tests/run")
            .split_whitespace()
            .collect();
        for (tool, pkg) in TOOLS {
            assert!(
                installed.contains(pkg),
                "tests/run does not install {pkg} (for {tool})"
            );
        }
    }

    #[test]
    fn missing_names_the_tool_and_its_package() {
        let m = missing(&["netpilot-no-such-tool", "dnsmasq"]);
        assert!(m.iter().any(|x| x == "`netpilot-no-such-tool`"), "{m:?}");
        if find("dnsmasq").is_none() {
            assert!(m.iter().any(|x| x.contains("dnsmasq-base")), "{m:?}");
        }
        assert_eq!(package("nft"), Some("nftables"));
        assert!(find("sh").is_some());
    }

    #[test]
    fn an_unmarked_test_cannot_make_a_namespace() {
        let err = std::panic::catch_unwind(|| require(&[])).unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("does not start with `netns_`"), "{msg}");
    }

    #[test]
    fn netns_a_namespace_runs_code_and_programs_inside_and_is_deleted_on_drop() {
        let ns = Netns::new("kit").unwrap();
        let name = ns.name().to_owned();
        assert!(Path::new("/run/netns").join(&name).exists());
        // Only `lo`, up, in there; the thread sees the same.
        let links = ns.exec(&["ip", "-o", "link", "show"]).unwrap();
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains("lo:") && links.contains("UP"), "{links}");
        let inside = ns.run(|| run(&["ip", "-o", "link", "show"]).unwrap());
        assert_eq!(inside, links);
        // A panic inside is the caller's.
        let p = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ns.run(|| panic!("from inside"))
        }));
        assert!(p.is_err());
        ns.spawn(&["sleep", "60"]).unwrap();
        drop(ns);
        assert!(!Path::new("/run/netns").join(&name).exists());
    }
}
