//! A builder for EXEC requests, in the style of `std::process::Command`.

use std::time::Duration;

use crate::messages::{Exec, Rlimit, RlimitResource};

/// Milliseconds of `d` for a u32 wire key: at least 1 for a non-zero
/// duration (0 means "none" on the wire), at most `u32::MAX`.
fn millis(d: Duration) -> u32 {
    if d.is_zero() {
        return 0;
    }
    d.as_millis().clamp(1, u128::from(u32::MAX)) as u32
}

/// What to run: a builder for an EXEC request.
///
/// Every setter takes and returns `&mut self`, like
/// [`std::process::Command`]; [`Client::exec`](super::Client::exec) and
/// friends take a `&Command`, a `Command` or a raw [`Exec`].
///
/// ```
/// use agentd::client::Command;
///
/// let mut cmd = Command::new("sh");
/// cmd.args(["-c", "echo $GREETING"])
///     .env("GREETING", "hello")
///     .cwd("/tmp")
///     .rlimit("nofile", 64, 64);
/// let exec = cmd.as_exec();
/// assert_eq!(exec.cmd, "sh");
/// assert_eq!(exec.env, ["GREETING=hello"]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    exec: Exec,
}

impl Command {
    /// Runs `program` (looked up in the child's `PATH` when it has no `/`),
    /// with every other EXEC key at its default: no arguments, the agent's
    /// environment and working directory, pipes (no tty), stdin open.
    pub fn new(program: impl Into<String>) -> Self {
        Command {
            exec: Exec::new(program),
        }
    }

    /// Adds one argument (after argv\[0\], which is the program).
    pub fn arg(&mut self, arg: impl Into<String>) -> &mut Self {
        self.exec.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.exec.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets `key` to `value` in the child's environment (added to, or
    /// replacing in, the base environment).
    pub fn env(&mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> &mut Self {
        self.exec
            .env
            .push(format!("{}={}", key.as_ref(), value.as_ref()));
        self
    }

    /// Starts from an empty environment instead of the agent's default one.
    pub fn env_clear(&mut self) -> &mut Self {
        self.exec.clear_env = true;
        self
    }

    /// The working directory of the child.
    pub fn cwd(&mut self, dir: impl Into<String>) -> &mut Self {
        self.exec.cwd = Some(dir.into());
        self
    }

    /// Runs as `user`: `name`, `uid`, `name:group` or `uid:gid`.
    pub fn user(&mut self, user: impl Into<String>) -> &mut Self {
        self.exec.user = Some(user.into());
        self
    }

    /// Runs on a new pseudo-terminal of `rows` x `cols` (output arrives as
    /// stdout only; there is no stderr).
    pub fn tty(&mut self, rows: u16, cols: u16) -> &mut Self {
        self.exec.tty = true;
        self.exec.rows = rows;
        self.exec.cols = cols;
        self
    }

    /// Sets a resource limit (`nofile`, `nproc`, `as`, ...; see
    /// [`RlimitResource`]). The agent refuses unknown names with
    /// `invalid_request`. `u64::MAX` is "unlimited".
    pub fn rlimit(&mut self, resource: impl Into<String>, soft: u64, hard: u64) -> &mut Self {
        self.exec.rlimits.push(Rlimit {
            resource: resource.into(),
            soft,
            hard,
        });
        self
    }

    /// `false`: the child's stdin is /dev/null and the session takes no
    /// STDIN. Default `true`.
    pub fn stdin(&mut self, open: bool) -> &mut Self {
        self.exec.stdin = open;
        self
    }

    /// Bounds the output the agent sends ahead of the reader: at most `bytes`
    /// of STDOUT+STDERR un-acknowledged. The session acknowledges output as
    /// it is consumed, so a slow consumer makes the child block in write()
    /// instead of growing the client's memory. 0 (the default) is unlimited.
    pub fn output_window(&mut self, bytes: u32) -> &mut Self {
        self.exec.output_window = bytes;
        self
    }

    /// How long the agent keeps draining output held open by descendants
    /// after the process is reaped (default 100 ms).
    pub fn linger_ms(&mut self, ms: u32) -> &mut Self {
        self.exec.linger_ms = ms;
        self
    }

    /// Tags the session with a free string (extension `sessions`), to find
    /// it by in [`Client::sessions`](super::Client::sessions) and
    /// [`Client::attach`](super::Client::attach) (`agentctl exec --name`).
    pub fn tag(&mut self, tag: impl Into<String>) -> &mut Self {
        self.exec.tag = Some(tag.into());
        self
    }

    /// Starts the session detached (extension `sessions`): it belongs to
    /// no connection and its output goes to its replay ring only. Start it
    /// with [`Client::exec_detached`](super::Client::exec_detached), which
    /// sets this; [`Client::exec`](super::Client::exec) refuses it (its
    /// session could never deliver an event).
    pub fn detach(&mut self, detach: bool) -> &mut Self {
        self.exec.detach = detach;
        self
    }

    /// Bytes of each output stream the agent keeps for replay (extension
    /// `sessions`; default READY's `replay_bytes`; 0: none).
    pub fn replay_bytes(&mut self, bytes: u32) -> &mut Self {
        self.exec.replay_bytes = Some(bytes);
        self
    }

    /// The deadline (extension `sessions`): once `timeout` has passed since
    /// the start, the agent sends SIGTERM to the session's whole tree, then
    /// SIGKILL after the [`kill_grace`](Self::kill_grace); its exit status
    /// then says [`timed_out`](super::ExitStatus::timed_out). Zero: none.
    /// Milliseconds on the wire (at most about 49 days).
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.exec.timeout_ms = Some(millis(timeout));
        self
    }

    /// Between the deadline's SIGTERM and its SIGKILL (default 1 s).
    pub fn kill_grace(&mut self, grace: Duration) -> &mut Self {
        self.exec.kill_grace_ms = Some(millis(grace));
        self
    }

    /// The session's cgroup `memory.max`, bytes (extension `sessions`;
    /// refused with EXEC_FAILED `invalid_request` by an agent without
    /// per-session cgroups).
    pub fn memory_max(&mut self, bytes: u64) -> &mut Self {
        self.exec.memory_max = Some(bytes);
        self
    }

    /// The session's cgroup `pids.max` (as [`memory_max`](Self::memory_max)).
    pub fn pids_max(&mut self, pids: u32) -> &mut Self {
        self.exec.pids_max = Some(pids);
        self
    }

    /// The session's cgroup `cpu.max`, as the kernel writes it: `"QUOTA
    /// PERIOD"` in µs, or `"max PERIOD"` (as [`memory_max`](Self::memory_max)).
    pub fn cpu_max(&mut self, cpu_max: impl Into<String>) -> &mut Self {
        self.exec.cpu_max = Some(cpu_max.into());
        self
    }

    /// At most `cpus` CPUs' worth of time (docker's `--cpus`): `cpu.max`
    /// with a 100 ms period, `0.5` being `"50000 100000"`.
    pub fn cpus(&mut self, cpus: f64) -> &mut Self {
        self.cpu_max(cpus_to_cpu_max(cpus))
    }

    /// The EXEC request this builds.
    pub fn as_exec(&self) -> &Exec {
        &self.exec
    }

    /// Direct access to every EXEC key.
    pub fn as_exec_mut(&mut self) -> &mut Exec {
        &mut self.exec
    }

    /// Validates a resource name against the contract's list.
    pub fn is_known_rlimit(name: &str) -> bool {
        RlimitResource::parse(name).is_some()
    }
}

/// `cpu.max` for `cpus` CPUs over a 100 ms period (a quota under the
/// kernel's 1 ms minimum is sent as is: the agent refuses it).
pub(crate) fn cpus_to_cpu_max(cpus: f64) -> String {
    const PERIOD: f64 = 100_000.0;
    let quota = (cpus * PERIOD).round();
    let quota = if quota.is_finite() && quota > 0.0 {
        quota.min(u64::MAX as f64) as u64
    } else {
        0
    };
    format!("{quota} {}", PERIOD as u64)
}

impl From<Command> for Exec {
    fn from(c: Command) -> Exec {
        c.exec
    }
}

impl From<&Command> for Exec {
    fn from(c: &Command) -> Exec {
        c.exec.clone()
    }
}

impl From<&mut Command> for Exec {
    fn from(c: &mut Command) -> Exec {
        c.exec.clone()
    }
}

impl From<Exec> for Command {
    fn from(exec: Exec) -> Command {
        Command { exec }
    }
}
