//! A throwaway etcd for tests: one member or a cluster on loopback, killed and removed on
//! drop (also when the test panics). Only the processes it started are ever signalled.
//!
//! Members keep etcd's defaults (fsync on, 100 ms heartbeat, 1 s election timeout): timing
//! tests (lease expiry, elections, quorum loss) then measure what production sees, and on
//! this machine a single-member write still takes ~1 ms, so fsync costs the suite little.
//! A test killed with SIGKILL cannot run `Drop`; its members then linger until killed by
//! hand (`pgrep -f bw-etcd-test`), which is why every data dir carries that marker.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::etcd::transport::{Retry, Transport};

/// Time a fresh member or cluster gets to elect a leader and answer.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline of one readiness or status probe.
const PROBE: Duration = Duration::from_secs(1);

/// Whether tests may run against etcd. Without the binary, prints a loud skip notice and
/// returns false, except under CI (`CI` set), where a missing etcd is a failure.
pub fn etcd_or_skip(test: &str) -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: etcd is not installed, and CI must run the etcd tests");
        }
        eprintln!("\n!!!!!!!! SKIPPED: etcd not installed: {test} did not run !!!!!!!!\n");
    }
    found
}

struct Member {
    name: String,
    client_url: String,
    child: Option<Child>,
}

/// One etcd member or a cluster, started by this process.
pub struct EtcdProcess {
    members: Vec<Member>,
    dir: PathBuf,
}

fn free_port() -> u16 {
    // The port is free when the listener drops; etcd binds it right after. A collision
    // with another process in that window makes the start fail loudly, never silently.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

impl EtcdProcess {
    /// One member, ready to serve.
    pub async fn start_single() -> EtcdProcess {
        EtcdProcess::start_cluster(1).await
    }

    /// `n` members forming one cluster, with a leader elected.
    pub async fn start_cluster(n: usize) -> EtcdProcess {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("bw-etcd-test-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the etcd test directory");
        let peers: Vec<(String, String, String)> = (0..n)
            .map(|i| {
                let client = format!("http://127.0.0.1:{}", free_port());
                let peer = format!("http://127.0.0.1:{}", free_port());
                (format!("m{i}"), client, peer)
            })
            .collect();
        let initial: Vec<String> = peers.iter().map(|(m, _, p)| format!("{m}={p}")).collect();
        let mut etcd = EtcdProcess {
            members: Vec::new(),
            dir,
        };
        for (name, client, peer) in &peers {
            let log =
                std::fs::File::create(etcd.dir.join(format!("{name}.log"))).expect("log file");
            let child = Command::new("etcd")
                .args(["--name", name])
                .arg("--data-dir")
                .arg(etcd.dir.join(name))
                .args([
                    "--listen-client-urls",
                    client,
                    "--advertise-client-urls",
                    client,
                ])
                .args([
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("bw-test-{tag}")])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn etcd");
            etcd.members.push(Member {
                name: name.clone(),
                client_url: client.clone(),
                child: Some(child),
            });
        }
        etcd.wait_ready().await;
        etcd
    }

    /// Waits until every live member answers a linearizable read (so a leader exists).
    async fn wait_ready(&mut self) {
        let started = Instant::now();
        for i in 0..self.members.len() {
            let t = Transport::new(
                std::slice::from_ref(&self.members[i].client_url),
                PROBE,
                PROBE,
            )
            .expect("loopback URL");
            loop {
                let probe = serde_json::json!({ "key": "AA==" });
                let r = t
                    .call::<serde_json::Value>("/v3/kv/range", &probe, Retry::Always)
                    .await;
                if r.is_ok() {
                    break;
                }
                if let Some(Ok(Some(status))) = self.members[i].child.as_mut().map(Child::try_wait)
                {
                    panic!(
                        "etcd {} exited with {status}; see {}",
                        self.members[i].name,
                        self.log(i)
                    );
                }
                if started.elapsed() > START_TIMEOUT {
                    panic!(
                        "etcd {} not ready in {START_TIMEOUT:?}: {r:?}; see {}",
                        self.members[i].name,
                        self.log(i)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn log(&self, i: usize) -> String {
        self.dir
            .join(format!("{}.log", self.members[i].name))
            .display()
            .to_string()
    }

    /// Client URLs of all members (killed ones included: clients must cope).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// SIGKILLs member `i` (a crash: no clean shutdown) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The index of the member that currently leads, if the members agree on one.
    pub async fn leader(&self) -> Option<usize> {
        let mut leader_id = None;
        let mut ids = Vec::new();
        for m in &self.members {
            let t = Transport::new(std::slice::from_ref(&m.client_url), PROBE, PROBE).ok()?;
            let st = t
                .call::<serde_json::Value>(
                    "/v3/maintenance/status",
                    &serde_json::json!({}),
                    Retry::Always,
                )
                .await;
            let st = st.ok();
            let field = |v: &Option<serde_json::Value>, f: &str| {
                v.as_ref()
                    .and_then(|v| v.pointer(f))
                    .and_then(|x| x.as_str())
                    .map(str::to_owned)
            };
            ids.push(field(&st, "/header/member_id"));
            if let Some(l) = field(&st, "/leader") {
                leader_id = Some(l);
            }
        }
        let leader_id = leader_id?;
        ids.iter()
            .position(|id| id.as_deref() == Some(leader_id.as_str()))
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
