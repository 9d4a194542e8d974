%%% A Go node built on ergo (package ergonode, run as test/ergoprobe) and
%%% real BEAM nodes in one cluster over the offline tailnet. The same suite
%%% runs under OTP 25 (`make test-erlang') and OTP 27 (`make test-otp27'),
%%% which is where ergo v1.999.224 on its own fails: OTP 26+ requires
%%% unlink ids and matches call replies on five-word references.
%%%
%%% The Go node's `probe' server does on request what a test needs of the
%%% Go side (see test/ergoprobe/main.go).
-module(tailscale_ergo_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1]).
-export([ping_both_ways/1, calls_both_ways/1, big_messages/1, many_calls/1, under_load/1,
         order_kept/1,
         links_and_monitors/1, unlink_and_relink/1, one_cluster/1, identity/1,
         refused_by_policy/1, beam_node_restarted/1, stop_and_rejoin/1]).
%% run on the nodes under test
-export([echo_loop/0, report_loop/1]).

-define(ERGO, 'probe@delta').

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [ping_both_ways, calls_both_ways, big_messages, many_calls, under_load, order_kept, links_and_monitors,
     unlink_and_relink, one_cluster, identity, refused_by_policy, beam_node_restarted,
     stop_and_rejoin].

init_per_suite(Config) ->
    Config1 = tsdist_ct:start_tailnet(Config),
    Probe = tsdist_ct:start_ergo_node(Config1, "probe@delta", []),
    A = tsdist_ct:start_node(Config1, app, "alpha"),
    B = tsdist_ct:start_node(Config1, app, "beta"),
    ct:log("OTP ~s", [peer:call(element(1, A), erlang, system_info, [otp_release])]),
    [{probe, Probe}, {a, A}, {b, B} | Config1].

end_per_suite(Config) ->
    [peer:stop(P) || {P, _} <- [?config(a, Config), ?config(b, Config)]],
    Probe = ?config(probe, Config),
    is_process_alive(Probe) andalso tsdist_ct:stop_ergo_node(Probe), % stop_and_rejoin stops it
    tsdist_ct:stop_tailnet(Config).

%% net_adm:ping from Erlang, and the same question ({is_auth, Node} to
%% net_kernel) from the Go node; both by tailnet hostname. Also the round
%% trip of each, for the record.
ping_both_ways(Config) ->
    {A, _} = ?config(a, Config),
    ?assertEqual(pong, peer:call(A, net_adm, ping, [?ERGO], 15000)),
    ?assertEqual(pong, probe_call(A, {ping, 'app@alpha'})),
    Rtt = peer:call(A, erlang, apply, [fun() ->
              Ts = [begin
                        T0 = erlang:monotonic_time(microsecond),
                        pong = net_adm:ping(?ERGO),
                        erlang:monotonic_time(microsecond) - T0
                    end || _ <- lists:seq(1, 200)],
              lists:nth(100, lists:sort(Ts))
          end, []]),
    Call = peer:call(A, erlang, apply, [fun() ->
               Ts = [begin
                         T0 = erlang:monotonic_time(microsecond),
                         I = gen_server:call({probe, ?ERGO}, {echo, I}),
                         erlang:monotonic_time(microsecond) - T0
                     end || I <- lists:seq(1, 200)],
               lists:nth(100, lists:sort(Ts))
           end, []]),
    ct:log("OTP ~s <-> ergo: net_adm:ping round trip median ~b us, gen_server:call median ~b us (200 each)",
           [peer:call(A, erlang, system_info, [otp_release]), Rtt, Call]).

%% gen_server:call from Erlang to the Go node's process, and a call from
%% the Go node to an Erlang gen_server (an OTP 26+ caller uses an alias
%% and a five-word reference: the reply must still arrive).
calls_both_ways(Config) ->
    {A, _} = ?config(a, Config),
    ?assertEqual({hello, [1, 2.5, <<"bin">>, #{k => v}]},
                 probe_call(A, {echo, {hello, [1, 2.5, <<"bin">>, #{k => v}]}})),
    start_echo(A),
    ?assertEqual({ok, from_go}, probe_call(A, {call, tsdist_echo, 'app@alpha', from_go})).

%% A 1 MiB message each way, intact.
big_messages(Config) ->
    {A, _} = ?config(a, Config),
    Big = crypto:strong_rand_bytes(1 bsl 20),
    ?assertEqual(Big, probe_call(A, {echo, Big})),
    start_echo(A),
    ?assertEqual({ok, Big}, probe_call(A, {call, tsdist_echo, 'app@alpha', Big})),
    Terms = [{I, integer_to_list(I), <<I:32>>} || I <- lists:seq(1, 20000)],
    ?assertEqual(Terms, probe_call(A, {echo, Terms})).

%% 10,000 calls in a row each way, none lost or out of place.
many_calls(Config) ->
    {A, _} = ?config(a, Config),
    N = 10000,
    {Us, ok} = timer:tc(fun() ->
        peer:call(A, erlang, apply, [fun() ->
            lists:foreach(fun(I) -> I = gen_server:call({probe, ?ERGO}, {echo, I}) end,
                          lists:seq(1, N))
        end, []], 120000)
    end),
    start_echo(A),
    {Us2, Result} = timer:tc(fun() -> probe_call(A, {call_n, tsdist_echo, 'app@alpha', N}, 120000) end),
    ?assertEqual({ok, N}, Result),
    ct:log("~b calls Erlang -> Go in ~b ms, ~b calls Go -> Erlang in ~b ms",
           [N, Us div 1000, N, Us2 div 1000]).

%% Under load: 20 processes call the Go node at once, 100 calls each with
%% payloads of up to 128 KiB (the larger ones fragmented, so the repair
%% layer walks fragments of interleaved messages), while the Go node calls
%% back 2,000 times; every reply is checked.
under_load(Config) ->
    {A, _} = ?config(a, Config),
    start_echo(A),
    {Us, Result} = timer:tc(fun() -> peer:call(A, erlang, apply, [fun() ->
        Self = self(),
        Callers = 20,
        [spawn_link(fun() ->
             rand:seed(exsss, {I, I, I}),
             lists:foreach(fun(J) ->
                 Msg = {I, J, binary:copy(<<I>>, rand:uniform(128 * 1024) - 1)},
                 Msg = gen_server:call({probe, ?ERGO}, {echo, Msg}, 60000)
             end, lists:seq(1, 100)),
             Self ! {done, I}
         end) || I <- lists:seq(1, Callers)],
        spawn_link(fun() ->
            Self ! {go, gen_server:call({probe, ?ERGO}, {call_n, tsdist_echo, node(), 2000}, 120000)}
        end),
        [receive {done, I} -> ok after 120000 -> exit({caller_timed_out, I}) end
         || I <- lists:seq(1, Callers)],
        receive {go, R} -> R after 120000 -> go_timed_out end
    end, []], 180000) end),
    ?assertEqual({ok, 2000}, Result),
    ct:log("2,000 calls with up to 128 KiB each way, 20 callers at once, and 2,000 calls back: ~b ms",
           [Us div 1000]).

%% Messages between two processes arrive in the order sent, both ways:
%% 3,000 back to back, every seventh long enough to be fragmented.
order_kept(Config) ->
    {A, _} = ?config(a, Config),
    N = 3000,
    Payload = fun(I) when I rem 7 =:= 0 -> binary:copy(<<0>>, 100000);
                 (_) -> binary:copy(<<0>>, 64)
              end,
    Seen = peer:call(A, erlang, apply, [fun() ->
        Collector = gen_server:call({probe, ?ERGO}, {collector, self(), N}),
        [Collector ! {seq, I, Payload(I)} || I <- lists:seq(0, N - 1)],
        ToGo = receive {collected, N, FirstBad} -> FirstBad after 60000 -> timeout end,
        ok = gen_server:call({probe, ?ERGO}, {send_seq, self(), N}, 60000),
        FromGo = lists:foldl(fun(I, Bad) ->
                     Size = byte_size(Payload(I)),
                     receive
                         {seq, I, P} when byte_size(P) =:= Size -> Bad;
                         {seq, _, _} when Bad =:= -1 -> I;
                         {seq, _, _} -> Bad
                     after 10000 -> {missing, I}
                     end
                 end, -1, lists:seq(0, N - 1)),
        {ToGo, FromGo}
    end, []], 150000),
    %% -1: every message in its place
    ?assertEqual({-1, -1}, Seen).

%% Links and monitors across, both ways: exits and downs arrive.
links_and_monitors(Config) ->
    {A, _} = ?config(a, Config),
    Seen = peer:call(A, erlang, apply, [fun() ->
        process_flag(trap_exit, true),
        Report = self(),
        Watcher = fun() -> gen_server:call({probe, ?ERGO}, {watcher, Report}) end,
        %% Erlang monitors and links to Go processes.
        W1 = Watcher(),
        Ref = monitor(process, W1),
        catch gen_server:call(W1, {exit, boom}, 2000),
        Down = receive {'DOWN', Ref, process, W1, R1} -> R1 after 5000 -> no_down end,
        W2 = Watcher(),
        link(W2),
        catch gen_server:call(W2, {exit, bang}, 2000),
        Exit = receive {'EXIT', W2, R2} -> R2 after 5000 -> no_exit end,
        %% Go processes link to and monitor Erlang ones.
        W3 = Watcher(),
        P3 = spawn(fun() -> receive go -> exit(kaboom) end end),
        ok = gen_server:call(W3, {link, P3}),
        P3 ! go,
        GoExit = receive {ergo_exit, W3, P3, R3} -> R3 after 5000 -> no_exit end,
        W4 = Watcher(),
        P4 = spawn(fun() -> receive go -> exit(crash) end end),
        _ = gen_server:call(W4, {monitor, P4}),
        P4 ! go,
        GoDown = receive {ergo_down, W4, P4, R4} -> R4 after 5000 -> no_down end,
        {Down, Exit, GoExit, GoDown}
    end, []], 30000),
    ?assertEqual({boom, bang, kaboom, crash}, Seen).

%% Unlink and link again, from each side: an unlink makes the link go
%% (no exit arrives), a new link works, and the connection survives the
%% unlink-id exchange (which ergo alone does not know).
unlink_and_relink(Config) ->
    {A, _} = ?config(a, Config),
    Seen = peer:call(A, erlang, apply, [fun() ->
        process_flag(trap_exit, true),
        Report = self(),
        %% From Erlang: link, unlink, then the Go process exits.
        W1 = gen_server:call({probe, ?ERGO}, {watcher, Report}),
        link(W1),
        unlink(W1),
        catch gen_server:call(W1, {exit, after_unlink}, 2000),
        Quiet = receive {'EXIT', W1, _} -> exit_after_unlink after 1000 -> quiet end,
        %% Link again to another one: its exit arrives.
        W2 = gen_server:call({probe, ?ERGO}, {watcher, Report}),
        link(W2), unlink(W2), link(W2),
        catch gen_server:call(W2, {exit, relinked}, 2000),
        Relinked = receive {'EXIT', W2, R2} -> R2 after 5000 -> no_exit end,
        %% From Go: link, unlink, then the Erlang process exits.
        W3 = gen_server:call({probe, ?ERGO}, {watcher, Report}),
        P3 = spawn(fun() -> receive go -> exit(after_go_unlink) end end),
        ok = gen_server:call(W3, {link, P3}),
        ok = gen_server:call(W3, {unlink, P3}),
        P3 ! go,
        GoQuiet = receive {ergo_exit, W3, P3, _} -> exit_after_unlink after 1000 -> quiet end,
        P4 = spawn(fun() -> receive go -> exit(go_relinked) end end),
        ok = gen_server:call(W3, {link, P4}),
        ok = gen_server:call(W3, {unlink, P4}),
        ok = gen_server:call(W3, {link, P4}),
        P4 ! go,
        GoRelinked = receive {ergo_exit, W3, P4, R4} -> R4 after 5000 -> no_exit end,
        {Quiet, Relinked, GoQuiet, GoRelinked, lists:member(?ERGO, nodes()), net_adm:ping(?ERGO)}
    end, []], 30000),
    ?assertEqual({quiet, relinked, quiet, go_relinked, true, pong}, Seen).

%% The Go node and two BEAM nodes form one cluster.
one_cluster(Config) ->
    {A, _} = ?config(a, Config),
    {B, _} = ?config(b, Config),
    ?assertEqual(pong, peer:call(B, net_adm, ping, [?ERGO], 15000)),
    ?assertEqual(pong, peer:call(A, net_adm, ping, ['app@beta'], 15000)),
    ?assertEqual(pong, probe_call(B, {ping, 'app@beta'})),
    ?assertEqual(['app@beta', ?ERGO], lists:sort(peer:call(A, erlang, nodes, []))),
    ?assertEqual(['app@alpha', ?ERGO], lists:sort(peer:call(B, erlang, nodes, []))).

%% Each side knows the other's tailnet identity.
identity(Config) ->
    {A, _} = ?config(a, Config),
    pong = peer:call(A, net_adm, ping, [?ERGO], 15000),
    ?assertMatch(#{node := <<"alpha">>}, probe_call(A, {identity, 'app@alpha'})),
    {ok, Id} = peer:call(A, tailscale_dist, identity, [?ERGO]),
    ?assertEqual(<<"delta">>, maps:get(node, Id)).

%% A Go node whose policy admits nobody on this tailnet: BEAM nodes get
%% pang, and it does not even list its name to them.
refused_by_policy(Config) ->
    {A, _} = ?config(a, Config),
    Closed = tsdist_ct:start_ergo_node(Config, "closed@omega", ["-allow", "host:nobody"]),
    try
        ?assertEqual(pang, peer:call(A, net_adm, ping, ['closed@omega'], 15000)),
        ?assertMatch({error, _}, peer:call(A, erl_epmd, names, ["omega"], 15000))
    after
        tsdist_ct:stop_ergo_node(Closed)
    end.

%% A BEAM node killed outright (no FIN reaches the Go node) and started
%% again under the same name reconnects at once, as with OTP peers: ergo
%% alone keeps the dead connection until its keepalive gives up (60 s) and
%% refuses the new one meanwhile.
beam_node_restarted(Config) ->
    {C1, _} = tsdist_ct:start_node(Config, c, "gamma"),
    ?assertEqual(pong, peer:call(C1, net_adm, ping, [?ERGO], 15000)),
    #{helper_os_pid := Helper} = peer:call(C1, tailscale_helper, info, []),
    Beam = peer:call(C1, os, getpid, []),
    _ = os:cmd("kill -9 " ++ Beam ++ " " ++ integer_to_list(Helper)),
    catch peer:stop(C1),
    %% A new device (new keys, new tailnet address), as an ephemeral node
    %% restarted gets: nothing answers the old connection with a reset.
    Fresh = filename:join([?config(run_dir, Config), "state", "gamma-again"]),
    {C2, _} = tsdist_ct:start_node([{env, [{"TS_STATE_DIR", Fresh}]} | Config], c, "gamma"),
    try
        %% Measured: ~35 ms. 3 s: a stalled first handshake (5 s) fails it.
        Ms = tsdist_ct:within(3000, "the restarted c@gamma gets pong from the Go node",
                              fun() -> peer:call(C2, net_adm, ping, [?ERGO], 2000) =:= pong end),
        ct:log("the restarted c@gamma got pong from the Go node ~b ms after it was up", [Ms]),
        ?assertEqual(pong, probe_call(C2, {ping, 'c@gamma'}))
    after
        peer:stop(C2)
    end.

%% Stopping the Go node is a nodedown on the Erlang side; started again,
%% it rejoins.
stop_and_rejoin(Config) ->
    {A, _} = ?config(a, Config),
    pong = peer:call(A, net_adm, ping, [?ERGO], 15000),
    %% This node is not distributed; a process on A watches for it.
    ok = peer:call(A, erlang, apply, [fun() ->
        register(tsdist_down_watch, spawn(?MODULE, report_loop, [[]])),
        tsdist_down_watch ! {monitor, ?ERGO, self()},
        receive monitoring -> ok end
    end, []]),
    %% Measured: nodedown ~330 ms after the stop (the Go node's exit
    %% included), pong again ~25 ms after the restarted node is up (it
    %% keeps its UDP port, so A's direct path to it stays right; on a new
    %% port it took 5-12 s). The bounds fail on a return of either stall.
    T0 = erlang:monotonic_time(millisecond),
    tsdist_ct:stop_ergo_node(?config(probe, Config)),
    Down = tsdist_ct:within(3000, "nodedown on A after the Go node stopped", fun() -> downs(A) =:= [?ERGO] end),
    ct:log("nodedown on A ~b ms after the Go node was told to stop (its exit included)",
           [erlang:monotonic_time(millisecond) - T0]),
    ct:log("(~b ms after the stop returned)", [Down]),
    Probe = tsdist_ct:start_ergo_node(Config, "probe@delta", []),
    Again = tsdist_ct:within(3000, "A gets pong from the restarted Go node",
                             fun() -> peer:call(A, net_adm, ping, [?ERGO], 2000) =:= pong end),
    ct:log("pong again ~b ms after the restarted Go node was up", [Again]),
    ?assertEqual(pong, probe_call(A, {ping, 'app@alpha'})),
    peer:call(A, erlang, send, [tsdist_down_watch, stop]),
    tsdist_ct:stop_ergo_node(Probe).

downs(Peer) ->
    peer:call(Peer, erlang, apply, [fun() ->
        tsdist_down_watch ! {query, self()},
        receive {downs, Ds} -> Ds after 5000 -> no_answer end
    end, []]).

%% --- helpers -----------------------------------------------------------

probe_call(Peer, Request) ->
    probe_call(Peer, Request, 30000).

probe_call(Peer, Request, Timeout) ->
    peer:call(Peer, gen_server, call, [{probe, ?ERGO}, Request, Timeout], Timeout + 5000).

%% An echo gen_server registered as tsdist_echo on Peer (once).
start_echo(Peer) ->
    peer:call(Peer, erlang, apply, [fun() ->
        case whereis(tsdist_echo) of
            undefined -> register(tsdist_echo, spawn(?MODULE, echo_loop, [])), ok;
            _ -> ok
        end
    end, []]).

echo_loop() ->
    receive
        {'$gen_call', From, {echo, X}} -> gen_server:reply(From, X);
        {'$gen_call', From, X} -> gen_server:reply(From, X)
    end,
    echo_loop().

%% Records the nodedowns of the nodes it is told to monitor.
report_loop(Downs) ->
    receive
        {monitor, Node, From} -> monitor_node(Node, true), From ! monitoring, report_loop(Downs);
        {nodedown, Node} -> report_loop(Downs ++ [Node]);
        {query, From} -> From ! {downs, Downs}, report_loop(Downs);
        stop -> ok
    end.
