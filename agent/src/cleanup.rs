//! `netpilot-agent cleanup`: remove everything the agent put into the kernel and the
//! system, whatever exists at the time, so uninstalling leaves the router as it was.
//! It goes through the same seams as the policy engine (firewall, shaper, resolvers),
//! so `--nft`, `--tc`, `--dnsmasq` and `--dns-dir` apply and the fakes can test it.
//! Every step runs even when an earlier one fails; all failures are reported.
//! Features that add kernel or system state add their removal here.

use crate::config::RunConfig;
use crate::system::dnsmasq::Resolver;
use crate::system::nft::{self, Firewall, NftError};
use crate::system::tc::{self, Shaper, TcError};
use crate::system::SystemError;

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
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Cleans up this router: the programs and directories the configuration names
/// (as `run` would drive them), and the LAN and WAN devices it would shape.
pub async fn run(config: &RunConfig) -> (Vec<Outcome>, Vec<StepError>) {
    let system = crate::app::Backends::real(config);
    let r = crate::policy::interfaces::resolve(
        system.files.as_ref(),
        &config.lan_ifs,
        config.wan_if.as_deref(),
    );
    let mut devices: Vec<&str> = r.lan.iter().map(String::as_str).collect();
    devices.push(&r.wan);
    // The files fw4 would load first: a fw4 reload meanwhile must not bring the
    // table back.
    let (mut done, mut failed) = remove_files(&crate::policy::fw4::files(&config.fw4_paths()));
    let (d, f) = cleanup(
        system.nft.as_ref(),
        system.tc.as_ref(),
        system.dns.as_ref(),
        &devices,
    )
    .await;
    done.extend(d);
    failed.extend(f);
    // Only an existing state database can hold the owner's offloading values;
    // cleanup must not create one.
    let store = config
        .state_dir
        .join(crate::store::FILE_NAME)
        .is_file()
        .then(|| crate::store::Store::open(&config.state_dir));
    match store {
        None => done.push(Outcome::Absent(OFFLOADING.into())),
        Some(Err(e)) => failed.push(StepError {
            step: "restore flow offloading",
            source: SystemError::Offload(e.to_string()).into(),
        }),
        Some(Ok(store)) => {
            match restore_offloading(system.uci.as_ref(), system.flowtables.as_ref(), store).await {
                Ok(o) => done.push(o),
                Err(e) => failed.push(e),
            }
        }
    }
    // The fw4 includes for zones that reject input, and fw4 reloaded without them.
    match config.dns_includes().install(&[], "").await {
        Ok(zones) => done.extend(
            zones
                .into_iter()
                .map(|z| Outcome::Removed(format!("fw4 DNS include of zone {z}"))),
        ),
        Err(e) => failed.push(StepError {
            step: "remove the fw4 DNS includes",
            source: e.into(),
        }),
    }
    (done, failed)
}

const OFFLOADING: &str = "fw4 flow offloading turned off by NetPilot";

/// Puts back the owner's `flow_offloading` values when NetPilot holds them off.
pub async fn restore_offloading(
    uci: &dyn crate::system::uci::Uci,
    flowtables: &dyn crate::system::flowtable::Flowtables,
    store: crate::store::Store,
) -> Result<Outcome, StepError> {
    match crate::offload::cleanup(uci, flowtables, store).await {
        Ok(Some(v)) => Ok(Outcome::Removed(format!(
            "{OFFLOADING} (restored flow_offloading={}, flow_offloading_hw={})",
            v.flow_offloading.as_deref().unwrap_or("unset"),
            v.flow_offloading_hw.as_deref().unwrap_or("unset")
        ))),
        Ok(None) => Ok(Outcome::Absent(OFFLOADING.into())),
        Err(e) => Err(StepError {
            step: "restore flow offloading",
            source: SystemError::Offload(e).into(),
        }),
    }
}

/// Removes the copies of the rules fw4 includes and the include itself.
pub fn remove_files(paths: &[std::path::PathBuf]) -> (Vec<Outcome>, Vec<StepError>) {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for path in paths {
        let what = format!("file {}", path.display());
        match std::fs::remove_file(path) {
            Ok(()) => done.push(Outcome::Removed(what)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => done.push(Outcome::Absent(what)),
            Err(e) => failed.push(StepError {
                step: "remove a file fw4 includes",
                source: e.into(),
            }),
        }
    }
    (done, failed)
}

/// Runs every removal step and returns what happened and what failed. `devices`
/// are the LAN and WAN devices whose NetPilot root qdisc is removed; `dns` holds the
/// filtering resolvers, which outlive the agent by design and so must be stopped.
pub async fn cleanup(
    firewall: &dyn Firewall,
    shaper: &dyn Shaper,
    dns: &dyn Resolver,
    devices: &[&str],
) -> (Vec<Outcome>, Vec<StepError>) {
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
    match remove_table(firewall).await {
        Ok(o) => done.push(o),
        Err(e) => failed.push(e),
    }
    for dev in devices {
        match remove_ours(shaper, dev).await {
            Ok(o) => done.extend(o),
            Err(e) => failed.push(e),
        }
    }
    // After the redirects into it are gone.
    match remove_ifb(shaper).await {
        Ok(o) => done.push(o),
        Err(e) => failed.push(e),
    }
    (done, failed)
}

async fn remove_table(firewall: &dyn Firewall) -> Result<Outcome, StepError> {
    let what = format!("nftables table {} {}", nft::FAMILY, nft::TABLE);
    match firewall.delete_table().await {
        Ok(true) => Ok(Outcome::Removed(what)),
        Ok(false) => Ok(Outcome::Absent(what)),
        // No nft, no table of ours.
        Err(NftError::Process(e)) if e.is_not_found() => {
            Ok(Outcome::Absent(format!("{what} (nft not installed)")))
        }
        Err(e) => Err(StepError {
            step: "delete nftables table",
            source: e.into(),
        }),
    }
}

/// NetPilot's root qdisc and ingress redirect on `dev` (an older agent's `1:` root
/// too, when recognised); someone else's qdiscs and filters stay.
async fn remove_ours(shaper: &dyn Shaper, dev: &str) -> Result<Vec<Outcome>, StepError> {
    let what = format!("NetPilot's tc qdiscs on {dev}");
    match shaper.remove_ours(dev).await {
        Ok(removed) if removed.is_empty() => Ok(vec![Outcome::Absent(what)]),
        Ok(removed) => Ok(removed.into_iter().map(Outcome::Removed).collect()),
        Err(TcError::Process(e)) if e.is_not_found() => {
            Ok(vec![Outcome::Absent(format!("{what} (tc not installed)"))])
        }
        Err(TcError::NoDevice(_)) => Ok(vec![Outcome::Absent(format!("{what} (no such device)"))]),
        Err(e) => Err(StepError {
            step: "delete NetPilot's qdiscs",
            source: e.into(),
        }),
    }
}

/// The upload ifb, with everything on it.
async fn remove_ifb(shaper: &dyn Shaper) -> Result<Outcome, StepError> {
    let what = format!("ifb device {}", tc::IFB);
    let ifb = tc::IFB.to_owned();
    match shaper.observe(&ifb).await {
        Err(TcError::NoDevice(_)) => return Ok(Outcome::Absent(what)),
        Err(TcError::Process(e)) if e.is_not_found() => {
            return Ok(Outcome::Absent(format!("{what} (tc not installed)")))
        }
        Err(e) => {
            return Err(StepError {
                step: "look for the upload ifb",
                source: e.into(),
            })
        }
        Ok(_) => {}
    }
    match shaper.run(&[tc::TcOp::DeleteIfb { dev: ifb }]).await {
        Ok(()) => Ok(Outcome::Removed(what)),
        Err(e) => Err(StepError {
            step: "delete the upload ifb",
            source: e.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::*;

    /// What a device shows once no qdisc of anyone's is at its root.
    fn default_root() -> Option<(String, String)> {
        Some(("noqueue".into(), "0:".into()))
    }
    use crate::system::dnsmasq::{FakeResolver, InstanceSpec, RealDnsmasq};
    use crate::system::nft::{FakeNft, RealNft};
    use crate::system::tc::{FakeTc, RealTc, TcOp, IFB};

    const DEVICES: &[&str] = &["br-lan", "wan"];

    /// A router the agent has been enforcing on: its table, its root qdisc on both
    /// devices and two filtering resolvers, one of which has died.
    async fn enforcing() -> (FakeNft, FakeTc, FakeResolver) {
        let nft = FakeNft::default();
        nft.apply("table inet netpilot {}\n").await.unwrap();
        let tc = FakeTc::default();
        // Ours on the LAN bridge (root and upload redirect into the ifb); an older
        // agent's root on the WAN device.
        tc.run(&[
            TcOp::ReplaceRoot {
                dev: "br-lan".into(),
            },
            TcOp::AddIfb { dev: IFB.into() },
            TcOp::ReplaceRoot { dev: IFB.into() },
            TcOp::AddRedirect {
                dev: "br-lan".into(),
                to: IFB.into(),
                qdisc: true,
            },
        ])
        .await
        .unwrap();
        tc.set_legacy_root("wan");
        let dns = FakeResolver::default();
        for (id, port) in [("g1", 5401), ("g2", 5402)] {
            dns.ensure(&InstanceSpec {
                id: id.into(),
                port,
                listen: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
                interfaces: Vec::new(),
                upstreams: vec!["127.0.0.1".into()],
                servers: Arc::new(crate::system::dns_wire::canary_lines("0")),
                cache_size: 150,
                canary: crate::system::dns_wire::list_canary("0"),
                label: format!("group {port}"),
            })
            .await
            .unwrap();
        }
        dns.crash("g2");
        (nft, tc, dns)
    }

    fn lines(done: &[Outcome]) -> Vec<String> {
        done.iter()
            .map(|o| match o {
                Outcome::Removed(w) => format!("removed {w}"),
                Outcome::Absent(w) => format!("absent {w}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn removes_everything_once_and_then_finds_it_absent() {
        let (nft, tc, dns) = enforcing().await;
        let (done, failed) = cleanup(&nft, &tc, &dns, DEVICES).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            lines(&done),
            [
                "removed DNS filter resolver g1",
                "removed DNS filter resolver g2 (files; not running)",
                "removed nftables table inet netpilot",
                "removed tc root qdisc htb 4e50: on br-lan",
                "removed tc ingress redirect on br-lan",
                "removed tc root qdisc htb 1: on wan",
                "removed ifb device np-up",
            ]
        );
        assert_eq!(
            tc.observe("br-lan").await.unwrap().ingress,
            Default::default()
        );
        assert!(tc.observe(IFB).await.is_err(), "the ifb is gone");
        assert!(nft.observe().await.unwrap().is_none());
        // The kernel's default root is back (the fake's, like a veth's, is noqueue).
        for dev in DEVICES {
            assert_eq!(tc.observe(dev).await.unwrap().root, default_root());
        }
        assert!(dns.observe().await.unwrap().is_empty());

        let (done, failed) = cleanup(&nft, &tc, &dns, DEVICES).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            lines(&done),
            [
                "absent nftables table inet netpilot",
                "absent NetPilot's tc qdiscs on br-lan",
                "absent NetPilot's tc qdiscs on wan",
                "absent ifb device np-up",
            ]
        );
    }

    #[tokio::test]
    async fn a_foreign_root_and_a_missing_device_are_left_alone() {
        let (nft, tc, dns) = enforcing().await;
        // sqm-scripts' root and ingress on the WAN device.
        tc.set_root("wan", "htb", "1:");
        tc.set_foreign_ingress("wan");
        tc.remove_device("br-lan");
        let (done, failed) = cleanup(&nft, &tc, &dns, DEVICES).await;
        assert!(failed.is_empty(), "{failed:?}");
        let done = lines(&done);
        assert!(
            done.contains(&"absent NetPilot's tc qdiscs on br-lan (no such device)".into()),
            "{done:?}"
        );
        assert!(
            done.contains(&"absent NetPilot's tc qdiscs on wan".into()),
            "{done:?}"
        );
        let wan = tc.observe("wan").await.unwrap();
        assert_eq!(wan.root, Some(("htb".into(), "1:".into())));
        assert_eq!(wan.ingress.others, 1);
    }

    #[tokio::test]
    async fn a_failing_step_does_not_stop_the_others() {
        let (nft, tc, dns) = enforcing().await;
        nft.fail_next(1);
        // The first tc operation, br-lan's root removal, fails; wan's still goes.
        tc.fail_op_after(0);
        let (done, failed) = cleanup(&nft, &tc, &dns, DEVICES).await;
        let steps: Vec<_> = failed.iter().map(|e| e.step).collect();
        assert_eq!(steps, ["delete nftables table", "delete NetPilot's qdiscs"]);
        assert!(
            failed[0].to_string().contains("injected failure"),
            "{}",
            failed[0]
        );
        assert_eq!(
            lines(&done),
            [
                "removed DNS filter resolver g1",
                "removed DNS filter resolver g2 (files; not running)",
                "removed tc root qdisc htb 1: on wan",
                "removed ifb device np-up",
            ]
        );
        assert!(dns.observe().await.unwrap().is_empty());
        assert!(nft.observe().await.unwrap().is_some(), "nft refused");
        assert!(tc.observe("br-lan").await.unwrap().root_is_ours());
        assert_eq!(tc.observe("wan").await.unwrap().root, default_root());

        // Resolvers that cannot even be listed do not keep the table or qdiscs.
        let (nft, tc, _) = enforcing().await;
        let unlistable = RealDnsmasq {
            dir: PathBuf::from("/dev/null"),
            ..Default::default()
        };
        let (done, failed) = cleanup(&nft, &tc, &unlistable, DEVICES).await;
        let steps: Vec<_> = failed.iter().map(|e| e.step).collect();
        assert_eq!(steps, ["list DNS filter resolvers"]);
        assert_eq!(done.len(), 5, "{done:?}");
        assert!(nft.observe().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn missing_tools_mean_nothing_of_ours_is_there() {
        let nft = RealNft {
            program: "netpilot-no-such-nft".into(),
            ..Default::default()
        };
        let tc = RealTc {
            program: "netpilot-no-such-tc".into(),
            ..Default::default()
        };
        let dns = RealDnsmasq {
            dir: PathBuf::from("/nonexistent/netpilot/dns"),
            ..Default::default()
        };
        let (done, failed) = cleanup(&nft, &tc, &dns, &["lan0"]).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            lines(&done),
            [
                "absent nftables table inet netpilot (nft not installed)",
                "absent NetPilot's tc qdiscs on lan0 (tc not installed)",
                "absent ifb device np-up (tc not installed)",
            ]
        );
    }

    #[tokio::test]
    async fn the_command_uses_the_configured_programs_and_devices() {
        let config = RunConfig {
            nft: "netpilot-no-such-nft".into(),
            tc: "netpilot-no-such-tc".into(),
            dns_dir: PathBuf::from("/nonexistent/netpilot/dns"),
            root: PathBuf::from("/nonexistent/netpilot/root"),
            state_dir: PathBuf::from("/nonexistent/netpilot/state"),
            lan_ifs: vec!["lan0".into()],
            fw4_includes: PathBuf::from("/nonexistent/netpilot/nftables.d"),
            fw4_dir: PathBuf::from("/nonexistent/netpilot/fw4"),
            fw4_include: PathBuf::from("/nonexistent/netpilot/post/netpilot.nft"),
            ..Default::default()
        };
        let (done, failed) = run(&config).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(
            lines(&done),
            [
                "absent file /nonexistent/netpilot/post/netpilot.nft",
                "absent file /nonexistent/netpilot/fw4/netpilot.nft",
                "absent file /nonexistent/netpilot/state/boot.nft",
                "absent nftables table inet netpilot (nft not installed)",
                "absent NetPilot's tc qdiscs on lan0 (tc not installed)",
                // No UCI network under the root: OpenWrt's usual WAN name.
                "absent NetPilot's tc qdiscs on wan (tc not installed)",
                "absent ifb device np-up (tc not installed)",
                // No state database: nothing held, and none created.
                "absent fw4 flow offloading turned off by NetPilot",
            ]
        );
    }
}
