//! Enrollment end to end with the real binaries: a valid token works once, a reused,
//! expired or made-up token is refused with its own code, attempts are rate-limited,
//! and only a hash of the router secret reaches the relay's database.

use netpilot_tests::{enroll, Relay, RelayOptions};
use serde_json::json;

#[tokio::test]
async fn valid_token_enrolls_and_stores_a_private_identity() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let (router_id, token) = relay.create_router("alice", "home").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = enroll(&relay.url(), &token, &relay.fingerprint, &state)
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&router_id));

    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("identity.json")).unwrap()).unwrap();
    assert_eq!(identity["router_id"], json!(router_id));
    let secret = identity["router_secret"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 64);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("identity.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The relay keeps neither the token nor the secret in clear.
    let db = std::fs::read(relay.data_dir.join("registry.sqlite3")).unwrap();
    let wal = std::fs::read(relay.data_dir.join("registry.sqlite3-wal")).unwrap_or_default();
    for needle in [secret.as_bytes(), token.as_bytes()] {
        assert!(
            !contains(&db, needle) && !contains(&wal, needle),
            "a secret is stored in clear"
        );
    }

    let c = relay.client().await.unwrap();
    let r = c
        .get(&format!("/api/admin/routers/{router_id}"))
        .await
        .unwrap();
    assert_eq!(r.body["data"]["enrolled"], json!(true));
    assert_eq!(r.body["data"]["online"], json!(false));
}

#[tokio::test]
async fn reused_token_is_refused_and_first_identity_kept() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let (_, token) = relay.create_router("alice", "home").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = enroll(
        &relay.url(),
        &token,
        &relay.fingerprint,
        &dir.path().join("a"),
    )
    .await
    .unwrap();
    assert!(first.status.success());
    let second = enroll(
        &relay.url(),
        &token,
        &relay.fingerprint,
        &dir.path().join("b"),
    )
    .await
    .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("TOKEN_USED"), "{err}");
    assert!(!dir.path().join("b/identity.json").exists());
}

#[tokio::test]
async fn expired_token_is_refused() {
    let relay = Relay::start(RelayOptions {
        config: "[enrollment]\ntoken_ttl = \"300ms\"\n".into(),
    })
    .await
    .unwrap();
    let (_, token) = relay.create_router("alice", "home").await.unwrap();
    // Waiting for time to pass is the point of this test, not a synchronisation.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let dir = tempfile::tempdir().unwrap();
    let out = enroll(&relay.url(), &token, &relay.fingerprint, dir.path())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOKEN_EXPIRED"));
}

#[tokio::test]
async fn unknown_and_malformed_tokens_are_invalid() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for token in ["00".repeat(32), "not-a-token".to_owned()] {
        let out = enroll(&relay.url(), &token, &relay.fingerprint, dir.path())
            .await
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("TOKEN_INVALID"));
    }
}

#[tokio::test]
async fn wrong_fingerprint_never_sends_the_token() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let (_, token) = relay.create_router("alice", "home").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = enroll(
        &relay.url(),
        &token,
        &"ab".repeat(32),
        &dir.path().join("x"),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pinned fingerprint"));
    // The token is still unused.
    let ok = enroll(
        &relay.url(),
        &token,
        &relay.fingerprint,
        &dir.path().join("y"),
    )
    .await
    .unwrap();
    assert!(ok.status.success());
}

#[tokio::test]
async fn enrollment_attempts_are_rate_limited() {
    let relay = Relay::start(RelayOptions {
        config: "[enrollment]\nper_minute = 3\n".into(),
    })
    .await
    .unwrap();
    let c = relay.client().await.unwrap().with_key(None);
    let mut codes = Vec::new();
    for _ in 0..5 {
        let r = c
            .post("/agent/v1/enroll", json!({"token": "00".repeat(32)}))
            .await
            .unwrap();
        codes.push((r.status, r.code().to_owned()));
    }
    assert_eq!(
        codes[..3],
        [
            (401, "TOKEN_INVALID".to_owned()),
            (401, "TOKEN_INVALID".to_owned()),
            (401, "TOKEN_INVALID".to_owned())
        ]
    );
    assert_eq!(codes[3], (429, "RATE_LIMITED".to_owned()));
}

/// The limiter on the real relay counts each client address on its own, and its
/// table is bounded: with room for two clients, both inside their minute, a third
/// is refused at once (fail-closed) while the two keep their own allowance.
#[tokio::test]
async fn the_enrollment_limit_counts_each_client_and_its_table_is_bounded() {
    let relay = Relay::start(RelayOptions {
        config: "[enrollment]\nper_minute = 2\nmax_clients = 2\n".into(),
    })
    .await
    .unwrap();
    let from = |last: u8| {
        let ip = std::net::IpAddr::from([127, 0, 0, last]);
        netpilot_tests::Client::connect_from(ip, relay.addr, &relay.fingerprint, None)
    };
    let attempt = |c: netpilot_tests::Client| async move {
        let r = c
            .post("/agent/v1/enroll", json!({"token": "00".repeat(32)}))
            .await
            .unwrap();
        (r.status, r.code().to_owned())
    };
    let invalid = (401, "TOKEN_INVALID".to_owned());
    let limited = (429, "RATE_LIMITED".to_owned());
    let a = from(2).await.unwrap();
    let b = from(3).await.unwrap();
    assert_eq!(attempt(a.clone()).await, invalid);
    assert_eq!(attempt(a.clone()).await, invalid);
    assert_eq!(attempt(a.clone()).await, limited);
    // Another address is another client, with its own allowance.
    assert_eq!(attempt(b.clone()).await, invalid);
    // The table is full (two clients inside their minute): a newcomer is refused
    // before its first attempt counts, on a new connection or not.
    assert_eq!(attempt(from(4).await.unwrap()).await, limited);
    assert_eq!(attempt(from(5).await.unwrap()).await, limited);
    // Those already counted keep what they had.
    assert_eq!(attempt(b.clone()).await, invalid);
    assert_eq!(attempt(b).await, limited);
}

#[tokio::test]
async fn re_enrollment_with_a_fresh_token_replaces_the_secret() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let c = relay.client().await.unwrap();
    let r = c
        .post(
            &format!("/api/admin/routers/{}/token", router.router_id),
            json!({}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.body["data"]["enrollment_token"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = enroll(&relay.url(), token, &relay.fingerprint, dir.path())
        .await
        .unwrap();
    assert!(out.status.success());
    let new: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("identity.json")).unwrap()).unwrap();
    assert_eq!(new["router_id"], json!(router.router_id));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn an_unwritable_state_directory_fails_before_the_token_is_spent() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let (_, token) = relay.create_router("alice", "home").await.unwrap();
    // /proc refuses new files, as a full or read-only flash would.
    let out = enroll(
        &relay.url(),
        &token,
        &relay.fingerprint,
        std::path::Path::new("/proc/netpilot-state"),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/proc/netpilot-state"));
    let dir = tempfile::tempdir().unwrap();
    let ok = enroll(&relay.url(), &token, &relay.fingerprint, dir.path())
        .await
        .unwrap();
    assert!(ok.status.success(), "the token must still be unused");
}
