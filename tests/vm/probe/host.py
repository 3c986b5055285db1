#!/usr/bin/env python3
"""Host side of `tests/vm/run.sh --probe`: connects to QEMU's chardev socket, goes away and
comes back in the ways that matter to the agent, and prints what it saw. The guest side of
the story is on the VM console (lines starting with [probe)."""
import socket
import sys
import time

SOCK = sys.argv[1]
CONSOLE = sys.argv[2]
T0 = time.time()


def log(*a):
    print("[host %7.3f]" % (time.time() - T0), *a, flush=True)


def connect():
    s = socket.socket(socket.AF_UNIX)
    s.connect(SOCK)
    return s


def read_for(s, seconds, until_newline=False):
    s.settimeout(seconds)
    out = b""
    try:
        while not (until_newline and b"\n" in out):
            d = s.recv(1 << 20)
            if not d:
                break
            out += d
    except socket.timeout:
        pass
    return out


# 1. Let the guest open the port with no host connected (it polls IN|HUP), then connect.
while b"ET event #1:" not in open(CONSOLE, "rb").read():
    if time.time() - T0 > 120:
        sys.exit("the probe did not start within 120 s")
    time.sleep(0.2)
time.sleep(1)
s = connect()
log("connected; got", read_for(s, 2, True))
s.sendall(b"abc")
log("sent abc; got", read_for(s, 1))
# 2. Disconnect, reconnect 2 s later: the guest must see HUP, then OUT, and greet again.
s.close()
log("closed")
time.sleep(2)
s = connect()
log("reconnected; got", read_for(s, 2, True))
# 3. Make the guest fill the queue while this host does not read, then leave: the next
#    host must not receive those stale bytes.
s.sendall(b"flood")
time.sleep(1)
s.close()
log("closed without reading the flood")
time.sleep(1)
s = connect()
got = read_for(s, 2)
log("next host got %d bytes: %r" % (len(got), got[:40]))
# 4. Close and reconnect within 0.2 s while the guest is not in epoll_wait: coalesced.
s.sendall(b"sleep")
time.sleep(0.5)
s.close()
time.sleep(0.2)
s = connect()
log("quick reconnect while the guest slept; got %r (no greeting expected)" % read_for(s, 4, True))
s.close()
time.sleep(0.5)
# 5. How soon may a host reconnect after the previous one closed, with an idle guest?
for gap in [0.05, 0.01, 0.001, 0.0]:
    misses = 0
    n = 10
    for _ in range(n):
        time.sleep(gap)
        s = connect()
        if not read_for(s, 1.0, True).startswith(b"HELLO"):
            misses += 1
        s.close()
    log("reconnect %4.0f ms after a close: %d/%d got no greeting" % (gap * 1000, misses, n))
    time.sleep(0.5)
s = connect()
read_for(s, 1, True)
s.sendall(b"quit")
time.sleep(0.5)
s.close()
log("done")
