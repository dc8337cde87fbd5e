/*
 * LD_PRELOAD shim that turns on TCP Fast Open for every TCP client connect().
 *
 * Neither `ferrule loadgen` nor OpenSSL 3.0's s_client can open a TFO connection. This
 * shim sets TCP_FASTOPEN_CONNECT (Linux >= 4.11) on the socket right before connect():
 * connect() then returns at once and the first write (the ClientHello, plus 0-RTT data
 * when the client sends it in the same write) travels in the SYN once the kernel has a
 * TFO cookie for the server. Used by ttfb-netns.sh only; the client netns keeps
 * net.ipv4.tcp_fastopen's client bit (1) set, the server netns sets 3.
 *
 * Build: cc -shared -fPIC -O2 -o tfo-shim.so tfo-shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#ifndef TCP_FASTOPEN_CONNECT
#define TCP_FASTOPEN_CONNECT 30
#endif

typedef int (*connect_fn)(int, const struct sockaddr *, socklen_t);

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static connect_fn real_connect;
    int type = 0, one = 1;
    socklen_t tlen = sizeof(type);
    if (!real_connect)
        real_connect = (connect_fn)dlsym(RTLD_NEXT, "connect");
    if (addr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6) &&
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) == 0 && type == SOCK_STREAM)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_FASTOPEN_CONNECT, &one, sizeof(one));
    return real_connect(fd, addr, len);
}
