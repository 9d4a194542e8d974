%%% Two system calls the socket and inet modules do not offer: close(2) for
%%% a descriptor received over SCM_RIGHTS, and SO_PEERCRED.
%%%
%%% gen_tcp:fdopen/2 never closes the descriptor it wraps (the inet driver
%%% treats it as borrowed), so a connection the tsdist helper passed would
%%% stay open after its port closed, and the helper and the tailnet peer
%%% would never see it end. tailscale_helper stays linked to each such port
%%% (it links again after every hand-over, see tailscale_helper:give/2) and
%%% closes the descriptor here once the port's 'EXIT' arrives.
%%%
%%% peercred/1 tells tailscale_helper_proc which process (pid, uid, gid)
%%% listens on the control socket it connected to: the socket module
%%% refuses `{socket, peercred}' on OTP 25 and 27.
%%%
%%% The NIF is built from c_src/tailscale_fd.c into priv/.
-module(tailscale_fd).
-compile(warn_missing_spec).

-export([close/1, peercred/1]).
-on_load(load/0).

-spec load() -> ok | {error, term()}.
load() ->
    Dir = case code:priv_dir(tsdist) of
              {error, bad_name} ->
                  %% Loaded by path (-pa .../ebin) rather than as an application.
                  filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
              D -> D
          end,
    erlang:load_nif(filename:join(Dir, "tailscale_fd"), 0).

%% Closes descriptor Fd (never 0, 1 or 2).
-spec close(non_neg_integer()) -> ok | {error, ebadf | eio}.
close(_Fd) ->
    erlang:nif_error(not_loaded).

%% The credentials of the peer of the connected Unix socket Fd, as the
%% kernel recorded them when it connected (SO_PEERCRED): for a client
%% socket, the process that called listen(2).
-spec peercred(non_neg_integer()) ->
          {ok, {Pid :: integer(), Uid :: non_neg_integer(), Gid :: non_neg_integer()}}
          | {error, ebadf | enotsock | enotconn | einval}.
peercred(_Fd) ->
    erlang:nif_error(not_loaded).
