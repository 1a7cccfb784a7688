//! Counters of the peer server, in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one peer server. Relaxed atomics: a scrape never sees a torn value, and
/// nothing orders against them.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Connections accepted (including those refused at the connection limit).
    pub connections_total: AtomicU64,
    /// Connections being served now (handshake or transmission).
    pub connections_open: AtomicU64,
    /// Handshakes answered with a refusal (any code) or cut by the deadline.
    pub handshakes_refused_total: AtomicU64,
    /// Connections refused because the hello's generation was stale.
    pub stale_generation_total: AtomicU64,
    /// Connections closed because a request's generation was fenced.
    pub fenced_total: AtomicU64,
    /// Connections closed for broken framing (bad magic, oversize frame).
    pub protocol_errors_total: AtomicU64,
    /// Requests executed (answered by the replica, successfully or not).
    pub requests_total: AtomicU64,
}

impl PeerStats {
    pub fn new() -> PeerStats {
        PeerStats::default()
    }

    /// Appends every series with its `# HELP` and `# TYPE` lines.
    pub fn render_prometheus(&self, out: &mut String) {
        let series: [(&str, &str, &str, &AtomicU64); 7] = [
            (
                "connections_total",
                "counter",
                "Peer connections accepted.",
                &self.connections_total,
            ),
            (
                "connections_open",
                "gauge",
                "Peer connections being served.",
                &self.connections_open,
            ),
            (
                "handshakes_refused_total",
                "counter",
                "Peer handshakes refused or timed out.",
                &self.handshakes_refused_total,
            ),
            (
                "stale_generation_total",
                "counter",
                "Peer handshakes refused for a stale generation.",
                &self.stale_generation_total,
            ),
            (
                "fenced_total",
                "counter",
                "Peer connections closed because their generation was fenced.",
                &self.fenced_total,
            ),
            (
                "protocol_errors_total",
                "counter",
                "Peer connections closed for broken framing.",
                &self.protocol_errors_total,
            ),
            (
                "requests_total",
                "counter",
                "Peer requests executed.",
                &self.requests_total,
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP blockwarden_peer_{name} {help}");
            let _ = writeln!(out, "# TYPE blockwarden_peer_{name} {kind}");
            let _ = writeln!(out, "blockwarden_peer_{name} {}", value.load(Relaxed));
        }
    }
}

/// Holds one unit of `connections_open` for as long as it lives.
pub(crate) struct OpenConnection<'a>(&'a PeerStats);

impl<'a> OpenConnection<'a> {
    pub(crate) fn new(stats: &'a PeerStats) -> Self {
        stats.connections_open.fetch_add(1, Relaxed);
        OpenConnection(stats)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let s = PeerStats::new();
        s.fenced_total.fetch_add(2, Relaxed);
        let mut out = String::new();
        s.render_prometheus(&mut out);
        assert!(out.contains("blockwarden_peer_fenced_total 2\n"));
        assert_eq!(out.lines().count(), 21);
    }
}
