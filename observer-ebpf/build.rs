//! Rebuilds the kernel programs when the linker changes, since cargo cannot see it.

fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
