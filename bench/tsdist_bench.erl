%%% The benchmark harness: the same workloads over every carrier, in one
%%% interleaved run on one machine (bench/bench.sh runs it; `make bench').
%%%
%%% Carriers: inet_tcp_dist on loopback, inet_tls_dist on loopback with
%%% mutual certificate verification, tailscale_dist over the offline
%%% tailnet, raw tsnet Go to Go between two helper processes
%%% (bench/tsnetbench), and a BEAM node to a Go node over the tailnet
%%% (ergonode, run as test/ergoprobe; see run_ergo/3). Each repeat runs
%%% every carrier once, in an order rotated per repeat, so slow drift of a
%%% noisy machine spreads over all of them; the report gives medians with
%%% min and max over the repeats.
%%%
%%% Per pair of fresh nodes A and B: boot (peer start until distribution is
%%% up: for tailscale_dist that includes the helper reaching Running),
%%% connection set-up (A's first net_adm:ping of B), ping round trip (a
%%% 64-byte message to a process on B and back: median and p99), 64-byte
%%% messages per second and 1 MiB messages in MB/s (one sender on A, one
%%% receiver on B, timed until B has them all), and resident memory of A's
%%% BEAM and helper right after the transfers, and of the helper again 5 s
%%% later, at rest. Then full-mesh formation for 2, 4
%%% and 8 fresh nodes (twice each per repeat): every node connects to every
%%% other at once, timed until each sees all others. After the repeats, for
%%% tailscale_dist, a cluster's recovery from restarts (run_rejoins/2).
%%%
%%% This module is the orchestrator, on a node of its own that is not
%%% distributed; what the benchmark's nodes run (the echo and sink
%%% processes, the timed loops) is tsdist_bench_peer, called on them with
%%% peer:call/5.
%%%
%%% The environment sets it up (bench/bench.sh documents it); it writes
%%% results.json and results.tsv to BENCH_OUT, and prints a summary.
-module(tsdist_bench).

-export([main/0]).

-define(COOKIE, "tsdist_bench_cookie").
-define(CALL_TIMEOUT, 180000).

%%% The orchestrator

-spec main() -> no_return().
main() ->
    Code = try run() of
               ok -> 0;
               {failed, N} -> io:format("~b runs failed~n", [N]), 1
           catch C:R:S ->
                   io:format("bench: ~p:~tp~n~tp~n", [C, R, S]),
                   2
           end,
    halt(Code).

run() ->
    O = opts(),
    Work = string:trim(os:cmd("mktemp -d /tmp/tsdist-bench-XXXXXX")),
    put(work, Work),
    Carriers = [C || C <- carriers(O), lists:member(maps:get(base, C), maps:get(carriers, O))],
    io:format("bench: carriers ~s; ~b repeats; mesh ~w; work dir ~s~n",
              [lists:join(", ", [maps:get(id, C) || C <- Carriers]), maps:get(repeats, O),
               maps:get(mesh, O), Work]),
    NeedsTailnet = lists:any(fun(C) -> maps:get(tailnet, C) end, Carriers),
    Devnet = case NeedsTailnet of
                 true -> start_devnet(O, Work);
                 false -> undefined
             end,
    Ctx = O#{work => Work, url => devnet_url(Devnet),
             tls_conf => case lists:any(fun(C) -> maps:get(base, C) =:= "tls" end, Carriers) of
                             true -> tls_certs(Work);
                             false -> undefined
                         end},
    T0 = erlang:monotonic_time(millisecond),
    put(started, calendar:system_time_to_rfc3339(erlang:system_time(second), [{offset, "Z"}, {time_designator, $ }])),
    put(load_start, loadavg()),
    Samples = try
                  lists:append(
                    [begin
                         io:format("== repeat ~b of ~b~n", [R, maps:get(repeats, O)]),
                         lists:append([run_carrier(C, R, Ctx) || C <- rotate(Carriers, R)])
                     end || R <- lists:seq(1, maps:get(repeats, O))])
                  ++ lists:append([guarded(C, 0, fun() -> run_rejoins(C, Ctx, Mode) end)
                                   || maps:get(restarts, O) > 0,
                                      #{id := "tailscale"} = C <- Carriers,
                                      Mode <- rejoin_modes(O)])
              after
                  stop_devnet(Devnet),
                  os:cmd("rm -rf " ++ Work)
              end,
    Secs = (erlang:monotonic_time(millisecond) - T0) div 1000,
    write_results(O, Carriers, Samples, Secs),
    case [S || #{metric := error} = S <- Samples] of
        [] -> ok;
        Errors -> {failed, length(Errors)}
    end.

opts() ->
    Quick = env("BENCH_QUICK", "0") =:= "1",
    Repeats = list_to_integer(env("BENCH_REPEATS", case Quick of true -> "1"; false -> "5" end)),
    Mesh = [list_to_integer(N) || N <- string:lexemes(env("BENCH_MESH", case Quick of true -> "2"; false -> "2,4,8" end), ","),
                                  N =/= "none"],
    Carriers = string:lexemes(env("BENCH_CARRIERS", "tcp,tls,tailscale,tsnet,ergo"), ","),
    Root = env("BENCH_ROOT", element(2, file:get_cwd())),
    #{quick => Quick, repeats => Repeats, mesh => Mesh, carriers => Carriers, root => Root,
      out => env("BENCH_OUT", filename:join(Root, "bench/out")),
      bench_ebin => env("BENCH_EBIN", filename:join(Root, "_build/bench")),
      %% meshes of each size per repeat, and trials of each kind of
      %% restart (see run_rejoins/2)
      %% the real libcluster and Elixir, for the restart trials with
      %% Cluster.Strategy.Tailscale (bench.sh builds it from ../shared/vendor)
      libcluster_ebin => env("BENCH_LIBCLUSTER_EBIN", ""),
      elixir_ebins => string:lexemes(env("BENCH_ELIXIR_EBINS", ""), " "),
      mesh_rounds => list_to_integer(env("BENCH_MESH_ROUNDS", case Quick of true -> "1"; false -> "2" end)),
      restarts => list_to_integer(env("BENCH_RESTARTS", case Quick of true -> "1"; false -> "10" end)),
      pings => case Quick of true -> 200; false -> 2000 end,
      msgs => case Quick of true -> 5000; false -> 200000 end,
      mibs => case Quick of true -> 4; false -> 64 end,
      %% how long after the transfers the memory "at rest" is read
      rest => case Quick of true -> 200; false -> 5000 end}.

env(Var, Default) ->
    case os:getenv(Var) of
        false -> Default;
        "" -> Default;
        V -> V
    end.

%% Every carrier the harness knows. BENCH_VARIANT=LABEL=DIR adds
%% tailscale_dist and raw tsnet once more, with the helper (DIR/bin/tsdist)
%% and OTP code (DIR/_build/default/lib/tsdist/ebin) of another tree: an
%% A/B of a tuning change in one interleaved run (bench/ab.sh).
carriers(O) ->
    Root = maps:get(root, O),
    Tree = fun(Dir) -> #{helper => filename:join(Dir, "bin/tsdist"),
                         ebin => filename:join(Dir, "_build/default/lib/tsdist/ebin"),
                         tsnetbench => filename:join(Root, "bin/tsnetbench")} end,
    Here = Tree(Root),
    Variants = case env("BENCH_VARIANT", "") of
                   "" -> [];
                   V -> [{Label, Dir}] = [list_to_tuple(string:split(V, "="))], [{Label, Dir}]
               end,
    [#{id => "tcp", base => "tcp", label => "inet_tcp_dist (loopback)", tailnet => false},
     #{id => "tls", base => "tls", label => "inet_tls_dist (loopback, mutual TLS)", tailnet => false},
     (Here)#{id => "tailscale", base => "tailscale", label => "tailscale_dist (tailnet)", tailnet => true},
     (Here)#{id => "tsnet", base => "tsnet", label => "raw tsnet Go-Go (2 helpers)", tailnet => true}]
    ++ lists:append([[(Tree(Dir))#{id => "tailscale@" ++ L, base => "tailscale",
                                   label => "tailscale_dist @" ++ L, tailnet => true},
                      (Tree(Dir))#{id => "tsnet@" ++ L, base => "tsnet",
                                   label => "raw tsnet @" ++ L, tailnet => true}]
                     || {L, Dir} <- Variants])
    ++ [(Here)#{id => "ergo", base => "ergo", label => "ergo-BEAM (tailnet)", tailnet => true,
                ergoprobe => filename:join(Root, "bin/ergoprobe")}].

rotate(L, R) ->
    K = (R - 1) rem length(L),
    {A, B} = lists:split(K, L),
    B ++ A.

%%% One carrier, one repeat

run_carrier(#{base := "ergo"} = C, R, Ctx) ->
    guarded(C, R, fun() -> run_ergo(C, R, Ctx) end);
run_carrier(#{base := "tsnet"} = C, R, Ctx) ->
    guarded(C, R, fun() -> run_tsnet(C, R, Ctx) end);
run_carrier(C, R, Ctx) ->
    Pair = guarded(C, R, fun() -> run_pair(C, R, Ctx) end),
    Mesh = lists:append([guarded(C, R, fun() -> run_mesh(C, R, N, Ctx) end)
                         || N <- maps:get(mesh, Ctx), _ <- lists:seq(1, maps:get(mesh_rounds, Ctx))]),
    Pair ++ Mesh.

guarded(C, R, F) ->
    try F()
    catch Class:Reason:Stack ->
            io:format("   ~s: FAILED ~p:~tp~n   ~tp~n", [maps:get(id, C), Class, Reason, Stack]),
            [sample(C, R, error, io_lib:format("~tp", [Reason]))]
    end.

sample(C, R, Metric, Value) ->
    #{carrier => maps:get(id, C), repeat => R, metric => Metric, value => Value}.

run_pair(C, R, Ctx) ->
    Id = maps:get(id, C),
    {BootA, A, _NA} = boot(C, tag(C, R, "a"), Ctx),
    {BootB, B, NB} = boot(C, tag(C, R, "b"), Ctx),
    try
        {Setup, RttMed, RttP99, Msg64, Mib} = workloads(A, NB, rtt, stream, Ctx),
        {BeamPid, HelperPid} = call(A, pids, []),
        Busy = [{beam_rss_mb, rss_mb(BeamPid)}] ++ [{helper_rss_mb, rss_mb(HelperPid)} || HelperPid =/= undefined],
        timer:sleep(maps:get(rest, Ctx)),
        Rest = [{helper_rss_rest_mb, rss_mb(HelperPid)} || HelperPid =/= undefined],
        Ms = [{boot_ms, BootA / 1000}, {boot_ms, BootB / 1000},
              {setup_ms, Setup / 1000},
              {rtt_median_us, RttMed}, {rtt_p99_us, RttP99},
              {msg64_per_s, maps:get(msgs, Ctx) / (Msg64 / 1.0e6)},
              {mib_mb_s, maps:get(mibs, Ctx) * 1.048576 / (Mib / 1.0e6)}]
            ++ Busy ++ Rest,
        report(Id, Ms),
        [sample(C, R, M, V) || {M, V} <- Ms]
    after
        stop_node(A), stop_node(B)
    end.

%% A BEAM node (tailscale_dist) against a Go node (ergonode, run as
%% test/ergoprobe) on the tailnet: the same workloads as run_pair, against
%% the Go node's echo and counting sink. "helper" memory is the Go node's
%% (its tailnet device and ergo in one process); there is no mesh.
run_ergo(C, R, Ctx) ->
    Work = maps:get(work, Ctx),
    {BootA, A, _} = boot(C#{base := "tailscale"}, tag(C, R, "a"), Ctx),
    Host = tag(C, R, "b"),
    Go = list_to_atom("bench@" ++ Host),
    Env = [{"TS_CONTROL_URL", maps:get(url, Ctx)}, {"TS_EPHEMERAL", "1"},
           {"TS_STATE_DIR", filename:join([Work, "state", Host])}],
    Port = open_port({spawn_executable, maps:get(ergoprobe, C)},
                     [{args, ["-name", atom_to_list(Go), "-cookie", ?COOKIE]}, {env, Env},
                      exit_status, stderr_to_stdout, {line, 4096}]),
    {os_pid, GoPid} = erlang:port_info(Port, os_pid),
    try
        BootGo = await_ready(Port, Go),
        {Setup, RttMed, RttP99, Msg64, Mib} = workloads(A, Go, rtt_ergo, stream_ergo, Ctx),
        {BeamPid, _} = call(A, pids, []),
        Busy = [{beam_rss_mb, rss_mb(BeamPid)}, {helper_rss_mb, rss_mb(GoPid)}],
        timer:sleep(maps:get(rest, Ctx)),
        Ms = [{boot_ms, BootA / 1000}, {boot_ms, BootGo},
              {setup_ms, Setup / 1000},
              {rtt_median_us, RttMed}, {rtt_p99_us, RttP99},
              {msg64_per_s, maps:get(msgs, Ctx) / (Msg64 / 1.0e6)},
              {mib_mb_s, maps:get(mibs, Ctx) * 1.048576 / (Mib / 1.0e6)}]
            ++ Busy ++ [{helper_rss_rest_mb, rss_mb(GoPid)}],
        report(maps:get(id, C), Ms),
        [sample(C, R, M, V) || {M, V} <- Ms]
    after
        stop_node(A),
        stop_helper(Port)
    end.

%% Milliseconds from start to published, as test/ergoprobe reports it
%% ("ready NAME PORT MS").
await_ready(Port, Go) ->
    receive
        {Port, {data, {_, "ready " ++ Rest}}} ->
            [_, _, Ms] = string:lexemes(Rest, " "),
            float(list_to_integer(Ms));
        {Port, {data, _}} ->
            await_ready(Port, Go);
        {Port, {exit_status, S}} ->
            error({go_node_exited, Go, S})
    after 60000 ->
            error({go_node_not_ready, Go})
    end.

%% The pair workloads, from the node of peer A to node To, whose echo and
%% sink Rtt and Stream (functions of tsdist_bench_peer) reach: set-up, round
%% trips, then 64-byte and 1 MiB streams, each after a warm-up.
workloads(A, To, Rtt, Stream, Ctx) ->
    Setup = call(A, ping, [To]),
    {RttMed, RttP99} = call(A, Rtt, [To, maps:get(pings, Ctx)]),
    _ = call(A, Stream, [To, 64, maps:get(msgs, Ctx) div 10]),
    Msg64 = call(A, Stream, [To, 64, maps:get(msgs, Ctx)]),
    _ = call(A, Stream, [To, 1 bsl 20, 2]),
    Mib = call(A, Stream, [To, 1 bsl 20, maps:get(mibs, Ctx)]),
    {Setup, RttMed, RttP99, Msg64, Mib}.

run_mesh(C, R, N, Ctx) ->
    Round = integer_to_list(erlang:unique_integer([positive])),
    Tags = [tag(C, R, "m" ++ integer_to_list(N) ++ [$a + I - 1] ++ Round) || I <- lists:seq(1, N)],
    Self = self(),
    Boots = [spawn_link(fun() -> Self ! {booted, T, boot(C, T, Ctx)} end) || T <- Tags],
    Nodes = [receive {booted, T, B} -> B after 120000 -> error({boot_timeout, T}) end
             || T <- Tags],
    _ = Boots,
    try
        Names = [Name || {_, _, Name} <- Nodes],
        T0 = os:system_time(microsecond),
        Callers = [spawn_link(fun() ->
                                      Self ! {joined, P, call(P, mesh_join, [Names -- [Name], 60000])}
                              end) || {_, P, Name} <- Nodes],
        Ends = [receive {joined, P, E} -> E after 90000 -> error({mesh_timeout, N}) end
                || {_, P, _} <- Nodes],
        _ = Callers,
        Ms = (lists:max(Ends) - T0) / 1000,
        Metric = list_to_atom("mesh" ++ integer_to_list(N) ++ "_ms"),
        report(maps:get(id, C), [{Metric, Ms}]),
        [sample(C, R, Metric, Ms)]
    after
        [stop_node(P) || {_, P, _} <- Nodes]
    end.

%% Restarts in a running cluster, as an operator or a crash makes them:
%% three BEAM nodes (tailscale_dist, each running tailscale_discovery with
%% its defaults but a hostname pattern) and a Go node (test/ergoprobe), all
%% persistent (restarted on their state, as a service would be). Then
%% Trials times, in turn:
%%
%%   rejoin_helper_ms  node c's helper is killed (SIGKILL); its BEAM starts
%%                     a new one on the same state;
%%   rejoin_node_ms    node c is stopped (its BEAM and helper exit) and
%%                     started again on its state, as a new BEAM;
%%   rejoin_go_ms      the Go node is stopped and started again on its state;
%%
%% each timed from the restart (the kill; the start of the new BEAM or Go
%% process: its boot is included, and reported on its own as reboot_*_ms)
%% until the restarted node is in the nodes() of every other node again, as
%% each of them saw it (net_kernel:monitor_nodes). Discovery connects the
%% BEAM nodes to each other and to the Go node; nothing else reconnects.
%%
%% Mode discovery runs tailscale_discovery on the BEAM nodes; mode
%% libcluster runs the real libcluster's Cluster.Supervisor with
%% Cluster.Strategy.Tailscale (its defaults but the hostname pattern), its
%% metrics named rejoin_*_libcluster_ms.
run_rejoins(C0, Ctx, Mode) ->
    {Letter, Suffix, Start, Paths} =
        case Mode of
            discovery -> {"r", "", start_discovery, []};
            libcluster -> {"l", "_libcluster", start_libcluster,
                           [maps:get(libcluster_ebin, Ctx) | maps:get(elixir_ebins, Ctx)]}
        end,
    C = C0#{persistent => true, extra_args => lists:append([["-pa", D] || D <- Paths])},
    Trials = maps:get(restarts, Ctx),
    [Ta, Tb, Tc, Tg] = [tag(C, 0, Letter ++ S) || S <- ["a", "b", "c", "g"]],
    Pattern = "^" ++ tag(C, 0, Letter),
    BootDiscovering = fun(T) ->
                              {Ms, P, Name} = boot(C, T, Ctx),
                              ok = call(P, Start, [Pattern]),
                              {Ms, P, Name}
                      end,
    Go = list_to_atom("bench@" ++ Tg),
    StartGo = fun() -> start_go_node(C, Go, Tg, Ctx) end,
    {_, A, NA} = BootDiscovering(Ta),
    {_, B, NB} = BootDiscovering(Tb),
    Cnode = BootDiscovering(Tc),
    GoNode = StartGo(),
    State = #{a => {A, NA}, b => {B, NB}, c => Cnode, go => GoNode},
    try
        await_cluster(State, Go, 60000),
        io:format("   rejoins (~s): a cluster of 3 BEAM nodes and a Go node, ~b trial(s) of each restart~n",
                  [Mode, Trials]),
        {Samples, Final} = lists:foldl(fun(I, {Acc, St}) ->
                                               {S1, St1} = rejoin_trial(C, I, St, Go, BootDiscovering, StartGo, Suffix),
                                               {Acc ++ S1, St1}
                                       end, {[], State}, lists:seq(1, Trials)),
        put(rejoin_state, Final),
        Samples
    after
        St = case get(rejoin_state) of undefined -> State; F -> F end,
        erase(rejoin_state),
        [stop_node(P) || {_, P, _} <- [maps:get(c, St)]],
        stop_node(A), stop_node(B),
        {GoPort, _} = maps:get(go, St),
        stop_helper(GoPort)
    end.

%% The restart trials' ways of clustering: discovery always; the real
%% libcluster when bench.sh could build it.
rejoin_modes(O) ->
    case maps:get(libcluster_ebin, O) of
        "" ->
            io:format("bench: no libcluster (../shared/vendor not found): "
                      "the restart trials run with tailscale_discovery only~n"),
            [discovery];
        _ ->
            [discovery, libcluster]
    end.

rejoin_trial(C, I, St0, Go, BootDiscovering, StartGo, Suffix) ->
    Id = maps:get(id, C),
    {A, NA} = maps:get(a, St0),
    {B, NB} = maps:get(b, St0),
    {_, Cp, NC} = maps:get(c, St0),
    %% Each restart starts from the whole cluster connected: 'global'
    %% (prevent_overlapping_partitions) disconnects more than the restarted
    %% node, and discovery connects them again.
    Cluster = fun(Cn) -> await_cluster(St0#{c := {0, Cn, NC}}, Go, 30000) end,
    %% c's helper killed: its BEAM stays and starts a new helper.
    Cluster(Cp),
    {_, HelperPid} = call(Cp, pids, []),
    Watch1 = arm([{A, NC}, {B, NC}, {Cp, Go}]),
    T1 = os:system_time(microsecond),
    _ = os:cmd("kill -9 " ++ integer_to_list(HelperPid)),
    Helper = back(Watch1, T1),
    %% c stopped, then started again as a new BEAM on its state (once its
    %% helper, which exits with the BEAM, is gone).
    Cluster(Cp),
    {_, HelperPid2} = call(Cp, pids, []),
    Watch2 = arm([{A, NC}, {B, NC}]),
    stop_node(Cp),
    await_gone(HelperPid2, 200),
    downs(Watch2),
    T2 = os:system_time(microsecond),
    {Reboot, Cp2, NC} = BootDiscovering(tag_of(NC)),
    Node = back(Watch2, T2),
    %% the Go node stopped, then started again on its state.
    {GoPort, _} = maps:get(go, St0),
    Cluster(Cp2),
    Watch3 = arm([{A, Go}, {B, Go}, {Cp2, Go}]),
    stop_helper(GoPort),
    downs(Watch3),
    T3 = os:system_time(microsecond),
    {GoPort2, GoBoot} = StartGo(),
    GoBack = back(Watch3, T3),
    Metric = fun(What) -> list_to_atom("re" ++ What ++ Suffix ++ "_ms") end,
    Ms = [{Metric("join_helper"), Helper}, {Metric("join_node"), Node}, {Metric("boot_node"), Reboot / 1000},
          {Metric("join_go"), GoBack}, {Metric("boot_go"), GoBoot}],
    report(Id, Ms),
    _ = {NA, NB},
    {[sample(C, I, M, V) || {M, V} <- Ms],
     St0#{c := {Reboot, Cp2, NC}, go := {GoPort2, GoBoot}}}.

tag_of(Node) ->
    [_, Host] = string:split(atom_to_list(Node), "@"),
    Host.

%% Every BEAM node has every other and the Go node in nodes().
await_cluster(#{a := {A, NA}, b := {B, NB}, c := {_, Cp, NC}}, Go, Timeout) ->
    Deadline = erlang:monotonic_time(millisecond) + Timeout,
    Want = [{A, [NB, NC, Go]}, {B, [NA, NC, Go]}, {Cp, [NA, NB, Go]}],
    await_cluster(Want, Deadline).

await_cluster(Want, Deadline) ->
    Missing = [{P, Ns -- peer:call(P, erlang, nodes, [])} || {P, Ns} <- Want],
    case [M || {_, [_ | _]} = M <- Missing] of
        [] -> ok;
        Left ->
            erlang:monotonic_time(millisecond) < Deadline orelse error({cluster_incomplete, Left}),
            timer:sleep(50),
            await_cluster(Want, Deadline)
    end.

%% Watches on each {Peer, Node}: Peer's view of Node going down and coming
%% back (tsdist_bench_peer:watch_node/1).
arm(Pairs) ->
    [{P, N, call(P, watch_node, [N])} || {P, N} <- Pairs].

%% Waits until every watch has seen its node go down.
downs(Watches) ->
    [ok = call(P, watched, [W, down, 30000]) || {P, _, W} <- Watches],
    ok.

%% Milliseconds from T0 until the last watch saw its node back.
back(Watches, T0) ->
    Ups = [case call(P, watched, [W, up, 60000]) of
               {up, T} -> T;
               Other -> error({not_back, N, Other})
           end || {P, N, W} <- Watches],
    (lists:max(Ups) - T0) / 1000.

%% A Go node (test/ergoprobe) on the tailnet, persistent: {Port, BootMs}.
start_go_node(C, Go, Host, Ctx) ->
    Env = [{"TS_CONTROL_URL", maps:get(url, Ctx)}, {"TS_EPHEMERAL", "0"},
           {"TS_STATE_DIR", filename:join([maps:get(work, Ctx), "state", Host])}],
    Port = open_port({spawn_executable, maps:get(ergoprobe, C, filename:join(maps:get(root, Ctx), "bin/ergoprobe"))},
                     [{args, ["-name", atom_to_list(Go), "-cookie", ?COOKIE]}, {env, Env},
                      exit_status, stderr_to_stdout, {line, 4096}]),
    {Port, await_ready(Port, Go)}.

%% A short host name, unique in the run: tailnet hostnames of nodes that
%% just left may still be taken.
tag(C, R, Suffix) ->
    Short = case maps:get(id, C) of
                "tailscale" -> "t";
                "tailscale@" ++ _ -> "v";
                "tsnet" -> "g";
                "tsnet@" ++ _ -> "h";
                Other -> Other
            end,
    Short ++ integer_to_list(R) ++ Suffix.

report(Id, Ms) ->
    io:format("   ~-16s ~s~n", [Id, lists:join(" ", [io_lib:format("~s=~s", [M, fmt(V)]) || {M, V} <- Ms])]).

fmt(V) when is_float(V), V >= 100 -> integer_to_list(round(V));
fmt(V) when is_float(V) -> float_to_list(V, [{decimals, 2}]);
fmt(V) -> io_lib:format("~p", [V]).

%%% Nodes

boot(#{base := Base} = C, Tag, Ctx) when Base =:= "tcp"; Base =:= "tls" ->
    Port = free_port(),
    Name = "b" ++ integer_to_list(Port),
    Args = ["-epmd_module", "bench_epmd", "-start_epmd", "false",
            "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
            "-setcookie", ?COOKIE, "-pa", maps:get(bench_ebin, Ctx), "-kernel", "logger_level", "warning"]
        ++ case Base of
               "tls" -> ["-proto_dist", "inet_tls", "-ssl_dist_optfile", maps:get(tls_conf, Ctx)];
               "tcp" -> []
           end,
    start_peer(C, Tag, #{name => Name, host => "127.0.0.1", longnames => true, args => Args});
boot(#{base := "tailscale"} = C, Tag, Ctx) ->
    Work = maps:get(work, Ctx),
    Env = [{"TS_CONTROL_URL", maps:get(url, Ctx)},
           {"TSDIST_HELPER", maps:get(helper, C)},
           {"XDG_RUNTIME_DIR", filename:join(Work, "run")},
           {"TS_STATE_DIR", filename:join([Work, "state", Tag])},
           {"TS_EPHEMERAL", case maps:get(persistent, C, false) of true -> "0"; false -> "1" end}],
    Args = ["-proto_dist", "tailscale", "-epmd_module", "tailscale_epmd", "-start_epmd", "false",
            "-setcookie", ?COOKIE, "-pa", maps:get(ebin, C), "-pa", maps:get(bench_ebin, Ctx),
            "-kernel", "logger_level", "warning"] ++ maps:get(extra_args, C, []),
    start_peer(C, Tag, #{name => app, host => Tag, args => Args, env => Env}).

start_peer(_C, Tag, Opts0) ->
    %% BENCH_ERL_FLAGS: extra emulator flags for every node of the run
    Opts = Opts0#{args => maps:get(args, Opts0) ++ string:lexemes(env("BENCH_ERL_FLAGS", ""), " ")},
    T0 = erlang:monotonic_time(microsecond),
    case peer:start_link(Opts#{connection => standard_io, wait_boot => 90000}) of
        {ok, P, Node} ->
            unlink(P),
            {erlang:monotonic_time(microsecond) - T0, P, Node};
        {error, Reason} ->
            error({node_did_not_start, Tag, Reason})
    end.

stop_node(P) ->
    catch peer:stop(P),
    ok.

%% Runs tsdist_bench_peer:F(Args...) on the node of peer P.
call(P, F, Args) ->
    peer:call(P, tsdist_bench_peer, F, Args, ?CALL_TIMEOUT).

free_port() ->
    {ok, L} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Port} = inet:port(L),
    gen_tcp:close(L),
    Port.

rss_mb(undefined) ->
    undefined;
rss_mb(OsPid) ->
    {ok, Bin} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/status"),
    [Kb] = [list_to_integer(string:trim(V, both, " \tkB"))
            || Line <- string:split(binary_to_list(Bin), "\n", all),
               ["VmRSS", V] <- [string:split(Line, ":")]],
    Kb / 1024.

%%% Raw tsnet: two helpers and bench/tsnetbench

run_tsnet(C, R, Ctx) ->
    Work = maps:get(work, Ctx),
    [HA, HB] = [tag(C, R, S) || S <- ["a", "b"]],
    Helpers = [start_helper(C, H, Work, maps:get(url, Ctx)) || H <- [HA, HB]],
    try
        Boots = [await_running(P, H) || {P, H, _} <- Helpers],
        [{_, _, SockA}, {_, _, SockB}] = Helpers,
        Args = ["--serve-socket", SockA, "--dial-socket", SockB, "--host", HA,
                "--pings", integer_to_list(maps:get(pings, Ctx)),
                "--msgs", integer_to_list(maps:get(msgs, Ctx)),
                "--mib", integer_to_list(maps:get(mibs, Ctx))],
        Port = open_port({spawn_executable, maps:get(tsnetbench, C)},
                         [{args, Args}, exit_status, stderr_to_stdout, {line, 65536}]),
        case collect(Port, [], 240000) of
            {0, Lines} ->
                {ok, J} = tailscale_json:decode(list_to_binary(lists:last(Lines))),
                {os_pid, HelperPid} = erlang:port_info(element(1, hd(Helpers)), os_pid),
                Busy = rss_mb(HelperPid),
                timer:sleep(maps:get(rest, Ctx)),
                Ms = [{boot_ms, B} || B <- Boots]
                    ++ [{setup_ms, maps:get(<<"setup_us">>, J) / 1000},
                        {rtt_median_us, float(maps:get(<<"rtt_median_us">>, J))},
                        {rtt_p99_us, float(maps:get(<<"rtt_p99_us">>, J))},
                        {msg64_per_s, float(maps:get(<<"msg64_per_s">>, J))},
                        {mib_mb_s, float(maps:get(<<"mib_mb_s">>, J))},
                        {helper_rss_mb, Busy},
                        {helper_rss_rest_mb, rss_mb(HelperPid)}],
                report(maps:get(id, C), Ms),
                [sample(C, R, M, V) || {M, V} <- Ms];
            {Status, Lines} ->
                error({tsnetbench, Status, Lines})
        end
    after
        [stop_helper(P) || {P, _, _} <- Helpers]
    end.

start_helper(C, Host, Work, Url) ->
    Sock = filename:join(Work, Host ++ ".sock"),
    Args = ["serve", "--hostname", Host, "--control-url", Url, "--ephemeral",
            "--state-dir", filename:join([Work, "state", Host]), "--socket", Sock,
            "--exit-with-stdin"],
    Port = open_port({spawn_executable, maps:get(helper, C)},
                     [{args, Args}, exit_status, stderr_to_stdout, {line, 4096}]),
    {Port, Host, Sock}.

%% Milliseconds from start to Running, as the helper reports it.
await_running(Port, Host) ->
    receive
        {Port, {data, {_, Line}}} ->
            case re:run(Line, "running on the tailnet .* after ([0-9.]+)(ms|s|µs);",
                        [{capture, all_but_first, list}, unicode]) of
                {match, [N, "s"]} -> list_to_number(N) * 1000;
                {match, [N, "ms"]} -> float(list_to_number(N));
                {match, [N, _]} -> list_to_number(N) / 1000;
                nomatch -> await_running(Port, Host)
            end;
        {Port, {exit_status, S}} ->
            error({helper_exited, Host, S})
    after 60000 ->
            error({helper_not_running, Host})
    end.

list_to_number(S) ->
    try list_to_float(S) catch error:badarg -> float(list_to_integer(S)) end.

%% Closing its stdin stops a helper (--exit-with-stdin); wait until it has.
stop_helper(Port) ->
    OsPid = case erlang:port_info(Port, os_pid) of
                {os_pid, P} -> P;
                undefined -> undefined
            end,
    catch port_close(Port),
    await_gone(OsPid, 100).

await_gone(undefined, _) -> ok;
await_gone(_, 0) -> ok;
await_gone(OsPid, N) ->
    case filelib:is_file("/proc/" ++ integer_to_list(OsPid)) of
        true -> timer:sleep(50), await_gone(OsPid, N - 1);
        false -> ok
    end.

collect(Port, Acc, Timeout) ->
    receive
        {Port, {data, {_, Line}}} -> collect(Port, [Line | Acc], Timeout);
        {Port, {exit_status, S}} -> {S, lists:reverse(Acc)}
    after Timeout ->
            catch port_close(Port),
            {timeout, lists:reverse(Acc)}
    end.

%%% The offline tailnet and the TLS certificates

start_devnet(O, Work) ->
    UrlFile = filename:join(Work, "control-url"),
    Helper = filename:join(maps:get(root, O), "bin/tsdist"),
    Port = open_port({spawn_executable, Helper},
                     [{args, ["devnet", "--url-file", UrlFile, "--exit-with-stdin", "--same-user"]},
                      exit_status, stderr_to_stdout, {line, 4096}]),
    Url = wait_file(UrlFile, 200),
    {Port, Url}.

devnet_url(undefined) -> undefined;
devnet_url({_, Url}) -> Url.

stop_devnet(undefined) -> ok;
stop_devnet({Port, _}) -> stop_helper(Port).

wait_file(_, 0) ->
    error(no_devnet);
wait_file(File, N) ->
    case file:read_file(File) of
        {ok, B} when byte_size(B) > 0 -> string:trim(binary_to_list(B));
        _ -> timer:sleep(100), wait_file(File, N - 1)
    end.

%% A CA and one node certificate signed by it (both ends present it and
%% verify the other's against the CA; the client also checks that it names
%% the host, 127.0.0.1), made with openssl at run time.
tls_certs(Work) ->
    D = filename:join(Work, "tls"),
    ok = filelib:ensure_path(D),
    F = fun(N) -> filename:join(D, N) end,
    Cmds = ["openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2"
            " -subj /CN=tsdist-bench-ca -keyout " ++ F("ca.key") ++ " -out " ++ F("ca.pem"),
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
            " -subj /CN=127.0.0.1 -keyout " ++ F("node.key") ++ " -out " ++ F("node.csr"),
            "printf 'subjectAltName=IP:127.0.0.1,DNS:127.0.0.1,DNS:localhost\\n"
            "extendedKeyUsage=serverAuth,clientAuth\\n' > " ++ F("ext.cnf"),
            "openssl x509 -req -in " ++ F("node.csr") ++ " -CA " ++ F("ca.pem") ++ " -CAkey "
            ++ F("ca.key") ++ " -CAcreateserial -days 2 -extfile " ++ F("ext.cnf")
            ++ " -out " ++ F("node.pem")],
    [0 = cmd(C) || C <- Cmds],
    Common = [{certfile, F("node.pem")}, {keyfile, F("node.key")}, {cacertfile, F("ca.pem")},
              {verify, verify_peer}, {secure_renegotiate, true}],
    Conf = [{server, Common ++ [{fail_if_no_peer_cert, true}]},
            {client, Common}], % and the client checks the host name (127.0.0.1) too
    ok = file:write_file(F("dist.conf"), io_lib:format("~p.~n", [Conf])),
    F("dist.conf").

cmd(C) ->
    Port = open_port({spawn, C}, [exit_status, stderr_to_stdout, {line, 4096}]),
    case collect(Port, [], 30000) of
        {0, _} -> 0;
        {S, Lines} -> io:format("~s: ~p~n~s~n", [C, S, lists:join("\n", Lines)]), S
    end.

%%% Results

write_results(O, Carriers, Samples, Secs) ->
    Out = maps:get(out, O),
    ok = filelib:ensure_path(Out),
    Json = [#{carrier => list_to_binary(maps:get(carrier, S)), repeat => maps:get(repeat, S),
              metric => maps:get(metric, S), value => json_value(maps:get(value, S))}
            || S <- Samples],
    Meta = #{started => list_to_binary(string:trim(get(started), trailing, "Z")),
             load_start => get(load_start), load_end => loadavg(),
             repeats => maps:get(repeats, O), seconds => Secs, quick => maps:get(quick, O),
             mesh => maps:get(mesh, O),
             carriers => [#{id => list_to_binary(maps:get(id, C)), label => list_to_binary(maps:get(label, C))}
                          || C <- Carriers]},
    ok = file:write_file(filename:join(Out, "results.json"),
                         tailscale_json:encode_to_binary(#{meta => Meta, samples => Json})),
    Tsv = [[maps:get(carrier, S), $\t, integer_to_list(maps:get(repeat, S)), $\t,
            atom_to_list(maps:get(metric, S)), $\t, tsv_value(maps:get(value, S)), $\n]
           || S <- Samples],
    ok = file:write_file(filename:join(Out, "results.tsv"), ["carrier\trepeat\tmetric\tvalue\n" | Tsv]),
    io:format("bench: ~b samples in ~s (~b s)~n", [length(Samples), Out, Secs]).

loadavg() ->
    {ok, B} = file:read_file("/proc/loadavg"),
    iolist_to_binary(lists:join(" ", lists:sublist(string:lexemes(B, " "), 3))).

json_value(V) when is_number(V) -> V;
json_value(undefined) -> null;
json_value(V) -> unicode:characters_to_binary(io_lib:format("~ts", [V])).

tsv_value(V) when is_float(V) -> float_to_list(V, [{decimals, 3}]);
tsv_value(V) when is_integer(V) -> integer_to_list(V);
tsv_value(undefined) -> "";
tsv_value(V) -> string:replace(lists:flatten(io_lib:format("~ts", [V])), "\t", " ", all).
