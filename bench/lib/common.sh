# shellcheck shell=bash
# Helpers for bench/nbd-bench.sh.  Sourced, not executed.
# Adapted from the team's shared ../shared/bench/lib/common.sh (the peer measurements in
# ../shared/bench/RESULTS.md), so that numbers are taken the same way; kept here so the
# benchmark runs from this repository alone.  Changes: fio runs under `timeout`, the lock
# and paths are this repo's bench/, machine_facts lists the tools we use.
#
# Results are recorded in "long" TSV form, one value per line:
#   test <TAB> rep <TAB> metric <TAB> value
# and summarised (median / min / max over reps) by summarise().

BENCH_DIR=${BENCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
TMP=${TMP_DIR:-$BENCH_DIR/tmp}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
mkdir -p "$TMP" "$RESULTS_DIR"
[ -f "$TMP/.gitignore" ] || echo '*' > "$TMP/.gitignore"

CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

need() {
    local c
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || die "missing tool: $c"; done
}

# Serialise benchmark runs: they share tmp/ and would disturb each other.
take_lock() {
    exec 9>"$TMP/.bench.lock"
    if ! flock -n 9; then
        log "another bench script holds $TMP/.bench.lock; waiting (max 600 s)"
        flock -w 600 9 || die "could not take $TMP/.bench.lock"
    fi
}

load1() { cut -d' ' -f1 /proc/loadavg; }
psi_cpu() { awk '/^some/{split($2,a,"="); print a[2]}' /proc/pressure/cpu 2>/dev/null || echo NA; }
psi_io()  { awk '/^full/{split($2,a,"="); print a[2]}' /proc/pressure/io 2>/dev/null || echo NA; }

# machine-wide CPU snapshot: "busy idle steal" jiffies (all CPUs)
cpu_snap() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6, $9}' /proc/stat; }

# process CPU ticks (utime+stime, including reaped children); 0 if gone
proc_ticks() { awk '{print $14+$15+$16+$17}' "/proc/$1/stat" 2>/dev/null || echo 0; }

now_s() { date +%s.%N; }

RAW_TSV=""   # set by the caller
rec() {      # rec TEST REP METRIC VALUE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RAW_TSV"
}

# --- machine-level context around one measurement -------------------------
# ctx_begin; <run>; ctx_end TEST REP [PID...]
# records: cpu_busy (% of all CPUs, whole machine, everybody's load), steal (%),
# load1 (at end), psi (cpu "some" avg10 at end), psi_io (io "full" avg10 at end:
# share of time all non-idle tasks were stalled on I/O), and srvN_cpu (% of one
# core) for each PID given.
_ctx_cpu=""; _ctx_t0=""; declare -A _ctx_pt
ctx_begin() {
    _ctx_cpu=$(cpu_snap); _ctx_t0=$(now_s)
    local p; _ctx_pt=()
    for p in "$@"; do _ctx_pt[$p]=$(proc_ticks "$p"); done
}
ctx_end() {
    local test=$1 rep=$2; shift 2
    local c1 t1 dt
    c1=$(cpu_snap); t1=$(now_s)
    read -r b0 i0 s0 <<<"$_ctx_cpu"; read -r b1 i1 s1 <<<"$c1"
    rec "$test" "$rep" cpu_busy "$(awk -v b=$((b1-b0)) -v i=$((i1-i0)) -v s=$((s1-s0)) 'BEGIN{t=b+i+s; printf "%.0f", t?100*b/t:0}')"
    rec "$test" "$rep" steal "$(awk -v b=$((b1-b0)) -v i=$((i1-i0)) -v s=$((s1-s0)) 'BEGIN{t=b+i+s; printf "%.1f", t?100*s/t:0}')"
    rec "$test" "$rep" load1 "$(load1)"
    rec "$test" "$rep" psi "$(psi_cpu)"
    rec "$test" "$rep" psi_io "$(psi_io)"
    dt=$(awk -v a="$_ctx_t0" -v b="$t1" 'BEGIN{print b-a}')
    local p n=0
    for p in "$@"; do
        n=$((n+1))
        rec "$test" "$rep" "srv${n}_cpu" "$(awk -v d=$(( $(proc_ticks "$p") - ${_ctx_pt[$p]:-0} )) -v hz="$CLK_TCK" -v dt="$dt" 'BEGIN{printf "%.0f", (dt>0 ? 100*d/hz/dt : 0)}')"
    done
}

# --- fio --------------------------------------------------------------------
FIO_RUNTIME=${FIO_RUNTIME:-8}
FIO_RAMP=${FIO_RAMP:-1}

# fio_run TEST REP FIO_ARGS... ; records MiBps iops lat_p50/p99/p99.9 (µs, total
# submit-to-completion latency), fio_cpu, and for --fdatasync jobs sync_p50/p99.
fio_run() {
    local test=$1 rep=$2; shift 2
    local out="$TMP/fio-${test//\//_}.json"
    timeout -k 10 $((FIO_RUNTIME + FIO_RAMP + 60)) \
    fio --name="${test//\//_}" --runtime="$FIO_RUNTIME" --ramp_time="$FIO_RAMP" --time_based \
        --lat_percentiles=1 --percentile_list=50:99:99.9 \
        --output-format=json --output="$out" "$@" >/dev/null 2>"$out.err" \
        || { log "fio $test failed: $(tail -3 "$out.err")"; return 1; }
    fio_parse "$test" "$rep" "$out"
}

fio_parse() {
    local test=$1 rep=$2 out=$3
    jq -r --arg t "$test" --arg r "$rep" '
      .jobs[0] as $j
      | (if $j.write.io_bytes > 0 then $j.write else $j.read end) as $d
      | [ ["MiBps", ($d.bw_bytes/1048576)],
          ["iops", $d.iops],
          ["lat_p50_us", ($d.lat_ns.percentile["50.000000"]/1000)],
          ["lat_p99_us", ($d.lat_ns.percentile["99.000000"]/1000)],
          ["lat_p999_us", ($d.lat_ns.percentile["99.900000"]/1000)],
          ["fio_cpu", ($j.usr_cpu + $j.sys_cpu)] ]
        + (if ($j.sync.lat_ns.N // 0) > 0 then
             [ ["sync_p50_us", ($j.sync.lat_ns.percentile["50.000000"]/1000)],
               ["sync_p99_us", ($j.sync.lat_ns.percentile["99.000000"]/1000)] ]
           else [] end)
      | .[] | [$t, $r, .[0], (.[1]|tostring)] | @tsv' "$out" >> "$RAW_TSV"
}

# --- summary -----------------------------------------------------------------
# summarise RAW_TSV > SUMMARY_TSV : test metric median min max n (test order preserved)
summarise() {
    awk -F'\t' '
      { k=$1 SUBSEP $3; if (!(k in n)) { order[++no]=k } ; v[k, ++n[k]]=$4 }
      END {
        for (o=1; o<=no; o++) {
          k=order[o]; m=n[k]; split(k, kk, SUBSEP)
          # insertion sort of numeric values
          delete a; c=0
          for (i=1;i<=m;i++) if (v[k,i] != "NA" && v[k,i] != "") a[++c]=v[k,i]+0
          for (i=2;i<=c;i++){x=a[i];j=i-1;while(j>0&&a[j]>x){a[j+1]=a[j];j--}a[j+1]=x}
          if (c==0) { med="NA"; mn="NA"; mx="NA" }
          else { med=(c%2)?a[(c+1)/2]:(a[c/2]+a[c/2+1])/2; mn=a[1]; mx=a[c] }
          printf "%s\t%s\t%s\t%s\t%s\t%d\n", kk[1], kk[2], med, mn, mx, c
        }
      }' "$1"
}

# get SUMMARY TEST METRIC [field: 3=median 4=min 5=max]
get() { awk -F'\t' -v t="$2" -v m="$3" -v f="${4:-3}" '$1==t && $2==m {print $f; exit}' "$1"; }

fmt() {  # fmt VALUE [decimals]  (NA-safe)
    local v=$1 d=${2:-0}
    if [ -z "$v" ] || [ "$v" = NA ]; then echo NA; else printf "%.${d}f" "$v"; fi
}

machine_facts() {
    echo "date: $(date -Is)"
    echo "host: $(uname -n)  kernel: $(uname -r)  nproc: $(nproc)"
    echo "cpu: $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
    echo "mem: $(free -g | awk '/Mem:/{print $2" GiB total, "$7" GiB available"}')"
    echo "fs: $(df -hT "$BENCH_DIR" | awk 'NR==2{print $1" "$2" size "$3" avail "$5}')  mount: $(findmnt -no OPTIONS -T "$BENCH_DIR")"
    local dev; dev=$(basename "$(df "$BENCH_DIR" | awk 'NR==2{print $1}')")
    if [ -d "/sys/block/$dev/queue" ]; then
        echo "blockdev: $dev rotational=$(cat /sys/block/$dev/queue/rotational) write_cache='$(cat /sys/block/$dev/queue/write_cache)' fua=$(cat /sys/block/$dev/queue/fua 2>/dev/null) sched=$(cat /sys/block/$dev/queue/scheduler)"
    fi
    echo "versions: $(fio --version) | $(qemu-nbd --version | head -1) | $(nbdkit --version) | $(nbdcopy --version | head -1)"
    echo "load at start: $(cat /proc/loadavg)"
}

# --- data file -------------------------------------------------------------------
# ensure_data_file PATH SIZE_MIB : a fully written (non-sparse) file of exactly that
# size, filled by fio (1 MiB O_DIRECT writes, fio's random buffer contents).
ensure_data_file() {
    local f=$1 mib=$2 want
    want=$((mib * 1048576))
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" = "$want" ] && [ -f "$f.filled" ]; then
        log "reusing $f ($mib MiB)"; return 0
    fi
    rm -f "$f" "$f.filled"
    log "creating $f ($mib MiB, fully written)"
    timeout -k 10 600 fio --name=fill --filename="$f" --size="${mib}M" --rw=write --bs=1M --iodepth=8 \
        --ioengine=io_uring --direct=1 --output=/dev/null >/dev/null 2>&1 \
        || timeout -k 10 600 fio --name=fill --filename="$f" --size="${mib}M" --rw=write --bs=1M \
               --ioengine=psync --output=/dev/null >/dev/null
    [ "$(stat -c %s "$f")" = "$want" ] || die "fill of $f failed"
    touch "$f.filled"
}

port_free() { ! ss -Htln "sport = :$1" | grep -q .; }
pick_port() {  # pick_port BASE -> first free TCP port >= BASE
    local p=$1
    while ! port_free "$p"; do p=$((p+1)); done
    echo "$p"
}
