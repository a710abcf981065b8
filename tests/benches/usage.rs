//! `cargo bench -p netpilot-tests --bench usage`: parse and aggregate 5,000 rows of
//! `nlbw -c json` output, and read a 35-day history of 250 devices out of SQLite
//! (with the live reading merged), as JSON and CSV. Figures are medians over the
//! rounds with min and max, and the allocations per run (counted by this program's
//! global allocator). Goal: under 20 ms for 5,000 rows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netpilot_agent::scan::names::Names;
use netpilot_agent::scan::seen::Seen;
use netpilot_agent::store::Store;
use netpilot_agent::system::files::MemFiles;
use netpilot_agent::system::nlbw::{FakeNlbw, Query};
use netpilot_agent::usage::{parse, Usage, UsageConfig};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: p came from System.alloc with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ROUNDS: usize = 30;

/// `nlbw -c json` in the default grouping: `devices` MACs with `per` rows each.
fn json(devices: usize, per: usize, scale: u64) -> String {
    let protos = [
        ("TCP", 443, "\"HTTPS\""),
        ("UDP", 443, "\"QUIC\""),
        ("TCP", 80, "\"HTTP\""),
        ("UDP", 53, "\"DNS\""),
        ("IP", 0, "null"),
    ];
    let mut rows = Vec::with_capacity(devices * per);
    for d in 0..devices {
        for p in 0..per {
            let (proto, port, l7) = protos[p % protos.len()];
            rows.push(format!(
                "[4,\"{proto}\",{port},\"02:00:00:{:02x}:{:02x}:{:02x}\",\"10.{}.{}.{}\",{},{},{},{},{},{l7}]",
                d >> 16 & 255, d >> 8 & 255, d & 255, d >> 16 & 255, d >> 8 & 255, d & 255,
                p + 1, (d as u64 * 7919 + p as u64 * 104_729) * scale, 10 + p, (d as u64 * 131 + p as u64) * scale, 5 + p
            ));
        }
    }
    format!("{{\"columns\":[\"family\",\"proto\",\"port\",\"mac\",\"ip\",\"conns\",\"rx_bytes\",\"rx_pkts\",\"tx_bytes\",\"tx_pkts\",\"layer7\"],\"data\":[{}]}}", rows.join(","))
}

fn measure<T>(what: &str, mut f: impl FnMut() -> T) {
    let mut times = Vec::with_capacity(ROUNDS);
    let mut allocs = 0;
    for _ in 0..ROUNDS {
        let a = ALLOCS.load(Ordering::Relaxed);
        let t = Instant::now();
        std::hint::black_box(f());
        times.push(t.elapsed());
        allocs = ALLOCS.load(Ordering::Relaxed) - a;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what:<52} median {:>7.2} ms  (min {:.2}, max {:.2})  {allocs:>7} allocations",
        ms(times[ROUNDS / 2]),
        ms(times[0]),
        ms(times[ROUNDS - 1])
    );
}

fn main() -> anyhow::Result<()> {
    let text = json(1000, 5, 1);
    println!(
        "nlbw -c json: 5,000 rows, 1,000 devices, {} KB",
        text.len() / 1024
    );
    measure("parse 5,000 rows", || parse::json(&text).unwrap());
    let rows = parse::json(&text).unwrap();
    measure("aggregate 5,000 rows per MAC", || parse::aggregate(&rows));
    measure("parse + aggregate 5,000 rows", || {
        parse::aggregate(&parse::json(&text).unwrap())
    });

    // 35 days of 250 devices: one reading a day into a real SQLite store.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let nlbw = Arc::new(FakeNlbw::with_fixtures());
    let clock = Arc::new(AtomicI64::new(1_795_176_000));
    let c = clock.clone();
    let usage = Usage::new(
        nlbw.clone(),
        Arc::new(MemFiles::default()),
        Arc::new(move || c.load(Ordering::SeqCst)),
        Arc::new(|_| 0),
        Store::open(dir.path())?,
        UsageConfig {
            cache_ttl: Duration::ZERO,
            ..Default::default()
        },
        Arc::new(Seen::open(Store::open(dir.path())?, 1_795_176_000)?),
    )?;
    let names = Names::default();
    let q = Query::Json {
        group_by: None,
        period: None,
    };
    let flush_start = Instant::now();
    for day in 1..=35u64 {
        nlbw.answer(q, &json(250, 2, day));
        rt.block_on(usage.current(0, 10, &names))?;
        clock.fetch_add(86_400, Ordering::SeqCst);
    }
    usage.flush()?;
    println!(
        "35 daily readings of 250 devices written (35 flushes) in {:.0} ms",
        flush_start.elapsed().as_secs_f64() * 1000.0
    );
    let h = rt.block_on(usage.history(35, &names))?;
    let stored: usize = h.devices.iter().map(|d| d.days.len()).sum();
    println!("history: {} devices, {stored} device-days", h.devices.len());
    measure("history 35 days x 250 devices (JSON value)", || {
        rt.block_on(usage.history(35, &names)).unwrap()
    });
    measure("history 35 days x 250 devices (CSV)", || {
        rt.block_on(usage.history_csv(35, &names)).unwrap()
    });
    measure("summary 35 days x 250 devices", || {
        rt.block_on(usage.summary(35, &names)).unwrap()
    });
    Ok(())
}
