//! `[state]` and `[cluster]`: where the shared state lives and how nodes of one cluster share
//! work. Pure like the rest of `validate`: the URL's environment variable and the host name
//! are read when the gateway starts, not here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{expand_home, invalid, parse_duration, ConfigError};

/// `[state]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    kind: Option<String>,
    /// SQLite only: the state file (default `<data_dir>/state.sqlite`).
    path: Option<PathBuf>,
    url: Option<String>,
    url_env: Option<String>,
    ca_file: Option<PathBuf>,
    pool_size: Option<usize>,
}

/// `[cluster]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    node_id: Option<String>,
    lease: Option<String>,
    drain: Option<String>,
}

/// Where the gateway keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateConfig {
    /// One node: a SQLite file.
    Sqlite(PathBuf),
    /// A cluster: a shared PostgreSQL database.
    Postgres(PgStateConfig),
}

/// `[state] kind = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgStateConfig {
    pub url: UrlSource,
    /// The CA that issues the state server's certificate; TLS (verify-full) is required
    /// when set.
    pub ca_file: Option<PathBuf>,
    /// Connections this node keeps to the state server.
    pub pool_size: usize,
}

/// A connection URL, given inline or named by an environment variable (it holds a password).
#[derive(Clone, PartialEq, Eq)]
pub enum UrlSource {
    Inline(String),
    Env(String),
}

impl std::fmt::Debug for UrlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            UrlSource::Env(v) => write!(f, "Env({v})"),
        }
    }
}

impl UrlSource {
    /// The URL itself: the inline text, or the environment variable's value.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            UrlSource::Inline(u) => Ok(u.clone()),
            UrlSource::Env(v) => match std::env::var(v) {
                Ok(u) if !u.trim().is_empty() => Ok(u),
                _ => Err(format!(
                    "state.url_env: the environment variable {v} is not set"
                )),
            },
        }
    }
}

/// How this node takes part in a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's name; `None` means `$BREAKGLASS_NODE_ID`, else the host name.
    pub node_id: Option<String>,
    /// How long a node's lease lasts without renewal. A node whose lease lapsed is taken for
    /// dead: another node seals its open sessions. Renewed every third of it.
    pub lease: Duration,
    /// On SIGTERM in a cluster: how long live sessions are given, after being told the node
    /// is going away, before they are ended (a single node ends them at once).
    pub drain: Duration,
}

impl ClusterConfig {
    /// This node's id: the configured one, else `$BREAKGLASS_NODE_ID`, else the host name.
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        if let Ok(id) = std::env::var("BREAKGLASS_NODE_ID") {
            if valid_node_id(&id) {
                return id;
            }
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| valid_node_id(h))
            .unwrap_or_else(|| "node".to_string())
    }
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) fn state(raw: RawState, data_dir: &Path) -> Result<StateConfig, ConfigError> {
    match raw.kind.as_deref().unwrap_or("sqlite") {
        "sqlite" => {
            for (set, key) in [
                (raw.url.is_some(), "state.url"),
                (raw.url_env.is_some(), "state.url_env"),
                (raw.ca_file.is_some(), "state.ca_file"),
                (raw.pool_size.is_some(), "state.pool_size"),
            ] {
                if set {
                    return Err(invalid(key, "only for kind = \"postgres\""));
                }
            }
            Ok(StateConfig::Sqlite(
                raw.path
                    .map(|p| expand_home(&p))
                    .unwrap_or_else(|| data_dir.join("state.sqlite")),
            ))
        }
        "postgres" => {
            if raw.path.is_some() {
                return Err(invalid("state.path", "only for kind = \"sqlite\""));
            }
            let url = match (raw.url, raw.url_env) {
                (Some(u), None) => {
                    if u.trim().is_empty() {
                        return Err(invalid("state.url", "is empty"));
                    }
                    UrlSource::Inline(u)
                }
                (None, Some(v)) => {
                    if v.trim().is_empty() {
                        return Err(invalid("state.url_env", "is empty"));
                    }
                    UrlSource::Env(v)
                }
                (Some(_), Some(_)) => {
                    return Err(invalid("state.url_env", "set url or url_env, not both"))
                }
                (None, None) => {
                    return Err(invalid(
                        "state.url",
                        "kind = \"postgres\" needs url or url_env",
                    ))
                }
            };
            let pool_size = raw.pool_size.unwrap_or(8);
            if !(1..=256).contains(&pool_size) {
                return Err(invalid("state.pool_size", "must be between 1 and 256"));
            }
            Ok(StateConfig::Postgres(PgStateConfig {
                url,
                ca_file: raw.ca_file.map(|p| expand_home(&p)),
                pool_size,
            }))
        }
        other => Err(invalid(
            "state.kind",
            format!("`{other}` is not one of \"sqlite\", \"postgres\""),
        )),
    }
}

pub(super) fn cluster(raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
    if let Some(id) = &raw.node_id {
        if !valid_node_id(id) {
            return Err(invalid(
                "cluster.node_id",
                "1 to 64 characters of letters, digits, `-`, `_` and `.`",
            ));
        }
    }
    let lease = parse_duration("cluster.lease", raw.lease.as_deref().unwrap_or("10s"))?;
    if lease < Duration::from_secs(3) || lease > Duration::from_secs(600) {
        return Err(invalid("cluster.lease", "must be between 3s and 10m"));
    }
    let drain = parse_duration("cluster.drain", raw.drain.as_deref().unwrap_or("10s"))?;
    if drain > Duration::from_secs(3600) {
        return Err(invalid("cluster.drain", "must be at most 1h"));
    }
    Ok(ClusterConfig {
        node_id: raw.node_id,
        lease,
        drain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_state(toml: &str) -> RawState {
        toml::from_str(toml).expect("toml")
    }

    #[test]
    fn state_kinds_parse_and_misplaced_keys_are_refused() {
        let d = Path::new("/d");
        assert_eq!(
            state(RawState::default(), d).expect("default"),
            StateConfig::Sqlite(PathBuf::from("/d/state.sqlite"))
        );
        let pg = state(
            raw_state("kind = \"postgres\"\nurl_env = \"U\"\nca_file = \"/ca\""),
            d,
        )
        .expect("pg");
        assert_eq!(
            pg,
            StateConfig::Postgres(PgStateConfig {
                url: UrlSource::Env("U".into()),
                ca_file: Some(PathBuf::from("/ca")),
                pool_size: 8
            })
        );
        for (text, key) in [
            ("url = \"postgres://x\"", "state.url"),
            ("kind = \"postgres\"", "state.url"),
            (
                "kind = \"postgres\"\nurl = \"a\"\nurl_env = \"B\"",
                "state.url_env",
            ),
            (
                "kind = \"postgres\"\nurl = \"a\"\npool_size = 0",
                "state.pool_size",
            ),
            (
                "kind = \"postgres\"\nurl = \"a\"\npath = \"/x\"",
                "state.path",
            ),
            ("kind = \"mysql\"", "state.kind"),
        ] {
            match state(raw_state(text), d) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_inline_url_never_reaches_debug_output() {
        let u = UrlSource::Inline("postgres://u:hunter2@h/db".into());
        assert!(!format!("{u:?}").contains("hunter2"));
    }

    #[test]
    fn cluster_lease_and_node_id_are_checked() {
        let c = cluster(RawCluster::default()).expect("default");
        assert_eq!(c.lease, Duration::from_secs(10));
        assert!(valid_node_id(&c.node_id()), "{}", c.node_id());
        let named = cluster(RawCluster {
            node_id: Some("gw-a".into()),
            lease: Some("30s".into()),
            drain: None,
        })
        .expect("named");
        assert_eq!(named.node_id(), "gw-a");
        for bad in [
            RawCluster {
                node_id: Some("a b".into()),
                ..RawCluster::default()
            },
            RawCluster {
                lease: Some("1s".into()),
                ..RawCluster::default()
            },
        ] {
            assert!(cluster(bad).is_err());
        }
    }
}
