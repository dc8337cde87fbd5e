#!/usr/bin/env bash
# Runs the integration test binaries again and again, to catch what fails one run in ten or
# rarer: a lost wake-up that stalls one connection, a race at start-up. A single run of the
# suite, as CI does, passes most of the time with such a bug. Run it after any change to the
# executor, vendor/glommio or the connection lifecycle.
#
#   tests/stress.sh [ROUNDS] [--hog]      # default 40 rounds; about 14 s a round here
#
# --hog keeps one CPU busy with a shell loop for the whole run, which widens timing windows.
# Needs what the tests need (see .ci/run). Builds the tests first. A failing run's output is
# kept in $OUT (default target/stress/<timestamp>/) and named in the summary at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=40
hog=0
for arg in "$@"; do
    case $arg in
        --hog) hog=1 ;;
        ''|*[!0-9]*) echo "usage: tests/stress.sh [ROUNDS] [--hog]" >&2; exit 2 ;;
        *) rounds=$arg ;;
    esac
done
out=${OUT:-target/stress/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

# The test binaries, as cargo names them: one line of JSON per artifact.
mapfile -t binaries < <(
    cargo test --release --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["profile"]["test"]:
        print(message["executable"])
'
)
((${#binaries[@]})) || { echo "stress: no test binaries were built" >&2; exit 1; }

hog_pid=
if ((hog)); then
    (while :; do :; done) &
    hog_pid=$!
fi
trap '[[ -n $hog_pid ]] && kill "$hog_pid" 2>/dev/null; true' EXIT

ulimit -l unlimited 2>/dev/null || true
ulimit -n 65536 2>/dev/null || true

failures=0
for ((round = 1; round <= rounds; round++)); do
    for binary in "${binaries[@]}"; do
        name=$(basename "$binary")
        # A stall shows as a test that runs into its own 10 s timeouts, or as no end at all.
        if ! timeout -k 5 300 "$binary" > "$out/current.log" 2>&1; then
            failures=$((failures + 1))
            mv "$out/current.log" "$out/round$round-$name.log"
            echo "round $round: $name FAILED ($out/round$round-$name.log)"
        fi
    done
    echo "round $round of $rounds: $failures failed runs so far"
done
rm -f "$out/current.log"
echo "stress: $rounds rounds of ${#binaries[@]} test binaries, $failures failed runs"
((failures == 0))
