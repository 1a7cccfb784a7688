//! The writer task of a connection (both sides): drains every queued frame before each
//! socket write and sends them with one vectored write, so a deep queue costs one syscall
//! per batch and data buffers are never copied into a staging buffer.

use std::io::{self, IoSlice};

use bw_types::DataBuf;
use peer_proto::consts::FRAME_HEADER_LEN;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Most frames gathered into one write. Two slices each; Linux accepts 1024 (IOV_MAX).
const MAX_BATCH_FRAMES: usize = 256;
/// Stop gathering once this many bytes are queued for one write: larger writes gain nothing
/// and delay the first byte of the batch.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// One frame, ready for the wire: a header (or nothing) and an optional body buffer.
pub(crate) struct Outgoing {
    head: [u8; FRAME_HEADER_LEN],
    head_len: u8,
    body: DataBuf,
    /// Server side: the request's share of the in-flight limits, released once the reply
    /// has been written, so the limits also bound replies waiting for a slow client.
    _budget: Option<Budget>,
}

/// The share of a connection's in-flight limits one request holds.
pub(crate) struct Budget {
    pub(crate) _request: OwnedSemaphorePermit,
    pub(crate) _bytes: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    /// A frame made of `head` followed by `body` (either may be empty).
    pub(crate) fn new(head: &[u8], body: impl Into<DataBuf>, budget: Option<Budget>) -> Outgoing {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[..head.len()].copy_from_slice(head);
        Outgoing {
            head: h,
            head_len: head.len() as u8,
            body: body.into(),
            _budget: budget,
        }
    }

    fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }

    fn len(&self) -> usize {
        usize::from(self.head_len) + self.body.len()
    }
}

/// Writes frames until every sender is gone, then shuts the socket's write side down.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(MAX_BATCH_FRAMES);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.len();
        batch.push(first);
        while batch.len() < MAX_BATCH_FRAMES && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        write_batch(&mut w, &batch).await?;
        batch.clear();
    }
    w.shutdown().await
}

async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Outgoing]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for o in batch {
        if o.head_len > 0 {
            slices.push(IoSlice::new(o.head()));
        }
        if !o.body.is_empty() {
            slices.push(IoSlice::new(&o.body));
        }
    }
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}
