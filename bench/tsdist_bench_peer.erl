%%% What the benchmark's nodes run: the peers that bench/tsdist_bench.erl
%%% starts (with `peer', one pair or mesh of fresh nodes per carrier and
%%% repeat) have this module on their code path (BENCH_EBIN, where
%%% bench/bench.sh compiles it), and the orchestrator calls it there with
%%% peer:call/5. Nothing here runs on the orchestrator's own node.
%%%
%%% On node A of a pair: ping/1 (connection set-up), rtt/2 and stream/3
%%% against B's echo/0 and sink/2 (spawned on B from here), or rtt_ergo/2
%%% and stream_ergo/3 against the echo and counting sink of a Go node
%%% (test/ergoprobe's `probe' gen server); on every node of a mesh,
%%% mesh_join/2; and pids/0 for the memory readings. In the restart trials:
%%% start_discovery/1, and watch_node/1 with watched/3 to time a node's
%%% departure and return as this node sees them.
-module(tsdist_bench_peer).

-export([echo/0, sink/2, ping/1, rtt/2, rtt_ergo/2, stream/3, stream_ergo/3, mesh_join/2, pids/0]).
-export([start_discovery/1, start_libcluster/1, watch_node/1, watched/3]).

%% Microseconds to connect to Node (the first net_adm:ping).
-spec ping(node()) -> non_neg_integer().
ping(Node) ->
    {T, pong} = timer:tc(net_adm, ping, [Node]),
    T.

-spec echo() -> ok.
echo() ->
    receive
        {From, Msg} -> From ! {self(), Msg}, echo();
        stop -> ok
    end.

%% Round trips of a 64-byte message to a process on Node: {median, p99}
%% in microseconds, after 100 to warm up.
-spec rtt(node(), pos_integer()) -> {float(), float()}.
rtt(Node, N) ->
    rtt_with(spawn(Node, ?MODULE, echo, []), N).

%% rtt/2 against the echo process of a Go node (test/ergoprobe).
-spec rtt_ergo(node(), pos_integer()) -> {float(), float()}.
rtt_ergo(Node, N) ->
    rtt_with(gen_server:call({probe, Node}, {echo_process}), N).

rtt_with(Echo, N) ->
    Msg = binary:copy(<<"p">>, 64),
    Once = fun() ->
                   T0 = erlang:monotonic_time(nanosecond),
                   Echo ! {self(), Msg},
                   receive {Echo, _} -> ok end,
                   erlang:monotonic_time(nanosecond) - T0
           end,
    _ = [Once() || _ <- lists:seq(1, 100)],
    Ts = lists:sort([Once() || _ <- lists:seq(1, N)]),
    Echo ! stop,
    {lists:nth(N div 2 + 1, Ts) / 1000, lists:nth(max(1, (N * 99) div 100), Ts) / 1000}.

%% Microseconds for N messages of Size bytes from here to a process on
%% Node, until it has received them all.
-spec stream(node(), pos_integer(), pos_integer()) -> non_neg_integer().
stream(Node, Size, N) ->
    stream_to(spawn(Node, ?MODULE, sink, [self(), N]), Size, N).

%% stream/3 to the counting sink of a Go node (test/ergoprobe).
-spec stream_ergo(node(), pos_integer(), pos_integer()) -> non_neg_integer().
stream_ergo(Node, Size, N) ->
    stream_to(gen_server:call({probe, Node}, {sink, self(), N}), Size, N).

stream_to(Sink, Size, N) ->
    Bin = binary:copy(<<"x">>, Size),
    T0 = erlang:monotonic_time(microsecond),
    send_n(Sink, Bin, N),
    receive {sink_done, Sink} -> ok end,
    erlang:monotonic_time(microsecond) - T0.

send_n(_, _, 0) -> ok;
send_n(To, Msg, N) -> To ! Msg, send_n(To, Msg, N - 1).

-spec sink(pid(), non_neg_integer()) -> ok.
sink(From, N) ->
    sink_loop(N),
    From ! {sink_done, self()},
    ok.

sink_loop(0) -> ok;
sink_loop(N) -> receive _ -> sink_loop(N - 1) end.

%% Connects to every node in Others at once (again every 500 ms while one
%% is missing) and returns the OS time, in microseconds, when all are
%% connected.
-spec mesh_join([node()], pos_integer()) -> integer().
mesh_join(Others, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    mesh_join(Others, Deadline, 0).

mesh_join(Others, Deadline, Round) ->
    case Others -- nodes() of
        [] ->
            os:system_time(microsecond);
        Missing ->
            erlang:monotonic_time(millisecond) < Deadline orelse error({mesh_incomplete, Missing}),
            _ = [spawn(net_kernel, connect_node, [N]) || Round rem 50 =:= 0, N <- Missing],
            timer:sleep(10),
            mesh_join(Others, Deadline, Round + 1)
    end.

%% This node's OS pid and its helper's (undefined for TCP and TLS).
-spec pids() -> {integer(), integer() | undefined}.
pids() ->
    Helper = case erlang:function_exported(tailscale_helper, info, 0)
                 orelse code:ensure_loaded(tailscale_helper) =:= {module, tailscale_helper} of
                 true ->
                     try maps:get(helper_os_pid, tailscale_helper:info())
                     catch _:_ -> undefined
                     end;
                 false -> undefined
             end,
    {list_to_integer(os:getpid()), Helper}.

%% tailscale_discovery with its defaults, for the hosts that match Pattern;
%% it outlives the call.
-spec start_discovery(string()) -> ok.
start_discovery(Pattern) ->
    {ok, Pid} = tailscale_discovery:start_link(#{hostname_pattern => Pattern}),
    unlink(Pid),
    ok.

%% libcluster's Cluster.Supervisor with one topology: Cluster.Strategy.Tailscale
%% with its defaults, for the hosts that match Pattern (libcluster, its
%% telemetry and Elixir must be on the code path); it outlives the call.
-spec start_libcluster(string()) -> ok.
start_libcluster(Pattern) ->
    {ok, _} = application:ensure_all_started(logger), % Elixir's Logger, which libcluster logs with
    {ok, _} = application:ensure_all_started(telemetry),
    Topologies = [{tailnet, [{strategy, 'Elixir.Cluster.Strategy.Tailscale'},
                             {config, [{hostname_pattern, list_to_binary(Pattern)}]}]}],
    {ok, Pid} = 'Elixir.Cluster.Supervisor':start_link([Topologies, [{name, tsdist_bench_cluster}]]),
    unlink(Pid),
    ok.

%% A process that notes, in OS microseconds, when Node next goes down and
%% when it is then up again (net_kernel:monitor_nodes/1); watched/3 asks it.
-spec watch_node(node()) -> pid().
watch_node(Node) ->
    Self = self(),
    Pid = spawn(fun() ->
                        ok = net_kernel:monitor_nodes(true),
                        %% Not connected now (global may just have
                        %% disconnected it): down already.
                        Seen = case lists:member(Node, nodes()) of
                                   true -> #{};
                                   false -> #{down => os:system_time(microsecond)}
                               end,
                        Self ! {self(), armed},
                        watch_loop(Node, Seen, [])
                end),
    receive {Pid, armed} -> Pid end.

watch_loop(Node, Seen, Waiting) ->
    receive
        {nodedown, Node} when not is_map_key(down, Seen) ->
            answer(Node, Seen#{down => os:system_time(microsecond)}, Waiting);
        {nodeup, Node} when is_map_key(down, Seen), not is_map_key(up, Seen) ->
            answer(Node, Seen#{up => os:system_time(microsecond)}, Waiting);
        {query, What, From} ->
            answer(Node, Seen, [{What, From} | Waiting]);
        _ -> % another node's, or a repeat
            watch_loop(Node, Seen, Waiting)
    end.

%% Answers the questions that can be answered; the watch ends once it has
%% said when the node was back.
answer(Node, Seen, Waiting) ->
    {Ready, Left} = lists:partition(fun({What, _}) -> is_map_key(What, Seen) end, Waiting),
    [From ! {self(), {What, maps:get(What, Seen)}} || {What, From} <- Ready],
    case lists:keymember(up, 1, Ready) of
        true -> ok;
        false -> watch_loop(Node, Seen, Left)
    end.

%% Waits up to Timeout ms for the watch to have seen What (down | up):
%% {What, OsMicroseconds}, or timeout. The watch ends once up is asked.
-spec watched(pid(), down | up, pos_integer()) -> {down | up, integer()} | ok | timeout.
watched(Watch, What, Timeout) ->
    Watch ! {query, What, self()},
    receive
        {Watch, {down, _}} when What =:= down -> ok;
        {Watch, Answer} -> Answer
    after Timeout ->
            exit(Watch, kill),
            timeout
    end.
