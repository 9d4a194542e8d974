%%% Discovery: connect to the nodes of the tailnet that match, as they come.
%%%
%%% Follows the helper's view of the tailnet (pushed peers events, see
%%% tailscale_helper:subscribe/1), picks the peers that this node's access
%%% policy admits (the helper's `allowed') and that match the options
%%% (tags, a hostname pattern, online), asks each such host's tailnet EPMD
%%% which nodes run there (so no node basename is assumed), and connects to
%%% them; nodes that stop matching or leave are disconnected if so
%%% configured. scan/2 (and candidates/2) is the part shared with the Elixir
%%% libcluster strategy.
%%%
%%% A host whose EPMD gives no answer (a timeout, a connection that fails)
%%% is not a host without nodes: its nodes that are connected stay
%%% connected, and it is asked again soon, 250 ms later and then twice as
%%% long each time up to the rescan interval, rather than at the next
%%% rescan. A node that could not be connected is tried again the same way
%%% (up to 30 s between tries, see due/3). A node this process connected
%%% that goes down (it restarted, its helper did, or `global' disconnected
%%% it to prevent overlapping partitions) is tried again 250 ms later in the
%%% same way, not at the next rescan.
%%%
%%% What a host's EPMD lists is the host's say, so it is checked before
%%% it becomes an atom: a name must be 1 to 255 letters, digits, `_', `-'
%%% or `.', the whole `Name@Host' at most 255 bytes, and at most 64 names
%%% of a host are taken (in the order the helper lists them, which is
%%% sorted). Names that fail, and those the helper left out, are logged
%%% once a minute per host with a count. Peers the policy does not admit
%%% (and, from a helper too old to say, peers without `allowed') are never
%%% asked for names at all.
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

-export([start_link/1, candidates/2, scan/2, matching/2, connected/0]).
%% the checks on what a host's EPMD lists, for the tests
-export([node_names/3, valid_host/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% A names question gets 1.5 s: an answer takes milliseconds, and one
%% without an answer is asked again 250 ms later (see unanswered_backoff/3),
%% on a fresh connection. (5 s was the cost of a question sent to a Go
%% node just as it restarted: its first handshake was dropped.)
-define(NAMES_TIMEOUT, 1500).
-define(MAX_NAMES_PER_HOST, 64).
-define(MAX_NODE_NAME, 255).      % bytes of Name@Host, as an atom allows
-define(LOG_INTERVAL, 60000).     % one report per host and kind per minute
-define(MAX_RETRY, 30000).        % the longest pause before connecting again
-define(PARALLEL, 16).            % names requests or connections at once
-define(FIRST_RETRY, 250).        % the first pause before asking or connecting again

-type opts() :: #{tags => [string() | binary()], hostname_pattern => undefined | string() | binary(),
                  online_only => boolean(), disconnect_on_departure => boolean(),
                  rescan_ms => pos_integer()}.
-type scan() :: #{nodes := [node()], unanswered := [string()]}.
-export_type([opts/0, scan/0]).

-spec start_link(opts() | [{atom(), term()}]) -> {ok, pid()} | {error, term()}.
start_link(Opts) ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, options(Opts), []).

%% The nodes discovery has connected and that still match.
-spec connected() -> [node()].
connected() ->
    gen_server:call(?MODULE, connected).

%% The peers that this node's policy admits (`allowed' true) and that pass
%% the options' filter (tags, hostname pattern, online), before any EPMD
%% is asked.
-spec matching([map()], opts() | [{atom(), term()}]) -> [map()].
matching(Peers, Opts0) ->
    Opts = options(Opts0),
    [P || P <- Peers, is_map(P), admitted(P), matches(P, Opts)].

%% The nodes to be connected, given the tailnet's peers: every node
%% registered on the tailnet EPMD of a matching peer (and of this node's own
%% host), named like node() (short or long names), this node excluded.
%% Only names that pass the checks above become atoms, at most 64 per host.
%% Rejected names are logged from the calling process, which keeps the
%% once-a-minute state in its process dictionary.
-spec candidates([map()], opts() | [{atom(), term()}]) -> [node()].
candidates(Peers, Opts) ->
    maps:get(nodes, scan(Peers, Opts)).

%% candidates/2, and the hosts whose EPMD gave no answer (`unanswered', as
%% they are written in node names): what runs there is unknown, so a caller
%% must not take their nodes for departed, and should ask again soon.
-spec scan([map()], opts() | [{atom(), term()}]) -> scan().
scan(Peers, Opts0) ->
    Opts = options(Opts0),
    Long = net_kernel:longnames() =:= true,
    Hosts = [H || P <- matching(Peers, Opts), H <- host_of(P, Long)],
    Own = case tailscale_helper:hostname() of
              undefined -> [];
              H -> [own_host(H, Long)]
          end,
    Listed = pmap(fun(Host) -> names(Host) end, {error, down}, lists:usort(Own ++ Hosts)),
    Names = lists:append([checked_names(Host, Result) || {Host, Result} <- Listed]),
    #{nodes => [list_to_atom(N) || N <- lists:usort(Names)] -- [node()],
      unanswered => [Host || {Host, {error, _}} <- Listed]}.

%% The `Name@Host' strings to connect among what Host's EPMD listed (Listed,
%% in the helper's order) and the helper left out (Dropped), and what was
%% turned down: `{invalid, Names}' (not a node name, or too long with the
%% host) and the number beyond the limit per host.
-spec node_names(string(), [string()], non_neg_integer()) ->
          {[string()], #{invalid := [string()], over_limit := non_neg_integer(),
                         dropped := non_neg_integer()}}.
node_names(Host, Listed, Dropped) ->
    {Valid, Invalid} = lists:partition(fun(N) -> valid_name(N, Host) end, Listed),
    Kept = lists:sublist(Valid, ?MAX_NAMES_PER_HOST),
    {[N ++ "@" ++ Host || N <- Kept],
     #{invalid => Invalid, over_limit => length(Valid) - length(Kept), dropped => Dropped}}.

%% Whether Host can be the host part of a node name to connect to: DNS
%% labels (letters, digits, inner hyphens) separated by dots, at most 253
%% bytes.
-spec valid_host(string()) -> boolean().
valid_host(Host) ->
    is_list(Host) andalso length(Host) =< 253 andalso
        re:run(Host, "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                     "(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$",
               [{capture, none}]) =:= match.

%%% gen_server

-spec init(opts()) -> {ok, map()}.
init(Opts) ->
    ok = tailscale_helper:subscribe(self()),
    ok = net_kernel:monitor_nodes(true),
    erlang:send_after(maps:get(rescan_ms, Opts), self(), rescan),
    {ok, #{opts => Opts, peers => undefined, ours => [], failed => #{},
           unanswered => {[], ?FIRST_RETRY}, retry => undefined}}.

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
handle_info({retry, Ref}, #{retry := {Ref, _}} = St) ->
    {noreply, converge(St#{retry := undefined})};
handle_info({nodedown, Node}, #{ours := Ours, failed := Failed} = St) ->
    case lists:member(Node, Ours) of
        true ->
            %% Tried again after ?FIRST_RETRY; should that fail, after
            %% twice as long each time (failed/4 doubles the half).
            Now = erlang:monotonic_time(millisecond),
            {noreply, schedule_retry(St#{ours := Ours -- [Node],
                                         failed := Failed#{Node => {Now + ?FIRST_RETRY, ?FIRST_RETRY div 2}}},
                                     Now)};
        false ->
            {noreply, St}
    end;
handle_info(_Msg, St) ->
    {noreply, St}.

%% Connects what matches and is not connected; disconnects what this
%% process connected and matches no more.
converge(#{peers := undefined} = St) ->
    St;
converge(#{peers := Peers, opts := Opts, ours := Ours, failed := Failed0} = St) ->
    #{nodes := Want, unanswered := Unanswered} = scan(Peers, Opts),
    Connected = nodes(connected),
    Now = erlang:monotonic_time(millisecond),
    Attempts = pmap(fun net_kernel:connect_node/1, false,
                    [N || N <- Want, not lists:member(N, Connected), due(N, Failed0, Now)]),
    New = [N || {N, true} <- Attempts],
    Failed = maps:with(Want, lists:foldl(fun({N, true}, F) -> maps:remove(N, F);
                                            ({N, _}, F) -> failed(N, F, Now, Opts)
                                         end, Failed0, Attempts)),
    [logger:info("tailscale_discovery: connected ~p", [N]) || N <- New],
    %% Nodes of a host that gave no answer are not gone: kept, and asked
    %% about again soon.
    Kept = [N || N <- Ours, lists:member(host_part(N), Unanswered)],
    Gone = Ours -- (Want ++ Kept),
    case maps:get(disconnect_on_departure, Opts) of
        true ->
            [begin
                 logger:info("tailscale_discovery: ~p left or stopped matching; disconnecting", [N]),
                 erlang:disconnect_node(N)
             end || N <- Gone];
        false ->
            ok
    end,
    Connected1 = nodes(connected),
    %% A node that failed here may have connected from its side meanwhile:
    %% nothing is due for it (else its past due time would be a retry
    %% timer of 0 ms, over and over).
    schedule_retry(St#{ours := lists:usort([N || N <- Want ++ Kept, lists:member(N, Connected1)]),
                       failed := maps:without(Connected1, Failed),
                       unanswered := unanswered_backoff(Unanswered, maps:get(unanswered, St), Opts)},
                   Now).

%% Hosts without an answer are asked again after 250 ms, then twice as
%% long each time (up to the rescan interval) while any stays silent.
unanswered_backoff([], _, _) ->
    {[], ?FIRST_RETRY};
unanswered_backoff(Hosts, {[], _}, _) ->
    {Hosts, ?FIRST_RETRY};
unanswered_backoff(Hosts, {_, Backoff}, #{rescan_ms := Rescan}) ->
    {Hosts, min(2 * Backoff, Rescan)}.

%% One timer, for the earliest of: the next question to a silent host, the
%% next try of a node that could not be connected. The rescan covers
%% anything later.
schedule_retry(#{unanswered := {Silent, Backoff}, failed := Failed, retry := Retry,
                 opts := #{rescan_ms := Rescan}} = St, Now) ->
    Wanted = [Backoff || Silent =/= []] ++ [max(0, At - Now) || {At, _} <- maps:values(Failed)],
    case [W || W <- Wanted, W < Rescan] of
        [] ->
            St;
        Soon ->
            In = lists:min(Soon),
            case Retry of
                {_, At} when At =< Now + In ->
                    St;
                _ ->
                    Ref = make_ref(),
                    erlang:send_after(In, self(), {retry, Ref}),
                    St#{retry := {Ref, Now + In}}
            end
    end.

host_part(Node) ->
    case string:split(atom_to_list(Node), "@") of
        [_, Host] -> Host;
        _ -> ""
    end.

%%% Internal

%% A candidate that could not be connected is tried again after 250 ms,
%% then after twice as long each time, up to 30 s: a host that
%% lists nodes nobody can reach (a stale name, or a lie) costs a connection
%% attempt, and a log line, per name every 30 s rather than every rescan.
due(Node, Failed, Now) ->
    case maps:find(Node, Failed) of
        {ok, {At, _}} -> Now >= At;
        error -> true
    end.

failed(Node, Failed, Now, #{rescan_ms := Rescan}) ->
    Backoff = case maps:find(Node, Failed) of
                  {ok, {_, B}} -> min(2 * B, ?MAX_RETRY);
                  error -> min(?FIRST_RETRY, Rescan)
              end,
    Failed#{Node => {Now + Backoff - 50, Backoff}}.

%% The helper says whether its policy admits a peer. A peer object
%% without `allowed' comes from a helper older than this module; it is
%% not admitted (fail closed).
admitted(#{<<"allowed">> := true}) -> true;
admitted(#{<<"allowed">> := _}) -> false;
admitted(_) ->
    report(no_allowed_field, helper, 1,
           fun(N) -> {"the helper's peers carry no `allowed' (an older tsdist helper?): "
                      "~b peer(s) skipped; update bin/tsdist", [N]} end),
    false.

checked_names(Host, {ok, Listed, Dropped}) ->
    {Names, #{invalid := Invalid, over_limit := Over, dropped := Dropped}} =
        node_names(Host, Listed, Dropped),
    Rejected = length(Invalid) + Over + Dropped,
    Rejected > 0 andalso
        report(names, Host, Rejected,
               fun(N) ->
                       {"~ts's EPMD listed ~b name(s) that will not be connected: "
                        "~b not node names (~0tp), ~b beyond the limit of ~b per host, "
                        "~b left out by the helper; ~b in all since the last report",
                        [Host, Rejected, length(Invalid),
                         [string:slice(I, 0, 40) || I <- lists:sublist(Invalid, 3)],
                         Over, ?MAX_NAMES_PER_HOST, Dropped, N]}
               end),
    Names;
checked_names(Host, {error, Reason}) ->
    report(names_failed, Host, 1,
           fun(N) -> {"cannot list the nodes of ~ts (~b time(s) since the last report): ~0tp",
                      [Host, N, Reason]} end),
    [].

%% Logs once per Kind and Host a minute, with the Count accumulated
%% since the last report. The state is in the calling process's
%% dictionary: this module's process, or the Elixir strategy's.
report(Kind, Host, Count, Format) ->
    Key = {?MODULE, report, Kind, Host},
    Now = erlang:monotonic_time(millisecond),
    case get(Key) of
        {Since, Pending} when Now - Since < ?LOG_INTERVAL ->
            put(Key, {Since, Pending + Count});
        Previous ->
            Pending = case Previous of
                          {_, P} -> P;
                          undefined -> 0
                      end,
            %% What a host sent can be long (an error quoting its answer):
            %% the line is cut at 1000 characters.
            {Fmt, Args} = Format(Pending + Count),
            logger:warning("tailscale_discovery: ~ts", [io_lib:format(Fmt, Args, [{chars_limit, 1000}])]),
            put(Key, {Now, 0})
    end,
    true.

%% 1 to 255 bytes of letters, digits, `_', `-' and `.'; with "@Host", at
%% most 255 bytes, as an atom must be.
valid_name(Name, Host) ->
    is_list(Name) andalso Name =/= [] andalso
        length(Name) + 1 + length(Host) =< ?MAX_NODE_NAME andalso
        lists:all(fun(C) -> (C >= $a andalso C =< $z) orelse (C >= $A andalso C =< $Z)
                                orelse (C >= $0 andalso C =< $9)
                                orelse C =:= $_ orelse C =:= $- orelse C =:= $.
                  end, Name).

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
    PeerTags = case maps:get(<<"tags">>, Peer, []) of
                   L when is_list(L) -> L;
                   _ -> []
               end,
    Tagged = Tags =:= [] orelse lists:any(fun(T) -> lists:member(to_bin(T), PeerTags) end, Tags),
    Named = Pattern =:= undefined orelse Pattern =:= nil orelse % nil: from Elixir
        lists:any(fun(Name) -> re:run(Name, Pattern, [{capture, none}]) =:= match end,
                  [binary_field(<<"node">>, Peer), binary_field(<<"hostname">>, Peer)]),
    Online andalso Tagged andalso Named.

%% The host part of the names of a peer's nodes. A node names itself by
%% the hostname its helper asked for (app@alpha), which is the peer's
%% MagicDNS label unless another node held that name when it joined (most
%% likely an earlier run of it that never logged out): then the label is
%% "alpha-1", and the helper resolves "alpha" to the online node.
%% As a list of none or one host: a peer whose names do not make a valid
%% host is skipped.
host_of(Peer, Long) ->
    Host = case Long of
               false -> short_host(Peer);
               true ->
                   DNSName = binary_field(<<"dns_name">>, Peer),
                   case binary:split(DNSName, <<".">>) of
                       [_, Suffix] -> <<(short_host(Peer))/binary, ".", Suffix/binary>>;
                       [_] -> DNSName
                   end
           end,
    [H || H <- [binary_to_list(Host)], valid_host(H)].

short_host(Peer) ->
    Hostname = binary_field(<<"hostname">>, Peer),
    case valid_host(binary_to_list(Hostname)) andalso binary:match(Hostname, <<".">>) =:= nomatch of
        true -> Hostname;
        false -> binary_field(<<"node">>, Peer)
    end.

binary_field(Key, Map) ->
    case maps:get(Key, Map, <<>>) of
        B when is_binary(B) -> B;
        _ -> <<>>
    end.

%% This node's own host, written as its node name writes it.
own_host(Label, Long) ->
    case {Long, string:split(atom_to_list(node()), "@")} of
        {true, [_, Host]} -> Host;
        _ -> Label
    end.

names(Host) ->
    case tailscale_helper:names_info(Host, ?NAMES_TIMEOUT) of
        {ok, Names, Dropped} -> {ok, [N || {N, _Port} <- Names], Dropped};
        {error, _} = E -> E
    end.

%% [{X, F(X)}], F run for up to 16 Xs at once: one slow host (or node)
%% must not hold up the others, and all at once would be more requests
%% than the helper takes in flight on one connection (64). Default stands
%% in for an F that crashed.
pmap(F, Default, Xs) when length(Xs) > ?PARALLEL ->
    {Now, Later} = lists:split(?PARALLEL, Xs),
    pmap(F, Default, Now) ++ pmap(F, Default, Later);
pmap(F, Default, Xs) ->
    Parent = self(),
    Refs = [{spawn_monitor(fun() -> Parent ! {self(), F(X)} end), X} || X <- Xs],
    [receive
         {Pid, R} -> erlang:demonitor(Ref, [flush]), {X, R};
         {'DOWN', Ref, process, Pid, _} -> {X, Default}
     end || {{Pid, Ref}, X} <- Refs].

to_bin(B) when is_binary(B) -> B;
to_bin(L) when is_list(L) -> list_to_binary(L).
