//! The thin shell around [`super::plan`]: reads what a plan needs from the system
//! and carries a plan out through the seams (`nft`, `tc`, the resolvers), recording
//! what it did. It decides nothing: the order, the undo of each step and what a
//! failure means all come with the plan.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::plan::{Action, NftChange, Observed, Phase, Plan, Reads, Shapers};
use crate::system::dnsmasq::Resolver;
use crate::system::nft::Firewall;
use crate::system::tc::{ObservedShaper, Shaper, TcError};

/// Awaits every future in order (a router has one LAN bridge or a few).
async fn in_order<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    for f in futs {
        out.push(f.await);
    }
    out
}
pub use crate::system::SystemError;

/// The programs the policy engine drives.
#[derive(Clone)]
pub struct Enforcers {
    pub nft: Arc<dyn Firewall>,
    pub tc: Arc<dyn Shaper>,
    pub dns: Arc<dyn Resolver>,
}

/// Reading the live state failed; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[error("reading the {what}: {source}")]
pub struct ObserveError {
    pub what: &'static str,
    #[source]
    pub source: SystemError,
}

/// A step failed. When its phase takes back, every step before it was taken back
/// (as far as the undo could; what it could not is in `undo_failures`).
#[derive(Debug, thiserror::Error)]
#[error("{phase} ({action}): {source}")]
pub struct StepError {
    pub phase: Phase,
    /// The action that failed, in words (`ensure dns resolver g2`).
    pub action: String,
    #[source]
    pub source: SystemError,
    pub undo_failures: Vec<String>,
}

/// What carrying out a plan did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Executed {
    /// `none`, `elements` or `table`: how the table changed.
    pub nft: &'static str,
    pub tc_ops: usize,
    /// Milliseconds per kind of work, reads included.
    pub tc_ms: f64,
    pub nft_ms: f64,
    pub dns_ms: f64,
    /// Steps after the firewall change that failed; the new rules are in force.
    pub warnings: Vec<String>,
}

/// Runs `read` when it is `wanted`, timing it; futures do nothing until awaited.
async fn timed<T>(wanted: bool, read: impl std::future::Future<Output = T>) -> (Option<T>, f64) {
    if !wanted {
        return (None, 0.0);
    }
    let t = Instant::now();
    let r = read.await;
    (Some(r), ms(t.elapsed()))
}

/// A read that was made (`Some`) and failed becomes the error naming it.
fn read<T, E: Into<SystemError>>(
    what: &'static str,
    result: Option<Result<T, E>>,
) -> Result<Option<T>, ObserveError> {
    result.transpose().map_err(|e| ObserveError {
        what,
        source: e.into(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Where reading took its time, added to the apply's phases.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadTimes {
    pub nft_ms: f64,
    pub tc_ms: f64,
    pub dns_ms: f64,
}

impl Enforcers {
    /// Reads what `reads` asks for, concurrently.
    pub async fn observe(
        &self,
        reads: Reads,
        devices: &super::plan::Devices,
    ) -> Result<(Observed, ReadTimes), ObserveError> {
        let ((table, t1), (bridge, t0), (chains, t2), (shapers, t3), (resolvers, t4)) = tokio::join!(
            timed(reads.table, self.nft.observe()),
            timed(reads.table, self.nft.observe_bridge()),
            timed(reads.chains, self.nft.chains()),
            timed(reads.shapers, self.observe_shapers(devices)),
            timed(reads.resolvers, self.dns.observe()),
        );
        let observed = Observed {
            table: read("nftables table", table)?,
            bridge: read("nftables bridge table", bridge)?,
            chains: read("nftables chains", chains)?,
            shapers: read("tc qdiscs and classes", shapers)?,
            resolvers: read("dns resolvers", resolvers)?,
        };
        Ok((
            observed,
            ReadTimes {
                nft_ms: t0 + t1 + t2,
                tc_ms: t3,
                dns_ms: t4,
            },
        ))
    }

    /// The LAN bridges (which must exist), the WAN device and the ifb (either may
    /// be missing: no WAN link yet, no upload shaping yet).
    async fn observe_shapers(&self, devices: &super::plan::Devices) -> Result<Shapers, TcError> {
        let maybe = |r: Result<ObservedShaper, TcError>| match r {
            Err(TcError::NoDevice(_)) => Ok(ObservedShaper::missing()),
            other => other,
        };
        let lan = in_order(devices.lan.iter().map(|d| self.tc.observe(d)));
        let (lan, wan, ifb) = tokio::join!(
            lan,
            self.tc.observe(&devices.wan),
            self.tc.observe(&devices.ifb)
        );
        Ok(Shapers {
            lan: lan.into_iter().collect::<Result<_, _>>()?,
            wan: maybe(wan)?,
            ifb: maybe(ifb)?,
        })
    }

    /// Carries out `plan` step by step. The undo of each step is recorded before it
    /// runs; when a step whose phase takes back fails, everything recorded is run
    /// last to first and the step's error returned.
    pub async fn execute(&self, plan: &Plan<'_>) -> Result<Executed, StepError> {
        let mut done = Executed {
            nft: "none",
            tc_ops: plan.tc_ops(),
            ..Executed::default()
        };
        let mut undo: Vec<&Action<'_>> = Vec::new();
        for step in &plan.steps {
            if step.phase.takes_back() {
                undo.extend(step.undo.iter());
            }
            let t = Instant::now();
            let result = self.run(&step.action, &mut done).await;
            let took = ms(t.elapsed());
            match &step.action {
                Action::Ensure(_) | Action::Stop(_) => done.dns_ms += took,
                Action::Tc(_) => done.tc_ms += took,
                Action::Nft(_) => done.nft_ms += took,
            }
            let Err(source) = result else { continue };
            if step.phase.takes_back() {
                let undo_failures = self.take_back(&undo).await;
                return Err(StepError {
                    phase: step.phase,
                    action: step.action.to_string(),
                    source,
                    undo_failures,
                });
            }
            tracing::warn!(error = %source, action = %step.action, "{}", step.phase);
            done.warnings
                .push(format!("{} ({}): {source}", step.phase, step.action));
        }
        Ok(done)
    }

    async fn run(&self, action: &Action<'_>, done: &mut Executed) -> Result<(), SystemError> {
        match action {
            Action::Ensure(spec) => {
                self.dns.ensure(spec).await?;
            }
            Action::Stop(id) => self.dns.stop(id).await?,
            Action::Tc(ops) => self.tc.run(ops).await?,
            Action::Nft(change) => {
                let script = change.script();
                match (self.nft.apply(&script).await, change) {
                    (Ok(()), _) => done.nft = change.kind(),
                    // The table is not what was believed: replace it whole.
                    (Err(e), NftChange::Elements { whole, .. }) => {
                        tracing::warn!(error = %e, "incremental nft change refused; replacing the table");
                        self.nft.apply(&whole.full_script()).await?;
                        done.nft = "table";
                    }
                    (Err(e), _) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Runs the recorded undo actions last to first, each on its own: one that
    /// fails (or undoes what never happened) does not stop the rest.
    async fn take_back(&self, undo: &[&Action<'_>]) -> Vec<String> {
        let mut failures = Vec::new();
        let mut scratch = Executed::default();
        for action in undo.iter().rev() {
            if let Err(e) = self.run(action, &mut scratch).await {
                tracing::warn!(error = %e, %action, "cannot take back a step");
                failures.push(format!("{action}: {e}"));
            }
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::plan::{Devices, Step};
    use crate::system::dnsmasq::FakeResolver;
    use crate::system::nft::FakeNft;
    use crate::system::tc::{FakeTc, TcOp};

    struct Rig {
        nft: Arc<FakeNft>,
        tc: Arc<FakeTc>,
        dns: Arc<FakeResolver>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig {
                nft: Arc::new(FakeNft::default()),
                tc: Arc::new(FakeTc::default()),
                dns: Arc::new(FakeResolver::default()),
            }
        }

        fn enforcers(&self) -> Enforcers {
            Enforcers {
                nft: self.nft.clone(),
                tc: self.tc.clone(),
                dns: self.dns.clone(),
            }
        }
    }

    fn root(dev: &str) -> TcOp {
        TcOp::ReplaceRoot { dev: dev.into() }
    }

    fn class(dev: &str, kbps: u32) -> TcOp {
        TcOp::SetClass {
            dev: dev.into(),
            minor: 0x102,
            kbps,
        }
    }

    fn plan(steps: Vec<Step<'_>>) -> Plan<'_> {
        Plan {
            want: None,
            steps,
            verify: Reads::default(),
        }
    }

    #[tokio::test]
    async fn a_failing_make_step_takes_back_every_recorded_undo_last_first() {
        let rig = Rig::new();
        let e = rig.enforcers();
        e.tc.run(&[root("lan"), class("lan", 5000)]).await.unwrap();
        // The second step's second op fails: its undo was recorded before it ran,
        // so the class it changed is put back as well as the first step's.
        rig.tc.fail_op_after(2);
        let p = plan(vec![
            Step {
                phase: Phase::MakeShaper,
                action: Action::Tc(vec![class("lan", 6000)]),
                undo: vec![Action::Tc(vec![class("lan", 5000)])],
            },
            Step {
                phase: Phase::MakeShaper,
                action: Action::Tc(vec![root("wan"), class("wan", 1000)]),
                undo: vec![Action::Tc(vec![TcOp::DeleteRoot {
                    dev: "wan".into(),
                    major: crate::system::tc::MAJOR,
                }])],
            },
        ]);
        let err = e.execute(&p).await.unwrap_err();
        assert_eq!(err.phase, Phase::MakeShaper);
        assert_eq!(err.action, "2 tc operation(s)");
        assert!(err.undo_failures.is_empty(), "{:?}", err.undo_failures);
        assert_eq!(rig.tc.observe("lan").await.unwrap().classes[&0x102], 5000);
        assert!(!rig.tc.observe("wan").await.unwrap().root_is_ours());
    }

    #[tokio::test]
    async fn a_failing_break_step_is_a_warning_and_the_rest_still_runs() {
        let rig = Rig::new();
        let e = rig.enforcers();
        e.tc.run(&[root("lan")]).await.unwrap();
        let p = plan(vec![
            Step {
                phase: Phase::BreakShaper,
                // No such class: tc refuses.
                action: Action::Tc(vec![TcOp::DeleteClass {
                    dev: "lan".into(),
                    minor: 0x999,
                }]),
                undo: Vec::new(),
            },
            Step {
                phase: Phase::BreakShaper,
                action: Action::Tc(vec![TcOp::DeleteRoot {
                    dev: "lan".into(),
                    major: crate::system::tc::MAJOR,
                }]),
                undo: Vec::new(),
            },
        ]);
        let done = e.execute(&p).await.unwrap();
        assert_eq!(done.warnings.len(), 1, "{:?}", done.warnings);
        assert!(done.warnings[0].starts_with("removing unused tc classes"));
        assert!(!rig.tc.observe("lan").await.unwrap().root_is_ours());
        assert_eq!(done.tc_ops, 2);
    }

    #[tokio::test]
    async fn a_refused_element_change_falls_back_to_the_whole_table() {
        let rig = Rig::new();
        let e = rig.enforcers();
        let a = crate::policy::compile::compile(
            &{
                let mut d = crate::policy::ops::initial();
                d.groups.get_mut(&0).unwrap().policy.internet =
                    crate::policy::model::Internet::Block;
                d
            },
            &crate::policy::compile::Context::new("lan", "wan", &crate::policy::tz::Zone::utc(), 0),
        )
        .unwrap();
        // The delta deletes an element the (empty) kernel does not have.
        let p = plan(vec![Step {
            phase: Phase::Firewall,
            action: Action::Nft(NftChange::Elements {
                delta: "delete element inet netpilot block_mac { 02:00:00:00:00:01 }\n".into(),
                whole: &a,
            }),
            undo: Vec::new(),
        }]);
        let done = e.execute(&p).await.unwrap();
        assert_eq!(done.nft, "table");
        assert!(rig.nft.observe().await.unwrap().is_some());
        let devices = Devices::new(&["lan"], "wan");
        let (seen, _) = e
            .observe(
                Reads {
                    chains: true,
                    ..Reads::default()
                },
                &devices,
            )
            .await
            .unwrap();
        assert!(seen.chains.unwrap().unwrap().contains("forward"));
        assert!(seen.table.is_none() && seen.shapers.is_none() && seen.resolvers.is_none());
    }
}
