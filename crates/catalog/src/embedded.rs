//! The embedded backend: one redb file in the data directory.
//!
//! Layout (three tables):
//! - `meta`  (`&str → u64`): `schema_version`, `revision` (the catalog-wide counter),
//!   `event_seq` (the last event sequence number handed out).
//! - `kv`    (`&str → bytes`): each value is the key's revision as 8 little-endian bytes
//!   followed by the record's JSON, so a read returns value and revision together.
//! - `events` (`u64 → bytes`): the event JSON under its sequence number.
//! - `leased` (`&str → i64`): keys bound to a lease. Leases live in memory (`leases`) and die
//!   with the process, so on open every key listed here is deleted, as if its lease expired.
//!   (Added after schema 1 shipped without a bump: an older build ignores the table.)
//!
//! Every mutation is one redb write transaction, committed with redb's default durability
//! (fsync before `commit` returns), so an acknowledged change survives a crash and a crash
//! mid-transaction leaves the previous state. redb serializes write transactions, which is
//! what makes the compare-and-swap checks and the writes one atomic step.

mod leases;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use redb::{Database, DatabaseError, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{broadcast, mpsc};

use crate::kv::{
    key_from_stored, Catalog, CatalogError, Change, Expect, Key, Prefix, Result, Revision, Rows,
    TxnOp,
};
use crate::lease::{ClusterStore, Lease, LeaseId, WatchEvent};
use crate::records::{EventRecord, NewEvent};
use leases::LeaseTable;
pub use leases::LEASE_CHECK_INTERVAL;
use watch::WatchLog;
pub use watch::WATCH_REPLAY_EVENTS;

/// Schema history: 1 = the layout above (first release). A file with a higher version was
/// written by a newer build whose records this one might misread, so it refuses to open it.
pub const SCHEMA_VERSION: u64 = 1;

/// Events kept by default. At a few hundred bytes each this bounds the history to a few MB;
/// an operator who needs more keeps them via hooks. When hit, the oldest event is dropped.
pub const DEFAULT_EVENT_RETENTION: usize = 10_000;

/// Capacity of the live event channel. A subscriber more than this many events behind gets
/// `Lagged` and re-reads history from the table (see `follow_events`), so nothing is lost as
/// long as it catches up within `event_retention` events.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const LEASED: TableDefinition<&str, i64> = TableDefinition::new("leased");

const META_SCHEMA: &str = "schema_version";
const META_REVISION: &str = "revision";
const META_EVENT_SEQ: &str = "event_seq";

/// The catalog of a single-node (embedded) agent. Cheap to clone; the file is closed (and its
/// lock released) when the last clone is dropped.
#[derive(Clone)]
pub struct EmbeddedCatalog {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Publishes appended events, after their commit, in `seq` order.
    events_tx: broadcast::Sender<EventRecord>,
    /// Held from assigning a `seq` until it is published, so subscribers see `seq` order.
    append_lock: Mutex<()>,
    retention: usize,
    /// Held by every key write from before its redb transaction until its changes are
    /// published, so watchers see revision order. Lock order: `watch`, then `leases`.
    watch: Mutex<WatchLog>,
    leases: Mutex<LeaseTable>,
    /// Whether the expiry task runs (started by the first `grant`, which runs in a runtime).
    reaper_started: AtomicBool,
}

/// Locks a mutex, ignoring poisoning: every critical section leaves its data consistent at
/// each step (redb rolls back an uncommitted transaction by itself).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EmbeddedCatalog {
    /// Opens (creating if needed) the catalog file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<EmbeddedCatalog> {
        EmbeddedCatalog::open_with_retention(path, DEFAULT_EVENT_RETENTION)
    }

    /// Like `open`, keeping at most `retention` events (at least 1).
    pub fn open_with_retention(
        path: impl AsRef<Path>,
        retention: usize,
    ) -> Result<EmbeddedCatalog> {
        let path = path.as_ref().to_path_buf();
        let db = Database::create(&path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => CatalogError::Locked { path: path.clone() },
            other => backend(format!("cannot open {}", path.display()), other),
        })?;
        init_schema(&db, &path)?;
        let current = drop_orphaned_lease_keys(&db)?;
        let (events_tx, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let inner = Inner {
            db,
            path,
            events_tx,
            append_lock: Mutex::new(()),
            retention: retention.max(1),
            watch: Mutex::new(WatchLog::new(current)),
            leases: Mutex::new(LeaseTable::new()),
            reaper_started: AtomicBool::new(false),
        };
        Ok(EmbeddedCatalog {
            inner: Arc::new(inner),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs redb work on the blocking pool: a commit fsyncs, which must not stall the
    /// runtime's workers (NBD I/O shares them).
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| backend("catalog task failed".to_owned(), e))?
    }
}

fn backend(context: String, e: impl std::error::Error + Send + Sync + 'static) -> CatalogError {
    CatalogError::Backend {
        context,
        source: Box::new(e),
    }
}

/// Maps any redb error into `CatalogError::Backend` with a word on what was being done.
trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for std::result::Result<T, E> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| backend(what.to_owned(), e.into()))
    }
}

fn init_schema(db: &Database, path: &Path) -> Result<()> {
    let w = db.begin_write().ctx("begin schema check")?;
    {
        let mut meta = w.open_table(META).ctx("open meta table")?;
        let found = meta
            .get(META_SCHEMA)
            .ctx("read schema version")?
            .map(|g| g.value());
        match found {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(CatalogError::SchemaTooNew {
                    path: path.to_path_buf(),
                    found: v,
                    supported: SCHEMA_VERSION,
                })
            }
            Some(_) => {}
            None => {
                meta.insert(META_SCHEMA, SCHEMA_VERSION)
                    .ctx("write schema version")?;
            }
        }
        // Create the other tables so read transactions can always open them.
        w.open_table(KV).ctx("create kv table")?;
        w.open_table(EVENTS).ctx("create events table")?;
        w.open_table(LEASED).ctx("create leased table")?;
    }
    w.commit().ctx("commit schema")
}

/// Deletes the keys the previous process bound to its leases (they died with it); returns
/// the current revision.
fn drop_orphaned_lease_keys(db: &Database) -> Result<Revision> {
    let keys: Vec<String> = {
        let r = db.begin_read().ctx("begin read")?;
        let leased = r.open_table(LEASED).ctx("open leased table")?;
        let rows = leased.iter().ctx("scan leased keys")?;
        rows.map(|row| row.map(|(k, _)| k.value().to_owned()))
            .collect::<std::result::Result<_, _>>()
            .ctx("read leased key")?
    };
    let (rev, _) = delete_keys(db, &keys)?;
    Ok(rev)
}

/// Deletes `keys` (and their lease bindings) in one transaction at a new revision; returns
/// the revision and the watch events. With no keys, returns the current revision.
fn delete_keys(db: &Database, keys: &[String]) -> Result<(Revision, Vec<WatchEvent>)> {
    let w = db.begin_write().ctx("begin delete")?;
    let rev;
    let mut events = Vec::new();
    {
        let mut meta = w.open_table(META).ctx("open meta table")?;
        let current = meta
            .get(META_REVISION)
            .ctx("read revision")?
            .map_or(0, |g| g.value());
        if keys.is_empty() {
            return Ok((Revision(current), events));
        }
        rev = Revision(current + 1);
        meta.insert(META_REVISION, rev.0).ctx("write revision")?;
        let mut kv = w.open_table(KV).ctx("open kv table")?;
        let mut leased = w.open_table(LEASED).ctx("open leased table")?;
        for k in keys {
            leased.remove(k.as_str()).ctx("unbind key")?;
            if kv.remove(k.as_str()).ctx("delete key")?.is_some() {
                events.push(deleted(k, rev));
            }
        }
    }
    w.commit().ctx("commit delete")?;
    Ok((rev, events))
}

fn deleted(key: &str, rev: Revision) -> WatchEvent {
    WatchEvent {
        key: key_from_stored(key),
        value: Vec::new(),
        mod_revision: rev,
        deleted: true,
    }
}

/// Splits a stored `kv` value into (revision, JSON).
fn split_value(stored: &[u8]) -> (Revision, Vec<u8>) {
    let (rev, json) = stored.split_at(8.min(stored.len()));
    let mut b = [0u8; 8];
    b[..rev.len()].copy_from_slice(rev);
    (Revision(u64::from_le_bytes(b)), json.to_vec())
}

fn join_value(rev: Revision, json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + json.len());
    v.extend_from_slice(&rev.0.to_le_bytes());
    v.extend_from_slice(json);
    v
}

fn check(op: &TxnOp, found: Option<Revision>) -> Result<()> {
    let ok = match op.expect {
        Expect::Absent => found.is_none(),
        Expect::At(want) => found == Some(want),
        Expect::Any => true,
    };
    if ok {
        Ok(())
    } else {
        Err(CatalogError::Conflict {
            key: op.key.clone(),
            expected: op.expect,
            found,
        })
    }
}

fn txn_sync(inner: &Inner, ops: Vec<TxnOp>) -> Result<Revision> {
    let mut log = lock(&inner.watch);
    let mut leases = lock(&inner.leases);
    let now = Instant::now();
    let w = inner.db.begin_write().ctx("begin transaction")?;
    let rev;
    let mut events = Vec::new();
    {
        let mut kv = w.open_table(KV).ctx("open kv table")?;
        for op in &ops {
            let found = kv
                .get(op.key.as_str())
                .ctx("read key")?
                .map(|g| split_value(g.value()).0);
            check(op, found)?; // dropping `w` uncommitted aborts the transaction
        }
        for op in &ops {
            if let Change::PutWithLease(_, id) = op.change {
                leases.check_alive(id, now)?;
            }
        }
        let mut meta = w.open_table(META).ctx("open meta table")?;
        let current = meta
            .get(META_REVISION)
            .ctx("read revision")?
            .map_or(0, |g| g.value());
        if ops.iter().all(|op| op.change == Change::Check) {
            return Ok(Revision(current));
        }
        rev = Revision(current + 1);
        meta.insert(META_REVISION, rev.0).ctx("write revision")?;
        let mut leased = w.open_table(LEASED).ctx("open leased table")?;
        for op in &ops {
            let key = op.key.as_str();
            let (value, lease) = match &op.change {
                Change::Put(json) => (Some(json), None),
                Change::PutWithLease(json, id) => (Some(json), Some(*id)),
                Change::Delete => (None, None),
                Change::Check => continue,
            };
            match value {
                Some(json) => kv.insert(key, join_value(rev, json).as_slice()).map(drop),
                None => kv.remove(key).map(drop),
            }
            .ctx("write key")?;
            match lease {
                Some(id) => leased.insert(key, id.0).map(drop),
                None => leased.remove(key).map(drop),
            }
            .ctx("bind key to lease")?;
            events.push(WatchEvent {
                key: op.key.clone(),
                value: value.cloned().unwrap_or_default(),
                mod_revision: rev,
                deleted: value.is_none(),
            });
        }
    }
    w.commit().ctx("commit transaction")?;
    for op in &ops {
        match &op.change {
            Change::PutWithLease(_, id) => leases.bind(op.key.as_str(), Some(*id)),
            Change::Put(_) | Change::Delete => leases.bind(op.key.as_str(), None),
            Change::Check => {}
        }
    }
    log.publish(events);
    Ok(rev)
}

/// Removes the leases `pick` chooses and deletes their keys, one revision per lease (as etcd
/// revokes each lease in its own raft entry).
fn drop_leases(
    inner: &Inner,
    pick: impl FnOnce(&mut LeaseTable) -> Vec<(LeaseId, Vec<String>)>,
) -> Result<()> {
    let mut log = lock(&inner.watch);
    let due = pick(&mut lock(&inner.leases));
    for (_, keys) in due {
        let (_, events) = delete_keys(&inner.db, &keys)?;
        log.publish(events);
    }
    Ok(())
}

/// Runs until the catalog is dropped: expires due leases every `LEASE_CHECK_INTERVAL`.
async fn reap_leases(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(LEASE_CHECK_INTERVAL).await;
        let Some(inner) = inner.upgrade() else { return };
        // A failed delete leaves the keys for the next open to drop; nothing to do now.
        let _ = tokio::task::spawn_blocking(move || {
            drop_leases(&inner, |t| t.take_expired(Instant::now()))
        })
        .await;
    }
}

fn append_sync(inner: &Inner, event: NewEvent) -> Result<u64> {
    let _order = inner.append_lock.lock().unwrap_or_else(|p| p.into_inner());
    let w = inner.db.begin_write().ctx("begin event append")?;
    let record;
    {
        let mut meta = w.open_table(META).ctx("open meta table")?;
        let seq = meta
            .get(META_EVENT_SEQ)
            .ctx("read event seq")?
            .map_or(0, |g| g.value())
            + 1;
        meta.insert(META_EVENT_SEQ, seq).ctx("write event seq")?;
        record = event.with_seq(seq);
        let json = serde_json::to_vec(&record).expect("events always serialize");
        let mut events = w.open_table(EVENTS).ctx("open events table")?;
        events.insert(seq, json.as_slice()).ctx("write event")?;
        // Seqs are contiguous, so this drops one event per append once the table is full
        // (more only if the retention was lowered since the last open).
        while events.len().ctx("count events")? > inner.retention as u64 {
            events.pop_first().ctx("trim events")?;
        }
    }
    w.commit().ctx("commit event")?;
    let seq = record.seq;
    let _ = inner.events_tx.send(record); // no subscribers is fine
    Ok(seq)
}

fn list_sync(inner: &Inner, prefix: Prefix) -> Result<(Rows, Revision)> {
    let r = inner.db.begin_read().ctx("begin read")?;
    let meta = r.open_table(META).ctx("open meta table")?;
    let at = meta
        .get(META_REVISION)
        .ctx("read revision")?
        .map_or(0, |g| g.value());
    let kv = r.open_table(KV).ctx("open kv table")?;
    let mut out = Vec::new();
    for row in kv.range(prefix.as_str()..).ctx("scan keys")? {
        let (k, v) = row.ctx("read row")?;
        if !k.value().starts_with(prefix.as_str()) {
            break;
        }
        let (rev, json) = split_value(v.value());
        out.push((key_from_stored(k.value()), json, rev));
    }
    Ok((out, Revision(at)))
}

fn events_since_sync(inner: &Inner, after: u64, limit: usize) -> Result<Vec<EventRecord>> {
    let Some(first) = after.checked_add(1) else {
        return Ok(Vec::new());
    };
    let r = inner.db.begin_read().ctx("begin read")?;
    let events = r.open_table(EVENTS).ctx("open events table")?;
    let mut out = Vec::new();
    for row in events.range(first..).ctx("scan events")?.take(limit) {
        let (k, v) = row.ctx("read event")?;
        out.push(crate::kv::decode(
            &format!("events/{:020}", k.value()),
            v.value(),
        )?);
    }
    Ok(out)
}

impl Catalog for EmbeddedCatalog {
    async fn get(&self, key: &Key) -> Result<Option<(Vec<u8>, Revision)>> {
        let key = key.clone();
        self.run(move |inner| {
            let r = inner.db.begin_read().ctx("begin read")?;
            let kv = r.open_table(KV).ctx("open kv table")?;
            let got = kv.get(key.as_str()).ctx("read key")?;
            Ok(got.map(|g| {
                let (rev, json) = split_value(g.value());
                (json, rev)
            }))
        })
        .await
    }

    async fn list(&self, prefix: Prefix) -> Result<Vec<(Key, Vec<u8>, Revision)>> {
        self.run(move |inner| list_sync(inner, prefix).map(|(rows, _)| rows))
            .await
    }

    async fn txn(&self, ops: Vec<TxnOp>) -> Result<Revision> {
        self.run(move |inner| txn_sync(inner, ops)).await
    }

    async fn append_event(&self, event: NewEvent) -> Result<u64> {
        self.run(move |inner| append_sync(inner, event)).await
    }

    async fn events_since(&self, after: u64, limit: usize) -> Result<Vec<EventRecord>> {
        self.run(move |inner| events_since_sync(inner, after, limit))
            .await
    }

    async fn last_event_seq(&self) -> Result<u64> {
        self.run(|inner| {
            let r = inner.db.begin_read().ctx("begin read")?;
            let meta = r.open_table(META).ctx("open meta table")?;
            Ok(meta
                .get(META_EVENT_SEQ)
                .ctx("read event seq")?
                .map_or(0, |g| g.value()))
        })
        .await
    }

    fn subscribe_events(&self) -> broadcast::Receiver<EventRecord> {
        self.inner.events_tx.subscribe()
    }

    fn event_retention(&self) -> usize {
        self.inner.retention
    }
}

impl ClusterStore for EmbeddedCatalog {
    async fn grant(&self, ttl: Duration) -> Result<Lease> {
        if !self.inner.reaper_started.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap_leases(Arc::downgrade(&self.inner)));
        }
        self.run(move |inner| Ok(lock(&inner.leases).grant(ttl, Instant::now())))
            .await
    }

    // Lease calls take the lease lock, which a committing write holds across its fsync:
    // they run on the blocking pool so as not to stall the workers serving NBD I/O.
    async fn keep_alive(&self, id: LeaseId) -> Result<Duration> {
        self.run(move |inner| lock(&inner.leases).renew(id, Instant::now()))
            .await
    }

    async fn revoke(&self, id: LeaseId) -> Result<()> {
        self.run(move |inner| drop_leases(inner, |t| vec![(id, t.remove(id))]))
            .await
    }

    async fn time_to_live(&self, id: LeaseId) -> Result<Option<Duration>> {
        self.run(move |inner| Ok(lock(&inner.leases).remaining(id, Instant::now())))
            .await
    }

    async fn list_at(&self, prefix: Prefix) -> Result<(Rows, Revision)> {
        self.run(move |inner| list_sync(inner, prefix)).await
    }

    fn watch_prefix(&self, prefix: Prefix, from: Revision) -> mpsc::Receiver<WatchEvent> {
        lock(&self.inner.watch).watch(prefix, from)
    }
}
