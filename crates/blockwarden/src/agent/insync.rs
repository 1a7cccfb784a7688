//! The in-sync set in the catalog, changed only by transactions conditioned on the
//! attachment's generation (docs/design/replication.md, "The right to leave a replica
//! behind").
//!
//! A transaction is one catalog compare-and-swap of two keys: the owner key must still be the
//! one created at generation G (`owners/<volume>` at revision G: the creation revision *is*
//! the generation, and owner keys are never rewritten), and the volume record must be at the
//! revision it was read at. If the owner key moved (released, expired with the lease, or
//! re-created by a newer attachment) the answer is `Refused`: this attachment has lost the
//! right to change the set and must stop. A conflict on the volume record alone is a
//! concurrent edit (another field): re-read and retry. Anything else — the catalog cannot be
//! reached, or the answer was lost — is `Unavailable`: the change may or may not have been
//! applied; both changes are idempotent, so the core retries safely.

use bw_types::Name;
use catalog::{Change, ClusterStore, Expect, Key, ReplicaState, Revision, TxnOp};
use replication::{CatalogOp, TxnOutcome};

use super::attach::CAS_RETRIES;
use super::node::Node;

impl<C: ClusterStore> Node<C> {
    /// Runs one in-sync-set change for volume `name` conditioned on `op`'s generation.
    pub async fn in_sync_txn(&self, name: &Name, op: CatalogOp) -> TxnOutcome {
        let (replica, generation, to_in_sync) = match op {
            CatalogOp::MarkOutOfSync {
                replica,
                generation,
            } => (replica.0, generation, false),
            CatalogOp::MarkInSync {
                replica,
                generation,
            } => (replica.0, generation, true),
        };
        for _ in 0..CAS_RETRIES {
            let (mut rec, rev) = match self.catalog.get_volume(name).await {
                Ok(Some(x)) => x,
                // The record is gone: the volume was deleted under us; nobody may write.
                Ok(None) => return TxnOutcome::Refused,
                Err(_) => return TxnOutcome::Unavailable,
            };
            rec.assign_replica_ids();
            let Some(r) = rec.replicas_placed.iter_mut().find(|r| r.id == replica) else {
                // Removed from the volume: out of sync by definition; never "in sync".
                return if to_in_sync {
                    TxnOutcome::Refused
                } else {
                    TxnOutcome::Committed
                };
            };
            let want = if to_in_sync {
                ReplicaState::InSync
            } else {
                ReplicaState::Stale
            };
            let already = if to_in_sync {
                r.state == ReplicaState::InSync
            } else {
                r.state != ReplicaState::InSync
            };
            if !already {
                r.state = want;
            }
            // Either way it was in sync at this generation: it joins now, or it was dropped
            // during it. (0 means "never in sync": a new replica the driver copies whole.)
            r.in_sync_generation = r.in_sync_generation.max(generation);
            if !to_in_sync {
                // The replicas that stay in sync now hold writes this one lacks: record it,
                // so a later attachment never picks this one as its reconciliation source.
                for other in rec
                    .replicas_placed
                    .iter_mut()
                    .filter(|o| o.state == ReplicaState::InSync)
                {
                    other.in_sync_generation = other.in_sync_generation.max(generation);
                }
            }
            rec.generation = rec.generation.max(generation);
            let ops = vec![
                TxnOp {
                    key: Key::owner(name),
                    expect: Expect::At(Revision(generation.0)),
                    change: Change::Check,
                },
                TxnOp::put_volume(&rec, Expect::At(rev)),
            ];
            match self.catalog.txn(ops).await {
                Ok(_) => return TxnOutcome::Committed,
                Err(e) if e.is_conflict() => match self.catalog.get_owner(name).await {
                    Ok(Some(held)) if held.generation == generation => continue,
                    Ok(_) => return TxnOutcome::Refused,
                    Err(_) => return TxnOutcome::Unavailable,
                },
                Err(_) => return TxnOutcome::Unavailable,
            }
        }
        // Only concurrent edits of the same record: rare; the core retries later.
        TxnOutcome::Unavailable
    }
}
