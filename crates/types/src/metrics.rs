//! Per-volume I/O counters and latency histograms, rendered in the Prometheus text format.
//!
//! The NBD front end records every request it answers (latency = request fully received →
//! reply queued); the API renders them at `/metrics`. Counters are relaxed atomics: a scrape
//! may see one request's count without its bytes, never a torn value.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::blockdev::IoKind;

/// Upper bounds of the latency buckets, in seconds. Chosen to resolve the page-cache fast
/// path (tens of µs), a disk flush (~0.1–5 ms) and stalls up to a second.
pub const LATENCY_BUCKETS_S: [f64; 14] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

#[derive(Default)]
struct KindCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_sum_ns: AtomicU64,
    /// One per bucket of [`LATENCY_BUCKETS_S`], plus +Inf. Not cumulative (summed on render).
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len() + 1],
}

/// Counters of one volume's I/O.
#[derive(Default)]
pub struct IoMetrics {
    kinds: [KindCounters; 6],
}

fn index(kind: IoKind) -> usize {
    IoKind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl IoMetrics {
    pub fn new() -> IoMetrics {
        IoMetrics::default()
    }

    /// Records one answered request of `bytes` payload.
    pub fn record(&self, kind: IoKind, bytes: u64, latency: Duration, ok: bool) {
        let c = &self.kinds[index(kind)];
        c.ops.fetch_add(1, Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Relaxed);
        } else {
            c.errors.fetch_add(1, Relaxed);
        }
        let ns = latency.as_nanos().min(u64::MAX as u128) as u64;
        c.latency_sum_ns.fetch_add(ns, Relaxed);
        let s = ns as f64 / 1e9;
        let b = LATENCY_BUCKETS_S
            .iter()
            .position(|&ub| s <= ub)
            .unwrap_or(LATENCY_BUCKETS_S.len());
        c.buckets[b].fetch_add(1, Relaxed);
    }

    /// Operations of `kind` answered so far.
    pub fn ops(&self, kind: IoKind) -> u64 {
        self.kinds[index(kind)].ops.load(Relaxed)
    }

    /// Payload bytes of successful `kind` operations so far.
    pub fn bytes(&self, kind: IoKind) -> u64 {
        self.kinds[index(kind)].bytes.load(Relaxed)
    }

    /// Failed `kind` operations so far.
    pub fn errors(&self, kind: IoKind) -> u64 {
        self.kinds[index(kind)].errors.load(Relaxed)
    }

    /// Appends this volume's series, labelled `volume="<name>"`. Call
    /// [`render_headers`] once before the first volume.
    pub fn render(&self, volume: &str, out: &mut String) {
        for kind in IoKind::ALL {
            let c = &self.kinds[index(kind)];
            let l = format!("volume=\"{volume}\",op=\"{}\"", kind.as_str());
            let _ = writeln!(
                out,
                "blockwarden_volume_ops_total{{{l}}} {}",
                c.ops.load(Relaxed)
            );
            let _ = writeln!(
                out,
                "blockwarden_volume_bytes_total{{{l}}} {}",
                c.bytes.load(Relaxed)
            );
            let _ = writeln!(
                out,
                "blockwarden_volume_errors_total{{{l}}} {}",
                c.errors.load(Relaxed)
            );
            let mut cum = 0;
            for (i, ub) in LATENCY_BUCKETS_S.iter().enumerate() {
                cum += c.buckets[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "blockwarden_volume_latency_seconds_bucket{{{l},le=\"{ub}\"}} {cum}"
                );
            }
            cum += c.buckets[LATENCY_BUCKETS_S.len()].load(Relaxed);
            let _ = writeln!(
                out,
                "blockwarden_volume_latency_seconds_bucket{{{l},le=\"+Inf\"}} {cum}"
            );
            let sum = c.latency_sum_ns.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "blockwarden_volume_latency_seconds_sum{{{l}}} {sum}");
            let _ = writeln!(out, "blockwarden_volume_latency_seconds_count{{{l}}} {cum}");
        }
    }
}

/// The `# HELP` / `# TYPE` lines for the series [`IoMetrics::render`] writes.
pub fn render_headers(out: &mut String) {
    out.push_str(
        "# HELP blockwarden_volume_ops_total NBD requests answered, by volume and operation.\n\
         # TYPE blockwarden_volume_ops_total counter\n\
         # HELP blockwarden_volume_bytes_total Payload bytes of successful requests.\n\
         # TYPE blockwarden_volume_bytes_total counter\n\
         # HELP blockwarden_volume_errors_total Requests answered with an error.\n\
         # TYPE blockwarden_volume_errors_total counter\n\
         # HELP blockwarden_volume_latency_seconds Time from request received to reply queued.\n\
         # TYPE blockwarden_volume_latency_seconds histogram\n",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: counts land in the right series and buckets are cumulative.
    #[test]
    fn records_and_renders() {
        let m = IoMetrics::new();
        m.record(IoKind::Write, 4096, Duration::from_micros(30), true);
        m.record(IoKind::Write, 4096, Duration::from_millis(2), false);
        assert_eq!(m.ops(IoKind::Write), 2);
        assert_eq!(m.bytes(IoKind::Write), 4096);
        assert_eq!(m.errors(IoKind::Write), 1);
        let mut s = String::new();
        m.render("v1", &mut s);
        assert!(s.contains("blockwarden_volume_ops_total{volume=\"v1\",op=\"write\"} 2"));
        assert!(s.contains("latency_seconds_bucket{volume=\"v1\",op=\"write\",le=\"0.00005\"} 1"));
        assert!(s.contains("latency_seconds_bucket{volume=\"v1\",op=\"write\",le=\"+Inf\"} 2"));
    }
}
