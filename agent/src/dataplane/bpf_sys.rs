//! The raw bpf(2) system call, for what aya 0.14 does not expose: batch
//! map updates and deletes (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`)
//! and the program commands the benchmark needs (`bench::sys`).

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

pub(crate) const BPF_MAP_CREATE: libc::c_long = 0;
pub(crate) const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
pub(crate) const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
pub(crate) const BPF_PROG_LOAD: libc::c_long = 5;
pub(crate) const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub(crate) const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
pub(crate) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub(crate) const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's internal "operation not supported" (`ENOTSUPP`), which
/// bpf(2) returns for a batch command the map type lacks.
const ENOTSUPP: i32 = 524;

/// bpf(2): `cmd` with `attr` as the start of `union bpf_attr`. Returns the
/// syscall's non-negative result.
///
/// # Safety
/// `attr` must be a valid attribute for `cmd` (the kernel zero-extends a
/// shorter one), and every pointer in it must be valid for the call.
pub(crate) unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: the caller's contract.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `union bpf_attr` for the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for the batch commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch command stopped.
#[derive(Debug)]
pub(crate) enum BatchError {
    /// The kernel refuses the command for this map (EINVAL from a kernel
    /// without batch ops, ENOTSUPP/EOPNOTSUPP from a map type without
    /// them): nothing was written.
    Refused(io::Error),
    /// Element `done` (the ones before it were processed) failed.
    Failed { done: usize, error: io::Error },
}

fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// Writes `keys[i] -> values[i]` (`BPF_ANY`) in one `BPF_MAP_UPDATE_BATCH`.
/// For a per-CPU map, `values` holds `keys.len()` runs of one value per
/// possible CPU, each padded to 8 bytes (so `V` must be a multiple of 8
/// bytes there).
pub(crate) fn update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    assert!(
        !keys.is_empty() && values.len().is_multiple_of(keys.len()),
        "update_batch: {} values for {} keys",
        values.len(),
        keys.len()
    );
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).expect("fewer than 2^32 elements"),
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: a valid `bpf_attr` for BPF_MAP_UPDATE_BATCH: `count` keys
    // and values of the map's sizes (the caller's types) are readable.
    let count = attr.count;
    match unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) } {
        Ok(_) => Ok(()),
        Err(e) => batch_error(e, count, attr.count),
    }
}

/// Deletes `keys` in one `BPF_MAP_DELETE_BATCH` (stops at the first key
/// absent, `Failed` with ENOENT).
pub(crate) fn delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    assert!(!keys.is_empty(), "delete_batch of no keys");
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: u32::try_from(keys.len()).expect("fewer than 2^32 elements"),
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: a valid `bpf_attr` for BPF_MAP_DELETE_BATCH: `count` keys of
    // the map's key size are readable.
    let count = attr.count;
    match unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) } {
        Ok(_) => Ok(()),
        Err(e) => batch_error(e, count, attr.count),
    }
}

/// The kernel writes back in `count` how many elements it processed
/// before an element failed; it leaves `count` as given when it refuses the
/// command itself (a kernel or map type without batch ops). An error of
/// the "not supported" kind before any element was processed is a refusal
/// (per-element writes then report a bad element by itself).
fn batch_error(error: io::Error, given: u32, done: u32) -> Result<(), BatchError> {
    if (done == 0 || done == given) && refused(&error) {
        Err(BatchError::Refused(error))
    } else {
        Err(BatchError::Failed {
            done: done.min(given) as usize,
            error,
        })
    }
}

/// `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`) of one element.
pub(crate) fn update_elem<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &[V],
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: value.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: a valid `bpf_attr` for BPF_MAP_UPDATE_ELEM; key and value
    // (the map's sizes: the caller's types) outlive the call.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// `BPF_MAP_DELETE_ELEM` of one key.
pub(crate) fn delete_elem<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        ..Default::default()
    };
    // SAFETY: a valid `bpf_attr` for BPF_MAP_DELETE_ELEM; the key outlives
    // the call.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) }.map(drop)
}
