//! [`FaultyBackend`]: wraps another backend and fails chosen operations on command.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::Backend;

/// Families of backend operations a fault can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// `read_at` (and the read fast path).
    Read,
    /// `write_at` (and the write fast path).
    Write,
    /// `punch_hole` and `zero_range`.
    Deallocate,
    /// `sync_data`.
    Sync,
}

impl FaultOp {
    const ALL: [FaultOp; 4] = [
        FaultOp::Read,
        FaultOp::Write,
        FaultOp::Deallocate,
        FaultOp::Sync,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// When and how one operation family fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    /// Calls that still succeed before the fault fires.
    pub after: u64,
    /// The `errno` returned (e.g. `libc::EIO`, `libc::ENOSPC`).
    pub errno: i32,
    /// Keep failing every later call (a dead disk) instead of failing once.
    pub sticky: bool,
}

/// A backend that passes calls to `inner` and fails them according to per-operation
/// [`FaultRule`]s. It also counts calls, so tests can check that, say, a failed sync was
/// never retried.
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    rules: Mutex<[Option<FaultRule>; 4]>,
    calls: [AtomicU64; 4],
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>) -> FaultyBackend {
        FaultyBackend {
            inner,
            rules: Mutex::new([None; 4]),
            calls: Default::default(),
        }
    }

    /// Arms (or replaces) the fault for `op`.
    pub fn set_fault(&self, op: FaultOp, rule: FaultRule) {
        self.rules.lock().unwrap()[op.index()] = Some(rule);
    }

    /// Fails every later call of `op` with `errno`, starting now.
    pub fn fail_now(&self, op: FaultOp, errno: i32) {
        self.set_fault(
            op,
            FaultRule {
                after: 0,
                errno,
                sticky: true,
            },
        );
    }

    /// Disarms every fault.
    pub fn clear_faults(&self) {
        *self.rules.lock().unwrap() = [None; 4];
    }

    /// How many calls of `op` reached this backend (failed ones included).
    pub fn calls(&self, op: FaultOp) -> u64 {
        self.calls[op.index()].load(Ordering::SeqCst)
    }

    /// Counts the call and returns the injected error if the rule for `op` fires.
    fn check(&self, op: FaultOp) -> io::Result<()> {
        self.calls[op.index()].fetch_add(1, Ordering::SeqCst);
        let mut rules = self.rules.lock().unwrap();
        let Some(rule) = rules[op.index()].as_mut() else {
            return Ok(());
        };
        if rule.after > 0 {
            rule.after -= 1;
            return Ok(());
        }
        let errno = rule.errno;
        if !rule.sticky {
            rules[op.index()] = None;
        }
        Err(io::Error::from_raw_os_error(errno))
    }
}

impl std::fmt::Debug for FaultyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let calls: Vec<u64> = FaultOp::ALL.iter().map(|op| self.calls(*op)).collect();
        f.debug_struct("FaultyBackend")
            .field("calls", &calls)
            .finish_non_exhaustive()
    }
}

impl Backend for FaultyBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(FaultOp::Read)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(FaultOp::Write)?;
        self.inner.write_at(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(FaultOp::Deallocate)?;
        self.inner.punch_hole(offset, len)
    }
    fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) -> io::Result<()> {
        self.check(FaultOp::Deallocate)?;
        self.inner.zero_range(offset, len, keep_allocated)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check(FaultOp::Sync)?;
        self.inner.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.next_hole(offset)
    }
    // The fast paths are left at their defaults (`Unsupported`) so that every read and write
    // goes through `check`: fault injection must not depend on the page cache.
}
