//! Arbitrary bytes through the peer frame parsers as both sides use them: frame headers with
//! their bodies, request decoding (server) and reply decoding with extents and messages
//! (client). Never a panic, never more consumed than given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peer_proto::consts::{FRAME_HEADER_LEN, MAX_BODY_LEN};
use peer_proto::{parse_extents, parse_frame, parse_message, ReplyHead, Request};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(((h, body), n))) = parse_frame(rest) {
        assert!(n >= FRAME_HEADER_LEN && n <= rest.len());
        assert!(h.body_len <= MAX_BODY_LEN && body.len() == h.body_len as usize);
        if let Ok(req) = Request::decode(&h) {
            assert_eq!(Request::decode(&req.header(h.id)), Ok(req));
            let _ = req.into_io(body.to_vec());
        }
        match ReplyHead::decode(&h) {
            Ok(ReplyHead::Extents { count }) => {
                if let Ok(e) = parse_extents(body) {
                    assert_eq!(e.len(), count as usize);
                }
            }
            Ok(ReplyHead::Error { .. } | ReplyHead::Fenced { .. }) => {
                let _ = parse_message(body);
            }
            _ => {}
        }
        rest = &rest[n..];
    }
});
