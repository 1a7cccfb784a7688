//! Crash consistency under `kill -9`.
//!
//! 1. Data: the verifying load generator writes self-describing blocks with a FLUSH every few
//!    writes and records what each completed FLUSH made durable; the agent is SIGKILLed in the
//!    middle of the load, restarted, and every block must hold its last flushed write or a
//!    newer one. Three rounds, killed at different moments.
//! 2. Catalog: a loop of `volume create` / `volume delete` is cut by SIGKILL at seeded random
//!    moments; after each restart every listed volume must be `ready` and usable over NBD, and
//!    `<data-dir>/volumes/` must hold exactly one `<id>.img` per listed volume (no orphans, no
//!    temporaries).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use testkit::loadgen::{self, VerifyOptions, WriteOptions};
use testkit::nbd::NbdClient;
use testkit::rng::SplitMix64;
use testkit::{start_agent, wait_until, Agent};

/// Goal: G1 under kill -9. Method: bw-loadgen load, SIGKILL after N completed flushes, restart, verify every block (three rounds).
#[test]
fn flushed_writes_survive_kill9_during_write_load() {
    let mut agent = start_agent!();
    agent.create_volume("crash", "64M");
    let uri = agent.nbd_uri("crash");
    let dir = agent.scratch_dir();

    for (round, flushes_before_kill) in [(1u64, 5u64), (2, 40), (3, 150)] {
        let state = dir.join(format!("state.{round}"));
        let mut o = WriteOptions::new(&uri, &state);
        o.blocks = Some(16384);
        o.flush_every = 32;
        o.queue_depth = 16;
        o.seed = 0xc0ffee + round;
        o.duration = Duration::from_secs(120);
        let done = Arc::new(AtomicU64::new(0));
        o.flushes_done = Some(done.clone());
        let load = std::thread::spawn(move || loadgen::write(&o));

        assert!(
            wait_until(Duration::from_secs(60), || done.load(Ordering::SeqCst)
                >= flushes_before_kill
                || load.is_finished()),
            "round {round}: load made no progress"
        );
        agent.kill9();
        let sum = load.join().unwrap().expect("load generator set-up");
        eprintln!("round {round}: {sum}");
        assert!(
            sum.connection_lost,
            "round {round}: the load must end by the kill: {sum}"
        );
        assert!(sum.flushes >= flushes_before_kill, "{sum}");

        agent.restart();
        let rep = loadgen::verify(&VerifyOptions {
            uri: uri.clone(),
            state_path: state,
        })
        .expect("verify ran");
        eprint!("round {round}: {rep}");
        assert!(
            rep.ok(),
            "round {round}: flushed data lost after kill -9:\n{rep}"
        );
        assert!(rep.durable_blocks > 0, "the round tested something: {rep}");
    }
}

fn listed(agent: &Agent) -> Vec<Value> {
    agent
        .cli_json(&["volume", "list"])
        .as_array()
        .expect("array")
        .clone()
}

/// Checks the catalog against the files and the NBD exports.
fn assert_consistent(agent: &Agent) {
    let vols = listed(agent);
    let mut want: BTreeSet<String> = BTreeSet::new();
    for v in &vols {
        let name = v["name"].as_str().unwrap();
        assert_eq!(
            v["state"], "ready",
            "after restart every volume is whole: {v}"
        );
        let id = v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("volume JSON has an id: {v}"));
        want.insert(format!("{id}.img"));
        // The replica's generation fence (highest generation admitted), beside its data.
        want.insert(format!("{id}.img.meta"));
        let mut c = NbdClient::connect_uri(&agent.nbd_uri(name))
            .unwrap_or_else(|e| panic!("listed volume {name} must be usable: {e}"));
        c.write(0, &[0x5a; 4096], true).unwrap();
        assert_eq!(c.read(0, 4096).unwrap(), vec![0x5a; 4096]);
        c.disconnect().unwrap();
    }
    let dir = agent.data_dir().join("volumes");
    let have: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        have,
        want,
        "files in {} must match the catalog exactly",
        dir.display()
    );
}

/// Goal: create/delete are atomic with their files under kill -9. Method: CLI churn, SIGKILL at seeded random moments, restart, check catalog = files = usable exports.
#[test]
fn catalog_and_files_consistent_after_kill9_during_create_delete_loop() {
    let mut agent = start_agent!();
    let mut rng = SplitMix64::new(0xca7a);
    for round in 0..4u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let bin = agent.bin().to_path_buf();
        let api = agent.api_url();
        let s = stop.clone();
        // Create/delete loop through the real CLI; errors are expected once the agent dies.
        let churn = std::thread::spawn(move || {
            let mut ops = 0u64;
            for i in 0.. {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let name = format!("r{round}-v{i}");
                let run = |args: &[&str]| {
                    testkit::run_with_timeout(
                        std::process::Command::new(&bin)
                            .arg("--api")
                            .arg(&api)
                            .args(args),
                        Duration::from_secs(30),
                    )
                    .map(|o| o.status.success())
                    .unwrap_or(false)
                };
                if !run(&["volume", "create", &name, "--size", "16M"]) {
                    break;
                }
                ops += 1;
                if i % 3 != 2 && !run(&["volume", "delete", &name]) {
                    break;
                }
                ops += 1;
            }
            ops
        });
        // A seeded random kill point 100–900 ms into the churn (deliberately a sleep: the
        // point is to land anywhere, not to wait for a condition).
        std::thread::sleep(Duration::from_millis(100 + rng.below(800)));
        agent.kill9();
        stop.store(true, Ordering::SeqCst);
        let ops = churn.join().unwrap();
        eprintln!("round {round}: killed after {ops} operations");
        agent.restart();
        assert_consistent(&agent);
    }
    // And a clean stop/start keeps everything too.
    agent.restart();
    assert_consistent(&agent);
}
