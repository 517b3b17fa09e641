//! The files of a policy directory, as `load_dir` reads them.
//!
//! - A directory holding `..data` (the layout kubelet's atomic writer
//!   gives a ConfigMap or Secret volume: `..data -> ..2026_12_04_...`, each
//!   key `file -> ..data/file`) is read once, through `..data`: the
//!   consistent snapshot kubelet swaps in whole. Its other entries (the
//!   per-key symlinks, the timestamped directories) are not read again.
//! - Other entries whose name starts with `..` are kubelet's and skipped.
//! - Each real file is read once (by device and inode), however many
//!   symlinks or hard links reach it; the first path in sorted order names
//!   it.
//! - A directory reached again (a symlink loop such as `a -> .`, or a
//!   second path to one already read) is reported and not entered again;
//!   nesting deeper than `MAX_DEPTH` is reported and not entered.

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Directories nested deeper than this below the policy directory are not
/// read.
pub const MAX_DEPTH: usize = 16;

/// kubelet's atomic-writer snapshot link.
pub const KUBELET_DATA: &str = "..data";

/// What `walk` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    /// Policy files to read: the path to show and the path to open.
    pub files: Vec<(PathBuf, PathBuf)>,
    /// Paths not read, each with why (loops, second paths, depth).
    pub skipped: Vec<String>,
}

fn is_policy_file(name: &Path) -> bool {
    matches!(
        name.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

struct Walk {
    dirs: BTreeSet<(u64, u64)>,
    files: BTreeSet<(u64, u64)>,
    out: Tree,
}

/// The policy files under `dir` (see the module doc). Fails only when
/// `dir` itself cannot be read.
pub fn walk(dir: &Path) -> std::io::Result<Tree> {
    let meta = std::fs::metadata(dir)?;
    let mut w = Walk {
        dirs: BTreeSet::from([(meta.dev(), meta.ino())]),
        files: BTreeSet::new(),
        out: Tree::default(),
    };
    w.dir(dir, dir, 0)?;
    Ok(w.out)
}

impl Walk {
    /// Reads directory `open` (shown as `shown`).
    fn dir(&mut self, shown: &Path, open: &Path, depth: usize) -> std::io::Result<()> {
        let data = open.join(KUBELET_DATA);
        if std::fs::metadata(&data).is_ok_and(|m| m.is_dir()) {
            // Read through the snapshot, shown under the volume's names.
            return self.entries(shown, &data, depth);
        }
        self.entries(shown, open, depth)
    }

    fn entries(&mut self, shown: &Path, open: &Path, depth: usize) -> std::io::Result<()> {
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(open)?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for name in names {
            if name.to_string_lossy().starts_with("..") {
                continue;
            }
            let (shown, open) = (shown.join(&name), open.join(&name));
            let Ok(meta) = std::fs::metadata(&open) else {
                // A dangling symlink, or gone since the listing: reading it
                // reports why (when it is a policy file).
                if is_policy_file(&shown) {
                    self.out.files.push((shown, open));
                }
                continue;
            };
            let id = (meta.dev(), meta.ino());
            if meta.is_dir() {
                if !self.dirs.insert(id) {
                    let link = std::fs::read_link(&open)
                        .map(|t| format!(" -> {}", t.display()))
                        .unwrap_or_default();
                    self.out.skipped.push(format!(
                        "{}{link}: a symlink loop or a second path to a directory already read: not read again",
                        shown.display()
                    ));
                } else if depth + 1 > MAX_DEPTH {
                    self.out.skipped.push(format!(
                        "{}: nested more than {MAX_DEPTH} directories deep: not read",
                        shown.display()
                    ));
                } else if let Err(e) = self.dir(&shown, &open, depth + 1) {
                    self.out.skipped.push(format!(
                        "{}: cannot read the directory: {e}",
                        shown.display()
                    ));
                }
            } else if is_policy_file(&shown) && self.files.insert(id) {
                self.out.files.push((shown, open));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn names(t: &Tree, root: &Path) -> Vec<String> {
        t.files
            .iter()
            .map(|(s, _)| {
                s.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn configmap_layout_links_and_loops() {
        let root = std::env::temp_dir().join(format!("moat-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // A ConfigMap volume.
        let cm = root.join("cm");
        std::fs::create_dir_all(cm.join("..2026_12_04_18_00_00.1/sub")).expect("dirs");
        std::fs::write(cm.join("..2026_12_04_18_00_00.1/a.yaml"), "a").expect("write");
        std::fs::write(cm.join("..2026_12_04_18_00_00.1/sub/b.yaml"), "b").expect("write");
        symlink("..2026_12_04_18_00_00.1", cm.join("..data")).expect("link");
        symlink("..data/a.yaml", cm.join("a.yaml")).expect("link");
        symlink("..data/sub", cm.join("sub")).expect("link");
        let t = walk(&cm).expect("walks");
        assert_eq!(names(&t, &cm), ["a.yaml", "sub/b.yaml"]);
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        // The file opened is the snapshot's.
        assert!(t.files[0].1.to_string_lossy().contains("..data"));

        // Loops and second paths: each real file once, loops reported.
        let d = root.join("plain");
        std::fs::create_dir_all(d.join("x")).expect("dirs");
        std::fs::write(d.join("x/p.yaml"), "p").expect("write");
        symlink("x/p.yaml", d.join("q.yaml")).expect("link");
        std::fs::hard_link(d.join("x/p.yaml"), d.join("r.yaml")).expect("hard link");
        symlink(".", d.join("a")).expect("loop");
        symlink(".", d.join("b")).expect("loop");
        symlink("x", d.join("y")).expect("second path");
        symlink("missing.yaml", d.join("dangling.yaml")).expect("dangling");
        let t = walk(&d).expect("walks");
        assert_eq!(names(&t, &d), ["dangling.yaml", "q.yaml"]);
        assert_eq!(t.skipped.len(), 3, "{:?}", t.skipped);
        assert!(t.skipped[0].contains("a -> .") && t.skipped[0].contains("loop"));
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
