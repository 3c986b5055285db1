//! The agent's state, and everything the loop does with it: reading host
//! links and dispatching their frames ([`super::dispatch`]), starting,
//! reaping and finishing sessions, deadlines, backpressure and shutdown.
//!
//! One owner per piece of state: links own their transports and queues,
//! sessions own their children's fds and streams, and `Core` owns the
//! tables that tie them together: the host ids of each link, the pids
//! being waited for, the timers.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use slab::Slab;

use crate::codec::{self, MAX_PAYLOAD};
use crate::messages::{
    self, ErrorKind, ErrorMsg, ExecFailed, Exited, Kind, Ready, PROTOCOL_VERSION,
};

use super::cgroups::SessionCgroup;
use super::event_loop::{handled_signals, Config, Exit, LoopError};
use super::fs;
use super::link::{HostLink, Input};
use super::listener::Listener;
use super::net;
use super::restore::Uevents;
use super::session::{Session, Target};
use super::spawn::{SpawnError, StartReport, StartStatus};
use super::sys::{self, send_signal, Reaped};
use super::timers::{timeout_until, Timer, Timers};
use super::token::Source;
use super::transport::{Transport, TransportKind};

/// The grace SIGTERM, SIGINT and SIGPWR give sessions.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_millis(1000);

/// After a shutdown's SIGKILL, how long sessions may still take to hand
/// their output to a host that reads; after it whatever output is left is
/// dropped (and counted), so a shutdown always ends, whatever the windows
/// and the host do.
pub(crate) const SHUTDOWN_DRAIN: Duration = Duration::from_millis(1000);

/// How many finished sessions are kept for LIST and ATTACH.
pub(crate) const KEPT_RECORDS: usize = 256;

/// How long the agent waits, on its way out, for hosts to take what is
/// queued for them.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShutdownPhase {
    /// SIGTERM has gone out; SIGKILL at the deadline.
    Grace,
    /// SIGKILL has gone out; output still held is dropped at the deadline.
    Drain,
    /// Everything is being dropped; sessions end as they are reaped.
    Dropping,
}

#[derive(Debug)]
struct Shutdown {
    phase: ShutdownPhase,
    deadline: Instant,
}

/// What a host id names (and what waits on a link's list to resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owned {
    Session(usize),
    Fs(usize),
    Net(usize),
}

/// What a child pid is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Child {
    Session(usize),
    /// A file operation's worker: the task's key and its number (the slot
    /// may hold a later task by the time the worker is reaped).
    FsWorker(usize, u64),
    /// A worker connecting for a connection: it answers on its socket;
    /// its exit needs nothing but reaping.
    Connector,
}

pub(crate) struct Core {
    pub(crate) registry: Registry,
    signals: SignalFd,
    pub(crate) links: Slab<HostLink>,
    pub(crate) sessions: Slab<Session>,
    /// File operations in progress.
    pub(crate) fs: Slab<fs::Task>,
    /// Connections to guest sockets.
    pub(crate) net: Slab<net::Conn>,
    /// Listening transports.
    listeners: Slab<Listener>,
    /// What each host id of each link names. Ids are the host's, one space
    /// per connection, shared by sessions and every extension's streams.
    pub(crate) ids: HashMap<(usize, u32), Owned>,
    /// Children being waited for, by pid (only when reaping: everything
    /// else is keyed by id).
    pub(crate) by_pid: HashMap<libc::pid_t, Child>,
    /// Finished sessions kept as records, oldest first.
    pub(crate) finished: VecDeque<usize>,
    /// Sessions that yielded their turn with nothing to wait for (they
    /// drop their output: no link's draining will resume them): serviced
    /// again next turn.
    yielded: VecDeque<usize>,
    /// Children killed before their session existed (their fds could not
    /// be registered), with the memory they ran on, freed once reaped.
    unwatched: HashMap<libc::pid_t, StartStatus>,
    /// Cgroups of finished sessions that processes still run in (a
    /// background grandchild): removed once empty, signalled at shutdown.
    lingering_cgroups: Vec<SessionCgroup>,
    pub(crate) timers: Timers,
    pub(crate) config: Config,
    shutdown: Option<Shutdown>,
    pub(crate) exit: Option<Exit>,
    /// The next session's agent-wide number.
    next_seq: u64,
    /// Restores from a snapshot noticed (READY's and CLOCK's `restores`).
    pub(crate) restores: u32,
    /// The kernel's uevents, watched for a new VM generation (as a VM's
    /// init only).
    uevents: Option<Uevents>,
}

impl Core {
    /// The signalfd (the handled signals must already be blocked) and the
    /// first link's registration.
    pub(crate) fn new(
        config: Config,
        registry: Registry,
        transport: Option<Transport>,
        listeners: Vec<Listener>,
    ) -> Result<Core, LoopError> {
        let signals = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(LoopError::Signals)?;
        registry
            .register(
                &mut SourceFd(&signals.as_fd().as_raw_fd()),
                Source::Signals.token(),
                Interest::READABLE,
            )
            .map_err(LoopError::Register)?;
        let mut core = Core {
            registry,
            signals,
            links: Slab::new(),
            sessions: Slab::new(),
            fs: Slab::new(),
            net: Slab::new(),
            listeners: Slab::new(),
            ids: HashMap::new(),
            by_pid: HashMap::new(),
            unwatched: HashMap::new(),
            lingering_cgroups: Vec::new(),
            yielded: VecDeque::new(),
            finished: VecDeque::new(),
            timers: Timers::default(),
            config,
            shutdown: None,
            exit: None,
            next_seq: 1,
            restores: 0,
            uevents: None,
        };
        if let Some(t) = transport {
            core.add_link(t).map_err(LoopError::Register)?;
        }
        for l in listeners {
            let key = core.listeners.vacant_key();
            core.registry
                .register(
                    &mut SourceFd(&l.fd()),
                    Source::Listener(key).token(),
                    Interest::READABLE,
                )
                .map_err(LoopError::Register)?;
            core.listeners.insert(l);
        }
        if core.config.watch_restores {
            core.watch_restores();
        }
        Ok(core)
    }

    /// A listening socket is readable: accepts every waiting host.
    pub(crate) fn on_listener_event(&mut self, key: usize) {
        loop {
            let Some(l) = self.listeners.get(key) else {
                return;
            };
            match l.accept() {
                Ok(Some(fd)) => {
                    tracing::info!(listener = %l.addr(), "host connected");
                    let transport = Transport::from_fd(fd, TransportKind::Accepted);
                    if let Err(e) = self.add_link(transport) {
                        tracing::warn!(error = %e, "cannot watch an accepted connection");
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    // EMFILE and the like: the connection stays in the
                    // backlog; the next event tries again.
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }

    /// The host of an accepted link is gone: the link goes, its file
    /// operations and connections end, its sessions are detached.
    fn remove_link(&mut self, lk: usize) {
        self.drop_link_tasks(lk);
        self.drop_link_conns(lk);
        let keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.owner().is_some_and(|o| o.link == lk))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let s = &mut self.sessions[key];
            if let Some(o) = s.owner() {
                self.ids.remove(&(o.link, o.id));
            }
            s.detach();
            // Its output now goes to its rings.
            self.service(key);
        }
        let link = self.links.remove(lk);
        link.deregister(&self.registry);
        tracing::info!(sessions_detached = self.live_sessions(), "host went away");
    }

    /// Registers a host link and greets its host with READY.
    fn add_link(&mut self, transport: Transport) -> std::io::Result<usize> {
        let entry = self.links.vacant_entry();
        let key = entry.key();
        let link = HostLink::new(transport);
        link.register(&self.registry, key)?;
        let link = entry.insert(link);
        let ready = ready_frame(&self.config, self.restores);
        link.frames().extend_from_slice(&ready);
        Ok(key)
    }

    /// Watches the kernel's uevents for a restore (a VM's init only; a
    /// failure is logged: the host can still ask CLOCK_GET).
    fn watch_restores(&mut self) {
        let u = match Uevents::open() {
            Ok(u) => u,
            Err(e) => {
                return tracing::warn!(error = %e, "cannot watch uevents: restores go unnoticed")
            }
        };
        let r = self.registry.register(
            &mut SourceFd(&u.raw_fd()),
            Source::Uevents.token(),
            Interest::READABLE,
        );
        match r {
            Ok(()) => self.uevents = Some(u),
            Err(e) => tracing::warn!(error = %e, "cannot poll uevents: restores go unnoticed"),
        }
    }

    /// Uevents arrived: on a new VM generation (a restore from a snapshot,
    /// a clone) the counter goes up and every connection gets READY again.
    pub(crate) fn on_uevents(&mut self) {
        let Some(u) = &self.uevents else { return };
        if !u.drain_restored() {
            return;
        }
        self.restores += 1;
        tracing::info!(
            restores = self.restores,
            "the VM generation changed: restored from a snapshot"
        );
        let ready = ready_frame(&self.config, self.restores);
        for (_, link) in self.links.iter_mut() {
            link.frames().extend_from_slice(&ready);
        }
    }

    /// The next session's agent-wide number.
    pub(crate) fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Queues ERROR on link `lk`.
    pub(crate) fn send_error(
        &mut self,
        lk: usize,
        id: u32,
        kind: ErrorKind,
        message: String,
        frame_kind: Option<u8>,
    ) {
        tracing::debug!(id, %kind, %message, "ERROR");
        let msg = ErrorMsg::new(kind, message, frame_kind);
        if let Some(link) = self.links.get_mut(lk) {
            push_map(link.frames(), Kind::Error, id, &msg);
        }
    }

    /// Queues EXEC_FAILED on link `lk`.
    pub(crate) fn exec_failed(&mut self, lk: usize, id: u32, err: SpawnError) {
        tracing::debug!(id, kind = %err.kind, message = %err.message, "EXEC_FAILED");
        let msg = ExecFailed::new(err.kind, err.message, err.errno, err.stage);
        if let Some(link) = self.links.get_mut(lk) {
            push_map(link.frames(), Kind::ExecFailed, id, &msg);
        }
    }

    // -----------------------------------------------------------------
    // Sessions: start, service, reap, finish.

    /// A new session, registered under `key`: known by id and by pid
    /// before the loop next reaps, so its exit cannot be missed.
    pub(crate) fn add_session(&mut self, key: usize, session: Session) {
        let pid = session.pid();
        if let Some(o) = session.owner() {
            self.ids.insert((o.link, o.id), Owned::Session(key));
        }
        self.by_pid.insert(pid, Child::Session(key));
        self.sessions.insert(session);
    }

    /// Sessions not yet finished (finished ones are kept as records).
    pub(crate) fn live_sessions(&self) -> usize {
        self.sessions.len() - self.finished.len()
    }

    /// A child that runs but cannot be watched: stopped without waiting (a
    /// child stuck before exec, in a hung filesystem, dies only when its
    /// system call returns). The memory it runs on is kept until the loop
    /// reaps it.
    pub(crate) fn unwatched(&mut self, pid: libc::pid_t, status: StartStatus) {
        send_signal(pid, libc::SIGKILL);
        self.unwatched.insert(pid, status);
    }

    /// Reads a starting session's status pipe: on exec, STARTED; on a
    /// failure before exec, EXEC_FAILED and the session is gone. `reaped`
    /// says the child has been waited for already. Returns whether the
    /// session still exists.
    pub(crate) fn resolve_start(&mut self, key: usize, reaped: bool) -> bool {
        let Some(s) = self.sessions.get_mut(key) else {
            return false;
        };
        let Some(status) = s.start_status() else {
            return true;
        };
        if reaped {
            // Whatever the pipe says, the child no longer runs on the
            // memory spawn lent it.
            status.child_reaped();
        }
        match status.poll() {
            // A child that was reaped has closed its end: Pending cannot
            // happen then; treat it like success to keep the exit.
            StartReport::Pending if !reaped => return true,
            StartReport::Pending | StartReport::Running => {}
            StartReport::Failed(err) => {
                let (owner, pid) = (s.owner(), s.pid());
                if !reaped {
                    // It is on its way out with status 127.
                    sys::wait_for(pid);
                    status.child_reaped();
                    self.by_pid.remove(&pid);
                }
                let mut s = self.sessions.remove(key);
                s.close(&self.registry);
                if let Some(o) = owner {
                    self.ids.remove(&(o.link, o.id));
                    self.exec_failed(o.link, o.id, err);
                }
                self.after_session_gone();
                return false;
            }
        }
        let now = Instant::now();
        let detach = s.started(&self.registry, key, now, &mut self.timers);
        let (owner, pid) = (s.owner(), s.pid());
        tracing::debug!(?owner, pid, "STARTED");
        let started = messages::Started {
            pid: pid as u32,
            session: Some(s.seq()),
        };
        if let Some(o) = owner {
            if let Some(link) = self.links.get_mut(o.link) {
                push_map(link.frames(), Kind::Started, o.id, &started);
            }
            if detach {
                // STARTED was the id's last frame.
                self.ids.remove(&(o.link, o.id));
                self.sessions[key].detach();
            }
        }
        self.service(key);
        true
    }

    /// Does whatever a session can do now (see [`Session::service`]) and
    /// finishes it when it is done.
    pub(crate) fn service(&mut self, key: usize) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let mut link = s.owner().and_then(|o| self.links.get_mut(o.link));
        let stop = {
            let mut out = link.as_mut().map(|l| l.output());
            s.service(out.as_mut(), &self.registry, &mut self.timers)
        };
        if stop.stalls() {
            if s.is_discarding() || link.is_none() {
                // Whatever list it may be on: no link's draining resumes
                // it.
                s.mark_stalled();
                self.yielded.push_back(key);
            } else if s.mark_stalled() {
                if let Some(link) = link {
                    link.stall(Owned::Session(key));
                }
            }
        }
        if self.sessions[key].is_done() {
            self.finish(key);
        }
    }

    /// A done session: EXITED to the host that has it (its id is then
    /// free), and the session is kept as a finished record.
    fn finish(&mut self, key: usize) {
        let was_live = !self.sessions[key].is_finished();
        let s = &mut self.sessions[key];
        let Some((exit, owner)) = s.finish(&self.registry, &mut self.timers) else {
            return;
        };
        if let Some(o) = owner {
            tracing::debug!(id = o.id, status = exit.status, "EXITED");
            self.ids.remove(&(o.link, o.id));
            if let Some(link) = self.links.get_mut(o.link) {
                push_map(link.frames(), Kind::Exited, o.id, &exit);
            }
        }
        if let Some(cg) = self.sessions[key].take_cgroup() {
            self.keep_until_empty(cg);
        }
        if was_live {
            self.finished.push_back(key);
            self.evict_records();
        }
        self.after_session_gone();
    }

    /// Removes a session's cgroup now if it is empty, else once it is.
    pub(crate) fn keep_until_empty(&mut self, cg: SessionCgroup) {
        if !cg.remove() {
            self.lingering_cgroups.push(cg);
        }
    }

    /// Signals every process left in the cgroups of finished sessions.
    fn signal_lingering_cgroups(&self, signal: libc::c_int) {
        for cg in &self.lingering_cgroups {
            cg.signal(signal);
        }
    }

    /// Keeps at most [`KEPT_RECORDS`] finished sessions: the oldest whose
    /// exit a host has seen go first, then the oldest unseen.
    fn evict_records(&mut self) {
        while self.finished.len() > KEPT_RECORDS {
            let pos = self
                .finished
                .iter()
                .position(|&k| self.sessions[k].exit_seen() && self.sessions[k].owner().is_none())
                .or_else(|| {
                    self.finished
                        .iter()
                        .position(|&k| self.sessions[k].owner().is_none())
                });
            let Some(pos) = pos else { return };
            if let Some(key) = self.finished.remove(pos) {
                self.sessions.remove(key);
            }
        }
    }

    /// A session is gone: a shutdown may now be complete.
    pub(crate) fn after_session_gone(&mut self) {
        if self.shutdown.is_some() && self.is_idle() {
            self.complete_shutdown();
        }
    }

    /// Reaps every child that has exited. One SIGCHLD may stand for many
    /// exits, so this waits with WNOHANG until nothing is left.
    pub(crate) fn reap(&mut self) {
        let now = Instant::now();
        while let Reaped::Child(pid, status) = sys::reap_one() {
            let key = match self.by_pid.remove(&pid) {
                Some(Child::Session(key)) => key,
                Some(Child::FsWorker(key, seq)) => {
                    self.fs_worker_reaped(key, seq, status);
                    continue;
                }
                Some(Child::Connector) => continue,
                None => {
                    if let Some(status) = self.unwatched.remove(&pid) {
                        // Its memory can go now.
                        status.child_reaped();
                        tracing::debug!(pid, "reaped a child that had no session");
                    } else {
                        tracing::debug!(pid, "reaped an adopted process");
                    }
                    continue;
                }
            };
            if !self.resolve_start(key, true) {
                continue;
            }
            let s = &mut self.sessions[key];
            s.reaped(exit_from_status(status), key, now, &mut self.timers);
            if self
                .shutdown
                .as_ref()
                .is_some_and(|sd| sd.phase != ShutdownPhase::Grace)
            {
                // Past the grace nothing waits for descendants' pipes.
                s.linger_over(&mut self.timers);
            }
            self.service(key);
        }
        // The last process of a lingering cgroup may just have gone.
        self.lingering_cgroups.retain(|cg| !cg.remove());
    }

    /// Runs every timer that is due.
    pub(crate) fn on_deadlines(&mut self, now: Instant) {
        if self
            .shutdown
            .as_ref()
            .is_some_and(|sd| sd.phase != ShutdownPhase::Dropping && sd.deadline <= now)
        {
            self.advance_shutdown(now);
        }
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                Timer::Linger { key, seq } => {
                    let Some(s) = self.sessions.get_mut(key).filter(|s| s.seq() == seq) else {
                        continue;
                    };
                    s.linger_over(&mut self.timers);
                    self.service(key);
                }
                Timer::Connect { key, seq } => self.connect_timed_out(key, seq),
                Timer::Deadline { key, seq } => {
                    if let Some(s) = self.sessions.get_mut(key).filter(|s| s.seq() == seq) {
                        tracing::debug!(session = seq, "deadline passed");
                        s.deadline_passed(key, now, &mut self.timers);
                    }
                }
                Timer::DeadlineKill { key, seq } => {
                    if let Some(s) = self.sessions.get_mut(key).filter(|s| s.seq() == seq) {
                        s.deadline_kill();
                    }
                }
            }
        }
    }

    /// How long the loop may sleep: zero when work is possible without an
    /// event, else until the nearest deadline, or forever.
    pub(crate) fn next_timeout(&self, now: Instant) -> Option<Duration> {
        let immediate = !self.yielded.is_empty()
            || self
                .links
                .iter()
                .any(|(_, l)| l.may_read() || l.can_dispatch() || l.may_resume_stalled());
        if immediate {
            return Some(Duration::ZERO);
        }
        let shutdown = self
            .shutdown
            .as_ref()
            .filter(|sd| sd.phase != ShutdownPhase::Dropping)
            .map(|sd| sd.deadline);
        let next = match (shutdown, self.timers.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|d| timeout_until(d, now))
    }

    // -----------------------------------------------------------------
    // Links: reading, writing, backpressure, their end.

    /// Flushes every link's queue and, while it is below the low-water
    /// mark, lets its stalled sessions read again.
    pub(crate) fn pump(&mut self) {
        for key in std::mem::take(&mut self.yielded) {
            if let Some(s) = self.sessions.get_mut(key) {
                s.take_stalled();
                self.service(key);
            }
        }
        for _ in 0..16 {
            let mut resumed = false;
            let keys: Vec<usize> = self.links.iter().map(|(k, _)| k).collect();
            for lk in keys {
                if self.links[lk].flush().is_err() {
                    self.on_link_closed(lk);
                    continue;
                }
                let stalled = self.links[lk].take_resumable();
                for owner in stalled {
                    resumed |= self.resume(owner);
                }
            }
            if !resumed {
                return;
            }
        }
    }

    /// Services what waited on a link's list, if it still waits there.
    fn resume(&mut self, owner: Owned) -> bool {
        match owner {
            Owned::Session(key) => {
                if self
                    .sessions
                    .get_mut(key)
                    .is_some_and(Session::take_stalled)
                {
                    self.service(key);
                    return true;
                }
            }
            Owned::Fs(key) => {
                if self.fs.get_mut(key).is_some_and(fs::Task::take_stalled) {
                    self.service_fs(key);
                    return true;
                }
            }
            Owned::Net(key) => {
                if self.net.get_mut(key).is_some_and(net::Conn::take_stalled) {
                    self.service_net(key);
                    return true;
                }
            }
        }
        false
    }

    /// Reads and dispatches link `lk`'s frames until its transport would
    /// block, or its queue is at its cap (then the host is not reading and
    /// its input waits in the kernel).
    ///
    /// The cap is checked before each frame, not only before each read:
    /// one read can hold thousands of small frames, each of which may add
    /// a reply (an ERROR for garbage), so frames already read wait in the
    /// decoder until the queue is under the cap again, and nothing more is
    /// read until they are dispatched. The queue thus ends at most one
    /// reply over the cap, and the decoder holds at most one read.
    ///
    /// On a pipe transport a large STDIN payload streams: once its header
    /// is decoded, the rest is spliced from the transport straight into
    /// the session's stdin pipe (see `Inflow::stream_from`) instead of
    /// being read into the decoder and written out again. While a host
    /// sends STDIN frames back to back, each read takes just the next
    /// header, so whole payloads stream.
    pub(crate) fn serve_link(&mut self, lk: usize) {
        while self.exit.is_none() {
            let Some(link) = self.links.get(lk) else {
                return;
            };
            if !link.is_connected() {
                return;
            }
            if link.frames_pending() && !self.dispatch_buffered(lk) {
                return;
            }
            let link = &mut self.links[lk];
            if !link.may_read() {
                return;
            }
            let input = match link.stdin_stream() {
                Some(stream) => self.stream_stdin(lk, stream.id, stream.left),
                None => {
                    let input = link.read_frames();
                    if input == Input::Bytes && !self.dispatch_buffered(lk) {
                        return;
                    }
                    if input == Input::Bytes {
                        self.maybe_stream_stdin(lk);
                    }
                    input
                }
            };
            match input {
                Input::Bytes | Input::Again => {}
                Input::Empty => return,
                Input::Closed => return self.on_link_closed(lk),
            }
        }
    }

    /// Dispatches the whole frames (and framing errors) link `lk`'s decoder
    /// holds. True when none is left; false when it stopped early: the
    /// queue reached its cap (the rest stay pending), or the agent is
    /// exiting.
    fn dispatch_buffered(&mut self, lk: usize) -> bool {
        let mut decoder = self.links[lk].take_decoder();
        let drained = loop {
            if self.links[lk].at_read_cap() {
                break false;
            }
            let Some(item) = decoder.next_frame() else {
                break true;
            };
            match item {
                Ok(frame) => {
                    let stdin = (frame.kind == Kind::Stdin as u8).then_some(frame.payload.len());
                    self.links[lk].note_frame(stdin);
                    self.on_frame(lk, frame);
                }
                Err(e) => {
                    let kind = messages::ProtocolError::from(e).kind();
                    self.send_error(lk, e.id(), kind, e.to_string(), e.frame_kind());
                }
            }
            if self.exit.is_some() {
                break false;
            }
        };
        // Dispatch never removes a link (only a read or a write does).
        if let Some(link) = self.links.get_mut(lk) {
            link.put_decoder(decoder, drained);
        }
        drained
    }

    /// After a read: a STDIN frame whose header has arrived, and most of
    /// whose payload is still in the transport, streams if its session can
    /// take it whole.
    fn maybe_stream_stdin(&mut self, lk: usize) {
        let link = &self.links[lk];
        let Some(p) = link.streamable_stdin(Kind::Stdin as u8) else {
            return;
        };
        let window = self.config.stdin_window;
        let Some(&Owned::Session(key)) = self.ids.get(&(lk, p.id)) else {
            return;
        };
        if !self.sessions[key].can_stream_stdin(p.len, window) {
            return;
        }
        let (head, frames) = self.links[lk].begin_stdin_stream(p);
        self.sessions[key].begin_stdin_stream(p.len, head, Some(frames), &self.registry);
    }

    /// Moves more of a streamed STDIN payload into its session.
    fn stream_stdin(&mut self, lk: usize, id: u32, left: usize) -> Input {
        let Some(&Owned::Session(key)) = self.ids.get(&(lk, id)) else {
            // Its session has ended meanwhile: the rest is skipped.
            self.links[lk].skip_stdin_stream();
            return Input::Again;
        };
        let (mut src, frames) = self.links[lk].stdin_source();
        let read = self.sessions[key].stream_stdin(&mut src, left, Some(frames), &self.registry);
        let input = self.links[lk].stdin_streamed(read);
        self.service(key);
        input
    }

    /// A readiness event for a link's transport.
    pub(crate) fn on_link_event(
        &mut self,
        lk: usize,
        fd: super::token::LinkFd,
        hup: bool,
        writable: bool,
    ) {
        let Some(link) = self.links.get_mut(lk) else {
            return;
        };
        if link.on_event(fd, hup, writable) {
            let ready = ready_frame(&self.config, self.restores);
            link.host_arrived(&ready);
        }
    }

    /// After the turn's reads: a device port whose host hung up ends that
    /// host's visit once what it sent has been served.
    pub(crate) fn end_departed_visits(&mut self) {
        let mut left = Vec::new();
        for (lk, link) in self.links.iter_mut() {
            if link.hup_pending() && link.end_departed_visit() {
                left.push(lk);
            }
        }
        for lk in left {
            self.drop_link_tasks(lk);
            self.drop_link_conns(lk);
        }
    }

    /// End of file (or an error) on link `lk`'s transport.
    fn on_link_closed(&mut self, lk: usize) {
        let Some(link) = self.links.get_mut(lk) else {
            return;
        };
        match link.kind() {
            TransportKind::Accepted => return self.remove_link(lk),
            TransportKind::Device => {
                link.host_left();
                self.drop_link_conns(lk);
                return self.drop_link_tasks(lk);
            }
            TransportKind::Pipes | TransportKind::Socket => {}
        }
        if self.exit.is_some() {
            return;
        }
        tracing::info!("transport closed: killing every session");
        for (_, s) in self.sessions.iter().filter(|(_, s)| !s.is_finished()) {
            s.signal_group(libc::SIGKILL);
        }
        self.signal_lingering_cgroups(libc::SIGKILL);
        kill_and_reap_all(Duration::from_secs(2));
        self.exit = Some(Exit::TransportClosed);
    }

    // -----------------------------------------------------------------
    // Signals and shutdown.

    /// Reads the signalfd: SIGCHLD reaps, the others start a shutdown.
    pub(crate) fn on_signals(&mut self) {
        let mut reap = false;
        let mut shutdown = false;
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => match info.ssi_signo as libc::c_int {
                    libc::SIGCHLD => reap = true,
                    sig => {
                        tracing::info!(signal = sig, "shutdown signal");
                        shutdown = true;
                    }
                },
                Ok(None) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading the signalfd failed");
                    // Reap anyway: a lost SIGCHLD must not leave zombies.
                    reap = true;
                    break;
                }
            }
        }
        if reap {
            self.reap();
        }
        if shutdown {
            self.start_shutdown(DEFAULT_GRACE);
        }
    }

    /// No session, file operation or connection is left.
    fn is_idle(&self) -> bool {
        self.live_sessions() == 0 && self.fs.is_empty() && self.net.is_empty()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutdown.is_some()
    }

    /// SHUTDOWN (or a shutdown signal): SIGTERM to every session's process
    /// group; SIGKILL after `grace`; output still held a drain later is
    /// dropped. A second one changes nothing.
    pub(crate) fn start_shutdown(&mut self, grace: Duration) {
        if self.shutdown.is_some() {
            return;
        }
        tracing::info!(?grace, sessions = self.live_sessions(), "shutting down");
        for (_, s) in self.sessions.iter_mut().filter(|(_, s)| !s.is_finished()) {
            if s.is_starting() {
                // As for a host's SIGNAL: after STARTED, or not at all.
                s.signal(libc::SIGTERM, Target::Tree);
            } else {
                s.signal_group(libc::SIGTERM);
            }
        }
        self.signal_lingering_cgroups(libc::SIGTERM);
        self.shutdown = Some(Shutdown {
            phase: ShutdownPhase::Grace,
            deadline: Instant::now() + grace,
        });
        self.cancel_all_tasks();
        self.close_all_conns();
        if self.is_idle() {
            self.complete_shutdown();
        }
    }

    /// The shutdown's deadline: at the grace's end, SIGKILL to what is left
    /// (and output held behind a used-up window is dropped from then on);
    /// at the drain's end, every session's output still held is dropped.
    fn advance_shutdown(&mut self, now: Instant) {
        let Some(sd) = &mut self.shutdown else {
            return;
        };

        let phase = sd.phase;
        match phase {
            ShutdownPhase::Grace => {
                sd.phase = ShutdownPhase::Drain;
                sd.deadline = now + SHUTDOWN_DRAIN;
                self.signal_lingering_cgroups(libc::SIGKILL);
            }
            ShutdownPhase::Drain | ShutdownPhase::Dropping => sd.phase = ShutdownPhase::Dropping,
        }
        let keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.is_finished())
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let s = &mut self.sessions[key];
            if phase == ShutdownPhase::Grace {
                s.signal_group(libc::SIGKILL);
                s.drop_output_behind_window();
            } else {
                s.drop_all_output();
            }
            if s.is_reaped() {
                // Descendants were told to go; stop waiting for their pipes.
                s.linger_over(&mut self.timers);
            }
            self.service(key);
        }
    }

    fn complete_shutdown(&mut self) {
        for (_, link) in self.links.iter_mut() {
            if let Err(e) = codec::append_raw(link.frames(), Kind::ShutdownDone as u8, 0, &[]) {
                tracing::error!(error = %e, "SHUTDOWN_DONE could not be encoded");
            }
        }
        self.exit = Some(Exit::Shutdown);
    }

    /// On the way out: kills what is left in every session cgroup and
    /// removes them, waiting at most a second for the kernel to empty them
    /// (it sleeps: only after the loop).
    pub(crate) fn remove_cgroups(&mut self) {
        let mut all = std::mem::take(&mut self.lingering_cgroups);
        all.extend(
            self.sessions
                .iter_mut()
                .filter_map(|(_, s)| s.release_cgroup()),
        );
        let end = Instant::now() + Duration::from_secs(1);
        while !all.is_empty() {
            for cg in &all {
                cg.signal(libc::SIGKILL);
            }
            sys::reap_ended();
            all.retain(|cg| !cg.remove());
            if Instant::now() >= end {
                tracing::warn!(left = all.len(), "session cgroups still busy at exit");
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Before the agent exits: writes what every link has queued, waiting
    /// at most a few seconds in all for slow hosts.
    pub(crate) fn finish_output(&mut self) {
        let end = Instant::now() + FINAL_FLUSH;
        for (_, link) in self.links.iter_mut() {
            link.finish_output(end);
        }
    }
}

/// Queues a frame with a map payload. The encoder refuses a frame over
/// the limit (what a message quotes is capped, so that never happens for
/// this agent's frames); a refusal is logged and nothing is queued.
pub(crate) fn push_map<T: serde::Serialize>(out: &mut Vec<u8>, kind: Kind, id: u32, msg: &T) {
    if let Err(e) = messages::append_map(out, kind as u8, id, msg) {
        tracing::error!(id, kind = kind.name(), error = %e, "a frame could not be encoded");
    }
}

/// READY for a host that arrives.
pub(crate) fn ready_frame(config: &Config, restores: u32) -> Vec<u8> {
    let ready = Ready {
        protocol: PROTOCOL_VERSION,
        agent: concat!("agentd/", env!("CARGO_PKG_VERSION")).to_owned(),
        pid: std::process::id(),
        pid1: config.pid1,
        max_payload: MAX_PAYLOAD as u32,
        stdin_window: config.stdin_window,
        max_sessions: config.max_sessions as u32,
        uptime_ms: sys::uptime_ms(),
        features: super::dispatch::SERVED
            .iter()
            .map(|f| f.name().to_owned())
            .collect(),
        replay_bytes: Some(config.replay_bytes),
        cgroups: Some(config.cgroups.is_some()),
        realtime_ns: Some(super::clock::realtime_ns()),
        restores: Some(restores),
        clock_set: Some(config.allow_clock),
        mounts: config.mounts.clone(),
    };
    let mut out = Vec::new();
    push_map(&mut out, Kind::Ready, 0, &ready);
    out
}

/// How a wait status reads as EXITED.
fn exit_from_status(status: libc::c_int) -> Exited {
    if libc::WIFSIGNALED(status) {
        Exited::from_signal(libc::WTERMSIG(status), libc::WCOREDUMP(status))
    } else {
        Exited::from_code(libc::WEXITSTATUS(status))
    }
}

/// The agent's children as the kernel lists them (sessions and adopted
/// orphans alike).
fn children() -> Vec<libc::pid_t> {
    let mut pids = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return pids;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<libc::pid_t>().ok()),
            );
        }
    }
    pids
}

/// SIGKILLs every child (and its process group) and reaps until none is
/// left or `limit` passes. Used only on the way out: it sleeps.
pub(crate) fn kill_and_reap_all(limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        for pid in children() {
            send_signal(-pid, libc::SIGKILL);
            send_signal(pid, libc::SIGKILL);
        }
        if !sys::reap_ended() {
            return;
        }
        if Instant::now() >= end {
            tracing::warn!("children still running after SIGKILL");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
