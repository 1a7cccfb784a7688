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
    /// A write or copy touching it went out since it entered the log (always true for the
    /// previous attachment's regions). A region only prefetched, or admitted for a write
    /// still queued, cannot differ between replicas.
    written: bool,
    /// Last time a write touched it (hot timer).
    last_touch_ms: u64,
    /// The flush sequence number that must have completed everywhere before the region may
    /// go cold: one more than the flushes issued when its last write finished.
    needs_flush: u64,
}

/// Regions evicted at once when the log is full: one scan of the log pays for several
/// admissions, so a random-write working set larger than the log costs a scan per
/// [`EVICT_BATCH`] new regions, not per write.
pub(crate) const EVICT_BATCH: usize = 8;

/// What eviction must respect: the flush sequence completed on every replica written, and
/// the regions locked by copies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Room<'a> {
    pub durable_flush: u64,
    pub locked: &'a RegionSet,
}

/// Regions added ahead of a sequential write stream ([`ActivityLog::prefetch`]).
pub(crate) const PREFETCH_REGIONS: u64 = 8;

/// Sequential streams remembered (by the end offset of their last write).
const STREAMS: usize = 8;

/// The in-memory activity log.
#[derive(Clone, Debug)]
pub(crate) struct ActivityLog {
    regions: BTreeMap<RegionIndex, AlRegion>,
    max_regions: usize,
    /// End offsets of recent writes, newest last: a write starting at one of them continues
    /// a sequential stream.
    streams: Vec<u64>,
    /// A write found the log full and could not make room (a flush may help).
    starved: bool,
    evicted: u64,
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
                    written: true,
                    last_touch_ms: now_ms,
                    needs_flush: 1,
                };
                (*r, entry)
            })
            .collect();
        ActivityLog {
            regions,
            max_regions,
            streams: Vec::new(),
            starved: false,
            evicted: 0,
        }
    }

    pub fn regions(&self) -> RegionSet {
        self.regions.keys().copied().collect()
    }

    /// The regions a write or copy went out to since they entered the log: where replicas
    /// may differ now (what a failed replica may lack).
    pub fn written_regions(&self) -> RegionSet {
        self.regions
            .iter()
            .filter(|(_, e)| e.written)
            .map(|(r, _)| *r)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Makes sure every region of a write is in the log. All or nothing: a write whose
    /// regions do not all fit adds none, so half-admitted writes cannot fill the log and
    /// wait on each other. When the log is full and `room` allows it, the least recently
    /// touched regions that are safe to drop make room ([`ActivityLog::evict`]). Returns
    /// true when all of them are in the log *and durable*.
    pub fn admit(
        &mut self,
        regions: &[RegionIndex],
        now_ms: u64,
        room: Option<Room<'_>>,
        meta: &mut MetaQueue,
    ) -> bool {
        let missing = regions
            .iter()
            .filter(|r| !self.regions.contains_key(r))
            .count();
        if missing > 0 && self.regions.len() + missing > self.max_regions {
            let need = self.regions.len() + missing - self.max_regions;
            let made = room.is_some_and(|room| self.evict(need, regions, room, meta));
            if !made {
                self.starved = true;
                return false;
            }
        }
        for r in regions {
            if !self.regions.contains_key(r) {
                self.insert(*r, now_ms, meta);
            }
        }
        regions.iter().all(|r| self.regions[r].durable)
    }

    /// Adds `r` (not in the log) and queues its durable addition.
    fn insert(&mut self, r: RegionIndex, now_ms: u64, meta: &mut MetaQueue) {
        // A removal not yet handed to the driver is simply cancelled: the persisted log
        // still holds the region.
        let durable = meta.cancel_al_remove(r);
        if !durable {
            meta.pending.al_add.push(r);
        }
        let entry = AlRegion {
            durable,
            inflight: 0,
            written: false,
            last_touch_ms: now_ms,
            needs_flush: 0,
        };
        self.regions.insert(r, entry);
    }

    /// Sequential read-ahead for the log: a write `[start, end)` that starts where a recent
    /// write ended continues a stream, so the [`PREFETCH_REGIONS`] regions after its last
    /// one are added now (those missing, only while the log has room without evicting).
    /// Their addition goes into the next metadata batch, off the stream's path: without
    /// it, a 1 MiB sequential writer waits for a metadata write on every replica per MiB.
    /// A prefetched region nobody writes goes cold after the hot time like any other; a
    /// crash before that makes the next attachment reconcile it for nothing (at most
    /// `PREFETCH_REGIONS` per stream).
    pub fn prefetch(
        &mut self,
        start: u64,
        end: u64,
        region_size: u64,
        volume_regions: u64,
        now_ms: u64,
        meta: &mut MetaQueue,
    ) {
        let sequential = match self.streams.iter().position(|e| *e == start) {
            Some(i) => {
                self.streams.remove(i);
                true
            }
            None => {
                if self.streams.len() == STREAMS {
                    self.streams.remove(0);
                }
                false
            }
        };
        self.streams.push(end);
        if !sequential || end == 0 {
            return;
        }
        let last = (end - 1) / region_size;
        for k in last + 1..(last + 1 + PREFETCH_REGIONS).min(volume_regions) {
            let r = RegionIndex(k);
            if self.regions.contains_key(&r) {
                continue;
            }
            if self.regions.len() >= self.max_regions {
                return;
            }
            self.insert(r, now_ms, meta);
        }
    }

    /// A region that may leave the log now, hot or not: its addition is durable, nothing
    /// touching it is in flight, a flush that covers its last write completed on every
    /// replica written (so the replicas agree on it), and no copy holds it.
    fn evictable(r: &RegionIndex, e: &AlRegion, room: &Room<'_>) -> bool {
        Self::idle(e, 0, 0) && e.needs_flush <= room.durable_flush && !room.locked.contains(r)
    }

    /// LRU eviction: removes at least `need` (and up to [`EVICT_BATCH`]) of the least
    /// recently touched evictable regions not in `keep`, queuing their durable removal in
    /// the same metadata batch as the additions that needed the room. All or nothing.
    fn evict(
        &mut self,
        need: usize,
        keep: &[RegionIndex],
        room: Room<'_>,
        meta: &mut MetaQueue,
    ) -> bool {
        let mut candidates: Vec<(u64, RegionIndex)> = self
            .regions
            .iter()
            .filter(|(r, e)| Self::evictable(r, e, &room) && !keep.contains(r))
            .map(|(r, e)| (e.last_touch_ms, *r))
            .collect();
        if candidates.len() < need {
            return false;
        }
        let take = need.max(EVICT_BATCH).min(candidates.len());
        if take < candidates.len() {
            candidates.select_nth_unstable(take - 1);
        }
        for (_, r) in &candidates[..take] {
            self.regions.remove(r);
            meta.pending.al_remove.push(*r);
        }
        self.evicted += take as u64;
        true
    }

    /// True (once, then reset) when a write found the log full since the last call.
    pub fn take_starved(&mut self) -> bool {
        std::mem::take(&mut self.starved)
    }

    /// True when a flush would let some region be evicted: idle, durable, its last write
    /// not yet covered by a flush completed everywhere.
    pub fn flush_frees_room(&self, durable_flush: u64) -> bool {
        self.wants_flush(0, 0, durable_flush)
    }

    /// Regions evicted so far to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// A write (or reconciliation copy) touching `regions` went out.
    pub fn begin(&mut self, regions: &[RegionIndex], now_ms: u64) {
        for r in regions {
            if let Some(e) = self.regions.get_mut(r) {
                e.inflight += 1;
                e.written = true;
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
        let room = Room {
            durable_flush,
            locked,
        };
        let cold: Vec<RegionIndex> = self
            .regions
            .iter()
            .filter(|(r, e)| Self::idle(e, now_ms, hot_ms) && Self::evictable(r, e, &room))
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

    /// Nothing to persist and nothing being persisted.
    pub fn idle(&self) -> bool {
        self.in_flight.is_none() && self.pending.is_empty()
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
        assert!(!al.admit(&r, 0, None, &mut meta));
        let (id, b) = meta.take_next().unwrap();
        assert_eq!(b.al_add, r.to_vec());
        al.persisted(&meta.persisted(id).unwrap());
        assert!(al.admit(&r, 0, None, &mut meta));
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
            al.admit(&r, 200, None, &mut meta),
            "cancelled removal: still durable"
        );
        assert!(meta.pending.is_empty());
        // Full log: all or nothing.
        assert!(!al.admit(&[RegionIndex(2), RegionIndex(3)], 0, None, &mut meta));
        assert_eq!(al.len(), 1);
    }

    // Goal: a full log evicts the least recently touched regions that are durable, idle,
    // flushed everywhere and not locked (never one the write itself needs), a batch at a
    // time, in the same metadata batch as the addition; without any such region the write
    // waits, the log reports it starved once, and says a flush would help.
    #[test]
    fn full_log_evicts_least_recently_used_safe_regions() {
        let mut meta = MetaQueue::default();
        let max = EVICT_BATCH + 4;
        let mut al = ActivityLog::new(max, &set(&[]), 0);
        let locked = set(&[1]);
        let room = |durable_flush| {
            Some(Room {
                durable_flush,
                locked: &locked,
            })
        };
        // Fill the log; region k last touched at time k, except region 0 (time 1000).
        for k in 0..max as u64 {
            let r = [RegionIndex(k)];
            let t = if k == 0 { 1000 } else { k };
            al.admit(&r, t, None, &mut meta);
            let (id, _) = meta.take_next().unwrap();
            al.persisted(&meta.persisted(id).unwrap());
            al.begin(&r, t);
            al.end(&r, 0);
        }
        // The last region still has a write in flight.
        let busy = RegionIndex(max as u64 - 1);
        al.begin(&[busy], 2000);
        let new = [RegionIndex(100)];
        assert!(!al.admit(&new, 3000, None, &mut meta), "no room allowed");
        assert!(
            !al.admit(&new, 3000, room(0), &mut meta),
            "nothing flushed yet"
        );
        assert!(al.take_starved());
        assert!(!al.take_starved(), "reported once");
        assert!(al.flush_frees_room(0));
        assert_eq!(al.len(), max);
        assert!(meta.pending.is_empty());
        // Flushed everywhere: the EVICT_BATCH least recently touched of the candidates go
        // (not region 0, touched late; not 1, locked; not the busy one).
        assert!(
            !al.admit(&new, 3000, room(1), &mut meta),
            "in, not durable yet"
        );
        assert!(!al.take_starved());
        let evicted: Vec<RegionIndex> = (2..2 + EVICT_BATCH as u64).map(RegionIndex).collect();
        let (id, b) = meta.take_next().unwrap();
        assert_eq!(b.al_add, new.to_vec());
        assert_eq!(b.al_remove, evicted);
        assert_eq!(al.evicted(), EVICT_BATCH as u64);
        assert_eq!(al.len(), max - EVICT_BATCH + 1);
        for r in &evicted {
            assert!(!al.regions().contains(r));
        }
        al.persisted(&meta.persisted(id).unwrap());
        assert!(al.admit(&new, 3001, room(1), &mut meta));
        // A write never evicts its own regions: with only region 0 and its own left as
        // candidates, two new regions cannot both fit.
        let mut al = ActivityLog::new(2, &set(&[5, 6]), 0);
        assert!(!al.admit(
            &[RegionIndex(5), RegionIndex(7), RegionIndex(8)],
            1,
            room(1),
            &mut meta
        ));
        assert_eq!(al.regions(), set(&[5, 6]));
    }

    // Goal: a write continuing a recent write's end adds the next PREFETCH_REGIONS regions
    // (missing ones only, within the volume, never beyond the log's size); a write out of
    // nowhere adds nothing.
    #[test]
    fn sequential_streams_prefetch_the_next_regions() {
        const M: u64 = 1 << 20;
        let mut meta = MetaQueue::default();
        let mut al = ActivityLog::new(20, &set(&[]), 0);
        al.prefetch(0, M, M, 100, 0, &mut meta);
        assert!(meta.pending.is_empty(), "first write of a stream");
        al.prefetch(50 * M, 50 * M + 4096, M, 100, 0, &mut meta);
        assert!(meta.pending.is_empty(), "random write");
        // Continues the first stream: regions 2..=9 (the write's own region 1 is admit's).
        al.prefetch(M, 2 * M, M, 100, 0, &mut meta);
        let want: Vec<_> = (2..2 + PREFETCH_REGIONS).map(RegionIndex).collect();
        assert_eq!(meta.pending.al_add, want);
        assert_eq!(al.len(), PREFETCH_REGIONS as usize);
        // Prefetched regions no write went out to cannot differ between replicas.
        assert!(al.written_regions().is_empty());
        al.begin(&[RegionIndex(2)], 0);
        assert_eq!(al.written_regions(), set(&[2]));
        // The next one adds only the one region not there yet.
        al.prefetch(2 * M, 3 * M, M, 100, 0, &mut meta);
        assert_eq!(
            meta.pending.al_add.last(),
            Some(&RegionIndex(2 + PREFETCH_REGIONS))
        );
        assert_eq!(al.len(), PREFETCH_REGIONS as usize + 1);
        // Near the end of the volume: nothing past the last region.
        al.prefetch(95 * M, 96 * M, M, 100, 0, &mut meta);
        al.prefetch(96 * M, 97 * M, M, 100, 0, &mut meta);
        assert!(al.regions().iter().all(|r| r.0 < 100));
        assert!(al.regions().contains(&RegionIndex(99)));
        // A full log stops prefetching (no eviction for a guess).
        let mut meta = MetaQueue::default();
        let mut al = ActivityLog::new(3, &set(&[]), 0);
        al.prefetch(0, M, M, 100, 0, &mut meta);
        al.prefetch(M, 2 * M, M, 100, 0, &mut meta);
        assert_eq!(al.regions(), set(&[2, 3, 4]));
    }
}
