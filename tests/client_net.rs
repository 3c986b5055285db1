//! The client library's `net` API against the real agent (`agentd
//! --stdio`; the "guest" is this machine, loopback addresses only): TCP
//! and Unix connections, bytes both ways through the windows, half-close
//! each way, typed connect failures, and the forwarder.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use agentd::client::{Client, Error, NetErrorKind, NetTarget as Target};
use support::util::{pseudo_random, TempDir};
use support::AGENTD;

fn agent() -> Client {
    Client::spawn_agent(AGENTD).expect("agentd --stdio starts")
}

/// An echo server on 127.0.0.1: each connection gets back what it sends,
/// and its end of file when it sends its own.
fn echo_server() -> (u16, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    (port, h)
}

#[test]
fn tcp_echo_large_both_ways_and_half_close() {
    let c = agent();
    let (port, _srv) = echo_server();
    let s = c.connect_tcp(&format!("127.0.0.1:{port}")).unwrap();
    assert_eq!(s.peer_addr(), format!("127.0.0.1:{port}"));
    assert!(
        s.local_addr().starts_with("127.0.0.1:"),
        "{}",
        s.local_addr()
    );
    // 8 MiB: many times READY's stdin_window one way and the receive
    // window the other; written on one thread, read on another.
    let data = pseudo_random(8 << 20, 11);
    let writer = {
        let mut w = s.try_clone().unwrap();
        let data = data.clone();
        thread::spawn(move || {
            for chunk in data.chunks(50_001) {
                w.write_all(chunk).unwrap();
            }
            // Half-close: the server sees end of file, answers with its own.
            w.shutdown(Shutdown::Write).unwrap();
            // Writing after shutdown(Write) is refused.
            assert!(w.write(b"x").is_err());
        })
    };
    let mut back = Vec::new();
    (&s).read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(
        back == data,
        "echoed bytes differ ({} vs {})",
        back.len(),
        data.len()
    );
    s.close().unwrap();
    assert!(c.ping().is_ok());
}

#[test]
fn guest_end_of_file_first_then_host_keeps_sending() {
    let c = agent();
    // A server that says hello, shuts down its write side, then reads to
    // end of file and answers with the byte count on a second connection
    // it cannot have... so it just records what it read.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let srv = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"hello").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        *g.lock().unwrap() = buf;
    });
    let mut s = c.connect_tcp(&format!("127.0.0.1:{port}")).unwrap();
    let mut hello = Vec::new();
    s.read_to_end(&mut hello).unwrap();
    assert_eq!(hello, b"hello");
    // The guest's EOF does not stop the host from sending.
    s.write_all(b"after your eof").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    srv.join().unwrap();
    assert_eq!(&*got.lock().unwrap(), b"after your eof");
    s.close().unwrap();
}

#[test]
fn connect_failures_are_typed() {
    let c = agent();
    // refused: a port nobody listens on.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let e = c.connect_tcp(&format!("127.0.0.1:{port}")).unwrap_err();
    assert_eq!(e.net_error_kind(), Some(NetErrorKind::Refused), "{e}");
    assert_eq!(e.errno(), Some(libc::ECONNREFUSED));
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // not_found: no such socket path.
    let d = TempDir::new("net-unix");
    let e = c.net().connect_unix(d.join("none.sock")).unwrap_err();
    assert_eq!(e.net_error_kind(), Some(NetErrorKind::NotFound), "{e}");
    // permission_denied: a socket only root may use, as nobody.
    let path = d.join("root.sock");
    let _l = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = c.net().as_user("nobody").connect_unix(&path).unwrap_err();
    assert_eq!(
        e.net_error_kind(),
        Some(NetErrorKind::PermissionDenied),
        "{e}"
    );
    // bad_user
    let e = c
        .net()
        .as_user("no-such-user-here")
        .connect_unix(&path)
        .unwrap_err();
    assert_eq!(e.net_error_kind(), Some(NetErrorKind::BadUser), "{e}");
    // invalid_request: an address the client cannot parse, and port 0.
    let e = c.connect_tcp("no-port").unwrap_err();
    assert_eq!(
        e.net_error_kind(),
        Some(NetErrorKind::InvalidRequest),
        "{e}"
    );
    let e = c.connect_tcp("127.0.0.1:0").unwrap_err();
    assert_eq!(
        e.net_error_kind(),
        Some(NetErrorKind::InvalidRequest),
        "{e}"
    );
    // The one-line message.
    let text = c
        .connect_tcp(&format!("127.0.0.1:{port}"))
        .unwrap_err()
        .to_string();
    assert!(text.contains("refused") && !text.contains('\n'), "{text}");
}

#[test]
fn connect_times_out_on_a_full_backlog() {
    let c = agent();
    // A listener that never accepts, with the smallest backlog: once its
    // queue is full the kernel drops further SYNs, so a connect hangs.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) again on a socket we own only changes its backlog.
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 0) };
    assert_eq!(rc, 0);
    let port = l.local_addr().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_millis(300),
        ) {
            fillers.push(s);
        }
    }
    let e = c
        .net()
        .timeout(Duration::from_millis(300))
        .connect_tcp(&format!("127.0.0.1:{port}"))
        .unwrap_err();
    assert_eq!(e.net_error_kind(), Some(NetErrorKind::TimedOut), "{e}");
    assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::TimedOut);
}

#[test]
fn unix_socket_connection() {
    let c = agent();
    let d = TempDir::new("net-unix-ok");
    let path = d.join("app.sock");
    let l = UnixListener::bind(&path).unwrap();
    let srv = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        (&s).write_all(line.to_uppercase().as_bytes()).unwrap();
    });
    let mut s = c.net().connect_unix(&path).unwrap();
    assert_eq!(s.peer_addr(), path.to_str().unwrap());
    s.write_all(b"ping over unix\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "PING OVER UNIX\n");
    srv.join().unwrap();
}

#[test]
fn reset_by_the_guest_is_reported_and_reset_by_the_host() {
    let c = agent();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        // Unread data at close makes the kernel send a RST.
        thread::sleep(Duration::from_millis(100));
        drop(s);
        let (s2, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        let r = (&s2).read_to_end(&mut buf);
        r.is_err() || buf.is_empty()
    });
    let s = c.connect_tcp(&format!("127.0.0.1:{port}")).unwrap();
    (&s).write_all(b"unread by the server").unwrap();
    let mut buf = [0u8; 16];
    let r = (&s).read(&mut buf);
    match r {
        Err(e) => {
            let inner = e.into_inner().unwrap().downcast::<Error>().unwrap();
            assert_eq!(inner.net_error_kind(), Some(NetErrorKind::Reset), "{inner}");
        }
        Ok(n) => assert_eq!(n, 0, "end of file at worst"),
    }
    // The host resets its side.
    let s2 = c.connect_tcp(&format!("127.0.0.1:{port}")).unwrap();
    s2.reset().unwrap();
    assert!(srv.join().unwrap());
    assert!(c.ping().is_ok());
}

#[test]
fn forwarder_relays_each_connection() {
    let c = agent();
    let (port, _srv) = echo_server();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let e2 = errors.clone();
    let fwd = c
        .net()
        .forward(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            Target::parse(&format!("127.0.0.1:{port}")).unwrap(),
            move |peer, e| e2.lock().unwrap().push(format!("{peer}: {e}")),
        )
        .unwrap();
    let local = fwd.local_addr();
    let clients: Vec<_> = (0..10)
        .map(|i| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(local).unwrap();
                let data = pseudo_random(200_000 + i * 1000, i as u64);
                let mut w = s.try_clone().unwrap();
                let d2 = data.clone();
                let t = thread::spawn(move || {
                    w.write_all(&d2).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                t.join().unwrap();
                back == data
            })
        })
        .collect();
    for h in clients {
        assert!(h.join().unwrap());
    }
    assert!(
        errors.lock().unwrap().is_empty(),
        "{:?}",
        errors.lock().unwrap()
    );
    // A target that refuses: the local connection is closed and the
    // error reported; the forwarder goes on.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().port();
    drop(l);
    let errors2 = Arc::new(Mutex::new(Vec::new()));
    let e3 = errors2.clone();
    let fwd2 = c
        .net()
        .forward(
            TcpListener::bind("127.0.0.1:0").unwrap(),
            Target::Tcp {
                host: "127.0.0.1".into(),
                port: dead,
            },
            move |_, e| e3.lock().unwrap().push(e.net_error_kind()),
        )
        .unwrap();
    let mut s = TcpStream::connect(fwd2.local_addr()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty());
    assert!(support::wait_until(support::timeout(), || !errors2
        .lock()
        .unwrap()
        .is_empty()));
    assert_eq!(errors2.lock().unwrap()[0], Some(NetErrorKind::Refused));
    fwd2.stop();
    fwd.stop();
}

#[test]
fn targets_parse() {
    assert_eq!(
        Target::parse("80").unwrap(),
        Target::Tcp {
            host: "localhost".into(),
            port: 80
        }
    );
    assert_eq!(
        Target::parse("[::1]:8080").unwrap(),
        Target::Tcp {
            host: "::1".into(),
            port: 8080
        }
    );
    assert_eq!(
        Target::parse("unix:/run/app.sock").unwrap(),
        Target::Unix("/run/app.sock".into())
    );
    assert!(Target::parse("0").is_err());
    assert!(Target::parse("host:99999").is_err());
    assert!(Target::parse("unix:").is_err());
    assert_eq!(Target::parse("[::1]:1").unwrap().to_string(), "[::1]:1");
}
