//! Types that cross the boundary between observer's kernel programs and its agent.
//!
//! Every type here is `#[repr(C)]`, made only of fixed-width integers and byte arrays, laid out
//! without implicit padding, and pinned by a size assertion, so that the BPF object and the agent
//! agree on it byte for byte whatever compiler builds either side.

#![no_std]

use core::mem::size_of;

pub mod frame;

use frame::StreamState;

/// Largest number of connection ends tracked at once in the kernel by default.
pub const DEFAULT_MAX_CONNS: u32 = 65_536;

/// Largest number of distinct server ports given with `--port`.
pub const MAX_WATCHED_PORTS: u32 = 1024;

/// Bytes of HTTP header copied to the agent per event.
pub const CHUNK_LEN: usize = 512;

/// Bytes of each direction's stream, from its start, that may be copied to the agent while the
/// agent looks for an HTTP upgrade. Headers longer than this are not recognised.
pub const HEADER_WINDOW: u32 = 16 * 1024;

/// The end of the connection a socket is.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Accepted on a listening socket.
    Server = 1,
    /// Connected out.
    Client = 2,
}

impl Role {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Server),
            2 => Some(Self::Client),
            _ => None,
        }
    }
}

/// Direction of bytes relative to the socket.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the peer to this socket.
    Ingress = 0,
    /// From this socket to the peer.
    Egress = 1,
}

/// `ConnState::flags` bits.
pub mod flags {
    /// The server port was given with `--port`.
    pub const WATCHED: u8 = 1 << 0;
    /// Stream bytes of the ingress direction are still copied to the agent.
    pub const FWD_INGRESS: u8 = 1 << 1;
    /// Stream bytes of the egress direction are still copied to the agent.
    pub const FWD_EGRESS: u8 = 1 << 2;
    /// The request direction opened with `G`, so the connection may be an HTTP upgrade.
    pub const HTTP_CANDIDATE: u8 = 1 << 3;
    /// The first byte of the request direction has been checked.
    pub const CLASSIFIED: u8 = 1 << 4;
    /// Found already open by the agent rather than seen being established: its state changes
    /// come from `tp_btf/inet_sock_set_state`, and its streams' starts are unknown.
    pub const ADOPTED: u8 = 1 << 5;
}

/// Per-socket state kept by the kernel programs, keyed by socket cookie in `CONNS`.
///
/// The application-side counters (`bytes_written`, `bytes_read`) start at zero when the
/// connection is established; the TCP-side counters are the kernel's own `bytes_acked` and
/// `bytes_received`, with their values at establishment kept as origins, so that the queues are
/// plain differences (see [`ConnState::send_queue`] and [`ConnState::recv_queue`]).
/// Times are `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`); zero means "never".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// When the three-way handshake completed.
    pub established_ns: u64,
    /// Last time the application wrote bytes into the socket.
    pub last_write_ns: u64,
    /// Last time the application read bytes out of the socket.
    pub last_read_ns: u64,
    /// Last time a segment carrying new data arrived from the peer.
    pub last_rx_ns: u64,
    /// Last time the peer acknowledged new data.
    pub last_ack_ns: u64,
    /// When the receive queue last went from empty to holding bytes.
    pub unread_since_ns: u64,
    /// Bytes the application wrote (accepted by `sendmsg`).
    pub bytes_written: u64,
    /// Bytes the application read (returned by `recvmsg`, peeks excluded).
    pub bytes_read: u64,
    /// The socket's `bytes_received`: bytes TCP received in order from the peer.
    pub tcp_bytes_received: u64,
    /// The socket's `bytes_acked`: bytes (and the SYN/FIN sequence numbers) the peer acknowledged.
    pub tcp_bytes_acked: u64,
    /// `tcp_bytes_received` when the connection was established.
    pub received_origin: u64,
    /// `tcp_bytes_acked` when the connection was established.
    pub acked_origin: u64,
    /// Sequence number of the first byte of each direction's stream: `[ingress, egress]`.
    pub stream_start: [u32; 2],
    /// Thread group of the last task that wrote to or read from the socket.
    pub pid: u32,
    /// Local and remote port, host order.
    pub local_port: u16,
    pub remote_port: u16,
    /// Local and remote address; IPv4 in the first four bytes when `family` is `AF_INET`.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// `comm` of the task in `pid`.
    pub comm: [u8; 16],
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// [`Role`] as its discriminant.
    pub role: u8,
    /// TCP state as the kernel numbers it (`TCP_ESTABLISHED` = 1, ...).
    pub tcp_state: u8,
    /// Bits from [`flags`].
    pub flags: u8,
    /// Bits from [`ends`]: how the connection ended.
    pub ends: u8,
    pub _pad: [u8; 2],
    /// Last time any segment arrived from the peer (data, ACK or window probe answer).
    pub last_ingress_ns: u64,
    /// When the send queue last went from empty to holding bytes.
    pub unacked_since_ns: u64,
    /// Last time the socket's retransmission count grew.
    pub last_retrans_ns: u64,
    /// Since when the peer advertises a zero receive window; zero while it does not.
    pub zero_window_since_ns: u64,
    /// Last TCP state change.
    pub state_changed_ns: u64,
    /// The socket's `total_retrans`: segments retransmitted.
    pub total_retrans: u32,
    /// Times the peer's window closed to zero.
    pub zero_window_events: u32,
    /// The peer's last advertised window, as on the wire (before scaling).
    pub peer_window: u32,
    /// Segments in flight when the connection reached `TCP_CLOSE`.
    pub final_packets_out: u32,
}

const _: () = assert!(size_of::<ConnState>() == 224);

impl ConnState {
    /// Bytes the peer acknowledged since establishment.
    pub const fn bytes_acked(&self) -> u64 {
        self.tcp_bytes_acked.saturating_sub(self.acked_origin)
    }

    /// Bytes TCP received from the peer since establishment. The kernel's count includes the
    /// sequence number the peer's FIN takes; it is not a byte.
    pub const fn bytes_received(&self) -> u64 {
        let fin = (self.ends & ends::FIN_RECEIVED != 0) as u64;
        self.tcp_bytes_received.saturating_sub(self.received_origin).saturating_sub(fin)
    }

    /// Bytes written by the application and not yet acknowledged by the peer.
    #[inline(always)]
    pub const fn send_queue(&self) -> u64 {
        self.bytes_written.saturating_sub(self.bytes_acked())
    }

    /// Bytes received from the peer and not yet read by the application.
    pub const fn recv_queue(&self) -> u64 {
        self.bytes_received().saturating_sub(self.bytes_read)
    }
}

/// Kinds of event sent through the `EVENTS` ring buffer.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TCP connection was established; carries a [`ConnEvent`].
    Open = 1,
    /// A tracked connection reached `TCP_CLOSE`; carries a [`ConnEvent`] with the final state.
    Close = 2,
    /// Stream bytes from the start of a connection; carries a [`ChunkEvent`].
    Chunk = 3,
    /// A control frame; carries a [`FrameEvent`].
    Frame = 4,
}

impl EventKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Open),
            2 => Some(Self::Close),
            3 => Some(Self::Chunk),
            4 => Some(Self::Frame),
            _ => None,
        }
    }
}

/// Header at the start of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// [`EventKind`] as its discriminant.
    pub kind: u32,
    pub _pad: u32,
    /// Socket cookie of the connection end.
    pub cookie: u64,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
}

const _: () = assert!(size_of::<EventHeader>() == 24);

/// Frame tracking of one connection end, keyed by socket cookie in `FRAMES`: one
/// [`StreamState`] per [`Direction`], indexed by its discriminant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WsState {
    pub dir: [StreamState; 2],
}

const _: () = assert!(size_of::<WsState>() == 320);

/// An open or close event: the connection's state at that moment. `frames` is all zero when the
/// connection had no frame tracking.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub state: ConnState,
    pub frames: WsState,
}

const _: () = assert!(size_of::<ConnEvent>() == 24 + 224 + 320);

/// A control frame (ping, pong or close) seen on a tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameEvent {
    pub header: EventHeader,
    pub payload_len: u64,
    /// Close frames: the status code (1005 when absent).
    pub close_code: u16,
    pub opcode: u8,
    /// [`Direction`] as its discriminant.
    pub direction: u8,
    pub fin: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<FrameEvent>() == 24 + 16);

/// Bytes copied from the start of one direction of a connection's stream.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkEvent {
    pub header: EventHeader,
    /// Offset of `data[0]` from the start of the direction's stream.
    pub offset: u32,
    /// Valid bytes in `data`.
    pub len: u16,
    /// [`Direction`] as its discriminant.
    pub direction: u8,
    pub _pad: u8,
    pub data: [u8; CHUNK_LEN],
}

const _: () = assert!(size_of::<ChunkEvent>() == 24 + 8 + CHUNK_LEN);

/// `ConnState::ends` bits.
pub mod ends {
    /// This end sent a reset.
    pub const RST_SENT: u8 = 1 << 0;
    /// This end received a reset.
    pub const RST_RECEIVED: u8 = 1 << 1;
    /// The peer sent FIN.
    pub const FIN_RECEIVED: u8 = 1 << 2;
}

/// Indexes into the per-CPU `STATS` array of kernel-side counters.
pub mod stat {
    /// An event could not be reserved in the ring buffer and was lost.
    pub const EVENTS_LOST: u32 = 0;
    /// A new connection could not be tracked because `CONNS` was full.
    pub const CONNS_FULL: u32 = 1;
    /// Header bytes that could not be copied (load failure).
    pub const CHUNK_ERRORS: u32 = 2;
    /// A connection's frames could not be tracked because `FRAMES` was full.
    pub const FRAMES_FULL: u32 = 3;
    pub const COUNT: u32 = 4;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is `repr(C)`, made of integers and byte arrays, with no padding (checked
    // by the size assertions above), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::ConnState {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::ConnEvent {}
    unsafe impl aya::Pod for super::ChunkEvent {}
    unsafe impl aya::Pod for super::WsState {}
    unsafe impl aya::Pod for super::FrameEvent {}
}
