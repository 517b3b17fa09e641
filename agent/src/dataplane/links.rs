//! What the kernel says is in place for an interface: whether this
//! agent's programs are really attached to it (a BPF link of the program
//! on that ifindex) and whether its configuration is in the `IFACES` map.
//! `moat agent` checks its readiness against this, not against what it
//! believes it did.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

use aya::maps::MapError;
use moat_common::{map_names, program_names, IfaceConfig};

use super::{bpf_sys::bpf, map_err, Dataplane, DataplaneError};

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// One BPF link as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLink {
    pub link_type: u32,
    pub program_id: u32,
    /// For XDP and TCX links.
    pub ifindex: u32,
}

/// What is in place for one interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    /// An XDP link of this agent's ingress program on the interface.
    pub xdp_attached: bool,
    /// A TCX link of this agent's egress program on it; `None` where the
    /// kernel cannot tell (clsact attachments have no link, kernels < 6.6).
    pub tc_attached: Option<bool>,
    /// The interface's `IFACES` entry: its generation and whether it is
    /// enforced (a HostEndpoint governs it).
    pub config: Option<(u32, bool)>,
}

/// `union bpf_attr` for the id commands.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    start_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_link_info`: the common part and the first
/// words of the per-type union (8-byte aligned), where XDP and TCX links
/// keep their ifindex.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union: [u64; 4],
}

fn link_info(id: u32) -> io::Result<Option<KernelLink>> {
    let mut attr = IdAttr {
        start_id: id,
        ..Default::default()
    };
    // SAFETY: a valid attribute for the command; no pointers in it.
    let fd = match unsafe { bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) } {
        Ok(fd) => fd,
        // Gone between listing and opening.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: (&mut info as *mut LinkInfo) as u64,
    };
    // SAFETY: `info` is valid for `info_len` bytes during the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(Some(KernelLink {
        link_type: info.link_type,
        program_id: info.prog_id,
        ifindex: (info.union[0] & 0xffff_ffff) as u32,
    }))
}

/// Every BPF link of the kernel (all network namespaces). A link being
/// released while it is listed can make the kernel answer EAGAIN: the
/// listing is then tried again (a few times).
pub fn kernel_links() -> io::Result<Vec<KernelLink>> {
    let mut tries = 0;
    loop {
        match list_links() {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 5 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn list_links() -> io::Result<Vec<KernelLink>> {
    let mut out = Vec::new();
    let mut id = 0;
    loop {
        let mut attr = IdAttr {
            start_id: id,
            ..Default::default()
        };
        // SAFETY: a valid attribute for the command; no pointers in it.
        match unsafe { bpf(BPF_LINK_GET_NEXT_ID, &mut attr) } {
            Ok(_) => id = attr.next_id,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        if let Some(link) = link_info(id)? {
            out.push(link);
        }
    }
}

impl Dataplane {
    fn program_id(&self, name: &'static str) -> Result<u32, DataplaneError> {
        let program = self.ebpf.program(name).ok_or(DataplaneError::Missing {
            kind: "program",
            name,
        })?;
        program
            .info()
            .map(|i| i.id())
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// What the kernel has in place for each of `ifindexes`.
    pub fn kernel_view(&self, ifindexes: &[u32]) -> Result<Vec<KernelView>, DataplaneError> {
        let xdp = self.program_id(program_names::INGRESS)?;
        let tc = self.program_id(program_names::EGRESS)?;
        let links = kernel_links().map_err(|source| DataplaneError::Write {
            name: "BPF links",
            op: "listing",
            source,
        })?;
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        let on = |kind: u32, prog: u32, index: u32| {
            links
                .iter()
                .any(|l| l.link_type == kind && l.program_id == prog && l.ifindex == index)
        };
        ifindexes
            .iter()
            .map(|&index| {
                let config: Option<IfaceConfig> = match self.ifaces.get(&index, 0) {
                    Ok(c) => Some(c),
                    Err(MapError::KeyNotFound) => None,
                    Err(e) => return Err(map_err(map_names::IFACES)(e)),
                };
                Ok(KernelView {
                    xdp_attached: on(BPF_LINK_TYPE_XDP, xdp, index),
                    tc_attached: tcx.then(|| on(BPF_LINK_TYPE_TCX, tc, index)),
                    config: config
                        .map(|c| (c.generation, c.flags & moat_common::IFACE_ENFORCED != 0)),
                })
            })
            .collect()
    }
}
