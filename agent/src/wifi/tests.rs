//! Safe apply end to end over the fakes (uci, wifi+netifd+hostapd, reporter) and a
//! real SQLite store, on tokio's paused clock: waits are for the service's own
//! state events, never sleeps.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netpilot_proto::ErrorCode;
use tokio::sync::watch;

use super::model::{Password, Request, Ssid};
use super::persist::{ChangeView, State};
use super::{WifiConfig, WifiError, WifiService};
use crate::link::report::FakeReporter;
use crate::policy::persist::Actor;
use crate::store::Store;
use crate::system::ubus::FakeUbus;
use crate::system::uci::{FakeUci, Uci};
use crate::system::wifi::FakeWifi;

const FIXTURE: &str = include_str!("../../fixtures/uci/etc-config-wireless");
const EXPORT: &str = include_str!("../../fixtures/uci/uci-export-wireless.txt");
const EPOCH: i64 = 1_800_000_000;

/// One simulated router: its uci, radios and ubus outlive agent restarts.
struct Router {
    uci: FakeUci,
    wifi: FakeWifi,
    ubus: FakeUbus,
    reporter: FakeReporter,
    dir: PathBuf,
    /// Added to the wall clock, to model time passing while the agent was down.
    offset: Arc<AtomicI64>,
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Agent {
    svc: Arc<WifiService>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Stops the background task, as a crash or restart of the agent does.
    async fn kill(self) {
        let _ = self.stop.send(true);
        self.task.abort();
        let _ = self.task.await;
    }
}

fn config() -> WifiConfig {
    WifiConfig {
        grace: Duration::from_secs(90),
        settle: Duration::from_secs(10),
        retry: Duration::from_secs(5),
    }
}

fn router() -> Router {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "np-wifi-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let uci = FakeUci::with_package("wireless", FIXTURE);
    let ubus = FakeUbus::default();
    let wifi = FakeWifi::new(uci.clone(), ubus.clone());
    Router {
        uci,
        wifi,
        ubus,
        reporter: FakeReporter::default(),
        dir,
        offset: Arc::new(AtomicI64::new(0)),
    }
}

impl Router {
    /// Starts an agent's Wi-Fi service over this router's store (no task yet).
    fn service(&self, config: WifiConfig) -> Arc<WifiService> {
        let start = tokio::time::Instant::now();
        let offset = self.offset.clone();
        Arc::new(WifiService::new(
            Arc::new(self.uci.clone()),
            Arc::new(self.wifi.clone()),
            Arc::new(self.ubus.clone()),
            Arc::new(self.reporter.clone()),
            Store::open(&self.dir).unwrap(),
            config,
            Arc::new(move || {
                EPOCH + start.elapsed().as_secs() as i64 + offset.load(Ordering::Relaxed)
            }),
        ))
    }

    fn start(&self, config: WifiConfig) -> Agent {
        let svc = self.service(config);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(svc.clone().run(rx));
        Agent { svc, stop, task }
    }

    fn ssid(&self, section: &str) -> Option<String> {
        self.uci
            .committed("wireless")
            .into_iter()
            .find(|s| s.name.as_deref() == Some(section))
            .and_then(|s| s.get("ssid").map(str::to_owned))
    }
}

fn ssid(s: &str) -> Request {
    Request::Ssid {
        ssid: Ssid::parse(s).unwrap(),
        radio: None,
        interface: None,
    }
}

fn actor() -> Actor {
    Actor {
        session_id: Some("s-1".into()),
        user_id: Some("alice".into()),
        request_id: Some("r-1".into()),
    }
}

/// Waits for the service's latest change to satisfy `pred`.
async fn until(svc: &WifiService, pred: impl Fn(&ChangeView) -> bool) -> ChangeView {
    let mut rx = svc.subscribe();
    loop {
        if let Some(v) = svc.latest_change().unwrap() {
            if pred(&v) {
                return v;
            }
        }
        tokio::time::timeout(Duration::from_secs(3_600), rx.changed())
            .await
            .expect("the change never reached the expected state")
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_change_is_pending_then_confirmed_when_the_relay_answers() {
    let r = router();
    let agent = r.start(config());
    let started = tokio::time::Instant::now();
    let answer = agent.svc.change(&actor(), &ssid("Home")).await.unwrap();
    let pending = answer.change.unwrap();
    assert!(answer.changed);
    assert_eq!(pending.state, State::Pending);
    assert_eq!(pending.deadline_unix, pending.created_unix + 90);
    assert_eq!(answer.targets, ["default_radio0", "default_radio1"]);
    // Applied and reloaded at once; netifd runs it.
    assert_eq!(r.ssid("default_radio0").as_deref(), Some("Home"));
    assert_eq!(r.wifi.reloads(), [None]);
    assert_eq!(
        agent.svc.status().await.unwrap().change.unwrap().state,
        State::Pending
    );

    let done = until(&agent.svc, |c| c.state == State::Confirmed).await;
    // Not before the settle delay: the reload had not restarted the radios yet.
    assert!(started.elapsed() >= Duration::from_secs(10));
    assert!(done.reported);
    let events = r.reporter.delivered();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].kind.as_str(), events[0].state.as_str()),
        ("wifi_change", "confirmed")
    );
    assert_eq!(events[0].id, pending.id);
    assert_eq!(r.ssid("default_radio1").as_deref(), Some("Home"));
    // A second change is welcome once the first is settled.
    let next = agent.svc.change(&actor(), &ssid("Home2")).await.unwrap();
    assert_eq!(next.change.unwrap().state, State::Pending);
    let audit = agent.svc.store().audit_tail(10).unwrap();
    let results: Vec<&str> = audit.iter().map(|a| a.result.as_str()).collect();
    assert!(results[1].starts_with("confirmed"), "{results:?}");
    assert!(results[2].starts_with("pending"), "{results:?}");
    assert_eq!(audit[2].user_id.as_deref(), Some("alice"));
    assert_eq!(audit[2].request_id.as_deref(), Some("r-1"));
    assert_eq!(audit[2].action, "wifi.ssid");
    agent.kill().await;
}

#[tokio::test(start_paused = true)]
async fn unconfirmed_changes_roll_back_and_the_rollback_is_reported_once_reachable() {
    let r = router();
    r.reporter.set_reachable(false);
    let agent = r.start(config());
    let started = tokio::time::Instant::now();
    agent
        .svc
        .change(
            &actor(),
            &Request::Disable {
                radio: Some("radio1".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(r.wifi.status()["radio1"]["up"], false);
    let gone = until(&agent.svc, |c| c.state == State::RolledBack).await;
    assert!(started.elapsed() >= Duration::from_secs(90));
    assert!(!gone.reported);
    // The previous configuration is back, committed and running.
    assert_eq!(r.uci.export("wireless").await.unwrap(), EXPORT);
    assert_eq!(r.wifi.status()["radio1"]["up"], true);
    assert_eq!(
        r.wifi.reloads(),
        [Some("radio1".to_owned()), Some("radio1".to_owned())]
    );
    // Tried every few seconds during the grace period: (90 - 10) / 5 + 1.
    let tries = r.reporter.attempts();
    assert!((15..=19).contains(&tries), "{tries} attempts");

    // The relay is back: the rollback is reported, once.
    r.reporter.set_reachable(true);
    let told = until(&agent.svc, |c| c.reported).await;
    assert_eq!(told.state, State::RolledBack);
    let events = r.reporter.delivered();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].state, "rolled_back");
    assert!(events[0].detail.as_deref().unwrap().contains("radio1"));
    agent.kill().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_during_the_grace_period_resumes_the_wait() {
    let r = router();
    let agent = r.start(config());
    r.reporter.set_reachable(false);
    let id = agent
        .svc
        .change(&actor(), &ssid("Home"))
        .await
        .unwrap()
        .change
        .unwrap()
        .id;
    agent.kill().await;

    // Back 30 s later: 60 s of grace left; the relay answers now.
    r.offset.store(30, Ordering::Relaxed);
    r.reporter.set_reachable(true);
    let again = r.start(config());
    let done = until(&again.svc, |c| c.state == State::Confirmed).await;
    assert_eq!(done.id, id);
    assert_eq!(r.ssid("default_radio0").as_deref(), Some("Home"));
    // Resuming reloads once, so what is confirmed is what runs.
    assert_eq!(r.wifi.reloads(), [None, None]);
    again.kill().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_past_the_deadline_rolls_back_at_once() {
    let r = router();
    r.reporter.set_reachable(false);
    let agent = r.start(config());
    agent.svc.change(&actor(), &ssid("Home")).await.unwrap();
    agent.kill().await;

    r.offset.store(3_600, Ordering::Relaxed);
    let again = r.start(config());
    let started = tokio::time::Instant::now();
    let done = until(&again.svc, |c| c.state == State::RolledBack).await;
    assert!(started.elapsed() < Duration::from_secs(1), "at once");
    assert_eq!(
        done.outcome.as_deref(),
        Some("not confirmed within the grace period")
    );
    assert_eq!(r.uci.export("wireless").await.unwrap(), EXPORT);
    again.kill().await;
}

#[tokio::test(start_paused = true)]
async fn a_second_change_while_one_is_pending_is_refused() {
    let r = router();
    r.reporter.set_reachable(false);
    let agent = r.start(config());
    let first = agent.svc.change(&actor(), &ssid("Home")).await.unwrap();
    let err = agent
        .svc
        .change(&actor(), &Request::Disable { radio: None })
        .await
        .unwrap_err();
    match &err {
        WifiError::Pending { id, .. } => assert_eq!(*id, first.change.unwrap().id),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(r.uci.commits(), 1);
    agent.kill().await;
}

#[tokio::test(start_paused = true)]
async fn uci_failing_halfway_keeps_the_previous_configuration() {
    let r = router();
    let svc = r.service(config());
    r.uci.fail_batch_at(Some(1));
    let err = svc.change(&actor(), &ssid("Home")).await.unwrap_err();
    match &err {
        WifiError::Apply { step, restored, .. } => {
            assert_eq!((*step, *restored), ("uci batch", false));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("intact"), "{err}");
    assert_eq!(r.uci.export("wireless").await.unwrap(), EXPORT);
    assert!(!r.uci.has_staged("wireless"));
    assert!(r.wifi.reloads().is_empty(), "nothing to reload");
    let c = svc.latest_change().unwrap().unwrap();
    assert_eq!(c.state, State::Failed);
    // Nothing changed: not pending, so the next change is accepted.
    svc.change(&actor(), &ssid("Home")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failing_reload_restores_the_snapshot() {
    let r = router();
    let agent = r.start(config());
    r.wifi.set_failing(true);
    let err = agent.svc.change(&actor(), &ssid("Home")).await.unwrap_err();
    match &err {
        WifiError::Apply { step, restored, .. } => {
            assert_eq!((*step, *restored), ("wifi reload", true));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(r.uci.export("wireless").await.unwrap(), EXPORT);
    let c = until(&agent.svc, |c| c.reported).await;
    assert_eq!(c.state, State::RolledBack);
    assert!(c.outcome.unwrap().contains("wifi reload failed"));
    assert_eq!(r.reporter.delivered()[0].state, "rolled_back");
    agent.kill().await;
}

#[tokio::test(start_paused = true)]
async fn unchanged_requests_and_bad_radios_touch_nothing() {
    let r = router();
    let svc = r.service(config());
    let same = svc.change(&actor(), &ssid("OpenWrt")).await.unwrap();
    assert!(!same.changed && same.change.is_none());
    let err = svc
        .change(
            &actor(),
            &Request::Enable {
                radio: Some("radio9".into()),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(&err, WifiError::Invalid(i) if i.code == ErrorCode::UnknownRadio));
    assert_eq!(r.uci.commits(), 0);
    assert!(r.wifi.reloads().is_empty());
    assert!(svc.latest_change().unwrap().is_none());
    // Staged leftovers (an unfinished LuCI edit) are dropped, not committed.
    r.uci
        .stage(
            "wireless",
            &[crate::system::uci::UciCmd::set(
                "wireless.guest.ssid",
                "LuCI",
            )],
        )
        .unwrap();
    svc.change(&actor(), &ssid("Home")).await.unwrap();
    assert_eq!(r.ssid("guest").as_deref(), Some("Guest"));
}

#[tokio::test(start_paused = true)]
async fn status_reports_radios_interfaces_clients_and_the_change() {
    let r = router();
    r.wifi.set_clients(
        "default_radio0",
        &["02:00:00:00:01:02", "02:00:00:00:01:03"],
    );
    let svc = r.service(config());
    let st = svc.status().await.unwrap();
    assert_eq!(st.clients, 2);
    assert_eq!(st.radios[0].interfaces[0].clients, Some(2));
    assert_eq!(st.radios[0].up, Some(true));
    assert!(st.change.is_none());
    // Without netifd the configuration still answers, with the reason.
    r.ubus.remove("network.wireless");
    let st = svc.status().await.unwrap();
    assert!(st.runtime_error.unwrap().contains("not found"));
    assert_eq!(st.radios[1].interfaces[0].ssid.as_deref(), Some("OpenWrt"));
}

/// Collects everything the agent logs while it runs.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_password_never_reaches_logs_errors_audit_reports_or_answers() {
    use tracing_subscriber::prelude::*;
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
    );
    let _guard = tracing::subscriber::set_default(subscriber);

    const SECRET: &str = "Tr0ub4dor&3-horse";
    let mut seen = Vec::new();
    let r = router();
    let agent = r.start(config());
    let req = |p: &str, interface: Option<&str>| Request::Password {
        password: Password::parse(p).unwrap(),
        radio: None,
        interface: interface.map(str::to_owned),
    };
    seen.push(format!("{:?}", req(SECRET, None)));

    // Refused: the open guest AP takes no password.
    let e = agent
        .svc
        .change(&actor(), &req(SECRET, Some("guest")))
        .await
        .unwrap_err();
    seen.push(format!("{e} {e:?}"));
    // uci failing halfway through a password change.
    r.uci.fail_batch_at(Some(1));
    let e = agent
        .svc
        .change(&actor(), &req(SECRET, None))
        .await
        .unwrap_err();
    seen.push(format!("{e} {e:?}"));
    // A failing reload, then the rollback.
    r.wifi.set_failing(true);
    let e = agent
        .svc
        .change(&actor(), &req(SECRET, None))
        .await
        .unwrap_err();
    seen.push(format!("{e} {e:?}"));
    until(&agent.svc, |c| c.reported).await;
    r.wifi.set_failing(false);
    // Applied and confirmed.
    let ok = agent
        .svc
        .change(&actor(), &req(SECRET, None))
        .await
        .unwrap();
    seen.push(serde_json::to_string(&ok).unwrap());
    until(&agent.svc, |c| c.state == State::Confirmed).await;
    seen.push(serde_json::to_string(&agent.svc.status().await.unwrap()).unwrap());
    // Bad input straight from the caller.
    for bad in [format!("{SECRET}\n"), format!("{SECRET}{}", "x".repeat(60))] {
        let e = Password::parse(&bad).unwrap_err();
        seen.push(format!("{e} {e:?}"));
    }

    // It was set (so the test would see it if it leaked)…
    let key = r.uci.committed("wireless")[2].get("key").map(str::to_owned);
    assert_eq!(key.as_deref(), Some(SECRET));
    // …and is nowhere else.
    let audit = agent.svc.store().audit_tail(100).unwrap();
    assert!(audit.len() >= 5);
    seen.push(serde_json::to_string(&audit).unwrap());
    seen.push(format!("{:?}", r.reporter.delivered()));
    let rows: Vec<String> = {
        let mut store = agent.svc.store();
        let conn = store.conn_mut();
        let mut st = conn
            .prepare("SELECT action, detail, outcome, snapshot FROM wifi_changes")
            .unwrap();
        st.query_map([], |row| {
            Ok(format!(
                "{} {} {:?} {}",
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, String>(3)?
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    seen.extend(rows);
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("applying Wi-Fi change"),
        "logs captured: {logged}"
    );
    seen.push(logged);
    for text in &seen {
        assert!(!text.contains(SECRET), "the password leaked: {text}");
    }
    // The old key is in no answer either (status never shows keys).
    assert!(!seen[5].contains("changeme123"));
    agent.kill().await;
}

// Real time: the real uci is a process, and paused time would fire its timeout.
#[tokio::test]
async fn safe_apply_over_the_real_uci_commits_quotes_and_restores_the_file() {
    let rig = crate::system::uci::tests::real_rig();
    let r = router();
    r.reporter.set_reachable(false);
    let svc = Arc::new(WifiService::new(
        Arc::new(rig.uci.clone_config()),
        Arc::new(r.wifi.clone()),
        Arc::new(r.ubus.clone()),
        Arc::new(r.reporter.clone()),
        Store::open(&r.dir).unwrap(),
        WifiConfig {
            grace: Duration::from_secs(2),
            settle: Duration::ZERO,
            retry: Duration::from_millis(200),
        },
        crate::runtime::clock::system_clock(),
    ));
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(svc.clone().run(rx));
    let file = rig.dir.join("config/wireless");
    let before = std::fs::read_to_string(&file).unwrap();
    svc.change(&actor(), &ssid("it's \"home\" 🚀"))
        .await
        .unwrap();
    let applied = rig.uci.export("wireless").await.unwrap();
    assert!(
        applied.contains("option ssid 'it'\\''s \"home\" 🚀'"),
        "{applied}"
    );
    until(&svc, |c| c.state == State::RolledBack).await;
    assert_eq!(rig.uci.export("wireless").await.unwrap(), EXPORT);
    assert_ne!(std::fs::read_to_string(&file).unwrap(), "");
    assert_eq!(
        crate::uci_format::parse(&std::fs::read_to_string(&file).unwrap()).unwrap(),
        crate::uci_format::parse(&before).unwrap()
    );
    let _ = stop.send(true);
    task.abort();
}

/// Disable then enable a radio over the real uci: the file ends with no
/// `disabled` option at all (as LuCI leaves it), not `disabled '0'`.
#[tokio::test]
async fn enabling_a_radio_over_the_real_uci_deletes_disabled_like_luci() {
    use super::model::{plan, Wireless};
    let rig = crate::system::uci::tests::real_rig();
    let file = rig.dir.join("config/wireless");
    let radio1 = || Some("radio1".to_owned());
    let w = Wireless::parse(&rig.uci.export("wireless").await.unwrap()).unwrap();
    let off = plan(&w, &Request::Disable { radio: radio1() }).unwrap();
    rig.uci.apply("wireless", &off.cmds).await.unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("option disabled '1'"), "{text}");

    let w = Wireless::parse(&rig.uci.export("wireless").await.unwrap()).unwrap();
    assert!(!w.radio("radio1").unwrap().enabled);
    let on = plan(&w, &Request::Enable { radio: radio1() }).unwrap();
    rig.uci.apply("wireless", &on.cmds).await.unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("disabled"), "{text}");
    assert_eq!(rig.uci.export("wireless").await.unwrap(), EXPORT);
    assert_eq!(
        crate::uci_format::parse(&text).unwrap(),
        crate::uci_format::parse(FIXTURE).unwrap()
    );
}
