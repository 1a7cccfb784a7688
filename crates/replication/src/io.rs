//! The core's interface: [`Event`]s in, [`Effect`]s out.
//!
//! The driver feeds every event to [`crate::Replicator::apply`] and performs the effects in
//! the order they were emitted. Effects that ask for something durable (metadata, catalog)
//! are answered by a later event; the core never assumes they happened before that event.

use bw_types::Generation;

use crate::ids::{
    CopyId, DataHandle, MetaBatchId, OpId, RegionIndex, ReplicaId, RequestId, SessionId, TxnId,
};

/// An input to the core.
#[derive(Clone, Debug)]
pub enum Event {
    /// A client write of `len` bytes at `offset`; the bytes stay with the driver under `data`.
    Write {
        req: RequestId,
        offset: u64,
        len: u64,
        data: DataHandle,
        fua: bool,
    },
    /// A client flush: completes once every write completed before it is durable on every
    /// in-sync replica.
    Flush { req: RequestId },
    /// A client read.
    Read {
        req: RequestId,
        offset: u64,
        len: u64,
    },
    /// A connection to `replica` is established and the replica admitted our generation.
    ReplicaUp {
        replica: ReplicaId,
        session: SessionId,
    },
    /// The connection is gone (closed, reset, timed out, the replica process died). Every
    /// operation sent on it counts as failed: the driver must make sure none of them is
    /// still applied after a later session's operations (see the design doc).
    ReplicaDown {
        replica: ReplicaId,
        session: SessionId,
        reason: String,
    },
    /// A replica answered an operation.
    ReplicaReply {
        replica: ReplicaId,
        session: SessionId,
        op: OpId,
        outcome: ReplicaOutcome,
    },
    /// A region copy finished: the target holds the source's content of the region.
    RegionCopied { copy: CopyId },
    /// A region copy failed because of `replica` (source or target); that replica is treated
    /// as failed.
    CopyFailed {
        copy: CopyId,
        replica: ReplicaId,
        reason: String,
    },
    /// The driver's resync rate limiter allows one more region copy to `replica`.
    ResyncCredit { replica: ReplicaId },
    /// A metadata batch is durable.
    MetaPersisted { batch: MetaBatchId },
    /// The answer to a catalog transaction.
    CatalogResult { txn: TxnId, outcome: TxnOutcome },
    /// Time passed; `now_ms` is the driver's monotonic clock.
    Tick { now_ms: u64 },
    /// A replica or the metadata store refused us: a newer attachment exists.
    Fenced { highest: Generation },
    /// The lease is gone (self-fencing deadline passed, or it was revoked).
    LeaseLost,
    /// The operator added a replica to the live volume (`volume add-replica`): it starts out
    /// of sync with `dirty` to copy (every region, for a new empty replica), receives writes
    /// once connected, and counts only after its resync and "mark in sync" transaction. An
    /// id the core already knows is ignored.
    AddReplica(crate::config::ReplicaInit),
    /// The front end sends no more client requests (a clean detach): from now on regions
    /// leave the activity log as soon as they are idle and covered by a flush on every
    /// replica written (no hot time), and a flush for that is queued at once, so the log
    /// empties and the next attachment has nothing to reconcile. Safety is unchanged (the
    /// same rule as cooling); a request that still arrives is served as usual.
    Quiesce,
}

/// How a replica answered one operation.
#[derive(Clone, Debug)]
pub enum ReplicaOutcome {
    /// Write applied (durable if FUA), flush durable.
    Done,
    /// Read data, held by the driver.
    Data(DataHandle),
    /// I/O error, no space, faulted replica: the replica fail-stops for this attachment.
    Failed(String),
    /// The replica has admitted a newer generation.
    Fenced { highest: Generation },
}

/// The answer to a catalog transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    Committed,
    /// The generation condition failed: a newer attachment exists.
    Refused,
    /// The catalog could not be reached; the change may or may not have been applied.
    /// Transactions are idempotent compare-and-swaps, so the core simply retries.
    Unavailable,
}

/// A change to the catalog's in-sync set, conditioned on the attachment's generation: the
/// catalog refuses it if the volume's generation is no longer `generation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogOp {
    MarkOutOfSync {
        replica: ReplicaId,
        generation: Generation,
    },
    MarkInSync {
        replica: ReplicaId,
        generation: Generation,
    },
}

/// Metadata to persist, in one durable step. The driver applies the batch atomically, or in
/// this order: `dirty_clear`, `dirty_add`, `al_add`, `al_remove` (so a crash in the middle
/// never loses an addition that a removal of the same batch relied on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaBatch {
    /// Regions entering the activity log.
    pub al_add: Vec<RegionIndex>,
    /// Regions leaving it (cold: no write in flight, durable on every replica written).
    pub al_remove: Vec<RegionIndex>,
    /// Regions to set in a replica's dirty bitmap.
    pub dirty_add: Vec<(ReplicaId, RegionIndex)>,
    /// Replicas whose bitmap is cleared (they rejoined the in-sync set).
    pub dirty_clear: Vec<ReplicaId>,
}

impl MetaBatch {
    pub fn is_empty(&self) -> bool {
        self.al_add.is_empty()
            && self.al_remove.is_empty()
            && self.dirty_add.is_empty()
            && self.dirty_clear.is_empty()
    }
}

/// Why a region is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyPurpose {
    /// Incremental resync of a replica that missed writes.
    Resync,
    /// Crash reconciliation of a region in the previous attachment's activity log.
    Reconcile,
}

/// An output of the core, for the driver to perform.
#[derive(Clone, Debug)]
pub enum Effect {
    SendWrite {
        replica: ReplicaId,
        session: SessionId,
        op: OpId,
        offset: u64,
        len: u64,
        data: DataHandle,
        fua: bool,
    },
    SendFlush {
        replica: ReplicaId,
        session: SessionId,
        op: OpId,
    },
    SendRead {
        replica: ReplicaId,
        session: SessionId,
        op: OpId,
        offset: u64,
        len: u64,
    },
    /// Close this session (the replica failed an operation and is fail-stopped for us).
    Disconnect {
        replica: ReplicaId,
        session: SessionId,
    },
    /// Answer a client request.
    Reply {
        req: RequestId,
        result: Result<Completion, RequestError>,
    },
    /// Persist a metadata batch, then answer [`Event::MetaPersisted`].
    PersistMeta {
        batch: MetaBatchId,
        changes: MetaBatch,
    },
    /// Run a catalog transaction, then answer [`Event::CatalogResult`].
    CatalogTxn { txn: TxnId, op: CatalogOp },
    /// Copy one region from `from` to `to` (read all of it, write all of it), then answer
    /// [`Event::RegionCopied`] or [`Event::CopyFailed`].
    CopyRegion {
        copy: CopyId,
        region: RegionIndex,
        from: ReplicaId,
        from_session: SessionId,
        to: ReplicaId,
        to_session: SessionId,
        purpose: CopyPurpose,
    },
    /// Something an operator should see (events API, alert hooks, metrics).
    Notify(Notice),
    /// The attachment is over: stop serving, close every session. Emitted once.
    Stop(StopReason),
}

/// A successful client completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    Written,
    Flushed,
    Data(DataHandle),
}

/// Why a client request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request is outside the volume")]
    OutOfRange,
    #[error("request touches {regions} regions, more than the activity log holds ({max})")]
    TooLarge { regions: usize, max: usize },
    #[error("request id is already in flight")]
    DuplicateId,
    #[error("too many requests in flight")]
    Busy,
    #[error("no in-sync replica could serve the read: {0}")]
    ReadFailed(String),
    #[error("the attachment stopped: {0}")]
    Stopped(StopReason),
}

/// Why the attachment stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StopReason {
    #[error("fenced by a newer attachment (generation {0})")]
    Fenced(Generation),
    #[error("the lease was lost")]
    LeaseLost,
    /// The catalog refused a transaction conditioned on our generation.
    #[error(
        "the catalog refused a change conditioned on generation {0}: a newer attachment exists"
    )]
    Superseded(Generation),
    #[error("the last in-sync replica {0} failed; its unflushed writes may be lost")]
    NoInSyncReplica(ReplicaId),
}

/// Operator-visible events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A replica failed; it leaves the in-sync set once the catalog agrees.
    ReplicaFailed {
        replica: ReplicaId,
        reason: String,
    },
    /// The catalog committed the drop: the volume is degraded, the replica tracked dirty.
    Degraded {
        replica: ReplicaId,
        in_sync: usize,
    },
    /// The catalog could not be reached to drop a failed replica: writes are held.
    WritesHeld {
        replica: ReplicaId,
    },
    ResyncStarted {
        replica: ReplicaId,
        regions: u64,
    },
    ResyncProgress {
        replica: ReplicaId,
        copied: u64,
        total: u64,
    },
    ResyncFinished {
        replica: ReplicaId,
    },
    Rejoined {
        replica: ReplicaId,
    },
    /// A new attachment found no in-sync replica reachable; it waits.
    WaitingForInSyncReplica,
    ReconcileStarted {
        source: ReplicaId,
        regions: u64,
    },
    /// Reconciliation done (or not needed): client I/O is served from now on.
    Serving,
}
