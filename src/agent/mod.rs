//! The guest agent: one thread, one `mio::Poll`, sessions in a slab.
//!
//! - [`event_loop`]: the poll loop, frame dispatch, reaping, deadlines.
//! - [`session`]: one child's fds and flow control, as a state machine.
//! - [`spawn`]: from EXEC to a running child (clone, execve, error pipe).
//! - [`transport`]: the host stream and the output queue.
//! - [`user`]: `user` resolution from /etc/passwd and /etc/group.
//! - [`process`]: process-wide setup (signal mask, fd hygiene, subreaper).
//! - [`init`]: PID-1 duties (mounts, kernel command line, modules, the
//!   virtio port, logging, power-off).

pub mod event_loop;
pub mod init;
pub mod process;
pub mod session;
pub mod spawn;
pub mod transport;
pub mod user;

pub use event_loop::{Config, EventLoop, Exit};

use std::path::PathBuf;

use tracing::level_filters::LevelFilter;

use transport::Transport;

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
    pub mode: Mode,
    pub max_sessions: usize,
    pub stdin_window: u32,
    /// `error`, `warn`, `info`, `debug` or `trace`; else `AGENTD_LOG`, else warn.
    pub log_level: Option<String>,
}

impl Options {
    pub fn stdio() -> Options {
        let defaults = Config::default();
        Options {
            mode: Mode::Stdio,
            max_sessions: defaults.max_sessions,
            stdin_window: defaults.stdin_window,
            log_level: None,
        }
    }
}

/// Logs to stderr (nonblocking: see [`process::LogSink`]), never to the
/// transport.
///
/// The level is `level` (from `--log-level`), else `AGENTD_LOG`, else
/// warn; a value that is not a level is reported (at warn, which every
/// level but `error` and `off` shows) and warn is used.
pub fn init_logging(level: Option<&str>) {
    let (source, requested) = match level {
        Some(l) => ("--log-level", Some(l.to_owned())),
        None => ("AGENTD_LOG", std::env::var("AGENTD_LOG").ok()),
    };
    let parsed = requested.as_deref().map(str::parse::<LevelFilter>);
    let _ = tracing_subscriber::fmt()
        .with_max_level(match parsed {
            Some(Ok(level)) => level,
            _ => LevelFilter::WARN,
        })
        .with_writer(process::LogSink::stderr())
        .with_ansi(false)
        .try_init();
    if let (Some(Err(_)), Some(value)) = (parsed, requested) {
        tracing::warn!(
            "{source}={value:?} is not a log level (off, error, warn, info, debug, trace); logging at warn"
        );
    }
}

/// Runs the agent as a normal process (not PID 1 init): process setup,
/// the transport, the loop. Returns the process exit status.
pub fn run(opts: &Options) -> i32 {
    init_logging(opts.log_level.as_deref());
    process::cloexec_inherited_fds();
    // SAFETY: getpid cannot fail.
    let pid1 = unsafe { libc::getpid() } == 1;
    if !pid1 {
        if let Err(e) = process::become_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper; orphans will not be reaped here");
        }
    }
    let transport = match &opts.mode {
        Mode::Stdio => Transport::stdio(),
        Mode::Port(path) => Transport::open(path),
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
    let mut config = Config {
        max_sessions: opts.max_sessions,
        stdin_window: opts.stdin_window,
        pid1,
        ..Config::default()
    };
    config.defaults.child_nofile = process::raise_fd_limit();
    let mut event_loop = match EventLoop::new(config, transport) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("agentd: {e}");
            return 1;
        }
    };
    let exit = event_loop.run();
    tracing::info!(?exit, "agent exiting");
    0
}
