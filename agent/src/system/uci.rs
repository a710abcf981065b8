//! The UCI seam: read a package (`uci export`), change it atomically (`uci batch`
//! then `uci commit`, with `uci revert` when anything fails so the committed
//! configuration stays as it was), and restore it from a saved export
//! (`uci import`). [`RealUci`] drives the `uci` CLI through the process module;
//! [`FakeUci`] keeps packages in memory with uci's staged/committed semantics.
//!
//! Values travel only on stdin, never in argv, so a failing command's error (which
//! carries its argv) never holds a value such as a Wi-Fi key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Fut;
use crate::runtime::process::{self, ProcessError};
use crate::uci_format::{self as text, Section};

/// One line of a `uci batch`. Paths are `package.section[.option]` with named
/// sections only; values are checked by [`batch_script`] before any reach uci.
#[derive(Clone, PartialEq, Eq)]
pub enum UciCmd {
    Set { path: String, value: String },
    Delete { path: String },
    AddList { path: String, value: String },
}

/// The path only: values may be secrets (a Wi-Fi key), so they never print.
impl std::fmt::Debug for UciCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UciCmd::Set { path, .. } => write!(f, "set {path}=<value>"),
            UciCmd::Delete { path } => write!(f, "delete {path}"),
            UciCmd::AddList { path, .. } => write!(f, "add_list {path}=<value>"),
        }
    }
}

impl UciCmd {
    pub fn set(path: impl Into<String>, value: impl Into<String>) -> UciCmd {
        UciCmd::Set {
            path: path.into(),
            value: value.into(),
        }
    }

    pub fn path(&self) -> &str {
        match self {
            UciCmd::Set { path, .. } | UciCmd::Delete { path } | UciCmd::AddList { path, .. } => {
                path
            }
        }
    }
}

/// The step of a change that failed, for the error and the API answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Export,
    Revert,
    Batch,
    Commit,
    Import,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Export => "uci export",
            Step::Revert => "uci revert",
            Step::Batch => "uci batch",
            Step::Commit => "uci commit",
            Step::Import => "uci import",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UciError {
    /// A path or value the adapter will not hand to uci (a newline would start a
    /// new batch command; uci would even store it as a multi-line value).
    #[error("refusing UCI input for {path}: {reason}")]
    Refused { path: String, reason: &'static str },
    /// uci ran but refused the change; nothing was committed.
    #[error("{} refused the change: {message}", step.as_str())]
    Rejected { step: Step, message: String },
    /// The `uci` program failed to run, failed or timed out.
    #[error("{} failed: {source}", step.as_str())]
    Process {
        step: Step,
        #[source]
        source: ProcessError,
    },
    /// No such package.
    #[error("UCI package {0} does not exist")]
    NoPackage(String),
}

impl UciError {
    pub fn step(&self) -> Option<Step> {
        match self {
            UciError::Rejected { step, .. } | UciError::Process { step, .. } => Some(*step),
            UciError::Refused { .. } => Some(Step::Batch),
            UciError::NoPackage(_) => Some(Step::Export),
        }
    }
}

pub trait Uci: Send + Sync {
    /// `uci export <package>`: the committed configuration plus any staged changes.
    fn export<'a>(&'a self, package: &'a str) -> Fut<'a, Result<String, UciError>>;
    /// `uci revert <package>`: drops staged, uncommitted changes.
    fn revert<'a>(&'a self, package: &'a str) -> Fut<'a, Result<(), UciError>>;
    /// Stages `cmds` with one `uci batch` and commits the package. Either all of
    /// them are committed or none: on any failure the staged changes are reverted.
    fn apply<'a>(&'a self, package: &'a str, cmds: &'a [UciCmd]) -> Fut<'a, Result<(), UciError>>;
    /// Replaces the package with an earlier [`Uci::export`] (`uci import`, which
    /// writes the file directly) after dropping staged changes.
    fn restore<'a>(&'a self, package: &'a str, export: &'a str) -> Fut<'a, Result<(), UciError>>;
}

/// A name uci accepts for packages, sections and options: `[A-Za-z0-9_]+`.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An anonymous section by type and index, `@type[N]`, as uci's extended syntax
/// names it (fw4's `defaults` section has no name). Only plain type names: the
/// agent addresses `@defaults[0]`, never an index among sections that may move.
fn anonymous_ref(s: &str) -> Option<(&str, usize)> {
    let (kind, rest) = s.strip_prefix('@')?.split_once('[')?;
    let n = rest.strip_suffix(']')?;
    (valid_name(kind) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| Some((kind, n.parse().ok()?)))
        .flatten()
}

fn check_path(cmd: &UciCmd, package: &str) -> Result<(), UciError> {
    let path = cmd.path();
    let refused = |reason| UciError::Refused {
        path: path.to_owned(),
        reason,
    };
    let parts: Vec<&str> = path.split('.').collect();
    let valid = |(i, p): (usize, &&str)| valid_name(p) || (i == 1 && anonymous_ref(p).is_some());
    if !(2..=3).contains(&parts.len()) || !parts.iter().enumerate().all(valid) {
        return Err(refused(
            "not a package.section[.option] path of plain names",
        ));
    }
    if parts[0] != package {
        return Err(refused("path outside the package being changed"));
    }
    if parts.len() == 2 && !matches!(cmd, UciCmd::Delete { .. }) {
        return Err(refused("only delete takes a whole section"));
    }
    Ok(())
}

fn check_value(path: &str, value: &str) -> Result<(), UciError> {
    let refused = |reason| UciError::Refused {
        path: path.to_owned(),
        reason,
    };
    if value.contains(['\n', '\r']) {
        return Err(refused("the value contains a line break"));
    }
    if value.contains('\0') {
        return Err(refused("the value contains a NUL byte"));
    }
    Ok(())
}

/// The stdin of `uci batch` for `cmds`, one command per line, values in single
/// quotes. Refuses (before anything runs) a path outside `package` or a value
/// with a line break or NUL.
pub fn batch_script(package: &str, cmds: &[UciCmd]) -> Result<String, UciError> {
    let mut out = String::new();
    for cmd in cmds {
        check_path(cmd, package)?;
        match cmd {
            UciCmd::Set { path, value } => {
                check_value(path, value)?;
                out.push_str(&format!("set {path}={}\n", text::quote(value)));
            }
            UciCmd::AddList { path, value } => {
                check_value(path, value)?;
                out.push_str(&format!("add_list {path}={}\n", text::quote(value)));
            }
            UciCmd::Delete { path } => out.push_str(&format!("delete {path}\n")),
        }
    }
    Ok(out)
}

/// The `uci` CLI. `confdir`/`savedir` are `-c`/`-t`; `None` keeps uci's defaults
/// (`/etc/config`, `/tmp/.uci`), which is what the router uses.
pub struct RealUci {
    pub program: String,
    pub confdir: Option<PathBuf>,
    pub savedir: Option<PathBuf>,
    pub timeout: Duration,
    /// Extra environment, e.g. the library path of a uci built outside the system.
    pub env: Vec<(String, String)>,
}

impl Default for RealUci {
    fn default() -> Self {
        RealUci {
            program: "uci".into(),
            confdir: None,
            savedir: None,
            timeout: Duration::from_secs(15),
            env: Vec::new(),
        }
    }
}

impl RealUci {
    /// Another adapter over the same program and directories.
    pub fn clone_config(&self) -> RealUci {
        RealUci {
            program: self.program.clone(),
            confdir: self.confdir.clone(),
            savedir: self.savedir.clone(),
            timeout: self.timeout,
            env: self.env.clone(),
        }
    }

    async fn uci(
        &self,
        step: Step,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<process::Output, UciError> {
        let confdir = self.confdir.as_ref().map(|p| p.to_string_lossy());
        let savedir = self.savedir.as_ref().map(|p| p.to_string_lossy());
        let mut argv: Vec<&str> = vec![&self.program];
        if let Some(c) = &confdir {
            argv.extend(["-c", c]);
        }
        if let Some(t) = &savedir {
            argv.extend(["-t", t]);
        }
        argv.extend_from_slice(args);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        process::run_capture(&argv, stdin, self.timeout, &env)
            .await
            .map_err(|source| UciError::Process { step, source })
    }

    /// Reverts after a failure; the first error is the one reported.
    async fn undo(&self, package: &str, err: UciError) -> UciError {
        if let Err(e) = self.revert(package).await {
            tracing::error!(package, error = %e, "cannot revert staged UCI changes");
        }
        err
    }
}

/// uci prints `uci: Entry not found` (prefixed by its argv[0]); keep the message.
fn uci_message(stderr: &str) -> String {
    stderr
        .lines()
        .map(|l| l.rsplit_once(": ").map_or(l, |(_, m)| m).trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Uci for RealUci {
    fn export<'a>(&'a self, package: &'a str) -> Fut<'a, Result<String, UciError>> {
        Box::pin(async move {
            match self.uci(Step::Export, &["export", package], None).await {
                Ok(out) => Ok(out.stdout),
                // `uci export` of a missing package exits 1: "Entry not found".
                Err(UciError::Process {
                    source: ProcessError::Failed { ref stderr, .. },
                    ..
                }) if stderr.contains("Entry not found") => {
                    Err(UciError::NoPackage(package.to_owned()))
                }
                Err(e) => Err(e),
            }
        })
    }

    fn revert<'a>(&'a self, package: &'a str) -> Fut<'a, Result<(), UciError>> {
        Box::pin(async move {
            self.uci(Step::Revert, &["revert", package], None)
                .await
                .map(|_| ())
        })
    }

    fn apply<'a>(&'a self, package: &'a str, cmds: &'a [UciCmd]) -> Fut<'a, Result<(), UciError>> {
        Box::pin(async move {
            let script = batch_script(package, cmds)?;
            // `uci batch` exits 0 even when lines fail and says so only on stderr;
            // any stderr means a line was refused and the rest may be staged.
            match self
                .uci(Step::Batch, &["batch"], Some(script.as_bytes()))
                .await
            {
                Ok(out) if out.stderr.trim().is_empty() => {}
                Ok(out) => {
                    let err = UciError::Rejected {
                        step: Step::Batch,
                        message: uci_message(&out.stderr),
                    };
                    return Err(self.undo(package, err).await);
                }
                Err(e) => return Err(self.undo(package, e).await),
            }
            match self.uci(Step::Commit, &["commit", package], None).await {
                Ok(out) if out.stderr.trim().is_empty() => Ok(()),
                Ok(out) => {
                    let err = UciError::Rejected {
                        step: Step::Commit,
                        message: uci_message(&out.stderr),
                    };
                    Err(self.undo(package, err).await)
                }
                Err(e) => Err(self.undo(package, e).await),
            }
        })
    }

    fn restore<'a>(&'a self, package: &'a str, export: &'a str) -> Fut<'a, Result<(), UciError>> {
        Box::pin(async move {
            self.revert(package).await?;
            let out = self
                .uci(Step::Import, &["import", package], Some(export.as_bytes()))
                .await?;
            if !out.stderr.trim().is_empty() {
                return Err(UciError::Rejected {
                    step: Step::Import,
                    message: uci_message(&out.stderr),
                });
            }
            Ok(())
        })
    }
}

#[derive(Default)]
struct FakeState {
    committed: BTreeMap<String, Vec<Section>>,
    /// A package's working copy when it has staged changes (uci's save dir).
    staged: BTreeMap<String, Vec<Section>>,
    /// Makes the n-th command (0-based) of the next batch fail, as uci does for a
    /// line it refuses; the lines before it are staged first, like uci.
    fail_batch_at: Option<usize>,
    fail_commit: bool,
    fail_import: bool,
    commits: usize,
}

/// In-memory UCI with the CLI's semantics, checked by the same contract tests as
/// [`RealUci`]:
/// - `set` of an option in a missing section, `delete` of a missing entry and
///   `add_list` in a missing section fail ("Invalid argument" / "Entry not found");
///   `set` of a value equal to the current one changes nothing.
/// - batch lines before a failing one are staged (uci continues and exits 0); the
///   adapter then reverts, so nothing is committed.
/// - `export` shows committed plus staged changes; `restore` replaces the package.
#[derive(Clone, Default)]
pub struct FakeUci {
    inner: Arc<Mutex<FakeState>>,
}

impl FakeUci {
    /// A fake holding `package` parsed from configuration text.
    pub fn with_package(package: &str, config: &str) -> FakeUci {
        let fake = FakeUci::default();
        let sections = text::parse(config).expect("valid seed configuration");
        fake.lock().committed.insert(package.to_owned(), sections);
        fake
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.inner.lock().expect("fake uci lock")
    }

    /// The committed sections of a package (what `/etc/config/<package>` holds).
    pub fn committed(&self, package: &str) -> Vec<Section> {
        self.lock()
            .committed
            .get(package)
            .cloned()
            .unwrap_or_default()
    }

    pub fn has_staged(&self, package: &str) -> bool {
        self.lock().staged.contains_key(package)
    }

    /// Stages commands without committing, as an unfinished LuCI edit leaves them.
    pub fn stage(&self, package: &str, cmds: &[UciCmd]) -> Result<(), UciError> {
        let mut s = self.lock();
        let mut work = current(&s, package)?;
        for cmd in cmds {
            run_cmd(&mut work, cmd)?;
        }
        s.staged.insert(package.to_owned(), work);
        Ok(())
    }

    pub fn fail_batch_at(&self, line: Option<usize>) {
        self.lock().fail_batch_at = line;
    }

    pub fn fail_commit(&self, fail: bool) {
        self.lock().fail_commit = fail;
    }

    pub fn fail_import(&self, fail: bool) {
        self.lock().fail_import = fail;
    }

    /// Successful commits and imports so far.
    pub fn commits(&self) -> usize {
        self.lock().commits
    }
}

fn current(s: &FakeState, package: &str) -> Result<Vec<Section>, UciError> {
    s.staged
        .get(package)
        .or_else(|| s.committed.get(package))
        .cloned()
        .ok_or_else(|| UciError::NoPackage(package.to_owned()))
}

fn rejected(message: &str) -> UciError {
    UciError::Rejected {
        step: Step::Batch,
        message: message.to_owned(),
    }
}

fn run_cmd(sections: &mut Vec<Section>, cmd: &UciCmd) -> Result<(), UciError> {
    let parts: Vec<&str> = cmd.path().split('.').collect();
    let (section, option) = (parts[1], parts.get(2).copied());
    let idx = match anonymous_ref(section) {
        Some((kind, n)) => sections
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == kind)
            .nth(n)
            .map(|(i, _)| i),
        None => sections
            .iter()
            .position(|s| s.name.as_deref() == Some(section)),
    };
    match (cmd, idx, option) {
        (UciCmd::Set { value, .. }, Some(i), Some(opt)) => {
            let s = &mut sections[i];
            if s.all(opt) == [value.as_str()] && !s.is_list(opt) {
                return Ok(());
            }
            s.values.retain(|(k, _)| k != opt);
            s.lists.retain(|k| k != opt);
            s.values.push((opt.to_owned(), value.clone()));
            Ok(())
        }
        // `uci set pkg.name=type` creates a section; not needed by the agent.
        (UciCmd::Set { .. }, _, _) => Err(rejected("Invalid argument")),
        (UciCmd::AddList { value, .. }, Some(i), Some(opt)) => {
            let s = &mut sections[i];
            if !s.is_list(opt) {
                s.lists.push(opt.to_owned());
            }
            s.values.push((opt.to_owned(), value.clone()));
            Ok(())
        }
        (UciCmd::AddList { .. }, _, _) => Err(rejected("Invalid argument")),
        (UciCmd::Delete { .. }, Some(i), None) => {
            sections.remove(i);
            Ok(())
        }
        (UciCmd::Delete { .. }, Some(i), Some(opt)) => {
            let s = &mut sections[i];
            if s.get(opt).is_none() {
                return Err(rejected("Entry not found"));
            }
            s.values.retain(|(k, _)| k != opt);
            s.lists.retain(|k| k != opt);
            Ok(())
        }
        (UciCmd::Delete { .. }, None, _) => Err(rejected("Entry not found")),
    }
}

impl Uci for FakeUci {
    fn export<'a>(&'a self, package: &'a str) -> Fut<'a, Result<String, UciError>> {
        let r = current(&self.lock(), package).map(|s| text::export(package, &s));
        Box::pin(async move { r })
    }

    fn revert<'a>(&'a self, package: &'a str) -> Fut<'a, Result<(), UciError>> {
        self.lock().staged.remove(package);
        Box::pin(async move { Ok(()) })
    }

    fn apply<'a>(&'a self, package: &'a str, cmds: &'a [UciCmd]) -> Fut<'a, Result<(), UciError>> {
        let r = (|| {
            batch_script(package, cmds)?;
            let mut s = self.lock();
            let mut work = current(&s, package)?;
            let fail_at = s.fail_batch_at.take();
            for (i, cmd) in cmds.iter().enumerate() {
                let r = if fail_at == Some(i) {
                    Err(rejected("Invalid argument"))
                } else {
                    run_cmd(&mut work, cmd)
                };
                if let Err(e) = r {
                    // Staged up to here, then the adapter's revert drops it all.
                    s.staged.remove(package);
                    return Err(e);
                }
            }
            if s.fail_commit {
                s.staged.remove(package);
                return Err(UciError::Rejected {
                    step: Step::Commit,
                    message: "I/O error".into(),
                });
            }
            s.staged.remove(package);
            s.committed.insert(package.to_owned(), work);
            s.commits += 1;
            Ok(())
        })();
        Box::pin(async move { r })
    }

    fn restore<'a>(&'a self, package: &'a str, export: &'a str) -> Fut<'a, Result<(), UciError>> {
        let r = (|| {
            let mut s = self.lock();
            s.staged.remove(package);
            if s.fail_import {
                return Err(UciError::Rejected {
                    step: Step::Import,
                    message: "I/O error".into(),
                });
            }
            let sections = text::parse(export).map_err(|e| UciError::Rejected {
                step: Step::Import,
                message: format!("Parse error ({e})"),
            })?;
            s.committed.insert(package.to_owned(), sections);
            s.commits += 1;
            Ok(())
        })();
        Box::pin(async move { r })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../fixtures/uci/etc-config-wireless");
    const EXPORT: &str = include_str!("../../fixtures/uci/uci-export-wireless.txt");

    #[test]
    fn batch_script_golden_text() {
        let cmds = [
            UciCmd::set("wireless.default_radio0.ssid", "it's \"home\" ☕"),
            UciCmd::set("wireless.radio1.disabled", "1"),
            UciCmd::Delete {
                path: "wireless.guest.macfilter".into(),
            },
            UciCmd::AddList {
                path: "wireless.guest.maclist".into(),
                value: "02:00:00:00:01:02".into(),
            },
        ];
        assert_eq!(
            batch_script("wireless", &cmds).unwrap(),
            "set wireless.default_radio0.ssid='it'\\''s \"home\" ☕'\n\
             set wireless.radio1.disabled='1'\n\
             delete wireless.guest.macfilter\n\
             add_list wireless.guest.maclist='02:00:00:00:01:02'\n"
        );
    }

    #[test]
    fn batch_script_refuses_line_breaks_bad_paths_and_hides_values() {
        for value in ["a\nset wireless.radio0.disabled='1'", "a\rb", "a\0b"] {
            let e = batch_script("wireless", &[UciCmd::set("wireless.x.key", value)]).unwrap_err();
            assert!(matches!(e, UciError::Refused { .. }), "{e}");
            assert!(!e.to_string().contains("disabled"), "{e}");
        }
        for path in [
            "wireless",
            "wireless.x.y.z",
            "wireless.x-y.ssid",
            "wireless.@wifi-iface[0].ssid",
            "wireless.@wifi_iface[x].ssid",
            "wireless.@wifi_iface[].ssid",
            "wireless.@wifi_iface[0.ssid",
            "wireless.@wifi_iface.ssid",
            "wireless.@[0].ssid",
            "wireless.x.@wifi_iface[0]",
            "network.lan.ipaddr",
            "wireless.x",
        ] {
            assert!(
                batch_script("wireless", &[UciCmd::set(path, "v")]).is_err(),
                "{path}"
            );
        }
        // uci's own `@type[N]` names an anonymous section (fw4's `defaults`).
        assert_eq!(
            batch_script(
                "firewall",
                &[UciCmd::set("firewall.@defaults[0].flow_offloading", "0")]
            )
            .unwrap(),
            "set firewall.@defaults[0].flow_offloading='0'\n"
        );
        let debug = format!("{:?}", UciCmd::set("wireless.x.key", "hunter22"));
        assert!(!debug.contains("hunter22"), "{debug}");
    }

    #[test]
    fn uci_messages_lose_the_program_path() {
        assert_eq!(
            uci_message("/usr/bin/uci: Entry not found\n/x/uci: Invalid argument\n"),
            "Entry not found; Invalid argument"
        );
    }

    /// Where cargo built libuci-sys's `uci`: `target/<profile>/build/libuci-sys-*/out`.
    /// A test that needs it fails, loudly, when it is missing.
    fn real_uci_dir() -> PathBuf {
        let exe = std::env::current_exe().expect("test executable path");
        let profile = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>/deps");
        let build = profile.join("build");
        let newest = std::fs::read_dir(&build)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", build.display()))
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("libuci-sys-"))
            .map(|e| e.path().join("out"))
            .filter(|out| out.join("bin/uci").is_file())
            .max_by_key(|out| {
                std::fs::metadata(out.join("bin/uci"))
                    .and_then(|m| m.modified())
                    .ok()
            });
        newest.unwrap_or_else(|| {
            panic!(
                "the real uci is missing: expected {}/libuci-sys-*/out/bin/uci, built by the \
                 libuci-sys dev-dependency (needs cmake and libclang-dev)",
                build.display()
            )
        })
    }

    /// A temporary config directory with the fixture as `wireless`, and the real uci
    /// over it (with the library path its shared libuci/libubox need).
    pub(crate) struct RealRig {
        pub dir: PathBuf,
        pub uci: RealUci,
    }

    impl Drop for RealRig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    pub(crate) fn real_rig() -> RealRig {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let out = real_uci_dir();
        let dir = std::env::temp_dir().join(format!(
            "np-uci-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("config")).unwrap();
        std::fs::write(dir.join("config/wireless"), FIXTURE).unwrap();
        let uci = RealUci {
            program: out.join("bin/uci").to_string_lossy().into_owned(),
            confdir: Some(dir.join("config")),
            savedir: Some(dir.join("save")),
            timeout: Duration::from_secs(10),
            env: vec![(
                "LD_LIBRARY_PATH".into(),
                out.join("lib").to_string_lossy().into_owned(),
            )],
        };
        RealRig { dir, uci }
    }

    fn ssid_of(export: &str, section: &str) -> Option<String> {
        text::parse(export)
            .unwrap()
            .into_iter()
            .find(|s| s.name.as_deref() == Some(section))
            .and_then(|s| s.get("ssid").map(str::to_owned))
    }

    /// The contract both adapters keep.
    async fn contract(uci: &dyn Uci, committed: impl Fn() -> String) {
        // export is uci's own text.
        let before = uci.export("wireless").await.unwrap();
        assert_eq!(before, EXPORT);
        assert!(matches!(
            uci.export("nosuch").await.unwrap_err(),
            UciError::NoPackage(_)
        ));

        // A batch is committed whole, quotes and UTF-8 intact.
        let ssid = "it's \"home\" ☕";
        uci.apply(
            "wireless",
            &[
                UciCmd::set("wireless.default_radio0.ssid", ssid),
                UciCmd::set("wireless.radio1.disabled", "1"),
                UciCmd::AddList {
                    path: "wireless.guest.maclist".into(),
                    value: "02:00:00:00:01:02".into(),
                },
                UciCmd::Delete {
                    path: "wireless.guest.macfilter".into(),
                },
            ],
        )
        .await
        .unwrap();
        let after = uci.export("wireless").await.unwrap();
        assert_eq!(ssid_of(&after, "default_radio0").as_deref(), Some(ssid));
        assert_eq!(after, committed(), "committed, nothing left staged");
        let guest = text::parse(&after).unwrap().remove(4);
        assert_eq!(
            guest.all("maclist"),
            ["02:00:00:00:01:01", "02:00:00:00:01:02"]
        );
        assert_eq!(guest.get("macfilter"), None);

        // Failing halfway (a line uci refuses after one it took): nothing committed,
        // nothing left staged.
        let err = uci
            .apply(
                "wireless",
                &[
                    UciCmd::set("wireless.default_radio1.ssid", "Half"),
                    UciCmd::set("wireless.nosuch.ssid", "x"),
                    UciCmd::set("wireless.default_radio0.ssid", "Never"),
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(err.step(), Some(Step::Batch), "{err}");
        assert!(err.to_string().contains("Invalid argument"), "{err}");
        assert_eq!(uci.export("wireless").await.unwrap(), after);
        assert_eq!(committed(), after);
        let err = uci
            .apply(
                "wireless",
                &[
                    UciCmd::set("wireless.default_radio1.ssid", "Half"),
                    UciCmd::Delete {
                        path: "wireless.radio0.nosuch".into(),
                    },
                ],
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Entry not found"), "{err}");
        assert_eq!(uci.export("wireless").await.unwrap(), after);

        // A newline never reaches uci.
        let err = uci
            .apply(
                "wireless",
                &[UciCmd::set(
                    "wireless.default_radio0.ssid",
                    "x\nset wireless.radio0.disabled='1'",
                )],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, UciError::Refused { .. }));
        assert_eq!(committed(), after);

        // Restore brings the snapshot back exactly.
        uci.restore("wireless", &before).await.unwrap();
        assert_eq!(uci.export("wireless").await.unwrap(), EXPORT);
        assert_eq!(committed(), EXPORT);
    }

    #[tokio::test]
    async fn fake_uci_keeps_the_contract() {
        let fake = FakeUci::with_package("wireless", FIXTURE);
        let f = fake.clone();
        contract(&fake, move || {
            text::export("wireless", &f.committed("wireless"))
        })
        .await;
    }

    #[tokio::test]
    async fn real_uci_keeps_the_contract() {
        let rig = real_rig();
        let path = rig.dir.join("config/wireless");
        // What uci would read back from the file alone, ignoring the save dir.
        let committed = move || {
            let t = std::fs::read_to_string(&path).unwrap();
            text::export("wireless", &text::parse(&t).unwrap())
        };
        contract(&rig.uci, committed).await;
    }

    #[tokio::test]
    async fn staged_leftovers_are_visible_and_reverted() {
        let rig = real_rig();
        let fake = FakeUci::with_package("wireless", FIXTURE);
        fake.stage("wireless", &[UciCmd::set("wireless.guest.ssid", "Staged")])
            .unwrap();
        rig.uci
            .uci(
                Step::Batch,
                &["batch"],
                Some(b"set wireless.guest.ssid='Staged'\n"),
            )
            .await
            .unwrap();
        for uci in [&fake as &dyn Uci, &rig.uci] {
            let staged = uci.export("wireless").await.unwrap();
            assert_eq!(ssid_of(&staged, "guest").as_deref(), Some("Staged"));
            uci.revert("wireless").await.unwrap();
            assert_eq!(uci.export("wireless").await.unwrap(), EXPORT);
        }
    }

    #[tokio::test]
    async fn fake_failures_leave_the_committed_state() {
        let fake = FakeUci::with_package("wireless", FIXTURE);
        fake.fail_batch_at(Some(1));
        let cmds = [
            UciCmd::set("wireless.default_radio0.ssid", "A"),
            UciCmd::set("wireless.default_radio1.ssid", "B"),
        ];
        assert!(fake.apply("wireless", &cmds).await.is_err());
        fake.fail_commit(true);
        let e = fake.apply("wireless", &cmds).await.unwrap_err();
        assert_eq!(e.step(), Some(Step::Commit));
        assert_eq!(fake.export("wireless").await.unwrap(), EXPORT);
        assert!(!fake.has_staged("wireless"));
        assert_eq!(fake.commits(), 0);
    }

    #[tokio::test]
    async fn real_uci_missing_is_a_typed_error() {
        let uci = RealUci {
            program: "netpilot-no-such-uci".into(),
            ..Default::default()
        };
        match uci.export("wireless").await {
            Err(UciError::Process { step, source }) => {
                assert_eq!(step, Step::Export);
                assert!(source.is_not_found());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
