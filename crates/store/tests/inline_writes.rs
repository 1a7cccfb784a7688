//! Small writes on a file system without non-blocking buffered writes (ext4, and every test
//! backend) run inline on the submitter's thread: they complete before `submit` returns,
//! flushes still cover them, errors keep their fail-stop meaning, and a slow inline write
//! pauses inlining.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use bw_types::{BlockDevice, IoError, IoReply, IoRequest};
use common::{flush, read, run, write, GateBackend};
use store::testing::{FaultOp, FaultyBackend, VolatileBackend};
use store::{Backend, LocalVolume, VolumeErrorEvent, VolumeOptions};

const SIZE: u64 = 8 << 20;

/// Submits a write and returns its outcome if the completion already ran when `submit`
/// returned (`None` otherwise; then it is awaited and must succeed).
fn write_now(
    vol: &LocalVolume,
    offset: u64,
    data: Vec<u8>,
    fua: bool,
) -> Option<Result<IoReply, IoError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    vol.submit(
        IoRequest::Write {
            offset,
            data: data.into(),
            fua,
        },
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    match rx.try_recv() {
        Ok(r) => Some(r),
        Err(_) => {
            assert_eq!(
                rx.recv_timeout(common::DEADLINE).unwrap(),
                Ok(IoReply::Done)
            );
            None
        }
    }
}

// Goal: a small write completes before submit returns, without starting any I/O thread,
// and a flush submitted afterwards makes it durable (crash keeps it); a FUA inline write
// is durable on completion (its sync runs on an I/O thread); a large write takes the pool.
#[test]
fn inline_write_then_flush_covers_it() {
    let mem = Arc::new(VolatileBackend::new());
    let vol = LocalVolume::with_backend(mem.clone(), SIZE, VolumeOptions::default());
    let max = VolumeOptions::default().inline_write_max;
    assert_eq!(
        write_now(&vol, 0, vec![1u8; 4096], false),
        Some(Ok(IoReply::Done))
    );
    assert_eq!(
        write_now(&vol, 65536, vec![2u8; max], false),
        Some(Ok(IoReply::Done))
    );
    let s = vol.stats();
    assert_eq!((s.writes_inline, s.writes_queued, s.workers), (2, 0, 0));
    assert_eq!(flush(&vol), Ok(IoReply::Done));
    // FUA: written inline, then waits for a sync (which needs an I/O thread).
    let fua = write_now(&vol, 2 << 20, vec![3u8; 4096], true);
    assert!(fua.is_none() || fua == Some(Ok(IoReply::Done)));
    write(&vol, 4 << 20, vec![4u8; max + 1]); // larger than the limit: queued
    let s = vol.stats();
    assert_eq!((s.writes_inline, s.writes_queued), (3, 1));
    write(&vol, 0, vec![9u8; 4096]); // not flushed: lost at the crash
    mem.crash();
    common::assert_filled(&read(&vol, 0, 4096), 1, 4096);
    common::assert_filled(&read(&vol, 65536, max as u32), 2, max);
    common::assert_filled(&read(&vol, 2 << 20, 4096), 3, 4096);
    common::assert_filled(&read(&vol, 4 << 20, 4096), 0, 4096);
}

// Goal: the coalescing rule holds for inline writes: a write completed inline while sync 1
// is in flight is not covered by sync 1; a flush submitted after it waits for sync 2.
#[test]
fn inline_write_during_a_sync_needs_the_next_sync() {
    let mem = Arc::new(VolatileBackend::new());
    let gate = Arc::new(GateBackend::new(mem.clone()));
    let vol = LocalVolume::with_backend(gate.clone(), SIZE, VolumeOptions::default());
    let a = common::start(&vol, IoRequest::Flush);
    gate.wait_entered(1);
    assert_eq!(
        write_now(&vol, 4096, vec![5u8; 4096], false),
        Some(Ok(IoReply::Done))
    );
    let b = common::start(&vol, IoRequest::Flush);
    gate.release(1);
    assert_eq!(a.recv_timeout(common::DEADLINE).unwrap(), Ok(IoReply::Done));
    gate.wait_entered(2);
    assert!(
        b.recv_timeout(Duration::from_millis(100)).is_err(),
        "piggy-backed on sync 1"
    );
    gate.release(2);
    assert_eq!(b.recv_timeout(common::DEADLINE).unwrap(), Ok(IoReply::Done));
    mem.crash();
    common::assert_filled(&read(&vol, 4096, 4096), 5, 4096);
}

// Goal: inline write errors keep the fail-stop rules: EIO faults (reported once, before the
// client sees the error), ENOSPC is soft; with inlining off the same holds on the pool.
#[test]
fn inline_write_errors_fail_stop() {
    for inline_write_max in [VolumeOptions::default().inline_write_max, 0] {
        let faulty = Arc::new(FaultyBackend::new(Arc::new(VolatileBackend::new())));
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let vol = LocalVolume::with_backend(
            faulty.clone(),
            SIZE,
            VolumeOptions {
                on_error: Some(Arc::new(move |e| sink.lock().unwrap().push(e))),
                inline_write_max,
                ..VolumeOptions::default()
            },
        );
        let w = |off| IoRequest::Write {
            offset: off,
            data: vec![1u8; 4096].into(),
            fua: false,
        };
        faulty.fail_now(FaultOp::Write, libc::ENOSPC);
        assert_eq!(run(&vol, w(0)), Err(IoError::NoSpace));
        assert_eq!(vol.fault_reason(), None);
        faulty.clear_faults();
        assert_eq!(run(&vol, w(0)), Ok(IoReply::Done));
        faulty.fail_now(FaultOp::Write, libc::EIO);
        assert!(matches!(run(&vol, w(0)), Err(IoError::Io(_))));
        assert!(matches!(run(&vol, w(8192)), Err(IoError::Faulted(_))));
        assert!(matches!(flush(&vol), Err(IoError::Faulted(_))));
        let ev = events.lock().unwrap();
        assert!(matches!(ev[0], VolumeErrorEvent::NoSpace { .. }));
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, VolumeErrorEvent::Faulted { .. }))
                .count(),
            1
        );
        let s = vol.stats();
        if inline_write_max == 0 {
            assert_eq!(s.writes_inline, 0);
        } else {
            assert_eq!(s.writes_queued, 0);
        }
    }
}

/// A memory backend whose writes take `delay` while `slow` is set.
struct SlowBackend {
    inner: VolatileBackend,
    slow: AtomicBool,
    writes: AtomicU64,
}

impl Backend for SlowBackend {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if self.slow.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.inner.write_at(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64, keep: bool) -> std::io::Result<()> {
        self.inner.zero_range(offset, len, keep)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn next_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> std::io::Result<u64> {
        self.inner.next_hole(offset)
    }
}

// Goal: an inline write slower than INLINE_WRITE_SLOW sends the following writes to the
// I/O threads for a pause; once it is over, a fast probe brings inline writing back.
#[test]
fn slow_inline_write_pauses_inlining() {
    let backend = Arc::new(SlowBackend {
        inner: VolatileBackend::new(),
        slow: AtomicBool::new(true),
        writes: AtomicU64::new(0),
    });
    let vol = LocalVolume::with_backend(backend.clone(), SIZE, VolumeOptions::default());
    assert!(write_now(&vol, 0, vec![1u8; 4096], false).is_some()); // inline, slow
    let s = vol.stats();
    assert_eq!((s.writes_inline, s.inline_write_pauses), (1, 1));
    backend.slow.store(false, Ordering::Relaxed);
    for i in 0..5 {
        write(&vol, i * 4096, vec![2u8; 4096]); // during the pause: queued
    }
    assert_eq!(vol.stats().writes_queued, 5);
    std::thread::sleep(Duration::from_millis(250)); // > INLINE_PAUSE_MIN
    assert!(write_now(&vol, 0, vec![3u8; 4096], false).is_some());
    let s = vol.stats();
    assert_eq!(
        (s.writes_inline, s.writes_queued, s.inline_write_pauses),
        (2, 5, 1)
    );
    assert_eq!(backend.writes.load(Ordering::Relaxed), 7);
    common::assert_filled(&read(&vol, 0, 4096), 3, 4096);
}

// Goal: only one inline write per volume runs at a time: a write submitted while another is
// inside its inline pwrite is queued for an I/O thread instead of waiting for it.
#[test]
fn second_concurrent_write_is_queued() {
    let backend = Arc::new(SlowBackend {
        inner: VolatileBackend::new(),
        slow: AtomicBool::new(true),
        writes: AtomicU64::new(0),
    });
    let vol = Arc::new(LocalVolume::with_backend(
        backend.clone(),
        SIZE,
        VolumeOptions::default(),
    ));
    let v = vol.clone();
    let a = std::thread::spawn(move || write_now(&v, 0, vec![1u8; 4096], false));
    while backend.writes.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    // A is inside its (slow) inline write now.
    assert!(write_now(&vol, 4096, vec![2u8; 4096], false).is_none());
    assert_eq!(a.join().unwrap(), Some(Ok(IoReply::Done)));
    let s = vol.stats();
    assert_eq!((s.writes_inline, s.writes_queued), (1, 1));
    common::assert_filled(&read(&*vol, 4096, 4096), 2, 4096);
}
