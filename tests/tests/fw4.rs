//! NetPilot's rules through fw4's life cycle, proven by traffic: a lab router with
//! the real stock fw4 ruleset loaded by a stand-in that does what fw4 does
//! (`netpilot_tests::fw4`): `start`/`reload` load fw4's table and include every
//! `ruleset-post/*.nft` in the same transaction, `flush` deletes every table. c1 is
//! blocked, c2 is not; fw4's zones let the LAN out, so c2 reaching the WAN host
//! shows fw4 is loaded and c1 refused shows NetPilot's rules are.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use netpilot_tests::fw4::Fw4;
use netpilot_tests::lab::{Lab, Probe, C1_MAC, WAN_HOST};
use netpilot_tests::{binary, AgentPaths, ApiRig};
use serde_json::{json, Value};

struct Rig {
    netpilot: ApiRig,
    lab: Lab,
    fw4: Fw4,
    paths: AgentPaths,
    wan: SocketAddr,
}

async fn rig(extra: &[&str]) -> Rig {
    netpilot_testkit::require(&["nft", "tc", "ss"]);
    let lab = Lab::new().unwrap();
    let mut args = vec!["--check-interval", "300ms"];
    args.extend_from_slice(extra);
    let netpilot = ApiRig::builder()
        .in_lab(&lab)
        .agent_args(&args)
        .start()
        .await
        .unwrap();
    let paths = AgentPaths::of(&netpilot.router);
    let fw4 = Fw4::new(&paths.ruleset_post).unwrap();
    // The router boots: fw4 starts with the agent's include in place.
    fw4.start(&lab).unwrap();
    let wan = lab.listen(&lab.wan, WAN_HOST).unwrap();
    Rig {
        netpilot,
        lab,
        fw4,
        paths,
        wan,
    }
}

impl Rig {
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        self.lab
            .api_data(self.netpilot.local_api(), method, path, body)
    }

    fn status(&self) -> Value {
        self.call("GET", "/api/infrastructure/status", json!({}))["status"].clone()
    }

    /// Waits until the copies fw4 loads hold what is live (they are written just
    /// after an apply, off its path), or until they say why not.
    fn copies_settled(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let fw4 = self.status()["fw4"].clone();
            if fw4["in_step"] == true || !fw4["last_error"].is_null() {
                return fw4;
            }
            assert!(Instant::now() < deadline, "copies never in step: {fw4}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn c1(&self) -> Probe {
        self.lab.probe(&self.lab.c1, self.wan)
    }

    fn c2(&self) -> Probe {
        self.lab.probe(&self.lab.c2, self.wan)
    }

    /// c1 blocked, c2 let out by fw4.
    fn assert_enforced(&self, when: &str) {
        assert!(self.fw4.loaded(&self.lab), "{when}: fw4 not loaded");
        assert_eq!(self.c1(), Probe::Refused, "{when}: c1 is blocked");
        assert_eq!(self.c2(), Probe::Open, "{when}: fw4 lets c2 out");
    }

    /// Rules in NetPilot's table (none when there is no table).
    fn netpilot_rules(&self) -> usize {
        let r = &self.lab.router;
        let Ok(out) = self
            .lab
            .exec(r, &["nft", "-j", "list", "table", "inet", "netpilot"])
        else {
            return 0;
        };
        let v: Value = serde_json::from_str(&out).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i.get("rule").is_some())
            .count()
    }

    fn tables(&self) -> String {
        self.lab
            .exec(&self.lab.router, &["nft", "list", "tables"])
            .unwrap()
    }

    /// `netpilot-agent` run in the router namespace with this rig's paths.
    fn agent_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let bin = binary("netpilot-agent");
        let mut argv = vec![bin.to_str().unwrap()];
        argv.extend_from_slice(args);
        let state = self.netpilot.router.state_dir.to_str().unwrap().to_owned();
        let fw4_dir = self.paths.fw4_dir.to_str().unwrap().to_owned();
        let include = self.paths.fw4_include.to_str().unwrap().to_owned();
        argv.extend_from_slice(&[
            "--config",
            "/nonexistent/netpilot",
            "--state-dir",
            &state,
            "--fw4-dir",
            &fw4_dir,
            "--fw4-include",
            &include,
        ]);
        self.lab.exec(&self.lab.router, &argv)
    }
}

fn block_c1(rig: &Rig) {
    rig.call("POST", "/api/block", json!({"mac": C1_MAC}));
    rig.assert_enforced("blocked");
    assert_eq!(rig.copies_settled()["in_step"], true);
}

fn file_id(p: &Path) -> (u64, std::time::SystemTime) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.ino(), m.modified().unwrap())
}

#[tokio::test]
async fn netns_fw4_flush_then_start_brings_the_rules_back_with_the_agent_running_or_stopped() {
    // No periodic check while this runs: what brings the rules back is fw4's own
    // transaction, not the agent's repair.
    let mut rig = rig(&["--check-interval", "1h"]).await;
    block_c1(&rig);
    assert!(rig.paths.live_copy().exists());

    // firewall stop: every table gone, c1 goes out.
    rig.fw4.flush(&rig.lab).unwrap();
    assert_eq!(rig.c1(), Probe::Open, "the flush took NetPilot's table too");
    // firewall start: NetPilot's rules come back in fw4's own transaction.
    let t = Instant::now();
    rig.fw4.start(&rig.lab).unwrap();
    assert_eq!(rig.c1(), Probe::Refused);
    let back = t.elapsed();
    println!(
        "blocked again {:.0} ms after fw4 start",
        back.as_secs_f64() * 1000.0
    );
    assert!(back < Duration::from_secs(2), "{back:?}");
    rig.assert_enforced("after flush + start");

    // The same with the agent stopped: nothing but fw4 puts the rules back.
    rig.netpilot.agent.terminate().await.unwrap();
    rig.fw4.flush(&rig.lab).unwrap();
    assert_eq!(rig.c1(), Probe::Open);
    rig.fw4.start(&rig.lab).unwrap();
    rig.assert_enforced("agent stopped, after flush + start");
}

#[tokio::test]
async fn netns_fw4_reload_while_the_table_exists_replaces_it_without_duplicates() {
    let mut rig = rig(&[]).await;
    block_c1(&rig);
    rig.netpilot.agent.terminate().await.unwrap();
    let rules = rig.netpilot_rules();
    assert!(rules > 0);
    for _ in 0..3 {
        rig.fw4.reload(&rig.lab).unwrap();
    }
    assert_eq!(
        rig.netpilot_rules(),
        rules,
        "the table is replaced, not added to"
    );
    let tables = rig.tables();
    assert_eq!(tables.matches("table inet netpilot").count(), 1, "{tables}");
    rig.assert_enforced("after three reloads");
}

#[tokio::test]
async fn netns_a_live_copy_nft_refuses_is_never_put_in_place_and_fw4_still_loads() {
    // An nft that refuses every check once told to (the kernel still takes the
    // rules): what a copy nft would not load looks like to the agent.
    let dir = tempfile::tempdir().unwrap();
    let refuse = dir.path().join("refuse");
    let wrapper = dir.path().join("nft");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = -c ] && [ -e {} ]; then echo 'Error: refused by the test' >&2; exit 1; fi\nexec nft \"$@\"\n",
            refuse.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut rig = rig(&["--nft", wrapper.to_str().unwrap()]).await;
    block_c1(&rig);
    let good = std::fs::read_to_string(rig.paths.live_copy()).unwrap();

    std::fs::write(&refuse, "").unwrap();
    // c2 blocked too: the kernel takes it, the copy is refused.
    rig.call(
        "POST",
        "/api/block",
        json!({"mac": netpilot_tests::lab::C2_MAC}),
    );
    assert_eq!(rig.c2(), Probe::Refused, "the apply itself stands");
    let fw4 = rig.copies_settled();
    let error = fw4["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("refused by the test"), "{fw4}");
    assert_eq!(
        std::fs::read_to_string(rig.paths.live_copy()).unwrap(),
        good,
        "the previous copy stays"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&rig.paths.fw4_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // fw4 loads with the previous copy: c1 blocked as before.
    rig.netpilot.agent.terminate().await.unwrap();
    rig.fw4.flush(&rig.lab).unwrap();
    rig.fw4.start(&rig.lab).unwrap();
    assert!(rig.fw4.loaded(&rig.lab));
    assert_eq!(rig.c1(), Probe::Refused);

    // No live copy at all (a router that never ran the agent since boot): the
    // include matches nothing, fw4 loads, nothing of NetPilot's is there.
    std::fs::remove_file(rig.paths.live_copy()).unwrap();
    rig.fw4.flush(&rig.lab).unwrap();
    rig.fw4.start(&rig.lab).unwrap();
    assert!(rig.fw4.loaded(&rig.lab));
    assert_eq!(rig.c1(), Probe::Open);
    assert_eq!(rig.c2(), Probe::Open);
    assert!(!rig.tables().contains("netpilot"));
}

#[tokio::test]
async fn netns_the_boot_copy_enforces_from_boot_without_the_agent_and_flash_is_written_per_policy()
{
    let mut rig = rig(&[]).await;
    block_c1(&rig);
    let boot = rig.paths.boot_copy.clone();
    let written = file_id(&boot);
    let boot_writes = rig.copies_settled()["boot_writes"].clone();
    assert_eq!(boot_writes, json!(1), "{}", rig.status());

    // Neither an apply that changes nothing, nor a reapply, nor periodic checks
    // (every 300 ms here) touch the flash.
    let again = rig.call("POST", "/api/block", json!({"mac": C1_MAC}));
    assert_eq!(again["changed"], json!(false), "{again}");
    let out = rig
        .agent_cli(&["reapply", "--control", rig.paths.control.to_str().unwrap()])
        .unwrap();
    assert!(out.contains("re-applied"), "{out}");
    let checked = rig.status()["last_check_unix"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.status()["last_check_unix"].as_i64().unwrap() < checked + 2 {
        assert!(Instant::now() < deadline, "no periodic check");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(file_id(&boot), written, "the boot copy was rewritten");
    assert_eq!(rig.copies_settled()["boot_writes"], boot_writes);

    // A reboot: the agent is not running, tmpfs and the kernel are empty.
    rig.netpilot.agent.terminate().await.unwrap();
    rig.fw4.flush(&rig.lab).unwrap();
    std::fs::remove_dir_all(&rig.paths.fw4_dir).unwrap();
    std::fs::remove_file(&rig.paths.fw4_include).unwrap();
    // The boot step (START 18), then the firewall (START 19).
    let out = rig.agent_cli(&["boot"]).unwrap();
    assert!(out.contains("in place"), "{out}");
    rig.fw4.start(&rig.lab).unwrap();
    rig.assert_enforced("from boot, agent not running");

    // A boot copy nft refuses is not put in place, and fw4 still loads.
    std::fs::write(&boot, "table inet netpilot { this is not nft\n").unwrap();
    rig.fw4.flush(&rig.lab).unwrap();
    assert!(
        rig.agent_cli(&["boot"]).is_err(),
        "boot reports the refusal"
    );
    assert!(!rig.paths.live_copy().exists());
    rig.fw4.start(&rig.lab).unwrap();
    assert!(rig.fw4.loaded(&rig.lab));
    assert_eq!(rig.c2(), Probe::Open);
}
