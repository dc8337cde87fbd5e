#!/usr/bin/env bash
# Installs the peers and load generators bench/run.sh uses (Debian 12 packages). Root only.
#   bench/install.sh
# openssl is deliberately not named: that would also upgrade libssl3 under every server.
# Debian's policy-rc.d may start system nginx/haproxy/hitch instances on :80 etc.; the bench
# uses its own instances on 127.0.0.1:18080 and 18443-18448 and never touches those.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
    nginx haproxy hitch wrk nghttp2-client curl gcc libc6-dev \
    procps iproute2 python3 util-linux coreutils
