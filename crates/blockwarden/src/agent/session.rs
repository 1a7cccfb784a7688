//! The node's session lease and the self-fencing deadline derived from it.
//!
//! One lease per node covers every key the node holds (its `alive/` key and the owner keys
//! of the volumes attached here). The keepalive loop renews it every
//! [`KEEPALIVE_INTERVAL`]; each acknowledged renewal moves the **self-fence deadline** to
//! `send time of that renewal + granted TTL − FENCE_MARGIN`. etcd cannot expire the lease
//! before `receive time + TTL`, which is later than `send time + TTL`, so once the deadline
//! has passed this node stops acknowledging I/O strictly before anyone else can acquire its
//! volumes (`docs/design/leases-and-fencing.md` walks through the timeline).
//!
//! The check is made on every request ([`Session::is_valid`]: one atomic load and one
//! monotonic clock read), so it does not depend on a timer firing on time; a watchdog
//! thread additionally notices the deadline to close connections and log.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use catalog::{ClusterStore, Lease, LeaseId};
use tokio::sync::watch;

/// How often the lease is renewed. Renewals are cheap (~0.4 ms, no raft round), and renewing
/// far more often than TTL/3 means one slow or lost renewal (an election stalls them ~1.5 s)
/// never brings the deadline close.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// Subtracted from the granted TTL to get the self-fence deadline. It must cover the time an
/// already-submitted write needs to complete after the deadline (milliseconds normally),
/// clock-rate differences between this host and the etcd leader (ppm), and etcd's early
/// expiry checks; 2 s of an 8 s TTL leaves 6 s of tolerated renewal outage.
pub const FENCE_MARGIN: Duration = Duration::from_secs(2);

/// What the session is doing, for logs, events and the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Renewals arrive; I/O is allowed.
    Valid,
    /// The deadline passed without a renewal: I/O is refused until a renewal of the same
    /// lease succeeds (nobody else can have acquired anything meanwhile).
    Paused,
    /// The lease expired or was revoked: every attachment made under it is void.
    Lost,
}

pub struct Session {
    base: Instant,
    /// Self-fence deadline in ns since `base`; 0 = no valid lease.
    deadline_ns: AtomicU64,
    lease_id: AtomicI64,
    ttl: Mutex<Duration>,
    lost: AtomicBool,
    state: watch::Sender<SessionState>,
}

impl Session {
    /// Starts a session on a freshly granted lease.
    pub fn new(lease: Lease, granted_at: Instant) -> Arc<Session> {
        let s = Session {
            base: granted_at,
            deadline_ns: AtomicU64::new(0),
            lease_id: AtomicI64::new(lease.id.0),
            ttl: Mutex::new(lease.ttl),
            lost: AtomicBool::new(false),
            state: watch::channel(SessionState::Valid).0,
        };
        s.renewed(granted_at, lease.ttl);
        Arc::new(s)
    }

    pub fn lease_id(&self) -> LeaseId {
        LeaseId(self.lease_id.load(Ordering::Acquire))
    }

    pub fn ttl(&self) -> Duration {
        *self.ttl.lock().unwrap()
    }

    /// True while this node may acknowledge I/O on volumes attached under the lease.
    pub fn is_valid(&self) -> bool {
        if self.lost.load(Ordering::Acquire) {
            return false;
        }
        let d = self.deadline_ns.load(Ordering::Acquire);
        d != 0 && (self.base.elapsed().as_nanos() as u64) < d
    }

    /// Time left before the self-fence deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        let d = self.deadline_ns.load(Ordering::Acquire);
        Duration::from_nanos(d.saturating_sub(self.base.elapsed().as_nanos() as u64))
    }

    pub fn subscribe(&self) -> watch::Receiver<SessionState> {
        self.state.subscribe()
    }

    pub fn state(&self) -> SessionState {
        *self.state.borrow()
    }

    /// A renewal sent at `sent` was acknowledged with `ttl` remaining.
    fn renewed(&self, sent: Instant, ttl: Duration) {
        let deadline = sent.saturating_duration_since(self.base) + ttl.saturating_sub(FENCE_MARGIN);
        self.deadline_ns
            .fetch_max(deadline.as_nanos() as u64, Ordering::AcqRel);
        *self.ttl.lock().unwrap() = ttl;
        if !self.lost.load(Ordering::Acquire) {
            self.state.send_if_modified(|s| {
                std::mem::replace(s, SessionState::Valid) != SessionState::Valid
            });
        }
    }

    /// The lease is gone for good.
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.state.send_replace(SessionState::Lost);
    }

    fn mark_paused(&self) {
        self.state.send_if_modified(|s| {
            if *s == SessionState::Valid {
                *s = SessionState::Paused;
                true
            } else {
                false
            }
        });
    }
}

/// Renews the lease until shutdown or loss. Returns when the lease is lost (the caller then
/// starts a new session) or `shutdown` fires.
pub async fn keepalive_loop<C: ClusterStore>(
    catalog: Arc<C>,
    session: Arc<Session>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(KEEPALIVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let sent = Instant::now();
        match catalog.keep_alive(session.lease_id()).await {
            Ok(ttl) if !ttl.is_zero() => session.renewed(sent, ttl),
            Ok(_) | Err(catalog::CatalogError::LeaseExpired { .. }) => {
                log::error!(
                    "session lease {} expired: volumes attached here are released",
                    session.lease_id()
                );
                session.mark_lost();
                return;
            }
            Err(e) => {
                log::warn!(
                    "lease renewal failed ({e}); self-fence in {:?} unless a renewal succeeds",
                    session.remaining()
                );
            }
        }
    }
}

/// Watches the deadline from a plain thread (independent of the async runtime's health) and
/// flips the session to `Paused` when it passes, so connections can be closed and the event
/// logged. The data path does not depend on this thread: it checks the deadline itself.
pub fn spawn_watchdog(session: Arc<Session>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("bw-fence-watchdog".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) && session.state() != SessionState::Lost {
                if !session.is_valid() {
                    session.mark_paused();
                }
                std::thread::sleep(
                    Duration::from_millis(50)
                        .min(session.remaining().max(Duration::from_millis(5))),
                );
            }
        })
        .expect("spawn the fence watchdog thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the deadline is send time + TTL − margin, moves only forward, and loss is final.
    #[test]
    fn deadline_follows_renewals_and_loss_is_final() {
        let t0 = Instant::now();
        let s = Session::new(
            Lease {
                id: LeaseId(7),
                ttl: Duration::from_millis(2300),
            },
            t0,
        );
        assert!(s.is_valid());
        assert!(s.remaining() <= Duration::from_millis(300));
        std::thread::sleep(Duration::from_millis(350));
        assert!(
            !s.is_valid(),
            "300 ms after grant with TTL 2.3 s and a 2 s margin: fenced"
        );
        s.renewed(Instant::now(), Duration::from_secs(8));
        assert!(s.is_valid());
        assert!(s.remaining() > Duration::from_secs(5));
        // An older renewal acknowledged late never pulls the deadline back.
        s.renewed(t0, Duration::from_secs(3));
        assert!(s.remaining() > Duration::from_secs(5));
        s.mark_lost();
        assert!(!s.is_valid());
        s.renewed(Instant::now(), Duration::from_secs(8));
        assert!(!s.is_valid(), "a lost session never becomes valid again");
        assert_eq!(s.state(), SessionState::Lost);
    }
}
