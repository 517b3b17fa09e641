//! Builds the `moat-ebpf` crate for the BPF target and leaves the object in
//! OUT_DIR, where `src/dataplane.rs` embeds it.
//!
//! The toolchain is Debian's rustc-web, linked into rustup as `debian-bpf`
//! by `cargo xtask setup`; it ships a precompiled `core` for the BPF targets
//! (there is no rust-src on these machines, so no `-Z build-std`).

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo:rerun-if-changed={}", root_dir);
    println!("cargo:rerun-if-changed=../common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "moat-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("debian-bpf"),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if bpf-linker or the debian-bpf toolchain is missing)")
}
