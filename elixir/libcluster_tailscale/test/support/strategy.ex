# STAND-IN for libcluster 3.x, kept to its documented behaviour because Hex is
# unreachable here. Used only by the tests and test_cluster.exs; it must NOT
# ship: a real application gets Cluster.Strategy from libcluster.
defmodule Cluster.Strategy do
  @moduledoc false

  # Only the two functions Cluster.Strategy.Tailscale calls, with libcluster's
  # documented contract: the MFAs get the node appended to their arguments;
  # the local node and (for connect) nodes already in list_nodes' answer, or
  # (for disconnect) nodes not in it, are skipped; every outcome is logged;
  # the result is :ok or {:error, [{node, reason}]}.

  @type bad_nodes :: [{node(), term()}]
  @type mfa_tuple :: {module(), atom(), [term()]}

  @spec connect_nodes(atom(), mfa_tuple, mfa_tuple, [node()]) :: :ok | {:error, bad_nodes}
  def connect_nodes(topology, {_, _, _} = connect, {_, _, _} = list_nodes, nodes)
      when is_list(nodes) do
    already = MapSet.new(call(list_nodes, []))

    nodes
    |> Enum.reject(&(&1 == node() or MapSet.member?(already, &1)))
    |> Enum.uniq()
    |> Enum.reduce([], fn n, bad ->
      case call(connect, [n]) do
        true ->
          Cluster.Logger.info(topology, "connected to #{inspect(n)}")
          bad

        false ->
          Cluster.Logger.warn(topology, "unable to connect to #{inspect(n)}")
          [{n, false} | bad]

        :ignored ->
          Cluster.Logger.warn(topology, "unable to connect to #{inspect(n)}: not part of network")
          [{n, :ignored} | bad]
      end
    end)
    |> result()
  end

  @spec disconnect_nodes(atom(), mfa_tuple, mfa_tuple, [node()]) :: :ok | {:error, bad_nodes}
  def disconnect_nodes(topology, {_, _, _} = disconnect, {_, _, _} = list_nodes, nodes)
      when is_list(nodes) do
    connected = MapSet.new(call(list_nodes, []))

    nodes
    |> Enum.filter(&(&1 != node() and MapSet.member?(connected, &1)))
    |> Enum.uniq()
    |> Enum.reduce([], fn n, bad ->
      case call(disconnect, [n]) do
        true ->
          Cluster.Logger.info(topology, "disconnected from #{inspect(n)}")
          bad

        false ->
          Cluster.Logger.warn(
            topology,
            "disconnect from #{inspect(n)} failed because we're already disconnected"
          )

          bad

        :ignored ->
          Cluster.Logger.warn(
            topology,
            "disconnect from #{inspect(n)} failed because it is not part of the network"
          )

          bad

        reason ->
          Cluster.Logger.warn(
            topology,
            "disconnect from #{inspect(n)} failed with: #{inspect(reason)}"
          )

          [{n, reason} | bad]
      end
    end)
    |> result()
  end

  defp call({m, f, a}, extra) do
    args = a ++ extra

    Code.ensure_loaded(m)

    unless function_exported?(m, f, length(args)) do
      raise "#{inspect(m)}.#{f}/#{length(args)} is undefined!"
    end

    apply(m, f, args)
  end

  defp result([]), do: :ok
  defp result(bad), do: {:error, bad}
end
