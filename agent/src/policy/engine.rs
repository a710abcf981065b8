//! The engine: owns the desired state, and turns a change into kernel state with
//! compile → diff against what is live → apply → verify, never leaving it
//! half-applied. tc classes are made before nft points traffic at them and removed
//! after; a refused nft transaction leaves the old table and the tc changes are
//! undone. The store is written only after the kernel took the change, so the two
//! agree; a crash in between is repaired by the reconcile at start-up, which also
//! runs periodically (drift), at DST changes and after any failed apply.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netpilot_proto::ErrorCode;
use serde::Serialize;

use super::compile::{self, Compiled, Context, DnsContext, Side};
use super::dnsfilter::{DnsConfig, DnsPlan};
use super::model::{Desired, Invalid};
use super::ops::{self, OpError};
use super::persist::{Actor, Applied};
use super::tz::{self, Zone};
use crate::store::Store;
use crate::system::dnsmasq::{InstanceSpec, Resolver};
use crate::system::files::Files;
use crate::system::nft::{self, Firewall, ObservedTable};
use crate::system::tc::{ObservedShaper, Shaper, TcOp};

/// Seconds since the epoch, injected so tests control "now".
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    })
}

#[derive(Clone)]
pub struct EngineConfig {
    pub lan_if: String,
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
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("group {0} does not exist")]
    NoSuchGroup(u32),
    /// The kernel did not take the change; the previous state is in force.
    #[error("applying the policy failed: {0}")]
    Apply(String),
    #[error("state database: {0}")]
    Store(String),
}

impl From<OpError> for EngineError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Invalid(i) => EngineError::Invalid(i),
            OpError::NoSuchGroup(id) => EngineError::NoSuchGroup(id),
        }
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

struct Inner {
    store: Store,
    desired: Desired,
    generation: u64,
    /// The last compiled state known to be live (verified or applied); the base for
    /// incremental element changes.
    live: Option<Compiled>,
}

/// How to take back a resolver change of an apply that failed later.
enum DnsUndo {
    Restore(InstanceSpec),
    Stop(String),
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
    nft: Arc<dyn Firewall>,
    tc: Arc<dyn Shaper>,
    dns: Arc<dyn Resolver>,
    files: Arc<dyn Files>,
    config: EngineConfig,
    clock: Clock,
    status: Mutex<Status>,
    /// Wakes the background task early (after a failure, for a refresh).
    wake: tokio::sync::Notify,
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mut store: Store,
        nft: Arc<dyn Firewall>,
        tc: Arc<dyn Shaper>,
        dns: Arc<dyn Resolver>,
        files: Arc<dyn Files>,
        config: EngineConfig,
        clock: Clock,
    ) -> Result<Engine, EngineError> {
        let (mut desired, applied) = store
            .load_policy()
            .map_err(|e| EngineError::Store(e.to_string()))?;
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
            nft,
            tc,
            dns,
            files,
            config,
            clock,
            status: Mutex::new(status),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
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
            Zone::parse("UTC0").expect("UTC0 parses")
        })
    }

    fn compile(
        &self,
        desired: &Desired,
        pinned: Option<&compile::Pinned>,
        previous_dns: Option<&DnsPlan>,
    ) -> Result<Option<Compiled>, EngineError> {
        if ops::is_trivial(desired) {
            return Ok(None);
        }
        let zone = self.zone();
        let ctx = Context {
            lan_if: &self.config.lan_if,
            wan_if: &self.config.wan_if,
            zone: &zone,
            now_unix: (self.clock)(),
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

    /// Runs `change` on a copy of the desired state, applies the result and keeps it
    /// only when the kernel took it. `what` names the action in the audit log.
    pub async fn change<T>(
        &self,
        actor: &Actor,
        what: &str,
        change: impl FnOnce(&mut Desired) -> Result<T, OpError>,
    ) -> Result<(T, ApplyReport), EngineError> {
        let mut inner = self.inner.lock().await;
        let mut next = inner.desired.clone();
        let out = match change(&mut next).map_err(EngineError::from).and_then(|v| {
            ops::normalize(&mut next)?;
            Ok(v)
        }) {
            Ok(v) => v,
            Err(e) => {
                self.audit(&mut inner, actor, what, &format!("refused: {e}"));
                return Err(e);
            }
        };
        if next == inner.desired {
            let report = ApplyReport {
                changed: false,
                generation: inner.generation,
                duration_ms: 0.0,
                nft: "none",
                tc_ops: 0,
                phases: Phases::default(),
            };
            return Ok((out, report));
        }
        let started = Instant::now();
        // Not borrowing the guard inside: the connection in it is not Sync.
        let base = inner.live.clone();
        let pinned = inner.pin().cloned();
        let result = async {
            let t = Instant::now();
            let compiled = self.compile(&next, pinned.as_ref(), base.as_ref().map(|b| &b.dns))?;
            let compile_ms = ms(t.elapsed());
            let (nft_kind, tc_ops, mut phases) =
                self.apply(compiled.as_ref(), base.as_ref()).await?;
            phases.compile_ms = compile_ms;
            Ok::<_, EngineError>((compiled, nft_kind, tc_ops, phases))
        }
        .await;
        let (compiled, nft_kind, tc_ops, mut phases) = match result {
            Ok(r) => r,
            Err(e) => {
                self.after_failure(&e);
                // The live state is unknown now; the next apply observes it first.
                inner.live = None;
                self.audit(&mut inner, actor, what, &format!("failed: {e}"));
                return Err(e);
            }
        };
        let duration = started.elapsed();
        let applied = Applied {
            generation: inner.generation + 1,
            digest: compiled
                .as_ref()
                .map(|c| c.digest.clone())
                .unwrap_or_default(),
            applied_unix: (self.clock)(),
            duration_ms: duration.as_millis() as u64,
        };
        let prev = std::mem::take(&mut inner.desired);
        let t = Instant::now();
        let saved = inner.store.save_policy(&prev, &next, &applied);
        phases.store_ms = ms(t.elapsed());
        if let Err(e) = saved {
            inner.desired = prev.clone();
            // Put the kernel back to what the store still says.
            tracing::error!(error = %e, "cannot store the new policy; restoring the previous one");
            let old = self.compile(&prev, None, None).ok().flatten();
            let _ = self.apply(old.as_ref(), compiled.as_ref()).await;
            inner.live = None;
            self.after_failure(&EngineError::Store(e.to_string()));
            return Err(EngineError::Store(e.to_string()));
        }
        tracing::info!(
            generation = applied.generation,
            ms = applied.duration_ms,
            nft = nft_kind,
            tc_ops,
            "policy applied\n{next}"
        );
        inner.desired = next;
        inner.generation = applied.generation;
        inner.live = compiled.clone();
        self.audit(&mut inner, actor, what, "ok");
        self.record_applied(&inner, compiled.as_ref(), &applied);
        Ok((
            out,
            ApplyReport {
                changed: true,
                generation: applied.generation,
                duration_ms: duration.as_secs_f64() * 1000.0,
                nft: nft_kind,
                tc_ops,
                phases,
            },
        ))
    }

    fn audit(&self, inner: &mut Inner, actor: &Actor, what: &str, result: &str) {
        let now = (self.clock)();
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
            .map_err(|e| EngineError::Store(e.to_string()))
    }

    fn after_failure(&self, e: &EngineError) {
        if matches!(e, EngineError::Apply(_) | EngineError::Store(_)) {
            self.set_status(|s| s.last_error = Some(e.to_string()));
            self.wake.notify_one();
        }
    }

    fn record_applied(&self, inner: &Inner, compiled: Option<&Compiled>, applied: &Applied) {
        let zone = self.zone().to_string();
        self.set_status(|s| {
            s.table_present = compiled.is_some();
            s.idle = compiled.is_none();
            s.in_sync = true;
            s.drift.clear();
            s.generation = applied.generation;
            s.digest = applied.digest.clone();
            s.last_apply_unix = Some(applied.applied_unix);
            s.last_apply_ms = Some(applied.duration_ms);
            s.last_error = None;
            s.classes_down = compiled.map_or(0, |c| c.tc.down.len());
            s.classes_up = compiled.map_or(0, |c| c.tc.up.len());
            s.devices = inner.desired.groups.values().map(|g| g.devices.len()).sum();
            s.groups = inner.desired.groups.len();
            s.timezone = zone;
            s.next_refresh_unix = compiled.and_then(|c| c.refresh_at);
            s.dns_resolvers = compiled.map_or(0, |c| c.dns.instances.len());
        });
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
        let now = (self.clock)();
        // The same desired state compiled to other rules: time moved past a DST
        // change the rules were guarded for. A planned refresh, not drift.
        if let (Some(live), Some(want)) = (&inner.live, &compiled) {
            if live.digest != want.digest {
                tracing::info!(reason, "schedules refreshed for the next time change");
                let result = self.apply(Some(want), None).await;
                if let Err(e) = result {
                    inner.live = None;
                    self.after_failure(&e);
                    return Err(e);
                }
                inner.live = compiled.clone();
                let applied = Applied {
                    generation: inner.generation,
                    digest: want.digest.clone(),
                    applied_unix: now,
                    duration_ms: started.elapsed().as_millis() as u64,
                };
                self.record_applied(&inner, compiled.as_ref(), &applied);
                return Ok(Vec::new());
            }
        }
        let drift = self.observe_drift(compiled.as_ref()).await?;
        self.set_status(|s| s.last_check_unix = Some(now));
        if drift.is_empty() && compiled.as_ref().is_some_and(|c| c.moved > 0) {
            // Fold the moves into dev_group while nothing else is happening, so the
            // override map stays small and a device can move again with an add.
            let compact = self.compile(&inner.desired, None, compiled.as_ref().map(|c| &c.dns))?;
            match self.apply(compact.as_ref(), compiled.as_ref()).await {
                Ok(_) => {
                    inner.live = compact;
                    return Ok(drift);
                }
                Err(e) => {
                    inner.live = None;
                    self.after_failure(&e);
                    return Err(e);
                }
            }
        }
        if drift.is_empty() {
            inner.live = compiled.clone();
            let applied = Applied {
                generation: inner.generation,
                digest: compiled
                    .as_ref()
                    .map(|c| c.digest.clone())
                    .unwrap_or_default(),
                applied_unix: self.status().last_apply_unix.unwrap_or(now),
                duration_ms: self.status().last_apply_ms.unwrap_or(0),
            };
            self.record_applied(&inner, compiled.as_ref(), &applied);
            return Ok(drift);
        }
        tracing::warn!(reason, drift = ?drift, "live state differs from the desired state; repairing");
        self.set_status(|s| {
            s.in_sync = false;
            s.drift = drift.clone();
        });
        // Whatever is live, replace it whole, then compare everything again.
        let repaired = match self.apply(compiled.as_ref(), None).await {
            Ok(_) => self.observe_drift(compiled.as_ref()).await,
            Err(e) => Err(e),
        };
        let still = match repaired {
            Ok(still) => still,
            Err(e) => {
                inner.live = None;
                self.after_failure(&e);
                return Err(e);
            }
        };
        if !still.is_empty() {
            inner.live = None;
            let e = EngineError::Apply(format!("still differs after repair: {}", still.join("; ")));
            self.after_failure(&e);
            return Err(e);
        }
        inner.live = compiled.clone();
        let applied = Applied {
            generation: inner.generation,
            digest: compiled
                .as_ref()
                .map(|c| c.digest.clone())
                .unwrap_or_default(),
            applied_unix: now,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        self.record_applied(&inner, compiled.as_ref(), &applied);
        self.set_status(|s| {
            s.drift_repairs += 1;
            s.last_drift = drift.clone();
            s.last_drift_unix = Some(now);
        });
        tracing::info!(reason, "repaired; policy in force\n{}", inner.desired);
        Ok(drift)
    }

    /// What differs between the kernel and `want` (nothing wanted: no table, no
    /// NetPilot qdisc).
    async fn observe_drift(&self, want: Option<&Compiled>) -> Result<Vec<String>, EngineError> {
        let table = self
            .nft
            .observe()
            .await
            .map_err(|e| EngineError::Apply(e.to_string()))?;
        let mut drift = Vec::new();
        match (want, &table) {
            (None, Some(_)) => {
                drift.push("table inet netpilot exists but nothing is to be enforced".into())
            }
            (Some(_), None) => drift.push("table inet netpilot is missing".into()),
            (Some(c), Some(t)) => drift.extend(table_drift(c, t)),
            (None, None) => {}
        }
        for side in [Side::Down, Side::Up] {
            let dev = self.dev(side);
            let live = self
                .tc
                .observe(dev)
                .await
                .map_err(|e| EngineError::Apply(e.to_string()))?;
            let empty = Default::default();
            let plan = want.map_or(&empty, |c| c.tc.side(side));
            drift.extend(tc_drift(dev, plan, &live));
        }
        drift.extend(self.dns_drift(want.map(|c| &c.dns)).await?);
        Ok(drift)
    }

    /// What differs between the running filtering resolvers and the plan.
    async fn dns_drift(&self, want: Option<&DnsPlan>) -> Result<Vec<String>, EngineError> {
        let live = self
            .dns
            .observe()
            .await
            .map_err(|e| EngineError::Apply(e.to_string()))?;
        let empty = DnsPlan::default();
        let want = want.unwrap_or(&empty);
        let mut drift = Vec::new();
        for p in want.instances.values() {
            let id = &p.spec.id;
            match live.iter().find(|o| &o.id == id) {
                None => drift.push(format!("dns resolver {id} is missing")),
                Some(o) if !o.running => drift.push(format!("dns resolver {id} is not running")),
                Some(o) if o.servers.as_deref() != Some(p.spec.servers.as_str()) => {
                    drift.push(format!("dns resolver {id}: its block list differs"))
                }
                Some(_) => {}
            }
        }
        for o in &live {
            if !want.instances.values().any(|p| p.spec.id == o.id) {
                drift.push(format!("dns resolver {} is not wanted", o.id));
            }
        }
        Ok(drift)
    }

    /// Undoes step 0 of an apply that failed later, as far as the state before it
    /// is known; otherwise the reconcile that follows every failure repairs it.
    async fn undo_dns(&self, undo: &[DnsUndo]) {
        for u in undo.iter().rev() {
            let r = match u {
                DnsUndo::Restore(spec) => self.dns.ensure(spec).await.map(|_| ()),
                DnsUndo::Stop(id) => self.dns.stop(id).await,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot undo a dns resolver change");
            }
        }
    }

    fn dev(&self, side: Side) -> &str {
        match side {
            Side::Down => &self.config.lan_if,
            Side::Up => &self.config.wan_if,
        }
    }

    /// Puts `want` into the kernel. `base` is the state believed live (last
    /// verified or applied): with it, an unchanged tc plan is left alone and nft
    /// changes only the elements that differ; `None` observes and replaces.
    async fn apply(
        &self,
        want: Option<&Compiled>,
        base: Option<&Compiled>,
    ) -> Result<(&'static str, usize, Phases), EngineError> {
        let apply_err = |e: String| EngineError::Apply(e);
        let mut phases = Phases::default();
        let tc_unchanged = matches!((want, base), (Some(w), Some(b)) if w.tc == b.tc);
        let empty_dns = DnsPlan::default();
        let want_dns = want.map_or(&empty_dns, |w| &w.dns);
        let dns_unchanged = base.is_some_and(|b| &b.dns == want_dns);

        // 0. DNS, make: the resolvers the new redirects will point at, with their
        // new lists (a reload where only the list changed).
        let t = Instant::now();
        let mut dns_undo: Vec<DnsUndo> = Vec::new();
        let mut dns_live = Vec::new();
        if !dns_unchanged {
            dns_live = self
                .dns
                .observe()
                .await
                .map_err(|e| apply_err(e.to_string()))?;
            for p in want_dns.instances.values() {
                let before =
                    base.and_then(|b| b.dns.instances.values().find(|o| o.spec.id == p.spec.id));
                let known = dns_live.iter().any(|o| o.id == p.spec.id);
                // Before the ensure: one that fails half way (files written, no
                // process) is taken back too.
                match before {
                    Some(b) if b.spec != p.spec => dns_undo.push(DnsUndo::Restore(b.spec.clone())),
                    Some(_) => {}
                    None if !known => dns_undo.push(DnsUndo::Stop(p.spec.id.clone())),
                    None => {}
                }
                if let Err(e) = self.dns.ensure(&p.spec).await {
                    self.undo_dns(&dns_undo).await;
                    return Err(apply_err(format!("dns resolver {}: {e}", p.spec.id)));
                }
            }
        }
        phases.dns_ms += ms(t.elapsed());

        // 1. tc, make: roots and classes the new rules will point at.
        let t = Instant::now();
        let mut undo: Vec<TcOp> = Vec::new();
        let mut tc_ops = 0;
        let mut observed: Vec<(Side, ObservedShaper)> = Vec::new();
        if !tc_unchanged {
            let (down, up) = tokio::join!(
                self.tc.observe(self.dev(Side::Down)),
                self.tc.observe(self.dev(Side::Up))
            );
            observed.push((Side::Down, down.map_err(|e| apply_err(e.to_string()))?));
            observed.push((Side::Up, up.map_err(|e| apply_err(e.to_string()))?));
        }
        let mut make = Vec::new();
        for (side, live) in &observed {
            let dev = self.dev(*side).to_owned();
            let empty = Default::default();
            let plan = want.map_or(&empty, |c| c.tc.side(*side));
            if plan.is_empty() {
                continue;
            }
            if !live.root_is_ours() {
                make.push(TcOp::ReplaceRoot { dev: dev.clone() });
                undo.push(TcOp::DeleteRoot { dev: dev.clone() });
            }
            for (minor, kbps) in plan {
                let was = if live.root_is_ours() {
                    live.classes.get(minor)
                } else {
                    None
                };
                if was != Some(kbps) {
                    make.push(TcOp::SetClass {
                        dev: dev.clone(),
                        minor: *minor,
                        kbps: *kbps,
                    });
                    if live.root_is_ours() {
                        undo.push(match was {
                            Some(old) => TcOp::SetClass {
                                dev: dev.clone(),
                                minor: *minor,
                                kbps: *old,
                            },
                            None => TcOp::DeleteClass {
                                dev: dev.clone(),
                                minor: *minor,
                            },
                        });
                    }
                }
            }
        }
        tc_ops += make.len();
        if let Err(e) = self.tc.run(&make).await {
            // Some of the batch may have run: undo all of it (undoing what did not
            // happen fails harmlessly).
            self.undo_tc(&undo).await;
            self.undo_dns(&dns_undo).await;
            return Err(apply_err(e.to_string()));
        }
        phases.tc_ms += ms(t.elapsed());

        // 2. nft: one transaction.
        let t = Instant::now();
        let nft_kind = match self.apply_nft(want, base).await {
            Ok(k) => k,
            Err(e) => {
                self.undo_tc(&undo).await;
                self.undo_dns(&dns_undo).await;
                return Err(e);
            }
        };
        phases.nft_ms = ms(t.elapsed());

        // 3a. DNS, break: resolvers no redirect points at any more.
        let t = Instant::now();
        for o in &dns_live {
            if !want_dns.instances.values().any(|p| p.spec.id == o.id) {
                if let Err(e) = self.dns.stop(&o.id).await {
                    tracing::warn!(error = %e, id = %o.id, "cannot stop an unused dns resolver");
                }
            }
        }
        phases.dns_ms += ms(t.elapsed());

        // 3. tc, break: what nothing points at any more.
        let t = Instant::now();
        let mut ops = Vec::new();
        for (side, live) in observed {
            let dev = self.dev(side).to_owned();
            let empty = Default::default();
            let plan = want.map_or(&empty, |c| c.tc.side(side));
            if plan.is_empty() {
                if live.root_is_ours() {
                    ops.push(TcOp::DeleteRoot { dev });
                }
            } else if live.root_is_ours() {
                for minor in live.classes.keys().filter(|m| !plan.contains_key(m)) {
                    ops.push(TcOp::DeleteClass {
                        dev: dev.clone(),
                        minor: *minor,
                    });
                }
            }
        }
        tc_ops += ops.len();
        // The new rules are in force; a leftover class only costs memory, so a
        // failure here is reported by the verify below rather than undone.
        if let Err(e) = self.tc.run(&ops).await {
            tracing::warn!(error = %e, "cannot remove unused tc classes");
        }
        phases.tc_ms += ms(t.elapsed());

        // 4. verify by reading back. tc has no transactions: every class is read
        // back. An nft transaction is all or nothing and the kernel acknowledged
        // it, so the table's chains are read back (a listing of rules or elements
        // costs a fetch of every element); the periodic check compares everything.
        let t = Instant::now();
        let mut drift = Vec::new();
        let chains = self.nft.chains();
        let tc_read = async {
            if tc_unchanged {
                return None;
            }
            let (down, up) = tokio::join!(
                self.tc.observe(self.dev(Side::Down)),
                self.tc.observe(self.dev(Side::Up))
            );
            Some((down, up))
        };
        let (chains, tc_read) = tokio::join!(chains, tc_read);
        let chains = chains.map_err(|e| apply_err(e.to_string()))?;
        match (want, chains) {
            (None, Some(_)) => drift.push("table inet netpilot is still there".to_owned()),
            (Some(_), None) => drift.push("table inet netpilot is missing".to_owned()),
            (Some(w), Some(have)) => {
                let expected = nft::set_of(nft::rule_counts(&w.structure).into_keys());
                if have != expected {
                    drift.push(format!("chains {have:?}, expected {expected:?}"));
                }
            }
            (None, None) => {}
        }
        if let Some((down, up)) = tc_read {
            for (side, live) in [(Side::Down, down), (Side::Up, up)] {
                let live = live.map_err(|e| apply_err(e.to_string()))?;
                let empty = Default::default();
                let dev = self.dev(side);
                drift.extend(tc_drift(
                    dev,
                    want.map_or(&empty, |c| c.tc.side(side)),
                    &live,
                ));
            }
        }
        if !dns_unchanged {
            drift.extend(self.dns_drift(Some(want_dns)).await?);
        }
        phases.verify_ms = ms(t.elapsed());
        if !drift.is_empty() {
            return Err(apply_err(format!(
                "read-back differs: {}",
                drift.join("; ")
            )));
        }
        Ok((nft_kind, tc_ops, phases))
    }

    async fn undo_tc(&self, undo: &[TcOp]) {
        for op in undo.iter().rev() {
            if let Err(e) = self.tc.run(std::slice::from_ref(op)).await {
                tracing::warn!(error = %e, ?op, "cannot undo a tc change");
            }
        }
    }

    async fn apply_nft(
        &self,
        want: Option<&Compiled>,
        base: Option<&Compiled>,
    ) -> Result<&'static str, EngineError> {
        let apply_err = |e: String| EngineError::Apply(e);
        let Some(want) = want else {
            let present = self
                .nft
                .observe()
                .await
                .map_err(|e| apply_err(e.to_string()))?;
            if present.is_none() {
                return Ok("none");
            }
            let script = format!("delete table {} {}\n", nft::FAMILY, nft::TABLE);
            self.nft
                .apply(&script)
                .await
                .map_err(|e| apply_err(e.to_string()))?;
            return Ok("table");
        };
        if let Some(base) = base {
            if base.digest == want.digest {
                return Ok("none");
            }
            if let Some(delta) = want.element_delta(base) {
                if delta.is_empty() {
                    // Only tc rates changed.
                    return Ok("none");
                }
                match self.nft.apply(&delta).await {
                    Ok(()) => return Ok("elements"),
                    // The table is not what we believed: replace it whole.
                    Err(e) => {
                        tracing::warn!(error = %e, "incremental nft change refused; replacing the table")
                    }
                }
            }
        }
        self.nft
            .apply(&want.full_script())
            .await
            .map_err(|e| apply_err(e.to_string()))?;
        Ok("table")
    }

    /// The background task: reconcile at start-up, then every `check_interval`, at
    /// DST changes, and soon after a failure.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut retry = Duration::from_secs(1);
        loop {
            let wait = match self.reconcile("check").await {
                Ok(_) => {
                    retry = Duration::from_secs(1);
                    let mut wait = self.config.check_interval;
                    if let Some(t) = self.status().next_refresh_unix {
                        let until = (t - (self.clock)()).max(0) as u64 + 1;
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
                _ = crate::link::stopped(&mut stop) => return,
            }
        }
    }
}

/// Differences between a compiled table and a read-back, in words.
pub fn table_drift(want: &Compiled, live: &ObservedTable) -> Vec<String> {
    let mut out = Vec::new();
    let comment = format!("netpilot {}", want.structure_digest);
    match live.comment.as_deref() {
        Some(c) if c == comment => {}
        // Its rule is gone too; the rule counts below say what else is.
        None => out.push("the digest rule is missing".into()),
        Some(c) => {
            out.push(format!("rule set {c:?} is live, {comment:?} is wanted"));
            return out;
        }
    }
    let rules = nft::rule_counts(&want.structure);
    if rules != live.chains {
        for (chain, n) in &rules {
            let have = live.chains.get(chain).copied();
            if have != Some(*n) {
                out.push(format!(
                    "chain {chain}: {} rules, expected {n}",
                    have.map_or("no".into(), |h| h.to_string())
                ));
            }
        }
        for chain in live.chains.keys().filter(|c| !rules.contains_key(*c)) {
            out.push(format!("unexpected chain {chain}"));
        }
    }
    let mut sets = nft::inline_elements(&want.structure);
    for (name, elems) in &want.elements {
        sets.insert((*name).to_owned(), std::collections::BTreeSet::clone(elems));
    }
    for (name, elems) in &sets {
        match live.elements.get(name) {
            None => out.push(format!("set {name} is missing")),
            Some(have) if have != elems => {
                let missing = elems.difference(have).count();
                let extra = have.difference(elems).count();
                out.push(format!(
                    "set {name}: {missing} element(s) missing, {extra} unexpected"
                ));
            }
            Some(_) => {}
        }
    }
    out
}

pub fn tc_drift(
    dev: &str,
    plan: &std::collections::BTreeMap<u16, u32>,
    live: &ObservedShaper,
) -> Vec<String> {
    let mut out = Vec::new();
    if plan.is_empty() {
        if live.root_is_ours() {
            out.push(format!(
                "{dev}: NetPilot's qdisc is present but nothing is shaped"
            ));
        }
        return out;
    }
    if !live.root_is_ours() {
        out.push(format!(
            "{dev}: NetPilot's HTB root qdisc is missing (root is {:?})",
            live.root
        ));
        return out;
    }
    for (minor, kbps) in plan {
        match live.classes.get(minor) {
            None => out.push(format!("{dev}: class 1:{minor:x} is missing")),
            Some(k) if k.abs_diff(*kbps) * 200 > *kbps => out.push(format!(
                "{dev}: class 1:{minor:x} is {k} kbit/s, expected {kbps}"
            )),
            Some(_) => {}
        }
    }
    for minor in live.classes.keys().filter(|m| !plan.contains_key(m)) {
        out.push(format!("{dev}: unexpected class 1:{minor:x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::{Bandwidth, Device, Group, Mac, Policy};
    use crate::system::dnsmasq::FakeResolver;
    use crate::system::files::MemFiles;
    use crate::system::nft::FakeNft;
    use crate::system::tc::FakeTc;

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
                self.nft.clone(),
                self.tc.clone(),
                self.dns.clone(),
                Arc::new(MemFiles::default()),
                EngineConfig {
                    lan_if: "br-lan".into(),
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

    fn kids(devices: &[u8], down: Option<u32>) -> Group {
        Group {
            id: 3,
            name: "Kids".into(),
            devices: devices
                .iter()
                .map(|d| Device {
                    mac: Mac([2, 0, 0, 0, 0, *d]),
                    ipv4: None,
                    ipv6: None,
                    name: None,
                })
                .collect(),
            policy: Policy {
                bandwidth: Bandwidth {
                    down_kbps: down,
                    up_kbps: down,
                },
                ..Policy::default()
            },
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
        assert!(matches!(err, EngineError::Apply(_)), "{err}");
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

    fn filtered(devices: &[u8], block: &[&str]) -> Group {
        let mut g = kids(devices, None);
        g.policy.dns.block = block
            .iter()
            .map(|b| crate::dns::domain::normalize(b).unwrap())
            .collect();
        g
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
        let social = super::super::dnsfilter::category(
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
        assert!(matches!(err, EngineError::Apply(_)), "{err}");
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
        assert_eq!(fresh.tc.observe("wan").await.unwrap().classes[&0x102], 5000);
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
        assert!(!rig.tc.observe("br-lan").await.unwrap().root_is_ours());
        assert!(e.status().idle);
    }
}
