//! The relay ships built with `panic = "unwind"`: a panic in one connection's task
//! then ends that task (tokio catches it) instead of aborting the process and
//! dropping every router's link. Cargo sets `panic` per profile only, and the
//! agent's `release` must stay `abort` for its size, so the relay has its own
//! profile, `relay`. Nothing outside can make a connection panic (there is no such
//! route, and a test-only one would prove nothing about the real code), so this
//! checks the build instead: the profile, and every place that builds a release
//! relay using it.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("relay/ has a parent")
        .to_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn the_relay_profile_is_release_with_unwinding() {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let profiles = manifest["profile"].as_table().expect("[profile.*]");
    let relay = profiles["relay"].as_table().expect("[profile.relay]");
    assert_eq!(relay["inherits"].as_str(), Some("release"));
    assert_eq!(relay["panic"].as_str(), Some("unwind"));
    // Everything else comes from `release`, whose relay-specific opt-level the
    // profile inherits rather than repeats.
    assert!(
        relay.keys().all(|k| k == "inherits" || k == "panic"),
        "{relay:?}"
    );
    // The agent's profile stays as small as it was.
    assert_eq!(profiles["release"]["panic"].as_str(), Some("abort"));
}

#[test]
fn every_release_build_of_the_relay_uses_its_profile() {
    for (file, wanted) in [
        (".ci/run", "--profile relay -p netpilot-relay"),
        (".ci/run", "NETPILOT_RELAY=target/relay/netpilot-relay"),
        ("README.md", "--profile relay -p netpilot-relay"),
        ("README.md", "target/relay/netpilot-relay"),
        (
            "relay/deploy/netpilot-relay.service",
            "--profile relay -p netpilot-relay",
        ),
        (
            "relay/deploy/netpilot-relay.service",
            "target/relay/netpilot-relay",
        ),
        ("tests/benches/link.rs", "(\"relay\", \"netpilot-relay\")"),
        ("cross/build.sh", "target/relay/netpilot-relay"),
    ] {
        assert!(read(file).contains(wanted), "{file} lacks {wanted:?}");
    }
    for file in [
        ".ci/run",
        "README.md",
        "relay/deploy/netpilot-relay.service",
    ] {
        let text = read(file);
        assert!(
            !text.contains("--release -p netpilot-relay")
                && !text.contains("target/release/netpilot-relay"),
            "{file} still builds or installs the relay from the `release` profile"
        );
    }
}
