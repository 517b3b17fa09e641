//! Checks at start that the kernel and the process have what moat needs,
//! and says which feature is missing and from which kernel it exists.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
    util::KernelVersion,
};

/// Oldest kernel with everything moat uses: BPF ring buffers (5.8) and
/// XDP bpf_link attachment (5.9).
pub const MIN_KERNEL: (u8, u8) = (5, 9);

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("moat needs root (CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON); run it as root or in a privileged DaemonSet")]
    NotRoot,
    #[error("the kernel lacks {feature} (Linux >= {min} needed; this is {running})")]
    Missing {
        feature: &'static str,
        min: &'static str,
        running: String,
    },
    #[error("could not probe the kernel for {feature}: {detail}")]
    Probe {
        feature: &'static str,
        detail: String,
    },
}

/// What the kernel offers, for the start-up log line.
#[derive(Debug)]
pub struct KernelSupport {
    pub version: String,
    /// TCX attachment (6.6+); older kernels use a clsact qdisc.
    pub tcx: bool,
}

pub fn check() -> Result<KernelSupport, PreflightError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(PreflightError::NotRoot);
    }
    let running = KernelVersion::current()
        .map(|v| v.to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let probes: [(&'static str, &'static str, Result<bool, String>); 4] = [
        (
            "BPF ring buffers",
            "5.8",
            is_map_supported(MapType::RingBuf).map_err(|e| e.to_string()),
        ),
        (
            "LRU hash maps",
            "4.10",
            is_map_supported(MapType::LruHash).map_err(|e| e.to_string()),
        ),
        (
            "XDP programs",
            "4.8",
            is_program_supported(ProgramType::Xdp).map_err(|e| e.to_string()),
        ),
        (
            "TC classifier programs",
            "4.1",
            is_program_supported(ProgramType::SchedClassifier).map_err(|e| e.to_string()),
        ),
    ];
    for (feature, min, result) in probes {
        match result {
            Ok(true) => {}
            Ok(false) => {
                return Err(PreflightError::Missing {
                    feature,
                    min,
                    running: running.clone(),
                })
            }
            Err(detail) => return Err(PreflightError::Probe { feature, detail }),
        }
    }
    let at_least = |major, minor| {
        KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(major, minor, 0))
    };
    if !at_least(MIN_KERNEL.0, MIN_KERNEL.1) {
        return Err(PreflightError::Missing {
            feature: "XDP bpf_link attachment",
            min: "5.9",
            running,
        });
    }
    Ok(KernelSupport {
        version: running,
        tcx: at_least(6, 6),
    })
}
