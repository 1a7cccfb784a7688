//! [`DataBuf`]: a write payload that several owners share without copying it.
//!
//! A replicated write goes to every replica at once: the local one through the store, the
//! remote ones through their peer connections, and the replication driver keeps it until the
//! client is answered. Copying a 1 MiB payload per replica cost more CPU than the socket
//! copies themselves (profile of the 2-replica benchmark, BENCHMARKS.md 2026-11-21), so
//! [`crate::IoRequest::Write`] carries a `DataBuf`: cloning it is a reference-count bump,
//! the bytes are immutable, and when the last owner drops it the buffer goes back to
//! [`crate::bufpool`] (so the NBD reader's next payload reuses the memory).

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use crate::bufpool;

/// Immutable, cheaply cloned bytes; see the module docs.
#[derive(Clone, Default)]
pub struct DataBuf(Arc<Vec<u8>>);

impl DataBuf {
    pub fn new(bytes: Vec<u8>) -> DataBuf {
        DataBuf(Arc::new(bytes))
    }
}

impl Deref for DataBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for DataBuf {
    fn from(v: Vec<u8>) -> DataBuf {
        DataBuf::new(v)
    }
}

impl PartialEq for DataBuf {
    fn eq(&self, other: &DataBuf) -> bool {
        **self == **other
    }
}

impl Eq for DataBuf {}

impl fmt::Debug for DataBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataBuf({} bytes)", self.0.len())
    }
}

impl Drop for DataBuf {
    fn drop(&mut self) {
        // The last owner recycles the buffer (an empty or small one is simply freed).
        if let Some(v) = Arc::get_mut(&mut self.0) {
            if v.capacity() >= bufpool::MIN_POOLED_LEN {
                bufpool::give(std::mem::take(v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: clones share the bytes (no copy), and the last drop recycles the buffer into
    // the pool while an earlier drop does not.
    #[test]
    fn clones_share_and_last_drop_recycles() {
        let mut v = bufpool::take(256 << 10);
        v.resize(256 << 10, 7);
        let ptr = v.as_ptr();
        let a = DataBuf::from(v);
        let b = a.clone();
        assert_eq!(b.as_ptr(), ptr, "a clone is the same memory");
        assert_eq!(a, b);
        let kept = bufpool::stats().kept;
        drop(a);
        assert_eq!(bufpool::stats().kept, kept, "still owned by b");
        drop(b);
        assert!(bufpool::stats().kept > kept, "the last owner gave it back");
    }
}
