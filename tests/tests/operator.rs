//! Operator-facing hardening on the real relay binary: the keyless metrics listener
//! (`metrics_listen`) serves `/metrics` and nothing else, cuts a silent client and
//! gives its descriptors back, while the shared port keeps `/metrics` behind the
//! API key.

use std::time::Duration;

use netpilot_tests::{eventually, Relay, RelayOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const METRICS_LISTENER: &str =
    "metrics_listen = \"127.0.0.1:0\"\n[timeouts]\nhandshake = \"300ms\"\n";

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends `request` on a fresh plain TCP connection and reads until the relay closes
/// it (failing the test if it does not within 5 s).
async fn plain_http(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the metrics listener closes the connection after one answer")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn metrics_listener_serves_metrics_without_a_key_and_nothing_else() {
    let relay = Relay::start(RelayOptions {
        config: METRICS_LISTENER.into(),
    })
    .await
    .unwrap();
    let at = relay
        .metrics_addr
        .expect("the ready line names the metrics listener");
    assert!(at.ip().is_loopback());
    assert_ne!(at.port(), relay.addr.port());

    let got = plain_http(at, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("text/plain; version=0.0.4"), "{got}");
    assert!(got.contains("netpilot_connected_agents 0"), "{got}");

    // The API is not reachable through the keyless listener, not even by path.
    let got = plain_http(at, "GET /api/admin/routers HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 404"), "{got}");
    assert!(!got.contains("netpilot_"), "{got}");
    let got = plain_http(
        at,
        "POST /metrics HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 405"), "{got}");

    // The shared port still wants the key.
    let c = relay.client().await.unwrap();
    let anon = c.with_key(None).get("/metrics").await.unwrap();
    assert_eq!((anon.status, anon.code()), (401, "UNAUTHORIZED"));
    assert_eq!(c.get("/metrics").await.unwrap().status, 200);
}

#[tokio::test]
async fn metrics_listener_cuts_silent_clients_and_gives_descriptors_back() {
    let relay = Relay::start(RelayOptions {
        config: METRICS_LISTENER.into(),
    })
    .await
    .unwrap();
    let at = relay.metrics_addr.unwrap();
    let pid = relay.pid().unwrap();
    let before = open_fds(pid);
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(at).await.unwrap());
    }
    // More than the listener serves at once (16) and all silent: each is cut at the
    // 300 ms header deadline, so the later ones get their turn and are cut too.
    for mut s in silent {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "a silent client was not cut: {r:?}"
        );
    }
    // And the listener still answers.
    let got = plain_http(at, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    eventually(Duration::from_secs(5), "descriptors given back", || async {
        (open_fds(pid) <= before).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {} open, {before} before", open_fds(pid)));
}

#[tokio::test]
async fn without_metrics_listen_there_is_no_second_port() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    assert_eq!(relay.metrics_addr, None);
}

/// A file holding `text` with `mode`, in `dir`.
fn key_file(dir: &std::path::Path, text: &str, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("api-key");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Whether `relay` accepts `key` as the API key, and refuses another.
async fn key_is(relay: &Relay, key: &str) {
    let c = netpilot_tests::Client::connect(relay.addr, &relay.fingerprint, key)
        .await
        .unwrap();
    let r = c.get("/api/admin/routers").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = c
        .with_key(Some("another-key-0123456789"))
        .get("/api/admin/routers")
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
}

const KEY: &str = "operator-key-0123456789abcdef";

#[tokio::test]
async fn an_api_key_on_the_command_line_works_with_a_warning() {
    let relay = Relay::start_with("", &["--api-key", KEY], &[])
        .await
        .unwrap();
    key_is(&relay, KEY).await;
    let log = relay.log();
    assert!(
        log.contains("WARN") && log.contains("given with --api-key"),
        "{log}"
    );
    assert!(!log.contains(KEY), "the key itself is logged: {log}");
}

#[tokio::test]
async fn an_api_key_file_is_read_trimmed_and_quietly() {
    let dir = tempfile::tempdir().unwrap();
    // From the command line, with the newline an editor or `echo` leaves.
    let path = key_file(dir.path(), &format!("{KEY}\n"), 0o600);
    let relay = Relay::start_with("", &["--api-key-file", &path], &[])
        .await
        .unwrap();
    key_is(&relay, KEY).await;
    let log = relay.log();
    assert!(!log.contains("WARN"), "{log}");
    assert!(
        log.contains("API key loaded") && log.contains("--api-key-file"),
        "{log}"
    );

    // From the config file; group-readable is fine (a deployment group).
    let path = key_file(dir.path(), &format!("{KEY}\r\n"), 0o640);
    let relay = Relay::start_with(&format!("api_key_file = {path:?}\n"), &[], &[])
        .await
        .unwrap();
    key_is(&relay, KEY).await;

    // The command line's file wins over the environment, which wins over the file's.
    let relay = Relay::start_with(
        "api_key = \"config-key-0123456789abcdef\"\n",
        &["--api-key-file", &path],
        &[("NETPILOT_API_KEY", "env-key-0123456789abcdef")],
    )
    .await
    .unwrap();
    key_is(&relay, KEY).await;
    let relay = Relay::start_with(
        "api_key = \"config-key-0123456789abcdef\"\n",
        &[],
        &[("NETPILOT_API_KEY", "env-key-0123456789abcdef")],
    )
    .await
    .unwrap();
    key_is(&relay, "env-key-0123456789abcdef").await;
}

#[tokio::test]
async fn a_key_file_other_users_may_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o644, 0o604, 0o602] {
        let path = key_file(dir.path(), &format!("{KEY}\n"), mode);
        let err = match Relay::start_with("", &["--api-key-file", &path], &[]).await {
            Ok(_) => panic!("the relay served with a key file of mode {mode:o}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("accessible to every user"), "{mode:o}: {err}");
        assert!(!err.contains(KEY), "{err}");
    }
    // Two keys on the command line: which one was meant is not guessed.
    let path = key_file(dir.path(), &format!("{KEY}\n"), 0o600);
    let err = Relay::start_with("", &["--api-key-file", &path, "--api-key", KEY], &[])
        .await
        .err()
        .expect("two command-line keys are refused")
        .to_string();
    assert!(err.contains("not both"), "{err}");
}
