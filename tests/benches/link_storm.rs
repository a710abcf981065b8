//! Link-storm measurement (issue 16, item 7): what the web app sees while a fleet
//! reconnects at once, with the link-accept rate off and on. A program that prints
//! figures; it asserts nothing about time.
//!
//! Per mode, a fresh relay (the binary next to this program, or
//! `NETPILOT_RELAY_BIN`); `NETPILOT_STORM_AGENTS` routers (default 1,500) are
//! created and enrolled over its API; then all their agents — the agent library in
//! this process over simulated routers, no start delay, the agent's own backoff —
//! dial at the same instant, as after a relay restart. Until every agent is online
//! the program calls `GET /health` every 25 ms on one kept-alive HTTP/2 connection
//! and every 100 ms on a new TLS connection (a web-app backend that opens one),
//! and prints medians, p90 and the worst of both, the time until all are online,
//! and the link upgrades the relay refused.
//!
//! Run: `cargo test -p netpilot-tests --bench link_storm` (a debug build; `cargo
//! bench` builds the release profile, fat LTO, which takes long).

#[path = "common/fleet.rs"]
mod fleet;

use std::time::Duration;

use anyhow::ensure;
use netpilot_tests::{Client, Relay, RelayOptions, API_KEY};
use tokio::sync::watch;
use tokio::time::Instant;

const ONLINE_WITHIN: Duration = Duration::from_secs(180);

fn main() -> anyhow::Result<()> {
    // Thousands of agents in this process: as the relay does at start.
    let _ = netpilot_relay::capacity::raise_nofile();
    let agents: usize = std::env::var("NETPILOT_STORM_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        println!("link storm: {agents} agents dial at once; /health measured until all are online");
        for (mode, rate) in [
            ("rate off", 0u32),
            ("rate 500/s (default)", 500),
            ("rate 100/s", 100),
        ] {
            let figures = storm(agents, rate).await?;
            println!("{mode:>22}: {figures}");
        }
        Ok::<_, anyhow::Error>(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

struct Figures {
    online_secs: f64,
    online: usize,
    kept: Vec<Duration>,
    fresh: Vec<Duration>,
    /// New web-app connections that did not get in.
    failed: usize,
    refused: String,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let stats = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort();
            if v.is_empty() {
                return "no samples".to_owned();
            }
            format!(
                "median {:.1} ms, p90 {:.1} ms, worst {:.1} ms ({} samples)",
                ms(v[v.len() / 2]),
                ms(v[v.len() * 9 / 10]),
                ms(v[v.len() - 1]),
                v.len()
            )
        };
        write!(
            f,
            "{} online after {:.1} s; /health kept-alive: {}; /health on a new connection: {} ({} failed); refused upgrades: {}",
            self.online,
            self.online_secs,
            stats(&self.kept),
            stats(&self.fresh),
            self.failed,
            self.refused
        )
    }
}

async fn storm(n: usize, rate: u32) -> anyhow::Result<Figures> {
    let relay = Relay::start(RelayOptions {
        config: format!(
            // Every agent dials from 127.0.0.1 here; in the field they come from as
            // many addresses, so the per-address cap is lifted out of the way.
            "[enrollment]\nper_minute = 1000000\n[limits]\nmax_unauthenticated_per_address = 1000000\n\
             [capacity]\nmax_link_accepts_per_second = {rate}\n"
        ),
    })
    .await?;
    let admin = relay.client().await?;
    let identities = fleet::enroll_many(&relay, &admin, n, "storm", 32).await?;
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let mut agents = fleet::start_agents(identities, &stopped);
    // The poller has a thread and runtime of its own, so the agents' work in this
    // process does not delay its calls (the machine's cores are shared all the same).
    let (addr, fingerprint) = (relay.addr, relay.fingerprint.clone());
    let (kept, fresh, online, failed) = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(poll(addr, fingerprint, n, started))
    })
    .await??;
    let online_secs = started.elapsed().as_secs_f64();
    // A new connection: the enrollment one may have been idle past `h2_idle`.
    let m = relay.client().await?.get("/metrics").await?;
    let refused = String::from_utf8_lossy(&m.raw)
        .lines()
        .filter_map(|l| l.strip_prefix("netpilot_links_refused_total{reason=\""))
        .map(|l| l.replace("\"} ", "="))
        .collect::<Vec<_>>()
        .join(" ");
    let _ = stop.send(true);
    while tokio::time::timeout(Duration::from_secs(5), agents.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    agents.abort_all();
    Ok(Figures {
        online_secs,
        online,
        kept,
        fresh,
        failed,
        refused,
    })
}

/// Calls `/health` until `n` agents are online: every 25 ms on one kept-alive
/// connection, every 100 ms on a new one.
async fn poll(
    addr: std::net::SocketAddr,
    fingerprint: String,
    n: usize,
    started: Instant,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, usize, usize)> {
    let admin =
        Client::connect_from("127.0.0.2".parse()?, addr, &fingerprint, Some(API_KEY)).await?;
    let (mut kept, mut fresh) = (Vec::new(), Vec::new());
    let mut online = 0;
    let mut tick = 0u32;
    let mut failed = 0usize;
    while started.elapsed() < ONLINE_WITHIN {
        let t = Instant::now();
        let r = admin.get("/health").await?;
        kept.push(t.elapsed());
        online = r.body["data"]["connected_agents"].as_u64().unwrap_or(0) as usize;
        if online >= n {
            break;
        }
        if tick % 4 == 0 {
            // From another loopback address, as the web app is another host.
            let t = Instant::now();
            let web = "127.0.0.2".parse()?;
            match Client::connect_from(web, addr, &fingerprint, Some(API_KEY)).await {
                Ok(c) => {
                    let r = c.get("/health").await?;
                    ensure!(r.status == 200, "health: {}", r.status);
                    fresh.push(t.elapsed());
                }
                Err(_) => failed += 1,
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok((kept, fresh, online, failed))
}
