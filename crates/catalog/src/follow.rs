//! `follow_events`: history then live events, with no gap and no duplicate.
//!
//! The subscription is taken *before* history is read, so an event appended in between is
//! seen twice (history and live) rather than never; duplicates are dropped by `seq`. A
//! subscriber that lags behind the live channel re-reads history from its last `seq`.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};

use crate::kv::{Catalog, Result};
use crate::records::EventRecord;

/// Events read from history per catalog call while catching up.
pub const FOLLOW_BATCH: usize = 256;

/// Events buffered for a slow follower before the follow task waits for it (the catalog and
/// other followers never wait: the live channel is a broadcast).
pub const FOLLOW_BUFFER: usize = 64;

/// Streams every event with `seq > after`, oldest first, then new ones as they are appended.
/// The background task ends when the receiver is dropped, or after sending a catalog error.
/// It holds `catalog` until then, so drop the receiver on shutdown.
pub fn follow_events<C: Catalog>(
    catalog: Arc<C>,
    after: u64,
) -> mpsc::Receiver<Result<EventRecord>> {
    let (tx, rx) = mpsc::channel(FOLLOW_BUFFER);
    let live = catalog.subscribe_events();
    tokio::spawn(async move {
        // The only error worth reporting is the catalog's; a closed receiver just ends us.
        if let Err(e) = run(&*catalog, live, after, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

/// Whether to keep going after a send.
enum Flow {
    Continue,
    Stop,
}

async fn send(tx: &mpsc::Sender<Result<EventRecord>>, ev: EventRecord) -> Flow {
    match tx.send(Ok(ev)).await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Stop,
    }
}

async fn run<C: Catalog>(
    catalog: &C,
    mut live: broadcast::Receiver<EventRecord>,
    mut last: u64,
    tx: &mpsc::Sender<Result<EventRecord>>,
) -> Result<()> {
    loop {
        // Catch up from the stored history.
        loop {
            let batch = catalog.events_since(last, FOLLOW_BATCH).await?;
            if batch.is_empty() {
                break;
            }
            for ev in batch {
                last = ev.seq;
                if let Flow::Stop = send(tx, ev).await {
                    return Ok(());
                }
            }
        }
        // Then live, until we lag (or skip a seq, which only a lag can cause).
        loop {
            let got = tokio::select! {
                _ = tx.closed() => return Ok(()),
                got = live.recv() => got,
            };
            match got {
                Ok(ev) if ev.seq <= last => continue,
                Ok(ev) if ev.seq == last + 1 => {
                    last = ev.seq;
                    if let Flow::Stop = send(tx, ev).await {
                        return Ok(());
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}
