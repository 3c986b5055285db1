//! Process-wide setup the agent does once, before its loop exists.

use std::io;

use nix::sys::signal::{sigprocmask, SigmaskHow};

use super::event_loop::handled_signals;

/// Blocks the signals the loop reads through its signalfd and ignores
/// SIGPIPE (a write to a closed pipe is EPIPE, handled where it happens).
/// Children undo both before exec.
pub fn setup_signals() -> io::Result<()> {
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None)?;
    // SAFETY: installing SIG_IGN, no handler code involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Ok(())
}

/// Marks every fd above 2 close-on-exec, so nothing the agent inherited
/// from whoever started it can leak into a child.
pub fn cloexec_inherited_fds() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    // Kernels before 5.11: walk /proc/self/fd.
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let fds: Vec<i32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect();
        for fd in fds {
            // SAFETY: setting a flag on an fd number; a stale one (the
            // directory's own) fails harmlessly with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// Makes orphaned descendants of sessions children of the agent, so they
/// are reaped here (PID 1 gets that from the kernel).
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where the agent's logs go: its stderr, through an open file of its own
/// that is nonblocking, so a reader that stops reading (or a slow serial
/// console) costs log lines, never the loop.
///
/// `/proc/self/fd/2` is opened anew (for a pipe, a terminal or a file that
/// gives a separate open file description, whose O_NONBLOCK does not touch
/// whoever shares fd 2); if that fails (a socket) fd 2 is duplicated and
/// written as it is.
#[derive(Debug)]
pub struct LogSink(Option<std::fs::File>);

impl LogSink {
    pub fn stderr() -> LogSink {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let reopened = std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open("/proc/self/fd/2");
        if let Ok(f) = reopened {
            return LogSink(Some(f));
        }
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own, or -1.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
        // SAFETY: a non-negative `fd` was just created and is ours alone.
        LogSink((fd >= 0).then(|| unsafe { std::fs::File::from_raw_fd(fd) }))
    }
}

/// One log line's writer; without a stderr, lines are dropped.
pub struct LogWriter<'a>(Option<&'a std::fs::File>);

impl io::Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter(self.0.as_ref())
    }
}

/// Raises the agent's soft RLIMIT_NOFILE to its hard limit (a session
/// costs up to four fds, so the usual soft 1024 would cap the agent near
/// 250 sessions) and returns the limit as it was, for children: they get
/// the original soft limit back (programs that use select(2) break above
/// 1024). `None` when the limit could not be read.
pub fn raise_fd_limit() -> Option<libc::rlimit> {
    let mut original = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit to a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut original) } != 0 {
        return None;
    }
    if original.rlim_cur < original.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: original.rlim_max,
            rlim_max: original.rlim_max,
        };
        // SAFETY: setrlimit reads one valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "cannot raise the fd limit");
        }
    }
    Some(original)
}
