//! `GET /api/speedtest`: the router measures its line against its relay over a
//! separate TLS connection (not the link; see the README for the measurements
//! behind that choice): ten sequential pings for latency and jitter, then a
//! download and an upload, each ending at whichever comes first of a time and a
//! byte limit. One run at a time (a second gets 409 `SPEEDTEST_RUNNING`), and the
//! whole run is bounded well inside the relay's 30 s command timeout.
//!
//! The arithmetic (median, jitter, rates) and the argument checks are pure
//! functions; [`SpeedTester::run`] is the thin I/O shell around them.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::CONTENT_TYPE;
use netpilot_proto::link::{SPEEDTEST_DOWNLOAD_PATH, SPEEDTEST_PING_PATH, SPEEDTEST_UPLOAD_PATH};
use serde::{Deserialize, Serialize};

use crate::dial::RelayEndpoint;

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
/// Extra time a direction may take beyond its limit before it is abandoned (the
/// relay ends the download at the limit; this covers what is still in flight).
const GRACE: Duration = Duration::from_secs(3);
/// Size of each upload frame; the same random block is sent again and again.
const UPLOAD_BLOCK: usize = 64 * 1024;

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

impl Limits {
    /// Checks configured limits: each direction at most [`MAX_DIRECTION`].
    pub fn validate(&self) -> Result<(), String> {
        if self.max_duration < Duration::from_millis(100) || self.max_duration > MAX_DIRECTION {
            return Err("speed-test duration must be 100ms..10s".into());
        }
        if !(MIN_BYTES..=1 << 30).contains(&self.max_bytes) {
            return Err(format!("speed-test bytes must be {MIN_BYTES}..1073741824"));
        }
        Ok(())
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
pub fn parse_args(query: Option<&str>, limits: &Limits) -> Result<RunArgs, String> {
    let mut args = RunArgs {
        duration: limits.max_duration,
        bytes: limits.max_bytes,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "maxSeconds" | "max_seconds" => {
                let max = limits.max_duration.as_secs_f64();
                let s = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.1 && *s <= max)
                    .ok_or_else(|| format!("maxSeconds must be a number 0.1..{max}, got {v:?}"))?;
                args.duration = Duration::from_secs_f64(s);
            }
            "maxBytes" | "max_bytes" => {
                let max = limits.max_bytes;
                args.bytes = v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| (MIN_BYTES..=max).contains(n))
                    .ok_or_else(|| {
                        format!("maxBytes must be an integer {MIN_BYTES}..{max}, got {v:?}")
                    })?;
            }
            _ => {}
        }
    }
    Ok(args)
}

/// The median of the samples (mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
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
    /// The run went past its time budget.
    #[error("speed test did not finish within {0:?}")]
    Timeout(Duration),
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
        let mut r = result.map_err(|_| SpeedtestError::Timeout(TOTAL_BUDGET))??;
        r.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            download_mbps = r.download_mbps,
            upload_mbps = r.upload_mbps,
            latency_ms = r.latency_ms,
            jitter_ms = r.jitter_ms,
            download_bytes = r.download_bytes,
            upload_bytes = r.upload_bytes,
            duration_ms = r.duration_ms,
            "speed test done"
        );
        Ok(r)
    }

    /// Pings, then download, then upload, all on one keep-alive connection: the
    /// relay ends the download cleanly at its limit, so the connection stays usable.
    async fn measure(&self, args: RunArgs) -> Result<SpeedResult, SpeedtestError> {
        let e = &self.endpoint;
        let mut sender = e
            .http1::<Upload>()
            .await
            .map_err(|err| SpeedtestError::Unreachable(err.to_string()))?;

        let mut rtts = Vec::with_capacity(PINGS);
        for _ in 0..PINGS {
            let t = Instant::now();
            let req = e
                .request(http::Method::GET, SPEEDTEST_PING_PATH)
                .body(Upload::empty())
                .expect("static request parts");
            send_and_read(&mut sender, req).await?;
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }

        let limit = args.duration + GRACE;
        let (download_bytes, download_time) =
            tokio::time::timeout(limit, self.download(&mut sender, args))
                .await
                .map_err(|_| SpeedtestError::Timeout(limit))??;
        let (upload_bytes, upload_time) =
            tokio::time::timeout(limit, self.upload(&mut sender, args))
                .await
                .map_err(|_| SpeedtestError::Timeout(limit))??;

        Ok(SpeedResult {
            download_mbps: round2(mbps(download_bytes, download_time)),
            upload_mbps: round2(mbps(upload_bytes, upload_time)),
            latency_ms: round2(median(&rtts).unwrap_or(0.0)),
            jitter_ms: round2(jitter(&rtts).unwrap_or(0.0)),
            download_bytes,
            upload_bytes,
            duration_ms: 0,
            server: e.relay.authority.clone(),
            method: METHOD,
        })
    }

    /// Bytes received and the time from the answer's head to its last byte.
    async fn download(
        &self,
        sender: &mut SendRequest<Upload>,
        args: RunArgs,
    ) -> Result<(u64, Duration), SpeedtestError> {
        let path = format!(
            "{SPEEDTEST_DOWNLOAD_PATH}?bytes={}&ms={}",
            args.bytes,
            args.duration.as_millis().max(1)
        );
        let req = self
            .endpoint
            .request(http::Method::GET, &path)
            .body(Upload::empty())
            .expect("static request parts");
        let resp = send(sender, req).await?;
        let t0 = Instant::now();
        let mut body = resp.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| SpeedtestError::Unreachable(e.to_string()))?;
            if let Some(d) = frame.data_ref() {
                received += d.len() as u64;
            }
        }
        Ok((received, t0.elapsed()))
    }

    /// What the relay says it received, and over how long by its clock: the
    /// agent's clock would count bytes still sitting in its socket buffer as sent.
    async fn upload(
        &self,
        sender: &mut SendRequest<Upload>,
        args: RunArgs,
    ) -> Result<(u64, Duration), SpeedtestError> {
        #[derive(Deserialize)]
        struct Received {
            bytes: u64,
            duration_us: u64,
        }
        #[derive(Deserialize)]
        struct Env {
            data: Option<Received>,
        }
        let req = self
            .endpoint
            .request(http::Method::POST, SPEEDTEST_UPLOAD_PATH)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(Upload::new(args.bytes, Instant::now() + args.duration))
            .expect("static request parts");
        let body = send_and_read(sender, req).await?;
        match serde_json::from_slice::<Env>(&body) {
            Ok(Env { data: Some(r) }) => Ok((r.bytes, Duration::from_micros(r.duration_us))),
            _ => Err(SpeedtestError::Unreachable(
                "the relay's upload answer is unreadable".into(),
            )),
        }
    }
}

async fn send(
    sender: &mut SendRequest<Upload>,
    req: http::Request<Upload>,
) -> Result<http::Response<hyper::body::Incoming>, SpeedtestError> {
    sender
        .ready()
        .await
        .map_err(|e| SpeedtestError::Unreachable(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| SpeedtestError::Unreachable(e.to_string()))?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), 16 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Err(match status {
        409 => SpeedtestError::Running,
        429 => SpeedtestError::RelayBusy,
        _ => SpeedtestError::Refused {
            status,
            message: crate::report::error_message(&body),
        },
    })
}

/// Sends and reads a small answer whole.
async fn send_and_read(
    sender: &mut SendRequest<Upload>,
    req: http::Request<Upload>,
) -> Result<Bytes, SpeedtestError> {
    let resp = send(sender, req).await?;
    Limited::new(resp.into_body(), 16 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| SpeedtestError::Unreachable(e.to_string()))
}

/// The request body of every speed-test call: empty for pings and the download,
/// and for the upload the same random block again and again until the byte limit
/// or the deadline. Never holds more than one block.
pub struct Upload {
    remaining: u64,
    deadline: Option<Instant>,
    block: Bytes,
}

impl Upload {
    fn empty() -> Self {
        Upload {
            remaining: 0,
            deadline: None,
            block: Bytes::new(),
        }
    }

    fn new(bytes: u64, deadline: Instant) -> Self {
        use ring::rand::SecureRandom;
        let mut b = vec![0u8; UPLOAD_BLOCK];
        // Random so nothing on the path can compress it; if the RNG fails the
        // zeros still measure the line through TLS, which does not compress.
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        Upload {
            remaining: bytes,
            deadline: Some(deadline),
            block: Bytes::from(b),
        }
    }
}

impl hyper::body::Body for Upload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let expired = self.deadline.is_some_and(|d| Instant::now() >= d);
        if self.remaining == 0 || expired {
            return Poll::Ready(None);
        }
        let n = (self.block.len() as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.block.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        match self.deadline {
            // May end early at the deadline: chunked, no promised length.
            Some(_) if self.remaining > 0 => {
                let mut h = SizeHint::new();
                h.set_upper(self.remaining);
                h
            }
            _ => SizeHint::with_exact(self.remaining),
        }
    }
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
        for bad in [
            "maxSeconds=0",
            "maxSeconds=0.05",
            "maxSeconds=6",
            "maxSeconds=abc",
            "maxSeconds=NaN",
            "maxSeconds=inf",
            "maxSeconds=",
            "maxBytes=1000",
            "maxBytes=100000001",
            "maxBytes=-5",
            "maxBytes=1e6",
        ] {
            assert!(parse_args(Some(bad), &limits).is_err(), "{bad}");
        }
    }

    #[test]
    fn configured_limits_fit_the_budget() {
        assert!(Limits::default().validate().is_ok());
        // Two directions at their longest leave 5 s for connecting and pinging.
        assert!(2 * MAX_DIRECTION + Duration::from_secs(5) <= TOTAL_BUDGET);
        for bad in [
            Limits {
                max_duration: Duration::from_secs(11),
                ..Limits::default()
            },
            Limits {
                max_duration: Duration::from_millis(50),
                ..Limits::default()
            },
            Limits {
                max_bytes: 1000,
                ..Limits::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn upload_body_stops_at_bytes_or_deadline() {
        let far = Instant::now() + Duration::from_secs(60);
        let mut b = Upload::new(150_000, far);
        let mut total = 0;
        while let Some(f) = b.frame().await {
            total += f.unwrap().into_data().unwrap().len();
        }
        assert_eq!(total, 150_000);
        let mut b = Upload::new(u64::MAX, Instant::now());
        assert!(b.frame().await.is_none());
        let e = Upload::empty();
        assert_eq!(hyper::body::Body::size_hint(&e).exact(), Some(0));
    }
}
