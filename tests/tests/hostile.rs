//! Hostile and broken clients on the shared port: plain HTTP, garbage bytes, a TCP
//! client that never starts TLS, slow-loris headers, bogus link upgrades. Each gets a
//! clear 4xx or a closed connection, and the relay gives back every file descriptor.

use std::time::Duration;

use netpilot_tests::{eventually, Relay, RelayOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SHORT_HANDSHAKE: &str = "[timeouts]\nhandshake = \"300ms\"\n";

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Reads until EOF or error; returns what arrived, failing if the peer keeps it open.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    let r = tokio::time::timeout(within, async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "connection was not closed within {within:?}");
    buf
}

#[tokio::test]
async fn plain_http_and_garbage_are_dropped() {
    let relay = Relay::start(RelayOptions {
        config: SHORT_HANDSHAKE.into(),
    })
    .await
    .unwrap();
    for payload in [
        &b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"\x00\xff\x13\x37garbage garbage garbage\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff][..], // a TLS record header announcing 64 KiB, then nothing
    ] {
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        s.write_all(payload).await.unwrap();
        let got = read_until_closed(&mut s, Duration::from_secs(3)).await;
        // Nothing readable as HTTP comes back; at most a TLS alert record.
        assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1 200"));
    }
    // Still serving.
    let c = relay.client().await.unwrap();
    assert_eq!(c.get("/health").await.unwrap().status, 200);
}

#[tokio::test]
async fn silent_and_slow_clients_are_cut_and_leave_no_descriptors() {
    let relay = Relay::start(RelayOptions {
        config: SHORT_HANDSHAKE.into(),
    })
    .await
    .unwrap();
    let pid = relay.pid().unwrap();
    // Let the relay settle, then take the baseline.
    let c = relay.client().await.unwrap();
    assert_eq!(c.get("/health").await.unwrap().status, 200);
    let baseline = open_fds(pid);

    // 30 TCP clients that never start TLS.
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    // 10 TLS clients that send half a request and then trickle.
    let mut slow = Vec::new();
    for _ in 0..10 {
        let mut s = tls_connect(&relay).await;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    for s in silent.iter_mut() {
        read_until_closed(s, Duration::from_secs(3)).await;
    }
    for s in slow.iter_mut() {
        let _ = s.write_all(b"a").await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "slow-loris connection kept open");
    }
    drop(silent);
    drop(slow);
    eventually(
        Duration::from_secs(5),
        "descriptors back to the baseline",
        || async { (open_fds(pid) <= baseline).then_some(()) },
    )
    .await
    .unwrap();
    assert_eq!(c.get("/health").await.unwrap().status, 200);
}

#[tokio::test]
async fn bogus_link_upgrades_are_refused_with_json_errors() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let cases = [
        ("", "401"),                                        // no credentials
        ("Authorization: Bearer wrong\r\n", "401"),         // wrong secret
        ("Authorization: Bearer x\r\nX-Bad: 1\r\n", "401"), // still wrong
    ];
    for (extra, status) in cases {
        let req = format!(
            "GET /agent/v1/connect HTTP/1.1\r\nHost: relay\r\nConnection: upgrade\r\nUpgrade: netpilot-link/1\r\nx-netpilot-router-id: {}\r\n{extra}\r\n",
            router.router_id
        );
        let answer = raw_tls_request(&relay, &req).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(answer.contains("\"success\":false"), "{answer}");
    }
    let no_upgrade = format!(
        "GET /agent/v1/connect HTTP/1.1\r\nHost: relay\r\nx-netpilot-router-id: {}\r\n\r\n",
        router.router_id
    );
    assert!(raw_tls_request(&relay, &no_upgrade)
        .await
        .starts_with("HTTP/1.1 400"));
    let bad_id = "GET /agent/v1/connect HTTP/1.1\r\nHost: relay\r\nConnection: upgrade\r\nUpgrade: netpilot-link/1\r\nx-netpilot-router-id: 42\r\n\r\n";
    assert!(raw_tls_request(&relay, bad_id)
        .await
        .starts_with("HTTP/1.1 400"));
}

async fn tls_connect(relay: &Relay) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = netpilot_agent::link::tls::client_config(
        &netpilot_agent::link::tls::Trust::Fingerprint(relay.fingerprint.clone()),
    )
    .unwrap();
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Sends one HTTP/1.1 request over TLS with `Connection: close` semantics and
/// returns the raw answer.
async fn raw_tls_request(relay: &Relay, req: &str) -> String {
    let mut s = tls_connect(relay).await;
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let relay = Relay::start(RelayOptions {
        config: SHORT_HANDSHAKE.into(),
    })
    .await
    .unwrap();
    let mut s = tls_connect(&relay).await;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Then silence: the relay must not hold the connection forever.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "idle keep-alive connection kept open");
}
