//! A relay at its limits still serves the web app (issue 16, item 7), against the
//! real relay binary: the open-file soft limit is raised at start and the caps fit
//! under it; agent links have their own cap, a reserve of descriptors they may not
//! take, and a rate of upgrades, all answered `503 LINKS_BUSY` with `Retry-After`
//! while `/health` and API calls keep answering; the admin router list is paged.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use netpilot_tests::fake_agent::{connect, credentials};
use netpilot_tests::{eventually, Agent, Client, Relay, RelayOptions, Reply, API_KEY};
use serde_json::json;

fn limits_line(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned()
}

fn assert_links_busy(r: &Reply, retry_after: &str) {
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.code(), "LINKS_BUSY", "{}", r.body);
    assert_eq!(
        r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some(retry_after),
        "{:?}",
        r.headers
    );
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn the_open_file_soft_limit_is_raised_and_the_caps_fit_under_it() {
    let relay = Relay::start_with_nofile(RelayOptions::default(), 512, 4096)
        .await
        .unwrap();
    let pid = relay.pid().unwrap();
    let line = limits_line(pid);
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "Max open files <soft> <hard> files"
    assert_eq!(&fields[3..5], ["4096", "4096"], "{line}");
    let log = relay.log();
    assert!(
        log.contains("raised the open-file soft limit to the hard limit"),
        "{log}"
    );
    // 4096 - 256 descriptors of headroom; the default 50,000 does not fit.
    assert!(
        log.contains("limits.max_connections lowered from 50000 to 3840"),
        "{log}"
    );
    assert!(
        log.contains("capacity.max_links lowered from 100000 to 3584"),
        "{log}"
    );
    let c = relay.client().await.unwrap();
    let m = c.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&m.raw);
    assert!(
        text.contains("netpilot_client_sockets_budget 3840\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_hard_limit_too_low_for_a_relay_is_refused_at_start() {
    let Err(e) = Relay::start_with_nofile(RelayOptions::default(), 300, 300).await else {
        panic!("a relay started with 300 descriptors");
    };
    assert!(e.to_string().contains("the open-file limit is 300"), "{e}");
}

#[tokio::test]
async fn links_beyond_max_links_are_refused_and_the_slot_comes_back() {
    let relay = Relay::start(RelayOptions {
        config: "[capacity]\nmax_links = 2\nmax_link_accepts_per_second = 0\n".into(),
    })
    .await
    .unwrap();
    let mut creds = Vec::new();
    for _ in 0..3 {
        creds.push(credentials(&relay.enrolled_router("u").await.unwrap()).unwrap());
    }
    let first = connect(&relay, &creds[0].0, &creds[0].1)
        .await
        .unwrap()
        .expect("first link");
    let _second = connect(&relay, &creds[1].0, &creds[1].1)
        .await
        .unwrap()
        .expect("second link");
    let refused = connect(&relay, &creds[2].0, &creds[2].1)
        .await
        .unwrap()
        .expect_err("a third link over max_links = 2");
    assert_links_busy(&refused, "30");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_links"),
        "{}",
        refused.body
    );
    // The web app is served all the same.
    let c = relay.client().await.unwrap();
    assert_eq!(c.get("/health").await.unwrap().status, 200);
    assert_eq!(c.get("/api/admin/routers").await.unwrap().status, 200);
    // A link that ends gives its slot back.
    drop(first);
    let third = eventually(Duration::from_secs(10), "a free link slot", || async {
        connect(&relay, &creds[2].0, &creds[2].1)
            .await
            .unwrap()
            .ok()
    })
    .await
    .unwrap();
    let m = c.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&m.raw);
    assert!(
        text.contains("netpilot_links_refused_total{reason=\"max_links\"} "),
        "{text}"
    );
    assert!(
        !text.contains("netpilot_links_refused_total{reason=\"max_links\"} 0\n"),
        "{text}"
    );
    drop(third);
}

#[tokio::test]
async fn the_real_agent_backs_off_on_links_busy_and_comes_in_when_a_slot_frees() {
    let relay = Relay::start(RelayOptions {
        config: "[capacity]\nmax_links = 1\nmax_link_accepts_per_second = 0\n".into(),
    })
    .await
    .unwrap();
    let holder = relay.enrolled_router("u").await.unwrap();
    let (hid, hsecret) = credentials(&holder).unwrap();
    let held = connect(&relay, &hid, &hsecret)
        .await
        .unwrap()
        .expect("the one link");
    let router = relay.enrolled_router("u").await.unwrap();
    let agent_log = router.state_dir.parent().unwrap().join("agent.log");
    let refusals = || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .matches("503 Service Unavailable LINKS_BUSY")
            .count()
    };
    // Backoff from 200 ms doubling to 2 s, with full jitter.
    let _agent = Agent::start(
        &router,
        &[
            "--simulate",
            "--backoff-base",
            "200ms",
            "--backoff-cap",
            "2s",
        ],
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "two refusals", || async {
        (refusals() >= 2).then_some(())
    })
    .await
    .unwrap();
    let before = refusals();
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let during = refusals() - before;
    println!("{during} refused dials in {window:?}");
    // A loop without backoff dials hundreds of times in 3 s; a jittered delay
    // that doubles from 200 ms to 2 s expects a handful (about 3 + 3/1 s).
    assert!(
        during <= 15,
        "{during} refused dials in {window:?}: the agent does not back off"
    );
    drop(held);
    relay
        .wait_online(&router.router_id, true, Duration::from_secs(15))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_link_storm_is_refused_at_the_accept_rate_while_the_api_answers() {
    const RATE: u64 = 2;
    const STORM: usize = 120;
    let relay = Relay::start(RelayOptions {
        config: format!("[capacity]\nmax_link_accepts_per_second = {RATE}\n"),
    })
    .await
    .unwrap();
    let router = relay.enrolled_router("u").await.unwrap();
    let (id, secret) = credentials(&router).unwrap();
    let api = relay.client().await.unwrap();
    // Below the per-address cap of unauthenticated connections (64).
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let started = Instant::now();
    let mut storm = tokio::task::JoinSet::new();
    for _ in 0..STORM {
        let (id, secret, gate) = (id.clone(), secret.clone(), gate.clone());
        let addr = relay.addr;
        let fp = relay.fingerprint.clone();
        storm.spawn(async move {
            let _p = gate.acquire_owned().await.unwrap();
            let r = netpilot_tests::fake_agent::connect_to(addr, &fp, &id, &secret).await;
            // The refusal, if any; an accepted link is dropped at once.
            r.map(|r| r.err())
        });
    }
    let mut health = Vec::new();
    let mut calls = Vec::new();
    while !storm.is_empty() {
        let t = Instant::now();
        let h = api.get("/health").await.unwrap();
        health.push(t.elapsed());
        assert_eq!(h.status, 200);
        let t = Instant::now();
        let a = api.get("/api/admin/routers?limit=10").await.unwrap();
        calls.push(t.elapsed());
        assert_eq!(a.status, 200, "{}", a.body);
        while let Some(r) = storm.try_join_next() {
            let outcome = r.unwrap().unwrap();
            if let Some(reply) = outcome {
                assert_links_busy(&reply, "2");
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    let m = api.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&m.raw);
    let refused: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("netpilot_links_refused_total{reason=\"accept_rate\"} "))
        .unwrap()
        .parse()
        .unwrap();
    // One second's burst, then the rate while the storm lasted (and one for luck
    // at the edges of the clock).
    let allowed = RATE * (1 + elapsed.as_secs() + 1) + 1;
    assert!(
        STORM as u64 - refused <= allowed,
        "{} of {STORM} upgrades accepted in {elapsed:?}; at most {allowed} expected",
        STORM as u64 - refused
    );
    let (h, a) = (median(health.clone()), median(calls.clone()));
    let worst = *health.iter().chain(calls.iter()).max().unwrap();
    println!(
        "link storm of {STORM} upgrades over {elapsed:?}: {refused} refused; /health median {h:?}, \
         admin list median {a:?}, worst {worst:?} ({} samples)",
        health.len()
    );
    // Generous: the machine is shared; the point is seconds, not the 2.8-7.4 s of
    // a storm without the limit, which grows with the storm.
    assert!(
        worst < Duration::from_secs(3),
        "worst API latency {worst:?}"
    );
}

#[tokio::test]
async fn links_are_refused_at_the_api_reserve_while_api_connections_still_get_in() {
    // 340 descriptors: 84 for clients after the relay's 256 of headroom; links may
    // never take the last 40.
    let relay = Relay::start_with_nofile(
        RelayOptions {
            config: "[capacity]\nreserved_api_connections = 40\nmax_link_accepts_per_second = 0\n"
                .into(),
        },
        340,
        340,
    )
    .await
    .unwrap();
    let log = relay.log();
    assert!(
        log.contains("capacity.max_links lowered from 100000 to 44"),
        "{log}"
    );
    let router = relay.enrolled_router("u").await.unwrap();
    let (id, secret) = credentials(&router).unwrap();
    async fn api_client(relay: &Relay) -> Client {
        let c = Client::connect(relay.addr, &relay.fingerprint, API_KEY)
            .await
            .unwrap();
        // Authenticated: out of the per-address count of anonymous connections.
        assert_eq!(
            c.get("/api/admin/routers?limit=1").await.unwrap().status,
            200
        );
        c
    }
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(api_client(&relay).await);
    }
    let refused = connect(&relay, &id, &secret)
        .await
        .unwrap()
        .expect_err("a link into the API reserve");
    assert_links_busy(&refused, "30");
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("api_reserve"),
        "{}",
        refused.body
    );
    // The reserve is the web app's: 25 more API connections (75 of 84) get in.
    for _ in 0..25 {
        held.push(api_client(&relay).await);
    }
    for c in &held {
        assert_eq!(c.get("/health").await.unwrap().status, 200);
    }
    drop(held);
    let link = eventually(Duration::from_secs(10), "room for a link", || async {
        connect(&relay, &id, &secret).await.unwrap().ok()
    })
    .await
    .unwrap();
    assert!(!relay.log().contains("Too many open files"));
    drop(link);
}

#[tokio::test]
async fn the_admin_router_list_is_paged_with_a_cursor() {
    const N: usize = 1200;
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let c = relay.client().await.unwrap();
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..N {
        let c = c.clone();
        let owner = if i % 3 == 0 { "b" } else { "a" };
        creates.spawn(async move {
            let r = c
                .post(
                    "/api/admin/routers",
                    json!({"ownerUserId": owner, "name": format!("r{i}")}),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{}", r.body);
        });
    }
    while let Some(r) = creates.join_next().await {
        r.unwrap();
    }

    let walk = |query: &'static str, limit: usize| {
        let c = c.clone();
        async move {
            let mut seen = Vec::new();
            let mut pages = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(cur) => format!("/api/admin/routers?{query}limit={limit}&cursor={cur}"),
                    None => format!("/api/admin/routers?{query}limit={limit}"),
                };
                let r = c.get(&path).await.unwrap();
                assert_eq!(r.status, 200, "{}", r.body);
                let d = &r.body["data"];
                let routers = d["routers"].as_array().unwrap();
                pages.push(routers.len());
                seen.extend(
                    routers
                        .iter()
                        .map(|r| r["router_id"].as_str().unwrap().to_owned()),
                );
                assert_eq!(d["limit"], limit);
                match d["next_cursor"].as_str() {
                    Some(next) => {
                        assert_eq!(routers.len(), limit);
                        assert_eq!(next, routers.last().unwrap()["router_id"]);
                        cursor = Some(next.to_owned());
                    }
                    None => return (seen, pages, d["total"].as_u64().unwrap()),
                }
            }
        }
    };
    let (all, pages, total) = walk("", 500).await;
    assert_eq!(pages, [500, 500, 200]);
    assert_eq!(total, N as u64);
    assert_eq!(
        all.iter().collect::<HashSet<_>>().len(),
        N,
        "no router twice"
    );
    let (b, pages, total) = walk("ownerUserId=b&", 150).await;
    assert_eq!(total, 400);
    assert_eq!(pages, [150, 150, 100]);
    assert_eq!(b.len(), 400);
    // Oldest first: the owner's pages are the full list's order, filtered.
    let b_set: HashSet<_> = b.iter().collect();
    let filtered: Vec<_> = all.iter().filter(|id| b_set.contains(id)).collect();
    assert_eq!(filtered, b.iter().collect::<Vec<_>>());

    // A client that names no limit gets the first 500 and where to go on.
    let r = c.get("/api/admin/routers").await.unwrap();
    let d = &r.body["data"];
    assert_eq!(d["routers"].as_array().unwrap().len(), 500);
    assert_eq!(d["limit"], 500);
    assert_eq!(d["total"], N);
    assert_eq!(d["online"], 0);
    assert_eq!(d["next_cursor"].as_str(), Some(all[499].as_str()));
    // The largest page is bounded.
    let r = c.get("/api/admin/routers?limit=5000").await.unwrap();
    assert_eq!(r.body["data"]["routers"].as_array().unwrap().len(), N);
    assert!(r.body["data"]["next_cursor"].is_null());

    for bad in [
        "limit=0",
        "limit=5001",
        "limit=ten",
        "limit=-1",
        "cursor=nope",
        "cursor=5f0e6a0c-2b7d-4e59-8d3c-1a9b8c7d6e5f",
    ] {
        let r = c.get(&format!("/api/admin/routers?{bad}")).await.unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(r.code(), "INVALID_PARAMETER", "{bad}");
    }
}
