//! What the relay accepts from a router as the answer to a forwarded call. A router
//! is not trusted to speak for the relay: its answer passes only as an envelope of
//! the agent's own (`application/json`, `success`, `data` or `error{code,message}`,
//! `meta`) whose error code is one an agent may send, with that code's status; the
//! one exception is the usage-history CSV export, streamed as `text/csv`. Pure: the
//! forwarding shell reads the bytes and asks here.

use std::time::Duration;

use netpilot_proto::{ErrorBody, ErrorCode, Meta};
use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::config::ForwardLimits;

/// The route that may answer with a CSV file instead of an envelope.
pub const EXPORT_ROUTE: &str = "/api/device-usage/history";

/// The content type the relay gives the export, whatever the router said.
pub const CSV: &str = "text/csv; charset=utf-8";

/// Routes whose answers list devices, groups, domains or usage history: these may
/// legitimately be larger than a single object.
const LIST_ROUTES: &[&str] = &[
    "/api/scan",
    "/api/blocked",
    "/api/whitelist",
    "/api/blacklist",
    "/api/groups",
    "/api/groups/{id}",
    "/api/device-usage/current",
    "/api/device-usage/history",
    "/api/device-usage/summary",
    "/api/dns/categories",
    "/api/dns/categories/{name}",
];

/// How a call's answer is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// An envelope, read whole (at most `cap` bytes) and checked.
    Json { cap: usize },
    /// The CSV export: streamed through, at most `cap` bytes within `deadline` of
    /// the call's start. An error answer to it is still an envelope (`error_cap`).
    Export {
        cap: u64,
        deadline: Duration,
        error_cap: usize,
    },
}

/// What a call to `pattern` with `query` may answer.
pub fn expect(pattern: &str, query: &[(String, String)], limits: &ForwardLimits) -> Expect {
    let csv = pattern == EXPORT_ROUTE && query.iter().any(|(k, v)| k == "format" && v == "csv");
    if csv {
        Expect::Export {
            cap: limits.export_max_bytes,
            deadline: limits.export_deadline,
            error_cap: limits.answer_max_bytes,
        }
    } else if LIST_ROUTES.contains(&pattern) {
        Expect::Json {
            cap: limits.list_answer_max_bytes,
        }
    } else {
        Expect::Json {
            cap: limits.answer_max_bytes,
        }
    }
}

/// Whether a head announces the CSV export (then its body is streamed).
pub fn is_csv(status: u16, content_type: Option<&str>) -> bool {
    status == 200 && mime(content_type).eq_ignore_ascii_case("text/csv")
}

/// Whether a content type is JSON's.
pub fn is_json(content_type: Option<&str>) -> bool {
    mime(content_type).eq_ignore_ascii_case("application/json")
}

/// The envelope as checked: its data is skipped over (validated as JSON, never
/// built), its error and meta read.
#[derive(Deserialize)]
struct Shape {
    success: bool,
    #[serde(default)]
    data: Option<IgnoredAny>,
    #[serde(default)]
    error: Option<ErrorBody>,
    #[allow(dead_code)] // required, not used: an answer without it is not an envelope
    meta: Meta,
}

/// Checks a router's whole answer; `Err` says why it is not passed on.
pub fn check(status: u16, content_type: Option<&str>, body: &[u8]) -> Result<(), String> {
    if !is_json(content_type) {
        return Err(format!(
            "content type {:?} is not application/json",
            truncate(content_type.unwrap_or(""))
        ));
    }
    let shape: Shape =
        serde_json::from_slice(body).map_err(|e| format!("not an answer envelope: {e}"))?;
    match (shape.success, shape.error) {
        (true, None) if (200..300).contains(&status) => Ok(()),
        (true, None) => Err(format!("a success answered with status {status}")),
        (true, Some(_)) => Err("a success that carries an error".into()),
        (false, None) => Err("a failure without an error".into()),
        (false, Some(_)) if shape.data.is_some() => Err("a failure that carries data".into()),
        (false, Some(err)) => {
            let code = ErrorCode::parse(&err.code)
                .ok_or_else(|| format!("unknown error code {:?}", truncate(&err.code)))?;
            if !code.agent_may_send() {
                return Err(format!("error code {code} is the relay's, not a router's"));
            }
            if code.status() != status {
                return Err(format!(
                    "error code {code} answered with status {status}, not {}",
                    code.status()
                ));
            }
            Ok(())
        }
    }
}

fn mime(content_type: Option<&str>) -> &str {
    content_type
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
}

/// Router-chosen text in a message stays short.
fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Option<&str> = Some("application/json");

    fn err(code: &str) -> String {
        format!(
            r#"{{"success":false,"error":{{"code":"{code}","message":"m"}},"meta":{{"duration_ms":1}}}}"#
        )
    }

    #[test]
    fn the_agents_own_answers_pass() {
        let ok = br#"{"success":true,"data":{"a":[1,2,{"b":null}]},"meta":{"duration_ms":3,"request_id":"x"}}"#;
        assert_eq!(check(200, JSON, ok), Ok(()));
        assert_eq!(
            check(201, Some("application/json; charset=utf-8"), ok),
            Ok(())
        );
        let null_data = br#"{"success":true,"data":null,"meta":{"duration_ms":0}}"#;
        assert_eq!(check(200, JSON, null_data), Ok(()));
        assert_eq!(check(400, JSON, err("INVALID_MAC").as_bytes()), Ok(()));
        assert_eq!(check(501, JSON, err("NOT_IMPLEMENTED").as_bytes()), Ok(()));
        assert_eq!(check(429, JSON, err("SPEEDTEST_BUSY").as_bytes()), Ok(()));
    }

    #[test]
    fn anything_else_is_refused() {
        let ok = br#"{"success":true,"data":1,"meta":{"duration_ms":3}}"#;
        let (unauthorized, revoked, session, mac, unknown) = (
            err("UNAUTHORIZED"),
            err("ROUTER_REVOKED"),
            err("SESSION_INVALID"),
            err("INVALID_MAC"),
            err("NO_SUCH_CODE"),
        );
        let cases: &[(u16, Option<&str>, &[u8], &str)] = &[
            (200, Some("text/html"), b"<script>alert(1)</script>", "content type"),
            (200, None, ok, "content type"),
            (200, JSON, b"<html>", "envelope"),
            (200, JSON, b"[1,2]", "envelope"),
            (200, JSON, br#"{"success":true,"data":1}"#, "envelope"),
            (200, JSON, br#"{"success":true,"data":1,"meta":{"duration_ms":1}} x"#, "envelope"),
            (401, JSON, ok, "status 401"),
            (302, JSON, ok, "status 302"),
            (401, JSON, unauthorized.as_bytes(), "relay's"),
            (403, JSON, revoked.as_bytes(), "relay's"),
            (401, JSON, session.as_bytes(), "relay's"),
            (500, JSON, mac.as_bytes(), "not 400"),
            (400, JSON, unknown.as_bytes(), "unknown"),
            (500, JSON, br#"{"success":false,"meta":{"duration_ms":1}}"#, "without an error"),
            (
                400,
                JSON,
                br#"{"success":false,"data":1,"error":{"code":"INVALID_MAC","message":"m"},"meta":{"duration_ms":1}}"#,
                "carries data",
            ),
            (
                200,
                JSON,
                br#"{"success":true,"error":{"code":"INVALID_MAC","message":"m"},"meta":{"duration_ms":1}}"#,
                "carries an error",
            ),
        ];
        for (status, ct, body, why) in cases {
            let e = check(*status, *ct, body).unwrap_err();
            assert!(e.contains(why), "{status} {ct:?}: {e}");
        }
    }

    #[test]
    fn routes_get_their_caps() {
        let l = ForwardLimits::default();
        let q = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert_eq!(
            expect("/api/wifi/status", &[], &l),
            Expect::Json {
                cap: l.answer_max_bytes
            }
        );
        assert_eq!(
            expect(EXPORT_ROUTE, &q("format", "json"), &l),
            Expect::Json {
                cap: l.list_answer_max_bytes
            }
        );
        assert!(matches!(
            expect(EXPORT_ROUTE, &q("format", "csv"), &l),
            Expect::Export { cap, .. } if cap == l.export_max_bytes
        ));
        assert!(matches!(
            expect("/api/scan", &q("format", "csv"), &l),
            Expect::Json { .. }
        ));
        assert!(is_csv(200, Some("text/csv; charset=utf-8")));
        assert!(!is_csv(400, Some("text/csv")));
        assert!(!is_csv(200, Some("application/json")));
    }
}
