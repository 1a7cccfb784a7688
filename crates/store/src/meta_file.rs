//! The generation record next to a volume file (`<volume file>.meta`, format in
//! `replica.rs`), replaced atomically with [`replace_file`]: temporary file, fsync, rename
//! over the old file, fsync of the directory. (The replication metadata, `<volume
//! file>.repl`, is written in place into two slots instead: `repl_meta.rs`.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::crc::crc32c;
use crate::files::TEMP_SUFFIX;
use crate::replica::{ReplicaError, META_LEN};

const META_MAGIC: [u8; 8] = *b"BWREPMD\n";
const META_VERSION: u32 = 1;

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ReplicaError {
    let path = path.to_path_buf();
    move |source| ReplicaError::Io {
        action,
        path,
        source,
    }
}

/// Where a step of [`replace_file`] stops, to simulate a crash there (tests only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopAfter {
    /// The temporary file is written and synced, not renamed.
    TempWritten,
    /// Renamed into place, directory not synced.
    Renamed,
}

/// `.<name>.tmp` next to `path`: the store's [`TEMP_SUFFIX`] convention, so
/// [`crate::remove_temp_files`] also cleans it.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{TEMP_SUFFIX}"))
}

pub(crate) fn fsync_parent(path: &Path) -> Result<(), ReplicaError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync the directory of", path))
}

/// Deletes a temporary file a crashed [`replace_file`] left next to `path` (and makes the
/// deletion durable). It is never the truth: it was not renamed into place.
pub(crate) fn remove_stale_temp(path: &Path) -> Result<(), ReplicaError> {
    let tmp = temp_path(path);
    match fs::remove_file(&tmp) {
        Ok(()) => fsync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove stale", &tmp)(e)),
    }
}

/// Replaces the file at `path` with `parts` (concatenated), durably and atomically:
/// temporary file, fsync, rename over the old file, fsync of the directory. A failure
/// before the rename leaves the old file (the temporary file is removed, best effort); a
/// failure of the directory fsync leaves the old or the new contents, unknown which.
pub(crate) fn replace_file(
    path: &Path,
    parts: &[&[u8]],
    stop: Option<StopAfter>,
) -> Result<(), ReplicaError> {
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        for part in parts {
            f.write_all(part).map_err(io_err("write", &tmp))?;
        }
        // Never retried: a failed fsync may have dropped the dirty pages (fail-stop).
        f.sync_all().map_err(io_err("fsync", &tmp))
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if stop == Some(StopAfter::TempWritten) {
        return Ok(());
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("rename into place", path)(e));
    }
    if stop == Some(StopAfter::Renamed) {
        return Ok(());
    }
    fsync_parent(path)
}

/// Writes the generation record `highest` durably ([`replace_file`]).
pub(crate) fn write_meta(
    path: &Path,
    highest: u64,
    stop: Option<StopAfter>,
) -> Result<(), ReplicaError> {
    replace_file(path, &[&encode_meta(highest)], stop)
}

pub(crate) fn read_meta(path: &Path) -> Result<u64, ReplicaError> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ReplicaError::MetaMissing { path: path.into() })
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut buf = Vec::with_capacity(META_LEN + 1);
    // One byte more than expected tells a longer file from a good one.
    (&mut f)
        .take(META_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    decode_meta(&buf).map_err(|reason| ReplicaError::MetaCorrupt {
        path: path.into(),
        reason,
    })
}

pub(crate) fn encode_meta(highest: u64) -> [u8; META_LEN] {
    let mut b = [0u8; META_LEN];
    b[0..8].copy_from_slice(&META_MAGIC);
    b[8..12].copy_from_slice(&META_VERSION.to_be_bytes());
    b[16..24].copy_from_slice(&highest.to_be_bytes());
    let crc = crc32c(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_be_bytes());
    b
}

fn decode_meta(b: &[u8]) -> Result<u64, String> {
    if b.len() != META_LEN {
        return Err(format!("{} bytes instead of {META_LEN}", b.len()));
    }
    if b[0..8] != META_MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_be_bytes(b[28..32].try_into().expect("4 bytes"));
    if crc != crc32c(&b[..28]) {
        return Err("checksum mismatch".into());
    }
    let version = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != META_VERSION {
        return Err(format!("unknown format version {version}"));
    }
    Ok(u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")))
}
