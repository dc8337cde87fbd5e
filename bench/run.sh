#!/usr/bin/env bash
# ferrule vs nginx / HAProxy / hitch, side by side in one run, on loopback (+ a private netns
# pair for the 50 ms RTT time-to-first-byte rows). See bench/README.md.
#
#   bench/run.sh                 # ~6.5 min on a quiet box: build, 2 reps, TTFB in a netns
#   QUICK=1 bench/run.sh         # ~3 min: 1 rep, shorter runs, 2,000 idle connections
#
# Output: $OUT (default bench/results/<timestamp>/): raw/ tool outputs, meta.tsv, verify.txt,
# results.json, summary.md (the table printed at the end) and chart.svg.
# Knobs: IDLE_WAIT_S=20 (per run) / IDLE_WAIT_TOTAL_S=120 (whole run) to wait for a quiet box,
# PEERS="nginx haproxy hitch", REPS, CERT_KIND=ecdsa|rsa, WORKERS=2 (FERRULE_CORES
# defaults to it), HS_CONNS, N_FULL, N_RESUMED, LG_CONNS, LG_DUR, KA_CONNS, KA_DUR, BULK_CONNS,
# BULK_DUR, PACED_DUR, IDLE_CONNS (<= 50000), SKIP_TTFB=1, NO_BUILD=1, KEEP_WORK=1, OUT=dir.
#
# All load goes to 127.0.0.1 (or to the netns pair ttfb-netns.sh creates and removes). Every
# load-generator call is bounded in count (h2load -n, --max-requests, wrk-cap.lua) and in time
# (-d/--seconds plus `timeout -k 2 $GUARD_S`). Every process started is recorded by PID and
# stopped by PID at exit (lib.sh: bench_cleanup); nothing is killed by name.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$BENCH_DIR/lib.sh"

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    REPS=${REPS:-1}; N_FULL=${N_FULL:-4000}; N_RESUMED=${N_RESUMED:-6000}
    LG_DUR=${LG_DUR:-3}; KA_DUR=${KA_DUR:-3}; BULK_DUR=${BULK_DUR:-3}; PACED_DUR=${PACED_DUR:-3}
    IDLE_CONNS=${IDLE_CONNS:-2000}; TTFB_N=${TTFB_N:-5}
else
    REPS=${REPS:-2}; N_FULL=${N_FULL:-8000}; N_RESUMED=${N_RESUMED:-10000}
    LG_DUR=${LG_DUR:-4}; KA_DUR=${KA_DUR:-4}; BULK_DUR=${BULK_DUR:-4}; PACED_DUR=${PACED_DUR:-5}
    IDLE_CONNS=${IDLE_CONNS:-10000}; TTFB_N=${TTFB_N:-9}
fi
HS_CONNS=${HS_CONNS:-32}; LG_CONNS=${LG_CONNS:-32}; LG_MAX=${LG_MAX:-200000}
KA_CONNS=${KA_CONNS:-64}; BULK_CONNS=${BULK_CONNS:-8}; PACED_CONNS=${PACED_CONNS:-64}
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
GUARD_S=${GUARD_S:-30}
((IDLE_CONNS <= 50000)) || die "IDLE_CONNS is capped at 50000"
export WRK_MAX_REQ=${WRK_MAX_REQ:-2000000}
OUT=${OUT:-$BENCH_DIR/results/$(date +%Y%m%d-%H%M%S)}
export TTFB_N
T_START=$(date +%s)

# ---- prerequisites: skip what is missing, say which package brings it ----------------------
declare -A PKG=([nginx]=nginx [haproxy]=haproxy [hitch]=hitch [wrk]=wrk [h2load]=nghttp2-client
                [curl]=curl [cc]=gcc [python3]=python3 [ss]=iproute2 [openssl]=openssl)
missing_pkgs=()
for tool in nginx curl cc python3 ss openssl; do
    command -v "$tool" >/dev/null || missing_pkgs+=("${PKG[$tool]}")
done
((${#missing_pkgs[@]} == 0)) || die "missing required tools; run bench/install.sh or: apt-get install ${missing_pkgs[*]}"
HAVE_H2LOAD=0; command -v h2load >/dev/null && HAVE_H2LOAD=1
HAVE_WRK=0; command -v wrk >/dev/null && HAVE_WRK=1
((HAVE_H2LOAD)) || log "h2load missing (apt-get install nghttp2-client): TLS 1.3 full/resumed rows use ferrule loadgen for every target"
((HAVE_WRK)) || log "wrk missing (apt-get install wrk): keep-alive, bulk and fixed-rate rows are skipped"
PEER_LIST=()
for p in ${PEERS:-nginx haproxy hitch}; do
    if command -v "$p" >/dev/null; then PEER_LIST+=("$p"); else
        log "peer $p not installed: skipped (apt-get install ${PKG[$p]:-$p}, or bench/install.sh)"
    fi
done
TARGETS=(ferrule "${PEER_LIST[@]}")

# ---- build ferrule ----------------------------------------------------------------------
if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "building ferrule (cargo build --release in $REPO_DIR)"
    (cd "$REPO_DIR" && cargo build --release 2>&1 | tail -3) >&9
fi
[[ -x $FERRULE ]] || die "no ferrule binary at $FERRULE"

for t in "${TARGETS[@]}" ferrule-tcp; do
    port=${TARGET_PORT[$t]}
    if ss -Hltn "sport = :$port" | grep -q LISTEN; then die "port $port (for $t) already in use"; fi
done
# 10,000 idle connections need 2-3 fds each across client, terminator and origin.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# hitch and HAProxy hold 2 fds per client connection (client + origin): stay under the limit.
max_idle=$(( ($(ulimit -n) - 400) / 2 ))
if ((IDLE_CONNS > max_idle)); then
    log "IDLE_CONNS $IDLE_CONNS lowered to $max_idle: RLIMIT_NOFILE is $(ulimit -n) here"
    IDLE_CONNS=$max_idle
fi

mkdir -p "$OUT/raw"
trap bench_cleanup EXIT INT TERM
bench_setup
cc -shared -fPIC -O2 -o "$WORK/no-resume-shim.so" "$BENCH_DIR/no-resume-shim.c" -ldl

client() { timeout -k 2 "$GUARD_S" "$@"; }

{
    echo "date: $(date -Is)"
    echo "host: $(uname -srm); cpus: $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
    echo "targets: ${TARGETS[*]} ferrule-tcp; reps: $REPS; quick: $QUICK; cert: $CERT_KIND;" \
         "workers: $WORKERS; ferrule --cores $FERRULE_CORES"
    echo "full: h2load -c $HS_CONNS -n $N_FULL; resumed: -n $N_RESUMED; loadgen: -c $LG_CONNS" \
         "${LG_DUR}s; keepalive: wrk -c $KA_CONNS ${KA_DUR}s; bulk: wrk -c $BULK_CONNS ${BULK_DUR}s;" \
         "paced: wrk -c $PACED_CONNS ${PACED_DUR}s; idle conns: $IDLE_CONNS"
    echo "ferrule: $("$FERRULE" --version) ($(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null))"
    echo "versions: $(nginx -v 2>&1 | sed 's/.*: //');" \
         "$(command -v haproxy >/dev/null && haproxy -v | head -1 | cut -d' ' -f1-3);" \
         "$(command -v hitch >/dev/null && hitch --version 2>&1 | head -1);" \
         "$( ((HAVE_H2LOAD)) && h2load --version);" \
         "$( ((HAVE_WRK)) && wrk -v 2>&1 | head -1 | cut -d' ' -f1-2); $(openssl version)"
} > "$OUT/env.txt"
cat "$OUT/env.txt" >&9

start_backend
for t in "${TARGETS[@]}" ferrule-tcp; do start_target "$t"; done

url_for() { echo "https://127.0.0.1:${TARGET_PORT[$1]}"; }

# ---- sanity + warm-up ---------------------------------------------------------------------
for t in "${TARGETS[@]}" ferrule-tcp; do
    u=$(url_for "$t")
    body=$(curl -sk --max-time 5 "$u/hello") || die "$t: GET /hello failed"
    [[ $body == hello ]] || die "$t: unexpected body '$body'"
    size=$(curl -sk --max-time 10 -o /dev/null -w '%{size_download}' "$u/1m")
    [[ $size == 1048576 ]] || die "$t: /1m returned $size bytes (expected 1048576)"
    client "$FERRULE" loadgen --connect "127.0.0.1:${TARGET_PORT[$t]}" --path /hello \
        --mode keepalive --concurrency 8 --seconds 1 --max-requests 2000 --insecure \
        > "$OUT/raw/warmup.$t.json" 2>&1 || die "$t: warm-up failed: $(cat "$OUT/raw/warmup.$t.json")"
done
log "sanity OK: /hello and /1m (1 MiB) through every target"

# ---- verify what the load generators really do (nginx's $ssl_session_reused) -------------
# A separate, logging nginx on its own port, so the measured nginx pays no access-log cost.
verify_loadgens() {
    TARGET_PORT[nginxlog]=18449
    local u="https://127.0.0.1:18449/hello" alog="$WORK/nginx-tls-access.log"
    NGINX_LOG=1 render "$BENCH_DIR/conf/nginx-tls.conf" "$WORK/nginxlog.conf" 18449
    start_bg nginxlog nginx -e stderr -p "$WORK" -c "$WORK/nginxlog.conf" -g 'daemon off;'
    wait_port 18449 10 || { log "verify: logging nginx did not start"; return 0; }
    count() {  # LABEL
        sleep 0.3
        printf '%-52s full=%-5s resumed=%-5s %s\n' "$1" "$(grep -c 'reused=\.' "$alog" || true)" \
            "$(grep -c 'reused=r' "$alog" || true)" \
            "$(awk '{print $1}' "$alog" | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
        : > "$alog"
    }
    {
        echo "# nginx access log (\$ssl_session_reused) per load-generator invocation, 2000 requests each"
        if ((HAVE_H2LOAD)); then
            client env LD_PRELOAD="$WORK/no-resume-shim.so" h2load --h1 -t 2 -c 16 -n 2000 \
                -H 'Connection: close' "$u" > /dev/null 2>&1
            count "h2load + no-resume shim (row full-1.3)"
            client h2load --h1 -t 2 -c 16 -n 2000 -H 'Connection: close' "$u" > /dev/null 2>&1
            count "h2load (row resumed-1.3)"
        fi
        local v
        for v in 1.2 1.3; do
            client "$FERRULE" loadgen --connect 127.0.0.1:18449 --path /hello --mode resumed \
                --tls "$v" --concurrency 16 --seconds 10 --max-requests 2000 --insecure > /dev/null
            count "ferrule loadgen --mode resumed --tls $v"
            client "$FERRULE" loadgen --connect 127.0.0.1:18449 --path /hello --mode full \
                --tls "$v" --concurrency 16 --seconds 10 --max-requests 2000 --insecure > /dev/null
            count "ferrule loadgen --mode full --tls $v"
        done
    } > "$OUT/verify.txt" 2>&1
    stop_target nginxlog
    cat "$OUT/verify.txt" >&9
}
stop_target() {
    local name=$1 root=${ROOT_PID[$1]:-} keep=() p
    [[ -n $root ]] || return 0
    stop_tree "$root"
    for p in "${BENCH_PIDS[@]}"; do [[ $p == "$root" ]] || keep+=("$p"); done
    BENCH_PIDS=("${keep[@]}")
    unset "ROOT_PID[$name]"
}
verify_loadgens

printf 'target\ttest\trep\trc\twall_s\tterm_cpu_s\tshard_cpu_s\tbackend_cpu_s\tsys_busy_s\tfull13\tres13\tfull12\tres12\ttool\traw\tclient_cpu_s\tforeign_cpu_s\n' \
    > "$OUT/meta.tsv"
HZ=$(getconf CLK_TCK)
secs() { awk -v d="$1" -v h="$HZ" 'BEGIN{printf "%.2f", d/h}'; }

# CPU seconds (user+sys) of this shell's waited-for children so far: the load generators.
# `times` must run in this shell (not in $(...)) to see them, hence the file.
times_s() {  # call `times > "$WORK/times.txt"` first, in this shell
    awk 'NR == 2 { s = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); s += a[1] * 60 + a[2] }
                   printf "%.2f", s }' "$WORK/times.txt"
}

# Other work on the box (another build, say) skews everything. Before each run, wait up to
# IDLE_WAIT_S for the system to be nearly idle (< 25% of one CPU over 0.5 s); each run also
# records "foreign" CPU = CPU charged to tasks (user+nice+system from /proc/stat, so without
# irq/softirq time) - terminator - origin - load generator.
# IDLE_WAIT_TOTAL_S bounds the waiting over the whole run.
IDLE_WAIT_S=${IDLE_WAIT_S:-20}
IDLE_BUDGET_HALF_S=$((2 * ${IDLE_WAIT_TOTAL_S:-120}))
wait_idle() {
    local i a=0 b=0
    ((IDLE_BUDGET_HALF_S > 0)) || return 0
    for ((i = 0; i < IDLE_WAIT_S * 2 && IDLE_BUDGET_HALF_S > 0; i++)); do
        a=$(sys_busy_ticks); sleep 0.5; b=$(sys_busy_ticks)
        if (( (b - a) * 100 < HZ * 25 / 2 )); then return 0; fi
        IDLE_BUDGET_HALF_S=$((IDLE_BUDGET_HALF_S - 1))
    done
    log "warning: box still busy after ${IDLE_WAIT_S}s ($(( (b - a) * 200 / HZ ))% of a CPU); measuring anyway"
}

# measure TARGET TEST REP
measure() {
    local t=$1 test=$2 rep=$3 u port raw rc t0 t1 c0 c1 s0 s1 q0 q1 b0 b1 y0 y1 k0 k1 tool
    local -a h0=(0 0 0 0) h1=(0 0 0 0)
    u=$(url_for "$t"); port=${TARGET_PORT[$t]}
    raw="raw/$t.$test.$rep.txt"
    lg() {  # ferrule loadgen MODE TLS
        tool="ferrule loadgen"
        client "$FERRULE" loadgen --connect "127.0.0.1:$port" --path /hello --mode "$1" --tls "$2" \
            --concurrency "$LG_CONNS" --seconds "$LG_DUR" --max-requests "$LG_MAX" --insecure
    }
    if [[ $t == ferrule* ]]; then
        h0=("$(ferrule_hs "$t" full 1.3)" "$(ferrule_hs "$t" resumed 1.3)"
            "$(ferrule_hs "$t" full 1.2)" "$(ferrule_hs "$t" resumed 1.2)")
    fi
    wait_idle
    times > "$WORK/times.txt"; k0=$(times_s)
    c0=$(tree_cpu_ticks "$t"); y0=$(shard_cpu_ticks "$t"); b0=$(tree_cpu_ticks backend)
    s0=$(sys_busy_ticks); q0=$(sys_task_ticks); t0=$(date +%s%N)
    set +e
    case $test in
        full13)
            if ((HAVE_H2LOAD)); then
                tool="h2load+no-resume-shim"
                client env LD_PRELOAD="$WORK/no-resume-shim.so" h2load --h1 -t "$LOADGEN_THREADS" \
                    -c "$HS_CONNS" -n "$N_FULL" -H 'Connection: close' "$u/hello"
            else lg full 1.3; fi ;;
        resumed13)
            if ((HAVE_H2LOAD)); then
                tool="h2load"
                client h2load --h1 -t "$LOADGEN_THREADS" -c "$HS_CONNS" -n "$N_RESUMED" \
                    -H 'Connection: close' "$u/hello"
            else lg resumed 1.3; fi ;;
        full12) lg full 1.2 ;;
        resumed12) lg resumed 1.2 ;;
        keepalive)
            tool="wrk"
            client wrk -t "$LOADGEN_THREADS" -c "$KA_CONNS" -d "${KA_DUR}s" --latency \
                -s "$BENCH_DIR/wrk-cap.lua" "$u/hello" ;;
        bulk)
            tool="wrk"
            client wrk -t "$LOADGEN_THREADS" -c "$BULK_CONNS" -d "${BULK_DUR}s" --latency \
                -s "$BENCH_DIR/wrk-cap.lua" "$u/1m" ;;
        paced)
            tool="wrk+wrk-paced.lua@$PACED_RATE/s"
            WRK_RATE=$PACED_RATE WRK_THREADS=$LOADGEN_THREADS client wrk -t "$LOADGEN_THREADS" \
                -c "$PACED_CONNS" -d "${PACED_DUR}s" -s "$BENCH_DIR/wrk-paced.lua" "$u/hello" ;;
        *) die "unknown test $test" ;;
    esac > "$OUT/$raw" 2>&1
    rc=$?
    set -e
    t1=$(date +%s%N); s1=$(sys_busy_ticks); q1=$(sys_task_ticks); b1=$(tree_cpu_ticks backend)
    y1=$(shard_cpu_ticks "$t"); c1=$(tree_cpu_ticks "$t")
    times > "$WORK/times.txt"; k1=$(times_s)
    local client_s foreign_s
    client_s=$(awk -v a="$k0" -v b="$k1" 'BEGIN{printf "%.2f", b - a}')
    foreign_s=$(awk -v s=$((q1 - q0)) -v c=$((c1 - c0)) -v b=$((b1 - b0)) -v h="$HZ" \
        -v k="$client_s" 'BEGIN{printf "%.2f", (s - c - b) / h - k}')
    if [[ $t == ferrule* ]]; then
        h1=("$(ferrule_hs "$t" full 1.3)" "$(ferrule_hs "$t" resumed 1.3)"
            "$(ferrule_hs "$t" full 1.2)" "$(ferrule_hs "$t" resumed 1.2)")
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$t" "$test" "$rep" "$rc" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e9}')" \
        "$(secs $((c1 - c0)))" "$(secs $((y1 - y0)))" "$(secs $((b1 - b0)))" "$(secs $((s1 - s0)))" \
        $((h1[0] - h0[0])) $((h1[1] - h0[1])) $((h1[2] - h0[2])) $((h1[3] - h0[3])) \
        "$tool" "$raw" "$client_s" "$foreign_s" >> "$OUT/meta.tsv"
    log "$t $test rep$rep rc=$rc $(grep -m1 -E 'req/s|Requests/sec|"rate"|paced_rate' "$OUT/$raw" \
        | tr -s ' ' | cut -c1-150)"
    sleep "${SETTLE_S:-0.5}"
}

handshake_tests=(full13 resumed13 resumed12)
stream_tests=()
((HAVE_WRK)) && stream_tests=(keepalive bulk)
for ((rep = 1; rep <= REPS; rep++)); do
    for test in "${handshake_tests[@]}" "${stream_tests[@]}"; do
        for t in "${TARGETS[@]}"; do measure "$t" "$test" "$rep"; done
        # TCP mode is compared with hitch (both copy bytes, no HTTP parsing): keep-alive only.
        [[ $test == keepalive ]] && measure ferrule-tcp keepalive "$rep"
    done
    measure ferrule full12 "$rep"   # for ferrule's own resumed/full CPU ratio in TLS 1.2
done

# ---- latency at a fixed offered rate: half of nginx's keep-alive peak in this run ----------
if ((HAVE_WRK)); then
    PACED_RATE=$(awk -F'\t' '$1=="nginx" && $2=="keepalive" {print $15}' "$OUT/meta.tsv" |
        while read -r f; do grep -m1 'Requests/sec' "$OUT/$f" | awk '{print $2}'; done |
        sort -n | awk '{a[NR]=$1} END {if (NR) printf "%d", a[int((NR+1)/2)] / 2}')
    PACED_RATE=${PACED_RATE:-40000}
    [[ -n $PACED_RATE && $PACED_RATE -gt 0 ]] || PACED_RATE=40000
    log "fixed-rate latency at $PACED_RATE req/s (half of nginx's keep-alive peak)"
    for t in "${TARGETS[@]}"; do measure "$t" paced 1; done
fi

# ---- memory per idle TLS connection --------------------------------------------------------
printf 'target\tconns_asked\tconns_open\tfailed\trss_before_kib\trss_held_kib\trss_after_kib\n' \
    > "$OUT/idle.tsv"
for t in "${TARGETS[@]}"; do
    r0=$(tree_rss_kib "$t")
    : > "$WORK/idle.$t.out"
    client python3 "$BENCH_DIR/idle-conns.py" 127.0.0.1 "${TARGET_PORT[$t]}" "$IDLE_CONNS" 4 \
        > "$WORK/idle.$t.out" 2>&1 &
    ipid=$!
    for ((i = 0; i < 600; i++)); do
        grep -q READY "$WORK/idle.$t.out" && break
        kill -0 "$ipid" 2>/dev/null || break
        sleep 0.1
    done
    sleep 1
    r1=$(tree_rss_kib "$t")
    read -r _ n_ok n_fail < <(grep -m1 READY "$WORK/idle.$t.out" || echo "READY 0 $IDLE_CONNS")
    wait "$ipid" 2>/dev/null || true
    sleep 1
    r2=$(tree_rss_kib "$t")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$IDLE_CONNS" "$n_ok" "$n_fail" "$r0" "$r1" "$r2" \
        >> "$OUT/idle.tsv"
    log "$t idle: $n_ok open ($n_fail failed), RSS $r0 -> $r1 KiB" \
        "($(awk -v a="$r0" -v b="$r1" -v n="$n_ok" 'BEGIN{printf "%.1f", n ? (b-a)/n : 0}') KiB/conn)"
done

# ---- 0-RTT / resumption time to first byte at 50 ms RTT (own netns pair) ----------------
for t in "${TARGETS[@]}"; do stop_target "$t"; done
stop_target ferrule-tcp
if [[ ${SKIP_TTFB:-0} != 1 ]]; then
    if [[ $(id -u) == 0 && -c /dev/net/tun ]]; then
        TTFB_TARGETS="ferrule $(printf '%s\n' "${PEER_LIST[@]}" | grep -x nginx || true)" \
            NO_BUILD=1 OUT_JSON="$OUT/ttfb.json" "$BENCH_DIR/ttfb-netns.sh" 2>&1 |
            tee "$OUT/ttfb.log" >&9 || log "ttfb-netns.sh failed (see $OUT/ttfb.log)"
    else
        log "TTFB rows skipped: need root and /dev/net/tun"
    fi
fi

python3 "$BENCH_DIR/report.py" "$OUT"
log "done in $(($(date +%s) - T_START)) s; results in $OUT (summary.md, results.json, chart.svg)"
