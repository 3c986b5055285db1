//! agentctl: run commands in an agentd guest, docker-exec style.
//!
//! ```text
//! agentctl [--connect unix:PATH|vsock:CID:PORT|hvsock:UDS:PORT | --port PATH
//!           | --agent 'CMD ARGS'] COMMAND
//! agentctl exec [-d] [-i] [-t] [--name TAG] [--timeout DUR] [--memory SIZE]
//!               [--pids N] [--cpus N] [-e KEY=VALUE]... [--clear-env] [-w DIR]
//!               [-u USER] [--rlimit NAME=SOFT[:HARD]]... [--] CMD [ARG...]
//! agentctl ps [-a] [-q] [--format table|json|TEMPLATE]
//! agentctl attach [-i] [-t] [--no-replay|--tail N|--since OFF] [--detach-keys K] NAME
//! agentctl kill [-s SIGNAL] NAME...
//! agentctl time [--sync | --set TIME]
//! agentctl ping [-c N]
//! agentctl shutdown [--grace MS]
//! agentctl cp [-a] [-u USER] SRC DST          (a guest path is :PATH; - is a tar stream)
//! agentctl fs ls|stat|rm|mkdir|mv|cat|put|watch [-u USER] ...
//! agentctl port-forward [--address ADDR] LOCAL:REMOTE...
//! ```
//!
//! With none of `--connect`, `--port`, `--agent`, agentctl starts the
//! `agentd` next to its own executable with `--stdio`, so it works on any
//! Linux machine without a VM.
//!
//! Exit status of `exec`: the remote status (code, or 128 + signal); 127
//! when the program was not found, 126 when it could not be started for
//! another reason; 125 when agentctl itself failed (transport, protocol,
//! usage).

mod cp;
mod fs;
mod port_forward;

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

mod attach;
mod kill;
mod ps;
mod time;
mod units;

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios::{self, SetArg, Termios};

use agentd::client::{
    Client, Command, Error, Event, ExecFailedKind, FsErrorKind, NetErrorKind, SessionHandle,
};
use agentd::messages::{Rlimit, RlimitResource};

/// Exit status when agentctl itself fails (transport, protocol, usage).
const EXIT_AGENTCTL: i32 = 125;
/// Exit status when the program could not be started.
const EXIT_CANNOT_RUN: i32 = 126;
/// Exit status when the program was not found.
const EXIT_NOT_FOUND: i32 = 127;

/// The output window agentctl asks for: output beyond it waits in the
/// remote process (blocked in write) until agentctl has written what it
/// has, so a slow local stdout never grows agentctl's memory.
const OUTPUT_WINDOW: u32 = 1 << 20;

#[derive(Parser, Debug)]
#[command(
    name = "agentctl",
    version,
    about = "Run commands in an agentd guest, docker-exec style",
    long_about = "Run commands in an agentd guest, docker-exec style.\n\n\
        With none of --connect, --port, --agent, agentctl starts the agentd that sits \
        next to its own executable with --stdio: `agentctl exec -it -- sh` then gives \
        a shell on this machine, no VM needed."
)]
struct Cli {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug)]
struct Target {
    /// Connect to a listening agent: unix:PATH (agentd --listen unix:PATH, or
    /// QEMU's -chardev socket), vsock:CID:PORT (AF_VSOCK to a guest under
    /// vhost-vsock), or hvsock:UDS_PATH:PORT (the hybrid vsock socket of
    /// Firecracker or cloud-hypervisor).
    #[arg(long, value_name = "ADDRESS", global = true, conflicts_with_all = ["port", "agent"])]
    connect: Option<String>,
    /// Open a port: a character device (serial line, pty; put in raw mode) or a
    /// QEMU FIFO pair PATH.in (host to guest) and PATH.out (guest to host).
    #[arg(long, value_name = "PATH", global = true, conflicts_with = "agent")]
    port: Option<PathBuf>,
    /// Start this command and talk to it over its stdin and stdout, for example
    /// 'ssh host agentd --stdio'. Split on whitespace; no shell quoting.
    #[arg(long, value_name = "'CMD ARGS'", global = true)]
    agent: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a command in a new session and exit with its status.
    Exec(ExecArgs),
    /// List the agent's sessions, like docker ps.
    Ps(ps::PsArgs),
    /// Attach to a running session: replay its output, then follow it.
    Attach(attach::AttachArgs),
    /// Send a signal to a session's whole tree (default SIGKILL).
    Kill(kill::KillArgs),
    /// Show the guest's clock against the host's, or set it.
    Time(time::TimeArgs),
    /// Measure round trips to the agent (PING/PONG).
    Ping(PingArgs),
    /// End every session and stop the agent (power the VM off when it is PID 1).
    Shutdown(ShutdownArgs),
    /// Copy files and directories between this machine and the guest (docker cp style).
    Cp(cp::CpArgs),
    /// File operations on guest paths: ls, stat, rm, mkdir, mv, cat, put, watch.
    Fs(fs::FsArgs),
    /// Forward local ports to guest ports or Unix sockets (kubectl port-forward style).
    PortForward(port_forward::PortForwardArgs),
}

#[derive(Args, Debug)]
struct ExecArgs {
    /// Run detached: print the session's number and exit; the session goes
    /// on (see ps, attach, kill). With -i its stdin stays open for attach -i.
    #[arg(short, long)]
    detach: bool,
    /// Tag the session, to find it by in ps, attach and kill.
    #[arg(long, value_name = "TAG")]
    name: Option<String>,
    /// End the session's whole tree after this long (SIGTERM, then SIGKILL
    /// after --kill-grace), e.g. 30s, 500ms, 5m.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    timeout: Option<Duration>,
    /// Between the timeout's SIGTERM and its SIGKILL (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration, requires = "timeout")]
    kill_grace: Option<Duration>,
    /// Memory limit of the session's cgroup, e.g. 256M, 1G (needs an agent
    /// with per-session cgroups).
    #[arg(short = 'm', long, value_name = "SIZE", value_parser = units::parse_size)]
    memory: Option<u64>,
    /// Most processes the session's cgroup may hold.
    #[arg(long, value_name = "N")]
    pids: Option<u32>,
    /// CPUs' worth of time the session may use, e.g. 0.5.
    #[arg(long, value_name = "N", value_parser = units::parse_cpus)]
    cpus: Option<f64>,
    /// Bytes of each output stream the agent keeps for attach, e.g. 1M (0: none).
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size_u32)]
    replay: Option<u32>,
    /// Forward local stdin to the process (without it the remote stdin is /dev/null).
    #[arg(short, long)]
    interactive: bool,
    /// Run on a remote terminal sized like the local one. With -i and a local
    /// terminal, the local terminal is put in raw mode (Ctrl-C goes to the
    /// remote side as a byte) and restored on exit. Without -i it is left as
    /// it is, as docker does: no byte is forwarded then, so Ctrl-C must stay
    /// a signal (forwarded as SIGINT) to be able to interrupt.
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable; KEY alone copies the local value, if any.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Start from an empty environment instead of the agent's default one.
    #[arg(long)]
    clear_env: bool,
    /// Working directory of the process.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// Run as USER: name, uid, name:group or uid:gid.
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
    /// Set a resource limit, e.g. nofile=1024 or core=unlimited. HARD defaults
    /// to SOFT. Names: cpu fsize data stack core rss nproc nofile memlock as
    /// locks sigpending msgqueue nice rtprio rttime.
    #[arg(long, value_name = "NAME=SOFT[:HARD]", value_parser = parse_rlimit)]
    rlimit: Vec<Rlimit>,
    /// The program (looked up in the remote PATH) and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct PingArgs {
    /// Number of round trips.
    #[arg(short = 'c', long = "count", value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Pause between round trips, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    interval: u64,
}

#[derive(Args, Debug)]
struct ShutdownArgs {
    /// How long sessions get between SIGTERM and SIGKILL, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    grace: u32,
}

fn parse_limit_value(s: &str) -> Result<u64, String> {
    if s == "unlimited" || s == "infinity" {
        return Ok(u64::MAX);
    }
    s.parse::<u64>()
        .map_err(|_| format!("{s:?} is not a number or \"unlimited\""))
}

fn parse_rlimit(s: &str) -> Result<Rlimit, String> {
    let (name, values) = s
        .split_once('=')
        .ok_or_else(|| "expected NAME=SOFT[:HARD]".to_owned())?;
    if RlimitResource::parse(name).is_none() {
        let names: Vec<_> = RlimitResource::ALL.iter().map(|r| r.as_str()).collect();
        return Err(format!(
            "unknown resource {name:?}; one of: {}",
            names.join(" ")
        ));
    }
    let (soft, hard) = match values.split_once(':') {
        Some((soft, hard)) => (parse_limit_value(soft)?, parse_limit_value(hard)?),
        None => {
            let v = parse_limit_value(values)?;
            (v, v)
        }
    };
    if soft > hard {
        return Err(format!("soft limit {soft} is above hard limit {hard}"));
    }
    Ok(Rlimit {
        resource: name.to_owned(),
        soft,
        hard,
    })
}

// ---------------------------------------------------------------------------
// The local terminal.

/// The local terminal's settings while it is in raw mode, so that every way
/// out (normal exit, error, signal, panic) can restore them.
static SAVED_TERMIOS: Mutex<Option<Termios>> = Mutex::new(None);

fn saved_termios() -> std::sync::MutexGuard<'static, Option<Termios>> {
    SAVED_TERMIOS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Puts the local terminal (stdin) back as it was, if agentctl changed it.
fn restore_terminal() {
    if let Some(t) = saved_termios().take() {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSADRAIN, &t);
    }
}

/// Raw mode on stdin for as long as it lives.
struct RawMode;

impl RawMode {
    fn enable() -> io::Result<RawMode> {
        let stdin = io::stdin();
        let original = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = original.clone();
        termios::cfmakeraw(&mut raw);
        *saved_termios() = Some(original);
        if let Err(e) = termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw) {
            saved_termios().take();
            return Err(e.into());
        }
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn is_raw() -> bool {
    saved_termios().is_some()
}

/// The local terminal size (rows, cols), from stdin or else stdout.
fn terminal_size() -> Option<(u16, u16)> {
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `struct winsize` to the pointer,
        // which points to one; on a descriptor that is not a terminal it
        // fails and writes nothing.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// Prints a message for people on stderr (with a carriage return when the
/// terminal is raw).
fn complain(msg: impl std::fmt::Display) {
    let end = if is_raw() { "\r\n" } else { "\n" };
    let _ = write!(io::stderr(), "agentctl: {msg}{end}");
}

/// Exits the process, restoring the terminal first.
///
/// It does not flush stdout: it may run on the signal thread while the main
/// thread holds stdout's lock, and everything agentctl prints is flushed as
/// it is written.
fn exit(code: i32) -> ! {
    restore_terminal();
    std::process::exit(code)
}

fn fail(msg: impl std::fmt::Display) -> ! {
    complain(msg);
    exit(EXIT_AGENTCTL)
}

/// Exit status of `cp` and `fs` when the operation itself failed (the
/// guest refused it, or a local file did), as `docker cp`'s.
const EXIT_OP_FAILED: i32 = 1;

/// What to do about a failed file or connection operation, by kind.
fn hint(e: &Error) -> &'static str {
    match (e.fs_error_kind(), e.net_error_kind()) {
        (Some(FsErrorKind::NotFound), _) => "check the path",
        (Some(FsErrorKind::PermissionDenied), _) => "choose a user who may with -u USER",
        (Some(FsErrorKind::Exists), _) => "remove it first or pick another name",
        (Some(FsErrorKind::NotEmpty), _) => "use -r to remove it and its contents",
        (Some(FsErrorKind::IsADirectory), _) => "name a file, or use -r",
        (Some(FsErrorKind::NotADirectory), _) => "a component of the path is a file",
        (Some(FsErrorKind::NoSpace), _) => "free space in the guest",
        (Some(FsErrorKind::ReadOnly), _) => "that file system is mounted read-only",
        (Some(FsErrorKind::BadUser), _) => "name a user that exists in the guest",
        (_, Some(NetErrorKind::Refused)) => "is anything listening there in the guest?",
        (_, Some(NetErrorKind::TimedOut)) => "is the guest address reachable?",
        _ => "",
    }
}

/// Reports a failed `cp`/`fs` operation on one line and exits: 1 when the
/// operation failed, 125 when agentctl could not do its job (transport,
/// protocol).
fn op_fail(e: &Error) -> ! {
    let h = hint(e);
    if h.is_empty() {
        complain(e);
    } else {
        complain(format!("{e}; {h}"));
    }
    match e {
        Error::Fs(_) | Error::Net(_) | Error::Io { .. } => exit(EXIT_OP_FAILED),
        _ => exit(EXIT_AGENTCTL),
    }
}

// ---------------------------------------------------------------------------
// Signals.

/// What the signal thread needs to know about the session.
#[derive(Default)]
struct SignalState {
    session: Option<SessionHandle>,
    client: Option<Client>,
    tty: bool,
    forwarded: u32,
}

fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGWINCH,
    ] {
        set.add(s);
    }
    set
}

/// Waits for a PONG (so that what was queued before has reached the agent),
/// but not for long.
fn flush_briefly(client: &Client) {
    let (tx, rx) = mpsc::channel();
    let c = client.clone();
    std::thread::spawn(move || {
        let _ = tx.send(c.ping());
    });
    let _ = rx.recv_timeout(Duration::from_millis(500));
}

/// The signal thread: SIGWINCH becomes RESIZE; SIGINT, SIGTERM, SIGHUP and
/// SIGQUIT are forwarded to the remote process group. With the terminal in raw
/// mode they also end agentctl (after restoring the terminal); otherwise
/// the remote side decides, and a second one ends agentctl.
fn signal_thread(set: SigSet, state: Arc<Mutex<SignalState>>) {
    loop {
        let Ok(sig) = set.wait() else { continue };
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        match sig {
            Signal::SIGWINCH => {
                if let (true, Some(h), Some((rows, cols))) = (st.tty, &st.session, terminal_size())
                {
                    let _ = h.resize(rows, cols);
                }
            }
            _ => {
                let code = 128 + sig as i32;
                let Some(h) = st.session.clone() else {
                    exit(code)
                };
                st.forwarded += 1;
                if st.forwarded > 1 {
                    exit(code)
                }
                let _ = h.signal(sig as i32);
                if is_raw() {
                    if let Some(c) = &st.client {
                        flush_briefly(c);
                    }
                    exit(code)
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Commands.

/// Connects as `target` says. `clock_sync`: let the library set a VM's
/// clock after READY (off for `agentctl time`, which shows the skew).
fn connect(target: &Target, clock_sync: bool) -> Client {
    let mut builder = Client::builder();
    builder.clock_sync(clock_sync);
    let result = if let Some(addr) = &target.connect {
        builder.connect(addr)
    } else if let Some(path) = &target.port {
        builder.open_port(path)
    } else if let Some(cmdline) = &target.agent {
        let mut words = cmdline.split_whitespace();
        let Some(program) = words.next() else {
            fail("--agent needs a command")
        };
        let mut cmd = std::process::Command::new(program);
        cmd.args(words).process_group(0);
        builder.spawn(cmd)
    } else {
        let exe = std::env::current_exe()
            .unwrap_or_else(|e| fail(format!("cannot find agentctl's own executable: {e}")));
        let agentd = exe.parent().map(|dir| dir.join("agentd"));
        let mut cmd = match agentd.filter(|p| p.is_file()) {
            Some(agentd) => {
                let mut cmd = std::process::Command::new(agentd);
                cmd.arg("--stdio");
                cmd
            }
            None => {
                // `cargo run --bin agentctl` builds agentctl alone: run the
                // same agent code from this executable instead.
                tracing::debug!("no agentd next to agentctl; running the built-in agent");
                let mut cmd = std::process::Command::new(exe);
                cmd.arg(EMBEDDED_AGENT_ARG);
                cmd
            }
        };
        // Its own process group: a Ctrl-C at the terminal is agentctl's to
        // forward, not a signal that kills the agent under it.
        cmd.process_group(0);
        builder.spawn(cmd)
    };
    result.unwrap_or_else(|e| fail(e))
}

fn build_command(args: &ExecArgs) -> Command {
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    if args.tty {
        let (rows, cols) = terminal_size().unwrap_or((24, 80));
        cmd.tty(rows, cols);
        if let Ok(term) = std::env::var("TERM") {
            cmd.env("TERM", term);
        }
    }
    for e in &args.env {
        match e.split_once('=') {
            Some(_) => cmd.as_exec_mut().env.push(e.clone()),
            None => {
                if let Ok(v) = std::env::var(e) {
                    cmd.env(e, v);
                }
            }
        };
    }
    if args.clear_env {
        cmd.env_clear();
    }
    if let Some(dir) = &args.workdir {
        cmd.cwd(dir);
    }
    if let Some(user) = &args.user {
        cmd.user(user);
    }
    cmd.as_exec_mut()
        .rlimits
        .extend(args.rlimit.iter().cloned());
    if let Some(tag) = &args.name {
        cmd.tag(tag);
    }
    if let Some(t) = args.timeout {
        cmd.timeout(t);
    }
    if let Some(g) = args.kill_grace {
        cmd.kill_grace(g);
    }
    if let Some(m) = args.memory {
        cmd.memory_max(m);
    }
    if let Some(p) = args.pids {
        cmd.pids_max(p);
    }
    if let Some(c) = args.cpus {
        cmd.cpus(c);
    }
    if let Some(r) = args.replay {
        cmd.replay_bytes(r);
    }
    // With -t the remote stdin is the remote terminal, whether or not local
    // input is forwarded (as docker's `exec -t` without `-i`): programs
    // ask it about itself (`stty size`, `test -t 0`). Without -t and -i it
    // is /dev/null.
    cmd.stdin(args.interactive || args.tty)
        .output_window(OUTPUT_WINDOW);
    cmd
}

fn exec_failed_exit(e: &Error, program: &str) -> ! {
    let code = match e.exec_failed_kind() {
        Some(ExecFailedKind::NotFound) => EXIT_NOT_FOUND,
        _ => EXIT_CANNOT_RUN,
    };
    let detail = match e {
        Error::ExecFailed(f) => {
            let mut s = format!("{} ({}", f.message, f.kind);
            if let Some(stage) = &f.stage {
                s.push_str(&format!(" at {stage}"));
            }
            s.push(')');
            s
        }
        other => other.to_string(),
    };
    complain(format!("cannot run {program:?}: {detail}"));
    exit(code)
}

/// Copies local stdin to the session, then closes the remote stdin.
fn forward_stdin(h: SessionHandle) {
    let mut buf = vec![0u8; 64 * 1024];
    let stdin = io::stdin();
    let mut input = stdin.lock();
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if h.write_stdin(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                complain(format!("reading stdin: {e}"));
                break;
            }
        }
    }
    let _ = h.close_stdin();
}

fn run_exec(client: &Client, args: &ExecArgs, signals: Arc<Mutex<SignalState>>) -> i32 {
    let cmd = build_command(args);
    if args.detach {
        return match client.exec_detached(&cmd) {
            Ok(started) => {
                println!("{}", started.number);
                0
            }
            Err(e @ Error::ExecFailed(_)) => exec_failed_exit(&e, &args.command[0]),
            Err(e) => fail(e),
        };
    }
    let _raw = if args.tty && args.interactive && io::stdin().is_terminal() {
        match RawMode::enable() {
            Ok(r) => Some(r),
            Err(e) => fail(format!("cannot put the terminal in raw mode: {e}")),
        }
    } else {
        None
    };
    let mut session = match client.exec(&cmd) {
        Ok(s) => s,
        Err(e @ Error::ExecFailed(_)) => exec_failed_exit(&e, &args.command[0]),
        Err(e) => fail(e),
    };
    {
        let mut st = signals.lock().unwrap_or_else(|e| e.into_inner());
        st.session = Some(session.handle());
        st.client = Some(client.clone());
        st.tty = args.tty;
    }
    // A SIGWINCH between reading the size and the line above was dropped.
    if args.tty {
        let sent = (cmd.as_exec().rows, cmd.as_exec().cols);
        if let Some(now) = terminal_size().filter(|&now| now != sent) {
            let _ = session.resize(now.0, now.1);
        }
    }
    if args.interactive {
        let h = session.handle();
        std::thread::spawn(move || forward_stdin(h));
    }
    follow(&mut session)
}

/// Copies a session's output to stdout and stderr until it ends; returns
/// the exit status to exit with (0 when the session was detached from
/// here: it goes on).
fn follow(session: &mut agentd::client::Session) -> i32 {
    let stdout = io::stdout();
    let mut stdout = stdout.lock();
    let mut stdout_open = true;
    let mut stderr_open = true;
    loop {
        match session.next_event() {
            Ok(Some(Event::Stdout(data))) => {
                if stdout_open
                    && stdout
                        .write_all(&data)
                        .and_then(|_| stdout.flush())
                        .is_err()
                {
                    // Like a local pipeline: the writer gets SIGPIPE.
                    stdout_open = false;
                    let _ = session.signal(libc::SIGPIPE);
                }
            }
            Ok(Some(Event::Stderr(data))) => {
                let mut err = io::stderr();
                if stderr_open && err.write_all(&data).and_then(|_| err.flush()).is_err() {
                    stderr_open = false;
                }
            }
            Ok(Some(Event::Error(e))) => complain(format!("agent error {}: {}", e.kind, e.message)),
            Ok(Some(Event::Exited(status))) => {
                if status.timed_out {
                    complain(format!(
                        "the session's timeout passed; the agent ended it ({status})"
                    ));
                }
                if status.oom_killed {
                    complain(
                        "the session ran out of memory (its cgroup's OOM killer killed a process)",
                    );
                }
                return status.status;
            }
            Ok(Some(Event::Detached(d))) => {
                if d.reason == "detach" {
                    complain(format!(
                        "detached from session {}; it goes on (agentctl attach {})",
                        d.session, d.session
                    ));
                } else {
                    complain(format!(
                        "session {} was attached by another connection; it goes on there",
                        d.session
                    ));
                }
                return 0;
            }
            Ok(None) => fail("session ended without an exit status"),
            Err(e) => fail(e),
        }
    }
}

fn run_ping(client: &Client, args: &PingArgs) -> i32 {
    let ready = client.ready();
    println!(
        "PING {} (protocol {}, pid {}{})",
        ready.agent,
        ready.protocol,
        ready.pid,
        if ready.pid1 { ", PID 1" } else { "" }
    );
    // What the init path mounted (READY's `mounts`), one line each.
    for m in &ready.mounts {
        let ro = if m.ro { ", ro" } else { "" };
        match &m.error {
            None => println!("mount {} on {} ({}{ro}): ok", m.source, m.path, m.fstype),
            Some(e) => println!(
                "mount {} on {} ({}{ro}): FAILED: {e}",
                m.source, m.path, m.fstype
            ),
        }
    }
    let mut times = Vec::new();
    for seq in 1..=args.count {
        match client.ping() {
            Ok(rtt) => {
                let ms = rtt.as_secs_f64() * 1000.0;
                println!("pong seq={seq} time={ms:.3} ms");
                times.push(ms);
            }
            Err(e) => fail(e),
        }
        if seq < args.count {
            std::thread::sleep(Duration::from_millis(args.interval));
        }
    }
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    let avg = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "--- {} round trips, min/avg/max = {min:.3}/{avg:.3}/{max:.3} ms",
        times.len()
    );
    0
}

fn run_shutdown(client: &Client, args: &ShutdownArgs) -> i32 {
    match client.shutdown(Duration::from_millis(u64::from(args.grace))) {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}

fn init_logging() {
    let level = match std::env::var("AGENTCTL_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("info") => tracing::Level::INFO,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::WARN,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(io::stderr)
        .init();
}

/// The hidden first argument that makes agentctl run the agent itself on
/// stdin/stdout (what `agentd --stdio` does), for when no `agentd` binary
/// sits next to it.
const EMBEDDED_AGENT_ARG: &str = "--embedded-agentd-stdio";

/// `agentd --stdio`, from the library: the same code the agentd binary runs.
fn run_embedded_agent() -> i32 {
    agentd::agent::run(&agentd::agent::Options::stdio())
}

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == EMBEDDED_AGENT_ARG)
    {
        std::process::exit(run_embedded_agent());
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_AGENTCTL } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    init_logging();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        default_hook(info);
    }));

    // Block the signals before any thread starts, so that only the signal
    // thread receives them. (Children get an empty mask from std.)
    let set = handled_signals();
    if let Err(e) = set.thread_block() {
        fail(format!("cannot block signals: {e}"));
    }
    let signals = Arc::new(Mutex::new(SignalState::default()));
    {
        let signals = signals.clone();
        std::thread::spawn(move || signal_thread(set, signals));
    }

    let client = connect(&cli.target, !matches!(cli.command, Cmd::Time(_)));
    let code = match &cli.command {
        Cmd::Exec(args) => run_exec(&client, args, signals),
        Cmd::Ps(args) => ps::run(&client, args),
        Cmd::Attach(args) => attach::run(&client, args, signals),
        Cmd::Kill(args) => kill::run(&client, args),
        Cmd::Time(args) => time::run(&client, args),
        Cmd::Ping(args) => run_ping(&client, args),
        Cmd::Shutdown(args) => run_shutdown(&client, args),
        Cmd::Cp(args) => cp::run(&client, args),
        Cmd::Fs(args) => fs::run(&client, args),
        Cmd::PortForward(args) => port_forward::run(&client, args),
    };
    // Let an embedded agent see end of file and exit before we do.
    client.close();
    let _ = io::stdout().flush();
    exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rlimit_values() {
        let r = parse_rlimit("nofile=64").unwrap();
        assert_eq!((r.resource.as_str(), r.soft, r.hard), ("nofile", 64, 64));
        let r = parse_rlimit("core=0:unlimited").unwrap();
        assert_eq!((r.soft, r.hard), (0, u64::MAX));
        assert!(parse_rlimit("nofile").is_err());
        assert!(parse_rlimit("files=1").is_err());
        assert!(parse_rlimit("nofile=x").is_err());
        assert!(parse_rlimit("nofile=10:5").is_err());
    }

    #[test]
    fn cli_shape() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli =
            Cli::try_parse_from(["agentctl", "exec", "-it", "-e", "A=1", "ls", "-l"]).unwrap();
        let Cmd::Exec(e) = cli.command else { panic!() };
        assert!(e.interactive && e.tty);
        assert_eq!(e.env, ["A=1"]);
        assert_eq!(e.command, ["ls", "-l"]);
        assert!(
            Cli::try_parse_from(["agentctl", "--connect", "unix:/x", "--port", "/y", "ping"])
                .is_err()
        );
        let cli = Cli::try_parse_from(["agentctl", "ping", "--port", "/y"]).unwrap();
        assert_eq!(cli.target.port, Some(PathBuf::from("/y")));
    }
}
