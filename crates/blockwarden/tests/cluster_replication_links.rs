//! Goal: synchronous replication over a slow or lossy link (issue 4, C3 acceptance: "slows a
//! link (netem delay and loss)"). A mildly slow, lossy link slows writes down but loses
//! nothing. A link too slow for the driver's 10 s request timeout gets its replica dropped
//! from the in-sync set (only that one, also with three replicas) while writes go on with the
//! others; while the link stays that bad, reconnects and resync attempts over it fail without
//! holding writes much longer than one request timeout; once the link is restored the replica
//! is resynced, copying exactly the regions the load dirtied (the 8 it writes to, of 64).
//! Method: replicas on n1 and n2 (and n3 for the 3-replica case), attached on n1; our
//! verifying load generator writes 4 KiB blocks with periodic flushes into the first 8 MiB.
//! Mid-load the link between n1 and the slow node is put through a user-space delay line
//! (`Lab::slow_link`: netem's delay + rate, with TUN devices and host routes, since this
//! kernel has no netem) plus random packet loss (`Lab::lossy`, nftables `numgen`). The flush
//! rate before, during and after the fault is measured and printed, and the TUN devices'
//! counters prove the replication traffic went through the line. After the fault is removed:
//! every replica is in sync, every flushed block reads back, the resync events (`blockwarden
//! events`) and `volume show` name no more than the 8 loaded regions, and after detaching the
//! replica files are identical region by region.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::tail;
use testkit::cluster::inspect::{
    all_in_sync, mentions, replica_file, replica_in_sync, replica_on, replica_states,
    resync_regions, same_files, volume_show,
};
use testkit::cluster::lab::slow_link_available;
use testkit::cluster::ClusterAgent;
use testkit::loadgen::{self};
use testkit::{start_cluster, wait_until};

const MIB: u64 = 1 << 20;
/// The volume: 64 regions of 1 MiB.
const VOLUME: &str = "64M";
/// The load writes into the first 8 MiB: 8 regions are all a resync may ever copy.
const LOAD_REGIONS: u64 = 8;

/// The verifying load over the first [`LOAD_REGIONS`] MiB of `uri`, on its own thread.
/// Flushes per second over `window`.
fn flush_rate(flushes: &AtomicU64, window: Duration) -> f64 {
    let (t, before) = (Instant::now(), flushes.load(Ordering::SeqCst));
    std::thread::sleep(window);
    (flushes.load(Ordering::SeqCst) - before) as f64 / t.elapsed().as_secs_f64()
}

/// Waits (`within` at most) until `flushes` reaches `n`; panics naming `what`, with the log
/// tails of `agents`, otherwise.
#[track_caller]
fn progress(agents: &[&ClusterAgent], flushes: &AtomicU64, n: u64, within: Duration, what: &str) {
    if wait_until(within, || flushes.load(Ordering::SeqCst) >= n) {
        return;
    }
    let logs: String = agents
        .iter()
        .map(|a| {
            format!(
                "--- agent {} log tail ---\n{}\n",
                a.name(),
                tail(&a.log(), 40)
            )
        })
        .collect();
    panic!(
        "{what}: the load made no progress in {within:?} ({} flushes, wanted {n})\n{logs}",
        flushes.load(Ordering::SeqCst)
    );
}

/// The fault staged on the link between n1 and the slow node.
#[derive(Debug, Clone, Copy)]
struct LinkFault {
    /// One-way delay, each direction.
    delay: Duration,
    /// Serialisation rate, each direction (bits/s, 0 = unlimited).
    rate_bits_per_s: u64,
    /// Random loss, each direction.
    loss_percent: u32,
}

/// What the slow replica must do while the fault is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Writes go on through it (slower); it may stay in sync (if it is dropped, it must be
    /// resynced afterwards like any other).
    SlowedDown,
    /// Its requests exceed the driver's request timeout: it leaves the in-sync set and writes
    /// go on with the others.
    Dropped,
}

struct Scenario {
    /// Replica nodes; the volume is attached on the first (n1).
    replicas: &'static [&'static str],
    /// The node whose link to n1 is slowed.
    slow: &'static str,
    fault: LinkFault,
    expect: Expect,
    seed: u64,
    /// How long the load runs (from before the fault to after it is removed).
    load: Duration,
    /// Dropped: how long the fault stays on after the drop (writes measured meanwhile).
    hold: Duration,
    /// Dropped: the link still carries a reconnect within `hold`, so a resync must be
    /// attempted over it (and fail, the copy being slower than the request timeout).
    retried: bool,
}

fn run(sc: &Scenario) {
    if !slow_link_available() {
        return;
    }
    let nodes: Vec<(&str, &[&str])> = sc.replicas.iter().map(|n| (*n, &[][..])).collect();
    let Some(c) = start_cluster!(&nodes) else {
        return;
    };
    let t_test = Instant::now();
    let a = c.agent("n1");
    let (slow, n) = (sc.slow, sc.replicas.len());
    let agents: Vec<&ClusterAgent> = sc.replicas.iter().map(|r| c.agent(r)).collect();
    let replicas = n.to_string();
    let mut create = vec![
        "volume",
        "create",
        "vm",
        "--size",
        VOLUME,
        "--replicas",
        &replicas,
    ];
    for r in sc.replicas {
        create.extend(["--node", r]);
    }
    a.cli_ok(&create);
    let s = volume_show(a, "vm");
    assert!(all_in_sync(&s, n), "{n} replicas in sync: {s}");
    let id = s["id"].as_str().expect("volume id").to_owned();
    a.cli_ok(&["volume", "attach", "vm"]);
    let uri = a.nbd_uri("vm");
    let state = a.scratch_dir().join("links.state");
    let (load, flushes) = loadgen::spawn_write(&uri, &state, LOAD_REGIONS * MIB, sc.seed, sc.load);

    progress(
        &agents,
        &flushes,
        10,
        Duration::from_secs(30),
        "before the fault",
    );
    let before = flush_rate(&flushes, Duration::from_secs(3));

    // The fault: every packet between n1 and the slow node goes through the delay line and
    // the random drop.
    let f = sc.fault;
    let link = c.lab.slow_link("n1", slow, f.delay, f.rate_bits_per_s);
    if f.loss_percent > 0 {
        c.lab.lossy(slow, &[c.lab.addr("n1")], f.loss_percent);
    }
    let t_fault = Instant::now();
    let at_fault = flushes.load(Ordering::SeqCst);

    // Watch the replicas while the fault is on. Slowed down: a fixed window. Dropped: until
    // the drop, then until writes went on without it.
    let mut dropped_after = None;
    let mut flushes_at_drop = None;
    let mut others_left: Vec<String> = Vec::new();
    let mut last = Value::Null;
    let window = match sc.expect {
        Expect::SlowedDown => Duration::from_secs(10),
        Expect::Dropped => Duration::from_secs(40),
    };
    while t_fault.elapsed() < window {
        last = volume_show(a, "vm");
        for r in sc.replicas.iter().filter(|r| **r != slow) {
            if !replica_on(&last, r).is_some_and(replica_in_sync)
                && !others_left.contains(&r.to_string())
            {
                others_left.push(r.to_string());
                eprintln!("{r} left the in-sync set during the fault: {last}");
            }
        }
        if dropped_after.is_none() && replica_on(&last, slow).is_some_and(|r| !replica_in_sync(r)) {
            dropped_after = Some(t_fault.elapsed());
            flushes_at_drop = Some(flushes.load(Ordering::SeqCst));
            eprintln!(
                "{slow} left the in-sync set {:?} into the fault ({} -> {} flushes meanwhile): {:?}",
                t_fault.elapsed(),
                at_fault,
                flushes.load(Ordering::SeqCst),
                replica_on(&last, slow)
            );
            if sc.expect == Expect::Dropped {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let during =
        (flushes.load(Ordering::SeqCst) - at_fault) as f64 / t_fault.elapsed().as_secs_f64();
    eprintln!(
        "flush rate: {before:.1}/s before the fault, {during:.1}/s during its first {:?} \
         ({slow} {})",
        t_fault.elapsed(),
        match dropped_after {
            Some(t) => format!("dropped after {t:?}"),
            None => "stayed in sync".to_owned(),
        }
    );
    assert!(
        others_left.is_empty(),
        "only the slowed replica may leave the in-sync set; {others_left:?} did: {last}"
    );
    let mut after_drop = None;
    // Longest time without a completed flush while the fault stayed on after the drop.
    let mut longest_stall = Duration::ZERO;
    // The slow replica's states while the fault stayed on after the drop.
    let mut seen: Vec<String> = Vec::new();
    match sc.expect {
        Expect::SlowedDown => {
            assert!(
                flushes.load(Ordering::SeqCst) > at_fault,
                "writes went on through the slow link: {last}"
            );
            if dropped_after.is_none() {
                // Every write waited for a replica 2 × delay away: the line must show.
                assert!(
                    during < before / 2.0,
                    "a {:?} one-way link slows synchronous writes down \
                     ({before:.1} flushes/s before, {during:.1}/s during)",
                    f.delay
                );
            }
        }
        Expect::Dropped => {
            assert!(
                dropped_after.is_some(),
                "{slow} left the in-sync set within {window:?} of a link it cannot keep up \
                 with: {last}\n--- n1 log tail ---\n{}",
                tail(&a.log(), 60)
            );
            assert!(
                replica_on(&last, "n1").is_some_and(replica_in_sync),
                "n1's replica stays in sync: {last}"
            );
            // Writes go on with the others (the slow replica keeps being retried over the
            // slow link meanwhile).
            let t = Instant::now();
            let from = flushes.load(Ordering::SeqCst);
            progress(
                &agents,
                &flushes,
                from + 20,
                Duration::from_secs(30),
                "after the slow replica was dropped",
            );
            // Keep the fault on for `hold`, noting every state the slow replica goes through
            // (reconnects and resync attempts over the slow link).
            let (mut last_count, mut last_change) = (from, Instant::now());
            while t.elapsed() < sc.hold {
                let st = replica_on(&volume_show(a, "vm"), slow)
                    .map(|r| format!("{}", r["state"]))
                    .unwrap_or_default();
                if seen.last() != Some(&st) {
                    eprintln!("  {:?} after the drop: {slow} {st}", t.elapsed());
                    seen.push(st);
                }
                let now = flushes.load(Ordering::SeqCst);
                if now != last_count {
                    (last_count, last_change) = (now, Instant::now());
                }
                longest_stall = longest_stall.max(last_change.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
            let rate = (flushes.load(Ordering::SeqCst) - from) as f64 / t.elapsed().as_secs_f64();
            eprintln!(
                "flush rate after the drop, fault still on: {rate:.1}/s over {:?} (longest \
                 stretch without a flush: {longest_stall:?}): {:?}",
                t.elapsed(),
                replica_on(&volume_show(a, "vm"), slow)
            );
            after_drop = Some(rate);
            // A held write waits for one replica request at most: a copy or write to the
            // slow replica that cannot finish is failed after the driver's 10 s request
            // timeout, and an out-of-sync replica's failure needs no catalog transaction.
            assert!(
                longest_stall < Duration::from_secs(20),
                "writes stalled for {longest_stall:?} while {slow} was out (states {seen:?})\n\
                 --- n1 log tail ---\n{}",
                tail(&a.log(), 60)
            );
            if sc.retried {
                assert!(
                    seen.iter().any(|s| s.contains("resyncing")),
                    "{slow} was reconnected and a resync tried over the slow link within \
                     {:?} (states seen: {seen:?})\n--- n1 log tail ---\n{}",
                    sc.hold,
                    tail(&a.log(), 60)
                );
            }
        }
    }

    // Remove the fault. What entered the line proves the replication traffic took it (what
    // left it may be far less: on a very slow line most of it is still queued).
    let offered = link.offered();
    let flushes_at_heal = flushes.load(Ordering::SeqCst);
    c.lab.heal(slow);
    let delivered = link.remove();
    eprintln!(
        "delay line n1 -> {slow} / {slow} -> n1: offered {offered:?}, delivered {delivered:?}"
    );
    let offered = offered.expect("the TUN devices' counters");
    // More than a few handshakes and pings: at least four 4 KiB writes each way's worth.
    assert!(
        offered.a_to_b.bytes > 16 * 1024 && offered.b_to_a.fwd > 0,
        "n1 <-> {slow} traffic went into the delay line: {offered:?}"
    );
    assert!(
        delivered.is_some(),
        "the delay line ran to the end and reported its counters"
    );
    let t_heal = Instant::now();
    let mut resync_totals: Vec<u64> = Vec::new();
    let mut last = Value::Null;
    let healed = wait_until(Duration::from_secs(60), || {
        last = volume_show(a, "vm");
        if let Some(t) = replica_on(&last, slow).and_then(|r| r["resync"]["total_bytes"].as_u64()) {
            resync_totals.push(t);
        }
        all_in_sync(&last, n)
    });
    assert!(
        healed,
        "all {n} replicas are in sync within 60 s of removing the fault: {last}\n\
         --- n1 log tail ---\n{}\n--- {slow} log tail ---\n{}",
        tail(&a.log(), 60),
        tail(&c.agent(slow).log(), 60)
    );
    let resync_total = resync_totals.iter().max();
    eprintln!(
        "all in sync {:?} after the fault was removed (load still running: {}); \
         resync total bytes seen in volume show: {resync_total:?}",
        t_heal.elapsed(),
        !load.is_finished()
    );
    let after = if load.is_finished() {
        None
    } else {
        Some(flush_rate(&flushes, Duration::from_secs(2)))
    };

    let sum = load.join().unwrap().expect("load generator set-up");
    eprintln!("load: {sum}");
    assert!(
        sum.error.is_none(),
        "the VM never lost its disk nor saw an error: {sum}"
    );
    let s = volume_show(a, "vm");
    assert!(all_in_sync(&s, n), "still in sync after the load: {s}");
    loadgen::verify_ok(&uri, &state);

    // Resync counters: a dropped replica was resynced, and no resync (including attempts the
    // slow link cut short) ever covered more than the loaded regions.
    let events = a.cli_ok(&["events"]);
    for l in events.lines().filter(|l| mentions(l, slow)) {
        eprintln!("  event: {l}");
    }
    let regions = resync_regions(&events, Some(slow));
    let left = events
        .lines()
        .any(|l| l.contains(&format!("on node {slow} left the in-sync set")));
    eprintln!("resyncs of {slow} (regions): {regions:?}; it left the in-sync set: {left}");
    if dropped_after.is_some() || left {
        assert!(
            !regions.is_empty(),
            "{slow} was dropped, so a resync ran:\n{events}"
        );
    }
    if let Some(at_drop) = flushes_at_drop {
        // While it was out the load completed `flushes × 32` random writes over the 8
        // loaded regions; from 640 on, the chance that one region stayed untouched is below
        // 8 × (7/8)^640 ≈ 1e-36. So the regions actually dirtied are all 8, and the resync
        // that brought it back must have copied exactly those.
        let writes_while_out = 32 * (flushes_at_heal - at_drop);
        eprintln!("writes completed while {slow} was out: at least {writes_while_out}");
        if writes_while_out >= 640 {
            assert_eq!(
                regions.last(),
                Some(&LOAD_REGIONS),
                "the final resync copies the {LOAD_REGIONS} regions dirtied while {slow} \
                 was out ({writes_while_out} writes): {regions:?}\n{events}"
            );
        }
    }
    assert!(
        regions.iter().all(|&r| (1..=LOAD_REGIONS).contains(&r)),
        "the load touched {LOAD_REGIONS} of 64 regions; a resync covered more (or none): \
         {regions:?}\n{events}"
    );
    assert!(
        resync_totals.iter().all(|&b| b <= LOAD_REGIONS * MIB),
        "volume show's resync total exceeds the {LOAD_REGIONS} loaded regions: {resync_totals:?}"
    );
    for r in sc.replicas.iter().filter(|r| **r != slow) {
        assert!(
            resync_regions(&events, Some(r)).is_empty(),
            "only the slowed replica was resynced; {r} was too:\n{events}"
        );
    }

    a.cli_ok(&["volume", "detach", "vm"]);
    let f1 = replica_file(a, &id);
    for r in &sc.replicas[1..] {
        if let Err(e) = same_files(&f1, &replica_file(c.agent(r), &id)) {
            panic!("replica on {r} differs from n1's after the fault: {e}");
        }
    }
    eprintln!(
        "SUMMARY {n} replicas, {:?}: flushes/s before {before:.1}, during {during:.1}{}{}; \
         {slow} {}; resyncs {regions:?} regions; states at the end {:?}; test took {:?}",
        sc.fault,
        after_drop.map_or(String::new(), |r| format!(", after the drop {r:.1}")),
        after.map_or(String::new(), |r| format!(", after the fault {r:.1}")),
        dropped_after.map_or("stayed in sync".to_owned(), |t| format!(
            "dropped after {t:?}"
        )),
        replica_states(&s),
        t_test.elapsed()
    );
}

/// 20 ms one way (40 ms round trip) at 20 Mbit/s with 2 % loss each way: every write waits
/// for n2 twice as long as the whole write takes on a veth, but far below any timeout.
const MILD: LinkFault = LinkFault {
    delay: Duration::from_millis(20),
    rate_bits_per_s: 20_000_000,
    loss_percent: 2,
};

/// 200 ms one way at 16 kbit/s (2 KB/s) with 10 % loss: eight 4 KiB writes in flight take
/// 16 s to cross, beyond the driver's 10 s request timeout.
const SEVERE: LinkFault = LinkFault {
    delay: Duration::from_millis(200),
    rate_bits_per_s: 16_000,
    loss_percent: 10,
};

#[test]
fn mildly_slow_lossy_link_slows_writes_and_loses_nothing() {
    run(&Scenario {
        replicas: &["n1", "n2"],
        slow: "n2",
        fault: MILD,
        expect: Expect::SlowedDown,
        seed: 0x5104_1111,
        load: Duration::from_secs(30),
        hold: Duration::ZERO,
        retried: false,
    });
}

#[test]
fn replica_behind_a_link_slower_than_the_request_timeout_is_dropped_and_resynced() {
    run(&Scenario {
        replicas: &["n1", "n2"],
        slow: "n2",
        fault: SEVERE,
        expect: Expect::Dropped,
        seed: 0x5e7e_2222,
        load: Duration::from_secs(45),
        hold: Duration::from_secs(3),
        retried: false,
    });
}

#[test]
fn three_replicas_one_slow_link_drops_only_that_replica_and_resyncs_it() {
    run(&Scenario {
        replicas: &["n1", "n2", "n3"],
        slow: "n3",
        fault: SEVERE,
        expect: Expect::Dropped,
        seed: 0x3e7e_3333,
        load: Duration::from_secs(45),
        hold: Duration::from_secs(3),
        retried: false,
    });
}

/// 50 ms one way at 24 kbit/s (3 KB/s), no loss: a few writes in flight still exceed the
/// request timeout, but a reconnect gets through once the old session's queue drained
/// (tens of KB: ~15 s), and then each 1 MiB resync copy times out.
const TOO_SLOW_FOR_RESYNC: LinkFault = LinkFault {
    delay: Duration::from_millis(50),
    rate_bits_per_s: 24_000,
    loss_percent: 0,
};

#[test]
fn resync_over_a_link_too_slow_for_it_is_retried_and_completes_once_the_link_recovers() {
    run(&Scenario {
        replicas: &["n1", "n2"],
        slow: "n2",
        fault: TOO_SLOW_FOR_RESYNC,
        expect: Expect::Dropped,
        seed: 0x5e7e_4444,
        load: Duration::from_secs(55),
        hold: Duration::from_secs(30),
        retried: true,
    });
}
