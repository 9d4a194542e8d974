defmodule LibclusterTailscale.MixProject do
  use Mix.Project

  def project do
    [
      app: :libcluster_tailscale,
      version: "0.1.0",
      elixir: "~> 1.14",
      elixirc_paths: elixirc_paths(Mix.env()),
      start_permanent: Mix.env() == :prod,
      # No dependencies at all: libcluster is a dependency of the application
      # that uses this strategy (it calls Cluster.Strategy and Cluster.Logger),
      # and tsdist (the tailscale_* Erlang modules) comes from this repository.
      deps: [],
      # Provided by libcluster, a dependency of the application that uses
      # the strategy, not of this project (see elixirc_paths/1 for the tests).
      xref: [exclude: [Cluster.Strategy, Cluster.Logger]]
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end

  # test/support holds a stand-in for the few libcluster pieces the strategy
  # uses; it is compiled for the tests only and never ships.
  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
