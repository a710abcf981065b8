//! The OpenWrt 25.12 package (`.apk`, apk-tools 3's ADB format): each package that
//! `openwrt-package/build-apk.sh` writes is read back by an ADB reader of its own
//! (below; written from apk-tools' `src/adb.h` and `src/apk_adb.h`, sharing nothing
//! with the Python writer) and checked for its schema fields, files, modes, hashes,
//! data blocks and scripts. A golden package built from a tiny stand-in binary was
//! installed, upgraded and removed with real apk-tools (README, "Installing on
//! OpenWrt"); the builder must still produce it byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use netpilot_tests::{packaged_binary, repo};

const ARCHES: &[&str] = &[
    "x86_64",
    "aarch64_cortex-a53",
    "arm_cortex-a7_neon-vfpv4",
    "mipsel_24kc",
    "mips_24kc",
];
const EPOCH: u64 = 1_700_000_000;

fn pkgdir() -> PathBuf {
    repo().join("openwrt-package")
}

fn build_apk(bin: &Path, arch: &str, out: &Path, version: Option<&str>) -> PathBuf {
    let mut cmd = Command::new(pkgdir().join("build-apk.sh"));
    cmd.arg(bin).arg(arch).arg(out);
    if let Some(v) = version {
        cmd.arg(v);
    }
    let o = cmd
        .env("SOURCE_DATE_EPOCH", EPOCH.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
}

fn manifest(what: &str) -> Vec<String> {
    let o = Command::new(pkgdir().join("manifest.sh"))
        .arg(what)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A reader for the ADB container, from apk-tools' `src/adb.h` (value tags, blocks)
/// and `src/apk_adb.h` (the package schema's field numbers).
mod adb {
    use std::io::Read;

    pub const PKG_INFO: usize = 1;
    pub const PKG_PATHS: usize = 2;
    pub const PKG_SCRIPTS: usize = 3;
    pub const PI_NAME: usize = 1;
    pub const PI_VERSION: usize = 2;
    pub const PI_HASHES: usize = 3;
    pub const PI_DESCRIPTION: usize = 4;
    pub const PI_ARCH: usize = 5;
    pub const PI_LICENSE: usize = 6;
    pub const PI_INSTALLED_SIZE: usize = 12;
    pub const PI_DEPENDS: usize = 15;
    pub const DEP_NAME: usize = 1;
    pub const DEP_VERSION: usize = 2;
    pub const DI_NAME: usize = 1;
    pub const DI_ACL: usize = 2;
    pub const DI_FILES: usize = 3;
    pub const FI_NAME: usize = 1;
    pub const FI_ACL: usize = 2;
    pub const FI_SIZE: usize = 3;
    pub const FI_MTIME: usize = 4;
    pub const FI_HASHES: usize = 5;
    pub const FI_TARGET: usize = 6;
    pub const ACL_MODE: usize = 1;
    pub const ACL_USER: usize = 2;
    pub const ACL_GROUP: usize = 3;
    pub const SCRIPT_POST_INSTALL: usize = 3;
    pub const SCRIPT_PRE_DEINSTALL: usize = 4;
    pub const SCRIPT_POST_UPGRADE: usize = 7;

    /// A package: its ADB block (header and values) and its data blocks.
    pub struct Package {
        pub adb: Vec<u8>,
        /// (path index, file index, bytes), in file order.
        pub data: Vec<(u32, u32, Vec<u8>)>,
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// "ADBd" + raw deflate of ("ADB." "pckg" blocks...), as apk-tools writes by
    /// default; also takes an uncompressed "ADB." file.
    pub fn parse(file: &[u8]) -> Package {
        let raw = match &file[..4] {
            b"ADBd" => {
                let mut out = Vec::new();
                flate2::read::DeflateDecoder::new(&file[4..])
                    .read_to_end(&mut out)
                    .expect("a raw deflate stream after ADBd");
                out
            }
            b"ADB." => file.to_vec(),
            other => panic!("not an ADB file: {other:?}"),
        };
        assert_eq!(&raw[..4], b"ADB.", "file header magic");
        assert_eq!(&raw[4..8], b"pckg", "schema: a package");
        let mut at = 8;
        let mut adb = None;
        let mut data = Vec::new();
        while at < raw.len() {
            let tag = u32_at(&raw, at);
            let (kind, size) = (tag >> 30, (tag & 0x3fff_ffff) as usize);
            assert!(
                size >= 4 && at + size <= raw.len(),
                "block at {at} overruns"
            );
            let payload = &raw[at + 4..at + size];
            match kind {
                0 => {
                    assert!(adb.is_none() && data.is_empty(), "one ADB block, first");
                    assert!(payload.len() >= 8);
                    assert_eq!(payload[0], 0, "adb_compat_ver");
                    adb = Some(payload.to_vec());
                }
                2 => {
                    assert!(adb.is_some(), "data after the ADB block");
                    data.push((
                        u32_at(payload, 0),
                        u32_at(payload, 4),
                        payload[8..].to_vec(),
                    ));
                }
                other => panic!("unexpected block type {other} (an unsigned package has none)"),
            }
            let padded = size.div_ceil(8) * 8;
            assert!(
                raw[at + size..(at + padded).min(raw.len())]
                    .iter()
                    .all(|&b| b == 0),
                "block padding is zeros"
            );
            at += padded;
        }
        assert_eq!(at, raw.len(), "the blocks fill the file");
        Package {
            adb: adb.expect("an ADB block"),
            data,
        }
    }

    /// A view of the ADB block's values.
    #[derive(Clone, Copy)]
    pub struct Db<'a>(pub &'a [u8]);

    impl<'a> Db<'a> {
        pub fn root(self) -> Obj<'a> {
            self.obj(u32_at(self.0, 4))
        }

        fn at(self, v: u32) -> usize {
            (v & 0x0fff_ffff) as usize
        }

        /// An object or array: its slots after slot 0 (the count); null is empty.
        pub fn obj(self, v: u32) -> Obj<'a> {
            if v == 0 {
                return Obj {
                    db: self,
                    slots: Vec::new(),
                };
            }
            let t = v >> 28;
            assert!(t == 0xd || t == 0xe, "not an object or array: {v:#x}");
            let at = self.at(v);
            assert_eq!(at % 4, 0, "objects are 4-byte aligned");
            let n = u32_at(self.0, at) as usize;
            assert!(n >= 2, "an empty object is written as null");
            let slots = (1..n).map(|i| u32_at(self.0, at + 4 * i)).collect();
            Obj { db: self, slots }
        }

        pub fn blob(self, v: u32) -> Option<&'a [u8]> {
            let at = self.at(v);
            let (len, start) = match v >> 28 {
                0 if v == 0 => return None,
                0x8 => (self.0[at] as usize, at + 1),
                0x9 => (
                    u16::from_le_bytes(self.0[at..at + 2].try_into().unwrap()) as usize,
                    at + 2,
                ),
                0xa => (u32_at(self.0, at) as usize, at + 4),
                t => panic!("not a blob: type {t:#x}"),
            };
            Some(&self.0[start..start + len])
        }

        pub fn int(self, v: u32) -> Option<u64> {
            match v >> 28 {
                0 if v == 0 => None,
                0x1 => Some(u64::from(v & 0x0fff_ffff)),
                0x2 => Some(u64::from(u32_at(self.0, self.at(v)))),
                0x3 => {
                    let at = self.at(v);
                    Some(u64::from_le_bytes(self.0[at..at + 8].try_into().unwrap()))
                }
                t => panic!("not an integer: type {t:#x}"),
            }
        }
    }

    pub struct Obj<'a> {
        pub db: Db<'a>,
        pub slots: Vec<u32>,
    }

    impl<'a> Obj<'a> {
        /// Field `i` (1-based, as apk_adb.h numbers them); null when absent.
        pub fn val(&self, i: usize) -> u32 {
            self.slots.get(i - 1).copied().unwrap_or(0)
        }
        pub fn str(&self, i: usize) -> Option<&'a str> {
            self.db
                .blob(self.val(i))
                .map(|b| std::str::from_utf8(b).unwrap())
        }
        pub fn bytes(&self, i: usize) -> Option<&'a [u8]> {
            self.db.blob(self.val(i))
        }
        pub fn int(&self, i: usize) -> Option<u64> {
            self.db.int(self.val(i))
        }
        pub fn obj(&self, i: usize) -> Obj<'a> {
            self.db.obj(self.val(i))
        }
        pub fn items(&self) -> Vec<Obj<'a>> {
            self.slots.iter().map(|&v| self.db.obj(v)).collect()
        }
    }
}

/// One file as the package describes it.
#[derive(Debug)]
struct File {
    mode: u64,
    size: u64,
    mtime: u64,
    hash: Vec<u8>,
    content: Vec<u8>,
}

struct Checked {
    info: BTreeMap<&'static str, String>,
    depends: Vec<String>,
    files: BTreeMap<String, File>,
    scripts: BTreeMap<&'static str, String>,
}

/// Parses a package and checks what holds for every package of ours: the root
/// ACLs, sorted arrays, data blocks matching the file list, sizes and hashes.
fn check(apk: &Path) -> Checked {
    let pkg = adb::parse(&std::fs::read(apk).unwrap());
    let db = adb::Db(&pkg.adb);
    let root = db.root();
    let info = root.obj(adb::PKG_INFO);

    // The unique id: the first 20 bytes of the SHA-256 of the ADB block with the
    // id zeroed (apk mkpkg's "hashes").
    let uid = info.bytes(adb::PI_HASHES).expect("a unique id");
    assert_eq!(uid.len(), 20);
    let mut zeroed = pkg.adb.clone();
    let at = (info.val(adb::PI_HASHES) & 0x0fff_ffff) as usize + 1;
    zeroed[at..at + 20].fill(0);
    assert_eq!(uid, &sha256(&zeroed)[..20], "unique id");

    let mut fields = BTreeMap::new();
    for (name, i) in [
        ("name", adb::PI_NAME),
        ("version", adb::PI_VERSION),
        ("description", adb::PI_DESCRIPTION),
        ("arch", adb::PI_ARCH),
        ("license", adb::PI_LICENSE),
    ] {
        fields.insert(name, info.str(i).unwrap_or_default().to_owned());
    }
    let depends: Vec<String> = info
        .obj(adb::PI_DEPENDS)
        .items()
        .iter()
        .map(|d| {
            assert_eq!(d.val(adb::DEP_VERSION), 0, "unversioned dependencies");
            d.str(adb::DEP_NAME).unwrap().to_owned()
        })
        .collect();
    let mut sorted = depends.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(depends, sorted, "apk keeps dependencies sorted and unique");

    let mut files = BTreeMap::new();
    let mut data = pkg.data.iter();
    let paths = root.obj(adb::PKG_PATHS).items();
    let names: Vec<&str> = paths
        .iter()
        .map(|p| p.str(adb::DI_NAME).unwrap_or(""))
        .collect();
    let mut sorted_names = names.clone();
    sorted_names.sort();
    assert_eq!(names, sorted_names, "paths are sorted");
    assert_eq!(names[0], "", "the root directory comes first");
    for (pi, path) in paths.iter().enumerate() {
        let dir = path.str(adb::DI_NAME).unwrap_or("");
        let acl = path.obj(adb::DI_ACL);
        assert_eq!(acl.int(adb::ACL_MODE), Some(0o755), "{dir}/");
        assert_eq!(acl.str(adb::ACL_USER), Some("root"), "{dir}/");
        assert_eq!(acl.str(adb::ACL_GROUP), Some("root"), "{dir}/");
        let entries = path.obj(adb::DI_FILES).items();
        let fnames: Vec<&str> = entries
            .iter()
            .map(|f| f.str(adb::FI_NAME).unwrap())
            .collect();
        let mut sorted = fnames.clone();
        sorted.sort();
        assert_eq!(fnames, sorted, "files of {dir}/ are sorted");
        for (fi, f) in entries.iter().enumerate() {
            let name = format!("/{dir}/{}", f.str(adb::FI_NAME).unwrap());
            assert_eq!(f.val(adb::FI_TARGET), 0, "{name}: a regular file");
            let acl = f.obj(adb::FI_ACL);
            assert_eq!(acl.str(adb::ACL_USER), Some("root"), "{name}");
            assert_eq!(acl.str(adb::ACL_GROUP), Some("root"), "{name}");
            let size = f.int(adb::FI_SIZE).unwrap_or(0);
            let content = if size > 0 {
                let (p, i, bytes) = data.next().unwrap_or_else(|| panic!("no data for {name}"));
                assert_eq!(
                    (*p, *i),
                    (pi as u32 + 1, fi as u32 + 1),
                    "{name}: data block"
                );
                bytes.clone()
            } else {
                Vec::new()
            };
            assert_eq!(content.len() as u64, size, "{name}");
            let hash = f.bytes(adb::FI_HASHES).unwrap().to_vec();
            assert_eq!(hex(&hash), hex(&sha256(&content)), "{name}: SHA-256");
            files.insert(
                name,
                File {
                    mode: acl.int(adb::ACL_MODE).unwrap(),
                    size,
                    mtime: f.int(adb::FI_MTIME).unwrap(),
                    hash,
                    content,
                },
            );
        }
    }
    assert!(data.next().is_none(), "a data block for no file");
    let total: u64 = files.values().map(|f| f.size).sum();
    assert_eq!(info.int(adb::PI_INSTALLED_SIZE), Some(total));

    let mut scripts = BTreeMap::new();
    let s = root.obj(adb::PKG_SCRIPTS);
    for (name, i) in [
        ("post-install", adb::SCRIPT_POST_INSTALL),
        ("pre-deinstall", adb::SCRIPT_PRE_DEINSTALL),
        ("post-upgrade", adb::SCRIPT_POST_UPGRADE),
    ] {
        if let Some(text) = s.str(i) {
            scripts.insert(name, text.to_owned());
        }
    }
    Checked {
        info: fields,
        depends,
        files,
        scripts,
    }
}

fn sh_syntax(script: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("script");
    std::fs::write(&p, script).unwrap();
    let o = Command::new("sh").arg("-n").arg(&p).output().unwrap();
    assert!(
        o.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn every_apk_holds_the_manifest_files_scripts_and_dependencies() {
    let tmp = tempfile::tempdir().unwrap();
    let version = format!("{}-r1", env!("CARGO_PKG_VERSION"));
    for arch in ARCHES {
        // The real (16 MB) agent once, for large data blocks; the stand-in elsewhere,
        // as only the arch field differs and 2 shared cores make deflate slow.
        let bin = if *arch == "mipsel_24kc" {
            packaged_binary()
        } else {
            pkgdir().join("testdata/stand-in-agent")
        };
        let apk = build_apk(&bin, arch, &tmp.path().join(arch), None);
        assert_eq!(
            apk.file_name().unwrap().to_str().unwrap(),
            format!("netpilot-agent-{version}.apk"),
            "OpenWrt's apk file name"
        );
        let p = check(&apk);
        assert_eq!(p.info["name"], "netpilot-agent");
        assert_eq!(p.info["version"], version);
        assert_eq!(p.info["arch"], *arch);
        assert_eq!(p.info["license"], "Apache-2.0");
        assert!(!p.info["description"].is_empty());

        // Dependencies: the manifest's, including dnsmasq (which dnsmasq-full
        // provides too) and the enforcement tools.
        let want: BTreeSet<String> = manifest("depends").into_iter().collect();
        for dep in [
            "nftables",
            "tc",
            "kmod-sched-core",
            "kmod-nft-core",
            "dnsmasq",
        ] {
            assert!(want.contains(dep), "manifest lacks {dep}");
        }
        assert_eq!(p.depends.iter().cloned().collect::<BTreeSet<_>>(), want);

        // Files: the manifest's, and OpenWrt's lib/apk/packages lists.
        let expect = [
            ("/usr/sbin/netpilot-agent", 0o755),
            ("/etc/init.d/netpilot", 0o755),
            ("/etc/config/netpilot", 0o644),
            ("/lib/upgrade/keep.d/netpilot", 0o644),
            ("/etc/init.d/netpilot-boot", 0o755),
            ("/usr/share/nftables.d/ruleset-post/netpilot.nft", 0o644),
            ("/etc/hotplug.d/iface/90-netpilot", 0o644),
            ("/lib/apk/packages/netpilot-agent.list", 0o644),
            ("/lib/apk/packages/netpilot-agent.conffiles", 0o644),
            ("/lib/apk/packages/netpilot-agent.conffiles_static", 0o644),
        ];
        assert_eq!(
            p.files.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            expect.iter().map(|(f, _)| *f).collect::<BTreeSet<_>>()
        );
        for (f, mode) in expect {
            assert_eq!(p.files[f].mode, mode, "{f}");
            assert_eq!(p.files[f].mtime, EPOCH, "{f}");
        }
        assert_eq!(
            p.files["/usr/sbin/netpilot-agent"].content,
            std::fs::read(&bin).unwrap(),
            "the package holds the binary it was given"
        );
        for (f, src) in [
            ("/etc/init.d/netpilot", "files/netpilot.init"),
            ("/etc/config/netpilot", "files/netpilot.config"),
            ("/lib/upgrade/keep.d/netpilot", "files/keep.d"),
        ] {
            assert_eq!(
                p.files[f].content,
                std::fs::read(pkgdir().join(src)).unwrap(),
                "{f}"
            );
        }
        let text = |f: &str| String::from_utf8(p.files[f].content.clone()).unwrap();
        let list = text("/lib/apk/packages/netpilot-agent.list");
        let listed: BTreeSet<&str> = list.lines().collect();
        let not_lists: BTreeSet<&str> = p
            .files
            .keys()
            .map(String::as_str)
            .filter(|f| !f.starts_with("/lib/apk/packages/"))
            .collect();
        assert_eq!(listed, not_lists, ".list names the package's files");
        assert_eq!(
            text("/lib/apk/packages/netpilot-agent.conffiles"),
            "/etc/config/netpilot\n"
        );
        let conf = &p.files["/etc/config/netpilot"];
        assert_eq!(
            text("/lib/apk/packages/netpilot-agent.conffiles_static"),
            format!("/etc/config/netpilot {}\n", hex(&conf.hash)),
            "the pristine checksum sysupgrade compares against"
        );

        // Scripts: the ipk's postinst and prerm under apk's names.
        let postinst = std::fs::read_to_string(pkgdir().join("files/postinst")).unwrap();
        let prerm = std::fs::read_to_string(pkgdir().join("files/prerm")).unwrap();
        assert_eq!(p.scripts["post-install"], postinst);
        assert_eq!(p.scripts["pre-deinstall"], prerm);
        let upgrade = &p.scripts["post-upgrade"];
        assert!(
            upgrade.starts_with("#!/bin/sh\nexport PKG_UPGRADE=1\n"),
            "{upgrade}"
        );
        assert!(
            upgrade.ends_with(postinst.trim_start_matches("#!/bin/sh\n")),
            "{upgrade}"
        );
        for s in p.scripts.values() {
            sh_syntax(s);
        }
        assert_eq!(p.scripts.len(), 3);
    }
}

/// The golden package: the stand-in binary, version 0.1.0-r1, x86_64, files dated
/// 1700000000. Installed, upgraded and removed with apk-tools 3 (README). When the
/// package's contents change on purpose, rebuild it with the command in the README,
/// verify it with apk-tools again, and commit it.
#[test]
fn the_golden_apk_is_rebuilt_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let golden_path = pkgdir().join("testdata/netpilot-agent-0.1.0-r1-x86_64.apk");
    let golden = std::fs::read(&golden_path).unwrap();
    let stand_in = pkgdir().join("testdata/stand-in-agent");
    let built = build_apk(&stand_in, "x86_64", tmp.path(), Some("0.1.0-r1"));
    let p = check(&built);
    assert_eq!(
        p.files["/usr/sbin/netpilot-agent"].content,
        std::fs::read(&stand_in).unwrap()
    );
    assert!(
        std::fs::read(&built).unwrap() == golden,
        "{} differs from {}: the builder or the package's files changed. \
         If on purpose, verify the new package with apk-tools and replace the golden (README)",
        built.display(),
        golden_path.display()
    );
    // Reproducible: a second build is the same.
    let again = build_apk(
        &stand_in,
        "x86_64",
        &tmp.path().join("again"),
        Some("0.1.0-r1"),
    );
    assert!(std::fs::read(again).unwrap() == golden);
}

#[test]
fn bad_arches_and_missing_binaries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let stand_in = pkgdir().join("testdata/stand-in-agent");
    for (bin, arch, msg) in [
        (stand_in.as_path(), "sparc64", "unknown OpenWrt arch"),
        (Path::new("/nonexistent/agent"), "x86_64", "no binary at"),
    ] {
        let o = Command::new(pkgdir().join("build-apk.sh"))
            .arg(bin)
            .arg(arch)
            .arg(tmp.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains(msg));
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

/// The reader is not fooled: a flipped byte in a file's data fails its hash.
#[test]
fn the_reader_catches_a_corrupted_file() {
    let tmp = tempfile::tempdir().unwrap();
    let golden =
        std::fs::read(pkgdir().join("testdata/netpilot-agent-0.1.0-r1-x86_64.apk")).unwrap();
    let mut raw = Vec::new();
    flate2::read::DeflateDecoder::new(&golden[4..])
        .read_to_end(&mut raw)
        .unwrap();
    // A byte inside the stand-in binary's data.
    let needle = b"records how";
    let at = raw
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the stand-in's text");
    raw[at] ^= 0x20;
    let bad = tmp.path().join("bad.apk");
    std::fs::write(&bad, &raw).unwrap();
    let r = std::panic::catch_unwind(|| check(&bad));
    let msg = r
        .err()
        .and_then(|e| e.downcast::<String>().ok())
        .map(|s| *s)
        .unwrap_or_default();
    assert!(msg.contains("SHA-256"), "{msg}");
}
