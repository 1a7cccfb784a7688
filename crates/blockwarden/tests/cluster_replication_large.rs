//! Goal: large writes (1 MiB: bodies that bypass the readers' buffers on the NBD socket and
//! on the peer connection, and fill the peer's in-flight byte limit fastest) reach both
//! replicas intact, with no replica dropped on the way, and every flushed block reads back.
//! (The other cluster tests write 4 KiB blocks.)
//! Method: replicas on n1 and n2 (namespaces, veth), attached on n1; our verifying load
//! generator writes 1 MiB blocks at queue depth 8 with periodic flushes for a few seconds.
//! Then: the load kept its connection, n1's events show no failed or degraded replica, both
//! replicas are in sync, every flushed block reads back, and after detaching the replica
//! files are byte-identical. (A body sent short or out of order shows as a dropped replica
//! or differing files: an experimental zero-copy body path did drop n2 this way under the
//! benchmark, BENCHMARKS.md session 6.)

use std::time::Duration;

use testkit::cluster::inspect::{all_in_sync, replica_file, same_files, volume_show};
use testkit::loadgen::{self, WriteOptions};
use testkit::start_cluster;

const MIB: u64 = 1 << 20;

#[test]
fn large_writes_reach_both_replicas_without_dropping_one() {
    let Some(c) = start_cluster!(&[("n1", &[]), ("n2", &[])]) else {
        return;
    };
    let a = c.agent("n1");
    a.cli_ok(&[
        "volume",
        "create",
        "big",
        "--size",
        "128M",
        "--replicas",
        "2",
        "--node",
        "n1",
        "--node",
        "n2",
    ]);
    let s = volume_show(a, "big");
    assert!(all_in_sync(&s, 2), "{s}");
    let id = s["id"].as_str().expect("volume id").to_owned();
    a.cli_ok(&["volume", "attach", "big"]);
    let uri = a.nbd_uri("big");

    let state = a.scratch_dir().join("load.state");
    let mut o = WriteOptions::new(&uri, &state);
    o.block_size = MIB as u32;
    o.blocks = Some(96);
    o.flush_every = 16;
    o.queue_depth = 8;
    o.seed = 0x0b16_b0d7;
    o.duration = Duration::from_secs(8);
    let sum = loadgen::write(&o).expect("load generator set-up");
    eprintln!("load: {sum}");
    assert!(!sum.connection_lost, "the VM never lost its disk: {sum}");

    let events = a.cli_ok(&["events"]);
    let bad: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("replica.failed") || l.contains("volume.degraded"))
        .collect();
    assert!(
        bad.is_empty(),
        "a replica was dropped under plain large writes:\n{}",
        bad.join("\n")
    );
    let s = volume_show(a, "big");
    assert!(all_in_sync(&s, 2), "both replicas in sync: {s}");

    loadgen::verify_ok(&uri, &state);

    a.cli_ok(&["volume", "detach", "big"]);
    let (f1, f2) = (replica_file(a, &id), replica_file(c.agent("n2"), &id));
    if let Err(e) = same_files(&f1, &f2) {
        panic!("replicas differ after large writes: {e}");
    }
}
