//! Cluster measurement (issue 16): three relay nodes on this machine (on a Redis and
//! a PostgreSQL of their own, as the tests start them), `NETPILOT_CLUSTER_AGENTS`
//! agents per node (default 10,000) in three child processes of this program (the
//! hard open-file limit here is 20,000 per process), each process preferring its
//! node. It prints, in one run: the latency of a call entering the node that holds
//! the router's link beside one entering another node (p50/p99, interleaved), calls
//! per second through all nodes, each node's memory per link, and — after SIGKILL
//! of a node holding its share — the time until all of its routers are back
//! through the others, the peak link rate, and the memory per link afterwards. A
//! program that prints figures; it asserts nothing about time.
//!
//! Run: `cargo test -p netpilot-tests --bench cluster` (debug build; set
//! `NETPILOT_RELAY_BIN` to a release relay to measure that).

#[path = "common/fleet.rs"]
mod fleet;

use std::io::BufRead;
use std::time::Duration;

use anyhow::{bail, Context};
use netpilot_agent::link::identity::Identity;
use netpilot_tests::cluster::ClusterRig;
use netpilot_tests::{Client, Session};
use tokio::sync::watch;
use tokio::time::Instant;

const CHILD_FLAG: &str = "--cluster-bench-agents";

fn main() -> anyhow::Result<()> {
    let _ = netpilot_relay::capacity::raise_nofile();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        return child(&args[2], &args[3..]);
    }
    let per_node: usize = std::env::var("NETPILOT_CLUSTER_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(per_node))?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// A child: runs the agents of the identities in `file` with `relays` as their
/// list, until its stdin closes (the parent ended or killed it).
fn child(file: &str, relays: &[String]) -> anyhow::Result<()> {
    let identities: Vec<Identity> = serde_json::from_slice(&std::fs::read(file)?)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (stop, stopped) = watch::channel(false);
        let mut agents = fleet::start_agents_with(
            identities,
            relays.to_vec(),
            Duration::from_secs(5),
            &stopped,
        );
        // stdin closes when the parent goes: then stop.
        tokio::task::spawn_blocking(|| {
            let stdin = std::io::stdin();
            for _ in stdin.lock().lines() {}
        })
        .await?;
        let _ = stop.send(true);
        while agents.join_next().await.is_some() {}
        Ok::<_, anyhow::Error>(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

async fn links(c: &Client) -> usize {
    match c.get("/health").await {
        Ok(r) => r.body["data"]["connected_agents"].as_u64().unwrap_or(0) as usize,
        Err(_) => 0,
    }
}

/// A fresh REST client per node (an idle connection is closed after a minute).
async fn clients_of(rig: &ClusterRig) -> anyhow::Result<Vec<Client>> {
    let mut v = Vec::new();
    for i in 0..rig.nodes.len() {
        v.push(rig.client(i).await?);
    }
    Ok(v)
}

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

async fn bench(per_node: usize) -> anyhow::Result<()> {
    let n = 3;
    println!("cluster: {n} nodes, {per_node} agents per node");
    let (mut rig, _) = ClusterRig::start(
        n,
        // Every agent dials from 127.0.0.1 here; in the field they come from as many
        // addresses, so the per-address caps are lifted out of the way.
        "[enrollment]\nper_minute = 1000000\nmax_clients = 1000000\n\
         [limits]\nmax_unauthenticated_per_address = 1000000\n",
        &[],
    )
    .await?;
    let pids: Vec<u32> = rig
        .nodes
        .iter()
        .map(|r| r.pid().context("node pid"))
        .collect::<anyhow::Result<_>>()?;
    let base_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();

    // Routers, enrolled through each node in turn (one registry behind them all).
    let t = Instant::now();
    let mut shares: Vec<Vec<Identity>> = Vec::new();
    for node in &rig.nodes {
        // A connection per phase: the nodes close one left idle for a minute.
        let client = node.client().await?;
        let share = fleet::enroll_many(node, &client, per_node, "bench", 64)
            .await
            .with_context(|| {
                let log = node.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                format!(
                    "enrolling through {}; its log ends:\n{}",
                    node.url(),
                    tail.join("\n")
                )
            })?;
        shares.push(share);
    }
    println!(
        "enrolled {} routers in {:.1} s",
        n * per_node,
        t.elapsed().as_secs_f64()
    );

    // One child process per node, its agents listing that node first.
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        let file = dir.path().join(format!("agents-{i}.json"));
        std::fs::write(&file, serde_json::to_vec(share)?)?;
        let relays: Vec<String> = (0..n).map(|k| rig.nodes[(i + k) % n].url()).collect();
        let child = tokio::process::Command::new(&exe)
            .arg(CHILD_FLAG)
            .arg(&file)
            .args(&relays)
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        children.push(child);
    }
    let clients = clients_of(&rig).await?;
    let t = Instant::now();
    loop {
        let mut counts = Vec::new();
        for c in &clients {
            counts.push(links(c).await);
        }
        // Agents refused by a node's link-accept rate (LINKS_BUSY) move on to
        // their next relay, so the shares come out uneven; all of them count.
        if counts.iter().sum::<usize>() >= n * per_node {
            println!(
                "all {} linked in {:.1} s, per node {counts:?}",
                n * per_node,
                t.elapsed().as_secs_f64()
            );
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("not all linked after 10 min: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut per_link = Vec::new();
    for ((p, b), c) in pids.iter().zip(&base_rss).zip(&clients) {
        let here = links(c).await.max(1);
        per_link.push(rss_kib(*p).saturating_sub(*b) as f64 / here as f64);
    }
    println!(
        "memory per link (RSS growth / links): {}",
        per_link
            .iter()
            .enumerate()
            .map(|(i, k)| format!("node-{i} {k:.1} KiB"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Latency: one router linked to node 0, called through node 0 (same node) and
    // node 1 (one hop), interleaved, sequential on kept-alive connections.
    let mut router = None;
    for id in shares[0].iter().map(|i| &i.router_id) {
        let r = clients[0].get(&format!("/api/admin/routers/{id}")).await?;
        if r.body["data"]["node"] == "node-0" {
            router = Some(id.clone());
            break;
        }
    }
    let router = &router.context("no router of the first share is linked to node-0")?;
    let same = Session::start(&clients[0], "bench", router).await?;
    let cross = Session {
        client: clients[1].clone(),
        ..same.clone()
    };
    for _ in 0..200 {
        same.get("/api/groups").await;
        cross.get("/api/groups").await;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..2000 {
        let t = Instant::now();
        let r = same.get("/api/groups").await;
        a.push(t.elapsed());
        anyhow::ensure!(r.status == 200, "{}", r.body);
        let t = Instant::now();
        let r = cross.get("/api/groups").await;
        b.push(t.elapsed());
        anyhow::ensure!(r.status == 200, "{}", r.body);
    }
    let (a50, a99, b50, b99) = (
        percentile(&mut a, 0.5),
        percentile(&mut a, 0.99),
        percentile(&mut b, 0.5),
        percentile(&mut b, 0.99),
    );
    println!(
        "call latency, 2000 each: same node p50 {a50:.3} ms p99 {a99:.3} ms; \
         through another node p50 {b50:.3} ms p99 {b99:.3} ms; hop adds {:.3} ms at p50",
        b50 - a50
    );

    // Throughput: 64 callers for 10 s, each on routers of every node, entering
    // every node in turn (two calls in three cross a node).
    let all: Vec<String> = shares
        .iter()
        .flat_map(|s| s.iter().map(|i| i.router_id.clone()))
        .collect();
    let sid = same.id.clone();
    let until = Instant::now() + Duration::from_secs(10);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..64usize {
        let clients = clients.clone();
        let all = all.clone();
        let sid = sid.clone();
        workers.spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            let mut k = w * 7919;
            while Instant::now() < until {
                k = k.wrapping_add(104_729);
                let s = Session {
                    client: clients[k % clients.len()].clone(),
                    id: sid.clone(),
                    router_id: all[k % all.len()].clone(),
                };
                if s.get("/api/groups").await.status == 200 {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = workers.join_next().await {
        let (o, f) = r?;
        ok += o;
        failed += f;
    }
    println!(
        "throughput: {:.0} calls/s through all nodes ({ok} ok, {failed} failed in 10 s, 64 callers)",
        ok as f64 / 10.0
    );

    // SIGKILL node 0: its agents move to nodes 1 and 2.
    let before: usize = {
        let mut s = 0;
        for c in &clients[1..] {
            s += links(c).await;
        }
        s
    };
    let on_killed = links(&clients[0]).await;
    rig.kill(0).await;
    let t = Instant::now();
    let mut peak = 0f64;
    let mut last = (t, before);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut now_links = 0;
        for c in &clients[1..] {
            now_links += links(c).await;
        }
        let dt = last.0.elapsed().as_secs_f64();
        let rate = now_links.saturating_sub(last.1) as f64 / dt;
        peak = peak.max(rate);
        last = (Instant::now(), now_links);
        if now_links >= n * per_node {
            println!(
                "after SIGKILL of node-0 ({on_killed} links): all {} back on nodes 1-2 in {:.1} s, peak {:.0} links/s",
                n * per_node,
                t.elapsed().as_secs_f64(),
                peak
            );
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("only {now_links} of {} back after 10 min", n * per_node);
        }
    }
    let mut after = Vec::new();
    for (i, c) in clients.iter().enumerate().skip(1) {
        let here = links(c).await.max(1);
        after.push(format!(
            "node-{i} {:.1} KiB ({here} links)",
            rss_kib(pids[i]).saturating_sub(base_rss[i]) as f64 / here as f64
        ));
    }
    println!("memory per link after the move: {}", after.join(", "));
    drop(children);
    Ok(())
}
