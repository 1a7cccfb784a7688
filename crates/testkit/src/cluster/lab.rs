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

/// Where the delay line's source lives in a checkout: `shared/` beside the repository.
pub fn delayline_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bench/tools/delayline.c")
}

/// Whether [`Lab::slow_link`] can run here: a lab, `cc`, the delay line's source
/// ([`delayline_source`]) and `/dev/net/tun`. Prints a loud skip (or panics under `CI`) and
/// returns false when not.
#[track_caller]
pub fn slow_link_available() -> bool {
    if !lab_available() || !require_tool("cc") {
        return false;
    }
    let missing = if !delayline_source().exists() {
        format!(
            "the delay line's source {} is missing (shared/ must sit beside the repository)",
            delayline_source().display()
        )
    } else if !Path::new("/dev/net/tun").exists() {
        "/dev/net/tun is missing (no TUN support)".to_owned()
    } else {
        return true;
    };
    let at = std::panic::Location::caller();
    if crate::cmd::in_ci() {
        panic!(
            "\n\n########## NOT RUNNABLE IN CI ##########\n{missing}\n(at {at}; CI must run every \
             test)\n########################################\n"
        );
    }
    eprintln!(
        "\n########## SKIPPED ({missing}) at {at} ##########\n\
         ########## this test did NOT run; CI would fail here ##########\n"
    );
    false
}

/// Longest wait for the delay line's "ready" line, and for it to exit after SIGTERM.
const DELAYLINE_TIMEOUT: Duration = Duration::from_secs(10);

/// Packets the delay line queues per direction before it tail-drops (netem's default limit).
const DELAYLINE_LIMIT_PKTS: u32 = 1000;

/// One direction of a [`SlowLink`]: what the delay line delivered ([`SlowLink::remove`]), or
/// what the kernel handed to it ([`SlowLink::offered`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineCounters {
    /// Packets (GSO super-packets count once).
    pub fwd: u64,
    /// Packets dropped (delivered: queue full or write error; offered: the TUN device's
    /// transmit drops).
    pub drops: u64,
    /// Bytes (IP packets, without the virtio header).
    pub bytes: u64,
}

/// What went through a [`SlowLink`] in each direction, from the counters the delay line
/// prints when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub a_to_b: LineCounters,
    pub b_to_a: LineCounters,
}

impl LinkCounters {
    /// Parses `delayline: A->B fwd=.. drops=.. bytes=.. | B->A fwd=.. drops=.. bytes=..`.
    fn parse(log: &str) -> Option<LinkCounters> {
        let line = log
            .lines()
            .rev()
            .find(|l| l.starts_with("delayline: A->B"))?;
        let (ab, ba) = line.split_once('|')?;
        let side = |s: &str| -> Option<LineCounters> {
            let field = |k: &str| -> Option<u64> {
                s.split_whitespace()
                    .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
            };
            Some(LineCounters {
                fwd: field("fwd")?,
                drops: field("drops")?,
                bytes: field("bytes")?,
            })
        };
        Some(LinkCounters {
            a_to_b: side(ab)?,
            b_to_a: side(ba)?,
        })
    }
}

/// A slowed link between two namespaces of a [`Lab`] (see [`Lab::slow_link`]). Dropping it
/// (or [`SlowLink::remove`]) removes the routes through the line and stops it, so traffic
/// goes straight over the bridge again.
#[must_use = "the link is restored when the guard drops"]
pub struct SlowLink<'a> {
    lab: &'a Lab,
    pid: Option<u32>,
    /// (netns kernel name, TUN device, destination) of every host route added.
    routes: Vec<(String, String, Ipv4Addr)>,
    /// (netns kernel name, TUN device) at `a`'s end and at `b`'s end.
    ends: [(String, String); 2],
    log: PathBuf,
    what: String,
}

impl std::fmt::Debug for SlowLink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlowLink")
            .field("what", &self.what)
            .field("pid", &self.pid)
            .field("routes", &self.routes)
            .finish()
    }
}

impl SlowLink<'_> {
    /// The delay line's pid (a process the lab tracks).
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// What the kernels handed to the line so far, read from the TUN devices' transmit
    /// counters: `a_to_b` is what `a` sent into it (packets, bytes, and `drops`: packets the
    /// TUN device dropped because the line did not read them in time), `b_to_a` likewise.
    /// Unlike [`SlowLink::remove`]'s counters this includes what is still queued in the
    /// line — on a very slow line most of what was offered is. `None` once removed.
    pub fn offered(&self) -> Option<LinkCounters> {
        self.pid?;
        let side = |(netns, dev): &(String, String)| -> Option<LineCounters> {
            let out = run_with_timeout(
                &mut ip(&["-n", netns, "-s", "-j", "link", "show", "dev", dev]),
                IP_TIMEOUT,
            )
            .ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let tx = &v[0]["stats64"]["tx"];
            Some(LineCounters {
                fwd: tx["packets"].as_u64()?,
                drops: tx["dropped"].as_u64()?,
                bytes: tx["bytes"].as_u64()?,
            })
        };
        Some(LinkCounters {
            a_to_b: side(&self.ends[0])?,
            b_to_a: side(&self.ends[1])?,
        })
    }

    /// The delay line's stderr so far (errors; its counters once it stopped).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Restores the link: removes the routes through the line, stops it (SIGTERM, then
    /// SIGKILL if it lingers) and returns what it forwarded (`None` if it printed nothing,
    /// e.g. it had to be killed).
    pub fn remove(mut self) -> Option<LinkCounters> {
        self.teardown()
    }

    fn teardown(&mut self) -> Option<LinkCounters> {
        for (netns, dev, dest) in self.routes.drain(..) {
            let _ = run_with_timeout(
                &mut ip(&[
                    "-n",
                    &netns,
                    "route",
                    "del",
                    &format!("{dest}/32"),
                    "dev",
                    &dev,
                ]),
                IP_TIMEOUT,
            );
        }
        let pid = self.pid.take()?;
        self.lab.signal(pid, libc::SIGTERM);
        let deadline = std::time::Instant::now() + DELAYLINE_TIMEOUT;
        while self.lab.try_wait(pid).is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.lab.try_wait(pid).is_some() {
            self.lab.reap(pid);
        } else {
            eprintln!("testkit: {} did not stop on SIGTERM; killing it", self.what);
            self.lab.kill(pid);
        }
        let counters = LinkCounters::parse(&self.log());
        eprintln!(
            "testkit: {} removed; {}",
            self.what,
            match &counters {
                Some(c) => format!("{c:?}"),
                None => format!("no counters (log: {:?})", self.log()),
            }
        );
        counters
    }
}

impl Drop for SlowLink<'_> {
    fn drop(&mut self) {
        if self.pid.is_some() || !self.routes.is_empty() {
            self.teardown();
        }
    }
}

impl Lab {
    /// The delay line binary, compiled (`cc -O2`) into the lab's directory on first use.
    /// Call [`slow_link_available`] first: this panics if it cannot be built.
    #[track_caller]
    pub fn delayline_bin(&self) -> PathBuf {
        let bin = self.dir.path().join("delayline");
        if bin.exists() {
            return bin;
        }
        // Built under a unique name and renamed into place: two links set up at once in one
        // lab never run a half-written binary.
        let tmp = self
            .dir
            .path()
            .join(format!("delayline.{:?}.tmp", std::thread::current().id()));
        let mut cc = Command::new("cc");
        cc.arg("-O2").arg("-o").arg(&tmp).arg(delayline_source());
        let out =
            run_with_timeout(&mut cc, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "cannot build the delay line:\n{}",
            describe(&cc, &out)
        );
        std::fs::rename(&tmp, &bin).expect("move the delay line binary into place");
        bin
    }

    /// Slows every packet between namespaces `a` and `b` (both directions), like
    /// `tc qdisc … netem delay DELAY rate RATE` on the link: a delay line
    /// (`shared/bench/tools/delayline.c`) holds each packet `delay` one way and serialises it
    /// at `rate_bits_per_s` (0 = unlimited), FIFO, tail-dropping beyond 1000 queued packets.
    ///
    /// How: the delay line runs in the root namespace and creates TUN device `dl<b>` in `a`
    /// and `dl<a>` in `b`; each namespace gets a /32 host route to the other's bridge address
    /// through its TUN device, with its own bridge address as the preferred source (the TUN
    /// devices carry no address). Longer-prefix routes win over the bridge's /24, so all
    /// a↔b traffic (including established connections, whose cached routes are invalidated
    /// by the route change) takes the line; traffic with third parties and the root
    /// namespace does not. Routes are symmetric, so strict `rp_filter` passes too.
    ///
    /// Dropping the guard removes the routes and stops the line. Combine with [`Lab::lossy`]
    /// for packet loss. Call [`slow_link_available`] first.
    #[track_caller]
    pub fn slow_link(
        &self,
        a: &str,
        b: &str,
        delay: Duration,
        rate_bits_per_s: u64,
    ) -> SlowLink<'_> {
        assert_ne!(a, b, "a slow link joins two different namespaces");
        let bin = self.delayline_bin();
        let (na, nb) = (self.node(a), self.node(b));
        let (dev_a, dev_b) = (format!("dl{b}"), format!("dl{a}"));
        let what = format!(
            "slow link {a}<->{b} (delay {delay:?}, rate {})",
            if rate_bits_per_s == 0 {
                "unlimited".to_owned()
            } else {
                format!("{rate_bits_per_s} bit/s")
            }
        );
        let log = self.dir.path().join(format!("delayline-{a}-{b}.log"));
        let log_file = File::create(&log).expect("create the delay line's log");
        let delay_us = delay.as_micros().to_string();
        let rate = rate_bits_per_s.to_string();
        let mut cmd = Command::new(&bin);
        cmd.args([
            na.netns.as_str(),
            dev_a.as_str(),
            nb.netns.as_str(),
            dev_b.as_str(),
            &delay_us,
            &rate,
            &delay_us,
            &rate,
            &DELAYLINE_LIMIT_PKTS.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
        // SAFETY: prctl is async-signal-safe; the child dies with the spawning thread.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the delay line ({}): {e}", show(&cmd)));
        let stdout = child.stdout.take().expect("piped stdout");
        let pid = child.id();
        self.procs.lock().expect("lab process table").insert(
            pid,
            Tracked {
                child,
                what: what.clone(),
            },
        );
        // From here on the guard's Drop stops the line and removes what was added.
        let mut link = SlowLink {
            lab: self,
            pid: Some(pid),
            routes: Vec::new(),
            ends: [
                (na.netns.clone(), dev_a.clone()),
                (nb.netns.clone(), dev_b.clone()),
            ],
            log,
            what,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(DELAYLINE_TIMEOUT) {
            Ok(l) if l.trim() == "ready" => {}
            got => panic!(
                "{}: no \"ready\" within {DELAYLINE_TIMEOUT:?} (got {got:?}); exited: {:?}; log:\n{}",
                link.what,
                self.try_wait(pid),
                link.log()
            ),
        }
        for (node, dev, peer) in [(na, &dev_a, nb), (nb, &dev_b, na)] {
            admin(&mut ip(&["-n", &node.netns, "link", "set", dev, "up"]));
            admin(&mut ip(&[
                "-n",
                &node.netns,
                "route",
                "add",
                &format!("{}/32", peer.addr),
                "dev",
                dev,
                "src",
                &node.addr.to_string(),
            ]));
            link.routes
                .push((node.netns.clone(), dev.clone(), peer.addr));
        }
        eprintln!("testkit: {} up (pid {pid})", link.what);
        link
    }

    /// Drops `percent` % of the packets between namespace `ns` and the given addresses, in
    /// each direction, at random (nftables `numgen random mod 100 < N drop` in `ns`'s fault
    /// table). Like [`Lab::partition`] it replaces any earlier fault in `ns`; [`Lab::heal`]
    /// removes it. Applies to traffic through a [`SlowLink`] as well.
    pub fn lossy(&self, ns: &str, peers: &[Ipv4Addr], percent: u32) {
        assert!(!peers.is_empty(), "loss towards nothing");
        assert!(
            (1..=100).contains(&percent),
            "loss is 1..=100 %, not {percent}"
        );
        let set = peers
            .iter()
            .map(Ipv4Addr::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        self.nft(
            ns,
            &format!(
                "add table inet {FAULT_TABLE}\ndelete table inet {FAULT_TABLE}\n\
                 table inet {FAULT_TABLE} {{\n\
                   chain input {{ type filter hook input priority -10; policy accept; ip saddr {{ {set} }} numgen random mod 100 < {percent} drop; }}\n\
                   chain output {{ type filter hook output priority -10; policy accept; ip daddr {{ {set} }} numgen random mod 100 < {percent} drop; }}\n\
                 }}\n"
            ),
        );
        eprintln!("testkit: {percent} % loss between {ns} and {set}");
    }
}
