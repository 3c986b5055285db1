//! Security properties of `agentd --stdio` (issue 7): what a child gets
//! (fds, signal state, identity, no_new_privs) and what it cannot reach
//! (other sessions' terminals, the agent's fds, other sessions' frames).
//! docs/RELIABILITY.md lists each property with its test.
//!
//! The identity tests need root (CI runs as root); as another user they
//! say so and pass without checking.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use agentd::messages::{Exited, Kind, Message};
use support::host::{cmd, sh, tty, Opts, Stderr};
use support::proc::{field_of, open_fds};
use support::sync_agent::*;
use support::util::{db_groups, passwd_entry};
use support::wait_until;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// Waits until `pid` runs `comm` and sits in its sleep system call, then
/// lists its fds. Waiting for the sleep, not just the exec, matters: right
/// after execve the dynamic loader and locale setup still hold fd 3 for a
/// moment (a library or a locale file being mapped).
fn fds_after_exec(pid: i32, comm: &str) -> Vec<i32> {
    let sleeping = [libc::SYS_clock_nanosleep, libc::SYS_nanosleep].map(|nr| nr.to_string());
    let ok = wait_until(Duration::from_secs(5), || {
        let comm_ok =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm);
        let in_sleep = std::fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| {
            s.split_whitespace()
                .next()
                .is_some_and(|nr| sleeping.iter().any(|n| n == nr))
        });
        comm_ok && in_sleep
    });
    assert!(ok, "{pid} never sat in the sleep of {comm}");
    open_fds(pid)
}

/// An agent that inherited an fd without close-on-exec (fd 9, a copy of
/// its stderr) and some ignored and blocked signals from whoever started
/// it.
fn agent_with_inheritance() -> SyncAgent {
    let mut ignore = vec![libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR2];
    // Signals 32 and 33, which glibc reserves and its sigaction refuses,
    // are ignored with the system call itself.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    ignore.extend([32, 33]);
    let a = SyncAgent::start_with(Opts {
        ignore_signals: ignore,
        block_signals: vec![libc::SIGUSR1, libc::SIGALRM],
        leak_fd: true,
        ..Opts::plain(&[])
    });
    assert!(
        open_fds(a.host_pid).contains(&9),
        "the agent did not inherit fd 9"
    );
    a
}

/// A child has exactly fds 0, 1 and 2: none of the transport, the
/// signalfd, epoll, other sessions' pipes and terminals, or an fd the
/// agent inherited — for pipes, terminals, stdin /dev/null, and as
/// another user.
#[test]
fn child_has_exactly_fds_0_1_2() {
    let mut a = agent_with_inheritance();
    // Other sessions' fds exist in the agent meanwhile.
    let others = [a.exec(&cmd("cat", &[])), a.exec(&tty(cmd("cat", &[])))];
    for &id in &others {
        a.wait_started(id);
    }
    let mut variants = vec![
        ("pipes", cmd("sleep", &["30"])),
        ("tty", tty(cmd("sleep", &["30"]))),
    ];
    let mut no_stdin = cmd("sleep", &["30"]);
    no_stdin.stdin = false;
    variants.push(("pipes, stdin /dev/null", no_stdin.clone()));
    variants.push(("tty, stdin /dev/null", tty(no_stdin)));
    if is_root() {
        let mut other_user = cmd("sleep", &["30"]);
        other_user.user = Some("nobody".into());
        variants.push(("as nobody", tty(other_user)));
    }
    for (what, e) in variants {
        let id = a.exec(&e);
        let pid = a.wait_started(id);
        assert_eq!(fds_after_exec(pid, "sleep"), [0, 1, 2], "{what}");
        let target = |fd| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        let stdin = target(0).to_string_lossy().into_owned();
        match (e.tty, e.stdin) {
            (_, false) => assert_eq!(stdin, "/dev/null", "{what}"),
            (true, true) => assert!(stdin.starts_with("/dev/pts/"), "{what}: {stdin}"),
            (false, true) => assert!(stdin.starts_with("pipe:"), "{what}: {stdin}"),
        }
        a.signal(id, libc::SIGKILL);
        assert_eq!(a.wait_done(id).signal(), Some(libc::SIGKILL));
    }
}

/// The signal state a child starts with: nothing blocked, nothing ignored,
/// no handlers — although the agent blocks the signals its signalfd reads,
/// ignores SIGPIPE, and here also inherited ignored and blocked signals,
/// among them signals 32 and 33, which glibc's sigaction() cannot reset
/// (glibc's posix_spawn leaves them ignored in the children of a
/// multi-threaded program: the test binaries cargo starts, and every agent
/// a Rust host starts with `std::process::Command`, have them ignored).
#[test]
fn child_has_empty_mask_and_default_dispositions() {
    let mut a = agent_with_inheritance();
    let agent_status = std::fs::read_to_string(format!("/proc/{}/status", a.host_pid)).unwrap();
    let mask = |s: &str, f| u64::from_str_radix(field_of(s, f).unwrap(), 16).unwrap();
    let bit = |sig: i32| 1u64 << (sig - 1);
    // The test means something only if the agent's own state is not clean.
    assert_ne!(mask(&agent_status, "SigBlk") & bit(libc::SIGCHLD), 0);
    assert_ne!(mask(&agent_status, "SigBlk") & bit(libc::SIGUSR1), 0);
    assert_ne!(mask(&agent_status, "SigIgn") & bit(libc::SIGPIPE), 0);
    assert_ne!(mask(&agent_status, "SigIgn") & bit(libc::SIGHUP), 0);
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    assert_ne!(mask(&agent_status, "SigIgn") & (bit(32) | bit(33)), 0);
    let mut variants = vec![cmd("cat", &["/proc/self/status"])];
    variants.push(tty(cmd("cat", &["/proc/self/status"])));
    if is_root() {
        let mut e = cmd("cat", &["/proc/self/status"]);
        e.user = Some("nobody".into());
        variants.push(e);
    }
    for e in variants {
        let log = a.run(&e);
        assert_eq!(log.code(), Some(0), "{log:?}");
        let status = log.stdout_str();
        for f in ["SigBlk", "SigIgn", "SigCgt"] {
            assert_eq!(
                mask(&status, f),
                0,
                "{f} of a child (tty {}): {status}",
                e.tty
            );
        }
    }
}

/// The test user, created once (idempotent; needs root and useradd): a
/// primary group and two supplementary ones.
const TEST_USER: &str = "agentd-rel-user";

fn test_user() -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let run = |args: &[&str]| {
            let st = std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
            assert!(st.success(), "{args:?}: {st}");
        };
        let exists = |db: &str, name: &str| {
            std::process::Command::new("getent")
                .args([db, name])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        for g in ["agentd-rel-primary", "agentd-rel-a", "agentd-rel-b"] {
            if !exists("group", g) {
                run(&["groupadd", "-f", g]);
            }
        }
        if !exists("passwd", TEST_USER) {
            run(&[
                "useradd",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                "agentd-rel-primary",
                "--groups",
                "agentd-rel-a,agentd-rel-b",
                TEST_USER,
            ]);
        }
    });
    TEST_USER
}

/// (uid, gid, supplementary groups) of `user` read straight from the
/// databases: the primary group plus every group that lists the user.
fn expected_identity(user: &str) -> (u32, u32, Vec<u32>) {
    let (uid, gid) = passwd_entry(user).unwrap_or_else(|| panic!("no {user} in /etc/passwd"));
    (uid, gid, db_groups(user, gid).into_iter().collect())
}

/// What a child's /proc/self/status says: (real, effective, saved, fs)
/// uid and gid, and its groups, sorted.
fn identity_of(status: &str) -> ([u32; 4], [u32; 4], Vec<u32>) {
    let four = |f| {
        let v: Vec<u32> = field_of(status, f)
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        [v[0], v[1], v[2], v[3]]
    };
    let mut groups: Vec<u32> = field_of(status, "Groups")
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    groups.sort_unstable();
    (four("Uid"), four("Gid"), groups)
}

/// `user` drops all four uids and gids to the user's, and the groups to
/// exactly the user's supplementary groups: none of root's is left.
#[test]
fn user_drops_to_uid_gid_and_exactly_its_groups() {
    require_root!();
    let mut a = SyncAgent::start(&[]);
    for user in [test_user(), "nobody"] {
        let (uid, gid, groups) = expected_identity(user);
        for tty_session in [false, true] {
            let mut e = cmd("cat", &["/proc/self/status"]);
            e.user = Some(user.into());
            e.tty = tty_session;
            let log = a.run(&e);
            assert_eq!(log.code(), Some(0), "{log:?}");
            let (uids, gids, got) = identity_of(&log.stdout_str());
            assert_eq!(uids, [uid; 4], "{user}");
            assert_eq!(gids, [gid; 4], "{user}");
            assert_eq!(got, groups, "{user}: groups");
            assert!(!got.contains(&0), "{user}: root's group left over");
        }
    }
    let (_, _, groups) = expected_identity(test_user());
    assert_eq!(
        groups.len(),
        3,
        "the test user has a primary and two other groups"
    );
    // uid:gid with a uid that has a passwd entry gets that entry's groups
    // too; the explicit gid wins as the primary.
    let log = a.run(&{
        let mut e = cmd("cat", &["/proc/self/status"]);
        e.user = Some("65534:65534".into());
        e
    });
    let (uids, gids, got) = identity_of(&log.stdout_str());
    assert_eq!((uids, gids), ([65534; 4], [65534; 4]));
    assert!(!got.contains(&0), "root's group left over: {got:?}");
}

/// A session as an unprivileged user cannot open another session's
/// terminal (the slave of a root tty session, or of another unprivileged
/// one), neither to read nor to write.
#[test]
fn unprivileged_session_cannot_open_another_sessions_pty() {
    require_root!();
    let mut a = SyncAgent::start(&[]);
    let mut owners = vec![(None, tty(cmd("sleep", &["30"])))];
    let mut as_user = tty(cmd("sleep", &["30"]));
    as_user.user = Some("nobody".into());
    owners.push((Some("nobody"), as_user));
    for (owner, e) in owners {
        let id = a.exec(&e);
        let pid = a.wait_started(id);
        fds_after_exec(pid, "sleep");
        let pts = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
        let pts = pts.to_string_lossy().into_owned();
        assert!(pts.starts_with("/dev/pts/"), "{pts}");
        for script in [
            "cat \"$0\" </dev/null",
            "echo intruder > \"$0\"",
            "exec 3<>\"$0\" && echo OPENED",
        ] {
            let mut e = cmd("sh", &["-c", script, &pts]);
            e.user = Some("nobody".into());
            e.stdin = false;
            let log = a.run(&e);
            assert_ne!(
                log.code(),
                Some(0),
                "{script} on {pts} of {owner:?}: {log:?}"
            );
            assert!(!log.stdout_str().contains("OPENED"));
            assert!(
                log.stderr_contains("Permission denied"),
                "{script}: {log:?}"
            );
        }
        a.signal(id, libc::SIGKILL);
        let log = a.wait_done(id);
        assert!(
            log.stdout.is_empty(),
            "the intruder reached the terminal: {log:?}"
        );
    }
}

/// EXEC `no_new_privs: true` sets PR_SET_NO_NEW_PRIVS in the child (and
/// only then), for root and for another user.
#[test]
fn no_new_privs_sets_the_flag() {
    let mut a = SyncAgent::start(&[]);
    let users: &[Option<&str>] = if is_root() {
        &[None, Some("nobody")]
    } else {
        &[None]
    };
    for &user in users {
        for nnp in [false, true] {
            let mut e = cmd("cat", &["/proc/self/status"]);
            e.no_new_privs = nnp;
            e.user = user.map(Into::into);
            let log = a.run(&e);
            assert_eq!(log.code(), Some(0), "{log:?}");
            let status = log.stdout_str();
            let want = if nnp { "1" } else { "0" };
            assert_eq!(
                field_of(&status, "NoNewPrivs"),
                Some(want),
                "{user:?} {nnp}"
            );
        }
    }
}

/// Frames a hostile child prints: an EXITED and a STDOUT for session
/// `victim`, a READY, a SHUTDOWN_DONE, an ERROR, and an oversized header.
fn forged_frames(victim: u32) -> Vec<u8> {
    let mut out = Vec::new();
    Message::Exited(Exited::from_code(0))
        .encode(victim, &mut out)
        .expect("the test's frames fit");
    Message::Stdout(b"FORGED-MARKER for the victim")
        .encode(victim, &mut out)
        .expect("the test's frames fit");
    Message::Ready(agentd::messages::Ready {
        protocol: 1,
        agent: "FORGED-MARKER".into(),
        pid: 1,
        pid1: true,
        max_payload: 1 << 20,
        stdin_window: 1,
        max_sessions: 1,
        uptime_ms: None,
        features: Vec::new(),
        realtime_ns: None,
        restores: None,
        clock_set: None,
        replay_bytes: None,
        cgroups: None,
        mounts: Vec::new(),
    })
    .encode(0, &mut out)
    .expect("the test's frames fit");
    Message::ShutdownDone
        .encode(0, &mut out)
        .expect("the test's frames fit");
    out.extend_from_slice(&agentd::codec::header(Kind::Stdout as u8, victim, 0));
    out.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x30]);
    out
}

/// A child's bytes only ever travel as its own session's STDOUT/STDERR
/// payload: a child printing valid frames (an EXITED and a STDOUT for
/// another live session, READY, SHUTDOWN_DONE, a huge length) on stdout,
/// on stderr and on a terminal makes the agent emit nothing for anyone
/// else; the victim session is untouched and ends normally; the bytes
/// appear in no other place (not in the agent's log on its stderr).
#[test]
fn child_output_cannot_forge_frames_for_other_sessions() {
    let log_path = std::env::temp_dir().join(format!("agentd-security-{}.log", std::process::id()));
    let mut a = SyncAgent::start_with(Opts {
        stderr: Stderr::File(log_path.clone()),
        ..Opts::plain(&["--log-level", "trace"])
    });
    let victim = a.exec(&cmd("cat", &[]));
    a.wait_started(victim);
    let forged = forged_frames(victim);
    let mut big = Vec::new();
    while big.len() < 300 * 1024 {
        big.extend_from_slice(&forged);
    }
    for (what, e, payload) in [
        ("stdout", cmd("cat", &[]), &forged),
        ("stderr", sh("cat >&2"), &forged),
        ("stdout, 300 KiB", cmd("cat", &[]), &big),
    ] {
        let id = a.exec(&e);
        a.write_stdin_all(id, payload);
        a.close_stdin(id);
        let log = a.wait_done(id);
        assert_eq!(log.code(), Some(0), "{what}: {log:?}");
        let got = if what == "stderr" {
            &log.stderr
        } else {
            &log.stdout
        };
        assert!(got == payload, "{what}: the payload changed");
        let v = &a.logs[&victim];
        assert!(
            v.stdout.is_empty() && v.exited.is_none(),
            "{what}: victim {v:?}"
        );
    }
    // On a terminal (output processing may change the bytes, frames for
    // the victim still cannot appear).
    let file = std::env::temp_dir().join(format!("agentd-forged-{}", std::process::id()));
    std::fs::write(&file, &forged).unwrap();
    let log = a.run(&tty(cmd("cat", &[file.to_str().unwrap()])));
    let _ = std::fs::remove_file(&file);
    assert_eq!(log.code(), Some(0), "tty: {log:?}");
    assert!(log.stdout.len() >= forged.len(), "tty: {log:?}");
    let v = &a.logs[&victim];
    assert!(
        v.stdout.is_empty() && v.exited.is_none(),
        "tty: victim {v:?}"
    );
    assert!(!a.shutdown_done);
    assert!(a.conn_errors.is_empty(), "{:?}", a.conn_errors);
    a.stdin(victim, b"real\n");
    a.close_stdin(victim);
    let log = a.wait_done(victim);
    assert_eq!(log.stdout, b"real\n");
    assert_eq!(log.code(), Some(0));
    a.close_write();
    a.read_to_eof(Duration::from_secs(10));
    a.wait_exit(Duration::from_secs(10));
    let agent_log = std::fs::read(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        !agent_log.is_empty(),
        "the trace log is empty: the check means nothing"
    );
    assert!(
        !agent_log.windows(13).any(|w| w == b"FORGED-MARKER"),
        "a child's bytes reached the agent's log"
    );
}

/// An unprivileged session cannot reach the agent's fds (the transport
/// among them) through /proc/AGENT/fd: neither list, read nor write them.
/// (A root session can; isolation from the agent needs `user`.)
#[test]
fn unprivileged_session_cannot_reach_the_agents_fds() {
    require_root!();
    let mut a = SyncAgent::start(&[]);
    let fds: Vec<String> = open_fds(a.host_pid)
        .into_iter()
        .map(|fd| format!("/proc/{}/fd/{fd}", a.host_pid))
        .collect();
    assert!(fds.len() >= 6);
    let script = "ls \"/proc/$AGENT/fd\" && echo LISTED; \
                  for f; do (echo FORGED-MARKER > \"$f\") 2>/dev/null && echo WROTE $f; \
                  (head -c 1 \"$f\" </dev/null >/dev/null) 2>/dev/null && echo READ $f; done; true";
    let mut args = vec!["-c", script, "sh"];
    args.extend(fds.iter().map(String::as_str));
    let mut e = cmd("sh", &args);
    e.env = vec![format!("AGENT={}", a.host_pid)];
    e.user = Some("nobody".into());
    e.stdin = false;
    let log = a.run(&e);
    assert_eq!(log.code(), Some(0), "{log:?}");
    let out = log.stdout_str();
    assert!(
        !out.contains("LISTED") && !out.contains("WROTE") && !out.contains("READ"),
        "{out}"
    );
    assert!(log.stderr_contains("Permission denied"), "{log:?}");
    // The same script as root does reach them (the test can fail).
    let mut e = cmd(
        "sh",
        &["-c", "ls \"/proc/$AGENT/fd\" >/dev/null && echo LISTED"],
    );
    e.env = vec![format!("AGENT={}", a.host_pid)];
    assert_eq!(a.run(&e).stdout_str(), "LISTED\n");
    a.ping(b"alive");
}
