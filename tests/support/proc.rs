//! What /proc says about processes: status fields (RSS, signal masks,
//! context switches), CPU ticks, open fds, children and descendants,
//! sessions and zombies; and killing what a test leaves behind.

use std::collections::HashSet;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use super::wait_until;

/// The value of `field` in a /proc/PID/status text, trimmed.
pub fn field_of<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// The leading number of `field` in a /proc/PID/status text (the KiB of
/// VmRSS or VmHWM, a count of context switches).
pub fn number_of(status: &str, field: &str) -> Option<u64> {
    field_of(status, field)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `/proc/<pid>/status` field `name`, trimmed.
pub fn status_field(pid: i32, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field_of(&text, name).map(str::to_owned)
}

/// The leading number of a /proc/PID/status field (the KiB of VmRSS or
/// VmHWM, a count of context switches).
pub fn status_number(pid: i32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    number_of(&text, field)
}

/// The fields of a `/proc/PID/stat` line after the command, which is in
/// parentheses and may hold anything: field 3 (the state) comes first.
pub fn fields_after_comm(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

/// The `/proc/PID/stat` fields after the command, `None` once the process
/// is gone.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        fields_after_comm(&text)?
            .into_iter()
            .map(str::to_owned)
            .collect(),
    )
}

/// The process's CPU time, user + system, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let f = stat_fields(pid).unwrap_or_else(|| panic!("no /proc/{pid}/stat"));
    // utime and stime are fields 14 and 15; `f` starts at field 3.
    let field = |i: usize| -> u64 {
        f[i].parse()
            .unwrap_or_else(|e| panic!("/proc/{pid}/stat field {}: {e}", i + 3))
    };
    field(11) + field(12)
}

/// CPU ticks (user, system) of the process and (user + system) of its
/// reaped children: /proc/PID/stat fields 14, 15, 16 and 17.
pub fn cpu_ticks_with_children(pid: i32) -> Option<(u64, u64, u64)> {
    let f = stat_fields(pid)?;
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some((field(11), field(12), field(13) + field(14)))
}

/// Clock ticks per second.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
}

/// (pid, ppid, state, session id, process group) of a process.
#[derive(Debug, Clone, Copy)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub pgrp: i32,
    pub sid: i32,
}

pub fn proc_stat(pid: i32) -> Option<Proc> {
    let f = stat_fields(pid)?;
    Some(Proc {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        sid: f.get(3)?.parse().ok()?,
    })
}

/// Every process of the machine (of this pid namespace).
pub fn all_procs() -> Vec<Proc> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(proc_stat)
        .collect()
}

/// Processes (zombies included) whose session id is one of `sids`.
pub fn procs_in_sessions(sids: &[i32]) -> Vec<Proc> {
    let set: HashSet<i32> = sids.iter().copied().collect();
    all_procs()
        .into_iter()
        .filter(|p| set.contains(&p.sid))
        .collect()
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    status_field(pid, "State").is_some_and(|s| !s.starts_with('Z') && !s.starts_with('X'))
}

/// Children of `pid` (zombies included), from every thread's `children`
/// file.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

/// Children of `pid` that are zombies.
pub fn zombie_children(pid: i32) -> Vec<i32> {
    children_of(pid)
        .into_iter()
        .filter(|&c| proc_stat(c).is_some_and(|p| p.state == 'Z'))
        .collect()
}

/// Every descendant of `pid`.
pub fn descendants_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            if !out.contains(&c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// The open fd numbers of a process, sorted.
pub fn open_fds(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// How many fds a process has open (0 once it is gone).
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// kill(2), ignoring errors.
pub fn kill(target: i32, sig: i32) {
    // SAFETY: kill with plain integers.
    unsafe { libc::kill(target, sig) };
}

/// SIGKILLs every process in the given sessions until none is left.
pub fn kill_sessions(sids: &[i32]) {
    let ok = wait_until(Duration::from_secs(10), || {
        let left = procs_in_sessions(sids);
        for p in &left {
            if p.state != 'Z' {
                kill(p.pid, libc::SIGKILL);
            }
        }
        left.iter().all(|p| p.state == 'Z')
    });
    assert!(ok, "processes of sessions {sids:?} survive SIGKILL");
}

/// SIGKILLs a process tree: the process group of every descendant of
/// `pid` that leads one (a session's group, whatever its members were
/// reparented to), every descendant, then `pid`. `pid` is stopped first,
/// so that it reaps none of its children meanwhile: a pid seen here stays
/// that process's (a zombie's) until `pid` is gone, and no group of a
/// stranger that reused it is hit. The caller makes sure `pid` itself is
/// still the process it means.
pub fn kill_tree(pid: i32) {
    kill(pid, libc::SIGSTOP);
    let descendants = descendants_of(pid);
    for &d in &descendants {
        if proc_stat(d).is_some_and(|p| p.pgrp == d) {
            kill(-d, libc::SIGKILL);
        }
    }
    for &d in &descendants {
        kill(d, libc::SIGKILL);
    }
    kill(pid, libc::SIGKILL);
}

/// Waits for a child to exit, polling; `None` after `limit`.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on a child") {
            return Some(status);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
