#!/usr/bin/env bash
# Where the wake-up of a sleeping proxy goes, from kernel tracepoints during the load harness's
# latency part: the harness writes (a request, a response head or an event) to a proxy that sleeps in
# `epoll_wait`, and the proxy wakes. Needs perf (Debian: linux-perf), nginx, and release builds of
# streamgate and the harness.
#
#   cargo build --release && cargo build --release --example loadtest && benches/syscalls/wake.sh
#   STREAMGATE_BIN=path/to/other/streamgate benches/syscalls/wake.sh      # another build
#
# For each proxy, over the wake-ups that follow a harness write, p25 / p50 / p90 in µs:
# - xmit -> data_ready: the harness's segment leaves on loopback (`net:net_dev_xmit`) to the proxy's
#   socket calling its data-ready callback (`sock:sk_data_ready`): the kernel's TCP receive path,
#   run on the harness's core;
# - data_ready -> waking: the socket's wait queue and epoll, up to the proxy's `sched_waking`;
# - waking -> on CPU: the proxy's core leaves idle and switches to it (`sched_switch`);
# - on CPU -> epoll_wait returns.
# The share of wake-ups whose segment was followed by an ACK before the wake is printed too.
set -u
. "$(dirname "$0")/common.sh"
start_latency_run
# Only the proxies' wake-ups and switches, and only epoll_wait exits: the trace stays small, and
# perf itself stays off the proxies' core as much as it can.
perf record -q -a -o "$out/data" \
  -e net:net_dev_xmit -e sock:sk_data_ready \
  -e sched:sched_waking --filter 'comm == "streamgate" || comm == "nginx"' \
  -e sched:sched_switch --filter 'next_comm == "streamgate" || next_comm == "nginx"' \
  -e raw_syscalls:sys_exit --filter 'id == 232' 2>/dev/null &
p=$!
wait $h
kill -TERM $p 2>/dev/null
wait $p 2>/dev/null
grep -E "ttfb p50" "$out/run"
perf script --ns -i "$out/data" -F comm,tid,cpu,time,event,trace 2>/dev/null >"$out/txt"
python3 - "$out/txt" <<'PY'
import bisect, collections, re, sys
pat = re.compile(r'\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)')
harness = collections.defaultdict(list)  # cpu -> [(t, event, detail)] in the harness's context
waking = collections.defaultdict(list)   # pid -> [(t, cpu)]
switch_in = collections.defaultdict(list)
epoll_exit = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = pat.match(line)
    if not m:
        continue
    comm, tid, cpu, t, ev, rest = m.groups()
    t, tid, cpu = float(t) * 1e9, int(tid), int(cpu)
    if ev == 'sched:sched_waking':
        w = re.search(r'pid=(\d+)', rest)
        waking[int(w.group(1))].append((t, cpu))
        if comm == 'loadtest':
            harness[cpu].append((t, 'waking', rest))
    elif ev == 'sched:sched_switch':
        switch_in[int(re.search(r'next_pid=(\d+)', rest).group(1))].append(t)
    elif ev == 'raw_syscalls:sys_exit':
        if comm in ('streamgate', 'nginx'):
            r = re.search(r'= (-?\d+)', rest)
            epoll_exit[(comm, tid)].append((t, int(r.group(1)) if r else 0))
    elif comm == 'loadtest':
        harness[cpu].append((t, ev, rest))
for v in harness.values():
    v.sort()
def q(v):
    if not v:
        return '-'
    v = sorted(v)
    return ' / '.join(f'{v[int(len(v) * p)] / 1000:.2f}' for p in (0.25, 0.5, 0.9))
for (comm, tid), exits in sorted(epoll_exit.items()):
    if len(exits) < 1000:
        continue
    wk = sorted(waking[tid]); wt = [x[0] for x in wk]
    sw = sorted(switch_in[tid])
    parts, acked, n = ([], [], [], []), 0, 0
    prev_exit = 0.0
    for t, ret in exits:
        last, prev_exit = prev_exit, t
        if ret < 1:
            continue
        k = bisect.bisect_left(sw, t) - 1
        j = bisect.bisect_left(wt, sw[k]) - 1 if k >= 0 else -1
        if j < 0 or wt[j] < last:
            continue  # not asleep in epoll_wait, or not woken through a traced path
        tw, cpu = wk[j]
        rows = harness.get(cpu, [])
        i = bisect.bisect_left(rows, (tw,)) - 1
        ready = xmit = None
        acks = 0
        while i >= 0 and tw - rows[i][0] < 200_000:
            e = rows[i]
            if e[1] == 'waking':
                break
            if e[1] == 'sock:sk_data_ready' and ready is None:
                ready = e[0]
            if e[1] == 'net:net_dev_xmit':
                if int(re.search(r'len=(\d+)', e[2]).group(1)) > 66:
                    xmit = e[0]
                    break
                acks += 1
            i -= 1
        if xmit is None or ready is None:
            continue
        n += 1
        acked += acks > 0
        for a, b, dst in ((xmit, ready, 0), (ready, tw, 1), (tw, sw[k], 2), (sw[k], t, 3)):
            parts[dst].append(b - a)
    print(f'{comm}: {n} wake-ups after a harness write; xmit -> data_ready {q(parts[0])}; '
          f'data_ready -> waking {q(parts[1])}; waking -> on CPU {q(parts[2])}; '
          f'on CPU -> epoll_wait returns {q(parts[3])} (µs, p25 / p50 / p90); '
          f'an ACK sent before the wake: {100 * acked / max(n, 1):.1f}%')
PY
