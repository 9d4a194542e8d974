# tsdist: Erlang distribution over a Tailscale tailnet.
#
#   make demo    the offline tailnet with helpers passing a connection
#   make test    every test (installs what is missing first)
#   make build   bin/tsdist and the demo's client

export PATH := /usr/local/go/bin:$(PATH)
# ts_omit_peerapiserver leaves tailscale's PeerAPI out of every binary: in a
# tsnet node it would hold a TCP port open on the host, and tsdist needs
# none of it. The tests build the helper with the same tags.
export GOFLAGS := -buildvcs=false -tags=ts_omit_peerapiserver
GO ?= go
FUZZTIME ?= 10s

.PHONY: all build deps demo test test-go test-race fuzz vet clean

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	$(GO) build -o bin/tsdist ./cmd/tsdist
	$(GO) build -o bin/echo ./demo/echo

demo: build
	bash demo/run.sh

vet:
	$(GO) vet ./...

test-go:
	$(GO) test -count=1 -timeout 10m ./...

# The race detector on the packages whose concurrency is most delicate.
test-race:
	$(GO) test -race -count=1 -timeout 10m ./carrier/ ./control/

fuzz:
	FUZZTIME=$(FUZZTIME) bash scripts/fuzz.sh

test: build vet test-go test-race fuzz

clean:
	rm -rf bin
