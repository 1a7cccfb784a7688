//! A real etcd cluster with one member per lab namespace: clients on `http://<addr>:2379`,
//! peers on `:2380`, data dirs under the lab directory. Members keep etcd's default timings
//! (100 ms heartbeat, 1 s election timeout), so tests see what production sees.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lab::Lab;
use crate::agent::tail;

/// Client port of every member (each has its own address, so the port is fixed).
pub const CLIENT_PORT: u16 = 2379;
/// Peer port of every member.
pub const PEER_PORT: u16 = 2380;
/// Bound on a fresh cluster (or a restarted member) becoming healthy: an election takes about
/// a second here; anything near this is a broken start, and the logs are printed.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Member {
    ns: String,
    addr: Ipv4Addr,
    data_dir: PathBuf,
    log_dir: PathBuf,
    runs: u32,
    pid: Option<u32>,
}

/// An etcd cluster inside a lab. Dropping it kills its members (the lab would too).
#[derive(Debug)]
pub struct EtcdCluster {
    lab: Arc<Lab>,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
}

impl EtcdCluster {
    /// Starts one member in each of the namespaces `ns` and waits until every member reports
    /// healthy (a leader is elected and serves reads). Panics with the members' log tails if
    /// that takes longer than [`START_TIMEOUT`].
    #[track_caller]
    pub fn start(lab: &Arc<Lab>, ns: &[&str]) -> EtcdCluster {
        let dir = lab.subdir("etcd");
        let members: Vec<Member> = ns
            .iter()
            .map(|n| Member {
                ns: (*n).to_owned(),
                addr: lab.addr(n),
                data_dir: dir.join(format!("{n}.data")),
                log_dir: dir.clone(),
                runs: 0,
                pid: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.ns, m.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = EtcdCluster {
            lab: Arc::clone(lab),
            members,
            initial_cluster,
            token: format!("bw-lab-{}", lab.netns_name(ns[0])),
        };
        let started = Instant::now();
        for i in 0..etcd.members.len() {
            etcd.spawn(i);
        }
        etcd.wait_all_healthy(START_TIMEOUT);
        eprintln!(
            "testkit: etcd {} healthy after {:?}",
            etcd.endpoints(),
            started.elapsed()
        );
        etcd
    }

    fn log_path(&self, i: usize) -> PathBuf {
        let m = &self.members[i];
        m.log_dir.join(format!("{}.{}.log", m.ns, m.runs))
    }

    fn spawn(&mut self, i: usize) {
        self.members[i].runs += 1;
        let log = std::fs::File::create(self.log_path(i)).expect("create etcd log");
        let m = &self.members[i];
        let client = format!("http://{}:{CLIENT_PORT}", m.addr);
        let peer = format!("http://{}:{PEER_PORT}", m.addr);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &m.ns])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let pid = self.lab.spawn_in(&m.ns, cmd, &format!("etcd {}", m.ns));
        self.members[i].pid = Some(pid);
    }

    #[track_caller]
    fn wait_all_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            if self.members[i].pid.is_none() {
                continue;
            }
            loop {
                if self.member_healthy(i) {
                    break;
                }
                let pid = self.members[i].pid.expect("running");
                if let Some(status) = self.lab.try_wait(pid) {
                    panic!(
                        "etcd {} exited with {status} during start-up\n{}",
                        self.members[i].ns,
                        self.logs()
                    );
                }
                if Instant::now() >= deadline {
                    panic!(
                        "etcd {} not healthy within {timeout:?}\n{}",
                        self.members[i].ns,
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The last lines of every member's current log, for failure messages.
    pub fn logs(&self) -> String {
        self.log_tails(25)
    }

    fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for i in 0..self.members.len() {
            let text = std::fs::read(self.log_path(i))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            s.push_str(&format!(
                "--- etcd {} log {} (tail) ---\n{}\n",
                self.members[i].ns,
                self.log_path(i).display(),
                tail(&text, lines)
            ));
        }
        s
    }

    /// `--etcd` value: every member's client URL, comma-separated (killed ones included).
    pub fn endpoints(&self) -> String {
        self.endpoint_list().join(",")
    }

    pub fn endpoint_list(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:{CLIENT_PORT}", m.addr))
            .collect()
    }

    /// Member addresses (for partitions).
    pub fn addrs(&self) -> Vec<Ipv4Addr> {
        self.members.iter().map(|m| m.addr).collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILLs member `i` (a crash: no clean shutdown).
    pub fn kill_member(&mut self, i: usize) {
        if let Some(pid) = self.members[i].pid.take() {
            self.lab.kill(pid);
            eprintln!("testkit: killed etcd {}", self.members[i].ns);
        }
    }

    /// Starts member `i` again on its data dir and waits until it is healthy (which needs a
    /// quorum including it).
    #[track_caller]
    pub fn restart_member(&mut self, i: usize) {
        self.kill_member(i);
        self.spawn(i);
        self.wait_all_healthy(START_TIMEOUT);
        eprintln!("testkit: restarted etcd {}", self.members[i].ns);
    }

    /// Whether member `i` answers `GET /health` with `"health":"true"` within about 3 s.
    /// etcd only says so when it has a leader and can serve a quorum read.
    pub fn member_healthy(&self, i: usize) -> bool {
        let addr = SocketAddr::from((self.members[i].addr, CLIENT_PORT));
        http_get(addr, "/health", Duration::from_secs(3))
            .map(|body| body.replace(' ', "").contains("\"health\":\"true\""))
            .unwrap_or(false)
    }

    /// Whether any live member reports healthy, i.e. the cluster has a quorum.
    pub fn healthy(&self) -> bool {
        (0..self.members.len()).any(|i| self.members[i].pid.is_some() && self.member_healthy(i))
    }
}

/// A minimal HTTP/1.0 GET with connect and read deadlines; returns the body.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if let Some(pid) = self.members[i].pid.take() {
                self.lab.kill(pid);
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails(8));
        }
    }
}
