//! A small process-wide pool of large byte buffers (data payloads of 64 KiB and more).
//!
//! Why: a fresh multi-hundred-KiB `Vec` per request is usually memory the allocator just got
//! from the kernel, so every 4 KiB page of it is faulted in and zeroed on first touch (the
//! benchmark profiles showed ~10 % of the agent's CPU in `exc_page_fault` +
//! `clear_page_erms` under bulk writes). Recycling the buffer of a finished request skips
//! both.
//!
//! Who uses it: the NBD reader and the peer server take WRITE payload buffers ([`take`]);
//! they travel as a [`crate::DataBuf`], whose last owner (the store after its `pwrite`, or
//! the last replica leg) gives them back ([`give`]); the store takes READ buffers
//! ([`take_filled`]), the NBD writer gives them back after sending the reply. Giving back is
//! an optimisation on the side: a buffer that is dropped instead is simply freed, nothing
//! leaks.
//!
//! Size classes are the powers of two from [`MIN_POOLED_LEN`] to [`MAX_POOLED_LEN`]; a
//! request is served from the smallest class that fits, a buffer returns to the largest
//! class its capacity covers. Smaller and larger buffers bypass the pool (the allocator
//! serves small ones well; huge ones are rare).
//!
//! Limits (what happens when hit): at most [`MAX_BUFFERS_PER_CLASS`] buffers per class and
//! [`MAX_POOLED_BYTES`] bytes in the whole pool; a buffer given back beyond either is
//! freed. So the pool never holds more than 32 MiB, however many volumes and connections
//! there are; that memory stays allocated after a burst (it counts towards RSS).
//!
//! Contents: a taken buffer may hold the bytes of an earlier request (of any volume). [`take`]
//! returns it empty (length 0: the caller fills the spare capacity); [`take_filled`] returns
//! it with the requested length and arbitrary contents, so its caller must overwrite every
//! byte before anyone else sees it (the store's read paths fill the whole buffer or fail).
//!
//! Thread-safety: one mutex per class, held for a push or pop; the byte total is an atomic.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

/// Smallest pooled buffer (64 KiB). Below it the allocator's own free lists are as good.
pub const MIN_POOLED_LEN: usize = 64 << 10;
/// Largest pooled buffer (4 MiB). Larger requests are allocated and freed as usual.
pub const MAX_POOLED_LEN: usize = 4 << 20;
/// Most idle buffers kept per size class; one more given back is freed.
pub const MAX_BUFFERS_PER_CLASS: usize = 64;
/// Most bytes (by capacity) kept idle in the whole pool; a buffer that would exceed it is
/// freed.
pub const MAX_POOLED_BYTES: usize = 32 << 20;

const CLASSES: usize =
    (MAX_POOLED_LEN.trailing_zeros() - MIN_POOLED_LEN.trailing_zeros()) as usize + 1;

/// Counters of one pool (for tests and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Takes served by a recycled buffer.
    pub hits: u64,
    /// Takes of a poolable size that had to allocate.
    pub misses: u64,
    /// Buffers accepted back.
    pub kept: u64,
    /// Poolable buffers given back and freed because a limit was hit.
    pub dropped: u64,
    /// Bytes (capacity) idle in the pool now.
    pub pooled_bytes: usize,
}

/// A buffer pool with explicit limits. The process-wide one is used through [`take`],
/// [`take_filled`] and [`give`]; separate instances exist for tests.
pub struct BufPool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
    max_per_class: usize,
    max_bytes: usize,
    pooled_bytes: AtomicUsize,
    hits: AtomicU64,
    misses: AtomicU64,
    kept: AtomicU64,
    dropped: AtomicU64,
}

static GLOBAL: BufPool = BufPool::new(MAX_BUFFERS_PER_CLASS, MAX_POOLED_BYTES);

/// An empty buffer with capacity for at least `len` bytes, from the process-wide pool.
pub fn take(len: usize) -> Vec<u8> {
    GLOBAL.take(len)
}

/// A buffer of exactly `len` bytes with arbitrary contents (zeroes or an earlier request's
/// bytes): the caller must overwrite all of it.
pub fn take_filled(len: usize) -> Vec<u8> {
    GLOBAL.take_filled(len)
}

/// Gives a buffer back to the process-wide pool (or frees it, see the limits).
pub fn give(buf: Vec<u8>) {
    GLOBAL.give(buf)
}

/// Counters of the process-wide pool.
pub fn stats() -> PoolStats {
    GLOBAL.stats()
}

/// Index of the smallest class holding `len` bytes, `None` if `len` is not pooled.
fn class_for_take(len: usize) -> Option<usize> {
    if !(MIN_POOLED_LEN..=MAX_POOLED_LEN).contains(&len) {
        return None;
    }
    let size = len.next_power_of_two();
    Some((size.trailing_zeros() - MIN_POOLED_LEN.trailing_zeros()) as usize)
}

/// Index of the largest class a buffer of capacity `cap` can serve.
fn class_for_give(cap: usize) -> Option<usize> {
    if cap < MIN_POOLED_LEN {
        return None;
    }
    let floor = 1usize << (usize::BITS - 1 - cap.leading_zeros());
    let class = (floor.trailing_zeros() - MIN_POOLED_LEN.trailing_zeros()) as usize;
    (class < CLASSES).then_some(class)
}

impl BufPool {
    /// An empty pool keeping at most `max_per_class` buffers per class and `max_bytes` in all.
    pub const fn new(max_per_class: usize, max_bytes: usize) -> BufPool {
        BufPool {
            classes: [const { Mutex::new(Vec::new()) }; CLASSES],
            max_per_class,
            max_bytes,
            pooled_bytes: AtomicUsize::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// An empty buffer with capacity for at least `len` bytes.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.take_raw(len);
        buf.clear();
        buf
    }

    /// A buffer of exactly `len` bytes with arbitrary contents.
    pub fn take_filled(&self, len: usize) -> Vec<u8> {
        let mut buf = self.take_raw(len);
        // A recycled buffer keeps the bytes of its last use initialised: cutting it to `len`
        // costs nothing; only a tail it never held is zeroed.
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.resize(len, 0);
        }
        buf
    }

    /// A recycled buffer as it was given back, or a new empty one, with capacity >= `len`.
    fn take_raw(&self, len: usize) -> Vec<u8> {
        let Some(class) = class_for_take(len) else {
            return Vec::with_capacity(len);
        };
        let popped = self.classes[class].lock().unwrap().pop();
        match popped {
            Some(buf) => {
                self.pooled_bytes.fetch_sub(buf.capacity(), Relaxed);
                self.hits.fetch_add(1, Relaxed);
                buf
            }
            None => {
                self.misses.fetch_add(1, Relaxed);
                // Allocate the whole class, so the buffer serves any request of it later.
                Vec::with_capacity(MIN_POOLED_LEN << class)
            }
        }
    }

    /// Keeps `buf` for a later take, or frees it when it is not poolable or a limit is hit.
    pub fn give(&self, buf: Vec<u8>) {
        let Some(class) = class_for_give(buf.capacity()) else {
            return;
        };
        let cap = buf.capacity();
        if self.pooled_bytes.fetch_add(cap, Relaxed) + cap > self.max_bytes {
            self.pooled_bytes.fetch_sub(cap, Relaxed);
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        let mut list = self.classes[class].lock().unwrap();
        if list.len() >= self.max_per_class {
            drop(list);
            self.pooled_bytes.fetch_sub(cap, Relaxed);
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        list.push(buf);
        self.kept.fetch_add(1, Relaxed);
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            kept: self.kept.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            pooled_bytes: self.pooled_bytes.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(CLASSES, 7);
        assert_eq!(class_for_take(MIN_POOLED_LEN - 1), None);
        assert_eq!(class_for_take(MIN_POOLED_LEN), Some(0));
        assert_eq!(class_for_take(MIN_POOLED_LEN + 1), Some(1));
        assert_eq!(class_for_take(1 << 20), Some(4));
        assert_eq!(class_for_take(MAX_POOLED_LEN), Some(CLASSES - 1));
        assert_eq!(class_for_take(MAX_POOLED_LEN + 1), None);
        assert_eq!(class_for_give(MIN_POOLED_LEN - 1), None);
        assert_eq!(class_for_give(MIN_POOLED_LEN), Some(0));
        assert_eq!(class_for_give(300 << 10), Some(2)); // serves 256 KiB requests
        assert_eq!(class_for_give(MAX_POOLED_LEN), Some(CLASSES - 1));
        assert_eq!(class_for_give(2 * MAX_POOLED_LEN), None);
    }

    // Goal: buffers are recycled (same allocation comes back), sized for their class, and
    // take_filled returns exactly the requested length.
    #[test]
    fn recycles_by_class() {
        let pool = BufPool::new(4, 64 << 20);
        let mut a = pool.take(200 << 10);
        assert!(a.is_empty());
        assert_eq!(a.capacity(), 256 << 10);
        a.resize(200 << 10, 7);
        let ptr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.stats().pooled_bytes, 256 << 10);
        let b = pool.take_filled(256 << 10);
        assert_eq!((b.as_ptr(), b.len()), (ptr, 256 << 10));
        assert_eq!(&b[..4], &[7; 4]);
        assert_eq!(pool.stats().pooled_bytes, 0);
        pool.give(b);
        let c = pool.take(100 << 10); // another class: a miss
        assert_ne!(c.as_ptr(), ptr);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses, s.kept), (1, 2, 2));
        // Small and huge buffers are not pooled.
        pool.give(vec![0; 1000]);
        pool.give(Vec::with_capacity(MAX_POOLED_LEN * 2));
        assert_eq!(pool.stats().kept, 2);
    }

    // Goal: the per-class count and total byte limits hold however much is given back.
    #[test]
    fn bounded() {
        let pool = BufPool::new(3, 1 << 20);
        for _ in 0..10 {
            pool.give(Vec::with_capacity(64 << 10));
        }
        let s = pool.stats();
        assert_eq!((s.kept, s.dropped, s.pooled_bytes), (3, 7, 3 * (64 << 10)));
        for _ in 0..10 {
            pool.give(Vec::with_capacity(256 << 10));
        }
        // 192 KiB + 3 × 256 KiB = 960 KiB <= 1 MiB; a fourth would exceed both limits.
        let s = pool.stats();
        assert_eq!(
            (s.kept, s.pooled_bytes),
            (6, 3 * (64 << 10) + 3 * (256 << 10))
        );
        assert!(s.pooled_bytes <= 1 << 20);
        pool.give(Vec::with_capacity(1 << 20)); // would exceed the byte limit
        assert_eq!(pool.stats().pooled_bytes, 960 << 10);
        // Concurrent gives never overshoot either limit.
        let pool = std::sync::Arc::new(BufPool::new(64, 2 << 20));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let b = pool.take(64 << 10);
                        if i % 3 == 0 {
                            pool.give(Vec::with_capacity(128 << 10));
                        }
                        pool.give(b);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(pool.stats().pooled_bytes <= 2 << 20);
    }
}
