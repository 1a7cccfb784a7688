//! `EtcdCatalog`: connection set-up and the `Catalog` primitives.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use super::events::{self, EVENTS_PREFIX, EVENT_COUNTER_KEY};
use super::transport::{Retry, Transport, DEFAULT_CALL_DEADLINE, DEFAULT_ENDPOINT_DEADLINE};
use super::wire::{self, RangeResponse};
use super::{txn, watch};
use crate::embedded::{DEFAULT_EVENT_RETENTION, EVENT_CHANNEL_CAPACITY};
use crate::kv::{key_from_stored, Catalog, Key, Prefix, Result, Revision, Rows, TxnOp};
use crate::records::{EventRecord, NewEvent};

pub(super) const RANGE: &str = "/v3/kv/range";
pub(super) const TXN: &str = "/v3/kv/txn";

/// Tuning of the etcd backend.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Time one endpoint gets to answer before the next is tried (`DEFAULT_ENDPOINT_DEADLINE`).
    pub endpoint_deadline: Duration,
    /// Time a whole call gets across endpoints (`DEFAULT_CALL_DEADLINE`).
    pub call_deadline: Duration,
    /// Events kept in etcd; older ones are deleted on append (`DEFAULT_EVENT_RETENTION`).
    pub event_retention: usize,
}

impl Default for EtcdOptions {
    fn default() -> EtcdOptions {
        EtcdOptions {
            endpoint_deadline: DEFAULT_ENDPOINT_DEADLINE,
            call_deadline: DEFAULT_CALL_DEADLINE,
            event_retention: DEFAULT_EVENT_RETENTION,
        }
    }
}

/// The catalog of a cluster-mode agent, in etcd under a key prefix. Cheap to clone; the
/// background event feed stops when the last clone is dropped.
#[derive(Clone)]
pub struct EtcdCatalog {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) transport: Arc<Transport>,
    /// Every key is stored as `prefix + key`; ends with `/`.
    pub(super) prefix: String,
    pub(super) retention: usize,
    /// Live events from any node, fed by a watch on `events/`.
    events_tx: broadcast::Sender<EventRecord>,
    events_task: AbortHandle,
}

impl std::fmt::Debug for EtcdCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCatalog")
            .field("endpoints", &self.endpoints())
            .field("prefix", &self.prefix())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.events_task.abort();
    }
}

impl EtcdCatalog {
    /// Connects to the cluster at `endpoints` (`http://host:port` client URLs), storing
    /// everything under `prefix` (e.g. `/blockwarden/`; a missing trailing `/` is added).
    /// Fails with `Unavailable` if no member with a leader answers.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        opts: EtcdOptions,
    ) -> Result<EtcdCatalog> {
        let transport = Arc::new(Transport::new(
            endpoints,
            opts.endpoint_deadline,
            opts.call_deadline,
        )?);
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        // Proves a member with a leader answers, and fixes where the live event feed starts
        // so that no event appended after `connect` returns is missed.
        let counter = format!("{prefix}{EVENT_COUNTER_KEY}");
        let probe: RangeResponse = transport
            .call(
                RANGE,
                &wire::range(counter.as_bytes(), None, 1),
                Retry::Always,
            )
            .await
            .map_err(|e| e.into_catalog("connect to etcd"))?;
        let (events_tx, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let feed = events::feed(
            transport.clone(),
            format!("{prefix}{EVENTS_PREFIX}").into_bytes(),
            prefix.len(),
            probe.header.revision + 1,
            events_tx.clone(),
        );
        let events_task = tokio::spawn(feed).abort_handle();
        let inner = Inner {
            transport,
            prefix,
            retention: opts.event_retention.max(1),
            events_tx,
            events_task,
        };
        Ok(EtcdCatalog {
            inner: Arc::new(inner),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The members' `host:port`, in the order given.
    pub fn endpoints(&self) -> &[String] {
        self.inner.transport.endpoints()
    }

    /// `prefix + key`, as stored in etcd.
    pub(super) fn full(&self, key: &str) -> Vec<u8> {
        format!("{}{key}", self.inner.prefix).into_bytes()
    }

    /// The catalog key of a stored etcd key.
    pub(super) fn relative(&self, full: &[u8]) -> Key {
        let rest = full.get(self.inner.prefix.len()..).unwrap_or_default();
        key_from_stored(&String::from_utf8_lossy(rest))
    }

    /// A linearizable range read (`limit` 0 = all).
    pub(super) async fn range(
        &self,
        key: &[u8],
        range_end: Option<&[u8]>,
        limit: i64,
    ) -> Result<RangeResponse> {
        self.inner
            .transport
            .call(RANGE, &wire::range(key, range_end, limit), Retry::Always)
            .await
            .map_err(|e| e.into_catalog("read from etcd"))
    }

    /// Every row under `prefix`, with the revision of the snapshot it was read at.
    pub(super) async fn list_rows(&self, prefix: Prefix) -> Result<(Rows, Revision)> {
        let start = self.full(prefix.as_str());
        let r = self
            .range(&start, Some(&wire::prefix_end(&start)), 0)
            .await?;
        let rows = r
            .kvs
            .into_iter()
            .map(|kv| (self.relative(&kv.key), kv.value, rev(kv.mod_revision)))
            .collect();
        Ok((rows, rev(r.header.revision)))
    }

    /// Starts a watch under the stored key prefix `full_prefix`.
    pub(super) fn watch_full(
        &self,
        full_prefix: Vec<u8>,
        from: Revision,
    ) -> tokio::sync::mpsc::Receiver<crate::lease::WatchEvent> {
        let from = i64::try_from(from.0).unwrap_or(i64::MAX);
        watch::spawn(
            self.inner.transport.clone(),
            full_prefix,
            self.inner.prefix.len(),
            from,
        )
    }
}

/// etcd revisions are positive int64s.
pub(super) fn rev(r: i64) -> Revision {
    Revision(u64::try_from(r).unwrap_or(0))
}

impl Catalog for EtcdCatalog {
    async fn get(&self, key: &Key) -> Result<Option<(Vec<u8>, Revision)>> {
        let r = self.range(&self.full(key.as_str()), None, 0).await?;
        Ok(r.kvs
            .into_iter()
            .next()
            .map(|kv| (kv.value, rev(kv.mod_revision))))
    }

    async fn list(&self, prefix: Prefix) -> Result<Vec<(Key, Vec<u8>, Revision)>> {
        Ok(self.list_rows(prefix).await?.0)
    }

    async fn txn(&self, ops: Vec<TxnOp>) -> Result<Revision> {
        txn::run(self, ops).await
    }

    async fn append_event(&self, event: NewEvent) -> Result<u64> {
        events::append(self, event).await
    }

    async fn events_since(&self, after: u64, limit: usize) -> Result<Vec<EventRecord>> {
        events::since(self, after, limit).await
    }

    async fn last_event_seq(&self) -> Result<u64> {
        Ok(events::read_counter(self).await?.seq)
    }

    fn subscribe_events(&self) -> broadcast::Receiver<EventRecord> {
        self.inner.events_tx.subscribe()
    }

    fn event_retention(&self) -> usize {
        self.inner.retention
    }
}
