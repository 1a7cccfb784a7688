//! Goal: a replica added to a volume that carries a live ext4 filesystem is filled at the set
//! resync rate (within 10 %) while the filesystem keeps receiving files, and ends
//! byte-identical to the others with the filesystem clean and every file intact (issue 4, C3
//! acceptance: "add-replica under load").
//! Method: a 256 MiB volume with replicas on n1 and n2, attached on n1. In the root
//! namespace nbdfuse exposes n1's export as a file, a loop device sits on it; mkfs.ext4,
//! mount, write a base tree (~50 MiB, some large files). Then a writer thread keeps adding a
//! second tree (up to 5000 files, small and some large, a `sync -f` every 100 files) while
//! `volume add-replica vm --node n3 --resync-rate 8M` runs; the test samples `volume show`
//! every ~200 ms together with the attachment's `blockwarden_replica_resynced_bytes_total`
//! (bytes actually read and sent) and computes the copy rate itself from that counter's
//! deltas over the steady part of the copy (from 1 s after the first progress, past the
//! token bucket's initial burst of at most one region, to 4 MiB before the end). The copy
//! visits all 256 regions, but regions that are holes on the source are neither read nor
//! charged to the rate, so it moves only the allocated data. Afterwards: sync,
//! unmount, `fsck.ext4 -f -n` on the device is clean, a fresh nbdfuse + loop + read-only
//! mount reads every file back identical, `volume detach`, and the three replica files are
//! identical region by region. Needs root, nbdfuse, losetup, mkfs.ext4 (skips loudly).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::tail;
use testkit::cluster::inspect::{
    all_in_sync, metric, replica_file, replica_on, replica_states, same_files, volume_show,
};
use testkit::cluster::Cluster;
use testkit::cmd::{describe, run_ok, run_with_timeout};
use testkit::e2e::{losetup, mount, nbdfuse, Cleanup};
use testkit::rng::SplitMix64;
use testkit::{require_root, require_tool, start_cluster, wait_until};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(120);
const SEED: u64 = 0xe474_add3;
/// `--resync-rate` of the added replica, bytes per second.
const RATE: u64 = 8 * MIB;
const RATE_ARG: &str = "8M";
/// Files of the second tree at most (the writer stops earlier once n3 is in sync).
const MAX_LIVE_FILES: u64 = 5000;
/// Pace of the second tree, so it spans the ~12 s copy instead of racing ahead of it.
const LIVE_FILES_PER_S: f64 = 300.0;
/// A `sync -f` after this many files of the second tree, so its data reaches the volume
/// while the copy runs (not only at the end).
const SYNC_EVERY: u64 = 100;

fn start() -> Option<Cluster> {
    start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])])
}

/// The base tree, written before the replica is added: (relative path, size) for 6
/// directories × 10 files, two of them 2–6 MiB, the others up to 64 KiB.
fn base_tree() -> Vec<(PathBuf, usize)> {
    let mut rng = SplitMix64::new(SEED);
    let mut files = Vec::new();
    for d in 0..6 {
        for f in 0..10u32 {
            let size = if f.is_multiple_of(5) {
                (2 << 20) + rng.below(4 << 20) as usize
            } else {
                1 + rng.below(64 << 10) as usize
            };
            files.push((PathBuf::from(format!("base/d{d}/f{f}.bin")), size));
        }
    }
    files
}

/// File `i` of the second tree: 200 files per directory, up to 24 KiB, every 199th one
/// 1–3 MiB.
fn live_file(i: u64) -> (PathBuf, usize) {
    let mut rng = SplitMix64::new(testkit::rng::mix64(SEED ^ i));
    let size = if i.is_multiple_of(199) {
        (1 << 20) + rng.below(2 << 20) as usize
    } else {
        1 + rng.below(24 << 10) as usize
    };
    (PathBuf::from(format!("live/d{}/f{i}.bin", i / 200)), size)
}

/// The content of a file: determined by its path.
fn content(path: &Path, size: usize) -> Vec<u8> {
    let h = path
        .to_string_lossy()
        .bytes()
        .fold(SEED, |h, b| testkit::rng::mix64(h ^ u64::from(b)));
    let mut buf = vec![0u8; size];
    SplitMix64::new(h).fill(&mut buf);
    buf
}

fn write_file(root: &Path, rel: &Path, size: usize) -> std::io::Result<()> {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent"))?;
    std::fs::write(&p, content(rel, size))
}

/// `sync -f` on the filesystem holding `path` (syncfs).
fn syncfs(path: &Path) -> Result<(), String> {
    let mut cmd = Command::new("sync");
    cmd.arg("-f").arg(path);
    let out = run_with_timeout(&mut cmd, T).map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(describe(&cmd, &out))
    }
}

/// The second tree, written on its own thread at [`LIVE_FILES_PER_S`] until stopped or
/// [`MAX_LIVE_FILES`] are written. Stops and joins on drop (also when the test panics, before
/// the cleanup unmounts the filesystem under it).
struct LiveWriter {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<u64, String>>>,
}

impl LiveWriter {
    fn start(mnt: &Path) -> LiveWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (s, w, mnt) = (stop.clone(), written.clone(), mnt.to_path_buf());
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut i = 0;
            while i < MAX_LIVE_FILES && !s.load(Ordering::SeqCst) {
                let (rel, size) = live_file(i);
                write_file(&mnt, &rel, size).map_err(|e| format!("{}: {e}", rel.display()))?;
                i += 1;
                if i.is_multiple_of(SYNC_EVERY) {
                    syncfs(&mnt)?;
                    // Only files synced count as written (they are on the volume).
                    w.store(i, Ordering::SeqCst);
                    let due = Duration::from_secs_f64(i as f64 / LIVE_FILES_PER_S);
                    let ahead = due.saturating_sub(t0.elapsed());
                    wait_until(ahead, || s.load(Ordering::SeqCst));
                }
            }
            syncfs(&mnt)?;
            w.store(i, Ordering::SeqCst);
            Ok(i)
        });
        LiveWriter {
            stop,
            written,
            handle: Some(handle),
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Stops the writer; returns how many files it wrote (all synced).
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let h = self.handle.take().expect("joined once");
        match h.join().expect("writer thread panicked") {
            Ok(n) => n,
            Err(e) => panic!("writing the second tree failed: {e}"),
        }
    }
}

impl Drop for LiveWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One progress sample of the added replica's copy.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Seconds since add-replica returned, at the middle of the `volume show` call.
    t: f64,
    copied: u64,
    /// Bytes actually moved (`blockwarden_replica_resynced_bytes_total`).
    moved: u64,
    total: u64,
    shown_rate: u64,
    eta: Option<u64>,
}

/// The copy rate over the steady part of `samples` (see the file's doc), with the window it
/// was measured over: (bytes per second, first sample, last sample).
fn steady_rate(samples: &[Sample]) -> Result<(f64, Sample, Sample), String> {
    let first = samples
        .iter()
        .find(|s| s.copied > 0)
        .ok_or("no sample shows any progress")?;
    let from = samples
        .iter()
        .find(|s| s.t >= first.t + 1.0)
        .ok_or("no sample 1 s after the first progress")?;
    let to = samples
        .iter()
        .rev()
        .find(|s| s.copied + 4 * MIB <= s.total)
        .ok_or("no sample 4 MiB before the end")?;
    if to.t - from.t < 5.0 {
        return Err(format!(
            "the steady part of the copy lasted {:.1} s, too short to measure (from {from:?} to {to:?})",
            to.t - from.t
        ));
    }
    let rate = (to.moved - from.moved) as f64 / (to.t - from.t);
    Ok((rate, *from, *to))
}

fn tools_available() -> bool {
    require_root()
        && [
            "nbdfuse",
            "fusermount3",
            "losetup",
            "mkfs.ext4",
            "fsck.ext4",
            "mount",
            "umount",
            "sync",
        ]
        .iter()
        .all(|t| require_tool(t))
}

#[test]
fn replica_added_under_an_ext4_file_tree_is_filled_at_the_set_rate_and_ends_identical() {
    if !tools_available() {
        return;
    }
    let Some(c) = start() else { return };
    let a = c.agent("n1");
    a.cli_ok(&[
        "volume",
        "create",
        "vm",
        "--size",
        "256M",
        "--replicas",
        "2",
        "--node",
        "n1",
        "--node",
        "n2",
    ]);
    let s = volume_show(a, "vm");
    assert_eq!(
        replica_states(&s),
        [
            ("n1".to_owned(), "in_sync".to_owned()),
            ("n2".to_owned(), "in_sync".to_owned())
        ],
        "{s}"
    );
    let id = s["id"].as_str().expect("volume id").to_owned();
    a.cli_ok(&["volume", "attach", "vm"]);
    let uri = a.nbd_uri("vm");
    let scratch = a.scratch_dir();
    let (fuse_dir, mnt) = (scratch.join("fuse"), scratch.join("mnt"));

    // Dropped before the cluster: unmounts, detaches the loop device, stops nbdfuse.
    let mut cleanup = Cleanup::new();
    let file = nbdfuse(&scratch, &fuse_dir, &uri, &mut cleanup);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 256 * MIB);
    let dev = losetup(&file, &mut cleanup);
    // No lazy initialisation: no background writes by ext4lazyinit after the mount.
    run_ok(
        Command::new("mkfs.ext4").args([
            "-F",
            "-q",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            &dev,
        ]),
        T,
    );
    mount(&dev, &mnt, &[], &mut cleanup);
    let t = Instant::now();
    for (rel, size) in base_tree() {
        write_file(&mnt, &rel, size).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
    }
    syncfs(&mnt).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("base tree written and synced in {:?}", t.elapsed());

    // The second tree goes on while n3 is added and filled.
    let writer = LiveWriter::start(&mnt);
    let out = a.cli_ok(&[
        "volume",
        "add-replica",
        "vm",
        "--node",
        "n3",
        "--resync-rate",
        RATE_ARG,
    ]);
    let t_add = Instant::now();
    let written_at_add = writer.written();
    eprintln!("add-replica: {}", out.trim());

    let mut samples: Vec<Sample> = Vec::new();
    let mut last = Value::Null;
    let mut in_sync_after = None;
    while t_add.elapsed() < Duration::from_secs(90) {
        let before = t_add.elapsed().as_secs_f64();
        let s = volume_show(a, "vm");
        let moved = replica_on(&s, "n3")
            .and_then(|r| r["id"].as_u64())
            .and_then(|id| {
                metric(
                    a,
                    "blockwarden_replica_resynced_bytes_total",
                    &format!("volume=\"vm\",replica=\"{id}\",node=\"n3\""),
                )
            })
            .map(|b| b as u64);
        let t = (before + t_add.elapsed().as_secs_f64()) / 2.0;
        if let Some(p) = replica_on(&s, "n3").map(|r| &r["resync"]) {
            if let (Some(copied), Some(total), Some(moved)) =
                (p["copied_bytes"].as_u64(), p["total_bytes"].as_u64(), moved)
            {
                samples.push(Sample {
                    t,
                    copied,
                    moved,
                    total,
                    shown_rate: p["rate_bytes_per_s"].as_u64().unwrap_or(0),
                    eta: p["eta_s"].as_u64(),
                });
            }
        }
        let done = all_in_sync(&s, 3);
        last = s;
        if done {
            in_sync_after = Some(t_add.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let written_at_sync = writer.written();
    let Some(in_sync_after) = in_sync_after else {
        panic!(
            "the three replicas are not in sync 90 s after add-replica: {last}\n\
             samples: {samples:?}\n--- n1 log tail ---\n{}\n--- n3 log tail ---\n{}",
            tail(&a.log(), 60),
            tail(&c.agent("n3").log(), 40)
        );
    };
    let live_files = writer.finish();
    eprintln!(
        "n3 in sync {in_sync_after:?} after add-replica; second tree: {written_at_add} files synced at the add, \
         {written_at_sync} when n3 was in sync, {live_files} in all"
    );
    for s in &samples {
        eprintln!("  sample {s:?}");
    }
    assert!(
        written_at_sync >= written_at_add + 2 * SYNC_EVERY,
        "the filesystem kept receiving files while n3 was filled ({written_at_add} -> {written_at_sync} synced)"
    );

    let total = samples.last().map_or(0, |s| s.total);
    assert_eq!(
        total,
        256 * MIB,
        "the added replica's copy covers the whole volume (holes as holes): {samples:?}"
    );
    let (rate, from, to) = steady_rate(&samples).unwrap_or_else(|e| panic!("{e}: {samples:?}"));
    eprintln!(
        "measured resync rate {:.2} MiB/s over {:.1} s ({:.0} MiB moved, {from:?} .. {to:?}); set {RATE_ARG}/s",
        rate / MIB as f64,
        to.t - from.t,
        (to.moved - from.moved) as f64 / MIB as f64
    );
    assert!(
        (rate - RATE as f64).abs() <= 0.10 * RATE as f64,
        "the resync rate {:.2} MiB/s is not within 10 % of the set {RATE_ARG}/s; samples: {samples:?}",
        rate / MIB as f64
    );
    // What `volume show` says about it: its rate (measured over the last 3 s) within 10 % once
    // the window lies inside the steady part, and an ETA.
    let shown: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.t >= from.t + 3.0 && s.t <= to.t)
        .collect();
    assert!(
        !shown.is_empty(),
        "no sample 3 s into the steady part: {samples:?}"
    );
    let mut shown_rates: Vec<u64> = shown.iter().map(|s| s.shown_rate).collect();
    shown_rates.sort_unstable();
    let median = shown_rates[shown_rates.len() / 2] as f64;
    assert!(
        (median - RATE as f64).abs() <= 0.10 * RATE as f64,
        "the rate `volume show` displays (median {:.2} MiB/s of {shown_rates:?}) is not within 10 % of {RATE_ARG}/s",
        median / MIB as f64
    );
    assert!(
        shown.iter().all(|s| s.eta.is_some()),
        "`volume show` gives an ETA while the copy moves: {shown:?}"
    );

    // The filesystem: clean, then every file read back through a fresh connection.
    run_ok(Command::new("umount").arg(&mnt), T);
    let mut fsck = Command::new("fsck.ext4");
    fsck.args(["-f", "-n", &dev]);
    let out = run_with_timeout(&mut fsck, T).unwrap();
    assert!(
        out.status.success(),
        "fsck found problems:\n{}",
        describe(&fsck, &out)
    );
    cleanup.run();

    let file = nbdfuse(&scratch, &fuse_dir, &uri, &mut cleanup);
    let dev = losetup(&file, &mut cleanup);
    mount(&dev, &mnt, &["-o", "ro"], &mut cleanup);
    let tree: Vec<(PathBuf, usize)> = base_tree()
        .into_iter()
        .chain((0..live_files).map(live_file))
        .collect();
    for (rel, size) in &tree {
        let got = std::fs::read(mnt.join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert!(
            got == content(rel, *size),
            "{} differs after remount",
            rel.display()
        );
    }
    eprintln!("{} files read back identical", tree.len());
    cleanup.run();

    // The FUSE and loop pieces are gone: nbdfuse closed its NBD connection.
    let mut s = Value::Null;
    let closed = wait_until(Duration::from_secs(10), || {
        s = volume_show(a, "vm");
        s["in_use_connections"].as_u64() == Some(0)
    });
    assert!(
        closed,
        "nbdfuse's NBD connection closed after the cleanup: {s}"
    );
    assert!(all_in_sync(&s, 3), "still in sync at the end: {s}");
    a.cli_ok(&["volume", "detach", "vm"]);
    let f1 = replica_file(a, &id);
    for n in ["n2", "n3"] {
        if let Err(e) = same_files(&f1, &replica_file(c.agent(n), &id)) {
            panic!("the replica on {n} differs from n1's: {e}");
        }
    }
}
