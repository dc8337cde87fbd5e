#!/usr/bin/env python3
"""Open N TLS connections to HOST:PORT, complete each handshake, then hold them idle.

    idle-conns.py HOST PORT N HOLD_SECONDS

Prints "READY <open> <failed>" on stdout once all handshakes are done, holds the connections
for HOLD_SECONDS, closes them and exits. Used by
run.sh to measure the terminator's RSS growth per idle TLS connection. Standard library only;
certificate checks are off because the bench certificates are throwaway self-signed ones.
"""
import resource
import socket
import ssl
import sys
import threading
import time


def main():
    host, port, count, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    count = max(0, min(count, 100_000))  # bounded whatever the caller asks
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    held, failed, lock = [], [0], threading.Lock()
    deadline = time.monotonic() + 60  # never spend more than a minute opening

    def opener(n):
        for _ in range(n):
            if time.monotonic() > deadline:
                with lock:
                    failed[0] += 1
                continue
            try:
                raw = socket.create_connection((host, port), timeout=10)
                tls = ctx.wrap_socket(raw, server_hostname="localhost")
                with lock:
                    held.append(tls)
            except OSError:
                with lock:
                    failed[0] += 1

    threads = 8
    workers = [
        threading.Thread(target=opener, args=(count // threads + (i < count % threads),))
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"READY {len(held)} {failed[0]}", flush=True)
    time.sleep(max(0.0, min(hold, 120.0)))
    for s in held:
        try:
            s.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()
