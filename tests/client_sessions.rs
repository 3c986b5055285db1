//! The client library's sessions, clock and transports against the real
//! agent (`agentd --listen unix:PATH`, several hosts at once): detached
//! starts, typed lists, attach with replay and what was lost, detach and
//! takeover, deadlines, limits refused without cgroups (and enforced with
//! them where this machine can make a cgroup), the clock read and its
//! setting refused; `Client::connect` over `unix:`, over a fake
//! Firecracker-style hybrid vsock that proxies to the agent (and every way
//! its handshake fails), and AF_VSOCK's errors without a VM.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, SystemTime};

use agentd::client::{
    AttachFailedKind, AttachOptions, Client, Command, ConnectError, DetachOutcome, Error,
    ErrorKind, Event, ExecFailedKind, Session, SessionRef, SessionState, Target,
};
use support::host::Opts;
use support::listen::Listening;
use support::util::TempDir;
use support::wait_until;

fn agent() -> Listening {
    Listening::start(&Opts::default())
}

fn agent_with(args: &[String]) -> Listening {
    let mut opts = Opts::default();
    opts.args.extend(args.iter().cloned());
    Listening::start(&opts)
}

fn connect(agent: &Listening) -> Client {
    Client::connect(&format!("unix:{}", agent.path.display())).expect("client connects")
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

/// Output until the session's last event: (stdout, stderr, the last event).
fn drain(s: &mut Session) -> (Vec<u8>, Vec<u8>, Event) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match s.next_event().expect("event").expect("a last event") {
            Event::Stdout(d) => out.extend_from_slice(&d),
            Event::Stderr(d) => err.extend_from_slice(&d),
            Event::Error(e) => panic!("agent error {}: {}", e.kind, e.message),
            last => return (out, err, last),
        }
    }
}

/// Output until stdout holds `text`.
fn until_stdout(s: &mut Session, text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(text) {
        match s.next_event().expect("event").expect("not ended") {
            Event::Stdout(d) => out.extend_from_slice(&d),
            Event::Stderr(_) => {}
            other => panic!("{other:?} before {text:?}"),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Sessions.

#[test]
fn detached_session_is_listed_typed_and_attached_with_its_replay() {
    let agent = agent();
    let a = connect(&agent);
    let before = SystemTime::now() - Duration::from_secs(1);
    let started = a
        .exec_detached(
            sh("echo one; echo two >&2; exec sleep 1000")
                .stdin(false)
                .tag("job")
                .user(users_name()),
        )
        .expect("detached start");
    assert!(started.pid > 0);

    // Another connection lists it, typed.
    let b = connect(&agent);
    assert!(wait_until(support::timeout(), || {
        b.sessions().unwrap()[0].stdout_bytes == 4
    }));
    let list = b.sessions().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    let r = &list[0];
    assert_eq!(r.number, started.number);
    assert_eq!(r.pid, started.pid);
    assert_eq!(r.tag.as_deref(), Some("job"));
    assert_eq!(r.cmd, "sh");
    assert_eq!(r.args[0], "-c");
    assert_eq!(r.user.as_deref(), Some(users_name().as_str()));
    assert!(!r.tty && !r.attached && r.id.is_none());
    assert_eq!(r.state, SessionState::Running);
    assert!(r.started >= before && r.started <= SystemTime::now() + Duration::from_secs(1));
    assert_eq!((r.stdout_bytes, r.stderr_bytes), (4, 4));

    // Attached by tag: the replay, then stdin goes to it, then the exit.
    let mut s = b.attach("job", &AttachOptions::new()).expect("attach");
    assert_eq!(s.number(), Some(started.number));
    assert_eq!(s.pid(), started.pid);
    let info = s.attached().expect("ATTACHED").clone();
    assert_eq!((info.stdout_from, info.stderr_from), (0, 0));
    assert_eq!((info.stdout_lost, info.stderr_lost), (0, 0));
    assert!(!info.stdin, "started without stdin: {info:?}");
    assert!(matches!(s.write_stdin(b"x\n"), Err(Error::StdinClosed)));
    s.signal(libc::SIGTERM).unwrap();
    let (out, err, last) = drain(&mut s);
    assert_eq!(String::from_utf8_lossy(&out), "one\n");
    assert_eq!(String::from_utf8_lossy(&err), "two\n");
    let Event::Exited(status) = last else {
        panic!("{last:?}")
    };
    assert_eq!(status.signal, Some(libc::SIGTERM));

    // Seen: gone from the default list, kept with `all`.
    assert!(b.sessions().unwrap().is_empty());
    let all = a.sessions_all().unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].has_ended());
    assert_eq!(
        all[0].exit_status().map(|x| x.signal),
        Some(Some(libc::SIGTERM))
    );
}

fn users_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| nix::unistd::getuid().to_string(), |u| u.name)
}

#[test]
fn stdin_of_a_detached_session_reaches_it_once_attached() {
    let agent = agent();
    let a = connect(&agent);
    let started = a
        .exec_detached(sh("read line; echo got $line").stdin(true))
        .unwrap();
    let mut s = a
        .attach(started.number, &AttachOptions::new())
        .expect("attach by number");
    assert!(s.attached().unwrap().stdin);
    s.write_stdin(b"hello\n").unwrap();
    let (out, _, last) = drain(&mut s);
    assert_eq!(out, b"got hello\n");
    assert!(matches!(last, Event::Exited(x) if x.success()));
}

#[test]
fn replay_offsets_tail_no_replay_and_lost_bytes() {
    let agent = agent();
    let a = connect(&agent);
    // 100 bytes out, a ring of 40.
    let started = a
        .exec_detached(
            sh("printf '%0100d' 0; echo; sleep 1000")
                .replay_bytes(40)
                .tag("ring"),
        )
        .unwrap();
    assert!(wait_until(support::timeout(), || {
        a.sessions().unwrap()[0].stdout_bytes == 101
    }));

    // From offset 0: 61 bytes are gone, the last 40 replayed.
    let mut opts = AttachOptions::new();
    opts.since(0, 0);
    let mut s = a.attach(started.number, &opts).unwrap();
    let info = s.attached().unwrap().clone();
    assert_eq!((info.stdout_from, info.stdout_lost), (61, 61), "{info:?}");
    let out = until_stdout(&mut s, "\n");
    assert_eq!(out.len(), 40);
    assert!(
        matches!(s.detach().unwrap(), DetachOutcome::Detached { session } if session == started.number)
    );

    // The last 5 bytes.
    let mut opts = AttachOptions::new();
    opts.tail(5);
    let mut s = a.attach("ring", &opts).unwrap();
    assert_eq!(s.attached().unwrap().stdout_from, 96);
    assert_eq!(until_stdout(&mut s, "\n"), b"0000\n");
    s.detach().unwrap();

    // Nothing: the session is killed and only its exit arrives.
    let mut opts = AttachOptions::new();
    opts.no_replay();
    let mut s = a.attach("ring", &opts).unwrap();
    assert_eq!(s.attached().unwrap().stdout_from, 101);
    s.signal(libc::SIGKILL).unwrap();
    let (out, err, last) = drain(&mut s);
    assert!(out.is_empty() && err.is_empty());
    assert!(matches!(last, Event::Exited(x) if x.signal == Some(libc::SIGKILL)));
}

#[test]
fn detach_leaves_it_running_and_a_second_host_takes_it_over() {
    let agent = agent();
    let a = connect(&agent);
    let b = connect(&agent);
    let mut s = a
        .exec(sh("echo ready; while read l; do echo \"<$l>\"; done").tag("echo"))
        .unwrap();
    let number = s.number().expect("STARTED carries the number");
    until_stdout(&mut s, "ready");
    assert_eq!(
        s.detach().unwrap(),
        DetachOutcome::Detached { session: number }
    );
    assert!(s.detached().is_some());
    assert!(s.next_event().unwrap().is_none(), "no event after DETACHED");
    assert!(
        matches!(s.write_stdin(b"x"), Err(Error::Detached { session, .. }) if session == number)
    );
    let listed = b.sessions().unwrap();
    assert!(!listed[0].attached && listed[0].state == SessionState::Running);

    // b attaches it, a third takes it from b: b's session ends with
    // Event::Detached (attached_elsewhere).
    let mut opts = AttachOptions::new();
    opts.no_replay();
    let mut sb = b.attach("echo", &opts).unwrap();
    sb.write_stdin(b"b\n").unwrap();
    assert_eq!(until_stdout(&mut sb, "<b>"), b"<b>\n");
    let listed = a.sessions().unwrap();
    assert!(listed[0].attached && listed[0].id.is_none(), "{listed:?}");
    let listed_b = b.sessions().unwrap();
    assert_eq!(listed_b[0].id, Some(sb.id()));

    let c = connect(&agent);
    let mut sc = c.attach(number, &opts).unwrap();
    let (_, _, last) = drain(&mut sb);
    let Event::Detached(d) = last else {
        panic!("{last:?}")
    };
    assert_eq!(
        (d.session, d.reason.as_str()),
        (number, "attached_elsewhere")
    );
    assert!(matches!(sb.wait(), Err(Error::Detached { .. })));
    sc.write_stdin(b"c\n").unwrap();
    assert_eq!(until_stdout(&mut sc, "<c>"), b"<c>\n");
    sc.close_stdin().unwrap();
    assert!(sc.wait().unwrap().success());
}

#[test]
fn detach_of_an_ended_session_returns_its_exit() {
    let agent = agent();
    let a = connect(&agent);
    let mut s = a.exec(sh("exit 4")).unwrap();
    // Let it end before asking.
    thread::sleep(Duration::from_millis(200));
    match s.detach().unwrap() {
        DetachOutcome::Exited(x) => assert_eq!(x.code, Some(4)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn attach_failures_are_typed() {
    let agent = agent();
    let a = connect(&agent);
    let e = a.attach("nobody", &AttachOptions::new()).unwrap_err();
    assert_eq!(
        e.attach_failed_kind(),
        Some(AttachFailedKind::NotFound),
        "{e}"
    );
    let e = a.attach(999u64, &AttachOptions::new()).unwrap_err();
    assert_eq!(e.attach_failed_kind(), Some(AttachFailedKind::NotFound));
    a.exec_detached(sh("sleep 1000").tag("twin")).unwrap();
    a.exec_detached(sh("sleep 1000").tag("twin")).unwrap();
    let e = a.attach("twin", &AttachOptions::new()).unwrap_err();
    assert_eq!(
        e.attach_failed_kind(),
        Some(AttachFailedKind::Ambiguous),
        "{e}"
    );
    assert!(e.to_string().contains("ambiguous"), "{e}");
    assert_eq!(SessionRef::parse("twin"), SessionRef::Tag("twin".into()));
    // The connection is still fine.
    assert_eq!(a.sessions().unwrap().len(), 2);
    // exec refuses a detached EXEC (it could never deliver an event).
    let mut cmd = Command::new("true");
    cmd.detach(true);
    assert!(matches!(a.exec(&cmd), Err(Error::InvalidArgument(_))));
    // exec_detached's failures are EXEC_FAILED.
    let e = a
        .exec_detached(Command::new("no-such-program-x"))
        .unwrap_err();
    assert_eq!(e.exec_failed_kind(), Some(ExecFailedKind::NotFound));
}

#[test]
fn many_sessions_are_listed_over_pages() {
    let agent = agent();
    let a = connect(&agent);
    for i in 0..300 {
        a.exec_detached(sh("sleep 1000").tag(format!("t{i}-{}", "x".repeat(150))))
            .unwrap();
    }
    let list = a.sessions().unwrap();
    assert_eq!(list.len(), 300);
    let mut numbers: Vec<_> = list.iter().map(|r| r.number).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), 300);
}

#[test]
fn deadline_ends_the_session_and_says_so() {
    let agent = agent();
    let a = connect(&agent);
    let mut s = a
        .exec(
            sh("trap '' TERM; sleep 1000")
                .timeout(Duration::from_millis(200))
                .kill_grace(Duration::from_millis(200)),
        )
        .unwrap();
    let status = s.wait().unwrap();
    assert!(status.timed_out, "{status:?}");
    assert_eq!(status.signal, Some(libc::SIGKILL));
    assert!(status.to_string().contains("timed out"));
    // Detached, the deadline is enforced all the same.
    let d = a
        .exec_detached(sh("sleep 1000").timeout(Duration::from_millis(100)))
        .unwrap();
    assert!(wait_until(support::timeout(), || {
        a.sessions()
            .unwrap()
            .iter()
            .any(|r| r.number == d.number && r.has_ended())
    }));
    let r = a.sessions().unwrap();
    assert!(r[0].exit_status().unwrap().timed_out, "{r:?}");
}

#[test]
fn limits_and_tree_signals_are_refused_without_cgroups() {
    let agent = agent();
    let a = connect(&agent);
    assert_ne!(a.ready().cgroups, Some(true));
    for cmd in [
        Command::new("true").memory_max(64 << 20).clone(),
        Command::new("true").pids_max(10).clone(),
        Command::new("true").cpus(0.5).clone(),
    ] {
        let e = a.exec(&cmd).unwrap_err();
        assert_eq!(
            e.exec_failed_kind(),
            Some(ExecFailedKind::InvalidRequest),
            "{e}"
        );
        let Error::ExecFailed(f) = &e else { panic!() };
        assert_eq!(f.stage.as_deref(), Some("cgroup"));
    }
    let mut s = a.exec(sh("sleep 1000")).unwrap();
    s.handle().signal_tree(libc::SIGKILL).unwrap();
    match s.next_event().unwrap().unwrap() {
        Event::Error(e) => assert_eq!(e.error_kind(), Some(ErrorKind::Unsupported)),
        other => panic!("{other:?}"),
    }
    s.signal(libc::SIGKILL).unwrap();
    assert_eq!(s.wait().unwrap().signal, Some(libc::SIGKILL));
}

/// The pids in every session cgroup under `root`.
fn cgroup_pids(root: &Path) -> Vec<i32> {
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|e| {
            std::fs::read_to_string(e.path().join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// A scratch cgroup under this process's own, where one can be made.
struct CgroupRoot(PathBuf);

impl CgroupRoot {
    fn make() -> Option<CgroupRoot> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        let mount = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let dir = mount
            .join(rel.trim_start_matches('/'))
            .join(format!("agentd-client-test-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        Some(CgroupRoot(dir))
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        if let Ok(d) = std::fs::read_dir(&self.0) {
            for e in d.flatten().filter(|e| e.path().is_dir()) {
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                let _ = wait_until(Duration::from_secs(2), || {
                    std::fs::remove_dir(e.path()).is_ok()
                });
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn tree_signal_reaches_a_setsid_daemon_with_cgroups() {
    let Some(root) = CgroupRoot::make() else {
        eprintln!("skipped: no cgroup2 directory can be made here");
        return;
    };
    let agent = agent_with(&["--cgroup-root".into(), root.0.display().to_string()]);
    let a = connect(&agent);
    assert_eq!(a.ready().cgroups, Some(true));
    let mut s = a
        .exec(sh(
            "setsid sh -c 'exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!; exec sleep 1000",
        ))
        .unwrap();
    until_stdout(&mut s, "\n");
    // The session's cgroup holds the leader and the daemon that left its
    // process group (pids as this process sees them, whatever namespace
    // the agent is in).
    let pids = cgroup_pids(&root.0);
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(pids.iter().all(|p| support::proc::alive(*p)));
    s.handle().signal_tree(libc::SIGKILL).unwrap();
    assert_eq!(s.wait().unwrap().signal, Some(libc::SIGKILL));
    assert!(wait_until(support::timeout(), || {
        pids.iter().all(|p| !support::proc::alive(*p))
    }));
}

// ---------------------------------------------------------------------------
// Clock and entropy (never set here: this machine's clock is not ours).

#[test]
fn clock_is_read_and_setting_it_is_refused_on_a_loopback_agent() {
    let agent = agent();
    let a = connect(&agent);
    assert_ne!(a.ready().clock_set, Some(true));
    let c = a.clock().unwrap();
    // Same machine, same clock: the offset is within the round trip (and
    // a generous allowance for a loaded machine's scheduling).
    let slack = c.round_trip.as_nanos() as i64 + 1_000_000_000;
    assert!(c.offset_ns().abs() <= slack, "{c:?}");
    assert!(c.boottime_ns > 0);
    assert_eq!(c.restores, 0);
    for e in [
        a.sync_clock().unwrap_err(),
        a.set_clock(SystemTime::now()).unwrap_err(),
        a.set_clock_ns(0).unwrap_err(),
        a.entropy(&[7u8; 64]).unwrap_err(),
    ] {
        assert_eq!(e.error_kind(), Some(ErrorKind::NotPermitted), "{e}");
    }
    assert!(matches!(a.entropy(&[]), Err(Error::InvalidArgument(_))));
    // Still usable.
    assert!(a.output(Command::new("true")).unwrap().status.success());
}

// ---------------------------------------------------------------------------
// Transports.

#[test]
fn connect_addresses_are_checked() {
    for bad in [
        "",
        "unix:",
        "tcp:127.0.0.1:1",
        "vsock:3",
        "vsock:x:1",
        "hvsock:/x",
    ] {
        let e = Client::connect(bad).unwrap_err();
        assert!(
            matches!(e, Error::Transport(ConnectError::BadAddress(_))),
            "{bad}: {e:?}"
        );
        assert!(!e.to_string().contains('\n'));
    }
    let dir = TempDir::new("cs-absent");
    let missing = dir.join("none.sock");
    let e = Client::connect(&format!("unix:{}", missing.display())).unwrap_err();
    assert!(
        matches!(e, Error::Transport(ConnectError::SocketAbsent(_))),
        "{e:?}"
    );
    assert!(e.to_string().contains("none.sock"));
    let e = Client::connect(&format!("hvsock:{}:1024", missing.display())).unwrap_err();
    assert!(
        matches!(e, Error::Transport(ConnectError::SocketAbsent(_))),
        "{e:?}"
    );
    // A socket file nobody listens on any more.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let e = Client::connect(&format!("unix:{}", stale.display())).unwrap_err();
    assert!(
        matches!(e, Error::Transport(ConnectError::Refused(_))),
        "{e:?}"
    );
    let e = Client::connect(&format!("hvsock:{}:1024", stale.display())).unwrap_err();
    assert!(
        matches!(e, Error::Transport(ConnectError::Refused(_))),
        "{e:?}"
    );
}

#[test]
fn connect_unix_reaches_a_listening_agent() {
    let agent = agent();
    let a = Client::connect(&format!("unix:{}", agent.path.display())).unwrap();
    assert!(a.ready().features.iter().any(|f| f == "sessions"));
    assert_eq!(
        a.output(Command::new("echo").arg("hi")).unwrap().stdout,
        b"hi\n"
    );
}

#[test]
fn vsock_errors_are_typed() {
    // CID 1 is this machine's loopback CID: nothing listens on a port no
    // one uses, or the host has no vsock at all. Either way, a vsock error
    // that names the address (never a hang, never another kind).
    match Client::connect("vsock:1:3999999") {
        Err(Error::Transport(ConnectError::Vsock { cid: 1, port, .. })) => {
            assert_eq!(port, 3_999_999)
        }
        Err(Error::Transport(e @ ConnectError::VsockUnavailable(_))) => {
            assert!(e.to_string().contains("vsock"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let e = Client::connect("vsock:1:3999999").unwrap_err();
    assert!(e.to_string().contains("vsock"), "{e}");
    assert_eq!(
        Target::parse("vsock:3:1024").unwrap(),
        Target::Vsock { cid: 3, port: 1024 }
    );
}

/// How the fake hybrid vsock answers `CONNECT`.
#[derive(Clone, Copy)]
enum Hybrid {
    /// `OK 1073741824`, then proxies to the agent.
    Proxy,
    /// Closes without a word (Firecracker, when nothing listens).
    Close,
    /// Answers something else.
    Garbage,
    /// Says nothing.
    Silent,
}

/// A Firecracker-style hybrid vsock socket: accepts, checks `CONNECT
/// 1024\n`, and answers as told; in `Proxy` mode it then copies both ways
/// between the client and the agent's Unix socket. Returns the socket's
/// path and the lines it received.
fn fake_hybrid(
    dir: &TempDir,
    agent: Option<&Path>,
    mode: Hybrid,
) -> (PathBuf, std::sync::mpsc::Receiver<String>) {
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent = agent.map(Path::to_owned);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let _ = tx.send(line.clone());
            let mut w = conn.try_clone().unwrap();
            match mode {
                Hybrid::Close => drop(conn),
                Hybrid::Garbage => {
                    let _ = w.write_all(b"ERR no such port\n");
                }
                Hybrid::Silent => thread::sleep(Duration::from_secs(5)),
                Hybrid::Proxy => {
                    assert_eq!(line, "CONNECT 1024\n");
                    let up = UnixStream::connect(agent.as_ref().unwrap()).unwrap();
                    w.write_all(b"OK 1073741824\n").unwrap();
                    let mut up_r = up.try_clone().unwrap();
                    let mut down_w = conn.try_clone().unwrap();
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut up_r, &mut down_w);
                        let _ = down_w.shutdown(std::net::Shutdown::Write);
                    });
                    let mut up_w = up;
                    // What the reader buffered past the line, then the rest.
                    let buffered = reader.buffer().to_vec();
                    let _ = up_w.write_all(&buffered);
                    let mut rest = reader.into_inner();
                    thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        loop {
                            match rest.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if up_w.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = up_w.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        }
    });
    (path, rx)
}

#[test]
fn hybrid_vsock_handshake_then_the_protocol() {
    let agent = agent();
    let dir = TempDir::new("cs-hvsock");
    let (path, lines) = fake_hybrid(&dir, Some(&agent.path), Hybrid::Proxy);
    let addr = format!("hvsock:{}:1024", path.display());
    let a = Client::connect(&addr).expect("handshake and READY");
    assert_eq!(lines.recv().unwrap(), "CONNECT 1024\n");
    // The whole protocol through it: exec, sessions, attach from a plain
    // unix: client.
    let out = a.output(sh("echo through; echo err >&2")).unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"through\n"[..], &b"err\n"[..])
    );
    let d = a
        .exec_detached(sh("echo hv; sleep 1000").tag("hv"))
        .unwrap();
    let b = connect(&agent);
    let mut s = b.attach("hv", &AttachOptions::new()).unwrap();
    assert_eq!(s.number(), Some(d.number));
    assert_eq!(until_stdout(&mut s, "hv\n"), b"hv\n");
    s.signal(libc::SIGKILL).unwrap();
    s.wait().unwrap();
    assert!(a.ping().is_ok());
}

#[test]
fn hybrid_vsock_handshake_failures_are_typed() {
    let cases = [
        (Hybrid::Close, "closed"),
        (Hybrid::Garbage, "rejected"),
        (Hybrid::Silent, "timeout"),
    ];
    for (mode, what) in cases {
        let dir = TempDir::new("cs-hvsock-bad");
        let (path, lines) = fake_hybrid(&dir, None, mode);
        let e = Client::builder()
            .handshake_timeout(Duration::from_millis(300))
            .connect(&format!("hvsock:{}:1024", path.display()))
            .unwrap_err();
        assert_eq!(lines.recv().unwrap(), "CONNECT 1024\n");
        let Error::Transport(t) = &e else {
            panic!("{what}: {e:?}")
        };
        match (what, t) {
            ("closed", ConnectError::HandshakeClosed { port: 1024, .. }) => {}
            (
                "rejected",
                ConnectError::HandshakeRejected {
                    port: 1024, reply, ..
                },
            ) => {
                assert_eq!(reply, "ERR no such port")
            }
            (
                "timeout",
                ConnectError::HandshakeTimeout {
                    port: 1024, after, ..
                },
            ) => {
                assert_eq!(*after, Duration::from_millis(300))
            }
            _ => panic!("{what}: {t:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("v.sock") && !msg.contains('\n'), "{msg}");
    }
}

#[test]
fn hybrid_vsock_to_a_plain_agent_socket_is_not_ok() {
    // An agent's own socket answers READY (a frame), not `OK`: the client
    // says it is not a hybrid vsock socket instead of misreading frames.
    let agent = agent();
    let e = Client::builder()
        .handshake_timeout(Duration::from_secs(5))
        .connect(&format!("hvsock:{}:1024", agent.path.display()))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Transport(
                ConnectError::HandshakeRejected { .. }
                    | ConnectError::HandshakeClosed { .. }
                    | ConnectError::HandshakeTimeout { .. }
            )
        ),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------
// The clock set after every READY, against a fake agent that serves it
// (a real one would change this machine's clock).

struct FakeClockAgent {
    sock: UnixStream,
    dec: agentd::codec::Decoder,
}

fn fake_ready(restores: u32, clock_set: bool) -> agentd::messages::Ready {
    agentd::messages::Ready {
        protocol: 1,
        agent: "fake/0".into(),
        pid: 1,
        pid1: true,
        max_payload: 1 << 20,
        stdin_window: 1 << 16,
        max_sessions: 16,
        features: vec!["clock".into()],
        realtime_ns: Some(0),
        restores: Some(restores),
        clock_set: Some(clock_set),
        ..Default::default()
    }
}

impl FakeClockAgent {
    fn send(&mut self, id: u32, msg: &agentd::messages::Message<'_>) {
        self.sock.write_all(&msg.to_bytes(id)).unwrap();
    }

    /// The next frame from the client (kind, id, payload), or None within
    /// `limit`.
    fn recv(&mut self, limit: Duration) -> Option<(u8, u32, Vec<u8>)> {
        let end = std::time::Instant::now() + limit;
        loop {
            if let Some(f) = self.dec.next_frame() {
                let f = f.expect("well-formed frame");
                return Some((f.kind, f.id, f.payload.to_vec()));
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.dec.read_from(&mut self.sock) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Serves CLOCK_GET, CLOCK_SET (checked against the host's clock) and
    /// ENTROPY (32 bytes), as an agent that may set its clock does.
    fn serve_sync(&mut self) {
        use agentd::messages::{ClockMsg, Kind, Message};
        let (kind, id, _) = self.recv(support::timeout()).expect("CLOCK_GET");
        assert_eq!(kind, Kind::ClockGet as u8);
        let now = agentd::client::system_time_ns(SystemTime::now());
        self.send(
            id,
            &Message::Clock(ClockMsg::Clock(agentd::messages::Clock {
                realtime_ns: now - 3_600_000_000_000,
                boottime_ns: 1,
                restores: 0,
            })),
        );
        let (kind, id, payload) = self.recv(support::timeout()).expect("CLOCK_SET");
        assert_eq!(kind, Kind::ClockSet as u8);
        let Message::Clock(ClockMsg::Set(set)) = Message::decode_from_host(agentd::codec::Frame {
            kind,
            id,
            payload: &payload,
        })
        .unwrap() else {
            panic!("not CLOCK_SET")
        };
        let host = agentd::client::system_time_ns(SystemTime::now());
        assert!(
            (set.realtime_ns - host).abs() < 5_000_000_000,
            "{set:?} vs {host}"
        );
        self.send(
            id,
            &Message::Clock(ClockMsg::SetDone(agentd::messages::ClockSetDone {
                old_ns: host - 3_600_000_000_000,
                new_ns: set.realtime_ns,
            })),
        );
        let (kind, id, payload) = self.recv(support::timeout()).expect("ENTROPY");
        assert_eq!(kind, Kind::Entropy as u8);
        assert_eq!(payload.len(), agentd::client::SYNC_ENTROPY_BYTES);
        assert!(payload.iter().any(|&b| b != 0), "random bytes");
        self.send(
            id,
            &Message::Clock(ClockMsg::EntropyDone(agentd::messages::EntropyDone {
                bytes: payload.len() as u32,
            })),
        );
    }
}

fn fake_clock_agent(clock_set: bool, sync: bool) -> (thread::JoinHandle<Client>, FakeClockAgent) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut fake = FakeClockAgent {
        sock: b,
        dec: agentd::codec::Decoder::new(),
    };
    fake.send(
        0,
        &agentd::messages::Message::Ready(fake_ready(0, clock_set)),
    );
    let client = thread::spawn(move || {
        Client::builder()
            .clock_sync(sync)
            .from_stream(a)
            .expect("connects")
    });
    (client, fake)
}

#[test]
fn clock_is_set_and_entropy_fed_after_every_ready_where_served() {
    let (client, mut fake) = fake_clock_agent(true, true);
    // Before the connecting call returns.
    fake.serve_sync();
    let client = client.join().unwrap();
    // A restore: READY again, and the same again, on its own.
    fake.send(0, &agentd::messages::Message::Ready(fake_ready(1, true)));
    fake.serve_sync();
    assert_eq!(client.ready().restores, Some(1));
    // Nothing else was sent.
    assert!(fake.recv(Duration::from_millis(100)).is_none());
}

#[test]
fn clock_sync_is_skipped_when_opted_out_or_not_served() {
    for (clock_set, sync) in [(true, false), (false, true)] {
        let (client, mut fake) = fake_clock_agent(clock_set, sync);
        let client = client.join().unwrap();
        fake.send(
            0,
            &agentd::messages::Message::Ready(fake_ready(1, clock_set)),
        );
        // The first frame the fake sees is the client's own PING.
        let pinger = thread::spawn(move || client.ping().map(|_| ()));
        let (kind, id, payload) = fake.recv(support::timeout()).expect("a frame");
        assert_eq!(
            kind,
            agentd::messages::Kind::Ping as u8,
            "clock_set {clock_set}, sync {sync}"
        );
        fake.send(id, &agentd::messages::Message::Pong(&payload));
        pinger.join().unwrap().unwrap();
    }
}

#[test]
fn an_agent_that_never_answers_the_clock_sync_does_not_block_connecting() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut fake = FakeClockAgent {
        sock: b,
        dec: agentd::codec::Decoder::new(),
    };
    fake.send(0, &agentd::messages::Message::Ready(fake_ready(0, true)));
    let client = Client::builder()
        .ready_timeout(Some(Duration::from_millis(300)))
        .from_stream(a)
        .expect("connects without the sync's answer");
    let (kind, _, _) = fake.recv(support::timeout()).expect("CLOCK_GET");
    assert_eq!(kind, agentd::messages::Kind::ClockGet as u8);
    // The connection works.
    let pinger = thread::spawn(move || client.ping().map(|_| ()));
    let (kind, id, payload) = fake.recv(support::timeout()).expect("PING");
    assert_eq!(kind, agentd::messages::Kind::Ping as u8);
    fake.send(id, &agentd::messages::Message::Pong(&payload));
    pinger.join().unwrap().unwrap();
}
