//! The nlbwmon seam: its `nlbw` client (`-c json|csv|list|commit`, with `-p` naming
//! the protocol list the client reads on every command), its init script and its
//! database files. nlbwmon's daemon serves one client at a time and drops a
//! client after 100 ms, so [`RealNlbw`] serialises its calls. Failures are typed so
//! the API can tell "not installed" from "not running" from "broken". [`FakeNlbw`]
//! serves fixed texts (the fixtures) with the same error behaviour.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::Fut;
use crate::runtime::process::{self, ProcessError};

/// One `nlbw` command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query<'a> {
    /// `-c json [-g group_by] [-t period]`
    Json {
        group_by: Option<&'a str>,
        period: Option<&'a str>,
    },
    /// `-c csv [-t period]`
    Csv { period: Option<&'a str> },
    /// `-c list`: the database periods, newest first.
    List,
    /// `-c commit`: make the daemon save its database now.
    Commit,
}

impl Query<'_> {
    /// The arguments after the program name.
    pub fn args(&self) -> Vec<&str> {
        let mut a = Vec::with_capacity(6);
        let (cmd, group, period) = match *self {
            Query::Json { group_by, period } => ("json", group_by, period),
            Query::Csv { period } => ("csv", None, period),
            Query::List => ("list", None, None),
            Query::Commit => ("commit", None, None),
        };
        a.extend(["-c", cmd]);
        if let Some(g) = group {
            a.extend(["-g", g]);
        }
        if let Some(t) = period {
            a.extend(["-t", t]);
        }
        a
    }
}

/// What the init script is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Stop,
    Start,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Stop => "stop",
            Control::Start => "start",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NlbwError {
    /// The `nlbw` program is missing: nlbwmon is not installed.
    #[error("nlbwmon is not installed ({program} not found)")]
    NotInstalled { program: String },
    /// `nlbw` ran but could not talk to the daemon (socket missing or refused).
    #[error("nlbwmon is not running: {detail}")]
    NotRunning { detail: String },
    /// The daemon did not answer in time (busy, or hung).
    #[error("nlbw did not answer within {0:?}")]
    Timeout(Duration),
    /// `nlbw` could not read its protocol list (`-p`, from UCI
    /// `protocol_database`): it reads it before every command, so nothing works
    /// until the owner fixes the path. A configuration error, not bad output.
    #[error("nlbw cannot read its protocol list {path}: {detail}")]
    ProtocolList { path: String, detail: String },
    /// `nlbw` failed in another way (bad arguments).
    #[error(transparent)]
    Failed(ProcessError),
    /// The init script failed.
    #[error("nlbwmon init script: {0}")]
    Control(#[source] ProcessError),
    /// Listing or removing database files failed.
    #[error("nlbwmon database directory {dir}: {source}")]
    Files {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// nlbw's own failure line when it cannot reach the daemon (client.c prints
/// `Error while processing command: <strerror>` and exits non-zero).
const CLIENT_ERROR: &str = "Error while processing command";
/// client.c's line when `init_protocols` fails, before any command runs:
/// `Unable to read protocol list <path>: <strerror>`.
const PROTOCOL_ERROR: &str = "Unable to read protocol list";
/// The client's built-in protocol list, used when UCI names none.
pub const DEFAULT_PROTOCOLS: &str = "/usr/share/nlbwmon/protocols";

/// The whole argument list: `-p <protocols>` (when given) before the command's.
pub fn argv<'a>(q: &'a Query<'a>, protocols: Option<&'a str>) -> Vec<&'a str> {
    let mut a = Vec::with_capacity(8);
    if let Some(p) = protocols {
        a.extend(["-p", p]);
    }
    a.extend(q.args());
    a
}

/// Sorts a failed `nlbw` run into the typed errors.
pub fn classify(program: &str, protocols: Option<&str>, e: ProcessError) -> NlbwError {
    if e.is_not_found() {
        return NlbwError::NotInstalled {
            program: program.to_owned(),
        };
    }
    match e {
        ProcessError::Timeout { timeout, .. } => NlbwError::Timeout(timeout),
        ProcessError::Failed { ref stderr, .. } if stderr.contains(PROTOCOL_ERROR) => {
            NlbwError::ProtocolList {
                path: protocols.unwrap_or(DEFAULT_PROTOCOLS).to_owned(),
                detail: stderr.trim().to_owned(),
            }
        }
        ProcessError::Failed { ref stderr, .. } if stderr.contains(CLIENT_ERROR) => {
            NlbwError::NotRunning {
                detail: stderr.clone(),
            }
        }
        other => NlbwError::Failed(other),
    }
}

/// nlbwmon's database file names: `<YYYYMMDD>.db` or `<YYYYMMDD>.db.gz` (its
/// `database_save`), the only files a reset may remove from the directory.
pub fn is_database_file(name: &str) -> bool {
    let (num, ext) = match name.split_once('.') {
        Some(p) => p,
        None => return false,
    };
    !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) && (ext == "db" || ext == "db.gz")
}

/// The daemon's refresh state in its temp directory (`/tmp/0.db`), reloaded at start
/// in preference to the database directory, so a reset removes it too.
pub fn is_temp_state_file(name: &str) -> bool {
    name == "0.db"
}

pub trait Nlbw: Send + Sync {
    /// Runs one `nlbw` command (with `-p protocols` when given) and returns its
    /// stdout.
    fn query<'a>(
        &'a self,
        q: Query<'a>,
        protocols: Option<&'a str>,
    ) -> Fut<'a, Result<String, NlbwError>>;
    /// Runs the init script.
    fn control(&self, action: Control) -> Fut<'_, Result<(), NlbwError>>;
    /// Removes the regular files in `dir` whose name `matches`, returning their
    /// names. A missing directory has nothing to remove.
    fn remove_files<'a>(
        &'a self,
        dir: &'a str,
        matches: fn(&str) -> bool,
    ) -> Fut<'a, Result<Vec<String>, NlbwError>>;
}

pub struct RealNlbw {
    pub program: String,
    /// `/etc/init.d/nlbwmon`
    pub init: String,
    /// Prefix for the database paths (tests, a chroot).
    pub root: PathBuf,
    pub timeout: Duration,
    /// One client at a time: the daemon would drop a second one.
    lock: tokio::sync::Mutex<()>,
}

impl RealNlbw {
    pub fn new(program: impl Into<String>, init: impl Into<String>, root: PathBuf) -> Self {
        RealNlbw {
            program: program.into(),
            init: init.into(),
            root,
            timeout: Duration::from_secs(10),
            lock: tokio::sync::Mutex::new(()),
        }
    }
}

impl Nlbw for RealNlbw {
    fn query<'a>(
        &'a self,
        q: Query<'a>,
        protocols: Option<&'a str>,
    ) -> Fut<'a, Result<String, NlbwError>> {
        Box::pin(async move {
            let _one = self.lock.lock().await;
            let mut all = vec![self.program.as_str()];
            all.extend(argv(&q, protocols));
            process::run(&all, None, self.timeout)
                .await
                .map_err(|e| classify(&self.program, protocols, e))
        })
    }

    fn control(&self, action: Control) -> Fut<'_, Result<(), NlbwError>> {
        Box::pin(async move {
            let _one = self.lock.lock().await;
            process::run(&[&self.init, action.as_str()], None, self.timeout)
                .await
                .map(drop)
                .map_err(NlbwError::Control)
        })
    }

    fn remove_files<'a>(
        &'a self,
        dir: &'a str,
        matches: fn(&str) -> bool,
    ) -> Fut<'a, Result<Vec<String>, NlbwError>> {
        Box::pin(async move {
            let full = self.root.join(dir.trim_start_matches('/'));
            let err = |source| NlbwError::Files {
                dir: dir.to_owned(),
                source,
            };
            let entries = match std::fs::read_dir(&full) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(err(e)),
            };
            let mut removed = Vec::new();
            for entry in entries {
                let entry = entry.map_err(err)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                // Regular files only: a symlink or directory of that name is not ours.
                if !matches(&name) || !entry.file_type().map_err(err)?.is_file() {
                    continue;
                }
                std::fs::remove_file(entry.path()).map_err(err)?;
                removed.push(name);
            }
            removed.sort();
            Ok(removed)
        })
    }
}

/// How a [`FakeNlbw`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeMode {
    Up,
    NotInstalled,
    /// Installed, and `start` fails.
    Broken,
}

/// Fixed answers by command, with nlbw's failure behaviour: while stopped, every
/// query fails as the real client does without its daemon.
pub struct FakeNlbw {
    state: Mutex<FakeState>,
}

struct FakeState {
    mode: FakeMode,
    running: bool,
    /// Answers by `args().join(" ")`.
    answers: BTreeMap<String, String>,
    files: BTreeMap<String, BTreeSet<String>>,
    queries: usize,
    controls: Vec<Control>,
    /// The protocol lists that exist; any other `-p` fails as nlbw does.
    protocol_files: BTreeSet<String>,
    /// The `-p` of the last query.
    last_protocols: Option<String>,
}

impl Default for FakeNlbw {
    fn default() -> Self {
        FakeNlbw {
            state: Mutex::new(FakeState {
                mode: FakeMode::Up,
                running: true,
                answers: BTreeMap::new(),
                files: BTreeMap::new(),
                queries: 0,
                controls: Vec::new(),
                // The default list, and /dev/null (always readable: an empty list).
                protocol_files: BTreeSet::from([
                    DEFAULT_PROTOCOLS.to_owned(),
                    "/dev/null".to_owned(),
                ]),
                last_protocols: None,
            }),
        }
    }
}

impl FakeNlbw {
    /// The captured outputs in `agent/fixtures/nlbwmon/`.
    pub fn with_fixtures() -> Self {
        let f = FakeNlbw::default();
        f.answer(
            Query::Json {
                group_by: None,
                period: None,
            },
            include_str!("../../fixtures/nlbwmon/nlbw-json.json"),
        );
        f.answer(
            Query::Json {
                group_by: Some("mac"),
                period: None,
            },
            include_str!("../../fixtures/nlbwmon/nlbw-json-group-mac.json"),
        );
        f.answer(
            Query::Csv { period: None },
            include_str!("../../fixtures/nlbwmon/nlbw-csv.csv"),
        );
        f.answer(
            Query::List,
            include_str!("../../fixtures/nlbwmon/nlbw-list.txt"),
        );
        f.answer(Query::Commit, "0 Ok\n");
        f
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake nlbw")
    }

    pub fn answer(&self, q: Query<'_>, text: &str) {
        self.lock()
            .answers
            .insert(q.args().join(" "), text.to_owned());
    }

    pub fn set_mode(&self, mode: FakeMode) {
        self.lock().mode = mode;
    }

    pub fn set_running(&self, running: bool) {
        self.lock().running = running;
    }

    pub fn add_file(&self, dir: &str, name: &str) {
        self.lock()
            .files
            .entry(dir.to_owned())
            .or_default()
            .insert(name.to_owned());
    }

    pub fn files(&self, dir: &str) -> Vec<String> {
        self.lock()
            .files
            .get(dir)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn queries(&self) -> usize {
        self.lock().queries
    }

    /// Makes `path` a readable protocol list (the default one is).
    pub fn add_protocol_file(&self, path: &str) {
        self.lock().protocol_files.insert(path.to_owned());
    }

    /// The `-p` argument of the last query.
    pub fn last_protocols(&self) -> Option<String> {
        self.lock().last_protocols.clone()
    }

    pub fn controls(&self) -> Vec<Control> {
        self.lock().controls.clone()
    }
}

impl Nlbw for FakeNlbw {
    fn query<'a>(
        &'a self,
        q: Query<'a>,
        protocols: Option<&'a str>,
    ) -> Fut<'a, Result<String, NlbwError>> {
        Box::pin(async move {
            let mut s = self.lock();
            s.queries += 1;
            s.last_protocols = protocols.map(str::to_owned);
            if s.mode == FakeMode::NotInstalled {
                return Err(NlbwError::NotInstalled {
                    program: "nlbw".into(),
                });
            }
            // The client reads its protocol list before it talks to the daemon.
            let path = protocols.unwrap_or(DEFAULT_PROTOCOLS);
            if !s.protocol_files.contains(path) {
                return Err(NlbwError::ProtocolList {
                    path: path.to_owned(),
                    detail: format!("{PROTOCOL_ERROR} {path}: No such file or directory"),
                });
            }
            if !s.running {
                return Err(NlbwError::NotRunning {
                    detail: format!("{CLIENT_ERROR}: No such file or directory"),
                });
            }
            let key = q.args().join(" ");
            s.answers
                .get(&key)
                .cloned()
                .ok_or_else(|| NlbwError::NotRunning {
                    detail: format!("{CLIENT_ERROR}: no answer for {key:?} in the fake"),
                })
        })
    }

    fn control(&self, action: Control) -> Fut<'_, Result<(), NlbwError>> {
        Box::pin(async move {
            let mut s = self.lock();
            s.controls.push(action);
            match (s.mode, action) {
                (FakeMode::NotInstalled, _) => Err(NlbwError::Control(ProcessError::Spawn {
                    argv: vec!["/etc/init.d/nlbwmon".into()],
                    source: std::io::ErrorKind::NotFound.into(),
                })),
                (FakeMode::Broken, Control::Start) => {
                    Err(NlbwError::Control(ProcessError::Failed {
                        argv: vec!["/etc/init.d/nlbwmon".into(), "start".into()],
                        status: "exit status: 1".into(),
                        code: Some(1),
                        stderr: "injected start failure".into(),
                    }))
                }
                (_, Control::Stop) => {
                    s.running = false;
                    Ok(())
                }
                (_, Control::Start) => {
                    s.running = true;
                    Ok(())
                }
            }
        })
    }

    fn remove_files<'a>(
        &'a self,
        dir: &'a str,
        matches: fn(&str) -> bool,
    ) -> Fut<'a, Result<Vec<String>, NlbwError>> {
        Box::pin(async move {
            let mut s = self.lock();
            let Some(set) = s.files.get_mut(dir) else {
                return Ok(Vec::new());
            };
            let removed: Vec<String> = set.iter().filter(|n| matches(n)).cloned().collect();
            set.retain(|n| !matches(n));
            Ok(removed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const JSON: &str = include_str!("../../fixtures/nlbwmon/nlbw-json.json");
    const LIST: &str = include_str!("../../fixtures/nlbwmon/nlbw-list.txt");

    /// A stand-in `nlbw` program that serves the fixtures by argument list, the way
    /// the real client prints them; `down` makes it fail like a client without its
    /// daemon.
    fn script(dir: &std::path::Path, down: bool) -> String {
        let fx = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/nlbwmon");
        let body = if down {
            "echo 'Error while processing command: No such file or directory' >&2\nexit 2\n"
                .to_owned()
        } else {
            format!(
                "if [ \"$1\" = -p ]; then\n\
                 [ -r \"$2\" ] || {{ echo \"Unable to read protocol list $2: No such file or directory\" >&2; exit 1; }}\n\
                 shift 2\n\
                 fi\n\
                 case \"$*\" in\n\
                 '-c json') cat {fx}/nlbw-json.json ;;\n\
                 '-c json -g mac') cat {fx}/nlbw-json-group-mac.json ;;\n\
                 '-c csv') cat {fx}/nlbw-csv.csv ;;\n\
                 '-c list') cat {fx}/nlbw-list.txt ;;\n\
                 '-c commit') echo '0 Ok' ;;\n\
                 *) echo \"Unrecognized command '$*'\" >&2; exit 1 ;;\n\
                 esac\n"
            )
        };
        let path = dir.join(if down { "nlbw-down" } else { "nlbw" });
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_string_lossy().into_owned()
    }

    /// What both adapters must do while the daemon runs.
    async fn contract_up(n: &dyn Nlbw) {
        let json = n
            .query(
                Query::Json {
                    group_by: None,
                    period: None,
                },
                None,
            )
            .await
            .unwrap();
        assert_eq!(json, JSON);
        assert_eq!(n.query(Query::List, None).await.unwrap(), LIST);
        let by_mac = n
            .query(
                Query::Json {
                    group_by: Some("mac"),
                    period: None,
                },
                None,
            )
            .await
            .unwrap();
        assert!(by_mac.starts_with("{\"columns\":[\"mac\""), "{by_mac}");
        assert!(n
            .query(Query::Csv { period: None }, None)
            .await
            .unwrap()
            .contains("\t\"HTTPS\""));
    }

    #[test]
    fn arguments_follow_the_client_options() {
        assert_eq!(
            Query::Json {
                group_by: Some("mac,ip"),
                period: Some("2026-11-01")
            }
            .args(),
            ["-c", "json", "-g", "mac,ip", "-t", "2026-11-01"]
        );
        assert_eq!(Query::List.args(), ["-c", "list"]);
        assert_eq!(
            Query::Csv {
                period: Some("2026-10-01")
            }
            .args(),
            ["-c", "csv", "-t", "2026-10-01"]
        );
        assert_eq!(Query::Commit.args(), ["-c", "commit"]);
        assert_eq!(
            argv(&Query::List, Some("/etc/nlbw/protocols")),
            ["-p", "/etc/nlbw/protocols", "-c", "list"]
        );
        assert_eq!(argv(&Query::List, None), ["-c", "list"]);
    }

    #[test]
    fn only_nlbwmon_database_names_are_matched() {
        for ok in ["20261101.db", "20261101.db.gz", "0.db"] {
            assert!(is_database_file(ok), "{ok}");
        }
        for no in [
            "20261101.db.bak",
            "x.db",
            ".db",
            "20261101",
            "state.sqlite3",
            "2026-11-01.db",
            "20261101.db.gz.tmp",
        ] {
            assert!(!is_database_file(no), "{no}");
        }
        assert!(is_temp_state_file("0.db") && !is_temp_state_file("1.db"));
    }

    #[tokio::test]
    async fn the_real_adapter_and_the_fake_keep_the_same_contract() {
        let dir = tempfile_dir();
        let real = RealNlbw::new(script(&dir, false), "/bin/true", dir.clone());
        contract_up(&real).await;
        let fake = FakeNlbw::with_fixtures();
        contract_up(&fake).await;

        // A protocol list that is there is passed; one that is not is a
        // configuration error, told apart from a daemon that is down.
        let protocols = dir.join("protocols");
        std::fs::write(&protocols, "6 443 HTTPS\n").unwrap();
        let protocols = protocols.to_string_lossy().into_owned();
        fake.add_protocol_file(&protocols);
        for n in [&real as &dyn Nlbw, &fake] {
            assert_eq!(n.query(Query::List, Some(&protocols)).await.unwrap(), LIST);
            let e = n
                .query(Query::List, Some("/no/such/protocols"))
                .await
                .unwrap_err();
            match e {
                NlbwError::ProtocolList { path, detail } => {
                    assert_eq!(path, "/no/such/protocols");
                    assert!(detail.contains("No such file"), "{detail}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(fake.last_protocols().as_deref(), Some("/no/such/protocols"));

        let down = RealNlbw::new(script(&dir, true), "/bin/true", dir.clone());
        let e = down.query(Query::List, None).await.unwrap_err();
        assert!(matches!(e, NlbwError::NotRunning { .. }), "{e:?}");
        fake.set_running(false);
        let e = fake.query(Query::List, None).await.unwrap_err();
        assert!(matches!(e, NlbwError::NotRunning { .. }), "{e:?}");

        let missing = RealNlbw::new("/nonexistent/nlbw", "/bin/true", dir.clone());
        let e = missing.query(Query::List, None).await.unwrap_err();
        assert!(matches!(e, NlbwError::NotInstalled { .. }), "{e:?}");
        fake.set_mode(FakeMode::NotInstalled);
        let e = fake.query(Query::List, None).await.unwrap_err();
        assert!(matches!(e, NlbwError::NotInstalled { .. }), "{e:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn real_calls_are_serialised() {
        // The stand-in refuses a second client while one is connected (mkdir is
        // atomic), as nlbwmon's single-client socket would drop it.
        let dir = tempfile_dir();
        let lock = dir.join("busy");
        let path = dir.join("nlbw-one");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nmkdir {l} || {{ echo 'Error while processing command: Resource busy' >&2; exit 1; }}\nsleep 0.05\nrmdir {l}\necho 2026-11-01\n",
                l = lock.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let real = RealNlbw::new(path.to_string_lossy(), "/bin/true", dir.clone());
        let q = || real.query(Query::List, None);
        let (a, b, c, d) = tokio::join!(q(), q(), q(), q());
        for r in [a, b, c, d] {
            assert_eq!(r.unwrap(), "2026-11-01\n");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn removing_files_takes_only_matching_regular_files() {
        let dir = tempfile_dir();
        let db = dir.join("var/lib/nlbwmon");
        std::fs::create_dir_all(db.join("20261001.db")).unwrap(); // a directory: kept
        for f in [
            "20261101.db.gz",
            "20261201.db",
            "notes.txt",
            "20261101.db.bak",
        ] {
            std::fs::write(db.join(f), "x").unwrap();
        }
        let real = RealNlbw::new("nlbw", "/bin/true", dir.clone());
        let removed = real
            .remove_files("/var/lib/nlbwmon", is_database_file)
            .await
            .unwrap();
        assert_eq!(removed, ["20261101.db.gz", "20261201.db"]);
        let mut left: Vec<String> = std::fs::read_dir(&db)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["20261001.db", "20261101.db.bak", "notes.txt"]);
        assert!(real
            .remove_files("/no/such/dir", is_database_file)
            .await
            .unwrap()
            .is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "np-nlbw-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
