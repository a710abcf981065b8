//! Hostile connections on the shared port (issue 15, items 1, 2 and the header and
//! query caps of 6), run against the real relay binary on loopback: connections
//! that never speak (any ALPN), HTTP/2 connections that only PING, the per-address
//! cap on unauthenticated connections, trickled request bodies, oversized heads,
//! and the measured attack of filling every slot with quiet connections.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use netpilot_tests::{eventually, Agent, ChannelBody, Client, Relay, RelayOptions, Reply, API_KEY};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A TLS connection to the relay offering `alpn` (none when empty).
async fn tls_connect(relay: &Relay, alpn: &[&[u8]]) -> std::io::Result<TlsStream> {
    let cfg = netpilot_agent::link::tls::client_config(
        &netpilot_agent::link::tls::Trust::Fingerprint(relay.fingerprint.clone()),
    )
    .unwrap();
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(relay.addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// Waits for the peer to close `s` (EOF or error); `Err(())` if it stays open `within`.
async fn closed_within<S: AsyncReadExt + Unpin>(s: &mut S, within: Duration) -> Result<(), ()> {
    tokio::time::timeout(within, async {
        let mut chunk = [0u8; 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| ())
}

async fn metric(c: &Client, line_prefix: &str) -> u64 {
    let r = c.get("/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&r.raw).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in /metrics:\n{text}"))
}

/// An HTTP/2 client connection; the returned task ends when the connection does.
async fn h2_connection(
    relay: &Relay,
    ping_every: Option<Duration>,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tls = tls_connect(relay, &[b"h2"]).await.unwrap();
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new());
    if let Some(every) = ping_every {
        b.keep_alive_interval(every)
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
    }
    let (sender, conn) = b.handshake(TokioIo::new(tls)).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, task)
}

async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    path: &str,
) -> Reply {
    let req = hyper::Request::get(format!("https://relay{path}"))
        .header("authorization", format!("Bearer {API_KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.ready().await.unwrap();
    Reply::read(sender.send_request(req).await.unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn quiet_connections_of_every_alpn_are_closed_at_the_deadline() {
    let relay = Relay::start(RelayOptions {
        config: "[timeouts]\nhandshake = \"600ms\"\n".into(),
    })
    .await
    .unwrap();
    let pid = relay.pid().unwrap();
    let c = relay.client().await.unwrap();
    assert_eq!(c.get("/health").await.unwrap().status, 200);
    let baseline = open_fds(pid);

    // TLS finished, then silence: ALPN h2, http/1.1 and none. Before the fix a
    // connection past TLS waited for its first byte with no deadline.
    let started = Instant::now();
    let mut quiet: Vec<TlsStream> = Vec::new();
    for alpn in [&[&b"h2"[..]][..], &[&b"http/1.1"[..]][..], &[][..]] {
        for _ in 0..10 {
            quiet.push(tls_connect(&relay, alpn).await.unwrap());
        }
    }
    // And plain TCP that never starts TLS.
    let mut tcp: Vec<TcpStream> = Vec::new();
    for _ in 0..10 {
        tcp.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    // Deadline 600 ms; a generous margin for a busy machine.
    let within = Duration::from_secs(6);
    for (i, s) in quiet.iter_mut().enumerate() {
        assert!(
            closed_within(s, within).await.is_ok(),
            "quiet TLS connection {i} (ALPN group {}) still open",
            i / 10
        );
    }
    for s in tcp.iter_mut() {
        assert!(
            closed_within(s, within).await.is_ok(),
            "quiet TCP connection still open"
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(500),
        "closed before the deadline: {elapsed:?}"
    );
    drop(quiet);
    drop(tcp);
    eventually(
        Duration::from_secs(5),
        "descriptors back to the baseline",
        || async { (open_fds(pid) <= baseline).then_some(()) },
    )
    .await
    .unwrap();
    let cut = metric(
        &c,
        "netpilot_connections_closed_total{reason=\"first_request_deadline\"}",
    )
    .await;
    assert!(cut >= 40, "{cut} connections cut at the deadline");
    // The admin client's own connection, which spoke, is still served.
    assert_eq!(c.get("/health").await.unwrap().status, 200);
}

#[tokio::test]
async fn h2_connections_that_only_ping_are_closed() {
    let relay = Relay::start(RelayOptions {
        config: "[timeouts]\nhandshake = \"800ms\"\nh2_idle = \"1500ms\"\n".into(),
    })
    .await
    .unwrap();
    // PINGs and no stream at all: cut at the first-request deadline.
    let started = Instant::now();
    let (_sender, conn) = h2_connection(&relay, Some(Duration::from_millis(100))).await;
    tokio::time::timeout(Duration::from_secs(8), conn)
        .await
        .expect("an h2 connection with PINGs and no stream was kept")
        .unwrap();
    let silent_for = started.elapsed();
    assert!(silent_for >= Duration::from_millis(700), "{silent_for:?}");

    // One call, then PINGs only: closed (GOAWAY) once idle for h2_idle.
    let (mut sender, conn) = h2_connection(&relay, Some(Duration::from_millis(100))).await;
    assert_eq!(h2_get(&mut sender, "/health").await.status, 200);
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("an idle h2 connection with PINGs was kept past h2_idle")
        .unwrap();
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(1400),
        "closed early: {idle:?}"
    );

    let c = relay.client().await.unwrap();
    assert!(metric(&c, "netpilot_connections_closed_total{reason=\"h2_idle\"}").await >= 1);
}

#[tokio::test]
async fn a_call_in_flight_keeps_its_h2_connection_past_h2_idle() {
    let relay = Relay::start(RelayOptions {
        config: "[timeouts]\nh2_idle = \"400ms\"\nbody = \"10s\"\n".into(),
    })
    .await
    .unwrap();
    let tls = tls_connect(&relay, &[b"h2"]).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, ChannelBody>(TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let req = hyper::Request::post("https://relay/api/admin/routers")
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(ChannelBody(rx))
        .unwrap();
    sender.ready().await.unwrap();
    let call = tokio::spawn(sender.send_request(req));
    // The body comes after five times h2_idle: the call is in flight all along.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !conn.is_finished(),
        "h2_idle cut a connection with a call in flight"
    );
    tx.send(Bytes::from_static(
        br#"{"ownerUserId":"alice","name":"slow"}"#,
    ))
    .await
    .unwrap();
    drop(tx);
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), 201);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["success"], true, "{v}");
    // Idle now: closed after h2_idle.
    let ended = tokio::time::timeout(Duration::from_secs(8), conn).await;
    assert!(
        ended.is_ok(),
        "idle after the call, the connection was kept"
    );
}

#[tokio::test]
async fn an_agent_link_idle_longer_than_h2_idle_stays_up() {
    // ping_interval stays at its 20 s default: the link sees no traffic at all.
    let relay = Relay::start(RelayOptions {
        config: "[timeouts]\nh2_idle = \"300ms\"\nhandshake = \"300ms\"\n".into(),
    })
    .await
    .unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let _agent = Agent::start(&router, &[]).await.unwrap();
    relay
        .wait_online(&router.router_id, true, Duration::from_secs(15))
        .await
        .unwrap();
    // No event to wait for: the point is that nothing happens for many h2_idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = relay.client().await.unwrap();
    let r = c
        .get(&format!("/api/admin/routers/{}", router.router_id))
        .await
        .unwrap();
    assert_eq!(r.body["data"]["online"], true, "{}", r.body);
    assert_eq!(metric(&c, "netpilot_link_connects_total ").await, 1);
}

/// Sends `head` and then `first` (part of the declared body) over HTTP/1.1 and
/// returns the answer and how long it took.
async fn trickle(relay: &Relay, head: &str, first: &[u8]) -> (String, Duration, TlsStream) {
    let mut s = tls_connect(relay, &[b"http/1.1"]).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("no answer to a trickled body")
        .unwrap();
    (
        String::from_utf8_lossy(&buf[..n]).into_owned(),
        started.elapsed(),
        s,
    )
}

#[tokio::test]
async fn trickled_bodies_are_cut_at_the_body_deadline() {
    let relay = Relay::start(RelayOptions {
        config: "[timeouts]\nbody = \"1s\"\nhandshake = \"20s\"\n".into(),
    })
    .await
    .unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let id = netpilot_agent::link::identity::Identity::load(&router.state_dir).unwrap();
    let cases = [
        // Unauthenticated enrollment (its cap is 16 KiB).
        (
            "enroll",
            "POST /agent/v1/enroll HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n".to_owned(),
        ),
        // An agent report (cap 4 KiB), authenticated by the router's secret.
        (
            "report",
            format!(
                "POST /agent/v1/report HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nx-netpilot-router-id: {}\r\nAuthorization: Bearer {}\r\nContent-Length: 4000\r\n\r\n",
                id.router_id, id.router_secret
            ),
        ),
        // A forwarded call: one byte of a declared 2 MB.
        (
            "forwarded",
            format!(
                "POST /api/block HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 2000000\r\n\r\n"
            ),
        ),
        // An admin call.
        (
            "admin",
            format!(
                "POST /api/admin/routers HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 1000\r\n\r\n"
            ),
        ),
    ];
    for (what, head) in cases {
        let (answer, took, mut s) = trickle(&relay, &head, b"{").await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{what}: {answer}");
        assert!(answer.contains("\"BODY_TIMEOUT\""), "{what}: {answer}");
        assert!(answer.contains("application/json"), "{what}: {answer}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(6),
            "{what}: answered after {took:?}"
        );
        // The rest of the body is never read: the connection closes.
        assert!(
            closed_within(&mut s, Duration::from_secs(5)).await.is_ok(),
            "{what}: connection kept after the body deadline"
        );
    }
    // Over HTTP/2 too: the stream gets the same answer.
    let tls = tls_connect(&relay, &[b"h2"]).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, ChannelBody>(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(Bytes::from_static(b"{")).await.unwrap();
    let req = hyper::Request::post("https://relay/api/admin/routers")
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .header("content-length", "1000")
        .body(ChannelBody(rx))
        .unwrap();
    sender.ready().await.unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("no answer to a trickled h2 body")
        .unwrap();
    let r = Reply::read(r).await.unwrap();
    assert_eq!(r.status, 408, "{}", r.body);
    assert_eq!(r.code(), "BODY_TIMEOUT");
    assert!(started.elapsed() < Duration::from_secs(6));
    drop(tx);
    let c = relay.client().await.unwrap();
    assert!(metric(&c, "netpilot_errors_total{code=\"BODY_TIMEOUT\"}").await >= 5);
}

#[tokio::test]
async fn oversized_headers_and_targets_get_the_envelope() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let c = relay.client().await.unwrap();
    // Under the caps: served.
    let ok_header = "a".repeat(12 * 1024);
    let r = c
        .call_with(
            "GET",
            "/health",
            None,
            None,
            &[("x-pad", ok_header.as_str())],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = c
        .get(&format!("/health?pad={}", "b".repeat(7 * 1024)))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // Over them, over HTTP/2: 431 and 414 in the envelope.
    let big = "a".repeat(20 * 1024);
    let r = c
        .call_with(
            "GET",
            "/api/admin/routers",
            None,
            None,
            &[("x-pad", big.as_str())],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 431, "{}", r.body);
    assert_eq!(r.code(), "HEADERS_TOO_LARGE");
    assert_eq!(r.body["success"], false);
    let r = c
        .get(&format!("/api/admin/routers?pad={}", "b".repeat(9 * 1024)))
        .await
        .unwrap();
    assert_eq!(r.status, 414, "{}", r.body);
    assert_eq!(r.code(), "URI_TOO_LONG");
    // And over HTTP/1.1.
    for (req, status, code) in [
        (
            format!("GET /health HTTP/1.1\r\nHost: relay\r\nX-Pad: {big}\r\n\r\n"),
            "431",
            "HEADERS_TOO_LARGE",
        ),
        (
            format!(
                "GET /health?pad={} HTTP/1.1\r\nHost: relay\r\n\r\n",
                "b".repeat(9 * 1024)
            ),
            "414",
            "URI_TOO_LONG",
        ),
    ] {
        let mut s = tls_connect(&relay, &[b"http/1.1"]).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(answer.contains(code), "{answer}");
    }
    // Past the HTTP layer's own limit the connection is refused without reading on.
    let mut s = tls_connect(&relay, &[b"http/1.1"]).await.unwrap();
    let huge = format!(
        "GET /health HTTP/1.1\r\nHost: relay\r\nX-Pad: {}\r\n\r\n",
        "c".repeat(200 * 1024)
    );
    let _ = s.write_all(huge.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(c.get("/health").await.unwrap().status, 200);
}

#[tokio::test]
async fn per_address_cap_counts_only_unauthenticated_connections() {
    const CAP: usize = 3;
    let relay = Relay::start(RelayOptions {
        config: format!(
            "[timeouts]\nhandshake = \"5s\"\n[limits]\nmax_unauthenticated_per_address = {CAP}\n"
        ),
    })
    .await
    .unwrap();
    // The admin client authenticates with its first call and stops counting.
    let c = relay.client().await.unwrap();
    assert_eq!(c.get("/health").await.unwrap().status, 200);
    let _ = c.get("/api/admin/routers").await.unwrap();
    // More routers than the cap, all behind this one address: each link counts
    // only until its upgrade is authenticated. Started one at a time, so no
    // agent's attempt falls on a moment when the others are still unauthenticated.
    let mut routers = Vec::new();
    let mut agents = Vec::new();
    for _ in 0..CAP + 2 {
        let router = relay.enrolled_router("alice").await.unwrap();
        agents.push(Agent::start(&router, &[]).await.unwrap());
        relay
            .wait_online(&router.router_id, true, Duration::from_secs(15))
            .await
            .unwrap();
        routers.push(router);
    }

    // Fill the cap with quiet connections from the same address.
    let mut quiet = Vec::new();
    for _ in 0..CAP {
        quiet.push(tls_connect(&relay, &[b"http/1.1"]).await.unwrap());
    }
    // One more, and a burst: dropped right after accept, long before the deadline.
    let refused_before = metric(
        &c,
        "netpilot_connections_refused_total{reason=\"per_address\"}",
    )
    .await;
    for i in 0..20 {
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        let started = Instant::now();
        assert!(
            closed_within(&mut s, Duration::from_secs(2)).await.is_ok(),
            "connection {} over the cap was accepted",
            CAP + 1 + i
        );
        // Well before the 5 s deadline: dropped at accept, not cut later.
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let refused = metric(
        &c,
        "netpilot_connections_refused_total{reason=\"per_address\"}",
    )
    .await;
    // Agents may have tried a report connection meanwhile: at least the 20.
    assert!(
        refused - refused_before >= 20,
        "{refused} - {refused_before}"
    );
    // The links and the authenticated admin connection are untouched.
    assert_eq!(c.get("/health").await.unwrap().status, 200);
    // (Asked on the admin connection: a new one would be over the cap.)
    for r in &routers {
        let a = c
            .get(&format!("/api/admin/routers/{}", r.router_id))
            .await
            .unwrap();
        assert_eq!(a.body["data"]["online"], true, "{}", a.body);
    }
    assert_eq!(
        metric(&c, "netpilot_link_connects_total ").await,
        (CAP + 2) as u64
    );
    // The log says so, but not once per connection.
    let lines = relay
        .log()
        .lines()
        .filter(|l| l.contains("per-address limit"))
        .count();
    assert!(
        (1..=4).contains(&lines),
        "{lines} limit lines for 20 refusals"
    );

    // Once the quiet ones reach the deadline, new connections are served again.
    for s in quiet.iter_mut() {
        assert!(closed_within(s, Duration::from_secs(10)).await.is_ok());
    }
    let fresh = eventually(
        Duration::from_secs(5),
        "a new connection served",
        || async {
            Client::connect(relay.addr, &relay.fingerprint, API_KEY)
                .await
                .ok()
        },
    )
    .await
    .unwrap();
    assert_eq!(fresh.get("/health").await.unwrap().status, 200);
}

#[tokio::test]
async fn quiet_connections_filling_every_slot_do_not_lock_out_health() {
    // The issue's measured attack: 100 slots filled by quiet connections refused
    // /health to everyone, for good. The per-address cap is lifted to show the
    // deadline alone gives the slots back.
    let relay = Relay::start(RelayOptions {
        config: "[timeouts]\nhandshake = \"3s\"\n[limits]\nmax_connections = 100\nmax_unauthenticated_per_address = 1000\n".into(),
    })
    .await
    .unwrap();
    let pid = relay.pid().unwrap();
    // A baseline before any client connection: the attack leaves nothing behind.
    eventually(Duration::from_secs(5), "the relay settled", || async {
        (open_fds(pid) > 0).then_some(())
    })
    .await
    .unwrap();
    let baseline = open_fds(pid);
    let mut quiet = Vec::new();
    for _ in 0..100 {
        quiet.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    // Every slot is taken: one more is dropped at once (well before the 3 s deadline).
    let mut extra = TcpStream::connect(relay.addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_millis(1500))
        .await
        .is_ok());
    // After the deadline /health answers again.
    let c = eventually(Duration::from_secs(10), "/health served again", || async {
        let c = Client::connect(relay.addr, &relay.fingerprint, API_KEY)
            .await
            .ok()?;
        (c.get("/health").await.ok()?.status == 200).then_some(c)
    })
    .await
    .unwrap();
    for s in quiet.iter_mut() {
        assert!(closed_within(s, Duration::from_secs(5)).await.is_ok());
    }
    assert!(
        metric(
            &c,
            "netpilot_connections_refused_total{reason=\"max_connections\"}"
        )
        .await
            >= 1
    );
    drop(c);
    drop(quiet);
    eventually(
        Duration::from_secs(5),
        "descriptors back to the baseline",
        || async { (open_fds(pid) <= baseline).then_some(()) },
    )
    .await
    .unwrap();
}

/// The issue's measurement, as printed figures: 500 quiet TLS connections from one
/// address, then how many are still open one second after the deadline, and the
/// relay's descriptors. Run it against any relay binary (`NETPILOT_RELAY_BIN`; the
/// config uses only `timeouts.handshake`, which every version knows), and with
/// `NETPILOT_MEASURE_CONFIG` appended to the config:
/// `cargo test -p netpilot-tests --test hostile_conn -- --ignored --nocapture measure`.
#[tokio::test]
#[ignore = "a measurement that prints figures; run by hand"]
async fn measure_500_quiet_connections() {
    let extra = std::env::var("NETPILOT_MEASURE_CONFIG").unwrap_or_default();
    let relay = Relay::start(RelayOptions {
        config: format!("[timeouts]\nhandshake = \"2s\"\n{extra}"),
    })
    .await
    .unwrap();
    let pid = relay.pid().unwrap();
    let before = open_fds(pid);
    let started = Instant::now();
    let mut conns = Vec::new();
    let mut refused = 0;
    for _ in 0..500 {
        match tls_connect(&relay, &[b"http/1.1"]).await {
            Ok(s) => conns.push(s),
            Err(_) => refused += 1,
        }
    }
    let peak = open_fds(pid);
    let opened_in = started.elapsed();
    // Deadline + 1 s from the last connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut open = 0;
    for s in conns.iter_mut() {
        if closed_within(s, Duration::from_millis(5)).await.is_err() {
            open += 1;
        }
    }
    let after = open_fds(pid);
    println!(
        "500 quiet TLS connections: {} completed TLS, {refused} refused, opened in {opened_in:?}; \
         still open at deadline + 1 s: {open}; relay fds before {before}, at peak {peak}, after {after}",
        conns.len()
    );
}
