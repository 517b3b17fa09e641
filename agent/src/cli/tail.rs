//! `moat tail`: the agent's recent and live deny events, filtered, as
//! aligned text, JSON lines or iptables LOG lines, or summarised
//! (`--top`).

use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead as _, BufReader, IsTerminal as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::events::hub::{Filter, Message, Request, WireEvent};

/// `-o/--output` of `moat tail`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TailFormat {
    /// Aligned columns, colour on a terminal.
    #[default]
    Text,
    /// One JSON object per line (the socket protocol's event objects; gap
    /// markers as `{"type":"gap","missed":N}`).
    Json,
    /// The kernel LOG target's line with the `calico-packet: ` prefix.
    Iptables,
}

#[derive(Clone, Debug)]
pub struct TailConfig {
    pub socket: PathBuf,
    pub request: Request,
    pub format: TailFormat,
    /// `--top`: summary over a sliding window, redrawn every `interval`.
    pub top: Option<TopConfig>,
    pub prefix: String,
    pub colour: bool,
}

#[derive(Clone, Debug)]
pub struct TopConfig {
    pub window: Duration,
    pub interval: Duration,
    pub rows: usize,
    /// Redraw in place (a terminal) rather than print blocks.
    pub in_place: bool,
}

/// Connects to the agent's socket, explaining the usual failures. The
/// process serving it must be root's or this user's (SO_PEERCRED): events
/// are never read from a socket another user put at the path.
pub fn connect(path: &Path) -> anyhow::Result<UnixStream> {
    let stream = connect_any(path)?;
    let cred = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .with_context(|| format!("reading who serves {}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != me {
        anyhow::bail!(
            "{} is served by process {} of uid {}, not by root nor by you: refusing to read events from it (another user's socket at the agent's path?)",
            path.display(),
            cred.pid(),
            cred.uid()
        );
    }
    Ok(stream)
}

fn connect_any(path: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "no event socket at {}: is `moat agent` running? (it creates the socket when it starts; pass --socket if it uses another path)",
                path.display()
            ),
            std::io::ErrorKind::ConnectionRefused => format!(
                "nothing listens on {}: the agent that created it is not running any more",
                path.display()
            ),
            std::io::ErrorKind::PermissionDenied => format!(
                "permission denied on {}: the socket is root-only by default; run moat tail as root, or start the agent with --socket-group GROUP --socket-mode 0660 and join GROUP",
                path.display()
            ),
            _ => format!("connecting to {}", path.display()),
        };
        anyhow::anyhow!(e).context(hint)
    })
}

/// Runs `moat tail`; returns whether the stream had gaps.
pub fn run(cfg: TailConfig) -> anyhow::Result<bool> {
    let mut stream = connect(&cfg.socket)?;
    let mut req = serde_json::to_vec(&cfg.request)?;
    req.push(b'\n');
    stream
        .write_all(&req)
        .with_context(|| format!("sending the request to {}", cfg.socket.display()))?;
    let reader = BufReader::new(stream.try_clone().context("socket")?);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut missed_total = 0u64;
    let mut top = cfg.top.clone().map(Top::new);
    if let Some(t) = &top {
        // Redraw even when no event comes.
        stream
            .set_read_timeout(Some(t.cfg.interval))
            .context("socket timeout")?;
    }
    let mut widths = Widths::default();
    let mut reader = reader;
    let mut buf = Vec::new();
    let mut ended = false;
    loop {
        // read_until keeps what it read before a timeout in `buf`, so a
        // line split by a --top redraw is not lost.
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) if buf.last() != Some(&b'\n') => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if let Some(t) = top.as_mut().filter(|_| ended) {
                    t.maybe_draw(&mut out, missed_total)?;
                }
                continue;
            }
            Err(e) => return Err(e).context("reading events from the agent"),
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
        buf.clear();
        let msg: Message = serde_json::from_str(&line)
            .with_context(|| format!("the agent sent a line that is not a message: {line}"))?;
        match msg {
            Message::Event(e) => {
                if let Some(t) = top.as_mut() {
                    t.add(&e);
                    // The first table once the whole history is in.
                    if ended {
                        t.maybe_draw(&mut out, missed_total)?;
                    }
                    continue;
                }
                match cfg.format {
                    TailFormat::Json => writeln!(out, "{line}")?,
                    TailFormat::Iptables => writeln!(out, "{}{}", cfg.prefix, e.iptables)?,
                    TailFormat::Text => writeln!(out, "{}", widths.line(&e, cfg.colour))?,
                }
            }
            Message::Gap { missed } => {
                missed_total += missed;
                if cfg.format == TailFormat::Json && top.is_none() {
                    writeln!(out, "{line}")?;
                }
                out.flush()?;
                eprintln!(
                    "moat tail: {missed} event(s) not shown: this client read more slowly than events came (the agent never waits for a client); narrow the filters or use --top"
                );
            }
            Message::EndOfHistory { count } => {
                ended = true;
                if let Some(t) = top.as_mut() {
                    t.draw(&mut out, missed_total)?;
                }
                if cfg.format == TailFormat::Json && top.is_none() {
                    writeln!(out, "{line}")?;
                }
                if !cfg.request.follow {
                    out.flush()?;
                    break;
                }
                let _ = count;
            }
            Message::Error { message } => {
                anyhow::bail!("the agent refused the request: {message}")
            }
        }
        if top.is_none() {
            out.flush()?;
        }
    }
    if let Some(t) = top.as_mut() {
        t.draw(&mut out, missed_total)?;
    }
    out.flush()?;
    if !ended {
        anyhow::bail!(
            "the agent closed the stream (did it stop?); {} event(s) were not delivered to this client",
            missed_total
        );
    }
    if missed_total > 0 {
        eprintln!("moat tail: the stream had gaps: {missed_total} event(s) in all were not shown");
    }
    Ok(missed_total > 0)
}

/// Column widths that grow to the widest value seen, so columns stay
/// aligned.
#[derive(Default)]
struct Widths {
    iface: usize,
    src: usize,
    dst: usize,
}

fn endpoint(a: std::net::IpAddr, p: Option<u16>) -> String {
    match (a, p) {
        (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    }
}

impl Widths {
    fn line(&mut self, w: &WireEvent, colour: bool) -> String {
        let e = &w.event;
        let src = endpoint(e.src, e.sport);
        let dst = endpoint(e.dst, e.dport);
        self.iface = self.iface.max(e.iface.len());
        self.src = self.src.max(src.len());
        self.dst = self.dst.max(dst.len());
        let verdict = e.verdict.to_uppercase();
        let verdict = if colour {
            let code = match e.verdict.as_str() {
                "deny" => "31",
                "log" => "33",
                _ => "35",
            };
            format!("\x1b[{code}m{verdict:<5}\x1b[0m")
        } else {
            format!("{verdict:<5}")
        };
        let mut what = String::new();
        if let (Some(t), Some(c)) = (e.icmp_type, e.icmp_code) {
            what = format!("type {t}/{c}");
        }
        if let Some(f) = &e.tcp_flags {
            what = f.clone();
        }
        let by = match (&e.policy, e.rule) {
            (Some(p), Some(r)) => format!("{p} rule {r}"),
            _ => e.reason.clone(),
        };
        // Time without the date: the day rarely changes within a tail.
        let time = e.time.split_once('T').map_or(e.time.as_str(), |(_, t)| t);
        format!(
            "{time} {:<iw$} {:<7} {verdict} {:<6} {src:<sw$} -> {dst:<dw$} {what:<9} {by}",
            e.iface,
            e.direction,
            e.protocol,
            iw = self.iface,
            sw = self.src,
            dw = self.dst,
        )
    }
}

/// `--top`: counts over a sliding window.
struct Top {
    cfg: TopConfig,
    window: VecDeque<(i64, String, String, String)>,
    last_draw: Option<Instant>,
    total: u64,
}

impl Top {
    fn new(cfg: TopConfig) -> Self {
        Top {
            cfg,
            window: VecDeque::new(),
            last_draw: None,
            total: 0,
        }
    }

    fn add(&mut self, w: &WireEvent) {
        let e = &w.event;
        if e.verdict == "log" {
            return;
        }
        self.total += 1;
        let port = match e.dport {
            Some(p) => format!("{}/{p}", e.protocol),
            None => e.protocol.clone(),
        };
        let policy = match (&e.policy, e.rule) {
            (Some(p), Some(r)) => format!("{p} rule {r}"),
            _ => format!("({})", e.reason),
        };
        self.window
            .push_back((w.time_ns, e.src.to_string(), port, policy));
    }

    fn maybe_draw(&mut self, out: &mut impl std::io::Write, missed: u64) -> anyhow::Result<()> {
        if self
            .last_draw
            .is_none_or(|t| t.elapsed() >= self.cfg.interval)
        {
            self.draw(out, missed)?;
        }
        Ok(())
    }

    fn draw(&mut self, out: &mut impl std::io::Write, missed: u64) -> anyhow::Result<()> {
        self.last_draw = Some(Instant::now());
        let oldest = crate::events::hub::now_ns() - self.cfg.window.as_nanos() as i64;
        while self.window.front().is_some_and(|(t, ..)| *t < oldest) {
            self.window.pop_front();
        }
        let top = |pick: fn(&(i64, String, String, String)) -> &String| {
            let mut counts: HashMap<&str, u64> = HashMap::new();
            for e in &self.window {
                *counts.entry(pick(e).as_str()).or_default() += 1;
            }
            let mut v: Vec<(&str, u64)> = counts.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            v.truncate(self.cfg.rows);
            v.into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect::<Vec<_>>()
        };
        let sources = top(|e| &e.1);
        let ports = top(|e| &e.2);
        let policies = top(|e| &e.3);
        if self.cfg.in_place {
            write!(out, "\x1b[H\x1b[2J")?;
        }
        writeln!(
            out,
            "moat tail --top  {}  last {}s: {} denied event(s){}",
            crate::events::event::rfc3339(crate::events::hub::now_ns() as i128),
            self.cfg.window.as_secs(),
            self.window.len(),
            if missed > 0 {
                format!(" ({missed} not delivered: gaps)")
            } else {
                String::new()
            }
        )?;
        for (title, rows) in [
            ("sources", sources),
            ("ports", ports),
            ("policies", policies),
        ] {
            writeln!(out, "  top {title}:")?;
            if rows.is_empty() {
                writeln!(out, "    (none)")?;
            }
            for (k, n) in rows {
                writeln!(out, "    {n:>8}  {k}")?;
            }
        }
        if !self.cfg.in_place {
            writeln!(out)?;
        }
        out.flush()?;
        Ok(())
    }
}

/// Whether stdout is a terminal (follow and colour by default).
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// Builds the filter from the command line's values, checking them.
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per command-line filter"
)]
pub fn filter(
    iface: Vec<String>,
    direction: Option<String>,
    policy: Option<String>,
    verdict: Option<String>,
    src: Option<ipnet::IpNet>,
    dst: Option<ipnet::IpNet>,
    port: Option<u16>,
    proto: Option<String>,
) -> anyhow::Result<Filter> {
    let f = Filter {
        iface,
        direction,
        policy,
        verdict,
        src,
        dst,
        port,
        proto,
    };
    f.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
    Ok(f)
}
