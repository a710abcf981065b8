//! The agent's view of the router's system: narrow traits over what it reads and
//! runs, with the real adapters here and the simulated router in `crate::sim`.

pub mod clock;
pub mod dnsmasq;
pub mod files;
pub mod nft;
pub mod nlbw;
pub mod process;
pub mod sysinfo;
pub mod tc;
pub mod ubus;
pub mod uci;
pub mod wifi;

/// A boxed future: what the system traits return, so they stay object safe.
pub type Fut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
