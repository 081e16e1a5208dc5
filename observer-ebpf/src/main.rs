//! observer's kernel programs.
//!
//! Three hook families keep one [`ConnState`] per TCP connection end in `CONNS`, keyed by socket
//! cookie (unique for the life of the machine, so identical address pairs in different network
//! namespaces never collide):
//!
//! - [`sockops`]: `sock_ops` on the cgroup v2 root sees every connection of the host reach
//!   `ESTABLISHED` (actively or passively, which gives the role) and every later state change;
//!   it creates and removes the entries and sends open/close events.
//! - [`app`]: `tp_btf` on the `sock_send_length` / `sock_recv_length` tracepoints sees what the
//!   application wrote into and read out of each socket, whatever syscall it used.
//! - [`skb`]: `cgroup_skb` ingress and egress on the cgroup v2 root see each segment: acknowledged
//!   and received bytes, and the first bytes of each stream, copied to the agent until it has
//!   decided whether the connection is an HTTP upgrade to WebSocket.
//! - [`frames`]: from the same segments, the WebSocket frames of each direction (`FRAMES`).
//!
//! Every program only reads: the `cgroup_skb` programs always let the packet through, and no
//! program changes a socket beyond asking for its own state-change callbacks.

#![no_std]
#![no_main]

mod app;
mod frames;
mod skb;
mod sockops;

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use observer_common::{
    ConnEvent, ConnState, DEFAULT_MAX_CONNS, EventHeader, EventKind, MAX_WATCHED_PORTS, WsState,
    frame::StreamState, stat,
};

/// Tracked connection ends. The agent resizes it at load time (`--max-connections`).
#[map]
static CONNS: HashMap<u64, ConnState> = HashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

/// Server ports given with `--port`; the value is unused.
#[map]
static WATCHED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_WATCHED_PORTS, 0);

/// Cookies of connections whose headers the agent has seen in full: stop copying their bytes.
/// The agent inserts, the kernel removes.
#[map]
static STOP_FWD: HashMap<u64, u8> = HashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

/// Frame tracking of connections that may carry WebSocket, from their first `G` on.
#[map]
static FRAMES: HashMap<u64, WsState> = HashMap::with_max_entries(DEFAULT_MAX_CONNS, 0);

/// Scratch state for the dry run that decides where lost frame tracking may resume.
#[map]
static PROBE: PerCpuArray<StreamState> = PerCpuArray::with_max_entries(1, 0);

/// Open, close, header-chunk and control-frame events for the agent.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Kernel-side counters, indexed by [`stat`].
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Adds one to a kernel-side counter.
#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it is valid
        // and only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Sends an open or close event carrying the connection's state, and its frame tracking when it
/// has any; counts it when the ring is full.
#[inline(always)]
fn emit_conn(kind: EventKind, cookie: u64, ts_ns: u64, state: &ConnState) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count(stat::EVENTS_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, writable ring-buffer record of the right size.
    unsafe {
        (*event).header = EventHeader { kind: kind as u32, _pad: 0, cookie, ts_ns };
        (*event).state = *state;
        match FRAMES.get_ptr(cookie) {
            Some(frames) => (*event).frames = *frames,
            None => (*event).frames = WsState::default(),
        }
    }
    entry.submit(0);
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so this never runs.
    unsafe { core::hint::unreachable_unchecked() }
}
