//! Fail-stop: injected I/O errors below the seam fault the volume for good; ENOSPC on a
//! write does not.

mod common;

use std::sync::{Arc, Mutex};

use bw_types::{IoError, IoKind, IoReply, IoRequest};
use common::{flush, read, run, write};
use store::testing::{FaultOp, FaultRule, FaultyBackend, VolatileBackend};
use store::{LocalVolume, VolumeErrorEvent, VolumeOptions};

const SIZE: u64 = 1 << 20;

/// A volume over a FaultyBackend over memory, recording error events.
fn setup() -> (
    LocalVolume,
    Arc<FaultyBackend>,
    Arc<Mutex<Vec<VolumeErrorEvent>>>,
) {
    let faulty = Arc::new(FaultyBackend::new(Arc::new(VolatileBackend::new())));
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let options = VolumeOptions {
        on_error: Some(Arc::new(move |e| sink.lock().unwrap().push(e))),
        ..VolumeOptions::default()
    };
    let vol = LocalVolume::with_backend(faulty.clone(), SIZE, options);
    (vol, faulty, events)
}

fn is_faulted(r: &Result<IoReply, IoError>) -> bool {
    matches!(r, Err(IoError::Faulted(_)))
}

/// An EIO on write faults the volume: that write fails, every later request (reads too)
/// fails with Faulted, and the fault is reported once.
#[test]
fn write_error_faults_the_volume() {
    let (vol, faulty, events) = setup();
    write(&vol, 0, vec![1u8; 4096]);
    faulty.set_fault(
        FaultOp::Write,
        FaultRule {
            after: 0,
            errno: libc::EIO,
            sticky: false,
        },
    );
    let r = run(
        &vol,
        IoRequest::Write {
            offset: 0,
            data: vec![2u8; 4096].into(),
            fua: false,
        },
    );
    assert!(matches!(r, Err(IoError::Io(_))), "{r:?}");
    assert!(vol.fault_reason().is_some());
    // The injected fault was one-shot: the backend would work again, the volume must not.
    assert!(is_faulted(&run(
        &vol,
        IoRequest::Write {
            offset: 0,
            data: vec![3u8; 1].into(),
            fua: false
        }
    )));
    assert!(is_faulted(&run(
        &vol,
        IoRequest::Read { offset: 0, len: 1 }
    )));
    assert!(is_faulted(&flush(&vol)));
    assert_eq!(
        faulty.calls(FaultOp::Sync),
        0,
        "a faulted volume never claims durability"
    );
    let events = events.lock().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(&events[0], VolumeErrorEvent::Faulted { .. }));
}

/// A failed fdatasync faults the volume and is never retried: the next flush fails without
/// reaching the backend.
#[test]
fn sync_error_faults_and_is_not_retried() {
    let (vol, faulty, events) = setup();
    write(&vol, 0, vec![1u8; 4096]);
    faulty.set_fault(
        FaultOp::Sync,
        FaultRule {
            after: 0,
            errno: libc::EIO,
            sticky: false,
        },
    );
    assert!(matches!(flush(&vol), Err(IoError::Io(_))));
    assert_eq!(faulty.calls(FaultOp::Sync), 1);
    assert!(
        is_faulted(&flush(&vol)),
        "the second flush must not succeed"
    );
    let fua = IoRequest::Write {
        offset: 0,
        data: vec![1].into(),
        fua: true,
    };
    assert!(is_faulted(&run(&vol, fua)));
    assert_eq!(faulty.calls(FaultOp::Sync), 1, "the sync was not retried");
    assert_eq!(events.lock().unwrap().len(), 1);
}

/// ENOSPC from fdatasync (delayed allocation failed: acknowledged data is lost) faults.
#[test]
fn enospc_on_sync_faults() {
    let (vol, faulty, _events) = setup();
    write(&vol, 0, vec![1u8; 4096]);
    faulty.fail_now(FaultOp::Sync, libc::ENOSPC);
    assert!(matches!(flush(&vol), Err(IoError::Io(_))));
    assert!(vol.fault_reason().is_some());
}

/// ENOSPC on a write fails that write only, with NoSpace, and is reported; the volume
/// keeps working (and flushing) once space is back.
#[test]
fn enospc_on_write_is_soft() {
    let (vol, faulty, events) = setup();
    faulty.fail_now(FaultOp::Write, libc::ENOSPC);
    let r = run(
        &vol,
        IoRequest::Write {
            offset: 8192,
            data: vec![1u8; 4096].into(),
            fua: false,
        },
    );
    assert_eq!(r, Err(IoError::NoSpace));
    let zero = IoRequest::WriteZeroes {
        offset: 0,
        len: 4096,
        may_punch: false,
        fua: false,
    };
    faulty.fail_now(FaultOp::Deallocate, libc::ENOSPC);
    assert_eq!(
        run(&vol, zero),
        Err(IoError::NoSpace),
        "allocating zeroing is a write"
    );
    assert!(vol.fault_reason().is_none());
    faulty.clear_faults();
    write(&vol, 8192, vec![2u8; 4096]);
    assert_eq!(flush(&vol), Ok(IoReply::Done));
    common::assert_filled(&read(&vol, 8192, 4096), 2, 4096);
    let events = events.lock().unwrap();
    assert!(matches!(
        events[0],
        VolumeErrorEvent::NoSpace {
            kind: IoKind::Write,
            offset: 8192,
            ..
        }
    ));
    assert_eq!(events.len(), 2);
}

/// A failed punch (TRIM) faults: the range's state is unknown.
#[test]
fn punch_error_faults() {
    let (vol, faulty, _events) = setup();
    faulty.fail_now(FaultOp::Deallocate, libc::EIO);
    let r = run(
        &vol,
        IoRequest::Trim {
            offset: 0,
            len: 4096,
            fua: false,
        },
    );
    assert!(matches!(r, Err(IoError::Io(_))));
    assert!(vol.fault_reason().is_some());
}

/// A read error fails that read, is reported, and does not fault the volume.
#[test]
fn read_error_is_reported_not_faulting() {
    let (vol, faulty, events) = setup();
    faulty.set_fault(
        FaultOp::Read,
        FaultRule {
            after: 0,
            errno: libc::EIO,
            sticky: false,
        },
    );
    assert!(matches!(
        run(
            &vol,
            IoRequest::Read {
                offset: 0,
                len: 512
            }
        ),
        Err(IoError::Io(_))
    ));
    assert!(vol.fault_reason().is_none());
    common::assert_filled(&read(&vol, 0, 512), 0, 512);
    assert!(matches!(
        events.lock().unwrap()[0],
        VolumeErrorEvent::ReadFailed { .. }
    ));
}
