//! Region copies: crash reconciliation before serving, and incremental resync while serving.
//!
//! Both follow one ordering rule: a region is locked while a copy of it is in flight (writes
//! to it wait), and a copy starts only when no write to the region is in flight. So the copy
//! reads a source that has every earlier write, and lands on the target before any later
//! write: the target can never end up with older data than the source.

use std::collections::BTreeSet;

use crate::config::MAX_RECONCILE_COPIES;
use crate::ids::{CopyId, RegionIndex, ReplicaId};
use crate::io::{CopyPurpose, Effect, Notice};
use crate::replica::Membership;

use super::{CopyJob, Phase, Replicator};

/// A progress notice every this many copied regions (and at the end): often enough for a
/// progress bar, rare enough not to flood the events log on a large resync.
const RESYNC_PROGRESS_EVERY: u64 = 64;

impl Replicator {
    pub(super) fn advance_phase(&mut self, out: &mut Vec<Effect>) -> bool {
        match self.phase {
            Phase::Connecting => self.finish_connecting(out),
            Phase::Reconciling { .. } => self.advance_reconcile(out),
            _ => false,
        }
    }

    /// The reconciliation source: among connected in-sync replicas, the highest
    /// last-in-sync generation, ties broken by the lowest id.
    fn reconcile_source(&self) -> Option<ReplicaId> {
        self.replicas
            .values()
            .filter(|r| r.in_sync() && r.session().is_some())
            .max_by_key(|r| (r.last_in_sync_generation, std::cmp::Reverse(r.id)))
            .map(|r| r.id)
    }

    /// Waits for the catalog's in-sync replicas (all of them, or those connected when the
    /// connect timeout passed), then starts reconciliation or serving.
    fn finish_connecting(&mut self, out: &mut Vec<Effect>) -> bool {
        let timed_out = self.now_ms.saturating_sub(self.started_ms) >= self.cfg.connect_timeout_ms;
        let members: Vec<ReplicaId> = self
            .replicas
            .values()
            .filter(|r| r.in_sync())
            .map(|r| r.id)
            .collect();
        let up: Vec<ReplicaId> = members
            .iter()
            .copied()
            .filter(|id| self.replicas[id].session().is_some())
            .collect();
        if up.is_empty() {
            if timed_out && !self.warned_no_source {
                self.warned_no_source = true;
                out.push(Effect::Notify(Notice::WaitingForInSyncReplica));
            }
            return false;
        }
        if up.len() < members.len() && !timed_out {
            return false;
        }
        for id in members.iter().filter(|id| !up.contains(id)) {
            let reason = "did not connect before the connect timeout".to_string();
            self.replicas.get_mut(id).expect("replica").last_error = Some(reason.clone());
            out.push(Effect::Notify(Notice::ReplicaFailed {
                replica: *id,
                reason,
            }));
            self.leave_in_sync(*id, out);
        }
        let source = self
            .reconcile_source()
            .expect("a connected in-sync replica");
        if !self.cfg.rules.reconcile_before_serving || self.previous_al.is_empty() {
            self.phase = Phase::Serving;
            out.push(Effect::Notify(Notice::Serving));
            return true;
        }
        let todo = self.reconcile_todo(source);
        out.push(Effect::Notify(Notice::ReconcileStarted {
            source,
            regions: self.previous_al.len() as u64,
        }));
        self.phase = Phase::Reconciling { source, todo };
        true
    }

    /// Every (region of the previous log, connected in-sync replica other than `source`).
    fn reconcile_todo(&self, source: ReplicaId) -> BTreeSet<(RegionIndex, ReplicaId)> {
        let targets: Vec<ReplicaId> = self
            .replicas
            .values()
            .filter(|r| r.id != source && r.in_sync() && r.session().is_some())
            .map(|r| r.id)
            .collect();
        self.previous_al
            .iter()
            .flat_map(|k| targets.iter().map(move |t| (*k, *t)))
            .collect()
    }

    fn advance_reconcile(&mut self, out: &mut Vec<Effect>) -> bool {
        let Phase::Reconciling { source, todo } = &self.phase else {
            return false;
        };
        let (mut source, mut todo) = (*source, todo.clone());
        let mut moved = false;
        let healthy = |r: &crate::replica::Replica| r.in_sync() && r.session().is_some();
        if !healthy(&self.replicas[&source]) {
            // Start over from a new source: the old one's copies still in flight keep their
            // regions locked, so the new source's copies land after them.
            let Some(next) = self.reconcile_source() else {
                return false;
            };
            source = next;
            todo = self.reconcile_todo(source);
            moved = true;
        }
        todo.retain(|(_, t)| healthy(&self.replicas[t]));
        let in_flight = self
            .copies
            .values()
            .filter(|c| c.purpose == CopyPurpose::Reconcile)
            .count();
        if todo.is_empty() && in_flight == 0 {
            self.phase = Phase::Serving;
            out.push(Effect::Notify(Notice::Serving));
            return true;
        }
        let mut budget = MAX_RECONCILE_COPIES.saturating_sub(in_flight);
        let pairs: Vec<(RegionIndex, ReplicaId)> = todo.iter().copied().collect();
        for (k, t) in pairs {
            if budget == 0 {
                break;
            }
            if self.copy_locks.contains(&k) {
                continue;
            }
            todo.remove(&(k, t));
            self.issue_copy(k, source, t, CopyPurpose::Reconcile, out);
            budget -= 1;
            moved = true;
        }
        self.phase = Phase::Reconciling { source, todo };
        moved
    }

    /// Creates a copy job for `region` and, if no write to it is in flight, hands it out.
    fn issue_copy(
        &mut self,
        region: RegionIndex,
        from: ReplicaId,
        to: ReplicaId,
        purpose: CopyPurpose,
        out: &mut Vec<Effect>,
    ) {
        self.next_id += 1;
        let copy = CopyId(self.next_id);
        let to_session = self.replicas[&to].session().expect("connected target");
        self.copy_locks.insert(region);
        let job = CopyJob {
            issued: false,
            region,
            from,
            to,
            to_session,
            purpose,
        };
        self.copies.insert(copy, job);
        self.issue_reserved(copy, out);
    }

    fn issue_reserved(&mut self, copy: CopyId, out: &mut Vec<Effect>) -> bool {
        let job = &self.copies[&copy];
        if job.issued || self.al.has_inflight(job.region) {
            return false;
        }
        let (Some(from_session), Some(to_session)) = (
            self.replicas[&job.from].session(),
            self.replicas[&job.to].session(),
        ) else {
            return false;
        };
        let job = self.copies.get_mut(&copy).expect("copy");
        job.issued = true;
        out.push(Effect::CopyRegion {
            copy,
            region: job.region,
            from: job.from,
            from_session,
            to: job.to,
            to_session,
            purpose: job.purpose,
        });
        true
    }

    /// The resync source: the local in-sync replica if there is one, else the lowest id.
    fn resync_source(&self) -> Option<ReplicaId> {
        let candidates: Vec<_> = self
            .replicas
            .values()
            .filter(|r| r.in_sync() && r.session().is_some())
            .collect();
        candidates
            .iter()
            .find(|r| r.local)
            .or(candidates.first())
            .map(|r| r.id)
    }

    /// Hands out resync copies as credits allow, and issues reserved ones whose writes
    /// drained.
    pub(super) fn schedule_copies(&mut self, out: &mut Vec<Effect>) -> bool {
        let mut moved = false;
        let reserved: Vec<CopyId> = self
            .copies
            .iter()
            .filter(|(_, c)| !c.issued)
            .map(|(id, _)| *id)
            .collect();
        for copy in reserved {
            moved |= self.issue_reserved(copy, out);
        }
        if !self.serving() {
            return moved;
        }
        let Some(source) = self.resync_source() else {
            return moved;
        };
        let targets: Vec<ReplicaId> = self
            .replicas
            .values()
            .filter(|r| r.membership == Membership::OutOfSync && r.receiving() && r.credits > 0)
            .map(|r| r.id)
            .collect();
        for t in targets {
            while self.replicas[&t].credits > 0 {
                let r = &self.replicas[&t];
                let next = r
                    .to_copy
                    .iter()
                    .find(|k| !r.copying.contains(k) && !self.copy_locks.contains(k))
                    .copied();
                let Some(k) = next else { break };
                let r = self.replicas.get_mut(&t).expect("replica");
                r.credits -= 1;
                r.copying.insert(k);
                self.issue_copy(k, source, t, CopyPurpose::Resync, out);
                moved = true;
            }
        }
        moved
    }

    pub(super) fn copy_done(&mut self, copy: CopyId, out: &mut Vec<Effect>) {
        let Some(job) = self.copies.remove(&copy) else {
            return;
        };
        self.copy_locks.remove(&job.region);
        if job.purpose != CopyPurpose::Resync {
            return;
        }
        let Some(r) = self.replicas.get_mut(&job.to) else {
            return;
        };
        r.copying.remove(&job.region);
        // A copy that landed on an older session does not count: that session's writes are
        // void, and the region stays in the next pass's work list.
        if r.session() == Some(job.to_session)
            && r.membership == Membership::OutOfSync
            && r.to_copy.remove(&job.region)
        {
            r.copied += 1;
            if r.copied % RESYNC_PROGRESS_EVERY == 0 || r.to_copy.is_empty() {
                let n = Notice::ResyncProgress {
                    replica: r.id,
                    copied: r.copied,
                    total: r.total,
                };
                out.push(Effect::Notify(n));
            }
        }
    }

    pub(super) fn copy_failed(
        &mut self,
        copy: CopyId,
        replica: ReplicaId,
        reason: String,
        out: &mut Vec<Effect>,
    ) {
        let Some(job) = self.copies.remove(&copy) else {
            return;
        };
        self.copy_locks.remove(&job.region);
        if let Some(r) = self.replicas.get_mut(&job.to) {
            r.copying.remove(&job.region);
        }
        self.fail_replica(replica, reason, true, out);
    }

    /// Copies not yet handed out that involve a failed replica are forgotten. Copies already
    /// with the driver stay until it reports them (their regions stay locked).
    pub(super) fn drop_reserved_copies(&mut self, id: ReplicaId) {
        let gone: Vec<CopyId> = self
            .copies
            .iter()
            .filter(|(_, c)| !c.issued && (c.from == id || c.to == id))
            .map(|(cid, _)| *cid)
            .collect();
        for cid in gone {
            let job = self.copies.remove(&cid).expect("copy");
            self.copy_locks.remove(&job.region);
            if let Some(r) = self.replicas.get_mut(&job.to) {
                r.copying.remove(&job.region);
            }
        }
    }
}
