//! Arbitrary bytes through the peer handshake parsers (the server's hello parser and the
//! client's answer parser): never a panic, never more consumed than given, and whatever
//! parses re-encodes to the same bytes (for the fields v1 knows).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peer_proto::{encode_accept, encode_hello, encode_refuse, parse_hello, parse_server_answer, ServerAnswer};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((hello, n))) = parse_hello(data) {
        assert!(n <= data.len() && n >= 16);
        let _ = peer_proto::choose_version(hello.min_version, hello.max_version);
        let mut again = Vec::new();
        encode_hello(&mut again, &hello);
        assert_eq!(parse_hello(&again), Ok(Some((hello, again.len()))));
    }
    if let Ok(Some((answer, n))) = parse_server_answer(data) {
        assert!(n <= data.len() && n >= 16);
        let mut again = Vec::new();
        match &answer {
            ServerAnswer::Accept(a) => encode_accept(&mut again, a),
            ServerAnswer::Refuse(r) => encode_refuse(&mut again, r),
        }
        assert_eq!(parse_server_answer(&again), Ok(Some((answer, again.len()))));
    }
});
