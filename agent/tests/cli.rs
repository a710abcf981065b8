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

#[test]
fn run_without_enrollment_explains_what_to_do() {
    let dir = tempdir();
    let out = agent()
        .args(["run", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not enrolled") && err.contains("netpilot-agent enroll"),
        "{err}"
    );
}

#[test]
fn corrupt_identity_is_reported_as_corrupt() {
    let dir = tempdir();
    std::fs::write(dir.join("identity.json"), "{not json").unwrap();
    let out = agent()
        .args(["run", "--state-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt"), "{err}");
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
