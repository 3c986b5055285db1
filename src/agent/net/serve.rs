//! The `net` extension in the loop: what its frames do, how a connection
//! gets connected (at once, after writability, by a worker, or not within
//! its timeout), serviced and ended.

use std::time::{Duration, Instant};

use crate::messages::{ErrorKind, NetConnect, NetErrorKind, NetFailed, NetMsg};

use super::super::core::{Child, Core, Owned};
use super::super::stream::InflowError;
use super::super::timers::Timer;
use super::super::token::NetFd;
use super::connect::{self, Started, Target};
use super::{failed_frame, Conn, Progress, DEFAULT_WINDOW};

/// At most this many connections at once (each is an fd).
pub(crate) const MAX_CONNS: usize = 16_384;

impl Core {
    /// A frame of the net extension from link `lk`.
    pub(crate) fn on_net_frame(&mut self, lk: usize, id: u32, msg: NetMsg<'_>) {
        match msg {
            NetMsg::Connect(req) => self.net_connect(lk, id, *req),
            NetMsg::Send(data) => {
                self.with_conn(lk, id, crate::messages::Kind::NetSend, |core, key| {
                    let window = core.config.stdin_window;
                    let frames = core.links[lk].frames();
                    core.net[key]
                        .push(data, window, frames)
                        .map_err(|e| send_refusal(e, data.len()))?;
                    core.service_net(key);
                    Ok(())
                })
            }
            // An ack for an id with no connection is one that was in
            // flight when the connection ended (its last NET_RECV): a
            // race every host runs into, so it is dropped, not an ERROR.
            NetMsg::RecvAck(_) if !self.ids.contains_key(&(lk, id)) => {}
            NetMsg::RecvAck(ack) => {
                self.with_conn(lk, id, crate::messages::Kind::NetRecvAck, |core, key| {
                    core.net[key].ack(ack.bytes);
                    core.service_net(key);
                    Ok(())
                })
            }
            NetMsg::Shutdown => {
                self.with_conn(lk, id, crate::messages::Kind::NetShutdown, |core, key| {
                    let frames = core.links[lk].frames();
                    core.net[key].shutdown(frames).map_err(|_| {
                        (
                            ErrorKind::StdinClosed,
                            "NET_SHUTDOWN was sent already".to_owned(),
                        )
                    })?;
                    core.service_net(key);
                    Ok(())
                })
            }
            NetMsg::Close(c) => {
                self.with_conn(lk, id, crate::messages::Kind::NetClose, |core, key| {
                    core.end_conn_with(key, c.reset, None);
                    Ok(())
                })
            }
            NetMsg::Connected(_)
            | NetMsg::Failed(_)
            | NetMsg::SendAck(_)
            | NetMsg::Recv(_)
            | NetMsg::Eof
            | NetMsg::Closed(_) => {}
        }
    }

    fn with_conn(
        &mut self,
        lk: usize,
        id: u32,
        kind: crate::messages::Kind,
        f: impl FnOnce(&mut Core, usize) -> Result<(), (ErrorKind, String)>,
    ) {
        let Some(&Owned::Net(key)) = self.ids.get(&(lk, id)) else {
            let msg = format!("no connection with id {id}");
            return self.send_error(lk, id, ErrorKind::UnknownSession, msg, Some(kind as u8));
        };
        if let Err((err, message)) = f(self, key) {
            self.send_error(lk, id, err, message, Some(kind as u8));
        }
    }

    /// NET_CONNECT: checks it and starts connecting.
    fn net_connect(&mut self, lk: usize, id: u32, req: NetConnect) {
        let refuse = |core: &mut Core, f: NetFailed| failed_frame(core.links[lk].frames(), id, &f);
        if id == 0 {
            return refuse(
                self,
                NetFailed::new(
                    NetErrorKind::InvalidRequest,
                    "id 0 is the connection's",
                    None,
                ),
            );
        }
        if self.ids.contains_key(&(lk, id)) {
            return refuse(
                self,
                NetFailed::new(
                    NetErrorKind::DuplicateId,
                    format!("id {id} is in use"),
                    None,
                ),
            );
        }
        if self.is_shutting_down() {
            return refuse(
                self,
                NetFailed::new(NetErrorKind::Other, "the agent is shutting down", None),
            );
        }
        if self.net.len() >= MAX_CONNS {
            let m = format!("{MAX_CONNS} connections are open, the agent's maximum");
            return refuse(self, NetFailed::new(NetErrorKind::Resource, m, None));
        }
        let window = req.window.unwrap_or(DEFAULT_WINDOW);
        if window == 0 {
            return refuse(
                self,
                NetFailed::new(
                    NetErrorKind::InvalidRequest,
                    "window 0: nothing could ever be received",
                    None,
                ),
            );
        }
        if req.timeout_ms == Some(0) {
            return refuse(
                self,
                NetFailed::new(
                    NetErrorKind::InvalidRequest,
                    "timeout_ms 0: no connect could ever be waited for (leave it out for the default, 10000)",
                    None,
                ),
            );
        }
        let target = match connect::target(&req) {
            Ok(t) => t,
            Err(f) => return refuse(self, f),
        };
        let timeout_ms = req.timeout_ms.unwrap_or(connect::DEFAULT_TIMEOUT_MS);
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let seq = self.take_seq();
        let key = self.net.vacant_key();
        let timer = self
            .timers
            .add(Instant::now() + timeout, Timer::Connect { key, seq });
        let mut conn = Conn::new(id, lk, seq, window, timer);
        if let Target::Unix(p) = &target {
            conn.set_unix_path(p.clone());
        }
        conn.set_target(describe(&req), timeout_ms);
        self.ids.insert((lk, id), Owned::Net(key));
        self.net.insert(conn);
        let started = match (req.user.is_some(), target) {
            (false, Target::Addrs(addrs)) => self.start_tcp(key, addrs),
            (false, Target::Unix(path)) => match connect::start_unix(&path) {
                // The listener's backlog is full: a busy server, which a
                // blocking connect waits for (in a worker, until the
                // timer), as it does for a `user`.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    self.delegate(key, Target::Unix(path), None, timeout)
                }
                r => r
                    .map_err(|e| connect::failure(&e, &format!("connect {path}")))
                    .and_then(|started| self.after_start(key, started, None, Vec::new())),
            },
            // A name to resolve, or another user's credentials: a worker.
            (_, target) => self.delegate(key, target, req.user.as_deref(), timeout),
        };
        if let Err(f) = started {
            self.fail_conn(key, f);
        }
    }

    /// Hands connection `key`'s connect to a worker (which may block).
    fn delegate(
        &mut self,
        key: usize,
        target: Target,
        user: Option<&str>,
        timeout: Duration,
    ) -> Result<(), NetFailed> {
        let (pid, ctl) = connect::spawn_connector(target, user, timeout)
            .map_err(|e| connect::failure(&e, "starting the connector"))?;
        self.by_pid.insert(pid, Child::Connector);
        self.net[key]
            .delegated(pid, ctl, key, &self.registry)
            .map_err(|e| connect::failure(&e, "registering the connector"))
    }

    /// Starts a nonblocking connect to the first of `addrs` that takes
    /// one; the others are tried if it fails.
    fn start_tcp(&mut self, key: usize, addrs: Vec<std::net::SocketAddr>) -> Result<(), NetFailed> {
        let mut last = None;
        for (i, addr) in addrs.iter().enumerate() {
            match connect::start_tcp(addr) {
                Ok(started) => {
                    return self.after_start(key, started, Some(*addr), addrs[i + 1..].to_vec())
                }
                Err(e) => last = Some(connect::failure(&e, &format!("connect {addr}"))),
            }
        }
        Err(last.unwrap_or_else(|| {
            NetFailed::new(NetErrorKind::NotFound, "no address to connect to", None)
        }))
    }

    fn after_start(
        &mut self,
        key: usize,
        started: Started,
        addr: Option<std::net::SocketAddr>,
        rest: Vec<std::net::SocketAddr>,
    ) -> Result<(), NetFailed> {
        match started {
            Started::Connected(sock) => self.conn_open(key, sock),
            Started::Pending(sock) => self.net[key]
                .connecting(sock, addr, rest, key, &self.registry)
                .map_err(|e| connect::failure(&e, "registering the socket")),
        }
    }

    /// The connection is up.
    fn conn_open(&mut self, key: usize, sock: std::os::fd::OwnedFd) -> Result<(), NetFailed> {
        let conn = &mut self.net[key];
        if let Some(t) = conn.timer() {
            self.timers.cancel(t);
        }
        let link = &mut self.links[conn.link()];
        conn.opened(sock, key, &mut link.output(), &self.registry)?;
        self.service_net(key);
        Ok(())
    }

    /// A readiness event for a connection.
    pub(crate) fn on_net_event(&mut self, key: usize, fd: NetFd, readable: bool, writable: bool) {
        let Some(conn) = self.net.get_mut(key) else {
            return;
        };
        match fd {
            NetFd::Worker => {
                let Some((_, ctl)) = conn.connector() else {
                    return;
                };
                let Some(answer) = connect::receive(ctl) else {
                    return;
                };
                let r = answer.and_then(|sock| self.conn_open(key, sock));
                if let Err(f) = r {
                    self.fail_conn(key, f);
                }
            }
            NetFd::Socket if conn.is_connecting() => {
                if !writable && !readable {
                    return;
                }
                let Some(fd) = conn.socket_fd() else { return };
                match connect::finish(fd) {
                    Ok(()) => {
                        let r = match conn.take_socket(&self.registry) {
                            Some(sock) => self.conn_open(key, sock),
                            None => Ok(()),
                        };
                        if let Err(f) = r {
                            self.fail_conn(key, f);
                        }
                    }
                    Err(e) => self.connect_failed(key, e),
                }
            }
            NetFd::Socket => {
                conn.on_event(readable, writable);
                self.service_net(key);
            }
        }
    }

    /// A connect attempt failed: the next address, or NET_FAILED.
    fn connect_failed(&mut self, key: usize, e: std::io::Error) {
        let conn = &mut self.net[key];
        let what = format!("connect {}", conn.describe_target());
        conn.take_socket(&self.registry);
        let rest = std::iter::from_fn(|| self.net[key].next_address()).collect::<Vec<_>>();
        let r = if rest.is_empty() {
            Err(connect::failure(&e, &what))
        } else {
            self.start_tcp(key, rest)
        };
        if let Err(f) = r {
            self.fail_conn(key, f);
        }
    }

    /// The connect timer fired.
    pub(crate) fn connect_timed_out(&mut self, key: usize, seq: u64) {
        if let Some(c) = self.net.get(key).filter(|c| c.seq() == seq && !c.is_open()) {
            let f = c.timed_out();
            self.fail_conn(key, f);
        }
    }

    /// Ends a connection that never opened with NET_FAILED.
    fn fail_conn(&mut self, key: usize, f: NetFailed) {
        let mut conn = self.net.remove(key);
        if let Some(t) = conn.timer() {
            self.timers.cancel(t);
        }
        conn.close(&self.registry, false);
        self.ids.remove(&(conn.link(), conn.id()));
        if let Some(link) = self.links.get_mut(conn.link()) {
            failed_frame(link.frames(), conn.id(), &f);
        }
        self.after_session_gone();
    }

    /// Does what connection `key` can do now; ends it when it is over.
    pub(crate) fn service_net(&mut self, key: usize) {
        let Some(conn) = self.net.get_mut(key) else {
            return;
        };
        let Some(link) = self.links.get_mut(conn.link()) else {
            return;
        };
        match conn.service(&mut link.output(), &self.registry) {
            Progress::Idle => {}
            Progress::Stalled => {
                if conn.mark_stalled() {
                    link.stall(Owned::Net(key));
                }
            }
            Progress::Done => self.forget_conn(key),
        }
    }

    /// NET_CLOSE (or a shutdown): closed now, NET_CLOSED follows.
    pub(crate) fn end_conn_with(&mut self, key: usize, reset: bool, error: Option<NetErrorKind>) {
        let Some(conn) = self.net.get_mut(key) else {
            return;
        };
        if let Some(t) = conn.timer() {
            self.timers.cancel(t);
        }
        conn.close(&self.registry, reset);
        if let Some(link) = self.links.get_mut(conn.link()) {
            conn.close_with(&mut link.output(), &self.registry, error, None);
        }
        self.forget_conn(key);
    }

    fn forget_conn(&mut self, key: usize) {
        let conn = self.net.remove(key);
        self.ids.remove(&(conn.link(), conn.id()));
        self.after_session_gone();
    }

    /// The host of link `lk` went away: its connections close, without a
    /// word to anyone.
    pub(crate) fn drop_link_conns(&mut self, lk: usize) {
        let keys: Vec<usize> = self
            .net
            .iter()
            .filter(|(_, c)| c.link() == lk)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let mut conn = self.net.remove(key);
            if let Some(t) = conn.timer() {
                self.timers.cancel(t);
            }
            conn.close(&self.registry, false);
            self.ids.remove(&(lk, conn.id()));
        }
    }

    /// A shutdown: every connection ends (NET_CLOSED `other`).
    pub(crate) fn close_all_conns(&mut self) {
        let keys: Vec<usize> = self.net.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.end_conn_with(key, false, Some(NetErrorKind::Other));
        }
    }
}

/// A NET_CONNECT's target as messages name it: `HOST:PORT` or the path.
fn describe(req: &NetConnect) -> String {
    match (&req.host, req.port, &req.path) {
        (Some(h), Some(p), _) if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{p}"),
        (Some(h), Some(p), _) => format!("{h}:{p}"),
        (_, _, Some(path)) => path.clone(),
        _ => String::new(),
    }
}

fn send_refusal(e: InflowError, len: usize) -> (ErrorKind, String) {
    match e {
        InflowError::Closed => (ErrorKind::StdinClosed, "NET_SHUTDOWN was sent: no more bytes".to_owned()),
        InflowError::WindowExceeded { in_use, window } => (
            ErrorKind::WindowExceeded,
            format!("{len} bytes with {in_use} unacknowledged exceed the window of {window}; frame dropped"),
        ),
    }
}
