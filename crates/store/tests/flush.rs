//! Flush semantics: coalescing never lets a flush piggy-back on a sync that started before
//! it, and writes covered by a completed flush (or FUA) survive a crash.

mod common;

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use bw_types::{IoReply, IoRequest};
use common::{flush, read, run, start, write, GateBackend};
use store::testing::VolatileBackend;
use store::{LocalVolume, VolumeOptions};

const SIZE: u64 = 1 << 20;
/// How long we watch for a completion that must NOT happen yet.
const QUIET: Duration = Duration::from_millis(100);

/// Flush A starts sync 1 (held in flight); write W2 completes; flushes B and C arrive. B and
/// C must wait for sync 2 (which covers W2), share it, and W2 must survive a crash.
#[test]
fn flush_waits_for_a_sync_that_starts_after_it() {
    let mem = Arc::new(VolatileBackend::new());
    let gate = Arc::new(GateBackend::new(mem.clone()));
    let vol = LocalVolume::with_backend(gate.clone(), SIZE, VolumeOptions::default());
    write(&vol, 0, vec![1u8; 4096]);
    let a = start(&vol, IoRequest::Flush);
    gate.wait_entered(1); // sync 1 has taken its durable snapshot and is blocked
    write(&vol, 4096, vec![2u8; 4096]); // W2: completed after sync 1 started
    let b = start(&vol, IoRequest::Flush);
    let c = start(&vol, IoRequest::Flush);
    assert_eq!(a.recv_timeout(QUIET), Err(RecvTimeoutError::Timeout));
    gate.release(1);
    assert_eq!(a.recv_timeout(common::DEADLINE).unwrap(), Ok(IoReply::Done));
    gate.wait_entered(2);
    assert_eq!(
        b.recv_timeout(QUIET),
        Err(RecvTimeoutError::Timeout),
        "B piggy-backed on sync 1"
    );
    gate.release(2);
    assert_eq!(b.recv_timeout(common::DEADLINE).unwrap(), Ok(IoReply::Done));
    assert_eq!(c.recv_timeout(common::DEADLINE).unwrap(), Ok(IoReply::Done));
    assert_eq!(gate.entered(), 2, "B and C shared one sync");
    mem.crash();
    common::assert_filled(&read(&vol, 4096, 4096), 2, 4096);
}

/// Writes before a completed flush and FUA writes survive a crash; un-flushed ones do not.
#[test]
fn crash_keeps_exactly_what_was_flushed() {
    let mem = Arc::new(VolatileBackend::new());
    let vol = LocalVolume::with_backend(mem.clone(), SIZE, VolumeOptions::default());
    write(&vol, 0, vec![1u8; 4096]);
    write(&vol, 8192, vec![3u8; 100]);
    assert_eq!(flush(&vol), Ok(IoReply::Done));
    let fua = IoRequest::Write {
        offset: 16384,
        data: vec![4u8; 4096].into(),
        fua: true,
    };
    assert_eq!(run(&vol, fua), Ok(IoReply::Done));
    write(&vol, 0, vec![9u8; 4096]); // not flushed: lost
    let trim = IoRequest::Trim {
        offset: 8192,
        len: 4096,
        fua: false,
    }; // not flushed
    assert_eq!(run(&vol, trim), Ok(IoReply::Done));
    mem.crash();
    common::assert_filled(&read(&vol, 0, 4096), 1, 4096);
    common::assert_filled(&read(&vol, 8192, 100), 3, 100);
    common::assert_filled(&read(&vol, 16384, 4096), 4, 4096);
}

/// Many concurrent flushes are served by far fewer syncs, and all complete.
#[test]
fn concurrent_flushes_coalesce() {
    let mem = Arc::new(VolatileBackend::new());
    let gate = Arc::new(GateBackend::new(mem.clone()));
    let vol = LocalVolume::with_backend(gate.clone(), SIZE, VolumeOptions::default());
    let first = start(&vol, IoRequest::Flush);
    gate.wait_entered(1);
    let rest: Vec<_> = (0..50).map(|_| start(&vol, IoRequest::Flush)).collect();
    gate.release(u64::MAX);
    first.recv_timeout(common::DEADLINE).unwrap().unwrap();
    for rx in rest {
        assert_eq!(
            rx.recv_timeout(common::DEADLINE).unwrap(),
            Ok(IoReply::Done)
        );
    }
    assert_eq!(gate.entered(), 2, "50 flushes during sync 1 share sync 2");
}
