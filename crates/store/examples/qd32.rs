//! Micro-benchmark of `LocalVolume` alone (no NBD): 4 KiB random reads and writes at a
//! fixed queue depth from one submitting thread (as the NBD reader task does), QD1 write
//! latency, and 1 MiB sequential writes. Reports ops/s and how many requests the inline
//! fast path served.
//!
//! `cargo run --release -p store --example qd32 -- [workers] [seconds] [dir]`

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bw_types::{BlockDevice, IoRequest};
use store::{create_volume_file, LocalVolume, VolumeOptions};

const FILE_BYTES: u64 = 512 << 20;

/// Keeps `qd` requests in flight for `secs`, each built by `make(i)`; returns ops/s and
/// the sorted latencies in microseconds.
fn drive(
    vol: &LocalVolume,
    qd: usize,
    secs: f64,
    make: impl Fn(u64) -> IoRequest,
) -> (f64, Vec<u32>) {
    let (tx, rx) = mpsc::channel::<Instant>();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let (mut submitted, mut completed) = (0u64, 0u64);
    let mut lat = Vec::new();
    let submit = |i: u64| {
        let tx = tx.clone();
        let t0 = Instant::now();
        vol.submit(
            make(i),
            Box::new(move |r| {
                r.expect("request failed");
                tx.send(t0).unwrap();
            }),
        );
    };
    while submitted < qd as u64 {
        submit(submitted);
        submitted += 1;
    }
    while completed < submitted {
        let t0 = rx.recv().unwrap();
        lat.push(t0.elapsed().as_micros() as u32);
        completed += 1;
        if Instant::now() < deadline {
            submit(submitted);
            submitted += 1;
        }
    }
    lat.sort_unstable();
    (completed as f64 / start.elapsed().as_secs_f64(), lat)
}

fn rand_offset(i: u64) -> u64 {
    // SplitMix64: cheap, deterministic, uniform enough for offsets.
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % (FILE_BYTES / 4096)) * 4096
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let workers: usize = args
        .get(1)
        .map_or(store::DEFAULT_IO_WORKERS, |a| a.parse().unwrap());
    let secs: f64 = args.get(2).map_or(5.0, |a| a.parse().unwrap());
    let dir = args
        .get(3)
        .map_or(std::env::temp_dir(), std::path::PathBuf::from)
        .join("store-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = create_volume_file(&dir, "bench.img", FILE_BYTES).unwrap();
    let vol = LocalVolume::open(
        &path,
        FILE_BYTES,
        VolumeOptions {
            io_workers: workers,
            ..VolumeOptions::default()
        },
    )
    .unwrap();
    // Prefill so that reads find data (in the page cache, as in a warm VM disk).
    let mut off = 0;
    while off < FILE_BYTES {
        let (tx, rx) = mpsc::channel();
        vol.submit(
            IoRequest::Write {
                offset: off,
                data: vec![0xA5; 1 << 20].into(),
                fua: false,
            },
            Box::new(move |r| tx.send(r).unwrap()),
        );
        rx.recv().unwrap().unwrap();
        off += 1 << 20;
    }
    println!(
        "workers={workers} secs={secs} file={} MiB dir={}",
        FILE_BYTES >> 20,
        dir.display()
    );
    let report =
        |name: &str, vol: &LocalVolume, before: store::VolumeStats, (ops, lat): (f64, Vec<u32>)| {
            let s = vol.stats();
            let inline =
                (s.reads_inline - before.reads_inline) + (s.writes_inline - before.writes_inline);
            let queued =
                (s.reads_queued - before.reads_queued) + (s.writes_queued - before.writes_queued);
            let frac = inline as f64 / (inline + queued).max(1) as f64;
            let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
            println!(
                "{name:<22} {ops:>10.0} ops/s  inline {:>5.1}%  lat p50 {} us p99 {} us",
                frac * 100.0,
                p(0.5),
                p(0.99)
            );
        };
    let b = vol.stats();
    report(
        "4k randread QD32",
        &vol,
        b,
        drive(&vol, 32, secs, |i| IoRequest::Read {
            offset: rand_offset(i),
            len: 4096,
        }),
    );
    let b = vol.stats();
    report(
        "4k randwrite QD32",
        &vol,
        b,
        drive(&vol, 32, secs, |i| IoRequest::Write {
            offset: rand_offset(i),
            data: vec![i as u8; 4096].into(),
            fua: false,
        }),
    );
    let b = vol.stats();
    report(
        "4k randwrite QD1",
        &vol,
        b,
        drive(&vol, 1, secs, |i| IoRequest::Write {
            offset: rand_offset(i),
            data: vec![i as u8; 4096].into(),
            fua: false,
        }),
    );
    let b = vol.stats();
    report(
        "4k randread QD1",
        &vol,
        b,
        drive(&vol, 1, secs, |i| IoRequest::Read {
            offset: rand_offset(i),
            len: 4096,
        }),
    );
    let b = vol.stats();
    let (ops, lat) = drive(&vol, 8, secs, |i| IoRequest::Write {
        offset: (i << 20) % FILE_BYTES,
        data: vec![1; 1 << 20].into(),
        fua: false,
    });
    report("1M seqwrite QD8", &vol, b, (ops, lat));
    println!("{:<22} {:>10.0} MiB/s", "", ops);
    let b = vol.stats();
    report(
        "4k randwrite+flush/32",
        &vol,
        b,
        drive(&vol, 32, secs, |i| {
            if i % 32 == 31 {
                IoRequest::Flush
            } else {
                IoRequest::Write {
                    offset: rand_offset(i),
                    data: vec![i as u8; 4096].into(),
                    fua: false,
                }
            }
        }),
    );
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}
