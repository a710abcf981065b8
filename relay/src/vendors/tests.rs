use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

/// An IEEE-format file with MA-L, MA-M and MA-S blocks nested in each other,
/// blocks over embedded ones of equal, shorter and longer length, a CID block and
/// an IAB one (`relay/testdata/README.md` says what each row is for).
pub(crate) fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/vendors-fixture.csv")
}

pub(crate) fn with_fixture() -> Vendors {
    Vendors::load(&[fixture()]).unwrap()
}

fn mac(s: &str) -> Mac {
    Mac::parse(s.as_bytes()).unwrap_or_else(|| panic!("{s} is a MAC"))
}

fn vendor(v: &Vendors, s: &str) -> Lookup<'static> {
    match v.lookup(mac(s)) {
        // Owned text for the comparisons below.
        Lookup::Vendor(name) => Lookup::Vendor(Box::leak(name.into())),
        Lookup::Local => Lookup::Local,
        Lookup::Unknown => Lookup::Unknown,
    }
}

#[test]
fn macs_parse_in_the_usual_spellings_only() {
    let want = Mac(0x0c8f_2000_0001);
    for s in [
        "0c:8f:20:00:00:01",
        "0C:8F:20:00:00:01",
        "0c-8f-20-00-00-01",
        "0c8f20000001",
    ] {
        assert_eq!(Mac::parse(s.as_bytes()), Some(want), "{s}");
    }
    for s in [
        "",
        "0c:8f:20:00:00",
        "0c:8f:20:00:00:01:02",
        "0c:8f-20:00:00:01",
        "0c.8f.20.00.00.01",
        "0c:8f:20:00:00:0g",
        "0c8f2000000",
        " 0c:8f:20:00:00:01",
        "0c:8f:20:00:00:01 ",
        "0c8f.2000.0001",
    ] {
        assert_eq!(Mac::parse(s.as_bytes()), None, "{s:?}");
    }
    assert_eq!(&mac("0c:8f:20:7a:b0:01").hex(), b"0C8F207AB001");
    assert!(mac("02:00:00:00:00:01").is_local());
    assert!(mac("0e:00:00:00:00:01").is_local());
    assert!(!mac("0c:00:00:00:00:01").is_local());
    assert!(!mac("01:00:5e:00:00:01").is_local());
}

#[test]
fn the_embedded_registry_knows_well_known_blocks() {
    let v = Vendors::embedded();
    assert!(v.embedded_entries() > 50_000, "{}", v.embedded_entries());
    assert_eq!(v.file_entries(), 0);
    for (m, name) in [
        ("00:00:00:00:00:00", "XEROX CORPORATION"),
        ("50:a6:d8:12:34:56", "Apple, Inc."),
        ("3c:22:fb:01:02:03", "Apple, Inc."),
        ("b8:27:eb:00:00:01", "Raspberry Pi Foundation"),
        // MA-M and MA-S inside the IEEE Registration Authority's own MA-L blocks.
        ("b8:4c:87:40:00:00", "Blum Novotest GmbH"),
        ("8c:1f:64:af:a0:01", "DATA ELECTRONIC DEVICES, INC"),
        ("8c:1f:64:af:f0:01", "Qtechnology A/S"),
        // IAB.
        ("40:d8:55:0d:70:00", "Avant Technologies"),
        // IEEE's `Private` is an organization like any other.
        ("ac:de:48:00:00:01", "Private"),
    ] {
        assert_eq!(vendor(&v, m), Lookup::Vendor(name), "{m}");
    }
    // oui-data writes two spaces as a line break; the relay gives IEEE's text.
    assert_eq!(
        vendor(&v, "c0:8f:20:00:00:01"),
        Lookup::Vendor("Shenzhen Skyworth Digital  Technology  CO., Ltd")
    );
    assert_eq!(
        vendor(&v, "e0:e6:56:00:00:01"),
        Lookup::Vendor("Nethesis  srl")
    );
    assert!(v.repaired.values().all(|n| !n.contains('\n')));
    assert!(v.repaired.len() > 100, "{}", v.repaired.len());
    // Unassigned.
    assert_eq!(vendor(&v, "0c:8f:20:00:00:01"), Lookup::Unknown);
    assert_eq!(vendor(&v, "f4:f4:f0:00:00:01"), Lookup::Unknown);
}

#[test]
fn the_longest_block_wins_and_the_operators_at_equal_length() {
    let v = with_fixture();
    assert_eq!(v.file_entries(), 9);
    for (m, want) in [
        // The fixture's own blocks, nested: MA-S in MA-M in MA-L.
        ("0c:8f:20:00:00:01", Lookup::Vendor("Fixture Large Co.")),
        ("0c:8f:20:6f:ff:ff", Lookup::Vendor("Fixture Large Co.")),
        ("0c:8f:20:70:00:01", Lookup::Vendor("Fixture Medium, Ltd.")),
        ("0c:8f:20:7a:c0:01", Lookup::Vendor("Fixture Medium, Ltd.")),
        (
            "0c:8f:20:7a:b0:01",
            Lookup::Vendor("Fixture \"Small\" GmbH"),
        ),
        (
            "0c:8f:20:7a:bf:ff",
            Lookup::Vendor("Fixture \"Small\" GmbH"),
        ),
        ("0c:8f:20:80:00:00", Lookup::Vendor("Fixture Large Co.")),
        // IAB, 9 digits, and IEEE's literal `Private` (a lower-case assignment).
        ("0c:8f:21:ab:c0:01", Lookup::Vendor("Fixture IAB Holder")),
        ("0c:8f:21:ab:d0:01", Lookup::Unknown),
        ("0c:8f:22:00:00:01", Lookup::Vendor("Private")),
        // Equal length: the operator's file (names trimmed).
        ("00:00:00:12:34:56", Lookup::Vendor("Operator's Xerox")),
        // Longer in the file, inside an embedded MA-L.
        ("3c:22:fb:50:00:01", Lookup::Vendor("Fixture Inside Apple")),
        ("3c:22:fb:60:00:01", Lookup::Vendor("Apple, Inc.")),
        // Longer embedded blocks inside the file's MA-L.
        (
            "8c:1f:64:af:a0:01",
            Lookup::Vendor("DATA ELECTRONIC DEVICES, INC"),
        ),
        ("b8:4c:87:40:00:00", Lookup::Vendor("Blum Novotest GmbH")),
        // Unknown prefixes.
        ("f4:f4:f0:00:00:01", Lookup::Unknown),
        ("1c:8f:20:00:00:01", Lookup::Unknown),
        // A CID block is for locally administered addresses: never a vendor.
        ("0a:1b:2c:00:00:01", Lookup::Local),
        ("02:00:00:00:01:01", Lookup::Local),
    ] {
        assert_eq!(vendor(&v, m), want, "{m}");
    }
    // The file's MA-L does cover what no longer embedded block holds.
    let covered = (0..=0xfff_u64)
        .map(|low| Mac(0x8c1f_6400_0000 | low << 12))
        .filter(|m| v.lookup(*m) == Lookup::Vendor("Operator Registration Authority"))
        .count();
    assert!(covered > 0);
}

#[test]
fn a_later_file_wins_a_repeated_assignment() {
    let dir = tempfile_dir("later");
    let later = dir.join("later.csv");
    std::fs::write(
        &later,
        "Registry,Assignment,Organization Name,Organization Address\n\
         MA-L,0C8F20,Renamed Large Co.,\n",
    )
    .unwrap();
    let v = Vendors::load(&[fixture(), later.clone()]).unwrap();
    assert_eq!(
        vendor(&v, "0c:8f:20:00:00:01"),
        Lookup::Vendor("Renamed Large Co.")
    );
    assert_eq!(v.file_entries(), 9);
    let v = Vendors::load(&[later, fixture()]).unwrap();
    assert_eq!(
        vendor(&v, "0c:8f:20:00:00:01"),
        Lookup::Vendor("Fixture Large Co.")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn tempfile_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("np-relay-vendors-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bad_files_stop_the_relay_with_the_file_the_line_and_why() {
    let dir = tempfile_dir("bad");
    let header = "Registry,Assignment,Organization Name,Organization Address\n";
    let cases: &[(&str, &[u8], &str)] = &[
        ("empty", b"", "line 1: empty"),
        (
            "no-header",
            b"MA-L,0C8F20,Large,\n",
            "line 1: the first row must be IEEE's header",
        ),
        (
            "registry",
            b"MA-L,0C8F20,Large,\nMA-X,0C8F21,Odd,\n",
            "line 3: registry \"MA-X\" is none of",
        ),
        (
            "short-ma-l",
            b"MA-L,0C8F2,Large,\n",
            "line 2: MA-L assignment \"0C8F2\" is not 6 hex digits",
        ),
        (
            "ma-s-as-ma-m",
            b"MA-L,0C8F20,Large,\nMA-M,0C8F207AB,Small,\n",
            "line 3: MA-M assignment \"0C8F207AB\" is not 7 hex digits",
        ),
        (
            "not-hex",
            b"MA-L,0C8F2G,Large,\n",
            "line 2: MA-L assignment \"0C8F2G\" is not 6 hex digits",
        ),
        (
            "no-name",
            b"MA-L,0C8F20,  ,addr\n",
            "line 2: no organization name",
        ),
        (
            "two-fields",
            b"MA-L,0C8F20\n",
            "line 2: 2 fields; a row has at least 3",
        ),
        ("utf8", b"MA-L,0C8F20,Large\xff,\n", "line 2: "),
    ];
    for (name, rows, want) in cases {
        let path = dir.join(format!("{name}.csv"));
        let mut text = if *name == "empty" || *name == "no-header" {
            Vec::new()
        } else {
            header.as_bytes().to_vec()
        };
        text.extend_from_slice(rows);
        std::fs::write(&path, text).unwrap();
        let err = Vendors::load(&[fixture(), path.clone()])
            .err()
            .unwrap_or_else(|| panic!("{name} loaded"));
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("invalid vendor file {} ", path.display())),
            "{name}: {msg}"
        );
        assert!(msg.contains(want), "{name}: {msg}");
    }
    let missing = dir.join("missing.csv");
    let err = Vendors::load(std::slice::from_ref(&missing))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with(&format!("cannot read vendor file {}: ", missing.display())),
        "{err}"
    );
    // A byte-order mark before the header is IEEE's header still.
    let bom = dir.join("bom.csv");
    std::fs::write(&bom, format!("\u{feff}{header}MA-L,0C8F20,Large,\n")).unwrap();
    assert_eq!(Vendors::load(&[bom]).unwrap().file_entries(), 1);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn every_device_route_is_a_route_of_the_table() {
    for (method, pattern) in DEVICE_ROUTES {
        assert!(
            netpilot_proto::routes::ROUTES
                .iter()
                .any(|r| r.method == *method && r.pattern == *pattern),
            "{} {pattern} is not in the route table",
            method.as_str()
        );
    }
    assert!(lists_devices(Method::Get, "/api/scan"));
    assert!(lists_devices(Method::Put, "/api/groups/{id}/policy"));
    assert!(!lists_devices(Method::Delete, "/api/groups/{id}"));
    assert!(!lists_devices(Method::Get, "/api/wifi/status"));
}

proptest! {
    /// Random locally administered MACs never name a vendor, whatever the
    /// registry holds; random global ones look up without fail.
    #[test]
    fn random_macs(bits in any::<u64>()) {
        let v = with_fixture_once();
        let local = Mac(bits & 0xffff_ffff_ffff | 0x0200_0000_0000);
        prop_assert_eq!(v.lookup(local), Lookup::Local);
        let global = Mac(bits & 0xfdff_ffff_ffff);
        prop_assert_ne!(v.lookup(global), Lookup::Local);
    }
}

fn with_fixture_once() -> &'static Vendors {
    static V: std::sync::OnceLock<Vendors> = std::sync::OnceLock::new();
    V.get_or_init(with_fixture)
}
