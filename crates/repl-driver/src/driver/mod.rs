//! The event loop: one tokio task owns the [`Replicator`], turns everything that happens
//! (client requests, replica replies, sessions opening and ending, metadata writes, catalog
//! answers, copies, ticks, the lease) into core [`Event`]s, and performs the core's
//! [`Effect`]s in order.
//!
//! - `client`: client requests in, replies out (TRIM/WRITE_ZEROES chunking, BLOCK_STATUS).
//! - `sessions`: legs, replica requests and their timeouts, metadata writes, reconnects.
//! - `resync`: region copies, the rate limiter, rate/ETA figures.

mod client;
mod resync;
mod sessions;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bw_types::{Generation, IoDone, IoError, IoReply, IoRequest};
use replication::{
    CopyId, CopyPurpose, DataHandle, Effect, Event, LogDrain, MetaBatchId, Notice, OpId, RegionSet,
    ReplicaId, ReplicaInit, Replicator, RequestId, TxnId, TxnOutcome,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::device::{DriverOptions, DriverStatus, Shared, StopReason};
use crate::meta::MetaState;
use crate::ports::{CatalogPort, Connector, Leg, LegError, ReplicaSpec};

pub use resync::{COPY_CHUNK_BYTES, RATE_WINDOW};
pub(crate) use sessions::{Link, ReplicaSlot};

use client::{Bulk, Client, Payload};
pub use client::{BULK_CHUNKS_IN_FLIGHT, BULK_CHUNK_REGIONS};

/// How often the core gets a `Tick` (its retries, activity-log cooling), the rate limiter
/// refills, request timeouts are checked and status is refreshed. The core asks for at
/// least every 100 ms.
pub const TICK: Duration = Duration::from_millis(50);

/// Messages into the event loop.
pub(crate) enum Msg {
    Client {
        req: IoRequest,
        done: IoDone,
    },
    /// A replica answered a data request.
    Reply {
        replica: ReplicaId,
        session: u64,
        op: OpId,
        ticket: u64,
        result: Result<IoReply, IoError>,
    },
    Connected {
        replica: ReplicaId,
        session: u64,
        leg: Arc<dyn Leg>,
    },
    /// A reconnect was refused because a newer generation was admitted.
    ConnectFenced(Generation),
    LegClosed {
        replica: ReplicaId,
        session: u64,
        reason: String,
    },
    MetaWritten {
        replica: ReplicaId,
        session: u64,
        seq: u64,
        result: Result<(), LegError>,
    },
    Catalog {
        txn: TxnId,
        outcome: TxnOutcome,
    },
    CopyDone {
        copy: CopyId,
        to: ReplicaId,
        purpose: CopyPurpose,
        /// `Ok(bytes read from the source)`: 0 when the region was a hole there (nothing
        /// read, the target's range zeroed); `Err((replica at fault, reason, fenced by))`.
        result: Result<u64, (ReplicaId, String, Option<Generation>)>,
    },
    Stop(StopReason),
    /// Clean detach: empty the activity log (by `deadline`), then stop; `done` is told
    /// whether the log was emptied.
    Detach {
        deadline: Instant,
        done: oneshot::Sender<bool>,
    },
    /// A replica added to the live volume, with the regions it lacks.
    AddReplica(ReplicaSpec, RegionSet),
}

/// Everything the loop needs, built by [`crate::start`].
pub(crate) struct Parts {
    pub opts: DriverOptions,
    pub core: Replicator,
    pub meta: MetaState,
    pub slots: BTreeMap<ReplicaId, ReplicaSlot>,
    pub events: VecDeque<Event>,
    pub connector: Arc<dyn Connector>,
    pub catalog: Arc<dyn CatalogPort>,
    pub notices: mpsc::UnboundedSender<Notice>,
    pub shared: Arc<Shared>,
    pub tx: mpsc::UnboundedSender<Msg>,
    pub started: Instant,
}

pub(crate) struct Driver {
    core: Replicator,
    opts: DriverOptions,
    generation: Generation,
    /// The driver's monotonic clock's origin (`Tick { now_ms }` counts from here).
    started: Instant,
    tx: mpsc::UnboundedSender<Msg>,
    connector: Arc<dyn Connector>,
    catalog: Arc<dyn CatalogPort>,
    notices: mpsc::UnboundedSender<Notice>,
    shared: Arc<Shared>,
    /// Per replica: its session, reconnect task, rate limiter and resync figures.
    slots: BTreeMap<ReplicaId, ReplicaSlot>,
    /// Client requests the core (or a chunked request) has not answered yet.
    clients: HashMap<RequestId, Client>,
    /// TRIM / WRITE_ZEROES split into chunks, by bulk id.
    bulks: HashMap<u64, Bulk>,
    /// Write payloads, until the write is answered.
    payloads: HashMap<DataHandle, Payload>,
    /// Read results, until the core hands them to a client reply.
    read_data: HashMap<DataHandle, Vec<u8>>,
    next_id: u64,
    /// Replica requests in flight, by ticket (allocation order = start order), for the
    /// request timeout.
    outstanding: BTreeMap<u64, (ReplicaId, u64, Instant)>,
    /// The metadata every replica should hold; `seq` bumps per batch.
    meta: MetaState,
    /// Batches handed out by the core and not yet answered, with the blob seq covering them.
    meta_pending: VecDeque<(MetaBatchId, u64)>,
    reconciled_regions: u64,
    events: VecDeque<Event>,
    stopped: Option<StopReason>,
    /// `BW_DRIVER_TRACE` set: print every event and effect to stderr (debugging tests).
    trace: bool,
    /// A clean detach in progress: its deadline and who waits for it.
    detaching: Option<(Instant, oneshot::Sender<bool>)>,
}

impl Driver {
    pub(crate) fn new(p: Parts) -> Driver {
        Driver {
            generation: p.core.generation(),
            core: p.core,
            opts: p.opts,
            started: p.started,
            tx: p.tx,
            connector: p.connector,
            catalog: p.catalog,
            notices: p.notices,
            shared: p.shared,
            slots: p.slots,
            clients: HashMap::new(),
            bulks: HashMap::new(),
            payloads: HashMap::new(),
            read_data: HashMap::new(),
            next_id: 0,
            outstanding: BTreeMap::new(),
            meta: p.meta,
            meta_pending: VecDeque::new(),
            reconciled_regions: 0,
            events: p.events,
            stopped: None,
            trace: std::env::var_os("BW_DRIVER_TRACE").is_some(),
            detaching: None,
        }
    }

    /// Runs until the attachment stops, then closes every session.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        mut lease_lost: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lease_open = true;
        if *lease_lost.borrow_and_update() {
            self.events.push_back(Event::LeaseLost);
        }
        for id in self.slots.keys().copied().collect::<Vec<_>>() {
            if self.slots[&id].link.is_none() {
                self.spawn_reconnect(id);
            }
        }
        self.pump();
        while self.stopped.is_none() {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { break };
                    self.on_msg(m);
                    // Take what else is queued before pumping, bounded so ticks keep
                    // their pace under load.
                    for _ in 0..256 {
                        match rx.try_recv() {
                            Ok(m) => self.on_msg(m),
                            Err(_) => break,
                        }
                    }
                }
                _ = tick.tick() => self.on_tick(),
                r = lease_lost.changed(), if lease_open => match r {
                    Ok(()) => {
                        if *lease_lost.borrow_and_update() {
                            self.events.push_back(Event::LeaseLost);
                        }
                    }
                    // Nobody can tell us about the lease any more: keep running on the
                    // catalog's and replicas' fences.
                    Err(_) => lease_open = false,
                },
            }
            self.pump();
            self.check_detach();
            // Every iteration, so a state change is visible before any reply that
            // depended on it is followed by a status read (one clone of a few replicas).
            self.publish_status();
        }
        self.shutdown(rx);
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Client { req, done } => self.client(req, done),
            Msg::Reply {
                replica,
                session,
                op,
                ticket,
                result,
            } => self.replica_reply(replica, session, op, ticket, result),
            Msg::Connected {
                replica,
                session,
                leg,
            } => self.connected(replica, session, leg),
            Msg::ConnectFenced(highest) => self.events.push_back(Event::Fenced { highest }),
            Msg::LegClosed {
                replica,
                session,
                reason,
            } => self.fail_link(replica, session, reason),
            Msg::MetaWritten {
                replica,
                session,
                seq,
                result,
            } => self.meta_written(replica, session, seq, result),
            Msg::Catalog { txn, outcome } => {
                self.events.push_back(Event::CatalogResult { txn, outcome })
            }
            Msg::CopyDone {
                copy,
                to,
                purpose,
                result,
            } => self.copy_done(copy, to, purpose, result),
            Msg::AddReplica(spec, dirty) => self.add_replica(spec, dirty),
            Msg::Stop(reason) => {
                if self.stopped.is_none() {
                    self.stopped = Some(reason);
                }
            }
            Msg::Detach { deadline, done } => {
                if self.detaching.is_none() {
                    self.events.push_back(Event::Quiesce);
                    self.detaching = Some((deadline, done));
                } else {
                    let _ = done.send(false);
                }
            }
        }
    }

    /// A clean detach ends once the activity log is empty on every replica that counts
    /// (then the next attachment reconciles nothing), or at its deadline, or as soon as
    /// the log cannot empty (a counted replica is not receiving writes: the log must keep
    /// covering what it may lack). Either way the attachment then stops; a log left
    /// behind is reconciled by the next attachment, as after a crash.
    fn check_detach(&mut self) {
        let Some((deadline, _)) = &self.detaching else {
            return;
        };
        let emptied = match self.core.log_drain() {
            // Empty includes "no batch in flight": `meta_pending` is then empty too.
            LogDrain::Empty => true,
            LogDrain::Blocked => false,
            _ if Instant::now() >= *deadline => false,
            _ => return,
        };
        let (_, done) = self.detaching.take().expect("checked above");
        if !emptied {
            log::warn!(
                "detach: the activity log still holds {} regions; the next attachment reconciles them",
                self.core.status().active_regions
            );
        }
        let _ = done.send(emptied);
        if self.stopped.is_none() {
            self.stopped = Some(StopReason::Requested("detached".into()));
        }
    }

    /// A new replica starts out of sync with `dirty` to copy; it is connected like any
    /// replica that is down, then resynced, then joins through the catalog.
    fn add_replica(&mut self, spec: ReplicaSpec, dirty: RegionSet) {
        if self.slots.contains_key(&spec.id) {
            return;
        }
        let slot = ReplicaSlot::new(
            spec.label.clone(),
            spec.local,
            1,
            self.opts.core.region_size_bytes,
        );
        self.slots.insert(spec.id, slot);
        // Into the blob too (the core treats the given bits as durable). Until that write
        // lands, a crash leaves no bits for it; `start` then treats a replica that was
        // never in sync as wholly dirty.
        self.meta.dirty.insert(spec.id, dirty.clone());
        self.meta.seq += 1;
        for id in self.slots.keys().copied().collect::<Vec<_>>() {
            self.write_meta(id);
        }
        self.events.push_back(Event::AddReplica(ReplicaInit {
            id: spec.id,
            local: spec.local,
            in_sync: false,
            last_in_sync_generation: spec.last_in_sync_generation,
            dirty,
        }));
        self.spawn_reconnect(spec.id);
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn on_tick(&mut self) {
        let now_ms = self.now_ms();
        self.events.push_back(Event::Tick { now_ms });
        self.check_timeouts();
        self.refill_tokens();
    }

    /// Feeds queued events to the core and performs its effects, until nothing moves.
    fn pump(&mut self) {
        let mut out = Vec::new();
        loop {
            while let Some(ev) = self.events.pop_front() {
                if self.stopped.is_some() {
                    return;
                }
                if self.trace {
                    eprintln!("repl-driver event: {ev:?}");
                }
                self.core.apply(ev, &mut out);
                // Requests to the local replica go last: a local write may be a blocking
                // `pwrite` on this thread (the store's inline path), and the remote legs of
                // the same writes should be on the wire meanwhile, not after it. Effects of
                // one replica keep their order.
                let mut local = Vec::new();
                for e in out.drain(..) {
                    if self.trace {
                        eprintln!("repl-driver   effect: {e:?}");
                    }
                    if self.is_local_request(&e) {
                        local.push(e);
                    } else {
                        self.perform(e);
                    }
                }
                for e in local {
                    self.perform(e);
                }
            }
            if self.stopped.is_some() {
                return;
            }
            self.check_meta_persisted();
            self.grant_credits();
            if self.events.is_empty() {
                return;
            }
        }
    }

    fn is_local_request(&self, e: &Effect) -> bool {
        let replica = match e {
            Effect::SendWrite { replica, .. }
            | Effect::SendFlush { replica, .. }
            | Effect::SendRead { replica, .. } => replica,
            _ => return false,
        };
        self.slots.get(replica).is_some_and(|s| s.local)
    }

    fn perform(&mut self, e: Effect) {
        match e {
            Effect::SendWrite {
                replica,
                session,
                op,
                offset,
                len,
                data,
                fua,
            } => {
                let req = match self.payloads.get(&data) {
                    Some(p) => p.request(offset, len, fua),
                    None => {
                        log::error!("write payload {data} missing for {op}");
                        return;
                    }
                };
                self.send(replica, session.0, op, req);
            }
            Effect::SendFlush {
                replica,
                session,
                op,
            } => self.send(replica, session.0, op, IoRequest::Flush),
            Effect::SendRead {
                replica,
                session,
                op,
                offset,
                len,
            } => {
                let len = len as u32;
                self.send(replica, session.0, op, IoRequest::Read { offset, len });
            }
            // The core already treats the session as failed: close it, no ReplicaDown.
            Effect::Disconnect { replica, session } => {
                self.close_link(replica, session.0, "disconnected after a failure")
            }
            Effect::Reply { req, result } => self.reply(req, result),
            Effect::PersistMeta { batch, changes } => {
                self.meta.apply(&changes);
                self.meta.generation = self.generation;
                self.meta_pending.push_back((batch, self.meta.seq));
                for id in self.slots.keys().copied().collect::<Vec<_>>() {
                    self.write_meta(id);
                }
            }
            Effect::CatalogTxn { txn, op } => {
                let fut = self.catalog.txn(op);
                let (tx, timeout) = (self.tx.clone(), self.opts.request_timeout);
                tokio::spawn(async move {
                    let outcome = tokio::time::timeout(timeout, fut)
                        .await
                        .unwrap_or(TxnOutcome::Unavailable);
                    let _ = tx.send(Msg::Catalog { txn, outcome });
                });
            }
            Effect::CopyRegion {
                copy,
                region,
                from,
                from_session,
                to,
                to_session,
                purpose,
            } => self.start_copy(
                copy,
                region,
                (from, from_session.0),
                (to, to_session.0),
                purpose,
            ),
            Effect::Notify(n) => {
                log::info!("replication (generation {}): {n:?}", self.generation);
                let _ = self.notices.send(n);
            }
            Effect::Stop(reason) => {
                log::warn!("replication (generation {}): {reason}", self.generation);
                self.stopped = Some(StopReason::Core(reason));
            }
        }
    }

    fn publish_status(&mut self) {
        let core = self.core.status();
        let replicas = core
            .replicas
            .iter()
            .filter_map(|r| self.slots.get_mut(&r.id).map(|s| s.status(r)))
            .collect();
        let st = DriverStatus {
            core,
            replicas,
            stopped: self.stopped.clone(),
            reconciled_regions: self.reconciled_regions,
        };
        *self.shared.status.lock().unwrap() = st;
    }

    /// After the loop: refuse what is queued, fail what is pending, close every session.
    fn shutdown(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let reason = self
            .stopped
            .clone()
            .unwrap_or_else(|| StopReason::Requested("all handles dropped".into()));
        self.stopped = Some(reason.clone());
        *self.shared.stopped.lock().unwrap() = Some(reason.clone());
        rx.close();
        let err = || IoError::Faulted(reason.to_string());
        while let Ok(m) = rx.try_recv() {
            match m {
                Msg::Client { done, .. } => done(Err(err())),
                Msg::Connected { leg, .. } => leg.close(),
                _ => {}
            }
        }
        for (_, c) in self.clients.drain() {
            if let client::ClientKind::Plain(done) = c.kind {
                done(Err(err()));
            }
        }
        for (_, b) in self.bulks.drain() {
            if let Some(done) = b.done {
                done(Err(err()));
            }
        }
        for slot in self.slots.values_mut() {
            slot.shut();
        }
        self.publish_status();
        self.shared.closed.send_replace(true);
    }
}
