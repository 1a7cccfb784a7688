//! Unit tests of the replication-metadata area: round trip, fencing by generation and
//! session, the size limit, torn writes (simulated by writing a prefix and reopening),
//! corruption, the older single-blob format, and a failing write.

use std::fs;
use std::sync::Arc;

use super::*;
use crate::crc::{crc32c_update, CRC_INIT};
use crate::replica::{ReplicaOptions, META_SUFFIX};
use crate::testing::{TempDir, VolatileBackend};
use crate::LocalVolume;

fn open(meta: &Path) -> Replica {
    let volume =
        LocalVolume::with_backend(Arc::new(VolatileBackend::new()), 4096, Default::default());
    Replica::open(volume, meta, ReplicaOptions::default()).unwrap()
}

fn fresh(dir: &TempDir) -> PathBuf {
    let meta = dir.path().join(format!("v.img{META_SUFFIX}"));
    Replica::create_meta(&meta).unwrap();
    meta
}

// Goal: never written → None; written → the same bytes, across a reopen; an empty blob is
// not "none"; the file sits next to the volume file as `<volume file>.repl`.
#[test]
fn round_trip_and_none() {
    let dir = TempDir::new("repl").unwrap();
    let meta = fresh(&dir);
    let r = open(&meta);
    assert_eq!(r.repl_meta_path(), dir.path().join("v.img.repl"));
    assert_eq!(
        r.repl_meta_path(),
        crate::default_repl_meta_path(&dir.path().join("v.img"))
    );
    assert_eq!(r.read_repl_meta().unwrap(), None);
    r.admit_session(Generation(3), 1).unwrap();
    r.write_repl_meta(Generation(3), 1, b"").unwrap();
    assert_eq!(r.read_repl_meta().unwrap(), Some(Vec::new()));
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    r.write_repl_meta(Generation(3), 1, &blob).unwrap();
    drop(r);
    assert_eq!(open(&meta).read_repl_meta().unwrap(), Some(blob));
}

// Goal: a write of an older generation or of an older session of the highest generation is
// refused and leaves the file untouched.
#[test]
fn fenced_writes_are_refused() {
    let dir = TempDir::new("repl").unwrap();
    let r = open(&fresh(&dir));
    r.admit_session(Generation(4), 2).unwrap();
    r.write_repl_meta(Generation(4), 2, b"good").unwrap();
    let err = r
        .write_repl_meta(Generation(4), 1, b"old session")
        .unwrap_err();
    assert!(
        matches!(
            err,
            ReplMetaError::Fenced {
                highest: Generation(4)
            }
        ),
        "{err}"
    );
    r.admit(Generation(5)).unwrap();
    let err = r.write_repl_meta(Generation(4), 2, b"old gen").unwrap_err();
    assert_eq!(
        err.to_string(),
        "fenced: the replica's highest generation is 5"
    );
    assert!(matches!(
        err,
        ReplMetaError::Fenced {
            highest: Generation(5)
        }
    ));
    assert_eq!(r.read_repl_meta().unwrap(), Some(b"good".to_vec()));
}

// Goal: the limit is inclusive, and one byte more is refused with a clear error before
// anything is written.
#[test]
fn oversize_blob_refused() {
    let dir = TempDir::new("repl").unwrap();
    let r = open(&fresh(&dir));
    let max = vec![7u8; MAX_REPL_META_BYTES];
    r.write_repl_meta(Generation(0), 0, &max).unwrap();
    let big = vec![8u8; MAX_REPL_META_BYTES + 1];
    let err = r.write_repl_meta(Generation(0), 0, &big).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "replication metadata of {} bytes exceeds the limit of {} bytes",
            MAX_REPL_META_BYTES + 1,
            MAX_REPL_META_BYTES
        )
    );
    assert_eq!(
        r.read_repl_meta().unwrap().map(|b| b.len()),
        Some(MAX_REPL_META_BYTES)
    );
}

// Goal: a crash in the middle of a slot write (torn: any prefix of header and blob on
// disk) leaves the previous blob readable, after a reopen too; the next write after the
// crash goes to the same torn slot, never over the last good one.
#[test]
fn torn_writes_keep_the_previous_blob() {
    let dir = TempDir::new("repl").unwrap();
    let meta = fresh(&dir);
    let r = open(&meta);
    r.write_repl_meta(Generation(0), 0, b"one").unwrap();
    r.write_repl_meta(Generation(0), 0, b"two").unwrap();
    let total = REPL_META_HEADER_LEN + b"three".len();
    for keep in [1, 8, 40, REPL_META_HEADER_LEN, total - 1] {
        let r = open(&meta);
        assert_eq!(r.read_repl_meta().unwrap(), Some(b"two".to_vec()), "{keep}");
        r.write_repl_meta_faulty(Generation(0), 0, b"three", Some(SlotFault::Crash { keep }))
            .unwrap();
        assert_eq!(r.read_repl_meta().unwrap(), Some(b"two".to_vec()), "{keep}");
        drop(r);
        assert_eq!(open(&meta).read_repl_meta().unwrap(), Some(b"two".to_vec()));
    }
    // A whole write that was not acknowledged may or may not count: here it reached the
    // page cache whole, so it is the newest.
    let r = open(&meta);
    r.write_repl_meta_faulty(
        Generation(0),
        0,
        b"three",
        Some(SlotFault::Crash { keep: total }),
    )
    .unwrap();
    drop(r);
    let r = open(&meta);
    assert_eq!(r.read_repl_meta().unwrap(), Some(b"three".to_vec()));
    // Many writes alternate between two slots: the file never grows past two slots.
    for i in 0..10u8 {
        r.write_repl_meta(Generation(0), 0, &[i; 100]).unwrap();
        assert_eq!(r.read_repl_meta().unwrap(), Some(vec![i; 100]));
    }
    let len = fs::metadata(r.repl_meta_path()).unwrap().len();
    assert_eq!(len, REPL_META_SLOT_SPAN + REPL_META_HEADER_LEN as u64 + 100);
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        2,
        "meta + repl, no temp"
    );
}

// Goal: a damaged slot is reported as corrupt when no valid slot remains, never returned as
// a blob; next to a valid slot it is ignored (that is what a torn write looks like).
#[test]
fn corrupt_file_refused() {
    let dir = TempDir::new("repl").unwrap();
    let r = open(&fresh(&dir));
    r.write_repl_meta(Generation(0), 0, b"blob bytes").unwrap();
    let good = fs::read(r.repl_meta_path()).unwrap();
    let check = |bytes: &[u8], want: &str| {
        fs::write(r.repl_meta_path(), bytes).unwrap();
        let err = r.read_repl_meta().unwrap_err();
        assert!(matches!(err, ReplicaError::MetaCorrupt { .. }), "{err}");
        assert!(err.to_string().contains(want), "{err}");
    };
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    check(&flipped, "checksum mismatch");
    check(&good[..good.len() - 1], "9 blob bytes instead of 10");
    check(&good[..20], "slot 0: 20 bytes, shorter than its header");
    check(&[1u8; 80], "bad magic");
    let mut huge = good.clone();
    huge[40..48].copy_from_slice(&u64::MAX.to_be_bytes());
    check(&huge, "exceeds");
    let mut version = good.clone();
    version[11] = 9;
    check(&version, "unknown format version 9");
    // An empty file (created, never written) and a hole-only file are "never written".
    fs::write(r.repl_meta_path(), b"").unwrap();
    assert_eq!(r.read_repl_meta().unwrap(), None);
    fs::write(r.repl_meta_path(), [0u8; 4096]).unwrap();
    assert_eq!(r.read_repl_meta().unwrap(), None);
    // A damaged slot 1 beside a valid slot 0: the valid one.
    let mut both = good.clone();
    both.resize(REPL_META_SLOT_SPAN as usize, 0);
    both.extend_from_slice(&[0xee; 100]);
    fs::write(r.repl_meta_path(), &both).unwrap();
    assert_eq!(r.read_repl_meta().unwrap(), Some(b"blob bytes".to_vec()));
}

// Goal: a blob written by an older build (format 1: one blob, 48-byte header) is read as
// the oldest blob, and the first write of this build does not overwrite it until the new
// slot is durable.
#[test]
fn format_1_file_is_read_and_upgraded() {
    let dir = TempDir::new("repl").unwrap();
    let meta = fresh(&dir);
    let blob = b"written by 0.1";
    let mut v1 = Vec::new();
    v1.extend_from_slice(b"BWREPLM\n");
    v1.extend_from_slice(&1u32.to_be_bytes());
    v1.extend_from_slice(&[0; 4]);
    v1.extend_from_slice(&7u64.to_be_bytes());
    v1.extend_from_slice(&1u64.to_be_bytes());
    v1.extend_from_slice(&(blob.len() as u64).to_be_bytes());
    let crc = !crc32c_update(crc32c_update(CRC_INIT, &v1), blob);
    v1.extend_from_slice(&crc.to_be_bytes());
    v1.extend_from_slice(&[0; 4]);
    v1.extend_from_slice(blob);
    let r = open(&meta);
    fs::write(r.repl_meta_path(), &v1).unwrap();
    assert_eq!(r.read_repl_meta().unwrap(), Some(blob.to_vec()));
    r.write_repl_meta_faulty(
        Generation(0),
        0,
        b"new",
        Some(SlotFault::Crash { keep: 30 }),
    )
    .unwrap();
    assert_eq!(open(&meta).read_repl_meta().unwrap(), Some(blob.to_vec()));
    let r = open(&meta);
    r.write_repl_meta(Generation(0), 0, b"new").unwrap();
    assert_eq!(open(&meta).read_repl_meta().unwrap(), Some(b"new".to_vec()));
    r.write_repl_meta(Generation(0), 0, b"newer").unwrap();
    assert_eq!(
        open(&meta).read_repl_meta().unwrap(),
        Some(b"newer".to_vec())
    );
}

// Goal: a write that fails returns an I/O error and leaves the old blob; the next write
// goes to the failed slot again, so the last durable blob is never overwritten.
#[test]
fn failed_write_returns_error_and_keeps_old_blob() {
    let dir = TempDir::new("repl").unwrap();
    let meta = fresh(&dir);
    let r = open(&meta);
    r.write_repl_meta(Generation(0), 0, b"old").unwrap();
    for keep in [0, 20] {
        let err = r
            .write_repl_meta_faulty(Generation(0), 0, b"new", Some(SlotFault::Fail { keep }))
            .unwrap_err();
        assert!(matches!(err, ReplMetaError::Io(_)), "{err}");
        assert_eq!(r.read_repl_meta().unwrap(), Some(b"old".to_vec()));
    }
    // The replica itself is not fail-stopped by a metadata failure: the driver decides.
    // This write goes to the slot that failed; a crash in it still leaves "old".
    r.write_repl_meta_faulty(
        Generation(0),
        0,
        b"again",
        Some(SlotFault::Crash { keep: 10 }),
    )
    .unwrap();
    assert_eq!(open(&meta).read_repl_meta().unwrap(), Some(b"old".to_vec()));
    r.write_repl_meta(Generation(0), 0, b"again").unwrap();
    assert_eq!(
        open(&meta).read_repl_meta().unwrap(),
        Some(b"again".to_vec())
    );
    // An unwritable file is an I/O error on the first write of a replica.
    let dir2 = TempDir::new("repl").unwrap();
    let r2 = open(&fresh(&dir2));
    fs::create_dir(r2.repl_meta_path()).unwrap();
    let err = r2.write_repl_meta(Generation(0), 0, b"x").unwrap_err();
    assert!(matches!(err, ReplMetaError::Io(_)), "{err}");
}

// Goal: concurrent writers are serialised: the file always holds one complete blob.
#[test]
fn concurrent_writes_serialised() {
    let dir = TempDir::new("repl").unwrap();
    let r = Arc::new(open(&fresh(&dir)));
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let r = Arc::clone(&r);
            std::thread::spawn(move || {
                for _ in 0..5 {
                    r.write_repl_meta(Generation(0), 0, &vec![i; 10_000])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let blob = r.read_repl_meta().unwrap().unwrap();
    assert_eq!(blob.len(), 10_000);
    assert!(blob.iter().all(|&b| b == blob[0]));
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        2,
        "meta + repl, no temp"
    );
}

// Goal: the `.meta` → `.repl` path rule.
#[test]
fn repl_path_from_meta_path() {
    assert_eq!(
        default_repl_meta_path_for(Path::new("/d/v.img.meta")),
        PathBuf::from("/d/v.img.repl")
    );
    assert_eq!(
        default_repl_meta_path_for(Path::new("/d/other")),
        PathBuf::from("/d/other.repl")
    );
}
