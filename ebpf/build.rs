//! Linker flags for the eBPF object.
//!
//! bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM by default,
//! which turns off LLVM's inline expansion of `memset` and `memmove`: every
//! struct zeroing and unaligned copy (a flow key's 3 padding bytes, an
//! address copied into a key) became a BPF-to-BPF call to a byte-at-a-time
//! loop, about a sixth of a packet's time in `perf`. Without it, LLVM
//! expands them into plain loads and stores.

fn main() {
    println!("cargo:rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
