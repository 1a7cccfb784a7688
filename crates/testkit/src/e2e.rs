//! Small helpers the end-to-end tests share: starting the agent from the binary's tests,
//! making test files, checksums, and cleanup guards for mounts and devices.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cmd::run_ok;
use crate::rng::SplitMix64;

/// Starts an agent from the `blockwarden` binary of the calling test crate (the env var
/// `CARGO_BIN_EXE_blockwarden` only exists there, so this is a macro).
#[macro_export]
macro_rules! start_agent {
    () => {
        $crate::Agent::start($crate::AgentOptions::new(env!("CARGO_BIN_EXE_blockwarden")))
    };
}

/// Writes `size` bytes of seeded pseudo-random data to `path`. With `holes`, every third
/// MiB is left unwritten (a sparse hole reading as zeroes).
pub fn random_file(path: &Path, size: u64, seed: u64, holes: bool) {
    let f = std::fs::File::create(path).expect("create test file");
    f.set_len(size).expect("set_len");
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    let mut rng = SplitMix64::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        if holes && (off >> 20) % 3 == 1 {
            w.flush().expect("flush");
            std::io::Seek::seek(&mut w, std::io::SeekFrom::Start(off + n as u64)).expect("seek");
        } else {
            rng.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).expect("write test file");
        }
        off += n as u64;
    }
    w.flush().expect("flush");
}

/// Copies `size` bytes of /dev/urandom into `path`.
pub fn urandom_file(path: &Path, size: u64) {
    let mut src = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let mut dst = std::fs::File::create(path).expect("create test file");
    let n = std::io::copy(&mut std::io::Read::take(&mut src, size), &mut dst).expect("copy");
    assert_eq!(n, size);
}

/// `sha256sum` of a file, as hex.
pub fn sha256(path: &Path) -> String {
    let out = run_ok(
        Command::new("sha256sum").arg(path),
        Duration::from_secs(300),
    );
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

/// Runs its closures in reverse order when dropped, even when the test panics: unmounts,
/// detaches loop devices, kills helper processes.
#[derive(Default)]
pub struct Cleanup {
    steps: Vec<(String, Box<dyn FnOnce() + Send>)>,
}

impl std::fmt::Debug for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.steps.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Cleanup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a step; `name` is printed if it is run because of a panic.
    pub fn push(&mut self, name: impl Into<String>, f: impl FnOnce() + Send + 'static) {
        self.steps.push((name.into(), Box::new(f)));
    }

    /// Runs a shell-free command as a cleanup step, ignoring its result.
    pub fn push_cmd(&mut self, program: &str, args: &[&str]) {
        let program = program.to_owned();
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let name = format!("{program} {}", args.join(" "));
        self.push(name, move || {
            let _ = crate::cmd::run_with_timeout(
                Command::new(&program).args(&args),
                Duration::from_secs(30),
            );
        });
    }

    /// Runs all steps now (in reverse order).
    pub fn run(&mut self) {
        let panicking = std::thread::panicking();
        while let Some((name, f)) = self.steps.pop() {
            if panicking {
                eprintln!("testkit: cleanup: {name}");
            }
            f();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
    }
}

/// Deadline of the mount and loop commands below.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);

/// nbdfuse on `mnt` for `uri` (its pid file in `scratch`), registered for cleanup
/// (`fusermount3 -u`, then kill and lazy unmount if it does not exit); returns the path of
/// the exposed file.
pub fn nbdfuse(scratch: &Path, mnt: &Path, uri: &str, cleanup: &mut Cleanup) -> PathBuf {
    std::fs::create_dir_all(mnt).unwrap();
    let pidfile = scratch.join("nbdfuse.pid");
    let _ = std::fs::remove_file(&pidfile);
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(mnt)
        .arg(uri)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nbdfuse");
    let child = Arc::new(Mutex::new(child));
    let (c, m) = (child.clone(), mnt.to_path_buf());
    cleanup.push(format!("unmount nbdfuse {}", mnt.display()), move || {
        let _ = crate::cmd::run_with_timeout(
            Command::new("fusermount3").arg("-u").arg(&m),
            Duration::from_secs(30),
        );
        let mut c = c.lock().unwrap();
        if !crate::wait_until(Duration::from_secs(10), || {
            matches!(c.try_wait(), Ok(Some(_)))
        }) {
            let _ = c.kill();
            let _ = c.wait();
            let _ = crate::cmd::run_with_timeout(
                Command::new("umount").arg("-l").arg(&m),
                Duration::from_secs(30),
            );
        }
    });
    let file = mnt.join("nbd");
    assert!(
        crate::wait_until(Duration::from_secs(30), || pidfile.exists()
            && file.exists()),
        "nbdfuse did not mount {} within 30 s",
        mnt.display()
    );
    file
}

/// A loop device on `file`, registered for cleanup (`losetup -d`).
pub fn losetup(file: &Path, cleanup: &mut Cleanup) -> String {
    let dev = run_ok(
        Command::new("losetup").args(["-f", "--show"]).arg(file),
        MOUNT_TIMEOUT,
    )
    .trim()
    .to_owned();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    cleanup.push_cmd("losetup", &["-d", &dev]);
    dev
}

/// Mounts `dev` on `mnt` with extra `mount` arguments `opts`, registered for cleanup (lazy
/// unmount).
pub fn mount(dev: &str, mnt: &Path, opts: &[&str], cleanup: &mut Cleanup) {
    std::fs::create_dir_all(mnt).unwrap();
    run_ok(
        Command::new("mount").args(opts).arg(dev).arg(mnt),
        MOUNT_TIMEOUT,
    );
    let m = mnt.to_string_lossy().into_owned();
    cleanup.push_cmd("umount", &["-l", &m]);
}
