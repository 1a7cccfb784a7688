//! The replication-metadata area of a replica: one opaque blob (the replication driver's
//! activity log and dirty bitmaps, serialised by the driver) that every replica keeps
//! durably, fenced like data, so the next attachment (possibly on another node) can read
//! it back from any replica that was in sync.
//!
//! **File** `<volume file>.repl` ([`default_repl_meta_path`]), next to the generation
//! record `<volume file>.meta`. It holds two *slots*, at offset 0 and at
//! [`REPL_META_SLOT_SPAN`] (the file is sparse: only the bytes written take space). A
//! write goes to the slot that does *not* hold the newest blob, in place: one `pwrite` of
//! header and blob, one `fdatasync`. No temporary file, no rename, no directory fsync: the
//! driver writes this blob before the first write to every new activity-log region, so its
//! cost is on the write path (see docs/design/storage.md). Slot format, big-endian:
//!
//! ```text
//! 0   8  magic "BWREPLM\n"
//! 8   4  format version (2)
//! 12  4  slot index (0 or 1)
//! 16  8  generation of the writer
//! 24  8  session of the writer
//! 32  8  counter: one more than the newest slot's when written
//! 40  8  blob length N (≤ MAX_REPL_META_BYTES)
//! 48  4  CRC-32C of bytes 0..48 followed by the blob
//! 52 12  reserved, zero
//! 64  N  the blob
//! ```
//!
//! **Read** ([`Replica::read_repl_meta`]): the valid slot with the higher counter. A slot
//! that was never written (short or an all-zero header) is empty; both empty → `None`. A
//! damaged slot next to a valid one is what a crash during a write leaves (a torn write,
//! never acknowledged), so the valid one is the truth. No valid slot but a damaged one →
//! `ReplicaError::MetaCorrupt`: the driver must not guess its dirty regions.
//!
//! **Write** ([`Replica::write_repl_meta`]): refused if `(generation, session)` is below the
//! replica's fence and session floor (the same check as a data request, counted in flight so
//! a newer session's admission waits for it), serialised by a mutex. The writer remembers
//! which slot holds the newest durable blob and never overwrites it:
//!
//! | crash or failure during or after | the file holds | why it is safe |
//! |---|---|---|
//! | the `pwrite` (torn) | the old blob in the other slot, this slot invalid | the write was never acknowledged |
//! | the `pwrite`, before the `fdatasync` | the old blob, or the new one if it reached the disk | not acknowledged; either is a blob the driver wrote in order |
//! | a failed `pwrite` or `fdatasync` | the old blob in the other slot | `ReplMetaError::Io`, never retried as if it worked; the next write goes to the same (failed) slot again, never to the one holding the last durable blob |
//!
//! Format version 1 (one blob, 48-byte header, replaced through a temporary file) is still
//! read from slot 0 as counter 0, so a replica written by an older build keeps its blob;
//! the first write goes to slot 1.
//!
//! The cost of two slots: a damaged *newest* slot (bit rot after it was acknowledged) is
//! indistinguishable from a torn write and reads as the older blob. The blob is kept on
//! every replica and the checksum catches the damage, so this takes a second fault.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bw_types::Generation;

use crate::crc::{crc32c_update, CRC_INIT};
use crate::meta_file::{fsync_parent, io_err};
use crate::replica::{Fenced, Replica, ReplicaError, META_SUFFIX};

/// Suffix of the replication-metadata file next to a volume file
/// ([`default_repl_meta_path`]). Deleting a volume must delete it too.
pub const REPL_META_SUFFIX: &str = ".repl";

/// Largest replication-metadata blob. Hit → [`ReplMetaError::TooLarge`] (nothing written)
/// and, over the peer protocol, `ERROR{INVALID}`. The driver's activity log and dirty
/// bitmaps are one bit per 1 MiB region per replica: 16 MiB covers a 32 TiB volume with
/// four bitmaps and still fits a single peer-protocol frame.
pub const MAX_REPL_META_BYTES: usize = 16 << 20;

/// Size of a slot's header before the blob.
pub const REPL_META_HEADER_LEN: usize = 64;

/// Offset of slot 1: room for the largest header and blob, rounded up to 4 KiB.
pub const REPL_META_SLOT_SPAN: u64 =
    ((REPL_META_HEADER_LEN + MAX_REPL_META_BYTES) as u64).div_ceil(4096) * 4096;

const REPL_MAGIC: [u8; 8] = *b"BWREPLM\n";
const REPL_VERSION: u32 = 2;
/// The whole-file format of older builds, read from slot 0 only.
const REPL_VERSION_1: u32 = 1;
const V1_HEADER_LEN: usize = 48;

/// The path of a volume file's replication metadata: `<volume file>.repl`.
pub fn default_repl_meta_path(volume_path: &Path) -> PathBuf {
    let mut p = volume_path.as_os_str().to_owned();
    p.push(REPL_META_SUFFIX);
    PathBuf::from(p)
}

/// The replication-metadata path of a replica opened with the generation record
/// `meta_path`: `<x>.meta` → `<x>.repl` (so `<volume file>.meta` gives
/// [`default_repl_meta_path`]), any other name gets `.repl` appended.
pub(crate) fn default_repl_meta_path_for(meta_path: &Path) -> PathBuf {
    let s = meta_path.as_os_str().to_string_lossy();
    match s.strip_suffix(META_SUFFIX) {
        Some(base) if !base.is_empty() && !base.ends_with('/') => {
            PathBuf::from(format!("{base}{REPL_META_SUFFIX}"))
        }
        _ => PathBuf::from(format!("{s}{REPL_META_SUFFIX}")),
    }
}

/// A refused or failed [`Replica::write_repl_meta`].
#[derive(Debug, thiserror::Error)]
pub enum ReplMetaError {
    /// `(generation, session)` is below the replica's fence or session floor; nothing was
    /// written. `highest` is the replica's highest generation: above the caller's, a newer
    /// attachment exists; equal, a newer session of the caller's attachment.
    #[error("fenced: the replica's highest generation is {highest}")]
    Fenced { highest: Generation },
    #[error("replication metadata of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The write (or its fdatasync) failed. The file still holds the previous blob in the
    /// other slot; the caller must treat the replica as failed, never retry as if the
    /// write had worked.
    #[error("cannot write the replication metadata")]
    Io(#[source] ReplicaError),
}

impl From<Fenced> for ReplMetaError {
    fn from(f: Fenced) -> ReplMetaError {
        ReplMetaError::Fenced { highest: f.highest }
    }
}

/// The writer's side of the file, under [`Replica`]'s `repl_lock`.
#[derive(Debug, Default)]
pub(crate) struct ReplSlots {
    /// Open for writing after the first write.
    file: Option<File>,
    /// The slot holding the newest durable blob and its counter, once the file was read.
    newest: Option<Option<(u64, u64)>>,
}

/// A fault injected into a slot write (tests only): stop after `keep` bytes of the
/// `pwrite` as a crash would, or fail the `pwrite` with an I/O error after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum SlotFault {
    Crash { keep: usize },
    Fail { keep: usize },
}

impl Replica {
    /// Where this replica keeps its replication metadata.
    pub fn repl_meta_path(&self) -> &Path {
        &self.repl_path
    }

    /// Writes `bytes` as the replication metadata, durably, if `(generation, session)` is
    /// not fenced; see the module docs. Blocks (one `pwrite`, one `fdatasync`): async
    /// callers run it on a blocking thread. Concurrent calls are serialised; the one that
    /// takes the lock last wins.
    pub fn write_repl_meta(
        &self,
        generation: Generation,
        session: u64,
        bytes: &[u8],
    ) -> Result<(), ReplMetaError> {
        self.write_repl_meta_faulty(generation, session, bytes, None)
    }

    pub(crate) fn write_repl_meta_faulty(
        &self,
        generation: Generation,
        session: u64,
        bytes: &[u8],
        fault: Option<SlotFault>,
    ) -> Result<(), ReplMetaError> {
        if bytes.len() > MAX_REPL_META_BYTES {
            return Err(ReplMetaError::TooLarge {
                len: bytes.len(),
                max: MAX_REPL_META_BYTES,
            });
        }
        let mut slots = self.repl_lock.lock().unwrap();
        // Checked under the lock and counted in flight for the whole write, so an
        // `admit_session` of a newer session waits for it to finish.
        let _entered = self
            .enter_session(generation, session)
            .map_err(ReplMetaError::from)?;
        let path = &self.repl_path;
        if slots.file.is_none() {
            let existed = path.exists();
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| ReplMetaError::Io(io_err("open", path)(e)))?;
            if !existed {
                // The file's name must survive a crash before the first blob is trusted.
                fsync_parent(path).map_err(ReplMetaError::Io)?;
            }
            slots.file = Some(f);
        }
        let newest = match slots.newest {
            Some(n) => n,
            None => {
                // The newest valid slot, whatever else the file holds: a damaged slot is
                // overwritten, a valid one never.
                let file = slots.file.as_ref().expect("opened above");
                let n = read_slots(file, path).map_err(ReplMetaError::Io)?.newest();
                slots.newest = Some(n);
                n
            }
        };
        let file = slots.file.as_ref().expect("opened above");
        let (slot, counter) = match newest {
            Some((s, c)) => (1 - s, c + 1),
            None => (0, 1),
        };
        let mut buf = Vec::with_capacity(REPL_META_HEADER_LEN + bytes.len());
        buf.extend_from_slice(&encode_header(slot, generation, session, counter, bytes));
        buf.extend_from_slice(bytes);
        let offset = slot * REPL_META_SLOT_SPAN;
        let io = |action| move |e| ReplMetaError::Io(io_err(action, path)(e));
        match fault {
            None => file.write_all_at(&buf, offset).map_err(io("write"))?,
            Some(SlotFault::Crash { keep }) => {
                file.write_all_at(&buf[..keep], offset)
                    .map_err(io("write"))?;
                return Ok(());
            }
            Some(SlotFault::Fail { keep }) => {
                file.write_all_at(&buf[..keep], offset)
                    .map_err(io("write"))?;
                return Err(io("write")(io::Error::other("injected write failure")));
            }
        }
        // Never retried: a failed fdatasync may have dropped the dirty pages (fail-stop).
        file.sync_data().map_err(io("fdatasync"))?;
        slots.newest = Some(Some((slot, counter)));
        Ok(())
    }

    /// The replication metadata last written, or `None` if it was never written.
    pub fn read_repl_meta(&self) -> Result<Option<Vec<u8>>, ReplicaError> {
        let _slots = self.repl_lock.lock().unwrap();
        let f = match File::open(&self.repl_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &self.repl_path)(e)),
        };
        read_slots(&f, &self.repl_path)?.into_blob(&self.repl_path)
    }
}

/// What one slot holds.
#[derive(Debug)]
enum Slot {
    Empty,
    Valid { counter: u64, blob: Vec<u8> },
    Damaged(String),
}

struct Slots([Slot; 2]);

impl Slots {
    fn newest(&self) -> Option<(u64, u64)> {
        let mut best = None;
        for (i, s) in self.0.iter().enumerate() {
            if let Slot::Valid { counter, .. } = s {
                if best.is_none_or(|(_, c)| *counter > c) {
                    best = Some((i as u64, *counter));
                }
            }
        }
        best
    }

    fn into_blob(self, path: &Path) -> Result<Option<Vec<u8>>, ReplicaError> {
        let newest = self.newest();
        let [s0, s1] = self.0;
        let pair = match newest {
            Some((1, _)) => (s1, s0),
            _ => (s0, s1),
        };
        match pair {
            (Slot::Valid { blob, .. }, _) => Ok(Some(blob)),
            (Slot::Damaged(reason), _) | (_, Slot::Damaged(reason)) => {
                Err(ReplicaError::MetaCorrupt {
                    path: path.into(),
                    reason,
                })
            }
            _ => Ok(None),
        }
    }
}

fn read_slots(f: &File, path: &Path) -> Result<Slots, ReplicaError> {
    Ok(Slots([read_slot(f, path, 0)?, read_slot(f, path, 1)?]))
}

/// Reads up to `len` bytes at `offset`; fewer at the end of the file.
fn read_at_most(f: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, ReplicaError> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

fn read_slot(f: &File, path: &Path, slot: u64) -> Result<Slot, ReplicaError> {
    let offset = slot * REPL_META_SLOT_SPAN;
    let h = read_at_most(f, path, offset, REPL_META_HEADER_LEN)?;
    if h.iter().all(|&b| b == 0) {
        // Never written: past the end of the file, or a hole.
        return Ok(Slot::Empty);
    }
    let damaged = |reason: String| Ok(Slot::Damaged(format!("slot {slot}: {reason}")));
    if h.len() < V1_HEADER_LEN {
        return damaged(format!("{} bytes, shorter than its header", h.len()));
    }
    if h[0..8] != REPL_MAGIC {
        return damaged("bad magic".into());
    }
    let version = be32(&h[8..12]);
    let (header_len, len_at, crc_at, counter) = match version {
        REPL_VERSION if h.len() == REPL_META_HEADER_LEN => {
            if be32(&h[12..16]) as u64 != slot {
                return damaged(format!("header names slot {}", be32(&h[12..16])));
            }
            (REPL_META_HEADER_LEN, 40, 48, be64(&h[32..40]))
        }
        REPL_VERSION => return damaged("shorter than its header".into()),
        REPL_VERSION_1 if slot == 0 => (V1_HEADER_LEN, 32, 40, 0),
        v => return damaged(format!("unknown format version {v}")),
    };
    let len = be64(&h[len_at..len_at + 8]);
    if len > MAX_REPL_META_BYTES as u64 {
        return damaged(format!("blob length {len} exceeds {MAX_REPL_META_BYTES}"));
    }
    let blob = read_at_most(f, path, offset + header_len as u64, len as usize)?;
    if blob.len() as u64 != len {
        return damaged(format!("{} blob bytes instead of {len}", blob.len()));
    }
    let crc = be32(&h[crc_at..crc_at + 4]);
    if crc != !crc32c_update(crc32c_update(CRC_INIT, &h[..crc_at]), &blob) {
        return damaged("checksum mismatch".into());
    }
    Ok(Slot::Valid { counter, blob })
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

fn encode_header(
    slot: u64,
    generation: Generation,
    session: u64,
    counter: u64,
    blob: &[u8],
) -> [u8; REPL_META_HEADER_LEN] {
    let mut h = [0u8; REPL_META_HEADER_LEN];
    h[0..8].copy_from_slice(&REPL_MAGIC);
    h[8..12].copy_from_slice(&REPL_VERSION.to_be_bytes());
    h[12..16].copy_from_slice(&(slot as u32).to_be_bytes());
    h[16..24].copy_from_slice(&generation.0.to_be_bytes());
    h[24..32].copy_from_slice(&session.to_be_bytes());
    h[32..40].copy_from_slice(&counter.to_be_bytes());
    h[40..48].copy_from_slice(&(blob.len() as u64).to_be_bytes());
    let crc = !crc32c_update(crc32c_update(CRC_INIT, &h[..48]), blob);
    h[48..52].copy_from_slice(&crc.to_be_bytes());
    h
}

#[cfg(test)]
#[path = "repl_meta_tests.rs"]
mod tests;
