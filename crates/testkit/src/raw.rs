//! Raw bytes over TCP, for bad-input tests: send exactly what the test says, read whatever
//! comes back within a timeout, and tell whether the peer closed.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
}

/// What a timed read saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReadOutcome {
    pub data: Vec<u8>,
    /// The peer closed (EOF or reset) before the timeout.
    pub closed: bool,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { stream })
    }

    /// Sends `bytes`; an error here usually means the peer already closed.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Reads exactly `n` bytes or fails after `timeout`.
    pub fn read_exact_timeout(&mut self, n: usize, timeout: Duration) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Reads until `timeout` passes, the peer closes, or `max` bytes arrived.
    pub fn read_for(&mut self, timeout: Duration, max: usize) -> ReadOutcome {
        let deadline = Instant::now() + timeout;
        let mut out = ReadOutcome::default();
        let mut buf = [0u8; 65536];
        while out.data.len() < max {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    out.closed = true;
                    break;
                }
                Ok(n) => out.data.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    out.closed = true;
                    break;
                }
            }
        }
        out
    }

    /// Reads (discarding) until the peer closes; true if it did within `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if self.read_for(left, usize::MAX).closed {
                return true;
            }
        }
    }

    /// Half-closes our sending side (the peer sees EOF mid-frame).
    pub fn shutdown_write(&self) -> std::io::Result<()> {
        self.stream.shutdown(Shutdown::Write)
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// Big-endian frame building for hand-made protocol messages.
#[derive(Debug, Default, Clone)]
pub struct Frame(pub Vec<u8>);

impl Frame {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn send_read_and_close_detection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 3];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
        });
        let mut c = RawConn::connect(addr).unwrap();
        c.send(&Frame::new().u16(0x0102).bytes(&[3]).build())
            .unwrap();
        assert_eq!(
            c.read_exact_timeout(3, Duration::from_secs(5)).unwrap(),
            [1, 2, 3]
        );
        assert!(c.wait_closed(Duration::from_secs(5)));
        t.join().unwrap();
    }
}
