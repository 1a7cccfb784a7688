//! The replica fence under concurrency: `admit` of a newer generation waits for requests of
//! older generations already past the fence, so none of them lands after the new
//! generation's first write. Method: a backend whose writes block until released.

use std::io;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bw_types::{BlockDevice, Generation, IoReply, IoRequest};
use store::testing::{TempDir, VolatileBackend};
use store::{Backend, LocalVolume, Replica, ReplicaOptions};

/// Writes wait while `held` is true.
struct HoldingBackend {
    inner: VolatileBackend,
    held: Mutex<bool>,
    released: Condvar,
    entered: Mutex<Option<mpsc::Sender<()>>>,
}

impl HoldingBackend {
    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.released.notify_all();
    }
}

impl Backend for HoldingBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(tx) = self.entered.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.released.wait(held).unwrap();
        }
        drop(held);
        self.inner.write_at(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64, keep: bool) -> io::Result<()> {
        self.inner.zero_range(offset, len, keep)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.next_hole(offset)
    }
}

// Goal: admit(6) does not return while a write of generation 5 that passed the fence is
// still running; once admit returned, generation 5 is refused and its write is complete.
#[test]
fn admit_waits_for_older_requests_in_flight() {
    let dir = TempDir::new("replica-drain").unwrap();
    let meta = dir.path().join("v.meta");
    Replica::create_meta(&meta).unwrap();
    let (entered_tx, entered_rx) = mpsc::channel();
    let backend = Arc::new(HoldingBackend {
        inner: VolatileBackend::new(),
        held: Mutex::new(true),
        released: Condvar::new(),
        entered: Mutex::new(Some(entered_tx)),
    });
    // The held write must run on an I/O thread: inline, it would block this test thread.
    let options = store::VolumeOptions {
        inline_write_max: 0,
        ..Default::default()
    };
    let vol = LocalVolume::with_backend(backend.clone(), 1 << 20, options);
    let r = Arc::new(Replica::open(vol, &meta, ReplicaOptions::default()).unwrap());
    let old = r.device_for(Generation(5)).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    old.submit(
        IoRequest::Write {
            offset: 0,
            data: vec![5; 4096],
            fua: false,
        },
        Box::new(move |res| done_tx.send(res).unwrap()),
    );
    entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let (admit_tx, admit_rx) = mpsc::channel();
    let r2 = Arc::clone(&r);
    let admitting = std::thread::spawn(move || admit_tx.send(r2.admit(Generation(6)).is_ok()));
    // The fence is raised at once (new requests of generation 5 are refused) ...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !old.is_fenced() {
        assert!(std::time::Instant::now() < deadline, "fence raised");
        std::thread::yield_now();
    }
    // ... but admit waits for the write already past it.
    assert!(
        admit_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "admit waited"
    );
    backend.release();
    assert_eq!(admit_rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    assert_eq!(
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        Ok(IoReply::Done),
        "the old write completed"
    );
    admitting.join().unwrap().unwrap();
}
