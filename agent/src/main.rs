//! `netpilot-agent`: load the configuration, set up logging, run a subcommand.

use std::path::Path;

use netpilot_agent::bail;
use netpilot_agent::cleanup::Outcome;
use std::time::Duration;

use netpilot_agent::config::{AgentConfig, Command, ControlVerb, Warning, DEFAULT_PATH, USAGE};
use netpilot_agent::control::{render, request};
use netpilot_agent::error::Context;
use netpilot_agent::link::enroll::enroll;
use netpilot_agent::link::identity::Identity;
use netpilot_agent::policy::fw4::BootOutcome;

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netpilot-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> netpilot_agent::error::Result<()> {
    let AgentConfig {
        command,
        log,
        warnings,
    } = AgentConfig::load(std::env::args_os().skip(1), Path::new(DEFAULT_PATH))?;
    match command {
        Command::Version => println!("netpilot-agent {}", env!("CARGO_PKG_VERSION")),
        Command::Help => println!("{USAGE}"),
        Command::Enroll(config) => {
            let rt = start(&log, &warnings)?;
            block(
                &rt,
                Box::pin(async move {
                    let identity = enroll(config.args()?).await?;
                    println!(
                        "enrolled as router {} ({}); identity stored in {}",
                        identity.router_id,
                        identity.name,
                        Identity::path(&config.state_dir).display()
                    );
                    Ok(())
                }),
            )?;
        }
        Command::Cleanup(config) => {
            let rt = start(&log, &warnings)?;
            block(
                &rt,
                Box::pin(async move {
                    let (done, failed) = netpilot_agent::cleanup::run(&config).await;
                    for d in &done {
                        match d {
                            Outcome::Removed(what) => println!("removed {what}"),
                            Outcome::Absent(what) => println!("absent {what}"),
                        }
                    }
                    for e in &failed {
                        eprintln!("netpilot-agent: cleanup: {e}");
                    }
                    if !failed.is_empty() {
                        bail!("{} cleanup step(s) failed", failed.len())
                    }
                    Ok(())
                }),
            )?;
        }
        Command::Boot(config) => {
            let rt = start(&log, &warnings)?;
            block(
                &rt,
                Box::pin(async move {
                    let paths = config.fw4_paths();
                    let nft = netpilot_agent::system::nft::RealNft {
                        program: config.nft.clone(),
                        ..Default::default()
                    };
                    match netpilot_agent::policy::fw4::boot(&paths, &nft).await? {
                        BootOutcome::NoBootCopy => println!(
                            "no boot copy at {}; fw4 loads no NetPilot rules",
                            paths.boot.display()
                        ),
                        BootOutcome::InPlace { generation } => println!(
                            "boot copy (generation {}) in place as {}",
                            generation.map_or("?".into(), |g| g.to_string()),
                            paths.live_file().display()
                        ),
                    }
                    Ok(())
                }),
            )?;
        }
        Command::Control { verb, socket, json } => control(verb, &socket, json)?,
        Command::Run(config) => {
            let rt = start(&log, &warnings)?;
            block(
                &rt,
                Box::pin(netpilot_agent::run(
                    config,
                    |ready| {
                        use std::io::Write;
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "agent running router {}", ready.router_id);
                        if let Some(addr) = ready.api_addr {
                            let _ = writeln!(out, "api listening {addr}");
                        }
                        let _ = out.flush();
                    },
                    shutdown_signal(),
                )),
            )?;
        }
    }
    Ok(())
}

/// A subcommand's work, boxed: the runtime's `block_on` is instantiated once for
/// all of them rather than once per future type (kilobytes each on the router).
type Job<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = netpilot_agent::error::Result<()>> + 'a>>;

fn block(rt: &tokio::runtime::Runtime, job: Job<'_>) -> netpilot_agent::error::Result<()> {
    rt.block_on(job)
}

/// One request to the running agent, its answer printed for a person (or as JSON).
fn control(verb: ControlVerb, socket: &Path, json: bool) -> netpilot_agent::error::Result<()> {
    // A reapply of a large policy takes seconds on a small router.
    let answer = request(socket, verb, Duration::from_secs(60))
        .map_err(|e| netpilot_agent::error::Error::msg(e.to_string()))?;
    let ok = answer["ok"].as_bool() == Some(true);
    if json {
        println!("{answer}");
    } else if !ok {
        // Said below, as the error.
    } else if verb == ControlVerb::Status {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        print!("{}", render(&answer, now));
    } else if verb == ControlVerb::Reconnect {
        println!("redialing the relay now");
    } else {
        print!("re-applied\n{}", render(&answer, 0));
    }
    if !ok {
        bail!(
            "{}: {}",
            verb.as_str(),
            answer["error"].as_str().unwrap_or("failed")
        );
    }
    Ok(())
}

/// Says what was wrong with the config file, sets up logging and builds the runtime.
fn start(
    log: &str,
    warnings: &[Warning],
) -> netpilot_agent::error::Result<tokio::runtime::Runtime> {
    // Before logging: the file that could not be used may be what sets its level.
    for w in warnings {
        if let Warning::IgnoredFile { .. } = w {
            eprintln!("netpilot-agent: {w}");
        }
    }
    init_logging(log)?;
    for w in warnings {
        if let Warning::UnknownOptions { path, options } = w {
            tracing::warn!(config = %path.display(), unknown = ?options, "ignoring unknown options");
        }
    }
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Logging to stderr (procd hands it to logd). `Targets` takes `info` or
/// `warn,netpilot_agent=debug`; unlike EnvFilter it needs no regex engine, which
/// keeps a few hundred KB off the router's flash.
fn init_logging(filter: &str) -> netpilot_agent::error::Result<()> {
    use tracing_subscriber::prelude::*;
    let targets: tracing_subscriber::filter::Targets = filter
        .parse()
        .with_context(|| format!("invalid log filter {filter:?}"))?;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(targets)
        .init();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
