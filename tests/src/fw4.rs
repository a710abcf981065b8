//! A stand-in for OpenWrt's fw4 in a lab's router namespace, doing what fw4 does to
//! NetPilot: `start`/`reload` render the real stock ruleset (`fw4-default.nft`,
//! captured from fw4 itself, with the lab's device names) followed by one
//! `include` per `*.nft` file in a `ruleset-post` directory as it is at that moment,
//! loaded with one `nft -f` (one transaction: a broken include fails it all, as on
//! a router); `flush` is `fw4 flush`, `nft flush ruleset`, which deletes every table.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::lab::{Lab, LAN_IF, WAN_IF};

/// fw4's stock ruleset as `fw4 print` rendered it for lan `br-lan`, wan `r-wan`.
pub const FW4_DEFAULT: &str = include_str!("../../agent/fixtures/fw4/fw4-default.nft");

pub struct Fw4 {
    /// The include point, `/usr/share/nftables.d/ruleset-post` on a router.
    pub ruleset_post: PathBuf,
    /// Where each rendering is written before it is loaded.
    work: tempfile::TempDir,
}

impl Fw4 {
    pub fn new(ruleset_post: &Path) -> anyhow::Result<Fw4> {
        std::fs::create_dir_all(ruleset_post)?;
        Ok(Fw4 {
            ruleset_post: ruleset_post.to_owned(),
            work: tempfile::tempdir()?,
        })
    }

    /// The ruleset `start` loads now: fw4's table for the lab's devices, then the
    /// includes that exist, in name order as fw4 lists them.
    pub fn render(&self) -> anyhow::Result<String> {
        let user_includes = self.work.path().join("nftables.d");
        std::fs::create_dir_all(&user_includes)?;
        let mut text = FW4_DEFAULT
            .replace("\"r-wan\"", &format!("\"{WAN_IF}\""))
            .replace("\"br-lan\"", &format!("\"{LAN_IF}\""))
            // The user includes inside fw4's table: an empty directory of ours, not
            // this machine's /etc.
            .replace(
                "include \"/etc/nftables.d/*.nft\"",
                &format!("include \"{}/*.nft\"", user_includes.display()),
            );
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.ruleset_post)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "nft"))
            .collect();
        files.sort();
        for f in files {
            text.push_str(&format!("include \"{}\"\n", f.display()));
        }
        Ok(text)
    }

    /// `fw4 start` (and `reload`, `restart`): one transaction.
    pub fn start(&self, lab: &Lab) -> anyhow::Result<()> {
        let file = self.work.path().join("ruleset.nft");
        std::fs::write(&file, self.render()?)?;
        lab.exec(&lab.router, &["nft", "-f", file.to_str().unwrap()])
            .context("fw4 start: nft refused the ruleset")?;
        Ok(())
    }

    pub fn reload(&self, lab: &Lab) -> anyhow::Result<()> {
        self.start(lab)
    }

    /// `fw4 flush`, what `/etc/init.d/firewall stop` runs.
    pub fn flush(&self, lab: &Lab) -> anyhow::Result<()> {
        lab.exec(&lab.router, &["nft", "flush", "ruleset"])?;
        Ok(())
    }

    /// Whether fw4's table is loaded.
    pub fn loaded(&self, lab: &Lab) -> bool {
        lab.exec(&lab.router, &["nft", "list", "table", "inet", "fw4"])
            .is_ok()
    }
}
