//! The etcd backend against a real etcd: the shared catalog and cluster-store contracts,
//! events shared between nodes, and member faults on a three-member cluster.
//! Without the `etcd` binary each test prints a loud skip notice (and fails under `CI`).

use std::time::{Duration, Instant};

use bw_types::{Name, NodeId};
use catalog::testing::cluster::cluster_suite;
use catalog::testing::etcd::{etcd_or_skip, EtcdProcess};
use catalog::testing::{contract_suite, sample_volume, CONTRACT_EVENT_RETENTION};
use catalog::{
    Catalog, CatalogError, ClusterStore, EtcdCatalog, EtcdOptions, Expect, Level, NewEvent, Prefix,
    Revision,
};

/// Longest a call may take to fail once quorum is lost (the issue: "fail fast").
/// The client retries rounds of "no leader" answers for its 3.5 s budget (an election looks
/// the same), so "fast" means within that budget plus scheduling slack.
const FAIL_FAST: Duration = Duration::from_millis(4500);

async fn connect(endpoints: &[String], prefix: &str) -> EtcdCatalog {
    let opts = EtcdOptions {
        event_retention: CONTRACT_EVENT_RETENTION,
        ..EtcdOptions::default()
    };
    EtcdCatalog::connect(endpoints, prefix, opts).await.unwrap()
}

// Goal: the etcd backend meets the very contract the embedded backend meets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_meets_catalog_contract() {
    if !etcd_or_skip("etcd_meets_catalog_contract") {
        return;
    }
    let etcd = EtcdProcess::start_single().await;
    let eps = etcd.endpoints();
    contract_suite(|ns| {
        let eps = eps.clone();
        async move { connect(&eps, &format!("/bw-contract/{ns}/")).await }
    })
    .await;
}

// Goal: leases, owner keys, generations and watches behave on etcd as on the embedded store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_meets_cluster_store_contract() {
    if !etcd_or_skip("etcd_meets_cluster_store_contract") {
        return;
    }
    let etcd = EtcdProcess::start_single().await;
    let eps = etcd.endpoints();
    cluster_suite(|ns| {
        let eps = eps.clone();
        async move { connect(&eps, &format!("/bw-cluster/{ns}/")).await }
    })
    .await;
}

// Goal: an event appended through one node reaches the live feed of another (both agents'
// `events --follow` see the whole cluster), and seqs stay dense under concurrent appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_any_node_reach_every_live_feed() {
    if !etcd_or_skip("events_from_any_node_reach_every_live_feed") {
        return;
    }
    let etcd = EtcdProcess::start_single().await;
    let a = connect(&etcd.endpoints(), "/bw-events/").await;
    let b = connect(&etcd.endpoints(), "/bw-events/").await;
    let mut live = a.subscribe_events();
    let (x, y) = tokio::join!(
        b.append_event(NewEvent::now(Level::Info, "node.joined", "from b")),
        a.append_event(NewEvent::now(Level::Info, "node.joined", "from a")),
    );
    let mut seqs = [x.unwrap(), y.unwrap()];
    seqs.sort();
    assert_eq!(seqs, [1, 2], "dense seqs across nodes");
    for want in 1..=2 {
        let ev = tokio::time::timeout(Duration::from_secs(5), live.recv()).await;
        assert_eq!(ev.expect("live event in time").unwrap().seq, want);
    }
}

/// One of everything an agent does, each expected to succeed.
async fn everything_works(c: &EtcdCatalog, round: &str) {
    let vol = sample_volume(&format!("vol-{round}"), round);
    let r = c.put_volume(&vol, Expect::Absent).await.unwrap();
    assert_eq!(c.get_volume(&vol.name).await.unwrap().unwrap().1, r);
    assert!(!c.list_volumes().await.unwrap().is_empty());
    c.append_event(NewEvent::now(Level::Info, "test", round))
        .await
        .unwrap();
    let lease = c.grant(Duration::from_secs(10)).await.unwrap();
    c.keep_alive(lease.id).await.unwrap();
    let node = NodeId(format!("node-{round}"));
    c.acquire_owner(&vol.name, &node, lease.id)
        .await
        .unwrap()
        .unwrap();
}

/// Asserts that `what` fails within `FAIL_FAST` with the operator-facing message.
async fn fails_fast<T: std::fmt::Debug>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, CatalogError>>,
) {
    let started = Instant::now();
    let r = f.await;
    let took = started.elapsed();
    let err = r.expect_err(what);
    let msg = err.to_string();
    eprintln!("{what}: failed in {took:?}: {msg}");
    assert!(took < FAIL_FAST, "{what} took {took:?} to fail");
    assert!(
        err.is_unavailable() && msg.starts_with("cluster store unavailable: "),
        "{what}: {msg}"
    );
}

// Goal: on a three-member cluster, losing one member changes nothing (including a watch
// connected to it, which resumes elsewhere without losing changes); losing two makes every
// call fail fast with "cluster store unavailable". Method: SIGKILL members, time the calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_lost_is_harmless_two_lost_fail_fast() {
    if !etcd_or_skip("one_member_lost_is_harmless_two_lost_fail_fast") {
        return;
    }
    let mut etcd = EtcdProcess::start_cluster(3).await;
    let leader = etcd.leader().await.expect("a leader");
    let follower = (leader + 1) % etcd.len();
    let mut eps = etcd.endpoints();
    eps.swap(0, follower); // the watch below connects to the follower we will kill
    let c = connect(&eps, "/bw-faults/").await;
    everything_works(&c, "before").await;
    let (_, at) = c.list_at(Prefix::Volumes).await.unwrap();
    let mut watch = c.watch_prefix(Prefix::Volumes, Revision(at.0 + 1));
    tokio::time::sleep(Duration::from_millis(300)).await; // let the watch connect

    etcd.kill(follower);
    let started = Instant::now();
    everything_works(&c, "one-down").await;
    eprintln!("one member down: a full round took {:?}", started.elapsed());
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.recv()).await;
    let ev = ev.expect("the watch resumed on another member").unwrap();
    assert_eq!(ev.key.as_str(), "volumes/vol-one-down");

    etcd.kill(leader);
    let vol = Name::new("vol-no-quorum").unwrap();
    let node = NodeId("n".into());
    fails_fast("get", c.get_volume(&vol)).await;
    fails_fast("list", c.list_volumes()).await;
    fails_fast(
        "put",
        c.put_volume(&sample_volume("vol-no-quorum", "x"), Expect::Absent),
    )
    .await;
    fails_fast(
        "append_event",
        c.append_event(NewEvent::now(Level::Info, "t", "x")),
    )
    .await;
    fails_fast("grant", c.grant(Duration::from_secs(10))).await;
    fails_fast(
        "acquire_owner",
        c.acquire_owner(&vol, &node, catalog::LeaseId(1)),
    )
    .await;
    let fresh = EtcdCatalog::connect(&eps, "/bw-faults/", EtcdOptions::default());
    fails_fast("connect", fresh).await;
}
