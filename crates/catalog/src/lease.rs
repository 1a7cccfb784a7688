//! Leases, ownership keys and watches: what cluster mode needs beyond compare-and-swap.
//!
//! A **lease** is a TTL'd token kept alive by its holder (one session lease per node, as
//! `docs/design/control-plane.md` recommends); keys put with `Change::PutWithLease` vanish
//! when it expires or is revoked. Two key families use it:
//!
//! - `alive/<node id>`: the node is up while this key exists.
//! - `owners/<volume>`: the node attached to the volume. The key is only ever created
//!   (`acquire_owner`) and deleted (`release_owner`, lease expiry), never rewritten, so its
//!   revision is its creation revision: a cluster-wide, strictly increasing number that serves
//!   as the volume's **generation** (fencing token).
//!
//! `watch_prefix` streams changes under a prefix from a revision on, so a node can follow
//! membership and its own assignments without polling.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bw_types::{Generation, NodeId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::kv::{decode, encode, Catalog, CatalogError, Change, Expect, Key, Prefix, Result};
use crate::kv::{Revision, Rows, TxnOp};
use crate::records::now_ms;
use bw_types::Name;

/// Default session-lease TTL. Takeover after a holder dies takes TTL − (time since its last
/// keepalive) + ≤ 0.6 s, so 8 s keeps the worst case (8.6 s, or ~11 s when the etcd leader
/// dies with the holder) inside the ≤ 10 s target for the common case, while staying well
/// above the 5 s floor below which a leader election (keepalives stalled 1.47 s measured)
/// turns into spurious failovers. See `docs/design/control-plane.md`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(8);

/// Keepalives per TTL: a renewal every TTL/3 survives two lost or stalled renewals in a row
/// before the lease lapses.
pub const KEEPALIVES_PER_TTL: u32 = 3;

/// Shortest TTL a backend grants (etcd's own floor with its default 1 s election timeout is
/// `ceil(1.5 × election timeout)` = 2 s; shorter requests are raised to it, as etcd does).
/// Only tests should come near it: production TTLs stay ≥ 5 s (see `DEFAULT_LEASE_TTL`).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// The interval at which a holder should renew a lease of `ttl`.
pub fn keepalive_interval(ttl: Duration) -> Duration {
    ttl / KEEPALIVES_PER_TTL
}

/// A lease id (etcd's int64 lease ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The TTL the store granted (whole seconds on etcd, at least `MIN_LEASE_TTL`).
    pub ttl: Duration,
}

/// The value under `owners/<volume>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub node: NodeId,
    /// The holder's session lease the key is bound to.
    pub lease: LeaseId,
    /// Wall-clock time of the acquisition, for "held since" messages.
    pub since_ms: u64,
}

/// The value under `alive/<node id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliveRecord {
    pub lease: LeaseId,
    pub since_ms: u64,
}

/// `acquire_owner` won: this node now owns the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    /// The owner key's creation revision: higher than any generation handed out before.
    pub generation: Generation,
}

/// `acquire_owner` lost: someone holds the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub holder: NodeId,
    pub lease: LeaseId,
    pub generation: Generation,
    pub since_ms: u64,
    /// Time until the holder's lease expires unless renewed (`None` if it could not be read
    /// or just expired).
    pub remaining_ttl: Option<Duration>,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "held by node {} at generation {} since {} ms after the epoch",
            self.holder, self.generation, self.since_ms
        )?;
        if let Some(t) = self.remaining_ttl {
            write!(
                f,
                " (its lease expires in {} s unless renewed)",
                t.as_secs()
            )?;
        }
        Ok(())
    }
}

/// One change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Relative to the catalog root, like every `Key`.
    pub key: Key,
    /// The new value; empty when `deleted`.
    pub value: Vec<u8>,
    /// The revision of the change (the deletion's revision for a delete).
    pub mod_revision: Revision,
    /// A delete, or a lease expiry/revocation that removed the key.
    pub deleted: bool,
}

/// Events a watcher may have buffered before the watch task waits for it.
pub const WATCH_BUFFER: usize = 256;

/// A catalog with leases and watches: what cluster mode runs on. Both backends implement
/// it, so single-node tests exercise the same code paths as a cluster.
pub trait ClusterStore: Catalog {
    /// Grants a lease of at least `ttl` (raised to `MIN_LEASE_TTL`; whole seconds on etcd).
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<Lease>> + Send;

    /// Renews the lease; returns the TTL it now has. `LeaseExpired` if it is gone.
    fn keep_alive(&self, id: LeaseId) -> impl Future<Output = Result<Duration>> + Send;

    /// Revokes the lease and deletes its keys at once. Revoking a gone lease is not an error.
    fn revoke(&self, id: LeaseId) -> impl Future<Output = Result<()>> + Send;

    /// Remaining TTL, or `None` if the lease is gone.
    fn time_to_live(&self, id: LeaseId) -> impl Future<Output = Result<Option<Duration>>> + Send;

    /// Like `list`, plus the store revision the listing was read at: watch from the revision
    /// after it to see every later change exactly once.
    fn list_at(&self, prefix: Prefix) -> impl Future<Output = Result<(Rows, Revision)>> + Send;

    /// Streams every change under `prefix` with a revision ≥ `from` (`Revision(0)`: from
    /// when the watch is established), in revision order, across reconnects. The channel
    /// closes when the receiver's history is gone (compacted, or the watcher fell too far
    /// behind): re-list with `list_at` and watch again. Must be called inside a tokio runtime.
    fn watch_prefix(&self, prefix: Prefix, from: Revision) -> mpsc::Receiver<WatchEvent>;

    /// Takes ownership of `volume` for `node`, bound to `lease`, in one transaction: wins if
    /// nobody holds it, else reports the holder. `LeaseExpired` if `lease` is gone.
    fn acquire_owner(
        &self,
        volume: &Name,
        node: &NodeId,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Result<Acquired, Held>>> + Send {
        async move {
            let rec = OwnerRecord {
                node: node.clone(),
                lease,
                since_ms: now_ms(),
            };
            let key = Key::owner(volume);
            for _ in 0..ACQUIRE_ATTEMPTS {
                let op = TxnOp {
                    key: key.clone(),
                    expect: Expect::Absent,
                    change: Change::PutWithLease(encode(&rec), lease),
                };
                match self.txn(vec![op]).await {
                    Ok(rev) => {
                        return Ok(Ok(Acquired {
                            generation: Generation(rev.0),
                        }))
                    }
                    Err(e) if e.is_conflict() => {}
                    Err(e) => return Err(e),
                }
                if let Some(held) = self.get_owner(volume).await? {
                    return Ok(Err(self.with_ttl(held).await));
                }
                // Released between our txn and our read: try again.
            }
            Err(contended(volume))
        }
    }

    /// Deletes the owner key if it is still the one created at `generation`; `false` if it
    /// is gone or belongs to a later owner (then there is nothing of ours to release).
    fn release_owner(
        &self,
        volume: &Name,
        generation: Generation,
    ) -> impl Future<Output = Result<bool>> + Send {
        // Owner keys are never rewritten, so the modification revision is the creation one.
        let op = TxnOp {
            key: Key::owner(volume),
            expect: Expect::At(Revision(generation.0)),
            change: Change::Delete,
        };
        async move {
            match self.txn(vec![op]).await {
                Ok(_) => Ok(true),
                Err(e) if e.is_conflict() => Ok(false),
                Err(e) => Err(e),
            }
        }
    }

    /// The current owner of `volume` (remaining TTL not filled in).
    fn get_owner(&self, volume: &Name) -> impl Future<Output = Result<Option<Held>>> + Send {
        let key = Key::owner(volume);
        async move {
            let Some((bytes, rev)) = self.get(&key).await? else {
                return Ok(None);
            };
            let rec: OwnerRecord = decode(key.as_str(), &bytes)?;
            Ok(Some(held_from(rec, Generation(rev.0))))
        }
    }

    /// Fills in `remaining_ttl` (best effort: a failed read leaves `None`).
    fn with_ttl(&self, mut held: Held) -> impl Future<Output = Held> + Send {
        async move {
            held.remaining_ttl = self.time_to_live(held.lease).await.ok().flatten();
            held
        }
    }

    /// Writes `alive/<node>` bound to the node's session lease (last writer wins: only the
    /// node itself writes its key).
    fn register_alive(
        &self,
        node: &NodeId,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Revision>> + Send {
        let rec = AliveRecord {
            lease,
            since_ms: now_ms(),
        };
        let op = TxnOp {
            key: Key::alive(node),
            expect: Expect::Any,
            change: Change::PutWithLease(encode(&rec), lease),
        };
        async move { self.txn(vec![op]).await }
    }

    /// The nodes whose liveness key exists, with their records.
    fn list_alive(&self) -> impl Future<Output = Result<Vec<(NodeId, AliveRecord)>>> + Send {
        async move {
            let rows = self.list(Prefix::Alive).await?;
            rows.into_iter()
                .map(|(k, v, _)| {
                    let id = k
                        .as_str()
                        .strip_prefix(Prefix::Alive.as_str())
                        .unwrap_or("");
                    Ok((NodeId(id.to_owned()), decode(k.as_str(), &v)?))
                })
                .collect()
        }
    }
}

/// Rounds of "create failed, but the key was gone when read" before giving up; each round
/// means another node released the volume in between, so more than a few is a livelock.
pub const ACQUIRE_ATTEMPTS: usize = 5;

pub(crate) fn held_from(rec: OwnerRecord, generation: Generation) -> Held {
    Held {
        holder: rec.node,
        lease: rec.lease,
        generation,
        since_ms: rec.since_ms,
        remaining_ttl: None,
    }
}

pub(crate) fn contended(volume: &Name) -> CatalogError {
    CatalogError::Conflict {
        key: Key::owner(volume),
        expected: Expect::Absent,
        found: None,
    }
}
