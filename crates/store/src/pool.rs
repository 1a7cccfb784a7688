//! A small, lazily started pool of blocking I/O threads fed by a bounded queue.
//!
//! Thread-safety: all queue state lives under one mutex; workers sleep on one condvar. The
//! `idle`/`notified` counters only decide whether to wake a sleeper or start a thread; they
//! are not needed for correctness, because every worker looks at the queue before it sleeps
//! and after it wakes, and never exits while the queue holds a job.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Jobs that may wait in the queue of one volume. When it is full the submitter runs the
/// job itself (caller-runs): that blocks the submitting thread, which is the back-pressure
/// we want, and unlike blocking on a full queue it cannot deadlock when a completion
/// callback (running on a worker) submits more work. The NBD server bounds in-flight
/// requests per connection far below this, so it is only hit by many busy connections.
pub const MAX_QUEUED_JOBS: usize = 512;

/// A worker with nothing to do for this long exits, so that idle volumes hold no threads
/// (the agent must stay small with 100 idle volumes). A new one starts on the next job,
/// which costs tens of microseconds once per burst.
pub const WORKER_IDLE_EXIT: Duration = Duration::from_secs(30);

/// What [`WorkQueue::push`] did with a job.
pub(crate) enum Push<J> {
    /// Queued; a worker will run it.
    Queued,
    /// The queue is full (or no worker could be started): the caller must run it.
    RunHere(J),
    /// The queue is closed: the caller must fail it (or run it, for jobs that must finish).
    Closed(J),
}

struct QueueState<J> {
    jobs: VecDeque<J>,
    closed: bool,
    /// Worker threads started and not yet exited.
    alive: usize,
    /// Workers waiting on the condvar.
    idle: usize,
    /// Wake-ups sent and not yet consumed; avoids starting a thread or sending a second
    /// wake-up for a job a sleeper is already being woken for.
    notified: usize,
    handles: Vec<JoinHandle<()>>,
}

pub(crate) struct WorkQueue<J> {
    state: Mutex<QueueState<J>>,
    wake: Condvar,
    max_workers: usize,
    /// `jobs.len()`, mirrored for a lock-free look ([`WorkQueue::queued`]).
    queued: AtomicUsize,
}

impl<J> WorkQueue<J> {
    pub(crate) fn new(max_workers: usize) -> WorkQueue<J> {
        WorkQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
                alive: 0,
                idle: 0,
                notified: 0,
                handles: Vec::new(),
            }),
            wake: Condvar::new(),
            max_workers: max_workers.max(1),
            queued: AtomicUsize::new(0),
        }
    }

    /// Queues `job`, waking a sleeping worker or starting a new one with `spawn` (called
    /// under the queue lock, so that `close` sees every handle).
    pub(crate) fn push(
        &self,
        job: J,
        spawn: impl FnOnce() -> io::Result<JoinHandle<()>>,
    ) -> Push<J> {
        let mut s = self.state.lock().unwrap();
        if s.closed {
            return Push::Closed(job);
        }
        if s.jobs.len() >= MAX_QUEUED_JOBS {
            return Push::RunHere(job);
        }
        s.jobs.push_back(job);
        self.queued.store(s.jobs.len(), Ordering::Relaxed);
        if s.idle > s.notified {
            s.notified += 1;
            self.wake.notify_one();
        } else if s.alive < self.max_workers {
            s.handles.retain(|h| !h.is_finished());
            match spawn() {
                Ok(handle) => {
                    s.alive += 1;
                    s.handles.push(handle);
                }
                // No thread and nobody else to run it: hand the job back.
                Err(_) if s.alive == 0 => {
                    let job = s.jobs.pop_back().unwrap();
                    self.queued.store(s.jobs.len(), Ordering::Relaxed);
                    return Push::RunHere(job);
                }
                Err(_) => {}
            }
        }
        Push::Queued
    }

    /// Next job for a worker; `None` tells it to exit (closed and drained, or idle too long).
    pub(crate) fn next(&self) -> Option<J> {
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(job) = s.jobs.pop_front() {
                self.queued.store(s.jobs.len(), Ordering::Relaxed);
                return Some(job);
            }
            if s.closed {
                s.alive -= 1;
                return None;
            }
            s.idle += 1;
            let (guard, timeout) = self.wake.wait_timeout(s, WORKER_IDLE_EXIT).unwrap();
            s = guard;
            s.idle -= 1;
            s.notified = s.notified.saturating_sub(1);
            if timeout.timed_out() && s.jobs.is_empty() && !s.closed {
                s.alive -= 1;
                return None;
            }
        }
    }

    /// Refuses new jobs, wakes every worker so they drain the queue and exit, and returns
    /// their handles for joining.
    pub(crate) fn close(&self) -> Vec<JoinHandle<()>> {
        let mut s = self.state.lock().unwrap();
        s.closed = true;
        self.wake.notify_all();
        std::mem::take(&mut s.handles)
    }

    /// Jobs waiting for a worker (a racy snapshot, for heuristics).
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Worker threads currently alive (for tests and stats).
    pub(crate) fn workers(&self) -> usize {
        self.state.lock().unwrap().alive
    }
}
