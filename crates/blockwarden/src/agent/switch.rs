//! [`SwitchDevice`]: the device under a one-replica attachment, which can be switched to the
//! replication driver while NBD clients stay connected (`volume add-replica` on a volume in
//! use: SPEC C3 "online add-replica").
//!
//! **Switching.** [`SwitchDevice::pause`] takes the write side of the route lock and sets the
//! route to `Paused`: every request submitted after `pause` returns waits in a queue, and no
//! request is still on its way into the old device (submits hold the read side while they
//! hand the request over). Requests the old device already has are *not* waited for here:
//! the driver's first session on the same replica is admitted by the store only after every
//! request of the older session (the direct device's session 0) finished
//! (`store::Replica::admit_session`), so nothing of the old path can land after the driver's
//! first write or resync read. [`SwitchDevice::resume`] installs the new device and submits
//! the queued requests to it, in arrival order, before any later request.
//!
//! The store's admission covers requests the old device already handed to the replica. A
//! remote replica (the one-replica volume attached on a node without a replica) has a
//! window the store cannot see: a request sent over the old connection may still be on the
//! wire when the driver's session is admitted, and would then be refused as fenced. So the
//! switch also waits until the old device has answered every request it was given
//! ([`SwitchDevice::outstanding`] reaches 0) before the driver starts.
//!
//! The fast path is one uncontended read lock and one atomic counter per request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bw_types::{BlockDevice, IoDone, IoError, IoRequest};

enum Route {
    Active(Arc<dyn BlockDevice>),
    /// Switching: the old device (for its size); requests wait in `SwitchDevice::held`.
    Paused(Arc<dyn BlockDevice>),
    /// The switch failed: every request fails with this reason.
    Failed(Arc<dyn BlockDevice>, String),
}

type Held = VecDeque<(IoRequest, IoDone)>;

/// Most requests held while paused; more fail with an I/O error instead of piling up (the
/// NBD server bounds requests in flight per connection far below this).
pub const MAX_QUEUED: usize = 65_536;

pub struct SwitchDevice {
    route: RwLock<Route>,
    /// Requests submitted while paused. Locked only under the route lock's write side.
    held: Mutex<Held>,
    /// Requests handed to the active device and not answered yet.
    outstanding: Arc<AtomicU64>,
}

impl SwitchDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> SwitchDevice {
        SwitchDevice {
            route: RwLock::new(Route::Active(inner)),
            held: Mutex::new(VecDeque::new()),
            outstanding: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Requests handed to the active device that it has not answered yet. After
    /// [`SwitchDevice::pause`] this only falls: 0 means the old device is idle.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Hands `req` to `dev`, counted in `outstanding` until it is answered. Called under
    /// the route lock (either side), so `pause` never misses a request on its way in.
    fn hand_over(&self, dev: &Arc<dyn BlockDevice>, req: IoRequest, done: IoDone) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        let count = self.outstanding.clone();
        dev.submit(
            req,
            Box::new(move |r| {
                count.fetch_sub(1, Ordering::AcqRel);
                done(r)
            }),
        );
    }

    /// Holds every request submitted from now on until [`SwitchDevice::resume`] or
    /// [`SwitchDevice::fail_paused`]. Returns false if already paused. The caller
    /// serialises switches (the agent's attach lock).
    pub fn pause(&self) -> bool {
        let mut route = self.route.write().unwrap();
        let old = match &*route {
            Route::Active(d) => d.clone(),
            Route::Paused(_) | Route::Failed(..) => return false,
        };
        *route = Route::Paused(old);
        true
    }

    /// Installs `new` and hands it the held requests, in order, before any later one.
    pub fn resume(&self, new: Arc<dyn BlockDevice>) {
        let mut route = self.route.write().unwrap();
        *route = Route::Active(new.clone());
        let queued = std::mem::take(&mut *self.held.lock().unwrap());
        // Under the write lock: later submits wait until every held request is handed over.
        for (req, done) in queued {
            self.hand_over(&new, req, done);
        }
    }

    /// Fails every held request, and every later one, with `why` (the caller tears the
    /// attachment down).
    pub fn fail_paused(&self, why: &str) {
        let held = {
            let mut route = self.route.write().unwrap();
            let old = match &*route {
                Route::Active(d) | Route::Paused(d) | Route::Failed(d, _) => d.clone(),
            };
            *route = Route::Failed(old, why.to_owned());
            std::mem::take(&mut *self.held.lock().unwrap())
        };
        for (_, done) in held {
            done(Err(IoError::Faulted(why.to_owned())));
        }
    }
}

impl BlockDevice for SwitchDevice {
    fn size_bytes(&self) -> u64 {
        match &*self.route.read().unwrap() {
            Route::Active(d) | Route::Paused(d) | Route::Failed(d, _) => d.size_bytes(),
        }
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        {
            let route = self.route.read().unwrap();
            if let Route::Active(d) = &*route {
                self.hand_over(d, req, done);
                return;
            }
        }
        let route = self.route.write().unwrap();
        match &*route {
            // Resumed between the two locks.
            Route::Active(d) => return self.hand_over(d, req, done),
            Route::Failed(_, why) => {
                let why = why.clone();
                drop(route);
                return done(Err(IoError::Faulted(why)));
            }
            Route::Paused(_) => {}
        }
        let mut held = self.held.lock().unwrap();
        if held.len() < MAX_QUEUED {
            held.push_back((req, done));
            return;
        }
        drop((held, route));
        done(Err(IoError::Io(
            "too many requests held while the volume switches to replication".into(),
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bw_types::IoReply;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Records the offsets it was given, in order; completes at once.
    struct Recorder {
        name: &'static str,
        seen: Mutex<Vec<(&'static str, u64)>>,
        log: Arc<Mutex<Vec<(&'static str, u64)>>>,
    }

    impl BlockDevice for Recorder {
        fn size_bytes(&self) -> u64 {
            1 << 20
        }
        fn submit(&self, req: IoRequest, done: IoDone) {
            let IoRequest::Read { offset, .. } = req else {
                panic!("only reads here")
            };
            self.seen.lock().unwrap().push((self.name, offset));
            self.log.lock().unwrap().push((self.name, offset));
            done(Ok(IoReply::Done));
        }
    }

    fn read(offset: u64) -> IoRequest {
        IoRequest::Read { offset, len: 512 }
    }

    // Goal: requests submitted while paused wait, then reach the new device in arrival order
    // before any request submitted after the switch; nothing reaches the old one after pause.
    #[test]
    fn held_requests_go_to_the_new_device_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mk = |name| {
            Arc::new(Recorder {
                name,
                seen: Mutex::new(Vec::new()),
                log: log.clone(),
            })
        };
        let (old, new) = (mk("old"), mk("new"));
        let sw = SwitchDevice::new(old.clone());
        let done_count = Arc::new(AtomicU64::new(0));
        let done = || -> IoDone {
            let c = done_count.clone();
            Box::new(move |r| {
                assert!(r.is_ok());
                c.fetch_add(1, Ordering::SeqCst);
            })
        };
        sw.submit(read(0), done());
        assert!(sw.pause());
        assert!(!sw.pause(), "pausing twice is refused");
        sw.submit(read(512), done());
        sw.submit(read(1024), done());
        assert_eq!(done_count.load(Ordering::SeqCst), 1, "held, not completed");
        sw.resume(new.clone());
        sw.submit(read(1536), done());
        assert_eq!(done_count.load(Ordering::SeqCst), 4);
        assert_eq!(
            *log.lock().unwrap(),
            [("old", 0), ("new", 512), ("new", 1024), ("new", 1536)]
        );
        assert_eq!(old.seen.lock().unwrap().len(), 1);
    }

    /// Keeps every completion until told to answer.
    #[derive(Default)]
    struct Parked(Mutex<Vec<IoDone>>);

    impl Parked {
        /// Answers every parked request with success.
        fn answer_all(&self) {
            let parked = std::mem::take(&mut *self.0.lock().unwrap());
            for done in parked {
                done(Ok(IoReply::Done));
            }
        }
    }

    impl BlockDevice for Parked {
        fn size_bytes(&self) -> u64 {
            1 << 20
        }
        fn submit(&self, _req: IoRequest, done: IoDone) {
            self.0.lock().unwrap().push(done);
        }
    }

    // Goal: `outstanding` counts what the active device was given and has not answered, so
    // a switch can wait until the old device is idle (the remote case: nothing of the old
    // connection still on the wire when the driver's session is admitted).
    #[test]
    fn outstanding_counts_unanswered_requests_of_the_old_device() {
        let old = Arc::new(Parked::default());
        let sw = SwitchDevice::new(old.clone());
        let answered = Arc::new(AtomicU64::new(0));
        let done = || -> IoDone {
            let a = answered.clone();
            Box::new(move |r| {
                assert!(r.is_ok());
                a.fetch_add(1, Ordering::SeqCst);
            })
        };
        sw.submit(read(0), done());
        sw.submit(read(512), done());
        assert_eq!(sw.outstanding(), 2);
        assert!(sw.pause());
        sw.submit(read(1024), done());
        assert_eq!(
            sw.outstanding(),
            2,
            "held requests are not the old device's"
        );
        old.answer_all();
        assert_eq!(sw.outstanding(), 0, "the old device is idle");
        assert_eq!(answered.load(Ordering::SeqCst), 2);
        let new = Arc::new(Parked::default());
        sw.resume(new.clone());
        assert_eq!(
            sw.outstanding(),
            1,
            "the held request went to the new device"
        );
        new.answer_all();
        assert_eq!(sw.outstanding(), 0);
        assert_eq!(answered.load(Ordering::SeqCst), 3);
    }

    // Goal: a failed switch answers every held request with an error (never leaves it hanging).
    #[test]
    fn a_failed_switch_fails_the_held_requests() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let old = Arc::new(Recorder {
            name: "old",
            seen: Mutex::new(Vec::new()),
            log,
        });
        let sw = SwitchDevice::new(old);
        assert!(sw.pause());
        let errs = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let e = errs.clone();
            sw.submit(
                read(i * 512),
                Box::new(move |r| e.lock().unwrap().push(r.map(|_| ()))),
            );
        }
        assert!(errs.lock().unwrap().is_empty());
        sw.fail_paused("replication could not start");
        let errs = errs.lock().unwrap();
        assert_eq!(errs.len(), 3);
        assert!(errs
            .iter()
            .all(|r| matches!(r, Err(IoError::Faulted(m)) if m.contains("could not start"))));
        drop(errs);
        let later = Arc::new(Mutex::new(None));
        let l = later.clone();
        sw.submit(
            read(0),
            Box::new(move |r| *l.lock().unwrap() = Some(r.is_err())),
        );
        assert_eq!(
            *later.lock().unwrap(),
            Some(true),
            "later requests fail too"
        );
    }
}
