//! Precedence as plain values: the command line over the UCI file over the defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// A UCI file with `text` for [`load`], removed when dropped.
struct Uci(PathBuf);

fn uci(text: &str) -> Uci {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "np-config-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, text).unwrap();
    Uci(path)
}

impl std::ops::Deref for Uci {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Uci {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const NO_FILE: &str = "/nonexistent/netpilot";

fn load(args: &[&str], file: &Path) -> Result<AgentConfig, ConfigError> {
    AgentConfig::load(args.iter().map(OsString::from), file)
}

fn run_config(args: &[&str], file: &Path) -> (RunConfig, AgentConfig) {
    let mut config = load(args, file).unwrap();
    let Command::Run(run) = std::mem::replace(&mut config.command, Command::Help) else {
        panic!("not run: {config:?}");
    };
    (run, config)
}

const FINGERPRINT: &str = "abababababababababababababababababababababababababababababababab";
const OTHER_FINGERPRINT: &str = "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";

fn full_file() -> Uci {
    uci(&format!(
        "config agent 'main'\n\
         \toption relay_url 'https://uci.example:8443'\n\
         \toption fingerprint '{FINGERPRINT}'\n\
         \toption log_level 'warn'\n\
         \toption state_dir '/uci/state'\n\
         \toption start_delay '7s'\n"
    ))
}

#[test]
fn defaults_without_file_or_options() {
    let (run, config) = run_config(&["run"], Path::new(NO_FILE));
    let defaults = RunConfig::default();
    assert_eq!(run.state_dir, Path::new("/etc/netpilot"));
    assert!(run.relay_urls.is_empty());
    assert_eq!(run.trust, None);
    assert_eq!(
        run.backoff.start_delay_max,
        defaults.backoff.start_delay_max
    );
    assert_eq!(run.dns_upstreams, defaults.dns_upstreams);
    assert_eq!(config.log, "info");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn the_uci_file_beats_the_defaults() {
    let (run, config) = run_config(&["run"], &full_file());
    assert_eq!(run.state_dir, Path::new("/uci/state"));
    assert_eq!(run.relay_urls, ["https://uci.example:8443"]);
    assert_eq!(run.trust, Some(Trust::Fingerprint(FINGERPRINT.into())));
    assert_eq!(run.backoff.start_delay_max, Duration::from_secs(7));
    assert_eq!(config.log, "warn");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    let ca = uci("config agent\n\toption ca_file '/uci/ca.pem'\n");
    let (run, _) = run_config(&["run"], &ca);
    assert_eq!(run.trust, Some(Trust::CaFile("/uci/ca.pem".into())));
}

#[test]
fn the_command_line_beats_the_uci_file() {
    let file = full_file();
    let (run, config) = run_config(
        &[
            "run",
            "--state-dir",
            "/cli/state",
            "--relay",
            "https://cli.example",
            "--ca",
            "/cli/ca.pem",
            "--log",
            "debug",
            "--start-delay-max",
            "0s",
        ],
        &file,
    );
    assert_eq!(run.state_dir, Path::new("/cli/state"));
    assert_eq!(run.relay_urls, ["https://cli.example"]);
    // --ca replaces the file's fingerprint rather than clashing with it.
    assert_eq!(run.trust, Some(Trust::CaFile("/cli/ca.pem".into())));
    assert_eq!(run.backoff.start_delay_max, Duration::ZERO);
    assert_eq!(config.log, "debug");

    let ca = uci("config agent\n\toption ca_file '/uci/ca.pem'\n");
    let (run, _) = run_config(&["run", "--fingerprint", OTHER_FINGERPRINT], &ca);
    assert_eq!(
        run.trust,
        Some(Trust::Fingerprint(OTHER_FINGERPRINT.into()))
    );
}

#[test]
fn enroll_resolves_the_same_way() {
    let file = full_file();
    let Command::Enroll(e) = load(&["enroll", "--token", "t", "--force"], &file)
        .unwrap()
        .command
    else {
        panic!("not enroll");
    };
    let args = e.args().unwrap();
    assert_eq!(args.relay_url, "https://uci.example:8443");
    assert_eq!(args.token, "t");
    assert_eq!(args.trust, Trust::Fingerprint(FINGERPRINT.into()));
    assert_eq!(args.state_dir, Path::new("/uci/state"));
    assert!(args.force);

    // Without anything: the system's CA bundle, and the required ones asked for in
    // the order they always were.
    let Command::Enroll(e) = load(&["enroll"], Path::new(NO_FILE)).unwrap().command else {
        panic!("not enroll");
    };
    assert_eq!(e.trust, Trust::System);
    assert!(!e.force);
    let err = e.args().err().unwrap().to_string();
    assert_eq!(err, "enroll needs --relay URL (or relay_url in the config)");
    let Command::Enroll(e) = load(&["enroll", "--relay", "https://r"], Path::new(NO_FILE))
        .unwrap()
        .command
    else {
        panic!("not enroll");
    };
    assert_eq!(
        e.args().err().unwrap().to_string(),
        "enroll needs --token TOKEN"
    );
}

#[test]
fn ca_with_fingerprint_is_refused_and_a_fingerprint_checked() {
    let err = load(
        &["run", "--ca", "/a", "--fingerprint", FINGERPRINT],
        Path::new(NO_FILE),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "pass --ca or --fingerprint, not both");
    let err = load(&["run", "--fingerprint", "nothex"], Path::new(NO_FILE)).unwrap_err();
    assert!(matches!(err, ConfigError::Fingerprint(_)), "{err}");
    assert!(err.to_string().contains("fingerprint"), "{err}");
}

#[test]
fn dns_upstream_first_replaces_then_appends() {
    let (run, _) = run_config(&["run"], Path::new(NO_FILE));
    assert_eq!(run.dns_upstreams, RunConfig::default().dns_upstreams);
    assert!(!run.dns_upstreams.is_empty());
    let (run, _) = run_config(
        &[
            "run",
            "--dns-upstream",
            "10.0.0.1",
            "--dns-upstream",
            "10.0.0.2#5353",
        ],
        Path::new(NO_FILE),
    );
    assert_eq!(run.dns_upstreams, ["10.0.0.1", "10.0.0.2#5353"]);
}

#[test]
fn values_are_checked_with_the_option_named() {
    for (args, message) in [
        (
            &["run", "--ping-interval", "soon"][..],
            "--ping-interval \"soon\" is not a duration: ",
        ),
        (
            &["run", "--check-interval", "0s"],
            "--check-interval must be positive",
        ),
        (
            &["run", "--api-listen", "localhost"],
            "--api-listen \"localhost\" is not ADDR:PORT",
        ),
        (
            &["run", "--dns-port-base", "70000"],
            "--dns-port-base \"70000\" is not a port number",
        ),
        (
            &["run", "--usage-retention-days", "many"],
            "--usage-retention-days \"many\" is not a number",
        ),
    ] {
        let err = load(args, Path::new(NO_FILE)).unwrap_err();
        // What `main` prints: the message and its cause.
        let shown = crate::error::Error::from(err).to_string();
        assert!(shown.starts_with(message), "{args:?}: {shown}");
    }
    // Zero is fine where it means "none".
    let (run, _) = run_config(
        &["run", "--wifi-settle", "0s", "--start-delay-max", "0s"],
        Path::new(NO_FILE),
    );
    assert_eq!(run.wifi_safe.settle, Duration::ZERO);
}

#[test]
fn command_line_mistakes_name_the_usage() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["run", "extra"],
        &["run", "--bogus"],
    ] {
        let err = load(args, Path::new(NO_FILE)).unwrap_err().to_string();
        assert!(
            err.contains("usage: netpilot-agent enroll"),
            "{args:?}: {err}"
        );
    }
    let err = load(&["run", "--state-dir"], Path::new(NO_FILE)).unwrap_err();
    assert!(matches!(err, ConfigError::Args(_)), "{err}");
}

#[test]
fn version_and_help_stop_before_anything_else_is_read() {
    let broken = uci("config agent\n\toption enabled 'perhaps'\n");
    for (args, want) in [
        (&["--config", "/x", "--version", "--bogus"][..], "version"),
        (&["run", "-V"], "version"),
        (&["--help", "frobnicate"], "help"),
        (&["-h"], "help"),
    ] {
        let config = load(args, &broken).unwrap();
        let got = match config.command {
            Command::Version => "version",
            Command::Help => "help",
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(got, want, "{args:?}");
        assert!(config.warnings.is_empty(), "{args:?}");
    }
}

#[test]
fn a_broken_file_is_reported_and_the_command_line_still_runs() {
    let broken = uci("config agent\n\toption start_delay 'soon'\n\toption log_level 'warn'\n");
    let (run, config) = run_config(&["run", "--state-dir", "/cli"], &broken);
    assert_eq!(run.state_dir, Path::new("/cli"));
    // Nothing of a broken file is used, not even its valid options.
    assert_eq!(config.log, "info");
    match &config.warnings[..] {
        [w @ Warning::IgnoredFile { path, .. }] => {
            assert_eq!(path, &broken.0);
            let text = w.to_string();
            assert!(
                text.starts_with(&format!("ignoring {}: ", broken.display())),
                "{text}"
            );
            assert!(text.contains("start_delay"), "{text}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_options_are_warned_and_the_rest_used() {
    let file = uci("config agent 'main'\n\toption shiny_new 'x'\n\toption log_level 'debug'\n");
    let (_, config) = run_config(&["run"], &file);
    assert_eq!(config.log, "debug");
    match &config.warnings[..] {
        [Warning::UnknownOptions { path, options }] => {
            assert_eq!(path, &file.0);
            assert_eq!(options, &["shiny_new"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn config_names_another_file() {
    let file = full_file();
    let (run, _) = run_config(
        &["run", "--config", file.to_str().unwrap()],
        Path::new(NO_FILE),
    );
    assert_eq!(run.state_dir, Path::new("/uci/state"));
}

#[test]
fn the_packaged_config_loads_cleanly() {
    let packaged =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../openwrt-package/files/netpilot.config");
    let (run, config) = run_config(&["run"], &packaged);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(config.log, "info");
    assert_eq!(run.state_dir, Path::new("/etc/netpilot"));
    assert_eq!(run.backoff.start_delay_max, Duration::from_secs(10));
}

#[test]
fn cleanup_takes_the_same_programs_and_devices_as_run() {
    let config = load(
        &[
            "cleanup",
            "--nft",
            "/opt/nft",
            "--tc",
            "/opt/tc",
            "--dnsmasq",
            "/opt/dnsmasq",
            "--dns-dir",
            "/tmp/dns",
            "--lan-if",
            "lan0",
        ],
        Path::new(NO_FILE),
    )
    .unwrap();
    let Command::Cleanup(run) = config.command else {
        panic!("not cleanup");
    };
    assert_eq!(
        (
            run.nft.as_str(),
            run.tc.as_str(),
            run.dnsmasq.as_str(),
            run.lan_ifs.clone()
        ),
        (
            "/opt/nft",
            "/opt/tc",
            "/opt/dnsmasq",
            vec!["lan0".to_owned()]
        )
    );
    assert_eq!(run.dns_dir, Path::new("/tmp/dns"));
}

#[test]
fn lan_bridges_and_the_dns_user_come_from_the_line_or_the_file() {
    let file = uci(
        "config agent 'main'\n\tlist lan_if 'br-lan'\n\tlist lan_if 'br-guest'\n\toption dns_user 'nobody'\n",
    );
    let (run, config) = run_config(&["run"], &file);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(run.lan_ifs, ["br-lan", "br-guest"]);
    assert_eq!(run.dns_user.as_deref(), Some("nobody"));
    // The command line's bridges replace the file's, whole.
    let (run, _) = run_config(
        &[
            "run",
            "--lan-if",
            "br0",
            "--lan-if",
            "br1",
            "--dns-user",
            "-",
        ],
        &file,
    );
    assert_eq!(run.lan_ifs, ["br0", "br1"]);
    assert_eq!(run.dns_user.as_deref(), Some("-"));
    run.validate().unwrap();
    let (bad, _) = run_config(
        &["run", "--lan-if", "br0", "--lan-if", "a b"],
        Path::new(NO_FILE),
    );
    assert!(bad.validate().is_err());
    // Defaults: discovered bridges, fw4's include root, its init script.
    let (run, _) = run_config(&["run"], Path::new(NO_FILE));
    assert!(run.lan_ifs.is_empty() && run.dns_user.is_none());
    assert_eq!(run.fw4_includes, Path::new("/usr/share/nftables.d"));
    assert_eq!(run.firewall_reload, "/etc/init.d/firewall");
    let (run, _) = run_config(
        &["run", "--fw4-include-dir", "/x", "--firewall-reload", ""],
        Path::new(NO_FILE),
    );
    assert_eq!(
        (run.fw4_includes.as_path(), run.firewall_reload.as_str()),
        (Path::new("/x"), "")
    );
}

#[test]
fn fw4_paths_default_to_openwrts_and_the_boot_copy_follows_the_state_dir() {
    let (run, _) = run_config(&["run"], &full_file());
    let p = run.fw4_paths();
    assert_eq!(p.live_dir, Path::new("/var/run/netpilot/fw4"));
    assert_eq!(
        p.include,
        Path::new("/usr/share/nftables.d/ruleset-post/netpilot.nft")
    );
    assert_eq!(p.boot, Path::new("/uci/state/boot.nft"));
    assert_eq!(
        run.control.as_deref(),
        Some(Path::new("/var/run/netpilot/ctl/agent.sock"))
    );
    let config = load(
        &[
            "boot",
            "--fw4-dir",
            "/t/fw4",
            "--fw4-include",
            "/t/post/np.nft",
            "--boot-copy",
            "/t/boot.nft",
        ],
        &full_file(),
    )
    .unwrap();
    let Command::Boot(run) = config.command else {
        panic!("not boot");
    };
    let p = run.fw4_paths();
    assert_eq!(
        (p.live_dir, p.include, p.boot),
        (
            PathBuf::from("/t/fw4"),
            PathBuf::from("/t/post/np.nft"),
            PathBuf::from("/t/boot.nft")
        )
    );
}

#[test]
fn control_requests_take_the_socket_and_json() {
    let config = load(
        &["status", "--json", "--control", "/t/a.sock"],
        Path::new(NO_FILE),
    )
    .unwrap();
    let Command::Control { verb, socket, json } = config.command else {
        panic!("not a control request");
    };
    assert_eq!(
        (verb, socket.as_path(), json),
        (ControlVerb::Status, Path::new("/t/a.sock"), true)
    );
    for (word, want) in [
        ("reconnect", ControlVerb::Reconnect),
        ("reapply", ControlVerb::Reapply),
    ] {
        let config = load(&[word], Path::new(NO_FILE)).unwrap();
        let Command::Control { verb, socket, json } = config.command else {
            panic!("not a control request");
        };
        assert_eq!(
            (verb, socket.as_path(), json),
            (want, Path::new(CONTROL_SOCKET), false)
        );
        assert_eq!(ControlVerb::parse(word), Some(want));
    }
}

#[test]
fn relays_are_a_list_in_order_and_the_command_line_replaces_the_file_s() {
    let file = uci("config agent 'main'\n\
         \toption relay_url 'https://a.example'\n\
         \tlist relay 'https://b.example:8443'\n\
         \tlist relay 'https://c.example'\n\
         \toption reconnect_spread '45s'\n");
    let (run, config) = run_config(&["run"], &file);
    assert_eq!(
        run.relay_urls,
        [
            "https://a.example",
            "https://b.example:8443",
            "https://c.example"
        ]
    );
    assert_eq!(run.backoff.reconnect_spread, Duration::from_secs(45));
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    let (run, _) = run_config(
        &[
            "run",
            "--relay",
            "https://x.example",
            "--relay",
            "https://y.example",
            "--reconnect-spread",
            "0s",
        ],
        &file,
    );
    assert_eq!(run.relay_urls, ["https://x.example", "https://y.example"]);
    assert_eq!(run.backoff.reconnect_spread, Duration::ZERO);

    // Enrollment asks the first relay (and stores it).
    let Command::Enroll(e) = load(&["enroll", "--token", "t"], &file).unwrap().command else {
        panic!("not enroll");
    };
    assert_eq!(e.args().unwrap().relay_url, "https://a.example");

    // The default window.
    let (run, _) = run_config(&["run"], Path::new(NO_FILE));
    assert_eq!(run.backoff.reconnect_spread, Duration::from_secs(30));
}
