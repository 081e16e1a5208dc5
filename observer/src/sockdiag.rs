//! A snapshot of the host's TCP sockets, read from the kernel through `sock_diag` netlink in every
//! network namespace.
//!
//! The kernel programs only learn about a socket when it does something after the agent starts;
//! this module lists the ones that already exist. For each socket it gives the cookie (the value
//! `bpf_get_socket_cookie` returns, so entries join the kernel maps), addresses, TCP state, queue
//! sizes, owner and a few `tcp_info` counters. A netlink socket answers for the network namespace
//! it was created in, so each other namespace is dumped from a short-lived thread that joins it
//! with `setns` first; the calling thread never changes namespace. Namespaces are found through
//! `/proc/*/ns/net` and `/run/netns`, so in a container the agent needs the host's pid namespace
//! to see them all.
//!
//! Cost: the kernel keeps one table of connected TCP sockets for the whole host, and a dump walks
//! all of it, keeping the sockets of the netlink socket's namespace. A scan of every namespace
//! therefore costs about (namespaces × sockets of the host), not the sum of the namespaces' own
//! sockets, unless namespaces get their own table (sysctl `net.ipv4.tcp_child_ehash_entries`).
//!
//! Privileges: dumping the caller's own namespace needs none, as for `ss`. Reaching other
//! namespaces needs CAP_SYS_ADMIN (for `setns`, in the caller's user namespace and in the one
//! owning the target) and, to read `/proc/PID/ns/net` of other users' processes, CAP_SYS_PTRACE;
//! root has both. CAP_NET_ADMIN is not needed: the kernel only asks for it before adding a
//! socket's mark to the answer, or to destroy sockets, and this module does neither.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs, io,
    net::{IpAddr, SocketAddr, SocketAddrV6},
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    thread,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use tracing::debug;

/// Receive buffer for one datagram. The kernel fills dump datagrams up to 32 KiB at most.
const RECV_BUFFER: usize = 64 * 1024;
/// Netlink messages start on 4-byte boundaries (`NLMSG_ALIGNTO`).
const NLMSG_ALIGNTO: usize = 4;
/// Where bind-mounted namespaces live (`ip netns add`).
const NAMED_NAMESPACES: &str = "/run/netns";

/// Why sockets could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    /// The `sock_diag` netlink socket could not be opened, bound or connected.
    #[error("cannot open a sock_diag netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The dump request could not be sent.
    #[error("cannot send the sock_diag request: {0}")]
    Send(#[source] io::Error),
    /// Reading the kernel's answer failed.
    #[error("cannot read the sock_diag answer: {0}")]
    Receive(#[source] io::Error),
    /// The kernel answered the request with an error.
    #[error("the kernel refused the sock_diag request: {0}")]
    Kernel(#[source] io::Error),
    /// A datagram was longer than the receive buffer, so part of it was lost.
    #[error("a sock_diag datagram of {len} bytes did not fit the {RECV_BUFFER}-byte buffer")]
    Truncated { len: usize },
    /// The answer is not a well-formed netlink message.
    #[error("malformed sock_diag answer: {0}")]
    Decode(String),
    /// A `/proc` file the scan starts from could not be read.
    #[error("cannot read {path}: {source}")]
    Proc { path: PathBuf, source: io::Error },
    /// A namespace file could not be opened: its process exited, or permission was denied.
    #[error("cannot open network namespace {path}: {source}")]
    OpenNamespace { path: PathBuf, source: io::Error },
    /// The file names another namespace than when it was listed: its process exited and the
    /// pid was reused.
    #[error("{path} now names network namespace {found}, not {expected}")]
    NamespaceChanged { path: PathBuf, expected: u64, found: u64 },
    /// No file was given to open the namespace by.
    #[error("no file names network namespace {inode}")]
    NoPath { inode: u64 },
    /// Joining the namespace failed (EPERM without CAP_SYS_ADMIN).
    #[error("cannot enter network namespace {inode} (this needs CAP_SYS_ADMIN): {source}")]
    Setns { inode: u64, source: io::Error },
    /// No thread could be started to enter a namespace.
    #[error("cannot start a thread to enter a network namespace: {0}")]
    Spawn(#[source] io::Error),
    /// The thread that dumped a namespace panicked.
    #[error("the thread dumping network namespace {inode} panicked")]
    WorkerPanicked { inode: u64 },
}

/// One TCP socket as the kernel reports it (`struct inet_diag_msg` and its attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    /// The socket cookie (`idiag_cookie`): the value `bpf_get_socket_cookie` returns, unique on
    /// this host until reboot.
    pub cookie: u64,
    /// `AF_INET` or `AF_INET6`. An IPv6 socket talking IPv4 keeps `AF_INET6` and reports
    /// IPv4-mapped addresses.
    pub family: u16,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's TCP state number (`TCP_ESTABLISHED` is 1, see `include/net/tcp_states.h`).
    pub state: u8,
    /// Bytes received and not yet read by the application (`idiag_rqueue`).
    pub recv_queue: u32,
    /// Bytes written and not yet acknowledged by the peer, sent or not (`idiag_wqueue`).
    pub send_queue: u32,
    /// Inode of the socket (as in `/proc/PID/fd/N -> socket:[INODE]`); 0 once no file refers to
    /// it (closed by the application, still draining).
    pub inode: u64,
    /// The socket's owner, as `ss -e` shows it: the user that created it (for an accepted
    /// socket, the listener's).
    pub uid: u32,
    /// Inode of the network namespace the socket belongs to (as in `net:[INODE]`).
    pub netns_inode: u64,
    /// Counters from the kernel's `tcp_info`, when it sent them.
    pub info: Option<TcpInfoLite>,
}

/// Some fields of the kernel's `struct tcp_info` (`linux/tcp.h`) for one socket, as of the dump.
///
/// The `*_ms` fields are ages: milliseconds from the event to the dump. Fields that older kernels
/// do not send are `None` when the attribute ends before them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfoLite {
    /// Retransmission timeouts in a row without progress (`tcpi_retransmits`).
    pub retransmits: u8,
    /// Unanswered zero-window or keepalive probes (`tcpi_probes`).
    pub probes: u8,
    /// Exponential backoff of the retransmission timer (`tcpi_backoff`).
    pub backoff: u8,
    /// Segments sent and not yet acknowledged (`tcpi_unacked`).
    pub unacked: u32,
    /// Age of the last data segment sent (`tcpi_last_data_sent`).
    pub last_data_sent_ms: u32,
    /// Age of the last data segment received (`tcpi_last_data_recv`).
    pub last_data_recv_ms: u32,
    /// Age of the last acknowledgement received (`tcpi_last_ack_recv`).
    pub last_ack_recv_ms: u32,
    /// Smoothed round-trip time in microseconds (`tcpi_rtt`).
    pub rtt_us: u32,
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    pub total_retrans: u32,
    /// Bytes the peer acknowledged (`tcpi_bytes_acked`).
    pub bytes_acked: Option<u64>,
    /// Bytes received in order (`tcpi_bytes_received`).
    pub bytes_received: Option<u64>,
    /// Bytes written by the application and not yet sent (`tcpi_notsent_bytes`).
    pub notsent_bytes: Option<u32>,
    /// Bytes sent, retransmissions included (`tcpi_bytes_sent`).
    pub bytes_sent: Option<u64>,
    /// The peer's advertised receive window in bytes, after scaling (`tcpi_snd_wnd`).
    pub snd_wnd: Option<u32>,
}

/// Byte offsets in `struct tcp_info` (`linux/tcp.h`). The struct is naturally aligned, only
/// grows at its end, and is sent in host byte order.
mod tcp_info {
    pub const RETRANSMITS: usize = 2; // __u8 tcpi_retransmits
    pub const PROBES: usize = 3; // __u8 tcpi_probes
    pub const BACKOFF: usize = 4; // __u8 tcpi_backoff
    pub const UNACKED: usize = 24; // __u32 tcpi_unacked
    pub const LAST_DATA_SENT: usize = 44; // __u32 tcpi_last_data_sent
    pub const LAST_DATA_RECV: usize = 52; // __u32 tcpi_last_data_recv
    pub const LAST_ACK_RECV: usize = 56; // __u32 tcpi_last_ack_recv
    pub const RTT: usize = 68; // __u32 tcpi_rtt
    pub const TOTAL_RETRANS: usize = 100; // __u32 tcpi_total_retrans
    /// The end of `tcpi_total_retrans`, the oldest layout still in use: shorter is malformed.
    pub const MIN_LEN: usize = 104;
    pub const BYTES_ACKED: usize = 120; // __u64 tcpi_bytes_acked
    pub const BYTES_RECEIVED: usize = 128; // __u64 tcpi_bytes_received
    pub const NOTSENT_BYTES: usize = 144; // __u32 tcpi_notsent_bytes
    pub const BYTES_SENT: usize = 200; // __u64 tcpi_bytes_sent
    pub const SND_WND: usize = 228; // __u32 tcpi_snd_wnd
}

impl TcpInfoLite {
    /// Reads the `INET_DIAG_INFO` attribute; `None` if it is shorter than the oldest layout.
    fn parse(bytes: &[u8]) -> Option<Self> {
        use tcp_info::*;
        if bytes.len() < MIN_LEN {
            return None;
        }
        Some(Self {
            retransmits: bytes[RETRANSMITS],
            probes: bytes[PROBES],
            backoff: bytes[BACKOFF],
            unacked: u32_at(bytes, UNACKED)?,
            last_data_sent_ms: u32_at(bytes, LAST_DATA_SENT)?,
            last_data_recv_ms: u32_at(bytes, LAST_DATA_RECV)?,
            last_ack_recv_ms: u32_at(bytes, LAST_ACK_RECV)?,
            rtt_us: u32_at(bytes, RTT)?,
            total_retrans: u32_at(bytes, TOTAL_RETRANS)?,
            bytes_acked: u64_at(bytes, BYTES_ACKED),
            bytes_received: u64_at(bytes, BYTES_RECEIVED),
            notsent_bytes: u32_at(bytes, NOTSENT_BYTES),
            bytes_sent: u64_at(bytes, BYTES_SENT),
            snd_wnd: u32_at(bytes, SND_WND),
        })
    }
}

/// The host-order `u32` at `offset`, if the bytes reach its end.
fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(offset..offset + 4)?.try_into().ok()?))
}

/// The host-order `u64` at `offset`, if the bytes reach its end.
fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(bytes.get(offset..offset + 8)?.try_into().ok()?))
}

/// `idiag_cookie` is two `u32` in host order, the low half first (`sock_diag_save_cookie`).
fn cookie_from(raw: [u8; 8]) -> u64 {
    let low = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let high = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(high) << 32) | u64::from(low)
}

/// The address of one end; the interface only scopes IPv6 link-local addresses.
fn socket_addr(ip: IpAddr, port: u16, interface: u32) -> SocketAddr {
    match ip {
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            SocketAddr::V6(SocketAddrV6::new(v6, port, 0, interface))
        }
        ip => SocketAddr::new(ip, port),
    }
}

impl TcpSocket {
    fn from_response(response: &InetResponse, netns_inode: u64) -> Self {
        let header = &response.header;
        let id = &header.socket_id;
        let info = response.nlas.iter().find_map(|nla| match nla {
            Nla::TcpInfo(bytes) => TcpInfoLite::parse(bytes),
            _ => None,
        });
        Self {
            cookie: cookie_from(id.cookie),
            family: u16::from(header.family),
            local: socket_addr(id.source_address, id.source_port, id.interface_id),
            remote: socket_addr(id.destination_address, id.destination_port, id.interface_id),
            state: header.state,
            recv_queue: header.recv_queue,
            send_queue: header.send_queue,
            inode: u64::from(header.inode),
            uid: header.uid,
            netns_inode,
            info,
        }
    }
}

/// The states dumped: every connected state. Listeners, half-open connections (`SYN_SENT`,
/// `SYN_RECV`) and `TIME_WAIT` remnants are left out.
fn dumped_states() -> StateFlags {
    StateFlags::ESTABLISHED
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING
}

/// The dump request for one address family, with `tcp_info` asked for.
fn request(family: u8, sequence: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let socket_id = if family == AF_INET6 { SocketId::new_v6() } else { SocketId::new_v4() };
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::INFO,
            states: dumped_states(),
            socket_id,
        })
        .into(),
    );
    message.finalize();
    let mut buffer = vec![0; message.buffer_len()];
    message.serialize(&mut buffer);
    buffer
}

/// Whether a dump goes on after a datagram.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

/// Adds the sockets of one datagram of the answer to `sequence` to `out`.
///
/// Messages of other requests are ignored. A socket message the crate cannot decode is skipped
/// (and logged) rather than failing the dump.
fn parse_datagram(
    datagram: &[u8],
    sequence: u32,
    netns_inode: u64,
    out: &mut Vec<TcpSocket>,
) -> Result<Progress, SockDiagError> {
    let mut offset = 0;
    while offset < datagram.len() {
        let rest = &datagram[offset..];
        let framing =
            NetlinkBuffer::new_checked(rest).map_err(|e| SockDiagError::Decode(e.to_string()))?;
        let length = framing.length() as usize;
        let (message_type, message_sequence) = (framing.message_type(), framing.sequence_number());
        offset += length.next_multiple_of(NLMSG_ALIGNTO);
        if message_sequence != sequence {
            continue;
        }
        let message = match NetlinkMessage::<SockDiagMessage>::deserialize(&rest[..length]) {
            Ok(message) => message,
            Err(error) if message_type == SOCK_DIAG_BY_FAMILY => {
                debug!(%error, "skipping a socket the kernel described in an unknown way");
                continue;
            }
            Err(error) => return Err(SockDiagError::Decode(error.to_string())),
        };
        match message.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                out.push(TcpSocket::from_response(&response, netns_inode));
            }
            NetlinkPayload::Done(_) => return Ok(Progress::Done),
            NetlinkPayload::Error(error) => {
                if let Some(code) = error.code {
                    // The kernel sends a negative errno.
                    let errno = code.get().saturating_neg();
                    return Err(SockDiagError::Kernel(io::Error::from_raw_os_error(errno)));
                }
            }
            NetlinkPayload::Overrun(_) => {
                return Err(SockDiagError::Decode("the kernel reported an overrun".into()));
            }
            _ => {}
        }
    }
    Ok(Progress::More)
}

/// Reads one datagram into `buffer`, returning its length.
fn receive(socket: &Socket, buffer: &mut [u8]) -> Result<usize, SockDiagError> {
    let capacity = buffer.len();
    loop {
        let mut window = &mut buffer[..];
        // MSG_TRUNC makes the kernel return the datagram's full length, to detect truncation.
        match socket.recv(&mut window, libc::MSG_TRUNC) {
            Ok(len) if len > capacity => return Err(SockDiagError::Truncated { len }),
            Ok(len) => return Ok(len),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(SockDiagError::Receive(error)),
        }
    }
}

/// Dumps the namespace the calling thread is in, labelling sockets with `netns_inode`.
fn dump_here(netns_inode: u64) -> Result<Vec<TcpSocket>, SockDiagError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Socket)?;
    socket.bind_auto().map_err(SockDiagError::Socket)?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0)).map_err(SockDiagError::Socket)?;
    let mut sockets = Vec::new();
    let mut buffer = vec![0; RECV_BUFFER];
    for (sequence, family) in [(1, AF_INET), (2, AF_INET6)] {
        let message = request(family, sequence);
        let sent = socket.send(&message, 0).map_err(SockDiagError::Send)?;
        if sent != message.len() {
            return Err(SockDiagError::Send(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", message.len()),
            )));
        }
        loop {
            let len = receive(&socket, &mut buffer)?;
            if parse_datagram(&buffer[..len], sequence, netns_inode, &mut sockets)?
                == Progress::Done
            {
                break;
            }
        }
    }
    Ok(sockets)
}

/// Inode of the calling thread's network namespace.
fn current_namespace_inode() -> Result<u64, SockDiagError> {
    let path = Path::new("/proc/thread-self/ns/net");
    fs::metadata(path)
        .map(|metadata| metadata.ino())
        .map_err(|source| SockDiagError::Proc { path: path.into(), source })
}

/// The TCP sockets of the calling thread's network namespace. Needs no privileges.
#[cfg(test)]
pub fn dump_current_namespace() -> Result<Vec<TcpSocket>, SockDiagError> {
    dump_here(current_namespace_inode()?)
}

/// A network namespace of the host and the files that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// As in `net:[INODE]`.
    pub inode: u64,
    /// `/run/netns` bind mounts first, then `/proc/PID/ns/net` of the processes in it.
    pub paths: Vec<PathBuf>,
}

/// The inode in a namespace link's text, `net:[INODE]`.
fn parse_namespace_link(target: &OsStr) -> Option<u64> {
    let text = std::str::from_utf8(target.as_bytes()).ok()?;
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Every network namespace that a process is in or that is bind-mounted in `/run/netns`, once
/// each. Processes whose namespace cannot be read (exited, or another user's without
/// CAP_SYS_PTRACE) are passed over.
pub fn list_namespaces() -> Result<Vec<Namespace>, SockDiagError> {
    let mut namespaces: Vec<Namespace> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut add = |inode: u64, path: PathBuf| match index.get(&inode) {
        Some(&at) => namespaces[at].paths.push(path),
        None => {
            index.insert(inode, namespaces.len());
            namespaces.push(Namespace { inode, paths: vec![path] });
        }
    };

    // Namespace files all live on the nsfs device; a leftover plain file in /run/netns does not.
    let own = Path::new("/proc/thread-self/ns/net");
    let nsfs_device =
        fs::metadata(own).map_err(|source| SockDiagError::Proc { path: own.into(), source })?.dev();
    if let Ok(entries) = fs::read_dir(NAMED_NAMESPACES) {
        for entry in entries.flatten() {
            let path = entry.path();
            if let Ok(metadata) = fs::metadata(&path)
                && metadata.dev() == nsfs_device
            {
                add(metadata.ino(), path);
            }
        }
    }

    let proc = Path::new("/proc");
    let entries =
        fs::read_dir(proc).map_err(|source| SockDiagError::Proc { path: proc.into(), source })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.is_empty() || !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let path = proc.join(&name).join("ns/net");
        if let Some(inode) =
            fs::read_link(&path).ok().and_then(|t| parse_namespace_link(t.as_ref()))
        {
            add(inode, path);
        }
    }
    Ok(namespaces)
}

/// Dumps `namespace` from a thread that joins it, trying each of its files in turn.
fn dump_namespace(namespace: &Namespace) -> Result<Vec<TcpSocket>, SockDiagError> {
    let mut last_error = None;
    for path in &namespace.paths {
        let file = match fs::File::open(path) {
            Ok(file) => file,
            Err(source) => {
                last_error = Some(SockDiagError::OpenNamespace { path: path.clone(), source });
                continue;
            }
        };
        let found = match file.metadata() {
            Ok(metadata) => metadata.ino(),
            Err(source) => {
                last_error = Some(SockDiagError::OpenNamespace { path: path.clone(), source });
                continue;
            }
        };
        if found != namespace.inode {
            last_error = Some(SockDiagError::NamespaceChanged {
                path: path.clone(),
                expected: namespace.inode,
                found,
            });
            continue;
        }
        let inode = namespace.inode;
        let worker = thread::Builder::new()
            .name("sockdiag-netns".into())
            .spawn(move || {
                // SAFETY: `file` is an open namespace file for the whole call, and setns only
                // changes the network namespace of this thread, which ends when the closure
                // returns; no other thread is affected.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(SockDiagError::Setns { inode, source: io::Error::last_os_error() });
                }
                drop(file);
                dump_here(inode)
            })
            .map_err(SockDiagError::Spawn)?;
        return worker.join().map_err(|_| SockDiagError::WorkerPanicked { inode })?;
    }
    Err(last_error.unwrap_or(SockDiagError::NoPath { inode: namespace.inode }))
}

/// The sockets of every namespace that could be dumped, and why the others could not.
#[derive(Debug)]
pub struct Scan {
    pub sockets: Vec<TcpSocket>,
    /// Namespaces dumped, the caller's own included.
    pub namespaces: usize,
    /// Namespaces passed over: their inode and the error.
    pub skipped: Vec<(u64, SockDiagError)>,
}

/// Dumps every network namespace of the host, each on its own short-lived thread; the caller's
/// own namespace is dumped on the calling thread. Failing to dump the caller's namespace or to
/// list `/proc` is an error; failing in another namespace (its processes exited, privileges)
/// only skips it.
pub fn scan_all_namespaces() -> Result<Scan, SockDiagError> {
    let own = current_namespace_inode()?;
    let mut sockets = dump_here(own)?;
    let mut namespaces = 1;
    let mut skipped = Vec::new();
    for namespace in list_namespaces()? {
        if namespace.inode == own {
            continue;
        }
        match dump_namespace(&namespace) {
            Ok(found) => {
                namespaces += 1;
                sockets.extend(found);
            }
            Err(error) => {
                debug!(netns = namespace.inode, %error, "network namespace skipped");
                skipped.push((namespace.inode, error));
            }
        }
    }
    Ok(Scan { sockets, namespaces, skipped })
}

/// The TCP sockets of every network namespace of the host that could be dumped; see
/// [`scan_all_namespaces`], which also says which namespaces were skipped and why. Without
/// CAP_SYS_ADMIN only the caller's own namespace is dumped.
#[cfg(test)]
pub fn dump_all_namespaces() -> Result<Vec<TcpSocket>, SockDiagError> {
    scan_all_namespaces().map(|scan| scan.sockets)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
        os::fd::AsRawFd,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use netlink_packet_core::{DoneMessage, ErrorMessage, Parseable as _};
    use netlink_packet_sock_diag::{
        TCP_ESTABLISHED,
        inet::{InetResponseHeader, nlas::Nla},
    };

    use super::*;

    fn tcp_info_bytes(len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len.max(256)];
        bytes[tcp_info::RETRANSMITS] = 3;
        bytes[tcp_info::PROBES] = 4;
        bytes[tcp_info::BACKOFF] = 5;
        let u32s = [
            (tcp_info::UNACKED, 6u32),
            (tcp_info::LAST_DATA_SENT, 7),
            (tcp_info::LAST_DATA_RECV, 8),
            (tcp_info::LAST_ACK_RECV, 9),
            (tcp_info::RTT, 10),
            (tcp_info::TOTAL_RETRANS, 11),
            (tcp_info::NOTSENT_BYTES, 12),
            (tcp_info::SND_WND, 13),
        ];
        for (offset, value) in u32s {
            bytes[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        }
        for (offset, value) in [
            (tcp_info::BYTES_ACKED, 1u64 << 40),
            (tcp_info::BYTES_RECEIVED, 2),
            (tcp_info::BYTES_SENT, 3),
        ] {
            bytes[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        }
        bytes.truncate(len);
        bytes
    }

    #[test]
    fn tcp_info_fields_follow_the_attribute_length() {
        let full = TcpInfoLite::parse(&tcp_info_bytes(248)).expect("long enough");
        assert_eq!(
            full,
            TcpInfoLite {
                retransmits: 3,
                probes: 4,
                backoff: 5,
                unacked: 6,
                last_data_sent_ms: 7,
                last_data_recv_ms: 8,
                last_ack_recv_ms: 9,
                rtt_us: 10,
                total_retrans: 11,
                bytes_acked: Some(1 << 40),
                bytes_received: Some(2),
                notsent_bytes: Some(12),
                bytes_sent: Some(3),
                snd_wnd: Some(13),
            }
        );
        // The end of tcpi_snd_wnd, then a layout that stops before it.
        assert_eq!(TcpInfoLite::parse(&tcp_info_bytes(232)).unwrap().snd_wnd, Some(13));
        let older = TcpInfoLite::parse(&tcp_info_bytes(200)).unwrap();
        assert_eq!(
            (older.bytes_acked, older.notsent_bytes, older.bytes_sent, older.snd_wnd),
            (Some(1 << 40), Some(12), None, None)
        );
        let oldest = TcpInfoLite::parse(&tcp_info_bytes(tcp_info::MIN_LEN)).unwrap();
        assert_eq!((oldest.total_retrans, oldest.bytes_acked), (11, None));
        assert_eq!(TcpInfoLite::parse(&tcp_info_bytes(tcp_info::MIN_LEN - 1)), None);
        assert_eq!(TcpInfoLite::parse(&[]), None);
    }

    #[test]
    fn cookie_is_low_half_first_in_host_order() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&0x89ab_cdefu32.to_ne_bytes());
        raw[4..].copy_from_slice(&0x0123_4567u32.to_ne_bytes());
        assert_eq!(cookie_from(raw), 0x0123_4567_89ab_cdef);
    }

    #[test]
    fn namespace_links() {
        assert_eq!(parse_namespace_link(OsStr::new("net:[4026531840]")), Some(4026531840));
        assert_eq!(parse_namespace_link(OsStr::new("mnt:[4026531840]")), None);
        assert_eq!(parse_namespace_link(OsStr::new("net:[12")), None);
        assert_eq!(parse_namespace_link(OsStr::new("net:[x]")), None);
    }

    #[test]
    fn link_local_addresses_keep_their_interface() {
        let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
        assert_eq!(
            socket_addr(link_local.into(), 80, 3),
            SocketAddr::V6(SocketAddrV6::new(link_local, 80, 0, 3))
        );
        assert_eq!(
            socket_addr(Ipv6Addr::LOCALHOST.into(), 80, 3),
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 80)
        );
    }

    fn message(sequence: u32, payload: NetlinkPayload<SockDiagMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = sequence;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    fn response(family: u8, local: SocketAddr, remote: SocketAddr, cookie: u64) -> Vec<u8> {
        let mut raw_cookie = [0u8; 8];
        raw_cookie[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        raw_cookie[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        let response = InetResponse {
            header: InetResponseHeader {
                family,
                state: TCP_ESTABLISHED,
                timer: None,
                socket_id: SocketId {
                    source_port: local.port(),
                    destination_port: remote.port(),
                    source_address: local.ip(),
                    destination_address: remote.ip(),
                    interface_id: 0,
                    cookie: raw_cookie,
                },
                recv_queue: 1000,
                send_queue: 20,
                uid: 1001,
                inode: 4242,
            },
            nlas: vec![Nla::Tos(0), Nla::TcpInfo(tcp_info_bytes(232))].into(),
        };
        message(7, NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(response))))
    }

    #[test]
    fn datagram_of_sockets_then_done() {
        let v4 =
            (SocketAddr::from(([127, 0, 0, 1], 8080)), SocketAddr::from(([10, 1, 2, 3], 5555)));
        let v6 = (
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 443),
            SocketAddr::new("2001:db8::7".parse::<Ipv6Addr>().unwrap().into(), 40000),
        );
        let mut datagram = response(AF_INET, v4.0, v4.1, 0x1_0000_0002);
        datagram.extend(response(AF_INET6, v6.0, v6.1, 3));
        // A leftover of another request is ignored.
        datagram.extend(message(6, NetlinkPayload::Done(DoneMessage::default())));
        let mut sockets = Vec::new();
        assert_eq!(parse_datagram(&datagram, 7, 99, &mut sockets).unwrap(), Progress::More);
        datagram = message(7, NetlinkPayload::Done(DoneMessage::default()));
        assert_eq!(parse_datagram(&datagram, 7, 99, &mut sockets).unwrap(), Progress::Done);

        assert_eq!(sockets.len(), 2);
        let first = &sockets[0];
        assert_eq!(
            (first.cookie, first.family, first.local, first.remote),
            (0x1_0000_0002, u16::from(AF_INET), v4.0, v4.1)
        );
        assert_eq!((first.state, first.recv_queue, first.send_queue), (TCP_ESTABLISHED, 1000, 20));
        assert_eq!((first.inode, first.uid, first.netns_inode), (4242, 1001, 99));
        assert_eq!(first.info.unwrap().snd_wnd, Some(13));
        let second = &sockets[1];
        assert_eq!(
            (second.cookie, second.family, second.local, second.remote),
            (3, u16::from(AF_INET6), v6.0, v6.1)
        );
    }

    #[test]
    fn kernel_errors_and_garbage_are_errors() {
        let mut refused = ErrorMessage::default();
        refused.code = std::num::NonZeroI32::new(-libc::EPERM);
        let datagram = message(1, NetlinkPayload::Error(refused));
        match parse_datagram(&datagram, 1, 0, &mut Vec::new()) {
            Err(SockDiagError::Kernel(error)) => {
                assert_eq!(error.raw_os_error(), Some(libc::EPERM))
            }
            other => panic!("expected a kernel error, got {other:?}"),
        }
        let acknowledgement = message(1, NetlinkPayload::Error(ErrorMessage::default()));
        assert_eq!(
            parse_datagram(&acknowledgement, 1, 0, &mut Vec::new()).unwrap(),
            Progress::More
        );
        assert!(matches!(
            parse_datagram(&[1, 2, 3], 1, 0, &mut Vec::new()),
            Err(SockDiagError::Decode(_))
        ));
        // A header whose length field is zero must not stall the walk.
        assert!(matches!(
            parse_datagram(&[0; 16], 1, 0, &mut Vec::new()),
            Err(SockDiagError::Decode(_))
        ));
    }

    #[test]
    fn request_asks_for_connected_tcp_sockets_with_info() {
        let bytes = request(AF_INET6, 5);
        let framing = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(framing.length() as usize, bytes.len());
        assert_eq!(framing.message_type(), SOCK_DIAG_BY_FAMILY);
        assert_eq!(framing.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(framing.sequence_number(), 5);
        let request = InetRequest::parse(framing.payload()).unwrap();
        assert_eq!((request.family, request.protocol), (AF_INET6, IPPROTO_TCP));
        assert_eq!(request.extensions, ExtensionFlags::INFO);
        assert!(!request.states.contains(StateFlags::LISTEN));
        assert!(!request.states.contains(StateFlags::TIME_WAIT));
        assert!(!request.states.contains(StateFlags::SYN_RECV));
        assert!(request.states.contains(StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT));
    }

    /// A connected pair on loopback: (client, accepted server end).
    fn loopback_pair(ip: IpAddr) -> io::Result<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind((ip, 0))?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        Ok((client, server))
    }

    /// The dumped socket whose ends are those of `stream`.
    fn find<'a>(sockets: &'a [TcpSocket], stream: &TcpStream) -> Option<&'a TcpSocket> {
        let (local, remote) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
        sockets.iter().find(|s| s.local == local && s.remote == remote)
    }

    /// The kernel's cookie for an open socket (`SO_COOKIE`).
    fn so_cookie(stream: &TcpStream) -> u64 {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: the descriptor is open for the call, and the kernel writes at most `len`
        // bytes to `cookie`, which is that large.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    /// The inode in `/proc/self/fd/N -> socket:[INODE]`.
    fn socket_inode(stream: &TcpStream) -> u64 {
        let link = fs::read_link(format!("/proc/self/fd/{}", stream.as_raw_fd())).unwrap();
        let text = link.to_str().unwrap();
        text.strip_prefix("socket:[").unwrap().strip_suffix(']').unwrap().parse().unwrap()
    }

    fn euid() -> u32 {
        fs::metadata("/proc/self").unwrap().uid()
    }

    #[test]
    fn finds_a_loopback_pair_with_stable_cookies() {
        let mut pairs = vec![loopback_pair(Ipv4Addr::LOCALHOST.into()).unwrap()];
        match loopback_pair(Ipv6Addr::LOCALHOST.into()) {
            Ok(pair) => pairs.push(pair),
            Err(error) => eprintln!("IPv6 loopback unavailable ({error}); checking IPv4 only"),
        }
        let first = dump_current_namespace().unwrap();
        let second = dump_current_namespace().unwrap();
        let own_namespace = current_namespace_inode().unwrap();
        for (client, server) in &pairs {
            for stream in [client, server] {
                let found = find(&first, stream).expect("socket in the dump");
                assert_eq!(found.state, TCP_ESTABLISHED);
                assert_ne!(found.cookie, 0);
                assert_eq!(found.cookie, so_cookie(stream), "cookie is the kernel's");
                assert_eq!(find(&second, stream).unwrap().cookie, found.cookie);
                assert_eq!(found.inode, socket_inode(stream));
                assert_eq!(found.uid, euid());
                assert_eq!(found.netns_inode, own_namespace);
                let expected_family =
                    if stream.local_addr().unwrap().is_ipv4() { AF_INET } else { AF_INET6 };
                assert_eq!(found.family, u16::from(expected_family));
                assert!(found.info.is_some(), "tcp_info requested and sent");
            }
        }
    }

    #[test]
    fn unread_bytes_show_in_the_receive_queue() {
        let (mut client, server) = loopback_pair(Ipv4Addr::LOCALHOST.into()).unwrap();
        client.write_all(&[7; 1000]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (queued, info) = loop {
            let sockets = dump_current_namespace().unwrap();
            let found = find(&sockets, &server).expect("server end in the dump");
            if found.recv_queue == 1000 || Instant::now() > deadline {
                break (found.recv_queue, found.info);
            }
            thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(queued, 1000);
        assert_eq!(info.and_then(|info| info.bytes_received), Some(1000));
    }

    /// A named network namespace with lo up, deleted on drop.
    struct TestNamespace {
        name: String,
    }

    impl TestNamespace {
        fn create(name: &str) -> Self {
            let namespace = Self { name: name.into() };
            ip(&["netns", "add", name]);
            ip(&["-n", name, "link", "set", "lo", "up"]);
            namespace
        }
    }

    impl Drop for TestNamespace {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("ip from iproute2");
        assert!(status.success(), "ip {args:?} failed");
    }

    /// A child process, killed and reaped on drop.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Holds a connected loopback pair and prints its two ports until stdin closes.
    const HOLD_PAIR: &str = "import socket, sys
l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()
c = socket.create_connection(l.getsockname()); s, _ = l.accept()
print(c.getsockname()[1], l.getsockname()[1], flush=True)
sys.stdin.read()";

    #[test]
    fn finds_sockets_in_other_namespaces() {
        if euid() != 0 {
            eprintln!("skipped: entering other network namespaces needs root");
            return;
        }
        let name = format!("observer-sockdiag-{}", std::process::id());
        let namespace = TestNamespace::create(&name);
        let inode = fs::metadata(Path::new(NAMED_NAMESPACES).join(&name)).unwrap().ino();
        let mut holder = Reaped(
            Command::new("ip")
                .args(["netns", "exec", &name, "python3", "-c", HOLD_PAIR])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3 in the namespace"),
        );
        let mut line = String::new();
        BufReader::new(holder.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ports: Vec<u16> = line.split_whitespace().map(|p| p.parse().unwrap()).collect();
        let client = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let server = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        let in_namespace = |sockets: &[TcpSocket], local, remote| {
            sockets
                .iter()
                .filter(|s| s.netns_inode == inode && s.local == local && s.remote == remote)
                .count()
        };

        // Found once, though both /run/netns and the holder's /proc entry name the namespace.
        let all = dump_all_namespaces().unwrap();
        assert_eq!(in_namespace(&all, client, server), 1);
        assert_eq!(in_namespace(&all, server, client), 1);
        let here = dump_current_namespace().unwrap();
        assert!(here.iter().all(|s| s.netns_inode != inode));

        // Without its bind mount, the namespace is still found through the holder's process.
        drop(namespace);
        let scan = scan_all_namespaces().unwrap();
        assert_eq!(in_namespace(&scan.sockets, client, server), 1);
        assert_eq!(in_namespace(&scan.sockets, server, client), 1);
        assert!(scan.skipped.iter().all(|(skipped, _)| *skipped != inode), "{:?}", scan.skipped);
    }

    /// Times dumps of about 10,000 loopback sockets. Run with
    /// `cargo test -p observer --release sockdiag::tests::bench -- --ignored --nocapture`
    /// (needs `ulimit -n` above 10,100).
    #[test]
    #[ignore = "benchmark: prints timings"]
    fn bench_dump_10k_sockets() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let address = listener.local_addr().unwrap();
        let mut streams = Vec::new();
        for _ in 0..5000 {
            streams.push(TcpStream::connect(address).unwrap());
            streams.push(listener.accept().unwrap().0);
        }
        for round in 0..5 {
            let started = Instant::now();
            let sockets = dump_current_namespace().unwrap();
            let current = started.elapsed();
            let started = Instant::now();
            let scan = scan_all_namespaces().unwrap();
            eprintln!(
                "round {round}: current namespace {} sockets in {current:?}; all {} namespaces \
                 {} sockets in {:?}",
                sockets.len(),
                scan.namespaces,
                scan.sockets.len(),
                started.elapsed()
            );
        }
    }
}
