//! Wi-Fi end to end through the real relay and agent binaries (the agent in
//! `--simulate`, whose uci, `wifi`, netifd and hostapd are in memory): status, SSID,
//! password, enable/disable, each confirmed by a real report to the relay; the bad
//! inputs of issue 5 answered 400 with their codes; and a change rolled back by the
//! agent while the relay is down, reported once it is back.

use std::time::Duration;

use netpilot_tests::{eventually, ApiRig, Reply, Session};
use serde_json::{json, Value};

/// Short safe-apply timings; the settle delay keeps a change pending long enough
/// to see the 409 for a second one.
const SAFE: [&str; 7] = [
    "--simulate",
    "--wifi-grace",
    "10s",
    "--wifi-settle",
    "1s",
    "--wifi-retry",
    "200ms",
];

/// Alice's session, with the Wi-Fi calls these tests repeat.
struct Api(Session);

impl Api {
    async fn status(&self) -> Reply {
        self.0.get("/api/wifi/status").await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.0.post(path, body).await
    }

    /// The latest change's state, once it satisfies `pred`.
    async fn change_until(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(Duration::from_secs(20), what, || async {
            let r = self.status().await;
            let c = r.body["data"]["change"].clone();
            pred(&c).then_some(c)
        })
        .await
        .unwrap()
    }

    /// Posts a change, checks it is pending, and waits for its confirmation.
    async fn confirmed(&self, path: &str, body: Value) -> Value {
        let r = self.post(path, body).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let change = &r.body["data"]["change"];
        assert_eq!(change["state"], "pending", "{}", r.body);
        let id = change["id"].as_str().unwrap().to_owned();
        let done = self
            .change_until("confirmation", |c| {
                c["id"] == json!(id) && c["state"] == "confirmed"
            })
            .await;
        assert_eq!(done["reported"], true);
        r.body
    }
}

async fn api(args: &[&str]) -> (Api, ApiRig) {
    let rig = ApiRig::builder().agent_args(args).start().await.unwrap();
    (Api(rig.session("alice").await.unwrap()), rig)
}

fn iface(status: &Value, radio: usize, i: usize) -> &Value {
    &status["data"]["radios"][radio]["interfaces"][i]
}

#[tokio::test]
async fn status_ssid_password_enable_disable_round_trip() {
    let (api, rig) = api(&SAFE).await;
    let (relay, router) = (&rig.relay, &rig.router);
    let st = api.status().await;
    assert_eq!(st.status, 200, "{}", st.body);
    let radios = st.body["data"]["radios"].as_array().unwrap();
    assert_eq!(radios.len(), 2);
    assert_eq!(radios[1]["band"], "5g");
    assert_eq!(iface(&st.body, 0, 0)["ssid"], "NetPilot-Sim");
    assert_eq!(iface(&st.body, 0, 0)["ifname"], "phy0-ap0");
    assert_eq!(iface(&st.body, 0, 0)["has_password"], true);
    assert_eq!(st.body["data"]["clients"], 3);
    let raw = String::from_utf8_lossy(&st.raw).into_owned();
    assert!(!raw.contains("simulated-only"), "the key leaked: {raw}");

    let ssid = "Home \"base\" ☕";
    api.confirmed("/api/wifi/ssid", json!({"ssid": ssid})).await;
    let st = api.status().await;
    assert_eq!(iface(&st.body, 0, 0)["ssid"], ssid);
    assert_eq!(iface(&st.body, 1, 0)["ssid"], ssid);

    let secret = "correct-horse-battery";
    let r = api
        .confirmed(
            "/api/wifi/password",
            json!({"password": secret, "radio": "radio0"}),
        )
        .await;
    assert_eq!(r["data"]["targets"], json!(["default_radio0"]));
    // A second change while one is pending is refused.
    let first = api
        .post("/api/wifi/disable", json!({"radio": "radio1"}))
        .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let second = api.post("/api/wifi/enable", json!({})).await;
    assert_eq!(second.status, 409, "{}", second.body);
    assert_eq!(second.code(), "CHANGE_PENDING");
    api.change_until("disable confirmed", |c| c["state"] == "confirmed")
        .await;
    let st = api.status().await;
    let r1 = &st.body["data"]["radios"][1];
    assert_eq!(
        (r1["enabled"].clone(), r1["up"].clone()),
        (json!(false), json!(false))
    );
    assert_eq!(iface(&st.body, 1, 0)["clients"], 0);
    api.confirmed("/api/wifi/enable", json!({"radio": "radio1"}))
        .await;
    let st = api.status().await;
    assert_eq!(st.body["data"]["radios"][1]["up"], true);
    // Asking for what already is: nothing applied, nothing pending.
    let same = api.post("/api/wifi/enable", json!({})).await;
    assert_eq!(same.body["data"]["changed"], false, "{}", same.body);

    // The relay received the confirmations as reports.
    let admin = relay
        .client()
        .await
        .unwrap()
        .get(&format!("/api/admin/routers/{}", router.router_id))
        .await
        .unwrap();
    let reports = admin.body["data"]["recent_reports"].as_array().unwrap();
    assert!(
        reports
            .iter()
            .filter(|r| r["kind"] == "wifi_change" && r["state"] == "confirmed")
            .count()
            >= 4,
        "{}",
        admin.body
    );
    assert!(!admin.body.to_string().contains(secret));
    assert!(!relay.log().contains(secret));
    let agent_log = std::fs::read_to_string(router.state_dir.parent().unwrap().join("agent.log"))
        .unwrap_or_default();
    assert!(agent_log.contains("Wi-Fi change confirmed"), "{agent_log}");
    assert!(
        !agent_log.contains(secret),
        "the password is in the agent's log"
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_its_code() {
    let (api, _rig) = api(&SAFE).await;
    let cases = [
        (
            "/api/wifi/ssid",
            json!({"ssid": "Home\nNet"}),
            "INVALID_SSID",
        ),
        (
            "/api/wifi/ssid",
            json!({"ssid": "x".repeat(33)}),
            "INVALID_SSID",
        ),
        (
            "/api/wifi/ssid",
            json!({"ssid": "🚀🚀🚀🚀🚀🚀🚀🚀a"}),
            "INVALID_SSID",
        ),
        ("/api/wifi/ssid", json!({"ssid": ""}), "INVALID_SSID"),
        (
            "/api/wifi/ssid",
            json!({"ssid": "Home", "radio": "radio9"}),
            "UNKNOWN_RADIO",
        ),
        (
            "/api/wifi/ssid",
            json!({"ssid": "Home", "interface": "nosuch"}),
            "UNKNOWN_INTERFACE",
        ),
        (
            "/api/wifi/password",
            json!({"password": "seven77"}),
            "INVALID_PASSWORD",
        ),
        (
            "/api/wifi/password",
            json!({"password": "z".repeat(64)}),
            "INVALID_PASSWORD",
        ),
        (
            "/api/wifi/password",
            json!({"password": "pass\u{1}word"}),
            "INVALID_PASSWORD",
        ),
        // radio1 is WPA2/WPA3 (sae-mixed): no 64-hex form.
        (
            "/api/wifi/password",
            json!({"password": "ab".repeat(32), "radio": "radio1"}),
            "INVALID_PASSWORD",
        ),
        (
            "/api/wifi/enable",
            json!({"radio": "radio9"}),
            "UNKNOWN_RADIO",
        ),
        (
            "/api/wifi/disable",
            json!({"radio": 1}),
            "INVALID_PARAMETER",
        ),
    ];
    for (path, body, code) in cases {
        let r = api.post(path, body.clone()).await;
        assert_eq!(
            (r.status, r.code()),
            (400, code),
            "{path} {body}: {}",
            r.body
        );
    }
    // An SSID of emoji within 32 bytes and a quote are fine.
    let ok = api
        .post(
            "/api/wifi/ssid",
            json!({"ssid": "🚀🚀🚀🚀🚀🚀🚀🚀", "radio": "radio1"}),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    // Nothing of the refused calls was applied.
    let st = api.status().await;
    assert_eq!(iface(&st.body, 0, 0)["ssid"], "NetPilot-Sim");
}

#[tokio::test]
async fn a_change_the_relay_never_confirms_is_rolled_back_and_reported_later() {
    let (api, mut rig) = api(&[
        "--simulate",
        "--wifi-grace",
        "2s",
        "--wifi-settle",
        "1s",
        "--wifi-retry",
        "200ms",
    ])
    .await;
    let r = api.post("/api/wifi/ssid", json!({"ssid": "Lost"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.body["data"]["change"]["id"].as_str().unwrap().to_owned();
    // The relay goes away before the first confirmation attempt (1 s settle).
    rig.relay.kill().await;
    let log = rig.router.state_dir.parent().unwrap().join("agent.log");
    eventually(Duration::from_secs(20), "the agent's rollback", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("not confirmed in time; rolling back")
            .then_some(())
    })
    .await
    .unwrap();
    rig.relay.restart().await.unwrap();
    rig.relay
        .wait_online(rig.router_id(), true, Duration::from_secs(20))
        .await
        .unwrap();
    let api = Api(rig.session("alice").await.unwrap());
    let done = api
        .change_until("the rollback, reported", |c| {
            c["state"] == "rolled_back" && c["reported"] == true
        })
        .await;
    assert_eq!(done["id"], json!(id));
    let st = api.status().await;
    assert_eq!(iface(&st.body, 0, 0)["ssid"], "NetPilot-Sim");
    let admin = api
        .0
        .client
        .get(&format!("/api/admin/routers/{}", rig.router_id()))
        .await
        .unwrap();
    let reports = admin.body["data"]["recent_reports"].as_array().unwrap();
    assert!(
        reports
            .iter()
            .any(|r| r["id"] == json!(id) && r["state"] == "rolled_back"),
        "{}",
        admin.body
    );
}
