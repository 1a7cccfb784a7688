//! A cheap, always-on stand-in for the fuzz targets: mutated valid messages and random bytes
//! through every parser; none may panic or claim more bytes than it was given.

use crate::client::{self, encode_info_option, encode_meta_option};
use crate::consts::*;
use crate::{handshake, transmission, RequestHeader};

/// xorshift64*: deterministic, so a failure reproduces from the printed iteration.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn seeds() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    let mut b = Vec::new();
    encode_info_option(&mut b, OPT_GO, "vol", &[INFO_BLOCK_SIZE]);
    v.push(b);
    let mut b = Vec::new();
    encode_meta_option(
        &mut b,
        OPT_SET_META_CONTEXT,
        "vol",
        &[META_BASE_ALLOCATION, "base:"],
    );
    v.push(b);
    let mut b = Vec::new();
    RequestHeader {
        flags: 1,
        command: 1,
        cookie: 9,
        offset: 4096,
        length: 4,
    }
    .encode(&mut b);
    b.extend_from_slice(b"data");
    v.push(b);
    let mut b = Vec::new();
    transmission::encode_chunk_error(&mut b, 3, EIO, "boom");
    v.push(b);
    v
}

fn check_all(data: &[u8]) {
    fn ok<T>(data: &[u8], r: crate::Parsed<T>) {
        if let Ok(Some((_, n))) = r {
            assert!(n <= data.len());
        }
    }
    ok(data, handshake::parse_client_flags(data));
    ok(data, handshake::parse_option(data));
    ok(data, transmission::parse_request_header(data));
    ok(data, client::parse_greeting(data));
    ok(data, client::parse_option_reply(data));
    ok(data, client::parse_reply(data));
    ok(data, client::parse_export_name_reply(data, true));
}

#[test]
fn parsers_survive_mutations_and_noise() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let seeds = seeds();
    for i in 0..20_000 {
        let mut data = seeds[i % seeds.len()].clone();
        for _ in 0..1 + next(&mut state) % 4 {
            let pos = (next(&mut state) as usize) % data.len();
            data[pos] = next(&mut state) as u8;
        }
        data.truncate((next(&mut state) as usize) % (data.len() + 1));
        check_all(&data);
        let noise: Vec<u8> = (0..next(&mut state) % 64)
            .map(|_| next(&mut state) as u8)
            .collect();
        check_all(&noise);
    }
}
