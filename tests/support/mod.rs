//! Test support, one tree for every test binary and the benchmark: each
//! includes it as `mod support;` (`#[path = "../support/mod.rs"]` from
//! tests/vm, `#[path = "../tests/support/mod.rs"]` from benches) and uses
//! the part it needs.
//!
//! - [`host`]: starting `agentd` ([`host::Opts`], [`host::AgentProcess`])
//!   and talking frames to it: the write side [`host::Host`] and
//!   [`host::Conn`], a host on any pair of fds that reads when asked.
//! - [`agent`]: the loopback suite's [`agent::Agent`], a reader thread and
//!   a stash of frames; [`sync_agent`]: [`sync_agent::SyncAgent`], driven
//!   frame by frame in the test's thread, with per-session logs
//!   (reliability, security).
//! - [`checker`]: the one contract checker, table-driven per frame kind.
//! - [`fs`]: a host of the fs extension on an [`agent::Agent`].
//! - [`msgpack`]: MessagePack read and written independently of the
//!   crate; [`wire`]: frames and messages built by hand.
//! - [`net`]: guest servers on loopback addresses (an echo server for many
//!   connections, scripted ones, full backlogs, refusing ports) and the
//!   host's side of the net extension over [`agent::Agent`].
//! - [`hvsock`]: the host side of a hybrid vsock (`CONNECT PORT` on the
//!   monitor's Unix socket), for the VM suite's vsock transport.
//! - [`proc`]: /proc (RSS, fds, children, descendants, zombies, CPU
//!   ticks); [`seccomp`]: the filters an agent can be started under;
//!   [`util`]: scratch directories, data, checksums, ptys, FIFOs, users.
//!
//! What every host here guarantees:
//! - Every frame the agent sends goes through the checker before a test
//!   sees it (its rules are in [`checker`]'s documentation: known agent →
//!   host kinds only, READY first, payloads of the contract's shape, the
//!   per-session order STARTED, then output and acks, then one EXITED, or
//!   EXEC_FAILED alone, nothing after EXITED, nothing after
//!   SHUTDOWN_DONE, acks never above what was sent...). A violation fails
//!   the test at once, with the frame.
//! - Every wait has a timeout ([`timeout`]; [`sync_agent::SYNC_TIMEOUT`]
//!   for the synchronous host; the benchmark alone reads and writes
//!   without one, so its host adds no system call to what it measures):
//!   a hung agent fails the test in bounded time, and so does one that
//!   stops reading what the host writes.
//! - Dropping an agent kills its whole process tree: every session's
//!   process group, every descendant (orphans a test left behind), then
//!   the agent.

#![allow(dead_code)] // each binary uses a subset

pub mod agent;
pub mod checker;
pub mod fs;
pub mod host;
pub mod hvsock;
pub mod listen;
pub mod msgpack;
pub mod net;
pub mod proc;
pub mod seccomp;
pub mod sync_agent;
pub mod util;
pub mod wire;

use std::time::{Duration, Instant};

/// The agent binary of this build.
pub const AGENTD: &str = env!("CARGO_BIN_EXE_agentd");

/// How long any single wait may take before the test fails. The machine
/// is shared, so this is generous; a hung agent still fails in bounded
/// time. `AGENTD_TEST_TIMEOUT_MS` overrides it.
pub fn timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("AGENTD_TEST_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(20), Duration::from_millis)
    })
}

/// Waits until `cond` holds, polling every 10 ms; false after `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
