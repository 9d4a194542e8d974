# These tests cover the strategy's own logic and its behaviour without a
# tailnet; the libcluster pieces come from the stand-in in test/support. The
# strategy on a real tailnet is checked by test_cluster.exs, run as a
# distributed node by the repository's Common Test suite.
#
# The tests of the checks the strategy shares with tsdist's discovery call
# the real :tailscale_discovery, from the repository's rebar3 build: the
# first of REBAR_BASE_DIR (as in the OTP 27 lane) and _build, default or
# test profile, that has it (`make test-erlang` builds it first).
repo = Path.expand("../../..", __DIR__)

ebin =
  for base <- Enum.reject([System.get_env("REBAR_BASE_DIR"), "_build"], &(&1 in [nil, ""])),
      profile <- ["default", "test"],
      dir = Path.join([Path.expand(base, repo), profile, "lib", "tsdist", "ebin"]),
      File.exists?(Path.join(dir, "tailscale_discovery.beam")) do
    dir
  end
  |> List.first()

if ebin, do: Code.prepend_path(ebin)

ExUnit.start()
