%%% The trust boundary, both ways (issue 14), with real nodes on the offline
%%% tailnet.
%%%
%%%   * hostile EPMD: a tailnet device (test/hostilepeer) whose EPMD lists
%%%     50,000 names, or a 300-byte one: a discovering node makes fewer than
%%%     100 atoms of it, discovery keeps running (same process) and still
%%%     connects a real node that comes later, and the event is logged;
%%%   * the local socket: a squatted socket directory (another user's, or a
%%%     symbolic link) and a listener of another uid are refused at boot with
%%%     a reason naming the path and what was found, and the squatter gets
%%%     no byte (nor, for the directory, a connection);
%%%   * the auth key reaches the helper in its environment, never in any
%%%     process's command line;
%%%   * strangers (a tailnet where every device has a user of its own): a
%%%     device of another user that asks for a node's hostname is never
%%%     dialled, and the node that looks for the name gets `pang' with the
%%%     stranger's identity in its log; the successor of a killed node with
%%%     the same tag is still reached by the old name.
%%%
%%% Every refusal is checked together with a positive control in the same
%%% case, so that a node that cannot reach the tailnet at all fails the
%%% case rather than passing it.
-module(tailscale_trust_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-include_lib("kernel/include/file.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([hostile_names_flood/1, hostile_long_name/1, squatted_socket_dir/1,
         symlinked_socket_dir/1, socket_peer_other_uid/1, authkey_not_in_cmdline/1,
         stranger_takes_name/1, honest_successor/1]).

-import(tsdist_ct, [start_node/3, start_node/4, wait_until/2]).

suite() ->
    [{timetrap, {minutes, 5}}].

all() ->
    [{group, one_user}, {group, strangers}].

groups() ->
    [{one_user, [], [hostile_names_flood, hostile_long_name, squatted_socket_dir,
                     symlinked_socket_dir, socket_peer_other_uid, authkey_not_in_cmdline]},
     {strangers, [], [stranger_takes_name, honest_successor]}].

init_per_suite(Config) ->
    Config.

end_per_suite(_Config) ->
    ok.

init_per_group(one_user, Config) ->
    tsdist_ct:start_tailnet(Config);
init_per_group(strangers, Config) ->
    tsdist_ct:start_tailnet(Config, #{same_user => false}).

end_per_group(_, Config) ->
    tsdist_ct:stop_tailnet(Config).

%%% Hostile EPMD

%% 50,000 names from one host: at most 64 are taken, the atom table hardly
%% grows, and discovery goes on.
hostile_names_flood(Config) ->
    Hostile = tsdist_ct:start_hostile_peer(Config, "hostilea", ["-names", "50000"]),
    try
        hostile_discovery(Config, Hostile, "hostilea", "latea",
                          fun(Log) -> string:find(Log, "hostilea's EPMD listed") =/= nomatch end,
                          fun(_) -> ok end)
    after
        tsdist_ct:stop_hostile_peer(Hostile)
    end.

%% A 300-byte name between two good ones: the helper refuses the whole
%% answer (epmd_failed: a name `register' would not accept,
%% docs/control-protocol.md "names"), so no name of it is taken, none
%% becomes an atom, and discovery says so and goes on. (A long name in an
%% answer the helper passes is turned down by discovery itself:
%% tailscale_trust_tests:node_names_test.)
hostile_long_name(Config) ->
    Hostile = tsdist_ct:start_hostile_peer(Config, "hostileb", ["-long-name", "300"]),
    try
        Refused = fun(Log) ->
                          string:find(Log, "cannot list the nodes of hostileb") =/= nomatch andalso
                              string:find(Log, "epmd_failed") =/= nomatch
                  end,
        NoAtom = fun(P) ->
                         ?assertEqual(refused, peer:call(P, erlang, apply, [fun() ->
                             try list_to_existing_atom("ok1@hostileb") of _ -> made
                             catch error:badarg -> refused
                             end
                         end, []]))
                 end,
        hostile_discovery(Config, Hostile, "hostileb", "lateb", Refused, NoAtom),
        ?assertEqual([], [L || L <- tsdist_ct:hostile_lines(Hostile), lists:prefix("request port_please", L)])
    after
        tsdist_ct:stop_hostile_peer(Hostile)
    end.

%% A discovering node whose filter matches the hostile peer, watched over
%% several rescans; then a real node (on device Late) that it must still
%% connect. Check runs on the discovering node before it stops.
hostile_discovery(Config, Hostile, HostileHost, Late, Logged, Check) ->
    Log = filename:join(?config(priv_dir, Config), HostileHost ++ "-discovery.log"),
    Pattern = "^(" ++ HostileHost ++ "|" ++ Late ++ ")$",
    {P, N} = start_node(Config, disc, "disc" ++ HostileHost),
    try
        tsdist_ct:capture_log(P, Log),
        %% Load what a first connection attempt and the log need, so that
        %% the atoms counted are the ones discovery makes.
        pang = peer:call(P, net_adm, ping, [nobody@nowhere]),
        logger_warm_up(P),
        Before = peer:call(P, erlang, system_info, [atom_count]),
        ok = peer:call(P, application, set_env,
                       [tsdist, discovery, [{hostname_pattern, Pattern}, {rescan_ms, 1000}]]),
        {ok, _} = peer:call(P, application, ensure_all_started, [tsdist]),
        Disc = peer:call(P, erlang, whereis, [tailscale_discovery]),
        ?assert(is_pid(Disc)),
        %% positive control: the hostile host was asked, over and over
        wait_until(fun() -> count_prefix("request names", tsdist_ct:hostile_lines(Hostile)) >= 4 end, 400),
        After = peer:call(P, erlang, system_info, [atom_count]),
        ct:log("~p: atom count ~p before discovery, ~p after ~p NAMES answers of ~s",
               [N, Before, After, count_prefix("request names", tsdist_ct:hostile_lines(Hostile)),
                HostileHost]),
        ?assert(After - Before < 100),
        ?assertEqual(Disc, peer:call(P, erlang, whereis, [tailscale_discovery])),
        wait_until(fun() -> Logged(tsdist_ct:read_log(Log)) end, 100),
        %% still working: a real node that comes now is connected
        {L, LateNode} = start_node(Config, late, Late),
        try
            wait_until(fun() -> lists:member(LateNode, peer:call(P, tailscale_discovery, connected, [])) end, 300),
            ?assertEqual(Disc, peer:call(P, erlang, whereis, [tailscale_discovery])),
            ?assert(peer:call(P, erlang, system_info, [atom_count]) - Before < 100)
        after
            peer:stop(L)
        end,
        ct:log("the discovering node's log:~n~ts", [tsdist_ct:read_log(Log)]),
        Check(P)
    after
        peer:stop(P)
    end.

logger_warm_up(P) ->
    peer:call(P, logger, warning, ["tsdist test: warming up the log handlers"]),
    _ = peer:call(P, application, load, [tsdist]),
    [{module, M} = peer:call(P, code, ensure_loaded, [M])
     || M <- [tsdist_app, tailscale_discovery, supervisor, application_master, io_lib_pretty]],
    timer:sleep(200).

count_prefix(Prefix, Lines) ->
    length([L || L <- Lines, lists:prefix(Prefix, L)]).

%%% The local socket

%% $TMPDIR/tsdist-UID made by nobody, with a squatter listening where the
%% node's socket goes: the node refuses to boot, says why, and the squatter
%% sees nobody. The same directory made properly boots (positive control,
%% which also proves the $TMPDIR rule).
squatted_socket_dir(Config) ->
    Tmp = private_tmp(Config, "squat"),
    Dir = filename:join(Tmp, "tsdist-" ++ uid()),
    ok = file:make_dir(Dir),
    Squatter = squatter(filename:join(Dir, "squat.sock")),
    [] = os:cmd("chown 65534:65534 " ++ Dir ++ " && chmod 755 " ++ Dir),
    Env = socket_env(Tmp),
    try
        Expected = {error, {insecure_socket_dir, Dir, #{owner => 65534, mode => 8#755}}},
        ?assertEqual(Expected, connect_from_node(Config, Env, "squat")),
        {Status, Output} = boot(Config, Env, "app@squat"),
        ct:log("boot of app@squat (exit ~p):~n~ts", [Status, Output]),
        ?assertNotEqual(0, Status),
        ?assertNotEqual(nomatch, string:find(Output, "insecure_socket_dir")),
        ?assertNotEqual(nomatch, string:find(Output, Dir)),
        ?assertNotEqual(nomatch, string:find(Output, "owner=>65534")),
        ?assertEqual(nomatch, string:find(Output, "helper_exited")),
        ?assertEqual({0, 0}, squatter_report(Squatter)),
        %% positive controls: the squatter counts, and a proper directory boots
        {ok, S} = tailscale_helper_proc_connect_raw(filename:join(Dir, "squat.sock")),
        ok = socket:send(S, <<"x">>),
        socket:close(S),
        wait_until(fun() -> squatter_report(Squatter) =:= {1, 1} end, 100),
        [] = os:cmd("rm -rf " ++ Dir),
        {P, _} = start_node([{env, Env} | Config], app, "squat"),
        try
            ?assertMatch({ok, #{<<"self">> := #{<<"online">> := true}}},
                         peer:call(P, tailscale_helper, status, [])),
            ?assertMatch({ok, #file_info{type = other}},
                         file:read_link_info(filename:join(Dir, "squat.sock")))
        after
            peer:stop(P)
        end
    after
        stop_squatter(Squatter)
    end.

%% $TMPDIR/tsdist-UID a symbolic link to a directory of the right owner and
%% mode, with a listener there: refused as a link.
symlinked_socket_dir(Config) ->
    Tmp = private_tmp(Config, "link"),
    Real = filename:join(Tmp, "elsewhere"),
    ok = file:make_dir(Real),
    ok = file:change_mode(Real, 8#700),
    Squatter = squatter(filename:join(Real, "link.sock")),
    Dir = filename:join(Tmp, "tsdist-" ++ uid()),
    ok = file:make_symlink(Real, Dir),
    Env = socket_env(Tmp),
    try
        ?assertEqual({error, {insecure_socket_dir, Dir, #{type => symlink, owner => 0, mode => 8#777}}},
                     connect_from_node(Config, Env, "link")),
        {Status, Output} = boot(Config, Env, "app@link"),
        ct:log("boot of app@link (exit ~p):~n~ts", [Status, Output]),
        ?assertNotEqual(0, Status),
        ?assertNotEqual(nomatch, string:find(Output, "insecure_socket_dir")),
        ?assertNotEqual(nomatch, string:find(Output, "symlink")),
        ?assertEqual({0, 0}, squatter_report(Squatter)),
        %% positive control: through the link, the squatter is reachable
        {ok, S} = tailscale_helper_proc_connect_raw(filename:join(Dir, "link.sock")),
        socket:close(S),
        wait_until(fun() -> squatter_report(Squatter) =:= {1, 0} end, 100)
    after
        stop_squatter(Squatter)
    end.

%% A socket in a proper directory, but its listener runs as nobody (bound
%% elsewhere, then renamed in): SO_PEERCRED says so, and the node sends it
%% nothing.
socket_peer_other_uid(Config) ->
    Tmp = private_tmp(Config, "peer"),
    Dir = filename:join(Tmp, "tsdist-" ++ uid()),
    ok = file:make_dir(Dir),
    ok = file:change_mode(Dir, 8#700),
    %% (the run directory is closed to nobody)
    NobodyDir = string:trim(os:cmd("mktemp -d /tmp/tsdist-nobody-XXXXXX")),
    [] = os:cmd("chown 65534:65534 " ++ NobodyDir),
    Bound = filename:join(NobodyDir, "peer.sock"),
    Listener = nobody_listener(Bound),
    Path = filename:join(Dir, "peer.sock"),
    ok = file:rename(Bound, Path),
    Env = socket_env(Tmp),
    try
        {error, {insecure_socket_peer, Path, #{uid := 65534, pid := Pid}}} = connect_from_node(Config, Env, "peer"),
        ?assertEqual(nobody_listener_pid(Listener), Pid),
        {Status, Output} = boot(Config, Env, "app@peer"),
        ct:log("boot of app@peer (exit ~p):~n~ts", [Status, Output]),
        ?assertNotEqual(0, Status),
        ?assertNotEqual(nomatch, string:find(Output, "insecure_socket_peer")),
        ?assertNotEqual(nomatch, string:find(Output, "uid=>65534")),
        %% it was connected to (positive control of the listener), twice,
        %% and received not a byte
        wait_until(fun() -> count_prefix("bytes 0", nobody_lines(Listener)) =:= 2 end, 200),
        ?assertEqual(2, count_prefix("accepted", nobody_lines(Listener))),
        ?assertEqual([], [L || L <- nobody_lines(Listener), lists:prefix("bytes", L), L =/= "bytes 0"])
    after
        stop_nobody_listener(Listener),
        os:cmd("rm -rf " ++ NobodyDir)
    end.

%%% Secrets

%% The auth key, from the OS environment, from the application's
%% `authkey' or from a key file (`authkey_file'), is in the helper's
%% environment (the file's path, for the file) and in no command line.
authkey_not_in_cmdline(Config) ->
    Key = "tskey-auth-trust-" ++ integer_to_list(erlang:unique_integer([positive]))
        ++ "-" ++ binary_to_list(binary:encode_hex(crypto:strong_rand_bytes(8))),
    {P, _} = start_node([{env, [{"TS_AUTHKEY", Key}]} | Config], k, "keyenv"),
    %% not distributed at boot, so the application's key is set first
    AppKey = Key ++ "-app",
    {Q, nonode@nohost} = start_node(Config, undefined, "keyapp"),
    %% and from a key file (`authkey_file'): its path in the environment
    FileKey = Key ++ "-file",
    KeyFile = filename:join(?config(run_dir, Config), "authkey"),
    ok = file:write_file(KeyFile, FileKey),
    ok = file:change_mode(KeyFile, 8#600),
    {R, nonode@nohost} = start_node(Config, undefined, "keyfile"),
    try
        ok = peer:call(Q, application, set_env, [tsdist, authkey, AppKey]),
        {ok, _} = peer:call(Q, net_kernel, start, [[k@keyapp, shortnames]], 30000),
        ?assertEqual(pong, peer:call(P, net_adm, ping, [k@keyapp], 15000)),
        ok = peer:call(R, application, set_env, [tsdist, authkey_file, KeyFile]),
        {ok, _} = peer:call(R, net_kernel, start, [[k@keyfile, shortnames]], 30000),
        ?assertEqual(pong, peer:call(P, net_adm, ping, [k@keyfile], 15000)),
        HelperR = maps:get(helper_os_pid, peer:call(R, tailscale_helper, info, [])),
        ?assertNotEqual(nomatch, string:find(environ(HelperR), "TS_AUTHKEY_FILE=" ++ KeyFile)),
        [HelperP, HelperQ] = [maps:get(helper_os_pid, peer:call(N, tailscale_helper, info, [])) || N <- [P, Q]],
        Cmdlines = cmdlines(),
        %% positive controls: the scan sees both helpers' command lines, and
        %% each helper has its key in its environment
        ?assert(lists:any(fun({Pid, C}) -> Pid =:= HelperP andalso string:find(C, "keyenv") =/= nomatch end, Cmdlines)),
        ?assert(lists:any(fun({Pid, C}) -> Pid =:= HelperQ andalso string:find(C, "keyapp") =/= nomatch end, Cmdlines)),
        ?assertNotEqual(nomatch, string:find(environ(HelperP), "TS_AUTHKEY=" ++ Key)),
        ?assertNotEqual(nomatch, string:find(environ(HelperQ), "TS_AUTHKEY=" ++ AppKey)),
        ?assertEqual([], [{Pid, C} || {Pid, C} <- Cmdlines, string:find(C, Key) =/= nomatch]),
        ct:log("~p command lines scanned; the key is in none", [length(Cmdlines)])
    after
        peer:stop(P), peer:stop(Q), peer:stop(R)
    end.

%%% Strangers

%% probe@alpha admits only beta's owner. A device of another user asks for
%% hostname beta (and gets beta-1) and runs app@beta: alpha keeps reaching
%% the honest app@beta, and once that one is gone gets pang, with the
%% stranger's identity in its log, while the stranger sees not a single
%% connection. A node whose policy admits everyone does reach the stranger
%% (positive control of its counting).
stranger_takes_name(Config) ->
    {A, _} = start_node(Config, probe, "alpha"),
    AlphaUser = self_user(A),
    {B, _} = start_node([{env, [{"TSDIST_ALLOW", "user:" ++ AlphaUser}]} | Config], app, "beta"),
    BetaUser = self_user(B),
    ?assertNotEqual(AlphaUser, BetaUser),
    Rules = list_to_binary("user:" ++ BetaUser),
    {ok, Rules} = peer:call(A, tailscale_helper, set_policy, [Rules]),
    Log = filename:join(?config(priv_dir, Config), "alpha.log"),
    tsdist_ct:capture_log(A, Log),
    %% a device of its own (its own state), so a user of its own
    StrangerState = filename:join(?config(run_dir, Config), "stranger-state"),
    Stranger = tsdist_ct:start_hostile_peer([{env, [{"TS_STATE_DIR", StrangerState}]} | Config],
                                            "beta", ["-register", "app"]),
    %% and one that holds a name no honest device has
    Gamma = tsdist_ct:start_hostile_peer([{env, [{"TS_STATE_DIR", StrangerState ++ "-gamma"}]} | Config],
                                         "gamma", ["-register", "app"]),
    try
        ?assertEqual(pong, peer:call(A, net_adm, ping, [app@beta], 15000)),
        ?assertEqual(app@beta, peer:call(A, rpc, call, [app@beta, erlang, node, []])),
        %% the stranger is in alpha's view, not allowed (the offline
        %% tailnet does not rename it beta-1 as Tailscale and Headscale do:
        %% its MagicDNS name may be beta too)
        wait_until(fun() -> stranger_seen(A, BetaUser) =/= [] end, 300),
        [#{<<"user">> := StrangerUser, <<"dns_name">> := StrangerDns, <<"ips">> := [StrangerIP | _]}] =
            stranger_seen(A, BetaUser),
        ct:log("the stranger: ~s (~s, ~s)", [StrangerDns, StrangerUser, StrangerIP]),
        %% by its address, every outgoing request is refused, naming it
        Addr = binary_to_list(StrangerIP),
        [?assertMatch({error, {not_allowed, _, #{<<"user">> := StrangerUser, <<"ips">> := [StrangerIP | _]}}},
                      peer:call(A, tailscale_helper, F, Args))
         || {F, Args} <- [{port_please, ["app", Addr, 5000]}, {names, [Addr, 5000]},
                          {dial, [Addr, 4369, 5000]}]],
        %% while both run, alpha reaches the honest one
        true = peer:call(A, erlang, disconnect_node, [app@beta]),
        ?assertEqual(pong, peer:call(A, net_adm, ping, [app@beta], 15000)),
        {ok, #{user := BetaUserBin}} = peer:call(A, tailscale_dist, identity, [app@beta]),
        ?assertEqual(BetaUser, binary_to_list(BetaUserBin)),
        %% A name only a stranger holds: pang, and the log names it.
        [#{<<"user">> := GammaUser, <<"ips">> := [GammaIP | _]}] =
            [P || #{<<"hostname">> := <<"gamma">>, <<"allowed">> := false} = P <- peers(A)],
        ?assertEqual(pang, peer:call(A, net_adm, ping, [app@gamma], 30000)),
        Refusal = "cannot connect to app@gamma: {not_allowed,\"gamma\",",
        wait_until(fun() -> string:find(tsdist_ct:read_log(Log), Refusal) =/= nomatch end, 100),
        [_, AfterRefusal] = string:split(tsdist_ct:read_log(Log), Refusal),
        [Identity0 | _] = string:split(AfterRefusal, "\n"),
        Identity = no_blanks(Identity0),
        ct:log("alpha's log:~n~ts", [tsdist_ct:read_log(Log)]),
        ?assertNotEqual(nomatch, string:find(Identity, "user=><<\"" ++ binary_to_list(GammaUser))),
        ?assertNotEqual(nomatch, string:find(Identity, binary_to_list(GammaIP))),
        ?assertEqual([], [L || L <- tsdist_ct:hostile_lines(Gamma), lists:prefix("accept", L)]),
        %% The honest one goes. The name stays its owner's (the oldest
        %% holder's, docs/control-protocol.md "dial"): alpha tries the
        %% offline honest device and fails; the stranger hears nothing.
        {ok, #{<<"self">> := #{<<"ips">> := [BetaIP | _]}}} = peer:call(B, tailscale_helper, status, []),
        peer:stop(B),
        wait_until(fun() -> not lists:member(app@beta, peer:call(A, erlang, nodes, [])) end, 200),
        ?assertEqual(pang, peer:call(A, net_adm, ping, [app@beta], 30000)),
        ?assertEqual({badrpc, nodedown}, peer:call(A, rpc, call, [app@beta, erlang, node, []], 30000)),
        BetaFailure = no_blanks("cannot connect to app@beta: {tailnet_epmd,\"beta\",{epmd_failed,"),
        wait_until(fun() -> string:find(no_blanks(tsdist_ct:read_log(Log)), BetaFailure) =/= nomatch end, 100),
        [_, AfterBeta] = string:split(no_blanks(tsdist_ct:read_log(Log)), BetaFailure),
        [BetaReason | _] = string:split(AfterBeta, "\n"),
        ?assertNotEqual(nomatch, string:find(BetaReason, binary_to_list(BetaIP) ++ ":4369")),
        ?assertEqual(nomatch, string:find(BetaReason, binary_to_list(StrangerIP))),
        ?assertEqual([], [L || L <- tsdist_ct:hostile_lines(Stranger), lists:prefix("accept", L)]),
        %% positive control: a node that admits everyone reaches both
        %% (beta by its address: the name beta is still the honest one's)
        {O, _} = start_node([{env, [{"TSDIST_ALLOW", "*"}]} | Config], open, "omega"),
        try
            ?assertMatch({ok, [{"app", _}]},
                         peer:call(O, net_adm, names, [binary_to_list(StrangerIP)], 20000)),
            ?assertMatch([_ | _], [L || L <- tsdist_ct:hostile_lines(Stranger), lists:prefix("accept epmd", L)]),
            ?assertMatch({ok, [{"app", _}]}, peer:call(O, net_adm, names, [gamma], 20000)),
            ?assertMatch([_ | _], [L || L <- tsdist_ct:hostile_lines(Gamma), lists:prefix("accept epmd", L)])
        after
            peer:stop(O)
        end
    after
        peer:stop(A),
        tsdist_ct:stop_hostile_peer(Stranger),
        tsdist_ct:stop_hostile_peer(Gamma)
    end.

%% A node with tag:erlang is killed (no logout); its successor, same tag,
%% fresh device (kappa-1 on Tailscale and Headscale; the offline tailnet
%% keeps the label), is reached as app@kappa.
honest_successor(Config) ->
    {A, _} = start_node(Config, probe2, "alpha2"),
    AlphaUser = self_user(A),
    {ok, _} = peer:call(A, tailscale_helper, set_policy, [<<"tag:erlang">>]),
    Tagged = fun(StateDir) ->
                     [{env, [{"TS_TAGS", "tag:erlang"},
                             {"TSDIST_ALLOW", "user:" ++ AlphaUser},
                             {"TS_STATE_DIR", StateDir}]} | Config]
             end,
    RunDir = ?config(run_dir, Config),
    {K1, _} = start_node(Tagged(filename:join(RunDir, "kappa-first")), app, "kappa"),
    try
        ?assertEqual(pong, peer:call(A, net_adm, ping, [app@kappa], 15000)),
        {ok, Old} = peer:call(K1, tailscale_helper, status, []),
        #{helper_os_pid := Helper} = peer:call(K1, tailscale_helper, info, []),
        Beam = list_to_integer(peer:call(K1, os, getpid, [])),
        os:cmd(io_lib:format("kill -9 ~b ~b", [Helper, Beam])),
        %% (a killed node sends no FIN: alpha would see it go only at the
        %% next tick)
        peer:call(A, erlang, disconnect_node, [app@kappa]),
        catch peer:stop(K1),
        {ok, #{<<"self">> := #{<<"ips">> := OldIPs}}} = {ok, Old},
        {K2, _} = start_node(Tagged(filename:join(RunDir, "kappa-second")), app, "kappa"),
        try
            {ok, #{<<"self">> := #{<<"node">> := Label, <<"ips">> := NewIPs}}} =
                peer:call(K2, tailscale_helper, status, []),
            ct:log("the successor: ~s ~p (the killed one: ~p)", [Label, NewIPs, OldIPs]),
            ?assertNotEqual(OldIPs, NewIPs),
            ?assertEqual(pong, ping_until_pong(A, app@kappa, 40)),
            {ok, #{ips := NewIPs, tags := [<<"tag:erlang">>]}} =
                peer:call(A, tailscale_dist, identity, [app@kappa])
        after
            peer:stop(K2)
        end
    after
        peer:stop(A)
    end.

%%% Helpers

uid() ->
    string:trim(os:cmd("id -u")).

%% A fresh directory of the run's own, for $TMPDIR (short: socket paths
%% are limited to 108 bytes).
private_tmp(Config, Name) ->
    Dir = filename:join(?config(run_dir, Config), Name),
    ok = file:make_dir(Dir),
    Dir.

%% A node's environment with no XDG_RUNTIME_DIR and $TMPDIR = Tmp.
socket_env(Tmp) ->
    [{"XDG_RUNTIME_DIR", ""}, {"TMPDIR", Tmp}].

%% What tailscale_helper_proc:connect/1 answers on a node (not distributed)
%% with environment Env, for tailnet host Host.
connect_from_node(Config, Env, Host) ->
    {P, _} = start_node([{env, Env} | Config], undefined, Host),
    try peer:call(P, tailscale_helper_proc, connect, [Host], 30000)
    after peer:stop(P)
    end.

%% Boots Node as a user would (erl -sname Node -proto_dist tailscale ...)
%% with environment Env, until it halts; returns its exit status and all
%% it printed.
boot(Config, Env, Node) ->
    [_, Host] = string:split(Node, "@"),
    Erl = os:find_executable("erl"),
    Paths = lists:usort([filename:dirname(code:which(M)) || M <- [tailscale_dist, tsdist_ct]]),
    Port = open_port({spawn_executable, Erl},
                     [{args, ["-noshell", "-sname", Node, "-proto_dist", "tailscale",
                              "-start_epmd", "false", "-setcookie", tsdist_ct:cookie(),
                              "-eval", "halt(0)."]
                             ++ lists:append([["-pa", P] || P <- Paths])},
                      {env, tsdist_ct:node_env([{env, Env} | Config], Host)},
                      exit_status, use_stdio, stderr_to_stdout, {line, 65536}]),
    {Status, Lines} = tsdist_ct:collect_port(Port, [], 60000),
    {Status, lists:flatten(lists:join("\n", Lines))}.

%% A Unix socket listener in this (the test's) VM that counts the
%% connections it accepts and the bytes they send.
squatter(Path) ->
    Self = self(),
    Pid = spawn(fun() ->
        {ok, L} = socket:open(local, stream, default),
        ok = socket:bind(L, #{family => local, path => Path}),
        ok = socket:listen(L),
        Self ! {self(), listening},
        squat_loop(L, 0, 0)
    end),
    receive {Pid, listening} -> Pid after 5000 -> ct:fail(squatter_did_not_start) end.

squat_loop(L, Accepts, Bytes) ->
    receive
        {report, From} ->
            From ! {squat, self(), {Accepts, Bytes}},
            squat_loop(L, Accepts, Bytes);
        stop ->
            socket:close(L)
    after 0 ->
        case socket:accept(L, 50) of
            {ok, S} ->
                N = drain(S, 0),
                socket:close(S),
                squat_loop(L, Accepts + 1, Bytes + N);
            {error, timeout} ->
                squat_loop(L, Accepts, Bytes)
        end
    end.

drain(S, N) ->
    case socket:recv(S, 0, 500) of
        {ok, D} -> drain(S, N + byte_size(D));
        {error, _} -> N
    end.

squatter_report(Pid) ->
    Pid ! {report, self()},
    receive {squat, Pid, R} -> R after 5000 -> ct:fail(squatter_gone) end.

stop_squatter(Pid) ->
    Pid ! stop,
    ok.

tailscale_helper_proc_connect_raw(Path) ->
    {ok, S} = socket:open(local, stream, default),
    case socket:connect(S, #{family => local, path => Path}) of
        ok -> {ok, S};
        {error, _} = E -> socket:close(S), E
    end.

%% A Unix socket listener run as nobody (setpriv), another BEAM, that
%% prints `pid P', `accepted' and `bytes N' lines.
nobody_listener(Path) ->
    Erl = os:find_executable("erl"),
    Code = "{ok,L}=socket:open(local,stream,default),"
           "ok=socket:bind(L,#{family=>local,path=>\"" ++ Path ++ "\"}),"
           "ok=socket:listen(L),"
           "io:format(\"pid ~s~nlistening~n\",[os:getpid()]),"
           "R=fun R(S,N)->case socket:recv(S,0,1000) of {ok,D}->R(S,N+byte_size(D)); _->N end end,"
           "A=fun A()->{ok,S}=socket:accept(L),io:format(\"accepted~n\"),"
           "io:format(\"bytes ~p~n\",[R(S,0)]),socket:close(S),A() end,"
           "A().",
    Self = self(),
    Pid = spawn(fun() ->
        Port = open_port({spawn_executable, "/usr/bin/setpriv"},
                         [{args, ["--reuid=65534", "--regid=65534", "--clear-groups",
                                  Erl, "-noshell", "-eval", Code]},
                          {env, [{"HOME", "/tmp"}]},
                          exit_status, use_stdio, stderr_to_stdout, {line, 4096}]),
        nobody_loop(Port, Self, [])
    end),
    receive {Pid, listening} -> Pid after 30000 -> ct:fail({nobody_listener, nobody_lines(Pid)}) end.

nobody_loop(Port, Owner, Lines) ->
    receive
        {Port, {data, {_, "listening"}}} ->
            Owner ! {self(), listening},
            nobody_loop(Port, Owner, ["listening" | Lines]);
        {Port, {data, {_, Line}}} ->
            nobody_loop(Port, Owner, [Line | Lines]);
        {Port, {exit_status, S}} ->
            nobody_loop(Port, Owner, [io_lib:format("exited ~p", [S]) | Lines]);
        {lines, From} ->
            From ! {lines, self(), lists:reverse(Lines)},
            nobody_loop(Port, Owner, Lines);
        stop ->
            case erlang:port_info(Port, os_pid) of
                {os_pid, OsPid} -> os:cmd("kill " ++ integer_to_list(OsPid));
                undefined -> ok
            end,
            catch port_close(Port)
    end.

nobody_lines(Pid) ->
    Pid ! {lines, self()},
    receive {lines, Pid, L} -> L after 5000 -> [] end.

nobody_listener_pid(Pid) ->
    ["pid " ++ P] = [L || L <- nobody_lines(Pid), lists:prefix("pid ", L)],
    list_to_integer(P).

stop_nobody_listener(Pid) ->
    Pid ! stop,
    ok.

%% {OsPid, command line with NULs as spaces} of every process.
cmdlines() ->
    {ok, Entries} = file:list_dir("/proc"),
    [{list_to_integer(E), [case C of 0 -> $\s; _ -> C end || C <- binary_to_list(Bin)]}
     || E <- Entries, lists:all(fun(C) -> C >= $0 andalso C =< $9 end, E),
        {ok, Bin} <- [file:read_file("/proc/" ++ E ++ "/cmdline")]].

environ(OsPid) ->
    {ok, Bin} = file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/environ"),
    [case C of 0 -> $\n; _ -> C end || C <- binary_to_list(Bin)].

self_user(P) ->
    {ok, #{<<"self">> := #{<<"user">> := U}}} = peer:call(P, tailscale_helper, status, []),
    ?assertNotEqual(<<>>, U),
    binary_to_list(U).

no_blanks(S) ->
    [C || C <- S, C =/= $\s].

peers(P) ->
    {ok, #{<<"peers">> := Peers}} = peer:call(P, tailscale_helper, status, []),
    Peers.

%% Peers of node P's view that asked for hostname beta, are not owned by
%% BetaUser, and that P's policy does not admit.
stranger_seen(P, BetaUser) ->
    {ok, #{<<"peers">> := Peers}} = peer:call(P, tailscale_helper, status, []),
    User = list_to_binary(BetaUser),
    [Peer || #{<<"hostname">> := <<"beta">>, <<"user">> := U, <<"allowed">> := false} = Peer <- Peers,
             U =/= User].

ping_until_pong(_Node, _Target, 0) ->
    pang;
ping_until_pong(Node, Target, N) ->
    case peer:call(Node, net_adm, ping, [Target], 15000) of
        pong -> pong;
        pang -> timer:sleep(500), ping_until_pong(Node, Target, N - 1)
    end.
