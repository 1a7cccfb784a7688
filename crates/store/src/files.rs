//! Crash-safe primitives for volume files. The agent owns the directory layout and the
//! catalog; these functions make each step atomic and durable so that after a crash a file
//! is either absent or complete (see `docs/design/storage.md`, "Volume files").

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::error::VolumeFileError;

/// Suffix of the temporary file [`create_volume_file`] writes before linking it into place;
/// [`remove_temp_files`] deletes leftovers of a crash.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Creates `dir/file_name` as a sparse file of `size` bytes, atomically: the file appears
/// complete or not at all, and is durable when this returns. Refuses to replace an existing
/// file.
///
/// Order: create `.<name>.tmp`, `set_len`, `fsync` it, hard-link it to `<name>` (which,
/// unlike `rename`, fails if the target exists), unlink the temporary name, `fsync` the
/// directory.
pub fn create_volume_file(
    dir: &Path,
    file_name: &str,
    size: u64,
) -> Result<PathBuf, VolumeFileError> {
    check_name(file_name)?;
    let path = dir.join(file_name);
    let tmp = dir.join(format!(".{file_name}{TEMP_SUFFIX}"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(VolumeFileError::io("remove stale temporary file", &tmp)(e)),
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(VolumeFileError::io("create", &tmp))?;
    file.set_len(size)
        .map_err(VolumeFileError::io("set the length of", &tmp))?;
    file.sync_all()
        .map_err(VolumeFileError::io("fsync", &tmp))?;
    drop(file);
    if let Err(e) = fs::hard_link(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        if e.kind() == io::ErrorKind::AlreadyExists {
            return Err(VolumeFileError::AlreadyExists { path });
        }
        return Err(VolumeFileError::io("link into place", &path)(e));
    }
    fs::remove_file(&tmp).map_err(VolumeFileError::io("remove temporary file", &tmp))?;
    fsync_dir(dir)?;
    Ok(path)
}

/// Grows the file at `path` to `new_size` bytes (sparse) and makes the new length durable.
/// Growing to the current size is a no-op; shrinking is refused.
pub fn grow_volume_file(path: &Path, new_size: u64) -> Result<(), VolumeFileError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(VolumeFileError::io("open", path))?;
    let current = file
        .metadata()
        .map_err(VolumeFileError::io("stat", path))?
        .len();
    if new_size < current {
        return Err(VolumeFileError::Shrink {
            path: path.into(),
            current,
            requested: new_size,
        });
    }
    if new_size > current {
        file.set_len(new_size)
            .map_err(VolumeFileError::io("grow", path))?;
    }
    // Even for a no-op: a crash after a previous set_len may have left it un-synced.
    file.sync_all().map_err(VolumeFileError::io("fsync", path))
}

/// Deletes the file at `path` durably (unlink, then `fsync` of its directory). Returns
/// `false` if it did not exist, so a retry after a crash succeeds.
pub fn remove_volume_file(path: &Path) -> Result<bool, VolumeFileError> {
    let existed = match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(VolumeFileError::io("remove", path)(e)),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fsync_dir(dir)?;
    Ok(existed)
}

/// Makes the directory's entries (creations, renames, unlinks) durable.
pub fn fsync_dir(dir: &Path) -> Result<(), VolumeFileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(VolumeFileError::io("fsync directory", dir))
}

/// Deletes temporary files left by a [`create_volume_file`] that crashed, and returns how
/// many it removed. Call it at startup, before anything creates volume files in `dir`.
pub fn remove_temp_files(dir: &Path) -> Result<usize, VolumeFileError> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(VolumeFileError::io("list", dir))? {
        let entry = entry.map_err(VolumeFileError::io("list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
            let path = entry.path();
            fs::remove_file(&path).map_err(VolumeFileError::io("remove", &path))?;
            removed += 1;
        }
    }
    if removed > 0 {
        fsync_dir(dir)?;
    }
    Ok(removed)
}

fn check_name(name: &str) -> Result<(), VolumeFileError> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
        return Err(VolumeFileError::BadName { name: name.into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use std::os::unix::fs::MetadataExt;

    /// Create makes a sparse file of the right size, leaves no temp file, refuses to clobber.
    #[test]
    fn create_is_sparse_and_refuses_to_replace() {
        let dir = TempDir::new("files").unwrap();
        let path = create_volume_file(dir.path(), "v1.img", 1 << 30).unwrap();
        let md = fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 1 << 30);
        assert_eq!(md.blocks(), 0, "a new volume file allocates nothing");
        let err = create_volume_file(dir.path(), "v1.img", 4096).unwrap_err();
        assert!(
            matches!(err, VolumeFileError::AlreadyExists { .. }),
            "{err}"
        );
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            1 << 30,
            "existing file untouched"
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
        assert!(matches!(
            create_volume_file(dir.path(), "../x", 1),
            Err(VolumeFileError::BadName { .. })
        ));
    }

    /// Grow only grows; remove is idempotent; stale temp files are cleaned.
    #[test]
    fn grow_remove_and_clean_temp_files() {
        let dir = TempDir::new("files").unwrap();
        let path = create_volume_file(dir.path(), "v.img", 4096).unwrap();
        grow_volume_file(&path, 8192).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 8192);
        assert!(matches!(
            grow_volume_file(&path, 4096),
            Err(VolumeFileError::Shrink { .. })
        ));
        assert!(remove_volume_file(&path).unwrap());
        assert!(!remove_volume_file(&path).unwrap());
        fs::write(dir.path().join(".w.img.tmp"), b"x").unwrap();
        assert_eq!(remove_temp_files(dir.path()).unwrap(), 1);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
