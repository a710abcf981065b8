//! The relay binary's command line and configuration errors, and the example
//! configuration file shipped in the repository.

use std::process::Command;

fn relay() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_netpilot-relay"));
    c.env_remove("NETPILOT_API_KEY");
    c
}

#[test]
fn prints_its_version() {
    let out = relay().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("netpilot-relay "));
}

#[test]
fn refuses_to_serve_without_an_api_key() {
    let out = relay()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no API key"));
}

#[test]
fn api_key_from_environment_is_accepted_and_never_printed() {
    let out = relay()
        .args(["check-config"])
        .env("NETPILOT_API_KEY", "env-key-0123456789abcdef")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("env-key-0123456789abcdef"));
}

#[test]
fn bad_config_files_name_the_problem() {
    let dir = std::env::temp_dir().join(format!("np-relay-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "api_key = \"0123456789abcdef\"\nlisten_addr = \"x\"\n",
            "listen_addr",
        ),
        (
            "api_key = \"0123456789abcdef\"\n[timeouts]\ncommand = \"0s\"\n",
            "timeouts.command",
        ),
        (
            "api_key = \"0123456789abcdef\"\nlisten = \"nowhere\"\n",
            "listen address",
        ),
        ("api_key = ", "invalid config file"),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let path = dir.join(format!("c{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = relay()
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "expected {expect:?} in {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
