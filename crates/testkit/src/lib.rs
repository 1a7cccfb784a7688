//! Shared helpers for blockwarden's end-to-end tests and the `bw-loadgen` tool.
//!
//! - [`agent`]: spawn the real `blockwarden` binary on a fresh data dir and free ports, wait
//!   for its ready line, kill it (`kill9`), stop it (SIGTERM), restart it on the same data dir,
//!   and drive its CLI. Dropping an [`Agent`] kills the process and removes its temp dir.
//! - [`cluster`]: multi-host tests on one machine: network namespaces on a bridge, nftables
//!   faults, a real etcd cluster and cluster-mode agents in their namespaces.
//! - [`cmd`]: run outside tools (qemu-img, fio, …) with a deadline and readable failures;
//!   [`cmd::require_tool`] decides whether a test can run (skip loudly, or panic under `CI`).
//! - [`e2e`]: [`start_agent!`], test files, checksums and [`e2e::Cleanup`] guards.
//! - [`wait`]: [`wait_until`], the polling helper used instead of bare sleeps.
//! - [`tempdir`]: a self-deleting temp directory that survives a failing test for inspection.
//! - [`nbd`]: a minimal synchronous NBD client (fixed newstyle, `OPT_GO`, simple replies,
//!   pipelined requests by handle), self-contained so it does not share bugs with our server.
//! - [`raw`]: send arbitrary bytes on a TCP connection and read with a timeout (bad input).
//! - [`http`]: a bare HTTP/1.1 client over `TcpStream` for API tests that need exact bytes.
//! - [`loadgen`]: the verifying load generator: self-describing blocks, a durable state file
//!   updated after every completed FLUSH, and the verifier that checks it after a crash.
//! - [`fake_nbd`]: an in-memory NBD server with a volatile cache, to test the client and the
//!   load generator themselves (including a simulated crash that drops unflushed writes).
//! - [`rng`]: a small seeded PRNG (SplitMix64) so runs are reproducible from their seed.

pub mod agent;
pub mod cluster;
pub mod cmd;
pub mod e2e;
pub mod fake_nbd;
pub mod http;
pub mod loadgen;
pub mod nbd;
pub mod raw;
pub mod rng;
pub mod tempdir;
pub mod wait;

pub use agent::{Agent, AgentOptions};
pub use cmd::{require_root, require_tool, run_with_timeout};
pub use tempdir::TempDir;
pub use wait::wait_until;
