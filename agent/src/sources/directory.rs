//! The directory policy source: a directory of policy files, read whole at
//! start and again after every change (inotify through `notify`),
//! debounced so an editor's save or a `kubectl cp` of many files makes one
//! snapshot.

use std::{
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::{
    event::{AccessKind, AccessMode},
    EventKind, RecursiveMode, Watcher as _,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{policy, sources::reconcile::Snapshot};

/// Quiet time after the last change before the directory is read.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Longest a stream of changes may delay a read.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// Reads `dir` into a snapshot.
pub fn snapshot(dir: &Path) -> anyhow::Result<Snapshot> {
    let loaded = policy::load_dir(dir)?;
    Ok(Snapshot {
        origin: format!("directory {} ({} files)", dir.display(), loaded.files),
        loaded,
    })
}

/// Sends a snapshot of `dir` as soon as it can be read, and again after
/// every change to it. A directory that does not exist yet (a volume not
/// mounted yet) is reported and waited for: the policy in force (the
/// saved state, if any) stays meanwhile.
pub fn watch(dir: PathBuf, out: mpsc::Sender<Snapshot>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("moat-dir-watch".into())
        .spawn(move || {
            if let Err(e) = run(&dir, &out) {
                error!(
                    "{e:#}; the policy in force stays, and {} is no longer watched",
                    dir.display()
                );
            }
        })
        .context("starting the watch thread")?;
    Ok(())
}

/// The identity of a directory: a new directory at the same path (a
/// volume re-mounted, a directory replaced) has another.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

/// How often the watched directory's identity is checked.
const IDENTITY_CHECK: Duration = Duration::from_secs(1);

fn run(dir: &Path, out: &mpsc::Sender<Snapshot>) -> anyhow::Result<()> {
    loop {
        let mut reported = false;
        let id = loop {
            if let Some(id) = identity(dir) {
                break id;
            }
            if !reported {
                warn!(
                    "{} does not exist (yet): waiting for it; the policy in force stays",
                    dir.display()
                );
                reported = true;
            }
            if out.is_closed() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let (tx, rx) = std_mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })
        .context("starting the file watcher")?;
        watcher
            .watch(dir, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        info!(
            "watching {} for changes (debounce {} ms)",
            dir.display(),
            DEBOUNCE.as_millis()
        );
        match snapshot(dir) {
            Ok(s) => {
                if out.blocking_send(s).is_err() {
                    return Ok(());
                }
            }
            Err(e) => error!("{e}; retrying on the next change"),
        }
        let replaced = debounce_loop(dir, id, &rx, out);
        drop(watcher);
        if !replaced {
            return Ok(());
        }
        warn!(
            "{} was removed or replaced: the policy in force stays; watching it again",
            dir.display()
        );
    }
}

/// A change worth a re-read: anything but reads (the agent's own reads
/// of the files would otherwise trigger it again).
fn relevant(event: &notify::Result<notify::Event>) -> bool {
    match event {
        Ok(e) => match e.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
        Err(e) => {
            error!("file watcher: {e}");
            true
        }
    }
}

/// Re-reads `dir` after each burst of changes. Returns true when the
/// directory was removed or replaced (its inotify watch is then gone), false
/// when the agent stopped listening or the watcher ended.
fn debounce_loop(
    dir: &Path,
    id: (u64, u64),
    rx: &std_mpsc::Receiver<notify::Result<notify::Event>>,
    out: &mpsc::Sender<Snapshot>,
) -> bool {
    loop {
        let event = match rx.recv_timeout(IDENTITY_CHECK) {
            Ok(event) => event,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                if out.is_closed() {
                    return false;
                }
                if identity(dir) != Some(id) {
                    return true;
                }
                continue;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return false,
        };
        if !relevant(&event) {
            continue;
        }
        debug!("change in {}: {event:?}", dir.display());
        let first = Instant::now();
        loop {
            let left = MAX_DELAY.saturating_sub(first.elapsed());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(DEBOUNCE.min(left)) {
                Ok(e) if relevant(&e) => continue,
                Ok(_) => continue,
                Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        match snapshot(dir) {
            Ok(s) => {
                if out.blocking_send(s).is_err() {
                    return false;
                }
            }
            // The policy in force stays; the next change retries.
            Err(e) => error!("{e}; the policy in force stays"),
        }
    }
}
