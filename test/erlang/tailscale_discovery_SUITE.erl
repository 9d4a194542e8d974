%%% Discovery over the offline tailnet: nodes started with the `tsdist'
%%% application's `discovery' set, and no host list, find each other.
-module(tailscale_discovery_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1]).
-export([four_nodes_find_each_other/1, non_matching_never_connected/1,
         late_joiner_connected/1, candidates_filter/1, leaver_dropped/1, silent_host_kept/1,
         disconnected_node_reconnected/1,
         elixir_strategy/1]).

-define(OPTS, [{hostname_pattern, "^disc"}, {rescan_ms, 1000}]).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [candidates_filter, four_nodes_find_each_other, non_matching_never_connected,
     late_joiner_connected, disconnected_node_reconnected, silent_host_kept, leaver_dropped,
     elixir_strategy].

init_per_suite(Config) ->
    tsdist_ct:start_tailnet(Config).

end_per_suite(Config) ->
    [catch peer:stop(P) || P <- registered_peers()],
    persistent_term:erase({?MODULE, discovering}),
    persistent_term:erase({?MODULE, others}),
    tsdist_ct:stop_tailnet(Config).

%% The filter alone, on a made-up view of the tailnet.
candidates_filter(Config) ->
    {P, _} = tsdist_ct:start_node(Config, f, "filterhost"),
    try
        Admitted = #{<<"allowed">> => true},
        Peers = [Admitted#{<<"node">> => <<"disca">>, <<"online">> => true, <<"tags">> => [<<"tag:erlang">>]},
                 Admitted#{<<"node">> => <<"discb">>, <<"online">> => false, <<"tags">> => [<<"tag:erlang">>]},
                 Admitted#{<<"node">> => <<"other">>, <<"online">> => true, <<"tags">> => [<<"tag:erlang">>]},
                 Admitted#{<<"node">> => <<"discc">>, <<"online">> => true, <<"tags">> => []},
                 %% matches every filter, but this node's policy does not admit it
                 #{<<"node">> => <<"discs">>, <<"online">> => true, <<"tags">> => [<<"tag:erlang">>],
                   <<"allowed">> => false}],
        Matching = fun(Opts) ->
            [maps:get(<<"node">>, M) || M <- peer:call(P, tailscale_discovery, matching, [Peers, Opts])]
        end,
        ?assertEqual([<<"disca">>, <<"discc">>], Matching([{hostname_pattern, "^disc"}])),
        %% A node the tailnet renamed (a stale one held its name) still
        %% matches by the hostname it asked for.
        Renamed = #{<<"node">> => <<"x-1">>, <<"hostname">> => <<"discr">>, <<"online">> => true, <<"tags">> => [],
                    <<"allowed">> => true},
        ?assertMatch([_], peer:call(P, tailscale_discovery, matching, [[Renamed], [{hostname_pattern, "^disc"}]])),
        ?assertEqual([<<"disca">>, <<"discb">>, <<"discc">>],
                     Matching([{hostname_pattern, "^disc"}, {online_only, false}])),
        ?assertEqual([<<"disca">>, <<"other">>], Matching([{tags, ["tag:erlang"]}])),
        ?assertEqual([<<"disca">>, <<"other">>, <<"discc">>], Matching([])),
        ?assertMatch({'EXIT', {{badarg, {unknown_discovery_options, [tagz]}}, _}},
                     peer:call(P, erlang, apply, [fun() -> catch tailscale_discovery:matching(Peers, [{tagz, []}]) end, []]))
    after
        peer:stop(P)
    end.

four_nodes_find_each_other(Config) ->
    T0 = erlang:monotonic_time(millisecond),
    Nodes = [start_discovering(Config, N, H) || {N, H} <- [{d1, "disc1"}, {d2, "disc2"}, {d3, "disc3"}, {d4, "disc4"}]],
    Names = [N || {_, N} <- Nodes],
    %% When one of the first connections between brand-new nodes fails,
    %% global disconnects others to prevent overlapping partitions; the
    %% mesh re-forms 250 ms later (discovery retries a node that went
    %% down), not at the next rescan as it did (up to 15 s, once on OTP 27).
    Ms = tsdist_ct:within(3000, "the four nodes see each other once the last is up",
                          fun() -> all_see(Nodes, Names) end),
    ct:log("four nodes started with discovery saw each other ~p ms after the first started, "
           "~b ms after the last", [erlang:monotonic_time(millisecond) - T0, Ms]).

non_matching_never_connected(Config) ->
    {S, Stranger} = tsdist_ct:start_node(Config, s, "stranger"),
    register_peer(S),
    timer:sleep(3000), % three rescans
    Nodes = discovering(),
    [?assertNot(lists:member(Stranger, peer:call(P, erlang, nodes, [connected]))) || {P, _} <- Nodes].

late_joiner_connected(Config) ->
    T0 = erlang:monotonic_time(millisecond),
    start_discovering(Config, d5, "disc5"),
    Nodes = discovering(),
    Names = [N || {_, N} <- Nodes],
    try tsdist_ct:within(3000, "the late joiner and every other node see each other",
                         fun() -> all_see(Nodes, Names) end)
    after
        ct:log("nodes: ~p", [[{N, peer:call(P, erlang, nodes, [])} || {P, N} <- Nodes]])
    end,
    ct:log("a node that joined later was connected with all others ~p ms after it started "
           "(its tailnet join included)", [erlang:monotonic_time(millisecond) - T0]).

%% A host whose EPMD gives no answer is not a host without nodes: with one
%% node's helper stopped (SIGSTOP) for longer than a names request may take
%% (1.5 s), every other node keeps its connection to that node, which is
%% still up and, once its helper goes on, answers at once. (Before, the
%% empty answer made every other node disconnect it.)
silent_host_kept(_Config) ->
    [_, {Silent, SilentNode} | _] = All = discovering(),
    Others = All -- [{Silent, SilentNode}],
    Sees = fun() -> lists:all(fun({P, _}) -> lists:member(SilentNode, peer:call(P, erlang, nodes, [])) end, Others) end,
    tsdist_ct:wait_until(Sees, 100),
    #{helper_os_pid := Helper} = peer:call(Silent, tailscale_helper, info, []),
    Pid = integer_to_list(Helper),
    "" = os:cmd("kill -STOP " ++ Pid),
    try
        timer:sleep(7500),
        %% Positive control: the host really is silent to the others.
        [_, SilentHost] = string:split(atom_to_list(SilentNode), "@"),
        [?assertMatch({error, _}, peer:call(P, tailscale_helper, names_info, [SilentHost, 1000]))
         || {P, _} <- Others],
        ?assert(Sees())
    after
        os:cmd("kill -CONT " ++ Pid)
    end,
    Back = tsdist_ct:within(3000, "every node reaches the node whose helper went on",
                            fun() -> lists:all(fun({P, _}) -> peer:call(P, net_adm, ping, [SilentNode], 2000) =:= pong end, Others) end),
    ct:log("~p, silent for 7.5 s, was kept by every other node and answered them ~b ms after its helper went on",
           [SilentNode, Back]),
    [?assert(lists:member(SilentNode, peer:call(P, tailscale_discovery, connected, []))) || {P, _} <- Others].

%% A connection that drops (here: erlang:disconnect_node/1, as 'global'
%% does to prevent overlapping partitions) is made again 250 ms later, not
%% at the next rescan: these two nodes rescan once a minute, and find each
%% other again within 3 s. They make no connection of their own
%% (dist_auto_connect never: else 'global' would reconnect them at once,
%% discovery or not); discovery's connect_node/1 is the only way back.
disconnected_node_reconnected(Config) ->
    Opts = [{hostname_pattern, "^redisc"}, {rescan_ms, 60000}],
    [{P1, _}, {_, N2}] = Pair =
        [begin
             {P, N} = tsdist_ct:start_node(Config, Name, Host, ["-kernel", "dist_auto_connect", "never"]),
             register_peer(P),
             ok = peer:call(P, application, set_env, [tsdist, discovery, Opts]),
             {ok, _} = peer:call(P, application, ensure_all_started, [tsdist]),
             {P, N}
         end || {Name, Host} <- [{r1, "redisc1"}, {r2, "redisc2"}]],
    Connected = fun() -> lists:member(N2, peer:call(P1, erlang, nodes, [])) end,
    Counted = fun() ->
                      lists:all(fun({P, N}) ->
                                        [Other] = [M || {_, M} <- Pair, M =/= N],
                                        lists:member(Other, peer:call(P, tailscale_discovery, connected, []))
                                end, Pair)
              end,
    %% Both ends' discovery count the other as connected: neither has a
    %% try of its own still due (the first to start failed once).
    _ = tsdist_ct:within(10000, "the two nodes find each other", Counted),
    %% And then they are idle: a due time in the past once made discovery
    %% converge (and ask every host for names) in a loop of 0 ms timers.
    Reductions = fun() -> element(2, peer:call(P1, erlang, process_info, [whereis_on(P1), reductions])) end,
    R0 = Reductions(),
    timer:sleep(1000),
    Idle = Reductions() - R0,
    ct:log("discovery's reductions in a second at rest: ~b", [Idle]),
    ?assert(Idle < 20000),
    true = peer:call(P1, erlang, disconnect_node, [N2]),
    false = Connected(),
    Back = tsdist_ct:within(3000, "discovery connects the dropped node again", Connected),
    ct:log("connected again ~b ms after the disconnect", [Back]),
    %% Either end's discovery may have been first; both count it again.
    _ = tsdist_ct:within(1000, "both ends' discovery count the other again", Counted),
    [peer:stop(P) || {P, _} <- Pair],
    ok.

whereis_on(P) ->
    peer:call(P, erlang, whereis, [tailscale_discovery]).

%% A node that leaves (its node and helper stopped) goes from every other
%% node's discovered set.
leaver_dropped(_Config) ->
    [{Leaver, Gone} | Rest] = discovering(),
    tsdist_ct:wait_until(fun() ->
        lists:all(fun({P, _}) -> lists:member(Gone, peer:call(P, tailscale_discovery, connected, [])) end, Rest)
    end, 150),
    T0 = erlang:monotonic_time(millisecond),
    peer:stop(Leaver),
    persistent_term:put({?MODULE, discovering}, Rest),
    tsdist_ct:wait_until(fun() ->
        lists:all(fun({P, _}) -> not lists:member(Gone, peer:call(P, tailscale_discovery, connected, [])) end, Rest)
    end, 150),
    ct:log("~p left every other node's discovered set ~p ms after it was stopped",
           [Gone, erlang:monotonic_time(millisecond) - T0]).

%% The Elixir libcluster strategy, started as libcluster starts it, on a
%% real Elixir node, forms the same cluster.
elixir_strategy(Config) ->
    Elixir = case os:find_executable("elixir") of
                 false -> ct:fail("elixir is not installed (scripts/install-deps.sh installs it)");
                 E -> E
             end,
    Expected = [atom_to_list(N) || {_, N} <- discovering()],
    Ebin = filename:dirname(code:which(tailscale_dist)),
    Script = filename:join([repo_root(), "elixir", "libcluster_tailscale", "test_cluster.exs"]),
    T0 = erlang:monotonic_time(millisecond),
    Port = open_port({spawn_executable, Elixir},
                     [{args, ["--sname", "lx@disclx", "--cookie", tsdist_ct:cookie(),
                              "--erl", "-pa " ++ Ebin ++ " -proto_dist tailscale -start_epmd false"
                                       " -epmd_module tailscale_epmd",
                              Script | Expected]},
                      {env, tsdist_ct:node_env([{env, [{"LIBCLUSTER_TAILSCALE_HOSTNAME_PATTERN", "^disc"}]}
                                                | Config], "disclx")},
                      exit_status, use_stdio, stderr_to_stdout, {line, 4096}]),
    {Status, Lines} = tsdist_ct:collect_port(Port, [], 60000),
    ct:log("elixir said (exit ~p, after ~p ms):~n~ts",
           [Status, erlang:monotonic_time(millisecond) - T0, lists:join("\n", Lines)]),
    Want = "CLUSTER_OK " ++ lists:join(" ", lists:sort(Expected)),
    ?assertEqual(0, Status),
    ?assert(lists:member(lists:flatten(Want), Lines)).

%% The repository: the nearest directory above the ebin with rebar.config.
repo_root() ->
    repo_root(filename:dirname(code:which(tailscale_dist))).

repo_root("/") ->
    ct:fail("no rebar.config above the tsdist ebin");
repo_root(Dir) ->
    case filelib:is_regular(filename:join(Dir, "rebar.config")) of
        true -> Dir;
        false -> repo_root(filename:dirname(Dir))
    end.

%%% Helpers

start_discovering(Config, Name, Host) ->
    {P, N} = tsdist_ct:start_node(Config, Name, Host),
    ok = peer:call(P, application, set_env, [tsdist, discovery, ?OPTS]),
    {ok, _} = peer:call(P, application, ensure_all_started, [tsdist]),
    persistent_term:put({?MODULE, discovering}, [{P, N} | discovering()]),
    {P, N}.

%% The nodes started with discovery, across test cases.
discovering() ->
    persistent_term:get({?MODULE, discovering}, []).

%% Every node this suite started, for end_per_suite to stop.
register_peer(P) ->
    persistent_term:put({?MODULE, others}, [P | registered_peers()]).

registered_peers() ->
    [P || {P, _} <- discovering()] ++ persistent_term:get({?MODULE, others}, []).

all_see(Nodes, Names) ->
    lists:all(fun({P, N}) ->
                      lists:sort(Names -- [N]) =:= lists:sort(peer:call(P, erlang, nodes, []))
              end, Nodes).

