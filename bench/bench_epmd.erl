%%% The benchmark's EPMD for the loopback carriers (inet_tcp_dist and
%%% inet_tls_dist): no epmd daemon to start and leave behind. A node named
%%% `b23001@127.0.0.1' listens on port 23001 and is found there; the
%%% harness picks free ports. `-epmd_module bench_epmd'.
-module(bench_epmd).

-export([start_link/0, register_node/2, register_node/3, listen_port_please/2,
         port_please/2, port_please/3, address_please/3, names/1]).

start_link() ->
    ignore.

register_node(Name, Port) ->
    register_node(Name, Port, inet).

register_node(_Name, _Port, _Family) ->
    %% A fresh creation per boot, as epmd would hand out.
    {ok, 4 + rand:uniform(16#7ffffff0)}.

listen_port_please(Name, _Host) ->
    {ok, port_of(Name)}.

port_please(Name, Host) ->
    port_please(Name, Host, infinity).

port_please(Name, _Host, _Timeout) ->
    {port, port_of(Name), 6}.

address_please(_Name, Host, Family) ->
    inet:getaddr(Host, Family).

names(_Host) ->
    {error, address}.

port_of(Name) when is_atom(Name) ->
    port_of(atom_to_list(Name));
port_of([$b | Digits]) ->
    list_to_integer(Digits).
