//! Unit tests of the replication-metadata area: round trip, fencing by generation and
//! session, the size limit, every crash point of the write (simulated by stopping the
//! write after a step and reopening), corruption, and a failing write.

use std::fs;
use std::sync::Arc;

use super::*;
use crate::meta_file::temp_path;
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

// Goal: a crash after the temporary file was written leaves the old blob and a stale
// temporary file, which open (and the startup sweep) deletes; after the rename the new
// blob is there.
#[test]
fn write_crash_points() {
    let dir = TempDir::new("repl").unwrap();
    let meta = fresh(&dir);
    let r = open(&meta);
    r.write_repl_meta(Generation(0), 0, b"one").unwrap();
    r.write_repl_meta_stopping(Generation(0), 0, b"two", Some(StopAfter::TempWritten))
        .unwrap();
    let tmp = temp_path(r.repl_meta_path());
    assert_eq!(tmp.file_name().unwrap(), ".v.img.repl.tmp");
    assert!(tmp.exists());
    drop(r);
    let r = open(&meta);
    assert!(!tmp.exists(), "open removed the stale temporary file");
    assert_eq!(r.read_repl_meta().unwrap(), Some(b"one".to_vec()));
    r.write_repl_meta_stopping(Generation(0), 0, b"three", Some(StopAfter::Renamed))
        .unwrap();
    drop(r);
    let r = open(&meta);
    assert_eq!(r.read_repl_meta().unwrap(), Some(b"three".to_vec()));
    r.write_repl_meta_stopping(Generation(0), 0, b"four", Some(StopAfter::TempWritten))
        .unwrap();
    assert_eq!(crate::remove_temp_files(dir.path()).unwrap(), 1);
    assert_eq!(r.read_repl_meta().unwrap(), Some(b"three".to_vec()));
}

// Goal: a damaged file is reported as corrupt, never returned as a blob.
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
    check(&good[..20], "shorter than its 48-byte header");
    check(&[0u8; 60], "bad magic");
    let mut huge = good.clone();
    huge[32..40].copy_from_slice(&u64::MAX.to_be_bytes());
    check(&huge, "exceeds");
}

// Goal: a write that cannot complete returns an I/O error and leaves the old blob.
#[test]
fn failed_write_returns_error_and_keeps_old_blob() {
    let dir = TempDir::new("repl").unwrap();
    let r = open(&fresh(&dir));
    r.write_repl_meta(Generation(0), 0, b"old").unwrap();
    // Make the temporary file impossible to create: a directory in its place.
    let tmp = temp_path(r.repl_meta_path());
    fs::create_dir(&tmp).unwrap();
    let err = r.write_repl_meta(Generation(0), 0, b"new").unwrap_err();
    assert!(matches!(err, ReplMetaError::Io(_)), "{err}");
    fs::remove_dir(&tmp).unwrap();
    assert_eq!(r.read_repl_meta().unwrap(), Some(b"old".to_vec()));
    // The replica itself is not fail-stopped by a metadata failure: the driver decides.
    r.write_repl_meta(Generation(0), 0, b"again").unwrap();
    assert_eq!(r.read_repl_meta().unwrap(), Some(b"again".to_vec()));
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
