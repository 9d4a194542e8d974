#!/usr/bin/env bash
# The benchmark (make bench): every carrier, the same workloads, one
# interleaved run on this machine; then docs/BENCHMARKS.md and
# docs/benchmarks.png from its results. See bench/tsdist_bench.erl for what
# is measured and how (and bench/tsdist_bench_peer.erl for what its nodes run).
#
#   bash bench/bench.sh            # the full run (5 repeats, meshes of 2, 4, 8 twice
#                                  # each per repeat, 10 trials of each restart)
#   BENCH_QUICK=1 bash bench/bench.sh   # the smoke run `make test` does:
#                                  # 1 repeat, tiny counts, a mesh of 2; no doc
#
# Environment: BENCH_REPEATS, BENCH_MESH (e.g. 2,4,8; none), BENCH_MESH_ROUNDS
# (meshes of each size per repeat), BENCH_RESTARTS (trials of each restart;
# 0: none), BENCH_LIBCLUSTER_EBIN (see below), BENCH_CARRIERS
# (tcp,tls,tailscale,tsnet,ergo), BENCH_VARIANT=LABEL=DIR (tailscale_dist and
# raw tsnet once more with another tree's helper and OTP code: bench/ab.sh),
# BENCH_OUT (results; default bench/out), BENCH_DOC (default
# docs/BENCHMARKS.md; empty: no doc), BENCH_ERL_FLAGS (extra emulator flags
# for every node). Needs `make build` first (the make
# target does it). Everything it starts (the offline tailnet, helpers, BEAM
# nodes) it stops, and its temporary directory goes with it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
export GOFLAGS="${GOFLAGS:--buildvcs=false -tags=ts_omit_peerapiserver}"
quick=${BENCH_QUICK:-0}
out=${BENCH_OUT:-$PWD/bench/out}
doc=${BENCH_DOC-docs/BENCHMARKS.md}
[ "$quick" = 1 ] && doc=${BENCH_DOC:-}

go build -o bin/tsnetbench ./bench/tsnetbench
mkdir -p _build/bench "$out"
# The orchestrator (tsdist_bench), what its peer nodes run (tsdist_bench_peer:
# every peer has _build/bench on its code path), the loopback EPMD module of
# the TCP and TLS nodes (bench_epmd), and the report (bench_report).
erlc -o _build/bench bench/tsdist_bench.erl bench/tsdist_bench_peer.erl bench/bench_epmd.erl bench/bench_report.erl

if [ -n "$doc" ] && ! command -v gnuplot >/dev/null; then
	echo "bench: installing gnuplot (Debian's gnuplot-nox) for the plot"
	if [ "$(id -u)" = 0 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q gnuplot-nox >/dev/null ||
			{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gnuplot-nox >/dev/null; }
	else
		sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q gnuplot-nox >/dev/null
	fi
fi

# The restart trials run once more with the real libcluster driving
# Cluster.Strategy.Tailscale, built from ../shared/vendor when it is there
# (the harness says when it is not); BENCH_LIBCLUSTER_EBIN= skips them.
if [ -z "${BENCH_LIBCLUSTER_EBIN+set}" ] && command -v elixir >/dev/null; then
	BENCH_LIBCLUSTER_EBIN=$(bash scripts/libcluster.sh "$PWD/_build/libcluster")
fi
if [ -n "${BENCH_LIBCLUSTER_EBIN:-}" ]; then
	BENCH_ELIXIR_EBINS=$(elixir -e 'IO.puts(Enum.join(for(a <- [:elixir, :logger], do: :code.lib_dir(a, :ebin)), " "))')
fi
export BENCH_LIBCLUSTER_EBIN="${BENCH_LIBCLUSTER_EBIN:-}" BENCH_ELIXIR_EBINS="${BENCH_ELIXIR_EBINS:-}"

start=$(date +%s)
BENCH_OUT=$out BENCH_ROOT=$PWD BENCH_EBIN=$PWD/_build/bench \
	erl -noshell -pa _build/bench -pa _build/default/lib/tsdist/ebin -eval 'tsdist_bench:main()'
echo "bench: run took $(($(date +%s) - start)) s"

if [ -n "$doc" ]; then
	BENCH_COMMAND=${BENCH_COMMAND:-make bench} \
		erl -noshell -pa _build/bench -pa _build/default/lib/tsdist/ebin \
		-eval "bench_report:main(\"$out\", \"$doc\", \"bench/NOTES.md\")"
	gnuplot "$out/plot.gp"
	cp "$out/results.tsv" "$(dirname "$doc")/benchmarks-results.tsv" # every sample behind the table
	echo "bench: wrote $doc, $(dirname "$doc")/benchmarks.png and benchmarks-results.tsv"
fi
