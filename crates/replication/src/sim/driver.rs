//! The simulated driver and network: effects become messages with random delays (so they
//! are reordered, within and across connections), delivered per session (a message on a
//! closed session is lost, both ways), and executed by the replicas, the catalog and the
//! metadata store.

use bw_types::Generation;

use crate::ids::{CopyId, DataHandle, MetaBatchId, RegionIndex, ReplicaId, RequestId, SessionId};
use crate::io::{
    CatalogOp, Completion, Effect, Event, MetaBatch, Notice, ReplicaOutcome, RequestError,
    TxnOutcome,
};

use super::world::{AttState, Body, CopyTask, Msg, ReplicaRep, ReplicaReq, World};

impl World {
    fn delay(&mut self, r: Option<usize>) -> u64 {
        let slow = r.is_some_and(|r| self.reps[r].slow_until > self.now);
        self.now + self.rng.range(0, 3) + if slow { self.rng.range(5, 30) } else { 0 }
    }

    fn send(&mut self, att: usize, r: Option<usize>, body: Body) {
        let at = self.delay(r);
        self.net.push(Msg { at, att, body });
    }

    /// Performs one effect of attachment `a`.
    pub fn perform(&mut self, a: usize, e: Effect) {
        let bs = self.p.block_size;
        match e {
            Effect::SendWrite {
                replica,
                session,
                op,
                offset,
                len,
                data,
                fua,
            } => {
                let vals = vec![data.0; (len / bs) as usize];
                let req = ReplicaReq::Write {
                    op,
                    first: (offset / bs) as usize,
                    vals,
                    fua,
                };
                self.send_replica(a, replica, session, req);
            }
            Effect::SendFlush {
                replica,
                session,
                op,
            } => self.send_replica(a, replica, session, ReplicaReq::Flush { op }),
            Effect::SendRead {
                replica,
                session,
                op,
                offset,
                len,
            } => {
                let req = ReplicaReq::Read {
                    op,
                    first: (offset / bs) as usize,
                    n: (len / bs) as usize,
                };
                self.send_replica(a, replica, session, req);
            }
            Effect::Disconnect { replica, session } => {
                let r = replica.0 as usize;
                if self.atts[a].conns[r] == Some(session) {
                    self.close_conn(a, r, "disconnected");
                    self.atts[a].reconnect_at[r] = self.now + self.rng.range(5, 50);
                }
            }
            Effect::Reply { req, result } => self.client_reply(a, req, result),
            Effect::PersistMeta { batch, changes } => {
                self.send(a, None, Body::ToMeta { batch, changes })
            }
            Effect::CatalogTxn { txn, op } => self.send(a, None, Body::ToCatalog { txn, op }),
            Effect::CopyRegion {
                copy,
                region,
                from,
                from_session,
                to,
                to_session,
                ..
            } => self.start_copy(a, copy, region, (from, from_session), (to, to_session)),
            Effect::Notify(n) => {
                if let Notice::ReconcileStarted { .. } = n {
                    self.report.reconciles += 1;
                }
            }
            Effect::Stop(_) => {
                self.atts[a].state = AttState::Stopped;
                self.atts[a].conns.iter_mut().for_each(|c| *c = None);
                self.atts[a].copies.clear();
            }
        }
    }

    fn client_reply(&mut self, a: usize, req: RequestId, result: Result<Completion, RequestError>) {
        let reads = &mut self.reads;
        let res = self.atts[a]
            .client
            .reply(req, &result, &mut self.model, |h| {
                reads.remove(&h).unwrap_or_default()
            });
        match res {
            Err(e) => self.fail(
                "G1",
                format!("client of generation {}: {e}", self.atts[a].gen),
            ),
            Ok(true) => {
                self.report.flushes_acked += 1;
                self.note_flush_ok(a, req);
            }
            Ok(false) if result == Ok(Completion::Written) => self.report.writes_acked += 1,
            Ok(false) => {}
        }
    }

    /// First hop of a copy: read the region from the source.
    fn start_copy(
        &mut self,
        a: usize,
        copy: CopyId,
        region: RegionIndex,
        (from, from_session): (ReplicaId, SessionId),
        (to, to_session): (ReplicaId, SessionId),
    ) {
        let n = self.p.region_blocks as usize;
        let first = region.0 as usize * n;
        let (from, to) = (from.0 as usize, to.0 as usize);
        let task = CopyTask {
            from,
            from_session,
            to,
            to_session,
            first,
            writing: false,
        };
        self.atts[a].copies.insert(copy, task);
        if self.atts[a].conns[from] == Some(from_session) {
            let req = ReplicaReq::CopyRead { copy, first, n };
            self.send_replica(a, ReplicaId(from as u64), from_session, req);
        } else {
            self.copy_failed(a, copy, from, "source session closed");
        }
    }

    fn send_replica(&mut self, a: usize, replica: ReplicaId, session: SessionId, req: ReplicaReq) {
        let r = replica.0 as usize;
        // A send on a closed session is lost; the core was told the session ended.
        if self.atts[a].conns[r] == Some(session) {
            self.send(a, Some(r), Body::ToReplica { r, session, req });
        }
    }

    fn copy_failed(&mut self, a: usize, copy: CopyId, r: usize, why: &str) {
        self.atts[a].copies.remove(&copy);
        let ev = Event::CopyFailed {
            copy,
            replica: ReplicaId(r as u64),
            reason: why.to_string(),
        };
        self.inbox.push_back((a, ev));
    }

    /// Closes a connection: both directions' messages on it are lost from now on, copies
    /// using it fail, and the attachment is told.
    pub fn close_conn(&mut self, a: usize, r: usize, why: &str) {
        let Some(session) = self.atts[a].conns[r].take() else {
            return;
        };
        let broken: Vec<CopyId> = self.atts[a]
            .copies
            .iter()
            .filter(|(_, t)| {
                (!t.writing && t.from == r && t.from_session == session)
                    || (t.writing && t.to == r && t.to_session == session)
            })
            .map(|(c, _)| *c)
            .collect();
        for copy in broken {
            self.copy_failed(a, copy, r, why);
        }
        let ev = Event::ReplicaDown {
            replica: ReplicaId(r as u64),
            session,
            reason: why.to_string(),
        };
        self.inbox.push_back((a, ev));
    }

    /// Delivers every message that is due, in random order.
    pub fn deliver_due(&mut self) {
        let now = self.now;
        let (mut due, rest): (Vec<Msg>, Vec<Msg>) = std::mem::take(&mut self.net)
            .into_iter()
            .partition(|m| m.at <= now);
        self.net = rest;
        while !due.is_empty() {
            let i = self.rng.below(due.len() as u64) as usize;
            let m = due.swap_remove(i);
            self.deliver(m);
            self.drain_inbox();
        }
    }

    fn deliver(&mut self, m: Msg) {
        let a = m.att;
        let state = self.atts[a].state;
        let to_att = matches!(
            m.body,
            Body::FromReplica { .. } | Body::FromCatalog { .. } | Body::FromMeta { .. }
        );
        if to_att {
            match state {
                AttState::Paused { until } => {
                    self.net.push(Msg { at: until, ..m });
                    return;
                }
                AttState::Crashed | AttState::Stopped => return,
                AttState::Running => {}
            }
        }
        match m.body {
            Body::ToReplica { r, session, req } => {
                if self.atts[a].conns[r] == Some(session) && state != AttState::Crashed {
                    self.replica_handle(a, r, session, req);
                }
            }
            Body::FromReplica { r, session, rep } => {
                if self.atts[a].conns[r] == Some(session) {
                    self.replica_reply(a, r, session, rep);
                }
            }
            Body::ToCatalog { txn, op } => {
                let outcome = self.catalog_txn(a, op);
                self.send(a, None, Body::FromCatalog { txn, outcome });
            }
            Body::FromCatalog { txn, outcome } => self
                .inbox
                .push_back((a, Event::CatalogResult { txn, outcome })),
            Body::ToMeta { batch, changes } => {
                let fenced_by = self.meta_persist(a, batch, changes);
                self.send(a, None, Body::FromMeta { batch, fenced_by });
            }
            Body::FromMeta { batch, fenced_by } => {
                let ev = match fenced_by {
                    Some(h) => Event::Fenced {
                        highest: Generation(h),
                    },
                    None => Event::MetaPersisted { batch },
                };
                self.inbox.push_back((a, ev));
            }
        }
    }

    /// A replica executes one request of attachment `a` (generation fence first).
    pub fn replica_handle(&mut self, a: usize, r: usize, session: SessionId, req: ReplicaReq) {
        let gen = self.atts[a].gen.0;
        let reply = if gen < self.reps[r].highest_gen {
            ReplicaRep::Fenced {
                highest: self.reps[r].highest_gen,
            }
        } else if let Some(failed) = self.replica_io_error(r, &req) {
            failed
        } else {
            self.replica_execute(r, gen, req)
        };
        self.send(
            a,
            Some(r),
            Body::FromReplica {
                r,
                session,
                rep: reply,
            },
        );
    }

    /// The injected I/O error, if it strikes this request: the replica fail-stops (a failed
    /// write-back leaves its cache in an unknown state) until a new session reopens it.
    fn replica_io_error(&mut self, r: usize, req: &ReplicaReq) -> Option<ReplicaRep> {
        let rep = &mut self.reps[r];
        let is_io = matches!(
            req,
            ReplicaReq::Write { .. } | ReplicaReq::Flush { .. } | ReplicaReq::CopyWrite { .. }
        );
        if !(rep.faulted || is_io && rep.fail_next_io) {
            return None;
        }
        if !rep.faulted {
            rep.fail_next_io = false;
            rep.faulted = true;
            rep.lose_cache(&mut self.rng);
            self.report.io_errors += 1;
        }
        let why = format!("replica {r}: I/O error (fail-stopped)");
        Some(match req {
            ReplicaReq::Write { op, .. }
            | ReplicaReq::Flush { op }
            | ReplicaReq::Read { op, .. } => ReplicaRep::Op {
                op: *op,
                outcome: ReplicaOutcome::Failed(why),
            },
            ReplicaReq::CopyRead { copy, .. } | ReplicaReq::CopyWrite { copy, .. } => {
                ReplicaRep::CopyFailed { copy: *copy, why }
            }
        })
    }

    fn replica_execute(&mut self, r: usize, gen: u64, req: ReplicaReq) -> ReplicaRep {
        if matches!(req, ReplicaReq::Write { .. } | ReplicaReq::CopyWrite { .. }) {
            let last = self.reps[r].last_write_gen;
            if gen < last {
                let detail = format!(
                    "replica {r} accepted a generation-{gen} write after a generation-{last} one"
                );
                self.fail("G2", detail);
            }
            self.reps[r].last_write_gen = gen;
        }
        let rep = &mut self.reps[r];
        let done = |op| ReplicaRep::Op {
            op,
            outcome: ReplicaOutcome::Done,
        };
        match req {
            ReplicaReq::Write {
                op,
                first,
                vals,
                fua,
            } => {
                for (i, v) in vals.into_iter().enumerate() {
                    rep.cache.insert(first + i, v);
                }
                if fua {
                    rep.sync();
                }
                done(op)
            }
            ReplicaReq::Flush { op } => {
                rep.sync();
                done(op)
            }
            ReplicaReq::Read { op, first, n } => {
                let vals = rep.view()[first..first + n].to_vec();
                self.next_handle += 1;
                let h = DataHandle(self.next_handle);
                self.reads.insert(h, vals);
                ReplicaRep::Op {
                    op,
                    outcome: ReplicaOutcome::Data(h),
                }
            }
            ReplicaReq::CopyRead { copy, first, n } => ReplicaRep::CopyRead {
                copy,
                vals: rep.view()[first..first + n].to_vec(),
            },
            ReplicaReq::CopyWrite { copy, first, vals } => {
                for (i, v) in vals.into_iter().enumerate() {
                    rep.cache.insert(first + i, v);
                }
                ReplicaRep::CopyWritten { copy }
            }
        }
    }

    fn replica_reply(&mut self, a: usize, r: usize, session: SessionId, rep: ReplicaRep) {
        let replica = ReplicaId(r as u64);
        match rep {
            ReplicaRep::Op { op, outcome } => {
                self.inbox.push_back((
                    a,
                    Event::ReplicaReply {
                        replica,
                        session,
                        op,
                        outcome,
                    },
                ));
            }
            ReplicaRep::Fenced { highest } => self.inbox.push_back((
                a,
                Event::Fenced {
                    highest: Generation(highest),
                },
            )),
            ReplicaRep::CopyFailed { copy, why } => self.copy_failed(a, copy, r, &why),
            ReplicaRep::CopyRead { copy, vals } => self.copy_write(a, copy, vals),
            ReplicaRep::CopyWritten { copy } => {
                if self.atts[a].copies.remove(&copy).is_some() {
                    self.report.regions_copied += 1;
                    self.inbox.push_back((a, Event::RegionCopied { copy }));
                }
            }
        }
    }

    /// Second hop of a copy: write what was read to the target.
    fn copy_write(&mut self, a: usize, copy: CopyId, vals: Vec<u64>) {
        let Some(t) = self.atts[a].copies.get_mut(&copy) else {
            return;
        };
        t.writing = true;
        let (to, to_session, first) = (t.to, t.to_session, t.first);
        if self.atts[a].conns[to] != Some(to_session) {
            return self.copy_failed(a, copy, to, "target session closed");
        }
        self.send_replica(
            a,
            ReplicaId(to as u64),
            to_session,
            ReplicaReq::CopyWrite { copy, first, vals },
        );
    }

    /// The catalog executes a generation-conditioned transaction. While unreachable it
    /// answers `Unavailable`, having applied the change or not.
    fn catalog_txn(&mut self, a: usize, op: CatalogOp) -> TxnOutcome {
        let unavailable =
            self.now < self.catalog.down_until || self.now < self.atts[a].catalog_cut_until;
        let (replica, generation, in_sync) = match op {
            CatalogOp::MarkOutOfSync {
                replica,
                generation,
            } => (replica, generation, false),
            CatalogOp::MarkInSync {
                replica,
                generation,
            } => (replica, generation, true),
        };
        let allowed = generation.0 == self.catalog.generation;
        if unavailable {
            if allowed && self.rng.chance(500_000) {
                self.catalog_apply(replica.0 as usize, generation.0, in_sync);
            }
            return TxnOutcome::Unavailable;
        }
        if !allowed {
            return TxnOutcome::Refused;
        }
        self.catalog_apply(replica.0 as usize, generation.0, in_sync);
        TxnOutcome::Committed
    }

    fn catalog_apply(&mut self, r: usize, gen: u64, in_sync: bool) {
        self.catalog.in_sync[r] = in_sync;
        if in_sync {
            self.catalog.last_in_sync_gen[r] = gen;
        }
        if !self.catalog.in_sync.iter().any(|x| *x) {
            self.fail(
                "catalog",
                format!("generation {gen} dropped replica {r}, the last in-sync one"),
            );
        }
    }

    /// The metadata store persists a batch unless a newer generation fenced it.
    pub fn meta_persist(
        &mut self,
        a: usize,
        _batch: MetaBatchId,
        changes: MetaBatch,
    ) -> Option<u64> {
        let gen = self.atts[a].gen.0;
        if gen < self.meta.gen {
            return Some(self.meta.gen);
        }
        for r in changes.dirty_clear {
            self.meta.bitmaps[r.0 as usize].clear();
        }
        for (r, k) in changes.dirty_add {
            self.meta.bitmaps[r.0 as usize].insert(k);
        }
        self.meta.al.extend(changes.al_add);
        for k in changes.al_remove {
            self.meta.al.remove(&k);
        }
        None
    }
}
