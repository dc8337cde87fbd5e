#!/usr/bin/env python3
"""A two-port "wire" that delays every IP packet by DELAY_MS each way (netem stand-in).

    delay-wire.py NAME_A NAME_B DELAY_MS MAX_SECONDS

This kernel has no sch_netem (CONFIG_NET_SCH_NETEM is off), so `tc qdisc ... netem delay`
fails. Instead this script creates two TUN interfaces (IFF_TUN, no packet info), prints
"READY", and from then on copies each packet read from one to the other DELAY_MS later.
ttfb-netns.sh moves the two interfaces into its own server and client namespaces, so
traffic only ever flows between those namespaces. Packets are neither reordered nor dropped
(a FIFO per direction); the sleep granularity is ~0.1 ms. Exits after MAX_SECONDS (bounded)
or on SIGTERM. Standard library only; needs root (/dev/net/tun).
"""
import collections
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    name_a, name_b = sys.argv[1], sys.argv[2]
    delay = float(sys.argv[3]) / 1000.0
    stop_at = time.monotonic() + min(float(sys.argv[4]), 3600.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fa, fb = open_tun(name_a), open_tun(name_b)
    other = {fa: fb, fb: fa}
    queues = {fa: collections.deque(), fb: collections.deque()}  # packets to write to fd
    print("READY", flush=True)
    while time.monotonic() < stop_at:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else 0.5
        readable, _, _ = select.select([fa, fb], [], [], min(timeout, 0.5))
        now = time.monotonic()
        for fd in readable:
            while True:
                try:
                    packet = os.read(fd, 65535)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not packet:
                    break
                queues[other[fd]].append((now + delay, packet))
        now = time.monotonic()
        for fd, q in queues.items():
            while q and q[0][0] <= now:
                _, packet = q.popleft()
                try:
                    os.write(fd, packet)
                except OSError:
                    pass  # interface down or queue full: a lost packet, TCP retransmits


if __name__ == "__main__":
    main()
