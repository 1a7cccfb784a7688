//! Identifiers and units of the replication core, each its own type so a region index can
//! never be passed where a replica id is expected.

use std::collections::BTreeSet;
use std::fmt;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

id_type!(
    /// One replica of the attached volume. The driver maps it to a node and a connection; the
    /// core only needs it to be stable for the attachment's lifetime and ordered (ties in the
    /// reconciliation source choice are broken by the lowest id).
    ReplicaId,
    "r"
);
id_type!(
    /// A client request (NBD handle or the device seam's request), chosen by the driver and
    /// unique among the client requests in flight.
    RequestId,
    "req"
);
id_type!(
    /// An operation the core sends to replicas (write, flush, read). Chosen by the core,
    /// never reused within one attachment, so a late reply can never be mistaken for the
    /// reply to a newer operation that reused a client's request id.
    OpId,
    "op"
);
id_type!(
    /// One connection to one replica, chosen by the driver (unique per attachment). Replies
    /// carry it; a reply from an older session is ignored, because the core already treated
    /// everything sent on that session as failed.
    SessionId,
    "s"
);
id_type!(
    /// A catalog transaction started by the core.
    TxnId,
    "txn"
);
id_type!(
    /// A region copy (resync or reconciliation) handed to the driver.
    CopyId,
    "copy"
);
id_type!(
    /// A batch of metadata changes (activity log, dirty bitmaps) handed to the driver to
    /// persist; batches are persisted strictly in order, one at a time.
    MetaBatchId,
    "meta"
);
id_type!(
    /// The payload of a write or the result of a read, held by the driver: the core never
    /// touches bytes.
    DataHandle,
    "data"
);
id_type!(
    /// Index of a region (`offset / region_size_bytes`), the unit of the activity log, the
    /// dirty bitmaps and resync.
    RegionIndex,
    "region"
);

/// A set of regions (dirty bitmap, activity log). A `BTreeSet` rather than a bit vector:
/// the sets are sparse in the common case (a few hot regions, a few dirtied ones) and the
/// core needs ordered iteration (resync walks regions in order). The driver persists them in
/// whatever format it likes.
pub type RegionSet = BTreeSet<RegionIndex>;

/// A byte range of the volume: `[offset, offset + len)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// True when the two ranges share at least one byte.
    pub fn overlaps(&self, other: &ByteRange) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }

    /// The regions the range touches, first to last (empty for an empty range).
    pub fn regions(&self, region_size_bytes: u64) -> impl Iterator<Item = RegionIndex> {
        let first = self.offset / region_size_bytes;
        let last = if self.len == 0 {
            first
        } else {
            (self.end() - 1) / region_size_bytes + 1
        };
        (first..last).map(RegionIndex)
    }

    /// True when the range touches `region`.
    pub fn touches(&self, region: RegionIndex, region_size_bytes: u64) -> bool {
        let r = ByteRange {
            offset: region.0 * region_size_bytes,
            len: region_size_bytes,
        };
        self.len > 0 && self.overlaps(&r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: region arithmetic at the edges (unaligned, exactly one region, empty).
    #[test]
    fn ranges_map_to_regions() {
        let r = |o, l| {
            ByteRange { offset: o, len: l }
                .regions(100)
                .map(|x| x.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(r(0, 100), vec![0]);
        assert_eq!(r(99, 2), vec![0, 1]);
        assert_eq!(r(100, 100), vec![1]);
        assert_eq!(r(50, 0), Vec::<u64>::new());
        assert!(ByteRange { offset: 0, len: 10 }.overlaps(&ByteRange { offset: 9, len: 1 }));
        assert!(!ByteRange { offset: 0, len: 10 }.overlaps(&ByteRange { offset: 10, len: 1 }));
        assert!(ByteRange {
            offset: 150,
            len: 10
        }
        .touches(RegionIndex(1), 100));
        assert!(!ByteRange {
            offset: 150,
            len: 10
        }
        .touches(RegionIndex(0), 100));
    }
}
