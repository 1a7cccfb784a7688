//! [`Replica`]: a [`LocalVolume`] guarded by a durable generation fence.
//!
//! Every replica remembers the highest generation any attachment presented to it, in a
//! small metadata file next to the volume file (`<volume file>.meta`, see
//! [`default_meta_path`]). The rules (SPEC §2 "generation", G2):
//!
//! - [`Replica::admit`]`(g)`: `g` below the highest → refused ([`Fenced`]); `g` above → the
//!   new highest is written durably (tmp, fsync, rename, fsync dir) *before* anything is
//!   admitted, then every request of an older generation still running is waited for;
//!   equal → admitted.
//! - Every request carries its attachment's generation and is checked with one atomic load
//!   ([`Replica::enter`]), so an older attachment is refused from the moment a newer one
//!   was admitted, whether it comes over the peer protocol or is this node's own local
//!   attachment ([`ReplicaDevice`], from [`Replica::device_for`]).
//!
//! **Why the drain.** A request of generation 5 that passed its check just before
//! `admit(6)` raised the fence may still be writing. `admit(6)` waits until the counter of
//! requests between check and completion is zero, so no write of generation 5 lands after
//! generation 6's first write. The check (`inflight += 1`, then load the fence) and the
//! raise (store the fence, then load `inflight`) are `SeqCst`, so either the request sees
//! the new fence or `admit` sees the request (the classic store-then-load handshake).
//!
//! **Metadata file** (32 bytes, big-endian):
//!
//! ```text
//! 0   8  magic "BWREPMD\n"
//! 8   4  format version (1)
//! 12  4  reserved, zero
//! 16  8  highest generation seen
//! 24  4  reserved, zero
//! 28  4  CRC-32C of bytes 0..28
//! ```
//!
//! Crash points of a write: the temporary file (`.<meta name>.tmp`, the store's
//! [`crate::TEMP_SUFFIX`] convention, so [`crate::remove_temp_files`] also cleans it) may
//! be left behind; it is never read and [`Replica::open`] deletes it. After `rename` and
//! before the directory `fsync` the file holds the old or the new value; either is safe,
//! because nothing was admitted with the new value yet. A bad magic, version or checksum
//! refuses the open ([`ReplicaError::MetaCorrupt`]): guessing a lower generation would
//! void the fence.
//!
//! **Fail-stop.** If the metadata cannot be written, the fence is raised to `u64::MAX` in
//! memory: every request and admission fails until the replica is reopened (after which the
//! file says what really became durable). Refusing too much is safe, admitting too much is
//! not.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bw_types::{BlockDevice, Generation, IoDone, IoError, IoRequest};

use crate::files::TEMP_SUFFIX;
use crate::volume::LocalVolume;

/// Suffix of the metadata file next to a volume file ([`default_meta_path`]).
pub const META_SUFFIX: &str = ".meta";

/// Size of the metadata file.
pub const META_LEN: usize = 32;

const META_MAGIC: [u8; 8] = *b"BWREPMD\n";
const META_VERSION: u32 = 1;

/// Longest [`Replica::admit`] waits for requests of older generations to finish after
/// raising the fence. Hit → `AdmitError::DrainTimeout`: the fence stays raised (older
/// generations are refused) but the new attachment is not admitted yet; it may retry. A
/// healthy disk finishes any request in well under a second; 30 s covers a stalled
/// write-back without letting a hung disk block an attachment forever.
pub const ADMIT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The fence value after a failed metadata write: refuses every generation.
const POISONED: u64 = u64::MAX;

/// Called once a new highest generation is durable, with `(previous, new)`, so the agent
/// can stop local attachments of older generations at once and emit a "fenced" event.
/// Runs on the admitting thread after `admit` released its lock (older generations are
/// already refused by then).
pub type AdvanceCallback = Arc<dyn Fn(Generation, Generation) + Send + Sync>;

/// How to run a replica.
#[derive(Clone, Default)]
pub struct ReplicaOptions {
    /// Told about every new highest generation; `None` ignores them.
    pub on_advance: Option<AdvanceCallback>,
}

impl std::fmt::Debug for ReplicaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaOptions")
            .field("on_advance", &self.on_advance.is_some())
            .finish()
    }
}

/// A request or admission of an older generation than the replica's highest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// The generation that was refused.
    pub generation: Generation,
    /// The replica's highest generation (`u64::MAX` after a failed metadata write).
    pub highest: Generation,
}

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.highest.0 == POISONED {
            write!(
                f,
                "fenced: generation {} refused, the replica's generation record failed (fail-stop)",
                self.generation
            )
        } else {
            write!(
                f,
                "fenced: generation {} < {}",
                self.generation, self.highest
            )
        }
    }
}

impl std::error::Error for Fenced {}

impl From<Fenced> for IoError {
    fn from(f: Fenced) -> IoError {
        IoError::Faulted(f.to_string())
    }
}

/// Opening a replica or writing its metadata failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica metadata {path} does not exist (create it with Replica::create_meta)")]
    MetaMissing { path: PathBuf },
    #[error("replica metadata {path} is corrupt: {reason}")]
    MetaCorrupt { path: PathBuf, reason: String },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ReplicaError {
    let path = path.to_path_buf();
    move |source| ReplicaError::Io {
        action,
        path,
        source,
    }
}

/// A refused [`Replica::admit`].
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// The new generation could not be made durable; the replica is now fail-stopped.
    #[error("cannot record generation {generation}; the replica refuses all I/O until reopened")]
    Persist {
        generation: Generation,
        #[source]
        source: ReplicaError,
    },
    /// Requests of older generations did not finish within [`ADMIT_DRAIN_TIMEOUT`].
    #[error("{inflight} requests of older generations still running after {timeout:?}")]
    DrainTimeout { inflight: u64, timeout: Duration },
}

/// The path of a volume file's metadata: `<volume file>.meta`.
pub fn default_meta_path(volume_path: &Path) -> PathBuf {
    let mut p = volume_path.as_os_str().to_owned();
    p.push(META_SUFFIX);
    PathBuf::from(p)
}

/// State shared with in-flight requests' completions.
#[derive(Default)]
struct Gate {
    /// Requests of generations below this are refused. Raised only after the value is
    /// durable (or to `POISONED`).
    fence: AtomicU64,
    /// Requests between a successful check and their completion.
    inflight: AtomicU64,
    /// Lets `admit` sleep until `inflight` is zero; completions notify under it.
    drained: Mutex<()>,
    wake: Condvar,
}

impl Gate {
    fn leave(&self) {
        if self.inflight.fetch_sub(1, SeqCst) == 1 {
            // Taking the mutex orders this notify after a waiter's check of `inflight`.
            let _g = self.drained.lock().unwrap();
            self.wake.notify_all();
        }
    }
}

/// A request admitted by the fence and not yet completed; dropping it ends the request's
/// share of the in-flight count that [`Replica::admit`] drains.
pub struct InFlight {
    gate: Arc<Gate>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// What `admit` serialises on.
struct AdmitState {
    /// The highest generation known to be in the metadata file.
    durable: u64,
    /// A raise happened whose drain has not completed (a timed-out admit left it).
    drain_pending: bool,
}

/// One replica: its volume and its generation fence. Share it as `Arc<Replica>` between
/// the peer server and local attachments: the fence only works if every path to the
/// volume goes through the same `Replica`.
pub struct Replica {
    volume: LocalVolume,
    meta_path: PathBuf,
    gate: Arc<Gate>,
    admit: Mutex<AdmitState>,
    on_advance: Option<AdvanceCallback>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("meta_path", &self.meta_path)
            .field("highest", &self.highest())
            .field("volume", &self.volume)
            .finish()
    }
}

impl Replica {
    /// Writes a metadata file with generation 0 at `meta_path` if there is none, durably.
    /// Returns whether it created one. Call it when creating the volume file (and once for
    /// volume files that predate generations).
    pub fn create_meta(meta_path: &Path) -> Result<bool, ReplicaError> {
        match fs::metadata(meta_path) {
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_meta(meta_path, 0, None)?;
                Ok(true)
            }
            Err(e) => Err(io_err("stat", meta_path)(e)),
        }
    }

    /// Opens a replica over `volume` with the metadata at `meta_path` (which must exist).
    /// Deletes a temporary metadata file left by a crash.
    pub fn open(
        volume: LocalVolume,
        meta_path: &Path,
        options: ReplicaOptions,
    ) -> Result<Replica, ReplicaError> {
        let tmp = temp_path(meta_path);
        match fs::remove_file(&tmp) {
            Ok(()) => fsync_parent(meta_path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale", &tmp)(e)),
        }
        let highest = read_meta(meta_path)?;
        let gate = Gate {
            fence: AtomicU64::new(highest),
            ..Gate::default()
        };
        Ok(Replica {
            volume,
            meta_path: meta_path.to_path_buf(),
            gate: Arc::new(gate),
            admit: Mutex::new(AdmitState {
                durable: highest,
                drain_pending: false,
            }),
            on_advance: options.on_advance,
        })
    }

    /// The volume, for size changes, stats and fault state. Submitting to it directly
    /// bypasses the fence: the data path must use [`Replica::submit`] or [`ReplicaDevice`].
    pub fn volume(&self) -> &LocalVolume {
        &self.volume
    }

    pub fn meta_path(&self) -> &Path {
        &self.meta_path
    }

    /// The highest generation admitted (`u64::MAX` once fail-stopped).
    pub fn highest(&self) -> Generation {
        Generation(self.gate.fence.load(SeqCst))
    }

    /// Admits an attachment of generation `generation`; see the module docs for the rules.
    /// Blocks: it may write and fsync the metadata file and wait for older requests (up to
    /// [`ADMIT_DRAIN_TIMEOUT`]); async callers run it on a blocking thread.
    pub fn admit(&self, generation: Generation) -> Result<Generation, AdmitError> {
        let mut advanced = None;
        let result = self.admit_locked(generation, &mut advanced);
        // Outside the admit lock: the callback may call back into the replica.
        if let (Some(cb), Some(previous)) = (&self.on_advance, advanced) {
            cb(previous, generation);
        }
        result
    }

    /// The body of [`Replica::admit`], under its lock; sets `advanced` to the previous
    /// highest if the fence was raised.
    fn admit_locked(
        &self,
        generation: Generation,
        advanced: &mut Option<Generation>,
    ) -> Result<Generation, AdmitError> {
        let mut state = self.admit.lock().unwrap();
        let fence = self.gate.fence.load(SeqCst);
        if generation.0 < fence || fence == POISONED {
            return Err(Fenced {
                generation,
                highest: Generation(fence),
            }
            .into());
        }
        if generation.0 > state.durable {
            if let Err(source) = write_meta(&self.meta_path, generation.0, None) {
                self.gate.fence.store(POISONED, SeqCst);
                return Err(AdmitError::Persist { generation, source });
            }
            *advanced = Some(Generation(state.durable));
            state.durable = generation.0;
            self.gate.fence.store(generation.0, SeqCst);
            state.drain_pending = true;
        }
        if state.drain_pending {
            self.wait_drained(ADMIT_DRAIN_TIMEOUT)?;
            state.drain_pending = false;
        }
        Ok(generation)
    }

    /// Waits until no request that passed the old fence is still running.
    fn wait_drained(&self, timeout: Duration) -> Result<(), AdmitError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.gate.drained.lock().unwrap();
        loop {
            let inflight = self.gate.inflight.load(SeqCst);
            if inflight == 0 {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AdmitError::DrainTimeout { inflight, timeout });
            }
            g = self.gate.wake.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Checks `generation` against the fence and counts the request in flight until the
    /// returned guard is dropped. The fast path is two atomic operations.
    pub fn enter(&self, generation: Generation) -> Result<InFlight, Fenced> {
        let early = self.gate.fence.load(SeqCst);
        if generation.0 < early || early == POISONED {
            // Refused without touching the count, so a stream of fenced requests cannot
            // keep a draining `admit` from ever seeing zero.
            return Err(Fenced {
                generation,
                highest: Generation(early),
            });
        }
        // Count first, then check again: see "Why the drain" in the module docs.
        self.gate.inflight.fetch_add(1, SeqCst);
        let guard = InFlight {
            gate: Arc::clone(&self.gate),
        };
        let fence = self.gate.fence.load(SeqCst);
        if generation.0 < fence || fence == POISONED {
            drop(guard);
            return Err(Fenced {
                generation,
                highest: Generation(fence),
            });
        }
        Ok(guard)
    }

    /// Submits a request that passed [`Replica::enter`]; the guard is released when the
    /// volume completes it, right before `done` runs.
    pub fn submit_entered(&self, entered: InFlight, req: IoRequest, done: IoDone) {
        self.volume.submit(
            req,
            Box::new(move |result| {
                drop(entered);
                done(result);
            }),
        );
    }

    /// [`Replica::enter`] + [`Replica::submit_entered`]; a fenced request completes with
    /// `IoError::Faulted("fenced: generation G < H")`.
    pub fn submit(&self, generation: Generation, req: IoRequest, done: IoDone) {
        match self.enter(generation) {
            Ok(entered) => self.submit_entered(entered, req, done),
            Err(fenced) => done(Err(fenced.into())),
        }
    }

    /// Admits `generation` and returns the block device a local attachment of that
    /// generation serves (the NBD server's device on the attached node).
    pub fn device_for(
        self: &Arc<Self>,
        generation: Generation,
    ) -> Result<Arc<ReplicaDevice>, AdmitError> {
        self.admit(generation)?;
        Ok(Arc::new(ReplicaDevice {
            replica: Arc::clone(self),
            generation,
        }))
    }
}

/// A local attachment's view of a replica: every request is checked against the fence, and
/// fails with `IoError::Faulted("fenced: generation G < H")` once a newer generation was
/// admitted.
pub struct ReplicaDevice {
    replica: Arc<Replica>,
    generation: Generation,
}

impl std::fmt::Debug for ReplicaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaDevice")
            .field("generation", &self.generation)
            .field("fenced", &self.is_fenced())
            .finish()
    }
}

impl ReplicaDevice {
    /// True once the replica admitted a newer generation (or fail-stopped its fence).
    pub fn is_fenced(&self) -> bool {
        self.replica.enter(self.generation).is_err()
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
}

impl BlockDevice for ReplicaDevice {
    fn size_bytes(&self) -> u64 {
        self.replica.volume.size_bytes()
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        self.replica.submit(self.generation, req, done);
    }
}

// ----- The metadata file ---------------------------------------------------------------------

/// Where a step of [`write_meta`] stops, to simulate a crash there (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopAfter {
    /// The temporary file is written and synced, not renamed.
    TempWritten,
    /// Renamed into place, directory not synced.
    Renamed,
}

fn temp_path(meta_path: &Path) -> PathBuf {
    let name = meta_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    meta_path.with_file_name(format!(".{name}{TEMP_SUFFIX}"))
}

fn fsync_parent(path: &Path) -> Result<(), ReplicaError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync the directory of", path))
}

/// Writes `highest` durably: temporary file, fsync, rename over the old file, fsync of the
/// directory.
pub(crate) fn write_meta(
    path: &Path,
    highest: u64,
    stop: Option<StopAfter>,
) -> Result<(), ReplicaError> {
    let tmp = temp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(&encode_meta(highest))
        .map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(f);
    if stop == Some(StopAfter::TempWritten) {
        return Ok(());
    }
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    if stop == Some(StopAfter::Renamed) {
        return Ok(());
    }
    fsync_parent(path)
}

fn read_meta(path: &Path) -> Result<u64, ReplicaError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ReplicaError::MetaMissing { path: path.into() })
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut buf = Vec::with_capacity(META_LEN + 1);
    // One byte more than expected tells a longer file from a good one.
    (&mut f)
        .take(META_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    decode_meta(&buf).map_err(|reason| ReplicaError::MetaCorrupt {
        path: path.into(),
        reason,
    })
}

fn encode_meta(highest: u64) -> [u8; META_LEN] {
    let mut b = [0u8; META_LEN];
    b[0..8].copy_from_slice(&META_MAGIC);
    b[8..12].copy_from_slice(&META_VERSION.to_be_bytes());
    b[16..24].copy_from_slice(&highest.to_be_bytes());
    let crc = crc32c(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_be_bytes());
    b
}

fn decode_meta(b: &[u8]) -> Result<u64, String> {
    if b.len() != META_LEN {
        return Err(format!("{} bytes instead of {META_LEN}", b.len()));
    }
    if b[0..8] != META_MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_be_bytes(b[28..32].try_into().expect("4 bytes"));
    if crc != crc32c(&b[..28]) {
        return Err("checksum mismatch".into());
    }
    let version = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != META_VERSION {
        return Err(format!("unknown format version {version}"));
    }
    Ok(u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")))
}

/// CRC-32C (Castagnoli), bitwise: the file is 28 bytes, a table would be wasted.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
