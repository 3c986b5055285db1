//! The `sessions` extension's frames: LIST (the agent's sessions, paged),
//! ATTACH (a session taken over by this connection, with a replay of its
//! output rings), DETACH. Session numbers are agent-wide; ids stay the
//! host's, per connection.

use crate::messages::{
    self, Attach, AttachFailed, AttachFailedKind, Attached, Detached, ErrorKind, Kind, List,
    SessionInfo, SessionsMsg,
};

use super::core::{push_map, Core, Owned};
use super::session::Owner;

/// The most payload bytes one SESSIONS page carries.
const PAGE_LIMIT: usize = 60 * 1024;

impl Core {
    /// A frame of the sessions extension from link `lk`.
    pub(crate) fn on_sessions_frame(&mut self, lk: usize, id: u32, msg: SessionsMsg) {
        match msg {
            SessionsMsg::List(_) if id == 0 || self.ids.contains_key(&(lk, id)) => {
                let msg = format!("id {id} is in use: LIST takes an id of its own");
                self.send_error(lk, id, ErrorKind::DuplicateId, msg, Some(Kind::List as u8));
            }
            SessionsMsg::List(l) => self.list(lk, id, l),
            SessionsMsg::Attach(a) => self.attach(lk, id, &a),
            SessionsMsg::Detach => {
                let Some(&Owned::Session(key)) = self.ids.get(&(lk, id)) else {
                    let msg = format!("no session with id {id}");
                    let kind = Some(Kind::Detach as u8);
                    return self.send_error(lk, id, ErrorKind::UnknownSession, msg, kind);
                };
                self.detach(key, "detach");
            }
            // decode_from_host lets only host → agent kinds through.
            SessionsMsg::Sessions(_)
            | SessionsMsg::Attached(_)
            | SessionsMsg::AttachFailed(_)
            | SessionsMsg::Detached(_) => {}
        }
    }

    /// Takes session `key` away from the connection that has it: that
    /// connection's id for it gets DETACHED (its last frame there).
    fn detach(&mut self, key: usize, reason: &str) {
        let s = &mut self.sessions[key];
        let Some(o) = s.owner() else { return };
        let session = s.seq();
        s.detach();
        self.ids.remove(&(o.link, o.id));
        if let Some(link) = self.links.get_mut(o.link) {
            let d = Detached {
                session,
                reason: reason.to_owned(),
            };
            push_map(link.frames(), Kind::Detached, o.id, &d);
        }
        // Its output now goes to its rings.
        self.service(key);
    }

    /// LIST: SESSIONS pages of at most [`PAGE_LIMIT`] bytes, the last with
    /// `more: false`.
    fn list(&mut self, lk: usize, id: u32, l: List) {
        let mut keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| l.all || !s.exit_seen())
            .map(|(k, _)| k)
            .collect();
        keys.sort_by_key(|&k| self.sessions[k].seq());
        let mut page = Vec::new();
        let mut count = 0usize;
        for key in keys {
            let info = self.session_info(key, lk);
            let Ok(one) = rmp_serde::to_vec_named(&info) else {
                continue;
            };
            if count > 0 && page.len() + one.len() + 32 > PAGE_LIMIT {
                self.send_page(lk, id, count, &page, true);
                page.clear();
                count = 0;
            }
            page.extend_from_slice(&one);
            count += 1;
        }
        self.send_page(lk, id, count, &page, false);
    }

    /// One SESSIONS frame of `count` encoded entries.
    fn send_page(&mut self, lk: usize, id: u32, count: usize, entries: &[u8], more: bool) {
        let mut p = Vec::with_capacity(entries.len() + 32);
        p.push(0x82);
        p.push(0xa8);
        p.extend_from_slice(b"sessions");
        if count < 16 {
            p.push(0x90 | count as u8);
        } else {
            p.push(0xdc);
            p.extend_from_slice(&(count as u16).to_be_bytes());
        }
        p.extend_from_slice(entries);
        p.push(0xa4);
        p.extend_from_slice(b"more");
        p.push(if more { 0xc3 } else { 0xc2 });
        if let Err(e) =
            crate::codec::append_raw(self.links[lk].frames(), Kind::Sessions as u8, id, &p)
        {
            tracing::error!(error = %e, "a SESSIONS page could not be encoded");
        }
    }

    /// What LIST says of session `key` to link `lk`.
    fn session_info(&self, key: usize, lk: usize) -> SessionInfo {
        let s = &self.sessions[key];
        let info = s.info();
        let [stdout_bytes, stderr_bytes] = s.totals();
        let owner = s.owner();
        SessionInfo {
            session: s.seq(),
            tag: info.tag.clone(),
            pid: s.pid() as u32,
            cmd: info.cmd.clone(),
            args: info.args.clone(),
            user: info.user.clone(),
            tty: s.is_tty(),
            state: s.state_name().to_owned(),
            attached: owner.is_some(),
            id: owner.filter(|o| o.link == lk).map(|o| o.id),
            started_ms: info.started_ms,
            stdout_bytes,
            stderr_bytes,
            exit: s.exit(),
        }
    }

    /// ATTACH: finds the session, takes it from whoever has it, and gives
    /// it to this connection under `id`, replaying from its rings.
    fn attach(&mut self, lk: usize, id: u32, a: &Attach) {
        let key = match self.find_session(lk, id, a) {
            Ok(key) => key,
            Err(f) => return push_map(self.links[lk].frames(), Kind::AttachFailed, id, &f),
        };
        if self.sessions[key].owner().is_some() {
            self.detach(key, "attached_elsewhere");
        }
        let s = &mut self.sessions[key];
        let owner = Owner { link: lk, id };
        let [out, err] = s.attach(
            owner,
            a.output_window,
            [a.stdout_from, a.stderr_from],
            a.tail,
        );
        let attached = Attached {
            session: s.seq(),
            pid: s.pid() as u32,
            tty: s.is_tty(),
            stdout_from: out.from,
            stderr_from: err.from,
            stdout_lost: out.lost,
            stderr_lost: err.lost,
            stdin: s.stdin_open(),
        };
        self.ids.insert((lk, id), Owned::Session(key));
        push_map(self.links[lk].frames(), Kind::Attached, id, &attached);
        self.service(key);
    }

    /// The session an ATTACH names, or why it names none.
    fn find_session(&self, lk: usize, id: u32, a: &Attach) -> Result<usize, AttachFailed> {
        let fail = |kind, m: String| AttachFailed::new(kind, m);
        if id == 0 {
            return Err(fail(
                AttachFailedKind::InvalidRequest,
                "id 0 is the connection's".into(),
            ));
        }
        if self.ids.contains_key(&(lk, id)) {
            return Err(fail(
                AttachFailedKind::DuplicateId,
                format!("id {id} is in use"),
            ));
        }
        match (a.session, &a.tag) {
            (Some(n), None) => self
                .sessions
                .iter()
                .find(|(_, s)| s.seq() == n)
                .map(|(k, _)| k)
                .ok_or_else(|| fail(AttachFailedKind::NotFound, format!("no session {n}"))),
            (None, Some(tag)) => {
                let mut tagged: Vec<usize> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| s.info().tag.as_deref() == Some(tag.as_str()))
                    .map(|(k, _)| k)
                    .collect();
                tagged.sort_by_key(|&k| self.sessions[k].seq());
                let live: Vec<usize> = tagged
                    .iter()
                    .copied()
                    .filter(|&k| !self.sessions[k].is_finished())
                    .collect();
                match (live.len(), tagged.last()) {
                    (1, _) => Ok(live[0]),
                    (0, Some(&latest)) => Ok(latest),
                    (0, None) => Err(fail(
                        AttachFailedKind::NotFound,
                        format!("no session tagged {}", messages::quote(tag)),
                    )),
                    (n, _) => Err(fail(
                        AttachFailedKind::Ambiguous,
                        format!(
                            "{n} live sessions are tagged {}: attach one by number",
                            messages::quote(tag)
                        ),
                    )),
                }
            }
            _ => Err(fail(
                AttachFailedKind::InvalidRequest,
                "ATTACH takes a session number or a tag (exactly one of the two)".into(),
            )),
        }
    }
}
