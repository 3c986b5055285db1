//! The agent's one thread: a single `mio::Poll` over the host links, a
//! signalfd for SIGCHLD (and the shutdown signals), and every session's
//! PTY master or pipes.
//!
//! Each turn of the loop (docs/DESIGN.md, "The loop"):
//! 1. `pump`: flush every link's queue; let sessions stalled by
//!    backpressure (or by their turn's end) read again while it is low.
//! 2. If the agent is done (a transport closed, a shutdown completed),
//!    write out what is queued, in bounded time, and return.
//! 3. Wait for readiness, with the timeout of the nearest deadline, or
//!    forever when there is none (an idle agent never wakes), or zero when
//!    work is possible without an event.
//! 4. For each event, note what became readable or writable (mio is
//!    edge-triggered, so each fd keeps a "may have more" flag until a read
//!    or write returns EAGAIN) and do what the fd allows.
//! 5. Read and dispatch every link's frames.
//! 6. End the visit of hosts that hung up on a device port.
//! 7. Run the deadlines that are due.

use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Poll};
use nix::sys::signal::{SigSet, Signal as NixSignal};

use super::core::Core;
use super::listener::Listener;
use super::spawn::SpawnDefaults;
use super::sys;
use super::token::Source;
use super::transport::Transport;

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_sessions: usize,
    pub stdin_window: u32,
    pub pid1: bool,
    pub defaults: SpawnDefaults,
    /// The default of EXEC's `replay_bytes`: bytes of each output stream
    /// kept for a later ATTACH. 0 where no other host could ever attach.
    pub replay_bytes: u32,
    /// Where sessions' cgroups are made (`None`: no cgroups).
    pub(crate) cgroups: Option<super::cgroups::CgroupRoot>,
    /// CLOCK_SET and ENTROPY are served (a VM's init, or `--allow-clock`).
    pub allow_clock: bool,
    /// Restores are watched for (a VM's init).
    pub watch_restores: bool,
    /// What the init path mounted, for READY's `mounts`.
    pub mounts: Vec<crate::messages::MountStatus>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_sessions: 1024,
            stdin_window: 256 * 1024,
            pid1: false,
            defaults: SpawnDefaults::from_agent_env(),
            replay_bytes: 0,
            cgroups: None,
            allow_clock: false,
            watch_restores: false,
            mounts: Vec::new(),
        }
    }
}

/// Why [`EventLoop::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// End of file on a stdio or stream transport: sessions were killed.
    TransportClosed,
    /// SHUTDOWN (or a shutdown signal) completed: SHUTDOWN_DONE was sent.
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("creating the poll instance: {0}")]
    Poll(io::Error),
    #[error("setting up the signalfd: {0}")]
    Signals(nix::Error),
    #[error("registering the transport: {0}")]
    Register(io::Error),
    #[error("the cgroup root {path}: {1}", path = .0.display())]
    Cgroups(std::path::PathBuf, io::Error),
}

/// The signals the loop takes through its signalfd. They are blocked for
/// the agent; children get an empty mask (see spawn.rs). SIGTERM, SIGINT
/// and SIGPWR start a graceful shutdown; as PID 1 so do SIGUSR1 and
/// SIGUSR2, which busybox `halt` and `poweroff` send to init.
pub(crate) fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        NixSignal::SIGCHLD,
        NixSignal::SIGTERM,
        NixSignal::SIGINT,
        NixSignal::SIGPWR,
    ] {
        set.add(sig);
    }
    if sys::is_pid1() {
        set.add(NixSignal::SIGUSR1);
        set.add(NixSignal::SIGUSR2);
    }
    set
}

/// The poll and everything it watches.
pub struct EventLoop {
    poll: Poll,
    core: Core,
}

impl EventLoop {
    /// Sets up the poll, the signalfd (the handled signals must already be
    /// blocked) and the transport's registration; READY is queued.
    pub fn new(config: Config, transport: Transport) -> Result<EventLoop, LoopError> {
        EventLoop::with_listeners(config, Some(transport), Vec::new())
    }

    /// As [`EventLoop::new`], with listening sockets whose accepted hosts
    /// become links too; `transport` may be absent then.
    pub fn with_listeners(
        config: Config,
        transport: Option<Transport>,
        listeners: Vec<Listener>,
    ) -> Result<EventLoop, LoopError> {
        let poll = Poll::new().map_err(LoopError::Poll)?;
        let registry = poll.registry().try_clone().map_err(LoopError::Poll)?;
        let core = Core::new(config, registry, transport, listeners)?;
        Ok(EventLoop { poll, core })
    }

    /// Runs until the transport closes (stdio, socket) or a shutdown
    /// completes. Never returns early on a bad frame or a child's
    /// behaviour.
    pub fn run(&mut self) -> Exit {
        let mut events = Events::with_capacity(256);
        loop {
            self.core.pump();
            if let Some(exit) = self.core.exit {
                self.core.finish_output();
                self.core.remove_cgroups();
                return exit;
            }
            let timeout = self.core.next_timeout(Instant::now());
            for (_, link) in self.core.links.iter_mut() {
                link.release_spare();
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                // EINTR: a signal not routed to the signalfd (none are
                // expected) or a stop/continue; just poll again. Anything
                // else is an epoll failure that retrying may not fix, so
                // log it and back off instead of spinning.
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            for event in events.iter() {
                self.on_event(event);
            }
            let links: Vec<usize> = self.core.links.iter().map(|(k, _)| k).collect();
            for lk in links {
                self.core.serve_link(lk);
            }
            self.core.end_departed_visits();
            self.core.on_deadlines(Instant::now());
        }
    }

    fn on_event(&mut self, event: &mio::event::Event) {
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let core = &mut self.core;
        match Source::from_token(event.token()) {
            Some(Source::Signals) => core.on_signals(),
            Some(Source::Link(lk, fd)) => {
                core.on_link_event(lk, fd, event.is_read_closed(), event.is_writable())
            }
            Some(Source::Session(key, super::token::SessionFd::Start)) => {
                // A stale event for a session removed earlier in this batch
                // is dropped; for a key reused since, it is only a spurious
                // "try".
                core.resolve_start(key, false);
            }
            Some(Source::Session(key, fd)) => {
                if let Some(s) = core.sessions.get_mut(key) {
                    s.on_event(fd, readable, event.is_writable());
                    core.service(key);
                }
            }
            Some(Source::Fs(key, fd)) => {
                if let Some(t) = core.fs.get_mut(key) {
                    t.on_event(fd);
                    core.service_fs(key);
                }
            }
            Some(Source::Net(key, fd)) => core.on_net_event(key, fd, readable, event.is_writable()),
            Some(Source::Listener(key)) => core.on_listener_event(key),
            Some(Source::Uevents) => core.on_uevents(),
            None => tracing::warn!(token = event.token().0, "event for an unknown token"),
        }
    }

    /// Bytes queued for the first host (for memory tests).
    pub fn queued(&self) -> usize {
        self.core.links.iter().map(|(_, l)| l.pending()).sum()
    }
}
