#!/usr/bin/env bash
# The OTP 27 lane: runs a command under Debian 13's Erlang/OTP 27 and
# Elixir 1.18, which need a newer libc than Debian 12 has. They live in a
# Debian 13 root that this script builds once with debootstrap (about a
# minute) and keeps outside the repository; later runs only check it.
#
#   scripts/otp27.sh build             build the root if it is missing
#   scripts/otp27.sh run CMD ARGS...   run CMD in the root (OTP 27)
#   scripts/otp27.sh host CMD ARGS...  run CMD on this host (OTP 25) while
#                                      the root is ready for OTP 27 nodes:
#                                      TSDIST_OTP27_ROOT names it, and
#                                      `chroot $TSDIST_OTP27_ROOT erl ...'
#                                      starts one
#   scripts/otp27.sh root              print the root's path
#
# The command runs in a chroot in which this repository, /tmp, /proc and
# /dev are the host's own, at the same paths: files, Unix sockets and the
# offline tailnet on 127.0.0.1 are shared with OTP 25 nodes outside. The
# bind mounts live in a mount namespace of the run's own (unshare), so they
# go when it ends and concurrent runs do not disturb each other. Needs root
# (chroot, mount, unshare); the environment is passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
root=${TSDIST_OTP27_ROOT:-/var/cache/tsdist/otp27-trixie}
packages="erlang-nox erlang-dev erlang-common-test elixir rebar3 make"
ready=$root/.tsdist-ready

say() { echo "otp27: $*" >&2; }

as_root() {
	if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

build() {
	if [ -f "$ready" ] && [ "$(cat "$ready")" = "$packages" ]; then
		return 0
	fi
	command -v debootstrap >/dev/null 2>&1 || {
		say "installing debootstrap"
		as_root apt-get update -qq
		as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
	}
	local tmp=$root.new
	as_root rm -rf "$tmp"
	as_root mkdir -p "$(dirname "$root")"
	say "building a Debian 13 (trixie) root in $root"
	as_root debootstrap --variant=minbase trixie "$tmp" >"${TMPDIR:-/tmp}/otp27-debootstrap.log" 2>&1 || {
		say "debootstrap failed; its log:"
		tail -20 "${TMPDIR:-/tmp}/otp27-debootstrap.log" >&2
		exit 1
	}
	# A minbase root has no /etc/hosts, so localhost would not resolve.
	printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n' "$(hostname)" |
		as_root tee "$tmp/etc/hosts" >/dev/null
	say "installing $packages"
	as_root chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
		sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages" \
		>"${TMPDIR:-/tmp}/otp27-apt.log" 2>&1 || {
		say "installing $packages failed; the log:"
		tail -20 "${TMPDIR:-/tmp}/otp27-apt.log" >&2
		exit 1
	}
	echo "$packages" | as_root tee "$tmp/.tsdist-ready" >/dev/null
	as_root rm -rf "$root"
	as_root mv "$tmp" "$root"
	say "ready: $(as_root chroot "$root" erl -noshell -eval 'io:put_chars(["OTP ", erlang:system_info(otp_release)]), halt().'), $(as_root chroot "$root" elixir --version | tail -1)"
}

bind() { # bind SRC: the host's SRC at the same path in the root
	local target=$root$1
	mkdir -p "$target"
	mount --bind "$1" "$target"
}

# prepare builds the root, then runs the rest of this script again in a
# mount namespace of its own, with the bind mounts in it: they vanish with
# it, and two runs at once cannot pull each other's mounts away.
prepare() {
	build
	if [ -z "${TSDIST_OTP27_NS:-}" ]; then
		local again=(env TSDIST_OTP27_NS=1 unshare --mount --propagation private bash "$0" "$@")
		if [ "$(id -u)" -eq 0 ]; then exec "${again[@]}"; else exec sudo "${again[@]}"; fi
	fi
	bind /proc
	bind /dev
	bind /tmp
	bind "$repo"
}

run() {
	prepare run "$@"
	# cd into the repository inside the root, keep the caller's environment
	# but use the root's own tools first.
	as_root chroot "$root" /usr/bin/env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		sh -c 'cd "$0" && exec "$@"' "$PWD" "$@"
}

host() {
	prepare host "$@"
	TSDIST_OTP27_ROOT=$root "$@"
}

case ${1:-} in
build) build ;;
root) echo "$root" ;;
run | host)
	cmd=$1
	shift
	[ $# -gt 0 ] || { say "$cmd needs a command"; exit 2; }
	$cmd "$@"
	;;
*)
	echo "usage: scripts/otp27.sh build | run CMD [ARGS...] | host CMD [ARGS...] | root" >&2
	exit 2
	;;
esac
