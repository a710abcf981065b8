//! Bounded property tests ("fuzzing as a habit", issue 15) for every agent parser that
//! takes outside input: the domain normaliser and the list parser, the UCI text
//! format, nlbwmon's outputs, the POSIX TZ parser and the policy model's validation.
//!
//! proptest rather than cargo-fuzz: cargo-fuzz needs a nightly compiler and libFuzzer,
//! this runs on stable as an ordinary test, within CI's time. Each property runs a fixed
//! number of cases from a fixed seed, so CI runs the same inputs every time; a local
//! search goes wider with `NETPILOT_FUZZ_CASES=100000 NETPILOT_FUZZ_SEED=$RANDOM`.
//! A failure found this way becomes a named regression test next to the code it broke.
//!
//! Properties: nothing panics on arbitrary text; what is normalised stays the same when
//! normalised again; what has a writer reads back as written.

use netpilot_agent::dns::{domain, list};
use netpilot_agent::policy::model::{self, GroupIn, Mac, Target};
use netpilot_agent::policy::tz::Zone;
use netpilot_agent::uci_format::{self, Section};
use netpilot_agent::usage::parse as nlbw;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

/// Cases per property: a few seconds for the whole file in a debug build.
const CASES: u32 = 512;

fn config() -> Config {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("NETPILOT_FUZZ_CASES").map_or(CASES, |n| n as u32),
        rng_seed: RngSeed::Fixed(env("NETPILOT_FUZZ_SEED").unwrap_or(15)),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Text that looks like what each parser reads (its own alphabet, often) or anything.
fn text_from(alphabet: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(
            proptest::sample::select(alphabet.chars().collect::<Vec<_>>()),
            0..120
        )
        .prop_map(|v| v.into_iter().collect()),
        proptest::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

const DOMAIN_CHARS: &str = "abcxyz0129-_.*. \t#!|^$@[]:/ÄéЖ中。．｡\u{200b}\u{feff}xn--";
const UCI_CHARS: &str = "configoptionlistpackage '\"\\\t\n#abc_-.0123456789 é";
const NLBW_CHARS: &str =
    "{}[],:\"\n\t-.0123456789abcdef e+EfamilyprotomacipconnsrxtxBytes\"columns\"data\"";
const TZ_CHARS: &str = "CETESTPDUTC<>+-0123456789,.:/JM ";

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u32..1_100_000_000).prop_map(Value::from),
        text_from("0123456789:.-abcdefABCDEF monsunday24:00blockallow").prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        let keys = proptest::sample::select(vec![
            "id",
            "name",
            "devices",
            "mac",
            "ip",
            "ipv6",
            "ip6",
            "policy",
            "bandwidth",
            "downloadKbps",
            "upload_kbps",
            "internet",
            "dns",
            "categories",
            "blockDomains",
            "allow_domains",
            "blockQuic",
            "schedules",
            "days",
            "start",
            "end",
            "action",
            "limit",
            "x",
        ]);
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(keys, inner, 0..6).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn domain_normalisation_never_panics_and_is_idempotent(s in text_from(DOMAIN_CHARS)) {
        if let Ok(d) = domain::normalize(&s) {
            let again = domain::normalize(d.as_str());
            prop_assert_eq!(again.as_ref(), Ok(&d), "{:?} -> {:?}", s, d);
            prop_assert!(d.as_str().len() <= 253);
            prop_assert!(d.as_str().bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
        }
    }

    #[test]
    fn list_parsing_never_panics_and_keeps_only_normal_names(body in text_from(DOMAIN_CHARS)) {
        for parsed in [list::parse_text(&body), list::parse_items(&body.lines().map(str::to_owned).collect::<Vec<_>>())] {
            prop_assert!(parsed.domains.windows(2).all(|w| w[0] < w[1]), "sorted, deduplicated");
            for d in &parsed.domains {
                let again = domain::normalize(d.as_str());
                prop_assert_eq!(again.as_ref(), Ok(d));
            }
            prop_assert!(parsed.errors.len() <= parsed.error_count);
        }
    }

    #[test]
    fn uci_text_parsing_never_panics(text in text_from(UCI_CHARS)) {
        let _ = uci_format::parse(&text);
    }

    #[test]
    fn uci_export_reads_back_as_written(sections in proptest::collection::vec(section(), 0..5)) {
        let text = uci_format::export("pkg", &sections);
        prop_assert_eq!(uci_format::parse(&text), Ok(sections), "{}", text);
    }

    #[test]
    fn nlbw_parsers_never_panic(text in text_from(NLBW_CHARS)) {
        if let Ok(rows) = nlbw::json(&text) {
            let _ = nlbw::aggregate(&rows);
        }
        if let Ok(rows) = nlbw::csv(&text) {
            let _ = nlbw::aggregate(&rows);
        }
        let _ = nlbw::list(&text);
    }

    #[test]
    fn tz_parsing_never_panics_and_offsets_are_sane(text in text_from(TZ_CHARS), at in any::<i64>()) {
        if let Ok(zone) = Zone::parse(&text) {
            let at = at / 4; // far from i64's ends, where no clock will ever be
            let offset = zone.offset_at(at);
            prop_assert!(offset.abs() <= 25 * 3600, "{:?}: offset {}", text, offset);
            if let Some(next) = zone.next_transition(at) {
                prop_assert!(next > at, "{:?}: transition {} not after {}", text, next, at);
            }
        }
    }

    #[test]
    fn group_validation_never_panics(v in json_value(), path_id in proptest::option::of(0u32..1000)) {
        if let Ok(g) = serde_json::from_value::<GroupIn>(v) {
            if let Ok(group) = g.validate(path_id) {
                prop_assert!(group.name.len() <= model::MAX_NAME_BYTES);
                prop_assert!(group.id <= model::MAX_GROUP_ID);
            }
        }
    }

    #[test]
    fn macs_and_targets_normalise_idempotently(s in text_from("0123456789abcdefABCDEF:-. g"), ip in any::<String>()) {
        if let Ok(m) = Mac::parse(&s) {
            prop_assert_eq!(Mac::parse(&m.to_string()), Ok(m));
            prop_assert!(m.0[0] & 1 == 0 && m.0 != [0; 6]);
        }
        let _ = Target::from_parts(Some(&ip), None);
        let _ = Target::from_parts(None, Some(&s));
    }

    #[test]
    fn times_of_day_read_back(s in text_from("0123456789:+- "), h in 0u16..24, m in 0u16..60) {
        let _ = model::parse_time("start", &s, true);
        let min = h * 60 + m;
        prop_assert_eq!(model::parse_time("start", &model::format_time(min), false), Ok(min));
    }
}

/// A section `uci export` could print: names as uci allows them, any value on one line.
fn section() -> impl Strategy<Value = Section> {
    let name = "[a-zA-Z0-9_]{1,12}";
    let value = "[^\n\r]{0,24}";
    (
        name,
        proptest::option::of(name),
        proptest::collection::vec((name, value, any::<bool>()), 0..6),
    )
        .prop_map(|(kind, name, entries)| {
            let mut s = Section {
                kind,
                name,
                values: Vec::new(),
                lists: Vec::new(),
            };
            for (k, v, is_list) in entries {
                // One key is either an option or a list in a section, never both.
                let listed = s.is_list(&k);
                let known = s.values.iter().any(|(key, _)| *key == k);
                if (is_list && !known) || listed {
                    if !listed {
                        s.lists.push(k.clone());
                    }
                    s.values.push((k, v));
                } else if !known {
                    s.values.push((k, v));
                }
            }
            s
        })
}
