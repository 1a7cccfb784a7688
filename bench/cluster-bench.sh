#!/usr/bin/env bash
# C2 and C3 cluster benchmarks (issue 3 and issue 4 "Performance", SPEC §6), one command, as root:
#
#   1. lease takeover after kill -9 of the holder's agent (median/max over TAKEOVER_RUNS),
#      next to the sanlock formula (140 s) and the etcd-side expectation (TTL − KA age + ≤0.6 s)
#   2. control plane create/attach/detach p50/p99 over CP_OPS ops through the HTTP API with a
#      keep-alive client: 3 etcd members + 3 agents in namespaces (target p99 ≤ 200 ms), and
#      one embedded agent (target p99 ≤ 50 ms); also CLI_OPS through the CLI process
#   3. remote attach throughput over veth vs local: fio nbd engine 1 MiB seq write QD8 and
#      4 KiB rand write QD32, volume attached on n1 with its replica on n1 (local) or n2
#      (remote, peer protocol), and the raw TCP n1 -> n2 throughput (iperf3) in the same rep
#   4. (PARTS repl) synchronous replication, issue 4: in one run with the same namespaces, the
#      raw disk (fio O_DIRECT on a TP_SIZE file on the agents' file system), the raw TCP link
#      n1 -> n2 (iperf3), qemu-nbd serving that file inside n1, a 1-replica volume (n1) and a
#      2-replica volume (n1 + n2, sync over veth), all attached/served on n1 and driven by fio
#      in n1's namespace: seqwrite_1M_qd8, seqwrite_1M_qd1, randwrite_4k_qd32 (IOPS),
#      randwrite_4k_qd1 (p50/p99 latency); target: 2 replicas 1 MiB QD8 >= 0.80 x
#      min(raw disk, raw TCP). Per rep also the machine budget, without our code: two fio
#      writers at once (buffered with machine CPU per MiB, and O_DIRECT: the one disk both
#      "hosts" share here) and the link's CPU per MiB; the summary prints the sustained
#      one-disk ceiling (two O_DIRECT writers / 2) as a fraction of min(raw disk, raw TCP). Then full resyncs of the 2-replica volume (every region, TP_SIZE,
#      copied n1 -> n2 over the peer protocol after an outage of n2: kill -9 its agent,
#      rewrite all of the volume through n1, restart n2): at the default rate (DEFAULT_RESYNC_RATE_BYTES_PER_S) while each of RESYNC_JOBS runs,
#      next to the same job alone (bound: the job keeps >= RESYNC_KEEP of its throughput);
#      unthrottled (`volume set --resync-rate 0`; target: copy rate >= 0.90 x min(raw disk,
#      raw TCP)); throttled at RESYNC_RATE (target: copy rate within 10 %); and, for
#      reference, `volume add-replica` of a third replica on n3 (unthrottled).
#      SYSCOUNT (1) counts the servers' fsync/fdatasync/rename calls per fio IO (perf stat on
#      syscall tracepoints). CEPH=1 adds Ceph RBD (pool size 2) from ../shared/bench/ceph as
#      a peer in the table (set up and torn down by its scripts; needs the ceph packages).
#
# The driver is crates/testkit/examples/cluster_bench.rs (uses the testkit cluster harness:
# namespaces on a bridge, a 3-member etcd, agents as real processes; torn down on exit).
#
#   sudo bench/cluster-bench.sh                        # full run, ~17 min
#   sudo QUICK=1 bench/cluster-bench.sh                # short trial, ~5 min
#   sudo BUILD=0 PARTS=repl bench/cluster-bench.sh     # replication only, ~9 min
#   sudo BUILD=0 QUICK=1 PARTS=repl bench/cluster-bench.sh   # replication trial, ~3 min
#
# Knobs (env): QUICK, BUILD (1: cargo build --release first; 0: use existing binaries),
# PARTS (embedded,cp,tp,repl,takeover), TAKEOVER_RUNS (20), POLL_MS (50; also the resync
# progress poll), CP_OPS (500), CLI_OPS (100), ETCD_OPS (300), TP_REPS (3; tp and repl),
# FIO_RUNTIME (6), FIO_RAMP (1), TP_SIZE (2G; tp and repl volumes, the raw file, the resync
# size), IPERF_SECS (5), RESYNC_RATE (100M), RESYNC_KEEP (0.5),
# RESYNC_JOBS (randwrite_4k_qd32,seqwrite_1M_qd8,randwrite_4k_qd1), DEFAULT_RESYNC_RATE
# (bytes/s; read from the agent's source by default), SYSCOUNT (1), CEPH (0), CEPH_DIR
# (../shared/bench/ceph), SEED, KEEPALIVE_S (1), PERF (1: perf-record the agents during
# rep 0's fio jobs and the unthrottled resync into <results>/perf-*.data; distorts those
# numbers), NBD_TRANSPORT (unix: repl part's fio reaches our agent and qemu-nbd through their
# unix sockets, as qemu on the attachment's host does; tcp: n1's address), BENCH_TIMEOUT
# (3600 s, whole driver).
# Results: bench/results/<stamp>.cluster/ (summary.txt, *.tsv, driver.log, machine.txt).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
cd "$ROOT"

if [[ ${QUICK:-0} == 1 ]]; then
    : "${TAKEOVER_RUNS:=3}" "${CP_OPS:=50}" "${CLI_OPS:=10}" "${ETCD_OPS:=50}" "${TP_REPS:=1}"
    : "${FIO_RUNTIME:=3}" "${TP_SIZE:=512M}" "${IPERF_SECS:=2}"
fi
export TAKEOVER_RUNS=${TAKEOVER_RUNS:-20} POLL_MS=${POLL_MS:-50} CP_OPS=${CP_OPS:-500}
export CLI_OPS=${CLI_OPS:-100} ETCD_OPS=${ETCD_OPS:-300} TP_REPS=${TP_REPS:-3}
export FIO_RUNTIME=${FIO_RUNTIME:-6} FIO_RAMP=${FIO_RAMP:-1} TP_SIZE=${TP_SIZE:-2G}
export IPERF_SECS=${IPERF_SECS:-5} PARTS=${PARTS:-embedded,cp,tp,repl,takeover}
export RESYNC_RATE=${RESYNC_RATE:-100M} RESYNC_KEEP=${RESYNC_KEEP:-0.5}
export RESYNC_JOBS=${RESYNC_JOBS:-randwrite_4k_qd32,seqwrite_1M_qd8,randwrite_4k_qd1}
export SYSCOUNT=${SYSCOUNT:-1} CEPH=${CEPH:-0} CEPH_DIR=${CEPH_DIR:-$(dirname "$ROOT")/shared/bench/ceph}
[[ -n ${SEED:-} ]] && export SEED
[[ -n ${DEFAULT_RESYNC_RATE:-} ]] && export DEFAULT_RESYNC_RATE
BUILD=${BUILD:-1}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-3600}

die() { echo "cluster-bench: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "run as root (network namespaces, nftables)"
for t in fio etcd ip nft timeout; do
    command -v "$t" >/dev/null || die "needs $t (apt-get install -y fio etcd-server iproute2 nftables)"
done
command -v iperf3 >/dev/null ||
    echo "cluster-bench: iperf3 not installed (apt-get install -y iperf3); using a plain TCP blast for the link" >&2
if [[ ,$PARTS, == *,repl,* ]]; then
    command -v qemu-nbd >/dev/null ||
        echo "cluster-bench: qemu-nbd not installed (apt-get install -y qemu-utils); repl runs without the qemu-nbd column" >&2
fi

if [[ $BUILD == 1 ]]; then
    cargo build --release -p blockwarden
    cargo build --release -p testkit --example cluster_bench --example bare_pipeline
fi
BW_BIN=${BW_BIN:-$ROOT/target/release/blockwarden}
DRIVER=$ROOT/target/release/examples/cluster_bench
[[ -x $BW_BIN && -x $DRIVER ]] || die "missing $BW_BIN or $DRIVER (run with BUILD=1)"
export BW_BIN

STAMP=$(date -u +%Y%m%dT%H%M%S)
OUT=$HERE/results/$STAMP.cluster
mkdir -p "$OUT"
export OUT

{
    echo "date: $(date -u +%FT%TZ)"
    echo "loadavg: $(cat /proc/loadavg)"
    echo "nproc: $(nproc); mem: $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo); kernel: $(uname -r)"
    echo "cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
    echo "fs: $(df -hT "$ROOT" | tail -1)"
    echo "etcd: $(etcd --version 2>/dev/null | head -1)"
    echo "fio: $(fio --version)"
    echo "iperf3: $(iperf3 --version 2>/dev/null | head -1 || echo none)"
    echo "git: $(git rev-parse --short HEAD) + $(git status --short | wc -l) changed/untracked paths"
    echo "blockwarden: $(ls -l --time-style=+%FT%T "$BW_BIN" | awk '{print $6}') sha256 $(sha256sum "$BW_BIN" | cut -c1-12)"
    echo "qemu-nbd: $(qemu-nbd --version 2>/dev/null | head -1 || echo none)"
    echo "knobs: QUICK=${QUICK:-0} PARTS=$PARTS TAKEOVER_RUNS=$TAKEOVER_RUNS POLL_MS=$POLL_MS CP_OPS=$CP_OPS CLI_OPS=$CLI_OPS ETCD_OPS=$ETCD_OPS TP_REPS=$TP_REPS FIO_RUNTIME=$FIO_RUNTIME FIO_RAMP=$FIO_RAMP TP_SIZE=$TP_SIZE IPERF_SECS=$IPERF_SECS RESYNC_RATE=$RESYNC_RATE RESYNC_KEEP=$RESYNC_KEEP RESYNC_JOBS=$RESYNC_JOBS CEPH=$CEPH NBD_TRANSPORT=${NBD_TRANSPORT:-unix}"
} >"$OUT/machine.txt"
cat "$OUT/machine.txt"

TPID= DRV=
sweep() {
    # what a killed driver could not tear down: its namespaces and bridge (its pid is in their
    # names / the bridge alias); etcd and agents in them died with it (PR_SET_PDEATHSIG)
    [[ -n $DRV ]] || return 0
    for ns in /run/netns/bwlab*-"$DRV"-*; do
        [[ -e $ns ]] && { ip netns del "$(basename "$ns")" 2>/dev/null || true; }
    done
    for l in /sys/class/net/bwlab*; do
        [[ -e $l ]] || continue
        if [[ $(cat "$l/ifalias" 2>/dev/null) == "bwlab-pid-$DRV" ]]; then
            ip link del "$(basename "$l")" 2>/dev/null || true
        fi
    done
    # the harness's temp dirs (etcd data, agent data, logs) are kept for diagnosis
    local left
    left=$(compgen -G "${TMPDIR:-/tmp}/bw-*-$DRV-*" || true)
    [[ -z $left ]] || echo "cluster-bench: harness files kept for diagnosis (remove when done):" $left >&2
}
ceph_sweep() {
    # CEPH=1: the driver started Ceph daemons (they daemonize) but died before its teardown
    [[ -n ${OUT:-} && -f $OUT/ceph-started && ! -f $OUT/ceph-teardown.log ]] || return 0
    echo "cluster-bench: tearing down the Ceph cluster the driver started" >&2
    timeout 180 bash "$(cat "$OUT/ceph-started")/teardown.sh" >"$OUT/ceph-teardown.log" 2>&1 || true
}
cleanup() {
    local rc=$?
    if [[ -n $DRV ]] && kill -0 "$DRV" 2>/dev/null; then
        # the driver's own children (embedded agent, fio, CLI), by pid, then the driver
        local kids
        kids=$(pgrep -P "$DRV" || true)
        kill -TERM "$DRV" 2>/dev/null || true
        sleep 2
        kill -KILL "$DRV" 2>/dev/null || true
        for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    fi
    [[ -n $TPID ]] && kill -KILL "$TPID" 2>/dev/null || true
    sweep
    ceph_sweep
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "cluster-bench: results in $OUT" >&2
timeout -k 20 "$BENCH_TIMEOUT" "$DRIVER" > >(tee "$OUT/summary.out") 2> >(tee "$OUT/driver.log" >&2) &
TPID=$!
for _ in $(seq 50); do
    DRV=$(pgrep -P "$TPID" -x cluster_bench || true)
    [[ -n $DRV ]] && break
    sleep 0.1
done
rc=0
wait "$TPID" || rc=$?
TPID=
[[ $rc == 0 ]] || echo "cluster-bench: driver exited with $rc" >&2
sweep
DRV=
sleep 0.2
echo "loadavg at end: $(cat /proc/loadavg)" >>"$OUT/machine.txt"
echo "cluster-bench: summary $OUT/summary.txt" >&2
exit "$rc"
