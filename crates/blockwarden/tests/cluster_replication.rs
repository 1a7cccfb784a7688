//! Goal: a volume with two synchronous replicas loses no flushed write when a replica's
//! host dies, keeps serving while it is gone (after the catalog dropped it), and heals by
//! copying only the regions that changed (issue 4, C3 acceptance).
//! Method: replicas on n1 and n2, attached on n1; our verifying load generator writes 4 KiB
//! blocks with periodic flushes into the first 8 MiB; `kill -9` n2's agent mid-load, let
//! the load go on, restart n2. Then: the load ended without losing its connection, every
//! flushed block reads back, both replicas come back in sync, the resync copied at most
//! the regions the load could have touched (8 of the volume's 64), and after detaching the
//! two replica files are byte-identical; the detach emptied the activity log, so attaching
//! on n2 reconciles nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::cluster::inspect::{
    all_in_sync, replica_file, replica_states, resync_regions, same_files, volume_show,
};
use testkit::cluster::Cluster;
use testkit::loadgen::{self, VerifyOptions, WriteOptions};
use testkit::{start_cluster, wait_until};

const MIB: u64 = 1 << 20;

fn start() -> Option<Cluster> {
    start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])])
}

#[test]
fn two_replicas_lose_no_flushed_write_when_a_replica_host_dies_and_resync_only_what_changed() {
    let Some(mut c) = start() else { return };
    let a = c.agent("n1");
    a.cli_ok(&[
        "volume",
        "create",
        "vm",
        "--size",
        "64M",
        "--replicas",
        "2",
        "--node",
        "n1",
        "--node",
        "n2",
    ]);
    let s = volume_show(a, "vm");
    assert_eq!(
        replica_states(&s),
        [
            ("n1".to_owned(), "in_sync".to_owned()),
            ("n2".to_owned(), "in_sync".to_owned())
        ],
        "{s}"
    );
    let id = s["id"].as_str().expect("volume id").to_owned();
    a.cli_ok(&["volume", "attach", "vm"]);
    let uri = a.nbd_uri("vm");

    let state = a.scratch_dir().join("load.state");
    let mut o = WriteOptions::new(&uri, &state);
    o.blocks = Some(8 * MIB / 4096);
    o.flush_every = 32;
    o.queue_depth = 8;
    o.seed = 0x005e_edc3;
    o.duration = Duration::from_secs(20);
    let flushes = Arc::new(AtomicU64::new(0));
    o.flushes_done = Some(flushes.clone());
    let load = std::thread::spawn(move || loadgen::write(&o));

    let progress = |n: u64, what: &str| {
        assert!(
            wait_until(Duration::from_secs(30), || flushes.load(Ordering::SeqCst)
                >= n),
            "{what}: the load made no progress ({} flushes)",
            flushes.load(Ordering::SeqCst)
        );
    };
    progress(10, "before the kill");
    c.agent_mut("n2").kill9();
    let killed = Instant::now();
    let before = flushes.load(Ordering::SeqCst);
    progress(
        before + 20,
        "with n2 dead (the drop must commit and writes go on)",
    );
    eprintln!("writes went on {:?} after kill -9 of n2", killed.elapsed());
    let a = c.agent("n1");
    let s = volume_show(a, "vm");
    assert!(!all_in_sync(&s, 2), "n2 left the in-sync set: {s}");

    c.agent_mut("n2").restart();
    let sum = load.join().unwrap().expect("load generator set-up");
    eprintln!("load: {sum}");
    assert!(!sum.connection_lost, "the VM never lost its disk: {sum}");

    let a = c.agent("n1");
    assert!(
        wait_until(Duration::from_secs(60), || all_in_sync(
            &volume_show(a, "vm"),
            2
        )),
        "both replicas are in sync again within 60 s: {}",
        volume_show(a, "vm")
    );
    let rep = loadgen::verify(&VerifyOptions {
        uri: uri.clone(),
        state_path: state,
    })
    .expect("verify ran");
    eprint!("{rep}");
    assert!(rep.ok(), "flushed data lost:\n{rep}");
    assert!(rep.durable_blocks > 0, "the test wrote something: {rep}");

    let events = a.cli_ok(&["events"]);
    let regions = resync_regions(&events, None);
    eprintln!("resyncs (regions): {regions:?}");
    assert!(!regions.is_empty(), "a resync ran:\n{events}");
    assert!(
        regions.iter().all(|&r| r <= 8),
        "the load touched 8 of 64 regions; a resync copied more: {regions:?}\n{events}"
    );

    a.cli_ok(&["volume", "detach", "vm"]);
    let (f1, f2) = (replica_file(a, &id), replica_file(c.agent("n2"), &id));
    if let Err(e) = same_files(&f1, &f2) {
        panic!("replicas differ after healing: {e}");
    }

    // A clean detach empties the activity log: attaching on the other host reconciles
    // nothing (a crash would leave up to the 8 regions the load touched).
    let reconciles = |events: &str| {
        events
            .lines()
            .filter(|l| l.contains("volume.reconcile"))
            .count()
    };
    let before = reconciles(&a.cli_ok(&["events"]));
    let n2 = c.agent("n2");
    n2.cli_ok(&["volume", "attach", "vm", "--node", "n2"]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            testkit::cluster::inspect::metric(
                n2,
                "blockwarden_volume_reconciled_regions_total",
                "volume=\"vm\"",
            )
            .is_some()
        }),
        "the attachment on n2 reports its reconciliation metric"
    );
    let events = a.cli_ok(&["events"]);
    assert_eq!(
        reconciles(&events),
        before,
        "attach after a clean detach reconciled regions:\n{events}"
    );
    assert_eq!(
        testkit::cluster::inspect::metric(
            n2,
            "blockwarden_volume_reconciled_regions_total",
            "volume=\"vm\""
        ),
        Some(0.0)
    );
    n2.cli_ok(&["volume", "detach", "vm"]);
}

#[test]
fn failover_after_kill9_of_the_attached_node_keeps_every_flushed_write() {
    let Some(mut c) = start() else { return };
    let a = c.agent("n1");
    a.cli_ok(&[
        "volume",
        "create",
        "fo",
        "--size",
        "32M",
        "--replicas",
        "2",
        "--node",
        "n1",
        "--node",
        "n2",
    ]);
    a.cli_ok(&["volume", "attach", "fo"]);
    let uri = a.nbd_uri("fo");
    let state = a.scratch_dir().join("fo.state");
    let mut o = WriteOptions::new(&uri, &state);
    o.blocks = Some(4 * MIB / 4096);
    o.flush_every = 16;
    o.queue_depth = 8;
    o.seed = 0x0fa1_10e7;
    o.duration = Duration::from_secs(60);
    let flushes = Arc::new(AtomicU64::new(0));
    o.flushes_done = Some(flushes.clone());
    let load = std::thread::spawn(move || loadgen::write(&o));
    assert!(
        wait_until(Duration::from_secs(30), || flushes.load(Ordering::SeqCst)
            >= 20),
        "the load made progress"
    );
    c.agent_mut("n1").kill9();
    let sum = load.join().unwrap().expect("load generator set-up");
    assert!(sum.connection_lost, "the load ended by the kill: {sum}");

    // Attach on n3, which holds no replica: both replicas are remote there.
    let n3 = c.agent("n3");
    let t = Instant::now();
    let uri3 = loop {
        let out = n3.cli(&["volume", "attach", "fo", "--node", "n3"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no failover within 60 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("failover attach on n3 after {:?}", t.elapsed());
    let rep = loadgen::verify(&VerifyOptions {
        uri: uri3,
        state_path: state,
    })
    .expect("verify ran");
    eprint!("{rep}");
    assert!(rep.ok(), "flushed data lost in the failover:\n{rep}");
    assert!(rep.durable_blocks > 0, "{rep}");

    // The dead node's replica comes back and is resynced.
    c.agent_mut("n1").restart();
    let n3 = c.agent("n3");
    assert!(
        wait_until(Duration::from_secs(60), || all_in_sync(
            &volume_show(n3, "fo"),
            2
        )),
        "n1's replica is resynced after it returns: {}",
        volume_show(n3, "fo")
    );
}
