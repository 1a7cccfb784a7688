//! Bad input against the real agent (G6): garbage and truncated handshakes, unknown options
//! and commands, oversize and out-of-range requests, clients vanishing mid-request, and bad
//! API requests. Method: while a well-behaved client runs a write/read-verify loop on its own
//! volume, hostile connections are thrown at the agent one by one; each must get the spec's
//! answer (error reply, or that connection closed), the agent must stay up, and the good
//! client must never see an error. API errors must be 4xx with a JSON `{error:{code,message}}`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use testkit::http;
use testkit::nbd::{consts::*, ClientError, NbdClient};
use testkit::raw::{Frame, RawConn};
use testkit::rng::SplitMix64;
use testkit::{start_agent, Agent};

const T: Duration = Duration::from_secs(10);
const VOL_SIZE: u64 = 16 << 20;

/// The well-behaved client: FUA writes of a changing pattern, read back and compared, until
/// told to stop. Returns the number of rounds, or the first error.
fn good_client(uri: String, stop: Arc<AtomicBool>) -> JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || {
        let mut c = NbdClient::connect_uri(&uri).map_err(|e| e.to_string())?;
        let mut rng = SplitMix64::new(3);
        let mut rounds = 0u64;
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::SeqCst) || rounds < 10 {
            rng.fill(&mut buf);
            let off = rng.below(VOL_SIZE / 65536) * 65536;
            c.write(off, &buf, true)
                .map_err(|e| format!("round {rounds}: write: {e}"))?;
            let back = c
                .read(off, 65536)
                .map_err(|e| format!("round {rounds}: read: {e}"))?;
            if back != buf {
                return Err(format!("round {rounds}: read back differs at {off}"));
            }
            rounds += 1;
        }
        c.disconnect().map_err(|e| e.to_string())?;
        Ok(rounds)
    })
}

/// A raw connection that has read the server greeting (18 bytes).
fn greeted(addr: SocketAddr) -> RawConn {
    let mut c = RawConn::connect(addr).unwrap();
    let g = c.read_exact_timeout(18, T).expect("greeting");
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
    c
}

/// Greeted and client flags sent: ready for options.
fn haggling(addr: SocketAddr) -> RawConn {
    let mut c = greeted(addr);
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    c
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    Frame::new()
        .u64(IHAVEOPT)
        .u32(opt)
        .u32(data.len() as u32)
        .bytes(data)
        .build()
}

/// Reads one option reply header + payload: (option, reply type, payload).
fn option_reply(c: &mut RawConn) -> (u32, u32, Vec<u8>) {
    let h = c.read_exact_timeout(20, T).expect("option reply");
    assert_eq!(
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        OPT_REPLY_MAGIC
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    assert!(len < 1 << 20, "option reply of {len} bytes");
    let data = c
        .read_exact_timeout(len as usize, T)
        .expect("option reply payload");
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        data,
    )
}

fn assert_alive(agent: &mut Agent, what: &str) {
    assert!(
        agent.is_running(),
        "agent died after: {what}\n{}",
        agent.log()
    );
}

/// Goal: broken handshakes hurt nobody else. Method: garbage, truncation, bad flags/magic, oversize and unknown options, while a good client runs.
#[test]
fn hostile_handshakes_close_only_their_own_connection() {
    let mut agent = start_agent!();
    agent.create_volume("good", "16M");
    let addr = agent.nbd_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(agent.nbd_uri("good"), stop.clone());
    let mut rng = SplitMix64::new(0xbad);

    // Garbage instead of client flags.
    let mut junk = vec![0u8; 1024];
    rng.fill(&mut junk);
    let mut c = greeted(addr);
    let _ = c.send(&junk);
    assert!(c.wait_closed(T), "garbage handshake: connection closed");
    assert_alive(&mut agent, "garbage handshake");

    // Garbage before even reading the greeting.
    let mut c = RawConn::connect(addr).unwrap();
    let _ = c.send(&junk);
    assert!(c.wait_closed(T));
    assert_alive(&mut agent, "garbage before greeting");

    // Truncated client flags, then EOF.
    let mut c = greeted(addr);
    c.send(&[0, 0]).unwrap();
    c.shutdown_write().unwrap();
    assert!(c.wait_closed(T));

    // Unknown client flags: the spec says drop the connection.
    let mut c = greeted(addr);
    c.send(&0xffff_fff0u32.to_be_bytes()).unwrap();
    assert!(c.wait_closed(T), "unknown client flags must close");

    // Bad option magic.
    let mut c = haggling(addr);
    c.send(
        &Frame::new()
            .u64(0x1122_3344_5566_7788)
            .u32(OPT_GO)
            .u32(0)
            .build(),
    )
    .unwrap();
    assert!(c.wait_closed(T), "bad option magic must close");

    // Truncated option (header promises 100 bytes, 10 arrive, then EOF).
    let mut c = haggling(addr);
    c.send(
        &Frame::new()
            .u64(IHAVEOPT)
            .u32(OPT_GO)
            .u32(100)
            .bytes(&[0; 10])
            .build(),
    )
    .unwrap();
    c.shutdown_write().unwrap();
    assert!(c.wait_closed(T));

    // Oversize option (over any sane option limit) with its payload: an error reply, and
    // haggling goes on; OPT_GO on the same connection still works.
    let mut c = haggling(addr);
    c.send(&option(OPT_GO, &vec![0x41u8; 200_000])).unwrap();
    let (opt, typ, _) = option_reply(&mut c);
    assert_eq!(opt, OPT_GO);
    assert!(
        typ & REP_FLAG_ERROR != 0,
        "oversize option answered with an error: {typ:#x}"
    );
    c.send(&option(
        OPT_GO,
        &Frame::new().u32(4).bytes(b"good").u16(0).build(),
    ))
    .unwrap();
    while option_reply(&mut c).1 != REP_ACK {}

    // A 4 GiB option length, a few bytes, then the client vanishes: nothing is allocated up
    // front (the agent would die) and nothing waits forever on our behalf.
    let mut c = haggling(addr);
    c.send(
        &Frame::new()
            .u64(IHAVEOPT)
            .u32(OPT_GO)
            .u32(u32::MAX)
            .bytes(&[0; 100])
            .build(),
    )
    .unwrap();
    drop(c);
    assert_alive(&mut agent, "4 GiB option length");

    // Unknown option: NBD_REP_ERR_UNSUP and the haggling goes on; then OPT_GO with a name
    // length pointing past the option: an error; then a real OPT_GO still works.
    let mut c = haggling(addr);
    c.send(&option(999, b"whatever")).unwrap();
    let (opt, typ, _) = option_reply(&mut c);
    assert_eq!((opt, typ), (999, REP_ERR_UNSUP));
    c.send(&option(
        OPT_GO,
        &Frame::new().u32(500).bytes(b"good").u16(0).build(),
    ))
    .unwrap();
    let (_, typ, _) = option_reply(&mut c);
    assert!(
        typ & REP_FLAG_ERROR != 0,
        "malformed OPT_GO payload gets an error: {typ:#x}"
    );
    c.send(&option(
        OPT_GO,
        &Frame::new().u32(4).bytes(b"good").u16(0).build(),
    ))
    .unwrap();
    loop {
        let (_, typ, _) = option_reply(&mut c);
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, REP_INFO, "OPT_GO replies are INFO then ACK");
    }

    // Unknown export: NBD_REP_ERR_UNKNOWN with a message.
    match NbdClient::connect_tcp(addr, "no-such-volume") {
        Err(ClientError::OptionRejected { reply, message, .. }) => {
            assert_eq!(reply, REP_ERR_UNKNOWN);
            assert!(!message.is_empty(), "the rejection carries a message");
        }
        other => panic!("expected NBD_REP_ERR_UNKNOWN, got {other:?}"),
    }

    // Many connections dropped at random points of the handshake.
    for i in 0..50 {
        let mut c = RawConn::connect(addr).unwrap();
        if i % 2 == 0 {
            let _ = c.read_for(Duration::from_millis(20), 18);
        }
        drop(c);
    }

    stop.store(true, Ordering::SeqCst);
    let rounds = good.join().unwrap().expect("the good client saw no error");
    assert!(rounds >= 10);
    assert_alive(&mut agent, "all hostile handshakes");
    agent.cli_ok(&["status"]);
}

/// Goal: bad requests get error replies, malformed frames close only their connection. Method: out-of-range, oversize, unknown commands, bad magic, clients vanishing mid-request.
#[test]
fn bad_requests_get_error_replies_and_the_connection_stays_usable() {
    let mut agent = start_agent!();
    agent.create_volume("good", "16M");
    agent.create_volume("target", "16M");
    let stop = Arc::new(AtomicBool::new(false));
    let good = good_client(agent.nbd_uri("good"), stop.clone());
    let mut c = NbdClient::connect_uri(&agent.nbd_uri("target")).unwrap();
    let size = c.size();
    assert_eq!(size, VOL_SIZE);
    let max = c.export().block_size.map_or(32 << 20, |b| b.2);

    let expect_error = |c: &mut NbdClient, what: &str, r: Result<Vec<u8>, ClientError>| {
        match r {
            Err(ClientError::Nbd { errno, .. }) => {
                assert!(
                    [EINVAL, EOVERFLOW, ENOSPC, ENOTSUP, EPERM].contains(&errno),
                    "{what}: errno {errno}"
                )
            }
            other => panic!("{what}: expected an NBD error reply, got {other:?}"),
        }
        // Still usable.
        c.write(0, &[7u8; 512], false)
            .unwrap_or_else(|e| panic!("after {what}: {e}"));
        assert_eq!(c.read(0, 512).unwrap(), vec![7u8; 512], "after {what}");
    };

    let r = c.read(size, 512);
    expect_error(&mut c, "read at the end", r);
    let r = c.read(size - 100, 512);
    expect_error(&mut c, "read across the end", r);
    let r = c.read(u64::MAX - 10, 512);
    expect_error(&mut c, "read with offset+length overflowing", r);
    let r = c.write(size - 256, &[1u8; 512], false).map(|_| Vec::new());
    expect_error(&mut c, "write across the end", r);
    let r = c.trim(size, 4096).map(|_| Vec::new());
    expect_error(&mut c, "trim past the end", r);
    let r = c.write_zeroes(size - 1, 2, false).map(|_| Vec::new());
    expect_error(&mut c, "write zeroes across the end", r);
    let r = c.read(0, max + 1);
    expect_error(&mut c, "read longer than the maximum block size", r);

    // Unknown command number: EINVAL, connection stays.
    let h = 0xdead;
    c.send_request(99, 0, h, 0, 0, &[]).unwrap();
    c.expect_reply(h, 99, 0);
    let rep = c.receive().unwrap();
    assert_eq!((rep.handle, rep.error), (h, EINVAL), "unknown command");
    let r = c.read(size, 512);
    expect_error(&mut c, "read at the end after an unknown command", r);

    // Oversize WRITE with its full payload: error reply and usable, or (tolerated) the
    // connection closed; never the agent.
    let big = vec![0u8; max as usize + 4096];
    c.send_request(CMD_WRITE, 0, 77, 0, big.len() as u32, &big)
        .unwrap();
    c.expect_reply(77, CMD_WRITE, 0);
    match c.receive() {
        Ok(r) => {
            assert_eq!(r.handle, 77);
            assert_ne!(r.error, 0, "oversize write must be refused");
            c.read(0, 512).expect("usable after oversize write");
        }
        Err(ClientError::Io(_)) => {
            eprintln!("note: agent closed the connection on an oversize write")
        }
        Err(e) => panic!("oversize write: {e}"),
    }
    assert_alive(&mut agent, "oversize write");

    // Bad request magic: that connection is closed.
    let clean = NbdClient::connect_uri(&agent.nbd_uri("target")).unwrap();
    clean.disconnect().unwrap(); // a clean DISC is fine
    let mut c2 = RawConn::connect(agent.nbd_addr()).unwrap();
    let _ = c2.read_exact_timeout(18, T);
    let _ = c2.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    let _ = c2.send(&option(
        OPT_GO,
        &Frame::new().u32(6).bytes(b"target").u16(0).build(),
    ));
    loop {
        let (_, typ, _) = option_reply(&mut c2);
        if typ == REP_ACK {
            break;
        }
    }
    c2.send(
        &Frame::new()
            .u32(0x1234_5678)
            .u16(0)
            .u16(CMD_READ)
            .u64(1)
            .u64(0)
            .u32(512)
            .build(),
    )
    .unwrap();
    assert!(
        c2.wait_closed(T),
        "a bad request magic closes the connection"
    );

    // Clients vanishing mid-request: a WRITE header with part of its payload; a burst of
    // pipelined reads abandoned unread.
    for _ in 0..5 {
        let mut v = NbdClient::connect_uri(&agent.nbd_uri("target")).unwrap();
        v.send_request(CMD_WRITE, 0, 1, 0, 1 << 20, &[9u8; 1000])
            .unwrap();
        drop(v);
        let mut v = NbdClient::connect_uri(&agent.nbd_uri("target")).unwrap();
        for h in 0..64u64 {
            v.send_request(CMD_READ, 0, h, (h % 16) << 20, 1 << 20, &[])
                .unwrap();
        }
        drop(v);
    }
    assert_alive(&mut agent, "clients vanishing mid-request");
    // The half-written request was never applied in part beyond what was received; at
    // least, the volume is still readable.
    let mut after = NbdClient::connect_uri(&agent.nbd_uri("target")).unwrap();
    after.read(0, 4096).unwrap();

    stop.store(true, Ordering::SeqCst);
    let rounds = good.join().unwrap().expect("the good client saw no error");
    assert!(rounds >= 10);
    agent.cli_ok(&["status"]);
}

/// Asserts a 4xx with a JSON `{error:{code,message}}` body.
#[track_caller]
fn assert_api_error(r: &http::Response, status: u16) {
    assert_eq!(r.status, status, "body: {}", r.body);
    let v = r.json();
    assert!(v["error"]["code"].is_string(), "error.code: {v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!msg.is_empty(), "error.message: {v}");
}

/// Goal: bad API input is refused with 4xx and a JSON message. Method: raw HTTP with bad names, sizes, fields, JSON, unknown volumes and paths.
#[test]
fn bad_api_requests_get_4xx_with_a_json_message() {
    let mut agent = start_agent!();
    let api = agent.api_addr();
    let post = |body: &str| http::request(api, "POST", "/v1/volumes", Some(body)).unwrap();

    assert_api_error(&post(r#"{"name":"Bad Name!","size_bytes":1048576}"#), 400);
    assert_api_error(
        &post(&format!(
            r#"{{"name":"{}","size_bytes":1048576}}"#,
            "a".repeat(64)
        )),
        400,
    );
    assert_api_error(&post(r#"{"name":"ok1","size":"12Q"}"#), 400);
    assert_api_error(&post(r#"{"name":"ok1","size_bytes":-5}"#), 400);
    assert_api_error(
        &post(r#"{"name":"ok1","size_bytes":1048576,"replica":3}"#),
        400,
    );
    assert_api_error(&post(r#"{"name":"ok1"}"#), 400);
    assert_api_error(&post("this is not json"), 400);
    assert_api_error(&post(r#"{"name":"#), 400);

    let r = post(r#"{"name":"ok1","size":"1M"}"#);
    assert!(
        (200..300).contains(&r.status),
        "a good create works: {} {}",
        r.status,
        r.body
    );
    assert_api_error(&post(r#"{"name":"ok1","size":"1M"}"#), 409);

    for (method, path, body) in [
        ("GET", "/v1/volumes/ghost", None),
        ("DELETE", "/v1/volumes/ghost", None),
        ("POST", "/v1/volumes/ghost/resize", Some(r#"{"size":"2M"}"#)),
    ] {
        let r = http::request(api, method, path, body).unwrap();
        assert_api_error(&r, 404);
    }
    let r = http::request(
        api,
        "POST",
        "/v1/volumes/ok1/resize",
        Some(r#"{"size":"zzz"}"#),
    )
    .unwrap();
    assert_api_error(&r, 400);
    let r = http::request(api, "GET", "/v1/no-such-endpoint", None).unwrap();
    assert!((400..500).contains(&r.status), "unknown path: {}", r.status);

    // Garbage that is not HTTP at all, and an enormous body: a 4xx or a closed connection.
    match http::send_raw(api, b"\x00\x01\x02 garbage\r\n\r\n") {
        Ok(r) => assert!((400..500).contains(&r.status), "garbage: {}", r.status),
        Err(e) => eprintln!("note: garbage request closed without a response: {e}"),
    }
    let huge = format!(
        r#"{{"name":"big","size":"1M","pad":"{}"}}"#,
        "x".repeat(8 << 20)
    );
    match http::request(api, "POST", "/v1/volumes", Some(&huge)) {
        Ok(r) => assert!((400..500).contains(&r.status), "huge body: {}", r.status),
        Err(e) => eprintln!("note: huge body closed without a response: {e}"),
    }
    assert_alive(&mut agent, "bad API input");
    let list = agent.cli_json(&["volume", "list"]);
    assert_eq!(
        list.as_array().map(|a| a.len()),
        Some(1),
        "only ok1 exists: {list}"
    );
}
