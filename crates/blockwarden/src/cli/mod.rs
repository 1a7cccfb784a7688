//! The command-line client: every command is one or two HTTP calls to an agent's API
//! ([`api::Client`]), rendered as a table for humans or JSON for scripts (`-o json`).
//! Errors print one line, `error: …`, and exit non-zero (1 for a refused request, 2 for
//! usage errors, 3 when the agent cannot be reached).

pub mod replicas;
pub mod table;

use std::io::Write as _;

use anyhow::Result;
use api::{
    AddReplica, Client, ClientError, CreateVolume, EventView, NodeView, VolumeSettings, VolumeView,
};
use bw_types::{format_size, parse_size, Name};
use clap::{Subcommand, ValueEnum};

use crate::logging::{format_utc_ms, now_ms};
use table::{format_age_ms, Table};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Size: bytes, or with K, M, G, T (powers of 1024).
        #[arg(long)]
        size: String,
        #[arg(long)]
        replicas: Option<u32>,
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Failure-domain label the replicas must differ in (e.g. room).
        #[arg(long)]
        spread: Option<String>,
        /// Place a replica on this node (repeatable).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Fewest in-sync replicas that still accept writes (1..=replicas; default 1).
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
        min_in_sync: Option<u32>,
        /// Resync rate per second, e.g. 100M; 0 = unthrottled.
        #[arg(long, value_name = "RATE")]
        resync_rate: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// List volumes.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one volume.
    Show {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Grow a volume (shrinking is refused).
    Resize {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Delete a volume (refused while in use unless --force).
    Delete {
        name: String,
        /// Disconnect its NBD clients and drop its attachment first.
        #[arg(long)]
        force: bool,
    },
    /// Attach a volume on a node; prints its NBD URI.
    Attach {
        name: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Release an explicit attachment.
    Detach { name: String },
    /// Add a replica on a node; it is filled by a background copy while the volume stays in use.
    AddReplica {
        name: String,
        /// Node to hold the new replica.
        #[arg(long)]
        node: String,
        /// Rate of the initial copy per second, e.g. 100M; 0 = unthrottled (default: the
        /// volume's resync rate).
        #[arg(long, value_name = "RATE")]
        resync_rate: Option<String>,
        /// Wait until the new replica is in sync, showing progress on stderr.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 90s, 30m); the copy goes on.
        #[arg(long, value_name = "DURATION", requires = "wait")]
        timeout: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Remove a volume's replica from a node.
    RemoveReplica {
        name: String,
        #[arg(long)]
        node: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Change a volume's settings.
    Set {
        name: String,
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Resync rate per second, e.g. 100M; 0 = unthrottled.
        #[arg(long, value_name = "RATE")]
        resync_rate: Option<String>,
        /// Fewest in-sync replicas that still accept writes (1..=replicas).
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
        min_in_sync: Option<u32>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Sync,
    Async,
}

impl From<ModeArg> for api::Mode {
    fn from(m: ModeArg) -> api::Mode {
        match m {
            ModeArg::Sync => api::Mode::Sync,
            ModeArg::Async => api::Mode::Async,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

/// A failed command: its message and exit code.
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = if e.api_error().is_some() { 1 } else { 3 };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure {
            code: 1,
            message: format!("{e:#}"),
        }
    }
}

fn usage(message: String) -> Failure {
    Failure { code: 2, message }
}

fn size_arg(s: &str) -> Result<u64, Failure> {
    parse_size(s).map_err(|e| usage(format!("invalid --size {s:?}: {e}")))
}

fn name_arg(s: &str) -> Result<Name, Failure> {
    Name::new(s).map_err(|e| usage(format!("invalid name {s:?}: {e}")))
}

fn node_arg(s: &str) -> Result<Name, Failure> {
    Name::new(s).map_err(|e| usage(format!("invalid --node {s:?}: {e}")))
}

/// A rate per second: a size (`100M`, plain bytes), optionally written `100M/s`; 0 means
/// unthrottled.
fn rate_arg(s: &str) -> Result<u64, Failure> {
    parse_size(s.trim_end_matches("/s"))
        .map_err(|e| usage(format!("invalid --resync-rate {s:?}: {e}")))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Failure {
        code: 1,
        message: e.to_string(),
    })?;
    println!("{s}");
    Ok(())
}

pub async fn volume(client: &Client, cmd: VolumeCmd) -> Result<(), Failure> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            replicas,
            mode,
            spread,
            nodes,
            min_in_sync,
            resync_rate,
            output,
        } => {
            let req = CreateVolume {
                name: name_arg(&name)?,
                size_bytes: size_arg(&size)?,
                replicas,
                mode: mode.map(Into::into),
                spread,
                nodes: nodes
                    .iter()
                    .map(|n| node_arg(n))
                    .collect::<Result<_, _>>()?,
                min_in_sync,
                resync_rate_bytes_per_s: resync_rate.as_deref().map(rate_arg).transpose()?,
            };
            let v = client.create_volume(&req).await?;
            match output {
                Output::Json => print_json(&v)?,
                Output::Table => println!(
                    "volume {} created: {}, {} replica(s)",
                    v.name,
                    format_size(v.size_bytes),
                    v.replicas
                ),
            }
        }
        VolumeCmd::List { output } => {
            let vs = client.list_volumes().await?;
            match output {
                Output::Json => print_json(&vs)?,
                Output::Table => print!("{}", volume_table(&vs)),
            }
        }
        VolumeCmd::Show { name, output } => {
            let v = client.get_volume(name_arg(&name)?.as_str()).await?;
            match output {
                Output::Json => print_json(&v)?,
                Output::Table => print!("{}", volume_details(&v)),
            }
        }
        VolumeCmd::Resize { name, size } => {
            let v = client
                .resize_volume(name_arg(&name)?.as_str(), size_arg(&size)?)
                .await?;
            println!("volume {} is now {}", v.name, format_size(v.size_bytes));
        }
        VolumeCmd::Delete { name, force } => {
            client
                .delete_volume(name_arg(&name)?.as_str(), force)
                .await?;
            println!("volume {name} deleted");
        }
        VolumeCmd::Attach { name, node } => {
            let node = node.as_deref().map(name_arg).transpose()?;
            let a = client
                .attach_volume(name_arg(&name)?.as_str(), node.as_ref().map(Name::as_str))
                .await?;
            println!("{}", a.nbd_uri);
            eprintln!("attached on node {} (generation {})", a.node, a.generation);
        }
        VolumeCmd::Detach { name } => {
            client.detach_volume(name_arg(&name)?.as_str()).await?;
            println!("volume {name} detached");
        }
        VolumeCmd::AddReplica {
            name,
            node,
            resync_rate,
            wait,
            timeout,
            output,
        } => {
            let name = name_arg(&name)?;
            let req = AddReplica {
                node: node_arg(&node)?,
                resync_rate_bytes_per_s: resync_rate.as_deref().map(rate_arg).transpose()?,
            };
            let timeout = timeout
                .as_deref()
                .map(|t| {
                    crate::config::parse_duration(t)
                        .map_err(|e| usage(format!("invalid --timeout {t:?}: {e}")))
                })
                .transpose()?;
            let mut v = client.add_replica(name.as_str(), &req).await?;
            let node = req.node.as_str();
            if wait {
                v = replicas::wait_in_sync(client, name.as_str(), node, timeout).await?;
            }
            match output {
                Output::Json => print_json(&v)?,
                Output::Table => match v.replica_set.iter().find(|r| r.node == node) {
                    Some(r) if r.in_sync => println!(
                        "replica {} of volume {name} on node {node} is in sync",
                        r.id
                    ),
                    Some(r) => println!(
                        "added to volume {name}: {} (`blockwarden volume show {name}` follows the copy)",
                        replicas::replica_status(r)
                    ),
                    None => println!("replica of volume {name} added on node {node}"),
                },
            }
        }
        VolumeCmd::RemoveReplica { name, node, output } => {
            let name = name_arg(&name)?;
            let node = node_arg(&node)?;
            let v = client.remove_replica(name.as_str(), node.as_str()).await?;
            match output {
                Output::Json => print_json(&v)?,
                Output::Table => println!(
                    "replica of volume {name} on node {node} removed; {} replica(s) left",
                    v.replica_set.len()
                ),
            }
        }
        VolumeCmd::Set {
            name,
            mode,
            resync_rate,
            min_in_sync,
            output,
        } => {
            let settings = VolumeSettings {
                mode: mode.map(Into::into),
                resync_rate_bytes_per_s: resync_rate.as_deref().map(rate_arg).transpose()?,
                min_in_sync,
            };
            if settings.is_empty() {
                return Err(usage(
                    "volume set needs at least one of --mode, --resync-rate, --min-in-sync".into(),
                ));
            }
            let v = client
                .set_volume(name_arg(&name)?.as_str(), &settings)
                .await?;
            match output {
                Output::Json => print_json(&v)?,
                Output::Table => print!("{}", volume_details(&v)),
            }
        }
    }
    Ok(())
}

fn attached_cell(v: &VolumeView) -> String {
    match &v.attached {
        Some(a) => format!("{}{}", a.node, if a.explicit { " (attach)" } else { "" }),
        None => "-".into(),
    }
}

fn state_cell(v: &VolumeView) -> String {
    let s = serde_json::to_value(v.state)
        .ok()
        .and_then(|j| j.as_str().map(str::to_owned))
        .unwrap_or_default();
    if v.degraded {
        format!("{s}, degraded")
    } else {
        s
    }
}

pub fn volume_table(vs: &[VolumeView]) -> String {
    let mut t = Table::new(&[
        "NAME", "SIZE", "REPLICAS", "MODE", "STATE", "ATTACHED", "CONNS", "GEN",
    ]);
    for v in vs {
        t.row(vec![
            v.name.clone(),
            format_size(v.size_bytes),
            v.replicas.to_string(),
            mode_str(v.mode).into(),
            state_cell(v),
            attached_cell(v),
            v.in_use_connections.to_string(),
            v.generation.to_string(),
        ]);
    }
    t.render()
}

fn mode_str(m: api::Mode) -> &'static str {
    match m {
        api::Mode::Sync => "sync",
        api::Mode::Async => "async",
    }
}

pub fn volume_details(v: &VolumeView) -> String {
    let now = now_ms();
    let mut out = String::new();
    let mut kv = |k: &str, val: String| out.push_str(&format!("{k:<12} {val}\n"));
    kv("name:", v.name.clone());
    kv("id:", v.id.clone());
    kv(
        "size:",
        format!("{} ({} bytes)", format_size(v.size_bytes), v.size_bytes),
    );
    kv("state:", state_cell(v));
    kv(
        "replicas:",
        format!(
            "{} ({}), writes need {} in sync",
            v.replicas,
            mode_str(v.mode),
            v.min_in_sync
        ),
    );
    kv(
        "resync rate:",
        replicas::resync_setting(v.resync_rate_bytes_per_s),
    );
    kv("generation:", v.generation.to_string());
    match &v.attached {
        Some(a) => kv(
            "attached:",
            format!(
                "node {}, generation {}, since {} ({} ago){}",
                a.node,
                a.generation,
                format_utc_ms(a.since_ms),
                format_age_ms(now.saturating_sub(a.since_ms)),
                if a.explicit { ", explicit" } else { "" }
            ),
        ),
        None => kv("attached:", "no".into()),
    }
    kv("connections:", v.in_use_connections.to_string());
    if let Some(u) = &v.nbd_uri {
        kv("nbd uri:", u.clone());
    }
    kv("created:", format_utc_ms(v.created_at_ms));
    out.push_str("replica set:\n");
    out.push_str(&replicas::replica_table(&v.replica_set));
    out
}

pub async fn node(client: &Client, cmd: NodeCmd) -> Result<(), Failure> {
    let NodeCmd::List { output } = cmd;
    let nodes = client.list_nodes().await?;
    if output == Output::Json {
        return print_json(&nodes);
    }
    let vols = client.list_volumes().await.unwrap_or_default();
    print!("{}", node_table(&nodes, &vols));
    Ok(())
}

fn node_table(nodes: &[NodeView], vols: &[VolumeView]) -> String {
    let now = now_ms();
    let mut t = Table::new(&[
        "NAME", "STATE", "LABELS", "CAPACITY", "FREE", "ATTACHED", "NBD", "ID",
    ]);
    for n in nodes {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let attached: Vec<&str> = vols
            .iter()
            .filter(|v| v.attached.as_ref().is_some_and(|a| a.node == n.name))
            .map(|v| v.name.as_str())
            .collect();
        let state = if n.alive {
            format!("up {}", format_age_ms(now.saturating_sub(n.started_at_ms)))
        } else {
            format!(
                "down (seen {} ago)",
                format_age_ms(now.saturating_sub(n.last_seen_ms))
            )
        };
        t.row(vec![
            n.name.clone(),
            state,
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
            format_size(n.capacity_bytes),
            format_size(n.free_bytes),
            if attached.is_empty() {
                "-".into()
            } else {
                attached.join(",")
            },
            n.nbd_addr.clone(),
            n.id.clone(),
        ]);
    }
    t.render()
}

pub async fn status(client: &Client, output: Output) -> Result<(), Failure> {
    let s = client.status().await?;
    if output == Output::Json {
        return print_json(&s);
    }
    let vols = client.list_volumes().await?;
    println!(
        "blockwarden {} on node {} ({} catalog), up {}",
        s.version,
        s.node,
        s.catalog,
        format_age_ms(s.uptime_ms)
    );
    println!(
        "nodes: {}   volumes: {} ({} provisioned)   attached: {}   degraded: {}",
        s.nodes,
        s.volumes,
        format_size(s.volumes_size_bytes),
        s.attached,
        s.degraded
    );
    if s.degraded > 0 {
        for v in vols.iter().filter(|v| v.degraded) {
            println!("  degraded: {}: {}", v.name, replicas::degraded_reasons(v));
        }
    }
    if !vols.is_empty() {
        println!();
        print!("{}", volume_table(&vols));
    }
    Ok(())
}

pub async fn events(client: &Client, follow: bool, output: Output) -> Result<(), Failure> {
    let history = client.events(None, None).await?;
    let mut last = 0;
    for e in &history {
        print_event(e, output);
        last = e.seq;
    }
    if !follow {
        return Ok(());
    }
    let mut stream = client.follow_events(Some(last)).await?;
    while let Some(e) = stream.next().await {
        print_event(&e?, output);
    }
    Ok(())
}

fn print_event(e: &EventView, output: Output) {
    let line = match output {
        Output::Json => serde_json::to_string(e).unwrap_or_default(),
        Output::Table => {
            let level = serde_json::to_value(e.level)
                .ok()
                .and_then(|j| j.as_str().map(str::to_uppercase))
                .unwrap_or_default();
            let mut scope = String::new();
            if let Some(n) = &e.node {
                scope.push_str(&format!(" node={n}"));
            }
            if let Some(v) = &e.volume {
                scope.push_str(&format!(" volume={v}"));
            }
            format!(
                "{} {:<7} {}{} {}",
                format_utc_ms(e.time_ms),
                level,
                e.kind,
                scope,
                e.message
            )
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// A parser over the volume commands alone, as `blockwarden volume …` parses them.
    #[derive(Debug, Parser)]
    struct Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    }

    fn parse(args: &[&str]) -> Result<VolumeCmd, clap::Error> {
        Volume::try_parse_from(std::iter::once("volume").chain(args.iter().copied())).map(|v| v.cmd)
    }

    // Goal: the replica commands take the SPEC's shape plus their extra flags, and refuse
    // missing or malformed ones at parse time.
    #[test]
    fn replica_commands_parse() {
        match parse(&[
            "add-replica",
            "v",
            "--node",
            "b",
            "--resync-rate",
            "100M",
            "--wait",
        ]) {
            Ok(VolumeCmd::AddReplica {
                name,
                node,
                resync_rate,
                wait: true,
                timeout: None,
                output: Output::Table,
            }) => {
                assert_eq!((name.as_str(), node.as_str()), ("v", "b"));
                assert_eq!(resync_rate.as_deref(), Some("100M"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["remove-replica", "v", "--node", "b", "-o", "json"]),
            Ok(VolumeCmd::RemoveReplica {
                output: Output::Json,
                ..
            })
        ));
        assert!(matches!(
            parse(&["set", "v", "--min-in-sync", "2"]),
            Ok(VolumeCmd::Set {
                min_in_sync: Some(2),
                ..
            })
        ));
        assert!(matches!(
            parse(&[
                "create",
                "v",
                "--size",
                "1G",
                "--replicas",
                "3",
                "--min-in-sync",
                "2"
            ]),
            Ok(VolumeCmd::Create {
                replicas: Some(3),
                min_in_sync: Some(2),
                ..
            })
        ));
        for bad in [
            &["add-replica", "v"][..],
            &["add-replica", "v", "--node", "b", "--timeout", "5s"],
            &["remove-replica", "v"],
            &["set", "v", "--min-in-sync", "0"],
            &["create", "v", "--size", "1G", "--min-in-sync", "-1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rates_parse_as_sizes_per_second() {
        assert_eq!(rate_arg("100M").ok(), Some(100 << 20));
        assert_eq!(rate_arg("100M/s").ok(), Some(100 << 20));
        assert_eq!(rate_arg("0").ok(), Some(0));
        assert_eq!(rate_arg("1048576").ok(), Some(1 << 20));
        for bad in ["fast", "-1", "", "1X/s"] {
            let e = rate_arg(bad).expect_err(bad);
            assert_eq!(e.code, 2);
            assert!(e.message.contains("--resync-rate"), "{}", e.message);
        }
    }
}
