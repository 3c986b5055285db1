//! Worker processes: work that may block (file-system calls on any file
//! system, opening a FIFO, resolving a name, connecting as another user)
//! runs in a child the agent forks for it, never on the loop. The loop
//! polls the worker's pipes like a session's and reaps it like any child.
//!
//! The agent is single-threaded, so after `fork` the child is a complete
//! copy in which anything may run (allocation included). It is made a
//! clean process before it does its work: it gets its own panic hook (the
//! agent's, as PID 1, would power the machine off), an empty signal mask
//! and default dispositions, a process group of its own (a session's group
//! signal must not reach it), `PR_SET_PDEATHSIG` (it dies with the agent),
//! exactly its own fds (its pipes on 3, 4 and 5, nothing of the transport
//! or of other sessions), and the credentials of the user it works for. It
//! never returns into the agent's code: it ends with `_exit`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::sys::{self, cvt};
use super::user::{self, Identity};

/// The worker's ends of its pipes, as it sees them after setup.
pub(crate) struct WorkerIo {
    /// Frames to the agent (fd 3).
    pub(crate) ctl: std::fs::File,
    /// Bulk bytes to the agent (fd 4), when the operation sends data.
    pub(crate) data_out: Option<std::fs::File>,
    /// Bulk bytes from the agent (fd 5), when the operation takes data.
    pub(crate) data_in: Option<std::fs::File>,
}

/// The agent's ends of a worker's pipes, close-on-exec and nonblocking.
pub(crate) struct WorkerPipes {
    pub(crate) ctl: OwnedFd,
    pub(crate) data_out: Option<OwnedFd>,
    pub(crate) data_in: Option<OwnedFd>,
}

/// A forked worker.
pub(crate) struct Worker {
    pub(crate) pid: libc::pid_t,
    pub(crate) pipes: WorkerPipes,
}

const CTL_FD: RawFd = 3;
const DATA_OUT_FD: RawFd = 4;
const DATA_IN_FD: RawFd = 5;

/// Why a worker could not start its work: it reports this itself, before
/// doing anything, as its operation's failure frame.
#[derive(Debug)]
pub(crate) enum SetupError {
    /// The user does not exist.
    User(user::UserError),
    /// setgroups/setgid/setuid failed (with the call and errno).
    Credentials(&'static str, io::Error),
}

/// Forks a worker that runs `work` as `user` (the agent's own user when
/// `None`), with a pipe back to the agent for frames and, as asked, one
/// for data it sends and one for data it takes. `work` gets the worker's
/// ends and the outcome of dropping privileges; what it returns is the
/// worker's exit status.
pub(crate) fn spawn<F>(
    user: Option<&str>,
    data_out: bool,
    data_in: bool,
    work: F,
) -> io::Result<Worker>
where
    F: FnOnce(WorkerIo, Result<Option<Identity>, SetupError>) -> i32,
{
    let (ctl_r, ctl_w) = sys::pipe_cloexec()?;
    spawn_on(ctl_r, ctl_w, user, data_out, data_in, work)
}

/// [`spawn`] with a control channel the caller made: `agent_ctl` stays
/// here, `worker_ctl` becomes the worker's fd 3 (a socketpair, to pass
/// fds back).
pub(crate) fn spawn_on<F>(
    agent_ctl: OwnedFd,
    worker_ctl: OwnedFd,
    user: Option<&str>,
    data_out: bool,
    data_in: bool,
    work: F,
) -> io::Result<Worker>
where
    F: FnOnce(WorkerIo, Result<Option<Identity>, SetupError>) -> i32,
{
    let (ctl_r, ctl_w) = (agent_ctl, worker_ctl);
    let out = data_out.then(sys::pipe_cloexec).transpose()?;
    let inp = data_in.then(sys::pipe_cloexec).transpose()?;
    // SAFETY: the agent is single-threaded, so the child is a full copy in
    // which it may run anything; the child never returns from this branch
    // (it ends in `_exit`).
    let pid = cvt(unsafe { libc::fork() })?;
    if pid == 0 {
        let fds = [
            Some(ctl_w.as_raw_fd()),
            out.as_ref().map(|(_, w)| w.as_raw_fd()),
            inp.as_ref().map(|(r, _)| r.as_raw_fd()),
        ];
        // SAFETY: in the forked child, with its own copy of everything.
        unsafe { child(fds, user, work) }
    }
    // The agent keeps its ends; the child's copies close here.
    drop(ctl_w);
    let data_out = out.map(|(r, _w)| r);
    let data_in = inp.map(|(_r, w)| w);
    for fd in [Some(&ctl_r), data_out.as_ref(), data_in.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Err(e) = sys::set_nonblocking(fd.as_raw_fd()) {
            sys::send_signal(pid, libc::SIGKILL);
            // The loop reaps it (it is not yet anybody's: reaped as an
            // adopted process).
            return Err(e);
        }
    }
    Ok(Worker {
        pid,
        pipes: WorkerPipes {
            ctl: ctl_r,
            data_out,
            data_in,
        },
    })
}

/// The worker after fork: becomes a clean process, then works, then exits.
///
/// # Safety
/// Only in the child of [`spawn`]'s fork.
unsafe fn child<F>(fds: [Option<RawFd>; 3], user: Option<&str>, work: F) -> !
where
    F: FnOnce(WorkerIo, Result<Option<Identity>, SetupError>) -> i32,
{
    // A panic must end this process only: the agent's hook would power the
    // machine off as PID 1.
    std::panic::set_hook(Box::new(|_| {
        // SAFETY: _exit ends the process without running anything else.
        unsafe { libc::_exit(101) }
    }));
    // SAFETY: plain system calls on this process's own state.
    unsafe {
        reset_signals();
        libc::setpgid(0, 0);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        place_fds(fds);
    }
    let setup = drop_privileges(user);
    let io = WorkerIo {
        // SAFETY: place_fds put our pipe ends on these numbers; we own them.
        ctl: unsafe { std::fs::File::from_raw_fd(CTL_FD) },
        // SAFETY: as above, for the ones that exist.
        data_out: fds[1].map(|_| unsafe { std::fs::File::from_raw_fd(DATA_OUT_FD) }),
        // SAFETY: as above.
        data_in: fds[2].map(|_| unsafe { std::fs::File::from_raw_fd(DATA_IN_FD) }),
    };
    let status = work(io, setup);
    // SAFETY: ends the worker without unwinding into the agent's code or
    // running its destructors and exit handlers.
    unsafe { libc::_exit(status) }
}

/// An empty mask and every signal at its default disposition (the agent
/// blocks the signals its signalfd reads and ignores SIGPIPE).
///
/// # Safety
/// In the worker only.
unsafe fn reset_signals() {
    // SAFETY: sigset and sigaction on this process's own state.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Moves the worker's pipe ends to fds 3, 4 and 5 (without close-on-exec:
/// nothing is exec'd, but the numbers are fixed) and closes every other fd
/// above 2: the transport, other sessions' pipes, the epoll fd.
///
/// # Safety
/// In the worker only.
unsafe fn place_fds(fds: [Option<RawFd>; 3]) {
    // SAFETY: fcntl, dup2 and close_range on this process's own fd table.
    unsafe {
        // First out of the way of 3..=5, so no dup2 clobbers a source.
        let high: Vec<Option<RawFd>> = fds
            .iter()
            .map(|fd| fd.map(|fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100)))
            .collect();
        for (i, fd) in high.iter().enumerate() {
            if let Some(fd) = fd {
                libc::dup2(*fd, CTL_FD + i as RawFd);
            }
        }
        libc::syscall(
            libc::SYS_close_range,
            (DATA_IN_FD + 1) as u32,
            u32::MAX,
            0u32,
        );
        for (i, fd) in fds.iter().enumerate() {
            if fd.is_none() {
                libc::close(CTL_FD + i as RawFd);
            }
        }
    }
}

/// Becomes `user`: its groups, gid and uid (the agent's own when `None`).
fn drop_privileges(user: Option<&str>) -> Result<Option<Identity>, SetupError> {
    let Some(spec) = user else {
        return Ok(None);
    };
    let id = user::resolve(spec).map_err(SetupError::User)?;
    // SAFETY: setgroups reads `groups.len()` gids from the pointer.
    if unsafe { libc::setgroups(id.groups.len(), id.groups.as_ptr()) } < 0 {
        return Err(SetupError::Credentials(
            "setgroups",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: setgid/setuid take integers.
    if unsafe { libc::setgid(id.gid) } < 0 {
        return Err(SetupError::Credentials(
            "setgid",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: as above.
    if unsafe { libc::setuid(id.uid) } < 0 {
        return Err(SetupError::Credentials(
            "setuid",
            io::Error::last_os_error(),
        ));
    }
    Ok(Some(id))
}

/// Writes `frame` whole to the agent (a blocking write: the worker waits
/// while the agent does not read, which is how it is held to the window).
pub(crate) fn send(ctl: &mut std::fs::File, frame: &[u8]) -> io::Result<()> {
    use std::io::Write;
    ctl.write_all(frame)
}
