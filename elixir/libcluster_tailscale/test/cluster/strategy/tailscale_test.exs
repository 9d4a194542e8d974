defmodule Cluster.Strategy.TailscaleTest do
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog

  alias Cluster.Strategy.Tailscale
  alias Cluster.Strategy.State

  @defaults %{
    tags: [],
    hostname_pattern: nil,
    online_only: true,
    disconnect_on_departure: true,
    poll_interval: 5_000
  }

  describe "validate_config/1" do
    test "fills in every default" do
      assert Tailscale.validate_config([]) == {:ok, @defaults}
      assert Map.new(Tailscale.defaults()) == @defaults
    end

    test "takes every option" do
      config = [
        tags: ["tag:erlang", "tag:web"],
        hostname_pattern: "^app-[0-9]+$",
        online_only: false,
        disconnect_on_departure: false,
        poll_interval: 5_000
      ]

      assert Tailscale.validate_config(config) == {:ok, Map.new(config)}
    end

    test "refuses an unknown option, naming it and the known ones" do
      assert {:error, msg} = Tailscale.validate_config(tag: ["tag:erlang"])
      assert msg =~ "unknown option(s) :tag"
      assert msg =~ ":tags"
      assert msg =~ ":poll_interval"
    end

    test "refuses a config that is not a keyword list" do
      assert {:error, msg} = Tailscale.validate_config(%{tags: []})
      assert msg =~ "config must be a keyword list"
      assert {:error, _} = Tailscale.validate_config(["tag:erlang"])
      assert {:error, _} = Tailscale.validate_config(nil)
    end

    test "refuses tags that are not ACL tags" do
      assert {:error, msg} = Tailscale.validate_config(tags: ["erlang"])
      assert msg =~ ":tags"
      assert msg =~ ~s("tag:erlang")
      assert msg =~ ~s(["erlang"])

      assert {:error, _} = Tailscale.validate_config(tags: [:"tag:erlang"])
      assert {:error, _} = Tailscale.validate_config(tags: ["tag:"])
      assert {:error, msg} = Tailscale.validate_config(tags: "tag:erlang")
      assert msg =~ "must be a list"
    end

    test "refuses a hostname_pattern that is not a valid regex string" do
      assert {:error, msg} = Tailscale.validate_config(hostname_pattern: "app-(")
      assert msg =~ ":hostname_pattern"
      assert msg =~ "not a valid regular expression"

      assert {:error, msg} = Tailscale.validate_config(hostname_pattern: ~r/app/)
      assert msg =~ "as a string"
      assert {:error, _} = Tailscale.validate_config(hostname_pattern: :app)
    end

    test "refuses booleans that are not booleans" do
      assert {:error, msg} = Tailscale.validate_config(online_only: "yes")
      assert msg =~ ":online_only must be true or false"
      assert {:error, msg} = Tailscale.validate_config(disconnect_on_departure: nil)
      assert msg =~ ":disconnect_on_departure must be true or false"
    end

    test "refuses a poll_interval that is not a positive integer" do
      for bad <- [0, -1, 1.5, "30000", nil, :infinity] do
        assert {:error, msg} = Tailscale.validate_config(poll_interval: bad)
        assert msg =~ ":poll_interval must be a positive integer"
      end
    end
  end

  test "the moduledoc documents every option with its default and has a config example" do
    {:docs_v1, _, :elixir, _, %{"en" => doc}, _, _} = Code.fetch_docs(Tailscale)

    for {option, default} <- [
          tags: "`[]`",
          hostname_pattern: "`nil`",
          online_only: "`true`",
          disconnect_on_departure: "`true`",
          poll_interval: "`5_000`"
        ] do
      assert doc =~ ~r/\* `#{option}` - [^*]*\(default: #{Regex.escape(default)}/,
             "#{option} and its default #{default} are not documented"
    end

    assert doc =~ "strategy: Cluster.Strategy.Tailscale"
  end

  test "discovery_opts/1 hands discovery the filters only, no nil pattern" do
    assert Tailscale.discovery_opts(@defaults) == %{tags: [], online_only: true}

    {:ok, options} =
      Tailscale.validate_config(tags: ["tag:erlang"], hostname_pattern: "^a", online_only: false)

    assert Tailscale.discovery_opts(options) == %{
             tags: ["tag:erlang"],
             hostname_pattern: "^a",
             online_only: false
           }
  end

  describe "the checks shared with tsdist's discovery (:tailscale_discovery)" do
    setup do
      assert {:module, :tailscale_discovery} = Code.ensure_loaded(:tailscale_discovery),
             "tsdist's ebin is not on the code path: build it with rebar3 compile"

      :ok
    end

    defp peer(node, extra) do
      Map.merge(
        %{"node" => node, "hostname" => node, "online" => true, "tags" => ["tag:erlang"]},
        extra
      )
    end

    test "peers the node's policy does not admit are never candidates" do
      peers = [
        peer("app-1", %{"allowed" => true}),
        peer("app-2", %{"allowed" => false}),
        # a helper too old to say: not admitted
        peer("app-3", %{})
      ]

      {:ok, options} = Tailscale.validate_config(tags: ["tag:erlang"], hostname_pattern: "^app-")

      capture_log(fn ->
        matched = :tailscale_discovery.matching(peers, Tailscale.discovery_opts(options))
        assert Enum.map(matched, & &1["node"]) == ["app-1"]
      end)
    end

    test "names from a host's EPMD are checked and capped before they become atoms" do
      long = String.duplicate("x", 300) |> String.to_charlist()
      many = for i <- 1..50_000, do: ~c"n#{i}"
      before = :erlang.system_info(:atom_count)

      {kept, report} = :tailscale_discovery.node_names(~c"hostile", [~c"ok1", long | many], 1)

      assert length(kept) == 64
      assert hd(kept) == ~c"ok1@hostile"
      assert report == %{invalid: [long], over_limit: 50_000 - 63, dropped: 1}
      # node_names/3 makes no atom at all; candidates/2 makes them of what it keeps
      assert :erlang.system_info(:atom_count) - before < 50
    end
  end

  describe "plan/4" do
    test "connects every candidate, sorted, on the first view" do
      assert Tailscale.plan(MapSet.new(), [:b@beta, :a@alpha], true, :me@gamma) ==
               {[:a@alpha, :b@beta], []}
    end

    test "disconnects the nodes that are no longer candidates" do
      clustered = MapSet.new([:a@alpha, :b@beta, :c@delta])

      assert Tailscale.plan(clustered, [:a@alpha, :e@eps], true, :me@gamma) ==
               {[:a@alpha, :e@eps], [:b@beta, :c@delta]}

      assert Tailscale.plan(clustered, [], true, :me@gamma) ==
               {[], [:a@alpha, :b@beta, :c@delta]}
    end

    test "disconnects nothing without disconnect_on_departure" do
      clustered = MapSet.new([:a@alpha, :b@beta])
      assert Tailscale.plan(clustered, [:a@alpha], false, :me@gamma) == {[:a@alpha], []}
      assert Tailscale.plan(clustered, [], false, :me@gamma) == {[], []}
    end

    test "never includes the local node, and each node once" do
      assert Tailscale.plan(
               MapSet.new([:me@gamma]),
               [:me@gamma, :a@alpha, :a@alpha],
               true,
               :me@gamma
             ) ==
               {[:a@alpha], []}
    end

    test "keeps the nodes of a host whose EPMD gave no answer" do
      clustered = MapSet.new([:a@alpha, :b@beta, :c@beta, :d@delta])

      # beta's EPMD was silent: its nodes are unknown, not gone; delta
      # answered without d.
      assert Tailscale.plan(clustered, [:a@alpha], true, :me@gamma, [~c"beta"]) ==
               {[:a@alpha], [:d@delta]}

      assert Tailscale.plan(clustered, [:a@alpha], true, :me@gamma, ["beta", "delta"]) ==
               {[:a@alpha], []}

      # Once beta answers without them, they are gone.
      assert Tailscale.plan(clustered, [:a@alpha], true, :me@gamma, []) ==
               {[:a@alpha], [:b@beta, :c@beta, :d@delta]}
    end

    test "no change, no disconnect" do
      clustered = MapSet.new([:a@alpha, :b@beta])

      assert Tailscale.plan(clustered, [:b@beta, :a@alpha], true, :me@gamma) ==
               {[:a@alpha, :b@beta], []}
    end
  end

  describe "settle/4" do
    test "all went well: the candidates" do
      assert Tailscale.settle([:a@alpha, :b@beta], :ok, :ok, :me@gamma) ==
               MapSet.new([:a@alpha, :b@beta])
    end

    test "a candidate that could not be connected is not clustered (tried again next time)" do
      assert Tailscale.settle([:a@alpha, :b@beta], {:error, [{:b@beta, false}]}, :ok, :me@gamma) ==
               MapSet.new([:a@alpha])
    end

    test "a departed node that could not be disconnected stays (tried again next time)" do
      assert Tailscale.settle([:a@alpha], :ok, {:error, [{:c@delta, :some_reason}]}, :me@gamma) ==
               MapSet.new([:a@alpha, :c@delta])
    end

    test "never the local node" do
      assert Tailscale.settle([:me@gamma, :a@alpha], :ok, :ok, :me@gamma) ==
               MapSet.new([:a@alpha])
    end
  end

  # A pretend network for reconcile/2: the connected nodes are held by an
  # Agent, and only nodes in `reachable` can be connected. The state's MFAs
  # point here, as libcluster lets a topology choose its own.
  defmodule Net do
    def start(reachable) do
      Agent.start_link(fn -> %{connected: MapSet.new(), reachable: MapSet.new(reachable)} end,
        name: __MODULE__
      )
    end

    def set_reachable(nodes), do: Agent.update(__MODULE__, &%{&1 | reachable: MapSet.new(nodes)})

    def drop(node),
      do: Agent.update(__MODULE__, &%{&1 | connected: MapSet.delete(&1.connected, node)})

    def list, do: Agent.get(__MODULE__, &Enum.sort(&1.connected))

    def connect(node) do
      Agent.get_and_update(__MODULE__, fn net ->
        if MapSet.member?(net.reachable, node),
          do: {true, %{net | connected: MapSet.put(net.connected, node)}},
          else: {false, net}
      end)
    end

    def disconnect(node) do
      Agent.get_and_update(__MODULE__, fn net ->
        {MapSet.member?(net.connected, node),
         %{net | connected: MapSet.delete(net.connected, node)}}
      end)
    end
  end

  defp net_state(config) do
    {:ok, options} = Tailscale.validate_config(config)

    %State{
      topology: :test,
      connect: {Net, :connect, []},
      disconnect: {Net, :disconnect, []},
      list_nodes: {Net, :list, []},
      config: config,
      meta: %{
        options: options,
        peers: [],
        clustered: MapSet.new(),
        helper: nil,
        subscribe_failures: 0
      }
    }
  end

  describe "reconcile/2 through libcluster's connect_nodes/disconnect_nodes" do
    test "connects new candidates, disconnects departed ones, retries failures" do
      {:ok, _} = Net.start([:a@alpha, :b@beta, :c@delta])
      state = net_state([])

      log =
        capture_log(fn ->
          state = Tailscale.reconcile(state, [:a@alpha, :b@beta])
          assert Net.list() == [:a@alpha, :b@beta]
          assert state.meta.clustered == MapSet.new([:a@alpha, :b@beta])

          # beta leaves, delta comes: beta is disconnected, delta connected
          state = Tailscale.reconcile(state, [:a@alpha, :c@delta])
          assert Net.list() == [:a@alpha, :c@delta]
          assert state.meta.clustered == MapSet.new([:a@alpha, :c@delta])

          # a connection drops: the next view brings it back
          Net.drop(:a@alpha)
          state = Tailscale.reconcile(state, [:a@alpha, :c@delta])
          assert Net.list() == [:a@alpha, :c@delta]

          # epsilon cannot be reached yet: not clustered, tried again later
          state = Tailscale.reconcile(state, [:a@alpha, :c@delta, :e@eps])
          assert state.meta.clustered == MapSet.new([:a@alpha, :c@delta])
          Net.set_reachable([:a@alpha, :c@delta, :e@eps])
          state = Tailscale.reconcile(state, [:a@alpha, :c@delta, :e@eps])
          assert Net.list() == [:a@alpha, :c@delta, :e@eps]
          assert state.meta.clustered == MapSet.new([:a@alpha, :c@delta, :e@eps])

          # everyone leaves
          state = Tailscale.reconcile(state, [])
          assert Net.list() == []
          assert state.meta.clustered == MapSet.new()
        end)

      assert log =~ "[libcluster:test] connected to :a@alpha"
      assert log =~ "[libcluster:test] disconnected from :b@beta"
      assert log =~ "[libcluster:test] unable to connect to :e@eps"
    end

    test "without disconnect_on_departure, departed nodes stay connected" do
      {:ok, _} = Net.start([:a@alpha, :b@beta])
      state = net_state(disconnect_on_departure: false)

      capture_log(fn ->
        state = Tailscale.reconcile(state, [:a@alpha, :b@beta])
        state = Tailscale.reconcile(state, [:a@alpha])
        assert Net.list() == [:a@alpha, :b@beta]
        assert state.meta.clustered == MapSet.new([:a@alpha])
      end)
    end
  end

  describe "as a process, started the way libcluster starts it" do
    setup do
      state = %State{
        topology: :test,
        connect: {:net_kernel, :connect_node, []},
        disconnect: {:erlang, :disconnect_node, []},
        list_nodes: {:erlang, :nodes, [:connected]},
        config: [],
        meta: nil
      }

      {:ok, state: state}
    end

    test "its child spec is the one Cluster.Supervisor uses", %{state: state} do
      assert %{id: Tailscale, start: {Tailscale, :start_link, [[^state]]}} =
               Supervisor.child_spec({Tailscale, [state]}, [])
    end

    test "a bad option stops it at start with the reason", %{state: state} do
      Process.flag(:trap_exit, true)

      log =
        capture_log(fn ->
          assert {:error, {:invalid_config, msg}} =
                   Tailscale.start_link([%{state | config: [poll_interval: 0]}])

          assert msg =~ ":poll_interval must be a positive integer"
        end)

      assert log =~ "[libcluster:test] Cluster.Strategy.Tailscale not started: :poll_interval"
    end

    test "without a tailnet it stays up, says why and keeps trying", %{state: state} do
      log =
        capture_log(fn ->
          {:ok, pid} = Tailscale.start_link([%{state | config: [poll_interval: 50]}])
          Process.sleep(130)
          assert Process.alive?(pid)

          # a view arriving while discovery is unavailable is logged, not a crash
          send(pid, {:tailscale_peers, []})
          Process.sleep(50)
          assert Process.alive?(pid)
          assert :sys.get_state(pid).meta.peers == []
          GenServer.stop(pid)
        end)

      assert log =~ "cannot subscribe to the tailnet"
      assert log =~ "-proto_dist tailscale"
      # retried every poll_interval
      assert length(String.split(log, "cannot subscribe to the tailnet")) >= 3
      assert log =~ "discovery failed"
    end
  end
end
