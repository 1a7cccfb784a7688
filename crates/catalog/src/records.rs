//! The records the catalog stores, one JSON document per key.
//!
//! Every struct is `#[serde(default)]`-tolerant for fields added later: a record written by an
//! older build reads back with the new field at its default, so adding a field never needs a
//! schema bump. Removing or re-typing a field does (see `SCHEMA_VERSION` in `embedded`).

use std::collections::BTreeMap;

use bw_types::{Generation, Name, NodeId, VolumeId};
use serde::{Deserialize, Serialize};

/// Replication mode of a volume (SPEC §5 C3/C4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every write is acknowledged only once all in-sync replicas have it.
    #[default]
    Sync,
    /// Writes go to a local write log shipped to a remote site.
    Async,
}

/// Lifecycle of a volume record. Creation and deletion are two-step (record first, then the
/// replicas' files) so a crash in between leaves a record that says what to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    #[default]
    Creating,
    Ready,
    Deleting,
}

/// Where a volume is active (SPEC §2 "attachment").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub node_id: NodeId,
    /// Copied from the node record so listings need no join (node names are stable).
    pub node_name: Name,
    /// The generation this attachment writes with; equals the volume's `generation`.
    pub generation: Generation,
    /// True after `volume attach`: survives the last NBD connection closing.
    pub explicit: bool,
    pub since_ms: u64,
}

/// State of one replica as the catalog knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Its file is being created, or it is receiving its first full copy.
    #[default]
    Creating,
    InSync,
    /// Missed writes; a bitmap resync will bring it back.
    Stale,
    /// Failed an I/O; must be resynced before it counts again (fail-stop).
    Faulted,
}

/// One copy of a volume on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub node_id: NodeId,
    pub node_name: Name,
    #[serde(default)]
    pub state: ReplicaState,
    /// Stable number of this replica within its volume (1, 2, …; never reused), the
    /// replication core's `ReplicaId`. 0 in records written before replication: read as
    /// the replica's position + 1 (see [`VolumeRecord::replica_ids`]).
    #[serde(default)]
    pub id: u64,
    /// The latest generation at which this replica was in sync (0: since creation). A new
    /// attachment reconciles from the in-sync replica with the highest one.
    #[serde(default)]
    pub in_sync_generation: Generation,
}

/// A volume: key `volumes/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Immutable; names the replicas' files, so a re-created name never meets old leftovers.
    pub id: VolumeId,
    pub name: Name,
    pub size_bytes: u64,
    /// Desired replica count (placed replicas are in `replicas_placed`).
    pub replicas: u32,
    #[serde(default)]
    pub mode: Mode,
    /// Failure-domain label replicas must differ in (e.g. `room`), if any.
    #[serde(default)]
    pub spread: Option<String>,
    /// Node names the operator asked for with `--node`.
    #[serde(default)]
    pub pinned_nodes: Vec<String>,
    #[serde(default)]
    pub state: VolumeState,
    pub created_at_ms: u64,
    /// Highest generation ever handed out; a new attachment takes `generation + 1`.
    #[serde(default)]
    pub generation: Generation,
    #[serde(default)]
    pub attachment: Option<Attachment>,
    #[serde(default)]
    pub replicas_placed: Vec<ReplicaRecord>,
    /// Resync throttle; `None` means the default (see the agent's replication settings).
    #[serde(default)]
    pub resync_rate_bytes_per_s: Option<u64>,
    /// Fewest in-sync replicas that still accept writes (`--min-in-sync`); `None` = 1.
    #[serde(default)]
    pub min_in_sync: Option<u32>,
    /// Highest replica id ever given out, so a removed replica's id is never reused (an
    /// attachment that still remembers the removed replica would ignore a new one with the
    /// same id). 0 in records written before it existed: the placed ids are the floor.
    #[serde(default)]
    pub last_replica_id: u64,
}

impl VolumeRecord {
    /// Gives every placed replica without one a stable id (records written before
    /// replication have 0 everywhere and get 1, 2, … in placement order).
    pub fn assign_replica_ids(&mut self) {
        for i in 0..self.replicas_placed.len() {
            if self.replicas_placed[i].id == 0 {
                self.replicas_placed[i].id = self.take_replica_id();
            }
        }
    }

    /// The id the next added replica gets: above every id placed now or ever given out.
    pub fn next_replica_id(&self) -> u64 {
        self.replicas_placed
            .iter()
            .map(|r| r.id)
            .max()
            .unwrap_or(0)
            .max(self.last_replica_id)
            + 1
    }

    /// [`VolumeRecord::next_replica_id`], recorded as given out.
    pub fn take_replica_id(&mut self) -> u64 {
        let id = self.next_replica_id();
        self.last_replica_id = id;
        id
    }
}

/// A node (agent): key `nodes/<id>`. Rewritten by its own agent on start and on heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: Name,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub nbd_addr: String,
    pub api_addr: String,
    #[serde(default)]
    pub peer_addr: Option<String>,
    #[serde(default)]
    pub capacity_bytes: u64,
    #[serde(default)]
    pub free_bytes: u64,
    pub started_at_ms: u64,
    #[serde(default)]
    pub last_seen_ms: u64,
    /// The node's report of the replicas it actually holds, by volume id, written with
    /// `last_seen_ms` (so a report's age is `now - last_seen_ms`).
    #[serde(default)]
    pub replicas: BTreeMap<String, ReplicaReport>,
}

/// What a node reports about one replica it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReplicaReport {
    pub volume: String,
    /// `in_sync`, `faulted`, `missing`, …
    pub state: String,
    #[serde(default)]
    pub size_bytes: u64,
    /// Highest generation the replica has admitted.
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub error: Option<String>,
}

/// Severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

/// An event as a caller hands it in; the catalog assigns its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    pub time_ms: u64,
    pub level: Level,
    /// Dotted kind, e.g. `volume.created`, `volume.io_error`, `node.joined`.
    pub kind: String,
    pub volume: Option<String>,
    pub node: Option<String>,
    pub message: String,
}

impl NewEvent {
    /// An event stamped with the wall clock now.
    pub fn now(level: Level, kind: &str, message: impl Into<String>) -> NewEvent {
        NewEvent {
            time_ms: now_ms(),
            level,
            kind: kind.to_owned(),
            volume: None,
            node: None,
            message: message.into(),
        }
    }

    pub fn volume(mut self, volume: impl Into<String>) -> NewEvent {
        self.volume = Some(volume.into());
        self
    }

    pub fn node(mut self, node: impl Into<String>) -> NewEvent {
        self.node = Some(node.into());
        self
    }

    pub fn with_seq(self, seq: u64) -> EventRecord {
        EventRecord {
            seq,
            time_ms: self.time_ms,
            level: self.level,
            kind: self.kind,
            volume: self.volume,
            node: self.node,
            message: self.message,
        }
    }
}

/// A stored event: key `events/<seq, 20 digits>`. Sequence numbers start at 1, grow by one per
/// event and are never reused, so `seq` doubles as a resume cursor for `events --follow`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub level: Level,
    pub kind: String,
    #[serde(default)]
    pub volume: Option<String>,
    #[serde(default)]
    pub node: Option<String>,
    pub message: String,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
