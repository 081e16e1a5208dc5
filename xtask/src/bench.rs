//! `cargo xtask bench`: what observer costs on a host, and how fast it reaches a verdict.
//!
//! Builds the release agent, installs the peers (as for the tests) and `bpftool`, then runs
//! `bench/run.py`, which drives the measurements, prints a table and writes
//! `target/bench/summary.json`. BENCHMARKS.md describes the method and records the results.
//!
//! The driver undoes everything it starts, also on Ctrl-C. This module makes sure of it: while
//! the driver runs it passes SIGINT, SIGTERM and SIGHUP on instead of dying, and afterwards it
//! kills any process the driver recorded in `target/bench/pids` that is still alive, deletes any
//! network namespace named `bench-*` and puts `kernel.bpf_stats_enabled` back as it found it.

use std::{
    ffi::OsString,
    fs,
    path::Path,
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{build, output, require_root, sh, step, test_peers};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
const NETNS_PREFIX: &str = "bench-";

const SIGHUP: i32 = 1;
const SIGINT: i32 = 2;
const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SIGCONT: i32 = 18;

/// The last signal received while the driver runs; 0 when none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember(signum: i32) {
    RECEIVED.store(signum, Ordering::SeqCst);
}

unsafe extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn kill(pid: i32, signum: i32) -> i32;
}

pub fn bench(root: &Path, args: &[OsString]) -> anyhow::Result<()> {
    require_root("the benchmark loads kernel programs and creates network namespaces")?;
    let binary = build(root)?;
    let python = test_peers(root)?;
    if output(Command::new("sh").args(["-c", "command -v bpftool"])).is_none() {
        step("installing bpftool (reads the run time of each kernel program)");
        if sh(Command::new("apt-get").args(["install", "-y", "-q", "bpftool"])).is_err() {
            sh(Command::new("apt-get").args(["update", "-q"]))?;
            sh(Command::new("apt-get").args(["install", "-y", "-q", "bpftool"]))
                .context("fix: apt-get install bpftool")?;
        }
    }
    let stats_before = fs::read_to_string(STATS_SYSCTL).context("reading bpf_stats_enabled")?;

    step("running bench/run.py (about 10 minutes)");
    // Handled, not ignored: the handler is reset in the driver when it starts, so the driver
    // still gets the terminal's Ctrl-C and cleans up, while this process waits for it.
    for signum in [SIGINT, SIGTERM, SIGHUP] {
        // SAFETY: `remember` only stores to an atomic, which is async-signal-safe.
        unsafe { signal(signum, remember) };
    }
    let result = drive(&python, root, &binary, args);
    leftovers(root);
    if fs::read_to_string(STATS_SYSCTL).ok() != Some(stats_before.clone()) {
        step(&format!("restoring kernel.bpf_stats_enabled to {}", stats_before.trim()));
        fs::write(STATS_SYSCTL, &stats_before).context("restoring bpf_stats_enabled")?;
    }
    result
}

/// Runs the driver, passing on the first signal this process receives.
fn drive(python: &Path, root: &Path, binary: &Path, args: &[OsString]) -> anyhow::Result<()> {
    let mut child = Command::new(python)
        .arg(root.join("bench/run.py"))
        .args(args)
        .env("OBSERVER_BIN", binary)
        .spawn()
        .context("starting bench/run.py")?;
    let mut passed_on = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let signum = RECEIVED.load(Ordering::SeqCst);
        if signum != 0 && !passed_on {
            passed_on = true;
            let pid = i32::try_from(child.id()).context("driver pid")?;
            // SAFETY: plain syscall on the driver's pid, which is not reaped yet.
            unsafe { kill(pid, signum) };
        }
        thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!("bench/run.py exited with {status}");
    }
    Ok(())
}

/// Kills what the driver started and left running, and deletes its namespaces.
fn leftovers(root: &Path) {
    let pids = fs::read_to_string(root.join("target/bench/pids")).unwrap_or_default();
    for line in pids.lines() {
        let mut fields = line.split_whitespace();
        let (Some(pid), Some(start)) = (fields.next(), fields.next()) else { continue };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        // The start time tells the recorded process from a later one that reuses its pid.
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let started = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(19));
        if started == Some(start) {
            step(&format!("killing leftover benchmark process {pid}"));
            // SAFETY: plain syscalls on a pid checked just above.
            unsafe {
                kill(pid, SIGCONT);
                kill(pid, SIGKILL);
            }
        }
    }
    let list = output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if !name.starts_with(NETNS_PREFIX) {
            continue;
        }
        step(&format!("deleting leftover namespace {name}"));
        let inside = output(Command::new("ip").args(["netns", "pids", name])).unwrap_or_default();
        for pid in inside.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: plain syscall; the pid was just listed in the namespace.
            unsafe { kill(pid, SIGKILL) };
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}
