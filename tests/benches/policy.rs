//! Policy engine benchmark: what a change costs end to end on the real kernel. A
//! program that prints figures (`cargo bench -p netpilot-tests --bench policy`,
//! as root); it never asserts on timing.
//!
//! The process moves itself into a fresh network namespace (so nothing outside it
//! is touched), makes a LAN and a WAN veth there, and drives the agent's engine —
//! the same code the agent runs, with the real `nft` and `tc` — against a state
//! database in a temporary directory. Each round starts from an empty kernel and
//! an empty store:
//!
//! Two scenarios: every group with a bandwidth limit, then the same with one
//! schedule each (school nights blocked in a zone with DST, so every window is
//! emitted for both offsets, guarded by `meta time`).
//!
//! 1. **Full sync**: 50 groups × 250 devices in one `sync-all`: compile, tc classes, one nft
//!    transaction, read-back verify, store. Beside it, a bare `nft -f` of the same
//!    script into an empty namespace, which is the floor.
//! 2. **One device moved** between groups, as `POST /api/groups/sync` of the
//!    receiving group does it (an incremental element change).
//! 3. **A policy change** on one group (new rates: tc only).
//! 4. **A full check** (read back and compare, no change), what the periodic drift
//!    check costs.
//!
//! The engine keeps fw4's copies of the rules as the agent does (a live copy checked
//! with `nft -c`, a boot copy when the policy changed), in the temporary directory.
//! The agent writes them in a task of their own just after an apply; here that
//! write is run and timed after the change returns (`then fw4 copies`).
//!
//! Figures are medians over the rounds, with min and max.

use std::sync::Arc;
use std::time::{Duration, Instant};

use netpilot_agent::policy::engine::{Engine, EngineConfig};
use netpilot_agent::policy::execute::Enforcers;
use netpilot_agent::policy::fw4::{Fw4Paths, Keeper};
use netpilot_agent::policy::model::{Bandwidth, Device, Group, Mac, Policy, Schedule};
use netpilot_agent::policy::ops;
use netpilot_agent::policy::persist::Actor;
use netpilot_agent::policy::schedule::{LocalWindow, Restriction, Weekdays};
use netpilot_agent::store::Store;
use netpilot_agent::system::files::MemFiles;
use netpilot_agent::system::nft::{Firewall, RealNft};
use netpilot_agent::system::tc::RealTc;

const GROUPS: u32 = 50;
const PER_GROUP: u32 = 250;
const ROUNDS: usize = 7;

fn main() -> anyhow::Result<()> {
    let _netns = netpilot_tests::enter_bench_namespace("policy", None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench())
}

fn groups(moved: bool, scheduled: bool) -> Vec<Group> {
    (1..=GROUPS)
        .map(|g| {
            let mut devices: Vec<Device> = (0..PER_GROUP)
                .map(|i| Device {
                    mac: Mac([0x02, 0x4e, (g >> 8) as u8, g as u8, (i >> 8) as u8, i as u8]),
                    ipv4: Some(
                        format!("10.{}.{}.{}", g, i / 250, 1 + i % 250)
                            .parse()
                            .expect("ip"),
                    ),
                    ipv6: None,
                    name: Some(format!("device {g}/{i}")),
                })
                .collect();
            if moved {
                // Device 0 of group 1 moves to group 2.
                if g == 1 {
                    devices.remove(0);
                }
                if g == 2 {
                    devices.push(Device {
                        mac: Mac([0x02, 0x4e, 0, 1, 0, 0]),
                        ipv4: Some("10.1.0.1".parse().expect("ip")),
                        ipv6: None,
                        name: Some("device 1/0".into()),
                    });
                }
            }
            Group {
                id: g,
                name: format!("group {g}"),
                devices,
                policy: Policy {
                    bandwidth: Bandwidth {
                        down_kbps: Some(1000 * g),
                        up_kbps: Some(500 * g),
                    },
                    schedules: if scheduled {
                        vec![Schedule {
                            window: LocalWindow {
                                days: Weekdays(0b0011_1110),
                                start_min: 22 * 60,
                                end_min: 6 * 60 + 30,
                            },
                            action: Restriction::Block,
                        }]
                    } else {
                        Vec::new()
                    },
                    ..Policy::default()
                },
            }
        })
        .collect()
}

/// The engine as the agent runs it, keeping fw4's copies (in `dir`) too.
fn engine(dir: &std::path::Path) -> anyhow::Result<Engine> {
    let keeper = Keeper::new(
        Fw4Paths {
            live_dir: dir.join("fw4"),
            include: dir.join("ruleset-post/netpilot.nft"),
            boot: dir.join("boot.nft"),
        },
        Arc::new(RealNft::default()),
    );
    Ok(Engine::new(
        Store::open(dir)?,
        Enforcers {
            nft: Arc::new(RealNft::default()),
            tc: Arc::new(RealTc::default()),
            // The bench's groups filter no DNS: no resolver is started.
            dns: Arc::new(netpilot_agent::system::dnsmasq::FakeResolver::default()),
        },
        Arc::new(MemFiles::default()),
        EngineConfig {
            lan_ifs: vec!["lan0".into()],
            wan_if: "wan0".into(),
            timezone: Some("CET-1CEST,M3.5.0,M10.5.0/3".into()),
            check_interval: Duration::from_secs(3600),
            kernel_minutes_west: Arc::new(|| 0),
            dns: Default::default(),
        },
        netpilot_agent::runtime::clock::system_clock(),
    )?
    .with_fw4(keeper))
}

async fn clean() -> anyhow::Result<()> {
    let nft = RealNft::default();
    if nft.observe().await?.is_some() {
        nft.apply("delete table inet netpilot\n").await?;
    }
    for dev in ["lan0", "wan0"] {
        let _ = std::process::Command::new("tc")
            .args(["qdisc", "del", "dev", dev, "root"])
            .stderr(std::process::Stdio::null())
            .status();
    }
    Ok(())
}

#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn line(&mut self, what: &str) {
        self.0.sort_by(f64::total_cmp);
        let n = self.0.len();
        println!(
            "{what:<48} median {:>8.1} ms   min {:>8.1}   max {:>8.1}",
            self.0[n / 2],
            self.0[0],
            self.0[n - 1]
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn bench() -> anyhow::Result<()> {
    scenario(false).await?;
    println!();
    scenario(true).await
}

async fn scenario(scheduled: bool) -> anyhow::Result<()> {
    let actor = Actor::default();
    let mut phases: [Series; 5] = Default::default();
    let (mut full_fw4, mut moved_fw4) = (Series(vec![]), Series(vec![]));
    let (mut full, mut bare, mut compile, mut moved, mut policy, mut check) = (
        Series(vec![]),
        Series(vec![]),
        Series(vec![]),
        Series(vec![]),
        Series(vec![]),
        Series(vec![]),
    );
    let mut script_bytes = 0;
    for _ in 0..ROUNDS {
        clean().await?;
        let dir = tempfile::tempdir()?;
        let e = engine(dir.path())?;

        let t = Instant::now();
        let (_, r) = e
            .change(&actor, "bench full", |d| {
                ops::sync_all(d, groups(false, scheduled))
            })
            .await?;
        full.0.push(ms(t.elapsed()));
        anyhow::ensure!(r.nft == "table", "full sync applied {:?}", r.nft);
        let p = &r.phases;
        for (series, v) in
            phases
                .iter_mut()
                .zip([p.compile_ms, p.tc_ms, p.nft_ms, p.verify_ms, p.store_ms])
        {
            series.0.push(v);
        }
        // What the agent's writer task does next, off the apply's path.
        let t = Instant::now();
        e.write_copies().await;
        full_fw4.0.push(ms(t.elapsed()));
        anyhow::ensure!(
            e.status().fw4.is_some_and(|f| f.in_step),
            "{:?}",
            e.status().fw4
        );

        // As the API moves a device: one group synced with the device added.
        let target = groups(true, scheduled).into_iter().nth(1).expect("group 2");
        let t = Instant::now();
        let (_, r) = e
            .change(&actor, "bench move", |d| ops::sync_group(d, target))
            .await?;
        moved.0.push(ms(t.elapsed()));
        anyhow::ensure!(r.nft == "elements", "a move applied {:?}", r.nft);
        let t = Instant::now();
        e.write_copies().await;
        moved_fw4.0.push(ms(t.elapsed()));

        let t = Instant::now();
        e.change(&actor, "bench policy", |d| {
            let p = Policy {
                bandwidth: Bandwidth {
                    down_kbps: Some(777),
                    up_kbps: Some(333),
                },
                ..d.groups[&7].policy.clone()
            };
            ops::set_policy(d, 7, p)
        })
        .await?;
        policy.0.push(ms(t.elapsed()));

        let t = Instant::now();
        let drift = e.reconcile("bench").await?;
        check.0.push(ms(t.elapsed()));
        anyhow::ensure!(drift.is_empty(), "drift after the changes: {drift:?}");

        // The floor: the same full table by hand into an empty kernel.
        let desired = e.desired().await;
        let zone = netpilot_agent::policy::tz::Zone::parse("CET-1CEST,M3.5.0,M10.5.0/3")?;
        let ctx =
            netpilot_agent::policy::compile::Context::new("lan0", "wan0", &zone, 1_795_435_200);
        let t = Instant::now();
        let compiled = netpilot_agent::policy::compile::compile(&desired, &ctx)?;
        compile.0.push(ms(t.elapsed()));
        let script = compiled.full_script();
        script_bytes = script.len();
        clean().await?;
        let t = Instant::now();
        RealNft::default().apply(&script).await?;
        bare.0.push(ms(t.elapsed()));
    }
    clean().await?;
    println!(
        "policy engine, {GROUPS} groups x {PER_GROUP} devices ({} devices), each limited{}, {ROUNDS} rounds, script {} KiB",
        GROUPS * PER_GROUP,
        if scheduled { " and scheduled (Mon-Fri 22:00-06:30 block, Berlin, DST-guarded)" } else { "" },
        script_bytes / 1024
    );
    full.line("full sync (sync-all, end to end)");
    for (series, name) in phases
        .iter_mut()
        .zip(["compile", "tc", "nft", "verify", "store"])
    {
        series.line(&format!("  {name}"));
    }
    full_fw4.line("  then fw4 copies, off the path (nft -c, 2 files)");
    bare.line("bare `nft -f` of the same table (floor)");
    compile.line("compile only");
    moved.line("one device moved (end to end)");
    moved_fw4.line("  then fw4 copies, off the path (nft -c, 2 files)");
    policy.line("policy change on one group (end to end)");
    check.line("full check: read back and compare");
    Ok(())
}
