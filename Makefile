# tsdist: Erlang distribution over a Tailscale tailnet.
#
#   make demo    the offline tailnet with helpers passing a connection
#   make test    every test (installs what is missing first)
#   make build   bin/tsdist and the demo's client
#   make bench   every carrier side by side; rewrites docs/BENCHMARKS.md and its plot
#   make check-docs  the docs against the code (flags, keys, links)

export PATH := /usr/local/go/bin:$(PATH)
# ts_omit_peerapiserver leaves tailscale's PeerAPI out of every binary: in a
# tsnet node it would hold a TCP port open on the host, and tsdist needs
# none of it. The tests build the helper with the same tags.
export GOFLAGS := -buildvcs=false -tags=ts_omit_peerapiserver
GO ?= go
# A count, not a duration: Go 1.26's fuzzer can fail a target with "context
# deadline exceeded" when a duration runs out mid-execution (go.dev/issue/75804,
# fixed in Go 1.27). 50,000 runs take a few seconds per target here.
FUZZTIME ?= 50000x

.PHONY: all build build-go build-erlang nif deps demo test test-go test-race test-erlang test-otp27 test-headscale fuzz vet bench bench-smoke check-docs clean

all: build

deps:
	@bash scripts/install-deps.sh

build: deps build-go build-erlang

build-go:
	$(GO) build -o bin/tsdist ./cmd/tsdist
	$(GO) build -o bin/echo ./demo/echo
	$(GO) build -o bin/ergoprobe ./test/ergoprobe
	$(GO) build -o bin/hostilepeer ./test/hostilepeer
	$(GO) build -o bin/ergo-greeter ./examples/ergo-greeter

# The OTP side: erlang_src/ (rebar3, which runs `make nif` first).
build-erlang:
	rebar3 compile

# priv/tailscale_fd.so, the one-function NIF that closes passed descriptors.
ERTS_INCLUDE = $(shell erl -noshell -eval 'io:format("~s/erts-~s/include", [code:root_dir(), erlang:system_info(version)]), halt().')
nif: priv/tailscale_fd.so
priv/tailscale_fd.so: c_src/tailscale_fd.c
	@mkdir -p priv
	$(CC) -O2 -Wall -Werror -shared -fPIC -I$(ERTS_INCLUDE) -o $@ $<

demo: build
	bash demo/run.sh

vet:
	$(GO) vet ./...

# The docs against the code: every tsdist flag, tsdist key, environment
# variable and discovery option in docs/configuration.md; every relative link.
check-docs:
	bash scripts/check-docs.sh

test-go:
	$(GO) test -count=1 -timeout 10m ./...

# The race detector on the packages whose concurrency is most delicate.
test-race:
	$(GO) test -race -count=1 -timeout 10m ./carrier/ ./control/

fuzz:
	FUZZTIME=$(FUZZTIME) bash scripts/fuzz.sh

# EUnit, the Elixir strategy's ExUnit tests, then real BEAM nodes on the
# offline tailnet (Common Test).
test-erlang: build
	rebar3 eunit --dir test/erlang
	cd elixir/libcluster_tailscale && MIX_ENV=test mix test
	TSDIST_HELPER=$(CURDIR)/bin/tsdist rebar3 ct --dir test/erlang --suite tailscale_dist_SUITE,tailscale_discovery_SUITE,tailscale_ergo_SUITE,tailscale_trust_SUITE

# The same suites under OTP 27 and Elixir 1.18 (a Debian 13 root that
# scripts/otp27.sh builds once and caches outside the repository), then an
# OTP 25 node and an OTP 27 node in one cluster.
test-otp27: build
	bash scripts/otp27.sh run env REBAR_BASE_DIR=_build/otp27 sh -c \
		'rebar3 eunit --dir test/erlang && (cd elixir/libcluster_tailscale && MIX_ENV=test MIX_BUILD_PATH=_build/otp27 mix test) && TSDIST_HELPER=$(CURDIR)/bin/tsdist rebar3 ct --dir test/erlang --suite tailscale_dist_SUITE,tailscale_discovery_SUITE,tailscale_ergo_SUITE,tailscale_trust_SUITE'
	TSDIST_HELPER=$(CURDIR)/bin/tsdist bash scripts/otp27.sh host \
		rebar3 ct --dir test/erlang --suite tailscale_mixed_SUITE

# The benchmark (bench/bench.sh): one interleaved run of every carrier,
# then docs/BENCHMARKS.md and docs/benchmarks.png from its numbers. About
# 11 minutes here; BENCH_REPEATS=N changes the repeats (5), BENCH_RESTARTS
# the restart trials (10); bench/bench.sh lists the rest.
bench: build
	bash bench/bench.sh

# A tiny run of the same harness (one repeat, small counts, no doc), so
# that it never rots; it fails only if the harness does, never on speed.
bench-smoke: build
	BENCH_QUICK=1 BENCH_OUT=$(CURDIR)/_build/bench-smoke bash bench/bench.sh

# A real control server: Headscale (scripts/headscale.sh builds it once,
# about 3.5 minutes, and caches it outside the repository) on 127.0.0.1,
# offline, with the DERP relay of `tsdist devnet --relay-only', and real
# BEAM nodes joining it with pre-auth keys, tags and interactive login.
test-headscale: build
	hs=$$(bash scripts/headscale.sh build) && \
		TSDIST_HEADSCALE=$$hs TSDIST_HELPER=$(CURDIR)/bin/tsdist rebar3 ct --dir test/erlang --suite tailscale_headscale_SUITE

test: build vet check-docs test-go test-race test-erlang test-otp27 fuzz bench-smoke test-headscale

clean:
	rm -rf bin priv _build
