//! `cargo run -p netpilot-tests --bin netpilot-tour`: a relay on embedded defaults and
//! an enrolled, connected simulated router in one process (real TLS, the real link
//! on loopback), then a short tour of real API calls. It keeps serving afterwards so
//! you can try the API with curl; `--once` exits after the tour; `--listen ADDR`
//! picks the address (default 127.0.0.1:8443, or any free port if that is taken).

use std::time::Duration;

use anyhow::Context;
use netpilot_agent::link::enroll::{enroll, EnrollArgs};
use netpilot_agent::link::tls::Trust;
use netpilot_relay::config::{CliOverrides, Config, Secret};
use netpilot_tests::{Client, Reply, Session};
use serde_json::json;
use tokio::sync::oneshot;

const API_KEY: &str = "demo-api-key-change-me";
const USER: &str = "demo-user";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let once = args.iter().any(|a| a == "--once");
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .cloned();
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::tempdir()?;

    // A relay with the embedded defaults: self-signed certificate, SQLite in the data dir.
    // 8443 makes the printed curl lines stable; any free port does if it is taken.
    let listener = match listen {
        Some(addr) => tokio::net::TcpListener::bind(addr.as_str()).await?,
        None => match tokio::net::TcpListener::bind("127.0.0.1:8443").await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        },
    };
    let config = Config::load(
        CliOverrides {
            data_dir: Some(dir.path().join("relay")),
            api_key: Some(Secret::new(API_KEY)),
            listen: Some(listener.local_addr()?),
            ..Default::default()
        },
        &|_| None,
    )?;
    let relay = netpilot_tests::in_process_relay(config, listener).await?;
    let ready = &relay.ready;
    let url = format!("https://{}", ready.addr);
    section("Relay");
    println!("listening on {url}");
    println!("certificate SHA-256 fingerprint {}", ready.fingerprint);

    let c = Client::connect(ready.addr, &ready.fingerprint, API_KEY).await?;

    section("1. The web app creates a router for its user");
    let r = show(
        c.post(
            "/api/admin/routers",
            json!({"ownerUserId": USER, "name": "Home router"}),
        )
        .await?,
        "POST /api/admin/routers {ownerUserId, name}",
    );
    let router_id = r.body["data"]["router_id"]
        .as_str()
        .context("router id")?
        .to_owned();
    let token = r.body["data"]["enrollment_token"]
        .as_str()
        .context("token")?
        .to_owned();

    section("2. The router enrolls with the one-time token and connects");
    let state_dir = dir.path().join("agent");
    println!(
        "$ netpilot-agent enroll --relay {url} --token {}… --fingerprint {}… --state-dir {}",
        &token[..8],
        &ready.fingerprint[..11],
        state_dir.display()
    );
    let identity = enroll(EnrollArgs {
        relay_url: &url,
        token: &token,
        trust: Trust::Fingerprint(ready.fingerprint.clone()),
        state_dir: &state_dir,
        force: false,
    })
    .await?;
    println!("enrolled as router {}", identity.router_id);
    println!(
        "$ netpilot-agent run --simulate --state-dir {}",
        state_dir.display()
    );
    let (stop_agent, agent_stopped) = oneshot::channel::<()>();
    let run_config = netpilot_agent::RunConfig {
        state_dir,
        simulate: true,
        // The tour's agent is not this machine's: it leaves the control socket be.
        control: None,
        backoff: netpilot_agent::link::backoff::BackoffConfig {
            start_delay_max: Duration::ZERO,
            ..Default::default()
        },
        // A short settle so the tour sees its Wi-Fi change confirmed quickly.
        wifi_safe: netpilot_agent::wifi::WifiConfig {
            settle: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let agent = tokio::spawn(netpilot_agent::run(run_config, |_| {}, async move {
        let _ = agent_stopped.await;
    }));
    netpilot_tests::eventually(
        Duration::from_secs(10),
        "the router to come online",
        || async {
            let r = c
                .get(&format!("/api/admin/routers/{router_id}"))
                .await
                .ok()?;
            (r.body["data"]["online"] == json!(true)).then_some(())
        },
    )
    .await?;
    show(c.get("/api/admin/routers").await?, "GET /api/admin/routers");

    section("3. A session for the user, then calls routed over the link");
    let sid = uuid::Uuid::new_v4().to_string();
    show(
        c.post(
            "/api/session/start",
            json!({"sessionId": sid, "userId": USER, "routerId": router_id}),
        )
        .await?,
        "POST /api/session/start {sessionId, userId, routerId}",
    );
    // From here on the calls carry the session and router ids.
    let session = Session {
        client: c.clone(),
        id: sid.clone(),
        router_id: router_id.clone(),
    };
    show(
        session.get("/api/scan/router").await,
        "GET /api/scan/router",
    );
    show(
        session.get("/api/agent/health").await,
        "GET /api/agent/health",
    );
    show(
        session.get("/api/speedtest?maxSeconds=2").await,
        "GET /api/speedtest?maxSeconds=2   (measured against this relay on loopback)",
    );

    section("3b. Wi-Fi: every change is pending until the agent reaches the relay again");
    show(
        session.get("/api/wifi/status").await,
        "GET /api/wifi/status   (radios, SSIDs, encryption, clients; never the key)",
    );
    show(
        session.post(
            "/api/wifi/ssid",
            json!({"ssid": "Home \u{2615}", "radio": "radio1"}),
        ).await,
        "POST /api/wifi/ssid {ssid: \"Home \u{2615}\", radio: radio1}   (applied, pending confirmation)",
    );
    show(
        session
            .post("/api/wifi/ssid", json!({"ssid": "Home\nNet"}))
            .await,
        "POST /api/wifi/ssid {ssid: \"Home\\nNet\"}   (bad input: refused)",
    );
    let path = session.q("/api/wifi/status");
    let confirmed = netpilot_tests::eventually(
        Duration::from_secs(30),
        "the Wi-Fi change to be confirmed",
        || async {
            let r = c.get(&path).await.ok()?;
            (r.body["data"]["change"]["state"] == json!("confirmed")).then_some(r)
        },
    )
    .await?;
    show(
        confirmed,
        "GET /api/wifi/status   (the agent reported to the relay: confirmed; otherwise it rolls back by itself)",
    );

    section("4. Device groups and blocking (the simulated router keeps rules in memory)");
    show(
        session.post(
            "/api/groups/sync",
            json!({"group": {
                "id": 3, "name": "Kids",
                "devices": [{"mac": "02:00:00:00:01:03", "name": "Tablet"}, {"mac": "02-00-00-00-01-02"}],
                "policy": {"bandwidth": {"downloadKbps": 5000, "uploadKbps": 1000}, "internet": "allow",
                    "dns": {"categories": ["social", "adult"], "blockDomains": ["Example.COM."]},
                    "schedules": [{"days": ["mon","tue","wed","thu","fri"], "start": "22:00", "end": "06:30", "action": "block"}]}}}),
        ).await,
        "POST /api/groups/sync {group: Kids, 5/1 Mbit/s, school nights blocked 22:00-06:30, DNS: social, adult, example.com}",
    );
    show(
        session.get("/api/dns/categories").await,
        "GET /api/dns/categories   (shipped lists; PUT /api/dns/categories/{name} replaces or adds one)",
    );
    show(
        session
            .post("/api/block", json!({"mac": "30:05:5c:00:01:05"}))
            .await,
        "POST /api/block {mac}",
    );
    show(session.get("/api/blocked").await, "GET /api/blocked");
    show(
        session
            .post(
                "/api/groups/sync",
                json!({"group": {"id": 4, "name": "x", "devices": [{"mac": "ff:ff:ff:ff:ff:ff"}]}}),
            )
            .await,
        "POST /api/groups/sync with a broadcast MAC (refused)",
    );
    show(
        session.get("/api/infrastructure/status").await,
        "GET /api/infrastructure/status",
    );
    show(
        session.get("/api/scan").await,
        "GET /api/scan   (leases, neighbours and Wi-Fi clients, with their names, makers, groups and traffic)",
    );
    show(
        session.get("/api/device-usage/current?limit=2").await,
        "GET /api/device-usage/current?limit=2   (nlbwmon's counters, top two devices)",
    );
    show(
        session.get("/api/device-usage/summary?days=7").await,
        "GET /api/device-usage/summary?days=7   (the agent's own daily history)",
    );

    section("5. Isolation: another user's session cannot reach this router");
    let other = Session {
        id: uuid::Uuid::new_v4().to_string(),
        ..session.clone()
    };
    c.post(
        "/api/session/start",
        json!({"sessionId": other.id, "userId": "someone-else"}),
    )
    .await?;
    show(
        other.get("/api/scan/router").await,
        "GET /api/scan/router as someone-else",
    );

    section("6. Metrics");
    let m = c.get("/metrics").await?;
    for line in String::from_utf8_lossy(&m.raw)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
    {
        println!("{line}");
    }

    if once {
        section("Tour complete");
    } else {
        section("Try it yourself (Ctrl-C to stop)");
        let cert = ready.cert_path.display();
        println!("export K='Authorization: Bearer {API_KEY}'");
        println!("curl --cacert {cert} -H \"$K\" '{url}/api/scan/router?sessionId={sid}&routerId={router_id}'");
        println!("curl --cacert {cert} -H \"$K\" {url}/api/admin/routers");
        println!("curl --cacert {cert} -H \"$K\" {url}/metrics");
        tokio::signal::ctrl_c().await?;
    }
    let _ = stop_agent.send(());
    agent
        .await?
        .map_err(|e| anyhow::anyhow!("the agent: {e}"))?;
    let _ = relay.stop.send(());
    relay.task.await??;
    Ok(())
}

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn show(r: Reply, what: &str) -> Reply {
    println!("\n> {what}\n< {}", r.status);
    println!(
        "{}",
        serde_json::to_string_pretty(&r.body).unwrap_or_default()
    );
    r
}
