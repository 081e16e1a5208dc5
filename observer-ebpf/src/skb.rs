//! Segments, from `cgroup_skb` ingress and egress on the cgroup v2 root.
//!
//! For each segment of a tracked socket this module does two things:
//!
//! - Ingress: brings the socket's `bytes_acked` and `bytes_received` up to date. The program
//!   runs before TCP processes the segment, so it reads the socket's values through
//!   `bpf_tcp_sock()` (as of the previous segment) and adds what this segment brings: new
//!   acknowledged bytes (`ack_seq - snd_una`) and new in-order payload (`seq + len - rcv_nxt`).
//!   A segment TCP later drops is corrected by the next one, which reads the socket afresh.
//!   It also notes that the peer answered at all, and the window it advertises (zero: the
//!   peer's application is not reading).
//! - Both directions: the socket's retransmission count (`total_retrans`), and when it grew.
//! - Both directions, while the connection is still being classified: copies the first
//!   [`HEADER_WINDOW`] bytes of the stream to the agent as [`ChunkEvent`]s, tagged with their
//!   offset in the stream, so the agent can parse the HTTP upgrade wherever segments split it.
//!   A connection whose request direction does not open with `G` cannot be a WebSocket upgrade
//!   and stops being tracked here, unless its port is watched.
//!
//! Fields read: `struct __sk_buff` `len` and `sk`, and `struct bpf_tcp_sock` `rcv_nxt`,
//! `snd_una`, `bytes_received`, `bytes_acked`, `total_retrans`, all UAPI contexts the verifier translates to the
//! running kernel's layout; and the IPv4/IPv6 and TCP headers of the packet, which start at
//! offset 0 in both directions for `cgroup_skb`. Packets are never changed: both programs
//! always return 1 (pass).

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_fullsock, bpf_tcp_sock,
        generated::bpf_skb_load_bytes,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use observer_common::{
    CHUNK_LEN, ChunkEvent, ConnState, Direction, EventHeader, EventKind, HEADER_WINDOW, Role, ends,
    flags, stat,
};

use crate::{CONNS, EVENTS, STOP_FWD, count, frames};

const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_ACK: u8 = 0x10;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_FIN: u8 = 0x01;
/// Chunks copied from one segment at most (a loopback segment can hold the whole window).
const MAX_CHUNKS: u32 = HEADER_WINDOW / CHUNK_LEN as u32;

#[cgroup_skb(ingress)]
pub fn observer_ingress(ctx: SkBuffContext) -> i32 {
    segment(&ctx, Direction::Ingress);
    1
}

#[cgroup_skb(egress)]
pub fn observer_egress(ctx: SkBuffContext) -> i32 {
    segment(&ctx, Direction::Egress);
    1
}

/// What this module needs of a TCP segment's headers.
#[derive(Default)]
struct Segment {
    seq: u32,
    ack_seq: u32,
    tcp_flags: u8,
    /// Receive window the sender advertises, as on the wire.
    window: u16,
    payload_offset: u32,
    payload_len: u32,
}

#[inline(always)]
fn segment(ctx: &SkBuffContext, direction: Direction) {
    // SAFETY: the context is valid for the whole run; the helper returns 0 without a socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(state) = CONNS.get_ptr_mut(cookie) else {
        return;
    };
    let mut seg = Segment::default();
    if !parse(ctx, &mut seg) {
        return;
    }
    account(ctx, state, &seg, direction);
    if seg.payload_len > 0 {
        forward(ctx, cookie, state, &seg, direction);
        // SAFETY: `state` comes from a successful map lookup and stays valid during this run.
        let start = unsafe { (*state).stream_start[direction as usize] };
        frames::track(
            ctx.skb.skb,
            cookie,
            direction,
            seg.seq.wrapping_sub(start),
            seg.payload_offset,
            seg.payload_len,
        );
    }
}

/// Reads the IP and TCP headers at the start of the packet into `seg`, with one load for each:
/// every load is a helper call, and this runs for every segment of every tracked socket. False
/// when the packet is not TCP or is too short.
///
/// Kept out of line: its load buffers then live in a frame of their own, which is never on the
/// stack at the same time as the frame walk's, so the programs stay within the verifier's
/// combined stack limit.
#[inline(never)]
fn parse(ctx: &SkBuffContext, seg: &mut Segment) -> bool {
    // The first 10 bytes hold the version and, for IPv4, the header length and the protocol
    // (byte 9); for IPv6, the next header (byte 6). Extension headers are not followed: the
    // kernel's own TCP segments carry none.
    let Ok(ip) = ctx.load::<[u8; 10]>(0) else {
        return false;
    };
    let (ip_len, protocol) = match ip[0] >> 4 {
        4 => (u32::from(ip[0] & 0x0f) * 4, ip[9]),
        6 => (40, ip[6]),
        _ => return false,
    };
    if protocol != IPPROTO_TCP {
        return false;
    }
    // Sequence (0..4), acknowledgement (4..8), data offset (8), flags (9), window (10..12): the
    // header from its fifth byte on, after the ports.
    let Ok(tcp) = ctx.load::<[u8; 12]>(ip_len as usize + 4) else {
        return false;
    };
    let payload_offset = ip_len + u32::from(tcp[8] >> 4) * 4;
    seg.seq = u32::from_be_bytes([tcp[0], tcp[1], tcp[2], tcp[3]]);
    seg.ack_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    seg.tcp_flags = tcp[9];
    seg.window = u16::from_be_bytes([tcp[10], tcp[11]]);
    seg.payload_offset = payload_offset;
    seg.payload_len = ctx.len().saturating_sub(payload_offset);
    true
}

#[inline(always)]
fn account(ctx: &SkBuffContext, state: *mut ConnState, seg: &Segment, direction: Direction) {
    // SAFETY: the context is valid; `sk` is checked for NULL and narrowed by the helpers, whose
    // results are checked for NULL before any field is read.
    let (rcv_nxt, snd_una, received, acked, retrans) = unsafe {
        let sk: *mut bpf_sock = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            return;
        }
        let tp = bpf_tcp_sock(full);
        if tp.is_null() {
            return;
        }
        ((*tp).rcv_nxt, (*tp).snd_una, (*tp).bytes_received, (*tp).bytes_acked, (*tp).total_retrans)
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    // SAFETY: `state` comes from a successful map lookup and stays valid during this run.
    unsafe {
        // Only ever raised: the callbacks may have counted ahead of this sample.
        if retrans > (*state).total_retrans {
            (*state).last_retrans_ns = now;
            (*state).total_retrans = retrans;
        }
    }
    if direction == Direction::Egress {
        return;
    }

    let mut acked_now = acked;
    if seg.tcp_flags & TCP_FLAG_ACK != 0 {
        let advance = seg.ack_seq.wrapping_sub(snd_una) as i32;
        if advance > 0 {
            acked_now += advance as u64;
        }
    }

    let mut received_now = received;
    let new_bytes = seg.seq.wrapping_add(seg.payload_len).wrapping_sub(rcv_nxt) as i32;
    let in_order = rcv_nxt.wrapping_sub(seg.seq) as i32 >= 0;
    if seg.payload_len > 0 && new_bytes > 0 && in_order {
        received_now += new_bytes as u64;
    }

    // SAFETY: as above.
    unsafe {
        // The peer's FIN takes a sequence number that the socket counts in `bytes_received`.
        // The state callbacks see it only on the way to CLOSE_WAIT or CLOSING; the end that
        // closed first receives it in FIN_WAIT and goes to CLOSE without passing either.
        if seg.tcp_flags & TCP_FLAG_FIN != 0 && in_order {
            (*state).ends |= ends::FIN_RECEIVED;
        }
        (*state).last_ingress_ns = now;
        (*state).peer_window = u32::from(seg.window);
        if seg.window == 0 && seg.tcp_flags & TCP_FLAG_RST == 0 {
            if (*state).zero_window_since_ns == 0 {
                (*state).zero_window_since_ns = now;
                (*state).zero_window_events += 1;
            }
        } else {
            (*state).zero_window_since_ns = 0;
        }
        if acked_now > (*state).tcp_bytes_acked {
            (*state).last_ack_ns = now;
        }
        if received_now > (*state).tcp_bytes_received {
            (*state).last_rx_ns = now;
            if (*state).recv_queue() == 0 {
                (*state).unread_since_ns = now;
            }
        }
        (*state).tcp_bytes_acked = acked_now;
        (*state).tcp_bytes_received = received_now;
    }
}

/// Copies the segment's payload to the agent while the stream's start is still being examined.
#[inline(always)]
fn forward(
    ctx: &SkBuffContext,
    cookie: u64,
    state: *mut ConnState,
    seg: &Segment,
    direction: Direction,
) {
    let bit = match direction {
        Direction::Ingress => flags::FWD_INGRESS,
        Direction::Egress => flags::FWD_EGRESS,
    };
    // SAFETY: `state` comes from a successful map lookup and stays valid during this run.
    let (state_flags, start, role) =
        unsafe { ((*state).flags, (*state).stream_start[direction as usize], (*state).role) };
    if state_flags & bit == 0 {
        return;
    }
    let offset = seg.seq.wrapping_sub(start);
    if offset >= HEADER_WINDOW {
        return;
    }

    // SAFETY: the value is only tested for presence.
    if unsafe { STOP_FWD.get(cookie) }.is_some() {
        // SAFETY: as above.
        unsafe { (*state).flags &= !(flags::FWD_INGRESS | flags::FWD_EGRESS) };
        let _ = STOP_FWD.remove(cookie);
        return;
    }

    if state_flags & flags::CLASSIFIED == 0 && offset == 0 {
        let request_direction =
            if role == Role::Server as u8 { Direction::Ingress } else { Direction::Egress };
        let first: u8 = ctx.load(seg.payload_offset as usize).unwrap_or(0);
        if direction == request_direction && first == b'G' {
            // SAFETY: as above.
            unsafe { (*state).flags |= flags::HTTP_CANDIDATE | flags::CLASSIFIED };
            frames::start(cookie, request_direction);
        } else if state_flags & flags::WATCHED != 0 {
            // Not HTTP, but watched: still copy the first bytes, from which the agent names the
            // protocol (TLS, HTTP/2); the agent stops the copying.
            // SAFETY: as above.
            unsafe { (*state).flags = state_flags | flags::CLASSIFIED };
        } else {
            let _ = CONNS.remove(cookie);
            return;
        }
    }

    emit_chunks(ctx, cookie, seg, offset, direction);
}

#[inline(always)]
fn emit_chunks(ctx: &SkBuffContext, cookie: u64, seg: &Segment, offset: u32, direction: Direction) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut i = 0;
    while i < MAX_CHUNKS {
        let start = i * CHUNK_LEN as u32;
        if start >= seg.payload_len || offset + start >= HEADER_WINDOW {
            break;
        }
        let len = seg.payload_len - start;
        let len = if len > CHUNK_LEN as u32 { CHUNK_LEN as u32 } else { len };
        let Some(mut entry) = EVENTS.reserve::<ChunkEvent>(0) else {
            count(stat::EVENTS_LOST);
            break;
        };
        // Hide the range the compiler proved from it, so that it keeps the check the verifier
        // needs to see: `len` in 1..=CHUNK_LEN.
        // SAFETY: reads a local.
        let len = unsafe { core::ptr::read_volatile(&len) };
        if len == 0 || len > CHUNK_LEN as u32 {
            entry.discard(0);
            break;
        }
        let event = entry.as_mut_ptr();
        // SAFETY: `event` points at a reserved, writable record of the right size, and `len` is
        // at most the size of `data`.
        let loaded = unsafe {
            (*event).header =
                EventHeader { kind: EventKind::Chunk as u32, _pad: 0, cookie, ts_ns: now };
            (*event).offset = offset + start;
            (*event).len = len as u16;
            (*event).direction = direction as u8;
            (*event)._pad = 0;
            bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                seg.payload_offset + start,
                (*event).data.as_mut_ptr().cast(),
                len,
            )
        };
        if loaded != 0 {
            entry.discard(0);
            count(stat::CHUNK_ERRORS);
            break;
        }
        entry.submit(0);
        i += 1;
    }
}
