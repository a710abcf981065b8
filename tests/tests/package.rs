//! The OpenWrt package: each `.ipk` unpacked the way opkg does and checked for
//! structure, control fields, modes, owners and script syntax; and the uninstall
//! path, `netpilot-agent cleanup`, against a real nftables ruleset and tc qdiscs in
//! a throwaway network namespace (needs root, nft and tc).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use netpilot_testkit::Netns;
use netpilot_tests::{binary, packaged_binary, repo};

const ARCHES: &[&str] = &[
    "x86_64",
    "aarch64_cortex-a53",
    "arm_cortex-a7_neon-vfpv4",
    "mipsel_24kc",
    "mips_24kc",
];

fn build_ipk(arch: &str, out: &Path) -> PathBuf {
    let o = Command::new(repo().join("openwrt-package/build-ipk.sh"))
        .arg(packaged_binary())
        .arg(arch)
        .arg(out)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

fn sh(args: &[&str], dir: &Path) -> String {
    let o = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn every_ipk_unpacks_like_opkg_expects() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ARCHES {
        let ipk = build_ipk(arch, tmp.path());
        assert!(ipk
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with(&format!("_{arch}.ipk")));
        let dir = tmp.path().join(arch);
        std::fs::create_dir_all(&dir).unwrap();

        // Outer: gzip tar with exactly these members, in opkg's order.
        let members = sh(&["tar", "-tzf", ipk.to_str().unwrap()], &dir);
        assert_eq!(
            members.lines().collect::<Vec<_>>(),
            ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]
        );
        sh(&["tar", "-xzf", ipk.to_str().unwrap()], &dir);
        assert_eq!(
            std::fs::read_to_string(dir.join("debian-binary")).unwrap(),
            "2.0\n"
        );

        // Control.
        std::fs::create_dir_all(dir.join("control")).unwrap();
        sh(&["tar", "-xzf", "../control.tar.gz"], &dir.join("control"));
        let control = std::fs::read_to_string(dir.join("control/control")).unwrap();
        let fields: BTreeMap<&str, &str> = control
            .lines()
            .filter(|l| !l.starts_with(' '))
            .filter_map(|l| l.split_once(": "))
            .collect();
        assert_eq!(fields["Package"], "netpilot-agent");
        assert_eq!(fields["Architecture"], *arch);
        assert!(
            fields["Version"].starts_with(env!("CARGO_PKG_VERSION")),
            "{}",
            fields["Version"]
        );
        for dep in [
            "nftables",
            "tc",
            "kmod-sched-core",
            "kmod-nft-core",
            "dnsmasq",
        ] {
            assert!(
                fields["Depends"].split(", ").any(|d| d == dep),
                "Depends lacks {dep}"
            );
        }
        assert!(!fields["Description"].is_empty());
        assert_eq!(
            std::fs::read_to_string(dir.join("control/conffiles")).unwrap(),
            "/etc/config/netpilot\n"
        );
        for script in ["postinst", "prerm"] {
            let p = dir.join("control").join(script);
            assert_eq!(mode(&p), 0o755, "{script}");
            sh(&["sh", "-n", p.to_str().unwrap()], &dir);
        }

        // Data: files, modes, owners, size.
        std::fs::create_dir_all(dir.join("data")).unwrap();
        sh(&["tar", "-xzf", "../data.tar.gz"], &dir.join("data"));
        let data = dir.join("data");
        assert_eq!(mode(&data.join("usr/sbin/netpilot-agent")), 0o755);
        assert_eq!(mode(&data.join("etc/init.d/netpilot")), 0o755);
        assert_eq!(mode(&data.join("etc/config/netpilot")), 0o644);
        assert!(data.join("lib/upgrade/keep.d/netpilot").exists());
        sh(
            &[
                "sh",
                "-n",
                data.join("etc/init.d/netpilot").to_str().unwrap(),
            ],
            &dir,
        );
        let init = std::fs::read_to_string(data.join("etc/init.d/netpilot")).unwrap();
        assert!(init.starts_with("#!/bin/sh /etc/rc.common\n"));
        for needle in [
            "USE_PROCD=1",
            "procd_set_param respawn",
            "procd_set_param stdout 1",
            "procd_set_param stderr 1",
            "procd_add_reload_trigger netpilot firewall",
            "reapply",
        ] {
            assert!(init.contains(needle), "init script lacks {needle}");
        }
        // The rules from boot, before the firewall (START 19) loads them.
        let boot = data.join("etc/init.d/netpilot-boot");
        assert_eq!(mode(&boot), 0o755);
        sh(&["sh", "-n", boot.to_str().unwrap()], &dir);
        let boot = std::fs::read_to_string(&boot).unwrap();
        assert!(boot.starts_with("#!/bin/sh /etc/rc.common\n"));
        assert!(
            boot.contains("\nSTART=18\n") && boot.contains(" boot "),
            "{boot}"
        );
        let hotplug = data.join("etc/hotplug.d/iface/90-netpilot");
        sh(&["sh", "-n", hotplug.to_str().unwrap()], &dir);
        let hotplug = std::fs::read_to_string(&hotplug).unwrap();
        assert!(hotplug.contains("netpilot-agent reconnect"), "{hotplug}");
        // The package's include is exactly what the agent ensures at start.
        assert_eq!(
            std::fs::read_to_string(data.join("usr/share/nftables.d/ruleset-post/netpilot.nft"))
                .unwrap(),
            netpilot_agent::policy::fw4::include_text(std::path::Path::new(
                netpilot_agent::policy::fw4::LIVE_DIR
            ))
        );
        for (script, needle) in [
            ("postinst", "netpilot-boot enable"),
            ("prerm", "netpilot-boot disable"),
        ] {
            let text = std::fs::read_to_string(dir.join("control").join(script)).unwrap();
            assert!(text.contains(needle), "{script} lacks {needle}");
        }
        let listing = sh(&["tar", "-tvzf", "data.tar.gz"], &dir);
        for line in listing.lines() {
            assert!(
                line.split_whitespace().nth(1) == Some("0/0"),
                "not owned by root: {line}"
            );
        }
        let size: u64 = walk(&data)
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum();
        assert_eq!(fields["Installed-Size"].parse::<u64>().unwrap(), size);
    }
}

#[test]
fn ipks_are_reproducible_and_bad_arches_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = std::fs::read(build_ipk("mips_24kc", &tmp.path().join("a"))).unwrap();
    let b = std::fs::read(build_ipk("mips_24kc", &tmp.path().join("b"))).unwrap();
    assert!(a == b, "two builds differ");
    let o = Command::new(repo().join("openwrt-package/build-ipk.sh"))
        .arg(packaged_binary())
        .args(["sparc64", tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown OpenWrt arch"));
}

#[test]
fn netns_cleanup_removes_the_netpilot_table_and_qdiscs_and_nothing_else() {
    netpilot_testkit::require(&["nft", "tc"]);
    // One throwaway network namespace for the whole scenario; the agent itself
    // never uses one.
    let ns = Netns::new("pkg").unwrap();
    let agent = binary("netpilot-agent");
    let agent = agent.to_str().unwrap();
    for argv in [
        &["nft", "add", "table", "inet", "fw4"][..],
        &["nft", "add", "table", "inet", "netpilot"],
        &[
            "nft",
            "add",
            "chain",
            "inet",
            "netpilot",
            "forward",
            "{ type filter hook forward priority 0; }",
        ],
        &[
            "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
        ],
        &[
            "ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1",
        ],
        &[
            "tc", "qdisc", "add", "dev", "lan0", "root", "handle", "4e50:", "htb",
        ],
        &[
            "tc", "qdisc", "add", "dev", "wan0", "root", "handle", "1:", "htb",
        ],
    ] {
        ns.exec(argv).unwrap();
    }
    // The copies of the rules fw4 would include, and the include.
    let files = tempfile::tempdir().unwrap();
    let (live_dir, include, boot) = (
        files.path().join("fw4"),
        files.path().join("post/netpilot.nft"),
        files.path().join("boot.nft"),
    );
    let live = live_dir.join("netpilot.nft");
    for f in [&live, &include, &boot] {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, "# a netpilot file\n").unwrap();
    }
    let cleanup = [
        agent,
        "cleanup",
        "--lan-if",
        "lan0",
        "--wan-if",
        "wan0",
        "--fw4-dir",
        live_dir.to_str().unwrap(),
        "--fw4-include",
        include.to_str().unwrap(),
        "--boot-copy",
        boot.to_str().unwrap(),
    ];
    let first = ns.exec(&cleanup).unwrap();
    for f in [&live, &include, &boot] {
        assert!(!f.exists(), "{} left behind", f.display());
        assert!(
            first.contains(&format!("removed file {}", f.display())),
            "{first}"
        );
    }
    let tables = ns.exec(&["nft", "list", "tables"]).unwrap();
    let qdiscs = ns.exec(&["tc", "qdisc", "show", "dev", "wan0"]).unwrap();
    let second = ns.exec(&cleanup).unwrap();
    let all = format!("{first}{tables}{qdiscs}---\n{second}");
    assert!(
        first.contains("removed nftables table inet netpilot"),
        "{all}"
    );
    assert!(
        tables.contains("table inet fw4"),
        "fw4's table must stay: {all}"
    );
    assert!(
        !tables.lines().any(|l| l.trim() == "table inet netpilot"),
        "{all}"
    );
    assert!(
        second.contains("absent nftables table inet netpilot"),
        "{all}"
    );
    // NetPilot's root qdisc (HTB 4e50:) goes; another one stays, here an HTB 1:
    // with nothing under it (sqm-scripts' handle; not an older agent's, which
    // always had classes).
    assert!(
        first.contains("removed tc root qdisc htb 4e50: on lan0"),
        "{all}"
    );
    assert!(
        first.contains("absent NetPilot's tc qdiscs on wan0"),
        "{all}"
    );
    assert!(qdiscs.contains("qdisc htb 1: root"), "{all}");
    assert!(
        second.contains("absent NetPilot's tc qdiscs on lan0"),
        "{all}"
    );
    assert!(
        second.contains(&format!("absent file {}", boot.display())),
        "{all}"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The SDK build (openwrt-package/Makefile) installs the manifest's files with its
/// dependencies and conffiles, as build-ipk.sh and build-apk.sh do, and builds the
/// router feature set. The SDK is not here to run it; this keeps it from drifting.
#[test]
fn the_sdk_makefile_takes_files_and_dependencies_from_the_manifest() {
    let mk = std::fs::read_to_string(repo().join("openwrt-package/Makefile")).unwrap();
    for needle in [
        "$(CURDIR)/manifest.sh stage $(PKG_INSTALL_DIR)/bin/netpilot-agent $(1)",
        "$(shell $(CURDIR)/manifest.sh depends)",
        "$(shell $(CURDIR)/manifest.sh conffiles)",
        "$(call Build/Compile/Cargo,agent,--no-default-features)",
    ] {
        assert!(mk.contains(needle), "Makefile lacks {needle}");
    }
    for stale in ["INSTALL_BIN", "INSTALL_CONF", "+nftables"] {
        assert!(
            !mk.contains(stale),
            "Makefile lists files or dependencies itself: {stale}"
        );
    }
}
