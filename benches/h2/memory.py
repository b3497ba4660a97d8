#!/usr/bin/env python3
"""What HTTP/2 clients cost the proxy in memory, for streamgate or nginx: raw frames over loopback,
a scripted HTTP/1.1 upstream, the proxy's RSS read from /proc before and after.

    cargo build --release && python3 benches/h2/memory.py streamgate
    python3 benches/h2/memory.py nginx          # needs nginx (Debian: nginx-light)

Three cases, each on a fresh proxy with one worker:
- idle connections: 2,000 connections that sent the preface and SETTINGS and nothing else;
- idle streams: 1,000 streams on one connection, each answered with an SSE head and one event by an
  upstream that then stays silent;
- slow streams: 100 streams of an endless body on one connection whose client opened every window
  to 2^31 - 1 and then stopped reading (a 4 KiB socket receive buffer): what the proxy queues.
"""
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("STREAMGATE_BIN", os.path.join(HERE, "..", "..", "target", "release", "streamgate"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def upstream(port, mode):
    """An HTTP/1.1 upstream: `sse` answers a head and one event then stays silent; `bulk` streams
    64 KiB chunks for as long as the proxy reads."""
    def serve(c):
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            if mode == "sse":
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                          b"transfer-encoding: chunked\r\n\r\n9\r\ndata: x\n\n\r\n")
                c.recv(1)  # until the proxy closes
            else:
                c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                          b"transfer-encoding: chunked\r\n\r\n")
                chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
                while True:
                    c.sendall(chunk)
        except OSError:
            pass
        finally:
            c.close()

    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4096)

    def accept():
        while True:
            c, _ = s.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()


def start_proxy(who, port, up, tmp):
    if who == "nginx":
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1; daemon off; master_process off; pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn; worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{ access_log off; client_body_temp_path {tmp}/cb; proxy_temp_path {tmp}/pt;
 http2_max_concurrent_streams 1024;
 upstream up {{ server 127.0.0.1:{up}; keepalive 256; }}
 server {{ listen 127.0.0.1:{port} http2; location / {{ proxy_pass http://up;
   proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }} }} }}
""")
        p = subprocess.Popen(["nginx", "-p", tmp, "-c", conf], stderr=subprocess.DEVNULL)
    else:
        p = subprocess.Popen([BIN, "--listen", f"127.0.0.1:{port}", "--upstream",
                              f"http://127.0.0.1:{up}", "--workers", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return p
        except OSError:
            time.sleep(0.05)
    sys.exit(f"memory.py: {who} did not listen on {port}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# GET http://x/s: HPACK static :method GET, :scheme http, then :path and :authority as literals.
GET = bytes([0x82, 0x86, 0x04, 2]) + b"/s" + bytes([0x41, 1]) + b"x"


def settle(pid):
    """Until the RSS has not moved for half a second."""
    last, still = -1, 0
    while still < 5:
        time.sleep(0.1)
        now = rss_kib(pid)
        still = still + 1 if now == last else 0
        last = now
    return last


def case(who, name, mode, run):
    tmp = tempfile.mkdtemp()
    up, port = free_port(), free_port()
    upstream(up, mode)
    p = start_proxy(who, port, up, tmp)
    try:
        base = settle(p.pid)
        n, held = run(port)
        after = settle(p.pid)
        print(f"{who}: {name}: {n} of them, RSS {base} -> {after} KiB, "
              f"{(after - base) * 1024 / n:,.0f} B each", flush=True)
        for c in held:
            c.close()
    finally:
        p.terminate()
        p.wait()


def idle_connections(port):
    held = []
    for _ in range(2000):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(PREFACE + frame(4, 0, 0))
        held.append(c)
    return 2000, held


def idle_streams(port):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(PREFACE + frame(4, 0, 0) + b"".join(frame(1, 0x5, 1 + 2 * i, GET) for i in range(1000)))
    # Keep reading (the heads and the one event each), as a client waiting for more would.
    def drain():
        try:
            while c.recv(65536):
                pass
        except OSError:
            pass
    threading.Thread(target=drain, daemon=True).start()
    return 1000, [c]


def slow_streams(port):
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", port))
    window = 2**31 - 1
    c.sendall(PREFACE + frame(4, 0, 0, struct.pack(">HI", 4, window))
              + frame(8, 0, 0, struct.pack(">I", window - 65535))
              + b"".join(frame(1, 0x5, 1 + 2 * i, GET) for i in range(100)))
    return 100, [c]


if __name__ == "__main__":
    who = sys.argv[1] if len(sys.argv) > 1 else "streamgate"
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    case(who, "idle HTTP/2 connections", "sse", idle_connections)
    case(who, "idle HTTP/2 streams on one connection", "sse", idle_streams)
    case(who, "HTTP/2 streams not read, windows open", "bulk", slow_streams)
