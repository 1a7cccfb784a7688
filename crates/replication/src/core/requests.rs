//! The client data path: intake, dispatch to replicas, replica replies, and the two rules
//! that decide when a client is answered (`write_ackable`, `flush_complete`).

use std::collections::{BTreeMap, BTreeSet};

use crate::activity_log::Room;
use crate::config::MAX_CLIENT_REQUESTS;
use crate::ids::{ByteRange, DataHandle, OpId, ReplicaId, RequestId, SessionId};
use crate::io::{Completion, Effect, ReplicaOutcome, RequestError, StopReason};
use crate::replica::{JoinPhase, Membership, Replica};

use super::{FlushKind, FlushOp, Leg, ReadOp, Replicator, WriteOp};

impl Replicator {
    /// Checks a new request against the limits; on refusal the reply is already emitted.
    fn intake(&mut self, req: RequestId, range: Option<ByteRange>, out: &mut Vec<Effect>) -> bool {
        let refusal = if self.requests.contains(&req) {
            Some(RequestError::DuplicateId)
        } else if self.requests.len() >= MAX_CLIENT_REQUESTS {
            Some(RequestError::Busy)
        } else if range.is_some_and(|r| {
            r.offset
                .checked_add(r.len)
                .is_none_or(|e| e > self.cfg.volume_size_bytes)
        }) {
            Some(RequestError::OutOfRange)
        } else {
            None
        };
        if let Some(e) = refusal {
            out.push(Effect::Reply {
                req,
                result: Err(e),
            });
            return false;
        }
        self.requests.insert(req);
        true
    }

    pub(super) fn client_write(
        &mut self,
        req: RequestId,
        offset: u64,
        len: u64,
        data: DataHandle,
        fua: bool,
        out: &mut Vec<Effect>,
    ) {
        let range = ByteRange { offset, len };
        let regions: Vec<_> = range.regions(self.cfg.region_size_bytes).collect();
        if regions.len() > self.cfg.max_active_regions {
            let e = RequestError::TooLarge {
                regions: regions.len(),
                max: self.cfg.max_active_regions,
            };
            out.push(Effect::Reply {
                req,
                result: Err(e),
            });
            return;
        }
        if !self.intake(req, Some(range), out) {
            return;
        }
        if len == 0 {
            self.requests.remove(&req);
            out.push(Effect::Reply {
                req,
                result: Ok(Completion::Written),
            });
            return;
        }
        if self.serving() {
            let size = self.cfg.region_size_bytes;
            self.al.prefetch(
                offset,
                offset + len,
                size,
                self.cfg.volume_size_bytes.div_ceil(size),
                self.now_ms,
                &mut self.meta,
            );
        }
        let op = self.next_op();
        let w = WriteOp {
            req,
            range,
            data,
            fua,
            regions,
            sent: false,
            legs: BTreeMap::new(),
            replied: false,
            done: false,
        };
        self.writes.insert(op, w);
    }

    pub(super) fn client_flush(&mut self, req: RequestId, out: &mut Vec<Effect>) {
        if !self.intake(req, None, out) {
            return;
        }
        let op = self.next_op();
        let f = FlushOp {
            kind: FlushKind::Client(req),
            seq: 0,
            sent: false,
            legs: BTreeMap::new(),
            replied: false,
        };
        self.flushes.insert(op, f);
    }

    pub(super) fn client_read(
        &mut self,
        req: RequestId,
        offset: u64,
        len: u64,
        out: &mut Vec<Effect>,
    ) {
        let range = ByteRange { offset, len };
        if !self.intake(req, Some(range), out) {
            return;
        }
        let op = self.next_op();
        let r = ReadOp {
            req,
            range,
            target: None,
            tried: BTreeSet::new(),
            last_error: None,
        };
        self.reads.insert(op, r);
    }

    /// A queued write may go out once no earlier write overlapping it is unfinished (so
    /// every replica applies overlapping writes in the same order) and none of its regions
    /// is being copied (so a copy can never land after it and bring back old data).
    fn write_blocked(&self, op: OpId) -> bool {
        let w = &self.writes[&op];
        let earlier = self
            .writes
            .range(..op)
            .any(|(_, o)| !o.done && o.range.overlaps(&w.range));
        let copying = self.cfg.rules.hold_writes_during_copy
            && w.regions.iter().any(|r| self.copy_locks.contains(r));
        earlier || copying
    }

    pub(super) fn dispatch_writes(&mut self, out: &mut Vec<Effect>) -> bool {
        if !self.serving() || self.healthy_members() < self.cfg.min_in_sync {
            return false;
        }
        let queued: Vec<OpId> = self
            .writes
            .iter()
            .filter(|(_, w)| !w.sent)
            .map(|(id, _)| *id)
            .collect();
        let mut moved = false;
        for op in queued {
            if self.write_blocked(op) {
                continue;
            }
            // The activity-log rule: a region is durably in the log before any write to it
            // goes out, so a crash of this attachment always knows where replicas may differ.
            let regions = self.writes[&op].regions.clone();
            let room = (!self.absent_member()).then_some(Room {
                durable_flush: self.durable_flush,
                locked: &self.copy_locks,
            });
            if !self.al.admit(&regions, self.now_ms, room, &mut self.meta) {
                continue;
            }
            self.send_write(op, out);
            moved = true;
        }
        moved
    }

    fn send_write(&mut self, op: OpId, out: &mut Vec<Effect>) {
        let w = self.writes.get_mut(&op).expect("queued write");
        for r in self.replicas.values_mut() {
            if let (true, Some(session)) = (r.receiving(), r.session()) {
                w.legs.insert(r.id, Leg::Pending(session));
                out.push(Effect::SendWrite {
                    replica: r.id,
                    session,
                    op,
                    offset: w.range.offset,
                    len: w.range.len,
                    data: w.data,
                    fua: w.fua,
                });
            } else {
                // Not sent: the replica must get these regions by resync.
                for k in &w.regions {
                    if r.mark_dirty(*k) {
                        self.meta.dirty(r.id, *k);
                    }
                }
            }
        }
        w.sent = true;
        self.al.begin(&w.regions, self.now_ms);
        self.finish_write_if_done(op);
    }

    pub(super) fn dispatch_flushes(&mut self, out: &mut Vec<Effect>) -> bool {
        if !self.serving() {
            return false;
        }
        let below_min = self.healthy_members() < self.cfg.min_in_sync;
        let queued: Vec<OpId> = self
            .flushes
            .iter()
            .filter(|(_, f)| !f.sent)
            .map(|(id, _)| *id)
            .collect();
        let mut moved = false;
        for op in queued {
            let kind = self.flushes[&op].kind;
            if below_min && matches!(kind, FlushKind::Client(_)) {
                continue;
            }
            let targets: Vec<(ReplicaId, SessionId)> = match kind {
                FlushKind::Barrier(id) => self.replicas[&id]
                    .session()
                    .map(|s| (id, s))
                    .into_iter()
                    .collect(),
                _ => self
                    .replicas
                    .values()
                    .filter(|r| r.receiving())
                    .filter_map(|r| r.session().map(|s| (r.id, s)))
                    .collect(),
            };
            let seq = if matches!(kind, FlushKind::Barrier(_)) {
                0
            } else {
                self.flushes_issued += 1;
                self.flushes_issued
            };
            let f = self.flushes.get_mut(&op).expect("queued flush");
            f.seq = seq;
            f.sent = true;
            for (replica, session) in targets {
                f.legs.insert(replica, Leg::Pending(session));
                out.push(Effect::SendFlush {
                    replica,
                    session,
                    op,
                });
            }
            moved = true;
        }
        moved
    }

    /// Reads go to one in-sync replica: the local one if it is in sync, else the lowest id.
    pub(super) fn dispatch_reads(&mut self, out: &mut Vec<Effect>) -> bool {
        if !self.serving() {
            return false;
        }
        let queued: Vec<OpId> = self
            .reads
            .iter()
            .filter(|(_, r)| r.target.is_none())
            .map(|(id, _)| *id)
            .collect();
        let mut moved = false;
        for op in queued {
            let read = &self.reads[&op];
            let candidates: Vec<&Replica> = self
                .replicas
                .values()
                .filter(|r| r.in_sync() && r.session().is_some() && !read.tried.contains(&r.id))
                .collect();
            let pick = candidates
                .iter()
                .find(|r| r.local)
                .or(candidates.first())
                .map(|r| (r.id, r.session()));
            match pick {
                Some((replica, Some(session))) => {
                    let (offset, len) = (read.range.offset, read.range.len);
                    self.reads.get_mut(&op).expect("read").target = Some((replica, session));
                    out.push(Effect::SendRead {
                        replica,
                        session,
                        op,
                        offset,
                        len,
                    });
                    moved = true;
                }
                _ if !read.tried.is_empty()
                    && !self
                        .replicas
                        .values()
                        .any(|r| r.in_sync() && !read.tried.contains(&r.id)) =>
                {
                    let why = read.last_error.clone().unwrap_or_default();
                    let req = read.req;
                    self.reads.remove(&op);
                    self.requests.remove(&req);
                    out.push(Effect::Reply {
                        req,
                        result: Err(RequestError::ReadFailed(why)),
                    });
                    moved = true;
                }
                _ => {} // no in-sync replica connected right now: the read waits
            }
        }
        moved
    }

    pub(super) fn replica_reply(
        &mut self,
        replica: ReplicaId,
        session: SessionId,
        op: OpId,
        outcome: ReplicaOutcome,
        out: &mut Vec<Effect>,
    ) {
        if self.replicas.get(&replica).and_then(Replica::session) != Some(session) {
            return; // an older session: everything on it was already treated as failed
        }
        match outcome {
            ReplicaOutcome::Fenced { highest } => self.stop(StopReason::Fenced(highest), out),
            ReplicaOutcome::Failed(why) => {
                if let Some(read) = self.reads.get_mut(&op) {
                    // A read error changes nothing on disk: try another in-sync replica.
                    read.tried.insert(replica);
                    read.last_error = Some(why);
                    read.target = None;
                } else {
                    self.fail_replica(replica, why, true, out);
                }
            }
            ReplicaOutcome::Data(data) => {
                if let Some(read) = self.reads.remove(&op) {
                    self.requests.remove(&read.req);
                    out.push(Effect::Reply {
                        req: read.req,
                        result: Ok(Completion::Data(data)),
                    });
                }
            }
            ReplicaOutcome::Done => self.leg_acked(replica, session, op),
        }
    }

    fn leg_acked(&mut self, replica: ReplicaId, session: SessionId, op: OpId) {
        if let Some(w) = self.writes.get_mut(&op) {
            if w.legs.get(&replica) == Some(&Leg::Pending(session)) {
                w.legs.insert(replica, Leg::Acked);
            }
            self.finish_write_if_done(op);
        } else if let Some(f) = self.flushes.get_mut(&op) {
            if f.legs.get(&replica) == Some(&Leg::Pending(session)) {
                f.legs.insert(replica, Leg::Acked);
            }
            if f.kind == FlushKind::Barrier(replica) {
                self.barrier_acked(replica, op);
            }
        }
    }

    /// Once every leg answered, the write no longer counts as in flight in the log.
    pub(super) fn finish_write_if_done(&mut self, op: OpId) {
        let Some(w) = self.writes.get_mut(&op) else {
            return;
        };
        if w.done || !w.sent || w.legs.values().any(|l| matches!(l, Leg::Pending(_))) {
            return;
        }
        w.done = true;
        self.al.end(&w.regions, self.flushes_issued);
    }

    /// The write rule: acknowledged only when every replica the catalog may count as in sync
    /// applied it, and every other replica either applied it or has its regions durably in
    /// its dirty bitmap.
    fn write_ackable(&self, w: &WriteOp) -> bool {
        if !w.sent || self.healthy_members() < self.cfg.min_in_sync {
            return false;
        }
        self.replicas.values().all(|r| {
            let leg = w.legs.get(&r.id);
            match r.membership {
                // Failed and the catalog may still count it: only what it applied counts.
                _ if r.failed_member() => leg == Some(&Leg::Acked),
                Membership::Leaving { .. } => unreachable!("a failed member"),
                // No leg: it (re)joined after the write went out, and its resync copied the
                // write's regions after the write had finished everywhere (legs failed before
                // a rejoin are forgotten when the resync ends, see `advance_joins`).
                Membership::InSync | Membership::Joining(_) => {
                    matches!(leg, None | Some(Leg::Acked))
                }
                Membership::OutOfSync => {
                    let bitmap = if self.cfg.rules.bitmap_durable_before_ack {
                        &r.dirty_durable
                    } else {
                        &r.dirty
                    };
                    leg == Some(&Leg::Acked) || w.regions.iter().all(|k| bitmap.contains(k))
                }
            }
        })
    }

    /// The flush rule: every replica the catalog may count as in sync acknowledged this
    /// flush, or joined after it was sent (its barrier flush came later and covers it).
    fn flush_complete(&self, f: &FlushOp) -> bool {
        if !f.sent || self.healthy_members() < self.cfg.min_in_sync {
            return false;
        }
        self.replicas
            .values()
            .filter(|r| r.counts())
            .all(|r| match f.legs.get(&r.id) {
                Some(leg) => *leg == Leg::Acked,
                // Not sent to it because it joined later: its barrier flush, sent after
                // everything this flush covers was on it, must be durable. (A failed member
                // was not sent it because it had failed: held.)
                None => {
                    !r.failed_member()
                        && matches!(
                            r.membership,
                            Membership::InSync | Membership::Joining(JoinPhase::Txn { .. })
                        )
                }
            })
    }

    /// Answers every client request whose rule is met; retires finished operations.
    pub(super) fn complete_requests(&mut self, out: &mut Vec<Effect>) -> bool {
        let mut moved = false;
        let ackable: Vec<OpId> = self
            .writes
            .iter()
            .filter(|(_, w)| !w.replied && self.write_ackable(w))
            .map(|(id, _)| *id)
            .collect();
        for op in ackable {
            let w = self.writes.get_mut(&op).expect("write");
            w.replied = true;
            self.requests.remove(&w.req);
            out.push(Effect::Reply {
                req: w.req,
                result: Ok(Completion::Written),
            });
            moved = true;
        }
        self.writes.retain(|_, w| !(w.replied && w.done));

        let complete: Vec<OpId> = self
            .flushes
            .iter()
            .filter(|(_, f)| {
                !f.replied && matches!(f.kind, FlushKind::Client(_)) && self.flush_complete(f)
            })
            .map(|(id, _)| *id)
            .collect();
        for op in complete {
            let f = self.flushes.get_mut(&op).expect("flush");
            f.replied = true;
            if let FlushKind::Client(req) = f.kind {
                self.requests.remove(&req);
                out.push(Effect::Reply {
                    req,
                    result: Ok(Completion::Flushed),
                });
            }
            moved = true;
        }
        // A flush every target answered (or failed: failed replicas were marked dirty for
        // the whole log) makes the writes finished before it durable for the log's purpose.
        let durable = &mut self.durable_flush;
        self.flushes.retain(|_, f| {
            let answered = f.sent && f.legs.values().all(|l| !matches!(l, Leg::Pending(_)));
            if answered && f.seq > 0 {
                *durable = (*durable).max(f.seq);
            }
            let finished = answered && (f.replied || !matches!(f.kind, FlushKind::Client(_)));
            !finished
        });
        moved
    }
}
