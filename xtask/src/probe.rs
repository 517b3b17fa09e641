//! Tiny network helpers the demo runs inside its namespaces
//! (`ip netns exec NS cargo-xtask probe ...`), so the demo needs no netcat.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Probe {
    /// Accept (and close) TCP connections on each address until killed.
    Listen { addrs: Vec<SocketAddr> },
    /// Try one TCP connection; prints "accepted", "refused" or "timed out".
    Connect {
        to: SocketAddr,
        /// Source address to bind first.
        #[arg(long)]
        from: Option<std::net::IpAddr>,
        #[arg(long, default_value_t = 1500)]
        timeout_ms: u64,
    },
}

pub fn run(probe: Probe) -> Result<()> {
    match probe {
        Probe::Listen { addrs } => {
            let mut threads = Vec::new();
            for addr in addrs {
                let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
                threads.push(std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        drop(stream);
                    }
                }));
            }
            println!("listening");
            for t in threads {
                let _ = t.join();
            }
            Ok(())
        }
        Probe::Connect {
            to,
            from,
            timeout_ms,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let result = match from {
                None => TcpStream::connect_timeout(&to, timeout).map(drop),
                Some(src) => connect_from(src, to, timeout),
            };
            let word = match result {
                Ok(()) => "accepted",
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
                Err(e)
                    if e.kind() == std::io::ErrorKind::TimedOut
                        || e.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    "timed out"
                }
                Err(e) => return Err(e).with_context(|| format!("connect {to}")),
            };
            println!("{word}");
            Ok(())
        }
    }
}

/// A connect from a chosen source address, with a timeout.
fn connect_from(src: std::net::IpAddr, to: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(src, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)
}
