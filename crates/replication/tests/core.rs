//! Scenario tests of the replication core, one rule each, driven event by event.
//!
//! Goal: pin each rule of docs/design/replication.md to a readable scenario (the simulation
//! covers their combinations under faults). Method: feed events by hand, look at effects.

use bw_types::Generation;
use replication::{
    AttachInit, CatalogOp, Completion, Config, CopyPurpose, Effect, Event, Notice, OpId,
    RegionIndex, RegionSet, ReplicaId, ReplicaInit, ReplicaOutcome, Replicator, RequestError,
    RequestId, SessionId, StopReason, TxnOutcome,
};

const KIB: u64 = 1024;

fn config() -> Config {
    let mut c = Config::new(16 * KIB);
    c.region_size_bytes = KIB;
    c.max_active_regions = 4;
    c.al_hot_ms = 10;
    c.catalog_retry_ms = 50;
    c.connect_timeout_ms = 100;
    c
}

fn set(v: &[u64]) -> RegionSet {
    v.iter().map(|x| RegionIndex(*x)).collect()
}

struct H {
    core: Replicator,
    now: u64,
}

fn rid(r: u64) -> ReplicaId {
    ReplicaId(r)
}

fn sess(r: u64) -> SessionId {
    SessionId(100 + r)
}

impl H {
    /// An attachment with `in_sync[i]` for replica i, generations `gens[i]`, previous log.
    fn new(in_sync: &[bool], gens: &[u64], prev_al: &[u64]) -> H {
        let replicas = in_sync
            .iter()
            .enumerate()
            .map(|(i, s)| ReplicaInit {
                id: rid(i as u64),
                local: i == 0,
                in_sync: *s,
                last_in_sync_generation: Generation(gens[i]),
                dirty: RegionSet::new(),
            })
            .collect();
        let init = AttachInit {
            generation: Generation(7),
            replicas,
            previous_activity_log: set(prev_al),
            now_ms: 0,
        };
        H {
            core: Replicator::new(config(), init),
            now: 0,
        }
    }

    /// Two in-sync replicas, both connected, serving.
    fn serving_pair() -> H {
        let mut h = H::new(&[true, true], &[1, 1], &[]);
        h.ev(Event::ReplicaUp {
            replica: rid(0),
            session: sess(0),
        });
        let e = h.ev(Event::ReplicaUp {
            replica: rid(1),
            session: sess(1),
        });
        assert!(e
            .iter()
            .any(|e| matches!(e, Effect::Notify(Notice::Serving))));
        h
    }

    fn ev(&mut self, e: Event) -> Vec<Effect> {
        let mut out = Vec::new();
        self.core.apply(e, &mut out);
        out
    }

    fn tick(&mut self, ms: u64) -> Vec<Effect> {
        self.now += ms;
        self.ev(Event::Tick { now_ms: self.now })
    }

    /// Answers every PersistMeta in `effects` (and in what that produces).
    fn persist(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        let mut all = Vec::new();
        let mut todo = effects;
        while let Some(batch) = todo.iter().find_map(|e| match e {
            Effect::PersistMeta { batch, .. } => Some(*batch),
            _ => None,
        }) {
            all.extend(
                todo.into_iter()
                    .filter(|e| !matches!(e, Effect::PersistMeta { .. })),
            );
            todo = self.ev(Event::MetaPersisted { batch });
        }
        all.extend(todo);
        all
    }

    fn write(&mut self, req: u64, offset: u64, len: u64) -> Vec<Effect> {
        let e = self.ev(Event::Write {
            req: RequestId(req),
            offset,
            len,
            data: replication::DataHandle(req),
            fua: false,
        });
        self.persist(e)
    }

    fn ack(&mut self, r: u64, op: OpId) -> Vec<Effect> {
        self.ev(Event::ReplicaReply {
            replica: rid(r),
            session: sess(r),
            op,
            outcome: ReplicaOutcome::Done,
        })
    }
}

fn writes_sent(e: &[Effect]) -> Vec<(u64, OpId)> {
    e.iter()
        .filter_map(|e| match e {
            Effect::SendWrite { replica, op, .. } => Some((replica.0, *op)),
            _ => None,
        })
        .collect()
}

fn replies(e: &[Effect]) -> Vec<(u64, Result<Completion, RequestError>)> {
    e.iter()
        .filter_map(|e| match e {
            Effect::Reply { req, result } => Some((req.0, result.clone())),
            _ => None,
        })
        .collect()
}

/// The copy in `e` (asserting its region, source and target).
fn copy_in(e: &[Effect], purpose: CopyPurpose, want: (u64, u64, u64)) -> replication::CopyId {
    e.iter()
        .find_map(|e| match e {
            Effect::CopyRegion {
                copy,
                region,
                from,
                to,
                purpose: p,
                ..
            } if *p == purpose => {
                assert_eq!((region.0, from.0, to.0), want);
                Some(*copy)
            }
            _ => None,
        })
        .expect("a copy")
}

fn flush_to(e: &[Effect], r: u64) -> Option<OpId> {
    e.iter().find_map(|e| match e {
        Effect::SendFlush { replica, op, .. } if replica.0 == r => Some(*op),
        _ => None,
    })
}

fn txn(e: &[Effect]) -> Option<(replication::TxnId, CatalogOp)> {
    e.iter().find_map(|e| match e {
        Effect::CatalogTxn { txn, op } => Some((*txn, *op)),
        _ => None,
    })
}

#[test]
fn write_is_acknowledged_only_after_every_in_sync_replica_applied_it() {
    let mut h = H::serving_pair();
    let e = h.ev(Event::Write {
        req: RequestId(1),
        offset: 0,
        len: 512,
        data: replication::DataHandle(1),
        fua: false,
    });
    assert!(
        writes_sent(&e).is_empty(),
        "nothing goes out before its region is durably logged"
    );
    let e = h.persist(e);
    let sent = writes_sent(&e);
    assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1]);
    let op = sent[0].1;
    assert!(replies(&h.ack(0, op)).is_empty());
    assert_eq!(replies(&h.ack(1, op)), vec![(1, Ok(Completion::Written))]);
}

#[test]
fn failed_replica_holds_writes_until_the_catalog_drops_it() {
    let mut h = H::serving_pair();
    let op = writes_sent(&h.write(1, 0, 512))[0].1;
    h.ack(0, op);
    let e = h.ev(Event::ReplicaDown {
        replica: rid(1),
        session: sess(1),
        reason: "reset".into(),
    });
    // The failed replica's dirty bits (the whole activity log) are being persisted.
    let seed = e
        .iter()
        .find_map(|e| match e {
            Effect::PersistMeta { batch, changes }
                if changes.dirty_add == vec![(rid(1), RegionIndex(0))] =>
            {
                Some(*batch)
            }
            _ => None,
        })
        .expect("dirty bits for the failed replica");
    let (t1, cop) = txn(&e).expect("drop transaction");
    assert_eq!(
        cop,
        CatalogOp::MarkOutOfSync {
            replica: rid(1),
            generation: Generation(7)
        }
    );
    assert!(
        replies(&e).is_empty(),
        "held while the catalog has not agreed"
    );
    let e = h.ev(Event::CatalogResult {
        txn: t1,
        outcome: TxnOutcome::Unavailable,
    });
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Notify(Notice::WritesHeld { .. }))));
    assert!(txn(&h.tick(10)).is_none(), "retry waits catalog_retry_ms");
    let (t2, _) = txn(&h.tick(60)).expect("retried");
    let e = h.ev(Event::CatalogResult {
        txn: t2,
        outcome: TxnOutcome::Committed,
    });
    assert!(
        replies(&e).is_empty(),
        "the dirty bit must be durable first"
    );
    let e = h.ev(Event::MetaPersisted { batch: seed });
    assert_eq!(replies(&e), vec![(1, Ok(Completion::Written))]);
    // New writes need only the in-sync replica and a durable dirty bit.
    let e = h.write(2, 4096, 512);
    let sent = writes_sent(&e);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        replies(&h.ack(0, sent[0].1)),
        vec![(2, Ok(Completion::Written))]
    );
}

#[test]
fn refused_drop_means_a_newer_attachment_exists_so_stop() {
    let mut h = H::serving_pair();
    let op = writes_sent(&h.write(1, 0, 512))[0].1;
    h.ack(0, op);
    let e = h.ev(Event::ReplicaDown {
        replica: rid(1),
        session: sess(1),
        reason: "reset".into(),
    });
    let (t, _) = txn(&e).unwrap();
    let e = h.ev(Event::CatalogResult {
        txn: t,
        outcome: TxnOutcome::Refused,
    });
    assert_eq!(
        replies(&e),
        vec![(
            1,
            Err(RequestError::Stopped(StopReason::Superseded(Generation(7))))
        )]
    );
    assert!(e.iter().any(|e| matches!(e, Effect::Stop(_))));
    let e = h.write(2, 0, 512);
    assert!(matches!(replies(&e)[0].1, Err(RequestError::Stopped(_))));
}

#[test]
fn fenced_reply_stops_and_acknowledges_nothing_more() {
    let mut h = H::serving_pair();
    let op = writes_sent(&h.write(1, 0, 512))[0].1;
    h.ack(0, op);
    let e = h.ev(Event::ReplicaReply {
        replica: rid(1),
        session: sess(1),
        op,
        outcome: ReplicaOutcome::Fenced {
            highest: Generation(9),
        },
    });
    assert_eq!(
        replies(&e),
        vec![(
            1,
            Err(RequestError::Stopped(StopReason::Fenced(Generation(9))))
        )]
    );
}

#[test]
fn last_in_sync_replica_is_never_dropped() {
    let mut h = H::serving_pair();
    let e = h.ev(Event::ReplicaDown {
        replica: rid(1),
        session: sess(1),
        reason: "gone".into(),
    });
    let (t, _) = txn(&e).unwrap();
    h.ev(Event::CatalogResult {
        txn: t,
        outcome: TxnOutcome::Committed,
    });
    let e = h.ev(Event::ReplicaDown {
        replica: rid(0),
        session: sess(0),
        reason: "gone".into(),
    });
    assert!(txn(&e).is_none());
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Stop(StopReason::NoInSyncReplica(r)) if *r == rid(0))));
}

#[test]
fn resync_copies_dirty_regions_and_holds_writes_to_the_region_being_copied() {
    let mut h = H::serving_pair();
    let e = h.ev(Event::ReplicaDown {
        replica: rid(1),
        session: sess(1),
        reason: "gone".into(),
    });
    let (t, _) = txn(&e).unwrap();
    h.persist(e);
    let e = h.ev(Event::CatalogResult {
        txn: t,
        outcome: TxnOutcome::Committed,
    });
    h.persist(e);
    let op = writes_sent(&h.write(1, 2 * KIB, 512))[0].1; // region 2, marked dirty for r1
    h.ack(0, op);
    let e = h.ev(Event::ReplicaUp {
        replica: rid(1),
        session: SessionId(200),
    });
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Notify(Notice::ResyncStarted { regions: 1, .. }))));
    let e = h.ev(Event::ResyncCredit { replica: rid(1) });
    let copy = copy_in(&e, CopyPurpose::Resync, (2, 0, 1));
    let e = h.write(2, 2 * KIB + 512, 512);
    assert!(writes_sent(&e).is_empty(), "region 2 is being copied");
    let e = h.ev(Event::RegionCopied { copy });
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Notify(Notice::ResyncFinished { .. }))));
    let sent = writes_sent(&e);
    assert_eq!(
        sent.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![0, 1],
        "now to both"
    );
    h.ack(0, sent[0].1);
    // The barrier flush waits for the write in flight to r1 (it must cover it).
    let e = h.ev(Event::ReplicaReply {
        replica: rid(1),
        session: SessionId(200),
        op: sent[0].1,
        outcome: ReplicaOutcome::Done,
    });
    let barrier = flush_to(&e, 1).expect("barrier flush");
    let e = h.ev(Event::ReplicaReply {
        replica: rid(1),
        session: SessionId(200),
        op: barrier,
        outcome: ReplicaOutcome::Done,
    });
    let (t, op) = txn(&e).expect("join transaction");
    assert_eq!(
        op,
        CatalogOp::MarkInSync {
            replica: rid(1),
            generation: Generation(7)
        }
    );
    let e = h.ev(Event::CatalogResult {
        txn: t,
        outcome: TxnOutcome::Committed,
    });
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Notify(Notice::Rejoined { .. }))));
    assert!(e.iter().any(
        |e| matches!(e, Effect::PersistMeta { changes, .. } if changes.dirty_clear == vec![rid(1)])
    ));
}

#[test]
fn takeover_reconciles_the_previous_log_from_the_chosen_replica_before_serving() {
    // r1 has the higher last-in-sync generation: it is the source.
    let mut h = H::new(&[true, true, false], &[3, 5, 2], &[2]);
    let mut e = h.ev(Event::ReplicaUp {
        replica: rid(0),
        session: sess(0),
    });
    e.extend(h.ev(Event::ReplicaUp {
        replica: rid(1),
        session: sess(1),
    }));
    let copy = copy_in(&e, CopyPurpose::Reconcile, (2, 1, 0));
    // The stale replica r2 gets the previous log in its bitmap.
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::PersistMeta { changes, .. }
        if changes.dirty_add == vec![(rid(2), RegionIndex(2))])));
    h.persist(e);
    let e = h.write(1, 0, 512);
    assert!(writes_sent(&e).is_empty(), "no I/O before reconciliation");
    let e = h.ev(Event::RegionCopied { copy });
    let e = h.persist(e);
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Notify(Notice::Serving))));
    assert_eq!(writes_sent(&e).len(), 2);
}

#[test]
fn connect_timeout_drops_missing_in_sync_replicas_through_the_catalog() {
    let mut h = H::new(&[true, true], &[1, 1], &[]);
    h.ev(Event::ReplicaUp {
        replica: rid(0),
        session: sess(0),
    });
    assert!(!h.core.is_serving());
    let e = h.tick(150);
    assert_eq!(
        txn(&e).map(|t| t.1),
        Some(CatalogOp::MarkOutOfSync {
            replica: rid(1),
            generation: Generation(7)
        })
    );
    assert!(h.core.is_serving());
}

#[test]
fn limits_refuse_bad_requests() {
    let mut h = H::serving_pair();
    let r = |e: Vec<Effect>| replies(&e)[0].1.clone();
    assert_eq!(
        r(h.write(1, 16 * KIB - 512, 1024)),
        Err(RequestError::OutOfRange)
    );
    assert_eq!(
        r(h.write(2, 0, 5 * KIB)),
        Err(RequestError::TooLarge { regions: 5, max: 4 })
    );
    h.write(3, 0, 512);
    assert_eq!(r(h.write(3, 0, 512)), Err(RequestError::DuplicateId));
    assert_eq!(
        r(h.ev(Event::Read {
            req: RequestId(4),
            offset: u64::MAX,
            len: 2
        })),
        Err(RequestError::OutOfRange)
    );
}

#[test]
fn added_replica_is_filled_by_resync_and_counts_only_after_it_rejoined() {
    let mut h = H::serving_pair();
    h.ev(Event::AddReplica(ReplicaInit {
        id: rid(2),
        local: false,
        in_sync: false,
        last_in_sync_generation: Generation(0),
        dirty: set(&[0, 1, 2, 3]),
    }));
    // Not connected yet: writes are acknowledged by the two in-sync replicas alone.
    let sent = writes_sent(&h.write(1, 5 * KIB, 512));
    assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 1]);
    h.ack(0, sent[0].1);
    let e = h.ack(1, sent[1].1);
    assert_eq!(replies(&e).len(), 1, "acknowledged without the new replica");
    let e = h.ev(Event::ReplicaUp {
        replica: rid(2),
        session: sess(2),
    });
    assert!(
        e.iter()
            .any(|e| matches!(e, Effect::Notify(Notice::ResyncStarted { regions: 5, .. }))),
        "every given region plus the one written meanwhile: {e:?}"
    );
    assert_eq!(
        h.core.replica_state(rid(2)),
        Some(replication::ReplicaState::Resyncing)
    );
    // Adding a known id again changes nothing.
    h.ev(Event::AddReplica(ReplicaInit {
        id: rid(2),
        local: false,
        in_sync: false,
        last_in_sync_generation: Generation(0),
        dirty: RegionSet::new(),
    }));
    assert_eq!(
        h.core.replica_state(rid(2)),
        Some(replication::ReplicaState::Resyncing)
    );
}
