//! The agent's view of the router's system: one narrow trait per program or file
//! set it drives (nft, tc, dnsmasq, uci, ubus, nlbw, wifi, files, flowtable), a real adapter
//! that goes only through `runtime::process`, and an in-memory fake beside it
//! (the simulated router in `crate::sim` is built from the fakes).

pub mod clock;
pub mod dns_wire;
pub mod dnsmasq;
pub mod files;
pub mod flowtable;
pub mod fw4;
pub mod nft;
pub mod nlbw;
pub mod sysinfo;
pub mod tc;
pub mod ubus;
pub mod uci;
pub mod wifi;

pub use crate::runtime::Fut;

/// A failure of one of the seams that change the kernel and the resolvers, with
/// the seam's own error as the source.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error(transparent)]
    Tc(#[from] tc::TcError),
    #[error(transparent)]
    Dns(#[from] dnsmasq::DnsError),
    /// Putting fw4's flow offloading back (uci or the firewall reload).
    #[error("{0}")]
    Offload(String),
    #[error(transparent)]
    Fw4(#[from] fw4::Fw4Error),
}
