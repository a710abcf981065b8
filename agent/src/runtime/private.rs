//! Files only the agent may read. The state directory holds the router's secret and
//! a database that keeps the previous Wi-Fi passphrase while a change is pending:
//! the directory is made 0700 and files in it 0600 whatever the umask, and an
//! install from before this rule is tightened when the agent starts.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// The mode `current` becomes when it grants more than `wanted` (what it grants
/// within `wanted` stays); `None` when it grants nothing more.
pub fn tightened(current: u32, wanted: u32) -> Option<u32> {
    let current = current & 0o7777;
    (current & !wanted != 0).then_some(current & wanted)
}

/// A mode change made to an existing path, for the caller's one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tightened {
    pub from: u32,
    pub to: u32,
}

impl std::fmt::Display for Tightened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o} -> {:04o}", self.from, self.to)
    }
}

/// Creates `dir` (and missing parents) 0700, or tightens it when it exists looser.
pub fn dir(dir: &Path) -> io::Result<Option<Tightened>> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    restrict(dir, DIR_MODE)
}

/// Creates `path` empty and 0600 when missing (so whatever opens it next finds it
/// private), or tightens it when it exists looser.
pub fn file(path: &Path) -> io::Result<Option<Tightened>> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => restrict(path, FILE_MODE),
        Err(e) => Err(e),
    }
}

/// Tightens `path` to `wanted` if it exists and is looser; a missing path is fine.
pub fn restrict(path: &Path, wanted: u32) -> io::Result<Option<Tightened>> {
    let current = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Ok(None),
        Ok(m) => m.permissions().mode(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match tightened(current, wanted) {
        None => Ok(None),
        Some(to) => {
            std::fs::set_permissions(path, Permissions::from_mode(to))?;
            Ok(Some(Tightened {
                from: current & 0o7777,
                to,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_grants_beyond_the_wanted_mode_are_taken_away() {
        assert_eq!(tightened(0o40755, DIR_MODE), Some(0o700));
        assert_eq!(tightened(0o100644, FILE_MODE), Some(0o600));
        assert_eq!(tightened(0o100600, FILE_MODE), None);
        assert_eq!(tightened(0o100400, FILE_MODE), None);
        assert_eq!(tightened(0o100440, FILE_MODE), Some(0o400));
        assert_eq!(tightened(0o104600, FILE_MODE), Some(0o600));
    }

    #[test]
    fn made_private_and_loose_ones_tightened() {
        let base = std::env::temp_dir().join(format!("np-private-{}", std::process::id()));
        let d = base.join("state");
        assert_eq!(dir(&d).unwrap(), None);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        let f = d.join("db");
        assert_eq!(file(&f).unwrap(), None);
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        let t = dir(&d).unwrap().unwrap();
        assert_eq!(t.to_string(), "0755 -> 0700");
        assert_eq!(file(&f).unwrap().unwrap().to_string(), "0644 -> 0600");
        assert_eq!((mode(&d), mode(&f)), (0o700, 0o600));
        assert_eq!(restrict(&d.join("missing"), FILE_MODE).unwrap(), None);
        std::fs::remove_dir_all(base).unwrap();
    }
}
