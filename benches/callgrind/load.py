"""Scripted upstream and sequential keep-alive client for the callgrind counts (see count.sh).

  load.py serve UPSTREAM_PORT              upstream: every request gets a short SSE answer
  load.py client PROXY_PORT N              N requests, one after another, on one connection

Each answer is the head and one event in one write, then EV - 1 more events (at least 2; the
client asks for EV, from its environment, default 3) and the last chunk. By default these follow
in one write 2 ms later; with SEP=1 in the client's environment each event, and then the last
chunk, comes 2 ms after the one before, so that the proxy reads and relays each on its own.
"""
import os
import re
import socket
import sys
import threading
import time

HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
EV = int(os.environ.get("EV", "3"))
SEP = os.environ.get("SEP") == "1"


def event(i):
    e = b"data: %d hello\n\n" % i
    return b"%x\r\n" % len(e) + e + b"\r\n"


def answer(c):
    buf = b""
    while True:
        d = c.recv(65536)
        if not d:
            return
        buf += d
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            line = head.split(b"\r\n", 1)[0]
            m = re.search(rb"[?&]ev=(\d+)", line)
            ev = max(int(m.group(1)) if m else 3, 3)
            c.sendall(HEAD + event(0))
            if re.search(rb"[?&]sep=1", line):
                for i in range(1, ev):
                    time.sleep(0.002)
                    c.sendall(event(i))
                time.sleep(0.002)
                c.sendall(b"0\r\n\r\n")
            else:
                # 2 ms apart, so that the proxy always reads the two writes apart: counts that
                # depend on how reads happen to coalesce would not repeat.
                time.sleep(0.002)
                c.sendall(b"".join(event(i) for i in range(1, ev)) + b"0\r\n\r\n")


def serve(port):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(64)
    while True:
        c, _ = ls.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=answer, args=(c,), daemon=True).start()


def client(port, n):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(n):
        target = b"/v1/x?i=%d&ev=%d%s" % (i, EV, b"&sep=1" if SEP else b"")
        s.sendall(b"GET %s HTTP/1.1\r\nhost: loadtest\r\naccept: text/event-stream\r\n\r\n" % target)
        buf = b""
        while not buf.endswith(b"0\r\n\r\n"):
            d = s.recv(65536)
            if not d:
                sys.exit("connection closed after %d requests" % i)
            buf += d
        if not buf.startswith(b"HTTP/1.1 200 "):
            sys.exit("not a 200: %r" % buf[:200])


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        client(int(sys.argv[2]), int(sys.argv[3]))
