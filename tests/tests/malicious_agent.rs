//! A malicious agent against the real relay (issue 15, items 3, 4 and three of 6):
//! a fake agent that authenticates like the real one answers forwarded calls with
//! oversized, stalled, HTML or relay-impersonating answers. The relay stays within
//! its memory bounds, answers for itself (502 `BAD_AGENT_RESPONSE`, always JSON with
//! `nosniff`), streams the CSV export under its cap and deadline, limits calls in
//! flight per router and answer bytes across the relay. Also: two agents on one
//! identity show in the admin view, forwarded-call metrics count only calls that
//! reached a router, and a wrong secret never learns that a router was revoked.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use netpilot_tests::fake_agent::{self, answer, chunks, envelope, rig, rss_kib, streamed, whole};
use netpilot_tests::{
    eventually, metric_value, metrics, start_session, Agent, EnrolledRouter, Relay, RelayOptions,
    Reply, Session,
};
use serde_json::{json, Value};

const MIB: u64 = 1024 * 1024;

fn ok_envelope() -> hyper::Response<fake_agent::FakeBody> {
    envelope(
        200,
        json!({"success": true, "data": {"ok": 1}, "meta": {"duration_ms": 0}}),
    )
}

fn err_envelope(status: u16, code: &str) -> hyper::Response<fake_agent::FakeBody> {
    envelope(
        status,
        json!({"success": false, "error": {"code": code, "message": "from the router"}, "meta": {"duration_ms": 0}}),
    )
}

fn assert_relay_json(r: &Reply) {
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/json",
        "{r:?}"
    );
    assert_eq!(r.headers.get("x-content-type-options").unwrap(), "nosniff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_huge_answers_get_502_and_the_relay_stays_small() {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let (relay, _router, _agent, session) = rig("", move |_| {
        let chunk = chunk.clone();
        // 31 MiB with no length announced: the relay finds out by reading.
        Box::pin(async move {
            answer(
                200,
                Some("application/json"),
                streamed(chunk, 31 * MIB, None),
            )
        })
    })
    .await;
    let pid = relay.pid().unwrap();
    assert_eq!(session.get("/api/wifi/status").await.status, 502);
    let (before, _) = rss_kib(pid);
    // A route with the default cap (1 MiB), then one with the list cap (8 MiB): six
    // at once each. The bound of the second is the answer budget (64 MiB) — the
    // most all answers in flight may hold — plus 16 MiB for buffers and the heap.
    for (route, bound_mib) in [
        ("/api/wifi/status", 24),
        ("/api/device-usage/history", 64 + 16),
    ] {
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let s = session.clone();
                tokio::spawn(async move { s.get(route).await })
            })
            .collect();
        for c in calls {
            let r = c.await.unwrap();
            assert_eq!(
                (r.status, r.code()),
                (502, "BAD_AGENT_RESPONSE"),
                "{}",
                r.body
            );
            assert!(r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("larger than"));
            assert_relay_json(&r);
        }
        let (now, peak) = rss_kib(pid);
        println!(
            "{route}: six 31 MiB answers: relay RSS {} MiB before, peak {} MiB (+{} MiB), {} MiB after",
            before / 1024,
            peak / 1024,
            peak.saturating_sub(before) / 1024,
            now / 1024
        );
        assert!(
            peak.saturating_sub(before) < bound_mib * 1024,
            "{route}: peak RSS grew {} KiB (bound {bound_mib} MiB)",
            peak.saturating_sub(before)
        );
    }
    // Nothing stays charged to the budget.
    let c = relay.client().await.unwrap();
    eventually(
        Duration::from_secs(5),
        "answer budget back to 0",
        || async {
            (metric_value(&metrics(&c).await, "netpilot_answer_bytes_in_flight") == Some(0))
                .then_some(())
        },
    )
    .await
    .unwrap();
}

/// The CSV the fake agent exports: numbered lines, so a lost, doubled or
/// reordered chunk shows.
fn csv(bytes: usize) -> Bytes {
    let mut out = String::with_capacity(bytes + 64);
    out.push_str("mac,hostname,rx_bytes,tx_bytes\n");
    let mut i = 0u64;
    while out.len() < bytes {
        out.push_str(&format!("02:00:00:00:00:01,device-{i:010},{i},{}\n", i * 7));
        i += 1;
    }
    out.truncate(bytes);
    Bytes::from(out)
}

/// [`csv`]'s export as the relay passes it on: a `vendor` column at the end of each
/// record, empty for its one (randomized) MAC.
fn with_vendor_column(file: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(file.len() + file.len() / 40);
    for (i, line) in file.split_inclusive(|b| *b == b'\n').enumerate() {
        let (record, end) = match line.strip_suffix(b"\n") {
            Some(r) => (r, &b"\n"[..]),
            None => (line, &b""[..]),
        };
        out.extend_from_slice(record);
        out.extend_from_slice(if i == 0 { b",vendor" } else { b"," });
        out.extend_from_slice(end);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mib_csv_export_streams_through_intact() {
    let file = csv(20 * MIB as usize);
    let sent = file.clone();
    let (relay, _router, _agent, session) = rig("", move |parts| {
        let file = sent.clone();
        Box::pin(async move {
            if parts.uri.query().is_some_and(|q| q.contains("format=csv")) {
                let list = (0..file.len())
                    .step_by(64 * 1024)
                    .map(|i| file.slice(i..(i + 64 * 1024).min(file.len())))
                    .collect();
                answer(200, Some("text/csv; charset=utf-8"), chunks(list, None))
            } else {
                ok_envelope()
            }
        })
    })
    .await;
    let pid = relay.pid().unwrap();
    assert_eq!(session.get("/api/wifi/status").await.status, 200);
    let (before, _) = rss_kib(pid);
    let r = session
        .get("/api/device-usage/history?format=csv&days=7")
        .await;
    let (now, peak) = rss_kib(pid);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "text/csv; charset=utf-8"
    );
    assert_eq!(r.headers.get("x-content-type-options").unwrap(), "nosniff");
    // Changed only by the vendor column the relay appends (issue 17): `vendor` on
    // the header, empty on these rows (their MAC is locally administered).
    let want = with_vendor_column(&file);
    assert_eq!(r.raw.len(), want.len());
    assert!(r.raw == want, "the export arrived changed");
    println!(
        "20 MiB CSV export: relay RSS {} MiB before, peak {} MiB (+{} MiB), {} MiB after",
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024,
        now / 1024
    );
    // Buffered whole it would take 20 MiB and more; streamed, it takes the links'
    // flow-control windows.
    assert!(
        peak.saturating_sub(before) < 12 * 1024,
        "peak RSS grew {} KiB streaming 20 MiB",
        peak.saturating_sub(before)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_export_is_cut_past_its_cap_or_deadline() {
    let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
    let (relay, _router, _agent, session) = rig(
        "[forwarding]\nexport_max_bytes = 1048576\nexport_deadline = \"2s\"\n",
        move |parts| {
            let chunk = chunk.clone();
            let q = parts.uri.query().unwrap_or("").to_owned();
            Box::pin(async move {
                if q.contains("days=1") {
                    // Over the cap: 2 MiB.
                    answer(200, Some("text/csv"), streamed(chunk, 2 * MIB, None))
                } else if q.contains("days=2") {
                    // 64 KiB, then nothing, forever.
                    let hold = Box::pin(std::future::pending::<()>());
                    answer(
                        200,
                        Some("text/csv"),
                        streamed(chunk, 64 * 1024, Some(hold)),
                    )
                } else {
                    // The cap is the export's, not a JSON answer's: 900 KiB passes.
                    answer(200, Some("text/csv"), streamed(chunk, 900 * 1024, None))
                }
            })
        },
    )
    .await;
    let c = &session.client;
    let r = c
        .get(&session.q("/api/device-usage/history?format=csv&days=3"))
        .await
        .unwrap();
    // The cap counts the router's bytes; the relay's vendor column comes on top
    // (one header record of `a`s here: `,vendor`).
    assert_eq!((r.status, r.raw.len()), (200, 900 * 1024 + ",vendor".len()));

    let over = c
        .get(&session.q("/api/device-usage/history?format=csv&days=1"))
        .await;
    assert!(
        over.is_err(),
        "an export over its cap arrived whole: {:?}",
        over.map(|r| (r.status, r.raw.len()))
    );

    let started = std::time::Instant::now();
    let stalled = tokio::time::timeout(
        Duration::from_secs(20),
        c.get(&session.q("/api/device-usage/history?format=csv&days=2")),
    )
    .await
    .expect("a stalled export was not cut");
    assert!(
        stalled.is_err(),
        "a stalled export ended cleanly: {:?}",
        stalled.map(|r| (r.status, r.raw.len()))
    );
    println!("stalled export cut after {:?}", started.elapsed());

    // The relay still serves, and nothing stays charged.
    assert_eq!(c.get("/health").await.unwrap().status, 200);
    let log = relay.log();
    assert!(log.contains("CSV export cut"), "{log}");
    eventually(
        Duration::from_secs(5),
        "answer budget back to 0",
        || async {
            (metric_value(&metrics(c).await, "netpilot_answer_bytes_in_flight") == Some(0))
                .then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_relay_speaks_for_itself() {
    let (_relay, _router, _agent, session) = rig("", |parts| {
        let path = parts.uri.path().to_owned();
        Box::pin(async move {
            match path.as_str() {
                "/api/scan/router" => answer(
                    200,
                    Some("text/html"),
                    whole("<html><script>alert(document.cookie)</script></html>"),
                ),
                // A 401 of its own, in the relay's words.
                "/api/wifi/status" => err_envelope(401, "UNAUTHORIZED"),
                // The relay's code with the relay's status: still not the router's to send.
                "/api/blocked" => err_envelope(403, "ROUTER_REVOKED"),
                "/api/groups" => answer(200, None, whole("hello")),
                "/api/whitelist" => err_envelope(500, "INVALID_MAC"),
                "/api/blacklist" => err_envelope(400, "INVALID_MAC"),
                "/api/dns/categories" => answer(401, Some("application/json"), whole("{}")),
                _ => ok_envelope(),
            }
        })
    })
    .await;
    for (path, why) in [
        ("/api/scan/router", "content type"),
        ("/api/wifi/status", "relay's"),
        ("/api/blocked", "relay's"),
        ("/api/groups", "content type"),
        ("/api/whitelist", "status 500"),
        ("/api/dns/categories", "envelope"),
    ] {
        let r = session.get(path).await;
        assert_eq!(
            (r.status, r.code()),
            (502, "BAD_AGENT_RESPONSE"),
            "{path}: {}",
            r.body
        );
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(why),
            "{path}: {}",
            r.body
        );
        assert!(!String::from_utf8_lossy(&r.raw).contains("<script>"));
        assert_relay_json(&r);
    }
    // The router's own error with its own status passes as sent.
    let r = session.get("/api/blacklist").await;
    assert_eq!((r.status, r.code()), (400, "INVALID_MAC"), "{}", r.body);
    assert_eq!(r.body["error"]["message"], "from the router");
    assert_relay_json(&r);
    let r = session.get("/api/scan").await;
    assert_eq!((r.status, r.body["data"]["ok"].clone()), (200, json!(1)));
    assert_relay_json(&r);
    // The relay's own answers say nosniff too.
    let r = session.client.get("/health").await.unwrap();
    assert_eq!(r.headers.get("x-content-type-options").unwrap(), "nosniff");
    let r = session.client.get("/api/nope").await.unwrap();
    assert_relay_json(&r);
}

#[tokio::test]
async fn calls_in_flight_per_router_are_limited() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let (relay, _router, agent, session) = rig(
        "[forwarding]\ncalls_per_router = 2\ncalls_queued_per_router = 0\n",
        move |parts| {
            let gate = held.clone();
            Box::pin(async move {
                if parts.uri.path() == "/api/scan" {
                    gate.acquire().await.unwrap().forget();
                }
                ok_envelope()
            })
        },
    )
    .await;
    let before = agent.calls.load(Ordering::SeqCst);
    let held_calls: Vec<_> = (0..2)
        .map(|_| {
            let s = session.clone();
            tokio::spawn(async move { s.get("/api/scan").await })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "two calls at the router",
        || async { (agent.calls.load(Ordering::SeqCst) == before + 2).then_some(()) },
    )
    .await
    .unwrap();
    // The third is refused before it reaches the router.
    let r = session.get("/api/wifi/status").await;
    assert_eq!((r.status, r.code()), (429, "ROUTER_BUSY"), "{}", r.body);
    assert_relay_json(&r);
    assert_eq!(agent.calls.load(Ordering::SeqCst), before + 2);
    let m = metrics(&session.client).await;
    assert!(
        !m.contains("status=\"429\""),
        "a refused call counted as forwarded:\n{m}"
    );
    gate.add_permits(16);
    for c in held_calls {
        assert_eq!(c.await.unwrap().status, 200);
    }
    // Slots are given back.
    assert_eq!(session.get("/api/wifi/status").await.status, 200);
    assert_eq!(session.get("/api/scan").await.status, 200);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_flight_share_one_budget() {
    let (release, released) = tokio::sync::watch::channel(false);
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let (_relay, _router, _agent, session) = rig(
        "[forwarding]\nanswer_max_bytes = 1048576\nlist_answer_max_bytes = 1048576\nanswer_budget_bytes = 2097152\n",
        move |_| {
            let (chunk, mut released) = (chunk.clone(), released.clone());
            // 960 KiB of an answer, then a stall until released.
            let hold = Box::pin(async move {
                let _ = released.wait_for(|r| *r).await;
            });
            Box::pin(async move {
                answer(
                    200,
                    Some("application/json"),
                    streamed(chunk, 960 * 1024, Some(hold)),
                )
            })
        },
    )
    .await;
    let held_calls: Vec<_> = (0..2)
        .map(|_| {
            let s = session.clone();
            tokio::spawn(async move { s.get("/api/scan").await })
        })
        .collect();
    let c = &session.client;
    eventually(Duration::from_secs(10), "two answers held", || async {
        (metric_value(&metrics(c).await, "netpilot_answer_bytes_in_flight") >= Some(2 * 960 * 1024))
            .then_some(())
    })
    .await
    .unwrap();
    let r = session.get("/api/wifi/status").await;
    assert_eq!((r.status, r.code()), (503, "RELAY_BUSY"), "{}", r.body);
    assert_relay_json(&r);
    release.send(true).unwrap();
    for h in held_calls {
        // 960 KiB of spaces is no envelope.
        let r = h.await.unwrap();
        assert_eq!((r.status, r.code()), (502, "BAD_AGENT_RESPONSE"));
    }
    eventually(
        Duration::from_secs(5),
        "answer budget back to 0",
        || async {
            (metric_value(&metrics(c).await, "netpilot_answer_bytes_in_flight") == Some(0))
                .then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn forwarded_metrics_count_only_calls_sent_to_the_router() {
    let (relay, router, _agent, alice) = rig("", |_| Box::pin(async { ok_envelope() })).await;
    let c = relay.client().await.unwrap();
    // Bob's session, on his own router, then aimed at alice's.
    let (bobs_router, _) = relay.create_router("bob", "bob's").await.unwrap();
    let bob = Session {
        id: start_session(&c, "bob", &bobs_router).await.unwrap(),
        client: c.clone(),
        router_id: router.router_id.clone(),
    };
    let route = "netpilot_forwarded_requests_total{route=\"/api/scan/router\"";
    let before = metrics(&c).await;
    assert!(!before.contains(route), "{before}");
    let r = bob.get("/api/scan/router").await;
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    let r = c
        .get(&netpilot_tests::q(
            "/api/scan/router",
            &netpilot_tests::session_id(),
            &router.router_id,
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let r = c
        .get(&netpilot_tests::q("/api/scan/router", &alice.id, "nope"))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let after = metrics(&c).await;
    assert!(
        !after.contains(route),
        "relay-side refusals counted:\n{after}"
    );
    // Still counted as errors, by code.
    assert!(after.contains("netpilot_errors_total{code=\"FORBIDDEN\"} 1\n"));
    assert_eq!(alice.get("/api/scan/router").await.status, 200);
    let after = metrics(&c).await;
    assert!(
        after.contains(&format!("{route},status=\"200\"}} 1\n")),
        "{after}"
    );
    assert_eq!(
        after
            .matches("netpilot_forwarded_requests_total{route=\"/api/scan/router\"")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_wrong_secret_never_learns_that_a_router_was_revoked() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let revoked = relay.enrolled_router("alice").await.unwrap();
    let live = relay.enrolled_router("alice").await.unwrap();
    let c = relay.client().await.unwrap();
    let r = c
        .delete(&format!("/api/admin/routers/{}", revoked.router_id))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let wrong = "0".repeat(64);
    let refusal = |r: Reply| {
        (
            r.status,
            r.code().to_owned(),
            r.body["error"]["message"].clone(),
        )
    };
    let on_revoked = fake_agent::connect(&relay, &revoked.router_id, &wrong)
        .await
        .unwrap()
        .unwrap_err();
    let on_live = fake_agent::connect(&relay, &live.router_id, &wrong)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refusal(on_revoked.clone()).0, 401);
    assert_eq!(refusal(on_revoked), refusal(on_live));
    // The holder of the secret is told.
    let (id, secret) = fake_agent::credentials(&revoked).unwrap();
    let r = fake_agent::connect(&relay, &id, &secret)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!((r.status, r.code()), (403, "ROUTER_REVOKED"));
    // And the same on the agent's other endpoints.
    for (secret, want) in [(Some(wrong.as_str()), 401), (None, 403)] {
        let ep = netpilot_tests::relay_endpoint(&relay, &revoked, secret);
        let mut s = ep.http1().await.unwrap();
        let req = ep
            .request(
                hyper::Method::GET,
                netpilot_proto::link::SPEEDTEST_PING_PATH,
            )
            .body(netpilot_agent::link::dial::RelayBody::empty())
            .unwrap();
        let status = s.send_request(req).await.unwrap().status().as_u16();
        assert_eq!(status, want, "secret {secret:?}");
    }
}

#[tokio::test]
async fn two_agents_on_one_identity_show_in_the_admin_view() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let copy_dir = tempfile::tempdir().unwrap();
    let copy = copy_dir.path().join("state");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(&router.state_dir)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success());
    let c = relay.client().await.unwrap();
    let view = |v: Value| {
        (
            v["data"]["link_replacements"].as_u64().unwrap(),
            v["data"]["duplicate_identity_suspected"].as_bool().unwrap(),
        )
    };
    let path = format!("/api/admin/routers/{}", router.router_id);

    let _first = Agent::start(&router, &["--simulate"]).await.unwrap();
    relay
        .wait_online(&router.router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(view(c.get(&path).await.unwrap().body), (0, false));

    let _second = Agent::start(
        &EnrolledRouter::at(&router.router_id, &copy),
        &["--simulate"],
    )
    .await
    .unwrap();
    let (n, _) = eventually(Duration::from_secs(20), "a suspected duplicate", || async {
        let v = view(c.get(&path).await.unwrap().body);
        v.1.then_some(v)
    })
    .await
    .unwrap();
    assert!(n >= 3, "{n}");
    let m = metrics(&c).await;
    assert!(
        metric_value(&m, "netpilot_link_replacements_total").unwrap() >= 3,
        "{m}"
    );
    let log = relay.log();
    assert!(
        log.contains("two agents probably use one identity"),
        "{log}"
    );
    // Rate-limited: one warning for the minute, however often they flap.
    assert_eq!(
        log.matches("two agents probably use one identity").count(),
        1
    );
}
