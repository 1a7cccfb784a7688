//! Buffered reading of protocol frames: many small frames are parsed per `read` syscall,
//! large WRITE payloads land directly in their own (pooled) `Vec`.
//!
//! The buffer reads greedily, so a large payload that follows a header would mostly land in
//! the buffer and then be copied into its `Vec` (an extra user-space copy of the data, 20 % of
//! the agent's CPU under `nbdcopy`). After a large payload the next header is therefore read
//! on its own ([`READ_AFTER_LARGE_PAYLOAD`] bytes), so a following large payload stays in the
//! socket and is read straight into its `Vec`; any other frame switches greedy reading back
//! on. Cost: one extra small `read` per large WRITE.

use std::io;

use bw_types::bufpool;
use nbd_proto::consts::REQUEST_HEADER_LEN;
use nbd_proto::{Parsed, ProtoError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of the receive buffer. 256 KiB holds ~60 queued 4 KiB writes or ~9000 read
/// requests, so a deep queue is drained with one syscall. Must exceed the largest frame we
/// buffer whole ([`nbd_proto::consts::MAX_OPTION_DATA_LEN`] + header).
pub const READ_BUFFER_LEN: usize = 256 * 1024;

/// Payloads up to this size are gathered through the buffer (so the headers behind them
/// arrive in the same syscall); larger ones are read straight into their own allocation
/// (after the part the buffer already holds).
const BUFFERED_PAYLOAD_MAX: usize = 64 * 1024;

/// Most bytes one buffer fill reads right after a payload larger than
/// [`BUFFERED_PAYLOAD_MAX`]: one request header, so that the next payload (likely large as
/// well) is not pulled into the buffer.
const READ_AFTER_LARGE_PAYLOAD: usize = REQUEST_HEADER_LEN;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("malformed frame")]
    Proto(#[from] ProtoError),
    #[error("connection ended in the middle of a frame")]
    Truncated,
    #[error("socket read failed")]
    Io(#[from] io::Error),
}

pub(crate) struct FrameReader<R> {
    inner: R,
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The last frame was a large payload: read the next header without read-ahead.
    after_large: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: vec![0; READ_BUFFER_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
            after_large: false,
        }
    }

    /// The next frame, or `None` on a clean end of stream between frames.
    pub(crate) async fn next<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Parsed<T>,
    ) -> Result<Option<T>, FrameError> {
        loop {
            if let Some((msg, used)) = parse(&self.buf[self.start..self.end])? {
                debug_assert!(used <= self.end - self.start);
                self.start += used;
                self.after_large = false;
                return Ok(Some(msg));
            }
            let limit = if self.after_large {
                READ_AFTER_LARGE_PAYLOAD
            } else {
                READ_BUFFER_LEN
            };
            if self.fill(limit).await? == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Reads `len` bytes of payload into a `Vec` from [`bufpool`] (whoever consumes it may
    /// give it back with [`bufpool::give`]).
    pub(crate) async fn payload(&mut self, len: usize) -> Result<Vec<u8>, FrameError> {
        let mut out = bufpool::take(len);
        if len <= BUFFERED_PAYLOAD_MAX {
            while self.end - self.start < len {
                if self.fill(READ_BUFFER_LEN).await? == 0 {
                    return Err(FrameError::Truncated);
                }
            }
            out.extend_from_slice(&self.buf[self.start..self.start + len]);
            self.start += len;
            return Ok(out);
        }
        let have = len.min(self.end - self.start);
        out.extend_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        while out.len() < len {
            // `read_buf` fills the spare capacity without zeroing it first; `take` keeps the
            // read from running into the next frame.
            let want = (len - out.len()) as u64;
            if (&mut self.inner).take(want).read_buf(&mut out).await? == 0 {
                return Err(FrameError::Truncated);
            }
        }
        self.after_large = true;
        Ok(out)
    }

    /// Consumes and drops `len` bytes (the payload of a refused WRITE).
    pub(crate) async fn discard(&mut self, mut len: u64) -> Result<(), FrameError> {
        loop {
            let have = (self.end - self.start) as u64;
            let used = have.min(len);
            self.start += used as usize;
            len -= used;
            if len == 0 {
                return Ok(());
            }
            if self.fill(READ_BUFFER_LEN).await? == 0 {
                return Err(FrameError::Truncated);
            }
        }
    }

    /// Moves unconsumed bytes to the front and reads once, at most `limit` bytes, into the
    /// free space.
    async fn fill(&mut self, limit: usize) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        debug_assert!(
            self.end < self.buf.len(),
            "frame larger than the read buffer"
        );
        let stop = self.buf.len().min(self.end + limit.max(1));
        let n = self.inner.read(&mut self.buf[self.end..stop]).await?;
        self.end += n;
        Ok(n)
    }

    /// Bytes read from the socket and not consumed yet (tests).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.end - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_proto::transmission::parse_request_header;
    use nbd_proto::RequestHeader;

    fn header(cookie: u64, len: u32) -> Vec<u8> {
        RequestHeader {
            flags: 0,
            command: 1,
            cookie,
            offset: 0,
            length: len,
        }
        .to_bytes()
        .to_vec()
    }

    // Goal: frames split at every byte boundary still parse; payloads small and large come
    // out intact; a stream cut inside a frame is Truncated, cut between frames is None.
    #[tokio::test]
    async fn frames_payloads_and_truncation() {
        let big = (0..200_000u32).map(|i| i as u8).collect::<Vec<_>>();
        let mut wire = header(1, 3);
        wire.extend_from_slice(b"abc");
        wire.extend_from_slice(&header(2, big.len() as u32));
        wire.extend_from_slice(&big);
        wire.extend_from_slice(&header(3, 5));
        wire.extend_from_slice(b"xxxxx");
        let (mut tx, rx) = tokio::io::duplex(7); // tiny pipe: forces many partial reads
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&wire).await.unwrap();
        });
        let mut r = FrameReader::new(rx);
        let h = r.next(parse_request_header).await.unwrap().unwrap();
        assert_eq!(r.payload(h.length as usize).await.unwrap(), b"abc");
        let h = r.next(parse_request_header).await.unwrap().unwrap();
        assert_eq!(r.payload(h.length as usize).await.unwrap(), big);
        let h = r.next(parse_request_header).await.unwrap().unwrap();
        r.discard(h.length.into()).await.unwrap();
        writer.await.unwrap();
        assert!(r.next(parse_request_header).await.unwrap().is_none());

        let (mut tx, rx) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        tx.write_all(&header(4, 0)[..10]).await.unwrap();
        drop(tx);
        let mut r = FrameReader::new(rx);
        assert!(matches!(
            r.next(parse_request_header).await,
            Err(FrameError::Truncated)
        ));
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(31).wrapping_add(seed)) as u8)
            .collect()
    }

    // Goal: a large payload that is partly buffered (greedy read) comes out intact, and the
    // header after it is read without read-ahead, so the next large payload is read from the
    // socket straight into its Vec (nothing of it in the buffer); a small frame after that
    // brings greedy reading back.
    #[tokio::test]
    async fn large_payload_split_between_buffer_and_socket() {
        let (p1, p2) = (pattern(300_000, 1), pattern(1 << 20, 2));
        let mut wire = header(1, p1.len() as u32);
        wire.extend_from_slice(&p1);
        wire.extend_from_slice(&header(2, p2.len() as u32));
        wire.extend_from_slice(&p2);
        wire.extend_from_slice(&header(3, 4096));
        wire.extend_from_slice(&[9u8; 4096]);
        wire.extend_from_slice(&header(4, 0));
        wire.extend_from_slice(&header(5, 0));
        let (mut tx, rx) = tokio::io::duplex(4 << 20); // everything is in the pipe at once
        use tokio::io::AsyncWriteExt;
        tx.write_all(&wire).await.unwrap();
        drop(tx);
        let mut r = FrameReader::new(rx);
        let h = r.next(parse_request_header).await.unwrap().unwrap();
        assert!(
            r.buffered() > 0,
            "greedy first read holds part of the payload"
        );
        assert!(r.buffered() < p1.len(), "the rest is still in the socket");
        assert_eq!(r.payload(h.length as usize).await.unwrap(), p1);
        let h = r.next(parse_request_header).await.unwrap().unwrap();
        assert_eq!(h.cookie, 2);
        assert_eq!(r.buffered(), 0, "header after a large payload read alone");
        let got = r.payload(h.length as usize).await.unwrap();
        assert!(got == p2, "second payload intact");
        let h = r.next(parse_request_header).await.unwrap().unwrap();
        assert_eq!((h.cookie, r.buffered()), (3, 0), "still read alone");
        assert_eq!(r.payload(4096).await.unwrap(), vec![9u8; 4096]);
        let h = r.next(parse_request_header).await.unwrap().unwrap();
        assert_eq!(h.cookie, 4);
        assert_eq!(
            r.buffered(),
            REQUEST_HEADER_LEN,
            "greedy again after a small frame"
        );
        assert_eq!(
            r.next(parse_request_header).await.unwrap().unwrap().cookie,
            5
        );
        assert!(r.next(parse_request_header).await.unwrap().is_none());
    }

    // Goal: a client that dribbles the stream in small, uneven pieces (payloads split
    // mid-way, headers split across writes) still yields every frame and payload intact,
    // large and small interleaved; a stream cut inside a large payload is Truncated.
    #[tokio::test]
    async fn payloads_sent_in_small_pieces() {
        let sizes = [
            100_000usize,
            5,
            70_000,
            65_536,
            1 << 20,
            4096,
            200_000,
            65_537,
        ];
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let p = pattern(n, i as u32);
            wire.extend_from_slice(&header(i as u64, n as u32));
            wire.extend_from_slice(&p);
            want.push(p);
        }
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut pos = 0;
            let mut step = 1usize;
            while pos < wire.len() {
                step = (step * 7 + 3) % 9000 + 1; // 1..9000 bytes, uneven
                let end = (pos + step).min(wire.len());
                tx.write_all(&wire[pos..end]).await.unwrap();
                tokio::task::yield_now().await;
                pos = end;
            }
        });
        let mut r = FrameReader::new(rx);
        for (i, p) in want.iter().enumerate() {
            let h = r.next(parse_request_header).await.unwrap().unwrap();
            assert_eq!(h.cookie, i as u64);
            assert!(
                r.payload(h.length as usize).await.unwrap() == *p,
                "payload {i}"
            );
        }
        writer.await.unwrap();
        assert!(r.next(parse_request_header).await.unwrap().is_none());

        let mut wire = header(1, 500_000);
        wire.extend_from_slice(&pattern(300_000, 0));
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&wire).await.unwrap();
        });
        let mut r = FrameReader::new(rx);
        let h = r.next(parse_request_header).await.unwrap().unwrap();
        assert!(matches!(
            r.payload(h.length as usize).await,
            Err(FrameError::Truncated)
        ));
        writer.await.unwrap();
    }
}
