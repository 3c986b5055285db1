//! The contract's guarantees (1 to 7) and the promises of EXEC about the
//! child's process state (session leader, fds, signals). Guarantee 1 is
//! also checked on every frame of every test by the harness's checker;
//! guarantee 5 lives in `flow_control`, guarantee 6 in `errors`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentd::messages::Exec;

use crate::support::agent::*;
use crate::support::checker::*;
use crate::support::host::*;
use crate::support::proc::*;
use crate::support::util::*;
use crate::support::*;

/// Length of `base64` output (76-column lines) for `n` input bytes.
fn base64_len(n: usize) -> usize {
    let chars = n.div_ceil(3) * 4;
    chars + chars.div_ceil(76)
}

both! {
    /// Guarantee 2: everything written before exit arrives before EXITED,
    /// in order, nothing lost or duplicated: 48 sessions, 8 at a time,
    /// each writing up to a few hundred KiB right before it exits.
    fn output_written_before_exit_is_complete(opts: Opts) {
        let dir = TempDir::new("g2");
        let out_data = pseudo_random(300_000, 1);
        let err_data = pseudo_random(100_003, 2);
        let (fo, fe) = (dir.join("out"), dir.join("err"));
        std::fs::write(&fo, &out_data).unwrap();
        std::fs::write(&fe, &err_data).unwrap();
        let seq = seq_output(30_000);
        let mut agent = Agent::start_with(opts);
        let scripts = [
            format!("cat {}; cat {} >&2", fo.display(), fe.display()),
            "seq 1 30000".to_owned(),
            "head -c 100000 /dev/urandom | base64".to_owned(),
            format!("cat {} >&2; exec cat {}", fe.display(), fo.display()),
        ];
        let rounds = 48u32;
        let in_flight = 8u32;
        let mut started: Vec<u32> = Vec::new();
        let mut next = 0u32;
        let mut done = 0u32;
        while done < rounds {
            while next < rounds && started.len() < in_flight as usize {
                let id = 100 + next;
                let mut e = sh(&scripts[(next % 4) as usize]);
                e.stdin = false;
                agent.send_exec(id, &e);
                started.push(id);
                next += 1;
            }
            let id = started.remove(0);
            agent.exec_reply(id).expect("EXEC failed");
            let out = agent.collect(id);
            out.assert_success();
            match (id - 100) % 4 {
                0 | 3 => {
                    assert!(out.stdout == out_data, "round {id}: stdout differs ({} of {} bytes)", out.stdout.len(), out_data.len());
                    assert!(out.stderr == err_data, "round {id}: stderr differs ({} of {} bytes)", out.stderr.len(), err_data.len());
                }
                1 => assert!(out.stdout == seq, "round {id}: seq output differs ({} of {} bytes)", out.stdout.len(), seq.len()),
                _ => {
                    assert_eq!(out.stdout.len(), base64_len(100_000), "round {id}: base64 length");
                    assert!(out.stdout.split(|&b| b == b'\n').all(|l| l.len() <= 76));
                    assert!(out.stderr.is_empty());
                }
            }
            done += 1;
        }
    }

    /// Guarantee 3: a background grandchild that keeps stdout (or stderr)
    /// open does not hold EXITED beyond `linger_ms`.
    fn grandchild_holding_output_does_not_delay_exited(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        for (script, linger) in [
            ("sleep 30 & echo hi", None),
            ("sleep 30 & echo hi", Some(0)),
            ("sleep 30 >/dev/null & echo hi", Some(50)),
            ("sleep 30 2>/dev/null & echo hi", Some(300)),
        ] {
            let id = agent.new_id();
            let mut e = sh(script);
            e.stdin = false;
            if let Some(l) = linger {
                e.linger_ms = l;
            }
            let linger_ms = e.linger_ms;
            agent.exec(id, &e);
            let first = agent.recv_where(|f| f.id == id && (f.kind == STDOUT || f.kind == EXITED), "hi");
            let t0 = Instant::now();
            let mut out = agent.collect(id);
            let elapsed = t0.elapsed();
            if first.kind == STDOUT {
                let mut all = first.payload.clone();
                all.extend_from_slice(&out.stdout);
                out.stdout = all;
            }
            out.assert_success();
            assert_eq!(out.stdout_str(), "hi\n", "{script}");
            // The sh has exited by the time "hi" is out (it is its last
            // command), so EXITED is due linger_ms after that. Allow a
            // loaded machine two seconds of slack; the grandchild holds
            // the pipe for 30 s.
            assert!(
                elapsed < Duration::from_millis(u64::from(linger_ms) + 2000),
                "{script} (linger {linger_ms} ms): EXITED {elapsed:?} after the output"
            );
        }
    }

    /// Guarantee 4: orphans of sessions come back to the agent (as PID 1 or
    /// as a subreaper) and are reaped: no zombies.
    fn orphans_are_reaped(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        // Double fork: the sleeps' parent subshells exit at once.
        let out = agent.sh("for i in 1 2 3 4 5; do (sleep 1 &); done; exit 0");
        out.assert_success();
        let adopted = agent.children();
        assert!(
            !adopted.is_empty(),
            "the orphaned sleeps were not adopted by the agent"
        );
        for p in &adopted {
            assert_eq!(status_field(*p, "PPid"), Some(agent.host_pid.to_string()));
        }
        // A burst of short-lived orphans, and a session that exits while
        // its orphans exit.
        agent.sh("for i in $(seq 1 100); do (true &); done").assert_success();
        agent.sh("(sleep 0.2 &); (sleep 0.2 &) ; exit 0").assert_success();
        agent.wait_no_children(Duration::from_secs(10));
        // The agent still works.
        assert_eq!(agent.sh("echo ok").stdout_str(), "ok\n");
        agent.wait_no_children(Duration::from_secs(5));
    }

    /// Guarantee 7: end of file on the transport kills every session's
    /// process group, reaps them, and the agent exits 0.
    fn eof_on_the_transport_kills_every_session(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        agent.exec(1, &cmd("sleep", &["1000"]));
        agent.exec(2, &sh("sleep 1000 & sleep 1000"));
        let mut tty = cmd("sleep", &["1000"]);
        tty.tty = true;
        agent.exec(3, &tty);
        let mut ignorer = sh("trap '' TERM HUP; sleep 1000");
        ignorer.stdin = false;
        agent.exec(4, &ignorer);
        assert!(
            wait_until(Duration::from_secs(5), || agent.descendants().len() >= 5),
            "sessions did not start: {:?}",
            agent.descendants()
        );
        let procs = agent.descendants();
        agent.close();
        let status = agent.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "agent exit status {status:?}");
        let left: Vec<i32> = procs.iter().copied().filter(|&p| alive(p)).collect();
        assert!(
            wait_until(Duration::from_secs(5), || procs.iter().all(|&p| !alive(p))),
            "session processes survived the agent: {left:?}"
        );
    }

    /// Guarantee 7 when the host goes away in the middle of a frame.
    fn eof_inside_a_frame_still_ends_cleanly(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        agent.exec(1, &cmd("sleep", &["1000"]));
        let procs = agent.descendants();
        let mut half = Vec::new();
        agentd::codec::append_raw(&mut half, STDIN, 1, b"never finished").expect("the test's frames fit");
        half.truncate(12);
        agent.send_raw(&half);
        agent.close();
        let status = agent.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "agent exit status {status:?}");
        assert!(wait_until(Duration::from_secs(5), || procs.iter().all(|&p| !alive(p))));
    }

    /// SHUTDOWN: SIGTERM, `grace_ms`, SIGKILL for what is left, EXITED
    /// for each session, then SHUTDOWN_DONE, and exit status 0.
    fn shutdown_kills_a_child_that_ignores_sigterm(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let mut stubborn = sh("trap '' TERM; sleep 100");
        stubborn.stdin = false;
        agent.exec(1, &stubborn);
        agent.exec(2, &cmd("sleep", &["100"]));
        // Let the trap be set before the SIGTERM comes.
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        agent.send_shutdown(300);
        let polite = agent.collect(2);
        let t_polite = t0.elapsed();
        assert_eq!(polite.exit, ExitInfo::signal(15), "{:?}", polite.exited_map);
        let stubborn = agent.collect(1);
        let t_stubborn = t0.elapsed();
        assert_eq!(stubborn.exit, ExitInfo::signal(9), "{:?}", stubborn.exited_map);
        assert!(
            t_stubborn >= Duration::from_millis(290),
            "SIGKILL came {t_stubborn:?} after SHUTDOWN, before the 300 ms grace"
        );
        assert!(t_stubborn < Duration::from_secs(3), "SIGKILL only after {t_stubborn:?}");
        assert!(t_polite <= t_stubborn);
        let done = agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
        assert_eq!(done.id, 0);
        assert!(done.payload.is_empty());
        let status = agent.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "agent exit status {status:?}");
        // Nothing after SHUTDOWN_DONE (the checker would have failed on it).
        agent.drain_into_stash(Duration::from_millis(100));
        assert!(agent.at_eof());
    }

    /// EXEC: nothing of the agent's own fds (transport, other sessions) is
    /// open in a child beyond its stdin, stdout and stderr.
    fn child_has_only_fds_0_1_2(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        // Other sessions hold pipes and a terminal while the checks run.
        agent.exec(1, &cmd("sleep", &["100"]));
        let mut t = cmd("sleep", &["100"]);
        t.tty = true;
        agent.exec(2, &t);
        let out = agent.sh("ls /proc/$$/fd");
        out.assert_success();
        assert_eq!(out.stdout_str(), "0\n1\n2\n", "pipe session fds");
        let id = agent.new_id();
        agent.exec(id, &sh("ls /proc/$$/fd"));
        let out = agent.collect(id);
        assert_eq!(out.stdout_str(), "0\n1\n2\n", "pipe session with stdin");
        let id = agent.new_id();
        let mut e = sh("ls -1 /proc/$$/fd");
        e.tty = true;
        agent.exec(id, &e);
        let out = agent.collect(id);
        assert_eq!(out.stdout_str(), "0\r\n1\r\n2\r\n", "tty session fds");
        agent.send_signal(1, 9, true);
        agent.send_signal(2, 9, true);
        agent.collect(1);
        agent.collect(2);
    }

    /// The child starts with an empty signal mask and default dispositions
    /// (the agent blocks SIGCHLD and others, and ignores SIGPIPE). Signals
    /// 32 and 33 are left to [`signals_glibc_reserves_are_reset_too`].
    fn child_signal_mask_is_empty_and_dispositions_default(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        for tty in [false, true] {
            let st = child_signal_state(&mut agent, tty);
            assert_eq!(st.blocked, 0, "tty {tty}: blocked signals {:#018x}", st.blocked);
            assert_eq!(st.pending, 0, "tty {tty}: pending signals {:#018x}", st.pending);
            assert_eq!(
                st.ignored & !GLIBC_RESERVED,
                0,
                "tty {tty}: ignored signals {:#018x}",
                st.ignored
            );
        }
    }

    /// Signals 32 and 33, which glibc reserves and its `sigaction` refuses
    /// to touch, are at their default in the child too, when the agent was
    /// started with them ignored. That is what happens whenever its parent
    /// uses glibc's `posix_spawn` (Rust's `Command` does): it leaves exactly
    /// these two ignored in the new process, and SIG_IGN survives execve,
    /// so the agent must reset them with the raw system call.
    fn signals_glibc_reserves_are_reset_too(opts: Opts) {
        // Ignored explicitly, whatever the harness's spawn does.
        let opts = Opts {
            ignore_signals: vec![32, 33],
            ..opts
        };
        let mut agent = Agent::start_with(opts);
        let agent_ign = status_field(agent.host_pid, "SigIgn").unwrap();
        for tty in [false, true] {
            let st = child_signal_state(&mut agent, tty);
            assert_eq!(
                st.ignored, 0,
                "tty {tty}: ignored signals in the child {:#018x} (the agent's: {agent_ign})",
                st.ignored
            );
        }
    }

    /// 200 sessions alive at once, each with its own input and output.
    fn two_hundred_concurrent_sessions(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let n = 200u32;
        for id in 1..=n {
            agent.send_exec(id, &cmd("cat", &[]));
        }
        for id in 1..=n {
            agent.exec_reply(id).unwrap_or_else(|e| panic!("session {id}: {e:?}"));
        }
        assert!(agent.children().len() >= n as usize, "not all 200 running at once");
        for id in 1..=n {
            let line = format!("session {id} {}\n", "x".repeat(id as usize));
            agent.send_stdin(id, line.as_bytes());
            agent.send_stdin_close(id);
        }
        let mut outs = HashMap::new();
        for id in (1..=n).rev() {
            outs.insert(id, agent.collect(id));
        }
        for id in 1..=n {
            let out = &outs[&id];
            out.assert_success();
            assert_eq!(out.stdout_str(), format!("session {id} {}\n", "x".repeat(id as usize)));
        }
        agent.wait_no_children(Duration::from_secs(10));
    }
}

/// Bit of signal `n` in /proc/<pid>/status masks.
const fn sig_bit(n: u32) -> u64 {
    1 << (n - 1)
}

/// Signals 32 and 33 (glibc's SIGCANCEL and SIGSETXID).
const GLIBC_RESERVED: u64 = sig_bit(32) | sig_bit(33);

/// A child's signal masks, as /proc/self/status shows them.
struct SignalState {
    blocked: u64,
    ignored: u64,
    pending: u64,
}

/// Runs `cat /proc/self/status` as a session and reads its masks.
fn child_signal_state(agent: &mut Agent, tty: bool) -> SignalState {
    let mut e = cmd("cat", &["/proc/self/status"]);
    e.tty = tty;
    e.stdin = false;
    let id = agent.new_id();
    agent.exec(id, &e);
    let out = agent.collect(id);
    out.assert_success();
    let text = out.stdout_str();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    SignalState {
        blocked: field("SigBlk"),
        ignored: field("SigIgn"),
        pending: field("SigPnd"),
    }
}

/// Dispositions are reset even for signals the agent itself was started
/// with ignored (SIG_IGN survives execve): a parent may leave any of them
/// ignored.
#[test]
fn child_dispositions_default_even_when_the_agent_inherited_ignored_signals() {
    let opts = Opts {
        ignore_signals: vec![1, 10, 15, 28, 34, 50, 64],
        ..Opts::default()
    };
    let mut agent = Agent::start_with(opts);
    let agent_ign = status_field(agent.host_pid, "SigIgn").unwrap();
    for tty in [false, true] {
        let st = child_signal_state(&mut agent, tty);
        assert_eq!(
            st.ignored & !GLIBC_RESERVED,
            0,
            "tty {tty}: ignored signals in the child {:#018x} (the agent's: {agent_ign})",
            st.ignored
        );
    }
}

/// Guarantee 1 under a mixed load: EXECs that start and EXECs that fail,
/// sent back to back; every id gets exactly one reply, sessions' frames
/// come between STARTED and EXITED (the checker), and nothing follows
/// EXITED.
#[test]
fn every_exec_gets_exactly_one_reply() {
    let mut agent = Agent::start();
    let n = 60u32;
    for id in 1..=n {
        let e = match id % 3 {
            0 => Exec::new("agentd-no-such-program"),
            1 => {
                let mut e = sh(&format!("echo {id}; echo {id} >&2"));
                e.stdin = false;
                e
            }
            _ => {
                let mut e = Exec::new("true");
                e.cwd = Some("/nonexistent".into());
                e
            }
        };
        agent.send_exec(id, &e);
    }
    for id in 1..=n {
        match agent.exec_reply(id) {
            Ok(_) => assert_eq!(id % 3, 1, "id {id} should have failed"),
            Err(f) => {
                assert_ne!(id % 3, 1, "id {id}: {f:?}");
                let want = if id % 3 == 0 { "not_found" } else { "bad_cwd" };
                assert_eq!(f.kind, want);
            }
        }
    }
    for id in (1..=n).filter(|i| i % 3 == 1) {
        let out = agent.collect(id);
        assert_eq!(out.stdout_str(), format!("{id}\n"));
        assert_eq!(out.stderr_str(), format!("{id}\n"));
    }
    // Nothing more for any id: no second reply, nothing after EXITED.
    agent.ping();
    std::thread::sleep(Duration::from_millis(200));
    agent.drain_into_stash(Duration::from_millis(50));
    let stray = agent.take_stashed(|f| f.id != 0);
    assert!(
        stray.is_empty(),
        "frames after the sessions ended: {}",
        stray.len()
    );
    agent.assert_no_errors();
}

/// Guarantee 3's other side: output a descendant writes while the agent
/// lingers is still drained, and the grandchild's end of file ends the
/// session early.
#[test]
fn output_written_during_linger_is_drained() {
    let mut agent = Agent::start();
    let mut e = sh("(sleep 0.2; echo late) & echo early");
    e.linger_ms = 5000;
    e.stdin = false;
    let id = agent.new_id();
    agent.exec(id, &e);
    let t0 = Instant::now();
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout_str(), "early\nlate\n");
    assert!(
        t0.elapsed() < Duration::from_millis(4000),
        "EXITED waited for the whole linger although the pipe closed"
    );
}

/// Every process is started as the leader of a new session and process
/// group; a tty session's terminal is its controlling terminal.
#[test]
fn child_is_a_session_and_group_leader() {
    let mut agent = Agent::start();
    for tty in [false, true] {
        let mut e = cmd("cat", &["/proc/self/stat"]);
        e.tty = tty;
        e.stdin = false;
        let id = agent.new_id();
        let pid = agent.exec(id, &e);
        let out = agent.collect(id);
        out.assert_success();
        let text = out.stdout_str();
        // pid (comm) state ppid pgrp session tty_nr tpgid ...
        let after = &text[text.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        let head: Vec<&str> = text.split_whitespace().take(1).collect();
        assert_eq!(head[0], pid.to_string(), "STARTED pid is the process");
        let (ppid, pgrp, session, tty_nr, tpgid) = (f[1], f[2], f[3], f[4], f[5]);
        assert_eq!(pgrp, pid.to_string(), "tty {tty}: process group leader");
        assert_eq!(session, pid.to_string(), "tty {tty}: session leader");
        // The agent's pid as the child sees it: 1 in its own namespace.
        let agent_pid = if agent.pidns { 1 } else { agent.host_pid };
        assert_eq!(
            ppid,
            agent_pid.to_string(),
            "tty {tty}: parent is the agent"
        );
        if tty {
            assert_ne!(tty_nr, "0", "tty session without a controlling terminal");
            assert_eq!(tpgid, pid.to_string(), "tty session not in the foreground");
        } else {
            assert_eq!(tty_nr, "0", "pipe session has a controlling terminal");
        }
    }
}

/// SHUTDOWN without sessions and with an empty payload (grace_ms defaults
/// to 1000): SHUTDOWN_DONE at once, then exit 0.
#[test]
fn shutdown_with_no_sessions() {
    let mut agent = Agent::start();
    let t0 = Instant::now();
    agent.send_shutdown_empty();
    let done = agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    assert!(done.payload.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(2));
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

/// SHUTDOWN's default grace is 1000 ms: a child ignoring SIGTERM is killed
/// after about a second, not at once.
#[test]
fn shutdown_default_grace() {
    let mut agent = Agent::start();
    let mut stubborn = sh("trap '' TERM; sleep 100");
    stubborn.stdin = false;
    agent.exec(1, &stubborn);
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    agent.send_shutdown_empty();
    let out = agent.collect(1);
    let t = t0.elapsed();
    assert_eq!(out.exit, ExitInfo::signal(9));
    assert!(t >= Duration::from_millis(990), "killed after {t:?}");
    assert!(t < Duration::from_secs(4), "killed after {t:?}");
    agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// EXITED follows the process, not its output: a child that closes
/// stdout and stderr early is reported when it exits.
#[test]
fn exited_waits_for_the_process_not_for_its_output() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = sh("echo bye; exec >&- 2>&-; sleep 1; exit 3");
    e.stdin = false;
    agent.exec(id, &e);
    let t0 = Instant::now();
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::code(3));
    assert_eq!(out.stdout_str(), "bye\n");
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "EXITED {:?} after STARTED, before the process exited",
        t0.elapsed()
    );
}

/// The id stays taken until EXITED, also while the agent lingers after
/// reaping: an EXEC with it is duplicate_id, and the lingering session
/// still ends normally.
#[test]
fn the_id_is_live_until_exited() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    let mut e = sh("sleep 30 & echo reaped-soon");
    e.stdin = false;
    e.linger_ms = 3000;
    agent.exec(id, &e);
    agent.recv_where(|f| f.id == id && f.kind == STDOUT, "output");
    std::thread::sleep(Duration::from_millis(200));
    agent.exec_fail(id, &cmd("true", &[]), "duplicate_id");
    let out = agent.collect(id);
    out.assert_success();
    agent.exec(id, &cmd("true", &[]));
    agent.collect(id).assert_success();
}

/// Guarantee 2 with a host that reads late: 16 sessions print 1 MiB each
/// while the host does not read (the agent stalls them at its
/// high-water mark); when the host reads again, every byte arrives.
#[test]
fn output_is_complete_when_the_host_reads_late() {
    let dir = TempDir::new("late");
    let data = pseudo_random(1 << 20, 21);
    let file = dir.join("data");
    std::fs::write(&file, &data).unwrap();
    let mut agent = Agent::start();
    let n = 16u32;
    agent.pause_reading();
    for id in 1..=n {
        let mut e = cmd("cat", &[file.to_str().unwrap()]);
        e.stdin = false;
        agent.send_exec(id, &e);
    }
    std::thread::sleep(Duration::from_millis(700));
    agent.resume_reading();
    for id in 1..=n {
        agent.exec_reply(id).unwrap();
    }
    for id in 1..=n {
        let out = agent.collect(id);
        out.assert_success();
        assert_eq!(out.stdout.len(), data.len(), "session {id}");
        assert!(out.stdout == data, "session {id}: output differs");
    }
}

both! {
    /// docs/DESIGN.md: SIGTERM to the agent shuts down like SHUTDOWN with
    /// a 1 s grace (also as PID 1 of a namespace, where the kernel drops
    /// signals PID 1 does not handle unless they are blocked).
    fn sigterm_to_the_agent_shuts_down(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        agent.exec(1, &cmd("sleep", &["100"]));
        agent.note_shutdown();
        // SAFETY: kill with a pid and a signal number.
        unsafe { libc::kill(agent.host_pid, libc::SIGTERM) };
        let out = agent.collect(1);
        assert_eq!(out.exit, ExitInfo::signal(15));
        agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
        assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
    }
}

/// An fd the agent inherited without close-on-exec does not reach
/// children either.
#[test]
fn an_fd_the_agent_inherited_does_not_reach_children() {
    let opts = Opts {
        leak_fd: true,
        ..Opts::default()
    };
    let agent = Agent::start_with(opts);
    assert!(
        std::fs::read_link(format!("/proc/{}/fd/9", agent.host_pid)).is_ok(),
        "the harness did not leave fd 9 open in the agent"
    );
    let mut agent = agent;
    let out = agent.sh("ls /proc/$$/fd");
    assert_eq!(out.stdout_str(), "0\n1\n2\n");
}

/// Out of descriptors: EXEC_FAILED `resource`, not a crash; the agent
/// recovers when sessions end (guarantee 6 for what children and limits
/// do).
#[test]
fn out_of_descriptors_is_exec_failed_resource() {
    let opts = Opts {
        nofile: Some(48),
        ..Opts::default()
    };
    let mut agent = Agent::start_with(opts);
    let mut started = Vec::new();
    let mut failure = None;
    for id in 1..=40u32 {
        match agent.exec_result(id, &cmd("sleep", &["100"])) {
            Ok(_) => started.push(id),
            Err(f) => {
                failure = Some(f);
                break;
            }
        }
    }
    let f = failure.expect("48 descriptors were enough for 40 sessions?");
    assert_eq!(f.kind, "resource", "{f:?}");
    assert!(
        started.len() >= 3,
        "only {} sessions started",
        started.len()
    );
    agent.ping();
    // Free two sessions; an EXEC works again.
    for id in started.drain(..2) {
        agent.send_signal(id, 9, true);
        assert_eq!(agent.collect(id).exit, ExitInfo::signal(9));
    }
    assert_eq!(agent.sh("echo again").stdout_str(), "again\n");
    for id in started {
        agent.send_signal(id, 9, true);
        agent.collect(id);
    }
}

/// The agent cannot watch a new session's fds (epoll_ctl fails: here a
/// seccomp filter, in life a full `fs.epoll.max_user_watches`): EXEC_FAILED
/// `resource` at stage `register` with the errno; the child, already
/// running, is killed and then reaped by the loop (no zombie left, and no
/// blocking wait: the agent answers throughout), its fds closed.
#[test]
#[cfg(target_arch = "x86_64")]
fn unwatchable_session_is_exec_failed_resource_and_reaped() {
    // The fds an idle agent holds: the only ones it may watch.
    let idle = {
        let mut agent = Agent::start();
        agent.ping();
        open_fds(agent.host_pid)
    };
    let opts = Opts {
        epoll_add_only: Some(idle.iter().map(|&fd| fd as u32).collect()),
        ..Opts::default()
    };
    let mut agent = Agent::start_with(opts);
    agent.ping();
    assert_eq!(
        open_fds(agent.host_pid),
        idle,
        "the filtered agent's fds differ"
    );
    for id in 1..=20u32 {
        let f = agent.exec_fail(id, &cmd("sleep", &["1000"]), "resource");
        assert_eq!(f.stage.as_deref(), Some("register"), "{f:?}");
        assert_eq!(f.errno, Some(libc::ENOSPC), "{f:?}");
        agent.ping();
    }
    agent.wait_no_children(timeout());
    // The agent frees a child's status pipe just after reaping it: once
    // it has answered a PING sent now, it has done both.
    agent.ping();
    assert_eq!(
        open_fds(agent.host_pid),
        idle,
        "a failed session's fds stay open"
    );
    agent.ping();
}

/// epoll_wait failing with something other than EINTR, for good (here a
/// seccomp filter): the agent logs it and backs off instead of spinning,
/// and neither exits nor panics (as PID 1 that would panic the kernel).
/// READY still goes out: it is flushed before the first poll.
#[test]
#[cfg(target_arch = "x86_64")]
fn failing_epoll_wait_is_logged_and_backed_off() {
    let opts = Opts {
        epoll_wait_fails: true,
        ..Opts::default()
    };
    let agent = Agent::start_with(opts);
    std::thread::sleep(Duration::from_millis(200));
    let switches = |pid| {
        status_field(pid, "voluntary_ctxt_switches")
            .and_then(|v| v.parse::<u64>().ok())
            .expect("voluntary_ctxt_switches")
    };
    let (ticks0, sleeps0) = (cpu_ticks(agent.host_pid), switches(agent.host_pid));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu_ticks(agent.host_pid) - ticks0;
    let sleeps = switches(agent.host_pid) - sleeps0;
    let secs = t0.elapsed().as_secs_f64();
    // Backing off 10 ms per failure, the agent sleeps (a voluntary context
    // switch) up to 100 times a second and uses a few ticks of CPU. A
    // spinning loop never sleeps, and burns up to 100 ticks a second (as
    // many as a loaded machine gives it).
    assert!(
        sleeps >= 20,
        "the agent slept {sleeps} times in {secs:.2} s with epoll_wait failing: it spins"
    );
    assert!(
        ticks <= 25,
        "the agent used {ticks} clock ticks of CPU in {secs:.2} s with epoll_wait failing"
    );
    assert!(alive(agent.host_pid), "the agent exited");
    let log = agent.log();
    assert!(log.contains("poll failed"), "no log of the failure: {log}");
}

/// During a shutdown's grace: PING is answered, a new EXEC fails
/// (docs/DESIGN.md: `other`), a second SHUTDOWN adds no second
/// SHUTDOWN_DONE.
#[test]
fn during_shutdown() {
    let mut agent = Agent::start();
    let mut stubborn = sh("trap '' TERM; sleep 100");
    stubborn.stdin = false;
    agent.exec(1, &stubborn);
    std::thread::sleep(Duration::from_millis(200));
    agent.send_shutdown(700);
    agent.ping();
    agent.exec_fail(2, &cmd("true", &[]), "other");
    agent.send_shutdown(700);
    assert_eq!(agent.collect(1).exit, ExitInfo::signal(9));
    agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
    // The checker fails on any frame after SHUTDOWN_DONE.
    agent.drain_into_stash(Duration::from_millis(200));
    assert!(agent.at_eof());
}

/// Guarantee 3 with a descendant that writes without pause: it cannot
/// hold EXITED either.
#[test]
fn a_descendant_writing_forever_does_not_hold_exited() {
    let mut agent = Agent::start();
    for tty in [false, true] {
        let id = agent.new_id();
        let mut e = sh("yes & echo started");
        e.tty = tty;
        e.linger_ms = 200;
        agent.exec(id, &e);
        let t0 = Instant::now();
        let out = agent
            .collect_within(id, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("tty {tty}: no EXITED while a descendant writes"));
        out.assert_success();
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "tty {tty}: EXITED after {:?}",
            t0.elapsed()
        );
        assert!(out.stdout_str().contains("started"));
    }
    // The writers lost their reader and die of SIGPIPE (pipe) or their
    // terminal (tty); nothing is left.
    agent.ping();
    agent.wait_no_children(Duration::from_secs(10));
}
