//! The endpoints an agent measures its line against, authenticated as the router:
//!
//! - `GET /agent/v1/speedtest/ping`: a tiny answer, for round-trip times;
//! - `GET /agent/v1/speedtest/download?bytes=N&ms=T`: N bytes of random-looking data,
//!   ending early (cleanly) after T ms, whichever comes first;
//! - `POST /agent/v1/speedtest/upload`: reads and discards the body, answers how many
//!   bytes arrived and over how long, measured here (the agent's own clock would
//!   count its socket buffer as sent).
//!
//! A relay's bandwidth is shared by every router, so transfers are rationed: one at a
//! time per router (409 `SPEEDTEST_RUNNING`) and `limits.speedtest_concurrent` in
//! all (429 `SPEEDTEST_BUSY`); each is capped in bytes and time by `[limits]`.
//! The download never holds N bytes: it hands out slices of one shared random block.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::time::Instant;

use crate::error::ApiError;
use crate::http::{self, Body, Ctx};
use crate::speedtest_slots::Slot;
use crate::state::AppState;

/// Size of the shared random block and of each download frame.
const BLOCK: usize = 1024 * 1024;
const FRAME: usize = 64 * 1024;

/// One random block for every download, made once. Random so that nothing on the
/// path (a compressing proxy, a WAN optimiser) can shrink it; 1 MiB so that a
/// repeat is farther apart than any such compressor's window.
fn block() -> &'static Bytes {
    static BLOCK_DATA: OnceLock<Bytes> = OnceLock::new();
    BLOCK_DATA.get_or_init(|| {
        use ring::rand::SecureRandom;
        let mut b = vec![0u8; BLOCK];
        // The system RNG failing is not worth refusing a speed test over: the data
        // only has to look random, and a counter pattern still measures the line.
        if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
            for (i, x) in b.iter_mut().enumerate() {
                *x = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
            }
        }
        Bytes::from(b)
    })
}

/// The download's body: frames cut from the shared block until `remaining` is 0 or
/// the deadline passes. The slot goes with it, so a client that disconnects frees
/// it when hyper drops the body; a finished transfer frees it when it hands out its
/// last frame, so the agent's next request never finds its own slot still taken.
pub struct Download {
    remaining: u64,
    deadline: Instant,
    offset: usize,
    slot: Option<Slot>,
    state: Arc<AppState>,
}

impl hyper::body::Body for Download {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 || Instant::now() >= self.deadline {
            self.slot = None;
            return Poll::Ready(None);
        }
        let n = FRAME.min(self.remaining as usize).min(BLOCK - self.offset);
        let chunk = block().slice(self.offset..self.offset + n);
        self.offset = (self.offset + n) % BLOCK;
        self.remaining -= n as u64;
        if self.remaining == 0 {
            // Freed with the last frame, before hyper writes it: the client cannot
            // see the end of this transfer before the slot is free.
            self.slot = None;
        }
        self.state
            .metrics
            .speedtest_download_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        // No exact length: the transfer may end early at its deadline, so the
        // response is chunked rather than promising a Content-Length.
        let mut h = SizeHint::new();
        h.set_upper(self.remaining);
        h
    }
}

#[derive(Serialize)]
struct Pong {
    pong: bool,
}

#[derive(Serialize)]
struct Received {
    /// Body bytes that arrived.
    bytes: u64,
    /// From the first body bytes to the last, on the relay's clock.
    duration_us: u64,
}

pub async fn ping(
    state: &AppState,
    req: &Request<Incoming>,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    state.authenticate_agent(req).await?;
    Ok(http::ok(StatusCode::OK, Pong { pong: true }, ctx))
}

/// Query arguments of the download: `bytes` (required) and `ms` (optional).
fn download_args(
    query: Option<&str>,
    max_bytes: u64,
    max_duration: Duration,
) -> Result<(u64, Duration), ApiError> {
    let mut bytes = None;
    let mut ms = None;
    for (k, v) in http::query_pairs(query) {
        let parsed = v.parse::<u64>().ok();
        match k.as_str() {
            "bytes" => {
                bytes = Some(
                    parsed
                        .filter(|n| (1..=max_bytes).contains(n))
                        .ok_or_else(|| {
                            ApiError::InvalidParameter(format!(
                                "bytes must be 1..{max_bytes}, got {v:?}"
                            ))
                        })?,
                )
            }
            "ms" => {
                let max = max_duration.as_millis() as u64;
                ms = Some(parsed.filter(|n| (1..=max).contains(n)).ok_or_else(|| {
                    ApiError::InvalidParameter(format!("ms must be 1..{max}, got {v:?}"))
                })?)
            }
            _ => {}
        }
    }
    let bytes = bytes.ok_or_else(|| ApiError::InvalidParameter("bytes is required".into()))?;
    Ok((bytes, ms.map(Duration::from_millis).unwrap_or(max_duration)))
}

pub async fn download(
    state: &Arc<AppState>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let router_id = state.authenticate_agent(req).await?;
    let limits = &state.config.speedtest;
    let (bytes, duration) =
        download_args(req.uri().query(), limits.max_bytes, limits.max_duration)?;
    let slot = state.speedtests.acquire(router_id, limits.concurrent)?;
    tracing::info!(%router_id, bytes, duration_ms = duration.as_millis() as u64, "speed test download");
    let body = Download {
        remaining: bytes,
        deadline: Instant::now() + duration,
        offset: 0,
        slot: Some(slot),
        state: state.clone(),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/octet-stream")
        // Random bytes gain nothing from compression; ask intermediaries not to try.
        .header("cache-control", "no-store, no-transform")
        .body(http::stream(body))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

pub async fn upload(
    state: &AppState,
    req: Request<Incoming>,
    ctx: &Ctx,
) -> Result<Response<Body>, ApiError> {
    let router_id = state.authenticate_agent(&req).await?;
    let limits = &state.config.speedtest;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes) {
        return Err(ApiError::PayloadTooLarge(limits.max_bytes as usize));
    }
    let slot = state.speedtests.acquire(router_id, limits.concurrent)?;
    let deadline = Instant::now() + limits.max_duration;
    let mut body = req.into_body();
    let mut received = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::SpeedtestTooLong(limits.max_duration.as_millis())),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::InvalidParameter(format!(
                    "upload ended abruptly after {received} bytes: {e}"
                )))
            }
            Ok(Some(Ok(f))) => f,
        };
        if let Some(data) = frame.data_ref() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            received += data.len() as u64;
            state
                .metrics
                .speedtest_upload_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if received > limits.max_bytes {
                return Err(ApiError::PayloadTooLarge(limits.max_bytes as usize));
            }
        }
    }
    // Freed before the answer leaves, so the agent's next transfer finds it free.
    drop(slot);
    let duration_us = first
        .map(|f| last.duration_since(f).as_micros() as u64)
        .unwrap_or(0);
    tracing::info!(%router_id, bytes = received, duration_us, "speed test upload");
    Ok(http::ok(
        StatusCode::OK,
        Received {
            bytes: received,
            duration_us,
        },
        ctx,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_arguments_are_bounded() {
        let max = Duration::from_secs(20);
        assert_eq!(
            download_args(Some("bytes=1000&ms=500"), 4096, max).unwrap(),
            (1000, Duration::from_millis(500))
        );
        assert_eq!(
            download_args(Some("bytes=4096"), 4096, max).unwrap(),
            (4096, max)
        );
        for bad in [
            "",
            "bytes=0",
            "bytes=4097",
            "bytes=x",
            "bytes=10&ms=0",
            "bytes=10&ms=20001",
        ] {
            assert!(download_args(Some(bad), 4096, max).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_block_is_not_trivially_compressible() {
        let b = block();
        assert_eq!(b.len(), BLOCK);
        let mut seen = [false; 256];
        for x in b.iter().take(4096) {
            seen[*x as usize] = true;
        }
        assert!(seen.iter().filter(|s| **s).count() > 200);
    }
}
