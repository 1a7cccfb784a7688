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
