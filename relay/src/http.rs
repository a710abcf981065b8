//! HTTP plumbing shared by the handlers: the response body type, the per-call
//! context, envelope responses, method checks, body reading with a size cap and
//! content-type check, query parsing and ids.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use netpilot_proto::{Envelope, Meta};
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::ApiError;

/// Every relay response body: a whole buffer, or a stream made as it is sent (the
/// speed test's download, the usage CSV export passed through). The one place that
/// decides what a handler may answer with. Buffers stay unboxed: every forwarded
/// call answers with one, and boxing would cost an allocation per call; only a
/// stream pays for its box. A stream may fail: hyper then resets the HTTP/2 stream
/// (or closes the HTTP/1.1 connection before the last chunk), so a cut stream is
/// never taken for a whole one.
pub type Body = Either<Full<Bytes>, BoxBody<Bytes, BoxError>>;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body from bytes held in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// A response body produced frame by frame; its size hint and end of stream pass
/// through the box, so a stream without a length is still sent chunked.
pub fn stream<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    Either::Right(BoxBody::new(body.map_err(|never| match never {})))
}

/// A response body produced frame by frame that may end in an error (cut).
pub fn fallible_stream<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    Either::Right(BoxBody::new(body.map_err(Into::into)))
}
pub use hyper::http::response::Parts;

/// Per-call facts every response needs.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub started: Instant,
    pub request_id: String,
}

impl Ctx {
    pub fn new(incoming_id: Option<&HeaderValue>) -> Ctx {
        let request_id = incoming_id
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_owned)
            .unwrap_or_else(next_request_id);
        Ctx {
            started: Instant::now(),
            request_id,
        }
    }

    pub fn meta(&self) -> Meta {
        Meta {
            duration_ms: self.started.elapsed().as_millis() as u64,
            request_id: Some(self.request_id.clone()),
        }
    }
}

/// Request ids: a random per-process prefix and a counter; unique without a syscall.
fn next_request_id() -> String {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| Uuid::new_v4().simple().to_string()[..8].to_owned());
    format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn json_response<T: Serialize>(status: StatusCode, body: &T, ctx: &Ctx) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header("x-request-id", &ctx.request_id)
        .body(full(bytes))
        .expect("static response parts")
}

pub fn ok<T: Serialize>(status: StatusCode, data: T, ctx: &Ctx) -> Response<Body> {
    json_response(status, &Envelope::ok(data, ctx.meta()), ctx)
}

pub fn error(err: &ApiError, ctx: &Ctx) -> Response<Body> {
    let mut resp = json_response(
        err.status(),
        &Envelope::err(err.code(), err.to_string(), ctx.meta()),
        ctx,
    );
    match err {
        ApiError::MethodNotAllowed(allowed) => {
            if let Ok(v) = HeaderValue::from_str(allowed) {
                resp.headers_mut().insert(hyper::header::ALLOW, v);
            }
        }
        ApiError::LinksBusy {
            retry_after_secs, ..
        } => {
            let h = resp.headers_mut();
            h.insert(
                hyper::header::RETRY_AFTER,
                HeaderValue::from(*retry_after_secs),
            );
            // The refused agent dials a new connection when it comes back; holding
            // this one would keep a descriptor the node is short of.
            h.insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        // The agent dials another relay; nothing more comes on this connection.
        ApiError::RelayDraining => {
            resp.headers_mut()
                .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        }
        _ => {}
    }
    resp
}

pub fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(full(body))
        .expect("static response parts")
}

/// Reads a JSON object body: at most `limit` bytes, `application/json`, an object,
/// arrived whole within `within` (`timeouts.body`): a client trickling a large
/// declared body gets 408 `BODY_TIMEOUT` instead of holding the call open.
/// Returns the raw bytes (forwarded untouched) and the parsed object.
pub async fn read_json(
    req: Request<Incoming>,
    limit: usize,
    within: std::time::Duration,
) -> Result<(Bytes, Map<String, Value>), ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let is_json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let mime = v.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json")
        });
    let collected = tokio::time::timeout(within, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| ApiError::BodyTimeout(within.as_millis()))?;
    let bytes = collected
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::PayloadTooLarge(limit)
            } else {
                ApiError::InvalidParameter(format!("cannot read request body: {e}"))
            }
        })?
        .to_bytes();
    if bytes.is_empty() && is_json.is_none() {
        return Ok((bytes, Map::new()));
    }
    if is_json != Some(true) {
        return Err(ApiError::UnsupportedMediaType);
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok((bytes, map)),
        Ok(_) => Err(ApiError::InvalidParameter(
            "request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::InvalidParameter(format!("malformed JSON: {e}"))),
    }
}

/// Refuses a request whose method is not one of `methods` (405, with `Allow`).
pub fn only(req: &Request<Incoming>, methods: &[Method]) -> Result<(), ApiError> {
    if methods.contains(req.method()) {
        Ok(())
    } else {
        let allowed: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
        Err(ApiError::MethodNotAllowed(allowed.join(", ")))
    }
}

pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Where a call's arguments live: the JSON body for POST/PUT, the query otherwise.
/// The body wins; the query is a fallback for clients that put ids there.
pub struct Args<'a> {
    pub body: Option<&'a Map<String, Value>>,
    pub query: &'a [(String, String)],
}

impl Args<'_> {
    /// A string argument by its camelCase name, also accepted in snake_case.
    pub fn get(&self, camel: &str) -> Option<Value> {
        let snake = to_snake(camel);
        if let Some(body) = self.body {
            if let Some(v) = body.get(camel).or_else(|| body.get(&snake)) {
                if !v.is_null() {
                    return Some(v.clone());
                }
            }
        }
        self.query
            .iter()
            .find(|(k, _)| k == camel || *k == snake)
            .map(|(_, v)| Value::String(v.clone()))
    }

    /// The body names the argument with an explicit `null`. [`Args::get`] reads that
    /// as absent; where absent means something destructive, callers refuse it.
    pub fn is_null(&self, camel: &str) -> bool {
        let snake = to_snake(camel);
        self.body
            .and_then(|b| b.get(camel).or_else(|| b.get(&snake)))
            .is_some_and(Value::is_null)
    }

    pub fn uuid(&self, camel: &str) -> Result<Uuid, ApiError> {
        self.opt_uuid(camel)?
            .ok_or_else(|| ApiError::InvalidParameter(format!("{camel} is required")))
    }

    pub fn opt_uuid(&self, camel: &str) -> Result<Option<Uuid>, ApiError> {
        match self.get(camel) {
            None => Ok(None),
            Some(Value::String(s)) => Uuid::parse_str(s.trim()).map(Some).map_err(|_| {
                ApiError::InvalidParameter(format!("{camel} must be a UUID, got {s:?}"))
            }),
            Some(other) => Err(ApiError::InvalidParameter(format!(
                "{camel} must be a UUID string, got {other}"
            ))),
        }
    }

    pub fn opt_bool(&self, camel: &str) -> Result<Option<bool>, ApiError> {
        match self.get(camel) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if s == "true" || s == "1" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" || s == "0" => Ok(Some(false)),
            Some(other) => Err(ApiError::InvalidParameter(format!(
                "{camel} must be true or false, got {other}"
            ))),
        }
    }

    /// A user id or name: a non-empty string (or an integer) of printable characters.
    pub fn label(&self, camel: &str, max_len: usize) -> Result<String, ApiError> {
        let s = match self.get(camel) {
            Some(Value::String(s)) => s,
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            // JSON has one number type: `-128.0` is the integer -128 to JSON Schema (and
            // to the document, which allows integers), so it is read as "-128".
            Some(Value::Number(n)) if n.as_f64().is_some_and(is_exact_integer) => {
                format!("{}", n.as_f64().unwrap_or_default() as i64)
            }
            Some(other) => {
                return Err(ApiError::InvalidParameter(format!(
                    "{camel} must be a string, got {other}"
                )))
            }
            None => return Err(ApiError::InvalidParameter(format!("{camel} is required"))),
        };
        let s = s.trim().to_owned();
        if s.is_empty() || s.chars().count() > max_len {
            return Err(ApiError::InvalidParameter(format!(
                "{camel} must be 1 to {max_len} characters"
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(ApiError::InvalidParameter(format!(
                "{camel} must not contain control characters"
            )));
        }
        Ok(s)
    }
}

/// A float that is a whole number small enough to hold exactly (|x| < 2^53).
fn is_exact_integer(x: f64) -> bool {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    x.fract() == 0.0 && x.abs() < EXACT
}

fn to_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

pub fn rfc3339_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// schemathesis (issue 15) sent `"ownerUserId": -128.0`, an integer to JSON Schema.
    #[test]
    fn a_whole_float_label_reads_as_the_integer() {
        let body: Map<String, Value> =
            serde_json::from_value(serde_json::json!({"a": -128.0, "b": 1.5, "c": 1e300})).unwrap();
        let args = Args {
            body: Some(&body),
            query: &[],
        };
        assert_eq!(args.label("a", 128).unwrap(), "-128");
        assert!(args.label("b", 128).is_err());
        assert!(args.label("c", 128).is_err());
    }

    #[test]
    fn snake_alias() {
        assert_eq!(to_snake("sessionId"), "session_id");
        assert_eq!(to_snake("ownerUserId"), "owner_user_id");
    }

    #[test]
    fn args_prefer_body_and_validate_ids() {
        let mut body = Map::new();
        body.insert("sessionId".into(), Value::String("not-a-uuid".into()));
        let query = vec![("routerId".to_owned(), Uuid::nil().to_string())];
        let args = Args {
            body: Some(&body),
            query: &query,
        };
        assert!(
            matches!(args.uuid("sessionId"), Err(ApiError::InvalidParameter(m)) if m.contains("UUID"))
        );
        assert_eq!(args.uuid("routerId").unwrap(), Uuid::nil());
        assert!(
            matches!(args.uuid("missingId"), Err(ApiError::InvalidParameter(m)) if m.contains("required"))
        );
    }

    #[test]
    fn labels_reject_control_characters() {
        let mut body = Map::new();
        body.insert("name".into(), Value::String("a\nb".into()));
        body.insert("userId".into(), serde_json::json!(42));
        let args = Args {
            body: Some(&body),
            query: &[],
        };
        assert!(args.label("name", 64).is_err());
        assert_eq!(args.label("userId", 64).unwrap(), "42");
    }
}
