//! The `sessions` extension (docs/PROTOCOL.md, "Extension `sessions`")
//! over `agentd --listen unix:PATH`: several hosts at once, each with its
//! own id space; sessions that outlive their host, listed, attached with a
//! replay, detached; exits kept for the next host; deadlines.

use agentd::messages::{Attach, Exec, Kind, Message, Signal};

use crate::support::host::*;
use crate::support::listen::*;
use crate::support::proc::alive;
use crate::support::timeout;

fn tagged(tag: &str, e: Exec) -> Exec {
    Exec {
        tag: Some(tag.into()),
        ..e
    }
}

fn detached(e: Exec) -> Exec {
    Exec { detach: true, ..e }
}

both! {
    /// Two hosts use the same ids at once; each gets its own session's
    /// frames and nothing of the other's.
    fn two_hosts_with_overlapping_ids(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let mut b = agent.connect();
        a.exec(1, &sh("read x; echo a$x"));
        b.exec(1, &sh("read x; echo b$x"));
        b.conn.send_stdin(1, b"2\n");
        a.conn.send_stdin(1, b"1\n");
        let sb = b.until_exited(1);
        let sa = a.until_exited(1);
        assert_eq!(sa.stdout, b"a1\n");
        assert_eq!(sb.stdout, b"b2\n");
        assert_eq!(sa.exited.map(|e| e.status), Some(0));
        // Each READY was its own, and both hosts may go on.
        a.exec(2, &sh("echo again"));
        assert_eq!(a.until_exited(2).stdout, b"again\n");
    }

    /// A host starts a session and goes away; the session goes on. A second
    /// host lists it, attaches by tag, gets the replay, then live output
    /// for its stdin, then the exit.
    fn a_session_outlives_its_host_and_is_attached_with_replay(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let started = a.exec(1, &tagged("job", sh("echo first; read x; echo second $x")));
        let number = started.session.expect("STARTED has the session's number");
        a.until_stdout(1, "first");
        a.disconnect();

        let mut b = agent.connect();
        wait_listed(&mut b, 9, |l| l.iter().any(|s| s.session == number && !s.attached));
        let listed = b.list(9, false);
        let info = listed.iter().find(|s| s.session == number).expect("listed");
        assert_eq!(info.tag.as_deref(), Some("job"));
        assert_eq!(info.state, "running");
        assert_eq!(info.stdout_bytes, 6);
        assert_eq!(info.cmd, "sh");
        assert_eq!(info.id, None, "not this connection's");
        assert!(info.exit.is_none());

        let at = b.attach(5, by_tag("job"));
        assert_eq!(at.session, number);
        assert_eq!((at.stdout_from, at.stdout_lost), (0, 0));
        assert!(at.stdin, "stdin still open");
        b.until_stdout(5, "first\n");
        b.conn.send_stdin(5, b"x\n");
        let seen = b.until_exited(5);
        assert_eq!(seen.stdout, b"first\nsecond x\n");
        assert_eq!(seen.exited.map(|e| e.status), Some(0));

        // Seen: gone from the list, kept in `all` with its exit.
        assert!(b.list(9, false).iter().all(|s| s.session != number));
        let all = b.list(9, true);
        let info = all.iter().find(|s| s.session == number).expect("kept");
        assert_eq!(info.state, "exited");
        assert_eq!(info.exit.map(|e| e.status), Some(0));
    }

    /// A session started detached (STARTED is the id's last frame) that
    /// ends before anyone attaches keeps its exit and output for the next
    /// host, which gets them at once on ATTACH.
    fn an_exit_is_kept_for_the_next_host(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let s = a.exec(1, &detached(sh("echo done; exit 3")));
        let number = s.session.expect("a number");
        // The id is free again at once.
        a.exec(1, &sh("true"));
        a.until_exited(1);
        wait_listed(&mut a, 2, |l| {
            l.iter().any(|i| i.session == number && i.state == "exited")
        });
        // Unseen: listed without `all` too.
        assert!(a.list(2, false).iter().any(|i| i.session == number));
        let mut b = agent.connect();
        b.attach(3, by_number(number));
        let seen = b.until_exited(3);
        assert_eq!(seen.stdout, b"done\n");
        assert_eq!(seen.exited.map(|e| e.code), Some(Some(3)));
    }

    /// A ring smaller than the output: ATTACH from offset 0 is told how
    /// many bytes were lost and gets exactly the last `replay_bytes`;
    /// `tail` and an explicit offset replay from where they say.
    fn a_replay_that_overflowed_says_how_much_was_lost(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        // 10,000 bytes of digits, then wait (stdin) so the session stays.
        let script = "i=0; while [ $i -lt 1000 ]; do printf '%09d\\n' $i; i=$((i+1)); done; read x";
        let e = Exec {
            replay_bytes: Some(1024),
            ..detached(sh(script))
        };
        let number = a.exec(1, &e).session.expect("a number");
        wait_listed(&mut a, 2, |l| l.iter().any(|i| i.session == number && i.stdout_bytes == 10_000));
        let full: Vec<u8> = (0..1000).flat_map(|i| format!("{i:09}\n").into_bytes()).collect();

        let at = a.attach(3, Attach { stdout_from: Some(0), ..by_number(number) });
        assert_eq!(at.stdout_from, 10_000 - 1024);
        assert_eq!(at.stdout_lost, 10_000 - 1024);
        assert_eq!(a.until_stdout(3, "000000999\n"), &full[10_000 - 1024..]);

        // Taken over by a tail on another id of the same connection.
        let at = a.attach(4, Attach { tail: Some(20), ..by_number(number) });
        assert_eq!((at.stdout_from, at.stdout_lost), (10_000 - 20, 0));
        assert_eq!(a.until_detached(3).reason, "attached_elsewhere");
        assert_eq!(a.until_stdout(4, "000000999\n"), b"000000998\n000000999\n");

        let at = a.attach(5, Attach { stdout_from: Some(9_990), ..by_number(number) });
        assert_eq!((at.stdout_from, at.stdout_lost), (9_990, 0));
        assert_eq!(a.until_stdout(5, "000000999\n"), b"000000999\n");
        a.conn.send_stdin(5, b"\n");
        assert_eq!(a.until_exited(5).exited.map(|e| e.status), Some(0));
    }

    /// A host that stops reading while its session floods (the session
    /// stalls on that host's full queue) and then leaves: the session is
    /// detached and goes on into its ring; a second host attaches it, and
    /// when more output comes than its own queue takes at once (4 MiB after
    /// a line on stdin), the session still resumes as that host drains the
    /// queue, to its EXITED. (Written after the VM suite's t15 over vsock
    /// once saw floods stuck after ATTACHED; this test passes with and
    /// without the fix that came with it, `Session::forget_stall`, so it
    /// guards the path without reproducing that run.)
    fn a_session_stalled_on_a_departed_host_resumes_for_the_next(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let script = "head -c 4194304 /dev/zero; read x; head -c 4194304 /dev/zero; echo end";
        let number = a.exec(1, &sh(script)).session.expect("a number");
        // A reads nothing: the agent's queue for it fills up and the
        // session stalls. Then A leaves.
        let mut b = agent.connect();
        wait_listed(&mut b, 9, |l| {
            l.iter().any(|i| i.session == number && i.attached && i.stdout_bytes >= 1 << 20)
        });
        a.disconnect();
        wait_listed(&mut b, 9, |l| {
            l.iter().any(|i| i.session == number && !i.attached && i.stdout_bytes == 4 << 20)
        });
        let at = b.attach(5, Attach { stdout_from: Some(4 << 20), ..by_number(number) });
        assert_eq!((at.stdout_from, at.stdout_lost), (4 << 20, 0));
        b.conn.send_stdin(5, b"x\n");
        let seen = b.until_exited(5);
        assert_eq!(seen.stdout.len(), (4 << 20) + 4, "the second flood did not arrive whole");
        assert!(seen.stdout.ends_with(b"end\n"));
        assert_eq!(seen.exited.map(|e| e.status), Some(0));
    }

    /// ATTACH from another connection takes the session over: the first
    /// host's id gets DETACHED `attached_elsewhere` as its last frame and
    /// the session's frames go to the new host only.
    fn attach_takes_a_session_over_from_another_host(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let mut b = agent.connect();
        let number = a.exec(1, &sh("read x; echo got $x")).session.expect("a number");
        let at = b.attach(1, by_number(number));
        assert_eq!(at.session, number);
        let d = a.until_detached(1);
        assert_eq!((d.session, d.reason.as_str()), (number, "attached_elsewhere"));
        // The old id is free: STDIN there is unknown_session.
        a.conn.send_stdin(1, b"lost\n");
        assert_eq!(a.error(1).kind, "unknown_session");
        b.conn.send_stdin(1, b"it\n");
        assert_eq!(b.until_exited(1).stdout, b"got it\n");
        assert!(!a.output.get(&1).is_some_and(|s| !s.stdout.is_empty()));
    }

    /// DETACH ends the id (DETACHED `detach`), not the session, and the
    /// id can be used again; output made meanwhile is replayed on attach.
    fn detach_leaves_the_session_running(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let number = a.exec(4, &sh("read x; echo after $x")).session.expect("a number");
        a.conn.send(&Message::Sessions(agentd::messages::SessionsMsg::Detach), 4);
        assert_eq!(a.until_detached(4).reason, "detach");
        a.exec(4, &sh("echo reused"));
        assert_eq!(a.until_exited(4).stdout, b"reused\n");
        let info = a.list(5, false).into_iter().find(|s| s.session == number).expect("listed");
        assert!(!info.attached);
        a.attach(6, by_number(number));
        a.conn.send_stdin(6, b"1\n");
        assert_eq!(a.until_exited(6).stdout, b"after 1\n");
        // DETACH on an id that has no session.
        a.conn.send(&Message::Sessions(agentd::messages::SessionsMsg::Detach), 77);
        assert_eq!(a.error(77).kind, "unknown_session");
    }

    /// Every way an ATTACH is refused.
    fn attach_failures_are_typed(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        a.attach_fails(1, by_number(999_999), "not_found");
        a.attach_fails(1, by_tag("nobody-has-it"), "not_found");
        a.attach_fails(1, Attach::default(), "invalid_request");
        a.attach_fails(1, Attach { tag: Some("x".into()), ..by_number(1) }, "invalid_request");
        a.exec(2, &tagged("twin", cmd("cat", &[])));
        a.exec(3, &tagged("twin", cmd("cat", &[])));
        a.attach_fails(1, by_tag("twin"), "ambiguous");
        // An id in use (a session's) is duplicate_id; that session goes on.
        a.attach_fails(2, by_tag("twin"), "duplicate_id");
        a.conn.send_stdin_close(2);
        a.conn.send_stdin_close(3);
        a.until_exited(2);
        a.until_exited(3);
        // A LIST on an id in use is an ERROR for that frame.
        a.exec(4, &cmd("cat", &[]));
        a.conn.send(&Message::Sessions(agentd::messages::SessionsMsg::List(Default::default())), 4);
        assert_eq!(a.error(4).kind, "duplicate_id");
        a.conn.send_stdin_close(4);
        a.until_exited(4);
    }

    /// `timeout_ms`: SIGTERM to the whole process group at the deadline,
    /// EXITED says `timed_out`; one that ignores SIGTERM gets SIGKILL
    /// `kill_grace_ms` later.
    fn deadlines_end_sessions(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let e = Exec { timeout_ms: Some(200), ..cmd("sleep", &["100"]) };
        a.exec(1, &e);
        let ex = a.until_exited(1).exited.expect("EXITED");
        assert_eq!((ex.signal, ex.timed_out), (Some(15), true));

        let e = Exec {
            timeout_ms: Some(200),
            kill_grace_ms: Some(300),
            ..sh("trap '' TERM; echo armed; while :; do sleep 0.05; done")
        };
        a.exec(2, &e);
        let ex = a.until_exited(2).exited.expect("EXITED");
        assert_eq!((ex.signal, ex.timed_out), (Some(9), true));

        // A session that ends before its deadline is not timed out.
        let e = Exec { timeout_ms: Some(10_000), ..sh("exit 4") };
        a.exec(3, &e);
        let ex = a.until_exited(3).exited.expect("EXITED");
        assert_eq!((ex.code, ex.timed_out), (Some(4), false));
    }

    /// A deadline holds for a detached session whose host has gone.
    fn a_deadline_ends_a_session_nobody_watches(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let e = Exec { timeout_ms: Some(300), ..detached(cmd("sleep", &["100"])) };
        let s = a.exec(1, &e);
        let number = s.session.expect("a number");
        let pid = agent.process.host_pid_of(s.pid).expect("the session's pid");
        a.disconnect();
        assert!(crate::support::wait_until(timeout(), || !alive(pid)), "sleep still runs");
        let mut b = agent.connect();
        b.attach(1, by_number(number));
        let ex = b.until_exited(1).exited.expect("EXITED");
        assert!(ex.timed_out);
    }

    /// SIGNAL `tree` without cgroups is refused, never taken for a group
    /// signal.
    fn a_tree_signal_without_cgroups_is_unsupported(opts: Opts) {
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        a.exec(1, &cmd("cat", &[]));
        let sig = Signal { signal: 9, group: true, tree: true };
        a.conn.send(&Message::Signal(sig), 1);
        assert_eq!(a.error(1).kind, "unsupported");
        a.conn.send_stdin_close(1);
        assert_eq!(a.until_exited(1).exited.map(|e| e.status), Some(0));
    }

    /// 1,000 detached sessions are all listed, over several SESSIONS
    /// pages of at most 64 KiB; the list shows which is this host's.
    fn a_thousand_detached_sessions_are_listed(opts: Opts) {
        let mut opts = opts;
        opts.args.extend(["--max-sessions".into(), "1100".into()]);
        let agent = Listening::start(&opts);
        let mut a = agent.connect();
        let mut numbers = std::collections::BTreeSet::new();
        for i in 0..1000u32 {
            let e = detached(tagged(&format!("t{i}"), cmd("sleep", &["60"])));
            a.conn.send_exec(i + 1, &e);
        }
        // STARTED frames come in the order the children start.
        while numbers.len() < 1000 {
            let f = a.frame();
            assert_eq!(f.kind, Kind::Started as u8, "{:?}", decode(&f));
            let Message::Started(s) = decode(&f) else { unreachable!() };
            numbers.insert(s.session.expect("a number"));
        }
        a.exec(5000, &cmd("sleep", &["60"]));
        let pages = a.list_pages(1, false);
        assert!(pages.len() > 1, "1,001 sessions in one page");
        let listed: Vec<_> = pages.into_iter().flatten().collect();
        assert_eq!(listed.len(), 1001);
        let got: std::collections::BTreeSet<u64> =
            listed.iter().filter(|s| !s.attached).map(|s| s.session).collect();
        assert_eq!(got, numbers);
        let mine: Vec<_> = listed.iter().filter(|s| s.attached).collect();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].id, Some(5000));
        assert!(listed.iter().all(|s| s.state == "running"));
    }
}

/// READY on a listening transport lists `sessions` and says the default
/// replay and whether sessions get cgroups.
#[test]
fn ready_advertises_sessions_and_replay() {
    let agent = Listening::start(&Opts::default());
    let c = agent.connect();
    let ready = c.conn.ready.clone().expect("READY decoded");
    assert!(ready.features.iter().any(|f| f == "sessions"));
    assert_eq!(ready.replay_bytes, Some(65536));
    assert!(ready.cgroups.is_some());
}
