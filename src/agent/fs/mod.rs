//! The `fs` extension, loop side: each FS_REQUEST becomes a [`Task`] whose
//! work runs in a worker process (`ops`, `tree`, `watch`, run by
//! `agent::worker`), connected to the loop by up to three pipes that the
//! loop polls like a session's:
//!
//! - the **control** pipe: whole frames from the worker (FS_OPENED,
//!   FS_ENTRIES, FS_EVENTS, then FS_DONE or FS_ERROR), checked and given
//!   the operation's id before they go to the host. Batches wait for the
//!   request's window; the final frame waits until the data has gone out;
//! - the **data-out** pipe (read, tar_get): bytes sent as FS_DATA by an
//!   [`Outflow`] within the request's window, spliced when both ends allow;
//! - the **data-in** pipe (write, tar_put): FS_WRITE bytes written by an
//!   [`Inflow`] within READY's `stdin_window`, acknowledged with
//!   FS_WRITE_ACK; FS_END closes it, which is the worker's end of input.
//!
//! The worker blocks writing to a pipe the loop does not read; the loop
//! never blocks. FS_CANCEL, a host that goes away, and a shutdown send
//! the worker SIGTERM (an atomic write's temporary file is removed by its
//! handler); its exit is reaped by the loop.

pub(crate) mod ops;
mod serve;
mod tree;
mod watch;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry};

use crate::codec::{self, Decoder, MAX_OUTPUT_PAYLOAD};
use crate::messages::{self, FsError, FsErrorKind, FsOp, FsRequest, Kind};

use super::stream::{
    Acks, Close, Flushed, Inflow, InflowError, LinkOut, Outflow, Pumped, Sink, Window,
};
use super::token::{FsFd, Source};
use super::worker;

/// The default agent → host window of an operation.
pub(crate) const DEFAULT_WINDOW: u32 = 1 << 20;
/// The smallest window `list` and `watch` take (one batch must fit).
pub(crate) const MIN_BATCH_WINDOW: u32 = 64 * 1024;
/// At most this many operations run at once (each is a process).
pub(crate) const MAX_TASKS: usize = 256;

/// How much output a task reads in one turn before the others go.
const READ_TURN: usize = 1024 * 1024;

/// One file operation in progress.
#[derive(Debug)]
pub(crate) struct Task {
    id: u32,
    link: usize,
    seq: u64,
    op: FsOp,
    pid: libc::pid_t,
    ctl: Option<OwnedFd>,
    ctl_readable: bool,
    ctl_ended: bool,
    ctl_dec: Decoder,
    data_out: Option<OwnedFd>,
    out: Outflow,
    window: Window,
    data_in: Option<OwnedFd>,
    input: Inflow,
    /// FS_OPENED has gone to the host: data may follow it.
    opened: bool,
    /// A batch from the worker waiting for window.
    held: Option<Vec<u8>>,
    /// The worker's final frame, waiting for its data to have gone out.
    last: Option<Vec<u8>>,
    /// The worker's wait status, once reaped.
    exit: Option<libc::c_int>,
    /// FS_CANCEL (or the end of the host or the agent) sent SIGTERM.
    cancelled: bool,
    stalled: bool,
}

/// What servicing a task came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Nothing more now; an event or an ack moves it on.
    Idle,
    /// It stopped at the link's high-water mark or its turn's end.
    Stalled,
    /// Its final frame is queued: the task is over.
    Done,
}

/// Why an FS_REQUEST is refused before any worker runs.
pub(crate) fn check_request(req: &FsRequest) -> Result<FsOp, FsError> {
    let invalid = |m: String| FsError::new(FsErrorKind::InvalidRequest, m, None, None);
    let op = FsOp::parse(&req.op)
        .ok_or_else(|| invalid(format!("unknown op {}", messages::quote(&req.op))))?;
    if req.path.is_empty() {
        return Err(invalid("path is empty".into()));
    }
    if req.path.contains('\0') || req.user.as_deref().is_some_and(|u| u.contains('\0')) {
        return Err(invalid("a string contains a NUL byte".into()));
    }
    let window = req.window.unwrap_or(DEFAULT_WINDOW);
    if window == 0 {
        return Err(invalid("window 0: the agent could never send".into()));
    }
    if matches!(op, FsOp::List | FsOp::Watch) && window < MIN_BATCH_WINDOW {
        return Err(invalid(format!(
            "{} needs a window of at least {MIN_BATCH_WINDOW} bytes, not {window}",
            op.as_str()
        )));
    }
    Ok(op)
}

impl Task {
    /// Starts `req`'s worker and registers its pipes under `key`.
    pub(crate) fn start(
        req: FsRequest,
        op: FsOp,
        id: u32,
        link: usize,
        seq: u64,
        key: usize,
        registry: &Registry,
    ) -> Result<Task, FsError> {
        let user = req.user.clone();
        let window = Window::new(req.window.unwrap_or(DEFAULT_WINDOW));
        let w = worker::spawn(user.as_deref(), op.gives_data(), op.takes_data(), {
            move |io, setup| ops::run(&req, op, io, setup)
        })
        .map_err(|e| worker_error(&e))?;
        let task = Task {
            id,
            link,
            seq,
            op,
            pid: w.pid,
            ctl: Some(w.pipes.ctl),
            ctl_readable: true,
            ctl_ended: false,
            ctl_dec: Decoder::new(),
            data_out: w.pipes.data_out,
            out: Outflow::new(Kind::FsData as u8, true, false),
            window,
            data_in: w.pipes.data_in,
            input: Inflow::new(Close::Fd, op.takes_data()),
            opened: false,
            held: None,
            last: None,
            exit: None,
            cancelled: false,
            stalled: false,
        };
        if let Err(e) = task.register(key, registry) {
            task.deregister(registry);
            super::sys::send_signal(task.pid, libc::SIGKILL);
            return Err(worker_error(&e));
        }
        Ok(task)
    }

    fn register(&self, key: usize, registry: &Registry) -> io::Result<()> {
        let fds = [
            (self.ctl.as_ref(), FsFd::Ctl, Interest::READABLE),
            (self.data_out.as_ref(), FsFd::Out, Interest::READABLE),
            (self.data_in.as_ref(), FsFd::In, Interest::WRITABLE),
        ];
        for (fd, which, interest) in fds {
            if let Some(fd) = fd {
                let token = Source::Fs(key, which).token();
                registry.register(&mut SourceFd(&fd.as_raw_fd()), token, interest)?;
            }
        }
        Ok(())
    }

    fn deregister(&self, registry: &Registry) {
        for fd in [
            self.ctl.as_ref(),
            self.data_out.as_ref(),
            self.data_in.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = registry.deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn link(&self) -> usize {
        self.link
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Notes that it is on its link's resume list: true if it was not.
    pub(crate) fn mark_stalled(&mut self) -> bool {
        !std::mem::replace(&mut self.stalled, true)
    }

    pub(crate) fn take_stalled(&mut self) -> bool {
        std::mem::take(&mut self.stalled)
    }

    /// A readiness event on one of its pipes.
    pub(crate) fn on_event(&mut self, fd: FsFd) {
        match fd {
            FsFd::Ctl => self.ctl_readable = true,
            FsFd::Out => self.out.on_readable(),
            FsFd::In => self.input.on_writable(),
        }
    }

    /// The worker was reaped.
    pub(crate) fn reaped(&mut self, status: libc::c_int) {
        self.exit = Some(status);
        // Whatever it wrote before it went is in the pipes.
        self.ctl_readable = true;
        self.out.recheck();
    }

    /// FS_CANCEL, the host gone, or a shutdown: the worker is told to stop.
    pub(crate) fn cancel(&mut self) {
        if !self.cancelled && self.exit.is_none() {
            super::sys::send_signal(self.pid, libc::SIGTERM);
        }
        self.cancelled = true;
    }

    fn acks<'a>(&self, out: Option<&'a mut Vec<u8>>) -> Acks<'a> {
        Acks {
            out,
            kind: Kind::FsWriteAck as u8,
            id: self.id,
        }
    }

    /// Writes the host's queued bytes while the worker's pipe takes them.
    fn flush_input(&mut self, link: &mut LinkOut<'_>, registry: &Registry) {
        if let Some(fd) = self.input_fd() {
            let mut acks = self.acks(Some(link.frames()));
            let flushed = self.input.flush(fd, &mut acks);
            self.after_input(flushed, registry);
        }
    }

    fn after_input(&mut self, flushed: Flushed, registry: &Registry) {
        if flushed == Flushed::Done {
            if let Some(fd) = self.data_in.take() {
                let _ = registry.deregister(&mut SourceFd(&fd.as_raw_fd()));
            }
        }
    }

    /// The data-in pipe, once the worker has opened its file: FS_WRITE
    /// bytes wait in the queue until then, so that FS_OPENED precedes
    /// every FS_WRITE_ACK (and an acknowledged byte is one the worker
    /// takes into an open file).
    fn input_fd(&self) -> Option<std::os::fd::RawFd> {
        self.data_in
            .as_ref()
            .filter(|_| self.opened)
            .map(AsRawFd::as_raw_fd)
    }

    /// FS_WRITE from the host.
    pub(crate) fn push_write(
        &mut self,
        data: &[u8],
        window: u32,
        frames: &mut Vec<u8>,
        registry: &Registry,
    ) -> Result<(), InflowError> {
        let fd = self.input_fd();
        let mut acks = self.acks(Some(frames));
        let flushed = self.input.push(data, window, fd, &mut acks)?;
        self.after_input(flushed, registry);
        Ok(())
    }

    /// FS_END from the host.
    pub(crate) fn end_write(
        &mut self,
        frames: &mut Vec<u8>,
        registry: &Registry,
    ) -> Result<(), InflowError> {
        let fd = self.input_fd();
        let mut acks = self.acks(Some(frames));
        let flushed = self.input.close(fd, &mut acks)?;
        self.after_input(flushed, registry);
        Ok(())
    }

    /// FS_DATA_ACK from the host.
    pub(crate) fn ack(&mut self, bytes: u32) {
        self.window.ack(bytes);
    }

    /// Does what the task can do now, queueing its frames on `link`.
    pub(crate) fn service(&mut self, link: &mut LinkOut<'_>, registry: &Registry) -> Progress {
        if !self.cancelled {
            // FS_OPENED first: the host's queued bytes go to the worker
            // (and are acknowledged) only after it.
            let forwarded = self.forward_control(link);
            self.flush_input(link, registry);
            if let Some(p) = forwarded {
                return p;
            }
            if let Some(p) = self.pump_data(link, registry) {
                return p;
            }
        } else {
            // Nothing more goes to the host: what the worker sends is read
            // and dropped so that it can exit.
            self.drain(registry);
        }
        self.finish(link, registry)
    }

    /// Forwards the worker's frames while the window and the link allow.
    fn forward_control(&mut self, link: &mut LinkOut<'_>) -> Option<Progress> {
        loop {
            if let Some(frame) = self.held.take() {
                let len = frame.len() - codec::HEADER_LEN;
                if len > self.window.room() {
                    self.held = Some(frame);
                    return None;
                }
                self.window.take(len);
                link.frames().extend_from_slice(&frame);
            }
            if self.last.is_some() {
                return None;
            }
            if link.queue.pending() >= link.high_water {
                return Some(Progress::Stalled);
            }
            match self.next_control_frame() {
                Ok(Some(frame)) => self.route_control(frame, link),
                Ok(None) => return None,
                Err(e) => {
                    self.cancel();
                    self.last = Some(error_frame(self.id, &e));
                    return None;
                }
            }
        }
    }

    /// One whole frame from the control pipe, with this task's id put in;
    /// `None` when none is there now. A frame the worker has no business
    /// sending is an error.
    fn next_control_frame(&mut self) -> Result<Option<Vec<u8>>, FsError> {
        loop {
            if let Some(item) = self.ctl_dec.next_frame() {
                let frame = item.map_err(|e| bad_worker(&e.to_string()))?;
                let kind = Kind::from_u8(frame.kind);
                let allowed = matches!(
                    kind,
                    Some(
                        Kind::FsOpened
                            | Kind::FsEntries
                            | Kind::FsEvents
                            | Kind::FsDone
                            | Kind::FsError
                    )
                );
                if !allowed || frame.payload.len() > MAX_OUTPUT_PAYLOAD {
                    return Err(bad_worker(&format!("kind {:#04x}", frame.kind)));
                }
                let mut bytes = Vec::with_capacity(codec::HEADER_LEN + frame.payload.len());
                codec::append_raw(&mut bytes, frame.kind, self.id, frame.payload)
                    .map_err(|e| bad_worker(&e.to_string()))?;
                return Ok(Some(bytes));
            }
            let Some(fd) = self.ctl.as_ref().map(AsRawFd::as_raw_fd) else {
                return Ok(None);
            };
            if !self.ctl_readable {
                return Ok(None);
            }
            match self.ctl_dec.read_fd(fd) {
                Ok(0) => {
                    self.ctl_ended = true;
                    self.ctl_readable = false;
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ctl_readable = false;
                    return Ok(None);
                }
                Err(e) => return Err(bad_worker(&e.to_string())),
            }
        }
    }

    /// Where a frame from the worker goes.
    fn route_control(&mut self, frame: Vec<u8>, link: &mut LinkOut<'_>) {
        match frame[4] {
            k if k == Kind::FsOpened as u8 => {
                self.opened = true;
                link.frames().extend_from_slice(&frame);
            }
            k if k == Kind::FsDone as u8 || k == Kind::FsError as u8 => self.last = Some(frame),
            // A batch: counted against the window.
            _ => self.held = Some(frame),
        }
    }

    /// Sends the data the worker wrote, within the window.
    fn pump_data(&mut self, link: &mut LinkOut<'_>, registry: &Registry) -> Option<Progress> {
        if !self.opened {
            // A worker that failed before opening (FS_ERROR instead of
            // FS_OPENED) wrote no data: without this the final frame would
            // wait forever for a data pipe that is never read.
            if self.last.is_some() {
                self.close_data_out(registry);
            }
            return None;
        }
        let fd = self.data_out.as_ref().map(AsRawFd::as_raw_fd)?;
        let mut budget = READ_TURN;
        let mut sink = Sink::Queue(&mut *link);
        match self
            .out
            .pump(fd, self.id, &mut sink, &mut self.window, &mut budget)
        {
            Pumped::Ended => {
                self.close_data_out(registry);
                None
            }
            Pumped::Drained | Pumped::Window => None,
            Pumped::Yield | Pumped::Backpressure => Some(Progress::Stalled),
        }
    }

    fn close_data_out(&mut self, registry: &Registry) {
        self.out.end();
        if let Some(fd) = self.data_out.take() {
            let _ = registry.deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
    }

    /// A cancelled task reads what its worker still writes and drops it.
    fn drain(&mut self, registry: &Registry) {
        while let Ok(Some(frame)) = self.next_control_frame() {
            if frame[4] == Kind::FsDone as u8 || frame[4] == Kind::FsError as u8 {
                // What the worker managed before it stopped is the truth
                // (a write committed just before the cancel).
                self.last = Some(frame);
            }
        }
        if let Some(fd) = self.data_out.as_ref().map(AsRawFd::as_raw_fd) {
            let mut budget = READ_TURN;
            let mut window = Window::new(0);
            if self
                .out
                .pump(fd, self.id, &mut Sink::Discard, &mut window, &mut budget)
                == Pumped::Ended
            {
                self.close_data_out(registry);
            }
        }
    }

    /// Queues the final frame once everything before it has gone, or
    /// makes one for a worker that ended without it.
    fn finish(&mut self, link: &mut LinkOut<'_>, registry: &Registry) -> Progress {
        let data_done = self.data_out.is_none();
        if self.last.is_none() && self.exit.is_some() && self.ctl_ended {
            self.last = Some(self.final_for_missing_result());
        }
        if self.last.is_some() && !self.opened && self.data_out.is_some() {
            // A failure before FS_OPENED (a read of a file it may not
            // open): the worker sends data only after FS_OPENED, so there
            // is none to wait for.
            self.close_data_out(registry);
        }
        if self.cancelled && self.exit.is_some() && self.ctl_ended && !data_done {
            // The worker is gone; what it left in the data pipe is dropped.
            self.close_data_out(registry);
        }
        let data_done = self.data_out.is_none();
        match &self.last {
            Some(_) if data_done && self.held.is_none() => {}
            _ => return Progress::Idle,
        }
        let Some(last) = self.last.take() else {
            return Progress::Idle;
        };
        link.frames().extend_from_slice(&last);
        self.close(registry);
        Progress::Done
    }

    /// The final frame of a worker that exited without sending one.
    fn final_for_missing_result(&self) -> Vec<u8> {
        if self.cancelled {
            if self.op == FsOp::Watch {
                let mut out = Vec::new();
                let _ = messages::append_map(
                    &mut out,
                    Kind::FsDone as u8,
                    self.id,
                    &messages::FsDone::default(),
                );
                return out;
            }
            let e = FsError::new(FsErrorKind::Cancelled, "cancelled", None, None);
            return error_frame(self.id, &e);
        }
        let status = self.exit.unwrap_or(0);
        let how = if libc::WIFSIGNALED(status) {
            format!("was killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        };
        let e = FsError::new(
            FsErrorKind::Other,
            format!("the file worker {how} without a result"),
            None,
            None,
        );
        error_frame(self.id, &e)
    }

    /// Lets go of every pipe.
    pub(crate) fn close(&mut self, registry: &Registry) {
        self.deregister(registry);
        self.ctl = None;
        self.data_out = None;
        self.data_in = None;
    }
}

/// An FS_ERROR frame for `id`.
pub(crate) fn error_frame(id: u32, e: &FsError) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(err) = messages::append_map(&mut out, Kind::FsError as u8, id, e) {
        tracing::error!(error = %err, "FS_ERROR could not be encoded");
    }
    out
}

fn bad_worker(what: &str) -> FsError {
    FsError::new(
        FsErrorKind::Other,
        format!("the file worker sent something it may not ({what})"),
        None,
        None,
    )
}

/// The FS_ERROR for a worker that could not be started.
fn worker_error(e: &io::Error) -> FsError {
    let errno = e.raw_os_error();
    let kind = match errno {
        Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => FsErrorKind::Resource,
        _ => FsErrorKind::Other,
    };
    FsError::new(kind, format!("starting the file worker: {e}"), errno, None)
}
