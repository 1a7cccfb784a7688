//! Negotiation: every option we support, the ones we refuse, and broken handshakes.

use std::sync::atomic::Ordering;

use nbd_proto::client::{self as c};
use nbd_proto::consts::*;

use crate::devices::MemDevice;
use crate::harness::*;

fn go_bytes(code: u32, name: &str, infos: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    c::encode_info_option(&mut out, code, name, infos);
    out
}

// Goal: the full modern path: structured replies, GO with NAME/DESCRIPTION/BLOCK_SIZE
// requests, and the exact info payloads.
#[tokio::test]
async fn go_with_structured_replies_and_info_requests() {
    let srv = TestServer::with_mem().await;
    let mut cl = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    cl.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(cl.final_reply().await.reply_type, REP_ACK);
    cl.send(&go_bytes(
        OPT_GO,
        "vol",
        &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 999],
    ))
    .await;
    let r = cl.option_replies().await;
    let data: Vec<&[u8]> = r.iter().map(|r| &r.data[..]).collect();
    assert_eq!(r.len(), 5, "{r:?}");
    assert!(r.iter().all(|x| x.option == OPT_GO));
    assert_eq!(
        data[0],
        [&[0, 0][..], &(1u64 << 20).to_be_bytes(), &[0x01, 0xed]].concat()
    );
    assert_eq!(data[1], b"\x00\x01vol");
    assert_eq!(data[2], b"\x00\x02test volume vol");
    assert_eq!(data[3], [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    assert_eq!(r[4].reply_type, REP_ACK);
}

// Goal: EXPORT_NAME ends negotiation with size+flags, padded with 124 zeroes unless the
// client negotiated NO_ZEROES; without structured replies SEND_DF is not advertised.
#[tokio::test]
async fn export_name_honours_no_zeroes() {
    let srv = TestServer::with_mem().await;
    for (flags, no_zeroes) in [
        (FLAG_C_FIXED_NEWSTYLE, false),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, true),
    ] {
        let mut cl = Client::greet(srv.addr, flags).await;
        cl.option(OPT_EXPORT_NAME, b"vol").await;
        let (size, tflags) = cl.recv(|b| c::parse_export_name_reply(b, no_zeroes)).await;
        assert_eq!((size, tflags), (1 << 20, 0x016d));
        // The next bytes are already transmission: a flush is answered.
        cl.request(CMD_FLUSH, 0, 5, 0, 0, &[]).await;
        assert_eq!(reply_error(&cl.reply().await), 0);
    }
}

#[tokio::test]
async fn list_returns_every_export_then_ack() {
    let exports = TestExports::default();
    exports.add("a", MemDevice::new(4096), false);
    exports.add("b", MemDevice::new(4096), false);
    let srv = TestServer::start(exports).await;
    let mut cl = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    cl.option(OPT_LIST, &[]).await;
    let r = cl.option_replies().await;
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].reply_type, REP_SERVER);
    assert_eq!(r[0].data, b"\x00\x00\x00\x01atest volume a");
    assert_eq!(r[1].data, b"\x00\x00\x00\x01btest volume b");
    assert_eq!(r[2].reply_type, REP_ACK);
}

// Goal: INFO only looks (the volume is not marked in use); GO takes the volume; a second GO
// gets ERR_POLICY naming the holder; closing the first connection releases it.
#[tokio::test]
async fn info_does_not_mark_in_use_but_go_does() {
    let exports = TestExports::default();
    let vol = exports.add("x", MemDevice::new(8192), true);
    let srv = TestServer::start(exports).await;
    let mut looker = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    looker.send(&go_bytes(OPT_INFO, "x", &[])).await;
    assert_eq!(looker.final_reply().await.reply_type, REP_ACK);
    assert_eq!(vol.open_guards.load(Ordering::SeqCst), 0);

    let (owner, _, _) = Client::open(srv.addr, "x", false, false).await;
    let mut second = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    second.send(&go_bytes(OPT_GO, "x", &[])).await;
    let r = second.final_reply().await;
    assert_eq!(r.reply_type, REP_ERR_POLICY);
    assert_eq!(
        String::from_utf8(r.data).unwrap(),
        "volume \"x\" is in use by conn-0"
    );

    drop(owner);
    wait_until("guard released", || {
        vol.open_guards.load(Ordering::SeqCst) == 0
    })
    .await;
    second.send(&go_bytes(OPT_GO, "x", &[])).await;
    assert_eq!(second.final_reply().await.reply_type, REP_ACK);
}

// Goal: an unknown export gets ERR_UNKNOWN with a readable message, and negotiation goes on.
#[tokio::test]
async fn unknown_export_then_keep_negotiating() {
    let srv = TestServer::with_mem().await;
    let mut cl = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    for code in [OPT_INFO, OPT_GO] {
        cl.send(&go_bytes(code, "nope", &[])).await;
        let r = cl.final_reply().await;
        assert_eq!((r.option, r.reply_type), (code, REP_ERR_UNKNOWN));
        assert_eq!(
            String::from_utf8(r.data).unwrap(),
            "no volume named \"nope\""
        );
    }
    cl.send(&go_bytes(OPT_GO, "vol", &[])).await;
    assert_eq!(cl.final_reply().await.reply_type, REP_ACK);
}

// Goal: unknown/unsupported options and malformed ones are refused, negotiation continues.
#[tokio::test]
async fn refused_options_keep_the_connection() {
    let srv = TestServer::with_mem().await;
    let mut cl = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let cases: Vec<(u32, Vec<u8>, u32)> = vec![
        (99, b"whatever".to_vec(), REP_ERR_UNSUP),
        (OPT_STARTTLS, vec![], REP_ERR_UNSUP),
        (OPT_EXTENDED_HEADERS, vec![], REP_ERR_UNSUP),
        (OPT_LIST, b"x".to_vec(), REP_ERR_INVALID),
        (OPT_STRUCTURED_REPLY, b"x".to_vec(), REP_ERR_INVALID),
        (OPT_GO, vec![0, 0, 0, 200, 0, 0], REP_ERR_INVALID),
        (OPT_INFO, vec![0, 0, 0, 1, 0, 0, 0], REP_ERR_INVALID),
        (
            OPT_SET_META_CONTEXT,
            vec![0, 0, 0, 3, b'v', b'o', b'l', 0, 0, 0, 0],
            REP_ERR_INVALID,
        ), // not structured yet
        (
            OPT_LIST_META_CONTEXT,
            vec![0, 0, 0, 0, 0, 0, 0, 0],
            REP_ERR_INVALID,
        ),
    ];
    for (code, data, want) in cases {
        cl.option(code, &data).await;
        let r = cl.final_reply().await;
        assert_eq!(
            (r.option, r.reply_type),
            (code, want),
            "option {code} data {data:?}"
        );
    }
    // Oversized: skipped without buffering, ERR_TOO_BIG.
    cl.option(OPT_INFO, &vec![7u8; MAX_OPTION_DATA_LEN as usize + 1])
        .await;
    assert_eq!(cl.final_reply().await.reply_type, REP_ERR_TOO_BIG);
    cl.send(&go_bytes(OPT_GO, "vol", &[])).await;
    assert_eq!(cl.final_reply().await.reply_type, REP_ACK);
    assert_eq!(srv.stat(|s| &s.handshake_failures_total), 0);
}

#[tokio::test]
async fn meta_context_list_and_set() {
    let srv = TestServer::with_mem().await;
    let mut cl = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    cl.option(OPT_STRUCTURED_REPLY, &[]).await;
    cl.final_reply().await;
    let mut out = Vec::new();
    for queries in [&[][..], &["base:"][..], &["base:allocation", "qemu:x"][..]] {
        out.clear();
        c::encode_meta_option(&mut out, OPT_LIST_META_CONTEXT, "vol", queries);
        cl.send(&out).await;
        let r = cl.option_replies().await;
        assert_eq!(r.len(), 2, "{queries:?}");
        assert_eq!(r[0].reply_type, REP_META_CONTEXT);
        assert_eq!(r[0].data, b"\x00\x00\x00\x00base:allocation");
    }
    out.clear();
    c::encode_meta_option(
        &mut out,
        OPT_SET_META_CONTEXT,
        "vol",
        &["qemu:dirty-bitmap:a", "base:allocation"],
    );
    cl.send(&out).await;
    let r = cl.option_replies().await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].data, b"\x00\x00\x00\x01base:allocation");
    out.clear();
    c::encode_meta_option(&mut out, OPT_SET_META_CONTEXT, "nope", &["base:allocation"]);
    cl.send(&out).await;
    assert_eq!(cl.final_reply().await.reply_type, REP_ERR_UNKNOWN);
}

#[tokio::test]
async fn abort_is_acknowledged_then_closed() {
    let srv = TestServer::with_mem().await;
    let mut cl = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    cl.option(OPT_ABORT, &[]).await;
    let r = cl.final_reply().await;
    assert_eq!((r.option, r.reply_type), (OPT_ABORT, REP_ACK));
    cl.expect_closed().await;
    assert_eq!(srv.stat(|s| &s.handshake_failures_total), 0);
}

// Goal: garbage and truncated handshakes close only their own connection and are counted.
#[tokio::test]
async fn broken_handshakes_close_only_their_connection() {
    let srv = TestServer::with_mem().await;
    let (mut healthy, _, _) = Client::open(srv.addr, "vol", true, false).await;

    let mut bad_flags = Client::greet(srv.addr, 1 << 5).await;
    bad_flags.expect_closed().await;

    let mut bad_magic = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    bad_magic
        .send(b"NOTMAGIC\x00\x00\x00\x03\x00\x00\x00\x00")
        .await;
    bad_magic.expect_closed().await;

    let mut unknown_export_name = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    unknown_export_name.option(OPT_EXPORT_NAME, b"nope").await;
    unknown_export_name.expect_closed().await;

    let mut truncated = Client::greet(srv.addr, FLAG_C_FIXED_NEWSTYLE).await;
    truncated.send(&go_bytes(OPT_GO, "vol", &[])[..10]).await;
    truncated.s.shutdown().await.unwrap();
    truncated.expect_closed().await;

    let mut silent = Client::connect(srv.addr).await;
    silent.send(b"\x00\x00").await;
    drop(silent);

    wait_until("failures counted", || {
        srv.stat(|s| &s.handshake_failures_total) == 5
    })
    .await;
    healthy.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(reply_error(&healthy.reply().await), 0);
}

use tokio::io::AsyncWriteExt as _;
