//! The storage seam ([`Backend`]) and its real implementation over a sparse file
//! ([`FileBackend`]).
//!
//! Everything above the seam (the volume's request handling, flush coalescing, fail-stop)
//! is tested against the fault-injecting and crash-simulating backends in
//! [`crate::testing`]; everything below it is a thin wrapper over one system call each.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest zero buffer written when the file system cannot zero a range itself
/// (`FALLOC_FL_ZERO_RANGE` unsupported). 1 MiB keeps the fallback's memory small while each
/// `pwrite` is still large enough to run at disk speed.
pub const ZERO_FALLBACK_CHUNK_BYTES: usize = 1 << 20;

/// Outcome of a non-blocking fast-path attempt ([`Backend::try_read_nowait`],
/// [`Backend::try_write_nowait`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPath {
    /// The whole operation was done without blocking.
    Done,
    /// It would have blocked (data not in the page cache, locks held): do it on a thread
    /// that may block. For a write, nothing or a prefix was written; rewriting it all is fine.
    WouldBlock,
    /// The backend cannot do this without blocking, now or ever: stop trying.
    Unsupported,
}

/// Byte-addressed storage under one replica of a volume (redb's `StorageBackend` is the
/// model). Implementations are used from several threads at once; overlapping concurrent
/// writes may land in any order, exactly like a disk.
// `len` is the storage's length, not a collection's: an `is_empty` would mean nothing here.
#[allow(clippy::len_without_is_empty)]
pub trait Backend: Send + Sync + 'static {
    /// Current length of the storage (may be shorter than the volume: the rest is a hole).
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; bytes past the end read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the storage if needed. Not durable until
    /// [`Backend::sync_data`] returns.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Deallocates the range; it reads as zeroes afterwards. The length is unchanged.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the range read as zeroes: deallocated unless `keep_allocated`.
    fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()>;
    /// Makes every completed write, punch and zeroing durable (`fdatasync`). After an error
    /// the state of the storage is unknown: callers must not retry and pretend it worked.
    fn sync_data(&self) -> io::Result<()>;
    /// Sets the length (grow or shrink).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Start of the first data at or after `offset`, `None` if there is none (`SEEK_DATA`).
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>>;
    /// Start of the first hole at or after `offset`; the end of the storage counts as a
    /// hole (`SEEK_HOLE`). `offset` must be below [`Backend::len`].
    fn next_hole(&self, offset: u64) -> io::Result<u64>;

    /// Tries to read without blocking (page-cache hit). The default never tries.
    fn try_read_nowait(&self, _buf: &mut [u8], _offset: u64) -> io::Result<FastPath> {
        Ok(FastPath::Unsupported)
    }
    /// Tries to write without blocking (buffered write into cached pages). The default
    /// never tries.
    fn try_write_nowait(&self, _buf: &[u8], _offset: u64) -> io::Result<FastPath> {
        Ok(FastPath::Unsupported)
    }
}

/// A real sparse file, accessed through the page cache (no `O_DIRECT`; see
/// `docs/design/storage.md` for why). Durability comes from `fdatasync`.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// Cleared the first time `preadv2(RWF_NOWAIT)` says EOPNOTSUPP, so that we do not pay a
    /// failing system call on every read afterwards. Support is per open file.
    nowait_read: AtomicBool,
    /// Same for buffered `pwritev2(RWF_NOWAIT)`; ext4 refuses it (checked on 6.18), XFS and
    /// btrfs accept it.
    nowait_write: AtomicBool,
    /// Cleared when `FALLOC_FL_ZERO_RANGE` is not supported; we then write zeroes.
    zero_range: AtomicBool,
}

impl FileBackend {
    /// Opens an existing file for reading and writing.
    pub fn open(path: &Path) -> io::Result<FileBackend> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(FileBackend::from_file(file))
    }

    /// Wraps an open file (it must be readable and writable).
    pub fn from_file(file: File) -> FileBackend {
        FileBackend {
            file,
            nowait_read: AtomicBool::new(true),
            nowait_write: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
        }
    }

    /// The underlying file, e.g. for `fstat` in tests.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (off, len) = (to_off(offset)?, to_off(len)?);
        loop {
            // SAFETY: plain system call on a file descriptor we own; no memory is passed.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_FALLBACK_CHUNK_BYTES.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: plain system call on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::lseek64(self.file.as_raw_fd(), to_off(offset)?, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let err = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after offset, or offset is past the end.
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    }
}

/// Converts to `off_t`, refusing offsets the kernel cannot represent.
fn to_off(v: u64) -> io::Result<libc::off64_t> {
    libc::off64_t::try_from(v)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset does not fit off_t"))
}

/// True for the errors a `RWF_NOWAIT` call gives when the kernel or file system does not
/// support the flag for this file at all.
fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

impl Backend for FileBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0); // past the end of a sparse file
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !keep_allocated {
            return self.punch_hole(offset, len);
        }
        if self.zero_range.load(Ordering::Relaxed) {
            // No KEEP_SIZE: a range past the end of a short sparse file extends it, which is
            // what a write of zeroes would do; blocks past i_size would be invisible waste.
            match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.zero_range.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        self.write_zeroes(offset, len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.seek(offset, libc::SEEK_DATA)
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match self.seek(offset, libc::SEEK_HOLE)? {
            Some(h) => Ok(h),
            None => Ok(offset.max(self.len()?)),
        }
    }

    fn try_read_nowait(&self, buf: &mut [u8], offset: u64) -> io::Result<FastPath> {
        if !self.nowait_read.load(Ordering::Relaxed) {
            return Ok(FastPath::Unsupported);
        }
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            let off = to_off(offset + done as u64)?;
            // SAFETY: `iov` points into `buf`, which is live and exclusively borrowed for the
            // call; the kernel writes at most `iov_len` bytes.
            let rc =
                unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
            if rc > 0 {
                done += rc as usize;
                continue;
            }
            if rc == 0 {
                rest.fill(0); // end of file: the rest is a hole
                break;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Ok(FastPath::WouldBlock),
                _ if is_unsupported(&err) => {
                    self.nowait_read.store(false, Ordering::Relaxed);
                    return Ok(FastPath::Unsupported);
                }
                _ => return Err(err),
            }
        }
        Ok(FastPath::Done)
    }

    fn try_write_nowait(&self, buf: &[u8], offset: u64) -> io::Result<FastPath> {
        if !self.nowait_write.load(Ordering::Relaxed) {
            return Ok(FastPath::Unsupported);
        }
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut _,
                iov_len: rest.len(),
            };
            let off = to_off(offset + done as u64)?;
            // SAFETY: `iov` points into `buf`, which is live for the call; the kernel only
            // reads from it for a write.
            let rc =
                unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
            if rc > 0 {
                done += rc as usize;
                continue;
            }
            let err = if rc == 0 {
                io::Error::new(io::ErrorKind::WriteZero, "pwritev2 wrote nothing")
            } else {
                io::Error::last_os_error()
            };
            match err.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Ok(FastPath::WouldBlock),
                _ if is_unsupported(&err) => {
                    self.nowait_write.store(false, Ordering::Relaxed);
                    return Ok(FastPath::Unsupported);
                }
                _ => return Err(err),
            }
        }
        Ok(FastPath::Done)
    }
}
