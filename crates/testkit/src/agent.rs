//! The real `blockwarden agent` as a child process of a test.
//!
//! Each [`Agent`] gets its own temp dir (`data/` is the data dir, `agent.N.log` holds the
//! stdout+stderr of its N-th run) and free loopback ports for NBD and the API. Start-up waits
//! for the line `blockwarden agent ready` with a deadline; a process that exits or stays silent
//! fails the test with its log. Dropping the `Agent` SIGKILLs the process and removes the dir
//! (kept and printed when the test panicked).

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::{describe, run_with_timeout};
use crate::tempdir::TempDir;

/// What the agent prints (stderr) once its API and NBD listeners accept connections.
pub const READY_LINE: &str = "blockwarden agent ready";

/// How long a CLI call may take before the test fails; the control plane is local, so
/// anything near this is a hang.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The `blockwarden` binary: `env!("CARGO_BIN_EXE_blockwarden")` in the binary's tests.
    pub bin: PathBuf,
    pub node_name: String,
    /// Extra flags appended after the ones the harness sets.
    pub extra_args: Vec<String>,
    /// Deadline for the ready line after spawn.
    pub ready_timeout: Duration,
}

impl AgentOptions {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            node_name: "node-a".to_owned(),
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// A running (or stopped) agent with its own data dir and ports.
pub struct Agent {
    opts: AgentOptions,
    dir: TempDir,
    data_dir: PathBuf,
    nbd_port: u16,
    api_port: u16,
    child: Option<Child>,
    /// Number of times the process was spawned; names the log file of the current run.
    runs: u32,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("data_dir", &self.data_dir)
            .field("nbd_port", &self.nbd_port)
            .field("api_port", &self.api_port)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

/// Free loopback TCP ports: bind port 0, read the port, close. All are held until every one
/// is picked so they differ; a race with another process is possible but rare.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

impl Agent {
    /// Spawns the agent and waits until it is ready; panics with its log if it is not.
    #[track_caller]
    pub fn start(opts: AgentOptions) -> Agent {
        let dir = TempDir::new("agent").expect("create agent temp dir");
        let data_dir = dir.path().join("data");
        let ports = free_ports(2);
        let mut agent = Agent {
            opts,
            dir,
            data_dir,
            nbd_port: ports[0],
            api_port: ports[1],
            child: None,
            runs: 0,
        };
        agent.spawn_and_wait();
        agent
    }

    /// The command line this agent runs with, for tests that start a second process by hand
    /// (e.g. on the same data dir with other ports).
    pub fn agent_command(&self, nbd_port: u16, api_port: u16) -> Command {
        let mut cmd = Command::new(&self.opts.bin);
        cmd.arg("agent")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--node-name")
            .arg(&self.opts.node_name)
            .arg("--nbd-listen")
            .arg(format!("127.0.0.1:{nbd_port}"))
            .arg("--api-listen")
            .arg(format!("127.0.0.1:{api_port}"))
            .args(&self.opts.extra_args)
            .env_remove("BLOCKWARDEN_API")
            .env("RUST_BACKTRACE", "1");
        cmd
    }

    #[track_caller]
    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.runs += 1;
        let log = File::create(self.log_path()).expect("create agent log");
        let mut cmd = self.agent_command(self.nbd_port, self.api_port);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.opts.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + self.opts.ready_timeout;
        loop {
            if self.log().contains(READY_LINE) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "agent exited with {status} before it was ready; log {}:\n{}",
                    self.log_path().display(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent not ready (no line {READY_LINE:?}) within {:?}; log {}:\n{}",
                    self.opts.ready_timeout,
                    self.log_path().display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log file (stdout + stderr) of the current or last run.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("agent.{}.log", self.runs))
    }

    /// Contents of the current run's log.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The `blockwarden` binary this agent runs.
    pub fn bin(&self) -> &Path {
        &self.opts.bin
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A scratch directory next to the data dir, removed with the agent (images, mounts).
    pub fn scratch_dir(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).expect("create scratch dir");
        p
    }

    pub fn nbd_port(&self) -> u16 {
        self.nbd_port
    }

    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    pub fn nbd_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nbd_port))
    }

    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// `nbd://127.0.0.1:PORT/NAME`: export name = volume name.
    pub fn nbd_uri(&self, volume: &str) -> String {
        format!("nbd://127.0.0.1:{}/{volume}", self.nbd_port)
    }

    /// The NBD Unix socket under the data dir.
    pub fn nbd_socket(&self) -> PathBuf {
        self.data_dir.join("nbd.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }

    /// SIGKILL, then reap. The data dir stays as the kill left it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to 20 s for a clean exit (then SIGKILL). Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid; the child is not reaped yet, so the pid
        // cannot have been reused.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                eprintln!("testkit: agent ignored SIGTERM for 20 s; killing it");
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent again on the same data dir and ports (stopping it first if running).
    #[track_caller]
    pub fn restart(&mut self) {
        if self.is_running() {
            self.stop();
        }
        self.child = None;
        self.spawn_and_wait();
    }

    /// A `blockwarden --api URL <args>` command (not run).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.opts.bin);
        cmd.arg("--api")
            .arg(self.api_url())
            .args(args)
            .env_remove("BLOCKWARDEN_API");
        cmd
    }

    /// Runs the CLI against this agent; panics only if it hangs.
    #[track_caller]
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.cli_command(args);
        run_with_timeout(&mut cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the CLI and panics (with output and the agent's log) unless it exits 0.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let mut cmd = self.cli_command(args);
        let out = run_with_timeout(&mut cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{}\n--- agent log tail ---\n{}",
            describe(&cmd, &out),
            tail(&self.log(), 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `-o json` appended and parses stdout.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli_ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "`blockwarden {}` printed invalid JSON ({e}):\n{out}",
                all.join(" ")
            )
        })
    }

    /// Runs the CLI expecting failure; returns stderr. Panics if it succeeded.
    #[track_caller]
    pub fn cli_err(&self, args: &[&str]) -> String {
        let mut cmd = self.cli_command(args);
        let out = run_with_timeout(&mut cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !out.status.success(),
            "expected failure:\n{}",
            describe(&cmd, &out)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `volume create NAME --size SIZE`, panicking on failure.
    #[track_caller]
    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli_ok(&["volume", "create", name, "--size", size]);
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "testkit: agent log {} (last 60 lines):\n{}",
                self.log_path().display(),
                tail(&self.log(), 60)
            );
        }
    }
}
