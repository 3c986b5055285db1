//! Tests of `agentctl`, running the real binaries: agentctl starts the
//! `agentd` next to it (the embedded default) unless a test says otherwise.

mod support;

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, LocalFlags, Termios};
use support::host::{AgentProcess, Opts};
use support::util::{cloexec_pty, mkfifo, pseudo_random, set_winsize, TempDir};
use support::AGENTD;

const AGENTCTL: &str = env!("CARGO_BIN_EXE_agentctl");

fn agentctl(args: &[&str]) -> Command {
    let mut cmd = Command::new(AGENTCTL);
    cmd.args(args);
    cmd
}

/// Runs agentctl with no stdin and returns its output.
fn run(args: &[&str]) -> Output {
    agentctl(args)
        .stdin(Stdio::null())
        .output()
        .expect("agentctl runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------
// exec basics and exit codes.

#[test]
fn echo() {
    let out = run(&["exec", "echo", "hello", "world"]);
    assert_eq!(text(&out.stdout), "hello world\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let out = run(&["exec", "sh", "-c", "echo out; echo err >&2; echo out2"]);
    assert_eq!(text(&out.stdout), "out\nout2\n");
    assert_eq!(text(&out.stderr), "err\n");
}

#[test]
fn options_after_the_command_belong_to_it() {
    let out = run(&["exec", "sh", "-c", "echo \"$0 $1\"", "-i", "--tty"]);
    assert_eq!(text(&out.stdout), "-i --tty\n");
}

#[test]
fn exit_codes() {
    let code = |args: &[&str]| {
        let out = run(args);
        (out.status.code(), text(&out.stderr))
    };
    assert_eq!(code(&["exec", "true"]).0, Some(0));
    assert_eq!(code(&["exec", "sh", "-c", "exit 7"]).0, Some(7));
    // Killed by SIGKILL: 128 + 9.
    assert_eq!(code(&["exec", "sh", "-c", "kill -9 $$"]).0, Some(137));

    let (c, err) = code(&["exec", "no-such-program-anywhere"]);
    assert_eq!(c, Some(127), "{err}");
    assert!(err.contains("no-such-program-anywhere"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");

    let dir = TempDir::new("noexec");
    let file = dir.join("not-executable");
    std::fs::write(&file, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (c, err) = code(&["exec", file.to_str().unwrap()]);
    assert_eq!(c, Some(126), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");

    let (c, err) = code(&["exec", "-w", "/no/such/dir", "true"]);
    assert_eq!(c, Some(126), "{err}");
}

#[test]
fn usage_errors_exit_125_and_help_works_everywhere() {
    let out = run(&["exec", "--no-such-flag", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let out = run(&["exec", "--rlimit", "bogus=1", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("unknown resource"));
    for args in [
        &["--help"][..],
        &["exec", "--help"],
        &["ping", "--help"],
        &["shutdown", "--help"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(text(&out.stdout).contains("Usage:"), "{args:?}");
    }
}

#[test]
fn transport_failures_exit_125() {
    let out = run(&["--connect", "unix:/nonexistent/agent.sock", "exec", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("/nonexistent/agent.sock"));
    // An "agent" that exits at once.
    let out = run(&["--agent", "true", "exec", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("transport closed"),
        "{}",
        text(&out.stderr)
    );
}

/// A fake agent for `--agent 'sh SCRIPT'`: `script` is a shell script
/// that runs with `dir` holding the frames the test wrote there.
fn fake_agent(dir: &TempDir, script: &str, files: &[(&str, &[u8])]) -> String {
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let path = dir.join("fake-agent.sh");
    std::fs::write(&path, script.replace("$DIR", dir.0.to_str().unwrap())).unwrap();
    format!("sh {}", path.display())
}

fn ready_frame(protocol: u32) -> Vec<u8> {
    use agentd::messages::{Message, Ready};
    Message::Ready(Ready {
        protocol,
        agent: "fake/0".into(),
        pid: 1,
        pid1: false,
        max_payload: 1 << 20,
        stdin_window: 1 << 16,
        max_sessions: 8,
        uptime_ms: None,
        features: Vec::new(),
        realtime_ns: None,
        restores: None,
        clock_set: None,
        replay_bytes: None,
        cgroups: None,
        mounts: Vec::new(),
    })
    .to_bytes(0)
}

/// One line on stderr, exit 125.
fn assert_agentctl_failure(out: &Output, what: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.starts_with("agentctl: "), "{err}");
    assert!(err.contains(what), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[test]
fn protocol_failures_exit_125() {
    use agentd::messages::{ErrorKind, ErrorMsg, Kind, Message};
    // READY with another protocol version.
    let dir = TempDir::new("proto2");
    let agent = fake_agent(
        &dir,
        "cat $DIR/ready.bin; timeout 10 cat >/dev/null\n",
        &[("ready.bin", &ready_frame(2))],
    );
    let out = run(&["--agent", &agent, "exec", "true"]);
    assert_agentctl_failure(&out, "protocol version 2");

    // An ERROR answering EXEC. The session id is the client's choice: the
    // fake reads EXEC's 9-byte header and answers with the same id. (Were
    // the id wrong, exec would wait on: the fake hangs up after 10 s.)
    let dir = TempDir::new("exec-error");
    let error = Message::Error(ErrorMsg::new(
        ErrorKind::BadPayload,
        "EXEC refused by the fake agent",
        Some(Kind::Exec as u8),
    ))
    .to_bytes(0);
    let script = r#"cat $DIR/ready.bin
set -- $(dd bs=1 count=9 2>/dev/null | od -An -v -to1)
cat $DIR/error-len-kind.bin
printf "\\$6\\$7\\$8\\$9"
cat $DIR/error-payload.bin
timeout 10 cat >/dev/null
"#;
    let agent = fake_agent(
        &dir,
        script,
        &[
            ("ready.bin", &ready_frame(1)),
            ("error-len-kind.bin", &error[..5]),
            ("error-payload.bin", &error[9..]),
        ],
    );
    let out = run(&["--agent", &agent, "exec", "true"]);
    assert_agentctl_failure(&out, "bad_payload: EXEC refused by the fake agent");
}

#[test]
fn agent_dying_mid_session_exits_125() {
    // The session's parent is the agent: kill it from inside.
    let out = run(&["exec", "sh", "-c", "kill -9 $PPID; sleep 5"]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("transport closed"),
        "{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// stdin.

/// Runs agentctl with `input` on its stdin (written from a thread).
fn run_with_input(args: &[&str], input: Vec<u8>) -> Output {
    let mut child = agentctl(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = thread::spawn(move || {
        // agentctl may exit before reading everything (a failed test).
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

#[test]
fn interactive_stdin_20_mb_round_trip() {
    let data = pseudo_random(20 << 20, 0x9e37_79b9);
    let out = run_with_input(&["exec", "-i", "cat"], data.clone());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "bytes differ");

    let out = run_with_input(&["exec", "-i", "wc", "-c"], data);
    assert_eq!(text(&out.stdout).trim(), (20 << 20).to_string());
}

#[test]
fn without_i_remote_stdin_is_dev_null() {
    // Local stdin has data, but without -i it must not reach the process.
    let out = run_with_input(&["exec", "wc", "-c"], b"12345".to_vec());
    assert_eq!(text(&out.stdout).trim(), "0");
    let out = run_with_input(&["exec", "readlink", "/proc/self/fd/0"], Vec::new());
    assert_eq!(text(&out.stdout).trim(), "/dev/null");
}

/// `-t` without `-i`, as `docker exec -t c stty size`: the remote stdin is
/// the remote terminal (no local byte is forwarded), so programs that ask
/// their terminal about itself work; it used to be /dev/null.
#[test]
fn with_t_without_i_remote_stdin_is_the_terminal() {
    let out = run_with_input(
        &["exec", "-t", "--", "sh", "-c", "test -t 0 && stty size"],
        b"not forwarded\n".to_vec(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // No local terminal: the default 24x80.
    assert_eq!(text(&out.stdout).trim(), "24 80");
}

// ---------------------------------------------------------------------------
// -e, -w, -u, --rlimit, --clear-env.

#[test]
fn environment() {
    let out = run(&[
        "exec",
        "-e",
        "FOO=bar baz",
        "-e",
        "EMPTY=",
        "sh",
        "-c",
        "echo \"$FOO|$EMPTY|${EMPTY+set}\"",
    ]);
    assert_eq!(text(&out.stdout), "bar baz||set\n");

    // KEY alone copies the local value; an unset KEY is left out.
    let out = agentctl(&["exec", "-e", "LOCAL_ONLY", "-e", "UNSET_HERE", "env"])
        .env("LOCAL_ONLY", "from-host")
        .env_remove("UNSET_HERE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let env = text(&out.stdout);
    assert!(env.lines().any(|l| l == "LOCAL_ONLY=from-host"), "{env}");
    assert!(!env.contains("UNSET_HERE"), "{env}");

    let out = run(&["exec", "--clear-env", "-e", "ONLY=1", "/usr/bin/env"]);
    assert_eq!(text(&out.stdout), "ONLY=1\n");
}

#[test]
fn workdir() {
    let out = run(&["exec", "-w", "/usr", "pwd"]);
    assert_eq!(text(&out.stdout), "/usr\n");
}

#[test]
fn user() {
    let out = run(&["exec", "-u", "nobody", "id", "-u"]);
    if out.status.code() == Some(126) && text(&out.stderr).contains("bad_user") {
        panic!("no user nobody on this machine: {}", text(&out.stderr));
    }
    let uid = text(&out.stdout);
    // As root the agent can switch; otherwise it must refuse, not ignore.
    if nix::unistd::geteuid().is_root() {
        assert_eq!(uid.trim(), "65534", "{}", text(&out.stderr));
    } else {
        assert_eq!(out.status.code(), Some(126), "{uid}");
    }
    let out = run(&["exec", "-u", "0:0", "id", "-g"]);
    if nix::unistd::geteuid().is_root() {
        assert_eq!(text(&out.stdout).trim(), "0");
    }
}

#[test]
fn rlimits() {
    let out = run(&[
        "exec",
        "--rlimit",
        "nofile=64",
        "sh",
        "-c",
        "ulimit -n; ulimit -Hn",
    ]);
    assert_eq!(text(&out.stdout), "64\n64\n", "{}", text(&out.stderr));
    let out = run(&[
        "exec",
        "--rlimit",
        "nofile=32:48",
        "--rlimit",
        "core=unlimited",
        "sh",
        "-c",
        "ulimit -Sn; ulimit -Hn; ulimit -c",
    ]);
    assert_eq!(
        text(&out.stdout),
        "32\n48\nunlimited\n",
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn signals_are_forwarded_without_a_tty() {
    use std::io::BufRead;
    let mut child = agentctl(&[
        "exec",
        "sh",
        "-c",
        "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.05; done",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "got-term\n");
    // agentctl exits with the remote status, not killed by the signal.
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(9), "{status:?}");
}

#[test]
fn closed_stdout_sends_sigpipe() {
    // Like `yes | head -1` locally: the remote writer dies of SIGPIPE.
    let mut child = agentctl(&["exec", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 4];
    out.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"y\ny\n");
    drop(out);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 13), "{status:?}");
}

// ---------------------------------------------------------------------------
// ping, shutdown, --agent, --connect, --port.

#[test]
fn ping_prints_round_trips_and_a_summary() {
    let out = run(&["ping", "-c", "3", "--interval", "10"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    let lines: Vec<_> = s.lines().collect();
    assert!(lines[0].starts_with("PING agentd/"), "{s}");
    for (i, l) in lines[1..4].iter().enumerate() {
        assert!(l.starts_with(&format!("pong seq={} time=", i + 1)), "{s}");
        assert!(l.ends_with(" ms"), "{s}");
    }
    assert!(lines[4].contains("3 round trips, min/avg/max = "), "{s}");
    assert_eq!(lines.len(), 5, "{s}");
}

#[test]
fn shutdown_embedded() {
    let out = run(&["shutdown", "--grace", "100"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn built_in_agent_when_no_agentd_sits_next_to_agentctl() {
    // What `cargo run --bin agentctl` gives: agentctl built alone.
    let dir = TempDir::new("alone");
    let alone = dir.join("agentctl");
    std::fs::copy(AGENTCTL, &alone).unwrap();
    let out = Command::new(&alone)
        .args(["exec", "sh", "-c", "tr '\\0' ' ' < /proc/$PPID/cmdline"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The session's parent is agentctl itself, running the agent.
    let parent = text(&out.stdout);
    assert!(parent.starts_with(alone.to_str().unwrap()), "{parent}");
    assert!(parent.contains("--embedded-agentd-stdio"), "{parent}");
    let out = Command::new(&alone)
        .args(["ping", "-c", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(text(&out.stdout).starts_with("PING agentd/"));
}

#[test]
fn explicit_agent_command() {
    let agent = format!("{AGENTD} --stdio");
    let out = run(&["--agent", &agent, "exec", "echo", "spawned"]);
    assert_eq!(text(&out.stdout), "spawned\n", "{}", text(&out.stderr));
}

/// A stand-in for QEMU's `-chardev socket,server=on`: agentd connects to
/// one socket (`agentd --port`), agentctl to another, and the bridge
/// relays whole frames between them, replaying READY to each new host as a
/// reconnect to a device port would.
///
/// Unlike a port, it serves several hosts at once: every host gets every
/// frame from the agent (a client ignores frames for sessions it did not
/// start), and each host's frames reach the agent whole. That lets a
/// second agentctl (`shutdown`) reach the agent while a first one runs a
/// session.
struct Bridge {
    _dir: TempDir,
    ctl: PathBuf,
    agent: AgentProcess,
}

/// Reads whole frames from `from` and hands each one, encoded, to `each`
/// until `from` ends or `each` returns false.
fn relay_frames(mut from: UnixStream, mut each: impl FnMut(&[u8]) -> bool) {
    let mut dec = agentd::codec::Decoder::new();
    let mut bytes = Vec::new();
    while let Ok(1..) = dec.read_from(&mut from) {
        while let Some(item) = dec.next_frame() {
            let Ok(frame) = item else { continue };
            bytes.clear();
            frame.encode(&mut bytes).expect("the test's frames fit");
            if !each(&bytes) {
                return;
            }
        }
    }
}

impl Bridge {
    fn start() -> Bridge {
        let dir = TempDir::new("bridge");
        let agent_path = dir.join("agent.sock");
        let ctl = dir.join("ctl.sock");
        let agent_listener = UnixListener::bind(&agent_path).unwrap();
        let ctl_listener = UnixListener::bind(&ctl).unwrap();
        let agent = AgentProcess::spawn_port(&Opts::plain(&[]), &agent_path);
        let (mut from_agent, _) = agent_listener.accept().unwrap();
        let to_agent = Arc::new(Mutex::new(from_agent.try_clone().unwrap()));
        // The READY frame, read whole.
        let mut dec = agentd::codec::Decoder::new();
        let ready = loop {
            if let Some(f) = dec.next_frame() {
                let mut bytes = Vec::new();
                f.unwrap()
                    .encode(&mut bytes)
                    .expect("the test's frames fit");
                break bytes;
            }
            assert!(dec.read_from(&mut from_agent).unwrap() > 0, "agent closed");
        };
        assert!(dec.is_at_boundary());
        let hosts: Arc<Mutex<Vec<UnixStream>>> = Arc::new(Mutex::new(Vec::new()));
        let hosts2 = hosts.clone();
        thread::spawn(move || {
            relay_frames(from_agent, |frame| {
                let mut hosts = hosts2.lock().unwrap();
                hosts.retain_mut(|h| h.write_all(frame).is_ok());
                true
            });
            for h in hosts2.lock().unwrap().drain(..) {
                let _ = h.shutdown(std::net::Shutdown::Both);
            }
        });
        thread::spawn(move || {
            for conn in ctl_listener.incoming() {
                let Ok(conn) = conn else { break };
                let mut writer = conn.try_clone().unwrap();
                {
                    // READY first, then frames from the agent, never half
                    // of one.
                    let mut hosts = hosts.lock().unwrap();
                    if writer.write_all(&ready).is_err() {
                        continue;
                    }
                    hosts.push(writer);
                }
                let to_agent = to_agent.clone();
                thread::spawn(move || {
                    relay_frames(conn, |frame| {
                        to_agent.lock().unwrap().write_all(frame).is_ok()
                    })
                });
            }
        });
        Bridge {
            _dir: dir,
            ctl,
            agent,
        }
    }

    fn connect_arg(&self) -> String {
        format!("unix:{}", self.ctl.display())
    }
}

#[test]
fn connect_unix_socket_and_shutdown() {
    let mut bridge = Bridge::start();
    let target = bridge.connect_arg();
    let out = run(&[
        "--connect",
        &target,
        "exec",
        "sh",
        "-c",
        "echo over-socket; exit 3",
    ]);
    assert_eq!(text(&out.stdout), "over-socket\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3));
    let out = run(&["--connect", &target, "ping", "-c", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run(&["--connect", &target, "shutdown", "--grace", "100"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Not PID 1: the agent exits with status 0 after SHUTDOWN_DONE.
    let status = bridge.agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn shutdown_ends_a_live_session_of_another_agentctl() {
    use std::io::BufRead;
    let mut bridge = Bridge::start();
    let target = bridge.connect_arg();
    let mut exec = agentctl(&[
        "--connect",
        &target,
        "exec",
        "sh",
        "-c",
        "echo started; exec sleep 100",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(exec.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let out = run(&["--connect", &target, "shutdown", "--grace", "100"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // sleep ends by the SIGTERM of the shutdown: 128 + 15, well before
    // its 100 s and before the grace period's SIGKILL would make it 137.
    let status = support::proc::wait_child(&mut exec, Duration::from_secs(10));
    let _ = exec.kill();
    let mut err = String::new();
    let _ = exec.stderr.take().unwrap().read_to_string(&mut err);
    assert_eq!(status.and_then(|s| s.code()), Some(143), "{status:?} {err}");
    let status = bridge.agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn port_fifo_pair() {
    let dir = TempDir::new("fifo");
    let base = dir.join("port");
    let (pin, pout) = (dir.join("port.in"), dir.join("port.out"));
    for p in [&pin, &pout] {
        mkfifo(p);
    }
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    };
    // The agent reads PATH.in and writes PATH.out, as a guest behind
    // QEMU's `-chardev pipe` would.
    let mut agent = Command::new(AGENTD)
        .arg("--stdio")
        .stdin(open(&pin))
        .stdout(open(&pout))
        .spawn()
        .unwrap();
    let out = run(&[
        "--port",
        base.to_str().unwrap(),
        "exec",
        "echo",
        "over-fifo",
    ]);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(text(&out.stdout), "over-fifo\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

/// `--port` on a pseudo-terminal, as QEMU's `-chardev pty` gives: QEMU
/// (here the agent) holds the master, the host opens the slave
/// `/dev/pts/N`, whose line discipline agentctl must put in raw mode or
/// frames are mangled (CR to NL, ^C to a signal, echo back to the agent).
#[test]
fn port_pty_is_put_in_raw_mode() {
    let (master, slave_fd, slave) = cloexec_pty();
    assert!(slave.starts_with("/dev/pts"), "{}", slave.display());
    let cooked = termios::tcgetattr(slave_fd.as_fd()).unwrap();
    assert!(cooked
        .local_flags
        .contains(LocalFlags::ICANON | LocalFlags::ECHO));

    // Every byte value, both ways: stdin to the agent, stdout back.
    let data: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
    let mut ctl = agentctl(&["--port", slave.to_str().unwrap(), "exec", "-i", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The agent starts (and says READY) only once the line is raw, as a
    // guest that has been up for a while would have its READY waiting.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = termios::tcgetattr(slave_fd.as_fd()).unwrap();
        let cooked_local = LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG;
        let cooked_input = termios::InputFlags::ICRNL | termios::InputFlags::IXON;
        if !t.local_flags.intersects(cooked_local)
            && !t.input_flags.intersects(cooked_input)
            && !t.output_flags.contains(termios::OutputFlags::OPOST)
        {
            break;
        }
        if let Some(status) = ctl.try_wait().unwrap() {
            let mut err = String::new();
            let _ = ctl.stderr.take().unwrap().read_to_string(&mut err);
            panic!("agentctl ended ({status:?}) with the pty not raw: {err}");
        }
        if Instant::now() > deadline {
            let _ = ctl.kill();
            let _ = ctl.wait();
            panic!("agentctl never made the pty raw");
        }
        thread::sleep(Duration::from_millis(10));
    }
    let mut agent = Command::new(AGENTD)
        .arg("--stdio")
        .stdin(Stdio::from(master.try_clone().unwrap()))
        .stdout(Stdio::from(master.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let mut stdin = ctl.stdin.take().unwrap();
    let input = data.clone();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = ctl.wait_with_output().unwrap();
    writer.join().unwrap();
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "bytes differ");
}

#[test]
fn single_fifo_port_is_refused() {
    let dir = TempDir::new("fifo1");
    let p = dir.join("one");
    mkfifo(&p);
    let out = run(&["--port", p.to_str().unwrap(), "ping"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("FIFO"), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------
// -t under a real pseudo-terminal.

/// The local side of a pseudo-terminal that agentctl runs on (as its
/// controlling terminal, stdin, stdout and stderr).
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
    seen: Vec<u8>,
}

impl Pty {
    fn open(rows: u16, cols: u16) -> Pty {
        // Close-on-exec from the start: a master leaked into agentctl (and
        // on into agentd) would keep the terminal open, with nobody
        // reading it, after the test is gone.
        let (master, slave, _) = cloexec_pty();
        set_winsize(&master, rows, cols);
        Pty {
            master,
            slave,
            seen: Vec::new(),
        }
    }

    fn termios(&self) -> Termios {
        termios::tcgetattr(self.slave.as_fd()).unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        let mut cmd = agentctl(args);
        let fd = |f: &OwnedFd| Stdio::from(f.try_clone().unwrap());
        cmd.stdin(fd(&self.slave))
            .stdout(fd(&self.slave))
            .stderr(fd(&self.slave));
        // SAFETY: setsid and ioctl are async-signal-safe; they make the
        // pty (already on fd 0) the child's controlling terminal, so that
        // it gets SIGWINCH as a process at a terminal does.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }

    fn resize(&self, rows: u16, cols: u16) {
        set_winsize(&self.master, rows, cols);
    }

    fn write(&self, bytes: &[u8]) {
        nix::unistd::write(&self.master, bytes).unwrap();
    }

    /// Reads terminal output until `pat` shows up (after what earlier calls
    /// consumed); panics after `timeout`.
    fn expect(&mut self, pat: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = find(&self.seen, pat.as_bytes()) {
                self.seen.drain(..pos + pat.len());
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let shown = text(&self.seen);
                let tail: String = shown.chars().rev().take(300).collect();
                let tail: String = tail.chars().rev().collect();
                panic!("{pat:?} not seen; terminal shows ...{tail:?}");
            }
            let ms = left.as_millis().min(1000) as u16;
            let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(ms)).unwrap() > 0 {
                let mut buf = [0u8; 4096];
                match nix::unistd::read(&self.master, &mut buf) {
                    Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                    Err(nix::errno::Errno::EIO) => thread::sleep(Duration::from_millis(10)),
                    Err(e) => panic!("reading the pty: {e}"),
                }
            }
        }
    }

    /// Reads (and drops) whatever the terminal shows for a moment.
    fn drain(&mut self) {
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        while poll(&mut fds, PollTimeout::from(50u16)).unwrap_or(0) > 0 {
            let mut buf = [0u8; 4096];
            if nix::unistd::read(&self.master, &mut buf).unwrap_or(0) == 0 {
                break;
            }
        }
    }

    /// Waits for the terminal to leave (or enter) canonical mode.
    fn wait_raw(&self, raw: bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.termios().local_flags.contains(LocalFlags::ICANON) == raw {
            assert!(Instant::now() < deadline, "terminal raw={raw} not reached");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn same_mode(a: &Termios, b: &Termios) -> bool {
    a.input_flags == b.input_flags
        && a.output_flags == b.output_flags
        && a.control_flags == b.control_flags
        && a.local_flags == b.local_flags
        && a.control_chars == b.control_chars
}

fn wait_child(pty: &mut Pty, child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "agentctl did not exit");
        // Keep the terminal drained so agentctl never blocks writing.
        pty.drain();
    }
}

#[test]
fn tty_size_resize_ctrl_c_and_restore() {
    let mut pty = Pty::open(33, 111);
    let before = pty.termios();
    assert!(before
        .local_flags
        .contains(LocalFlags::ICANON | LocalFlags::ECHO));
    let mut child = pty.spawn(&[
        "exec",
        "-it",
        "--",
        "sh",
        "-c",
        "stty size; while sleep 0.05; do stty size; done",
    ]);
    pty.expect("33 111", Duration::from_secs(20));
    // While it runs the local terminal is raw.
    let during = pty.termios();
    assert!(!during.local_flags.contains(LocalFlags::ICANON));
    assert!(!during.local_flags.contains(LocalFlags::ECHO));
    assert!(!during.local_flags.contains(LocalFlags::ISIG));
    // SIGWINCH becomes RESIZE.
    pty.resize(40, 132);
    pty.expect("40 132", Duration::from_secs(10));
    // Ctrl-C travels as a byte: the remote terminal turns it into SIGINT
    // for the remote foreground process group.
    pty.write(b"\x03");
    let status = wait_child(&mut pty, &mut child);
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(
        same_mode(&before, &pty.termios()),
        "terminal mode not restored"
    );
}

#[test]
fn tty_input_echo_and_eof() {
    let mut pty = Pty::open(24, 80);
    let before = pty.termios();
    let mut child = pty.spawn(&[
        "exec",
        "-it",
        "--",
        "sh",
        "-c",
        "read line; echo \"got:$line\"; exit 4",
    ]);
    pty.wait_raw(true, Duration::from_secs(20));
    pty.write(b"hello\r");
    pty.expect("got:hello", Duration::from_secs(20));
    let status = wait_child(&mut pty, &mut child);
    assert_eq!(status.code(), Some(4));
    assert!(
        same_mode(&before, &pty.termios()),
        "terminal mode not restored"
    );
}

/// How a `-it` agentctl is made to end while its terminal is raw.
enum End {
    /// This signal is sent to agentctl; the remote side ignores it, so
    /// agentctl must end (and restore the terminal) rather than wait.
    Signal(nix::sys::signal::Signal),
    /// The agent dies under the session: the transport fails.
    AgentDies,
}

#[test]
fn tty_restored_on_signals_and_transport_failure() {
    use nix::sys::signal::Signal::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
    let cases = [
        (End::Signal(SIGTERM), 128 + 15),
        (End::Signal(SIGHUP), 128 + 1),
        (End::Signal(SIGINT), 128 + 2),
        (End::Signal(SIGQUIT), 128 + 3),
        (End::AgentDies, 125),
    ];
    for (end, code) in cases {
        let what = match &end {
            End::Signal(sig) => format!("{sig}"),
            End::AgentDies => "the agent dying".to_owned(),
        };
        let mut pty = Pty::open(24, 80);
        let before = pty.termios();
        let remote = match end {
            End::Signal(_) => "trap '' TERM HUP INT QUIT; echo session-up; sleep 100",
            // The session's parent is the agent.
            End::AgentDies => "echo session-up; sleep 0.3; kill -9 $PPID; sleep 100",
        };
        let mut child = pty.spawn(&["exec", "-it", "--", "sh", "-c", remote]);
        pty.wait_raw(true, Duration::from_secs(20));
        // The session has started: agentctl knows it and forwards signals.
        pty.expect("session-up", Duration::from_secs(20));
        if let End::Signal(sig) = end {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
        }
        let status = wait_child(&mut pty, &mut child);
        assert_eq!(
            status.code(),
            Some(code),
            "{what}: {status:?} signal {:?}",
            status.signal()
        );
        assert!(
            same_mode(&before, &pty.termios()),
            "{what}: terminal mode not restored"
        );
    }
}

#[test]
fn tty_restored_after_exec_failure() {
    let mut pty = Pty::open(24, 80);
    let before = pty.termios();
    let mut child = pty.spawn(&["exec", "-it", "--", "no-such-program-anywhere"]);
    pty.expect("no-such-program-anywhere", Duration::from_secs(20));
    let status = wait_child(&mut pty, &mut child);
    assert_eq!(status.code(), Some(127));
    assert!(
        same_mode(&before, &pty.termios()),
        "terminal mode not restored"
    );
}

#[test]
fn tty_without_a_local_terminal_and_term() {
    // -t with pipes: the remote side still gets a terminal and TERM.
    let out = agentctl(&[
        "exec",
        "-t",
        "sh",
        "-c",
        "test -t 1 && test -t 2 && echo \"tty $TERM\"; stty size <&1",
    ])
    .env("TERM", "vt220")
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert_eq!(
        text(&out.stdout),
        "tty vt220\r\n24 80\r\n",
        "{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// Sessions (ps, attach, kill, exec -d), time and --connect forms, against
// `agentd --listen unix:PATH`.

struct Listener {
    agent: support::listen::Listening,
    target: String,
}

impl Listener {
    fn start() -> Listener {
        let agent = support::listen::Listening::start(&Opts::default());
        let target = format!("unix:{}", agent.path.display());
        Listener { agent, target }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = agentctl(&["--connect", &self.target]);
        c.args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("agentctl runs")
    }

    /// Runs and checks exit 0; returns stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `ps --format '{{.Status}}'` of session `name`.
    fn status(&self, name: &str) -> String {
        let out = self.ok(&["ps", "-a", "--format", "{{.Name}}|{{.Tag}}|{{.Status}}"]);
        out.lines()
            .map(|l| l.split('|').collect::<Vec<_>>())
            .find(|f| f[0] == name || f[1] == name)
            .map(|f| f[2].to_owned())
            .unwrap_or_default()
    }
}

#[track_caller]
fn one_line_failure(out: &Output, code: i32, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} in {err}");
}

/// Reads a child's stdout on a thread; `until` waits for text in it.
struct Collector(Arc<Mutex<Vec<u8>>>);

impl Collector {
    fn start(mut from: impl Read + Send + 'static) -> Collector {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Collector(buf)
    }

    fn text(&self) -> String {
        text(&self.0.lock().unwrap())
    }

    #[track_caller]
    fn until(&self, needle: &str) {
        assert!(
            support::wait_until(support::timeout(), || self.text().contains(needle)),
            "{needle:?} never came: {:?}",
            self.text()
        );
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let end = Instant::now() + support::timeout();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < end, "agentctl did not exit");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exec_detached_ps_and_kill() {
    let l = Listener::start();
    let name = l.ok(&[
        "exec",
        "-d",
        "--name",
        "web",
        "sh",
        "-c",
        "echo hello; exec sleep 1000",
    ]);
    let number = name.trim().to_owned();
    assert!(number.parse::<u64>().is_ok(), "{name:?}");
    let other = l.ok(&["exec", "-d", "sh", "-c", "echo err >&2; exit 3"]);
    let other = other.trim().to_owned();
    assert_ne!(number, other);

    assert!(support::wait_until(support::timeout(), || l
        .status(&other)
        .contains("exited (3)")));
    let table = l.ok(&["ps"]);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    for col in [
        "SESSION", "TAG", "PID", "COMMAND", "USER", "TTY", "STATUS", "STARTED", "OUTPUT",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let web = table
        .lines()
        .find(|l| l.contains("web"))
        .expect("web listed");
    assert!(web.starts_with(&number), "{web}");
    assert!(web.contains("sh -c echo hello; exec sleep"), "{web}");
    assert!(
        web.contains("running, detached") && web.contains("pipes"),
        "{web}"
    );
    assert!(web.contains("6B / 0B"), "{web}");
    // Long commands are cut to 30 characters unless --no-trunc.
    assert!(!web.contains("sleep 1000"), "{web}");
    assert!(web.contains('…'), "{web}");
    let full = l.ok(&["ps", "--no-trunc"]);
    assert!(full.contains("sh -c echo hello; exec sleep 1000"), "{full}");
    let quiet = l.ok(&["ps", "-q"]);
    assert!(quiet.lines().any(|x| x == number), "{quiet}");
    let json = l.ok(&["ps", "--format", "json"]);
    assert!(
        json.contains("\"tag\":\"web\"") && json.contains("\"stderr_bytes\":4"),
        "{json}"
    );
    assert!(json.contains("\"exit\":{\"code\":3"), "{json}");

    // kill by tag: the signal's name or number, the name printed back.
    assert_eq!(l.ok(&["kill", "-s", "TERM", "web"]), "web\n");
    assert!(support::wait_until(support::timeout(), || l.status("web") == "killed (SIGTERM)"));
    // Ended: kill says so; an unknown name too.
    let out = l.run(&["kill", "web"]);
    one_line_failure(&out, 125, "is not running (it ended: killed by signal 15)");
    let out = l.run(&["kill", "nobody"]);
    one_line_failure(&out, 125, "no session \"nobody\"");
    let out = l.run(&["kill", "-s", "BOGUS", &number]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("not a signal"));

    // exec -d's failures keep exec's exit codes.
    let out = l.run(&["exec", "-d", "no-such-program-anywhere"]);
    one_line_failure(&out, 127, "no-such-program-anywhere");
}

#[test]
fn attach_replays_then_follows_while_ps_runs_in_another_client() {
    let l = Listener::start();
    let number = l.ok(&[
        "exec",
        "-d",
        "--name",
        "loop",
        "sh",
        "-c",
        "echo first; echo warn >&2; while read x; do echo \"[$x]\"; done",
    ]);
    let number = number.trim().to_owned();
    // `-d` without -i: stdin is /dev/null, so the loop ends at once; with
    // -i the session keeps its stdin for `attach -i`.
    let cat = l.ok(&["exec", "-d", "-i", "--name", "cat", "cat"]);
    let cat = cat.trim().to_owned();

    // attach -i in one agentctl; ps in another sees it attached.
    let mut child = l
        .cmd(&["attach", "-i", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let out = Collector::start(child.stdout.take().unwrap());
    let err = Collector::start(child.stderr.take().unwrap());
    stdin.write_all(b"hi\n").unwrap();
    out.until("hi\n");
    assert_eq!(l.status("cat"), "running, attached");
    assert!(l.status(&number).starts_with("exited (0)") || l.status(&number).contains("running"));
    // The detach keys: the session goes on, agentctl exits 0.
    stdin.write_all(b"\x10\x11").unwrap();
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0), "{}", err.text());
    err.until("detached from session");
    assert_eq!(l.status(&cat), "running, detached");

    // Attach again: the replay holds "hi"; --no-replay does not.
    let out = l
        .cmd(&["attach", "--no-replay", "-i", &cat])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = out;
    let mut stdin = child.stdin.take().unwrap();
    let out = Collector::start(child.stdout.take().unwrap());
    stdin.write_all(b"bye\n").unwrap();
    out.until("bye\n");
    drop(stdin); // EOF: cat ends, attach exits with its status.
    assert_eq!(wait_exit(&mut child).code(), Some(0));
    assert_eq!(out.text(), "bye\n");

    // The replay of the first session, stdout and stderr apart.
    let out = l.run(&["attach", "loop"]);
    assert_eq!(text(&out.stdout), "first\n");
    assert_eq!(text(&out.stderr), "warn\n");
    assert_eq!(out.status.code(), Some(0));
    // Its exit was seen, but it is kept a while: attached again, it
    // replays the tail asked for and exits at once.
    let out = l.run(&["attach", "--tail", "3", &number]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "st\n");
}

#[test]
fn attach_is_taken_over_by_kill_from_another_client() {
    let l = Listener::start();
    let n = l.ok(&[
        "exec",
        "-d",
        "--name",
        "s",
        "sh",
        "-c",
        "echo up; exec sleep 1000",
    ]);
    let n = n.trim().to_owned();
    let mut child = l
        .cmd(&["attach", "s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let out = Collector::start(child.stdout.take().unwrap());
    let err = Collector::start(child.stderr.take().unwrap());
    out.until("up\n");
    assert_eq!(l.ok(&["kill", &n]), format!("{n}\n"));
    assert_eq!(wait_exit(&mut child).code(), Some(0), "{}", err.text());
    err.until("attached by another connection");
    assert!(support::wait_until(support::timeout(), || l.status(&n) == "killed (SIGKILL)"));
}

#[test]
fn attach_errors_and_replay_loss() {
    let l = Listener::start();
    let out = l.run(&["attach", "nobody"]);
    one_line_failure(&out, 125, "no session \"nobody\"");
    l.ok(&["exec", "-d", "--name", "twin", "sleep", "1000"]);
    l.ok(&["exec", "-d", "--name", "twin", "sleep", "1000"]);
    let out = l.run(&["attach", "twin"]);
    one_line_failure(&out, 125, "several sessions");
    let out = l.run(&["attach", "-t", "twin"]);
    assert_eq!(out.status.code(), Some(125));
    // A small ring: asking for offset 0 reports what is lost.
    let n = l.ok(&[
        "exec",
        "-d",
        "--replay",
        "10",
        "sh",
        "-c",
        "printf '%050d\\n' 0; exec sleep 1000",
    ]);
    let n = n.trim().to_owned();
    assert!(support::wait_until(support::timeout(), || {
        l.ok(&["ps", "--format", "{{.Name}} {{.Stdout}}"])
            .contains(&format!("{n} 51"))
    }));
    let mut child = l
        .cmd(&["attach", "--since", "0", &n])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let out = Collector::start(child.stdout.take().unwrap());
    let err = Collector::start(child.stderr.take().unwrap());
    out.until("0\n");
    err.until("41 bytes of output asked for are no longer kept");
    assert_eq!(out.text(), "000000000\n");
    l.ok(&["kill", &n]);
    wait_exit(&mut child);
    let out = l.run(&["attach", "--since", "x", &n]);
    assert_eq!(out.status.code(), Some(125));
    let out = l.run(&["attach", "--detach-keys", "ctrl-1", &n]);
    assert_eq!(out.status.code(), Some(125));
}

#[test]
fn exec_limits_timeout_and_their_errors() {
    let l = Listener::start();
    let out = l.run(&["exec", "--timeout", "200ms", "sleep", "100"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("timeout passed"),
        "{}",
        text(&out.stderr)
    );
    for args in [
        &["exec", "--memory", "64M", "true"][..],
        &["exec", "--pids", "10", "true"],
        &["exec", "--cpus", "0.5", "true"],
    ] {
        let out = l.run(args);
        one_line_failure(&out, 126, "cgroup");
    }
    for args in [
        &["exec", "--memory", "12Q", "true"][..],
        &["exec", "--cpus", "0", "true"],
        &["exec", "--timeout", "5x", "true"],
        &["exec", "--kill-grace", "1s", "true"],
        &["exec", "--replay", "8G", "true"],
    ] {
        let out = l.run(args);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
    }
    // A tagged, limited-by-time session is listed with its tag.
    l.ok(&["exec", "--name", "quick", "--timeout", "10s", "true"]);
    assert!(l
        .ok(&["ps", "-a", "--format", "{{.Tag}}"])
        .contains("quick"));
}

#[test]
fn time_shows_the_offset_and_refuses_to_set_a_loopback_clock() {
    let l = Listener::start();
    let out = l.ok(&["time"]);
    for key in ["guest:", "host:", "offset:", "restores: 0", "not served"] {
        assert!(out.contains(key), "{key} in {out}");
    }
    let out = l.run(&["time", "--sync"]);
    one_line_failure(&out, 125, "--allow-clock");
    let out = l.run(&["time", "--set", "2026-01-01T00:00:00Z"]);
    one_line_failure(&out, 125, "--allow-clock");
    let out = l.run(&["time", "--set", "tomorrow"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("RFC 3339"));
    let out = l.run(&["time", "--set", "@0", "--sync"]);
    assert_eq!(out.status.code(), Some(125));
}

#[test]
fn connect_forms_and_their_errors() {
    let l = Listener::start();
    // hvsock: through a fake Firecracker-style socket that proxies.
    let dir = TempDir::new("cli-hvsock");
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let agent_path = l.agent.path.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while conn.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            if line != b"CONNECT 52" {
                let _ = conn.write_all(b"NO\n");
                continue;
            }
            conn.write_all(b"OK 1073741824\n").unwrap();
            let up = UnixStream::connect(&agent_path).unwrap();
            let (mut a, mut b2) = (conn.try_clone().unwrap(), up.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a);
                let _ = a.shutdown(std::net::Shutdown::Write);
            });
            let (mut c, mut u) = (conn, up);
            thread::spawn(move || {
                let _ = std::io::copy(&mut c, &mut u);
                let _ = u.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let hv = format!("hvsock:{}:52", path.display());
    let out = run(&["--connect", &hv, "exec", "echo", "via", "hvsock"]);
    assert_eq!(text(&out.stdout), "via hvsock\n", "{}", text(&out.stderr));
    let out = run(&[
        "--connect",
        &hv,
        "exec",
        "-d",
        "--name",
        "hv",
        "sleep",
        "1000",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(l.ok(&["ps", "--format", "{{.Tag}}"]).contains("hv"));
    let out = run(&["--connect", &format!("hvsock:{}:53", path.display()), "ps"]);
    one_line_failure(&out, 125, "answered \"NO\" to CONNECT 53");

    let out = run(&["--connect", "vsock:1:3999999", "ps"]);
    one_line_failure(&out, 125, "vsock");
    let out = run(&["--connect", "tcp:127.0.0.1:1", "ps"]);
    one_line_failure(
        &out,
        125,
        "unix:PATH, vsock:CID:PORT or hvsock:UDS_PATH:PORT",
    );
    let out = run(&["--connect", "unix:/nonexistent/a.sock", "ps"]);
    one_line_failure(&out, 125, "no socket at /nonexistent/a.sock");
    for args in [
        &["ps", "--help"][..],
        &["attach", "--help"],
        &["kill", "--help"],
        &["time", "--help"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(text(&out.stdout).contains("Usage:"), "{args:?}");
    }
    let out = run(&["ps", "--format", "{{.Nope}}"]);
    one_line_failure(&out, 125, "unknown field");
}

#[test]
fn attach_it_on_a_terminal_detaches_with_ctrl_p_ctrl_q_and_restores_it() {
    let l = Listener::start();
    let n = l.ok(&[
        "exec",
        "-d",
        "-it",
        "--name",
        "tsh",
        "sh",
        "-c",
        "while read line; do echo \"got:$line\"; stty size; done",
    ]);
    let n = n.trim().to_owned();
    let mut pty = Pty::open(30, 100);
    let before = pty.termios();
    let mut child = pty.spawn(&["--connect", &l.target, "attach", "-it", &n]);
    pty.wait_raw(true, Duration::from_secs(20));
    pty.write(b"one\r");
    pty.expect("got:one", Duration::from_secs(20));
    // Sized like the local terminal on attach.
    pty.expect("30 100", Duration::from_secs(20));
    pty.write(b"\x10\x11");
    let status = wait_child(&mut pty, &mut child);
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        same_mode(&before, &pty.termios()),
        "terminal mode not restored"
    );
    assert_eq!(l.status("tsh"), "running, detached");
    // What it printed meanwhile waits in the ring for the next attach.
    let out = l.run(&["ps", "--format", "{{.Tty}}"]);
    assert_eq!(text(&out.stdout), "tty\n");
    assert_eq!(l.ok(&["kill", "tsh"]), "tsh\n");
}

#[test]
fn kill_reaches_a_setsid_daemon_with_cgroups() {
    let Some(root) = cgroup_scratch() else {
        eprintln!("skipped: no cgroup2 directory can be made here");
        return;
    };
    let mut opts = Opts::default();
    opts.args
        .extend(["--cgroup-root".to_owned(), root.display().to_string()]);
    let agent = support::listen::Listening::start(&opts);
    let l = Listener {
        target: format!("unix:{}", agent.path.display()),
        agent,
    };
    let n = l.ok(&[
        "exec",
        "-d",
        "--name",
        "d",
        "sh",
        "-c",
        "setsid sh -c 'exec sleep 1000' </dev/null >/dev/null 2>&1 & echo $!; exec sleep 1000",
    ]);
    let n = n.trim().to_owned();
    // The limits are accepted here (the root has the controllers it has).
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.contains("pids") {
        assert_eq!(
            l.ok(&["exec", "--pids", "50", "echo", "limited"]),
            "limited\n"
        );
    }
    assert!(support::wait_until(support::timeout(), || {
        l.ok(&["ps", "--format", "{{.Name}} {{.Stdout}}"]) != format!("{n} 0\n")
    }));
    // Every process in the session's cgroup: the leader and the daemon
    // that left its process group.
    let pids: Vec<i32> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|e| {
            std::fs::read_to_string(e.path().join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .map(|p| p.parse().unwrap())
                .collect::<Vec<i32>>()
        })
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert_eq!(l.ok(&["kill", "-s", "KILL", "d"]), "d\n");
    assert!(support::wait_until(support::timeout(), || pids
        .iter()
        .all(|p| !support::proc::alive(*p))));
    assert!(support::wait_until(support::timeout(), || l.status(&n) == "killed (SIGKILL)"));
    // Nothing of it is left: its cgroup went once empty.
    assert!(support::wait_until(support::timeout(), || {
        std::fs::read_dir(&root).map_or(true, |d| !d.flatten().any(|e| e.path().is_dir()))
    }));
    drop(l);
    let _ = std::fs::remove_dir(&root);
}

/// A scratch cgroup under this process's own, where one can be made.
fn cgroup_scratch() -> Option<PathBuf> {
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
        .join(format!("agentctl-test-{}", std::process::id()));
    std::fs::create_dir(&dir).ok()?;
    Some(dir)
}

/// A fake agent on a Unix socket that serves the clock extension as a VM's
/// init would (a real one would change this machine's clock): READY with
/// `clock_set`, the guest an hour behind. Returns its address and, per
/// connection, the kinds of the frames agentctl sent.
fn fake_vm_clock_agent(dir: &TempDir) -> (String, std::sync::mpsc::Receiver<Vec<u8>>) {
    use agentd::messages::{Clock, ClockMsg, ClockSetDone, EntropyDone, Kind, Message, Ready};
    let path = dir.join("vm.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    const HOUR: i64 = 3_600_000_000_000;
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut sock) = conn else { return };
            let ready = Ready {
                protocol: 1,
                agent: "fake-vm/0".into(),
                pid: 1,
                pid1: true,
                max_payload: 1 << 20,
                stdin_window: 1 << 16,
                max_sessions: 16,
                features: vec!["clock".into()],
                restores: Some(0),
                clock_set: Some(true),
                ..Default::default()
            };
            sock.write_all(&Message::Ready(ready).to_bytes(0)).unwrap();
            let mut dec = agentd::codec::Decoder::new();
            let mut kinds = Vec::new();
            'conn: loop {
                match dec.read_from(&mut sock) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                while let Some(f) = dec.next_frame() {
                    let Ok(f) = f else { break 'conn };
                    kinds.push(f.kind);
                    let now = agentd::client::system_time_ns(std::time::SystemTime::now());
                    let reply = match f.kind {
                        k if k == Kind::ClockGet as u8 => Message::Clock(ClockMsg::Clock(Clock {
                            realtime_ns: now - HOUR,
                            boottime_ns: 5_000_000_000,
                            restores: 0,
                        })),
                        k if k == Kind::ClockSet as u8 => {
                            Message::Clock(ClockMsg::SetDone(ClockSetDone {
                                old_ns: now - HOUR,
                                new_ns: now,
                            }))
                        }
                        k if k == Kind::Entropy as u8 => {
                            Message::Clock(ClockMsg::EntropyDone(EntropyDone {
                                bytes: f.payload.len() as u32,
                            }))
                        }
                        k if k == Kind::Ping as u8 => Message::Pong(f.payload),
                        _ => continue,
                    };
                    let bytes = reply.to_bytes(f.id);
                    if sock.write_all(&bytes).is_err() {
                        break 'conn;
                    }
                }
            }
            let _ = tx.send(kinds);
        }
    });
    (format!("unix:{}", path.display()), rx)
}

#[test]
fn time_shows_a_vm_clock_skew_and_other_commands_sync_it() {
    use agentd::messages::Kind;
    let dir = TempDir::new("cli-vmclock");
    let (addr, kinds) = fake_vm_clock_agent(&dir);
    // `time` reads the skew without correcting it first.
    let out = run(&["--connect", &addr, "time"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("offset:   -3599.") || shown.contains("offset:   -3600."),
        "{shown}"
    );
    assert!(shown.contains("served (agentctl time --sync)"), "{shown}");
    assert_eq!(kinds.recv().unwrap(), [Kind::ClockGet as u8]);
    // `time --sync` steps it and says by how much.
    let out = run(&["--connect", &addr, "time", "--sync"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("guest clock stepped from"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("(+3600."),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        kinds.recv().unwrap(),
        [Kind::ClockGet as u8, Kind::ClockSet as u8]
    );
    let out = run(&["--connect", &addr, "time", "--set", "@1800000000"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(kinds.recv().unwrap(), [Kind::ClockSet as u8]);
    // Any other command syncs the clock and feeds entropy first.
    let out = run(&["--connect", &addr, "ping", "-c", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        kinds.recv().unwrap(),
        [
            Kind::ClockGet as u8,
            Kind::ClockSet as u8,
            Kind::Entropy as u8,
            Kind::Ping as u8
        ]
    );
}
