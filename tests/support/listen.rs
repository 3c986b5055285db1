//! A listening agent (`agentd --listen unix:PATH`) and hosts that connect
//! to it, each a [`Conn`] of its own (its own checker, its own id space),
//! with typed helpers for the frames the sessions tests wait for.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentd::codec::OwnedFrame;
use agentd::messages::{
    Ack, Attach, Attached, Detached, ErrorMsg, Exec, ExecFailed, Exited, Kind, List, Message,
    SessionInfo, Sessions, SessionsMsg, Started,
};

use super::host::{AgentProcess, Conn, Opts};
use super::timeout;
use super::util::TempDir;

/// An agent listening on a Unix socket in a scratch directory.
pub struct Listening {
    // First: the process tree dies before the directory goes.
    pub process: AgentProcess,
    pub path: PathBuf,
    _dir: TempDir,
}

impl Listening {
    pub fn start(opts: &Opts) -> Listening {
        let dir = TempDir::new("listen");
        let path = dir.join("agent.sock");
        let process = AgentProcess::spawn_listen(opts, &path);
        Listening {
            process,
            path,
            _dir: dir,
        }
    }

    /// A new host connection, READY read.
    pub fn connect(&self) -> Client {
        let stream = UnixStream::connect(&self.path).expect("connecting to the agent");
        let write = OwnedFd::from(stream.try_clone().expect("dup of the socket"));
        let mut conn = Conn::new(OwnedFd::from(stream), write);
        let f = conn
            .next_frame(timeout())
            .expect("the agent closed before READY");
        assert_eq!(f.kind, Kind::Ready as u8, "the first frame is READY");
        Client {
            conn,
            output: Default::default(),
        }
    }
}

/// What a host saw of one id: output and the end.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exited: Option<Exited>,
    pub detached: Option<Detached>,
}

/// One host connection.
pub struct Client {
    pub conn: Conn,
    /// Output and ends seen per id, while waiting for something else.
    pub output: std::collections::HashMap<u32, Seen>,
}

impl Client {
    /// The next frame; ERROR frames are returned like any other.
    pub fn frame(&mut self) -> OwnedFrame {
        self.conn
            .next_frame(timeout())
            .expect("end of file from the agent")
    }

    /// Records output and ends; returns the frame unless it was output.
    fn note(&mut self, f: OwnedFrame) -> Option<OwnedFrame> {
        let seen = self.output.entry(f.id).or_default();
        if f.kind == Kind::Stdout as u8 {
            seen.stdout.extend_from_slice(&f.payload);
        } else if f.kind == Kind::Stderr as u8 {
            seen.stderr.extend_from_slice(&f.payload);
        } else {
            match decode(&f) {
                Message::Exited(e) => seen.exited = Some(e),
                Message::Sessions(SessionsMsg::Detached(d)) => seen.detached = Some(d),
                _ => {}
            }
            return Some(f);
        }
        None
    }

    /// Waits for a frame of `kind` on `id`, noting output meanwhile; an
    /// ERROR meanwhile fails the test.
    #[track_caller]
    pub fn wait(&mut self, kind: Kind, id: u32) -> OwnedFrame {
        loop {
            let f = self.frame();
            if f.kind == kind as u8 && f.id == id {
                self.note(f.clone());
                return f;
            }
            if let Some(f) = self.note(f) {
                assert_ne!(
                    f.kind,
                    Kind::Error as u8,
                    "ERROR while waiting for {kind:?} on {id}: {:?}",
                    decode(&f)
                );
            }
        }
    }

    pub fn exec(&mut self, id: u32, exec: &Exec) -> Started {
        self.conn.send_exec(id, exec);
        loop {
            let f = self.frame();
            if f.id == id && f.kind == Kind::ExecFailed as u8 {
                panic!("EXEC_FAILED: {:?}", decode(&f));
            }
            if f.id == id && f.kind == Kind::Started as u8 {
                let Message::Started(s) = decode(&f) else {
                    unreachable!()
                };
                return s;
            }
            self.note(f);
        }
    }

    pub fn exec_failed(&mut self, id: u32, exec: &Exec) -> ExecFailed {
        self.conn.send_exec(id, exec);
        let f = self.wait(Kind::ExecFailed, id);
        let Message::ExecFailed(e) = decode(&f) else {
            unreachable!()
        };
        e
    }

    /// Output until EXITED on `id`.
    #[track_caller]
    pub fn until_exited(&mut self, id: u32) -> Seen {
        if !self.output.get(&id).is_some_and(|s| s.exited.is_some()) {
            self.wait(Kind::Exited, id);
        }
        self.output.remove(&id).unwrap_or_default()
    }

    /// DETACHED on `id` (seen already, or waited for).
    #[track_caller]
    pub fn until_detached(&mut self, id: u32) -> Detached {
        if !self.output.get(&id).is_some_and(|s| s.detached.is_some()) {
            self.wait(Kind::Detached, id);
        }
        self.output[&id].detached.clone().expect("DETACHED noted")
    }

    /// Output on `id` until it holds `text`.
    #[track_caller]
    pub fn until_stdout(&mut self, id: u32, text: &str) -> Vec<u8> {
        let end = Instant::now() + timeout();
        loop {
            let now = self.output.get(&id).map(|s| s.stdout.clone());
            if let Some(out) = now {
                if String::from_utf8_lossy(&out).contains(text) {
                    return out;
                }
            }
            assert!(Instant::now() < end, "no {text:?} on {id}");
            let f = self.frame();
            self.note(f);
        }
    }

    pub fn list(&mut self, id: u32, all: bool) -> Vec<SessionInfo> {
        self.list_pages(id, all).into_iter().flatten().collect()
    }

    /// LIST's SESSIONS pages, each the sessions of one frame.
    pub fn list_pages(&mut self, id: u32, all: bool) -> Vec<Vec<SessionInfo>> {
        self.conn
            .send(&Message::Sessions(SessionsMsg::List(List { all })), id);
        let mut pages = Vec::new();
        loop {
            let f = self.wait(Kind::Sessions, id);
            assert!(f.payload.len() <= 64 * 1024, "a SESSIONS page over 64 KiB");
            let Message::Sessions(SessionsMsg::Sessions(Sessions { sessions, more })) = decode(&f)
            else {
                unreachable!()
            };
            pages.push(sessions);
            if !more {
                return pages;
            }
        }
    }

    pub fn send_attach(&mut self, id: u32, a: Attach) {
        self.conn
            .send(&Message::Sessions(SessionsMsg::Attach(Box::new(a))), id);
    }

    /// ATTACH, expecting ATTACHED.
    #[track_caller]
    pub fn attach(&mut self, id: u32, a: Attach) -> Attached {
        self.send_attach(id, a);
        loop {
            let f = self.frame();
            if f.id == id && f.kind == Kind::AttachFailed as u8 {
                panic!("ATTACH_FAILED: {:?}", decode(&f));
            }
            if f.id == id && f.kind == Kind::Attached as u8 {
                let Message::Sessions(SessionsMsg::Attached(a)) = decode(&f) else {
                    unreachable!()
                };
                return a;
            }
            self.note(f);
        }
    }

    /// ATTACH, expecting ATTACH_FAILED of `kind`.
    #[track_caller]
    pub fn attach_fails(&mut self, id: u32, a: Attach, kind: &str) {
        self.send_attach(id, a);
        let f = self.wait(Kind::AttachFailed, id);
        let Message::Sessions(SessionsMsg::AttachFailed(e)) = decode(&f) else {
            unreachable!()
        };
        assert_eq!(e.kind, kind, "{}", e.message);
    }

    /// The next ERROR on `id`.
    #[track_caller]
    pub fn error(&mut self, id: u32) -> ErrorMsg {
        loop {
            let f = self.frame();
            if f.kind == Kind::Error as u8 && f.id == id {
                let Message::Error(e) = decode(&f) else {
                    unreachable!()
                };
                return e;
            }
            self.note(f);
        }
    }

    pub fn output_ack(&mut self, id: u32, bytes: u32) {
        self.conn.send(&Message::OutputAck(Ack { bytes }), id);
    }

    /// Drops the connection (the agent sees EOF).
    pub fn disconnect(self) {}
}

pub fn decode(f: &OwnedFrame) -> Message<'_> {
    Message::decode_from_agent(f.as_frame())
        .unwrap_or_else(|e| panic!("undecodable frame {:#x}: {e}", f.kind))
}

/// ATTACH by session number, replay from the oldest byte kept.
pub fn by_number(session: u64) -> Attach {
    Attach {
        session: Some(session),
        ..Attach::default()
    }
}

pub fn by_tag(tag: &str) -> Attach {
    Attach {
        tag: Some(tag.into()),
        ..Attach::default()
    }
}

/// Waits until `cond` holds for the session list (`all`) of `client`.
#[track_caller]
pub fn wait_listed(client: &mut Client, id: u32, cond: impl Fn(&[SessionInfo]) -> bool) {
    let end = Instant::now() + timeout();
    loop {
        let l = client.list(id, true);
        if cond(&l) {
            return;
        }
        assert!(Instant::now() < end, "the list never got there: {l:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
