//! Speed-test benchmark: which transport measures a router's line better — its own
//! TLS connection to the relay's speed-test endpoints (what the product does), or
//! bulk data on an HTTP/2 stream of a connection configured like the link (the same
//! builders, `netpilot_relay::agent_link::h2_client` (h2) and
//! `netpilot_agent::link::serve::h2_server` (hyper), so the same flow-control windows).
//! A program that prints figures (`cargo bench -p netpilot-tests --bench
//! speedtest`); it never asserts on timing.
//!
//! Per scenario, in one process: a relay (`netpilot_relay::run`) and an enrolled
//! router identity; then rounds alternating the two methods so machine noise hits
//! both alike, each direction bounded by time (2 s) rather than bytes. Figures are
//! medians over rounds:
//!
//! - download and upload Mbit/s (download = relay → router);
//! - idle round trip (10 sequential pings);
//! - the round trip of a small API call on the link *while* the download runs: what
//!   a web-app user's other calls see during a speed test.
//!
//! Scenarios: plain loopback, then loopback through a delay line: a proxy in this
//! process that delivers every byte a fixed time later in each direction and holds
//! at most 4 MiB in flight per direction. The proxy acknowledges locally, so that
//! cap works over the one-way delay: like a TCP window of 8 MiB over the RTT (this
//! machine's `tcp_rmem` maximum is 32 MiB), so the separate connection's ceiling is
//! 4 MiB / one-way delay; without a cap a delay line would absorb any amount and
//! flatter the method that has no flow control of its own. h2's WINDOW_UPDATEs
//! cross the delay line both ways, so the link-like stream meets window / RTT as on
//! a real path. This stands in for `tc qdisc add dev lo root netem delay …` in a
//! namespace, which this machine's kernel cannot do (it has no `sch_netem`:
//! "Specified qdisc kind is unknown"). The RTT is twice the one-way delay.
//!
//! The real link starts as an HTTP/1.1 upgrade; here the h2 connection speaks h2 on
//! the TLS stream directly. Flow control, framing and TLS are the same.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use h2::RecvStream;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use netpilot_agent::link::dial::{RelayAddr, RelayEndpoint, Relays};
use netpilot_agent::link::enroll::{enroll, EnrollArgs};
use netpilot_agent::link::tls::Trust;
use netpilot_agent::speedtest::{median, RunArgs, SpeedTester};
use netpilot_relay::config::{CliOverrides, Config, Secret};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const API_KEY: &str = "bench-api-key-0123456789";
const ROUNDS: usize = 5;
const DIRECTION: Duration = Duration::from_secs(2);
/// Large enough that time, not bytes, ends every transfer.
const BYTES: u64 = 4 * 1024 * 1024 * 1024;

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Figures {
    down_mbps: f64,
    up_mbps: f64,
    idle_rtt_ms: f64,
    /// Link API-call round trip during the download.
    busy_rtt_ms: f64,
}

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Scenario {
    name: String,
    tls: Figures,
    h2: Figures,
    rounds: usize,
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut all = Vec::new();
    for one_way_ms in [0, 10, 25] {
        all.push(rt.block_on(scenario(one_way_ms))?);
    }
    print_table(&all);
    Ok(())
}

/// Bytes a delay line holds in flight per direction.
const IN_FLIGHT: usize = 4 * 1024 * 1024;

/// A TCP proxy to `target` that delays every byte by `delay` each way, holding at
/// most [`IN_FLIGHT`] bytes per direction. Returns its address.
async fn delay_line(target: SocketAddr, delay: Duration) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ir, iw) = inbound.into_split();
                let (or, ow) = outbound.into_split();
                tokio::spawn(pipe(ir, ow, delay));
                tokio::spawn(pipe(or, iw, delay));
            });
        }
    });
    Ok(addr)
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let budget = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer_budget = budget.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            writer_budget.add_permits(chunk.len());
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Read only what the in-flight budget allows.
        let Ok(permit) = budget.acquire_many(1).await else {
            break;
        };
        permit.forget();
        let room = budget.available_permits().min(buf.len() - 1) + 1;
        let n = match from.read(&mut buf[..room]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // One permit was taken above; take the rest of this chunk's.
        if n > 1 {
            match budget.acquire_many((n - 1) as u32).await {
                Ok(p) => p.forget(),
                Err(_) => break,
            }
        }
        if tx
            .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn print_table(all: &[Scenario]) {
    println!(
        "\nSpeed test: separate TLS connection (product) vs an h2 stream configured like the link"
    );
    println!("medians over rounds; each direction time-bound at {DIRECTION:?}; 2 shared cores\n");
    println!(
        "{:34} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "scenario",
        "down TLS",
        "down h2",
        "up TLS",
        "up h2",
        "idle RTT TLS",
        "idle RTT h2",
        "busy TLS",
        "busy h2"
    );
    println!(
        "{:34} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "", "Mbit/s", "Mbit/s", "Mbit/s", "Mbit/s", "ms", "ms", "ms", "ms"
    );
    for s in all {
        println!(
            "{:34} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>12.2} {:>12.2} {:>10.2} {:>10.2}",
            format!("{} ({} rounds)", s.name, s.rounds),
            s.tls.down_mbps,
            s.h2.down_mbps,
            s.tls.up_mbps,
            s.h2.up_mbps,
            s.tls.idle_rtt_ms,
            s.h2.idle_rtt_ms,
            s.tls.busy_rtt_ms,
            s.h2.busy_rtt_ms,
        );
    }
    println!("\nbusy = round trip of a small call on the link while the download runs");
}

async fn scenario(one_way_ms: u64) -> anyhow::Result<Scenario> {
    let name = if one_way_ms == 0 {
        "loopback".to_owned()
    } else {
        format!(
            "delay line {one_way_ms} ms each way (RTT {} ms)",
            2 * one_way_ms
        )
    };
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    std::fs::write(
        dir.path().join("relay.toml"),
        format!("[limits]\nspeedtest_max_bytes = {BYTES}\nspeedtest_max_duration = \"20s\"\n"),
    )?;
    let config = Config::load(
        CliOverrides {
            config_file: Some(dir.path().join("relay.toml")),
            data_dir: Some(dir.path().join("relay")),
            api_key: Some(Secret::new(API_KEY)),
            listen: Some(addr),
            log: Some("warn".into()),
            ..Default::default()
        },
        &|_| None,
    )?;
    // Dropped at the end of the scenario, which stops the relay.
    let relay = netpilot_tests::in_process_relay(config, listener).await?;
    let ready = &relay.ready;
    let c = netpilot_tests::Client::connect(addr, &ready.fingerprint, API_KEY).await?;
    let r = c
        .post(
            "/api/admin/routers",
            json!({"ownerUserId": "bench", "name": "bench"}),
        )
        .await?;
    let token = r.body["data"]["enrollment_token"]
        .as_str()
        .context("token")?
        .to_owned();
    let url = format!("https://{addr}");
    // What the router dials for the speed test: the relay, or the delay line to it.
    let via = if one_way_ms == 0 {
        addr
    } else {
        delay_line(addr, Duration::from_millis(one_way_ms)).await?
    };
    let trust = Trust::Fingerprint(ready.fingerprint.clone());
    let identity = enroll(EnrollArgs {
        relay_url: &url,
        token: &token,
        trust: trust.clone(),
        state_dir: &dir.path().join("agent"),
        force: false,
    })
    .await?;
    let client_tls = netpilot_agent::link::tls::client_config(&trust)?;
    let relay_addr = RelayAddr::parse(&format!("https://{via}"))?;
    let tester = SpeedTester::new(
        RelayEndpoint::new(
            Arc::new(Relays::new(relay_addr.clone(), [])),
            client_tls.clone(),
            identity.router_id.clone(),
            identity.router_secret.clone(),
            Duration::from_secs(10),
        ),
        Default::default(),
    );

    // The link-like h2 pair, with the relay's own certificate.
    let server_tls =
        netpilot_relay::tls::load_or_create(None, None, &dir.path().join("relay"), &[])?;
    let link = LinkPair::start(server_tls.config, client_tls, relay_addr, one_way_ms).await?;

    let args = RunArgs {
        duration: DIRECTION,
        bytes: BYTES,
    };
    let (mut tls, mut h2) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // The product's method, with the link's API round trips measured meanwhile.
        let pinger = link.pinger();
        let r = tester.run(args).await?;
        let busy = pinger.stop().await;
        tls.push(Figures {
            down_mbps: r.download_mbps,
            up_mbps: r.upload_mbps,
            idle_rtt_ms: r.latency_ms,
            busy_rtt_ms: busy,
        });
        h2.push(link.measure().await?);
        eprintln!(
            "  {name} round {}: TLS {:?} | h2 {:?}",
            round + 1,
            tls.last().unwrap(),
            h2.last().unwrap()
        );
    }
    Ok(Scenario {
        name,
        tls: medians(&tls),
        h2: medians(&h2),
        rounds: ROUNDS,
    })
}

fn medians(v: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(&v.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0);
    Figures {
        down_mbps: m(|f| f.down_mbps),
        up_mbps: m(|f| f.up_mbps),
        idle_rtt_ms: m(|f| f.idle_rtt_ms),
        busy_rtt_ms: m(|f| f.busy_rtt_ms),
    }
}

type RelaySide = h2::client::SendRequest<Bytes>;

/// A relay-side h2 client and an agent-side h2 server on one TLS connection, built
/// with the link's builders.
struct LinkPair {
    sender: RelaySide,
}

/// Sequential small calls on the link until stopped; the median round trip.
struct Pinger {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<f64>,
}

impl Pinger {
    async fn stop(self) -> f64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0.0)
    }
}

impl LinkPair {
    async fn start(
        server_tls: Arc<rustls::ServerConfig>,
        client_tls: Arc<rustls::ClientConfig>,
        relay: RelayAddr,
        one_way_ms: u64,
    ) -> anyhow::Result<LinkPair> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let direct = listener.local_addr()?;
        let addr = if one_way_ms == 0 {
            direct
        } else {
            delay_line(direct, Duration::from_millis(one_way_ms)).await?
        };
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsAcceptor::from(server_tls)
                .accept(tcp)
                .await?;
            anyhow::Ok(tls)
        });
        let agent_addr = RelayAddr::parse(&format!("https://127.0.0.1:{}", addr.port()))?;
        let agent_tls = netpilot_agent::link::dial::dial(
            &agent_addr,
            client_tls.clone(),
            Duration::from_secs(5),
        )
        .await?;
        let relay_tls = accept.await??;
        let link_config = netpilot_agent::link::serve::LinkConfig {
            relays: Arc::new(Relays::new(relay, [])),
            router_id: String::new(),
            secret: String::new(),
            tls: client_tls,
            ping_interval: Duration::from_secs(20),
            dead_after: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            backoff: Default::default(),
            max_concurrent_calls: netpilot_agent::RunConfig::default().max_concurrent_calls,
        };
        let service = service_fn(agent_service);
        tokio::spawn(
            netpilot_agent::link::serve::h2_server(&link_config)
                .serve_connection(TokioIo::new(agent_tls), service),
        );
        let (sender, conn) = netpilot_relay::agent_link::h2_client()
            .handshake::<_, Bytes>(relay_tls)
            .await?;
        tokio::spawn(conn);
        Ok(LinkPair { sender })
    }

    async fn call(&self, req: Request<Gen>) -> anyhow::Result<Response<RecvStream>> {
        call(self.sender.clone(), req).await
    }

    fn pinger(&self) -> Pinger {
        let (stop, mut stopped) = oneshot::channel();
        let sender = self.sender.clone();
        let task = tokio::spawn(async move {
            let mut rtts = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let t = Instant::now();
                let req = Request::get("http://agent/ping")
                    .body(Gen::empty())
                    .unwrap();
                match call(sender.clone(), req).await {
                    Ok(resp) => {
                        let _ = read_all(resp.into_body()).await;
                        rtts.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    Err(_) => break,
                }
            }
            median(&rtts).unwrap_or(0.0)
        });
        Pinger { stop, task }
    }

    /// Idle pings, then download (relay → agent, a request body) with pings
    /// alongside, then upload (agent → relay, a response body).
    async fn measure(&self) -> anyhow::Result<Figures> {
        let mut idle = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            let resp = self
                .call(Request::get("http://agent/ping").body(Gen::empty())?)
                .await?;
            read_all(resp.into_body()).await?;
            idle.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let pinger = self.pinger();
        let resp = self
            .call(Request::post("http://agent/down").body(Gen::new(BYTES, DIRECTION))?)
            .await?;
        let v: Value = serde_json::from_slice(&read_all(resp.into_body()).await?)?;
        let busy = pinger.stop().await;
        let down = mbps(
            v["bytes"].as_u64().unwrap_or(0),
            v["us"].as_u64().unwrap_or(0),
        );

        let resp = self
            .call(
                Request::get(format!(
                    "http://agent/up?bytes={BYTES}&ms={}",
                    DIRECTION.as_millis()
                ))
                .body(Gen::empty())?,
            )
            .await?;
        let t0 = Instant::now();
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(d) = body.data().await {
            let d = d?;
            n += d.len() as u64;
            let _ = body.flow_control().release_capacity(d.len());
        }
        let up = mbps(n, t0.elapsed().as_micros() as u64);
        Ok(Figures {
            down_mbps: down,
            up_mbps: up,
            idle_rtt_ms: median(&idle).unwrap_or(0.0),
            busy_rtt_ms: busy,
        })
    }
}

/// One call on the link's h2 client, the request body sent as the window opens.
async fn call(sender: RelaySide, req: Request<Gen>) -> anyhow::Result<Response<RecvStream>> {
    let (parts, body) = req.into_parts();
    let mut s = sender.ready().await?;
    let (resp, stream) = s.send_request(Request::from_parts(parts, ()), body.is_end_stream())?;
    if !body.is_end_stream() {
        tokio::spawn(pump(body, stream));
    }
    Ok(resp.await?)
}

async fn pump(mut body: Gen, mut stream: h2::SendStream<Bytes>) {
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(mut left) = frame.into_data() else {
            continue;
        };
        while !left.is_empty() {
            stream.reserve_capacity(left.len());
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(n)) if n > 0 => {
                    let chunk = left.split_to(n.min(left.len()));
                    if stream.send_data(chunk, false).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
}

async fn read_all(mut body: RecvStream) -> anyhow::Result<Bytes> {
    let mut buf = Vec::new();
    while let Some(d) = body.data().await {
        let d = d?;
        let _ = body.flow_control().release_capacity(d.len());
        buf.extend_from_slice(&d);
    }
    Ok(Bytes::from(buf))
}

fn mbps(bytes: u64, us: u64) -> f64 {
    if us == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / us as f64
    }
}

/// The agent side of the h2 pair: `/ping`, `/down` (count the request body, time it
/// like the relay's upload endpoint does) and `/up` (stream a generated body).
async fn agent_service(
    req: Request<Incoming>,
) -> Result<Response<Either<Full<Bytes>, Gen>>, Infallible> {
    let path = req.uri().path().to_owned();
    let resp = match path.as_str() {
        "/down" => {
            let mut body = req.into_body();
            let (mut n, mut first, mut last) = (0u64, None, Instant::now());
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    n += d.len() as u64;
                }
            }
            let us = first
                .map(|f| last.duration_since(f).as_micros() as u64)
                .unwrap_or(0);
            Either::Left(Full::new(Bytes::from(
                json!({"bytes": n, "us": us}).to_string(),
            )))
        }
        "/up" => {
            let q: Vec<(String, String)> = req
                .uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter_map(|p| p.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
                .collect();
            let get = |k: &str| {
                q.iter()
                    .find(|(a, _)| a == k)
                    .and_then(|(_, v)| v.parse::<u64>().ok())
            };
            Either::Right(Gen::new(
                get("bytes").unwrap_or(0),
                Duration::from_millis(get("ms").unwrap_or(0)),
            ))
        }
        _ => Either::Left(Full::new(Bytes::from_static(b"{}"))),
    };
    Ok(Response::new(resp))
}

/// Generated bulk data: slices of one random 1 MiB block until the byte count or
/// the deadline, like the relay's download body.
struct Gen {
    remaining: u64,
    deadline: Option<Instant>,
    offset: usize,
    block: Bytes,
}

impl Gen {
    fn empty() -> Gen {
        Gen {
            remaining: 0,
            deadline: None,
            offset: 0,
            block: Bytes::new(),
        }
    }

    fn new(bytes: u64, within: Duration) -> Gen {
        use ring::rand::SecureRandom;
        let mut b = vec![0u8; 1024 * 1024];
        ring::rand::SystemRandom::new().fill(&mut b).expect("rng");
        Gen {
            remaining: bytes,
            deadline: Some(Instant::now() + within),
            offset: 0,
            block: Bytes::from(b),
        }
    }
}

impl hyper::body::Body for Gen {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Poll::Ready(None);
        }
        let len = self.block.len();
        let n = (64 * 1024)
            .min(self.remaining as usize)
            .min(len - self.offset);
        let chunk = self.block.slice(self.offset..self.offset + n);
        self.offset = (self.offset + n) % len;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.remaining == 0 {
            SizeHint::with_exact(0)
        } else {
            SizeHint::new()
        }
    }
}
