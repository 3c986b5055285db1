#!/usr/bin/env bash
# Soak test of agentd: `tests/soak.sh MINUTES` runs a mixed workload
# (pipes, ttys, stdin, floods, failures before and after fork, orphans,
# setsid escapees, signals, EPIPE) with 8 sessions in flight against one
# `agentd --stdio` for MINUTES minutes (decimals allowed), and every 10 s
# prints sessions/s, the agent's open fds, its RSS and its zombie
# children. It exits non-zero if the fd count changes, a zombie is not
# reaped within 10 s, RSS grows by more than 4 MiB, a session's outcome is
# wrong, or the agent dies. CI runs `tests/soak.sh 1`; an hour is
# `tests/soak.sh 60`. The workload is the ignored test `soak` in
# tests/reliability.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: tests/soak.sh MINUTES}
secs=$(awk -v m="$minutes" 'BEGIN { s = int(m * 60); if (s < 10) s = 10; print s }')
SOAK_SECS=$secs exec cargo test --profile ci --test reliability -- --ignored --exact soak --nocapture
