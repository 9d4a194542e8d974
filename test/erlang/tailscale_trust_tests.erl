%%% EUnit tests of the checks that keep remote and local input from
%%% becoming atoms or reaching the node unchecked (issue 14): error codes,
%%% EPMD names in discovery, the socket directory, the helper's uid, the
%%% bounded hello, IPv6 addresses. The same paths on real nodes are in
%%% tailscale_trust_SUITE.
-module(tailscale_trust_tests).

-include_lib("eunit/include/eunit.hrl").

%%% Error codes

error_codes_test() ->
    R = fun(Code) -> tailscale_helper:error_reason(#{<<"code">> => Code, <<"message">> => <<"m">>}) end,
    ?assertEqual({unknown_host, <<"m">>}, R(<<"unknown_host">>)),
    ?assertEqual({epmd_failed, <<"m">>}, R(<<"epmd_failed">>)),
    ?assertEqual({name_taken, <<"m">>}, R(<<"name_taken">>)),
    ?assertEqual({not_allowed, <<"m">>, #{}}, R(<<"not_allowed">>)),
    %% every code of section 8, and not_allowed, is one of the fixed atoms
    [?assertEqual(binary_to_existing_atom(C), element(1, R(C)))
     || C <- [<<"bad_request">>, <<"too_large">>, <<"hello_required">>, <<"unsupported_version">>,
              <<"unknown_op">>, <<"not_running">>, <<"unknown_host">>, <<"dial_failed">>,
              <<"timeout">>, <<"port_in_use">>, <<"not_listening">>, <<"invalid_name">>,
              <<"name_taken">>, <<"not_registered">>, <<"epmd_failed">>, <<"busy">>,
              <<"internal">>, <<"not_allowed">>]],
    %% codes from nowhere make no atom (other processes may make a few
    %% meanwhile: the bound is well below the 1000 codes)
    Fresh = [iolist_to_binary(["tsdist_no_such_code_", integer_to_list(I)]) || I <- lists:seq(1, 1000)],
    Before = erlang:system_info(atom_count),
    [?assertEqual({unknown_error, C, <<"m">>}, R(C)) || C <- Fresh],
    ?assert(erlang:system_info(atom_count) - Before < 50),
    [?assertError(badarg, binary_to_existing_atom(C)) || C <- Fresh],
    ?assertEqual({unknown_error, <<>>, <<"m">>}, R(42)),
    ?assertEqual({internal, <<>>}, tailscale_helper:error_reason(null)),
    Peer = #{<<"node">> => <<"beta-1">>, <<"user">> => <<"u@x">>},
    ?assertEqual({not_allowed, <<"m">>, Peer},
                 tailscale_helper:error_reason(#{<<"code">> => <<"not_allowed">>,
                                                 <<"message">> => <<"m">>, <<"peer">> => Peer})).

%%% Discovery's checks on EPMD names

node_names_test() ->
    Long = lists:duplicate(300, $x),
    {Kept, Report} = tailscale_discovery:node_names("beta", ["app", "w-1.x_y", Long, "a b", "é",
                                                             "a@b", ""], 2),
    ?assertEqual(["app@beta", "w-1.x_y@beta"], Kept),
    ?assertEqual(#{invalid => [Long, "a b", "é", "a@b", ""], over_limit => 0, dropped => 2}, Report),
    %% the whole node name fits in an atom: 250 + "@beta" is 255 bytes
    Fits = lists:duplicate(250, $n),
    ?assertMatch({[_], #{invalid := []}}, tailscale_discovery:node_names("beta", [Fits], 0)),
    ?assertMatch({[], #{invalid := [_]}}, tailscale_discovery:node_names("beta", [[$m | Fits]], 0)).

names_per_host_capped_test() ->
    Many = ["n" ++ integer_to_list(I) || I <- lists:seq(1, 50000)],
    {Kept, Report} = tailscale_discovery:node_names("hostile", Many, 0),
    ?assertEqual(64, length(Kept)),
    ?assertEqual(lists:sublist(Many, 64), [hd(string:split(N, "@")) || N <- Kept]),
    ?assertEqual(#{invalid => [], over_limit => 50000 - 64, dropped => 0}, Report).

valid_host_test() ->
    [?assert(tailscale_discovery:valid_host(H)) || H <- ["beta", "beta-1", "b.tsdist.test", "a1"]],
    [?assertNot(tailscale_discovery:valid_host(H))
     || H <- ["", "-a", "a-", "a..b", "a b", "a_b", lists:duplicate(64, $a), "é"]].

%% Peers the policy does not admit, or whose helper does not say, are
%% never candidates; admitted ones are (positive control).
matching_admitted_only_test() ->
    Peer = fun(Node, Allowed) ->
                   maps:merge(#{<<"node">> => Node, <<"hostname">> => Node, <<"online">> => true,
                                <<"tags">> => []}, Allowed)
           end,
    Peers = [Peer(<<"ok">>, #{<<"allowed">> => true}),
             Peer(<<"stranger">>, #{<<"allowed">> => false}),
             Peer(<<"old">>, #{}),
             Peer(<<"odd">>, #{<<"allowed">> => <<"true">>})],
    ?assertEqual([<<"ok">>], [maps:get(<<"node">>, P) || P <- tailscale_discovery:matching(Peers, [])]).

%%% The socket's directory and its listener

socket_dir_test_() ->
    {setup,
     fun() -> string:trim(os:cmd("mktemp -d /tmp/tsdist-eunit-XXXXXX")) end,
     fun(Dir) -> os:cmd("rm -rf " ++ Dir) end,
     fun(Dir) ->
             [fun() ->
                      Good = filename:join(Dir, "good"),
                      ok = file:make_dir(Good),
                      ok = file:change_mode(Good, 8#700),
                      ?assertEqual(ok, tailscale_helper_proc:check_socket_dir(Good)),
                      Open = filename:join(Dir, "open"),
                      ok = file:make_dir(Open),
                      ok = file:change_mode(Open, 8#750),
                      ?assertMatch({error, {insecure_socket_dir, Open, #{mode := 8#750}}},
                                   tailscale_helper_proc:check_socket_dir(Open)),
                      Link = filename:join(Dir, "link"),
                      ok = file:make_symlink(Good, Link),
                      ?assertMatch({error, {insecure_socket_dir, Link, #{type := symlink}}},
                                   tailscale_helper_proc:check_socket_dir(Link)),
                      Missing = filename:join(Dir, "missing"),
                      ?assertEqual({error, {no_socket_dir, Missing, enoent}},
                                   tailscale_helper_proc:check_socket_dir(Missing))
              end,
              fun() ->
                      %% The Go rule: $XDG_RUNTIME_DIR/tsdist, else $TMPDIR/tsdist-UID,
                      %% else /tmp/tsdist-UID.
                      Saved = [{V, os:getenv(V)} || V <- ["XDG_RUNTIME_DIR", "TMPDIR"]],
                      Uid = string:trim(os:cmd("id -u")),
                      try
                          os:putenv("XDG_RUNTIME_DIR", "/run/user/7"),
                          ?assertEqual("/run/user/7/tsdist/alpha.sock",
                                       tailscale_helper_proc:default_socket("alpha")),
                          os:unsetenv("XDG_RUNTIME_DIR"),
                          os:putenv("TMPDIR", Dir),
                          ?assertEqual(filename:join([Dir, "tsdist-" ++ Uid, "alpha.sock"]),
                                       tailscale_helper_proc:default_socket("alpha")),
                          os:unsetenv("TMPDIR"),
                          ?assertEqual("/tmp/tsdist-" ++ Uid ++ "/alpha.sock",
                                       tailscale_helper_proc:default_socket("alpha"))
                      after
                          [case V of false -> os:unsetenv(K); _ -> os:putenv(K, V) end
                           || {K, V} <- Saved]
                      end
              end,
              fun() ->
                      %% SO_PEERCRED: a listener of our own uid passes.
                      Path = filename:join(Dir, "own.sock"),
                      {ok, L} = socket:open(local, stream, default),
                      ok = socket:bind(L, #{family => local, path => Path}),
                      ok = socket:listen(L),
                      {ok, S} = tailscale_helper_proc:connect_socket(Path),
                      {ok, Fd} = socket:getopt(S, {otp, fd}),
                      {ok, {Pid, Uid, _}} = tailscale_fd:peercred(Fd),
                      ?assertEqual(os:getpid(), integer_to_list(Pid)),
                      ?assertEqual(string:trim(os:cmd("id -u")), integer_to_list(Uid)),
                      socket:close(S),
                      socket:close(L)
              end,
              fun() ->
                      %% A hello answer of more than 64 KiB is refused, naming the path.
                      Path = filename:join(Dir, "big.sock"),
                      {ok, L} = socket:open(local, stream, default),
                      ok = socket:bind(L, #{family => local, path => Path}),
                      ok = socket:listen(L),
                      Self = self(),
                      spawn_link(fun() ->
                                         {ok, A} = socket:accept(L),
                                         {ok, _} = socket:recv(A, 0, 5000),
                                         Big = binary:copy(<<"x">>, 100000),
                                         _ = socket:send(A, [<<(byte_size(Big)):32>>, Big]),
                                         Self ! sent,
                                         receive stop -> socket:close(A) end
                                 end),
                      ?assertEqual({error, {hello, Path, {too_large, 100000}}},
                                   hello(Path)),
                      socket:close(L)
              end]
     end}.

%% The hello exchange of tailscale_helper, against whatever listens at Path.
hello(Path) ->
    {ok, S} = tailscale_helper_proc:connect_socket(Path),
    try tailscale_helper:hello_exchange(S, Path)
    after socket:close(S)
    end.

%%% Addresses

format_address_test() ->
    ?assertEqual("100.64.0.2:41234", tailscale_dist:format_address({100, 64, 0, 2}, 41234)),
    {ok, V6} = inet:parse_address("fd7a:115c:a1e0::2"),
    ?assertEqual("[fd7a:115c:a1e0::2]:41234", tailscale_dist:format_address(V6, 41234)).
