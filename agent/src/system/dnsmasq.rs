//! The DNS resolver seam: one dnsmasq instance per filtered group, each on its own
//! port with its own files in a state directory (`<id>.conf`, `<id>.servers`,
//! `<id>.pid`). nftables redirects the group's port-53 traffic to that port; this
//! module only keeps the instances running with the wanted files.
//!
//! Facts this relies on (dnsmasq 2.90):
//! - `dnsmasq --conf-file=X` daemonises and its parent exits only once the child has
//!   bound its sockets, with a non-zero status and the reason on stderr when it could
//!   not ("Address already in use"). So a start is one [`process::run`] with a
//!   timeout. The daemon points its stdin/stdout/stderr at `/dev/null` before the
//!   parent exits, so it does not hold `process::run`'s pipes open (checked: the run
//!   returns in milliseconds, not at the timeout).
//! - The block list lives in `servers-file=`, which dnsmasq re-reads on SIGHUP (and
//!   clears its cache then, so a newly blocked name is not answered from the cache).
//!   A changed list is a SIGHUP, not a restart. A servers file can only hold
//!   `server=`/`rev-server=` lines, so it cannot smuggle in other options.
//! - The parent exits before the daemon has read the servers file (100,000 lines:
//!   the start returns after ~15 ms, the list is in force ~130 ms later on an idle
//!   machine). Queries sent meanwhile wait in the socket and are answered from the
//!   full list, not forwarded unfiltered (a test checks this at 30,000 lines; the
//!   ignored `netns_dnsmasq_100k_figures` measures at 100,000). `ensure` returns
//!   only once the list's own canary is refused, i.e. once the list is in force
//!   (100,000 lines: 250-330 ms for a start or a reload, on this loaded machine).
//! - The pid file is how a later agent process finds an instance: instances
//!   deliberately outlive the agent, so filtering holds while it restarts. A pid is
//!   signalled only when `/proc/<pid>/cmdline` shows it is dnsmasq started with this
//!   instance's conf path; a stale pid reused by another process is left alone.
//! - dnsmasq drops to its user (`nobody` unless `user=`; OpenWrt's is `dnsmasq`)
//!   and reads the servers file as that user, at start and on SIGHUP: files are
//!   0644, the directory 0755 (made so on every ensure, whatever created it). A
//!   servers file it cannot read is no error to dnsmasq: at start it answers
//!   everything unfiltered; on SIGHUP it keeps the list it had, so the names the new
//!   list adds go unfiltered (checked with dnsmasq 2.90 as user `dnsmasq`). Hence
//!   the canary below, one name per list version.
//! - Proof by effect: after every start and reload, and when observed, the instance
//!   is asked for a canary name its list blocks (`super::dns_wire`); an answer that is
//!   not dnsmasq's local NXDOMAIN is [`DnsError::Canary`] (from `ensure`) or
//!   [`ObservedInstance::canary`] (drift). `interface=` makes dnsmasq bind loopback
//!   too, so the question goes to 127.0.0.1 at the instance's port.
//!
//! [`FakeResolver`] keeps the same semantics in memory for unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dns_wire::CANARY;
pub use super::Fut;
use crate::runtime::process::{self, ProcessError, Signal};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// `[a-z0-9]{1,16}`, e.g. `g3`; used in file names.
    pub id: String,
    /// The port it answers on, e.g. 5353 + slot.
    pub port: u16,
    /// Addresses to bind; with `interface` set they may be empty.
    pub listen: Vec<IpAddr>,
    /// Interfaces whose addresses to bind, following them as they change (the
    /// LAN bridges: nftables' redirect sends to the primary address of the one a
    /// query came in on). Empty: only `listen`.
    pub interfaces: Vec<String>,
    /// dnsmasq `server=` values: `127.0.0.1`, `10.77.0.2#53`, `::1#5353`.
    pub upstreams: Vec<String>,
    /// The servers-file body (escaped and validated by the caller).
    pub servers: Arc<String>,
    pub cache_size: u32,
    /// A name the servers file blocks, asked after every start and reload to prove
    /// the list is in force (`dns_wire::list_canary`).
    pub canary: String,
    /// Whom the instance filters for, in messages (`group 3`).
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedInstance {
    pub id: String,
    /// What the pid file says, for diagnostics; it may be stale.
    pub pid: Option<i32>,
    /// True only when `pid` is verified to be this instance's dnsmasq.
    pub running: bool,
    pub conf: Option<String>,
    pub servers: Option<String>,
    /// A running instance that did not refuse [`CANARY`]: what it answered.
    pub canary: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// Already running with exactly these files.
    Unchanged,
    /// Only the servers file changed: SIGHUP sent.
    Reloaded,
    /// Started, or restarted because the conf changed.
    Started,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// dnsmasq refused to start; the error carries its argv and stderr.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Reading or writing a state file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A spec value that would not make a well-formed config line.
    #[error("invalid DNS instance spec: {0}")]
    Invalid(String),
    /// dnsmasq started (exit 0) but no live instance could be found, or it vanished
    /// before it could be signalled.
    #[error("dnsmasq instance {id} is not running: {detail}")]
    NotRunning { id: String, detail: String },
    /// It runs, but answered its canary unfiltered: its block list is not in force
    /// (an unreadable servers file, a list without the canary).
    #[error(transparent)]
    Canary(Box<Unfiltered>),
    /// It outlived SIGTERM and SIGKILL within the timeout.
    #[error("dnsmasq instance {id} (pid {pid}) did not exit")]
    StillRunning { id: String, pid: i32 },
}

impl DnsError {
    /// dnsmasq's own message when it refused to start.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            DnsError::Process(ProcessError::Failed { stderr, .. }) => Some(stderr),
            _ => None,
        }
    }
}

/// A resolver whose canary was not refused; boxed in [`DnsError`] to keep it small.
#[derive(Debug, thiserror::Error)]
#[error("dns resolver {id} ({label}, port {port}) answered the canary {name} with {answered}, not the local NXDOMAIN of a blocked name: its block list is not in force (is {dir} readable by the user dnsmasq runs as?)")]
pub struct Unfiltered {
    pub id: String,
    pub label: String,
    pub port: u16,
    pub name: String,
    pub answered: String,
    pub dir: String,
}

pub trait Resolver: Send + Sync {
    /// Every instance whose files are in the state directory, with its process state.
    fn observe(&self) -> Fut<'_, Result<Vec<ObservedInstance>, DnsError>>;
    /// Makes the instance run with exactly this spec: writes `<id>.conf` / `<id>.servers`
    /// (temp file + fsync + rename, only when the content differs), then: not running → start;
    /// only the servers file changed → SIGHUP (dnsmasq re-reads --servers-file on SIGHUP);
    /// conf changed → stop and start. Returns what it did.
    fn ensure<'a>(&'a self, spec: &'a InstanceSpec) -> Fut<'a, Result<Ensured, DnsError>>;
    /// Stops the instance (SIGTERM, wait until gone, bounded) and removes its files. Unknown id: Ok.
    fn stop<'a>(&'a self, id: &'a str) -> Fut<'a, Result<(), DnsError>>;
    /// Resident memory of the instance in KiB (VmRSS), None when not running.
    fn memory_kib(&self, id: &str) -> Option<u64>;
}

/// Instance ids end up in file names and config lines: `[a-z0-9]{1,16}`.
pub fn valid_id(id: &str) -> bool {
    (1..=16).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Checks every spec value that goes into a config line. The caller validates too;
/// this is the last line of defence against a newline or `#` turning one value into
/// another option.
pub fn validate(spec: &InstanceSpec) -> Result<(), DnsError> {
    let bad = |m: String| Err(DnsError::Invalid(m));
    if !valid_id(&spec.id) {
        return bad(format!("id {:?} is not [a-z0-9]{{1,16}}", spec.id));
    }
    if spec.port == 0 {
        // dnsmasq reads port=0 as "no DNS at all".
        return bad(format!("{}: port 0", spec.id));
    }
    if spec.listen.is_empty() && spec.interfaces.is_empty() {
        // With neither dnsmasq would answer on every interface.
        return bad(format!("{}: no listen address or interface", spec.id));
    }
    for i in &spec.interfaces {
        let if_ok = (1..=15).contains(&i.len())
            && i.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !if_ok {
            return bad(format!("{}: interface {i:?}", spec.id));
        }
    }
    if super::dns_wire::query(0, &spec.canary).is_err() {
        return bad(format!("{}: canary {:?}", spec.id, spec.canary));
    }
    if spec.upstreams.is_empty() {
        // Every name not on the block list would be REFUSED: no DNS for the group.
        return bad(format!("{}: no upstream", spec.id));
    }
    for u in &spec.upstreams {
        let ok = !u.is_empty()
            && u.len() <= 64
            && u.bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b':' || b == b'#');
        if !ok {
            return bad(format!("{}: upstream {u:?}", spec.id));
        }
    }
    Ok(())
}

/// A user name for `user=`: what `useradd` accepts, conservatively.
fn valid_user(u: &str) -> bool {
    (1..=32).contains(&u.len())
        && u.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase() || b == b'_' || (i > 0 && (b.is_ascii_digit() || b == b'-'))
        })
}

/// dnsmasq's `--user` for the resolvers: the configured one (`-`: dnsmasq's own
/// default), else `dnsmasq` when `passwd` (the text of `/etc/passwd`) has it, as
/// OpenWrt's and Debian's packages do, else dnsmasq's default (`nobody`).
pub fn pick_user(configured: Option<&str>, passwd: &str) -> Option<String> {
    match configured {
        Some("-") => None,
        Some(u) => Some(u.to_owned()),
        None => passwd
            .lines()
            .any(|l| l.starts_with("dnsmasq:"))
            .then(|| "dnsmasq".to_owned()),
    }
}

/// The state directory goes into `servers-file=` and `pid-file=` lines unquoted.
fn valid_dir(dir: &Path) -> Option<&str> {
    let s = dir.to_str()?;
    let ok = s.starts_with('/')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b));
    ok.then_some(s)
}

/// The whole `<id>.conf` for a spec whose files live in `dir`.
pub fn render_conf(
    spec: &InstanceSpec,
    dir: &Path,
    user: Option<&str>,
) -> Result<String, DnsError> {
    validate(spec)?;
    let d = valid_dir(dir)
        .ok_or_else(|| DnsError::Invalid(format!("state directory {}", dir.display())))?;
    let id = &spec.id;
    let mut s = format!(
        "# NetPilot DNS filter {id}: written by the agent, replaced on every change.\n\
         port={}\n",
        spec.port
    );
    for a in &spec.listen {
        s.push_str(&format!("listen-address={a}\n"));
    }
    // Bind only these addresses, so instances on other ports and the router's own
    // dnsmasq on port 53 keep theirs; an interface's addresses are followed as they
    // come and go (bind-dynamic). No dhcp-range: no DHCP.
    if spec.interfaces.is_empty() {
        s.push_str("bind-interfaces\n");
    } else {
        for i in &spec.interfaces {
            s.push_str(&format!("interface={i}\n"));
        }
        s.push_str("bind-dynamic\n");
    }
    // Answers come only from the servers file and the upstreams: not from the
    // router's resolv.conf (which may point back at an instance) or /etc/hosts.
    s.push_str("no-resolv\nno-hosts\n");
    // The agent SIGHUPs after a change; dnsmasq need not poll anything.
    s.push_str("no-poll\n");
    s.push_str(&format!("cache-size={}\n", spec.cache_size));
    for u in &spec.upstreams {
        s.push_str(&format!("server={u}\n"));
    }
    s.push_str(&format!(
        "servers-file={d}/{id}.servers\npid-file={d}/{id}.pid\n"
    ));
    // Logging stays dnsmasq's default, syslog: without log-queries it writes a
    // handful of lines per start and reload (it caps the per-server lines), and
    // errors after daemonising, such as an unreadable servers file, stay visible.
    if let Some(u) = user {
        if !valid_user(u) {
            return Err(DnsError::Invalid(format!("user {u:?}")));
        }
        s.push_str(&format!("user={u}\n"));
    }
    Ok(s)
}

/// The real adapter: drives the dnsmasq binary.
pub struct RealDnsmasq {
    /// `dnsmasq`, or a path to it.
    pub program: String,
    /// The state directory, e.g. `/var/run/netpilot/dns`.
    pub dir: PathBuf,
    /// dnsmasq's `--user`; `None` leaves dnsmasq's default.
    pub user: Option<String>,
    /// Bound for a start, and for an instance to exit after SIGTERM.
    pub timeout: Duration,
}

impl Default for RealDnsmasq {
    fn default() -> Self {
        RealDnsmasq {
            program: "dnsmasq".into(),
            dir: PathBuf::from("/var/run/netpilot/dns"),
            user: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// How often to look whether an instance came up or went away.
const POLL: Duration = Duration::from_millis(5);

/// How long an unfiltered answer to the canary is asked again after a start or
/// reload: dnsmasq may answer a question that arrived before it handled the SIGHUP
/// from the old list. A question that arrives while it reads a list waits in the
/// socket and is answered from the new one (100,000 lines: ~130 ms here), so this
/// need not cover the reading; each question waits up to the resolver's timeout.
const CANARY_RETRY: Duration = Duration::from_secs(2);
/// One question's wait in the periodic check, and how long an unfiltered answer
/// is asked again there.
const CANARY_CHECK: Duration = Duration::from_millis(1500);

/// Asks `name` at `addr` until the answer is dnsmasq's local NXDOMAIN or `retry`
/// has passed, each question waiting up to `wait`; `Ok(())` when blocked, else what
/// was answered last.
async fn ask_canary(
    addr: std::net::SocketAddr,
    name: &str,
    retry: Duration,
    wait: Duration,
) -> Result<(), String> {
    use super::dns_wire as message;
    let deadline = Instant::now() + retry;
    let bind: std::net::SocketAddr = if addr.is_ipv4() {
        ([127, 0, 0, 1], 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("no socket: {e}"))?;
    sock.connect(addr)
        .await
        .map_err(|e| format!("cannot reach {addr}: {e}"))?;
    // Any id will do: the socket is connected to the one server, and a reply to
    // an earlier question is told apart by it.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut id = (std::process::id() as u16) ^ (nanos as u16);
    loop {
        id = id.wrapping_add(1);
        let q = message::query(id, name).map_err(|e| e.to_string())?;
        let last = match sock.send(&q).await {
            Err(e) => format!("no answer ({e})"),
            Ok(_) => answer(&sock, id, wait).await,
        };
        if last.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The answer to question `id`, in words; empty when it is the local NXDOMAIN of
/// a blocked name. A late reply to an earlier question is skipped.
async fn answer(sock: &tokio::net::UdpSocket, id: u16, wait: Duration) -> String {
    use super::dns_wire::{parse_reply, MessageError};
    let until = Instant::now() + wait;
    let mut buf = [0u8; 512];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        return match tokio::time::timeout(left, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => match parse_reply(id, &buf[..n]) {
                Ok(r) if r.is_blocked() => String::new(),
                Ok(r) => r.to_string(),
                Err(MessageError::WrongId { .. }) => continue,
                Err(e) => format!("a malformed reply ({e})"),
            },
            // Refused connection: nothing listens (yet).
            Ok(Err(e)) => format!("no answer ({e})"),
            Err(_) => format!("no answer within {}ms", wait.as_millis()),
        };
    }
}

/// Where an instance answers, from its conf: the first `listen-address=`, else
/// loopback (which `interface=` binds too), at `port=`.
fn answer_addr(conf: &str) -> Option<std::net::SocketAddr> {
    let mut port = None;
    let mut addr = None;
    for l in conf.lines() {
        if let Some(p) = l.strip_prefix("port=") {
            port = p.parse::<u16>().ok();
        } else if let Some(a) = l.strip_prefix("listen-address=") {
            addr = addr.or_else(|| a.parse::<IpAddr>().ok());
        }
    }
    let ip = addr.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    Some((ip, port?).into())
}

impl RealDnsmasq {
    pub fn conf_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.conf"))
    }

    pub fn servers_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.servers"))
    }

    pub fn pid_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pid"))
    }

    /// The argument that identifies the instance in `/proc/<pid>/cmdline`.
    fn conf_arg(&self, id: &str) -> String {
        format!("--conf-file={}", self.conf_path(id).display())
    }

    fn read_pid(&self, id: &str) -> Option<i32> {
        std::fs::read_to_string(self.pid_path(id))
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
    }

    /// Whether `pid` is this instance's dnsmasq: its argv is exactly what
    /// [`Self::start`] runs. A zombie's cmdline is empty, so it counts as gone.
    fn is_ours(&self, pid: i32, id: &str) -> bool {
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let mut args = raw.split(|b| *b == 0);
        let (Some(prog), Some(conf)) = (args.next(), args.next()) else {
            return false;
        };
        let base = |p: &[u8]| p.rsplit(|b| *b == b'/').next().map(<[u8]>::to_vec);
        base(prog) == base(self.program.as_bytes()) && conf == self.conf_arg(id).as_bytes()
    }

    /// The pid file's pid and whether it is this instance's live dnsmasq.
    fn process(&self, id: &str) -> (Option<i32>, bool) {
        let pid = self.read_pid(id);
        (pid, pid.is_some_and(|p| self.is_ours(p, id)))
    }

    /// Proves `spec`'s list in force by its canary; [`DnsError::Canary`] if not.
    async fn check_canary(&self, spec: &InstanceSpec, conf: &str) -> Result<(), DnsError> {
        let addr = answer_addr(conf)
            .ok_or_else(|| DnsError::Invalid(format!("{}: no port in its conf", spec.id)))?;
        ask_canary(addr, &spec.canary, CANARY_RETRY, self.timeout)
            .await
            .map_err(|answered| {
                DnsError::Canary(Box::new(Unfiltered {
                    id: spec.id.clone(),
                    label: spec.label.clone(),
                    port: spec.port,
                    name: spec.canary.clone(),
                    answered,
                    dir: self.dir.display().to_string(),
                }))
            })
    }

    fn running_pid(&self, id: &str) -> Option<i32> {
        match self.process(id) {
            (Some(p), true) => Some(p),
            _ => None,
        }
    }

    async fn start(&self, id: &str) -> Result<(), DnsError> {
        // A stale pid file would make the wait below see the old pid.
        remove_if_present(&self.pid_path(id))?;
        let arg = self.conf_arg(id);
        process::run(&[&self.program, &arg], None, self.timeout).await?;
        // The parent exits after the child wrote its pid file; poll in case a build
        // orders that differently.
        let deadline = Instant::now() + self.timeout;
        loop {
            if self.running_pid(id).is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DnsError::NotRunning {
                    id: id.to_owned(),
                    detail: format!("no live dnsmasq in {}", self.pid_path(id).display()),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM, wait until gone; SIGKILL when it outlives the timeout.
    async fn terminate(&self, id: &str, pid: i32) -> Result<(), DnsError> {
        for (sig, wait) in [
            (Signal::Terminate, self.timeout),
            (Signal::Kill, Duration::from_secs(1)),
        ] {
            // Checked again right before signalling: the pid may have been reused.
            if !self.is_ours(pid, id) {
                return Ok(());
            }
            // Gone in between is what we want; anything else shows as the timeout.
            let _ = process::signal(pid, sig);
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if !self.is_ours(pid, id) {
                    return Ok(());
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Err(DnsError::StillRunning {
            id: id.to_owned(),
            pid,
        })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DnsError + '_ {
    move |source| DnsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn remove_if_present(path: &Path) -> Result<(), DnsError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, DnsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Replaces `path` with `body` unless it already holds exactly that: a temp file in
/// the same directory, fsync, rename, so dnsmasq never reads half a file. 0644
/// whatever the umask, for the user dnsmasq runs as. Returns whether it wrote.
fn write_if_changed(path: &Path, body: &[u8]) -> Result<bool, DnsError> {
    // The length first: a changed block list of megabytes is rarely the same size.
    let meta = std::fs::metadata(path).ok();
    let same_len = meta.as_ref().is_some_and(|m| m.len() == body.len() as u64);
    if same_len && std::fs::read(path).is_ok_and(|old| old == body) {
        // The right text with the wrong mode is as unreadable to dnsmasq's user as
        // a missing file: put the mode back.
        if meta.is_some_and(|m| m.permissions().mode() & 0o777 != 0o644) {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
                .map_err(io_err(path))?;
        }
        return Ok(false);
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(body)?;
        f.sync_all()
    };
    write().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(true)
}

/// `VmRSS:     2260 kB` → 2260.
fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Resolver for RealDnsmasq {
    fn observe(&self) -> Fut<'_, Result<Vec<ObservedInstance>, DnsError>> {
        Box::pin(async move {
            let entries = match std::fs::read_dir(&self.dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io_err(&self.dir)(e)),
            };
            let mut ids = BTreeSet::new();
            for e in entries {
                let name = e.map_err(io_err(&self.dir))?.file_name();
                let name = name.to_string_lossy();
                let stem = [".conf", ".servers", ".pid"]
                    .iter()
                    .find_map(|ext| name.strip_suffix(ext));
                if let Some(id) = stem.filter(|id| valid_id(id)) {
                    ids.insert(id.to_owned());
                }
            }
            let mut out = Vec::new();
            for id in ids {
                let (pid, running) = self.process(&id);
                let conf = read_optional(&self.conf_path(&id))?;
                // Only a running instance with a list is asked: anything else is
                // drift already.
                let servers = read_optional(&self.servers_path(&id))?;
                let canary = match (&conf, running && servers.is_some()) {
                    (Some(c), true) => match answer_addr(c) {
                        Some(addr) => ask_canary(addr, CANARY, CANARY_CHECK, CANARY_CHECK)
                            .await
                            .err(),
                        None => Some("no port in its conf".into()),
                    },
                    _ => None,
                };
                out.push(ObservedInstance {
                    conf,
                    servers,
                    id,
                    pid,
                    running,
                    canary,
                });
            }
            Ok(out)
        })
    }

    fn ensure<'a>(&'a self, spec: &'a InstanceSpec) -> Fut<'a, Result<Ensured, DnsError>> {
        Box::pin(async move {
            // Everything is checked before anything is written.
            let conf = render_conf(spec, &self.dir, self.user.as_deref())?;
            std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err(&self.dir))?;
            let id = &spec.id;
            let conf_changed = write_if_changed(&self.conf_path(id), conf.as_bytes())?;
            let servers_changed =
                write_if_changed(&self.servers_path(id), spec.servers.as_bytes())?;
            // Files first, then the process: a failed start leaves the wanted files
            // behind, and the next ensure starts from them.
            let done = match self.running_pid(id) {
                None => {
                    self.start(id).await?;
                    Ensured::Started
                }
                Some(pid) if conf_changed => {
                    self.terminate(id, pid).await?;
                    self.start(id).await?;
                    Ensured::Started
                }
                Some(pid) if servers_changed => {
                    process::signal(pid, Signal::Hangup).map_err(|e| DnsError::NotRunning {
                        id: id.clone(),
                        detail: e.to_string(),
                    })?;
                    Ensured::Reloaded
                }
                Some(pid) => {
                    // Running with the right files, yet its list may not be in force
                    // (it could not read it at its last reload): one restart, which
                    // reads it afresh now that the modes are right.
                    if self.check_canary(spec, &conf).await.is_ok() {
                        return Ok(Ensured::Unchanged);
                    }
                    tracing::warn!(
                        id,
                        "dns resolver answers its canary unfiltered; restarting it"
                    );
                    self.terminate(id, pid).await?;
                    self.start(id).await?;
                    Ensured::Started
                }
            };
            self.check_canary(spec, &conf).await?;
            Ok(done)
        })
    }

    fn stop<'a>(&'a self, id: &'a str) -> Fut<'a, Result<(), DnsError>> {
        Box::pin(async move {
            if !valid_id(id) {
                return Err(DnsError::Invalid(format!("id {id:?}")));
            }
            if let Some(pid) = self.running_pid(id) {
                self.terminate(id, pid).await?;
            }
            // Collect every removal error rather than stopping at the first.
            let mut first = None;
            for p in [self.conf_path(id), self.servers_path(id), self.pid_path(id)] {
                let mut tmp = p.clone().into_os_string();
                tmp.push(".tmp");
                for p in [p, PathBuf::from(tmp)] {
                    if let Err(e) = remove_if_present(&p) {
                        tracing::warn!(error = %e, "dns.stop");
                        first.get_or_insert(e);
                    }
                }
            }
            first.map_or(Ok(()), Err)
        })
    }

    fn memory_kib(&self, id: &str) -> Option<u64> {
        let pid = self.running_pid(id)?;
        vm_rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }
}

/// An in-memory resolver with the real one's semantics: the same `Ensured` for the
/// same sequence of specs, the same conf text, and files that stay behind a failed
/// start. Tests can fail the next ensure of an id, crash an instance, and count.
pub struct FakeResolver {
    /// The directory named in the conf text, as the real one's would be.
    pub dir: PathBuf,
    state: Mutex<FakeState>,
}

impl Default for FakeResolver {
    fn default() -> Self {
        FakeResolver {
            dir: PathBuf::from("/var/run/netpilot/dns"),
            state: Mutex::default(),
        }
    }
}

#[derive(Default)]
struct FakeState {
    instances: BTreeMap<String, FakeInstance>,
    fail_next: BTreeSet<String>,
    /// Instances answering their canary unfiltered; `true`: until restarted.
    unfiltered: BTreeMap<String, bool>,
    starts: BTreeMap<String, u32>,
    reloads: BTreeMap<String, u32>,
    last_pid: i32,
}

#[derive(Default, Clone)]
struct FakeInstance {
    conf: String,
    servers: Arc<String>,
    pid: Option<i32>,
    running: bool,
}

impl FakeResolver {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake resolver")
    }

    /// The next ensure of `id` writes its files and then fails to start, as dnsmasq
    /// does when its port is taken.
    pub fn fail_next(&self, id: &str) {
        self.state().fail_next.insert(id.to_owned());
    }

    /// The instance dies behind the resolver's back (kill -9): its pid file stays.
    pub fn crash(&self, id: &str) {
        if let Some(i) = self.state().instances.get_mut(id) {
            i.running = false;
        }
    }

    /// The pid file now names `pid`, a process that is not this instance.
    pub fn point_pid_at(&self, id: &str, pid: i32) {
        if let Some(i) = self.state().instances.get_mut(id) {
            i.running = false;
            i.pid = Some(pid);
        }
    }

    /// `id` answers everything unfiltered, as dnsmasq does when it cannot read its
    /// servers file; with `heals_on_restart` a restart fixes that (the modes were
    /// wrong at the last reload), without it nothing does (the directory stays
    /// unreadable).
    pub fn answer_unfiltered(&self, id: &str, heals_on_restart: bool) {
        self.state()
            .unfiltered
            .insert(id.to_owned(), heals_on_restart);
    }

    pub fn starts(&self, id: &str) -> u32 {
        self.state().starts.get(id).copied().unwrap_or(0)
    }

    pub fn reloads(&self, id: &str) -> u32 {
        self.state().reloads.get(id).copied().unwrap_or(0)
    }
}

impl Resolver for FakeResolver {
    fn observe(&self) -> Fut<'_, Result<Vec<ObservedInstance>, DnsError>> {
        Box::pin(async move {
            let s = self.state();
            Ok(s.instances
                .iter()
                .map(|(id, i)| ObservedInstance {
                    id: id.clone(),
                    pid: i.pid,
                    running: i.running,
                    conf: Some(i.conf.clone()),
                    servers: Some(i.servers.to_string()),
                    canary: (i.running && s.unfiltered.contains_key(id))
                        .then(|| "REFUSED (injected)".to_owned()),
                })
                .collect())
        })
    }

    fn ensure<'a>(&'a self, spec: &'a InstanceSpec) -> Fut<'a, Result<Ensured, DnsError>> {
        Box::pin(async move {
            let conf = render_conf(spec, &self.dir, None)?;
            let mut s = self.state();
            let s = &mut *s;
            let inst = s.instances.entry(spec.id.clone()).or_default();
            let conf_changed = inst.conf != conf;
            let servers_changed = inst.servers != spec.servers;
            inst.conf = conf;
            inst.servers = spec.servers.clone();
            let canary = |s: &FakeState| {
                let listed = spec
                    .servers
                    .contains(&format!("server=/{}/\n", spec.canary));
                let answered = match (s.unfiltered.contains_key(&spec.id), listed) {
                    (true, _) => "REFUSED (injected)",
                    (false, false) => "NOERROR (the list lacks the canary)",
                    (false, true) => return Ok(()),
                };
                Err(DnsError::Canary(Box::new(Unfiltered {
                    id: spec.id.clone(),
                    label: spec.label.clone(),
                    port: spec.port,
                    name: spec.canary.clone(),
                    answered: answered.into(),
                    dir: self.dir.display().to_string(),
                })))
            };
            // Unfiltered while running with the right files: restarted once, as
            // the real one does.
            let restart = inst.running
                && !conf_changed
                && !servers_changed
                && s.unfiltered.contains_key(&spec.id);
            if restart {
                if s.unfiltered.get(&spec.id) == Some(&true) {
                    s.unfiltered.remove(&spec.id);
                }
                *s.starts.entry(spec.id.clone()).or_default() += 1;
                canary(s)?;
                return Ok(Ensured::Started);
            }
            let inst = s.instances.get_mut(&spec.id).expect("just inserted");
            let done = if !inst.running || conf_changed {
                inst.running = false;
                if s.fail_next.remove(&spec.id) {
                    return Err(DnsError::Process(ProcessError::Failed {
                        argv: vec!["dnsmasq".into(), format!("--conf-file={}", spec.id)],
                        status: "exit status: 2".into(),
                        code: Some(2),
                        stderr: "injected failure".into(),
                    }));
                }
                s.last_pid += 1;
                inst.pid = Some(1000 + s.last_pid);
                inst.running = true;
                *s.starts.entry(spec.id.clone()).or_default() += 1;
                if s.unfiltered.get(&spec.id) == Some(&true) {
                    s.unfiltered.remove(&spec.id);
                }
                Ensured::Started
            } else if servers_changed {
                *s.reloads.entry(spec.id.clone()).or_default() += 1;
                Ensured::Reloaded
            } else {
                Ensured::Unchanged
            };
            canary(s)?;
            Ok(done)
        })
    }

    fn stop<'a>(&'a self, id: &'a str) -> Fut<'a, Result<(), DnsError>> {
        Box::pin(async move {
            if !valid_id(id) {
                return Err(DnsError::Invalid(format!("id {id:?}")));
            }
            self.state().instances.remove(id);
            Ok(())
        })
    }

    fn memory_kib(&self, id: &str) -> Option<u64> {
        let s = self.state();
        let i = s.instances.get(id).filter(|i| i.running)?;
        // dnsmasq's base plus roughly what the list costs it.
        Some(2048 + i.servers.len() as u64 / 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::super::dns_wire;
    use super::*;
    use std::any::Any;
    use std::net::{Ipv4Addr, UdpSocket};

    fn spec(id: &str, port: u16, upstream: &str, servers: &str) -> InstanceSpec {
        InstanceSpec {
            id: id.into(),
            port,
            listen: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            interfaces: Vec::new(),
            upstreams: vec![upstream.into()],
            // Every list ends with the canaries, as the compiler writes it.
            servers: Arc::new(format!("{servers}{}", dns_wire::canary_lines("t"))),
            cache_size: 150,
            canary: dns_wire::list_canary("t"),
            label: "group 3".into(),
        }
    }

    #[test]
    fn the_user_is_dnsmasq_where_it_exists_unless_configured() {
        let openwrt = "root:x:0:0:root:/root:/bin/ash\ndnsmasq:x:453:453:dnsmasq:/var/run/dnsmasq:/bin/false\n";
        let plain = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n";
        assert_eq!(pick_user(None, openwrt).as_deref(), Some("dnsmasq"));
        assert_eq!(pick_user(None, plain), None, "dnsmasq's own default");
        assert_eq!(pick_user(Some("-"), openwrt), None);
        assert_eq!(
            pick_user(Some("nobody"), openwrt).as_deref(),
            Some("nobody")
        );
        let conf = render_conf(
            &spec("g3", 5403, "127.0.0.1", ""),
            Path::new("/var/run/netpilot/dns"),
            Some("dnsmasq"),
        )
        .unwrap();
        assert!(conf.ends_with("\nuser=dnsmasq\n"), "{conf}");
    }

    #[test]
    fn an_interface_is_followed_with_bind_dynamic() {
        let s = InstanceSpec {
            listen: Vec::new(),
            interfaces: vec!["br-lan".into(), "br-guest".into()],
            ..spec("g3", 5403, "127.0.0.1", "")
        };
        let conf = render_conf(&s, Path::new("/var/run/netpilot/dns"), None).unwrap();
        assert!(
            conf.contains("\ninterface=br-lan\ninterface=br-guest\nbind-dynamic\n"),
            "{conf}"
        );
        assert!(!conf.contains("bind-interfaces"), "{conf}");
        for bad in [
            "br lan",
            "br-lan\nport=53",
            "*",
            "a-name-longer-than-15",
            "",
        ] {
            let s = InstanceSpec {
                interfaces: vec!["br-lan".into(), bad.into()],
                ..s.clone()
            };
            assert!(matches!(validate(&s), Err(DnsError::Invalid(_))), "{bad:?}");
        }
        let neither = InstanceSpec {
            interfaces: Vec::new(),
            ..s
        };
        assert!(matches!(validate(&neither), Err(DnsError::Invalid(_))));
    }

    #[test]
    fn the_conf_is_plain_dnsmasq_options() {
        let mut s = spec("g3", 5356, "10.77.0.2#53", "");
        s.listen.push("::1".parse().unwrap());
        let conf = render_conf(&s, Path::new("/var/run/netpilot/dns"), Some("dnsmasq")).unwrap();
        assert_eq!(
            conf,
            "# NetPilot DNS filter g3: written by the agent, replaced on every change.\n\
             port=5356\n\
             listen-address=127.0.0.1\n\
             listen-address=::1\n\
             bind-interfaces\n\
             no-resolv\n\
             no-hosts\n\
             no-poll\n\
             cache-size=150\n\
             server=10.77.0.2#53\n\
             servers-file=/var/run/netpilot/dns/g3.servers\n\
             pid-file=/var/run/netpilot/dns/g3.pid\n\
             user=dnsmasq\n"
        );
    }

    #[test]
    fn values_that_would_break_a_config_line_are_refused() {
        let dir = Path::new("/run/x");
        let ok = spec("g3", 5353, "::1#5353", "");
        assert!(render_conf(&ok, dir, None).is_ok());
        let refused = |s: &InstanceSpec, dir: &Path, user: Option<&str>| {
            matches!(render_conf(s, dir, user), Err(DnsError::Invalid(_)))
        };
        for id in ["", "G3", "g-3", "../g3", "g3\nport=53", "abcdefghijklmnopq"] {
            assert!(
                refused(
                    &InstanceSpec {
                        id: id.into(),
                        ..ok.clone()
                    },
                    dir,
                    None
                ),
                "{id:?}"
            );
        }
        for u in [
            "",
            "8.8.8.8\nserver=1.1.1.1",
            "1.1.1.1 ",
            "dns.google",
            "1.1.1.1#53\"",
            "/x/1.1.1.1",
        ] {
            let s = InstanceSpec {
                upstreams: vec![u.into()],
                ..ok.clone()
            };
            assert!(refused(&s, dir, None), "{u:?}");
        }
        assert!(refused(
            &InstanceSpec {
                upstreams: vec![],
                ..ok.clone()
            },
            dir,
            None
        ));
        assert!(refused(
            &InstanceSpec {
                listen: vec![],
                ..ok.clone()
            },
            dir,
            None
        ));
        assert!(refused(
            &InstanceSpec {
                port: 0,
                ..ok.clone()
            },
            dir,
            None
        ));
        assert!(refused(&ok, Path::new("/run/my dir"), None));
        assert!(refused(&ok, Path::new("run/x"), None));
        assert!(refused(&ok, dir, Some("root\nport=53")));
        assert!(!refused(&ok, dir, Some("nobody")));
    }

    #[test]
    fn vm_rss_comes_from_proc_status() {
        assert_eq!(
            vm_rss_kib("Name:\tdnsmasq\nVmRSS:\t    2260 kB\n"),
            Some(2260)
        );
        assert_eq!(vm_rss_kib("Name:\tkthreadd\n"), None);
    }

    /// A DNS response code, from a hand-built query.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Answer {
        /// NOERROR with an A record of 10.1.1.1 (the upstream's answer).
        Resolved,
        NxDomain,
    }

    /// What the contract needs from the world besides the resolver.
    trait Rig: Sync {
        fn resolver(&self) -> &dyn Resolver;
        /// The instance dies behind the resolver's back (kill -9).
        fn crash(&self, id: &str);
        /// Points the pid file at a live process that is not dnsmasq; returns a
        /// check that it was not signalled.
        fn stale_pid(&self, id: &str) -> Box<dyn FnOnce() + Send>;
        /// Makes the next start of `spec` fail; the guard keeps the cause alive.
        /// Also returns a fragment of the expected stderr.
        fn break_next_start(&self, spec: &InstanceSpec) -> (Box<dyn Any>, &'static str);
        /// Waits (bounded) until `name` on `port` gets `want` (the fake has no DNS).
        fn expect<'a>(&'a self, port: u16, name: &'a str, want: Answer) -> Fut<'a, ()>;
    }

    /// The contract both adapters keep.
    async fn contract(rig: &dyn Rig) {
        let r = rig.resolver();
        assert!(r.observe().await.unwrap().is_empty());
        let s1 = spec("g3", 5301, "127.0.0.1#5399", "server=/ads.example.com/\n");

        // A bad upstream is refused before anything is written.
        let bad = InstanceSpec {
            upstreams: vec!["127.0.0.1\nserver=/x/".into()],
            ..s1.clone()
        };
        assert!(matches!(r.ensure(&bad).await, Err(DnsError::Invalid(_))));
        assert!(r.observe().await.unwrap().is_empty());

        // Start: the listed name and its subdomains are NXDOMAIN, others resolve.
        assert_eq!(r.ensure(&s1).await.unwrap(), Ensured::Started);
        rig.expect(5301, "ads.example.com", Answer::NxDomain).await;
        rig.expect(5301, "x.ads.example.com", Answer::NxDomain)
            .await;
        rig.expect(5301, "www.example.com", Answer::Resolved).await;
        let o = r.observe().await.unwrap();
        assert_eq!(o.len(), 1);
        let first = o[0].clone();
        assert!(first.running && first.pid.is_some(), "{first:?}");
        assert_eq!(first.id, "g3");
        assert!(first.conf.as_deref().unwrap().contains("\nport=5301\n"));
        assert_eq!(first.servers.as_deref(), Some(s1.servers.as_str()));
        assert!(r.memory_kib("g3").unwrap() > 0);

        // The same spec again: nothing happens, same process.
        assert_eq!(r.ensure(&s1).await.unwrap(), Ensured::Unchanged);
        assert_eq!(r.observe().await.unwrap()[0].pid, first.pid);

        // A new list: SIGHUP, same process, the new list takes effect.
        let s2 = InstanceSpec {
            servers: Arc::new(format!(
                "server=/ads.example.com/\nserver=/ok.ads.example.com/#\nserver=/www.example.com/\n{}",
                dns_wire::canary_lines("t")
            )),
            ..s1.clone()
        };
        assert_eq!(r.ensure(&s2).await.unwrap(), Ensured::Reloaded);
        rig.expect(5301, "www.example.com", Answer::NxDomain).await;
        rig.expect(5301, "ok.ads.example.com", Answer::Resolved)
            .await;
        rig.expect(5301, "x.ads.example.com", Answer::NxDomain)
            .await;
        let o = r.observe().await.unwrap();
        assert_eq!(o[0].pid, first.pid);
        assert_eq!(o[0].servers.as_deref(), Some(s2.servers.as_str()));

        // A conf change (the port): restarted on the new port.
        let s3 = InstanceSpec {
            port: 5302,
            ..s2.clone()
        };
        assert_eq!(r.ensure(&s3).await.unwrap(), Ensured::Started);
        rig.expect(5302, "www.example.com", Answer::NxDomain).await;
        rig.expect(5302, "mail.example.com", Answer::Resolved).await;
        let o = r.observe().await.unwrap();
        assert!(o[0].running && o[0].pid != first.pid, "{o:?}");
        assert!(o[0].conf.as_deref().unwrap().contains("\nport=5302\n"));

        // Killed behind our back: observed as not running, ensure starts it again.
        rig.crash("g3");
        let o = r.observe().await.unwrap();
        assert!(!o[0].running, "{o:?}");
        assert_eq!(r.memory_kib("g3"), None);
        assert_eq!(r.ensure(&s3).await.unwrap(), Ensured::Started);
        rig.expect(5302, "mail.example.com", Answer::Resolved).await;

        // A pid file naming another live process: not running, and not signalled.
        rig.crash("g3");
        let untouched = rig.stale_pid("g3");
        let o = r.observe().await.unwrap();
        assert!(!o[0].running && o[0].pid.is_some(), "{o:?}");
        assert_eq!(r.ensure(&s3).await.unwrap(), Ensured::Started);
        rig.expect(5302, "mail.example.com", Answer::Resolved).await;
        untouched();

        // A start that fails (port taken): a typed error with dnsmasq's stderr, the
        // files stay, not running; once the port is free the next ensure starts it.
        let s4 = InstanceSpec {
            port: 5303,
            ..s3.clone()
        };
        let (guard, stderr) = rig.break_next_start(&s4);
        let e = r.ensure(&s4).await.unwrap_err();
        assert!(e.stderr().is_some_and(|s| s.contains(stderr)), "{e:?}");
        let o = r.observe().await.unwrap();
        assert!(!o[0].running, "{o:?}");
        assert!(o[0].conf.as_deref().unwrap().contains("\nport=5303\n"));
        drop(guard);
        assert_eq!(r.ensure(&s4).await.unwrap(), Ensured::Started);
        rig.expect(5303, "mail.example.com", Answer::Resolved).await;

        // Stop removes the process and the files; an unknown id is fine.
        r.stop("g3").await.unwrap();
        assert!(r.observe().await.unwrap().is_empty());
        assert_eq!(r.memory_kib("g3"), None);
        r.stop("g3").await.unwrap();
        r.stop("g9").await.unwrap();
    }

    struct FakeRig(FakeResolver);

    impl Rig for FakeRig {
        fn resolver(&self) -> &dyn Resolver {
            &self.0
        }
        fn crash(&self, id: &str) {
            self.0.crash(id)
        }
        fn stale_pid(&self, id: &str) -> Box<dyn FnOnce() + Send> {
            self.0.point_pid_at(id, 1);
            Box::new(|| {})
        }
        fn break_next_start(&self, spec: &InstanceSpec) -> (Box<dyn Any>, &'static str) {
            self.0.fail_next(&spec.id);
            (Box::new(()), "injected")
        }
        fn expect<'a>(&'a self, _: u16, _: &'a str, _: Answer) -> Fut<'a, ()> {
            Box::pin(async {})
        }
    }

    #[tokio::test]
    async fn the_fake_keeps_the_contract_and_counts() {
        let rig = FakeRig(FakeResolver::default());
        contract(&rig).await;
        // Started, restarted for the port, twice after a crash, twice more after the
        // failed start; one reload.
        assert_eq!(rig.0.starts("g3"), 5);
        assert_eq!(rig.0.reloads("g3"), 1);
    }

    /// Runs `f` (given the dnsmasq program) inside a throwaway network namespace
    /// with `lo` up, so every process it spawns is in the namespace too. Needs
    /// root and dnsmasq (the test kit's check fails the test naming what is
    /// missing).
    fn in_netns<F, Fu>(f: F)
    where
        F: FnOnce(String) -> Fu + Send,
        Fu: std::future::Future<Output = ()>,
    {
        netpilot_testkit::require(&["dnsmasq"]);
        let program = netpilot_testkit::netns::find("dnsmasq")
            .expect("checked by require")
            .to_string_lossy()
            .into_owned();
        netpilot_testkit::Netns::new("dns")
            .unwrap()
            .block_on(|| f(program));
    }

    /// A fresh directory (the upstream's pid file; the resolver's state in `dns/`);
    /// on drop, kills every dnsmasq whose pid file is in either (a failed test must
    /// not leave daemons keeping its namespace alive).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!("netpilot-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
            Scratch(d)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let dirs = [self.0.clone(), self.0.join("dns")];
            for e in dirs.iter().flat_map(std::fs::read_dir).flatten().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "pid") {
                    let pid = std::fs::read_to_string(&p).unwrap_or_default();
                    let Ok(pid) = pid.trim().parse::<i32>() else {
                        continue;
                    };
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmd).contains(self.0.to_str().unwrap()) {
                        let _ = process::signal(pid, Signal::Kill);
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The upstream: answers 10.1.1.1 for every name under example.com.
    async fn start_upstream(program: &str, dir: &Path, port: u16) {
        let pid = format!("--pid-file={}/upstream.pid", dir.display());
        let port = format!("--port={port}");
        process::run(
            &[
                program,
                "--conf-file=/dev/null",
                &port,
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--address=/example.com/10.1.1.1",
                &pid,
            ],
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }

    /// One A query over UDP; `None` on timeout or a malformed reply.
    fn query(port: u16, name: &str) -> Option<Answer> {
        let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .ok()?;
        let id = (std::process::id() as u16) ^ (name.len() as u16);
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
        sock.send_to(&q, ("127.0.0.1", port)).ok()?;
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).ok()?;
        let r = &buf[..n];
        if n < 12 || r[..2] != id.to_be_bytes() {
            return None;
        }
        let answers = u16::from_be_bytes([r[6], r[7]]);
        match r[3] & 0x0f {
            3 => Some(Answer::NxDomain),
            // A single A record is the last four bytes of the reply.
            0 if answers == 1 && r.ends_with(&[10, 1, 1, 1]) => Some(Answer::Resolved),
            _ => None,
        }
    }

    /// Polls until `name` gets `want`, for at most five seconds.
    async fn wait_for(port: u16, name: &str, want: Answer) -> Duration {
        let started = Instant::now();
        loop {
            let got = query(port, name);
            if got == Some(want) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{name} on port {port}: {got:?}, wanted {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    struct RealRig {
        dns: RealDnsmasq,
    }

    impl Rig for RealRig {
        fn resolver(&self) -> &dyn Resolver {
            &self.dns
        }
        fn crash(&self, id: &str) {
            if let Some(pid) = self.dns.running_pid(id) {
                process::signal(pid, Signal::Kill).unwrap();
                // Gone once init has reaped it (a zombie's cmdline is empty).
                let deadline = Instant::now() + Duration::from_secs(5);
                while self.dns.is_ours(pid, id) {
                    assert!(Instant::now() < deadline, "{pid} survived SIGKILL");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        fn stale_pid(&self, id: &str) -> Box<dyn FnOnce() + Send> {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .unwrap();
            std::fs::write(self.dns.pid_path(id), format!("{}\n", child.id())).unwrap();
            let mut child = child;
            Box::new(move || {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "the process behind a stale pid file was signalled"
                );
                child.kill().unwrap();
                child.wait().unwrap();
            })
        }
        fn break_next_start(&self, spec: &InstanceSpec) -> (Box<dyn Any>, &'static str) {
            let sock = UdpSocket::bind(("127.0.0.1", spec.port)).unwrap();
            (Box::new(sock), "Address already in use")
        }
        fn expect<'a>(&'a self, port: u16, name: &'a str, want: Answer) -> Fut<'a, ()> {
            Box::pin(async move {
                wait_for(port, name, want).await;
            })
        }
    }

    #[test]
    fn netns_real_dnsmasq_keeps_the_contract() {
        in_netns(|program| async move {
            let scratch = Scratch::new("dns-contract");
            start_upstream(&program, &scratch.0, 5399).await;
            let rig = RealRig {
                dns: RealDnsmasq {
                    program,
                    dir: scratch.0.join("dns"),
                    user: None,
                    timeout: Duration::from_secs(10),
                },
            };
            contract(&rig).await;
            // The files were 0644 in a 0755 directory (dnsmasq re-read the list as
            // nobody above); stop removed them but left the directory.
            let mode = std::fs::metadata(&rig.dns.dir)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755);
            assert_eq!(std::fs::read_dir(&rig.dns.dir).unwrap().count(), 0);
        });
    }

    /// The user the resolvers drop to, as on the router: `dnsmasq` where it exists.
    fn router_user() -> Option<String> {
        pick_user(
            None,
            &std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
        )
        .or(Some("nobody".into()))
    }

    /// A state directory created 0700 by root (a umask of 077, another tool): the
    /// agent makes it 0755 and filtering works, also after a reload. A directory
    /// it does not own the path to (its parent 0700) is not fixed, and the canary
    /// catches that: the start fails naming the resolver and what it answered,
    /// never a silent success.
    #[test]
    fn netns_modes_are_fixed_or_the_canary_fails_the_start() {
        in_netns(|program| async move {
            let scratch = Scratch::new("dns-modes");
            start_upstream(&program, &scratch.0, 5399).await;
            let dir = scratch.0.join("dns");
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            let dns = RealDnsmasq {
                program: program.clone(),
                dir: dir.clone(),
                user: router_user(),
                timeout: Duration::from_secs(10),
            };
            let s = spec("g3", 5301, "127.0.0.1#5399", "server=/ads.example.com/\n");
            assert_eq!(dns.ensure(&s).await.unwrap(), Ensured::Started);
            assert_eq!(query(5301, "ads.example.com"), Some(Answer::NxDomain));
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755);
            // Reset behind the agent's back; the next change fixes it before the
            // reload, and the reloaded list is proven by its own canary.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            let s2 = InstanceSpec {
                servers: Arc::new(format!(
                    "server=/www.example.com/\n{}",
                    dns_wire::canary_lines("t2")
                )),
                canary: dns_wire::list_canary("t2"),
                ..s.clone()
            };
            assert_eq!(dns.ensure(&s2).await.unwrap(), Ensured::Reloaded);
            assert_eq!(query(5301, "www.example.com"), Some(Answer::NxDomain));
            dns.stop("g3").await.unwrap();

            // A parent the resolver's user cannot enter.
            let closed = scratch.0.join("closed");
            std::fs::create_dir(&closed).unwrap();
            std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
            let dns = RealDnsmasq {
                program,
                dir: closed.join("dns"),
                user: router_user(),
                timeout: Duration::from_secs(10),
            };
            let t = Instant::now();
            let e = dns.ensure(&s).await.unwrap_err();
            let DnsError::Canary(u) = &e else {
                panic!("not a canary failure: {e}");
            };
            assert_eq!((u.id.as_str(), u.port), ("g3", 5301), "{e}");
            assert!(e.to_string().contains("group 3"), "{e}");
            assert!(!u.answered.starts_with("NXDOMAIN with 0"), "{e}");
            println!("caught in {:?}: {e}", t.elapsed());
            // Unfiltered it is indeed: the listed name is forwarded.
            assert_ne!(query(5301, "ads.example.com"), Some(Answer::NxDomain));
            // And a later observation says so too (the drift check).
            let o = dns.observe().await.unwrap();
            assert!(o[0].running && o[0].canary.is_some(), "{o:?}");
            dns.stop("g3").await.unwrap();
            // The Scratch's drop looks for pid files in `dns/` only.
        });
    }

    /// `n` generated `server=/<12 letters>.com/` lines, then `blocked.example.com`
    /// last: a name answered NXDOMAIN only once the whole file is read.
    fn big_list(n: usize) -> String {
        let mut rng = netpilot_testkit::XorShift::new(0x9E37_79B9_7F4A_7C15);
        let mut list = String::new();
        for _ in 0..n {
            list.push_str("server=/");
            for _ in 0..12 {
                list.push((b'a' + rng.below(26) as u8) as char);
            }
            list.push_str(".com/\n");
        }
        list.push_str("server=/blocked.example.com/\n");
        list
    }

    /// dnsmasq reads its servers file after the start has returned; a query sent in
    /// that window must wait for the whole list, not be forwarded unfiltered. (The
    /// ignored figures test below does the same at 100,000 lines.)
    #[test]
    fn netns_the_first_query_after_a_start_is_answered_from_the_whole_list() {
        in_netns(|program| async move {
            let scratch = Scratch::new("dns-first");
            start_upstream(&program, &scratch.0, 5399).await;
            let dns = RealDnsmasq {
                program,
                dir: scratch.0.join("dns"),
                user: None,
                timeout: Duration::from_secs(10),
            };
            let s = spec("g1", 5301, "127.0.0.1#5399", &big_list(30_000));
            let t = Instant::now();
            assert_eq!(dns.ensure(&s).await.unwrap(), Ensured::Started);
            // Only timeouts are retried: an upstream answer would be a failure.
            let first = loop {
                match query(5301, "blocked.example.com") {
                    None if t.elapsed() < Duration::from_secs(10) => continue,
                    got => break got,
                }
            };
            assert_eq!(first, Some(Answer::NxDomain));
            dns.stop("g1").await.unwrap();
        });
    }

    /// Figures for a 100,000-line block list (printed; run with
    /// `cargo test -p netpilot-agent dnsmasq_100k -- --ignored --nocapture`, as root).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn netns_dnsmasq_100k_figures() {
        in_netns(|program| async move {
            let scratch = Scratch::new("dns-100k");
            start_upstream(&program, &scratch.0, 5399).await;
            let dns = RealDnsmasq {
                program,
                dir: scratch.0.join("dns"),
                user: None,
                timeout: Duration::from_secs(30),
            };
            let list = big_list(100_000);
            let mut s = spec("g1", 5301, "127.0.0.1#5399", &list);
            println!("servers file: {} bytes", list.len());
            for round in 0..3 {
                let t = Instant::now();
                assert_eq!(dns.ensure(&s).await.unwrap(), Ensured::Started);
                let started = t.elapsed();
                // Queries wait in the socket until the list is read; none may be
                // answered from upstream meanwhile. Only timeouts are retried.
                let first = loop {
                    match query(5301, "blocked.example.com") {
                        None if t.elapsed() < Duration::from_secs(10) => continue,
                        got => break got,
                    }
                };
                assert_eq!(first, Some(Answer::NxDomain));
                let answering = t.elapsed();
                println!(
                    "start {round}: ensure (start + its canary refused) returned after {started:?}, first answer (NXDOMAIN for the last name listed) after {answering:?}, RSS {} KiB",
                    dns.memory_kib("g1").unwrap()
                );
                let name = format!("new{round}.example.com");
                wait_for(5301, &name, Answer::Resolved).await;
                let mut more = (*s.servers).clone();
                more.push_str(&format!("server=/{name}/\n"));
                // A new version of the list has its own canary, as compiled.
                let key = format!("r{round}");
                more.push_str(&dns_wire::canary_lines(&key));
                s.canary = dns_wire::list_canary(&key);
                s.servers = Arc::new(more);
                let t = Instant::now();
                assert_eq!(dns.ensure(&s).await.unwrap(), Ensured::Reloaded);
                let sent = t.elapsed();
                let blocked = sent + wait_for(5301, &name, Answer::NxDomain).await;
                println!(
                    "reload {round}: ensure (write + SIGHUP + its canary refused) {sent:?}, new name NXDOMAIN after {blocked:?}, RSS {} KiB",
                    dns.memory_kib("g1").unwrap()
                );
                dns.stop("g1").await.unwrap();
            }
        });
    }
}
