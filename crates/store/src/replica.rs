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
//! **Sessions.** One attachment (one generation) may open successive *sessions* to a
//! replica (the replication driver's reconnects, numbered 1, 2, 3 … per attachment). Next
//! to the generation fence the replica keeps a *session floor* for its highest generation,
//! and the two are compared as one lexicographic pair: a request of `(g, s)` is refused when
//! `(g, s) < (highest, floor)`. [`Replica::admit_session`]`(g, s)` admits `g` exactly like
//! `admit`, then raises the floor to `s` and drains the requests of older sessions, so
//! nothing a dead session still had in a socket buffer runs after the new session began.
//! Session 0 means "no session" ([`Replica::admit`], [`Replica::device_for`]): it is below
//! every raised floor, so once a session-based attachment raised the floor of a generation,
//! old-style requests of that same generation are refused too. The floor lives in memory
//! only and restarts at 0 with every new generation: after a replica restart every
//! connection of an older session is gone anyway, and a new generation has no sessions yet.
//!
//! **Why the drain.** A request of generation 5 that passed its check just before
//! `admit(6)` raised the fence may still be writing. `admit(6)` waits until the counter of
//! requests between check and completion is zero, so no write of generation 5 lands after
//! generation 6's first write. The check (`inflight += 1`, then load the fence) and the
//! raise (store the fence, then load `inflight`) are `SeqCst`, so either the request sees
//! the new fence or `admit` sees the request (the classic store-then-load handshake). The
//! pair (fence, floor) is two words, published with a sequence counter (a seqlock: odd
//! while a raise is being written) so a request never pairs a new generation with an old
//! floor; raises are rare and take four stores, so a reader retries at most briefly.
//!
//! **Metadata file** (32 bytes, big-endian; code in `meta_file.rs`):
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

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bw_types::{BlockDevice, Generation, IoDone, IoError, IoRequest};

#[cfg(test)]
use crate::crc::crc32c;
pub(crate) use crate::meta_file::io_err;
#[cfg(test)]
use crate::meta_file::{encode_meta, temp_path, StopAfter};
use crate::meta_file::{read_meta, remove_stale_temp, write_meta};
use crate::repl_meta::default_repl_meta_path_for;
use crate::volume::LocalVolume;

/// Suffix of the metadata file next to a volume file ([`default_meta_path`]).
pub const META_SUFFIX: &str = ".meta";

/// Size of the metadata file.
pub const META_LEN: usize = 32;

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

/// A request or admission below the replica's fence: an older generation than the
/// highest, or the highest generation with a session below its floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// The generation that was refused.
    pub generation: Generation,
    /// The session that was refused (0 = no session).
    pub session: u64,
    /// The replica's highest generation (`u64::MAX` after a failed metadata write).
    /// Equal to `generation` when only the session was too old: a newer session of the
    /// same attachment exists, not a newer attachment.
    pub highest: Generation,
    /// The session floor of `highest` (0 = no session admitted for it).
    pub floor: u64,
}

impl Fenced {
    /// True if only the session was refused: the refused request's attachment is still the
    /// newest one, but it opened a newer session since.
    pub fn is_stale_session(&self) -> bool {
        self.generation == self.highest && self.highest.0 != POISONED
    }
}

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.highest.0 == POISONED {
            write!(
                f,
                "fenced: generation {} refused, the replica's generation record failed (fail-stop)",
                self.generation
            )
        } else if self.is_stale_session() {
            write!(
                f,
                "fenced: session {} of generation {} < session {}",
                self.session, self.generation, self.floor
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
    /// Requests of older generations (or sessions) did not finish within
    /// [`ADMIT_DRAIN_TIMEOUT`].
    #[error(
        "{inflight} requests of older generations or sessions still running after {timeout:?}"
    )]
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
    /// Requests of generation `fence` with a session below this are refused.
    floor: AtomicU64,
    /// Seqlock over (`fence`, `floor`): odd while `set_floor` writes them. Written only
    /// under the admit lock.
    version: AtomicU64,
    /// Requests between a successful check and their completion.
    inflight: AtomicU64,
    /// Lets `admit` sleep until `inflight` is zero; completions notify under it.
    drained: Mutex<()>,
    wake: Condvar,
}

impl Gate {
    /// A consistent snapshot of (fence, floor).
    fn floor(&self) -> (u64, u64) {
        let mut spins = 0u32;
        loop {
            let before = self.version.load(SeqCst);
            if before & 1 == 0 {
                let pair = (self.fence.load(SeqCst), self.floor.load(SeqCst));
                if self.version.load(SeqCst) == before {
                    return pair;
                }
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                // The writer was preempted between its stores; let it run.
                std::thread::yield_now();
            }
        }
    }

    /// Publishes a new (fence, floor); callers hold the admit lock.
    fn set_floor(&self, fence: u64, floor: u64) {
        self.version.fetch_add(1, SeqCst);
        self.fence.store(fence, SeqCst);
        self.floor.store(floor, SeqCst);
        self.version.fetch_add(1, SeqCst);
    }

    /// The refusal of `(generation, session)` under `(fence, floor)`, if any.
    fn check(generation: Generation, session: u64, (fence, floor): (u64, u64)) -> Option<Fenced> {
        let below = generation.0 < fence || (generation.0 == fence && session < floor);
        (below || fence == POISONED).then_some(Fenced {
            generation,
            session,
            highest: Generation(fence),
            floor,
        })
    }

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
    /// The replication-metadata file (`repl_meta.rs`).
    pub(crate) repl_path: PathBuf,
    /// Serialises replication-metadata writes (a later write is never overwritten by an
    /// earlier one still in progress) and remembers which slot holds the newest blob.
    pub(crate) repl_lock: Mutex<crate::repl_meta::ReplSlots>,
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
    /// Deletes a temporary file a crash left next to the generation record (and one an
    /// older build's replication-metadata replace left next to `<volume file>.repl`, see
    /// [`crate::default_repl_meta_path`]).
    pub fn open(
        volume: LocalVolume,
        meta_path: &Path,
        options: ReplicaOptions,
    ) -> Result<Replica, ReplicaError> {
        let repl_path = default_repl_meta_path_for(meta_path);
        remove_stale_temp(meta_path)?;
        remove_stale_temp(&repl_path)?;
        let highest = read_meta(meta_path)?;
        let gate = Gate {
            fence: AtomicU64::new(highest),
            ..Gate::default()
        };
        Ok(Replica {
            volume,
            meta_path: meta_path.to_path_buf(),
            repl_path,
            repl_lock: Mutex::new(Default::default()),
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

    /// The session floor of the highest generation (0 until a session was admitted for it).
    pub fn session_floor(&self) -> u64 {
        self.gate.floor().1
    }

    /// Admits an attachment of generation `generation` without a session (session 0); see
    /// [`Replica::admit_session`].
    pub fn admit(&self, generation: Generation) -> Result<Generation, AdmitError> {
        self.admit_session(generation, 0)
    }

    /// Admits session `session` of the attachment of generation `generation`; see the
    /// module docs for the rules. Refused ([`AdmitError::Fenced`]) if `(generation,
    /// session)` is below `(highest, floor)`. A higher generation is first made durable; a
    /// higher generation or session raises the fence at once and then waits until every
    /// request admitted below it has completed. Blocks: it may write and fsync the metadata
    /// file and wait for older requests (up to [`ADMIT_DRAIN_TIMEOUT`]); async callers run
    /// it on a blocking thread.
    pub fn admit_session(
        &self,
        generation: Generation,
        session: u64,
    ) -> Result<Generation, AdmitError> {
        let mut advanced = None;
        let result = self.admit_locked(generation, session, &mut advanced);
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
        session: u64,
        advanced: &mut Option<Generation>,
    ) -> Result<Generation, AdmitError> {
        let mut state = self.admit.lock().unwrap();
        let (fence, floor) = self.gate.floor();
        if let Some(fenced) = Gate::check(generation, session, (fence, floor)) {
            return Err(fenced.into());
        }
        if generation.0 > state.durable {
            if let Err(source) = write_meta(&self.meta_path, generation.0, None) {
                self.gate.set_floor(POISONED, 0);
                return Err(AdmitError::Persist { generation, source });
            }
            *advanced = Some(Generation(state.durable));
            state.durable = generation.0;
            // A new generation starts with this session as its floor (0 without one).
            self.gate.set_floor(generation.0, session);
            state.drain_pending = true;
        } else if session > floor {
            // Same generation (lower ones were refused above), newer session.
            self.gate.set_floor(fence, session);
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

    /// [`Replica::enter_session`] without a session (session 0).
    pub fn enter(&self, generation: Generation) -> Result<InFlight, Fenced> {
        self.enter_session(generation, 0)
    }

    /// Checks `(generation, session)` against the fence and the session floor and counts
    /// the request in flight until the returned guard is dropped. The fast path is one
    /// atomic add and two snapshots of three atomic loads.
    pub fn enter_session(&self, generation: Generation, session: u64) -> Result<InFlight, Fenced> {
        if let Some(fenced) = Gate::check(generation, session, self.gate.floor()) {
            // Refused without touching the count, so a stream of fenced requests cannot
            // keep a draining `admit` from ever seeing zero.
            return Err(fenced);
        }
        // Count first, then check again: see "Why the drain" in the module docs.
        self.gate.inflight.fetch_add(1, SeqCst);
        let guard = InFlight {
            gate: Arc::clone(&self.gate),
        };
        if let Some(fenced) = Gate::check(generation, session, self.gate.floor()) {
            drop(guard);
            return Err(fenced);
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

    /// [`Replica::submit_session`] without a session (session 0).
    pub fn submit(&self, generation: Generation, req: IoRequest, done: IoDone) {
        self.submit_session(generation, 0, req, done);
    }

    /// [`Replica::enter_session`] + [`Replica::submit_entered`]; a fenced request completes
    /// with `IoError::Faulted("fenced: …")` (the [`Fenced`] message) and never reaches the
    /// volume.
    pub fn submit_session(
        &self,
        generation: Generation,
        session: u64,
        req: IoRequest,
        done: IoDone,
    ) {
        match self.enter_session(generation, session) {
            Ok(entered) => self.submit_entered(entered, req, done),
            Err(fenced) => done(Err(fenced.into())),
        }
    }

    /// Admits `generation` (session 0) and returns the block device a local attachment of
    /// that generation serves (the NBD server's device on the attached node).
    pub fn device_for(
        self: &Arc<Self>,
        generation: Generation,
    ) -> Result<Arc<ReplicaDevice>, AdmitError> {
        self.device_for_session(generation, 0).map(Arc::new)
    }

    /// Admits session `session` of generation `generation` ([`Replica::admit_session`]:
    /// blocks while older sessions drain) and returns a device whose every request carries
    /// that pair.
    pub fn device_for_session(
        self: &Arc<Self>,
        generation: Generation,
        session: u64,
    ) -> Result<ReplicaDevice, AdmitError> {
        self.admit_session(generation, session)?;
        Ok(ReplicaDevice {
            replica: Arc::clone(self),
            generation,
            session,
        })
    }
}

/// A local attachment's view of a replica: every request is checked against the fence, and
/// fails with `IoError::Faulted("fenced: generation G < H")` once a newer generation was
/// admitted (or `"fenced: session S of generation G < session F"` once a newer session of
/// the same generation was). [`ReplicaDevice::fenced`] tells which.
pub struct ReplicaDevice {
    replica: Arc<Replica>,
    generation: Generation,
    /// 0 for a device from [`Replica::device_for`].
    session: u64,
}

impl std::fmt::Debug for ReplicaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaDevice")
            .field("generation", &self.generation)
            .field("session", &self.session)
            .field("fenced", &self.is_fenced())
            .finish()
    }
}

impl ReplicaDevice {
    /// True once the replica admitted a newer generation or session (or fail-stopped its
    /// fence).
    pub fn is_fenced(&self) -> bool {
        self.fenced().is_some()
    }

    /// Why this device's requests are refused, if they are: [`Fenced::highest`] is the
    /// replica's highest generation, [`Fenced::is_stale_session`] tells a newer session of
    /// the same attachment from a newer attachment.
    pub fn fenced(&self) -> Option<Fenced> {
        Gate::check(self.generation, self.session, self.replica.gate.floor())
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn session(&self) -> u64 {
        self.session
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
        self.replica
            .submit_session(self.generation, self.session, req, done);
    }
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
