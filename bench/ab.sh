#!/usr/bin/env bash
# A/B of a tuning change in one interleaved run: the current tree (A: as
# built by make build) against another version (B) of the helper and,
# with --erlang, of the OTP code too, over tailscale_dist and raw tsnet.
#
#   bash bench/ab.sh LABEL REV [--erlang]   # B = git revision REV
#   bash bench/ab.sh LABEL DIR              # B = a tree already built in DIR
#
# The variant's columns are labelled @LABEL. Results and a table in
# bench/out/ab-LABEL/ (AB.md). BENCH_REPEATS (default 5), BENCH_MESH
# (default none), BENCH_CARRIERS (default tailscale,tsnet) apply.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
export GOFLAGS="${GOFLAGS:--buildvcs=false -tags=ts_omit_peerapiserver}"
label=$1 rev=$2 erlang=${3:-}
out=$PWD/bench/out/ab-$label
mkdir -p "$out"
if [ -d "$rev" ]; then
	tree=$rev
else
	tree=$(mktemp -d /tmp/tsdist-ab.XXXXXX)
	trap 'rm -rf "$tree"' EXIT
	git archive "$rev" | tar -x -C "$tree"
	(cd "$tree" && go build -o bin/tsdist ./cmd/tsdist)
	if [ "$erlang" = --erlang ]; then
		(cd "$tree" && rebar3 compile >/dev/null)
	else
		# this tree's OTP code, with its priv (the NIF)
		mkdir -p "$tree/_build/default/lib"
		ln -s "$PWD/_build/default/lib/tsdist" "$tree/_build/default/lib/tsdist"
	fi
fi
BENCH_VARIANT="$label=$tree" BENCH_OUT="$out" BENCH_DOC="$out/AB.md" \
	BENCH_CARRIERS=${BENCH_CARRIERS:-tailscale,tsnet} BENCH_MESH=${BENCH_MESH:-none} \
	BENCH_REPEATS=${BENCH_REPEATS:-5} BENCH_COMMAND="bash bench/ab.sh $*" \
	bash bench/bench.sh
sed -n '/^| workload/,/^$/p' "$out/AB.md"
