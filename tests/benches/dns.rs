//! DNS filtering benchmark: what a 100,000-domain block list costs on the real
//! kernel and a real dnsmasq. A program that prints figures (`cargo bench -p
//! netpilot-tests --bench dns`, as root); it never asserts on timing.
//!
//! The process moves itself into a fresh network namespace, makes a LAN veth with
//! the router's address and starts an "upstream" dnsmasq on 127.0.0.1 that answers
//! every name. The agent's engine — the same code the agent runs, with the real
//! `nft`, `tc` and `dnsmasq` — then:
//!
//! 1. **Apply**: one group with one device gets a category of 100,000 domains
//!    (compile, resolver start, nft transaction, verify, store), and separately the
//!    time until the resolver answers NXDOMAIN for a listed name (its list loaded).
//! 2. **Replace** the category with another 100,000 domains: the servers file is
//!    rewritten and the resolver reloaded (SIGHUP), timed until a new name is
//!    refused.
//! 3. **Memory**: the resolver's resident set with 100,000 domains and with one.
//! 4. **Query latency** p50/p99 over UDP, side by side in one run: blocked names
//!    and allowed names (forwarded to the upstream, each name new so not cached)
//!    through the filtering resolver; the same allowed names asked of a resolver
//!    with a one-domain list; and the upstream asked directly (the floor).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netpilot_agent::dns::domain::{normalize, Domain};
use netpilot_agent::policy::categories;
use netpilot_agent::policy::compile::resolvers::{self, DnsConfig};
use netpilot_agent::policy::engine::{Engine, EngineConfig};
use netpilot_agent::policy::execute::Enforcers;
use netpilot_agent::policy::model::{Device, DnsPolicy, Group, Mac, Policy};
use netpilot_agent::policy::ops;
use netpilot_agent::policy::persist::Actor;
use netpilot_agent::store::Store;
use netpilot_agent::system::dnsmasq::{RealDnsmasq, Resolver};
use netpilot_agent::system::files::MemFiles;
use netpilot_agent::system::nft::RealNft;
use netpilot_agent::system::tc::RealTc;
use netpilot_testkit::netns::run;
use netpilot_testkit::XorShift;

const DOMAINS: usize = 100_000;
const ROUNDS: usize = 5;
const QUERIES: usize = 2_000;
const LAN_IP: &str = "192.168.77.1";
const PORT_BASE: u16 = 5400;

fn main() -> anyhow::Result<()> {
    let _netns = netpilot_tests::enter_bench_namespace("DNS", Some("192.168.77.1/24"))?;
    let tmp = tempfile::tempdir()?;
    let upstream_pid = tmp.path().join("upstream.pid");
    run(&[
        "dnsmasq",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--address=/#/10.0.0.1",
        "--user=root",
        "--cache-size=0",
        &format!("--pid-file={}", upstream_pid.display()),
    ])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(bench(tmp.path()));
    // Whatever happened: no dnsmasq outlives the bench (the namespace goes with the
    // last process in it, and these would stay).
    for entry in std::fs::read_dir(tmp.path())?.flatten() {
        kill_pidfile(&entry.path());
    }
    for entry in std::fs::read_dir(tmp.path().join("dns"))
        .into_iter()
        .flatten()
        .flatten()
    {
        kill_pidfile(&entry.path());
    }
    result
}

fn kill_pidfile(path: &std::path::Path) {
    if path.extension().is_some_and(|x| x == "pid") {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// Realistic-looking names: a few labels of letters and digits under common TLDs.
fn domains(seed: u64, n: usize) -> Vec<Domain> {
    let mut rng = XorShift::new(seed);
    let tlds = ["com", "net", "org", "io", "de", "co.uk", "info"];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = rng.next_u64();
        let len = 6 + (r % 12) as usize;
        let name: String = (0..len)
            .map(|i| {
                b"abcdefghijklmnopqrstuvwxyz0123456789"[((r >> (i * 2)) % 36) as usize] as char
            })
            .collect();
        let sub = if r % 5 == 0 { "ads." } else { "" };
        out.push(
            normalize(&format!(
                "{sub}{name}{}.{}",
                r % 1000,
                tlds[(r >> 40) as usize % tlds.len()]
            ))
            .expect("generated names are valid"),
        );
    }
    out.sort();
    out.dedup();
    out
}

fn engine(dir: &std::path::Path) -> anyhow::Result<(Engine, Arc<RealDnsmasq>)> {
    let dns = Arc::new(RealDnsmasq {
        dir: dir.join("dns"),
        user: Some("root".into()),
        ..Default::default()
    });
    let engine = Engine::new(
        Store::open(dir)?,
        Enforcers {
            nft: Arc::new(RealNft::default()),
            tc: Arc::new(RealTc::default()),
            dns: dns.clone(),
        },
        Arc::new(MemFiles::default()),
        EngineConfig {
            lan_ifs: vec!["lan0".into()],
            wan_if: "wan0".into(),
            timezone: Some("UTC0".into()),
            check_interval: Duration::from_secs(3600),
            kernel_minutes_west: Arc::new(|| 0),
            dns: DnsConfig {
                port_base: PORT_BASE,
                upstreams: vec!["127.0.0.1".into()],
                ..Default::default()
            },
        },
        netpilot_agent::runtime::clock::system_clock(),
    )?;
    Ok((engine, dns))
}

fn group(id: u32, category: &str) -> Group {
    Group {
        id,
        name: format!("g{id}"),
        devices: vec![Device {
            mac: Mac([0x02, 0x4e, 0x50, 0, 0, id as u8]),
            ipv4: None,
            ipv6: None,
            name: None,
        }],
        policy: Policy {
            dns: DnsPolicy {
                categories: [category.to_owned()].into(),
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

/// A DNS query for `name` type A; returns the response code and the time taken.
fn query(sock: &UdpSocket, to: SocketAddr, id: u16, name: &str) -> anyhow::Result<(u8, Duration)> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let t = Instant::now();
    sock.send_to(&q, to)?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = sock.recv_from(&mut buf).context("no DNS answer")?;
        if n >= 4 && buf[..2] == id.to_be_bytes() {
            return Ok((buf[3] & 0x0f, t.elapsed()));
        }
    }
}

const NXDOMAIN: u8 = 3;

/// Polls until `name` gets `rcode`: the resolver has (re)loaded its list.
fn until(sock: &UdpSocket, to: SocketAddr, name: &str, rcode: u8) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut id = 1u16;
    loop {
        if let Ok((r, _)) = query(sock, to, id, name) {
            if r == rcode {
                return Ok(t.elapsed());
            }
        }
        id = id.wrapping_add(1);
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{name} never answered rcode {rcode} at {to}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Series(Vec<f64>);

impl Series {
    fn pct(&mut self, p: f64) -> f64 {
        self.0.sort_by(f64::total_cmp);
        self.0[((self.0.len() - 1) as f64 * p).round() as usize]
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn latency(
    sock: &UdpSocket,
    to: SocketAddr,
    names: &[String],
    want: u8,
) -> anyhow::Result<(f64, f64)> {
    let mut s = Series(Vec::with_capacity(names.len()));
    for (i, n) in names.iter().enumerate() {
        let (r, d) = query(sock, to, i as u16, n)?;
        if r != want {
            bail!("{n} at {to}: rcode {r}, expected {want}");
        }
        s.0.push(d.as_secs_f64() * 1e6);
    }
    Ok((s.pct(0.5), s.pct(0.99)))
}

async fn bench(dir: &std::path::Path) -> anyhow::Result<()> {
    let actor = Actor::default();
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let list_a = domains(0x9e37_79b9_7f4a_7c15, DOMAINS);
    let list_b = domains(0xdead_beef_cafe_f00d, DOMAINS);
    println!(
        "DNS filtering, one group, a category of {} domains (median of {ROUNDS} rounds)",
        list_a.len()
    );
    let (mut apply, mut loaded, mut replace, mut reloaded) = (
        Series(vec![]),
        Series(vec![]),
        Series(vec![]),
        Series(vec![]),
    );
    let (mut p_compile, mut p_dns, mut p_nft) = (Series(vec![]), Series(vec![]), Series(vec![]));
    let mut rss_big = 0;
    let mut servers_bytes = 0;
    let mut latency_report = String::new();
    for round in 0..ROUNDS {
        let state = tempfile::tempdir_in(dir)?;
        let (e, dns) = engine(state.path())?;
        let big = categories::category("big", "bench", list_a.clone(), Some(0));
        let t = Instant::now();
        let (_, r) = e
            .change(&actor, "bench apply", |d| {
                ops::set_category(d, big)?;
                ops::sync_group(d, group(1, "big"))
            })
            .await?;
        apply.0.push(ms(t.elapsed()));
        p_compile.0.push(r.phases.compile_ms);
        p_dns.0.push(r.phases.dns_ms);
        p_nft.0.push(r.phases.nft_ms);
        let slot = e.read(|d| d.slots[&1]).await;
        let at: SocketAddr = format!("{LAN_IP}:{}", resolvers::port_of(PORT_BASE, slot)).parse()?;
        loaded.0.push(ms(
            t.elapsed() + until(&sock, at, list_a[round * 7].as_str(), NXDOMAIN)?
        ));
        rss_big = dns.memory_kib(&resolvers::instance_id(slot)).unwrap_or(0);
        servers_bytes =
            std::fs::metadata(state.path().join("dns").join(format!("g{slot}.servers")))
                .map(|m| m.len())
                .unwrap_or(0);

        let next = categories::category("big", "bench", list_b.clone(), Some(1));
        let t = Instant::now();
        e.change(&actor, "bench replace", |d| ops::set_category(d, next))
            .await?;
        replace.0.push(ms(t.elapsed()));
        reloaded.0.push(ms(
            t.elapsed() + until(&sock, at, list_b[round * 7].as_str(), NXDOMAIN)?
        ));

        if round + 1 == ROUNDS {
            latency_report = latencies(&e, &dns, &sock, at, &list_b).await?;
        }
        e.change(&actor, "bench reset", |d| {
            ops::reset(d);
            Ok(())
        })
        .await?;
    }
    println!(
        "apply (compile, start resolver, nft, verify, store)  {:>8.1} ms",
        apply.pct(0.5)
    );
    println!(
        "  of which compile {:.1} ms, resolver {:.1} ms, nft {:.1} ms",
        p_compile.pct(0.5),
        p_dns.pct(0.5),
        p_nft.pct(0.5)
    );
    println!(
        "apply until the list answers                         {:>8.1} ms",
        loaded.pct(0.5)
    );
    println!(
        "replace the list (write, SIGHUP)                     {:>8.1} ms",
        replace.pct(0.5)
    );
    println!(
        "replace until the new list answers                   {:>8.1} ms",
        reloaded.pct(0.5)
    );
    println!(
        "servers file                                         {:>8.1} MB",
        servers_bytes as f64 / 1e6
    );
    println!(
        "resolver resident memory, {} domains            {:>8.1} MB",
        list_a.len(),
        rss_big as f64 / 1024.0
    );
    print!("{latency_report}");
    Ok(())
}

async fn latencies(
    e: &Engine,
    dns: &RealDnsmasq,
    sock: &UdpSocket,
    at: SocketAddr,
    list: &[Domain],
) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let actor = Actor::default();
    // A second group with a one-domain list: the same resolver without the list.
    let one = categories::category("one", "bench", vec![normalize("only.example")?], Some(0));
    e.change(&actor, "bench small", |d| {
        ops::set_category(d, one)?;
        ops::sync_group(d, group(2, "one"))
    })
    .await?;
    let slot2 = e.read(|d| d.slots[&2]).await;
    let small: SocketAddr = format!("{LAN_IP}:{}", resolvers::port_of(PORT_BASE, slot2)).parse()?;
    until(sock, small, "only.example", NXDOMAIN)?;
    let rss_small = dns.memory_kib(&resolvers::instance_id(slot2)).unwrap_or(0);
    let upstream: SocketAddr = "127.0.0.1:53".parse()?;

    let blocked: Vec<String> = (0..QUERIES)
        .map(|i| format!("x{i}.{}", list[(i * 37) % list.len()]))
        .collect();
    let allowed = |tag: &str| -> Vec<String> {
        (0..QUERIES)
            .map(|i| format!("n{i}.{tag}.allowed.example"))
            .collect()
    };
    let (b50, b99) = latency(sock, at, &blocked, NXDOMAIN)?;
    let (a50, a99) = latency(sock, at, &allowed("big"), 0)?;
    let (s50, s99) = latency(sock, small, &allowed("small"), 0)?;
    let (u50, u99) = latency(sock, upstream, &allowed("up"), 0)?;
    let mut out = String::new();
    writeln!(
        out,
        "query latency over UDP, {QUERIES} queries each (µs)        p50      p99"
    )?;
    writeln!(
        out,
        "  blocked name, 100k list (answered locally)     {b50:>8.0} {b99:>8.0}"
    )?;
    writeln!(
        out,
        "  allowed name, 100k list (forwarded, not cached) {a50:>7.0} {a99:>8.0}"
    )?;
    writeln!(
        out,
        "  allowed name, 1-domain list (forwarded)        {s50:>8.0} {s99:>8.0}"
    )?;
    writeln!(
        out,
        "  upstream asked directly (floor)                {u50:>8.0} {u99:>8.0}"
    )?;
    writeln!(
        out,
        "  allowed 100k / 1-domain p50 ratio              {:>8.2}",
        a50 / s50
    )?;
    writeln!(
        out,
        "resolver resident memory, 1 domain               {:>8.1} MB",
        rss_small as f64 / 1024.0
    )?;
    Ok(out)
}
