//! The activity log (which regions may have writes in flight or not yet durable everywhere)
//! and the queue of metadata batches the driver persists.
//!
//! A region enters the log, durably, before the first write to it goes out; it stays "hot"
//! while writes keep coming and leaves only when it is cold: no write in flight, idle for
//! `al_hot_ms`, and covered by a flush that completed on every replica written. After an
//! attachment crash, exactly the regions in the log are reconciled (G5); everywhere else the
//! replicas are known to agree.

use std::collections::BTreeMap;

use crate::ids::{MetaBatchId, RegionIndex, RegionSet, ReplicaId};
use crate::io::MetaBatch;

/// One region in the log.
#[derive(Clone, Debug)]
struct AlRegion {
    /// Its addition is persisted; writes may go out.
    durable: bool,
    /// Writes (and reconciliation copies) touching it not yet finished on every target.
    inflight: u32,
    /// Last time a write touched it (hot timer).
    last_touch_ms: u64,
    /// The flush sequence number that must have completed everywhere before the region may
    /// go cold: one more than the flushes issued when its last write finished.
    needs_flush: u64,
}

/// The in-memory activity log.
#[derive(Clone, Debug)]
pub(crate) struct ActivityLog {
    regions: BTreeMap<RegionIndex, AlRegion>,
    max_regions: usize,
}

impl ActivityLog {
    /// A log holding `initial` (the previous attachment's log, already durable).
    pub fn new(max_regions: usize, initial: &RegionSet, now_ms: u64) -> ActivityLog {
        let regions = initial
            .iter()
            .map(|r| {
                let entry = AlRegion {
                    durable: true,
                    inflight: 0,
                    last_touch_ms: now_ms,
                    needs_flush: 1,
                };
                (*r, entry)
            })
            .collect();
        ActivityLog {
            regions,
            max_regions,
        }
    }

    pub fn regions(&self) -> RegionSet {
        self.regions.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Makes sure every region of a write is in the log. All or nothing: a write whose
    /// regions do not all fit adds none, so half-admitted writes cannot fill the log and
    /// wait on each other. Returns true when all of them are in the log *and durable*.
    pub fn admit(&mut self, regions: &[RegionIndex], now_ms: u64, meta: &mut MetaQueue) -> bool {
        let missing = regions
            .iter()
            .filter(|r| !self.regions.contains_key(r))
            .count();
        if missing > 0 && self.regions.len() + missing > self.max_regions {
            return false;
        }
        for r in regions {
            if self.regions.contains_key(r) {
                continue;
            }
            // A removal not yet handed to the driver is simply cancelled: the persisted log
            // still holds the region.
            let durable = meta.cancel_al_remove(*r);
            if !durable {
                meta.pending.al_add.push(*r);
            }
            let entry = AlRegion {
                durable,
                inflight: 0,
                last_touch_ms: now_ms,
                needs_flush: 0,
            };
            self.regions.insert(*r, entry);
        }
        regions.iter().all(|r| self.regions[r].durable)
    }

    /// A write (or reconciliation copy) touching `regions` went out.
    pub fn begin(&mut self, regions: &[RegionIndex], now_ms: u64) {
        for r in regions {
            if let Some(e) = self.regions.get_mut(r) {
                e.inflight += 1;
                e.last_touch_ms = now_ms;
            }
        }
    }

    /// It finished on every target; `flushes_issued` flushes were issued so far, so the next
    /// one covers it.
    pub fn end(&mut self, regions: &[RegionIndex], flushes_issued: u64) {
        for r in regions {
            if let Some(e) = self.regions.get_mut(r) {
                e.inflight = e.inflight.saturating_sub(1);
                e.needs_flush = flushes_issued + 1;
            }
        }
    }

    pub fn has_inflight(&self, region: RegionIndex) -> bool {
        self.regions.get(&region).is_some_and(|e| e.inflight > 0)
    }

    fn idle(e: &AlRegion, now_ms: u64, hot_ms: u64) -> bool {
        e.durable && e.inflight == 0 && now_ms.saturating_sub(e.last_touch_ms) >= hot_ms
    }

    /// True when some idle region waits only for a flush to go cold.
    pub fn wants_flush(&self, now_ms: u64, hot_ms: u64, durable_flush: u64) -> bool {
        self.regions
            .values()
            .any(|e| Self::idle(e, now_ms, hot_ms) && e.needs_flush > durable_flush)
    }

    /// Removes every cold region (queuing its durable removal); `locked` regions stay.
    pub fn cool(
        &mut self,
        now_ms: u64,
        hot_ms: u64,
        durable_flush: u64,
        locked: &RegionSet,
        meta: &mut MetaQueue,
    ) {
        let cold: Vec<RegionIndex> = self
            .regions
            .iter()
            .filter(|(r, e)| {
                Self::idle(e, now_ms, hot_ms)
                    && e.needs_flush <= durable_flush
                    && !locked.contains(r)
            })
            .map(|(r, _)| *r)
            .collect();
        for r in cold {
            self.regions.remove(&r);
            meta.pending.al_remove.push(r);
        }
    }

    /// A batch became durable.
    pub fn persisted(&mut self, batch: &MetaBatch) {
        for r in &batch.al_add {
            if let Some(e) = self.regions.get_mut(r) {
                e.durable = true;
            }
        }
    }
}

/// Metadata waiting to be persisted. One batch is with the driver at a time, so batches
/// become durable in the order they were built; everything that accumulates meanwhile goes
/// into the next one (this is the batching that keeps the log cheap).
#[derive(Clone, Debug, Default)]
pub(crate) struct MetaQueue {
    next_id: u64,
    pub pending: MetaBatch,
    pub in_flight: Option<(MetaBatchId, MetaBatch)>,
}

impl MetaQueue {
    /// Removes `region` from the pending removals; true if it was there.
    fn cancel_al_remove(&mut self, region: RegionIndex) -> bool {
        let before = self.pending.al_remove.len();
        self.pending.al_remove.retain(|r| *r != region);
        before != self.pending.al_remove.len()
    }

    pub fn dirty(&mut self, replica: ReplicaId, region: RegionIndex) {
        self.pending.dirty_add.push((replica, region));
    }

    /// The next batch to hand to the driver, if none is with it and there is something to
    /// persist.
    pub fn take_next(&mut self) -> Option<(MetaBatchId, MetaBatch)> {
        if self.in_flight.is_some() || self.pending.is_empty() {
            return None;
        }
        self.next_id += 1;
        let batch = std::mem::take(&mut self.pending);
        let id = MetaBatchId(self.next_id);
        self.in_flight = Some((id, batch.clone()));
        Some((id, batch))
    }

    /// The driver persisted `id`; returns the batch.
    pub fn persisted(&mut self, id: MetaBatchId) -> Option<MetaBatch> {
        match &self.in_flight {
            Some((cur, _)) if *cur == id => self.in_flight.take().map(|(_, b)| b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> RegionSet {
        v.iter().map(|x| RegionIndex(*x)).collect()
    }

    // Goal: a region goes cold only when idle, flushed everywhere and persisted, and a
    // removal not yet handed out is cancelled by a new write instead of re-logging.
    #[test]
    fn regions_cool_only_after_idle_and_flushed() {
        let mut meta = MetaQueue::default();
        let mut al = ActivityLog::new(2, &set(&[]), 0);
        let r = [RegionIndex(1)];
        assert!(!al.admit(&r, 0, &mut meta));
        let (id, b) = meta.take_next().unwrap();
        assert_eq!(b.al_add, r.to_vec());
        al.persisted(&meta.persisted(id).unwrap());
        assert!(al.admit(&r, 0, &mut meta));
        al.begin(&r, 0);
        al.cool(100, 10, 5, &set(&[]), &mut meta);
        assert_eq!(al.len(), 1, "in flight");
        al.end(&r, 3);
        al.cool(100, 10, 3, &set(&[]), &mut meta);
        assert_eq!(al.len(), 1, "not flushed");
        assert!(al.wants_flush(100, 10, 3));
        al.cool(100, 10, 4, &set(&[]), &mut meta);
        assert_eq!(al.len(), 0);
        assert_eq!(meta.pending.al_remove, r.to_vec());
        assert!(
            al.admit(&r, 200, &mut meta),
            "cancelled removal: still durable"
        );
        assert!(meta.pending.is_empty());
        // Full log: all or nothing.
        assert!(!al.admit(&[RegionIndex(2), RegionIndex(3)], 0, &mut meta));
        assert_eq!(al.len(), 1);
    }
}
