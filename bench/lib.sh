# shellcheck shell=bash
# Shared helpers for bench/run.sh and bench/ttfb-netns.sh. Adapted from the anchor bench
# (shared/anchors/bench/lib.sh). Every process started here is recorded by PID and stopped by
# PID in bench_cleanup (SIGTERM to the tree, SIGKILL after a bounded wait); never by name.

BENCH_DIR=${BENCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
REPO_DIR=${REPO_DIR:-$(cd "$BENCH_DIR/.." && pwd)}
FERRULE=${FERRULE:-$REPO_DIR/target/release/ferrule}
BACKEND_PORT=${BACKEND_PORT:-18080}
WORKERS=${WORKERS:-2}             # nginx worker_processes / haproxy nbthread / hitch workers
FERRULE_CORES=${FERRULE_CORES:-$WORKERS}   # ferrule --cores (count, list or numa:N)
LISTEN_ADDR=${LISTEN_ADDR:-127.0.0.1}
declare -A TARGET_PORT=([nginx]=18443 [haproxy]=18444 [hitch]=18445 [ferrule]=18447
                        [ferrule-tcp]=18448)
declare -A ADMIN_PORT=([ferrule]=19901 [ferrule-tcp]=19902)

BENCH_PIDS=()                     # every server PID we started (roots of their process trees)
declare -A ROOT_PID=()            # name -> root PID
NETNS_PREFIX=${NETNS_PREFIX:-}    # e.g. "ip netns exec NS" for ttfb-netns.sh

exec 9>&2
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&9; }
die() { log "ERROR: $*"; exit 1; }

# bench_setup: private work dir with certs, a 1 MiB body file, temp dirs.
bench_setup() {
    WORK=$(mktemp -d -t ferrule-bench.XXXXXX)
    chmod 0755 "$WORK"
    "$BENCH_DIR/gen-certs.sh" "$WORK/certs" >/dev/null
    mkdir -p "$WORK/www" "$WORK/backend-tmp" "$WORK/nginx-tmp"
    head -c 1048576 /dev/urandom > "$WORK/www/1m.bin"
    printf 'hello\n' > "$WORK/www/hello"
    chmod -R a+rX "$WORK/www"
    CERT_KIND=${CERT_KIND:-ecdsa}
    CERT="$WORK/certs/$CERT_KIND.crt"; KEY="$WORK/certs/$CERT_KIND.key"; PEM="$WORK/certs/$CERT_KIND.pem"
}

# render TEMPLATE OUT PORT
render() {
    local access_log="access_log off;"
    if [[ ${NGINX_LOG:-0} == 1 ]]; then
        access_log="log_format tlsinfo '\$ssl_protocol \$ssl_cipher reused=\$ssl_session_reused early=\$ssl_early_data \$status \$body_bytes_sent'; access_log $WORK/nginx-tls-access.log tlsinfo;"
    fi
    sed -e "s|@WORK@|$WORK|g" -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" -e "s|@PORT@|$3|g" \
        -e "s|@WORKERS@|$WORKERS|g" -e "s|@CERT@|$CERT|g" -e "s|@KEY@|$KEY|g" -e "s|@PEM@|$PEM|g" \
        -e "s|@ACCESS_LOG@|$access_log|g" -e "s|@LISTEN_ADDR@|$LISTEN_ADDR|g" \
        -e "s|@NGINX_LISTEN_EXTRA@|${NGINX_LISTEN_EXTRA:-}|g" \
        -e "s|@MAXCONN@|$(( ($(ulimit -n) - 200) / 2 ))|g" \
        -e "s|\[127.0.0.1\]:$3|[$LISTEN_ADDR]:$3|g" -e "s|bind 127.0.0.1:$3|bind $LISTEN_ADDR:$3|g" \
        "$1" > "$2"
}

# start_bg NAME CMD...  Records PID. ($NETNS_PREFIX execs into CMD, so the PID is the server's.)
start_bg() {
    local name=$1; shift
    # shellcheck disable=SC2086
    $NETNS_PREFIX "$@" >"$WORK/$name.out" 2>&1 &
    local pid=$!
    BENCH_PIDS+=("$pid")
    ROOT_PID[$name]=$pid
    log "started $name pid=$pid: $*"
}

# wait_port PORT [SECONDS]  -- bounded wait until something listens on PORT
wait_port() {
    local port=$1 t=${2:-10} i
    for ((i = 0; i < t * 10; i++)); do
        # shellcheck disable=SC2086
        if $NETNS_PREFIX ss -Hltn "sport = :$port" 2>/dev/null | grep -q LISTEN; then return 0; fi
        sleep 0.1
    done
    return 1
}

# descendants PID -> PID and all its descendants (by PPID walk), one per line
descendants() {
    local p=$1 c
    echo "$p"
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do descendants "$c"; done
}

# cpu_ticks PID... -> sum of utime+stime (clock ticks) of the given processes (all threads)
cpu_ticks() {
    local sum=0 p rest f
    for p in "$@"; do
        [[ -r /proc/$p/stat ]] || continue
        rest=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        rest=${rest##*) }
        read -r -a f <<<"$rest"     # f[0]=state ... utime=f[11] stime=f[12]
        sum=$((sum + f[11] + f[12]))
    done
    echo "$sum"
}

# tree_cpu_ticks NAME -> CPU ticks of the process tree rooted at ROOT_PID[NAME]
tree_cpu_ticks() {
    local root=${ROOT_PID[$1]:-}
    [[ -n $root ]] || { echo 0; return; }
    # shellcheck disable=SC2046
    cpu_ticks $(descendants "$root")
}

# shard_cpu_ticks NAME -> CPU ticks of ferrule's shard threads only (comm ferrule-core*)
shard_cpu_ticks() {
    local root=${ROOT_PID[$1]:-} sum=0 t rest f comm
    [[ -n $root ]] || { echo 0; return; }
    for t in /proc/"$root"/task/*; do
        comm=$(cat "$t/comm" 2>/dev/null) || continue
        [[ $comm == ferrule-core* ]] || continue
        rest=$(cat "$t/stat" 2>/dev/null) || continue
        rest=${rest##*) }
        read -r -a f <<<"$rest"
        sum=$((sum + f[11] + f[12]))
    done
    echo "$sum"
}

# tree_rss_kib NAME -> summed VmRSS (KiB) of the process tree rooted at ROOT_PID[NAME]
tree_rss_kib() {
    local root=${ROOT_PID[$1]:-} sum=0 p v
    [[ -n $root ]] || { echo 0; return; }
    for p in $(descendants "$root"); do
        v=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null) || continue
        sum=$((sum + ${v:-0}))
    done
    echo "$sum"
}

# sys_busy_ticks -> total non-idle ticks of all CPUs (from /proc/stat)
sys_busy_ticks() {
    local _cpu user nice system idle iowait irq softirq steal rest
    read -r _cpu user nice system idle iowait irq softirq steal rest < /proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}

# sys_task_ticks -> user+nice+system ticks of all CPUs: time charged to tasks, without the
# irq/softirq time (loopback packet processing) that no process is charged for.
sys_task_ticks() {
    local _cpu user nice system rest
    read -r _cpu user nice system rest < /proc/stat
    echo $((user + nice + system))
}

# stop_tree ROOTPID: SIGTERM the root, then (bounded waits) SIGTERM / SIGKILL whatever of its
# process tree (snapshotted before) is still alive. Only PIDs we started, or their children.
stop_tree() {
    local root=$1 pids p i alive
    kill -0 "$root" 2>/dev/null || { wait "$root" 2>/dev/null || true; return 0; }
    # shellcheck disable=SC2207
    pids=($(descendants "$root"))
    kill -TERM "$root" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        ((i == 30)) && for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
        sleep 0.1
    done
    for p in "${pids[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            log "pid $p still alive after SIGTERM, sending SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
    done
    wait "$root" 2>/dev/null || true
    STOPPED_PIDS+=("${pids[@]}")
}
STOPPED_PIDS=()
CLEANUP_HOOKS=()

bench_cleanup() {
    local rc=$? i h
    trap - EXIT INT TERM
    set +e
    for ((i = ${#BENCH_PIDS[@]} - 1; i >= 0; i--)); do stop_tree "${BENCH_PIDS[i]}"; done
    BENCH_PIDS=()
    for h in "${CLEANUP_HOOKS[@]}"; do eval "$h"; done
    if [[ -n ${WORK:-} && -d $WORK && ${KEEP_WORK:-0} != 1 ]]; then rm -rf "$WORK"; fi
    ((${#STOPPED_PIDS[@]})) && log "cleanup: stopped pids ${STOPPED_PIDS[*]}"
    exit "$rc"
}

start_backend() {
    local saved=$LISTEN_ADDR
    LISTEN_ADDR=127.0.0.1
    render "$BENCH_DIR/conf/backend-nginx.conf" "$WORK/backend-nginx.conf" "$BACKEND_PORT"
    LISTEN_ADDR=$saved
    start_bg backend nginx -e stderr -p "$WORK" -c "$WORK/backend-nginx.conf" -g 'daemon off;'
    wait_port "$BACKEND_PORT" 10 || die "backend did not start: $(cat "$WORK/backend.out")"
}

# start_target NAME
start_target() {
    local name=$1 port=${TARGET_PORT[$1]}
    case $name in
        nginx)
            render "$BENCH_DIR/conf/nginx-tls.conf" "$WORK/nginx-tls.conf" "$port"
            start_bg nginx nginx -e stderr -p "$WORK" -c "$WORK/nginx-tls.conf" -g 'daemon off;' ;;
        haproxy)
            render "$BENCH_DIR/conf/haproxy.cfg" "$WORK/haproxy.cfg" "$port"
            start_bg haproxy haproxy -db -f "$WORK/haproxy.cfg" ;;
        hitch)
            render "$BENCH_DIR/conf/hitch.conf" "$WORK/hitch.conf" "$port"
            start_bg hitch hitch --config="$WORK/hitch.conf" ;;
        ferrule | ferrule-tcp)
            local mode=http
            [[ $name == ferrule-tcp ]] && mode=tcp
            start_bg "$name" "$FERRULE" serve --config "$BENCH_DIR/conf/ferrule.toml" \
                --listen "$LISTEN_ADDR:$port" --backend "127.0.0.1:$BACKEND_PORT" \
                --cert "$CERT" --key "$KEY" --cores "$FERRULE_CORES" \
                --admin "127.0.0.1:${ADMIN_PORT[$name]}" --mode "$mode" ;;
        *) die "unknown target $name" ;;
    esac
    wait_port "$port" 10 || die "$name did not start: $(tail -5 "$WORK/$name.out")"
}

# ferrule_metrics NAME -> the admin /metrics text ("" when unreachable)
ferrule_metrics() {
    # shellcheck disable=SC2086
    $NETNS_PREFIX curl -s --max-time 3 "http://127.0.0.1:${ADMIN_PORT[$1]}/metrics" || true
}

# ferrule_hs NAME KIND VERSION -> sum of ferrule_handshakes_total{kind,version} over cores
ferrule_hs() {
    ferrule_metrics "$1" | awk -v k="kind=\"$2\"" -v v="version=\"$3\"" \
        '/^ferrule_handshakes_total/ && index($0, k) && index($0, v) {s += $NF} END {printf "%d", s}'
}
