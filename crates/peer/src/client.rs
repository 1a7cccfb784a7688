//! [`RemoteReplica`]: a replica on another node, used through [`bw_types::BlockDevice`], so
//! the NBD server can serve a volume whose data lives elsewhere (remote attach).
//!
//! Per connection a writer task drains a queue of request frames (batched, vectored) and a
//! reader task completes callbacks by request id; requests are pipelined (many in flight,
//! replies in any order) and spread over [`ConnectOptions::connections`] connections. A
//! watchdog declares the peer unreachable when a request goes unanswered for
//! [`ConnectOptions::request_timeout`], and pings idle connections so a dead peer is noticed
//! before the next request.
//!
//! Failure is final in C2 (C3 adds reconnect and degraded mode): on connection loss every
//! in-flight and later request fails with `IoError::Io("peer … unreachable: …")`; on
//! FENCED with `IoError::Faulted("fenced: generation G < H …")`. Writes are never retried.
//! The state change is reported through [`RemoteReplica::subscribe`] and
//! [`ConnectOptions::on_state`].
//!
//! Sessions and replication metadata (protocol v2, for the replication driver): a
//! connect with [`ConnectOptions::session`] > 0 is admitted as that session of its
//! generation, which fences the attachment's older sessions on the replica (their later
//! requests get FENCED). [`RemoteReplica::read_meta`] and [`RemoteReplica::write_meta`]
//! read and replace the replica's replication-metadata blob.
//!
//! **Telling a fenced reply apart.** Every request refused by the fence fails with
//! `IoError::Faulted("fenced: …")`, and from that moment [`RemoteReplica::fenced`] returns
//! the replica's highest generation (it is set before any request is failed; `state()`
//! becomes `Fenced { highest }` right after). `highest` greater than our generation: a
//! newer attachment exists (stop). Equal: a newer session of this attachment exists (this
//! session is dead; the newer one is unaffected).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bw_types::{BlockDevice, Generation, IoDone, IoError, IoReply, IoRequest, NodeId, VolumeId};
use peer_proto::consts::{MAX_META_BYTES, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SESSION_VERSION};
use peer_proto::{
    encode_hello, parse_server_answer, Accept, Hello, ProtoError, RefuseCode, Request, ServerAnswer,
};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::sync::watch;

use crate::client_conn::{Failure, Shared};
use crate::framed::{FrameError, FrameReader};

/// Connections per remote replica unless the caller asks otherwise. Measured with
/// `examples/remote_bench.rs` over loopback on the 2-core reference machine (three runs,
/// numbers in docs/design/peer-protocol.md): a second connection was within run-to-run
/// noise (1 MiB sequential writes 0-15 % slower, 4 KiB QD32 random writes 0-15 % faster),
/// because client, server and the kernel's TCP work already share the two cores. One is
/// simpler and costs half the tasks and buffers. Re-measure over a real link (the C2 veth
/// benchmark) before raising it; the option exists for that.
pub const DEFAULT_CONNECTIONS: usize = 1;
/// Most connections one remote replica may open (each costs two tasks and two 256 KiB
/// buffers per side). Larger requests are clamped.
pub const MAX_CONNECTIONS_PER_REPLICA: usize = 16;
/// Default limit for TCP connect plus handshake (which includes the peer's fsync of its
/// generation record).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default longest a connection may go without any reply while requests are waiting.
/// Hit → the peer is declared unreachable and everything fails. Generous, because a FLUSH
/// behind a large write-back can legitimately take seconds on a busy disk.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle time after which a connection is pinged (a dead peer is then noticed
/// within this plus the request timeout, without waiting for the next guest request).
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Told about every state change (runs on a runtime thread; keep it short).
pub type StateCallback = Arc<dyn Fn(&PeerState) + Send + Sync>;

/// How to connect.
#[derive(Clone)]
pub struct ConnectOptions {
    /// Connections to open ([`DEFAULT_CONNECTIONS`], at most
    /// [`MAX_CONNECTIONS_PER_REPLICA`]).
    pub connections: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ping_interval: Duration,
    pub on_state: Option<StateCallback>,
    /// The attachment's session number (strictly increasing per attachment; 0 = no
    /// session, the C2 behaviour). Above 0 the hello requires protocol v2 (an older peer
    /// refuses with `VersionUnsupported`) and admission fences every older session of the
    /// same generation on the replica (their requests still in flight are drained first).
    pub session: u64,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connections: DEFAULT_CONNECTIONS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            on_state: None,
            session: 0,
        }
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("connections", &self.connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("on_state", &self.on_state.is_some())
            .field("session", &self.session)
            .finish()
    }
}

/// Where a remote replica stands. Every state but `Connected` is final in C2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    Connected,
    /// The connection broke, the peer stopped answering, or it broke the protocol.
    Unreachable {
        reason: String,
    },
    /// The replica admitted a newer generation (this attachment must stop), or, if
    /// `highest` is our own generation, a newer session of this attachment.
    Fenced {
        highest: Generation,
    },
    /// [`RemoteReplica::close`] was called (or the replica was dropped).
    Closed,
}

/// Why [`RemoteReplica::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to peer {addr}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {addr} did not complete the handshake within {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("peer {addr} refused ({code:?}): {message}")]
    Refused {
        addr: SocketAddr,
        code: RefuseCode,
        /// For `StaleGeneration`: the replica's highest generation.
        highest: Generation,
        message: String,
    },
    #[error("peer {addr} broke the protocol")]
    Protocol {
        addr: SocketAddr,
        #[source]
        source: ProtoError,
    },
    #[error("peer {addr} answered inconsistently: {what}")]
    Inconsistent { addr: SocketAddr, what: String },
}

impl ConnectError {
    /// True if the replica refused because it admitted a newer generation, or (code
    /// `StaleSession`) a newer session of the same generation.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            ConnectError::Refused {
                code: RefuseCode::StaleGeneration | RefuseCode::StaleSession,
                ..
            }
        )
    }
}

/// Why [`RemoteReplica::read_meta`] or [`RemoteReplica::write_meta`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// The replica refused our generation or session: `highest` is its highest generation
    /// (equal to ours: a newer session of this attachment exists). The remote replica is
    /// now failed for good, like after a FENCED data reply.
    #[error("fenced: the replica's highest generation is {highest}")]
    Fenced { highest: Generation },
    /// Refused locally, nothing sent.
    #[error("replication metadata of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The peer negotiated a protocol version without metadata requests (connect with a
    /// session > 0 to require v2).
    #[error("the peer speaks protocol version {version}, which has no replication metadata")]
    Unsupported { version: u16 },
    /// Anything else: connection lost, no reply within the request timeout, an I/O error
    /// on the replica (for a write: the blob may or may not have been replaced; treat the
    /// replica as failed).
    #[error("replication metadata request failed: {0}")]
    Failed(IoError),
}

/// A replica on another node, served over the peer protocol. Dropping it closes it.
pub struct RemoteReplica {
    shared: Arc<Shared>,
    accept: Accept,
}

impl std::fmt::Debug for RemoteReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReplica")
            .field("peer", &self.shared.peer)
            .field("generation", &self.shared.generation)
            .field("state", &self.state())
            .finish()
    }
}

impl RemoteReplica {
    /// Connects `opts.connections` times to `addr`, each admitted with `generation`, and
    /// starts the connection tasks. Must be called within a tokio runtime.
    pub async fn connect(
        addr: SocketAddr,
        node_id: NodeId,
        volume_id: VolumeId,
        generation: Generation,
        opts: ConnectOptions,
    ) -> Result<RemoteReplica, ConnectError> {
        // A session needs a server that enforces it: refuse to fall back to v1.
        let min_version = if opts.session > 0 {
            SESSION_VERSION
        } else {
            MIN_PROTOCOL_VERSION
        };
        let hello = Hello {
            min_version,
            max_version: PROTOCOL_VERSION,
            generation,
            features: 0,
            node_id,
            volume_id,
            session: opts.session,
        };
        let mut bytes = Vec::new();
        encode_hello(&mut bytes, &hello);
        let n = opts.connections.clamp(1, MAX_CONNECTIONS_PER_REPLICA);
        let mut conns = Vec::with_capacity(n);
        let mut first: Option<Accept> = None;
        for _ in 0..n {
            let (frames, wr, accept) = handshake(addr, &bytes, opts.connect_timeout).await?;
            if let Some(a) = &first {
                if a.size_bytes != accept.size_bytes || a.version != accept.version {
                    let what = format!("connections disagree: {a:?} vs {accept:?}");
                    return Err(ConnectError::Inconsistent { addr, what });
                }
            }
            first.get_or_insert(accept);
            conns.push((frames, wr));
        }
        let accept = first.expect("at least one connection");
        let shared = Shared::start(addr, generation, accept, conns, &opts);
        debug_assert!(opts.session == 0 || accept.version >= SESSION_VERSION);
        Ok(RemoteReplica { shared, accept })
    }

    /// What the peer said when it accepted (size, highest generation, its limits).
    pub fn accept(&self) -> &Accept {
        &self.accept
    }

    pub fn peer(&self) -> SocketAddr {
        self.shared.peer
    }

    pub fn generation(&self) -> Generation {
        self.shared.generation
    }

    /// The session this remote replica was admitted with (0 = none).
    pub fn session(&self) -> u64 {
        self.shared.session
    }

    /// `Some(highest)` once a request was refused by the replica's fence (FENCED): set
    /// before any request fails with it, so a completion that sees
    /// `IoError::Faulted("fenced: …")` can rely on it. `highest` equal to our generation
    /// means a newer session of this attachment, greater means a newer attachment.
    pub fn fenced(&self) -> Option<Generation> {
        self.shared.fenced()
    }

    /// Reads the replica's replication-metadata blob; `None` if it was never written.
    /// Subject to the request timeout like any request.
    pub async fn read_meta(&self) -> Result<Option<Vec<u8>>, MetaError> {
        self.check_meta_version()?;
        match self.meta_request(Request::ReadMeta, Vec::new()).await? {
            IoReply::Data(blob) => Ok(Some(blob)),
            _ => Ok(None),
        }
    }

    /// Replaces the replica's replication-metadata blob with `bytes`; returns once the
    /// replica made it durable. Fenced like a write (by generation and session). At most
    /// [`MAX_META_BYTES`] (16 MiB).
    pub async fn write_meta(&self, bytes: Vec<u8>) -> Result<(), MetaError> {
        if bytes.len() > MAX_META_BYTES as usize {
            return Err(MetaError::TooLarge {
                len: bytes.len(),
                max: MAX_META_BYTES as usize,
            });
        }
        self.check_meta_version()?;
        let len = bytes.len() as u32;
        self.meta_request(Request::WriteMeta { len }, bytes)
            .await
            .map(|_| ())
    }

    fn check_meta_version(&self) -> Result<(), MetaError> {
        if self.accept.version < SESSION_VERSION {
            return Err(MetaError::Unsupported {
                version: self.accept.version,
            });
        }
        Ok(())
    }

    async fn meta_request(&self, r: Request, body: Vec<u8>) -> Result<IoReply, MetaError> {
        let (tx, rx) = oneshot::channel();
        let done: IoDone = Box::new(move |res| {
            let _ = tx.send(res);
        });
        self.shared.send_request(r, body, done);
        let res = rx.await.unwrap_or(Err(IoError::ShuttingDown));
        res.map_err(|e| match self.fenced() {
            Some(highest) => MetaError::Fenced { highest },
            None => MetaError::Failed(e),
        })
    }

    /// The current state.
    pub fn state(&self) -> PeerState {
        self.shared.state.borrow().clone()
    }

    /// Follows state changes (`Connected` → a final state).
    pub fn subscribe(&self) -> watch::Receiver<PeerState> {
        self.shared.state.subscribe()
    }

    /// Fails every waiting and later request with `ShuttingDown` and closes the
    /// connections. Idempotent.
    pub fn close(&self) {
        self.shared.fail(Failure::Closed);
    }
}

impl Drop for RemoteReplica {
    fn drop(&mut self) {
        self.close();
    }
}

impl BlockDevice for RemoteReplica {
    fn size_bytes(&self) -> u64 {
        self.accept.size_bytes
    }

    fn submit(&self, req: IoRequest, done: IoDone) {
        if let Some(len) = payload_len(&req) {
            if len > u64::from(self.accept.max_io_bytes) {
                let max = self.accept.max_io_bytes;
                return done(Err(IoError::Invalid(format!(
                    "request of {len} bytes exceeds the peer's limit of {max}"
                ))));
            }
        }
        self.shared.submit(req, done);
    }
}

fn payload_len(req: &IoRequest) -> Option<u64> {
    match req {
        IoRequest::Read { len, .. } => Some(u64::from(*len)),
        IoRequest::Write { data, .. } => Some(data.len() as u64),
        _ => None,
    }
}

/// TCP connect, hello, answer; all within `timeout`.
async fn handshake(
    addr: SocketAddr,
    hello: &[u8],
    timeout: Duration,
) -> Result<(FrameReader<OwnedReadHalf>, OwnedWriteHalf, Accept), ConnectError> {
    let io = |source| ConnectError::Io { addr, source };
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(io)?;
        // Requests are batched by the writer; Nagle would only add latency on top.
        stream.set_nodelay(true).map_err(io)?;
        let (rd, mut wr) = stream.into_split();
        wr.write_all(hello).await.map_err(io)?;
        let mut frames = FrameReader::new(rd);
        match frames.next(parse_server_answer).await {
            Ok(Some(ServerAnswer::Accept(a))) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&a.version) {
                    let what = format!("accepted with version {} we did not offer", a.version);
                    return Err(ConnectError::Inconsistent { addr, what });
                }
                Ok((frames, wr, a))
            }
            Ok(Some(ServerAnswer::Refuse(r))) => Err(ConnectError::Refused {
                addr,
                code: r.code,
                highest: r.highest_generation,
                message: r.message,
            }),
            Ok(None) => Err(io(std::io::ErrorKind::UnexpectedEof.into())),
            Err(FrameError::Proto(source)) => Err(ConnectError::Protocol { addr, source }),
            Err(FrameError::Truncated) => Err(io(std::io::ErrorKind::UnexpectedEof.into())),
            Err(FrameError::Io(e)) => Err(io(e)),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::Timeout {
            addr,
            after: timeout,
        })?
}
