//! MAC vendor enrichment (issue 17): what it costs the relay. A program that prints
//! figures (`cargo bench -p netpilot-tests --bench vendors`); it asserts nothing
//! about time. Everything runs on loopback, so the client, the relays and the fake
//! agents share this machine's cores.
//!
//! 1. **Latency.** Two relays side by side in one run, one with `[vendors] enabled =
//!    true` (the default), one with `false`, each with a fake agent (in this
//!    process, `netpilot_tests::fake_agent`) answering `GET /api/scan` with the same
//!    realistic 250-device answer (the agent's fields; real MA-L blocks, MA-M and
//!    MA-S ones, randomized and unknown MACs). Calls alternate between the two
//!    (which goes first alternates too), at concurrency 1; p50 and p99 of each, the
//!    added latency (p50 difference and ratio), each relay's CPU time a call
//!    (`/proc/PID/stat`) and the answer sizes.
//! 2. **The transform alone**: `vendors::enrich::json` on that answer, in this
//!    process, median of many runs (and the look-up per device).
//! 3. **Memory**: each relay's RSS after start and after the calls, vendors on and
//!    off; and a third relay loading a generated full-size operator overlay (IEEE's
//!    format, 40,000 MA-L + 7,000 MA-M + 7,000 MA-S rows, in a temporary directory):
//!    its RSS after start beside a relay without it, and its start time; and the
//!    same files loaded in this process, with the heap they keep and the most
//!    loading them held (a counting allocator).
//!
//! The relay is the shipping build (`--profile relay`), built first unless
//! `NETPILOT_RELAY_BIN` names one.

#[path = "common/fleet.rs"]
mod fleet;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use netpilot_relay::vendors::{enrich, Vendors};
use netpilot_tests::fake_agent::{answer, rss_kib, whole, FakeAgent, FakeFuture};
use netpilot_tests::{EnrolledRouter, Relay, RelayOptions, Session};
use serde_json::{json, Value};

/// Bytes this process holds on the heap now, and the most it held (the overlay's
/// own cost, measured in this process beside the relays' RSS).
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: p came from System.alloc with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DEVICES: usize = 250;
const WARMUP: usize = 100;
const ROUNDS: usize = 2_000;
const TRANSFORM_RUNS: usize = 2_000;

/// Real MA-L blocks of common home devices (the embedded registry names them).
const MA_L: &[&str] = &[
    "f0:ee:7a", "3c:22:fb", "64:1b:2f", "60:70:6c", "e4:c7:67", "34:f7:16", "84:28:59", "78:28:ca",
    "d8:3a:dd", "cc:eb:5e", "e0:06:30", "d4:8a:fc", "70:f8:ae", "a0:4f:85", "60:1a:c7", "f4:64:12",
    "9c:7b:ef", "d0:43:1e", "b0:ee:7b", "f0:9f:c2", "d4:24:dd",
];
/// MA-M and MA-S blocks (inside the IEEE Registration Authority's MA-L ones).
const SMALL: &[&str] = &[
    "c8:5c:e2:7",
    "c8:5c:e2:a",
    "b8:4c:87:4",
    "8c:1f:64:af:a",
    "8c:1f:64:9b:9",
    "8c:1f:64:d0:f",
];

/// A MAC from a prefix (`aa:bb:cc`, `aa:bb:cc:d`, `aa:bb:cc:dd:e`) and a number.
fn mac_in(prefix: &str, n: usize) -> String {
    let hex: String = prefix.chars().filter(|c| *c != ':').collect();
    let low = format!("{:012x}", n * 2_654_435_761 % (1 << 48));
    let digits = format!("{hex}{}", &low[hex.len()..]);
    (0..6)
        .map(|i| &digits[2 * i..2 * i + 2])
        .collect::<Vec<_>>()
        .join(":")
}

const GROUPS: [&str; 4] = ["Guests", "Family", "Kids", "IoT"];

/// The 250 devices: 60 % real MA-L, 10 % MA-M or MA-S, 25 % randomized, 5 % unknown.
fn scan_answer() -> String {
    let devices: Vec<Value> = (0..DEVICES)
        .map(|i| {
            let (mac, randomized) = match i % 20 {
                0..=11 => (mac_in(MA_L[i % MA_L.len()], i), false),
                12 | 13 => (mac_in(SMALL[i % SMALL.len()], i), false),
                14..=18 => {
                    // Locally administered, as phones randomize them.
                    let m = mac_in(&format!("{:02x}", ((i * 37) as u8 | 0x02) & !0x01), i);
                    (m, true)
                }
                _ => (mac_in("0c:8f:20", i), false),
            };
            let wireless = i % 3 != 0;
            json!({
                "mac": mac,
                "ip": format!("192.168.{}.{}", 1 + i / 200, 2 + i % 200),
                "ips": [format!("192.168.{}.{}", 1 + i / 200, 2 + i % 200), format!("fd00::{:x}", 4096 + i)],
                "hostname": if i % 4 == 0 { Value::Null } else { json!(format!("device-{i}")) },
                "interface": if wireless { "phy1-ap0" } else { "br-lan" },
                "connection": if wireless { "wireless" } else { "wired" },
                "wireless": if wireless {
                    json!({"band": if i % 2 == 0 { "5g" } else { "2g" }, "signal_dbm": -40 - (i % 40) as i64,
                        "connected_secs": 600 + i * 13, "rx_rate_kbps": 866_700, "tx_rate_kbps": 780_000})
                } else { Value::Null },
                "online": i % 7 != 0,
                "last_seen": 1_764_900_000 + i,
                "lease_expires": 1_764_943_200 + i,
                "group": {"id": i % 4, "name": GROUPS[i % 4]},
                "blocked": i % 25 == 0,
                "blocked_by": if i % 25 == 0 { json!(["group 2"]) } else { json!([]) },
                "name": if i % 5 == 0 { json!(format!("Named {i}")) } else { Value::Null },
                "name_source": if i % 5 == 0 { "user" } else if i % 4 == 0 { "none" } else { "dhcp" },
                "randomized": randomized,
                "usage": {"bytes_rx": i as u64 * 7_919_123, "bytes_tx": i as u64 * 1_234_567,
                    "total_bytes": i as u64 * 9_153_690},
            })
        })
        .collect();
    json!({
        "success": true,
        "data": {
            "timestamp": 1_764_900_000, "total": DEVICES, "online": DEVICES - DEVICES / 7 - 1,
            "devices": devices,
            "sources": {"leases": {"state": "ok"}, "neighbours": {"state": "ok"}, "wireless": {"state": "ok"}},
        },
        "meta": {"duration_ms": 12, "request_id": "bench"},
    })
    .to_string()
}

/// IEEE-format files as large as the real ones: unique names, IEEE-like lengths.
fn write_overlay(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let header = "Registry,Assignment,Organization Name,Organization Address\r\n";
    let mut files = Vec::new();
    for (name, registry, digits, rows) in [
        ("oui.csv", "MA-L", 6, 40_000),
        ("mam.csv", "MA-M", 7, 7_000),
        ("oui36.csv", "MA-S", 9, 7_000),
    ] {
        let mut text = String::from(header);
        let (mut i, mut written) = (0u64, 0);
        while written < rows {
            // Spread over the space (an odd multiplier: no two alike), global
            // addresses only (the first octet's 0x02 bit clear).
            let v = (i * 2_654_435_761) % (1 << (4 * digits));
            i += 1;
            if v >> (4 * (digits - 2)) & 0x2 != 0 {
                continue;
            }
            written += 1;
            text.push_str(&format!(
                "{registry},{v:0digits$X},\"Generated Vendor {registry} {i} Technology Co., Ltd\",\"{i} Example Road, Example City Example Province CN 518000 \"\r\n",
                digits = digits as usize
            ));
        }
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        files.push(path);
    }
    Ok(files)
}

fn main() -> anyhow::Result<()> {
    ensure_relay()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench())?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// A relay with `config` and one router on a fake agent answering `/api/scan`
/// with `body`; its session.
async fn relay_with_agent(
    config: &str,
    body: Bytes,
) -> anyhow::Result<(Relay, FakeAgent, Session)> {
    let relay = Relay::start_single(RelayOptions {
        config: config.into(),
    })
    .await?;
    let admin = relay.client().await?;
    let identity = fleet::enroll_many(&relay, &admin, 1, "bench", 1)
        .await?
        .remove(0);
    let dir = tempfile::tempdir()?.keep();
    identity.save(&dir)?;
    let router = EnrolledRouter::at(&identity.router_id, &dir);
    let agent = FakeAgent::start(
        &relay,
        &router,
        move |parts: hyper::http::request::Parts| {
            let body = body.clone();
            Box::pin(async move {
                if parts.uri.path() == "/api/agent/health" {
                    return answer(
                        200,
                        Some("application/json"),
                        whole(
                            r#"{"success":true,"data":{"mode":"fake"},"meta":{"duration_ms":0}}"#,
                        ),
                    );
                }
                answer(200, Some("application/json"), whole(body))
            }) as FakeFuture
        },
    )
    .await?;
    let session = Session::start(&admin, "bench", &identity.router_id).await?;
    Ok((relay, agent, session))
}

/// CPU time a process has used (user and system), from `/proc/PID/stat`.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name's closing parenthesis: fields 3.. of proc(5).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // In USER_HZ ticks: 100 a second on Linux, whatever the kernel's own HZ.
    Duration::from_millis(ticks * 10)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn bench() -> anyhow::Result<()> {
    let body = scan_answer();
    let macs = body.matches("\"mac\":").count();
    println!(
        "answer: {macs} devices, {} bytes as the agent sends it",
        body.len()
    );
    let bin = netpilot_tests::binary("netpilot-relay");
    println!(
        "relay: {} ({} bytes)",
        bin.display(),
        std::fs::metadata(&bin)?.len()
    );
    let body = Bytes::from(body);

    // 1. Latency, interleaved.
    let (on, _agent_on, s_on) = relay_with_agent("", body.clone()).await?;
    let (off, _agent_off, s_off) =
        relay_with_agent("[vendors]\nenabled = false\n", body.clone()).await?;
    let rss = |r: &Relay| rss_kib(r.pid().expect("relay running")).0;
    let (on_start, off_start) = (rss(&on), rss(&off));
    let a = s_on.get("/api/scan").await;
    let b = s_off.get("/api/scan").await;
    ensure!(a.status == 200 && b.status == 200, "{} {}", a.body, b.body);
    ensure!(
        b.raw == body,
        "the relay with vendors off changed the answer"
    );
    let named = a.body["data"]["devices"]
        .as_array()
        .map_or(0, |d| d.iter().filter(|d| d["vendor"].is_string()).count());
    println!(
        "answer through the relay: {} bytes with vendors (+{} bytes, {named} of {macs} named), {} bytes without",
        a.raw.len(),
        a.raw.len() - b.raw.len(),
        b.raw.len()
    );
    for _ in 0..WARMUP {
        s_on.get("/api/scan").await;
        s_off.get("/api/scan").await;
    }
    let (mut t_on, mut t_off) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    let pid = |r: &Relay| r.pid().expect("relay running");
    let (cpu_on, cpu_off) = (cpu(pid(&on)), cpu(pid(&off)));
    for round in 0..ROUNDS {
        for first in [round % 2 == 0, round % 2 != 0] {
            let (s, times) = if first {
                (&s_on, &mut t_on)
            } else {
                (&s_off, &mut t_off)
            };
            let t = Instant::now();
            let r = s.get("/api/scan").await;
            times.push(t.elapsed());
            ensure!(r.status == 200, "{}", r.body);
        }
    }
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / ROUNDS as f64;
    let (cpu_on, cpu_off) = (
        per_call(cpu(pid(&on)) - cpu_on),
        per_call(cpu(pid(&off)) - cpu_off),
    );
    let (p50_on, p99_on) = (percentile(&mut t_on, 0.5), percentile(&mut t_on, 0.99));
    let (p50_off, p99_off) = (percentile(&mut t_off, 0.5), percentile(&mut t_off, 0.99));
    println!("GET /api/scan, {DEVICES} devices, {ROUNDS} calls each, interleaved, concurrency 1:");
    println!(
        "  vendors on   p50 {:.3} ms  p99 {:.3} ms",
        ms(p50_on),
        ms(p99_on)
    );
    println!(
        "  vendors off  p50 {:.3} ms  p99 {:.3} ms",
        ms(p50_off),
        ms(p99_off)
    );
    println!(
        "  added        p50 {:+.3} ms ({:.2}x)  p99 {:+.3} ms",
        ms(p50_on) - ms(p50_off),
        ms(p50_on) / ms(p50_off),
        ms(p99_on) - ms(p99_off)
    );
    println!(
        "  relay CPU a call: {cpu_on:.0} µs on, {cpu_off:.0} µs off ({:+.0} µs)",
        cpu_on - cpu_off
    );

    // 2. The transform alone, in this process.
    let vendors = Vendors::embedded();
    let mut runs = Vec::with_capacity(TRANSFORM_RUNS);
    let mut counts = enrich::Counts::default();
    for _ in 0..TRANSFORM_RUNS {
        let t = Instant::now();
        let (out, c) = enrich::json(&body, &vendors);
        std::hint::black_box(out);
        runs.push(t.elapsed());
        counts = c;
    }
    let median = percentile(&mut runs, 0.5);
    println!(
        "enrich::json alone: median {:.1} µs over {TRANSFORM_RUNS} runs ({:.2} µs a device; {} named, {} unknown, {} randomized)",
        median.as_secs_f64() * 1e6,
        median.as_secs_f64() * 1e6 / DEVICES as f64,
        counts.hit,
        counts.miss,
        counts.private
    );

    // 3. Memory.
    println!(
        "relay RSS after start: vendors on {} KiB, off {} KiB; after {} calls: on {} KiB, off {} KiB",
        on_start,
        off_start,
        ROUNDS + WARMUP + 1,
        rss(&on),
        rss(&off)
    );
    let dir = tempfile::tempdir()?;
    let files = write_overlay(dir.path())?;
    let size: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    let list = files
        .iter()
        .map(|f| format!("{:?}", f.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut overlay_rss = Vec::new();
    let mut fresh_rss = Vec::new();
    let mut overlay_start = Vec::new();
    let mut fresh_start = Vec::new();
    // Fresh relays, alternating, three of each: start time and RSS after start.
    for _ in 0..3 {
        let t = Instant::now();
        let with = Relay::start_single(RelayOptions {
            config: format!("[vendors]\nfiles = [{list}]\n"),
        })
        .await?;
        overlay_start.push(t.elapsed());
        let t = Instant::now();
        let without = Relay::start_single(RelayOptions::default()).await?;
        fresh_start.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
        overlay_rss.push(rss(&with));
        fresh_rss.push(rss(&without));
        let m = with.client().await?.get("/metrics").await?;
        let m = String::from_utf8_lossy(&m.raw);
        ensure!(
            m.contains("netpilot_vendor_registry_entries{source=\"file\"} 54000\n"),
            "overlay not loaded:\n{m}"
        );
    }
    overlay_rss.sort();
    fresh_rss.sort();
    // The same files loaded here: what the registry keeps on the heap, and the
    // most loading them held at once.
    let embedded_heap = {
        let before = LIVE.load(Ordering::Relaxed);
        let v = Vendors::embedded();
        let held = LIVE.load(Ordering::Relaxed) - before;
        drop(v);
        held
    };
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let t = Instant::now();
    let loaded = Vendors::load(&files)?;
    let load_time = t.elapsed();
    let (held, peak) = (
        LIVE.load(Ordering::Relaxed) - before,
        PEAK.load(Ordering::Relaxed) - before,
    );
    ensure!(loaded.file_entries() == 54_000, "{}", loaded.file_entries());
    println!(
        "operator overlay: 54,000 rows (40,000 MA-L + 7,000 MA-M + 7,000 MA-S), {:.1} MB of CSV:",
        size as f64 / 1e6
    );
    println!(
        "  relay RSS after start (median of 3): {} KiB with it, {} KiB without: +{} KiB",
        overlay_rss[1],
        fresh_rss[1],
        overlay_rss[1].saturating_sub(fresh_rss[1])
    );
    println!(
        "  start to listening (median of 3): {:.0} ms with it, {:.0} ms without",
        ms(percentile(&mut overlay_start, 0.5)),
        ms(percentile(&mut fresh_start, 0.5))
    );
    println!(
        "  heap (this process): the embedded registry alone {} KiB (its repaired names); \
         with the overlay {} KiB held, {} KiB at most while loading, {:.0} ms to load",
        embedded_heap / 1024,
        held / 1024,
        peak / 1024,
        ms(load_time)
    );
    drop(loaded);
    drop(on);
    drop(off);
    Ok(())
}

/// Builds the shipping relay next to this bench (cargo does not build another
/// package's binary for a bench), unless `NETPILOT_RELAY_BIN` names one.
fn ensure_relay() -> anyhow::Result<()> {
    if std::env::var_os("NETPILOT_RELAY_BIN").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    // <target>/release/deps/vendors-…
    let target_dir = exe
        .parent()
        .and_then(Path::parent)
        .filter(|p| p.ends_with("release"))
        .and_then(Path::parent)
        .map(Path::to_path_buf);
    let Some(target_dir) = target_dir else {
        println!("not in <target>/release; using the relay binary as it is");
        return Ok(());
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    println!("building netpilot-relay (profile relay)…");
    let status = Command::new(&cargo)
        .args([
            "build",
            "--profile",
            "relay",
            "--bin",
            "netpilot-relay",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .context("cannot run cargo to build the relay")?;
    ensure!(status.success(), "building the relay failed");
    // Still one thread: nothing reads the environment concurrently.
    std::env::set_var(
        "NETPILOT_RELAY_BIN",
        target_dir.join("relay").join("netpilot-relay"),
    );
    Ok(())
}
