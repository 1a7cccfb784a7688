//! Arbitrary bytes through every handshake parser, both sides: never a panic, never more
//! consumed than given, and a parsed option stream advances.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::{client, handshake, OptionBody, Parsed};

fn check<T>(data: &[u8], r: Parsed<T>) -> Option<(T, usize)> {
    let (m, n) = r.ok()??;
    assert!(n <= data.len());
    Some((m, n))
}

fuzz_target!(|data: &[u8]| {
    check(data, handshake::parse_client_flags(data));
    check(data, client::parse_greeting(data));
    check(data, client::parse_option_reply(data));
    check(data, client::parse_export_name_reply(data, data.first().is_some_and(|b| b & 1 == 1)));
    // A stream of options, as the server reads them.
    let mut rest = data;
    while let Some((opt, n)) = check(rest, handshake::parse_option(rest)) {
        assert!(n >= 16);
        let skip = match opt.body {
            OptionBody::TooBig { len } => len as usize,
            _ => 0,
        };
        rest = rest.get(n + skip..).unwrap_or(&[]);
    }
});
