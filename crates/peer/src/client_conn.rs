//! The machinery behind [`crate::RemoteReplica`]: the table of waiting requests per
//! connection, the reader, writer and watchdog tasks, and the one-way failure path.
//!
//! Failure protocol (why no request is ever stranded): `fail` sets `failed` (under the
//! `failure` mutex) *before* it drains each connection's table; `submit` checks `failed`
//! while holding that connection's table lock. So a request is either inserted before the
//! drain (and failed by it) or sees the flag (and fails at once).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bw_types::{DataBuf, Generation, IoDone, IoError, IoReply, IoRequest};
use peer_proto::consts::CONNECTION_ID;
use peer_proto::{parse_extents, parse_frame_header, parse_message, Accept, ReplyHead, Request};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::client::{ConnectOptions, PeerState, StateCallback};
use crate::framed::FrameReader;
use crate::writer::{write_loop, Outgoing};

/// The shortest watchdog tick, so tiny test timeouts do not spin.
const MIN_WATCHDOG_TICK: Duration = Duration::from_millis(10);

/// Why the remote replica stopped; every waiting and later request gets its error.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    Unreachable(String),
    Fenced { highest: Generation },
    Closed,
}

/// What a waiting request expects back.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Data(u32),
    Extents,
    Done,
    Pong,
    /// A META reply: completed with `Data(blob)` if present, `Done` if none.
    Meta,
}

struct Waiting {
    done: IoDone,
    expect: Expect,
}

/// One connection's share of the state.
struct Slot {
    /// Requests sent (or queued) and not answered, by id.
    waiting: Mutex<HashMap<u64, Waiting>>,
    /// The writer task's queue.
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Milliseconds since `Shared::epoch` of the last reply (or of the first request after
    /// an idle period): the watchdog's clock.
    progress_ms: AtomicU64,
}

/// State shared by the handle, the submitters and the tasks.
pub(crate) struct Shared {
    pub(crate) peer: SocketAddr,
    pub(crate) generation: Generation,
    pub(crate) session: u64,
    slots: Vec<Slot>,
    /// Next request id (ids start at 1; 0 is the connection-level id).
    next_id: AtomicU64,
    /// Fast check; set (under `failure`) before the tables are drained.
    failed: AtomicBool,
    failure: Mutex<Option<Failure>>,
    pub(crate) state: watch::Sender<PeerState>,
    on_state: Option<StateCallback>,
    /// Tasks to stop on failure or close.
    tasks: Mutex<Vec<AbortHandle>>,
    epoch: Instant,
}

impl Shared {
    /// Builds the state and starts a reader and a writer per connection and a watchdog.
    pub(crate) fn start(
        peer: SocketAddr,
        generation: Generation,
        _accept: Accept,
        conns: Vec<(FrameReader<OwnedReadHalf>, OwnedWriteHalf)>,
        opts: &ConnectOptions,
    ) -> Arc<Shared> {
        let mut queues = Vec::with_capacity(conns.len());
        let slots = conns
            .iter()
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                queues.push(rx);
                Slot {
                    waiting: Mutex::new(HashMap::new()),
                    tx,
                    progress_ms: AtomicU64::new(0),
                }
            })
            .collect();
        let shared = Arc::new(Shared {
            peer,
            generation,
            session: opts.session,
            slots,
            next_id: AtomicU64::new(1),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            state: watch::Sender::new(PeerState::Connected),
            on_state: opts.on_state.clone(),
            tasks: Mutex::new(Vec::new()),
            epoch: Instant::now(),
        });
        let mut tasks = Vec::new();
        for (i, ((frames, wr), rx)) in conns.into_iter().zip(queues).enumerate() {
            let s = Arc::clone(&shared);
            tasks.push(tokio::spawn(read_loop(s, i, frames)).abort_handle());
            let s = Arc::clone(&shared);
            tasks.push(
                tokio::spawn(async move {
                    if let Err(e) = write_loop(wr, rx).await {
                        s.fail(Failure::Unreachable(format!("sending failed: {e}")));
                    }
                })
                .abort_handle(),
            );
        }
        let weak = Arc::downgrade(&shared);
        let (timeout, ping) = (opts.request_timeout, opts.ping_interval);
        tasks.push(tokio::spawn(watchdog(weak, timeout, ping)).abort_handle());
        *shared.tasks.lock().unwrap() = tasks;
        shared
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The error a request gets once the replica has failed.
    fn error(&self) -> IoError {
        match self.failure.lock().unwrap().as_ref() {
            Some(Failure::Fenced { highest }) if *highest == self.generation => {
                IoError::Faulted(format!(
                    "fenced: session {} of generation {} superseded by a newer session at peer {}",
                    self.session, self.generation, self.peer
                ))
            }
            Some(Failure::Fenced { highest }) => IoError::Faulted(format!(
                "fenced: generation {} < {} at peer {}",
                self.generation, highest, self.peer
            )),
            Some(Failure::Unreachable(why)) => {
                IoError::Io(format!("peer {} unreachable: {why}", self.peer))
            }
            Some(Failure::Closed) | None => IoError::ShuttingDown,
        }
    }

    /// The replica's highest generation once the fence refused us (set before any request
    /// is failed with it).
    pub(crate) fn fenced(&self) -> Option<Generation> {
        match self.failure.lock().unwrap().as_ref() {
            Some(Failure::Fenced { highest }) => Some(*highest),
            _ => None,
        }
    }

    /// Sends a READ_META or WRITE_META (`body` = the blob); `done` gets `Data(blob)` or
    /// `Done` (no blob / written), or the error.
    pub(crate) fn send_request(&self, r: Request, body: Vec<u8>, done: IoDone) {
        if self.failed.load(SeqCst) {
            return done(Err(self.error()));
        }
        let expect = match r {
            Request::ReadMeta => Expect::Meta,
            _ => Expect::Done,
        };
        self.send(r, body.into(), Waiting { done, expect }, None);
    }

    /// Sends one request; completes `done` when its reply arrives or the replica fails.
    pub(crate) fn submit(&self, req: IoRequest, done: IoDone) {
        if self.failed.load(SeqCst) {
            return done(Err(self.error()));
        }
        let Some(r) = Request::from_io(&req) else {
            return done(Err(IoError::Invalid(
                "request exceeds the peer protocol's limit".into(),
            )));
        };
        let expect = match r {
            Request::Read { len, .. } => Expect::Data(len),
            Request::BlockStatus { .. } => Expect::Extents,
            _ => Expect::Done,
        };
        let data = match req {
            IoRequest::Write { data, .. } => data,
            _ => DataBuf::default(),
        };
        self.send(r, data, Waiting { done, expect }, None);
    }

    /// Registers `w` and queues the frame, on connection `slot` or one picked by id.
    fn send(&self, r: Request, data: DataBuf, w: Waiting, slot: Option<usize>) {
        let id = self.next_id.fetch_add(1, Relaxed);
        let i = slot.unwrap_or(id as usize % self.slots.len());
        let s = &self.slots[i];
        {
            let mut waiting = s.waiting.lock().unwrap();
            if self.failed.load(SeqCst) {
                drop(waiting);
                return (w.done)(Err(self.error()));
            }
            if waiting.is_empty() {
                // The watchdog's clock starts with the first request after idleness.
                s.progress_ms.store(self.now_ms(), Relaxed);
            }
            waiting.insert(id, w);
        }
        if s.tx
            .send(Outgoing::new(&r.header(id).to_bytes(), data, None))
            .is_err()
        {
            // The writer is gone, so a failure is on its way or done; make sure.
            self.fail(Failure::Unreachable(
                "the connection's writer stopped".into(),
            ));
        }
    }

    /// Fails the replica for good: every waiting and later request gets the failure's
    /// error, the tasks stop, and the state change is reported (once).
    pub(crate) fn fail(&self, failure: Failure) {
        let first = {
            let mut f = self.failure.lock().unwrap();
            let first = f.is_none();
            if first {
                *f = Some(failure);
                self.failed.store(true, SeqCst);
            }
            first
        };
        let error = self.error();
        for slot in &self.slots {
            let drained: Vec<Waiting> = slot
                .waiting
                .lock()
                .unwrap()
                .drain()
                .map(|(_, w)| w)
                .collect();
            for w in drained {
                (w.done)(Err(error.clone()));
            }
        }
        if !first {
            return;
        }
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        let state = match self.failure.lock().unwrap().clone() {
            Some(Failure::Unreachable(reason)) => PeerState::Unreachable { reason },
            Some(Failure::Fenced { highest }) => PeerState::Fenced { highest },
            Some(Failure::Closed) | None => PeerState::Closed,
        };
        self.state.send_replace(state.clone());
        if let Some(cb) = &self.on_state {
            cb(&state);
        }
    }

    fn take_waiting(&self, slot: usize, id: u64) -> Option<Waiting> {
        self.slots[slot].waiting.lock().unwrap().remove(&id)
    }
}

/// Reads replies of connection `slot` until it fails; then fails the whole replica.
async fn read_loop(shared: Arc<Shared>, slot: usize, mut frames: FrameReader<OwnedReadHalf>) {
    let failure = loop {
        if let Err(f) = read_one(&shared, slot, &mut frames).await {
            break f;
        }
    };
    shared.fail(failure);
}

fn unreachable(why: impl std::fmt::Display) -> Failure {
    Failure::Unreachable(why.to_string())
}

/// Reads one reply and completes its request.
async fn read_one(
    shared: &Shared,
    slot: usize,
    frames: &mut FrameReader<OwnedReadHalf>,
) -> Result<(), Failure> {
    let h = match frames.next(parse_frame_header).await {
        Ok(Some(h)) => h,
        Ok(None) => return Err(unreachable("the peer closed the connection")),
        Err(e) => return Err(unreachable(e)),
    };
    let head = ReplyHead::decode(&h).map_err(|e| unreachable(format!("protocol error: {e}")))?;
    let body = match h.body_len {
        0 => Vec::new(),
        n => frames.body(n as usize).await.map_err(unreachable)?,
    };
    shared.slots[slot]
        .progress_ms
        .store(shared.now_ms(), Relaxed);
    if h.id == CONNECTION_ID {
        return Err(match head {
            ReplyHead::Fenced { highest } => Failure::Fenced { highest },
            ReplyHead::Error { code } => unreachable(code.to_io(&parse_message(&body))),
            other => unreachable(format!("unexpected connection-level reply {other:?}")),
        });
    }
    let Some(w) = shared.take_waiting(slot, h.id) else {
        return Err(unreachable(format!("reply to unknown request id {}", h.id)));
    };
    let result = match (head, w.expect) {
        (ReplyHead::Fenced { highest }, _) => {
            // Fail the whole replica first, so this request gets the same error as the rest.
            shared.fail(Failure::Fenced { highest });
            (w.done)(Err(shared.error()));
            return Err(Failure::Fenced { highest });
        }
        (ReplyHead::Error { code }, _) => Err(code.to_io(&parse_message(&body))),
        (ReplyHead::Data { len }, Expect::Data(want)) if len == want => Ok(IoReply::Data(body)),
        (ReplyHead::Extents { .. }, Expect::Extents) => match parse_extents(&body) {
            Ok(e) => Ok(IoReply::Extents(e)),
            Err(e) => {
                (w.done)(Err(IoError::Io(format!("peer sent bad extents: {e}"))));
                return Err(unreachable(format!("protocol error: {e}")));
            }
        },
        (ReplyHead::Ok, Expect::Done) | (ReplyHead::Pong, Expect::Pong) => Ok(IoReply::Done),
        (ReplyHead::Meta { present: true, .. }, Expect::Meta) => Ok(IoReply::Data(body)),
        (ReplyHead::Meta { present: false, .. }, Expect::Meta) => Ok(IoReply::Done),
        (other, expect) => {
            let why = format!("protocol error: reply {other:?} to a request expecting {expect:?}");
            (w.done)(Err(IoError::Io(why.clone())));
            return Err(unreachable(why));
        }
    };
    (w.done)(result);
    Ok(())
}

/// Declares the peer unreachable when a connection with waiting requests has seen no reply
/// for `timeout`, and pings connections idle for `ping`.
async fn watchdog(shared: Weak<Shared>, timeout: Duration, ping: Duration) {
    let tick = (timeout.min(ping) / 4).max(MIN_WATCHDOG_TICK);
    loop {
        tokio::time::sleep(tick).await;
        let Some(s) = shared.upgrade() else { return };
        if s.failed.load(SeqCst) {
            return;
        }
        let now = s.now_ms();
        for (i, slot) in s.slots.iter().enumerate() {
            let busy = !slot.waiting.lock().unwrap().is_empty();
            let quiet = Duration::from_millis(now.saturating_sub(slot.progress_ms.load(Relaxed)));
            if busy && quiet > timeout {
                s.fail(unreachable(format!("no reply for {timeout:?}")));
                return;
            }
            if !busy && quiet > ping {
                let pong = Waiting {
                    done: Box::new(|_| {}),
                    expect: Expect::Pong,
                };
                s.send(Request::Ping, DataBuf::default(), pong, Some(i));
            }
        }
    }
}
