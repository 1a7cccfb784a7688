//! The agent's data directory: its layout and the exclusive lock that keeps a second agent
//! off it.
//!
//! ```text
//! <data-dir>/
//!   agent.lock        flock()ed for the agent's lifetime; holds the owner's pid (for errors)
//!   node-id           this node's id, chosen on first start
//!   catalog.redb      the embedded catalog (volumes, events)
//!   volumes/<id>.img  one sparse file per volume replica, named by volume id
//!   volumes/<id>.img.meta  the replica's generation fence (highest generation admitted)
//!   lost+found/       volume files no catalog record accounts for (never deleted by us)
//!   nbd.sock          NBD Unix socket (removed and re-created at start)
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// An open, locked data directory. The lock is released when this is dropped (or the process
/// dies: flock locks die with their file description, so a `kill -9` never leaves it stuck).
pub struct DataDir {
    root: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and takes its lock, or says who holds it.
    pub fn open(root: &Path) -> Result<DataDir> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create data dir {}", root.display()))?;
        let root = root
            .canonicalize()
            .with_context(|| format!("cannot resolve data dir {}", root.display()))?;
        let lock_path = root.join("agent.lock");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        // SAFETY: flock on a valid, owned descriptor; no memory is involved.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                bail!(
                    "data dir {} is in use by another blockwarden agent (pid {}); stop it or use --data-dir",
                    root.display(),
                    pid.trim()
                );
            }
            return Err(err).with_context(|| format!("cannot lock {}", lock_path.display()));
        }
        lock.set_len(0)?;
        lock.seek(SeekFrom::Start(0))?;
        write!(lock, "{}", std::process::id())?;
        std::fs::create_dir_all(root.join("volumes"))?;
        Ok(DataDir { root, _lock: lock })
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.root.join("catalog.redb")
    }

    /// File name of a volume's data file inside [`DataDir::volumes_dir`].
    pub fn volume_file_name(id: &str) -> String {
        format!("{id}.img")
    }

    /// This node's id: read, or chosen and stored durably on first start.
    pub fn node_id(&self) -> Result<String> {
        let p = self.root.join("node-id");
        match std::fs::read_to_string(&p) {
            Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
        let id = bw_types::ids::random_hex_id()?;
        let tmp = self.root.join("node-id.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        File::open(&self.root)?.sync_all()?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a second open of a locked data dir fails naming the holder; the id is stable.
    #[test]
    fn second_open_is_refused_and_id_is_stable() {
        let dir = std::env::temp_dir().join(format!("bw-datadir-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = DataDir::open(&dir).unwrap();
        let id = a.node_id().unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(a.node_id().unwrap(), id);
        // flock conflicts between two open file descriptions, even in one process.
        let e = DataDir::open(&dir).err().unwrap().to_string();
        assert!(e.contains("in use by another blockwarden agent"), "{e}");
        assert!(e.contains(&std::process::id().to_string()), "{e}");
        drop(a);
        let b = DataDir::open(&dir).unwrap();
        assert_eq!(b.node_id().unwrap(), id);
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
