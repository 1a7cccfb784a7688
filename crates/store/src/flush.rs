//! Fail-stop state and flush coalescing.
//!
//! **Coalescing rule.** A flush must cover every write whose completion ran before the flush
//! was submitted. Such a write's `pwrite` has returned, so any `fdatasync` that *starts*
//! after the flush was registered covers it; one that was already running may not (it may
//! have passed the write's pages). So a flush registered while sync number `n` is running
//! waits for sync `n + 1`, and one sync serves every flush registered before it started.
//!
//! Thread-safety: `started` and the waiter list change only under `state`'s mutex, and a
//! sync takes its number under that mutex right before calling `sync_data`, so "registered
//! before sync `k` started" is exactly "target <= k". At most one thread runs syncs at a
//! time (`scheduled`); it keeps going while waiters remain, so none is stranded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use bw_types::{IoDone, IoError, IoReply};

use crate::backend::Backend;

/// Fail-stop state of a volume: once faulted, never healthy again (the replica must be
/// resynced and reopened).
#[derive(Default)]
pub(crate) struct FaultState {
    /// Fast check on every request.
    faulted: AtomicBool,
    /// Why, for error messages; set once.
    reason: Mutex<Option<String>>,
}

impl FaultState {
    /// `Err(Faulted)` once the volume is faulted.
    pub(crate) fn check(&self) -> Result<(), IoError> {
        if !self.faulted.load(Ordering::Acquire) {
            return Ok(());
        }
        let reason = self.reason.lock().unwrap().clone().unwrap_or_default();
        Err(IoError::Faulted(reason))
    }

    /// Faults the volume. Returns true for the first fault (the one to report).
    pub(crate) fn set(&self, reason: String) -> bool {
        let mut r = self.reason.lock().unwrap();
        if r.is_some() {
            return false;
        }
        *r = Some(reason);
        self.faulted.store(true, Ordering::Release);
        true
    }

    pub(crate) fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct SyncState {
    /// A thread has been asked to run syncs (job queued or loop running).
    scheduled: bool,
    /// Number of syncs started so far; the running one (if any) has this number.
    started: u64,
    /// Completions waiting for the sync with the given number (or a later one).
    waiters: Vec<(u64, IoDone)>,
}

/// Outcome of [`SyncCoalescer::register`].
pub(crate) enum Registered {
    /// A sync will run and complete the waiter.
    Waiting,
    /// Nobody is scheduled to sync: the caller must make [`SyncCoalescer::run`] happen.
    MustRun,
}

#[derive(Default)]
pub(crate) struct SyncCoalescer {
    state: Mutex<SyncState>,
}

/// What the sync loop reports to the volume after a failed `fdatasync`.
pub(crate) struct SyncFailure {
    pub(crate) reason: String,
    pub(crate) first_fault: bool,
}

impl SyncCoalescer {
    /// Registers `done` to complete after the next sync that starts from now on. Fails it at
    /// once if the volume is faulted (checked under the lock that a failing sync holds while
    /// faulting, so no waiter can slip in after a failure and be completed by a later sync).
    pub(crate) fn register(&self, fault: &FaultState, done: IoDone) -> Registered {
        let mut s = self.state.lock().unwrap();
        if let Err(e) = fault.check() {
            drop(s);
            done(Err(e));
            return Registered::Waiting;
        }
        let target = s.started + 1;
        s.waiters.push((target, done));
        if s.scheduled {
            Registered::Waiting
        } else {
            s.scheduled = true;
            Registered::MustRun
        }
    }

    /// Runs syncs until no waiter is left. Call on a thread that may block, once per
    /// [`Registered::MustRun`]. Returns the failure if a sync failed (the volume is then
    /// faulted and every waiter failed; the sync is never retried). `on_first_fault` runs
    /// before any waiter learns of the failure, so the fault is reported (event, alert)
    /// before a client can see the error.
    pub(crate) fn run(
        &self,
        backend: &dyn Backend,
        fault: &FaultState,
        on_first_fault: impl FnOnce(&str),
    ) -> Option<SyncFailure> {
        let mut on_first_fault = Some(on_first_fault);
        loop {
            let seq = {
                let mut s = self.state.lock().unwrap();
                s.started += 1;
                s.started
            };
            // A volume faulted by a failed write or punch must not report durability.
            let result = match fault.check() {
                Err(e) => Err(e),
                Ok(()) => backend
                    .sync_data()
                    .map_err(|e| IoError::Io(format!("fdatasync failed: {e}"))),
            };
            let mut s = self.state.lock().unwrap();
            let (ready, failure) = match &result {
                Ok(()) => {
                    let (ready, rest) = std::mem::take(&mut s.waiters)
                        .into_iter()
                        .partition(|(t, _)| *t <= seq);
                    s.waiters = rest;
                    (ready, None)
                }
                Err(e) => {
                    let failure = match e {
                        IoError::Io(msg) => Some(SyncFailure {
                            reason: msg.clone(),
                            first_fault: fault.set(msg.clone()),
                        }),
                        _ => None,
                    };
                    (std::mem::take(&mut s.waiters), failure)
                }
            };
            let again = !s.waiters.is_empty();
            s.scheduled = again;
            drop(s);
            if let Some(f) = failure.as_ref().filter(|f| f.first_fault) {
                if let Some(report) = on_first_fault.take() {
                    report(&f.reason);
                }
            }
            for (_, done) in ready {
                done(result.clone().map(|()| IoReply::Done));
            }
            if failure.is_some() || !again {
                return failure;
            }
        }
    }

    /// Number of syncs started (stats).
    pub(crate) fn started(&self) -> u64 {
        self.state.lock().unwrap().started
    }
}
