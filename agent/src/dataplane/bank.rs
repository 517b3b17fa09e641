//! What each of the two rule banks holds, and writing a bank as the
//! difference from what it held, in batches.
//!
//! The bank not in force is read by no program until the `IFACES` switch,
//! so its elements may be written in any order and values overwritten in
//! place; only what differs from the bank's known contents is written.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::BorrowedFd,
};

use moat_common::{classify, AddrClassKey, PortClassKey, RuleEntry, RuleStats};

use crate::{
    compile::classify::ClassifierImage,
    dataplane::{
        bpf_sys::{self, BatchError},
        DataplaneError,
    },
};

/// An `LpmTrie<AddrClassKey, _>` key as the kernel takes it: prefix length
/// (host order), then the data.
pub type AddrKey = [u8; 24];
/// An `LpmTrie<PortClassKey, _>` key as the kernel takes it.
pub type PortKey = [u8; 12];

/// The `LpmTrie` key of `data` with `prefix_len` bits.
pub fn lpm_key<const N: usize, const D: usize>(prefix_len: u32, data: &[u8; D]) -> [u8; N] {
    let mut key = [0u8; N];
    key[..4].copy_from_slice(&prefix_len.to_ne_bytes());
    key[4..].copy_from_slice(data);
    key
}

/// The classifier id a class map key belongs to (its first data bytes).
pub fn lpm_key_id(key: &[u8]) -> u32 {
    u32::from_be_bytes([key[4], key[5], key[6], key[7]])
}

/// Everything of one bank the programs read, as written: `RULES` and
/// `CLASS_WORDS` from the bank's first slot, and the class map entries
/// under the bank's classifier ids (value: offset of a class vector).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BankContent {
    pub rules: Vec<RuleEntry>,
    pub words: Vec<u64>,
    pub src: BTreeMap<AddrKey, u32>,
    pub dst: BTreeMap<AddrKey, u32>,
    pub sport: BTreeMap<PortKey, u32>,
    pub dport: BTreeMap<PortKey, u32>,
    pub proto: BTreeMap<u32, u32>,
}

impl BankContent {
    /// Adds the class map entries of classifier `id` (`offsets`: where
    /// each class's vector starts in `CLASS_WORDS`).
    pub fn add_class_entries(&mut self, id: u32, image: &ClassifierImage, offsets: &[u32]) {
        for (field, entries) in [(classify::SRC, &image.src), (classify::DST, &image.dst)] {
            if image.lookup & (1 << field) == 0 {
                continue;
            }
            let map = if field == classify::SRC {
                &mut self.src
            } else {
                &mut self.dst
            };
            for &(net, len, class) in entries {
                let mut data: AddrClassKey = [0; 20];
                data[..4].copy_from_slice(&id.to_be_bytes());
                data[4..].copy_from_slice(&net.to_be_bytes());
                let key = lpm_key(classify::ADDR_ROOT_BITS + u32::from(len), &data);
                map.insert(key, offsets[class as usize]);
            }
        }
        for (field, entries) in [
            (classify::SPORT, &image.sport),
            (classify::DPORT, &image.dport),
        ] {
            if image.lookup & (1 << field) == 0 {
                continue;
            }
            let map = if field == classify::SPORT {
                &mut self.sport
            } else {
                &mut self.dport
            };
            // Root first: a port no range names is in the `any` class.
            let root = std::iter::once((0u16, 0u8, image.any[field]));
            for (port, len, class) in root.chain(entries.iter().copied()) {
                let mut data: PortClassKey = [0; 8];
                data[..4].copy_from_slice(&id.to_be_bytes());
                data[4..6].copy_from_slice(&port.to_be_bytes());
                let key = lpm_key(classify::PORT_ROOT_BITS + u32::from(len), &data);
                map.insert(key, offsets[class as usize]);
            }
        }
        if image.lookup & (1 << classify::PROTO) != 0 {
            for &(protocol, class) in &image.proto {
                self.proto
                    .insert(classify::proto_key(id, protocol), offsets[class as usize]);
            }
        }
    }
}

/// Class map entries a bank may hold: `Some(value)` as written, `None`
/// when the key may be there with a value not known (an adopted bank, a
/// write that failed half way).
type Entries<K> = BTreeMap<K, Option<u32>>;

/// What this agent knows a bank holds. `rules` and `words` are a known
/// prefix of the bank's slots: slots past them are written whatever they
/// hold.
#[derive(Debug, Default)]
pub struct BankRecord {
    rules: Vec<RuleEntry>,
    words: Vec<u64>,
    src: Entries<AddrKey>,
    dst: Entries<AddrKey>,
    sport: Entries<PortKey>,
    dport: Entries<PortKey>,
    proto: Entries<u32>,
}

impl BankRecord {
    /// Class vector words known written.
    pub fn words(&self) -> usize {
        self.words.len()
    }

    /// A bank whose arrays are unknown and whose class maps hold these keys
    /// with unknown values (found by walking the maps).
    pub fn unknown(
        src: impl IntoIterator<Item = AddrKey>,
        dst: impl IntoIterator<Item = AddrKey>,
        sport: impl IntoIterator<Item = PortKey>,
        dport: impl IntoIterator<Item = PortKey>,
        proto: impl IntoIterator<Item = u32>,
    ) -> Self {
        BankRecord {
            rules: Vec::new(),
            words: Vec::new(),
            src: src.into_iter().map(|k| (k, None)).collect(),
            dst: dst.into_iter().map(|k| (k, None)).collect(),
            sport: sport.into_iter().map(|k| (k, None)).collect(),
            dport: dport.into_iter().map(|k| (k, None)).collect(),
            proto: proto.into_iter().map(|k| (k, None)).collect(),
        }
    }
}

/// File descriptors of the maps a bank lives in.
pub struct BankMaps<'a> {
    pub rules: BorrowedFd<'a>,
    pub rule_stats: BorrowedFd<'a>,
    pub words: BorrowedFd<'a>,
    pub src: BorrowedFd<'a>,
    pub dst: BorrowedFd<'a>,
    pub sport: BorrowedFd<'a>,
    pub dport: BorrowedFd<'a>,
    pub proto: BorrowedFd<'a>,
}

/// Elements one bank write changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// `RULES` and `CLASS_WORDS` elements and class map entries written.
    pub updated: usize,
    /// Class map entries deleted.
    pub deleted: usize,
    /// `RULE_STATS` slots zeroed.
    pub zeroed: usize,
    /// Of all these, how many took a syscall each (the kernel refused
    /// batches for their map).
    pub per_element: usize,
}

/// Writes maps in batches, per element where the kernel refuses batches
/// (said once per map and operation in the log).
#[derive(Debug, Default)]
pub struct Writer {
    refused: BTreeSet<(&'static str, &'static str)>,
    /// Refuse every batch without asking the kernel (tests of the
    /// per-element path).
    no_batches: bool,
    per_element: usize,
}

fn write_err(name: &'static str, op: &'static str) -> impl Fn(io::Error) -> DataplaneError {
    move |source| DataplaneError::Write { name, op, source }
}

impl Writer {
    /// From now on writes one element per syscall, as where the kernel
    /// refuses batches (tests of that path).
    pub fn refuse_batches(&mut self) {
        self.no_batches = true;
    }

    /// `keys[i] -> values[i]`; per-CPU maps: `values` holds one run of
    /// values per key (`bpf_sys::update_batch`).
    fn update<K: aya::Pod, V: aya::Pod>(
        &mut self,
        map: BorrowedFd<'_>,
        name: &'static str,
        keys: &[K],
        values: &[V],
    ) -> Result<(), DataplaneError> {
        if keys.is_empty() {
            return Ok(());
        }
        if !self.no_batches && !self.refused.contains(&(name, "update")) {
            match bpf_sys::update_batch(map, keys, values) {
                Ok(()) => return Ok(()),
                Err(BatchError::Failed { error, .. }) => {
                    return Err(write_err(name, "batch update")(error))
                }
                Err(BatchError::Refused(e)) => {
                    tracing::warn!(
                        "map {name}: the kernel refuses BPF_MAP_UPDATE_BATCH ({e}); writing it one element per syscall from now on"
                    );
                    self.refused.insert((name, "update"));
                }
            }
        }
        self.per_element += keys.len();
        let per_key = values.len() / keys.len();
        for (key, value) in keys.iter().zip(values.chunks(per_key)) {
            bpf_sys::update_elem(map, key, value).map_err(write_err(name, "update"))?;
        }
        Ok(())
    }

    /// Deletes `keys`; a key already absent is fine (the goal is its
    /// absence).
    fn delete<K: aya::Pod>(
        &mut self,
        map: BorrowedFd<'_>,
        name: &'static str,
        keys: &[K],
    ) -> Result<(), DataplaneError> {
        let mut start = 0;
        if !self.no_batches && !self.refused.contains(&(name, "delete")) {
            while start < keys.len() {
                match bpf_sys::delete_batch(map, &keys[start..]) {
                    Ok(()) => return Ok(()),
                    Err(BatchError::Failed { done, error })
                        if error.raw_os_error() == Some(libc::ENOENT) =>
                    {
                        start += done + 1;
                    }
                    Err(BatchError::Failed { error, .. }) => {
                        return Err(write_err(name, "batch delete")(error))
                    }
                    Err(BatchError::Refused(e)) => {
                        tracing::warn!(
                            "map {name}: the kernel refuses BPF_MAP_DELETE_BATCH ({e}); deleting one element per syscall from now on"
                        );
                        self.refused.insert((name, "delete"));
                        break;
                    }
                }
            }
        }
        self.per_element += keys.len() - start.min(keys.len());
        for key in keys.iter().skip(start) {
            match bpf_sys::delete_elem(map, key) {
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                    return Err(write_err(name, "delete")(e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Makes the bank of `maps` starting at `rule_base` / `word_base` hold
    /// `new`, writing only what differs from `record`, and zeroes the
    /// `RULE_STATS` of every rule slot in use. `record` then says what the
    /// bank holds, also after an error (conservatively: what may differ is
    /// marked unknown, so the next write covers it).
    pub fn write_bank(
        &mut self,
        maps: &BankMaps<'_>,
        rule_base: u32,
        word_base: u32,
        cpus: usize,
        record: &mut BankRecord,
        new: BankContent,
    ) -> Result<Written, DataplaneError> {
        use moat_common::map_names as n;
        let mut out = Written::default();
        self.per_element = 0;
        // Deletions first: the class maps' capacity covers both banks, not
        // a bank's old and new entries at once.
        out.deleted += self.delete_stale(maps.src, n::CLASS_SRC, &mut record.src, &new.src)?;
        out.deleted += self.delete_stale(maps.dst, n::CLASS_DST, &mut record.dst, &new.dst)?;
        out.deleted +=
            self.delete_stale(maps.sport, n::CLASS_SPORT, &mut record.sport, &new.sport)?;
        out.deleted +=
            self.delete_stale(maps.dport, n::CLASS_DPORT, &mut record.dport, &new.dport)?;
        out.deleted +=
            self.delete_stale(maps.proto, n::CLASS_PROTO, &mut record.proto, &new.proto)?;
        let rules = new.rules.len();
        out.updated += self.sync_array(
            maps.rules,
            n::RULES,
            rule_base,
            &mut record.rules,
            new.rules,
        )?;
        out.updated += self.sync_array(
            maps.words,
            n::CLASS_WORDS,
            word_base,
            &mut record.words,
            new.words,
        )?;
        // Counters mean "since the generation in force was applied": every
        // slot in use starts at zero, whatever the bank counted before.
        let slots: Vec<u32> = (rule_base..rule_base + rules as u32).collect();
        let zeros = vec![RuleStats::default(); slots.len() * cpus];
        self.update(maps.rule_stats, n::RULE_STATS, &slots, &zeros)?;
        out.zeroed = slots.len();
        out.updated += self.sync_class(maps.src, n::CLASS_SRC, &mut record.src, new.src)?;
        out.updated += self.sync_class(maps.dst, n::CLASS_DST, &mut record.dst, new.dst)?;
        out.updated += self.sync_class(maps.sport, n::CLASS_SPORT, &mut record.sport, new.sport)?;
        out.updated += self.sync_class(maps.dport, n::CLASS_DPORT, &mut record.dport, new.dport)?;
        out.updated += self.sync_class(maps.proto, n::CLASS_PROTO, &mut record.proto, new.proto)?;
        out.per_element = self.per_element;
        Ok(out)
    }

    /// Writes the elements of `new` that differ from `old` at `base + i`.
    fn sync_array<V: aya::Pod + PartialEq>(
        &mut self,
        map: BorrowedFd<'_>,
        name: &'static str,
        base: u32,
        old: &mut Vec<V>,
        new: Vec<V>,
    ) -> Result<usize, DataplaneError> {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (i, v) in new.iter().enumerate() {
            if old.get(i) != Some(v) {
                keys.push(base + i as u32);
                values.push(*v);
            }
        }
        match self.update(map, name, &keys, &values) {
            Ok(()) => {
                *old = new;
                Ok(keys.len())
            }
            Err(e) => {
                // Some of the differing slots may be written: none known.
                old.truncate(keys.first().map_or(0, |k| (k - base) as usize));
                Err(e)
            }
        }
    }

    /// Deletes the keys of `old` absent from `new`, and forgets them.
    fn delete_stale<K: aya::Pod + Ord, V>(
        &mut self,
        map: BorrowedFd<'_>,
        name: &'static str,
        old: &mut Entries<K>,
        new: &BTreeMap<K, V>,
    ) -> Result<usize, DataplaneError> {
        let stale: Vec<K> = old
            .keys()
            .filter(|k| !new.contains_key(k))
            .copied()
            .collect();
        if let Err(e) = self.delete(map, name, &stale) {
            // Some may be gone, some not: recorded as maybe present with an
            // unknown value, so the next write deletes or rewrites them.
            for k in &stale {
                old.insert(*k, None);
            }
            return Err(e);
        }
        for k in &stale {
            old.remove(k);
        }
        Ok(stale.len())
    }

    /// Writes the entries of `new` whose value `old` does not know to be
    /// theirs; `old` holds no key absent from `new` (`delete_stale`).
    fn sync_class<K: aya::Pod + Ord>(
        &mut self,
        map: BorrowedFd<'_>,
        name: &'static str,
        old: &mut Entries<K>,
        new: BTreeMap<K, u32>,
    ) -> Result<usize, DataplaneError> {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (k, v) in &new {
            if old.get(k) != Some(&Some(*v)) {
                keys.push(*k);
                values.push(*v);
            }
        }
        let result = self.update(map, name, &keys, &values);
        match &result {
            Ok(()) => *old = new.into_iter().map(|(k, v)| (k, Some(v))).collect(),
            Err(_) => {
                // Any of them may be in the map now, with either value.
                for k in keys {
                    old.insert(k, None);
                }
            }
        }
        result.map(|()| values.len())
    }
}
