//! Events in etcd: `events/<seq, 20 digits>` plus a counter key `meta/event_seq`.
//!
//! An append is one `Txn`: compare the counter's `mod_revision` with what we read, put the
//! counter `n + 1` and the event under `n + 1`, and delete every event older than the
//! retention window. Two agents appending at once: one wins, the other's compare fails and
//! its failure branch returns the new counter, so it retries with the next number at once.
//! Sequence numbers are thus dense, cluster-wide and in revision order, which is the order
//! a watch on `events/` delivers them to every node's live feed.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::store::{EtcdCatalog, TXN};
use super::transport::{Retry, Transport};
use super::watch;
use super::wire::{self, RangeResponse, TxnResponse};
use crate::kv::{decode, key_from_stored, CatalogError, Expect, Result, Revision};
use crate::records::{EventRecord, NewEvent};

/// The counter's key, relative to the prefix (outside `events/`, so watches there see only
/// events).
pub const EVENT_COUNTER_KEY: &str = "meta/event_seq";
pub(super) const EVENTS_PREFIX: &str = "events/";

/// Appends that lost the counter race before giving up. Each loss means another append
/// committed, so this is only reached by dozens of agents appending in the same instant.
pub const APPEND_ATTEMPTS: usize = 64;

fn event_key(seq: u64) -> String {
    format!("{EVENTS_PREFIX}{seq:020}")
}

/// The counter's value and `mod_revision` (`None`: no event was ever appended).
pub(super) struct Counter {
    pub(super) seq: u64,
    rev: Option<i64>,
}

fn counter_from(r: Option<&RangeResponse>) -> Result<Counter> {
    match r.and_then(|r| r.kvs.first()) {
        None => Ok(Counter { seq: 0, rev: None }),
        Some(kv) => Ok(Counter {
            seq: decode(EVENT_COUNTER_KEY, &kv.value)?,
            rev: Some(kv.mod_revision),
        }),
    }
}

pub(super) async fn read_counter(cat: &EtcdCatalog) -> Result<Counter> {
    counter_from(Some(
        &cat.range(&cat.full(EVENT_COUNTER_KEY), None, 0).await?,
    ))
}

pub(super) async fn append(cat: &EtcdCatalog, event: NewEvent) -> Result<u64> {
    let counter_key = cat.full(EVENT_COUNTER_KEY);
    let mut counter = read_counter(cat).await?;
    for _ in 0..APPEND_ATTEMPTS {
        let seq = counter.seq + 1;
        let json = serde_json::to_vec(&event.clone().with_seq(seq)).expect("events serialize");
        let guard = match counter.rev {
            None => wire::absent(&counter_key),
            Some(r) => wire::modified_at(&counter_key, r),
        };
        let mut success = vec![
            wire::put(&counter_key, seq.to_string().as_bytes(), None),
            wire::put(&cat.full(&event_key(seq)), &json, None),
        ];
        let first_kept = (seq + 1).saturating_sub(cat.inner.retention as u64);
        if first_kept > 1 {
            let (from, to) = (cat.full(EVENTS_PREFIX), cat.full(&event_key(first_kept)));
            success.push(wire::delete(&from, Some(&to)));
        }
        let body = wire::txn(vec![guard], success, vec![wire::range_op(&counter_key)]);
        let resp: TxnResponse = cat
            .inner
            .transport
            .call(TXN, &body, Retry::UnlessSent)
            .await
            .map_err(|e| e.into_catalog("append an event"))?;
        if resp.succeeded {
            return Ok(seq);
        }
        counter = counter_from(
            resp.responses
                .first()
                .and_then(|r| r.response_range.as_ref()),
        )?;
    }
    Err(CatalogError::Conflict {
        key: key_from_stored(EVENT_COUNTER_KEY),
        expected: Expect::At(Revision(counter.rev.unwrap_or(0) as u64)),
        found: None,
    })
}

pub(super) async fn since(cat: &EtcdCatalog, after: u64, limit: usize) -> Result<Vec<EventRecord>> {
    let Some(first) = after.checked_add(1) else {
        return Ok(Vec::new());
    };
    if limit == 0 {
        return Ok(Vec::new()); // etcd reads limit 0 as "no limit"
    }
    let limit = i64::try_from(limit).unwrap_or(0);
    let end = wire::prefix_end(&cat.full(EVENTS_PREFIX));
    let r = cat
        .range(&cat.full(&event_key(first)), Some(&end), limit)
        .await?;
    r.kvs
        .iter()
        .map(|kv| decode(cat.relative(&kv.key).as_str(), &kv.value))
        .collect()
}

/// Forwards events appended by any node to `tx`, from `from` on, for as long as the
/// catalog lives. If the watch loses its history (compaction), it restarts from "now":
/// followers notice the gap in `seq` and re-read the history (`follow_events`).
pub(super) async fn feed(
    transport: Arc<Transport>,
    events_prefix: Vec<u8>,
    strip: usize,
    from: i64,
    tx: broadcast::Sender<EventRecord>,
) {
    let mut from = from;
    loop {
        let mut raw = watch::spawn(transport.clone(), events_prefix.clone(), strip, from);
        while let Some(ev) = raw.recv().await {
            if ev.deleted {
                continue; // trimming
            }
            if let Ok(rec) = serde_json::from_slice::<EventRecord>(&ev.value) {
                let _ = tx.send(rec); // no subscriber is fine
            }
        }
        from = 0;
        tokio::time::sleep(watch::WATCH_RETRY_DELAY).await;
    }
}
