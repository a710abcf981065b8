//! The policy engine enforced by the real kernel, proven by traffic: a router
//! namespace running the real agent (real nft and tc) between two LAN clients and a
//! WAN host (see `netpilot_tests::lab`). The agent is enrolled with a relay on this
//! host and driven through its local API inside the router namespace; the relay path
//! of the same API is covered by `groups.rs`. Needs root, nft, tc, iperf3 and ss
//! (`tests/run` installs them).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use netpilot_tests::lab::{self, Lab, Probe, C1_MAC, C2_MAC, WAN_HOST};
use netpilot_tests::ApiRig;
use serde_json::{json, Value};

/// The lab, and NetPilot's relay and agent with the agent in its router namespace.
struct Rig {
    netpilot: ApiRig,
    lab: Lab,
}

async fn rig(extra: &[&str]) -> Rig {
    netpilot_testkit::require(&["nft", "tc", "iperf3", "ss"]);
    let lab = Lab::new().unwrap();
    let mut args = vec!["--check-interval", "300ms"];
    args.extend_from_slice(extra);
    let netpilot = ApiRig::builder()
        .in_lab(&lab)
        .agent_args(&args)
        .start()
        .await
        .unwrap();
    Rig { netpilot, lab }
}

impl Rig {
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        self.lab
            .api_data(self.netpilot.local_api(), method, path, body)
    }

    fn status(&self) -> Value {
        self.call("GET", "/api/infrastructure/status", json!({}))["status"].clone()
    }

    /// Polls the engine's status until `pred` holds (the engine's own event, seen
    /// through the API).
    fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wan_listener(&self) -> SocketAddr {
        self.lab.listen(&self.lab.wan, WAN_HOST).unwrap()
    }

    fn router_listener(&self) -> SocketAddr {
        self.lab.listen(&self.lab.router, lab::ROUTER_LAN).unwrap()
    }
}

fn group(id: u32, mac: &str, policy: Value) -> Value {
    json!({"group": {"id": id, "name": format!("group {id}"), "devices": [{"mac": mac}], "policy": policy}})
}

#[tokio::test]
async fn netns_a_5_mbit_group_is_shaped_both_ways_and_an_unlimited_device_is_not() {
    let rig = rig(&[]).await;
    rig.call(
        "POST",
        "/api/groups/sync",
        group(
            3,
            C1_MAC,
            json!({"bandwidth": {"downloadKbps": 5000, "uploadKbps": 5000}}),
        ),
    );
    let l = &rig.lab;
    let up = l.throughput(&l.c1, &l.wan, WAN_HOST, false, 3).unwrap();
    let down = l.throughput(&l.c1, &l.wan, WAN_HOST, true, 3).unwrap();
    let free = l.throughput(&l.c2, &l.wan, WAN_HOST, true, 3).unwrap();
    println!("limited to 5 Mbit/s: upload {up:.2}, download {down:.2}; unlimited device: {free:.0} Mbit/s");
    for (what, v) in [("upload", up), ("download", down)] {
        assert!(
            (4.25..=5.75).contains(&v),
            "{what} {v:.2} Mbit/s is not within ±15% of 5"
        );
    }
    assert!(
        free >= 20.0 * 5.0,
        "the unlimited device got {free:.1} Mbit/s"
    );
    // The policy lifted: the same device is no longer held back.
    rig.call(
        "PUT",
        "/api/groups/3/policy",
        json!({"policy": {"bandwidth": null}}),
    );
    let lifted = l.throughput(&l.c1, &l.wan, WAN_HOST, true, 2).unwrap();
    println!("limit lifted: {lifted:.0} Mbit/s");
    assert!(lifted >= 100.0, "{lifted:.1}");
}

#[tokio::test]
async fn netns_a_blocked_device_cannot_reach_the_wan_but_still_reaches_the_router() {
    let rig = rig(&[]).await;
    let (wan, router) = (rig.wan_listener(), rig.router_listener());
    let l = &rig.lab;
    assert_eq!(l.probe(&l.c1, wan), Probe::Open, "before blocking");
    rig.call("POST", "/api/block", json!({"mac": C1_MAC.to_uppercase()}));
    assert_eq!(l.probe(&l.c1, wan), Probe::Refused);
    assert_eq!(l.probe(&l.c2, wan), Probe::Open);
    assert_eq!(l.probe(&l.c1, router), Probe::Open);
    assert_eq!(l.probe(&l.c2, router), Probe::Open);
    // By address too, and undone by unblock.
    rig.call("POST", "/api/block", json!({"ip": lab::C2_IP}));
    assert_eq!(l.probe(&l.c2, wan), Probe::Refused);
    rig.call("POST", "/api/unblock", json!({"mac": C1_MAC}));
    rig.call("POST", "/api/unblock", json!({"ip": lab::C2_IP}));
    assert_eq!(l.probe(&l.c1, wan), Probe::Open);
    assert_eq!(l.probe(&l.c2, wan), Probe::Open);
    // A whole group blocked.
    rig.call(
        "POST",
        "/api/groups/sync",
        group(4, C2_MAC, json!({"internet": "block"})),
    );
    assert_eq!(l.probe(&l.c2, wan), Probe::Refused);
    assert_eq!(l.probe(&l.c1, wan), Probe::Open);
    assert_eq!(l.probe(&l.c2, router), Probe::Open);
}

#[tokio::test]
async fn netns_a_whitelist_lets_only_listed_devices_and_the_router_out() {
    let rig = rig(&[]).await;
    let (wan, router) = (rig.wan_listener(), rig.router_listener());
    let l = &rig.lab;
    let r = rig.call("POST", "/api/whitelist/add", json!({"mac": C2_MAC}));
    assert_eq!(r["changed"], json!(true));
    assert_eq!(l.probe(&l.c1, wan), Probe::Refused);
    assert_eq!(l.probe(&l.c2, wan), Probe::Open);
    assert_eq!(l.probe(&l.c1, router), Probe::Open);
    assert_eq!(l.probe(&l.router, wan), Probe::Open, "the router itself");
    rig.call("POST", "/api/whitelist/remove", json!({"mac": C2_MAC}));
    assert_eq!(l.probe(&l.c1, wan), Probe::Open);
}

/// A window around now in the injected zone blocks; one two hours ahead does not.
#[tokio::test]
async fn netns_a_schedule_window_containing_now_blocks_and_one_that_does_not_leaves_traffic() {
    // India: +05:30, no DST; the kernel's hours are UTC, so the zone matters.
    const TZ: &str = "<+0530>-5:30";
    let rig = rig(&["--timezone", TZ]).await;
    let wan = rig.wan_listener();
    let l = &rig.lab;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 5 * 3600
        + 1800;
    let window = |from: i64, to: i64| {
        let day = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
            [((from.div_euclid(86_400) + 4).rem_euclid(7)) as usize];
        let hm = |t: i64| {
            format!(
                "{:02}:{:02}",
                t.rem_euclid(86_400) / 3600,
                t.rem_euclid(3600) / 60
            )
        };
        json!({"days": [day], "start": hm(from), "end": hm(to), "action": "block"})
    };
    rig.call(
        "POST",
        "/api/groups/sync",
        group(
            3,
            C1_MAC,
            json!({"schedules": [window(now - 1800, now + 1800)]}),
        ),
    );
    rig.call(
        "POST",
        "/api/groups/sync",
        group(
            4,
            C2_MAC,
            json!({"schedules": [window(now + 2 * 3600, now + 3 * 3600)]}),
        ),
    );
    assert_eq!(l.probe(&l.c1, wan), Probe::Refused, "inside its window");
    assert_eq!(l.probe(&l.c2, wan), Probe::Open, "outside its window");
    assert_eq!(rig.status()["timezone"], json!(TZ));
}

/// The agent dies (SIGKILL) after nft took a new table but before the store
/// recorded it; restarted, it puts the kernel back to the stored policy.
#[tokio::test]
async fn netns_a_kill_in_the_middle_of_an_apply_converges_to_the_stored_state() {
    let dir = tempfile::tempdir().unwrap();
    let (hold, mark, gate, done) = (
        dir.path().join("hold"),
        dir.path().join("mark"),
        dir.path().join("gate"),
        dir.path().join("done"),
    );
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // An nft that, while `hold` exists, stops before a whole-script apply until
    // the test opens the gate.
    let wrapper = dir.path().join("nft");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = -f ] && [ -e '{hold}' ]; then\n  : > '{mark}'\n  read _ < '{gate}'\n  nft \"$@\"; rc=$?\n  : > '{done}'\n  exit $rc\nfi\nexec nft \"$@\"\n",
            hold = hold.display(),
            mark = mark.display(),
            gate = gate.display(),
            done = done.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let wrapper_s = wrapper.to_string_lossy().into_owned();

    let mut rig = rig(&["--nft", &wrapper_s]).await;
    let wan = rig.wan_listener();
    rig.call(
        "POST",
        "/api/groups/sync",
        group(3, C1_MAC, json!({"internet": "block"})),
    );
    assert_eq!(rig.lab.probe(&rig.lab.c1, wan), Probe::Refused);
    let stored_generation = rig.status()["generation"].clone();

    // The change that will be cut off: allow the group, and one more device.
    std::fs::write(&hold, "").unwrap();
    let api = rig.netpilot.local_api();
    let pid = nix::unistd::Pid::from_raw(rig.netpilot.agent.pid().unwrap() as i32);
    let body = json!({"groups": [{"id": 3, "name": "group 3", "devices": [{"mac": C1_MAC}, {"mac": "02:4e:50:00:00:99"}], "policy": {"internet": "allow"}}]});
    let lab_ref = &rig.lab;
    std::thread::scope(|s| {
        let call = s.spawn(|| lab_ref.api(api, "POST", "/api/groups/sync-all", Some(&body)));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mark.exists() {
            if call.is_finished() || Instant::now() > deadline {
                panic!("the apply never reached nft: {:?}", call.join());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        // The call dies with the agent: no answer at all.
        let answer = call.join().unwrap();
        assert!(answer.is_err(), "{answer:?}");
    });
    rig.netpilot.agent.kill().await;
    // Let the orphaned nft finish: the kernel now has the table the store never
    // recorded.
    std::fs::write(&gate, "go\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done.exists() {
        assert!(Instant::now() < deadline, "nft did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        rig.lab.probe(&rig.lab.c1, wan),
        Probe::Open,
        "the unrecorded table is live"
    );

    std::fs::remove_file(&hold).unwrap();
    rig.netpilot.restart_agent().await.unwrap();
    let s = rig.wait_status("the start-up reconcile", |s| {
        s["in_sync"] == json!(true) && s["drift_repairs"].as_u64() >= Some(1)
    });
    assert_eq!(s["generation"], stored_generation);
    assert!(!s["last_drift"].as_array().unwrap().is_empty(), "{s}");
    assert_eq!(
        rig.lab.probe(&rig.lab.c1, wan),
        Probe::Refused,
        "the stored policy is back"
    );
    let g = rig.call("GET", "/api/groups/3", json!({}));
    assert_eq!(g["policy"]["internet"], json!("block"));
    assert_eq!(g["devices"].as_array().unwrap().len(), 1);
    // One table of ours, its chains once each.
    let tables = rig
        .lab
        .exec(&rig.lab.router, &["nft", "list", "tables"])
        .unwrap();
    assert_eq!(tables.matches("table inet netpilot").count(), 1, "{tables}");
    let chains = rig
        .lab
        .exec(&rig.lab.router, &["nft", "list", "chains", "inet"])
        .unwrap();
    assert_eq!(chains.matches("chain from_lan {").count(), 1, "{chains}");
}

/// Someone flushes NetPilot's table (a person, or a script that flushes the
/// ruleset): the periodic check reports it and puts it back.
#[tokio::test]
async fn netns_a_table_flushed_behind_the_agents_back_is_reported_and_repaired() {
    let rig = rig(&[]).await;
    let wan = rig.wan_listener();
    let l = &rig.lab;
    rig.call("POST", "/api/block", json!({"mac": C1_MAC}));
    assert_eq!(l.probe(&l.c1, wan), Probe::Refused);
    let before = rig.status()["drift_repairs"].as_u64().unwrap();
    l.exec(&l.router, &["nft", "flush", "table", "inet", "netpilot"])
        .unwrap();
    let s = rig.wait_status("the drift repair", |s| {
        s["drift_repairs"].as_u64() > Some(before) && s["in_sync"] == json!(true)
    });
    let drift = s["last_drift"].to_string();
    assert!(drift.contains("digest rule is missing"), "{drift}");
    assert_eq!(l.probe(&l.c1, wan), Probe::Refused, "repaired");
    assert_eq!(l.probe(&l.c2, wan), Probe::Open);
    // And a deleted table, the same.
    l.exec(&l.router, &["nft", "delete", "table", "inet", "netpilot"])
        .unwrap();
    rig.wait_status("the second repair", |s| {
        s["drift_repairs"].as_u64() > Some(before + 1) && s["in_sync"] == json!(true)
    });
    assert_eq!(l.probe(&l.c1, wan), Probe::Refused);
}

/// sqm-scripts' `simple.qos` as it builds its qdiscs (with pfifo leaves: this
/// kernel has no fq_codel, and no `fw` classifier for its DSCP tiers): on the WAN
/// device an HTB `1:` root with the upload limit in class `1:1` and three tiers
/// under it, the default tier picked by a catch-all u32 filter; for download an
/// ingress qdisc on the WAN device redirecting everything to the ifb `ifb4<wan>`,
/// which has its own HTB `1:` with the download limit.
fn sqm_stand_in(l: &Lab, up_kbps: u32, down_kbps: u32) {
    let wan = lab::WAN_IF;
    let ifb = format!("ifb4{wan}");
    let up = format!("{up_kbps}kbit");
    let down = format!("{down_kbps}kbit");
    let tier = format!("{}kbit", up_kbps / 3);
    let cmds: Vec<Vec<&str>> = vec![
        vec![
            "tc", "qdisc", "add", "dev", wan, "root", "handle", "1:", "htb", "default", "12",
        ],
        vec![
            "tc", "class", "add", "dev", wan, "parent", "1:", "classid", "1:1", "htb", "rate", &up,
            "ceil", &up,
        ],
        vec![
            "tc", "class", "add", "dev", wan, "parent", "1:1", "classid", "1:11", "htb", "rate",
            "128kbit", "ceil", &up, "prio", "1",
        ],
        vec![
            "tc", "class", "add", "dev", wan, "parent", "1:1", "classid", "1:12", "htb", "rate",
            &tier, "ceil", &up, "prio", "2",
        ],
        vec![
            "tc", "class", "add", "dev", wan, "parent", "1:1", "classid", "1:13", "htb", "rate",
            &tier, "ceil", &up, "prio", "3",
        ],
        vec![
            "tc", "qdisc", "add", "dev", wan, "parent", "1:11", "handle", "110:", "pfifo", "limit",
            "1000",
        ],
        vec![
            "tc", "qdisc", "add", "dev", wan, "parent", "1:12", "handle", "120:", "pfifo", "limit",
            "1000",
        ],
        vec![
            "tc", "qdisc", "add", "dev", wan, "parent", "1:13", "handle", "130:", "pfifo", "limit",
            "1000",
        ],
        vec![
            "tc", "filter", "add", "dev", wan, "parent", "1:0", "protocol", "all", "prio", "999",
            "u32", "match", "ip", "protocol", "0", "0x00", "flowid", "1:12",
        ],
        vec!["ip", "link", "add", "name", &ifb, "type", "ifb"],
        vec!["ip", "link", "set", "dev", &ifb, "up"],
        vec![
            "tc", "qdisc", "add", "dev", wan, "handle", "ffff:", "ingress",
        ],
        vec![
            "tc", "qdisc", "add", "dev", &ifb, "root", "handle", "1:", "htb", "default", "10",
        ],
        vec![
            "tc", "class", "add", "dev", &ifb, "parent", "1:", "classid", "1:1", "htb", "rate",
            &down, "ceil", &down,
        ],
        vec![
            "tc", "class", "add", "dev", &ifb, "parent", "1:1", "classid", "1:10", "htb", "rate",
            &down, "ceil", &down, "prio", "0",
        ],
        vec![
            "tc", "qdisc", "add", "dev", &ifb, "parent", "1:10", "handle", "110:", "pfifo",
            "limit", "1000",
        ],
        vec![
            "tc", "filter", "add", "dev", wan, "parent", "ffff:", "protocol", "all", "prio", "10",
            "u32", "match", "u32", "0", "0", "flowid", "1:1", "action", "mirred", "egress",
            "redirect", "dev", &ifb,
        ],
    ];
    for c in cmds {
        l.exec(&l.router, &c).unwrap();
    }
}

/// Every qdisc, class and filter of the SQM stand-in, as tc lists them (no
/// counters): equal listings, the same qdiscs.
fn sqm_listing(l: &Lab) -> String {
    let wan = lab::WAN_IF;
    let ifb = format!("ifb4{wan}");
    let mut out = String::new();
    for args in [
        vec!["qdisc", "show", "dev", wan],
        vec!["class", "show", "dev", wan],
        vec!["filter", "show", "dev", wan],
        vec!["filter", "show", "dev", wan, "parent", "ffff:"],
        vec!["qdisc", "show", "dev", &ifb],
        vec!["class", "show", "dev", &ifb],
    ] {
        let mut argv = vec!["tc"];
        argv.extend(args);
        out.push_str(&l.exec(&l.router, &argv).unwrap());
    }
    out
}

/// sqm-scripts on the WAN (20 Mbit/s each way) and NetPilot's 5 Mbit/s group
/// limit: the group device gets its limit both ways, a device of no group gets
/// SQM's total both ways, SQM's qdiscs are left exactly as they were and are
/// reported in the status, and `cleanup` removes NetPilot's (the ifb too) and
/// nothing of SQM's.
#[tokio::test]
async fn netns_sqm_on_the_wan_and_netpilots_group_limits_both_hold() {
    const SQM_KBPS: u32 = 20_000;
    let mut rig = rig(&[]).await;
    sqm_stand_in(&rig.lab, SQM_KBPS, SQM_KBPS);
    let sqm = sqm_listing(&rig.lab);
    assert!(sqm.contains("qdisc htb 1: root"), "{sqm}");
    rig.call(
        "POST",
        "/api/groups/sync",
        group(
            3,
            C1_MAC,
            json!({"bandwidth": {"downloadKbps": 5000, "uploadKbps": 5000}}),
        ),
    );
    assert_eq!(sqm_listing(&rig.lab), sqm, "SQM's qdiscs after the apply");
    let shaping = rig.status()["shaping"].clone();
    assert_eq!(shaping["wan_root"], json!("htb 1:"), "{shaping}");
    assert_eq!(shaping["wan_root_owner"], json!("foreign"), "{shaping}");
    assert_eq!(shaping["upload_ifb_present"], json!(true), "{shaping}");
    assert_eq!(
        shaping["lan"][0]["upload_redirect"],
        json!(true),
        "{shaping}"
    );

    let l = &rig.lab;
    let up = l.throughput(&l.c1, &l.wan, WAN_HOST, false, 3).unwrap();
    let down = l.throughput(&l.c1, &l.wan, WAN_HOST, true, 3).unwrap();
    let free_up = l.throughput(&l.c2, &l.wan, WAN_HOST, false, 3).unwrap();
    let free_down = l.throughput(&l.c2, &l.wan, WAN_HOST, true, 3).unwrap();
    println!(
        "with SQM at 20 Mbit/s: group of 5 Mbit/s: upload {up:.2}, download {down:.2}; \
         device of no group: upload {free_up:.2}, download {free_down:.2} Mbit/s"
    );
    for (what, v) in [("upload", up), ("download", down)] {
        assert!(
            (4.25..=5.75).contains(&v),
            "group {what} {v:.2} Mbit/s is not within ±15% of 5"
        );
    }
    // SQM's limit holds (its HTB is what limits an unlimited device), and it is
    // far above the group's: NetPilot does not hold this device back.
    for (what, v) in [("upload", free_up), ("download", free_down)] {
        assert!(
            (16.0..=23.0).contains(&v),
            "SQM {what} {v:.2} Mbit/s is not within -20%/+15% of 20"
        );
    }
    assert_eq!(sqm_listing(l), sqm, "SQM's qdiscs after the traffic");

    // Uninstalling: the agent stopped, then `cleanup`.
    rig.netpilot.agent.terminate().await.unwrap();
    let agent_bin = netpilot_tests::binary("netpilot-agent");
    let l = &rig.lab;
    let out = l
        .exec(
            &l.router,
            &[
                agent_bin.to_str().unwrap(),
                "cleanup",
                "--lan-if",
                lab::LAN_IF,
                "--wan-if",
                lab::WAN_IF,
            ],
        )
        .unwrap();
    assert!(out.contains("removed ifb device np-up"), "{out}");
    assert_eq!(sqm_listing(l), sqm, "SQM's qdiscs after cleanup");
    let links = l.exec(&l.router, &["ip", "-o", "link", "show"]).unwrap();
    assert!(!links.contains("np-up"), "{links}");
    let lan = l
        .exec(&l.router, &["tc", "qdisc", "show", "dev", lab::LAN_IF])
        .unwrap();
    assert!(!lan.contains("4e50:") && !lan.contains("ingress"), "{lan}");
    let tables = l.exec(&l.router, &["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("netpilot"), "{tables}");
}
