//! Test harness for NetPilot: start the real relay and agent binaries on
//! `127.0.0.1:0`, enroll routers, and call the relay's API over TLS pinned to its
//! fingerprint. Used by the integration tests, the tour and the benchmarks.
//! Child processes are killed when their handles drop, so a failing test leaves
//! nothing running.
//!
//! Most tests start from the API rig ([`ApiRig`], [`Session`]); tests that prove
//! enforcement by traffic use the namespace lab ([`lab::Lab`]), built on the test
//! kit's namespaces (`netpilot-testkit`, which also holds the requirement check of
//! the `netns_` tests).

pub mod cluster;
pub mod engines;
pub mod fake_agent;
pub mod freeze_proxy;
pub mod fw4;
pub mod lab;
pub mod rig;

pub use rig::{ApiRig, ApiRigBuilder, Session};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

pub const API_KEY: &str = "test-api-key-0123456789abcdef";

/// The repository's root (this crate is `tests/`).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The debug agent, stripped once per test binary: the program the package tests
/// put in their packages, without 60 MB of debug info to compress.
pub fn packaged_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, path) = BIN.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("netpilot-agent");
        let o = std::process::Command::new("strip")
            .arg("-o")
            .arg(&path)
            .arg(binary("netpilot-agent"))
            .output()
            .expect("strip runs");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (dir, path)
    });
    path.clone()
}

/// Where cargo put the workspace binaries: next to this test executable's `deps/`.
pub fn binary(name: &str) -> PathBuf {
    let env = format!(
        "NETPILOT_{}_BIN",
        name.trim_start_matches("netpilot-").to_ascii_uppercase()
    );
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo test --workspace does)",
        path.display()
    );
    path
}

/// A relay process with its own data directory.
pub struct Relay {
    child: Option<Child>,
    pub addr: std::net::SocketAddr,
    pub fingerprint: String,
    /// The plain-HTTP metrics listener, when the config sets `metrics_listen`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub data_dir: PathBuf,
    config_file: PathBuf,
    launch: Launch,
    _dir: Arc<tempfile::TempDir>,
    /// The cluster topology (`NETPILOT_TEST_RELAY=cluster`): where agents enroll
    /// and link (another node than this one), and the rest of the cluster, kept
    /// alive with this node.
    agent_url: Option<String>,
    _cluster: Option<Arc<cluster::ClusterRig>>,
}

/// `NETPILOT_TEST_RELAY=cluster`: [`Relay::start`] starts a two-node cluster (on
/// its own Redis and PostgreSQL) instead of one relay; the tests talk to one node
/// and their agents link to the other, so every call crosses nodes. `tests/run`
/// runs the session and routing tests this way too.
pub const TOPOLOGY_ENV: &str = "NETPILOT_TEST_RELAY";

/// What [`Relay::start_with`] adds to the relay's command line and environment.
#[derive(Default, Clone)]
struct Launch {
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The open-file limit (soft, hard) the relay starts under.
    nofile: Option<(u64, u64)>,
}

/// Options for starting a relay; `config` is extra TOML appended to the file.
#[derive(Default, Clone)]
pub struct RelayOptions {
    pub config: String,
}

impl Relay {
    pub async fn start(opts: RelayOptions) -> anyhow::Result<Relay> {
        if std::env::var(TOPOLOGY_ENV).as_deref() == Ok("cluster") {
            return Box::pin(cluster::ClusterRig::as_relay(&opts.config)).await;
        }
        Self::start_single(opts).await
    }

    /// One relay, whatever the topology asked for.
    pub async fn start_single(opts: RelayOptions) -> anyhow::Result<Relay> {
        let dir = Arc::new(tempfile::tempdir()?);
        let data_dir = dir.path().join("relay");
        let config_file = dir.path().join("relay.toml");
        let mut config = format!("api_key = \"{API_KEY}\"\n");
        // Sections must come after top-level keys; callers pass whole sections.
        config.push_str(&opts.config);
        std::fs::write(&config_file, config)?;
        let launch = Launch::default();
        Self::spawn(dir, data_dir, config_file, "127.0.0.1:0".parse()?, launch).await
    }

    /// [`Relay::start`] under the open-file limit (`soft`, `hard`), as a shell or a
    /// container would start it.
    pub async fn start_with_nofile(
        opts: RelayOptions,
        soft: u64,
        hard: u64,
    ) -> anyhow::Result<Relay> {
        let dir = Arc::new(tempfile::tempdir()?);
        let data_dir = dir.path().join("relay");
        let config_file = dir.path().join("relay.toml");
        std::fs::write(
            &config_file,
            format!("api_key = \"{API_KEY}\"\n{}", opts.config),
        )?;
        let launch = Launch {
            nofile: Some((soft, hard)),
            ..Launch::default()
        };
        Self::spawn(dir, data_dir, config_file, "127.0.0.1:0".parse()?, launch).await
    }

    /// A relay whose config file is `config` alone (no API key added: the caller
    /// gives it in `config`, `args` or `env`), with `args` after the usual ones and
    /// `env` set. For the tests of where the key may come from.
    pub async fn start_with(
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Relay> {
        let dir = Arc::new(tempfile::tempdir()?);
        let data_dir = dir.path().join("relay");
        let config_file = dir.path().join("relay.toml");
        std::fs::write(&config_file, config)?;
        let launch = Launch {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            nofile: None,
        };
        Self::spawn(dir, data_dir, config_file, "127.0.0.1:0".parse()?, launch).await
    }

    async fn spawn(
        dir: Arc<tempfile::TempDir>,
        data_dir: PathBuf,
        config_file: PathBuf,
        listen: std::net::SocketAddr,
        launch: Launch,
    ) -> anyhow::Result<Relay> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("relay.log"))?;
        let mut cmd = Command::new(binary("netpilot-relay"));
        if let Some((soft, hard)) = launch.nofile {
            // SAFETY: between fork and exec only setrlimit runs, an async-signal-safe
            // system call; nothing allocates or takes a lock.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(
                        nix::sys::resource::Resource::RLIMIT_NOFILE,
                        soft,
                        hard,
                    )
                    .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&config_file)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--log")
            .arg(std::env::var("NETPILOT_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("NETPILOT_API_KEY")
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start netpilot-relay")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .map_err(|_| anyhow!("relay did not report its address within 30 s"))??
            .ok_or_else(|| {
                // The log goes with the temporary directory: say what it says.
                let log = dir.path().join("relay.log");
                anyhow!(
                    "relay exited before listening; {} says:\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })?;
        // listening <addr> fingerprint <fp> cert <path> [metrics <addr>]
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() < 4 || parts[0] != "listening" {
            bail!("unexpected relay output: {line}");
        }
        let metrics_addr = match line.rsplit_once(" metrics ") {
            Some((_, m)) => Some(m.trim().parse()?),
            None => None,
        };
        Ok(Relay {
            child: Some(child),
            addr: parts[1].parse()?,
            fingerprint: parts[3].to_owned(),
            metrics_addr,
            data_dir,
            config_file,
            launch,
            _dir: dir,
            agent_url: None,
            _cluster: None,
        })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Where agents of this relay enroll and link: the relay itself, or (cluster
    /// topology) another node of its cluster.
    pub fn agent_url(&self) -> String {
        self.agent_url.clone().unwrap_or_else(|| self.url())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("relay.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Kills the relay with SIGKILL (no graceful shutdown).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Sends SIGTERM and waits (up to 10 s) for the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.child.take().context("relay not running")?;
        terminate(&mut c).await
    }

    /// Sends SIGTERM and returns at once: the relay drains first, which takes a
    /// while; [`Relay::wait_exit`] waits for the end.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("relay not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(())
    }

    /// Waits up to `within` for the relay to exit; its status.
    pub async fn wait_exit(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let c = self.child.as_mut().context("relay not running")?;
        let status = tokio::time::timeout(within, c.wait())
            .await
            .map_err(|_| anyhow!("relay still running {within:?} after the wait began"))??;
        self.child = None;
        Ok(status)
    }

    /// Another relay of the same deployment on its own address: a copy of this
    /// one's data directory (registry and TLS identity) and config file, taken now.
    /// Stop this relay first (`terminate`) so the copy of its database is whole.
    pub async fn start_copy(&self) -> anyhow::Result<Relay> {
        let dir = Arc::new(tempfile::tempdir()?);
        let data_dir = dir.path().join("relay");
        copy_dir(&self.data_dir, &data_dir)?;
        let config_file = dir.path().join("relay.toml");
        std::fs::copy(&self.config_file, &config_file)?;
        Self::spawn(
            dir,
            data_dir,
            config_file,
            "127.0.0.1:0".parse()?,
            self.launch.clone(),
        )
        .await
    }

    /// Starts the relay again on the same address and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let again = Self::spawn(
            self._dir.clone(),
            self.data_dir.clone(),
            self.config_file.clone(),
            self.addr,
            self.launch.clone(),
        )
        .await?;
        *self = again;
        Ok(())
    }

    /// A client for the relay's REST API.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Client::connect(self.addr, &self.fingerprint, API_KEY).await
    }

    /// Creates a router owned by `owner` and returns (router id, enrollment token).
    pub async fn create_router(&self, owner: &str, name: &str) -> anyhow::Result<(String, String)> {
        let c = self.client().await?;
        let r = c
            .post(
                "/api/admin/routers",
                json!({"ownerUserId": owner, "name": name}),
            )
            .await?;
        if r.status != 201 {
            bail!("create router: {} {}", r.status, r.body);
        }
        Ok((
            r.body["data"]["router_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            r.body["data"]["enrollment_token"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ))
    }

    /// Creates a router and enrolls a state directory for it with the agent binary.
    pub async fn enrolled_router(&self, owner: &str) -> anyhow::Result<EnrolledRouter> {
        let (router_id, token) = self.create_router(owner, "test router").await?;
        let dir = Arc::new(tempfile::tempdir()?);
        let state_dir = dir.path().join("state");
        let out = enroll(&self.agent_url(), &token, &self.fingerprint, &state_dir).await?;
        if !out.status.success() {
            bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(EnrolledRouter {
            router_id,
            state_dir,
            _dir: Some(dir),
        })
    }

    /// Polls the admin list until the router's online flag is `online`.
    pub async fn wait_online(
        &self,
        router_id: &str,
        online: bool,
        within: Duration,
    ) -> anyhow::Result<()> {
        let c = self.client().await?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = c.get(&format!("/api/admin/routers/{router_id}")).await?;
            if r.body["data"]["online"] == json!(online) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "router {router_id} not online={online} within {within:?}: {}",
                    r.body
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

pub async fn enroll(
    relay_url: &str,
    token: &str,
    fingerprint: &str,
    state_dir: &Path,
) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(binary("netpilot-agent"))
        .args([
            "enroll",
            "--relay",
            relay_url,
            "--token",
            token,
            "--fingerprint",
            fingerprint,
            "--state-dir",
        ])
        .arg(state_dir)
        .kill_on_drop(true)
        .output()
        .await?)
}

pub struct EnrolledRouter {
    pub router_id: String,
    pub state_dir: PathBuf,
    _dir: Option<Arc<tempfile::TempDir>>,
}

impl EnrolledRouter {
    /// A state directory the caller owns (possibly not enrolled yet).
    pub fn at(router_id: &str, state_dir: &Path) -> EnrolledRouter {
        EnrolledRouter {
            router_id: router_id.to_owned(),
            state_dir: state_dir.to_owned(),
            _dir: None,
        }
    }
}

/// Where a test agent keeps what it would keep in the router's own directories.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    /// The live copy's directory (`--fw4-dir`).
    pub fw4_dir: PathBuf,
    /// fw4's include point, `ruleset-post` (the include is `netpilot.nft` in it).
    pub ruleset_post: PathBuf,
    pub fw4_include: PathBuf,
    /// The boot copy (the default: in the state directory).
    pub boot_copy: PathBuf,
    pub control: PathBuf,
}

impl AgentPaths {
    pub fn of(router: &EnrolledRouter) -> AgentPaths {
        let parent = router.state_dir.parent().expect("state parent");
        let ruleset_post = parent.join("ruleset-post");
        AgentPaths {
            fw4_dir: parent.join("run/fw4"),
            fw4_include: ruleset_post.join("netpilot.nft"),
            ruleset_post,
            boot_copy: router.state_dir.join("boot.nft"),
            control: parent.join("run/ctl/agent.sock"),
        }
    }

    /// The live copy fw4 includes.
    pub fn live_copy(&self) -> PathBuf {
        self.fw4_dir.join("netpilot.nft")
    }
}

/// A body whose bytes come when the test sends them on the channel (a request
/// body held open, or a router's answer streamed piece by piece); it ends when the
/// sender drops.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// The relay's `/metrics` scrape, as text.
pub async fn metrics(c: &Client) -> String {
    String::from_utf8_lossy(&c.get("/metrics").await.unwrap().raw).into_owned()
}

/// The value of one series (`name{labels}` exactly) in a scrape.
pub fn metric_value(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// What `nlbw` says when nlbwmon is not running.
pub const NLBW_DOWN: &str =
    "echo 'Error while processing command: No such file or directory' >&2\nexit 2\n";

/// A stand-in `nlbw` (`--nlbw` of a simulated agent): a shell script with `body`,
/// in `dir`; its path.
pub fn fake_nlbw(dir: &Path, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("nlbw");
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_string_lossy().into_owned()
}

/// An agent process.
pub struct Agent {
    child: Child,
    pub api_addr: Option<std::net::SocketAddr>,
}

/// Agent flags for tests: fast reconnects, no start delay, a short spread of the
/// first retry after a lost link (tests of a relay restart wait seconds, not the
/// production window).
pub fn fast_agent_args() -> Vec<String> {
    [
        "--start-delay-max",
        "0s",
        "--reconnect-spread",
        "200ms",
        "--backoff-base",
        "50ms",
        "--backoff-cap",
        "500ms",
        "--connect-timeout",
        "5s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Agent {
    /// Starts `netpilot-agent run` for an enrolled state directory.
    pub async fn start(router: &EnrolledRouter, extra: &[&str]) -> anyhow::Result<Agent> {
        Self::spawn(router, extra, true).await
    }

    /// Starts `netpilot-agent run` on a state directory that is not enrolled yet.
    pub async fn start_waiting(router: &EnrolledRouter, extra: &[&str]) -> anyhow::Result<Agent> {
        Self::spawn(router, extra, false).await
    }

    /// Starts `netpilot-agent run` inside a network namespace (see [`lab`]).
    pub async fn start_in(
        netns: &str,
        router: &EnrolledRouter,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        Self::spawn_in(Some(netns), router, extra, true).await
    }

    async fn spawn(
        router: &EnrolledRouter,
        extra: &[&str],
        enrolled: bool,
    ) -> anyhow::Result<Agent> {
        Self::spawn_in(None, router, extra, enrolled).await
    }

    async fn spawn_in(
        netns: Option<&str>,
        router: &EnrolledRouter,
        extra: &[&str],
        enrolled: bool,
    ) -> anyhow::Result<Agent> {
        let parent = router.state_dir.parent().expect("state parent");
        std::fs::create_dir_all(parent)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(parent.join("agent.log"))?;
        // Tests never read this machine's /etc/config/netpilot; a test passing
        // --config later on the command line wins.
        // `ip netns exec` execs the agent, so the child is the agent itself.
        let mut command = match netns {
            Some(ns) => Command::from(netpilot_testkit::netns::command_in(
                ns,
                binary("netpilot-agent"),
            )),
            None => Command::new(binary("netpilot-agent")),
        };
        // Nothing of this machine's: the copies of the rules fw4 would load and the
        // control socket live beside the state directory (a test may name others).
        let paths = AgentPaths::of(router);
        let mut child = command
            .arg("run")
            .args(["--config", "/nonexistent/netpilot"])
            .arg("--state-dir")
            .arg(&router.state_dir)
            .arg("--fw4-dir")
            .arg(&paths.fw4_dir)
            .arg("--fw4-include")
            .arg(&paths.fw4_include)
            .arg("--control")
            .arg(&paths.control)
            .args(fast_agent_args())
            .args(extra)
            .arg("--log")
            .arg(std::env::var("NETPILOT_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start netpilot-agent")?;
        let stdout = child.stdout.take().expect("piped stdout");
        if !enrolled {
            return Ok(Agent {
                child,
                api_addr: None,
            });
        }
        let mut lines = BufReader::new(stdout).lines();
        let mut api_addr = None;
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await??;
        match first {
            Some(l) if l.starts_with("agent running") => {}
            other => bail!("agent did not start: {other:?}"),
        }
        if extra.contains(&"--api-listen") {
            let l = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await??
                .unwrap_or_default();
            api_addr = l
                .strip_prefix("api listening ")
                .and_then(|a| a.parse().ok());
        }
        Ok(Agent { child, api_addr })
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM and waits (up to 10 s) for the exit status.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        terminate(&mut self.child).await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

async fn terminate(child: &mut Child) -> anyhow::Result<std::process::ExitStatus> {
    let pid = child.id().context("process already reaped")?;
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    if !ok.success() {
        bail!("kill -TERM {pid} failed");
    }
    Ok(tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .map_err(|_| anyhow!("process {pid} still running 10 s after SIGTERM"))??)
}

/// `netpilot-agent status --json`'s link section, asked on the agent's control
/// socket (which relay it is on, how often it connected, its last error).
pub fn agent_link_status(socket: &Path) -> Value {
    let out = std::process::Command::new(binary("netpilot-agent"))
        .args(["status", "--json", "--control", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["link"].clone()
}

/// The answer to one API call.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub raw: Bytes,
    pub headers: hyper::HeaderMap,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// Reads a response: its head, and its body unless it is a `101` (whose
    /// stream belongs to the upgrade).
    pub async fn read(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let raw = if status == 101 {
            Bytes::new()
        } else {
            resp.into_body().collect().await?.to_bytes()
        };
        let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            body,
            raw,
            headers,
        })
    }
}

/// An HTTP/2 client of the relay's REST API over TLS pinned to the relay's
/// fingerprint. Cheap to clone; calls are concurrent streams.
#[derive(Clone)]
pub struct Client {
    sender: Arc<Mutex<SendRequest<Full<Bytes>>>>,
    key: Option<String>,
}

impl Client {
    pub async fn connect(
        addr: std::net::SocketAddr,
        fingerprint: &str,
        key: &str,
    ) -> anyhow::Result<Client> {
        let sender = h2_connect(addr, fingerprint, None).await?;
        Ok(Client {
            sender: Arc::new(Mutex::new(sender)),
            key: Some(key.to_owned()),
        })
    }

    /// A client whose connection comes from `source` (any of 127.0.0.0/8 is this
    /// host), so the relay sees several clients on one machine.
    pub async fn connect_from(
        source: std::net::IpAddr,
        addr: std::net::SocketAddr,
        fingerprint: &str,
        key: Option<&str>,
    ) -> anyhow::Result<Client> {
        let sender = h2_connect(addr, fingerprint, Some(source)).await?;
        Ok(Client {
            sender: Arc::new(Mutex::new(sender)),
            key: key.map(str::to_owned),
        })
    }

    /// The same connection, another (or no) API key.
    pub fn with_key(&self, key: Option<&str>) -> Client {
        Client {
            sender: self.sender.clone(),
            key: key.map(str::to_owned),
        }
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.call("GET", path, None, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Reply> {
        self.call(
            "POST",
            path,
            Some(Bytes::from(body.to_string())),
            Some("application/json"),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Reply> {
        self.call("DELETE", path, None, None).await
    }

    /// `GET path`, returned as soon as the answer's head is in, its body still
    /// arriving: for what a streamed answer sends before it ends.
    pub async fn get_streaming(
        &self,
        path: &str,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let mut b = Request::builder()
            .method("GET")
            .uri(format!("https://relay{path}"));
        if let Some(k) = &self.key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        let req = b.body(Full::new(Bytes::new()))?;
        let mut sender = self.sender.lock().await.clone();
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        content_type: Option<&str>,
    ) -> anyhow::Result<Reply> {
        self.call_with(method, path, body, content_type, &[]).await
    }

    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("https://relay{path}"));
        if let Some(k) = &self.key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body.unwrap_or_default()))?;
        let mut sender = self.sender.lock().await.clone();
        sender.ready().await?;
        Reply::read(sender.send_request(req).await?).await
    }
}

async fn h2_connect(
    addr: std::net::SocketAddr,
    fingerprint: &str,
    source: Option<std::net::IpAddr>,
) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let tls = netpilot_agent::link::tls::client_config(
        &netpilot_agent::link::tls::Trust::Fingerprint(fingerprint.to_owned()),
    )?;
    let mut cfg = (*tls).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = match source {
        None => tokio::net::TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The relay as an enrolled router's agent reaches it outside the link (reports,
/// speed tests), with the router's own secret or `secret` instead.
pub fn relay_endpoint(
    relay: &Relay,
    router: &EnrolledRouter,
    secret: Option<&str>,
) -> netpilot_agent::link::dial::RelayEndpoint {
    let id = netpilot_agent::link::identity::Identity::load(&router.state_dir)
        .expect("enrolled identity");
    netpilot_agent::link::dial::RelayEndpoint::new(
        std::sync::Arc::new(netpilot_agent::link::dial::Relays::new(
            netpilot_agent::link::dial::RelayAddr::parse(&relay.url()).expect("the relay's URL"),
            [],
        )),
        netpilot_agent::link::tls::client_config(&id.trust).expect("the identity's TLS trust"),
        id.router_id,
        secret.map(str::to_owned).unwrap_or(id.router_secret),
        Duration::from_secs(5),
    )
}

/// A relay in this process (the tour, the speed-test bench): `netpilot_relay::run` on
/// `listener`, returned once it has announced itself. Sending on (or dropping) `stop`
/// shuts it down; `task` ends with the relay's result.
pub struct InProcessRelay {
    pub ready: netpilot_relay::Ready,
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn in_process_relay(
    config: netpilot_relay::config::Config,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<InProcessRelay> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(netpilot_relay::run(
        config,
        listener,
        Arc::new(netpilot_relay::state::SystemClock),
        move |r| {
            let _ = ready_tx.send(r);
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let ready = ready_rx.await.context("relay did not start")?;
    Ok(InProcessRelay { ready, stop, task })
}

/// A new random session id.
pub fn session_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Starts a session for `user` on `router` and returns the session id.
pub async fn start_session(c: &Client, user: &str, router_id: &str) -> anyhow::Result<String> {
    let sid = session_id();
    let r = c
        .post(
            "/api/session/start",
            json!({"sessionId": sid, "userId": user, "routerId": router_id}),
        )
        .await?;
    if r.status != 200 {
        bail!("session start: {} {}", r.status, r.body);
    }
    Ok(sid)
}

/// `GET path?sessionId=…&routerId=…`.
pub fn q(path: &str, session: &str, router: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}sessionId={session}&routerId={router}")
}

/// Polls `f` until it returns `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// For benchmarks run as root: moves this process into a fresh network namespace
/// (nothing outside it is touched) with loopback up and the router's two devices,
/// `lan0` and `wan0` (veth pairs with `lan1`/`wan1` as the far ends, all up), and
/// `lan_addr` (CIDR) on `lan0` if given. Keep the namespace until the bench ends:
/// dropping it deletes its name (the process stays inside).
pub fn enter_bench_namespace(what: &str, lan_addr: Option<&str>) -> anyhow::Result<lab::Netns> {
    let missing = netpilot_testkit::netns::missing(&["ip"]);
    if !missing.is_empty() {
        bail!("the {what} benchmark needs {}", missing.join(", "));
    }
    let ns = lab::Netns::new("bench")?;
    ns.enter()
        .context("cannot enter the bench's network namespace")?;
    let mut steps: Vec<Vec<&str>> = vec![
        vec![
            "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
        ],
        vec![
            "ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1",
        ],
    ];
    if let Some(a) = lan_addr {
        steps.push(vec!["ip", "addr", "add", a, "dev", "lan0"]);
    }
    for dev in ["lan0", "lan1", "wan0", "wan1"] {
        steps.push(vec!["ip", "link", "set", dev, "up"]);
    }
    for argv in steps {
        netpilot_testkit::netns::run(&argv)?;
    }
    Ok(ns)
}
