//! `agentctl port-forward`: local TCP listeners whose connections are
//! relayed to guest ports or Unix sockets, in `kubectl port-forward`'s
//! shape, until interrupted.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use clap::Args;

use agentd::client::{Client, Forwarder, NetTarget as Target};

use super::{complain, fail};

#[derive(Args, Debug)]
#[command(
    long_about = "Forward local ports to guest ports or Unix sockets, kubectl port-forward style, \
        until interrupted.\n\n\
        Each forward is LOCAL:REMOTE: 8080:80 listens on local port 8080 and connects to \
        guest port 80; :80 picks a free local port (printed); 8080 alone is 8080:8080; \
        REMOTE may be HOST:PORT as the guest resolves it, or unix:/path/to.sock.\n\
        One line per forward on stdout (Forwarding from 127.0.0.1:8080 -> 80), one line per \
        connection that fails on stderr.",
    after_help = "Examples:\n  agentctl port-forward 8080:80\n  agentctl port-forward :3000 \
        8888:unix:/run/jupyter.sock\n  agentctl port-forward --address 127.0.0.1,::1 5432:5432"
)]
pub(crate) struct PortForwardArgs {
    /// Local addresses to listen on (comma-separated or repeated); IP literals
    /// or localhost (127.0.0.1).
    #[arg(
        long = "address",
        value_name = "ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1"
    )]
    address: Vec<String>,
    /// Forwards, LOCAL:REMOTE.
    #[arg(value_name = "LOCAL:REMOTE", required = true, value_parser = parse_spec)]
    forwards: Vec<Spec>,
    /// Connect to Unix sockets as USER (so their permissions apply).
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spec {
    local: u16,
    remote: Target,
    /// How REMOTE was written, for the "Forwarding" line.
    shown: String,
}

fn parse_spec(s: &str) -> Result<Spec, String> {
    let (local, remote) = match s.split_once(':') {
        None => (s, s),
        Some((l, r)) => (l, r),
    };
    let local = if local.is_empty() {
        0
    } else {
        local
            .parse::<u16>()
            .map_err(|_| format!("{local:?} is not a local port (0 to 65535)"))?
    };
    let target = Target::parse(remote)?;
    Ok(Spec {
        local,
        remote: target,
        shown: remote.to_owned(),
    })
}

fn parse_addr(a: &str) -> Result<IpAddr, String> {
    if a == "localhost" {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    a.parse::<IpAddr>()
        .map_err(|_| format!("--address {a:?} is not an IP address"))
}

fn shown_addr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v) => format!("{}:{}", v.ip(), v.port()),
        SocketAddr::V6(v) => format!("[{}]:{}", v.ip(), v.port()),
    }
}

pub(crate) fn run(client: &Client, args: &PortForwardArgs) -> i32 {
    let mut addrs = Vec::new();
    for a in &args.address {
        match parse_addr(a) {
            Ok(ip) => addrs.push(ip),
            Err(e) => fail(e),
        }
    }
    let mut net = client.net();
    if let Some(u) = &args.user {
        net = net.as_user(u);
    }
    let mut forwarders: Vec<Forwarder> = Vec::new();
    for spec in &args.forwards {
        // With several addresses and :REMOTE, every address gets the port
        // the first one was given.
        let mut port = spec.local;
        for ip in &addrs {
            let want = SocketAddr::new(*ip, port);
            let listener = TcpListener::bind(want).unwrap_or_else(|e| {
                fail(format!(
                    "cannot listen on {}: {e}; pick another local port, or :{} for a free one",
                    shown_addr(want),
                    spec.shown
                ))
            });
            let local = listener
                .local_addr()
                .unwrap_or_else(|e| fail(format!("cannot read the listening address: {e}")));
            port = local.port();
            let shown = spec.shown.clone();
            let f = net
                .forward(listener, spec.remote.clone(), move |peer, e| {
                    complain(format!(
                        "forwarding a connection from {} to {shown}: {e}",
                        shown_addr(peer)
                    ))
                })
                .unwrap_or_else(|e| fail(format!("cannot start forwarding: {e}")));
            println!("Forwarding from {} -> {}", shown_addr(local), spec.shown);
            forwarders.push(f);
        }
    }
    // Until interrupted (the signal thread exits), or the agent goes.
    while !client.is_closed() {
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(forwarders);
    fail("the connection to the agent closed; nothing is forwarded any more")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = parse_spec("8080:80").unwrap();
        assert_eq!(s.local, 8080);
        assert_eq!(
            s.remote,
            Target::Tcp {
                host: "localhost".into(),
                port: 80
            }
        );
        assert_eq!(parse_spec(":80").unwrap().local, 0);
        assert_eq!(parse_spec("9000").unwrap().local, 9000);
        let u = parse_spec("8080:unix:/run/app.sock").unwrap();
        assert_eq!(u.remote, Target::Unix("/run/app.sock".into()));
        assert_eq!(u.shown, "unix:/run/app.sock");
        let h = parse_spec("8080:10.0.0.2:80").unwrap();
        assert_eq!(
            h.remote,
            Target::Tcp {
                host: "10.0.0.2".into(),
                port: 80
            }
        );
        assert!(parse_spec("x:80").is_err());
        assert!(parse_spec("8080:0").is_err());
        assert!(parse_addr("::1").is_ok());
        assert!(parse_addr("nope").is_err());
    }
}
