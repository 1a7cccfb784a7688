//! Agent configuration: a TOML file with comments (SPEC §1 item 14), every key also a flag.
//!
//! Precedence: command-line flag > config file > built-in default. Unknown keys in the file
//! are an error (a typo must not silently fall back to a default).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Default NBD port: the IANA-assigned one.
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7800";
pub const DEFAULT_PEER_LISTEN: &str = "127.0.0.1:7801";
pub const DEFAULT_DATA_DIR: &str = "./blockwarden-data";

/// The file as written by an operator; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub node_name: Option<String>,
    pub nbd_listen: Option<String>,
    pub api_listen: Option<String>,
    pub peer_listen: Option<String>,
    pub etcd: Option<Vec<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `error`, `warn`, `info` (default) or `debug`.
    pub log_level: Option<String>,
    /// Unix socket for NBD; default `<data_dir>/nbd.sock`.
    pub nbd_socket: Option<PathBuf>,
    /// Commands run for every event of warning level or higher (C5 hooks).
    #[serde(default)]
    pub alert_command: Option<String>,
    /// Session lease TTL, e.g. "8s" (see `--lease-ttl`).
    pub lease_ttl: Option<String>,
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub node_name: String,
    pub nbd_listen: SocketAddr,
    pub api_listen: SocketAddr,
    /// Listened on in cluster mode only (C2); validated now so a bad value fails early.
    #[allow(dead_code)]
    pub peer_listen: SocketAddr,
    pub nbd_socket: PathBuf,
    pub etcd: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub log_level: log::LevelFilter,
    pub alert_command: Option<String>,
    /// TTL of the node's session lease: a dead node's volumes can be taken over about this
    /// long after its death; a node cut off from the store stops I/O 2 s before it ends.
    pub lease_ttl: std::time::Duration,
}

/// Flags as parsed from the command line (all optional, so the file can supply them).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AgentFlags {
    /// TOML config file (comments allowed); flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the catalog and volume files [default: ./blockwarden-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Human name of this node [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// NBD listen address [default: 127.0.0.1:10809].
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Option<String>,
    /// HTTP API listen address [default: 127.0.0.1:7800].
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// Peer (replication) listen address [default: 127.0.0.1:7801]; used in cluster mode.
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<String>,
    /// etcd endpoints (comma-separated): join a cluster instead of running embedded.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Node label KEY=VALUE (repeatable), e.g. room=a.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Log level: error, warn, info, debug.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Command run (via sh -c) for every event of warning level or higher; the event is
    /// on stdin as JSON and in BLOCKWARDEN_EVENT_* variables.
    #[arg(long, value_name = "COMMAND")]
    pub alert_command: Option<String>,
    /// Session lease TTL (cluster mode): takeover after a node dies takes about this long;
    /// below 5s every etcd leader election risks a spurious failover [default: 8s].
    #[arg(long, value_name = "DURATION")]
    pub lease_ttl: Option<String>,
}

impl AgentConfig {
    /// Merges flags over the config file over defaults, validating every value.
    pub fn resolve(flags: &AgentFlags) -> Result<AgentConfig> {
        let file = match &flags.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let data_dir = flags
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let node_name = match flags.node_name.clone().or(file.node_name) {
            Some(n) => n,
            None => default_node_name(),
        };
        bw_types::Name::new(&node_name)
            .with_context(|| format!("invalid node name {node_name:?}"))?;
        let addr = |flag: &Option<String>, file: Option<String>, default: &str, what: &str| {
            let s = flag.clone().or(file).unwrap_or_else(|| default.to_owned());
            parse_addr(&s).with_context(|| format!("invalid {what} address {s:?}"))
        };
        let nbd_listen = addr(
            &flags.nbd_listen,
            file.nbd_listen,
            DEFAULT_NBD_LISTEN,
            "NBD listen",
        )?;
        let api_listen = addr(
            &flags.api_listen,
            file.api_listen,
            DEFAULT_API_LISTEN,
            "API listen",
        )?;
        let peer_listen = addr(
            &flags.peer_listen,
            file.peer_listen,
            DEFAULT_PEER_LISTEN,
            "peer listen",
        )?;
        let mut labels = file.labels;
        for l in &flags.labels {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("label {l:?} is not KEY=VALUE"))?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        for (k, v) in &labels {
            if k.is_empty() || k.len() > 63 || v.len() > 63 || !label_ok(k) || !label_ok(v) {
                bail!(
                    "label {k:?}={v:?}: keys and values are 1-63 characters of a-z A-Z 0-9 . _ -"
                );
            }
        }
        let etcd = if flags.etcd.is_empty() {
            file.etcd.unwrap_or_default()
        } else {
            flags.etcd.clone()
        };
        let level = flags
            .log_level
            .clone()
            .or(file.log_level)
            .unwrap_or_else(|| "info".into());
        let log_level = match level.as_str() {
            "error" => log::LevelFilter::Error,
            "warn" => log::LevelFilter::Warn,
            "info" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            other => bail!("invalid log level {other:?}: use error, warn, info or debug"),
        };
        let nbd_socket = file.nbd_socket.unwrap_or_else(|| data_dir.join("nbd.sock"));
        let ttl_text = flags
            .lease_ttl
            .clone()
            .or(file.lease_ttl)
            .unwrap_or_else(|| "8s".into());
        let lease_ttl =
            parse_duration(&ttl_text).with_context(|| format!("invalid lease TTL {ttl_text:?}"))?;
        if lease_ttl < std::time::Duration::from_secs(3)
            || lease_ttl > std::time::Duration::from_secs(600)
        {
            bail!("lease TTL {ttl_text} is out of range: use 3s to 600s (8s is the default; below 5s elections cause spurious failovers)");
        }
        Ok(AgentConfig {
            data_dir,
            node_name,
            nbd_listen,
            api_listen,
            peer_listen,
            nbd_socket,
            etcd,
            labels,
            log_level,
            alert_command: flags.alert_command.clone().or(file.alert_command),
            lease_ttl,
        })
    }
}

fn label_ok(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn load_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// Parses `8s`, `1500ms`, `2m`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("expected a number with s, ms or m"))?;
    Ok(match unit {
        "" | "s" => std::time::Duration::from_secs(n),
        "ms" => std::time::Duration::from_millis(n),
        "m" => std::time::Duration::from_secs(n * 60),
        _ => bail!("unknown unit {unit:?}: use ms, s or m"),
    })
}

/// Accepts `host:port`, `:port` (all interfaces) and `localhost:port`.
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    let s = s.trim();
    let full = if let Some(port) = s.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if let Some(port) = s.strip_prefix("localhost:") {
        format!("127.0.0.1:{port}")
    } else {
        s.to_owned()
    };
    full.parse()
        .map_err(|_| anyhow::anyhow!("expected IP:PORT"))
}

/// The host name, lower-cased and reduced to the name grammar; `node` if nothing usable.
fn default_node_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut n: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    n.truncate(63);
    if bw_types::Name::new(&n).is_ok() {
        n
    } else {
        "node".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: flags beat the file, the file beats defaults, bad values and unknown keys fail.
    #[test]
    fn precedence_and_validation() {
        let dir = std::env::temp_dir().join(format!("bw-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(
            &path,
            "# comment\nnode_name = \"from-file\"\napi_listen = \"127.0.0.1:9000\"\n[labels]\nroom = \"a\"\n",
        )
        .unwrap();
        let flags = AgentFlags {
            config: Some(path.clone()),
            node_name: Some("from-flag".into()),
            labels: vec!["rack=3".into()],
            ..Default::default()
        };
        let c = AgentConfig::resolve(&flags).unwrap();
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.nbd_listen.to_string(), DEFAULT_NBD_LISTEN);
        assert_eq!(c.labels.get("room").map(String::as_str), Some("a"));
        assert_eq!(c.labels.get("rack").map(String::as_str), Some("3"));

        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        let e = AgentConfig::resolve(&AgentFlags {
            config: Some(path.clone()),
            ..Default::default()
        });
        assert!(format!("{:#}", e.unwrap_err()).contains("no_such_key"));

        let bad = AgentFlags {
            nbd_listen: Some("nope".into()),
            ..Default::default()
        };
        assert!(format!("{:#}", AgentConfig::resolve(&bad).unwrap_err()).contains("NBD listen"));
        let bad = AgentFlags {
            node_name: Some("Bad Name".into()),
            ..Default::default()
        };
        assert!(AgentConfig::resolve(&bad).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
