//! The guest agent: one thread, one `mio::Poll`, host links and sessions
//! in slabs. docs/DESIGN.md explains the loop; each module says why it is
//! shaped as it is.
//!
//! - `event_loop`: the poll and one turn of the loop ([`EventLoop`]).
//! - `core`: the agent's state and what the loop does with it: reading
//!   links, reaping, deadlines, backpressure, shutdown.
//! - `dispatch`: what each frame a host sends does.
//! - `link`: one host connection (transport, decoder, output queue,
//!   connection state); the only code that touches a transport fd.
//! - `stream`: the flow-controlled byte streams every session (and every
//!   extension stream) is made of.
//! - `session`: one child's fds and streams, as a state machine.
//! - `spawn`: from EXEC to a running child (clone, execve, status pipe).
//! - `transport`, `outqueue`: opening a host's transport; the queue of
//!   frames going to it.
//! - `timers`, `token`, `sys`: deadlines, event tokens, system calls.
//! - `fs`: the `fs` extension: file operations run by worker processes.
//! - `net`: the `net` extension: connections to guest sockets.
//! - `worker`: forking a worker process for work that may block.
//! - `user`: `user` resolution from /etc/passwd and /etc/group.
//! - `process`, `log`: process-wide setup and logging.
//! - [`init`]: PID-1 duties (mounts, kernel command line, modules, the
//!   virtio port, logging, power-off).

mod cgroups;
mod clock;
mod core;
mod dispatch;
mod event_loop;
mod fs;
pub mod init;
mod link;
mod listener;
mod log;
mod net;
mod outqueue;
mod process;
mod restore;
pub mod rootfs;
mod session;
mod sessions;
mod spawn;
mod stream;
mod sys;
mod timers;
mod token;
mod transport;
mod user;
mod worker;

pub use event_loop::{Config, EventLoop, Exit, LoopError};
pub use listener::{ListenAddr, Listener};
pub use log::parse_level;
pub use process::{become_subreaper, cloexec_inherited_fds, setup_signals};
pub use spawn::SpawnDefaults;
pub use sys::is_pid1;
pub use transport::{Transport, TransportKind};

use std::path::PathBuf;

/// The default of EXEC's `replay_bytes` where sessions can be attached by
/// another host (a device port, a listening transport).
pub const DEFAULT_REPLAY_BYTES: u32 = 64 * 1024;

/// Where the agent finds its host.
#[derive(Debug, Clone)]
pub enum Mode {
    /// stdin/stdout.
    Stdio,
    /// A device, FIFO or socket path.
    Port(PathBuf),
}

/// What `agentd`'s command line (or agentctl's embedded agent) asks for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The host's transport; `None` with only listening ones.
    pub mode: Option<Mode>,
    /// Listening transports (`--listen`): each accepted host is a link.
    pub listen: Vec<ListenAddr>,
    pub max_sessions: usize,
    pub stdin_window: u32,
    /// `off`, `error`, `warn`, `info`, `debug` or `trace`; else
    /// `AGENTD_LOG`, else warn.
    pub log_level: Option<String>,
    /// Where sessions' cgroups go.
    pub cgroups: CgroupSetting,
    /// Serve CLOCK_SET and ENTROPY (`--allow-clock`; always as a VM's init).
    pub allow_clock: bool,
    /// The agent is the init of a (virtual) machine: PID 1 of the
    /// machine's first pid namespace, on the init path. It then serves
    /// CLOCK_SET and ENTROPY and watches for restores.
    pub machine_init: bool,
    /// What the init path mounted (READY's `mounts`).
    pub mounts: Vec<crate::messages::MountStatus>,
}

/// Whether sessions get cgroups of their own, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CgroupSetting {
    /// None: process groups only (SIGNAL `tree` and the limits refused).
    #[default]
    Off,
    /// Under this cgroup2 directory (`--cgroup-root`), made if missing.
    Root(PathBuf),
    /// As PID 1: under `/sys/fs/cgroup/agentd`, when the kernel has
    /// cgroup2 (init mounts it).
    Init,
}

impl Options {
    pub fn stdio() -> Options {
        let defaults = Config::default();
        Options {
            mode: Some(Mode::Stdio),
            listen: Vec::new(),
            max_sessions: defaults.max_sessions,
            stdin_window: defaults.stdin_window,
            log_level: None,
            cgroups: CgroupSetting::Off,
            allow_clock: false,
            machine_init: false,
            mounts: Vec::new(),
        }
    }
}

/// Runs the event loop on an open transport, with `env` as the sessions'
/// base environment, until the transport closes or a shutdown completes.
/// Raises the agent's fd limit first (children get the original back).
pub fn serve(
    transport: Option<Transport>,
    listeners: Vec<Listener>,
    opts: &Options,
    env: Vec<(String, String)>,
) -> Result<Exit, LoopError> {
    // Sessions keep a replay where another host may later attach them: on
    // a device port (hosts come and go) and with listening transports.
    let device = transport
        .as_ref()
        .is_some_and(|t| t.kind() == TransportKind::Device);
    let replay_bytes = if device || !listeners.is_empty() {
        DEFAULT_REPLAY_BYTES
    } else {
        0
    };
    let config = Config {
        max_sessions: opts.max_sessions,
        stdin_window: opts.stdin_window,
        pid1: sys::is_pid1(),
        defaults: SpawnDefaults {
            env,
            child_nofile: process::raise_fd_limit(),
        },
        replay_bytes,
        allow_clock: opts.allow_clock || opts.machine_init,
        watch_restores: opts.machine_init,
        mounts: opts.mounts.clone(),
        cgroups: match &opts.cgroups {
            CgroupSetting::Off => None,
            CgroupSetting::Init => cgroups::CgroupRoot::for_init(),
            CgroupSetting::Root(dir) => Some(
                cgroups::CgroupRoot::open(dir).map_err(|e| LoopError::Cgroups(dir.clone(), e))?,
            ),
        },
    };
    let mut event_loop = EventLoop::with_listeners(config, transport, listeners)?;
    Ok(event_loop.run())
}

/// Binds every listening address, or says which failed.
pub fn bind_listeners(addrs: &[ListenAddr]) -> Result<Vec<Listener>, String> {
    addrs
        .iter()
        .map(|a| Listener::bind(a).map_err(|e| format!("listening on {a}: {e}")))
        .collect()
}

/// Runs the agent as a normal process (not PID 1 init): process setup,
/// the transport, the loop. Returns the process exit status.
pub fn run(opts: &Options) -> i32 {
    log::init_stderr_logging(opts.log_level.as_deref());
    process::cloexec_inherited_fds();
    if !sys::is_pid1() {
        if let Err(e) = process::become_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper; orphans will not be reaped here");
        }
    }
    let listeners = match bind_listeners(&opts.listen) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("agentd: {e}");
            return 1;
        }
    };
    let transport = match &opts.mode {
        Some(Mode::Stdio) => Transport::stdio().map(Some),
        Some(Mode::Port(path)) => Transport::open(path).map(Some),
        None => Ok(None),
    };
    let transport = match transport {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "opening the transport");
            eprintln!("agentd: opening the transport: {e}");
            return 1;
        }
    };
    // Only now: opening a FIFO pair waits for the host, and until the
    // loop runs SIGTERM and SIGINT must keep their default action (they
    // are blocked for the signalfd here; no child exists yet).
    if let Err(e) = process::setup_signals() {
        tracing::error!(error = %e, "blocking signals");
        return 1;
    }
    match serve(
        transport,
        listeners,
        opts,
        SpawnDefaults::from_agent_env().env,
    ) {
        Ok(exit) => {
            tracing::info!(?exit, "agent exiting");
            0
        }
        Err(e) => {
            eprintln!("agentd: {e}");
            1
        }
    }
}
