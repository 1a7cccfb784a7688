//! fio's nbd engine with `verify=crc32c`: several jobs at once, each its own NBD connection on
//! its own region (random 4 KiB at QD16, random mixed sizes at QD8, sequential 1 MiB at QD4),
//! every block written is read back and checksummed. fio must exit 0 with no verify errors.

use std::process::Command;
use std::time::Duration;

use testkit::cmd::{describe, run_with_timeout};
use testkit::{require_tool, start_agent};

#[test]
fn concurrent_jobs_write_and_verify_crc32c() {
    if !require_tool("fio") {
        return;
    }
    let agent = start_agent!();
    agent.create_volume("fio", "192M");
    let dir = agent.scratch_dir();
    let job = dir.join("verify.fio");
    std::fs::write(
        &job,
        format!(
            "[global]\n\
             ioengine=nbd\n\
             uri={uri}\n\
             size=48M\n\
             verify=crc32c\n\
             do_verify=1\n\
             verify_fatal=1\n\
             verify_dump=0\n\
             verify_state_save=0\n\
             randrepeat=0\n\
             group_reporting=0\n\
             \n\
             [rand4k]\n\
             rw=randwrite\n\
             bs=4k\n\
             iodepth=16\n\
             offset=0\n\
             \n\
             [randmixed]\n\
             rw=randwrite\n\
             bsrange=512-256k\n\
             iodepth=8\n\
             offset=48M\n\
             \n\
             [seq1m]\n\
             rw=write\n\
             bs=1M\n\
             iodepth=4\n\
             offset=96M\n\
             \n\
             [rand4k-2]\n\
             rw=randwrite\n\
             bs=4k\n\
             iodepth=32\n\
             offset=144M\n",
            uri = agent.nbd_uri("fio")
        ),
    )
    .unwrap();
    let mut c = Command::new("fio");
    c.arg(&job).current_dir(&dir); // fio may drop state files in its working directory
    let out = run_with_timeout(&mut c, Duration::from_secs(600)).unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}", describe(&c, &out));
    assert!(
        !text.contains("verify:")
            && !text.contains("bad magic")
            && !text.contains("crc32c: verify failed"),
        "{text}"
    );
    // Four jobs ran (each reports its own group).
    assert_eq!(
        text.matches("err= 0").count(),
        4,
        "every job finished without error:\n{text}"
    );
}
