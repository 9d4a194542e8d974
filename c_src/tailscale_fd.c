/*
 * tailscale_fd: close(2) for descriptors the BEAM received over SCM_RIGHTS.
 *
 * gen_tcp:fdopen/2 marks its socket "prebound" and never closes the
 * descriptor, on the assumption that it belongs to a wrapper program. For a
 * connection passed by the tsdist helper that assumption is wrong: the
 * helper sees the connection end only when the last copy of the descriptor
 * is closed, so tailscale_helper closes it here once the port is gone.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <erl_nif.h>

static ERL_NIF_TERM close_fd(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
    int fd;

    (void)argc;
    if (!enif_get_int(env, argv[0], &fd) || fd < 3)
        return enif_make_badarg(env);
    if (close(fd) != 0)
        return enif_make_tuple2(env, enif_make_atom(env, "error"),
                                enif_make_atom(env, errno == EBADF ? "ebadf" : "eio"));
    return enif_make_atom(env, "ok");
}

static ErlNifFunc funcs[] = {
    {"close", 1, close_fd, 0},
};

ERL_NIF_INIT(tailscale_fd, funcs, NULL, NULL, NULL, NULL)
