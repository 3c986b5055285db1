//! Small system-call helpers shared by the agent's modules: fd flags,
//! pipes, the boot clock, signals and waiting. Each is one system call (or
//! two) with its errno turned into an `io::Error`; none of them blocks,
//! except [`wait_for`], which is only called for a child known to be
//! exiting.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `ret` as a result: negative is the errno of the call just made.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Sets `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns; no pointers involved.
    unsafe {
        let flags = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    }
    Ok(())
}

/// A pipe with both ends close-on-exec: (read, write).
pub(crate) fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe_with(libc::O_CLOEXEC)
}

/// A pipe with both ends close-on-exec and nonblocking: (read, write).
pub(crate) fn pipe_nonblocking() -> io::Result<(OwnedFd, OwnedFd)> {
    pipe_with(libc::O_CLOEXEC | libc::O_NONBLOCK)
}

fn pipe_with(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), flags) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A close-on-exec duplicate of `fd`, numbered 3 or above.
pub(crate) fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new fd (>= 3) that we then own.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: fcntl succeeded; the new fd is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `/dev/null`, read-write, close-on-exec.
pub(crate) fn open_dev_null() -> io::Result<OwnedFd> {
    // SAFETY: a constant NUL-terminated path and flags.
    let fd = cvt(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: open succeeded, the fd is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// True when `fd` is a pipe or FIFO.
pub(crate) fn is_pipe(fd: RawFd) -> bool {
    // SAFETY: a zeroed stat is a valid out-parameter; fstat writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    unsafe { libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO }
}

/// Asks for the pipe behind `fd` to hold `size` bytes (best effort: the
/// per-user pipe limits and `/proc/sys/fs/pipe-max-size` may refuse, and on
/// a non-pipe it fails with EBADF or EINVAL; nothing changes then). Returns
/// the size the pipe has afterwards, or `None` when it is not a pipe.
pub(crate) fn grow_pipe(fd: RawFd, size: libc::c_int) -> Option<libc::c_int> {
    // SAFETY: F_SETPIPE_SZ and F_GETPIPE_SZ take integers; a refusal
    // changes nothing.
    unsafe {
        libc::fcntl(fd, libc::F_SETPIPE_SZ, size);
        let now = libc::fcntl(fd, libc::F_GETPIPE_SZ);
        (now >= 0).then_some(now)
    }
}

/// Bytes waiting to be read in the pipe or socket `fd` (FIONREAD).
pub(crate) fn readable_bytes(fd: RawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes the byte count into a local integer.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return None;
    }
    usize::try_from(n).ok()
}

/// Milliseconds since the machine booted (`CLOCK_BOOTTIME`): READY's
/// `uptime_ms`. `None` when the clock cannot be read.
pub(crate) fn uptime_ms() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call;
    // clock_gettime writes only into it.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000)
}

/// Whether this process is PID 1 (of the machine, or of a pid namespace):
/// the one place that decides it.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// kill(2), with "no such process" being fine (it is already gone).
pub(crate) fn send_signal(target: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(target, signal) } < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(target, signal, error = %e, "kill failed");
        }
    }
}

/// What one `waitpid(-1, WNOHANG)` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reaped {
    /// A child that ended, with its wait status.
    Child(libc::pid_t, libc::c_int),
    /// Children remain, none has ended.
    NoneEnded,
    /// No children at all (ECHILD).
    NoChildren,
}

/// One `waitpid(-1, WNOHANG)`, retried on EINTR: the one reaping call of
/// the agent, for the loop (which needs the status) and for the way out.
pub(crate) fn reap_one() -> Reaped {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            return Reaped::Child(pid, status);
        }
        if pid == 0 {
            return Reaped::NoneEnded;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Reaped::NoChildren;
        }
    }
}

/// Reaps every child that has ended; false when no child is left.
pub(crate) fn reap_ended() -> bool {
    loop {
        match reap_one() {
            Reaped::Child(..) => continue,
            Reaped::NoneEnded => return true,
            Reaped::NoChildren => return false,
        }
    }
}

/// Reaps children until none is left or `within` has passed, napping
/// between looks. Only on the way out: it sleeps.
pub(crate) fn reap_until_gone(within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    while reap_ended() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits for one child that is known to be exiting (it reported a failure
/// before exec and exits at once), so this blocks only for a moment.
pub(crate) fn wait_for(pid: libc::pid_t) {
    loop {
        // SAFETY: waiting for our own child; a null status is allowed.
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        if r >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}
