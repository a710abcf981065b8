//! What the policy needs from the forward path, and the remedy the owner consented
//! to: pure decisions over the desired policy, fw4's UCI options, the live state
//! and the owner's values NetPilot remembered.

use crate::policy::model::{Desired, Internet, ListKind};
use crate::system::uci::UciCmd;

use super::detect::{UciOffload, OPTIONS};

/// UCI `netpilot.@agent[0].flow_offloading`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Report only (the default): offloading stays as the owner set it.
    #[default]
    Keep,
    /// The owner consents: NetPilot turns fw4's offloading off while a policy
    /// needs the forward path and puts the owner's values back afterwards.
    Disable,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "keep" => Some(Mode::Keep),
            "disable" => Some(Mode::Disable),
            _ => None,
        }
    }
}

/// What the policy enforces in the forward hook, each with what an offloaded
/// (established) flow escapes: the answer to "what is not enforced".
pub fn forward_needs(d: &Desired) -> Vec<String> {
    let mut needs = Vec::new();
    for g in d.groups.values() {
        let p = &g.policy;
        let name = &g.name;
        if !p.bandwidth.is_unlimited() {
            needs.push(format!(
                "group {name:?}: bandwidth limits (the class is chosen in the forward chain)"
            ));
        }
        if p.internet == Internet::Block {
            needs.push(format!("group {name:?}: internet block"));
        }
        if !p.schedules.is_empty() {
            needs.push(format!("group {name:?}: schedules"));
        }
        let dns = &p.dns;
        if !dns.categories.is_empty() || !dns.block.is_empty() || dns.block_quic {
            needs.push(format!(
                "group {name:?}: DNS filtering (DoH and QUIC refusal in the forward chain)"
            ));
        }
    }
    for (kind, what) in [
        (ListKind::Block, "blocked devices"),
        (ListKind::Black, "blacklist"),
        (ListKind::White, "whitelist"),
    ] {
        if d.lists.get(&kind).is_some_and(|l| !l.is_empty()) {
            needs.push(what.to_owned());
        }
    }
    needs
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    /// Remember `save` (the owner's values), then commit `cmds` and reload.
    Disable {
        save: UciOffload,
        cmds: Vec<UciCmd>,
    },
    /// Commit `cmds` (the owner's values back; may be empty when UCI already has
    /// them), reload, then forget the saved values.
    Restore {
        cmds: Vec<UciCmd>,
    },
    /// UCI already has offloading off, but fw4 still runs the old ruleset (a
    /// reload failed earlier): reload again.
    Reload,
}

/// The UCI section both options live in.
pub const SECTION: &str = "firewall.@defaults[0]";

/// The commands that turn offloading off: each option that is on set to '0'
/// (visible to the owner in `/etc/config/firewall`, unlike a deletion).
pub fn disable_cmds(now: &UciOffload) -> Vec<UciCmd> {
    OPTIONS
        .iter()
        .filter(|o| now.get(o).is_some_and(|v| v != "0"))
        .map(|o| UciCmd::set(format!("{SECTION}.{o}"), "0"))
        .collect()
}

/// The commands that put `saved` back over `now`: an option the owner had is set
/// to their value, one they did not have is deleted.
pub fn restore_cmds(saved: &UciOffload, now: &UciOffload) -> Vec<UciCmd> {
    OPTIONS
        .iter()
        .filter(|o| saved.get(o) != now.get(o))
        .map(|o| {
            let path = format!("{SECTION}.{o}");
            match saved.get(o) {
                Some(v) => UciCmd::set(path, v),
                None => UciCmd::Delete { path },
            }
        })
        .collect()
}

/// The decision. `needs`: the policy needs the forward path; `now`: fw4's UCI
/// options; `live_offloading`: the live ruleset offloads (when it could be read);
/// `saved`: the owner's values NetPilot remembered when it turned offloading off.
pub fn decide(
    mode: Mode,
    needs: bool,
    now: &UciOffload,
    live_offloading: Option<bool>,
    saved: Option<&UciOffload>,
) -> Action {
    match (mode, saved) {
        // Consent withdrawn, or nothing needs the forward path any more: give the
        // owner's values back.
        (Mode::Keep, Some(saved)) => Action::Restore {
            cmds: restore_cmds(saved, now),
        },
        (Mode::Disable, Some(saved)) if !needs => Action::Restore {
            cmds: restore_cmds(saved, now),
        },
        (Mode::Disable, _) if needs && now.software() => Action::Disable {
            // Turned on again while NetPilot holds it off: keep the first saved
            // values, which are the owner's.
            save: saved.cloned().unwrap_or_else(|| now.clone()),
            cmds: disable_cmds(now),
        },
        (Mode::Disable, Some(_)) if live_offloading == Some(true) => Action::Reload,
        _ => Action::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixtures::{filtered, kids};
    use crate::system::uci::batch_script;

    fn on(hw: bool) -> UciOffload {
        UciOffload {
            flow_offloading: Some("1".into()),
            flow_offloading_hw: hw.then(|| "1".into()),
        }
    }

    #[test]
    fn the_forward_path_is_needed_by_limits_blocks_schedules_dns_and_lists() {
        let mut d = Desired::default();
        assert!(
            forward_needs(&d).is_empty(),
            "the guest group alone needs nothing"
        );
        // A group without limit, block, schedule or filtering needs nothing.
        let plain = kids(&[1], None);
        d.groups.insert(plain.id, plain);
        assert!(forward_needs(&d).is_empty());
        let g = kids(&[1], Some(2000));
        d.groups.insert(g.id, g);
        let needs = forward_needs(&d);
        assert_eq!(
            needs,
            ["group \"Kids\": bandwidth limits (the class is chosen in the forward chain)"]
        );
        let mut blocked = kids(&[1], None);
        blocked.policy.internet = Internet::Block;
        let mut only_block = Desired::default();
        only_block.groups.insert(blocked.id, blocked);
        assert_eq!(
            forward_needs(&only_block),
            ["group \"Kids\": internet block"]
        );
        let f = filtered(&[1], &["example.com"]);
        let mut only_dns = Desired::default();
        only_dns.groups.insert(f.id, f);
        assert!(forward_needs(&only_dns)
            .iter()
            .any(|n| n.contains("DNS filtering")));
        let mut lists = Desired::default();
        lists.lists.insert(
            ListKind::Black,
            vec![crate::policy::model::Target::Mac(
                crate::policy::model::Mac::parse("02:00:00:00:01:01").unwrap(),
            )],
        );
        assert_eq!(forward_needs(&lists), ["blacklist"]);
    }

    #[test]
    fn disabling_and_restoring_compile_to_these_uci_batches() {
        let hw = on(true);
        let cmds = disable_cmds(&hw);
        assert_eq!(
            batch_script("firewall", &cmds).unwrap(),
            "set firewall.@defaults[0].flow_offloading='0'\n\
             set firewall.@defaults[0].flow_offloading_hw='0'\n"
        );
        let off = UciOffload {
            flow_offloading: Some("0".into()),
            flow_offloading_hw: Some("0".into()),
        };
        assert_eq!(
            batch_script("firewall", &restore_cmds(&hw, &off)).unwrap(),
            "set firewall.@defaults[0].flow_offloading='1'\n\
             set firewall.@defaults[0].flow_offloading_hw='1'\n"
        );
        // An option the owner never had is deleted again, not left at '0'.
        let off_sw = UciOffload {
            flow_offloading: Some("0".into()),
            flow_offloading_hw: None,
        };
        assert_eq!(disable_cmds(&on(false)), disable_cmds(&on(false)));
        assert_eq!(
            batch_script(
                "firewall",
                &restore_cmds(
                    &UciOffload {
                        flow_offloading: Some("yes".into()),
                        flow_offloading_hw: None
                    },
                    &UciOffload {
                        flow_offloading: Some("0".into()),
                        flow_offloading_hw: Some("0".into())
                    }
                )
            )
            .unwrap(),
            "set firewall.@defaults[0].flow_offloading='yes'\n\
             delete firewall.@defaults[0].flow_offloading_hw\n"
        );
        assert!(restore_cmds(&off_sw, &off_sw).is_empty());
    }

    #[test]
    fn decisions() {
        let sw = on(false);
        let off = UciOffload {
            flow_offloading: Some("0".into()),
            flow_offloading_hw: None,
        };
        // Keep: report only, whatever the policy.
        assert_eq!(
            decide(Mode::Keep, true, &sw, Some(true), None),
            Action::None
        );
        // Disable with a need: off, remembering the owner's values.
        assert_eq!(
            decide(Mode::Disable, true, &sw, Some(true), None),
            Action::Disable {
                save: sw.clone(),
                cmds: vec![UciCmd::set("firewall.@defaults[0].flow_offloading", "0")]
            }
        );
        // No need: nothing to do, or give back what was taken.
        assert_eq!(
            decide(Mode::Disable, false, &sw, Some(true), None),
            Action::None
        );
        assert_eq!(
            decide(Mode::Disable, false, &off, Some(false), Some(&sw)),
            Action::Restore {
                cmds: vec![UciCmd::set("firewall.@defaults[0].flow_offloading", "1")]
            }
        );
        // Consent withdrawn while holding it off: restore.
        assert!(matches!(
            decide(Mode::Keep, true, &off, Some(false), Some(&sw)),
            Action::Restore { .. }
        ));
        // Held off and in force: nothing; a reload that failed: reload again.
        assert_eq!(
            decide(Mode::Disable, true, &off, Some(false), Some(&sw)),
            Action::None
        );
        assert_eq!(
            decide(Mode::Disable, true, &off, Some(true), Some(&sw)),
            Action::Reload
        );
        // Turned on again behind NetPilot's back: off again, the first saved values
        // kept.
        let hw_saved = on(true);
        assert_eq!(
            decide(Mode::Disable, true, &sw, Some(true), Some(&hw_saved)),
            Action::Disable {
                save: hw_saved.clone(),
                cmds: vec![UciCmd::set("firewall.@defaults[0].flow_offloading", "0")]
            }
        );
        // Offloading off already and nothing saved: nothing.
        assert_eq!(
            decide(Mode::Disable, true, &off, Some(false), None),
            Action::None
        );
    }
}
