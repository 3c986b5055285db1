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

/// Raises the agent's soft RLIMIT_NOFILE to its hard limit (a session
/// costs up to four fds, so the usual soft 1024 would cap the agent near
/// 250 sessions) and returns the limit as it was, for children: they get
/// the original soft limit back (programs that use select(2) break above
/// 1024). `None` when the limit could not be read.
pub(crate) fn raise_fd_limit() -> Option<libc::rlimit> {
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
