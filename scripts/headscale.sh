#!/usr/bin/env bash
# The Headscale lane's control server: Headscale, built from the Go module
# proxy once and kept outside the repository (it is never committed).
#
#   scripts/headscale.sh build   build it if missing; print the binary's path
#   scripts/headscale.sh path    print where the binary is (or will be)
#
# Building takes about 3.5 minutes on two cores the first time; later runs
# only check the binary. TSDIST_HEADSCALE_DIR moves the cache (default
# /var/cache/tsdist/headscale-VERSION, or ~/.cache/tsdist/... when that is
# not writable).
#
# `go install module@version' cannot be used here: it asks the proxy for the
# module's version list (to look for a deprecation notice), which the proxy
# refuses for this module. So the module is downloaded with `go mod
# download' and built in place, with its own go.mod and go.sum.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

version=v0.29.3
module=github.com/juanfont/headscale

default_dir() {
	local d=/var/cache/tsdist/headscale-$version
	if mkdir -p "$d" 2>/dev/null && [ -w "$d" ]; then
		echo "$d"
	else
		echo "${XDG_CACHE_HOME:-$HOME/.cache}/tsdist/headscale-$version"
	fi
}
dir=${TSDIST_HEADSCALE_DIR:-$(default_dir)}
bin=$dir/headscale

say() { echo "headscale.sh: $*" >&2; }

build() {
	if [ -x "$bin" ] && "$bin" version >/dev/null 2>&1; then
		echo "$bin"
		return 0
	fi
	mkdir -p "$dir"
	say "building Headscale $version into $dir (about 3.5 minutes the first time)"
	local start=$SECONDS src
	# GOFLAGS from the caller (the Makefile's build tags) are not Headscale's.
	src=$(cd "$dir" && GOFLAGS= go mod download -json "$module@$version" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p') || true
	[ -n "$src" ] && [ -f "$src/go.mod" ] || { say "go mod download $module@$version found no source"; exit 1; }
	(cd "$src" && GOFLAGS=-buildvcs=false go build -trimpath -o "$bin.tmp" ./cmd/headscale) || { say "building Headscale failed"; rm -f "$bin.tmp"; exit 1; }
	mv "$bin.tmp" "$bin"
	say "built $("$bin" version 2>/dev/null | head -1) in $((SECONDS - start)) s"
	echo "$bin"
}

case ${1:-} in
build) build ;;
path) echo "$bin" ;;
*)
	echo "usage: scripts/headscale.sh build | path" >&2
	exit 2
	;;
esac
