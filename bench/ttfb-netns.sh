#!/usr/bin/env bash
# Time to first response byte at 50 ms RTT: full handshake, resumed, 0-RTT, 0-RTT + TCP Fast
# Open, for ferrule and nginx (ssl_early_data on). Called by run.sh; runs alone too (root):
#
#   bench/ttfb-netns.sh            # TTFB_TARGETS="ferrule nginx" TTFB_N=9 OUT_JSON=file
#
# Creates two network namespaces of its own (server side and client side) joined by a pair
# of TUN devices that bench/delay-wire.py bridges with a 25 ms delay each way (50 ms RTT; this
# kernel lacks sch_netem, see there), runs an origin, ferrule and nginx
# inside the server namespace, drives them from the client namespace with `ferrule loadgen
# --concurrency 1` (p50 of TTFB_N sequential connections; the first of each run is the full
# handshake that fetches a ticket), and removes both namespaces at exit. Traffic never leaves
# the two namespaces. TFO: the tfo-shim.so LD_PRELOAD sets TCP_FASTOPEN_CONNECT on loadgen's
# sockets; the client namespace's TcpExtTCPFastOpenActive counter proves it was used.
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
source "$BENCH_DIR/lib.sh"

TTFB_N=${TTFB_N:-9}
read -r -a TT <<<"${TTFB_TARGETS:-ferrule nginx}"
OUT_JSON=${OUT_JSON:-/dev/stdout}
DELAY_MS=${DELAY_MS:-25}          # each direction; RTT = 2 * DELAY_MS
RTT_MS=$((2 * DELAY_MS))
NS_S=ferrule-ttfb-srv-$$; NS_C=ferrule-ttfb-cli-$$
SRV_IP=10.254.25.1; CLI_IP=10.254.25.2   # exist only inside the two namespaces below

[[ $(id -u) == 0 ]] || die "needs root (ip netns, tc)"
if [[ ${NO_BUILD:-0} != 1 ]]; then (cd "$REPO_DIR" && cargo build --release 2>&1 | tail -1) >&9; fi
[[ -x $FERRULE ]] || die "no ferrule binary at $FERRULE"

netns_cleanup() {
    ip netns del "$NS_C" 2>/dev/null || true
    ip netns del "$NS_S" 2>/dev/null || true
    log "removed netns $NS_S $NS_C"
}
CLEANUP_HOOKS+=(netns_cleanup)
trap bench_cleanup EXIT INT TERM
bench_setup
cc -shared -fPIC -O2 -o "$WORK/tfo-shim.so" "$BENCH_DIR/tfo-shim.c" -ldl

ip netns add "$NS_S"; ip netns add "$NS_C"
# The link: netem would be `tc qdisc add dev X root netem delay 25ms` on each end of a veth
# pair, but this kernel has no sch_netem. delay-wire.py is a userspace wire (two TUN devices)
# that delays each packet by DELAY_MS in each direction instead; same effect on TCP.
if tc qdisc add dev lo root netem delay 0ms 2>/dev/null; then
    tc qdisc del dev lo root 2>/dev/null || true
    log "note: netem is available here, but delay-wire.py is used everywhere for consistency"
fi
start_bg wire python3 "$BENCH_DIR/delay-wire.py" "fr$$s" "fr$$c" "$DELAY_MS" 600
for ((i = 0; i < 50; i++)); do grep -q READY "$WORK/wire.out" && break; sleep 0.1; done
grep -q READY "$WORK/wire.out" || die "delay-wire.py did not start: $(cat "$WORK/wire.out")"
ip link set "fr$$s" netns "$NS_S"; ip link set "fr$$c" netns "$NS_C"
ip -n "$NS_S" addr add "$SRV_IP" peer "$CLI_IP" dev "fr$$s"
ip -n "$NS_C" addr add "$CLI_IP" peer "$SRV_IP" dev "fr$$c"
for ns in "$NS_S" "$NS_C"; do ip -n "$ns" link set lo up; done
ip -n "$NS_S" link set "fr$$s" up; ip -n "$NS_C" link set "fr$$c" up
ip netns exec "$NS_S" sysctl -qw net.ipv4.tcp_fastopen=3
ip netns exec "$NS_C" sysctl -qw net.ipv4.tcp_fastopen=1
log "netns $NS_S ($SRV_IP) <-> $NS_C ($CLI_IP), ${DELAY_MS} ms each way (delay-wire.py)"

NETNS_PREFIX="ip netns exec $NS_S"
LISTEN_ADDR=$SRV_IP
NGINX_LISTEN_EXTRA="fastopen=256"
start_backend
for t in "${TT[@]}"; do start_target "$t"; done

# RTT check: median TCP connect time (SYN -> SYN/ACK = one round trip) to the origin-facing port.
ping_ms=$(ip netns exec "$NS_C" timeout -k 2 20 python3 -c '
import socket, statistics, sys, time
ts = []
for _ in range(5):
    t = time.monotonic(); s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
    ts.append((time.monotonic() - t) * 1000); s.close()
print(f"{statistics.median(ts):.1f}")' "$SRV_IP" "${TARGET_PORT[${TT[0]}]}" 2>/dev/null) || ping_ms=""
log "measured TCP connect RTT: ${ping_ms:-?} ms"

tfo_active() {
    ip netns exec "$NS_C" awk '/^TcpExt:/ {if (!h) {split($0, k); h=1} else {split($0, v);
        for (i in k) if (k[i] == "TCPFastOpenActive") print v[i]}}' /proc/net/netstat
}

rows=()
for t in "${TT[@]}"; do
    port=${TARGET_PORT[$t]}
    for row in full resumed zero-rtt zero-rtt+tfo full+tfo; do
        mode=${row%+tfo}; pre=()
        [[ $row == *+tfo ]] && pre=(env LD_PRELOAD="$WORK/tfo-shim.so")
        a0=$(tfo_active)
        out=$(ip netns exec "$NS_C" timeout -k 2 30 "${pre[@]}" "$FERRULE" loadgen \
            --connect "$SRV_IP:$port" --path /early --mode "$mode" --tls 1.3 --concurrency 1 \
            --seconds 20 --max-requests "$TTFB_N" --insecure 2>&1 | tail -1) || true
        a1=$(tfo_active)
        [[ $out == \{* ]] || { log "$t $row: loadgen failed: $out"; out=null; }
        log "$t $row: $out (TFO active opens: $((a1 - a0)))"
        rows+=("{\"target\":\"$t\",\"row\":\"$row\",\"tfo_active\":$((a1 - a0)),\"loadgen\":${out:-null}}")
    done
done
if [[ " ${TT[*]} " == *" ferrule "* ]]; then
    log "ferrule early-data counters: $(ferrule_metrics ferrule | grep -E '^ferrule_early' | tr '\n' ' ')"
fi
{
    printf '{"rtt_ms":%s,"ping_ms":%s,"n":%s,"tool":"ferrule loadgen --concurrency 1 (p50)","rows":[' \
        "$RTT_MS" "${ping_ms:-null}" "$TTFB_N"
    (IFS=,; printf '%s' "${rows[*]}")
    printf ']}\n'
} > "$OUT_JSON"
