//! Replicas coming and going: connection up/down, failures, the catalog transactions that
//! move a replica out of and back into the in-sync set, and the join sequence after resync.

use crate::ids::{ReplicaId, SessionId};
use crate::io::{CatalogOp, Effect, Notice, StopReason, TxnOutcome};
use crate::replica::{JoinPhase, Link, Membership};

use super::{FlushKind, FlushOp, Leg, Phase, Replicator};

impl Replicator {
    pub(super) fn replica_up(&mut self, id: ReplicaId, session: SessionId, out: &mut Vec<Effect>) {
        let Some(r) = self.replicas.get(&id) else {
            return;
        };
        if r.session().is_some() {
            // The driver saw the old session end even if it did not say so.
            self.fail_replica(id, "reconnected".into(), false, out);
        }
        let r = self.replicas.get_mut(&id).expect("replica");
        r.link = Link::Up(session);
        if r.membership == Membership::OutOfSync {
            self.start_resync_pass(id, out);
        }
    }

    /// A connected out-of-sync replica starts copying its dirty regions; from now on it is
    /// sent every write, so its dirty set can only shrink.
    pub(super) fn start_resync_pass(&mut self, id: ReplicaId, out: &mut Vec<Effect>) {
        let r = self.replicas.get_mut(&id).expect("replica");
        r.to_copy = r.dirty.clone();
        r.copied = 0;
        r.total = r.to_copy.len() as u64;
        out.push(Effect::Notify(Notice::ResyncStarted {
            replica: id,
            regions: r.total,
        }));
    }

    /// Adds the activity log's written regions to the replica's dirty set: it may lack any
    /// write not yet flushed everywhere, and those are in the log's regions that a write
    /// went out to (a region only prefetched, or whose writes are still queued, cannot
    /// differ: a write sent later marks the non-receiving replica dirty itself).
    fn seed_dirty_from_log(&mut self, id: ReplicaId) {
        let r = self.replicas.get_mut(&id).expect("replica");
        for k in self.al.written_regions() {
            if r.mark_dirty(k) {
                self.meta.dirty(id, k);
            }
        }
    }

    /// `id` failed (connection lost, I/O error, copy failure). Everything in flight to it
    /// counts as failed; what happens next depends on what the catalog may believe.
    pub(super) fn fail_replica(
        &mut self,
        id: ReplicaId,
        reason: String,
        disconnect: bool,
        out: &mut Vec<Effect>,
    ) {
        let Some(r) = self.replicas.get_mut(&id) else {
            return;
        };
        let Some(session) = r.session() else { return };
        if disconnect {
            out.push(Effect::Disconnect {
                replica: id,
                session,
            });
        }
        r.link = Link::Down;
        r.last_error = Some(reason.clone());
        r.to_copy.clear();
        let mut touched = Vec::new();
        for (op, w) in self.writes.iter_mut() {
            if let Some(leg @ Leg::Pending(_)) = w.legs.get_mut(&id) {
                *leg = Leg::Failed;
                touched.push(*op);
            }
        }
        for f in self.flushes.values_mut() {
            if let Some(leg @ Leg::Pending(_)) = f.legs.get_mut(&id) {
                *leg = Leg::Failed;
            }
        }
        for op in touched {
            self.finish_write_if_done(op);
        }
        for read in self.reads.values_mut() {
            if read.target.is_some_and(|(t, _)| t == id) {
                read.target = None;
            }
        }
        self.drop_reserved_copies(id);
        out.push(Effect::Notify(Notice::ReplicaFailed {
            replica: id,
            reason,
        }));
        self.after_failure(id, out);
    }

    fn after_failure(&mut self, id: ReplicaId, out: &mut Vec<Effect>) {
        let r = self.replicas.get_mut(&id).expect("replica");
        match r.membership.clone() {
            // Before reconciliation an in-sync replica may still connect: the connect
            // timeout decides (advance_phase).
            Membership::InSync if self.phase == Phase::Connecting => {}
            Membership::InSync => self.leave_in_sync(id, out),
            Membership::Leaving { .. } => {}
            Membership::OutOfSync => self.seed_dirty_from_log(id),
            Membership::Joining(JoinPhase::Drain | JoinPhase::Barrier { .. }) => {
                // Never told the catalog: back to out of sync, no transaction needed.
                r.membership = Membership::OutOfSync;
                self.seed_dirty_from_log(id);
            }
            Membership::Joining(JoinPhase::Txn {
                txn: Some(txn),
                retry_at_ms,
                ..
            }) => {
                // The join transaction's outcome decides (catalog_result).
                r.membership = Membership::Joining(JoinPhase::Txn {
                    txn: Some(txn),
                    retry_at_ms,
                    failed: true,
                });
                self.seed_dirty_from_log(id);
            }
            Membership::Joining(JoinPhase::Txn { txn: None, .. }) => {
                // The last attempt came back unavailable: the catalog may count it.
                r.membership = Membership::InSync;
                self.leave_in_sync(id, out);
            }
        }
    }

    /// The right to leave a replica behind: an in-sync replica that failed leaves the set
    /// only through a catalog transaction conditioned on our generation. Until it commits,
    /// the replica stays `Leaving` and every write it has not applied is held. The last
    /// in-sync replica is never dropped: the attachment stops instead.
    pub(super) fn leave_in_sync(&mut self, id: ReplicaId, out: &mut Vec<Effect>) {
        let others = self
            .replicas
            .values()
            .filter(|o| o.id != id && o.in_sync())
            .count();
        if others == 0 {
            self.stop(StopReason::NoInSyncReplica(id), out);
            return;
        }
        self.seed_dirty_from_log(id);
        if !self.cfg.rules.require_catalog_to_drop {
            self.replicas.get_mut(&id).expect("replica").membership = Membership::OutOfSync;
            out.push(Effect::Notify(Notice::Degraded {
                replica: id,
                in_sync: others,
            }));
            return;
        }
        self.start_txn(
            id,
            CatalogOp::MarkOutOfSync {
                replica: id,
                generation: self.generation,
            },
            out,
        );
    }

    fn start_txn(&mut self, id: ReplicaId, op: CatalogOp, out: &mut Vec<Effect>) {
        self.next_id += 1;
        let txn = crate::ids::TxnId(self.next_id);
        self.txns.insert(txn, (id, op));
        let r = self.replicas.get_mut(&id).expect("replica");
        r.membership = match op {
            CatalogOp::MarkOutOfSync { .. } => Membership::Leaving {
                txn: Some(txn),
                retry_at_ms: 0,
            },
            CatalogOp::MarkInSync { .. } => Membership::Joining(JoinPhase::Txn {
                txn: Some(txn),
                retry_at_ms: 0,
                failed: false,
            }),
        };
        out.push(Effect::CatalogTxn { txn, op });
    }

    pub(super) fn catalog_result(
        &mut self,
        txn: crate::ids::TxnId,
        outcome: TxnOutcome,
        out: &mut Vec<Effect>,
    ) {
        let Some((id, op)) = self.txns.remove(&txn) else {
            return;
        };
        let retry_at_ms = self.now_ms + self.cfg.catalog_retry_ms;
        match (op, outcome) {
            (_, TxnOutcome::Refused) => self.stop(StopReason::Superseded(self.generation), out),
            (CatalogOp::MarkOutOfSync { .. }, TxnOutcome::Committed) => {
                let r = self.replicas.get_mut(&id).expect("replica");
                r.membership = Membership::OutOfSync;
                let connected = r.session().is_some();
                let in_sync = self.replicas.values().filter(|r| r.in_sync()).count();
                out.push(Effect::Notify(Notice::Degraded {
                    replica: id,
                    in_sync,
                }));
                if connected {
                    self.start_resync_pass(id, out);
                }
            }
            (CatalogOp::MarkOutOfSync { .. }, TxnOutcome::Unavailable) => {
                let r = self.replicas.get_mut(&id).expect("replica");
                r.membership = Membership::Leaving {
                    txn: None,
                    retry_at_ms,
                };
                out.push(Effect::Notify(Notice::WritesHeld { replica: id }));
            }
            (CatalogOp::MarkInSync { .. }, outcome) => {
                self.join_result(id, outcome, retry_at_ms, out)
            }
        }
    }

    fn join_result(
        &mut self,
        id: ReplicaId,
        outcome: TxnOutcome,
        retry_at_ms: u64,
        out: &mut Vec<Effect>,
    ) {
        let r = self.replicas.get_mut(&id).expect("replica");
        let failed = matches!(
            r.membership,
            Membership::Joining(JoinPhase::Txn { failed: true, .. })
        );
        match (outcome, failed) {
            (TxnOutcome::Committed, false) => {
                r.membership = Membership::InSync;
                r.dirty.clear();
                r.dirty_durable.clear();
                r.last_error = None;
                self.meta.pending.dirty_add.retain(|(x, _)| *x != id);
                self.meta.pending.dirty_clear.push(id);
                out.push(Effect::Notify(Notice::Rejoined { replica: id }));
            }
            (TxnOutcome::Unavailable, false) => {
                r.membership = Membership::Joining(JoinPhase::Txn {
                    txn: None,
                    retry_at_ms,
                    failed: false,
                });
            }
            // It failed while joining and the catalog may now count it: drop it properly.
            (_, true) => {
                r.membership = Membership::InSync;
                self.leave_in_sync(id, out);
            }
            (TxnOutcome::Refused, false) => unreachable!("handled by catalog_result"),
        }
    }

    /// The join sequence of replicas that finished their resync, and catalog retries that
    /// came due.
    pub(super) fn advance_joins(&mut self, out: &mut Vec<Effect>) -> bool {
        if !self.serving() {
            return self.retry_due_txns(out);
        }
        let mut moved = self.retry_due_txns(out);
        let ids: Vec<ReplicaId> = self.replicas.keys().copied().collect();
        for id in ids {
            let r = &self.replicas[&id];
            match r.membership {
                Membership::OutOfSync
                    if r.receiving() && r.to_copy.is_empty() && r.copying.is_empty() =>
                {
                    // Counted like an in-sync replica from here on. Operations it failed
                    // before are covered by the copies (their regions were dirty and were
                    // copied after they finished): forget those legs, so the ack rules read
                    // "not sent to it" for them.
                    for w in self.writes.values_mut() {
                        if w.legs.get(&id) == Some(&Leg::Failed) {
                            w.legs.remove(&id);
                        }
                    }
                    for f in self.flushes.values_mut() {
                        if f.legs.get(&id) == Some(&Leg::Failed) {
                            f.legs.remove(&id);
                        }
                    }
                    self.replicas.get_mut(&id).expect("replica").membership =
                        Membership::Joining(JoinPhase::Drain);
                    out.push(Effect::Notify(Notice::ResyncFinished { replica: id }));
                    moved = true;
                }
                Membership::Joining(JoinPhase::Drain) => {
                    let draining = self.cfg.rules.drain_before_barrier
                        && self
                            .writes
                            .values()
                            .any(|w| matches!(w.legs.get(&id), Some(Leg::Pending(_))));
                    if !draining {
                        let op = self.next_op();
                        let f = FlushOp {
                            kind: FlushKind::Barrier(id),
                            seq: 0,
                            sent: false,
                            legs: Default::default(),
                            replied: false,
                        };
                        self.flushes.insert(op, f);
                        self.replicas.get_mut(&id).expect("replica").membership =
                            Membership::Joining(JoinPhase::Barrier { op });
                        moved = true;
                    }
                }
                _ => {}
            }
        }
        moved
    }

    /// The barrier flush of a joining replica is durable: ask the catalog to count it.
    pub(super) fn barrier_acked(&mut self, id: ReplicaId, op: crate::ids::OpId) {
        let r = self.replicas.get_mut(&id).expect("replica");
        if r.membership == Membership::Joining(JoinPhase::Barrier { op }) {
            r.membership = Membership::Joining(JoinPhase::Txn {
                txn: None,
                retry_at_ms: 0,
                failed: false,
            });
        }
    }

    fn retry_due_txns(&mut self, out: &mut Vec<Effect>) -> bool {
        let now = self.now_ms;
        let due: Vec<(ReplicaId, bool)> = self
            .replicas
            .values()
            .filter_map(|r| match r.membership {
                Membership::Leaving {
                    txn: None,
                    retry_at_ms,
                } if retry_at_ms <= now => Some((r.id, false)),
                Membership::Joining(JoinPhase::Txn {
                    txn: None,
                    retry_at_ms,
                    ..
                }) if retry_at_ms <= now => Some((r.id, true)),
                _ => None,
            })
            .collect();
        for (id, join) in &due {
            let generation = self.generation;
            let op = if *join {
                CatalogOp::MarkInSync {
                    replica: *id,
                    generation,
                }
            } else {
                CatalogOp::MarkOutOfSync {
                    replica: *id,
                    generation,
                }
            };
            self.start_txn(*id, op, out);
        }
        !due.is_empty()
    }
}
