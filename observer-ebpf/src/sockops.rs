//! Connection lifecycle from `sock_ops` on the cgroup v2 root.
//!
//! `BPF_SOCK_OPS_{ACTIVE,PASSIVE}_ESTABLISHED_CB` fire once per connection when the three-way
//! handshake completes: active for the end that connected out (client), passive for the end
//! accepted on a listener (server). There the entry is created and three more callbacks are
//! switched on for that socket: every state change down to `TCP_CLOSE` (`STATE_CB`), every
//! retransmission (`RETRANS_CB`) and every retransmission timeout (`RTO_CB`), the evidence that
//! a peer stopped answering.
//!
//! Fields read, all from `struct bpf_sock_ops`, a UAPI context the kernel translates into its
//! own socket layout at load time, so they hold on any kernel with these callbacks (4.17+):
//! `family`, `local_ip4/6`, `remote_ip4/6`, `local_port` (host order), `remote_port` (network
//! order in the upper 16 bits), `snd_nxt`, `rcv_nxt`, `bytes_acked`, `bytes_received`,
//! `is_fullsock`, `packets_out`, `total_retrans`, `args[1]` (the new state).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RETRANS_CB, BPF_SOCK_OPS_RETRANS_CB_FLAG, BPF_SOCK_OPS_RTO_CB,
        BPF_SOCK_OPS_RTO_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{btf_tracepoint, sock_ops},
    programs::{BtfTracePointContext, SockOpsContext},
};
use observer_common::{ConnState, EventKind, Role, ends, flags, stat};

use crate::{CONNS, FRAMES, STOP_FWD, WATCHED_PORTS, count, emit_conn};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_CLOSING: u32 = 11;

#[sock_ops]
pub fn observer_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx, Role::Client),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(&ctx, Role::Server),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
        BPF_SOCK_OPS_RETRANS_CB => retransmitted(&ctx, ctx.arg(1), ctx.arg(2)),
        BPF_SOCK_OPS_RTO_CB => retransmitted(&ctx, 0, 0),
        _ => {}
    }
    1
}

#[inline(always)]
fn established(ctx: &SockOpsContext, role: Role) {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    let ops = ctx.ops;
    // SAFETY: `ops` is the program's context, valid for the whole run.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    let mut state =
        ConnState { established_ns: now, state_changed_ns: now, ..ConnState::default() };
    // SAFETY: plain context field reads, rewritten by the verifier.
    unsafe {
        state.tcp_bytes_acked = (*ops).bytes_acked;
        state.acked_origin = (*ops).bytes_acked;
        state.tcp_bytes_received = (*ops).bytes_received;
        state.received_origin = (*ops).bytes_received;
        state.stream_start = [(*ops).rcv_nxt, (*ops).snd_nxt];
    }
    state.local_port = ctx.local_port() as u16;
    state.remote_port = u16::from_be((ctx.remote_port() >> 16) as u16);
    if family == AF_INET {
        state.local_addr[..4].copy_from_slice(&ctx.local_ip4().to_ne_bytes());
        state.remote_addr[..4].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
    } else {
        for i in 0..4 {
            // The verifier allows only 4-byte loads of these words: read them one by one, where
            // the compiler would otherwise merge neighbours into 8-byte loads.
            // SAFETY: in-bounds context field reads.
            let (local, remote) = unsafe {
                (
                    core::ptr::read_volatile(&raw const (*ops).local_ip6[i]),
                    core::ptr::read_volatile(&raw const (*ops).remote_ip6[i]),
                )
            };
            state.local_addr[i * 4..i * 4 + 4].copy_from_slice(&local.to_ne_bytes());
            state.remote_addr[i * 4..i * 4 + 4].copy_from_slice(&remote.to_ne_bytes());
        }
    }
    state.family = family as u16;
    state.role = role as u8;
    state.tcp_state = TCP_ESTABLISHED;

    let server_port = match role {
        Role::Server => state.local_port,
        Role::Client => state.remote_port,
    };
    // SAFETY: the value is copied out at once and never kept.
    let watched = unsafe { WATCHED_PORTS.get(server_port) }.is_some();
    state.flags = flags::FWD_INGRESS | flags::FWD_EGRESS;
    if watched {
        state.flags |= flags::WATCHED;
    }

    if CONNS.insert(cookie, state, BPF_NOEXIST as u64).is_err() {
        count(stat::CONNS_FULL);
        return;
    }
    // Ask for this socket's state changes, retransmissions and retransmission timeouts, keeping
    // whatever callbacks others asked for.
    let wanted =
        BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RETRANS_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;
    let _ = ctx.set_cb_flags((ctx.cb_flags() | wanted) as i32);
    if watched {
        emit_conn(EventKind::Open, cookie, now, &state);
    }
}

#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // SAFETY: `ops` is the program's context, valid for the whole run.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let Some(state) = CONNS.get_ptr_mut(cookie) else {
        return;
    };
    let new_state = ctx.arg(1);
    // SAFETY: `state` comes from a successful map lookup and stays valid during this run;
    // the context fields are rewritten by the verifier.
    unsafe {
        if (*ops).is_fullsock != 0 {
            (*state).tcp_bytes_acked = (*ops).bytes_acked;
            (*state).tcp_bytes_received = (*ops).bytes_received;
            if (*ops).total_retrans > (*state).total_retrans {
                (*state).total_retrans = (*ops).total_retrans;
            }
            if new_state == TCP_CLOSE {
                (*state).final_packets_out = (*ops).packets_out;
            }
        }
    }
    record_state(cookie, state, new_state);
}

/// Records a state change. At `TCP_CLOSE`, sends the close event of a connection that may be
/// reported and forgets the connection.
#[inline(always)]
fn record_state(cookie: u64, state: *mut ConnState, new_state: u32) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `state` comes from a successful map lookup made in this same run.
    unsafe {
        (*state).tcp_state = new_state as u8;
        (*state).state_changed_ns = now;
        if new_state == TCP_CLOSE_WAIT || new_state == TCP_CLOSING {
            (*state).ends |= ends::FIN_RECEIVED;
        }
    }
    if new_state != TCP_CLOSE {
        return;
    }
    let may_be_reported = flags::WATCHED | flags::HTTP_CANDIDATE | flags::ADOPTED;
    // SAFETY: as above.
    if unsafe { (*state).flags } & may_be_reported != 0 {
        // SAFETY: as above.
        emit_conn(EventKind::Close, cookie, now, unsafe { &*state });
    }
    let _ = CONNS.remove(cookie);
    let _ = FRAMES.remove(cookie);
    let _ = STOP_FWD.remove(cookie);
}

/// `segs` segments were retransmitted (`err` zero when they left), or the retransmission timer
/// fired (`segs` zero).
#[inline(always)]
fn retransmitted(ctx: &SockOpsContext, segs: u32, err: u32) {
    let ops = ctx.ops;
    // SAFETY: `ops` is the program's context, valid for the whole run.
    let cookie = unsafe { bpf_get_socket_cookie(ops.cast()) };
    let Some(state) = CONNS.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `state` comes from a successful map lookup and stays valid during this run; the
    // context field is rewritten by the verifier.
    unsafe {
        (*state).last_retrans_ns = now;
        // The socket adds these segments to `total_retrans` only after this callback returns.
        let sent = if err == 0 { segs } else { 0 };
        let socket = if (*ops).is_fullsock != 0 { (*ops).total_retrans + sent } else { 0 };
        if socket > (*state).total_retrans {
            (*state).total_retrans = socket;
        }
    }
}

/// `tp_btf/inet_sock_set_state`, `TP_PROTO(const struct sock *sk, const int oldstate,
/// const int newstate)`: state changes of connections the agent adopted, which never had the
/// `sock_ops` state callback switched on. Connections seen being established are left to
/// `STATE_CB`.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn observer_adopted_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *mut c_void = ctx.arg(0);
    let new_state = ctx.arg::<u64>(2) as u32;
    // SAFETY: `sk` is the tracepoint's typed `struct sock *`; the helper accepts NULL.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let Some(state) = CONNS.get_ptr_mut(cookie) else {
        return 0;
    };
    // SAFETY: `state` comes from a successful map lookup and stays valid during this run.
    if unsafe { (*state).flags } & flags::ADOPTED != 0 {
        record_state(cookie, state, new_state);
    }
    0
}
