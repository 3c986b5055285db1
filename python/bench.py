#!/usr/bin/env python3
"""Benchmark: the Python SDK against the Rust client (agentctl), measured in the same run.

    python3 python/bench.py [--bytes N] [--runs R] [--quick]

Measures, each side against the same agentd binary:

- exec round trip (p50): EXEC of ``true`` to EXITED on a live connection
  (Python), and the protocol floor measured with the bare codec on a socket;
- cold exec (p50): start an agent, run ``true``, stop (Python in-process;
  ``agentctl exec -- true``, which also starts agentctl itself);
- PING round trip (p50): ``client.ping()`` and ``agentctl ping``'s own times;
- stdout throughput (median of R): ``head -c N /dev/zero`` read to the end
  (Python: ``popen`` + ``stdout.iter_chunks()``; Rust: ``agentctl exec --
  head -c N /dev/zero > /dev/null``).

Prints a markdown table. Numbers are never asserted: the machine is shared
and noisy. Needs target/release/agentd and target/release/agentctl
(``cargo build --release --bin agentd --bin agentctl``), or AGENTD_BIN and
AGENTCTL_BIN.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable, List

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "src"))  # the package beside this script, installed or not

import agentd  # noqa: E402
from agentd import messages as m  # noqa: E402
from agentd.codec import FrameDecoder, encode_frame  # noqa: E402

AGENTD = os.environ.get("AGENTD_BIN") or str(REPO / "target" / "release" / "agentd")
AGENTCTL = os.environ.get("AGENTCTL_BIN") or str(REPO / "target" / "release" / "agentctl")


def p50(samples: List[float]) -> float:
    return statistics.median(samples)


def timed(fn: Callable[[], object], n: int) -> List[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def raw_exec_floor(n: int) -> float:
    """EXEC true -> EXITED with the bare codec over a socketpair: what the agent itself costs."""
    a, b = socket.socketpair()
    proc = subprocess.Popen([AGENTD, "--stdio"], stdin=b, stdout=b)
    b.close()
    dec = FrameDecoder()

    def until(kind: int) -> None:
        while True:
            data = a.recv(65536)
            if not data:
                raise SystemExit("the agent closed the connection")
            if any(getattr(f, "kind", None) == kind for f in dec.feed(data)):
                return

    until(0x01)
    samples = []
    for i in range(n):
        t = time.perf_counter()
        a.sendall(encode_frame(i + 1, m.Exec(cmd="true")))
        until(0x32)
        samples.append(time.perf_counter() - t)
    a.close()
    proc.wait()
    return p50(samples)


def python_throughput(client: agentd.Client, nbytes: int) -> float:
    t = time.perf_counter()
    p = client.popen(["head", "-c", str(nbytes), "/dev/zero"], stdin=agentd.DEVNULL, stderr=agentd.DEVNULL)
    n = 0
    for chunk in p.stdout.iter_chunks():
        n += len(chunk)
    p.wait()
    dt = time.perf_counter() - t
    assert n == nbytes, n
    return nbytes / dt


def rust_throughput(nbytes: int) -> float:
    with open(os.devnull, "wb") as null:
        t = time.perf_counter()
        subprocess.run([AGENTCTL, "--agent", f"{AGENTD} --stdio", "exec", "--", "head", "-c", str(nbytes),
                        "/dev/zero"], stdout=null, check=True)
        return nbytes / (time.perf_counter() - t)


def rust_cold_exec() -> None:
    subprocess.run([AGENTCTL, "--agent", f"{AGENTD} --stdio", "exec", "--", "true"], check=True)


def python_cold_exec() -> None:
    with agentd.Client.spawn(AGENTD) as c:
        c.run(["true"])


def rust_ping(n: int) -> float:
    out = subprocess.run([AGENTCTL, "--agent", f"{AGENTD} --stdio", "ping", "-c", str(n), "--interval", "0"],
                         capture_output=True, text=True, check=True).stdout
    times = [float(x) / 1e3 for x in re.findall(r"time=([0-9.]+) ms", out)]
    return p50(times)


def fmt_us(s: float) -> str:
    return f"{s * 1e6:.0f} µs"


def fmt_rate(r: float) -> str:
    return f"{r / 2**20:.0f} MiB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bytes", type=int, default=1 << 30, help="stdout bytes per throughput trial (default 1 GiB)")
    ap.add_argument("--runs", type=int, default=3, help="throughput trials per side (median kept)")
    ap.add_argument("--quick", action="store_true", help="small sizes (64 MiB, 1 run, fewer round trips)")
    args = ap.parse_args()
    if args.quick:
        args.bytes, args.runs = 64 << 20, 1
    n_rt = 50 if args.quick else 300
    n_cold = 10 if args.quick else 40
    for path in (AGENTD, AGENTCTL):
        if not os.access(path, os.X_OK):
            raise SystemExit(f"missing {path}: cargo build --release --bin agentd --bin agentctl")

    rows = []
    with agentd.Client.spawn(AGENTD) as client:
        for _ in range(20):
            client.run(["true"])
        py_exec = p50(timed(lambda: client.run(["true"]), n_rt))
        py_ping = p50(timed(client.ping, n_rt))
        floor = raw_exec_floor(n_rt)
        py_tp: List[float] = []
        rs_tp: List[float] = []
        for _ in range(args.runs):  # alternate the sides so both see the same machine
            py_tp.append(python_throughput(client, args.bytes))
            rs_tp.append(rust_throughput(args.bytes))
    py_cold = p50(timed(python_cold_exec, n_cold))
    rs_cold = p50(timed(rust_cold_exec, n_cold))
    rs_ping = rust_ping(n_rt)

    rows.append(("exec round trip, warm (`true`, p50)", fmt_us(py_exec), "—",
                 f"protocol floor (bare codec): {fmt_us(floor)}; SDK overhead {fmt_us(py_exec - floor)}"))
    rows.append(("exec, cold: start agent + `true` + stop (p50)", fmt_us(py_cold), fmt_us(rs_cold),
                 f"{rs_cold / py_cold:.2f}× (agentctl also starts its own process)"))
    rows.append(("PING round trip (p50)", fmt_us(py_ping), fmt_us(rs_ping), f"Python/Rust time {py_ping / rs_ping:.2f}×"))
    pt, rt = statistics.median(py_tp), statistics.median(rs_tp)
    rows.append((f"stdout throughput, {args.bytes >> 20} MiB (median of {args.runs})", fmt_rate(pt), fmt_rate(rt),
                 f"Python = {pt / rt:.2f}× the Rust client (target ≥ 0.5×)"))

    print(f"agentd: {AGENTD}\nPython {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, output window {agentd.DEFAULT_OUTPUT_WINDOW >> 20} MiB\n")
    print("| measure | Python SDK | Rust client (agentctl) | note |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
