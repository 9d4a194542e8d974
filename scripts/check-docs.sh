#!/usr/bin/env bash
# make check-docs: the cheapest drift between code and docs, caught
# mechanically (bash, grep, sed and awk only; well under a second).
#
#   1. Every setting the code reads is in docs/configuration.md:
#      - the flags of the tsdist commands (fs.String("name", ...),
#        fs.BoolVar(&v, "name", ...) and the like in cmd/tsdist/*.go),
#        written there as `--name`, and the environment variables the
#        helper reads (envOr(..., "VAR"), os.Getenv("VAR"));
#      - the `tsdist` application keys and OS environment variables the
#        Erlang side reads (config(key, "ENV", ...) in any erlang_src/*.erl,
#        whichever module holds it, application:get_env(tsdist, key),
#        os:getenv("ENV")), written as `key` and ENV;
#      - the discovery options (the Defaults map of
#        tailscale_discovery:options/1), the libcluster strategy's options
#        (its @defaults) and the fields of ergonode.Options, written as
#        `name`.
#   2. Every relative link in README.md, CONTRIBUTING.md and docs/*.md
#      points at a file that exists and, for a #anchor into a Markdown
#      file, at a heading that exists.
#
# Prints what it checked; exits 1, naming each thing missing, if any is.
set -uo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

conf=docs/configuration.md
problems=0
problem() {
	echo "check-docs: $*" >&2
	problems=$((problems + 1))
}

[ -f "$conf" ] || { echo "check-docs: $conf is missing" >&2; exit 1; }

# Erlang and Go sources as one line per file, comments dropped, so that a
# call split over lines still matches.
flatten_erl() { sed -e 's/%.*$//' "$@" | tr '\n\t' '  '; }

# in_conf KIND NAME WHERE PATTERN: PATTERN (an ERE) must occur in $conf.
in_conf() {
	grep -qE -- "$4" "$conf" || problem "$conf lacks $1 $2 (read in $3)"
}

# 1a. tsdist flags, per file.
nflags=0
for f in cmd/tsdist/*.go; do
	case $f in *_test.go) continue ;; esac
	names=$(grep -oE '\b(fs|flag)\.(String|Bool|Int|Int64|Uint|Uint64|Float64|Duration|Func|BoolFunc|Text)(Var)?\((&[^,]+, *)?"[^"]+"' "$f" |
		sed -E 's/.*"([^"]+)"$/\1/' | sort -u)
	[ -n "$names" ] || continue
	cmd=$(grep -oE 'newFlagSet\("[a-z]+"' "$f" | head -1 | sed -E 's/.*"([a-z]+)"/\1/')
	echo "check-docs: flags of ${cmd:-tsdist} ($f): $(echo $names | sed 's/ /, /g')"
	for n in $names; do
		nflags=$((nflags + 1))
		in_conf flag "--$n" "$f" "\`--$n([\` =]|\$)"
	done
done

# 1b. The environment variables the helper reads (envOr(default, "VAR",
# ...) and os.Getenv("VAR") in cmd/tsdist/*.go).
goenv=$(for f in cmd/tsdist/*.go; do case $f in *_test.go) ;; *) cat "$f" ;; esac; done |
	grep -oE 'envOr\([^)]*\)|os\.(Getenv|LookupEnv)\("[A-Z][A-Z0-9_]*"' | grep -oE '"[A-Z][A-Z0-9_]*"' | tr -d '"' | sort -u)
echo "check-docs: environment variables (cmd/tsdist/*.go): $(echo $goenv | sed 's/ /, /g')"
for e in $goenv; do in_conf "environment variable" "$e" "cmd/tsdist/*.go" "(^|[^A-Za-z0-9_])$e([^A-Za-z0-9_]|\$)"; done

# 1c. What the Erlang side reads.
erl=$(flatten_erl erlang_src/*.erl)
pairs=$(grep -oE '\bconfig\( *[a-z][a-z0-9_]* *, *"[A-Z][A-Z0-9_]*"' <<<"$erl" |
	sed -E 's/config\( *([a-z0-9_]+) *, *"([A-Z0-9_]+)"/\1 \2/' | sort -u)
keys=$( { awk '{print $1}' <<<"$pairs"
	grep -oE 'application:get_env\( *tsdist *, *[a-z][a-z0-9_]*' <<<"$erl" | sed -E 's/.*, *//'; } | sed '/^$/d' | sort -u)
envs=$( { awk '{print $2}' <<<"$pairs"
	grep -oE 'os:getenv\( *"[A-Z][A-Z0-9_]*"' <<<"$erl" | sed -E 's/.*"([A-Z0-9_]+)"/\1/'; } | sed '/^$/d' | sort -u)
[ -n "$pairs" ] || problem "found no config(key, \"ENV\", ...) call in erlang_src/*.erl: has the pattern changed? (update this script)"
echo "check-docs: tsdist keys (erlang_src/*.erl): $(echo $keys | sed 's/ /, /g')"
echo "check-docs: environment variables (erlang_src/*.erl): $(echo $envs | sed 's/ /, /g')"
for k in $keys; do in_conf "tsdist key" "$k" "erlang_src/*.erl" "\`$k[\` ]"; done
for e in $envs; do in_conf "environment variable" "$e" "erlang_src/*.erl" "(^|[^A-Za-z0-9_])$e([^A-Za-z0-9_]|\$)"; done

# 1d. Discovery options, the strategy's options, ergonode.Options.
disc=$(flatten_erl erlang_src/tailscale_discovery.erl |
	grep -oE 'Defaults *= *#\{[^}]*\}' | grep -oE '[a-z][a-z0-9_]* *=>' | sed -E 's/ *=>//' | sort -u)
[ -n "$disc" ] || problem "found no Defaults = #{...} in erlang_src/tailscale_discovery.erl: has it moved? (update this script)"
echo "check-docs: discovery options (erlang_src/tailscale_discovery.erl): $(echo $disc | sed 's/ /, /g')"
for o in $disc; do in_conf "discovery option" "$o" "erlang_src/tailscale_discovery.erl" "\`$o\`"; done

ex=elixir/libcluster_tailscale/lib/cluster/strategy/tailscale.ex
if [ -f "$ex" ]; then
	strat=$(awk '/^ *@defaults *\[/ {on = 1; next} on && /^ *\]/ {exit} on' "$ex" |
		grep -oE '^ *[a-z][a-z0-9_]*:' | sed -E 's/[ :]//g' | sort -u)
	[ -n "$strat" ] || problem "found no @defaults [...] in $ex: has it moved? (update this script)"
	echo "check-docs: libcluster strategy options ($ex): $(echo $strat | sed 's/ /, /g')"
	for o in $strat; do in_conf "strategy option" "$o" "$ex" "\`$o\`"; done
fi

ergo=$(grep -lE '^type Options struct' ergonode/*.go 2>/dev/null | head -1)
if [ -n "$ergo" ]; then
	fields=$(awk '/^type Options struct/ {on = 1; next} on && /^}/ {exit} on' "$ergo" |
		grep -oE '^	[A-Z][A-Za-z0-9]*' | tr -d '\t' | sort -u)
	echo "check-docs: ergonode.Options fields ($ergo): $(echo $fields | sed 's/ /, /g')"
	for o in $fields; do in_conf "ergonode.Options field" "$o" "$ergo" "\`$o[\` ]"; done
fi

# 2. Relative links and their anchors.
# anchors FILE: the GitHub anchors of FILE's headings, one a line.
anchors() {
	awk '
		/^ *(```|~~~)/ { fence = !fence; next }
		fence { next }
		/^#+ / {
			h = $0; sub(/^#+ +/, "", h); sub(/ +#+ *$/, "", h)
			h = tolower(h); gsub(/[^a-z0-9 _-]/, "", h); gsub(/ /, "-", h)
			n = seen[h]++; if (n) h = h "-" n
			print h
		}' "$1"
}
# links FILE: the targets of FILE's Markdown links outside code, one a line.
links() {
	awk '
		/^ *(```|~~~)/ { fence = !fence; next }
		fence { next }
		{
			line = $0; gsub(/`[^`]*`/, "", line)
			while (match(line, /\]\([^) ]+( "[^"]*")?\)/)) {
				t = substr(line, RSTART + 2, RLENGTH - 3); sub(/ ".*/, "", t)
				print t
				line = substr(line, RSTART + RLENGTH)
			}
		}' "$1"
}
nlinks=0
files=(README.md CONTRIBUTING.md docs/*.md)
for md in "${files[@]}"; do
	[ -f "$md" ] || { problem "$md is missing"; continue; }
	dir=$(dirname "$md")
	while IFS= read -r t; do
		case $t in http://* | https://* | mailto:*) continue ;; esac
		nlinks=$((nlinks + 1))
		path=${t%%#*}
		frag=
		[ "$path" != "$t" ] && frag=${t#*#}
		if [ -z "$path" ]; then target=$md; elif [ "$dir" = . ]; then target=$path; else target=$dir/$path; fi
		if [ ! -e "$target" ]; then
			problem "$md links to $t: no such file ($target)"
			continue
		fi
		if [ -n "$frag" ] && [ -f "$target" ] && [[ $target == *.md ]]; then
			anchors "$target" | grep -qxF -- "$frag" || problem "$md links to $t: $target has no heading with anchor #$frag"
		fi
	done < <(links "$md")
done
echo "check-docs: $nlinks relative links in ${#files[@]} files (${files[*]})"

if [ "$problems" -gt 0 ]; then
	echo "check-docs: FAILED, $problems problem(s) above" >&2
	exit 1
fi
echo "check-docs: ok ($nflags flags, $(wc -w <<<"$keys") keys, $(printf "%s\n" $envs $goenv | sort -u | wc -l) environment variables, $(wc -w <<<"$disc") discovery options documented; every relative link resolves)"
