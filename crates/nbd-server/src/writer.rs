//! The per-connection writer task: drains every queued reply before each socket write and
//! sends them with one vectored write, so a deep queue costs one syscall per batch and read
//! data is never copied into a staging buffer.

use std::io::{self, IoSlice};

use bw_types::bufpool;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Most replies gathered into one write. Two slices each; Linux accepts 1024 (IOV_MAX).
const MAX_BATCH_REPLIES: usize = 256;
/// Stop gathering once this many bytes are queued for one write: larger writes gain nothing
/// and delay the first byte of the batch.
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Longest fixed header a reply carries before its data (an `OFFSET_DATA` chunk header).
const HEAD_MAX: usize = 32;

/// One reply, ready for the wire: a short header and an optional data buffer.
pub(crate) struct Outgoing {
    head: [u8; HEAD_MAX],
    head_len: u8,
    data: Vec<u8>,
    /// In-flight budget of the request; released once the reply has been written, so the
    /// budget also bounds replies waiting for a slow client.
    _budget: Option<Budget>,
}

/// The share of a connection's in-flight limits one request holds.
pub(crate) struct Budget {
    pub(crate) _request: OwnedSemaphorePermit,
    pub(crate) _bytes: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    /// A reply made of `head` followed by `data` (either may be empty).
    pub(crate) fn new(head: &[u8], data: Vec<u8>, budget: Option<Budget>) -> Outgoing {
        let mut h = [0u8; HEAD_MAX];
        h[..head.len()].copy_from_slice(head);
        Outgoing {
            head: h,
            head_len: head.len() as u8,
            data,
            _budget: budget,
        }
    }

    fn head(&self) -> &[u8] {
        &self.head[..usize::from(self.head_len)]
    }

    fn len(&self) -> usize {
        usize::from(self.head_len) + self.data.len()
    }
}

/// Writes replies until every sender is gone (all in-flight requests answered and the reader
/// finished), then shuts the socket's write side down.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(MAX_BATCH_REPLIES);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.len();
        batch.push(first);
        while batch.len() < MAX_BATCH_REPLIES && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        write_batch(&mut w, &batch).await?;
        // Large READ buffers go back to the pool the store takes them from.
        for o in batch.drain(..) {
            bufpool::give(o.data);
        }
    }
    w.shutdown().await
}

async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[Outgoing]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for o in batch {
        slices.push(IoSlice::new(o.head()));
        if !o.data.is_empty() {
            slices.push(IoSlice::new(&o.data));
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    // Goal: everything queued comes out in order, intact, through a pipe that accepts only
    // a few bytes per write (partial vectored writes), and the stream ends after the last.
    #[tokio::test]
    async fn drains_queue_in_order_across_partial_writes() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut want = Vec::new();
        for i in 0..600u32 {
            let data = vec![i as u8; (i % 7) as usize * 100];
            want.extend_from_slice(&i.to_be_bytes());
            want.extend_from_slice(&data);
            tx.send(Outgoing::new(&i.to_be_bytes(), data, None))
                .ok()
                .unwrap();
        }
        drop(tx);
        let (a, mut b) = tokio::io::duplex(13);
        let writer = tokio::spawn(write_loop(a, rx));
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got, want);
    }
}
