//! Goal: synchronous replication under membership changes and network faults. A replica
//! added to a volume in use is filled by a throttled background copy while writes go on and
//! ends byte-identical to the others; a replica whose host is cut off by a partition is
//! dropped (writes go on without it) and is resynced once the partition heals.
//! Method: replicas on n1 and n2, attached on n1, our verifying load generator writing 4 KiB
//! blocks with periodic flushes into the first 16 MiB. Test 1 adds a replica on n3 with
//! `--resync-rate 4M` mid-load and samples the copy's progress from `volume show`; test 2
//! drops every packet in and out of n2's namespace (nftables, `Lab::isolate`) mid-load, then
//! heals it. Both end with: every flushed block reads back, all replicas in sync, and after
//! detaching the replica files are byte-identical.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::tail;
use testkit::cluster::inspect::{
    all_in_sync, replica_file, replica_in_sync, replica_on, replica_states, same_files, volume_show,
};
use testkit::cluster::{Cluster, ClusterAgent};
use testkit::loadgen::{self};
use testkit::{start_cluster, wait_until};

const MIB: u64 = 1 << 20;

fn start() -> Option<Cluster> {
    start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])])
}

/// Creates volume `vol` (32 MiB, replicas on n1 and n2), attaches it on n1; returns its id.
fn create_attached(a: &ClusterAgent, vol: &str) -> String {
    a.cli_ok(&[
        "volume",
        "create",
        vol,
        "--size",
        "32M",
        "--replicas",
        "2",
        "--node",
        "n1",
        "--node",
        "n2",
    ]);
    let s = volume_show(a, vol);
    assert_eq!(
        replica_states(&s),
        [
            ("n1".to_owned(), "in_sync".to_owned()),
            ("n2".to_owned(), "in_sync".to_owned())
        ],
        "{s}"
    );
    let id = s["id"].as_str().expect("volume id").to_owned();
    a.cli_ok(&["volume", "attach", vol]);
    id
}

/// The verifying load over the first 16 MiB of `uri`, on its own thread.
/// Waits (30 s at most) until `flushes` reaches `n`; panics naming `what`, with `a`'s log
/// tail, otherwise.
#[track_caller]
fn progress(a: &ClusterAgent, flushes: &AtomicU64, n: u64, what: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || flushes.load(Ordering::SeqCst)
            >= n),
        "{what}: the load made no progress in 30 s ({} flushes, wanted {n})\n\
         --- agent {} log tail ---\n{}",
        flushes.load(Ordering::SeqCst),
        a.name(),
        tail(&a.log(), 60)
    );
}

#[test]
fn added_replica_is_filled_while_writes_go_on_and_ends_identical() {
    let Some(c) = start() else { return };
    let a = c.agent("n1");
    let id = create_attached(a, "vm");
    let uri = a.nbd_uri("vm");
    let state = a.scratch_dir().join("add.state");
    let (load, flushes) =
        loadgen::spawn_write(&uri, &state, 16 * MIB, 0x00ad_d3e9, Duration::from_secs(15));

    progress(a, &flushes, 10, "before add-replica");
    let t_add = Instant::now();
    let out = a.cli_ok(&[
        "volume",
        "add-replica",
        "vm",
        "--node",
        "n3",
        "--resync-rate",
        "4M",
    ]);
    eprintln!("add-replica: {}", out.trim());
    let flushes_at_add = flushes.load(Ordering::SeqCst);

    // Follow the copy until all three replicas are in sync; keep every progress sample.
    // 4 MiB/s: the load's 16 MiB of data take ~4 s to copy (holes cost nothing), long
    // enough for the shown rate's 3 s window to leave the ramp-up behind.
    let target = 4 * MIB;
    let mut samples: Vec<(Duration, Value)> = Vec::new();
    let mut last = Value::Null;
    let mut in_sync_after = None;
    while t_add.elapsed() < Duration::from_secs(90) {
        let s = volume_show(a, "vm");
        if let Some(p) = replica_on(&s, "n3").map(|r| &r["resync"]) {
            if p.is_object() {
                samples.push((t_add.elapsed(), p.clone()));
            }
        }
        let done = all_in_sync(&s, 3);
        last = s;
        if done {
            in_sync_after = Some(t_add.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let flushes_at_sync = flushes.load(Ordering::SeqCst);
    let Some(in_sync_after) = in_sync_after else {
        panic!(
            "the three replicas are not in sync 90 s after add-replica: {last}\n\
             --- n1 log tail ---\n{}",
            tail(&a.log(), 60)
        );
    };
    eprintln!(
        "n3 in sync {in_sync_after:?} after add-replica; flushes {flushes_at_add} -> {flushes_at_sync} meanwhile"
    );
    for (t, p) in &samples {
        eprintln!("  resync sample at {t:?}: {p}");
    }
    assert!(
        !samples.is_empty(),
        "no resync progress was ever shown for n3 while it was filled: {last}"
    );
    // The measured rate, once enough was copied for the measurement window to mean something.
    // The last such sample has the longest window behind it.
    let rated: Vec<(u64, u64)> = samples
        .iter()
        .filter_map(|(_, p)| {
            let copied = p["copied_bytes"].as_u64()?;
            let rate = p["rate_bytes_per_s"].as_u64()?;
            (copied > 4 * MIB).then_some((copied, rate))
        })
        .collect();
    let &(copied, rate) = rated
        .last()
        .unwrap_or_else(|| panic!("no resync sample with more than 4 MiB copied: {samples:?}"));
    eprintln!(
        "measured resync rate {:.2} MiB/s at {:.1} MiB copied (limit 4 MiB/s); all rated samples (copied, rate): {rated:?}",
        rate as f64 / MIB as f64,
        copied as f64 / MIB as f64
    );
    assert!(
        (rate as f64) >= 0.75 * target as f64 && (rate as f64) <= 1.25 * target as f64,
        "resync rate {rate} B/s is not within 4 MiB/s ± 25 % (samples: {rated:?})"
    );
    assert!(
        flushes_at_sync > flushes_at_add,
        "the load kept flushing while n3 was filled ({flushes_at_add} -> {flushes_at_sync})"
    );

    let sum = load.join().unwrap().expect("load generator set-up");
    eprintln!("load: {sum}");
    assert!(sum.error.is_none(), "the load ran to its end: {sum}");
    let s = volume_show(a, "vm");
    assert!(all_in_sync(&s, 3), "still in sync after the load: {s}");
    loadgen::verify_ok(&uri, &state);

    a.cli_ok(&["volume", "detach", "vm"]);
    let f1 = replica_file(a, &id);
    for n in ["n2", "n3"] {
        if let Err(e) = same_files(&f1, &replica_file(c.agent(n), &id)) {
            panic!("replica on {n} differs from n1's: {e}");
        }
    }
}

#[test]
fn partitioned_replica_is_dropped_and_resynced_after_the_partition_heals() {
    let Some(c) = start() else { return };
    let a = c.agent("n1");
    let id = create_attached(a, "vm");
    let uri = a.nbd_uri("vm");
    let state = a.scratch_dir().join("part.state");
    let (load, flushes) =
        loadgen::spawn_write(&uri, &state, 16 * MIB, 0x9a27_17e0, Duration::from_secs(40));

    progress(a, &flushes, 10, "before the partition");
    // n2 loses everything: n1, n3, etcd and the test's own clients.
    c.lab.isolate("n2");
    let t_cut = Instant::now();
    let before = flushes.load(Ordering::SeqCst);
    progress(
        a,
        &flushes,
        before + 20,
        "with n2 partitioned (the drop must commit and writes go on)",
    );
    eprintln!(
        "writes went on {:?} after the partition ({before} -> {} flushes)",
        t_cut.elapsed(),
        flushes.load(Ordering::SeqCst)
    );
    let mut last = Value::Null;
    let dropped = wait_until(Duration::from_secs(30), || {
        last = volume_show(a, "vm");
        replica_on(&last, "n2").is_some_and(|r| !replica_in_sync(r))
    });
    assert!(dropped, "n2 left the in-sync set: {last}");
    eprintln!(
        "during the partition: {:?}",
        replica_on(&last, "n2").expect("n2's replica")
    );
    assert!(
        replica_on(&last, "n1").is_some_and(replica_in_sync),
        "n1's replica stays in sync: {last}"
    );

    c.lab.heal("n2");
    let t_heal = Instant::now();
    let mut last = Value::Null;
    let healed = wait_until(Duration::from_secs(90), || {
        last = volume_show(a, "vm");
        all_in_sync(&last, 2)
    });
    assert!(
        healed,
        "both replicas are in sync within 90 s of the heal: {last}\n\
         --- n1 log tail ---\n{}\n--- n2 log tail ---\n{}",
        tail(&a.log(), 60),
        tail(&c.agent("n2").log(), 60)
    );
    eprintln!(
        "both in sync {:?} after the heal (load still running: {})",
        t_heal.elapsed(),
        !load.is_finished()
    );

    let sum = load.join().unwrap().expect("load generator set-up");
    eprintln!("load: {sum}");
    assert!(
        sum.error.is_none(),
        "the VM never lost its disk nor saw an error: {sum}"
    );
    let s = volume_show(a, "vm");
    assert!(all_in_sync(&s, 2), "still in sync after the load: {s}");
    loadgen::verify_ok(&uri, &state);
    let events = a.cli(&["events"]);
    for l in String::from_utf8_lossy(&events.stdout)
        .lines()
        .filter(|l| l.contains("n2"))
    {
        eprintln!("  event: {l}");
    }

    a.cli_ok(&["volume", "detach", "vm"]);
    let (f1, f2) = (replica_file(a, &id), replica_file(c.agent("n2"), &id));
    if let Err(e) = same_files(&f1, &f2) {
        panic!("replicas differ after healing: {e}");
    }
}
