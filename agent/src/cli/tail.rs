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

use crate::events::hub::{Message, Request, WireEvent};

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
    /// When following and the agent goes away (stops or restarts): wait
    /// for it and go on (true), or end (`--exit-on-restart`).
    pub reconnect: bool,
}

#[derive(Clone, Debug)]
pub struct TopConfig {
    pub window: Duration,
    pub interval: Duration,
    pub rows: usize,
    /// Redraw in place (a terminal) rather than print blocks.
    pub in_place: bool,
}

/// How a tail ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Events the agent could not deliver to this client (gaps).
    pub missed: u64,
    /// The agent went away while following (`--exit-on-restart`).
    pub agent_gone: bool,
}

/// No agent answers on the socket.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotRunning(pub String);

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
        let gone = |hint: String| anyhow::Error::from(NotRunning(format!("{hint}: {e}")));
        match e.kind() {
            std::io::ErrorKind::NotFound => gone(format!(
                "no event socket at {}: is `moat agent` running? (it creates the socket when it starts; pass --socket if it uses another path)",
                path.display()
            )),
            std::io::ErrorKind::ConnectionRefused => gone(format!(
                "nothing listens on {}: the agent that created it is not running any more",
                path.display()
            )),
            std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(e).context(format!(
                "permission denied on {}: the socket is root-only by default; run moat tail as root, or start the agent with --socket-group GROUP --socket-mode 0660 and join GROUP",
                path.display()
            )),
            _ => anyhow::anyhow!(e).context(format!("connecting to {}", path.display())),
        }
    })
}

/// How one connection to the agent ended.
enum End {
    /// All that was asked for was shown.
    Done,
    /// The agent closed the stream while this client followed it.
    Closed,
}

/// What a tail keeps across connections.
struct Session<W: std::io::Write> {
    cfg: TailConfig,
    out: W,
    missed: u64,
    top: Option<Top>,
    widths: Widths,
    /// Time of the newest event shown: after a reconnection, older ones
    /// (already shown) are skipped.
    newest_ns: Option<i64>,
}

/// Runs `moat tail`.
pub fn run(cfg: TailConfig) -> anyhow::Result<Outcome> {
    let stdout = std::io::stdout();
    let mut s = Session {
        top: cfg.top.clone().map(Top::new),
        cfg,
        out: std::io::BufWriter::new(stdout.lock()),
        missed: 0,
        widths: Widths::default(),
        newest_ns: None,
    };
    let mut stream = connect(&s.cfg.socket)?;
    let mut request = s.cfg.request.clone();
    loop {
        match s.stream(stream, &request)? {
            End::Done => break,
            End::Closed => {
                let gone_ns = crate::events::hub::now_ns();
                s.marker("disconnected", gone_ns, None)?;
                if !s.cfg.reconnect {
                    s.finish()?;
                    return Ok(Outcome {
                        missed: s.missed,
                        agent_gone: true,
                    });
                }
                stream = wait_for(&s.cfg.socket);
                let back_ns = crate::events::hub::now_ns();
                s.marker("reconnected", back_ns, Some(gone_ns))?;
                // What the new agent saw since the old one went away.
                let down = (back_ns - gone_ns).max(0) as u64 / 1_000_000_000;
                request.history = None;
                request.since_seconds = Some(down + 2);
            }
        }
    }
    s.finish()?;
    if s.missed > 0 {
        eprintln!(
            "moat tail: the stream had gaps: {} event(s) in all were not shown",
            s.missed
        );
    }
    Ok(Outcome {
        missed: s.missed,
        agent_gone: false,
    })
}

/// Connects again, once a second, until an agent answers.
fn wait_for(path: &Path) -> UnixStream {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(s) = UnixStream::connect(path) {
            return s;
        }
    }
}

impl<W: std::io::Write> Session<W> {
    /// Sends `request` and shows what comes back until the history ends
    /// (not following) or the agent closes the stream.
    fn stream(&mut self, stream: UnixStream, request: &Request) -> anyhow::Result<End> {
        let mut stream = stream;
        let mut req = serde_json::to_vec(request)?;
        req.push(b'\n');
        stream
            .write_all(&req)
            .with_context(|| format!("sending the request to {}", self.cfg.socket.display()))?;
        if let Some(t) = &self.top {
            // Redraw even when no event comes.
            stream
                .set_read_timeout(Some(t.cfg.interval))
                .context("socket timeout")?;
        }
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        let mut ended = false;
        loop {
            // read_until keeps what it read before a timeout in `buf`, so
            // a line split by a --top redraw is not lost.
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
                    if let Some(t) = self.top.as_mut().filter(|_| ended) {
                        t.maybe_draw(&mut self.out, self.missed)?;
                    }
                    continue;
                }
                Err(e) if request.follow && ended => {
                    tracing::debug!("reading events: {e}");
                    break;
                }
                Err(e) => return Err(e).context("reading events from the agent"),
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            buf.clear();
            let msg: Message = serde_json::from_str(&line)
                .with_context(|| format!("the agent sent a line that is not a message: {line}"))?;
            if let Message::EndOfHistory { .. } = msg {
                ended = true;
            }
            if self.message(msg, &line, request.follow)? {
                return Ok(End::Done);
            }
        }
        self.out.flush()?;
        if !ended || !request.follow {
            anyhow::bail!(
                "the agent closed the stream (did it stop?); {} event(s) were not delivered to this client",
                self.missed
            );
        }
        Ok(End::Closed)
    }

    /// Shows one message; true when the tail is done.
    fn message(&mut self, msg: Message, line: &str, follow: bool) -> anyhow::Result<bool> {
        let json = self.cfg.format == TailFormat::Json && self.top.is_none();
        match msg {
            Message::Event(e) => {
                if self.newest_ns.is_some_and(|n| e.time_ns <= n) {
                    return Ok(false);
                }
                self.newest_ns = Some(e.time_ns);
                if let Some(t) = self.top.as_mut() {
                    t.add(&e);
                    // The first table once the whole history is in.
                    if t.last_draw.is_some() {
                        t.maybe_draw(&mut self.out, self.missed)?;
                    }
                    return Ok(false);
                }
                match self.cfg.format {
                    TailFormat::Json => writeln!(self.out, "{line}")?,
                    TailFormat::Iptables => {
                        writeln!(self.out, "{}{}", self.cfg.prefix, e.iptables)?
                    }
                    TailFormat::Text => {
                        writeln!(self.out, "{}", self.widths.line(&e, self.cfg.colour))?
                    }
                }
            }
            Message::Gap { missed } => {
                self.missed += missed;
                if json {
                    writeln!(self.out, "{line}")?;
                }
                self.out.flush()?;
                eprintln!(
                    "moat tail: {missed} event(s) not shown: this client read more slowly than events came (the agent never waits for a client); narrow the filters or use --top"
                );
            }
            Message::EndOfHistory { .. } => {
                if let Some(t) = self.top.as_mut() {
                    t.draw(&mut self.out, self.missed)?;
                }
                if json {
                    writeln!(self.out, "{line}")?;
                }
                if !follow {
                    self.out.flush()?;
                    return Ok(true);
                }
            }
            Message::Error { message } => {
                anyhow::bail!("the agent refused the request: {message}")
            }
        }
        if self.top.is_none() {
            self.out.flush()?;
        }
        Ok(false)
    }

    /// A visible mark where the stream broke or resumed: a line on stdout
    /// (text: `--- ... ---`; JSON: `{"type":"disconnected"|"reconnected"}`),
    /// on stderr for iptables lines and --top.
    fn marker(&mut self, kind: &str, at_ns: i64, since_ns: Option<i64>) -> anyhow::Result<()> {
        let time = crate::events::event::rfc3339(at_ns as i128);
        let text = match (kind, since_ns) {
            ("disconnected", _) if self.cfg.reconnect => format!(
                "--- {time} the agent closed the stream (stopped or restarting); waiting for it on {} ---",
                self.cfg.socket.display()
            ),
            ("disconnected", _) => format!(
                "--- {time} the agent closed the stream (stopped or restarting); exiting ---"
            ),
            (_, Some(since)) => format!(
                "--- {time} reconnected after {:.1} s (what the new agent read since the break follows) ---",
                (at_ns - since) as f64 / 1e9
            ),
            _ => format!("--- {time} {kind} ---"),
        };
        if self.cfg.format == TailFormat::Json && self.top.is_none() {
            let mut v = serde_json::json!({"type": kind, "time": time});
            if let Some(since) = since_ns {
                v["after_seconds"] = serde_json::json!((at_ns - since) as f64 / 1e9);
            }
            writeln!(self.out, "{v}")?;
        } else if self.cfg.format == TailFormat::Text && self.top.is_none() {
            writeln!(self.out, "{text}")?;
        } else {
            self.out.flush()?;
            eprintln!("moat tail: {text}");
        }
        self.out.flush()?;
        Ok(())
    }

    /// The last --top frame, unless the history's end just drew it.
    fn finish(&mut self) -> anyhow::Result<()> {
        if let Some(t) = self.top.as_mut() {
            if self.cfg.request.follow || t.last_draw.is_none() {
                t.draw(&mut self.out, self.missed)?;
            }
        }
        self.out.flush()?;
        Ok(())
    }
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
        // The date too: a tail may cross midnight, and history goes back
        // days.
        let time = &e.time;
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
