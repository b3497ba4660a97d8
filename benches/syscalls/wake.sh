#!/usr/bin/env bash
# Where the wake-up of a sleeping proxy goes, from kernel tracepoints during the load harness's
# latency part: the harness writes (a request, a response head or an event) to a proxy that sleeps in
# `epoll_wait`, and the proxy wakes. Needs perf (Debian: linux-perf), nginx, and release builds of
# streamgate and the harness.
#
#   cargo build --release && cargo build --release --example loadtest && benches/syscalls/wake.sh
#   STREAMGATE_BIN=path/to/other/streamgate benches/syscalls/wake.sh      # another build, named streamgate
#
# For each proxy and each kind of wake-up that follows a harness write (a request into the proxy's
# client socket; a response head or an event into its upstream socket), p25 / p50 / p90 in µs:
# - xmit -> data_ready: the harness's segment leaves on loopback (`net:net_dev_xmit`) to the proxy's
#   socket calling its data-ready callback (`sock:sk_data_ready`): the kernel's TCP receive path,
#   run on the harness's core;
# - data_ready -> waking: the socket's wait queue and epoll, up to the proxy's `sched_waking`;
# - waking -> on CPU: the proxy's core leaves idle and switches to it (`sched_switch`);
# - on CPU -> epoll_wait returns.
# For requests, the share that also acknowledged earlier response bytes (the client's delayed ACK riding
# on its next request, which the receive path then processes before the proxy can be woken).
set -u
. "$(dirname "$0")/common.sh"
start_latency_run
# Only the proxies' wake-ups and switches, and only epoll_wait exits: the trace stays small, and
# perf itself stays off the proxies' core as much as it can.
perf record -q -a -o "$out/data" \
  -e net:net_dev_xmit -e sock:sk_data_ready -e tcp:tcp_probe \
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
probe_re = re.compile(r'dest=\S+:(\d+) .*?data_len=(\d+) snd_nxt=0x(\w+) snd_una=0x(\w+)')
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
        waking[int(re.search(r'pid=(\d+)', rest).group(1))].append((t, cpu))
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
# Each wake-up: (proxy, the receiving socket's remote port, whether the segment acknowledged earlier
# bytes, the four steps).
wakes = []
for (comm, tid), exits in sorted(epoll_exit.items()):
    if len(exits) < 1000:
        continue
    wk = sorted(waking[tid]); wt = [x[0] for x in wk]
    sw = sorted(switch_in[tid])
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
        ready = xmit = probe = None
        while i >= 0 and tw - rows[i][0] < 200_000:
            e = rows[i]
            if e[1] == 'waking':
                break
            if e[1] == 'sock:sk_data_ready' and ready is None:
                ready = e[0]
            if e[1] == 'tcp:tcp_probe' and probe is None:
                probe = probe_re.search(e[2])
            if e[1] == 'net:net_dev_xmit' and int(re.search(r'len=(\d+)', e[2]).group(1)) > 66:
                xmit = e[0]
                break
            i -= 1
        if xmit is None or ready is None or probe is None or probe.group(2) == '0':
            continue
        acks = probe.group(3) != probe.group(4)
        wakes.append((comm, probe.group(1), acks, (ready - xmit, tw - ready, sw[k] - tw, t - sw[k])))
# The upstream's port is the one both proxies' sockets most often receive from.
upstream = collections.Counter(w[1] for w in wakes).most_common(1)[0][0] if wakes else None
for comm in sorted({w[0] for w in wakes}):
    for kind in ('client', 'upstream'):
        ws = [w for w in wakes if w[0] == comm and (w[1] == upstream) == (kind == 'upstream')]
        steps = [q([w[3][s] for w in ws]) for s in range(4)]
        what = 'requests' if kind == 'client' else 'heads and events'
        acked = ''
        if kind == 'client':
            yes = [w[3][0] for w in ws if w[2]]
            no = [w[3][0] for w in ws if not w[2]]
            acked = (f'; {100 * len(yes) / max(len(ws), 1):.0f}% of them acknowledged earlier response '
                     f'bytes (xmit -> data_ready {q(yes)}), the others {q(no)}')
        print(f'{comm}, {len(ws)} {what} into its {kind} socket: xmit -> data_ready {steps[0]}; '
              f'data_ready -> waking {steps[1]}; waking -> on CPU {steps[2]}; '
              f'on CPU -> epoll_wait returns {steps[3]} (µs, p25 / p50 / p90){acked}')
PY
