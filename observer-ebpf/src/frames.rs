//! WebSocket frames of each direction, tracked from `cgroup_skb` segments.
//!
//! The state machine is [`observer_common::frame::StreamState`], shared with the agent's tests;
//! this module only places each segment in its direction's stream and drives the machine over
//! the new bytes with `bpf_loop`, so the verifier checks one step, not every iteration.
//!
//! Segments are placed by sequence number relative to the stream's start (taken from
//! `bpf_sock_ops` at establishment): bytes already tracked (retransmissions, overlaps) are
//! skipped; a segment a little ahead of the next expected byte (reordered: a sender moving
//! between CPUs reorders even loopback) is remembered by its range and passed over once the hole
//! fills, if it held payload only; otherwise bytes were never seen here, which loses that
//! direction's tracking and is counted. A lost
//! direction resumes at the first segment whose start a dry run shows to be a frame boundary
//! beyond doubt, and counts nothing in between. Data at a given sequence number never changes,
//! so tracking a segment TCP later drops is still correct.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_ktime_get_ns, generated::bpf_loop, generated::bpf_skb_load_bytes},
};
use observer_common::{
    Direction, EventHeader, EventKind, FrameEvent, WsState,
    frame::{Cursor, Phase, Placement, Source, Step, StreamState, opcode},
    stat,
};

use crate::{EVENTS, FRAMES, PROBE, count};

/// Most steps on one segment: two per frame, so a 64 KiB segment of 3-byte frames still fits.
const MAX_STEPS: u32 = 1 << 16;

/// Starts tracking the frames of a connection whose request direction opened with `G`.
#[inline(always)]
pub fn start(cookie: u64, request: Direction) {
    let mut ws = WsState::default();
    ws.dir[request as usize] = StreamState::new(true);
    ws.dir[1 - request as usize] = StreamState::new(false);
    if FRAMES.insert(cookie, ws, 0).is_err() {
        count(stat::FRAMES_FULL);
    }
}

/// The bytes of the segment, read from the socket buffer.
struct Segment {
    skb: *mut __sk_buff,
}

impl Source for Segment {
    #[inline(always)]
    fn read(&self, at: u32, dst: &mut [u8]) -> bool {
        // SAFETY: `skb` is the program's context; `dst` is a writable buffer of `dst.len()`
        // bytes, a constant at every call site once inlined.
        unsafe {
            bpf_skb_load_bytes(self.skb.cast(), at, dst.as_mut_ptr().cast(), dst.len() as u32) == 0
        }
    }
}

/// Everything one `bpf_loop` iteration needs, on the program's stack.
#[repr(C)]
#[derive(Clone, Copy)]
struct Walk {
    skb: *mut __sk_buff,
    state: *mut StreamState,
    cursor: Cursor,
    cookie: u64,
    now_ns: u64,
    direction: u32,
    /// Set when the machine said it is done with the segment.
    done: u32,
}

/// Tracks the frames in the payload of one segment of a tracked connection.
#[inline(always)]
pub fn track(
    skb: *mut __sk_buff,
    cookie: u64,
    direction: Direction,
    stream_offset: u32,
    payload_offset: u32,
    payload_len: u32,
) {
    let Some(ws) = FRAMES.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: `ws` comes from a successful map lookup and stays valid during this run.
    let state = unsafe {
        match direction {
            Direction::Ingress => &raw mut (*ws).dir[0],
            Direction::Egress => &raw mut (*ws).dir[1],
        }
    };
    let end_offset = stream_offset.wrapping_add(payload_len);
    // SAFETY: as above, for every access to `*state` below.
    let skip = match unsafe { (*state).place(stream_offset, payload_len) } {
        Placement::Old | Placement::Parked => return,
        Placement::Gap => {
            unsafe { (*state).lose() };
            0
        }
        Placement::New { skip } => skip,
    };
    let cursor = Cursor { pos: payload_offset + skip, end: payload_offset + payload_len };
    // SAFETY: no preconditions.
    let now_ns = unsafe { bpf_ktime_get_ns() };

    let mut run = Walk { skb, state, cursor, cookie, now_ns, direction: direction as u32, done: 0 };
    if unsafe { (*state).phase } == Phase::Lost as u8 {
        // Resume only where a dry run over this segment finds frame headers beyond doubt.
        // The dry run's state lives in a map, not on the stack: the verifier tracks stack
        // values exactly, and a loop that changes tracked values never converges for it.
        if let Some(probe) = PROBE.get_ptr_mut(0) {
            unsafe {
                core::ptr::copy_nonoverlapping(state, probe, 1);
                (*probe).start_probe();
            }
            let mut dry = Walk { state: probe, ..run };
            walk(&mut dry);
            if unsafe { (*probe).probe_passed() } {
                unsafe { (*state).resume() };
            }
        }
    }
    if !walk(&mut run) {
        // More work than any real segment needs: give up on this direction.
        unsafe { (*state).lose() };
    }
    unsafe {
        (*state).next_offset = end_offset;
        (*state).unpark();
    }
}

/// Runs the machine over the walk's segment; false if it did not finish. Kept out of line so
/// that the verifier checks the loop once for both the dry run and the real one.
#[inline(never)]
fn walk(walk: &mut Walk) -> bool {
    walk.done = 0;
    // SAFETY: `step` has the callback signature `bpf_loop` expects and `walk` outlives the call.
    unsafe { bpf_loop(MAX_STEPS, step as *mut c_void, (walk as *mut Walk).cast(), 0) };
    walk.done != 0
}

/// One `bpf_loop` iteration: one step of the machine. Returns 1 to stop the loop.
extern "C" fn step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` that `track` handed to `bpf_loop`.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    let source = Segment { skb: walk.skb };
    // SAFETY: the state pointer comes from a map lookup made by the caller in this same run.
    let state = unsafe { &mut *walk.state };
    match state.step(&source, &mut walk.cursor, walk.now_ns) {
        Step::More => 0,
        Step::Done => {
            walk.done = 1;
            1
        }
        Step::Frame(frame) => {
            if frame.opcode >= opcode::CLOSE && frame.opcode <= opcode::PONG {
                emit(walk, frame.opcode, frame.fin, frame.payload_len, frame.close_code);
            }
            0
        }
    }
}

/// Sends a control-frame event.
#[inline(always)]
fn emit(walk: &Walk, op: u8, fin: bool, payload_len: u64, close_code: u16) {
    let Some(mut entry) = EVENTS.reserve::<FrameEvent>(0) else {
        count(stat::EVENTS_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, writable record of the right size.
    unsafe {
        (*event).header = EventHeader {
            kind: EventKind::Frame as u32,
            _pad: 0,
            cookie: walk.cookie,
            ts_ns: walk.now_ns,
        };
        (*event).payload_len = payload_len;
        (*event).close_code = close_code;
        (*event).opcode = op;
        (*event).direction = walk.direction as u8;
        (*event).fin = fin as u8;
        (*event)._pad = [0; 3];
    }
    entry.submit(0);
}
