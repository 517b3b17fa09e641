//! The kernel interfaces the benchmark needs beyond the dataplane's: two
//! baseline XDP programs written as raw instructions (loaded with
//! `BPF_PROG_LOAD`), `BPF_PROG_TEST_RUN` on them (also in live-frames
//! mode, the packet generator), and entering a network namespace.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};

use crate::dataplane::DataplaneError;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_PROG_TYPE_XDP: u32 = 6;
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
}

/// A loaded baseline XDP program (closed on drop).
pub struct RawXdp {
    fd: OwnedFd,
}

impl RawXdp {
    pub fn load(which: Baseline) -> anyhow::Result<Self> {
        let (insns, name): (&[Insn], &[u8]) = match which {
            Baseline::Pass => (PASS, b"mb_pass"),
            Baseline::ParsePass => (PARSE_PASS, b"mb_parse_pass"),
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
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &mut attr as *mut ProgLoadAttr,
                size_of::<ProgLoadAttr>(),
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            let log = String::from_utf8_lossy(&log);
            anyhow::bail!(
                "loading the baseline XDP program {which:?} failed: {err}; verifier: {}",
                log.trim_end_matches('\0').trim()
            );
        }
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(RawXdp {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }

    /// The loaded program with id `id` (one attached by another process,
    /// as `ip -d link` names it).
    pub fn by_id(id: u32) -> anyhow::Result<Self> {
        let attr: [u32; 4] = [id, 0, 0, 0];
        // SAFETY: bpf(BPF_PROG_GET_FD_BY_ID) with an attribute of the size
        // given; returns a new descriptor, owned below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_GET_FD_BY_ID,
                attr.as_ptr(),
                size_of_val(&attr),
            )
        };
        if fd < 0 {
            anyhow::bail!("program {id}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us.
        Ok(RawXdp {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
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
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRunAttr,
                size_of::<TestRunAttr>(),
            )
        };
        if rc < 0 {
            anyhow::bail!(
                "BPF_PROG_TEST_RUN{} failed: {}",
                if live { " (live frames)" } else { "" },
                std::io::Error::last_os_error()
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
    use crate::frame::Packet;

    #[test]
    fn baselines_load_and_pass() {
        if !nix::unistd::Uid::effective().is_root() {
            panic!("needs root (BPF_PROG_LOAD)");
        }
        let frame = Packet::tcp("198.18.200.9", 40000, "198.18.0.1", 22, 0x02).frame();
        for which in [Baseline::Pass, Baseline::ParsePass] {
            let prog = RawXdp::load(which).unwrap();
            let (action, _) = prog.test_run(&frame, 10).unwrap();
            assert_eq!(action, XDP_PASS, "{which:?}");
            let (action, _) = prog.test_run(&frame[..20], 1).unwrap();
            assert_eq!(action, XDP_PASS, "{which:?} on a short frame");
        }
    }
}
