//! Device usage end to end through the real relay and agent binaries: the simulated
//! router's nlbwmon for every endpoint's shape and the bad-input answers, and
//! stand-in `nlbw` programs (`--nlbw`) for a daemon that is down (503), one that
//! prints truncated JSON (502) and one whose protocol list is missing (503
//! `NLBWMON_MISCONFIGURED`).

use netpilot_tests::{fake_nlbw, ApiRig};
use serde_json::Value;

#[tokio::test]
async fn every_usage_endpoint_answers_with_its_shape_on_the_simulated_router() {
    let rig = ApiRig::simulated().await.unwrap();
    let alice = rig.session("alice").await.unwrap();

    let r = alice.get("/api/device-usage/current").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let d = &r.body["data"];
    assert_eq!(d["total_devices"], 5, "{d}");
    assert!(d["timestamp"].as_u64().unwrap() > 1_700_000_000);
    let devices = d["devices"].as_array().unwrap();
    let sum: u64 = devices
        .iter()
        .map(|x| x["total_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(d["total_bytes"].as_u64().unwrap(), sum);
    let tv = &devices[0];
    assert_eq!(tv["hostname"], "living-room-tv", "most traffic first: {d}");
    assert_eq!(tv["ip"], "192.168.1.104");
    for k in ["bytes_rx", "bytes_tx", "connections"] {
        assert!(tv[k].as_u64().unwrap() > 0, "{k} in {tv}");
    }
    assert_eq!(tv["top_protocols"][0]["name"], "HTTPS");
    assert!(tv.get("last_seen").is_some());

    let r = alice
        .get("/api/device-usage/current?limit=2&offset=1")
        .await;
    assert_eq!(r.body["data"]["devices"].as_array().unwrap().len(), 2);
    assert_eq!(r.body["data"]["total_devices"], 5);

    let r = alice
        .get("/api/device-usage/device/3C-A9-F4-00-01-01")
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["device"]["mac"], "3c:a9:f4:00:01:01");
    assert_eq!(r.body["data"]["device"]["hostname"], "alice-laptop");
    assert_eq!(r.body["data"]["device"]["name"], "alice-laptop");
    assert_eq!(r.body["data"]["device"]["name_source"], "hostname");
    assert_eq!(r.body["data"]["device"]["randomized"], false);

    let r = alice.get("/api/device-usage/status").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = &r.body["data"];
    assert_eq!(
        (s["installed"].clone(), s["running"].clone()),
        (Value::Bool(true), Value::Bool(true))
    );
    assert_eq!(s["database_directory"], "/var/lib/nlbwmon");
    assert_eq!(s["refresh_interval"], "30s");
    assert_eq!(s["current_period"], "2026-11-01");

    let r = alice.get("/api/device-usage/history?days=7").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let h = &r.body["data"];
    assert_eq!(h["days"], 7);
    assert_eq!(h["devices"].as_array().unwrap().len(), 5);
    assert!(h["devices"][0]["days"][0]["date"].as_str().unwrap().len() == 10);

    let r = alice
        .get("/api/device-usage/history?days=7&format=csv")
        .await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.raw.to_vec()).unwrap();
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    // The agent's columns, then the vendor column the relay appends (issue 17).
    assert_eq!(
        text.lines().next(),
        Some("date,mac,hostname,bytes_rx,bytes_tx,total_bytes,name,name_source,randomized,vendor")
    );
    assert_eq!(text.lines().count(), 6, "{text}");
    let tv = text
        .lines()
        .find(|l| l.contains("64:95:6c:00:01:04"))
        .unwrap();
    assert!(
        tv.ends_with(",living-room-tv,hostname,false,LG Electronics"),
        "{tv}"
    );
    let phone = text
        .lines()
        .find(|l| l.contains("02:00:00:00:01:02"))
        .unwrap();
    // A random MAC names no maker: the vendor column is empty.
    assert!(phone.ends_with(",bob-phone,hostname,true,"), "{phone}");

    let r = alice.get("/api/device-usage/summary?days=7").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = &r.body["data"];
    assert_eq!(s["period_days"], 7);
    assert!(s["total_bytes"].as_u64().unwrap() > 0);
    assert_eq!(s["top_devices"][0]["hostname"], "living-room-tv");
    assert_eq!(s["top_devices"][0]["name"], "living-room-tv");
    assert_eq!(s["top_devices"][0]["randomized"], false);
    assert!(s["top_devices"][0]["percentage"].as_f64().unwrap() > 20.0);
    assert_eq!(s["daily_totals"].as_array().unwrap().len(), 1);

    for bad in [
        "/api/device-usage/history?days=0",
        "/api/device-usage/history?days=100000",
        "/api/device-usage/history?days=seven",
        "/api/device-usage/history?format=xml",
        "/api/device-usage/summary?days=366",
        "/api/device-usage/current?limit=0",
        "/api/device-usage/current?offset=-1",
        "/api/device-usage/device/not-a-mac",
        "/api/device-usage/device/ff:ff:ff:ff:ff:ff",
    ] {
        let r = alice.get(bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    let r = alice
        .get("/api/device-usage/device/02:00:00:00:09:09")
        .await;
    assert_eq!(
        (r.status, r.code()),
        (404, "DEVICE_NOT_FOUND"),
        "{}",
        r.body
    );

    // keepHistory: null is refused, not read as absent (which clears the history);
    // the reset below still finds both files to remove.
    let r = alice
        .post(
            "/api/device-usage/reset",
            serde_json::json!({"keepHistory": null}),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (400, "INVALID_PARAMETER"),
        "{}",
        r.body
    );
    let r = alice
        .post("/api/device-usage/reset", serde_json::json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["running"], true);
    assert_eq!(r.body["data"]["history_cleared"], true);
    assert_eq!(
        r.body["data"]["removed_files"],
        serde_json::json!(["/var/lib/nlbwmon/20261101.db.gz", "/tmp/0.db"])
    );
    let r = alice.get("/api/device-usage/current").await;
    let after = r.body["data"]["total_bytes"].as_u64().unwrap();
    assert!(
        after < sum,
        "counters start again after the reset: {after} vs {sum}"
    );
}

#[tokio::test]
async fn nlbwmon_down_is_503_and_truncated_output_is_502() {
    let dir = tempfile::tempdir().unwrap();
    let down = fake_nlbw(dir.path(), netpilot_tests::NLBW_DOWN);
    let rig = ApiRig::builder()
        .agent_args(&["--simulate", "--nlbw", &down])
        .start()
        .await
        .unwrap();
    let alice = rig.session("alice").await.unwrap();
    for path in [
        "/api/device-usage/current",
        "/api/device-usage/device/02:00:00:00:01:01",
        "/api/device-usage/history?days=7",
        "/api/device-usage/summary",
    ] {
        let r = alice.get(path).await;
        assert_eq!(
            (r.status, r.code()),
            (503, "NLBWMON_UNAVAILABLE"),
            "{path}: {}",
            r.body
        );
        assert!(r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nlbwmon"));
    }
    let r = alice.get("/api/device-usage/status").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"]["installed"], true);
    assert_eq!(r.body["data"]["running"], false);

    let dir2 = tempfile::tempdir().unwrap();
    let cut = fake_nlbw(
        dir2.path(),
        "[ \"$1\" = -p ] && shift 2\ncase \"$*\" in\n'-c list') echo 2026-11-01 ;;\n*) printf '{\"columns\":[\"mac\",\"rx_bytes\"' ;;\nesac\n",
    );
    let rig = ApiRig::builder()
        .agent_args(&["--simulate", "--nlbw", &cut])
        .start()
        .await
        .unwrap();
    let alice = rig.session("alice").await.unwrap();
    let r = alice.get("/api/device-usage/current").await;
    assert_eq!(
        (r.status, r.code()),
        (502, "NLBWMON_BAD_OUTPUT"),
        "{}",
        r.body
    );
}

/// The simulated router's `/etc/config/nlbwmon` names nlbwmon's usual protocol
/// list, `/usr/share/nlbwmon/protocols`, which the stand-in's router (a temp
/// directory) lacks. A stand-in that
/// reads `-p` as the real client does (client.c: `Unable to read protocol list`,
/// exit 1, before any command) makes it a configuration error, and the status still
/// says the daemon runs.
#[tokio::test]
async fn a_missing_protocol_list_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("argv");
    // The router has /dev/null (the agent's probe while the list is unreadable).
    std::fs::create_dir_all(dir.path().join("router/dev")).unwrap();
    std::fs::write(dir.path().join("router/dev/null"), "").unwrap();
    let nlbw = fake_nlbw(
        dir.path(),
        &format!(
            "echo \"$*\" >> {seen}\n\
             if [ \"$1\" = -p ]; then\n\
             [ -r \"{root}$2\" ] || {{ echo \"Unable to read protocol list $2: No such file or directory\" >&2; exit 1; }}\n\
             shift 2\n\
             fi\n\
             case \"$*\" in\n'-c list') echo 2026-11-01 ;;\n*) exit 3 ;;\nesac\n",
            seen = seen.display(),
            // The router's files are under the temp directory, whatever this
            // machine has in /usr/share.
            root = dir.path().join("router").display(),
        ),
    );
    let rig = ApiRig::builder()
        .agent_args(&["--simulate", "--nlbw", &nlbw])
        .start()
        .await
        .unwrap();
    let alice = rig.session("alice").await.unwrap();
    let r = alice.get("/api/device-usage/current").await;
    assert_eq!(
        (r.status, r.code()),
        (503, "NLBWMON_MISCONFIGURED"),
        "{}",
        r.body
    );
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/usr/share/nlbwmon/protocols"));
    let r = alice.get("/api/device-usage/status").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = &r.body["data"];
    assert_eq!(s["running"], true, "{s}");
    assert_eq!(s["error_code"], "NLBWMON_MISCONFIGURED", "{s}");
    assert_eq!(s["protocol_database"], "/usr/share/nlbwmon/protocols");
    assert_eq!(s["current_period"], "2026-11-01");
    let argv = std::fs::read_to_string(&seen).unwrap();
    assert!(
        argv.lines()
            .any(|l| l == "-p /usr/share/nlbwmon/protocols -c list"),
        "{argv}"
    );
}
