//! Many threads submitting mixed requests: every completion runs exactly once, including
//! for requests queued when the volume closes, and callbacks may submit more work.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bw_types::{BlockDevice, IoError, IoRequest};
use store::testing::TempDir;
use store::{create_volume_file, LocalVolume, VolumeOptions};

const SIZE: u64 = 16 << 20;

fn request(i: u64) -> IoRequest {
    let offset = (i * 7919 % (SIZE / 4096)) * 4096;
    match i % 6 {
        0 | 1 => IoRequest::Write {
            offset,
            data: vec![i as u8; 4096].into(),
            fua: i.is_multiple_of(12),
        },
        2 | 3 => IoRequest::Read { offset, len: 4096 },
        4 => IoRequest::Flush,
        _ => IoRequest::WriteZeroes {
            offset,
            len: 4096,
            may_punch: i.is_multiple_of(2),
            fua: false,
        },
    }
}

/// 8 threads x 400 requests on a real file; the volume closes at the end.
#[test]
fn every_completion_runs_exactly_once() {
    let dir = TempDir::new("conc").unwrap();
    let path = create_volume_file(dir.path(), "c.img", SIZE).unwrap();
    let vol = Arc::new(LocalVolume::open(&path, SIZE, VolumeOptions::default()).unwrap());
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 400;
    let calls: Arc<Vec<AtomicU32>> = Arc::new(
        (0..THREADS * PER_THREAD)
            .map(|_| AtomicU32::new(0))
            .collect(),
    );
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (vol, calls) = (Arc::clone(&vol), Arc::clone(&calls));
            s.spawn(move || {
                for k in 0..PER_THREAD {
                    let i = t * PER_THREAD + k;
                    let calls = Arc::clone(&calls);
                    vol.submit(
                        request(i),
                        Box::new(move |r| {
                            assert!(r.is_ok(), "request {i} failed: {r:?}");
                            calls[i as usize].fetch_add(1, Ordering::SeqCst);
                        }),
                    );
                }
            });
        }
    });
    vol.close(); // waits for everything queued
    for (i, c) in calls.iter().enumerate() {
        assert_eq!(c.load(Ordering::SeqCst), 1, "request {i}");
    }
}

/// A completion callback submits the next request (as a pipelined client would), and a
/// callback that drops the last handle closes the volume from an I/O thread without
/// deadlocking.
#[test]
fn callbacks_may_submit_and_drop_the_volume() {
    let dir = TempDir::new("chain").unwrap();
    let path = create_volume_file(dir.path(), "c.img", SIZE).unwrap();
    let vol = Arc::new(LocalVolume::open(&path, SIZE, VolumeOptions::default()).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    fn chain(vol: Arc<LocalVolume>, left: u32, tx: std::sync::mpsc::Sender<u32>) {
        let next = Arc::clone(&vol);
        vol.submit(
            IoRequest::Write {
                offset: u64::from(left) * 4096,
                data: vec![1u8; 4096].into(),
                fua: left.is_multiple_of(10),
            },
            Box::new(move |r| {
                assert!(r.is_ok());
                if left == 0 {
                    tx.send(0).unwrap();
                    drop(next); // possibly the last handle: closes on this I/O thread
                } else {
                    chain(next, left - 1, tx);
                }
            }),
        );
    }
    chain(Arc::clone(&vol), 200, tx);
    drop(vol);
    assert_eq!(rx.recv_timeout(common::DEADLINE), Ok(0));
}

/// After close, a submit fails fast with ShuttingDown.
#[test]
fn submit_after_close_fails() {
    let vol = LocalVolume::with_backend(
        Arc::new(store::testing::VolatileBackend::new()),
        SIZE,
        VolumeOptions::default(),
    );
    vol.close();
    assert_eq!(
        common::run(&vol, IoRequest::Read { offset: 0, len: 1 }),
        Err(IoError::ShuttingDown)
    );
}
