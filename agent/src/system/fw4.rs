//! What NetPilot puts into fw4's own ruleset: one include file per LAN-side zone
//! whose `input` is REJECT or DROP (a guest zone), so queries redirected to the
//! filtering resolvers' ports on the router pass that zone's input chain.
//!
//! Facts this relies on (firewall4, read from its source and checked with the
//! captured ruleset in `fixtures/fw4/`):
//! - fw4 puts every `*.nft` file of `/usr/share/nftables.d/chain-pre/<chain>/` at
//!   the start of its chain `<chain>` (here `input_<zone>`), rendering them at its
//!   own start and reload only. So after a file changed, the firewall is reloaded
//!   (`/etc/init.d/firewall reload`, which rebuilds only `table inet fw4`; NetPilot's
//!   table survives it).
//! - A redirected query reaches the input hook with `ct status dnat` and its
//!   original destination port 53; the rule accepts exactly that, to the resolvers'
//!   port range, and nothing a client sends to those ports directly.
//!
//! A file is checked with `nft -c` inside a chain of a scratch table before it is
//! written, so a broken rule can never stop fw4 from loading.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::runtime::process::{self, ProcessError};

/// Our file in each include directory.
pub const FILE: &str = "netpilot.nft";

/// Resolver ports are `port_base + slot`, slots being `u8`.
pub const PORTS: u16 = 256;

#[derive(Debug, thiserror::Error)]
pub enum Fw4Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `nft -c` refused the include: nothing was written.
    #[error("the fw4 include for zone {zone} does not check: {source}")]
    Check {
        zone: String,
        #[source]
        source: ProcessError,
    },
    #[error("reloading the firewall: {0}")]
    Reload(#[source] ProcessError),
}

/// The include's rules: accept DNS that NetPilot's `dns_nat` redirected to a
/// filtering resolver.
pub fn input_accept(port_base: u16) -> String {
    let last = port_base.saturating_add(PORTS - 1);
    format!(
        "# NetPilot: written by the agent; DNS of filtered devices, redirected to their\n\
         # resolvers on the router, passes this zone's input policy.\n\
         meta l4proto {{ tcp, udp }} th dport {port_base}-{last} ct status dnat ct original proto-dst 53 accept comment \"netpilot: filtered DNS\"\n"
    )
}

/// Where fw4 picks up a file for the start of zone `zone`'s input chain.
pub fn include_path(dir: &Path, zone: &str) -> PathBuf {
    dir.join("chain-pre")
        .join(format!("input_{zone}"))
        .join(FILE)
}

/// The includes and how fw4 is told about them.
#[derive(Debug, Clone)]
pub struct Includes {
    /// fw4's include root, `/usr/share/nftables.d`.
    pub dir: PathBuf,
    /// `nft`, for the check.
    pub nft: String,
    /// Run with `reload` after a change; empty: never (the change takes effect at
    /// fw4's next start).
    pub reload: String,
    pub timeout: Duration,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Fw4Error + '_ {
    move |source| Fw4Error::Io {
        path: path.to_owned(),
        source,
    }
}

impl Includes {
    /// Makes exactly `zones` carry the include with `body` (ours in any other zone's
    /// directory is removed), reloading the firewall when a file changed. Returns
    /// the zones whose file was written or removed.
    pub async fn install(&self, zones: &[String], body: &str) -> Result<Vec<String>, Fw4Error> {
        let mut changed = Vec::new();
        for zone in zones {
            let path = include_path(&self.dir, zone);
            if std::fs::read_to_string(&path).is_ok_and(|old| old == body) {
                continue;
            }
            self.check(zone, body).await?;
            let parent = path.parent().expect("a file in a directory");
            std::fs::create_dir_all(parent).map_err(io(parent))?;
            let tmp = path.with_extension("nft.tmp");
            std::fs::write(&tmp, body).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            changed.push(zone.clone());
        }
        for zone in self.installed()? {
            if !zones.contains(&zone) {
                let path = include_path(&self.dir, &zone);
                std::fs::remove_file(&path).map_err(io(&path))?;
                changed.push(zone);
            }
        }
        if !changed.is_empty() && !self.reload.is_empty() {
            process::run(&[&self.reload, "reload"], None, self.timeout)
                .await
                .map_err(Fw4Error::Reload)?;
        }
        Ok(changed)
    }

    /// The zones whose input chain has our include now.
    pub fn installed(&self) -> Result<Vec<String>, Fw4Error> {
        let pre = self.dir.join("chain-pre");
        let entries = match std::fs::read_dir(&pre) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&pre)(e)),
        };
        let mut zones = Vec::new();
        for e in entries {
            let e = e.map_err(io(&pre))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(zone) = name.strip_prefix("input_") {
                if e.path().join(FILE).exists() {
                    zones.push(zone.to_owned());
                }
            }
        }
        zones.sort();
        Ok(zones)
    }

    /// `nft -c`: the rules inside a chain, as fw4 will place them; nothing is
    /// committed.
    async fn check(&self, zone: &str, body: &str) -> Result<(), Fw4Error> {
        let script = format!(
            "table inet netpilot_fw4_check {{\n\tchain input_{zone} {{\n{body}\n\t}}\n}}\n"
        );
        process::run(
            &[&self.nft, "-c", "-f", "-"],
            Some(script.as_bytes()),
            self.timeout,
        )
        .await
        .map(|_| ())
        .map_err(|source| Fw4Error::Check {
            zone: zone.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_accepts_only_redirected_dns_to_the_resolver_ports() {
        let r = input_accept(5400);
        assert!(
            r.contains("th dport 5400-5655 ct status dnat ct original proto-dst 53 accept"),
            "{r}"
        );
        assert_eq!(
            include_path(Path::new("/usr/share/nftables.d"), "guest"),
            Path::new("/usr/share/nftables.d/chain-pre/input_guest/netpilot.nft")
        );
    }

    /// Writes, leaves alone, removes, and runs the reload program only on a change
    /// (`true` stands in for it; `false` as nft refuses every check).
    #[tokio::test]
    async fn install_writes_once_and_removes_what_is_no_longer_wanted() {
        let tmp = std::env::temp_dir().join(format!("np-fw4-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let marker = tmp.join("reloads");
        let reload = tmp.join("reload.sh");
        std::fs::write(
            &reload,
            format!("#!/bin/sh\necho \"$1\" >> {}\n", marker.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&reload, std::fs::Permissions::from_mode(0o755)).unwrap();
        let inc = Includes {
            dir: tmp.join("nftables.d"),
            nft: "true".into(),
            reload: reload.to_str().unwrap().into(),
            timeout: Duration::from_secs(5),
        };
        let body = input_accept(5400);
        let zones = vec!["guest".to_owned(), "iot".to_owned()];
        assert_eq!(inc.install(&zones, &body).await.unwrap(), zones);
        assert_eq!(inc.installed().unwrap(), zones);
        assert!(inc.install(&zones, &body).await.unwrap().is_empty());
        assert_eq!(
            inc.install(&zones[..1], &body).await.unwrap(),
            ["iot".to_owned()]
        );
        assert_eq!(inc.installed().unwrap(), ["guest".to_owned()]);
        let reloads = std::fs::read_to_string(&marker).unwrap();
        assert_eq!(reloads, "reload\nreload\n", "one reload per change");

        let refusing = Includes {
            nft: "false".into(),
            ..inc.clone()
        };
        let e = refusing
            .install(&["lan2".to_owned()], &body)
            .await
            .unwrap_err();
        assert!(
            matches!(e, Fw4Error::Check { ref zone, .. } if zone == "lan2"),
            "{e}"
        );
        assert!(!include_path(&inc.dir, "lan2").exists(), "nothing written");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
