//! The load generator against the in-memory fake server: a clean run verifies, a simulated
//! crash (unflushed writes dropped, or some kept) verifies, and a deliberately lost flushed
//! write is caught.

use super::*;
use crate::fake_nbd::FakeNbd;
use crate::TempDir;

const BS: usize = 4096;
const BLOCKS: u64 = 256;

fn run_load(srv: &FakeNbd, dir: &TempDir, max_writes: u64) -> (WriteSummary, PathBuf) {
    let st = dir.path().join("state");
    let mut o = WriteOptions::new(srv.uri(), &st);
    o.blocks = Some(BLOCKS);
    o.flush_every = 16;
    o.queue_depth = 8;
    o.max_writes = Some(max_writes);
    o.seed = 0xfeed;
    o.duration = Duration::from_secs(30);
    let sum = write(&o).unwrap();
    assert!(sum.error.is_none(), "{sum}");
    (sum, st)
}

#[test]
fn clean_run_verifies_over_nbd() {
    let dir = TempDir::new("lg").unwrap();
    let srv = FakeNbd::start("v", BS * BLOCKS as usize);
    let (sum, st) = run_load(&srv, &dir, 1000);
    assert_eq!(sum.writes_acked, 1000);
    // 1000 / 16 periodic flushes (at most one in flight at a time) plus the final one.
    assert!(sum.flushes >= 2, "{sum}");
    let state = State::load(&st).unwrap();
    assert_eq!(
        state.writes_acked, 1000,
        "final state covers every acked write"
    );
    let rep = verify(&VerifyOptions {
        uri: srv.uri(),
        state_path: st,
    })
    .unwrap();
    assert!(rep.ok(), "{rep}");
    assert_eq!(rep.zero_blocks + rep.written_blocks, BLOCKS);
    assert_eq!(
        rep.newer_than_durable, 0,
        "after the final flush nothing is newer"
    );
}

#[test]
fn crash_dropping_unflushed_writes_still_verifies() {
    let dir = TempDir::new("lg").unwrap();
    let srv = FakeNbd::start("v", BS * BLOCKS as usize);
    let (_, st) = run_load(&srv, &dir, 600);
    // Write more after the final state without flushing: those may be lost or kept.
    let mut c = NbdClient::connect_uri(&srv.uri()).unwrap();
    let state = State::load(&st).unwrap();
    let mut b = vec![0u8; BS];
    for blk in 0..20u64 {
        encode(&mut b, state.seed, blk, 1_000_000 + blk);
        c.write(blk * BS as u64, &b, false).unwrap();
    }
    for keep in [None, Some(1), Some(2)] {
        let img = srv.crash_image(BS, keep);
        let rep = verify_image(&img, &state);
        assert!(rep.ok(), "crash with keep={keep:?}: {rep}");
        let after = FakeNbd::with_image("v", img);
        let rep = verify(&VerifyOptions {
            uri: after.uri(),
            state_path: st.clone(),
        })
        .unwrap();
        assert!(rep.ok(), "{rep}");
    }
}

#[test]
fn a_lost_flushed_write_is_detected() {
    let dir = TempDir::new("lg").unwrap();
    let srv = FakeNbd::start("v", BS * BLOCKS as usize);
    let (_, st) = run_load(&srv, &dir, 500);
    let state = State::load(&st).unwrap();
    let victim = state.durable.iter().position(|&s| s != 0).unwrap();
    let mut img = srv.crash_image(BS, None);

    // Revert the victim block to zeroes: a lost write.
    img[victim * BS..(victim + 1) * BS].fill(0);
    let rep = verify_image(&img, &state);
    assert_eq!(rep.violation_count, 1, "{rep}");
    assert_eq!(rep.violations[0].block, victim as u64);
    assert!(rep.violations[0].what.contains("lost write"), "{rep}");

    // An older version of the block is just as lost.
    encode(
        &mut img[victim * BS..(victim + 1) * BS],
        state.seed,
        victim as u64,
        state.durable[victim] - 1,
    );
    let after = FakeNbd::with_image("v", img);
    let rep = verify(&VerifyOptions {
        uri: after.uri(),
        state_path: st,
    })
    .unwrap();
    assert!(!rep.ok());
    assert!(rep.to_string().contains("VERIFY FAILED"), "{rep}");
}

#[test]
fn server_going_away_is_reported_as_connection_lost() {
    let dir = TempDir::new("lg").unwrap();
    let srv = FakeNbd::start("v", BS * BLOCKS as usize);
    let st = dir.path().join("state");
    let mut o = WriteOptions::new(srv.uri(), &st);
    o.duration = Duration::from_secs(30);
    o.flush_every = 8;
    let done = Arc::new(AtomicU64::new(0));
    o.flushes_done = Some(done.clone());
    let h = std::thread::spawn(move || write(&o).unwrap());
    assert!(crate::wait_until(Duration::from_secs(20), || done
        .load(Ordering::SeqCst)
        >= 3));
    drop(srv); // stops serving: connection threads exit at their next request
    let sum = h.join().unwrap();
    assert!(sum.connection_lost, "{sum}");
    assert!(State::load(&st).unwrap().flushes >= 3);
}
