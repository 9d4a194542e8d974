%%% close(2) for a descriptor received over SCM_RIGHTS.
%%%
%%% gen_tcp:fdopen/2 never closes the descriptor it wraps (the inet driver
%%% treats it as borrowed), so a connection the tsdist helper passed would
%%% stay open after its port closed, and the helper and the tailnet peer
%%% would never see it end. tailscale_helper monitors each such port and
%%% closes the descriptor here once the port is gone. The NIF is built from
%%% c_src/tailscale_fd.c into priv/.
-module(tailscale_fd).
-compile(warn_missing_spec).

-export([close/1]).
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
