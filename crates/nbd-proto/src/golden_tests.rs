//! Golden bytes: what our server puts on the wire, pinned forever. A failure here means the
//! wire format changed; that needs a new entry in the version history (lib.rs), never an
//! edit of these constants to make the test pass.

use crate::consts::*;
use crate::handshake::*;
use crate::transmission::*;

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

#[test]
fn greeting() {
    let mut out = Vec::new();
    encode_greeting(&mut out);
    assert_eq!(out, hex("4e42444d41474943 49484156454f5054 0003"));
}

#[test]
fn transmission_flags_v1() {
    assert_eq!(server_transmission_flags(false), 0x016d);
    assert_eq!(server_transmission_flags(true), 0x01ed);
}

// The full answer to NBD_OPT_GO for a 1 GiB export with structured replies negotiated and
// NBD_INFO_NAME requested: INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE, ACK.
#[test]
fn reply_to_opt_go() {
    let mut out = Vec::new();
    encode_info_export(&mut out, OPT_GO, 1 << 30, server_transmission_flags(true));
    encode_info_string(&mut out, OPT_GO, INFO_NAME, "vol");
    encode_info_block_size(&mut out, OPT_GO);
    encode_rep_ack(&mut out, OPT_GO);
    let want = hex(
        "0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 01ed
         0003e889045565a9 00000007 00000003 00000005 0001 766f6c
         0003e889045565a9 00000007 00000003 0000000e 0003 00000001 00001000 02000000
         0003e889045565a9 00000007 00000001 00000000",
    );
    assert_eq!(out, want);
}

#[test]
fn reply_to_opt_info_errors_and_list() {
    let mut out = Vec::new();
    encode_rep_error(&mut out, OPT_INFO, REP_ERR_UNKNOWN, "no");
    encode_rep_server(&mut out, "ab", "d");
    encode_rep_meta_context(&mut out, OPT_SET_META_CONTEXT, 1, META_BASE_ALLOCATION);
    let want = hex("0003e889045565a9 00000006 80000006 00000002 6e6f
         0003e889045565a9 00000003 00000002 00000007 00000002 6162 64
         0003e889045565a9 0000000a 00000004 00000013 00000001 626173653a616c6c6f636174696f6e");
    assert_eq!(out, want);
}

#[test]
fn export_name_reply() {
    let mut out = Vec::new();
    encode_export_name_reply(&mut out, 0x1000, 0x016d, true);
    assert_eq!(out, hex("0000000000001000 016d"));
    out.clear();
    encode_export_name_reply(&mut out, 0x1000, 0x016d, false);
    assert_eq!(out.len(), 134);
    assert!(out[10..].iter().all(|&b| b == 0));
}

#[test]
fn request_header() {
    let h = RequestHeader {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        cookie: 0x0102030405060708,
        offset: 0x1000,
        length: 0x200,
    };
    assert_eq!(
        h.to_bytes().to_vec(),
        hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200")
    );
}

#[test]
fn replies() {
    let cookie = 0x0102030405060708;
    assert_eq!(
        simple_reply(0, cookie).to_vec(),
        hex("67446698 00000000 0102030405060708")
    );
    assert_eq!(
        simple_reply(EINVAL, cookie).to_vec(),
        hex("67446698 00000016 0102030405060708")
    );
    assert_eq!(
        offset_data_header(cookie, 0x2000, 0x1000).to_vec(),
        hex("668e33ef 0001 0001 0102030405060708 00001008 0000000000002000")
    );
    let mut out = Vec::new();
    encode_chunk_none(&mut out, cookie);
    encode_chunk_error(&mut out, cookie, EIO, "hi");
    let ds = [
        BlockDescriptor {
            length: 0x1000,
            flags: 0,
        },
        BlockDescriptor {
            length: 0x2000,
            flags: STATE_HOLE | STATE_ZERO,
        },
    ];
    encode_chunk_block_status(&mut out, cookie, 1, &ds);
    let want = hex(
        "668e33ef 0001 0000 0102030405060708 00000000
         668e33ef 0001 8001 0102030405060708 00000008 00000005 0002 6869
         668e33ef 0001 0005 0102030405060708 00000014 00000001 00001000 00000000 00002000 00000003",
    );
    assert_eq!(out, want);
}
