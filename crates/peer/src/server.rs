//! The peer server's accept loop and what the embedding agent provides
//! ([`ReplicaProvider`]).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bw_types::VolumeId;
use store::Replica;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::server_conn;
use crate::stats::PeerStats;

/// Most peer connections served at once. Hit → a new connection gets a `Busy` refusal and
/// is closed. A remote attachment uses [`crate::DEFAULT_CONNECTIONS`] per volume (C3 adds
/// one per replicated volume); 256 leaves room for dozens of volumes on one node.
pub const MAX_CONNECTIONS: usize = 256;

/// How long shutdown waits for connections to answer their in-flight requests before
/// dropping them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// What the agent provides: the replicas this node holds.
pub trait ReplicaProvider: Send + Sync + 'static {
    /// The replica of `volume` on this node. Must return the *same* `Arc<Replica>` the
    /// node's local attachments use: the fence protects only what goes through it. May
    /// block (it runs on a blocking thread).
    fn open(&self, volume: &VolumeId) -> Result<Arc<Replica>, ProviderError>;
}

/// Why a provider cannot serve a volume; each becomes a handshake refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("this node holds no replica of volume {0}")]
    UnknownVolume(VolumeId),
    #[error("the replica is busy: {0}")]
    Busy(String),
    #[error("the replica cannot serve: {0}")]
    Unavailable(String),
}

/// Serves the peer protocol on `listener` until `shutdown` becomes true; returns once every
/// connection has ended (or [`SHUTDOWN_GRACE`] passed).
pub async fn serve(
    listener: TcpListener,
    replicas: Arc<dyn ReplicaProvider>,
    stats: Arc<PeerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = wait_true(&mut shutdown) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            continue;
        };
        stats.connections_total.fetch_add(1, Relaxed);
        // Replies are batched by the writer; Nagle would only add latency on top.
        let _ = stream.set_nodelay(true);
        let slot = Arc::clone(&slots).try_acquire_owned().ok();
        let (replicas, stats, shutdown) =
            (Arc::clone(&replicas), Arc::clone(&stats), shutdown.clone());
        tasks.spawn(async move {
            match slot {
                Some(_slot) => server_conn::run(stream, replicas, stats, shutdown).await,
                None => server_conn::refuse_busy(stream, &stats).await,
            }
        });
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

/// Resolves once the watched value is `true`; never if its sender is dropped before that.
pub(crate) async fn wait_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}
