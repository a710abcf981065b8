//! The engine: owns the desired state and turns a change into kernel state. Every
//! change goes compile → [`plan`](super::plan) (from the state last applied and
//! what is live) → [execute](super::execute) → verify by reading back; a step that
//! fails takes back the ones before it, so the kernel is never left half-applied.
//! The store is written only after the kernel took the change, so the two agree; a
//! crash in between is repaired by the reconcile at start-up, which also runs
//! periodically (drift), at DST changes and after any failed apply.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netpilot_proto::ErrorCode;
use serde::Serialize;

use super::compile::{self, Compiled, Context, DnsConfig, DnsContext};
use super::execute::{Enforcers, Executed, ObserveError, ReadTimes, StepError};
use super::fw4::{Fw4Status, Keeper};
use super::model::{Desired, Invalid};
use super::ops::{self, OpError};
use super::persist::{Actor, Applied};
use super::plan::{self, Devices, Observed, Reads};
use super::tz::{self, Zone};
use crate::runtime::clock::Clock;
use crate::runtime::shutdown::{self, Shutdown};
use crate::store::{Store, StoreError};
use crate::system::files::Files;
use crate::system::tc::RootOwner;

#[derive(Clone)]
pub struct EngineConfig {
    /// Every LAN-side bridge, never empty; download is shaped on each.
    pub lan_ifs: Vec<String>,
    pub wan_if: String,
    /// A POSIX TZ string overriding the router's own (UCI system.timezone, /etc/TZ).
    pub timezone: Option<String>,
    /// How often the live state is compared with the desired one.
    pub check_interval: Duration,
    /// Reads the kernel's `sys_tz` minutes west, which `meta day` uses.
    pub kernel_minutes_west: Arc<dyn Fn() -> i32 + Send + Sync>,
    pub dns: DnsConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The change is not acceptable; nothing was touched.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("group {0} does not exist")]
    NoSuchGroup(u32),
    /// The live state could not be read; nothing was changed.
    #[error("applying the policy failed: {0}")]
    Observe(#[source] ObserveError),
    /// A step failed; the steps before it were taken back, the previous state is
    /// in force.
    #[error("applying the policy failed: {0}")]
    Step(#[source] Box<StepError>),
    /// Every step ran, but the read-back differs from what was applied.
    #[error("applying the policy failed: read-back differs: {}", .0.join("; "))]
    Verify(Vec<String>),
    /// Drift was repaired, but the system still differs afterwards.
    #[error("still differs after repair: {}", .0.join("; "))]
    Unrepaired(Vec<String>),
    #[error("state database: {0}")]
    Store(#[source] StoreError),
}

impl EngineError {
    /// The kernel may be in another state than believed: the next apply observes
    /// first, the status shows the error and a reconcile follows soon.
    fn leaves_state_unknown(&self) -> bool {
        !matches!(self, EngineError::Invalid(_) | EngineError::NoSuchGroup(_))
    }
}

impl From<OpError> for EngineError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Invalid(i) => EngineError::Invalid(i),
            OpError::NoSuchGroup(id) => EngineError::NoSuchGroup(id),
        }
    }
}

impl From<ObserveError> for EngineError {
    fn from(e: ObserveError) -> Self {
        EngineError::Observe(e)
    }
}

/// What `GET /api/infrastructure/status` shows; kept current by every apply and check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub table_present: bool,
    /// Nothing to enforce: no table and no qdisc are wanted.
    pub idle: bool,
    pub in_sync: bool,
    pub drift: Vec<String>,
    /// Drift found (and repaired) since start.
    pub drift_repairs: u64,
    /// The last drift found and when; kept after the repair.
    pub last_drift: Vec<String>,
    pub last_drift_unix: Option<i64>,
    pub generation: u64,
    pub digest: String,
    pub last_apply_unix: Option<i64>,
    pub last_apply_ms: Option<u64>,
    pub last_check_unix: Option<i64>,
    pub last_error: Option<String>,
    pub classes_down: usize,
    pub classes_up: usize,
    pub devices: usize,
    pub groups: usize,
    pub timezone: String,
    pub next_refresh_unix: Option<i64>,
    /// Filtering resolvers wanted (one per filtered group).
    pub dns_resolvers: usize,
    /// The copies of the rules fw4 includes (`None`: not kept, as when simulated).
    pub fw4: Option<Fw4Status>,
    /// What the devices NetPilot shapes or looks at have, as last read.
    pub shaping: Shaping,
}

/// The qdiscs NetPilot found, so coexistence with sqm-scripts (or any other
/// shaper) can be seen: what is on the WAN device (never touched), whether the
/// upload ifb is there, and per LAN bridge its root and the upload redirect.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Shaping {
    pub wan_dev: String,
    /// `htb 1:` (sqm-scripts), `fq_codel 0:` (the kernel's default); null when the
    /// device is missing or not read yet.
    pub wan_root: Option<String>,
    pub wan_root_owner: Option<RootOwner>,
    pub upload_ifb: String,
    pub upload_ifb_present: bool,
    pub lan: Vec<LanShaping>,
    /// LAN bridges NetPilot leaves unshaped because someone else's root qdisc is
    /// there, and anything else that defeats shaping, in words.
    pub unshaped: Vec<String>,
    /// `net.bridge.bridge-nf-call-iptables` is 1 (br_netfilter loaded and passing
    /// bridged frames to the IP hooks): a frame redirected to the upload ifb then
    /// reaches the forward hook without its conntrack entry, and download loses
    /// its classification.
    pub bridge_nf_call_iptables: bool,
}

/// Where br_netfilter says whether bridged frames go through the IP hooks.
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

#[derive(Debug, Clone, Serialize)]
pub struct LanShaping {
    pub dev: String,
    pub root: String,
    pub root_owner: RootOwner,
    /// NetPilot's ingress filter redirecting to the upload ifb is there.
    pub upload_redirect: bool,
    /// Someone else's filters beside it in the ingress qdisc.
    pub foreign_ingress_filters: usize,
}

impl Shaping {
    fn of(shapers: &plan::Shapers, devices: &Devices, bridge_nf_call_iptables: bool) -> Shaping {
        let wan = (!shapers.wan.missing).then_some(&shapers.wan);
        let mut unshaped = plan::unshaped(shapers, devices);
        if bridge_nf_call_iptables && shapers.lan.iter().any(|l| l.ingress.ours) {
            unshaped.push(
                "net.bridge.bridge-nf-call-iptables is 1: download to devices whose upload is \
                 shaped is not classified (set it to 0, as OpenWrt does)"
                    .to_owned(),
            );
        }
        Shaping {
            wan_dev: devices.wan.clone(),
            wan_root: wan.map(|w| w.root_text()),
            wan_root_owner: wan.map(|w| w.owner()),
            upload_ifb: devices.ifb.clone(),
            upload_ifb_present: !shapers.ifb.missing,
            lan: devices
                .lan
                .iter()
                .zip(&shapers.lan)
                .map(|(dev, l)| LanShaping {
                    dev: dev.clone(),
                    root: l.root_text(),
                    root_owner: l.owner(),
                    upload_redirect: l.ingress.ours,
                    foreign_ingress_filters: l.ingress.others,
                })
                .collect(),
            unshaped,
            bridge_nf_call_iptables,
        }
    }
}

/// How one change went.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub changed: bool,
    pub generation: u64,
    pub duration_ms: f64,
    /// `none`, `elements` (incremental) or `table` (whole table replaced).
    pub nft: &'static str,
    pub tc_ops: usize,
    pub phases: Phases,
}

impl ApplyReport {
    /// A change that left the desired state as it was: nothing applied.
    fn unchanged(generation: u64) -> ApplyReport {
        ApplyReport {
            changed: false,
            generation,
            duration_ms: 0.0,
            nft: "none",
            tc_ops: 0,
            phases: Phases::default(),
        }
    }
}

/// Where an apply's time went, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    pub compile_ms: f64,
    pub tc_ms: f64,
    pub nft_ms: f64,
    pub dns_ms: f64,
    pub verify_ms: f64,
    pub store_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The record of a compiled state put in force.
fn applied(
    generation: u64,
    compiled: Option<&Compiled>,
    at_unix: i64,
    duration_ms: u64,
) -> Applied {
    Applied {
        generation,
        digest: compiled.map(|c| c.digest.clone()).unwrap_or_default(),
        applied_unix: at_unix,
        duration_ms,
    }
}

/// One carried-out plan: how the table changed, tc operations, timings.
struct Outcome {
    nft: &'static str,
    tc_ops: usize,
    phases: Phases,
}

struct Inner {
    store: Store,
    desired: Desired,
    generation: u64,
    /// The last compiled state known to be live (verified or applied); the base for
    /// incremental element changes.
    live: Option<Compiled>,
}

/// `dev_moved` entries that make a change compact `dev_group` right away rather
/// than at the next periodic check.
const COMPACT_AT: usize = 256;

impl Inner {
    /// What to pin the next compile to: the live `dev_group`, while it is known
    /// and the overrides are few.
    fn pin(&self) -> Option<&compile::Pinned> {
        self.live
            .as_ref()
            .filter(|l| l.moved < COMPACT_AT)
            .map(|l| &l.pin)
    }
}

pub struct Engine {
    inner: tokio::sync::Mutex<Inner>,
    enforcers: Enforcers,
    devices: Devices,
    files: Arc<dyn Files>,
    config: EngineConfig,
    clock: Clock,
    status: Mutex<Status>,
    /// Wakes the background task early (after a failure, for a refresh).
    wake: tokio::sync::Notify,
    /// The generation in force, sent after every apply and every check that found
    /// the kernel in sync: what other services (flow offloading) follow.
    applied: tokio::sync::watch::Sender<u64>,
    /// Keeps the copies of the rules fw4 includes; `None` keeps none.
    fw4: Option<Fw4>,
}

/// The copies fw4 loads are written off the apply's path: checking a large table
/// with `nft -c` costs about twice its `nft -f` (12,500 devices: 200–480 ms), which
/// would multiply the cost of a device move. The engine says what is live; a
/// writer task ([`Engine::run_fw4`]) catches up with the latest.
struct Fw4 {
    keeper: Keeper,
    /// The generation and the compiled state live now, as last said.
    want: tokio::sync::watch::Sender<Option<(u64, Option<Compiled>)>>,
}

impl Engine {
    pub fn new(
        mut store: Store,
        enforcers: Enforcers,
        files: Arc<dyn Files>,
        config: EngineConfig,
        clock: Clock,
    ) -> Result<Engine, EngineError> {
        let (mut desired, applied) = store.load_policy().map_err(EngineError::Store)?;
        ops::normalize(&mut desired)?;
        let generation = applied.as_ref().map_or(0, |a| a.generation);
        let status = Status {
            generation,
            digest: applied
                .as_ref()
                .map(|a| a.digest.clone())
                .unwrap_or_default(),
            last_apply_unix: applied.as_ref().map(|a| a.applied_unix),
            last_apply_ms: applied.as_ref().map(|a| a.duration_ms),
            ..Status::default()
        };
        Ok(Engine {
            inner: tokio::sync::Mutex::new(Inner {
                store,
                desired,
                generation,
                live: None,
            }),
            enforcers,
            devices: Devices::new(
                &config
                    .lan_ifs
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
                &config.wan_if,
            ),
            files,
            config,
            clock,
            status: Mutex::new(status),
            wake: tokio::sync::Notify::new(),
            applied: tokio::sync::watch::channel(generation).0,
            fw4: None,
        })
    }

    /// Keeps the rules through fw4's life cycle with `keeper` (see [`super::fw4`]).
    pub fn with_fw4(mut self, keeper: Keeper) -> Engine {
        self.fw4 = Some(Fw4 {
            keeper,
            want: tokio::sync::watch::Sender::new(None),
        });
        self
    }

    /// Runs the background task's check now rather than at its next interval.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Says what is live now, for the writer of fw4's copies; wakes it only when
    /// that changed, or when its last attempt failed (so the periodic check
    /// retries).
    fn keep_copies(&self, generation: u64, live: Option<&Compiled>) {
        let Some(f) = &self.fw4 else { return };
        let failed = f.keeper.status().last_error.is_some();
        f.want.send_if_modified(|w| {
            let same = match w {
                Some((g, l)) => {
                    *g == generation && l.as_ref().map(|c| &c.digest) == live.map(|c| &c.digest)
                }
                None => false,
            };
            if !same {
                *w = Some((generation, live.cloned()));
            }
            !same || failed
        });
    }

    /// Writes fw4's copies for what was last said to be live. A copy that cannot
    /// be kept is logged and shown in the status; the kernel already holds the
    /// rules, so the apply itself stands.
    pub async fn write_copies(&self) {
        let Some(f) = &self.fw4 else { return };
        let Some((generation, live)) = f.want.borrow().clone() else {
            return;
        };
        if let Err(e) = f.keeper.keep(generation, live.as_ref()).await {
            tracing::error!(error = %e, "cannot keep the copy of the rules fw4 loads");
        }
    }

    /// The writer of fw4's copies: catches up with the latest live state whenever
    /// it changes, until shutdown.
    pub async fn run_fw4(self: Arc<Self>, mut stop: Shutdown) {
        let Some(f) = &self.fw4 else { return };
        let mut changed = f.want.subscribe();
        loop {
            self.write_copies().await;
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = shutdown::stopped(&mut stop) => return,
            }
        }
    }

    pub fn status(&self) -> Status {
        let mut status = self.status.lock().expect("status lock").clone();
        if let Some(f) = &self.fw4 {
            let mut fw4 = f.keeper.status();
            fw4.in_step = match &*f.want.borrow() {
                Some((g, live)) => f.keeper.is_kept(*g, live.as_ref()),
                None => true,
            };
            status.fw4 = Some(fw4);
        }
        status
    }

    /// Marked changed after every apply and in-sync check, holding the generation.
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    pub async fn desired(&self) -> Desired {
        self.inner.lock().await.desired.clone()
    }

    /// Looks at the desired state without copying it (12,500 devices would be a
    /// large copy for a handler that needs one group or a few devices).
    pub async fn read<R>(&self, f: impl FnOnce(&Desired) -> R) -> R {
        f(&self.inner.lock().await.desired)
    }

    pub fn dns_config(&self) -> &DnsConfig {
        &self.config.dns
    }

    /// The injected clock's "now", for handlers that stamp what they change.
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    fn zone(&self) -> Zone {
        tz::router_zone(self.files.as_ref(), self.config.timezone.as_deref()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the router's time zone; using UTC");
            Zone::utc()
        })
    }

    fn compile(
        &self,
        desired: &Desired,
        pinned: Option<&compile::Pinned>,
        previous_dns: Option<&compile::DnsPlan>,
    ) -> Result<Option<Compiled>, EngineError> {
        if ops::is_trivial(desired) {
            return Ok(None);
        }
        let zone = self.zone();
        let ctx = Context {
            lan_ifs: self.config.lan_ifs.iter().map(String::as_str).collect(),
            wan_if: &self.config.wan_if,
            zone: &zone,
            now_unix: self.now(),
            kernel_minutes_west: (self.config.kernel_minutes_west)(),
            pinned,
            dns: Some(DnsContext {
                config: &self.config.dns,
                previous: previous_dns,
            }),
        };
        compile::compile(desired, &ctx).map(Some).map_err(|e| {
            EngineError::Invalid(Invalid {
                code: ErrorCode::InvalidPolicy,
                message: e.to_string(),
            })
        })
    }

    /// Puts `want` into the system, `last` being the state believed live (`None`:
    /// unknown, so everything is read and replaced): plan, execute, verify.
    /// `observed` is a reading already made for this plan, if any.
    async fn apply(
        &self,
        want: Option<&Compiled>,
        last: Option<&Compiled>,
        observed: Option<Observed>,
    ) -> Result<Outcome, EngineError> {
        let (observed, read) = match observed {
            Some(o) => (o, ReadTimes::default()),
            None => {
                self.enforcers
                    .observe(plan::reads(want, last), &self.devices)
                    .await?
            }
        };
        let plan = plan::plan(want, last, &observed, &self.devices);
        tracing::debug!("plan:\n{plan}");
        let done: Executed = self
            .enforcers
            .execute(&plan)
            .await
            .map_err(|e| EngineError::Step(Box::new(e)))?;
        let t = Instant::now();
        let (back, _) = self.enforcers.observe(plan.verify, &self.devices).await?;
        self.note_shaping(&back);
        let drift = plan::verify(&plan, &back, &self.devices);
        let verify_ms = ms(t.elapsed());
        if !drift.is_empty() {
            return Err(EngineError::Verify(drift));
        }
        Ok(Outcome {
            nft: done.nft,
            tc_ops: done.tc_ops,
            phases: Phases {
                compile_ms: 0.0,
                tc_ms: read.tc_ms + done.tc_ms,
                nft_ms: read.nft_ms + done.nft_ms,
                dns_ms: read.dns_ms + done.dns_ms,
                verify_ms,
                store_ms: 0.0,
            },
        })
    }

    /// Keeps what a reading of the qdiscs showed for the status.
    fn note_shaping(&self, observed: &Observed) {
        if let Some(shapers) = &observed.shapers {
            let br_nf = self
                .files
                .read_to_string(BRIDGE_NF_CALL_IPTABLES)
                .is_ok_and(|v| v.trim() == "1");
            let shaping = Shaping::of(shapers, &self.devices, br_nf);
            for u in &shaping.unshaped {
                tracing::warn!("{u}");
            }
            self.set_status(|s| s.shaping = shaping);
        }
    }

    /// Gives up on an apply: the live state is unknown now, so the next apply
    /// observes it first, and the reconcile is woken to repair it.
    fn fail(&self, inner: &mut Inner, e: EngineError) -> EngineError {
        inner.live = None;
        if e.leaves_state_unknown() {
            self.set_status(|s| s.last_error = Some(e.to_string()));
            self.wake.notify_one();
        }
        e
    }

    /// Runs `change` on a copy of the desired state, applies the result and keeps it
    /// only when the kernel took it. `what` names the action in the audit log.
    pub async fn change<T>(
        &self,
        actor: &Actor,
        what: &str,
        change: impl FnOnce(&mut Desired) -> Result<T, OpError>,
    ) -> Result<(T, ApplyReport), EngineError> {
        let mut guard = self.inner.lock().await;
        // Borrowed through the guard once, so its fields can be borrowed apart.
        let inner = &mut *guard;
        let mut next = inner.desired.clone();
        let out = match change(&mut next).map_err(EngineError::from).and_then(|v| {
            ops::normalize(&mut next)?;
            Ok(v)
        }) {
            Ok(v) => v,
            Err(e) => {
                self.audit(inner, actor, what, &format!("refused: {e}"));
                return Err(e);
            }
        };
        if next == inner.desired {
            return Ok((out, ApplyReport::unchanged(inner.generation)));
        }
        let started = Instant::now();
        // Not borrowing the guard inside: the connection in it is not Sync.
        let last = inner.live.clone();
        let pinned = inner.pin().cloned();
        let result = async {
            let t = Instant::now();
            let compiled = self.compile(&next, pinned.as_ref(), last.as_ref().map(|b| &b.dns))?;
            let compile_ms = ms(t.elapsed());
            let mut outcome = self.apply(compiled.as_ref(), last.as_ref(), None).await?;
            outcome.phases.compile_ms = compile_ms;
            Ok::<_, EngineError>((compiled, outcome))
        }
        .await;
        let (compiled, mut outcome) = match result {
            Ok(r) => r,
            Err(e) => {
                self.audit(inner, actor, what, &format!("failed: {e}"));
                return Err(self.fail(inner, e));
            }
        };
        let duration = started.elapsed();
        let record = applied(
            inner.generation + 1,
            compiled.as_ref(),
            self.now(),
            duration.as_millis() as u64,
        );
        let t = Instant::now();
        let saved = inner.store.save_policy(&inner.desired, &next, &record);
        outcome.phases.store_ms = ms(t.elapsed());
        if let Err(e) = saved {
            // Put the kernel back to what the store still says.
            tracing::error!(error = %e, "cannot store the new policy; restoring the previous one");
            let old = self.compile(&inner.desired, None, None).ok().flatten();
            let _ = self.apply(old.as_ref(), compiled.as_ref(), None).await;
            return Err(self.fail(inner, EngineError::Store(e)));
        }
        tracing::info!(
            generation = record.generation,
            ms = record.duration_ms,
            nft = outcome.nft,
            tc_ops = outcome.tc_ops,
            "policy applied\n{next}"
        );
        inner.desired = next;
        inner.generation = record.generation;
        self.audit(inner, actor, what, "ok");
        self.record_live(inner, compiled, &record);
        self.keep_copies(inner.generation, inner.live.as_ref());
        Ok((
            out,
            ApplyReport {
                changed: true,
                generation: record.generation,
                duration_ms: ms(duration),
                nft: outcome.nft,
                tc_ops: outcome.tc_ops,
                phases: outcome.phases,
            },
        ))
    }

    fn audit(&self, inner: &mut Inner, actor: &Actor, what: &str, result: &str) {
        let now = self.now();
        let (action, detail) = what.split_once(' ').unwrap_or((what, ""));
        if let Err(e) = inner.store.audit(actor, now, action, detail, result) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }

    pub async fn audit_tail(
        &self,
        limit: u32,
    ) -> Result<Vec<super::persist::AuditEntry>, EngineError> {
        self.inner
            .lock()
            .await
            .store
            .audit_tail(limit)
            .map_err(EngineError::Store)
    }

    /// `compiled` is live now, as `record` says: the base of the next change, and
    /// what the status shows.
    fn record_live(&self, inner: &mut Inner, compiled: Option<Compiled>, record: &Applied) {
        inner.live = compiled;
        let compiled = inner.live.as_ref();
        let zone = self.zone().to_string();
        self.set_status(|s| {
            s.table_present = compiled.is_some();
            s.idle = compiled.is_none();
            s.in_sync = true;
            s.drift.clear();
            s.generation = record.generation;
            s.digest = record.digest.clone();
            s.last_apply_unix = Some(record.applied_unix);
            s.last_apply_ms = Some(record.duration_ms);
            s.last_error = None;
            s.classes_down = compiled.map_or(0, |c| c.tc.down.len());
            s.classes_up = compiled.map_or(0, |c| c.tc.up.len());
            s.devices = inner.desired.groups.values().map(|g| g.devices.len()).sum();
            s.groups = inner.desired.groups.len();
            s.timezone = zone;
            s.next_refresh_unix = compiled.and_then(|c| c.refresh_at);
            s.dns_resolvers = compiled.map_or(0, |c| c.dns.instances.len());
        });
        self.applied.send_replace(record.generation);
    }

    /// `compiled` is live after a reconcile applied it (a refresh or a repair) for
    /// the same generation, at `now`, having started at `started`.
    fn record_reconciled(
        &self,
        inner: &mut Inner,
        compiled: Option<Compiled>,
        now: i64,
        started: Instant,
    ) {
        let ms = started.elapsed().as_millis() as u64;
        let record = applied(inner.generation, compiled.as_ref(), now, ms);
        self.record_live(inner, compiled, &record);
    }

    /// Compares the live state with the desired one and repairs any difference.
    /// Returns the drift found (empty when in sync).
    pub async fn reconcile(&self, reason: &str) -> Result<Vec<String>, EngineError> {
        let mut inner = self.inner.lock().await;
        let started = Instant::now();
        let compiled = self.compile(
            &inner.desired,
            inner.pin(),
            inner.live.as_ref().map(|l| &l.dns),
        )?;
        let now = self.now();
        // The same desired state compiled to other rules: time moved past a DST
        // change the rules were guarded for. A planned refresh, not drift.
        if let (Some(live), Some(want)) = (&inner.live, &compiled) {
            if live.digest != want.digest {
                tracing::info!(reason, "schedules refreshed for the next time change");
                if let Err(e) = self.apply(Some(want), None, None).await {
                    return Err(self.fail(&mut inner, e));
                }
                self.record_reconciled(&mut inner, compiled, now, started);
                self.keep_copies(inner.generation, inner.live.as_ref());
                return Ok(Vec::new());
            }
        }
        let (observed, _) = self.enforcers.observe(Reads::ALL, &self.devices).await?;
        self.note_shaping(&observed);
        let drift = plan::drift(compiled.as_ref(), &observed, &self.devices);
        self.set_status(|s| s.last_check_unix = Some(now));
        if drift.is_empty() {
            if compiled.as_ref().is_some_and(|c| c.moved > 0) {
                // Fold the moves into dev_group while nothing else is happening, so
                // the override map stays small and a device can move again with an
                // add.
                let compact =
                    self.compile(&inner.desired, None, compiled.as_ref().map(|c| &c.dns))?;
                if let Err(e) = self.apply(compact.as_ref(), compiled.as_ref(), None).await {
                    return Err(self.fail(&mut inner, e));
                }
                inner.live = compact;
                self.keep_copies(inner.generation, inner.live.as_ref());
                return Ok(drift);
            }
            let status = self.status();
            let record = applied(
                inner.generation,
                compiled.as_ref(),
                status.last_apply_unix.unwrap_or(now),
                status.last_apply_ms.unwrap_or(0),
            );
            self.record_live(&mut inner, compiled, &record);
            self.keep_copies(inner.generation, inner.live.as_ref());
            return Ok(drift);
        }
        tracing::warn!(reason, drift = ?drift, "live state differs from the desired state; repairing");
        self.set_status(|s| {
            s.in_sync = false;
            s.drift = drift.clone();
        });
        // Whatever is live, replace it whole (planned from the reading just made),
        // then compare everything again.
        let repaired = match self.apply(compiled.as_ref(), None, Some(observed)).await {
            Ok(_) => self
                .enforcers
                .observe(Reads::ALL, &self.devices)
                .await
                .map(|(o, _)| plan::drift(compiled.as_ref(), &o, &self.devices))
                .map_err(EngineError::from),
            Err(e) => Err(e),
        };
        match repaired {
            Ok(still) if still.is_empty() => {}
            Ok(still) => return Err(self.fail(&mut inner, EngineError::Unrepaired(still))),
            Err(e) => return Err(self.fail(&mut inner, e)),
        }
        self.record_reconciled(&mut inner, compiled, now, started);
        self.set_status(|s| {
            s.drift_repairs += 1;
            s.last_drift = drift.clone();
            s.last_drift_unix = Some(now);
        });
        tracing::info!(reason, "repaired; policy in force\n{}", inner.desired);
        self.keep_copies(inner.generation, inner.live.as_ref());
        Ok(drift)
    }

    /// The background task: reconcile at start-up, then every `check_interval`, at
    /// DST changes, and soon after a failure.
    pub async fn run(self: Arc<Self>, mut stop: Shutdown) {
        let mut retry = Duration::from_secs(1);
        loop {
            let wait = match self.reconcile("check").await {
                Ok(_) => {
                    retry = Duration::from_secs(1);
                    let mut wait = self.config.check_interval;
                    if let Some(t) = self.status().next_refresh_unix {
                        let until = (t - self.now()).max(0) as u64 + 1;
                        wait = wait.min(Duration::from_secs(until));
                    }
                    wait
                }
                Err(e) => {
                    tracing::error!(error = %e, retry = ?retry, "reconcile failed");
                    self.set_status(|s| s.last_error = Some(e.to_string()));
                    let w = retry;
                    retry = (retry * 2).min(self.config.check_interval);
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
                _ = shutdown::stopped(&mut stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::plan::Phase;
    use super::*;
    use crate::policy::fixtures::{filtered, kids};
    use crate::policy::model::{Group, Mac};
    use crate::system::dnsmasq::FakeResolver;
    use crate::system::dnsmasq::Resolver as _;
    use crate::system::files::MemFiles;
    use crate::system::nft::FakeNft;
    use crate::system::nft::Firewall as _;
    use crate::system::tc::Shaper as _;
    use crate::system::tc::{FakeTc, IFB};

    struct Rig {
        dir: std::path::PathBuf,
        nft: Arc<FakeNft>,
        tc: Arc<FakeTc>,
        dns: Arc<FakeResolver>,
    }

    impl Rig {
        fn new() -> Rig {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "np-engine-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Rig {
                dir,
                nft: Arc::new(FakeNft::default()),
                tc: Arc::new(FakeTc::default()),
                dns: Arc::new(FakeResolver::default()),
            }
        }

        fn engine(&self) -> Engine {
            self.engine_with("UTC0", Arc::new(|| 1_795_435_200))
        }

        fn engine_with(&self, tz: &str, clock: Clock) -> Engine {
            Engine::new(
                Store::open(&self.dir).unwrap(),
                Enforcers {
                    nft: self.nft.clone(),
                    tc: self.tc.clone(),
                    dns: self.dns.clone(),
                },
                Arc::new(MemFiles::default()),
                EngineConfig {
                    lan_ifs: vec!["br-lan".into()],
                    wan_if: "wan".into(),
                    timezone: Some(tz.into()),
                    check_interval: Duration::from_secs(60),
                    kernel_minutes_west: Arc::new(|| 0),
                    dns: DnsConfig::default(),
                },
                clock,
            )
            .unwrap()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn sync(e: &Engine, g: Group) -> Result<ApplyReport, EngineError> {
        e.change(&Actor::default(), "test", |d| ops::sync_group(d, g))
            .await
            .map(|(_, r)| r)
    }

    #[tokio::test]
    async fn applying_twice_changes_nothing_and_a_move_is_incremental() {
        let rig = Rig::new();
        let e = rig.engine();
        assert!(
            e.reconcile("start").await.unwrap().is_empty(),
            "nothing wanted, nothing there"
        );
        assert_eq!(
            rig.nft.applies(),
            0,
            "an idle agent leaves the kernel alone"
        );
        let r = sync(&e, kids(&[1, 2], Some(5000))).await.unwrap();
        assert!(r.changed);
        assert_eq!(r.nft, "table");
        assert_eq!(
            rig.tc.observe("br-lan").await.unwrap().classes[&0x102],
            5000
        );
        let applies = rig.nft.applies();
        let again = sync(&e, kids(&[1, 2], Some(5000))).await.unwrap();
        assert!(!again.changed);
        assert_eq!(rig.nft.applies(), applies);
        let moved = sync(&e, kids(&[1, 2, 3], Some(5000))).await.unwrap();
        assert_eq!(moved.nft, "elements");
        assert_eq!(moved.tc_ops, 0);
        let live = rig.nft.observe().await.unwrap().unwrap();
        assert_eq!(
            live.elements["dev_moved"].len(),
            1,
            "the new device is an override"
        );
        // The periodic check folds overrides into dev_group.
        assert!(e.reconcile("check").await.unwrap().is_empty());
        let live = rig.nft.observe().await.unwrap().unwrap();
        assert!(live.elements["dev_moved"].is_empty());
        assert_eq!(live.elements["dev_group"].len(), 3);
        assert!(e.reconcile("check").await.unwrap().is_empty());
        assert!(e.status().in_sync);
        assert_eq!(e.status().generation, 2);
    }

    #[tokio::test]
    async fn a_refused_apply_keeps_kernel_and_store_on_the_previous_state() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        let before_tc = rig.tc.observe("br-lan").await.unwrap();
        let before_table = rig.nft.observe().await.unwrap();
        rig.nft.fail_next(2);
        // A new device and a changed rate: elements, then (refused) the whole table.
        let err = sync(&e, kids(&[1, 2], Some(700))).await.unwrap_err();
        assert!(
            matches!(&err, EngineError::Step(s) if s.phase == Phase::Firewall),
            "{err}"
        );
        assert_eq!(
            rig.tc.observe("br-lan").await.unwrap(),
            before_tc,
            "tc restored"
        );
        assert_eq!(rig.nft.observe().await.unwrap(), before_table);
        assert_eq!(
            e.desired().await.groups[&3].policy.bandwidth.down_kbps,
            Some(5000)
        );
        assert_eq!(e.desired().await.groups[&3].devices.len(), 1);
        // What a restart would load agrees.
        drop(e);
        let again = rig.engine();
        assert_eq!(
            again.desired().await.groups[&3].policy.bandwidth.down_kbps,
            Some(5000)
        );
        assert!(again.reconcile("start").await.unwrap().is_empty());
        let audit = again.audit_tail(5).await.unwrap();
        assert!(audit[0].result.starts_with("failed"), "{audit:?}");
    }

    async fn servers(rig: &Rig, id: &str) -> Option<String> {
        rig.dns
            .observe()
            .await
            .unwrap()
            .into_iter()
            .find(|o| o.id == id && o.running)
            .and_then(|o| o.servers)
    }

    #[tokio::test]
    async fn dns_filtering_starts_reloads_and_stops_its_resolver_with_the_policy() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, filtered(&[1], &["blocked.test"])).await.unwrap();
        let slot = e.read(|d| d.slots[&3]).await;
        let id = format!("g{slot}");
        assert_eq!(rig.dns.starts(&id), 1);
        let text = servers(&rig, &id).await.expect("resolver running");
        assert!(text.contains("server=/blocked.test/\n"), "{text}");
        assert!(
            text.contains("server=/use-application-dns.net/\n"),
            "{text}"
        );
        let table = rig.nft.observe().await.unwrap().unwrap();
        assert!(
            table.elements["dns_dev"].contains(&format!("02:00:00:00:00:01 : goto dns_g{slot}")),
            "{:?}",
            table.elements["dns_dev"]
        );
        assert_eq!(e.status().dns_resolvers, 1);

        // A category the group uses is replaced: the same resolver re-reads its list.
        let mut g = filtered(&[1], &["blocked.test"]);
        g.policy.dns.categories.insert("social".into());
        sync(&e, g).await.unwrap();
        assert_eq!((rig.dns.starts(&id), rig.dns.reloads(&id)), (1, 1));
        let social = crate::policy::categories::category(
            "social",
            "Social media",
            vec![crate::dns::domain::normalize("new.social.test").unwrap()],
            Some(1),
        );
        e.change(&Actor::default(), "test", |d| ops::set_category(d, social))
            .await
            .unwrap();
        assert_eq!(rig.dns.reloads(&id), 2);
        let text = servers(&rig, &id).await.unwrap();
        assert!(text.contains("server=/new.social.test/\n"), "{text}");
        assert!(
            !text.contains("facebook.com"),
            "the shipped list is replaced"
        );
        // A change elsewhere leaves the resolver alone.
        let mut other = kids(&[9], Some(1000));
        other.id = 4;
        sync(&e, other).await.unwrap();
        assert_eq!((rig.dns.starts(&id), rig.dns.reloads(&id)), (1, 2));

        // A dead resolver is drift: reported, and started again.
        rig.dns.crash(&id);
        let drift = e.reconcile("check").await.unwrap();
        assert!(drift.iter().any(|d| d.contains("not running")), "{drift:?}");
        assert_eq!(rig.dns.starts(&id), 2);
        assert!(e.reconcile("check").await.unwrap().is_empty());

        // Filtering off: the resolver is stopped.
        sync(&e, kids(&[1], None)).await.unwrap();
        assert!(rig.dns.observe().await.unwrap().is_empty());
        assert_eq!(e.status().dns_resolvers, 0);
    }

    #[tokio::test]
    async fn a_refused_nft_transaction_takes_back_the_resolver_change() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, filtered(&[1], &["a.test"])).await.unwrap();
        let id = format!("g{}", e.read(|d| d.slots[&3]).await);
        rig.nft.fail_next(2);
        assert!(sync(&e, filtered(&[1, 2], &["b.test"])).await.is_err());
        let text = servers(&rig, &id).await.unwrap();
        assert!(
            text.contains("server=/a.test/\n") && !text.contains("b.test"),
            "{text}"
        );
        // A new filtered group whose rules are refused leaves no resolver behind.
        let mut g = filtered(&[7], &["c.test"]);
        g.id = 5;
        // New chains: one whole-table transaction, refused.
        rig.nft.fail_next(1);
        assert!(sync(&e, g).await.is_err());
        let ids: Vec<String> = rig
            .dns
            .observe()
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.id)
            .collect();
        assert_eq!(ids, vec![id]);
        assert!(e.reconcile("check").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_resolver_that_cannot_start_leaves_the_kernel_and_the_store_alone() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        let applies = rig.nft.applies();
        // Slot 1 is the guests'; the group's is the next.
        rig.dns.fail_next("g2");
        let err = sync(&e, filtered(&[1], &["a.test"])).await.unwrap_err();
        assert!(
            matches!(&err, EngineError::Step(s) if s.phase == Phase::MakeResolver),
            "{err}"
        );
        assert!(err.to_string().contains("g2"), "{err}");
        assert_eq!(rig.nft.applies(), applies, "nft untouched");
        assert!(!e.desired().await.groups[&3].policy.dns.filters());
        assert!(
            rig.dns.observe().await.unwrap().is_empty(),
            "the resolver that could not start is taken back"
        );
        assert!(e.reconcile("check").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_resolver_answering_its_canary_unfiltered_fails_the_apply_naming_it() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        let applies = rig.nft.applies();
        // Its directory unreadable for good: no restart helps.
        rig.dns.answer_unfiltered("g2", false);
        let err = sync(&e, filtered(&[1], &["a.test"])).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, EngineError::Step(s) if s.phase == Phase::MakeResolver),
            "{msg}"
        );
        for part in ["dns resolver g2", "group 3", "port 5402", "REFUSED"] {
            assert!(msg.contains(part), "{part}: {msg}");
        }
        assert_eq!(rig.nft.applies(), applies, "no redirect to it");
        assert!(rig.dns.observe().await.unwrap().is_empty(), "taken back");
        assert!(!e.desired().await.groups[&3].policy.dns.filters());
        assert!(e.status().last_error.is_some());
    }

    #[tokio::test]
    async fn a_resolver_gone_unfiltered_is_drift_and_restarted() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, filtered(&[1], &["a.test"])).await.unwrap();
        assert_eq!(rig.dns.starts("g2"), 1);
        // It re-read its list as a user that could not read it (a reload after the
        // modes went wrong): running, right files, unfiltered.
        rig.dns.answer_unfiltered("g2", true);
        let drift = e.reconcile("check").await.unwrap();
        assert!(
            drift
                .iter()
                .any(|d| d.contains("g2 (group 3, port 5402) answers the canary unfiltered")),
            "{drift:?}"
        );
        assert_eq!(rig.dns.starts("g2"), 2, "restarted");
        let status = e.status();
        assert!(status.in_sync && status.drift_repairs == 1, "{status:?}");
        assert_eq!(status.last_drift, drift);
        assert!(e.reconcile("check").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_tc_failure_midway_is_undone_and_nft_untouched() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        let applies = rig.nft.applies();
        let mut two = kids(&[1], Some(5000));
        two.id = 4;
        two.devices[0].mac = Mac([2, 0, 0, 0, 0, 9]);
        two.policy.bandwidth.down_kbps = Some(300);
        rig.tc.fail_op_after(1);
        assert!(sync(&e, two).await.is_err());
        assert_eq!(rig.nft.applies(), applies);
        let down = rig.tc.observe("br-lan").await.unwrap();
        assert_eq!(down.classes.len(), 1, "{down:?}");
        assert!(e.reconcile("check").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn drift_is_reported_and_repaired_and_a_restart_converges() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, kids(&[1, 2], Some(5000))).await.unwrap();
        rig.nft.flush_behind_our_back();
        let drift = e.reconcile("check").await.unwrap();
        assert!(
            drift.iter().any(|d| d.contains("chain from_lan")),
            "{drift:?}"
        );
        assert_eq!(e.status().drift_repairs, 1);
        assert!(e.reconcile("check").await.unwrap().is_empty());
        // A reboot: empty kernel, the store still has the policy.
        drop(e);
        let fresh = Rig {
            dir: rig.dir.clone(),
            nft: Arc::new(FakeNft::default()),
            tc: Arc::new(FakeTc::default()),
            dns: Arc::new(FakeResolver::default()),
        };
        let e = fresh.engine();
        let drift = e.reconcile("start").await.unwrap();
        assert!(drift.iter().any(|d| d.contains("missing")), "{drift:?}");
        assert!(e.reconcile("check").await.unwrap().is_empty());
        assert_eq!(
            fresh
                .tc
                .observe(crate::system::tc::IFB)
                .await
                .unwrap()
                .classes[&0x102],
            5000
        );
    }

    #[tokio::test]
    async fn a_dst_change_refreshes_the_rules_without_calling_it_drift() {
        let rig = Rig::new();
        let now = Arc::new(std::sync::atomic::AtomicI64::new(1_806_062_400)); // 2027-03-26
        let clock_now = now.clone();
        let e = rig.engine_with(
            "CET-1CEST,M3.5.0,M10.5.0/3",
            Arc::new(move || clock_now.load(std::sync::atomic::Ordering::Relaxed)),
        );
        let mut g = kids(&[1], None);
        g.policy.schedules = vec![crate::policy::model::Schedule {
            window: crate::policy::schedule::LocalWindow {
                days: crate::policy::schedule::Weekdays(0x7f),
                start_min: 22 * 60,
                end_min: 6 * 60,
            },
            action: crate::policy::schedule::Restriction::Block,
        }];
        sync(&e, g).await.unwrap();
        let refresh = e
            .status()
            .next_refresh_unix
            .expect("guarded at the March change");
        now.store(refresh + 1, std::sync::atomic::Ordering::Relaxed);
        let applies = rig.nft.applies();
        assert!(e.reconcile("refresh").await.unwrap().is_empty());
        assert_eq!(rig.nft.applies(), applies + 1, "recompiled and applied");
        assert_eq!(e.status().drift_repairs, 0);
        assert!(
            e.status().next_refresh_unix > Some(refresh),
            "now guarded at October"
        );
        assert!(e.reconcile("check").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn fw4_copies_follow_the_live_rules_and_flash_only_policy_changes() {
        let rig = Rig::new();
        let paths = super::super::fw4::Fw4Paths {
            live_dir: rig.dir.join("fw4"),
            include: rig.dir.join("post/netpilot.nft"),
            boot: rig.dir.join("boot.nft"),
        };
        let e = rig
            .engine()
            .with_fw4(Keeper::new(paths.clone(), rig.nft.clone()));
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        assert!(
            !e.status().fw4.unwrap().in_step,
            "written off the apply's path"
        );
        e.write_copies().await;
        let live = std::fs::read_to_string(paths.live_file()).unwrap();
        assert!(live.starts_with("table inet netpilot {}\ndelete table inet netpilot\n"));
        let fw4 = e.status().fw4.unwrap();
        assert!(fw4.in_step);
        assert_eq!((fw4.live_writes, fw4.boot_writes), (1, 1));
        assert_eq!(fw4.boot_copy_generation, Some(1));
        // A device added: an element change; both copies follow (new policy).
        sync(&e, kids(&[1, 2], Some(5000))).await.unwrap();
        e.write_copies().await;
        assert!(std::fs::read_to_string(paths.live_file())
            .unwrap()
            .contains("02:00:00:00:00:02"));
        // Checks and the compaction they make: the flash is not written again.
        assert!(e.reconcile("check").await.unwrap().is_empty());
        e.write_copies().await;
        assert!(e.reconcile("check").await.unwrap().is_empty());
        e.write_copies().await;
        let fw4 = e.status().fw4.unwrap();
        assert_eq!(fw4.boot_writes, 2, "{fw4:?}");
        assert_eq!(
            fw4.live_writes, 3,
            "the compaction changed the script: {fw4:?}"
        );
        // A copy nft refuses: the change stands, the status says so, old copy kept.
        let before = std::fs::read_to_string(paths.live_file()).unwrap();
        rig.nft.refuse_checks(true);
        sync(&e, kids(&[1, 2, 3], Some(5000))).await.unwrap();
        e.write_copies().await;
        let fw4 = e.status().fw4.unwrap();
        assert!(!fw4.in_step);
        assert!(fw4.last_error.unwrap().contains("not put in place"));
        assert_eq!(std::fs::read_to_string(paths.live_file()).unwrap(), before);
        // Fixed at the next check.
        rig.nft.refuse_checks(false);
        e.reconcile("check").await.unwrap();
        e.write_copies().await;
        assert!(e.status().fw4.unwrap().last_error.is_none());
        assert!(std::fs::read_to_string(paths.live_file())
            .unwrap()
            .contains("02:00:00:00:00:03"));
    }

    #[tokio::test]
    async fn reset_removes_every_rule_and_class() {
        let rig = Rig::new();
        let e = rig.engine();
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        e.change(&Actor::default(), "reset", |d| {
            ops::reset(d);
            Ok(())
        })
        .await
        .unwrap();
        assert!(rig.nft.observe().await.unwrap().is_none());
        assert!(rig.nft.observe_bridge().await.unwrap().is_none());
        assert!(!rig.tc.observe("br-lan").await.unwrap().root_is_ours());
        assert!(rig.tc.observe(IFB).await.is_err(), "the ifb is gone");
        assert!(e.status().idle);
    }

    /// sqm-scripts on the WAN device (HTB `1:`, an ingress redirect to its own
    /// ifb): applying, changing and resetting limits never touches it, and the
    /// status shows it.
    #[tokio::test]
    async fn sqm_on_the_wan_is_left_alone_and_reported() {
        let rig = Rig::new();
        rig.tc.set_root("wan", "htb", "1:");
        rig.tc.set_foreign_ingress("wan");
        let sqm = rig.tc.observe("wan").await.unwrap();
        let e = rig.engine();
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        assert_eq!(rig.tc.observe("wan").await.unwrap(), sqm);
        assert_eq!(rig.tc.observe(IFB).await.unwrap().classes[&0x102], 5000);
        let s = e.status().shaping;
        assert_eq!(s.wan_root.as_deref(), Some("htb 1:"));
        assert_eq!(s.wan_root_owner, Some(RootOwner::Foreign));
        assert!(s.upload_ifb_present && s.lan[0].upload_redirect, "{s:?}");
        assert!(s.unshaped.is_empty(), "{s:?}");
        sync(&e, kids(&[1], Some(9000))).await.unwrap();
        assert!(e.reconcile("check").await.unwrap().is_empty());
        e.change(&Actor::default(), "reset", |d| {
            ops::reset(d);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(rig.tc.observe("wan").await.unwrap(), sqm);
        assert!(!e.status().shaping.upload_ifb_present);
    }

    /// An older agent left HTB `1:` roots on both devices: the first apply after
    /// the update replaces the bridge's with ours and removes the WAN device's,
    /// and the state then reads back without drift.
    #[tokio::test]
    async fn an_older_agents_roots_are_migrated_on_the_first_apply() {
        let rig = Rig::new();
        rig.tc.set_legacy_root("br-lan");
        rig.tc.set_legacy_root("wan");
        let e = rig.engine();
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        let lan = rig.tc.observe("br-lan").await.unwrap();
        assert!(lan.root_is_ours() && !lan.legacy, "{lan:?}");
        assert_eq!(lan.classes[&0x102], 5000);
        let wan = rig.tc.observe("wan").await.unwrap();
        assert_eq!(wan.owner(), RootOwner::Default, "{wan:?}");
        assert!(e.reconcile("check").await.unwrap().is_empty());
    }

    /// br_netfilter passing bridged frames to the IP hooks defeats download
    /// classification once upload is redirected: the status says so.
    #[tokio::test]
    async fn br_netfilter_calling_iptables_is_reported() {
        let rig = Rig::new();
        let e = Engine::new(
            Store::open(&rig.dir).unwrap(),
            Enforcers {
                nft: rig.nft.clone(),
                tc: rig.tc.clone(),
                dns: rig.dns.clone(),
            },
            Arc::new(MemFiles::default().with(BRIDGE_NF_CALL_IPTABLES, "1\n")),
            EngineConfig {
                lan_ifs: vec!["br-lan".into()],
                wan_if: "wan".into(),
                timezone: Some("UTC0".into()),
                check_interval: Duration::from_secs(60),
                kernel_minutes_west: Arc::new(|| 0),
                dns: DnsConfig::default(),
            },
            Arc::new(|| 1_795_435_200),
        )
        .unwrap();
        sync(&e, kids(&[1], Some(5000))).await.unwrap();
        let s = e.status().shaping;
        assert!(s.bridge_nf_call_iptables);
        assert!(
            s.unshaped[0].starts_with("net.bridge.bridge-nf-call-iptables is 1"),
            "{s:?}"
        );
    }
}
