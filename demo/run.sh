#!/usr/bin/env bash
# The tsdist demo: an offline tailnet on loopback, two tsdist helpers (alpha
# and beta) on it, and a client that listens through alpha and dials alpha by
# name through beta, echoing through a connection it holds as a plain file
# descriptor. Then a cluster on the same tailnet: Erlang nodes app@alpha and
# app@beta (attached to those helpers), a Go node greeter@delta (ergo, its
# own tailnet device: examples/ergo-greeter) and an Elixir node ex@gamma
# (which starts its own helper) find each other by hostname. Everything it
# starts is stopped by PID when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bin}
work=$(mktemp -d "${TMPDIR:-/tmp}/tsdist-demo.XXXXXX")
pids=()
cleanup() {
	# Newest first: the helpers leave the tailnet while its control server
	# is still there to hear it.
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill -TERM "${pids[i]}" 2>/dev/null || true
		wait "${pids[i]}" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

wait_for() { # wait_for DESCRIPTION COMMAND...: poll up to 20 s
	local what=$1; shift
	for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
	echo "demo: timed out waiting for $what" >&2
	for f in "$work"/*.log; do echo "--- $f" >&2; cat "$f" >&2; done
	return 1
}

echo "== starting the offline tailnet (control server, DERP and STUN on 127.0.0.1)"
# One user's devices, as a person's own tailnet is: the helpers' default
# access policy ("owner") lets them reach each other.
"$BIN/tsdist" devnet --same-user --url-file "$work/control-url" >"$work/devnet.log" 2>&1 &
pids+=($!)
wait_for "the offline tailnet" test -s "$work/control-url"
url=$(cat "$work/control-url")
echo "   control URL $url"

for host in alpha beta; do
	echo "== starting helper $host"
	"$BIN/tsdist" serve --hostname "$host" --control-url "$url" --ephemeral \
		--state-dir "$work/$host" --socket "$work/$host.sock" >"$work/$host.log" 2>&1 &
	pids+=($!)
done
for host in alpha beta; do
	wait_for "$host to join the tailnet" grep -q "running on the tailnet" "$work/$host.log"
	sed 's/^/   /' "$work/$host.log"
done

echo "== the tailnet as beta sees it (tsdist status)"
"$BIN/tsdist" status --socket "$work/beta.sock" | sed 's/^/   /'

echo "== echo: listen through alpha, dial \"alpha\" through beta"
"$BIN/echo" --serve-socket "$work/alpha.sock" --dial-socket "$work/beta.sock" --host alpha | sed 's/^/   /'
ebin=_build/default/lib/tsdist/ebin
dist=(-proto_dist tailscale -start_epmd false -epmd_module tailscale_epmd)
for host in alpha beta; do
	echo "== starting Erlang node app@$host on helper $host"
	TSDIST_SOCKET="$work/$host.sock" erl -noshell -pa "$ebin" "${dist[@]}" -sname "app@$host" \
		-setcookie tsdist-demo -eval 'receive after infinity -> ok end' >"$work/app-$host.log" 2>&1 &
	pids+=($!)
done
for host in alpha beta; do
	wait_for "app@$host to register on $host's tailnet EPMD" sh -c "'$BIN/tsdist' names $host --socket '$work/$host.sock' | grep -q 'name app '"
done
echo "== starting Go node greeter@delta (ergo, its own tailnet device; examples/ergo-greeter)"
"$BIN/ergo-greeter" -name greeter@delta -cookie tsdist-demo -control-url "$url" -ephemeral \
	>"$work/delta.log" 2>&1 &
pids+=($!)
wait_for "greeter@delta to join the tailnet" grep -q "is up" "$work/delta.log"
echo "== Elixir node ex@gamma (its own helper) joins and finds them by hostname"
mkdir -p "$work/run"
XDG_RUNTIME_DIR="$work/run" TSDIST_HELPER="$PWD/$BIN/tsdist" TS_CONTROL_URL="$url" TS_STATE_DIR="$work/gamma" \
	elixir --sname ex@gamma --cookie tsdist-demo --erl "-pa $ebin ${dist[*]}" demo/cluster.exs 2>"$work/gamma.log" ||
	{ cat "$work/gamma.log" >&2; exit 1; }
echo "== done; stopping everything"
