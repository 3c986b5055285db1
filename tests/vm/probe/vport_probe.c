// vport_probe: what poll and epoll report on a virtio-console port as a host connects,
// disconnects and reconnects to QEMU's chardev socket. Booted as the VM's program by
// `tests/vm/run.sh --probe` (init.sh mounts, loads the modules and starts it; host.py
// plays the host). Findings: docs/VM.md and the module doc of src/agent/init.rs.
//
// It opens the port once (O_RDWR | O_NONBLOCK), registers it edge-triggered with epoll,
// and for every event prints the event mask, a level snapshot taken with poll(), and what
// read() and write() return. It greets ("HELLO n") on every event after one where read()
// had HUP (no host), on the first event without HUP, as an agent sends READY to each new
// host. Commands from the host:
// "sleep" (stay out of epoll_wait for 3 s), "flood" (write until EAGAIN), "quit".
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static double t0;
#define LOG(...) do { printf("[probe %7.3f] ", now() - t0); printf(__VA_ARGS__); printf("\n"); fflush(stdout); } while (0)

static const char *pollstr(int r) {
    static char b[128];
    b[0] = 0;
    if (r & POLLIN) strcat(b, "IN ");
    if (r & POLLOUT) strcat(b, "OUT ");
    if (r & POLLHUP) strcat(b, "HUP ");
    if (r & POLLERR) strcat(b, "ERR ");
    if (r & POLLRDHUP) strcat(b, "RDHUP ");
    if (r & POLLNVAL) strcat(b, "NVAL ");
    if (!b[0]) strcat(b, "-");
    return b;
}

static int snapshot(int fd) {
    struct pollfd p = {.fd = fd, .events = POLLIN | POLLOUT | POLLRDHUP};
    int n = poll(&p, 1, 0);
    return n > 0 ? p.revents : 0;
}

int main(int argc, char **argv) {
    t0 = now();
    const char *path = argc > 1 ? argv[1] : "/dev/vport0p1";
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) { LOG("open %s: %s", path, strerror(errno)); return 1; }
    LOG("opened %s; poll snapshot: %s", path, pollstr(snapshot(fd)));
    {
        char c;
        ssize_t r = read(fd, &c, 1);
        LOG("initial read -> %zd (%s)", r, r < 0 ? strerror(errno) : "");
        r = write(fd, "X", 1);
        LOG("initial write -> %zd (%s)", r, r < 0 ? strerror(errno) : "");
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    int greeted = 0, nev = 0;
    long total_in = 0;
    for (;;) {
        struct epoll_event out[4];
        int n = epoll_wait(ep, out, 4, 30000);
        if (n == 0) { LOG("epoll_wait: 30 s timeout, snapshot %s", pollstr(snapshot(fd))); break; }
        for (int i = 0; i < n; i++) {
            nev++;
            LOG("ET event #%d: %s| snapshot now: %s", nev, pollstr(out[i].events), pollstr(snapshot(fd)));
            // The event's HUP bit is the reliable sign that the host left: read() may
            // already see the next host (EAGAIN) by the time it runs.
            if (out[i].events & EPOLLHUP) greeted = 0;
            // drain reads
            char buf[65536];
            for (;;) {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r > 0) {
                    total_in += r;
                    LOG("  read %zd bytes: '%.*s'", r, (int)(r > 40 ? 40 : r), buf);
                    if (r >= 4 && memcmp(buf, "quit", 4) == 0) { LOG("quit"); return 0; }
                    if (r >= 5 && memcmp(buf, "sleep", 5) == 0) { LOG("  sleeping 3 s"); sleep(3); LOG("  woke, snapshot %s", pollstr(snapshot(fd))); }
                    if (r >= 5 && memcmp(buf, "flood", 5) == 0) {
                        // write until EAGAIN, count bytes
                        static char big[65536];
                        memset(big, 'f', sizeof big);
                        long w = 0; int calls = 0; ssize_t maxw = 0;
                        for (;;) {
                            ssize_t k = write(fd, big, sizeof big);
                            if (k < 0) { LOG("  flood: %ld bytes in %d writes (max %zd per write), then %s", w, calls, maxw, strerror(errno)); break; }
                            w += k; calls++; if (k > maxw) maxw = k;
                        }
                    }
                    continue;
                }
                if (r == 0) { LOG("  read -> 0 (no host), snapshot %s", pollstr(snapshot(fd))); break; }
                LOG("  read -> -1 %s", strerror(errno));
                break;
            }
            if (!greeted && !(out[i].events & EPOLLHUP)) {
                char msg[64];
                int len = snprintf(msg, sizeof msg, "HELLO %d\n", nev);
                ssize_t w = write(fd, msg, len);
                LOG("  write greeting -> %zd (%s)", w, w < 0 ? strerror(errno) : "ok");
                if (w == len) greeted = 1;
            }
        }
    }
    return 0;
}
