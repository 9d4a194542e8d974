%%% Erlang distribution over a Tailscale tailnet: `-proto_dist tailscale'.
%%%
%%% A port carrier in the manner of inet_tcp_dist. The tsdist helper
%%% (started by tailscale_helper, this module's early child) owns the
%%% node's tailnet device; every distribution connection it accepts or
%%% dials arrives as a file descriptor that becomes an ordinary inet-driver
%%% port, so after the handshake the emulator moves the bytes itself, as
%%% with TCP. The node's name is registered on its host's tailnet EPMD
%%% through the helper, and peers are found through theirs, so no local
%%% epmd is needed:
%%%
%%%     erl -proto_dist tailscale -start_epmd false -sname app@alpha
%%%
%%% makes the node the tailnet device `alpha'; `net_adm:ping(app@beta)'
%%% reaches node app on tailnet device `beta'. Add `-epmd_module
%%% tailscale_epmd' for net_adm:names/1 and the other EPMD queries over the
%%% tailnet.
%%%
%%% The callbacks follow the order of ERTS's alternative-carrier guide:
%%% childspecs, select, address, listen, accept, accept_connection, setup,
%%% close, is_node_name, then the socket options net_kernel forwards.
-module(tailscale_dist).
-compile(warn_missing_spec).

-export([childspecs/0, select/1, address/0, listen/1, listen/2, accept/1,
         accept_connection/5, setup/5, close/1, is_node_name/1,
         setopts/2, getopts/2]).
%% the tailnet identity of a connected node
-export([identity/1, format_address/2]).
%% internal exports
-export([accept_loop/2, do_accept/6, do_setup/6]).

-include_lib("kernel/include/net_address.hrl").
-include_lib("kernel/include/dist.hrl").
-include_lib("kernel/include/dist_util.hrl").

-define(PROTOCOL, tailscale).
-define(FAMILY, inet).

-record(listener, {port :: 1..65535, name :: atom()}).

%% The inet driver's user-space receive buffer of a connection once it is
%% up (the default is 1460 bytes, one read per TCP segment's worth).
-define(RECV_BUFFER, 65536).

%% The helper's process starts before net_kernel, under net_sup.
-spec childspecs() -> {ok, [supervisor:child_spec()]}.
childspecs() ->
    {ok, [#{id => tailscale_helper,
            start => {tailscale_helper, start_link, []},
            restart => permanent,
            shutdown => 5000,
            type => worker,
            modules => [tailscale_helper]}]}.

%% Any node name with a host part can be reached over the tailnet.
-spec select(node()) -> boolean().
select(Node) ->
    is_node_name(Node).

-spec address() -> #net_address{}.
address() ->
    {ok, Host} = inet:gethostname(),
    #net_address{host = Host, protocol = ?PROTOCOL, family = ?FAMILY}.

-spec listen(atom()) -> {ok, {#listener{}, #net_address{}, pos_integer()}} | {error, term()}.
listen(Name) ->
    {ok, Host} = inet:gethostname(),
    listen(Name, Host).

%% Listens on a free tailnet port and registers Name there on this host's
%% tailnet EPMD. Both belong to tailscale_helper's control connection, so
%% they end when the node does.
-spec listen(atom(), string()) ->
          {ok, {#listener{}, #net_address{}, pos_integer()}} | {error, term()}.
listen(Name, Host) ->
    case tailscale_helper:start(Host) of
        ok -> listen_and_register(Name, Host);
        {error, Reason} -> {error, {tailnet, Reason}}
    end.

listen_and_register(Name, Host) ->
    case tailscale_helper:listen(0) of
        {ok, Port} ->
            Hidden = hidden(),
            case tailscale_helper:register_node(Name, Port, Hidden) of
                {ok, Creation} ->
                    Address = #net_address{address = listen_address(Port), host = Host,
                                           protocol = ?PROTOCOL, family = ?FAMILY},
                    {ok, {#listener{port = Port, name = Name}, Address, Creation}};
                {error, duplicate_name} = E ->
                    _ = tailscale_helper:unlisten(Port),
                    E;
                {error, Reason} ->
                    _ = tailscale_helper:unlisten(Port),
                    {error, {tailnet_epmd, Reason}}
            end;
        {error, Reason} ->
            {error, {tailnet_listen, Reason}}
    end.

-spec accept(#listener{}) -> pid().
accept(#listener{port = Port}) ->
    Kernel = self(),
    Pid = spawn_opt(?MODULE, accept_loop, [Kernel, Port], [link, {priority, max}]),
    ok = tailscale_helper:set_acceptor(Port, Pid),
    Pid.

-spec accept_loop(pid(), 1..65535) -> no_return().
accept_loop(Kernel, Port) ->
    receive
        {tailscale_accept, Socket, Peer} ->
            put({peer, Socket}, Peer),
            Kernel ! {accept, self(), Socket, ?FAMILY, ?PROTOCOL},
            controller(Kernel, Socket, Peer),
            erase({peer, Socket}),
            accept_loop(Kernel, Port)
    end.

controller(Kernel, Socket, Peer) ->
    receive
        {Kernel, controller, Pid} ->
            case gen_tcp:controlling_process(Socket, Pid) of
                ok -> Pid ! {self(), controller, Peer};
                {error, _} -> gen_tcp:close(Socket)
            end;
        {Kernel, unsupported_protocol} ->
            exit(unsupported_protocol)
    end.

-spec accept_connection(pid(), inet:socket(), node(), list(), non_neg_integer()) -> pid().
accept_connection(AcceptPid, Socket, MyNode, Allowed, SetupTime) ->
    spawn_opt(?MODULE, do_accept, [self(), AcceptPid, Socket, MyNode, Allowed, SetupTime],
              dist_util:net_ticker_spawn_options()).

-spec do_accept(pid(), pid(), inet:socket(), node(), list(), non_neg_integer()) -> no_return().
do_accept(Kernel, AcceptPid, Socket, MyNode, Allowed, SetupTime) ->
    receive
        {AcceptPid, controller, Peer} ->
            Timer = dist_util:start_timer(SetupTime),
            %% The handshake's framing; a TCP listener would have passed it
            %% on to the accepted socket.
            ok = inet:setopts(Socket, [{packet, 2}]),
            HSData = (hs_data(Socket, peer_address(Peer)))#hs_data{
                       kernel_pid = Kernel,
                       this_node = MyNode,
                       timer = Timer,
                       this_flags = 0,
                       allowed = Allowed},
            dist_util:handshake_other_started(HSData)
    end.

-spec setup(node(), normal | hidden, node(), shortnames | longnames, non_neg_integer()) -> pid().
setup(Node, Type, MyNode, LongOrShortNames, SetupTime) ->
    spawn_opt(?MODULE, do_setup, [self(), Node, Type, MyNode, LongOrShortNames, SetupTime],
              dist_util:net_ticker_spawn_options()).

-spec do_setup(pid(), node(), normal | hidden, node(), shortnames | longnames,
               non_neg_integer()) -> no_return().
do_setup(Kernel, Node, Type, MyNode, LongOrShortNames, SetupTime) ->
    Timer = dist_util:start_timer(SetupTime),
    {Name, Host} = split_node(Node, LongOrShortNames),
    %% A node that does not listen (-dist_listen false) joins the tailnet
    %% on its first connection.
    {_, MyHost} = split_node(MyNode, LongOrShortNames),
    ok =:= tailscale_helper:start(MyHost) orelse setup_failed(Node, {tailnet, not_started}),
    TimeoutMs = max(1000, SetupTime),
    case tailscale_helper:port_please(Name, Host, TimeoutMs) of
        {ok, Port, Version} ->
            dist_util:reset_timer(Timer),
            case tailscale_helper:dial(Host, Port, TimeoutMs) of
                {ok, Socket, Peer} ->
                    ok = inet:setopts(Socket, [{packet, 2}]),
                    HSData = (hs_data(Socket, peer_address(Peer)))#hs_data{
                               kernel_pid = Kernel,
                               other_node = Node,
                               this_node = MyNode,
                               timer = Timer,
                               this_flags = 0,
                               other_version = Version,
                               request_type = Type},
                    dist_util:handshake_we_started(HSData);
                {error, {not_allowed, _, Peer}} ->
                    setup_failed(Node, {not_allowed, Host, who(Peer)});
                {error, Reason} ->
                    setup_failed(Node, {tailnet_dial, Host, Port, Reason})
            end;
        {error, {not_allowed, _, Peer}} ->
            %% The name resolves only to a device this node's policy does
            %% not admit; the helper sent it nothing.
            setup_failed(Node, {not_allowed, Host, who(Peer)});
        {error, Reason} ->
            setup_failed(Node, {tailnet_epmd, Host, Reason})
    end.

%% The identity of a refused device, for the log.
who(Peer) ->
    maps:from_list([{K, maps:get(atom_to_binary(K), Peer, Default)}
                    || {K, Default} <- [{user, <<>>}, {node, <<>>}, {dns_name, <<>>},
                                        {tags, []}, {ips, []}]]).

%% net_kernel says only `pang'; the log says why.
-spec setup_failed(node(), term()) -> no_return().
setup_failed(Node, Reason) ->
    logger:notice("tailscale_dist: cannot connect to ~p: ~tp", [Node, Reason]),
    ?shutdown2(Node, Reason).

%% Distribution stops (net_kernel:stop/0): the node leaves its host's
%% tailnet EPMD and stops listening, as it would with TCP. The helper
%% stays, so the node can start distribution again.
-spec close(#listener{}) -> ok.
close(#listener{port = Port, name = Name}) ->
    _ = tailscale_helper:unregister_node(Name),
    _ = tailscale_helper:unlisten(Port),
    ok.

-spec is_node_name(node()) -> boolean().
is_node_name(Node) when is_atom(Node) ->
    case string:split(atom_to_list(Node), "@", all) of
        [Name, Host] when Name =/= [], Host =/= [] -> true;
        _ -> false
    end;
is_node_name(_) ->
    false.

-spec setopts(inet:socket(), [gen_tcp:option()]) -> ok | {error, term()}.
setopts(Socket, Opts) ->
    inet_tcp_dist:setopts(Socket, Opts).

-spec getopts(inet:socket(), [atom()]) -> {ok, list()} | {error, term()}.
getopts(Socket, Opts) ->
    inet_tcp_dist:getopts(Socket, Opts).

%% The tailnet identity of a connected node, as the tailnet vouches for it:
%% its owner (user login; empty for a tagged node), MagicDNS name, tags and
%% addresses, looked up from the connection's tailnet address. For
%% authorizing per node: the cookie only says a node knows a secret.
-spec identity(node()) ->
          {ok, #{user := binary(), node := binary(), dns_name := binary(),
                 tags := [binary()], ips := [binary()], addr := binary()}}
          | {error, not_connected | not_tailscale | term()}.
identity(Node) ->
    case net_kernel:node_info(Node) of
        {ok, Info} ->
            case proplists:get_value(address, Info) of
                #net_address{address = {IP, Port}, protocol = ?PROTOCOL} when is_tuple(IP) ->
                    case tailscale_helper:whois(format_address(IP, Port)) of
                        {ok, Id} ->
                            {ok, #{user => maps:get(<<"user">>, Id, <<>>),
                                   node => maps:get(<<"node">>, Id, <<>>),
                                   dns_name => maps:get(<<"dns_name">>, Id, <<>>),
                                   tags => maps:get(<<"tags">>, Id, []),
                                   ips => maps:get(<<"ips">>, Id, []),
                                   addr => maps:get(<<"addr">>, Id, <<>>)}};
                        {error, _} = E -> E
                    end;
                _ ->
                    {error, not_tailscale}
            end;
        {error, _} ->
            {error, not_connected}
    end.

%%% Internal

%% The handshake's view of a connection. The socket is one end of a
%% socketpair, so TCP options (nodelay) do not apply; the tailnet side's
%% TCP is the helper's business.
hs_data(Socket, Address) ->
    #hs_data{
       socket = Socket,
       f_send = fun inet_tcp:send/2,
       f_recv = fun inet_tcp:recv/3,
       f_setopts_pre_nodeup =
           fun(S) -> inet:setopts(S, [{active, false}, {packet, 4}]) end,
       f_setopts_post_nodeup =
           fun(S) -> inet:setopts(S, [{active, true}, {deliver, port}, {packet, 4}, binary,
                                      {buffer, ?RECV_BUFFER}]) end,
       f_getll = fun inet:getll/1,
       f_address =
           fun(_, Node) ->
                   case string:split(atom_to_list(Node), "@") of
                       [_, Host] ->
                           #net_address{address = Address, host = Host,
                                        protocol = ?PROTOCOL, family = ?FAMILY};
                       _ ->
                           ?shutdown(no_node)
                   end
           end,
       mf_tick = fun(S) -> inet_tcp_dist:tick(inet_tcp, S) end,
       mf_getstat = fun inet_tcp_dist:getstat/1,
       mf_setopts = fun ?MODULE:setopts/2,
       mf_getopts = fun ?MODULE:getopts/2}.

%% Name and host of a node to connect to. Short names take a bare tailnet
%% hostname, long names a MagicDNS name; the helper resolves both from the
%% tailnet's own records, never from the system resolver.
split_node(Node, LongOrShortNames) ->
    case string:split(atom_to_list(Node), "@") of
        [Name, Host] when Name =/= [], Host =/= [] ->
            Dotted = lists:member($., Host),
            case {LongOrShortNames, Dotted} of
                {shortnames, true} ->
                    error_logger:error_msg("** tailscale_dist: ~p has a dotted host, "
                                           "but this node uses short names (-sname) **~n", [Node]),
                    ?shutdown(Node);
                _ ->
                    {Name, Host}
            end;
        _ ->
            error_logger:error_msg("** tailscale_dist: illegal node name ~p **~n", [Node]),
            ?shutdown(Node)
    end.

%% "100.64.0.2:40001" as {{100,64,0,2}, 40001}; whatever the helper sent if
%% it does not parse.
peer_address(#{<<"addr">> := Addr}) when is_binary(Addr) ->
    case string:split(binary_to_list(Addr), ":", trailing) of
        [Ip, PortString] ->
            case {inet:parse_address(string:trim(Ip, both, "[]")), string:to_integer(PortString)} of
                {{ok, IP}, {Port, []}} when Port >= 0, Port =< 65535 -> {IP, Port};
                _ -> Addr
            end;
        _ -> Addr
    end;
peer_address(_) ->
    undefined.

%% "100.64.0.2:40001", or "[fd7a:115c:a1e0::2]:40001" for IPv6, as the
%% protocol writes addresses.
-spec format_address(inet:ip_address(), inet:port_number()) -> string().
format_address(IP, Port) when tuple_size(IP) =:= 8 ->
    "[" ++ inet:ntoa(IP) ++ "]:" ++ integer_to_list(Port);
format_address(IP, Port) ->
    inet:ntoa(IP) ++ ":" ++ integer_to_list(Port).

listen_address(Port) ->
    case tailscale_helper:status() of
        {ok, #{<<"self">> := #{<<"ips">> := [Ip | _]}}} ->
            {ok, IP} = inet:parse_address(binary_to_list(Ip)),
            {IP, Port};
        _ ->
            {{0, 0, 0, 0}, Port}
    end.

hidden() ->
    case init:get_argument(hidden) of
        {ok, [[] | _]} -> true;
        {ok, [["true" | _] | _]} -> true;
        _ -> false
    end.
