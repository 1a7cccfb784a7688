//! The blocking half of request execution (runs on I/O threads) and the error policy.
//!
//! Error policy (fail-stop, see `docs/design/storage.md`):
//! - a failed write, punch, zeroing or sync faults the volume: its on-disk state is no
//!   longer known, so it must be resynced, never trusted again;
//! - except ENOSPC/EDQUOT from a write or an allocating zeroing: the request failed as a
//!   whole before anything was acknowledged, and the file system is consistent, so the
//!   client gets `NoSpace` and may retry after space is freed;
//! - a failed read changes nothing on disk: it fails that request only.

use std::io;
use std::sync::Arc;

use bw_types::{bufpool, DataBuf, Extent, IoDone, IoError, IoKind, IoReply, IoRequest};

use crate::volume::{bump, Inner, VolumeErrorEvent, MAX_BLOCK_STATUS_EXTENTS};

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl Inner {
    /// Runs one request that may block and completes it.
    pub(crate) fn execute(self: &Arc<Self>, req: IoRequest, done: IoDone, on_worker: bool) {
        // A request queued before the volume faulted must not touch it afterwards.
        if let Err(e) = self.fault.check() {
            return done(Err(e));
        }
        let kind = req.kind();
        let (result, fua) = match req {
            IoRequest::Read { offset, len } => {
                let mut buf = bufpool::take_filled(len as usize);
                return done(
                    self.read_blocking(offset, &mut buf)
                        .map(|()| IoReply::Data(buf)),
                );
            }
            IoRequest::BlockStatus { offset, len } => {
                let result = self.block_status(offset, len).map_err(|e| {
                    IoError::Io(format!("block status at offset {offset} failed: {e}"))
                });
                return done(result.map(IoReply::Extents));
            }
            IoRequest::Flush => return self.wait_for_sync(done, on_worker),
            IoRequest::Write { offset, data, fua } => {
                bump(&self.counters.writes_queued);
                (self.write_blocking(offset, data), fua)
            }
            IoRequest::Trim { offset, len, fua } => {
                let r = self.backend.punch_hole(offset, len);
                (
                    r.map_err(|e| self.mutation_failed(kind, offset, len, e, false)),
                    fua,
                )
            }
            IoRequest::WriteZeroes {
                offset,
                len,
                may_punch,
                fua,
            } => {
                let r = self.backend.zero_range(offset, len, !may_punch);
                // Zeroing that keeps the allocation allocates: ENOSPC is like a write's.
                (
                    r.map_err(|e| self.mutation_failed(kind, offset, len, e, !may_punch)),
                    fua,
                )
            }
        };
        match result {
            Ok(()) => self.complete_mutation(fua, done, on_worker),
            Err(e) => done(Err(e)),
        }
    }

    /// Writes `data` at `offset` with a blocking `pwrite` (fail-stop on error, `NoSpace` for
    /// ENOSPC/EDQUOT), then drops the buffer (its last owner gives it back to [`bufpool`]).
    pub(crate) fn write_blocking(&self, offset: u64, data: DataBuf) -> Result<(), IoError> {
        let result = self.backend.write_at(&data, offset);
        let len = data.len() as u64;
        drop(data);
        result.map_err(|e| self.mutation_failed(IoKind::Write, offset, len, e, true))
    }

    pub(crate) fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.backend.read_at(buf, offset).map_err(|e| {
            let error = format!("read of {} bytes at offset {offset} failed: {e}", buf.len());
            self.report(VolumeErrorEvent::ReadFailed {
                offset,
                len: buf.len() as u64,
                error: error.clone(),
            });
            IoError::Io(error)
        })
    }

    /// Maps a failed mutation to the client's error, faulting the volume unless it is a
    /// space shortage that `space_is_soft` allows to stay soft.
    fn mutation_failed(
        &self,
        kind: IoKind,
        offset: u64,
        len: u64,
        e: io::Error,
        space_is_soft: bool,
    ) -> IoError {
        if space_is_soft && is_no_space(&e) {
            self.report(VolumeErrorEvent::NoSpace { kind, offset, len });
            return IoError::NoSpace;
        }
        let reason = format!("{kind} of {len} bytes at offset {offset} failed: {e}");
        if self.fault.set(reason.clone()) {
            self.report(VolumeErrorEvent::Faulted {
                reason: reason.clone(),
            });
        }
        IoError::Io(reason)
    }

    /// Allocation status of `[offset, offset + len)` from `SEEK_DATA`/`SEEK_HOLE`. Bytes past
    /// the end of the (sparse, possibly short) file are a hole.
    pub(crate) fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let end = offset + len;
        let file_len = self.backend.len()?;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < MAX_BLOCK_STATUS_EXTENTS {
            let (next, data) = if pos >= file_len {
                (end, false)
            } else {
                match self.backend.next_data(pos)? {
                    None => (end, false),
                    Some(d) if d > pos => (d.min(end), false),
                    Some(_) => (self.backend.next_hole(pos)?.min(end), true),
                }
            };
            // A concurrent punch or write can make the two seeks disagree; always progress.
            let next = next.max(pos + 1);
            push_extent(&mut extents, next - pos, !data);
            pos = next;
        }
        Ok(extents)
    }
}

/// Appends an extent, merging it into the last one when their status is the same.
fn push_extent(extents: &mut Vec<Extent>, len: u64, hole: bool) {
    if let Some(last) = extents.last_mut() {
        if last.hole == hole {
            last.len += len;
            return;
        }
    }
    extents.push(Extent {
        len,
        hole,
        zero: hole,
    });
}
