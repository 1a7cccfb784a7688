//! Every malformed input the parsers can meet, and the incomplete-input contract: each
//! test feeds one kind of bad bytes and checks the exact error (or `Ok(None)`).

use bw_types::{Generation, IoError, NodeId, VolumeId};

use crate::consts::*;
use crate::error::ProtoError;
use crate::frame::*;
use crate::handshake::*;
use crate::reply::*;

fn hello_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    encode_hello(
        &mut out,
        &Hello {
            min_version: 1,
            max_version: 1,
            generation: Generation(5),
            features: 0,
            node_id: NodeId("node-a".into()),
            volume_id: VolumeId("vol".into()),
            session: 0,
        },
    );
    out
}

/// A hello with the given prefix fields and body, to build broken ones.
fn raw_hello(min: u16, max: u16, body: &[u8]) -> Vec<u8> {
    let mut out = HELLO_MAGIC.to_vec();
    out.extend_from_slice(&min.to_be_bytes());
    out.extend_from_slice(&max.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn v1_body(node: &[u8], vol: &[u8]) -> Vec<u8> {
    let mut b = 5u64.to_be_bytes().to_vec();
    b.extend_from_slice(&0u64.to_be_bytes());
    b.extend_from_slice(&(node.len() as u16).to_be_bytes());
    b.extend_from_slice(node);
    b.extend_from_slice(&(vol.len() as u16).to_be_bytes());
    b.extend_from_slice(vol);
    b
}

// Goal: every strict prefix of a valid hello is "incomplete", never an error.
#[test]
fn hello_prefixes_are_incomplete() {
    let b = hello_bytes();
    for n in 0..b.len() {
        assert_eq!(parse_hello(&b[..n]), Ok(None), "prefix of {n}");
    }
    assert!(parse_hello(&b).unwrap().is_some());
}

// Goal: garbage is refused at its first wrong byte, not after waiting for 16 bytes.
#[test]
fn hello_wrong_magic_fails_at_first_byte() {
    assert_eq!(parse_hello(b"G"), Err(ProtoError::BadHelloMagic));
    assert_eq!(
        parse_hello(b"GET / HTTP/1.1\r\n"),
        Err(ProtoError::BadHelloMagic)
    );
    assert_eq!(
        parse_hello(b"BWPEERS\n"),
        Err(ProtoError::BadHelloMagic),
        "a server answer"
    );
    let mut b = hello_bytes();
    b[7] = b'\r';
    assert_eq!(parse_hello(&b), Err(ProtoError::BadHelloMagic));
}

#[test]
fn hello_body_over_limit() {
    let mut b = HELLO_MAGIC.to_vec();
    b.extend_from_slice(&[0, 1, 0, 1]);
    b.extend_from_slice(&(MAX_HELLO_BODY_LEN + 1).to_be_bytes());
    assert!(matches!(
        parse_hello(&b),
        Err(ProtoError::TooLong {
            what: "hello body",
            ..
        })
    ));
}

#[test]
fn hello_empty_version_range() {
    let b = raw_hello(3, 2, &v1_body(b"n", b"v"));
    assert_eq!(
        parse_hello(&b),
        Err(ProtoError::BadVersionRange { min: 3, max: 2 })
    );
}

#[test]
fn hello_body_too_short() {
    for body in [&[][..], &[0u8; 15][..], &[0u8; 16][..], &[0u8; 17][..]] {
        let err = parse_hello(&raw_hello(1, 1, body)).unwrap_err();
        assert!(matches!(err, ProtoError::TooShort { .. }), "{err:?}");
    }
    // The node id claims more bytes than the body has.
    let mut body = v1_body(b"node", b"v");
    body.truncate(16 + 2 + 2);
    assert!(matches!(
        parse_hello(&raw_hello(1, 1, &body)),
        Err(ProtoError::TooShort { .. })
    ));
}

#[test]
fn hello_bad_ids() {
    assert_eq!(
        parse_hello(&raw_hello(1, 1, &v1_body(b"", b"v"))),
        Err(ProtoError::Empty { what: "node id" })
    );
    assert_eq!(
        parse_hello(&raw_hello(1, 1, &v1_body(b"n", b""))),
        Err(ProtoError::Empty { what: "volume id" })
    );
    let long = vec![b'a'; MAX_ID_LEN + 1];
    assert!(matches!(
        parse_hello(&raw_hello(1, 1, &v1_body(b"n", &long))),
        Err(ProtoError::TooLong {
            what: "volume id",
            ..
        })
    ));
    assert_eq!(
        parse_hello(&raw_hello(1, 1, &v1_body(b"\xff\xfe", b"v"))),
        Err(ProtoError::NotUtf8 { what: "node id" })
    );
}

// Goal: fields appended by a newer client are skipped, so v1 servers accept v2 hellos.
#[test]
fn hello_tail_from_newer_version_is_skipped() {
    let mut body = v1_body(b"n", b"v");
    body.extend_from_slice(b"future fields");
    let b = raw_hello(1, 7, &body);
    let (h, n) = parse_hello(&b).unwrap().unwrap();
    assert_eq!(n, b.len());
    assert_eq!((h.max_version, h.volume_id.0.as_str()), (7, "v"));
    assert_eq!(h.session, u64::from_be_bytes(*b"future f"), "v2 field read");
    assert_eq!(choose_version(1, 7), Some(PROTOCOL_VERSION));
    assert_eq!(
        choose_version(PROTOCOL_VERSION + 1, 7),
        None,
        "client too new"
    );
    assert_eq!(choose_version(0, 0), None, "client too old");
}

fn raw_answer(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = SERVER_MAGIC.to_vec();
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[test]
fn server_answer_malformed() {
    assert_eq!(
        parse_server_answer(b"BWPEERC\n"),
        Err(ProtoError::BadServerMagic)
    );
    assert_eq!(parse_server_answer(b"BWP"), Ok(None));
    assert_eq!(
        parse_server_answer(&raw_answer(9, &[])),
        Err(ProtoError::UnknownAnswer(9))
    );
    assert!(matches!(
        parse_server_answer(&raw_answer(ANSWER_ACCEPT, &[0; ACCEPT_V1_LEN - 1])),
        Err(ProtoError::TooShort {
            what: "accept body",
            ..
        })
    ));
    assert!(matches!(
        parse_server_answer(&raw_answer(ANSWER_REFUSE, &[0; REFUSE_V1_FIXED_LEN - 1])),
        Err(ProtoError::TooShort {
            what: "refuse body",
            ..
        })
    ));
    let mut head = SERVER_MAGIC.to_vec();
    head.extend_from_slice(&[0, 1, 0, 1]);
    head.extend_from_slice(&(MAX_SERVER_BODY_LEN + 1).to_be_bytes());
    assert!(matches!(
        parse_server_answer(&head),
        Err(ProtoError::TooLong { .. })
    ));
}

fn refuse_body(msg_len: u16, msg: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 2, 0, 1, 0, 1];
    b.extend_from_slice(&msg_len.to_be_bytes());
    b.extend_from_slice(&7u64.to_be_bytes());
    b.extend_from_slice(msg);
    b
}

#[test]
fn refuse_message_malformed() {
    let over = (MAX_MESSAGE_LEN + 1) as u16;
    assert!(matches!(
        parse_server_answer(&raw_answer(ANSWER_REFUSE, &refuse_body(over, &[]))),
        Err(ProtoError::TooLong { .. })
    ));
    assert!(matches!(
        parse_server_answer(&raw_answer(ANSWER_REFUSE, &refuse_body(5, b"abc"))),
        Err(ProtoError::TooShort { .. })
    ));
    assert_eq!(
        parse_server_answer(&raw_answer(ANSWER_REFUSE, &refuse_body(2, b"\xff\xff"))),
        Err(ProtoError::NotUtf8 {
            what: "refusal message"
        })
    );
    // An unknown refusal code from a newer server is kept, not an error.
    let mut body = refuse_body(0, &[]);
    body[1] = 99;
    let Ok(Some((ServerAnswer::Refuse(r), _))) =
        parse_server_answer(&raw_answer(ANSWER_REFUSE, &body))
    else {
        panic!("refusal expected");
    };
    assert_eq!(r.code, RefuseCode::Unknown(99));
}

// Goal: an over-long refusal message is cut on a character boundary, and parses.
#[test]
fn refuse_message_is_truncated() {
    let mut out = Vec::new();
    let r = Refuse {
        code: RefuseCode::BadRequest,
        server_min_version: 1,
        server_max_version: 1,
        highest_generation: Generation(0),
        message: "é".repeat(MAX_MESSAGE_LEN),
    };
    encode_refuse(&mut out, &r);
    let Ok(Some((ServerAnswer::Refuse(back), _))) = parse_server_answer(&out) else {
        panic!("refusal expected");
    };
    assert_eq!(back.message.len(), MAX_MESSAGE_LEN);
}

fn header(kind: u16, flags: u16, body_len: u32, id: u64, length: u64) -> FrameHeader {
    FrameHeader {
        kind,
        flags,
        body_len,
        id,
        offset: 0,
        length,
    }
}

#[test]
fn frame_header_prefixes_and_bad_magic() {
    let b = header(MSG_READ, 0, 0, 1, 512).to_bytes();
    for n in 0..FRAME_HEADER_LEN {
        assert_eq!(parse_frame_header(&b[..n]), Ok(None), "prefix of {n}");
    }
    assert_eq!(
        parse_frame_header(b"BX"),
        Err(ProtoError::BadFrameMagic(0x4258_0000))
    );
    let mut bad = b;
    bad[3] ^= 1;
    assert!(matches!(
        parse_frame_header(&bad),
        Err(ProtoError::BadFrameMagic(_))
    ));
}

// Goal: a body over the limit is fatal as soon as the header is complete.
#[test]
fn frame_body_over_limit() {
    let b = header(MSG_WRITE, 0, MAX_BODY_LEN + 1, 1, 0).to_bytes();
    assert!(matches!(
        parse_frame_header(&b),
        Err(ProtoError::TooLong {
            what: "frame body",
            ..
        })
    ));
    let ok = header(MSG_WRITE, 0, MAX_BODY_LEN, 1, MAX_BODY_LEN.into()).to_bytes();
    assert!(parse_frame_header(&ok).unwrap().is_some());
    // parse_frame waits for the body.
    assert_eq!(parse_frame(&ok), Ok(None));
}

#[test]
fn request_errors_are_per_request() {
    let cases = [
        (header(0x0042, 0, 0, 1, 0), RequestError::UnknownType(0x42)),
        (header(0x0102, 0, 0, 1, 0), RequestError::UnknownType(0x102)),
        (
            header(MSG_READ_META, FLAG_FUA, 0, 1, 0),
            RequestError::BadFlags {
                kind: MSG_READ_META,
                flags: FLAG_FUA,
            },
        ),
        (
            header(MSG_READ_META, 0, 4, 1, 0),
            RequestError::BadBody {
                kind: MSG_READ_META,
                body_len: 4,
                want: 0,
            },
        ),
        (
            header(MSG_WRITE_META, 0, 10, 1, 11),
            RequestError::BadBody {
                kind: MSG_WRITE_META,
                body_len: 10,
                want: 11,
            },
        ),
        (
            header(MSG_REPLY_OK, 0, 0, 1, 0),
            RequestError::ReplyAsRequest(MSG_REPLY_OK),
        ),
        (
            header(MSG_READ, FLAG_FUA, 0, 1, 1),
            RequestError::BadFlags {
                kind: MSG_READ,
                flags: FLAG_FUA,
            },
        ),
        (
            header(MSG_TRIM, FLAG_MAY_PUNCH, 0, 1, 1),
            RequestError::BadFlags {
                kind: MSG_TRIM,
                flags: FLAG_MAY_PUNCH,
            },
        ),
        (
            header(MSG_WRITE, 0, 10, 1, 11),
            RequestError::BadBody {
                kind: MSG_WRITE,
                body_len: 10,
                want: 11,
            },
        ),
        (
            header(MSG_FLUSH, 0, 3, 1, 0),
            RequestError::BadBody {
                kind: MSG_FLUSH,
                body_len: 3,
                want: 0,
            },
        ),
        (header(MSG_READ, 0, 0, 0, 1), RequestError::ReservedId),
    ];
    for (h, want) in cases {
        assert_eq!(Request::decode(&h), Err(want.clone()), "{h:?}");
    }
    let too_long = header(MSG_READ, 0, 0, 1, u64::from(MAX_IO_BYTES) + 1);
    assert!(matches!(
        Request::decode(&too_long),
        Err(RequestError::TooLong { what: "read", .. })
    ));
    // A blob over the metadata limit (but within the frame limit) is refused per request:
    // the body is skipped and the connection goes on.
    let meta_len = u64::from(MAX_META_BYTES) + 1;
    let too_big = header(MSG_WRITE_META, 0, meta_len as u32, 1, meta_len);
    assert!(parse_frame_header(&too_big.to_bytes()).unwrap().is_some());
    assert_eq!(
        Request::decode(&too_big),
        Err(RequestError::TooLong {
            what: "replication metadata",
            len: meta_len,
            max: MAX_META_BYTES.into(),
        })
    );
    let max = header(MSG_WRITE_META, 0, MAX_META_BYTES, 1, MAX_META_BYTES.into());
    assert_eq!(
        Request::decode(&max),
        Ok(Request::WriteMeta {
            len: MAX_META_BYTES
        })
    );
    assert_eq!(RequestError::UnknownType(9).code(), ErrorCode::Unsupported);
    assert_eq!(RequestError::ReservedId.code(), ErrorCode::Invalid);
}

// Goal: every request survives encode → decode → IoRequest → Request.
#[test]
fn requests_round_trip() {
    let reqs = [
        Request::Read { offset: 1, len: 2 },
        Request::Write {
            offset: 3,
            len: 4,
            fua: true,
        },
        Request::Flush,
        Request::Trim {
            offset: 5,
            len: 1 << 40,
            fua: true,
        },
        Request::WriteZeroes {
            offset: 7,
            len: 8,
            may_punch: false,
            fua: true,
        },
        Request::BlockStatus { offset: 9, len: 10 },
        Request::Ping,
        Request::ReadMeta,
        Request::WriteMeta { len: 11 },
    ];
    for (i, r) in reqs.into_iter().enumerate() {
        let h = r.header(i as u64 + 1);
        let (back, _) = parse_frame_header(&h.to_bytes()).unwrap().unwrap();
        assert_eq!(Request::decode(&back), Ok(r));
        if let Some(io) = r.into_io(vec![0; r.payload_bytes() as usize]) {
            assert_eq!(Request::from_io(&io), Some(r));
        }
    }
    let huge = bw_types::IoRequest::Read {
        offset: 0,
        len: MAX_IO_BYTES + 1,
    };
    assert_eq!(Request::from_io(&huge), None);
}

#[test]
fn reply_heads_malformed() {
    let r = |kind, body_len, length| {
        ReplyHead::decode(&FrameHeader {
            kind,
            flags: 0,
            body_len,
            id: 1,
            offset: 0,
            length,
        })
    };
    assert_eq!(r(0x8077, 0, 0), Err(ProtoError::UnexpectedType(0x8077)));
    assert_eq!(r(MSG_READ, 0, 0), Err(ProtoError::UnexpectedType(MSG_READ)));
    assert!(matches!(
        r(MSG_REPLY_OK, 1, 0),
        Err(ProtoError::Malformed { .. })
    ));
    assert!(matches!(
        r(MSG_REPLY_PONG, 1, 0),
        Err(ProtoError::Malformed { .. })
    ));
    for bad in [0, 15, 17, (MAX_EXTENTS as u32 + 1) * 16] {
        assert!(
            matches!(
                r(MSG_REPLY_EXTENTS, bad, 0),
                Err(ProtoError::Malformed { .. })
            ),
            "{bad}"
        );
    }
    let over = MAX_MESSAGE_LEN as u32 + 1;
    assert!(matches!(
        r(MSG_REPLY_ERROR, over, 1),
        Err(ProtoError::TooLong { .. })
    ));
    assert!(matches!(
        r(MSG_REPLY_FENCED, over, 1),
        Err(ProtoError::TooLong { .. })
    ));
    assert_eq!(
        r(MSG_REPLY_ERROR, 0, 99),
        Ok(ReplyHead::Error {
            code: ErrorCode::Unknown(99)
        })
    );
    assert_eq!(
        r(MSG_REPLY_ERROR, 0, 1 << 40),
        Ok(ReplyHead::Error {
            code: ErrorCode::Unknown(u16::MAX)
        })
    );
}

#[test]
fn extents_body_malformed() {
    assert!(parse_extents(&[]).is_err());
    assert!(parse_extents(&[0; 17]).is_err());
    assert!(parse_extents(&[0; 16]).is_err(), "zero-length extent");
    assert!(parse_extents(&vec![1; 16 * (MAX_EXTENTS + 1)]).is_err());
    // Unknown flag bits are ignored.
    let mut one = 5u64.to_be_bytes().to_vec();
    one.extend_from_slice(&0xffff_fff1u32.to_be_bytes());
    one.extend_from_slice(&[0; 4]);
    let e = parse_extents(&one).unwrap();
    assert_eq!((e[0].len, e[0].hole, e[0].zero), (5, true, false));
    assert_eq!(parse_message(b"ok \xff"), "ok \u{fffd}");
}

// Goal: every IoError crosses the wire as itself (messages kept where the variant has one).
#[test]
fn error_codes_map_onto_io_errors() {
    let errors = [
        IoError::Io("disk".into()),
        IoError::NoSpace,
        IoError::OutOfRange,
        IoError::Invalid("bad".into()),
        IoError::Faulted("why".into()),
        IoError::Unsupported,
        IoError::ShuttingDown,
    ];
    for e in errors {
        let msg = match &e {
            IoError::Io(m) | IoError::Invalid(m) | IoError::Faulted(m) => m.clone(),
            _ => String::new(),
        };
        let code = ErrorCode::from_io(&e);
        assert_eq!(ErrorCode::from_wire(code.to_wire()), code);
        assert_eq!(code.to_io(&msg), e);
    }
    assert!(matches!(ErrorCode::Protocol.to_io("x"), IoError::Io(_)));
    assert!(matches!(ErrorCode::Unknown(77).to_io("x"), IoError::Io(m) if m.contains("77")));
}

// Goal: a device error sent with encode_io_error comes back as the same IoError.
#[test]
fn io_errors_round_trip_through_error_replies() {
    for e in [
        IoError::Io("disk gone".into()),
        IoError::NoSpace,
        IoError::Faulted("f".into()),
    ] {
        let mut out = Vec::new();
        encode_io_error(&mut out, 3, &e);
        let ((h, body), _) = parse_frame(&out).unwrap().unwrap();
        let ReplyHead::Error { code } = ReplyHead::decode(&h).unwrap() else {
            panic!("error reply expected");
        };
        assert_eq!(code.to_io(&parse_message(body)), e);
    }
}

// Goal: META replies: PRESENT with any body up to the limit, none without a body; anything
// else is fatal for the client.
#[test]
fn meta_reply_heads() {
    let r = |flags, body_len| {
        ReplyHead::decode(&FrameHeader {
            kind: MSG_REPLY_META,
            flags,
            body_len,
            id: 1,
            offset: 0,
            length: 0,
        })
    };
    assert_eq!(
        r(FLAG_META_PRESENT, 0),
        Ok(ReplyHead::Meta {
            present: true,
            len: 0
        })
    );
    assert_eq!(
        r(FLAG_META_PRESENT, MAX_META_BYTES),
        Ok(ReplyHead::Meta {
            present: true,
            len: MAX_META_BYTES
        })
    );
    assert_eq!(
        r(0, 0),
        Ok(ReplyHead::Meta {
            present: false,
            len: 0
        })
    );
    assert!(matches!(r(0, 1), Err(ProtoError::Malformed { .. })));
    assert!(matches!(r(2, 0), Err(ProtoError::Malformed { .. })));
    assert!(matches!(
        r(FLAG_META_PRESENT, MAX_META_BYTES + 1),
        Err(ProtoError::TooLong { .. })
    ));
}

// Goal: a hello offering v2 must carry the session; a v1-only hello never does.
#[test]
fn hello_v2_session_field() {
    let short = raw_hello(1, 2, &v1_body(b"n", b"v"));
    assert!(
        matches!(
            parse_hello(&short),
            Err(ProtoError::TooShort {
                what: "v2 hello body",
                ..
            })
        ),
        "{:?}",
        parse_hello(&short)
    );
    let mut body = v1_body(b"n", b"v");
    body.extend_from_slice(&9u64.to_be_bytes());
    let (h, _) = parse_hello(&raw_hello(2, 2, &body)).unwrap().unwrap();
    assert_eq!(h.session, 9);
    let (h, _) = parse_hello(&raw_hello(1, 1, &body)).unwrap().unwrap();
    assert_eq!(h.session, 0, "a v1 hello's tail is not a session");
    assert_eq!(RefuseCode::from_wire(7), RefuseCode::StaleSession);
}
