#!/usr/bin/env bash
# Builds the real libcluster (with telemetry and jason) from the unmodified
# sources in ../shared/vendor, Hex being unreachable, and compiles
# Cluster.Strategy.Tailscale against it, all into one ebin directory:
#
#   bash scripts/libcluster.sh OUT_DIR     # prints OUT_DIR/ebin, or nothing
#
# Prints nothing (and says why on stderr) when the vendor folder is not
# there, so that callers can fall back and say so. TSDIST_VENDOR overrides
# the folder. The recipe is the vendor folder's README's (libcluster reads
# Mix.env() at compile time). Built once: a second call reuses OUT_DIR.
set -euo pipefail
out=${1:?usage: libcluster.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
vendor=${TSDIST_VENDOR:-$root/../shared/vendor}
strategy=$root/elixir/libcluster_tailscale/lib/cluster/strategy/tailscale.ex
archive=$(ls "$vendor"/libcluster-*.tar.gz 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$archive" ]; then
	echo "libcluster.sh: no libcluster archive in $vendor" >&2
	exit 0
fi
ebin=$out/ebin
stamp=$out/built-from
want="$(basename "$archive") $(sha256sum "$strategy" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
	echo "$ebin"
	exit 0
fi
rm -rf "$out" && mkdir -p "$ebin" "$out/src"
for a in "$archive" "$vendor"/telemetry-*.tar.gz "$vendor"/jason-*.tar.gz; do
	tar xzf "$a" -C "$out/src"
done
erlc -o "$ebin" "$out"/src/telemetry/src/*.erl
cp "$out"/src/telemetry/src/telemetry.app.src "$ebin/telemetry.app"
(cd "$out/src" && elixir -pa "$ebin" -e '
  Mix.start(); Mix.env(:prod)
  files = Path.wildcard("jason/lib/**/*.ex") ++ Path.wildcard("libcluster/lib/**/*.ex")
  {:ok, _, _} = Kernel.ParallelCompiler.compile_to_path(files, System.argv() |> hd())
' "$ebin") >&2
elixirc --ignore-module-conflict -pa "$ebin" -o "$ebin" "$strategy" >&2
echo "$want" > "$stamp"
echo "$ebin"
