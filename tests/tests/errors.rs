//! Every row of the DESIGN §4 error table, produced by the real relay, plus the
//! other refusals: bad input, unknown routes, wrong methods, oversized bodies,
//! wrong content types, and the agent's 501 for features that have not landed.

use std::time::Duration;

use bytes::Bytes;
use netpilot_tests::{q, session_id, ApiRig, Relay, RelayOptions, Session, API_KEY};
use serde_json::json;

#[tokio::test]
async fn status_400_for_bad_ids_and_json() {
    let rig = ApiRig::simulated().await.unwrap();
    let alice = rig.session("alice").await.unwrap();
    let (c, sid, rid) = (&alice.client, &alice.id, rig.router_id());
    let cases: Vec<(&str, String, Option<String>)> = vec![
        ("GET", format!("/api/scan/router?routerId={rid}"), None),
        ("GET", format!("/api/scan/router?sessionId={sid}"), None),
        (
            "GET",
            format!("/api/scan/router?sessionId=nope&routerId={rid}"),
            None,
        ),
        (
            "GET",
            format!("/api/scan/router?sessionId={sid}&routerId=12345"),
            None,
        ),
        (
            "POST",
            "/api/block".into(),
            Some(format!("{{\"sessionId\": \"{sid}\", \"routerId\": ")),
        ),
        ("POST", "/api/block".into(), Some("[1,2,3]".into())),
        (
            "POST",
            "/api/block".into(),
            Some(format!("{{\"sessionId\": 7, \"routerId\": \"{rid}\"}}")),
        ),
        (
            "POST",
            "/api/session/start".into(),
            Some(format!("{{\"sessionId\": \"{sid}\"}}")),
        ),
        (
            "POST",
            "/api/session/start".into(),
            Some(format!(
                "{{\"sessionId\": \"{sid}\", \"userId\": \"a\\nb\"}}"
            )),
        ),
        (
            "POST",
            "/api/admin/routers".into(),
            Some("{\"ownerUserId\": \"\", \"name\": \"x\"}".into()),
        ),
        (
            "GET",
            format!("/api/groups/abc?sessionId={sid}&routerId={rid}"),
            None,
        ),
        ("DELETE", "/api/admin/routers/not-a-uuid".into(), None),
    ];
    for (method, path, body) in cases {
        let r = c
            .call(
                method,
                &path,
                body.map(Bytes::from),
                Some("application/json"),
            )
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.code()),
            (400, "INVALID_PARAMETER"),
            "{method} {path}: {}",
            r.body
        );
        assert_eq!(r.body["success"], json!(false));
        assert!(!r.body["error"]["message"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn status_401_for_api_key_and_session() {
    let rig = ApiRig::simulated().await.unwrap();
    let c = rig.relay.client().await.unwrap();
    let path = q("/api/scan/router", &session_id(), rig.router_id());
    // A wrong key, an empty one, and the real key cut short or extended by one
    // character: all refused alike.
    let short = &API_KEY[..API_KEY.len() - 1];
    let long = format!("{API_KEY}0");
    for key in [
        None,
        Some("wrong-key-0123456789abcdef"),
        Some(""),
        Some(short),
        Some(long.as_str()),
    ] {
        let r = c.with_key(key).get(&path).await.unwrap();
        assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "{key:?}");
        let r = c.with_key(key).get("/api/admin/routers").await.unwrap();
        assert_eq!(r.status, 401);
    }
    let r = c.get(&path).await.unwrap();
    assert_eq!((r.status, r.code()), (401, "SESSION_INVALID"));
}

#[tokio::test]
async fn status_403_and_404_for_ownership_and_unknown_routers() {
    let rig = ApiRig::simulated().await.unwrap();
    let c = rig.relay.client().await.unwrap();
    let bob = session_id();
    c.post(
        "/api/session/start",
        json!({"sessionId": bob, "userId": "bob"}),
    )
    .await
    .unwrap();
    let r = c
        .get(&q("/api/scan/router", &bob, rig.router_id()))
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    let unknown = uuid::Uuid::new_v4().to_string();
    let r = c.get(&q("/api/scan/router", &bob, &unknown)).await.unwrap();
    assert_eq!((r.status, r.code()), (404, "ROUTER_NOT_FOUND"));
    let r = c
        .get(&format!("/api/admin/routers/{unknown}"))
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (404, "ROUTER_NOT_FOUND"));
    let r = c
        .delete(&format!("/api/admin/routers/{unknown}"))
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (404, "ROUTER_NOT_FOUND"));
}

#[tokio::test]
async fn status_408_when_the_router_does_not_answer_in_time() {
    // A router whose hostname file never yields: a FIFO nobody writes to blocks the
    // read, so the agent genuinely does not answer within the relay's timeout.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("proc/sys/kernel")).unwrap();
    let fifo = root.path().join("proc/sys/kernel/hostname");
    mkfifo(&fifo);
    let root_arg = root.path().to_str().unwrap().to_owned();
    let rig = ApiRig::builder()
        .relay_config("[timeouts]\ncommand = \"300ms\"\n")
        .agent_args(&["--root", &root_arg])
        .start()
        .await
        .unwrap();
    let alice = rig.session("alice").await.unwrap();
    let started = std::time::Instant::now();
    let r = alice.get("/api/scan/router").await;
    assert_eq!((r.status, r.code()), (408, "COMMAND_TIMEOUT"), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The link survives a timed-out call.
    let r = alice.get("/api/agent/health").await;
    assert_eq!(r.status, 200);
}

fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn status_503_when_the_router_is_not_connected() {
    let relay = Relay::start(RelayOptions::default()).await.unwrap();
    let router = relay.enrolled_router("alice").await.unwrap();
    let alice = Session::start(&relay.client().await.unwrap(), "alice", &router.router_id)
        .await
        .unwrap();
    let r = alice.get("/api/scan/router").await;
    assert_eq!((r.status, r.code()), (503, "ROUTER_OFFLINE"));
}

#[tokio::test]
async fn unknown_routes_methods_bodies_and_content_types() {
    let rig = ApiRig::builder()
        .relay_config("[limits]\nmax_body_bytes = 4096\n")
        .start()
        .await
        .unwrap();
    let alice = rig.session("alice").await.unwrap();
    let (c, sid, rid) = (&alice.client, &alice.id, rig.router_id());

    let r = alice.get("/api/does-not-exist").await;
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"));
    let r = c.get("/nothing-here").await.unwrap();
    assert_eq!((r.status, r.code()), (404, "NOT_FOUND"));
    // A path that only starts like the admin routes is not one of them.
    for path in ["/api/admin/routersXYZ", "/api/admin/routers-x/1"] {
        let r = c.get(path).await.unwrap();
        assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{path}");
    }

    let r = alice.post("/api/scan", json!({})).await;
    assert_eq!((r.status, r.code()), (405, "METHOD_NOT_ALLOWED"));
    assert_eq!(r.headers.get("allow").unwrap(), "GET");
    let r = c.get("/api/session/start").await.unwrap();
    assert_eq!(r.status, 405);

    let big = format!(
        "{{\"sessionId\": \"{sid}\", \"routerId\": \"{rid}\", \"pad\": \"{}\"}}",
        "x".repeat(8192)
    );
    let r = c
        .call(
            "POST",
            "/api/block",
            Some(Bytes::from(big)),
            Some("application/json"),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (413, "PAYLOAD_TOO_LARGE"));

    let body = format!("sessionId={sid}&routerId={rid}");
    let r = c
        .call(
            "POST",
            "/api/block",
            Some(Bytes::from(body)),
            Some("application/x-www-form-urlencoded"),
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (415, "UNSUPPORTED_MEDIA_TYPE"));
    let r = c
        .call("POST", "/api/block", Some(Bytes::from("{}")), None)
        .await
        .unwrap();
    assert_eq!(r.status, 415);
    // A JSON content type with parameters is fine.
    let r = c
        .call(
            "POST",
            "/api/block",
            Some(Bytes::from(
                json!({"sessionId": sid, "routerId": rid}).to_string(),
            )),
            Some("application/json; charset=utf-8"),
        )
        .await
        .unwrap();
    // Forwarded: the agent itself answers that the body names no device.
    assert_eq!((r.status, r.code()), (400, "INVALID_TARGET"), "{}", r.body);
}

#[tokio::test]
async fn every_forwarded_route_reaches_the_agent() {
    let rig = ApiRig::simulated().await.unwrap();
    let alice = rig.session("alice").await.unwrap();
    for route in netpilot_proto::routes::ROUTES {
        let path = route
            .pattern
            .replace("{id}", "3")
            .replace("{mac}", "aa:bb:cc:dd:ee:ff")
            .replace("{name}", "social");
        let method = route.method.as_str();
        let r = if route.method.has_body() {
            alice.send(method, &path, json!({})).await
        } else {
            alice
                .client
                .call(method, &alice.q(&path), None, None)
                .await
                .unwrap()
        };
        // With only the ids, each built route answers from the agent with what it
        // makes of an empty call.
        let expect = match (method, route.pattern) {
            (_, "/api/agent/health" | "/api/scan/router" | "/api/scan") => Some((200, "")),
            ("GET", "/api/groups" | "/api/infrastructure/status" | "/api/blocked")
            | ("GET", "/api/whitelist" | "/api/blacklist")
            | ("POST", "/api/reset") => Some((200, "")),
            ("GET", "/api/speedtest") => Some((200, "")),
            // Wi-Fi: status; enable is already in effect (nothing applied); disable
            // applies (pending); ssid and password without a value are refused.
            ("GET", "/api/wifi/status") | ("POST", "/api/wifi/enable" | "/api/wifi/disable") => {
                Some((200, ""))
            }
            ("POST", "/api/wifi/ssid") => Some((400, "INVALID_SSID")),
            ("POST", "/api/wifi/password") => Some((400, "INVALID_PASSWORD")),
            ("GET" | "DELETE", "/api/groups/{id}") => Some((404, "GROUP_NOT_FOUND")),
            ("GET", "/api/device-usage/device/{mac}") => Some((404, "DEVICE_NOT_FOUND")),
            (_, p) if p.starts_with("/api/device-usage/") => Some((200, "")),
            ("POST", "/api/groups/sync") => Some((400, "INVALID_GROUP")),
            ("POST", "/api/groups/sync-all") => Some((400, "INVALID_PARAMETER")),
            ("PUT", "/api/groups/{id}/policy") => Some((400, "UNKNOWN_GROUP")),
            // DNS categories: the list, a shipped category; a replacement without a
            // list (neither `domains` nor `list`) is refused.
            ("GET", "/api/dns/categories" | "/api/dns/categories/{name}") => Some((200, "")),
            ("PUT", "/api/dns/categories/{name}") => Some((400, "INVALID_PARAMETER")),
            // An empty call names the route's own example category, which is shipped
            // and unmodified: nothing to put back, nothing changes.
            ("DELETE", "/api/dns/categories/{name}") => Some((200, "")),
            ("POST", "/api/block" | "/api/unblock")
            | ("POST", "/api/whitelist/add" | "/api/whitelist/remove")
            | ("POST", "/api/blacklist/add" | "/api/blacklist/remove") => {
                Some((400, "INVALID_TARGET"))
            }
            _ => None,
        };
        match expect {
            Some((status, code)) => {
                assert_eq!(
                    (r.status, r.code()),
                    (status, code),
                    "{method} {path}: {}",
                    r.body
                );
                assert_eq!(r.body["success"], json!(status == 200));
            }
            None => {
                // Not built yet: the agent says so, and the relay passes it through.
                assert_eq!(
                    (r.status, r.code()),
                    (501, "NOT_IMPLEMENTED"),
                    "{method} {path}: {}",
                    r.body
                );
            }
        }
        assert!(r.headers.contains_key("x-request-id"));
    }
}

#[tokio::test]
async fn request_ids_are_propagated_to_the_agent_and_back() {
    let rig = ApiRig::simulated().await.unwrap();
    let alice = rig.session("alice").await.unwrap();
    let r = alice
        .client
        .call_with(
            "GET",
            &alice.q("/api/agent/health"),
            None,
            None,
            &[("x-request-id", "trace-42")],
        )
        .await
        .unwrap();
    assert_eq!(r.headers.get("x-request-id").unwrap(), "trace-42");
    assert_eq!(r.body["meta"]["request_id"], json!("trace-42"));
    assert_eq!(r.body["data"]["router_id"], json!(rig.router_id()));
    assert_eq!(r.body["data"]["mode"], json!("simulated"));
}
