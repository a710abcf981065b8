//! The agent protects the router's memory: 48 concurrent forwarded calls with
//! 1.9 MB bodies (the relay's default body limit lets them through) keep the
//! agent's peak resident set within a bound, every call gets an answer (done or
//! `AGENT_BUSY`, never a hang), and the memory goes back to the system afterwards.
//!
//! Bounds are on growth over the agent's own baseline: the debug glibc binary the
//! tests run starts at about 17 MB, the router's release musl build at about 6 MB;
//! the bound of 12 MB on the router leaves 6 MB for such a burst.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use netpilot_tests::{eventually, ApiRig};
use serde_json::json;

const CALLS: usize = 48;
const BODY_BYTES: usize = 1_900_000;
const MIB: u64 = 1024;

/// A `kB` line of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} missing in /proc/{pid}/status"))
}

/// How the padding of a large body is shaped.
#[derive(Clone, Copy, Debug)]
enum Padding {
    /// One long string: about as large parsed as raw.
    String,
    /// An array of short strings: the shape a JSON parser spends most on per byte.
    Array,
}

/// A valid blacklist call of about `size` bytes: the MAC plus an unknown
/// `padding` field the agent parses and ignores.
fn big_body(size: usize, session: &str, router: &str, padding: Padding) -> Bytes {
    let head =
        json!({"sessionId": session, "routerId": router, "mac": "02:00:00:00:01:05"}).to_string();
    let mut s = String::with_capacity(size + 64);
    s.push_str(&head[..head.len() - 1]);
    match padding {
        Padding::String => {
            s.push_str(",\"padding\":\"");
            s.extend(std::iter::repeat_n('x', size - s.len() - 2));
            s.push_str("\"}");
        }
        Padding::Array => {
            s.push_str(",\"padding\":[\"0123456789abcdef\"");
            while s.len() < size - 21 {
                s.push_str(",\"0123456789abcdef\"");
            }
            s.push_str("]}");
        }
    }
    assert!(s.len() <= size && s.len() > size - 32, "{}", s.len());
    Bytes::from(s)
}

/// Runs the burst and returns (baseline RSS, peak, after) in KiB.
async fn burst(padding: Padding) -> (u64, u64, u64) {
    // The relay waits longer than the agent would, so every refusal is the agent's.
    let rig = ApiRig::builder()
        .relay_config("[timeouts]\ncommand = \"120s\"\n")
        .start()
        .await
        .unwrap();
    let pid = rig.agent.pid().unwrap();
    let alice = rig.session("alice").await.unwrap();
    assert_eq!(alice.get("/api/blacklist").await.status, 200);
    let base = status_kib(pid, "VmRSS:");
    let body = big_body(BODY_BYTES, &alice.id, &alice.router_id, padding);

    let started = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..CALLS {
        // Each on its own connection, as many web-app workers would.
        let client = rig.relay.client().await.unwrap();
        let body = body.clone();
        calls.push(tokio::spawn(async move {
            let r = client
                .call(
                    "POST",
                    "/api/blacklist/add",
                    Some(body),
                    Some("application/json"),
                )
                .await
                .expect("an HTTP answer");
            (r.status, r.code().to_owned())
        }));
    }
    let mut answers = BTreeMap::new();
    for c in calls {
        let answer = tokio::time::timeout(Duration::from_secs(90), c)
            .await
            .expect("every call is answered within 90 s")
            .unwrap();
        *answers.entry(answer).or_insert(0) += 1;
    }
    let took = started.elapsed();
    let peak = status_kib(pid, "VmHWM:");
    println!(
        "{padding:?} padding: agent RSS baseline {base} KiB, peak (VmHWM) {peak} KiB \
         (+{} KiB); {CALLS} calls in {took:?}: {answers:?}",
        peak.saturating_sub(base)
    );
    // Still serving, and the memory goes back.
    assert_eq!(alice.get("/api/blacklist").await.status, 200);
    let after = eventually(
        Duration::from_secs(10),
        "the agent's memory back",
        || async {
            let rss = status_kib(pid, "VmRSS:");
            (rss <= base + 2 * MIB).then_some(rss)
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} KiB, baseline {base} KiB",
            status_kib(pid, "VmRSS:")
        )
    });
    println!("{padding:?} padding: agent RSS after {after} KiB");
    for ((status, code), n) in &answers {
        assert!(
            *status == 200 || (*status == 503 && code == "AGENT_BUSY"),
            "{n} calls answered {status} {code}: {answers:?}"
        );
    }
    assert!(
        answers.get(&(200, String::new())).is_some_and(|n| *n > 0),
        "none done: {answers:?}"
    );
    (base, peak, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_bodies_keep_the_agent_within_its_memory_budget() {
    let (base, peak, _) = burst(Padding::String).await;
    // Without the budget this burst took the agent up by 28 MB.
    assert!(
        peak <= base + 6 * MIB,
        "peak {peak} KiB is more than 6 MiB over the baseline {base} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_parse_large_are_taken_one_at_a_time() {
    // Parsed, 1.9 MB of short strings is about five times its size; the budget lets
    // one such body in at a time, so the peak is one call's worth, not 48.
    let (base, peak, _) = burst(Padding::Array).await;
    assert!(
        peak <= base + 14 * MIB,
        "peak {peak} KiB is more than 14 MiB over the baseline {base} KiB"
    );
}
