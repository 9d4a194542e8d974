%%% Discovery: connect to the nodes of the tailnet that match, as they come.
%%%
%%% Follows the helper's view of the tailnet (pushed peers events, see
%%% tailscale_helper:subscribe/1), picks the peers that match the options
%%% (tags, a hostname pattern, online), asks each such host's tailnet EPMD
%%% which nodes run there (so no node basename is assumed), and connects to
%%% them; nodes that stop matching or leave are disconnected if so
%%% configured. candidates/2 is the pure part, shared with the Elixir
%%% libcluster strategy.
%%%
%%% From plain Erlang, set the `tsdist' application's `discovery' to a list
%%% of options and start the application:
%%%
%%%     erl ... -tsdist discovery '[{tags, ["tag:erlang"]}]' -eval 'application:ensure_all_started(tsdist)'
%%%
%%% or start tailscale_discovery:start_link(Opts) in a supervisor of yours.
%%% Options, with their defaults:
%%%
%%%   tags                     []     a peer must carry one of these ACL tags
%%%                                   ([]: no tag filter)
%%%   hostname_pattern         undefined  a regex a peer's tailnet hostname
%%%                                   (or its MagicDNS label) must match
%%%   online_only              true   skip peers the tailnet says are offline
%%%   disconnect_on_departure  true   disconnect nodes that no longer match
%%%   rescan_ms                2000   how often to look again without an
%%%                                   event (a node that registers after its
%%%                                   host joined shows up then)
-module(tailscale_discovery).
-compile(warn_missing_spec).
-behaviour(gen_server).

-export([start_link/1, candidates/2, matching/2, connected/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-define(NAMES_TIMEOUT, 5000).

-type opts() :: #{tags => [string() | binary()], hostname_pattern => undefined | string() | binary(),
                  online_only => boolean(), disconnect_on_departure => boolean(),
                  rescan_ms => pos_integer()}.
-export_type([opts/0]).

-spec start_link(opts() | [{atom(), term()}]) -> {ok, pid()} | {error, term()}.
start_link(Opts) ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, options(Opts), []).

%% The nodes discovery has connected and that still match.
-spec connected() -> [node()].
connected() ->
    gen_server:call(?MODULE, connected).

%% The peers that pass the options' filter (tags, hostname pattern,
%% online), before any EPMD is asked.
-spec matching([map()], opts() | [{atom(), term()}]) -> [map()].
matching(Peers, Opts0) ->
    Opts = options(Opts0),
    [P || P <- Peers, matches(P, Opts)].

%% The nodes to be connected, given the tailnet's peers: every node
%% registered on the tailnet EPMD of a matching peer (and of this node's own
%% host), named like node() (short or long names), this node excluded.
-spec candidates([map()], opts() | [{atom(), term()}]) -> [node()].
candidates(Peers, Opts0) ->
    Opts = options(Opts0),
    Long = net_kernel:longnames() =:= true,
    Hosts = [host_of(P, Long) || P <- matching(Peers, Opts)],
    Own = case tailscale_helper:hostname() of
              undefined -> [];
              H -> [own_host(H, Long)]
          end,
    Names = pmap(fun(Host) -> {Host, names(Host)} end, lists:usort(Own ++ Hosts)),
    lists:usort([list_to_atom(Name ++ "@" ++ Host) || {Host, Ns} <- Names, Name <- Ns])
        -- [node()].

%%% gen_server

-spec init(opts()) -> {ok, map()}.
init(Opts) ->
    ok = tailscale_helper:subscribe(self()),
    erlang:send_after(maps:get(rescan_ms, Opts), self(), rescan),
    {ok, #{opts => Opts, peers => undefined, ours => []}}.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(connected, _From, #{ours := Ours} = St) ->
    {reply, Ours, St}.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, St) ->
    {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({tailscale_peers, Peers}, St) ->
    {noreply, converge(St#{peers := Peers})};
handle_info(rescan, #{opts := Opts} = St) ->
    erlang:send_after(maps:get(rescan_ms, Opts), self(), rescan),
    {noreply, converge(St)};
handle_info(_Msg, St) ->
    {noreply, St}.

%% Connects what matches and is not connected; disconnects what this
%% process connected and matches no more.
converge(#{peers := undefined} = St) ->
    St;
converge(#{peers := Peers, opts := Opts, ours := Ours} = St) ->
    Want = candidates(Peers, Opts),
    Connected = nodes(connected),
    New = [N || N <- Want, not lists:member(N, Connected), net_kernel:connect_node(N) =:= true],
    [logger:info("tailscale_discovery: connected ~p", [N]) || N <- New],
    Gone = Ours -- Want,
    case maps:get(disconnect_on_departure, Opts) of
        true ->
            [begin
                 logger:info("tailscale_discovery: ~p left or stopped matching; disconnecting", [N]),
                 erlang:disconnect_node(N)
             end || N <- Gone];
        false ->
            ok
    end,
    St#{ours := lists:usort([N || N <- Want, lists:member(N, nodes(connected))])}.

%%% Internal

options(Opts) when is_list(Opts) ->
    options(maps:from_list(Opts));
options(Opts) when is_map(Opts) ->
    Defaults = #{tags => [], hostname_pattern => undefined, online_only => true,
                 disconnect_on_departure => true, rescan_ms => 2000},
    case maps:keys(Opts) -- maps:keys(Defaults) of
        [] -> maps:merge(Defaults, Opts);
        Unknown -> error({badarg, {unknown_discovery_options, Unknown}})
    end.

matches(Peer, #{tags := Tags, hostname_pattern := Pattern, online_only := OnlineOnly}) ->
    Online = not OnlineOnly orelse maps:get(<<"online">>, Peer, false) =:= true,
    PeerTags = maps:get(<<"tags">>, Peer, []),
    Tagged = Tags =:= [] orelse lists:any(fun(T) -> lists:member(to_bin(T), PeerTags) end, Tags),
    Named = Pattern =:= undefined orelse Pattern =:= nil orelse % nil: from Elixir
        lists:any(fun(Name) -> re:run(Name, Pattern, [{capture, none}]) =:= match end,
                  [maps:get(<<"node">>, Peer, <<>>), maps:get(<<"hostname">>, Peer, <<>>)]),
    Online andalso Tagged andalso Named.

%% The host part of the names of a peer's nodes. A node names itself by
%% the hostname its helper asked for (app@alpha), which is the peer's
%% MagicDNS label unless another node held that name when it joined (most
%% likely an earlier run of it that never logged out): then the label is
%% "alpha-1", and the helper resolves "alpha" to the online node.
host_of(Peer, false) ->
    binary_to_list(short_host(Peer));
host_of(Peer, true) ->
    DNSName = maps:get(<<"dns_name">>, Peer),
    case binary:split(DNSName, <<".">>) of
        [_, Suffix] -> binary_to_list(<<(short_host(Peer))/binary, ".", Suffix/binary>>);
        [_] -> binary_to_list(DNSName)
    end.

short_host(Peer) ->
    Label = maps:get(<<"node">>, Peer),
    Hostname = maps:get(<<"hostname">>, Peer, <<>>),
    case re:run(Hostname, "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$", [{capture, none}]) of
        match -> Hostname;
        nomatch -> Label
    end.

%% This node's own host, written as its node name writes it.
own_host(Label, Long) ->
    case {Long, string:split(atom_to_list(node()), "@")} of
        {true, [_, Host]} -> Host;
        _ -> Label
    end.

names(Host) ->
    case tailscale_helper:names(Host, ?NAMES_TIMEOUT) of
        {ok, Names} -> [N || {N, _Port} <- Names];
        {error, _} -> []
    end.

%% Asks every host at once: one slow host must not hold up the others.
pmap(F, Xs) ->
    Parent = self(),
    Refs = [{spawn_monitor(fun() -> Parent ! {self(), F(X)} end), X} || X <- Xs],
    [receive
         {Pid, R} -> erlang:demonitor(Ref, [flush]), R;
         {'DOWN', Ref, process, Pid, _} -> {X, []}
     end || {{Pid, Ref}, X} <- Refs].

to_bin(B) when is_binary(B) -> B;
to_bin(L) when is_list(L) -> list_to_binary(L).
