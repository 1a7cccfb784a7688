//! Reading cluster state through the CLI and running NBD tools, for the C2 acceptance tests.
//! These encode the JSON shapes the tests rely on, in one place:
//!
//! - `volume show NAME -o json`: `replica_set: [{node, state}]`, and
//!   `attached: {node, generation, since_ms, explicit}` or `null`.
//! - replication: `replica_set[].state` (`in_sync`, `stale`, `resyncing`, …); replica files
//!   compared region by region.
//! - `node list -o json`: `[{name, alive, labels, capacity_bytes, free_bytes, last_seen_ms}]`.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agent::ClusterAgent;
use crate::cmd::{run_with_timeout, show};

/// Whether `text` contains `word` delimited by non-alphanumerics (so `n1` does not match `n10`).
pub fn mentions(text: &str, word: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(word).any(|(i, _)| {
        let before = i.checked_sub(1).map(|j| bytes[j]);
        let after = bytes.get(i + word.len()).copied();
        let sep = |b: Option<u8>| b.is_none_or(|b| !b.is_ascii_alphanumeric());
        sep(before) && sep(after)
    })
}

/// The attachment recorded for a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub node: String,
    pub generation: u64,
    pub explicit: bool,
}

/// `attached` of `volume show NAME -o json` via `agent`.
#[track_caller]
pub fn attachment(agent: &ClusterAgent, volume: &str) -> Option<Attachment> {
    let show = agent.cli_json(&["volume", "show", volume]);
    parse_attachment(&show)
}

#[track_caller]
pub fn parse_attachment(show: &Value) -> Option<Attachment> {
    let a = &show["attached"];
    if a.is_null() {
        return None;
    }
    Some(Attachment {
        node: a["node"]
            .as_str()
            .unwrap_or_else(|| panic!("attached.node is a string: {show}"))
            .to_owned(),
        generation: a["generation"]
            .as_u64()
            .unwrap_or_else(|| panic!("attached.generation is a number: {show}")),
        explicit: a["explicit"]
            .as_bool()
            .unwrap_or_else(|| panic!("attached.explicit is a bool: {show}")),
    })
}

/// Node names of `replica_set` in `volume show NAME -o json`.
#[track_caller]
pub fn replica_nodes(show: &Value) -> Vec<String> {
    show["replica_set"]
        .as_array()
        .unwrap_or_else(|| panic!("volume show has a replica_set array: {show}"))
        .iter()
        .map(|r| {
            r["node"]
                .as_str()
                .unwrap_or_else(|| panic!("replica_set[].node is a string: {show}"))
                .to_owned()
        })
        .collect()
}

/// `alive` of node `node` in `node list -o json` via `agent` (`None`: not listed).
#[track_caller]
pub fn node_alive(agent: &ClusterAgent, node: &str) -> Option<bool> {
    let list = agent.cli_json(&["node", "list"]);
    list.as_array()
        .unwrap_or_else(|| panic!("node list -o json is an array: {list}"))
        .iter()
        .find(|n| n["name"] == node)
        .map(|n| {
            n["alive"]
                .as_bool()
                .unwrap_or_else(|| panic!("node alive is a bool: {n}"))
        })
}

/// One run of an outside NBD client.
#[derive(Debug, Clone)]
pub struct ToolRun {
    /// Exit 0 and no failure words in the output.
    pub ok: bool,
    /// stdout + stderr.
    pub text: String,
    pub started: Instant,
    pub ended: Instant,
}

fn tool(cmd: &mut Command, timeout: Duration) -> ToolRun {
    let started = Instant::now();
    let out = run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lower = text.to_lowercase();
    ToolRun {
        ok: out.status.success()
            && !lower.contains("fail")
            && !lower.contains("error")
            && !lower.contains("mismatch"),
        text: format!("$ {}\n{text}", show(cmd)),
        started,
        ended: Instant::now(),
    }
}

/// `qemu-io -f raw -c CMD… URI` with a deadline.
pub fn qemu_io(uri: &str, cmds: &[&str], timeout: Duration) -> ToolRun {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    tool(&mut c, timeout)
}

/// `qemu-io` that must succeed; returns its output.
#[track_caller]
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let r = qemu_io(uri, cmds, Duration::from_secs(120));
    assert!(r.ok, "{}", r.text);
    r.text
}

/// `nbdinfo URI` with a deadline.
pub fn nbdinfo(uri: &str, timeout: Duration) -> ToolRun {
    let mut c = Command::new("nbdinfo");
    c.arg(uri);
    tool(&mut c, timeout)
}

/// (node, state) of every replica in `volume show NAME -o json`.
pub fn replica_states(show: &Value) -> Vec<(String, String)> {
    show["replica_set"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    (
                        r["node"].as_str().unwrap_or("?").to_owned(),
                        r["state"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `volume show NAME -o json` through `agent`'s API.
pub fn volume_show(agent: &ClusterAgent, volume: &str) -> Value {
    agent.cli_json(&["volume", "show", volume])
}

/// The `replica_set` entry of `node` in `volume show`.
pub fn replica_on<'a>(show: &'a Value, node: &str) -> Option<&'a Value> {
    show["replica_set"]
        .as_array()?
        .iter()
        .find(|r| r["node"].as_str() == Some(node))
}

/// A `replica_set` entry that is in sync (flag and state agree).
pub fn replica_in_sync(r: &Value) -> bool {
    r["in_sync"].as_bool() == Some(true) && r["state"].as_str() == Some("in_sync")
}

/// Exactly `n` replicas, every one of them in sync.
pub fn all_in_sync(show: &Value, n: usize) -> bool {
    show["replica_set"]
        .as_array()
        .is_some_and(|rs| rs.len() == n && rs.iter().all(replica_in_sync))
}

/// The region counts of the `resync.started` events in `blockwarden events` text ("resync
/// of replica 2 on node n2 started (N regions)" → N), of every replica or only of those on
/// `node`.
pub fn resync_regions(events: &str, node: Option<&str>) -> Vec<u64> {
    let on = node.map(|n| format!("on node {n} started ("));
    events
        .lines()
        .filter(|l| l.contains("resync") && l.contains("started ("))
        .filter(|l| on.as_deref().is_none_or(|on| l.contains(on)))
        .filter_map(|l| {
            let (_, rest) = l.split_once("started (")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The value of the Prometheus line `name{labels}` in `agent`'s `/metrics` (`None` when
/// the series is absent or the request failed).
pub fn metric(agent: &ClusterAgent, name: &str, labels: &str) -> Option<f64> {
    let r = crate::http::request(agent.api_addr(), "GET", "/metrics", None).ok()?;
    if r.status != 200 {
        return None;
    }
    let key = format!("{name}{{{labels}}} ");
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// The replica file of volume `id` on `agent`'s node (`<data dir>/volumes/<id>.img`).
pub fn replica_file(agent: &ClusterAgent, id: &str) -> std::path::PathBuf {
    agent.data_dir().join("volumes").join(format!("{id}.img"))
}

/// Compares two replica files 1 MiB region by region; the error lists the regions that
/// differ (or the sizes).
pub fn same_files(a: &std::path::Path, b: &std::path::Path) -> Result<(), String> {
    const REGION: usize = 1 << 20;
    let x = std::fs::read(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let y = std::fs::read(b).map_err(|e| format!("{}: {e}", b.display()))?;
    if x.len() != y.len() {
        return Err(format!("sizes differ: {} vs {}", x.len(), y.len()));
    }
    let differ: Vec<usize> = (0..x.len().div_ceil(REGION))
        .filter(|i| {
            let r = i * REGION..((i + 1) * REGION).min(x.len());
            x[r.clone()] != y[r]
        })
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(format!("regions (1 MiB) that differ: {differ:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_regions_reads_started_events_of_all_or_one_node() {
        let ev = "t INFO resync.started node=n1 volume=vm volume vm: resync of replica 2 on node n2 started (8 regions)\n\
                  t INFO resync.finished node=n1 volume=vm volume vm: resync of replica 2 on node n2 finished\n\
                  t INFO resync.started node=n1 volume=vm volume vm: resync of replica 3 on node n3 started (5 regions)";
        assert_eq!(resync_regions(ev, None), [8, 5]);
        assert_eq!(resync_regions(ev, Some("n3")), [5]);
        let show = serde_json::json!({"replica_set": [
            {"node": "n1", "state": "in_sync", "in_sync": true},
            {"node": "n2", "state": "resyncing", "in_sync": false}]});
        assert!(!all_in_sync(&show, 2));
        assert!(replica_on(&show, "n1").is_some_and(replica_in_sync));
        assert!(replica_on(&show, "n3").is_none());
    }

    #[test]
    fn mentions_matches_whole_words_only() {
        assert!(mentions("attached on n1 (generation 4)", "n1"));
        assert!(mentions("n1: down", "n1"));
        assert!(mentions("holder=n1", "n1"));
        assert!(!mentions("attached on n10", "n1"));
        assert!(!mentions("an1x", "n1"));
        assert!(mentions("generation 12.", "12"));
        assert!(!mentions("generation 123", "12"));
    }

    #[test]
    fn attachment_is_parsed_or_null() {
        let v: Value = serde_json::json!({"attached": null});
        assert_eq!(parse_attachment(&v), None);
        let v: Value = serde_json::json!({"attached": {"node": "n2", "generation": 7, "since_ms": 1, "explicit": true}});
        assert_eq!(
            parse_attachment(&v),
            Some(Attachment {
                node: "n2".into(),
                generation: 7,
                explicit: true
            })
        );
        let v: Value = serde_json::json!({"replica_set": [{"node": "n1", "state": "ready"}]});
        assert_eq!(replica_nodes(&v), ["n1"]);
    }
}
