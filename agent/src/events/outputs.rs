//! Outputs the user turns on: a JSON lines file with size-based rotation
//! and a retention limit (`--events-file`), and syslog (`--syslog`).
//!
//! Events carry client addresses, which are personal data: the file and
//! its rotations are created mode 0600, at most `keep` rotated files are
//! kept, and none holds an event older than `max_age`.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    os::unix::{fs::OpenOptionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;

/// Where and how much the events file keeps.
#[derive(Clone, Debug)]
pub struct FileConfig {
    pub path: PathBuf,
    /// Rotate once the file would grow past this.
    pub max_bytes: u64,
    /// Rotated files kept (`PATH.1` newest ... `PATH.keep`).
    pub keep: u32,
    /// No file keeps events older than this.
    pub max_age: Duration,
}

/// The events file being written.
pub struct EventsFile {
    cfg: FileConfig,
    out: BufWriter<File>,
    size: u64,
    /// When the current file got its first event.
    first_write: Option<SystemTime>,
}

fn open(path: &Path) -> anyhow::Result<(BufWriter<File>, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the events file {}", path.display()))?;
    let size = file
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    Ok((BufWriter::new(file), size))
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl EventsFile {
    pub fn open(cfg: FileConfig) -> anyhow::Result<Self> {
        if cfg.max_bytes == 0 {
            anyhow::bail!("--events-file-max-bytes must be above 0");
        }
        let (out, size) = open(&cfg.path)?;
        // A file left by an earlier run: its age is its last write.
        let first_write = (size > 0)
            .then(|| std::fs::metadata(&cfg.path).and_then(|m| m.modified()).ok())
            .flatten();
        let mut f = EventsFile {
            cfg,
            out,
            size,
            first_write,
        };
        f.enforce_retention()?;
        Ok(f)
    }

    /// Appends one line (a newline is added).
    pub fn write(&mut self, line: &str) -> anyhow::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.cfg.max_bytes {
            self.rotate()?;
        }
        self.out
            .write_all(line.as_bytes())
            .and_then(|()| self.out.write_all(b"\n"))
            .with_context(|| format!("writing {}", self.cfg.path.display()))?;
        self.size += len;
        self.first_write.get_or_insert_with(SystemTime::now);
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.cfg.path.display()))
    }

    /// `PATH` becomes `PATH.1`, `PATH.1` becomes `PATH.2`, ...; the oldest
    /// beyond `keep` is deleted.
    fn rotate(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        let path = self.cfg.path.clone();
        if self.cfg.keep == 0 {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        } else {
            let _ = std::fs::remove_file(rotated(&path, self.cfg.keep));
            for n in (1..self.cfg.keep).rev() {
                let from = rotated(&path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(&path, n + 1))
                        .with_context(|| format!("rotating {}", from.display()))?;
                }
            }
            std::fs::rename(&path, rotated(&path, 1))
                .with_context(|| format!("rotating {}", path.display()))?;
        }
        let (out, size) = open(&path)?;
        self.out = out;
        self.size = size;
        self.first_write = None;
        Ok(())
    }

    /// Deletes rotated files whose oldest event is older than `max_age`,
    /// and rotates the current file once its oldest event is (run it
    /// periodically): no event outlives `max_age` by more than the period.
    pub fn enforce_retention(&mut self) -> anyhow::Result<()> {
        let now = SystemTime::now();
        let max_age = self.cfg.max_age;
        let too_old = move |t: SystemTime| now.duration_since(t).is_ok_and(|age| age > max_age);
        if self.first_write.is_some_and(too_old) {
            self.rotate()?;
        }
        for n in 1..=self.cfg.keep.max(1) {
            let p = rotated(&self.cfg.path, n);
            if oldest_event(&p).is_some_and(too_old) {
                std::fs::remove_file(&p)
                    .with_context(|| format!("removing expired {}", p.display()))?;
            }
        }
        Ok(())
    }
}

/// Time of the first event in a rotated file (its `time_ns`), or the
/// file's last write when the first line does not say.
fn oldest_event(path: &Path) -> Option<SystemTime> {
    use std::io::BufRead as _;
    let file = File::open(path).ok()?;
    let mut first = String::new();
    std::io::BufReader::new(&file).read_line(&mut first).ok()?;
    serde_json::from_str::<serde_json::Value>(&first)
        .ok()
        .and_then(|v| v["time_ns"].as_u64())
        .map(|ns| SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
        .or_else(|| file.metadata().and_then(|m| m.modified()).ok())
}

/// The local syslog daemon's datagram socket.
pub struct Syslog {
    socket: UnixDatagram,
    tag: String,
}

/// Facility daemon (3), severity warning (4): `<28>`.
const PRIORITY: u8 = 3 * 8 + 4;

impl Syslog {
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let socket = UnixDatagram::unbound().context("creating a datagram socket for syslog")?;
        socket.connect(path).with_context(|| {
            format!(
                "connecting to syslog at {} (is a syslog daemon or journald running?)",
                path.display()
            )
        })?;
        // The reader must never wait for the syslog daemon: a full socket
        // buffer drops the line, counted as an output error.
        socket
            .set_nonblocking(true)
            .context("making the syslog socket non-blocking")?;
        Ok(Syslog {
            socket,
            tag: format!("moat[{}]", std::process::id()),
        })
    }

    /// Sends one line as `<28>moat[PID]: LINE`.
    pub fn send(&self, line: &str) -> std::io::Result<()> {
        let msg = format!("<{PRIORITY}>{}: {line}", self.tag);
        self.socket.send(msg.as_bytes()).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "moat-outputs-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn rotates_by_size_and_keeps_at_most_keep_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = dir();
        let path = d.join("events.jsonl");
        let mut f = EventsFile::open(FileConfig {
            path: path.clone(),
            max_bytes: 100,
            keep: 2,
            max_age: Duration::from_secs(3600),
        })
        .expect("open");
        for i in 0..10 {
            f.write(&format!("{{\"n\":{i:040}}}")).expect("write");
        }
        f.flush().expect("flush");
        let mut names: Vec<String> = std::fs::read_dir(&d)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]);
        for n in &names {
            let p = d.join(n);
            let text = std::fs::read_to_string(&p).expect("read");
            assert!(text.len() <= 100, "{n}: {} bytes", text.len());
            let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{n}");
        }
        // The newest events are in the current file, the oldest kept in .2.
        assert!(std::fs::read_to_string(&path)
            .expect("read")
            .contains(&format!("{:040}", 9)));
        assert!(std::fs::read_to_string(d.join("events.jsonl.2"))
            .expect("read")
            .contains(&format!("{:040}", 4)));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn expired_files_are_deleted() {
        let d = dir();
        let path = d.join("events.jsonl");
        let mut f = EventsFile::open(FileConfig {
            path: path.clone(),
            max_bytes: 1 << 20,
            keep: 3,
            max_age: Duration::from_millis(200),
        })
        .expect("open");
        let line = |age: Duration| {
            let t = SystemTime::now() - age;
            let ns = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_nanos();
            format!("{{\"time_ns\":{ns}}}")
        };
        f.write(&line(Duration::ZERO)).expect("write");
        f.flush().expect("flush");
        f.enforce_retention().expect("retention");
        assert!(!rotated(&path, 1).exists(), "nothing expired yet");
        std::thread::sleep(Duration::from_millis(300));
        f.enforce_retention().expect("retention");
        // The current file held an expired event: rotated, and .1 (whose
        // oldest event is expired) deleted at once.
        assert!(!rotated(&path, 1).exists());
        // A rotated file with one fresh event stays, one with an old first
        // event goes.
        std::fs::write(rotated(&path, 1), line(Duration::ZERO) + "\n").expect("write");
        std::fs::write(
            rotated(&path, 2),
            line(Duration::from_secs(1)) + "\n" + &line(Duration::ZERO),
        )
        .expect("write");
        f.enforce_retention().expect("retention");
        assert!(rotated(&path, 1).exists());
        assert!(!rotated(&path, 2).exists());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
        let _ = std::fs::remove_dir_all(&d);
    }
}
