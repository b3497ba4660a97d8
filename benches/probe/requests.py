#!/usr/bin/env python3
"""Request framing and smuggling vectors, sent to a proxy in front of a raw upstream that records what
reaches it: what status each vector gets, and what the upstream saw. Run it against streamgate and
nginx side by side (docs/BENCHMARKS.md has the comparison).

    ./target/release/streamgate --listen 127.0.0.1:18080 --upstream http://127.0.0.1:18081 &
    python3 benches/probe/requests.py 18081 18080            # upstream port, proxy port
    python3 benches/probe/requests.py 18081 18080 0 "te+cl smuggle"   # only some vectors

The upstream answers a small 200 for every request line it reads. Each vector gets its own client
connection and a second and a bit for its answers.
"""
import re
import socket
import sys
import threading
import time

log = []
def serve(c):
    c.settimeout(1.0); got = b""
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            got += d
            k = len(re.findall(rb"^[A-Z]+ \S+ HTTP/1\.[01]\r\n", d, re.M))
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" * k)
    except Exception: pass
    log.append(got); c.close()
def upstream(s):
    while True:
        c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(100)
threading.Thread(target=upstream, args=(s,), daemon=True).start()
proxy = int(sys.argv[2])
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0)
V = {
 "te+cl smuggle": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smug HTTP/1.1\r\nHost: x\r\n\r\n",
 "te xchunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 3\r\n\r\nabc",
 "te chunked, identity": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
 "te gzip only": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
 "te tab": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
 "te space before colon": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc",
 "te obs-fold": b"POST / HTTP/1.1\r\nHost: x\r\nX-a: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
 "two te": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
 "http/1.0 te": b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
 "two cl differ": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
 "cl plus": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
 "chunk 0x": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
 "chunk bare LF": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
 "chunk overflow": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000003\r\nabc\r\n0\r\n\r\n",
 "chunk ext": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0\r\n\r\n",
 "chunk data longer": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
 "trailer cl": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nContent-Length: 50\r\nX-T: 1\r\n\r\n",
 "bare CR in value": b"GET / HTTP/1.1\r\nHost: x\r\nX-a: b\rc\r\n\r\n",
 "NUL in value": b"GET / HTTP/1.1\r\nHost: x\r\nX-a: b\x00c\r\n\r\n",
 "absolute-form other host": b"GET http://evil.example/p HTTP/1.1\r\nHost: x\r\n\r\n",
 "bare LF head": b"GET / HTTP/1.1\nHost: x\n\n",
 "space in target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
 "http/2.0 line": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
 "http/1.2": b"GET / HTTP/1.2\r\nHost: x\r\n\r\n",
 "connection close then more": b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /after-close HTTP/1.1\r\nHost: x\r\n\r\n",
 "connection: te hop": b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x-secret, content-length\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
 "upgrade websocket": b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
 "CONNECT": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
 "TRACE": b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n",
 "OPTIONS *": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
 "huge cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\nabc",
 "expect 100 small": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
 "expect weird": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: something\r\n\r\nabc",
}
only = sys.argv[4:]
for name, raw in V.items():
    if only and name not in only: continue
    n0 = len(log)
    c = socket.create_connection(("127.0.0.1", proxy)); c.settimeout(0.8)
    c.sendall(raw)
    resp = b""
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            resp += d
    except Exception: pass
    c.close()
    time.sleep(1.2)  # the upstream logs a connection when it ends (its 1 s read timeout)
    statuses = re.findall(rb"HTTP/1\.[01] (\d{3})", resp)
    ups = log[n0:]
    print(f"== {name}: client got {[x.decode() for x in statuses]}")
    for u in ups:
        # show request lines and framing headers the upstream saw
        lines = [l for l in u.split(b"\r\n") if re.match(rb"^[A-Z]+ \S+ HTTP|^(transfer-encoding|content-length|x-secret|connection|upgrade|host|x-t|x-a)\b", l, re.I)]
        print("   upstream saw:", [l.decode('latin1') for l in lines], "body tail:", u[-40:])
