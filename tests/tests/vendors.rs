//! MAC vendor enrichment (issue 17) on the real forwarding path, with the real
//! relay binary: a fake agent answers device routes with known MACs, and the web
//! app gets each device's `vendor` (from the registry the relay embeds, or an
//! operator's file), the answer otherwise byte for byte as the agent sent it; the
//! CSV export gains its `vendor` column while it streams; error envelopes, other
//! routes and a relay with `[vendors] enabled = false` pass answers untouched; in
//! a cluster the node a call entered adds vendors, once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use netpilot_tests::cluster::ClusterRig;
use netpilot_tests::fake_agent::{
    self, answer, linked, rig, whole, with_health, FakeAgent, FakeFuture,
};
use netpilot_tests::{metric_value, metrics, ChannelBody, Relay, RelayOptions, Session};
use serde_json::{json, Value};

/// Known MACs: an Apple MA-L, an MA-M and an MA-S block (inside the IEEE
/// Registration Authority's own MA-L blocks), a randomized address, a prefix no
/// one holds, and two the test fixture names differently from the embedded
/// registry.
const APPLE: &str = "3c:22:fb:12:34:56";
const MA_M: &str = "b8:4c:87:40:00:01";
const MA_S: &str = "8c:1f:64:af:a0:01";
const RANDOM: &str = "02:00:00:00:01:01";
const UNKNOWN: &str = "f4:f4:f0:00:00:01";
const XEROX: &str = "00:00:00:12:34:56";
const FIXTURE_MA_S: &str = "0c:8f:20:7a:b0:01";

/// A `/api/scan` answer as the agent writes it (its fields, its key order), with
/// a pretty-printed device and a hostname that holds JSON's specials.
fn scan_answer(macs: &[&str]) -> String {
    let devices: Vec<String> = macs
        .iter()
        .enumerate()
        .map(|(i, mac)| {
            let randomized = mac.starts_with("02:");
            format!(
                r#"{{"mac":"{mac}","ip":"192.168.1.{n}","ips":["192.168.1.{n}","fd00::{n}"],"hostname":"host-{n} \"{{x}}\" [y],z","interface":"br-lan","connection":"wired","wireless":null,"online":true,"last_seen":1764900000,"lease_expires":1764943200,"group":{{"id":0,"name":"Guests"}},"blocked":false,"blocked_by":[],"name":null,"name_source":"none","randomized":{randomized},"usage":{{"bytes_rx":1.5e3,"bytes_tx":0}}}}"#,
                n = i + 2
            )
        })
        .collect();
    format!(
        "{{\"success\":true,\"data\":{{\"timestamp\":1764900000,\"total\":{},\"online\":{},\"devices\":[{}],\n  \"sources\": {{\"leases\": {{\"state\": \"ok\"}}}}}},\"meta\":{{\"duration_ms\":4,\"request_id\":\"agent-1\"}}}}",
        macs.len(),
        macs.len(),
        devices.join(",\n    ")
    )
}

/// The relay's answer without the members it added (`,"vendor":` and a string or
/// `null`): what the agent sent, if nothing else changed.
fn strip_vendors(raw: &[u8]) -> Vec<u8> {
    const MEMBER: &[u8] = b",\"vendor\":";
    let mut s = raw;
    let mut kept = Vec::new();
    while let Some(at) = s.windows(MEMBER.len()).position(|w| w == MEMBER) {
        kept.extend_from_slice(&s[..at]);
        let rest = &s[at + MEMBER.len()..];
        let skip = if rest.starts_with(b"null") {
            4
        } else {
            let mut i = 1;
            while rest[i] != b'"' {
                i += if rest[i] == b'\\' { 2 } else { 1 };
            }
            i + 1
        };
        s = &rest[skip..];
    }
    kept.extend_from_slice(s);
    kept
}

fn vendors_of(body: &Value) -> Vec<Value> {
    body["data"]["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices in {body}"))
        .iter()
        .map(|d| d["vendor"].clone())
        .collect()
}

fn json_answer(status: u16, body: String) -> hyper::Response<fake_agent::FakeBody> {
    answer(status, Some("application/json"), whole(body))
}

/// Answers `/api/scan` with `body`, everything else with an empty success.
fn scan_handler(body: String) -> impl Fn(hyper::http::request::Parts) -> FakeFuture {
    move |parts| {
        let body = body.clone();
        Box::pin(async move {
            if parts.uri.path() == "/api/scan" {
                json_answer(200, body)
            } else {
                json_answer(
                    200,
                    r#"{"success":true,"data":{},"meta":{"duration_ms":0}}"#.into(),
                )
            }
        })
    }
}

fn metric(text: &str, series: &str) -> u64 {
    metric_value(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn scan_devices_get_their_vendor_and_nothing_else_changes() {
    let sent = scan_answer(&[APPLE, MA_M, MA_S, RANDOM, UNKNOWN]);
    let (relay, _router, _agent, session) = rig("", scan_handler(sent.clone())).await;
    let r = session.get("/api/scan").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
    assert_eq!(
        vendors_of(&r.body),
        [
            json!("Apple, Inc."),
            json!("Blum Novotest GmbH"),
            json!("DATA ELECTRONIC DEVICES, INC"),
            Value::Null,
            Value::Null,
        ]
    );
    // The randomized one says so itself (the agent's `randomized`), and has no vendor.
    assert_eq!(r.body["data"]["devices"][3]["randomized"], json!(true));
    // Byte for byte the agent's answer once the added members are out: key order,
    // whitespace, `1.5e3` and the hostname's escapes as they were.
    assert_eq!(
        String::from_utf8(strip_vendors(&r.raw)).unwrap(),
        sent,
        "the relay changed more than it added"
    );
    // Each as its device's last member.
    assert!(
        String::from_utf8_lossy(&r.raw)
            .contains(r#""usage":{"bytes_rx":1.5e3,"bytes_tx":0},"vendor":"Apple, Inc."}"#),
        "{}",
        String::from_utf8_lossy(&r.raw)
    );
    // Visible to the operator.
    let c = relay.client().await.unwrap();
    let m = metrics(&c).await;
    assert_eq!(metric(&m, "netpilot_vendor_enriched_answers_total"), 1);
    assert_eq!(
        metric(&m, "netpilot_vendor_lookups_total{result=\"hit\"}"),
        3
    );
    assert_eq!(
        metric(&m, "netpilot_vendor_lookups_total{result=\"miss\"}"),
        1
    );
    assert_eq!(
        metric(&m, "netpilot_vendor_lookups_total{result=\"private\"}"),
        1
    );
    assert!(metric(&m, "netpilot_vendor_registry_entries{source=\"embedded\"}") > 50_000);
    assert_eq!(
        metric(&m, "netpilot_vendor_registry_entries{source=\"file\"}"),
        0
    );
}

#[tokio::test]
async fn device_objects_at_any_depth_of_every_device_route_are_enriched() {
    let envelope =
        |data: &str| format!(r#"{{"success":true,"data":{data},"meta":{{"duration_ms":1}}}}"#);
    let group = format!(
        r#"{{"id":3,"name":"Kids","devices":[{{"mac":"{APPLE}","ip":null,"ipv6":null,"name":"Tab"}}],"policy":{{"internet":"allow"}},"mark":"0x00010000","class":"4e50:101"}}"#
    );
    let answers: Vec<(&str, String)> = vec![
        (
            "/api/device-usage/current",
            envelope(&format!(
                r#"{{"timestamp":1,"period":null,"devices":[{{"mac":"{MA_S}","ip":null,"ips":[],"hostname":null,"bytes_rx":5,"bytes_tx":6,"total_bytes":11,"connections":1,"top_protocols":[],"last_seen":1}}],"total_devices":1,"total_bytes":11,"unattributed_bytes":0,"offset":0,"limit":50}}"#
            )),
        ),
        (
            "/api/device-usage/device/3c:22:fb:12:34:56",
            envelope(&format!(
                r#"{{"timestamp":1,"period":null,"device":{{"mac":"{APPLE}","total_bytes":1}}}}"#
            )),
        ),
        (
            "/api/device-usage/history",
            envelope(&format!(
                r#"{{"days":7,"devices":[{{"mac":"{APPLE}","hostname":null,"total_bytes":3,"days":[{{"date":"2026-12-01","bytes_rx":1,"bytes_tx":2,"total_bytes":3}}]}}],"daily_totals":[{{"date":"2026-12-01","bytes":3}}]}}"#
            )),
        ),
        (
            "/api/device-usage/summary",
            envelope(&format!(
                r#"{{"period_days":7,"top_devices":[{{"mac":"{MA_M}","hostname":null,"total_bytes":3,"percentage":100.0}}],"daily_totals":[]}}"#
            )),
        ),
        (
            "/api/groups",
            envelope(&format!(r#"{{"groups":[{group}],"generation":4}}"#)),
        ),
        ("/api/groups/3", envelope(&group)),
    ];
    let table = answers.clone();
    let (_relay, _router, _agent, session) = rig("", move |parts| {
        let path = parts.uri.path().to_owned();
        let body = table
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| {
                envelope(&format!(
                    r#"{{"group":{group},"apply":{{"changed":true}}}}"#
                ))
            });
        Box::pin(async move { json_answer(200, body) })
    })
    .await;
    for (path, sent) in &answers {
        let r = session.get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let raw = String::from_utf8_lossy(&r.raw);
        assert_eq!(raw.matches("\"vendor\":").count(), 1, "{path}: {raw}");
        assert!(!raw.contains("\"vendor\":null"), "{path}: {raw}");
        assert_eq!(
            String::from_utf8(strip_vendors(&r.raw)).unwrap(),
            *sent,
            "{path}"
        );
    }
    // Group changes answer with the group: its devices get vendors too.
    let change =
        json!({"group": {"id": 3, "name": "Kids", "devices": [], "policy": {"internet": "allow"}}});
    for r in [
        session.post("/api/groups/sync", change.clone()).await,
        session
            .send(
                "PUT",
                "/api/groups/3/policy",
                json!({"policy": {"internet": "block"}}),
            )
            .await,
    ] {
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.body["data"]["group"]["devices"][0]["vendor"],
            json!("Apple, Inc.")
        );
    }
}

#[tokio::test]
async fn errors_other_routes_and_non_json_answers_pass_untouched() {
    let error = r#"{"success":false,"error":{"code":"INVALID_MAC","message":"bad mac 3c:22:fb:12:34:56 {\"mac\":1}"},"meta":{"duration_ms":0}}"#;
    let devices_elsewhere = format!(
        r#"{{"success":true,"data":{{"stations":[{{"mac":"{APPLE}"}}]}},"meta":{{"duration_ms":0}}}}"#
    );
    let other = devices_elsewhere.clone();
    let (_relay, _router, _agent, session) = rig("", move |parts| {
        let path = parts.uri.path().to_owned();
        let other = other.clone();
        Box::pin(async move {
            match path.as_str() {
                "/api/scan" => json_answer(400, error.into()),
                // Not a device route: even a `mac` stays as it is.
                "/api/wifi/status" => json_answer(200, other),
                "/api/groups" => answer(200, Some("text/plain"), whole(format!("mac {APPLE}"))),
                _ => json_answer(404, r#"{"success":false,"error":{"code":"GROUP_NOT_FOUND","message":"none"},"meta":{"duration_ms":0}}"#.into()),
            }
        })
    })
    .await;
    let r = session.get("/api/scan").await;
    assert_eq!((r.status, &r.raw[..]), (400, error.as_bytes()));
    let r = session.get("/api/wifi/status").await;
    assert_eq!((r.status, &r.raw[..]), (200, devices_elsewhere.as_bytes()));
    let r = session.get("/api/groups/7").await;
    assert_eq!(r.status, 404);
    assert!(!String::from_utf8_lossy(&r.raw).contains("vendor"));
    // A non-JSON answer on a device route is refused as before, in the relay's
    // own words: nothing added to it.
    let r = session.get("/api/groups").await;
    assert_eq!(
        (r.status, r.code()),
        (502, "BAD_AGENT_RESPONSE"),
        "{}",
        r.body
    );
    assert!(r.body["error"].get("vendor").is_none());
    assert!(!String::from_utf8_lossy(&r.raw).contains("\"vendor\""));
}

#[tokio::test]
async fn the_csv_export_gets_its_vendor_column_as_it_streams() {
    let feed: Arc<Mutex<Option<tokio::sync::mpsc::Receiver<Bytes>>>> = Arc::default();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    *feed.lock().unwrap() = Some(rx);
    let taken = feed.clone();
    let (relay, _router, _agent, session) = rig("", move |_parts| {
        let rx = taken.lock().unwrap().take();
        Box::pin(async move {
            match rx {
                Some(rx) => answer(
                    200,
                    Some("text/csv; charset=utf-8"),
                    ChannelBody(rx).boxed_unsync(),
                ),
                None => json_answer(409, "{}".into()),
            }
        })
    })
    .await;
    let resp = session
        .client
        .get_streaming(&session.q("/api/device-usage/history?format=csv&days=7"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/csv; charset=utf-8"
    );
    let mut body = resp.into_body();
    // The agent's first chunk ends inside a record: the header and the first row
    // come through enriched while the agent still holds the rest.
    tx.send(Bytes::from(format!(
        "date,mac,hostname,bytes_rx,bytes_tx,total_bytes\r\n2026-12-01,{APPLE},phone,1,2,3\r\n2026-12-01,{}",
        &MA_M[..5]
    )))
    .await
    .unwrap();
    let mut got = Vec::new();
    let first = "date,mac,hostname,bytes_rx,bytes_tx,total_bytes,vendor\r\n";
    let want_early = format!("{first}2026-12-01,{APPLE},phone,1,2,3,\"Apple, Inc.\"\r\n");
    while got.len() < want_early.len() {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the export's first rows did not arrive while the agent held the rest")
            .expect("the export ended early")
            .unwrap();
        if let Ok(d) = frame.into_data() {
            got.extend_from_slice(&d);
        }
    }
    assert!(
        got.starts_with(want_early.as_bytes()),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // The rest: the record cut in two, a hostname with a comma, quotes and a line
    // break, a randomized MAC, and a last record without a line break.
    for chunk in [
        MA_M[5..].to_owned(),
        format!(",\"a,b \"\"c\"\"\r\nd\",4,5,9\r\n2026-12-02,{RANDOM},,0,0,0\r\n"),
        format!("2026-12-02,{UNKNOWN},x,1,1,2"),
    ] {
        tx.send(Bytes::from(chunk)).await.unwrap();
    }
    drop(tx);
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(
        String::from_utf8(got).unwrap(),
        format!(
            "{first}2026-12-01,{APPLE},phone,1,2,3,\"Apple, Inc.\"\r\n\
             2026-12-01,{MA_M},\"a,b \"\"c\"\"\r\nd\",4,5,9,Blum Novotest GmbH\r\n\
             2026-12-02,{RANDOM},,0,0,0,\r\n\
             2026-12-02,{UNKNOWN},x,1,1,2,"
        )
    );
    // Counted before the export's last bytes went.
    let m = metrics(&relay.client().await.unwrap()).await;
    assert_eq!(metric(&m, "netpilot_vendor_enriched_answers_total"), 1);
    assert_eq!(
        metric(&m, "netpilot_vendor_lookups_total{result=\"hit\"}"),
        2
    );
    assert_eq!(
        metric(&m, "netpilot_vendor_lookups_total{result=\"miss\"}"),
        1
    );
    assert_eq!(
        metric(&m, "netpilot_vendor_lookups_total{result=\"private\"}"),
        1
    );
}

#[tokio::test]
async fn an_operators_vendor_file_is_used_and_enrichment_can_be_turned_off() {
    let fixture = netpilot_tests::repo().join("relay/testdata/vendors-fixture.csv");
    let sent = scan_answer(&[XEROX, FIXTURE_MA_S, APPLE]);
    let (relay, _router, _agent, session) = rig(
        &format!("[vendors]\nfiles = [{:?}]\n", fixture.display().to_string()),
        scan_handler(sent.clone()),
    )
    .await;
    let r = session.get("/api/scan").await;
    assert_eq!(
        vendors_of(&r.body),
        [
            json!("Operator's Xerox"),
            json!("Fixture \"Small\" GmbH"),
            json!("Apple, Inc.")
        ]
    );
    assert_eq!(strip_vendors(&r.raw), sent.as_bytes());
    let c = relay.client().await.unwrap();
    assert_eq!(
        metric(
            &metrics(&c).await,
            "netpilot_vendor_registry_entries{source=\"file\"}"
        ),
        9
    );

    // The same files from the environment, which beats the config file.
    let env_relay = Relay::start_with(
        &format!("api_key = \"{}\"\n", netpilot_tests::API_KEY),
        &[],
        &[("NETPILOT_VENDOR_FILES", &fixture.display().to_string())],
    )
    .await
    .unwrap();
    let (_env_relay, _r, _a, s) = linked(env_relay, scan_handler(sent.clone())).await;
    assert_eq!(
        vendors_of(&s.get("/api/scan").await.body)[0],
        json!("Operator's Xerox")
    );

    // Off: the agent's answer, byte for byte, and nothing counted.
    let (relay, _router, _agent, session) =
        rig("[vendors]\nenabled = false\n", scan_handler(sent.clone())).await;
    let r = session.get("/api/scan").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.raw, sent.as_bytes());
    let c = relay.client().await.unwrap();
    let m = metrics(&c).await;
    assert_eq!(metric(&m, "netpilot_vendor_enriched_answers_total"), 0);
    assert_eq!(
        metric(&m, "netpilot_vendor_registry_entries{source=\"embedded\"}"),
        0
    );
}

#[tokio::test]
async fn a_bad_vendor_file_stops_the_relay_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("mam.csv");
    std::fs::write(
        &bad,
        "Registry,Assignment,Organization Name,Organization Address\nMA-M,0C8F20Z,Odd,\n",
    )
    .unwrap();
    let err = Relay::start_single(RelayOptions {
        config: format!("[vendors]\nfiles = [{:?}]\n", bad.display().to_string()),
    })
    .await
    .err()
    .expect("the relay started with a bad vendor file");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!(
            "invalid vendor file {} line 2: MA-M assignment \"0C8F20Z\" is not 7 hex digits",
            bad.display()
        )),
        "{msg}"
    );
}

/// Two nodes: the router's link on node 1, the web app's calls entering node 0.
/// Node 0 adds the vendors, once; node 1 passes the agent's answer on as it is.
#[tokio::test]
async fn in_a_cluster_the_node_a_call_entered_adds_vendors_once() {
    let (rig, routers) = ClusterRig::start(2, "", &["alice"]).await.unwrap();
    let sent = scan_answer(&[APPLE, RANDOM, MA_S]);
    let csv = format!("date,mac\n2026-12-01,{APPLE}\n2026-12-01,{RANDOM}\n");
    let (scan, export) = (sent.clone(), csv.clone());
    let _agent = FakeAgent::start(
        &rig.nodes[1],
        &routers[0],
        with_health(move |parts| {
            let (scan, export) = (scan.clone(), export.clone());
            Box::pin(async move {
                if parts.uri.query().is_some_and(|q| q.contains("format=csv")) {
                    answer(200, Some("text/csv; charset=utf-8"), whole(export))
                } else {
                    json_answer(200, scan)
                }
            })
        }),
    )
    .await
    .unwrap();
    rig.wait_holder(0, &routers[0].router_id, Some(1), Duration::from_secs(15))
        .await
        .unwrap();
    let c0 = rig.client(0).await.unwrap();
    let session = Session::start(&c0, "alice", &routers[0].router_id)
        .await
        .unwrap();
    let r = session.get("/api/scan").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        vendors_of(&r.body),
        [
            json!("Apple, Inc."),
            Value::Null,
            json!("DATA ELECTRONIC DEVICES, INC")
        ]
    );
    assert_eq!(
        String::from_utf8_lossy(&r.raw)
            .matches("\"vendor\":")
            .count(),
        3
    );
    assert_eq!(strip_vendors(&r.raw), sent.as_bytes());
    let r = session
        .get("/api/device-usage/history?format=csv&days=7")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&r.raw),
        format!("date,mac,vendor\n2026-12-01,{APPLE},\"Apple, Inc.\"\n2026-12-01,{RANDOM},\n")
    );
    // Counted where it was done: node 0 twice, node 1 never.
    let m0 = metrics(&c0).await;
    let m1 = metrics(&rig.client(1).await.unwrap()).await;
    assert_eq!(metric(&m0, "netpilot_vendor_enriched_answers_total"), 2);
    assert_eq!(metric(&m1, "netpilot_vendor_enriched_answers_total"), 0);
    assert_eq!(
        metric(&m0, "netpilot_vendor_lookups_total{result=\"hit\"}"),
        3
    );
    assert_eq!(
        metric(&m0, "netpilot_vendor_lookups_total{result=\"private\"}"),
        2
    );
}
