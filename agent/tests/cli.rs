//! The agent binary's command line: version, usage errors, and clear messages for a
//! missing or corrupt state directory and for bad enrollment arguments.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_netpilot-agent"))
}

#[test]
fn prints_its_version() {
    let out = agent().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim(),
        format!("netpilot-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Starts `run` on a state directory and returns its stderr once `expect` appears;
/// the agent keeps waiting for enrollment rather than exiting (no crash loop).
fn run_until_stderr(dir: &std::path::Path, expect: &str) -> String {
    use std::io::Read;
    let mut child = agent()
        .args([
            "run",
            "--config",
            "/nonexistent",
            "--identity-poll",
            "50ms",
            "--state-dir",
        ])
        .arg(dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // A message that never comes must fail the test, not hang it: past the
    // deadline the agent is killed, its stderr ends and the loop below fails.
    let (done, deadline) = std::sync::mpsc::channel::<()>();
    let pid = child.id().to_string();
    let watchdog = std::thread::spawn(move || {
        if deadline
            .recv_timeout(std::time::Duration::from_secs(30))
            .is_err()
        {
            let _ = std::process::Command::new("kill").arg(&pid).status();
        }
    });
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(expect) {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "agent exited before saying {expect:?}: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let _ = done.send(());
    watchdog.join().unwrap();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent exited instead of waiting"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    seen
}

#[test]
fn run_without_enrollment_waits_and_says_what_to_do() {
    let dir = tempdir();
    let err = run_until_stderr(&dir, "waiting for enrollment");
    assert!(
        err.contains("not enrolled") && err.contains("netpilot-agent enroll"),
        "{err}"
    );
}

#[test]
fn corrupt_identity_is_reported_as_unusable() {
    let dir = tempdir();
    std::fs::write(dir.join("identity.json"), "{not json").unwrap();
    // Said once as an error, then the agent idles until it is enrolled again.
    let err = run_until_stderr(&dir, "idle until the router is enrolled again");
    assert!(
        err.contains("identity.json is unusable") && err.contains("enroll --force"),
        "{err}"
    );
}

#[test]
fn a_broken_or_unknown_uci_config_is_reported_not_fatal() {
    let dir = tempdir();
    let config = dir.join("netpilot");
    std::fs::write(
        &config,
        "config agent 'main'\n\toption enabled '1'\n\toption shiny_new 'x'\n",
    )
    .unwrap();
    let out = agent()
        .args(["--config"])
        .arg(&config)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = agent()
        .args(["enroll", "--token", "t", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown") && err.contains("shiny_new"),
        "{err}"
    );
    std::fs::write(&config, "config agent\n\toption enabled 'perhaps'\n").unwrap();
    let out = agent()
        .args(["enroll", "--token", "t", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ignoring") && err.contains("enabled"), "{err}");
}

#[test]
fn enroll_rejects_bad_arguments_before_dialing() {
    let dir = tempdir();
    let cases: &[(&[&str], &str)] = &[
        (&["enroll", "--token", "x"], "--relay"),
        (&["enroll", "--relay", "https://127.0.0.1:1"], "--token"),
        (
            &[
                "enroll",
                "--relay",
                "https://127.0.0.1:1",
                "--token",
                "t",
                "--fingerprint",
                "nothex",
            ],
            "fingerprint",
        ),
        (
            &[
                "enroll",
                "--relay",
                "http://127.0.0.1:1",
                "--token",
                "t",
                "--fingerprint",
                &"ab".repeat(32),
            ],
            "https://",
        ),
        (
            &[
                "enroll",
                "--relay",
                "https://x",
                "--token",
                "t",
                "--ca",
                "/a",
                "--fingerprint",
                "b",
            ],
            "not both",
        ),
        (
            &["run", "--dead-after", "1s", "--ping-interval", "5s"],
            "dead-after",
        ),
        (&["run", "--ping-interval", "soon"], "not a duration"),
        (&["run", "--api-listen", "0.0.0.0:0"], "loopback"),
        (&["frobnicate"], "usage"),
    ];
    for (args, expect) in cases {
        let out = agent()
            .args(*args)
            .arg("--state-dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
    }
}

#[test]
fn unreachable_relay_fails_enrollment_with_the_address() {
    let dir = tempdir();
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let out = agent()
        .args([
            "enroll",
            "--relay",
            "https://127.0.0.1:1",
            "--token",
            "t",
            "--fingerprint",
            &"ab".repeat(32),
            "--state-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach 127.0.0.1:1"), "{err}");
    assert!(!dir.join("identity.json").exists());
}

fn tempdir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "np-agent-cli-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
