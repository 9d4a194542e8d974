# STAND-IN for libcluster 3.x, kept to its documented behaviour because Hex is
# unreachable here. Used only by the tests and test_cluster.exs; it must NOT
# ship: a real application gets Cluster.Strategy.State from libcluster.
defmodule Cluster.Strategy.State do
  @moduledoc false

  # The state libcluster's Cluster.Supervisor builds for each topology and
  # passes to the strategy's start_link/1 as a one-element list.
  @type t :: %__MODULE__{
          topology: atom(),
          connect: {module(), atom(), [term()]},
          disconnect: {module(), atom(), [term()]},
          list_nodes: {module(), atom(), [term()]},
          config: keyword(),
          meta: term()
        }

  defstruct topology: nil,
            connect: nil,
            disconnect: nil,
            list_nodes: nil,
            config: [],
            meta: nil
end
