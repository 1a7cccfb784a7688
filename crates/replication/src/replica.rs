//! What the core knows about one replica: its membership (what the catalog may believe), its
//! link (the current session), and the regions it may lack.

use bw_types::Generation;

use crate::ids::{OpId, RegionIndex, RegionSet, ReplicaId, SessionId, TxnId};

/// The replica's place relative to the catalog's in-sync set. Two questions drive every rule:
/// *may the catalog count it as in sync?* (then nothing is acknowledged without it) and
/// *is it receiving writes?* (then it is sent every write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Membership {
    /// In the catalog's in-sync set; must apply every write before it is acknowledged.
    InSync,
    /// Failed while in sync; the "mark out of sync" transaction has not committed yet, so
    /// the catalog still counts it and every write that needs it is held.
    Leaving {
        txn: Option<TxnId>,
        retry_at_ms: u64,
    },
    /// Out of the in-sync set: missed writes are tracked in `dirty`; resyncs while connected.
    OutOfSync,
    /// Resync finished; on its way back into the set. Counted like an in-sync replica from
    /// the moment it enters this state.
    Joining(JoinPhase),
}

/// The steps back into the in-sync set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum JoinPhase {
    /// Waiting for the writes sent before the resync finished to be applied, so the
    /// barrier flush covers them.
    Drain,
    /// Barrier flush sent.
    Barrier { op: OpId },
    /// "Mark in sync" transaction running (or waiting to be retried). `failed` records a
    /// failure meanwhile: the catalog may count the replica, so it leaves through a drop
    /// transaction once the join transaction's outcome is known.
    Txn {
        txn: Option<TxnId>,
        retry_at_ms: u64,
        failed: bool,
    },
}

/// The current connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    Down,
    Up(SessionId),
}

/// Per-replica state.
#[derive(Clone, Debug)]
pub(crate) struct Replica {
    pub id: ReplicaId,
    pub local: bool,
    /// From the catalog: the reconciliation source choice prefers the highest.
    pub last_in_sync_generation: Generation,
    pub membership: Membership,
    pub link: Link,
    /// Every region this replica may lack (in memory, persisted or not). Only grows until
    /// the replica rejoins.
    pub dirty: RegionSet,
    /// The part of `dirty` known durable.
    pub dirty_durable: RegionSet,
    /// Resync work list: regions still to copy in this resync pass.
    pub to_copy: RegionSet,
    /// Regions being copied to this replica right now.
    pub copying: RegionSet,
    /// Region copies the driver's rate limiter allows.
    pub credits: u32,
    /// Regions copied / to copy in the current resync pass (progress and ETA).
    pub copied: u64,
    pub total: u64,
    /// Last failure, for status ("faulted: I/O error …").
    pub last_error: Option<String>,
}

impl Replica {
    pub fn new(
        id: ReplicaId,
        local: bool,
        membership: Membership,
        dirty: RegionSet,
        last_in_sync_generation: Generation,
    ) -> Replica {
        Replica {
            id,
            local,
            last_in_sync_generation,
            membership,
            link: Link::Down,
            dirty_durable: dirty.clone(),
            dirty,
            to_copy: RegionSet::new(),
            copying: RegionSet::new(),
            credits: 0,
            copied: 0,
            total: 0,
            last_error: None,
        }
    }

    /// The catalog may count this replica as in sync: nothing is acknowledged without it.
    pub fn counts(&self) -> bool {
        !matches!(self.membership, Membership::OutOfSync)
    }

    /// Failed while the catalog may count it: only what it applied before failing counts.
    pub fn failed_member(&self) -> bool {
        matches!(
            self.membership,
            Membership::Leaving { .. } | Membership::Joining(JoinPhase::Txn { failed: true, .. })
        )
    }

    /// Definitely in the in-sync set and healthy (neither leaving nor joining).
    pub fn in_sync(&self) -> bool {
        self.membership == Membership::InSync
    }

    /// In the set or on its way in, and not failed: what `min_in_sync` counts.
    pub fn healthy_member(&self) -> bool {
        matches!(self.membership, Membership::InSync | Membership::Joining(_))
            && self.session().is_some()
    }

    pub fn session(&self) -> Option<SessionId> {
        match self.link {
            Link::Up(s) => Some(s),
            Link::Down => None,
        }
    }

    /// Connected and sent every write: in sync, joining, or resyncing.
    pub fn receiving(&self) -> bool {
        self.session().is_some() && !matches!(self.membership, Membership::Leaving { .. })
    }

    /// Marks `region` dirty; returns true when it was not dirty before (so it needs
    /// persisting).
    pub fn mark_dirty(&mut self, region: RegionIndex) -> bool {
        self.dirty.insert(region)
    }

    /// The public view of this replica.
    pub fn state(&self) -> ReplicaState {
        match (&self.membership, self.link) {
            (Membership::InSync, Link::Up(_)) => ReplicaState::InSync,
            (Membership::InSync, Link::Down) => ReplicaState::Connecting,
            (Membership::Leaving { .. }, _) => ReplicaState::Leaving,
            (Membership::OutOfSync, Link::Down) if self.last_error.is_some() => {
                ReplicaState::Faulted
            }
            (Membership::OutOfSync, Link::Down) => ReplicaState::Stale,
            (Membership::OutOfSync, Link::Up(_)) => ReplicaState::Resyncing,
            (Membership::Joining(_), _) => ReplicaState::Rejoining,
        }
    }
}

/// A replica's state as status and metrics show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    /// In the catalog's in-sync set, not connected yet (only right after attaching).
    Connecting,
    InSync,
    /// Failed; waiting for the catalog to drop it. Writes are held meanwhile.
    Leaving,
    /// Out of sync and unreachable; its missed regions are tracked.
    Stale,
    /// Out of sync after an I/O error; same as stale, with the error kept for status.
    Faulted,
    /// Out of sync, connected, being copied its dirty regions while receiving new writes.
    Resyncing,
    /// Resync finished; barrier flush and catalog transaction under way.
    Rejoining,
}

/// One replica in [`crate::Status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub id: ReplicaId,
    pub state: ReplicaState,
    /// Regions it may lack (to be resynced).
    pub dirty_regions: u64,
    /// Progress of the current resync pass: regions copied of `resync_total`.
    pub resync_copied: u64,
    pub resync_total: u64,
    pub last_error: Option<String>,
}
