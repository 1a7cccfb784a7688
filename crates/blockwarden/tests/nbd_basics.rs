//! NBD service basics with our own client: the Unix socket in the data dir, the export list,
//! data surviving a clean restart, a resize seen on the next connection, and several
//! connections to one volume seeing each other's flushed writes (multi-conn).

use testkit::nbd::{consts::*, NbdClient};
use testkit::start_agent;

/// Goal: the Unix socket in the data dir serves the same data as TCP. Method: write on one, read on the other.
#[test]
fn unix_socket_and_tcp_serve_the_same_volume() {
    let agent = start_agent!();
    agent.create_volume("dual", "4M");
    let mut tcp = NbdClient::connect_uri(&agent.nbd_uri("dual")).unwrap();
    tcp.write(4096, b"over tcp", false).unwrap();
    tcp.flush().unwrap();
    let mut unix = NbdClient::connect_unix(&agent.nbd_socket(), "dual").unwrap();
    assert_eq!(unix.size(), 4 << 20);
    assert_eq!(unix.read(4096, 8).unwrap(), b"over tcp");
    unix.write(0, b"over unix", true).unwrap();
    assert_eq!(tcp.read(0, 9).unwrap(), b"over unix");
}

/// Goal: the transmission flags and block-size constraints of issue #2 are advertised. Method: OPT_GO with an INFO_BLOCK_SIZE request.
#[test]
fn export_flags_and_block_sizes_are_advertised() {
    let agent = start_agent!();
    agent.create_volume("flags", "4M");
    let c = NbdClient::connect_uri(&agent.nbd_uri("flags")).unwrap();
    let f = c.export().flags;
    for (bit, name) in [
        (FLAG_HAS_FLAGS, "HAS_FLAGS"),
        (FLAG_SEND_FLUSH, "SEND_FLUSH"),
        (FLAG_SEND_FUA, "SEND_FUA"),
        (FLAG_SEND_TRIM, "SEND_TRIM"),
        (FLAG_SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
        (FLAG_CAN_MULTI_CONN, "CAN_MULTI_CONN"),
    ] {
        assert!(f & bit != 0, "{name} not advertised (flags {f:#x})");
    }
    assert_eq!(f & FLAG_READ_ONLY, 0);
    let (min, pref, max) = c.export().block_size.expect("NBD_INFO_BLOCK_SIZE sent");
    assert!(min == 1 || min == 512, "minimum {min}");
    assert_eq!(pref, 4096);
    assert_eq!(max, 32 << 20);
}

/// Goal: OPT_LIST equals the catalog. Method: three volumes, one OPT_LIST.
#[test]
fn opt_list_names_exactly_the_volumes() {
    let agent = start_agent!();
    for n in ["a1", "b2", "c3"] {
        agent.create_volume(n, "1M");
    }
    let mut names = NbdClient::list_exports(agent.nbd_addr()).unwrap();
    names.sort();
    assert_eq!(names, ["a1", "b2", "c3"]);
}

/// Goal: flushed data survives SIGTERM + restart; a resize is seen by the next connection. Method: write, restart, read; resize, reconnect.
#[test]
fn data_survives_a_clean_restart_and_resize_shows_on_next_connection() {
    let mut agent = start_agent!();
    agent.create_volume("keep", "8M");
    let mut c = NbdClient::connect_uri(&agent.nbd_uri("keep")).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    c.write(1 << 20, &data, false).unwrap();
    c.flush().unwrap();
    c.disconnect().unwrap();

    agent.restart();
    let mut c = NbdClient::connect_uri(&agent.nbd_uri("keep")).unwrap();
    assert_eq!(c.read(1 << 20, 65536).unwrap(), data);

    agent.cli_ok(&["volume", "resize", "keep", "--size", "16M"]);
    let mut d = NbdClient::connect_uri(&agent.nbd_uri("keep")).unwrap();
    assert_eq!(d.size(), 16 << 20, "a new connection sees the new size");
    d.write((16 << 20) - 4096, &[0xee; 4096], true).unwrap();
    assert_eq!(
        d.read(1 << 20, 65536).unwrap(),
        data,
        "growing keeps the data"
    );
    // The old connection keeps working within its old size.
    assert_eq!(c.read(0, 512).unwrap().len(), 512);
}

/// Goal: multi-conn coherence. Method: four connections write their own ranges, one flushes, each reads its neighbour's range.
#[test]
fn writes_flushed_on_one_connection_are_read_on_another() {
    let agent = start_agent!();
    agent.create_volume("multi", "8M");
    let uri = agent.nbd_uri("multi");
    let mut conns: Vec<NbdClient> = (0..4)
        .map(|_| NbdClient::connect_uri(&uri).unwrap())
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.write(i as u64 * 65536, &[i as u8 + 1; 65536], false)
            .unwrap();
    }
    conns[0].flush().unwrap();
    for (i, c) in conns.iter_mut().enumerate() {
        let j = (i + 1) % 4;
        assert_eq!(
            c.read(j as u64 * 65536, 65536).unwrap(),
            vec![j as u8 + 1; 65536]
        );
    }
}
