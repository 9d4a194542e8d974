%%% The node's link to its tsdist helper.
%%%
%%% This process owns the tailnet side of a node: it has the `tsdist
%%% serve' helper started as a port program of its own, or attaches to a
%%% running helper's control socket (both done by tailscale_helper_proc),
%%% speaks the helper's control protocol
%%% (docs/control-protocol.md) over a Unix socket, and turns every tailnet
%%% connection the helper passes (a file descriptor, over SCM_RIGHTS) into an
%%% ordinary inet-driver port with `gen_tcp:fdopen/2', so the emulator's own
%%% distribution fast path drives it.
%%%
%%% It starts before net_kernel, as the early child `tailscale_dist'
%%% declares in `childspecs/0', and goes onto the tailnet at start/1, when
%%% tailscale_dist:listen/2 knows the node's host. It is the only process
%%% that reads the control socket. Descriptors are paired with messages as
%%% the protocol requires (a FIFO of received descriptors, popped per
%%% `"fd": true' message), and every descriptor becomes a port at once: a
%%% port that nobody takes is closed, and every port's descriptor is closed
%%% when the port goes (see tailscale_fd), so no descriptor leaks.
%%%
%%% If the helper dies, this process starts it again (or reconnects to the
%%% socket it was attached to), with a pause growing from 100 ms to 5 s,
%%% and restores the node's tailnet listener and EPMD names; until then
%%% requests fail with {helper_down, Why}.
%%%
%%% Starting or attaching to the helper, the socket's path and the checks
%%% made on both ends of it (its directory, and the uid of the process
%%% listening there) are tailscale_helper_proc's. Every setting, from the
%%% `tsdist' application's environment or else the OS environment, is listed
%%% with its default in docs/configuration.md.
%%%
%%% Nothing that comes over the control socket becomes an atom: error codes
%%% map to the fixed set of the protocol (docs/control-protocol.md,
%%% section 8), and any other code to `unknown_error'.
%%%
%%% The tailnet hostname is the host part of the node name (`alpha' for
%%% `app@alpha' and for `app@alpha.example.ts.net').
-module(tailscale_helper).
-compile(warn_missing_spec).
-behaviour(gen_server).

-export([start_link/0, start/1, hostname/0, hello/0, info/0, set_policy/1, subscribe/1,
         listen/1, unlisten/1, set_acceptor/2, dial/3,
         register_node/3, unregister_node/1, port_please/3, names/2, names_info/2,
         status/0, whois/1, request/2, error_reason/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).
%% for the tests
-export([hello_exchange/2]).

-type peer() :: #{binary() => term()}.
%% A protocol error code (docs/control-protocol.md, section 8), as an atom
%% of this fixed set.
-type code() :: bad_request | too_large | hello_required | unsupported_version | unknown_op
              | not_running | unknown_host | dial_failed | timeout | port_in_use
              | not_listening | invalid_name | name_taken | not_registered | epmd_failed
              | busy | internal | not_allowed.
%% {Code, Message}: the code and the helper's explanation. not_allowed
%% adds the identity of the device the host resolved to (an identity
%% object, docs/control-protocol.md section 11; #{} if the helper sent
%% none), and a code outside the set comes as unknown_error with the code
%% as the helper spelt it.
-type proto_error() :: {code(), binary()}
                     | {not_allowed, binary(), peer()}
                     | {unknown_error, binary(), binary()}.
-export_type([peer/0, code/0, proto_error/0]).

-define(CTRL_BUF, 64).       % holds CMSG_SPACE of several descriptors
-define(MAX_FRAME, 16#1000000). % the protocol's MaxResponseSize
-define(MAX_HELLO, 65536).      % the hello answer is a few hundred bytes
-define(MAX_FDS, 1024).         % descriptors received ahead of their messages
-define(CONNECT_TIMEOUT, 10000).
-define(PROTOCOL_VERSION, 1).

%%% API

%% Brings this node onto the tailnet as device Host's first label (`alpha'
%% for "alpha" and for "alpha.example.ts.net"): starts the helper, or
%% attaches to one, and says hello. Blocks the caller, never a scheduler,
%% until the helper answers; starting again with the same host is a no-op.
-spec start(string()) -> ok | {error, term()}.
start(Host) ->
    gen_server:call(?MODULE, {start, hd(string:split(Host, "."))}, infinity).

-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], [{timeout, infinity}]).

%% The tailnet hostname of this node; undefined before start/1.
-spec hostname() -> string() | undefined.
hostname() ->
    gen_server:call(?MODULE, hostname).

%% What this node's link to the tailnet looks like: the tailnet hostname,
%% the helper's OS pid when this node started it (undefined when attached
%% to another's or while it is down), why it is down if it is, how many
%% passed connections are open, and the ports and names to restore on a
%% new helper.
-spec info() -> #{atom() => term()}.
info() ->
    gen_server:call(?MODULE, info).

%% Sends Pid `{tailscale_peers, Peers}' with the tailnet's peers now (once
%% known) and again on every change, until Pid exits or this process
%% restarts. Peers are maps as in status/0's `<<"peers">>'.
-spec subscribe(pid()) -> ok.
subscribe(Pid) ->
    gen_server:call(?MODULE, {subscribe, Pid}).

%% Replaces the helper's access policy (rules as for `allow'); returns the
%% policy now in force. It lasts until the helper exits: put lasting rules
%% in `allow'.
-spec set_policy(string() | binary()) -> {ok, binary()} | {error, proto_error()}.
set_policy(Rules) ->
    case request(#{op => set_policy, rules => to_bin(Rules)}, 15000) of
        {ok, #{<<"policy">> := P}} -> {ok, P};
        {error, _} = E -> E
    end.

%% The helper's answer to hello, as a map.
-spec hello() -> map().
hello() ->
    gen_server:call(?MODULE, hello).

%% Listens on a tailnet port (0: any) and returns the port. Accepted
%% connections go to the process named with set_acceptor/2.
-spec listen(0..65535) -> {ok, 1..65535} | {error, proto_error()}.
listen(Port) ->
    case request(#{op => listen, port => Port, timeout_ms => tailscale_helper_proc:up_timeout()}, tailscale_helper_proc:up_timeout() + 5000) of
        {ok, #{<<"port">> := P}} -> {ok, P};
        {error, _} = E -> E
    end.

%% Stops listening on a tailnet port.
-spec unlisten(1..65535) -> ok | {error, proto_error()}.
unlisten(Port) ->
    case request(#{op => unlisten, port => Port}, 15000) of
        {ok, _} -> ok;
        {error, _} = E -> E
    end.

%% Sends connections accepted on Port to Pid as
%% `{tailscale_accept, Socket, Peer}', Socket owned by Pid.
-spec set_acceptor(1..65535, pid()) -> ok.
set_acceptor(Port, Pid) ->
    gen_server:call(?MODULE, {set_acceptor, Port, Pid}).

%% Opens a tailnet connection; the socket is owned by the caller.
-spec dial(string() | binary(), 1..65535, pos_integer()) ->
          {ok, inet:socket(), peer()} | {error, proto_error()}.
dial(Host, Port, TimeoutMs) ->
    request(#{op => dial, host => to_bin(Host), port => Port, timeout_ms => TimeoutMs},
            TimeoutMs + 5000).

%% Registers Name on this host's tailnet EPMD until unregister_node/1 or
%% the end of this process (a restarted helper gets it again).
-spec register_node(string() | atom(), 1..65535, boolean()) ->
          {ok, pos_integer()} | {error, duplicate_name | proto_error()}.
register_node(Name, Port, Hidden) ->
    case request(#{op => register, name => to_bin(Name), port => Port, hidden => Hidden}, 15000) of
        {ok, #{<<"creation">> := Creation}} -> {ok, Creation};
        {error, {name_taken, _}} -> {error, duplicate_name};
        {error, _} = E -> E
    end.

%% Ends a registration made with register_node/3.
-spec unregister_node(string() | atom()) -> ok | {error, proto_error()}.
unregister_node(Name) ->
    case request(#{op => unregister, name => to_bin(Name)}, 15000) of
        {ok, _} -> ok;
        {error, _} = E -> E
    end.

%% Asks the tailnet EPMD of Host for node Name.
-spec port_please(string() | atom(), string() | binary(), pos_integer()) ->
          {ok, 1..65535, non_neg_integer()} | {error, proto_error()}.
port_please(Name, Host, TimeoutMs) ->
    case request(#{op => port_please, name => to_bin(Name), host => to_bin(Host),
                   timeout_ms => TimeoutMs}, TimeoutMs + 5000) of
        {ok, #{<<"port">> := Port, <<"highest_version">> := Version}} -> {ok, Port, Version};
        {error, _} = E -> E
    end.

%% Lists the nodes registered on the tailnet EPMD of Host.
-spec names(string() | binary(), pos_integer()) ->
          {ok, [{string(), 1..65535}]} | {error, proto_error()}.
names(Host, TimeoutMs) ->
    case names_info(Host, TimeoutMs) of
        {ok, Names, _Dropped} -> {ok, Names};
        {error, _} = E -> E
    end.

%% names/2, and how many entries were left out: by the helper (names that
%% are not EPMD names, or beyond its limit; its `dropped') and here
%% (entries that are not a UTF-8 name and a port).
-spec names_info(string() | binary(), pos_integer()) ->
          {ok, [{string(), 1..65535}], non_neg_integer()} | {error, proto_error()}.
names_info(Host, TimeoutMs) ->
    case request(#{op => names, host => to_bin(Host), timeout_ms => TimeoutMs}, TimeoutMs + 5000) of
        {ok, #{<<"names">> := Names} = Result} when is_list(Names) ->
            Good = [{L, P} || #{<<"name">> := N, <<"port">> := P} <- Names,
                              is_binary(N), is_integer(P), P > 0, P < 65536,
                              L <- [unicode:characters_to_list(N)], is_list(L)],
            Dropped = case maps:get(<<"dropped">>, Result, 0) of
                          D when is_integer(D), D >= 0 -> D;
                          _ -> 0
                      end,
            {ok, Good, Dropped + length(Names) - length(Good)};
        {ok, Other} ->
            {error, {internal, iolist_to_binary(io_lib:format("names: unexpected result ~0tP", [Other, 8]))}};
        {error, _} = E -> E
    end.

%% The helper's view of the tailnet.
-spec status() -> {ok, map()} | {error, proto_error()}.
status() ->
    request(#{op => status}, 15000).

%% The tailnet identity behind an address ("IP" or "IP:port").
-spec whois(string() | binary()) -> {ok, peer()} | {error, proto_error()}.
whois(Addr) ->
    request(#{op => whois, addr => to_bin(Addr)}, 15000).

%% Sends one control-protocol request (a map without id) and waits for its
%% result. A result that brings a descriptor comes back as
%% {ok, Socket, Peer}.
-spec request(map(), timeout()) ->
          {ok, map()} | {ok, inet:socket(), peer()} | {error, proto_error()}.
request(Req, Timeout) ->
    try gen_server:call(?MODULE, {request, Req}, Timeout)
    catch exit:{noproc, _} -> {error, {helper_not_running, ?MODULE}};
          exit:{timeout, _} -> {error, {timeout, maps:get(op, Req)}}
    end.

%%% gen_server

-define(MIN_BACKOFF, 100).
-define(MAX_BACKOFF, 5000).

-record(st, {
    sock :: socket:socket() | undefined,  % undefined while the helper is down
    helper :: port() | undefined,   % the helper we started, if any
    hostname :: string() | undefined,     % undefined until start/1
    hello = #{} :: map(),
    buf = <<>> :: binary(),
    fds = queue:new() :: queue:queue(integer()),
    next_id = 2 :: pos_integer(),
    pending = #{} :: #{pos_integer() => {gen_server:from() | internal, map()}},
    acceptors = #{} :: #{pos_integer() => pid()},
    fd_ports = #{} :: #{port() => integer()},  % passed connections' descriptors
    select = undefined :: term(),
    %% What to restore on a new helper: the tailnet ports listened on and
    %% the names registered through this connection.
    listens = [] :: [1..65535],
    registrations = #{} :: #{binary() => {1..65535, boolean()}},
    down = undefined :: undefined | term(),   % why the helper is gone
    subscribers = #{} :: #{pid() => reference()},  % of peers events
    peers = undefined :: undefined | [map()],     % the latest peers event
    watching = false :: boolean(),                % watch_peers sent
    backoff = ?MIN_BACKOFF :: pos_integer()
}).

%% Nothing happens until start/1: the tailnet hostname comes from the node
%% name, which net_kernel passes to tailscale_dist:listen/2 after this
%% process has started (and which net_kernel:start/1 can choose at run
%% time).
-spec init([]) -> {ok, #st{}}.
init([]) ->
    process_flag(trap_exit, true),
    {ok, #st{sock = undefined, down = not_started}}.

-spec handle_call(term(), gen_server:from(), #st{}) -> {reply, term(), #st{}} | {noreply, #st{}}.
handle_call({start, Hostname}, _From, #st{hostname = undefined} = St0) ->
    case tailscale_helper_proc:connect(Hostname) of
        {ok, Sock, Helper, Path} ->
            case hello_exchange(Sock, Path) of
                {ok, Hello} ->
                    St = St0#st{sock = Sock, helper = Helper, hostname = Hostname,
                                hello = Hello, down = undefined},
                    try {reply, ok, read_more(watch_peers(St))}
                    catch throw:{control_broken, Reason} ->
                            {reply, {error, Reason}, stop_and_forget(St)}
                    end;
                {error, Reason} ->
                    logger:error("tsdist: cannot reach the tailnet as ~s: ~tp", [Hostname, Reason]),
                    close_control(Sock),
                    tailscale_helper_proc:stop(Helper),
                    {reply, {error, Reason}, St0}
            end;
        {error, Reason} ->
            logger:error("tsdist: cannot reach the tailnet as ~s: ~tp", [Hostname, Reason]),
            {reply, {error, Reason}, St0}
    end;
handle_call({start, Hostname}, _From, #st{hostname = Hostname} = St) ->
    {reply, ok, St};
handle_call({start, Hostname}, _From, St) ->
    {reply, {error, {already_started_as, St#st.hostname, Hostname}}, St};
handle_call(hostname, _From, St) ->
    {reply, St#st.hostname, St};
handle_call(info, _From, St) ->
    OsPid = tailscale_helper_proc:os_pid(St#st.helper),
    {reply, #{hostname => St#st.hostname, helper_os_pid => OsPid, down => St#st.down,
              connections => map_size(St#st.fd_ports),
              listens => St#st.listens, registrations => maps:keys(St#st.registrations)}, St};
handle_call({subscribe, Pid}, _From, St) ->
    Subs = case maps:is_key(Pid, St#st.subscribers) of
               true -> St#st.subscribers;
               false -> (St#st.subscribers)#{Pid => erlang:monitor(process, Pid)}
           end,
    [Pid ! {tailscale_peers, St#st.peers} || St#st.peers =/= undefined],
    St1 = St#st{subscribers = Subs},
    try {reply, ok, watch_peers(St1)}
    catch throw:{control_broken, Reason} -> {reply, ok, helper_down(Reason, St1)}
    end;
handle_call(hello, _From, St) ->
    {reply, St#st.hello, St};
handle_call({set_acceptor, Port, Pid}, _From, St) ->
    {reply, ok, St#st{acceptors = (St#st.acceptors)#{Port => Pid}}};
handle_call({request, _}, _From, #st{sock = undefined, down = Why} = St) ->
    {reply, {error, {helper_down, Why}}, St};
handle_call({request, Req}, From, St) ->
    case send_request(From, Req, St) of
        {ok, St1} -> {noreply, St1};
        {error, Reason} -> {reply, {error, {control_socket, Reason}}, St}
    end.

-spec handle_cast(term(), #st{}) -> {noreply, #st{}}.
handle_cast(_Msg, St) ->
    {noreply, St}.

-spec handle_info(term(), #st{}) -> {noreply, #st{}} | {stop, term(), #st{}}.
handle_info({'$socket', Sock, select, Ref}, #st{sock = Sock, select = Ref} = St) ->
    try {noreply, read_more(St#st{select = undefined})}
    catch throw:{control_broken, Reason} -> {noreply, helper_down(Reason, St)}
    end;
handle_info(reconnect, #st{sock = undefined} = St) ->
    {noreply, reconnect(St)};
handle_info({Helper, {data, {_, Line}}}, #st{helper = Helper} = St) ->
    logger:notice("~ts", [Line]),
    {noreply, St};
handle_info({Helper, {exit_status, Status}}, #st{helper = Helper} = St) ->
    {noreply, helper_down({helper_exited, Status}, St#st{helper = undefined})};
handle_info({'EXIT', Helper, Reason}, #st{helper = Helper} = St) when is_port(Helper) ->
    {noreply, helper_down({helper_exited, Reason}, St#st{helper = undefined})};
handle_info({'DOWN', _, process, Pid, _}, #st{subscribers = Subs} = St) when is_map_key(Pid, Subs) ->
    {noreply, St#st{subscribers = maps:remove(Pid, Subs)}};
handle_info({'EXIT', Port, _}, #st{fd_ports = FdPorts} = St) when is_map_key(Port, FdPorts) ->
    {Fd, Rest} = maps:take(Port, FdPorts),
    ok = tailscale_fd:close(Fd),
    {noreply, St#st{fd_ports = Rest}};
handle_info(_Msg, St) ->
    {noreply, St}.

-spec terminate(term(), #st{}) -> ok.
terminate(_Reason, St) ->
    close_control(St#st.sock),
    tailscale_helper_proc:stop(St#st.helper),
    ok.

%%% Losing and restarting the helper

%% The helper is gone (it exited, or its control socket broke). Its carried
%% connections end with it; the node's distribution sees them close at once.
%% This process restarts the helper (or, when attached to someone else's,
%% reconnects to it) with a growing pause, and restores the node's
%% listeners and EPMD registrations, so peers reach the node again.
helper_down(Reason, #st{backoff = Backoff} = St) ->
    logger:error("tsdist: lost the helper (~tp); reconnecting in ~b ms", [Reason, Backoff]),
    [gen_server:reply(From, {error, {helper_down, Reason}})
     || {From, _} <- maps:values(St#st.pending), From =/= internal],
    [tailscale_fd:close(Fd) || Fd <- queue:to_list(St#st.fds)],
    close_control(St#st.sock),
    tailscale_helper_proc:stop(St#st.helper),
    erlang:send_after(Backoff, self(), reconnect),
    St#st{sock = undefined, helper = undefined, buf = <<>>, fds = queue:new(),
          pending = #{}, select = undefined, down = Reason, watching = false,
          backoff = min(2 * Backoff, ?MAX_BACKOFF)}.

reconnect(St0) ->
    case tailscale_helper_proc:connect(St0#st.hostname) of
        {ok, Sock, Helper, Path} ->
            case hello_exchange(Sock, Path) of
                {ok, Hello} ->
                    St = St0#st{sock = Sock, helper = Helper, hello = Hello, down = undefined},
                    try
                        {noreply, St1} = restore(St),
                        St2 = watch_peers(St1),
                        logger:notice("tsdist: helper back; restoring ports ~w and names ~ts",
                                      [St#st.listens, lists:join(", ", maps:keys(St#st.registrations))]),
                        read_more(St2#st{backoff = ?MIN_BACKOFF})
                    catch throw:{control_broken, Reason} -> helper_down(Reason, St)
                    end;
                {error, Reason} ->
                    helper_down(Reason, St0#st{sock = Sock, helper = Helper})
            end;
        {error, Reason} ->
            helper_down(Reason, St0)
    end.

%% Registers the names first, so a peer that finds the port finds the name.
restore(St0) ->
    Regs = [#{op => register, name => N, port => P, hidden => H}
            || {N, {P, H}} <- maps:to_list(St0#st.registrations)],
    Listens = [#{op => listen, port => P, timeout_ms => tailscale_helper_proc:up_timeout()} || P <- St0#st.listens],
    St = lists:foldl(fun(Req, Acc) ->
                             case send_request(internal, Req, Acc) of
                                 {ok, Acc1} -> Acc1;
                                 {error, Reason} -> throw({control_broken, {control_socket, Reason}})
                             end
                     end, St0, Regs ++ Listens),
    {noreply, St}.

send_request(From, Req, #st{next_id = Id} = St) ->
    case send_frame(St#st.sock, Req#{id => Id}) of
        ok -> {ok, St#st{next_id = Id + 1, pending = (St#st.pending)#{Id => {From, Req}}}};
        {error, _} = E -> E
    end.

%% Asks the helper for peers events, once per control connection, as soon
%% as there is a subscriber and a helper.
watch_peers(#st{watching = false, sock = Sock, subscribers = Subs} = St)
  when Sock =/= undefined, map_size(Subs) > 0 ->
    case send_request(internal, #{op => watch_peers, timeout_ms => tailscale_helper_proc:up_timeout()}, St) of
        {ok, St1} -> St1#st{watching = true};
        {error, Reason} -> throw({control_broken, {control_socket, Reason}})
    end;
watch_peers(St) ->
    St.

%% Remembers what a successful request set up, to restore it on a new helper.
remember(#{op := listen}, #{<<"ok">> := true, <<"result">> := #{<<"port">> := P}}, St) ->
    St#st{listens = lists:usort([P | St#st.listens])};
remember(#{op := register, name := N, port := P, hidden := H}, #{<<"ok">> := true}, St) ->
    St#st{registrations = (St#st.registrations)#{N => {P, H}}};
remember(#{op := unregister, name := N}, #{<<"ok">> := true}, St) ->
    St#st{registrations = maps:remove(N, St#st.registrations)};
remember(#{op := unlisten, port := P}, #{<<"ok">> := true}, St) ->
    St#st{listens = lists:delete(P, St#st.listens),
          acceptors = maps:remove(P, St#st.acceptors)};
remember(_, _, St) ->
    St.

%% A start that failed after connecting: back to the state before it.
stop_and_forget(St) ->
    close_control(St#st.sock),
    tailscale_helper_proc:stop(St#st.helper),
    St#st{sock = undefined, helper = undefined, hostname = undefined, down = not_started}.

close_control(undefined) -> ok;
close_control(Sock) -> _ = socket:close(Sock), ok.

%%% Reading the control socket

%% Reads whatever is there, handles every complete message, and arms a
%% select for the rest.
read_more(St) ->
    case socket:recvmsg(St#st.sock, 0, ?CTRL_BUF, [], nowait) of
        {ok, Msg} ->
            read_more(handle_msg(Msg, St));
        {select, {select_info, _, Ref}} ->
            St#st{select = Ref};
        {error, Reason} ->
            throw({control_broken, {control_socket, Reason}})
    end.

handle_msg(#{iov := Iov} = Msg, St) ->
    case lists:member(ctrunc, maps:get(flags, Msg, [])) of
        true -> throw({control_broken, descriptors_lost});
        false -> ok
    end,
    Fds = lists:foldl(fun(Fd, Q) -> queue:in(Fd, Q) end, St#st.fds,
                      [Fd || #{level := socket, type := rights, data := D} <- maps:get(ctrl, Msg, []),
                             <<Fd:32/signed-native>> <= D]),
    %% A helper sends each descriptor with its message, so only a broken
    %% one gets far ahead.
    case queue:len(Fds) > ?MAX_FDS of
        true -> throw({control_broken, {descriptors_without_messages, queue:len(Fds)}});
        false -> ok
    end,
    frames(St#st{buf = iolist_to_binary([St#st.buf | Iov]), fds = Fds}).

frames(#st{buf = <<Len:32, _/binary>>}) when Len > ?MAX_FRAME ->
    throw({control_broken, {frame_too_large, Len}});
frames(#st{buf = <<Len:32, Payload:Len/binary, Rest/binary>>} = St) ->
    case tailscale_json:decode(Payload) of
        {ok, Msg} when is_map(Msg) ->
            frames(dispatch(Msg, St#st{buf = Rest}));
        Other ->
            throw({control_broken, {bad_message, Other}})
    end;
frames(St) ->
    St.

%% Every message that announces a descriptor takes the oldest one received.
take_fd(#{<<"fd">> := true}, St) ->
    case queue:out(St#st.fds) of
        {{value, Fd}, Q} -> fd_socket(Fd, St#st{fds = Q});
        {empty, _} -> throw({control_broken, missing_descriptor})
    end;
take_fd(_, St) ->
    {none, St}.

%% The port never closes its descriptor (see tailscale_fd), so this process
%% stays linked to the port (see give/2) and closes the descriptor once the
%% port is gone.
fd_socket(Fd, St) ->
    case gen_tcp:fdopen(Fd, [local, list, {active, false}]) of
        {ok, S} ->
            {S, St#st{fd_ports = (St#st.fd_ports)#{S => Fd}}};
        {error, Reason} ->
            _ = tailscale_fd:close(Fd),
            throw({control_broken, {fdopen, Fd, Reason}})
    end.

dispatch(#{<<"event">> := <<"accept">>} = Ev, St0) ->
    {Sock, St} = take_fd(Ev, St0),
    Port = maps:get(<<"listener_port">>, Ev, 0),
    case maps:find(Port, St#st.acceptors) of
        {ok, Pid} when Sock =/= none ->
            hand_over(Sock, Pid, {tailscale_accept, Sock, maps:get(<<"peer">>, Ev, #{})});
        _ ->
            close(Sock)
    end,
    St;
dispatch(#{<<"event">> := <<"peers">>, <<"peers">> := Peers}, St) ->
    [Pid ! {tailscale_peers, Peers} || Pid <- maps:keys(St#st.subscribers)],
    St#st{peers = Peers};
dispatch(#{<<"event">> := _} = Ev, St0) ->
    {Sock, St} = take_fd(Ev, St0),
    close(Sock),
    St;
dispatch(#{<<"id">> := Id} = Resp, St0) ->
    {Sock, St} = take_fd(Resp, St0),
    case maps:take(Id, St#st.pending) of
        {{internal, Req}, Pending} ->
            close(Sock),
            case Resp of
                #{<<"ok">> := true} -> ok;
                _ -> logger:error("tsdist: could not restore ~tp on the new helper: ~tp",
                                  [Req, maps:get(<<"error">>, Resp, Resp)])
            end,
            remember(Req, Resp, St#st{pending = Pending});
        {{From, Req}, Pending} ->
            reply(From, Resp, Sock),
            remember(Req, Resp, St#st{pending = Pending});
        error ->
            close(Sock),
            St
    end.

reply(From, #{<<"ok">> := true} = Resp, none) ->
    gen_server:reply(From, {ok, maps:get(<<"result">>, Resp, #{})});
reply({Pid, _} = From, #{<<"ok">> := true} = Resp, Sock) ->
    Peer = maps:get(<<"peer">>, maps:get(<<"result">>, Resp, #{}), #{}),
    case give(Sock, Pid) of
        ok -> gen_server:reply(From, {ok, Sock, Peer});
        {error, Reason} -> gen_server:reply(From, {error, {handover, Reason}})
    end;
reply(From, Resp, Sock) ->
    close(Sock),
    gen_server:reply(From, {error, error_reason(maps:get(<<"error">>, Resp, #{}))}).

%% The reason for an error object of the protocol (section 8): its code
%% as one of a fixed set of atoms, never one made from what the helper
%% sent. A response with "ok": false and no error object is `internal', as
%% in the Go client.
-spec error_reason(term()) -> proto_error().
error_reason(Err) when is_map(Err) ->
    Message = case maps:get(<<"message">>, Err, <<>>) of
                  M when is_binary(M) -> M;
                  _ -> <<>>
              end,
    case maps:get(<<"code">>, Err, <<"internal">>) of
        <<"not_allowed">> ->
            Peer = case maps:get(<<"peer">>, Err, #{}) of
                       P when is_map(P) -> P;
                       _ -> #{}
                   end,
            {not_allowed, Message, Peer};
        Code when is_binary(Code) ->
            case code(Code) of
                unknown_error -> {unknown_error, Code, Message};
                Atom -> {Atom, Message}
            end;
        _ ->
            {unknown_error, <<>>, Message}
    end;
error_reason(_) ->
    {internal, <<>>}.

code(<<"bad_request">>) -> bad_request;
code(<<"too_large">>) -> too_large;
code(<<"hello_required">>) -> hello_required;
code(<<"unsupported_version">>) -> unsupported_version;
code(<<"unknown_op">>) -> unknown_op;
code(<<"not_running">>) -> not_running;
code(<<"unknown_host">>) -> unknown_host;
code(<<"dial_failed">>) -> dial_failed;
code(<<"timeout">>) -> timeout;
code(<<"port_in_use">>) -> port_in_use;
code(<<"not_listening">>) -> not_listening;
code(<<"invalid_name">>) -> invalid_name;
code(<<"name_taken">>) -> name_taken;
code(<<"not_registered">>) -> not_registered;
code(<<"epmd_failed">>) -> epmd_failed;
code(<<"busy">>) -> busy;
code(<<"internal">>) -> internal;
code(<<"not_allowed">>) -> not_allowed;
code(_) -> unknown_error.

hand_over(Sock, Pid, Msg) ->
    case give(Sock, Pid) of
        ok -> Pid ! Msg;
        {error, _} -> ok
    end.

%% Makes Pid the socket's owner, and links this process to the port again
%% (handing it over unlinks the old owner), so the port's exit tells this
%% process to close the descriptor, whoever owns the port by then. A port
%% monitor is not enough: a port closed while its handshake failed never
%% triggers one on OTP 25.
give(Sock, Pid) ->
    case gen_tcp:controlling_process(Sock, Pid) of
        ok ->
            try link(Sock)
            catch error:noproc -> ok % already gone; its 'EXIT' is on its way
            end,
            ok;
        {error, _} = E ->
            close(Sock),
            E
    end.

close(none) -> ok;
close(Sock) -> _ = gen_tcp:close(Sock), ok.

send_frame(Sock, Map) ->
    Payload = tailscale_json:encode_to_binary(Map),
    socket:send(Sock, [<<(byte_size(Payload)):32>>, Payload]).

%%% The hello exchange

%% The first exchange on a new control socket (Path names it in errors). The answer brings no
%% descriptor, nothing else comes before it, and it is a few hundred bytes:
%% more than 64 KiB is not a helper speaking.
-spec hello_exchange(socket:socket(), file:filename()) -> {ok, map()} | {error, term()}.
hello_exchange(Sock, Path) ->
    case send_frame(Sock, #{id => 1, op => hello, version => ?PROTOCOL_VERSION,
                            client => <<"tailscale_dist">>}) of
        ok ->
            Deadline = erlang:monotonic_time(millisecond) + ?CONNECT_TIMEOUT,
            case recv_frame(Sock, Path, <<>>, Deadline) of
                {ok, #{<<"id">> := 1, <<"ok">> := true, <<"result">> := Hello}} when is_map(Hello) ->
                    {ok, Hello};
                {ok, #{<<"ok">> := false} = Resp} ->
                    {error, {hello, Path, error_reason(maps:get(<<"error">>, Resp, #{}))}};
                {ok, _Other} ->
                    {error, {hello, Path, bad_answer}};
                {error, _} = E ->
                    E
            end;
        {error, Reason} ->
            {error, {hello, Path, Reason}}
    end.

recv_frame(Sock, Path, Buf, Deadline) ->
    case Buf of
        <<Len:32, _/binary>> when Len > ?MAX_HELLO ->
            {error, {hello, Path, {too_large, Len}}};
        <<Len:32, Payload:Len/binary, _/binary>> ->
            case tailscale_json:decode(Payload) of
                {ok, Msg} when is_map(Msg) -> {ok, Msg};
                {ok, _} -> {error, {hello, Path, bad_answer}};
                {error, Reason} -> {error, {hello, Path, {bad_json, Reason}}}
            end;
        _ when byte_size(Buf) > ?MAX_HELLO + 4 ->
            {error, {hello, Path, {too_large, byte_size(Buf)}}};
        _ ->
            Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
            case socket:recv(Sock, 0, Left) of
                {ok, Data} -> recv_frame(Sock, Path, <<Buf/binary, Data/binary>>, Deadline);
                {error, Reason} -> {error, {hello, Path, Reason}}
            end
    end.

%%% Internal

to_bin(B) when is_binary(B) -> B;
to_bin(A) when is_atom(A) -> atom_to_binary(A, utf8);
to_bin(L) when is_list(L) -> unicode:characters_to_binary(L).
