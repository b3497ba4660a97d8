#!/usr/bin/env bash
# Where a paced event's time goes, from a system-call trace of both proxies and the harness during the
# load harness's latency part. Needs perf (Debian: linux-perf), nginx, and release builds of streamgate
# and the harness.
#
#   cargo build --release && cargo build --release --example loadtest && benches/syscalls/trace.sh
#   STREAMGATE_BIN=path/to/other/streamgate benches/syscalls/trace.sh      # another build, named streamgate
#
# For each proxy, per event (an upstream `recv` of 60-200 bytes), p25 / p50 / p90 in µs:
# - wake-up: the harness's last write before the proxy's `epoll_wait` returned one event, to that
#   return (the kernel's loopback path and the proxy's wake-up);
# - epoll -> recv, and recv -> the first write after it, when the proxy had just been woken that way;
# - recv -> write when it was already running (the event was there when it looked);
# - writev -> the next epoll_wait (what the proxy does after relaying, before it sleeps).
set -u
. "$(dirname "$0")/common.sh"
start_latency_run
s=$(pgrep -x streamgate); n=$(pgrep -f "nginx: worker")
perf record -q -e raw_syscalls:sys_enter,raw_syscalls:sys_exit -p "$s,$n,$h" -o "$out/data" 2>/dev/null &
p=$!
wait $h
kill -INT $p 2>/dev/null
wait $p 2>/dev/null
grep -E "ttfb p50" "$out/run"
perf script --ns -i "$out/data" -F comm,tid,time,event,trace 2>/dev/null >"$out/txt"
python3 - "$out/txt" <<'PY'
import bisect, collections, re, sys
RECV, WRITEV, EPOLL = 45, 20, 232
WRITES = (1, 20, 44)
rows = collections.defaultdict(list)
pat = re.compile(r'\s*(\S+)\s+\d+\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)(?: = (-?\d+))?')
for line in open(sys.argv[1]):
    m = pat.match(line)
    if m:
        comm, t, kind, nr, ret = m.groups()
        rows[comm].append((float(t) * 1e9, kind, int(nr), int(ret) if ret else None))
harness = [e[0] for e in rows.get('loadtest', []) if e[1] == 'enter' and e[2] in WRITES]
def q(v):
    if not v:
        return '-'
    v = sorted(v)
    return ' / '.join(f'{v[int(len(v) * p)] / 1000:.2f}' for p in (0.25, 0.5, 0.9))
for comm in ('streamgate', 'nginx'):
    ev = rows.get(comm, [])
    wake, e2r, woke, warm, after = [], [], [], [], []
    for i, e in enumerate(ev):
        if e[1] == 'exit' and e[2] == WRITEV:
            for f in ev[i + 1:i + 6]:
                if f[1] == 'enter':
                    if f[2] == EPOLL:
                        after.append(f[0] - e[0])
                    break
        if not (e[1] == 'exit' and e[2] == RECV and e[3] and 60 < e[3] < 200):
            continue
        w = next((f[0] - e[0] for f in ev[i + 1:i + 8] if f[1] == 'enter' and f[2] in WRITES), None)
        if w is None:
            continue
        if i >= 2 and ev[i - 1][1] == 'enter' and ev[i - 2][1] == 'exit' and ev[i - 2][2] == EPOLL and ev[i - 2][3] == 1:
            woke.append(w)
            e2r.append(ev[i - 1][0] - ev[i - 2][0])
            k = bisect.bisect_left(harness, ev[i - 2][0]) - 1
            if k >= 0:
                wake.append(ev[i - 2][0] - harness[k])
        else:
            warm.append(w)
    print(f'{comm}: wake-up {q(wake)}; just woken ({len(woke)} events): epoll -> recv {q(e2r)}, '
          f'recv -> write {q(woke)}; already running ({len(warm)}): recv -> write {q(warm)}; '
          f'writev -> epoll_wait {q(after)} (µs, p25 / p50 / p90)')
PY
