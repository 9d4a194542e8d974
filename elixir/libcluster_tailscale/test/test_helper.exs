# These tests cover the strategy's own logic and its behaviour without a
# tailnet; the libcluster pieces come from the stand-in in test/support. The
# strategy on a real tailnet is checked by test_cluster.exs, run as a
# distributed node by the repository's Common Test suite.
ExUnit.start()
