//! Device usage from nlbwmon: the service behind `/api/device-usage/*` and each
//! device's traffic in `/api/scan`. It reads nlbwmon through the [`Nlbw`] seam
//! (one reading cached for a few seconds, shared by every caller), names devices
//! as the caller's [`Names`] say, marks devices whose counters grew as seen, folds
//! every reading into the daily [`history::Ledger`] and
//! writes that to SQLite a few times a day (flash wears), and resets nlbwmon by
//! stopping it, removing its database files and starting it again. The clock,
//! nlbw and files are injected; nothing here knows whether the router is real.

pub mod history;
pub mod parse;
pub mod period;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::policy::model::Mac;
use crate::runtime::clock::Clock;
use crate::scan::names::{NameSource, Names};
use crate::scan::seen::Seen;
use crate::scan::{RxTx, ScanUsage, SourceState};
use crate::store::{Store, StoreError};
use crate::system::files::Files;
use crate::system::nlbw::{self, Control, Nlbw, NlbwError, Query};
use history::Ledger;
use parse::Aggregate;

pub const NLBWMON_CONFIG: &str = "/etc/config/nlbwmon";
pub const DEFAULT_DATABASE_DIR: &str = "/var/lib/nlbwmon";
/// nlbwmon's temp directory (not configurable in nlbwmon), holding `0.db`.
pub const NLBWMON_TEMP_DIR: &str = "/tmp";
/// What a `list` probe passes as `-p`: listing periods needs no protocol names,
/// so the daemon's state can be told even when the configured list is unreadable.
const NO_PROTOCOLS: &str = "/dev/null";
const HINT: &str = "install and start nlbwmon on the router (opkg install nlbwmon, or apk add nlbwmon on OpenWrt 25.12; /etc/init.d/nlbwmon enable; /etc/init.d/nlbwmon start)";

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// nlbwmon cannot be asked: not installed, not running, not answering.
    #[error("{reason}; {HINT}")]
    Unavailable { reason: String },
    /// nlbwmon's UCI configuration is wrong (an unreadable `protocol_database`):
    /// every `nlbw` command fails until the owner fixes it.
    #[error("nlbwmon is misconfigured: {0}; fix /etc/config/nlbwmon")]
    Misconfigured(String),
    /// nlbw answered something that is not its output.
    #[error("nlbw output is unusable: {0}")]
    BadOutput(String),
    /// The device has no traffic in nlbwmon's current period.
    #[error("no usage recorded for {0} in the current period")]
    NoSuchDevice(Mac),
    #[error("usage history: {0}")]
    Store(#[from] StoreError),
    /// One or more reset steps failed; each is listed.
    #[error("reset failed: {}", .0.join("; "))]
    ResetFailed(Vec<String>),
}

impl From<NlbwError> for UsageError {
    fn from(e: NlbwError) -> Self {
        match e {
            NlbwError::Failed(p) => UsageError::BadOutput(p.to_string()),
            e @ NlbwError::ProtocolList { .. } => UsageError::Misconfigured(e.to_string()),
            other => UsageError::Unavailable {
                reason: other.to_string(),
            },
        }
    }
}

impl From<parse::ParseError> for UsageError {
    fn from(e: parse::ParseError) -> Self {
        UsageError::BadOutput(e.to_string())
    }
}

#[derive(Debug, Clone)]
pub struct UsageConfig {
    /// How long one reading of nlbwmon answers requests.
    pub cache_ttl: Duration,
    /// How often the background task reads nlbwmon into the ledger.
    pub sample_interval: Duration,
    /// How often the ledger is written to SQLite (also at shutdown and at a new day).
    pub flush_interval: Duration,
    pub retention_days: u32,
    /// How long a reset waits for nlbwmon to stop and to answer again.
    pub confirm_timeout: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            cache_ttl: Duration::from_secs(5),
            sample_interval: Duration::from_secs(300),
            flush_interval: Duration::from_secs(3 * 3600),
            retention_days: 35,
            confirm_timeout: Duration::from_secs(5),
        }
    }
}

/// One reading of nlbwmon.
struct Live {
    agg: Aggregate,
    period: Option<String>,
    read_unix: u64,
}

pub struct Usage {
    nlbw: Arc<dyn Nlbw>,
    files: Arc<dyn Files>,
    clock: Clock,
    /// The router's UTC offset (seconds east) at a Unix time: days are local.
    offset: Arc<dyn Fn(i64) -> i32 + Send + Sync>,
    store: Mutex<Store>,
    ledger: Mutex<Ledger>,
    /// One reading at a time; callers inside the TTL share it.
    cache: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<Live>)>>,
    last_flush: Mutex<Option<u64>>,
    config: UsageConfig,
    /// Last-seen times, shared with discovery.
    seen: Arc<Seen>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProtocolOut {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceUsage {
    pub mac: Mac,
    /// The first address, IPv4 first; `ips` has them all.
    pub ip: Option<IpAddr>,
    pub ips: Vec<IpAddr>,
    pub hostname: Option<String>,
    pub name: Option<String>,
    pub name_source: Option<NameSource>,
    pub randomized: bool,
    /// Downloaded by the device.
    pub bytes_rx: u64,
    /// Uploaded by the device.
    pub bytes_tx: u64,
    pub total_bytes: u64,
    pub connections: u64,
    /// Up to five, by bytes: the layer-7 name, else the IP protocol.
    pub top_protocols: Vec<ProtocolOut>,
    /// Unix seconds the device was last seen online or its counters grew (kept
    /// across restarts).
    pub last_seen: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct CurrentOut {
    pub timestamp: u64,
    /// nlbwmon's current period (its start date), when it lists one.
    pub period: Option<String>,
    pub devices: Vec<DeviceUsage>,
    pub total_devices: usize,
    pub total_bytes: u64,
    /// Bytes nlbwmon could not attribute to a MAC.
    pub unattributed_bytes: u64,
    pub offset: usize,
    pub limit: usize,
}

#[derive(Debug, Serialize)]
pub struct DeviceOut {
    pub timestamp: u64,
    pub period: Option<String>,
    pub device: DeviceUsage,
}

#[derive(Debug, Serialize)]
pub struct StatusOut {
    pub installed: bool,
    pub running: bool,
    /// Why not, when not running, or what is wrong with the configuration.
    pub error: Option<String>,
    /// `NLBWMON_MISCONFIGURED` when `error` is a configuration error (the daemon
    /// may well be running: `running` says).
    pub error_code: Option<&'static str>,
    /// UCI `protocol_database`, passed to every `nlbw` command as `-p`.
    pub protocol_database: Option<String>,
    pub database_directory: String,
    /// UCI `database_interval`: the accounting period (a day of month, or
    /// `YYYY-MM-DD/N` days).
    pub period: Option<String>,
    pub current_period: Option<String>,
    /// Where `current_period` comes from: `nlbwmon` (its saved periods) or
    /// `database_interval` (derived, before nlbwmon's first save).
    pub current_period_source: Option<&'static str>,
    pub periods: Vec<String>,
    pub refresh_interval: Option<String>,
    pub commit_interval: Option<String>,
    pub history: HistoryStatus,
}

#[derive(Debug, Serialize)]
pub struct HistoryStatus {
    pub retention_days: u32,
    pub last_flush: Option<u64>,
    pub pending_entries: usize,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DayOut {
    pub date: String,
    pub bytes_rx: u64,
    pub bytes_tx: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct DeviceHistory {
    pub mac: Mac,
    pub hostname: Option<String>,
    pub name: Option<String>,
    pub name_source: Option<NameSource>,
    pub randomized: bool,
    pub total_bytes: u64,
    pub days: Vec<DayOut>,
}

#[derive(Debug, Serialize)]
pub struct DailyTotal {
    pub date: String,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct HistoryOut {
    pub days: u32,
    pub from: String,
    pub to: String,
    pub devices: Vec<DeviceHistory>,
    pub daily_totals: Vec<DailyTotal>,
}

#[derive(Debug, Serialize)]
pub struct TopDevice {
    pub mac: Mac,
    pub hostname: Option<String>,
    pub name: Option<String>,
    pub name_source: Option<NameSource>,
    pub randomized: bool,
    pub total_bytes: u64,
    /// Share of `total_bytes`, 0–100 with two decimals.
    pub percentage: f64,
}

#[derive(Debug, Serialize)]
pub struct SummaryOut {
    pub period_days: u32,
    pub from: String,
    pub to: String,
    pub total_bytes: u64,
    pub top_devices: Vec<TopDevice>,
    pub daily_totals: Vec<DailyTotal>,
    /// nlbwmon's current period and its total, live.
    pub nlbwmon_period: Option<String>,
    pub nlbwmon_period_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ResetOut {
    pub removed_files: Vec<String>,
    pub running: bool,
    pub history_cleared: bool,
}

impl Usage {
    pub fn new(
        nlbw: Arc<dyn Nlbw>,
        files: Arc<dyn Files>,
        clock: Clock,
        offset: Arc<dyn Fn(i64) -> i32 + Send + Sync>,
        mut store: Store,
        config: UsageConfig,
        seen: Arc<Seen>,
    ) -> Result<Usage, UsageError> {
        let ledger = history::load(&mut store)?;
        Ok(Usage {
            nlbw,
            files,
            clock,
            offset,
            store: Mutex::new(store),
            ledger: Mutex::new(ledger),
            cache: tokio::sync::Mutex::new(None),
            last_flush: Mutex::new(None),
            config,
            seen,
        })
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn today(&self) -> String {
        let now = self.now();
        history::date_of(now, (self.offset)(now))
    }

    /// The first day of an N-day window ending today.
    fn first_day(&self, days: u32) -> String {
        let now = self.now();
        let local = now + (self.offset)(now) as i64;
        crate::runtime::clock::ymd(local.div_euclid(86_400) - (days as i64 - 1))
    }

    /// Reads nlbwmon (or returns the reading younger than the TTL) and folds it into
    /// the ledger.
    async fn live(&self) -> Result<Arc<Live>, UsageError> {
        let mut cache = self.cache.lock().await;
        if let Some((at, live)) = cache.as_ref() {
            if at.elapsed() < self.config.cache_ttl {
                return Ok(live.clone());
            }
        }
        let protocols = self.protocols();
        let protocols = protocols.as_deref();
        let periods = parse::list(&self.nlbw.query(Query::List, protocols).await?)?;
        let text = self
            .nlbw
            .query(
                Query::Json {
                    group_by: None,
                    period: None,
                },
                protocols,
            )
            .await?;
        let agg = parse::aggregate(&parse::json(&text)?);
        let now = self.now();
        let period = periods.into_iter().next().or_else(|| self.derived_period());
        let today = self.today();
        {
            let mut ledger = self.ledger.lock().expect("usage ledger");
            // A new local day: write the finished one out before counting into today.
            let day_changed = ledger.pending.keys().any(|(d, _)| *d != today);
            let grew = ledger.observe(
                &today,
                period.as_deref(),
                agg.devices
                    .iter()
                    .map(|(m, d)| (*m, (d.rx_bytes, d.tx_bytes))),
            );
            self.seen.mark(&grew, now.max(0) as u64);
            if day_changed {
                self.flush_locked(&mut ledger)?;
            }
        }
        let live = Arc::new(Live {
            agg,
            period,
            read_unix: now.max(0) as u64,
        });
        *cache = Some((tokio::time::Instant::now(), live.clone()));
        Ok(live)
    }

    fn flush_locked(&self, ledger: &mut Ledger) -> Result<(), UsageError> {
        let keep_from = self.first_day(self.config.retention_days);
        let mut store = self.store.lock().expect("usage store");
        history::flush(&mut store, ledger, &keep_from)?;
        *self.last_flush.lock().expect("usage flush") = Some(self.now().max(0) as u64);
        Ok(())
    }

    /// Writes the ledger to SQLite now.
    pub fn flush(&self) -> Result<(), UsageError> {
        let mut ledger = self.ledger.lock().expect("usage ledger");
        self.flush_locked(&mut ledger)
    }

    /// Each device's traffic today and in nlbwmon's period, from the shared
    /// reading, for a scan; says why not when nlbwmon does not answer.
    pub async fn for_scan(&self) -> ScanUsage {
        let mut out = ScanUsage {
            state: SourceState::Ok,
            period: None,
            devices: HashMap::new(),
        };
        let live = match self.live().await {
            Ok(live) => live,
            Err(e) => {
                out.state = SourceState::Error(e.to_string());
                return out;
            }
        };
        let counted = match self.counted_since(&self.today()) {
            Ok(c) => c,
            Err(e) => {
                out.state = SourceState::Error(format!("usage history: {e}"));
                return out;
            }
        };
        let rxtx = |(bytes_rx, bytes_tx)| RxTx { bytes_rx, bytes_tx };
        for ((_, mac), pair) in counted {
            out.devices.entry(mac).or_default().today = rxtx(pair);
        }
        for (mac, d) in &live.agg.devices {
            out.devices.entry(*mac).or_default().period = rxtx((d.rx_bytes, d.tx_bytes));
        }
        out.period = live.period.clone();
        out
    }

    fn device_out(mac: Mac, d: &parse::DeviceTotals, names: &Names, seen: &Seen) -> DeviceUsage {
        let id = names.of(&mac);
        DeviceUsage {
            mac,
            ip: d.ips.first().copied(),
            ips: d.ips.clone(),
            hostname: names.hostname(&mac),
            name: id.name,
            name_source: id.name_source,
            randomized: id.randomized,
            bytes_rx: d.rx_bytes,
            bytes_tx: d.tx_bytes,
            total_bytes: d.total(),
            connections: d.conns,
            top_protocols: d
                .protocols
                .iter()
                .take(5)
                .map(|(n, b)| ProtocolOut {
                    name: n.clone(),
                    bytes: *b,
                })
                .collect(),
            last_seen: seen.get(&mac),
        }
    }

    /// Every device of the current period, most traffic first, one page of them.
    pub async fn current(
        &self,
        offset: usize,
        limit: usize,
        names: &Names,
    ) -> Result<CurrentOut, UsageError> {
        let live = self.live().await?;
        let all = most_first(live.agg.devices.iter().map(|(m, d)| (d.total(), *m)));
        let total_bytes = all.iter().fold(0u64, |s, (t, _)| s.saturating_add(t.0));
        Ok(CurrentOut {
            timestamp: live.read_unix,
            period: live.period.clone(),
            total_devices: all.len(),
            total_bytes,
            unattributed_bytes: live.agg.unattributed_bytes,
            devices: all
                .iter()
                .skip(offset)
                .take(limit)
                .map(|(_, m)| Self::device_out(*m, &live.agg.devices[m], names, &self.seen))
                .collect(),
            offset,
            limit,
        })
    }

    pub async fn device(&self, mac: Mac, names: &Names) -> Result<DeviceOut, UsageError> {
        let live = self.live().await?;
        let d = live
            .agg
            .devices
            .get(&mac)
            .ok_or(UsageError::NoSuchDevice(mac))?;
        Ok(DeviceOut {
            timestamp: live.read_unix,
            period: live.period.clone(),
            device: Self::device_out(mac, d, names, &self.seen),
        })
    }

    /// nlbwmon's state and configuration; answers even when it is not running.
    pub async fn status(&self) -> StatusOut {
        let uci = self.nlbwmon_config();
        let get = |k: &str| uci.get(k).cloned();
        let protocols = self.protocols();
        let mut answer = self.nlbw.query(Query::List, protocols.as_deref()).await;
        let mut config_error = None;
        if let Err(e @ NlbwError::ProtocolList { .. }) = answer {
            // Say what is wrong, and still tell whether the daemon runs.
            config_error = Some(e.to_string());
            answer = self.nlbw.query(Query::List, Some(NO_PROTOCOLS)).await;
        }
        let (installed, running, error, periods) = match answer {
            Ok(text) => match parse::list(&text) {
                Ok(p) => (true, true, None, p),
                Err(e) => (true, true, Some(e.to_string()), Vec::new()),
            },
            Err(e @ NlbwError::NotInstalled { .. }) => (false, false, Some(e.to_string()), vec![]),
            Err(e) => (true, false, Some(e.to_string()), Vec::new()),
        };
        let (current_period, current_period_source) = match periods.first() {
            Some(p) => (Some(p.clone()), Some("nlbwmon")),
            None if running => match self.derived_period() {
                Some(p) => (Some(p), Some("database_interval")),
                None => (None, None),
            },
            None => (None, None),
        };
        let ledger = self.ledger.lock().expect("usage ledger");
        StatusOut {
            installed,
            running,
            error_code: config_error
                .is_some()
                .then_some(netpilot_proto::ErrorCode::NlbwmonMisconfigured.as_str()),
            error: config_error.or(error),
            protocol_database: protocols,
            database_directory: self.database_dir(),
            period: get("database_interval"),
            current_period,
            current_period_source,
            periods,
            refresh_interval: get("refresh_interval"),
            commit_interval: get("commit_interval"),
            history: HistoryStatus {
                retention_days: self.config.retention_days,
                last_flush: *self.last_flush.lock().expect("usage flush"),
                pending_entries: ledger.pending.len(),
            },
        }
    }

    /// Options of the first `nlbwmon` section of `/etc/config/nlbwmon`.
    fn nlbwmon_config(&self) -> HashMap<String, String> {
        let text = self
            .files
            .read_to_string(NLBWMON_CONFIG)
            .unwrap_or_default();
        crate::uci_format::parse(&text)
            .ok()
            .and_then(|s| s.into_iter().find(|s| s.kind == "nlbwmon"))
            .map(|s| s.values.into_iter().collect())
            .unwrap_or_default()
    }

    /// UCI `protocol_database`, when set: nlbw's `-p`.
    fn protocols(&self) -> Option<String> {
        self.nlbwmon_config()
            .remove("protocol_database")
            .filter(|p| !p.is_empty())
    }

    /// The current period from UCI `database_interval` (nlbwmon's default, the
    /// 1st of the month, when unset); `None` when the value is one nlbwmon would
    /// refuse too.
    fn derived_period(&self) -> Option<String> {
        let interval = match self.nlbwmon_config().remove("database_interval") {
            None => period::DEFAULT,
            Some(spec) => period::Interval::parse(&spec)
                .map_err(|e| tracing::warn!(error = %e, "no current period"))
                .ok()?,
        };
        Some(interval.current(self.now(), &*self.offset))
    }

    fn database_dir(&self) -> String {
        self.nlbwmon_config()
            .remove("database_directory")
            .filter(|d| d.starts_with('/'))
            .unwrap_or_else(|| DEFAULT_DATABASE_DIR.to_owned())
    }

    /// Per-day totals per device over the last `days` days (today included): the
    /// stored days plus what is counted but not yet written, after a fresh reading.
    /// nlbwmon being down leaves the stored history readable.
    pub async fn history(&self, days: u32, names: &Names) -> Result<HistoryOut, UsageError> {
        let (from, to, rows) = self.history_rows(days).await?;
        let mut per: BTreeMap<Mac, DeviceHistory> = BTreeMap::new();
        let mut daily: BTreeMap<String, u64> = BTreeMap::new();
        for ((day, mac), (rx, tx)) in rows {
            let total = rx.saturating_add(tx);
            let d = per.entry(mac).or_insert_with(|| {
                let id = names.of(&mac);
                DeviceHistory {
                    mac,
                    hostname: names.hostname(&mac),
                    name: id.name,
                    name_source: id.name_source,
                    randomized: id.randomized,
                    total_bytes: 0,
                    days: Vec::new(),
                }
            });
            d.total_bytes = d.total_bytes.saturating_add(total);
            let t = daily.entry(day.clone()).or_default();
            *t = t.saturating_add(total);
            d.days.push(DayOut {
                date: day,
                bytes_rx: rx,
                bytes_tx: tx,
                total_bytes: total,
            });
        }
        let order = most_first(per.values().map(|d| (d.total_bytes, d.mac)));
        let devices = order.iter().filter_map(|(_, m)| per.remove(m)).collect();
        Ok(HistoryOut {
            days,
            from,
            to,
            devices,
            daily_totals: daily
                .into_iter()
                .map(|(date, bytes)| DailyTotal { date, bytes })
                .collect(),
        })
    }

    pub async fn summary(&self, days: u32, names: &Names) -> Result<SummaryOut, UsageError> {
        let h = self.history(days, names).await?;
        let live = self.live().await.ok();
        let total = h
            .devices
            .iter()
            .fold(0u64, |s, d| s.saturating_add(d.total_bytes));
        let top_devices = h
            .devices
            .iter()
            .take(10)
            .map(|d| TopDevice {
                mac: d.mac,
                hostname: d.hostname.clone(),
                name: d.name.clone(),
                name_source: d.name_source,
                randomized: d.randomized,
                total_bytes: d.total_bytes,
                percentage: percentage(d.total_bytes, total),
            })
            .collect();
        Ok(SummaryOut {
            period_days: days,
            from: h.from,
            to: h.to,
            total_bytes: total,
            top_devices,
            daily_totals: h.daily_totals,
            nlbwmon_period: live.as_ref().and_then(|l| l.period.clone()),
            nlbwmon_period_bytes: live.as_ref().map_or(0, |l| {
                l.agg
                    .devices
                    .values()
                    .fold(0u64, |s, d| s.saturating_add(d.total()))
            }),
        })
    }

    /// History as CSV, a row per day and device in that order: `date,mac,hostname,
    /// bytes_rx,bytes_tx,total_bytes,name,name_source,randomized` (the last three
    /// added later, at the end, so readers of the first six keep working; the relay
    /// appends `vendor`).
    pub async fn history_csv(&self, days: u32, names: &Names) -> Result<String, UsageError> {
        let (_, _, rows) = self.history_rows(days).await?;
        let mut out = String::from(
            "date,mac,hostname,bytes_rx,bytes_tx,total_bytes,name,name_source,randomized\n",
        );
        for ((date, mac), (rx, tx)) in rows {
            let id = names.of(&mac);
            out.push_str(&date);
            out.push(',');
            mac.push_to(&mut out);
            out.push(',');
            out.push_str(&csv_field(names.dhcp.get(&mac).map_or("", String::as_str)));
            out.push_str(&format!(
                ",{rx},{tx},{},{},{},{}\n",
                rx.saturating_add(tx),
                csv_field(id.name.as_deref().unwrap_or("")),
                match id.name_source {
                    Some(NameSource::Owner) => "owner",
                    Some(NameSource::Hostname) => "hostname",
                    None => "",
                },
                id.randomized
            ));
        }
        Ok(out)
    }

    /// The first and last day of an N-day window ending today, and every device's
    /// bytes per day in it, by (day, MAC), after a fresh reading.
    async fn history_rows(
        &self,
        days: u32,
    ) -> Result<(String, String, BTreeMap<(String, Mac), history::Pair>), UsageError> {
        let live_ok = self.live().await;
        let from = self.first_day(days);
        let rows = self.counted_since(&from)?;
        if rows.is_empty() {
            // Nothing stored and nlbwmon down: say so rather than show "no traffic".
            live_ok?;
        }
        Ok((from, self.today(), rows))
    }

    /// Stored and pending bytes per (day, MAC) from `from` on.
    fn counted_since(
        &self,
        from: &str,
    ) -> Result<BTreeMap<(String, Mac), history::Pair>, StoreError> {
        // The order `live` takes them in: the ledger, then the store.
        let ledger = self.ledger.lock().expect("usage ledger");
        let mut store = self.store.lock().expect("usage store");
        history::days(&mut store, &ledger.pending, from)
    }

    /// nlbwmon has no reset command: stop it, wait until it is gone (it saves its
    /// database on the way out), remove its database files, start it and wait until
    /// it answers. The agent's history is cleared too unless `keep_history`: a reset
    /// means "count from zero". Every failing step is reported.
    pub async fn reset(&self, keep_history: bool) -> Result<ResetOut, UsageError> {
        let mut errors = Vec::new();
        if keep_history {
            // Count what nlbwmon has now, so the reset loses nothing of the history.
            if let Err(e) = self.live_uncached().await.and_then(|_| self.flush()) {
                errors.push(format!("saving history: {e}"));
            }
        }
        if let Err(e) = self.nlbw.control(Control::Stop).await {
            errors.push(e.to_string());
        }
        if !self.wait_running(false).await {
            errors.push("nlbwmon still answers after stop".into());
        }
        let mut removed = Vec::new();
        if errors.is_empty() {
            let dir = self.database_dir();
            for (d, m) in [
                (dir.as_str(), nlbw::is_database_file as fn(&str) -> bool),
                (NLBWMON_TEMP_DIR, nlbw::is_temp_state_file),
            ] {
                match self.nlbw.remove_files(d, m).await {
                    Ok(names) => removed.extend(names.into_iter().map(|n| format!("{d}/{n}"))),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        // Start again whatever happened: a reset must not leave accounting off.
        if let Err(e) = self.nlbw.control(Control::Start).await {
            errors.push(e.to_string());
        }
        let running = self.wait_running(true).await;
        if !running {
            errors.push("nlbwmon does not answer after start".into());
        }
        *self.cache.lock().await = None;
        let history_cleared = !keep_history && errors.is_empty();
        if history_cleared {
            let mut ledger = self.ledger.lock().expect("usage ledger");
            *ledger = Ledger::default();
            let mut store = self.store.lock().expect("usage store");
            history::clear(&mut store)?;
        }
        if !errors.is_empty() {
            return Err(UsageError::ResetFailed(errors));
        }
        Ok(ResetOut {
            removed_files: removed,
            running,
            history_cleared,
        })
    }

    async fn live_uncached(&self) -> Result<Arc<Live>, UsageError> {
        *self.cache.lock().await = None;
        self.live().await
    }

    /// Polls `nlbw -c list` until it answers (`want`) or fails, for up to
    /// `confirm_timeout`.
    async fn wait_running(&self, want: bool) -> bool {
        let tries = (self.config.confirm_timeout.as_millis() / 100).max(1);
        for _ in 0..tries {
            let up = self
                .nlbw
                .query(Query::List, Some(NO_PROTOCOLS))
                .await
                .is_ok();
            if up == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// The background task: reads nlbwmon every `sample_interval` so growth lands
    /// on the right day, writes the ledger every `flush_interval`, and once more
    /// when asked to stop.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut sample = tokio::time::interval(self.config.sample_interval);
        let mut flush = tokio::time::interval(self.config.flush_interval);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.tick().await;
        loop {
            tokio::select! {
                _ = sample.tick() => {
                    if let Err(e) = self.live().await {
                        tracing::debug!(error = %e, "usage sample skipped");
                    }
                }
                _ = flush.tick() => {
                    if let Err(e) = self.flush() {
                        tracing::warn!(error = %e, "usage history not written");
                    }
                }
                _ = crate::runtime::shutdown::stopped(&mut stop) => {
                    if let Err(e) = self.flush() {
                        tracing::warn!(error = %e, "usage history not written at shutdown");
                    }
                    self.seen.flush(self.now().max(0) as u64);
                    return;
                }
            }
        }
    }
}

/// (bytes, MAC) pairs, most bytes first, then by MAC: one sort instance for every
/// device list here (the router's flash pays for each).
fn most_first(devices: impl Iterator<Item = (u64, Mac)>) -> Vec<(std::cmp::Reverse<u64>, Mac)> {
    let mut v: Vec<_> = devices.map(|(n, m)| (std::cmp::Reverse(n), m)).collect();
    // MACs are unique: an unstable sort gives the one order there is.
    v.sort_unstable();
    v
}

fn percentage(part: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    ((part as f64 / total as f64) * 10_000.0).round() / 100.0
}

/// RFC 4180 quoting: fields with a comma, quote or line break are quoted, quotes
/// doubled. Hostnames are cleaned at parse, but the format must not depend on that.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests;
