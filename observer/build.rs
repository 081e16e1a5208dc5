//! Builds the kernel programs (crate `observer-ebpf`) for the BPF target and leaves the object in
//! `OUT_DIR`, where `src/kernel.rs` embeds it. `cargo xtask build` checks the toolchain and the
//! linker first; `OBSERVER_EBPF_TOOLCHAIN` names the rustup toolchain to use (default `nightly`).

use std::{env, path::PathBuf};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    let toolchain = env::var("OBSERVER_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.join("../observer-ebpf");
    let root = root.canonicalize().with_context(|| format!("{}", root.display()))?;
    let root = root.to_str().context("non-UTF-8 path to observer-ebpf")?;
    let package = Package { name: "observer-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain))
        .context("building the kernel programs (run `cargo xtask build` to set up the toolchain)")
}
