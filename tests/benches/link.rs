//! Link benchmark: what the relay hop costs, and what an idle agent link costs the
//! relay. A program that prints figures (`cargo bench -p netpilot-tests --bench
//! link`); it never asserts on timing. Everything runs on loopback, so the load
//! generator, the relay and the agents share this machine's cores.
//!
//! 1. **Latency** at concurrency 1 of `GET /api/agent/health`, a trivial agent
//!    endpoint: through the relay (HTTPS + HTTP/2 with an API key and a session,
//!    forwarded over the agent's link) versus the same agent's local listener
//!    (`--api-listen`, plain HTTP/1.1 keep-alive). The agent is the real
//!    `netpilot-agent run --simulate` process. The two paths alternate in rounds so
//!    machine noise hits both alike; each figure is the median over rounds, and
//!    "relay-added" is relay minus direct.
//! 2. **Throughput** of the same call with a fixed number of requests in flight for
//!    a fixed time: through the relay (streams spread over a few HTTP/2 connections)
//!    to one agent, and directly (one HTTP/1.1 keep-alive connection per in-flight
//!    request). CPU use of each process during the run is printed beside it.
//! 3. **Relay memory per idle agent**: a fresh relay process; 1,000 routers are
//!    created and enrolled through its API, its `VmRSS` is read, then 1,000 agents —
//!    run inside this process with the agent library (`netpilot_agent::serve` over a
//!    simulated router) — connect; once all are connected and the relay has
//!    settled, `VmRSS` is read again. (after − before) / agents is the link's cost;
//!    the registry rows' cost (RSS growth over enrollment) is printed separately.
//!    While waiting, the bench polls `/health` (`connected_agents`), not the admin
//!    list: one list of 1,000 routers grows the relay's RSS by megabytes of
//!    transient allocations, which polling would add to the per-link figure. The
//!    admin list is read once, after the measurement, to confirm `online`, and the
//!    RSS it costs is printed too.
//!
//! The relay and agent binaries are built first, as they ship (the agent
//! `--release`, the relay `--profile relay`), unless `NETPILOT_RELAY_BIN` and
//! `NETPILOT_AGENT_BIN` name them. The open-file
//! limit is raised before the relay starts, so the relay inherits it.

#[path = "common/fleet.rs"]
mod fleet;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper::header::{HeaderValue, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use netpilot_agent::link::tls::Trust;
use netpilot_tests::{q, start_session, Agent, Client, Relay, RelayOptions};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Enrollment is rate limited per address; the bench enrolls 1,000 routers from one.
const RELAY_CONFIG: &str = "[enrollment]\nper_minute = 100000\n";
const USER: &str = "bench-user";
const HEALTH: &str = "/api/agent/health";

const WARMUP_CALLS: usize = 500;
const ROUNDS: usize = 10;
const CALLS_PER_ROUND: usize = 500;

const IN_FLIGHT: usize = 64;
const RELAY_CONNECTIONS: usize = 4;
const THROUGHPUT_WARMUP: Duration = Duration::from_millis(500);
const THROUGHPUT_RUN: Duration = Duration::from_secs(3);

const AGENTS: usize = 1_000;
const ENROLL_CONCURRENCY: usize = 32;
const ONLINE_WITHIN: Duration = Duration::from_secs(90);
const SETTLE: Duration = Duration::from_secs(2);

const GOAL_P50_MS: f64 = 0.5;
const GOAL_P99_MS: f64 = 2.0;
const GOAL_CALLS_PER_S: f64 = 10_000.0;
const GOAL_KIB_PER_AGENT: f64 = 64.0;

fn main() -> anyhow::Result<()> {
    let nofile = raise_nofile_limit()?;
    ensure_binaries()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(nofile));
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(nofile: u64) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("NetPilot link benchmark — loopback, {cores} cores shared by load generator, relay and agent(s)");
    let log = std::env::var("NETPILOT_TEST_LOG").unwrap_or_else(|_| "info".into());
    println!("open-file limit of this process and the relay: {nofile}; relay and agent log filter: {log} (NETPILOT_TEST_LOG)\n");

    let (latency, throughput) = {
        let relay = Relay::start(RelayOptions {
            config: RELAY_CONFIG.into(),
        })
        .await?;
        let figures = latency_and_throughput(&relay).await;
        if figures.is_err() {
            eprintln!("relay log:\n{}", tail(&relay.log(), 40));
        }
        figures?
    };
    let memory = relay_memory().await?;

    let report = Report {
        latency,
        throughput,
        memory,
    };
    report.print_table();
    report.print_markdown();
    Ok(())
}

// ---------------------------------------------------------------------------
// 1 and 2: latency and throughput, through the relay and direct
// ---------------------------------------------------------------------------

async fn latency_and_throughput(relay: &Relay) -> anyhow::Result<(Latency, Throughput)> {
    check_child_nofile(relay.pid())?;
    let router = relay.enrolled_router(USER).await?;
    let mut agent = Agent::start(&router, &["--simulate", "--api-listen", "127.0.0.1:0"]).await?;
    let agent_addr = agent
        .api_addr
        .ok_or_else(|| anyhow!("the agent did not report its API address"))?;
    relay
        .wait_online(&router.router_id, true, Duration::from_secs(30))
        .await?;
    let admin = relay.client().await?;
    let session = start_session(&admin, USER, &router.router_id).await?;
    let target: Uri = format!("https://relay{}", q(HEALTH, &session, &router.router_id)).parse()?;

    let mut via_relay = RelayCaller::connect(relay, target.clone()).await?;
    let mut direct = DirectCaller::connect(agent_addr).await?;
    // Both paths must reach the same agent and get the same kind of answer.
    for body in [via_relay.call().await?, direct.call().await?] {
        let v: Value = serde_json::from_slice(&body)?;
        ensure!(
            v["success"] == json!(true) && v["data"]["router_id"] == json!(router.router_id),
            "unexpected health answer: {v}"
        );
    }

    println!("latency: {WARMUP_CALLS} warm-up calls per path, then {ROUNDS} rounds × {CALLS_PER_ROUND} calls per path");
    let latency = measure_latency(&mut via_relay, &mut direct).await?;

    println!(
        "throughput: {IN_FLIGHT} in flight for {} s per path (relay: over {RELAY_CONNECTIONS} h2 connections; direct: {IN_FLIGHT} HTTP/1.1 connections)",
        THROUGHPUT_RUN.as_secs_f64()
    );
    let pids = Pids {
        relay: relay.pid(),
        agent: agent.pid(),
    };
    let mut relay_callers = Vec::new();
    for _ in 0..RELAY_CONNECTIONS {
        let c = RelayCaller::connect(relay, target.clone()).await?;
        relay_callers.extend(std::iter::repeat_n(c, IN_FLIGHT / RELAY_CONNECTIONS));
    }
    let mut direct_callers = Vec::new();
    for _ in 0..IN_FLIGHT {
        direct_callers.push(DirectCaller::connect(agent_addr).await?);
    }
    let via_relay = load(relay_callers, pids).await?;
    let direct = load(direct_callers, pids).await?;
    agent.kill().await;
    Ok((latency, Throughput { via_relay, direct }))
}

/// One way of calling the health endpoint.
trait Caller: Send + 'static {
    /// Makes one call; fails unless the answer is 200 with its whole body read.
    fn call(&mut self) -> impl Future<Output = anyhow::Result<Bytes>> + Send;
}

/// Through the relay: HTTPS, HTTP/2, API key, session and router in the query.
#[derive(Clone)]
struct RelayCaller {
    sender: http2::SendRequest<Empty<Bytes>>,
    target: Uri,
    key: HeaderValue,
}

impl RelayCaller {
    async fn connect(relay: &Relay, target: Uri) -> anyhow::Result<RelayCaller> {
        let tls = netpilot_agent::link::tls::client_config(&Trust::Fingerprint(
            relay.fingerprint.clone(),
        ))?;
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(relay.addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(conn);
        let key = HeaderValue::from_str(&format!("Bearer {}", netpilot_tests::API_KEY))?;
        Ok(RelayCaller {
            sender,
            target,
            key,
        })
    }
}

impl Caller for RelayCaller {
    async fn call(&mut self) -> anyhow::Result<Bytes> {
        let req = Request::get(self.target.clone())
            .header(AUTHORIZATION, self.key.clone())
            .body(Empty::new())?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        read_ok(resp).await
    }
}

/// Straight to the agent's local listener: plain HTTP/1.1 keep-alive.
struct DirectCaller {
    sender: http1::SendRequest<Empty<Bytes>>,
    host: HeaderValue,
}

impl DirectCaller {
    async fn connect(addr: SocketAddr) -> anyhow::Result<DirectCaller> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(DirectCaller {
            sender,
            host: HeaderValue::from_str(&addr.to_string())?,
        })
    }
}

impl Caller for DirectCaller {
    async fn call(&mut self) -> anyhow::Result<Bytes> {
        let req = Request::get(HEALTH)
            .header(HOST, self.host.clone())
            .body(Empty::new())?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        read_ok(resp).await
    }
}

async fn read_ok(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Bytes> {
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        bail!("answer {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

/// Percentiles of one round, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Percentiles {
    p50: f64,
    p99: f64,
    mean: f64,
}

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Percentiles {
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        // Nearest rank: the smallest sample with at least q of all samples at or below it.
        let rank = |q: f64| {
            ms(samples[((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1])
        };
        let mean = samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64;
        Percentiles {
            p50: rank(0.50),
            p99: rank(0.99),
            mean,
        }
    }

    /// The median over rounds of each figure separately.
    fn median_of(rounds: &[Percentiles]) -> Percentiles {
        let med = |f: fn(&Percentiles) -> f64| median(rounds.iter().map(f).collect());
        Percentiles {
            p50: med(|p| p.p50),
            p99: med(|p| p.p99),
            mean: med(|p| p.mean),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Latency {
    via_relay: Percentiles,
    direct: Percentiles,
    /// Range over rounds of the relay-added p50, to show how steady it was.
    added_p50_range: (f64, f64),
}

async fn measure_latency(
    via_relay: &mut RelayCaller,
    direct: &mut DirectCaller,
) -> anyhow::Result<Latency> {
    timed_calls(via_relay, WARMUP_CALLS).await?;
    timed_calls(direct, WARMUP_CALLS).await?;
    let (mut relay_rounds, mut direct_rounds) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which path goes first so neither always follows the other.
        if round % 2 == 0 {
            relay_rounds.push(Percentiles::of(
                timed_calls(via_relay, CALLS_PER_ROUND).await?,
            ));
            direct_rounds.push(Percentiles::of(timed_calls(direct, CALLS_PER_ROUND).await?));
        } else {
            direct_rounds.push(Percentiles::of(timed_calls(direct, CALLS_PER_ROUND).await?));
            relay_rounds.push(Percentiles::of(
                timed_calls(via_relay, CALLS_PER_ROUND).await?,
            ));
        }
    }
    let added: Vec<f64> = relay_rounds
        .iter()
        .zip(&direct_rounds)
        .map(|(r, d)| r.p50 - d.p50)
        .collect();
    let lo = added.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = added.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Ok(Latency {
        via_relay: Percentiles::median_of(&relay_rounds),
        direct: Percentiles::median_of(&direct_rounds),
        added_p50_range: (lo, hi),
    })
}

/// `n` calls one after another; the duration of each.
async fn timed_calls(caller: &mut impl Caller, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        caller.call().await?;
        samples.push(t.elapsed());
    }
    Ok(samples)
}

#[derive(Debug, Clone, Copy)]
struct Pids {
    relay: Option<u32>,
    agent: Option<u32>,
}

/// Calls per second under load, and each process's CPU use (% of one core).
#[derive(Debug, Clone, Copy)]
struct Load {
    calls_per_s: f64,
    relay_cpu: Option<f64>,
    agent_cpu: Option<f64>,
    bench_cpu: Option<f64>,
}

struct Throughput {
    via_relay: Load,
    direct: Load,
}

/// Runs every caller in its own task (one request in flight each): a warm-up, then
/// the measured run on the same connections.
async fn load<C: Caller>(callers: Vec<C>, pids: Pids) -> anyhow::Result<Load> {
    let (callers, _) = run_callers(callers, THROUGHPUT_WARMUP).await?;
    let ticks = clock_ticks();
    let cpu = |pid: Option<u32>| pid.and_then(|p| cpu_ticks(&p.to_string()));
    let before = (cpu(pids.relay), cpu(pids.agent), cpu_ticks("self"));
    let started = Instant::now();
    let (_, calls) = run_callers(callers, THROUGHPUT_RUN).await?;
    let secs = started.elapsed().as_secs_f64();
    let after = (cpu(pids.relay), cpu(pids.agent), cpu_ticks("self"));
    let pct =
        |b: Option<u64>, a: Option<u64>| Some(a?.saturating_sub(b?) as f64 / ticks / secs * 100.0);
    Ok(Load {
        calls_per_s: calls as f64 / secs,
        relay_cpu: pct(before.0, after.0),
        agent_cpu: pct(before.1, after.1),
        bench_cpu: pct(before.2, after.2),
    })
}

/// Calls in a loop from every caller until `run` has passed. Returns the callers
/// for another run and the number of calls made.
async fn run_callers<C: Caller>(callers: Vec<C>, run: Duration) -> anyhow::Result<(Vec<C>, u64)> {
    let deadline = Instant::now() + run;
    let mut tasks = JoinSet::new();
    for mut caller in callers {
        tasks.spawn(async move {
            let mut done = 0u64;
            while Instant::now() < deadline {
                caller.call().await?;
                done += 1;
            }
            anyhow::Ok((caller, done))
        });
    }
    let (mut callers, mut total) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        let (caller, done) = r??;
        callers.push(caller);
        total += done;
    }
    Ok((callers, total))
}

/// utime + stime of `/proc/<pid>/stat`, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------
// 3: relay memory per idle agent
// ---------------------------------------------------------------------------

struct Memory {
    agents: usize,
    rss_start_kib: u64,
    rss_enrolled_kib: u64,
    rss_connected_kib: u64,
    /// RSS growth from one admin list of every router, read after the measurement.
    list_growth_kib: u64,
    connect_secs: f64,
}

impl Memory {
    fn link_kib_per_agent(&self) -> f64 {
        (self.rss_connected_kib as f64 - self.rss_enrolled_kib as f64) / self.agents as f64
    }

    fn registry_kib_per_router(&self) -> f64 {
        (self.rss_enrolled_kib as f64 - self.rss_start_kib as f64) / AGENTS as f64
    }
}

async fn relay_memory() -> anyhow::Result<Memory> {
    let mut relay = Relay::start(RelayOptions {
        config: RELAY_CONFIG.into(),
    })
    .await?;
    let result = relay_memory_with(&relay).await;
    if result.is_err() {
        eprintln!("relay log:\n{}", tail(&relay.log(), 40));
    }
    relay.kill().await;
    result
}

async fn relay_memory_with(relay: &Relay) -> anyhow::Result<Memory> {
    let pid = relay.pid().ok_or_else(|| anyhow!("the relay has no pid"))?;
    check_child_nofile(Some(pid))?;
    let admin = relay.client().await?;
    connected_agents(&admin).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_start_kib = rss_kib(pid)?;

    println!("memory: creating and enrolling {AGENTS} routers ({ENROLL_CONCURRENCY} at a time)");
    let t = Instant::now();
    let identities = fleet::enroll_many(relay, &admin, AGENTS, USER, ENROLL_CONCURRENCY).await?;
    println!("  enrolled in {:.1} s", t.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_enrolled_kib = rss_kib(pid)?;

    println!("  connecting {AGENTS} in-process agents");
    let (stop, stopped) = watch::channel(false);
    let t = Instant::now();
    let mut agents = fleet::start_agents(identities, &stopped);
    let deadline = Instant::now() + ONLINE_WITHIN;
    let mut online = 0;
    while Instant::now() < deadline {
        online = connected_agents(&admin).await?;
        if online >= AGENTS {
            break;
        }
        // An agent's `serve` returns only at shutdown or when it cannot start.
        if let Some(done) = agents.try_join_next() {
            match done {
                Ok(Ok(())) => bail!("an agent stopped before shutdown"),
                Ok(Err(e)) => bail!("an agent failed: {e:#}"),
                Err(e) => bail!("an agent task failed: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let connect_secs = t.elapsed().as_secs_f64();
    println!(
        "  {online} online after {connect_secs:.1} s; settling {} s",
        SETTLE.as_secs()
    );
    ensure!(online > 0, "no agent came online within {ONLINE_WITHIN:?}");
    if online < AGENTS {
        println!(
            "  WARNING: only {online} of {AGENTS} agents online; the figure is per online agent"
        );
    }
    tokio::time::sleep(SETTLE).await;
    let rss_connected_kib = rss_kib(pid)?;
    let still = list_online(&admin).await?;
    let list_growth_kib = rss_kib(pid)?.saturating_sub(rss_connected_kib);
    if still != online {
        println!(
            "  WARNING: the admin list shows {still} online at the measurement (was {online})"
        );
    }
    let _ = stop.send(true);
    Ok(Memory {
        agents: still,
        rss_start_kib,
        rss_enrolled_kib,
        rss_connected_kib,
        list_growth_kib,
        connect_secs,
    })
}

/// `connected_agents` from `/health`: cheap to poll, unlike the admin list.
async fn connected_agents(admin: &Client) -> anyhow::Result<usize> {
    let r = admin.get("/health").await?;
    ensure!(r.status == 200, "health: {} {}", r.status, r.body);
    r.body["data"]["connected_agents"]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| anyhow!("health without connected_agents: {}", r.body))
}

/// `online` from the admin list.
async fn list_online(admin: &Client) -> anyhow::Result<usize> {
    let r = admin.get("/api/admin/routers").await?;
    ensure!(r.status == 200, "admin list: {} {}", r.status, r.body);
    r.body["data"]["online"]
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| anyhow!("admin list without online: {}", r.raw.len()))
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

// ---------------------------------------------------------------------------
// Setup: open-file limit and binaries
// ---------------------------------------------------------------------------

/// Raises this process's soft open-file limit to the hard limit (children, the
/// relay among them, inherit it). Returns the new soft limit.
fn raise_nofile_limit() -> anyhow::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = hard.min(1 << 20);
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard)
            .context("cannot raise the open-file limit")?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < (AGENTS as u64) * 2 + 100 {
        eprintln!("warning: open-file limit {soft} is low for {AGENTS} agents (hard limit {hard})");
    }
    Ok(soft)
}

/// Fails early when a child (the relay) cannot hold a connection per agent.
fn check_child_nofile(pid: Option<u32>) -> anyhow::Result<()> {
    let Some(pid) = pid else { return Ok(()) };
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let soft: Option<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok());
    match soft {
        Some(n) if n < AGENTS as u64 + 100 => {
            bail!("the relay's open-file limit is {n}, too low for {AGENTS} agents")
        }
        _ => Ok(()),
    }
}

/// Builds the relay and agent binaries next to this bench (cargo does not build
/// other packages' binaries for a bench), unless both are named in the environment.
fn ensure_binaries() -> anyhow::Result<()> {
    if std::env::var_os("NETPILOT_RELAY_BIN").is_some()
        && std::env::var_os("NETPILOT_AGENT_BIN").is_some()
    {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    // <target>/release/deps/link-…; the binaries belong in <target>/release.
    let profile_dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf);
    let target_dir = match &profile_dir {
        Some(p) if p.ends_with("release") => p.parent().map(Path::to_path_buf),
        _ => None,
    };
    let Some(target_dir) = target_dir else {
        println!("not in <target>/release; using the relay and agent binaries as they are");
        return Ok(());
    };
    let manifest: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Each in its shipping profile: the relay's (`relay`, panic = "unwind") is not
    // `release`, so its binary lands in <target>/relay and is named to the harness.
    for (profile, bin) in [("release", "netpilot-agent"), ("relay", "netpilot-relay")] {
        println!("building {bin} (profile {profile})…");
        let status = Command::new(&cargo)
            .args([
                "build",
                "--profile",
                profile,
                "--bin",
                bin,
                "--manifest-path",
            ])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target_dir)
            .status()
            .context("cannot run cargo to build the binaries")?;
        ensure!(status.success(), "building {bin} failed");
    }
    if std::env::var_os("NETPILOT_RELAY_BIN").is_none() {
        // Still one thread: nothing reads the environment concurrently.
        std::env::set_var(
            "NETPILOT_RELAY_BIN",
            target_dir.join("relay").join("netpilot-relay"),
        );
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

struct Report {
    latency: Latency,
    throughput: Throughput,
    memory: Memory,
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cpu(p: Option<f64>) -> String {
    p.map(|v| format!("{v:.0}%")).unwrap_or_else(|| "?".into())
}

impl Report {
    fn added_p50(&self) -> f64 {
        self.latency.via_relay.p50 - self.latency.direct.p50
    }

    fn added_p99(&self) -> f64 {
        self.latency.via_relay.p99 - self.latency.direct.p99
    }

    fn print_table(&self) {
        let (r, d) = (&self.latency.via_relay, &self.latency.direct);
        let (t, m) = (&self.throughput, &self.memory);
        println!();
        println!(
            "                                      via relay       direct   relay-added   goal"
        );
        println!("{}", "-".repeat(96));
        let row = |name: &str, rv: f64, dv: f64, goal: Option<f64>| {
            let added = rv - dv;
            let (g, v) = match goal {
                Some(g) => (format!("added ≤ {g} ms"), verdict(added <= g)),
                None => (String::new(), ""),
            };
            println!("{name:<34} {rv:>9.3} ms {dv:>9.3} ms {added:>10.3} ms   {g:<14} {v}");
        };
        row(
            "latency p50, concurrency 1",
            r.p50,
            d.p50,
            Some(GOAL_P50_MS),
        );
        row(
            "latency p99, concurrency 1",
            r.p99,
            d.p99,
            Some(GOAL_P99_MS),
        );
        row("latency mean, concurrency 1", r.mean, d.mean, None);
        println!(
            "{:<34} {:>10}/s {:>10}/s {:>13}   {:<14} {}",
            format!("throughput, {IN_FLIGHT} in flight, 1 agent"),
            thousands(t.via_relay.calls_per_s),
            thousands(t.direct.calls_per_s),
            "",
            format!("≥ {}/s", thousands(GOAL_CALLS_PER_S)),
            verdict(t.via_relay.calls_per_s >= GOAL_CALLS_PER_S)
        );
        println!(
            "{:<34} {:>12} {:>12} {:>13}   {:<14} {}",
            format!("relay RSS per idle agent ({})", m.agents),
            format!("{:.1} KiB", m.link_kib_per_agent()),
            "",
            "",
            format!("≤ {GOAL_KIB_PER_AGENT} KiB"),
            verdict(m.link_kib_per_agent() <= GOAL_KIB_PER_AGENT)
        );
        println!();
        println!(
            "latency: medians over {ROUNDS} rounds of {CALLS_PER_ROUND} calls per path; relay-added p50 ranged {:.3}–{:.3} ms over rounds",
            self.latency.added_p50_range.0, self.latency.added_p50_range.1
        );
        println!(
            "throughput CPU (% of one core): via relay — relay {}, agent {}, load generator {}; direct — agent {}, load generator {}",
            cpu(t.via_relay.relay_cpu),
            cpu(t.via_relay.agent_cpu),
            cpu(t.via_relay.bench_cpu),
            cpu(t.direct.agent_cpu),
            cpu(t.direct.bench_cpu)
        );
        println!(
            "relay RSS: {:.1} MiB at start, {:.1} MiB with {AGENTS} routers enrolled ({:.1} KiB per registry row), {:.1} MiB with {} agents connected (connected within {:.1} s)",
            m.rss_start_kib as f64 / 1024.0,
            m.rss_enrolled_kib as f64 / 1024.0,
            m.registry_kib_per_router(),
            m.rss_connected_kib as f64 / 1024.0,
            m.agents,
            m.connect_secs
        );
        println!(
            "relay RSS grew by another {:.1} MiB from one admin list of all {AGENTS} routers (read after the measurement)",
            m.list_growth_kib as f64 / 1024.0
        );
    }

    fn print_markdown(&self) {
        let (r, d) = (&self.latency.via_relay, &self.latency.direct);
        let (t, m) = (&self.throughput, &self.memory);
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        println!();
        println!("Markdown for the README:");
        println!();
        println!("| measure (loopback, {cores} cores shared) | via relay | direct to agent | relay-added | goal | |");
        println!("|---|---:|---:|---:|---|---|");
        println!(
            "| latency p50, concurrency 1 | {:.3} ms | {:.3} ms | {:.3} ms | ≤ {GOAL_P50_MS} ms | {} |",
            r.p50,
            d.p50,
            self.added_p50(),
            verdict(self.added_p50() <= GOAL_P50_MS)
        );
        println!(
            "| latency p99, concurrency 1 | {:.3} ms | {:.3} ms | {:.3} ms | ≤ {GOAL_P99_MS} ms | {} |",
            r.p99,
            d.p99,
            self.added_p99(),
            verdict(self.added_p99() <= GOAL_P99_MS)
        );
        println!(
            "| throughput, {IN_FLIGHT} in flight, one agent | {} calls/s | {} calls/s | | ≥ {} calls/s | {} |",
            thousands(t.via_relay.calls_per_s),
            thousands(t.direct.calls_per_s),
            thousands(GOAL_CALLS_PER_S),
            verdict(t.via_relay.calls_per_s >= GOAL_CALLS_PER_S)
        );
        println!(
            "| relay memory per idle agent ({} connected) | {:.1} KiB | | | ≤ {GOAL_KIB_PER_AGENT} KiB | {} |",
            m.agents,
            m.link_kib_per_agent(),
            verdict(m.link_kib_per_agent() <= GOAL_KIB_PER_AGENT)
        );
    }
}
