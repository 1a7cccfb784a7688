//! The replica fence under concurrency: `admit` of a newer generation (and
//! `admit_session` of a newer session) waits for requests of older generations (sessions)
//! already past the fence, so none of them lands after the newer one's first write.
//! Method: a backend whose writes block until released.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bw_types::{BlockDevice, Generation, IoReply, IoRequest};
use store::testing::{TempDir, VolatileBackend};
use store::{Backend, FileBackend, LocalVolume, Replica, ReplicaOptions};

/// Writes wait while `held` is true.
struct HoldingBackend {
    inner: Arc<dyn Backend>,
    held: Mutex<bool>,
    released: Condvar,
    entered: Mutex<Option<mpsc::Sender<()>>>,
    /// `write_at` calls that reached this backend.
    writes: AtomicU64,
}

impl HoldingBackend {
    fn new(inner: Arc<dyn Backend>, entered: mpsc::Sender<()>) -> HoldingBackend {
        HoldingBackend {
            inner,
            held: Mutex::new(true),
            released: Condvar::new(),
            entered: Mutex::new(Some(entered)),
            writes: AtomicU64::new(0),
        }
    }

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
        self.writes.fetch_add(1, Ordering::SeqCst);
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
    let backend = Arc::new(HoldingBackend::new(
        Arc::new(VolatileBackend::new()),
        entered_tx,
    ));
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
            data: vec![5; 4096].into(),
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

// Goal: session fencing on a real file. A write of session 1 held in the disk completes
// before admit_session(G, 2) returns; a write arriving on session 1 afterwards is refused
// as fenced and never reaches the disk; the data on disk is session 1's write followed by
// session 2's.
#[test]
fn admit_session_drains_older_session_and_fences_it() {
    let dir = TempDir::new("replica-session").unwrap();
    let path = store::create_volume_file(dir.path(), "v.img", 1 << 20).unwrap();
    let meta = store::default_meta_path(&path);
    Replica::create_meta(&meta).unwrap();
    let (entered_tx, entered_rx) = mpsc::channel();
    let file = Arc::new(FileBackend::open(&path).unwrap());
    let backend = Arc::new(HoldingBackend::new(file, entered_tx));
    let options = store::VolumeOptions {
        inline_write_max: 0,
        ..Default::default()
    };
    let vol = LocalVolume::with_backend(backend.clone(), 1 << 20, options);
    let r = Arc::new(Replica::open(vol, &meta, ReplicaOptions::default()).unwrap());
    let s1 = r.device_for_session(Generation(7), 1).unwrap();
    let write = |byte: u8| IoRequest::Write {
        offset: 0,
        data: vec![byte; 4096].into(),
        fua: false,
    };
    let (done_tx, done_rx) = mpsc::channel();
    s1.submit(write(1), Box::new(move |res| done_tx.send(res).unwrap()));
    entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let (admit_tx, admit_rx) = mpsc::channel();
    let r2 = Arc::clone(&r);
    let admitting = std::thread::spawn(move || {
        let res = r2.device_for_session(Generation(7), 2);
        admit_tx.send(()).unwrap();
        res
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s1.is_fenced() {
        assert!(std::time::Instant::now() < deadline, "floor raised");
        std::thread::yield_now();
    }
    assert!(
        admit_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "admit_session waits for session 1's write"
    );
    // Session 1 sends more after session 2 began (bytes left in a dead socket): refused.
    let (late_tx, late_rx) = mpsc::channel();
    s1.submit(write(9), Box::new(move |res| late_tx.send(res).unwrap()));
    let late = late_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        late,
        Err(bw_types::IoError::Faulted(
            "fenced: session 1 of generation 7 < session 2".into()
        ))
    );
    backend.release();
    admit_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        Ok(IoReply::Done),
        "session 1's write completed before session 2 was admitted"
    );
    let s2 = admitting.join().unwrap().unwrap();
    assert_eq!(
        backend.writes.load(Ordering::SeqCst),
        1,
        "the late write never reached the disk"
    );
    let (tx, rx) = mpsc::channel();
    s2.submit(
        IoRequest::Read {
            offset: 0,
            len: 4096,
        },
        Box::new(move |r| tx.send(r).unwrap()),
    );
    match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
        Ok(IoReply::Data(d)) => assert!(d.iter().all(|&b| b == 1), "session 1's write only"),
        other => panic!("{other:?}"),
    }
}
