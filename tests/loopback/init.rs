//! The agent's PID-1 side, as far as it can be tested on the machine that
//! runs the tests (the real thing, PID 1 of a VM, is `tests/vm/run.sh`):
//!
//! - the signals that shut PID 1 down gracefully (SIGINT, SIGPWR; and,
//!   only as PID 1, SIGUSR1 and SIGUSR2, which busybox `halt` and
//!   `poweroff` send to init), with the agent as PID 1 of a pid namespace;
//! - `agentd --init` when not PID 1 (docs/VM.md): the boot branch that
//!   neither mounts nor powers off, and its exit statuses (0 after
//!   SHUTDOWN, 1 after a fatal error, 101 after a panic), `--log-level`
//!   against `agentd.log=`;
//! - `agentd --init` as PID 1 of a pid namespace: it mounts (in its own
//!   mount namespace) and "powers off" for real, which for a namespace
//!   means `kill(-1)` inside it and `reboot(RB_POWER_OFF)` ending it;
//! - arguments that are not UTF-8 are an error, not a panic.
//!
//! The kernel command line of the machine cannot be chosen here, so the
//! `--init` tests give it in `AGENTD_TEST_CMDLINE`, which only a process
//! that is not PID 1 reads (`agentd::agent::init::TEST_CMDLINE_ENV`).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output as ProcessOutput, Stdio};
use std::time::Duration;

use agentd::agent::init::{DEFAULT_PATH, TEST_CMDLINE_ENV};

use crate::support::agent::*;
use crate::support::checker::*;
use crate::support::host::*;
use crate::support::msgpack::*;
use crate::support::*;

/// Sends `sig` to the agent while a session runs: the agent shuts down as
/// for SHUTDOWN with the default grace (the session gets SIGTERM),
/// SHUTDOWN_DONE, exit status 0.
fn signal_shuts_down(opts: Opts, sig: i32) {
    let mut agent = Agent::start_with(opts);
    agent.exec(1, &cmd("sleep", &["100"]));
    agent.note_shutdown();
    // SAFETY: kill with a pid and a signal number.
    unsafe { libc::kill(agent.host_pid, sig) };
    let out = agent.collect(1);
    assert_eq!(out.exit, ExitInfo::signal(libc::SIGTERM), "signal {sig}");
    agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// Options for the agent as PID 1 of a pid namespace, or `None` (with a
/// message) where that does not work.
fn pidns_opts(args: &[&str]) -> Option<Opts> {
    if !pidns_available() {
        eprintln!("skipped: no pid namespace here (unshare --pid --fork --mount-proc, or -Urpf --mount-proc when not root)");
        return None;
    }
    Some(Opts::args(args).pidns(true))
}

both! {
    /// SIGINT (Ctrl-Alt-Del as the kernel reports it to init, or ^C) shuts
    /// down gracefully.
    fn sigint_shuts_down(opts: Opts) {
        signal_shuts_down(opts, libc::SIGINT);
    }

    /// SIGPWR (a power failure, or `kill -PWR 1`) shuts down gracefully.
    fn sigpwr_shuts_down(opts: Opts) {
        signal_shuts_down(opts, libc::SIGPWR);
    }
}

/// SIGUSR1 (busybox `halt`) to PID 1 shuts down gracefully. Not tested
/// off PID 1, where it keeps its default action.
#[test]
fn sigusr1_to_pid1_shuts_down() {
    if let Some(opts) = pidns_opts(&[]) {
        signal_shuts_down(opts, libc::SIGUSR1);
    }
}

/// SIGUSR2 (busybox `poweroff`) to PID 1 shuts down gracefully.
#[test]
fn sigusr2_to_pid1_shuts_down() {
    if let Some(opts) = pidns_opts(&[]) {
        signal_shuts_down(opts, libc::SIGUSR2);
    }
}

/// READY's `pid1`.
fn ready_pid1(agent: &Agent) -> bool {
    agent
        .ready
        .get("pid1")
        .and_then(Value::as_bool)
        .unwrap_or_else(|| panic!("READY has no boolean pid1: {:?}", agent.ready))
}

/// `agentd --init --stdio` when not PID 1: it serves as usual, with the
/// init path's session environment (`PATH` and `HOME=/root`, nothing of
/// the agent's own environment), mounts nothing, and after SHUTDOWN exits
/// 0 instead of powering off.
#[test]
fn init_flag_off_pid1_serves_and_exits_0_after_shutdown() {
    // Not PID 1 even when the suite runs in pid namespaces.
    let mut agent = Agent::start_with(Opts::args(&["--init"]).pidns(false));
    assert!(!ready_pid1(&agent), "READY: {:?}", agent.ready);
    let out = agent.sh(&format!("echo \"$PATH|$HOME|${{{BASE_ENV_KEY}-unset}}\""));
    out.assert_success();
    assert_eq!(out.stdout_str(), format!("{DEFAULT_PATH}|/root|unset\n"));
    agent.send_shutdown(500);
    agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("--init but not PID 1: no mounts, modules or hostname"),
        "{log}"
    );
    assert!(
        log.contains("not PID 1: exiting instead of powering off"),
        "{log}"
    );
}

/// Runs `agentd ARGS` to its end with `AGENTD_TEST_CMDLINE=cmdline`, stdin
/// from /dev/null, within the harness timeout.
fn run_agentd(args: &[&str], cmdline: &str) -> ProcessOutput {
    // The logs are small: the pipes cannot fill while this polls.
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(args)
        .env(TEST_CMDLINE_ENV, cmdline)
        .env_remove("AGENTD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning agentd");
    let done = wait_until(timeout(), || matches!(child.try_wait(), Ok(Some(_))));
    if !done {
        let _ = child.kill();
        let out = child.wait_with_output().expect("waiting for agentd");
        panic!(
            "agentd {args:?} did not end within {:?}: {}",
            timeout(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().expect("waiting for agentd")
}

/// A port that cannot be opened.
const NO_PORT: &str = "/nonexistent/agentd-test-port";

/// `--init` when not PID 1: a fatal error (here, the transport cannot be
/// opened) is logged and ends the process with status 1, where PID 1 would
/// power off.
#[test]
fn init_flag_off_pid1_fatal_error_exits_1() {
    let out = run_agentd(&["--init", "--port", NO_PORT], "");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}\n{log}", out.status);
    assert!(log.contains(&format!("fatal: opening {NO_PORT}")), "{log}");
}

/// `--init` when not PID 1 with the test hook `agentd.test_panic=1`: the
/// panic hook logs the panic and ends the process with status 101 (PID 1
/// would power off; `tests/vm/run.sh` checks that).
#[test]
fn init_flag_off_pid1_panic_hook_exits_101() {
    let out = run_agentd(&["--init", "--stdio"], "quiet agentd.test_panic=1");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{:?}\n{log}", out.status);
    // One line (one kernel log record on PID 1): where, and the message.
    assert!(
        log.lines().any(
            |l| l.starts_with("PID 1 panicked: panicked at src/bin/agentd.rs")
                && l.contains(": agentd.test_panic=1: deliberate panic")
                && l.ends_with("; powering off")
        ),
        "{log}"
    );
    assert!(out.stdout.is_empty(), "the panic reached the transport");
    // Without the hook option: no panic (the same run, serving until end of
    // file on stdin, then exiting 0 as after SHUTDOWN).
    let out = run_agentd(&["--init", "--stdio"], "quiet agentd.test_panic=0");
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{:?}\n{log}", out.status);
    assert!(!log.contains("panicked"), "{log}");
}

/// On the init path the log level comes from `--log-level`, else from
/// `agentd.log=`, else info. Each run ends at once with a fatal error (no
/// port), after the boot steps' info and warn lines.
#[test]
fn init_flag_log_level_beats_the_command_line() {
    const INFO: &str = "with --init; command line:";
    const WARN: &str = "--init but not PID 1";
    let cases: [(&[&str], &str, bool, bool); 5] = [
        (&[], "", true, true),
        (&["--log-level", "warn"], "", false, true),
        (&[], "agentd.log=error", false, false),
        (&["--log-level", "info"], "agentd.log=error", true, true),
        (&["--log-level", "error"], "agentd.log=debug", false, false),
    ];
    for (extra, cmdline, info, warn) in cases {
        let mut args = vec!["--init", "--port", NO_PORT];
        args.extend_from_slice(extra);
        let out = run_agentd(&args, cmdline);
        let log = String::from_utf8_lossy(&out.stderr);
        let what = format!("{extra:?} with {cmdline:?}:\n{log}");
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert_eq!(log.contains(INFO), info, "info line, {what}");
        assert_eq!(log.contains(WARN), warn, "warn line, {what}");
        assert!(log.contains("fatal: opening"), "{what}");
    }
}

/// A word of the command line that is not UTF-8 is a usage error (status
/// 2), not a panic (status 101) in argument parsing.
#[test]
fn non_utf8_argument_is_an_error_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"--\xff");
    for args in [vec![bad, "--stdio".as_ref()], vec!["--port".as_ref(), bad]] {
        let out = Command::new(env!("CARGO_BIN_EXE_agentd"))
            .args(&args)
            .arg("--max-sessions")
            .arg(bad)
            .stdin(Stdio::null())
            .output()
            .expect("running agentd");
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {log}");
        assert!(log.contains("not valid UTF-8"), "{args:?}: {log}");
    }
}

/// `agentd --init --stdio` as PID 1 of a pid namespace takes the PID-1
/// branch: it mounts (`/tmp` and `/run` when they are not mount points,
/// in the namespace's own mount table), logs to its stderr (not the
/// machine's kernel log), and after SHUTDOWN_DONE powers off: a process
/// outside every session, that only `kill(-1, SIGTERM)` can reach, gets
/// SIGTERM, then `reboot(RB_POWER_OFF)` ends the namespace, whose parent
/// sees it killed by SIGINT (reboot(2)). Skipped unless `/dev` and
/// `/dev/pts` are mount points here (otherwise the agent would mount its
/// own, and `/dev` may be shared with the machine).
#[test]
fn init_flag_as_pid1_of_a_namespace_powers_off() {
    for p in ["/dev", "/dev/pts"] {
        if !is_mount_point(p) {
            eprintln!("skipped: {p} is not a mount point here");
            return;
        }
    }
    let Some(opts) = pidns_opts(&["--init"]) else {
        return;
    };
    // Somewhere the agent does not mount over (in its namespace) when it
    // is not a mount point already: not under /tmp or /run (the build
    // directory is, in a clone under /tmp).
    let covered = |p: &Path| {
        ["/tmp", "/run", "/dev", "/proc", "/sys"]
            .iter()
            .any(|m| p.starts_with(m))
    };
    let base = [
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        PathBuf::from("/var/tmp"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ]
    .into_iter()
    .find(|p| p.is_dir() && !covered(p));
    let Some(base) = base else {
        eprintln!("skipped: no scratch directory outside /tmp and /run");
        return;
    };
    let dir = base.join(format!("agentd-init-pidns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("orphan-got-sigterm");
    let up = dir.join("orphan-up");

    let mut agent = Agent::start_with(opts);
    assert!(ready_pid1(&agent), "READY: {:?}", agent.ready);
    assert_eq!(agent.ready_int("pid"), 1);
    let tmp_mounted = !is_mount_point("/tmp");
    let out = agent.sh("grep -E ' /(tmp|run) tmpfs ' /proc/mounts | cut -d' ' -f2");
    out.assert_success();
    if tmp_mounted {
        assert!(
            out.stdout_str().lines().any(|l| l == "/tmp"),
            "the agent as PID 1 did not mount /tmp: {:?}",
            out.stdout_str()
        );
    }
    // A process in a session (and process group) of its own, orphaned to
    // the agent.
    let orphan = format!(
        "setsid sh -c 'trap \"echo got-term > {m}; exit 0\" TERM; echo > {u}; \
         while :; do sleep 0.1; done' </dev/null >/dev/null 2>&1 &",
        m = marker.display(),
        u = up.display()
    );
    agent.sh(&orphan).assert_success();
    assert!(
        wait_until(timeout(), || up.exists()),
        "the orphan did not start"
    );
    agent.exec(1, &cmd("sleep", &["100"]));
    agent.send_shutdown(300);
    assert_eq!(agent.collect(1).exit, ExitInfo::signal(libc::SIGTERM));
    agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    let status = agent.wait_exit(Duration::from_secs(10));
    let log = agent.log();
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}\n{log}");
    assert_eq!(
        std::fs::read_to_string(&marker).ok().as_deref(),
        Some("got-term\n"),
        "power-off did not SIGTERM the process outside the sessions\n{log}"
    );
    assert!(log.contains("as PID 1; command line:"), "{log}");
    assert!(
        log.contains("powering off: terminating all processes"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether `path` is a mount point in this process's mount namespace.
fn is_mount_point(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path))
}

/// `agentd.root=` and `agentd.mount=` given to an agent that is not the
/// init of a VM: nothing is mounted, and READY's `mounts` says so for each
/// request (the VM suite tests them as PID 1), a malformed `agentd.mount=`
/// with what was expected.
#[test]
fn init_flag_off_pid1_reports_every_mount_as_not_done() {
    let cmdline = "agentd.root=/dev/vdz agentd.rootfstype=ext4 \
                   agentd.mount=work:/srv/work:9p:ro agentd.mount=nopath";
    let mut opts = Opts::args(&["--init"]).pidns(false);
    opts.env = Env::Only(vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        (TEST_CMDLINE_ENV.into(), cmdline.into()),
    ]);
    let agent = Agent::start_with(opts);
    let Some(Value::Array(mounts)) = agent.ready.get("mounts") else {
        panic!("READY has no mounts: {:?}", agent.ready);
    };
    let field = |m: &Value, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    assert_eq!(mounts.len(), 3, "{mounts:?}");
    assert_eq!(field(&mounts[0], "source").as_deref(), Some("/dev/vdz"));
    assert_eq!(field(&mounts[0], "path").as_deref(), Some("/"));
    assert_eq!(field(&mounts[0], "fstype").as_deref(), Some("ext4"));
    assert_eq!(field(&mounts[1], "source").as_deref(), Some("work"));
    assert_eq!(field(&mounts[1], "path").as_deref(), Some("/srv/work"));
    assert_eq!(field(&mounts[1], "fstype").as_deref(), Some("9p"));
    assert_eq!(mounts[1].get("ro").and_then(Value::as_bool), Some(true));
    for m in &mounts[..2] {
        let error = field(m, "error").unwrap_or_default();
        assert!(error.contains("not the init of a VM"), "{m:?}");
    }
    let error = field(&mounts[2], "error").unwrap_or_default();
    assert!(error.contains("expected TAG:/path"), "{:?}", mounts[2]);
    assert!(!is_mount_point("/srv/work"), "the test machine got a mount");
}
