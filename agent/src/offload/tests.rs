//! The offloading service over the fake uci (seeded with the fixture's
//! `/etc/config/firewall`), fake flowtables serving the fixture's JSON, and a real
//! SQLite store in a temp directory.

use std::sync::Arc;

use super::detect::tests::firewall_with;
use super::*;
use crate::system::flowtable::{FakeFlowtables, LiveJson};
use crate::system::uci::FakeUci;

const DEFAULT_JSON: &str = include_str!("../../fixtures/fw4/fw4-default.json");
const OFFLOAD_JSON: &str = include_str!("../../fixtures/fw4/fw4-offload.json");

fn live(json: &str) -> LiveJson {
    LiveJson {
        flowtables: "{\"nftables\": []}".into(),
        forward: Some(json.into()),
    }
}

struct Rig {
    uci: FakeUci,
    flows: Arc<FakeFlowtables>,
    dir: std::path::PathBuf,
}

impl Rig {
    fn new(options: &str) -> Rig {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "np-offload-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let flows = Arc::new(FakeFlowtables::default());
        flows.set_live(live(if options.contains("flow_offloading '1'") {
            OFFLOAD_JSON
        } else {
            DEFAULT_JSON
        }));
        Rig {
            uci: FakeUci::with_package("firewall", &firewall_with(options)),
            flows,
            dir,
        }
    }

    fn service(&self, mode: Mode) -> Offload {
        Offload::new(
            Arc::new(self.uci.clone()),
            self.flows.clone(),
            Store::open(&self.dir).unwrap(),
            mode,
            Arc::new(|| 1_800_000_000),
        )
    }

    fn defaults(&self) -> UciOffload {
        let text = crate::uci_format::export("firewall", &self.uci.committed("firewall"));
        detect::uci(&text).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sections with their options in key order: uci's `set` of an existing option
/// moves it last (the real uci does, and the fake with it), which fw4 ignores.
fn normalized(mut sections: Vec<crate::uci_format::Section>) -> Vec<crate::uci_format::Section> {
    for s in &mut sections {
        s.values.sort_by(|a, b| a.0.cmp(&b.0));
    }
    sections
}

const ON: &str = "\toption flow_offloading '1'\n";

fn needs() -> Vec<String> {
    vec!["group \"Kids\": bandwidth limits".into()]
}

#[tokio::test]
async fn keep_reports_what_established_flows_escape_and_changes_nothing() {
    let rig = Rig::new(ON);
    let svc = rig.service(Mode::Keep);
    let s = svc.check(&needs()).await;
    assert!(s.software && !s.hardware);
    assert_eq!(s.flowtable_live, Some(true));
    assert_eq!(s.flowtable_devices, ["br-lan", "r-wan"]);
    assert_eq!(s.offload_rule_live, Some(true));
    assert!(s.policies_need_forward_path);
    assert_eq!(s.not_enforced_on_established_flows, needs());
    assert!(!s.effective() && s.remedy.is_none() && s.error.is_none());
    assert_eq!(rig.uci.commits(), 0);
    assert_eq!(rig.flows.reloads(), 0);
    // Nothing needs the forward path: nothing escapes.
    assert!(svc.check(&[]).await.effective());
    // Offloading off: effective with any policy.
    let off = Rig::new("");
    let s = off.service(Mode::Keep).check(&needs()).await;
    assert!(s.effective() && !s.software && s.offload_rule_live == Some(false));
}

#[tokio::test]
async fn disable_turns_it_off_while_needed_and_restores_the_owners_values() {
    let rig = Rig::new("\toption flow_offloading '1'\n\toption flow_offloading_hw '1'\n");
    let before = rig.uci.committed("firewall");
    let svc = rig.service(Mode::Disable);
    rig.flows.on_reload(live(DEFAULT_JSON));
    let s = svc.check(&needs()).await;
    assert_eq!(
        rig.defaults(),
        UciOffload {
            flow_offloading: Some("0".into()),
            flow_offloading_hw: Some("0".into())
        }
    );
    assert_eq!(rig.flows.reloads(), 1);
    assert!(s.effective(), "{s:?}");
    assert!(
        s.remedy.as_deref().unwrap().contains("flow_offloading=1"),
        "{s:?}"
    );
    assert_eq!(s.offload_rule_live, Some(false));
    // Steady: nothing more is done.
    let again = svc.check(&needs()).await;
    assert_eq!(rig.flows.reloads(), 1);
    assert!(again.effective() && again.remedy.is_some());

    // An agent restart keeps what it holds; with no policy left it gives it back.
    let restarted = rig.service(Mode::Disable);
    rig.flows.on_reload(live(OFFLOAD_JSON));
    let s = restarted.check(&[]).await;
    assert_eq!(
        normalized(rig.uci.committed("firewall")),
        normalized(before.clone())
    );
    assert_eq!(rig.flows.reloads(), 2);
    assert!(s.remedy.is_none() && s.error.is_none(), "{s:?}");
    assert_eq!(s.offload_rule_live, Some(true));
    assert!(Store::open(&rig.dir)
        .unwrap()
        .meta(SAVED_KEY)
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn withdrawn_consent_and_cleanup_restore() {
    let rig = Rig::new(ON);
    let before = rig.uci.committed("firewall");
    rig.service(Mode::Disable).check(&needs()).await;
    assert!(!rig.defaults().software());
    // The owner sets flow_offloading 'keep' again: their values come back.
    let s = rig.service(Mode::Keep).check(&needs()).await;
    assert_eq!(
        normalized(rig.uci.committed("firewall")),
        normalized(before.clone())
    );
    assert!(s.remedy.is_none());

    rig.service(Mode::Disable).check(&needs()).await;
    assert!(!rig.defaults().software());
    let reloads = rig.flows.reloads();
    let back = cleanup(&rig.uci, rig.flows.as_ref(), Store::open(&rig.dir).unwrap())
        .await
        .unwrap();
    assert_eq!(back.unwrap().flow_offloading.as_deref(), Some("1"));
    assert_eq!(
        normalized(rig.uci.committed("firewall")),
        normalized(before.clone())
    );
    assert_eq!(rig.flows.reloads(), reloads + 1);
    // A second cleanup has nothing to give back.
    assert_eq!(
        cleanup(&rig.uci, rig.flows.as_ref(), Store::open(&rig.dir).unwrap())
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn failures_are_reported_and_retried_never_silent() {
    let rig = Rig::new(ON);
    let svc = rig.service(Mode::Disable);
    // uci refuses: nothing committed, nothing remembered, the status says so.
    rig.uci.fail_commit(true);
    let s = svc.check(&needs()).await;
    assert!(s
        .error
        .as_deref()
        .unwrap()
        .contains("turning flow offloading off"));
    assert!(!s.effective() && s.remedy.is_none());
    assert!(rig.defaults().software());
    assert!(Store::open(&rig.dir)
        .unwrap()
        .meta(SAVED_KEY)
        .unwrap()
        .is_none());
    rig.uci.fail_commit(false);

    // The reload fails: UCI is off but fw4 still offloads; the next check reloads.
    rig.flows.fail_reload(true);
    let s = svc.check(&needs()).await;
    assert!(s.error.as_deref().unwrap().contains("reload"), "{s:?}");
    assert!(!s.effective(), "the old ruleset still offloads");
    assert!(!rig.defaults().software());
    rig.flows.fail_reload(false);
    rig.flows.on_reload(live(DEFAULT_JSON));
    let s = svc.check(&needs()).await;
    assert_eq!(rig.flows.reloads(), 1);
    assert!(s.effective() && s.error.is_none(), "{s:?}");
}

/// The remedy over the real uci (the test build's, over a temporary config
/// directory holding the fixture's firewall file with offloading on): the file
/// says '0' while held, then is the owner's again, through the service and through
/// `cleanup`. The firewall reload is the fake's: fw4 is not here.
// Real time: the real uci is a process, and paused time would fire its timeout.
#[tokio::test]
async fn the_remedy_over_the_real_uci_restores_the_owners_file() {
    let rig = crate::system::uci::tests::real_rig();
    let file = rig.dir.join("config/firewall");
    let owner = firewall_with("\toption flow_offloading '1'\n\toption flow_offloading_hw '1'\n");
    std::fs::write(&file, &owner).unwrap();
    let parsed = |text: &str| normalized(crate::uci_format::parse(text).unwrap());
    let flows = Arc::new(FakeFlowtables::default());
    flows.set_live(live(OFFLOAD_JSON));
    let state = rig.dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let service = |mode| {
        Offload::new(
            Arc::new(rig.uci.clone_config()),
            flows.clone(),
            Store::open(&state).unwrap(),
            mode,
            Arc::new(|| 1_800_000_000),
        )
    };
    flows.on_reload(live(DEFAULT_JSON));
    let s = service(Mode::Disable).check(&needs()).await;
    assert!(s.effective() && s.error.is_none(), "{s:?}");
    let held = std::fs::read_to_string(&file).unwrap();
    assert!(held.contains("option flow_offloading '0'"), "{held}");
    assert!(held.contains("option flow_offloading_hw '0'"), "{held}");
    let s = service(Mode::Disable).check(&[]).await;
    assert!(s.error.is_none(), "{s:?}");
    assert_eq!(
        parsed(&std::fs::read_to_string(&file).unwrap()),
        parsed(&owner)
    );

    // Held again, then `cleanup` (as `netpilot-agent cleanup` runs it).
    service(Mode::Disable).check(&needs()).await;
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains("option flow_offloading '0'"));
    let out = crate::cleanup::restore_offloading(
        &rig.uci.clone_config(),
        flows.as_ref(),
        Store::open(&state).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        crate::cleanup::Outcome::Removed(
            "fw4 flow offloading turned off by NetPilot (restored flow_offloading=1, flow_offloading_hw=1)"
                .into()
        )
    );
    assert_eq!(
        parsed(&std::fs::read_to_string(&file).unwrap()),
        parsed(&owner)
    );
}

/// The service follows the policy engine: each apply is checked at once, and
/// while offloading makes the policy ineffective the log warns at every new
/// generation (not at every quiet periodic check).
#[tokio::test(start_paused = true)]
async fn every_apply_is_checked_and_warned_about_while_ineffective() {
    use crate::policy::compile::resolvers::DnsConfig;
    use crate::policy::engine::{Engine, EngineConfig};
    use crate::policy::execute::Enforcers;
    use tracing_subscriber::prelude::*;

    #[derive(Clone, Default)]
    struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = LogBuf::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_filter(tracing_subscriber::filter::LevelFilter::WARN),
        ),
    );
    let warnings = || {
        String::from_utf8(logs.0.lock().unwrap().clone())
            .unwrap()
            .matches("fw4 flow offloading is on")
            .count()
    };

    let rig = Rig::new(ON);
    let state = rig.dir.join("engine");
    std::fs::create_dir_all(&state).unwrap();
    let engine = Arc::new(
        Engine::new(
            Store::open(&state).unwrap(),
            Enforcers {
                nft: Arc::new(crate::system::nft::FakeNft::default()),
                tc: Arc::new(crate::system::tc::FakeTc::default()),
                dns: Arc::new(crate::system::dnsmasq::FakeResolver::default()),
            },
            Arc::new(crate::system::files::MemFiles::default()),
            EngineConfig {
                lan_ifs: vec!["br-lan".into()],
                wan_if: "wan".into(),
                timezone: Some("UTC0".into()),
                check_interval: Duration::from_secs(60),
                kernel_minutes_west: Arc::new(|| 0),
                dns: DnsConfig::default(),
            },
            Arc::new(|| 1_795_435_200),
        )
        .unwrap(),
    );
    let svc = Arc::new(rig.service(Mode::Keep));
    let mut seen = svc.subscribe();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(
        svc.clone()
            .run(engine.clone(), Duration::from_secs(3600), rx),
    );
    // The first check: no policy, nothing escapes, no warning.
    seen.changed().await.unwrap();
    assert!(seen.borrow_and_update().effective());
    assert_eq!(warnings(), 0);

    let actor = crate::policy::persist::Actor::default();
    for (n, kbps) in [(1, 2000), (2, 1000)] {
        engine
            .change(&actor, "test", |d| {
                crate::policy::ops::sync_group(d, crate::policy::fixtures::kids(&[1], Some(kbps)))
            })
            .await
            .unwrap();
        seen.changed().await.unwrap();
        let s = seen.borrow_and_update().clone();
        assert!(s.policies_need_forward_path && !s.effective(), "{s:?}");
        assert_eq!(warnings(), n, "one warning per generation");
    }
    // A quiet periodic check of the same generation: checked, not warned again.
    tokio::time::advance(Duration::from_secs(3601)).await;
    seen.changed().await.unwrap();
    assert_eq!(warnings(), 2);
    let _ = stop.send(true);
    task.await.unwrap();
}
