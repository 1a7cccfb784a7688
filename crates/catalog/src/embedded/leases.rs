//! The embedded backend's lease table: in memory, on a monotonic clock.
//!
//! A single-node agent has no other process to hand a volume to, so leases need not survive
//! a restart: on open, every key still bound to a lease of the previous process is deleted
//! (its holder is gone, just as if the lease had expired). Expiry is checked every
//! `LEASE_CHECK_INTERVAL`, like etcd's lessor, so a lapsed lease's keys vanish within
//! TTL + that interval. The table is plain data with the clock passed in, so it is tested
//! without waiting.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::kv::{CatalogError, Result};
use crate::lease::{Lease, LeaseId, MIN_LEASE_TTL};
use crate::records::now_ms;

/// How often the reaper looks for expired leases (etcd's lessor checks every 500 ms too).
pub const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(500);

struct Entry {
    ttl: Duration,
    /// Monotonic instant after which the lease is expired unless renewed.
    deadline: Instant,
    /// Keys bound to the lease (relative keys, as stored).
    keys: BTreeSet<String>,
}

pub(super) struct LeaseTable {
    /// Next id to hand out; seeded from the wall clock so ids of a previous process (whose
    /// leases all died with it) are not reused by the next one.
    next_id: i64,
    leases: HashMap<LeaseId, Entry>,
    /// Which lease each bound key belongs to (a put without lease unbinds it, as in etcd).
    bound: HashMap<String, LeaseId>,
}

impl LeaseTable {
    pub(super) fn new() -> LeaseTable {
        LeaseTable {
            next_id: ((now_ms() & 0x7fff_ffff_ffff) << 16) as i64 + 1,
            leases: HashMap::new(),
            bound: HashMap::new(),
        }
    }

    pub(super) fn grant(&mut self, ttl: Duration, now: Instant) -> Lease {
        let ttl = ttl.max(MIN_LEASE_TTL);
        let id = LeaseId(self.next_id);
        self.next_id += 1;
        let entry = Entry {
            ttl,
            deadline: now + ttl,
            keys: BTreeSet::new(),
        };
        self.leases.insert(id, entry);
        Lease { id, ttl }
    }

    fn live(&mut self, id: LeaseId, now: Instant) -> Result<&mut Entry> {
        match self.leases.get_mut(&id) {
            Some(e) if e.deadline > now => Ok(e),
            _ => Err(CatalogError::LeaseExpired { lease: id }),
        }
    }

    pub(super) fn check_alive(&mut self, id: LeaseId, now: Instant) -> Result<()> {
        self.live(id, now).map(drop)
    }

    pub(super) fn renew(&mut self, id: LeaseId, now: Instant) -> Result<Duration> {
        let e = self.live(id, now)?;
        e.deadline = now + e.ttl;
        Ok(e.ttl)
    }

    pub(super) fn remaining(&self, id: LeaseId, now: Instant) -> Option<Duration> {
        let e = self.leases.get(&id)?;
        (e.deadline > now).then(|| e.deadline - now)
    }

    /// Records that `key` was just written bound to `lease` (or unbound, or deleted: `None`).
    pub(super) fn bind(&mut self, key: &str, lease: Option<LeaseId>) {
        if let Some(old) = self.bound.remove(key) {
            if let Some(e) = self.leases.get_mut(&old) {
                e.keys.remove(key);
            }
        }
        if let Some(id) = lease {
            if let Some(e) = self.leases.get_mut(&id) {
                e.keys.insert(key.to_owned());
                self.bound.insert(key.to_owned(), id);
            }
        }
    }

    /// Forgets the lease; returns the keys that must now be deleted.
    pub(super) fn remove(&mut self, id: LeaseId) -> Vec<String> {
        let Some(e) = self.leases.remove(&id) else {
            return Vec::new();
        };
        for k in &e.keys {
            self.bound.remove(k);
        }
        e.keys.into_iter().collect()
    }

    /// Removes every lease past its deadline; returns each with the keys to delete.
    pub(super) fn take_expired(&mut self, now: Instant) -> Vec<(LeaseId, Vec<String>)> {
        let due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        due.into_iter().map(|id| (id, self.remove(id))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: expiry, renewal and key binding follow the clock passed in, with no waiting.
    #[test]
    fn leases_expire_renew_and_carry_their_keys() {
        let t0 = Instant::now();
        let mut t = LeaseTable::new();
        let a = t.grant(Duration::from_secs(3), t0);
        let b = t.grant(Duration::from_millis(10), t0);
        assert_eq!(b.ttl, MIN_LEASE_TTL, "short TTLs are raised");
        t.bind("owners/x", Some(a.id));
        t.bind("alive/n", Some(b.id));
        t.bind("alive/n", Some(a.id)); // rebinding moves the key
        assert_eq!(t.renew(a.id, t0 + Duration::from_secs(2)).unwrap(), a.ttl);
        let later = t0 + Duration::from_secs(4);
        assert!(
            t.remaining(a.id, later).is_some(),
            "renewed at 2 s → lives to 5 s"
        );
        let expired = t.take_expired(later);
        assert_eq!(
            expired,
            vec![(b.id, vec![])],
            "b expired and owns nothing now"
        );
        assert!(t.renew(b.id, later).is_err());
        let gone = t.take_expired(t0 + Duration::from_secs(6));
        assert_eq!(
            gone,
            vec![(a.id, vec!["alive/n".to_owned(), "owners/x".to_owned()])]
        );
        assert!(t.remaining(a.id, t0).is_none());
    }
}
