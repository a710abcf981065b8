//! Relay failover with the real binaries: an agent given two relays of one
//! deployment (the same registry and certificate) moves to the other when the one
//! it is on dies, within the spread window plus a dial, and back again; the relay
//! listens with the configured backlog.

use std::time::{Duration, Instant};

use std::path::Path;

use netpilot_tests::{binary, eventually, Agent, AgentPaths, Relay, RelayOptions};

/// The agent's spread of the first retry after a lost link, in this test.
const SPREAD: Duration = Duration::from_secs(1);

/// Short keepalive so each relay notices a gone agent quickly.
const FAST_LINK: &str = "[timeouts]\nping_interval = \"200ms\"\ndead_after = \"800ms\"\n";

fn control(verb: &str, socket: &Path) {
    let out = std::process::Command::new(binary("netpilot-agent"))
        .args([verb, "--control", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn the_agent_fails_over_to_the_next_relay_and_back() {
    let mut a = Relay::start(RelayOptions {
        config: FAST_LINK.into(),
    })
    .await
    .unwrap();
    let router = a.enrolled_router("alice").await.unwrap();
    // B is a copy of A (registry and certificate), as two nodes of one deployment
    // sharing a certificate; copied from a stopped A so the database is whole.
    a.terminate().await.unwrap();
    let mut b = a.start_copy().await.unwrap();
    a.restart().await.unwrap();
    assert_eq!(a.fingerprint, b.fingerprint, "one certificate for both");

    let spread = format!("{}ms", SPREAD.as_millis());
    let (a_url, b_url) = (a.url(), b.url());
    let _agent = Agent::start(
        &router,
        &[
            "--simulate",
            "--relay",
            &a_url,
            "--relay",
            &b_url,
            "--reconnect-spread",
            &spread,
        ],
    )
    .await
    .unwrap();
    // The first relay listed, while it works.
    a.wait_online(&router.router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
    b.wait_online(&router.router_id, false, Duration::from_secs(1))
        .await
        .unwrap();

    // A dies without a goodbye: the agent waits at most the spread, finds A
    // refusing, and moves to B at once (no backoff round in between).
    a.kill().await;
    let killed = Instant::now();
    b.wait_online(&router.router_id, true, Duration::from_secs(15))
        .await
        .unwrap();
    let took = killed.elapsed();
    println!("failover A -> B took {took:?} (spread {SPREAD:?})");
    // Spread + one refused dial + one good one; generous for a loaded machine.
    assert!(
        took < SPREAD + Duration::from_secs(8),
        "failover took {took:?}"
    );

    // A comes back on its address; the agent stays on B (sticky): a redial goes
    // to B again, not to the first relay of the list.
    a.restart().await.unwrap();
    let socket = AgentPaths::of(&router).control;
    let link = netpilot_tests::agent_link_status(&socket);
    assert_eq!(link["relay"], b_url.as_str(), "{link}");
    let connects = link["connects"].as_u64().unwrap();
    control("reconnect", &socket);
    let link = eventually(Duration::from_secs(10), "the redialled link", || {
        let link = netpilot_tests::agent_link_status(&socket);
        let up = link["connected"] == true && link["connects"].as_u64() > Some(connects);
        async move { up.then_some(link) }
    })
    .await
    .unwrap();
    assert_eq!(link["relay"], b_url.as_str(), "{link}");
    b.wait_online(&router.router_id, true, Duration::from_secs(5))
        .await
        .unwrap();
    a.wait_online(&router.router_id, false, Duration::from_secs(1))
        .await
        .unwrap();

    // B dies: round to A.
    b.kill().await;
    let killed = Instant::now();
    a.wait_online(&router.router_id, true, Duration::from_secs(15))
        .await
        .unwrap();
    let took = killed.elapsed();
    println!("failover B -> A took {took:?}");
    assert!(
        took < SPREAD + Duration::from_secs(8),
        "failover took {took:?}"
    );
    assert_eq!(
        netpilot_tests::agent_link_status(&socket)["relay"],
        a_url.as_str()
    );
}

#[tokio::test]
async fn the_relay_listens_with_the_configured_backlog() {
    let relay = Relay::start(RelayOptions {
        config: "[limits]\nlisten_backlog = 777\n".into(),
    })
    .await
    .unwrap();
    // For a listening socket `ss` shows the backlog as Send-Q.
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{}", relay.addr.port())])
        .output()
        .expect("ss (iproute2) is needed to read a listener's backlog");
    let text = String::from_utf8_lossy(&out.stdout);
    let send_q: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(send_q, ["777"], "ss says: {text}");
}
