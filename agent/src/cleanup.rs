//! `netpilot-agent cleanup`: remove everything the agent put into the kernel and the
//! system, whatever exists at the time, so uninstalling leaves the router as it was.
//! Every step runs even when an earlier one fails; all failures are reported.
//! Features that add kernel or system state add their removal here.

use std::time::Duration;

use crate::system::dnsmasq::{DnsError, Resolver};
use crate::system::process::{self, ProcessError};

/// NetPilot's own nftables table (DESIGN §5): never fw4's.
pub const NFT_FAMILY: &str = "inet";
pub const NFT_TABLE: &str = "netpilot";

const TIMEOUT: Duration = Duration::from_secs(15);

/// What one step did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Removed(String),
    Absent(String),
}

#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct StepError {
    pub step: &'static str,
    #[source]
    pub source: StepCause,
}

#[derive(Debug, thiserror::Error)]
pub enum StepCause {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Dns(#[from] DnsError),
}

/// Runs every removal step and returns what happened and what failed. `devices`
/// are the LAN and WAN devices whose NetPilot root qdisc is removed; `dns` holds the
/// filtering resolvers, which outlive the agent by design and so must be stopped.
pub async fn cleanup(devices: &[&str], dns: &dyn Resolver) -> (Vec<Outcome>, Vec<StepError>) {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    match dns.observe().await {
        Ok(instances) => {
            for i in instances {
                let what = format!("DNS filter resolver {}", i.id);
                match dns.stop(&i.id).await {
                    Ok(()) if i.running => done.push(Outcome::Removed(what)),
                    Ok(()) => done.push(Outcome::Removed(format!("{what} (files; not running)"))),
                    Err(e) => failed.push(StepError {
                        step: "stop a DNS filter resolver",
                        source: e.into(),
                    }),
                }
            }
        }
        Err(e) => failed.push(StepError {
            step: "list DNS filter resolvers",
            source: e.into(),
        }),
    }
    match remove_nft_table().await {
        Ok(o) => done.push(o),
        Err(e) => failed.push(e),
    }
    for dev in devices {
        match remove_qdisc(dev).await {
            Ok(o) => done.push(o),
            Err(e) => failed.push(e),
        }
    }
    (done, failed)
}

/// Removes the root qdisc of `dev` when it is NetPilot's (HTB with handle 1:);
/// someone else's qdisc stays.
async fn remove_qdisc(dev: &str) -> Result<Outcome, StepError> {
    use crate::system::tc::{parse_observed, MAJOR};
    let what = format!("tc root qdisc {MAJOR}: on {dev}");
    let listing = match process::run(&["tc", "qdisc", "show", "dev", dev], None, TIMEOUT).await {
        Ok(out) => out,
        Err(e) if e.is_not_found() => {
            return Ok(Outcome::Absent(format!("{what} (tc not installed)")))
        }
        // No such device: nothing of ours on it.
        Err(ProcessError::Failed { .. }) => {
            return Ok(Outcome::Absent(format!("{what} (no such device)")))
        }
        Err(source) => {
            return Err(StepError {
                step: "list qdiscs",
                source: source.into(),
            })
        }
    };
    let ours = parse_observed(&listing, "")
        .map(|o| o.root_is_ours())
        .unwrap_or(false);
    if !ours {
        return Ok(Outcome::Absent(what));
    }
    process::run(&["tc", "qdisc", "del", "dev", dev, "root"], None, TIMEOUT)
        .await
        .map_err(|source| StepError {
            step: "delete root qdisc",
            source: source.into(),
        })?;
    Ok(Outcome::Removed(what))
}

async fn remove_nft_table() -> Result<Outcome, StepError> {
    let what = format!("nftables table {NFT_FAMILY} {NFT_TABLE}");
    let listing = match process::run(&["nft", "list", "tables", NFT_FAMILY], None, TIMEOUT).await {
        Ok(out) => out,
        // No nft, no table of ours.
        Err(e) if e.is_not_found() => {
            return Ok(Outcome::Absent(format!("{what} (nft not installed)")))
        }
        Err(source) => {
            return Err(StepError {
                step: "list nftables tables",
                source: source.into(),
            })
        }
    };
    let ours = format!("table {NFT_FAMILY} {NFT_TABLE}");
    if !listing.lines().any(|l| l.trim() == ours) {
        return Ok(Outcome::Absent(what));
    }
    process::run(
        &["nft", "delete", "table", NFT_FAMILY, NFT_TABLE],
        None,
        TIMEOUT,
    )
    .await
    .map_err(|source| StepError {
        step: "delete nftables table",
        source: source.into(),
    })?;
    Ok(Outcome::Removed(what))
}
