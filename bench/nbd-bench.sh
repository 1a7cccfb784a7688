#!/usr/bin/env bash
# nbd-bench.sh — blockwarden against qemu-nbd, nbdkit and the raw file, side by side in
# one run on one file system (SPEC §6, issue 2 "Performance").
#
#   targets: raw         = a 4 GiB file, fio io_uring + O_DIRECT
#            qemu-nbd    = qemu-nbd -f raw --cache=none --aio=io_uring (native if io_uring is
#                          unusable) -t -e 8 on 127.0.0.1, serving that same file
#            nbdkit      = nbdkit file cache=none on 127.0.0.1, serving that same file
#            blockwarden = `blockwarden agent` (embedded mode, release build, 1 replica),
#                          volume "bench" of 4 GiB in a data dir on the same file system
#   Every image is fully written before the jobs (reads hit real data).
#   jobs:    fio (--ioengine=nbd --uri=nbd://127.0.0.1:PORT/EXPORT for the servers)
#              seqwrite_1M_qd1   --rw=write     --bs=1M --iodepth=1
#              seqwrite_1M_qd8   --rw=write     --bs=1M --iodepth=8
#              randwrite_4k_qd32 --rw=randwrite --bs=4k --iodepth=32
#              randread_4k_qd32  --rw=randread  --bs=4k --iodepth=32
#              randwrite_4k_qd1  --rw=randwrite --bs=4k --iodepth=1     (latency p50/p99)
#            nbdcopy_2G: `nbdcopy --flush src.img nbd://…` of a 2 GiB /dev/urandom file read
#              into the page cache first (raw: the same copy into a local 2 GiB file)
#   Each rep runs every job on the four targets back to back, target order rotated per rep;
#   ratios (blockwarden / better peer, blockwarden / raw) are per rep, then median [min..max].
#   Server CPU per op = server process CPU time (/proc/PID/stat, all threads) / fio IOs
#   (per MiB for the copy): the steadiest figure on a noisy shared machine.
#
# Usage:   sudo bench/nbd-bench.sh            (one command, as root; ~8-9 min at defaults)
# Env:     REPS=3 FIO_RUNTIME=6 FIO_RAMP=1 KEEP_DATA=0 (1 = keep and reuse the filled images)
#          BUILD=1 (0 = use the existing target/release/blockwarden)
#          QEMU_AIO=auto|io_uring|native   PERF=0 (1 = `perf record` the agent during each of
#          its fio jobs; distorts the agent's numbers, for diagnosis only)
# Outputs: bench/results/<stamp>.txt (report), <stamp>.tsv (summary: median/min/max per test
#          and metric), <stamp>.raw.tsv (every rep), <stamp>.perf/ (PERF=1)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
REPS=${REPS:-3}
FIO_RUNTIME=${FIO_RUNTIME:-6}
FIO_RAMP=${FIO_RAMP:-1}
KEEP_DATA=${KEEP_DATA:-0}
BUILD=${BUILD:-1}
QEMU_AIO=${QEMU_AIO:-auto}
PERF=${PERF:-0}
BENCH_DIR=$HERE
TMP_DIR=$HERE/tmp/nbd-bench
RESULTS_DIR=$HERE/results
mkdir -p "$HERE/tmp"
[ -f "$HERE/tmp/.gitignore" ] || echo '*' > "$HERE/tmp/.gitignore"
# shellcheck source=lib/common.sh
source "$HERE/lib/common.sh"
[ -f "$RESULTS_DIR/.gitignore" ] || echo '*' > "$RESULTS_DIR/.gitignore"

[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"
case $REPS in ''|*[!0-9]*|0) die "REPS must be a positive integer" ;; esac
need fio jq qemu-nbd qemu-io nbdkit nbdcopy nbdinfo ss flock awk timeout fincore
[ "$PERF" = 1 ] && need perf
take_lock

STAMP=$(date +%Y%m%dT%H%M%S)
RAW_TSV="$RESULTS_DIR/$STAMP.raw.tsv"
SUM_TSV="$RESULTS_DIR/$STAMP.tsv"
REPORT="$RESULTS_DIR/$STAMP.txt"
PERF_DIR="$RESULTS_DIR/$STAMP.perf"
: > "$RAW_TSV"
DISK="$TMP/disk.img"        # 4 GiB, exported by qemu-nbd and nbdkit, fio'd directly by raw
SRC="$TMP/src.img"          # 2 GiB from /dev/urandom, source of the copies
RAWCOPY="$TMP/rawcopy.img"  # 2 GiB, destination of the raw copy baseline
DATA="$TMP/agent-data"      # the agent's data dir
BIN=${BW_BIN:-$REPO/target/release/blockwarden}

QPID=""; KPID=""; APID=""; PPID_PERF=""
stop_pid() {  # stop_pid PID : TERM, wait ≤ 10 s, then KILL; only our own children
    local p=$1 i
    [ -n "$p" ] || return 0
    kill -TERM "$p" 2>/dev/null || return 0
    for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    set +e
    stop_pid "$PPID_PERF"
    stop_pid "$APID"; stop_pid "$QPID"; stop_pid "$KPID"
    rm -f "$TMP"/fio-*.json "$TMP"/fio-*.json.err "$TMP/copy.time" "$TMP/copy.err" "$TMP"/*.err \
          "$TMP"/perf.data*
    if [ "$KEEP_DATA" != 1 ]; then
        rm -rf "$DISK" "$DISK.filled" "$SRC" "$SRC.filled" "$RAWCOPY" "$RAWCOPY.filled" "$DATA"
        rmdir "$TMP" 2>/dev/null
    fi
    [ $rc = 0 ] || log "failed (exit $rc); partial results in $RAW_TSV"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

T0=$(date +%s)
{ machine_facts; echo "command: REPS=$REPS FIO_RUNTIME=$FIO_RUNTIME FIO_RAMP=$FIO_RAMP $0"
  echo "repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' + uncommitted changes')"; } \
    | tee "$REPORT" >&2

# ----------------------------------------------------------------------------- build
if [ "$BUILD" = 1 ]; then
    need cargo
    log "cargo build --release -p blockwarden"
    (cd "$REPO" && timeout 1800 cargo build --release -p blockwarden) >&2 \
        || die "build failed (BUILD=0 benchmarks the existing $BIN instead)"
fi
[ -x "$BIN" ] || die "no binary at $BIN (BUILD=1 builds it)"
echo "binary: $BIN built $(date -r "$BIN" -Is) sha256 $(sha256sum "$BIN" | cut -c1-12) (BUILD=$BUILD)" | tee -a "$REPORT" >&2

# ----------------------------------------------------------------------------- data
ensure_data_file "$DISK" 4096
ensure_data_file "$RAWCOPY" 2048
if [ ! -f "$SRC.filled" ] || [ "$(stat -c %s "$SRC" 2>/dev/null)" != $((2048*1048576)) ]; then
    log "creating $SRC (2 GiB from /dev/urandom)"
    timeout 600 dd if=/dev/urandom of="$SRC" bs=1M count=2048 iflag=fullblock status=none
    touch "$SRC.filled"
fi

# ----------------------------------------------------------------------------- servers
if [ "$QEMU_AIO" = auto ]; then
    if qemu-io -f raw -t none -i io_uring -c 'read 0 4k' "$DISK" >/dev/null 2>&1; then
        QEMU_AIO=io_uring; else QEMU_AIO=native; fi
fi
QPORT=$(pick_port 11931)
qemu-nbd -f raw --cache=none --aio="$QEMU_AIO" -t -e 8 -b 127.0.0.1 -p "$QPORT" "$DISK" \
    2>"$TMP/qemu-nbd.err" &
QPID=$!
KPORT=$(pick_port $((QPORT+1)))
nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$KPORT" file file="$DISK" cache=none \
    2>"$TMP/nbdkit.err" &
KPID=$!
BPORT=$(pick_port $((KPORT+1)))
APORT=$(pick_port $((BPORT+1)))
mkdir -p "$DATA"
"$BIN" agent --data-dir "$DATA" --nbd-listen "127.0.0.1:$BPORT" --api-listen "127.0.0.1:$APORT" \
    2>"$TMP/agent.err" &
APID=$!
for i in $(seq 300); do
    grep -q 'blockwarden agent ready' "$TMP/agent.err" 2>/dev/null && break
    kill -0 "$APID" 2>/dev/null || die "agent exited: $(tail -5 "$TMP/agent.err")"
    sleep 0.1
done
grep -q 'blockwarden agent ready' "$TMP/agent.err" || die "agent not ready after 30 s: $(tail -5 "$TMP/agent.err")"
BW=("$BIN" --api "http://127.0.0.1:$APORT")
if ! timeout 30 "${BW[@]}" volume show bench >/dev/null 2>&1; then
    rm -f "$DATA/.bench-filled"
    timeout 30 "${BW[@]}" volume create bench --size 4G >&2 || die "volume create failed"
fi

wait_nbd() {
    local i
    for i in $(seq 100); do timeout 5 nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "NBD server at $1 did not come up: $(tail -3 "$TMP"/*.err)"
}
QURI="nbd://127.0.0.1:$QPORT/"; KURI="nbd://127.0.0.1:$KPORT/"; BURI="nbd://127.0.0.1:$BPORT/bench"
wait_nbd "$QURI"; wait_nbd "$KURI"; wait_nbd "$BURI"
[ "$(nbdinfo --size "$BURI")" = $((4096*1048576)) ] || die "volume bench is not 4 GiB"

if [ ! -f "$DATA/.bench-filled" ]; then
    log "filling volume bench (4 GiB, fio 1 MiB QD8 over NBD, then FLUSH)"
    timeout -k 10 600 fio --name=fill --ioengine=nbd --uri="$BURI" --size=4G --rw=write --bs=1M \
        --iodepth=8 --end_fsync=1 --output=/dev/null >/dev/null 2>"$TMP/fill.err" \
        || die "fill of the volume failed: $(tail -3 "$TMP/fill.err")"
    touch "$DATA/.bench-filled"
fi
VOLFILE=$(find "$DATA" -name '*.img' -size +1G 2>/dev/null | head -1)
{
echo "qemu-nbd:    qemu-nbd -f raw --cache=none --aio=$QEMU_AIO -t -e 8 -b 127.0.0.1 -p $QPORT $DISK  (pid $QPID)"
echo "nbdkit:      nbdkit -f --exit-with-parent -i 127.0.0.1 -p $KPORT file file=$DISK cache=none  (pid $KPID)"
echo "blockwarden: $BIN agent --data-dir $DATA --nbd-listen 127.0.0.1:$BPORT --api-listen 127.0.0.1:$APORT  (pid $APID; volume file $VOLFILE)"
echo "blockwarden: $("$BIN" --version)"
for u in "$QURI" "$KURI" "$BURI"; do
    echo "$u multi-conn=$(nbdinfo "$u" | awk '/can_multi_conn/{print $2}') block sizes=$(nbdinfo "$u" | awk '/block_size_(minimum|preferred|maximum)/{printf "%s ", $2}')"
done
} | tee -a "$REPORT" >&2

# ----------------------------------------------------------------------------- jobs
JOBS=(
  "seqwrite_1M_qd1    --rw=write     --bs=1M --iodepth=1"
  "seqwrite_1M_qd8    --rw=write     --bs=1M --iodepth=8"
  "randwrite_4k_qd32  --rw=randwrite --bs=4k --iodepth=32"
  "randread_4k_qd32   --rw=randread  --bs=4k --iodepth=32"
  "randwrite_4k_qd1   --rw=randwrite --bs=4k --iodepth=1"
)
TARGETS=(raw qemu-nbd nbdkit blockwarden)

target_args() {
    case $1 in
        raw)         echo "--ioengine=io_uring --direct=1 --filename=$DISK" ;;
        qemu-nbd)    echo "--ioengine=nbd --uri=$QURI" ;;
        nbdkit)      echo "--ioengine=nbd --uri=$KURI" ;;
        blockwarden) echo "--ioengine=nbd --uri=$BURI" ;;
    esac
}
target_pid() { case $1 in qemu-nbd) echo "$QPID" ;; nbdkit) echo "$KPID" ;; blockwarden) echo "$APID" ;; *) echo "" ;; esac; }
target_uri() { case $1 in qemu-nbd) echo "$QURI" ;; nbdkit) echo "$KURI" ;; blockwarden) echo "$BURI" ;; *) echo "$RAWCOPY" ;; esac; }

perf_start() {  # perf_start : profile the agent (all threads, user + kernel) until perf_stop
    [ "$PERF" = 1 ] || return 0
    mkdir -p "$PERF_DIR"
    timeout -k 5 300 perf record -q -F 499 --call-graph dwarf,16384 -p "$APID" -o "$TMP/perf.data" \
        >/dev/null 2>"$TMP/perf.err" &
    PPID_PERF=$!
    sleep 0.5   # let perf attach before the load starts
}
perf_stop() {
    [ "$PERF" = 1 ] && [ -n "$PPID_PERF" ] || return 0
    stop_pid "$PPID_PERF"; PPID_PERF=""   # SIGTERM: perf record writes its file and exits
    local out="$PERF_DIR/${1//\//_}-rep$2.txt"
    { echo "# perf report --no-children (self time) of the agent during $1 rep $2"
      timeout 300 perf report -i "$TMP/perf.data" --no-children --stdio --sort comm,dso,sym -g none \
          --percent-limit 0.5 2>/dev/null | grep -v '^$' | head -80
      echo; echo "# with children (inclusive), top 60"
      timeout 300 perf report -i "$TMP/perf.data" --children --stdio --sort sym -g none \
          --percent-limit 2 2>/dev/null | grep -v '^$' | head -60
    } > "$out" || true
    rm -f "$TMP/perf.data" "$TMP/perf.data.old"
}

copy_run() {  # copy_run TARGET REP : nbdcopy --flush of the 2 GiB source
    local tgt=$1 rep=$2 test="$1/nbdcopy_2G" pid el us sy
    pid=$(target_pid "$tgt")
    cat "$SRC" > /dev/null   # source in page cache for every run
    [ "$tgt" = blockwarden ] && perf_start
    # shellcheck disable=SC2086
    ctx_begin $pid
    timeout -k 5 300 /usr/bin/time -f '%e %U %S' -o "$TMP/copy.time" \
        nbdcopy --flush "$SRC" "$(target_uri "$tgt")" >/dev/null 2>"$TMP/copy.err" \
        || { log "copy $test failed: $(tail -2 "$TMP/copy.err")"; [ "$tgt" = blockwarden ] && perf_stop "$test" "$rep"; return 0; }
    # shellcheck disable=SC2086
    ctx_end "$test" "$rep" $pid
    [ "$tgt" = blockwarden ] && perf_stop "$test" "$rep"
    read -r el us sy < "$TMP/copy.time"
    rec "$test" "$rep" elapsed_s "$el"
    rec "$test" "$rep" MiBps "$(awk -v e="$el" 'BEGIN{printf "%.1f", 2048/e}')"
    rec "$test" "$rep" fio_cpu "$(awk -v e="$el" -v u="$us" -v s="$sy" 'BEGIN{printf "%.0f", 100*(u+s)/e}')"
}

NT=${#TARGETS[@]}
for rep in $(seq "$REPS"); do
    off=$(( (rep-1) % NT ))
    ORDER=("${TARGETS[@]:$off}" "${TARGETS[@]:0:$off}")
    for j in "${JOBS[@]}"; do
        read -r name args <<<"$j"
        for tgt in "${ORDER[@]}"; do
            log "rep $rep/$REPS $tgt $name (load $(load1))"
            pid=$(target_pid "$tgt")
            if [ "$tgt" = blockwarden ] && [ -n "$VOLFILE" ]; then
                rec "$tgt/$name" "$rep" cached_pct \
                    "$(fincore -nb -o RES "$VOLFILE" 2>/dev/null | awk '{printf "%.0f", 100*$1/(4096*1048576)}')"
            fi
            [ "$tgt" = blockwarden ] && perf_start
            # shellcheck disable=SC2086
            ctx_begin $pid
            # shellcheck disable=SC2046,SC2086
            fio_run "$tgt/$name" "$rep" $args $(target_args "$tgt") || { [ "$tgt" = blockwarden ] && perf_stop "$tgt/$name" "$rep"; continue; }
            # shellcheck disable=SC2086
            ctx_end "$tgt/$name" "$rep" $pid
            [ "$tgt" = blockwarden ] && perf_stop "$tgt/$name" "$rep"
        done
    done
    for tgt in "${ORDER[@]}"; do
        log "rep $rep/$REPS $tgt nbdcopy_2G (load $(load1))"
        copy_run "$tgt" "$rep"
    done
done
rec blockwarden/agent 1 rss_peak_MiB "$(awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$APID/status" 2>/dev/null || echo NA)"

# ----------------------------------------------------------------------------- analysis
# server CPU per op (µs per fio IO; per MiB for the copy)
awk -F'\t' '
    $3=="srv1_cpu" { c[$1 SUBSEP $2]=$4 }
    $3=="iops"     { o[$1 SUBSEP $2]=$4 }
    $3=="MiBps" && $1 ~ /_2G$/ { o[$1 SUBSEP $2]=$4 }
    END { for (k in c) if ((k in o) && o[k] > 0) { split(k, a, SUBSEP)
            printf "%s\t%s\tsrv_us_per_op\t%.1f\n", a[1], a[2], c[k]/100*1e6/o[k] } }' "$RAW_TSV" >> "$RAW_TSV"
# per-rep ratios: vs_peer = blockwarden / better of qemu-nbd and nbdkit in the same rep
# (for the QD1 job: p50 latency, lower is better), vs_raw = target / raw in the same rep
main_metric() { case $1 in randwrite_4k_qd1) echo lat_p50_us ;; randwrite_4k*|randread_4k*) echo iops ;; *) echo MiBps ;; esac; }
for j in "${JOBS[@]}" "nbdcopy_2G"; do
    read -r name _ <<<"$j"
    met=$(main_metric "$name")
    awk -F'\t' -v n="$name" -v m="$met" '
        $3==m { split($1, a, "/"); if (a[2]==n) v[a[1], $2]=$4+0; reps[$2]=1 }
        $3=="lat_p99_us" { split($1, a, "/"); if (a[2]==n) p99[a[1], $2]=$4+0 }
        END { lower = (m ~ /^lat_/)
          for (r in reps) {
            bp=""; bv=""
            if (("qemu-nbd",r) in v) { bp="qemu-nbd"; bv=v["qemu-nbd",r] }
            if (("nbdkit",r) in v && (bp=="" || (lower ? v["nbdkit",r] < bv : v["nbdkit",r] > bv))) { bp="nbdkit"; bv=v["nbdkit",r] }
            if (("blockwarden",r) in v && bp!="" && bv > 0) {
              printf "blockwarden/%s\t%s\tvs_peer\t%.3f\n", n, r, v["blockwarden",r]/bv
              printf "blockwarden/%s\t%s\tbetter_peer_is_%s\t1\n", n, r, bp
              if (lower && ("blockwarden",r) in p99 && p99[bp,r] > 0)
                printf "blockwarden/%s\t%s\tvs_peer_p99\t%.3f\n", n, r, p99["blockwarden",r]/p99[bp,r]
            }
            split("qemu-nbd nbdkit blockwarden", ts, " ")
            for (i in ts) if ((ts[i],r) in v && ("raw",r) in v && v["raw",r] > 0)
              printf "%s/%s\t%s\tvs_raw\t%.3f\n", ts[i], n, r, v[ts[i],r]/v["raw",r]
          } }' "$RAW_TSV" >> "$RAW_TSV"
done

summarise "$RAW_TSV" > "$SUM_TSV"
S=$SUM_TSV
m() { fmt "$(get "$S" "$1" "$2" "${3:-3}")" "${4:-0}"; }
mmm() { local a; a=$(m "$1" "$2" 3 "${3:-0}"); [ "$a" = NA ] && { echo NA; return; }
        echo "$a [$(m "$1" "$2" 4 "${3:-0}")..$(m "$1" "$2" 5 "${3:-0}")]"; }
{
echo
echo "== blockwarden vs NBD peers vs raw file (fio ${FIO_RUNTIME}s + ${FIO_RAMP}s ramp; 2 GiB nbdcopy; median of $REPS [min..max])"
printf '%-18s %-11s %26s %8s %8s %6s %9s %20s %20s %5s %5s\n' job target "throughput" p50_us p99_us srvCPU srv_us/op "x better peer" "x raw" cpu% load
for j in "${JOBS[@]}" "nbdcopy_2G"; do
    read -r name _ <<<"$j"
    case $name in randwrite_4k*|randread_4k*) met=iops; unit=IOPS ;; *) met=MiBps; unit=MiB/s ;; esac
    for tgt in raw qemu-nbd nbdkit blockwarden; do
        t="$tgt/$name"
        vp=-; [ "$tgt" = blockwarden ] && vp=$(mmm "$t" vs_peer 2)
        vr=1; [ "$tgt" = raw ] || vr=$(mmm "$t" vs_raw 2)
        printf '%-18s %-11s %26s %8s %8s %6s %9s %20s %20s %5s %5s\n' "$name" "$tgt" \
            "$(mmm "$t" "$met") $unit" "$(m "$t" lat_p50_us)" "$(m "$t" lat_p99_us)" \
            "$( [ "$tgt" = raw ] && echo - || m "$t" srv1_cpu)" "$( [ "$tgt" = raw ] && echo - || m "$t" srv_us_per_op)" \
            "$vp" "$vr" "$(m "$t" cpu_busy)" "$(m "$t" load1 3 1)"
    done
done
echo
echo "x better peer: per rep, blockwarden / max(qemu-nbd, nbdkit) in that rep; x raw: per rep, target / raw in that rep; median [min..max] over reps"
echo "  randwrite_4k_qd1: both ratios are of p50 latency (blockwarden p50 / min(peer p50), target p50 / raw p50): lower is better"
echo "srvCPU = server process CPU, % of one core; srv_us/op = server CPU µs per fio IO (per MiB for nbdcopy_2G); cpu% = whole machine busy (all CPUs, everyone's load); load = loadavg 1 min at end of test"
echo "blockwarden volume file resident in page cache before each job (fincore): $(mmm blockwarden/randread_4k_qd32 cached_pct)% before randread_4k_qd32; agent peak RSS $(m blockwarden/agent rss_peak_MiB) MiB"
echo
echo "== SPEC §6 targets (decided on the median of per-rep ratios; reps passing in brackets)"
verdict() {  # verdict JOB METRIC OP LIMIT TEXT
    local job=$1 met=$2 op=$3 lim=$4 text=$5 med np nr
    med=$(get "$S" "blockwarden/$job" "$met")
    read -r np nr < <(awk -F'\t' -v t="blockwarden/$job" -v mm="$met" -v op="$op" -v l="$lim" '
        $1==t && $3==mm { n++; if ((op==">=" && $4+0 >= l) || (op=="<=" && $4+0 <= l)) p++ }
        END { print p+0, n+0 }' "$RAW_TSV")
    local res=FAIL
    if [ -n "$med" ] && [ "$med" != NA ] && awk -v a="$med" -v l="$lim" -v op="$op" \
        'BEGIN{exit !((op==">=" && a>=l) || (op=="<=" && a<=l))}'; then res=PASS; fi
    printf '%-4s  %-58s %s %s %s   (%s/%s reps)\n' "$res" "$text" "$(fmt "$med" 2)" "$op" "$lim" "$np" "$nr"
}
verdict seqwrite_1M_qd1   vs_peer ">=" 1.2 "1 MiB seq write QD1: x better peer MiB/s"
verdict seqwrite_1M_qd8   vs_peer ">=" 1.1 "1 MiB seq write QD8: x better peer MiB/s"
verdict seqwrite_1M_qd8   vs_raw  ">=" 0.7 "1 MiB seq write QD8: x raw MiB/s"
verdict randwrite_4k_qd32 vs_peer ">=" 1.5 "4 KiB rand write QD32: x better peer IOPS"
verdict randread_4k_qd32  vs_peer ">=" 1.5 "4 KiB rand read QD32: x better peer IOPS"
verdict randwrite_4k_qd1  vs_peer "<=" 1.0 "4 KiB rand write QD1: p50 latency / better peer p50"
verdict nbdcopy_2G        vs_peer ">=" 1.0 "nbdcopy 2 GiB in: x better peer MiB/s"
echo
echo "report: $REPORT   summary: $SUM_TSV   per rep: $RAW_TSV$( [ "$PERF" = 1 ] && echo "   profiles: $PERF_DIR")"
echo "elapsed: $(( $(date +%s) - T0 )) s   load at end: $(cat /proc/loadavg)"
} | tee -a "$REPORT"
