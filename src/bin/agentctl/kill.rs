//! `agentctl kill [-s SIGNAL] NAME...`: signals sessions' whole trees.
//!
//! The protocol signals a session on an id that has it, so each session is
//! attached (no replay), signalled and detached again at once: it goes on
//! (or ends) detached, and its exit is kept for the next host. A
//! connection that had it attached is told it was attached elsewhere.
//! With per-session cgroups (READY's `cgroups`) the signal reaches every
//! process of the session, also those that left its process group
//! (`setsid`); without them, its process group.

use agentd::client::{AttachFailedKind, AttachOptions, Client, Event, SessionRecord, SessionRef};
use clap::Args;

use crate::units::{parse_signal, signal_name};
use crate::{complain, EXIT_AGENTCTL};

#[derive(Args, Debug)]
pub(crate) struct KillArgs {
    /// The signal: a name (KILL, SIGTERM, hup) or a number.
    #[arg(short, long, value_name = "SIGNAL", default_value = "KILL", value_parser = parse_signal)]
    signal: i32,
    /// The sessions: numbers (as ps shows them) or tags.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

/// The one live session `name` designates in `list`, or why not.
fn find<'a>(list: &'a [SessionRecord], name: &str) -> Result<&'a SessionRecord, String> {
    if let SessionRef::Number(n) = SessionRef::parse(name) {
        if let Some(r) = list.iter().find(|r| r.number == n) {
            return Ok(r);
        }
    }
    let tagged: Vec<_> = list
        .iter()
        .filter(|r| r.tag.as_deref() == Some(name))
        .collect();
    let live: Vec<_> = tagged.iter().filter(|r| !r.has_ended()).collect();
    match (live.as_slice(), tagged.first()) {
        ([one], _) => Ok(one),
        ([], Some(ended)) => Ok(ended),
        ([], None) => Err(format!(
            "no session {name:?} (a number or tag from agentctl ps)"
        )),
        _ => Err(format!(
            "tag {name:?} names several sessions: kill them by number (agentctl ps)"
        )),
    }
}

fn kill_one(
    client: &Client,
    list: &[SessionRecord],
    name: &str,
    signal: i32,
    tree: bool,
) -> Result<(), String> {
    let record = find(list, name)?;
    if let Some(x) = record.exit_status() {
        return Err(format!("session {name} is not running (it ended: {x})"));
    }
    let mut options = AttachOptions::new();
    options.no_replay();
    let mut session =
        client
            .attach(record.number, &options)
            .map_err(|e| match e.attach_failed_kind() {
                Some(AttachFailedKind::NotFound) => format!("session {name} has gone"),
                _ => format!("cannot reach session {name}: {e}"),
            })?;
    let h = session.handle();
    let sent = if tree {
        h.signal_tree(signal)
    } else {
        h.signal(signal)
    };
    sent.map_err(|e| format!("cannot signal session {name}: {e}"))?;
    let _ = h.detach();
    let mut refused = None;
    loop {
        match session.next_event() {
            Ok(Some(Event::Error(e))) => refused = Some(format!("{}: {}", e.kind, e.message)),
            Ok(Some(Event::Detached(_) | Event::Exited(_))) | Ok(None) => break,
            Ok(Some(_)) => {}
            Err(e) => return Err(format!("session {name}: {e}")),
        }
    }
    match refused {
        Some(why) => Err(format!(
            "the agent refused {} for session {name}: {why}",
            signal_name(signal)
        )),
        None => Ok(()),
    }
}

pub(crate) fn run(client: &Client, args: &KillArgs) -> i32 {
    let tree = client.ready().cgroups == Some(true);
    let list = match client.sessions() {
        Ok(l) => l,
        Err(e) => crate::fail(format!("cannot list sessions: {e}")),
    };
    let mut code = 0;
    for name in &args.names {
        match kill_one(client, &list, name, args.signal, tree) {
            Ok(()) => println!("{name}"),
            Err(msg) => {
                complain(msg);
                code = EXIT_AGENTCTL;
            }
        }
    }
    code
}
