//! Goal: a replica whose pool fills up (ENOSPC) is dropped from the in-sync set while writes
//! go on with the other replica, nothing flushed is lost, and once space is freed the
//! replica is resynced (only the regions that changed) and ends byte-identical (issue 4,
//! C3 acceptance: "fills a replica's pool (a small loop-mounted filesystem) and frees it").
//! Method: one node's data directory is a small ext4 file system on a loop device (the
//! agent is stopped, its data copied onto the new file system, mounted over its data dir,
//! and restarted). Replicas on n1 and n2, attached on n1, our verifying load generator
//! writing 4 KiB blocks with periodic flushes into the first 16 MiB. Mid-load the test
//! fills the small pool with a filler file so the next allocating write there fails with
//! ENOSPC, checks that the load goes on and the replica left the in-sync set, deletes the
//! filler, and waits for all replicas to be in sync. Test 1 fills the remote replica's pool
//! (n2), test 2 the attachment's own local replica's pool (n1: reads must then come from
//! n2). Both end with: every flushed block reads back, the resyncs copied at most the 16
//! regions the load could touch, and after detaching the replica files are byte-identical.
//! Needs root (loop devices, mount).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::agent::tail;
use testkit::cluster::inspect::{
    all_in_sync, metric, replica_file, replica_in_sync, replica_on, replica_states, resync_regions,
    same_files, volume_show,
};
use testkit::cluster::Cluster;
use testkit::cmd::run_ok;
use testkit::e2e::{losetup, Cleanup};
use testkit::loadgen::{self};
use testkit::{require_root, require_tool, start_cluster, wait_until};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);
/// The small pool's size: room for the agent's state and a 32 MiB sparse volume.
const POOL_BYTES: u64 = 96 * MIB;
/// Regions (1 MiB) the load can touch.
const LOAD_REGIONS: u64 = 16;

/// Free bytes of the file system holding `path` (`df`).
fn free_bytes(path: &Path) -> u64 {
    let out = run_ok(
        Command::new("df").args(["-B1", "--output=avail"]).arg(path),
        T,
    );
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df printed {out:?}"))
}

fn tools_present() -> bool {
    require_root()
        && ["losetup", "mkfs.ext4", "mount", "umount", "fallocate", "df"]
            .iter()
            .all(|t| require_tool(t))
}

/// Puts node `name`'s data directory on a fresh `POOL_BYTES` ext4 file system on a loop
/// device: stops the agent, copies its data over, mounts, restarts. Returns the cleanup
/// guard (lazy unmount, loop detach) to be dropped after the cluster's agents stopped.
fn small_pool(c: &mut Cluster, name: &str) -> Cleanup {
    let mut cleanup = Cleanup::new();
    let agent = c.agent_mut(name);
    agent.stop();
    let data = agent.data_dir();
    let scratch = agent.scratch_dir();
    let image = scratch.join("pool.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(POOL_BYTES))
        .expect("pool image");
    // No reserved blocks: the agent runs as root and could use them, the filler too.
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-m", "0", "-E", "nodiscard"])
            .arg(&image),
        T,
    );
    let dev = losetup(&image, &mut cleanup);
    let staging = scratch.join("pool-staging");
    std::fs::create_dir_all(&staging).unwrap();
    run_ok(Command::new("mount").arg(&dev).arg(&staging), T);
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", data.display()))
            .arg(&staging),
        T,
    );
    run_ok(Command::new("umount").arg(&staging), T);
    run_ok(Command::new("mount").arg(&dev).arg(&data), T);
    cleanup.push_cmd("umount", &["-l", &data.to_string_lossy()]);
    eprintln!(
        "{name}: data dir {} is now a {} MiB ext4 on {dev} ({} MiB free)",
        data.display(),
        POOL_BYTES / MIB,
        free_bytes(&data) / MIB
    );
    agent.restart();
    cleanup
}

/// Fills the file system of `dir` until at most `leave` bytes are free, with files in a
/// `filler` directory (returned). ext4 needs room for extent metadata, so a single
/// `fallocate` of all the free space fails: fill in shrinking steps, a bounded number.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let filler = dir.join("filler");
    std::fs::create_dir_all(&filler).unwrap();
    let mut step = 0;
    let mut len = free_bytes(dir).saturating_sub(leave);
    while len >= 4096 && step < 40 {
        let f = filler.join(step.to_string());
        let ok = Command::new("fallocate")
            .args(["-l", &len.to_string()])
            .arg(&f)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_file(&f);
        }
        step += 1;
        let free = free_bytes(dir);
        if free <= leave {
            break;
        }
        len = if ok { free - leave } else { len / 2 };
    }
    let free = free_bytes(dir);
    assert!(
        free <= leave.max(64 * 1024) * 2,
        "could not fill {} ({free} bytes still free after {step} steps)",
        dir.display()
    );
    eprintln!(
        "filled {} in {step} steps, {} KiB free now",
        dir.display(),
        free / 1024
    );
    filler
}

#[track_caller]
fn progress(c: &Cluster, flushes: &AtomicU64, n: u64, what: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || flushes.load(Ordering::SeqCst)
            >= n),
        "{what}: the load made no progress in 30 s ({} flushes, wanted {n})\n\
         --- n1 log tail ---\n{}\n--- n2 log tail ---\n{}",
        flushes.load(Ordering::SeqCst),
        tail(&c.agent("n1").log(), 40),
        tail(&c.agent("n2").log(), 40)
    );
}

/// The whole scenario with `full`'s pool filled and freed.
fn pool_fills_and_frees(full: &str, seed: u64) {
    if !tools_present() {
        return;
    }
    let Some(mut c) = start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])]) else {
        return;
    };
    let pool = small_pool(&mut c, full);
    scenario(&c, full, seed);
    // Agents first (they hold the mount), then the pool, then the lab: its directory holds
    // the mount point, and removing it while mounted left the tree behind in $TMPDIR.
    let lab = c.lab.clone();
    drop(c);
    drop(pool);
    drop(lab);
}

fn scenario(c: &Cluster, full: &str, seed: u64) {
    let a = c.agent("n1");
    a.cli_ok(&[
        "volume", "create", "vm", "--size", "32M", "--node", "n1", "--node", "n2",
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
    let state = a.scratch_dir().join("pool.state");
    let (load, flushes) = loadgen::spawn_write(
        &uri,
        &state,
        LOAD_REGIONS * MIB,
        seed,
        Duration::from_secs(40),
    );

    progress(c, &flushes, 10, "before the pool fills");
    let data = c.agent(full).data_dir();
    let filler = fill(&data, 64 * 1024);
    let t_full = Instant::now();

    // The next allocating write on the full pool fails; the replica leaves the set and the
    // load goes on with the other one.
    let mut last = Value::Null;
    let dropped = wait_until(Duration::from_secs(30), || {
        last = volume_show(a, "vm");
        replica_on(&last, full).is_some_and(|r| !replica_in_sync(r))
    });
    assert!(
        dropped,
        "{full}'s replica left the in-sync set within 30 s of its pool filling: {last}\n\
         --- n1 log tail ---\n{}",
        tail(&a.log(), 60)
    );
    eprintln!(
        "{full} dropped {:?} after the fill: {}",
        t_full.elapsed(),
        replica_on(&last, full).expect("replica")
    );
    let other = if full == "n1" { "n2" } else { "n1" };
    assert!(
        replica_on(&last, other).is_some_and(replica_in_sync),
        "{other}'s replica stays in sync: {last}"
    );
    let before = flushes.load(Ordering::SeqCst);
    progress(
        c,
        &flushes,
        before + 20,
        &format!("with {full}'s pool full (writes must go on with {other})"),
    );
    // While the pool stays full the replica keeps failing its resync: it must not be
    // reported in sync, and the agent must stay up.
    std::thread::sleep(Duration::from_secs(3));
    let s = volume_show(a, "vm");
    assert!(
        replica_on(&s, full).is_some_and(|r| !replica_in_sync(r)),
        "{full} cannot be in sync while its pool is full: {s}"
    );
    assert!(
        c.agent(full).is_running(),
        "{full}'s agent survives a full pool"
    );
    // How far it lags is shown in `volume show` and in the attachment's metrics.
    let lag = replica_on(&s, full).and_then(|r| r["lag_bytes"].as_u64());
    assert!(
        lag.is_some_and(|l| l > 0 && l <= LOAD_REGIONS * MIB),
        "{full}'s lag is the regions written since it failed (at most {LOAD_REGIONS} MiB): {s}"
    );
    let rid = replica_on(&s, full)
        .and_then(|r| r["id"].as_u64())
        .expect("id");
    let labels = format!("volume=\"vm\",replica=\"{rid}\",node=\"{full}\"");
    assert_eq!(
        metric(a, "blockwarden_replica_in_sync", &labels),
        Some(0.0),
        "metrics show {full} out of sync"
    );
    let lag_metric = metric(a, "blockwarden_replica_lag_bytes", &labels);
    assert!(
        lag_metric.is_some_and(|l| l > 0.0),
        "metrics show {full}'s lag: {lag_metric:?}"
    );
    assert_eq!(
        metric(a, "blockwarden_volume_in_sync_replicas", "volume=\"vm\""),
        Some(1.0)
    );
    // The activity log is exported; a volume smaller than the log never evicts.
    let al = metric(
        a,
        "blockwarden_volume_activity_log_regions",
        "volume=\"vm\"",
    );
    assert!(
        al.is_some_and(|n| n <= 4096.0),
        "activity log regions: {al:?}"
    );
    assert_eq!(
        metric(
            a,
            "blockwarden_volume_activity_log_evictions_total",
            "volume=\"vm\""
        ),
        Some(0.0)
    );
    let events = a.cli_ok(&["events"]);
    let failures: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("replica.failed") || l.contains("degraded"))
        .collect();
    eprintln!("failure events while full: {}", failures.len());
    for l in &failures {
        eprintln!("  {l}");
    }
    assert!(
        failures.iter().any(|l| l.to_lowercase().contains("space")),
        "an event names the cause (no space):\n{events}"
    );

    std::fs::remove_dir_all(&filler).expect("remove the filler");
    let t_free = Instant::now();
    eprintln!(
        "freed {}: {} MiB free",
        data.display(),
        free_bytes(&data) / MIB
    );
    let mut last = Value::Null;
    let healed = wait_until(Duration::from_secs(60), || {
        last = volume_show(a, "vm");
        all_in_sync(&last, 2)
    });
    assert!(
        healed,
        "both replicas in sync within 60 s of freeing the pool: {last}\n\
         --- n1 log tail ---\n{}\n--- n2 log tail ---\n{}",
        tail(&a.log(), 60),
        tail(&c.agent("n2").log(), 60)
    );
    eprintln!("in sync {:?} after the pool was freed", t_free.elapsed());
    assert_eq!(
        metric(a, "blockwarden_replica_lag_bytes", &labels),
        Some(0.0),
        "no lag once in sync"
    );
    let copied = metric(a, "blockwarden_replica_resynced_bytes_total", &labels);
    assert!(
        copied.is_some_and(|b| b > 0.0 && b <= (2 * LOAD_REGIONS * MIB) as f64),
        "the resync's bytes are counted, close to the touched regions: {copied:?}"
    );

    let sum = load.join().unwrap().expect("load generator set-up");
    eprintln!("load: {sum}");
    assert!(
        sum.error.is_none(),
        "the VM never lost its disk nor saw an error: {sum}"
    );
    loadgen::verify_ok(&uri, &state);

    let events = a.cli_ok(&["events"]);
    let regions = resync_regions(&events, None);
    eprintln!("resyncs (regions): {regions:?}");
    assert!(!regions.is_empty(), "a resync ran:\n{events}");
    assert!(
        regions.iter().all(|&r| r <= LOAD_REGIONS),
        "the load touched {LOAD_REGIONS} of 32 regions; a resync copied more: {regions:?}\n{events}"
    );

    a.cli_ok(&["volume", "detach", "vm"]);
    let (f1, f2) = (replica_file(a, &id), replica_file(c.agent("n2"), &id));
    if let Err(e) = same_files(&f1, &f2) {
        panic!("replicas differ after the pool was freed: {e}");
    }
}

#[test]
fn remote_replica_with_a_full_pool_is_dropped_and_resynced_once_space_is_freed() {
    pool_fills_and_frees("n2", 0x0f11_0002);
}

#[test]
fn local_replica_with_a_full_pool_is_dropped_and_resynced_once_space_is_freed() {
    pool_fills_and_frees("n1", 0x0f11_0001);
}
