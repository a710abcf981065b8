//! DNS filtering enforced for real, proven by DNS answers and connections: the real
//! agent in the router namespace runs real dnsmasq resolvers for filtered groups;
//! the WAN namespace has its own resolver (answering every name with the WAN host's
//! address), a DoT port, and HTTPS servers (openssl) on an ordinary address and on
//! a listed DoH address. Clients ask with dig and curl. Needs root, nft, tc,
//! dnsmasq, dig, curl, openssl and ss (`tests/run` installs them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netpilot_tests::lab::{Lab, Netns, Probe, C1_MAC, LAN_IF, ROUTER_LAN, WAN_HOST, WAN_IF};
use netpilot_tests::ApiRig;
use serde_json::{json, Value};

/// A second WAN address, listed as a DoH server in the test's DoH list.
const DOH_ADDR: &str = "10.77.0.3";

struct Rig {
    netpilot: ApiRig,
    lab: Lab,
    dns_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The agent's resolvers outlive the agent by design (filtering holds across its
/// restarts); a test stops them itself, whatever happened.
impl Drop for Rig {
    fn drop(&mut self) {
        for pid in resolver_pids(&self.dns_dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A process that exists and has not exited: a daemon's exit leaves a zombie until
/// whoever adopted it reaps it, which is not ours to wait for.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn resolver_pids(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

async fn rig() -> Rig {
    netpilot_testkit::require(&["nft", "tc", "dnsmasq", "dig", "curl", "openssl", "ss"]);
    let lab = Lab::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let w = &lab.wan;
    lab.exec(
        w,
        &[
            "ip",
            "addr",
            "add",
            &format!("{DOH_ADDR}/24"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    // The "internet's" resolver: every name is the WAN host.
    lab.spawn(
        w,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={WAN_HOST}"),
            &format!("--address=/#/{WAN_HOST}"),
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
        ],
    )
    .unwrap();
    lab.wait_listening(w, 53).unwrap();
    // HTTPS on the ordinary address and on the DoH address.
    let key = tmp.path().join("key.pem");
    let cert = tmp.path().join("cert.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=wan.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl req: {out:?}");
    for addr in [WAN_HOST, DOH_ADDR] {
        lab.spawn(
            w,
            &[
                "openssl",
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &format!("{addr}:443"),
                "-cert",
                cert.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
            ],
        )
        .unwrap();
    }
    lab.wait_listening(w, 443).unwrap();
    lab.listen_on(w, WAN_HOST, 853).unwrap();

    let doh = tmp.path().join("doh.txt");
    std::fs::write(
        &doh,
        format!("# the test's DoH servers\ndoh.test\n{DOH_ADDR}\n"),
    )
    .unwrap();
    let dns_dir = tmp.path().join("dns");
    let dns_dir_arg = dns_dir.to_str().unwrap().to_owned();
    let doh_arg = doh.to_str().unwrap().to_owned();
    let netpilot = ApiRig::builder()
        .in_lab(&lab)
        .agent_args(&[
            "--check-interval",
            "300ms",
            "--dns-upstream",
            WAN_HOST,
            "--dns-dir",
            &dns_dir_arg,
            "--doh-list",
            &doh_arg,
        ])
        .start()
        .await
        .unwrap();
    Rig {
        netpilot,
        lab,
        dns_dir,
        _tmp: tmp,
    }
}

/// What dig saw: the response code and the A records.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: String,
    a: Vec<String>,
}

impl Rig {
    fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        self.lab
            .api(self.netpilot.local_api(), method, path, Some(&body))
            .unwrap()
    }

    fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, v) = self.call(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["data"].clone()
    }

    /// A request whose body the agent may stop reading: written from another
    /// thread (its write errors once the agent answers and closes are expected),
    /// while this one reads the answer.
    fn raw_put(&self, path: &str, body: String) -> String {
        use std::io::{Read, Write};
        let mut s = self
            .lab
            .connect(
                &self.lab.router,
                self.netpilot.local_api(),
                Duration::from_secs(5),
            )
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let writer = std::thread::spawn(move || {
            let _ = w
                .write_all(head.as_bytes())
                .and_then(|_| w.write_all(body.as_bytes()));
        });
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let _ = writer.join();
        String::from_utf8_lossy(&raw).into_owned()
    }

    fn dig(&self, ns: &Netns, server: &str, name: &str, tcp: bool) -> Answer {
        let mut argv = vec!["dig", "+tries=1", "+time=2", "+nocookie"];
        if tcp {
            argv.push("+tcp");
        }
        let at = format!("@{server}");
        argv.extend([at.as_str(), name, "A"]);
        let out = self
            .lab
            .exec(ns, &argv)
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let status = out
            .split("status: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .unwrap_or_else(|| panic!("no status in dig output: {out}"))
            .to_owned();
        let a = out
            .lines()
            .filter(|l| !l.starts_with(';') && l.contains("\tA\t"))
            .filter_map(|l| l.split_whitespace().last())
            .map(str::to_owned)
            .collect();
        Answer { status, a }
    }

    fn blocked(&self, ns: &Netns, server: &str, name: &str, tcp: bool) -> bool {
        let a = self.dig(ns, server, name, tcp);
        match a.status.as_str() {
            "NXDOMAIN" => true,
            "NOERROR" if a.a == [WAN_HOST] => false,
            _ => panic!(
                "{name} via {server} (tcp {tcp}) from {}: unexpected {a:?}",
                ns.name()
            ),
        }
    }

    /// DNS answers change when the resolver has re-read its list; waits for that
    /// event as the client sees it.
    fn wait_blocked(&self, ns: &Netns, name: &str, want: bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.blocked(ns, WAN_HOST, name, false) != want {
            assert!(
                Instant::now() < deadline,
                "{name} never became blocked={want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// curl's exit code for an HTTPS request from `ns` to `ip`: 0 answered,
    /// 7 connection refused.
    fn https(&self, ns: &Netns, ip: &str) -> i32 {
        let st = ns
            .command("curl")
            .args(["-sk", "-o", "/dev/null", "--max-time", "5"])
            .arg(format!("https://{ip}/"))
            .status()
            .unwrap();
        st.code().unwrap_or(-1)
    }
}

fn kids(policy_dns: Value) -> Value {
    json!({"group": {"id": 3, "name": "Kids", "devices": [{"mac": C1_MAC}],
        "policy": {"internet": "allow", "dns": policy_dns}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_a_filtered_group_cannot_resolve_or_bypass_its_blocked_names_and_others_can() {
    let rig = rig().await;
    let (c1, c2) = (&rig.lab.c1, &rig.lab.c2);
    // Unfiltered to begin with: everything resolves, DoT and DoH connect.
    assert!(!rig.blocked(c1, WAN_HOST, "facebook.com", false));
    assert_eq!(rig.https(c1, DOH_ADDR), 0);

    let v = rig.ok(
        "POST",
        "/api/groups/sync",
        kids(
            json!({"categories": ["social"], "blockDomains": ["Blocked.TEST."],
            "allowDomains": ["ok.blocked.test"]}),
        ),
    );
    assert_eq!(v["group"]["policy"]["dns"]["filtering"], true, "{v}");
    assert_eq!(
        v["group"]["policy"]["dns"]["block_domains"],
        json!(["blocked.test"]),
        "normalised"
    );

    for tcp in [false, true] {
        // Whatever resolver the client asks: the WAN one directly, or the router.
        for server in [WAN_HOST, ROUTER_LAN] {
            for name in [
                "blocked.test",
                "www.sub.blocked.test",
                "facebook.com",
                "m.facebook.com",
            ] {
                assert!(
                    rig.blocked(c1, server, name, tcp),
                    "{name} via {server} tcp={tcp}"
                );
            }
            assert!(
                !rig.blocked(c1, server, "ok.blocked.test", tcp),
                "allowed wins"
            );
            assert!(
                !rig.blocked(c1, server, "a.ok.blocked.test", tcp),
                "allowed covers subdomains"
            );
            assert!(!rig.blocked(c1, server, "example.org", tcp));
        }
        // Firefox's canary, and the DoH names of the list.
        assert!(rig.blocked(c1, WAN_HOST, "use-application-dns.net", tcp));
        assert!(rig.blocked(c1, WAN_HOST, "doh.test", tcp));
        // The unfiltered device is untouched.
        assert!(!rig.blocked(c2, WAN_HOST, "blocked.test", tcp));
        assert!(!rig.blocked(c2, WAN_HOST, "facebook.com", tcp));
    }

    // DoT refused; HTTPS to the listed DoH address refused, ordinary HTTPS works.
    let dot: SocketAddr = format!("{WAN_HOST}:853").parse().unwrap();
    assert_eq!(rig.lab.probe(c1, dot), Probe::Refused);
    assert_eq!(rig.lab.probe(c2, dot), Probe::Open);
    assert_eq!(rig.https(c1, DOH_ADDR), 7, "DoH address refused");
    assert_eq!(rig.https(c1, WAN_HOST), 0, "ordinary HTTPS works");
    assert_eq!(rig.https(c2, DOH_ADDR), 0, "unfiltered group reaches DoH");

    // A category list replaced through the API takes effect in the running
    // resolver: reloaded, not restarted, and the agent keeps running.
    let before = resolver_pids(&rig.dns_dir);
    assert_eq!(before.len(), 1, "one resolver for the one filtered group");
    assert!(!rig.blocked(c1, WAN_HOST, "newsocial.test", false));
    let v = rig.ok(
        "PUT",
        "/api/dns/categories/social",
        json!({"list": "# replaced\nnewsocial.test\n0.0.0.0 tracker.newsocial.test\n"}),
    );
    assert_eq!(v["category"]["domains"], 2, "{v}");
    rig.wait_blocked(c1, "newsocial.test", true);
    rig.wait_blocked(c1, "facebook.com", false);
    assert_eq!(resolver_pids(&rig.dns_dir), before, "reloaded in place");

    // Uninstalling (`cleanup`) stops the resolvers the agent left running; the
    // running agent sees that as drift and starts its resolver again.
    let agent_bin = netpilot_tests::binary("netpilot-agent");
    let dir_arg = rig.dns_dir.to_str().unwrap().to_owned();
    let out = rig
        .lab
        .exec(
            &rig.lab.router,
            &[
                agent_bin.to_str().unwrap(),
                "cleanup",
                "--lan-if",
                LAN_IF,
                "--wan-if",
                WAN_IF,
                "--dns-dir",
                &dir_arg,
            ],
        )
        .unwrap();
    assert!(out.contains("removed DNS filter resolver"), "{out}");
    assert!(
        !before.iter().any(|p| alive(*p)),
        "cleanup waits for the resolver to exit"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        let now = resolver_pids(&rig.dns_dir);
        if now.len() == 1 && now != before && alive(now[0]) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not restart its resolver"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    rig.wait_blocked(c1, "newsocial.test", true);

    // Filtering off: the resolver goes, names resolve again.
    rig.ok("POST", "/api/groups/sync", kids(json!(null)));
    rig.wait_blocked(c1, "blocked.test", false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while before.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "the unused resolver was not stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rig.lab.probe(c1, dot), Probe::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_bad_domains_and_lists_are_refused_with_reasons_and_nothing_changes() {
    let rig = rig().await;
    for bad in [
        "bad domain.test",
        "evil.test/#",
        "a;b.test",
        "x".repeat(64).as_str(),
    ] {
        let (status, v) = rig.call(
            "POST",
            "/api/groups/sync",
            kids(json!({"blockDomains": [bad]})),
        );
        assert_eq!(status, 400, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "INVALID_DOMAIN", "{bad}: {v}");
    }
    let (status, v) = rig.call(
        "PUT",
        "/api/dns/categories/social",
        json!({"list": "ok.test\nserver=/x/1.2.3.4\nfine.test\n"}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("line 2"),
        "{v}"
    );
    let (status, v) = rig.call(
        "POST",
        "/api/groups/sync",
        kids(json!({"categories": ["nosuch"]})),
    );
    assert_eq!(
        (status, v["error"]["code"].clone()),
        (400, json!("UNKNOWN_CATEGORY")),
        "{v}"
    );
    // A 10 MB upload is refused whole, before anything is parsed.
    let huge: String = (0..600_000)
        .map(|i| format!("n{i}.example.com\n"))
        .collect();
    assert!(huge.len() > 10_000_000);
    let answer = rig.raw_put(
        "/api/dns/categories/social",
        json!({ "list": huge }).to_string(),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("PAYLOAD_TOO_LARGE"), "{answer}");
    // Nothing was applied: no resolver runs.
    assert!(resolver_pids(&rig.dns_dir).is_empty());
    let cats = rig.ok("GET", "/api/dns/categories", json!({}));
    let social = cats["categories"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "social")
        .unwrap();
    assert_eq!(social["modified"], false, "{social}");
}
