#!/usr/bin/env bash
# Profiles the helpers' data path: the offline tailnet, two helpers with
# the profiler on (--pprof, on Unix sockets), and bench/tsnetbench moving
# bulk data from B to A (or many 64-byte writes: PROFILE=msgs) while a CPU
# profile of each helper is taken; then a heap profile of each. Prints the
# top of each profile; the raw profiles stay in $OUT (default
# bench/out/profile). Stops everything it started.
#
#   bash bench/profile.sh            # after make build
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
export GOFLAGS="${GOFLAGS:--buildvcs=false -tags=ts_omit_peerapiserver}"
out=${OUT:-$PWD/bench/out/profile}
secs=${SECS:-6}
mode=${PROFILE:-bulk}
mkdir -p "$out"
go build -o bin/tsnetbench ./bench/tsnetbench
work=$(mktemp -d /tmp/tsdist-prof.XXXXXX)
pids=()
cleanup() {
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill -TERM "${pids[i]}" 2>/dev/null || true
		wait "${pids[i]}" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT INT TERM
bin/tsdist devnet --same-user --url-file "$work/url" >"$work/devnet.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/url" ] && break; sleep 0.1; done
url=$(cat "$work/url")
declare -A hpid
for h in pa pb; do
	bin/tsdist serve --hostname $h --control-url "$url" --ephemeral --state-dir "$work/$h" \
		--socket "$work/$h.sock" --pprof "$work/$h.pprof" >"$work/$h.log" 2>&1 &
	pids+=($!)
	hpid[$h]=$!
done
for h in pa pb; do
	for _ in $(seq 100); do grep -q "running on the tailnet" "$work/$h.log" && break; sleep 0.1; done
done
case $mode in
bulk) args=(--pings 10 --msgs 10 --mib 100000) ;;
msgs) args=(--pings 10 --msgs 100000000 --mib 1) ;;
esac
bin/tsnetbench --serve-socket "$work/pa.sock" --dial-socket "$work/pb.sock" --host pa "${args[@]}" >"$work/bench.out" 2>&1 &
bench=$!
pids+=($bench)
sleep 1
curls=()
for h in pa pb; do
	curl -s --unix-socket "$work/$h.pprof" "http://x/debug/pprof/profile?seconds=$secs" -o "$out/$h.cpu" &
	curls+=($!)
done
wait "${curls[@]}"
for h in pa pb; do
	curl -s --unix-socket "$work/$h.pprof" "http://x/debug/pprof/heap" -o "$out/$h.heap"
	echo "== $h (pa listens and receives, pb dials and sends): CPU"
	go tool pprof -top -nodecount=35 bin/tsdist "$out/$h.cpu" 2>/dev/null | sed -n 1,45p
	echo "== $h: heap in use"
	go tool pprof -top -sample_index=inuse_space -nodecount=12 bin/tsdist "$out/$h.heap" 2>/dev/null | sed -n 1,20p
	echo "== $h: RSS $(awk '/VmRSS/ {print $2, $3}' /proc/${hpid[$h]}/status 2>/dev/null)"
done
