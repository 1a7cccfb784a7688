//! One peer connection from accept to close: the handshake (hello → open the replica →
//! admit the generation and session → accept or refuse), then the transmission phase
//! (`server_tx`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bw_types::Generation;
use peer_proto::consts::{
    KNOWN_FEATURES, MAX_IO_BYTES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SESSION_VERSION,
};
use peer_proto::{
    choose_version, encode_accept, encode_refuse, parse_hello, Accept, Hello, Refuse, RefuseCode,
};
use store::AdmitError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::framed::{FrameError, FrameReader};
use crate::server::{wait_true, ProviderError, ReplicaProvider, MAX_CONNECTIONS};
use crate::server_tx::{transmit, Session, MAX_INFLIGHT_BYTES, MAX_INFLIGHT_REQUESTS};
use crate::stats::{OpenConnection, PeerStats};

/// Longest a client may take from accept to a complete hello, including opening the
/// replica and admitting its generation. Hit → refused with `BadRequest` and closed. A
/// healthy client needs a round trip plus an fsync; this only frees the slot of a client
/// that connected and went silent.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// After a refusal, how long (and how many bytes) we keep reading what the client still
/// sends before closing, so the kernel does not answer unread data with a reset that could
/// destroy the refusal before the client read it.
const REFUSE_LINGER: Duration = Duration::from_secs(1);
const REFUSE_LINGER_BYTES: usize = 1 << 20;

/// Serves one connection to its end.
pub(crate) async fn run(
    stream: TcpStream,
    replicas: Arc<dyn ReplicaProvider>,
    stats: Arc<PeerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _open = OpenConnection::new(&stats);
    let (rd, mut wr) = stream.into_split();
    let mut frames = FrameReader::new(rd);
    let outcome = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut frames, replicas, &stats)) => {
            r.unwrap_or_else(|_| Err(refusal(
                RefuseCode::BadRequest,
                Generation(0),
                format!("the handshake did not complete within {HANDSHAKE_TIMEOUT:?}"),
            )))
        }
        _ = wait_true(&mut shutdown) => Err(refusal(
            RefuseCode::Busy,
            Generation(0),
            "the peer server is shutting down".into(),
        )),
    };
    let (session, accept) = match outcome {
        Ok(ok) => ok,
        Err(refuse) => {
            stats.handshakes_refused_total.fetch_add(1, Relaxed);
            let mut out = Vec::new();
            encode_refuse(&mut out, &refuse);
            return send_and_linger(frames.get_mut(), wr, &out).await;
        }
    };
    let mut out = Vec::new();
    encode_accept(&mut out, &accept);
    if wr.write_all(&out).await.is_err() {
        return;
    }
    transmit(frames, wr, session, &stats, shutdown).await;
}

/// Refuses a connection over the connection limit.
pub(crate) async fn refuse_busy(stream: TcpStream, stats: &PeerStats) {
    stats.handshakes_refused_total.fetch_add(1, Relaxed);
    let (mut rd, wr) = stream.into_split();
    let mut out = Vec::new();
    let msg = format!("the peer server already serves {MAX_CONNECTIONS} connections");
    encode_refuse(&mut out, &refusal(RefuseCode::Busy, Generation(0), msg));
    send_and_linger(&mut rd, wr, &out).await;
}

async fn send_and_linger(rd: &mut OwnedReadHalf, mut wr: OwnedWriteHalf, bytes: &[u8]) {
    let _ = wr.write_all(bytes).await;
    let _ = wr.shutdown().await;
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut total = 0;
        while total < REFUSE_LINGER_BYTES {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

fn refusal(code: RefuseCode, highest: Generation, message: String) -> Refuse {
    Refuse {
        code,
        server_min_version: MIN_PROTOCOL_VERSION,
        server_max_version: PROTOCOL_VERSION,
        highest_generation: highest,
        message,
    }
}

/// Reads the hello, opens the replica and admits the generation and session.
async fn handshake(
    frames: &mut FrameReader<OwnedReadHalf>,
    replicas: Arc<dyn ReplicaProvider>,
    stats: &PeerStats,
) -> Result<(Session, Accept), Refuse> {
    let bad = |m: String| refusal(RefuseCode::BadRequest, Generation(0), m);
    let hello = match frames.next(parse_hello).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err(bad("connection closed before a hello".into())),
        Err(FrameError::Proto(e)) => return Err(bad(format!("bad hello: {e}"))),
        Err(e) => return Err(bad(format!("bad hello: {e}"))),
    };
    let Some(version) = choose_version(hello.min_version, hello.max_version) else {
        let msg = format!(
            "the client speaks protocol versions {}..={}, this server {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
            hello.min_version, hello.max_version
        );
        return Err(refusal(RefuseCode::VersionUnsupported, Generation(0), msg));
    };
    let replica = open_replica(&hello, replicas).await?;
    let (r, generation, session) = (Arc::clone(&replica), hello.generation, hello.session);
    // Blocking: may fsync the generation record and drain older generations or sessions.
    let admitted =
        match tokio::task::spawn_blocking(move || r.admit_session(generation, session)).await {
            Ok(a) => a,
            Err(e) => {
                let msg = format!("admitting generation {generation} failed: {e}");
                return Err(refusal(RefuseCode::Unavailable, Generation(0), msg));
            }
        };
    match admitted {
        Ok(_) => {}
        Err(AdmitError::Fenced(f)) if f.is_stale_session() => {
            stats.stale_generation_total.fetch_add(1, Relaxed);
            let msg = format!(
                "{f}: the replica of volume {} admitted a newer session of this attachment",
                hello.volume_id
            );
            // Code 7 exists from v2 on; a v1 client only knows "fenced".
            let code = if version >= SESSION_VERSION {
                RefuseCode::StaleSession
            } else {
                RefuseCode::StaleGeneration
            };
            return Err(refusal(code, f.highest, msg));
        }
        Err(AdmitError::Fenced(f)) => {
            stats.stale_generation_total.fetch_add(1, Relaxed);
            let msg = format!(
                "{f}: the replica of volume {} admitted a newer attachment",
                hello.volume_id
            );
            return Err(refusal(RefuseCode::StaleGeneration, f.highest, msg));
        }
        Err(e) => {
            let msg = format!("cannot admit generation {generation}: {e}");
            return Err(refusal(RefuseCode::Unavailable, Generation(0), msg));
        }
    }
    let accept = Accept {
        version,
        size_bytes: bw_types::BlockDevice::size_bytes(replica.volume()),
        highest_generation: replica.highest(),
        features: hello.features & KNOWN_FEATURES,
        max_io_bytes: MAX_IO_BYTES,
        max_inflight_requests: MAX_INFLIGHT_REQUESTS as u32,
        max_inflight_bytes: MAX_INFLIGHT_BYTES as u32,
    };
    let session = Session {
        replica,
        generation,
        session,
        volume: hello.volume_id,
    };
    Ok((session, accept))
}

/// Asks the provider for the replica (on a blocking thread: it may open files).
async fn open_replica(
    hello: &Hello,
    replicas: Arc<dyn ReplicaProvider>,
) -> Result<Arc<store::Replica>, Refuse> {
    let volume = hello.volume_id.clone();
    let opened = tokio::task::spawn_blocking(move || replicas.open(&volume))
        .await
        .unwrap_or_else(|e| Err(ProviderError::Unavailable(e.to_string())));
    opened.map_err(|e| {
        let code = match &e {
            ProviderError::UnknownVolume(_) => RefuseCode::UnknownVolume,
            ProviderError::Busy(_) => RefuseCode::Busy,
            ProviderError::Unavailable(_) => RefuseCode::Unavailable,
        };
        refusal(code, Generation(0), e.to_string())
    })
}
