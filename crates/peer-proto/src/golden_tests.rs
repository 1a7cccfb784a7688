//! Golden bytes: the peer protocol on the wire, pinned forever. A failure here means the
//! wire format changed; that needs a new protocol version and an entry in the version
//! history (lib.rs, docs/design/peer-protocol.md), never an edit of these constants.

use bw_types::{Extent, Generation, NodeId, VolumeId};

use crate::consts::*;
use crate::frame::*;
use crate::handshake::*;
use crate::reply::*;

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn hello_v1() -> Hello {
    Hello {
        min_version: 1,
        max_version: 1,
        generation: Generation(5),
        features: 0,
        node_id: NodeId("n1".into()),
        volume_id: VolumeId("v1".into()),
        session: 0,
    }
}

// Goal: the v1 hello, byte for byte, and that it parses back.
#[test]
fn hello_v1_bytes() {
    let mut out = Vec::new();
    encode_hello(&mut out, &hello_v1());
    let want = hex("425750454552430a 0001 0001 00000018
         0000000000000005 0000000000000000 0002 6e31 0002 7631");
    assert_eq!(out, want);
    assert_eq!(parse_hello(&want), Ok(Some((hello_v1(), want.len()))));
}

// Goal: the v2 hello (versions 1..=2, session 3) appends the session after the ids, and a
// v1 parser's view of it (the tail skipped) is the v1 hello.
#[test]
fn hello_v2_bytes() {
    let h = Hello {
        max_version: 2,
        session: 3,
        ..hello_v1()
    };
    let mut out = Vec::new();
    encode_hello(&mut out, &h);
    let want = hex("425750454552430a 0001 0002 00000020
         0000000000000005 0000000000000000 0002 6e31 0002 7631 0000000000000003");
    assert_eq!(out, want);
    assert_eq!(parse_hello(&want), Ok(Some((h, want.len()))));
}

#[test]
fn accept_v1_bytes() {
    let a = Accept {
        version: 1,
        size_bytes: 1 << 30,
        highest_generation: Generation(5),
        features: 0,
        max_io_bytes: 32 << 20,
        max_inflight_requests: 256,
        max_inflight_bytes: 128 << 20,
    };
    let mut out = Vec::new();
    encode_accept(&mut out, &a);
    let want = hex("425750454552530a 0001 0001 00000024
         0000000040000000 0000000000000005 0000000000000000 02000000 00000100 08000000");
    assert_eq!(out, want);
    assert_eq!(
        parse_server_answer(&want),
        Ok(Some((ServerAnswer::Accept(a), want.len())))
    );
}

#[test]
fn refuse_v1_bytes() {
    let r = Refuse {
        code: RefuseCode::StaleGeneration,
        server_min_version: 1,
        server_max_version: 1,
        highest_generation: Generation(7),
        message: "fenced".into(),
    };
    let mut out = Vec::new();
    encode_refuse(&mut out, &r);
    let want = hex("425750454552530a 0002 0001 00000016
         0002 0001 0001 0006 0000000000000007 66656e636564");
    assert_eq!(out, want);
    assert_eq!(
        parse_server_answer(&want),
        Ok(Some((ServerAnswer::Refuse(r), want.len())))
    );
}

// Goal: the numbers of the registry never move.
#[test]
fn registry_v1() {
    assert_eq!(HELLO_MAGIC, *b"BWPEERC\n");
    assert_eq!(SERVER_MAGIC, *b"BWPEERS\n");
    assert_eq!(FRAME_MAGIC.to_be_bytes(), *b"BWPF");
    assert_eq!(
        [
            MSG_READ,
            MSG_WRITE,
            MSG_FLUSH,
            MSG_TRIM,
            MSG_WRITE_ZEROES,
            MSG_BLOCK_STATUS,
            MSG_PING
        ],
        [1, 2, 3, 4, 5, 6, 7]
    );
    assert_eq!(
        [
            MSG_REPLY_OK,
            MSG_REPLY_DATA,
            MSG_REPLY_EXTENTS,
            MSG_REPLY_ERROR,
            MSG_REPLY_FENCED,
            MSG_REPLY_PONG
        ],
        [0x8001, 0x8002, 0x8003, 0x8004, 0x8005, 0x8006]
    );
    assert_eq!(
        (MSG_REPLICATION_FIRST, MSG_REPLICATION_LAST),
        (0x0100, 0x01ff)
    );
    // v2
    assert_eq!(
        (MSG_READ_META, MSG_WRITE_META, MSG_REPLY_META),
        (0x0100, 0x0101, 0x8007)
    );
    assert_eq!((FLAG_META_PRESENT, MAX_META_BYTES), (1, 16 << 20));
    assert_eq!(RefuseCode::StaleSession.to_wire(), 7);
    assert_eq!((PROTOCOL_VERSION, SESSION_VERSION), (2, 2));
    assert_eq!(
        (FLAG_FUA, FLAG_MAY_PUNCH, EXTENT_HOLE, EXTENT_ZERO),
        (1, 2, 1, 2)
    );
    let codes = [
        ErrorCode::Io,
        ErrorCode::NoSpace,
        ErrorCode::OutOfRange,
        ErrorCode::Invalid,
        ErrorCode::Faulted,
        ErrorCode::Unsupported,
        ErrorCode::ShuttingDown,
        ErrorCode::Protocol,
    ];
    assert_eq!(codes.map(ErrorCode::to_wire), [1, 2, 3, 4, 5, 6, 7, 8]);
    let refusals = [
        RefuseCode::UnknownVolume,
        RefuseCode::StaleGeneration,
        RefuseCode::VersionUnsupported,
        RefuseCode::Busy,
        RefuseCode::BadRequest,
        RefuseCode::Unavailable,
    ];
    assert_eq!(refusals.map(RefuseCode::to_wire), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        (FRAME_HEADER_LEN, MAX_BODY_LEN, MAX_EXTENTS),
        (36, 32 << 20, 1024)
    );
}

#[test]
fn write_request_bytes() {
    let req = Request::Write {
        offset: 0x1000,
        len: 0x200,
        fua: true,
    };
    let h = req.header(0x0102_0304_0506_0708);
    let want =
        hex("42575046 0002 0001 00000200 0102030405060708 0000000000001000 0000000000000200");
    assert_eq!(h.to_bytes().to_vec(), want);
    assert_eq!(parse_frame_header(&want), Ok(Some((h, FRAME_HEADER_LEN))));
    assert_eq!(Request::decode(&h), Ok(req));
}

#[test]
fn other_request_bytes() {
    let zeroes = Request::WriteZeroes {
        offset: 0x2000,
        len: 0x1_0000_0000,
        may_punch: true,
        fua: false,
    };
    assert_eq!(
        zeroes.header(2).to_bytes().to_vec(),
        hex("42575046 0005 0002 00000000 0000000000000002 0000000000002000 0000000100000000")
    );
    assert_eq!(
        Request::Read {
            offset: 512,
            len: 4096
        }
        .header(3)
        .to_bytes()
        .to_vec(),
        hex("42575046 0001 0000 00000000 0000000000000003 0000000000000200 0000000000001000")
    );
    assert_eq!(
        Request::Flush.header(4).to_bytes().to_vec(),
        hex("42575046 0003 0000 00000000 0000000000000004 0000000000000000 0000000000000000")
    );
}

#[test]
fn reply_bytes() {
    let mut out = Vec::new();
    encode_ok(&mut out, 1);
    encode_error(&mut out, 9, ErrorCode::Io, "x");
    encode_fenced(&mut out, 3, Generation(6), "f");
    encode_pong(&mut out, 4);
    let want = hex(
        "42575046 8001 0000 00000000 0000000000000001 0000000000000000 0000000000000000
         42575046 8004 0000 00000001 0000000000000009 0000000000000000 0000000000000001 78
         42575046 8005 0000 00000001 0000000000000003 0000000000000006 0000000000000000 66
         42575046 8006 0000 00000000 0000000000000004 0000000000000000 0000000000000000",
    );
    assert_eq!(out, want);
    assert_eq!(
        data_header(5, 4096).to_vec(),
        hex("42575046 8002 0000 00001000 0000000000000005 0000000000000000 0000000000000000")
    );
}

#[test]
fn extents_bytes() {
    let ext = [
        Extent {
            len: 4096,
            hole: false,
            zero: false,
        },
        Extent {
            len: 8192,
            hole: true,
            zero: true,
        },
    ];
    let mut out = Vec::new();
    encode_extents(&mut out, 1, &ext);
    let want = hex(
        "42575046 8003 0000 00000020 0000000000000001 0000000000000000 0000000000000000
         0000000000001000 00000000 00000000
         0000000000002000 00000003 00000000",
    );
    assert_eq!(out, want);
    let ((h, body), n) = parse_frame(&want).unwrap().unwrap();
    assert_eq!(n, want.len());
    assert_eq!(ReplyHead::decode(&h), Ok(ReplyHead::Extents { count: 2 }));
    assert_eq!(parse_extents(body).unwrap(), ext);
}

// Goal: the v2 metadata messages on the wire.
#[test]
fn meta_bytes_v2() {
    assert_eq!(
        Request::ReadMeta.header(5).to_bytes().to_vec(),
        hex("42575046 0100 0000 00000000 0000000000000005 0000000000000000 0000000000000000")
    );
    assert_eq!(
        Request::WriteMeta { len: 3 }.header(6).to_bytes().to_vec(),
        hex("42575046 0101 0000 00000003 0000000000000006 0000000000000000 0000000000000003")
    );
    assert_eq!(
        meta_header(5, Some(3)).to_vec(),
        hex("42575046 8007 0001 00000003 0000000000000005 0000000000000000 0000000000000000")
    );
    assert_eq!(
        meta_header(5, None).to_vec(),
        hex("42575046 8007 0000 00000000 0000000000000005 0000000000000000 0000000000000000")
    );
}
