//! Adopting connections the kernel programs never saw being established: those open before the
//! agent started, and those whose events were lost.
//!
//! The kernel's socket table (read with `sock_diag`, see [`crate::sockdiag`]) gives each
//! socket's cookie, addresses, state, queues and `tcp_info`. From them the agent writes a
//! `CONNS` entry the kernel programs then keep up to date like any other, with the counters'
//! origins chosen so that the queues start at what the kernel reports, and a `FRAMES` entry whose
//! streams' starts are unknown: frame tracking begins at the first segment a dry run shows to
//! start on a frame boundary. The socket's owner is found by its inode in `/proc/*/fd`.
//!
//! Which end a socket is cannot be read from the table: a watched port decides when there is
//! one, then the local ephemeral port range (the end with an ephemeral local port connected out).

use std::{collections::HashMap, fs, net::SocketAddr, path::Path};

use observer_common::{
    ConnState, Role, WsState, ends, flags,
    frame::{Phase, StreamState},
};

use crate::sockdiag::TcpSocket;

const TCP_CLOSE_WAIT: u8 = 8;
const TCP_CLOSING: u8 = 11;

/// The process holding a socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: [u8; 16],
}

/// What to write into the kernel maps for one adopted socket.
#[derive(Debug, Clone, Copy)]
pub struct Adoption {
    pub cookie: u64,
    pub state: ConnState,
    pub frames: WsState,
}

/// Which end `socket` is.
pub fn role(socket: &TcpSocket, watched: &[u16], ephemeral: (u16, u16)) -> Role {
    let (local, remote) = (socket.local.port(), socket.remote.port());
    let is_ephemeral = |port: u16| (ephemeral.0..=ephemeral.1).contains(&port);
    if watched.contains(&local) {
        Role::Server
    } else if watched.contains(&remote) {
        Role::Client
    } else if is_ephemeral(local) != is_ephemeral(remote) {
        if is_ephemeral(local) { Role::Client } else { Role::Server }
    } else if local < remote {
        Role::Server
    } else {
        Role::Client
    }
}

/// The kernel entries for one socket found open at `now_ns` (`CLOCK_MONOTONIC`).
pub fn adoption(
    socket: &TcpSocket,
    watched: &[u16],
    ephemeral: (u16, u16),
    owner: Option<Owner>,
    now_ns: u64,
) -> Adoption {
    let role = role(socket, watched, ephemeral);
    let ago = |ms: u32| now_ns.saturating_sub(u64::from(ms) * 1_000_000);
    let info = socket.info.unwrap_or_default();
    let fin = matches!(socket.state, TCP_CLOSE_WAIT | TCP_CLOSING);
    let received = info.bytes_received.unwrap_or(0);
    let acked = info.bytes_acked.unwrap_or(0);
    let server_port = match role {
        Role::Server => socket.local.port(),
        Role::Client => socket.remote.port(),
    };

    let mut state = ConnState {
        established_ns: now_ns,
        state_changed_ns: now_ns,
        last_write_ns: ago(info.last_data_sent_ms),
        last_rx_ns: ago(info.last_data_recv_ms),
        last_ack_ns: ago(info.last_ack_recv_ms),
        last_ingress_ns: ago(info.last_ack_recv_ms.min(info.last_data_recv_ms)),
        unread_since_ns: if socket.recv_queue > 0 { now_ns } else { 0 },
        unacked_since_ns: if socket.send_queue > 0 { now_ns } else { 0 },
        // Origins chosen so that the queues start at what the kernel reports.
        bytes_written: u64::from(socket.send_queue),
        tcp_bytes_acked: acked,
        acked_origin: acked,
        tcp_bytes_received: received,
        received_origin: received
            .saturating_sub(u64::from(socket.recv_queue))
            .saturating_sub(u64::from(fin)),
        total_retrans: info.total_retrans,
        local_port: socket.local.port(),
        remote_port: socket.remote.port(),
        local_addr: octets(&socket.local),
        remote_addr: octets(&socket.remote),
        family: socket.family,
        role: role as u8,
        tcp_state: socket.state,
        flags: flags::ADOPTED | flags::CLASSIFIED,
        ends: if fin { ends::FIN_RECEIVED } else { 0 },
        ..ConnState::default()
    };
    if watched.contains(&server_port) {
        state.flags |= flags::WATCHED;
    }
    if let Some(owner) = owner {
        state.pid = owner.pid;
        state.comm = owner.comm;
    }

    let mut frames = WsState::default();
    let request = match role {
        Role::Server => 0,
        Role::Client => 1,
    };
    frames.dir[request] = StreamState::adopted(true);
    frames.dir[1 - request] = StreamState::adopted(false);
    Adoption { cookie: socket.cookie, state, frames }
}

/// Whether an adopted connection has shown WebSocket frames: a direction found a frame boundary
/// and counted frames since.
pub fn frames_seen(frames: &WsState) -> bool {
    frames.dir.iter().any(|d| d.phase == Phase::Frames as u8 && d.frames.iter().any(|&n| n > 0))
}

fn octets(addr: &SocketAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match addr {
        SocketAddr::V4(v4) => out[..4].copy_from_slice(&v4.ip().octets()),
        SocketAddr::V6(v6) => out = v6.ip().octets(),
    }
    out
}

/// The local port range that connections out are given (`ip_local_port_range`).
pub fn ephemeral_range() -> (u16, u16) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// The processes holding the sockets with the given inodes, from `/proc/*/fd`.
pub fn owners(proc_root: &Path, inodes: &[u64]) -> HashMap<u64, Owner> {
    let mut found = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let wanted: std::collections::HashSet<u64> = inodes.iter().copied().collect();
    let Ok(processes) = fs::read_dir(proc_root) else {
        return found;
    };
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|i| wanted.contains(i)) {
                let mut comm = [0u8; 16];
                if let Ok(name) = fs::read(process.path().join("comm")) {
                    let name = name.strip_suffix(b"\n").unwrap_or(&name);
                    let n = name.len().min(15);
                    comm[..n].copy_from_slice(&name[..n]);
                }
                found.entry(inode).or_insert(Owner { pid, comm });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockdiag::TcpInfoLite;

    const AF_INET: u16 = 2;

    const S: u64 = 1_000_000_000;

    fn socket(local: &str, remote: &str) -> TcpSocket {
        TcpSocket {
            cookie: 77,
            family: AF_INET,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: 1,
            recv_queue: 300,
            send_queue: 40,
            inode: 5,
            uid: 0,
            netns_inode: 1,
            info: Some(TcpInfoLite {
                last_data_sent_ms: 2000,
                last_data_recv_ms: 500,
                last_ack_recv_ms: 400,
                total_retrans: 3,
                bytes_acked: Some(10_000),
                bytes_received: Some(9_300),
                ..TcpInfoLite::default()
            }),
        }
    }

    #[test]
    fn roles_follow_watched_ports_then_the_ephemeral_range() {
        let range = (32768, 60999);
        let s = socket("10.0.0.1:8080", "10.0.0.2:40000");
        assert_eq!(role(&s, &[], range), Role::Server);
        assert_eq!(role(&socket("10.0.0.2:40000", "10.0.0.1:8080"), &[], range), Role::Client);
        assert_eq!(
            role(&socket("10.0.0.2:40000", "10.0.0.1:50000"), &[40000], range),
            Role::Server
        );
        assert_eq!(
            role(&socket("10.0.0.2:40000", "10.0.0.1:50000"), &[50000], range),
            Role::Client
        );
    }

    #[test]
    fn adopted_queues_and_times_start_from_the_kernel_table() {
        let a = adoption(
            &socket("10.0.0.1:8080", "10.0.0.2:40000"),
            &[8080],
            (32768, 60999),
            None,
            100 * S,
        );
        let st = a.state;
        assert_eq!((st.recv_queue(), st.send_queue()), (300, 40));
        assert_eq!((st.bytes_received(), st.bytes_acked()), (300, 0));
        assert_eq!(st.last_write_ns, 98 * S);
        assert_eq!(st.last_ingress_ns, 100 * S - 400_000_000);
        assert_eq!(st.total_retrans, 3);
        assert!(st.flags & flags::WATCHED != 0 && st.flags & flags::ADOPTED != 0);
        assert_eq!(Role::from_u8(st.role), Some(Role::Server));
        // The server's request direction is ingress: masked frames expected there.
        assert!(a.frames.dir.iter().all(|d| d.phase == Phase::Lost as u8));
        assert!(!frames_seen(&a.frames));
    }

    #[test]
    fn a_half_closed_socket_does_not_count_the_fin_as_unread() {
        let mut s = socket("10.0.0.1:8080", "10.0.0.2:40000");
        s.state = TCP_CLOSE_WAIT;
        s.recv_queue = 0;
        s.info.as_mut().unwrap().bytes_received = Some(9_301);
        let a = adoption(&s, &[], (32768, 60999), None, 100 * S);
        assert_eq!(a.state.recv_queue(), 0);
    }

    #[test]
    fn owners_are_found_by_socket_inode() {
        let root = std::env::temp_dir().join(format!("observer-adopt-{}", std::process::id()));
        let fd = root.join("42/fd");
        fs::create_dir_all(&fd).unwrap();
        std::os::unix::fs::symlink("socket:[123]", fd.join("3")).unwrap();
        std::os::unix::fs::symlink("/dev/null", fd.join("4")).unwrap();
        fs::write(root.join("42/comm"), "server\n").unwrap();
        let found = owners(&root, &[123, 456]);
        let _ = fs::remove_dir_all(&root);
        let owner = found[&123];
        assert_eq!(owner.pid, 42);
        assert_eq!(&owner.comm[..7], b"server\0");
        assert!(!found.contains_key(&456));
    }
}
