%%% What the Common Test suites share: the offline tailnet, and real BEAM
%%% nodes on it.
%%%
%%% start_tailnet/1 starts `tsdist devnet' (TSDIST_HELPER names the tsdist
%%% binary; `make test' sets it); start_node/3,4,5 start a node with
%%% peer(3), its supervision channel on standard I/O so that every
%%% distribution connection under test is a tailnet one, each node starting
%%% its own `tsdist serve' as a user's node would. A `{exec, {Prog, Args}}'
%%% in Config runs nodes through Prog (the OTP 27 lane's chroot); an
%%% `{env, [{Var, Value}]}' adds to their environment.
-module(tsdist_ct).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([start_tailnet/1, stop_tailnet/1,
         start_node/3, start_node/4, start_node/5,
         start_node_result/4, start_node_result/5,
         wait_until/1, wait_until/2, cookie/0, links_and_monitors/3, collect_port/3,
         node_env/2]).

-spec cookie() -> string().
cookie() ->
    "tsdist_suite_cookie".

%% Starts the offline tailnet; returns Config with helper, run_dir,
%% control_url and devnet.
-spec start_tailnet(list()) -> list().
start_tailnet(Config) ->
    Helper = case os:getenv("TSDIST_HELPER") of
                 false -> ct:fail("TSDIST_HELPER is not set: it must name the tsdist binary (make test sets it)");
                 H -> H
             end,
    %% Unix socket paths are short (108 bytes), priv_dir paths are not.
    RunDir = string:trim(os:cmd("mktemp -d /tmp/tsdist-ct-XXXXXX")),
    UrlFile = filename:join(RunDir, "control-url"),
    %% init_per_suite's process ends when it returns, and its ports with
    %% it, so a process of its own holds the devnet's port.
    Devnet = spawn(fun() ->
                       Port = open_port({spawn_executable, Helper},
                                        [{args, ["devnet", "--url-file", UrlFile, "--exit-with-stdin",
                                                 %% one user's devices: the default
                                                 %% access policy ("owner") lets
                                                 %% them reach each other
                                                 "--same-user"]},
                                         exit_status, use_stdio, stderr_to_stdout, {line, 1024}]),
                       receive stop -> port_close(Port) end
                   end),
    Url = wait_for_file(UrlFile, 100),
    ct:log("offline tailnet at ~s, helpers' sockets in ~s", [Url, RunDir]),
    [{helper, Helper}, {run_dir, RunDir}, {control_url, Url}, {devnet, Devnet} | Config].

-spec stop_tailnet(list()) -> ok.
stop_tailnet(Config) ->
    %% Closing its stdin stops the devnet (--exit-with-stdin).
    ?config(devnet, Config) ! stop,
    _ = os:cmd("rm -rf " ++ ?config(run_dir, Config)),
    ok.

-spec start_node(list(), atom(), string()) -> {pid(), node()}.
start_node(Config, Name, Host) ->
    start_node(Config, Name, Host, []).

-spec start_node(list(), atom(), string(), [string()]) -> {pid(), node()}.
start_node(Config, Name, Host, Args) ->
    start_node(Config, Name, Host, Args, false).

%% Name@Host with extra emulator Args, long names if Long; fails the test
%% case if the node does not boot. Name undefined: a node that is not
%% distributed (it can start distribution itself).
-spec start_node(list(), atom(), string(), [string()], boolean()) -> {pid(), node()}.
start_node(Config, Name, Host, Args, Long) ->
    case start_node_result(Config, Name, Host, Args, Long) of
        {ok, P, N} -> {P, N};
        {error, Reason} -> ct:fail({node_did_not_start, Name, Host, Reason})
    end.

-spec start_node_result(list(), atom(), string(), [string()]) ->
          {ok, pid(), node()} | {error, term()}.
start_node_result(Config, Name, Host, Args) ->
    start_node_result(Config, Name, Host, Args, false).

-spec start_node_result(list(), atom(), string(), [string()], boolean()) ->
          {ok, pid(), node()} | {error, term()}.
start_node_result(Config, Name, Host, Args, Long) ->
    Paths = lists:usort([filename:dirname(code:which(M)) || M <- [tailscale_dist, ?MODULE]]),
    Cookie = case lists:member("-setcookie", Args) of
                 true -> [];
                 false -> ["-setcookie", cookie()]
             end,
    Label = hd(string:split(Host, ".")),
    Opts = #{name => Name, host => Host, longnames => Long,
             connection => standard_io,
             wait_boot => 30000,
             args => ["-proto_dist", "tailscale", "-epmd_module", "tailscale_epmd",
                      "-start_epmd", "false", "-kernel", "start_pg", "true"]
                     ++ Cookie ++ lists:append([["-pa", P] || P <- Paths]) ++ Args,
             env => node_env(Config, Label)},
    Opts1 = case Name of
                undefined -> maps:without([name, host, longnames], Opts); % not distributed
                _ -> Opts
            end,
    Opts2 = case proplists:get_value(exec, Config) of
                undefined -> Opts1;
                Exec -> Opts1#{exec => Exec}
            end,
    try peer:start_link(Opts2) of
        {ok, P, N} -> unlink(P), {ok, P, N};
        {error, _} = E -> E
    catch
        exit:Reason -> {error, Reason}
    end.

%% From node Peer, against processes on nodes Monitored and Linked: a
%% monitor's 'DOWN' carries the exit reason, a link's 'EXIT' too, and an
%% unlink reaches the other side (no 'EXIT' after it). Returns what was
%% seen: {tsdist_test, linked_exit, quiet} when all is well.
-spec links_and_monitors(pid(), node(), node()) -> {term(), term(), quiet | exit_after_unlink}.
links_and_monitors(Peer, Monitored, Linked) ->
    peer:call(Peer, erlang, apply, [fun() ->
        Remote = spawn(Monitored, timer, sleep, [infinity]),
        Ref = monitor(process, Remote),
        exit(Remote, tsdist_test),
        Down = receive {'DOWN', Ref, process, Remote, R1} -> R1 after 5000 -> no_down end,
        process_flag(trap_exit, true),
        LinkedPid = spawn_link(Linked, erlang, exit, [linked_exit]),
        Exit = receive {'EXIT', LinkedPid, R2} -> R2 after 5000 -> no_exit end,
        Other = spawn(Linked, timer, sleep, [infinity]),
        link(Other),
        unlink(Other),
        exit(Other, kill),
        Quiet = receive {'EXIT', Other, _} -> exit_after_unlink after 1000 -> quiet end,
        {Down, Exit, Quiet}
    end, []], 20000).

%% The environment of a node on tailnet host Label: the offline tailnet,
%% the helper, private socket and state directories, and Config's `env'.
-spec node_env(list(), string()) -> [{string(), string()}].
node_env(Config, Label) ->
    RunDir = ?config(run_dir, Config),
    [{"TS_CONTROL_URL", ?config(control_url, Config)},
     {"TSDIST_HELPER", ?config(helper, Config)},
     {"XDG_RUNTIME_DIR", RunDir},
     {"TS_STATE_DIR", filename:join([RunDir, "state", Label])}
     | proplists:get_value(env, Config, [])].

%% The lines a port program prints, until it exits (its status) or Timeout
%% passes between two lines (timeout).
-spec collect_port(port(), [string()], timeout()) -> {integer() | timeout, [string()]}.
collect_port(Port, Acc, Timeout) ->
    receive
        {Port, {data, {_, Line}}} -> collect_port(Port, [Line | Acc], Timeout);
        {Port, {exit_status, Status}} -> {Status, lists:reverse(Acc)}
    after Timeout ->
        port_close(Port),
        {timeout, lists:reverse(Acc)}
    end.

%% Polls F for up to 5 s; fails the test case if it never holds.
-spec wait_until(fun(() -> boolean())) -> ok.
wait_until(F) ->
    wait_until(F, 100).

%% Polls F up to N times, 50 ms apart.
-spec wait_until(fun(() -> boolean()), non_neg_integer()) -> ok.
wait_until(F, 0) ->
    ?assert(F());
wait_until(F, N) ->
    case F() of
        true -> ok;
        false -> timer:sleep(50), wait_until(F, N - 1)
    end.

wait_for_file(File, 0) ->
    ct:fail({no_control_url, File});
wait_for_file(File, N) ->
    case file:read_file(File) of
        {ok, Bin} when byte_size(Bin) > 0 -> string:trim(binary_to_list(Bin));
        _ -> timer:sleep(100), wait_for_file(File, N - 1)
    end.
