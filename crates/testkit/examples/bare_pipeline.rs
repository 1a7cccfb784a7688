//! A replicated 1 MiB write's data movement and nothing else, as a reference for the
//! 2-replica benchmark: a client writes frames into a unix socket (as qemu or fio does to the
//! agent's NBD socket); the "attachment" reads each, writes it to its local file and sends
//! it over TCP to the "replica", which writes it to its file and acknowledges; the attachment
//! acknowledges the client. No protocol, no metadata, no async runtime, no checks, and one
//! frame at a time per stage (the agent overlaps its local and remote legs, so it can beat
//! the copy mode: this is a reference point, not an upper bound). Run by
//! `bench/cluster-bench.sh` (repl part) in the same namespaces and on the same file system as
//! the agents, next to the raw link (BENCHMARKS.md, session 6).
//!
//! Two modes:
//! - `copy`: `read`/`pwrite`/`writev` through user-space buffers, the agent's design (six
//!   kernel copies per replicated byte counting the client's and the replica's);
//! - `splice`: the bodies move socket → pipe → file and pipe → socket (`splice`, `tee`), the
//!   fewest copies Linux allows (three).
//!
//! ```text
//! bare_pipeline peer   --listen ADDR:PORT --file F --mode copy|splice --count N [--size B] [--span B]
//! bare_pipeline attach --peer ADDR:PORT   --file F --mode copy|splice --count N [--size B] [--span B] [--qd Q]
//! ```
//! `attach` prints one line: `mibs=… cpu_ms_per_mib=… secs=…` (CPU of this process only).
//! Every socket has a 30 s timeout, so a lost peer ends the run with an error, never a hang.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);
const HEADER: usize = 16;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Copy,
    Splice,
}

struct Args {
    role: String,
    addr: SocketAddr,
    file: String,
    mode: Mode,
    count: u64,
    size: usize,
    span: u64,
    qd: u64,
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let role = it.next().unwrap_or_default();
    let mut a = Args {
        role,
        addr: "127.0.0.1:0".parse().unwrap(),
        file: String::new(),
        mode: Mode::Copy,
        count: 0,
        size: 1 << 20,
        span: 512 << 20,
        qd: 8,
    };
    while let Some(k) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--listen" | "--peer" => {
                a.addr = v.parse().unwrap_or_else(|e| die(&format!("{v}: {e}")))
            }
            "--file" => a.file = v,
            "--mode" => {
                a.mode = match v.as_str() {
                    "copy" => Mode::Copy,
                    "splice" => Mode::Splice,
                    _ => die("--mode copy|splice"),
                }
            }
            "--count" => a.count = num(&v),
            "--size" => a.size = num(&v) as usize,
            "--span" => a.span = num(&v),
            "--qd" => a.qd = num(&v),
            _ => die(&format!("unknown option {k}")),
        }
    }
    if a.file.is_empty() || a.count == 0 || a.size == 0 || a.span < a.size as u64 {
        die("need --file, --count > 0, 0 < --size <= --span");
    }
    a
}

fn num(v: &str) -> u64 {
    v.parse()
        .unwrap_or_else(|_| die(&format!("{v}: not a number")))
}

fn die(msg: &str) -> ! {
    eprintln!("bare_pipeline: {msg}");
    std::process::exit(2)
}

fn check(r: libc::ssize_t, what: &str) -> io::Result<usize> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    if r == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{what}: end of stream"),
        ));
    }
    Ok(r as usize)
}

/// A pipe sized to hold one frame body, so a splice never waits for its own reader.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let p = unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // Best effort: without the larger size the loops below move the body in pieces.
        unsafe { libc::fcntl(p.w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        Ok(p)
    }
}

/// One `splice` of up to `n` bytes from `from` (a socket or pipe) into `to`, at output
/// offset `off` when `to` is a file (advanced by the kernel).
fn splice_some(
    from: RawFd,
    to: RawFd,
    off: Option<&mut i64>,
    n: usize,
    what: &str,
) -> io::Result<usize> {
    let out = off.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE;
    check(
        unsafe { libc::splice(from, std::ptr::null_mut(), to, out, n, flags) },
        what,
    )
}

/// `splice` exactly `n` bytes from pipe `from` into `to` (a file at `off`, or a socket).
fn splice_all(from: RawFd, to: RawFd, mut off: Option<i64>, mut n: usize) -> io::Result<()> {
    while n > 0 {
        n -= splice_some(from, to, off.as_mut(), n, "splice")?;
    }
    Ok(())
}

fn tee_all(from: RawFd, to: RawFd, mut n: usize) -> io::Result<()> {
    while n > 0 {
        let r = unsafe { libc::tee(from, to, n, 0) };
        n -= check(r, "tee")?;
    }
    Ok(())
}

fn header(id: u64, off: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(&id.to_le_bytes());
    h[8..].copy_from_slice(&off.to_le_bytes());
    h
}

fn parse_header(h: &[u8; HEADER]) -> (u64, u64) {
    (
        u64::from_le_bytes(h[..8].try_into().unwrap()),
        u64::from_le_bytes(h[8..].try_into().unwrap()),
    )
}

/// Receives one body of `size` bytes from `sock` into `file` at `off`.
fn receive_body(
    mode: Mode,
    sock: &mut impl Read,
    sock_fd: RawFd,
    file: &std::fs::File,
    off: u64,
    buf: &mut [u8],
    pipe: &Pipe,
) -> io::Result<()> {
    match mode {
        Mode::Copy => {
            sock.read_exact(buf)?;
            file.write_all_at(buf, off)
        }
        Mode::Splice => {
            let (mut left, mut at) = (buf.len(), off as i64);
            while left > 0 {
                let k = splice_some(sock_fd, pipe.w.as_raw_fd(), None, left, "splice socket")?;
                splice_all(pipe.r.as_raw_fd(), file.as_raw_fd(), Some(at), k)?;
                left -= k;
                at += k as i64;
            }
            Ok(())
        }
    }
}

fn open(path: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| die(&format!("{path}: {e}")))
}

fn peer(a: &Args) -> io::Result<()> {
    let l = TcpListener::bind(a.addr)?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let file = open(&a.file);
    let mut buf = vec![0u8; a.size];
    let pipe = Pipe::new(a.size)?;
    let fd = s.as_raw_fd();
    for _ in 0..a.count {
        let mut h = [0u8; HEADER];
        s.read_exact(&mut h)?;
        let (id, off) = parse_header(&h);
        receive_body(a.mode, &mut s, fd, &file, off, &mut buf, &pipe)?;
        s.write_all(&id.to_le_bytes())?;
    }
    Ok(())
}

fn attach(a: &Args) -> io::Result<()> {
    let (mut client, agent) = UnixStream::pair()?;
    for s in [&client, &agent] {
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
    }
    let tcp = TcpStream::connect_timeout(&a.addr, TIMEOUT)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    tcp.set_write_timeout(Some(TIMEOUT))?;
    let file = open(&a.file);
    let (count, size, span, qd, mode) = (a.count, a.size, a.span, a.qd, a.mode);
    let slots = span / size as u64;
    let t0 = Instant::now();
    let cpu0 = cpu_ms();

    // the "client": keeps up to qd frames outstanding, as fio's nbd engine does
    let client_thread = std::thread::spawn(move || -> io::Result<()> {
        let body = vec![0x5au8; size];
        let (mut sent, mut acked) = (0u64, 0u64);
        while acked < count {
            if sent < count && sent - acked < qd {
                let off = (sent % slots) * size as u64;
                client.write_all(&header(sent, off))?;
                client.write_all(&body)?;
                sent += 1;
            } else {
                let mut ack = [0u8; 8];
                client.read_exact(&mut ack)?;
                acked += 1;
            }
        }
        Ok(())
    });
    // acknowledgements from the replica go back to the client in order
    let mut agent_w = agent.try_clone()?;
    let mut tcp_r = tcp.try_clone()?;
    let (tx, rx) = mpsc::channel::<()>();
    let acker = std::thread::spawn(move || -> io::Result<()> {
        for _ in 0..count {
            let mut ack = [0u8; 8];
            tcp_r.read_exact(&mut ack)?;
            rx.recv()
                .map_err(|_| io::Error::other("attachment thread gone"))?;
            agent_w.write_all(&ack)?;
        }
        Ok(())
    });
    // the "attachment": local write, then the send to the replica
    let mut agent_r = agent;
    let mut tcp_w = tcp;
    let (sock_fd, tcp_fd) = (agent_r.as_raw_fd(), tcp_w.as_raw_fd());
    let mut buf = vec![0u8; size];
    let (pa, pb) = (Pipe::new(size)?, Pipe::new(size)?);
    for _ in 0..count {
        let mut h = [0u8; HEADER];
        agent_r.read_exact(&mut h)?;
        let (_, off) = parse_header(&h);
        match mode {
            Mode::Copy => {
                agent_r.read_exact(&mut buf)?;
                file.write_all_at(&buf, off)?;
                tcp_w.write_all(&h)?;
                tcp_w.write_all(&buf)?;
            }
            Mode::Splice => {
                tcp_w.write_all(&h)?;
                let (mut left, mut at) = (size, off as i64);
                while left > 0 {
                    let k = splice_some(
                        sock_fd,
                        pa.w.as_raw_fd(),
                        None,
                        left,
                        "splice client socket",
                    )?;
                    tee_all(pa.r.as_raw_fd(), pb.w.as_raw_fd(), k)?;
                    splice_all(pa.r.as_raw_fd(), file.as_raw_fd(), Some(at), k)?;
                    splice_all(pb.r.as_raw_fd(), tcp_fd, None, k)?;
                    left -= k;
                    at += k as i64;
                }
            }
        }
        tx.send(())
            .map_err(|_| io::Error::other("acknowledgement thread gone"))?;
    }
    let join = |h: std::thread::JoinHandle<io::Result<()>>| {
        h.join()
            .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
    };
    join(acker)?;
    join(client_thread)?;
    let secs = t0.elapsed().as_secs_f64();
    let mib = (count * size as u64) as f64 / 1048576.0;
    println!(
        "mibs={:.1} cpu_ms_per_mib={:.3} secs={secs:.2}",
        mib / secs,
        (cpu_ms() - cpu0) / mib
    );
    Ok(())
}

fn cpu_ms() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1000.0 + tv.tv_usec as f64 / 1000.0;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() {
    let a = parse();
    let r = match a.role.as_str() {
        "peer" => peer(&a),
        "attach" => attach(&a),
        _ => die("usage: bare_pipeline peer|attach --file F --mode copy|splice --count N ..."),
    };
    if let Err(e) = r {
        die(&e.to_string());
    }
}
