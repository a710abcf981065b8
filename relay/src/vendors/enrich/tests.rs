use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;
use crate::vendors::tests::with_fixture;

/// Known MACs of the fixture and the embedded registry.
const APPLE: &str = "3c:22:fb:60:00:01";
const MA_S: &str = "0c:8f:20:7a:b0:01";
const MA_M_COMMA: &str = "0c:8f:20:70:00:01";
const PRIVATE: &str = "02:00:00:00:01:01";
const UNKNOWN: &str = "f4:f4:f0:00:00:01";

fn enriched(input: &str) -> (String, Counts) {
    let v = with_fixture();
    let (out, counts) = json(input.as_bytes(), &v);
    (String::from_utf8(out.into_owned()).unwrap(), counts)
}

/// The output with every `,"vendor":<string or null>` taken out, as the test
/// inputs hold none of their own.
fn strip_inserted(out: &str) -> String {
    let mut s = out.as_bytes();
    let mut kept = Vec::new();
    while let Some(at) = find(s, MEMBER) {
        kept.extend_from_slice(&s[..at]);
        let rest = &s[at + MEMBER.len()..];
        let skip = if rest.starts_with(b"null") {
            4
        } else {
            string_end(rest, 0).0
        };
        s = &rest[skip..];
    }
    kept.extend_from_slice(s);
    String::from_utf8(kept).unwrap()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn envelope(data: Value) -> String {
    json!({"success": true, "data": data, "meta": {"duration_ms": 3, "request_id": "r-1"}})
        .to_string()
}

#[test]
fn every_device_object_gets_its_vendor_last_and_nothing_else_changes() {
    let input = envelope(json!({
        "timestamp": 1_700_000_000,
        "total": 5,
        "devices": [
            {"mac": APPLE, "ip": "192.168.1.10", "hostname": "phone", "online": true},
            {"mac": MA_S, "ip": null, "wireless": {"band": "5g", "signal_dbm": -51}},
            {"mac": PRIVATE, "randomized": true},
            {"mac": UNKNOWN, "usage": {"bytes_rx": 1, "top_protocols": [{"name": "HTTPS", "bytes": 9}]}},
            {"mac": MA_M_COMMA},
        ],
        "sources": {"leases": {"state": "ok"}},
    }));
    let (out, counts) = enriched(&input);
    assert_eq!(strip_inserted(&out), input);
    assert_eq!(
        counts,
        Counts {
            hit: 3,
            miss: 1,
            private: 1
        }
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let devices = v["data"]["devices"].as_array().unwrap();
    let vendors: Vec<&Value> = devices.iter().map(|d| &d["vendor"]).collect();
    assert_eq!(
        vendors,
        [
            &json!("Apple, Inc."),
            &json!("Fixture \"Small\" GmbH"),
            &Value::Null,
            &Value::Null,
            &json!("Fixture Medium, Ltd."),
        ]
    );
    // On the devices, nowhere else.
    for d in devices {
        assert!(d.get("wireless").is_none_or(|w| w.get("vendor").is_none()));
    }
    assert!(v["data"]["sources"].get("vendor").is_none());
    assert!(v.get("vendor").is_none());
    assert_eq!(out.matches("\"vendor\":").count(), 5);
    // As the last member (this serde_json writes keys sorted).
    assert!(
        out.contains(&format!(
            r#"{{"hostname":"phone","ip":"192.168.1.10","mac":"{APPLE}","online":true,"vendor":"Apple, Inc."}}"#
        )),
        "{out}"
    );
    assert!(
        out.contains(
            r#""wireless":{"band":"5g","signal_dbm":-51},"vendor":"Fixture \"Small\" GmbH"}"#
        ),
        "{out}"
    );
}

#[test]
fn nested_device_lists_of_every_device_answer_are_enriched() {
    // A group (GET /api/groups/{id}, group changes), usage (one device, history,
    // summary): devices at different depths.
    let group = envelope(json!({"group": {"id": 3, "name": "Kids", "devices": [
        {"mac": APPLE, "ip": null, "ipv6": null, "name": null}], "policy": {"internet": "allow"}},
        "apply": {"changed": true}}));
    let one =
        envelope(json!({"timestamp": 1, "period": null, "device": {"mac": MA_S, "bytes_rx": 5}}));
    let history = envelope(
        json!({"days": 7, "devices": [{"mac": APPLE, "hostname": null,
        "total_bytes": 3, "days": [{"date": "2026-12-01", "bytes_rx": 1, "bytes_tx": 2, "total_bytes": 3}]}],
        "daily_totals": [{"date": "2026-12-01", "bytes": 3}]}),
    );
    for input in [group, one, history] {
        let (out, counts) = enriched(&input);
        assert_eq!(counts.total(), 1, "{out}");
        assert_eq!(strip_inserted(&out), input);
        assert_eq!(out.matches("\"vendor\":").count(), 1, "{out}");
        serde_json::from_str::<Value>(&out).unwrap();
    }
}

#[test]
fn strings_with_quotes_braces_and_escapes_do_not_confuse_it() {
    let input = format!(
        r#"{{"success":true,"data":{{"devices":[{{"hostname":"a\"}},{{\"mac\":\"x\"}}]\\","mac":"{APPLE}","note":"{{[,:]}}"}},{{"m\u0061c":"{MA_S}","k\"ey":"\u007b"}},{{"name":"mac","value":["mac","{APPLE}"]}},{{"mac":"0c:8f:20:70:00:01\u0000"}},{{"mac":"\u0030c:8f:20:70:00:01"}}]}},"meta":{{"duration_ms":0}}}}"#
    );
    serde_json::from_str::<Value>(&input).expect("the test input is JSON");
    let (out, counts) = enriched(&input);
    assert_eq!(strip_inserted(&out), input);
    let v: Value = serde_json::from_str(&out).unwrap();
    let d = &v["data"]["devices"];
    assert_eq!(d[0]["vendor"], json!("Apple, Inc."));
    // An escaped key is still `mac`.
    assert_eq!(d[1]["vendor"], json!("Fixture \"Small\" GmbH"));
    // `mac` as a value, in an object or an array, is no member.
    assert!(d[2].get("vendor").is_none());
    // A MAC with a trailing NUL is not one; an escaped digit is the digit.
    assert_eq!(d[3]["vendor"], Value::Null);
    assert_eq!(d[4]["vendor"], json!("Fixture Medium, Ltd."));
    assert_eq!(
        counts,
        Counts {
            hit: 3,
            miss: 1,
            private: 0
        }
    );
}

#[test]
fn pretty_printed_answers_keep_their_layout() {
    let input = format!(
        "{{\n  \"success\": true,\n  \"data\": {{\n    \"devices\": [\n      {{\n        \"mac\": \"{APPLE}\",\n        \"ip\": \"10.0.0.2\"\n      }},\n      {{\n        \"mac\": \"{PRIVATE}\",\n        \"ips\": []\n      }},\n      {{}}\n    ]\n  }},\n  \"meta\": {{\n    \"duration_ms\": 1\n  }}\n}}"
    );
    serde_json::from_str::<Value>(&input).expect("the test input is JSON");
    let (out, _) = enriched(&input);
    assert_eq!(strip_inserted(&out), input);
    // The member goes right after the last value, before the closing line.
    assert!(
        out.contains("\"ip\": \"10.0.0.2\",\"vendor\":\"Apple, Inc.\"\n      }"),
        "{out}"
    );
    assert!(
        out.contains("\"ips\": [],\"vendor\":null\n      }"),
        "{out}"
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["data"]["devices"][2], json!({}));
}

#[test]
fn numbers_whitespace_and_objects_with_a_vendor_stay_as_they_are() {
    let input = format!(
        "{{ \"success\" : true ,\t\"data\" : {{ \"n\" : [1.0e3, -0, 1E+2, 0.000001, 123456789012345678901234567890],\r\n\
         \"devices\" : [ {{ \"vendor\" : \"Kept\" , \"mac\" : \"{APPLE}\" }} , {{ \"mac\" : \"{APPLE}\" , \"vendor\" : null }} ,\n\
         {{ \"mac\" : null }} , {{ \"mac\" : 17 }} , {{ \"mac\" : {{\"x\": 1}} }} , {{ \"mac\" : \"{APPLE}\" }} ] }} , \"meta\" : {{ \"duration_ms\" : 0 }} }}"
    );
    serde_json::from_str::<Value>(&input).expect("the test input is JSON");
    let (out, counts) = enriched(&input);
    let v: Value = serde_json::from_str(&out).unwrap();
    let d = &v["data"]["devices"];
    assert_eq!(d[0]["vendor"], json!("Kept"));
    assert_eq!(d[1]["vendor"], Value::Null);
    assert_eq!(d[2]["vendor"], Value::Null);
    assert_eq!(d[3]["vendor"], Value::Null);
    assert_eq!(d[4]["vendor"], Value::Null);
    assert!(d[4]["mac"].get("vendor").is_none());
    assert_eq!(d[5]["vendor"], json!("Apple, Inc."));
    assert_eq!(
        counts,
        Counts {
            hit: 1,
            miss: 3,
            private: 0
        }
    );
    // Exactly four members added, each right after its object's last value.
    let want = input
        .replace("{ \"mac\" : null }", "{ \"mac\" : null,\"vendor\":null }")
        .replace("{ \"mac\" : 17 }", "{ \"mac\" : 17,\"vendor\":null }")
        .replace(
            "{ \"mac\" : {\"x\": 1} }",
            "{ \"mac\" : {\"x\": 1},\"vendor\":null }",
        )
        .replace(
            &format!("{{ \"mac\" : \"{APPLE}\" }} ]"),
            &format!("{{ \"mac\" : \"{APPLE}\",\"vendor\":\"Apple, Inc.\" }} ]"),
        );
    assert_eq!(out, want);
}

#[test]
fn answers_without_devices_come_back_borrowed() {
    let v = with_fixture();
    for input in [
        envelope(json!({"ok": 1, "list": [{"target": APPLE, "kind": "mac"}]})),
        envelope(Value::Null),
        r#"{"success":false,"error":{"code":"INVALID_MAC","message":"mac"},"meta":{"duration_ms":0}}"#.to_owned(),
    ] {
        let (out, counts) = json(input.as_bytes(), &v);
        assert!(matches!(out, Cow::Borrowed(_)), "{input}");
        assert_eq!(counts, Counts::default());
    }
}

#[test]
fn names_are_written_as_json_strings() {
    let mut out = Vec::new();
    json_string("a \"b\" \\ c\n\t\u{1}é", &mut out);
    let back: String = serde_json::from_slice(&out).unwrap();
    assert_eq!(back, "a \"b\" \\ c\n\t\u{1}é");
}

#[test]
fn a_large_answer_is_enriched_in_one_pass() {
    let devices: Vec<Value> = (0..20_000u32)
        .map(|i| json!({"mac": format!("3c:22:fb:{:02x}:{:02x}:{:02x}", i >> 16, (i >> 8) & 255, i & 255), "i": i}))
        .collect();
    let input = envelope(json!({ "devices": devices }));
    let (out, counts) = enriched(&input);
    assert_eq!(counts.total(), 20_000);
    assert_eq!(strip_inserted(&out), input);
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        "[\\\\\"{}\\[\\],:a-c]{0,8}".prop_map(Value::from),
        prop_oneof![Just(APPLE), Just(MA_S), Just(PRIVATE), Just(UNKNOWN)].prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::vec(
                (
                    prop_oneof![Just("mac".to_owned()), "[a-z\"{}\\\\]{0,4}"],
                    inner
                ),
                0..6
            )
            .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Any JSON, compact or pretty: the output is JSON, every object with a `mac`
    /// gains a `vendor`, and without the added members it is the input.
    #[test]
    fn any_json_stays_itself_plus_vendors(value in json_value(), pretty in any::<bool>()) {
        let input = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            value.to_string()
        };
        prop_assume!(!input.contains("vendor"));
        let (out, counts) = enriched(&input);
        prop_assert_eq!(strip_inserted(&out), input.clone());
        let parsed: Value = serde_json::from_str(&out).unwrap();
        fn check(v: &Value) -> u64 {
            match v {
                Value::Object(m) => {
                    let mine = u64::from(m.contains_key("mac"));
                    assert_eq!(m.contains_key("vendor"), m.contains_key("mac"), "{v}");
                    mine + m.values().map(check).sum::<u64>()
                }
                Value::Array(a) => a.iter().map(check).sum(),
                _ => 0,
            }
        }
        prop_assert_eq!(check(&parsed), counts.total());
    }

    /// Bytes that are not JSON at all never panic it.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(prop_oneof![
        Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b'\\'),
        Just(b','), Just(b':'), Just(b' '), Just(b'm'), Just(b'a'), Just(b'c'), any::<u8>()], 0..200)) {
        let v = with_fixture_shared();
        let _ = json(&bytes, v);
        let mut out = Vec::new();
        let mut csv = Csv::new();
        csv.push(&bytes, v, &mut out);
        csv.finish(v, &mut out);
    }
}

fn with_fixture_shared() -> &'static Vendors {
    static V: std::sync::OnceLock<Vendors> = std::sync::OnceLock::new();
    V.get_or_init(with_fixture)
}

// ---- CSV ----

fn csv_all(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Counts) {
    let v = with_fixture_shared();
    let mut csv = Csv::new();
    let mut out = Vec::new();
    let mut from = 0;
    for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
        csv.push(&input[from..cut], v, &mut out);
        from = cut;
    }
    csv.finish(v, &mut out);
    (out, csv.counts())
}

/// The export as the agent writes it, with what makes CSV hard in its hostnames.
fn export(line_end: &str, last_newline: bool) -> String {
    let rows = [
        format!("2026-12-01,{APPLE},phone,1,2,3"),
        format!("2026-12-01,{MA_M_COMMA},\"a,b\",4,5,9"),
        format!("2026-12-01,{MA_S},\"say \"\"hi\"\"\",1,1,2"),
        format!("2026-12-02,{PRIVATE},\"two\nlines\r\nhere\",0,0,0"),
        format!("2026-12-02,{UNKNOWN},,7,0,7"),
        "2026-12-02,not-a-mac,x,1,0,1".to_owned(),
        format!("2026-12-03,\"{APPLE}\",quoted-mac,1,0,1"),
    ];
    let mut s = format!("date,mac,hostname,bytes_rx,bytes_tx,total_bytes{line_end}");
    for (i, r) in rows.iter().enumerate() {
        s.push_str(r);
        if i + 1 < rows.len() || last_newline {
            s.push_str(line_end);
        }
    }
    s
}

fn export_enriched(line_end: &str, last_newline: bool) -> String {
    let rows = [
        format!("2026-12-01,{APPLE},phone,1,2,3,\"Apple, Inc.\""),
        format!("2026-12-01,{MA_M_COMMA},\"a,b\",4,5,9,\"Fixture Medium, Ltd.\""),
        format!("2026-12-01,{MA_S},\"say \"\"hi\"\"\",1,1,2,\"Fixture \"\"Small\"\" GmbH\""),
        format!("2026-12-02,{PRIVATE},\"two\nlines\r\nhere\",0,0,0,"),
        format!("2026-12-02,{UNKNOWN},,7,0,7,"),
        "2026-12-02,not-a-mac,x,1,0,1,".to_owned(),
        format!("2026-12-03,\"{APPLE}\",quoted-mac,1,0,1,\"Apple, Inc.\""),
    ];
    let mut s = format!("date,mac,hostname,bytes_rx,bytes_tx,total_bytes,vendor{line_end}");
    for (i, r) in rows.iter().enumerate() {
        s.push_str(r);
        if i + 1 < rows.len() || last_newline {
            s.push_str(line_end);
        }
    }
    s
}

#[test]
fn the_export_gets_a_vendor_column_at_the_end() {
    for line_end in ["\n", "\r\n"] {
        for last_newline in [true, false] {
            let input = export(line_end, last_newline);
            let (out, counts) = csv_all(input.as_bytes(), &[]);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                export_enriched(line_end, last_newline),
                "{line_end:?} {last_newline}"
            );
            assert_eq!(
                counts,
                Counts {
                    hit: 4,
                    miss: 2,
                    private: 1
                }
            );
        }
    }
}

#[test]
fn chunks_may_end_anywhere() {
    for line_end in ["\n", "\r\n"] {
        for last_newline in [true, false] {
            let input = export(line_end, last_newline);
            let want = export_enriched(line_end, last_newline);
            for cut in 0..=input.len() {
                let (out, _) = csv_all(input.as_bytes(), &[cut]);
                assert_eq!(String::from_utf8(out).unwrap(), want, "cut at {cut}");
            }
            let every: Vec<usize> = (1..input.len()).collect();
            let (out, _) = csv_all(input.as_bytes(), &every);
            assert_eq!(String::from_utf8(out).unwrap(), want, "byte by byte");
        }
    }
}

#[test]
fn the_mac_column_is_found_by_name() {
    let input = format!("\"hostname\",bytes, mac \nphone,1,{APPLE}\nx,2,{MA_S}\n");
    let (out, _) = csv_all(input.as_bytes(), &[]);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!(
            "\"hostname\",bytes, mac ,vendor\nphone,1,{APPLE},\"Apple, Inc.\"\nx,2,{MA_S},\"Fixture \"\"Small\"\" GmbH\"\n"
        )
    );
    // No mac column: empty vendors, nothing looked up.
    let (out, counts) = csv_all(format!("date,host\n2026-12-01,{APPLE}\n").as_bytes(), &[]);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("date,host,vendor\n2026-12-01,{APPLE},\n")
    );
    assert_eq!(counts, Counts::default());
    // A header that has its vendor column already passes whole.
    let input = format!("mac,vendor\r\n{APPLE},Someone\r\n");
    for cut in 0..=input.len() {
        let (out, _) = csv_all(input.as_bytes(), &[cut]);
        assert_eq!(String::from_utf8(out).unwrap(), input);
    }
}

#[test]
fn odd_records_are_handled_not_mangled() {
    let long = "0".repeat(200);
    for (input, want) in [
        ("", String::new()),
        ("mac", "mac,vendor".to_owned()),
        ("mac\n", "mac,vendor\n".to_owned()),
        // Blank lines pass as they are.
        (
            &*format!("mac\n\n{APPLE}\n\r\n"),
            format!("mac,vendor\n\n{APPLE},\"Apple, Inc.\"\n\r\n"),
        ),
        // A short record, a long field where the MAC should be.
        (
            &*format!("host,mac\nx\ny,{long}\n"),
            format!("host,mac,vendor\nx,\ny,{long},\n"),
        ),
        // A lone CR is data; a stray quote in an unquoted field too.
        (
            &*format!("mac,h\n{APPLE},a\rb\"c\n"),
            format!("mac,h,vendor\n{APPLE},a\rb\"c,\"Apple, Inc.\"\n"),
        ),
        // An unterminated quote at the end: nothing added into it.
        (
            &*format!("mac,h\n{APPLE},\"open"),
            format!("mac,h,vendor\n{APPLE},\"open"),
        ),
        // A last record ending in a lone CR.
        (
            &*format!("mac\n{APPLE}\r"),
            format!("mac,vendor\n{APPLE},\"Apple, Inc.\"\r"),
        ),
    ] {
        for cut in 0..=input.len() {
            let (out, _) = csv_all(input.as_bytes(), &[cut]);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                want,
                "{input:?} cut at {cut}"
            );
        }
    }
}

#[test]
fn strings_end_where_a_byte_by_byte_scan_says() {
    fn naive(body: &[u8], start: usize) -> (usize, bool) {
        let (mut i, mut escaped) = (start + 1, false);
        while i < body.len() {
            match body[i] {
                b'"' => return (i + 1, escaped),
                b'\\' => {
                    escaped = true;
                    i += 2
                }
                _ => i += 1,
            }
        }
        (body.len(), escaped)
    }
    // Every place for a quote and a backslash around the eight-byte steps.
    for len in 0..40 {
        for q in 0..=len {
            for b in 0..=len {
                let mut s = vec![b'x'; len];
                s.insert(0, b'"');
                if q < len {
                    s[q + 1] = b'"';
                }
                if b < len && b != q {
                    s[b + 1] = b'\\';
                }
                assert_eq!(
                    string_end(&s, 0),
                    naive(&s, 0),
                    "{:?}",
                    String::from_utf8_lossy(&s)
                );
            }
        }
    }
    for x in [
        0u64,
        u64::MAX,
        0x2222_2222_2222_2222,
        0x5c00_0000_0000_0000,
        0x0000_0000_0000_0022,
    ] {
        let bytes = x.to_le_bytes();
        assert_eq!(has_byte(x, b'"') != 0, bytes.contains(&b'"'), "{x:#x}");
        assert_eq!(has_byte(x, b'\\') != 0, bytes.contains(&b'\\'), "{x:#x}");
    }
}

#[test]
fn list_entries_with_a_mac_member_get_a_vendor() {
    let input = envelope(json!({"entries": [
        {"target": APPLE, "kind": "mac", "mac": APPLE},
        {"target": "192.168.1.9", "kind": "ip", "mac": null},
        {"target": PRIVATE, "kind": "mac"},
    ], "count": 3}));
    let (out, counts) = enriched(&input);
    assert_eq!(strip_inserted(&out), input);
    let v: Value = serde_json::from_str(&out).unwrap();
    let e = &v["data"]["entries"];
    assert_eq!(e[0]["vendor"], json!("Apple, Inc."));
    assert_eq!(e[1]["vendor"], Value::Null);
    assert!(e[1].get("vendor").is_some());
    assert!(e[2].get("vendor").is_none());
    assert_eq!(
        counts,
        Counts {
            hit: 1,
            miss: 1,
            private: 0
        }
    );
}
