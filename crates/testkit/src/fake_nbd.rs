//! An in-memory NBD server for testing the test tools themselves (the client and
//! `bw-loadgen`) without the real agent.
//!
//! It models a disk with a volatile cache: WRITE/TRIM/WRITE_ZEROES change what READ sees; only
//! FLUSH (or FUA) makes them durable. [`FakeNbd::crash_image`] returns what a power cut would
//! leave: the durable image, plus — if asked — a random subset of the unflushed blocks, which
//! the NBD contract also allows. Fixed newstyle, `OPT_GO`/`OPT_EXPORT_NAME`/`OPT_LIST`/
//! `OPT_ABORT`, simple replies in request order, one thread per connection.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::nbd::consts::*;
use crate::rng::SplitMix64;

struct Disk {
    /// What reads see.
    live: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
}

pub struct FakeNbd {
    addr: SocketAddr,
    export: String,
    disk: Arc<Mutex<Disk>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeNbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeNbd").field("addr", &self.addr).finish()
    }
}

impl FakeNbd {
    /// Serves a zeroed disk of `size` bytes as `export` on 127.0.0.1 (port 0).
    pub fn start(export: &str, size: usize) -> Self {
        Self::with_image(export, vec![0; size])
    }

    /// Serves `image` (live and durable) as `export`.
    pub fn with_image(export: &str, image: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let disk = Arc::new(Mutex::new(Disk {
            durable: image.clone(),
            live: image,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s, name) = (disk.clone(), stop.clone(), export.to_owned());
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let (d, s, name) = (d.clone(), s.clone(), name.clone());
                        std::thread::spawn(move || {
                            let _ = serve(sock, &name, &d, &s);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeNbd {
            addr,
            export: export.to_owned(),
            disk,
            stop,
            accept: Some(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.addr, self.export)
    }

    /// The image as reads see it now.
    pub fn live_image(&self) -> Vec<u8> {
        self.disk.lock().expect("lock").live.clone()
    }

    /// What a crash now would leave: the durable image, and with `keep_unflushed_seed`, each
    /// unflushed `block_size` block kept or dropped at random.
    pub fn crash_image(&self, block_size: usize, keep_unflushed_seed: Option<u64>) -> Vec<u8> {
        let d = self.disk.lock().expect("lock");
        let mut img = d.durable.clone();
        if let Some(seed) = keep_unflushed_seed {
            let mut rng = SplitMix64::new(seed);
            for (i, live) in d.live.chunks(block_size).enumerate() {
                let r = i * block_size..i * block_size + live.len();
                if img[r.clone()] != *live && rng.below(2) == 1 {
                    img[r].copy_from_slice(live);
                }
            }
        }
        img
    }
}

impl Drop for FakeNbd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn rd<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn opt_reply(w: &mut impl Write, opt: u32, typ: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::new();
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b)
}

const FAKE_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

fn serve(
    sock: TcpStream,
    export: &str,
    disk: &Mutex<Disk>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut w = sock.try_clone()?;
    let mut r = BufReader::new(sock);
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    let read_timeout =
        |r: &mut BufReader<TcpStream>| r.get_ref().set_read_timeout(Some(Duration::from_secs(30)));
    read_timeout(&mut r)?;
    let _client_flags = u32::from_be_bytes(rd::<4>(&mut r)?);
    let size = disk.lock().expect("lock").live.len() as u64;
    // Option haggling.
    loop {
        if u64::from_be_bytes(rd::<8>(&mut r)?) != IHAVEOPT {
            return Ok(());
        }
        let opt = u32::from_be_bytes(rd::<4>(&mut r)?);
        let len = u32::from_be_bytes(rd::<4>(&mut r)?);
        if len > 65536 {
            return Ok(());
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_GO | OPT_INFO => {
                let n = data
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4")));
                let name = data.get(4..4 + n as usize).unwrap_or_default();
                if name != export.as_bytes() {
                    opt_reply(&mut w, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&FAKE_FLAGS.to_be_bytes());
                opt_reply(&mut w, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, 32 << 20] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                opt_reply(&mut w, opt, REP_INFO, &bs)?;
                opt_reply(&mut w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break;
                }
            }
            OPT_EXPORT_NAME => {
                w.write_all(&size.to_be_bytes())?;
                w.write_all(&FAKE_FLAGS.to_be_bytes())?;
                break;
            }
            OPT_LIST => {
                let mut d = (export.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(export.as_bytes());
                opt_reply(&mut w, opt, REP_SERVER, &d)?;
                opt_reply(&mut w, opt, REP_ACK, &[])?;
            }
            OPT_ABORT => {
                opt_reply(&mut w, opt, REP_ACK, &[])?;
                return Ok(());
            }
            _ => opt_reply(&mut w, opt, REP_ERR_UNSUP, b"unsupported option")?,
        }
    }
    // Transmission.
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let hdr = rd::<28>(&mut r)?;
        if u32::from_be_bytes(hdr[0..4].try_into().expect("4")) != REQUEST_MAGIC {
            return Ok(());
        }
        let flags = u16::from_be_bytes([hdr[4], hdr[5]]);
        let cmd = u16::from_be_bytes([hdr[6], hdr[7]]);
        let handle = &hdr[8..16];
        let off = u64::from_be_bytes(hdr[16..24].try_into().expect("8"));
        let len = u32::from_be_bytes(hdr[24..28].try_into().expect("4"));
        let mut payload = Vec::new();
        if cmd == CMD_WRITE {
            if len > 32 << 20 {
                return Ok(());
            }
            payload = vec![0u8; len as usize];
            r.read_exact(&mut payload)?;
        }
        let in_range = off
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size);
        let range = off as usize..off as usize + len as usize;
        let mut data = Vec::new();
        let err = {
            let mut d = disk.lock().expect("lock");
            match cmd {
                CMD_DISC => return Ok(()),
                CMD_FLUSH => {
                    d.durable = d.live.clone();
                    0
                }
                _ if !in_range => EINVAL,
                CMD_READ => {
                    data = d.live[range].to_vec();
                    0
                }
                CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
                    if cmd == CMD_WRITE {
                        d.live[range.clone()].copy_from_slice(&payload);
                    } else {
                        d.live[range.clone()].fill(0);
                    }
                    if flags & CMD_FLAG_FUA != 0 {
                        let v = d.live[range.clone()].to_vec();
                        d.durable[range].copy_from_slice(&v);
                    }
                    0
                }
                _ => EINVAL,
            }
        };
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&err.to_be_bytes());
        b.extend_from_slice(handle);
        b.extend_from_slice(&data);
        w.write_all(&b)?;
    }
}
