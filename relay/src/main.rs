//! `netpilot-relay serve …`: parse the command line, set up logging, run.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use netpilot_relay::config::{ApiKeySource, CliOverrides, Config, Secret, API_KEY_ENV};

const USAGE: &str = "\
usage: netpilot-relay serve [--config FILE] [--data-dir DIR] [--listen ADDR:PORT]
                            [--api-key-file FILE] [--log FILTER]
       netpilot-relay check-config --config FILE
       netpilot-relay migrate-registry [--config FILE] [--data-dir DIR]
       netpilot-relay --version

The API key, first found wins: --api-key-file FILE (one line, not readable by
other users), the NETPILOT_API_KEY environment variable, api_key_file or api_key
in the config file. --api-key KEY works too but shows the key to every local
user in ps; the relay warns when it is used.
Once listening, one line goes to stdout (metrics only with metrics_listen):
  listening <addr> fingerprint <sha256> cert <path> [metrics <addr>]

migrate-registry copies a stopped single node's registry (registry.sqlite3 in
the data directory) into the PostgreSQL of [cluster] (or NETPILOT_POSTGRES_URL):
routers and unexpired tokens, hashes as they are. Run again, it copies nothing
twice; a router already there with other values stops it, nothing copied.";

fn main() -> anyhow::Result<()> {
    let mut args = lexopt::Parser::from_env();
    let mut cli = CliOverrides::default();
    let mut command: Option<String> = None;
    use lexopt::prelude::*;
    while let Some(arg) = args.next()? {
        match arg {
            Long("config") => cli.config_file = Some(PathBuf::from(args.value()?)),
            Long("data-dir") => cli.data_dir = Some(PathBuf::from(args.value()?)),
            Long("listen") => {
                let v: String = args.value()?.string()?;
                cli.listen = Some(
                    v.parse()
                        .with_context(|| format!("--listen {v:?} is not ADDR:PORT"))?,
                );
            }
            Long("api-key") => cli.api_key = Some(Secret::new(args.value()?.string()?)),
            Long("api-key-file") => cli.api_key_file = Some(PathBuf::from(args.value()?)),
            Long("log") => cli.log = Some(args.value()?.string()?),
            Long("version") | Short('V') => {
                println!("netpilot-relay {}", env!("CARGO_PKG_VERSION"));
                return Ok(());
            }
            Long("help") | Short('h') => {
                println!("{USAGE}");
                return Ok(());
            }
            Value(v) if command.is_none() => command = Some(v.string()?),
            _ => bail!("{}\n\n{USAGE}", arg.unexpected()),
        }
    }
    if command.as_deref() == Some("migrate-registry") {
        return migrate_registry(cli);
    }
    let config = Config::load(cli, &|k| std::env::var(k).ok())?;
    match command.as_deref() {
        Some("serve") => serve(config),
        Some("check-config") => {
            // The vendor files are read as `serve` reads them: a bad row fails here.
            let vendors = netpilot_relay::load_vendors(&config.vendors)?;
            println!("configuration is valid: {config:?}");
            if let Some(v) = vendors {
                println!(
                    "MAC vendor registry: {} embedded blocks, {} from vendors.files",
                    v.embedded_entries(),
                    v.file_entries()
                );
            }
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log).context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if config.api_key_source == ApiKeySource::CommandLine {
        tracing::warn!(
            "the API key was given with --api-key: every local user can read it in ps or \
             /proc; use --api-key-file, {API_KEY_ENV} or api_key_file in the config file"
        );
    } else {
        tracing::info!(source = %config.api_key_source.describe(), "API key loaded");
    }
    // Before anything opens a descriptor; `run` then fits its caps into the result.
    match netpilot_relay::capacity::raise_nofile() {
        Ok(r) if r.before < r.after => tracing::info!(
            from = r.before,
            to = r.after,
            "raised the open-file soft limit to the hard limit"
        ),
        Ok(r) => tracing::info!(limit = r.after, hard = r.hard, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = bind(config.listen, config.listen_backlog)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        netpilot_relay::run(
            config,
            listener,
            Arc::new(netpilot_relay::state::SystemClock),
            |ready| {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = write!(
                    out,
                    "listening {} fingerprint {} cert {}",
                    ready.addr,
                    ready.fingerprint,
                    ready.cert_path.display()
                );
                // Last, so readers of the first four fields are unaffected.
                match ready.metrics_addr {
                    Some(m) => {
                        let _ = writeln!(out, " metrics {m}");
                    }
                    None => {
                        let _ = writeln!(out);
                    }
                }
                let _ = out.flush();
            },
            shutdown_signal(),
        )
        .await
    })
}

/// `migrate-registry`: the data directory from the command line or the config
/// file; the PostgreSQL URL from NETPILOT_POSTGRES_URL or `[cluster]`. With only
/// the URL variable (no other cluster setting) the rest of the configuration is
/// read as a single node's.
fn migrate_registry(cli: CliOverrides) -> anyhow::Result<()> {
    use netpilot_relay::config::cluster::{
        ENV_CLUSTER_SECRET, ENV_NODE_ID, ENV_POSTGRES_URL, ENV_REDIS_URL,
    };
    use netpilot_relay::registry::{PgRegistry, Store, FILE_NAME};
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let config = Config::load(cli.clone(), &env).or_else(|full| {
        let cluster_vars = [
            ENV_NODE_ID,
            ENV_POSTGRES_URL,
            ENV_REDIS_URL,
            ENV_CLUSTER_SECRET,
        ];
        Config::load(cli, &|k| env(k).filter(|_| !cluster_vars.contains(&k))).map_err(|_| full)
    })?;
    let (url, timeout) = match (env(ENV_POSTGRES_URL), &config.cluster) {
        (Some(url), c) => (
            url,
            c.as_ref()
                .map_or(std::time::Duration::from_secs(3), |c| c.postgres_timeout),
        ),
        (None, Some(c)) => (c.postgres_url.expose().to_owned(), c.postgres_timeout),
        (None, None) => bail!(
            "migrate-registry needs the PostgreSQL URL: [cluster] postgres_url(_file) in \
             the config file, or {ENV_POSTGRES_URL}"
        ),
    };
    let file = config.data_dir.join(FILE_NAME);
    if !file.exists() {
        bail!("no registry to copy: {} does not exist", file.display());
    }
    let store =
        Store::open(&config.data_dir).with_context(|| format!("cannot open {}", file.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let routers = store.routers()?;
    let tokens = store.tokens(now)?;
    drop(store);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (new_routers, new_tokens) = rt.block_on(async {
        let pg = PgRegistry::open(&url, timeout)
            .await
            .context("cannot open the registry in PostgreSQL")?;
        pg.import(&routers, &tokens)
            .await
            .map_err(anyhow::Error::from)
    })?;
    println!(
        "copied {new_routers} routers ({} already there) and {new_tokens} unexpired tokens \
         ({} already there) from {} to PostgreSQL",
        routers.len() - new_routers,
        tokens.len() - new_tokens,
        file.display()
    );
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

/// The relay's listener with `backlog` pending connections (issue 16: tokio's
/// `TcpListener::bind` fixes it at 1024, too few for a fleet reconnecting at once).
fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restart must not wait out TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
