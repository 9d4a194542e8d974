# Runs Cluster.Strategy.Tailscale on a real distributed Elixir node and checks
# that it clusters with the nodes named on the command line. Written to be run
# by a Common Test case; nothing needs compiling first (the script loads the
# strategy and the test-only libcluster stand-in from its own directory):
#
#   elixir --sname x@gamma --cookie COOKIE \
#     --erl "-pa TSDIST_EBIN -proto_dist tailscale -start_epmd false -epmd_module tailscale_epmd" \
#     PATH/TO/elixir/libcluster_tailscale/test_cluster.exs a@alpha b@beta
#
# where TSDIST_EBIN is _build/default/lib/tsdist/ebin (the node's tailnet
# settings come from the environment as usual: TSDIST_HELPER, TS_CONTROL_URL,
# ...). It starts the strategy the way libcluster's Cluster.Supervisor does (a
# %Cluster.Strategy.State{} with libcluster's default MFAs, as the only
# argument of the child spec {Cluster.Strategy.Tailscale, [state]}), waits up
# to 20 s for Node.list() to contain every expected node, then prints exactly
# one result line:
#
#   CLUSTER_OK a@alpha b@beta                      exit status 0 (the sorted Node.list())
#   CLUSTER_FAIL have: ... missing: ... (why)      exit status 1
#
# (the strategy's and tsdist's log lines are in the output too, libcluster's
# debug ones included: look for the line that starts with CLUSTER_). Node
# lists are space-separated on CLUSTER_OK, comma-separated on CLUSTER_FAIL.
#
# The strategy's options come from the environment (unset: the default):
#
#   LIBCLUSTER_TAILSCALE_TAGS                     comma-separated, e.g. tag:erlang,tag:web
#   LIBCLUSTER_TAILSCALE_HOSTNAME_PATTERN         e.g. ^(alpha|beta)$
#   LIBCLUSTER_TAILSCALE_ONLINE_ONLY              true | false
#   LIBCLUSTER_TAILSCALE_DISCONNECT_ON_DEPARTURE  true | false
#   LIBCLUSTER_TAILSCALE_POLL_INTERVAL            milliseconds
#   LIBCLUSTER_TAILSCALE_WAIT_MS                  how long to wait (default 20000)
#
# A bad option, no expected node, or a node that is not distributed ends at
# once with CLUSTER_FAIL and the reason.

for file <-
      Path.wildcard(Path.join(__DIR__, "test/support/*.ex")) ++
        Path.wildcard(Path.join(__DIR__, "lib/**/*.ex")) do
  Code.require_file(file)
end

# The strategy's debug lines (every set of candidates) in the output.
Application.put_env(:libcluster, :debug, true)

defmodule TestCluster do
  @prefix "LIBCLUSTER_TAILSCALE_"

  def main(argv) do
    expected = argv |> Enum.map(&String.to_atom/1) |> Enum.sort()
    wait_ms = env_integer("WAIT_MS") || 20_000

    cond do
      not (is_integer(wait_ms) and wait_ms > 0) ->
        fail(expected, "#{@prefix}WAIT_MS must be a positive integer, got: #{inspect(wait_ms)}")

      expected == [] ->
        fail([], "no expected node given (usage: test_cluster.exs NODE...)")

      not Node.alive?() ->
        fail(expected, "this node is not distributed (start it with --sname or --name)")

      true ->
        Process.flag(:trap_exit, true)

        state = %Cluster.Strategy.State{
          topology: :tailscale_test,
          connect: {:net_kernel, :connect_node, []},
          disconnect: {:erlang, :disconnect_node, []},
          list_nodes: {:erlang, :nodes, [:connected]},
          config: config(),
          meta: nil
        }

        children = [{Cluster.Strategy.Tailscale, [state]}]

        case Supervisor.start_link(children, strategy: :one_for_one) do
          {:ok, _sup} ->
            wait(expected, System.monotonic_time(:millisecond) + wait_ms)

          {:error, reason} ->
            fail(expected, "the strategy did not start: #{inspect(reason)}")
        end
    end
  end

  defp wait(expected, deadline) do
    have = Enum.sort(Node.list())

    cond do
      expected -- have == [] ->
        IO.puts("CLUSTER_OK " <> Enum.join(have, " "))
        System.halt(0)

      System.monotonic_time(:millisecond) >= deadline ->
        fail(expected, "timed out")

      true ->
        Process.sleep(100)
        wait(expected, deadline)
    end
  end

  defp fail(expected, why) do
    have = Enum.sort(Node.list())

    IO.puts("CLUSTER_FAIL have: #{names(have)} missing: #{names(expected -- have)} (#{why})")

    System.halt(1)
  end

  defp names([]), do: "(none)"
  defp names(nodes), do: Enum.join(nodes, ",")

  defp config do
    [
      tags: env("TAGS") && String.split(env("TAGS"), ",", trim: true),
      hostname_pattern: env("HOSTNAME_PATTERN"),
      online_only: env_boolean("ONLINE_ONLY"),
      disconnect_on_departure: env_boolean("DISCONNECT_ON_DEPARTURE"),
      poll_interval: env_integer("POLL_INTERVAL")
    ]
    |> Enum.reject(fn {_, v} -> v == nil end)
  end

  defp env(name) do
    case System.get_env(@prefix <> name) do
      nil -> nil
      "" -> nil
      value -> value
    end
  end

  # An unparsable value is handed on as it is, for the strategy to refuse
  # with its own message.
  defp env_boolean(name) do
    case env(name) do
      "true" -> true
      "false" -> false
      other -> other
    end
  end

  defp env_integer(name) do
    case env(name) && Integer.parse(env(name)) do
      {n, ""} -> n
      _ -> env(name)
    end
  end
end

TestCluster.main(System.argv())
