//! The usage service over the fake nlbw serving the captured fixtures, a fixed
//! clock and a real SQLite store in a temp directory.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::*;
use crate::system::files::MemFiles;
use crate::system::nlbw::{FakeMode, FakeNlbw};

/// 2026-11-20 12:00 UTC.
const NOON: i64 = 1_795_176_000;

struct Rig {
    nlbw: Arc<FakeNlbw>,
    clock: Arc<AtomicI64>,
    dir: std::path::PathBuf,
    files: MemFiles,
    /// The names owners gave devices (in groups).
    owner: HashMap<Mac, String>,
}

fn temp_dir() -> std::path::PathBuf {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "np-usage-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Rig {
    fn new() -> Rig {
        Rig {
            nlbw: Arc::new(FakeNlbw::with_fixtures()),
            clock: Arc::new(AtomicI64::new(NOON)),
            dir: temp_dir(),
            files: MemFiles::default().with(
                "/tmp/dhcp.leases",
                "1900000000 02:00:00:00:01:01 192.168.1.101 alice-laptop *\n",
            ),
            owner: HashMap::new(),
        }
    }

    /// What the API layer hands the service: the owner's names and the leases'.
    fn names(&self) -> Names {
        Names {
            owner: self.owner.clone(),
            dhcp: crate::scan::names::hostnames(&self.files),
        }
    }

    /// A service as the agent builds it at start-up; a second call over the same
    /// directory is an agent restart.
    fn service(&self, cache_ttl: Duration) -> Usage {
        let c = self.clock.clone();
        Usage::new(
            self.nlbw.clone(),
            Arc::new(self.files.clone()),
            Arc::new(move || c.load(Ordering::SeqCst)),
            Arc::new(|_| 0),
            Store::open(&self.dir).unwrap(),
            UsageConfig {
                cache_ttl,
                confirm_timeout: Duration::from_millis(300),
                ..Default::default()
            },
            Arc::new(Seen::open(Store::open(&self.dir).unwrap(), NOON as u64).unwrap()),
        )
        .unwrap()
    }

    fn counters(&self, devices: &[(u8, u64, u64)]) {
        let rows: Vec<String> = devices
            .iter()
            .map(|(n, rx, tx)| {
                format!(
                    "[4,\"TCP\",443,\"02:00:00:00:01:{n:02x}\",\"192.168.1.{}\",1,{rx},1,{tx},1,\"HTTPS\"]",
                    100 + *n as u32
                )
            })
            .collect();
        let text = format!(
            "{{\"columns\":[\"family\",\"proto\",\"port\",\"mac\",\"ip\",\"conns\",\"rx_bytes\",\"rx_pkts\",\"tx_bytes\",\"tx_pkts\",\"layer7\"],\"data\":[{}]}}",
            rows.join(",")
        );
        self.nlbw.answer(
            Query::Json {
                group_by: None,
                period: None,
            },
            &text,
        );
    }

    fn next_day(&self) {
        self.clock.fetch_add(86_400, Ordering::SeqCst);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mac(s: &str) -> Mac {
    Mac::parse(s).unwrap()
}

#[tokio::test]
async fn current_usage_from_the_fixtures_with_hostnames_and_protocols() {
    let rig = Rig::new();
    let u = rig.service(Duration::from_secs(5));
    let c = u.current(0, 100, &rig.names()).await.unwrap();
    assert_eq!(c.total_devices, 2);
    assert_eq!(c.period.as_deref(), Some("2026-11-01"));
    assert_eq!(c.timestamp, NOON as u64);
    let bob = &c.devices[0];
    assert_eq!(bob.mac, mac("02:00:00:00:01:02"));
    assert_eq!(bob.bytes_rx, 894198214);
    assert_eq!(bob.bytes_tx, 515962);
    assert_eq!(bob.total_bytes, 894198214 + 515962);
    assert_eq!(bob.connections, 4);
    assert_eq!(bob.hostname, None);
    assert_eq!(bob.ip, Some("192.168.1.102".parse().unwrap()));
    assert_eq!(bob.top_protocols[0].name, "IP");
    let alice = &c.devices[1];
    assert_eq!(alice.hostname.as_deref(), Some("alice-laptop"));
    assert_eq!(alice.name.as_deref(), Some("alice-laptop"));
    assert_eq!(alice.name_source, Some(NameSource::Hostname));
    assert!(alice.randomized && bob.randomized);
    assert_eq!((bob.name.as_deref(), bob.name_source), (None, None));
    let names: Vec<&str> = alice
        .top_protocols
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["HTTP", "IP", "ICMP"]);
    assert_eq!(
        c.total_bytes,
        894198214 + 515962 + 20085106 + 1438143,
        "totals cover every device, not just the page"
    );

    let page = u.current(1, 1, &rig.names()).await.unwrap();
    assert_eq!(page.devices.len(), 1);
    assert_eq!(page.devices[0].mac, alice.mac);
    assert_eq!(page.total_devices, 2);
    assert!(u
        .current(5, 10, &rig.names())
        .await
        .unwrap()
        .devices
        .is_empty());

    let one = u
        .device(mac("02-00-00-00-01-01"), &rig.names())
        .await
        .unwrap();
    assert_eq!(one.device.bytes_rx, 20085106);
    assert!(matches!(
        u.device(mac("02:00:00:00:01:09"), &rig.names()).await,
        Err(UsageError::NoSuchDevice(_))
    ));
}

#[tokio::test]
async fn readings_are_cached_for_the_ttl() {
    let rig = Rig::new();
    let u = rig.service(Duration::from_secs(60));
    u.current(0, 10, &rig.names()).await.unwrap();
    u.current(0, 10, &rig.names()).await.unwrap();
    u.device(mac("02:00:00:00:01:01"), &rig.names())
        .await
        .unwrap();
    assert_eq!(
        rig.nlbw.queries(),
        2,
        "one list and one json for three calls"
    );
    let uncached = rig.service(Duration::ZERO);
    uncached.current(0, 10, &rig.names()).await.unwrap();
    uncached.current(0, 10, &rig.names()).await.unwrap();
    assert_eq!(rig.nlbw.queries(), 6);
}

#[tokio::test]
async fn nlbwmon_down_or_garbled_is_an_error_not_an_empty_list() {
    let rig = Rig::new();
    let u = rig.service(Duration::ZERO);
    rig.nlbw.set_running(false);
    let e = u.current(0, 10, &rig.names()).await.unwrap_err();
    assert!(matches!(e, UsageError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("opkg install nlbwmon"), "{e}");
    assert!(e.to_string().contains("apk add nlbwmon"), "{e}");
    assert!(matches!(
        u.history(7, &rig.names()).await,
        Err(UsageError::Unavailable { .. })
    ));
    rig.nlbw.set_running(true);
    let full = include_str!("../../fixtures/nlbwmon/nlbw-json.json");
    rig.nlbw.answer(
        Query::Json {
            group_by: None,
            period: None,
        },
        &full[..100],
    );
    assert!(matches!(
        u.current(0, 10, &rig.names()).await,
        Err(UsageError::BadOutput(_))
    ));
    rig.nlbw.set_mode(FakeMode::NotInstalled);
    let s = u.status().await;
    assert!(!s.installed && !s.running && s.error.is_some());
}

#[tokio::test]
async fn status_reads_uci_and_lists_periods() {
    let mut rig = Rig::new();
    rig.files = rig.files.clone().with(
        NLBWMON_CONFIG,
        "config nlbwmon\n\toption database_directory '/srv/nlbw'\n\toption database_interval '1'\n\toption refresh_interval '30s'\n\toption commit_interval '24h'\n",
    );
    let s = rig.service(Duration::ZERO).status().await;
    assert!(s.installed && s.running);
    assert_eq!(s.database_directory, "/srv/nlbw");
    assert_eq!(s.period.as_deref(), Some("1"));
    assert_eq!(s.refresh_interval.as_deref(), Some("30s"));
    assert_eq!(s.current_period.as_deref(), Some("2026-11-01"));
    assert_eq!(s.history.retention_days, 35);
    let plain = Rig::new().service(Duration::ZERO).status().await;
    assert_eq!(plain.database_directory, DEFAULT_DATABASE_DIR);
}

fn day_total(h: &HistoryOut, date: &str) -> u64 {
    h.daily_totals
        .iter()
        .find(|d| d.date == date)
        .map_or(0, |d| d.bytes)
}

#[tokio::test]
async fn history_survives_an_agent_restart_and_a_reboot() {
    let rig = Rig::new();
    rig.counters(&[(1, 1000, 100)]);
    let u = rig.service(Duration::ZERO);
    u.current(0, 10, &rig.names()).await.unwrap();
    rig.counters(&[(1, 1500, 150)]);
    u.current(0, 10, &rig.names()).await.unwrap();
    u.flush().unwrap();
    drop(u);

    // The agent restarts (nlbwmon keeps running): only growth since the flush counts.
    rig.counters(&[(1, 1600, 160)]);
    let u = rig.service(Duration::ZERO);
    let h = u.history(7, &rig.names()).await.unwrap();
    assert_eq!(day_total(&h, "2026-11-20"), 1760);
    u.flush().unwrap();
    drop(u);

    // The router reboots the next day: nlbwmon's counters start again from zero.
    rig.next_day();
    rig.counters(&[(1, 40, 4), (2, 7, 3)]);
    let u = rig.service(Duration::ZERO);
    let h = u.history(7, &rig.names()).await.unwrap();
    assert_eq!(day_total(&h, "2026-11-20"), 1760, "the counted day is kept");
    assert_eq!(
        day_total(&h, "2026-11-21"),
        54,
        "everything after the reset is new"
    );
    assert_eq!(h.devices[0].mac, mac("02:00:00:00:01:01"));
    assert_eq!(h.devices[0].hostname.as_deref(), Some("alice-laptop"));
    assert_eq!(h.devices[0].total_bytes, 1760 + 44);
    assert_eq!(h.from, "2026-11-15");
    assert_eq!(h.to, "2026-11-21");
    let one_day = u.history(1, &rig.names()).await.unwrap();
    assert_eq!(one_day.daily_totals.len(), 1);

    let s = u.summary(7, &rig.names()).await.unwrap();
    assert_eq!(s.period_days, 7);
    assert_eq!(s.total_bytes, 1760 + 54);
    assert_eq!(s.top_devices[0].mac, mac("02:00:00:00:01:01"));
    let pct: f64 = s.top_devices.iter().map(|d| d.percentage).sum();
    assert!((pct - 100.0).abs() < 0.02, "{pct}");
    assert_eq!(s.daily_totals.len(), 2);
    assert_eq!(s.nlbwmon_period_bytes, 54);
}

#[tokio::test]
async fn a_counter_reset_mid_day_keeps_the_counted_part() {
    let rig = Rig::new();
    let u = rig.service(Duration::ZERO);
    rig.counters(&[(1, 500, 50)]);
    u.current(0, 10, &rig.names()).await.unwrap();
    rig.counters(&[(1, 20, 2)]);
    u.current(0, 10, &rig.names()).await.unwrap();
    rig.counters(&[(1, 30, 3)]);
    let h = u.history(1, &rig.names()).await.unwrap();
    assert_eq!(h.devices[0].days[0].bytes_rx, 530);
    assert_eq!(h.devices[0].days[0].bytes_tx, 53);
}

#[tokio::test]
async fn a_new_day_is_written_out_and_old_days_expire() {
    let rig = Rig::new();
    let u = rig.service(Duration::ZERO);
    rig.counters(&[(1, 100, 0)]);
    u.current(0, 10, &rig.names()).await.unwrap();
    assert!(u.status().await.history.last_flush.is_none());
    rig.next_day();
    rig.counters(&[(1, 150, 0)]);
    u.current(0, 10, &rig.names()).await.unwrap();
    assert!(
        u.status().await.history.last_flush.is_some(),
        "day change flushes"
    );
    // 40 days later the first day is beyond the 35-day retention.
    for _ in 0..40 {
        rig.next_day();
    }
    u.flush().unwrap();
    let h = u.history(365, &rig.names()).await.unwrap();
    assert!(
        h.daily_totals
            .iter()
            .all(|d| d.date.as_str() > "2026-11-21"),
        "{:?}",
        h.daily_totals
    );
}

#[tokio::test]
async fn csv_export_round_trips() {
    let mut rig = Rig::new();
    rig.files = rig.files.clone().with(
        "/tmp/dhcp.leases",
        "1900000000 02:00:00:00:01:01 192.168.1.101 alice-laptop *\n1900000000 02:00:00:00:01:02 192.168.1.102 bob.phone *\n",
    );
    let u = rig.service(Duration::ZERO);
    rig.counters(&[(1, 100, 10), (2, 5, 1)]);
    u.current(0, 10, &rig.names()).await.unwrap();
    rig.next_day();
    rig.counters(&[(1, 300, 20), (2, 9, 1)]);
    let json = u.history(7, &rig.names()).await.unwrap();
    let csv = u.history_csv(7, &rig.names()).await.unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("date,mac,hostname,bytes_rx,bytes_tx,total_bytes,name,name_source,randomized")
    );
    let mut back = 0;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f.len(), 9, "{line}");
        let d = json
            .devices
            .iter()
            .find(|d| d.mac.to_string() == f[1])
            .unwrap();
        assert_eq!(d.hostname.as_deref().unwrap_or(""), f[2]);
        assert_eq!(d.name.as_deref().unwrap_or(""), f[6]);
        assert_eq!(f[7], if d.name.is_some() { "hostname" } else { "" });
        assert_eq!(f[8], "true", "02:… MACs are random ones");
        let day = d.days.iter().find(|x| x.date == f[0]).unwrap();
        assert_eq!(
            (day.bytes_rx, day.bytes_tx, day.total_bytes),
            (
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
                f[5].parse().unwrap()
            )
        );
        back += 1;
    }
    assert_eq!(
        back,
        json.devices.iter().map(|d| d.days.len()).sum::<usize>()
    );
    assert_eq!(back, 4);
    assert_eq!(csv_field("a,b"), "\"a,b\"");
    assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    assert_eq!(csv_field("plain"), "plain");
}

#[tokio::test]
async fn reset_stops_removes_only_nlbwmon_files_and_starts() {
    let rig = Rig::new();
    for f in ["20261101.db.gz", "20261001.db", "keep.txt"] {
        rig.nlbw.add_file(DEFAULT_DATABASE_DIR, f);
    }
    rig.nlbw.add_file("/tmp", "0.db");
    rig.nlbw.add_file("/tmp", "20261101.db");
    let u = rig.service(Duration::ZERO);
    rig.counters(&[(1, 100, 10)]);
    u.current(0, 10, &rig.names()).await.unwrap();
    u.flush().unwrap();
    let r = u.reset(false).await.unwrap();
    assert_eq!(
        r.removed_files,
        [
            "/var/lib/nlbwmon/20261001.db",
            "/var/lib/nlbwmon/20261101.db.gz",
            "/tmp/0.db"
        ]
    );
    assert!(r.running && r.history_cleared);
    assert_eq!(rig.nlbw.files(DEFAULT_DATABASE_DIR), ["keep.txt"]);
    assert_eq!(rig.nlbw.files("/tmp"), ["20261101.db"]);
    assert_eq!(rig.nlbw.controls(), [Control::Stop, Control::Start]);
    rig.counters(&[]);
    assert!(u.history(7, &rig.names()).await.unwrap().devices.is_empty());

    // A start that fails is reported, not hidden.
    rig.nlbw.set_mode(FakeMode::Broken);
    match u.reset(true).await {
        Err(UsageError::ResetFailed(steps)) => {
            assert!(
                steps.iter().any(|s| s.contains("injected start failure")),
                "{steps:?}"
            )
        }
        other => panic!("expected a failed reset, got {other:?}"),
    }
}

#[tokio::test]
async fn the_configured_protocol_list_is_passed_and_a_wrong_one_is_a_configuration_error() {
    let mut rig = Rig::new();
    let config = |path: &str| {
        format!(
            "config nlbwmon\n\toption database_interval '1'\n\toption protocol_database '{path}'\n"
        )
    };
    rig.nlbw.add_protocol_file("/etc/nlbwmon/protocols");
    rig.files = rig
        .files
        .clone()
        .with(NLBWMON_CONFIG, &config("/etc/nlbwmon/protocols"));
    let u = rig.service(Duration::ZERO);
    u.current(0, 10, &rig.names()).await.unwrap();
    assert_eq!(
        rig.nlbw.last_protocols().as_deref(),
        Some("/etc/nlbwmon/protocols")
    );
    let s = u.status().await;
    assert_eq!(
        s.protocol_database.as_deref(),
        Some("/etc/nlbwmon/protocols")
    );
    assert!(s.running && s.error.is_none() && s.error_code.is_none());

    // A path that is not there: a configuration error with its own code, not
    // bad output, and the daemon is still reported running.
    rig.files = rig
        .files
        .clone()
        .with(NLBWMON_CONFIG, &config("/usr/share/nlbwmon/typo"));
    let u = rig.service(Duration::ZERO);
    let e = u.current(0, 10, &rig.names()).await.unwrap_err();
    assert!(matches!(e, UsageError::Misconfigured(_)), "{e:?}");
    assert!(e.to_string().contains("/usr/share/nlbwmon/typo"), "{e}");
    let api: crate::api::AgentError = e.into();
    assert_eq!(api.code(), netpilot_proto::ErrorCode::NlbwmonMisconfigured);
    assert_eq!(api.code().status(), 503);
    let s = u.status().await;
    assert!(s.installed && s.running, "{s:?}");
    assert_eq!(s.error_code, Some("NLBWMON_MISCONFIGURED"));
    assert!(s.error.as_deref().unwrap().contains("typo"), "{s:?}");
    assert_eq!(s.current_period.as_deref(), Some("2026-11-01"));

    // No option: nlbw's own default, no -p.
    let plain = Rig::new();
    plain
        .service(Duration::ZERO)
        .current(0, 10, &plain.names())
        .await
        .unwrap();
    assert_eq!(plain.nlbw.last_protocols(), None);
}

#[tokio::test]
async fn before_nlbwmon_first_saves_the_period_comes_from_database_interval() {
    let mut rig = Rig::new();
    // `nlbw -c list` prints nothing until the first save.
    rig.nlbw.answer(Query::List, "");
    let u = rig.service(Duration::ZERO);
    // No database_interval: nlbwmon's default, the 1st of the month.
    assert_eq!(
        u.current(0, 10, &rig.names())
            .await
            .unwrap()
            .period
            .as_deref(),
        Some("2026-11-01")
    );
    let s = u.status().await;
    assert_eq!(s.current_period.as_deref(), Some("2026-11-01"));
    assert_eq!(s.current_period_source, Some("database_interval"));
    assert!(s.periods.is_empty());

    for (spec, want) in [
        ("15", "2026-11-15"),
        ("25", "2026-10-25"),
        ("2026-11-05/7", "2026-11-19"),
    ] {
        rig.files = rig.files.clone().with(
            NLBWMON_CONFIG,
            &format!("config nlbwmon\n\toption database_interval '{spec}'\n"),
        );
        let u = rig.service(Duration::ZERO);
        assert_eq!(
            u.current(0, 10, &rig.names())
                .await
                .unwrap()
                .period
                .as_deref(),
            Some(want),
            "{spec}"
        );
        assert_eq!(
            u.status().await.current_period.as_deref(),
            Some(want),
            "{spec}"
        );
    }
    // A value nlbwmon refuses names no period rather than a wrong one.
    rig.files = rig.files.clone().with(
        NLBWMON_CONFIG,
        "config nlbwmon\n\toption database_interval 'monthly'\n",
    );
    let u = rig.service(Duration::ZERO);
    assert_eq!(u.current(0, 10, &rig.names()).await.unwrap().period, None);

    // Once nlbwmon lists a period, that one wins.
    rig.nlbw.answer(Query::List, "2026-11-01\n");
    let s = u.status().await;
    assert_eq!(s.current_period.as_deref(), Some("2026-11-01"));
    assert_eq!(s.current_period_source, Some("nlbwmon"));
}

#[tokio::test]
async fn the_owners_name_wins_in_usage_answers() {
    let mut rig = Rig::new();
    rig.owner
        .insert(mac("02:00:00:00:01:01"), "Alice's laptop".into());
    let u = rig.service(Duration::from_secs(5));
    let c = u.current(0, 10, &rig.names()).await.unwrap();
    let alice = c
        .devices
        .iter()
        .find(|d| d.mac == mac("02:00:00:00:01:01"))
        .unwrap();
    assert_eq!(alice.name.as_deref(), Some("Alice's laptop"));
    assert_eq!(alice.name_source, Some(NameSource::Owner));
    assert_eq!(alice.hostname.as_deref(), Some("alice-laptop"));
    let s = u.summary(7, &rig.names()).await.unwrap();
    let top = s.top_devices.iter().find(|d| d.mac == alice.mac).unwrap();
    assert_eq!(top.name.as_deref(), Some("Alice's laptop"));
}

#[tokio::test]
async fn a_scan_takes_today_and_the_period_from_the_shared_reading() {
    let rig = Rig::new();
    let u = rig.service(Duration::from_secs(60));
    rig.counters(&[(1, 100, 10), (2, 5, 1)]);
    // The usage endpoints read nlbwmon; a scan within the TTL shares that reading.
    u.current(0, 10, &rig.names()).await.unwrap();
    let queries = rig.nlbw.queries();
    let s = u.for_scan().await;
    assert_eq!(rig.nlbw.queries(), queries, "no second reading");
    assert_eq!(s.state, SourceState::Ok);
    assert_eq!(s.period.as_deref(), Some("2026-11-01"));
    let alice = s.devices[&mac("02:00:00:00:01:01")];
    assert_eq!((alice.period.bytes_rx, alice.period.bytes_tx), (100, 10));
    assert_eq!((alice.today.bytes_rx, alice.today.bytes_tx), (100, 10));
    // Today counts the stored part too: after a flush and more traffic, both add up.
    u.flush().unwrap();
    rig.counters(&[(1, 150, 12), (2, 5, 1)]);
    let fresh = rig.service(Duration::ZERO);
    let s = fresh.for_scan().await;
    let alice = s.devices[&mac("02:00:00:00:01:01")];
    assert_eq!((alice.today.bytes_rx, alice.today.bytes_tx), (150, 12));
    assert_eq!(alice.period.bytes_rx, 150);

    // nlbwmon gone: the scan says why, and carries no numbers.
    rig.nlbw.set_mode(FakeMode::NotInstalled);
    let s = rig.service(Duration::ZERO).for_scan().await;
    assert!(matches!(&s.state, SourceState::Error(e) if e.contains("nlbwmon")));
    assert!(s.devices.is_empty());
}

#[tokio::test]
async fn growth_marks_devices_seen_and_the_time_survives_a_restart() {
    let rig = Rig::new();
    let u = rig.service(Duration::ZERO);
    rig.counters(&[(1, 100, 10)]);
    u.current(0, 10, &rig.names()).await.unwrap();
    let first = NOON as u64;
    assert_eq!(
        u.device(mac("02:00:00:00:01:01"), &rig.names())
            .await
            .unwrap()
            .device
            .last_seen,
        Some(first)
    );
    // Shutdown writes the counted counters and what the batching held back.
    u.flush().unwrap();
    u.seen.flush(first);
    drop(u);
    rig.clock.fetch_add(600, Ordering::SeqCst);
    let again = rig.service(Duration::ZERO);
    // The counters did not grow: last_seen is still the first start's time.
    let d = again
        .device(mac("02:00:00:00:01:01"), &rig.names())
        .await
        .unwrap();
    assert_eq!(d.device.last_seen, Some(first));
}
