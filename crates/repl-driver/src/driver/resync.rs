//! Region copies (resync and crash reconciliation), the resync rate limiter, and the
//! per-replica rate / ETA figures.
//!
//! **Rate limiter.** A token bucket per replica being resynced (each replica gets the set
//! rate; two resyncing replicas read the source at twice the rate). Tokens accrue in bytes
//! at the set rate; one region's worth buys one `ResyncCredit`, granted only while the core
//! holds no unused credit for that replica, and the bucket holds at most one region plus
//! one tick's accrual, so a burst never exceeds about one region and tick granularity does
//! not lose tokens. Unthrottled: the core's credits are topped up to
//! [`MAX_RESYNC_CREDITS`]. A rate change applies from the next tick.
//!
//! **Holes are free.** A region copy first asks the source for the region's allocation
//! status; a region that reads as zeroes there is not read, the target's range is zeroed
//! (may punch), and the copy's credit is handed straight back: the rate bounds the bytes
//! actually moved, so a new replica of a sparse volume is filled at the set rate for its
//! allocated data, and its empty regions cost one round trip each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bw_types::{Generation, IoError, IoReply, IoRequest};
use replication::config::MAX_RESYNC_CREDITS;
use replication::{CopyId, CopyPurpose, Event, RegionIndex, ReplicaId, ReplicaState};
use tokio::sync::oneshot;

use super::sessions::ReplicaSlot;
use super::{Driver, Msg, TICK};
use crate::device::ReplicaDriverStatus;
use crate::ports::Leg;

/// Largest single read or write of a region copy. Equal to the default region size: one
/// request each way per region, and no larger than a peer-protocol message may carry.
pub const COPY_CHUNK_BYTES: u64 = 1 << 20;

/// Window over which the current resync rate is measured for status and ETA.
pub const RATE_WINDOW: Duration = Duration::from_secs(3);

/// `Ok(bytes read from the source)` or `Err((replica at fault, reason, fenced by))`.
type CopyResult = Result<u64, (ReplicaId, String, Option<Generation>)>;

impl Driver {
    pub(super) fn start_copy(
        &mut self,
        copy: CopyId,
        region: RegionIndex,
        (from, from_session): (ReplicaId, u64),
        (to, to_session): (ReplicaId, u64),
        purpose: CopyPurpose,
    ) {
        let leg_of = |d: &Driver, r: ReplicaId, s: u64| {
            let l = d.slots.get(&r)?.link.as_ref()?;
            (l.session == s).then(|| Arc::clone(&l.leg))
        };
        let (src, dst) = match (
            leg_of(self, from, from_session),
            leg_of(self, to, to_session),
        ) {
            (Some(s), Some(d)) => (s, d),
            (None, _) => return self.copy_failed_now(copy, from, "source session ended"),
            (_, None) => return self.copy_failed_now(copy, to, "target session ended"),
        };
        let region_size = self.opts.core.region_size_bytes;
        let offset = region.0 * region_size;
        let len = region_size.min(self.opts.core.volume_size_bytes.saturating_sub(offset));
        let (tx, timeout) = (self.tx.clone(), self.opts.request_timeout);
        tokio::spawn(async move {
            let result = copy_range(&src, from, &dst, to, offset, len, timeout).await;
            let _ = tx.send(Msg::CopyDone {
                copy,
                to,
                purpose,
                result,
            });
        });
    }

    fn copy_failed_now(&mut self, copy: CopyId, replica: ReplicaId, why: &str) {
        self.events.push_back(Event::CopyFailed {
            copy,
            replica,
            reason: why.to_string(),
        });
    }

    pub(super) fn copy_done(
        &mut self,
        copy: CopyId,
        to: ReplicaId,
        purpose: CopyPurpose,
        result: CopyResult,
    ) {
        match result {
            Ok(bytes) => {
                match purpose {
                    CopyPurpose::Resync if bytes == 0 => {
                        // A hole: nothing moved, so it costs no rate (see the module doc).
                        if self.shared.rate.lock().unwrap().is_some() {
                            self.events.push_back(Event::ResyncCredit { replica: to });
                        }
                    }
                    CopyPurpose::Resync => {
                        if let Some(s) = self.slots.get_mut(&to) {
                            s.resynced_bytes += bytes;
                        }
                    }
                    CopyPurpose::Reconcile => self.reconciled_regions += 1,
                }
                self.events.push_back(Event::RegionCopied { copy });
            }
            Err((_, _, Some(highest))) => self.events.push_back(Event::Fenced { highest }),
            Err((replica, reason, None)) => self.events.push_back(Event::CopyFailed {
                copy,
                replica,
                reason,
            }),
        }
    }

    /// Adds the tokens accrued since the last refill (once per tick).
    pub(super) fn refill_tokens(&mut self) {
        let rate = *self.shared.rate.lock().unwrap();
        let now = Instant::now();
        for slot in self.slots.values_mut() {
            let elapsed = slot
                .last_refill
                .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
            slot.last_refill = Some(now);
            if let Some(rate) = rate {
                let cap = slot.region_size_bytes as f64 + rate as f64 * TICK.as_secs_f64();
                slot.tokens = (slot.tokens + rate as f64 * elapsed).min(cap);
            }
            slot.samples.push_back((now, slot.resynced_bytes));
            while slot
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
            {
                slot.samples.pop_front();
            }
        }
    }

    /// Hands the core the credits the limiter allows, for every replica being resynced.
    pub(super) fn grant_credits(&mut self) {
        let rate = *self.shared.rate.lock().unwrap();
        for (id, slot) in self.slots.iter_mut() {
            if self.core.replica_state(*id) != Some(ReplicaState::Resyncing) {
                slot.tokens = 0.0;
                continue;
            }
            let held = self.core.resync_credits(*id);
            match rate {
                None => {
                    for _ in held..MAX_RESYNC_CREDITS {
                        self.events.push_back(Event::ResyncCredit { replica: *id });
                    }
                }
                Some(_) => {
                    let cost = slot.region_size_bytes as f64;
                    if held == 0 && slot.tokens >= cost {
                        slot.tokens -= cost;
                        self.events.push_back(Event::ResyncCredit { replica: *id });
                    }
                }
            }
        }
    }
}

impl ReplicaSlot {
    pub fn status(&mut self, r: &replication::ReplicaStatus) -> ReplicaDriverStatus {
        let rate = match (self.samples.front(), self.samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                ((b1 - b0) as f64 / t1.duration_since(*t0).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let region = self.region_size_bytes;
        let left = r.resync_total.saturating_sub(r.resync_copied) * region;
        let resyncing = r.state == ReplicaState::Resyncing;
        ReplicaDriverStatus {
            id: r.id,
            label: self.label.clone(),
            state: r.state,
            connected: self.link.as_ref().is_some_and(|l| l.up),
            resync_copied_regions: r.resync_copied,
            resync_total_regions: r.resync_total,
            resync_copied_bytes: r.resync_copied * region,
            resync_total_bytes: r.resync_total * region,
            resync_rate_bytes_per_s: rate,
            resync_eta_s: (resyncing && rate > 0).then(|| left.div_ceil(rate)),
            resynced_bytes_total: self.resynced_bytes,
            dirty_bytes: r.dirty_regions * region,
            last_error: r.last_error.clone(),
        }
    }
}

/// Submits one request and waits for its completion (bounded by `timeout`).
async fn submit(leg: &Arc<dyn Leg>, req: IoRequest, timeout: Duration) -> Result<IoReply, String> {
    let (tx, rx) = oneshot::channel();
    leg.device().submit(
        req,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(Ok(reply))) => Ok(reply),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(_)) => Err(IoError::Io("completion dropped".into()).to_string()),
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    }
}

/// Copies `[offset, offset + len)` from `src` to `dst` in chunks; an all-zero chunk is
/// written as WRITE_ZEROES that may punch a hole, so holes stay holes. A range that reads as
/// zeroes on the source (block status) is not read at all: the target's range is zeroed.
/// Returns the bytes read from the source.
async fn copy_range(
    src: &Arc<dyn Leg>,
    from: ReplicaId,
    dst: &Arc<dyn Leg>,
    to: ReplicaId,
    offset: u64,
    len: u64,
    timeout: Duration,
) -> CopyResult {
    let fail = |leg: &Arc<dyn Leg>, r: ReplicaId, why: String| Err((r, why, leg.fenced()));
    let status = IoRequest::BlockStatus { offset, len };
    let all_zero = match submit(src, status, timeout).await {
        Ok(IoReply::Extents(e)) => e.first().is_some_and(|x| x.zero && x.len >= len),
        Ok(_) => return fail(src, from, "copy block status: malformed reply".into()),
        Err(e) => return fail(src, from, format!("copy block status: {e}")),
    };
    if all_zero {
        let zero = IoRequest::WriteZeroes {
            offset,
            len,
            may_punch: true,
            fua: false,
        };
        if let Err(e) = submit(dst, zero, timeout).await {
            return fail(dst, to, format!("copy write: {e}"));
        }
        return Ok(0);
    }
    let mut at = offset;
    while at < offset + len {
        let n = COPY_CHUNK_BYTES.min(offset + len - at);
        let read = IoRequest::Read {
            offset: at,
            len: n as u32,
        };
        let data = match submit(src, read, timeout).await {
            Ok(IoReply::Data(d)) if d.len() as u64 == n => d,
            Ok(_) => return fail(src, from, "copy read: short or malformed reply".into()),
            Err(e) => return fail(src, from, format!("copy read: {e}")),
        };
        let write = if data.iter().all(|b| *b == 0) {
            IoRequest::WriteZeroes {
                offset: at,
                len: n,
                may_punch: true,
                fua: false,
            }
        } else {
            IoRequest::Write {
                offset: at,
                data: data.into(),
                fua: false,
            }
        };
        if let Err(e) = submit(dst, write, timeout).await {
            return fail(dst, to, format!("copy write: {e}"));
        }
        at += n;
    }
    Ok(len)
}
