//! Transmission phase, reader side: parse each request, check it, submit it to the device
//! with a completion that queues the reply for the writer task.
//!
//! Requests are not serialised: each is submitted as soon as it has been read, completions
//! may run in any order on any thread, and replies go out in completion order. The only
//! per-request costs are the header parse, two semaphore permits, one boxed completion and
//! one channel send.

use std::sync::Arc;
use std::time::Instant;

use bw_types::{BlockDevice, Extent, IoError, IoKind, IoMetrics, IoReply, IoRequest};
use nbd_proto::consts::*;
use nbd_proto::transmission::{self as tx, parse_request_header};
use nbd_proto::{BlockDescriptor, Command, RequestHeader};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::framed::{FrameError, FrameReader};
use crate::handshake::BASE_ALLOCATION_ID;
use crate::writer::{Budget, Outgoing};

/// Most requests of one connection between "header read" and "reply written". Hit → the
/// reader stops reading until a reply has been written (TCP backpressure on the client).
/// 128 covers every client's default queue depth (qemu 16, nbdcopy 64, fio tests ≤ 128).
pub const MAX_INFLIGHT_REQUESTS: usize = 128;

/// Most payload bytes (WRITE data received, READ data to send) of one connection in flight.
/// Hit → the reader waits as above. 256 MiB = 8 maximal requests, enough to keep a fast
/// device busy, small enough that a few hundred connections cannot exhaust memory.
pub const MAX_INFLIGHT_BYTES: usize = 256 * 1024 * 1024;

/// Longest descriptor we send: `u32::MAX` rounded down to 512 (spec: SHOULD be a multiple
/// of 512 where possible). A longer extent is cut and the reply ends there.
const MAX_DESCRIPTOR_LEN: u64 = 0xffff_fe00;

/// How the reader stopped.
#[derive(Debug)]
pub(crate) enum End {
    /// Clean end of stream, or the socket failed: nothing more to read either way.
    Eof,
    /// `NBD_CMD_DISC`.
    Disc,
    /// Framing broken (bad magic) or the stream ended inside a frame.
    Protocol,
}

/// What completions share with the writer; dropped by the last completion to run.
pub(crate) struct Conn {
    pub(crate) replies: mpsc::UnboundedSender<Outgoing>,
    pub(crate) metrics: Arc<IoMetrics>,
    pub(crate) structured: bool,
}

/// What the reader needs besides the socket.
pub(crate) struct Reader {
    pub(crate) device: Arc<dyn BlockDevice>,
    pub(crate) size: u64,
    pub(crate) block_status: bool,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Reader {
    pub(crate) fn new(device: Arc<dyn BlockDevice>, size: u64, block_status: bool) -> Reader {
        Reader {
            device,
            size,
            block_status,
            requests: Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS)),
            bytes: Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES)),
        }
    }

    /// Reads and submits requests until the client disconnects or breaks framing.
    pub(crate) async fn run<R: AsyncRead + Unpin>(
        &self,
        frames: &mut FrameReader<R>,
        conn: Arc<Conn>,
    ) -> End {
        loop {
            let h = match frames.next(parse_request_header).await {
                Ok(Some(h)) => h,
                Ok(None) | Err(FrameError::Io(_)) => return End::Eof,
                Err(FrameError::Proto(_) | FrameError::Truncated) => return End::Protocol,
            };
            let request = acquire(&self.requests, 1).await;
            let cmd = match self.check(&h, conn.structured) {
                Ok(cmd) => cmd,
                Err((errno, why)) => {
                    if let Err(e) = frames.discard(h.payload_len().into()).await {
                        return end_of(e);
                    }
                    let budget = Budget {
                        _request: request,
                        _bytes: None,
                    };
                    Pending::new(&conn, &h, Instant::now(), budget).fail(errno, why);
                    continue;
                }
            };
            if cmd == Command::Disc {
                return End::Disc;
            }
            let bytes = match cmd {
                Command::Read | Command::Write if h.length > 0 => {
                    Some(acquire(&self.bytes, h.length).await)
                }
                _ => None,
            };
            let budget = Budget {
                _request: request,
                _bytes: bytes,
            };
            let req = match self.build(frames, cmd, &h).await {
                Ok(req) => req,
                Err(e) => return end_of(e),
            };
            let pending = Pending::new(&conn, &h, Instant::now(), budget);
            match req {
                Some(req) => self
                    .device
                    .submit(req, Box::new(move |res| pending.complete(res))),
                // Zero-length READ/WRITE/TRIM/WRITE_ZEROES: nothing to do (spec: unspecified,
                // SHOULD NOT disconnect); answered as an empty success.
                None => pending.complete(Ok(if cmd == Command::Read {
                    IoReply::Data(Vec::new())
                } else {
                    IoReply::Done
                })),
            }
        }
    }

    /// Checks a request against the negotiated features and the export size; the error is
    /// the NBD errno and a message for structured error chunks.
    fn check(&self, h: &RequestHeader, structured: bool) -> Result<Command, (u32, &'static str)> {
        let cmd = Command::from_wire(h.command).ok_or((EINVAL, "unknown command"))?;
        let mut allowed = cmd.allowed_flags();
        if !structured {
            allowed &= !CMD_FLAG_DF; // SEND_DF is only advertised with structured replies
        }
        if h.flags & !allowed != 0 {
            return Err((EINVAL, "command flag not valid for this command"));
        }
        let end = h.offset.checked_add(h.length.into());
        let in_range = end.is_some_and(|end| end <= self.size);
        match cmd {
            Command::Read if h.length > MAX_PAYLOAD_LEN => {
                // With structured replies EOVERFLOW tells the client to retry smaller.
                Err((
                    if structured { EOVERFLOW } else { EINVAL },
                    "read longer than the 32 MiB maximum payload",
                ))
            }
            Command::Write if h.length > MAX_PAYLOAD_LEN => {
                Err((EINVAL, "write longer than the 32 MiB maximum payload"))
            }
            Command::Read | Command::Trim if !in_range => {
                Err((EINVAL, "request extends past the end of the export"))
            }
            Command::Write | Command::WriteZeroes if !in_range => {
                Err((ENOSPC, "write extends past the end of the export"))
            }
            Command::BlockStatus if !self.block_status => Err((
                EINVAL,
                "block status needs structured replies and base:allocation",
            )),
            Command::BlockStatus if h.length == 0 => Err((EINVAL, "block status of zero bytes")),
            Command::BlockStatus if !in_range => {
                Err((EINVAL, "request extends past the end of the export"))
            }
            Command::Cache => Err((EINVAL, "NBD_CMD_CACHE is not supported")),
            _ => Ok(cmd),
        }
    }

    /// The device request for a checked command (reading a WRITE's payload); `None` for a
    /// zero-length data command.
    async fn build<R: AsyncRead + Unpin>(
        &self,
        frames: &mut FrameReader<R>,
        cmd: Command,
        h: &RequestHeader,
    ) -> Result<Option<IoRequest>, FrameError> {
        let (offset, len, fua) = (h.offset, h.length, h.flags & CMD_FLAG_FUA != 0);
        if len == 0
            && matches!(
                cmd,
                Command::Read | Command::Write | Command::Trim | Command::WriteZeroes
            )
        {
            return Ok(None);
        }
        Ok(Some(match cmd {
            Command::Read => IoRequest::Read { offset, len },
            Command::Write => IoRequest::Write {
                offset,
                data: frames.payload(len as usize).await?.into(),
                fua,
            },
            Command::Flush => IoRequest::Flush,
            Command::Trim => IoRequest::Trim {
                offset,
                len: len.into(),
                fua,
            },
            Command::WriteZeroes => {
                let may_punch = h.flags & CMD_FLAG_NO_HOLE == 0;
                IoRequest::WriteZeroes {
                    offset,
                    len: len.into(),
                    may_punch,
                    fua,
                }
            }
            Command::BlockStatus => IoRequest::BlockStatus {
                offset,
                len: len.into(),
            },
            Command::Disc | Command::Cache => unreachable!("filtered by check"),
        }))
    }
}

fn end_of(e: FrameError) -> End {
    match e {
        FrameError::Io(_) => End::Eof,
        FrameError::Proto(_) | FrameError::Truncated => End::Protocol,
    }
}

/// Waits for `n` permits; the uncontended path is a single atomic operation.
async fn acquire(sem: &Arc<Semaphore>, n: u32) -> OwnedSemaphorePermit {
    match Arc::clone(sem).try_acquire_many_owned(n) {
        Ok(p) => p,
        // The semaphores are never closed.
        Err(_) => Arc::clone(sem)
            .acquire_many_owned(n)
            .await
            .expect("semaphore never closed"),
    }
}

/// One request between submission and reply: everything its completion needs.
struct Pending {
    conn: Arc<Conn>,
    cookie: u64,
    offset: u64,
    length: u32,
    command: u16,
    req_one: bool,
    received: Instant,
    budget: Budget,
}

impl Pending {
    fn new(conn: &Arc<Conn>, h: &RequestHeader, received: Instant, budget: Budget) -> Pending {
        Pending {
            conn: Arc::clone(conn),
            cookie: h.cookie,
            offset: h.offset,
            length: h.length,
            command: h.command,
            req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            received,
            budget,
        }
    }

    /// Turns the device's answer into a reply and queues it. Runs on the device's thread;
    /// if the connection is gone the reply is dropped (never a panic).
    fn complete(self, res: Result<IoReply, IoError>) {
        let (cookie, offset, structured) = (self.cookie, self.offset, self.conn.structured);
        match (io_kind(self.command), res) {
            (Some(IoKind::Read), Ok(IoReply::Data(d))) if d.len() == self.length as usize => {
                if d.is_empty() && structured {
                    self.send_ok(
                        &tx::chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0),
                        d,
                    )
                } else if structured {
                    // One chunk marked DONE: the data is complete, no error can follow.
                    self.send_ok(&tx::offset_data_header(cookie, offset, d.len() as u32), d)
                } else {
                    self.send_ok(&tx::simple_reply(0, cookie), d)
                }
            }
            (Some(IoKind::BlockStatus), Ok(IoReply::Extents(e))) => {
                let ds = descriptors(&e, self.length, self.req_one);
                if ds.is_empty() {
                    return self.fail(EIO, "device returned no extents");
                }
                let mut chunk = Vec::with_capacity(CHUNK_HEADER_LEN + 4 + 8 * ds.len());
                tx::encode_chunk_block_status(&mut chunk, cookie, BASE_ALLOCATION_ID, &ds);
                self.send_ok(&[], chunk)
            }
            (Some(IoKind::Read | IoKind::BlockStatus), Ok(_)) => {
                self.fail(EIO, "device returned a malformed reply")
            }
            (_, Ok(_)) => self.send_ok(&tx::simple_reply(0, cookie), Vec::new()),
            (kind, Err(e)) => self.fail(errno(&e, kind), &e.to_string()),
        }
    }

    fn send_ok(self, head: &[u8], data: Vec<u8>) {
        if let Some(kind) = io_kind(self.command) {
            let bytes = match kind {
                IoKind::Read | IoKind::Write => u64::from(self.length),
                _ => 0,
            };
            self.conn
                .metrics
                .record(kind, bytes, self.received.elapsed(), true);
        }
        let _ = self
            .conn
            .replies
            .send(Outgoing::new(head, data, Some(self.budget)));
    }

    /// Queues an error reply (a structured ERROR chunk with the message when negotiated).
    fn fail(self, errno: u32, message: &str) {
        if let Some(kind) = io_kind(self.command) {
            self.conn
                .metrics
                .record(kind, 0, self.received.elapsed(), false);
        }
        let out = if self.conn.structured {
            let mut chunk = Vec::with_capacity(32 + message.len());
            tx::encode_chunk_error(&mut chunk, self.cookie, errno, message);
            Outgoing::new(&[], chunk, Some(self.budget))
        } else {
            Outgoing::new(
                &tx::simple_reply(errno, self.cookie),
                Vec::new(),
                Some(self.budget),
            )
        };
        let _ = self.conn.replies.send(out);
    }
}

/// The metrics kind of a wire command (`None` for DISC, CACHE and unknown commands).
fn io_kind(command: u16) -> Option<IoKind> {
    Some(match Command::from_wire(command)? {
        Command::Read => IoKind::Read,
        Command::Write => IoKind::Write,
        Command::Flush => IoKind::Flush,
        Command::Trim => IoKind::Trim,
        Command::WriteZeroes => IoKind::WriteZeroes,
        Command::BlockStatus => IoKind::BlockStatus,
        Command::Disc | Command::Cache => return None,
    })
}

/// The NBD error for a device error on a request of `kind` (spec list: EPERM EIO ENOMEM
/// EINVAL ENOSPC EOVERFLOW ENOTSUP ESHUTDOWN).
pub(crate) fn errno(e: &IoError, kind: Option<IoKind>) -> u32 {
    match e {
        IoError::Io(_) | IoError::Faulted(_) => EIO,
        IoError::NoSpace => ENOSPC,
        IoError::OutOfRange | IoError::Invalid(_) => EINVAL,
        // The spec reserves ENOTSUP for fast-zero refusals and asks for EINVAL otherwise, but
        // for TRIM and WRITE_ZEROES qemu and libnbd read ENOTSUP as "fall back" (skip the
        // discard, write zeroes by hand) where EINVAL would surface as a guest I/O error.
        IoError::Unsupported if matches!(kind, Some(IoKind::Trim | IoKind::WriteZeroes)) => ENOTSUP,
        IoError::Unsupported => EINVAL,
        IoError::ShuttingDown => ESHUTDOWN,
    }
}

/// `base:allocation` descriptors for the device's extents, within the spec's rules: nonzero
/// lengths, at most one with REQ_ONE (and no longer than the request), every descriptor but
/// the last ending before the requested length, at most 2^20 of them.
fn descriptors(extents: &[Extent], requested: u32, req_one: bool) -> Vec<BlockDescriptor> {
    let mut out = Vec::with_capacity(extents.len().min(64));
    let mut covered = 0u64;
    for e in extents.iter().filter(|e| e.len > 0) {
        if covered >= u64::from(requested) || out.len() == MAX_BLOCK_STATUS_EXTENTS {
            break;
        }
        let mut len = e.len.min(MAX_DESCRIPTOR_LEN);
        if req_one {
            len = len.min(requested.into());
        }
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        out.push(BlockDescriptor {
            length: len as u32,
            flags,
        });
        covered += len;
        // After a cut extent the next one would start at the wrong offset.
        if req_one || len < e.len {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u64, hole: bool) -> Extent {
        Extent {
            len,
            hole,
            zero: hole,
        }
    }

    // Goal: descriptor lists obey REQ_ONE, the length cap, and the "N-1 below request" rule.
    #[test]
    fn descriptor_rules() {
        let e = [ext(4096, false), ext(8192, true), ext(4096, false)];
        let d = descriptors(&e, 16384, false);
        assert_eq!(d.len(), 3);
        assert_eq!(
            d[1],
            BlockDescriptor {
                length: 8192,
                flags: STATE_HOLE | STATE_ZERO
            }
        );
        assert_eq!(descriptors(&e, 4096, false).len(), 1);
        assert_eq!(descriptors(&e, 4097, false).len(), 2);
        assert_eq!(
            descriptors(&e, 16384, true),
            vec![BlockDescriptor {
                length: 4096,
                flags: 0
            }]
        );
        assert_eq!(descriptors(&[ext(10_000, true)], 512, true)[0].length, 512);
        let huge = descriptors(&[ext(1 << 40, true), ext(1, false)], u32::MAX, false);
        assert_eq!(
            huge,
            vec![BlockDescriptor {
                length: 0xffff_fe00,
                flags: 3
            }]
        );
        assert!(descriptors(&[ext(0, false)], 4096, false).is_empty());
    }

    #[test]
    fn error_mapping() {
        let w = Some(IoKind::Write);
        assert_eq!(errno(&IoError::Io("x".into()), w), EIO);
        assert_eq!(errno(&IoError::Faulted("x".into()), w), EIO);
        assert_eq!(errno(&IoError::NoSpace, w), ENOSPC);
        assert_eq!(errno(&IoError::OutOfRange, w), EINVAL);
        assert_eq!(errno(&IoError::Invalid("x".into()), w), EINVAL);
        assert_eq!(errno(&IoError::Unsupported, w), EINVAL);
        assert_eq!(
            errno(&IoError::Unsupported, Some(IoKind::WriteZeroes)),
            ENOTSUP
        );
        assert_eq!(errno(&IoError::Unsupported, Some(IoKind::Trim)), ENOTSUP);
        assert_eq!(errno(&IoError::ShuttingDown, w), ESHUTDOWN);
    }
}
