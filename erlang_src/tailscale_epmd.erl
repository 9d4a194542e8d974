%%% EPMD over the tailnet: `-epmd_module tailscale_epmd'.
%%%
%%% The callbacks of erl_epmd, answered by the tailnet EPMD of each host
%%% through this node's tsdist helper (tailscale_helper), so that
%%% `net_adm:names(beta)' lists the nodes on tailnet device `beta' and
%%% `erl_epmd'-style lookups of `Name@Host' find nodes by tailnet hostname.
%%% tailscale_dist needs none of this to connect (it asks the helper
%%% itself); this module is for the tools and libraries that ask the epmd
%%% module directly.
%%%
%%% "localhost" and the node's own tailnet hostname both mean this host.
-module(tailscale_epmd).
-compile(warn_missing_spec).

-export([start_link/0, register_node/2, register_node/3, port_please/2, port_please/3,
         names/0, names/1, address_please/3, listen_port_please/2]).

-define(TIMEOUT, 15000).

%% Nothing to run: the helper's process (started by tailscale_dist) holds
%% the control connection.
-spec start_link() -> ignore.
start_link() ->
    ignore.

-spec register_node(atom() | string(), 1..65535) -> {ok, pos_integer()} | {error, term()}.
register_node(Name, Port) ->
    register_node(Name, Port, inet).

%% Registers Name on this host's tailnet EPMD for the life of the node.
-spec register_node(atom() | string(), 1..65535, atom()) -> {ok, pos_integer()} | {error, term()}.
register_node(Name, Port, _Family) ->
    case tailscale_helper:register_node(Name, Port, false) of
        {ok, Creation} -> {ok, Creation};
        {error, duplicate_name} -> {error, already_registered};
        {error, _} = E -> E
    end.

-spec port_please(atom() | string(), atom() | string() | inet:ip_address()) ->
          {port, 1..65535, non_neg_integer()} | noport | {error, term()}.
port_please(Name, Host) ->
    port_please(Name, Host, ?TIMEOUT).

-spec port_please(atom() | string(), atom() | string() | inet:ip_address(), timeout()) ->
          {port, 1..65535, non_neg_integer()} | noport | {error, term()}.
port_please(Name, Host, Timeout) ->
    case tailscale_helper:port_please(Name, host(Host), timeout_ms(Timeout)) of
        {ok, Port, Version} -> {port, Port, Version};
        {error, {not_registered, _}} -> noport;
        {error, _} = E -> E
    end.

-spec names() -> {ok, [{string(), 1..65535}]} | {error, term()}.
names() ->
    names(localhost).

%% The nodes registered on tailnet host Host, as `{Name, Port}'.
-spec names(atom() | string() | inet:ip_address()) ->
          {ok, [{string(), 1..65535}]} | {error, term()}.
names(Host) ->
    tailscale_helper:names(host(Host), ?TIMEOUT).

%% The tailnet address and port of Name@Host, in one go.
-spec address_please(atom() | string(), atom() | string() | inet:ip_address(), atom()) ->
          {ok, inet:ip_address(), 1..65535, non_neg_integer()} | {error, term()}.
address_please(Name, Host, Family) ->
    H = host(Host),
    case tailscale_helper:port_please(Name, H, ?TIMEOUT) of
        {ok, Port, Version} ->
            case tailnet_ip(H, Family) of
                {ok, IP} -> {ok, IP, Port, Version};
                {error, _} = E -> E
            end;
        {error, {not_registered, _}} -> {error, noport};
        {error, _} = E -> E
    end.

%% Any port: the helper picks a free tailnet port.
-spec listen_port_please(atom() | string(), string()) -> {ok, 0}.
listen_port_please(_Name, _Host) ->
    {ok, 0}.

%%% Internal

host(Host) when is_atom(Host) -> host(atom_to_list(Host));
host(Host) when is_tuple(Host) -> inet:ntoa(Host);
host(Host) ->
    %% net_adm:names/0 asks for the machine's own hostname.
    {ok, Machine} = inet:gethostname(),
    case lists:member(Host, ["localhost", Machine]) of
        true -> tailscale_helper:hostname();
        false -> Host
    end.

timeout_ms(infinity) -> 300000;
timeout_ms(T) -> max(1, T).

%% A tailnet address of Host, from the helper's view of the tailnet.
tailnet_ip(Host, Family) ->
    case tailscale_helper:status() of
        {ok, #{<<"self">> := Self, <<"peers">> := Peers}} ->
            HostBin = unicode:characters_to_binary(string:lowercase(Host)),
            Match = [P || P <- [Self | Peers], names_of(P, HostBin)],
            IPs = [IP || #{<<"ips">> := Ips} <- Match, Ip <- Ips,
                         {ok, IP} <- [inet:parse_address(binary_to_list(Ip))],
                         family(IP) =:= Family],
            case IPs of
                [IP | _] -> {ok, IP};
                [] -> {error, nxdomain}
            end;
        {error, _} = E -> E
    end.

names_of(Peer, Host) ->
    Dns = maps:get(<<"dns_name">>, Peer, <<>>),
    lists:member(Host, [maps:get(<<"node">>, Peer, <<>>), Dns, <<Dns/binary, ".">>])
        orelse lists:member(Host, maps:get(<<"ips">>, Peer, [])).

family(IP) when tuple_size(IP) =:= 4 -> inet;
family(_) -> inet6.
