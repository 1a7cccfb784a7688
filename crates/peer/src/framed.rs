//! Buffered reading of frames, shared by the server's and the client's reader tasks: many
//! small frames are parsed per `read` syscall, large bodies (WRITE data, READ replies)
//! bypass the buffer and land directly in their own `Vec`. (The same design as
//! `nbd-server`'s reader; kept separate because the two crates share no private code.)

use std::io;

use bw_types::bufpool;
use peer_proto::{Parsed, ProtoError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of the receive buffer. 256 KiB holds ~60 queued 4 KiB writes or ~7000 request
/// headers, so a deep queue is drained with one syscall. Must exceed the largest frame
/// parsed whole from the buffer (a handshake message, ≤ 8 KiB + 16).
pub const READ_BUFFER_LEN: usize = 256 * 1024;

/// Bodies up to this size are gathered through the buffer (so the headers behind them
/// arrive in the same syscall); larger ones are read straight into their own allocation.
const BUFFERED_BODY_MAX: usize = 64 * 1024;

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("connection ended in the middle of a frame")]
    Truncated,
    #[error("socket read failed: {0}")]
    Io(#[from] io::Error),
}

pub(crate) struct FrameReader<R> {
    inner: R,
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: vec![0; READ_BUFFER_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next message, or `None` on a clean end of stream between messages.
    pub(crate) async fn next<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Parsed<T>,
    ) -> Result<Option<T>, FrameError> {
        loop {
            if let Some((msg, used)) = parse(&self.buf[self.start..self.end])? {
                debug_assert!(used <= self.end - self.start);
                self.start += used;
                return Ok(Some(msg));
            }
            if self.fill().await? == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
    }

    /// Reads `len` bytes of body into a `Vec` from [`bufpool`] (a WRITE's data goes to the
    /// store as a `DataBuf`, whose last owner gives the buffer back).
    pub(crate) async fn body(&mut self, len: usize) -> Result<Vec<u8>, FrameError> {
        if len <= BUFFERED_BODY_MAX {
            while self.end - self.start < len {
                if self.fill().await? == 0 {
                    return Err(FrameError::Truncated);
                }
            }
            let out = self.buf[self.start..self.start + len].to_vec();
            self.start += len;
            return Ok(out);
        }
        let mut out = bufpool::take(len);
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
        Ok(out)
    }

    /// Consumes and drops `len` bytes (the body of a refused request).
    pub(crate) async fn discard(&mut self, mut len: u64) -> Result<(), FrameError> {
        loop {
            let have = (self.end - self.start) as u64;
            let used = have.min(len);
            self.start += used as usize;
            len -= used;
            if len == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(FrameError::Truncated);
            }
        }
    }

    /// Moves unconsumed bytes to the front and reads once into the free space.
    async fn fill(&mut self) -> io::Result<usize> {
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
        let n = self.inner.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// The socket half, e.g. to linger after a refusal.
    pub(crate) fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}
