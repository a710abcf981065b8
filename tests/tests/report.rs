//! `POST /agent/v1/report` against the real relay binary, sent by the agent's own
//! `RelayReporter` (the code the agent runs) with the identity a real enrollment
//! stored: accepted and then visible in the admin router view and in `/metrics`;
//! refused with a wrong secret (401), for a revoked router (403) and for a body that
//! is not a report (400), each with the relay's error code.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use netpilot_agent::link::dial::{RelayAddr, RelayBody, RelayEndpoint, Relays};
use netpilot_agent::link::identity::Identity;
use netpilot_agent::link::report::{AgentEvent, RelayReporter, ReportError, Reporter};
use netpilot_proto::link::REPORT_PATH;
use netpilot_tests::{relay_endpoint as endpoint, Relay, RelayOptions};
use serde_json::Value;

fn event(state: &str) -> AgentEvent {
    AgentEvent {
        kind: "wifi_change".into(),
        id: "chg-1".into(),
        state: state.into(),
        detail: Some("radio0 ssid".into()),
        at: 1_700_000_000,
    }
}

/// One raw POST with the router's credentials: status and parsed body.
async fn post_raw(e: &RelayEndpoint, content_type: &str, body: &'static [u8]) -> (u16, Value) {
    let mut sender = e.http1().await.unwrap();
    let req = e
        .request(http::Method::POST, REPORT_PATH)
        .header("content-type", content_type)
        .body(RelayBody::full(Bytes::from_static(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn reports_are_authenticated_kept_and_counted() -> anyhow::Result<()> {
    let relay = Relay::start(RelayOptions::default()).await?;
    let router = relay.enrolled_router("alice").await?;
    let good = endpoint(&relay, &router, None);
    let reporter = RelayReporter::new(good.clone(), Duration::from_secs(10));

    reporter.report(&event("pending")).await?;
    reporter.report(&event("confirmed")).await?;

    let c = relay.client().await?;
    let view = c
        .get(&format!("/api/admin/routers/{}", router.router_id))
        .await?;
    assert_eq!(view.status, 200, "{}", view.body);
    let recent = view.body["data"]["recent_reports"]
        .as_array()
        .expect("recent_reports");
    assert_eq!(recent.len(), 2, "{recent:?}");
    assert_eq!(recent[0]["state"], "confirmed", "newest first: {recent:?}");
    assert_eq!(recent[0]["kind"], "wifi_change");
    assert_eq!(recent[0]["id"], "chg-1");
    assert_eq!(recent[0]["detail"], "radio0 ssid");
    assert_eq!(recent[0]["at"], 1_700_000_000u64);
    assert!(recent[0]["received_at"].as_str().is_some());
    // The list stays small: reports only in the one-router view.
    let list = c.get("/api/admin/routers").await?;
    assert!(list.body["data"]["routers"][0]
        .get("recent_reports")
        .is_none());

    let metrics = String::from_utf8_lossy(&c.get("/metrics").await?.raw).into_owned();
    assert!(
        metrics
            .contains("netpilot_agent_reports_total{kind=\"wifi_change\",state=\"confirmed\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics
        .contains("netpilot_agent_reports_total{kind=\"wifi_change\",state=\"pending\"} 1\n"));

    // Wrong secret: 401, and the agent sees a typed refusal.
    let wrong = RelayReporter::new(
        endpoint(&relay, &router, Some(&"0".repeat(64))),
        Duration::from_secs(10),
    );
    match wrong.report(&event("confirmed")).await {
        Err(ReportError::Refused { status, message }) => {
            assert_eq!(status, 401);
            assert!(message.starts_with("UNAUTHORIZED"), "{message}");
        }
        other => panic!("expected a 401 refusal, got {other:?}"),
    }

    // Not a report: 400; not JSON at all: 415; too big: 413.
    let (status, body) = post_raw(&good, "application/json", b"{\"kind\": 3}").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_PARAMETER"))
    );
    let (status, _) = post_raw(&good, "application/json", b"{not json").await;
    assert_eq!(status, 400);
    let (status, _) = post_raw(&good, "text/plain", b"hello").await;
    assert_eq!(status, 415);
    let big: &'static [u8] = Box::leak(
        format!(
            "{{\"kind\":\"k\",\"id\":\"i\",\"state\":\"s\",\"at\":1,\"detail\":\"{}\"}}",
            "x".repeat(5000)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let (status, _) = post_raw(&good, "application/json", big).await;
    assert_eq!(status, 413);
    // Refused reports are not kept.
    let view = c
        .get(&format!("/api/admin/routers/{}", router.router_id))
        .await?;
    assert_eq!(
        view.body["data"]["recent_reports"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Revoked: 403 ROUTER_REVOKED.
    let r = c
        .delete(&format!("/api/admin/routers/{}", router.router_id))
        .await?;
    assert_eq!(r.status, 200);
    match reporter.report(&event("confirmed")).await {
        Err(ReportError::Refused { status, message }) => {
            assert_eq!(status, 403);
            assert!(message.starts_with("ROUTER_REVOKED"), "{message}");
        }
        other => panic!("expected a 403 refusal, got {other:?}"),
    }
    assert!(
        !relay
            .log()
            .contains(&Identity::load(&router.state_dir)?.router_secret),
        "the router secret must never be logged"
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_relay_is_a_typed_error() -> anyhow::Result<()> {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let tls = netpilot_agent::link::tls::client_config(
        &netpilot_agent::link::tls::Trust::Fingerprint("ab".repeat(32)),
    )?;
    let e = RelayEndpoint::new(
        std::sync::Arc::new(Relays::new(
            RelayAddr::parse(&format!("https://127.0.0.1:{port}"))?,
            [],
        )),
        tls,
        uuid::Uuid::new_v4().to_string(),
        "s".repeat(64),
        Duration::from_secs(2),
    );
    let r = RelayReporter::new(e, Duration::from_secs(5))
        .report(&event("confirmed"))
        .await;
    assert!(matches!(r, Err(ReportError::Unreachable(_))), "{r:?}");
    Ok(())
}
