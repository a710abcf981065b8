//! Flow offloading: with fw4's `flow_offloading` on, established TCP/UDP flows
//! skip the forward hook, where NetPilot's blocks, schedules and class selection
//! live. This service detects it (UCI and the live ruleset), never lets it pass
//! silently (the status and a warning at every apply), and applies the remedy the
//! owner consented to in `/etc/config/netpilot` (`flow_offloading 'disable'`):
//! fw4's offloading off while a policy needs the forward path, the owner's values
//! remembered in the state database and put back when no longer needed, when the
//! consent is withdrawn, and by `cleanup`.
//!
//! Why not keep only managed devices' flows out of the flowtable, from NetPilot's
//! own table: fw4's `flow add @ft` is an unconditional rule of fw4's own forward
//! chain, and a verdict in another table's chain ends only that chain (an
//! `accept` in `inet netpilot` does not skip fw4's rule; only `drop` would, which
//! kills the packet). The kernel leaves a flow out of the flowtable only for
//! conditions nft cannot set on a flow it forwards (a conntrack helper aside,
//! which would attach a protocol parser such as FTP's to every flow). See the
//! README, "Flow offloading".

pub mod detect;
pub mod remedy;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::runtime::clock::Clock;
use crate::runtime::shutdown::{self, Shutdown};
use crate::store::Store;
use crate::system::flowtable::Flowtables;
use crate::system::uci::{Uci, UciError};
use detect::UciOffload;
pub use remedy::Mode;
use remedy::{decide, Action};

/// The `agent_meta` key holding the owner's values while NetPilot holds
/// offloading off.
pub const SAVED_KEY: &str = "flow_offloading_saved";
const PACKAGE: &str = "firewall";

/// `offloading` in `GET /api/infrastructure/status`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct OffloadStatus {
    /// UCI `firewall.@defaults[0].flow_offloading` is on.
    pub software: bool,
    /// ... and `flow_offloading_hw` too.
    pub hardware: bool,
    /// fw4's table has a flowtable (`None`: the live ruleset could not be read).
    pub flowtable_live: Option<bool>,
    /// fw4's forward chain adds flows to it (`flow add @ft`).
    pub offload_rule_live: Option<bool>,
    /// The devices the flowtable hooks.
    pub flowtable_devices: Vec<String>,
    pub policies_need_forward_path: bool,
    /// `keep` (report only) or `disable` (the owner's consent to turn it off).
    pub mode: Mode,
    /// What NetPilot did about it, when anything.
    pub remedy: Option<String>,
    /// What established flows escape now (empty when nothing does).
    pub not_enforced_on_established_flows: Vec<String>,
    pub error: Option<String>,
    pub checked_unix: Option<i64>,
}

impl OffloadStatus {
    /// The policy is in force for established flows too.
    pub fn effective(&self) -> bool {
        self.not_enforced_on_established_flows.is_empty()
    }
}

pub struct Offload {
    uci: Arc<dyn Uci>,
    flows: Arc<dyn Flowtables>,
    store: Mutex<Store>,
    mode: Mode,
    clock: Clock,
    /// The last check's outcome; subscribers see every check.
    status: tokio::sync::watch::Sender<OffloadStatus>,
    /// One check at a time: each may change UCI and reload the firewall.
    one: tokio::sync::Mutex<()>,
}

fn saved(store: &Store) -> Result<Option<UciOffload>, String> {
    match store.meta(SAVED_KEY).map_err(|e| e.to_string())? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("saved flow offloading values: {e}")),
    }
}

async fn read_uci(uci: &dyn Uci) -> Result<UciOffload, String> {
    match uci.export(PACKAGE).await {
        Ok(text) => detect::uci(&text).map_err(|e| format!("/etc/config/firewall: {e}")),
        // No firewall configuration: nothing offloads.
        Err(UciError::NoPackage(_)) => Ok(UciOffload::default()),
        Err(e) => Err(e.to_string()),
    }
}

/// Puts the owner's values back (UCI, commit, firewall reload) and forgets them.
async fn restore(
    uci: &dyn Uci,
    flows: &dyn Flowtables,
    store: &Mutex<Store>,
    saved: &UciOffload,
) -> Result<(), String> {
    let now = read_uci(uci).await?;
    let cmds = remedy::restore_cmds(saved, &now);
    if !cmds.is_empty() {
        uci.apply(PACKAGE, &cmds).await.map_err(|e| e.to_string())?;
        flows.reload_firewall().await.map_err(|e| e.to_string())?;
    }
    store
        .lock()
        .expect("offload store")
        .set_meta(SAVED_KEY, None)
        .map_err(|e| e.to_string())
}

/// `cleanup`: the owner's offloading values back, when NetPilot holds them.
/// `Ok(None)`: nothing was held.
pub async fn cleanup(
    uci: &dyn Uci,
    flows: &dyn Flowtables,
    store: Store,
) -> Result<Option<UciOffload>, String> {
    let Some(values) = saved(&store)? else {
        return Ok(None);
    };
    let store = Mutex::new(store);
    restore(uci, flows, &store, &values).await?;
    Ok(Some(values))
}

impl Offload {
    pub fn new(
        uci: Arc<dyn Uci>,
        flows: Arc<dyn Flowtables>,
        store: Store,
        mode: Mode,
        clock: Clock,
    ) -> Offload {
        Offload {
            uci,
            flows,
            store: Mutex::new(store),
            mode,
            clock,
            status: tokio::sync::watch::channel(OffloadStatus {
                mode,
                ..OffloadStatus::default()
            })
            .0,
            one: tokio::sync::Mutex::new(()),
        }
    }

    pub fn status(&self) -> OffloadStatus {
        self.status.borrow().clone()
    }

    /// Marked changed after every check.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<OffloadStatus> {
        self.status.subscribe()
    }

    /// Detects, takes the consented remedy, and records the status. `needs` is
    /// what the desired policy enforces in the forward path
    /// ([`remedy::forward_needs`]).
    pub async fn check(&self, needs: &[String]) -> OffloadStatus {
        let _one = self.one.lock().await;
        let mut errors = Vec::new();
        let held = saved(&self.store.lock().expect("offload store")).unwrap_or_else(|e| {
            errors.push(e);
            None
        });
        let now = read_uci(self.uci.as_ref()).await;
        let live = self.read_live().await;
        if let Ok(now) = &now {
            let live_on = live.as_ref().ok().map(detect::Live::offloading);
            let action = decide(self.mode, !needs.is_empty(), now, live_on, held.as_ref());
            if let Err(e) = self.take(action, held.as_ref()).await {
                errors.push(e);
            }
        }
        // What is in force after the remedy.
        let now = read_uci(self.uci.as_ref()).await;
        let live = self.read_live().await;
        let held = saved(&self.store.lock().expect("offload store")).unwrap_or(None);
        let uci = now.as_ref().cloned().unwrap_or_default();
        for e in [now.err(), live.as_ref().err().cloned()]
            .into_iter()
            .flatten()
        {
            errors.push(e);
        }
        let live = live.ok();
        // The live ruleset decides; without it, UCI is the best guess.
        let offloading = live
            .as_ref()
            .map_or(uci.software(), detect::Live::offloading);
        let status = OffloadStatus {
            software: uci.software(),
            hardware: uci.hardware(),
            flowtable_live: live.as_ref().map(|l| !l.flowtables.is_empty()),
            offload_rule_live: live.as_ref().map(|l| !l.offload_rules.is_empty()),
            flowtable_devices: live
                .as_ref()
                .map(|l| {
                    l.flowtables
                        .iter()
                        .flat_map(|f| f.devices.iter().cloned())
                        .collect()
                })
                .unwrap_or_default(),
            policies_need_forward_path: !needs.is_empty(),
            mode: self.mode,
            remedy: held.map(|v| {
                format!(
                    "NetPilot turned fw4's flow offloading off while policies need the forward path; the owner's values (flow_offloading={}, flow_offloading_hw={}) come back when none does, when flow_offloading is set to 'keep', and on cleanup",
                    v.flow_offloading.as_deref().unwrap_or("unset"),
                    v.flow_offloading_hw.as_deref().unwrap_or("unset"),
                )
            }),
            not_enforced_on_established_flows: if offloading {
                needs.to_vec()
            } else {
                Vec::new()
            },
            error: (!errors.is_empty()).then(|| errors.join("; ")),
            checked_unix: Some((self.clock)()),
        };
        self.status.send_replace(status.clone());
        status
    }

    async fn read_live(&self) -> Result<detect::Live, String> {
        let json = self.flows.read().await.map_err(|e| e.to_string())?;
        detect::live(&json).map_err(|e| e.to_string())
    }

    async fn take(&self, action: Action, held: Option<&UciOffload>) -> Result<(), String> {
        match action {
            Action::None => Ok(()),
            Action::Disable { save, cmds } => {
                // Remembered before UCI changes, so a crash in between still
                // leaves the owner's values to restore.
                let text = serde_json::to_string(&save).map_err(|e| e.to_string())?;
                self.set_saved(Some(&text))?;
                if let Err(e) = self.uci.apply(PACKAGE, &cmds).await {
                    // Nothing was committed (the seam is all or nothing).
                    if held.is_none() {
                        self.set_saved(None)?;
                    }
                    return Err(format!("turning flow offloading off: {e}"));
                }
                tracing::warn!(
                    "turned fw4's flow offloading off (netpilot flow_offloading 'disable'): policies need the forward path; the owner's values are saved"
                );
                self.flows
                    .reload_firewall()
                    .await
                    .map_err(|e| format!("flow offloading is off in UCI but {e}"))
            }
            Action::Restore { .. } => {
                let values = held.expect("restore only with saved values");
                restore(self.uci.as_ref(), self.flows.as_ref(), &self.store, values)
                    .await
                    .map(|()| tracing::info!("put fw4's flow offloading back as the owner had it"))
                    .map_err(|e| format!("restoring flow offloading: {e}"))
            }
            Action::Reload => self
                .flows
                .reload_firewall()
                .await
                .map_err(|e| e.to_string()),
        }
    }

    fn set_saved(&self, value: Option<&str>) -> Result<(), String> {
        self.store
            .lock()
            .expect("offload store")
            .set_meta(SAVED_KEY, value)
            .map_err(|e| e.to_string())
    }

    /// Checks after every apply and in-sync check of the policy engine
    /// (`applied`), and every `interval` as well (the owner may change the
    /// firewall at any time). Warns at every new generation while established
    /// flows escape the policy, and whenever that starts.
    pub async fn run(
        self: Arc<Self>,
        engine: Arc<crate::policy::engine::Engine>,
        interval: Duration,
        mut stop: Shutdown,
    ) {
        let mut applied = engine.subscribe_applied();
        let mut warned: Option<u64> = None;
        let mut last_error: Option<String> = None;
        loop {
            let generation = *applied.borrow_and_update();
            let needs = engine.read(remedy::forward_needs).await;
            let was_effective = self.status().effective();
            let s = self.check(&needs).await;
            if !s.effective() && (warned != Some(generation) || was_effective) {
                tracing::warn!(
                    not_enforced = ?s.not_enforced_on_established_flows,
                    "fw4 flow offloading is on: established TCP/UDP flows skip the forward hook, so these are not enforced on them; set option flow_offloading 'disable' in /etc/config/netpilot to let NetPilot turn it off, or turn it off in the firewall (README: Flow offloading)"
                );
                warned = Some(generation);
            }
            // Once per distinct error: a router without uci or fw4 would repeat it
            // at every check.
            if s.error.is_some() && s.error != last_error {
                tracing::warn!(error = ?s.error, "flow offloading check");
            }
            last_error = s.error.clone();
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown::stopped(&mut stop) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests;
