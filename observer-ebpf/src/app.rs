//! What the application writes and reads, from `tp_btf/sock_send_length` and
//! `tp_btf/sock_recv_length`.
//!
//! The kernel fires these tracepoints in `sock_sendmsg_nosec` / `sock_recvmsg_nosec`, after the
//! protocol's `sendmsg` / `recvmsg` returned, with `TP_PROTO(struct sock *sk, int ret,
//! int flags)` (Linux 6.3+). Every path that hands bytes to or takes bytes from a socket
//! through the socket layer passes there: `write`, `send*`, `read`, `recv*`, `sendfile` and
//! `splice` into a socket (6.5+), io_uring. `ret` is what the call really moved, so a failed or
//! partial send (`EAGAIN`) counts for what it moved and no more; reads with `MSG_PEEK` move
//! nothing and are skipped.
//!
//! The resets a socket sends and receives come from `tp_btf/tcp_send_reset` and
//! `tp_btf/tcp_receive_reset`, and tell how a connection ended.
//!
//! Only the tracepoints' own arguments are read, never a field of `struct sock`: the socket is
//! identified by `bpf_get_socket_cookie`, which takes the typed pointer.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use observer_common::{ConnState, ends};

use crate::CONNS;

const MSG_PEEK: u64 = 2;

#[btf_tracepoint(function = "sock_send_length")]
pub fn observer_send(ctx: BtfTracePointContext) -> i32 {
    let Some((cookie, moved)) = moved(&ctx) else {
        return 0;
    };
    let Some(state) = CONNS.get_ptr_mut(cookie) else {
        return 0;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    // SAFETY: `state` comes from a successful map lookup and stays valid during this run.
    // The BPF target has no 64-bit fetch-add in Rust's `core`, so two threads sending on the same
    // socket at the same instant could lose one addition; the socket layer serialises the sends
    // themselves, which makes that window a few instructions wide.
    unsafe {
        if (*state).send_queue() == 0 {
            (*state).unacked_since_ns = now;
        }
        (*state).bytes_written += moved;
        (*state).last_write_ns = now;
    }
    note_owner(state);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn observer_recv(ctx: BtfTracePointContext) -> i32 {
    let flags: u64 = ctx.arg(2);
    if flags & MSG_PEEK != 0 {
        return 0;
    }
    let Some((cookie, moved)) = moved(&ctx) else {
        return 0;
    };
    let Some(state) = CONNS.get_ptr_mut(cookie) else {
        return 0;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    // SAFETY: as in `observer_send`.
    unsafe {
        (*state).bytes_read += moved;
        (*state).last_read_ns = now;
        if (*state).bytes_read >= (*state).bytes_received() {
            (*state).unread_since_ns = 0;
        }
    }
    note_owner(state);
    0
}

/// The socket's cookie and the bytes the call moved, when it moved any.
#[inline(always)]
fn moved(ctx: &BtfTracePointContext) -> Option<(u64, u64)> {
    let sk: *mut c_void = ctx.arg(0);
    // `ret` is an `int` widened without sign extension into a 64-bit slot.
    let ret = ctx.arg::<u64>(1) as u32 as i32;
    if ret <= 0 {
        return None;
    }
    // SAFETY: `sk` is the tracepoint's typed `struct sock *`; the helper accepts NULL.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    Some((cookie, ret as u64))
}

/// Records the task's process as the socket's owner when it changed since the last call.
#[inline(always)]
fn note_owner(state: *mut ConnState) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: `state` comes from a successful map lookup and stays valid during this run.
    unsafe {
        if (*state).pid == tgid {
            return;
        }
        (*state).pid = tgid;
        if let Ok(comm) = bpf_get_current_comm() {
            (*state).comm = comm;
        }
    }
}

/// `tp_btf/tcp_receive_reset`, `TP_PROTO(struct sock *sk)`: the socket received a reset.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn observer_rst_in(ctx: BtfTracePointContext) -> i32 {
    mark_end(&ctx, ends::RST_RECEIVED);
    0
}

/// `tp_btf/tcp_send_reset`, `TP_PROTO(const struct sock *sk, const struct sk_buff *skb, ...)`:
/// a reset left on behalf of the socket (`sk` is NULL for resets to segments of no socket).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn observer_rst_out(ctx: BtfTracePointContext) -> i32 {
    mark_end(&ctx, ends::RST_SENT);
    0
}

#[inline(always)]
fn mark_end(ctx: &BtfTracePointContext, bit: u8) {
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's typed `struct sock *`; the helper accepts NULL.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if let Some(state) = CONNS.get_ptr_mut(cookie) {
        // SAFETY: `state` comes from a successful map lookup and stays valid during this run.
        unsafe { (*state).ends |= bit };
    }
}
