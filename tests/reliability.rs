//! Fault and load tests of `agentd --stdio` (issue 7): a host that stops
//! reading or goes away, children that misbehave, fork bombs, long runs of
//! sessions, many sessions at once, EPIPE/EAGAIN/EINTR. Each test states
//! the property it checks; docs/RELIABILITY.md lists them all.
//!
//! Run with `cargo test --profile ci --test reliability`. Timings and
//! measurements are printed (`-- --nocapture`).

mod support;

use std::time::{Duration, Instant};

use agentd::messages::{ExecFailedKind, Message, Shutdown};
use support::host::{cmd, sh, Opts};
use support::proc::*;
use support::sync_agent::*;
use support::util::seq_output;
use support::wait_until;

// ---------------------------------------------------------------------------
// The host stops reading; the host goes away.

/// The host stops reading for STALL while five sessions flood output:
/// the agent's RSS stays within idle + 2 MiB, nothing is lost or
/// duplicated once the host reads again, and a PING sent during the stall
/// is answered as soon as the host reads (behind at most the output the
/// agent had queued). The issue asks for 10 s; 3 s shows the same thing
/// (the agent reaches its high-water mark within milliseconds and then
/// only waits), and `STALL_SECS=10` runs the full length.
#[test]
fn host_stops_reading_while_five_sessions_flood() {
    let stall = Duration::from_secs(
        std::env::var("STALL_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    const N: u32 = 600_000; // 4.1 MB of `seq` output per session
    let expected = seq_output(N);
    let mut a = SyncAgent::start(&[]);
    // Warm up: one session of each shape, so "idle" is an agent that has
    // served before, not one that never allocated a session.
    let log = a.run(&cmd("seq", &["1", "1000"]));
    assert_eq!(log.stdout, seq_output(1000));
    a.ping(b"warm");
    std::thread::sleep(Duration::from_millis(100));
    let idle = a.rss_kib();

    let mut flood = cmd("seq", &["1", &N.to_string()]);
    flood.stdin = false;
    let ids: Vec<u32> = (0..5).map(|_| a.exec(&flood)).collect();
    // From here on the host does not read: a send that would block fails
    // the test instead of reading.
    a.read_while_sending = false;
    let bytes_before = a.bytes_in;
    let pongs = a.pongs.len();
    let t0 = Instant::now();
    let mut max_rss = idle;
    let mut pinged = false;
    while t0.elapsed() < stall {
        std::thread::sleep(Duration::from_millis(20));
        max_rss = max_rss.max(a.rss_kib());
        if !pinged && t0.elapsed() >= stall / 2 {
            a.send(&Message::Ping(b"sent during the stall"), 0);
            pinged = true;
        }
    }
    assert_eq!(a.bytes_in, bytes_before, "the host read during the stall");
    println!(
        "stall {stall:?}: idle RSS {idle} KiB, max RSS during the stall {max_rss} KiB (+{} KiB)",
        max_rss - idle
    );

    // Resume: the PONG comes behind what was queued, not behind the flood.
    // What the pipe to the host holds (the agent may have enlarged it).
    let mut in_pipe: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    unsafe { libc::ioctl(a.stdout_raw_fd(), libc::FIONREAD, &mut in_pipe) };
    a.read_while_sending = true;
    let resumed = Instant::now();
    a.wait_for("the PONG of the stall", Duration::from_secs(10), |a| {
        a.pongs.len() == pongs + 1
    });
    let pong_time = resumed.elapsed();
    let pong_bytes = a.bytes_in - bytes_before;
    assert_eq!(a.pongs[pongs].1, b"sent during the stall");
    println!(
        "PONG {pong_time:?} and {pong_bytes} bytes after reading resumed ({in_pipe} of them in the pipe)"
    );
    assert!(
        pong_time < Duration::from_secs(2),
        "PONG took {pong_time:?}"
    );
    // Ahead of the PONG: the pipe, and what the agent had queued, which is
    // at most its high-water mark plus one 64 KiB read per session.
    let queued = pong_bytes.saturating_sub(in_pipe as u64);
    assert!(
        queued <= (1 << 20) + 6 * (64 << 10),
        "{queued} bytes beyond the pipe came before the PONG"
    );
    // A PING while the flood drains is answered promptly too.
    let rtt = a.ping(b"during the flood");
    println!("PING during the flood: {rtt:?}");
    assert!(rtt < Duration::from_secs(2));

    let mut sampled = 0;
    for &id in &ids {
        a.wait_for("the flood to end", Duration::from_secs(60), |a| {
            a.logs[&id].done()
        });
        sampled = sampled.max(a.rss_kib());
    }
    max_rss = max_rss.max(sampled);
    for id in ids {
        let log = a.take_log(id);
        assert_eq!(log.code(), Some(0), "{:?}", log.exited);
        assert_eq!(
            log.stdout.len(),
            expected.len(),
            "session {id}: bytes lost or duplicated"
        );
        assert!(log.stdout == expected, "session {id}: output differs");
        assert!(log.stderr.is_empty());
    }
    let hwm = status_number(a.host_pid, "VmHWM").unwrap();
    println!("max RSS {max_rss} KiB, VmHWM {hwm} KiB, idle {idle} KiB");
    assert!(
        max_rss <= idle + 2048,
        "RSS grew from {idle} to {max_rss} KiB"
    );
    // The peak over the whole test, drain included, is higher: while the
    // host reads, the output queue's buffer may reach about twice the
    // high-water mark before its written part is compacted away. Still
    // bounded.
    assert!(hwm <= idle + 3072, "VmHWM {hwm} KiB, idle {idle} KiB");
}

/// Starts the sessions of the disconnect tests: floods on pipes and on a
/// terminal, and a session whose group holds background children.
fn start_floods(a: &mut SyncAgent) -> Vec<i32> {
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(a.exec(&cmd("yes", &["flood"])));
    }
    let mut tty = cmd("yes", &["tty flood"]);
    tty.tty = true;
    ids.push(a.exec(&tty));
    ids.push(a.exec(&sh("sleep 60 & sleep 60 & exec yes group")));
    let pids: Vec<i32> = ids.iter().map(|&id| a.wait_started(id)).collect();
    // Some output has flowed, so the agent is busy writing.
    let start = a.bytes_in;
    a.wait_for("1 MiB of flood", SYNC_TIMEOUT, |a| {
        a.bytes_in - start > 1 << 20
    });
    pids
}

fn assert_sessions_gone(pids: &[i32]) {
    let gone = wait_until(Duration::from_secs(5), || {
        procs_in_sessions(pids).is_empty()
    });
    let left = procs_in_sessions(pids);
    if !gone {
        kill_sessions(pids);
    }
    assert!(gone, "processes of the sessions remain: {left:?}");
}

/// The host closes both ends in the middle of a flood (stdio mode): every
/// session is killed, the agent exits 0 within a few seconds, and no
/// process of any session is left (not even a zombie).
#[test]
fn host_disconnects_mid_flood() {
    let mut a = SyncAgent::start(&[]);
    let pids = start_floods(&mut a);
    a.close_read();
    a.close_write();
    let status = a.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_sessions_gone(&pids);
}

/// The host stops reading for good and closes only its read side: the
/// agent's next write fails with EPIPE, which ends it like end of file.
#[test]
fn host_closes_read_side_mid_flood_epipe() {
    let mut a = SyncAgent::start(&[]);
    let pids = start_floods(&mut a);
    a.close_read();
    let status = a.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_sessions_gone(&pids);
}

/// The host closes only its write side and keeps reading: the agent sees
/// end of file, kills every session, writes what it had queued and closes
/// the stream at a frame boundary.
#[test]
fn host_closes_write_side_mid_flood_eof() {
    let mut a = SyncAgent::start(&[]);
    let pids = start_floods(&mut a);
    a.close_write();
    a.read_to_eof(Duration::from_secs(10));
    let status = a.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_sessions_gone(&pids);
}

// ---------------------------------------------------------------------------
// Children that misbehave.

/// A child closes its stdout first thing and keeps running: the session
/// goes on (stderr flows, PING is answered), the agent does not spin on
/// the closed pipe, and EXITED comes when the process exits, with its code.
/// A child that writes as fast as it can (`cat /dev/zero`) does not hold
/// the loop: while it floods, PINGs are answered, another session runs,
/// and the flood itself goes on. The round trips and rates are printed.
/// (This host is slower than the agent, so backpressure makes the flood
/// yield here; with a host as fast as the agent, output spliced straight
/// into the transport leaves nothing queued, and it is the per-turn limit
/// of `Session::read_output` that makes it yield.)
#[test]
fn a_flood_does_not_hold_the_loop() {
    let mut a = SyncAgent::start(&[]);
    let mut flood = cmd("cat", &["/dev/zero"]);
    flood.stdin = false;
    let id = a.exec(&flood);
    a.count_only.insert(id);
    a.wait_started(id);
    let t_start = Instant::now();
    a.wait_for("256 MiB of the flood", SYNC_TIMEOUT, |a| {
        a.logs.get(&id).is_some_and(|l| l.output_bytes >= 256 << 20)
    });
    let t_first = t_start.elapsed();
    let before = a.logs[&id].output_bytes;
    let t0 = Instant::now();
    let rtts: Vec<Duration> = (0..10u8).map(|i| a.ping(&[i])).collect();
    let log = a.run(&cmd("echo", &["served"]));
    assert_eq!(log.stdout, b"served\n");
    let during = a.logs[&id].output_bytes;
    let t_pings = t0.elapsed();
    // And the flood itself goes on.
    a.wait_for("256 MiB more of the flood", SYNC_TIMEOUT, |a| {
        a.logs[&id].output_bytes >= during + (256 << 20)
    });
    eprintln!(
        "PING round trips during the flood: {rtts:?}; the flood's first 256 MiB took {t_first:?}, \
         {} KiB came in the {t_pings:?} of pings and `echo`, 256 MiB more in {:?}",
        (during - before) >> 10,
        t0.elapsed() - t_pings
    );
    a.signal(id, libc::SIGKILL);
    let log = a.wait_done(id);
    assert_eq!(log.signal(), Some(libc::SIGKILL));
}

#[test]
fn child_closes_stdout_early_and_keeps_running() {
    let mut a = SyncAgent::start(&[]);
    let t = Instant::now();
    let id = a.exec(&sh(
        "exec >&-; echo closed >&2; sleep 1; echo still running >&2; exit 7",
    ));
    a.close_stdin(id);
    a.wait_for("stderr", SYNC_TIMEOUT, |a| {
        a.logs[&id].stderr == b"closed\n"
    });
    let ticks = cpu_ticks(a.host_pid);
    a.ping(b"alive");
    let log = a.wait_done(id);
    let elapsed = t.elapsed();
    let spent = cpu_ticks(a.host_pid) - ticks;
    assert_eq!(log.code(), Some(7));
    assert!(log.stdout.is_empty());
    assert_eq!(log.stderr, b"closed\nstill running\n");
    assert!(
        elapsed >= Duration::from_millis(900),
        "EXITED after {elapsed:?}"
    );
    // 100 ticks per second: the agent slept through the second.
    assert!(
        spent <= 10,
        "the agent used {spent} ticks while the child slept"
    );
}

/// SHUTDOWN with a child that ignores SIGTERM: the well-behaved session
/// ends by SIGTERM at once, the ignoring one by SIGKILL when the grace
/// ends (not before, and not much after), then SHUTDOWN_DONE, exit 0.
#[test]
fn shutdown_kills_a_child_that_ignores_sigterm() {
    let mut a = SyncAgent::start(&[]);
    let stubborn = a.exec(&sh("trap '' TERM; echo ready; exec sleep 60"));
    let polite = a.exec(&cmd("sleep", &["60"]));
    let pids = vec![a.wait_started(stubborn), a.wait_started(polite)];
    a.wait_for("the trap", SYNC_TIMEOUT, |a| {
        a.logs[&stubborn].stdout == b"ready\n"
    });
    let grace = Duration::from_millis(600);
    let t = Instant::now();
    a.send(&Message::Shutdown(Shutdown { grace_ms: 600 }), 0);
    a.wait_for("EXITED of the polite session", SYNC_TIMEOUT, |a| {
        a.logs[&polite].done()
    });
    let polite_time = t.elapsed();
    a.wait_for("EXITED of the stubborn session", SYNC_TIMEOUT, |a| {
        a.logs[&stubborn].done()
    });
    let stubborn_time = t.elapsed();
    a.wait_for("SHUTDOWN_DONE", SYNC_TIMEOUT, |a| a.shutdown_done);
    println!("SIGTERM'd after {polite_time:?}, SIGKILL'd after {stubborn_time:?}");
    assert_eq!(a.logs[&polite].signal(), Some(libc::SIGTERM));
    assert_eq!(a.logs[&stubborn].signal(), Some(libc::SIGKILL));
    assert!(polite_time < grace, "SIGTERM took {polite_time:?}");
    assert!(stubborn_time >= grace, "killed before the grace ended");
    assert!(
        stubborn_time < grace + Duration::from_millis(1500),
        "SIGKILL came {stubborn_time:?} after SHUTDOWN"
    );
    a.read_to_eof(Duration::from_secs(10));
    assert_eq!(a.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_sessions_gone(&pids);
}

/// A child `setsid`s away from its session's group. Documented behaviour:
/// it is no longer part of the session (EXITED does not wait for it once
/// it holds none of the session's pipes, group SIGNALs and SHUTDOWN's
/// SIGTERM miss it), but it is the agent's (the agent is a subreaper):
/// when it exits the agent reaps it, so it never lingers as a zombie; and
/// end of file on the transport kills it with everything else.
#[test]
fn child_that_setsids_away_is_reaped() {
    let mut a = SyncAgent::start(&[]);
    // util-linux setsid calls setsid(2) itself when it is not a group
    // leader (a background job of a shell without job control is not), so
    // $! is the escapee's pid.
    let log = a.run(&sh("setsid sleep 1 </dev/null >/dev/null 2>&1 & echo $!"));
    assert_eq!(log.code(), Some(0));
    let session = log.pid.unwrap();
    let escapee: i32 = log.stdout_str().trim().parse().expect("pid");
    // The shell printed $! right after fork: give the child time to reach
    // setsid(2).
    let escaped = wait_until(Duration::from_secs(5), || {
        proc_stat(escapee).is_some_and(|p| p.sid == escapee)
    });
    let p = proc_stat(escapee).expect("the escapee runs after EXITED");
    assert!(escaped, "it has no session of its own: {p:?}");
    assert_ne!(p.pgrp, session);
    assert_eq!(p.ppid, a.host_pid, "the agent adopted it");
    // It exits after a second; the agent reaps it (no zombie).
    let reaped = wait_until(Duration::from_secs(5), || proc_stat(escapee).is_none());
    assert!(reaped, "escapee {escapee}: {:?}", proc_stat(escapee));
    assert!(zombie_children(a.host_pid).is_empty());

    // One that keeps the session's stdout: EXITED waits linger_ms for it,
    // not longer; its later write hits a closed pipe and it dies; reaped.
    let mut e = sh("setsid sh -c 'sleep 0.5; echo late' & echo $!");
    e.linger_ms = 100;
    let t = Instant::now();
    let log = a.run(&e);
    let took = t.elapsed();
    assert_eq!(log.code(), Some(0));
    let escapee: i32 = log.stdout_str().trim().parse().expect("pid");
    assert!(took < Duration::from_millis(450), "EXITED took {took:?}");
    assert!(!log.stdout_str().contains("late"));
    let reaped = wait_until(Duration::from_secs(5), || proc_stat(escapee).is_none());
    assert!(reaped, "escapee {escapee}: {:?}", proc_stat(escapee));

    // End of file on the transport kills escapees too.
    let log = a.run(&sh("setsid sleep 60 </dev/null >/dev/null 2>&1 & echo $!"));
    let escapee: i32 = log.stdout_str().trim().parse().expect("pid");
    assert!(proc_stat(escapee).is_some());
    a.close_write();
    a.read_to_eof(Duration::from_secs(10));
    assert_eq!(a.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let gone = wait_until(Duration::from_secs(5), || proc_stat(escapee).is_none());
    if !gone {
        kill(escapee, libc::SIGKILL);
    }
    assert!(gone, "the escapee survived the agent");
}

/// Documented behaviour (see docs/RELIABILITY.md): SHUTDOWN signals the
/// sessions' process groups only, so an escapee the agent adopted is not
/// signalled, and when a stdio agent then exits it is left running (its
/// parent becomes the next reaper up); end of file, by contrast, kills
/// every child of the agent. (As PID 1 the power-off ends it.)
#[test]
fn shutdown_leaves_an_adopted_escapee_running_in_stdio_mode() {
    let mut a = SyncAgent::start(&[]);
    let log = a.run(&sh("setsid sleep 30 </dev/null >/dev/null 2>&1 & echo $!"));
    let escapee: i32 = log.stdout_str().trim().parse().expect("pid");
    let adopted = wait_until(Duration::from_secs(5), || {
        proc_stat(escapee).is_some_and(|p| p.sid == escapee && p.ppid == a.host_pid)
    });
    assert!(adopted, "{:?}", proc_stat(escapee));
    a.send(&Message::Shutdown(Shutdown { grace_ms: 100 }), 0);
    a.read_to_eof(Duration::from_secs(10));
    assert!(a.shutdown_done);
    assert_eq!(a.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let p = proc_stat(escapee);
    kill(escapee, libc::SIGKILL);
    let p = p.expect("the escapee outlives a SHUTDOWN");
    assert_ne!(p.ppid, a.host_pid);
    assert_ne!(p.state, 'Z');
}

// ---------------------------------------------------------------------------
// Fork bombs.

/// The processes of session `sid` at one instant, zombies included (they
/// hold their place under RLIMIT_NPROC until reaped). A bomb without job
/// control keeps the session's process group, so the group is stopped
/// while /proc is read: a scan under churn could count a process that has
/// just been reaped and the one forked in its place, and none can fork
/// once SIGSTOP is pending (the kernel restarts a fork that a group
/// signal overtakes), so what is read is no more than the group held when
/// it stopped. The pause lets processes being reaped leave /proc.
fn frozen_census(sid: i32) -> Vec<Proc> {
    kill(-sid, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(20));
    let procs = procs_in_sessions(&[sid]);
    kill(-sid, libc::SIGCONT);
    procs
}

/// Censuses of a bomb (session `sid`) until one finds at least `low`
/// processes (it may be between two explosions; up to 5 s); every census
/// must find at most `limit`. Returns the counts.
fn census_at_limit(sid: i32, low: usize, limit: usize) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut counts = Vec::new();
    loop {
        let n = frozen_census(sid).len();
        counts.push(n);
        assert!(n <= limit, "RLIMIT_NPROC {limit} did not hold: {counts:?}");
        if n >= low {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "the bomb is not at its limit: {} censuses in 5 s, at most {} processes",
            counts.len(),
            counts.iter().max().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fork bomb as `nobody` with `rlimits: nproc 30` (RLIMIT_NPROC counts
/// per real uid and does not bind root): once it reports that it cannot
/// fork, 20 or more rounds of a `cat` session fed through stdin, a tty
/// session and a PING complete, and the window lasts until the bomb has
/// hit its limit again (new fork failures on its stderr). A census of its
/// process group (frozen, see [`frozen_census`]; only the group, so other
/// `nobody` processes on the machine do not count) just before and just
/// after that window finds it at its limit: at least 10 processes, never
/// more than 30; it is still running at the end. A group SIGKILL then
/// ends it: no process of the group is left, zombie or not, and the
/// agent has no zombie child. Counted, not timed.
///
/// The classic `b() { b | b & }; b` dies out at its limit (a shell whose
/// fork fails exits, and the survivors exit as soon as they have forked),
/// so each of its shells lives a second, and awk (which carries on when
/// system() cannot fork) sets it off again and again: it explodes against
/// its limit about once a second and never dies out (as in the VM's t17).
#[test]
fn fork_bomb_with_nproc_limit_does_not_stop_the_agent() {
    const LIMIT: usize = 30;
    const LOW: usize = 10;
    const ROUNDS: usize = 20;
    let mut a = SyncAgent::start(&[]);
    let mut bomb = sh("exec awk 'BEGIN { while (1) system(\"b() { b | b & sleep 1; }; b\") }'");
    bomb.user = Some("nobody".into());
    bomb.rlimits = vec![agentd::messages::Rlimit {
        resource: "nproc".into(),
        soft: LIMIT as u64,
        hard: LIMIT as u64,
    }];
    bomb.stdin = false;
    let id = a.exec(&bomb);
    let pid = a.wait_started(id);
    // dash says "Cannot fork", busybox "can't fork".
    let failures = |a: &SyncAgent| {
        String::from_utf8_lossy(&a.logs[&id].stderr)
            .matches(" fork")
            .count()
    };
    a.wait_for("the bomb to hit its limit", SYNC_TIMEOUT, |a| {
        failures(a) > 0
    });

    let before = census_at_limit(pid, LOW, LIMIT);
    let failures_before = failures(&a);
    let t = Instant::now();
    let mut rounds = 0;
    let mut worst = Duration::ZERO;
    while rounds < ROUNDS || failures(&a) == failures_before {
        assert!(
            t.elapsed() < SYNC_TIMEOUT,
            "no new fork failure in {rounds} rounds; the bomb: {:?}",
            a.logs[&id].exited
        );
        let s = Instant::now();
        let line = format!("round {rounds}\n");
        let cat = a.exec_with_stdin(&cmd("cat", &[]), line.as_bytes());
        let log = a.wait_done(cat);
        assert_eq!(log.code(), Some(0), "{log:?}");
        assert_eq!(log.stdout, line.as_bytes());
        let mut tty = cmd("/bin/echo", &["tty"]);
        tty.tty = true;
        let log = a.run(&tty);
        assert_eq!(log.code(), Some(0), "{log:?}");
        assert_eq!(log.stdout, b"tty\r\n");
        a.ping(line.as_bytes());
        worst = worst.max(s.elapsed());
        rounds += 1;
    }
    let window = t.elapsed();
    let after = census_at_limit(pid, LOW, LIMIT);
    let new_failures = failures(&a) - failures_before;
    assert!(
        !a.logs[&id].done(),
        "the bomb ended: {:?}",
        a.logs[&id].exited
    );
    println!(
        "under the bomb: {rounds} rounds (cat, tty, PING) in {window:?}, worst {worst:?}; \
         {new_failures} fork failures meanwhile; processes of the bomb before {before:?}, after {after:?}"
    );

    a.signal(id, libc::SIGKILL);
    let log = a.wait_done(id);
    assert_eq!(log.signal(), Some(libc::SIGKILL));
    let gone = wait_until(Duration::from_secs(10), || {
        procs_in_sessions(&[pid]).is_empty()
    });
    let left = procs_in_sessions(&[pid]);
    if !gone {
        kill_sessions(&[pid]);
    }
    assert!(gone, "left after a group SIGKILL: {left:?}");
    let clean = wait_until(Duration::from_secs(5), || {
        zombie_children(a.host_pid).is_empty()
    });
    assert!(clean, "zombies: {:?}", zombie_children(a.host_pid));
}

/// A bounded bomb without limits: a binary tree of shells of depth 7 (255
/// shells, the session's own the root; each with a `sleep 1`; the inner
/// ones exit before their children, which the agent adopts). Each shell
/// leaves a file as it starts and another when its `sleep` is over. A PING
/// every 10 ms or so until the session has ended and nothing of it is
/// left; at least 3 of them are answered while the bomb has 100 or more
/// live processes (counted just before the PING and again just after its
/// PONG). Then every shell ran to its end (255 + 255 files), the session
/// exits 0, and every process ended and was reaped: none of the session is
/// left, zombie or not, and the agent has no zombie child.
#[test]
fn bounded_fork_bomb_without_limits() {
    const SHELLS: usize = 255;
    const LOADED: usize = 100;
    let dir = std::env::temp_dir().join(format!("agentd-bomb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("a directory for the markers");
    let d = dir.display();
    let mut a = SyncAgent::start(&[]);
    let mut e = sh(&format!(
        "b() {{ : > {d}/$1; if [ ${{#1}} -lt 8 ]; then b ${{1}}0 & b ${{1}}1 & fi; \
         sleep 1; : > {d}/$1.done; }}; b x"
    ));
    e.stdin = false;
    let id = a.exec(&e);
    let pid = a.wait_started(id);
    let live = || {
        procs_in_sessions(&[pid])
            .iter()
            .filter(|p| p.state != 'Z')
            .count()
    };
    let t = Instant::now();
    let (mut pings, mut loaded, mut max_live) = (0, 0, 0);
    let mut worst = Duration::ZERO;
    loop {
        let n_before = live();
        worst = worst.max(a.ping(format!("ping {pings}").as_bytes()));
        let n_after = live();
        pings += 1;
        if n_before.min(n_after) >= LOADED {
            loaded += 1;
        }
        max_live = max_live.max(n_before).max(n_after);
        if a.logs[&id].done() && procs_in_sessions(&[pid]).is_empty() {
            break;
        }
        if t.elapsed() > SYNC_TIMEOUT {
            kill_sessions(&[pid]);
            panic!("the bomb's processes outlive it ({max_live} at most)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = t.elapsed();
    let log = a.take_log(id);
    assert_eq!(log.code(), Some(0), "{log:?}");
    let mut started = 0;
    let mut ended = 0;
    for entry in std::fs::read_dir(&dir).expect("read the markers") {
        let name = entry.expect("a marker").file_name();
        if name.to_string_lossy().ends_with(".done") {
            ended += 1;
        } else {
            started += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "bomb: {pings} PINGs in {took:?} ({loaded} with {LOADED}+ live processes before and after), \
         up to {max_live} live at once, worst PING {worst:?}; {started} shells started, {ended} ended"
    );
    assert!(
        loaded >= 3,
        "{loaded} PINGs answered while the bomb had {LOADED}+ live processes (at most {max_live})"
    );
    assert_eq!(started, SHELLS, "not every shell ran");
    assert_eq!(ended, SHELLS, "not every shell ran to its end");
    assert!(zombie_children(a.host_pid).is_empty());
}

// ---------------------------------------------------------------------------
// Long runs and many sessions.

/// Runs session number `i` of the mix (a cycle of 20: 8 `/bin/true`, 2
/// `cat` fed through stdin, 2 tty sessions, 2 failures before exec (one
/// found missing by execve, one by chdir), 2 exit codes, 1 death by
/// signal with output on both streams, 1 whose background child is
/// orphaned and adopted, 2 with stdin /dev/null) and checks its outcome.
fn mixed_session(a: &mut SyncAgent, i: usize) {
    match i % 20 {
        0..=7 => {
            let log = a.run(&cmd("/bin/true", &[]));
            assert_eq!(log.code(), Some(0));
        }
        8 | 9 => {
            let id = a.exec(&cmd("cat", &[]));
            a.stdin(id, b"piped\n");
            a.close_stdin(id);
            let log = a.wait_done(id);
            assert_eq!(log.stdout, b"piped\n");
            assert_eq!(log.acked, 6);
        }
        10 | 11 => {
            let mut e = cmd("/bin/echo", &["tty"]);
            e.tty = true;
            let log = a.run(&e);
            assert_eq!(log.stdout, b"tty\r\n");
            assert_eq!(log.code(), Some(0));
        }
        12 => {
            let log = a.run(&cmd("/nonexistent/program", &[]));
            let f = log.failed.expect("EXEC_FAILED");
            assert_eq!(f.failed_kind(), Some(ExecFailedKind::NotFound));
        }
        13 => {
            let mut e = cmd("/bin/true", &[]);
            e.cwd = Some("/nonexistent-dir".into());
            let log = a.run(&e);
            let f = log.failed.expect("EXEC_FAILED");
            assert_eq!(f.failed_kind(), Some(ExecFailedKind::BadCwd));
        }
        14 | 15 => {
            let log = a.run(&cmd("/bin/false", &[]));
            assert_eq!(log.code(), Some(1));
        }
        16 => {
            let mut e = sh("echo out; echo err >&2; kill -9 $$");
            e.stdin = false;
            let log = a.run(&e);
            assert_eq!(log.signal(), Some(9));
            assert_eq!(log.stdout, b"out\n");
            assert_eq!(log.stderr, b"err\n");
        }
        17 => {
            // The shell exits, its background child is adopted.
            let log = a.run(&sh("/bin/true & exit 0"));
            assert_eq!(log.code(), Some(0));
        }
        _ => {
            let mut e = cmd("/bin/echo", &["no stdin"]);
            e.stdin = false;
            let log = a.run(&e);
            assert_eq!(log.stdout, b"no stdin\n");
        }
    }
}

/// 10,000 sessions one after another, mixing pipes, ttys, failures before
/// and after fork, orphans, exit codes and signals: at the end the agent
/// has exactly the fds it had at the start, its RSS is the same (within
/// 256 KiB: allocator slack), and it has no zombie children. Sized by
/// `SEQUENTIAL_SESSIONS`.
#[test]
fn ten_thousand_sequential_sessions_leak_nothing() {
    let total: usize = std::env::var("SEQUENTIAL_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut a = SyncAgent::start(&[]);
    // Warm-up: every shape once, so first-use allocations are in the base.
    for i in 0..200 {
        mixed_session(&mut a, i);
    }
    assert!(wait_until(Duration::from_secs(2), || zombie_children(
        a.host_pid
    )
    .is_empty()));
    let fds = a.fd_count();
    let rss = a.rss_kib();
    let t = Instant::now();
    let mut max_rss = rss;
    for i in 0..total {
        mixed_session(&mut a, i);
        if i % 1000 == 999 {
            max_rss = max_rss.max(a.rss_kib());
            assert!(a.logs.is_empty());
        }
    }
    let elapsed = t.elapsed();
    a.ping(b"end");
    let clean = wait_until(Duration::from_secs(2), || {
        zombie_children(a.host_pid).is_empty()
    });
    let fds_end = a.fd_count();
    let rss_end = a.rss_kib();
    println!(
        "{total} sessions in {elapsed:.1?} ({:.0}/s); fds {fds} -> {fds_end}; RSS {rss} -> {rss_end} KiB (max {max_rss})",
        total as f64 / elapsed.as_secs_f64()
    );
    assert!(clean, "zombies: {:?}", zombie_children(a.host_pid));
    assert_eq!(fds_end, fds, "the agent's fd count changed");
    assert!(rss_end <= rss + 256, "RSS grew from {rss} to {rss_end} KiB");
}

/// 1,000 sessions at once (`--max-sessions 1100`): all start, each echoes
/// its own line through stdin, all exit 0 with exactly their output.
#[test]
fn thousand_concurrent_sessions() {
    const N: usize = 1000;
    let mut a = SyncAgent::start_with(Opts {
        nofile: Some(8192),
        ..Opts::plain(&["--max-sessions", "1100"])
    });
    let t = Instant::now();
    let ids: Vec<u32> = (0..N).map(|_| a.exec(&cmd("cat", &[]))).collect();
    for &id in &ids {
        a.wait_started(id);
    }
    let started = t.elapsed();
    let live = children_of(a.host_pid).len();
    assert!(live >= N, "only {live} children alive at once");
    for &id in &ids {
        a.stdin(id, format!("session {id}\n").as_bytes());
        a.close_stdin(id);
    }
    for &id in &ids {
        let log = a.wait_done(id);
        assert_eq!(log.code(), Some(0));
        assert_eq!(log.stdout, format!("session {id}\n").as_bytes());
    }
    println!(
        "{N} concurrent sessions: started in {started:?}, done in {:?}",
        t.elapsed()
    );
    assert!(wait_until(Duration::from_secs(2), || zombie_children(
        a.host_pid
    )
    .is_empty()));
}

/// Out of descriptors (RLIMIT_NOFILE 48): EXECs beyond what fits fail with
/// `resource`, the running sessions and PING are unaffected, and once they
/// end new sessions start again; the fd count returns to where it was.
#[test]
fn out_of_descriptors_is_exec_failed_resource() {
    let mut a = SyncAgent::start_with(Opts {
        nofile: Some(48),
        ..Opts::plain(&[])
    });
    let fds = a.fd_count();
    let ids: Vec<u32> = (0..20).map(|_| a.exec(&cmd("cat", &[]))).collect();
    a.wait_for("every EXEC answered", SYNC_TIMEOUT, |a| {
        ids.iter()
            .all(|id| a.logs[id].pid.is_some() || a.logs[id].failed.is_some())
    });
    let (running, failed): (Vec<u32>, Vec<u32>) =
        ids.iter().partition(|id| a.logs[id].pid.is_some());
    println!("{} started, {} failed", running.len(), failed.len());
    assert!(!running.is_empty() && !failed.is_empty());
    for id in &failed {
        let f = a.logs[id].failed.as_ref().unwrap();
        assert_eq!(f.failed_kind(), Some(ExecFailedKind::Resource), "{f:?}");
    }
    a.ping(b"still here");
    for &id in &running {
        a.stdin(id, b"x");
        a.close_stdin(id);
        let log = a.wait_done(id);
        assert_eq!(log.stdout, b"x");
    }
    let log = a.run(&cmd("echo", &["again"]));
    assert_eq!(log.stdout, b"again\n");
    assert_eq!(a.fd_count(), fds);
}

// ---------------------------------------------------------------------------
// EPIPE, EAGAIN, EINTR.

/// A child closes its stdin while the host is sending: every byte is still
/// acknowledged (written or discarded), no ERROR, the session ends normally.
#[test]
fn child_closes_stdin_while_host_sends() {
    let mut a = SyncAgent::start(&[]);
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let id = a.exec(&sh(
        "head -c 10 >/dev/null; exec 0<&-; sleep 0.2; echo done",
    ));
    a.write_stdin_all(id, &data);
    a.close_stdin(id);
    let log = a.wait_done(id);
    assert_eq!(log.code(), Some(0));
    assert_eq!(log.stdout, b"done\n");
    assert_eq!(
        log.acked,
        data.len() as u64,
        "every STDIN byte is acknowledged"
    );
    assert!(log.errors.is_empty(), "{:?}", log.errors);

    // Closed before the first byte arrives.
    let id = a.exec(&sh("exec 0<&-; sleep 0.3; echo done"));
    for _ in 0..3 {
        a.stdin(id, &data[..64 * 1024]);
    }
    let log = a.wait_done(id);
    assert_eq!(log.stdout, b"done\n");
    assert_eq!(log.acked, 3 * 64 * 1024);
    assert!(log.errors.is_empty(), "{:?}", log.errors);
}

/// A child that never reads its stdin, sent a full window: the agent's
/// writes to its pipe hit EAGAIN and the session stalls, alone: another
/// session streams through `cat` and PING is answered meanwhile. When the
/// child exits, the rest is discarded (EPIPE), without ERROR. The same on
/// a terminal, whose input queue fills much sooner.
#[test]
fn child_not_reading_stdin_stalls_only_its_session() {
    let mut a = SyncAgent::start(&[]);
    let window = a.ready.stdin_window as usize;
    for tty in [false, true] {
        let mut e = cmd("sleep", &["1"]);
        e.tty = tty;
        let stuck = a.exec(&e);
        a.wait_started(stuck);
        let block = vec![b'z'; 64 * 1024];
        for _ in 0..window / block.len() {
            a.stdin(stuck, &block);
        }
        let acked = a.logs[&stuck].acked;
        assert!(
            acked < window as u64,
            "tty {tty}: everything was written ({acked})"
        );
        // Meanwhile, another session works and PING is answered.
        let other = a.exec(&cmd("cat", &[]));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let t = Instant::now();
        a.write_stdin_all(other, &data);
        a.close_stdin(other);
        let log = a.wait_done(other);
        assert!(
            log.stdout == data,
            "tty {tty}: the other session's output differs"
        );
        let rtt = a.ping(b"stalled");
        assert!(t.elapsed() < Duration::from_secs(5) && rtt < Duration::from_secs(1));
        let log = a.wait_done(stuck);
        assert_eq!(log.code(), Some(0), "tty {tty}: {log:?}");
        assert!(log.acked <= window as u64);
        assert!(log.errors.is_empty(), "tty {tty}: {:?}", log.errors);
    }
}

/// The host reads slowly (4 KiB reads with pauses), so the agent's writes
/// to the transport hit EAGAIN again and again: all output arrives intact
/// and in order, and PING is answered in between.
#[test]
fn slow_host_reader_transport_eagain() {
    const N: u32 = 150_000;
    let expected = seq_output(N);
    let mut a = SyncAgent::start(&[]);
    a.read_chunk = Some(4096);
    let mut e = cmd("seq", &["1", &N.to_string()]);
    e.stdin = false;
    let ids: Vec<u32> = (0..3).map(|_| a.exec(&e)).collect();
    let mut pings = 0;
    let t = Instant::now();
    while !ids.iter().all(|id| a.logs[id].done()) {
        assert!(t.elapsed() < SYNC_TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
        a.pump(Duration::from_millis(10));
        if a.bytes_in > (pings + 1) * (1 << 20) {
            a.send(&Message::Ping(b"slow"), 0);
            pings += 1;
        }
    }
    a.wait_for("PONGs", SYNC_TIMEOUT, |a| a.pongs.len() as u64 == pings);
    println!(
        "slow reader: {} bytes in {:?}, {pings} PINGs",
        a.bytes_in,
        t.elapsed()
    );
    for id in ids {
        let log = a.take_log(id);
        assert_eq!(log.code(), Some(0));
        assert!(log.stdout == expected, "session {id}: output differs");
    }
}

/// While data streams through a `cat` session (2 MiB in, checked byte for
/// byte out): 300 short sessions and orphans raise a storm of SIGCHLD,
/// another thread sends the agent thousands of extra SIGCHLDs, and
/// SIGSTOP/SIGCONT pairs interrupt its poll (EINTR). Nothing is lost,
/// everything exits, nothing is left unreaped.
#[test]
fn signal_storms_during_transfers() {
    let mut a = SyncAgent::start(&[]);
    let agent = a.host_pid;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                kill(agent, libc::SIGCHLD);
                if n % 20 == 0 {
                    kill(agent, libc::SIGSTOP);
                    std::thread::sleep(Duration::from_micros(200));
                    kill(agent, libc::SIGCONT);
                }
                n += 1;
                std::thread::sleep(Duration::from_micros(300));
            }
            kill(agent, libc::SIGCONT);
            n
        })
    };
    let data: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let cat = a.exec(&cmd("cat", &[]));
    let mut short = Vec::new();
    let mut sent = 0;
    for (i, chunk) in data.chunks(16 * 1024).enumerate() {
        let need = (sent + chunk.len()) as u64;
        let window = u64::from(a.ready.stdin_window);
        a.wait_for("window", SYNC_TIMEOUT, |a| {
            need - a.logs[&cat].acked <= window
        });
        a.stdin(cat, chunk);
        sent += chunk.len();
        if short.len() < 300 {
            let e = if i % 3 == 0 {
                sh("true & true & exit 3")
            } else {
                cmd("/bin/true", &[])
            };
            short.push((a.exec(&e), i % 3 == 0));
        }
    }
    a.close_stdin(cat);
    for (id, orphans) in short {
        let log = a.wait_done(id);
        assert_eq!(log.code(), Some(if orphans { 3 } else { 0 }));
    }
    let log = a.wait_done(cat);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let signals = storm.join().unwrap();
    println!(
        "{signals} SIGCHLDs and {} stop/continue pairs sent",
        signals / 20
    );
    assert_eq!(log.code(), Some(0));
    assert_eq!(log.stdout.len(), data.len());
    assert!(log.stdout == data, "cat's output differs from its input");
    a.ping(b"after the storm");
    assert!(wait_until(Duration::from_secs(2), || zombie_children(
        a.host_pid
    )
    .is_empty()));
}

// ---------------------------------------------------------------------------
// Soak (run by tests/soak.sh; ignored by `cargo test`).

/// One kind of soak session.
#[derive(Clone, Copy, Debug)]
enum SoakKind {
    True,
    False,
    Cat,
    Tty,
    NotFound,
    BadCwd,
    Orphan,
    Escapee,
    Killed,
    Flood,
    Epipe,
    BigStdin,
}

const SOAK_MIX: [SoakKind; 16] = [
    SoakKind::True,
    SoakKind::Cat,
    SoakKind::Tty,
    SoakKind::True,
    SoakKind::False,
    SoakKind::NotFound,
    SoakKind::Orphan,
    SoakKind::True,
    SoakKind::Killed,
    SoakKind::Cat,
    SoakKind::BadCwd,
    SoakKind::Flood,
    SoakKind::True,
    SoakKind::Epipe,
    SoakKind::Escapee,
    SoakKind::BigStdin,
];

const SOAK_FLOOD: u32 = 20_000;

/// STDIN of a `BigStdin` session: two frames of this many bytes (large
/// enough to stream from the transport into the child's pipe).
const SOAK_STDIN_FRAME: usize = 100_000;

fn soak_start(a: &mut SyncAgent, kind: SoakKind) -> u32 {
    let id = match kind {
        SoakKind::True => a.exec(&cmd("/bin/true", &[])),
        SoakKind::False => a.exec(&cmd("/bin/false", &[])),
        SoakKind::Cat => {
            let id = a.exec(&cmd("cat", &[]));
            a.stdin(id, format!("line {id}\n").as_bytes());
            id
        }
        SoakKind::Tty => {
            let mut e = cmd("/bin/echo", &["tty"]);
            e.tty = true;
            a.exec(&e)
        }
        SoakKind::NotFound => a.exec(&cmd("/nonexistent/program", &[])),
        SoakKind::BadCwd => {
            let mut e = cmd("/bin/true", &[]);
            e.cwd = Some("/nonexistent-dir".into());
            a.exec(&e)
        }
        SoakKind::Orphan => a.exec(&sh("/bin/true & /bin/true & exit 0")),
        SoakKind::Escapee => a.exec(&sh("setsid sleep 0.2 </dev/null >/dev/null 2>&1 & exit 0")),
        SoakKind::Killed => a.exec(&cmd("sleep", &["30"])),
        SoakKind::Flood => {
            let mut e = cmd("seq", &["1", &SOAK_FLOOD.to_string()]);
            e.stdin = false;
            a.exec(&e)
        }
        SoakKind::BigStdin => {
            let id = a.exec(&cmd("wc", &["-c"]));
            // STDIN for a session still starting is queued, not streamed.
            a.wait_started(id);
            let data = vec![b's'; SOAK_STDIN_FRAME];
            a.stdin(id, &data);
            a.stdin(id, &data);
            id
        }
        SoakKind::Epipe => {
            // STDIN comes with the EXEC: it is queued while the session
            // starts, so it is written (or discarded) before the end.
            return a.exec_with_stdin(&sh("exec 0<&-; echo closed"), &[b'x'; 4096]);
        }
    };
    if !matches!(kind, SoakKind::Flood) {
        a.close_stdin(id);
    }
    id
}

fn soak_check(kind: SoakKind, id: u32, log: &Log, flood: &[u8]) {
    let ok = match kind {
        SoakKind::True | SoakKind::Orphan | SoakKind::Escapee => log.code() == Some(0),
        SoakKind::False => log.code() == Some(1),
        SoakKind::Cat => log.stdout == format!("line {id}\n").as_bytes() && log.code() == Some(0),
        SoakKind::Tty => log.stdout == b"tty\r\n",
        SoakKind::NotFound => log
            .failed
            .as_ref()
            .is_some_and(|f| f.failed_kind() == Some(ExecFailedKind::NotFound)),
        SoakKind::BadCwd => log
            .failed
            .as_ref()
            .is_some_and(|f| f.failed_kind() == Some(ExecFailedKind::BadCwd)),
        SoakKind::Killed => log.signal() == Some(libc::SIGTERM),
        SoakKind::Flood => log.stdout == flood && log.code() == Some(0),
        // Every STDIN byte is discarded (EPIPE) and acknowledged.
        SoakKind::Epipe => log.stdout == b"closed\n" && log.acked == 4096 && log.errors.is_empty(),
        SoakKind::BigStdin => {
            log.stdout == format!("{}\n", 2 * SOAK_STDIN_FRAME).as_bytes()
                && log.acked == 2 * SOAK_STDIN_FRAME as u64
                && log.code() == Some(0)
        }
    };
    assert!(ok, "soak session {id} ({kind:?}): {log:?}");
}

/// The soak: a mixed workload, 8 sessions in flight, for SOAK_SECS
/// seconds. Every 10 s it lets the sessions in flight finish and prints
/// sessions/s, the agent's fds, RSS and zombie children; it fails if the
/// fd count differs from the first measurement, a zombie survives from one
/// report to the next, RSS grows by more than 4 MiB, a session's outcome
/// is wrong, or the agent dies.
#[test]
#[ignore]
fn soak() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    const IN_FLIGHT: usize = 8;
    let flood = seq_output(SOAK_FLOOD);
    let mut a = SyncAgent::start(&[]);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut next_report = start + Duration::from_secs(10);
    let mut baseline: Option<(usize, u64)> = None;
    let mut in_flight: Vec<(u32, SoakKind, bool)> = Vec::new();
    let (mut done, mut done_at_report, mut n) = (0u64, 0u64, 0usize);
    let mut last_report = start;
    let mut old_zombies: Vec<i32> = Vec::new();
    loop {
        let now = Instant::now();
        let reporting = now >= next_report || now >= end;
        while !reporting && in_flight.len() < IN_FLIGHT {
            let kind = SOAK_MIX[n % SOAK_MIX.len()];
            n += 1;
            in_flight.push((soak_start(&mut a, kind), kind, false));
        }
        if in_flight.is_empty() {
            // Quiescent: measure.
            a.ping(b"soak");
            let fds = a.fd_count();
            let rss = a.rss_kib();
            let zombies = zombie_children(a.host_pid);
            let rate = (done - done_at_report) as f64 / last_report.elapsed().as_secs_f64();
            println!(
                "soak {:>5}s: {done} sessions ({rate:.0}/s), agent fds {fds}, RSS {rss} KiB, zombies {}",
                start.elapsed().as_secs(),
                zombies.len()
            );
            let (fds0, rss0) = *baseline.get_or_insert((fds, rss));
            assert_eq!(fds, fds0, "the agent's fd count changed");
            assert!(rss <= rss0 + 4096, "RSS grew from {rss0} to {rss} KiB");
            let stuck: Vec<i32> = zombies
                .iter()
                .filter(|z| old_zombies.contains(z))
                .copied()
                .collect();
            assert!(stuck.is_empty(), "zombies not reaped for 10 s: {stuck:?}");
            old_zombies = zombies;
            done_at_report = done;
            last_report = Instant::now();
            next_report = last_report + Duration::from_secs(10);
            if now >= end {
                break;
            }
            continue;
        }
        a.pump(Duration::from_millis(50));
        let mut i = 0;
        while i < in_flight.len() {
            let (id, kind, signalled) = in_flight[i];
            let log = &a.logs[&id];
            if log.done() {
                let log = a.take_log(id);
                soak_check(kind, id, &log, &flood);
                in_flight.swap_remove(i);
                done += 1;
                continue;
            }
            if matches!(kind, SoakKind::Killed) && !signalled && log.pid.is_some() {
                a.signal(id, libc::SIGTERM);
                in_flight[i].2 = true;
            }
            i += 1;
        }
    }
    assert!(done > 0);
    let clean = wait_until(Duration::from_secs(2), || {
        zombie_children(a.host_pid).is_empty()
    });
    assert!(
        clean,
        "zombies at the end: {:?}",
        zombie_children(a.host_pid)
    );
    a.close_write();
    a.read_to_eof(Duration::from_secs(10));
    assert_eq!(a.wait_exit(Duration::from_secs(10)).code(), Some(0));
}
