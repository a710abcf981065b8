//! The control socket: how the router itself talks to the running agent — the
//! owner at the console (`netpilot-agent status`), the WAN hotplug script
//! (`reconnect`) and the init script's reload (`reapply`, also run by procd's
//! trigger on the `firewall` config). A Unix socket, mode 0600 in a directory of
//! mode 0700, both root's: only root may ask. The protocol is one request line
//! (`status`, `reconnect` or `reapply`) and one JSON line back, then the agent
//! closes the connection.
//!
//! `status` answers with everything the console shows, in sections: the agent,
//! the link, the policy engine's status (as `GET /api/infrastructure/status` shows
//! it, passed on whole so fields added there appear here unchanged) and nlbwmon.
//! [`render`] prints any such answer for a person without knowing its fields.

use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;
use tokio::net::UnixListener;

use crate::app::App;
use crate::config::ControlVerb;
use crate::runtime::shutdown::{self, Shutdown};

/// Requests are a word; anything longer is not one of ours.
const MAX_REQUEST: usize = 64;
/// A client that says nothing is dropped after this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes the socket's directory (0700) if needed, removes a socket left by an agent
/// that died and binds a new one (0600). A socket some other process still answers
/// on is left alone: that agent keeps it.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another agent answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until shutdown, then removes the socket.
pub async fn serve(listener: UnixListener, path: PathBuf, app: Arc<App>, mut stop: Shutdown) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown::stopped(&mut stop) => break,
        };
        // One at a time: requests are rare and short (a reapply is the longest).
        if let Err(e) = answer(stream, &app).await {
            tracing::debug!(error = %e, "control request failed");
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(mut stream: tokio::net::UnixStream, app: &App) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt as _;
    // One short line: read until its newline, at most MAX_REQUEST bytes.
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    let read = async {
        while len < buf.len() && !buf[..len].contains(&b'\n') {
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                break;
            }
            len += n;
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let word = std::str::from_utf8(&buf[..len]).unwrap_or("").trim();
    let mut out = match ControlVerb::parse(word) {
        Some(verb) => handle(verb, app).await,
        None => refusal(format!("unknown request {word:?}")),
    };
    out.push('\n');
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

#[derive(Serialize)]
struct Refusal {
    ok: bool,
    error: String,
}

fn refusal(error: String) -> String {
    to_json(&Refusal { ok: false, error })
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
}

#[derive(Serialize)]
struct Reconnected {
    ok: bool,
    link_was_up: bool,
}

#[derive(Serialize)]
struct Reapplied {
    ok: bool,
    drift_repaired: Vec<String>,
}

/// The answer to `status`: one object per section.
#[derive(Serialize)]
struct StatusAnswer {
    ok: bool,
    agent: AgentSection,
    link: LinkSection,
    /// The engine's status as `GET /api/infrastructure/status` shows it.
    policy: crate::policy::engine::Status,
    /// fw4's flow offloading, as `GET /api/infrastructure/status` shows it.
    offloading: crate::offload::OffloadStatus,
    nlbwmon: NlbwmonSection,
}

#[derive(Serialize)]
struct AgentSection {
    version: &'static str,
    router_id: String,
    mode: &'static str,
    uptime_s: u64,
    starts: u64,
    clock_unset: bool,
}

#[derive(Serialize)]
struct LinkSection {
    relay: String,
    connected: bool,
    connected_since_unix: Option<u64>,
    connects: u64,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct NlbwmonSection {
    installed: bool,
    running: bool,
    error: Option<String>,
    current_period: Option<String>,
}

async fn handle(verb: ControlVerb, app: &App) -> String {
    match verb {
        ControlVerb::Status => to_json(&status(app).await),
        ControlVerb::Reconnect => {
            let link_was_up = app.link.get().connected_since.is_some();
            app.link.redial();
            to_json(&Reconnected {
                ok: true,
                link_was_up,
            })
        }
        ControlVerb::Reapply => match app.policy.reconcile("reapply").await {
            Ok(drift_repaired) => to_json(&Reapplied {
                ok: true,
                drift_repaired,
            }),
            Err(e) => refusal(e.to_string()),
        },
    }
}

fn unix(t: Option<SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
}

async fn status(app: &App) -> StatusAnswer {
    let health = crate::api::health::health(app);
    let link = app.link.get();
    let usage = app.usage.status().await;
    StatusAnswer {
        ok: true,
        agent: AgentSection {
            version: health.agent_version,
            router_id: health.router_id,
            mode: health.mode,
            uptime_s: health.agent_uptime_s,
            starts: health.agent_starts,
            clock_unset: health.clock_unset,
        },
        link: LinkSection {
            // The relay in use (or being tried), not the first of the list.
            relay: format!("https://{}", app.relays.get(app.relays.current()).authority),
            connected: link.connected_since.is_some(),
            connected_since_unix: unix(link.connected_since),
            connects: link.connects,
            last_error: link.last_error,
        },
        policy: app.policy.status(),
        offloading: app.offload.status(),
        nlbwmon: NlbwmonSection {
            installed: usage.installed,
            running: usage.running,
            error: usage.error,
            current_period: usage.current_period,
        },
    }
}

/// Why a request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the agent is not running (no control socket at {0})")]
    Missing(PathBuf),
    #[error("the agent is not running (nothing answers on {0})")]
    Refused(PathBuf),
    #[error("permission denied on {0}: run this as root")]
    Denied(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's answer is not JSON: {0}")]
    Answer(String),
}

/// Asks the running agent once and returns its JSON answer. Blocking: the
/// subcommands that use it have nothing else to do meanwhile.
pub fn request(path: &Path, verb: ControlVerb, timeout: Duration) -> Result<Value, ClientError> {
    use std::io::ErrorKind::{ConnectionRefused, NotFound, PermissionDenied};
    let io = |source: std::io::Error| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                NotFound => ClientError::Missing(path.to_owned()),
                ConnectionRefused => ClientError::Refused(path.to_owned()),
                PermissionDenied => ClientError::Denied(path.to_owned()),
                _ => io(e),
            })
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    writeln!(stream, "{}", verb.as_str()).map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io)?;
    serde_json::from_str(&line).map_err(|_| ClientError::Answer(line))
}

/// A status (or any) answer for a person: one block per section, one `key: value`
/// line per field, nested objects flattened with dots, `*_unix` times also shown
/// as how long ago. Knows no field names, so new ones show up as they are.
pub fn render(answer: &Value, now_unix: u64) -> String {
    let mut out = String::new();
    let Some(sections) = answer.as_object() else {
        return format!("{answer}\n");
    };
    let mut plain = Vec::new();
    for (name, value) in sections {
        if name == "ok" {
            continue;
        }
        match value {
            Value::Object(_) => {
                out.push_str(&format!("{name}:\n"));
                let mut lines = Vec::new();
                flatten("", value, &mut lines);
                for (k, v) in lines {
                    out.push_str(&format!("  {k}: {}\n", shown(&k, &v, now_unix)));
                }
            }
            other => plain.push((name.clone(), other.clone())),
        }
    }
    for (k, v) in plain {
        out.push_str(&format!("{k}: {}\n", shown(&k, &v, now_unix)));
    }
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

fn shown(key: &str, v: &Value, now: u64) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "none".into(),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join("; "),
        Value::Number(n) if key.ends_with("_unix") => match n.as_u64() {
            Some(t) if t <= now => format!("{t} ({} ago)", ago(now - t)),
            Some(t) => format!("{t} (in {})", ago(t - now)),
            None => n.to_string(),
        },
        other => other.to_string(),
    }
}

fn ago(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn render_shows_every_field_by_section_without_knowing_them() {
        let answer = json!({
            "ok": true,
            "agent": {"version": "1.2.3", "router_id": "r1"},
            "link": {"connected": true, "connected_since_unix": 1000, "last_error": null},
            "policy": {"drift": [], "last_drift": ["chain x missing", "set y"],
                       "fw4": {"live_copy": true}, "a_new_field": 7},
        });
        let text = render(&answer, 1090);
        for line in [
            "agent:\n",
            "  version: 1.2.3\n",
            "link:\n",
            "  connected: true\n",
            "  connected_since_unix: 1000 (90s ago)\n",
            "  last_error: -\n",
            "  drift: none\n",
            "  last_drift: chain x missing; set y\n",
            "  fw4.live_copy: true\n",
            "  a_new_field: 7\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(!text.contains("ok:"), "{text}");
    }

    #[test]
    fn a_missing_socket_says_the_agent_is_not_running() {
        let path = std::env::temp_dir().join(format!("np-ctl-missing-{}", std::process::id()));
        let e = request(&path, ControlVerb::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::Missing(_)), "{e}");
        assert!(e.to_string().contains("not running"), "{e}");
    }
}
