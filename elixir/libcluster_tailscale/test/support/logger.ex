# STAND-IN for libcluster 3.x, kept to its documented behaviour because Hex is
# unreachable here. Used only by the tests and test_cluster.exs; it must NOT
# ship: a real application gets Cluster.Logger from libcluster.
defmodule Cluster.Logger do
  @moduledoc false
  require Logger

  # As in libcluster: debug messages only with `config :libcluster, debug: true`.
  def debug(topology, msg) do
    if Application.get_env(:libcluster, :debug, false) in [nil, false, "false"] do
      :ok
    else
      Logger.debug(message(topology, msg))
    end
  end

  def info(topology, msg), do: Logger.info(message(topology, msg))
  def warn(topology, msg), do: Logger.warning(message(topology, msg))
  def error(topology, msg), do: Logger.error(message(topology, msg))

  defp message(topology, msg), do: "[libcluster:#{topology}] #{msg}"
end
