//! `cargo xtask`: builds, runs, lints, tests and benchmarks observer, setting up what each step
//! needs first.
//!
//! Every command checks its prerequisites and installs what is missing, saying what it does:
//! the nightly toolchain the kernel programs build with (with `rust-src`), `bpf-linker`, and for
//! the tests the Python and Node peers and Debian's `prometheus` package (`promtool`, and the
//! server the deployment tests scrape the agent with). A prerequisite it cannot get is an error
//! naming it and the fix.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;

/// Nightly with LLVM 22, the LLVM `bpf-linker` 0.10.4 is built against.
const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
const BPF_LINKER_VERSION: &str = "0.10.4";

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build target/release/observer with the kernel programs embedded.
    Build,
    /// Build, then run the agent (as root) with the given arguments.
    Run {
        /// Arguments for `observer`, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Check formatting and lints of every crate (the eBPF crate on its own).
    Lint,
    /// Fuzz the frame tracker (the kernel programs' state machine) for a while.
    Fuzz {
        /// How long to fuzz, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Run every test: unit tests, a short fuzzing run, then the privileged tests against real
    /// peers (as root).
    Test {
        /// Extra arguments for pytest, after `--` (e.g. `-k idle`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        pytest_args: Vec<OsString>,
    },
    /// Measure what the agent costs and how fast it detects faults (as root, about 10 minutes);
    /// writes target/bench/summary.json. See BENCHMARKS.md.
    Bench {
        /// Extra arguments for bench/run.py, after `--` (e.g. `--phases hooks,scale`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match task {
        Task::Build => {
            build(&root)?;
        }
        Task::Run { args } => {
            let binary = build(&root)?;
            require_root("the agent loads kernel programs")?;
            kernel_mounts()?;
            let status = Command::new(&binary).args(args).status()?;
            if !status.success() {
                bail!("observer exited with {status}");
            }
        }
        Task::Lint => lint()?,
        Task::Fuzz { seconds } => fuzz(&ebpf_prerequisites()?, seconds)?,
        Task::Test { pytest_args } => test(&root, &pytest_args)?,
        Task::Bench { args } => bench::bench(&root, &args)?,
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").into()
}

/// Runs a command, failing with its name when it fails.
fn sh(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output, or `None` if it cannot run or fails.
fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

/// Makes sure the eBPF toolchain and linker are present; returns the toolchain to build with.
fn ebpf_prerequisites() -> anyhow::Result<String> {
    if output(Command::new("rustup").arg("--version")).is_none() {
        bail!("rustup is needed to build the kernel programs; install it from https://rustup.rs");
    }
    // The machine's `nightly` is used when it carries LLVM 22; otherwise the pinned one.
    let llvm22 = |toolchain: &str| {
        output(Command::new("rustup").args(["run", toolchain, "rustc", "-vV"]))
            .is_some_and(|v| v.contains("LLVM version: 22."))
    };
    let toolchain = if let Ok(chosen) = env::var("OBSERVER_EBPF_TOOLCHAIN") {
        chosen
    } else if llvm22("nightly") {
        "nightly".to_owned()
    } else {
        if !llvm22(PINNED_NIGHTLY) {
            step(&format!(
                "installing Rust toolchain {PINNED_NIGHTLY} (LLVM 22) for the kernel programs"
            ));
            sh(Command::new("rustup").args([
                "toolchain",
                "install",
                PINNED_NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
                "--component",
                "clippy",
            ]))
            .context("the kernel programs need a nightly Rust with LLVM 22")?;
        }
        PINNED_NIGHTLY.to_owned()
    };

    ensure_component(&toolchain, "rust-src", "needed for -Z build-std=core")?;

    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        step(&format!("installing bpf-linker {BPF_LINKER_VERSION} (about 90 s)"));
        sh(Command::new("cargo").args([
            "install",
            "--locked",
            "--force",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        ]))
        .with_context(|| format!("fix: cargo install --locked bpf-linker@{BPF_LINKER_VERSION}"))?;
    }
    Ok(toolchain)
}

/// Adds a rustup component to `toolchain` when it is missing.
fn ensure_component(toolchain: &str, component: &str, why: &str) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .unwrap_or_default();
    if installed.lines().any(|c| c.starts_with(component)) {
        return Ok(());
    }
    step(&format!("adding {component} to {toolchain} ({why})"));
    sh(Command::new("rustup").args(["component", "add", component, "--toolchain", toolchain]))
        .with_context(|| format!("fix: rustup component add {component} --toolchain {toolchain}"))
}

/// Builds the release agent and returns its path.
fn build(root: &Path) -> anyhow::Result<PathBuf> {
    let toolchain = ebpf_prerequisites()?;
    step("building target/release/observer");
    sh(Command::new("cargo")
        .args(["build", "--release", "--package", "observer"])
        .env("OBSERVER_EBPF_TOOLCHAIN", &toolchain))?;
    Ok(root.join("target/release/observer"))
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { geteuid() };
    if euid != 0 {
        bail!("{why}: run as root (or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
    }
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// Mounts bpffs and tracefs where they belong when they are missing. The agent does the same on
/// its own; checking here says it before anything runs, and gives the tests' `bpftool` its bpffs.
fn kernel_mounts() -> anyhow::Result<()> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    for (fstype, point) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        let mounted = mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(point) && fields.next() == Some(fstype)
        });
        if mounted {
            continue;
        }
        step(&format!("mounting {fstype} at {point}, which is missing"));
        sh(Command::new("mount").args(["-t", fstype, fstype, point]))
            .with_context(|| format!("fix: mount -t {fstype} {fstype} {point}"))?;
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    let toolchain = ebpf_prerequisites()?;
    step("cargo fmt --check");
    sh(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    step("clippy on the agent, shared types and xtask");
    sh(Command::new("cargo")
        .args(["clippy", "--workspace", "--exclude", "observer-ebpf", "--all-targets", "--"])
        .args(["-D", "warnings"])
        .env("OBSERVER_EBPF_TOOLCHAIN", &toolchain))?;
    ensure_component(&toolchain, "clippy", "lints the kernel programs")?;
    step("clippy on the kernel programs");
    sh(Command::new("rustup")
        .args(["run", &toolchain, "cargo", "clippy", "--package", "observer-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--release"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings", "-C", "panic=abort"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("CARGO_ENCODED_RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\""))?;
    Ok(())
}

fn test(root: &Path, pytest_args: &[OsString]) -> anyhow::Result<()> {
    let toolchain = ebpf_prerequisites()?;
    step("unit tests");
    sh(Command::new("cargo")
        .args(["test", "--workspace", "--exclude", "observer-ebpf"])
        .env("OBSERVER_EBPF_TOOLCHAIN", &toolchain))?;

    fuzz(&toolchain, 15)?;

    require_root("the privileged tests load kernel programs and create network namespaces")?;
    kernel_mounts()?;
    let binary = build(root)?;
    let python = test_peers(root)?;
    step("building the tokio-tungstenite test peer");
    sh(Command::new("cargo").args(["build", "--release", "--package", "tungstenite-peer"]))?;
    prometheus_tools()?;
    step("privileged tests against real peers");
    sh(Command::new(python)
        .args(["-m", "pytest", "-v", "-p", "no:cacheprovider", "tests"])
        .args(pytest_args)
        .env("OBSERVER_BIN", binary)
        .env("TUNGSTENITE_PEER", root.join("target/release/tungstenite-peer")))?;
    Ok(())
}

/// Installs Debian's `prometheus` package when `promtool` or `prometheus` is missing. Its
/// maintainer scripts would start the packaged service; a `policy-rc.d` that forbids starting
/// services stands for the length of the install (Debian's documented way, honoured with or
/// without systemd), so nothing is left running.
fn prometheus_tools() -> anyhow::Result<()> {
    let have = |tool: &str| {
        output(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_some()
    };
    if have("promtool") && have("prometheus") {
        return Ok(());
    }
    step(
        "installing Debian's prometheus package (promtool, prometheus); its service is not started",
    );
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        fs::write(
            policy,
            "#!/bin/sh\n# Written by cargo xtask during an install: start no service.\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        fs::set_permissions(policy, fs::Permissions::from_mode(0o755))?;
    }
    let install = || {
        sh(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "prometheus"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    let result = install().or_else(|_| {
        step("apt-get update, then installing prometheus again");
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        install()
    });
    if ours {
        let _ = fs::remove_file(policy);
    }
    result.context("fix: apt-get update && apt-get install --no-install-recommends prometheus")
}

/// Runs each fuzz target (cargo-fuzz, libFuzzer) for `seconds`, installing cargo-fuzz when it
/// is missing: `frames`, the kernel's frame tracker, and `handshake`, the agent's upgrade
/// recogniser.
fn fuzz(toolchain: &str, seconds: u32) -> anyhow::Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        step("installing cargo-fuzz");
        sh(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
            .context("fix: cargo install --locked cargo-fuzz")?;
    }
    for target in ["frames", "handshake"] {
        step(&format!("fuzzing {target} for {seconds} s"));
        sh(Command::new("rustup")
            .args(["run", toolchain, "cargo", "fuzz", "run", "--fuzz-dir", "fuzz", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"))?;
    }
    Ok(())
}

/// Installs the test peers: a Python virtualenv with `tests/requirements.txt`, and the Node
/// packages of `tests/node`. Returns the virtualenv's Python.
fn test_peers(root: &Path) -> anyhow::Result<PathBuf> {
    for (tool, package) in [
        ("ip", "iproute2"),
        ("ss", "iproute2"),
        ("node", "nodejs"),
        ("npm", "npm"),
        ("bpftool", "bpftool"),
        ("setpriv", "util-linux"),
    ] {
        if output(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_none() {
            step(&format!("installing {package} (for {tool})"));
            let install = || sh(Command::new("apt-get").args(["install", "-y", "-q", package]));
            if install().is_err() {
                // Package lists may be stale on a fresh machine.
                step("apt-get update, then installing again");
                sh(Command::new("apt-get").args(["update", "-q"]))?;
                install().with_context(|| format!("fix: apt-get install {package}"))?;
            }
        }
    }

    let venv = root.join("tests/.venv");
    let python = venv.join("bin/python");
    let requirements = root.join("tests/requirements.txt");
    let stamp = venv.join(".installed-requirements");
    let wanted = fs::read_to_string(&requirements).context("reading tests/requirements.txt")?;
    if fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        if !python.exists() {
            step("creating the test virtualenv tests/.venv");
            sh(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                .context("fix: apt-get install python3-venv")?;
        }
        step("installing Python test peers (tests/requirements.txt)");
        sh(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements))?;
        fs::write(&stamp, wanted)?;
    }

    let node_dir = root.join("tests/node");
    let lock = fs::read(node_dir.join("package-lock.json"))
        .context("reading tests/node/package-lock.json")?;
    let node_stamp = node_dir.join("node_modules/.installed-lock");
    if fs::read(&node_stamp).ok().as_deref() != Some(lock.as_slice()) {
        step("installing Node test peers (tests/node)");
        sh(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--silent"])
            .current_dir(&node_dir))?;
        fs::write(&node_stamp, lock)?;
    }
    Ok(python)
}
