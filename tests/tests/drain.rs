//! Graceful drain and "go elsewhere" (issue 16, items 5 and 6) with the real
//! binaries: two relays of one deployment (a copied registry and certificate), an
//! agent given both. SIGTERM makes a relay drain: `/health` answers 503 draining, a
//! new link is refused with `RELAY_DRAINING`, every link is told to go elsewhere
//! and moves to the other relay at once (make before break: a call in flight on
//! the old link still answers), and the relay exits once its links are gone, or
//! cuts them at `timeouts.drain`. `LINKS_BUSY` also sends an agent on at once.

use std::time::{Duration, Instant};

use netpilot_tests::fake_agent::{self, answer, connect, credentials, envelope, whole};
use netpilot_tests::{eventually, Agent, AgentPaths, EnrolledRouter, Relay, RelayOptions, Session};
use serde_json::json;

/// Agent timing under which only a drain (or a refusal) can move the link fast:
/// a lost link would wait a random share of 30 s, a failed round 10 s or more.
const SLOW_RETRY: &[&str] = &[
    "--reconnect-spread",
    "30s",
    "--backoff-base",
    "10s",
    "--backoff-cap",
    "30s",
];

/// A handover the drain makes must beat this by far: the agent dials at once.
const HANDOVER_BOUND: Duration = Duration::from_secs(5);

/// Relays A and B of one deployment with `config`, and `routers` enrolled routers
/// (of alice) both know; A runs on its own address again after the copy.
async fn pair(config: &str, routers: usize) -> (Relay, Relay, Vec<EnrolledRouter>) {
    let mut a = Relay::start(RelayOptions {
        config: config.into(),
    })
    .await
    .unwrap();
    let mut enrolled = Vec::new();
    for _ in 0..routers {
        enrolled.push(a.enrolled_router("alice").await.unwrap());
    }
    // Copied from a stopped A so the database is whole.
    a.terminate().await.unwrap();
    let b = a.start_copy().await.unwrap();
    a.restart().await.unwrap();
    (a, b, enrolled)
}

/// The router's agent with the list A then B (slow retries, so only the drain
/// moves it fast), online on A.
async fn on_a(a: &Relay, b: &Relay, router: &EnrolledRouter) -> Agent {
    let (a_url, b_url) = (a.url(), b.url());
    let mut args = vec!["--simulate", "--relay", &a_url, "--relay", &b_url];
    args.extend_from_slice(SLOW_RETRY);
    let agent = Agent::start(router, &args).await.unwrap();
    a.wait_online(&router.router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
    agent
}

fn agent_log(router: &EnrolledRouter) -> String {
    std::fs::read_to_string(router.state_dir.parent().unwrap().join("agent.log"))
        .unwrap_or_default()
}

/// One sample of the relay's scrape, e.g. `netpilot_drain_links_total{outcome="left"}`.
async fn metric(relay: &Relay, sample: &str) -> u64 {
    let m = relay.client().await.unwrap().get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&m.raw).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{sample} missing from {text}"))
}

#[tokio::test]
async fn sigterm_moves_the_link_to_the_next_relay_at_once_and_the_relay_exits() {
    let (mut a, b, routers) = pair("[timeouts]\ndrain = \"20s\"\n", 1).await;
    let router = &routers[0];
    let _agent = on_a(&a, &b, router).await;
    let socket = AgentPaths::of(router).control;
    assert_eq!(netpilot_tests::agent_link_status(&socket)["connects"], 1);

    a.sigterm().unwrap();
    let sent = Instant::now();
    b.wait_online(&router.router_id, true, HANDOVER_BOUND)
        .await
        .unwrap();
    let handover = sent.elapsed();
    let status = a.wait_exit(Duration::from_secs(10)).await.unwrap();
    let exited = sent.elapsed();
    println!("drain handover A -> B: {handover:?}; A exited after {exited:?}");
    assert!(status.success(), "relay exit: {status}");
    // Well before the 20 s drain deadline: it left because the link had gone.
    assert!(exited < Duration::from_secs(10), "{exited:?}");
    let log = a.log();
    assert!(
        log.contains("drain done: every agent link that could move has gone elsewhere"),
        "{log}"
    );
    assert!(log.contains("links_left=1"), "{log}");
    // Moved by the drain, not by a lost link: no backoff, and one link after the
    // other (the new one counted, the agent never between links).
    let agent = agent_log(router);
    assert!(
        agent.contains("relay draining: dialling the next relay"),
        "{agent}"
    );
    assert!(!agent.contains("reconnecting"), "{agent}");
    let link = netpilot_tests::agent_link_status(&socket);
    assert_eq!(link["relay"], b.url().as_str(), "{link}");
    assert_eq!(link["connects"], 2, "{link}");
    assert_eq!(link["connected"], true, "{link}");
}

#[tokio::test]
async fn a_call_in_flight_on_the_draining_relay_still_answers() {
    let (mut a, b, routers) = pair("[timeouts]\ndrain = \"20s\"\n", 1).await;
    let router = &routers[0];
    let _agent = on_a(&a, &b, router).await;
    let alice = Session::start(&a.client().await.unwrap(), "alice", &router.router_id)
        .await
        .unwrap();
    // A speed test is a call of seconds: the agent measures against the relay
    // while the web app's call waits on the link.
    let call = tokio::spawn(async move {
        alice
            .get("/api/speedtest?maxBytes=100000000&maxSeconds=2")
            .await
    });
    eventually(Duration::from_secs(10), "the speed test running", || {
        let a = &a;
        async move { (metric(a, "netpilot_speedtest_active").await > 0).then_some(()) }
    })
    .await
    .unwrap();
    a.sigterm().unwrap();
    let sent = Instant::now();
    // The link moves while the call is still in flight on the old one.
    b.wait_online(&router.router_id, true, HANDOVER_BOUND)
        .await
        .unwrap();
    let handover = sent.elapsed();
    assert!(!call.is_finished(), "the call ended before the move");
    let r = call.await.unwrap();
    let answered = sent.elapsed();
    assert_eq!(
        r.status,
        200,
        "{}\nrelay A:\n{}\nagent:\n{}",
        r.body,
        a.log(),
        agent_log(router)
    );
    assert!(
        r.body["data"]["download_bytes"].as_u64() > Some(0),
        "{}",
        r.body
    );
    let status = a.wait_exit(Duration::from_secs(15)).await.unwrap();
    println!("handover with a call in flight: {handover:?}; call answered after {answered:?}");
    assert!(status.success(), "relay exit: {status}");
    assert!(a.log().contains("links_left=1"), "{}", a.log());
}

#[tokio::test]
async fn a_draining_relay_says_so_refuses_new_links_and_cuts_the_rest_at_the_deadline() {
    const DRAIN: Duration = Duration::from_secs(6);
    let config = format!("[timeouts]\ndrain = \"{}s\"\n", DRAIN.as_secs());
    let (mut a, b, routers) = pair(&config, 2).await;
    // Router 0: a fake agent that says it moves on, and never does: it keeps A
    // draining until the deadline.
    let holder = fake_agent::FakeAgent::start(&a, &routers[0], |parts| {
        Box::pin(async move {
            if parts.uri.path() == "/link/v1/drain" {
                return answer(202, None, whole(""));
            }
            envelope(
                200,
                json!({"success": true, "data": {}, "meta": {"duration_ms": 0}}),
            )
        }) as fake_agent::FakeFuture
    })
    .await
    .unwrap();
    let healthy = a.client().await.unwrap().get("/health").await.unwrap();
    assert_eq!(
        (healthy.status, &healthy.body["data"]["status"]),
        (200, &json!("ok"))
    );

    a.sigterm().unwrap();
    let sent = Instant::now();
    let c = a.client().await.unwrap();
    let health = eventually(Duration::from_secs(5), "/health to say draining", || {
        let c = c.clone();
        async move { c.get("/health").await.ok().filter(|r| r.status == 503) }
    })
    .await
    .unwrap();
    assert_eq!(health.code(), "RELAY_DRAINING", "{}", health.body);
    assert_eq!(health.body["status"], "draining", "{}", health.body);

    // A new link: refused with the go-elsewhere code, not LINKS_BUSY.
    let (id, secret) = credentials(&routers[1]).unwrap();
    let refused = connect(&a, &id, &secret).await.unwrap().unwrap_err();
    assert_eq!(
        (refused.status, refused.code()),
        (503, "RELAY_DRAINING"),
        "{}",
        refused.body
    );
    // The real agent, A first in its list, lands on B at once.
    let (a_url, b_url) = (a.url(), b.url());
    let mut args = vec!["--simulate", "--relay", &a_url, "--relay", &b_url];
    args.extend_from_slice(SLOW_RETRY);
    let started = Instant::now();
    let _agent = Agent::start(&routers[1], &args).await.unwrap();
    b.wait_online(&routers[1].router_id, true, HANDOVER_BOUND)
        .await
        .unwrap();
    println!(
        "refused by the draining relay, linked to B after {:?}",
        started.elapsed()
    );
    let agent = agent_log(&routers[1]);
    assert!(agent.contains("RELAY_DRAINING"), "{agent}");

    // API calls are still served while the link drains.
    let listed = c.get("/api/admin/routers").await.unwrap();
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert_eq!(metric(&a, "netpilot_draining").await, 1);
    assert_eq!(
        metric(&a, "netpilot_drain_links_total{outcome=\"told\"}").await,
        1
    );

    // The holder never left: cut at the deadline, then the relay exits cleanly.
    let status = a.wait_exit(DRAIN + Duration::from_secs(10)).await.unwrap();
    let exited = sent.elapsed();
    println!("exit with a link that never left: {exited:?} (drain {DRAIN:?})");
    assert!(status.success(), "relay exit: {status}");
    assert!(exited >= DRAIN, "{exited:?}");
    let log = a.log();
    assert!(log.contains("drain deadline reached"), "{log}");
    assert!(log.contains("links_cut=1"), "{log}");
    drop(holder);
}

#[tokio::test]
async fn a_call_on_a_link_that_cannot_move_finishes_before_the_relay_exits() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let mut relay = relay;
    // An agent with nowhere else to go answers 409, as the real one with a single
    // relay does; its slow call is still answered before the relay exits.
    let fake = fake_agent::FakeAgent::start(&relay, &router, |parts| {
        Box::pin(async move {
            match parts.uri.path() {
                "/link/v1/drain" => answer(409, None, whole("")),
                "/api/agent/health" => envelope(
                    200,
                    json!({"success": true, "data": {}, "meta": {"duration_ms": 0}}),
                ),
                _ => {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    envelope(
                        200,
                        json!({"success": true, "data": {"slow": true}, "meta": {"duration_ms": 1500}}),
                    )
                }
            }
        }) as fake_agent::FakeFuture
    })
    .await
    .unwrap();
    let alice = Session::start(&relay.client().await.unwrap(), "alice", &router.router_id)
        .await
        .unwrap();
    let before = fake.calls.load(std::sync::atomic::Ordering::SeqCst);
    let call = tokio::spawn(async move { alice.get("/api/scan").await });
    let calls = fake.calls.clone();
    eventually(Duration::from_secs(5), "the slow call at the agent", || {
        let n = calls.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n > before).then_some(()) }
    })
    .await
    .unwrap();
    relay.sigterm().unwrap();
    let r = call.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["slow"], true, "{}", r.body);
    let status = relay.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "relay exit: {status}");
    // It did not wait for a link that said it stays, but for the call on it.
    let log = relay.log();
    assert!(!log.contains("drain deadline reached"), "{log}");
    assert!(
        log.contains("forwarded calls in flight have finished"),
        "{log}"
    );
}

#[tokio::test]
async fn links_busy_sends_the_agent_on_at_once_and_a_refused_round_waits_retry_after() {
    // Each relay takes one link, and holds it for a fake agent: both refuse the
    // real agent with LINKS_BUSY and Retry-After 30 s, which the agent caps at its
    // backoff cap (3 s here, its base only 50 ms).
    let config = "[capacity]\nmax_links = 1\nmax_link_accepts_per_second = 0\nreserved_api_connections = 0\n";
    let (a, b, routers) = pair(config, 3).await;
    let ok = |_parts| {
        Box::pin(async {
            envelope(
                200,
                json!({"success": true, "data": {}, "meta": {"duration_ms": 0}}),
            )
        }) as fake_agent::FakeFuture
    };
    let hold_a = fake_agent::FakeAgent::start(&a, &routers[0], ok)
        .await
        .unwrap();
    let _hold_b = fake_agent::FakeAgent::start(&b, &routers[1], ok)
        .await
        .unwrap();
    let (a_url, b_url) = (a.url(), b.url());
    let started = Instant::now();
    let _agent = Agent::start(
        &routers[2],
        &[
            "--simulate",
            "--relay",
            &a_url,
            "--relay",
            &b_url,
            "--backoff-cap",
            "3s",
        ],
    )
    .await
    .unwrap();
    // A refuses, and B is asked at once: the first round is over within a moment.
    eventually(
        HANDOVER_BOUND,
        "both relays to refuse the agent",
        || async {
            let busy = "netpilot_links_refused_total{reason=\"max_links\"}";
            (metric(&a, busy).await >= 1 && metric(&b, busy).await >= 1).then_some(())
        },
    )
    .await
    .unwrap();
    let round = Instant::now();
    println!("A and B both refused within {:?}", started.elapsed());
    // A frees its link; the agent comes to it only after the round's wait (3 s),
    // not after its 50 ms backoff.
    drop(hold_a);
    a.wait_online(&routers[0].router_id, false, Duration::from_secs(5))
        .await
        .unwrap();
    a.wait_online(&routers[2].router_id, true, Duration::from_secs(15))
        .await
        .unwrap();
    let waited = round.elapsed();
    println!("after a refused round the agent dialled again after {waited:?}");
    assert!(waited >= Duration::from_millis(2500), "{waited:?}");
    let agent = agent_log(&routers[2]);
    assert!(agent.contains("LINKS_BUSY"), "{agent}");
}

#[tokio::test]
async fn with_no_other_relay_up_the_agent_stays_then_tries_the_draining_relay_last() {
    let (mut a, mut b, routers) = pair("[timeouts]\ndrain = \"3s\"\n", 1).await;
    let router = &routers[0];
    b.kill().await;
    let _agent = on_a(&a, &b, router).await;

    a.sigterm().unwrap();
    eventually(Duration::from_secs(5), "the agent to find B down", || {
        let log = agent_log(router);
        async move { log.contains("no other relay took the link").then_some(()) }
    })
    .await
    .unwrap();
    // Still served by the draining relay meanwhile.
    a.wait_online(&router.router_id, true, Duration::from_secs(1))
        .await
        .unwrap();
    // B comes back while A drains; the agent does not leave A for it before A
    // closes, and then goes to B at once (A, which drained, comes last).
    b.restart().await.unwrap();
    let status = a.wait_exit(Duration::from_secs(15)).await.unwrap();
    let exited = Instant::now();
    assert!(status.success(), "relay exit: {status}");
    assert!(a.log().contains("links_cut=1"), "{}", a.log());
    b.wait_online(&router.router_id, true, HANDOVER_BOUND)
        .await
        .unwrap();
    println!(
        "A closed after its drain; on B {:?} later",
        exited.elapsed()
    );
    let link = netpilot_tests::agent_link_status(&AgentPaths::of(router).control);
    assert_eq!(link["relay"], b.url().as_str(), "{link}");
    assert!(
        !agent_log(router).contains("reconnecting"),
        "{}",
        agent_log(router)
    );
}
