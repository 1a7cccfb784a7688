//! Sessions to replicas: sending requests and taking their replies, request timeouts,
//! sessions ending, reconnecting, and the metadata blob on every connected replica.
//!
//! **Metadata rule.** Each `PersistMeta` batch is applied to the driver's [`MetaState`]
//! (seq + 1) and the whole blob is written to every connected session, one write at a time
//! per session (a newer blob never races an older one on the same replica). The batch is
//! answered `MetaPersisted` once every *counting* replica (the catalog may list it in
//! sync: Connecting, InSync, Leaving, Rejoining) holds a blob with that seq or newer. A
//! counting replica that is down holds the answer until it reconnects (its new session
//! gets the current blob before `ReplicaUp`) or the catalog dropped it. A failed blob
//! write fails the session (fail-stop); a fenced one stops the attachment.
//!
//! [`MetaState`]: crate::meta::MetaState

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bw_types::{IoError, IoReply, IoRequest};
use replication::{Event, OpId, ReplicaId, ReplicaOutcome, ReplicaState, SessionId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Driver, Msg};
use crate::ports::{ConnectError, Leg, LegError};

/// One replica as the driver sees it.
pub(crate) struct ReplicaSlot {
    pub label: String,
    pub local: bool,
    /// The next session number to open (each attempt uses one up).
    pub next_session: Arc<AtomicU64>,
    /// The current session, if any.
    pub link: Option<Link>,
    /// The reconnect loop while the replica is down.
    reconnect: Option<JoinHandle<()>>,
    /// Sessions in a row that ended within [`STABLE_SESSION`] of opening (the replica is
    /// reachable but cannot keep a session: e.g. a link too slow for a resync copy). Each
    /// doubles the wait before the next reconnect, up to [`MAX_RECONNECT_BACKOFF`].
    short_sessions: u32,
    /// Rate limiter: tokens in bytes, and when they were last refilled.
    pub tokens: f64,
    pub last_refill: Option<Instant>,
    /// Bytes copied to this replica by resync since attach, and (time, total) samples over
    /// the last [`crate::RATE_WINDOW`] for the current rate.
    pub resynced_bytes: u64,
    pub samples: VecDeque<(Instant, u64)>,
    pub region_size_bytes: u64,
}

/// An open session.
pub(crate) struct Link {
    pub session: u64,
    pub leg: Arc<dyn Leg>,
    /// `ReplicaUp` was fed to the core.
    pub up: bool,
    /// Highest blob seq durable on this session (`None`: none written yet).
    pub meta_durable: Option<u64>,
    pub meta_writing: bool,
    /// Waits for the leg to end by itself.
    watcher: JoinHandle<()>,
    opened: Instant,
}

/// A session that lasted this long before it ended was a working one: the next reconnect
/// does not wait longer than `reconnect_interval`.
pub(crate) const STABLE_SESSION: Duration = Duration::from_secs(60);

/// Longest wait before reconnecting a replica whose sessions keep ending soon after they
/// open. Every attempt over a link that cannot carry a resync copy holds writes to the
/// copied region until the request timeout, so attempts are spaced out; a replica that is
/// simply down (connects fail) is still tried every `reconnect_interval`.
pub(crate) const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

/// The wait before the first reconnect attempt after `short` short sessions in a row.
pub(crate) fn reconnect_delay(interval: Duration, short: u32) -> Duration {
    interval
        .saturating_mul(1u32 << short.min(16))
        .min(MAX_RECONNECT_BACKOFF.max(interval))
}

impl Link {
    pub fn new(
        replica: ReplicaId,
        session: u64,
        leg: Arc<dyn Leg>,
        up: bool,
        tx: &mpsc::UnboundedSender<Msg>,
    ) -> Link {
        let closed = leg.closed();
        let tx = tx.clone();
        let watcher = tokio::spawn(async move {
            let reason = closed.await;
            let _ = tx.send(Msg::LegClosed {
                replica,
                session,
                reason,
            });
        });
        Link {
            session,
            leg,
            up,
            meta_durable: None,
            meta_writing: false,
            watcher,
            opened: Instant::now(),
        }
    }

    fn close(self) {
        self.watcher.abort();
        self.leg.close();
    }
}

impl ReplicaSlot {
    pub fn new(label: String, local: bool, next_session: u64, region_size_bytes: u64) -> Self {
        ReplicaSlot {
            label,
            local,
            next_session: Arc::new(AtomicU64::new(next_session)),
            link: None,
            reconnect: None,
            short_sessions: 0,
            tokens: 0.0,
            last_refill: None,
            resynced_bytes: 0,
            samples: VecDeque::new(),
            region_size_bytes,
        }
    }

    /// The wait before the next reconnect: the first session that ended early is retried
    /// at the normal pace; from the second in a row the wait doubles.
    fn reconnect_wait(&self, interval: Duration) -> Duration {
        reconnect_delay(interval, self.short_sessions.saturating_sub(1))
    }

    /// Closes the session and stops reconnecting (the attachment ended).
    pub fn shut(&mut self) {
        if let Some(h) = self.reconnect.take() {
            h.abort();
        }
        if let Some(l) = self.link.take() {
            l.close();
        }
    }
}

/// States in which the catalog may count a replica as in sync.
fn counting(s: Option<ReplicaState>) -> bool {
    matches!(
        s,
        Some(
            ReplicaState::Connecting
                | ReplicaState::InSync
                | ReplicaState::Leaving
                | ReplicaState::Rejoining
        )
    )
}

impl Driver {
    /// The current link of `replica` if it is session `session`.
    fn link(&mut self, replica: ReplicaId, session: u64) -> Option<&mut Link> {
        let link = self.slots.get_mut(&replica)?.link.as_mut()?;
        (link.session == session).then_some(link)
    }

    /// Sends one request on a session. A request for a session that is gone is dropped:
    /// the core hears (or heard) that the session ended and fails it.
    pub(super) fn send(&mut self, replica: ReplicaId, session: u64, op: OpId, req: IoRequest) {
        self.next_id += 1;
        let ticket = self.next_id;
        let tx = self.tx.clone();
        let Some(link) = self.link(replica, session) else {
            return;
        };
        let dev = link.leg.device();
        self.outstanding
            .insert(ticket, (replica, session, Instant::now()));
        dev.submit(
            req,
            Box::new(move |result| {
                let _ = tx.send(Msg::Reply {
                    replica,
                    session,
                    op,
                    ticket,
                    result,
                });
            }),
        );
    }

    pub(super) fn replica_reply(
        &mut self,
        replica: ReplicaId,
        session: u64,
        op: OpId,
        ticket: u64,
        result: Result<IoReply, IoError>,
    ) {
        self.outstanding.remove(&ticket);
        let Some(link) = self.link(replica, session) else {
            return; // an older session: the core ignores it too
        };
        let outcome = match result {
            Ok(IoReply::Data(bytes)) => {
                self.next_id += 1;
                let h = replication::DataHandle(self.next_id);
                self.read_data.insert(h, bytes);
                ReplicaOutcome::Data(h)
            }
            Ok(_) => ReplicaOutcome::Done,
            Err(e) => match link.leg.fenced() {
                Some(highest) => ReplicaOutcome::Fenced { highest },
                None => ReplicaOutcome::Failed(e.to_string()),
            },
        };
        self.events.push_back(Event::ReplicaReply {
            replica,
            session: SessionId(session),
            op,
            outcome,
        });
    }

    pub(super) fn connected(&mut self, replica: ReplicaId, session: u64, leg: Arc<dyn Leg>) {
        let tx = self.tx.clone();
        let Some(slot) = self.slots.get_mut(&replica) else {
            return leg.close();
        };
        slot.reconnect = None;
        if let Some(old) = slot.link.take() {
            old.close(); // cannot happen: reconnects run only while down
        }
        slot.link = Some(Link::new(replica, session, leg, false, &tx));
        // ReplicaUp follows once the current blob is durable on it (`meta_written`).
        self.write_meta(replica);
    }

    /// The session failed (ended by itself, timed out, a blob write failed): tell the core
    /// if it knew the session, close it, reconnect.
    pub(super) fn fail_link(&mut self, replica: ReplicaId, session: u64, reason: String) {
        let Some(link) = self.link(replica, session) else {
            return;
        };
        if link.up {
            self.events.push_back(Event::ReplicaDown {
                replica,
                session: SessionId(session),
                reason: reason.clone(),
            });
        }
        log::warn!("replica {replica} session {session}: {reason}");
        self.close_link(replica, session, &reason);
    }

    /// Closes the session (the core already knows it ended) and starts reconnecting.
    pub(super) fn close_link(&mut self, replica: ReplicaId, session: u64, why: &str) {
        if self.link(replica, session).is_none() {
            return;
        }
        let slot = self.slots.get_mut(&replica).expect("slot");
        log::debug!("replica {} session {session} closed: {why}", slot.label);
        let link = slot.link.take().expect("link");
        let lived = link.opened.elapsed();
        link.close();
        if lived < STABLE_SESSION {
            slot.short_sessions = slot.short_sessions.saturating_add(1);
        } else {
            slot.short_sessions = 0;
        }
        if slot.short_sessions > 1 {
            log::warn!(
                "replica {} ({}): {} sessions in a row ended within {STABLE_SESSION:?} (last after {lived:.1?}: {why}); next attempt in {:?}",
                replica.0,
                slot.label,
                slot.short_sessions,
                slot.reconnect_wait(self.opts.reconnect_interval)
            );
        }
        self.spawn_reconnect(replica);
    }

    /// Retries `connector.connect` every `reconnect_interval` until a session opens, the
    /// replica fences us, or the attachment ends.
    pub(super) fn spawn_reconnect(&mut self, replica: ReplicaId) {
        if self.stopped.is_some() {
            return;
        }
        let slot = self.slots.get_mut(&replica).expect("slot");
        if slot.reconnect.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let next = Arc::clone(&slot.next_session);
        let connector = Arc::clone(&self.connector);
        let tx = self.tx.clone();
        let interval = self.opts.reconnect_interval;
        let mut wait = slot.reconnect_wait(interval);
        let timeout = Duration::from_millis(self.opts.core.connect_timeout_ms);
        slot.reconnect = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(wait).await;
                wait = interval;
                let session = next.fetch_add(1, SeqCst);
                let attempt = connector.connect(replica, session);
                match tokio::time::timeout(timeout, attempt).await {
                    Ok(Ok(leg)) => {
                        let msg = Msg::Connected {
                            replica,
                            session,
                            leg,
                        };
                        if let Err(mpsc::error::SendError(Msg::Connected { leg, .. })) =
                            tx.send(msg)
                        {
                            leg.close();
                        }
                        return;
                    }
                    Ok(Err(ConnectError::Fenced(g))) => {
                        let _ = tx.send(Msg::ConnectFenced(g));
                        return;
                    }
                    Ok(Err(ConnectError::Unreachable(why))) => {
                        log::debug!("replica {replica} session {session}: {why}");
                    }
                    Err(_) => log::debug!("replica {replica} session {session}: timed out"),
                }
            }
        }));
    }

    /// Writes the current blob to `replica`'s session unless it has it or a write is
    /// already running (that write's completion comes back here).
    pub(super) fn write_meta(&mut self, replica: ReplicaId) {
        let (seq, tx, timeout) = (self.meta.seq, self.tx.clone(), self.opts.request_timeout);
        let blob = self.meta.encode();
        let Some(link) = self.slots.get_mut(&replica).and_then(|s| s.link.as_mut()) else {
            return;
        };
        if link.meta_writing || link.meta_durable.is_some_and(|d| d >= seq) {
            return;
        }
        link.meta_writing = true;
        let (leg, session) = (Arc::clone(&link.leg), link.session);
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, leg.write_meta(blob)).await {
                Ok(r) => r,
                Err(_) => Err(LegError::Failed("metadata write timed out".into())),
            };
            let _ = tx.send(Msg::MetaWritten {
                replica,
                session,
                seq,
                result,
            });
        });
    }

    pub(super) fn meta_written(
        &mut self,
        replica: ReplicaId,
        session: u64,
        seq: u64,
        result: Result<(), LegError>,
    ) {
        let Some(link) = self.link(replica, session) else {
            return;
        };
        link.meta_writing = false;
        match result {
            Ok(()) => {
                link.meta_durable = Some(link.meta_durable.map_or(seq, |d| d.max(seq)));
                if !link.up {
                    link.up = true;
                    self.events.push_back(Event::ReplicaUp {
                        replica,
                        session: SessionId(session),
                    });
                }
                self.write_meta(replica);
            }
            Err(LegError::Fenced(highest)) => self.events.push_back(Event::Fenced { highest }),
            Err(LegError::Failed(why)) => {
                self.fail_link(replica, session, format!("metadata write failed: {why}"))
            }
        }
    }

    /// Answers the oldest pending batch once every counting replica holds its blob.
    pub(super) fn check_meta_persisted(&mut self) {
        while let Some(&(batch, seq)) = self.meta_pending.front() {
            let held = self.slots.iter().all(|(id, s)| {
                !counting(self.core.replica_state(*id))
                    || s.link
                        .as_ref()
                        .is_some_and(|l| l.meta_durable.is_some_and(|d| d >= seq))
            });
            if !held {
                return;
            }
            self.meta_pending.pop_front();
            self.events.push_back(Event::MetaPersisted { batch });
        }
    }

    /// Fails every session with a request outstanding longer than the request timeout.
    pub(super) fn check_timeouts(&mut self) {
        let limit = self.opts.request_timeout;
        while let Some((&ticket, &(replica, session, at))) = self.outstanding.first_key_value() {
            if at.elapsed() < limit {
                return;
            }
            self.outstanding.remove(&ticket);
            let why = format!("request timed out after {} ms", limit.as_millis());
            self.fail_link(replica, session, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a replica whose sessions keep ending soon after they open is retried less and
    // less often (each attempt over a link too slow for a copy holds writes to one region
    // until the request timeout), never slower than every 30 s, and a replica whose last
    // session was a working one is retried at the normal pace.
    #[test]
    fn reconnect_waits_double_per_short_session_up_to_the_cap() {
        let i = Duration::from_secs(1);
        let waits: Vec<u64> = (0..8).map(|n| reconnect_delay(i, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(reconnect_delay(i, u32::MAX), MAX_RECONNECT_BACKOFF);
        // An interval above the cap is kept as it is.
        assert_eq!(
            reconnect_delay(Duration::from_secs(45), 3),
            Duration::from_secs(45)
        );
        assert_eq!(
            reconnect_delay(Duration::from_millis(100), 0),
            Duration::from_millis(100)
        );
    }
}
