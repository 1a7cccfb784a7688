//! The real `blockwarden agent` in cluster mode, one per lab namespace: NBD on
//! `<addr>:10809`, API on `<addr>:7800`, peer protocol on `<addr>:7801`, data under the lab
//! directory. The CLI runs in the root namespace (`--api http://<addr>:7800`), which reaches
//! every namespace over the lab's bridge.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lab::Lab;
use crate::agent::{tail, CLI_TIMEOUT, READY_LINE};
use crate::cmd::{describe, run_with_timeout};

pub const NBD_PORT: u16 = 10809;
pub const API_PORT: u16 = 7800;
pub const PEER_PORT: u16 = 7801;

/// Lease TTL assumed when the agent's `--help` does not state its default (`DEFAULT_LEASE_TTL`
/// in docs/design/control-plane.md).
pub const FALLBACK_LEASE_TTL: Duration = Duration::from_secs(8);

#[derive(Debug, Clone)]
pub struct ClusterAgentOptions {
    /// The `blockwarden` binary (`env!("CARGO_BIN_EXE_blockwarden")` in its tests).
    pub bin: PathBuf,
    /// `--etcd` value.
    pub etcd: String,
    /// `--label` values, `KEY=VALUE`.
    pub labels: Vec<String>,
    /// Extra flags appended after the ones the harness sets.
    pub extra_args: Vec<String>,
    /// Deadline for the ready line after spawn.
    pub ready_timeout: Duration,
}

impl ClusterAgentOptions {
    pub fn new(bin: impl Into<PathBuf>, etcd: impl Into<String>) -> Self {
        Self {
            bin: bin.into(),
            etcd: etcd.into(),
            labels: Vec::new(),
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(30),
        }
    }
}

/// One agent process in its namespace; its node name is the namespace's name.
#[derive(Debug)]
pub struct ClusterAgent {
    lab: Arc<Lab>,
    name: String,
    addr: Ipv4Addr,
    opts: ClusterAgentOptions,
    dir: PathBuf,
    pid: Option<u32>,
    runs: u32,
}

impl ClusterAgent {
    /// Starts the agent inside namespace `ns` (node name `ns`) and waits for its ready line;
    /// panics with its log if it exits or stays silent.
    #[track_caller]
    pub fn start(lab: &Arc<Lab>, ns: &str, opts: ClusterAgentOptions) -> ClusterAgent {
        let mut a = ClusterAgent {
            lab: Arc::clone(lab),
            name: ns.to_owned(),
            addr: lab.addr(ns),
            opts,
            dir: lab.subdir(&format!("agent-{ns}")),
            pid: None,
            runs: 0,
        };
        a.spawn_and_wait();
        a
    }

    /// The agent's command line.
    pub fn agent_command(&self) -> Command {
        let mut cmd = Command::new(&self.opts.bin);
        cmd.arg("agent")
            .args(["--etcd", &self.opts.etcd])
            .args(["--node-name", &self.name])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--nbd-listen", &self.nbd_addr().to_string()])
            .args(["--api-listen", &self.api_addr().to_string()])
            .args(["--peer-listen", &self.peer_addr().to_string()]);
        for l in &self.opts.labels {
            cmd.args(["--label", l]);
        }
        cmd.args(&self.opts.extra_args)
            .env_remove("BLOCKWARDEN_API")
            .env("RUST_BACKTRACE", "1");
        cmd
    }

    #[track_caller]
    fn spawn_and_wait(&mut self) {
        assert!(self.pid.is_none(), "agent {} already running", self.name);
        self.runs += 1;
        let log = std::fs::File::create(self.log_path()).expect("create agent log");
        let mut cmd = self.agent_command();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let started = Instant::now();
        let pid = self
            .lab
            .spawn_in(&self.name, cmd, &format!("agent {}", self.name));
        self.pid = Some(pid);
        let deadline = started + self.opts.ready_timeout;
        loop {
            if self.log().contains(READY_LINE) {
                eprintln!(
                    "testkit: agent {} ({}) ready after {:?}",
                    self.name,
                    self.addr,
                    started.elapsed()
                );
                return;
            }
            if let Some(status) = self.lab.try_wait(pid) {
                self.lab.reap(pid);
                self.pid = None;
                panic!(
                    "agent {} exited with {status} before it was ready; log {}:\n{}",
                    self.name,
                    self.log_path().display(),
                    tail(&self.log(), 60)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "agent {} not ready (no line {READY_LINE:?}) within {:?}; log {}:\n{}",
                    self.name,
                    self.opts.ready_timeout,
                    self.log_path().display(),
                    tail(&self.log(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Node name (= namespace name).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A scratch directory next to the data dir (images, job files).
    pub fn scratch_dir(&self) -> PathBuf {
        let p = self.dir.join("scratch");
        std::fs::create_dir_all(&p).expect("create scratch dir");
        p
    }

    pub fn nbd_addr(&self) -> SocketAddr {
        SocketAddr::from((self.addr, NBD_PORT))
    }

    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from((self.addr, API_PORT))
    }

    pub fn peer_addr(&self) -> SocketAddr {
        SocketAddr::from((self.addr, PEER_PORT))
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr())
    }

    /// `nbd://<addr>:10809/<volume>`.
    pub fn nbd_uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd_addr())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("agent.{}.log", self.runs))
    }

    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn is_running(&self) -> bool {
        self.pid.is_some_and(|p| self.lab.try_wait(p).is_none())
    }

    /// SIGKILL and reap; data dir stays as the kill left it.
    pub fn kill9(&mut self) {
        if let Some(pid) = self.pid.take() {
            self.lab.kill(pid);
            eprintln!("testkit: kill -9 agent {}", self.name);
        }
    }

    /// SIGTERM and wait up to 20 s for the exit (then SIGKILL).
    pub fn stop(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        self.lab.signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.lab.try_wait(pid).is_none() {
            if Instant::now() >= deadline {
                eprintln!(
                    "testkit: agent {} ignored SIGTERM for 20 s; killing it",
                    self.name
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.lab.kill(pid);
    }

    /// Starts the agent again on the same data dir and addresses (stopping it first).
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    /// `blockwarden --api http://<addr>:7800 <args>` (not run), for the root namespace.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.opts.bin);
        cmd.arg("--api")
            .arg(self.api_url())
            .args(args)
            .env_remove("BLOCKWARDEN_API");
        cmd
    }

    /// Runs the CLI against this agent; panics only if it hangs past [`CLI_TIMEOUT`].
    #[track_caller]
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.cli_command(args);
        run_with_timeout(&mut cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs the CLI and panics (with output and this agent's log tail) unless it exits 0.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let mut cmd = self.cli_command(args);
        let out = run_with_timeout(&mut cmd, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{}\n--- agent {} log tail ---\n{}",
            describe(&cmd, &out),
            self.name,
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
                "`blockwarden {}` via {} printed invalid JSON ({e}):\n{out}",
                all.join(" "),
                self.name
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
}

impl Drop for ClusterAgent {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            self.lab.kill(pid);
        }
        if std::thread::panicking() {
            eprintln!(
                "testkit: agent {} log {} (last 60 lines):\n{}",
                self.name,
                self.log_path().display(),
                tail(&self.log(), 60)
            );
        }
    }
}

/// The agent's default lease TTL, read from `blockwarden agent --help` (a flag whose help
/// mentions the lease, with `[default: 6s]`, `6000ms` or plain seconds). Falls back to
/// [`FALLBACK_LEASE_TTL`] with a notice when the help does not say.
pub fn lease_ttl(bin: &std::path::Path) -> Duration {
    let help = Command::new(bin)
        .args(["agent", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let parsed = help
        .lines()
        .filter(|l| l.to_lowercase().contains("lease"))
        .find_map(|l| {
            let d = l.split("[default: ").nth(1)?.split(']').next()?.trim();
            parse_duration(d)
        });
    match parsed {
        Some(d) => d,
        None => {
            eprintln!(
                "testkit: `blockwarden agent --help` states no lease TTL default; assuming {FALLBACK_LEASE_TTL:?}"
            );
            FALLBACK_LEASE_TTL
        }
    }
}

/// `6s`, `6000ms`, `6`, `1.5s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .trim()
            .parse::<f64>()
            .ok()
            .map(|v| Duration::from_secs_f64(v / 1000.0));
    }
    let secs = s.strip_suffix('s').unwrap_or(s);
    secs.trim().parse::<f64>().ok().map(Duration::from_secs_f64)
}
