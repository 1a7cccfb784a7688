//! The replication metadata blob: the activity log and every replica's dirty bitmap, as
//! one self-contained, checksummed record written whole to every connected replica.
//!
//! Format version 1, big-endian:
//!
//! ```text
//! 0    8  magic "BWREPLM\n"
//! 8    4  format version (1)
//! 12   4  reserved, zero
//! 16   8  generation of the attachment that wrote it
//! 24   8  sequence number (strictly increasing across attachments: a new attachment
//!         continues from the highest it read)
//! 32   8  region size in bytes
//! 40   4  A: number of activity-log runs
//! 44   4  B: number of replica bitmaps
//! 48      A × run                      activity-log regions
//!         B × (8 replica id, 4 R, R × run)   dirty regions per replica
//! end-4 4 CRC-32C of everything before it
//!
//! run = 8 first region, 8 number of regions (≥ 1); runs ascending and disjoint
//! ```
//!
//! Runs keep the blob small in both common cases (a few hot regions; a replica dirty over
//! long stretches) and bound it by the region count: at most one run per two regions.
//! Decoding refuses anything it does not fully understand (magic, version, checksum,
//! counts that do not match the length, overlapping runs): guessing could shrink the
//! activity log or a bitmap and skip a region that differs.

use std::collections::BTreeMap;

use bw_types::Generation;
use replication::{MetaBatch, RegionIndex, RegionSet, ReplicaId};

const MAGIC: [u8; 8] = *b"BWREPLM\n";
/// The only format version this build reads and writes.
pub const META_FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 48;

/// The driver's in-memory copy of what the blob holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaState {
    pub generation: Generation,
    pub seq: u64,
    pub region_size_bytes: u64,
    pub activity_log: RegionSet,
    /// Replicas without an entry (or with an empty set) have nothing dirty.
    pub dirty: BTreeMap<ReplicaId, RegionSet>,
}

/// Why a blob could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("metadata blob is truncated or has a bad length")]
    Length,
    #[error("metadata blob has a bad magic number")]
    Magic,
    #[error(
        "metadata blob has format version {0}; this build reads version {META_FORMAT_VERSION}"
    )]
    Version(u32),
    #[error("metadata blob checksum mismatch")]
    Checksum,
    #[error("metadata blob has unordered or empty runs")]
    Runs,
}

impl MetaState {
    /// Applies one batch in the core's order: `dirty_clear`, `dirty_add`, `al_add`,
    /// `al_remove`, and bumps the sequence number.
    pub fn apply(&mut self, b: &MetaBatch) {
        for r in &b.dirty_clear {
            self.dirty.remove(r);
        }
        for (r, k) in &b.dirty_add {
            self.dirty.entry(*r).or_default().insert(*k);
        }
        self.activity_log.extend(b.al_add.iter().copied());
        for k in &b.al_remove {
            self.activity_log.remove(k);
        }
        self.seq += 1;
    }

    pub fn encode(&self) -> Vec<u8> {
        let al = runs(&self.activity_log);
        let bitmaps: Vec<(ReplicaId, Vec<(u64, u64)>)> = self
            .dirty
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(r, s)| (*r, runs(s)))
            .collect();
        let mut b = Vec::with_capacity(HEADER_LEN + 16 * al.len() + 4);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&META_FORMAT_VERSION.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.generation.0.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.region_size_bytes.to_be_bytes());
        b.extend_from_slice(&(al.len() as u32).to_be_bytes());
        b.extend_from_slice(&(bitmaps.len() as u32).to_be_bytes());
        put_runs(&mut b, &al);
        for (r, rs) in &bitmaps {
            b.extend_from_slice(&r.0.to_be_bytes());
            b.extend_from_slice(&(rs.len() as u32).to_be_bytes());
            put_runs(&mut b, rs);
        }
        let crc = crc32c(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    pub fn decode(blob: &[u8]) -> Result<MetaState, MetaError> {
        if blob.len() < HEADER_LEN + 4 {
            return Err(MetaError::Length);
        }
        if blob[..8] != MAGIC {
            return Err(MetaError::Magic);
        }
        let mut c = Cursor { b: blob, at: 8 };
        let version = c.u32()?;
        if version != META_FORMAT_VERSION {
            return Err(MetaError::Version(version));
        }
        let (body, tail) = blob.split_at(blob.len() - 4);
        if crc32c(body) != u32::from_be_bytes(tail.try_into().expect("4 bytes")) {
            return Err(MetaError::Checksum);
        }
        let c = &mut Cursor {
            b: body,
            at: c.at + 4,
        };
        let generation = Generation(c.u64()?);
        let seq = c.u64()?;
        let region_size_bytes = c.u64()?;
        let n_al = c.u32()? as usize;
        let n_rep = c.u32()? as usize;
        let activity_log = c.runs(n_al)?;
        let mut dirty = BTreeMap::new();
        for _ in 0..n_rep {
            let id = ReplicaId(c.u64()?);
            let n = c.u32()? as usize;
            dirty.insert(id, c.runs(n)?);
        }
        if c.at != body.len() {
            return Err(MetaError::Length);
        }
        Ok(MetaState {
            generation,
            seq,
            region_size_bytes,
            activity_log,
            dirty,
        })
    }
}

/// Ascending runs `(first, count)` of a region set.
fn runs(set: &RegionSet) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for k in set {
        match out.last_mut() {
            Some((first, n)) if *first + *n == k.0 => *n += 1,
            _ => out.push((k.0, 1)),
        }
    }
    out
}

fn put_runs(b: &mut Vec<u8>, runs: &[(u64, u64)]) {
    for (first, n) in runs {
        b.extend_from_slice(&first.to_be_bytes());
        b.extend_from_slice(&n.to_be_bytes());
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], MetaError> {
        let end = self.at.checked_add(n).ok_or(MetaError::Length)?;
        let s = self.b.get(self.at..end).ok_or(MetaError::Length)?;
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, MetaError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, MetaError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    /// `n` runs, checked ascending, disjoint and non-empty.
    fn runs(&mut self, n: usize) -> Result<RegionSet, MetaError> {
        // Each run is 16 bytes: a count larger than what is left is a bad blob, caught
        // before anything is allocated.
        if n.saturating_mul(16) > self.b.len() - self.at {
            return Err(MetaError::Length);
        }
        let mut set = RegionSet::new();
        let mut next_free = 0u64;
        for i in 0..n {
            let (first, count) = (self.u64()?, self.u64()?);
            let end = first.checked_add(count).ok_or(MetaError::Runs)?;
            if count == 0 || (i > 0 && first <= next_free) {
                return Err(MetaError::Runs);
            }
            set.extend((first..end).map(RegionIndex));
            next_free = end;
        }
        Ok(set)
    }
}

/// CRC-32C (Castagnoli), bitwise: blobs are a few KiB, written once per metadata batch.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> RegionSet {
        v.iter().map(|k| RegionIndex(*k)).collect()
    }

    // Goal: a state survives encode/decode, and runs are compact.
    #[test]
    fn blob_round_trips() {
        let mut s = MetaState {
            generation: Generation(7),
            seq: 42,
            region_size_bytes: 1 << 20,
            activity_log: set(&[0, 1, 2, 9]),
            dirty: BTreeMap::new(),
        };
        s.dirty.insert(ReplicaId(2), set(&[5, 6, 7, 8, 100]));
        let b = s.encode();
        assert_eq!(b.len(), HEADER_LEN + 16 * 2 + 12 + 16 * 2 + 4);
        assert_eq!(MetaState::decode(&b), Ok(s));
    }

    // Goal: the check value of the standard CRC-32C test vector.
    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    // Goal: a blob of another version, a flipped bit, or a truncation is refused.
    #[test]
    fn bad_blobs_are_refused() {
        let s = MetaState {
            activity_log: set(&[3]),
            ..MetaState::default()
        };
        let good = s.encode();
        let mut v2 = good.clone();
        v2[11] = 2;
        assert_eq!(MetaState::decode(&v2), Err(MetaError::Version(2)));
        let mut flipped = good.clone();
        flipped[50] ^= 1;
        assert_eq!(MetaState::decode(&flipped), Err(MetaError::Checksum));
        assert_eq!(MetaState::decode(&good[..20]), Err(MetaError::Length));
    }

    // Goal: batches apply in the documented order (clear before add).
    #[test]
    fn batches_apply_in_order() {
        let mut s = MetaState::default();
        s.dirty.insert(ReplicaId(1), set(&[1]));
        s.apply(&MetaBatch {
            al_add: vec![RegionIndex(4)],
            al_remove: vec![],
            dirty_add: vec![(ReplicaId(1), RegionIndex(2))],
            dirty_clear: vec![ReplicaId(1)],
        });
        assert_eq!(s.dirty[&ReplicaId(1)], set(&[2]));
        assert_eq!(s.activity_log, set(&[4]));
        assert_eq!(s.seq, 1);
    }
}
