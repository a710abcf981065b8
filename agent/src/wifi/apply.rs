//! Safe apply of a Wi-Fi change, which can cut the router off (a Wi-Fi uplink, a
//! mesh, or simply the owner's only way in):
//!
//! 1. drop staged uci changes of `wireless` (an unfinished LuCI edit would be
//!    committed with ours), snapshot it (`uci export`), plan the commands;
//! 2. store the change as `pending` with its snapshot and deadline — before uci is
//!    touched, so a crash from here on is resumed at start-up;
//! 3. `uci batch` + `uci commit` (reverted on any failure: the change is `failed`,
//!    the configuration intact), then `wifi reload` (on failure the snapshot is
//!    restored and reloaded: `rolled_back`);
//! 4. after a settle delay, report `confirmed` to the relay every `retry` until a
//!    report is delivered (`confirmed`) or the grace period ends: then restore the
//!    snapshot (`uci import`) and reload (`rolled_back`), and report that until the
//!    relay has it.
//!
//! One change at a time: a change while one is pending is refused (409
//! `CHANGE_PENDING`): its snapshot would be an unconfirmed state, and rolling the
//! first back would silently undo the second.
//!
//! Waiting uses the monotonic clock; the stored deadline is wall-clock, used only
//! after a restart, clamped to the grace period (a router's clock may jump at its
//! first NTP sync).

use std::time::Duration;

use tokio::time::Instant;

use super::model::{self, Request, PACKAGE};
use super::persist::{Change, ChangeView, State};
use super::{WifiError, WifiService};
use crate::link::report::AgentEvent;
use crate::policy::persist::Actor;
use crate::system::uci::UciError;

/// In-memory schedule of a change with work left.
#[derive(Debug, Clone, Copy)]
pub struct Timer {
    /// Roll back at this instant (pending changes).
    pub deadline: Instant,
    /// Next report attempt.
    pub next: Instant,
}

/// The answer to a change request.
#[derive(Debug, serde::Serialize)]
pub struct ChangeAnswer {
    /// False when the configuration already was as asked (nothing applied).
    pub changed: bool,
    pub message: String,
    /// Interface sections or radios the request addressed.
    pub targets: Vec<String>,
    /// The change, `pending` until confirmed or rolled back.
    pub change: Option<ChangeView>,
}

/// The pure decision for one change with work left.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    RollBack,
    Report(State),
    Wait(Instant),
}

pub fn next_step(state: State, reported: bool, timer: &Timer, now: Instant) -> Step {
    match state {
        State::Pending if now >= timer.deadline => Step::RollBack,
        State::Pending if now >= timer.next => Step::Report(State::Confirmed),
        State::Pending => Step::Wait(timer.next.min(timer.deadline)),
        s if !reported && now >= timer.next => Step::Report(s),
        _ if !reported => Step::Wait(timer.next),
        // Nothing left: far future.
        _ => Step::Wait(now + Duration::from_secs(86_400)),
    }
}

fn new_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    // SystemRandom fails only without an OS RNG; a time-based id is still unique
    // enough for one router's change log.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b = t.to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Replaces a secret in text from outside the agent (uci's stderr) before it is
/// logged or answered; uci is not known to echo values, this makes sure.
fn scrub(text: String, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() && text.contains(s) => text.replace(s, "<redacted>"),
        _ => text,
    }
}

impl WifiService {
    fn now(&self) -> i64 {
        (self.clock)()
    }

    fn bump(&self) {
        self.events.send_modify(|n| *n += 1);
    }

    fn audit(&self, actor: &Actor, action: &str, detail: &str, result: &str) {
        let now = self.now();
        if let Err(e) = self
            .store()
            .audit(actor, now, &format!("wifi.{action}"), detail, result)
        {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
    }

    fn settle(&self, c: &Change, state: State, outcome: Option<&str>, reported: bool) {
        let now = self.now();
        if let Err(e) = self
            .store()
            .wifi_settle(&c.id, state, now, outcome, reported)
        {
            tracing::error!(change = %c.id, error = %e, "cannot record the Wi-Fi change's state");
        }
        self.bump();
    }

    /// Applies a validated request under safe apply.
    pub async fn change(&self, actor: &Actor, req: &Request) -> Result<ChangeAnswer, WifiError> {
        let _guard = self.apply_lock.lock().await;
        let secret = req.password().map(|p| p.expose());
        let latest = self
            .store()
            .wifi_latest()
            .map_err(|e| WifiError::Store(e.to_string()))?;
        if let Some(c) = latest.filter(|c| c.state == State::Pending) {
            return Err(WifiError::Pending {
                id: c.id,
                deadline_unix: c.deadline_unix,
            });
        }
        let uci_err = |step: &'static str, e: UciError| WifiError::Apply {
            step,
            message: scrub(e.to_string(), secret),
            restored: false,
        };
        self.uci
            .revert(PACKAGE)
            .await
            .map_err(|e| uci_err("uci revert", e))?;
        let (snapshot, w) = self.read_config().await?;
        let plan = match model::plan(&w, req) {
            Ok(p) => p,
            Err(e) => {
                self.audit(
                    actor,
                    req.action(),
                    &e.message,
                    &format!("refused: {}", e.code),
                );
                return Err(e.into());
            }
        };
        if plan.cmds.is_empty() {
            self.audit(actor, req.action(), &plan.detail, "unchanged");
            return Ok(ChangeAnswer {
                changed: false,
                message: "the Wi-Fi configuration already is as asked; nothing was applied".into(),
                targets: plan.targets,
                change: None,
            });
        }
        let now = self.now();
        let change = Change {
            id: new_id(),
            action: req.action().to_owned(),
            detail: plan.detail.clone(),
            reload: plan.reload.clone(),
            created_unix: now,
            deadline_unix: now + self.config.grace.as_secs() as i64,
            state: State::Pending,
            settled_unix: None,
            outcome: None,
            reported: false,
            snapshot,
        };
        self.store()
            .wifi_insert(&change)
            .map_err(|e| WifiError::Store(e.to_string()))?;
        tracing::info!(change = %change.id, action = %change.action, detail = %change.detail, "applying Wi-Fi change");

        if let Err(e) = self.uci.apply(PACKAGE, &plan.cmds).await {
            let step = e.step().map_or("uci", |s| s.as_str());
            let message = scrub(e.to_string(), secret);
            tracing::warn!(change = %change.id, %step, error = %message, "uci refused the Wi-Fi change");
            // Nothing changed, so there is nothing to roll back or report.
            self.settle(&change, State::Failed, Some(&message), true);
            self.audit(
                actor,
                req.action(),
                &plan.detail,
                &format!("failed: {message}"),
            );
            return Err(WifiError::Apply {
                step,
                message,
                restored: false,
            });
        }
        if let Err(e) = self.wifi.reload(plan.reload.as_deref()).await {
            let message = scrub(e.to_string(), secret);
            tracing::warn!(change = %change.id, error = %message, "wifi reload failed; restoring");
            let restored = self.restore(&change).await;
            let outcome = format!("wifi reload failed: {message}");
            match &restored {
                Ok(()) => self.settle(&change, State::RolledBack, Some(&outcome), false),
                // The change stays pending: the background task retries the rollback.
                Err(e) => {
                    tracing::error!(change = %change.id, error = %e, "cannot restore the Wi-Fi snapshot")
                }
            }
            self.schedule_now(&change.id);
            self.audit(
                actor,
                req.action(),
                &plan.detail,
                &format!("rolled back: {outcome}"),
            );
            return Err(WifiError::Apply {
                step: "wifi reload",
                message,
                restored: restored.is_ok(),
            });
        }
        let at = Instant::now();
        self.timers.lock().expect("wifi timers").insert(
            change.id.clone(),
            Timer {
                deadline: at + self.config.grace,
                next: at + self.config.settle.min(self.config.grace),
            },
        );
        self.audit(
            actor,
            req.action(),
            &plan.detail,
            &format!("pending {}", change.id),
        );
        self.bump();
        self.wake.notify_one();
        Ok(ChangeAnswer {
            changed: true,
            message: format!(
                "applied; pending confirmation, rolled back automatically unless the relay is reached within {}s",
                self.config.grace.as_secs()
            ),
            targets: plan.targets,
            change: Some(change.view()),
        })
    }

    fn schedule_now(&self, id: &str) {
        let now = Instant::now();
        self.timers.lock().expect("wifi timers").insert(
            id.to_owned(),
            Timer {
                deadline: now,
                next: now,
            },
        );
        self.wake.notify_one();
    }

    /// Puts the snapshot back and reloads.
    async fn restore(&self, c: &Change) -> Result<(), WifiError> {
        self.uci
            .restore(PACKAGE, &c.snapshot)
            .await
            .map_err(|e| WifiError::Apply {
                step: "uci import",
                message: e.to_string(),
                restored: false,
            })?;
        // The file is restored; a failing reload leaves the old radios running
        // until the next reload, which is logged but does not undo the restore.
        if let Err(e) = self.wifi.reload(c.reload.as_deref()).await {
            tracing::error!(change = %c.id, error = %e, "wifi reload after the restore failed");
        }
        Ok(())
    }

    /// The timer of a change found in the store and not yet scheduled (after a
    /// restart): the remaining grace from the stored deadline, clamped.
    fn resume_timer(&self, c: &Change, now: Instant) -> Timer {
        let left = (c.deadline_unix - self.now()).clamp(0, self.config.grace.as_secs() as i64);
        let deadline = now + Duration::from_secs(left as u64);
        Timer {
            deadline,
            next: (now + self.config.settle).min(deadline),
        }
    }

    /// Does the work that is due and returns when to look again. Rollbacks run
    /// under the apply lock (so never beside a change being applied); reports,
    /// which may wait for a connect timeout, run without it.
    pub async fn tick(&self) -> Instant {
        let mut wake_at = Instant::now() + Duration::from_secs(86_400);
        let mut reports = Vec::new();
        {
            let _guard = self.apply_lock.lock().await;
            let open = match self.store().wifi_open() {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read pending Wi-Fi changes");
                    return Instant::now() + self.config.retry;
                }
            };
            for c in open {
                let now = Instant::now();
                let known = self.timers.lock().expect("wifi timers").get(&c.id).copied();
                let timer = match known {
                    Some(t) => t,
                    None => self.resume(&c, now).await,
                };
                match next_step(c.state, c.reported, &timer, now) {
                    Step::Wait(at) => wake_at = wake_at.min(at),
                    Step::Report(state) => reports.push((c, state, timer)),
                    Step::RollBack => {
                        tracing::warn!(change = %c.id, "Wi-Fi change not confirmed in time; rolling back");
                        match self.restore(&c).await {
                            Ok(()) => {
                                self.settle(
                                    &c,
                                    State::RolledBack,
                                    Some("not confirmed within the grace period"),
                                    false,
                                );
                                self.audit(
                                    &Actor::default(),
                                    &c.action,
                                    &c.detail,
                                    &format!("rolled back {}: not confirmed in time", c.id),
                                );
                                let settled = Change {
                                    state: State::RolledBack,
                                    outcome: Some("not confirmed within the grace period".into()),
                                    ..c
                                };
                                reports.push((settled, State::RolledBack, timer));
                            }
                            Err(e) => {
                                tracing::error!(change = %c.id, error = %e, "rollback failed; retrying");
                                let next = now + self.config.retry;
                                self.set_timer(&c.id, now, next);
                                wake_at = wake_at.min(next);
                            }
                        }
                    }
                }
            }
        }
        for (c, state, timer) in reports {
            if let Some(next) = self.report(&c, state).await {
                let next = if state == State::Confirmed {
                    next.min(timer.deadline)
                } else {
                    next
                };
                self.set_timer(&c.id, timer.deadline, next);
                wake_at = wake_at.min(next);
            }
        }
        wake_at
    }

    /// A change found in the store with no schedule: the agent restarted. A
    /// pending one is reloaded once (the crash may have come between commit and
    /// reload, and what gets confirmed must be what runs) and waits for the rest
    /// of its grace period, clamped; past its deadline it rolls back at once.
    async fn resume(&self, c: &Change, now: Instant) -> Timer {
        let t = self.resume_timer(c, now);
        if c.state == State::Pending {
            tracing::info!(change = %c.id, left_s = (t.deadline - now).as_secs(), "resuming a pending Wi-Fi change after a restart");
            if t.deadline > now {
                if let Err(e) = self.wifi.reload(c.reload.as_deref()).await {
                    tracing::warn!(change = %c.id, error = %e, "wifi reload on resume failed");
                }
            }
        }
        self.set_timer(&c.id, t.deadline, t.next);
        t
    }

    /// One report attempt; `Some(next attempt)` when it was not delivered.
    async fn report(&self, c: &Change, state: State) -> Option<Instant> {
        let event = AgentEvent {
            kind: "wifi_change".into(),
            id: c.id.clone(),
            state: state.as_str().into(),
            detail: Some(match &c.outcome {
                Some(o) => format!("{}: {o}", c.detail),
                None => c.detail.clone(),
            }),
            at: self.now().max(0) as u64,
        };
        match self.reporter.report(&event).await {
            Ok(()) => {
                if state == State::Confirmed {
                    tracing::info!(change = %c.id, "Wi-Fi change confirmed: the relay is reachable");
                    self.settle(c, State::Confirmed, None, true);
                    self.audit(
                        &Actor::default(),
                        &c.action,
                        &c.detail,
                        &format!("confirmed {}", c.id),
                    );
                } else {
                    tracing::info!(change = %c.id, state = state.as_str(), "Wi-Fi change reported to the relay");
                    if let Err(e) = self.store().wifi_reported(&c.id) {
                        tracing::error!(error = %e, "cannot record the report");
                    }
                    self.bump();
                }
                self.timers.lock().expect("wifi timers").remove(&c.id);
                None
            }
            Err(e) => {
                tracing::debug!(change = %c.id, error = %e, "report not delivered; retrying");
                Some(Instant::now() + self.config.retry)
            }
        }
    }

    fn set_timer(&self, id: &str, deadline: Instant, next: Instant) {
        self.timers
            .lock()
            .expect("wifi timers")
            .insert(id.to_owned(), Timer { deadline, next });
    }

    /// The background task: resumes stored changes, confirms, rolls back and
    /// reports until `stop`.
    pub async fn run(self: std::sync::Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let at = self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}
