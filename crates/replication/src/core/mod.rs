//! [`Replicator`]: the state of one attached volume and the event loop over it.
//!
//! Every event is handled in two steps: the handler records what happened (an ack, a
//! failure, a commit), then [`Replicator::pump`] re-derives what can move now (send queued
//! writes, start copies, answer clients) until nothing changes. Handlers never answer a
//! client directly; only the pump does, from one place per rule, so the rules read in one
//! spot each: `write_ackable`, `flush_complete` (requests.rs), `leave_in_sync`
//! (membership.rs), `schedule_copies` (copy.rs).

mod copy;
mod membership;
mod requests;

use std::collections::{BTreeMap, BTreeSet};

use bw_types::Generation;

use crate::activity_log::{ActivityLog, MetaQueue};
use crate::config::{AttachInit, Config, MAX_RESYNC_CREDITS};
use crate::ids::{
    ByteRange, CopyId, DataHandle, OpId, RegionIndex, RegionSet, ReplicaId, RequestId, SessionId,
    TxnId,
};
use crate::io::{CatalogOp, CopyPurpose, Effect, Event, RequestError, StopReason};
use crate::replica::{Membership, Replica, ReplicaState, ReplicaStatus};

/// Activity-log fill (numerator, denominator) above which the core keeps a flush going so
/// that eviction finds flushed regions when the log fills up.
const LOG_HIGH_WATER: (usize, usize) = (3, 4);

/// Where the attachment is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the catalog's in-sync replicas to connect (until the connect timeout).
    Connecting,
    /// Copying the previous activity log's regions from `source` to the other in-sync
    /// replicas; `todo` holds the (region, target) pairs not copied yet.
    Reconciling {
        source: ReplicaId,
        todo: BTreeSet<(RegionIndex, ReplicaId)>,
    },
    Serving,
    Stopped(StopReason),
}

/// One replica's part of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leg {
    Pending(SessionId),
    Acked,
    Failed,
}

/// A client write.
#[derive(Clone, Debug)]
struct WriteOp {
    req: RequestId,
    range: ByteRange,
    data: DataHandle,
    fua: bool,
    regions: Vec<RegionIndex>,
    /// Sent to the replicas (else queued).
    sent: bool,
    /// The replicas it was sent to and how they answered.
    legs: BTreeMap<ReplicaId, Leg>,
    replied: bool,
    /// Every leg answered (or failed): the activity log no longer counts it in flight.
    done: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FlushKind {
    Client(RequestId),
    /// Issued by the core to let idle activity-log regions go cold.
    Internal,
    /// The flush that ends a replica's resync (sent to that replica only).
    Barrier(ReplicaId),
}

#[derive(Clone, Debug)]
struct FlushOp {
    kind: FlushKind,
    /// Sequence number among AL-relevant flushes (0 for barriers and while queued).
    seq: u64,
    sent: bool,
    legs: BTreeMap<ReplicaId, Leg>,
    replied: bool,
}

#[derive(Clone, Debug)]
struct ReadOp {
    req: RequestId,
    range: ByteRange,
    target: Option<(ReplicaId, SessionId)>,
    /// Replicas that answered with an error (not asked again).
    tried: BTreeSet<ReplicaId>,
    last_error: Option<String>,
}

#[derive(Clone, Debug)]
struct CopyJob {
    /// Handed to the driver (else reserved: the region is locked and the copy waits for
    /// the writes in flight to it to finish).
    issued: bool,
    region: RegionIndex,
    from: ReplicaId,
    to: ReplicaId,
    to_session: SessionId,
    purpose: CopyPurpose,
}

/// Where emptying the activity log stands ([`Replicator::log_drain`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogDrain {
    /// The log is empty in memory and no metadata write is pending or in flight: every
    /// replica that took the last batch holds an empty log.
    Empty,
    /// Regions are still in flight, waiting for a flush, or their removal is being
    /// persisted.
    Draining,
    /// It cannot empty now: not serving yet, stopped, or a replica the catalog may still
    /// count is not receiving writes (the log must keep covering what it may lack).
    Blocked,
}

/// Summary for status output and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub generation: Generation,
    /// Reconciliation done, client I/O served.
    pub serving: bool,
    pub stopped: Option<StopReason>,
    pub replicas: Vec<ReplicaStatus>,
    /// Regions in the activity log.
    pub active_regions: usize,
    /// Regions evicted from the full activity log so far (a working set larger than the
    /// log: each eviction round costs a flush on every replica).
    pub evicted_regions: u64,
    /// Client requests held or in flight.
    pub requests: usize,
}

/// The synchronous-replication core of one attached volume. See the crate docs and
/// `docs/design/replication.md`.
#[derive(Debug)]
pub struct Replicator {
    cfg: Config,
    generation: Generation,
    /// The driver's clock as of the last tick (or attach).
    now_ms: u64,
    /// When the attachment started (connect timeout).
    started_ms: u64,
    phase: Phase,
    /// Warned that no in-sync replica is reachable (emit once).
    warned_no_source: bool,
    replicas: BTreeMap<ReplicaId, Replica>,
    al: ActivityLog,
    meta: MetaQueue,
    /// Previous attachment's activity log: reconciled before serving.
    previous_al: RegionSet,
    writes: BTreeMap<OpId, WriteOp>,
    flushes: BTreeMap<OpId, FlushOp>,
    reads: BTreeMap<OpId, ReadOp>,
    /// Client request ids in flight (duplicate detection, the request limit).
    requests: BTreeSet<RequestId>,
    copies: BTreeMap<CopyId, CopyJob>,
    /// Regions with a copy in flight: writes to them wait.
    copy_locks: RegionSet,
    txns: BTreeMap<TxnId, (ReplicaId, CatalogOp)>,
    next_id: u64,
    /// AL-relevant flushes issued so far / highest one completed on every target.
    flushes_issued: u64,
    durable_flush: u64,
    /// When the last flush for activity-log cooling was queued.
    last_cooling_flush_ms: u64,
    /// [`Event::Quiesce`] came: regions cool without a hot time.
    quiescing: bool,
}

impl Replicator {
    /// Starts an attachment. The driver then connects every replica (reporting
    /// [`Event::ReplicaUp`]) and ticks; I/O is served once reconciliation is done.
    pub fn new(cfg: Config, init: AttachInit) -> Replicator {
        let prev = init.previous_activity_log.clone();
        let mut meta = MetaQueue::default();
        let mut replicas = BTreeMap::new();
        for ri in &init.replicas {
            let (membership, durable) = if ri.in_sync {
                (Membership::InSync, RegionSet::new())
            } else {
                (Membership::OutOfSync, ri.dirty.clone())
            };
            let mut r = Replica::new(
                ri.id,
                ri.local,
                membership,
                durable,
                ri.last_in_sync_generation,
            );
            if !ri.in_sync {
                // Regions in flight when the previous attachment ended may differ on this
                // replica too: add them to its bitmap (durably, before anything relies on it).
                for k in &prev {
                    if r.mark_dirty(*k) {
                        meta.dirty(ri.id, *k);
                    }
                }
            }
            replicas.insert(ri.id, r);
        }
        Replicator {
            al: ActivityLog::new(cfg.max_active_regions, &prev, init.now_ms),
            cfg,
            generation: init.generation,
            now_ms: init.now_ms,
            started_ms: init.now_ms,
            phase: Phase::Connecting,
            warned_no_source: false,
            replicas,
            meta,
            previous_al: prev,
            writes: BTreeMap::new(),
            flushes: BTreeMap::new(),
            reads: BTreeMap::new(),
            requests: BTreeSet::new(),
            copies: BTreeMap::new(),
            copy_locks: RegionSet::new(),
            txns: BTreeMap::new(),
            next_id: 0,
            flushes_issued: 0,
            durable_flush: 0,
            last_cooling_flush_ms: 0,
            quiescing: false,
        }
    }

    /// Handles one event, appending the effects to perform to `out`.
    pub fn apply(&mut self, event: Event, out: &mut Vec<Effect>) {
        if let Phase::Stopped(reason) = &self.phase {
            // Nothing more is sent or acknowledged; clients get the reason.
            if let Event::Write { req, .. } | Event::Flush { req } | Event::Read { req, .. } = event
            {
                out.push(Effect::Reply {
                    req,
                    result: Err(RequestError::Stopped(reason.clone())),
                });
            }
            return;
        }
        match event {
            Event::Write {
                req,
                offset,
                len,
                data,
                fua,
            } => self.client_write(req, offset, len, data, fua, out),
            Event::Flush { req } => self.client_flush(req, out),
            Event::Read { req, offset, len } => self.client_read(req, offset, len, out),
            Event::ReplicaUp { replica, session } => self.replica_up(replica, session, out),
            Event::ReplicaDown {
                replica,
                session,
                reason,
            } => {
                if self.replicas.get(&replica).and_then(Replica::session) == Some(session) {
                    self.fail_replica(replica, reason, false, out);
                }
            }
            Event::ReplicaReply {
                replica,
                session,
                op,
                outcome,
            } => self.replica_reply(replica, session, op, outcome, out),
            Event::RegionCopied { copy } => self.copy_done(copy, out),
            Event::CopyFailed {
                copy,
                replica,
                reason,
            } => self.copy_failed(copy, replica, reason, out),
            Event::ResyncCredit { replica } => {
                if let Some(r) = self.replicas.get_mut(&replica) {
                    r.credits = (r.credits + 1).min(MAX_RESYNC_CREDITS);
                }
            }
            Event::MetaPersisted { batch } => self.meta_persisted(batch),
            Event::CatalogResult { txn, outcome } => self.catalog_result(txn, outcome, out),
            Event::Tick { now_ms } => self.tick(now_ms),
            Event::Fenced { highest } => self.stop(StopReason::Fenced(highest), out),
            Event::LeaseLost => self.stop(StopReason::LeaseLost, out),
            Event::AddReplica(ri) => self.add_replica(ri),
            Event::Quiesce => {
                self.quiescing = true;
                self.tick(self.now_ms);
            }
        }
        self.pump(out);
    }

    /// A replica added to the live volume: out of sync, every given region dirty. Nothing
    /// waits for it until it rejoins, so adding it cannot stall writes.
    fn add_replica(&mut self, ri: crate::config::ReplicaInit) {
        if self.replicas.contains_key(&ri.id) {
            return;
        }
        let r = Replica::new(
            ri.id,
            ri.local,
            Membership::OutOfSync,
            ri.dirty,
            ri.last_in_sync_generation,
        );
        self.replicas.insert(ri.id, r);
    }

    /// Re-derives everything that can move, until nothing does.
    fn pump(&mut self, out: &mut Vec<Effect>) {
        loop {
            if self.is_stopped() {
                return;
            }
            let mut moved = self.advance_phase(out);
            moved |= self.dispatch_writes(out);
            moved |= self.keep_log_room();
            moved |= self.dispatch_flushes(out);
            moved |= self.dispatch_reads(out);
            moved |= self.schedule_copies(out);
            moved |= self.advance_joins(out);
            moved |= self.complete_requests(out);
            if !moved {
                break;
            }
        }
        if let Some((batch, changes)) = self.meta.take_next() {
            out.push(Effect::PersistMeta { batch, changes });
        }
    }

    /// Time passed: retries come due (in the pump), cold regions leave the log, and idle
    /// regions that wait only for a flush get one.
    fn tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if self.phase != Phase::Serving {
            return;
        }
        let hot = if self.quiescing {
            0
        } else {
            self.cfg.al_hot_ms
        };
        let now = self.now_ms;
        if !self.absent_member() {
            self.al.cool(
                now,
                hot,
                self.durable_flush,
                &self.copy_locks,
                &mut self.meta,
            );
        }
        // Cooling is not urgent: at most one flush per half hot time for it, so a stream of
        // regions going idle one by one does not cost a device flush per tick.
        if now >= self.last_cooling_flush_ms + hot / 2
            && self.al.wants_flush(now, hot, self.durable_flush)
            && self.internal_flush()
        {
            self.last_cooling_flush_ms = now;
        }
    }

    /// While the catalog may count a replica that is not receiving writes (a failed one not
    /// yet dropped), nothing leaves the activity log (neither cold nor evicted): a new
    /// attachment would treat that replica as in sync and reconcile only the log's regions,
    /// so the log must still cover every region it may lack.
    pub(super) fn absent_member(&self) -> bool {
        self.replicas.values().any(|r| r.counts() && !r.receiving())
    }

    /// Keeps eviction candidates ready: when a write found the activity log full, or the
    /// log is over [`LOG_HIGH_WATER`] full, and a flush would let idle regions be evicted,
    /// issue one now (one at a time) rather than at the next tick. Without the high-water
    /// mark a write that needs room waits for a whole flush, which makes every replica write
    /// back all its dirty pages (hundreds of ms under a sequential stream).
    fn keep_log_room(&mut self) -> bool {
        let starved = self.al.take_starved();
        let high =
            self.al.len() * LOG_HIGH_WATER.1 >= self.cfg.max_active_regions * LOG_HIGH_WATER.0;
        (starved || high)
            && !self.absent_member()
            && self.al.flush_frees_room(self.durable_flush)
            && self.internal_flush()
    }

    /// Queues an internal flush unless one is pending; true if it queued one.
    fn internal_flush(&mut self) -> bool {
        if self.flushes.values().any(|f| f.kind == FlushKind::Internal) {
            return false;
        }
        let op = self.next_op();
        let f = FlushOp {
            kind: FlushKind::Internal,
            seq: 0,
            sent: false,
            legs: BTreeMap::new(),
            replied: false,
        };
        self.flushes.insert(op, f);
        true
    }

    fn meta_persisted(&mut self, batch: crate::ids::MetaBatchId) {
        let Some(b) = self.meta.persisted(batch) else {
            return;
        };
        self.al.persisted(&b);
        for (rid, k) in &b.dirty_add {
            if let Some(r) = self.replicas.get_mut(rid) {
                // A bit cleared by a rejoin meanwhile stays cleared.
                if r.dirty.contains(k) {
                    r.dirty_durable.insert(*k);
                }
            }
        }
    }

    /// Ends the attachment: every pending client request fails, nothing more is sent.
    fn stop(&mut self, reason: StopReason, out: &mut Vec<Effect>) {
        if self.is_stopped() {
            return;
        }
        let err = RequestError::Stopped(reason.clone());
        let mut reqs: Vec<RequestId> = self.requests.iter().copied().collect();
        reqs.sort();
        for req in reqs {
            out.push(Effect::Reply {
                req,
                result: Err(err.clone()),
            });
        }
        self.requests.clear();
        self.writes.clear();
        self.flushes.clear();
        self.reads.clear();
        self.phase = Phase::Stopped(reason.clone());
        out.push(Effect::Stop(reason));
    }

    fn next_op(&mut self) -> OpId {
        self.next_id += 1;
        OpId(self.next_id)
    }

    fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped(_))
    }

    fn serving(&self) -> bool {
        self.phase == Phase::Serving
    }

    /// In-sync (or joining) replicas that are connected: what `min_in_sync` counts.
    fn healthy_members(&self) -> usize {
        self.replicas
            .values()
            .filter(|r| r.healthy_member())
            .count()
    }

    /// True once reconciliation is done and client I/O is served.
    pub fn is_serving(&self) -> bool {
        self.serving()
    }

    /// The generation this attachment writes with.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The state of one replica, as status shows it.
    pub fn replica_state(&self, id: ReplicaId) -> Option<ReplicaState> {
        self.replicas.get(&id).map(Replica::state)
    }

    /// Resync credits `id` holds and has not used yet. The driver's rate limiter grants a
    /// new credit only when this is zero, so at most one region copy's worth of tokens is
    /// ever banked in the core (the burst stays one region).
    pub fn resync_credits(&self, id: ReplicaId) -> u32 {
        self.replicas.get(&id).map_or(0, |r| r.credits)
    }

    /// Regions currently in the activity log (in memory; the persisted log may hold more).
    pub fn activity_log(&self) -> RegionSet {
        self.al.regions()
    }

    /// Where emptying the activity log after [`Event::Quiesce`] stands.
    pub fn log_drain(&self) -> LogDrain {
        if self.is_stopped() || !self.serving() || self.absent_member() {
            LogDrain::Blocked
        } else if self.al.len() == 0 && self.meta.idle() {
            LogDrain::Empty
        } else {
            LogDrain::Draining
        }
    }

    /// A dump of the operations in flight (simulation failure reports).
    pub fn debug_pending(&self) -> String {
        format!(
            "writes {:?}\nflushes {:?}\nreads {:?}\ncopies {:?} locks {:?}\nal {:?}\nmeta {:?}",
            self.writes, self.flushes, self.reads, self.copies, self.copy_locks, self.al, self.meta
        )
    }

    /// Everything status output needs.
    pub fn status(&self) -> Status {
        let replicas = self
            .replicas
            .values()
            .map(|r| ReplicaStatus {
                id: r.id,
                state: r.state(),
                dirty_regions: r.dirty.len() as u64,
                resync_copied: r.copied,
                resync_total: r.total,
                last_error: r.last_error.clone(),
            })
            .collect();
        Status {
            generation: self.generation,
            serving: self.serving(),
            stopped: match &self.phase {
                Phase::Stopped(r) => Some(r.clone()),
                _ => None,
            },
            replicas,
            active_regions: self.al.len(),
            evicted_regions: self.al.evicted(),
            requests: self.requests.len(),
        }
    }
}
