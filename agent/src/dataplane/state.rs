//! The saved state: the last good compiled policy on the node's disk, so
//! after a reboot (which empties bpffs) or a restart the agent enforces it
//! from its first moment, before its source has answered, and replaces it
//! once the first complete sync is done.
//!
//! It is the compiled form (the rule entries the kernel reads), so it is
//! only valid for the eBPF object it was compiled for: the file carries a
//! fingerprint of that object, and a file from another build is ignored
//! (the agent then enforces from its first complete sync).

use std::{collections::BTreeMap, io::Write as _, path::Path};

use anyhow::Context as _;
use moat_common::{direction, table, RuleEntry};
use serde::{Deserialize, Serialize};

use crate::compile::{Compiled, CompiledIface, TableSpec};

/// Where the saved state lives by default.
pub const DEFAULT_PATH: &str = "/var/lib/moat/last-good.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub format: u32,
    /// Of the eBPF object and rule layout the rules were compiled for.
    pub fingerprint: String,
    pub node: String,
    pub generation: u32,
    /// Seconds since the Unix epoch.
    pub saved_at: u64,
    /// The source snapshot it was compiled from.
    pub origin: String,
    pub policy_names: Vec<String>,
    pub ifaces: Vec<SavedIface>,
    /// Labels of each enforced interface's HostEndpoint.
    #[serde(default)]
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    /// The last good source text of every file (or datastore key) that
    /// was invalid when this was saved: a restarted agent keeps those
    /// objects at their last good version, as the one before it did.
    #[serde(default)]
    pub last_good_texts: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedIface {
    pub name: String,
    pub host_endpoint: String,
    pub tables: Vec<SavedTable>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedTable {
    pub end_verdict: u8,
    pub end_reason: u8,
    pub pass_verdict: u8,
    /// The rule entries as the kernel reads them, hex.
    pub rules: String,
}

/// Identifies the eBPF object and the rule layout this binary compiles
/// for (FNV-1a, stable across builds of the same object).
pub fn fingerprint() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let size = std::mem::size_of::<RuleEntry>() as u64;
    for b in crate::dataplane::EBPF_OBJECT
        .iter()
        .chain(size.to_le_bytes().iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}-{size}")
}

fn rule_bytes(rule: &RuleEntry) -> &[u8] {
    // SAFETY: RuleEntry is repr(C), Copy, with explicit padding fields
    // (no implicit padding: the size is asserted in moat-common), so all
    // of its bytes are initialised; the slice borrows `rule`.
    unsafe {
        std::slice::from_raw_parts(
            (rule as *const RuleEntry).cast::<u8>(),
            std::mem::size_of::<RuleEntry>(),
        )
    }
}

fn rule_from(bytes: &[u8]) -> RuleEntry {
    assert_eq!(bytes.len(), std::mem::size_of::<RuleEntry>());
    // SAFETY: the length is checked; every bit pattern is a valid
    // RuleEntry (integers and byte arrays only).
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RuleEntry>()) }
}

fn hex(bytes: impl Iterator<Item = u8>) -> String {
    bytes.map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16).map_err(|e| format!("not hex at {i}: {e}"))
        })
        .collect()
}

impl SavedState {
    pub fn new(
        compiled: &Compiled,
        labels: BTreeMap<String, BTreeMap<String, String>>,
        node: &str,
        generation: u32,
        origin: &str,
    ) -> Self {
        SavedState {
            format: FORMAT,
            fingerprint: fingerprint(),
            node: node.to_string(),
            generation,
            saved_at: now(),
            origin: origin.to_string(),
            policy_names: compiled.policy_names.clone(),
            ifaces: compiled
                .ifaces
                .values()
                .map(|i| SavedIface {
                    name: i.name.clone(),
                    host_endpoint: i.host_endpoint.clone(),
                    tables: i
                        .tables
                        .iter()
                        .map(|t| SavedTable {
                            end_verdict: t.end_verdict,
                            end_reason: t.end_reason,
                            pass_verdict: t.pass_verdict,
                            rules: hex(t.rules.iter().flat_map(|r| rule_bytes(r).to_vec())),
                        })
                        .collect(),
                })
                .collect(),
            labels,
            last_good_texts: BTreeMap::new(),
        }
    }

    /// The compiled policy it holds.
    pub fn compiled(&self) -> Result<Compiled, String> {
        let mut ifaces = BTreeMap::new();
        for i in &self.ifaces {
            let mut tables = Vec::new();
            for (n, t) in i.tables.iter().enumerate() {
                let bytes = unhex(&t.rules).map_err(|e| format!("{}: table {n}: {e}", i.name))?;
                let size = std::mem::size_of::<RuleEntry>();
                if !bytes.len().is_multiple_of(size) {
                    return Err(format!(
                        "{}: table {n}: {} bytes is not a whole number of rules",
                        i.name,
                        bytes.len()
                    ));
                }
                tables.push(TableSpec {
                    rules: bytes.chunks(size).map(rule_from).collect(),
                    end_verdict: t.end_verdict,
                    end_reason: t.end_reason,
                    pass_verdict: t.pass_verdict,
                });
            }
            let count = tables.len();
            let tables: [TableSpec; direction::COUNT * table::KINDS] =
                tables.try_into().map_err(|_| {
                    format!(
                        "{}: {count} tables, expected {}",
                        i.name,
                        direction::COUNT * table::KINDS
                    )
                })?;
            ifaces.insert(
                i.name.clone(),
                CompiledIface {
                    name: i.name.clone(),
                    host_endpoint: i.host_endpoint.clone(),
                    tables,
                },
            );
        }
        Ok(Compiled {
            ifaces,
            policy_names: self.policy_names.clone(),
            unenforced: Vec::new(),
            pod_policies: Vec::new(),
        })
    }
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Refuses a directory every user may write to (mode `o+w`): another user
/// could swap or pre-create the files there.
pub fn check_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::metadata(dir) {
        Ok(m) if m.permissions().mode() & 0o002 != 0 => anyhow::bail!(
            "{} is writable by every user (mode {:o}): moat keeps no state or status there; choose a directory only root can write, such as /var/lib/moat or /run/moat",
            dir.display(),
            m.permissions().mode() & 0o7777
        ),
        _ => Ok(()),
    }
}

/// Writes `contents` to `path` atomically with `mode`: a temporary file
/// created exclusively beside it (never through a symlink), flushed to
/// disk, renamed over it. The directory is created when missing (mode
/// 0755) and refused when every user may write to it.
pub fn write_atomically_mode(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    check_private_dir(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    // The mode asked for, whatever the umask.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", tmp.path().display()))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming the temporary file to {}", path.display()))?;
    Ok(())
}

/// `write_atomically_mode` with mode 0600.
pub fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    write_atomically_mode(path, contents, 0o600)
}

pub fn save(path: &Path, state: &SavedState) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(state)?;
    write_atomically(path, &json)
}

/// Why a saved state is not used.
#[derive(Debug, PartialEq, Eq)]
pub enum Unusable {
    Missing,
    Invalid(String),
}

/// The saved state at `path`, if there is one usable for `node` by this
/// build.
pub fn load(path: &Path, node: &str) -> Result<SavedState, Unusable> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Unusable::Missing),
        Err(e) => return Err(Unusable::Invalid(format!("cannot read it: {e}"))),
    };
    let state: SavedState = serde_json::from_slice(&text)
        .map_err(|e| Unusable::Invalid(format!("not a saved state: {e}")))?;
    if state.format != FORMAT {
        return Err(Unusable::Invalid(format!(
            "format {} (this agent writes {FORMAT})",
            state.format
        )));
    }
    if state.fingerprint != fingerprint() {
        return Err(Unusable::Invalid(format!(
            "compiled for another eBPF object ({}; this agent's is {})",
            state.fingerprint,
            fingerprint()
        )));
    }
    if state.node != node {
        return Err(Unusable::Invalid(format!(
            "saved for node {} (this is {node})",
            state.node
        )));
    }
    state.compiled().map_err(Unusable::Invalid)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled() -> Compiled {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/public");
        let loaded = crate::policy::load_dir(&dir).expect("fixture");
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        crate::compile::compile(&loaded.set, "worker-1", &["eth1".into()]).expect("compiles")
    }

    #[test]
    fn round_trips_through_the_file() {
        let c = compiled();
        assert!(!c.ifaces["eth1"]
            .table(direction::INGRESS, table::POLICY)
            .rules
            .is_empty());
        let dir = std::env::temp_dir().join(format!("moat-state-{}", std::process::id()));
        let path = dir.join("sub/last-good.json");
        let labels = BTreeMap::from([(
            "eth1".to_string(),
            BTreeMap::from([("ibm.role".to_string(), "worker_public".to_string())]),
        )]);
        save(
            &path,
            &SavedState::new(&c, labels.clone(), "worker-1", 7, "test"),
        )
        .expect("saves");
        let back = load(&path, "worker-1").expect("loads");
        assert_eq!(back.generation, 7);
        assert_eq!(back.labels, labels);
        let again = back.compiled().expect("decodes");
        assert_eq!(again.ifaces, c.ifaces);
        assert_eq!(again.policy_names, c.policy_names);
        // Another node's state, another build's, a damaged file: unusable.
        assert!(
            matches!(load(&path, "worker-2"), Err(Unusable::Invalid(m)) if m.contains("worker-2"))
        );
        let mut other = back.clone();
        other.fingerprint = "0000000000000000-88".into();
        save(&path, &other).expect("saves");
        assert!(
            matches!(load(&path, "worker-1"), Err(Unusable::Invalid(m)) if m.contains("another eBPF object"))
        );
        std::fs::write(&path, "{\"format\": 1").expect("writes");
        assert!(matches!(load(&path, "worker-1"), Err(Unusable::Invalid(_))));
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(load(&path, "worker-1"), Err(Unusable::Missing));
    }
}
