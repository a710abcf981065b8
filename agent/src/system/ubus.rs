//! The ubus seam: `ubus call <object> <method> <json>` and `ubus list <pattern>`,
//! as hostapd's client lists and netifd's wireless status need. [`RealUbus`] runs the
//! `ubus` CLI through the process module; [`FakeUbus`] answers from handlers, with
//! the CLI's behaviour for missing objects, since ubus does not exist off-router.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::Fut;
use crate::runtime::process::{self, ProcessError};

/// ubus's status codes (`enum ubus_msg_status`), which the CLI returns as its exit
/// code: `ubus call` on a missing object exits 4.
pub const STATUS_METHOD_NOT_FOUND: i32 = 3;
pub const STATUS_NOT_FOUND: i32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum UbusError {
    /// No such object or method (the daemon behind it is not running or not installed).
    #[error("ubus object {0} not found")]
    NotFound(String),
    /// `ubus` itself is missing, failed or timed out.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// It answered something that is not JSON.
    #[error("ubus {object} {method}: answer is not JSON: {message}")]
    Parse {
        object: String,
        method: String,
        message: String,
    },
}

pub trait Ubus: Send + Sync {
    /// Calls a method; an empty answer is `{}` (the CLI prints nothing then).
    fn call<'a>(
        &'a self,
        object: &'a str,
        method: &'a str,
        args: &'a Value,
    ) -> Fut<'a, Result<Value, UbusError>>;
    /// Object names matching a pattern such as `hostapd.*`; none is an empty list.
    fn list<'a>(&'a self, pattern: &'a str) -> Fut<'a, Result<Vec<String>, UbusError>>;
}

pub struct RealUbus {
    pub program: String,
    pub timeout: Duration,
}

impl Default for RealUbus {
    fn default() -> Self {
        RealUbus {
            program: "ubus".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

impl RealUbus {
    /// ubus's own timeout, one second inside ours so it reports rather than hangs.
    fn ubus_timeout(&self) -> String {
        self.timeout.as_secs().saturating_sub(1).max(1).to_string()
    }
}

impl Ubus for RealUbus {
    fn call<'a>(
        &'a self,
        object: &'a str,
        method: &'a str,
        args: &'a Value,
    ) -> Fut<'a, Result<Value, UbusError>> {
        Box::pin(async move {
            let t = self.ubus_timeout();
            let message = args.to_string();
            let argv = [
                self.program.as_str(),
                "-t",
                &t,
                "call",
                object,
                method,
                &message,
            ];
            match process::run(&argv, None, self.timeout).await {
                Ok(out) => parse_answer(object, method, &out),
                Err(e)
                    if matches!(
                        e.exit_code(),
                        Some(STATUS_NOT_FOUND | STATUS_METHOD_NOT_FOUND)
                    ) =>
                {
                    Err(UbusError::NotFound(format!("{object} ({method})")))
                }
                Err(e) => Err(e.into()),
            }
        })
    }

    fn list<'a>(&'a self, pattern: &'a str) -> Fut<'a, Result<Vec<String>, UbusError>> {
        Box::pin(async move {
            let t = self.ubus_timeout();
            let argv = [self.program.as_str(), "-t", &t, "list", pattern];
            match process::run(&argv, None, self.timeout).await {
                Ok(out) => Ok(parse_list(&out)),
                Err(e) if e.exit_code() == Some(STATUS_NOT_FOUND) => Ok(Vec::new()),
                Err(e) => Err(e.into()),
            }
        })
    }
}

/// The CLI's answer to `call`: pretty-printed JSON, or nothing for an empty reply.
pub fn parse_answer(object: &str, method: &str, out: &str) -> Result<Value, UbusError> {
    if out.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_str(out).map_err(|e| UbusError::Parse {
        object: object.to_owned(),
        method: method.to_owned(),
        message: e.to_string(),
    })
}

/// `ubus list` prints one object per line (`-v` adds indented signatures, skipped).
pub fn parse_list(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .map(|l| {
            // `-v` form: `'name' @id`.
            let l = l.trim();
            match l.strip_prefix('\'') {
                Some(rest) => rest.split('\'').next().unwrap_or("").to_owned(),
                None => l.to_owned(),
            }
        })
        .filter(|l| !l.is_empty())
        .collect()
}

type Handler = Arc<dyn Fn(&Value) -> Result<Value, UbusError> + Send + Sync>;

/// In-memory ubus: objects with method handlers. Like the CLI, a missing object or
/// method is [`UbusError::NotFound`], and `list` matches `prefix*` patterns.
#[derive(Default, Clone)]
pub struct FakeUbus {
    objects: Arc<Mutex<BTreeMap<String, BTreeMap<String, Handler>>>>,
}

impl FakeUbus {
    /// Registers (or replaces) a method whose answer the handler computes.
    pub fn on(
        &self,
        object: &str,
        method: &str,
        handler: impl Fn(&Value) -> Result<Value, UbusError> + Send + Sync + 'static,
    ) {
        self.objects
            .lock()
            .expect("fake ubus lock")
            .entry(object.to_owned())
            .or_default()
            .insert(method.to_owned(), Arc::new(handler));
    }

    /// Registers a method with a fixed answer.
    pub fn answer(&self, object: &str, method: &str, value: Value) {
        self.on(object, method, move |_| Ok(value.clone()));
    }

    /// Removes an object, as when its daemon stops.
    pub fn remove(&self, object: &str) {
        self.objects.lock().expect("fake ubus lock").remove(object);
    }
}

impl Ubus for FakeUbus {
    fn call<'a>(
        &'a self,
        object: &'a str,
        method: &'a str,
        args: &'a Value,
    ) -> Fut<'a, Result<Value, UbusError>> {
        // Look up under the lock, call outside it: a handler may use the fake.
        let handler = self
            .objects
            .lock()
            .expect("fake ubus lock")
            .get(object)
            .and_then(|m| m.get(method))
            .cloned();
        Box::pin(async move {
            match handler {
                Some(h) => h(args),
                None => Err(UbusError::NotFound(format!("{object} ({method})"))),
            }
        })
    }

    fn list<'a>(&'a self, pattern: &'a str) -> Fut<'a, Result<Vec<String>, UbusError>> {
        let names = self
            .objects
            .lock()
            .expect("fake ubus lock")
            .keys()
            .filter(|name| match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name.as_str() == pattern,
            })
            .cloned()
            .collect();
        Box::pin(async move { Ok(names) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_cli_list_in_both_forms() {
        let fixture = include_str!("../../fixtures/ubus/ubus-list-v.txt");
        let names = parse_list(fixture);
        assert_eq!(names, ["hotplug.button", "service", "system"]);
        assert_eq!(
            parse_list("hostapd.phy0-ap0\nhostapd.phy1-ap0\n"),
            ["hostapd.phy0-ap0", "hostapd.phy1-ap0"]
        );
        assert!(parse_list("").is_empty());
    }

    #[test]
    fn parses_call_answers() {
        let fixture = include_str!("../../fixtures/ubus/ubus-system-info-host.json");
        let v = parse_answer("system", "info", fixture).unwrap();
        assert_eq!(v["uptime"], 887);
        assert_eq!(parse_answer("x", "y", "\n").unwrap(), json!({}));
        let e = parse_answer("x", "y", "{\"a\":").unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
    }

    #[tokio::test]
    async fn fake_answers_like_the_cli() {
        let ubus = FakeUbus::default();
        ubus.answer("hostapd.phy0-ap0", "get_clients", json!({"clients": {}}));
        ubus.on("echo", "echo", |args| Ok(args.clone()));
        assert_eq!(
            ubus.call("echo", "echo", &json!({"x": 1})).await.unwrap(),
            json!({"x": 1})
        );
        assert!(matches!(
            ubus.call("hostapd.phy9-ap0", "get_clients", &json!({}))
                .await
                .unwrap_err(),
            UbusError::NotFound(_)
        ));
        assert!(matches!(
            ubus.call("echo", "nope", &json!({})).await.unwrap_err(),
            UbusError::NotFound(_)
        ));
        assert_eq!(ubus.list("hostapd.*").await.unwrap(), ["hostapd.phy0-ap0"]);
        assert!(ubus.list("network.*").await.unwrap().is_empty());
        ubus.remove("hostapd.phy0-ap0");
        assert!(ubus.list("hostapd.*").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn real_ubus_missing_is_a_typed_error() {
        // No ubus off-router: the adapter reports the missing program, it never panics.
        let ubus = RealUbus {
            program: "netpilot-no-such-ubus".into(),
            ..Default::default()
        };
        match ubus.call("system", "info", &json!({})).await {
            Err(UbusError::Process(e)) => assert!(e.is_not_found()),
            other => panic!("unexpected {other:?}"),
        }
    }
}
