//! Per-session cgroups (`--cgroup-root`, docs/PROTOCOL.md "Extension
//! `sessions`"): SIGNAL `tree` and deadlines reach processes that left the
//! session's process group; limits are enforced where the root has their
//! controller and refused where it does not, never ignored; cgroups are
//! removed once empty and when the agent exits.
//!
//! The root is a fresh directory under this test process's own cgroup2
//! cgroup; where none can be made (no cgroup2, or not writable) the tests
//! say so and skip. The VM suite covers the limits with every controller.

use std::path::PathBuf;
use std::time::Duration;

use agentd::messages::{Exec, Message, Signal};

use crate::support::agent::*;
use crate::support::host::*;
use crate::support::msgpack::Value;
use crate::support::proc::alive;
use crate::support::{timeout, wait_until};

/// A scratch cgroup2 directory for one agent, removed (with what the agent
/// left) on drop.
struct Root(PathBuf);

impl Root {
    fn make() -> Option<Root> {
        let base = own_cgroup()?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = base.join(format!("agentd-test-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => Some(Root(dir)),
            Err(e) => {
                eprintln!(
                    "skipped: cannot make a cgroup under {}: {e}",
                    base.display()
                );
                None
            }
        }
    }

    fn arg(&self) -> Vec<String> {
        vec!["--cgroup-root".into(), self.0.display().to_string()]
    }

    fn controllers(&self) -> String {
        std::fs::read_to_string(self.0.join("cgroup.controllers")).unwrap_or_default()
    }

    /// Session cgroups in it now.
    fn sessions(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for name in self.sessions() {
            let dir = self.0.join(name);
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            let _ = wait_until(Duration::from_secs(2), || std::fs::remove_dir(&dir).is_ok());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// This process's cgroup on the cgroup2 mount.
fn own_cgroup() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let Some(mount) = mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
    else {
        eprintln!("skipped: no cgroup2 mounted here");
        return None;
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(rel.trim_start_matches('/')))
}

fn agent_with(root: &Root, opts: Opts) -> Agent {
    let mut opts = opts;
    opts.args.extend(root.arg());
    Agent::start_with(opts)
}

fn exited_flag(out: &Output, key: &str) -> bool {
    out.exited_map
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A shell script that starts a `setsid`ed daemon (out of the session's
/// process group, its output away from the session's pipes), prints its
/// pid and waits.
const DAEMON: &str =
    "setsid sh -c 'exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!; exec sleep 1000";

fn daemon_pid(agent: &mut Agent, id: u32) -> i32 {
    let f = agent.recv_where(|f| f.id == id && f.kind == 0x30, "the daemon's pid");
    let pid: u32 = String::from_utf8_lossy(&f.payload)
        .trim()
        .parse()
        .expect("a pid");
    // In a pid namespace the pid is mapped through /proc, which can miss
    // a process between its fork and its exec on a loaded machine: look
    // again for a while.
    let mut host = None;
    wait_until(timeout(), || {
        host = agent.host_pid_of(pid);
        host.is_some()
    });
    host.expect("the daemon's pid on this side")
}

both! {
    /// READY says whether sessions get cgroups.
    fn ready_says_cgroups(opts: Opts) {
        let agent = Agent::start_with(opts.clone());
        assert_eq!(agent.ready.get("cgroups").and_then(Value::as_bool), Some(false));
        let Some(root) = Root::make() else { return };
        let agent = agent_with(&root, opts);
        assert_eq!(agent.ready.get("cgroups").and_then(Value::as_bool), Some(true));
    }

    /// SIGNAL `tree` reaches a daemon that `setsid`ed out of the process
    /// group; a group signal would not have.
    fn a_tree_signal_reaches_a_setsid_daemon(opts: Opts) {
        let Some(root) = Root::make() else { return };
        let mut agent = agent_with(&root, opts);
        agent.exec(1, &sh(DAEMON));
        let daemon = daemon_pid(&mut agent, 1);
        assert!(alive(daemon));
        let sig = Signal { signal: 9, group: true, tree: true };
        agent.send(&Message::Signal(sig), 1);
        let out = agent.collect(1);
        assert_eq!(out.exit.signal, Some(9));
        assert!(wait_until(timeout(), || !alive(daemon)), "the daemon survived SIGNAL tree");
        assert!(wait_until(timeout(), || root.sessions().is_empty()), "cgroups left: {:?}", root.sessions());
    }

    /// The deadline's SIGTERM reaches the whole tree too.
    fn a_deadline_reaches_a_setsid_daemon(opts: Opts) {
        let Some(root) = Root::make() else { return };
        let mut agent = agent_with(&root, opts);
        let e = Exec { timeout_ms: Some(300), ..sh(DAEMON) };
        agent.exec(1, &e);
        let daemon = daemon_pid(&mut agent, 1);
        let out = agent.collect(1);
        assert!(exited_flag(&out, "timed_out"));
        assert!(wait_until(timeout(), || !alive(daemon)), "the daemon outlived the deadline");
    }

    /// A daemon left behind by a session that ended keeps its cgroup until
    /// it exits; then the cgroup goes. Without a tree signal it is not
    /// killed (exit does not wait for it, nor end it).
    fn a_cgroup_goes_once_empty(opts: Opts) {
        let Some(root) = Root::make() else { return };
        let mut agent = agent_with(&root, opts);
        // Long enough to outlive the lookups below on a loaded machine.
        let script = "setsid sh -c 'exec sleep 3' </dev/null >/dev/null 2>&1 & echo $!";
        agent.exec(1, &sh(script));
        let daemon = daemon_pid(&mut agent, 1);
        let out = agent.collect(1);
        assert_eq!(out.exit.code, Some(0));
        assert!(alive(daemon), "the daemon was killed with its session");
        assert_eq!(root.sessions().len(), 1, "the cgroup went while the daemon runs");
        assert!(wait_until(timeout(), || root.sessions().is_empty()), "cgroup left: {:?}", root.sessions());
        // Sessions go on working, each in its cgroup.
        agent.exec(2, &sh("cat /proc/self/cgroup"));
        let out = agent.collect(2);
        let own = out.stdout_str();
        assert!(own.contains("agentd-test-"), "not in the root: {own}");
    }

    /// An agent that exits kills what runs in its sessions' cgroups and
    /// removes them.
    fn the_agent_removes_its_cgroups_at_exit(opts: Opts) {
        let Some(root) = Root::make() else { return };
        let mut agent = agent_with(&root, opts);
        agent.exec(1, &sh(DAEMON));
        let daemon = daemon_pid(&mut agent, 1);
        agent.send_shutdown(200);
        agent.collect(1);
        agent.wait_exit(timeout());
        assert!(wait_until(timeout(), || !alive(daemon)), "the daemon outlived the agent");
        assert!(root.sessions().is_empty(), "cgroups left: {:?}", root.sessions());
    }

    /// A limit is enforced where the root has its controller, refused
    /// (`invalid_request`, stage `cgroup`) where it does not.
    fn limits_are_enforced_or_refused(opts: Opts) {
        let Some(root) = Root::make() else { return };
        let controllers = root.controllers();
        let mut agent = agent_with(&root, opts);
        let e = Exec { pids_max: Some(8), ..sh("cat pids.max 2>/dev/null; cat /sys/fs/cgroup/pids.max 2>/dev/null; true") };
        if controllers.split_whitespace().any(|c| c == "pids") {
            let e = Exec { pids_max: Some(8), ..sh("for i in $(seq 30); do sleep 2 & done 2>/dev/null; wait; echo done") };
            agent.exec(1, &e);
            let out = agent.collect(1);
            assert!(out.stderr_str().contains("fork") || out.stderr_str().contains("Resource"), "30 forks under pids.max 8: {}", out.stderr_str());
        } else {
            let f = agent.exec_fail(1, &e, "invalid_request");
            assert_eq!(f.stage.as_deref(), Some("cgroup"));
            assert!(f.message.contains("pids controller"), "{}", f.message);
        }
        if !controllers.split_whitespace().any(|c| c == "memory") {
            let e = Exec { memory_max: Some(1 << 26), ..Exec::new("true") };
            let f = agent.exec_fail(2, &e, "invalid_request");
            assert_eq!(f.stage.as_deref(), Some("cgroup"));
        }
        let e = Exec { cpu_max: Some("half a CPU".into()), ..Exec::new("true") };
        let f = agent.exec_fail(3, &e, "invalid_request");
        assert_eq!(f.stage.as_deref(), Some("cgroup"));
        assert!(root.sessions().is_empty(), "a refused EXEC left a cgroup");
    }

    /// Without cgroups every limit is refused, never ignored.
    fn limits_without_cgroups_are_refused(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let cases = [
            Exec { memory_max: Some(1 << 26), ..Exec::new("true") },
            Exec { pids_max: Some(10), ..Exec::new("true") },
            Exec { cpu_max: Some("50000 100000".into()), ..Exec::new("true") },
        ];
        for (i, e) in cases.iter().enumerate() {
            let f = agent.exec_fail(i as u32 + 1, e, "invalid_request");
            assert_eq!(f.stage.as_deref(), Some("cgroup"));
            assert!(f.message.contains("cgroup"), "{}", f.message);
        }
        agent.ping();
    }
}

/// A cgroup root that is not on cgroup2 is refused at start.
#[test]
fn a_root_not_on_cgroup2_is_refused() {
    let dir = crate::support::util::TempDir::new("not-cgroup");
    let out = std::process::Command::new(crate::support::AGENTD)
        .args(["--stdio", "--cgroup-root"])
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running agentd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cgroup2"), "{err}");
}
