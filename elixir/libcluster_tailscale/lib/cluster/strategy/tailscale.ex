defmodule Cluster.Strategy.Tailscale do
  @moduledoc """
  A libcluster strategy that clusters the nodes of a Tailscale tailnet, for
  nodes that run Erlang distribution over the tailnet with tsdist
  (`-proto_dist tailscale`).

  It subscribes to the node's tailnet view (`:tailscale_helper.subscribe/1`)
  and is told at once, and again on every change of the tailnet, which peers
  there are. For each view it asks `:tailscale_discovery.candidates/2` which
  nodes to connect: the peers that the node's access policy admits (the
  helper's `allowed`; a peer of another owner outside the policy is never
  asked anything) and that pass the filters below, and on each of them the
  node names registered on that host's tailnet EPMD (so no node basename is
  assumed; a host may run several nodes). What a host's EPMD lists is
  checked before it becomes an atom, exactly as for tsdist's own discovery:
  letters, digits, `_`, `-` and `.` only, `name@host` at most 255 bytes, at
  most 64 names per host; what is turned down is logged once a minute per
  host, and the strategy keeps running. It connects the ones
  not yet connected and, with `disconnect_on_departure`, disconnects the
  nodes it had clustered with that are no longer candidates (the peer went
  offline, lost its tag, was removed from the tailnet, or its node stopped).
  A re-scan every `poll_interval` also finds nodes that start on a host
  already in the tailnet, which changes no peer list.

  A host whose EPMD gives no answer (a timeout, a failed connection) is not
  taken for a host without nodes: the nodes clustered with there stay, and
  the strategy asks again 250 ms later, then twice as long each time up to
  `poll_interval`, as it does for a candidate it could not connect. A node
  it clustered with that goes down (it restarted, its helper did, or
  `global` disconnected it to prevent overlapping partitions) is looked for
  again 250 ms later in the same way, not at the next poll.

  The node must be started with `-proto_dist tailscale -start_epmd false`
  (and, usually, `-epmd_module tailscale_epmd`) and have tsdist's `ebin` on
  its code path. Until the node's tailnet is reachable the strategy logs a
  warning and tries again every `poll_interval`; it does not take the
  application down. A bad option does: the strategy refuses to start and
  says which option is wrong and why.

  Use either this strategy or tsdist's own discovery (the `tsdist`
  application's `discovery` setting), not both: each would disconnect what
  the other connected.

  ## Options

  * `tags` - ACL tags a peer must carry at least one of, e.g.
    `["tag:erlang"]` (default: `[]`, no tag filter)
  * `hostname_pattern` - a regular expression, as a string, the peer's short
    tailnet hostname must match, e.g. `"^app-"` (default: `nil`, any
    hostname)
  * `online_only` - only peers the tailnet reports online (default: `true`)
  * `disconnect_on_departure` - disconnect nodes this strategy clustered with
    once they are no longer candidates (default: `true`)
  * `poll_interval` - milliseconds between safety re-scans, in addition to
    the tailnet's own change events (default: `5_000`; a host that gave
    no answer and a node that could not be connected are retried sooner,
    see above)

  ## Usage

      config :libcluster,
        topologies: [
          tailnet: [
            strategy: #{inspect(__MODULE__)},
            config: [
              tags: ["tag:erlang"],
              hostname_pattern: "^app-",
              poll_interval: 5_000]]]
  """

  use GenServer

  # tsdist's modules are on the code path at run time (-pa .../tsdist/ebin),
  # not necessarily when this module is compiled.
  @compile {:no_warn_undefined, [:tailscale_helper, :tailscale_discovery]}

  # The first pause before asking a silent host or connecting a node again.
  @first_retry 250

  @defaults [
    tags: [],
    hostname_pattern: nil,
    online_only: true,
    disconnect_on_departure: true,
    poll_interval: 5_000
  ]

  @typedoc "The options, validated and with every default filled in."
  @type options :: %{
          tags: [String.t()],
          hostname_pattern: String.t() | nil,
          online_only: boolean(),
          disconnect_on_departure: boolean(),
          poll_interval: pos_integer()
        }

  @doc """
  Starts the strategy. libcluster's `Cluster.Supervisor` calls it with a
  one-element list, `[%Cluster.Strategy.State{}]`, through `child_spec/1`.
  """
  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  ## Pure functions (the strategy's own logic)

  @doc """
  The options with their defaults, as a keyword list.
  """
  @spec defaults() :: keyword()
  def defaults, do: @defaults

  @doc """
  Validates a topology's `config` keyword list and fills in the defaults.

  Returns `{:ok, options}` or `{:error, message}`, the message naming the
  option and what is wrong with it. Unknown options are refused, so that a
  misspelt option is not silently ignored.
  """
  @spec validate_config(term()) :: {:ok, options()} | {:error, String.t()}
  def validate_config(config) when is_list(config) do
    if Keyword.keyword?(config) do
      known = Keyword.keys(@defaults)

      case Enum.reject(Keyword.keys(config), &(&1 in known)) do
        [] ->
          Enum.reduce_while(@defaults, {:ok, %{}}, fn {key, default}, {:ok, acc} ->
            case validate_option(key, Keyword.get(config, key, default)) do
              {:ok, value} -> {:cont, {:ok, Map.put(acc, key, value)}}
              {:error, _} = error -> {:halt, error}
            end
          end)

        unknown ->
          {:error,
           "unknown option(s) #{Enum.map_join(Enum.uniq(unknown), ", ", &inspect/1)}; " <>
             "known options: #{Enum.map_join(known, ", ", &inspect/1)}"}
      end
    else
      {:error, "config must be a keyword list, got: #{inspect(config)}"}
    end
  end

  def validate_config(config),
    do: {:error, "config must be a keyword list, got: #{inspect(config)}"}

  defp validate_option(:tags, tags) when is_list(tags) do
    case Enum.reject(tags, &valid_tag?/1) do
      [] ->
        {:ok, tags}

      bad ->
        {:error,
         ":tags must be a list of ACL tags as strings, such as \"tag:erlang\"; " <>
           "not tags: #{inspect(bad)}"}
    end
  end

  defp validate_option(:tags, tags),
    do:
      {:error, ":tags must be a list of ACL tags such as [\"tag:erlang\"], got: #{inspect(tags)}"}

  defp validate_option(:hostname_pattern, nil), do: {:ok, nil}

  defp validate_option(:hostname_pattern, pattern) when is_binary(pattern) do
    case Regex.compile(pattern) do
      {:ok, _} ->
        {:ok, pattern}

      {:error, {reason, at}} ->
        {:error,
         ":hostname_pattern #{inspect(pattern)} is not a valid regular expression: " <>
           "#{reason} at position #{at}"}
    end
  end

  defp validate_option(:hostname_pattern, pattern),
    do:
      {:error,
       ":hostname_pattern must be a regular expression as a string (such as \"^app-\") " <>
         "or nil, got: #{inspect(pattern)}"}

  defp validate_option(key, value)
       when key in [:online_only, :disconnect_on_departure] and is_boolean(value),
       do: {:ok, value}

  defp validate_option(key, value) when key in [:online_only, :disconnect_on_departure],
    do: {:error, "#{inspect(key)} must be true or false, got: #{inspect(value)}"}

  defp validate_option(:poll_interval, ms) when is_integer(ms) and ms > 0, do: {:ok, ms}

  defp validate_option(:poll_interval, ms),
    do: {:error, ":poll_interval must be a positive integer (milliseconds), got: #{inspect(ms)}"}

  defp valid_tag?("tag:" <> name), do: name != ""
  defp valid_tag?(_), do: false

  @doc """
  The options handed to `:tailscale_discovery.candidates/2`: the filters,
  as a map with the keys `:tags`, `:hostname_pattern` and `:online_only`.
  A `hostname_pattern` of `nil` is left out, so that discovery applies its
  own "no pattern" default, whatever term it spells that with.
  """
  @spec discovery_opts(options()) :: %{
          optional(:hostname_pattern) => String.t(),
          tags: [String.t()],
          online_only: boolean()
        }
  def discovery_opts(options) do
    options
    |> Map.take([:tags, :hostname_pattern, :online_only])
    |> Map.reject(fn {key, value} -> key == :hostname_pattern and value == nil end)
  end

  @doc """
  What to do with a new list of candidates.

  `clustered` is the set of nodes the strategy clustered with so far.
  Returns `{connect, disconnect}`, two sorted lists: every candidate is to be
  connected (`Cluster.Strategy.connect_nodes/4` skips those connected
  already, and connecting again is what brings back a candidate whose
  connection dropped), and, with `disconnect_on_departure`, every node
  clustered with before that is no longer a candidate is to be
  disconnected, unless it runs on one of the `unanswered` hosts (as node
  names write them), whose EPMD gave no answer. The local node is never in
  either list.
  """
  @spec plan(MapSet.t(node()), [node()], boolean(), node(), [charlist() | String.t()]) ::
          {[node()], [node()]}
  def plan(clustered, candidates, disconnect_on_departure, self_node \\ node(), unanswered \\ []) do
    candidates = candidates |> MapSet.new() |> MapSet.delete(self_node)

    departed =
      if disconnect_on_departure do
        clustered
        |> MapSet.difference(candidates)
        |> MapSet.delete(self_node)
        |> MapSet.difference(on_hosts(clustered, unanswered))
      else
        MapSet.new()
      end

    {Enum.sort(candidates), Enum.sort(departed)}
  end

  @doc """
  The nodes clustered with once a plan has been carried out.

  The candidates, less those that could not be connected (they are tried
  again at the next event or poll), plus the departed nodes that could not be
  disconnected (also tried again). `connected` and `disconnected` are the
  results of `Cluster.Strategy.connect_nodes/4` and
  `Cluster.Strategy.disconnect_nodes/4`: `:ok` or `{:error, [{node, reason}]}`.
  """
  @spec settle([node()], :ok | {:error, list()}, :ok | {:error, list()}, node()) ::
          MapSet.t(node())
  def settle(candidates, connected, disconnected, self_node \\ node()) do
    candidates
    |> MapSet.new()
    |> MapSet.delete(self_node)
    |> MapSet.difference(MapSet.new(failed_nodes(connected)))
    |> MapSet.union(MapSet.new(failed_nodes(disconnected)))
  end

  # The nodes among `nodes` that run on one of `hosts` (as node names
  # write them).
  defp on_hosts(nodes, hosts) do
    hosts = MapSet.new(hosts, &to_string/1)
    MapSet.filter(nodes, &(host_part(&1) in hosts))
  end

  defp host_part(node), do: node |> Atom.to_string() |> String.split("@") |> List.last()

  defp failed_nodes(:ok), do: []
  defp failed_nodes({:error, bad}) when is_list(bad), do: for({n, _} <- bad, do: n)

  ## GenServer

  @impl true
  def init([%{__struct__: Cluster.Strategy.State, config: config} = state]) do
    case validate_config(config) do
      {:ok, options} ->
        meta = %{
          options: options,
          peers: nil,
          clustered: MapSet.new(),
          helper: nil,
          subscribe_failures: 0,
          retry_in: @first_retry,
          retry: nil
        }

        # A clustered node that goes down is looked for again soon.
        :ok = :net_kernel.monitor_nodes(true)
        state = subscribe(%{state | meta: meta})
        schedule_poll(options)
        {:ok, state}

      {:error, message} ->
        Cluster.Logger.error(state.topology, "#{inspect(__MODULE__)} not started: #{message}")
        {:stop, {:invalid_config, message}}
    end
  end

  @impl true
  def handle_info({:tailscale_peers, peers}, state) do
    peers = latest_peers(peers)
    state = put_meta(state, :peers, peers)
    {:noreply, evaluate(state)}
  end

  def handle_info(:poll, state) do
    state = if state.meta.helper == nil, do: subscribe(state), else: evaluate(state)
    schedule_poll(state.meta.options)
    {:noreply, state}
  end

  def handle_info({:retry, ref}, %{meta: %{retry: ref}} = state) do
    {:noreply, state |> put_meta(:retry, nil) |> evaluate()}
  end

  def handle_info({:nodedown, node}, state) do
    if MapSet.member?(state.meta.clustered, node) do
      {:noreply, state |> put_meta(:retry_in, @first_retry) |> schedule_retry(true)}
    else
      {:noreply, state}
    end
  end

  def handle_info({:DOWN, ref, :process, _pid, reason}, %{meta: %{helper: ref}} = state) do
    Cluster.Logger.warn(
      state.topology,
      "tailscale_helper went down (#{inspect(reason)}); subscribing again every poll_interval"
    )

    {:noreply, put_meta(state, :helper, nil)}
  end

  def handle_info(_other, state), do: {:noreply, state}

  # Several views may be queued (a burst of tailnet changes): only the last
  # one matters.
  defp latest_peers(peers) do
    receive do
      {:tailscale_peers, newer} -> latest_peers(newer)
    after
      0 -> peers
    end
  end

  defp subscribe(state) do
    case safe(fn -> :tailscale_helper.subscribe(self()) end) do
      {:ok, :ok} ->
        case state.meta.subscribe_failures do
          0 ->
            Cluster.Logger.debug(state.topology, "subscribed to the tailnet's peers")

          n ->
            Cluster.Logger.info(
              state.topology,
              "subscribed to the tailnet's peers after #{n} failed attempt(s)"
            )
        end

        # Watched so as to subscribe again should it restart. Not registered
        # (it went down just now): the next poll subscribes again.
        ref =
          case Process.whereis(:tailscale_helper) do
            pid when is_pid(pid) -> Process.monitor(pid)
            nil -> nil
          end

        state |> put_meta(:helper, ref) |> put_meta(:subscribe_failures, 0)

      {:ok, other} ->
        not_subscribed(state, other)

      {:error, reason} ->
        not_subscribed(state, reason)
    end
  end

  defp not_subscribed(state, reason) do
    Cluster.Logger.warn(
      state.topology,
      "cannot subscribe to the tailnet (is the node started with -proto_dist tailscale " <>
        "and tsdist's ebin on its code path?): #{describe(reason)}; " <>
        "trying again in #{state.meta.options.poll_interval} ms"
    )

    put_meta(state, :subscribe_failures, state.meta.subscribe_failures + 1)
  end

  defp evaluate(%{meta: %{peers: nil}} = state), do: state

  defp evaluate(%{meta: meta} = state) do
    opts = discovery_opts(meta.options)

    case safe(fn -> :tailscale_discovery.scan(meta.peers, opts) end) do
      {:ok, %{nodes: candidates, unanswered: unanswered}} when is_list(candidates) ->
        reconcile(state, candidates, unanswered)

      {:ok, other} ->
        Cluster.Logger.warn(
          state.topology,
          "tailscale_discovery:scan/2 returned #{inspect(other)}, not a scan"
        )

        state

      {:error, reason} ->
        Cluster.Logger.warn(state.topology, "discovery failed: #{describe(reason)}")
        state
    end
  end

  # Carries out plan/4 for a list of candidates with the state's MFAs and
  # records the outcome (settle/4) in the state's meta. Public for the tests,
  # which give it MFAs of their own.
  @doc false
  def reconcile(state, candidates, unanswered \\ []) do
    %{topology: topology, connect: connect, disconnect: disconnect, list_nodes: list_nodes} =
      state

    %{clustered: clustered, options: options} = state.meta

    {to_connect, to_disconnect} =
      plan(clustered, candidates, options.disconnect_on_departure, node(), unanswered)

    Cluster.Logger.debug(
      topology,
      "candidates: #{inspect(to_connect)}; departed: #{inspect(to_disconnect)}"
    )

    disconnected =
      case to_disconnect do
        [] -> :ok
        nodes -> Cluster.Strategy.disconnect_nodes(topology, disconnect, list_nodes, nodes)
      end

    connected = Cluster.Strategy.connect_nodes(topology, connect, list_nodes, to_connect)
    # The nodes of a silent host that were clustered stay clustered.
    kept_silent = MapSet.difference(on_hosts(clustered, unanswered), MapSet.new(to_connect))

    state
    |> put_meta(:clustered, MapSet.union(settle(to_connect, connected, disconnected), kept_silent))
    |> schedule_retry(unanswered != [] or connected != :ok or disconnected != :ok)
  end

  # Asks again soon while a host gives no answer or a node could not be
  # (dis)connected: 250 ms, then twice as long each time, up to
  # poll_interval (which asks anyway).
  defp schedule_retry(state, false), do: put_meta(state, :retry_in, @first_retry)

  defp schedule_retry(%{meta: %{retry: ref}} = state, true) when ref != nil, do: state

  defp schedule_retry(%{meta: meta} = state, true) do
    poll = meta.options.poll_interval

    if meta.retry_in >= poll do
      state
    else
      ref = make_ref()
      Process.send_after(self(), {:retry, ref}, meta.retry_in)
      state |> put_meta(:retry, ref) |> put_meta(:retry_in, min(2 * meta.retry_in, poll))
    end
  end

  # Runs a call into tsdist; anything it raises or exits with becomes
  # {:error, readable_message}, so that a tailnet not (yet) there is logged,
  # not a crash.
  defp safe(fun) do
    {:ok, fun.()}
  catch
    kind, reason ->
      {:error, Exception.format_banner(kind, reason, __STACKTRACE__)}
  end

  defp describe(message) when is_binary(message), do: message
  defp describe(other), do: inspect(other)

  defp schedule_poll(%{poll_interval: ms}), do: Process.send_after(self(), :poll, ms)

  defp put_meta(state, key, value), do: %{state | meta: Map.put(state.meta, key, value)}
end
