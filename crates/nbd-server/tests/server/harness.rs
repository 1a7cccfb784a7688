//! An in-process server on port 0 over test exports, and a raw-protocol client built on
//! `nbd_proto::client`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bw_types::{BlockDevice, IoMetrics};
use nbd_proto::client::{self as c, OptionReply, Reply};
use nbd_proto::consts::*;
use nbd_proto::{Parsed, RequestHeader};
use nbd_server::{serve_tcp, ExportInfo, Exports, OpenError, OpenExport, ServerStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Every wait in these tests is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Vol {
    pub device: Arc<dyn BlockDevice>,
    pub metrics: Arc<IoMetrics>,
    pub kill: watch::Sender<bool>,
    /// Who holds the volume (set by `open` when exclusive).
    pub holder: Arc<Mutex<Option<String>>>,
    pub exclusive: bool,
    /// Guards alive.
    pub open_guards: Arc<AtomicU64>,
}

#[derive(Default)]
pub struct TestExports {
    pub vols: Mutex<BTreeMap<String, Arc<Vol>>>,
    next_conn: AtomicU64,
}

impl TestExports {
    pub fn add(&self, name: &str, device: Arc<dyn BlockDevice>, exclusive: bool) -> Arc<Vol> {
        let vol = Arc::new(Vol {
            device,
            metrics: Arc::new(IoMetrics::new()),
            kill: watch::channel(false).0,
            holder: Arc::default(),
            exclusive,
            open_guards: Arc::default(),
        });
        self.vols
            .lock()
            .unwrap()
            .insert(name.into(), Arc::clone(&vol));
        vol
    }

    fn get(&self, name: &str) -> Result<Arc<Vol>, OpenError> {
        let vols = self.vols.lock().unwrap();
        vols.get(name)
            .cloned()
            .ok_or_else(|| OpenError::Unknown(format!("no volume named {name:?}")))
    }
}

struct Guard {
    holder: Option<Arc<Mutex<Option<String>>>>,
    open: Arc<AtomicU64>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(h) = &self.holder {
            *h.lock().unwrap() = None;
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Exports for TestExports {
    fn list(&self) -> Vec<ExportInfo> {
        let vols = self.vols.lock().unwrap();
        vols.iter()
            .map(|(n, v)| ExportInfo {
                name: n.clone(),
                size_bytes: v.device.size_bytes(),
                description: format!("test volume {n}"),
            })
            .collect()
    }

    fn info(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let v = self.get(name)?;
        Ok(ExportInfo {
            name: name.into(),
            size_bytes: v.device.size_bytes(),
            description: format!("test volume {name}"),
        })
    }

    fn open(&self, name: &str) -> Result<OpenExport, OpenError> {
        let info = self.info(name)?;
        let v = self.get(name)?;
        let mut holder = None;
        if v.exclusive {
            let mut h = v.holder.lock().unwrap();
            if let Some(who) = h.as_ref() {
                return Err(OpenError::InUse(format!(
                    "volume {name:?} is in use by {who}"
                )));
            }
            *h = Some(format!(
                "conn-{}",
                self.next_conn.fetch_add(1, Ordering::SeqCst)
            ));
            holder = Some(Arc::clone(&v.holder));
        }
        v.open_guards.fetch_add(1, Ordering::SeqCst);
        Ok(OpenExport {
            info,
            device: Arc::clone(&v.device),
            metrics: Arc::clone(&v.metrics),
            guard: Box::new(Guard {
                holder,
                open: Arc::clone(&v.open_guards),
            }),
            kill: v.kill.subscribe(),
        })
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub exports: Arc<TestExports>,
    pub stats: Arc<ServerStats>,
    pub shutdown: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(exports: TestExports) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = Arc::new(exports);
        let stats = Arc::new(ServerStats::new());
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(serve_tcp(listener, exports.clone(), stats.clone(), rx));
        TestServer {
            addr,
            exports,
            stats,
            shutdown,
            task,
        }
    }

    /// One 1 MiB MemDevice volume named "vol".
    pub async fn with_mem() -> TestServer {
        let exports = TestExports::default();
        exports.add("vol", crate::devices::MemDevice::new(1 << 20), false);
        TestServer::start(exports).await
    }

    pub fn stat(&self, f: impl Fn(&ServerStats) -> &AtomicU64) -> u64 {
        f(&self.stats).load(Ordering::SeqCst)
    }
}

/// Polls `cond` until it holds or [`DEADLINE`] passes.
pub async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub struct Client {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Connects, checks the greeting, sends `flags`.
    pub async fn greet(addr: SocketAddr, flags: u32) -> Client {
        let mut cl = Client::connect(addr).await;
        let g = cl.recv(c::parse_greeting).await;
        assert_eq!(g.handshake_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut out = Vec::new();
        c::encode_client_flags(&mut out, flags);
        cl.send(&out).await;
        cl
    }

    /// Handshake through GO; returns (size, transmission flags).
    pub async fn open(
        addr: SocketAddr,
        name: &str,
        structured: bool,
        meta: bool,
    ) -> (Client, u64, u16) {
        let mut cl = Client::greet(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        if structured {
            cl.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(cl.final_reply().await.reply_type, REP_ACK);
        }
        if meta {
            let mut out = Vec::new();
            c::encode_meta_option(
                &mut out,
                OPT_SET_META_CONTEXT,
                name,
                &[META_BASE_ALLOCATION],
            );
            cl.send(&out).await;
            let r = cl.option_replies().await;
            assert_eq!(r.last().unwrap().reply_type, REP_ACK);
        }
        let mut out = Vec::new();
        c::encode_info_option(&mut out, OPT_GO, name, &[]);
        cl.send(&out).await;
        let replies = cl.option_replies().await;
        assert_eq!(
            replies.last().unwrap().reply_type,
            REP_ACK,
            "GO failed: {replies:?}"
        );
        let export = replies
            .iter()
            .find(|r| r.reply_type == REP_INFO && r.data[..2] == [0, 0])
            .unwrap();
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (cl, size, flags)
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    pub async fn option(&mut self, code: u32, data: &[u8]) {
        let mut out = Vec::new();
        c::encode_option(&mut out, code, data);
        self.send(&out).await;
    }

    /// Option replies up to and including the final one (ACK or an error).
    pub async fn option_replies(&mut self) -> Vec<OptionReply> {
        let mut all = Vec::new();
        loop {
            let r = self.recv(c::parse_option_reply).await;
            let done = r.reply_type == REP_ACK || is_rep_error(r.reply_type);
            all.push(r);
            if done {
                return all;
            }
        }
    }

    pub async fn final_reply(&mut self) -> OptionReply {
        self.option_replies().await.pop().unwrap()
    }

    pub async fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut out = Vec::with_capacity(28 + payload.len());
        RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode(&mut out);
        out.extend_from_slice(payload);
        self.send(&out).await;
    }

    pub async fn reply(&mut self) -> Reply {
        self.recv(c::parse_reply).await
    }

    /// `n` raw bytes (the data after a simple READ reply).
    pub async fn data(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill().await;
        }
        self.buf.drain(..n).collect()
    }

    pub async fn recv<T>(&mut self, parse: impl Fn(&[u8]) -> Parsed<T>) -> T {
        loop {
            if let Some((m, n)) = parse(&self.buf).unwrap() {
                self.buf.drain(..n);
                return m;
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) {
        let mut tmp = vec![0u8; 1 << 20];
        let n = tokio::time::timeout(DEADLINE, self.s.read(&mut tmp))
            .await
            .expect("server answer")
            .unwrap();
        assert!(n > 0, "server closed the connection");
        self.buf.extend_from_slice(&tmp[..n]);
    }

    /// Asserts the server closes the connection (EOF or reset) without sending more.
    pub async fn expect_closed(&mut self) {
        let mut tmp = [0u8; 4096];
        match tokio::time::timeout(DEADLINE, self.s.read(&mut tmp))
            .await
            .expect("server closes")
        {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!(
                "expected close, got {n} more bytes: {:?}",
                &tmp[..n.min(64)]
            ),
        }
    }
}

/// The error of a reply (simple error field or structured ERROR chunk), 0 on success.
pub fn reply_error(r: &Reply) -> u32 {
    match r {
        Reply::Simple { error, .. } => *error,
        Reply::Chunk { kind, payload, .. } if *kind == REPLY_TYPE_ERROR => {
            u32::from_be_bytes(payload[..4].try_into().unwrap())
        }
        Reply::Chunk { .. } => 0,
    }
}

pub fn reply_cookie(r: &Reply) -> u64 {
    match r {
        Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
    }
}

/// The message of a structured ERROR chunk.
pub fn error_message(r: &Reply) -> String {
    match r {
        Reply::Chunk { kind, payload, .. } if *kind == REPLY_TYPE_ERROR => {
            let n = u16::from_be_bytes([payload[4], payload[5]]) as usize;
            String::from_utf8(payload[6..6 + n].to_vec()).unwrap()
        }
        other => panic!("not an error chunk: {other:?}"),
    }
}
