/* bench/relay.c - the floor of the iii benchmarks: a bare TCP relay, the cheapest possible
 * router. For every accepted connection it opens one connection to the target port and copies
 * bytes both ways, unparsed, in one poll() loop (the engine's own process model). It knows
 * nothing of WebSocket or JSON: whatever the engine does beyond this is the cost of routing.
 *
 *   relay LISTEN_PORT TARGET_PORT     (127.0.0.1 only; LISTEN_PORT 0 = any free port)
 * Prints "relay: listening on 127.0.0.1:PORT" once bound; SIGTERM ends it (exit 0).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#define MAXPAIRS 4096
#define BUFSZ (256 * 1024)

struct dir {
    unsigned char *b;
    size_t len, off;
};
struct pair {
    int fd[2]; /* 0 = accepted client, 1 = upstream */
    int connected;
    struct dir d[2]; /* d[0]: client -> upstream, d[1]: upstream -> client */
};

static struct pair *pairs[MAXPAIRS];
static int npairs;
static volatile sig_atomic_t stop;

static void on_term(int s) { (void)s, stop = 1; }

static void nb(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void pair_close(int i)
{
    struct pair *p = pairs[i];
    close(p->fd[0]), close(p->fd[1]);
    free(p->d[0].b), free(p->d[1].b), free(p);
    pairs[i] = pairs[--npairs];
}

/* Moves bytes for direction k (from fd[k] to fd[1-k]). -1 when the pair is finished. */
static int pump(struct pair *p, int k, int readable)
{
    struct dir *d = &p->d[k];
    int from = p->fd[k], to = p->fd[1 - k];
    if (readable && d->len == 0) {
        ssize_t r = read(from, d->b, BUFSZ);
        if (r == 0) return -1;
        if (r < 0 && errno != EAGAIN && errno != EINTR) return -1;
        if (r > 0) d->len = (size_t)r, d->off = 0;
    }
    while (d->off < d->len) {
        ssize_t w = write(to, d->b + d->off, d->len - d->off);
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) break;
        if (w <= 0) return -1;
        d->off += (size_t)w;
    }
    if (d->off == d->len) d->len = d->off = 0;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: relay LISTEN_PORT TARGET_PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int target = atoi(argv[2]);
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(argv[1]));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 1024) < 0) {
        perror("relay: listen");
        return 1;
    }
    getsockname(lfd, (struct sockaddr *)&a, &al);
    fcntl(lfd, F_SETFL, fcntl(lfd, F_GETFL) | O_NONBLOCK);
    printf("relay: listening on 127.0.0.1:%d\n", ntohs(a.sin_port));
    fflush(stdout);
    static struct pollfd pf[1 + 2 * MAXPAIRS];
    while (!stop) {
        int n = 0;
        pf[n].fd = lfd, pf[n].events = POLLIN, pf[n].revents = 0, n++;
        for (int i = 0; i < npairs; i++) {
            struct pair *p = pairs[i];
            for (int k = 0; k < 2; k++) {
                short ev = 0;
                if (!p->connected) ev = k == 1 ? POLLOUT : 0;
                else {
                    if (p->d[k].len == 0) ev |= POLLIN;      /* room to read from fd[k] */
                    if (p->d[1 - k].len) ev |= POLLOUT;       /* bytes waiting for fd[k] */
                }
                pf[n].fd = p->fd[k], pf[n].events = ev, pf[n].revents = 0, n++;
            }
        }
        if (poll(pf, (nfds_t)n, 1000) < 0) {
            if (errno == EINTR) continue;
            perror("relay: poll");
            return 1;
        }
        int np = npairs;
        for (int i = np - 1; i >= 0; i--) {
            struct pair *p = pairs[i];
            short r0 = pf[1 + 2 * i].revents, r1 = pf[2 + 2 * i].revents;
            if (!p->connected) {
                if (r1 & (POLLOUT | POLLERR | POLLHUP)) {
                    int err = 0;
                    socklen_t el = sizeof err;
                    getsockopt(p->fd[1], SOL_SOCKET, SO_ERROR, &err, &el);
                    if (err) {
                        pair_close(i);
                        continue;
                    }
                    p->connected = 1;
                }
                continue;
            }
            int bad = 0;
            if ((r0 & (POLLIN | POLLHUP | POLLERR)) || (r1 & POLLOUT)) bad |= pump(p, 0, !!(r0 & (POLLIN | POLLHUP | POLLERR)));
            if (!bad && ((r1 & (POLLIN | POLLHUP | POLLERR)) || (r0 & POLLOUT)))
                bad |= pump(p, 1, !!(r1 & (POLLIN | POLLHUP | POLLERR)));
            if (bad) pair_close(i);
        }
        if (pf[0].revents & POLLIN) {
            for (;;) {
                int cfd = accept(lfd, NULL, NULL);
                if (cfd < 0) break;
                int ufd = socket(AF_INET, SOCK_STREAM, 0);
                struct pair *p = calloc(1, sizeof *p);
                if (npairs >= MAXPAIRS || ufd < 0 || !p || !(p->d[0].b = malloc(BUFSZ)) || !(p->d[1].b = malloc(BUFSZ))) {
                    close(cfd);
                    if (ufd >= 0) close(ufd);
                    if (p) free(p->d[0].b), free(p);
                    continue;
                }
                nb(cfd), nb(ufd);
                struct sockaddr_in t;
                memset(&t, 0, sizeof t);
                t.sin_family = AF_INET;
                t.sin_port = htons((unsigned short)target);
                t.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
                if (connect(ufd, (struct sockaddr *)&t, sizeof t) < 0 && errno != EINPROGRESS) {
                    close(cfd), close(ufd), free(p->d[0].b), free(p->d[1].b), free(p);
                    continue;
                }
                p->fd[0] = cfd, p->fd[1] = ufd;
                pairs[npairs++] = p;
            }
        }
    }
    while (npairs) pair_close(npairs - 1);
    return 0;
}
