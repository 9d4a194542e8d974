# These tests cover the strategy's own logic and its behaviour without a
# tailnet; the libcluster pieces come from the stand-in in test/support. The
# strategy on a real tailnet is checked by test_cluster.exs, run as a
# distributed node by the repository's Common Test suite.
#
# The tests of the checks the strategy shares with tsdist's discovery call
# the real :tailscale_discovery, from the repository's rebar3 build
# (REBAR_BASE_DIR if set, as in the OTP 27 lane, else _build; `make
# test-erlang` builds it first).
repo = Path.expand("../../..", __DIR__)
rebar_base = Path.expand(System.get_env("REBAR_BASE_DIR") || "_build", repo)
Code.prepend_path(Path.join([rebar_base, "default", "lib", "tsdist", "ebin"]))

ExUnit.start()
