//! Client requests in, client replies out.
//!
//! READ, WRITE and FLUSH map one to one onto core requests. TRIM and WRITE_ZEROES go
//! through the core's write path as writes of their range (the core only sees offset and
//! length; the payload remembers the original kind, which each replica is sent), split at
//! [`BULK_CHUNK_REGIONS`] boundaries because the core refuses requests spanning more
//! regions than its activity log holds. BLOCK_STATUS is answered by the local in-sync
//! replica when there is one, else as "all allocated" (always a correct answer).

use bw_types::{DataBuf, Extent, IoDone, IoError, IoReply, IoRequest};
use replication::{Completion, DataHandle, Event, ReplicaState, RequestError, RequestId};

use super::Driver;

/// Regions per chunk of a TRIM / WRITE_ZEROES (64 MiB at the default region size): far
/// below the core's activity-log size, large enough that a whole-disk discard is a few
/// thousand core requests.
pub const BULK_CHUNK_REGIONS: u64 = 64;

/// Chunks of one TRIM / WRITE_ZEROES in the core at once: the next starts when one
/// finishes, so a whole-disk discard never approaches the core's request limit.
pub const BULK_CHUNKS_IN_FLIGHT: usize = 4;

/// What a write-path request carries to the replicas.
pub(crate) enum Payload {
    /// Shared with every leg (a reference-count bump per replica, no copy).
    Write {
        data: DataBuf,
    },
    Trim,
    Zeroes {
        may_punch: bool,
    },
}

impl Payload {
    /// The request one replica is sent for `[offset, offset + len)`.
    pub fn request(&self, offset: u64, len: u64, fua: bool) -> IoRequest {
        match self {
            Payload::Write { data } => IoRequest::Write {
                offset,
                data: data.clone(),
                fua,
            },
            Payload::Trim => IoRequest::Trim { offset, len, fua },
            Payload::Zeroes { may_punch } => IoRequest::WriteZeroes {
                offset,
                len,
                may_punch: *may_punch,
                fua,
            },
        }
    }
}

pub(crate) enum ClientKind {
    Plain(IoDone),
    /// One chunk of the bulk request with this id.
    Chunk(u64),
}

pub(crate) struct Client {
    pub kind: ClientKind,
    /// The write payload to drop once answered.
    pub data: Option<DataHandle>,
}

/// A TRIM / WRITE_ZEROES being fed to the core chunk by chunk.
pub(crate) struct Bulk {
    pub done: Option<IoDone>,
    trim: bool,
    may_punch: bool,
    fua: bool,
    next: u64,
    end: u64,
    in_flight: usize,
    error: Option<IoError>,
}

fn map_error(e: RequestError) -> IoError {
    match e {
        RequestError::OutOfRange => IoError::OutOfRange,
        RequestError::TooLarge { .. } => IoError::Invalid(e.to_string()),
        RequestError::Stopped(_) => IoError::Faulted(e.to_string()),
        RequestError::DuplicateId | RequestError::Busy | RequestError::ReadFailed(_) => {
            IoError::Io(e.to_string())
        }
    }
}

impl Driver {
    fn new_request(&mut self, kind: ClientKind, data: Option<DataHandle>) -> RequestId {
        self.next_id += 1;
        let req = RequestId(self.next_id);
        self.clients.insert(req, Client { kind, data });
        req
    }

    fn new_payload(&mut self, p: Payload) -> DataHandle {
        self.next_id += 1;
        let h = DataHandle(self.next_id);
        self.payloads.insert(h, p);
        h
    }

    pub(super) fn client(&mut self, req: IoRequest, done: IoDone) {
        match req {
            IoRequest::Read { offset, len } => {
                let req = self.new_request(ClientKind::Plain(done), None);
                let len = len as u64;
                self.events.push_back(Event::Read { req, offset, len });
            }
            IoRequest::Write { offset, data, fua } => {
                let len = data.len() as u64;
                let data = self.new_payload(Payload::Write { data });
                let req = self.new_request(ClientKind::Plain(done), Some(data));
                self.events.push_back(Event::Write {
                    req,
                    offset,
                    len,
                    data,
                    fua,
                });
            }
            IoRequest::Flush => {
                let req = self.new_request(ClientKind::Plain(done), None);
                self.events.push_back(Event::Flush { req });
            }
            IoRequest::Trim { offset, len, fua } => {
                self.start_bulk(offset, len, (true, false, fua), done)
            }
            IoRequest::WriteZeroes {
                offset,
                len,
                may_punch,
                fua,
            } => self.start_bulk(offset, len, (false, may_punch, fua), done),
            IoRequest::BlockStatus { offset, len } => self.block_status(offset, len, done),
        }
    }

    fn start_bulk(
        &mut self,
        offset: u64,
        len: u64,
        (trim, may_punch, fua): (bool, bool, bool),
        done: IoDone,
    ) {
        let size = self.opts.core.volume_size_bytes;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return done(Err(IoError::OutOfRange));
        }
        if len == 0 {
            return done(Ok(IoReply::Done));
        }
        self.next_id += 1;
        let id = self.next_id;
        let bulk = Bulk {
            done: Some(done),
            trim,
            may_punch,
            fua,
            next: offset,
            end: offset + len,
            in_flight: 0,
            error: None,
        };
        self.bulks.insert(id, bulk);
        self.advance_bulk(id);
    }

    /// Feeds the next chunks of a bulk request, or answers it once every chunk finished.
    fn advance_bulk(&mut self, id: u64) {
        let chunk = BULK_CHUNK_REGIONS * self.opts.core.region_size_bytes;
        loop {
            let Some(b) = self.bulks.get_mut(&id) else {
                return;
            };
            if b.error.is_some() || b.next == b.end {
                if b.in_flight == 0 {
                    let b = self.bulks.remove(&id).expect("bulk");
                    let result = b.error.map_or(Ok(IoReply::Done), Err);
                    if let Some(done) = b.done {
                        done(result);
                    }
                }
                return;
            }
            if b.in_flight >= BULK_CHUNKS_IN_FLIGHT {
                return;
            }
            let offset = b.next;
            let end = ((offset / chunk + 1) * chunk).min(b.end);
            b.next = end;
            b.in_flight += 1;
            let (trim, may_punch, fua) = (b.trim, b.may_punch, b.fua);
            let payload = if trim {
                Payload::Trim
            } else {
                Payload::Zeroes { may_punch }
            };
            let data = self.new_payload(payload);
            let req = self.new_request(ClientKind::Chunk(id), Some(data));
            self.events.push_back(Event::Write {
                req,
                offset,
                len: end - offset,
                data,
                fua,
            });
        }
    }

    fn block_status(&mut self, offset: u64, len: u64, done: IoDone) {
        let size = self.opts.core.volume_size_bytes;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return done(Err(IoError::OutOfRange));
        }
        let all_allocated = move || {
            IoReply::Extents(vec![Extent {
                len,
                hole: false,
                zero: false,
            }])
        };
        let local = self.slots.iter().find_map(|(id, s)| {
            let link = s.link.as_ref().filter(|l| l.up)?;
            let in_sync = self.core.replica_state(*id) == Some(ReplicaState::InSync);
            (s.local && in_sync).then(|| link.leg.device())
        });
        match local {
            Some(dev) => dev.submit(
                IoRequest::BlockStatus { offset, len },
                Box::new(move |r| done(Ok(r.unwrap_or_else(|_| all_allocated())))),
            ),
            None => done(Ok(all_allocated())),
        }
    }

    pub(super) fn reply(&mut self, req: RequestId, result: Result<Completion, RequestError>) {
        let Some(c) = self.clients.remove(&req) else {
            return;
        };
        if let Some(h) = c.data {
            self.payloads.remove(&h);
        }
        let result = match result {
            Ok(Completion::Written | Completion::Flushed) => Ok(IoReply::Done),
            Ok(Completion::Data(h)) => {
                Ok(IoReply::Data(self.read_data.remove(&h).unwrap_or_default()))
            }
            Err(e) => Err(map_error(e)),
        };
        match c.kind {
            ClientKind::Plain(done) => done(result),
            ClientKind::Chunk(id) => {
                if let Some(b) = self.bulks.get_mut(&id) {
                    b.in_flight -= 1;
                    if let Err(e) = result {
                        b.error.get_or_insert(e);
                    }
                    self.advance_bulk(id);
                }
            }
        }
    }
}
