/*
 * tailscale_fd: close(2) for descriptors the BEAM received over SCM_RIGHTS,
 * and the credentials of the process at the other end of a Unix socket.
 *
 * gen_tcp:fdopen/2 marks its socket "prebound" and never closes the
 * descriptor, on the assumption that it belongs to a wrapper program. For a
 * connection passed by the tsdist helper that assumption is wrong: the
 * helper sees the connection end only when the last copy of the descriptor
 * is closed, so tailscale_helper closes it here once the port is gone.
 *
 * The socket module cannot read SO_PEERCRED (OTP 25 and 27 both refuse
 * {socket, peercred}), so tailscale_helper_proc asks here who listens on
 * the control socket it connected to.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
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

/* peercred(Fd) -> {ok, {Pid, Uid, Gid}} | {error, Errno} */
static ERL_NIF_TERM peercred(ErlNifEnv *env, int argc, const ERL_NIF_TERM argv[])
{
    int fd;
    struct ucred cred;
    socklen_t len = sizeof cred;

    (void)argc;
    if (!enif_get_int(env, argv[0], &fd) || fd < 0)
        return enif_make_badarg(env);
    memset(&cred, 0, sizeof cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof cred) {
        const char *why = errno == EBADF ? "ebadf" : errno == ENOTSOCK ? "enotsock"
                        : errno == ENOTCONN ? "enotconn" : "einval";
        return enif_make_tuple2(env, enif_make_atom(env, "error"), enif_make_atom(env, why));
    }
    return enif_make_tuple2(env, enif_make_atom(env, "ok"),
                            enif_make_tuple3(env, enif_make_long(env, (long)cred.pid),
                                             enif_make_ulong(env, (unsigned long)cred.uid),
                                             enif_make_ulong(env, (unsigned long)cred.gid)));
}

static ErlNifFunc funcs[] = {
    {"close", 1, close_fd, 0},
    {"peercred", 1, peercred, 0},
};

ERL_NIF_INIT(tailscale_fd, funcs, NULL, NULL, NULL, NULL)
