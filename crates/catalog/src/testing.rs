//! The contract every `Catalog` backend must meet, written once over `C: Catalog` so the
//! embedded and the etcd backends run the very same checks.
//!
//! `make(namespace)` must return a catalog over the storage named `namespace`: empty the first
//! time, and the same storage again when called with the same namespace after the previous
//! instance was dropped (embedded: a file per namespace; etcd: a key prefix per namespace).
//! Backends should be configured with a small event retention (e.g.
//! [`CONTRACT_EVENT_RETENTION`]): the trimming check appends `retention + 5` events.
//!
//! - [`cluster`]: the `ClusterStore` suite (leases, owners, generations, watches).
//! - [`etcd`]: a throwaway etcd (one member or a cluster) for tests.

pub mod cluster;
pub mod etcd;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bw_types::{Generation, Name, NodeId, VolumeId};

use crate::kv::{Catalog, CatalogError, Change, Expect, Key, Revision, TxnOp};
use crate::records::{Level, Mode, NewEvent, NodeRecord, VolumeRecord, VolumeState};

/// A retention small enough that the trimming check stays quick.
pub const CONTRACT_EVENT_RETENTION: usize = 8;

/// Concurrent creators in the create-if-absent race.
const RACERS: usize = 16;

/// Runs every contract check, each in its own namespace.
pub async fn contract_suite<C, F, Fut>(make: F)
where
    C: Catalog,
    F: Fn(String) -> Fut,
    Fut: Future<Output = C>,
{
    cas_put_and_conflicts(make("cas".into()).await).await;
    create_if_absent_race_has_one_winner(Arc::new(make("race".into()).await)).await;
    delete_with_stale_revision_is_refused(make("delete".into()).await).await;
    multi_key_txn_is_all_or_nothing(make("txn".into()).await).await;
    list_is_ordered_and_per_prefix(make("list".into()).await).await;
    events_are_sequenced_and_trimmed(make("events".into()).await).await;
    follow_sees_history_then_live(Arc::new(make("follow".into()).await)).await;
    let first = make("reopen".into()).await;
    let before = write_for_reopen(&first).await;
    drop(first);
    check_after_reopen(make("reopen".into()).await, before).await;
}

/// A volume record with the given name and id, otherwise typical.
pub fn sample_volume(name: &str, id: &str) -> VolumeRecord {
    VolumeRecord {
        id: VolumeId(id.to_owned()),
        name: Name::new(name).unwrap(),
        size_bytes: 1 << 30,
        replicas: 1,
        mode: Mode::Sync,
        spread: None,
        pinned_nodes: Vec::new(),
        state: VolumeState::Creating,
        created_at_ms: 1,
        generation: Generation(0),
        attachment: None,
        replicas_placed: Vec::new(),
        resync_rate_bytes_per_s: None,
        min_in_sync: None,
        last_replica_id: 0,
    }
}

pub fn sample_node(name: &str, id: &str) -> NodeRecord {
    NodeRecord {
        id: NodeId(id.to_owned()),
        name: Name::new(name).unwrap(),
        labels: [("room".to_owned(), "a".to_owned())].into(),
        nbd_addr: "127.0.0.1:10809".into(),
        api_addr: "127.0.0.1:7800".into(),
        peer_addr: None,
        capacity_bytes: 100 << 30,
        free_bytes: 50 << 30,
        started_at_ms: 1,
        last_seen_ms: 2,
        replicas: Default::default(),
    }
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn assert_conflict(
    r: Result<impl std::fmt::Debug, CatalogError>,
    found: Option<Revision>,
    what: &str,
) {
    match r {
        Err(CatalogError::Conflict { found: f, .. }) => {
            assert_eq!(f, found, "{what}: conflict's found revision")
        }
        other => panic!("{what}: expected a conflict, got {other:?}"),
    }
}

/// Goal: read-modify-write with revisions; stale and create-over-existing writes are refused.
pub async fn cas_put_and_conflicts<C: Catalog>(c: C) {
    let mut v = sample_volume("vol-a", "id-a");
    assert!(c.get_volume(&v.name).await.unwrap().is_none());
    let r1 = c.put_volume(&v, Expect::Absent).await.unwrap();
    let (got, rev) = c.get_volume(&v.name).await.unwrap().unwrap();
    assert_eq!((got, rev), (v.clone(), r1));
    assert_conflict(
        c.put_volume(&v, Expect::Absent).await,
        Some(r1),
        "create over existing",
    );
    v.state = VolumeState::Ready;
    let r2 = c.put_volume(&v, Expect::At(r1)).await.unwrap();
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    v.size_bytes *= 2;
    assert_conflict(
        c.put_volume(&v, Expect::At(r1)).await,
        Some(r2),
        "stale revision",
    );
    let (got, rev) = c.get_volume(&v.name).await.unwrap().unwrap();
    assert_eq!(
        (got.state, got.size_bytes, rev),
        (VolumeState::Ready, 1 << 30, r2),
        "a refused write changes nothing"
    );
    assert_conflict(
        c.put_volume(&sample_volume("ghost", "g"), Expect::At(r2))
            .await,
        None,
        "update of missing key",
    );
    let r3 = c.put_volume(&v, Expect::Any).await.unwrap();
    assert!(r3 > r2);
}

/// Goal: N tasks creating one name at once → exactly one wins; the others see a conflict.
pub async fn create_if_absent_race_has_one_winner<C: Catalog>(c: Arc<C>) {
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let v = sample_volume("contested", &format!("id-{i}"));
            (i, c.put_volume(&v, Expect::Absent).await)
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match r {
            Ok(_) => winners.push(i),
            Err(e) => assert!(e.is_conflict(), "loser {i} must see a conflict, got {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one creator wins: {winners:?}");
    let (got, _) = c.get_volume(&name("contested")).await.unwrap().unwrap();
    assert_eq!(
        got.id.0,
        format!("id-{}", winners[0]),
        "the stored record is the winner's"
    );
}

/// Goal: a delete guarded by an old revision is refused and leaves the record in place.
pub async fn delete_with_stale_revision_is_refused<C: Catalog>(c: C) {
    let v = sample_volume("doomed", "id-d");
    let r1 = c.put_volume(&v, Expect::Absent).await.unwrap();
    let r2 = c.put_volume(&v, Expect::At(r1)).await.unwrap();
    assert_conflict(
        c.delete_volume(&v.name, Expect::At(r1)).await,
        Some(r2),
        "stale delete",
    );
    assert!(
        c.get_volume(&v.name).await.unwrap().is_some(),
        "record survives a refused delete"
    );
    c.delete_volume(&v.name, Expect::At(r2)).await.unwrap();
    assert!(c.get_volume(&v.name).await.unwrap().is_none());
    assert_conflict(
        c.delete_volume(&v.name, Expect::At(r2)).await,
        None,
        "delete of missing key",
    );
    // Re-created, the key gets a fresh revision, never one seen before.
    let r3 = c.put_volume(&v, Expect::Absent).await.unwrap();
    assert!(r3 > r2);
}

/// Goal: a transaction over several keys applies all or nothing, all at one revision.
pub async fn multi_key_txn_is_all_or_nothing<C: Catalog>(c: C) {
    let v = sample_volume("vol-t", "id-t");
    let n = sample_node("node-t", "n1");
    let rv = c.put_volume(&v, Expect::Absent).await.unwrap();
    let mut v2 = v.clone();
    v2.state = VolumeState::Ready;
    let bad = vec![
        TxnOp::put_volume(&v2, Expect::At(rv)),
        TxnOp::put_node(&n, Expect::At(Revision(rv.0 + 1000))),
    ];
    assert_conflict(c.txn(bad).await, None, "second op's expectation fails");
    assert_eq!(
        c.get_volume(&v.name).await.unwrap().unwrap().0.state,
        VolumeState::Creating,
        "first op not applied"
    );
    assert!(c.get_node(&n.id).await.unwrap().is_none());
    let good = vec![
        TxnOp::put_volume(&v2, Expect::At(rv)),
        TxnOp::put_node(&n, Expect::Absent),
    ];
    let r = c.txn(good).await.unwrap();
    assert_eq!(c.get_volume(&v.name).await.unwrap().unwrap().1, r);
    assert_eq!(c.get_node(&n.id).await.unwrap().unwrap(), (n.clone(), r));
    // A check-only op guards without writing.
    let check = TxnOp {
        key: Key::node(&n.id),
        expect: Expect::At(Revision(r.0 + 1000)),
        change: Change::Check,
    };
    assert_conflict(
        c.txn(vec![check, TxnOp::delete_volume(&v.name, Expect::Any)])
            .await,
        Some(r),
        "check op",
    );
    assert!(c.get_volume(&v.name).await.unwrap().is_some());
}

/// Goal: listings hold only their family, in name order, each with its own revision.
pub async fn list_is_ordered_and_per_prefix<C: Catalog>(c: C) {
    for (n, id) in [("b", "2"), ("a", "1"), ("c.3", "3")] {
        c.put_volume(&sample_volume(n, id), Expect::Absent)
            .await
            .unwrap();
    }
    c.put_node(&sample_node("node-1", "n1"), Expect::Any)
        .await
        .unwrap();
    let vols = c.list_volumes().await.unwrap();
    let names: Vec<_> = vols.iter().map(|(v, _)| v.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c.3"]);
    for (v, rev) in &vols {
        assert_eq!(c.get_volume(&v.name).await.unwrap().unwrap().1, *rev);
    }
    let nodes = c.list_nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].0.name.as_str(), "node-1");
}

/// Goal: events get seq 1, 2, …; only the newest `event_retention()` are kept.
pub async fn events_are_sequenced_and_trimmed<C: Catalog>(c: C) {
    assert_eq!(c.last_event_seq().await.unwrap(), 0);
    assert!(c.events_since(0, 10).await.unwrap().is_empty());
    let keep = c.event_retention();
    let total = keep as u64 + 5;
    for i in 1..=total {
        let ev = NewEvent::now(Level::Info, "test.event", format!("event {i}")).volume("v");
        assert_eq!(c.append_event(ev).await.unwrap(), i);
    }
    assert_eq!(c.last_event_seq().await.unwrap(), total);
    let all = c.events_since(0, usize::MAX).await.unwrap();
    assert_eq!(all.len(), keep, "trimmed to the retention");
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (total - keep as u64 + 1..=total).collect();
    assert_eq!(seqs, want, "the newest are kept, oldest first");
    assert_eq!(all.last().unwrap().message, format!("event {total}"));
    assert_eq!(all.last().unwrap().volume.as_deref(), Some("v"));
    let page = c.events_since(total - 3, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [total - 2, total - 1]
    );
    assert!(c.events_since(u64::MAX, 10).await.unwrap().is_empty());
}

/// Goal: a follower gets history after its cursor, then live events, no gaps or duplicates.
pub async fn follow_sees_history_then_live<C: Catalog>(c: Arc<C>) {
    for i in 1..=3 {
        c.append_event(NewEvent::now(
            Level::Warning,
            "test.old",
            format!("old {i}"),
        ))
        .await
        .unwrap();
    }
    let mut rx = crate::follow_events(c.clone(), 1);
    for i in 4..=6 {
        c.append_event(NewEvent::now(Level::Error, "test.new", format!("new {i}")))
            .await
            .unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        let ev = ev
            .expect("follower stalled")
            .expect("follower ended")
            .unwrap();
        seqs.push(ev.seq);
    }
    assert_eq!(seqs, [2, 3, 4, 5, 6]);
    let extra = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
    assert!(
        extra.is_err(),
        "no duplicate after the last event: {extra:?}"
    );
}

/// Writes state for `check_after_reopen`; returns (volume revision, last event seq).
async fn write_for_reopen<C: Catalog>(c: &C) -> (Revision, u64) {
    let rev = c
        .put_volume(&sample_volume("kept", "id-k"), Expect::Absent)
        .await
        .unwrap();
    let seq = c
        .append_event(NewEvent::now(Level::Info, "volume.created", "kept"))
        .await
        .unwrap();
    (rev, seq)
}

/// Goal: what was committed before a drop is there after reopening, and counters go on.
async fn check_after_reopen<C: Catalog>(c: C, (rev, seq): (Revision, u64)) {
    let (v, got_rev) = c
        .get_volume(&name("kept"))
        .await
        .unwrap()
        .expect("volume survives reopen");
    assert_eq!((v, got_rev), (sample_volume("kept", "id-k"), rev));
    assert_eq!(c.last_event_seq().await.unwrap(), seq);
    let next = c
        .put_volume(&sample_volume("kept", "id-k"), Expect::At(rev))
        .await
        .unwrap();
    assert!(next > rev, "revisions keep growing across reopen");
    let s = c
        .append_event(NewEvent::now(Level::Info, "volume.created", "again"))
        .await
        .unwrap();
    assert_eq!(s, seq + 1, "event seqs keep growing across reopen");
}
