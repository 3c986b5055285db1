//! `agentctl attach NAME`: takes a session over (from a detached state or
//! from another connection), replays what its ring still has, then follows
//! it like `exec` until it exits or is detached again: the detach keys
//! (Ctrl-P Ctrl-Q by default, as docker) in forwarded input, or another
//! connection attaching it.

use std::io::{self, IsTerminal, Read};
use std::sync::{Arc, Mutex};

use agentd::client::{
    AttachFailedKind, AttachOptions, Client, Error, Session, SessionHandle, SessionRef,
};
use clap::Args;

use crate::{complain, fail, follow, terminal_size, RawMode, SignalState};

#[derive(Args, Debug)]
pub(crate) struct AttachArgs {
    /// Forward local stdin to the session (when its stdin is still open).
    #[arg(short, long)]
    interactive: bool,
    /// The session runs on a terminal: size it like the local one and, with
    /// -i on a local terminal, put the local terminal in raw mode.
    #[arg(short, long)]
    tty: bool,
    /// Live output only: replay nothing.
    #[arg(long, conflicts_with_all = ["tail", "since"])]
    no_replay: bool,
    /// Replay at most the last BYTES of each stream (e.g. 4k).
    #[arg(long, value_name = "BYTES", value_parser = crate::units::parse_size)]
    tail: Option<u64>,
    /// Replay from this byte offset of stdout (and of stderr, or from
    /// ERR_OFFSET): the offsets ps --format '{{.Stdout}}' shows.
    #[arg(long, value_name = "OFFSET[,ERR_OFFSET]", value_parser = parse_since)]
    since: Option<(u64, u64)>,
    /// The key sequence that detaches (with -i): comma-separated keys, each
    /// ctrl-X or one character.
    #[arg(long, value_name = "KEYS", default_value = "ctrl-p,ctrl-q", value_parser = parse_detach_keys)]
    detach_keys: DetachKeys,
    /// The session: its number (as ps shows it) or its tag.
    #[arg(value_name = "NAME")]
    name: String,
}

fn parse_since(s: &str) -> Result<(u64, u64), String> {
    let num = |x: &str| {
        x.parse::<u64>()
            .map_err(|_| format!("{x:?} is not a byte offset"))
    };
    match s.split_once(',') {
        Some((o, e)) => Ok((num(o)?, num(e)?)),
        None => num(s).map(|o| (o, o)),
    }
}

/// The detach sequence, as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DetachKeys(Vec<u8>);

/// docker's `--detach-keys` format: `ctrl-p,ctrl-q`, `ctrl-@`, `a,b`; an
/// empty string disables detaching by keys.
pub(crate) fn parse_detach_keys(s: &str) -> Result<DetachKeys, String> {
    if s.is_empty() {
        return Ok(DetachKeys(Vec::new()));
    }
    let mut out = Vec::new();
    for key in s.split(',') {
        let lower = key.to_ascii_lowercase();
        let byte = if let Some(c) = lower.strip_prefix("ctrl-") {
            match c.as_bytes() {
                [b @ b'a'..=b'z'] => b - b'a' + 1,
                [b'@'] => 0,
                [b @ (b'[' | b'\\' | b']' | b'^' | b'_')] => b - b'@',
                _ => return Err(format!("{key:?} is not a key: ctrl-a to ctrl-z, ctrl-@, ctrl-[, ctrl-\\, ctrl-], ctrl-^, ctrl-_")),
            }
        } else {
            match key.as_bytes() {
                [b] if b.is_ascii() && !b.is_ascii_control() => *b,
                _ => return Err(format!("{key:?} is not a key: one character or ctrl-X")),
            }
        };
        out.push(byte);
    }
    Ok(DetachKeys(out))
}

/// Finds the detach sequence in forwarded input, holding back a partial
/// match until it completes or fails (then it is sent after all).
pub(crate) struct KeyScanner {
    keys: Vec<u8>,
    matched: usize,
}

impl KeyScanner {
    pub(crate) fn new(keys: &DetachKeys) -> Self {
        KeyScanner {
            keys: keys.0.clone(),
            matched: 0,
        }
    }

    /// Appends to `out` what to forward of `input`; true when the whole
    /// sequence was typed (what follows it is dropped).
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        if self.keys.is_empty() {
            out.extend_from_slice(input);
            return false;
        }
        for &b in input {
            if b == self.keys[self.matched] {
                self.matched += 1;
                if self.matched == self.keys.len() {
                    return true;
                }
                continue;
            }
            // Not the sequence after all: what was held back is input.
            out.extend_from_slice(&self.keys[..self.matched]);
            self.matched = 0;
            if b == self.keys[0] {
                self.matched = 1;
                if self.keys.len() == 1 {
                    return true;
                }
            } else {
                out.push(b);
            }
        }
        false
    }
}

/// Copies local stdin to the session, watching for the detach keys; at
/// end of input closes the remote stdin.
fn forward_stdin(h: SessionHandle, keys: DetachKeys) {
    let mut scanner = KeyScanner::new(&keys);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(buf.len());
    let stdin = io::stdin();
    let mut input = stdin.lock();
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.clear();
                let detach = scanner.feed(&buf[..n], &mut out);
                if !out.is_empty() && h.write_stdin(&out).is_err() {
                    return;
                }
                if detach {
                    let _ = h.detach();
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

/// ATTACH by `name`: a number first, then (if no session has that number)
/// as a tag.
fn attach_by_name(client: &Client, name: &str, options: &AttachOptions) -> Session {
    let target = SessionRef::parse(name);
    let first = client.attach(target.clone(), options);
    let result = match (first, &target) {
        (Err(e), SessionRef::Number(_))
            if e.attach_failed_kind() == Some(AttachFailedKind::NotFound) =>
        {
            client.attach(SessionRef::Tag(name.to_owned()), options)
        }
        (r, _) => r,
    };
    match result {
        Ok(s) => s,
        Err(e) => match e.attach_failed_kind() {
            Some(AttachFailedKind::NotFound) => fail(format!(
                "no session {name:?} (a number or tag from agentctl ps -a)"
            )),
            Some(AttachFailedKind::Ambiguous) => fail(format!(
                "tag {name:?} names several sessions: attach by number (agentctl ps)"
            )),
            _ => fail(format!("cannot attach {name:?}: {e}")),
        },
    }
}

pub(crate) fn run(client: &Client, args: &AttachArgs, signals: Arc<Mutex<SignalState>>) -> i32 {
    let mut options = AttachOptions::new();
    options.output_window(crate::OUTPUT_WINDOW);
    if args.no_replay {
        options.no_replay();
    }
    if let Some(t) = args.tail {
        options.tail(t);
    }
    if let Some((o, e)) = args.since {
        options.since(o, e);
    }
    let mut session = attach_by_name(client, &args.name, &options);
    if args.tty && !session.is_tty() {
        let _ = session.detach();
        fail(format!(
            "session {} has no terminal: attach it without -t",
            args.name
        ));
    }
    if let Some(a) = session.attached() {
        let lost = a.stdout_lost + a.stderr_lost;
        if lost > 0 {
            complain(format!(
                "{lost} bytes of output asked for are no longer kept (stdout {}, stderr {}); replaying from stdout offset {}, stderr offset {}",
                a.stdout_lost, a.stderr_lost, a.stdout_from, a.stderr_from
            ));
        }
        if args.interactive && !a.stdin {
            complain(format!(
                "session {}'s stdin is closed: nothing will be forwarded",
                args.name
            ));
        }
    }
    let _raw = if args.tty && args.interactive && io::stdin().is_terminal() {
        match RawMode::enable() {
            Ok(r) => Some(r),
            Err(e) => {
                let _ = session.detach();
                fail(format!("cannot put the terminal in raw mode: {e}"))
            }
        }
    } else {
        None
    };
    {
        let mut st = signals.lock().unwrap_or_else(|e| e.into_inner());
        st.session = Some(session.handle());
        st.client = Some(client.clone());
        st.tty = args.tty;
    }
    if args.tty {
        if let Some((rows, cols)) = terminal_size() {
            if let Err(e @ Error::TransportClosed(_)) = session.resize(rows, cols) {
                fail(e);
            }
        }
    }
    let stdin_open = session.attached().is_some_and(|a| a.stdin);
    if args.interactive && stdin_open {
        let h = session.handle();
        let keys = args.detach_keys.clone();
        std::thread::spawn(move || forward_stdin(h, keys));
    }
    follow(&mut session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys() {
        assert_eq!(parse_detach_keys("ctrl-p,ctrl-q").unwrap().0, [0x10, 0x11]);
        assert_eq!(parse_detach_keys("ctrl-@,x").unwrap().0, [0, b'x']);
        assert!(parse_detach_keys("ctrl-1").is_err());
        assert!(parse_detach_keys("ab").is_err());
        let mut s = KeyScanner::new(&parse_detach_keys("ctrl-p,ctrl-q").unwrap());
        let mut out = Vec::new();
        assert!(!s.feed(b"ab\x10", &mut out));
        assert_eq!(out, b"ab");
        assert!(!s.feed(b"c\x10\x10", &mut out));
        assert_eq!(out, b"ab\x10c\x10");
        assert!(s.feed(b"\x11rest", &mut out));
        assert_eq!(out, b"ab\x10c\x10");
    }
}
