//! Server-wide counters, rendered in the Prometheus text format next to the per-volume
//! [`bw_types::IoMetrics`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one NBD server (all listeners that share it). Relaxed atomics: a scrape never
/// sees a torn value, and nothing orders against them.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted (including those refused for the connection limit).
    pub connections_total: AtomicU64,
    /// Connections currently being served (handshake or transmission).
    pub connections_open: AtomicU64,
    /// Connections closed at once because [`crate::MAX_CONNECTIONS`] were open.
    pub connections_refused_total: AtomicU64,
    /// Handshakes that ended without transmission for a reason other than a clean
    /// `NBD_OPT_ABORT`: broken frames, unknown client flags, timeout, refused EXPORT_NAME.
    pub handshake_failures_total: AtomicU64,
    /// Transmission-phase connections closed because the client broke framing (bad magic).
    pub protocol_errors_total: AtomicU64,
    /// Connections closed by their export's kill signal.
    pub connections_killed_total: AtomicU64,
}

impl ServerStats {
    pub fn new() -> ServerStats {
        ServerStats::default()
    }

    /// Appends every series with its `# HELP` and `# TYPE` lines.
    pub fn render_prometheus(&self, out: &mut String) {
        let series: [(&str, &str, &str, &AtomicU64); 6] = [
            (
                "connections_total",
                "counter",
                "NBD connections accepted.",
                &self.connections_total,
            ),
            (
                "connections_open",
                "gauge",
                "NBD connections being served.",
                &self.connections_open,
            ),
            (
                "connections_refused_total",
                "counter",
                "NBD connections refused at the connection limit.",
                &self.connections_refused_total,
            ),
            (
                "handshake_failures_total",
                "counter",
                "NBD handshakes that failed.",
                &self.handshake_failures_total,
            ),
            (
                "protocol_errors_total",
                "counter",
                "NBD connections closed for broken framing.",
                &self.protocol_errors_total,
            ),
            (
                "connections_killed_total",
                "counter",
                "NBD connections closed by a kill signal.",
                &self.connections_killed_total,
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP blockwarden_nbd_{name} {help}");
            let _ = writeln!(out, "# TYPE blockwarden_nbd_{name} {kind}");
            let _ = writeln!(out, "blockwarden_nbd_{name} {}", value.load(Relaxed));
        }
    }
}

/// Holds one unit of `connections_open` for as long as it lives.
pub(crate) struct OpenConnection<'a>(&'a ServerStats);

impl<'a> OpenConnection<'a> {
    pub(crate) fn new(stats: &'a ServerStats) -> Self {
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
        let s = ServerStats::new();
        s.connections_total.fetch_add(3, Relaxed);
        {
            let _open = OpenConnection::new(&s);
            assert_eq!(s.connections_open.load(Relaxed), 1);
        }
        let mut out = String::new();
        s.render_prometheus(&mut out);
        assert!(out.contains("# TYPE blockwarden_nbd_connections_open gauge\n"));
        assert!(out.contains("blockwarden_nbd_connections_total 3\n"));
        assert!(out.contains("blockwarden_nbd_connections_open 0\n"));
        assert_eq!(out.lines().count(), 18);
    }
}
