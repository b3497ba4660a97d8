# Shared by trace.sh and wake.sh (sourced, not run).
#
# start_latency_run: from the repository's root, start the load harness's latency part over streamgate
# and nginx in the background and return once both proxies run. Sets `out` (a temporary directory,
# removed on exit, with the harness's output in `$out/run`) and `h` (the harness's pid: `wait $h`
# returns when it is done).
start_latency_run() {
  cd "$(dirname "$0")/../.." || exit 1
  export PATH=$PATH:/usr/sbin
  ulimit -n 20000
  out=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$out"' EXIT
  STREAMGATE_BIN=${STREAMGATE_BIN:-$PWD/target/release/streamgate} ./target/release/examples/loadtest \
    --only latency --targets streamgate,nginx >"$out/run" 2>&1 &
  h=$!
  for _ in $(seq 200); do
    [ -n "$(pgrep -x streamgate)" ] && [ -n "$(pgrep -f 'nginx: worker')" ] && return
    sleep 0.1
  done
  # The traces pick the proxies by process name: without both, they would print nothing.
  echo "$0: streamgate and an nginx worker did not both start within 20 s (is nginx installed, and is" \
    "STREAMGATE_BIN a binary named streamgate?); the harness said:" >&2
  tail -5 "$out/run" >&2
  exit 1
}
