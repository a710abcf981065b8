//! DNS filtering enforced for real, proven by DNS answers and connections: the real
//! agent in the router namespace runs real dnsmasq resolvers for filtered groups;
//! the WAN namespace has its own resolver (answering every name with the WAN host's
//! address), a DoT port, and HTTPS servers (openssl) on an ordinary address and on
//! a listed DoH address. Clients ask with dig and curl. Needs root, nft, tc,
//! dnsmasq, dig, curl, openssl and ss (`tests/run` installs them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netpilot_tests::lab::{
    Lab, Netns, Probe, C1_MAC, C2_MAC, LAN_IF, ROUTER_LAN, WAN_HOST, WAN_IF,
};
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
    rig_with(|_, _| Vec::new()).await
}

/// The rig, with `setup` run on the lab before the agent starts; it returns more
/// arguments for the agent.
async fn rig_with(setup: impl FnOnce(&Lab, &Path) -> Vec<String>) -> Rig {
    netpilot_testkit::require(&["nft", "tc", "dnsmasq", "dig", "curl", "openssl", "ss"]);
    let lab = Lab::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let extra = setup(&lab, tmp.path());
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
    let mut args = vec![
        "--check-interval",
        "300ms",
        "--dns-upstream",
        WAN_HOST,
        "--dns-dir",
        &dns_dir_arg,
        "--doh-list",
        &doh_arg,
    ];
    args.extend(extra.iter().map(String::as_str));
    let netpilot = ApiRig::builder()
        .in_lab(&lab)
        .agent_args(&args)
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
        self.try_dig(ns, server, name, tcp)
            .unwrap_or_else(|out| panic!("no answer from dig: {out}"))
    }

    /// dig's answer, or (no answer at all: refused, timed out) what it said.
    fn try_dig(&self, ns: &Netns, server: &str, name: &str, tcp: bool) -> Result<Answer, String> {
        let mut argv = vec!["dig", "+tries=1", "+time=2", "+nocookie"];
        if tcp {
            argv.push("+tcp");
        }
        let at = format!("@{server}");
        argv.extend([at.as_str(), name, "A"]);
        let out = match ns.command(argv[0]).args(&argv[1..]).output() {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => panic!("{argv:?}: {e}"),
        };
        let Some(status) = out
            .split("status: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
        else {
            return Err(out);
        };
        let status = status.to_owned();
        let a = out
            .lines()
            .filter(|l| !l.starts_with(';') && l.contains("\tA\t"))
            .filter_map(|l| l.split_whitespace().last())
            .map(str::to_owned)
            .collect();
        Ok(Answer { status, a })
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

/// The guest network of a stock OpenWrt router, as the lab builds it: bridge
/// `br-guest` (192.168.78.1/24) in fw4 zone `guest` whose input is REJECT; c2 moves
/// there. fw4's real ruleset (`agent/fixtures/fw4/fw4-default.nft`) gets the guest
/// zone's chains as fw4 renders them, and `@GUEST_PRE@` where fw4 puts the
/// `chain-pre/input_guest/` includes.
const GUEST_IF: &str = "br-guest";
const GUEST_ROUTER: &str = "192.168.78.1";
const GUEST_C2: &str = "192.168.78.12";

fn fw4_template() -> String {
    let stock = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/fixtures/fw4/fw4-default.nft"),
    )
    .unwrap();
    let guest = format!(
        "\tchain input_guest {{\n@GUEST_PRE@\n\t\tjump reject_from_guest\n\t}}\n\n\
         \tchain forward_guest {{\n\t\tjump accept_to_wan comment \"!fw4: Accept guest to wan forwarding\"\n\t\tjump reject_to_guest\n\t}}\n\n\
         \tchain reject_from_guest {{\n\t\tiifname \"{GUEST_IF}\" counter jump handle_reject comment \"!fw4: reject guest IPv4/IPv6 traffic\"\n\t}}\n\n\
         \tchain reject_to_guest {{\n\t\toifname \"{GUEST_IF}\" counter jump handle_reject comment \"!fw4: reject guest IPv4/IPv6 traffic\"\n\t}}\n\n\
         \tchain input_wan {{"
    );
    let t = stock
        // The host's own includes are not the router's.
        .replace("\tinclude \"/etc/nftables.d/*.nft\"\n", "")
        .replace("r-wan", WAN_IF)
        .replacen(
            "\t\tiifname \"br-lan\" jump input_lan comment \"!fw4: Handle lan IPv4/IPv6 input traffic\"\n",
            &format!("\t\tiifname \"br-lan\" jump input_lan comment \"!fw4: Handle lan IPv4/IPv6 input traffic\"\n\t\tiifname \"{GUEST_IF}\" jump input_guest comment \"!fw4: Handle guest IPv4/IPv6 input traffic\"\n"),
            1,
        )
        .replacen(
            "\t\tiifname \"br-lan\" jump forward_lan comment \"!fw4: Handle lan IPv4/IPv6 forward traffic\"\n",
            &format!("\t\tiifname \"br-lan\" jump forward_lan comment \"!fw4: Handle lan IPv4/IPv6 forward traffic\"\n\t\tiifname \"{GUEST_IF}\" jump forward_guest comment \"!fw4: Handle guest IPv4/IPv6 forward traffic\"\n"),
            1,
        )
        .replacen("\tchain input_wan {", &guest, 1);
    assert_eq!(t.matches("@GUEST_PRE@").count(), 1);
    assert!(t.contains("jump input_guest") && t.contains("jump forward_guest"));
    t
}

/// Moves c2 onto the guest bridge; writes UCI `network`/`firewall` with the guest
/// zone under a root for the agent, fw4's ruleset template, and a stand-in for
/// `/etc/init.d/firewall` that renders the include (when it exists) where fw4
/// would and loads the ruleset. Returns the agent's extra arguments.
fn guest_network(lab: &Lab, tmp: &Path) -> Vec<String> {
    let r = &lab.router;
    for argv in [
        vec!["ip", "link", "add", GUEST_IF, "type", "bridge"],
        vec!["ip", "addr", "add", "192.168.78.1/24", "dev", GUEST_IF],
        vec!["ip", "link", "set", GUEST_IF, "up"],
        vec!["ip", "link", "set", "lan2", "nomaster"],
        vec!["ip", "link", "set", "lan2", "master", GUEST_IF],
    ] {
        lab.exec(r, &argv).unwrap();
    }
    let c2_addr = format!("{GUEST_C2}/24");
    for argv in [
        vec!["ip", "addr", "flush", "dev", "eth0"],
        vec!["ip", "addr", "add", &c2_addr, "dev", "eth0"],
        vec!["ip", "route", "add", "default", "via", GUEST_ROUTER],
    ] {
        lab.exec(&lab.c2, &argv).unwrap();
    }
    lab.exec(
        &lab.wan,
        &["ip", "route", "add", "192.168.78.0/24", "via", "10.77.0.1"],
    )
    .unwrap();
    let root = tmp.join("root");
    std::fs::create_dir_all(root.join("etc/config")).unwrap();
    std::fs::write(
        root.join("etc/config/network"),
        format!("config interface 'lan'\n\toption device '{LAN_IF}'\n\toption proto 'static'\n\nconfig interface 'wan'\n\toption device '{WAN_IF}'\n\toption proto 'dhcp'\n\nconfig interface 'guest'\n\toption device '{GUEST_IF}'\n\toption proto 'static'\n"),
    )
    .unwrap();
    std::fs::write(
        root.join("etc/config/firewall"),
        "config defaults\n\toption input 'REJECT'\n\nconfig zone\n\toption name 'lan'\n\tlist network 'lan'\n\toption input 'ACCEPT'\n\nconfig zone\n\toption name 'wan'\n\tlist network 'wan'\n\toption input 'REJECT'\n\toption masq '1'\n\nconfig zone\n\toption name 'guest'\n\tlist network 'guest'\n\toption input 'REJECT'\n\toption forward 'REJECT'\n",
    )
    .unwrap();
    let includes = tmp.join("nftables.d");
    let template = tmp.join("fw4.nft.in");
    std::fs::write(&template, fw4_template()).unwrap();
    let script = tmp.join("firewall");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# Stand-in for /etc/init.d/firewall reload: fw4 renders chain-pre includes at\n# the start of their chain, then loads the ruleset.\n[ \"$1\" = reload ] || exit 2\ninc={inc}\nline=\nif [ -f \"$inc\" ]; then line=\"include \\\"$inc\\\"\"; fi\nsed \"s|@GUEST_PRE@|$line|\" {template} > {out} && exec nft -f {out}\n",
            inc = includes.join("chain-pre/input_guest/netpilot.nft").display(),
            template = template.display(),
            out = tmp.join("fw4.nft").display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // fw4 as the router boots: no include of ours yet.
    lab.exec(r, &[script.to_str().unwrap(), "reload"]).unwrap();
    vec![
        "--lan-if".into(),
        GUEST_IF.into(),
        "--root".into(),
        root.display().to_string(),
        "--fw4-include-dir".into(),
        includes.display().to_string(),
        "--firewall-reload".into(),
        script.display().to_string(),
    ]
}

/// A limited group's device on the second LAN bridge (the guest bridge, in its own
/// fw4 zone) is shaped both ways: download by the classes on that bridge's egress,
/// upload by the ifb that every LAN bridge feeds. The device on br-lan stays free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_a_device_on_the_guest_bridge_is_shaped_both_ways() {
    let rig = rig_with(guest_network).await;
    rig.ok(
        "POST",
        "/api/groups/sync",
        json!({"group": {"id": 3, "name": "Guests", "devices": [{"mac": C2_MAC}],
            "policy": {"bandwidth": {"downloadKbps": 5000, "uploadKbps": 5000}}}}),
    );
    let l = &rig.lab;
    let up = l.throughput(&l.c2, &l.wan, WAN_HOST, false, 3).unwrap();
    let down = l.throughput(&l.c2, &l.wan, WAN_HOST, true, 3).unwrap();
    let free = l.throughput(&l.c1, &l.wan, WAN_HOST, true, 3).unwrap();
    println!("guest bridge, 5 Mbit/s: upload {up:.2}, download {down:.2}; br-lan device: {free:.0} Mbit/s");
    for (what, v) in [("upload", up), ("download", down)] {
        assert!(
            (4.25..=5.75).contains(&v),
            "{what} {v:.2} Mbit/s is not within ±15% of 5"
        );
    }
    assert!(free >= 100.0, "the br-lan device got {free:.1} Mbit/s");
}

/// A device on a second LAN bridge, in an fw4 zone that rejects input (a guest
/// network), is DNS-filtered and its policy enforced: through the include the agent
/// puts into fw4's `chain-pre/input_guest/`; without it, its redirected queries are
/// rejected by fw4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_a_guest_bridge_in_a_rejecting_zone_is_filtered_through_the_fw4_include() {
    let rig = rig_with(guest_network).await;
    let (c1, c2) = (&rig.lab.c1, &rig.lab.c2);
    let tmp = rig._tmp.path().to_owned();
    let include = tmp.join("nftables.d/chain-pre/input_guest/netpilot.nft");
    // The agent put the include in place and had fw4 reload at start.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let chain = rig
            .lab
            .exec(
                &rig.lab.router,
                &["nft", "list", "chain", "inet", "fw4", "input_guest"],
            )
            .unwrap();
        if chain.contains("netpilot: filtered DNS") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no include in input_guest: {chain}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(include.exists());
    // Unfiltered to begin with, through fw4: the guest reaches the WAN resolver.
    assert!(!rig.blocked(c2, WAN_HOST, "blocked.test", false));

    let group = |internet: &str| {
        json!({"group": {"id": 3, "name": "Guests", "devices": [{"mac": C2_MAC}],
            "policy": {"internet": internet, "dns": {"blockDomains": ["blocked.test"]}}}})
    };
    rig.ok("POST", "/api/groups/sync", group("allow"));
    for tcp in [false, true] {
        for server in [WAN_HOST, GUEST_ROUTER] {
            assert!(
                rig.blocked(c2, server, "blocked.test", tcp),
                "{server} tcp={tcp}"
            );
            assert!(
                !rig.blocked(c2, server, "example.org", tcp),
                "{server} tcp={tcp}"
            );
        }
        // The device on the LAN bridge is not in the group.
        assert!(!rig.blocked(c1, WAN_HOST, "blocked.test", tcp));
    }

    // fw4 reloaded without the include (as if it were never written): the guest's
    // redirected queries meet the zone's REJECT and get no answer at all.
    std::fs::remove_file(&include).unwrap();
    rig.lab
        .exec(
            &rig.lab.router,
            &[tmp.join("firewall").to_str().unwrap(), "reload"],
        )
        .unwrap();
    for name in ["blocked.test", "example.org"] {
        let got = rig.try_dig(c2, WAN_HOST, name, false);
        assert!(got.is_err(), "{name} answered without the include: {got:?}");
    }
    assert!(
        !rig.blocked(c1, WAN_HOST, "blocked.test", false),
        "lan unaffected"
    );

    // The forward rules cover the guest bridge too.
    let dot: SocketAddr = format!("{WAN_HOST}:853").parse().unwrap();
    assert_eq!(
        rig.lab.probe(c2, dot),
        Probe::Refused,
        "DoT from a filtered guest"
    );
    let web = rig.lab.listen(&rig.lab.wan, WAN_HOST).unwrap();
    assert_eq!(rig.lab.probe(c2, web), Probe::Open);
    rig.ok("POST", "/api/groups/sync", group("block"));
    assert_eq!(rig.lab.probe(c2, web), Probe::Refused);
    assert_eq!(rig.lab.probe(c1, web), Probe::Open);
}

/// A state directory the resolver's user cannot reach (its parent is 0700, which
/// the agent does not change): dnsmasq starts but answers everything unfiltered.
/// The canary catches it; the sync fails with APPLY_FAILED naming the resolver,
/// its group and port, and nothing is left redirected to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_a_resolver_that_cannot_read_its_list_fails_the_sync_naming_it() {
    let closed = std::sync::Mutex::new(PathBuf::new());
    let mut rig = rig_with(|_, tmp| {
        use std::os::unix::fs::PermissionsExt;
        let parent = tmp.join("closed");
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
        let dir = parent.join("dns");
        *closed.lock().unwrap() = dir.clone();
        vec!["--dns-dir".into(), dir.display().to_string()]
    })
    .await;
    rig.dns_dir = closed.into_inner().unwrap();
    let (status, v) = rig.call(
        "POST",
        "/api/groups/sync",
        kids(json!({"blockDomains": ["blocked.test"]})),
    );
    assert_ne!(status, 200, "{v}");
    assert_eq!(v["error"]["code"], "APPLY_FAILED", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    for part in ["dns resolver g", "group 3", "port 54", "canary"] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
    // Taken back: no resolver, no redirect; the device resolves as before.
    assert!(resolver_pids(&rig.dns_dir).is_empty());
    assert!(!rig.blocked(&rig.lab.c1, WAN_HOST, "blocked.test", false));
}

/// A resolver running without its list: restarted behind the agent's back (as
/// dnsmasq with its own conf, so its pid file names it) while its list was
/// unreadable (mode 0600), it answers everything unfiltered, with the right files
/// and a live process. The periodic check finds it by the canary, reports drift and
/// repairs it: the mode put back, the resolver restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_a_resolver_gone_unfiltered_is_drift_and_repaired() {
    let rig = rig().await;
    let c1 = &rig.lab.c1;
    rig.ok(
        "POST",
        "/api/groups/sync",
        kids(json!({"blockDomains": ["blocked.test"]})),
    );
    assert!(rig.blocked(c1, WAN_HOST, "blocked.test", false));
    let pids = resolver_pids(&rig.dns_dir);
    assert_eq!(pids.len(), 1);
    let file = |ext: &str| {
        std::fs::read_dir(&rig.dns_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == ext))
            .unwrap()
    };
    let (list, conf) = (file("servers"), file("conf"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&list, std::fs::Permissions::from_mode(0o600)).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Started again at once, before the agent's check sees it gone.
    let conf_arg = format!("--conf-file={}", conf.display());
    let mut started = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !started {
        // The old process may still hold the port for a moment.
        started = rig
            .lab
            .exec(&rig.lab.router, &["dnsmasq", &conf_arg])
            .is_ok();
        assert!(started || Instant::now() < deadline, "cannot start dnsmasq");
    }
    let status = || rig.ok("GET", "/api/infrastructure/status", json!({}))["status"].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = status();
        if s["drift_repairs"].as_u64() >= Some(1) {
            break s;
        }
        assert!(Instant::now() < deadline, "no drift repaired: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let drift = s["last_drift"].to_string();
    assert!(
        drift.contains("answers the canary unfiltered") && drift.contains("group 3"),
        "{s}"
    );
    assert_eq!(
        std::fs::metadata(&list).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert!(rig.blocked(c1, WAN_HOST, "blocked.test", false));
    assert!(status()["in_sync"].as_bool().unwrap(), "{}", status());
}
