//! Goal: a volume with three synchronous replicas loses no flushed write while its replicas
//! fail in turn, heals each one by copying only the regions that changed, and ends with
//! byte-identical replicas; with `--min-in-sync 2` it keeps writing with one replica gone and
//! holds (never acknowledges) writes with two gone, resuming when one returns (issue 4, C3
//! acceptance: "faults in turn" on a 3-replica volume).
//! Method: replicas on n1, n2 and n3, attached on n1; our verifying load generator writes 4 KiB
//! blocks with periodic flushes into the first 8 MiB (8 of the volume's 64 regions), one run
//! per fault. Test 1, in turn: `kill -9` n2's agent and restart it; drop every packet in and
//! out of n3's namespace (nftables, `Lab::isolate`) and heal it. After each heal: the load ran
//! to its end without an error, every flushed block reads back, all three replicas are in
//! sync and their files are identical region by region (1 MiB checksums), and the resync the
//! fault caused copied the 8 regions the load dirtied, not more (the `resync.started` events).
//! Test 2 (`--min-in-sync 2`): kill n2 (writes go on), kill n3 (the load's flush counter stays
//! still for 5 s while the volume shows one healthy replica), restart n2 (writes resume),
//! restart n3; every flushed block reads back and the replicas end identical.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::tail;
use testkit::cluster::inspect::{
    all_in_sync, replica_file, replica_in_sync, replica_on, same_files, volume_show,
};
use testkit::cluster::{Cluster, ClusterAgent};
use testkit::loadgen::{self, WriteOptions, WriteSummary};
use testkit::{start_cluster, wait_until};

const MIB: u64 = 1 << 20;
/// The load covers the first `LOAD_REGIONS` MiB (regions of 1 MiB, the default region size).
const LOAD_REGIONS: u64 = 8;
const VOLUME_SIZE: &str = "64M";
const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn start() -> Option<Cluster> {
    start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])])
}

/// Creates `vol` with replicas on n1, n2, n3 (plus `extra` flags), attaches it on n1;
/// returns its id.
fn create_attached(a: &ClusterAgent, vol: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "volume",
        "create",
        vol,
        "--size",
        VOLUME_SIZE,
        "--replicas",
        "3",
        "--node",
        "n1",
        "--node",
        "n2",
        "--node",
        "n3",
    ];
    args.extend_from_slice(extra);
    a.cli_ok(&args);
    let s = volume_show(a, vol);
    assert!(
        all_in_sync(&s, 3),
        "three in-sync replicas at creation: {s}"
    );
    let id = s["id"].as_str().expect("volume id").to_owned();
    a.cli_ok(&["volume", "attach", vol]);
    id
}

/// One run of the verifying load over the first [`LOAD_REGIONS`] MiB, on its own thread.
struct Load {
    handle: JoinHandle<Result<WriteSummary, String>>,
    flushes: Arc<AtomicU64>,
    state: std::path::PathBuf,
    started: Instant,
    duration: Duration,
}

impl Load {
    fn start(a: &ClusterAgent, vol: &str, name: &str, seed: u64, duration: Duration) -> Load {
        let state = a.scratch_dir().join(format!("{name}.state"));
        let mut o = WriteOptions::new(a.nbd_uri(vol), &state);
        o.blocks = Some(LOAD_REGIONS * MIB / 4096);
        o.flush_every = 32;
        o.queue_depth = 8;
        o.seed = seed;
        o.duration = duration;
        let flushes = Arc::new(AtomicU64::new(0));
        o.flushes_done = Some(flushes.clone());
        Load {
            handle: std::thread::spawn(move || loadgen::write(&o)),
            flushes,
            state,
            started: Instant::now(),
            duration,
        }
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Waits (30 s at most) until the load completed `n` flushes; panics naming `what`, with
    /// the volume's state and `a`'s log tail, otherwise.
    #[track_caller]
    fn progress(&self, a: &ClusterAgent, vol: &str, n: u64, what: &str) {
        let ok = wait_until(Duration::from_secs(30), || self.flushes() >= n);
        assert!(
            ok,
            "{what}: the load made no progress in 30 s ({} flushes, wanted {n}; load running: {}, \
             {:?} of its {:?} gone)\nvolume: {}\n--- agent {} log tail ---\n{}",
            self.flushes(),
            !self.handle.is_finished(),
            self.started.elapsed(),
            self.duration,
            volume_show(a, vol),
            a.name(),
            tail(&a.log(), 60)
        );
    }

    /// Joins the load; it must have run to its end without any error (the VM never saw its
    /// disk fail).
    #[track_caller]
    fn finish(self) -> std::path::PathBuf {
        let sum = self.handle.join().unwrap().expect("load generator set-up");
        eprintln!("load: {sum}");
        assert!(
            sum.error.is_none(),
            "the load ran to its end without an error: {sum}"
        );
        assert!(sum.flushes > 0, "the load flushed: {sum}");
        self.state
    }
}

/// Waits (90 s at most) until all three replicas are in sync; panics with the volume's state
/// and every agent's log tail otherwise.
#[track_caller]
fn wait_all_in_sync(c: &Cluster, vol: &str, after: &str) -> Duration {
    let a = c.agent("n1");
    let t = Instant::now();
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(90), || {
        last = volume_show(a, vol);
        all_in_sync(&last, 3)
    });
    if !ok {
        let logs: Vec<String> = NODES
            .iter()
            .map(|n| {
                let ag = c.agent(n);
                format!("--- agent {n} log tail ---\n{}", tail(&ag.log(), 40))
            })
            .collect();
        panic!(
            "the three replicas are not in sync 90 s after {after}: {last}\n{}",
            logs.join("\n")
        );
    }
    t.elapsed()
}

/// Waits (30 s at most) until `node`'s replica has left the in-sync set.
#[track_caller]
fn wait_dropped(a: &ClusterAgent, vol: &str, node: &str) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        last = volume_show(a, vol);
        replica_on(&last, node).is_some_and(|r| !replica_in_sync(r))
    });
    assert!(
        ok,
        "{node}'s replica left the in-sync set within 30 s: {last}\n--- agent {} log tail ---\n{}",
        a.name(),
        tail(&a.log(), 60)
    );
    last
}

/// Every event so far (`events -o json` prints one JSON object per line).
fn events(a: &ClusterAgent) -> Vec<Value> {
    let out = a.cli_ok(&["events", "-o", "json"]);
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("`events -o json` printed a bad line ({e}): {l}"))
        })
        .collect()
}

/// The volume's events after `since` (by seq), as (seq, kind, message).
fn events_since(a: &ClusterAgent, vol: &str, since: u64) -> Vec<(u64, String, String)> {
    events(a)
        .iter()
        .filter(|e| e["volume"].as_str() == Some(vol))
        .filter_map(|e| {
            let seq = e["seq"].as_u64()?;
            (seq > since).then(|| {
                (
                    seq,
                    e["kind"].as_str().unwrap_or("?").to_owned(),
                    e["message"].as_str().unwrap_or("").to_owned(),
                )
            })
        })
        .collect()
}

/// The highest event seq so far (the watermark for [`events_since`]).
fn last_event_seq(a: &ClusterAgent) -> u64 {
    events(a)
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

/// "… resync of replica 2 on node n2 started (N regions)" → N, for every resync of `node`.
fn resync_regions(events: &[(u64, String, String)], node: &str) -> Vec<u64> {
    let on = format!("on node {node} ");
    events
        .iter()
        .filter(|(_, kind, msg)| kind == "resync.started" && msg.contains(&on))
        .filter_map(|(_, _, msg)| {
            let (_, rest) = msg.split_once("started (")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// Checks the resyncs of `node` since `since`: at least one ran and each copied exactly the
/// regions the load dirtied while the replica was away. The load wrote hundreds of blocks
/// spread at random over its [`LOAD_REGIONS`] regions meanwhile (the caller waited for 20
/// flushes of 32 writes), so every one of them was dirtied; a region outside them never was.
#[track_caller]
fn check_resync_counters(a: &ClusterAgent, vol: &str, node: &str, since: u64) {
    let events = events_since(a, vol, since);
    let regions = resync_regions(&events, node);
    let shown: Vec<String> = events
        .iter()
        .map(|(s, k, m)| format!("  #{s} {k}: {m}"))
        .collect();
    let shown = shown.join("\n");
    eprintln!("resyncs of {node} (regions): {regions:?}\n{shown}");
    assert!(!regions.is_empty(), "a resync of {node} ran:\n{shown}");
    assert!(
        regions.iter().all(|&r| r <= LOAD_REGIONS),
        "the load touched {LOAD_REGIONS} of 64 regions; a resync of {node} copied more: \
         {regions:?}\n{shown}"
    );
    assert_eq!(
        regions[0], LOAD_REGIONS,
        "the first resync of {node} copies every region the load dirtied while it was away \
         ({LOAD_REGIONS}):\n{shown}"
    );
}

/// Compares every replica file with n1's (1 MiB region checksums).
#[track_caller]
fn replicas_identical(c: &Cluster, id: &str, when: &str) {
    let f1 = replica_file(c.agent("n1"), id);
    for n in ["n2", "n3"] {
        if let Err(e) = same_files(&f1, &replica_file(c.agent(n), id)) {
            panic!("{when}: the replica on {n} differs from n1's: {e}");
        }
    }
}

#[test]
fn three_replicas_lose_no_flushed_write_when_replicas_are_killed_and_partitioned_in_turn() {
    let Some(mut c) = start() else { return };
    let id = create_attached(c.agent("n1"), "vm", &[]);
    let uri = c.agent("n1").nbd_uri("vm");

    // Fault 1: kill -9 n2's agent mid-load, let the load go on, restart it.
    let since = last_event_seq(c.agent("n1"));
    let load = Load::start(
        c.agent("n1"),
        "vm",
        "kill",
        0x3e91_0001,
        Duration::from_secs(12),
    );
    load.progress(c.agent("n1"), "vm", 10, "before the kill");
    c.agent_mut("n2").kill9();
    let t = Instant::now();
    let before = load.flushes();
    load.progress(
        c.agent("n1"),
        "vm",
        before + 20,
        "with n2 dead (the drop must commit and writes go on)",
    );
    eprintln!("writes went on {:?} after kill -9 of n2", t.elapsed());
    let s = wait_dropped(c.agent("n1"), "vm", "n2");
    for n in ["n1", "n3"] {
        assert!(
            replica_on(&s, n).is_some_and(replica_in_sync),
            "{n} stays in sync while n2 is dead: {s}"
        );
    }
    c.agent_mut("n2").restart();
    let state = load.finish();
    let took = wait_all_in_sync(&c, "vm", "n2's restart");
    eprintln!("all in sync {took:?} after the kill load ended");
    loadgen::verify_ok(&uri, &state);
    replicas_identical(&c, &id, "after n2's restart");
    check_resync_counters(c.agent("n1"), "vm", "n2", since);

    // Fault 2: isolate n3's namespace mid-load (its in-flight requests time out, then the
    // drop commits and writes go on), heal it.
    let since = last_event_seq(c.agent("n1"));
    let load = Load::start(
        c.agent("n1"),
        "vm",
        "isolate",
        0x3e91_0002,
        Duration::from_secs(25),
    );
    load.progress(c.agent("n1"), "vm", 10, "before the isolation");
    c.lab.isolate("n3");
    let t = Instant::now();
    let before = load.flushes();
    load.progress(
        c.agent("n1"),
        "vm",
        before + 20,
        "with n3 isolated (the drop must commit and writes go on)",
    );
    eprintln!("writes went on {:?} after isolating n3", t.elapsed());
    let s = wait_dropped(c.agent("n1"), "vm", "n3");
    eprintln!(
        "during the isolation: {}",
        replica_on(&s, "n3").expect("n3's replica")
    );
    for n in ["n1", "n2"] {
        assert!(
            replica_on(&s, n).is_some_and(replica_in_sync),
            "{n} stays in sync while n3 is isolated: {s}"
        );
    }
    c.lab.heal("n3");
    let took = wait_all_in_sync(&c, "vm", "n3's heal");
    eprintln!(
        "all in sync {took:?} after the heal (load still running: {})",
        !load.handle.is_finished()
    );
    let state = load.finish();
    let s = volume_show(c.agent("n1"), "vm");
    assert!(all_in_sync(&s, 3), "still in sync after the load: {s}");
    loadgen::verify_ok(&uri, &state);
    replicas_identical(&c, &id, "after n3's heal");
    check_resync_counters(c.agent("n1"), "vm", "n3", since);

    let a = c.agent("n1");
    a.cli_ok(&["volume", "detach", "vm"]);
    replicas_identical(&c, &id, "after detaching");
}

#[test]
fn min_in_sync_two_of_three_writes_with_one_replica_gone_and_holds_with_two_gone() {
    let Some(mut c) = start() else { return };
    let id = create_attached(c.agent("n1"), "mis", &["--min-in-sync", "2"]);
    let s = volume_show(c.agent("n1"), "mis");
    assert_eq!(s["min_in_sync"].as_u64(), Some(2), "{s}");
    let uri = c.agent("n1").nbd_uri("mis");

    let load = Load::start(
        c.agent("n1"),
        "mis",
        "mis",
        0x3e91_0003,
        Duration::from_secs(30),
    );
    load.progress(c.agent("n1"), "mis", 10, "before the first kill");

    // One replica gone: two healthy ≥ min-in-sync, writes go on once n2 is dropped.
    c.agent_mut("n2").kill9();
    let before = load.flushes();
    load.progress(
        c.agent("n1"),
        "mis",
        before + 20,
        "with n2 dead (two replicas left, min-in-sync 2)",
    );
    wait_dropped(c.agent("n1"), "mis", "n2");

    // Two gone: one healthy < min-in-sync, writes are held. Whatever was in flight when n3
    // died is answered (or held) within a moment; from then on the flush count stays still.
    c.agent_mut("n3").kill9();
    let s = wait_dropped(c.agent("n1"), "mis", "n3");
    let in_sync: Vec<&str> = s["replica_set"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter(|r| replica_in_sync(r))
                .filter_map(|r| r["node"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        in_sync,
        ["n1"],
        "only n1 is in sync with n2 and n3 dead: {s}"
    );
    let held_at = load.flushes();
    let moved = wait_until(Duration::from_secs(5), || load.flushes() > held_at);
    assert!(
        !moved,
        "a flush completed with only one healthy replica under min-in-sync 2 ({held_at} -> {})\n\
         volume: {}",
        load.flushes(),
        volume_show(c.agent("n1"), "mis")
    );
    assert!(
        !load.handle.is_finished(),
        "the load is held, not failed or finished, while two replicas are gone"
    );
    eprintln!("writes held at {held_at} flushes with n2 and n3 dead");

    // One back: it is resynced, rejoins, and the held writes go out.
    let t = Instant::now();
    c.agent_mut("n2").restart();
    load.progress(
        c.agent("n1"),
        "mis",
        held_at + 20,
        "after n2's restart (writes resume once it rejoins)",
    );
    eprintln!("writes resumed {:?} after n2's restart began", t.elapsed());
    let s = volume_show(c.agent("n1"), "mis");
    assert!(
        replica_on(&s, "n2").is_some_and(replica_in_sync),
        "n2 is in sync again once writes resumed: {s}"
    );

    c.agent_mut("n3").restart();
    let took = wait_all_in_sync(&c, "mis", "n3's restart");
    eprintln!("all in sync {took:?} after n3's restart");
    let state = load.finish();
    loadgen::verify_ok(&uri, &state);
    replicas_identical(&c, &id, "after both restarts");

    let a = c.agent("n1");
    a.cli_ok(&["volume", "detach", "mis"]);
    replicas_identical(&c, &id, "after detaching");
}
