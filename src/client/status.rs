//! How a session ended, as the client reports it.

use crate::messages::Exited;

/// How a session's process ended (the EXITED frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitStatus {
    /// The exit code, if the process exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Whether it dumped core.
    pub core_dumped: bool,
    /// As a shell reports it: `code`, or 128 + `signal`.
    pub status: i32,
    /// Output the agent dropped instead of sending (EXITED's
    /// `output_dropped`: a shutdown past its grace while this session's
    /// output window was used up or the host was not reading); 0 when all
    /// of it was sent.
    pub output_dropped: u64,
    /// The session's deadline ([`Command::timeout`](super::Command::timeout))
    /// passed and the agent ended it.
    pub timed_out: bool,
    /// The kernel's OOM killer killed a process of the session (its
    /// cgroup's `memory.events`).
    pub oom_killed: bool,
}

impl ExitStatus {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<Exited> for ExitStatus {
    fn from(x: Exited) -> Self {
        ExitStatus {
            code: x.code,
            signal: x.signal,
            core_dumped: x.core_dumped,
            status: x.status,
            output_dropped: x.output_dropped.unwrap_or(0),
            timed_out: x.timed_out,
            oom_killed: x.oom_killed,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}")?,
            (None, Some(sig)) => {
                write!(f, "killed by signal {sig}")?;
                if self.core_dumped {
                    f.write_str(" (core dumped)")?;
                }
            }
            (None, None) => write!(f, "status {}", self.status)?,
        }
        if self.timed_out {
            f.write_str(" (timed out)")?;
        }
        if self.oom_killed {
            f.write_str(" (OOM killed)")?;
        }
        Ok(())
    }
}
