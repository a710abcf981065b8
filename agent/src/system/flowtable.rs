//! The flow-offloading seam: what fw4 has live (`nft -j list flowtables`, `nft -j
//! list chain inet fw4 forward`) and the firewall's reload (`/etc/init.d/firewall
//! reload`, which makes fw4 render its UCI configuration again). [`RealFlowtables`]
//! drives both through the process module; [`FakeFlowtables`] serves fixed JSON and
//! counts reloads.

use std::sync::Mutex;
use std::time::Duration;

use super::Fut;
use crate::runtime::process::{self, ProcessError};

#[derive(Debug, thiserror::Error)]
pub enum FlowtableError {
    /// `nft` could not list the ruleset.
    #[error("reading fw4's flowtables: {0}")]
    Read(#[source] ProcessError),
    /// The firewall's init script failed.
    #[error("reloading the firewall: {0}")]
    Reload(#[source] ProcessError),
}

/// What fw4 has live, as nft's JSON (the parsing is the domain's, in
/// `crate::offload::detect`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveJson {
    /// `nft -j list flowtables`.
    pub flowtables: String,
    /// `nft -j list chain inet fw4 forward`; `None` when fw4 has no such chain
    /// (no fw4 table: the firewall is stopped or is not fw4).
    pub forward: Option<String>,
}

pub trait Flowtables: Send + Sync {
    fn read(&self) -> Fut<'_, Result<LiveJson, FlowtableError>>;
    fn reload_firewall(&self) -> Fut<'_, Result<(), FlowtableError>>;
}

pub struct RealFlowtables {
    pub nft: String,
    /// `/etc/init.d/firewall`
    pub init: String,
    pub timeout: Duration,
}

impl Default for RealFlowtables {
    fn default() -> Self {
        RealFlowtables {
            nft: "nft".into(),
            init: "/etc/init.d/firewall".into(),
            // fw4 renders and loads its whole ruleset on a reload.
            timeout: Duration::from_secs(60),
        }
    }
}

impl Flowtables for RealFlowtables {
    fn read(&self) -> Fut<'_, Result<LiveJson, FlowtableError>> {
        Box::pin(async move {
            let flowtables =
                process::run(&[&self.nft, "-j", "list", "flowtables"], None, self.timeout)
                    .await
                    .map_err(FlowtableError::Read)?;
            let forward = match process::run(
                &[&self.nft, "-j", "list", "chain", "inet", "fw4", "forward"],
                None,
                self.timeout,
            )
            .await
            {
                Ok(text) => Some(text),
                // nft's answer for a table or chain that does not exist.
                Err(ProcessError::Failed { ref stderr, .. })
                    if stderr.contains("No such file or directory") =>
                {
                    None
                }
                Err(e) => return Err(FlowtableError::Read(e)),
            };
            Ok(LiveJson {
                flowtables,
                forward,
            })
        })
    }

    fn reload_firewall(&self) -> Fut<'_, Result<(), FlowtableError>> {
        Box::pin(async move {
            process::run(&[&self.init, "reload"], None, self.timeout)
                .await
                .map(drop)
                .map_err(FlowtableError::Reload)
        })
    }
}

/// Fixed JSON (by default: no flowtable, no fw4 table), a reload counter and an
/// injectable reload failure.
pub struct FakeFlowtables {
    state: Mutex<FakeState>,
}

impl Default for FakeFlowtables {
    fn default() -> Self {
        FakeFlowtables {
            state: Mutex::new(FakeState {
                live: LiveJson {
                    flowtables: "{\"nftables\": []}".into(),
                    forward: None,
                },
                reloads: 0,
                fail_reload: false,
                after_reload: None,
            }),
        }
    }
}

struct FakeState {
    live: LiveJson,
    reloads: usize,
    fail_reload: bool,
    /// What the next reload makes live (fw4 rendering the new UCI).
    after_reload: Option<LiveJson>,
}

impl FakeFlowtables {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake flowtables")
    }

    pub fn set_live(&self, live: LiveJson) {
        self.lock().live = live;
    }

    pub fn on_reload(&self, live: LiveJson) {
        self.lock().after_reload = Some(live);
    }

    pub fn fail_reload(&self, fail: bool) {
        self.lock().fail_reload = fail;
    }

    pub fn reloads(&self) -> usize {
        self.lock().reloads
    }
}

impl Flowtables for FakeFlowtables {
    fn read(&self) -> Fut<'_, Result<LiveJson, FlowtableError>> {
        let live = self.lock().live.clone();
        Box::pin(async move { Ok(live) })
    }

    fn reload_firewall(&self) -> Fut<'_, Result<(), FlowtableError>> {
        let r = {
            let mut s = self.lock();
            if s.fail_reload {
                Err(FlowtableError::Reload(ProcessError::Failed {
                    argv: vec!["/etc/init.d/firewall".into(), "reload".into()],
                    status: "exit status: 1".into(),
                    code: Some(1),
                    stderr: "injected reload failure".into(),
                }))
            } else {
                s.reloads += 1;
                if let Some(next) = s.after_reload.take() {
                    s.live = next;
                }
                Ok(())
            }
        };
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_NFT: &str = include_str!("../../fixtures/fw4/fw4-default.nft");

    /// The derived JSON of the offloading ruleset (see `agent/fixtures/README.md`)
    /// is nft's own input: `nft -j -c` parses it, and the only errors are the
    /// kernel's refusal of the flowtable and of the rule adding to it, exactly
    /// where the text form fails on this kernel. On a kernel with flowtables the
    /// check passes outright.
    #[test]
    fn netns_the_derived_offload_json_is_what_nft_reads() {
        netpilot_testkit::require(&["nft", "ip"]);
        let ns = netpilot_testkit::Netns::new("ftjson").unwrap();
        ns.exec(&["ip", "link", "add", "br-lan", "type", "bridge"])
            .unwrap();
        ns.exec(&["ip", "link", "add", "r-wan", "type", "bridge"])
            .unwrap();
        let dir = std::env::temp_dir().join(format!("np-ftjson-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let check = |name: &str, text: &str| {
            let file = dir.join(name);
            std::fs::write(&file, text).unwrap();
            let out = ns
                .command("nft")
                .args(["-c", "-f"])
                .arg(&file)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let check_json = |name: &str, text: &str| {
            let file = dir.join(name);
            std::fs::write(&file, text).unwrap();
            let out = ns
                .command("nft")
                .args(["-j", "-c", "-f"])
                .arg(&file)
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let kernel_refusals = |err: &str| {
            err.lines()
                .filter(|l| l.contains("Error"))
                .all(|l| l.contains("Could not process rule: No such file or directory"))
        };
        let text = check(
            "offload.nft",
            include_str!("../../fixtures/fw4/fw4-offload.nft"),
        );
        let json = check_json(
            "offload.json",
            include_str!("../../fixtures/fw4/fw4-offload.json"),
        );
        assert_eq!(text.0, json.0, "text {text:?} json {json:?}");
        if !json.0 {
            assert!(kernel_refusals(&json.1), "{}", json.1);
            assert!(kernel_refusals(&text.1), "{}", text.1);
            assert_eq!(
                json.1.matches("Could not process rule").count(),
                2,
                "the flowtable and the rule: {}",
                json.1
            );
        }
        // The stock ruleset's real JSON loads in full.
        let stock = check_json(
            "default.json",
            include_str!("../../fixtures/fw4/fw4-default.json"),
        );
        assert!(stock.0, "{}", stock.1);
        // A JSON slip is nft's parse error, not the kernel's: the check can fail.
        let broken = include_str!("../../fixtures/fw4/fw4-offload.json")
            .replace("\"flow\": {", "\"flw\": {");
        let bad = check_json("broken.json", &broken);
        assert!(!bad.0 && !kernel_refusals(&bad.1), "{}", bad.1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The real adapter over the real nft with fw4's stock ruleset loaded: no
    /// flowtable, and a forward chain without `flow add`. (This kernel cannot load
    /// the offloading ruleset; its JSON is tested in `offload::detect`.)
    #[test]
    fn netns_real_adapter_reads_fw4_without_offloading() {
        netpilot_testkit::require(&["nft"]);
        let ns = netpilot_testkit::Netns::new("flowtable").unwrap();
        ns.block_on(|| async {
            let real = RealFlowtables::default();
            // No fw4 table at all: no forward chain, not an error.
            let none = real.read().await.unwrap();
            assert_eq!(none.forward, None);
            let live = crate::offload::detect::live(&none).unwrap();
            assert!(!live.offloading(), "{live:?}");

            let dir = std::env::temp_dir().join(format!("np-ft-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("fw4.nft");
            std::fs::write(&file, DEFAULT_NFT).unwrap();
            process::run(
                &["nft", "-f", &file.to_string_lossy()],
                None,
                Duration::from_secs(30),
            )
            .await
            .unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            let json = real.read().await.unwrap();
            let forward = json.forward.as_deref().unwrap();
            assert!(forward.contains("\"chain\": \"forward\""), "{forward}");
            let live = crate::offload::detect::live(&json).unwrap();
            assert!(live.flowtables.is_empty() && live.offload_rules.is_empty());
            assert!(!live.offloading());
            // The reload runs the init script given, by argv.
            let init = RealFlowtables {
                init: "/bin/true".into(),
                ..RealFlowtables::default()
            };
            init.reload_firewall().await.unwrap();
            let failing = RealFlowtables {
                init: "/bin/false".into(),
                ..RealFlowtables::default()
            };
            assert!(matches!(
                failing.reload_firewall().await,
                Err(FlowtableError::Reload(_))
            ));
        });
    }
}
