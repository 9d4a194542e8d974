#!/usr/bin/env bash
# Runs every Go fuzz target of the module for FUZZTIME each (default 50000x:
# a count of executions; see the Makefile for why not a duration).
# Seed corpora live in each package's testdata/fuzz/; a crasher found here is
# written there too, so `go test` replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-50000x}
count=0
for pkg in $(go list ./...); do
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		echo "fuzz: $pkg $target for $fuzztime"
		go test -run='^$' -fuzz="^${target}\$" -fuzztime="$fuzztime" "$pkg"
		count=$((count + 1))
	done
done
echo "fuzz: $count targets ran for $fuzztime each"
