//! Unit tests of the replica fence: persistence, refusal, concurrency, the drain, and every
//! crash point of the metadata write (simulated by stopping `write_meta` after a step and
//! reopening).

use super::*;
use crate::testing::{TempDir, VolatileBackend};
use bw_types::IoReply;
use std::sync::mpsc;

fn volume(size: u64) -> LocalVolume {
    LocalVolume::with_backend(Arc::new(VolatileBackend::new()), size, Default::default())
}

fn open(meta: &Path) -> Replica {
    Replica::open(volume(1 << 20), meta, ReplicaOptions::default()).unwrap()
}

fn fresh(dir: &TempDir) -> PathBuf {
    let meta = dir.path().join("v.img.meta");
    assert!(Replica::create_meta(&meta).unwrap());
    assert!(
        !Replica::create_meta(&meta).unwrap(),
        "second create keeps the file"
    );
    meta
}

fn run(r: &Replica, g: u64, req: IoRequest) -> Result<IoReply, IoError> {
    let (tx, rx) = mpsc::channel();
    r.submit(
        Generation(g),
        req,
        Box::new(move |res| tx.send(res).unwrap()),
    );
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

fn write(offset: u64, byte: u8) -> IoRequest {
    IoRequest::Write {
        offset,
        data: vec![byte; 512].into(),
        fua: false,
    }
}

// Goal: the highest generation survives a reopen; equal is admitted, lower refused.
#[test]
fn highest_generation_persists_across_reopen() {
    let dir = TempDir::new("replica").unwrap();
    let meta = fresh(&dir);
    let r = open(&meta);
    assert_eq!(r.highest(), Generation(0));
    assert_eq!(r.admit(Generation(7)).unwrap(), Generation(7));
    drop(r);
    let r = open(&meta);
    assert_eq!(r.highest(), Generation(7));
    r.admit(Generation(7)).unwrap();
    let err = r.admit(Generation(6)).unwrap_err();
    assert!(
        matches!(
            err,
            AdmitError::Fenced(Fenced {
                generation: Generation(6),
                highest: Generation(7),
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(err.to_string(), "fenced: generation 6 < 7");
}

// Goal: requests of an older generation fail from the moment a newer one was admitted.
#[test]
fn lower_generation_requests_refused_after_newer_admit() {
    let dir = TempDir::new("replica").unwrap();
    let r = open(&fresh(&dir));
    r.admit(Generation(5)).unwrap();
    assert_eq!(run(&r, 5, write(0, 1)), Ok(IoReply::Done));
    r.admit(Generation(6)).unwrap();
    assert_eq!(
        run(&r, 5, write(0, 2)),
        Err(IoError::Faulted("fenced: generation 5 < 6".into()))
    );
    assert_eq!(run(&r, 6, write(512, 3)), Ok(IoReply::Done));
    match run(
        &r,
        6,
        IoRequest::Read {
            offset: 0,
            len: 1024,
        },
    ) {
        Ok(IoReply::Data(d)) => {
            assert!(
                d[..512].iter().all(|&b| b == 1),
                "gen 5's refused write did not land"
            );
            assert!(d[512..].iter().all(|&b| b == 3));
        }
        other => panic!("{other:?}"),
    }
}

// Goal: a missing or corrupt metadata file refuses the open (never a guessed generation).
#[test]
fn missing_or_corrupt_meta_refuses_open() {
    let dir = TempDir::new("replica").unwrap();
    let meta = dir.path().join("none.meta");
    let err = Replica::open(volume(4096), &meta, ReplicaOptions::default()).unwrap_err();
    assert!(matches!(err, ReplicaError::MetaMissing { .. }), "{err}");
    let meta = fresh(&dir);
    write_meta(&meta, 9, None).unwrap();
    let good = fs::read(&meta).unwrap();
    let corrupt = |bytes: &[u8], want: &str| {
        fs::write(&meta, bytes).unwrap();
        let err = Replica::open(volume(4096), &meta, ReplicaOptions::default()).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    };
    let mut flipped = good.clone();
    flipped[20] ^= 0x40; // the generation: only the checksum notices
    corrupt(&flipped, "checksum mismatch");
    corrupt(&good[..31], "31 bytes");
    corrupt(&[good.clone(), vec![0]].concat(), "33 bytes");
    corrupt(&[0u8; 32], "bad magic");
    let mut v2 = encode_meta(9);
    v2[11] = 2;
    let crc = crc32c(&v2[..28]);
    v2[28..].copy_from_slice(&crc.to_be_bytes());
    corrupt(&v2, "unknown format version 2");
}

// Goal: a crash after the temporary file was written leaves the old value and a stale
// temporary file, which open deletes; a crash after the rename leaves the new value.
#[test]
fn meta_write_crash_points() {
    let dir = TempDir::new("replica").unwrap();
    let meta = fresh(&dir);
    write_meta(&meta, 3, None).unwrap();
    write_meta(&meta, 4, Some(StopAfter::TempWritten)).unwrap();
    let tmp = temp_path(&meta);
    assert!(tmp.exists(), "temporary file left behind");
    let r = open(&meta);
    assert_eq!(
        r.highest(),
        Generation(3),
        "an unrenamed temp file is never the truth"
    );
    assert!(!tmp.exists(), "open removed the stale temporary file");
    drop(r);
    assert_eq!(tmp.file_name().unwrap(), ".v.img.meta.tmp");
    assert_eq!(crate::remove_temp_files(dir.path()).unwrap(), 0);

    write_meta(&meta, 5, Some(StopAfter::Renamed)).unwrap();
    assert_eq!(open(&meta).highest(), Generation(5));
    // The agent's startup sweep also cleans a leftover temp file.
    write_meta(&meta, 6, Some(StopAfter::TempWritten)).unwrap();
    assert_eq!(crate::remove_temp_files(dir.path()).unwrap(), 1);
    assert_eq!(open(&meta).highest(), Generation(5));
}

// Goal: a failed metadata write fail-stops the fence: everything is refused until reopen.
#[test]
fn failed_meta_write_fail_stops() {
    let dir = TempDir::new("replica").unwrap();
    let meta = fresh(&dir);
    let r = open(&meta);
    r.admit(Generation(2)).unwrap();
    // Make the temporary file impossible to create: a directory in its place.
    fs::create_dir(temp_path(&meta)).unwrap();
    let err = r.admit(Generation(3)).unwrap_err();
    assert!(matches!(err, AdmitError::Persist { .. }), "{err}");
    assert!(matches!(r.admit(Generation(4)), Err(AdmitError::Fenced(_))));
    let res = run(&r, 2, write(0, 1));
    assert!(
        matches!(&res, Err(IoError::Faulted(m)) if m.contains("fail-stop")),
        "{res:?}"
    );
    fs::remove_dir(temp_path(&meta)).unwrap();
    drop(r);
    assert_eq!(
        open(&meta).highest(),
        Generation(2),
        "the file says what became durable"
    );
}

// Goal: concurrent admits of many generations end with the maximum, durably, and each
// admit's answer is consistent with the order in which they were serialised.
#[test]
fn concurrent_admits() {
    let dir = TempDir::new("replica").unwrap();
    let meta = fresh(&dir);
    let r = Arc::new(open(&meta));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (1..=16u64)
        .map(|g| {
            let (r, seen) = (Arc::clone(&r), Arc::clone(&seen));
            std::thread::spawn(move || {
                let res = r.admit(Generation(g)).is_ok();
                seen.lock().unwrap().push((g, res));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(r.highest(), Generation(16));
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().any(|&(g, ok)| g == 16 && ok),
        "the maximum is always admitted"
    );
    drop(r);
    assert_eq!(open(&meta).highest(), Generation(16));
}

// Goal: the advance callback sees every raise once, with the previous value.
#[test]
fn advance_callback_reports_raises() {
    let dir = TempDir::new("replica").unwrap();
    let meta = fresh(&dir);
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    let options = ReplicaOptions {
        on_advance: Some(Arc::new(move |a: Generation, b: Generation| {
            l.lock().unwrap().push((a.0, b.0))
        })),
    };
    let r = Arc::new(Replica::open(volume(4096), &meta, options).unwrap());
    let dev5 = r.device_for(Generation(5)).unwrap();
    assert!(!dev5.is_fenced());
    r.admit(Generation(5)).unwrap();
    let dev9 = r.device_for(Generation(9)).unwrap();
    assert!(dev5.is_fenced() && !dev9.is_fenced());
    assert!(r.device_for(Generation(8)).is_err());
    assert_eq!(*log.lock().unwrap(), vec![(0, 5), (5, 9)]);
    assert_eq!(BlockDevice::size_bytes(&*dev9), 4096);
}

// Goal: the session floor is a lexicographic floor on (generation, session): lower sessions
// of the highest generation are refused (admission and requests), session 0 included once
// a floor exists, and a new generation starts with a fresh floor.
#[test]
fn session_floor_fences_older_sessions_and_resets_with_generation() {
    let dir = TempDir::new("replica").unwrap();
    let r = Arc::new(open(&fresh(&dir)));
    let s1 = r.device_for_session(Generation(5), 1).unwrap();
    let old_style = Arc::new(ReplicaDevice {
        replica: Arc::clone(&r),
        generation: Generation(5),
        session: 0,
    });
    assert_eq!(r.session_floor(), 1);
    assert!(old_style.is_fenced(), "session 0 is below any raised floor");
    let err = r.admit(Generation(5)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "fenced: session 0 of generation 5 < session 1"
    );
    assert_eq!(
        run(&r, 5, write(0, 1)),
        Err(IoError::Faulted(
            "fenced: session 0 of generation 5 < session 1".into()
        ))
    );
    assert_eq!(
        BlockDevice::size_bytes(&s1),
        1 << 20,
        "the device serves the volume"
    );
    let (tx, rx) = mpsc::channel();
    s1.submit(write(0, 1), Box::new(move |res| tx.send(res).unwrap()));
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        Ok(IoReply::Done)
    );

    // Session 2 fences session 1; re-admitting session 2 (a second connection) is fine.
    let s2 = r.device_for_session(Generation(5), 2).unwrap();
    r.admit_session(Generation(5), 2).unwrap();
    let f = s1.fenced().expect("session 1 fenced");
    assert!(f.is_stale_session(), "{f:?}");
    assert_eq!((f.highest, f.floor, f.session), (Generation(5), 2, 1));
    assert!(!s2.is_fenced());
    let err = r.admit_session(Generation(5), 1).unwrap_err();
    assert!(
        matches!(err, AdmitError::Fenced(f) if f.is_stale_session()),
        "{err}"
    );

    // A new generation (even with a lower session number) resets the floor.
    let g6 = r.device_for_session(Generation(6), 1).unwrap();
    assert_eq!((r.highest(), r.session_floor()), (Generation(6), 1));
    let f = s2.fenced().expect("generation 5 fenced");
    assert!(!f.is_stale_session());
    assert_eq!(f.to_string(), "fenced: generation 5 < 6");
    assert!(!g6.is_fenced());
    r.admit_session(Generation(7), 0).unwrap();
    assert_eq!(r.session_floor(), 0);
    assert!(g6.is_fenced());
    // The floor is not persisted: after a reopen only the generation counts.
    let meta = r.meta_path().to_path_buf();
    drop((s1, s2, g6, old_style, r));
    let r = open(&meta);
    assert_eq!((r.highest(), r.session_floor()), (Generation(7), 0));
}
