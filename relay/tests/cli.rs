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

/// A vendor file that cannot be read or has a bad row stops the relay at start,
/// naming the file, the line and why; a good one is counted.
#[test]
fn vendor_files_are_checked_at_start() {
    let dir = std::env::temp_dir().join(format!("np-relay-cli-vendors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("oui.csv");
    std::fs::write(
        &bad,
        "Registry,Assignment,Organization Name,Organization Address\n\
         MA-L,0C8F20,Large,\nMA-M,0C8F2,Medium,\n",
    )
    .unwrap();
    let config = dir.join("relay.toml");
    let run = |files: &str| {
        std::fs::write(
            &config,
            format!("api_key = \"0123456789abcdef\"\n[vendors]\nfiles = [{files}]\n"),
        )
        .unwrap();
        relay()
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = run(&format!("{:?}", bad.display().to_string()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "invalid vendor file {} line 3: MA-M assignment",
            bad.display()
        )),
        "{err}"
    );
    let out = run("\"/nonexistent/mam.csv\"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read vendor file /nonexistent/mam.csv"),
        "{err}"
    );
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/vendors-fixture.csv");
    let out = run(&format!("{fixture:?}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(" embedded blocks, 9 from vendors.files"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The systemd drop-in names the variable the relay reads, and check-config
    // reads the files it names.
    let drop_in = include_str!("../deploy/vendors.conf");
    let line = drop_in
        .lines()
        .find_map(|l| l.strip_prefix("Environment=NETPILOT_VENDOR_FILES="))
        .expect("vendors.conf sets NETPILOT_VENDOR_FILES");
    assert_eq!(line.split(':').count(), 3, "{line}");
    std::fs::write(&config, "api_key = \"0123456789abcdef\"\n").unwrap();
    let out = relay()
        .args(["check-config", "--config"])
        .arg(&config)
        .env("NETPILOT_VENDOR_FILES", format!("{fixture}:{fixture}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(", 9 from vendors.files"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The systemd unit: the hardening the deployment promises, and an ExecStart whose
/// command line the relay accepts with the shipped example configuration.
#[test]
fn the_systemd_unit_is_hardened_and_its_command_line_is_valid() {
    let unit = include_str!("../deploy/netpilot-relay.service");
    let mut keys: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for line in unit
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
    {
        let (k, v) = line.split_once('=').unwrap();
        keys.entry(k.trim()).or_default().push(v.trim());
    }
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", "netpilot-relay"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(keys.get(k).map(|v| v[0]), Some(v), "{k}");
    }
    let exec = keys["ExecStart"][0];
    let mut argv: Vec<String> = exec.split_whitespace().map(str::to_owned).collect();
    assert_eq!(argv[0], "/usr/local/bin/netpilot-relay");
    assert_eq!(argv[1], "serve");
    // Same flags, pointed at the example config, checked by the real binary.
    argv[1] = "check-config".into();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/netpilot-relay.example.toml");
    let dir = std::env::temp_dir().join(format!("np-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("relay.toml");
    let text = std::fs::read_to_string(example).unwrap();
    std::fs::write(
        &config,
        text.replace("api_key_file = \"/etc/netpilot-relay/api-key\"\n", ""),
    )
    .unwrap();
    // The key comes from a file systemd hands over, never from the command line.
    assert!(!argv.iter().any(|a| a == "--api-key"), "{exec}");
    assert!(keys["LoadCredential"][0].starts_with("api-key:"), "{unit}");
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("api-key");
        std::fs::write(&key, "unit-test-key-0123456789\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| {
            a.replace("/etc/netpilot-relay/relay.toml", config.to_str().unwrap())
                .replace("${STATE_DIRECTORY}", dir.to_str().unwrap())
                .replace("${CREDENTIALS_DIRECTORY}", dir.to_str().unwrap())
        })
        .collect();
    assert!(args.iter().any(|a| a.ends_with("/api-key")), "{args:?}");
    let out = relay().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // systemd's own verifier, on a copy whose ExecStart names the binary just
    // built. tests/run installs it (Debian package systemd) with the other tools.
    let copy = dir.join("netpilot-relay.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/netpilot-relay",
            env!("CARGO_BIN_EXE_netpilot-relay"),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian package systemd; tests/run installs it as root)");
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
