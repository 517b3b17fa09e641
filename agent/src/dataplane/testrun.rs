//! The kernel interfaces the benchmark needs beyond the dataplane's: three
//! baseline XDP programs written as raw instructions (loaded with
//! `BPF_PROG_LOAD`), `BPF_PROG_TEST_RUN` on them (also in live-frames
//! mode, the packet generator), and entering a network namespace.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};

use crate::dataplane::{
    bpf_sys::{bpf, BPF_MAP_CREATE, BPF_PROG_GET_FD_BY_ID, BPF_PROG_LOAD, BPF_PROG_TEST_RUN},
    DataplaneError,
};

const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// `enum bpf_attach_type` BPF_XDP.
const BPF_XDP: u32 = 37;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// Frames the kernel injects per batch in live-frames mode.
const LIVE_BATCH: u32 = 64;
pub const XDP_PASS: u32 = 2;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

const LDXW: u8 = 0x61;
const STW_IMM: u8 = 0x62;
const STXW: u8 = 0x63;
const STXH: u8 = 0x6b;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
/// `src` of an `LD_IMM64` whose immediate is a map's descriptor.
const PSEUDO_MAP_FD: u8 = 1;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const LDXH: u8 = 0x69;
const LDXB: u8 = 0x71;
const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const AND64_IMM: u8 = 0x57;
const JGT_REG: u8 = 0x2d;
const JNE_IMM: u8 = 0x55;
const EXIT: u8 = 0x95;

/// `return XDP_PASS;`
const PASS: &[Insn] = &[
    insn(MOV64_IMM, 0, 0, 0, XDP_PASS as i32),
    insn(EXIT, 0, 0, 0, 0),
];

/// Parses Ethernet, IPv4 (20-byte header) and the TCP/UDP ports, as a
/// filter must before judging, then returns `XDP_PASS` whatever it found.
const PARSE_PASS: &[Insn] = &[
    insn(LDXW, 2, 1, 0, 0),                    // 0: r2 = ctx->data
    insn(LDXW, 3, 1, 4, 0),                    // 1: r3 = ctx->data_end
    insn(MOV64_IMM, 0, 0, 0, XDP_PASS as i32), // 2: r0 = XDP_PASS
    insn(MOV64_REG, 4, 2, 0, 0),               // 3: r4 = data
    insn(ADD64_IMM, 4, 0, 0, 38),              // 4: r4 += eth + ip + ports
    insn(JGT_REG, 4, 3, 8, 0),                 // 5: too short: exit
    insn(LDXH, 5, 2, 12, 0),                   // 6: ethertype
    insn(JNE_IMM, 5, 0, 6, 0x0008),            // 7: not IPv4 (0x0800 BE): exit
    insn(LDXB, 5, 2, 14, 0),                   // 8: version, IHL
    insn(AND64_IMM, 5, 0, 0, 0x0f),            // 9: IHL
    insn(JNE_IMM, 5, 0, 3, 5),                 // 10: options: exit
    insn(LDXB, 5, 2, 23, 0),                   // 11: protocol
    insn(LDXH, 6, 2, 34, 0),                   // 12: source port
    insn(LDXH, 7, 2, 36, 0),                   // 13: destination port
    insn(EXIT, 0, 0, 0, 0),                    // 14
];

/// Bytes of the flow key `PARSE_FLOW_LOOKUP` builds: the size of moat's
/// `FlowKey` (addresses as IPv6, v4-mapped; ports; protocol; padding).
const FLOW_KEY_BYTES: u32 = 40;
const _: () = assert!(FLOW_KEY_BYTES as usize == size_of::<moat_common::FlowKey>());

/// `PARSE_PASS`, then the one lookup every stateful filter makes for every
/// packet: the packet's flow key in a connection table (an LRU hash map of
/// `FLOW_KEY_BYTES` keys, `map_fd`), then `XDP_PASS` whatever it found.
/// The floor under any design that tracks connections.
fn parse_flow_lookup(map_fd: i32) -> Vec<Insn> {
    const OUT: i16 = 31;
    let to_out = |at: i16| OUT - (at + 1);
    // A v4-mapped IPv6 address's third word, 00 00 ff ff in memory.
    let mapped = i32::from_le_bytes([0, 0, 0xff, 0xff]);
    vec![
        insn(LDXW, 2, 1, 0, 0),                      // 0: r2 = ctx->data
        insn(LDXW, 3, 1, 4, 0),                      // 1: r3 = ctx->data_end
        insn(MOV64_REG, 4, 2, 0, 0),                 // 2: r4 = data
        insn(ADD64_IMM, 4, 0, 0, 38),                // 3: r4 += eth + ip + ports
        insn(JGT_REG, 4, 3, to_out(4), 0),           // 4: too short: out
        insn(LDXH, 5, 2, 12, 0),                     // 5: ethertype
        insn(JNE_IMM, 5, 0, to_out(6), 0x0008),      // 6: not IPv4: out
        insn(LDXB, 5, 2, 14, 0),                     // 7: version, IHL
        insn(AND64_IMM, 5, 0, 0, 0x0f),              // 8: IHL
        insn(JNE_IMM, 5, 0, to_out(9), 5),           // 9: options: out
        insn(STW_IMM, 10, 0, -40, 0),                // 10: key.src = ::ffff:saddr
        insn(STW_IMM, 10, 0, -36, 0),                // 11
        insn(STW_IMM, 10, 0, -32, mapped),           // 12
        insn(LDXW, 5, 2, 26, 0),                     // 13: saddr
        insn(STXW, 10, 5, -28, 0),                   // 14
        insn(STW_IMM, 10, 0, -24, 0),                // 15: key.dst = ::ffff:daddr
        insn(STW_IMM, 10, 0, -20, 0),                // 16
        insn(STW_IMM, 10, 0, -16, mapped),           // 17
        insn(LDXW, 5, 2, 30, 0),                     // 18: daddr
        insn(STXW, 10, 5, -12, 0),                   // 19
        insn(LDXH, 5, 2, 34, 0),                     // 20: key.sport
        insn(STXH, 10, 5, -8, 0),                    // 21
        insn(LDXH, 5, 2, 36, 0),                     // 22: key.dport
        insn(STXH, 10, 5, -6, 0),                    // 23
        insn(LDXB, 5, 2, 23, 0),                     // 24: key.protocol, padding 0
        insn(STXW, 10, 5, -4, 0),                    // 25
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd), // 26: r1 = the map
        insn(0, 0, 0, 0, 0),                         // 27: (upper half)
        insn(MOV64_REG, 2, 10, 0, 0),                // 28: r2 = &key
        insn(ADD64_IMM, 2, 0, 0, -40),               // 29
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM), // 30: lookup
        insn(MOV64_IMM, 0, 0, 0, XDP_PASS as i32),   // 31 (OUT): r0 = XDP_PASS
        insn(EXIT, 0, 0, 0, 0),                      // 32
    ]
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    _rest: [u32; 11],
}

/// A connection table for `PARSE_FLOW_LOOKUP`: an LRU hash as large as
/// moat's default conntrack map, keys of `FLOW_KEY_BYTES`.
fn flow_table() -> anyhow::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_LRU_HASH,
        key_size: FLOW_KEY_BYTES,
        value_size: size_of::<moat_common::FlowState>() as u32,
        max_entries: moat_common::MAX_FLOWS,
        ..Default::default()
    };
    // SAFETY: a valid `bpf_attr` prefix for BPF_MAP_CREATE.
    let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }
        .map_err(|e| anyhow::anyhow!("creating the baseline's flow table failed: {e}"))?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 7],
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// How long a live-frames call took: wall clock, and CPU time of the
/// calling thread (the frames are processed in its context, so this
/// leaves out the time other processes had the core on a busy machine).
#[derive(Clone, Copy, Debug)]
pub struct Took {
    pub wall: Duration,
    pub cpu: Duration,
}

fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Runs `f`, timing it both ways.
fn timed<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<Took, E> {
    let (wall, cpu) = (Instant::now(), thread_cpu());
    f()?;
    Ok(Took {
        cpu: thread_cpu().saturating_sub(cpu),
        wall: wall.elapsed(),
    })
}

/// Which baseline program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// Returns XDP_PASS and nothing else.
    Pass,
    /// Parses to the ports, then returns XDP_PASS.
    ParsePass,
    /// Parses to the ports, looks the flow up in a connection table (a
    /// miss), then returns XDP_PASS.
    ParseFlowLookup,
}

/// A loaded baseline XDP program (closed on drop).
pub struct RawXdp {
    fd: OwnedFd,
    /// The map the program reads, if any (the program holds a reference
    /// too; kept for clarity of ownership).
    _map: Option<OwnedFd>,
}

impl RawXdp {
    pub fn load(which: Baseline) -> anyhow::Result<Self> {
        let mut map = None;
        let owned;
        let (insns, name): (&[Insn], &[u8]) = match which {
            Baseline::Pass => (PASS, b"mb_pass"),
            Baseline::ParsePass => (PARSE_PASS, b"mb_parse_pass"),
            Baseline::ParseFlowLookup => {
                let table = flow_table()?;
                owned = parse_flow_lookup(table.as_raw_fd());
                map = Some(table);
                (&owned, b"mb_parse_flow")
            }
        };
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            // As aya loads XDP programs: then one can replace another
            // behind a BPF link.
            expected_attach_type: BPF_XDP,
            ..Default::default()
        };
        attr.prog_name[..name.len()].copy_from_slice(name);
        // SAFETY: `attr` is a valid `bpf_attr` prefix for BPF_PROG_LOAD;
        // every pointer in it outlives the call.
        let fd = match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
            Ok(fd) => fd,
            Err(err) => {
                let log = String::from_utf8_lossy(&log);
                anyhow::bail!(
                    "loading the baseline XDP program {which:?} failed: {err}; verifier: {}",
                    log.trim_end_matches('\0').trim()
                );
            }
        };
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(RawXdp {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            _map: map,
        })
    }

    /// The loaded program with id `id` (one attached by another process,
    /// as `ip -d link` names it).
    pub fn by_id(id: u32) -> anyhow::Result<Self> {
        let mut attr: [u32; 4] = [id, 0, 0, 0];
        // SAFETY: bpf(BPF_PROG_GET_FD_BY_ID) with an attribute of the size
        // given; returns a new descriptor, owned below.
        let fd = unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }
            .map_err(|e| anyhow::anyhow!("program {id}: {e}"))?;
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(RawXdp {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            _map: None,
        })
    }

    /// The program's descriptor (to attach it, or put it behind a link).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.fd.as_fd()
    }

    /// `BPF_PROG_TEST_RUN`: (action, kernel's mean time per run).
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> anyhow::Result<(u32, Duration)> {
        let attr = self.run(frame, None, false, repeat)?;
        Ok((attr.retval, Duration::from_nanos(attr.duration.into())))
    }

    /// `BPF_PROG_TEST_RUN` as if `frame` arrived on `ifindex` of the calling
    /// thread's namespace: (action, kernel's mean time per run).
    pub fn test_run_on(
        &self,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> anyhow::Result<(u32, Duration)> {
        let attr = self.run(frame, Some(ifindex), false, repeat)?;
        Ok((attr.retval, Duration::from_nanos(attr.duration.into())))
    }

    /// Live frames into `ifindex` of the calling thread's namespace;
    /// returns the time the call took.
    pub fn live_run(&self, frame: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<Took> {
        timed(|| self.run(frame, Some(ifindex), true, repeat))
    }

    fn run(
        &self,
        frame: &[u8],
        ingress: Option<u32>,
        live: bool,
        repeat: u32,
    ) -> anyhow::Result<TestRunAttr> {
        let ctx = ingress.map(|ifindex| xdp_md(frame.len(), ifindex));
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat,
            ..Default::default()
        };
        if let Some(ctx) = &ctx {
            attr.ctx_in = ctx.as_ptr() as u64;
            attr.ctx_size_in = ctx.len() as u32;
        }
        if live {
            attr.flags = BPF_F_TEST_XDP_LIVE_FRAMES;
            attr.batch_size = LIVE_BATCH;
        }
        // SAFETY: a valid `bpf_attr` for BPF_PROG_TEST_RUN; `frame` and
        // `ctx` outlive the call; no output buffers are given.
        if let Err(e) = unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) } {
            anyhow::bail!(
                "BPF_PROG_TEST_RUN{} failed: {e}",
                if live { " (live frames)" } else { "" },
            );
        }
        Ok(attr)
    }
}

/// `struct xdp_md` for `BPF_PROG_TEST_RUN`: the whole frame, arriving on
/// `ifindex`.
pub(crate) fn xdp_md(len: usize, ifindex: u32) -> Vec<u8> {
    [0, len as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v: &u32| v.to_ne_bytes())
        .collect()
}

/// Live frames through an aya-loaded XDP program (moat's).
pub fn live_run<P>(
    program: &P,
    name: &'static str,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<Took, DataplaneError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let ctx = xdp_md(frame.len(), ifindex);
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat,
        attrs: TestRunAttrs::new().xdp_live_frames(LIVE_BATCH),
        ..TestRunOptions::default()
    };
    timed(|| {
        program
            .test_run(opts)
            .map_err(|source| DataplaneError::Program { name, source })
    })
}

/// The calling thread inside a named network namespace until dropped.
pub struct InNetns {
    home: OwnedFd,
}

impl InNetns {
    pub fn enter(name: &str) -> anyhow::Result<Self> {
        let home = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| anyhow::anyhow!("opening this thread's network namespace: {e}"))?;
        let target = std::fs::File::open(format!("/run/netns/{name}"))
            .map_err(|e| anyhow::anyhow!("opening network namespace {name}: {e}"))?;
        nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow::anyhow!("entering network namespace {name}: {e}"))?;
        Ok(InNetns { home: home.into() })
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(&self.home, nix::sched::CloneFlags::CLONE_NEWNET) {
            // Staying in the bench's namespace would judge the rest of the
            // run wrongly: stop here.
            eprintln!("moat bench: cannot return to the original network namespace: {e}");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::frame::Packet;

    #[test]
    fn baselines_load_and_pass() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("needs root (BPF_PROG_LOAD)");
        }
        let frame = Packet::tcp("198.18.200.9", 40000, "198.18.0.1", 22, 0x02).frame();
        for which in [
            Baseline::Pass,
            Baseline::ParsePass,
            Baseline::ParseFlowLookup,
        ] {
            let prog = RawXdp::load(which).unwrap();
            let (action, _) = prog.test_run(&frame, 10).unwrap();
            assert_eq!(action, XDP_PASS, "{which:?}");
            let (action, _) = prog.test_run(&frame[..20], 1).unwrap();
            assert_eq!(action, XDP_PASS, "{which:?} on a short frame");
        }
    }
}
