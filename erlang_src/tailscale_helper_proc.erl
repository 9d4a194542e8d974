%%% Starting, finding and stopping the node's tsdist helper.
%%%
%%% tailscale_helper (the control-protocol client) calls connect/1 when the
%%% node goes onto the tailnet and again after it lost its helper. connect/1
%%% either attaches to a helper that already serves the control socket
%%% (another node on this host started it, or systemd did: the `socket'
%%% setting) or starts `tsdist serve' as a port program of the calling
%%% process and waits for its socket. Either way it hands back a connected
%%% control socket on which nothing has been sent yet.
%%%
%%% The socket is where the node's tailnet identity is handed out, so both
%%% ends are checked before a byte goes over it:
%%%
%%%   * the socket's directory must be a real directory (lstat: not a
%%%     symbolic link), owned by this node's uid, with no permission bits
%%%     for group or others, or connect/1 fails with
%%%     `{insecure_socket_dir, Dir, #{owner := Uid, mode := Mode}}' (plus
%%%     `type' when it is not a directory), and nothing is started;
%%%   * once connected, the process listening there must run as this
%%%     node's uid (SO_PEERCRED, tailscale_fd:peercred/1), or the socket is
%%%     closed unused and connect/1 fails with
%%%     `{insecure_socket_peer, Path, #{uid := Uid, pid := Pid}}'.
%%%
%%% The default socket follows the Go helper's rule (docs/control-protocol.md,
%%% section 1): `$XDG_RUNTIME_DIR/tsdist/HOST.sock', else
%%% `$TMPDIR/tsdist-UID/HOST.sock' with $TMPDIR defaulting to /tmp.
%%%
%%% The helper gets its auth key in its environment (TS_AUTHKEY), never on
%%% its command line, which every local user can read in /proc.
%%%
%%% Configuration: the `tsdist' application's environment, else the OS
%%% environment, else a default; every key, variable and default is listed
%%% in docs/configuration.md.
-module(tailscale_helper_proc).
-compile(warn_missing_spec).

-export([connect/1, stop/1, os_pid/1, config/3, up_timeout/0,
         default_socket/1, runtime_dir/0, check_socket_dir/1, connect_socket/1]).

-include_lib("kernel/include/file.hrl").

-define(CONNECT_TIMEOUT, 10000).
-define(HELPER_EXIT_WAIT, 5000). % longer than the helper's own bounded shutdown

-type insecure() :: {insecure_socket_dir, file:filename(), #{atom() => term()}}
                  | {insecure_socket_peer, file:filename(), #{atom() => term()}}.
-export_type([insecure/0]).

%%% API

%% A control socket connected to the helper of tailnet host Hostname, the
%% helper's port when this call started it (undefined when it attached to
%% a running one), and the socket's path. Blocks the caller (the helper's
%% start takes up to 10 s), never a scheduler.
-spec connect(string()) ->
          {ok, socket:socket(), port() | undefined, file:filename()} | {error, term()}.
connect(Hostname) ->
    case config(socket, "TSDIST_SOCKET", undefined) of
        undefined ->
            Path = default_socket(Hostname),
            case check_socket_dir(filename:dirname(Path)) of
                ok ->
                    case connect_socket(Path) of
                        {ok, Sock} -> {ok, Sock, undefined, Path}; % a helper for this host runs
                        {error, {insecure_socket_peer, _, _}} = E -> E;
                        {error, _} -> spawn_helper(Hostname, Path)
                    end;
                {error, {no_socket_dir, _, _}} ->
                    spawn_helper(Hostname, Path);       % the helper creates it
                {error, _} = E ->
                    E
            end;
        Path0 ->
            Path = to_list(Path0),
            case check_socket_dir(filename:dirname(Path)) of
                ok ->
                    case connect_socket(Path) of
                        {ok, Sock} -> {ok, Sock, undefined, Path};
                        {error, {insecure_socket_peer, _, _}} = E -> E;
                        {error, Reason} -> {error, {no_helper_at, Path, Reason}}
                    end;
                {error, {no_socket_dir, _, Reason}} ->
                    {error, {no_helper_at, Path, Reason}};
                {error, _} = E ->
                    E
            end
    end.

%% Stops a helper connect/1 started, and waits (at most 5 s) until its
%% process is gone, so that whatever starts next does not attach to a
%% helper that is shutting down, nor start a second one on the same state.
-spec stop(port() | undefined) -> ok.
stop(undefined) -> ok;
stop(Port) ->
    OsPid = os_pid(Port),
    %% Closing its stdin is the helper's signal to shut down cleanly.
    try port_close(Port) catch error:badarg -> ok end,
    await_exit(OsPid, erlang:monotonic_time(millisecond) + ?HELPER_EXIT_WAIT).

%% The OS pid of a helper connect/1 started; undefined once it is gone.
-spec os_pid(port() | undefined) -> pos_integer() | undefined.
os_pid(undefined) -> undefined;
os_pid(Port) ->
    case erlang:port_info(Port, os_pid) of
        {os_pid, P} -> P;
        undefined -> undefined
    end.

%% Key from the `tsdist' application's environment, else OS variable
%% EnvVar (unset or empty: Default).
-spec config(atom(), string(), term()) -> term().
config(Key, EnvVar, Default) ->
    _ = application:load(tsdist),
    case application:get_env(tsdist, Key) of
        {ok, V} -> V;
        undefined ->
            case os:getenv(EnvVar) of
                false -> Default;
                "" -> Default;
                V -> V
            end
    end.

%% How long (ms) to wait for the tailnet at boot: `up_timeout'.
-spec up_timeout() -> pos_integer().
up_timeout() ->
    case config(up_timeout, "TSDIST_UP_TIMEOUT", 60000) of
        T when is_integer(T), T > 0 -> T;
        T ->
            case string:to_integer(to_list(T)) of
                {N, []} when N > 0 -> N;
                _ -> error({badarg, {up_timeout, T}})
            end
    end.

%% Where `tsdist serve' puts the socket of a hostname by default, so a
%% second node on this host finds a helper the first one started.
-spec default_socket(string()) -> file:filename().
default_socket(Hostname) ->
    filename:join(runtime_dir(), Hostname ++ ".sock").

%% The helper's default socket directory, as the Go helper computes it:
%% $XDG_RUNTIME_DIR/tsdist, else os.TempDir()/tsdist-UID, where os.TempDir()
%% is $TMPDIR, else /tmp.
-spec runtime_dir() -> file:filename().
runtime_dir() ->
    case os:getenv("XDG_RUNTIME_DIR") of
        D when D =:= false; D =:= "" ->
            Tmp = case os:getenv("TMPDIR") of
                      T when T =:= false; T =:= "" -> "/tmp";
                      T -> T
                  end,
            filename:join(Tmp, "tsdist-" ++ integer_to_list(uid()));
        D ->
            filename:join(D, "tsdist")
    end.

%% ok if Dir is a directory (not a symbolic link to one) owned by this
%% process's uid and closed to group and others.
-spec check_socket_dir(file:filename()) ->
          ok | {error, insecure() | {no_socket_dir, file:filename(), file:posix()}}.
check_socket_dir(Dir) ->
    Uid = uid(),
    case prim_file:read_link_info(Dir) of
        {ok, #file_info{type = directory, uid = Uid, mode = Mode}} when Mode band 8#077 =:= 0 ->
            ok;
        {ok, #file_info{type = directory, uid = Owner, mode = Mode}} ->
            {error, {insecure_socket_dir, Dir, #{owner => Owner, mode => Mode band 8#7777}}};
        {ok, #file_info{type = Type, uid = Owner, mode = Mode}} ->
            {error, {insecure_socket_dir, Dir,
                     #{type => Type, owner => Owner, mode => Mode band 8#7777}}};
        {error, Reason} ->
            {error, {no_socket_dir, Dir, Reason}}
    end.

%% Connects to the control socket at Path and checks who listens there;
%% sends nothing. The directory is checked by the caller.
-spec connect_socket(file:filename()) ->
          {ok, socket:socket()} | {error, insecure() | term()}.
connect_socket(Path) ->
    {ok, Sock} = socket:open(local, stream, default),
    case socket:connect(Sock, #{family => local, path => Path}) of
        ok ->
            case check_peer(Sock, Path) of
                ok -> {ok, Sock};
                {error, _} = E -> _ = socket:close(Sock), E
            end;
        {error, _} = E ->
            _ = socket:close(Sock),
            E
    end.

%%% Internal

check_peer(Sock, Path) ->
    {ok, Fd} = socket:getopt(Sock, {otp, fd}),
    Uid = uid(),
    case tailscale_fd:peercred(Fd) of
        {ok, {_Pid, Uid, _Gid}} ->
            ok;
        {ok, {Pid, Other, _Gid}} ->
            {error, {insecure_socket_peer, Path, #{uid => Other, pid => Pid}}};
        {error, Reason} ->
            {error, {insecure_socket_peer, Path, #{peercred => Reason}}}
    end.

spawn_helper(Hostname, SocketPath) ->
    case helper_executable() of
        {ok, Exe} ->
            StateDir = config(state_dir, "TS_STATE_DIR",
                              filename:join([element(2, prim_file:get_cwd()), "tsdist", Hostname])),
            Args = ["serve", "--hostname", Hostname, "--socket", SocketPath,
                    "--state-dir", to_list(StateDir), "--exit-with-stdin"]
                ++ opt_arg("--control-url", config(control_url, "TS_CONTROL_URL", undefined))
                ++ opt_arg("--tags", config(tags, "TS_TAGS", undefined))
                ++ opt_arg("--allow", config(allow, "TSDIST_ALLOW", undefined))
                ++ opt_arg("--udp-port", config(udp_port, "TS_UDP_PORT", undefined))
                ++ case lists:member(config(ephemeral, "TS_EPHEMERAL", "false"), ["true", "1", true]) of
                       true -> ["--ephemeral"];
                       false -> []
                   end,
            %% Secrets go in the environment, readable only by this user
            %% (and root), not in argv, which /proc shows to everyone.
            Env = opt_env("TS_AUTHKEY", config(authkey, "TS_AUTHKEY", undefined))
                ++ opt_env("TS_AUTHKEY_FILE", config(authkey_file, "TS_AUTHKEY_FILE", undefined)),
            Port = open_port({spawn_executable, Exe},
                             [{args, Args}, {env, Env}, exit_status, use_stdio, stderr_to_stdout,
                              {line, 4096}, hide]),
            wait_for_socket(Port, SocketPath, erlang:monotonic_time(millisecond) + ?CONNECT_TIMEOUT, []);
        {error, _} = E ->
            E
    end.

%% The helper creates its socket within milliseconds of starting; until then
%% connect fails, and an early exit is reported with what the helper said.
%% The directory and the listener are checked at every attempt: a squatter
%% could be quicker than the helper.
wait_for_socket(Port, Path, Deadline, Said) ->
    receive
        {Port, {data, {_, Line}}} ->
            logger:notice("~ts", [Line]),
            wait_for_socket(Port, Path, Deadline, [Line | Said]);
        {Port, {exit_status, Status}} ->
            {error, {helper_exited, Status, lists:reverse(Said)}}
    after 20 ->
        Attempt = case check_socket_dir(filename:dirname(Path)) of
                      ok -> connect_socket(Path);
                      {error, _} = DirError -> DirError
                  end,
        case Attempt of
            {ok, Sock} ->
                {ok, Sock, Port, Path};
            {error, {Insecure, _, _}} = E when Insecure =:= insecure_socket_dir;
                                               Insecure =:= insecure_socket_peer ->
                stop(Port),
                E;
            {error, _} ->
                case erlang:monotonic_time(millisecond) > Deadline of
                    true -> stop(Port), {error, {no_control_socket, Path, lists:reverse(Said)}};
                    false -> wait_for_socket(Port, Path, Deadline, Said)
                end
        end
    end.

await_exit(undefined, _Deadline) ->
    ok;
await_exit(OsPid, Deadline) ->
    case prim_file:read_file_info("/proc/" ++ integer_to_list(OsPid)) of
        {ok, _} ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> logger:warning("tsdist: helper ~p still running after ~p ms", [OsPid, ?HELPER_EXIT_WAIT]);
                false -> receive after 20 -> await_exit(OsPid, Deadline) end
            end;
        {error, _} ->
            ok
    end.

helper_executable() ->
    case config(helper, "TSDIST_HELPER", undefined) of
        undefined ->
            Path = string:lexemes(os:getenv("PATH", ""), ":"),
            case [Exe || Dir <- Path, Exe <- [filename:join(Dir, "tsdist")], is_executable(Exe)] of
                [Exe | _] -> {ok, Exe};
                [] -> {error, {no_helper, "tsdist is not on $PATH; set TSDIST_HELPER or the tsdist application's helper"}}
            end;
        Exe0 ->
            Exe = to_list(Exe0),
            case is_executable(Exe) of
                true -> {ok, filename:join(element(2, prim_file:get_cwd()), Exe)};
                false -> {error, {no_helper, Exe, "not an executable file"}}
            end
    end.

%% Distribution starts before the file server, so this asks prim_file.
is_executable(File) ->
    case prim_file:read_file_info(File) of
        {ok, #file_info{type = regular, mode = Mode}} -> Mode band 8#111 =/= 0;
        _ -> false
    end.

%% The owner of /proc/self is this process's (effective) user.
uid() ->
    {ok, Info} = prim_file:read_file_info("/proc/self"),
    Info#file_info.uid.

opt_arg(_, undefined) -> [];
opt_arg(Flag, Value) -> [Flag, to_list(Value)].

opt_env(_, undefined) -> [];
opt_env(Var, Value) -> [{Var, to_list(Value)}].

to_list(B) when is_binary(B) -> unicode:characters_to_list(B);
to_list(A) when is_atom(A) -> atom_to_list(A);
to_list(L) when is_list(L) -> L;
to_list(I) when is_integer(I) -> integer_to_list(I).
