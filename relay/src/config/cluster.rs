//! `[cluster]`: the settings that make a relay one node of many (issue 16). Without
//! the section the relay is a single node on SQLite with sessions in memory; with it,
//! the registry lives in PostgreSQL, sessions and the link directory in Redis, and
//! peers forward calls to each other over an internal listener.
//!
//! Secrets (database URLs carry passwords, the node-to-node secret) come from the
//! environment or from files other users cannot read, never only from a world-
//! readable config file line: `*_file` keys and `NETPILOT_*` variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{duration, read_secret_file, ConfigError, Secret};

/// Environment variables, each beating its config-file key.
pub const ENV_NODE_ID: &str = "NETPILOT_NODE_ID";
pub const ENV_POSTGRES_URL: &str = "NETPILOT_POSTGRES_URL";
pub const ENV_REDIS_URL: &str = "NETPILOT_REDIS_URL";
pub const ENV_CLUSTER_SECRET: &str = "NETPILOT_CLUSTER_SECRET";

/// Shortest node-to-node secret accepted: it is the only thing between the internal
/// listener and every router's link.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Unique among the nodes; names this node in the link directory and logs.
    pub node_id: String,
    pub postgres_url: Secret,
    pub redis_url: Secret,
    /// Where this node listens for calls forwarded by its peers.
    pub internal_listen: SocketAddr,
    /// What peers dial to reach `internal_listen` (differs behind NAT or with a
    /// wildcard listen address).
    pub internal_address: SocketAddr,
    /// Shared by all nodes: a peer's forwarded call carries it.
    pub secret: Secret,
    /// How often this node renews its presence in Redis ...
    pub heartbeat: Duration,
    /// ... and how long the presence lasts without renewal: a node silent this long
    /// is dead to its peers, and calls for its routers answer `ROUTER_OFFLINE`.
    pub node_ttl: Duration,
    /// One Redis command, at most; past it the call fails with `CLUSTER_UNAVAILABLE`.
    pub redis_timeout: Duration,
    /// One PostgreSQL statement, at most.
    pub postgres_timeout: Duration,
    /// Dialing a peer's internal listener; past it, `ROUTER_UNREACHABLE`.
    pub peer_connect_timeout: Duration,
    /// How often the router cache re-reads what changed in PostgreSQL: the safety
    /// net under the change broadcast (a node that missed a message catches up).
    pub registry_poll: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileCluster {
    node_id: Option<String>,
    postgres_url: Option<String>,
    postgres_url_file: Option<PathBuf>,
    redis_url: Option<String>,
    redis_url_file: Option<PathBuf>,
    internal_listen: Option<String>,
    internal_address: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    heartbeat: Option<String>,
    node_ttl: Option<String>,
    redis_timeout: Option<String>,
    postgres_timeout: Option<String>,
    peer_connect_timeout: Option<String>,
    registry_poll: Option<String>,
}

type ReadSecret<'a> = &'a dyn Fn(&Path, &str) -> Result<Secret, ConfigError>;

impl ClusterConfig {
    /// The cluster settings, or `None` for a single node. Cluster mode is on when
    /// the `[cluster]` section or any `NETPILOT_*` cluster variable is present.
    pub(crate) fn resolve(
        file: Option<FileCluster>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<ClusterConfig>, ConfigError> {
        Self::resolve_with(file, env, &read_secret_file)
    }

    fn resolve_with(
        file: Option<FileCluster>,
        env: &dyn Fn(&str) -> Option<String>,
        read: ReadSecret<'_>,
    ) -> Result<Option<ClusterConfig>, ConfigError> {
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        let any_env = [
            ENV_NODE_ID,
            ENV_POSTGRES_URL,
            ENV_REDIS_URL,
            ENV_CLUSTER_SECRET,
        ]
        .iter()
        .any(|k| env(k).is_some());
        let f = match file {
            Some(f) => f,
            None if any_env => FileCluster::default(),
            None => return Ok(None),
        };
        let missing = |what: &str| {
            ConfigError::Invalid(format!(
                "cluster mode needs {what} (see the README, \"Running a cluster\")"
            ))
        };
        let node_id = env(ENV_NODE_ID)
            .or(f.node_id)
            .ok_or_else(|| missing("cluster.node_id or NETPILOT_NODE_ID"))?;
        if node_id.is_empty()
            || node_id.len() > 64
            || !node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ConfigError::Invalid(format!(
                "cluster.node_id {node_id:?} must be 1..64 of A-Z a-z 0-9 - _ ."
            )));
        }
        let postgres_url = pick_secret(
            env(ENV_POSTGRES_URL),
            f.postgres_url,
            f.postgres_url_file,
            "cluster.postgres_url",
            read,
        )?
        .ok_or_else(|| missing("cluster.postgres_url_file or NETPILOT_POSTGRES_URL"))?;
        let redis_url = pick_secret(
            env(ENV_REDIS_URL),
            f.redis_url,
            f.redis_url_file,
            "cluster.redis_url",
            read,
        )?
        .ok_or_else(|| missing("cluster.redis_url_file or NETPILOT_REDIS_URL"))?;
        let secret = pick_secret(
            env(ENV_CLUSTER_SECRET),
            f.secret,
            f.secret_file,
            "cluster.secret",
            read,
        )?
        .ok_or_else(|| missing("cluster.secret_file or NETPILOT_CLUSTER_SECRET"))?;
        if secret.expose().len() < MIN_SECRET_LEN {
            return Err(ConfigError::Invalid(format!(
                "the cluster secret must be at least {MIN_SECRET_LEN} characters"
            )));
        }
        let internal_listen = socket_addr(
            "cluster.internal_listen",
            Some(
                f.internal_listen
                    .ok_or_else(|| missing("cluster.internal_listen"))?,
            ),
        )?
        .expect("given");
        let internal_address =
            socket_addr("cluster.internal_address", f.internal_address)?.unwrap_or(internal_listen);
        if internal_address.ip().is_unspecified() {
            return Err(ConfigError::Invalid(format!(
                "cluster.internal_listen is {internal_listen}: set cluster.internal_address \
                 to the address peers dial"
            )));
        }
        let heartbeat = duration("cluster.heartbeat", f.heartbeat, Duration::from_secs(2))?;
        let node_ttl = duration("cluster.node_ttl", f.node_ttl, Duration::from_secs(10))?;
        if node_ttl < heartbeat * 2 {
            return Err(ConfigError::Invalid(
                "cluster.node_ttl must be at least twice cluster.heartbeat".into(),
            ));
        }
        Ok(Some(ClusterConfig {
            node_id,
            postgres_url,
            redis_url,
            internal_listen,
            internal_address,
            secret,
            heartbeat,
            node_ttl,
            redis_timeout: duration(
                "cluster.redis_timeout",
                f.redis_timeout,
                Duration::from_secs(1),
            )?,
            postgres_timeout: duration(
                "cluster.postgres_timeout",
                f.postgres_timeout,
                Duration::from_secs(3),
            )?,
            peer_connect_timeout: duration(
                "cluster.peer_connect_timeout",
                f.peer_connect_timeout,
                Duration::from_secs(1),
            )?,
            registry_poll: duration(
                "cluster.registry_poll",
                f.registry_poll,
                Duration::from_secs(5),
            )?,
        }))
    }
}

/// The environment, then the file's inline value, then its `_file`; inline and
/// file together are refused (which one was meant?).
fn pick_secret(
    env: Option<String>,
    inline: Option<String>,
    file: Option<PathBuf>,
    key: &str,
    read: ReadSecret<'_>,
) -> Result<Option<Secret>, ConfigError> {
    if let Some(v) = env {
        return Ok(Some(Secret::new(v)));
    }
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
            "set {key} or {key}_file, not both"
        ))),
        (Some(v), None) => Ok(Some(Secret::new(v))),
        (None, Some(p)) => read(&p, key).map(Some),
        (None, None) => Ok(None),
    }
}

fn socket_addr(key: &str, text: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    text.map(|t| {
        t.parse()
            .map_err(|_| ConfigError::Invalid(format!("{key} {t:?} is not ADDR:PORT")))
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn file() -> FileCluster {
        FileCluster {
            node_id: Some("a".into()),
            postgres_url: Some("postgres://u@h/db".into()),
            redis_url: Some("redis://h/0".into()),
            internal_listen: Some("10.0.0.1:8444".into()),
            secret: Some(SECRET.into()),
            ..FileCluster::default()
        }
    }

    fn resolve(
        f: Option<FileCluster>,
        env: &[(&str, &str)],
    ) -> Result<Option<ClusterConfig>, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let read = |p: &Path, _: &str| Ok(Secret::new(format!("from {} {SECRET}", p.display())));
        ClusterConfig::resolve_with(f, &|k| env.get(k).cloned(), &read)
    }

    #[test]
    fn absent_means_single_node() {
        assert!(resolve(None, &[]).unwrap().is_none());
    }

    #[test]
    fn defaults_and_environment_precedence() {
        let c = resolve(Some(file()), &[(ENV_REDIS_URL, "redis://env/1")])
            .unwrap()
            .unwrap();
        assert_eq!(c.node_id, "a");
        assert_eq!(c.redis_url.expose(), "redis://env/1");
        assert_eq!(c.postgres_url.expose(), "postgres://u@h/db");
        assert_eq!(c.internal_address, c.internal_listen);
        assert_eq!(c.heartbeat, Duration::from_secs(2));
        assert_eq!(c.node_ttl, Duration::from_secs(10));
    }

    #[test]
    fn environment_alone_turns_cluster_mode_on_and_names_what_is_missing() {
        let err = resolve(None, &[(ENV_NODE_ID, "b")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres_url"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        let cases: Vec<(FileCluster, &str)> = vec![
            (
                FileCluster {
                    node_id: Some("a b".into()),
                    ..file()
                },
                "node_id",
            ),
            (
                FileCluster {
                    secret: Some("short".into()),
                    ..file()
                },
                "at least 32",
            ),
            (
                FileCluster {
                    internal_listen: Some("0.0.0.0:8444".into()),
                    ..file()
                },
                "internal_address",
            ),
            (
                FileCluster {
                    secret_file: Some("/x".into()),
                    ..file()
                },
                "not both",
            ),
            (
                FileCluster {
                    heartbeat: Some("6s".into()),
                    ..file()
                },
                "node_ttl",
            ),
        ];
        for (f, want) in cases {
            let err = resolve(Some(f), &[]).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }

    #[test]
    fn secrets_come_from_files() {
        let c = resolve(
            Some(FileCluster {
                secret: None,
                secret_file: Some("/etc/s".into()),
                ..file()
            }),
            &[],
        )
        .unwrap()
        .unwrap();
        assert!(c.secret.expose().starts_with("from /etc/s "));
    }
}
