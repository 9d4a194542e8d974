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
%%%
%%% start_tailnet/2 with `#{same_user => false}' gives every device a user
%%% of its own (user-N@fake-control.example.net), for tests of strangers.
%%% start_hostile_peer/3 runs test/hostilepeer, a tailnet device that lies
%%% about its EPMD and reports who reaches it; capture_log/2 copies a
%%% node's log to a file the test can read.
%%%
%%% start_headscale/3 runs a real control server instead: Headscale
%%% (TSDIST_HEADSCALE names its binary; `make test-headscale' builds it
%%% with scripts/headscale.sh) on 127.0.0.1, offline, with the DERP relay
%%% of `tsdist devnet --relay-only'; headscale/2 and headscale_json/2 run
%%% its CLI. Nodes start on it as on the offline tailnet, with their auth
%%% key, tags and policy in Config's `env'.
-module(tsdist_ct).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([start_tailnet/1, start_tailnet/2, stop_tailnet/1,
         start_hostile_peer/3, hostile_lines/1, stop_hostile_peer/1, capture_log/2, read_log/1,
         start_node/3, start_node/4, start_node/5,
         start_node_result/4, start_node_result/5,
         wait_until/1, wait_until/2, within/3, cookie/0, links_and_monitors/3, collect_port/3,
         node_env/2, start_ergo_node/3, stop_ergo_node/1]).
-export([start_headscale/3, stop_headscale/1, headscale/2, headscale_json/2,
         start_service/3, stop_service/1, free_port/0]).

-spec cookie() -> string().
cookie() ->
    "tsdist_suite_cookie".

%% Starts the offline tailnet; returns Config with helper, run_dir,
%% control_url and devnet.
-spec start_tailnet(list()) -> list().
start_tailnet(Config) ->
    start_tailnet(Config, #{same_user => true}).

%% start_tailnet/1, every device under one user if `same_user' (the
%% default access policy, "owner", then lets them all reach each other),
%% else each under a user of its own.
-spec start_tailnet(list(), #{same_user => boolean()}) -> list().
start_tailnet(Config, Opts) ->
    SameUser = case maps:get(same_user, Opts, true) of
                   true -> ["--same-user"];
                   false -> []
               end,
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
                                        [{args, ["devnet", "--url-file", UrlFile, "--exit-with-stdin"
                                                 | SameUser]},
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

%% Starts Headscale on 127.0.0.1 with Users and Policy (a policy file's text; see
%% Headscale's policy documentation) and nothing but loopback: no DERP map
%% from the Internet (a local DERP map file names the relay of `tsdist
%% devnet --relay-only'), no update checks, no log upload, MagicDNS under
%% hs.tsdist.test, its database in a run directory. Returns Config with
%% helper, run_dir and control_url as start_tailnet/1 does, and headscale
%% (its binary and config file) for headscale/2.
-spec start_headscale(list(), [string()], iodata()) -> list().
start_headscale(Config, Users, Policy) ->
    Helper = env_or_fail("TSDIST_HELPER", "the tsdist binary (make test sets it)"),
    Bin = env_or_fail("TSDIST_HEADSCALE", "the headscale binary (make test-headscale builds it)"),
    RunDir = string:trim(os:cmd("mktemp -d /tmp/tsdist-hs-XXXXXX")),
    DerpMap = filename:join(RunDir, "derp.yaml"),
    Relay = start_service(Helper, ["devnet", "--relay-only", "--derp-map-file", DerpMap],
                          filename:join(RunDir, "relay.log")),
    _ = wait_for_file(DerpMap, 100),
    Port = free_port(),
    Url = "http://127.0.0.1:" ++ integer_to_list(Port),
    Cfg = filename:join(RunDir, "headscale.yaml"),
    ok = file:write_file(Cfg, headscale_config(RunDir, Port, DerpMap)),
    T0 = erlang:monotonic_time(millisecond),
    Headscale = start_service(Bin, ["serve", "-c", Cfg], filename:join(RunDir, "headscale.log")),
    Config1 = [{helper, Helper}, {run_dir, RunDir}, {control_url, Url},
               {headscale, {Bin, Cfg}}, {services, [Headscale, Relay]} | Config],
    %% Ready once its CLI (on its Unix socket) answers.
    wait_until(fun() -> element(1, headscale(Config1, ["users", "list"])) =:= ok end, 200),
    [{ok, _} = headscale(Config1, ["users", "create", U]) || U <- Users],
    PolicyFile = filename:join(RunDir, "policy.json"),
    ok = file:write_file(PolicyFile, Policy),
    {ok, _} = headscale(Config1, ["policy", "set", "-f", PolicyFile]),
    ct:log("Headscale at ~s (ready after ~p ms), its files in ~s",
           [Url, erlang:monotonic_time(millisecond) - T0, RunDir]),
    Config1.

-spec stop_headscale(list()) -> ok.
stop_headscale(Config) ->
    [stop_service(S) || S <- ?config(services, Config)],
    _ = os:cmd("rm -rf " ++ ?config(run_dir, Config)),
    ok.

headscale_config(RunDir, Port, DerpMap) ->
    F = fun(Name) -> filename:join(RunDir, Name) end,
    io_lib:format(
      "# Headscale for the tsdist tests: 127.0.0.1 only, offline.~n"
      "server_url: http://127.0.0.1:~b~n"
      "listen_addr: 127.0.0.1:~b~n"
      "metrics_listen_addr: \"\"~n"
      "grpc_listen_addr: 127.0.0.1:0~n"
      "grpc_allow_insecure: false~n"
      "noise:~n  private_key_path: ~s~n"
      "prefixes:~n  v4: 100.64.0.0/10~n  v6: fd7a:115c:a1e0::/48~n  allocation: sequential~n"
      "derp:~n  server:~n    enabled: false~n  urls: []~n  paths: [~s]~n  auto_update_enabled: false~n"
      "disable_check_updates: true~n"
      %% Headscale's minimum: a killed ephemeral node lingers this long.
      "node:~n  ephemeral:~n    inactivity_timeout: 70s~n"
      "database:~n  type: sqlite~n  sqlite:~n    path: ~s~n    write_ahead_log: true~n"
      "log:~n  level: info~n"
      "policy:~n  mode: database~n"
      "dns:~n  magic_dns: true~n  base_domain: hs.tsdist.test~n  override_local_dns: false~n"
      "  nameservers:~n    global: []~n"
      "unix_socket: ~s~n"
      "unix_socket_permission: \"0700\"~n"
      "logtail:~n  enabled: false~n"
      "taildrop:~n  enabled: false~n",
      [Port, Port, F("noise_private.key"), DerpMap, F("db.sqlite"), F("headscale.sock")]).

%% Runs Headscale's CLI against the server start_headscale/3 started.
-spec headscale(list(), [string()]) -> {ok, string()} | {error, {integer() | timeout, string()}}.
headscale(Config, Args) ->
    {Bin, Cfg} = ?config(headscale, Config),
    Port = open_port({spawn_executable, Bin},
                     [{args, ["-c", Cfg | Args]}, exit_status, use_stdio, stderr_to_stdout,
                      {line, 65536}]),
    case collect_port(Port, [], 30000) of
        {0, Lines} -> {ok, lists:flatten(lists:join("\n", Lines))};
        {Status, Lines} -> {error, {Status, lists:flatten(lists:join("\n", Lines))}}
    end.

%% The CLI's JSON output (-o json), decoded; fails the test case if the
%% command fails.
-spec headscale_json(list(), [string()]) -> term().
headscale_json(Config, Args) ->
    case headscale(Config, Args ++ ["-o", "json"]) of
        {ok, Out} ->
            {ok, Json} = tailscale_json:decode(unicode:characters_to_binary(Out)),
            Json;
        {error, E} ->
            ct:fail({headscale, Args, E})
    end.

%% Runs Exe with Args in the background, its output appended to Log, under
%% a shell that stops it (SIGTERM, by its PID) when its standard input
%% closes: when stop_service/1 closes the port, or when this BEAM ends,
%% however it ends. A process of its own holds the port, so the caller's
%% end does not close it.
-spec start_service(string(), [string()], string()) -> pid().
start_service(Exe, Args, Log) ->
    %% (An asynchronous list's standard input is /dev/null unless
    %% redirected, hence fd 3.)
    Script = "log=$1; shift; exec 3<&0; \"$@\" </dev/null 3<&- >>\"$log\" 2>&1 & pid=$!; "
             "(while read -r _ <&3; do :; done; kill $pid 2>/dev/null) & watcher=$!; "
             "wait $pid; status=$?; kill $watcher 2>/dev/null; exit $status",
    Parent = self(),
    Holder = spawn(fun() ->
        Port = open_port({spawn_executable, "/bin/sh"},
                         [{args, ["-c", Script, "sh", Log, Exe | Args]}, exit_status, use_stdio]),
        {os_pid, OsPid} = erlang:port_info(Port, os_pid),
        Parent ! {self(), started},
        receive
            {stop, From} ->
                catch port_close(Port),
                From ! {self(), stopped, wait_gone(OsPid, 200)};
            {Port, {exit_status, Status}} ->
                ct:pal("~s exited with status ~p; its log: ~s", [Exe, Status, Log]),
                receive {stop, From} -> From ! {self(), stopped, true} end
        end
    end),
    receive {Holder, started} -> Holder end.

%% Stops a service of start_service/3 and waits (up to 10 s) for it to be
%% gone.
-spec stop_service(pid()) -> ok.
stop_service(Holder) ->
    Holder ! {stop, self()},
    receive
        {Holder, stopped, true} -> ok;
        {Holder, stopped, false} -> ct:fail({service_did_not_stop, Holder})
    after 15000 -> ct:fail({service_did_not_stop, Holder})
    end.

wait_gone(_OsPid, 0) ->
    false;
wait_gone(OsPid, N) ->
    case os:cmd("kill -0 " ++ integer_to_list(OsPid) ++ " 2>/dev/null && echo alive") of
        "alive" ++ _ -> timer:sleep(50), wait_gone(OsPid, N - 1);
        _ -> true
    end.

%% A TCP port on 127.0.0.1 that was free a moment ago.
-spec free_port() -> inet:port_number().
free_port() ->
    {ok, S} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(S),
    gen_tcp:close(S),
    Port.

env_or_fail(Var, What) ->
    case os:getenv(Var) of
        false -> ct:fail(Var ++ " is not set: it must name " ++ What);
        V -> V
    end.

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
%% A variable in Config's `env' replaces the default one.
-spec node_env(list(), string()) -> [{string(), string()}].
node_env(Config, Label) ->
    RunDir = ?config(run_dir, Config),
    Extra = proplists:get_value(env, Config, []),
    Extra ++ [D || {K, _} = D <- [{"TS_CONTROL_URL", ?config(control_url, Config)},
                                  {"TSDIST_HELPER", ?config(helper, Config)},
                                  {"XDG_RUNTIME_DIR", RunDir},
                                  {"TS_STATE_DIR", filename:join([RunDir, "state", Label])}],
                   not lists:keymember(K, 1, Extra)].

%% Starts test/hostilepeer as tailnet device Hostname with Args (see its
%% documentation) and Config's environment, and waits for its `ready'
%% line. TSDIST_HOSTILEPEER names the binary; by default it is beside the
%% helper. hostile_lines/1 returns every line it printed so far.
-spec start_hostile_peer(list(), string(), [string()]) -> pid().
start_hostile_peer(Config, Hostname, Args) ->
    Prog = case os:getenv("TSDIST_HOSTILEPEER") of
               false -> filename:join(filename:dirname(?config(helper, Config)), "hostilepeer");
               P -> P
           end,
    filelib:is_regular(Prog) orelse
        ct:fail({no_hostilepeer, Prog, "build it: go build -tags=ts_omit_peerapiserver -o bin/hostilepeer ./test/hostilepeer"}),
    Self = self(),
    Pid = spawn(fun() ->
        Port = open_port({spawn_executable, Prog},
                         [{args, ["-hostname", Hostname | Args]},
                          {env, node_env(Config, Hostname)},
                          exit_status, use_stdio, stderr_to_stdout, {line, 4096}]),
        hostile_loop(Port, Self, [])
    end),
    receive
        {hostile_ready, Pid, Line} -> ct:log("hostile peer ~s: ~s", [Hostname, Line]), Pid;
        {hostile_exited, Pid, Status, Lines} -> ct:fail({hostile_peer_did_not_start, Hostname, Status, Lines})
    after 60000 -> ct:fail({hostile_peer_did_not_start, Hostname, timeout})
    end.

hostile_loop(Port, Owner, Lines) ->
    receive
        {Port, {data, {_, "ready " ++ _ = Line}}} ->
            Owner ! {hostile_ready, self(), Line},
            hostile_loop(Port, Owner, [Line | Lines]);
        {Port, {data, {_, Line}}} ->
            hostile_loop(Port, Owner, [Line | Lines]);
        {Port, {exit_status, Status}} ->
            Owner ! {hostile_exited, self(), Status, lists:reverse(Lines)},
            hostile_exited([io_lib:format("(exited with status ~p)", [Status]) | Lines]);
        {lines, From} ->
            From ! {lines, self(), lists:reverse(Lines)},
            hostile_loop(Port, Owner, Lines);
        {stop, From} ->
            {os_pid, OsPid} = erlang:port_info(Port, os_pid),
            port_close(Port),
            From ! {stopped, self(), OsPid, lists:reverse(Lines)}
    end.

hostile_exited(Lines) ->
    receive
        {lines, From} -> From ! {lines, self(), lists:reverse(Lines)}, hostile_exited(Lines);
        {stop, From} -> From ! {stopped, self(), undefined, lists:reverse(Lines)}
    end.

%% What a hostile peer printed so far, oldest first.
-spec hostile_lines(pid()) -> [string()].
hostile_lines(Pid) ->
    Pid ! {lines, self()},
    receive {lines, Pid, Lines} -> Lines
    after 5000 -> ct:fail({hostile_peer_gone, Pid})
    end.

%% Stops a hostile peer (closing its standard input) and waits for its OS
%% process to exit; returns everything it printed.
-spec stop_hostile_peer(pid()) -> [string()].
stop_hostile_peer(Pid) ->
    Pid ! {stop, self()},
    receive
        {stopped, Pid, OsPid, Lines} ->
            ct:log("hostile peer's output:~n~s", [lists:join("\n", Lines)]),
            OsPid =:= undefined orelse wait_gone(OsPid, 200)
                orelse ct:fail({hostile_peer_still_running, OsPid}),
            Lines
    after 10000 -> ct:fail(hostile_peer_did_not_stop)
    end.

%% Copies every log event of node Peer from now on to File (a logger_std_h
%% handler, so the node needs nothing of the test's code).
-spec capture_log(pid(), file:filename()) -> ok.
capture_log(Peer, File) ->
    ok = peer:call(Peer, logger, add_handler,
                   [tsdist_ct_capture, logger_std_h,
                    #{level => all, config => #{file => File, filesync_repeat_interval => 100}}]).

%% A captured log's text so far ("" if nothing was written yet).
-spec read_log(file:filename()) -> string().
read_log(File) ->
    case file:read_file(File) of
        {ok, Bin} -> unicode:characters_to_list(Bin);
        {error, enoent} -> ""
    end.

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

%% Polls F, 50 ms apart, until it holds, and returns how many milliseconds
%% that took; fails the case, saying What and the bound, if it did not hold
%% within Ms. For a wait whose bound is part of the promise (a restarted
%% node is back within seconds, not after WireGuard's 5 s retries).
-spec within(pos_integer(), string(), fun(() -> boolean())) -> non_neg_integer().
within(Ms, What, F) ->
    T0 = erlang:monotonic_time(millisecond),
    within(T0, T0 + Ms, What, F).

within(T0, Deadline, What, F) ->
    Ok = F(),
    Now = erlang:monotonic_time(millisecond),
    if
        Ok -> Now - T0;
        Now >= Deadline -> ct:fail("~ts: not within ~b ms", [What, Deadline - T0]);
        true -> timer:sleep(50), within(T0, Deadline, What, F)
    end.

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

%% Starts test/ergoprobe, a Go node (ergonode), as node Name on its own
%% tailnet device, with Args and Config's environment (node_env/2), and
%% waits until it has published its name. TSDIST_ERGOPROBE names the
%% binary; by default it is beside the helper.
-spec start_ergo_node(list(), string(), [string()]) -> pid().
start_ergo_node(Config, Name, Args) ->
    Probe = case os:getenv("TSDIST_ERGOPROBE") of
                false -> filename:join(filename:dirname(?config(helper, Config)), "ergoprobe");
                P -> P
            end,
    [_, Host] = string:split(Name, "@"),
    Self = self(),
    Pid = spawn(fun() ->
        Port = open_port({spawn_executable, Probe},
                         [{args, ["-name", Name, "-cookie", cookie() | Args]},
                          {env, node_env(Config, Host)},
                          exit_status, use_stdio, stderr_to_stdout, {line, 4096}]),
        probe_loop(Port, Self, Name)
    end),
    receive
        {probe_ready, Pid, Line} -> ct:log("~s: ~s", [Name, Line]), Pid;
        {probe_exited, Pid, Status, Lines} -> ct:fail({probe_did_not_start, Name, Status, Lines})
    after 60000 -> ct:fail({probe_did_not_start, Name, timeout})
    end.

probe_loop(Port, Owner, Name) ->
    probe_loop(Port, Owner, Name, []).

probe_loop(Port, Owner, Name, Lines) ->
    receive
        {Port, {data, {_, "ready " ++ _ = Line}}} ->
            Owner ! {probe_ready, self(), Line},
            probe_loop(Port, Owner, Name, Lines);
        {Port, {data, {_, Line}}} ->
            probe_loop(Port, Owner, Name, lists:sublist([Line | Lines], 200));
        {Port, {exit_status, Status}} ->
            Owner ! {probe_exited, self(), Status, lists:reverse(Lines)};
        {stop, From} ->
            %% Closing its stdin stops the probe; wait for it to exit.
            {os_pid, OsPid} = erlang:port_info(Port, os_pid),
            port_close(Port),
            From ! {stopped, self(), OsPid, lists:reverse(Lines)}
    end.

%% Stops a Go node started by start_ergo_node/3 (closing its standard
%% input) and waits for its OS process to exit.
-spec stop_ergo_node(pid()) -> ok.
stop_ergo_node(Pid) ->
    Pid ! {stop, self()},
    receive
        {stopped, Pid, OsPid, Lines} ->
            ct:log("probe output:~n~s", [lists:join("\n", Lines)]),
            wait_gone(OsPid, 200) orelse ct:fail({probe_still_running, OsPid}),
            ok
    after 10000 -> ct:fail(probe_did_not_stop)
    end.
