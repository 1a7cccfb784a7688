//! Accept loops for TCP and Unix sockets: connection limit, per-connection tasks, and
//! graceful shutdown.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::conn::{self, wait_true};
use crate::exports::Exports;
use crate::stats::ServerStats;

/// Most connections one listener serves at once. Hit → a new connection is closed right
/// after accept (counted in `connections_refused_total`). Each connection may hold
/// [`crate::MAX_INFLIGHT_BYTES`] of buffers in the worst case; a VM host rarely needs more
/// than a few connections per volume.
pub const MAX_CONNECTIONS: usize = 256;

/// How long shutdown waits for connections to answer their in-flight requests before
/// dropping them (spec: the server SHOULD wait for in-flight requests).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Serves NBD on a TCP listener until `shutdown` becomes true; returns once every connection
/// has ended (or [`SHUTDOWN_GRACE`] passed).
pub async fn serve_tcp(
    listener: TcpListener,
    exports: Arc<dyn Exports>,
    stats: Arc<ServerStats>,
    shutdown: watch::Receiver<bool>,
) {
    serve(Listener::Tcp(listener), exports, stats, shutdown).await
}

/// [`serve_tcp`] for a Unix-domain socket.
pub async fn serve_unix(
    listener: UnixListener,
    exports: Arc<dyn Exports>,
    stats: Arc<ServerStats>,
    shutdown: watch::Receiver<bool>,
) {
    serve(Listener::Unix(listener), exports, stats, shutdown).await
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

async fn serve(
    listener: Listener,
    exports: Arc<dyn Exports>,
    stats: Arc<ServerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = wait_true(&mut shutdown) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = accept(&listener) => a,
        };
        let Ok(conn) = accepted else {
            tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            continue;
        };
        stats.connections_total.fetch_add(1, Relaxed);
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            stats.connections_refused_total.fetch_add(1, Relaxed);
            continue; // dropping the stream closes it
        };
        let (exports, stats, shutdown) =
            (Arc::clone(&exports), Arc::clone(&stats), shutdown.clone());
        match conn {
            Accepted::Tcp(s) => {
                let (r, w) = s.into_split();
                tasks.spawn(async move {
                    conn::run(r, w, exports, stats, shutdown).await;
                    drop(slot);
                });
            }
            Accepted::Unix(s) => {
                let (r, w) = s.into_split();
                tasks.spawn(async move {
                    conn::run(r, w, exports, stats, shutdown).await;
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            // Replies are batched by the writer; Nagle would only add latency on top.
            s.set_nodelay(true)?;
            Ok(Accepted::Tcp(s))
        }
        Listener::Unix(l) => Ok(Accepted::Unix(l.accept().await?.0)),
    }
}
