//! Following a key prefix over etcd's streaming `/v3/watch`.
//!
//! The gateway answers a watch with a chunked body of newline-delimited JSON messages
//! (`{"result": WatchResponse}`, or `{"error": …}`). The first says `created`; later ones
//! carry events in revision order. When the stream breaks (member killed, "no leader" with
//! require-leader, network), the task reconnects to any member after `WATCH_RETRY_DELAY`
//! and resumes from the revision after the last event it delivered, so the receiver sees
//! every change once, in order. It closes the channel only when the receiver is dropped or
//! the needed history was compacted away (the receiver then re-lists).
//!
//! Limit: a member that silently stops sending (a partition with no reset and no leader
//! loss on its side) keeps the stream open without events until TCP notices.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use super::store::RANGE;
use super::transport::{Retry, Transport, MAX_RESPONSE_BYTES};
use super::wire::{self, RangeResponse, StreamMessage, WatchResponse};
use crate::kv::{key_from_stored, Revision};
use crate::lease::{WatchEvent, WATCH_BUFFER};

/// Pause before reconnecting a broken watch: long enough not to spin while the cluster
/// elects a leader (~1–1.6 s), short enough that a node notices changes promptly after.
pub const WATCH_RETRY_DELAY: Duration = Duration::from_millis(500);

const WATCH: &str = "/v3/watch";

/// Why one watch stream ended.
enum End {
    /// The receiver is gone: stop.
    ReceiverGone,
    /// The history from our revision on is gone: stop (close the channel).
    Compacted,
    /// Reconnect.
    Broken,
}

/// Watches every stored key starting with `full_prefix` from revision `from` (0: from the
/// revision current when the task starts); events carry keys with `strip` bytes removed.
pub(super) fn spawn(
    transport: Arc<Transport>,
    full_prefix: Vec<u8>,
    strip: usize,
    from: i64,
) -> mpsc::Receiver<WatchEvent> {
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    tokio::spawn(run(transport, full_prefix, strip, from, tx));
    rx
}

async fn run(
    transport: Arc<Transport>,
    key: Vec<u8>,
    strip: usize,
    mut next: i64,
    tx: mpsc::Sender<WatchEvent>,
) {
    let end = wire::prefix_end(&key);
    loop {
        if next == 0 {
            // Pin "now" once, so a reconnect resumes instead of skipping what happened.
            let probe = wire::range(&key, None, 1);
            match transport
                .call::<RangeResponse>(RANGE, &probe, Retry::Always)
                .await
            {
                Ok(r) => next = r.header.revision + 1,
                Err(_) if pause(&tx).await => return,
                Err(_) => continue,
            }
        }
        match stream(&transport, &key, &end, strip, &mut next, &tx).await {
            End::ReceiverGone | End::Compacted => return,
            End::Broken if pause(&tx).await => return,
            End::Broken => {}
        }
    }
}

/// Waits `WATCH_RETRY_DELAY`; true if the receiver went away meanwhile.
async fn pause(tx: &mpsc::Sender<WatchEvent>) -> bool {
    tokio::select! {
        _ = tx.closed() => true,
        _ = tokio::time::sleep(WATCH_RETRY_DELAY) => false,
    }
}

async fn stream(
    transport: &Transport,
    key: &[u8],
    end: &[u8],
    strip: usize,
    next: &mut i64,
    tx: &mpsc::Sender<WatchEvent>,
) -> End {
    let create = wire::watch_create(key, end, *next);
    let mut body: Incoming = tokio::select! {
        _ = tx.closed() => return End::ReceiverGone,
        r = transport.open_stream(WATCH, &create) => match r {
            Ok(b) => b,
            Err(_) => return End::Broken,
        },
    };
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let frame = tokio::select! {
            _ = tx.closed() => return End::ReceiverGone,
            f = body.frame() => f,
        };
        let Some(Ok(frame)) = frame else {
            return End::Broken;
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if let Some(end) = deliver(&line, strip, next, tx).await {
                return end;
            }
        }
        if buf.len() > MAX_RESPONSE_BYTES {
            return End::Broken; // a message this large is a broken stream
        }
    }
}

/// Handles one message; `Some` when the stream must end.
async fn deliver(
    line: &[u8],
    strip: usize,
    next: &mut i64,
    tx: &mpsc::Sender<WatchEvent>,
) -> Option<End> {
    let Ok(msg) = serde_json::from_slice::<StreamMessage<WatchResponse>>(line) else {
        return Some(End::Broken);
    };
    let Some(resp) = msg.result else {
        return Some(End::Broken); // {"error": …}, e.g. "no leader"
    };
    if resp.canceled {
        return Some(if resp.compact_revision > 0 {
            End::Compacted
        } else {
            End::Broken
        });
    }
    for ev in resp.events {
        let rest = ev.kv.key.get(strip..).unwrap_or_default();
        let rev = ev.kv.mod_revision;
        let event = WatchEvent {
            key: key_from_stored(&String::from_utf8_lossy(rest)),
            value: ev.kv.value,
            mod_revision: Revision(u64::try_from(rev).unwrap_or(0)),
            deleted: ev.kind == "DELETE",
        };
        if tx.send(event).await.is_err() {
            return Some(End::ReceiverGone);
        }
        *next = rev + 1;
    }
    None
}
