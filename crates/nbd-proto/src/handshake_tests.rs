//! Unit tests of the handshake parsers: every malformed-input path and the incomplete
//! paths (every proper prefix of a valid option is `Ok(None)`).

use super::*;
use crate::client::{encode_info_option, encode_meta_option, encode_option};

fn opt(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_option(&mut out, code, data);
    out
}

fn parse_body(bytes: &[u8]) -> OptionBody {
    let (req, used) = parse_option(bytes).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    req.body
}

#[test]
fn client_flags_known_and_unknown() {
    assert_eq!(parse_client_flags(&[0, 0, 0]), Ok(None));
    let (f, n) = parse_client_flags(&[0, 0, 0, 3]).unwrap().unwrap();
    assert_eq!((f.fixed_newstyle, f.no_zeroes, n), (true, true, 4));
    let (f, _) = parse_client_flags(&[0, 0, 0, 0]).unwrap().unwrap();
    assert_eq!(f, ClientFlags::default());
    assert_eq!(
        parse_client_flags(&[0, 0, 0, 4]),
        Err(ProtoError::UnknownClientFlags(4))
    );
    assert_eq!(
        parse_client_flags(&[0x80, 0, 0, 1]),
        Err(ProtoError::UnknownClientFlags(0x8000_0001))
    );
}

// Goal: a partial option is never mistaken for a complete one.
#[test]
fn every_prefix_is_incomplete() {
    let mut full = Vec::new();
    encode_info_option(&mut full, OPT_GO, "vol1", &[INFO_BLOCK_SIZE, INFO_NAME]);
    for n in 0..full.len() {
        assert_eq!(parse_option(&full[..n]), Ok(None), "prefix {n}");
    }
    let body = parse_body(&full);
    assert_eq!(
        body,
        OptionBody::Go(InfoRequest {
            name: "vol1".into(),
            info_types: vec![3, 1]
        })
    );
}

#[test]
fn bad_option_magic_is_fatal() {
    let mut bytes = opt(OPT_LIST, &[]);
    bytes[7] = 0;
    assert!(matches!(
        parse_option(&bytes),
        Err(ProtoError::BadOptionMagic(_))
    ));
}

// Goal: an oversized option is reported after its header only, so the caller can skip it.
#[test]
fn oversized_option_consumes_only_header() {
    let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
    bytes.extend_from_slice(&OPT_GO.to_be_bytes());
    bytes.extend_from_slice(&(MAX_OPTION_DATA_LEN + 1).to_be_bytes());
    let (req, used) = parse_option(&bytes).unwrap().unwrap();
    assert_eq!(used, OPTION_HEADER_LEN);
    assert_eq!(
        req.body,
        OptionBody::TooBig {
            len: MAX_OPTION_DATA_LEN + 1
        }
    );
    // Exactly at the limit is still buffered and parsed.
    let at_limit = opt(999, &vec![0; MAX_OPTION_DATA_LEN as usize]);
    assert_eq!(parse_body(&at_limit), OptionBody::Unsupported);
}

#[test]
fn simple_options() {
    assert_eq!(parse_body(&opt(OPT_ABORT, &[])), OptionBody::Abort);
    assert_eq!(parse_body(&opt(OPT_ABORT, b"ignored")), OptionBody::Abort);
    assert_eq!(parse_body(&opt(OPT_LIST, &[])), OptionBody::List);
    assert!(matches!(
        parse_body(&opt(OPT_LIST, b"x")),
        OptionBody::Malformed(_)
    ));
    assert_eq!(
        parse_body(&opt(OPT_STRUCTURED_REPLY, &[])),
        OptionBody::StructuredReply
    );
    assert!(matches!(
        parse_body(&opt(OPT_STRUCTURED_REPLY, b"x")),
        OptionBody::Malformed(_)
    ));
    assert_eq!(parse_body(&opt(OPT_STARTTLS, &[])), OptionBody::Unsupported);
    assert_eq!(
        parse_body(&opt(OPT_EXTENDED_HEADERS, &[])),
        OptionBody::Unsupported
    );
    assert_eq!(
        parse_body(&opt(0xdead_beef, b"abc")),
        OptionBody::Unsupported
    );
}

#[test]
fn export_name_strings() {
    assert_eq!(
        parse_body(&opt(OPT_EXPORT_NAME, b"disk")),
        OptionBody::ExportName("disk".into())
    );
    assert_eq!(
        parse_body(&opt(OPT_EXPORT_NAME, b"")),
        OptionBody::ExportName(String::new())
    );
    assert_eq!(
        parse_body(&opt(OPT_EXPORT_NAME, b"a\0b")),
        OptionBody::Malformed("string contains NUL")
    );
    assert_eq!(
        parse_body(&opt(OPT_EXPORT_NAME, &[0xff, 0xfe])),
        OptionBody::Malformed("string is not UTF-8")
    );
    let long = vec![b'a'; MAX_STRING_LEN + 1];
    assert_eq!(
        parse_body(&opt(OPT_EXPORT_NAME, &long)),
        OptionBody::Malformed("string longer than 4096 bytes")
    );
}

#[test]
fn info_malformed_paths() {
    let cases: &[(&[u8], &str)] = &[
        (&[0, 0], "option data too short for the name length"),
        (
            &[0, 0, 0, 9, b'a', 0, 0],
            "export name length exceeds the option data",
        ),
        (
            &[0, 0, 0, 1, b'a'],
            "export name length exceeds the option data",
        ),
        (
            &[0, 0, 0, 0, 0, 2, 0, 1],
            "fewer info requests than announced",
        ),
        (
            &[0, 0, 0, 0, 0, 0, 0, 1],
            "trailing bytes after the info requests",
        ),
        (&[0, 0, 0, 1, 0, 0, 0], "string contains NUL"),
    ];
    for (data, why) in cases {
        assert_eq!(
            parse_body(&opt(OPT_INFO, data)),
            OptionBody::Malformed(why),
            "data {data:?}"
        );
    }
    let ok = parse_body(&opt(OPT_INFO, &[0, 0, 0, 0, 0, 0]));
    assert_eq!(
        ok,
        OptionBody::Info(InfoRequest {
            name: String::new(),
            info_types: vec![]
        })
    );
}

#[test]
fn meta_context_paths() {
    let mut good = Vec::new();
    encode_meta_option(
        &mut good,
        OPT_SET_META_CONTEXT,
        "v",
        &["base:allocation", "qemu:dirty"],
    );
    let want = MetaRequest {
        name: "v".into(),
        queries: vec!["base:allocation".into(), "qemu:dirty".into()],
    };
    assert_eq!(parse_body(&good), OptionBody::SetMetaContext(want));

    let cases: &[(&[u8], &str)] = &[
        (&[0, 0, 0], "option data too short for the name length"),
        (&[0, 0, 0, 5, b'a'], "export name exceeds the option data"),
        (
            &[0, 0, 0, 0, 0, 0],
            "option data too short for the query count",
        ),
        (&[0, 0, 0, 0, 0, 0, 0, 1], "fewer queries than announced"),
        (
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'b'],
            "query exceeds the option data",
        ),
        (
            &[0, 0, 0, 0, 0, 0, 0, 0, 7],
            "trailing bytes after the queries",
        ),
        (
            &[0, 0, 0, 0, 0, 0, 1, 0],
            "too many metadata context queries",
        ),
    ];
    for (data, why) in cases {
        assert_eq!(
            parse_body(&opt(OPT_LIST_META_CONTEXT, data)),
            OptionBody::Malformed(why),
            "data {data:?}"
        );
    }
}

#[test]
fn truncate_respects_char_boundaries() {
    assert_eq!(truncate_str("héllo", 2), "h");
    assert_eq!(truncate_str("héllo", 3), "hé");
    assert_eq!(truncate_str("abc", 10), "abc");
}
