//! `agentd`: the guest agent.
//!
//! ```text
//! agentd --stdio                 the transport is stdin/stdout (tests, agentctl)
//! agentd --port PATH             the transport is PATH (character device,
//!                                Unix socket, or FIFO pair PATH.in/PATH.out)
//! agentd --listen unix:PATH      accept hosts on a Unix socket (or
//!                                vsock:PORT), several at once; repeatable
//! agentd --init [--port PATH]    PID-1 duties first (automatic when PID 1)
//! options: --max-sessions N  --stdin-window BYTES  --log-level LEVEL
//!          --cgroup-root DIR (per-session cgroups under this cgroup2
//!          directory; automatic as a VM's init, under /sys/fs/cgroup/agentd)
//!          --allow-clock (serve CLOCK_SET and ENTROPY, which change the
//!          machine; automatic as a VM's init, never otherwise)
//! ```
//! Logs go to stderr, never to the transport; the level comes from
//! `--log-level` or `AGENTD_LOG` (default `warn`). On the init path it comes
//! from `--log-level` or `agentd.log=` (default `info`).
//!
//! As PID 1 without `--stdio`/`--port` (a VM's `/init`), or with `--init`,
//! agentd first does what an init would
//! ([`agentd::agent::init::boot`]: mounts, the `agentd.*` kernel command line,
//! modules, hostname, logging to `/dev/kmsg`; as PID 1 the panic hook that
//! powers off is installed before anything else, even argument parsing),
//! then serves the virtio-console port named by `agentd.port=` (or `--port
//! PATH`, or `--stdio`), and powers the machine off after SHUTDOWN. PID 1
//! never exits: bad arguments are logged and ignored (the kernel passes
//! unknown command-line words to init as arguments), and a fatal error
//! powers off. See docs/VM.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentd::agent::{self, init, CgroupSetting, Mode, Options, Transport, TransportKind};

const USAGE: &str = "usage: agentd (--stdio | --port PATH | --listen ADDR... | --init [--stdio | --port PATH]) [--listen unix:PATH|vsock:PORT]... [--max-sessions N] [--stdin-window BYTES] [--cgroup-root DIR] [--allow-clock] [--log-level error|warn|info|debug|trace]";

/// An argument as UTF-8, or an error naming it (arguments are read with
/// `args_os`, so a word that is not UTF-8 is an error, never a panic).
fn utf8(what: &str, arg: std::ffi::OsString) -> Result<String, String> {
    arg.into_string()
        .map_err(|bad| format!("{what}: not valid UTF-8: {bad:?}"))
}

/// The command line: options, and for `--init` without `--stdio`/`--port`
/// a `None` mode (the virtio port named on the kernel command line).
fn parse_args() -> Result<(Options, Option<Mode>), String> {
    let mut opts = Options::stdio();
    let mut mode = None;
    let mut init = false;
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let arg = utf8("argument", arg)?;
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--stdio" => mode = Some(Mode::Stdio),
            "--listen" => opts
                .listen
                .push(utf8("--listen", value("--listen")?)?.parse()?),
            "--port" => mode = Some(Mode::Port(PathBuf::from(value("--port")?))),
            "--max-sessions" => {
                opts.max_sessions = utf8("--max-sessions", value("--max-sessions")?)?
                    .parse()
                    .map_err(|e| format!("--max-sessions: {e}"))?
            }
            "--stdin-window" => {
                opts.stdin_window = utf8("--stdin-window", value("--stdin-window")?)?
                    .parse()
                    .map_err(|e| format!("--stdin-window: {e}"))?
            }
            "--log-level" => opts.log_level = Some(utf8("--log-level", value("--log-level")?)?),
            "--allow-clock" => opts.allow_clock = true,
            "--cgroup-root" => {
                opts.cgroups = CgroupSetting::Root(PathBuf::from(value("--cgroup-root")?))
            }
            "--init" => init = true,
            "--version" | "-V" => {
                println!("agentd {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    opts.mode = mode.clone();
    if !init && opts.mode.is_none() && opts.listen.is_empty() {
        return Err("one of --stdio, --port PATH or --listen ADDR is required".into());
    }
    Ok((opts, mode))
}

/// How long PID 1 waits for its virtio port to appear.
const PORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent as the first process of a VM (or with `--init`). Never returns.
fn run_as_init(parsed: Result<(Options, Option<Mode>), String>) -> ! {
    // `--log-level` wins over `agentd.log=` (both unset: info).
    let log_level = parsed.as_ref().ok().and_then(|(o, _)| o.log_level.clone());
    let boot = init::boot(log_level.as_deref());
    let (opts, mode) = parsed.unwrap_or_else(|e| {
        tracing::warn!("ignoring the arguments: {e}");
        (Options::stdio(), None)
    });
    if boot.config.test_panic {
        // The documented test hook (docs/VM.md): proves that a panic of
        // PID 1 logs and powers off instead of killing init.
        panic!("agentd.test_panic=1: deliberate panic to test the panic hook");
    }
    agent::cloexec_inherited_fds();
    if let Err(e) = agent::setup_signals() {
        init::fatal(&format!("blocking signals: {e}"));
    }
    if !agent::is_pid1() {
        if let Err(e) = agent::become_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper");
        }
    }
    let mut opts = opts;
    opts.mounts = boot.mounts.clone();
    opts.machine_init = init::is_machine_init();
    if opts.machine_init && opts.cgroups == CgroupSetting::Off {
        opts.cgroups = CgroupSetting::Init;
    }
    // `agentd.port=vsock:PORT`: hosts connect over vsock (Firecracker,
    // cloud-hypervisor), the agent listens instead of opening a console
    // port.
    let vsock_port = boot.config.port.starts_with("vsock:") && mode.is_none();
    if vsock_port {
        match boot.config.port.parse() {
            Ok(addr) => opts.listen.push(addr),
            Err(e) => init::fatal(&format!("agentd.port={}: {e}", boot.config.port)),
        }
    }
    let listeners = agent::bind_listeners(&opts.listen).unwrap_or_else(|e| init::fatal(&e));
    let transport = match &mode {
        None if vsock_port => None,
        Some(Mode::Stdio) => Some(
            Transport::stdio().unwrap_or_else(|e| init::fatal(&format!("taking over stdio: {e}"))),
        ),
        Some(Mode::Port(path)) => Some(
            Transport::open(path)
                .unwrap_or_else(|e| init::fatal(&format!("opening {}: {e}", path.display()))),
        ),
        None => match init::open_port(&boot.config.port, PORT_TIMEOUT) {
            Ok(file) => Some(Transport::from_fd(file.into(), TransportKind::Device)),
            Err(e) => init::fatal(&e.to_string()),
        },
    };
    match agent::serve(transport, listeners, &opts, init::default_env()) {
        Ok(exit) => tracing::info!(?exit, "agent loop ended; powering off"),
        Err(e) => init::fatal(&e.to_string()),
    }
    init::power_off(&boot.mounted)
}

fn main() -> ExitCode {
    if agent::is_pid1() {
        // Before anything that could panic (arguments, mounts, logging): a
        // panic of PID 1 must power off, not kill init.
        init::install_panic_hook();
    }
    let parsed = parse_args();
    // The init path: `--init`, or PID 1 without an explicit transport (a VM's
    // /init gets no arguments, or stray kernel command-line words that fail
    // to parse). `agentd --stdio` (or `--listen`) as PID 1 of a PID
    // namespace stays a plain agent that exits 0 at end of file (or after
    // SHUTDOWN).
    let explicit_transport =
        matches!(&parsed, Ok((o, mode)) if mode.is_some() || !o.listen.is_empty());
    let forced = std::env::args_os().any(|a| a == "--init");
    if forced || (agent::is_pid1() && !explicit_transport) {
        run_as_init(parsed);
    }
    let opts = match parsed {
        Ok((o, _)) => o,
        Err(e) => {
            eprintln!("agentd: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match agent::run(&opts) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
