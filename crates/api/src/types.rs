//! Wire types shared by the server and the client. Sizes are bytes; times are milliseconds
//! since the Unix epoch (`*_ms`).
//!
//! Requests deny unknown fields (a typo such as `"replica": 3` is refused, not ignored) and
//! accept sizes either as a number of bytes or as a string such as `"10G"` (`size_bytes`, or
//! its alias `size`). Responses are read leniently so an older client can talk to a newer
//! agent that added fields.

use std::collections::BTreeMap;

use bw_types::{parse_size, Name};
use serde::{Deserialize, Deserializer, Serialize};

/// Replication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Sync,
    Async,
}

/// Lifecycle state of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    Creating,
    Ready,
    Deleting,
}

/// Severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: Name,
    #[serde(alias = "size", deserialize_with = "de_size")]
    pub size_bytes: u64,
    /// Replica count; the agent's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Failure-domain label the replicas must differ in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// Nodes (by name) to place replicas on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Name>,
    /// Fewest in-sync replicas that still accept writes, 1..=`replicas`; the agent's
    /// default (1) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_in_sync: Option<u32>,
    /// Resync throttle in bytes per second (or a size string per second, `"100M"`);
    /// 0 means unthrottled; the agent's default when absent.
    #[serde(
        default,
        alias = "resync_rate",
        deserialize_with = "de_opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub resync_rate_bytes_per_s: Option<u64>,
}

/// `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    #[serde(alias = "size", deserialize_with = "de_size")]
    pub size_bytes: u64,
}

/// `POST /v1/volumes/{name}/attach`; the body may be empty (attach on the agent's own node).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
}

/// `PATCH /v1/volumes/{name}`: absent fields are left unchanged; at least one is required.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Resync throttle in bytes per second (or a size string per second, `"100M"`);
    /// 0 means unthrottled.
    #[serde(
        default,
        alias = "resync_rate",
        deserialize_with = "de_opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub resync_rate_bytes_per_s: Option<u64>,
    /// Fewest in-sync replicas that still accept writes, 1..=the volume's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_in_sync: Option<u32>,
}

impl VolumeSettings {
    pub fn is_empty(&self) -> bool {
        self.mode.is_none() && self.resync_rate_bytes_per_s.is_none() && self.min_in_sync.is_none()
    }
}

/// `POST /v1/volumes/{name}/replicas`: add a replica on `node`, filled by a background copy
/// while the volume stays in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddReplica {
    /// Name of the node to hold the new replica.
    pub node: Name,
    /// Throttle for this replica's initial copy, bytes per second (or `"100M"`); 0 means
    /// unthrottled; the volume's setting when absent.
    #[serde(
        default,
        alias = "resync_rate",
        deserialize_with = "de_opt_size",
        skip_serializing_if = "Option::is_none"
    )]
    pub resync_rate_bytes_per_s: Option<u64>,
}

/// Answer to an attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// `nbd://host:port/volume`, ready for qemu-img / nbdinfo.
    pub nbd_uri: String,
    /// Name of the node the volume is attached on.
    pub node: String,
    pub generation: u64,
}

/// Where a volume is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    pub node: String,
    pub generation: u64,
    pub since_ms: u64,
    /// True after `volume attach`: survives the last NBD connection closing.
    pub explicit: bool,
}

/// One replica of a volume. From the attached node's replication engine when the volume is
/// attached (live), else from the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    /// Stable number of the replica within its volume (1, 2, …; never reused).
    #[serde(default)]
    pub id: u64,
    /// Name of the node holding it.
    pub node: String,
    /// `creating`, `in_sync`, `stale`, `faulted`, `connecting`, `leaving`, `resyncing` or
    /// `rejoining`.
    pub state: String,
    /// True when it has every acknowledged write (it counts towards `min_in_sync`).
    #[serde(default)]
    pub in_sync: bool,
    /// Why it is not in sync, or what its node reports that differs, for humans.
    #[serde(default)]
    pub error: Option<String>,
    /// Progress while it is being copied to (`resyncing`, `rejoining`).
    #[serde(default)]
    pub resync: Option<ResyncView>,
    /// Bytes it lags behind the in-sync replicas (its changed regions still to copy), when
    /// the volume is attached with replication; `None` when not known (not attached).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
}

/// Progress of one replica's resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncView {
    /// Bytes copied so far in this resync.
    #[serde(default)]
    pub copied_bytes: u64,
    /// Bytes this resync has to copy in all (the dirty regions, or the whole volume).
    #[serde(default)]
    pub total_bytes: u64,
    /// Measured copy rate over the last few seconds.
    #[serde(default)]
    pub rate_bytes_per_s: u64,
    /// Seconds to completion at the measured rate; `None` until a rate is known.
    #[serde(default)]
    pub eta_s: Option<u64>,
}

/// A volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    pub id: String,
    pub size_bytes: u64,
    pub replicas: u32,
    pub mode: Mode,
    pub state: VolumeState,
    /// True when any placed replica is not in sync.
    #[serde(default)]
    pub degraded: bool,
    pub generation: u64,
    #[serde(default)]
    pub attached: Option<AttachmentView>,
    /// Open NBD connections on the attached node.
    #[serde(default)]
    pub in_use_connections: u32,
    /// Set while attached.
    #[serde(default)]
    pub nbd_uri: Option<String>,
    #[serde(default)]
    pub replica_set: Vec<ReplicaView>,
    #[serde(default)]
    pub spread: Option<String>,
    #[serde(default)]
    pub resync_rate_bytes_per_s: Option<u64>,
    /// Fewest in-sync replicas that still accept writes.
    #[serde(default = "one")]
    pub min_in_sync: u32,
    pub created_at_ms: u64,
}

fn one() -> u32 {
    1
}

/// A node of the cluster (the only one, embedded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub nbd_addr: String,
    pub api_addr: String,
    #[serde(default)]
    pub peer_addr: Option<String>,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub started_at_ms: u64,
    pub last_seen_ms: u64,
    /// Seen within the liveness timeout.
    pub alive: bool,
}

/// `GET /v1/status`: the cluster at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    /// Name of the node that answered.
    pub node: String,
    pub node_id: String,
    /// blockwarden version of the answering agent.
    pub version: String,
    /// `embedded` or `cluster`.
    pub catalog: String,
    pub uptime_ms: u64,
    pub nodes: u32,
    pub volumes: u32,
    pub volumes_size_bytes: u64,
    pub attached: u32,
    pub degraded: u32,
}

/// One event of the history or the live stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    /// Grows by one per event; resume a stream with `since=<last seq>`.
    pub seq: u64,
    pub time_ms: u64,
    pub level: Level,
    /// Dotted kind: `volume.created`, `volume.io_error`, …
    pub kind: String,
    #[serde(default)]
    pub volume: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    pub message: String,
}

/// `GET /v1/events` parameters, validated by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventQuery {
    /// Only events with `seq > since`; `None`: the newest `limit` events.
    pub since: Option<u64>,
    /// At most this many, 1..=`MAX_EVENT_LIMIT`.
    pub limit: u32,
}

/// Events returned when the query names no `limit`.
pub const DEFAULT_EVENT_LIMIT: u32 = 100;
/// Largest `limit` accepted; larger is refused (400) so one request cannot pull unbounded data.
pub const MAX_EVENT_LIMIT: u32 = 10_000;

/// A size given as a number of bytes or as a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeInput {
    Bytes(u64),
    Text(String),
}

/// Parses a size from a JSON value; used by `de_size` and by the server to give
/// `invalid_size` (rather than a generic `bad_request`) for a bad size.
pub fn size_from_json(v: &serde_json::Value) -> Result<u64, String> {
    match v {
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| format!("size {n} is not a whole, non-negative number of bytes")),
        serde_json::Value::String(s) => parse_size(s).map_err(|e| e.to_string()),
        other => Err(format!(
            "size must be a number of bytes or a string like \"10G\", not {other}"
        )),
    }
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeInput::deserialize(d)? {
        SizeInput::Bytes(b) => Ok(b),
        SizeInput::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: sizes are accepted as bytes or unit strings under either field name, and
    // refused when negative, fractional or unknown fields sneak in.
    #[test]
    fn create_accepts_liberal_sizes_and_refuses_junk() {
        let a: CreateVolume = serde_json::from_str(r#"{"name":"a","size":"1G"}"#).unwrap();
        let b: CreateVolume =
            serde_json::from_str(r#"{"name":"a","size_bytes":1073741824}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.size_bytes, 1 << 30);
        for bad in [
            r#"{"name":"a","size":-1}"#,
            r#"{"name":"a","size":1.5}"#,
            r#"{"name":"a","size":"lots"}"#,
            r#"{"name":"a","size":1,"replica":3}"#,
            r#"{"name":"A","size":1}"#,
            r#"{"size":1}"#,
        ] {
            assert!(serde_json::from_str::<CreateVolume>(bad).is_err(), "{bad}");
        }
        let s: VolumeSettings = serde_json::from_str(r#"{"resync_rate":"100M"}"#).unwrap();
        assert_eq!(s.resync_rate_bytes_per_s, Some(100 << 20));
        assert!(serde_json::from_str::<VolumeSettings>("{}")
            .unwrap()
            .is_empty());
        let s: VolumeSettings = serde_json::from_str(r#"{"min_in_sync":2}"#).unwrap();
        assert_eq!(s.min_in_sync, Some(2));
        assert!(!s.is_empty());
    }

    // Goal: create and add-replica take the resync rate as bytes or a size string, under
    // either name, and refuse unknown fields.
    #[test]
    fn replication_fields_accept_sizes_and_refuse_junk() {
        let c: CreateVolume = serde_json::from_str(
            r#"{"name":"a","size":"1G","min_in_sync":2,"resync_rate":"100M"}"#,
        )
        .unwrap();
        assert_eq!(c.min_in_sync, Some(2));
        assert_eq!(c.resync_rate_bytes_per_s, Some(100 << 20));
        let a: AddReplica = serde_json::from_str(r#"{"node":"n2","resync_rate":0}"#).unwrap();
        assert_eq!(a.resync_rate_bytes_per_s, Some(0));
        let a: AddReplica = serde_json::from_str(r#"{"node":"n2"}"#).unwrap();
        assert_eq!(a.resync_rate_bytes_per_s, None);
        for bad in [
            r#"{"node":"N2"}"#,
            r#"{"node":"n2","rate":1}"#,
            r#"{"node":"n2","resync_rate":"fast"}"#,
            r#"{}"#,
        ] {
            assert!(serde_json::from_str::<AddReplica>(bad).is_err(), "{bad}");
        }
    }

    // Goal: a view from an older agent (no ids, no in_sync, no min_in_sync) still decodes.
    #[test]
    fn old_replica_views_decode() {
        let r: ReplicaView = serde_json::from_str(r#"{"node":"a","state":"in_sync"}"#).unwrap();
        assert_eq!((r.id, r.in_sync, r.resync), (0, false, None));
    }
}
