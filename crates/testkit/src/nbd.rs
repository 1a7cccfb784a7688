//! A minimal synchronous NBD client for tests and `bw-loadgen`.
//!
//! Written from the protocol document (NetworkBlockDevice/nbd `doc/proto.md`), deliberately
//! independent of our `nbd-proto` crate so a misreading of the spec does not hide in both
//! sides. Scope: fixed-newstyle handshake, `OPT_GO` (with a `BLOCK_SIZE` info request),
//! `OPT_LIST`, simple replies only (no structured replies are negotiated), and the commands
//! READ, WRITE (optionally FUA), FLUSH, TRIM, WRITE_ZEROES and DISC. Requests can be pipelined:
//! [`NbdClient::submit`] returns a handle, [`NbdClient::receive`] returns whichever reply comes
//! next, in any order.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Protocol constants (values from the NBD protocol document).
pub mod consts {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    // Handshake flags (server) and client flags.
    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

    // Options.
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    // Option reply types.
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_FLAG_ERROR: u32 = 1 << 31;
    pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
    pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
    pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
    pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
    pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
    pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
    pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
    pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
    pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

    // Info types.
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    // Transmission flags.
    pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const FLAG_READ_ONLY: u16 = 1 << 1;
    pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const FLAG_SEND_FUA: u16 = 1 << 3;
    pub const FLAG_ROTATIONAL: u16 = 1 << 4;
    pub const FLAG_SEND_TRIM: u16 = 1 << 5;
    pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const FLAG_SEND_DF: u16 = 1 << 7;
    pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

    // Commands.
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;

    // Command flags.
    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

    // Error values.
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

use consts::*;

/// The largest option reply or read payload this client accepts (a bigger one is a bug).
pub const MAX_PAYLOAD: u32 = 64 << 20;

#[derive(Debug)]
pub enum ClientError {
    /// The transport failed (includes the server closing the connection).
    Io(std::io::Error),
    /// The server answered a request with a nonzero NBD error.
    Nbd { errno: u32, handle: u64 },
    /// The server refused an option (`NBD_REP_ERR_*`), with its message.
    OptionRejected {
        option: u32,
        reply: u32,
        message: String,
    },
    /// The server broke the protocol.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "NBD transport: {e}"),
            ClientError::Nbd { errno, handle } => {
                write!(
                    f,
                    "NBD error {} ({errno}) for handle {handle}",
                    errno_name(*errno)
                )
            }
            ClientError::OptionRejected {
                option,
                reply,
                message,
            } => write!(
                f,
                "option {option} rejected with reply {:#x}: {message}",
                reply
            ),
            ClientError::Protocol(m) => write!(f, "NBD protocol violation: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl ClientError {
    /// The NBD errno, if the server replied with one.
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Nbd { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

pub fn errno_name(e: u32) -> &'static str {
    match e {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "E?",
    }
}

/// What `OPT_GO` told us about the export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) if the server sent `NBD_INFO_BLOCK_SIZE`.
    pub block_size: Option<(u32, u32, u32)>,
}

/// One reply, as it came off the wire.
#[derive(Debug)]
pub struct Reply {
    pub handle: u64,
    /// The command this handle was submitted with.
    pub command: u16,
    pub error: u32,
    /// Payload of a successful READ; empty otherwise.
    pub data: Vec<u8>,
}

pub struct NbdClient {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: Box<dyn Write + Send>,
    export: ExportInfo,
    next_handle: u64,
    /// handle → (command, length) of every request without a reply yet.
    in_flight: HashMap<u64, (u16, u32)>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.export)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

/// Default read/write timeout on the socket: a hung server fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Splits `nbd://host:port/name` (port defaults to 10809) into (`host:port`, name).
pub fn parse_uri(uri: &str) -> Result<(String, String)> {
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| ClientError::Protocol(format!("not an nbd:// URI: {uri}")))?;
    let (hostport, name) = rest.split_once('/').unwrap_or((rest, ""));
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:10809")
    };
    Ok((hostport, name.to_owned()))
}

fn tcp(addr: impl ToSocketAddrs) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

impl NbdClient {
    /// Connects to `nbd://host:port/export`.
    pub fn connect_uri(uri: &str) -> Result<Self> {
        let (addr, name) = parse_uri(uri)?;
        Self::connect_tcp(addr.as_str(), &name)
    }

    pub fn connect_tcp(addr: impl ToSocketAddrs, export: &str) -> Result<Self> {
        let s = tcp(addr)?;
        let r = s.try_clone()?;
        Self::handshake(Box::new(r), Box::new(s), export)
    }

    pub fn connect_unix(path: &Path, export: &str) -> Result<Self> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let r = s.try_clone()?;
        Self::handshake(Box::new(r), Box::new(s), export)
    }

    fn handshake(r: Box<dyn Read + Send>, w: Box<dyn Write + Send>, export: &str) -> Result<Self> {
        let mut c = NbdClient {
            reader: BufReader::new(r),
            writer: w,
            export: ExportInfo::default(),
            next_handle: 1,
            in_flight: HashMap::new(),
        };
        c.greeting()?;
        c.export = c.opt_go(export)?;
        Ok(c)
    }

    /// Reads the server greeting and sends our client flags.
    fn greeting(&mut self) -> Result<()> {
        let magic = self.read_u64()?;
        let opt = self.read_u64()?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(ClientError::Protocol(format!(
                "bad greeting {magic:#x} {opt:#x} (oldstyle server?)"
            )));
        }
        let flags = self.read_u16()?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol("server is not fixed-newstyle".into()));
        }
        // We never set NO_ZEROES: we only use OPT_GO, where the 124 zeroes are never sent.
        self.writer
            .write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes())?;
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.writer.write_all(&b)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Reads one option reply: (reply type, payload).
    fn read_option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let magic = self.read_u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(ClientError::Protocol(format!(
                "bad option reply magic {magic:#x}"
            )));
        }
        let opt = self.read_u32()?;
        if opt != option {
            return Err(ClientError::Protocol(format!(
                "reply for option {opt}, expected {option}"
            )));
        }
        let typ = self.read_u32()?;
        let len = self.read_u32()?;
        if len > MAX_PAYLOAD {
            return Err(ClientError::Protocol(format!(
                "option reply of {len} bytes"
            )));
        }
        let mut data = vec![0; len as usize];
        self.reader.read_exact(&mut data)?;
        if typ & REP_FLAG_ERROR != 0 {
            return Err(ClientError::OptionRejected {
                option,
                reply: typ,
                message: String::from_utf8_lossy(&data).into_owned(),
            });
        }
        Ok((typ, data))
    }

    fn opt_go(&mut self, export: &str) -> Result<ExportInfo> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &d)?;
        let mut info = ExportInfo::default();
        let mut saw_export = false;
        loop {
            let (typ, data) = self.read_option_reply(OPT_GO)?;
            match typ {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 => {
                    let it = u16::from_be_bytes([data[0], data[1]]);
                    match it {
                        INFO_EXPORT if data.len() == 12 => {
                            info.size = be64(&data[2..10]);
                            info.flags = u16::from_be_bytes([data[10], data[11]]);
                            saw_export = true;
                        }
                        INFO_BLOCK_SIZE if data.len() == 14 => {
                            info.block_size =
                                Some((be32(&data[2..6]), be32(&data[6..10]), be32(&data[10..14])));
                        }
                        INFO_EXPORT | INFO_BLOCK_SIZE => {
                            return Err(ClientError::Protocol(format!(
                                "info {it} with {} bytes",
                                data.len()
                            )))
                        }
                        _ => {}
                    }
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected reply {other} to OPT_GO"
                    )))
                }
            }
        }
        if !saw_export {
            return Err(ClientError::Protocol(
                "OPT_GO acked without NBD_INFO_EXPORT".into(),
            ));
        }
        Ok(info)
    }

    /// `OPT_LIST` on a fresh connection: the export names, then `OPT_ABORT`.
    pub fn list_exports(addr: impl ToSocketAddrs) -> Result<Vec<String>> {
        let s = tcp(addr)?;
        let r = s.try_clone()?;
        let mut c = NbdClient {
            reader: BufReader::new(Box::new(r)),
            writer: Box::new(s),
            export: ExportInfo::default(),
            next_handle: 1,
            in_flight: HashMap::new(),
        };
        c.greeting()?;
        c.send_option(OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let (typ, data) = c.read_option_reply(OPT_LIST)?;
            match typ {
                REP_ACK => break,
                REP_SERVER if data.len() >= 4 => {
                    let n = be32(&data[..4]) as usize;
                    let name = data.get(4..4 + n).ok_or_else(|| {
                        ClientError::Protocol("REP_SERVER name longer than reply".into())
                    })?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected reply {other} to OPT_LIST"
                    )))
                }
            }
        }
        c.send_option(OPT_ABORT, &[])?;
        // The server may ack the abort or just close; either is fine.
        let _ = c.read_option_reply(OPT_ABORT);
        Ok(names)
    }

    pub fn export(&self) -> &ExportInfo {
        &self.export
    }

    pub fn size(&self) -> u64 {
        self.export.size
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends one request without waiting for its reply. `data` is the WRITE payload (its
    /// length must equal `len`) and empty for every other command.
    pub fn submit(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.send_request(command, flags, handle, offset, len, data)?;
        self.in_flight.insert(handle, (command, len));
        Ok(handle)
    }

    /// Sends raw request fields (any command number, any length) without bookkeeping
    /// checks on `data`; used by bad-input tests.
    pub fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<()> {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.writer.write_all(&b)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Registers a handle sent with [`send_request`](Self::send_request) so its reply parses.
    pub fn expect_reply(&mut self, handle: u64, command: u16, len: u32) {
        self.in_flight.insert(handle, (command, len));
    }

    /// Receives the next reply, whichever request it answers.
    pub fn receive(&mut self) -> Result<Reply> {
        let magic = self.read_u32()?;
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(ClientError::Protocol(
                "structured reply, but none were negotiated".into(),
            ));
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol(format!("bad reply magic {magic:#x}")));
        }
        let error = self.read_u32()?;
        let handle = self.read_u64()?;
        let (command, len) = self
            .in_flight
            .remove(&handle)
            .ok_or_else(|| ClientError::Protocol(format!("reply for unknown handle {handle}")))?;
        let mut data = Vec::new();
        // A simple reply to a failed READ carries no payload.
        if command == CMD_READ && error == 0 {
            data = vec![0; len as usize];
            self.reader.read_exact(&mut data)?;
        }
        Ok(Reply {
            handle,
            command,
            error,
            data,
        })
    }

    /// Submits one request and waits for its reply (no other requests may be in flight).
    fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        assert!(self.in_flight.is_empty(), "call() with requests in flight");
        let h = self.submit(command, flags, offset, len, data)?;
        let r = self.receive()?;
        if r.handle != h {
            return Err(ClientError::Protocol(format!(
                "reply for {} instead of {h}",
                r.handle
            )));
        }
        if r.error != 0 {
            return Err(ClientError::Nbd {
                errno: r.error,
                handle: h,
            });
        }
        Ok(r.data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.call(CMD_READ, 0, offset, len, &[])
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.call(CMD_WRITE, flags, offset, data.len() as u32, data)
            .map(drop)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.call(CMD_FLUSH, 0, 0, 0, &[]).map(drop)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        self.call(CMD_TRIM, 0, offset, len, &[]).map(drop)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, no_hole: bool) -> Result<()> {
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.call(CMD_WRITE_ZEROES, flags, offset, len, &[])
            .map(drop)
    }

    /// Sends `NBD_CMD_DISC` and closes (the server sends no reply).
    pub fn disconnect(mut self) -> Result<()> {
        self.send_request(CMD_DISC, 0, 0, 0, 0, &[])
    }

    fn read_u16(&mut self) -> Result<u16> {
        let mut b = [0; 2];
        self.reader.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn read_u32(&mut self) -> Result<u32> {
        let mut b = [0; 4];
        self.reader.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        self.reader.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests;
