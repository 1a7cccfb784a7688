//! The replication-metadata area of a replica: one opaque blob (the replication driver's
//! activity log and dirty bitmaps, serialised by the driver) that every replica keeps
//! durably, fenced like data, so the next attachment (possibly on another node) can read
//! it back from any replica that was in sync.
//!
//! **File** `<volume file>.repl` ([`default_repl_meta_path`]), next to the generation
//! record `<volume file>.meta`; big-endian:
//!
//! ```text
//! 0   8  magic "BWREPLM\n"
//! 8   4  format version (1)
//! 12  4  reserved, zero
//! 16  8  generation of the writer
//! 24  8  session of the writer
//! 32  8  blob length N (≤ MAX_REPL_META_BYTES)
//! 40  4  CRC-32C of bytes 0..40 followed by the blob
//! 44  4  reserved, zero
//! 48  N  the blob
//! ```
//!
//! The writer's generation and session are for forensics (which attachment wrote what);
//! the driver only sees the blob.
//!
//! **Write** ([`Replica::write_repl_meta`]): refused if `(generation, session)` is below the
//! replica's fence and session floor (the same check as a data request, counted in flight so
//! a newer session's admission waits for it), serialised by a mutex, then replaced
//! atomically: `.<name>.repl.tmp`, `fsync`, `rename`, `fsync` of the directory.
//!
//! | crash or failure after | the file holds | why it is safe |
//! |---|---|---|
//! | temp file written or synced | the old blob; the temp file is deleted by `Replica::open` and `remove_temp_files` | the write was never acknowledged |
//! | `rename`, before the directory fsync | old or new | not acknowledged yet; the driver rewrites or treats the replica as failed |
//! | a failed `write`/`fsync` of the temp file | the old blob (temp removed) | `ReplMetaError::Io`, never retried as if it worked |
//! | a failed directory fsync | old or new, unknown | `ReplMetaError::Io`: the driver must treat the replica as failed (fail-stop) |
//!
//! A corrupt file (magic, version, length, checksum) makes [`Replica::read_repl_meta`]
//! fail with `ReplicaError::MetaCorrupt`: the driver must not guess its dirty regions.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bw_types::Generation;

use crate::crc::{crc32c_update, CRC_INIT};
use crate::meta_file::{io_err, replace_file, StopAfter};
use crate::replica::{Fenced, Replica, ReplicaError, META_SUFFIX};

/// Suffix of the replication-metadata file next to a volume file
/// ([`default_repl_meta_path`]). Deleting a volume must delete it too.
pub const REPL_META_SUFFIX: &str = ".repl";

/// Largest replication-metadata blob. Hit → [`ReplMetaError::TooLarge`] (nothing written)
/// and, over the peer protocol, `ERROR{INVALID}`. The driver's activity log and dirty
/// bitmaps are one bit per 1 MiB region per replica: 16 MiB covers a 32 TiB volume with
/// four bitmaps and still fits a single peer-protocol frame.
pub const MAX_REPL_META_BYTES: usize = 16 << 20;

/// Size of the file's header before the blob.
pub const REPL_META_HEADER_LEN: usize = 48;

const REPL_MAGIC: [u8; 8] = *b"BWREPLM\n";
const REPL_VERSION: u32 = 1;

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
    /// The write (or one of its fsyncs) failed. The file holds the old blob, or after a
    /// failed directory fsync the old or the new one; the caller must treat the replica as
    /// failed, never retry as if the write had worked.
    #[error("cannot write the replication metadata")]
    Io(#[source] ReplicaError),
}

impl From<Fenced> for ReplMetaError {
    fn from(f: Fenced) -> ReplMetaError {
        ReplMetaError::Fenced { highest: f.highest }
    }
}

impl Replica {
    /// Where this replica keeps its replication metadata.
    pub fn repl_meta_path(&self) -> &Path {
        &self.repl_path
    }

    /// Replaces the replication metadata with `bytes`, durably, if `(generation, session)`
    /// is not fenced; see the module docs. Blocks (file write and two fsyncs): async
    /// callers run it on a blocking thread. Concurrent calls are serialised; the one that
    /// takes the lock last wins.
    pub fn write_repl_meta(
        &self,
        generation: Generation,
        session: u64,
        bytes: &[u8],
    ) -> Result<(), ReplMetaError> {
        self.write_repl_meta_stopping(generation, session, bytes, None)
    }

    pub(crate) fn write_repl_meta_stopping(
        &self,
        generation: Generation,
        session: u64,
        bytes: &[u8],
        stop: Option<StopAfter>,
    ) -> Result<(), ReplMetaError> {
        if bytes.len() > MAX_REPL_META_BYTES {
            return Err(ReplMetaError::TooLarge {
                len: bytes.len(),
                max: MAX_REPL_META_BYTES,
            });
        }
        let _serial = self.repl_lock.lock().unwrap();
        // Checked under the lock and counted in flight for the whole write, so an
        // `admit_session` of a newer session waits for it to finish.
        let _entered = self
            .enter_session(generation, session)
            .map_err(ReplMetaError::from)?;
        let header = encode_header(generation, session, bytes);
        replace_file(&self.repl_path, &[&header, bytes], stop).map_err(ReplMetaError::Io)
    }

    /// The replication metadata last written, or `None` if it was never written.
    pub fn read_repl_meta(&self) -> Result<Option<Vec<u8>>, ReplicaError> {
        read_repl_file(&self.repl_path)
    }
}

fn encode_header(generation: Generation, session: u64, blob: &[u8]) -> [u8; REPL_META_HEADER_LEN] {
    let mut h = [0u8; REPL_META_HEADER_LEN];
    h[0..8].copy_from_slice(&REPL_MAGIC);
    h[8..12].copy_from_slice(&REPL_VERSION.to_be_bytes());
    h[16..24].copy_from_slice(&generation.0.to_be_bytes());
    h[24..32].copy_from_slice(&session.to_be_bytes());
    h[32..40].copy_from_slice(&(blob.len() as u64).to_be_bytes());
    let crc = !crc32c_update(crc32c_update(CRC_INIT, &h[..40]), blob);
    h[40..44].copy_from_slice(&crc.to_be_bytes());
    h
}

fn read_repl_file(path: &Path) -> Result<Option<Vec<u8>>, ReplicaError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let corrupt = |reason: String| ReplicaError::MetaCorrupt {
        path: path.into(),
        reason,
    };
    // One byte more than the largest valid file tells an over-long file from a good one
    // without reading an arbitrarily large file into memory.
    let limit = (REPL_META_HEADER_LEN + MAX_REPL_META_BYTES + 1) as u64;
    let mut buf = Vec::new();
    f.take(limit)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    decode(&buf).map(Some).map_err(corrupt)
}

fn decode(buf: &[u8]) -> Result<Vec<u8>, String> {
    let Some(h) = buf.get(..REPL_META_HEADER_LEN) else {
        return Err(format!(
            "{} bytes, shorter than its {REPL_META_HEADER_LEN}-byte header",
            buf.len()
        ));
    };
    if h[0..8] != REPL_MAGIC {
        return Err("bad magic".into());
    }
    let version = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != REPL_VERSION {
        return Err(format!("unknown format version {version}"));
    }
    let len = u64::from_be_bytes(h[32..40].try_into().expect("8 bytes"));
    if len > MAX_REPL_META_BYTES as u64 {
        return Err(format!("blob length {len} exceeds {MAX_REPL_META_BYTES}"));
    }
    let blob = &buf[REPL_META_HEADER_LEN..];
    if blob.len() as u64 != len {
        return Err(format!("{} blob bytes instead of {len}", blob.len()));
    }
    let crc = u32::from_be_bytes(h[40..44].try_into().expect("4 bytes"));
    if crc != !crc32c_update(crc32c_update(CRC_INIT, &h[..40]), blob) {
        return Err("checksum mismatch".into());
    }
    Ok(blob.to_vec())
}

#[cfg(test)]
#[path = "repl_meta_tests.rs"]
mod tests;
