//! The agent's table of connection ends: kernel state merged with what the agent learnt from
//! events (handshakes), and the verdicts computed from it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use observer_common::{ConnState, Direction, Role, flags};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::{
    handshake::{Handshake, Outcome, Upgrade},
    verdict::{Thresholds, Verdict, judge},
};

const AF_INET: u16 = 2;

/// How a WebSocket connection end entered or left the table, for
/// `websocket_connections_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcomes {
    Accept,
    Close,
}

impl Outcomes {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Close => "close",
        }
    }
}

/// `(server port, role)`: the label pair of every per-connection metric.
pub type SeriesKey = (u16, &'static str);

/// A change the kernel side must make for the table to stay consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelAction {
    /// The handshake is understood: stop copying the connection's bytes.
    StopForwarding(u64),
    /// Not a WebSocket and not watched: stop tracking it altogether.
    Untrack(u64),
}

/// One connection end as `/connections` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    pub local_addr: String,
    pub remote_addr: String,
    pub role: String,
    /// The server port: local for `server`, remote for `client`.
    pub port: u16,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub websocket: bool,
    pub state: Verdict,
    pub tcp_state: String,
    pub age_seconds: f64,
    pub last_send_age_seconds: Option<f64>,
    pub last_recv_age_seconds: Option<f64>,
    pub last_read_age_seconds: Option<f64>,
    pub send_queue_bytes: u64,
    pub recv_queue_bytes: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The kernel's socket cookie, unique on this host until reboot.
    pub cookie: u64,
    /// Namespace, pod and container of `pid`, shown as three fields.
    #[serde(flatten)]
    pub attribution: crate::k8s::Attribution,
}

#[derive(Debug)]
struct Conn {
    state: ConnState,
    /// Present while the start of the stream is being examined.
    handshake: Option<Handshake>,
    upgrade: Option<Upgrade>,
    verdict: Option<Verdict>,
    /// Counted in `websocket_connections_total{result="accept"}`.
    accepted: bool,
}

impl Conn {
    fn new(state: ConnState) -> Self {
        Self { state, handshake: None, upgrade: None, verdict: None, accepted: false }
    }

    fn watched(&self) -> bool {
        self.state.flags & flags::WATCHED != 0
    }

    /// Shown and counted: a WebSocket by its handshake, or on a watched port.
    fn reported(&self) -> bool {
        self.upgrade.is_some() || self.watched()
    }

    fn role(&self) -> Role {
        Role::from_u8(self.state.role).unwrap_or(Role::Server)
    }

    fn series(&self) -> SeriesKey {
        (server_port(&self.state), role_name(self.role()))
    }
}

/// The table itself.
#[derive(Debug)]
pub struct Tracker {
    thresholds: Thresholds,
    conns: HashMap<u64, Conn>,
    totals: BTreeMap<(SeriesKey, Outcomes), u64>,
    /// Every label pair ever reported, so gauges drop to zero instead of vanishing.
    known: BTreeSet<SeriesKey>,
}

impl Tracker {
    pub fn new(thresholds: Thresholds) -> Self {
        Self { thresholds, conns: HashMap::new(), totals: BTreeMap::new(), known: BTreeSet::new() }
    }

    /// A connection on a watched port was established.
    pub fn open(&mut self, cookie: u64, state: ConnState) {
        let conn = self.conns.entry(cookie).or_insert_with(|| Conn::new(state));
        conn.state = state;
        Self::count_accept(&mut self.totals, &mut self.known, conn);
    }

    /// Bytes from the start of a connection's stream. `lookup` fetches the kernel's entry for a
    /// connection the table does not hold yet.
    pub fn chunk(
        &mut self,
        cookie: u64,
        direction: Direction,
        offset: u32,
        data: &[u8],
        lookup: impl FnOnce() -> Option<ConnState>,
    ) -> Option<KernelAction> {
        let conn = match self.conns.entry(cookie) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Conn::new(lookup()?)),
        };
        if conn.upgrade.is_some() {
            return None;
        }
        let request_direction = match conn.role() {
            Role::Server => Direction::Ingress,
            Role::Client => Direction::Egress,
        };
        let handshake = conn.handshake.get_or_insert_with(Handshake::default);
        if direction == request_direction {
            handshake.push_request(offset, data);
        } else {
            handshake.push_response(offset, data);
        }
        match handshake.outcome() {
            Outcome::Pending => None,
            Outcome::WebSocket(upgrade) => {
                conn.handshake = None;
                conn.upgrade = Some(upgrade);
                debug!(cookie, "WebSocket handshake seen");
                Self::count_accept(&mut self.totals, &mut self.known, conn);
                Some(KernelAction::StopForwarding(cookie))
            }
            Outcome::NotWebSocket(reason) => {
                debug!(cookie, reason, "not a WebSocket");
                conn.handshake = None;
                if conn.watched() {
                    Some(KernelAction::StopForwarding(cookie))
                } else {
                    self.conns.remove(&cookie);
                    Some(KernelAction::Untrack(cookie))
                }
            }
        }
    }

    /// A tracked connection reached `TCP_CLOSE`.
    pub fn close(&mut self, cookie: u64, state: ConnState) {
        if let Some(mut conn) = self.conns.remove(&cookie) {
            conn.state = state;
            self.count_close(&conn);
        }
    }

    /// Brings the table in line with the kernel's entries: refreshes counters, adopts watched
    /// connections whose open event was lost, and closes those whose close event was lost.
    pub fn sync(&mut self, entries: impl IntoIterator<Item = (u64, ConnState)>) {
        let mut seen = BTreeSet::new();
        for (cookie, state) in entries {
            seen.insert(cookie);
            match self.conns.get_mut(&cookie) {
                Some(conn) => conn.state = state,
                None if state.flags & flags::WATCHED != 0 => self.open(cookie, state),
                None => {}
            }
        }
        let gone: Vec<u64> = self.conns.keys().filter(|c| !seen.contains(c)).copied().collect();
        for cookie in gone {
            if let Some(conn) = self.conns.remove(&cookie) {
                self.count_close(&conn);
            }
        }
    }

    /// Recomputes every verdict at `now_ns`, logs the changes, and returns the reported
    /// connection ends, worst first.
    pub fn refresh(&mut self, now_ns: u64) -> Vec<ConnectionView> {
        let mut views = Vec::new();
        for (&cookie, conn) in &mut self.conns {
            if !conn.reported() {
                continue;
            }
            let verdict = judge(&conn.state, now_ns, &self.thresholds);
            let view = view(cookie, conn, verdict, now_ns);
            if conn.verdict != Some(verdict) {
                info!(
                    cookie,
                    local = %view.local_addr,
                    remote = %view.remote_addr,
                    role = %view.role,
                    pid = view.pid.unwrap_or(0),
                    comm = view.comm.as_deref().unwrap_or(""),
                    from = conn.verdict.map_or("new", Verdict::as_str),
                    to = verdict.as_str(),
                    "connection verdict changed"
                );
                conn.verdict = Some(verdict);
            }
            views.push(view);
        }
        views.sort_by(|a, b| {
            (a.state, a.port, &a.local_addr).cmp(&(b.state, b.port, &b.local_addr))
        });
        views
    }

    pub fn totals(&self) -> &BTreeMap<(SeriesKey, Outcomes), u64> {
        &self.totals
    }

    pub fn known_series(&self) -> &BTreeSet<SeriesKey> {
        &self.known
    }

    /// Connection ends in the table, reported or still being classified.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    fn count_accept(
        totals: &mut BTreeMap<(SeriesKey, Outcomes), u64>,
        known: &mut BTreeSet<SeriesKey>,
        conn: &mut Conn,
    ) {
        if conn.accepted || !conn.reported() {
            return;
        }
        conn.accepted = true;
        let key = conn.series();
        known.insert(key);
        *totals.entry((key, Outcomes::Accept)).or_default() += 1;
    }

    fn count_close(&mut self, conn: &Conn) {
        if conn.accepted {
            *self.totals.entry((conn.series(), Outcomes::Close)).or_default() += 1;
        }
    }
}

fn view(cookie: u64, conn: &Conn, verdict: Verdict, now_ns: u64) -> ConnectionView {
    let s = &conn.state;
    let age = |then: u64| (then != 0).then(|| seconds(now_ns.saturating_sub(then)));
    let comm = {
        let end = s.comm.iter().position(|&b| b == 0).unwrap_or(s.comm.len());
        (end > 0).then(|| String::from_utf8_lossy(&s.comm[..end]).into_owned())
    };
    ConnectionView {
        local_addr: socket_addr(s.family, &s.local_addr, s.local_port).to_string(),
        remote_addr: socket_addr(s.family, &s.remote_addr, s.remote_port).to_string(),
        role: role_name(conn.role()).to_owned(),
        port: server_port(s),
        pid: (s.pid != 0).then_some(s.pid),
        comm,
        websocket: conn.upgrade.is_some(),
        state: verdict,
        tcp_state: tcp_state_name(s.tcp_state).to_owned(),
        age_seconds: seconds(now_ns.saturating_sub(s.established_ns)),
        last_send_age_seconds: age(s.last_write_ns),
        last_recv_age_seconds: age(s.last_rx_ns),
        last_read_age_seconds: age(s.last_read_ns),
        send_queue_bytes: s.send_queue(),
        recv_queue_bytes: s.recv_queue(),
        bytes_sent: s.bytes_written,
        bytes_received: s.bytes_received(),
        cookie,
        attribution: crate::k8s::Attribution::default(),
    }
}

fn seconds(ns: u64) -> f64 {
    (ns / 1_000_000) as f64 / 1000.0
}

/// The server port of a connection end: local for the server, remote for the client.
pub fn server_port(state: &ConnState) -> u16 {
    match Role::from_u8(state.role) {
        Some(Role::Client) => state.remote_port,
        _ => state.local_port,
    }
}

pub const fn role_name(role: Role) -> &'static str {
    match role {
        Role::Server => "server",
        Role::Client => "client",
    }
}

/// An address as the kernel stored it; IPv4-mapped IPv6 addresses are shown as IPv4.
pub fn socket_addr(family: u16, addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        let v6 = Ipv6Addr::from(*addr);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    };
    SocketAddr::new(ip, port)
}

/// The kernel's name for a TCP state number.
pub const fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const S: u64 = 1_000_000_000;
    const REQUEST: &[u8] =
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nCookie: secret\r\n\r\n";
    const RESPONSE: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";

    fn tracker() -> Tracker {
        Tracker::new(Thresholds {
            idle_after: Duration::from_secs(60),
            stall_after: Duration::from_secs(10),
        })
    }

    fn server(port: u16, watched: bool) -> ConnState {
        ConnState {
            established_ns: S,
            family: AF_INET,
            role: Role::Server as u8,
            local_port: port,
            remote_port: 50000,
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            tcp_state: 1,
            flags: if watched { flags::WATCHED } else { 0 },
            ..ConnState::default()
        }
    }

    #[test]
    fn handshake_makes_a_connection_reported_and_counted() {
        let mut t = tracker();
        let s = server(8080, false);
        let action = t.chunk(7, Direction::Ingress, 0, REQUEST, || Some(s));
        assert_eq!(action, None);
        assert!(t.refresh(2 * S).is_empty(), "not reported before the 101");
        let action = t.chunk(7, Direction::Egress, 0, RESPONSE, || unreachable!());
        assert_eq!(action, Some(KernelAction::StopForwarding(7)));
        let views = t.refresh(2 * S);
        assert_eq!(views.len(), 1);
        assert!(views[0].websocket);
        assert_eq!(views[0].local_addr, "127.0.0.1:8080");
        assert_eq!(views[0].port, 8080);
        assert_eq!(t.totals()[&((8080, "server"), Outcomes::Accept)], 1);
        t.close(7, s);
        assert_eq!(t.totals()[&((8080, "server"), Outcomes::Close)], 1);
        assert!(t.refresh(3 * S).is_empty());
    }

    #[test]
    fn plain_http_is_untracked_and_never_reported() {
        let mut t = tracker();
        let s = server(8080, false);
        let action = t.chunk(9, Direction::Ingress, 0, b"GET / HTTP/1.1\r\n\r\n", || Some(s));
        assert_eq!(action, Some(KernelAction::Untrack(9)));
        assert_eq!(t.len(), 0);
        assert!(t.totals().is_empty());
    }

    #[test]
    fn client_end_reads_its_request_from_egress() {
        let mut t = tracker();
        let mut c = server(8080, false);
        c.role = Role::Client as u8;
        c.local_port = 50000;
        c.remote_port = 8080;
        t.chunk(5, Direction::Egress, 0, REQUEST, || Some(c));
        t.chunk(5, Direction::Ingress, 0, RESPONSE, || None);
        let views = t.refresh(2 * S);
        assert_eq!((views[0].role.as_str(), views[0].port), ("client", 8080));
    }

    #[test]
    fn watched_port_is_reported_without_handshake_and_sync_closes_lost_ones() {
        let mut t = tracker();
        t.sync([(1, server(9000, true)), (2, server(9001, false))]);
        let views = t.refresh(2 * S);
        assert_eq!(views.len(), 1);
        assert!(!views[0].websocket);
        t.sync([]);
        assert_eq!(t.totals()[&((9000, "server"), Outcomes::Close)], 1);
        assert!(t.known_series().contains(&(9000, "server")));
    }

    #[test]
    fn mapped_ipv6_is_shown_as_ipv4() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(socket_addr(10, &addr, 80).to_string(), "10.0.0.1:80");
        let v6 = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(socket_addr(10, &v6, 80).to_string(), "[::1]:80");
    }
}
