#!/usr/bin/env bash
# Installs what tsdist needs on a Debian 12 machine, and nothing twice: run
# it as often as you like; when everything is there it only checks.
#
#   scripts/install-deps.sh
#
# Go comes with the machine (/usr/local/go); the Go modules come from the
# module proxy on first build. Erlang (with epmd and OTP's sources of
# erl_epmd, which the interop tests run against), Elixir and rebar3 come
# from Debian's apt (OTP 25).
set -euo pipefail

if [ $# -gt 0 ]; then
	echo "install-deps: takes no options (got $*)" >&2
	exit 2
fi

say() { echo "install-deps: $*" >&2; }

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() { # apt_install PACKAGE...: install those not yet installed
	local missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	if [ $apt_updated -eq 0 ]; then
		say "apt-get update"
		as_root apt-get update -qq
		apt_updated=1
	fi
	say "installing ${missing[*]}"
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Go 1.26 or newer.
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
	export PATH=/usr/local/go/bin:$PATH
fi
if ! command -v go >/dev/null 2>&1; then
	say "Go is missing: tsdist needs Go 1.26 or newer (this machine kind ships it in /usr/local/go)"
	exit 1
fi
gov=$(go env GOVERSION | sed 's/^go//')
case $gov in
1.2[6-9]* | 1.[3-9]* | [2-9].*) ;;
*) say "Go $gov is too old: tsdist needs Go 1.26 or newer"; exit 1 ;;
esac

# Tools the build and tests use.
command -v make >/dev/null 2>&1 || apt_install make
command -v gcc >/dev/null 2>&1 || apt_install gcc libc6-dev # go test -race needs cgo

# Erlang/OTP 25 and Elixir: the OTP side, and the real erl and epmd that
# the EPMD interop tests talk to.
apt_install erlang-nox erlang-dev erlang-common-test elixir rebar3

# Go modules, so the first build does not look like a hang.
if ! go mod download 2>/dev/null; then
	say "could not download Go modules (is the module proxy reachable?)"
	exit 1
fi
say "ok (go $gov, OTP $(erl -noshell -eval 'io:put_chars(erlang:system_info(otp_release)), halt().'))"
