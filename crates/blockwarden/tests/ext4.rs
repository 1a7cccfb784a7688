//! An ext4 filesystem on a volume: the export is exposed as a file by nbdfuse, a loop device
//! sits on that file; mkfs.ext4, mount, write a tree of files, umount, `fsck.ext4 -f -n` must be
//! clean, then remount over a new NBD connection and every file must read back identical.
//! Needs root (loop devices, mount, FUSE). All mounts, loop devices and nbdfuse processes are
//! released by a Cleanup guard, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::cmd::{describe, run_ok, run_with_timeout};
use testkit::e2e::{losetup, mount, nbdfuse, Cleanup};
use testkit::rng::SplitMix64;
use testkit::{require_root, require_tool, start_agent};

const T: Duration = Duration::from_secs(120);
const SEED: u64 = 0xe474;

/// The file tree: (relative path, size) for 4 directories × 12 files, 1 byte to 1.5 MiB.
fn tree() -> Vec<(PathBuf, usize)> {
    let mut rng = SplitMix64::new(SEED);
    let mut files = Vec::new();
    for d in 0..4 {
        for f in 0..12 {
            let size = match f % 4 {
                0 => 1 + rng.below(100) as usize,
                1 => 4096,
                2 => 1 + rng.below(64 << 10) as usize,
                _ => 1 + rng.below(3 << 19) as usize,
            };
            files.push((
                PathBuf::from(format!("dir{d}/sub{}/file{f}.bin", f % 3)),
                size,
            ));
        }
    }
    files
}

fn content(path: &Path, size: usize) -> Vec<u8> {
    let h = path
        .to_string_lossy()
        .bytes()
        .fold(SEED, |h, b| testkit::rng::mix64(h ^ u64::from(b)));
    let mut buf = vec![0u8; size];
    SplitMix64::new(h).fill(&mut buf);
    buf
}

#[test]
fn ext4_via_nbdfuse_and_loop_survives_umount_fsck_and_remount() {
    if !require_root()
        || ![
            "nbdfuse",
            "fusermount3",
            "losetup",
            "mkfs.ext4",
            "fsck.ext4",
            "mount",
            "umount",
        ]
        .iter()
        .all(|t| require_tool(t))
    {
        return;
    }
    let agent = start_agent!();
    agent.create_volume("fs", "256M");
    let uri = agent.nbd_uri("fs");
    let scratch = agent.scratch_dir();
    let (fuse_dir, mnt) = (scratch.join("fuse"), scratch.join("mnt"));

    {
        let mut cleanup = Cleanup::new();
        let file = nbdfuse(&scratch, &fuse_dir, &uri, &mut cleanup);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 256 << 20);
        let dev = losetup(&file, &mut cleanup);
        run_ok(Command::new("mkfs.ext4").args(["-F", "-q", &dev]), T);
        mount(&dev, &mnt, &[], &mut cleanup);
        for (rel, size) in tree() {
            let p = mnt.join(&rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content(&rel, size)).unwrap();
        }
        run_ok(&mut Command::new("sync"), T);
        run_ok(Command::new("umount").arg(&mnt), T);
        let mut fsck = Command::new("fsck.ext4");
        fsck.args(["-f", "-n", &dev]);
        let out = run_with_timeout(&mut fsck, T).unwrap();
        assert!(
            out.status.success(),
            "fsck found problems:\n{}",
            describe(&fsck, &out)
        );
        // Leaving the block: detach the loop device, unmount nbdfuse (closes the NBD connection).
    }

    let mut cleanup = Cleanup::new();
    let file = nbdfuse(&scratch, &fuse_dir, &uri, &mut cleanup);
    let dev = losetup(&file, &mut cleanup);
    mount(&dev, &mnt, &[], &mut cleanup);
    let mut checked = 0;
    for (rel, size) in tree() {
        let got =
            std::fs::read(mnt.join(&rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert!(
            got == content(&rel, size),
            "{} differs after remount",
            rel.display()
        );
        checked += 1;
    }
    assert_eq!(checked, 48);
    cleanup.run();
}
