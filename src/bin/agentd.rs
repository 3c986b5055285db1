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

use agentd::agent::{self, Mode, Options};

const USAGE: &str = "usage: agentd (--stdio | --port PATH) [--max-sessions N] [--stdin-window BYTES] [--log-level error|warn|info|debug|trace]";

fn parse_args() -> Result<Options, String> {
    let mut opts = Options::stdio();
    let mut mode = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--stdio" => mode = Some(Mode::Stdio),
            "--port" => mode = Some(Mode::Port(PathBuf::from(value("--port")?))),
            "--max-sessions" => {
                opts.max_sessions = value("--max-sessions")?
                    .parse()
                    .map_err(|e| format!("--max-sessions: {e}"))?
            }
            "--stdin-window" => {
                opts.stdin_window = value("--stdin-window")?
                    .parse()
                    .map_err(|e| format!("--stdin-window: {e}"))?
            }
            "--log-level" => opts.log_level = Some(value("--log-level")?),
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
    opts.mode = mode.ok_or("one of --stdio or --port PATH is required")?;
    Ok(opts)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
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
