//! `GET /api/speedtest`: the router measures its line against its relay over a
//! separate TLS connection (not the link; see the README for the measurements
//! behind that choice): ten sequential pings for latency and jitter, then a
//! download and an upload, each ending at whichever comes first of a time and a
//! byte limit. One run at a time (a second gets 409 `SPEEDTEST_RUNNING`), and the
//! whole run is bounded well inside the relay's 30 s command timeout.
//!
//! The arithmetic (median, jitter, rates) and the argument checks are pure
//! functions; [`SpeedTester::run`] is the thin I/O shell around them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::client::conn::http1::SendRequest;
use hyper::header::CONTENT_TYPE;
use netpilot_proto::link::{SPEEDTEST_DOWNLOAD_PATH, SPEEDTEST_PING_PATH, SPEEDTEST_UPLOAD_PATH};
use serde::Serialize;

use crate::link::dial::{Exchange, RelayBody, RelayEndpoint};

/// What `method` says in the answer: measured on its own TLS connection to the relay.
pub const METHOD: &str = "tls_connection";
/// Sequential round trips for latency and jitter.
pub const PINGS: usize = 10;
/// The whole run (connect, pings, both directions) never takes longer than this:
/// the relay gives a forwarded call 30 s.
pub const TOTAL_BUDGET: Duration = Duration::from_secs(25);
/// The longest a direction may be configured to last: two of them and the pings
/// must fit in [`TOTAL_BUDGET`].
pub const MAX_DIRECTION: Duration = Duration::from_secs(10);
/// Smallest per-direction byte limit a caller may ask for.
pub const MIN_BYTES: u64 = 64 * 1024;

/// The agent's bounds for one direction of a run; callers may ask for less.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_duration: Duration,
    pub max_bytes: u64,
}

impl Default for Limits {
    /// 5 s or 100 MB per direction: a 160 Mbit/s line runs out of time, and at
    /// most 200 MB of a metered line is spent. With pings and two TLS handshakes
    /// a run takes about 11 s at most on a sane line.
    fn default() -> Self {
        Limits {
            max_duration: Duration::from_secs(5),
            max_bytes: 100_000_000,
        }
    }
}

/// One run's bounds per direction, after the caller's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunArgs {
    pub duration: Duration,
    pub bytes: u64,
}

/// Reads `maxSeconds` (a number, may be fractional) and `maxBytes` (an integer)
/// from the query; both optional, both at most the configured limits. Unknown
/// arguments are ignored (web clients add cache busters).
pub fn parse_args(query: Option<&str>, limits: &Limits) -> Result<RunArgs, &'static str> {
    let mut args = RunArgs {
        duration: limits.max_duration,
        bytes: limits.max_bytes,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "maxSeconds" | "max_seconds" => {
                args.duration = seconds(v)
                    .filter(|d| *d >= Duration::from_millis(100) && *d <= limits.max_duration)
                    .ok_or("maxSeconds must be 0.1 up to the agent's limit (seconds, up to 3 decimals)")?;
            }
            "maxBytes" | "max_bytes" => {
                args.bytes = v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (MIN_BYTES..=limits.max_bytes).contains(n))
                    .ok_or("maxBytes must be an integer from 65536 up to the agent's limit")?;
            }
            _ => {}
        }
    }
    Ok(args)
}

/// `3`, `2.5`, `0.125`: whole seconds with up to three decimals. Hand-parsed: a
/// general float parser costs the router's flash more than this whole module.
fn seconds(v: &str) -> Option<Duration> {
    let (whole, frac) = v.split_once('.').unwrap_or((v, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || whole.len() > 4 || frac.len() > 3 || !digits(whole) || !digits(frac) {
        return None;
    }
    let ms: u64 = format!("{frac:0<3}").parse().ok()?;
    Some(Duration::from_millis(
        whole.parse::<u64>().ok()? * 1000 + ms,
    ))
}

/// The median of the samples (mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    // Insertion sort: ten samples, and the library's sorts would add kilobytes of
    // generic code for f64 to the router's binary.
    let mut v = samples.to_vec();
    for i in 1..v.len() {
        let mut j = i;
        while j > 0 && v[j - 1] > v[j] {
            v.swap(j - 1, j);
            j -= 1;
        }
    }
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// Jitter as RFC 3550 and most speed tests define it loosely: the mean absolute
/// difference between consecutive round trips. `None` with fewer than two.
pub fn jitter(samples: &[f64]) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let sum: f64 = samples.windows(2).map(|w| (w[1] - w[0]).abs()).sum();
    Some(sum / (samples.len() - 1) as f64)
}

/// Megabits per second; 0 for no time at all.
pub fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / secs / 1e6
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The answer of `GET /api/speedtest`.
#[derive(Debug, Clone, Serialize)]
pub struct SpeedResult {
    pub download_mbps: f64,
    pub upload_mbps: f64,
    /// Median round trip of the pings.
    pub latency_ms: f64,
    /// Mean absolute difference of consecutive round trips.
    pub jitter_ms: f64,
    pub download_bytes: u64,
    pub upload_bytes: u64,
    /// The whole run, connection set-up included.
    pub duration_ms: u64,
    /// The relay measured against (`host:port`).
    pub server: String,
    pub method: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum SpeedtestError {
    /// Another run is in progress on this agent.
    #[error("a speed test is already running")]
    Running,
    /// The relay serves its maximum of speed tests right now.
    #[error("the relay is busy with other speed tests; try again later")]
    RelayBusy,
    /// The relay could not be reached or the connection broke.
    #[error("speed test against the relay failed: {0}")]
    Unreachable(String),
    /// The relay refused a step.
    #[error("the relay refused the speed test: {status} {message}")]
    Refused { status: u16, message: String },
    /// The run went past its time budget ([`TOTAL_BUDGET`]).
    #[error("speed test did not finish within 25 s")]
    Timeout,
}

/// Runs speed tests against the relay the agent belongs to, one at a time.
pub struct SpeedTester {
    endpoint: RelayEndpoint,
    limits: Limits,
    running: AtomicBool,
}

/// Marks a run in progress; dropping it (also on error or cancellation) ends it.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl SpeedTester {
    pub fn new(endpoint: RelayEndpoint, limits: Limits) -> Self {
        SpeedTester {
            endpoint,
            limits,
            running: AtomicBool::new(false),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub async fn run(&self, args: RunArgs) -> Result<SpeedResult, SpeedtestError> {
        if self
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(SpeedtestError::Running);
        }
        let _running = Running(&self.running);
        let started = Instant::now();
        let result = tokio::time::timeout(TOTAL_BUDGET, self.measure(args)).await;
        let mut r = result.map_err(|_| SpeedtestError::Timeout)??;
        r.duration_ms = started.elapsed().as_millis() as u64;
        Ok(r)
    }

    /// Pings, then download, then upload, all on one keep-alive connection: the
    /// relay ends the download cleanly at its limit, so the connection stays usable.
    /// One loop over the steps, so each await (send, read) exists once in the
    /// binary. Bounded by the run's budget (the caller's timeout).
    async fn measure(&self, args: RunArgs) -> Result<SpeedResult, SpeedtestError> {
        let e = &self.endpoint;
        let mut sender = e
            .http1()
            .await
            .map_err(|err| SpeedtestError::Unreachable(err.to_string()))?;
        let download = format!(
            "{SPEEDTEST_DOWNLOAD_PATH}?bytes={}&ms={}",
            args.bytes,
            args.duration.as_millis().max(1)
        );
        let mut rtts = Vec::with_capacity(PINGS);
        let (mut down, mut up) = ((0, Duration::ZERO), (0, Duration::ZERO));
        for step in 0..PINGS + 2 {
            let req = match step {
                s if s < PINGS => e
                    .request(http::Method::GET, SPEEDTEST_PING_PATH)
                    .body(RelayBody::empty()),
                s if s == PINGS => e
                    .request(http::Method::GET, &download)
                    .body(RelayBody::empty()),
                // The relay counts the upload: the agent's clock would count bytes
                // still sitting in its socket buffer as sent.
                _ => e
                    .request(http::Method::POST, SPEEDTEST_UPLOAD_PATH)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(RelayBody::generated(
                        args.bytes,
                        Instant::now() + args.duration,
                    )),
            }
            .expect("static request parts");
            let t = Instant::now();
            let resp = send(&mut sender, req).await?;
            let (n, elapsed, answer) = read(resp, step > PINGS).await?;
            match step {
                s if s < PINGS => rtts.push(t.elapsed().as_secs_f64() * 1000.0),
                s if s == PINGS => down = (n, elapsed),
                _ => up = upload_answer(&answer)?,
            }
        }
        Ok(SpeedResult {
            download_mbps: round2(mbps(down.0, down.1)),
            upload_mbps: round2(mbps(up.0, up.1)),
            latency_ms: round2(median(&rtts).unwrap_or(0.0)),
            jitter_ms: round2(jitter(&rtts).unwrap_or(0.0)),
            download_bytes: down.0,
            upload_bytes: up.0,
            duration_ms: 0,
            server: e.relay().authority.clone(),
            method: METHOD,
        })
    }
}

/// The relay's `{"data": {"bytes", "duration_us"}}` for an upload. Read as a tree:
/// serde_json's Value parser is in the binary already, a typed one would be another
/// copy on the router's flash.
fn upload_answer(body: &[u8]) -> Result<(u64, Duration), SpeedtestError> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match (
        v["data"]["bytes"].as_u64(),
        v["data"]["duration_us"].as_u64(),
    ) {
        (Some(bytes), Some(us)) => Ok((bytes, Duration::from_micros(us))),
        _ => Err(SpeedtestError::Unreachable(
            "the relay's upload answer is unreadable".into(),
        )),
    }
}

async fn send(
    sender: &mut SendRequest<RelayBody>,
    req: http::Request<RelayBody>,
) -> Result<http::Response<hyper::body::Incoming>, SpeedtestError> {
    RelayEndpoint::exchange(sender, req)
        .await
        .map_err(|e| match e {
            Exchange::Unreachable(m) => SpeedtestError::Unreachable(m),
            Exchange::Refused { status: 409, .. } => SpeedtestError::Running,
            Exchange::Refused { status: 429, .. } => SpeedtestError::RelayBusy,
            Exchange::Refused { status, message } => SpeedtestError::Refused { status, message },
        })
}

/// Reads an answer's body to the end: its length, the time from now to its last
/// byte, and (when `keep`) its first 16 KiB.
async fn read(
    resp: http::Response<hyper::body::Incoming>,
    keep: bool,
) -> Result<(u64, Duration, Vec<u8>), SpeedtestError> {
    let t0 = Instant::now();
    let mut body = resp.into_body();
    let mut received = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| SpeedtestError::Unreachable(e.to_string()))?;
        if let Some(d) = frame.data_ref() {
            received += d.len() as u64;
            if keep && kept.len() < 16 * 1024 {
                kept.extend_from_slice(d);
            }
        }
    }
    Ok((received, t0.elapsed(), kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_jitter() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(
            median(&[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]),
            Some(4.5)
        );
        assert_eq!(jitter(&[1.0]), None);
        // |12-10| + |11-12| + |15-11| = 7 over 3 differences.
        let j = jitter(&[10.0, 12.0, 11.0, 15.0]).unwrap();
        assert!((j - 7.0 / 3.0).abs() < 1e-9, "{j}");
        assert_eq!(jitter(&[5.0, 5.0, 5.0]), Some(0.0));
    }

    #[test]
    fn rates_in_megabits() {
        assert_eq!(mbps(125_000_000, Duration::from_secs(1)), 1000.0);
        assert_eq!(mbps(1_250_000, Duration::from_millis(100)), 100.0);
        assert_eq!(mbps(10, Duration::ZERO), 0.0);
        assert_eq!(round2(12.3456), 12.35);
    }

    #[test]
    fn arguments_shorten_but_never_extend() {
        let limits = Limits::default();
        let all = parse_args(None, &limits).unwrap();
        assert_eq!(
            (all.duration, all.bytes),
            (limits.max_duration, limits.max_bytes)
        );
        let a = parse_args(Some("maxSeconds=1.5&maxBytes=1000000&_=123"), &limits).unwrap();
        assert_eq!(
            (a.duration, a.bytes),
            (Duration::from_millis(1500), 1_000_000)
        );
        let a = parse_args(Some("max_seconds=2"), &limits).unwrap();
        assert_eq!(a.duration, Duration::from_secs(2));
        let a = parse_args(Some("maxSeconds=0.25"), &limits).unwrap();
        assert_eq!(a.duration, Duration::from_millis(250));
        for bad in [
            "maxSeconds=0",
            "maxSeconds=0.05",
            "maxSeconds=6",
            "maxSeconds=abc",
            "maxSeconds=NaN",
            "maxSeconds=inf",
            "maxSeconds=",
            "maxSeconds=.5",
            "maxSeconds=1.2345",
            "maxSeconds=-1",
            "maxSeconds=1e0",
            "maxBytes=1000",
            "maxBytes=100000001",
            "maxBytes=-5",
            "maxBytes=1e6",
        ] {
            assert!(parse_args(Some(bad), &limits).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_limits_fit_the_budget() {
        // Two directions at their longest leave 5 s for connecting and pinging.
        assert!(Limits::default().max_duration <= MAX_DIRECTION);
        assert!(2 * MAX_DIRECTION + Duration::from_secs(5) <= TOTAL_BUDGET);
    }
}
