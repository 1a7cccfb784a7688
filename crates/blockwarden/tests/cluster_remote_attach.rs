//! Goal: a host without a replica serves the volume over NBD, reading and writing the replica
//! on another node over the peer protocol, with the same results as a local volume.
//! Method: replica pinned on n1, attached on n3 (which holds none); real clients against n3's
//! export: qemu-img convert + compare of a sparse random image, qemu-io patterns at odd
//! offsets read back on a new connection, and fio's nbd engine with verify=crc32c.

use std::process::Command;
use std::time::{Duration, Instant};

use testkit::cluster::inspect::{attachment, qemu_io_ok, replica_nodes};
use testkit::cmd::{describe, run_ok, run_with_timeout};
use testkit::e2e::random_file;
use testkit::{require_tool, start_cluster};

const MIB: u64 = 1 << 20;

#[test]
fn volume_attached_on_a_node_without_replica_passes_qemu_img_qemu_io_and_fio_verify() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") || !require_tool("fio") {
        return;
    }
    let Some(c) = start_cluster!(&[("n1", &[]), ("n2", &[]), ("n3", &[])]) else {
        return;
    };
    let (a, n3) = (c.agent("n1"), c.agent("n3"));
    a.cli_ok(&[
        "volume", "create", "remote", "--size", "256M", "--node", "n1",
    ]);
    let uri = n3.cli_ok(&["volume", "attach", "remote"]).trim().to_owned();
    assert_eq!(uri, n3.nbd_uri("remote"));
    let show = a.cli_json(&["volume", "show", "remote"]);
    assert_eq!(
        replica_nodes(&show),
        ["n1"],
        "the replica stays on n1: {show}"
    );
    assert_eq!(
        attachment(a, "remote").map(|x| x.node),
        Some("n3".to_owned())
    );

    // qemu-img: a sparse 64 MiB random image in, compared back out.
    let t = Instant::now();
    let img = n3.scratch_dir().join("src.raw");
    random_file(&img, 64 * MIB, 0xC2, true);
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&img)
            .arg(&uri),
        Duration::from_secs(300),
    );
    let mut cmp = Command::new("qemu-img");
    cmp.args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(&uri);
    let out = run_with_timeout(&mut cmp, Duration::from_secs(300)).unwrap();
    assert!(
        out.status.success(),
        "image and volume differ:\n{}",
        describe(&cmp, &out)
    );
    eprintln!(
        "qemu-img convert + compare of 64 MiB over remote attach: {:?}",
        t.elapsed()
    );

    // qemu-io: odd offsets, zeroes and discard beyond the image, verified on a new connection.
    let writes = [
        "write -P 0xab 100000001 5000",
        "aio_write -P 0xcd 101234567 65537",
        "aio_flush",
        "write -P 0x77 120M 1M",
        "write -z 125829220 4000",
        "discard 130M 1M",
        "write -P 0x3c 268435455 1",
        "flush",
    ];
    let reads = [
        "read -P 0xab 100000001 5000",
        "read -P 0xcd 101234567 65537",
        "read -P 0x77 120M 100",
        "read -P 0 125829220 4000",
        "read -P 0 130M 1M",
        "read -P 0x3c 268435455 1",
    ];
    let mut all: Vec<&str> = writes.to_vec();
    all.extend(reads);
    qemu_io_ok(&uri, &all);
    let out = qemu_io_ok(&uri, &reads);
    assert_eq!(out.matches("bytes at offset").count(), reads.len(), "{out}");

    // fio: two verifying jobs on their own regions past the qemu-io area.
    let dir = n3.scratch_dir();
    let job = dir.join("remote.fio");
    std::fs::write(
        &job,
        format!(
            "[global]\nioengine=nbd\nuri={uri}\nsize=32M\nverify=crc32c\ndo_verify=1\n\
             verify_fatal=1\nverify_state_save=0\nrandrepeat=0\n\n\
             [rand4k]\nrw=randwrite\nbs=4k\niodepth=16\noffset=160M\n\n\
             [seq1m]\nrw=write\nbs=1M\niodepth=4\noffset=200M\n"
        ),
    )
    .unwrap();
    let t = Instant::now();
    let mut fio = Command::new("fio");
    fio.arg(&job).current_dir(&dir);
    let out = run_with_timeout(&mut fio, Duration::from_secs(300)).unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", describe(&fio, &out));
    assert!(
        !text.contains("verify:") && !text.contains("bad magic"),
        "{text}"
    );
    assert_eq!(
        text.matches("err= 0").count(),
        2,
        "both fio jobs finished clean:\n{text}"
    );
    eprintln!("fio verify over remote attach: {:?}", t.elapsed());

    // The first image is still intact after all that. qemu-io and fio wrote past its end, and
    // `qemu-img compare` of unequal sizes wants the longer one's tail to be zero, so compare
    // only the image's extent of the volume (a raw driver with a size over the NBD export).
    let (host, port) = uri
        .trim_start_matches("nbd://")
        .split('/')
        .next()
        .and_then(|hp| hp.rsplit_once(':'))
        .expect("nbd://host:port/name");
    let extent = format!(
        r#"json:{{"driver":"raw","size":{},"file":{{"driver":"nbd","server":{{"type":"inet","host":"{host}","port":"{port}"}},"export":"remote"}}}}"#,
        64 * MIB
    );
    let mut cmp = Command::new("qemu-img");
    cmp.args(["compare", "-f", "raw"]).arg(&img).arg(&extent);
    let out = run_with_timeout(&mut cmp, Duration::from_secs(300)).unwrap();
    assert!(out.status.success(), "{}", describe(&cmp, &out));
    n3.cli_ok(&["volume", "detach", "remote"]);
}
