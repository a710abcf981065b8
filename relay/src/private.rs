//! Files only the relay may read: the data directory (0700) and the registry
//! database in it (0600; it holds router secret digests and enrollment tokens),
//! whatever the umask. A data directory from before this rule is tightened when the
//! relay starts, with one log line per path.

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

/// Creates `dir` (and missing parents) 0700, or tightens it when it exists looser.
pub fn dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    restrict(dir, DIR_MODE)
}

/// Creates `path` empty and 0600 when missing (SQLite gives its `-wal` and `-shm`
/// files the database's mode), or tightens it when it exists looser.
pub fn file(path: &Path) -> io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => restrict(path, FILE_MODE),
        Err(e) => Err(e),
    }
}

/// Tightens `path` to `wanted` if it exists and is looser; a missing path or a
/// symlink (whose target is someone else's choice) is left alone.
pub fn restrict(path: &Path, wanted: u32) -> io::Result<()> {
    let current = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Ok(()),
        Ok(m) => m.permissions().mode(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if let Some(to) = tightened(current, wanted) {
        std::fs::set_permissions(path, Permissions::from_mode(to))?;
        tracing::warn!(
            path = %path.display(),
            from = %format!("{:04o}", current & 0o7777),
            to = %format!("{to:04o}"),
            "tightened permissions: the relay's data is private"
        );
    }
    Ok(())
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
        assert_eq!(tightened(0o100640, FILE_MODE), Some(0o600));
    }

    #[test]
    fn made_private_and_loose_ones_tightened() {
        let base = std::env::temp_dir().join(format!("np-relay-private-{}", uuid::Uuid::new_v4()));
        let d = base.join("data");
        dir(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        let f = d.join("db");
        file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        dir(&d).unwrap();
        file(&f).unwrap();
        assert_eq!((mode(&d), mode(&f)), (0o700, 0o600));
        restrict(&d.join("missing"), FILE_MODE).unwrap();
        std::fs::remove_dir_all(base).unwrap();
    }
}
