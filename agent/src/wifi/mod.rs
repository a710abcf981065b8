//! The Wi-Fi feature: status, enable/disable, SSID and password changes on
//! `/etc/config/wireless`, each applied under *safe apply* (see [`apply`]): the
//! change is pending until a report reaches the relay within the grace period,
//! and rolled back by the agent itself otherwise. The pure parts are [`model`]
//! (validation, plan) and [`status`]; [`WifiService`] is the shell over the
//! injected seams (uci, `wifi`, ubus, the reporter) and the store.

pub mod apply;
pub mod model;
pub mod persist;
pub mod status;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::link::report::Reporter;
use crate::policy::model::Invalid;
use crate::runtime::clock::Clock;
use crate::store::Store;
use crate::system::ubus::Ubus;
use crate::system::uci::Uci;
use crate::system::wifi::WifiControl;
use model::{Wireless, PACKAGE};

#[derive(Debug, Clone)]
pub struct WifiConfig {
    /// How long a change may stay unconfirmed before it is rolled back.
    pub grace: Duration,
    /// Wait after `wifi reload` before the first confirmation: the reload returns
    /// before the radios restart, and a report sent before that proves nothing.
    pub settle: Duration,
    /// Between confirmation (and rollback report) attempts.
    pub retry: Duration,
}

impl Default for WifiConfig {
    fn default() -> Self {
        WifiConfig {
            grace: Duration::from_secs(90),
            settle: Duration::from_secs(10),
            retry: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WifiError {
    /// The request is not valid for this router's configuration.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// Another change is still waiting for confirmation.
    #[error("Wi-Fi change {id} is pending confirmation until {deadline_unix}; try again after it is confirmed or rolled back")]
    Pending { id: String, deadline_unix: i64 },
    /// Applying failed at `step`; `restored` says the previous configuration is
    /// back (for uci failures it never changed).
    #[error("Wi-Fi change failed at {step}: {message}; {}", if *.restored { "the previous configuration was restored" } else { "the previous configuration is intact" })]
    Apply {
        step: &'static str,
        message: String,
        restored: bool,
    },
    /// The wireless configuration cannot be read (no uci, no wireless package).
    #[error("the wireless configuration is unavailable: {0}")]
    Unavailable(String),
    #[error("state database: {0}")]
    Store(String),
}

/// The Wi-Fi service: one per agent, shared by the handlers and its background task.
pub struct WifiService {
    pub(crate) uci: Arc<dyn Uci>,
    pub(crate) wifi: Arc<dyn WifiControl>,
    pub(crate) ubus: Arc<dyn Ubus>,
    pub(crate) reporter: Arc<dyn Reporter>,
    pub(crate) store: Mutex<Store>,
    pub(crate) config: WifiConfig,
    pub(crate) clock: Clock,
    /// Serialises changes and rollbacks: uci's staged state is per package.
    pub(crate) apply_lock: tokio::sync::Mutex<()>,
    pub(crate) timers: Mutex<BTreeMap<String, apply::Timer>>,
    pub(crate) wake: tokio::sync::Notify,
    /// Bumped whenever a change's state moves, for whoever waits on it.
    pub(crate) events: tokio::sync::watch::Sender<u64>,
}

impl WifiService {
    pub fn new(
        uci: Arc<dyn Uci>,
        wifi: Arc<dyn WifiControl>,
        ubus: Arc<dyn Ubus>,
        reporter: Arc<dyn Reporter>,
        store: Store,
        config: WifiConfig,
        clock: Clock,
    ) -> WifiService {
        WifiService {
            uci,
            wifi,
            ubus,
            reporter,
            store: Mutex::new(store),
            config,
            clock,
            apply_lock: tokio::sync::Mutex::new(()),
            timers: Mutex::new(BTreeMap::new()),
            wake: tokio::sync::Notify::new(),
            events: tokio::sync::watch::channel(0).0,
        }
    }

    /// Changes whenever a change's state moves.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }

    pub(crate) fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("wifi store lock")
    }

    pub fn latest_change(&self) -> Result<Option<persist::ChangeView>, WifiError> {
        self.store()
            .wifi_latest()
            .map(|c| c.map(|c| c.view()))
            .map_err(|e| WifiError::Store(e.to_string()))
    }

    pub(crate) async fn read_config(&self) -> Result<(String, Wireless), WifiError> {
        let text = self
            .uci
            .export(PACKAGE)
            .await
            .map_err(|e| WifiError::Unavailable(e.to_string()))?;
        let w = Wireless::parse(&text)
            .map_err(|e| WifiError::Unavailable(format!("uci export {PACKAGE}: {e}")))?;
        Ok((text, w))
    }

    /// `GET /api/wifi/status`: configuration, what runs, clients, latest change.
    pub async fn status(&self) -> Result<status::WifiStatus, WifiError> {
        let (_, w) = self.read_config().await?;
        let runtime = self
            .ubus
            .call("network.wireless", "status", &json!({}))
            .await
            .map(|v| status::parse_runtime(&v))
            .map_err(|e| e.to_string());
        let mut clients = BTreeMap::new();
        if let Ok(rt) = &runtime {
            for ifname in status::ap_ifnames(&w, rt) {
                let object = format!("hostapd.{ifname}");
                match self.ubus.call(&object, "get_clients", &json!({})).await {
                    Ok(v) => {
                        clients.insert(ifname, status::client_count(&v));
                    }
                    Err(e) => tracing::debug!(%object, error = %e, "no client list"),
                }
            }
        }
        let change = self.latest_change()?;
        Ok(status::build(
            &w,
            runtime.as_ref().map_err(Clone::clone),
            &clients,
            change,
        ))
    }
}
