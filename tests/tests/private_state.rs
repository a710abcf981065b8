//! What the relay and the agent keep on disk is theirs alone, and a broken stored
//! identity cannot crash-loop the agent. With the umask most systems have (022):
//! the relay's data directory is 0700 and its registry and key 0600; the agent's
//! state directory is 0700 and its database (which holds the previous Wi-Fi
//! passphrase while a change is pending) 0600; installs left looser are tightened
//! at the next start, with a log line. An identity the relay would never issue —
//! from a relay's answer or a corrupted file — is refused with a message that says
//! how to recover, and the agent stays up, idle, until the router is enrolled again.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use netpilot_tests::{enroll, eventually, Agent, ApiRig, EnrolledRouter, Relay, RelayOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The umask of a default system, for this test process and the binaries it
/// starts (children inherit it); every test here sets the same one.
fn default_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Each path's mode, for one readable assertion.
fn modes(paths: &[&Path]) -> Vec<(String, String)> {
    paths
        .iter()
        .map(|p| (p.display().to_string(), format!("{:04o}", mode(p))))
        .collect()
}

fn expect(paths: &[(&Path, u32)]) {
    let want: Vec<(String, String)> = paths
        .iter()
        .map(|(p, m)| (p.display().to_string(), format!("{m:04o}")))
        .collect();
    let ps: Vec<&Path> = paths.iter().map(|(p, _)| *p).collect();
    assert_eq!(modes(&ps), want);
}

#[tokio::test]
async fn the_relays_data_is_private_and_a_loose_install_is_tightened() {
    default_umask();
    let mut relay = Relay::start(RelayOptions::default()).await.unwrap();
    let data = relay.data_dir.clone();
    let (db, key) = (
        data.join("registry.sqlite3"),
        data.join("tls/relay-key.pem"),
    );
    expect(&[
        (&data, 0o700),
        (&data.join("tls"), 0o700),
        (&db, 0o600),
        (&key, 0o600),
    ]);
    // Written to: SQLite's WAL file takes the database's mode.
    relay.create_router("alice", "home").await.unwrap();
    expect(&[(&data.join("registry.sqlite3-wal"), 0o600)]);

    // A data directory from a relay before this rule.
    relay.kill().await;
    for (p, m) in [(&data, 0o755), (&db, 0o644), (&key, 0o644)] {
        chmod(p, m);
    }
    relay.restart().await.unwrap();
    expect(&[(&data, 0o700), (&db, 0o600), (&key, 0o600)]);
    assert!(
        relay.log().contains("tightened permissions"),
        "no log line says so: {}",
        relay.log()
    );
    // And it still serves from the same registry.
    let c = relay.client().await.unwrap();
    assert_eq!(c.get("/api/admin/routers").await.unwrap().status, 200);
}

#[tokio::test]
async fn the_agents_state_is_private_and_a_loose_install_is_tightened() {
    default_umask();
    let mut rig = ApiRig::simulated().await.unwrap();
    let state = rig.router.state_dir.clone();
    let db = state.join("state.sqlite3");
    let wal = state.join("state.sqlite3-wal");
    expect(&[
        (&state, 0o700),
        (&state.join("identity.json"), 0o600),
        (&db, 0o600),
        (&wal, 0o600),
        (&state.join("state.sqlite3-shm"), 0o600),
    ]);

    // A state directory from an agent before this rule.
    rig.agent.kill().await;
    let identity = state.join("identity.json");
    for (p, m) in [
        (&state, 0o755),
        (&db, 0o644),
        (&wal, 0o644),
        (&identity, 0o644),
    ] {
        chmod(p, m);
    }
    rig.restart_agent().await.unwrap();
    expect(&[
        (&state, 0o700),
        (&db, 0o600),
        (&wal, 0o600),
        (&identity, 0o600),
    ]);
    let log = agent_log(&rig.router);
    assert_eq!(
        log.matches("tightened permissions").count(),
        4,
        "one line per path: {log}"
    );
}

fn agent_log(router: &EnrolledRouter) -> String {
    std::fs::read_to_string(router.state_dir.parent().unwrap().join("agent.log"))
        .unwrap_or_default()
}

#[tokio::test]
async fn a_corrupt_identity_leaves_the_agent_idle_with_a_clear_message() {
    default_umask();
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let file = router.state_dir.join("identity.json");
    let good = std::fs::read(&file).unwrap();
    let mut broken: Value = serde_json::from_slice(&good).unwrap();
    // A secret no header can carry: before, the link panicked building its request
    // (and a release build, which aborts on panic, went down at every respawn).
    broken["router_secret"] = json!("5ec7e7\nnot hex");
    std::fs::write(&file, broken.to_string()).unwrap();

    let agent = Agent::start_waiting(&router, &["--simulate", "--identity-poll", "100ms"])
        .await
        .unwrap();
    let pid = agent.pid().unwrap();
    let log = eventually(Duration::from_secs(10), "the identity refused", || async {
        let log = agent_log(&router);
        log.contains("identity unusable").then_some(log)
    })
    .await
    .unwrap();
    assert!(
        log.contains("router_secret is not 64 lowercase hex digits")
            && log.contains("netpilot-agent enroll --force"),
        "the message says what is wrong and how to recover: {log}"
    );
    assert!(!log.contains("5ec7e7"), "the secret is never logged: {log}");
    // Still running (not a respawn loop), having looked again a few times.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert!(!stat.contains(") Z "), "the agent exited: {stat}");
    let log = agent_log(&router);
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(
        log.matches("identity unusable").count(),
        1,
        "said once: {log}"
    );

    // Enrolled again (here: the good file back), it goes online without a restart.
    std::fs::write(&file, &good).unwrap();
    relay
        .wait_online(&router.router_id, true, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn enrollment_refuses_an_identity_the_relay_should_never_issue() {
    default_umask();
    // A relay (its TLS identity, from the relay's own code) that answers enrollment
    // with a secret no header can carry.
    let dir = tempfile::tempdir().unwrap();
    let tls = netpilot_relay::tls::load_or_create(None, None, dir.path(), &[]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        // The head and the small JSON body arrive together or soon after.
        while !String::from_utf8_lossy(&got).contains("\"token\"") {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "request cut short");
            got.extend_from_slice(&chunk[..n]);
        }
        let identity = netpilot_proto::link::EnrollResponse {
            router_id: "0b7c3a5e-0000-4000-8000-000000000001".into(),
            router_secret: "ab\ncd".into(),
            name: "home".into(),
        };
        let body = serde_json::to_string(&netpilot_proto::Envelope::ok(
            identity,
            netpilot_proto::Meta {
                duration_ms: 0,
                request_id: None,
            },
        ))
        .unwrap();
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await.unwrap();
        s.shutdown().await.ok();
    });
    let state = dir.path().join("state");
    let out = enroll(
        &format!("https://127.0.0.1:{}", addr.port()),
        "any-token",
        &tls.fingerprint,
        &state,
    )
    .await
    .unwrap();
    server.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "enrollment succeeded: {stderr}");
    assert!(
        stderr.contains("answer is unusable") && stderr.contains("router_secret"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !state.join("identity.json").exists(),
        "nothing is stored from a bad answer"
    );
}
