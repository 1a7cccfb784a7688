//! The `ClusterStore` contract: leases, lease-bound keys, owner keys and generations,
//! watches. Written once over `C: ClusterStore`, run against the embedded backend and etcd.
//!
//! `make(namespace)` follows the same rule as in `contract_suite`. Lease timing checks use
//! a short TTL (`TEST_LEASE_TTL`) and run concurrently to keep the suite short.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bw_types::{Name, NodeId};

use crate::kv::{CatalogError, Change, Expect, Key, Prefix, Revision, TxnOp};
use crate::lease::{Acquired, ClusterStore, Held, WatchEvent};
use crate::testing::sample_volume;

/// TTL of the leases whose timing is checked: short to keep the suite quick, yet 1 s above
/// the 2 s floor so a scheduling stall on a loaded 2-core CI machine does not expire a lease
/// that is being renewed every 500 ms.
pub const TEST_LEASE_TTL: Duration = Duration::from_secs(3);

/// Contenders in the owner race.
pub const OWNER_RACERS: usize = 20;

/// Slack beyond a TTL for a lapsed lease's keys to vanish: the store checks expiry every
/// 500 ms, then commits the deletion; 2 s absorbs a busy 2-core test machine.
pub const EXPIRY_SLACK: Duration = Duration::from_secs(2);

/// Runs every cluster check, each in its own namespace.
pub async fn cluster_suite<C, F, Fut>(make: F)
where
    C: ClusterStore,
    F: Fn(String) -> Fut,
    Fut: Future<Output = C>,
{
    let (expire, keep) = (make("expire".into()).await, make("keepalive".into()).await);
    tokio::join!(
        lease_expiry_deletes_bound_keys_and_frees_the_volume(expire),
        keepalive_keeps_lease_and_revoke_ends_it(keep),
    );
    owner_race_has_one_winner_and_losers_name_it(Arc::new(make("race".into()).await)).await;
    generations_increase_across_acquire_release(make("gen".into()).await).await;
    watch_sees_changes_in_order_and_replays_from_a_revision(make("watch".into()).await).await;
}

fn node(s: &str) -> NodeId {
    NodeId(s.to_owned())
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

async fn next_event(
    w: &mut tokio::sync::mpsc::Receiver<WatchEvent>,
    within: Duration,
) -> WatchEvent {
    tokio::time::timeout(within, w.recv())
        .await
        .expect("no watch event in time")
        .expect("watch ended")
}

fn acquired(r: Result<Acquired, Held>, what: &str) -> Acquired {
    r.unwrap_or_else(|held| panic!("{what}: expected to acquire, but {held}"))
}

/// Goal: with no keepalive, the lease lapses after its TTL, its keys (liveness and owner)
/// vanish with a watchable delete, renewals are refused, and another node takes the volume
/// over at a higher generation. Method: a `TEST_LEASE_TTL` lease, a watch on `alive/`, a clock.
pub async fn lease_expiry_deletes_bound_keys_and_frees_the_volume<C: ClusterStore>(c: C) {
    let granted = Instant::now();
    let lease = c.grant(TEST_LEASE_TTL).await.unwrap();
    assert_eq!(lease.ttl, TEST_LEASE_TTL);
    let (_, at) = c.list_at(Prefix::Alive).await.unwrap();
    let mut w = c.watch_prefix(Prefix::Alive, Revision(at.0 + 1));
    let put_rev = c.register_alive(&node("n1"), lease.id).await.unwrap();
    let vol = name("held-by-n1");
    let g1 = acquired(
        c.acquire_owner(&vol, &node("n1"), lease.id).await.unwrap(),
        "n1",
    )
    .generation;
    let alive = c.list_alive().await.unwrap();
    assert_eq!(alive.len(), 1);
    assert_eq!((&alive[0].0, alive[0].1.lease), (&node("n1"), lease.id));
    let ev = next_event(&mut w, Duration::from_secs(5)).await;
    assert_eq!(
        (ev.key, ev.deleted, ev.mod_revision),
        (Key::alive(&node("n1")), false, put_rev)
    );
    let ev = next_event(&mut w, lease.ttl + EXPIRY_SLACK + Duration::from_secs(1)).await;
    let lived = granted.elapsed();
    assert!(ev.deleted && ev.key == Key::alive(&node("n1")), "{ev:?}");
    assert!(ev.mod_revision > put_rev);
    assert!(
        lived >= lease.ttl - Duration::from_millis(200) && lived <= lease.ttl + EXPIRY_SLACK,
        "a {:?} lease lapsed after {lived:?}",
        lease.ttl
    );
    assert!(c.get(&Key::alive(&node("n1"))).await.unwrap().is_none());
    assert!(
        c.get_owner(&vol).await.unwrap().is_none(),
        "the owner key went with the lease"
    );
    assert!(matches!(
        c.keep_alive(lease.id).await,
        Err(CatalogError::LeaseExpired { .. })
    ));
    assert_eq!(c.time_to_live(lease.id).await.unwrap(), None);
    let err = c.register_alive(&node("n1"), lease.id).await.unwrap_err();
    assert!(
        matches!(err, CatalogError::LeaseExpired { lease: l } if l == lease.id),
        "{err:?}"
    );
    let other = c.grant(Duration::from_secs(10)).await.unwrap();
    let g2 = acquired(
        c.acquire_owner(&vol, &node("n2"), other.id).await.unwrap(),
        "n2",
    )
    .generation;
    assert!(g2 > g1, "takeover generation {g2} must exceed {g1}");
    c.revoke(other.id).await.unwrap();
}

/// Goal: renewals every 500 ms keep a lease (and its key) alive well past its TTL;
/// revoking deletes its keys at once; a revoked lease cannot be renewed or revoked twice.
pub async fn keepalive_keeps_lease_and_revoke_ends_it<C: ClusterStore>(c: C) {
    let lease = c.grant(TEST_LEASE_TTL).await.unwrap();
    c.register_alive(&node("n-keep"), lease.id).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < lease.ttl + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ttl = c.keep_alive(lease.id).await.unwrap_or_else(|e| {
            panic!(
                "renewal at {:?} after the grant failed: {e}",
                started.elapsed()
            )
        });
        assert_eq!(ttl, lease.ttl, "renewal answered {ttl:?}");
    }
    assert!(
        c.get(&Key::alive(&node("n-keep"))).await.unwrap().is_some(),
        "kept alive"
    );
    let left = c
        .time_to_live(lease.id)
        .await
        .unwrap()
        .expect("lease alive");
    assert!(left <= lease.ttl, "{left:?}");
    c.revoke(lease.id).await.unwrap();
    assert!(
        c.get(&Key::alive(&node("n-keep"))).await.unwrap().is_none(),
        "revoke deletes at once"
    );
    assert!(matches!(
        c.keep_alive(lease.id).await,
        Err(CatalogError::LeaseExpired { .. })
    ));
    c.revoke(lease.id)
        .await
        .expect("revoking a gone lease is not an error");
}

/// Goal: `OWNER_RACERS` nodes, each with its own lease, acquire one volume at once: exactly
/// one wins, and every loser's answer names the winner, its lease and its generation.
pub async fn owner_race_has_one_winner_and_losers_name_it<C: ClusterStore>(c: Arc<C>) {
    let vol = name("contested");
    let mut tasks = Vec::new();
    for i in 0..OWNER_RACERS {
        let c = c.clone();
        let vol = vol.clone();
        tasks.push(tokio::spawn(async move {
            let lease = c.grant(Duration::from_secs(30)).await.unwrap();
            let me = node(&format!("racer-{i}"));
            (
                me.clone(),
                lease.id,
                c.acquire_owner(&vol, &me, lease.id).await.unwrap(),
            )
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            (me, lease, Ok(a)) => winners.push((me, lease, a.generation)),
            (_, _, Err(held)) => losers.push(held),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    let (winner, lease, generation) = winners.pop().unwrap();
    for held in &losers {
        assert_eq!(
            (&held.holder, held.lease, held.generation),
            (&winner, lease, generation)
        );
        assert!(
            held.remaining_ttl.is_some(),
            "the holder's TTL is reported: {held:?}"
        );
        assert!(held.to_string().contains(&winner.0), "{held}");
    }
    let owner = c.get_owner(&vol).await.unwrap().unwrap();
    assert_eq!((owner.holder, owner.generation), (winner, generation));
    c.revoke(lease).await.unwrap();
}

/// Goal: every acquisition gets a higher generation than any before; release only deletes
/// the key of the generation it names; an expired lease cannot acquire.
pub async fn generations_increase_across_acquire_release<C: ClusterStore>(c: C) {
    let vol = name("gen-vol");
    let la = c.grant(Duration::from_secs(30)).await.unwrap();
    let lb = c.grant(Duration::from_secs(30)).await.unwrap();
    let g1 = acquired(c.acquire_owner(&vol, &node("a"), la.id).await.unwrap(), "a").generation;
    // Unrelated writes in between must not confuse generations.
    c.put_volume(&sample_volume("other", "o"), Expect::Any)
        .await
        .unwrap();
    assert!(c.release_owner(&vol, g1).await.unwrap());
    assert!(
        !c.release_owner(&vol, g1).await.unwrap(),
        "already released"
    );
    let g2 = acquired(c.acquire_owner(&vol, &node("b"), lb.id).await.unwrap(), "b").generation;
    assert!(g2 > g1, "{g2} > {g1}");
    let held = c
        .acquire_owner(&vol, &node("a"), la.id)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!((held.holder, held.generation), (node("b"), g2));
    assert!(
        !c.release_owner(&vol, g1).await.unwrap(),
        "a stale generation releases nothing"
    );
    assert_eq!(c.get_owner(&vol).await.unwrap().unwrap().generation, g2);
    assert!(c.release_owner(&vol, g2).await.unwrap());
    let g3 = acquired(c.acquire_owner(&vol, &node("a"), la.id).await.unwrap(), "a").generation;
    assert!(g3 > g2, "{g3} > {g2}");
    c.revoke(lb.id).await.unwrap();
    let err = c
        .acquire_owner(&name("gen-2"), &node("b"), lb.id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CatalogError::LeaseExpired { lease } if lease == lb.id),
        "{err:?}"
    );
    c.revoke(la.id).await.unwrap();
}

/// Goal: a watch started after a listing sees every later change under its prefix once, in
/// revision order (a multi-key txn's keys at one revision), deletes flagged, other prefixes
/// left out; a second watch from a past revision replays the same history.
pub async fn watch_sees_changes_in_order_and_replays_from_a_revision<C: ClusterStore>(c: C) {
    let (rows, at) = c.list_at(Prefix::Volumes).await.unwrap();
    assert!(rows.is_empty());
    let mut w = c.watch_prefix(Prefix::Volumes, Revision(at.0 + 1));
    let a = sample_volume("a", "1");
    let b = sample_volume("b", "2");
    let r1 = c.put_volume(&a, Expect::Absent).await.unwrap();
    let two = vec![
        TxnOp::put_volume(&b, Expect::Absent),
        TxnOp::put_node(&crate::testing::sample_node("n", "n"), Expect::Any),
    ];
    let r2 = c.txn(two).await.unwrap();
    let r3 = c.put_volume(&a, Expect::At(r1)).await.unwrap();
    let del = TxnOp {
        key: Key::volume(&a.name),
        expect: Expect::At(r3),
        change: Change::Delete,
    };
    let r4 = c.txn(vec![del]).await.unwrap();
    let want = [
        ("volumes/a", r1, false),
        ("volumes/b", r2, false),
        ("volumes/a", r3, false),
        ("volumes/a", r4, true),
    ];
    let mut seen = Vec::new();
    for _ in 0..want.len() {
        seen.push(next_event(&mut w, Duration::from_secs(5)).await);
    }
    let got: Vec<_> = seen
        .iter()
        .map(|e| (e.key.as_str(), e.mod_revision, e.deleted))
        .collect();
    assert_eq!(got, want);
    assert_eq!(seen[0].value, serde_json::to_vec(&a).unwrap());
    assert!(seen[3].value.is_empty());
    let extra = tokio::time::timeout(Duration::from_millis(200), w.recv()).await;
    assert!(extra.is_err(), "nothing else under volumes/: {extra:?}");
    let mut replay = c.watch_prefix(Prefix::Volumes, r2);
    for (key, rev, deleted) in &want[1..] {
        let e = next_event(&mut replay, Duration::from_secs(5)).await;
        assert_eq!(
            (e.key.as_str(), e.mod_revision, e.deleted),
            (*key, *rev, *deleted)
        );
    }
}
