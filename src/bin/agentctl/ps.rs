//! `agentctl ps`: the agent's sessions as a table, like `docker ps`, or as
//! JSON lines, or through a `{{.Field}}` template.

use std::io::Write;
use std::time::SystemTime;

use agentd::client::{Client, SessionRecord, SessionState};
use clap::Args;

use crate::units::{ago, human_bytes, signal_name};
use crate::{fail, EXIT_AGENTCTL};

#[derive(Args, Debug)]
#[command(
    after_help = "Template fields: {{.Name}} {{.Tag}} {{.Pid}} {{.Command}} {{.User}} \
    {{.Tty}} {{.State}} {{.Status}} {{.Started}} {{.Output}} {{.Stdout}} {{.Stderr}} \
    {{.Attached}}; \\t is a tab."
)]
pub(crate) struct PsArgs {
    /// Also ended sessions whose exit a host has already seen.
    #[arg(short, long)]
    all: bool,
    /// Only the session numbers, one a line.
    #[arg(short, long)]
    quiet: bool,
    /// `table` (the default), `json` (one object a line), or a template such
    /// as '{{.Name}}\t{{.Status}}'.
    #[arg(long, value_name = "FORMAT", default_value = "table")]
    format: String,
    /// Do not cut long commands.
    #[arg(long)]
    no_trunc: bool,
}

const FIELDS: [&str; 13] = [
    "Name", "Tag", "Pid", "Command", "User", "Tty", "State", "Status", "Started", "Output",
    "Stdout", "Stderr", "Attached",
];

/// The COMMAND column's width unless `--no-trunc`.
const COMMAND_WIDTH: usize = 30;

fn command_line(r: &SessionRecord) -> String {
    let mut s = r.cmd.clone();
    for a in &r.args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

fn status(r: &SessionRecord) -> String {
    let mut s = match &r.state {
        SessionState::Exited(x) => {
            let mut s = match (x.code, x.signal) {
                (Some(c), _) => format!("exited ({c})"),
                (None, Some(sig)) => format!("killed ({})", signal_name(sig)),
                (None, None) => format!("exited ({})", x.status),
            };
            if x.timed_out {
                s.push_str(", timed out");
            }
            if x.oom_killed {
                s.push_str(", OOM killed");
            }
            return s;
        }
        other => other.to_string(),
    };
    s.push_str(if r.attached {
        ", attached"
    } else {
        ", detached"
    });
    s
}

fn field(r: &SessionRecord, name: &str, now: SystemTime, trunc: bool) -> String {
    match name {
        "Name" => r.number.to_string(),
        "Tag" => r.tag.clone().unwrap_or_default(),
        "Pid" => r.pid.to_string(),
        "Command" => {
            let c = command_line(r);
            if trunc && c.chars().count() > COMMAND_WIDTH {
                let cut: String = c.chars().take(COMMAND_WIDTH - 1).collect();
                format!("{cut}…")
            } else {
                c
            }
        }
        "User" => r.user.clone().unwrap_or_default(),
        "Tty" => if r.tty { "tty" } else { "pipes" }.into(),
        "State" => r.state.to_string(),
        "Status" => status(r),
        "Started" => ago(r.started, now),
        "Output" => format!(
            "{} / {}",
            human_bytes(r.stdout_bytes),
            human_bytes(r.stderr_bytes)
        ),
        "Stdout" => r.stdout_bytes.to_string(),
        "Stderr" => r.stderr_bytes.to_string(),
        "Attached" => r.attached.to_string(),
        _ => String::new(),
    }
}

/// Checks a template's fields; returns the message for an unknown one.
fn check_template(t: &str) -> Result<(), String> {
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        let Some(end) = rest[start..].find("}}") else {
            return Err(format!("--format {t:?}: a {{{{ without its }}}}"));
        };
        let inner = rest[start + 2..start + end].trim();
        let name = inner.strip_prefix('.').unwrap_or("");
        if !FIELDS.contains(&name) {
            return Err(format!(
                "--format: unknown field {inner:?}; fields: {}",
                FIELDS.map(|f| format!("{{{{.{f}}}}}")).join(" ")
            ));
        }
        rest = &rest[start + end + 2..];
    }
    Ok(())
}

fn render(t: &str, r: &SessionRecord, now: SystemTime) -> String {
    let mut out = String::new();
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").map_or(rest.len(), |e| start + e);
        let name = rest[start + 2..end].trim().trim_start_matches('.');
        out.push_str(&field(r, name, now, false));
        rest = rest.get(end + 2..).unwrap_or("");
    }
    out.push_str(rest);
    out.replace("\\t", "\t").replace("\\n", "\n")
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json(r: &SessionRecord) -> String {
    let opt = |o: &Option<String>| o.as_deref().map_or("null".into(), json_string);
    let started_ms = r
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let args: Vec<String> = r.args.iter().map(|a| json_string(a)).collect();
    let exit = match r.exit_status() {
        Some(x) => format!(
            "{{\"code\":{},\"signal\":{},\"status\":{},\"timed_out\":{},\"oom_killed\":{}}}",
            x.code.map_or("null".into(), |c| c.to_string()),
            x.signal.map_or("null".into(), |c| c.to_string()),
            x.status,
            x.timed_out,
            x.oom_killed
        ),
        None => "null".into(),
    };
    format!(
        "{{\"session\":{},\"tag\":{},\"pid\":{},\"cmd\":{},\"args\":[{}],\"user\":{},\"tty\":{},\"state\":{},\"attached\":{},\"started_ms\":{started_ms},\"stdout_bytes\":{},\"stderr_bytes\":{},\"exit\":{exit}}}",
        r.number,
        opt(&r.tag),
        r.pid,
        json_string(&r.cmd),
        args.join(","),
        opt(&r.user),
        r.tty,
        json_string(&r.state.to_string()),
        r.attached,
        r.stdout_bytes,
        r.stderr_bytes,
    )
}

const TABLE: [(&str, &str); 9] = [
    ("SESSION", "Name"),
    ("TAG", "Tag"),
    ("PID", "Pid"),
    ("COMMAND", "Command"),
    ("USER", "User"),
    ("TTY", "Tty"),
    ("STATUS", "Status"),
    ("STARTED", "Started"),
    ("OUTPUT", "Output"),
];

fn table(records: &[SessionRecord], now: SystemTime, trunc: bool) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| TABLE.iter().map(|(_, f)| field(r, f, now, trunc)).collect())
        .collect();
    let mut widths: Vec<usize> = TABLE.iter().map(|(h, _)| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(w - cell.chars().count() + 3));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(TABLE.iter().map(|(h, _)| *h).collect());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

pub(crate) fn run(client: &Client, args: &PsArgs) -> i32 {
    let format = args.format.as_str();
    if format != "table" && format != "json" {
        if let Err(e) = check_template(format) {
            fail(e);
        }
    }
    let listed = if args.all {
        client.sessions_all()
    } else {
        client.sessions()
    };
    let mut records = listed.unwrap_or_else(|e| fail(format!("cannot list sessions: {e}")));
    records.sort_by_key(|r| r.number);
    let now = SystemTime::now();
    let out = if args.quiet {
        records.iter().map(|r| format!("{}\n", r.number)).collect()
    } else {
        match format {
            "table" => table(&records, now, !args.no_trunc),
            "json" => records.iter().map(|r| json(r) + "\n").collect(),
            t => records.iter().map(|r| render(t, r, now) + "\n").collect(),
        }
    };
    let mut stdout = std::io::stdout();
    if stdout
        .write_all(out.as_bytes())
        .and_then(|_| stdout.flush())
        .is_err()
    {
        return EXIT_AGENTCTL;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        assert!(check_template("{{.Name}}\\t{{ .Status }}").is_ok());
        assert!(check_template("{{.Bogus}}").is_err());
        assert!(check_template("{{.Name").is_err());
        assert_eq!(json_string("a\"b\n"), "\"a\\\"b\\n\"");
    }
}
