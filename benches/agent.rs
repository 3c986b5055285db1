//! The agent against native baselines taken in the same run.
//!
//! `cargo bench --bench agent [-- --quick] [-- --static PATH] [-- --only exec,ping]`
//! runs the release `agentd --stdio` and prints a markdown table: each
//! measure, the native baseline measured here and now, the ratio, and the
//! target (`--only` picks measures: exec, ping, stdout, tty, stdin, rate,
//! memory). The
//! machine is shared and noisy: numbers are judged over repeated runs
//! (`benches/run.sh` runs this three times and keeps the median), never by
//! an assertion.
//!
//! The host is the test support's [`Conn`] with blocking reads and writes
//! (no timeouts: no system call of its own beside the reads and writes),
//! checking every frame the agent sends against the contract.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agentd::codec;
use agentd::messages::{Ack, Exec, Kind, Message, Ready, Shutdown};
use support::checker::Checker;
use support::host::{AgentProcess, Conn, Env, Filled, Opts};
use support::proc::{clock_ticks_per_second, cpu_ticks_with_children, status_number};

/// The one variable of the agent's environment, so of its sessions'.
const SESSION_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The same environment for a native execve.
fn native_env() -> [std::ffi::CString; 1] {
    [cstr(&format!("PATH={SESSION_PATH}"))]
}

/// The agent under test: `--agent PATH`, else the release build's agentd.
static AGENTD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn agentd_path() -> &'static str {
    AGENTD.get_or_init(|| support::AGENTD.to_owned())
}

struct Host {
    /// Killed, with every session, when dropped.
    process: AgentProcess,
    conn: Conn,
    ready: Ready,
    out: Vec<u8>,
}

impl Host {
    fn start(args: &[&str]) -> Host {
        // The environment the agent's sessions inherit, and the one the
        // native baselines exec with: not cargo's (its LD_LIBRARY_PATH sends
        // the dynamic loader of every child through a dozen directories).
        let opts = Opts {
            env: Env::Only(vec![("PATH".into(), SESSION_PATH.into())]),
            program: Some(agentd_path().into()),
            ..Opts::plain(args)
        };
        let (process, to_agent, from_agent) = AgentProcess::spawn_stdio(&opts);
        // No write timeout: the fd stays blocking.
        let writer = support::host::Host::new(to_agent, None);
        let checker = Checker::new(Some(process.ready_pid()));
        let mut host = Host {
            process,
            conn: Conn::with(from_agent, writer, checker),
            ready: Ready::default(),
            out: Vec::new(),
        };
        host.recv(|kind, _, _| kind == Kind::Ready as u8);
        host.ready = host.conn.ready.clone().expect("READY was read");
        host
    }

    fn pid(&self) -> u32 {
        self.process.host_pid as u32
    }

    fn send(&mut self, msg: &Message, id: u32) {
        self.out.clear();
        msg.encode(id, &mut self.out)
            .expect("the test's frames fit");
        self.conn.send_raw(&self.out);
    }

    /// Calls `f` on frames until it returns true.
    fn recv(&mut self, mut f: impl FnMut(u8, u32, &[u8]) -> bool) -> &mut Self {
        loop {
            while let Some(frame) = self.conn.next_buffered() {
                if f(frame.kind, frame.id, frame.payload) {
                    return self;
                }
            }
            let filled = self.conn.fill(None, None);
            assert!(filled != Filled::Eof, "agent closed its stdout");
        }
    }

    fn exec(&mut self, id: u32, exec: Exec) {
        self.send(&Message::Exec(Box::new(exec)), id);
    }

    /// Ends every session and the agent the orderly way, so no session's
    /// process outlives the benchmark (a killed agent would orphan them).
    fn shutdown(&mut self) {
        self.send(&Message::Shutdown(Shutdown { grace_ms: 200 }), 0);
        self.recv(|kind, _, _| kind == Kind::ShutdownDone as u8);
    }

    fn wait_exited(&mut self, id: u32) {
        self.recv(|kind, fid, _| kind == Kind::Exited as u8 && fid == id);
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).expect("no NUL")
}

/// fork + execve + waitpid of /bin/true, the way the agent does it minus
/// the protocol.
fn native_true() -> Duration {
    let path = cstr("/bin/true");
    let argv = [path.as_ptr(), std::ptr::null()];
    let env = native_env();
    let envp = [env[0].as_ptr(), std::ptr::null()];
    let t = Instant::now();
    // SAFETY: the child only calls execve and _exit.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    t.elapsed()
}

struct Row {
    /// What the median of several runs is taken over.
    key: f64,
    measure: String,
    agent: String,
    baseline: String,
    ratio: String,
    target: String,
}

fn row(
    key: f64,
    measure: &str,
    agent: String,
    baseline: String,
    ratio: String,
    target: &str,
) -> Row {
    Row {
        key,
        measure: measure.to_owned(),
        agent,
        baseline,
        ratio,
        target: target.to_owned(),
    }
}

/// A row of p50 / p99 latencies, the ratio taken at p50.
fn latency_row(
    measure: &str,
    mut agent: Vec<Duration>,
    mut native: Vec<Duration>,
    target: &str,
) -> Row {
    agent.sort();
    native.sort();
    let (a50, a99) = (percentile(&agent, 50), percentile(&agent, 99));
    let (n50, n99) = (percentile(&native, 50), percentile(&native, 99));
    let ratio = a50.as_secs_f64() / n50.as_secs_f64();
    row(
        ratio,
        measure,
        format!("{} / {}", us(a50), us(a99)),
        format!("{} / {}", us(n50), us(n99)),
        format!("{ratio:.2}×"),
        target,
    )
}

fn bench_exec_latency(n: usize) -> Row {
    let mut host = Host::start(&[]);
    let mut agent = Vec::with_capacity(n);
    let mut native = Vec::with_capacity(n);
    for i in 0..n {
        // Interleave so both see the same machine.
        native.push(native_true());
        let id = i as u32 + 1;
        let t = Instant::now();
        host.exec(id, Exec::new("/bin/true"));
        host.wait_exited(id);
        agent.push(t.elapsed());
    }
    latency_row(
        &format!("exec `/bin/true` → EXITED, p50 / p99 ({n} runs)"),
        agent,
        native,
        "≤ 1.25× at p50",
    )
}

fn bench_ping(n: usize) -> Row {
    let mut host = Host::start(&[]);
    let payload = [0x5au8; 64];
    let mut agent = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        host.send(&Message::Ping(&payload), i as u32);
        host.recv(|kind, _, _| kind == Kind::Pong as u8);
        agent.push(t.elapsed());
    }
    // Native: the same frame bytes over a socketpair to a forked echo.
    let mut frame = Vec::new();
    Message::Ping(&payload)
        .encode(1, &mut frame)
        .expect("the test's frames fit");
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array for socketpair to fill.
    assert_eq!(
        unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        },
        0
    );
    // SAFETY: socketpair returned two fds we own.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child echoes with read/write and _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // The child's copy of the parent's end must go, or the echo never
        // sees end of file.
        // SAFETY: closing an fd number in the forked child.
        unsafe { libc::close(a.as_raw_fd()) };
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: valid buffer and fd.
            let r = unsafe { libc::read(b.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(0) };
            }
            // SAFETY: echo what was read.
            unsafe { libc::write(b.as_raw_fd(), buf.as_ptr().cast(), r as usize) };
        }
    }
    drop(b);
    let mut sock = std::fs::File::from(a);
    let mut back = vec![0u8; frame.len()];
    let mut native = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        sock.write_all(&frame).expect("write");
        sock.read_exact(&mut back).expect("read");
        native.push(t.elapsed());
    }
    drop(sock);
    // SAFETY: reaping the echo child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    latency_row(
        &format!("PING → PONG round trip, p50 / p99 ({n} runs)"),
        agent,
        native,
        "≤ 2×",
    )
}

fn native_pipe_seconds(bytes: u64) -> f64 {
    let cpu = children_cpu();
    let t = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c {bytes} /dev/zero | cat > /dev/null"))
        .status()
        .expect("sh");
    assert!(status.success());
    let secs = t.elapsed().as_secs_f64();
    if std::env::var_os("AGENTD_BENCH_CPU").is_some() {
        let all = children_cpu() - cpu;
        eprintln!("native head | cat: {secs:.2} s wall, all {all:.2} s");
    }
    secs
}

/// `head | RELAY | cat`, where RELAY is this program with `--relay`: the
/// cheapest process that can stand between a producer and a consumer (a
/// blocking splice loop: no poll, no framing, no copy). The agent's path
/// has such a third process (the agent, then the host reads), the native
/// baseline does not: this shows what the third process alone costs on
/// this machine.
fn relay_pipe_seconds(bytes: u64) -> f64 {
    let me = std::env::current_exe().expect("own path");
    let t = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {bytes} /dev/zero | '{}' --relay | cat > /dev/null",
            me.display()
        ))
        .status()
        .expect("sh");
    assert!(status.success());
    t.elapsed().as_secs_f64()
}

/// `--relay`: moves stdin to stdout with splice(2) until end of file.
fn relay() -> ! {
    loop {
        // SAFETY: splice between fds 0 and 1 (pipes, in the relay
        // baseline), null offsets.
        let n = unsafe {
            libc::splice(
                0,
                std::ptr::null_mut(),
                1,
                std::ptr::null_mut(),
                1 << 20,
                libc::SPLICE_F_MOVE,
            )
        };
        if n == 0 {
            std::process::exit(0);
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            eprintln!("relay: {}", io::Error::last_os_error());
            std::process::exit(1);
        }
    }
}

/// CPU time (user + system) of this process's reaped children so far.
fn children_cpu() -> f64 {
    rusage(libc::RUSAGE_CHILDREN)
}

fn bench_stdout(bytes: u64, tty: bool) -> f64 {
    let mut host = Host::start(&[]);
    let mut exec = Exec::new("head");
    exec.args = vec!["-c".into(), bytes.to_string(), "/dev/zero".into()];
    exec.tty = tty;
    exec.stdin = false;
    let host_cpu = own_cpu();
    let t = Instant::now();
    host.exec(1, exec);
    let mut got = 0u64;
    let mut frames = 0u64;
    host.recv(|kind, _, payload| {
        if kind == Kind::Stdout as u8 {
            got += payload.len() as u64;
            frames += 1;
        }
        kind == Kind::Exited as u8
    });
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(got, bytes, "lost output");
    report_cpu(
        &format!("stdout ({frames} frames)"),
        host.pid(),
        secs,
        own_cpu() - host_cpu,
    );
    bytes as f64 / secs
}

/// CPU time (user + system) of this process so far, in seconds.
fn own_cpu() -> f64 {
    rusage(libc::RUSAGE_SELF)
}

fn rusage(who: libc::c_int) -> f64 {
    // SAFETY: rusage is plain data; all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct it is given; `who` is one
    // of the constants it accepts.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// With `AGENTD_BENCH_CPU` set, prints for one trial to stderr the agent's
/// CPU time (user + system, from /proc), its reaped children's (the
/// session's program: the agent was fresh), and the host's (this process,
/// `host_cpu`): steadier than throughput for comparing two builds of the
/// agent on a noisy machine, and it shows where a change moved the cost.
fn report_cpu(what: &str, pid: u32, secs: f64, host_cpu: f64) {
    if std::env::var_os("AGENTD_BENCH_CPU").is_none() {
        return;
    }
    let Some((user, system, children)) = cpu_ticks_with_children(pid as i32) else {
        return;
    };
    let hz = clock_ticks_per_second() as f64;
    let (user, system) = (user as f64 / hz, system as f64 / hz);
    let children = children as f64 / hz;
    eprintln!(
        "{what}: {secs:.2} s wall, agent CPU {user:.2} s user + {system:.2} s system, \
         session's program {children:.2} s, host {host_cpu:.2} s, all {:.2} s",
        user + system + children + host_cpu
    );
}

fn bench_stdin(bytes: u64) -> f64 {
    let host = Host::start(&[]);
    let window = u64::from(host.ready.stdin_window);
    let Host {
        process, mut conn, ..
    } = host;
    let stdin = conn.host.clone();
    let mut exec = Exec::new("sh");
    exec.args = vec!["-c".into(), "cat > /dev/null".into()];
    let mut buf = Vec::new();
    Message::Exec(Box::new(exec))
        .encode(1, &mut buf)
        .expect("the test's frames fit");
    stdin.send_raw(&buf);
    let credit = Arc::new((Mutex::new(window), Condvar::new()));
    let reader_credit = credit.clone();
    let reader = std::thread::spawn(move || loop {
        while let Some(f) = conn.next_buffered() {
            if f.kind == Kind::StdinAck as u8 {
                let Ok(Message::StdinAck(Ack { bytes })) = Message::decode(f) else {
                    panic!()
                };
                let (m, c) = &*reader_credit;
                *m.lock().expect("lock") += u64::from(bytes);
                c.notify_one();
            }
            if f.kind == Kind::Exited as u8 {
                return;
            }
        }
        if conn.fill(None, None) == Filled::Eof {
            return;
        }
    });
    let chunk = vec![0u8; 64 * 1024];
    let host_cpu = own_cpu();
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64);
        {
            let (m, c) = &*credit;
            let mut avail = m.lock().expect("lock");
            while *avail < n {
                avail = c.wait(avail).expect("wait");
            }
            *avail -= n;
        }
        buf.clear();
        codec::append_raw(&mut buf, Kind::Stdin as u8, 1, &chunk[..n as usize])
            .expect("the test's frames fit");
        stdin.send_raw(&buf);
        sent += n;
    }
    buf.clear();
    codec::append_raw(&mut buf, Kind::StdinClose as u8, 1, &[]).expect("the test's frames fit");
    stdin.send_raw(&buf);
    reader.join().expect("reader");
    let secs = t.elapsed().as_secs_f64();
    report_cpu("stdin", process.host_pid as u32, secs, own_cpu() - host_cpu);
    drop(stdin);
    drop(process);
    bytes as f64 / secs
}

/// Throughput in bytes per second, the agent's (from `agent`) and the native
/// pipe's, each the median of `trials` runs taken in turns. One run of
/// `head | cat` alone swings by a factor of two on a shared two-core
/// machine (whether the two land on one core or two), so a single run of
/// each would mostly measure the scheduler.
fn throughput(trials: usize, bytes: u64, agent: impl FnMut() -> f64) -> (f64, f64) {
    let (a, n, _) = throughput_with_relay(trials, bytes, agent, false);
    (a, n)
}

/// [`throughput`], and with `relay` also the median of the relay baseline
/// ([`relay_pipe_seconds`]) taken in the same turns (0 without).
fn throughput_with_relay(
    trials: usize,
    bytes: u64,
    mut agent: impl FnMut() -> f64,
    relay: bool,
) -> (f64, f64, f64) {
    let mut a = Vec::new();
    let mut n = Vec::new();
    let mut r = Vec::new();
    for _ in 0..trials.max(1) {
        a.push(agent());
        n.push(bytes as f64 / native_pipe_seconds(bytes));
        if relay {
            r.push(bytes as f64 / relay_pipe_seconds(bytes));
        }
    }
    let median = |v: &mut Vec<f64>| {
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut a), median(&mut n), median(&mut r))
}

fn bench_exec_rate(total: usize, in_flight: usize) -> (f64, f64) {
    let mut host = Host::start(&[]);
    let t = Instant::now();
    let mut next = 1u32;
    let mut done = 0usize;
    for _ in 0..in_flight.min(total) {
        host.exec(next, Exec::new("/bin/true"));
        next += 1;
    }
    while done < total {
        let mut exited = 0;
        host.recv(|kind, _, _| {
            if kind == Kind::Exited as u8 {
                exited += 1;
                return true;
            }
            false
        });
        done += exited;
        if (next as usize) <= total {
            host.exec(next, Exec::new("/bin/true"));
            next += 1;
        }
    }
    let agent = total as f64 / t.elapsed().as_secs_f64();

    let path = cstr("/bin/true");
    let argv = [path.as_ptr(), std::ptr::null()];
    let env = native_env();
    let envp = [env[0].as_ptr(), std::ptr::null()];
    let spawn = || {
        // SAFETY: the child only calls execve and _exit.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
    };
    let t = Instant::now();
    let mut started = 0;
    for _ in 0..in_flight.min(total) {
        spawn();
        started += 1;
    }
    let mut reaped = 0;
    while reaped < total {
        // SAFETY: reaping any child.
        unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
        reaped += 1;
        if started < total {
            spawn();
            started += 1;
        }
    }
    (agent, total as f64 / t.elapsed().as_secs_f64())
}

fn status_field(pid: u32, field: &str) -> u64 {
    status_number(pid as i32, field).unwrap_or(0)
}

fn kib(v: u64) -> String {
    format!("{:.2} MiB", v as f64 / 1024.0)
}

fn bench_memory(sessions: usize, flood_secs: u64) -> (u64, u64, u64, u64) {
    let mut host = Host::start(&["--max-sessions", &(sessions + 8).to_string()]);
    let pid = host.pid();
    std::thread::sleep(Duration::from_millis(200));
    let idle = status_field(pid, "VmRSS");
    let before = status_field(pid, "voluntary_ctxt_switches");
    std::thread::sleep(Duration::from_secs(if flood_secs >= 5 { 10 } else { 2 }));
    let wakeups = status_field(pid, "voluntary_ctxt_switches") - before;
    for i in 0..sessions {
        let mut e = Exec::new("sleep");
        e.args = vec!["1000".into()];
        e.stdin = false;
        host.exec(i as u32 + 1, e);
        host.recv(|kind, _, _| kind == Kind::Started as u8);
    }
    std::thread::sleep(Duration::from_millis(200));
    let many = status_field(pid, "VmRSS");
    host.shutdown();

    // One session floods while the host reads nothing.
    let mut host = Host::start(&[]);
    let pid = host.pid();
    let mut e = Exec::new("cat");
    e.args = vec!["/dev/zero".into()];
    e.stdin = false;
    host.exec(1, e);
    std::thread::sleep(Duration::from_secs(flood_secs));
    let flood = status_field(pid, "VmRSS");
    host.shutdown();
    (idle, wakeups, many, flood)
}

fn static_size(path: Option<&str>) -> Option<u64> {
    let path = path?;
    let tmp = std::env::temp_dir().join(format!("agentd-stripped-{}", std::process::id()));
    std::fs::copy(path, &tmp).ok()?;
    let ok = Command::new("strip").arg(&tmp).status().ok()?.success();
    let size = std::fs::metadata(&tmp).ok()?.len();
    let _ = std::fs::remove_file(&tmp);
    ok.then_some(size)
}

/// The measures `--only NAME[,NAME]` can select.
const MEASURES: [&str; 7] = ["exec", "ping", "stdout", "tty", "stdin", "rate", "memory"];

fn suite(quick: bool, static_path: Option<&str>, only: &[String]) -> Vec<Row> {
    let want = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let (n_exec, n_ping, bytes, trials, rate_total, sessions, flood) = if quick {
        (200, 500, 64u64 << 20, 1, 500, 100, 1)
    } else {
        (1000, 5000, 1u64 << 30, 5, 3000, 1000, 5)
    };
    let mib = |b: f64| format!("{:.0} MiB/s", b / (1 << 20) as f64);
    let mut rows = Vec::new();
    if want("exec") {
        rows.push(bench_exec_latency(n_exec));
    }
    if want("ping") {
        rows.push(bench_ping(n_ping));
    }
    let size = if bytes >= 1 << 30 {
        "1 GiB".to_owned()
    } else {
        format!("{} MiB", bytes >> 20)
    };
    if want("stdout") {
        let (a, n, r) = throughput_with_relay(trials, bytes, || bench_stdout(bytes, false), true);
        rows.push(row(
            a / n,
            &format!("stdout throughput, {size}, pipe session (median of {trials})"),
            mib(a),
            mib(n),
            format!("{:.2}×", a / n),
            "≥ 0.7×",
        ));
        rows.push(row(
            a / r,
            &format!("the same against a relay: `head | splice loop | cat` (median of {trials})"),
            mib(a),
            mib(r),
            format!("{:.2}×", a / r),
            "report",
        ));
    }
    if want("tty") {
        // One trial: a terminal moves tens of MiB/s, and this is reported,
        // not judged.
        let (a, n) = throughput(1, bytes, || bench_stdout(bytes, true));
        rows.push(row(
            a / n,
            &format!("stdout throughput, {size}, tty session"),
            mib(a),
            mib(n),
            format!("{:.2}×", a / n),
            "report",
        ));
    }
    if want("stdin") {
        let (a, n) = throughput(trials, bytes, || bench_stdin(bytes));
        rows.push(row(
            a / n,
            &format!("stdin throughput, {size} into `cat > /dev/null` (median of {trials})"),
            mib(a),
            mib(n),
            format!("{:.2}×", a / n),
            "≥ 0.6×",
        ));
    }
    if want("rate") {
        let (a, n) = bench_exec_rate(rate_total, 64);
        rows.push(row(
            a / n,
            &format!("exec rate, 64 in flight, `/bin/true` ({rate_total} execs)"),
            format!("{a:.0}/s"),
            format!("{n:.0}/s"),
            format!("{:.2}×", a / n),
            "≥ 0.8×",
        ));
    }
    if want("memory") {
        let (idle, wakeups, many, flooding) = bench_memory(sessions, flood);
        rows.push(row(
            idle as f64,
            "agent RSS, idle",
            kib(idle),
            "—".into(),
            "—".into(),
            "≤ 2 MiB",
        ));
        rows.push(row(
            many as f64,
            &format!("agent RSS, {sessions} concurrent `sleep` sessions"),
            kib(many),
            "—".into(),
            "—".into(),
            "≤ 32 MiB",
        ));
        rows.push(row(
            flooding as f64,
            &format!("agent RSS, one session flooding, host not reading for {flood} s"),
            kib(flooding),
            "—".into(),
            format!("idle + {}", kib(flooding.saturating_sub(idle))),
            "≤ idle + 2 MiB",
        ));
        rows.push(row(
            wakeups as f64,
            &format!(
                "agent wake-ups while idle for {} s",
                if flood >= 5 { 10 } else { 2 }
            ),
            wakeups.to_string(),
            "—".into(),
            "—".into(),
            "0",
        ));
    }
    if let Some(size) = static_size(static_path).filter(|_| want("memory")) {
        rows.push(row(
            size as f64,
            "stripped static `agentd`",
            format!("{:.2} MiB", size as f64 / (1 << 20) as f64),
            "—".into(),
            "—".into(),
            "≤ 3 MiB",
        ));
    }
    rows
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--relay") {
        relay();
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
    };
    let quick = args.iter().any(|a| a == "--quick");
    let static_path = value("--static");
    let runs: usize = value("--runs")
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
        .max(1);
    let only: Vec<String> = value("--only")
        .map(|o| o.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    if let Some(bad) = only.iter().find(|o| !MEASURES.contains(&o.as_str())) {
        eprintln!(
            "--only: unknown measure {bad:?}; one of {}",
            MEASURES.join(", ")
        );
        std::process::exit(2);
    }
    if let Some(agent) = value("--agent") {
        let _ = AGENTD.set(agent.to_owned());
    }
    let mut all: Vec<Vec<Row>> = Vec::new();
    for run in 0..runs {
        eprintln!("run {} of {runs}", run + 1);
        all.push(suite(quick, static_path, &only));
    }
    // Per measure, the run with the median value (of the ratio where there
    // is a baseline).
    let measures = all[0].len();
    let mut rows = Vec::new();
    for _ in 0..measures {
        let mut candidates: Vec<Row> = all.iter_mut().map(|run| run.remove(0)).collect();
        candidates.sort_by(|a, b| a.key.total_cmp(&b.key));
        rows.push(candidates.swap_remove(candidates.len() / 2));
    }
    println!(
        "agent: `{}`; {}; median of {runs} run(s) per measure",
        agentd_path(),
        if quick { "quick sizes" } else { "full sizes" }
    );
    println!();
    println!("| measure | agent | native baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.measure, r.agent, r.baseline, r.ratio, r.target
        );
    }
}
