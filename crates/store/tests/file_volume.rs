//! Every request kind against a real sparse file on the test machine's file system.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bw_types::{BlockDevice, Extent, IoError, IoReply, IoRequest};
use common::{flush, read, run, write};
use store::testing::TempDir;
use store::{
    create_volume_file, Backend, FileBackend, LocalVolume, VolumeOptions, MAX_BLOCK_STATUS_EXTENTS,
};

const MIB: u64 = 1 << 20;

fn open(dir: &TempDir, size: u64) -> (LocalVolume, std::path::PathBuf) {
    let path = create_volume_file(dir.path(), "v.img", size).unwrap();
    (
        LocalVolume::open(&path, size, VolumeOptions::default()).unwrap(),
        path,
    )
}

fn blocks(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks()
}

fn status(dev: &dyn BlockDevice, offset: u64, len: u64) -> Vec<Extent> {
    match run(dev, IoRequest::BlockStatus { offset, len }) {
        Ok(IoReply::Extents(e)) => e,
        other => panic!("block status failed: {other:?}"),
    }
}

const HOLE: fn(u64) -> Extent = |len| Extent {
    len,
    hole: true,
    zero: true,
};
const DATA: fn(u64) -> Extent = |len| Extent {
    len,
    hole: false,
    zero: false,
};

/// Writes read back (inline from the page cache), FUA and flush succeed, unwritten space
/// reads as zeroes.
#[test]
fn write_read_flush_fua() {
    let dir = TempDir::new("rw").unwrap();
    let (vol, _) = open(&dir, 8 * MIB);
    write(&vol, 4096, vec![7u8; 8192]);
    common::assert_filled(&read(&vol, 4096, 8192), 7, 8192);
    common::assert_filled(&read(&vol, 0, 4096), 0, 4096);
    let fua = IoRequest::Write {
        offset: MIB,
        data: vec![9u8; 512].into(),
        fua: true,
    };
    assert_eq!(run(&vol, fua), Ok(IoReply::Done));
    assert_eq!(flush(&vol), Ok(IoReply::Done));
    common::assert_filled(&read(&vol, MIB, 512), 9, 512);
    let stats = vol.stats();
    assert!(
        stats.reads_inline >= 2,
        "cached reads are served inline: {stats:?}"
    );
    assert!(stats.syncs >= 2, "{stats:?}");
}

/// Requests outside the volume are refused; the size grows but never shrinks.
#[test]
fn range_checks_and_resize() {
    let dir = TempDir::new("range").unwrap();
    let (vol, _) = open(&dir, MIB);
    let past = IoRequest::Write {
        offset: MIB - 1,
        data: vec![1, 2].into(),
        fua: false,
    };
    assert_eq!(run(&vol, past), Err(IoError::OutOfRange));
    assert_eq!(
        run(
            &vol,
            IoRequest::Read {
                offset: u64::MAX,
                len: 1
            }
        ),
        Err(IoError::OutOfRange)
    );
    let huge = IoRequest::Read {
        offset: 0,
        len: u32::MAX,
    };
    assert!(matches!(run(&vol, huge), Err(IoError::Invalid(_))));
    assert!(vol.set_size(MIB / 2).is_err());
    vol.set_size(2 * MIB).unwrap();
    assert_eq!(vol.size_bytes(), 2 * MIB);
    // Past the end of the (shorter) file but inside the volume: zeroes, then writable.
    common::assert_filled(&read(&vol, MIB + 4096, 4096), 0, 4096);
    write(&vol, 2 * MIB - 4096, vec![3u8; 4096]);
    common::assert_filled(&read(&vol, 2 * MIB - 4096, 4096), 3, 4096);
}

/// TRIM punches a hole the file system reports (SEEK_HOLE) and that reads as zeroes.
#[test]
fn trim_punches_a_hole() {
    let dir = TempDir::new("trim").unwrap();
    let (vol, path) = open(&dir, 4 * MIB);
    write(&vol, 0, vec![5u8; 2 * MIB as usize]);
    flush(&vol).unwrap();
    let before = blocks(&path);
    let trim = IoRequest::Trim {
        offset: MIB,
        len: MIB,
        fua: true,
    };
    assert_eq!(run(&vol, trim), Ok(IoReply::Done));
    assert!(blocks(&path) < before, "trim deallocated");
    let backend = FileBackend::open(&path).unwrap();
    assert_eq!(
        backend.next_hole(0).unwrap(),
        MIB,
        "SEEK_HOLE finds the punched range"
    );
    common::assert_filled(&read(&vol, MIB, 4096), 0, 4096);
    common::assert_filled(&read(&vol, MIB - 4096, 4096), 5, 4096);
}

/// WRITE_ZEROES may deallocate (no NO_HOLE) or must keep the allocation (NO_HOLE); both read
/// as zeroes.
#[test]
fn write_zeroes_with_and_without_punch() {
    let dir = TempDir::new("zeroes").unwrap();
    let (vol, path) = open(&dir, 4 * MIB);
    write(&vol, 0, vec![1u8; 2 * MIB as usize]);
    flush(&vol).unwrap();
    let full = blocks(&path);
    let keep = IoRequest::WriteZeroes {
        offset: 0,
        len: MIB,
        may_punch: false,
        fua: false,
    };
    assert_eq!(run(&vol, keep), Ok(IoReply::Done));
    flush(&vol).unwrap();
    assert_eq!(blocks(&path), full, "NO_HOLE keeps the allocation");
    common::assert_filled(&read(&vol, 0, 4096), 0, 4096);
    let punch = IoRequest::WriteZeroes {
        offset: MIB,
        len: MIB,
        may_punch: true,
        fua: false,
    };
    assert_eq!(run(&vol, punch), Ok(IoReply::Done));
    assert!(
        blocks(&path) < full,
        "without NO_HOLE the range is deallocated"
    );
    common::assert_filled(&read(&vol, MIB, 4096), 0, 4096);
}

/// Block status reports data and holes, and past the end of a short file a hole.
#[test]
fn block_status_holes_and_data() {
    let dir = TempDir::new("status").unwrap();
    let (vol, path) = open(&dir, 4 * MIB);
    assert_eq!(status(&vol, 0, 4 * MIB), vec![HOLE(4 * MIB)]);
    write(&vol, MIB, vec![1u8; MIB as usize]);
    assert_eq!(
        status(&vol, 0, 4 * MIB),
        vec![HOLE(MIB), DATA(MIB), HOLE(2 * MIB)]
    );
    assert_eq!(status(&vol, MIB + 4096, 4096), vec![DATA(4096)]);
    // A file shorter than the volume: the rest is a hole.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    vol.set_size(8 * MIB).unwrap();
    assert_eq!(status(&vol, 6 * MIB, MIB), vec![HOLE(MIB)]);
    assert_eq!(status(&vol, MIB, 7 * MIB), vec![DATA(MIB), HOLE(6 * MIB)]);
    assert!(matches!(
        run(&vol, IoRequest::BlockStatus { offset: 0, len: 0 }),
        Err(IoError::Invalid(_))
    ));
}

/// A fragmented range is answered with at most MAX_BLOCK_STATUS_EXTENTS extents, a prefix.
#[test]
fn block_status_is_capped() {
    let dir = TempDir::new("cap").unwrap();
    let n = MAX_BLOCK_STATUS_EXTENTS as u64 + 100;
    let (vol, _) = open(&dir, 2 * n * 4096);
    let backend = Arc::new(FileBackend::open(&dir.path().join("v.img")).unwrap());
    for i in 0..n {
        backend.write_at(&[1u8; 4096], 2 * i * 4096).unwrap();
    }
    let extents = status(&vol, 0, 2 * n * 4096);
    assert_eq!(extents.len(), MAX_BLOCK_STATUS_EXTENTS);
    assert_eq!(extents[0], DATA(4096));
    assert_eq!(extents[1], HOLE(4096));
}

/// The backend on its own: reads past EOF are zeroes, SEEK_DATA past the last data is None.
#[test]
fn file_backend_sparse_semantics() {
    let dir = TempDir::new("backend").unwrap();
    let path = create_volume_file(dir.path(), "b.img", 0).unwrap();
    let b = FileBackend::open(&path).unwrap();
    b.write_at(b"abc", 10).unwrap();
    let mut buf = [9u8; 20];
    b.read_at(&mut buf, 5).unwrap();
    assert_eq!(&buf[..8], &[0, 0, 0, 0, 0, b'a', b'b', b'c']);
    assert!(buf[8..].iter().all(|&x| x == 0), "past EOF reads zeroes");
    assert_eq!(b.next_data(0).unwrap(), Some(0));
    assert_eq!(b.next_data(100).unwrap(), None);
    b.set_len(MIB).unwrap();
    assert_eq!(b.next_hole(0).unwrap(), 4096);
    assert_eq!(b.next_data(8192).unwrap(), None);
    b.zero_range(0, 4096, true).unwrap();
    b.read_at(&mut buf, 5).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
}

/// After close, requests fail with ShuttingDown; close is idempotent.
#[test]
fn close_refuses_new_requests() {
    let dir = TempDir::new("close").unwrap();
    let (vol, _) = open(&dir, MIB);
    write(&vol, 0, vec![1u8; 4096]);
    vol.close();
    vol.close();
    assert_eq!(run(&vol, IoRequest::Flush), Err(IoError::ShuttingDown));
    assert_eq!(vol.stats().workers, 0);
}
