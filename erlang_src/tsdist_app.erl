%%% The tsdist application: distribution itself needs no application
%%% (tailscale_dist starts its own process under net_sup); this one runs
%%% discovery when the application's `discovery' is set.
-module(tsdist_app).
-compile(warn_missing_spec).
-behaviour(application).
-behaviour(supervisor).

-export([start/2, stop/1, init/1]).

-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    supervisor:start_link({local, tsdist_sup}, ?MODULE, []).

-spec stop(term()) -> ok.
stop(_State) ->
    ok.

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    Children = case application:get_env(tsdist, discovery) of
                   {ok, Opts} ->
                       [#{id => tailscale_discovery,
                          start => {tailscale_discovery, start_link, [Opts]}}];
                   undefined ->
                       []
               end,
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10}, Children}}.
