//! End-to-end suite: agentd as PID 1 of a QEMU VM, driven over the virtio
//! port through QEMU's chardev socket.
//!
//! `tests/vm/run.sh` builds and boots the VM and runs this binary with
//! `--ignored --test-threads=1`, setting `AGENTD_VM_SOCK` (the socket) and
//! `AGENTD_VM_T0_MS` (when QEMU started, for the boot-to-READY time). Every
//! test is `#[ignore]`d so that a plain `cargo test` skips them. They run in
//! name order; the last one shuts the VM down.
//!
//! The host side is a small synchronous client written directly on
//! `agentd::codec` and `agentd::messages`, so the suite depends on nothing
//! but the contract (`shared/protocol-v1.md`).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentd::codec::Decoder;
use agentd::messages::{ErrorMsg, Exec, ExecFailed, Exited, Message, Ready, Resize, Shutdown};

/// Gap kept between one connection's close and the next connect. A host that
/// reconnects within about a millisecond of the previous host's close can be
/// invisible to the agent (virtio-console reports only the final state; see
/// docs/VM.md), so every test waits this long.
const RECONNECT_GAP: Duration = Duration::from_millis(100);

/// How long the first READY may take (the VM boots under TCG meanwhile, on a
/// machine that may be busy).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Default wait for any single expected frame.
const STEP: Duration = Duration::from_secs(30);

static NEXT_ID: AtomicU32 = AtomicU32::new(1);
static LAST_CLOSE: Mutex<Option<Instant>> = Mutex::new(None);
static BOOT_REPORTED: Mutex<bool> = Mutex::new(false);

fn new_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

fn sock_path() -> PathBuf {
    std::env::var_os("AGENTD_VM_SOCK")
        .map(PathBuf::from)
        .expect("AGENTD_VM_SOCK is not set: these tests run inside tests/vm/run.sh")
}

/// One frame from the agent, owned.
#[derive(Debug, Clone)]
enum Ev {
    Ready(Ready),
    Pong(Vec<u8>),
    ShutdownDone,
    Error(ErrorMsg),
    Started(u32),
    ExecFailed(ExecFailed),
    StdinAck(u32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(Exited),
}

/// What a finished session produced.
#[derive(Debug, Default)]
struct Output {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exited: Option<Exited>,
}

impl Output {
    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn status(&self) -> i32 {
        self.exited.expect("session did not exit").status
    }
}

/// A host connected to the agent's port.
struct Host {
    stream: UnixStream,
    dec: Decoder,
    ready: Ready,
    queues: HashMap<u32, VecDeque<Ev>>,
    eof: bool,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        *LAST_CLOSE.lock().unwrap() = Some(Instant::now());
    }
}

impl Host {
    /// Connects (waiting [`RECONNECT_GAP`] after the previous close) and
    /// reads READY, which must be the first frame.
    fn connect() -> Host {
        if let Some(t) = *LAST_CLOSE.lock().unwrap() {
            let since = t.elapsed();
            if since < RECONNECT_GAP {
                std::thread::sleep(RECONNECT_GAP - since);
            }
        }
        let path = sock_path();
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < Duration::from_secs(30) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        };
        stream
            .set_write_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut host = Host {
            stream,
            dec: Decoder::new(),
            ready: Ready {
                protocol: 0,
                agent: String::new(),
                pid: 0,
                pid1: false,
                max_payload: 0,
                stdin_window: 0,
                max_sessions: 0,
                uptime_ms: None,
            },
            queues: HashMap::new(),
            eof: false,
        };
        let first_boot = !*BOOT_REPORTED.lock().unwrap();
        let timeout = if first_boot { BOOT_TIMEOUT } else { STEP };
        let (id, ev) = host
            .read_one(Instant::now() + timeout)
            .expect("no READY: the agent closed the connection");
        match ev {
            Ev::Ready(r) if id == 0 => host.ready = r,
            other => panic!("the first frame was not READY but {other:?} (id {id})"),
        }
        if first_boot {
            *BOOT_REPORTED.lock().unwrap() = true;
            report_boot(&host.ready);
        }
        host
    }

    fn send(&mut self, id: u32, msg: Message<'_>) {
        let bytes = msg.to_bytes(id);
        self.stream
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("sending {:?}: {e}", msg.kind()));
    }

    /// Reads frames until one is complete; `None` at end of stream.
    fn read_one(&mut self, deadline: Instant) -> Option<(u32, Ev)> {
        loop {
            if let Some(item) = self.dec.next_frame() {
                let frame = item.unwrap_or_else(|e| panic!("bad frame from the agent: {e:?}"));
                let id = frame.id;
                let msg = Message::decode_from_agent(frame)
                    .unwrap_or_else(|e| panic!("undecodable frame from the agent: {e:?}"));
                let ev = match msg {
                    Message::Ready(r) => Ev::Ready(r),
                    Message::Pong(p) => Ev::Pong(p.to_vec()),
                    Message::ShutdownDone => Ev::ShutdownDone,
                    Message::Error(e) => Ev::Error(e),
                    Message::Started(s) => Ev::Started(s.pid),
                    Message::ExecFailed(f) => Ev::ExecFailed(f),
                    Message::StdinAck(a) => Ev::StdinAck(a.bytes),
                    Message::Stdout(b) => Ev::Stdout(b.to_vec()),
                    Message::Stderr(b) => Ev::Stderr(b.to_vec()),
                    Message::Exited(x) => Ev::Exited(x),
                    other => panic!("unexpected {:?} from the agent", other.kind()),
                };
                return Some((id, ev));
            }
            if self.eof {
                return None;
            }
            let now = Instant::now();
            assert!(now < deadline, "timed out waiting for the agent");
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .unwrap();
            match self.dec.read_from(&mut self.stream) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => self.eof = true,
                Err(e) => panic!("reading from the agent: {e}"),
            }
        }
    }

    /// The next frame for session (or connection, 0) `id`, queueing frames
    /// of other ids. `None` at end of stream.
    fn next_for(&mut self, id: u32, timeout: Duration) -> Option<Ev> {
        if let Some(ev) = self.queues.get_mut(&id).and_then(VecDeque::pop_front) {
            return Some(ev);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (got, ev) = self.read_one(deadline)?;
            if got == id {
                return Some(ev);
            }
            self.queues.entry(got).or_default().push_back(ev);
        }
    }

    /// The next frame of any id (queued ones first). `None` at end of
    /// stream.
    fn next_for_any(&mut self, timeout: Duration) -> Option<(u32, Ev)> {
        for (id, q) in self.queues.iter_mut() {
            if let Some(ev) = q.pop_front() {
                return Some((*id, ev));
            }
        }
        self.read_one(Instant::now() + timeout)
    }

    fn expect_for(&mut self, id: u32, timeout: Duration) -> Ev {
        self.next_for(id, timeout)
            .unwrap_or_else(|| panic!("connection closed while waiting for session {id}"))
    }

    /// Sends EXEC and waits for STARTED (returns the pid) or EXEC_FAILED.
    fn start(&mut self, id: u32, exec: Exec) -> Result<u32, ExecFailed> {
        self.send(id, Message::Exec(Box::new(exec)));
        match self.expect_for(id, STEP) {
            Ev::Started(pid) => Ok(pid),
            Ev::ExecFailed(f) => Err(f),
            Ev::Error(e) => panic!("ERROR for EXEC {id}: {e:?}"),
            other => panic!("unexpected {other:?} before STARTED for {id}"),
        }
    }

    /// Collects a started session's output until EXITED.
    fn collect(&mut self, id: u32, pid: u32, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let mut out = Output {
            pid,
            ..Output::default()
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "session {id} did not exit in {timeout:?}");
            match self.expect_for(id, left) {
                Ev::Stdout(b) => out.stdout.extend_from_slice(&b),
                Ev::Stderr(b) => out.stderr.extend_from_slice(&b),
                Ev::StdinAck(_) => {}
                Ev::Exited(x) => {
                    out.exited = Some(x);
                    return out;
                }
                other => panic!("unexpected {other:?} in session {id}"),
            }
        }
    }

    /// Runs `exec` to completion, with `stdin` written in full (respecting the
    /// stdin window) and then closed.
    fn run(&mut self, exec: Exec, stdin: &[u8]) -> Output {
        let id = new_id();
        let pid = self
            .start(id, exec.clone())
            .unwrap_or_else(|f| panic!("EXEC {:?} failed: {f:?}", exec.cmd));
        let window = self.ready.stdin_window as usize;
        assert!(window > 0, "READY gave stdin_window 0");
        let (mut sent, mut acked) = (0usize, 0usize);
        let mut out = Output {
            pid,
            ..Output::default()
        };
        let mut closed = false;
        loop {
            while sent < stdin.len() && sent - acked < window {
                let n = (stdin.len() - sent)
                    .min(window - (sent - acked))
                    .min(64 * 1024);
                self.send(id, Message::Stdin(&stdin[sent..sent + n]));
                sent += n;
            }
            if sent == stdin.len() && !closed && exec.stdin {
                self.send(id, Message::StdinClose);
                closed = true;
            }
            match self.expect_for(id, Duration::from_secs(120)) {
                Ev::StdinAck(n) => acked += n as usize,
                Ev::Stdout(b) => out.stdout.extend_from_slice(&b),
                Ev::Stderr(b) => out.stderr.extend_from_slice(&b),
                Ev::Exited(x) => {
                    out.exited = Some(x);
                    return out;
                }
                other => panic!("unexpected {other:?} in session {id}"),
            }
        }
    }

    /// Runs `sh -c script` with no stdin.
    fn sh(&mut self, script: &str) -> Output {
        let mut e = Exec::new("sh");
        e.args = vec!["-c".into(), script.into()];
        e.stdin = false;
        self.run(e, b"")
    }
}

fn report_boot(ready: &Ready) {
    let host_ms = std::env::var("AGENTD_VM_T0_MS")
        .ok()
        .and_then(|t| t.parse::<u128>().ok())
        .map(|t0| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis()
                .saturating_sub(t0)
        });
    let guest = ready
        .uptime_ms
        .map_or("not reported".to_owned(), |ms| format!("{ms} ms"));
    let host = host_ms.map_or("unknown".to_owned(), |ms| format!("{ms} ms"));
    eprintln!("boot-to-READY: {host} from QEMU start to READY at the host; guest uptime at READY: {guest}");
}

fn sh_exec(script: &str) -> Exec {
    let mut e = Exec::new("sh");
    e.args = vec!["-c".into(), script.into()];
    e
}

/// SHA-256 of `data`, by the host's `sha256sum`.
fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum on the host");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    stdin.write_all(data).unwrap();
    drop(stdin);
    let s = reader.join().unwrap();
    child.wait().unwrap();
    s.split_whitespace().next().unwrap().to_owned()
}

/// Deterministic pseudo-random bytes (xorshift), for stdin payloads.
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------
// The suite, in name order.
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t01_ready_as_pid1() {
    let host = Host::connect();
    let r = &host.ready;
    eprintln!("READY: {r:?}");
    assert_eq!(r.protocol, 1);
    assert_eq!(r.pid, 1, "the agent is not PID 1");
    assert!(r.pid1, "READY says pid1: false");
    assert!(r.max_payload >= 64 * 1024);
    assert!(r.stdin_window > 0);
    assert!(r.max_sessions >= 100);
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t02_init_duties() {
    let mut host = Host::connect();
    let out = host.sh("cut -d' ' -f2,3 /proc/mounts; \
         echo host=$(hostname); echo path=$PATH; echo home=$HOME; \
         for l in ptmx fd stdin stdout stderr; do readlink /dev/$l; done; \
         echo pid1=$(cat /proc/1/comm)");
    let s = out.stdout_str();
    eprintln!("{s}");
    assert_eq!(out.status(), 0, "{}", String::from_utf8_lossy(&out.stderr));
    for (mp, fs) in [
        ("/proc", "proc"),
        ("/sys", "sysfs"),
        ("/dev", "devtmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/tmp", "tmpfs"),
        ("/run", "tmpfs"),
        ("/sys/fs/cgroup", "cgroup2"),
    ] {
        assert!(
            s.lines().any(|l| l == format!("{mp} {fs}")),
            "{mp} ({fs}) is not mounted"
        );
    }
    assert!(s.contains("host=agentd-vm"), "hostname not set");
    assert!(s.contains("path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"));
    assert!(s.contains("home=/root"));
    for link in [
        "pts/ptmx",
        "/proc/self/fd",
        "/proc/self/fd/0",
        "/proc/self/fd/1",
        "/proc/self/fd/2",
    ] {
        assert!(s.lines().any(|l| l == link), "missing /dev link to {link}");
    }
    assert!(s.contains("pid1=init"), "PID 1 is not /init");
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t03_exec_on_pipes() {
    let mut host = Host::connect();
    let out = host.sh("echo out; echo err >&2; exit 7");
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let x = out.exited.unwrap();
    assert_eq!((x.code, x.signal, x.status), (Some(7), None, 7));
    assert!(out.pid > 1);
    // argv, env and cwd.
    let mut e = Exec::new("/bin/sh");
    e.args = vec![
        "-c".into(),
        "echo \"$0 $1 $FOO $(pwd)\"".into(),
        "zero".into(),
        "one".into(),
    ];
    e.env = vec!["FOO=bar".into()];
    e.cwd = Some("/tmp".into());
    e.stdin = false;
    let out = host.run(e, b"");
    assert_eq!(out.stdout_str(), "zero one bar /tmp\n");
    // `user` from the initramfs's /etc/passwd and /etc/group.
    let mut e = sh_exec("id -u; id -g");
    e.user = Some("nobody".into());
    e.stdin = false;
    let out = host.run(e, b"");
    assert_eq!(out.stdout_str(), "65534\n65534\n", "{out:?}");
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t04_exit_statuses_and_exec_failures() {
    let mut host = Host::connect();
    for (script, code) in [
        ("true", 0),
        ("false", 1),
        ("exit 42", 42),
        ("exit 255", 255),
    ] {
        let x = host.sh(script).exited.unwrap();
        assert_eq!((x.code, x.status), (Some(code), code), "{script}");
    }
    let x = host.sh("kill -KILL $$").exited.unwrap();
    assert_eq!((x.code, x.signal, x.status), (None, Some(9), 137));
    let x = host.sh("kill -TERM $$").exited.unwrap();
    assert_eq!((x.signal, x.status), (Some(15), 143));
    let id = new_id();
    let f = host.start(id, Exec::new("no-such-program")).unwrap_err();
    assert_eq!(f.kind, "not_found", "{f:?}");
    let id = new_id();
    let f = host.start(id, Exec::new("/etc/passwd")).unwrap_err();
    assert_eq!(f.kind, "permission_denied", "{f:?}");
    let id = new_id();
    let mut e = Exec::new("true");
    e.cwd = Some("/no/such/dir".into());
    let f = host.start(id, e).unwrap_err();
    assert_eq!(f.kind, "bad_cwd", "{f:?}");
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t05_stdin() {
    let mut host = Host::connect();
    let out = host.run(Exec::new("cat"), b"hello from the host\n");
    assert_eq!(out.stdout, b"hello from the host\n");
    assert_eq!(out.status(), 0);
    // 8 MiB through the stdin window, checked by the guest's sha256sum.
    let data = pseudo_random(8 << 20, 0x5eed);
    let t = Instant::now();
    let out = host.run(Exec::new("sha256sum"), &data);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.status(), 0);
    let guest_sum = out
        .stdout_str()
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    assert_eq!(
        guest_sum,
        sha256_hex(&data),
        "stdin corrupted on the way in"
    );
    eprintln!(
        "stdin: 8 MiB in {secs:.2} s ({:.1} MiB/s, window {} bytes)",
        8.0 / secs,
        host.ready.stdin_window
    );
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t06_tty() {
    let mut host = Host::connect();
    let mut e = sh_exec(
        "tty; stty size; echo TERM=$TERM; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-tty",
    );
    e.tty = true;
    e.rows = 30;
    e.cols = 100;
    // stdin stays on (the default): with `stdin: false` even a tty session's
    // stdin is /dev/null, as the contract says.
    let out = host.run(e, b"");
    let s = out.stdout_str();
    assert_eq!(out.status(), 0, "{s}");
    assert!(out.stderr.is_empty(), "a tty session sent STDERR");
    assert!(s.contains("/dev/pts/"), "{s}");
    assert!(s.contains("30 100"), "stty size: {s}");
    assert!(s.contains("all-tty"), "{s}");
    // An interactive shell on the terminal: input, RESIZE, exit status.
    let id = new_id();
    let mut e = Exec::new("sh");
    e.tty = true;
    let pid = host.start(id, e).unwrap();
    host.send(
        id,
        Message::Resize(Resize {
            rows: 40,
            cols: 120,
        }),
    );
    host.send(id, Message::Stdin(b"echo $((6*7)); stty size; exit 3\n"));
    let out = host.collect(id, pid, STEP);
    let s = out.stdout_str();
    assert!(s.contains("42"), "{s}");
    assert!(s.contains("40 120"), "resize not applied: {s}");
    assert_eq!(out.status(), 3, "{s}");
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t07_signals() {
    let mut host = Host::connect();
    // SIGTERM to the process group: the shell and its sleep both go.
    let id = new_id();
    let pid = host
        .start(id, sh_exec("sleep 100 & echo started; wait"))
        .unwrap();
    match host.expect_for(id, STEP) {
        Ev::Stdout(b) => assert_eq!(b, b"started\n"),
        other => panic!("{other:?}"),
    }
    host.send(
        id,
        Message::Signal(agentd::messages::Signal {
            signal: 15,
            group: true,
        }),
    );
    let out = host.collect(id, pid, STEP);
    let x = out.exited.unwrap();
    assert_eq!((x.signal, x.status), (Some(15), 143));
    // Signal to the process alone (group: false), caught by a trap.
    let id = new_id();
    let pid = host
        .start(
            id,
            sh_exec("trap 'echo got USR1; exit 5' USR1; echo ready; while :; do sleep 0.05; done"),
        )
        .unwrap();
    match host.expect_for(id, STEP) {
        Ev::Stdout(b) => assert_eq!(b, b"ready\n"),
        other => panic!("{other:?}"),
    }
    host.send(
        id,
        Message::Signal(agentd::messages::Signal {
            signal: 10,
            group: false,
        }),
    );
    let out = host.collect(id, pid, STEP);
    assert!(out.stdout_str().contains("got USR1"), "{out:?}");
    assert_eq!(out.status(), 5);
    // An invalid signal number is ERROR invalid_signal; the session lives on.
    let id = new_id();
    let mut e = Exec::new("cat");
    e.stdin = true;
    let pid = host.start(id, e).unwrap();
    host.send(
        id,
        Message::Signal(agentd::messages::Signal {
            signal: 999,
            group: true,
        }),
    );
    match host.expect_for(id, STEP) {
        Ev::Error(e) => assert_eq!(e.kind, "invalid_signal", "{e:?}"),
        other => panic!("expected ERROR invalid_signal, got {other:?}"),
    }
    host.send(id, Message::StdinClose);
    assert_eq!(host.collect(id, pid, STEP).status(), 0);
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t08_output_integrity_50mb() {
    let mut host = Host::connect();
    // Make 50 MiB of random data in the guest, checksum it there, then send it.
    let prep = host.sh("head -c 52428800 /dev/urandom > /tmp/big && sha256sum /tmp/big");
    assert_eq!(prep.status(), 0, "{prep:?}");
    let guest_sum = prep
        .stdout_str()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let t = Instant::now();
    let mut e = Exec::new("cat");
    e.args = vec!["/tmp/big".into()];
    e.stdin = false;
    let id = new_id();
    let pid = host.start(id, e).unwrap();
    let out = host.collect(id, pid, Duration::from_secs(120));
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(out.status(), 0);
    assert_eq!(out.stdout.len(), 52_428_800, "bytes lost or added");
    assert_eq!(sha256_hex(&out.stdout), guest_sum, "output corrupted");
    eprintln!("output: 50 MiB in {secs:.2} s ({:.0} MiB/s)", 50.0 / secs);
    assert_eq!(host.sh("rm /tmp/big").status(), 0);
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t09_orphans_are_reaped() {
    let mut host = Host::connect();
    // The session's shell exits at once; its background children are
    // orphaned, adopted by PID 1 (the agent), and exit later.
    let out = host.sh("for i in 1 2 3 4 5; do (sleep 0.5; exit 3) & done; echo $!");
    assert_eq!(out.status(), 0);
    let orphan: u32 = out.stdout_str().trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let out = host.sh(&format!(
        "[ -e /proc/{orphan} ] && echo orphan-still-there; \
         for f in /proc/[0-9]*/stat; do read -r l < $f 2>/dev/null && echo \"$l\"; done"
    ));
    let s = out.stdout_str();
    assert!(
        !s.contains("orphan-still-there"),
        "orphan {orphan} not reaped"
    );
    let zombies: Vec<&str> = s
        .lines()
        .filter(|l| {
            l.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .collect();
    assert!(zombies.is_empty(), "zombies in the VM: {zombies:?}");
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t10_hundred_concurrent_sessions() {
    let mut host = Host::connect();
    let n = 100;
    let t = Instant::now();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = new_id();
        let mut e = sh_exec(&format!("sleep 1; echo session {i}; exit {}", i % 7));
        e.stdin = false;
        host.send(id, Message::Exec(Box::new(e)));
        ids.push((id, i));
    }
    let mut pids = HashMap::new();
    for &(id, _) in &ids {
        match host.expect_for(id, STEP) {
            Ev::Started(pid) => {
                pids.insert(id, pid);
            }
            other => panic!("session {id}: {other:?}"),
        }
    }
    let distinct: std::collections::HashSet<_> = pids.values().collect();
    assert_eq!(distinct.len(), n, "pids not distinct");
    for &(id, i) in &ids {
        let out = host.collect(id, pids[&id], Duration::from_secs(120));
        assert_eq!(out.stdout_str(), format!("session {i}\n"));
        assert_eq!(out.status(), (i % 7) as i32);
    }
    eprintln!(
        "100 concurrent sessions (each sleeping 1 s) in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "sessions did not run concurrently"
    );
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t11_host_reconnects_while_a_session_runs() {
    let mut host = Host::connect();
    let id = new_id();
    let mut e =
        sh_exec("i=0; while [ $i -lt 40 ]; do echo line $i; i=$((i+1)); sleep 0.1; done; exit 9");
    e.stdin = false;
    let pid = host.start(id, e).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match host.expect_for(id, STEP) {
            Ev::Stdout(b) => seen.extend(String::from_utf8_lossy(&b).lines().map(str::to_owned)),
            other => panic!("{other:?}"),
        }
    }
    eprintln!("before the disconnect: {seen:?}");
    drop(host);
    // Away for a second: the session keeps running, its output is queued
    // (or dropped) by the agent.
    std::thread::sleep(Duration::from_secs(1));
    let mut host = Host::connect(); // asserts READY comes first
    let out = host.collect(id, pid, STEP);
    let lines: Vec<String> = out.stdout_str().lines().map(str::to_owned).collect();
    eprintln!(
        "after the reconnect: {} lines, {:?} .. {:?}",
        lines.len(),
        lines.first(),
        lines.last()
    );
    assert_eq!(out.status(), 9, "the session did not run to its end");
    assert_eq!(lines.last().map(String::as_str), Some("line 39"));
    // Whatever arrives is whole lines, in order.
    let nums: Vec<u32> = seen
        .iter()
        .chain(lines.iter())
        .map(|l| {
            l.strip_prefix("line ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("garbled line {l:?}"))
        })
        .collect();
    assert!(
        nums.windows(2).all(|w| w[0] < w[1]),
        "lines out of order: {nums:?}"
    );
    // And the agent still works on the new connection.
    assert_eq!(host.sh("echo still here").stdout, b"still here\n");
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t12_a_departed_hosts_partial_frame_does_not_reach_the_next_host() {
    // Host A sends the first 12 bytes of a 19-byte PING frame and leaves at
    // once, likely before the agent has read them.
    for round in 0..5 {
        {
            let mut a = Host::connect();
            let mut bytes = Message::Ping(b"0123456789").to_bytes(0);
            bytes.truncate(12);
            a.stream.write_all(&bytes).unwrap();
        }
        // Host B must start on a clean stream: its PING is answered.
        let mut b = Host::connect();
        let payload = format!("round {round}");
        b.send(0, Message::Ping(payload.as_bytes()));
        match b.next_for(0, Duration::from_secs(10)) {
            Some(Ev::Pong(p)) => assert_eq!(p, payload.as_bytes()),
            other => panic!(
                "round {round}: the next host's PING got {other:?} instead of its PONG \
                 (the departed host's bytes were read as the start of its stream)"
            ),
        }
    }
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t13_ping() {
    let mut host = Host::connect();
    let mut best = Duration::MAX;
    for i in 0..20u32 {
        let payload = i.to_be_bytes();
        let t = Instant::now();
        host.send(0, Message::Ping(&payload));
        match host.expect_for(0, STEP) {
            Ev::Pong(p) => assert_eq!(p, payload),
            other => panic!("{other:?}"),
        }
        best = best.min(t.elapsed());
    }
    eprintln!("ping: best round trip {best:?}");
}

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t14_agentctl() {
    let Some(agentctl) = std::env::var_os("AGENTD_VM_AGENTCTL") else {
        eprintln!("AGENTD_VM_AGENTCTL not set; skipped");
        return;
    };
    let help = Command::new(&agentctl).arg("--help").output();
    if !help.is_ok_and(|h| String::from_utf8_lossy(&h.stdout).contains("exec")) {
        eprintln!("agentctl has no exec command yet; skipped");
        return;
    }
    let connect = format!("unix:{}", sock_path().display());
    // Keep the reconnect gap before and after each agentctl run.
    std::thread::sleep(RECONNECT_GAP);
    let out = Command::new(&agentctl)
        .args([
            "--connect",
            &connect,
            "exec",
            "--",
            "sh",
            "-c",
            "echo via agentctl; exit 3",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("running agentctl");
    *LAST_CLOSE.lock().unwrap() = Some(Instant::now());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "via agentctl\n",
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
}

// The first boot ends here: SHUTDOWN powers the VM off. `run.sh` then boots
// it again for the `second_boot_` tests.

#[test]
#[ignore = "needs the VM: run tests/vm/run.sh"]
fn t99_shutdown_powers_off() {
    let mut host = Host::connect();
    // A session that ignores SIGTERM is SIGKILLed after the grace.
    let id = new_id();
    let pid = host
        .start(
            id,
            sh_exec("trap '' TERM; echo up; while :; do sleep 0.05; done"),
        )
        .unwrap();
    match host.expect_for(id, STEP) {
        Ev::Stdout(b) => assert_eq!(b, b"up\n"),
        other => panic!("{other:?}"),
    }
    let t = Instant::now();
    host.send(0, Message::Shutdown(Shutdown { grace_ms: 500 }));
    let out = host.collect(id, pid, STEP);
    assert_eq!(out.exited.unwrap().signal, Some(9), "{out:?}");
    match host.expect_for(0, STEP) {
        Ev::ShutdownDone => {}
        other => panic!("expected SHUTDOWN_DONE, got {other:?}"),
    }
    // Then the machine powers off: QEMU exits and the socket closes.
    assert!(
        host.next_for(0, Duration::from_secs(30)).is_none(),
        "frames after SHUTDOWN_DONE"
    );
    eprintln!("shutdown: SHUTDOWN_DONE and power-off in {:?}", t.elapsed());
}

#[test]
#[ignore = "needs the VM (second boot): run tests/vm/run.sh"]
fn second_boot_sigterm_to_pid1_shuts_down_and_powers_off() {
    let mut host = Host::connect();
    let id = new_id();
    let mut e = Exec::new("sleep");
    e.args = vec!["1000".into()];
    e.stdin = false;
    let pid = host.start(id, e).unwrap();
    // `kill -TERM 1` from inside the guest: the agent shuts down as for
    // SHUTDOWN with the default grace, then powers off.
    let killer = new_id();
    let kpid = host.start(killer, sh_exec("kill -TERM 1")).unwrap();
    let t = Instant::now();
    let mut exited = HashMap::new();
    loop {
        match host.next_for_any(STEP) {
            Some((i, Ev::Exited(x))) if i == id || i == killer => {
                exited.insert(i, x);
            }
            Some((0, Ev::ShutdownDone)) => break,
            Some((_, Ev::Stdout(_) | Ev::Stderr(_) | Ev::StdinAck(_))) => {}
            Some(other) => panic!("unexpected {other:?} during the shutdown"),
            None => panic!("connection closed before SHUTDOWN_DONE"),
        }
    }
    let _ = (pid, kpid);
    assert_eq!(
        exited.get(&id).map(|x| x.signal),
        Some(Some(15)),
        "{exited:?}"
    );
    assert!(exited.contains_key(&killer), "{exited:?}");
    assert!(host.next_for_any(Duration::from_secs(30)).is_none());
    eprintln!(
        "SIGTERM to PID 1: shut down and powered off in {:?}",
        t.elapsed()
    );
}
