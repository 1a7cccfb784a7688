//! [`LocalVolume`]: one replica of a volume on local storage, served through
//! [`bw_types::BlockDevice`].
//!
//! Request path: `submit` checks fail-stop state and range, then
//! - reads try `preadv2(RWF_NOWAIT)` inline (page-cache hit: no thread hop at all);
//! - writes try `pwritev2(RWF_NOWAIT)` inline where the file system supports it; where it
//!   does not (ext4), writes up to [`INLINE_WRITE_MAX_BYTES`] are written inline with a
//!   plain blocking `pwrite` on the caller's thread (see "Inline blocking writes" below);
//! - everything else, and every fast-path miss, goes to a small pool of blocking I/O
//!   threads ([`crate::pool`]); flushes and FUA go through the sync coalescer
//!   ([`crate::flush`]), whose `fdatasync` always runs on an I/O thread.
//!
//! **Inline blocking writes.** Handing a 4 KiB write to an I/O thread costs more than the
//! write (two thread hand-offs, futex wake-ups, and I/O threads contending for the inode
//! lock: 24-30 % of the agent's samples in the benchmark profiles), so small buffered writes
//! run on the submitter's thread, which in the agent is a tokio worker running the NBD
//! connection's reader task. Trade-off: a buffered `pwrite` normally copies into the page
//! cache in microseconds, but it can block for milliseconds (dirty-page throttling in
//! `balance_dirty_pages`, waiting for the inode lock held by a throttled writer, reading a
//! partial block from disk), and while it does that runtime worker serves nobody else.
//! Bounds: only writes up to [`INLINE_WRITE_MAX_BYTES`] (the copy itself is short; larger
//! writes gain from overlapping the network receive with the copy on an I/O thread); only
//! one inline write per volume at a time (a second one would only wait for the inode lock,
//! which ext4 holds across a buffered write, on another runtime worker: it is queued
//! instead, so at most one runtime worker per volume is ever inside `pwrite`); not
//! while [`INLINE_MAX_QUEUED_JOBS`] or more jobs wait for the I/O threads (they are behind,
//! so the device or the throttle is slow); and an inline write that took longer than
//! [`INLINE_WRITE_SLOW`] sends every write of the volume to the I/O threads for
//! [`INLINE_PAUSE_MIN`], doubling up to [`INLINE_PAUSE_MAX`] while the probes stay slow.
//! So a worker is blocked by at most one slow write per volume per pause. Inline writes
//! complete before `submit` returns, which keeps the flush-coverage rule of
//! [`crate::flush`] as it is (a flush submitted after a write's completion ran registers
//! after its `pwrite` returned).
//!
//! Thread-safety: `LocalVolume` is a handle to an `Arc<Inner>` shared with the workers.
//! Every field of `Inner` is immutable, atomic, or behind its own mutex, and no code path
//! holds two of those mutexes except coalescer → fault state (always in that order).
//! Completion callbacks are always called with no lock held, so a callback may submit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bw_types::{bufpool, BlockDevice, IoDone, IoError, IoKind, IoReply, IoRequest};

use crate::backend::{Backend, FastPath, FileBackend};
use crate::error::{ResizeError, VolumeFileError};
use crate::flush::{FaultState, Registered, SyncCoalescer};
use crate::pool::{Push, WorkQueue};

/// Default number of blocking I/O threads per volume. On a page-cache hit a buffered write
/// is CPU work, so more threads than cores only add context switches; on a miss each
/// thread is one outstanding disk request, so more threads mean more device queue depth.
/// Measured with `examples/qd32.rs` on the 2-core reference machine (ext4, so every write
/// takes the pool): 2 workers clearly lost on 4 KiB QD32 random writes, 4 and 8 were equal
/// within run-to-run noise (50-125 k ops/s), so we take the smaller. Threads start lazily
/// and exit when idle.
pub const DEFAULT_IO_WORKERS: usize = 4;

/// Largest write done inline on the submitter's thread when the file system has no
/// non-blocking buffered write (ext4); larger ones go to the I/O threads. Measured with
/// `bench/nbd-bench.sh` on the 2-core reference machine (BENCHMARKS.md, 2026-11-21 "write
/// path"): 1 MiB sequential writes at QD8 ran 1.5× the better NBD peer inline against 0.9×
/// with 128 KiB (every 1 MiB write on an I/O thread), at lower server CPU per MiB. Hit →
/// the write takes an I/O thread, as every write did before.
pub const INLINE_WRITE_MAX_BYTES: usize = 1024 * 1024;

/// Small writes queue for the I/O threads (instead of running inline) while at least this
/// many jobs wait there: the threads are behind, so an inline write would likely block too.
pub const INLINE_MAX_QUEUED_JOBS: usize = 16;

/// An inline write taking longer than this (wall time) pauses inline writes of its volume.
/// A page-cache copy of 1 MiB takes a few hundred microseconds; dirty-page throttling pauses
/// are 4-200 ms. 5 ms stays clear of scheduler noise on a busy host.
pub const INLINE_WRITE_SLOW: Duration = Duration::from_millis(5);

/// First pause of inline writes after a slow one; every write of the volume takes an I/O
/// thread meanwhile. Each consecutive slow probe doubles it, up to [`INLINE_PAUSE_MAX`]; a
/// fast inline write resets it.
pub const INLINE_PAUSE_MIN: Duration = Duration::from_millis(100);
/// Longest pause of inline writes.
pub const INLINE_PAUSE_MAX: Duration = Duration::from_secs(2);

/// Largest read accepted (32 MiB, the NBD maximum payload); larger ones are refused with
/// `IoError::Invalid` rather than allocating an unbounded buffer.
pub const MAX_READ_BYTES: u32 = 32 << 20;

/// Most extents in one block-status reply. A longer range is answered with a prefix (the
/// NBD client asks again from where it ends); keeps replies and the seek loop bounded on a
/// badly fragmented file.
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 1024;

/// Largest volume size (the largest `off_t`).
pub const MAX_VOLUME_BYTES: u64 = i64::MAX as u64;

/// Called on faults and space exhaustion, so the agent can emit events and alerts. It runs
/// on an I/O thread, or on the submitter's thread for an inline write, with no lock held:
/// keep it short.
pub type ErrorCallback = Arc<dyn Fn(VolumeErrorEvent) + Send + Sync>;

/// An error worth telling the operator about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeErrorEvent {
    /// The volume failed a write, deallocation or sync and is now faulted (fail-stop).
    /// Reported once per volume.
    Faulted { reason: String },
    /// A write failed with ENOSPC/EDQUOT; nothing was acknowledged, the volume stays usable.
    NoSpace { kind: IoKind, offset: u64, len: u64 },
    /// A read failed; the volume stays usable (nothing on disk was changed).
    ReadFailed {
        offset: u64,
        len: u64,
        error: String,
    },
}

/// How to run a volume.
#[derive(Clone)]
pub struct VolumeOptions {
    /// Maximum blocking I/O threads ([`DEFAULT_IO_WORKERS`]).
    pub io_workers: usize,
    /// Receives [`VolumeErrorEvent`]s; `None` drops them.
    pub on_error: Option<ErrorCallback>,
    /// Largest blocking write done inline ([`INLINE_WRITE_MAX_BYTES`]); 0 queues every
    /// write that the non-blocking fast path cannot do.
    pub inline_write_max: usize,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            io_workers: DEFAULT_IO_WORKERS,
            on_error: None,
            inline_write_max: INLINE_WRITE_MAX_BYTES,
        }
    }
}

impl std::fmt::Debug for VolumeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeOptions")
            .field("io_workers", &self.io_workers)
            .field("on_error", &self.on_error.is_some())
            .field("inline_write_max", &self.inline_write_max)
            .finish()
    }
}

/// Counters of how requests were served (for metrics and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeStats {
    pub reads_inline: u64,
    pub reads_queued: u64,
    /// Writes done on the submitter's thread (non-blocking fast path, or a small blocking
    /// write, see [`INLINE_WRITE_MAX_BYTES`]).
    pub writes_inline: u64,
    pub writes_queued: u64,
    /// Slow inline writes that paused inline writing ([`INLINE_WRITE_SLOW`]).
    pub inline_write_pauses: u64,
    /// Jobs the submitter ran itself because the queue was full.
    pub ran_by_submitter: u64,
    /// `fdatasync` calls started (each may serve many flushes and FUA writes).
    pub syncs: u64,
    /// I/O threads alive now.
    pub workers: usize,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) reads_inline: AtomicU64,
    pub(crate) reads_queued: AtomicU64,
    pub(crate) writes_inline: AtomicU64,
    pub(crate) writes_queued: AtomicU64,
    pub(crate) ran_by_submitter: AtomicU64,
    pub(crate) inline_write_pauses: AtomicU64,
}

/// Decides whether a small write may run inline: not during a pause that a slow inline
/// write started (see the module docs).
pub(crate) struct InlineGate {
    epoch: Instant,
    /// Nanoseconds after `epoch` before which writes go to the I/O threads.
    paused_until: AtomicU64,
    /// Length of the current pause in nanoseconds; 0 once an inline write was fast again.
    pause: AtomicU64,
    /// An inline write of this volume is running: the next one goes to the I/O threads
    /// rather than wait for the inode lock on a second runtime worker.
    busy: AtomicBool,
}

impl InlineGate {
    fn new() -> InlineGate {
        InlineGate {
            epoch: Instant::now(),
            paused_until: AtomicU64::new(0),
            pause: AtomicU64::new(0),
            busy: AtomicBool::new(false),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// `Some(now)` if an inline write may start now (not paused, no other inline write
    /// running); the caller then owns `busy` and must clear it.
    fn open(&self) -> Option<Instant> {
        let now = Instant::now();
        if self.nanos(now) < self.paused_until.load(Ordering::Relaxed)
            || self.busy.swap(true, Ordering::Acquire)
        {
            return None;
        }
        Some(now)
    }

    /// Records an inline write that started at `start`; true if it was slow and started a
    /// pause.
    fn record(&self, start: Instant) -> bool {
        let now = Instant::now();
        if now.saturating_duration_since(start) <= INLINE_WRITE_SLOW {
            if self.pause.load(Ordering::Relaxed) != 0 {
                self.pause.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let min = INLINE_PAUSE_MIN.as_nanos() as u64;
        let max = INLINE_PAUSE_MAX.as_nanos() as u64;
        let pause = (self.pause.load(Ordering::Relaxed) * 2).clamp(min, max);
        self.pause.store(pause, Ordering::Relaxed);
        self.paused_until
            .store(self.nanos(now) + pause, Ordering::Relaxed);
        true
    }
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Work for the pool.
pub(crate) enum Job {
    /// A read whose fast path missed; the buffer is reused.
    Read {
        offset: u64,
        buf: Vec<u8>,
        done: IoDone,
    },
    Request {
        req: IoRequest,
        done: IoDone,
    },
    /// Run the sync coalescer's loop.
    Sync,
}

/// State shared by the handle and the I/O threads.
pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    /// Volume size as the catalog says; grows only. The file may be shorter.
    pub(crate) size: AtomicU64,
    pub(crate) fault: FaultState,
    pub(crate) syncs: SyncCoalescer,
    pub(crate) queue: WorkQueue<Job>,
    /// Set by `close`; new requests fail with `ShuttingDown`.
    pub(crate) closed: AtomicBool,
    pub(crate) on_error: Option<ErrorCallback>,
    pub(crate) counters: Counters,
    pub(crate) inline: InlineGate,
    /// [`INLINE_WRITE_MAX_BYTES`] (0 in tests that want every write queued).
    pub(crate) inline_write_max: usize,
}

/// One replica of a volume on local storage. Dropping it (or [`LocalVolume::close`]) stops
/// its threads after the queued requests completed.
pub struct LocalVolume {
    inner: Arc<Inner>,
    /// Serialises `close` callers, so that a second one waits for the first.
    closing: Mutex<()>,
}

impl std::fmt::Debug for LocalVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalVolume")
            .field("size", &self.size_bytes())
            .field("fault", &self.fault_reason())
            .finish_non_exhaustive()
    }
}

impl LocalVolume {
    /// Opens the volume file at `path` (see [`crate::create_volume_file`]) as a volume of
    /// `size` bytes.
    pub fn open(
        path: &Path,
        size: u64,
        options: VolumeOptions,
    ) -> Result<LocalVolume, VolumeFileError> {
        let backend = FileBackend::open(path).map_err(VolumeFileError::io("open", path))?;
        Ok(LocalVolume::with_backend(Arc::new(backend), size, options))
    }

    /// A volume of `size` bytes over any backend (tests use the ones in [`crate::testing`]).
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        size: u64,
        options: VolumeOptions,
    ) -> LocalVolume {
        let inner = Inner {
            backend,
            size: AtomicU64::new(size.min(MAX_VOLUME_BYTES)),
            fault: FaultState::default(),
            syncs: SyncCoalescer::default(),
            queue: WorkQueue::new(options.io_workers),
            closed: AtomicBool::new(false),
            on_error: options.on_error,
            counters: Counters::default(),
            inline: InlineGate::new(),
            inline_write_max: options.inline_write_max,
        };
        LocalVolume {
            inner: Arc::new(inner),
            closing: Mutex::new(()),
        }
    }

    /// Grows the volume (the catalog's size changed). Shrinking is refused. The file is not
    /// touched: it may stay shorter, the rest reads as a hole.
    pub fn set_size(&self, new_size: u64) -> Result<(), ResizeError> {
        if new_size > MAX_VOLUME_BYTES {
            return Err(ResizeError::TooLarge {
                requested: new_size,
                max: MAX_VOLUME_BYTES,
            });
        }
        self.inner
            .size
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (new_size >= cur).then_some(new_size)
            })
            .map(|_| ())
            .map_err(|current| ResizeError::Shrink {
                current,
                requested: new_size,
            })
    }

    /// `Some(reason)` once the volume is faulted (fail-stop).
    pub fn fault_reason(&self) -> Option<String> {
        self.inner.fault.reason()
    }

    pub fn stats(&self) -> VolumeStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VolumeStats {
            reads_inline: get(&c.reads_inline),
            reads_queued: get(&c.reads_queued),
            writes_inline: get(&c.writes_inline),
            writes_queued: get(&c.writes_queued),
            ran_by_submitter: get(&c.ran_by_submitter),
            inline_write_pauses: get(&c.inline_write_pauses),
            syncs: self.inner.syncs.started(),
            workers: self.inner.queue.workers(),
        }
    }

    /// Refuses new requests, lets the queued ones complete, and joins the I/O threads.
    /// Idempotent. Called from a completion callback (an I/O thread), it does not wait for
    /// that thread, which exits once its callback returns.
    pub fn close(&self) {
        let _serial = self.closing.lock().unwrap();
        self.inner.closed.store(true, Ordering::Release);
        let me = std::thread::current().id();
        for handle in self.inner.queue.close() {
            if handle.thread().id() != me {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for LocalVolume {
    fn drop(&mut self) {
        self.close();
    }
}

impl BlockDevice for LocalVolume {
    fn size_bytes(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        self.inner.submit(req, done);
    }
}

impl Inner {
    fn submit(self: &Arc<Self>, req: IoRequest, done: IoDone) {
        if self.closed.load(Ordering::Acquire) {
            return done(Err(IoError::ShuttingDown));
        }
        if let Err(e) = self.fault.check().and_then(|()| self.check_range(&req)) {
            return done(Err(e));
        }
        match req {
            IoRequest::Read { offset, len } => {
                // Every byte is overwritten by the read (or the buffer is dropped).
                let mut buf = bufpool::take_filled(len as usize);
                if let Ok(FastPath::Done) = self.backend.try_read_nowait(&mut buf, offset) {
                    bump(&self.counters.reads_inline);
                    return done(Ok(IoReply::Data(buf)));
                }
                self.enqueue(Job::Read { offset, buf, done });
            }
            IoRequest::Write { offset, data, fua } => {
                // An error here is retried by the blocking path, which reports it properly.
                match self.backend.try_write_nowait(&data, offset) {
                    Ok(FastPath::Done) => {
                        bump(&self.counters.writes_inline);
                        drop(data);
                        return self.complete_mutation(fua, done, false);
                    }
                    // No non-blocking write at all (ext4): a small one is written inline.
                    Ok(FastPath::Unsupported)
                        if data.len() <= self.inline_write_max
                            && self.queue.queued() < INLINE_MAX_QUEUED_JOBS =>
                    {
                        if let Some(start) = self.inline.open() {
                            bump(&self.counters.writes_inline);
                            let result = self.write_blocking(offset, data);
                            let slow = self.inline.record(start);
                            self.inline.busy.store(false, Ordering::Release);
                            if slow {
                                bump(&self.counters.inline_write_pauses);
                            }
                            return match result {
                                Ok(()) => self.complete_mutation(fua, done, false),
                                Err(e) => done(Err(e)),
                            };
                        }
                    }
                    // WouldBlock (e.g. XFS needs to allocate or read): an I/O thread.
                    _ => {}
                }
                self.enqueue(Job::Request {
                    req: IoRequest::Write { offset, data, fua },
                    done,
                });
            }
            IoRequest::Flush => self.wait_for_sync(done, false),
            req => self.enqueue(Job::Request { req, done }),
        }
    }

    fn check_range(&self, req: &IoRequest) -> Result<(), IoError> {
        let (offset, len) = match req {
            IoRequest::Flush => return Ok(()),
            IoRequest::Read { len, .. } if *len > MAX_READ_BYTES => {
                return Err(IoError::Invalid(format!(
                    "read of {len} bytes exceeds {MAX_READ_BYTES}"
                )));
            }
            IoRequest::BlockStatus { len: 0, .. } => {
                return Err(IoError::Invalid("block status of zero bytes".into()));
            }
            IoRequest::Read { offset, len } => (*offset, u64::from(*len)),
            IoRequest::Write { offset, data, .. } => (*offset, data.len() as u64),
            IoRequest::Trim { offset, len, .. }
            | IoRequest::WriteZeroes { offset, len, .. }
            | IoRequest::BlockStatus { offset, len } => (*offset, *len),
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.size.load(Ordering::Acquire) => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }

    /// Completes a successful write, trim or write-zeroes: at once, or after the next sync
    /// for FUA.
    pub(crate) fn complete_mutation(self: &Arc<Self>, fua: bool, done: IoDone, on_worker: bool) {
        if fua {
            self.wait_for_sync(done, on_worker);
        } else {
            done(Ok(IoReply::Done));
        }
    }

    /// Completes `done` after a sync that starts from now on. On an I/O thread the sync
    /// loop runs right here; elsewhere it is queued (fdatasync blocks).
    pub(crate) fn wait_for_sync(self: &Arc<Self>, done: IoDone, on_worker: bool) {
        if let Registered::MustRun = self.syncs.register(&self.fault, done) {
            if on_worker {
                self.run_syncs();
            } else {
                self.enqueue(Job::Sync);
            }
        }
    }

    pub(crate) fn run_syncs(&self) {
        self.syncs.run(&*self.backend, &self.fault, |reason| {
            self.report(crate::VolumeErrorEvent::Faulted {
                reason: reason.to_owned(),
            });
        });
    }

    pub(crate) fn report(&self, event: VolumeErrorEvent) {
        if let Some(cb) = &self.on_error {
            cb(event);
        }
    }

    fn enqueue(self: &Arc<Self>, job: Job) {
        match self.queue.push(job, || spawn_worker(Arc::clone(self))) {
            Push::Queued => {}
            Push::RunHere(job) => {
                bump(&self.counters.ran_by_submitter);
                self.run_job(job, false);
            }
            // A sync must still run: flushes are waiting on it.
            Push::Closed(Job::Sync) => self.run_syncs(),
            Push::Closed(Job::Read { done, .. } | Job::Request { done, .. }) => {
                done(Err(IoError::ShuttingDown));
            }
        }
    }

    fn run_job(self: &Arc<Self>, job: Job, on_worker: bool) {
        match job {
            Job::Sync => self.run_syncs(),
            Job::Read {
                offset,
                mut buf,
                done,
            } => {
                bump(&self.counters.reads_queued);
                done(
                    self.read_blocking(offset, &mut buf)
                        .map(|()| IoReply::Data(buf)),
                );
            }
            Job::Request { req, done } => self.execute(req, done, on_worker),
        }
    }
}

fn spawn_worker(inner: Arc<Inner>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bw-store-io".into())
        .spawn(move || {
            while let Some(job) = inner.queue.next() {
                inner.run_job(job, true);
            }
        })
}
