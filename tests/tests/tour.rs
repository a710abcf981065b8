//! The README's first command: the tour runs to the end and shows real answers.

#[test]
fn the_tour_runs_end_to_end() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netpilot-tour"))
        .args(["--once", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expect in [
        "enrolled as router",
        "\"router_reachable\": true",
        "\"hostname\": \"netpilot-sim\"",
        "\"state\": \"pending\"",
        "\"code\": \"INVALID_SSID\"",
        "\"state\": \"confirmed\"",
        "\"method\": \"tls_connection\"",
        "\"code\": \"FORBIDDEN\"",
        "\"class\": \"4e50:102\"",
        "\"code\": \"INVALID_MAC\"",
        "\"in_sync\": true",
        "\"hostname\": \"living-room-tv\"",
        "\"top_devices\"",
        "netpilot_connected_agents 1",
        "Tour complete",
    ] {
        assert!(stdout.contains(expect), "missing {expect:?} in\n{stdout}");
    }
}
