//! Tests of `agentctl cp`, `agentctl fs` and `agentctl port-forward`,
//! running the real binaries (agentctl starts the `agentd` next to it; the
//! "guest" is this machine, loopback addresses only).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;

use support::util::TempDir;

const AGENTCTL: &str = env!("CARGO_BIN_EXE_agentctl");

fn run(args: &[&str]) -> Output {
    Command::new(AGENTCTL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("agentctl runs")
}

fn run_with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(AGENTCTL)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let t = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    t.join().unwrap();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Exit `code` with exactly one line on stderr.
fn fails(out: &Output, code: i32) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

fn g(p: &Path) -> String {
    format!(":{}", p.display())
}

fn make_src(root: &Path) {
    std::fs::create_dir_all(root.join("sub/empty")).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(root.join("sub/run.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        root.join("sub/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
}

fn same_tree(a: &Path, b: &Path) {
    for rel in ["a.txt", "sub/run.sh"] {
        assert_eq!(
            std::fs::read(a.join(rel)).unwrap(),
            std::fs::read(b.join(rel)).unwrap(),
            "{rel}"
        );
        assert_eq!(
            std::fs::metadata(a.join(rel)).unwrap().mode(),
            std::fs::metadata(b.join(rel)).unwrap().mode(),
            "{rel}"
        );
    }
    assert!(b.join("sub/empty").is_dir());
    assert_eq!(
        std::fs::read_link(b.join("link")).unwrap(),
        Path::new("a.txt")
    );
}

#[test]
fn cp_directories_and_files_both_ways() {
    let d = TempDir::new("cli-cp");
    let src = d.join("src");
    make_src(&src);
    // To a guest path that does not exist: it becomes the copy.
    let up = d.join("guest-app");
    ok(&run(&["cp", src.to_str().unwrap(), &g(&up)]));
    same_tree(&src, &up);
    // To an existing guest directory: the copy goes inside it.
    let into = d.join("into");
    std::fs::create_dir(&into).unwrap();
    ok(&run(&["cp", src.to_str().unwrap(), &g(&into)]));
    same_tree(&src, &into.join("src"));
    // SRC/. copies the contents.
    let contents = d.join("contents");
    std::fs::create_dir(&contents).unwrap();
    ok(&run(&[
        "cp",
        &format!("{}/.", src.display()),
        &g(&contents),
    ]));
    same_tree(&src, &contents);
    // Download to a new local path, and into an existing local directory.
    let back = d.join("back");
    ok(&run(&["cp", &g(&up), back.to_str().unwrap()]));
    same_tree(&src, &back);
    let local_dir = d.join("local-dir");
    std::fs::create_dir(&local_dir).unwrap();
    ok(&run(&["cp", &g(&up), local_dir.to_str().unwrap()]));
    same_tree(&src, &local_dir.join("guest-app"));
    // A single file both ways, its mode kept.
    ok(&run(&[
        "cp",
        src.join("sub/run.sh").to_str().unwrap(),
        &g(&d.join("one.sh")),
    ]));
    assert_eq!(
        std::fs::metadata(d.join("one.sh")).unwrap().mode() & 0o777,
        0o755
    );
    ok(&run(&[
        "cp",
        &g(&d.join("one.sh")),
        d.join("two.sh").to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(d.join("two.sh")).unwrap(), b"#!/bin/sh\n");
    assert_eq!(
        std::fs::metadata(d.join("two.sh")).unwrap().mode() & 0o777,
        0o755
    );
    // Not a terminal: no progress bar on stderr.
    let out = run(&["cp", &g(&up), d.join("quiet").to_str().unwrap()]);
    ok(&out);
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn cp_tar_streams() {
    let d = TempDir::new("cli-cp-tar");
    let src = d.join("src");
    make_src(&src);
    // A guest path as a tar stream on stdout.
    let out = run(&["cp", &g(&src), "-"]);
    ok(&out);
    let mut names: Vec<String> = tar::Archive::new(&out.stdout[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    assert!(names.contains(&"src/a.txt".to_owned()), "{names:?}");
    assert!(
        names.contains(&"src/sub/empty".to_owned()) || names.contains(&"src/sub/empty/".to_owned()),
        "{names:?}"
    );
    // The same stream extracted into a guest directory from stdin.
    let dest = d.join("dest");
    std::fs::create_dir(&dest).unwrap();
    let put = run_with_stdin(&["cp", "-", &g(&dest)], &out.stdout);
    ok(&put);
    same_tree(&src, &dest.join("src"));
    // Garbage on stdin is refused, on one line.
    let bad = run_with_stdin(&["cp", "-", &g(&dest)], &[7u8; 1024]);
    fails(&bad, 1);
}

#[test]
fn cp_errors_and_exit_codes() {
    let d = TempDir::new("cli-cp-err");
    let err = fails(
        &run(&["cp", &g(&d.join("missing")), d.join("x").to_str().unwrap()]),
        1,
    );
    assert!(
        err.contains("not_found") && err.contains("missing"),
        "{err}"
    );
    let err = fails(
        &run(&["cp", d.join("missing").to_str().unwrap(), &g(&d.join("x"))]),
        1,
    );
    assert!(err.contains("missing"), "{err}");
    let err = fails(&run(&["cp", "a", "b"]), 125);
    assert!(err.contains(":PATH"), "{err}");
    fails(&run(&["cp", ":/a", ":/b"]), 125);
    fails(&run(&["cp", "-", "-"]), 125);
    // A guest directory onto a local file.
    std::fs::write(d.join("file"), b"x").unwrap();
    std::fs::create_dir(d.join("dir")).unwrap();
    fails(
        &run(&["cp", &g(&d.join("dir")), d.join("file").to_str().unwrap()]),
        1,
    );
    // As nobody, into a directory only root may write.
    std::fs::write(d.join("f"), b"x").unwrap();
    let err = fails(
        &run(&[
            "cp",
            "-u",
            "nobody",
            d.join("f").to_str().unwrap(),
            &g(&d.join("dir/f")),
        ]),
        1,
    );
    // (The agent reports a refused tar_put entry as `other`, naming it.)
    assert!(err.contains("dir/f"), "{err}");
    assert!(!d.join("dir/f").exists());
    // Usage errors are agentctl's: 125.
    assert_eq!(run(&["cp", "only-one"]).status.code(), Some(125));
}

#[test]
fn fs_subcommands() {
    let d = TempDir::new("cli-fs");
    let deep = d.join("a/b/c");
    fails(&run(&["fs", "mkdir", deep.to_str().unwrap()]), 1);
    ok(&run(&[
        "fs",
        "mkdir",
        "-p",
        "-m",
        "700",
        deep.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::metadata(&deep).unwrap().mode() & 0o777, 0o700);
    let f = d.join("a/file.txt");
    ok(&run_with_stdin(
        &["fs", "put", f.to_str().unwrap()],
        b"line one\n",
    ));
    ok(&run_with_stdin(
        &["fs", "put", "-a", f.to_str().unwrap()],
        b"line two\n",
    ));
    let out = run(&["fs", "cat", f.to_str().unwrap()]);
    ok(&out);
    assert_eq!(text(&out.stdout), "line one\nline two\n");
    ok(&run_with_stdin(
        &[
            "fs",
            "put",
            "--atomic",
            "-m",
            "600",
            d.join("a/atomic").to_str().unwrap(),
        ],
        b"x",
    ));
    assert_eq!(
        std::fs::metadata(d.join("a/atomic")).unwrap().mode() & 0o777,
        0o600
    );

    let out = run(&["fs", "ls", d.join("a").to_str().unwrap()]);
    ok(&out);
    assert_eq!(text(&out.stdout), "atomic\nb\nfile.txt\n");
    let out = run(&["fs", "ls", "-l", d.join("a").to_str().unwrap()]);
    ok(&out);
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].starts_with("-rw-------") && lines[0].ends_with(" atomic"),
        "{lines:?}"
    );
    assert!(
        // (`mkdir -p -m` gives the agent's parents the mode too.)
        lines[1].starts_with('d') && lines[1].ends_with(" b"),
        "{lines:?}"
    );
    assert!(
        lines[2].contains(" 18 ") && lines[2].ends_with(" file.txt"),
        "{lines:?}"
    );

    let out = run(&["fs", "stat", f.to_str().unwrap()]);
    ok(&out);
    let s = text(&out.stdout);
    assert!(
        s.contains("Size: 18") && s.contains("Type: file") && s.contains("0644"),
        "{s}"
    );

    let moved = d.join("a/moved.txt");
    ok(&run(&[
        "fs",
        "mv",
        f.to_str().unwrap(),
        moved.to_str().unwrap(),
    ]));
    assert!(!f.exists() && moved.exists());
    ok(&run(&[
        "fs",
        "mv",
        moved.to_str().unwrap(),
        d.join("a/atomic").to_str().unwrap(),
    ]));
    std::fs::write(&moved, b"again").unwrap();
    let err = fails(
        &run(&[
            "fs",
            "mv",
            "-n",
            moved.to_str().unwrap(),
            d.join("a/atomic").to_str().unwrap(),
        ]),
        1,
    );
    assert!(err.contains("exists"), "{err}");

    let err = fails(&run(&["fs", "rm", d.join("a").to_str().unwrap()]), 1);
    assert!(err.contains("-r"), "{err}");
    ok(&run(&["fs", "rm", moved.to_str().unwrap()]));
    assert!(!moved.exists());
    fails(&run(&["fs", "rm", moved.to_str().unwrap()]), 1);
    ok(&run(&["fs", "rm", "-f", moved.to_str().unwrap()]));
    ok(&run(&["fs", "rm", "-r", d.join("a").to_str().unwrap()]));
    assert!(!d.join("a").exists());

    let err = fails(&run(&["fs", "cat", d.join("nope").to_str().unwrap()]), 1);
    assert!(
        err.contains("not_found") && err.contains("check the path"),
        "{err}"
    );
    std::fs::write(d.join("secret"), b"s").unwrap();
    std::fs::set_permissions(d.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = fails(
        &run(&[
            "fs",
            "cat",
            "-u",
            "nobody",
            d.join("secret").to_str().unwrap(),
        ]),
        1,
    );
    assert!(
        err.contains("permission_denied") && err.contains("-u USER"),
        "{err}"
    );
    let err = fails(
        &run(&[
            "fs",
            "ls",
            "-u",
            "no-such-user-x",
            d.path().to_str().unwrap(),
        ]),
        1,
    );
    assert!(err.contains("bad_user"), "{err}");
    // Usage: a bad mode.
    assert_eq!(
        run(&["fs", "mkdir", "-m", "999", "x"]).status.code(),
        Some(125)
    );
}

#[test]
fn fs_watch_prints_a_line_per_change() {
    let d = TempDir::new("cli-watch");
    let mut child = Command::new(AGENTCTL)
        .args(["fs", "watch", d.path().to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The watch is set once agentctl is running; retry the change until seen.
    let target = d.join("new-file");
    let seen = thread::spawn(move || {
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line == "created new-file" {
                return true;
            }
        }
        false
    });
    for _ in 0..100 {
        if seen.is_finished() {
            break;
        }
        let _ = std::fs::remove_file(&target);
        std::fs::write(&target, b"x").unwrap();
        thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.join().unwrap());
}

fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

#[test]
fn port_forward_relays_connections() {
    let port = echo_server();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().port();
    drop(l);
    let mut child = Command::new(AGENTCTL)
        .args(["port-forward", &format!(":{port}"), &format!(":{dead}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut locals = Vec::new();
    for want in [port, dead] {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let prefix = "Forwarding from 127.0.0.1:";
        assert!(line.starts_with(prefix), "{line}");
        let rest = &line[prefix.len()..];
        let (local, remote) = rest.trim_end().split_once(" -> ").unwrap();
        assert_eq!(remote, want.to_string());
        locals.push(local.parse::<u16>().unwrap());
    }
    // Two connections through the first forward, echoed.
    for i in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", locals[0])).unwrap();
        let msg = format!("hello {i}\n").repeat(10_000);
        let mut w = s.try_clone().unwrap();
        let m2 = msg.clone();
        let t = thread::spawn(move || {
            w.write_all(m2.as_bytes()).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        t.join().unwrap();
        assert!(back == msg);
    }
    // The refused one: the local connection is closed, a line on stderr.
    let mut s = TcpStream::connect(("127.0.0.1", locals[1])).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty());
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(
        line.contains("refused") && line.contains(&dead.to_string()),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn port_forward_errors() {
    // Usage errors: clap's message (and its pointer to --help), 125.
    let out = run(&["port-forward", "x:80"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("local port"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(run(&["port-forward", "8080:0"]).status.code(), Some(125));
    fails(&run(&["port-forward", "--address", "nope", ":80"]), 125);
    // A local port in use.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = busy.local_addr().unwrap().port();
    let err = fails(&run(&["port-forward", &format!("{p}:80")]), 125);
    assert!(
        err.contains("cannot listen") && err.contains("free one"),
        "{err}"
    );
    assert_eq!(run(&["port-forward"]).status.code(), Some(125));
}

#[test]
fn help_everywhere() {
    for args in [
        &["cp", "--help"][..],
        &["fs", "--help"],
        &["fs", "ls", "--help"],
        &["fs", "stat", "--help"],
        &["fs", "rm", "--help"],
        &["fs", "mkdir", "--help"],
        &["fs", "mv", "--help"],
        &["fs", "cat", "--help"],
        &["fs", "put", "--help"],
        &["fs", "watch", "--help"],
        &["port-forward", "--help"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(text(&out.stdout).contains("Usage"), "{args:?}");
    }
}

#[test]
fn cp_draws_a_progress_bar_on_a_terminal() {
    let d = TempDir::new("cli-cp-progress");
    let src = d.join("big");
    std::fs::write(&src, support::util::pseudo_random(4 << 20, 5)).unwrap();
    let (master, slave, _) = support::util::cloexec_pty();
    let mut child = Command::new(AGENTCTL)
        .args(["cp", src.to_str().unwrap(), &g(&d.join("copy"))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    // What the terminal got: the last redraw shows 100% of 4.0 MiB and a rate.
    let mut m = std::fs::File::from(master);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // SAFETY: fcntl on a descriptor we own, setting O_NONBLOCK.
    unsafe {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&m);
        libc::fcntl(
            fd,
            libc::F_SETFL,
            libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK,
        );
    }
    while let Ok(n) = m.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let t = text(&got);
    assert!(
        t.contains("100%") && t.contains("4.0 MiB") && t.contains("/s"),
        "{t:?}"
    );
    assert_eq!(std::fs::read(d.join("copy")).unwrap().len(), 4 << 20);
}

/// A free loopback port (bound, then let go).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The `Forwarding from 127.0.0.1:LOCAL -> REMOTE` lines of a
/// port-forward, one per forward: the local ports.
fn forwarded_ports(out: &mut impl BufRead, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let rest = line
                .strip_prefix("Forwarding from 127.0.0.1:")
                .unwrap_or_else(|| panic!("{line:?}"));
            rest.split_once(" -> ").unwrap().0.parse().unwrap()
        })
        .collect()
}

/// A deterministic byte stream (xorshift64), `len` bytes from `seed`, fed
/// to `f` in 1 MiB chunks.
fn stream_chunks(seed: u64, len: usize, mut f: impl FnMut(&[u8])) {
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        for c in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        f(&buf[..n]);
        left -= n;
    }
}

/// The issue's loopback case for the net extension: an HTTP server started
/// in a session (`python3 -m http.server`, detached) and fetched through
/// `agentctl port-forward` with a real client (Python's urllib); through a
/// second forward of the same command, 100 concurrent connections to an
/// echo server and 1 GiB through one connection, compared byte for byte.
#[test]
fn port_forward_serves_http_from_a_session_and_carries_volume() {
    let agent = support::listen::Listening::start(&support::host::Opts::default());
    let sock = format!("unix:{}", agent.path.display());
    let site = TempDir::new("site");
    std::fs::write(site.join("index.html"), "<h1>served from a session</h1>\n").unwrap();
    let http = free_port();
    let site_dir = site.path().to_str().unwrap().to_owned();
    let out = run(&[
        "--connect",
        &sock,
        "exec",
        "-d",
        "--name",
        "web",
        "--",
        "python3",
        "-m",
        "http.server",
        &http.to_string(),
        "--bind",
        "127.0.0.1",
        "--directory",
        &site_dir,
    ]);
    ok(&out);
    let echo = echo_server();
    let mut pf = Command::new(AGENTCTL)
        .args([
            "--connect",
            &sock,
            "port-forward",
            &format!(":{http}"),
            &format!(":{echo}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let locals = forwarded_ports(&mut BufReader::new(pf.stdout.take().unwrap()), 2);
    // urllib, retried while the server in the session starts.
    let fetch = "import sys, time, urllib.request\n\
                 for _ in range(200):\n\
                 \x20   try:\n\
                 \x20       sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()); break\n\
                 \x20   except OSError:\n\
                 \x20       time.sleep(0.05)\n\
                 else:\n\
                 \x20   sys.exit('no answer')\n";
    let url = format!("http://127.0.0.1:{}/index.html", locals[0]);
    let got = Command::new("python3")
        .args(["-c", fetch, &url])
        .output()
        .unwrap();
    assert!(got.status.success(), "{}", text(&got.stderr));
    assert_eq!(text(&got.stdout), "<h1>served from a session</h1>\n");
    // 100 connections at once, each its own bytes echoed.
    let conns: Vec<_> = (0..100u64)
        .map(|i| {
            let port = locals[1];
            thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let mut sent = Vec::new();
                stream_chunks(i + 1, 64 * 1024, |c| sent.extend_from_slice(c));
                let mut w = s.try_clone().unwrap();
                let data = sent.clone();
                let t = thread::spawn(move || {
                    w.write_all(&data).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                s.read_to_end(&mut back).unwrap();
                t.join().unwrap();
                assert!(back == sent, "connection {i}: {} bytes back", back.len());
            })
        })
        .collect();
    for c in conns {
        c.join().unwrap();
    }
    // 1 GiB through one connection, checked as it comes back.
    const GIB: usize = 1 << 30;
    let s = TcpStream::connect(("127.0.0.1", locals[1])).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        stream_chunks(7, GIB, |c| w.write_all(c).unwrap());
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = BufReader::with_capacity(1 << 20, s);
    let mut got = vec![0u8; 1 << 20];
    let mut total = 0usize;
    stream_chunks(7, GIB, |want| {
        r.read_exact(&mut got[..want.len()]).unwrap();
        assert!(got[..want.len()] == *want, "the bytes differ after {total}");
        total += want.len();
    });
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes too many", rest.len());
    writer.join().unwrap();
    let _ = pf.kill();
    let _ = pf.wait();
    ok(&run(&["--connect", &sock, "kill", "web"]));
}
