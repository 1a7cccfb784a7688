//! One client connection from accept to close: handshake, then a reader (this task) and a
//! writer task joined by a reply channel, watched by the export's kill signal and the
//! server's shutdown signal.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

use crate::exports::{Exports, OpenExport};
use crate::framed::FrameReader;
use crate::handshake::{negotiate, Session};
use crate::stats::{OpenConnection, ServerStats};
use crate::transmission::{Conn, End, Reader};
use crate::writer::write_loop;

/// Longest a client may take from accept to transmission. Hit → the connection is closed
/// (counted as a handshake failure). Real clients need milliseconds; this only frees the
/// slot of a client that connected and went silent.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one connection to its end.
pub(crate) async fn run<R, W>(
    rd: R,
    mut wr: W,
    exports: Arc<dyn Exports>,
    stats: Arc<ServerStats>,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _open = OpenConnection::new(&stats);
    let mut frames = FrameReader::new(rd);
    let negotiated = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&mut frames, &mut wr, &*exports)) => r,
        _ = wait_true(&mut shutdown) => return,
    };
    let session = match negotiated {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return, // NBD_OPT_ABORT
        Ok(Err(_)) | Err(_) => {
            stats.handshake_failures_total.fetch_add(1, Relaxed);
            return;
        }
    };
    transmit(frames, wr, session, &stats, shutdown).await;
}

/// The transmission phase. Ends on DISC or EOF after every in-flight request was answered,
/// on a framing error likewise, on shutdown likewise (no new requests are read), and on the
/// kill signal at once (in-flight completions then find the channel closed and drop their
/// replies). The export's guard is dropped last, when nothing more will be written.
async fn transmit<R, W>(
    mut frames: FrameReader<R>,
    wr: W,
    session: Session,
    stats: &ServerStats,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Session {
        export,
        size,
        structured,
        block_status,
    } = session;
    let OpenExport {
        device,
        metrics,
        guard,
        mut kill,
        ..
    } = export;
    let (replies, rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        replies,
        metrics,
        structured,
    });
    let mut writer = tokio::spawn(write_loop(wr, rx));
    let reader = Reader::new(device, size, block_status);
    let mut writer_done = false;
    let killed = tokio::select! {
        _ = wait_true(&mut kill) => true,
        _ = wait_true(&mut shutdown) => false,
        // The writer only stops early when the socket failed: nobody is listening.
        _ = &mut writer => {
            writer_done = true;
            false
        }
        end = reader.run(&mut frames, conn) => {
            if let End::Protocol = end {
                stats.protocol_errors_total.fetch_add(1, Relaxed);
            }
            false
        }
    };
    // Our handle on `conn` is gone with the reader future; the writer drains the replies of
    // the requests still in flight, then closes the socket. (A finished JoinHandle must not
    // be polled again, hence `writer_done`.)
    if !killed && !writer_done {
        tokio::select! {
            _ = &mut writer => writer_done = true,
            _ = wait_true(&mut kill) => {}
        }
    }
    if !writer_done {
        stats.connections_killed_total.fetch_add(1, Relaxed);
        writer.abort();
    }
    drop(frames);
    drop(guard);
}

/// Resolves once the watched value is `true`; never if its sender is dropped before that.
pub(crate) async fn wait_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}
