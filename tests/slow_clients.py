#!/usr/bin/env python3
"""10,000 slow HTTP clients against a running node (issue 17's target).

Opens N connections to HOST:PORT, three quarters stuck mid-header and the rest
silent, then times 500 ordinary GET /healthz requests on fresh connections,
then waits until the node has closed every slow connection. Run the client in
its own process: with client and node in one, the 20,000-descriptor limit caps
the test below 10,000 connections.

    storemesh init --data-dir D --name s1 --quic-addr 127.0.0.1:17400 --http-addr 127.0.0.1:18400
    # [api] header_timeout_ms = 90000 in D/storemesh.toml, so all N are open at once
    storemesh run --data-dir D &
    python3 tests/slow_clients.py 127.0.0.1 18400 10000
"""
import socket, time, sys, selectors, urllib.request
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
slow = []
t0 = time.time()
for i in range(n):
    s = socket.create_connection((host, port))
    if i < n * 3 // 4:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    slow.append(s)
print(f"{n} slow connections open in {time.time()-t0:.1f}s", flush=True)
lat = []
for _ in range(500):
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as r:
        r.read()
    lat.append((time.perf_counter() - t) * 1000)
lat.sort()
print(f"ordinary GET /healthz while {n} slow: p50 {lat[len(lat)//2]:.2f} ms p99 {lat[int(len(lat)*0.99)-1]:.2f} ms max {lat[-1]:.2f} ms", flush=True)
sel = selectors.DefaultSelector()
for s in slow:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
open_n = n
t1 = time.time()
while open_n and time.time() - t0 < 600:
    for key, _ in sel.select(timeout=1):
        try:
            d = key.fileobj.recv(65536)
        except (ConnectionResetError, OSError):
            d = b""
        if not d:
            sel.unregister(key.fileobj); key.fileobj.close(); open_n -= 1
print(f"slow connections closed: {n-open_n}/{n}, last closed {time.time()-t0:.1f}s after the first opened", flush=True)
