//! The engines a relay cluster stands on, started per test as plain processes:
//! PostgreSQL (Debian's `postgresql` package) and Redis (`redis-server`). Each
//! listens only on a Unix socket in its own temporary directory — no port to pick,
//! nothing reachable from outside — and is stopped (SIGKILL, then the directory is
//! removed) when its handle drops, so a failing test leaves nothing behind.
//!
//! PostgreSQL refuses to run as root: as root (CI) the server runs as the
//! `postgres` user in a directory handed to it; as anyone else it runs as the
//! caller. Its data directory is made once per machine by `initdb` (kept in the
//! temporary directory) and copied for each server (initdb takes a second or two, a
//! copy milliseconds).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::process::{Child, Command};

/// Where Debian puts the server binaries (not on `PATH`).
const PG_BIN_DIRS: &[&str] = &[
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
];

fn pg_bin(name: &str) -> anyhow::Result<PathBuf> {
    PG_BIN_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!("PostgreSQL's {name} not found in {PG_BIN_DIRS:?}: apt-get install postgresql")
        })
}

/// The uid and gid the server runs as: `postgres` when we are root.
fn pg_owner() -> anyhow::Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")?
        .context("running as root needs the postgres user (apt-get install postgresql)")?;
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

fn chown_tree(path: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_tree(&e?.path(), owner)?;
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), &dest)?;
        }
    }
    Ok(())
}

/// One `initdb` for this machine, kept in the temporary directory beside the test
/// runs and reused by every server after it (made in a scratch directory and moved
/// into place, so concurrent test processes never see half of one).
fn template() -> anyhow::Result<&'static Path> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let made = TEMPLATE.get_or_init(|| {
        (|| -> anyhow::Result<PathBuf> {
            let initdb = pg_bin("initdb")?;
            let version = initdb
                .parent()
                .and_then(|p| p.parent())
                .and_then(|p| p.file_name())
                .map(|v| v.to_string_lossy().into_owned())
                .unwrap_or_default();
            let owner = pg_owner()?;
            let final_dir = std::env::temp_dir().join(format!(
                "netpilot-pg-template-{version}-{}",
                nix::unistd::geteuid()
            ));
            if final_dir.join("data/PG_VERSION").exists() {
                return Ok(final_dir.join("data"));
            }
            let dir = tempfile::Builder::new().prefix("np-pg-initdb").tempdir()?;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
            let data = dir.path().join("data");
            std::fs::create_dir(&data)?;
            chown_tree(dir.path(), owner)?;
            let mut cmd = std::process::Command::new(initdb);
            cmd.arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
                .args(["--locale", "C"])
                .stdout(Stdio::null());
            if let Some((uid, gid)) = owner {
                cmd.uid(uid).gid(gid);
            }
            let out = cmd.output().context("cannot run initdb")?;
            if !out.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            // Another test process may have won the race: theirs is as good.
            let scratch = dir.keep();
            if std::fs::rename(&scratch, &final_dir).is_err() {
                let _ = std::fs::remove_dir_all(&scratch);
            }
            Ok(final_dir.join("data"))
        })()
        .map_err(|e| format!("{e:#}"))
    });
    match made {
        Ok(dir) => Ok(dir.as_path()),
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// A PostgreSQL server of its own, on a Unix socket.
pub struct Postgres {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Postgres {
    pub async fn start() -> anyhow::Result<Postgres> {
        let owner = pg_owner()?;
        let template = template()?;
        let dir = tempfile::Builder::new().prefix("np-pg").tempdir()?;
        // The server (maybe another user) must reach its socket directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let data = dir.path().join("data");
        copy_tree(template, &data)?;
        chown_tree(dir.path(), owner)?;
        let mut cmd = Command::new(pg_bin("postgres")?);
        cmd.arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            // No TCP at all: the socket file is the only way in.
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.path().join("postgres.log"),
            )?))
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().context("cannot start postgres")?;
        let pg = Postgres {
            child: Some(child),
            dir,
        };
        pg.wait_ready().await?;
        Ok(pg)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        // The socket file appears once the server accepts connections.
        let socket = self.dir.path().join(".s.PGSQL.5432");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if socket.exists() {
                if let Ok(out) = Command::new(pg_bin("pg_isready")?)
                    .arg("-h")
                    .arg(self.dir.path())
                    .args(["-U", "postgres", "-d", "postgres"])
                    .output()
                    .await
                {
                    if out.status.success() {
                        return Ok(());
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("postgres did not start within 30 s:\n{}", self.log())
    }

    /// A connection URL for the `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// A connection URL for database `db` (see [`Postgres::create_database`]).
    pub fn url_for(&self, db: &str) -> String {
        // libpq's form for a socket directory: the host is the path, escaped.
        let host: String =
            form_urlencoded::byte_serialize(self.dir.path().as_os_str().as_encoded_bytes())
                .collect();
        format!("postgresql://postgres@{host}/{db}")
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self, db: &str) -> anyhow::Result<String> {
        self.psql("postgres", &format!("CREATE DATABASE \"{db}\""))
            .await?;
        Ok(self.url_for(db))
    }

    /// Runs SQL through `psql`, returning its unaligned output.
    pub async fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(pg_bin("psql")?)
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-U",
                "postgres",
                "-d",
                db,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .await?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server at once (as a crash would), keeping its data; `resume`
    /// starts it again on the same socket.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        // A killed postmaster leaves its pid file; the next start checks the pid.
    }

    pub async fn resume(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let owner = pg_owner()?;
        let mut cmd = Command::new(pg_bin("postgres")?);
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.dir.path().join("postgres.log"))?,
            ))
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            cmd.uid(uid).gid(gid);
        }
        self.child = Some(cmd.spawn()?);
        self.wait_ready().await
    }
}

/// A Redis server of its own, on a Unix socket, with nothing saved to disk.
pub struct Redis {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> anyhow::Result<Redis> {
        let dir = tempfile::Builder::new().prefix("np-redis").tempdir()?;
        let mut r = Redis { child: None, dir };
        r.resume().await?;
        Ok(r)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    /// `redis+unix:///…/redis.sock` (database 0).
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// Starts (again) on the same socket; data does not survive (no persistence,
    /// as a restarted cache node would come back).
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let _ = std::fs::remove_file(self.socket());
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(
                self.dir.path().join("redis.log"),
            )?))
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server (apt-get install redis-server)")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if self.cli(&["PING"]).await.is_ok_and(|o| o.trim() == "PONG") {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!(
            "redis-server did not start within 10 s:\n{}",
            std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
        )
    }

    /// Runs one command through `redis-cli`, returning its output.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("redis-cli")
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .await?;
        if !out.status.success() {
            bail!("redis-cli: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server at once (SIGKILL).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}
