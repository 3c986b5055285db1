//! `agentd`: the guest agent.
//!
//! ```text
//! agentd --stdio                 the transport is stdin/stdout (tests, agentctl)
//! agentd --port PATH             the transport is PATH (device, FIFO or socket)
//! options: --max-sessions N  --stdin-window BYTES  --log-level LEVEL
//! ```
//! Logs go to stderr, never to the transport; the level comes from
//! `--log-level` or `AGENTD_LOG` (default `warn`).

use std::path::PathBuf;
use std::process::ExitCode;

use agentd::agent::transport::Transport;
use agentd::agent::{process, Config, EventLoop};
use tracing::level_filters::LevelFilter;

const USAGE: &str = "usage: agentd (--stdio | --port PATH) [--max-sessions N] [--stdin-window BYTES] [--log-level error|warn|info|debug|trace]";

enum Mode {
    Stdio,
    Port(PathBuf),
}

struct Args {
    mode: Mode,
    max_sessions: usize,
    stdin_window: u32,
    log_level: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut mode = None;
    let defaults = Config::default();
    let mut args = Args {
        mode: Mode::Stdio,
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
    args.mode = mode.ok_or("one of --stdio or --port PATH is required")?;
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

fn main() -> ExitCode {
    let args = match parse_args() {
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
