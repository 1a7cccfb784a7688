//! The verifying load generator behind `bw-loadgen`.
//!
//! Data flow: [`write`] picks blocks in a seeded random order, fills each with a
//! self-describing pattern ([`block`]: magic, seed, block index, sequence number, then a
//! deterministic fill from those), keeps `queue_depth` WRITEs in flight on one NBD connection,
//! sends a FLUSH every `flush_every` writes, and when a FLUSH completes atomically rewrites the
//! [`state`] file with, per block, the newest sequence number acknowledged *before that FLUSH
//! was sent* — exactly what the NBD spec makes durable. [`verify`] reads every block back and
//! checks that each one decodes to its own index with a sequence number at least the durable
//! one (or is all zeroes if it was never durably written).
//!
//! Invariant that makes the check sound: two writes to the same block are never in flight at
//! once, so a block's acknowledged sequence numbers only grow.

pub mod block;
pub mod run;
pub mod state;

pub use block::{check_block, decode, encode, BlockContent, Violation};
pub use run::{
    verify, verify_image, write, VerifyOptions, VerifyReport, WriteOptions, WriteSummary,
};
pub use state::State;

/// A write load on its own thread, and its count of completed flushes.
pub type Background = (
    std::thread::JoinHandle<Result<WriteSummary, String>>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
);

/// The fault tests' load on its own thread: 4 KiB writes over the first `bytes` of `uri`,
/// 8 in flight, a flush every 32 writes, for `duration`; its state file is `state`.
pub fn spawn_write(
    uri: &str,
    state: &std::path::Path,
    bytes: u64,
    seed: u64,
    duration: std::time::Duration,
) -> Background {
    let mut o = WriteOptions::new(uri, state);
    o.blocks = Some(bytes / 4096);
    o.flush_every = 32;
    o.queue_depth = 8;
    o.seed = seed;
    o.duration = duration;
    let flushes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    o.flushes_done = Some(flushes.clone());
    (std::thread::spawn(move || write(&o)), flushes)
}

/// Verifies every flushed block of the load recorded in `state` through `uri`; panics
/// with the report if any is lost or nothing was written.
#[track_caller]
pub fn verify_ok(uri: &str, state: &std::path::Path) {
    let rep = verify(&VerifyOptions {
        uri: uri.to_owned(),
        state_path: state.to_owned(),
    })
    .expect("verify ran");
    eprint!("{rep}");
    assert!(rep.ok(), "flushed data lost:\n{rep}");
    assert!(rep.durable_blocks > 0, "the test wrote something: {rep}");
}
