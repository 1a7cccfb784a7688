//! The embedded backend's change feed for `watch_prefix`.
//!
//! Every committed key change is published on a broadcast channel while the writer still
//! holds the log's lock, so watchers see revision order. The newest `WATCH_REPLAY_EVENTS`
//! changes are kept in memory so a watcher can start from a revision slightly in the past
//! (list, then watch from the list's revision + 1); older history is gone, and a watcher
//! asking for it gets a closed channel, like etcd's "compacted".

use std::collections::VecDeque;

use tokio::sync::{broadcast, mpsc};

use crate::kv::{Prefix, Revision};
use crate::lease::{WatchEvent, WATCH_BUFFER};

/// Changes kept for replay. A watcher starting more than this many changes in the past, or
/// falling this far behind the live channel, is closed and must re-list.
pub const WATCH_REPLAY_EVENTS: usize = 1024;

pub(super) struct WatchLog {
    tx: broadcast::Sender<WatchEvent>,
    recent: VecDeque<WatchEvent>,
    /// Highest revision whose changes are no longer (all) in `recent`.
    lost_upto: u64,
}

impl WatchLog {
    /// A log with no history: everything up to `current` counts as lost.
    pub(super) fn new(current: Revision) -> WatchLog {
        WatchLog {
            tx: broadcast::channel(WATCH_REPLAY_EVENTS).0,
            recent: VecDeque::new(),
            lost_upto: current.0,
        }
    }

    pub(super) fn publish(&mut self, events: Vec<WatchEvent>) {
        for ev in events {
            if self.recent.len() == WATCH_REPLAY_EVENTS {
                if let Some(old) = self.recent.pop_front() {
                    self.lost_upto = old.mod_revision.0;
                }
            }
            self.recent.push_back(ev.clone());
            let _ = self.tx.send(ev); // no watcher is fine
        }
    }

    /// Starts a watcher; its channel is closed at once if `from` is no longer replayable.
    pub(super) fn watch(&self, prefix: Prefix, from: Revision) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        if from.0 != 0 && from.0 <= self.lost_upto {
            return rx;
        }
        let wanted = move |ev: &WatchEvent| {
            ev.mod_revision >= from && ev.key.as_str().starts_with(prefix.as_str())
        };
        let replay: Vec<WatchEvent> = self.recent.iter().filter(|e| wanted(e)).cloned().collect();
        let mut live = self.tx.subscribe();
        tokio::spawn(async move {
            for ev in replay {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            loop {
                let got = tokio::select! {
                    _ = tx.closed() => return,
                    got = live.recv() => got,
                };
                match got {
                    Ok(ev) if wanted(&ev) => {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Lagged: changes were missed, so close rather than deliver a gap.
                    Err(_) => return,
                }
            }
        });
        rx
    }
}
