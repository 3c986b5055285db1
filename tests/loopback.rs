//! Loopback integration tests: `agentd --stdio` driven through protocol v1
//! exactly as docs/PROTOCOL.md describes it.
//!
//! One test binary (link time matters on a shared machine), split into
//! modules by topic:
//! - [`basics`]: READY, PING/PONG, EXEC keys (env, cwd, user, rlimits,
//!   stdin), exit codes, signals.
//! - [`cgroups`]: per-session cgroups (`--cgroup-root`): tree signals,
//!   deadlines, limits enforced or refused, removal.
//! - [`clock`]: the clock extension (CLOCK_GET; CLOCK_SET and ENTROPY
//!   refused outside a VM's init).
//! - [`errors`]: every ERROR kind, framing (oversized, truncated), and
//!   garbage that must not disturb other sessions.
//! - [`exec_failed`]: every EXEC_FAILED kind.
//! - [`guarantees`]: the contract's seven guarantees.
//! - [`fs`]: the fs extension: every operation and error kind, users,
//!   windows, trees as tar, watches, nothing blocked or left behind.
//! - [`flow_control`]: STDIN window and acks, OUTPUT_ACK, a host that stops
//!   reading.
//! - [`limits`]: no reply over the frame limit whatever a request quotes;
//!   a shutdown always ends, whatever the windows and the host do.
//! - [`net`]: the net extension: connections to guest sockets (TCP and
//!   Unix), windows, half-close, resets, failures, many connections.
//! - [`pipelined`]: frames for a session sent before its STARTED.
//! - [`sessions`]: the sessions extension over `--listen`: several hosts,
//!   list, attach with replay, detach, kept exits, deadlines.
//! - [`transports`]: `--port` on a socket, a FIFO pair and a terminal.
//! - [`tty`]: terminal sessions.
//!
//! Tests marked with [`both!`] run twice: as a plain child of the test
//! (`::stdio`) and as PID 1 of a new pid namespace (`::pidns`, skipped
//! where no pid namespace can be made: `unshare --pid --fork
//! --mount-proc`, or `-Urpf --mount-proc` when not root).

mod support;
#[path = "support/self_tests.rs"]
mod support_self_tests;

/// Defines each `fn name(opts: Opts) { .. }` as a module `name` with two
/// tests: `stdio` (the agent as an ordinary process) and `pidns` (the agent
/// as PID 1 of its own pid namespace, when the machine allows it). An
/// `#[ignore = ".."]` after the doc comment applies to both.
macro_rules! both {
    ($($(#[doc = $doc:expr])* $(#[ignore = $reason:literal])? fn $name:ident($opts:ident: Opts) $body:block)*) => {
        $(
            $(#[doc = $doc])*
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                fn body($opts: $crate::support::host::Opts) $body

                #[test]
                $(#[ignore = $reason])?
                fn stdio() {
                    body($crate::support::host::Opts::default())
                }

                #[test]
                $(#[ignore = $reason])?
                fn pidns() {
                    if !$crate::support::host::pidns_available() {
                        eprintln!("skipped: no pid namespace here (unshare --pid --fork --mount-proc, or -Urpf --mount-proc when not root)");
                        return;
                    }
                    body($crate::support::host::Opts::default().pidns(true))
                }
            }
        )*
    };
}

#[path = "loopback/basics.rs"]
mod basics;
#[path = "loopback/cgroups.rs"]
mod cgroups;
#[path = "loopback/clock.rs"]
mod clock;
#[path = "loopback/errors.rs"]
mod errors;
#[path = "loopback/exec_failed.rs"]
mod exec_failed;
#[path = "loopback/flow_control.rs"]
mod flow_control;
#[path = "loopback/fs.rs"]
mod fs;
#[path = "loopback/guarantees.rs"]
mod guarantees;
#[path = "loopback/init.rs"]
mod init;
#[path = "loopback/limits.rs"]
mod limits;
#[path = "loopback/net.rs"]
mod net;
#[path = "loopback/pipelined.rs"]
mod pipelined;
#[path = "loopback/sessions.rs"]
mod sessions;
#[path = "loopback/transports.rs"]
mod transports;
#[path = "loopback/tty.rs"]
mod tty;
