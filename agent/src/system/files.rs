//! Reading the router's files (`/proc`, `/etc/openwrt_release`, …) behind a trait, so
//! the simulated router and tests supply their own contents on the same code path.

use std::io;
use std::path::PathBuf;

pub trait Files: Send + Sync {
    /// The file's whole contents; `NotFound` when it does not exist.
    fn read_to_string(&self, path: &str) -> io::Result<String>;
}

/// The real filesystem, optionally under a root prefix (tests, a chroot).
#[derive(Debug, Clone)]
pub struct RealFiles {
    root: PathBuf,
}

impl RealFiles {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        RealFiles { root: root.into() }
    }
}

impl Default for RealFiles {
    fn default() -> Self {
        RealFiles::new("/")
    }
}

/// Files the agent reads are small; a cap protects against a runaway file.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

impl Files for RealFiles {
    fn read_to_string(&self, path: &str) -> io::Result<String> {
        use std::io::Read;
        let full = self.root.join(path.trim_start_matches('/'));
        let mut out = String::new();
        std::fs::File::open(full)?
            .take(MAX_FILE_BYTES)
            .read_to_string(&mut out)?;
        Ok(out)
    }
}

/// Fixed contents by path, for unit tests.
#[derive(Debug, Default, Clone)]
pub struct MemFiles {
    files: std::collections::HashMap<String, String>,
}

impl MemFiles {
    pub fn with(mut self, path: &str, contents: &str) -> Self {
        self.files.insert(path.to_owned(), contents.to_owned());
        self
    }
}

impl Files for MemFiles {
    fn read_to_string(&self, path: &str) -> io::Result<String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_and_memory_files_agree_on_missing_files() {
        let real = RealFiles::default();
        assert!(real.read_to_string("/proc/uptime").unwrap().contains('.'));
        let e = real.read_to_string("/nonexistent/netpilot").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let mem = MemFiles::default().with("/a", "x");
        assert_eq!(mem.read_to_string("/a").unwrap(), "x");
        assert_eq!(
            mem.read_to_string("/b").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn root_prefix_is_applied() {
        let dir = std::env::temp_dir().join(format!("np-files-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/openwrt_release"), "DISTRIB_ID='OpenWrt'\n").unwrap();
        let f = RealFiles::new(&dir);
        assert!(f
            .read_to_string("/etc/openwrt_release")
            .unwrap()
            .contains("OpenWrt"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
