#!/usr/bin/env bash
# Runs every Go fuzz target of the module for FUZZTIME each (default 50000x:
# a count of executions; see the Makefile for why not a duration).
# Seed corpora live in each package's testdata/fuzz/; a crasher found here is
# written there too, so `go test` replays it from then on.
#
# Fails if a package's targets cannot be listed, if a target skips instead
# of fuzzing (a skip passes `go test`), or if no target ran at all.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-50000x}
count=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for pkg in $(go list ./...); do
	listed=$(go test -list '^Fuzz' "$pkg")
	for target in $(printf '%s\n' "$listed" | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $target for $fuzztime"
		status=0
		go test -v -run='^$' -fuzz="^${target}\$" -fuzztime="$fuzztime" "$pkg" >"$out" 2>&1 || status=$?
		grep -v '^=== \|^fuzz: elapsed' "$out" || true
		if [ "$status" -ne 0 ]; then
			echo "fuzz: $pkg $target FAILED" >&2
			exit 1
		fi
		if grep -q -- '--- SKIP' "$out" || ! grep -q -- "--- PASS: $target" "$out"; then
			echo "fuzz: $pkg $target did not fuzz (skipped or never ran); see above" >&2
			exit 1
		fi
		count=$((count + 1))
	done
done
if [ "$count" -eq 0 ]; then
	echo "fuzz: no fuzz targets found" >&2
	exit 1
fi
echo "fuzz: $count targets ran for $fuzztime each"
