//! The payloads of protocol v1's own kinds (the contract's tables).

use serde::{Deserialize, Serialize};

use super::strict;
use super::{cap_message, ErrorKind, ExecFailedKind};

fn default_true() -> bool {
    true
}
fn default_rows() -> u16 {
    24
}
fn default_cols() -> u16 {
    80
}
fn default_linger_ms() -> u32 {
    100
}
fn default_grace_ms() -> u32 {
    1000
}

/// READY: the agent's greeting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub protocol: u32,
    /// `agentd/<version>`.
    #[serde(deserialize_with = "strict::string")]
    pub agent: String,
    pub pid: u32,
    pub pid1: bool,
    pub max_payload: u32,
    pub stdin_window: u32,
    pub max_sessions: u32,
    /// Milliseconds since the machine booted (an extension: the host can
    /// read boot-to-READY time from it). Absent from older agents.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub uptime_ms: Option<u64>,
    /// Extension: the extensions the agent serves (`fs`, `net`,
    /// `sessions`, `clock`); absent means none.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "strict::strings"
    )]
    pub features: Vec<String>,
    /// Extension `clock`: the guest's CLOCK_REALTIME when READY was built,
    /// nanoseconds since the epoch.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub realtime_ns: Option<i64>,
    /// Extension `clock`: how many times the agent has seen the VM
    /// restored from a snapshot (READY is sent again after each).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub restores: Option<u32>,
    /// Extension `clock`: whether CLOCK_SET and ENTROPY are served (the
    /// agent is PID 1 of a VM, or was started with `--allow-clock`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub clock_set: Option<bool>,
    /// Extension `sessions`: the default of EXEC's `replay_bytes`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub replay_bytes: Option<u32>,
    /// Extension `sessions`: whether sessions get cgroups of their own.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub cgroups: Option<bool>,
    /// Extension (boot): the root and shared folders the agent mounted as
    /// a VM's init (`agentd.root=`, `agentd.mount=`), each with its error
    /// if it failed; absent when there were none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountStatus>,
}

/// One entry of READY's `mounts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountStatus {
    /// The device, virtiofs or 9p tag, or `overlay`.
    #[serde(deserialize_with = "strict::string")]
    pub source: String,
    /// Where it is (or was to be) mounted: `/` for the root.
    #[serde(deserialize_with = "strict::string")]
    pub path: String,
    /// `ext4`, `virtiofs`, `9p`, `overlay`...
    #[serde(deserialize_with = "strict::string")]
    pub fstype: String,
    /// Mounted read-only.
    #[serde(default)]
    pub ro: bool,
    /// Why it is not mounted; absent when it is.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub error: Option<String>,
    /// The errno of the failing call, when there was one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub errno: Option<i32>,
}

impl Ready {
    /// Whether READY lists `feature`.
    pub fn has(&self, feature: super::Feature) -> bool {
        self.features.iter().any(|f| f == feature.name())
    }
}

/// SHUTDOWN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    #[serde(default = "default_grace_ms")]
    pub grace_ms: u32,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace_ms: default_grace_ms(),
        }
    }
}

/// ERROR. `kind` stays a string so a host can read kinds a newer agent adds;
/// [`ErrorMsg::error_kind`] parses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    #[serde(deserialize_with = "strict::string")]
    pub kind: String,
    #[serde(deserialize_with = "strict::string")]
    pub message: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub frame_kind: Option<u8>,
}

impl ErrorMsg {
    /// An ERROR whose `message` is capped at [`MAX_MESSAGE`] bytes.
    pub fn new(kind: ErrorKind, message: impl Into<String>, frame_kind: Option<u8>) -> Self {
        ErrorMsg {
            kind: kind.as_str().to_owned(),
            message: cap_message(message.into()),
            frame_kind,
        }
    }

    pub fn error_kind(&self) -> Option<ErrorKind> {
        ErrorKind::parse(&self.kind)
    }
}

/// One `rlimits` entry of EXEC: a map with string keys, every key
/// required (`u64::MAX` is `RLIM_INFINITY`). Deserialised by hand so that,
/// like a payload map, it must be a map (not an array) and its keys strings
/// (not field indices); `resource`, `soft` and `hard` at most once each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

impl<'de> Deserialize<'de> for Rlimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rlimit, D::Error> {
        d.deserialize_map(RlimitVisitor)
    }
}

struct RlimitVisitor;

impl<'de> serde::de::Visitor<'de> for RlimitVisitor {
    type Value = Rlimit;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an rlimits entry (a map of resource, soft, hard)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Rlimit, A::Error> {
        use serde::de::Error;
        let mut resource = None;
        let mut soft = None;
        let mut hard = None;
        while let Some(strict::Str(key)) = map.next_key()? {
            match key.as_str() {
                "resource" if resource.is_none() => {
                    resource = Some(map.next_value::<strict::Str>()?.0);
                }
                "soft" if soft.is_none() => soft = Some(map.next_value::<u64>()?),
                "hard" if hard.is_none() => hard = Some(map.next_value::<u64>()?),
                "resource" | "soft" | "hard" => {
                    return Err(A::Error::custom(format!("duplicate key `{key}`")));
                }
                // Unknown keys are ignored, however often they appear
                // (remembering them would cost memory a hostile host chooses).
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Rlimit {
            resource: resource.ok_or_else(|| A::Error::missing_field("resource"))?,
            soft: soft.ok_or_else(|| A::Error::missing_field("soft"))?,
            hard: hard.ok_or_else(|| A::Error::missing_field("hard"))?,
        })
    }
}

/// EXEC: start a process as a new session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    #[serde(deserialize_with = "strict::string")]
    pub cmd: String,
    #[serde(default, deserialize_with = "strict::strings")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "strict::strings")]
    pub env: Vec<String>,
    #[serde(default)]
    pub clear_env: bool,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub cwd: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub user: Option<String>,
    #[serde(default)]
    pub tty: bool,
    #[serde(default = "default_rows")]
    pub rows: u16,
    #[serde(default = "default_cols")]
    pub cols: u16,
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    #[serde(default = "default_true")]
    pub stdin: bool,
    #[serde(default)]
    pub output_window: u32,
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u32,
    /// Extension: set `PR_SET_NO_NEW_PRIVS` in the child before execve.
    #[serde(default)]
    pub no_new_privs: bool,
    /// Extension `sessions`: a free string to find the session by.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub tag: Option<String>,
    /// Extension `sessions`: bytes of each output stream kept for a later
    /// ATTACH (absent: the agent's default, 0: none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub replay_bytes: Option<u32>,
    /// Extension `sessions`: end the session's whole tree after this long
    /// (SIGTERM, SIGKILL after `kill_grace_ms`); 0 or absent: never.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub timeout_ms: Option<u32>,
    /// Extension `sessions`: between a deadline's SIGTERM and its SIGKILL
    /// (default 1000).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub kill_grace_ms: Option<u32>,
    /// Extension `sessions`: start detached: STARTED is the last frame for
    /// this id, the session goes on for a later ATTACH.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
    /// Extension `sessions` (cgroup v2): the session cgroup's memory.max,
    /// in bytes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub memory_max: Option<u64>,
    /// Extension `sessions` (cgroup v2): pids.max.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub pids_max: Option<u32>,
    /// Extension `sessions` (cgroup v2): cpu.max as cgroup writes it,
    /// `"QUOTA PERIOD"` in microseconds (`"50000 100000"`: half a CPU).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub cpu_max: Option<String>,
}

impl Exec {
    /// An EXEC of `cmd` with every other key at its default.
    pub fn new(cmd: impl Into<String>) -> Self {
        Exec {
            cmd: cmd.into(),
            args: Vec::new(),
            env: Vec::new(),
            clear_env: false,
            cwd: None,
            user: None,
            tty: false,
            rows: default_rows(),
            cols: default_cols(),
            rlimits: Vec::new(),
            stdin: true,
            output_window: 0,
            linger_ms: default_linger_ms(),
            no_new_privs: false,
            tag: None,
            replay_bytes: None,
            timeout_ms: None,
            kill_grace_ms: None,
            detach: false,
            memory_max: None,
            pids_max: None,
            cpu_max: None,
        }
    }
}

/// STARTED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub pid: u32,
    /// Extension `sessions`: the agent-wide session number.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub session: Option<u64>,
}

/// EXEC_FAILED.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecFailed {
    #[serde(deserialize_with = "strict::string")]
    pub kind: String,
    #[serde(deserialize_with = "strict::string")]
    pub message: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub errno: Option<i32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub stage: Option<String>,
}

impl ExecFailed {
    /// An EXEC_FAILED whose `message` is capped at [`MAX_MESSAGE`] bytes.
    pub fn new(
        kind: ExecFailedKind,
        message: impl Into<String>,
        errno: Option<i32>,
        stage: Option<&str>,
    ) -> Self {
        ExecFailed {
            kind: kind.as_str().to_owned(),
            message: cap_message(message.into()),
            errno,
            stage: stage.map(str::to_owned),
        }
    }

    pub fn failed_kind(&self) -> Option<ExecFailedKind> {
        ExecFailedKind::parse(&self.kind)
    }
}

/// STDIN_ACK and OUTPUT_ACK: window returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub bytes: u32,
}

/// RESIZE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub rows: u16,
    pub cols: u16,
}

/// SIGNAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    pub signal: i32,
    #[serde(default = "default_true")]
    pub group: bool,
    /// Extension `sessions`: every process of the session's tree (its
    /// cgroup), even those that left its process group.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tree: bool,
}

impl Signal {
    /// `signal` to the session's process group.
    pub fn group(signal: i32) -> Signal {
        Signal {
            signal,
            group: true,
            tree: false,
        }
    }
}

/// EXITED: how the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub code: Option<i32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub signal: Option<i32>,
    #[serde(default)]
    pub core_dumped: bool,
    pub status: i32,
    /// Extension: output bytes the agent read from the session and dropped
    /// instead of sending (a shutdown past its grace, while the output
    /// window was used up or the host did not read). Absent when none was.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::some"
    )]
    pub output_dropped: Option<u64>,
    /// Extension `sessions`: the session's `timeout_ms` passed and the
    /// agent ended it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Extension `sessions`: the kernel's OOM killer killed a process of
    /// the session (its cgroup's `memory.events`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom_killed: bool,
}

impl Exited {
    pub fn from_code(code: i32) -> Self {
        Exited {
            code: Some(code),
            signal: None,
            core_dumped: false,
            status: code,
            output_dropped: None,
            timed_out: false,
            oom_killed: false,
        }
    }

    pub fn from_signal(signal: i32, core_dumped: bool) -> Self {
        Exited {
            code: None,
            signal: Some(signal),
            core_dumped,
            status: 128 + signal,
            output_dropped: None,
            timed_out: false,
            oom_killed: false,
        }
    }
}
