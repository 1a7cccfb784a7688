//! The catalog seam: keys with revisions, compare-and-swap transactions, typed helpers.
//!
//! The primitives (`get`, `list`, `txn`, events) are exactly what etcd offers: a key's
//! revision is etcd's `mod_revision`, `Expect::Absent` is `create_revision == 0`, and `txn`
//! is one etcd `Txn` whose compares are the expectations and whose success branch holds the
//! puts and deletes. The typed methods (`get_volume`, `put_volume`, …) are provided on top,
//! so a backend implements only the primitives.

use std::fmt;
use std::future::Future;

use bw_types::{Name, NodeId};
use tokio::sync::broadcast;

use crate::lease::LeaseId;
use crate::records::{EventRecord, NewEvent, NodeRecord, VolumeRecord};

/// A key's modification revision. Revisions come from one counter per catalog that grows with
/// every committed transaction (etcd's cluster revision), so a key rewritten with identical
/// content still gets a new revision, and a deleted-then-recreated key never repeats one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// A catalog key, relative to the backend's root (etcd prefixes it with its cluster root).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

/// The families of keys, each a prefix that `Catalog::list` walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Volumes,
    Nodes,
    /// `owners/<volume>`: the lease-bound ownership key of an attached volume (cluster mode).
    Owners,
    /// `alive/<node id>`: a node's lease-bound liveness key (cluster mode).
    Alive,
}

impl Prefix {
    pub fn as_str(self) -> &'static str {
        match self {
            Prefix::Volumes => "volumes/",
            Prefix::Nodes => "nodes/",
            Prefix::Owners => "owners/",
            Prefix::Alive => "alive/",
        }
    }
}

impl Key {
    pub fn volume(name: &Name) -> Key {
        Key(format!("{}{name}", Prefix::Volumes.as_str()))
    }

    pub fn node(id: &NodeId) -> Key {
        Key(format!("{}{}", Prefix::Nodes.as_str(), id.0))
    }

    /// The ownership key of a volume; its creation revision is the volume's generation.
    pub fn owner(volume: &Name) -> Key {
        Key(format!("{}{volume}", Prefix::Owners.as_str()))
    }

    /// The liveness key of a node, bound to the node's session lease.
    pub fn alive(id: &NodeId) -> Key {
        Key(format!("{}{}", Prefix::Alive.as_str(), id.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a transaction expects of a key before it may commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist (create-if-absent).
    Absent,
    /// The key must exist with exactly this revision (read-modify-write).
    At(Revision),
    /// No condition: last writer wins. Only for records one writer owns (a node's own record).
    Any,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Absent => f.write_str("absent"),
            Expect::At(r) => write!(f, "at {r}"),
            Expect::Any => f.write_str("any"),
        }
    }
}

/// What a transaction does to a key once every expectation holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Store this value (a JSON document).
    Put(Vec<u8>),
    /// Store this value bound to a lease: the key is deleted when the lease expires or is
    /// revoked. Fails with `LeaseExpired` if the lease is already gone.
    PutWithLease(Vec<u8>, LeaseId),
    Delete,
    /// Only check the expectation (e.g. "the node record I placed on is unchanged").
    Check,
}

/// One (key, expected revision, change) triple of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOp {
    pub key: Key,
    pub expect: Expect,
    pub change: Change,
}

impl TxnOp {
    pub fn put_volume(rec: &VolumeRecord, expect: Expect) -> TxnOp {
        TxnOp {
            key: Key::volume(&rec.name),
            expect,
            change: Change::Put(encode(rec)),
        }
    }

    pub fn delete_volume(name: &Name, expect: Expect) -> TxnOp {
        TxnOp {
            key: Key::volume(name),
            expect,
            change: Change::Delete,
        }
    }

    pub fn put_node(rec: &NodeRecord, expect: Expect) -> TxnOp {
        TxnOp {
            key: Key::node(&rec.id),
            expect,
            change: Change::Put(encode(rec)),
        }
    }

    pub fn delete_node(id: &NodeId, expect: Expect) -> TxnOp {
        TxnOp {
            key: Key::node(id),
            expect,
            change: Change::Delete,
        }
    }
}

/// Serializing our own records cannot fail: no maps with non-string keys, no custom
/// serializers that error.
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("catalog records always serialize")
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Someone else changed the key since it was read; re-read and retry (or report).
    #[error("{key} was changed concurrently: expected {expected}, found {}",
        .found.map_or("no key".to_owned(), |r| r.to_string()))]
    Conflict {
        key: Key,
        expected: Expect,
        found: Option<Revision>,
    },
    #[error("the catalog at {path} is already open in another process (is another agent running on this data directory?)")]
    Locked { path: std::path::PathBuf },
    #[error("the catalog at {path} has schema version {found}, newer than the {supported} this build understands; upgrade blockwarden")]
    SchemaTooNew {
        path: std::path::PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("the record under {key} is not valid")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// No member of the cluster store could serve the request in time (no quorum, every
    /// endpoint down or unreachable). Nothing is known to have changed unless `reason` says
    /// the outcome is unknown.
    #[error("cluster store unavailable: {reason}")]
    Unavailable { reason: String },
    /// The lease is gone (expired, revoked, or never existed): its keys are deleted and a
    /// holder must stop acting on what it guarded.
    #[error("lease {lease} has expired or was revoked")]
    LeaseExpired { lease: LeaseId },
    /// The backend itself failed (disk error, an unexpected answer from etcd).
    #[error("the catalog's storage failed: {context}")]
    Backend {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl CatalogError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, CatalogError::Conflict { .. })
    }

    /// True when the store could not be reached or has no quorum: retry later, or fail the
    /// operator's command with this message.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, CatalogError::Unavailable { .. })
    }
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// (key, value, revision) rows of a listing, in key order.
pub type Rows = Vec<(Key, Vec<u8>, Revision)>;

/// The metadata store. Methods are `async` because the etcd backend is; the embedded one runs
/// its synchronous redb work on the blocking pool. Callers are generic over `C: Catalog`.
pub trait Catalog: Send + Sync + 'static {
    /// The value and revision under `key`, if it exists.
    fn get(&self, key: &Key) -> impl Future<Output = Result<Option<(Vec<u8>, Revision)>>> + Send;

    /// Every (key, value, revision) under `prefix`, in key order, from one consistent snapshot.
    fn list(
        &self,
        prefix: Prefix,
    ) -> impl Future<Output = Result<Vec<(Key, Vec<u8>, Revision)>>> + Send;

    /// Applies every op atomically if every expectation holds, else changes nothing and
    /// returns `Conflict` for the first op whose expectation failed. Returns the revision the
    /// written keys now carry. An empty list is a no-op returning the current revision.
    fn txn(&self, ops: Vec<TxnOp>) -> impl Future<Output = Result<Revision>> + Send;

    /// Stores an event under the next sequence number, trims the oldest beyond
    /// `event_retention()`, then publishes it to subscribers. Returns its `seq`.
    fn append_event(&self, event: NewEvent) -> impl Future<Output = Result<u64>> + Send;

    /// Up to `limit` events with `seq > after`, oldest first.
    fn events_since(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EventRecord>>> + Send;

    /// The highest `seq` ever assigned (0 if none).
    fn last_event_seq(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Events appended from now on, in `seq` order. A receiver that falls more than the
    /// channel's capacity behind gets `Lagged` and should re-read with `events_since`
    /// (`crate::follow_events` does all of this).
    fn subscribe_events(&self) -> broadcast::Receiver<EventRecord>;

    /// How many events are kept; older ones are trimmed on append.
    fn event_retention(&self) -> usize;

    // ---- typed helpers, provided on top of the primitives ----

    fn get_volume(
        &self,
        name: &Name,
    ) -> impl Future<Output = Result<Option<(VolumeRecord, Revision)>>> + Send {
        let key = Key::volume(name);
        async move { decode_opt(&key, self.get(&key).await?) }
    }

    fn list_volumes(&self) -> impl Future<Output = Result<Vec<(VolumeRecord, Revision)>>> + Send {
        async move { decode_all(self.list(Prefix::Volumes).await?) }
    }

    /// Writes `rec` under its name if the key matches `expect`.
    fn put_volume(
        &self,
        rec: &VolumeRecord,
        expect: Expect,
    ) -> impl Future<Output = Result<Revision>> + Send {
        let op = TxnOp::put_volume(rec, expect);
        async move { self.txn(vec![op]).await }
    }

    fn delete_volume(
        &self,
        name: &Name,
        expect: Expect,
    ) -> impl Future<Output = Result<()>> + Send {
        let op = TxnOp::delete_volume(name, expect);
        async move { self.txn(vec![op]).await.map(drop) }
    }

    fn get_node(
        &self,
        id: &NodeId,
    ) -> impl Future<Output = Result<Option<(NodeRecord, Revision)>>> + Send {
        let key = Key::node(id);
        async move { decode_opt(&key, self.get(&key).await?) }
    }

    fn list_nodes(&self) -> impl Future<Output = Result<Vec<(NodeRecord, Revision)>>> + Send {
        async move { decode_all(self.list(Prefix::Nodes).await?) }
    }

    fn put_node(
        &self,
        rec: &NodeRecord,
        expect: Expect,
    ) -> impl Future<Output = Result<Revision>> + Send {
        let op = TxnOp::put_node(rec, expect);
        async move { self.txn(vec![op]).await }
    }
}

fn decode_opt<T: serde::de::DeserializeOwned>(
    key: &Key,
    got: Option<(Vec<u8>, Revision)>,
) -> Result<Option<(T, Revision)>> {
    match got {
        None => Ok(None),
        Some((bytes, rev)) => Ok(Some((decode(key.as_str(), &bytes)?, rev))),
    }
}

fn decode_all<T: serde::de::DeserializeOwned>(
    rows: Vec<(Key, Vec<u8>, Revision)>,
) -> Result<Vec<(T, Revision)>> {
    rows.into_iter()
        .map(|(k, v, r)| Ok((decode(k.as_str(), &v)?, r)))
        .collect()
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| CatalogError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

/// Builds a key from its stored string; only backends need this.
pub fn key_from_stored(s: &str) -> Key {
    Key(s.to_owned())
}
