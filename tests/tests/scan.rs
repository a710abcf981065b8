//! Device discovery (`GET /api/scan`) end to end: through the relay against the
//! simulated router (leases, neighbours and hostapd stations merged, with the group
//! and blocked state of the policy), and in network namespaces with the real kernel
//! neighbour table read by the real `ip`, a lease file, and no hostapd at all.

use netpilot_tests::lab::{self, Lab, C1_IP, C1_MAC, C2_MAC, LAN_IF};
use netpilot_tests::ApiRig;
use serde_json::{json, Value};

fn device<'a>(scan: &'a Value, mac: &str) -> &'a Value {
    scan["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["mac"] == mac)
        .unwrap_or_else(|| panic!("{mac} not in {scan}"))
}

#[tokio::test]
async fn the_simulated_router_lists_its_devices_with_wireless_details_and_policy_state() {
    let rig = ApiRig::simulated().await.unwrap();
    let alice = rig.session("alice").await.unwrap();

    let r = alice
        .post(
            "/api/groups/sync",
            json!({"group": {"id": 4, "name": "Kids",
                "devices": [{"mac": "02-00-00-00-01-03", "name": "Tablet"}],
                "policy": {"internet": "block"}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = alice
        .post("/api/block", json!({"ip": "192.168.1.105"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);

    let r = alice.get("/api/scan").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let scan = &r.body["data"];
    assert_eq!(scan["total"], 5, "{scan}");
    assert_eq!(scan["sources"]["leases"]["state"], "ok");
    assert_eq!(scan["sources"]["wireless"]["state"], "ok");

    let alice = device(scan, "3c:a9:f4:00:01:01");
    assert_eq!(alice["hostname"], "alice-laptop");
    assert_eq!(alice["name"], "alice-laptop");
    assert_eq!(alice["name_source"], "hostname");
    assert_eq!(alice["randomized"], false);
    // The relay names the maker from the IEEE registry (issue 17).
    assert_eq!(alice["vendor"], "Intel Corporate");
    assert_eq!(alice["ip"], "192.168.1.101");
    assert_eq!(alice["connection"], "wireless");
    assert_eq!(alice["wireless"]["band"], "5g");
    assert_eq!(alice["interface"], "phy1-ap0");
    assert!(alice["wireless"]["signal_dbm"].as_i64().unwrap() < 0);
    assert_eq!(alice["online"], true);
    assert!(alice["last_seen"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(alice["group"], json!({"id": 0, "name": "Guests"}));
    assert_eq!(alice["blocked"], false);

    // Today's and the period's traffic, from the simulated nlbwmon.
    assert_eq!(scan["sources"]["usage"]["state"], "ok");
    assert_eq!(scan["usage_period"], "2026-11-01");
    let period_rx = alice["usage"]["period"]["bytes_rx"].as_u64().unwrap();
    let today_rx = alice["usage"]["today"]["bytes_rx"].as_u64().unwrap();
    assert!(period_rx > 0 && today_rx > 0, "{alice}");
    assert!(today_rx <= period_rx, "{alice}");

    // The owner's name wins over the DHCP hostname; its random MAC is said.
    let tablet = device(scan, "02:00:00:00:01:03");
    assert_eq!(
        (&tablet["name"], &tablet["name_source"], &tablet["hostname"]),
        (&json!("Tablet"), &json!("owner"), &json!("kids-tablet"))
    );
    assert_eq!(tablet["randomized"], true);
    assert_eq!(tablet["vendor"], Value::Null, "a random MAC names no maker");
    assert_eq!(tablet["group"], json!({"id": 4, "name": "Kids"}));
    assert_eq!(tablet["blocked"], true);
    assert_eq!(tablet["blocked_by"], json!(["group 4"]));
    assert_eq!(tablet["wireless"]["band"], "2g");

    let printer = device(scan, "30:05:5c:00:01:05");
    assert_eq!(printer["vendor"], "Brother industries, LTD.");
    assert_eq!(printer["connection"], "wired");
    assert_eq!(printer["blocked_by"], json!(["block"]));
}

#[tokio::test]
async fn netns_real_neighbours_and_a_lease_file_without_hostapd() {
    let lab = Lab::new().unwrap();
    // The router's files under a root of the test's: a lease file for c1, c2 and a
    // device that is not on the network now.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("tmp")).unwrap();
    std::fs::write(
        root.path().join("tmp/dhcp.leases"),
        format!(
            "1900000000 {C1_MAC} {C1_IP} c1-laptop *\n\
             1900000000 {C2_MAC} {} c2-phone *\n\
             1900000000 02:4e:50:00:00:99 192.168.77.99 gone *\n",
            lab::C2_IP
        ),
    )
    .unwrap();
    let root_arg = root.path().to_str().unwrap().to_owned();
    let mut rig = ApiRig::builder()
        .in_lab(&lab)
        .agent_args(&["--root", &root_arg, "--ubus", "netpilot-no-such-ubus"])
        .start()
        .await
        .unwrap();
    let api = rig.local_api();
    // c1 talks to the router, so the kernel resolves its address (a real
    // neighbour entry); the router talks to the WAN host, whose entry is upstream.
    let on_router = lab.listen(&lab.router, lab::ROUTER_LAN).unwrap();
    assert_eq!(lab.probe(&lab.c1, on_router), lab::Probe::Open);
    let wan = lab.listen(&lab.wan, lab::WAN_HOST).unwrap();
    assert_eq!(lab.probe(&lab.router, wan), lab::Probe::Open);

    let (status, body) = lab.api(api, "GET", "/api/scan", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let scan = &body["data"];
    assert_eq!(scan["sources"]["neighbours"]["state"], "ok", "{scan}");
    assert_eq!(scan["sources"]["wireless"]["state"], "missing");
    let c1 = device(scan, C1_MAC);
    assert_eq!(c1["online"], true, "{c1}");
    assert_eq!(c1["hostname"], "c1-laptop");
    assert_eq!(c1["interface"], LAN_IF);
    assert_eq!(
        c1["connection"], "unknown",
        "no hostapd: wired or not is unknown"
    );
    let gone = device(scan, "02:4e:50:00:00:99");
    assert_eq!(gone["online"], false);
    assert_eq!(gone["last_seen"], Value::Null);
    // The WAN host's MAC (learnt on wan0) is not a LAN device.
    let macs: Vec<&str> = scan["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["mac"].as_str().unwrap())
        .collect();
    let wan_mac = lab
        .exec(&lab.wan, &["cat", "/sys/class/net/eth0/address"])
        .unwrap();
    assert!(!macs.contains(&wan_mac.trim()), "{macs:?}");

    // c1 leaves (its neighbour entry goes) and the agent restarts: the time it was
    // last seen outlives both, read back from the agent's SQLite.
    let seen_at = c1["last_seen"].as_u64().unwrap();
    lab.exec(&lab.router, &["ip", "neigh", "flush", "dev", LAN_IF])
        .unwrap();
    rig.restart_agent_gracefully().await.unwrap();
    let (status, body) = lab.api(rig.local_api(), "GET", "/api/scan", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let c1 = device(&body["data"], C1_MAC);
    assert_eq!(c1["online"], false, "{c1}");
    assert_eq!(c1["last_seen"], seen_at, "{c1}");
    assert_eq!(
        device(&body["data"], "02:4e:50:00:00:99")["last_seen"],
        Value::Null
    );
}

#[tokio::test]
async fn without_nlbwmon_the_scan_lists_devices_and_says_why_there_is_no_usage() {
    let dir = tempfile::tempdir().unwrap();
    let down = netpilot_tests::fake_nlbw(dir.path(), netpilot_tests::NLBW_DOWN);
    let rig = ApiRig::builder()
        .agent_args(&["--simulate", "--nlbw", &down])
        .start()
        .await
        .unwrap();
    let alice = rig.session("alice").await.unwrap();
    let r = alice.get("/api/scan").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let scan = &r.body["data"];
    assert_eq!(scan["total"], 5, "{scan}");
    assert_eq!(scan["sources"]["usage"]["state"], "error", "{scan}");
    let why = scan["sources"]["usage"]["detail"].as_str().unwrap();
    assert!(why.contains("nlbwmon"), "{why}");
    assert_eq!(scan["usage_period"], Value::Null);
    for d in scan["devices"].as_array().unwrap() {
        assert_eq!(d["usage"], Value::Null, "{d}");
        assert!(
            d["name"].is_string(),
            "every simulated device has a name: {d}"
        );
    }
}
