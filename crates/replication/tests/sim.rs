//! The seeded simulation of the replication core (see `replication::sim`).
//!
//! Goal: the core keeps G1, G2, G4 and G5 under crashes, partitions, reordering, I/O errors,
//! catalog outages and takeovers; and the checkers have teeth (a broken rule is caught).
//! Method: run many seeds; `BW_SIM_SEEDS=n` runs more, `BW_SIM_SEED=s` replays one seed.

use std::time::Instant;

use replication::sim::{run, SimParams};
use replication::Rules;

/// Seeds run by default: enough to exercise every fault many times, within the test budget
/// (about 7 s in the dev profile on the 2-core reference machine).
const DEFAULT_SEEDS: u64 = 1000;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

#[test]
fn seeds_hold_every_guarantee() {
    if let Some(seed) = env_u64("BW_SIM_SEED") {
        let params = SimParams {
            trace: std::env::var_os("BW_SIM_TRACE").is_some(),
            ..SimParams::new(seed)
        };
        match run(&params) {
            Ok(r) => println!("seed {seed} passed: {r:?}"),
            Err(v) => panic!("{v}"),
        }
        return;
    }
    let seeds = env_u64("BW_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let start = Instant::now();
    let mut totals = replication::sim::SimReport::default();
    for seed in 0..seeds {
        match run(&SimParams::new(seed)) {
            Ok(r) => {
                totals.writes_acked += r.writes_acked;
                totals.flushes_acked += r.flushes_acked;
                totals.takeovers += r.takeovers;
                totals.replica_crashes += r.replica_crashes;
                totals.partitions += r.partitions;
                totals.io_errors += r.io_errors;
                totals.catalog_outages += r.catalog_outages;
                totals.quiesces += r.quiesces;
                totals.regions_copied += r.regions_copied;
                totals.reconciles += r.reconciles;
            }
            Err(v) => panic!("{v}"),
        }
    }
    println!(
        "{seeds} seeds passed in {:.1?}: {totals:?}",
        start.elapsed()
    );
}

/// Runs seeds with `rules` until one fails; returns the violation, or panics if none of
/// `max_seeds` seeds catches the broken rule (the checkers would have no teeth).
fn first_violation(rules: Rules, max_seeds: u64) -> replication::sim::Violation {
    for seed in 0..max_seeds {
        if let Err(v) = run(&SimParams {
            rules,
            ..SimParams::new(seed)
        }) {
            println!("caught: {v}");
            return v;
        }
    }
    panic!("no seed of {max_seeds} caught the broken rule {rules:?}");
}

// Teeth: dropping a failed replica without the catalog's generation-conditioned consent lets
// the attachment acknowledge flushed writes that a replica the catalog still calls in sync
// does not have (the split-brain hole). G1 catches it within a few seeds.
#[test]
fn skipping_the_catalog_condition_is_caught() {
    let v = first_violation(
        Rules {
            require_catalog_to_drop: false,
            ..Rules::default()
        },
        50,
    );
    assert_eq!(v.check, "G1");
}

// Teeth: serving after a takeover without reconciling the previous activity log leaves
// replicas that differ where writes were in flight (G5).
#[test]
fn serving_without_reconciliation_is_caught() {
    let v = first_violation(
        Rules {
            reconcile_before_serving: false,
            ..Rules::default()
        },
        100,
    );
    assert_eq!(v.check, "G5");
}

// Teeth: letting writes overtake a region copy lets the copy's older data land last.
#[test]
fn writes_overtaking_a_resync_copy_are_caught() {
    first_violation(
        Rules {
            hold_writes_during_copy: false,
            ..Rules::default()
        },
        50,
    );
}

// Teeth: a barrier flush that does not wait for the writes in flight to the joining replica
// lets it enter the in-sync set without a write that was acknowledged durable.
#[test]
fn barrier_without_drain_is_caught() {
    let v = first_violation(
        Rules {
            drain_before_barrier: false,
            ..Rules::default()
        },
        1000,
    );
    assert_eq!(v.check, "G1");
}
