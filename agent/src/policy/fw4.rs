//! Keeping NetPilot's rules through fw4's life cycle. `fw4 flush`
//! (`/etc/init.d/firewall stop`) deletes every nftables table, ours too; fw4's
//! `start`/`reload`/`restart` load its own table and, in the same transaction,
//! include every `/usr/share/nftables.d/ruleset-post/*.nft`. So:
//!
//! - a *live copy* of the complete script the engine would load for a whole-table
//!   apply (elements included) sits on tmpfs, rewritten after every apply that
//!   changed it: written to a temp file, checked with `nft -c -f`, renamed. It
//!   replaces whatever table of ours exists (`table … {}` + `delete table` + the
//!   table), so fw4 may include it while the table is still there (a reload);
//! - a static *include* in fw4's include point only says `include "<live dir>/*.nft"`:
//!   a glob matching nothing is no error, so a missing live copy never breaks fw4,
//!   and a live copy that does not pass the check is never put in place;
//! - a *boot copy* on flash, written only when the desired policy changes (its first
//!   line names the engine's generation; compared before writing, fsync + rename),
//!   which `netpilot-agent boot` checks and puts in place as the live copy before
//!   fw4 starts, so the rules hold from boot without the agent.
//!
//! Files are written here directly (tmpfs and the agent's own flash directory);
//! the nft check goes through the [`Firewall`] seam.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::compile::Compiled;
use crate::system::nft::{Firewall, NftError};

/// Where the three files live. The defaults are OpenWrt's; tests point them into
/// temporary directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fw4Paths {
    /// The live copies' directory (tmpfs): every `*.nft` in it is included by fw4.
    pub live_dir: PathBuf,
    /// The static file in fw4's `ruleset-post` include point.
    pub include: PathBuf,
    /// The boot copy on flash.
    pub boot: PathBuf,
}

pub const LIVE_DIR: &str = "/var/run/netpilot/fw4";
pub const INCLUDE: &str = "/usr/share/nftables.d/ruleset-post/netpilot.nft";
/// The boot copy's name in the state directory.
pub const BOOT_NAME: &str = "boot.nft";
/// The live copy's name in [`Fw4Paths::live_dir`].
pub const LIVE_NAME: &str = "netpilot.nft";

impl Fw4Paths {
    pub fn live_file(&self) -> PathBuf {
        self.live_dir.join(LIVE_NAME)
    }
}

/// The include file's whole text.
pub fn include_text(live_dir: &Path) -> String {
    format!(
        "# NetPilot: its rules, as the agent keeps them on tmpfs (none is fine).\n\
         include \"{}/*.nft\"\n",
        live_dir.display()
    )
}

const BOOT_HEADER: &str = "# netpilot boot copy, generation ";

/// The boot copy: a header naming the generation, then the script.
pub fn boot_text(generation: u64, script: &str) -> String {
    format!("{BOOT_HEADER}{generation}\n{script}")
}

/// The generation a boot copy was written for.
pub fn boot_generation(text: &str) -> Option<u64> {
    text.lines().next()?.strip_prefix(BOOT_HEADER)?.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum Fw4Error {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `nft -c` refused the script: it is not put in place.
    #[error("nft refuses {path}, so it is not put in place: {source}")]
    Check {
        path: PathBuf,
        #[source]
        source: NftError,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Fw4Error + 'a {
    move |source| Fw4Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What the status shows of the copies.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fw4Status {
    /// The copies hold what is live now (false while the writer catches up, or
    /// after a failure).
    pub in_step: bool,
    pub live_copy: bool,
    pub boot_copy_generation: Option<u64>,
    /// Live copies and boot copies written since start.
    pub live_writes: u64,
    pub boot_writes: u64,
    /// The last failure to keep a copy; cleared by the next success.
    pub last_error: Option<String>,
}

struct State {
    /// Digest of the compiled state the live copy holds (`Some("")`: none wanted
    /// and none there); `None` until first written.
    live_digest: Option<String>,
    /// The boot copy's generation as on flash; `None` when there is none.
    boot_generation: Option<u64>,
    status: Fw4Status,
}

/// Keeps the include, the live copy and the boot copy in step with the engine.
pub struct Keeper {
    paths: Fw4Paths,
    nft: Arc<dyn Firewall>,
    state: Mutex<State>,
}

impl Keeper {
    /// Reads the boot copy's generation once, so later comparisons cost nothing.
    pub fn new(paths: Fw4Paths, nft: Arc<dyn Firewall>) -> Keeper {
        let boot_generation = read_head(&paths.boot).as_deref().and_then(boot_generation);
        Keeper {
            state: Mutex::new(State {
                live_digest: None,
                boot_generation,
                status: Fw4Status {
                    boot_copy_generation: boot_generation,
                    ..Fw4Status::default()
                },
            }),
            paths,
            nft,
        }
    }

    pub fn paths(&self) -> &Fw4Paths {
        &self.paths
    }

    pub fn status(&self) -> Fw4Status {
        self.state.lock().expect("fw4 state").status.clone()
    }

    /// Whether the copies hold `live` at `generation`.
    pub fn is_kept(&self, generation: u64, live: Option<&Compiled>) -> bool {
        let state = self.state.lock().expect("fw4 state");
        state.live_digest.as_deref() == Some(live.map_or("", |c| c.digest.as_str()))
            && state.boot_generation == live.map(|_| generation)
    }

    /// The include file in fw4's include point, written when it says anything else.
    pub fn ensure_include(&self) -> Result<bool, Fw4Error> {
        ensure_include(&self.paths)
    }

    /// Brings the live and boot copies in step with `live` (what the kernel holds
    /// now) at `generation`. The live copy is rewritten when the compiled state
    /// changed, the boot copy only when the generation (the desired policy) did.
    /// When both are written, nft checks the script once: the boot copy is the same
    /// script under a comment line. A copy nft refuses is not put in place (the
    /// previous one stays). The status keeps the failure until a later success.
    pub async fn keep(&self, generation: u64, live: Option<&Compiled>) -> Result<(), Fw4Error> {
        let result = self.write(generation, live).await;
        let mut state = self.state.lock().expect("fw4 state");
        state.status.last_error = result.as_ref().err().map(|e| e.to_string());
        result
    }

    async fn write(&self, generation: u64, live: Option<&Compiled>) -> Result<(), Fw4Error> {
        let digest = live.map(|c| c.digest.clone()).unwrap_or_default();
        let boot_want = live.map(|_| generation);
        let (need_live, need_boot) = {
            let state = self.state.lock().expect("fw4 state");
            (
                state.live_digest.as_ref() != Some(&digest),
                state.boot_generation != boot_want,
            )
        };
        let live_file = self.paths.live_file();
        match live {
            None => {
                if need_live {
                    remove(&live_file)?;
                }
                if need_boot {
                    remove(&self.paths.boot)?;
                }
            }
            Some(_) if !(need_live || need_boot) => return Ok(()),
            Some(c) => {
                let script = c.full_script();
                let boot = boot_text(generation, &script);
                let (live_tmp, boot_tmp) = (temp_path(&live_file), temp_path(&self.paths.boot));
                if need_live {
                    write_file(&live_tmp, &script, false)?;
                }
                if need_boot {
                    write_file(&boot_tmp, &boot, true)?;
                }
                let checked = if need_live { &live_tmp } else { &boot_tmp };
                if let Err(source) = self.nft.check_file(checked).await {
                    let _ = std::fs::remove_file(&live_tmp);
                    let _ = std::fs::remove_file(&boot_tmp);
                    return Err(Fw4Error::Check {
                        path: if need_live {
                            live_file
                        } else {
                            self.paths.boot.clone()
                        },
                        source,
                    });
                }
                if need_live {
                    rename(&live_tmp, &live_file, false)?;
                }
                if need_boot {
                    rename(&boot_tmp, &self.paths.boot, true)?;
                }
            }
        }
        let mut state = self.state.lock().expect("fw4 state");
        if need_live {
            state.live_digest = Some(digest);
            state.status.live_copy = live.is_some();
            if live.is_some() {
                state.status.live_writes += 1;
            }
        }
        if need_boot {
            state.boot_generation = boot_want;
            state.status.boot_copy_generation = boot_want;
            if boot_want.is_some() {
                state.status.boot_writes += 1;
            }
        }
        Ok(())
    }
}

/// Writes the include file when its text differs; `true` when written.
pub fn ensure_include(paths: &Fw4Paths) -> Result<bool, Fw4Error> {
    let text = include_text(&paths.live_dir);
    if std::fs::read_to_string(&paths.include).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    write_replace(&paths.include, &text, false)?;
    Ok(true)
}

/// `netpilot-agent boot`: puts a boot copy that nft accepts in place as the live
/// copy (and makes sure the include is there), before fw4 starts. Without a boot
/// copy any stale live copy is removed, so fw4 loads nothing of ours.
pub async fn boot(paths: &Fw4Paths, nft: &dyn Firewall) -> Result<BootOutcome, Fw4Error> {
    ensure_include(paths)?;
    let text = match std::fs::read_to_string(&paths.boot) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            remove(&paths.live_file())?;
            return Ok(BootOutcome::NoBootCopy);
        }
        Err(e) => return Err(io("reading", &paths.boot)(e)),
    };
    let generation = boot_generation(&text);
    match put_checked(nft, &paths.live_file(), &text, false).await {
        Ok(()) => Ok(BootOutcome::InPlace { generation }),
        Err(e) => {
            // A live copy of an older boot would enforce something stale; none is
            // better than that, and fw4 must load.
            remove(&paths.live_file())?;
            Err(e)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootOutcome {
    NoBootCopy,
    InPlace { generation: Option<u64> },
}

/// Writes `text` beside `path`, has nft check it, and renames it over `path`; a
/// script nft refuses is removed and `path` left as it was. The temp name ends in
/// `.tmp`, so fw4's `*.nft` glob never sees a half-written file.
async fn put_checked(
    nft: &dyn Firewall,
    path: &Path,
    text: &str,
    durable: bool,
) -> Result<(), Fw4Error> {
    let tmp = temp_path(path);
    write_file(&tmp, text, durable)?;
    if let Err(source) = nft.check_file(&tmp).await {
        let _ = std::fs::remove_file(&tmp);
        return Err(Fw4Error::Check {
            path: path.to_owned(),
            source,
        });
    }
    rename(&tmp, path, durable)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Temp file + rename, without a check (the include is not a script of ours).
fn write_replace(path: &Path, text: &str, durable: bool) -> Result<(), Fw4Error> {
    let tmp = temp_path(path);
    write_file(&tmp, text, durable)?;
    rename(&tmp, path, durable)
}

fn write_file(path: &Path, text: &str, durable: bool) -> Result<(), Fw4Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    let mut f = std::fs::File::create(path).map_err(io("writing", path))?;
    f.write_all(text.as_bytes()).map_err(io("writing", path))?;
    if durable {
        f.sync_all().map_err(io("syncing", path))?;
    }
    Ok(())
}

fn rename(tmp: &Path, path: &Path, durable: bool) -> Result<(), Fw4Error> {
    std::fs::rename(tmp, path).map_err(io("renaming into", path))?;
    if durable {
        // The rename itself must reach flash before a power cut can lose it.
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing", dir))?;
        }
    }
    Ok(())
}

fn remove(path: &Path) -> Result<(), Fw4Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", path)(e)),
    }
}

/// The first line of a file, if it can be read.
fn read_head(path: &Path) -> Option<String> {
    use std::io::BufRead as _;
    let f = std::fs::File::open(path).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(f).read_line(&mut line).ok()?;
    Some(line)
}

/// Every file [`Keeper`] and [`boot`] may have written, for `cleanup`.
pub fn files(paths: &Fw4Paths) -> [PathBuf; 3] {
    [paths.include.clone(), paths.live_file(), paths.boot.clone()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::compile::{self, Context};
    use crate::policy::fixtures::kids;
    use crate::policy::model::Desired;
    use crate::policy::ops;
    use crate::policy::tz::Zone;
    use crate::system::nft::FakeNft;

    fn dir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "np-fw4-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn paths(d: &Path) -> Fw4Paths {
        Fw4Paths {
            live_dir: d.join("run/fw4"),
            include: d.join("ruleset-post/netpilot.nft"),
            boot: d.join("etc/boot.nft"),
        }
    }

    fn compiled(devices: &[u8]) -> Compiled {
        let mut d = Desired::default();
        ops::sync_group(&mut d, kids(devices, Some(5000))).unwrap();
        ops::normalize(&mut d).unwrap();
        let zone = Zone::utc();
        compile::compile(&d, &Context::new("br-lan", "wan", &zone, 1_795_435_200)).unwrap()
    }

    #[tokio::test]
    async fn copies_are_written_when_they_change_and_the_boot_copy_only_per_generation() {
        let d = dir();
        let p = paths(&d);
        let nft = Arc::new(FakeNft::default());
        let k = Keeper::new(p.clone(), nft.clone());
        assert!(k.ensure_include().unwrap());
        assert!(!k.ensure_include().unwrap(), "unchanged: not rewritten");
        let inc = std::fs::read_to_string(&p.include).unwrap();
        assert!(inc.contains(&format!("include \"{}/*.nft\"", p.live_dir.display())));

        let a = compiled(&[1]);
        k.keep(1, Some(&a)).await.unwrap();
        let live = std::fs::read_to_string(p.live_file()).unwrap();
        assert_eq!(live, a.full_script());
        let boot = std::fs::read_to_string(&p.boot).unwrap();
        assert_eq!(boot_generation(&boot), Some(1));
        assert!(boot.ends_with(&a.full_script()));
        // A periodic check: nothing rewritten.
        k.keep(1, Some(&a)).await.unwrap();
        // The same generation compiled to other rules (a compaction, a DST
        // refresh): the live copy follows, the flash is left alone.
        let b = compiled(&[1, 2]);
        k.keep(1, Some(&b)).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(p.live_file()).unwrap(),
            b.full_script()
        );
        assert_eq!(std::fs::read_to_string(&p.boot).unwrap(), boot);
        let s = k.status();
        assert_eq!((s.live_writes, s.boot_writes), (2, 1));
        assert_eq!(
            nft.checks(),
            2,
            "one check for the first pair, one for the second"
        );
        // A new generation: flash rewritten.
        k.keep(2, Some(&b)).await.unwrap();
        assert_eq!(k.status().boot_writes, 2);
        // A restarted agent reads the boot copy's generation and writes nothing.
        let again = Keeper::new(p.clone(), nft.clone());
        again.keep(2, Some(&b)).await.unwrap();
        assert_eq!(again.status().boot_writes, 0);
        // Nothing wanted: both copies go.
        k.keep(3, None).await.unwrap();
        assert!(!p.live_file().exists() && !p.boot.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn a_refused_copy_is_not_put_in_place_and_the_old_one_stays() {
        let d = dir();
        let p = paths(&d);
        let nft = Arc::new(FakeNft::default());
        let k = Keeper::new(p.clone(), nft.clone());
        let a = compiled(&[1]);
        k.keep(1, Some(&a)).await.unwrap();
        nft.refuse_checks(true);
        let err = k.keep(2, Some(&compiled(&[1, 2]))).await.unwrap_err();
        assert!(matches!(err, Fw4Error::Check { .. }), "{err}");
        assert!(k.status().last_error.is_some());
        assert_eq!(
            std::fs::read_to_string(p.live_file()).unwrap(),
            a.full_script()
        );
        assert_eq!(
            boot_generation(&std::fs::read_to_string(&p.boot).unwrap()),
            Some(1)
        );
        let names: Vec<_> = std::fs::read_dir(&p.live_dir).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left behind");
        nft.refuse_checks(false);
        k.keep(2, Some(&compiled(&[1, 2]))).await.unwrap();
        assert!(k.status().last_error.is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn boot_puts_a_good_boot_copy_in_place_and_never_a_bad_one() {
        let d = dir();
        let p = paths(&d);
        let nft = FakeNft::default();
        // No boot copy: a stale live copy goes, the include is there.
        std::fs::create_dir_all(&p.live_dir).unwrap();
        std::fs::write(p.live_file(), "stale").unwrap();
        assert_eq!(boot(&p, &nft).await.unwrap(), BootOutcome::NoBootCopy);
        assert!(!p.live_file().exists());
        assert!(p.include.exists());
        let a = compiled(&[1]);
        std::fs::create_dir_all(p.boot.parent().unwrap()).unwrap();
        std::fs::write(&p.boot, boot_text(7, &a.full_script())).unwrap();
        assert_eq!(
            boot(&p, &nft).await.unwrap(),
            BootOutcome::InPlace {
                generation: Some(7)
            }
        );
        assert!(std::fs::read_to_string(p.live_file())
            .unwrap()
            .ends_with(&a.full_script()));
        std::fs::write(&p.boot, "table inet netpilot { garbage\n").unwrap();
        assert!(matches!(
            boot(&p, &nft).await.unwrap_err(),
            Fw4Error::Check { .. }
        ));
        assert!(!p.live_file().exists(), "nothing fw4 could fail on");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
