//! Sessions through the real relay: lifecycle, idle expiry with shortened timeouts,
//! router attachment, and isolation between users.

use std::time::Duration;

use netpilot_tests::{eventually, q, session_id, ApiRig, Relay, RelayOptions, Session};
use serde_json::json;

const SHORT: &str =
    "[timeouts]\nsession_idle = \"600ms\"\nrouter_idle = \"300ms\"\nsweep_interval = \"50ms\"\n";

#[tokio::test]
async fn lifecycle_start_status_refresh_end() {
    let rig = ApiRig::simulated().await.unwrap();
    let router = &rig.router;
    let c = rig.relay.client().await.unwrap();

    let sid = session_id();
    let r = c
        .post(
            "/api/session/start",
            json!({"sessionId": sid, "userId": "alice", "routerId": router.router_id}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let d = &r.body["data"];
    assert_eq!(d["session_id"], json!(sid));
    assert_eq!(d["router_reachable"], json!(true));
    // The agent's own answer (its start-up check may still be running); groups.rs
    // checks it turns true once the policy is in force.
    assert!(d["infrastructure_ready"].is_boolean(), "{d}");
    assert!(d["message"].is_string());
    assert_eq!(r.body["success"], json!(true));
    assert!(r.body["meta"]["duration_ms"].is_u64());

    let r = c
        .get(&format!("/api/session/status?sessionId={sid}"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["user_id"], json!("alice"));
    assert_eq!(
        r.body["data"]["routers"][0]["router_id"],
        json!(router.router_id)
    );
    assert_eq!(r.body["data"]["routers"][0]["online"], json!(true));

    let r = c
        .post("/api/session/refresh", json!({"sessionId": sid}))
        .await
        .unwrap();
    assert_eq!(
        r.body["data"]["message"],
        json!(format!("Session {sid} refreshed"))
    );

    // An explicit null routerId is a client bug, not "end the whole session".
    let r = c
        .post(
            "/api/session/end",
            json!({"sessionId": sid, "routerId": null}),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.code()),
        (400, "INVALID_PARAMETER"),
        "{}",
        r.body
    );
    let r = c
        .get(&q("/api/scan/router", &sid, &router.router_id))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "the session must still be there: {}", r.body);

    let r = c
        .post("/api/session/end", json!({"sessionId": sid}))
        .await
        .unwrap();
    assert_eq!(r.body["data"]["message"], json!("Session ended"));
    // End is immediate.
    let r = c
        .get(&q("/api/scan/router", &sid, &router.router_id))
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (401, "SESSION_INVALID"));
}

#[tokio::test]
async fn start_without_router_and_with_offline_router() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let c = relay.client().await.unwrap();
    let r = c
        .post(
            "/api/session/start",
            json!({"sessionId": session_id(), "userId": "alice"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["router_reachable"], json!(false));
    let r = c
        .post(
            "/api/session/start",
            json!({"sessionId": session_id(), "userId": "alice", "routerId": router.router_id}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["router_reachable"], json!(false));
    assert!(r.body["data"]["message"]
        .as_str()
        .unwrap()
        .contains("offline"));
}

#[tokio::test]
async fn idle_session_expires_and_its_calls_get_401() {
    let rig = ApiRig::builder().relay_config(SHORT).start().await.unwrap();
    let alice = rig.session("alice").await.unwrap();
    let (c, sid) = (&alice.client, &alice.id);
    assert_eq!(alice.get("/api/scan/router").await.status, 200);
    // The sweeper removes it once idle; metrics show the count dropping to zero.
    eventually(Duration::from_secs(5), "the session to expire", || async {
        let m = c.get("/metrics").await.ok()?;
        String::from_utf8_lossy(&m.raw)
            .contains("netpilot_active_sessions 0\n")
            .then_some(())
    })
    .await
    .unwrap();
    let r = alice.get("/api/scan/router").await;
    assert_eq!((r.status, r.code()), (401, "SESSION_INVALID"));
    let r = c
        .post("/api/session/refresh", json!({"sessionId": sid}))
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (401, "SESSION_INVALID"));
}

#[tokio::test]
async fn idle_router_detaches_and_the_next_call_reattaches() {
    let rig = ApiRig::builder().relay_config(SHORT).start().await.unwrap();
    let alice = rig.session("alice").await.unwrap();
    let (c, sid) = (&alice.client, &alice.id);
    // Keep the session alive with refreshes (not router calls) until the router detaches.
    eventually(Duration::from_secs(5), "the router to detach", || async {
        c.post("/api/session/refresh", json!({"sessionId": sid}))
            .await
            .ok()?;
        let r = c
            .get(&format!("/api/session/status?sessionId={sid}"))
            .await
            .ok()?;
        r.body["data"]["routers"]
            .as_array()?
            .is_empty()
            .then_some(())
    })
    .await
    .unwrap();
    assert_eq!(alice.get("/api/scan/router").await.status, 200);
    let r = c
        .get(&format!("/api/session/status?sessionId={sid}"))
        .await
        .unwrap();
    assert_eq!(r.body["data"]["routers"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_session_reaches_only_its_users_routers() {
    let rig = ApiRig::simulated().await.unwrap();
    let a = &rig.router;
    let c = rig.relay.client().await.unwrap();

    let bob = Session::start(&c, "bob", &a.router_id).await;
    assert!(
        bob.is_err(),
        "bob may not start a session on alice's router"
    );
    let bob_sid = session_id();
    let r = c
        .post(
            "/api/session/start",
            json!({"sessionId": bob_sid, "userId": "bob"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = c
        .get(&q("/api/scan/router", &bob_sid, &a.router_id))
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    let r = c
        .post(
            "/api/block",
            json!({"sessionId": bob_sid, "routerId": a.router_id, "mac": "02:00:00:00:01:01"}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));

    // Bob cannot take over alice's session id either.
    let alice = Session::start(&c, "alice", &a.router_id).await.unwrap();
    let r = c
        .post(
            "/api/session/start",
            json!({"sessionId": alice.id, "userId": "bob", "restart": true}),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    assert_eq!(alice.get("/api/scan/router").await.status, 200);
}

#[tokio::test]
async fn user_ids_may_be_any_text() {
    let rig = ApiRig::builder()
        .owner("ユーザー 42")
        .start()
        .await
        .unwrap();
    let user = rig.session("ユーザー 42").await.unwrap();
    let c = &user.client;
    let r = user.get("/api/scan/router").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = c
        .get(&format!(
            "/api/admin/routers?ownerUserId={}",
            "%E3%83%A6%E3%83%BC%E3%82%B6%E3%83%BC%2042"
        ))
        .await
        .unwrap();
    assert_eq!(r.body["data"]["total"], json!(1));
}

#[tokio::test]
async fn end_with_router_detaches_only_that_router() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let a = relay.enrolled_router("alice").await.unwrap();
    let c = relay.client().await.unwrap();
    let alice = Session::start(&c, "alice", &a.router_id).await.unwrap();
    let sid = &alice.id;
    let r = alice.post("/api/session/end", json!({})).await;
    assert_eq!(r.status, 200);
    let r = c
        .get(&format!("/api/session/status?sessionId={sid}"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body["data"]["routers"].as_array().unwrap().is_empty());
}
