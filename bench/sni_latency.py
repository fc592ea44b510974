#!/usr/bin/env python3
"""TLS handshake time through Floodgate's Sni router against the same TLS
server directly: an independent client (Python's ssl, OpenSSL, which pads its
ClientHello to 517 bytes), loopback only, bounded in count.

Usage: bench/sni_latency.py [--handshakes N] [--rounds R]
Builds nothing itself: run `cargo build --release -p floodgate --example
sni_proxy` first (bench/sni_latency.sh does both). Client, proxy and TLS
server share this machine's cores.
"""
import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HOST = "example.test"


def make_cert(d):
    key, crt = os.path.join(d, "key.pem"), os.path.join(d, "crt.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=" + HOST, "-addext", "subjectAltName=DNS:" + HOST,
         "-keyout", key, "-out", crt],
        check=True, capture_output=True)
    return key, crt


def tls_server(key, crt, stop):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    srv = socket.create_server(("127.0.0.1", 0), backlog=512)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except socket.timeout:
                continue
            c.settimeout(30)
            try:
                with ctx.wrap_socket(c, server_side=True) as t:
                    t.sendall(b"x")
            except (OSError, ssl.SSLError):
                pass
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return port


def handshakes(port, n, crt):
    ctx = ssl.create_default_context(cafile=crt)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            with ctx.wrap_socket(s, server_hostname=HOST) as t:
                t.recv(1)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--handshakes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peek", help="BYTES,MS: the proxy peeks a fixed prefix instead (the old way)")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = os.path.join(root, "target", "release", "examples", "sni_proxy")
    with tempfile.TemporaryDirectory() as d:
        key, crt = make_cert(d)
        stop = threading.Event()
        port = tls_server(key, crt, stop)
        proxy = subprocess.Popen(
            [exe, "--listen", "127.0.0.1:0", "--route", f"{HOST}=127.0.0.1:{port}",
             "--max-seconds", "300"] + (["--peek", a.peek] if a.peek else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = proxy.stdout.readline().split()
        pport = int(line[1].rsplit(":", 1)[1])
        direct, routed = [], []
        handshakes(port, 20, crt)  # warm-up
        handshakes(pport, 20, crt)
        for _ in range(a.rounds):  # interleaved rounds
            direct.append(statistics.median(handshakes(port, a.handshakes, crt)))
            routed.append(statistics.median(handshakes(pport, a.handshakes, crt)))
        proxy.stdin.close()
        tail = proxy.stdout.read().strip()
        proxy.wait(timeout=30)
        stop.set()
    d, r = statistics.median(direct), statistics.median(routed)
    print(f"handshakes per round {a.handshakes}, rounds {a.rounds} (medians of round medians), "
          f"proxy peek: {a.peek or 'none (default)'}")
    print(f"direct          p50 {d:.3f} ms   rounds {['%.3f' % x for x in direct]}")
    print(f"through Sni     p50 {r:.3f} ms   rounds {['%.3f' % x for x in routed]}")
    print(f"difference      {r - d:+.3f} ms")
    print(f"proxy: {tail}")
    return 0 if r - d < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
