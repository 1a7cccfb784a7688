//! Transmission phase of a server connection: the reader (this task) parses each request,
//! checks its generation and session against the replica's fence and submits it to the
//! replica's `LocalVolume` with a completion that queues the reply for the writer task.
//! The replication-metadata requests (READ_META, WRITE_META) are file operations with
//! fsyncs: they pass the same check and then run on a blocking thread.
//!
//! Requests are not serialised: each is submitted as soon as it has been read, completions
//! run in any order on any thread (often inline, on a page-cache hit), and replies go out
//! in completion order. Per request: a header parse, one or two semaphore permits, one
//! boxed completion, one channel send. No task per request.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bw_types::{Generation, IoError, IoReply, VolumeId};
use peer_proto::consts::{CONNECTION_ID, FRAME_HEADER_LEN, MAX_IO_BYTES};
use peer_proto::{
    data_header, encode_error, encode_extents, encode_fenced, encode_io_error, encode_ok,
    encode_pong, meta_header, parse_frame_header, ErrorCode, Request,
};
use store::{Fenced, InFlight, ReplMetaError, Replica};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::framed::{FrameError, FrameReader};
use crate::server::{wait_true, SHUTDOWN_GRACE};
use crate::stats::PeerStats;
use crate::writer::{write_loop, Budget, Outgoing};

/// Most requests of one connection between "header read" and "reply written". Hit → the
/// reader stops reading until a reply has been written (TCP backpressure on the client).
/// 256 is twice a whole NBD connection's queue (`nbd_server::MAX_INFLIGHT_REQUESTS` = 128),
/// so a remote attachment carrying two NBD connections over one peer connection is not
/// throttled here.
pub const MAX_INFLIGHT_REQUESTS: usize = 256;

/// Most payload bytes (WRITE data received, READ data to send) of one connection in flight.
/// Hit → the reader waits as above. 128 MiB = 4 maximal requests or 32 k 4 KiB ones:
/// enough to keep a fast disk busy, bounded so a few dozen connections cannot exhaust
/// memory.
pub const MAX_INFLIGHT_BYTES: usize = 128 * 1024 * 1024;

const _: () = assert!(
    MAX_IO_BYTES as usize <= MAX_INFLIGHT_BYTES,
    "a maximal request must fit"
);

/// What the handshake established.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) replica: Arc<Replica>,
    /// The generation this connection was admitted with; every request is checked with it.
    pub(crate) generation: Generation,
    /// The session number of the hello (0 = none), checked with the generation.
    pub(crate) session: u64,
    pub(crate) volume: VolumeId,
}

impl Session {
    /// The FENCED reply's message.
    fn fenced_message(&self, fenced: &Fenced) -> String {
        let newer = if fenced.is_stale_session() {
            "a newer session of this attachment"
        } else {
            "a newer attachment"
        };
        format!(
            "{fenced}: the replica of volume {} admitted {newer}",
            self.volume
        )
    }
}

/// How the reader stopped.
enum End {
    /// Clean end of stream, or the socket failed: nothing more to read.
    Eof,
    /// Broken framing; the message goes into the connection-level error.
    Protocol(String),
    /// A request's generation was fenced; its FENCED reply is queued.
    Fenced,
    /// The server is shutting down.
    Shutdown,
}

/// What completions share with the writer; dropped by the last completion to run.
struct Conn {
    replies: mpsc::UnboundedSender<Outgoing>,
    stats: Arc<PeerStats>,
}

impl Conn {
    fn send(&self, head: &[u8], body: Vec<u8>, budget: Option<Budget>) {
        // A closed channel means the writer died with the socket: nobody to answer.
        let _ = self.replies.send(Outgoing::new(head, body, budget));
    }

    fn send_frame(&self, frame: Vec<u8>, budget: Option<Budget>) {
        self.send(&[], frame, budget);
    }
}

/// Runs the transmission phase to its end. On a protocol error or shutdown the client is
/// told why with a connection-level ERROR (id 0); on shutdown only after every in-flight
/// request was answered (within [`SHUTDOWN_GRACE`]).
pub(crate) async fn transmit(
    mut frames: FrameReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    session: Session,
    stats: &Arc<PeerStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        replies: tx,
        stats: Arc::clone(stats),
    });
    let mut writer = tokio::spawn(write_loop(wr, rx));
    let reader = Reader {
        session,
        requests: Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS)),
        bytes: Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES)),
    };
    let mut writer_done = false;
    let end = tokio::select! {
        _ = wait_true(&mut shutdown) => End::Shutdown,
        _ = &mut writer => {
            writer_done = true;
            End::Eof
        }
        end = reader.run(&mut frames, &conn) => end,
    };
    match end {
        End::Eof => {}
        End::Fenced => {
            stats.fenced_total.fetch_add(1, Relaxed);
        }
        End::Protocol(msg) => {
            stats.protocol_errors_total.fetch_add(1, Relaxed);
            let mut out = Vec::new();
            encode_error(&mut out, CONNECTION_ID, ErrorCode::Protocol, &msg);
            conn.send_frame(out, None);
        }
        End::Shutdown if !writer_done => {
            // Every budget is back once every reply has been written.
            let all = MAX_INFLIGHT_REQUESTS as u32;
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, reader.requests.acquire_many(all)).await;
            let mut out = Vec::new();
            let msg = "the peer server is shutting down";
            encode_error(&mut out, CONNECTION_ID, ErrorCode::ShuttingDown, msg);
            conn.send_frame(out, None);
        }
        End::Shutdown => {}
    }
    // The writer drains what completions still queue, then closes the socket.
    drop(conn);
    if !writer_done
        && tokio::time::timeout(SHUTDOWN_GRACE, &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
}

struct Reader {
    session: Session,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Reader {
    /// Reads and submits requests until the client disconnects, breaks framing, or is
    /// fenced.
    async fn run(&self, frames: &mut FrameReader<OwnedReadHalf>, conn: &Arc<Conn>) -> End {
        loop {
            let h = match frames.next(parse_frame_header).await {
                Ok(Some(h)) => h,
                Ok(None) => return End::Eof,
                Err(e) => return end_of(e),
            };
            let request = acquire(&self.requests, 1).await;
            let req = match Request::decode(&h) {
                Ok(req) => req,
                Err(e) => {
                    // Well framed: skip the body, answer, go on.
                    if let Err(fe) = frames.discard(h.body_len.into()).await {
                        return end_of(fe);
                    }
                    let mut out = Vec::new();
                    encode_error(&mut out, h.id, e.code(), &e.to_string());
                    conn.send_frame(out, Some(budget(request, None)));
                    continue;
                }
            };
            let bytes = match req.payload_bytes() {
                0 => None,
                n => Some(acquire(&self.bytes, n).await),
            };
            let data = match req {
                Request::Write { len, .. } | Request::WriteMeta { len } => {
                    match frames.body(len as usize).await {
                        Ok(d) => d,
                        Err(e) => return end_of(e),
                    }
                }
                _ => Vec::new(),
            };
            let budget = budget(request, bytes);
            if req == Request::Ping {
                let mut out = Vec::new();
                encode_pong(&mut out, h.id);
                conn.send_frame(out, Some(budget));
                continue;
            }
            let replica = &self.session.replica;
            let entered = match replica.enter_session(self.session.generation, self.session.session)
            {
                Ok(entered) => entered,
                Err(fenced) => {
                    let mut out = Vec::new();
                    let msg = self.session.fenced_message(&fenced);
                    encode_fenced(&mut out, h.id, fenced.highest, &msg);
                    conn.send_frame(out, Some(budget));
                    return End::Fenced;
                }
            };
            let pending = Pending {
                conn: Arc::clone(conn),
                id: h.id,
                budget,
            };
            match req {
                Request::ReadMeta | Request::WriteMeta { .. } => {
                    self.meta(req, data, entered, pending)
                }
                _ => {
                    let io = req.into_io(data).expect("a data-path request");
                    replica.submit_entered(entered, io, Box::new(move |r| pending.complete(r)));
                }
            }
        }
    }

    /// Runs READ_META or WRITE_META (already past the fence as `entered`, which stays
    /// counted in flight until it is done) on a blocking thread and queues its reply.
    fn meta(&self, req: Request, blob: Vec<u8>, entered: InFlight, pending: Pending) {
        let session = self.session.clone();
        tokio::task::spawn_blocking(move || {
            let Pending { conn, id, budget } = pending;
            conn.stats.requests_total.fetch_add(1, Relaxed);
            let replica = &session.replica;
            let mut out = Vec::new();
            if req == Request::ReadMeta {
                let read = replica.read_repl_meta();
                drop(entered);
                match read {
                    Ok(found) => {
                        let head = meta_header(id, found.as_ref().map(|b| b.len() as u32));
                        return conn.send(&head, found.unwrap_or_default(), Some(budget));
                    }
                    Err(e) => encode_error(&mut out, id, ErrorCode::Io, &chain(&e)),
                }
            } else {
                // Checks the fence again under the metadata lock.
                let written = replica.write_repl_meta(session.generation, session.session, &blob);
                drop(entered);
                match written {
                    Ok(()) => encode_ok(&mut out, id),
                    Err(ReplMetaError::Fenced { highest }) => {
                        conn.stats.fenced_total.fetch_add(1, Relaxed);
                        let f = Fenced {
                            generation: session.generation,
                            session: session.session,
                            highest,
                            floor: replica.session_floor(),
                        };
                        encode_fenced(&mut out, id, highest, &session.fenced_message(&f));
                    }
                    Err(e @ ReplMetaError::TooLarge { .. }) => {
                        encode_error(&mut out, id, ErrorCode::Invalid, &e.to_string())
                    }
                    Err(e @ ReplMetaError::Io(_)) => {
                        encode_error(&mut out, id, ErrorCode::Io, &chain(&e))
                    }
                }
            }
            conn.send_frame(out, Some(budget));
        });
    }
}

/// An error and its sources as one sentence, for an ERROR reply's message.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn end_of(e: FrameError) -> End {
    match e {
        // The client went away (mid-frame or not): nobody left to tell.
        FrameError::Io(_) | FrameError::Truncated => End::Eof,
        FrameError::Proto(e) => End::Protocol(e.to_string()),
    }
}

fn budget(request: OwnedSemaphorePermit, bytes: Option<OwnedSemaphorePermit>) -> Budget {
    Budget {
        _request: request,
        _bytes: bytes,
    }
}

/// Waits for `n` permits; the uncontended path is a single atomic operation.
async fn acquire(sem: &Arc<Semaphore>, n: u32) -> OwnedSemaphorePermit {
    match Arc::clone(sem).try_acquire_many_owned(n) {
        Ok(p) => p,
        Err(_) => Arc::clone(sem)
            .acquire_many_owned(n)
            .await
            .expect("the semaphores are never closed"),
    }
}

/// One request between submission and reply: everything its completion needs.
struct Pending {
    conn: Arc<Conn>,
    id: u64,
    budget: Budget,
}

impl Pending {
    /// Turns the replica's answer into a reply and queues it. Runs on whatever thread the
    /// volume completes on; if the connection is gone the reply is dropped.
    fn complete(self, res: Result<IoReply, IoError>) {
        let Pending { conn, id, budget } = self;
        conn.stats.requests_total.fetch_add(1, Relaxed);
        match res {
            Ok(IoReply::Data(d)) => {
                let head = data_header(id, d.len() as u32);
                conn.send(&head, d, Some(budget));
            }
            Ok(IoReply::Extents(e)) if !e.is_empty() => {
                let mut out = Vec::with_capacity(FRAME_HEADER_LEN + 16 * e.len());
                encode_extents(&mut out, id, &e);
                conn.send_frame(out, Some(budget));
            }
            Ok(IoReply::Extents(_)) => {
                let mut out = Vec::new();
                encode_error(
                    &mut out,
                    id,
                    ErrorCode::Io,
                    "the replica returned no extents",
                );
                conn.send_frame(out, Some(budget));
            }
            Ok(IoReply::Done) => {
                let mut out = Vec::with_capacity(FRAME_HEADER_LEN);
                encode_ok(&mut out, id);
                conn.send_frame(out, Some(budget));
            }
            Err(e) => {
                let mut out = Vec::new();
                encode_io_error(&mut out, id, &e);
                conn.send_frame(out, Some(budget));
            }
        }
    }
}
