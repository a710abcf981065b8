//! NetPilot agent: runs on the router, dials out to the relay and serves the router
//! API over the link. This root is the composition: `run` waits for an identity,
//! builds the [`App`] over the system backends (real or simulated) and `serve`s it
//! on the link and the optional local listener, stopping them all on shutdown.
//! ARCHITECTURE.md at the repository root shows the layers.

pub mod api;
pub mod app;
pub mod cleanup;
pub mod config;
pub mod control;
pub mod dns;
pub mod error;
pub mod link;
pub mod offload;
pub mod policy;
pub mod runtime;
pub mod scan;
#[cfg(feature = "simulate")]
pub mod sim;
pub mod speedtest;
pub mod store;
pub mod system;
pub mod uci_format;
pub mod usage;
pub mod wifi;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::{App, Backends};
use crate::link::identity::Identity;
use crate::link::serve::LinkConfig;
use crate::runtime::shutdown::Shutdown;

pub use crate::config::RunConfig;

/// Announced once the agent is running, for whoever started it.
#[derive(Debug, Clone)]
pub struct Ready {
    pub router_id: String,
    pub api_addr: Option<SocketAddr>,
}

pub async fn run(
    config: RunConfig,
    on_ready: impl FnOnce(Ready),
    shutdown: impl Future<Output = ()>,
) -> crate::error::Result<()> {
    config.validate()?;
    tokio::pin!(shutdown);
    let Some(mut identity) = wait_for_identity(&config, &mut shutdown).await else {
        return Ok(());
    };
    if let Some(url) = config.relay_urls.first() {
        identity.relay_url = url.clone();
    }
    if let Some(trust) = &config.trust {
        identity.trust = trust.clone();
    }
    let backends = Backends::for_config(&config)?;
    let Some(starts) = open_state(&config, &mut shutdown).await else {
        return Ok(());
    };
    let state = store::Location::Dir(config.state_dir.clone());
    let app = Arc::new(App::build(backends, &config, &identity, &state, starts)?);
    serve(app, &identity, &config, on_ready, shutdown).await
}

/// Loads the identity; while the router is not enrolled (or the file is corrupt or
/// holds values the relay never issues), says so once and looks again every
/// `identity_poll`, so a service started before enrollment — or left with a broken
/// identity — neither crash-loops under procd nor needs a restart after the owner
/// enrolls again. `None` on shutdown.
async fn wait_for_identity(
    config: &RunConfig,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<Identity> {
    let mut last_error = String::new();
    loop {
        match Identity::load(&config.state_dir) {
            Ok(identity) => return Some(identity),
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    if matches!(e, link::identity::IdentityError::Corrupt { .. }) {
                        tracing::error!(error = %message, poll = ?config.identity_poll, "identity unusable; idle until the router is enrolled again");
                    } else {
                        tracing::warn!(error = %message, poll = ?config.identity_poll, "waiting for enrollment");
                    }
                    last_error = message;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.identity_poll) => {}
            _ = shutdown.as_mut() => return None,
        }
    }
}

/// Opens the state database and counts this start. A full or failing flash is
/// reported and retried every `identity_poll` rather than crash-looping. `None` on
/// shutdown.
async fn open_state(
    config: &RunConfig,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<u64> {
    let mut last_error = String::new();
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match store::Store::open(&config.state_dir).and_then(|mut s| s.record_start(now)) {
            Ok(starts) => return Some(starts),
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    tracing::error!(error = %message, poll = ?config.identity_poll, "cannot use the state database; retrying");
                    last_error = message;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(config.identity_poll) => {}
            _ = shutdown.as_mut() => return None,
        }
    }
}

/// Runs the link and the optional local listener for an already built [`App`].
pub async fn serve(
    app: Arc<App>,
    identity: &Identity,
    config: &RunConfig,
    on_ready: impl FnOnce(Ready),
    shutdown: impl Future<Output = ()>,
) -> crate::error::Result<()> {
    config.validate()?;
    let link_config = LinkConfig {
        relays: app.relays.clone(),
        router_id: identity.router_id.clone(),
        secret: identity.router_secret.clone(),
        tls: link::tls::client_config(&identity.trust)?,
        ping_interval: config.ping_interval,
        dead_after: config.dead_after,
        connect_timeout: config.connect_timeout,
        backoff: config.backoff.clone(),
        max_concurrent_calls: config.max_concurrent_calls,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    let bodies = Arc::new(api::intake::BodyBudget::default());
    let mut api_addr = None;
    if let Some(addr) = config.api_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        api_addr = Some(listener.local_addr()?);
        tasks.spawn(local_api(
            listener,
            app.clone(),
            bodies.clone(),
            stop_rx.clone(),
        ));
    }
    // Bound before `on_ready`: whoever started the agent may ask at once. The agent
    // enforces policy without it, so a socket it cannot have is logged.
    let control = match &config.control {
        Some(path) => match control::bind(path) {
            Ok(listener) => Some((listener, path.clone())),
            Err(e) => {
                tracing::error!(error = %e, socket = %path.display(), "no control socket");
                None
            }
        },
        None => None,
    };
    tracing::info!(router_id = %identity.router_id, mode = app.mode.as_str(), relay = %identity.relay_url, "agent started");
    // Start-up reconcile first thing: the kernel converges to the stored state
    // whether or not the relay is reachable.
    // With it, in the same task (each task type costs the router's flash): the
    // writer of the copies of the rules fw4 loads, and the control socket.
    let (policy, stop) = (app.policy.clone(), stop_rx.clone());
    let (fw4_stop, control_stop, control_app) = (stop_rx.clone(), stop_rx.clone(), app.clone());
    tasks.spawn(async move {
        let control = async move {
            if let Some((listener, path)) = control {
                control::serve(listener, path, control_app, control_stop).await;
            }
        };
        tokio::join!(policy.clone().run(stop), policy.run_fw4(fw4_stop), control);
    });
    if let Some(g) = app.guest_dns.clone() {
        tasks.spawn(g.install());
    }
    // Resumes a change left pending by a restart, then confirms, rolls back and
    // reports.
    tasks.spawn(app.wifi.clone().run(stop_rx.clone()));
    tasks.spawn(app.usage.clone().run(stop_rx.clone()));
    tasks.spawn(app.offload.clone().run(
        app.policy.clone(),
        config.check_interval,
        stop_rx.clone(),
    ));
    let handler_app = app.clone();
    let handler_bodies = bodies.clone();
    let handler = move |req| api::handle(handler_app.clone(), handler_bodies.clone(), req);
    tasks.spawn(link::serve::run(
        link_config,
        handler,
        app.link.clone(),
        stop_rx,
    ));
    on_ready(Ready {
        router_id: identity.router_id.clone(),
        api_addr,
    });

    shutdown.await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    Ok(())
}

/// The API on a local TCP listener, HTTP/1.1 without authentication.
async fn local_api(
    listener: TcpListener,
    app: Arc<App>,
    bodies: Arc<api::intake::BodyBudget>,
    mut stop: Shutdown,
) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "local API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = runtime::shutdown::stopped(&mut stop) => return,
        };
        let _ = tcp.set_nodelay(true);
        let (app, bodies) = (app.clone(), bodies.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| api::handle(app.clone(), bodies.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
