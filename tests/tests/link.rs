//! The link's life with the real binaries: death and return of the agent, of the
//! relay, a silent (frozen) agent caught by keepalive PINGs, a silent WAN caught by
//! a call's probe PING, revocation, two agents with one identity, and many
//! concurrent calls over one link.

use std::time::{Duration, Instant};

use netpilot_tests::freeze_proxy::FreezeProxy;
use netpilot_tests::{eventually, Agent, ApiRig, Relay, RelayOptions, Session};
use serde_json::json;

/// Short keepalive so dead-link detection is observable in a test.
const FAST_LINK: &str = "[timeouts]\nping_interval = \"200ms\"\ndead_after = \"800ms\"\n";

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn killed_agent_is_offline_at_once_and_a_restarted_one_serves_the_same_session() {
    let mut rig = ApiRig::builder()
        .relay_config(FAST_LINK)
        .start()
        .await
        .unwrap();
    let alice = rig.session("alice").await.unwrap();
    let (c, path) = (&alice.client, alice.q("/api/scan/router"));
    assert_eq!(alice.get("/api/scan/router").await.status, 200);

    rig.agent.kill().await; // SIGKILL: the kernel closes the socket, the relay sees FIN.
    let started = std::time::Instant::now();
    eventually(
        Duration::from_secs(2),
        "503 after the agent died",
        || async {
            let r = c.get(&path).await.ok()?;
            (r.status == 503 && r.code() == "ROUTER_OFFLINE").then_some(())
        },
    )
    .await
    .unwrap();
    let detected = started.elapsed();
    assert!(
        detected < Duration::from_millis(800),
        "offline after {detected:?}, longer than dead_after"
    );

    rig.restart_agent().await.unwrap();
    let r = alice.get("/api/scan/router").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn a_frozen_agent_is_declared_dead_by_keepalive() {
    let agent_args = [
        "--simulate",
        "--ping-interval",
        "200ms",
        "--dead-after",
        "800ms",
    ];
    let rig = ApiRig::builder()
        .relay_config(FAST_LINK)
        .agent_args(&agent_args)
        .start()
        .await
        .unwrap();
    let (relay, router) = (&rig.relay, &rig.router);
    let pid = rig.agent.pid().unwrap();
    signal(pid, "-STOP"); // no FIN, no PING answers: only keepalive can tell
    let started = std::time::Instant::now();
    relay
        .wait_online(&router.router_id, false, Duration::from_secs(5))
        .await
        .unwrap();
    let took = started.elapsed();
    signal(pid, "-CONT");
    assert!(
        took >= Duration::from_millis(400),
        "declared dead too early: {took:?}"
    );
    // Back from the freeze, the agent notices and reconnects by itself.
    relay
        .wait_online(&router.router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_agent_reconnects_after_a_relay_restart() {
    let mut rig = ApiRig::simulated().await.unwrap();
    rig.relay.restart().await.unwrap();
    let (relay, router) = (&rig.relay, &rig.router);
    relay
        .wait_online(&router.router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
    // Sessions live in memory: a new one is needed, the router is the same.
    let c = relay.client().await.unwrap();
    let alice = Session::start(&c, "alice", &router.router_id)
        .await
        .unwrap();
    let r = alice.get("/api/scan/router").await;
    assert_eq!(r.status, 200);
    let r = c
        .get(&format!("/api/admin/routers/{}", router.router_id))
        .await
        .unwrap();
    assert!(r.body["data"]["last_seen"].is_string());
}

#[tokio::test]
async fn two_hundred_concurrent_calls_over_one_link() {
    let rig = ApiRig::simulated().await.unwrap();
    let alice = rig.session("alice").await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let c = alice.client.clone();
        let path = alice.q(if i % 2 == 0 {
            "/api/scan/router"
        } else {
            "/api/agent/health"
        });
        tasks.spawn(async move {
            let id = format!("call-{i}");
            let r = c
                .call_with("GET", &path, None, None, &[("x-request-id", &id)])
                .await
                .unwrap();
            (i, id, r)
        });
    }
    let mut answered = 0;
    while let Some(res) = tasks.join_next().await {
        let (i, id, r) = res.unwrap();
        assert_eq!(r.status, 200, "call {i}: {}", r.body);
        // Each answer belongs to its own call.
        assert_eq!(r.body["meta"]["request_id"], json!(id));
        if i % 2 == 0 {
            assert_eq!(r.body["data"]["hostname"], json!("netpilot-sim"));
        } else {
            assert_eq!(r.body["data"]["router_id"], json!(rig.router_id()));
        }
        answered += 1;
    }
    assert_eq!(answered, 200);
    let m = alice.client.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&m.raw);
    assert!(
        text.contains(
            "netpilot_forwarded_requests_total{route=\"/api/scan/router\",status=\"200\"} 100\n"
        ),
        "{text}"
    );
    assert!(text.contains("netpilot_connected_agents 1\n"));
}

#[tokio::test]
async fn revoked_router_is_disconnected_and_refused_on_reconnect() {
    let rig = ApiRig::simulated().await.unwrap();
    let (relay, router) = (&rig.relay, &rig.router);
    let alice = rig.session("alice").await.unwrap();
    let c = &alice.client;

    let r = c
        .delete(&format!("/api/admin/routers/{}", router.router_id))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["link_closed"], json!(true));
    // Closed at once, not at the next keepalive.
    let r = c
        .get(&format!("/api/admin/routers/{}", router.router_id))
        .await
        .unwrap();
    assert_eq!(r.body["data"]["online"], json!(false));
    assert_eq!(r.body["data"]["revoked"], json!(true));
    let r = alice.get("/api/scan/router").await;
    assert_eq!((r.status, r.code()), (404, "ROUTER_NOT_FOUND"));
    // The agent keeps trying and is refused each time.
    eventually(Duration::from_secs(10), "a refused reconnect", || async {
        relay.log().contains("agent link refused").then_some(())
    })
    .await
    .unwrap();
    let m = c.get("/metrics").await.unwrap();
    assert!(!String::from_utf8_lossy(&m.raw).contains("netpilot_link_rejects_total 0\n"));
    let r = c
        .get(&format!("/api/admin/routers/{}", router.router_id))
        .await
        .unwrap();
    assert_eq!(r.body["data"]["online"], json!(false));
}

#[tokio::test]
async fn the_newest_of_two_agents_with_one_identity_wins() {
    // The first agent, once displaced, waits long before retrying.
    let rig = ApiRig::builder()
        .agent_args(&["--backoff-base", "30s", "--backoff-cap", "60s"])
        .start()
        .await
        .unwrap();
    let (relay, router) = (&rig.relay, &rig.router);
    let alice = rig.session("alice").await.unwrap();
    let (c, health) = (&alice.client, alice.q("/api/agent/health"));
    assert_eq!(
        c.get(&health).await.unwrap().body["data"]["mode"],
        json!("real")
    );

    let _new = Agent::start(router, &["--simulate"]).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the new agent to take over",
        || async {
            let r = c.get(&health).await.ok()?;
            (r.body["data"]["mode"] == json!("simulated")).then_some(())
        },
    )
    .await
    .unwrap();
    // The old link's task logs its end once the new link is registered.
    eventually(
        Duration::from_secs(5),
        "the old link to be closed",
        || async {
            relay
                .log()
                .contains("agent link closed by the relay")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
}

/// `/health` is for anyone; `/metrics` on the shared port needs the API key (a
/// keyless scrape address is `metrics_listen`, tests/tests/operator.rs).
#[tokio::test]
async fn health_needs_no_api_key_and_metrics_needs_it() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let keyed = relay.client().await.unwrap();
    let c = keyed.with_key(None);
    let r = c.get("/health").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["status"], json!("ok"));
    for anon in [c.clone(), keyed.with_key(Some("not-the-key-0123456789"))] {
        let m = anon.get("/metrics").await.unwrap();
        assert_eq!((m.status, m.code()), (401, "UNAUTHORIZED"), "{}", m.body);
        assert!(!String::from_utf8_lossy(&m.raw).contains("netpilot_"));
    }
    let m = keyed.get("/metrics").await.unwrap();
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.raw);
    for name in [
        "netpilot_connected_agents",
        "netpilot_active_sessions",
        "netpilot_forward_duration_seconds_bucket",
        "netpilot_errors_total",
    ] {
        assert!(text.contains(name), "{name} missing from {text}");
    }
}

#[tokio::test]
async fn both_programs_stop_cleanly_on_sigterm() {
    let mut rig = ApiRig::simulated().await.unwrap();
    let status = rig.agent.terminate().await.unwrap();
    assert!(status.success(), "agent exit: {status}");
    rig.relay
        .wait_online(rig.router_id(), false, Duration::from_secs(5))
        .await
        .unwrap();
    // Started again, it is online again.
    rig.restart_agent().await.unwrap();
    // The relay closes live links and exits within its grace period.
    let status = rig.relay.terminate().await.unwrap();
    assert!(status.success(), "relay exit: {status}");
}

#[tokio::test]
async fn an_agent_started_before_enrollment_connects_once_enrolled() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let (router_id, token) = relay.create_router("alice", "home").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let not_yet = netpilot_tests::EnrolledRouter::at(&router_id, &state);
    // The service starts first (as procd would at boot), then the owner enrolls.
    let _agent = Agent::start_waiting(&not_yet, &["--simulate", "--identity-poll", "50ms"])
        .await
        .unwrap();
    let out = netpilot_tests::enroll(&relay.url(), &token, &relay.fingerprint, &state)
        .await
        .unwrap();
    assert!(out.status.success());
    relay
        .wait_online(&router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_uci_config_can_point_the_agent_at_a_moved_relay() {
    let old = Relay::start(RelayOptions::default()).await.unwrap();
    let router = old.enrolled_router("alice").await.unwrap();
    // The identity names the relay it enrolled with; the config overrides it.
    let mut identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(router.state_dir.join("identity.json")).unwrap())
            .unwrap();
    identity["relay_url"] = json!("https://127.0.0.1:1");
    std::fs::write(router.state_dir.join("identity.json"), identity.to_string()).unwrap();
    let config = router.state_dir.parent().unwrap().join("netpilot.uci");
    std::fs::write(
        &config,
        format!(
            "config agent 'main'\n\toption relay_url '{}'\n\toption fingerprint '{}'\n",
            old.url(),
            old.fingerprint
        ),
    )
    .unwrap();
    let _agent = Agent::start(
        &router,
        &["--simulate", "--config", config.to_str().unwrap()],
    )
    .await
    .unwrap();
    old.wait_online(&router.router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
}

/// Issue 16 item 8: quiet 500 ms, a call PINGs; 2 s without an answer and the link
/// is dead.
const SILENT_LINK: &str = "[timeouts]\nprobe_after = \"500ms\"\nprobe_timeout = \"2s\"\n";

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn calls_on_a_silent_wan_answer_503_within_the_probe_timeout_and_the_router_is_offline_at_once(
) {
    let relay = Relay::start(RelayOptions {
        config: SILENT_LINK.into(),
    })
    .await
    .unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let proxy = FreezeProxy::start(relay.addr).await.unwrap();
    let url = proxy.url();
    // The agent's own keepalive would notice after a minute: outside this test.
    let _agent = Agent::start(
        &router,
        &[
            "--simulate",
            "--relay",
            &url,
            "--ping-interval",
            "20s",
            "--dead-after",
            "60s",
        ],
    )
    .await
    .unwrap();
    relay
        .wait_online(&router.router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
    let c = relay.client().await.unwrap();
    let alice = Session::start(&c, "alice", &router.router_id)
        .await
        .unwrap();

    // A healthy link: back-to-back calls (no probe) and calls after a quiet spell
    // (a PING beside the call). Figures, not assertions: the machine is shared.
    let mut active = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(alice.get("/api/scan/router").await.status, 200);
        active.push(t.elapsed());
    }
    let mut after_quiet = Vec::new();
    for _ in 0..5 {
        // Quiet is the condition under test: nothing to await but time.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let t = Instant::now();
        assert_eq!(alice.get("/api/scan/router").await.status, 200);
        after_quiet.push(t.elapsed());
    }
    println!(
        "call median: active link {:?}, quiet link (probed) {:?}",
        median(&mut active),
        median(&mut after_quiet)
    );

    // The WAN dies silently on a quiet link; four calls arrive at once.
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.freeze();
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (c, path) = (c.clone(), alice.q("/api/scan/router"));
        calls.spawn(async move {
            let r = c.get(&path).await.unwrap();
            (r.status, r.code().to_owned(), started.elapsed())
        });
    }
    while let Some(r) = calls.join_next().await {
        let (status, code, took) = r.unwrap();
        assert_eq!((status, code.as_str()), (503, "ROUTER_OFFLINE"));
        println!("silent link: 503 after {took:?}");
        assert!(took < Duration::from_secs(5), "503 only after {took:?}");
        assert!(
            took >= Duration::from_millis(1500),
            "503 after {took:?}: before the probe could time out"
        );
    }
    // Offline at once, no polling: the link left the registry before the 503.
    let r = c
        .get(&format!("/api/admin/routers/{}", router.router_id))
        .await
        .unwrap();
    assert_eq!(r.body["data"]["online"], json!(false), "{}", r.body);
    // One shared probe, one verdict.
    assert_eq!(
        relay.log().matches("PING unanswered").count(),
        1,
        "{}",
        relay.log()
    );
    let metrics = c.get("/metrics").await.unwrap();
    assert!(
        String::from_utf8_lossy(&metrics.raw)
            .lines()
            .any(|l| l == "netpilot_link_silent_total 1"),
        "{}",
        String::from_utf8_lossy(&metrics.raw)
    );
}
