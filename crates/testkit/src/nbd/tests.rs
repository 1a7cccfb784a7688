//! The client against the in-memory fake server, and against a scripted server that answers
//! pipelined requests out of order.

use super::*;
use crate::fake_nbd::FakeNbd;
use std::net::TcpListener;

#[test]
fn read_write_flush_trim_zeroes_round_trip() {
    let srv = FakeNbd::start("disk", 1 << 20);
    let mut c = NbdClient::connect_uri(&srv.uri()).unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.export().block_size, Some((1, 4096, 32 << 20)));
    assert!(c.export().flags & FLAG_SEND_FLUSH != 0);
    c.write(4095, &[7u8; 10], false).unwrap();
    c.write(8192, &[9u8; 4096], true).unwrap();
    assert_eq!(
        c.read(4094, 12).unwrap(),
        [&[0u8][..], &[7u8; 10], &[0]].concat()
    );
    c.flush().unwrap();
    c.trim(8192, 2048).unwrap();
    c.write_zeroes(10240, 1024, true).unwrap();
    let back = c.read(8192, 4096).unwrap();
    assert!(back[..3072].iter().all(|&b| b == 0));
    assert!(back[3072..].iter().all(|&b| b == 9));
    let e = c.read((1 << 20) - 1, 2).unwrap_err();
    assert_eq!(e.errno(), Some(EINVAL), "{e}");
    // The connection stays usable after an error reply.
    assert_eq!(c.read(0, 1).unwrap(), [0]);
    c.disconnect().unwrap();
}

#[test]
fn unknown_export_is_rejected_and_list_names_exports() {
    let srv = FakeNbd::start("disk", 4096);
    let e = NbdClient::connect_tcp(srv.addr(), "nope").unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::OptionRejected {
                reply: REP_ERR_UNKNOWN,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(NbdClient::list_exports(srv.addr()).unwrap(), ["disk"]);
}

#[test]
fn uri_parsing() {
    assert_eq!(
        parse_uri("nbd://127.0.0.1:1234/vol-1").unwrap(),
        ("127.0.0.1:1234".into(), "vol-1".into())
    );
    assert_eq!(
        parse_uri("nbd://h/x").unwrap(),
        ("h:10809".into(), "x".into())
    );
    assert!(parse_uri("http://h/x").is_err());
}

/// A scripted server: handshake, then reads three requests and answers them in reverse order.
#[test]
fn pipelined_replies_out_of_order_are_matched_by_handle() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let srv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        w.write_all(&NBDMAGIC.to_be_bytes()).unwrap();
        w.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        w.write_all(&FLAG_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        let mut b4 = [0u8; 4];
        s.read_exact(&mut b4).unwrap();
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr).unwrap();
        let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        let reply = |w: &mut TcpStream, typ: u32, d: &[u8]| {
            let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&OPT_GO.to_be_bytes());
            b.extend_from_slice(&typ.to_be_bytes());
            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
            b.extend_from_slice(d);
            w.write_all(&b).unwrap();
        };
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&65536u64.to_be_bytes());
        info.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).to_be_bytes());
        reply(&mut w, REP_INFO, &info);
        reply(&mut w, REP_ACK, &[]);
        let mut reqs = Vec::new();
        for _ in 0..3 {
            let mut h = [0u8; 28];
            s.read_exact(&mut h).unwrap();
            let cmd = u16::from_be_bytes([h[6], h[7]]);
            let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
            if cmd == CMD_WRITE {
                let mut p = vec![0u8; len as usize];
                s.read_exact(&mut p).unwrap();
            }
            reqs.push((h[8..16].to_vec(), cmd, len));
        }
        for (handle, cmd, len) in reqs.into_iter().rev() {
            let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&0u32.to_be_bytes());
            b.extend_from_slice(&handle);
            if cmd == CMD_READ {
                b.extend(std::iter::repeat_n(0xabu8, len as usize));
            }
            w.write_all(&b).unwrap();
        }
    });
    let mut c = NbdClient::connect_tcp(addr, "x").unwrap();
    let h1 = c.submit(CMD_READ, 0, 0, 16, &[]).unwrap();
    let h2 = c.submit(CMD_WRITE, 0, 0, 4, &[1, 2, 3, 4]).unwrap();
    let h3 = c.submit(CMD_READ, 0, 512, 8, &[]).unwrap();
    assert_eq!(c.in_flight(), 3);
    let r3 = c.receive().unwrap();
    assert_eq!((r3.handle, r3.data.len()), (h3, 8));
    let r2 = c.receive().unwrap();
    assert_eq!((r2.handle, r2.command, r2.data.len()), (h2, CMD_WRITE, 0));
    let r1 = c.receive().unwrap();
    assert_eq!((r1.handle, r1.data), (h1, vec![0xab; 16]));
    assert_eq!(c.in_flight(), 0);
    srv.join().unwrap();
}
