//! The directory policy source: a directory of policy files, read whole at
//! start and again after every change (inotify through `notify`),
//! debounced so an editor's save or a `kubectl cp` of many files makes one
//! snapshot.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::{
    event::{AccessKind, AccessMode, ModifyKind},
    EventKind, RecursiveMode, Watcher as _,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{policy, sources::reconcile::Snapshot};

/// Quiet time after the last change before the directory is read.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Longest a stream of changes may delay a read.
pub const MAX_DELAY: Duration = Duration::from_secs(1);

/// Reads `dir` into a snapshot. A file that could not be read for want
/// of resources (descriptors, memory) makes the whole read fail, to be
/// retried: a snapshot without that file's objects would remove them.
pub fn snapshot(dir: &Path) -> anyhow::Result<Snapshot> {
    let tree = policy::tree::walk(dir)
        .with_context(|| format!("cannot read the policy directory {}", dir.display()))?;
    let mut texts = std::collections::BTreeMap::new();
    let mut unreadable = Vec::new();
    for (shown, open) in &tree.files {
        match policy::read_bounded(open) {
            Ok(text) => {
                texts.insert(shown.to_string_lossy().into_owned(), text);
            }
            Err(e) => {
                if transient(&e.to_string()) {
                    anyhow::bail!("cannot read {}: {e}", shown.display());
                }
                unreadable.push(policy::PolicyError {
                    file: shown.clone(),
                    resource: String::new(),
                    field: String::new(),
                    message: format!("cannot read: {e}"),
                    document: None,
                });
            }
        }
    }
    let mut loaded = policy::load_texts(
        texts
            .iter()
            .map(|(k, v)| (Path::new(k.as_str()), v.as_str())),
    );
    loaded.errors.extend(unreadable);
    loaded.files = tree.files.len();
    loaded.skipped = tree.skipped;
    for s in &loaded.skipped {
        warn!("{s}");
    }
    Ok(Snapshot {
        origin: format!("directory {} ({} files)", dir.display(), loaded.files),
        loaded,
        texts: std::sync::Arc::new(texts),
    })
}

/// Whether an I/O error message is one of running short of resources
/// (EMFILE, ENFILE, ENOMEM, EAGAIN), which passes.
fn transient(message: &str) -> bool {
    [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EAGAIN]
        .iter()
        .any(|e| message.contains(&format!("(os error {e})")))
}

/// First and longest wait before a failed read is retried.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Longest a file being rewritten in place (modified, not closed yet)
/// delays a read: after that it is read as it is, with a warning.
pub const WRITE_WAIT: Duration = Duration::from_secs(10);

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

/// Follows the policy files being written in place: modified and not
/// closed yet (a rename or removal also ends a write).
fn track(writing: &mut BTreeMap<PathBuf, Instant>, event: &notify::Result<notify::Event>) {
    let Ok(e) = event else { return };
    let policy_files = e.paths.iter().filter(|p| {
        matches!(
            p.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml" | "json")
        )
    });
    match e.kind {
        EventKind::Modify(ModifyKind::Data(_)) => {
            for p in policy_files {
                writing.entry(p.clone()).or_insert_with(Instant::now);
            }
        }
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_) => {
            for p in policy_files {
                writing.remove(p);
            }
        }
        _ => {}
    }
}

/// Waits for a burst of changes to end (quiet for `DEBOUNCE`, at most
/// `MAX_DELAY`); false when the watcher ended.
fn settle(
    rx: &std_mpsc::Receiver<notify::Result<notify::Event>>,
    writing: &mut BTreeMap<PathBuf, Instant>,
) -> bool {
    let first = Instant::now();
    loop {
        let left = MAX_DELAY.saturating_sub(first.elapsed());
        if left.is_zero() {
            return true;
        }
        match rx.recv_timeout(DEBOUNCE.min(left)) {
            Ok(e) => track(writing, &e),
            Err(std_mpsc::RecvTimeoutError::Timeout) => return true,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return false,
        }
    }
}

/// Reads `dir` at once, after each burst of changes, and again with
/// backoff after a failed read (a change made while descriptors ran out
/// is applied once they are back). A file being rewritten in place is
/// waited for until closed (`WRITE_WAIT` at most), so a half-written file
/// never removes the policies not written yet. Returns true when the
/// directory was removed or replaced (its inotify watch is then gone),
/// false when the agent stopped listening or the watcher ended.
fn debounce_loop(
    dir: &Path,
    id: (u64, u64),
    rx: &std_mpsc::Receiver<notify::Result<notify::Event>>,
    out: &mpsc::Sender<Snapshot>,
) -> bool {
    let mut writing: BTreeMap<PathBuf, Instant> = BTreeMap::new();
    // A read is owed from this instant.
    let mut due = Some(Instant::now());
    let mut backoff = RETRY_MIN;
    loop {
        let wait = due.map_or(IDENTITY_CHECK, |d| {
            d.saturating_duration_since(Instant::now())
                .min(IDENTITY_CHECK)
        });
        match rx.recv_timeout(wait) {
            Ok(event) => {
                track(&mut writing, &event);
                if !relevant(&event) {
                    continue;
                }
                debug!("change in {}: {event:?}", dir.display());
                if !settle(rx, &mut writing) {
                    return false;
                }
                due = Some(Instant::now());
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                if out.is_closed() {
                    return false;
                }
                if identity(dir) != Some(id) {
                    return true;
                }
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return false,
        }
        match due {
            Some(at) if Instant::now() >= at => {}
            _ => continue,
        }
        if let Some((path, since)) = writing.iter().min_by_key(|(_, t)| **t) {
            if since.elapsed() < WRITE_WAIT {
                debug!(
                    "{} is being written: read once it is closed",
                    path.display()
                );
                due = Some(*since + WRITE_WAIT);
                continue;
            }
            warn!(
                "{} was modified {} s ago and is still not closed: read as it is",
                path.display(),
                WRITE_WAIT.as_secs()
            );
            writing.clear();
        }
        match snapshot(dir) {
            Ok(s) => {
                if out.blocking_send(s).is_err() {
                    return false;
                }
                due = None;
                backoff = RETRY_MIN;
            }
            // The policy in force stays; retried.
            Err(e) => {
                error!(
                    "{e:#}; the policy in force stays; reading {} again in {} ms",
                    dir.display(),
                    backoff.as_millis()
                );
                due = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}
