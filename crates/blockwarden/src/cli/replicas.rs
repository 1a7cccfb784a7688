//! Replica commands' human output: one line per replica, the resync progress bar, and
//! `volume add-replica --wait`, which polls the volume until the new replica is in sync.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use api::{Client, ClientError, ErrorCode, ReplicaView, ResyncView, VolumeView};
use bw_types::format_size;

use super::table::{format_age_ms, Table};
use super::Failure;

/// Pause between two polls of `--wait`: quick enough for a smooth bar, cheap for the agent
/// (one GET of one volume).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// When stderr is not a terminal (a log, CI), a plain progress line this often instead of a
/// redrawn bar, so logs stay short but show the copy is moving.
pub const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `--wait` gives up (exit 3) when the agent stays unreachable this long; a restart of the
/// agent takes a few seconds, so this rides one out.
pub const UNREACHABLE_LIMIT: Duration = Duration::from_secs(30);

/// `--wait` gives up (exit 1) when neither the replica's state nor its copied bytes changed
/// for this long: the copy is stuck (node down, replica faulted, volume not attached
/// anywhere) and needs the operator, not a terminal waiting forever. `--timeout` bounds the
/// whole wait in addition.
pub const STALL_LIMIT: Duration = Duration::from_secs(600);

/// Characters of the bar between the brackets.
const BAR_WIDTH: usize = 20;

/// `[#####.....] 42% 420 MiB/1 GiB 95 MiB/s ETA 6s`: the one-line resync progress.
pub fn progress_bar(p: &ResyncView) -> String {
    let frac = if p.total_bytes == 0 {
        1.0
    } else {
        (p.copied_bytes.min(p.total_bytes) as f64) / (p.total_bytes as f64)
    };
    // Floors, so the bar is full and the figure 100% only when the copy is done.
    let filled = ((frac * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
    let pct = (frac * 100.0) as u64;
    format!(
        "[{}{}] {pct}% {}/{} {} ETA {}",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        format_size(p.copied_bytes),
        format_size(p.total_bytes),
        rate_str(p.rate_bytes_per_s),
        eta_str(p.eta_s),
    )
}

/// `95 MiB/s`.
pub fn rate_str(bytes_per_s: u64) -> String {
    format!("{}/s", format_size(bytes_per_s))
}

/// `6s`, `4m10s`; `?` while the agent has no rate to base it on.
fn eta_str(eta_s: Option<u64>) -> String {
    eta_s.map_or_else(|| "?".into(), |s| format_age_ms(s.saturating_mul(1000)))
}

/// A resync setting for humans: `default`, `unthrottled` or `100 MiB/s`.
pub fn resync_setting(rate: Option<u64>) -> String {
    match rate {
        None => "default".into(),
        Some(0) => "unthrottled".into(),
        Some(r) => rate_str(r),
    }
}

/// The replicas of `volume show`: id, node, state, how far it lags (bytes still to copy,
/// known while the volume is attached), and progress (%, rate, ETA) while one is being
/// copied to; the reason it is not in sync at the end.
pub fn replica_table(rs: &[ReplicaView]) -> String {
    let mut t = Table::new(&[
        "  ID", "NODE", "STATE", "LAG", "PROGRESS", "RATE", "ETA", "NOTE",
    ]);
    for r in rs {
        let (progress, rate, eta) = match &r.resync {
            Some(p) => (
                format!(
                    "{}% {}/{}",
                    percent(p),
                    format_size(p.copied_bytes),
                    format_size(p.total_bytes)
                ),
                rate_str(p.rate_bytes_per_s),
                eta_str(p.eta_s),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        t.row(vec![
            format!("  {}", r.id),
            r.node.clone(),
            r.state.clone(),
            r.lag_bytes.map_or_else(|| "-".into(), format_size),
            progress,
            rate,
            eta,
            r.error.clone().unwrap_or_default(),
        ]);
    }
    t.render()
}

fn percent(p: &ResyncView) -> u64 {
    if p.total_bytes == 0 {
        100
    } else {
        (u128::from(p.copied_bytes.min(p.total_bytes)) * 100 / u128::from(p.total_bytes)) as u64
    }
}

/// One line for a replica: `replica 3 on node-b: resyncing [###…] 42% …` or its state and
/// why it is not in sync.
pub fn replica_status(r: &ReplicaView) -> String {
    let mut s = format!("replica {} on node {}: {}", r.id, r.node, r.state);
    if let Some(p) = &r.resync {
        s.push(' ');
        s.push_str(&progress_bar(p));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!(" ({e})"));
    }
    s
}

/// The reasons a degraded volume is degraded, for `status`: its replicas not in sync.
pub fn degraded_reasons(v: &VolumeView) -> String {
    let bad: Vec<String> = v
        .replica_set
        .iter()
        .filter(|r| !r.in_sync)
        .map(|r| {
            let mut s = format!("replica {} on {} {}", r.id, r.node, r.state);
            if let Some(p) = &r.resync {
                s.push_str(&format!(" {}%", percent(p)));
            }
            if let Some(e) = &r.error {
                s.push_str(&format!(" ({e})"));
            }
            s
        })
        .collect();
    if bad.is_empty() {
        "run `blockwarden events` for the reason".into()
    } else {
        bad.join("; ")
    }
}

/// What ended a wait that did not see the replica in sync.
fn gave_up(code: i32, message: String) -> Failure {
    Failure { code, message }
}

/// Where progress goes: a bar redrawn in place on a terminal, else a plain line now and then.
struct Progress {
    tty: bool,
    drawn: bool,
    last_plain: Option<Instant>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            drawn: false,
            last_plain: None,
        }
    }

    fn show(&mut self, line: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            self.drawn = true;
        } else if self
            .last_plain
            .is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY)
        {
            let _ = writeln!(err, "{line}");
            self.last_plain = Some(Instant::now());
        }
        let _ = err.flush();
    }

    /// Ends the redrawn line so what follows starts on a line of its own.
    fn finish(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err);
            let _ = err.flush();
            self.drawn = false;
        }
    }
}

/// Polls volume `name` every `POLL_INTERVAL` until its replica on `node` is in sync, and
/// returns the volume as last seen. Gives up, saying why, when the volume or the replica
/// disappears, the agent refuses the GET or stays unreachable for `UNREACHABLE_LIMIT`, no
/// progress is seen for `STALL_LIMIT`, or `timeout` passes.
pub async fn wait_in_sync(
    client: &Client,
    name: &str,
    node: &str,
    timeout: Option<Duration>,
) -> Result<VolumeView, Failure> {
    let start = Instant::now();
    let mut bar = Progress::new();
    let mut unreachable_since: Option<Instant> = None;
    let mut last_change = Instant::now();
    let mut last_seen: Option<(String, u64)> = None;
    let result = loop {
        let v = match client.get_volume(name).await {
            Ok(v) => {
                unreachable_since = None;
                v
            }
            Err(e) => match e.api_error() {
                Some(a) if a.code == ErrorCode::NotFound => {
                    break Err(gave_up(
                        1,
                        format!("volume {name} was deleted while waiting for its replica on node {node}"),
                    ));
                }
                Some(_) => break Err(e.into()),
                None => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= UNREACHABLE_LIMIT {
                        break Err(unreachable(e));
                    }
                    tokio::time::sleep(POLL_INTERVAL).await;
                    continue;
                }
            },
        };
        let Some(r) = v.replica_set.iter().find(|r| r.node == node) else {
            break Err(gave_up(
                1,
                format!(
                    "the replica of volume {name} on node {node} was removed while waiting for it"
                ),
            ));
        };
        if r.in_sync {
            break Ok(v);
        }
        let seen = (r.state.clone(), r.resync.map_or(0, |p| p.copied_bytes));
        if last_seen.as_ref() != Some(&seen) {
            last_seen = Some(seen);
            last_change = Instant::now();
        }
        bar.show(&replica_status(r));
        if last_change.elapsed() >= STALL_LIMIT {
            break Err(gave_up(
                1,
                format!(
                    "gave up: no progress for {} ({}); the copy continues in the background, `blockwarden volume show {name}` follows it",
                    format_age_ms(STALL_LIMIT.as_millis() as u64),
                    replica_status(r)
                ),
            ));
        }
        if let Some(t) = timeout.filter(|t| start.elapsed() >= *t) {
            break Err(gave_up(
                1,
                format!(
                    "gave up after --timeout {} ({}); the copy continues in the background",
                    format_age_ms(t.as_millis() as u64),
                    replica_status(r)
                ),
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    bar.finish();
    result
}

fn unreachable(e: ClientError) -> Failure {
    Failure {
        code: 3,
        message: format!(
            "gave up waiting: {e} for {}",
            format_age_ms(UNREACHABLE_LIMIT.as_millis() as u64)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn resync(copied: u64, total: u64, rate: u64, eta: Option<u64>) -> ResyncView {
        ResyncView {
            copied_bytes: copied,
            total_bytes: total,
            rate_bytes_per_s: rate,
            eta_s: eta,
        }
    }

    // Goal: the bar reads as the brief shows it and never over- or under-flows.
    #[test]
    fn progress_bar_formats() {
        assert_eq!(
            progress_bar(&resync(420 * MIB, 1000 * MIB, 95 * MIB, Some(6))),
            "[########............] 42% 420 MiB/1000 MiB 95 MiB/s ETA 6s"
        );
        assert_eq!(
            progress_bar(&resync(0, 1 << 30, 0, None)),
            "[....................] 0% 0 B/1 GiB 0 B/s ETA ?"
        );
        assert_eq!(
            progress_bar(&resync(1 << 30, 1 << 30, 100 * MIB, Some(0))),
            "[####################] 100% 1 GiB/1 GiB 100 MiB/s ETA 0s"
        );
        // Almost done is not shown as done.
        assert!(progress_bar(&resync((1 << 30) - 1, 1 << 30, 1, Some(250)))
            .starts_with("[###################.] 99% "));
        // Nothing to copy, and a report overshooting its total, are full bars.
        assert!(progress_bar(&resync(0, 0, 0, None)).starts_with("[####################] 100%"));
        assert!(progress_bar(&resync(2 * MIB, MIB, 0, None)).contains("100%"));
        assert!(progress_bar(&resync(MIB, 10 * MIB, MIB, Some(250))).ends_with("ETA 4m10s"));
    }

    // Goal: `volume show` lists every replica with id, node and state, and progress only
    // where there is a copy going on.
    #[test]
    fn replica_table_shows_progress_for_resyncing_replicas() {
        let rs = vec![
            ReplicaView {
                id: 1,
                node: "node-a".into(),
                state: "in_sync".into(),
                in_sync: true,
                error: None,
                resync: None,
                lag_bytes: None,
            },
            ReplicaView {
                id: 3,
                node: "node-b".into(),
                state: "resyncing".into(),
                in_sync: false,
                error: None,
                resync: Some(resync(512 * MIB, 1 << 30, 64 * MIB, Some(8))),
                lag_bytes: Some(600 * MIB),
            },
            ReplicaView {
                id: 4,
                node: "node-c".into(),
                state: "stale".into(),
                in_sync: false,
                error: Some("node node-c is down".into()),
                resync: None,
                lag_bytes: None,
            },
        ];
        let t = replica_table(&rs);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].trim_start().starts_with("1") && lines[1].contains("in_sync"));
        assert!(
            lines[2].contains("node-b")
                && lines[2].contains("50% 512 MiB/1 GiB")
                && lines[2].contains("64 MiB/s")
                && lines[2].contains("8s")
                && lines[2].contains("600 MiB"),
            "{t}"
        );
        assert!(lines[3].contains("stale") && lines[3].ends_with("node node-c is down"));
        assert_eq!(
            replica_status(&rs[2]),
            "replica 4 on node node-c: stale (node node-c is down)"
        );
    }

    #[test]
    fn resync_settings_for_humans() {
        assert_eq!(resync_setting(None), "default");
        assert_eq!(resync_setting(Some(0)), "unthrottled");
        assert_eq!(resync_setting(Some(100 * MIB)), "100 MiB/s");
    }
}
