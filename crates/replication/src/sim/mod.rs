//! A seeded, deterministic simulation of the replication core under faults.
//!
//! One run: a volume of a few dozen blocks, 2 or 3 replicas, a client issuing writes,
//! flushes and reads, and for `fault_ms` simulated milliseconds a stream of faults; then the
//! faults heal and the run continues until every replica is back in sync, a final flush
//! succeeds, and the end checks pass. Everything random comes from one [`rng::Rng`] seeded
//! with the run's seed, so a seed replays exactly.
//!
//! - `client`: the client and the model of what it was promised (per-block floors).
//! - `world`: replicas (durable store + volatile cache that a crash partly loses), the
//!   catalog (generation-conditioned transactions, outages), the metadata store (fenced by
//!   generation), attachments (each a [`crate::Replicator`] plus its client), faults and the
//!   main loop.
//! - `driver`: what the async driver will do, simulated: effects become delayed, reordered
//!   messages on per-session connections; replicas execute them.
//!
//! Checkers (each failure names its seed):
//! - **G1**: at every takeover, every replica the catalog lists as in sync holds every write
//!   acknowledged durable (after a completed flush, or FUA) in its *durable* store; reads
//!   never return data older than that; at the end every replica does.
//! - **G2**: no replica accepts a write of a generation older than one it accepted before.
//! - **G4**: after healing, the run converges (all replicas in sync) and all replicas are
//!   identical block for block.
//! - **G5**: when an attachment starts serving, every replica it counts as in sync holds
//!   the same content in every block.
//! - The catalog's in-sync set is never empty.

mod client;
mod driver;
pub mod rng;
mod world;

use std::fmt;

use crate::config::Rules;

/// One simulation run's setup.
#[derive(Clone, Debug)]
pub struct SimParams {
    pub seed: u64,
    pub replicas: usize,
    /// `min_in_sync` of the attached volume.
    pub min_in_sync: usize,
    pub blocks: usize,
    pub block_size: u64,
    pub region_blocks: u64,
    /// Simulated milliseconds with faults.
    pub fault_ms: u64,
    /// Simulated milliseconds after the faults within which the run must converge.
    pub heal_limit_ms: u64,
    pub rules: Rules,
    /// Print every event, effect and fault to stderr (for replaying a failing seed).
    pub trace: bool,
}

impl SimParams {
    /// The standard run for `seed`: the replica count and `min_in_sync` vary with the seed.
    pub fn new(seed: u64) -> SimParams {
        let replicas = 2 + (seed % 2) as usize;
        SimParams {
            seed,
            replicas,
            min_in_sync: if replicas == 3 && seed % 5 == 1 { 2 } else { 1 },
            blocks: 64,
            block_size: 512,
            region_blocks: 4,
            fault_ms: 1_500,
            heal_limit_ms: 30_000,
            rules: Rules::default(),
            trace: false,
        }
    }
}

/// What happened in a run (to see that faults actually fired).
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub elapsed_ms: u64,
    pub writes_acked: u64,
    pub flushes_acked: u64,
    pub takeovers: u64,
    pub replica_crashes: u64,
    pub partitions: u64,
    pub io_errors: u64,
    pub catalog_outages: u64,
    /// Clean-detach quiesces sent to the current attachment (it keeps taking writes).
    pub quiesces: u64,
    pub regions_copied: u64,
    pub reconciles: u64,
}

/// A checker failed.
#[derive(Clone, Debug)]
pub struct Violation {
    pub seed: u64,
    pub at_ms: u64,
    /// Which guarantee: "G1", "G2", "G4", "G5", "catalog", "client".
    pub check: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} violated at {} ms: {} (replay with BW_SIM_SEED={})",
            self.seed, self.check, self.at_ms, self.detail, self.seed
        )
    }
}

/// Runs one seed.
pub fn run(params: &SimParams) -> Result<SimReport, Violation> {
    world::World::new(params.clone()).run()
}
