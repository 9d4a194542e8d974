%%% A cluster of mixed OTP releases over the tailnet: an OTP 25 node (this
%%% machine's Erlang) and an OTP 27 node (from the Debian 13 root that
%%% scripts/otp27.sh builds) cluster by hostname. OTP 26 changed the
%%% distribution protocol (DFLAG_UNLINK_ID became mandatory, references
%%% grew), so this is where a carrier that only works within one release
%%% would show.
%%%
%%% Run by `make test-otp27', which sets TSDIST_OTP27_ROOT.
-module(tailscale_mixed_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1]).
-export([releases/1, ping_both_ways/1, rpc_both_ways/1, global_across/1,
         links_and_monitors_across/1, big_message_across/1]).
%% run on the nodes under test
-export([echo_loop/0]).

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [releases, ping_both_ways, rpc_both_ways, global_across, links_and_monitors_across,
     big_message_across].

init_per_suite(Config) ->
    Root = case os:getenv("TSDIST_OTP27_ROOT") of
               false -> ct:fail("TSDIST_OTP27_ROOT is not set: run this suite with `make test-otp27`");
               R -> R
           end,
    Config1 = tsdist_ct:start_tailnet(Config),
    Old = tsdist_ct:start_node(Config1, old, "alpha"),
    New = tsdist_ct:start_node([{exec, {"/usr/sbin/chroot", [Root, "/usr/bin/erl"]}} | Config1],
                               new, "beta"),
    [{old, Old}, {new, New} | Config1].

end_per_suite(Config) ->
    [peer:stop(P) || {P, _} <- [?config(old, Config), ?config(new, Config)]],
    tsdist_ct:stop_tailnet(Config).

releases(Config) ->
    {Old, _} = ?config(old, Config),
    {New, _} = ?config(new, Config),
    ?assertEqual("25", peer:call(Old, erlang, system_info, [otp_release])),
    ?assertEqual("27", peer:call(New, erlang, system_info, [otp_release])).

ping_both_ways(Config) ->
    {Old, _} = ?config(old, Config),
    {New, _} = ?config(new, Config),
    ?assertEqual(pong, peer:call(Old, net_adm, ping, [new@beta], 15000)),
    ?assertEqual(pong, peer:call(New, net_adm, ping, [old@alpha], 15000)),
    ?assertEqual([new@beta], peer:call(Old, erlang, nodes, [])),
    ?assertEqual([old@alpha], peer:call(New, erlang, nodes, [])).

rpc_both_ways(Config) ->
    {Old, _} = ?config(old, Config),
    {New, _} = ?config(new, Config),
    ?assertEqual("27", peer:call(Old, erpc, call, [new@beta, erlang, system_info, [otp_release]])),
    ?assertEqual("25", peer:call(New, erpc, call, [old@alpha, erlang, system_info, [otp_release]])),
    ?assertEqual(new@beta, peer:call(Old, rpc, call, [new@beta, erlang, node, []])).

global_across(Config) ->
    {Old, _} = ?config(old, Config),
    {New, _} = ?config(new, Config),
    pong = peer:call(Old, net_adm, ping, [new@beta], 15000),
    Pid = peer:call(New, erlang, spawn, [timer, sleep, [60000]]),
    yes = peer:call(New, global, register_name, [mixed_global, Pid]),
    ok = peer:call(Old, global, sync, []),
    ?assertEqual(Pid, peer:call(Old, global, whereis_name, [mixed_global])),
    peer:call(New, erlang, exit, [Pid, kill]),
    tsdist_ct:wait_until(fun() -> peer:call(Old, global, whereis_name, [mixed_global]) =:= undefined end).

%% Links and monitors, the part of the protocol OTP 26 changed (unlink ids).
links_and_monitors_across(Config) ->
    {Old, _} = ?config(old, Config),
    {New, _} = ?config(new, Config),
    ?assertEqual({tsdist_test, linked_exit, quiet},
                 tsdist_ct:links_and_monitors(Old, new@beta, new@beta)),
    ?assertEqual({tsdist_test, linked_exit, quiet},
                 tsdist_ct:links_and_monitors(New, old@alpha, old@alpha)).

big_message_across(Config) ->
    {Old, _} = ?config(old, Config),
    Ok = peer:call(Old, erlang, apply, [fun() ->
        Bin = rand:bytes(8 bsl 20),
        Echo = spawn(new@beta, ?MODULE, echo_loop, []),
        Echo ! {self(), {Bin, make_ref(), self()}},
        Back = receive {Echo, {B, _Ref, _Pid}} -> B after 30000 -> timeout end,
        Echo ! stop,
        Back =:= Bin
    end, []], 40000),
    ?assert(Ok).

echo_loop() ->
    receive
        {From, Msg} -> From ! {self(), Msg}, echo_loop();
        stop -> ok
    end.
