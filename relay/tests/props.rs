//! Bounded property tests (issue 15, "fuzzing as a habit") for the relay's argument
//! extraction: the query string parser and `http::Args`, which read every id and label
//! a caller sends, from a JSON body or the query string, in camelCase or snake_case.
//!
//! proptest (stable, an ordinary test) rather than cargo-fuzz (nightly). A fixed number
//! of cases from a fixed seed, so CI runs the same inputs each time; search wider with
//! `NETPILOT_FUZZ_CASES=100000 NETPILOT_FUZZ_SEED=$RANDOM`.

use netpilot_relay::http::{query_pairs, Args};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{Map, Value};

const CASES: u32 = 1024;

fn config() -> Config {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("NETPILOT_FUZZ_CASES").map_or(CASES, |n| n as u32),
        rng_seed: RngSeed::Fixed(env("NETPILOT_FUZZ_SEED").unwrap_or(15)),
        failure_persistence: None,
        ..Config::default()
    }
}

const NAMES: &[&str] = &[
    "sessionId",
    "session_id",
    "routerId",
    "router_id",
    "ownerUserId",
    "owner_user_id",
    "restart",
    "x",
];

fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(
            (proptest::sample::select(NAMES), "[%0-9a-fA-F=&+ -]{0,40}"),
            0..6
        )
        .prop_map(|kv| kv
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[ \t]{0,2}[0-9a-f-]{0,40}[ \t\n]{0,2}".prop_map(Value::String),
        Just(Value::Array(vec![])),
        Just(Value::Object(Map::new())),
    ]
}

fn body() -> impl Strategy<Value = Option<Map<String, Value>>> {
    proptest::option::of(
        proptest::collection::btree_map(proptest::sample::select(NAMES), value(), 0..6)
            .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arguments_never_panic_and_labels_are_clean(q in query(), body in body(), max in 1usize..200) {
        let pairs = query_pairs(Some(&q));
        let args = Args { body: body.as_ref(), query: &pairs };
        for name in ["sessionId", "routerId", "ownerUserId", "restart"] {
            let _ = args.get(name);
            let _ = args.is_null(name);
            let _ = args.opt_bool(name);
            if let Ok(Some(id)) = args.opt_uuid(name) {
                // What was accepted is what a caller would read back.
                let again = Args { body: None, query: &[(name.to_owned(), id.to_string())] };
                prop_assert_eq!(again.opt_uuid(name).ok().flatten(), Some(id));
            }
            if let Ok(label) = args.label(name, max) {
                prop_assert!(!label.is_empty() && label.chars().count() <= max);
                prop_assert_eq!(label.trim(), label.as_str());
                prop_assert!(!label.chars().any(char::is_control));
            }
        }
    }

    #[test]
    fn query_parsing_never_panics(q in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = query_pairs(Some(&String::from_utf8_lossy(&q)));
    }
}
