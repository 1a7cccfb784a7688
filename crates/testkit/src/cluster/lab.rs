//! A lab of network namespaces joined by a bridge, the processes started inside them, and the
//! network faults a test stages between them.
//!
//! Layout of one lab (tag `T`, claimed per lab so parallel labs never collide):
//!
//! ```text
//!   root ns:  bridge bwlabT  10.77.T.254/24      <- the test process (CLI, NBD clients)
//!               |-- veth bwTv0 <-> eth0 in netns bwlabT-<pid>-<name0>  10.77.T.1/24
//!               |-- veth bwTv1 <-> eth0 in netns bwlabT-<pid>-<name1>  10.77.T.2/24
//!               ...
//! ```
//!
//! The tag is claimed by creating the bridge (`ip link add` is atomic: a second lab picking
//! the same tag fails and tries the next one); the bridge's alias records the owning pid so a
//! later lab can remove what a SIGKILLed test left behind. Only interfaces, namespaces and
//! addresses the lab made are ever touched.
//!
//! Processes are spawned with `setns(2)` into the namespace (the pid the lab tracks is the real
//! process, not a wrapper) and with `PR_SET_PDEATHSIG=SIGKILL`, so they die with the test even
//! when it is SIGKILLed. `PDEATHSIG` fires when the *spawning thread* exits: spawn long-lived
//! processes from the test's own thread, not from a short-lived helper thread.

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cmd::{describe, have_tool, require_root, require_tool, run_with_timeout, show};
use crate::tempdir::TempDir;

/// Prefix of every bridge and namespace a lab creates (and the only ones it ever removes).
pub const PREFIX: &str = "bwlab";

/// Deadline for one `ip`/`nft` invocation: they finish in milliseconds.
const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// The nftables table the fault injection owns inside a namespace.
const FAULT_TABLE: &str = "bwfault";

#[derive(Debug)]
struct Node {
    name: String,
    netns: String,
    veth: String,
    addr: Ipv4Addr,
}

/// A process the lab started: killed (SIGKILL) and reaped when the lab drops.
struct Tracked {
    child: Child,
    what: String,
}

/// N network namespaces on one bridge. Share it as `Arc<Lab>`: etcd members and agents keep a
/// reference, and the lab tears everything down when the last one drops (also on panic).
pub struct Lab {
    tag: u8,
    bridge: String,
    nodes: Vec<Node>,
    procs: Mutex<HashMap<u32, Tracked>>,
    dir: TempDir,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("bridge", &self.bridge)
            .field("nodes", &self.nodes)
            .finish()
    }
}

/// Whether this machine can run lab tests: root, `ip`, `nft`. Prints a loud skip (or panics
/// under `CI`) and returns false when not.
#[track_caller]
pub fn lab_available() -> bool {
    require_root() && require_tool("ip") && require_tool("nft")
}

/// Runs `ip`/`nft`-style admin commands; panics with the full output on failure.
#[track_caller]
fn admin(cmd: &mut Command) -> String {
    let out = run_with_timeout(cmd, IP_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.status.success(), "{}", describe(cmd, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence; no signal is sent.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Removes bridges and namespaces left behind by labs whose test process is gone (a SIGKILLed
/// test cannot run `Drop`). Recognised by name prefix plus the owner pid recorded at creation;
/// anything of a live process is left alone.
fn sweep_stale() {
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let mut parts = rest.splitn(3, '-');
            let (_tag, pid) = (parts.next(), parts.next());
            let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) else {
                continue;
            };
            if !pid_alive(pid) {
                let _ = run_with_timeout(&mut ip(&["netns", "del", &name]), IP_TIMEOUT);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(PREFIX) {
                continue;
            }
            let alias = std::fs::read_to_string(e.path().join("ifalias")).unwrap_or_default();
            let Some(pid) = alias
                .trim()
                .strip_prefix("bwlab-pid-")
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if !pid_alive(pid) {
                let _ = run_with_timeout(&mut ip(&["link", "del", &name]), IP_TIMEOUT);
            }
        }
    }
}

/// Claims a tag by creating its bridge; skips subnets already present on the host.
fn claim_tag() -> (u8, String) {
    let used = admin(&mut ip(&["-4", "-o", "addr", "show"]));
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for i in 0..250u64 {
        let tag = (1 + (seed.wrapping_add(i * 7)) % 250) as u8;
        if used.contains(&format!("10.77.{tag}.")) {
            continue;
        }
        let bridge = format!("{PREFIX}{tag}");
        let out = run_with_timeout(
            &mut ip(&["link", "add", &bridge, "type", "bridge"]),
            IP_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        if out.status.success() {
            return (tag, bridge);
        }
    }
    panic!("no free lab tag: every 10.77.X.0/24 bridge is taken (stale labs? `ip link | grep {PREFIX}`)");
}

/// Installs `setns(netns)` (and `PR_SET_PDEATHSIG`) to run in the child between fork and exec.
fn enter_netns(cmd: &mut Command, netns: &File, pdeathsig: bool) {
    let fd: RawFd = netns.as_raw_fd();
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl, setns) on an fd that
    // stays open until spawn returns (the caller holds `netns`).
    unsafe {
        cmd.pre_exec(move || {
            if pdeathsig && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Lab {
    /// Creates one namespace per name (names: short, `[a-z0-9]`, e.g. `e1`, `n1`), each with
    /// `lo` up and an address on the lab's bridge. Returns `None` (after a loud skip notice)
    /// when the machine cannot run it; panics under `CI` instead.
    #[track_caller]
    pub fn new(names: &[&str]) -> Option<Arc<Lab>> {
        if !lab_available() {
            return None;
        }
        Some(Arc::new(Lab::create(names)))
    }

    fn create(names: &[&str]) -> Lab {
        assert!(names.len() < 250, "a lab holds at most 249 namespaces");
        sweep_stale();
        let (tag, bridge) = claim_tag();
        let pid = std::process::id();
        let mut lab = Lab {
            tag,
            bridge: bridge.clone(),
            nodes: Vec::new(),
            procs: Mutex::new(HashMap::new()),
            dir: TempDir::new("lab").expect("create the lab directory"),
        };
        // From here on, Drop removes whatever was made, even if a step below panics.
        admin(&mut ip(&[
            "link",
            "set",
            &bridge,
            "alias",
            &format!("bwlab-pid-{pid}"),
        ]));
        admin(&mut ip(&[
            "addr",
            "add",
            &format!("10.77.{tag}.254/24"),
            "dev",
            &bridge,
        ]));
        admin(&mut ip(&["link", "set", &bridge, "up"]));
        for (i, name) in names.iter().enumerate() {
            assert!(
                !name.is_empty()
                    && name.len() <= 12
                    && name.bytes().all(|b| b.is_ascii_alphanumeric()),
                "lab namespace names are short alphanumerics: {name:?}"
            );
            let node = Node {
                name: (*name).to_owned(),
                netns: format!("{PREFIX}{tag}-{pid}-{name}"),
                veth: format!("bw{tag}v{i}"),
                addr: Ipv4Addr::new(10, 77, tag, i as u8 + 1),
            };
            admin(&mut ip(&["netns", "add", &node.netns]));
            lab.nodes.push(node);
            let node = lab.nodes.last().expect("just pushed");
            admin(&mut ip(&[
                "link",
                "add",
                &node.veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &node.netns,
            ]));
            admin(&mut ip(&[
                "link", "set", &node.veth, "master", &bridge, "up",
            ]));
            let n = &node.netns;
            admin(&mut ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", node.addr),
                "dev",
                "eth0",
            ]));
            admin(&mut ip(&["-n", n, "link", "set", "eth0", "up"]));
            admin(&mut ip(&["-n", n, "link", "set", "lo", "up"]));
        }
        eprintln!(
            "testkit: lab {bridge}: {}",
            lab.nodes
                .iter()
                .map(|n| format!("{}={}", n.name, n.addr))
                .collect::<Vec<_>>()
                .join(" ")
        );
        lab
    }

    fn node(&self, name: &str) -> &Node {
        match self.nodes.iter().find(|n| n.name == name) {
            Some(n) => n,
            None => panic!(
                "no namespace {name:?} in this lab (has: {})",
                self.names().join(", ")
            ),
        }
    }

    /// The bridge joining the namespaces (in the root namespace).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The names of the lab's namespaces, in creation order.
    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The address of namespace `name` on the bridge.
    pub fn addr(&self, name: &str) -> Ipv4Addr {
        self.node(name).addr
    }

    /// The root namespace's address on the bridge (where the test's own clients come from).
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.tag, 254)
    }

    /// The kernel name of namespace `name` (for `ip netns exec`).
    pub fn netns_name(&self, name: &str) -> &str {
        &self.node(name).netns
    }

    /// The lab's directory (logs, data dirs); kept for inspection when the test panics.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh subdirectory of the lab's directory.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("create a lab subdirectory");
        p
    }

    fn open_netns(&self, name: &str) -> File {
        let path = Path::new("/run/netns").join(&self.node(name).netns);
        File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
    }

    /// Spawns `cmd` inside namespace `ns` and tracks it; returns its pid. The lab SIGKILLs it
    /// when dropped. `what` names it in messages.
    #[track_caller]
    pub fn spawn_in(&self, ns: &str, mut cmd: Command, what: &str) -> u32 {
        let netns = self.open_netns(ns);
        enter_netns(&mut cmd, &netns, true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({}) in {ns}: {e}", show(&cmd)));
        let pid = child.id();
        self.procs.lock().expect("lab process table").insert(
            pid,
            Tracked {
                child,
                what: what.to_owned(),
            },
        );
        pid
    }

    /// Runs a short command inside `ns` to completion with a deadline (stdin closed).
    pub fn output_in(
        &self,
        ns: &str,
        cmd: &mut Command,
        timeout: Duration,
    ) -> std::io::Result<Output> {
        let netns = self.open_netns(ns);
        enter_netns(cmd, &netns, true);
        run_with_timeout(cmd, timeout)
    }

    /// Runs `f` on a thread that has entered namespace `ns`: sockets it creates live there
    /// (and keep working from other threads afterwards). For clients that must run inside a
    /// namespace (e.g. the holder's, during a partition).
    pub fn in_netns<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        let netns = self.open_netns(ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd; it affects only this thread.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!("setns into {ns}: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A TCP connect from inside `from` (or from the root namespace when `None`) to `to`;
    /// `Ok` if it was accepted within `timeout`.
    pub fn tcp_connect(
        &self,
        from: Option<&str>,
        to: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        match from {
            None => TcpStream::connect_timeout(&to, timeout),
            Some(ns) => self.in_netns(ns, || TcpStream::connect_timeout(&to, timeout)),
        }
    }

    /// SIGKILLs a process this lab started and reaps it (no-op if it already exited).
    pub fn kill(&self, pid: u32) {
        let tracked = self.procs.lock().expect("lab process table").remove(&pid);
        if let Some(mut t) = tracked {
            let _ = t.child.kill();
            let _ = t.child.wait();
        }
    }

    /// Sends `sig` to a process this lab started (e.g. SIGTERM, SIGSTOP, SIGCONT).
    pub fn signal(&self, pid: u32, sig: libc::c_int) {
        if self
            .procs
            .lock()
            .expect("lab process table")
            .contains_key(&pid)
        {
            // SAFETY: the pid is our unreaped child (still in the table), so it is not reused.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    /// The exit status of a process this lab started, if it has exited (it stays tracked).
    pub fn try_wait(&self, pid: u32) -> Option<ExitStatus> {
        let mut procs = self.procs.lock().expect("lab process table");
        procs
            .get_mut(&pid)
            .and_then(|t| t.child.try_wait().ok().flatten())
    }

    /// Forgets a process after it exited (reaping it).
    pub fn reap(&self, pid: u32) -> Option<ExitStatus> {
        let t = self.procs.lock().expect("lab process table").remove(&pid);
        t.and_then(|mut t| t.child.wait().ok())
    }

    fn nft(&self, ns: &str, ruleset: &str) {
        let file = self.dir.path().join(format!("nft-{ns}.rules"));
        std::fs::write(&file, ruleset).expect("write nft rules");
        let mut c = Command::new("nft");
        c.arg("-f").arg(&file).stdin(Stdio::null());
        let out = self
            .output_in(ns, &mut c, IP_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "nft in {ns}:\n{ruleset}\n{}",
            describe(&c, &out)
        );
    }

    /// Cuts namespace `ns` off from the given addresses, both directions (its packets to them
    /// and theirs to it are dropped, like a dead link: connects time out, nothing is refused).
    /// Replaces any earlier fault in `ns`.
    pub fn partition(&self, ns: &str, from: &[Ipv4Addr]) {
        assert!(!from.is_empty(), "partition from nothing");
        let set = from
            .iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        self.nft(
            ns,
            &format!(
                "add table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n\
                 table inet {FAULT_TABLE} {{\n\
                   chain input {{ type filter hook input priority -10; policy accept; ip saddr {{ {set} }} drop; }}\n\
                   chain output {{ type filter hook output priority -10; policy accept; ip daddr {{ {set} }} drop; }}\n\
                 }}\n"
            ),
        );
        eprintln!("testkit: partition {ns} from {set}");
    }

    /// Drops everything in and out of `ns` except loopback.
    pub fn isolate(&self, ns: &str) {
        self.nft(
            ns,
            &format!(
                "add table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n\
                 table inet {FAULT_TABLE} {{\n\
                   chain input {{ type filter hook input priority -10; policy accept; iifname != \"lo\" drop; }}\n\
                   chain output {{ type filter hook output priority -10; policy accept; oifname != \"lo\" drop; }}\n\
                 }}\n"
            ),
        );
        eprintln!("testkit: isolate {ns}");
    }

    /// Removes every fault in `ns`.
    pub fn heal(&self, ns: &str) {
        self.nft(
            ns,
            &format!("add table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n"),
        );
        eprintln!("testkit: heal {ns}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let procs: Vec<(u32, Tracked)> = self
            .procs
            .lock()
            .map(|mut p| p.drain().collect())
            .unwrap_or_default();
        for (pid, mut t) in procs {
            if let Ok(None) = t.child.try_wait() {
                if std::thread::panicking() {
                    eprintln!("testkit: lab: killing {} (pid {pid})", t.what);
                }
                let _ = t.child.kill();
            }
            let _ = t.child.wait();
        }
        for n in &self.nodes {
            let _ = run_with_timeout(&mut ip(&["link", "del", &n.veth]), IP_TIMEOUT);
            let _ = run_with_timeout(&mut ip(&["netns", "del", &n.netns]), IP_TIMEOUT);
        }
        let _ = run_with_timeout(&mut ip(&["link", "del", &self.bridge]), IP_TIMEOUT);
        if std::thread::panicking() {
            eprintln!(
                "testkit: lab {} removed; logs kept in {}",
                self.bridge,
                self.dir.path().display()
            );
        }
    }
}

/// Whether `etcd` is installed (skip loudly, or panic under `CI`, when not).
#[track_caller]
pub fn require_etcd() -> bool {
    have_tool("etcd") || require_tool("etcd")
}
