//! The speed test end to end with the real relay and agent binaries: the web app
//! calls `GET /api/speedtest` through the relay, the agent measures against that
//! relay's endpoints over its own TLS connection. Plus the relay endpoints on their
//! own, called with the router credentials a real enrollment stored.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use netpilot_agent::link::dial::{RelayBody, RelayEndpoint};
use netpilot_proto::link::{SPEEDTEST_DOWNLOAD_PATH, SPEEDTEST_PING_PATH, SPEEDTEST_UPLOAD_PATH};
use netpilot_tests::{eventually, relay_endpoint as endpoint, ApiRig, Relay, RelayOptions};
use serde_json::Value;

/// A request to the relay on a fresh connection; the answer's head, body unread.
async fn open(
    e: &RelayEndpoint,
    method: http::Method,
    path: &str,
    body: Option<Bytes>,
) -> http::Response<Incoming> {
    let mut sender = e.http1().await.unwrap();
    let mut b = e.request(method, path);
    if body.is_some() {
        b = b.header("content-type", "application/octet-stream");
    }
    let req = b.body(RelayBody::full(body.unwrap_or_default())).unwrap();
    // The connection lives on until this answer's body is read or dropped.
    sender.send_request(req).await.unwrap()
}

/// Status, error code and the body length (or the envelope) of a whole answer.
async fn call(
    e: &RelayEndpoint,
    method: http::Method,
    path: &str,
    body: Option<Bytes>,
) -> (u16, String, Bytes) {
    let resp = open(e, method, path, body).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().unwrap_or("").to_owned();
    (status, code, bytes)
}

async fn metric(relay: &Relay, name: &str) -> u64 {
    let c = relay.client().await.unwrap();
    let text = String::from_utf8_lossy(&c.get("/metrics").await.unwrap().raw).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[tokio::test]
async fn a_speed_test_through_the_relay_gives_plausible_bounded_figures() -> anyhow::Result<()> {
    let rig = ApiRig::simulated().await?;
    let relay = &rig.relay;
    let alice = rig.session("alice").await?;

    // On loopback 2 MB go in far less than 5 s: the byte limit ends each direction.
    let r = alice
        .get("/api/speedtest?maxBytes=2000000&maxSeconds=5")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let d = &r.body["data"];
    println!("byte-bound run: {d}");
    assert_eq!(d["download_bytes"], 2_000_000, "{d}");
    assert_eq!(d["upload_bytes"], 2_000_000, "{d}");
    for k in ["download_mbps", "upload_mbps", "latency_ms"] {
        let v = d[k].as_f64().unwrap_or(0.0);
        // Loopback: more than 1 Mbit/s and less than 1 Tbit/s; a round trip of a
        // few microseconds to a second.
        assert!(v > 0.0, "{k} = {v}: {d}");
        if k.ends_with("mbps") {
            assert!((1.0..1e6).contains(&v), "{k} = {v}");
        } else {
            assert!(v < 1000.0, "{k} = {v}");
        }
    }
    assert!(d["jitter_ms"].as_f64().unwrap() >= 0.0);
    let duration = d["duration_ms"].as_u64().unwrap();
    assert!(duration < 25_000, "{duration}");
    assert_eq!(d["server"], relay.addr.to_string());
    assert_eq!(d["method"], "tls_connection");
    let keys: Vec<&String> = d.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 9, "exactly the documented fields: {keys:?}");

    // The relay counted what it moved.
    assert!(
        metric(
            relay,
            "netpilot_speedtest_bytes_total{direction=\"download\"}"
        )
        .await
            >= 2_000_000
    );
    assert!(
        metric(
            relay,
            "netpilot_speedtest_bytes_total{direction=\"upload\"}"
        )
        .await
            >= 2_000_000
    );
    assert_eq!(metric(relay, "netpilot_speedtest_active").await, 0);

    // A time-bound run: the relay ends the download at the limit, the agent ends the
    // upload; a second run right after the first finds every slot free again.
    let r = alice.get("/api/speedtest?maxSeconds=0.3").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let d = &r.body["data"];
    println!("time-bound run: {d}");
    assert!(d["download_bytes"].as_u64().unwrap() > 0);
    assert!(d["download_bytes"].as_u64().unwrap() <= 100_000_000);
    assert!(d["upload_bytes"].as_u64().unwrap() <= 100_000_000);
    // Two directions of 0.3 s, pings and a handshake: well under 5 s.
    assert!(d["duration_ms"].as_u64().unwrap() < 5_000, "{d}");

    // Bad arguments: 400 before anything is measured.
    for bad in [
        "maxSeconds=0",
        "maxSeconds=60",
        "maxBytes=10",
        "maxBytes=abc",
    ] {
        let r = alice.get(&format!("/api/speedtest?{bad}")).await;
        assert_eq!(
            (r.status, r.code()),
            (400, "INVALID_PARAMETER"),
            "{bad}: {}",
            r.body
        );
    }
    Ok(())
}

/// One plain HTTP/1.1 GET to the agent's local listener: status and error code.
async fn local_get(api: SocketAddr, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "agent")
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
}

fn signal(pid: Option<u32>, sig: &str) {
    let pid = pid.expect("relay running");
    let st = std::process::Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

#[tokio::test]
async fn a_second_concurrent_run_is_refused_with_409() -> anyhow::Result<()> {
    let rig = ApiRig::builder()
        .agent_args(&["--simulate", "--api-listen", "127.0.0.1:0"])
        .start()
        .await?;
    let (relay, api) = (&rig.relay, rig.local_api());

    // With the relay stopped, a run hangs in its TLS handshake for as long as the
    // relay stays stopped: whichever of the two calls the agent takes first holds
    // the run, and the other must be refused at once, without any timing luck.
    signal(relay.pid(), "-STOP");
    let path = "/api/speedtest?maxBytes=1000000&maxSeconds=1";
    let mut first = tokio::spawn(local_get(api, path));
    let mut second = tokio::spawn(local_get(api, path));
    let (done, other) = tokio::select! {
        r = &mut first => (r?, second),
        r = &mut second => (r?, first),
    };
    signal(relay.pid(), "-CONT");
    assert_eq!(done, (409, "SPEEDTEST_RUNNING".to_owned()));
    // The held run completes once the relay runs again.
    let (status, code) = other.await?;
    assert_eq!(status, 200, "{code}");
    // And the next one is accepted: the guard is released.
    assert_eq!(local_get(api, path).await.0, 200);
    Ok(())
}

#[tokio::test]
async fn relay_endpoints_authenticate_and_enforce_their_caps() -> anyhow::Result<()> {
    let relay = Relay::start(RelayOptions {
        config: "[limits]\nspeedtest_concurrent = 1\nspeedtest_max_bytes = 8388608\n".into(),
    })
    .await?;
    let alice = relay.enrolled_router("alice").await?;
    let bob = relay.enrolled_router("bob").await?;
    let a = endpoint(&relay, &alice, None);
    let b = endpoint(&relay, &bob, None);
    use http::Method;

    // Wrong secret, on every endpoint: 401.
    let wrong = endpoint(&relay, &alice, Some(&"0".repeat(64)));
    for (m, p) in [
        (Method::GET, SPEEDTEST_PING_PATH.to_owned()),
        (Method::GET, format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=10")),
        (Method::POST, SPEEDTEST_UPLOAD_PATH.to_owned()),
    ] {
        let (status, code, _) = call(&wrong, m.clone(), &p, Some(Bytes::from_static(b"x"))).await;
        assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"), "{m} {p}");
    }

    // Ping; an exact download; an upload counted by the relay.
    let (status, _, body) = call(&a, Method::GET, SPEEDTEST_PING_PATH, None).await;
    assert_eq!(status, 200);
    assert!(
        body.len() < 200,
        "a ping answer is tiny: {} bytes",
        body.len()
    );
    let (status, _, body) = call(
        &a,
        Method::GET,
        &format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=3000000"),
        None,
    )
    .await;
    assert_eq!((status, body.len()), (200, 3_000_000));
    let (status, _, body) = call(
        &a,
        Method::POST,
        SPEEDTEST_UPLOAD_PATH,
        Some(Bytes::from(vec![7u8; 1_500_000])),
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body)?;
    assert_eq!(v["data"]["bytes"], 1_500_000, "{v}");
    assert!(v["data"]["duration_us"].as_u64().is_some());

    // Caps: more than the relay's limit is refused (download 400, upload 413); a
    // download with a time limit ends early and cleanly.
    let (status, code, _) = call(
        &a,
        Method::GET,
        &format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=8388609"),
        None,
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "INVALID_PARAMETER"));
    let (status, code, _) = call(
        &a,
        Method::GET,
        &format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=100&ms=0"),
        None,
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "INVALID_PARAMETER"));
    // The relay refuses on the declared length without reading the body, so the
    // client may still be writing when the relay closes: either it reads the 413,
    // or its write fails because the relay hung up. Both are a refusal.
    let mut sender = a.http1().await?;
    let req = a
        .request(Method::POST, SPEEDTEST_UPLOAD_PATH)
        .body(RelayBody::full(vec![0u8; 8_388_609]))?;
    match sender.send_request(req).await {
        Ok(resp) => assert_eq!(resp.status(), 413),
        Err(e) => {
            let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
            assert!(
                io.is_some_and(|io| matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                )),
                "{e:?}"
            );
        }
    }
    let (status, _, body) = call(
        &a,
        Method::GET,
        &format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=8388608&ms=1"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        body.len() < 8_388_608,
        "ended at its 1 ms limit: {}",
        body.len()
    );

    // One transfer per router (409) and one in all here (429). An unread download
    // holds its slot: the relay blocks on the full socket, still inside the body
    // (8 MiB is twice what this kernel's socket buffers take before the reader reads).
    let held = open(
        &a,
        Method::GET,
        &format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=8388608"),
        None,
    )
    .await;
    assert_eq!(held.status(), 200);
    let (status, code, _) = call(
        &a,
        Method::GET,
        &format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=10"),
        None,
    )
    .await;
    assert_eq!((status, code.as_str()), (409, "SPEEDTEST_RUNNING"));
    let (status, code, _) = call(
        &b,
        Method::POST,
        SPEEDTEST_UPLOAD_PATH,
        Some(Bytes::from_static(b"x")),
    )
    .await;
    assert_eq!((status, code.as_str()), (429, "SPEEDTEST_BUSY"));
    // Pings are not rationed.
    assert_eq!(
        call(&b, Method::GET, SPEEDTEST_PING_PATH, None).await.0,
        200
    );
    assert_eq!(metric(&relay, "netpilot_speedtest_active").await, 1);
    // Reading it to the end frees the slot before the last byte arrives.
    let n = held.into_body().collect().await?.to_bytes().len();
    assert_eq!(n, 8_388_608);
    assert_eq!(
        call(&b, Method::GET, SPEEDTEST_PING_PATH, None).await.0,
        200
    );
    let (status, _, _) = call(
        &b,
        Method::GET,
        &format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=10"),
        None,
    )
    .await;
    assert_eq!(status, 200);

    // A client that walks away mid-download frees the slot too (when the relay's
    // next write fails).
    let dropped = open(
        &a,
        Method::GET,
        &format!("{SPEEDTEST_DOWNLOAD_PATH}?bytes=8388608"),
        None,
    )
    .await;
    drop(dropped);
    eventually(
        Duration::from_secs(10),
        "the abandoned slot to be freed",
        || async { (metric(&relay, "netpilot_speedtest_active").await == 0).then_some(()) },
    )
    .await?;

    // Revoked: 403.
    let c = relay.client().await?;
    c.delete(&format!("/api/admin/routers/{}", bob.router_id))
        .await?;
    let (status, code, _) = call(&b, Method::GET, SPEEDTEST_PING_PATH, None).await;
    assert_eq!((status, code.as_str()), (403, "ROUTER_REVOKED"));
    Ok(())
}
