#!/usr/bin/env bash
# Instructions the proxy runs per request, and on the head path, counted by callgrind: exact and
# repeatable on a shared, noisy machine where timings are not. Needs valgrind (and nginx to compare).
#
#   benches/callgrind/count.sh streamgate|nginx
#
# Per request: two runs of N1 and N2 sequential keep-alive requests (after a warm-up of 200), each
# answered with the head and an event, then two events and the last chunk 2 ms later; the
# difference of their totals over N2 - N1. Per event: answers of 23 events against 3, every event
# and the last chunk written on its own (SEP=1), so that each of the 20 more is read and relayed on
# its own; the difference over the 8,000 more events. Per event in one read: answers of 203 events
# against 3, all but the first in one write; the difference over the 40,000 more events. From recv
# to writev: between the upstream `recv` that brings an event and the client `writev` that relays
# it (--zero-before / --dump-before), the median over the dumps. Head path: from the start of parsing the
# upstream's response head to the client `writev` that carries it and the first event
# (--zero-before / --dump-before), the median over the requests.
# nginx closes a keep-alive connection after 1,000 requests, hence the small N.
set -u
who=${1:-streamgate}
here=$(cd "$(dirname "$0")" && pwd)
bin=${STREAMGATE_BIN:-$here/../../target/release/streamgate}
dir=$(mktemp -d)
# Every process started is listed in $dir/pids (the proxies start in command substitutions, where
# `jobs` cannot see them), and stopped on exit, Ctrl-C included.
trap 'kill $(cat "$dir/pids" 2>/dev/null) 2>/dev/null; rm -rf "$dir"' EXIT
trap 'exit 130' INT TERM
# Two free ports, picked by the kernel.
read -r up px < <(python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
python3 -B "$here/load.py" serve $up &
echo $! >> "$dir/pids"
nginx_conf() {
  mkdir -p "$dir/ngx"
  cat > "$dir/ngx/nginx.conf" <<NG
worker_processes 1; daemon off; master_process off; pid $dir/ngx/nginx.pid;
error_log $dir/ngx/error.log warn;
events { worker_connections 1000; }
http { access_log $dir/ngx/access.log; client_body_temp_path $dir/ngx/cb; proxy_temp_path $dir/ngx/pt;
 upstream up { server 127.0.0.1:$up; keepalive 256; }
 server { listen 127.0.0.1:$px; location / { proxy_pass http://up; proxy_http_version 1.1;
   proxy_set_header Connection ""; proxy_buffering off; proxy_read_timeout 3600s; } } }
NG
}
# run OUT N [valgrind options...]: the proxy under callgrind, a warm-up and N requests; prints the total.
run() {
  local out=$1 n=$2
  shift 2
  if [ "$who" = nginx ]; then
    nginx_conf
    valgrind --tool=callgrind --callgrind-out-file="$out" "$@" \
      nginx -p "$dir/ngx" -e "$dir/ngx/error.log" -c "$dir/ngx/nginx.conf" 2>"$out.log" &
  else
    valgrind --tool=callgrind --callgrind-out-file="$out" "$@" \
      "$bin" --listen 127.0.0.1:$px --upstream http://127.0.0.1:$up --workers 1 >/dev/null 2>"$out.log" &
  fi
  local pid=$!
  echo $pid >> "$dir/pids"
  local up_=0
  for _ in $(seq 150); do
    if (exec 3<>/dev/tcp/127.0.0.1/$px) 2>/dev/null; then up_=1; break; fi
    sleep 0.2
  done
  local ok=0
  [ $up_ = 1 ] && python3 -B "$here/load.py" client $px 200 && python3 -B "$here/load.py" client $px "$n" && ok=1
  kill -TERM $pid
  wait $pid
  if [ $ok != 1 ]; then
    echo "count.sh: the $who run of $n requests failed; the end of its log:" >&2
    tail -5 "$out.log" >&2
    return 1
  fi
  sed -n 's/.*Collected : //p' "$out.log"
}
# dump_median DIR MARK WHAT: the median instruction count of the callgrind dumps in DIR (only those
# that mention MARK, when it is not empty), printed as "WHAT".
dump_median() {
  local f
  for f in "$1"/cg.*; do
    case $f in *.log) continue ;; esac
    [ -z "$2" ] || grep -q "$2" "$f" || continue
    sed -n 's/^summary: //p' "$f"
  done | sort -n | awk -v who="$who" -v what="$3" \
    '{v[NR]=$1} END {print who ": " v[int((NR+1)/2)] " instructions " what " (median of " NR ")"}'
}
a=$(run "$dir/a" 300) || exit 1
b=$(run "$dir/b" 900) || exit 1
echo "$who: $(( (b - a) / 600 )) instructions per request (3 events in two reads)"
a=$(SEP=1 EV=3 run "$dir/c" 200) || exit 1
b=$(SEP=1 EV=23 run "$dir/d" 200) || exit 1
echo "$who: $(( (b - a) / 8000 )) instructions per event read and relayed on its own"
a=$(EV=3 run "$dir/e" 200) || exit 1
b=$(EV=203 run "$dir/f" 200) || exit 1
echo "$who: $(( (b - a) / 40000 )) instructions per event when 200 come in one write"
# From the upstream `recv` that brings an event to the `writev` that relays it: the path an event
# waits on. The median over the dumps (most are single events; the few per request are not).
mkdir -p "$dir/ev"
SEP=1 EV=23 run "$dir/ev/cg" 20 --zero-before=recv --dump-before=writev >/dev/null || exit 1
dump_median "$dir/ev" "" "from the upstream recv to the client writev"
if [ "$who" = nginx ]; then parse=ngx_http_parse_status_line; mark=parse_status_line; else
  parse='httparse::Response::parse_with_config_and_uninit_headers'; mark=Response::parse_with; fi
mkdir -p "$dir/seg"
run "$dir/seg/cg" 60 --zero-before="$parse" --dump-before=writev >/dev/null || exit 1
# The first dump after each zero is the head path; it is the one that holds the parse.
dump_median "$dir/seg" "$mark" "on the head path"
