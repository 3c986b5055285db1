//! The `net` extension over the wire (docs/PROTOCOL.md, "Extension
//! `net`"): connections from the host to guest sockets, which here are
//! servers of the test on loopback addresses (never an outside address):
//! TCP to IPv4 and IPv6 literals, `localhost` and a name of /etc/hosts,
//! Unix sockets by path (as another user too); every NET_FAILED kind a
//! machine can produce locally; bytes both ways within both windows (the
//! checker holds every NET_RECV to the connection's window); half-close
//! each way; resets and NET_CLOSE; a guest server that never reads
//! stalling only its own connection; 1,000 connections at once; the
//! agent's memory with many connections held; a host that goes away.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentd::messages::{Kind, Message, NetConnect, NetMsg};

use crate::support::agent::*;
use crate::support::host::*;
use crate::support::net::*;
use crate::support::proc::open_fds;
use crate::support::util::{pseudo_random, TempDir};
use crate::support::{timeout, wait_until};

fn with(mut req: NetConnect, f: impl FnOnce(&mut NetConnect)) -> NetConnect {
    f(&mut req);
    req
}

/// Sends `data`, then NET_SHUTDOWN, and takes everything to NET_CLOSED: an
/// echo server's answer is `data`, then end of file, and a clean close.
#[track_caller]
fn echo_round(agent: &mut Agent, id: u32, data: &[u8]) {
    let mut seen = NetSeen::default();
    agent.net_send_all(id, data, &mut seen);
    agent.net_shutdown(id);
    while !agent.net_collect(id, &mut seen, true) {}
    assert_eq!(seen.data.len(), data.len(), "echoed bytes on {id}");
    assert!(seen.data == data, "the echo on {id} differs");
    assert!(seen.eof, "no NET_EOF on {id}");
    assert_eq!(
        seen.send_acked,
        data.len() as u64,
        "NET_SEND_ACK total on {id}"
    );
    let closed = seen.closed.expect("NET_CLOSED");
    assert_eq!(closed.error, None, "a clean close: {closed:?}");
}

/// Raises this process's soft fd limit to at least `n` (up to the hard one).
fn raise_nofile(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    assert!(
        lim.rlim_cur >= n,
        "RLIMIT_NOFILE hard limit {} is below {n}",
        lim.rlim_max
    );
}

/// A name /etc/hosts gives 127.0.0.1 (other than `localhost`, which the
/// agent knows itself), if the machine has one.
fn hosts_name_for_loopback() -> Option<String> {
    let text = std::fs::read_to_string("/etc/hosts").ok()?;
    text.lines().find_map(|l| {
        let l = l.split('#').next()?;
        let mut w = l.split_whitespace();
        if w.next()? != "127.0.0.1" {
            return None;
        }
        w.find(|n| !n.eq_ignore_ascii_case("localhost") && !n.contains(':'))
            .map(str::to_owned)
    })
}

/// A server that reads to end of file, reports what it read, waits for the
/// word, then answers with the count and closes.
fn reads_to_eof_then_answers(tx: mpsc::Sender<Vec<u8>>, go: mpsc::Receiver<()>) -> Server {
    let go = std::sync::Mutex::new(go);
    Server::start(Listener::tcp4(), move |mut s| {
        let got = s.read_to_eof();
        let n = got.len();
        tx.send(got).expect("the test listens");
        go.lock()
            .expect("go")
            .recv_timeout(timeout())
            .expect("the word");
        s.write_all(format!("got {n}").as_bytes())
            .expect("answering");
    })
}

both! {
    /// TCP to 127.0.0.1: NET_CONNECTED with both addresses, 300,000
    /// bytes each way (more than either window), the host's NET_SHUTDOWN
    /// as the echo server's end of file, its end of file as NET_EOF, then
    /// a clean NET_CLOSED. The id is free again at once.
    fn tcp_to_ipv4_echoes(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        assert!(format!("{:?}", agent.ready.get("features")).contains("net"));
        let server = EchoServer::start(Listener::tcp4());
        let port = server.request.port.expect("a port");
        let c = agent.net_connect(1, &server.request).expect("connected");
        assert_eq!(c.peer, format!("127.0.0.1:{port}"));
        assert!(c.local.starts_with("127.0.0.1:") && c.local != c.peer, "{c:?}");
        echo_round(&mut agent, 1, &pseudo_random(300_000, 1));
        agent.net_connect(1, &server.request).expect("the id is free again");
        echo_round(&mut agent, 1, b"again");
        agent.assert_no_errors();
    }

    /// TCP to [::1], written with and without brackets (skipped where the
    /// machine has no IPv6 loopback).
    fn tcp_to_ipv6_echoes(opts: Opts) {
        let Some(l) = Listener::tcp6() else {
            eprintln!("skipped: no IPv6 loopback here");
            return;
        };
        let mut agent = Agent::start_with(opts);
        let port = l.port();
        let _server = EchoServer::start(l);
        for (id, host) in [(1, "::1"), (2, "[::1]")] {
            let c = agent.net_connect(id, &NetConnect::tcp(host, port)).expect("connected");
            assert_eq!(c.peer, format!("[::1]:{port}"));
            assert!(c.local.starts_with("[::1]:"), "{c:?}");
            echo_round(&mut agent, id, b"over IPv6");
        }
    }

    /// `localhost` is 127.0.0.1 first, then ::1: a server on 127.0.0.1 is
    /// reached there; with 127.0.0.1's port refusing and a server on [::1]
    /// the second address is tried and connects.
    fn localhost_tries_ipv4_then_ipv6(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let v4 = EchoServer::start(Listener::tcp4());
        let port = v4.request.port.expect("a port");
        let c = agent.net_connect(1, &NetConnect::tcp("localhost", port)).expect("connected");
        assert_eq!(c.peer, format!("127.0.0.1:{port}"));
        echo_round(&mut agent, 1, b"v4");
        let Some(l6) = Listener::tcp6() else {
            eprintln!("skipped the IPv6 half: no IPv6 loopback here");
            return;
        };
        let port6 = l6.port();
        let Some(_refusing) = refusing_port_at(port6) else {
            eprintln!("skipped the IPv6 half: 127.0.0.1:{port6} is taken");
            return;
        };
        let _v6 = EchoServer::start(l6);
        let c = agent.net_connect(2, &NetConnect::tcp("LocalHost", port6)).expect("connected over ::1");
        assert_eq!(c.peer, format!("[::1]:{port6}"));
        echo_round(&mut agent, 2, b"v6");
    }

    /// A Unix socket by path (NET_CONNECTED's peer is the path, local
    /// empty) and one in the abstract namespace (`@name`).
    fn unix_socket_echoes(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let dir = TempDir::new("net-unix");
        let path = dir.join("echo.sock");
        let server = EchoServer::start(Listener::unix(&path));
        let c = agent.net_connect(1, &server.request).expect("connected");
        assert_eq!(c.peer, path.to_str().expect("UTF-8"));
        assert_eq!(c.local, "");
        echo_round(&mut agent, 1, &pseudo_random(100_000, 2));

        use std::os::linux::net::SocketAddrExt;
        let name = format!("agentd-test-{}-{}", std::process::id(), opts_tag(agent.pidns));
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("an abstract name");
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).expect("binding an abstract name");
        let s = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            s.write_all(b"abstract").expect("write");
        });
        let c = agent.net_connect(2, &NetConnect::unix(format!("@{name}"))).expect("connected");
        assert_eq!(c.peer, format!("@{name}"));
        agent.net_shutdown(2);
        let seen = agent.net_until_closed(2);
        assert_eq!(seen.data, b"abstract");
        assert!(seen.eof && seen.closed.expect("closed").error.is_none());
        s.join().expect("the server");
    }

    /// A name of /etc/hosts is resolved, and connected to, in a worker:
    /// while that worker waits on a listener whose backlog is full, PING
    /// and another connection go on; then `timed_out`. The same name to a
    /// server that accepts connects (skipped without such a name).
    fn a_name_is_resolved_and_connected_off_the_loop(opts: Opts) {
        let Some(name) = hosts_name_for_loopback() else {
            eprintln!("skipped: /etc/hosts has no name for 127.0.0.1 but localhost");
            return;
        };
        let mut agent = Agent::start_with(opts);
        let busy = Listener::tcp4();
        let _held = busy.fill_backlog();
        let req = with(NetConnect::tcp(&name, busy.port()), |r| r.timeout_ms = Some(1500));
        agent.net_send_connect(1, &req);
        agent.ping();
        let echo = EchoServer::start(Listener::tcp4());
        agent.net_connect(2, &echo.request).expect("connected");
        echo_round(&mut agent, 2, b"meanwhile");
        let e = agent.net_reply(1).expect_err("the backlog is full");
        assert_eq!(e.kind, "timed_out", "{e:?}");
        let port = echo.request.port.expect("a port");
        let c = agent.net_connect(3, &NetConnect::tcp(&name, port)).expect("connected by name");
        assert_eq!(c.peer, format!("127.0.0.1:{port}"));
        echo_round(&mut agent, 3, b"by name");
        agent.wait_no_children(timeout());
    }

    /// A closed port is `refused` (ECONNREFUSED), at once or after the
    /// connect's outcome; the agent's own user or another's alike.
    fn a_closed_port_is_refused(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let closed = refusing_port();
        let req = NetConnect::tcp("127.0.0.1", closed.port());
        let e = agent.net_expect_failed(1, &req, "refused");
        assert_eq!(e.errno, Some(libc::ECONNREFUSED), "{e:?}");
        let e = agent.net_expect_failed(2, &with(req, |r| r.user = Some("root".into())), "refused");
        assert_eq!(e.errno, Some(libc::ECONNREFUSED), "{e:?}");
        // `localhost`: both addresses tried, the last one's answer kept
        // (nothing listens on [::1] at that port either).
        let e = agent.net_expect_failed(3, &NetConnect::tcp("localhost", closed.port()), "refused");
        assert_eq!(e.errno, Some(libc::ECONNREFUSED), "{e:?}");
        // The ids are free.
        let echo = EchoServer::start(Listener::tcp4());
        agent.net_connect(1, &echo.request).expect("connected");
        echo_round(&mut agent, 1, b"x");
    }

    /// A listener whose backlog is full drops the SYN: `timed_out`
    /// (ETIMEDOUT) after `timeout_ms`, by the loop's own connect and by a
    /// worker's (`user`); PING is answered meanwhile.
    fn a_full_backlog_times_out(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let busy = Listener::tcp4();
        let _held = busy.fill_backlog();
        let req = with(busy.request(), |r| r.timeout_ms = Some(400));
        agent.net_send_connect(1, &req);
        agent.net_send_connect(2, &with(req, |r| r.user = Some("root".into())));
        agent.ping();
        for id in [1, 2] {
            let e = agent.net_reply(id).expect_err("the backlog is full");
            assert_eq!(e.kind, "timed_out", "{e:?}");
            assert_eq!(e.errno, Some(libc::ETIMEDOUT), "{e:?}");
        }
        agent.wait_no_children(timeout());
        agent.assert_no_errors();
    }

    /// A Unix socket whose listener's backlog is full is a busy server,
    /// not a lack of resources: the connect waits for room until
    /// `timeout_ms` (`timed_out`), and connects once the server accepts.
    fn a_busy_unix_server_is_waited_for(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let dir = TempDir::new("net-busy");
        let l = Listener::unix(&dir.join("busy.sock"));
        let held = l.fill_backlog();
        let req = with(l.request(), |r| r.timeout_ms = Some(300));
        let e = agent.net_expect_failed(1, &req, "timed_out");
        assert_eq!(e.errno, Some(libc::ETIMEDOUT), "{e:?}");
        agent.net_send_connect(2, &l.request());
        agent.ping();
        // Room in the backlog: the agent's connection gets in.
        let _first = l.accept_within();
        let c = agent.net_reply(2).expect("connected once there was room");
        assert_eq!(c.peer, dir.join("busy.sock").to_str().expect("UTF-8"));
        let mut s = l.accept_within();
        agent.net_send(2, b"hello");
        agent.net_shutdown(2);
        assert_eq!(s.read_to_eof(), b"hello");
        drop(s);
        let seen = agent.net_until_closed(2);
        assert!(seen.eof && seen.closed.expect("closed").error.is_none());
        drop(held);
        agent.wait_no_children(timeout());
    }

    /// No socket at the path, or no directory: `not_found` (ENOENT); a
    /// file that is not a socket: `refused` (ECONNREFUSED, as connect(2)
    /// says), as the agent's user and as another.
    fn a_missing_socket_path_is_not_found(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let dir = TempDir::new("net-missing");
        let missing = dir.join("nothing.sock");
        let req = NetConnect::unix(missing.to_str().expect("UTF-8"));
        let e = agent.net_expect_failed(1, &req, "not_found");
        assert_eq!(e.errno, Some(libc::ENOENT), "{e:?}");
        assert!(e.message.contains("nothing.sock"), "the message names the path: {e:?}");
        let e = agent.net_expect_failed(2, &with(req, |r| r.user = Some("nobody".into())), "not_found");
        assert_eq!(e.errno, Some(libc::ENOENT), "{e:?}");
        let deeper = dir.join("no-dir/x.sock");
        agent.net_expect_failed(3, &NetConnect::unix(deeper.to_str().expect("UTF-8")), "not_found");
        let file = dir.join("plain");
        std::fs::write(&file, b"not a socket").expect("a file");
        let e = agent.net_expect_failed(4, &NetConnect::unix(file.to_str().expect("UTF-8")), "refused");
        assert_eq!(e.errno, Some(libc::ECONNREFUSED), "{e:?}");
    }

    /// `user` connects with that user's credentials: nobody is refused a
    /// socket in a 0700 directory (`permission_denied`, EACCES) that the
    /// agent's user reaches; a socket nobody may use is connected as
    /// nobody (the server's SO_PEERCRED says 65534) and carries bytes; an
    /// unknown user is `bad_user`.
    fn a_unix_socket_as_another_user(opts: Opts) {
        use std::os::unix::fs::PermissionsExt;
        let mut agent = Agent::start_with(opts);
        let Some((nobody, nobody_gid)) = crate::support::util::passwd_entry("nobody") else {
            eprintln!("skipped: no user nobody");
            return;
        };
        let dir = TempDir::new("net-user");
        let private = dir.join("private");
        std::fs::create_dir(&private).expect("a directory");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let echo = EchoServer::start(Listener::unix(&private.join("s.sock")));
        let as_nobody = with(echo.request.clone(), |r| r.user = Some("nobody".into()));
        let e = agent.net_expect_failed(1, &as_nobody, "permission_denied");
        assert_eq!(e.errno, Some(libc::EACCES), "{e:?}");
        agent.net_connect(2, &echo.request).expect("the agent's user gets in");
        echo_round(&mut agent, 2, b"as root");

        let open_path = dir.join("open.sock");
        let l = Listener::unix(&open_path);
        std::fs::set_permissions(&open_path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let (tx, rx) = mpsc::channel();
        let _server = Server::start(l, move |mut s| {
            tx.send(s.peer_uid()).expect("the test listens");
            let got = s.read_to_eof();
            s.write_all(&got).expect("echo");
        });
        let req = with(NetConnect::unix(open_path.to_str().expect("UTF-8")), |r| {
            r.user = Some("nobody".into())
        });
        agent.net_connect(3, &req).expect("nobody may use it");
        assert_eq!(rx.recv_timeout(timeout()).expect("the server's word"), nobody);
        echo_round(&mut agent, 3, &pseudo_random(70_000, 3));

        // `uid:gid`, as EXEC's `user` takes it.
        let by_number = with(req.clone(), |r| r.user = Some(format!("{nobody}:{nobody_gid}")));
        agent.net_connect(5, &by_number).expect("65534:65534 may use it");
        assert_eq!(rx.recv_timeout(timeout()).expect("the server's word"), nobody);
        echo_round(&mut agent, 5, b"by number");

        let bad = with(req, |r| r.user = Some("no-such-user-agentd".into()));
        agent.net_expect_failed(4, &bad, "bad_user");
        agent.wait_no_children(timeout());
    }

    /// What NET_CONNECT must carry: `host` and `port`, or `path`; a port
    /// and a window that are not 0; a non-zero id not in use (by a
    /// connection or a session). Frames for ids with no connection are
    /// ERROR `unknown_session`.
    fn bad_requests_are_refused(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let neither = NetConnect::default();
        let both = with(NetConnect::tcp("127.0.0.1", 80), |r| r.path = Some("/x".into()));
        let host_only = with(NetConnect::default(), |r| r.host = Some("127.0.0.1".into()));
        let port0 = NetConnect::tcp("127.0.0.1", 0);
        let empty = NetConnect::tcp("", 80);
        let window0 = with(NetConnect::tcp("127.0.0.1", 80), |r| r.window = Some(0));
        let long = NetConnect::unix(format!("/tmp/{}", "x".repeat(120)));
        let timeout0 = with(NetConnect::unix("/x"), |r| r.timeout_ms = Some(0));
        // A port inside `host`, or brackets around a name: never sent to DNS.
        let with_port = NetConnect::tcp("127.0.0.1:80", 80);
        let bracketed = NetConnect::tcp("[localhost]", 80);
        let reqs = [neither, both, host_only, port0, empty, window0, long, timeout0, with_port, bracketed];
        for (i, req) in reqs.iter().enumerate() {
            agent.net_expect_failed(10 + i as u32, req, "invalid_request");
        }
        agent.net_expect_failed(0, &NetConnect::tcp("127.0.0.1", 80), "invalid_request");

        let echo = EchoServer::start(Listener::tcp4());
        agent.net_connect(1, &echo.request).expect("connected");
        agent.net_expect_failed(1, &echo.request, "duplicate_id");
        agent.exec(2, &cmd("cat", &[]));
        agent.net_expect_failed(2, &echo.request, "duplicate_id");
        // And a connection's id is not free for a session.
        agent.exec_fail(1, &cmd("true", &[]), "duplicate_id");
        // The connection on 1 is untouched by the refusal.
        echo_round(&mut agent, 1, b"still fine");
        agent.send_stdin_close(2);
        agent.collect(2).assert_success();

        agent.net_send(99, b"x");
        agent.expect_error_kind(99, "unknown_session", Some(NET_SEND));
        // An ack may be in flight when a connection ends: dropped quietly.
        agent.net_ack(99, 1);
        agent.assert_no_errors();
        agent.net_shutdown(99);
        agent.expect_error_kind(99, "unknown_session", Some(Kind::NetShutdown as u8));
        agent.net_close(99, false);
        agent.expect_error_kind(99, "unknown_session", Some(NET_CLOSE));
        agent.ping();
    }

    /// The agent → host window: with `window` 4096 and a server that sends
    /// 200,000 bytes, exactly 4096 come before an ack (the checker holds
    /// every NET_RECV to the window); acks let the rest through, in order.
    fn the_receive_window_holds(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let data = pseudo_random(200_000, 4);
        let sent = data.clone();
        let server = Server::start(Listener::tcp4(), move |mut s| {
            s.write_all(&sent).expect("sending");
            s.shutdown(Shutdown::Write).expect("shutdown");
            let _ = s.read_to_eof();
        });
        let req = with(server.request.clone(), |r| r.window = Some(4096));
        agent.net_connect(1, &req).expect("connected");
        let mut seen = NetSeen::default();
        while seen.data.len() < 4096 {
            assert!(!agent.net_collect(1, &mut seen, false), "ended early");
        }
        // Nothing more comes without an ack, and only this connection waits.
        let echo = EchoServer::start(Listener::tcp4());
        agent.net_connect(2, &echo.request).expect("connected");
        echo_round(&mut agent, 2, &pseudo_random(100_000, 10));
        agent.drain_into_stash(Duration::from_millis(300));
        assert!(agent.take_stashed(|f| f.id == 1 && f.kind == NET_RECV).is_empty(), "NET_RECV over the window");
        agent.net_ack(1, 1000);
        while seen.data.len() < 5096 {
            assert!(!agent.net_collect(1, &mut seen, false), "ended early");
        }
        agent.net_ack(1, 3096);
        while !seen.eof {
            assert!(!agent.net_collect(1, &mut seen, true), "ended early");
        }
        assert!(seen.data == data, "the bytes differ");
        agent.net_shutdown(1);
        let rest = agent.net_until_closed(1);
        assert!(rest.data.is_empty() && rest.closed.expect("closed").error.is_none());
    }

    /// The host → agent window is READY's `stdin_window`: bytes sent while
    /// the connect is under way wait (unacknowledged); one byte beyond the
    /// window is ERROR `window_exceeded` and dropped; once connected,
    /// everything else reaches the server in order and is acknowledged.
    fn the_send_window_holds(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let window = agent.stdin_window() as usize;
        let dir = TempDir::new("net-window");
        let l = Listener::unix(&dir.join("w.sock"));
        let held = l.fill_backlog();
        agent.net_send_connect(1, &l.request());
        let data = pseudo_random(window, 5);
        for chunk in data.chunks(64 * 1024) {
            agent.net_send(1, chunk);
        }
        agent.net_send(1, b"!");
        let e = agent.expect_error_kind(1, "window_exceeded", Some(NET_SEND));
        assert!(e.message.contains(&window.to_string()), "{e:?}");
        assert!(agent.take_stashed(|f| f.id == 1 && f.kind == NET_SEND_ACK).is_empty(), "acked before connected");
        drop(l.accept_within());
        drop(held);
        agent.net_reply(1).expect("connected");
        let mut s = l.accept_within();
        agent.net_shutdown(1);
        let got = s.read_to_eof();
        assert_eq!(got.len(), window);
        assert!(got == data, "the bytes differ");
        drop(s);
        let seen = agent.net_until_closed(1);
        assert_eq!(seen.send_acked, window as u64);
        assert!(seen.eof && seen.closed.expect("closed").error.is_none());
    }

    /// The host shuts down first: the server reads end of file (while the
    /// connection stays open: NET_SEND now is ERROR `stdin_closed`), then
    /// answers; its answer, NET_EOF and a clean NET_CLOSED follow.
    fn host_half_close_first(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let (tx, rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        let server = reads_to_eof_then_answers(tx, go_rx);
        agent.net_connect(1, &server.request).expect("connected");
        let mut seen = NetSeen::default();
        agent.net_send_all(1, &pseudo_random(500_000, 6), &mut seen);
        agent.net_shutdown(1);
        let got = rx.recv_timeout(timeout()).expect("the server read to end of file");
        assert!(got == pseudo_random(500_000, 6), "the bytes differ");
        agent.net_send(1, b"late");
        agent.expect_error_kind(1, "stdin_closed", Some(NET_SEND));
        agent.net_shutdown(1);
        agent.expect_error_kind(1, "stdin_closed", Some(Kind::NetShutdown as u8));
        go_tx.send(()).expect("the server waits");
        while !agent.net_collect(1, &mut seen, true) {}
        assert_eq!(seen.data, b"got 500000");
        assert!(seen.eof);
        assert_eq!(seen.send_acked, 500_000);
        assert_eq!(seen.closed.expect("closed").error, None);
    }

    /// The guest shuts down first: NET_EOF after its bytes, and the host
    /// may go on sending; the server reads those bytes and the host's end
    /// of file; then a clean NET_CLOSED.
    fn guest_half_close_first(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let (tx, rx) = mpsc::channel();
        let server = Server::start(Listener::tcp4(), move |mut s| {
            s.write_all(b"hello").expect("write");
            s.shutdown(Shutdown::Write).expect("shutdown");
            tx.send(s.read_to_eof()).expect("the test listens");
        });
        agent.net_connect(1, &server.request).expect("connected");
        let mut seen = NetSeen::default();
        while !seen.eof {
            assert!(!agent.net_collect(1, &mut seen, true), "ended early");
        }
        assert_eq!(seen.data, b"hello");
        let more = pseudo_random(300_000, 7);
        agent.net_send_all(1, &more, &mut seen);
        agent.net_shutdown(1);
        while !agent.net_collect(1, &mut seen, true) {}
        assert!(rx.recv_timeout(timeout()).expect("the server's bytes") == more);
        assert_eq!(seen.send_acked, 300_000);
        assert_eq!(seen.closed.expect("closed").error, None);
    }

    /// NET_SEND and NET_SHUTDOWN right behind NET_CONNECT wait for the
    /// connection, then go through in order.
    fn bytes_behind_net_connect_wait_for_it(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let echo = EchoServer::start(Listener::tcp4());
        let data = pseudo_random(200_000, 11);
        agent.net_send_connect(1, &echo.request);
        for c in data.chunks(50_000) {
            agent.net_send(1, c);
        }
        agent.net_shutdown(1);
        agent.net_reply(1).expect("connected");
        let seen = agent.net_until_closed(1);
        assert!(seen.data == data, "the echo differs");
        assert!(seen.eof && seen.closed.expect("closed").error.is_none());
        assert_eq!(seen.send_acked, 200_000);
    }

    /// A guest that has closed its socket for good (not just shut it down)
    /// gets one more NET_SEND: its RST ends the connection with NET_CLOSED
    /// `reset` at once, not at the host's next NET_SEND.
    fn bytes_to_a_closed_guest_are_a_reset(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let server = Server::start(Listener::tcp4(), |mut s| {
            s.write_all(b"bye").expect("write");
        });
        agent.net_connect(1, &server.request).expect("connected");
        let mut seen = NetSeen::default();
        while !seen.eof {
            assert!(!agent.net_collect(1, &mut seen, true), "ended early");
        }
        assert_eq!(seen.data, b"bye");
        agent.net_send(1, b"anyone there?");
        while !agent.net_collect(1, &mut seen, true) {}
        let closed = seen.closed.expect("closed");
        assert_eq!(closed.error.as_deref(), Some("reset"), "{closed:?}");
        assert!(matches!(closed.errno, Some(libc::EPIPE | libc::ECONNRESET)), "{closed:?}");
    }

    /// SHUTDOWN ends every connection (NET_CLOSED `other`), and the
    /// servers read end of file; then SHUTDOWN_DONE.
    fn a_shutdown_closes_every_connection(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let echo = EchoServer::start(Listener::tcp4());
        for id in 1..=3 {
            agent.net_connect(id, &echo.request).expect("connected");
        }
        assert!(wait_until(timeout(), || echo.open.load(std::sync::atomic::Ordering::Relaxed) == 3));
        agent.send_shutdown(200);
        for id in 1..=3 {
            let seen = agent.net_until_closed(id);
            assert_eq!(seen.closed.expect("closed").error.as_deref(), Some("other"));
        }
        agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
        assert!(wait_until(timeout(), || echo.open.load(std::sync::atomic::Ordering::Relaxed) == 0));
    }

    /// A guest that closes with SO_LINGER 0 resets the connection:
    /// NET_CLOSED `reset` (ECONNRESET), the id's one final frame.
    fn a_guest_reset_is_reported(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let server = Server::start(Listener::tcp4(), |mut s| {
            let mut b = [0u8; 1];
            s.read_exact(&mut b).expect("a byte");
            s.reset();
        });
        agent.net_connect(1, &server.request).expect("connected");
        agent.net_send(1, b"x");
        let seen = agent.net_until_closed(1);
        let closed = seen.closed.expect("closed");
        assert_eq!(closed.error.as_deref(), Some("reset"), "{closed:?}");
        assert_eq!(closed.errno, Some(libc::ECONNRESET), "{closed:?}");
        assert!(closed.message.is_some_and(|m| !m.is_empty()));
        agent.net_close(1, false);
        agent.expect_error_kind(1, "unknown_session", Some(NET_CLOSE));
    }

    /// NET_CLOSE: at once NET_CLOSED (clean) and the server reads end of
    /// file; with `reset`, the server's read fails with ECONNRESET; while
    /// connecting (by the loop or by a worker) NET_CLOSED too, and nothing
    /// after it when the timeout passes. A second NET_CLOSE is ERROR
    /// `unknown_session`, never a second final frame.
    fn host_close_and_reset(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let (tx, rx) = mpsc::channel();
        let server = Server::start(Listener::tcp4(), move |mut s| {
            s.set_read_timeout(Some(timeout()));
            let mut v = Vec::new();
            let r = s.read_to_end(&mut v).map_err(|e| e.raw_os_error());
            tx.send((v, r.err().flatten())).expect("the test listens");
        });
        for (id, reset) in [(1, false), (2, true)] {
            agent.net_connect(id, &server.request).expect("connected");
            agent.net_send(id, b"before");
            agent.recv_where(|f| f.id == id && f.kind == NET_SEND_ACK, "NET_SEND_ACK");
            agent.net_close(id, reset);
            let seen = agent.net_until_closed(id);
            assert_eq!(seen.closed.expect("closed").error, None);
            let (got, err) = rx.recv_timeout(timeout()).expect("the server's word");
            assert_eq!(got, b"before");
            let want = if reset { Some(libc::ECONNRESET) } else { None };
            assert_eq!(err, want, "reset {reset}");
            agent.net_close(id, false);
            agent.expect_error_kind(id, "unknown_session", Some(NET_CLOSE));
        }
        let busy = Listener::tcp4();
        let _held = busy.fill_backlog();
        let req = with(busy.request(), |r| r.timeout_ms = Some(300));
        agent.net_send_connect(3, &req);
        agent.net_send_connect(4, &with(req, |r| r.user = Some("root".into())));
        agent.ping();
        for id in [3, 4] {
            agent.net_close(id, false);
            let seen = agent.net_until_closed(id);
            assert!(seen.failed.is_none() && seen.closed.expect("closed").error.is_none());
        }
        agent.drain_into_stash(Duration::from_millis(600));
        assert!(agent.take_stashed(|f| is_net(f.kind)).is_empty(), "frames after NET_CLOSED");
        agent.wait_no_children(timeout());
    }

    /// A guest server that accepts and never reads stalls only its own
    /// connection: with its window used up and the socket full, PING is
    /// answered and another connection carries 1 MB each way; once the
    /// server reads, every byte arrives in order and is acknowledged.
    fn a_server_that_never_reads_stalls_only_its_connection(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (tx, rx) = mpsc::channel();
        let go_rx = std::sync::Mutex::new(go_rx);
        let stuck = Server::start(Listener::tcp4(), move |mut s| {
            go_rx.lock().expect("go").recv_timeout(timeout() * 2).expect("the word");
            tx.send(s.read_to_eof()).expect("the test listens");
        });
        agent.net_connect(1, &stuck.request).expect("connected");
        let window = u64::from(agent.stdin_window());
        let chunk = pseudo_random(64 * 1024, 8);
        let (mut sent, mut acked) = (0u64, 0u64);
        // Send while the agent acknowledges; stop once the window is used
        // up and no ack has come for a while (the socket is full).
        let mut quiet_since = Instant::now();
        while sent < 64 << 20 {
            if sent - acked + chunk.len() as u64 <= window {
                agent.net_send(1, &chunk);
                sent += chunk.len() as u64;
                continue;
            }
            if let Some(f) = agent.recv_where_within(&|f| f.id == 1 && f.kind == NET_SEND_ACK, Duration::from_millis(100)) {
                acked += ack_bytes(&f);
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(500) {
                // Quiet for a while: after a PING (the agent has handled
                // every NET_SEND) still no ack means the socket is full.
                agent.ping();
                let late: u64 = agent.take_stashed(|f| f.id == 1 && f.kind == NET_SEND_ACK).iter().map(ack_bytes).sum();
                if late == 0 {
                    break;
                }
                acked += late;
                quiet_since = Instant::now();
            }
        }
        assert!(sent < 64 << 20, "64 MiB went into a socket nobody reads");
        agent.ping();
        let echo = EchoServer::start(Listener::tcp4());
        agent.net_connect(2, &echo.request).expect("connected");
        echo_round(&mut agent, 2, &pseudo_random(1_000_000, 9));
        acked += agent.take_stashed(|f| f.id == 1 && f.kind == NET_SEND_ACK).iter().map(ack_bytes).sum::<u64>();
        assert!(acked < sent, "everything was taken by a server that does not read");
        go_tx.send(()).expect("the server waits");
        agent.net_shutdown(1);
        let seen = agent.net_until_closed(1);
        assert_eq!(acked + seen.send_acked, sent);
        let got = rx.recv_timeout(timeout()).expect("the server's bytes");
        assert_eq!(got.len() as u64, sent);
        assert!(got.chunks(chunk.len()).all(|c| c == chunk), "the bytes differ");
    }

    /// 1,000 connections at once (the agent holds an fd for each), each
    /// with its own bytes echoed, each ending in one clean NET_CLOSED; the
    /// fds go with them.
    fn a_thousand_connections_at_once(opts: Opts) {
        raise_nofile(4096);
        let mut agent = Agent::start_with(opts);
        let before = agent.fd_count();
        let l = Listener::tcp4();
        l.backlog(2048);
        let echo = EchoServer::start(l);
        const N: u32 = 1000;
        for id in 1..=N {
            agent.net_send_connect(id, &echo.request);
        }
        for id in 1..=N {
            agent.net_reply(id).unwrap_or_else(|e| panic!("connection {id}: {e:?}"));
        }
        assert!(agent.fd_count() >= before + N as usize, "{} fds for {N} connections", agent.fd_count());
        assert!(wait_until(timeout(), || echo.open.load(std::sync::atomic::Ordering::Relaxed) == N as usize));
        let payload = |id: u32| format!("connection {id} ").repeat(50).into_bytes();
        for id in 1..=N {
            agent.net_send(id, &payload(id));
            agent.net_shutdown(id);
        }
        for id in 1..=N {
            let seen = agent.net_until_closed(id);
            assert!(seen.data == payload(id), "connection {id} got {} bytes", seen.data.len());
            assert!(seen.eof && seen.closed.expect("closed").error.is_none(), "connection {id}");
        }
        assert!(wait_until(timeout(), || agent.fd_count() <= before), "{} fds left, {before} before", agent.fd_count());
        agent.assert_no_errors();
    }

    /// 200 connections whose servers send without pause while the host
    /// reads nothing at all: the agent stops reading them (its queue to the
    /// host is bounded), so its memory stays far below what they send.
    /// Then the host reads again and closes them all.
    fn memory_stays_bounded_with_connections_held(opts: Opts) {
        let mut agent = Agent::start_with(opts);
        let pid = agent.host_pid;
        let status = |f: &str| crate::support::proc::status_number(pid, f).unwrap_or(0);
        let before = status("VmRSS");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let l = Listener::tcp4();
        l.backlog(512);
        let server = Server::start(l, move |mut s| {
            let block = vec![7u8; 64 * 1024];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if s.write_all(&block).is_err() {
                    return;
                }
            }
        });
        const N: u32 = 200;
        for id in 1..=N {
            agent.net_send_connect(id, &server.request);
        }
        for id in 1..=N {
            agent.net_reply(id).unwrap_or_else(|e| panic!("connection {id}: {e:?}"));
        }
        agent.pause_reading();
        std::thread::sleep(Duration::from_secs(1));
        let peak = status("VmHWM");
        agent.resume_reading();
        eprintln!("agent RSS {before} KiB at start, peak {peak} KiB with {N} connections held");
        // Each connection may hold its window in flight at most; in
        // practice the link's queue bound holds it far lower.
        let bound = before + 64 * 1024;
        assert!(peak <= bound, "agent peak RSS {peak} KiB with {N} connections held (before {before} KiB)");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for id in 1..=N {
            agent.net_close(id, true);
        }
        // Take frames as they come (what is in flight is dropped here, not
        // stashed) until every connection has its NET_CLOSED.
        let mut closed = 0;
        while closed < N {
            let f = agent.recv();
            assert!(is_net(f.kind), "unexpected {:#x}", f.kind);
            if f.kind == NET_CLOSED {
                closed += 1;
            }
        }
        agent.assert_no_errors();
    }

    /// With a low fd limit, a connection that finds no fd is `resource`
    /// (EMFILE); PING goes on, and one closed makes room for the next.
    fn out_of_fds_is_resource(opts: Opts) {
        let mut agent = Agent::start_with(Opts { nofile: Some(40), ..opts });
        let echo = EchoServer::start(Listener::tcp4());
        let mut open = Vec::new();
        let failed = (1..=40u32).find_map(|id| match agent.net_connect(id, &echo.request) {
            Ok(_) => {
                open.push(id);
                None
            }
            Err(e) => Some((id, e)),
        });
        let (id, e) = failed.expect("40 fds cannot hold 40 connections and the agent");
        assert_eq!(e.kind, "resource", "{e:?}");
        assert_eq!(e.errno, Some(libc::EMFILE), "{e:?}");
        agent.ping();
        agent.net_close(open[0], false);
        agent.net_until_closed(open[0]);
        agent.net_connect(id, &echo.request).expect("room again");
        echo_round(&mut agent, id, b"fits");
    }
}

/// What a process's fds are (`socket:[inode]`, `pipe:[inode]`,
/// `anon_inode:[eventpoll]`, a path), sorted.
fn fd_targets(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = open_fds(pid)
        .into_iter()
        .filter_map(|fd| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every item of `a` is in `b`, as many times at least.
fn is_sub_multiset(a: &[String], b: &[String]) -> bool {
    let mut b = b.to_vec();
    a.iter().all(|x| match b.iter().position(|y| y == x) {
        Some(i) => {
            b.swap_remove(i);
            true
        }
        None => false,
    })
}

fn opts_tag(pidns: bool) -> &'static str {
    if pidns {
        "pidns"
    } else {
        "stdio"
    }
}

both! {
    /// A host that goes away (the agent listening) takes its connections
    /// with it: open ones, one connecting in the loop and one in a worker.
    /// The servers see end of file on all of them, and the agent is back
    /// to the fds it had (the host's own gone too) and has no children.
    fn a_host_gone_closes_its_connections(opts: Opts) {
        use crate::support::listen::Listening;
        let agent = Listening::start(&opts);
        let pid = agent.process.host_pid;
        // What the fds are (socket:[inode], pipe:[inode], ...), not their
        // numbers: a probe connection of the harness may still be closing.
        let baseline = fd_targets(pid);
        let mut host = agent.connect();
        let echo = EchoServer::start(Listener::tcp4());
        let busy = Listener::tcp4();
        let _held = busy.fill_backlog();
        const N: u32 = 100;
        for id in 1..=N {
            host.conn.send(&Message::Net(NetMsg::Connect(Box::new(echo.request.clone()))), id);
        }
        for id in 1..=N {
            host.wait(Kind::NetConnected, id);
        }
        host.conn.send(&Message::Net(NetMsg::Send(b"data")), 1);
        host.wait(Kind::NetSendAck, 1);
        host.conn.send(&Message::Net(NetMsg::Connect(Box::new(busy.request()))), N + 1);
        let by_worker = with(busy.request(), |r| r.user = Some("root".into()));
        host.conn.send(&Message::Net(NetMsg::Connect(Box::new(by_worker))), N + 2);
        let ping = Message::Ping(b"p");
        host.conn.send(&ping, 0);
        host.wait(Kind::Pong, 0);
        assert!(wait_until(timeout(), || echo.open.load(std::sync::atomic::Ordering::Relaxed) == N as usize));
        assert!(!agent.process.children().is_empty(), "a connector worker");
        host.disconnect();
        assert!(
            wait_until(timeout(), || echo.open.load(std::sync::atomic::Ordering::Relaxed) == 0),
            "{} connections still open on the guest side",
            echo.open.load(std::sync::atomic::Ordering::Relaxed)
        );
        assert!(
            wait_until(timeout(), || is_sub_multiset(&fd_targets(pid), &baseline)),
            "agent fds {:?}, before the host {baseline:?}",
            fd_targets(pid)
        );
        agent.process.wait_no_children(timeout());
        // The agent serves the next host.
        let mut next = agent.connect();
        next.conn.send(&Message::Net(NetMsg::Connect(Box::new(echo.request.clone()))), 1);
        next.wait(Kind::NetConnected, 1);
    }
}
