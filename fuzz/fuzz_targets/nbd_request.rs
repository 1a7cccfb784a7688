//! Arbitrary bytes through the transmission parsers (request headers with their payloads as
//! the server frames them, and the client's reply parser): never a panic, never more
//! consumed than given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{client, transmission};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((h, n))) = transmission::parse_request_header(rest) {
        assert_eq!(n, 28);
        let _ = nbd_proto::Command::from_wire(h.command).map(|c| c.allowed_flags());
        rest = rest.get(n + h.payload_len() as usize..).unwrap_or(&[]);
    }
    let mut rest = data;
    while let Ok(Some((_, n))) = client::parse_reply(rest) {
        assert!(n <= rest.len() && n >= 16);
        rest = &rest[n..];
    }
});
