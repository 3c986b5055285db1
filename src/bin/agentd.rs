//! `agentd`: the guest agent.
//!
//! ```text
//! agentd --stdio                 the transport is stdin/stdout (tests, agentctl)
//! agentd --port PATH             the transport is PATH (device, FIFO or socket)
//! agentd --init [--port PATH]    PID-1 duties first (automatic when PID 1)
//! options: --max-sessions N  --stdin-window BYTES  --log-level LEVEL
//! ```
//! Logs go to stderr, never to the transport; the level comes from
//! `--log-level` or `AGENTD_LOG` (default `warn`).
//!
//! As PID 1 (or with `--init`), agentd first does what an init would
//! ([`agentd::agent::init::boot`]: mounts, the `agentd.*` kernel command line,
//! modules, hostname, logging to `/dev/kmsg`, a panic hook that powers off),
//! serves the virtio-console port named by `agentd.port=` (or `--port PATH`),
//! and powers the machine off after SHUTDOWN. PID 1 never exits: bad
//! arguments are logged and ignored (the kernel passes unknown command-line
//! words to init as arguments), and a fatal error powers off.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentd::agent::spawn::SpawnDefaults;
use agentd::agent::transport::{Transport, TransportKind};
use agentd::agent::{init, process, Config, EventLoop};
use tracing::level_filters::LevelFilter;

const USAGE: &str = "usage: agentd (--stdio | --port PATH | --init [--port PATH]) [--max-sessions N] [--stdin-window BYTES] [--log-level error|warn|info|debug|trace]";

enum Mode {
    Stdio,
    Port(PathBuf),
    /// As init without `--stdio`/`--port`: the virtio-console port named by
    /// `agentd.port=` on the kernel command line.
    VirtioPort,
}

struct Args {
    mode: Mode,
    /// `--init`: do PID 1's duties even when not PID 1 (tests).
    init: bool,
    max_sessions: usize,
    stdin_window: u32,
    log_level: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut mode = None;
    let defaults = Config::default();
    let mut args = Args {
        mode: Mode::Stdio,
        init: false,
        max_sessions: defaults.max_sessions,
        stdin_window: defaults.stdin_window,
        log_level: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--stdio" => mode = Some(Mode::Stdio),
            "--port" => mode = Some(Mode::Port(PathBuf::from(value("--port")?))),
            "--max-sessions" => {
                args.max_sessions = value("--max-sessions")?
                    .parse()
                    .map_err(|e| format!("--max-sessions: {e}"))?
            }
            "--stdin-window" => {
                args.stdin_window = value("--stdin-window")?
                    .parse()
                    .map_err(|e| format!("--stdin-window: {e}"))?
            }
            "--log-level" => args.log_level = Some(value("--log-level")?),
            "--init" => args.init = true,
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
    match mode {
        Some(m) => args.mode = m,
        None if args.init => args.mode = Mode::VirtioPort,
        None => return Err("one of --stdio or --port PATH is required".into()),
    }
    Ok(args)
}

fn init_logging(level: Option<&str>) {
    let level = level
        .map(str::to_owned)
        .or_else(|| std::env::var("AGENTD_LOG").ok())
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// How long PID 1 waits for its virtio port to appear.
const PORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent as the first process of a VM. Never returns.
fn run_as_init(args: Result<Args, String>) -> ! {
    let boot = init::boot();
    let args = args.unwrap_or_else(|e| {
        tracing::warn!("ignoring the arguments: {e}");
        Args {
            mode: Mode::VirtioPort,
            init: true,
            max_sessions: Config::default().max_sessions,
            stdin_window: Config::default().stdin_window,
            log_level: None,
        }
    });
    let pid1 = std::process::id() == 1;
    process::cloexec_inherited_fds();
    if let Err(e) = process::setup_signals() {
        init::fatal(&format!("blocking signals: {e}"));
    }
    if !pid1 {
        if let Err(e) = process::become_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper");
        }
    }
    let transport = match &args.mode {
        Mode::Stdio => {
            Transport::stdio().unwrap_or_else(|e| init::fatal(&format!("taking over stdio: {e}")))
        }
        Mode::Port(path) => Transport::open(path)
            .unwrap_or_else(|e| init::fatal(&format!("opening {}: {e}", path.display()))),
        Mode::VirtioPort => match init::open_port(&boot.config.port, PORT_TIMEOUT) {
            Ok(file) => Transport::from_fd(file.into(), TransportKind::Device),
            Err(e) => init::fatal(&e.to_string()),
        },
    };
    let config = Config {
        max_sessions: args.max_sessions,
        stdin_window: args.stdin_window,
        pid1,
        defaults: SpawnDefaults {
            env: init::default_env(),
        },
    };
    let mut event_loop =
        EventLoop::new(config, transport).unwrap_or_else(|e| init::fatal(&e.to_string()));
    let exit = event_loop.run();
    tracing::info!(?exit, "agent loop ended; powering off");
    init::power_off(&boot.mounted)
}

fn main() -> ExitCode {
    let parsed = parse_args();
    let forced = std::env::args().any(|a| a == "--init");
    if std::process::id() == 1 || forced {
        run_as_init(parsed);
    }
    let args = match parsed {
        Ok(a) => a,
        Err(e) => {
            eprintln!("agentd: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_logging(args.log_level.as_deref());
    process::cloexec_inherited_fds();
    if let Err(e) = process::setup_signals() {
        eprintln!("agentd: blocking signals: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = process::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans will not be reaped here");
    }
    let transport = match &args.mode {
        Mode::Stdio => Transport::stdio(),
        Mode::Port(path) => Transport::open(path),
        Mode::VirtioPort => unreachable!("only --init selects it, and run_as_init handles --init"),
    };
    let transport = match transport {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agentd: opening the transport: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        max_sessions: args.max_sessions,
        stdin_window: args.stdin_window,
        ..Config::default()
    };
    let mut event_loop = match EventLoop::new(config, transport) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("agentd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exit = event_loop.run();
    tracing::info!(?exit, "agent exiting");
    ExitCode::SUCCESS
}
