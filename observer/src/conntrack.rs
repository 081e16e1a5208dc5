//! The agent's table of connection ends: kernel state merged with what the agent learnt from
//! events (handshakes, control frames), the verdicts computed from it, and the aggregates it
//! feeds.

use std::{
    borrow::Cow,
    collections::VecDeque,
    collections::{HashMap, hash_map::Entry},
    fmt,
    net::{AddrParseError, IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use observer_common::{
    ConnState, Direction, FrameEvent, Role, WsState, flags,
    frame::{MESSAGE_SIZE_BUCKETS, Phase, kind, opcode},
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::{
    adopt::frames_seen,
    handshake::{Handshake, Outcome as HandshakeOutcome, Upgrade},
    metrics::{
        Aggregates, OpenEnd, Outcome, PortLabels, SeriesKey, close_code_label, kernel_buckets,
    },
    verdict::{Judgement, Thresholds, Verdict, close_reason, judge},
};

const AF_INET: u16 = 2;
/// Label of each direction, by [`Direction`] discriminant.
const DIRECTION_NAMES: [&str; 2] = ["in", "out"];

/// A change the kernel side must make for the table to stay consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelAction {
    /// The start of the stream is understood: stop copying the connection's bytes.
    StopForwarding(u64),
    /// Not a WebSocket and not watched: stop tracking it altogether.
    Untrack(u64),
}

/// Which connection end a [`Note`] is about, as the kernel knew it when the note was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndId {
    pub cookie: u64,
    /// The server port.
    pub port: u16,
    pub role: &'static str,
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// Something that happened to a reported connection end, for consumers that need each event
/// rather than the aggregates (`observer audit`). Kept only when [`Tracker::keep_notes`] is on.
/// Missed pongs are left to the consumer: the table follows only the oldest unanswered ping of
/// each direction.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub id: EndId,
    /// When it happened (`CLOCK_MONOTONIC` ns).
    pub at_ns: u64,
    pub what: NoteKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NoteKind {
    /// The upgrade was answered with 101 this long after its first byte (`None`: the start of
    /// the request was not seen).
    Handshake { seconds: Option<f64> },
    /// The upgrade was refused, or the connection closed before an answer.
    Reject,
    /// A ping crossed the connection, egress (sent by this end) or ingress.
    Ping { direction: Direction },
    /// A pong crossed the connection; `latency_ns` when it answered a ping.
    Pong { direction: Direction, latency_ns: Option<u64> },
    /// The connection end closed.
    Ended {
        outcome: Outcome,
        /// How TCP ended, as `websocket_connections_closed_total{reason}` names it.
        reason: &'static str,
        close_code: Option<u16>,
        /// The last byte either way: written by the application or received from the peer.
        last_activity_ns: u64,
    },
}

/// A socket address, shown as `ip:port` or `[ip6]:port` but kept as numbers: every refresh
/// builds a view of each connection end, and formatting two addresses per end was a good part
/// of its cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Endpoint(pub SocketAddr);

impl ConnectionView {
    /// The order of `/connections`: worst verdict first, then by port and local address.
    pub fn worst_first(a: &Self, b: &Self) -> std::cmp::Ordering {
        (a.state, a.port, a.local_addr).cmp(&(b.state, b.port, b.local_addr))
    }
}

impl Default for Endpoint {
    fn default() -> Self {
        Self(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Endpoint {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

/// One connection end as `/connections` shows it. Fields that take few values are static
/// strings when the agent builds the view, owned only when read back from JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    pub local_addr: Endpoint,
    pub remote_addr: Endpoint,
    pub role: Cow<'static, str>,
    /// The server port: local for `server`, remote for `client`.
    pub port: u16,
    /// The `port` label of its metrics: `port`, or [`metrics::OTHER_PORTS`] past the limit.
    #[serde(skip)]
    pub metric_port: u16,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub websocket: bool,
    /// `websocket`, `http`, `tls`, `h2` or `unknown`, from the first bytes.
    pub protocol: Cow<'static, str>,
    pub state: Verdict,
    /// One sentence of evidence for the verdict.
    pub detail: String,
    /// Seconds since the verdict last changed.
    pub state_age_seconds: f64,
    pub tcp_state: Cow<'static, str>,
    pub age_seconds: f64,
    pub last_send_age_seconds: Option<f64>,
    pub last_recv_age_seconds: Option<f64>,
    pub last_read_age_seconds: Option<f64>,
    pub send_queue_bytes: u64,
    pub recv_queue_bytes: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Request path of the upgrade, without its query string.
    pub path: Option<String>,
    pub subprotocol: Option<String>,
    pub extensions: Option<String>,
    /// Whether frames are being tracked in both directions.
    pub frames_tracked: bool,
    pub pings: u64,
    pub pongs: u64,
    pub pong_missed: u64,
    pub last_pong_latency_seconds: Option<f64>,
    pub last_frame_age_seconds: Option<f64>,
    /// Code of the first close frame, either way.
    pub close_code: Option<u16>,
    /// Segments this end retransmitted.
    pub retransmits: u32,
    /// Whether the peer currently advertises a zero receive window.
    pub zero_window: bool,
    /// Found already open (agent start, lost events) rather than seen being established: its
    /// age counts from adoption and its handshake was not seen.
    pub adopted: bool,
    /// The kernel's socket cookie, unique on this host until reboot.
    pub cookie: u64,
    /// Namespace, pod and container of `pid`, shown as three fields.
    #[serde(flatten)]
    pub attribution: crate::k8s::Attribution,
}

/// Frame counts already added to the aggregates.
#[derive(Debug, Default)]
struct Baseline {
    frames: [[u32; kind::COUNT]; 2],
    sizes: [[u32; MESSAGE_SIZE_BUCKETS]; 2],
    bytes: [u64; 2],
    violations: [u32; 2],
    lost: [u32; 2],
    rsv1: [u32; 2],
}

/// What an adopted connection's counters are off by. Between the socket-table read its entry
/// was made from and the entry's creation, the application may have read or written bytes no
/// kernel program counted: they would show as phantom unread bytes, or missing unacknowledged
/// ones, for the connection's whole life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct QueueCorrection {
    /// Bytes read that were never counted: taken off the receive queue.
    read: u64,
    /// Bytes written that were never counted: added to the send queue.
    written: u64,
}

impl QueueCorrection {
    fn apply(self, state: &mut ConnState) {
        state.bytes_read += self.read;
        state.bytes_written += self.written;
    }
}

/// An unanswered ping.
#[derive(Debug, Clone, Copy)]
struct Ping {
    at_ns: u64,
    missed: bool,
}

/// Unanswered pings kept per direction; an older one pushed out by a newer one can no longer be
/// answered in this accounting, so it counts as missed.
const MAX_OUTSTANDING_PINGS: usize = 32;

#[derive(Debug)]
struct Conn {
    state: ConnState,
    /// The `port` label of this end's metrics, fixed the first time it is counted.
    label_port: Option<u16>,
    /// The kernel's frame tracking, as last read. Boxed, as is `handshake`, to keep the table's
    /// entries small: most connection ends of a busy host have neither.
    frames: Option<Box<WsState>>,
    baseline: Baseline,
    /// Present while the start of the stream is being examined.
    handshake: Option<Box<Handshake>>,
    /// Time of the first request byte.
    request_started_ns: u64,
    upgrade: Option<Upgrade>,
    protocol: &'static str,
    /// The verdict and its evidence at the last [`Tracker::judge`].
    judgement: Option<Judgement>,
    /// When the verdict last changed.
    verdict_since_ns: u64,
    /// Counted in `websocket_connections_total{result="accept"}`.
    accepted: bool,
    pings: u64,
    pongs: u64,
    pong_missed: u64,
    last_pong_latency_ns: Option<u64>,
    /// The oldest unanswered ping, by the direction the ping travelled.
    outstanding: [VecDeque<Ping>; 2],
    /// Close frames seen, by direction.
    close_frames: [bool; 2],
    close_code: Option<u16>,
    /// When the first close frame crossed, either way.
    first_close_ns: u64,
    /// Adopted, and its queues not yet checked against the kernel's socket table.
    unverified: bool,
    /// Corrections found by that check (see [`Tracker::verify_queues`]).
    correction: QueueCorrection,
    /// Found already open rather than seen being established.
    adopted: bool,
    /// The last [`Tracker::sync`] pass that found its kernel entry.
    synced: u64,
    /// The last pass that found its kernel entry changed.
    changed: u64,
    /// The last pass that read its frame tracking; 0 before the first.
    framed: u64,
}

impl Conn {
    fn new(state: ConnState) -> Self {
        Self {
            state,
            label_port: None,
            frames: None,
            baseline: Baseline::default(),
            handshake: None,
            request_started_ns: 0,
            upgrade: None,
            protocol: "unknown",
            judgement: None,
            verdict_since_ns: 0,
            accepted: false,
            pings: 0,
            pongs: 0,
            pong_missed: 0,
            last_pong_latency_ns: None,
            outstanding: [VecDeque::new(), VecDeque::new()],
            close_frames: [false; 2],
            close_code: None,
            first_close_ns: 0,
            unverified: false,
            correction: QueueCorrection::default(),
            adopted: false,
            synced: 0,
            changed: 0,
            framed: 0,
        }
    }

    fn set_frames(&mut self, ws: WsState) {
        match &mut self.frames {
            Some(frames) => **frames = ws,
            None => self.frames = Some(Box::new(ws)),
        }
    }

    fn watched(&self) -> bool {
        self.state.flags & flags::WATCHED != 0
    }

    /// Whether [`Tracker::sync`] pass `pass` reads its frame tracking: it has some, and it was
    /// never read, or the kernel entry changed in this pass or the one before. Frames move only
    /// with segments, which change the entry too; the pass after a change catches a segment
    /// whose frames the kernel was still tracking while this pass read them.
    fn wants_frames(&self, pass: u64) -> bool {
        (self.upgrade.is_some() || self.adopted) && (self.framed == 0 || self.changed + 1 >= pass)
    }

    /// A WebSocket by its handshake, or, adopted, by the frames seen since.
    fn websocket(&self) -> bool {
        self.upgrade.is_some() || (self.adopted && self.frames.as_deref().is_some_and(frames_seen))
    }

    /// Shown and counted: a WebSocket, or on a watched port.
    fn reported(&self) -> bool {
        self.websocket() || self.watched()
    }

    fn role(&self) -> Role {
        Role::from_u8(self.state.role).unwrap_or(Role::Server)
    }

    fn series(&self) -> SeriesKey {
        let port = self.label_port.unwrap_or_else(|| server_port(&self.state));
        (port, role_name(self.role()))
    }

    /// Fixes the `port` label of this end's metrics, the first time it is counted.
    fn admit(&mut self, ports: &mut PortLabels) {
        if self.label_port.is_none() {
            self.label_port = Some(ports.label(server_port(&self.state), self.watched()));
        }
    }

    fn id(&self, cookie: u64) -> EndId {
        let s = &self.state;
        EndId {
            cookie,
            port: server_port(s),
            role: role_name(self.role()),
            pid: (s.pid != 0).then_some(s.pid),
            comm: comm(s),
        }
    }

    fn request_direction(&self) -> Direction {
        match self.role() {
            Role::Server => Direction::Ingress,
            Role::Client => Direction::Egress,
        }
    }

    /// Both directions' frames are being followed.
    fn frames_tracked(&self) -> bool {
        self.frames
            .as_deref()
            .is_some_and(|ws| ws.dir.iter().all(|d| d.phase == Phase::Frames as u8))
    }

    /// Latest application data, by frames when they are tracked (pings and pongs are not data),
    /// by bytes otherwise.
    fn data_activity_ns(&self) -> Option<u64> {
        let ws = self.frames.as_deref().filter(|_| self.frames_tracked())?;
        // Adopted: the connection is older than its entry; the kernel's last data times are
        // the floor, not the adoption.
        let floor = if self.adopted {
            self.state.last_write_ns.max(self.state.last_rx_ns)
        } else {
            self.state.established_ns
        };
        Some(ws.dir[0].last_data_ns.max(ws.dir[1].last_data_ns).max(floor))
    }

    /// The closing handshake half done: one side sent its close frame and the other has not
    /// answered, while TCP is still open.
    fn unanswered_close(&self, now_ns: u64) -> Option<String> {
        let [from_peer, from_local] = self.close_frames;
        if from_peer == from_local {
            return None;
        }
        let age = now_ns.saturating_sub(self.first_close_ns) as f64 / 1e9;
        Some(if from_local {
            format!("closing: close frame sent {age:.0} s ago, no close reply")
        } else {
            format!("closing: close frame received {age:.0} s ago, not answered")
        })
    }

    /// Age of the oldest ping still unanswered after the pong timeout, if any.
    fn unanswered_ping_ns(&self, now_ns: u64) -> Option<u64> {
        self.outstanding
            .iter()
            .flatten()
            .filter(|p| p.missed)
            .map(|p| now_ns.saturating_sub(p.at_ns))
            .max()
    }
}

/// Connections whose events are held at most while their close event is awaited.
const MAX_EARLY_CONNS: usize = 4096;
/// Control-frame events held for one such connection at most.
const MAX_EARLY_FRAMES: usize = 64;

/// An event about a connection the kernel had already forgotten when the agent read it.
#[derive(Debug)]
enum EarlyEvent {
    Chunk { direction: Direction, offset: u32, data: Vec<u8>, ts_ns: u64 },
    Frame(FrameEvent),
}

/// Events of a connection that opened and closed while the agent was not reading its events
/// (stopped, or busy): its kernel entry is gone by the time its first bytes are read, so its
/// state comes only with its close event, later in the ring. Until then its events wait here.
#[derive(Debug)]
struct Early {
    /// The [`Tracker::sync`] pass it was held in; held past the next one, it is dropped.
    pass: u64,
    events: Vec<EarlyEvent>,
}

/// The table itself.
#[derive(Debug)]
pub struct Tracker {
    thresholds: Thresholds,
    pong_timeout_ns: u64,
    /// Boxed: the map moves its entries as it grows, and 200 000 of them are common.
    conns: HashMap<u64, Box<Conn>>,
    early: HashMap<u64, Early>,
    /// Passes of [`Tracker::sync`] so far.
    sync_pass: u64,
    /// When [`Tracker::judge`] last ran.
    judged_ns: u64,
    /// The cookies whose frames the last pass read; kept for its allocation.
    frames_wanted: Vec<u64>,
    aggregates: Aggregates,
    /// Events kept for [`Tracker::take_notes`]; `None` when nobody asked for them.
    notes: Option<Vec<Note>>,
}

impl Tracker {
    pub fn new(thresholds: Thresholds, pong_timeout: Duration) -> Self {
        Self {
            thresholds,
            pong_timeout_ns: pong_timeout.as_nanos() as u64,
            conns: HashMap::new(),
            early: HashMap::new(),
            sync_pass: 0,
            judged_ns: 0,
            frames_wanted: Vec::new(),
            aggregates: Aggregates::default(),
            notes: None,
        }
    }

    /// Keeps a [`Note`] of each handshake, refusal, ping, pong and end from now on.
    pub fn keep_notes(&mut self) {
        self.notes.get_or_insert_with(Vec::new);
    }

    /// The notes kept since the last call.
    pub fn take_notes(&mut self) -> Vec<Note> {
        self.notes.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// A connection on a watched port was established.
    pub fn open(&mut self, cookie: u64, state: ConnState) {
        let conn = self.conns.entry(cookie).or_insert_with(|| Box::new(Conn::new(state)));
        conn.state = state;
        count_accept(&mut self.aggregates, conn);
    }

    /// Bytes from the start of a connection's stream, copied at `ts_ns`. `lookup` fetches the
    /// kernel's entry for a connection the table does not hold yet.
    pub fn chunk(
        &mut self,
        cookie: u64,
        direction: Direction,
        offset: u32,
        data: &[u8],
        ts_ns: u64,
        lookup: impl FnOnce() -> Option<ConnState>,
    ) -> Option<KernelAction> {
        let conn = match self.conns.entry(cookie) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => match lookup() {
                Some(state) => e.insert(Box::new(Conn::new(state))),
                None => {
                    let data = data.to_vec();
                    self.hold_early(cookie, EarlyEvent::Chunk { direction, offset, data, ts_ns });
                    return None;
                }
            },
        };
        if conn.upgrade.is_some() {
            return None;
        }
        let request = direction == conn.request_direction();
        // The kernel marks a candidate once the request opens with `G`; the table's copy of the
        // flags may predate that (a watched connection is known from its open event).
        let candidate = conn.state.flags & flags::HTTP_CANDIDATE != 0
            || conn.handshake.is_some()
            || (request && offset == 0 && data.first() == Some(&b'G'));
        if !candidate {
            // A watched connection that is not HTTP: name it by its first bytes, and stop.
            if offset == 0 {
                conn.protocol = sniff(data);
            }
            return Some(KernelAction::StopForwarding(cookie));
        }

        if request && offset == 0 {
            conn.request_started_ns = ts_ns;
        }
        let handshake = conn.handshake.get_or_insert_with(Box::default);
        if request {
            handshake.push_request(offset, data);
        } else {
            handshake.push_response(offset, data);
        }
        conn.protocol = "http";
        match handshake.outcome() {
            HandshakeOutcome::Pending => None,
            HandshakeOutcome::WebSocket(upgrade) => {
                conn.handshake = None;
                conn.upgrade = Some(upgrade);
                conn.protocol = "websocket";
                let seconds = (conn.request_started_ns != 0)
                    .then(|| ts_ns.saturating_sub(conn.request_started_ns) as f64 / 1e9);
                conn.admit(&mut self.aggregates.ports);
                if let Some(seconds) = seconds {
                    self.aggregates.handshake(conn.series().0, seconds);
                }
                note(&mut self.notes, conn.id(cookie), ts_ns, NoteKind::Handshake { seconds });
                debug!(cookie, "WebSocket handshake seen");
                count_accept(&mut self.aggregates, conn);
                Some(KernelAction::StopForwarding(cookie))
            }
            HandshakeOutcome::NotWebSocket(reason) => {
                debug!(cookie, reason, "not a WebSocket");
                if handshake.upgrade_requested() {
                    conn.admit(&mut self.aggregates.ports);
                    self.aggregates.count(conn.series(), Outcome::Reject);
                    note(&mut self.notes, conn.id(cookie), ts_ns, NoteKind::Reject);
                }
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

    /// A ping, pong or close frame crossed a tracked connection.
    pub fn frame(&mut self, cookie: u64, event: &FrameEvent) {
        let Some(conn) = self.conns.get_mut(&cookie) else {
            if let Some(early) = self.early.get_mut(&cookie) {
                if early.events.len() < MAX_EARLY_FRAMES {
                    early.events.push(EarlyEvent::Frame(*event));
                } else {
                    self.aggregates.events_unmatched += 1;
                }
            }
            return;
        };
        if conn.reported() {
            conn.admit(&mut self.aggregates.ports);
        }
        let direction = usize::from(event.direction != 0);
        let ts = event.header.ts_ns;
        let way = if direction == 0 { Direction::Ingress } else { Direction::Egress };
        match event.opcode {
            opcode::PING => {
                conn.pings += 1;
                let pending = &mut conn.outstanding[direction];
                if pending.len() == MAX_OUTSTANDING_PINGS
                    && let Some(dropped) = pending.pop_front()
                    && !dropped.missed
                {
                    conn.pong_missed += 1;
                    if conn.reported() {
                        *self.aggregates.pong_missed.entry(conn.series()).or_default() += 1;
                    }
                }
                conn.outstanding[direction].push_back(Ping { at_ns: ts, missed: false });
                if conn.reported() {
                    note(&mut self.notes, conn.id(cookie), ts, NoteKind::Ping { direction: way });
                }
            }
            opcode::PONG => {
                conn.pongs += 1;
                // A pong answers the latest ping that travelled the other way, and with it any
                // earlier one still waiting (RFC 6455 lets a peer answer only the latest); those
                // already overdue stay counted as missed.
                let mut latency_ns = None;
                let answered = conn.outstanding[1 - direction].pop_back();
                conn.outstanding[1 - direction].clear();
                if let Some(ping) = answered {
                    let latency = ts.saturating_sub(ping.at_ns);
                    conn.last_pong_latency_ns = Some(latency);
                    latency_ns = Some(latency);
                    if conn.reported() {
                        self.aggregates.pong(conn.series(), latency as f64 / 1e9);
                    }
                }
                if conn.reported() {
                    let what = NoteKind::Pong { direction: way, latency_ns };
                    note(&mut self.notes, conn.id(cookie), ts, what);
                }
            }
            opcode::CLOSE => {
                if conn.close_code.is_none() && conn.reported() {
                    let initiator =
                        if direction == Direction::Egress as usize { "local" } else { "peer" };
                    let key = (conn.series(), close_code_label(event.close_code), initiator);
                    *self.aggregates.closes.entry(key).or_default() += 1;
                }
                if conn.close_code.is_none() {
                    conn.first_close_ns = ts;
                }
                conn.close_code.get_or_insert(event.close_code);
                conn.close_frames[direction] = true;
            }
            _ => {}
        }
    }

    /// A connection found already open was written into the kernel maps.
    pub fn adopt(&mut self, cookie: u64, state: ConnState, frames: WsState) {
        self.conns.entry(cookie).or_insert_with(|| {
            let mut conn = Box::new(Conn::new(state));
            conn.adopted = true;
            conn.unverified = true;
            conn.frames = Some(Box::new(frames));
            conn
        });
    }

    /// Adopted connections whose queues are still to be checked, and that have been quiet for
    /// `quiet_ns` (no byte either way, no read, no write), so that their queues hold still while
    /// they are compared.
    pub fn unverified_quiet(&self, now_ns: u64, quiet_ns: u64) -> Vec<u64> {
        let quiet = |s: &ConnState| {
            let last = s.last_rx_ns.max(s.last_read_ns).max(s.last_write_ns).max(s.last_ack_ns);
            now_ns.saturating_sub(last) >= quiet_ns
        };
        self.conns
            .iter()
            .filter(|(_, c)| c.unverified && quiet(&c.state))
            .map(|(cookie, _)| *cookie)
            .collect()
    }

    /// Checks an adopted connection's queues against the kernel's (`recv_queue` and
    /// `send_queue` from its socket table) and corrects what the counters missed.
    pub fn verify_queues(&mut self, cookie: u64, recv_queue: u64, send_queue: u64) {
        let Some(conn) = self.conns.get_mut(&cookie) else {
            return;
        };
        let read = conn.state.recv_queue().saturating_sub(recv_queue);
        let written = send_queue.saturating_sub(conn.state.send_queue());
        if read > 0 || written > 0 {
            debug!(cookie, read, written, "adopted connection's queues corrected");
        }
        conn.correction.read += read;
        conn.correction.written += written;
        conn.correction.apply(&mut conn.state);
        conn.unverified = false;
    }

    /// Marks an adopted connection as the WebSocket an earlier run saw upgrade.
    pub fn restore_upgrade(&mut self, cookie: u64, upgrade: Upgrade) {
        if let Some(conn) = self.conns.get_mut(&cookie)
            && conn.upgrade.is_none()
        {
            conn.upgrade = Some(upgrade);
            conn.protocol = "websocket";
        }
    }

    /// The connections whose upgrade was seen, by this run or an earlier one.
    pub fn upgrades(&self) -> impl Iterator<Item = (u64, &Upgrade)> + Clone {
        self.conns.iter().filter_map(|(cookie, conn)| Some((*cookie, conn.upgrade.as_ref()?)))
    }

    /// A tracked connection reached `TCP_CLOSE`.
    pub fn close(&mut self, cookie: u64, state: ConnState, frames: WsState) {
        if let Some(early) = self.early.remove(&cookie)
            && !self.conns.contains_key(&cookie)
        {
            // Replay what it said while it was open, now that its state is known.
            self.conns.insert(cookie, Box::new(Conn::new(state)));
            for event in early.events {
                match event {
                    EarlyEvent::Chunk { direction, offset, data, ts_ns } => {
                        // Its kernel entries are gone: nothing to tell the kernel.
                        let _ = self.chunk(cookie, direction, offset, &data, ts_ns, || None);
                    }
                    EarlyEvent::Frame(frame) => self.frame(cookie, &frame),
                }
            }
        }
        if let Some(mut conn) = self.conns.remove(&cookie) {
            conn.state = state;
            conn.correction.apply(&mut conn.state);
            if frames != WsState::default() {
                conn.set_frames(frames);
            }
            self.finish(cookie, conn);
        }
    }

    /// Holds an event of a connection the kernel no longer tracks, until its close event.
    fn hold_early(&mut self, cookie: u64, event: EarlyEvent) {
        let full = self.early.len() >= MAX_EARLY_CONNS;
        match self.early.entry(cookie) {
            Entry::Occupied(mut e) => e.get_mut().events.push(event),
            Entry::Vacant(_) if full => self.aggregates.events_unmatched += 1,
            Entry::Vacant(e) => {
                e.insert(Early { pass: self.sync_pass, events: vec![event] });
            }
        }
    }

    /// Gives the first `limit` server ports seen (watched ones aside) a `port` label of their own.
    pub fn limit_port_labels(&mut self, limit: usize) {
        self.aggregates.ports.set_limit(limit);
    }

    /// Whether the connection is reported: WebSocket, or on a watched port.
    pub fn reported(&self, cookie: u64) -> bool {
        self.conns.get(&cookie).is_some_and(|conn| conn.reported())
    }

    /// Drops a connection evicted from the kernel maps. It did not end: nothing is counted.
    pub fn forget(&mut self, cookie: u64) {
        self.conns.remove(&cookie);
    }

    /// Brings the table in line with the kernel's entries: refreshes counters, adopts watched
    /// connections whose open event was lost, and closes those whose close event was lost.
    /// `frames` reads the kernel's frame tracking of the connections it is given: those whose
    /// entry changed (see [`Conn::wants_frames`]).
    pub fn sync<F>(
        &mut self,
        entries: impl IntoIterator<Item = (u64, ConnState)>,
        frames: impl FnOnce(&[u64]) -> F,
    ) where
        F: IntoIterator<Item = (u64, WsState)>,
    {
        // Each entry marks its connection with this pass's number; the unmarked ones are gone.
        self.sync_pass += 1;
        let pass = self.sync_pass;
        // Events held for a close event that two passes did not bring: the connection was
        // untracked by this table before they were read (not a WebSocket), or its close event
        // was lost, which the kernel counts already.
        let before = self.early.len();
        self.early.retain(|_, early| early.pass + 2 > pass);
        if self.early.len() < before {
            debug!(connections = before - self.early.len(), "held events dropped: no close came");
        }
        let mut wanted = std::mem::take(&mut self.frames_wanted);
        wanted.clear();
        let mut found = 0;
        for (cookie, mut state) in entries {
            match self.conns.get_mut(&cookie) {
                Some(conn) => {
                    found += 1;
                    conn.correction.apply(&mut state);
                    if conn.state != state {
                        conn.state = state;
                        conn.changed = pass;
                    }
                    conn.synced = pass;
                    if conn.wants_frames(pass) {
                        // Asked for, with or without an entry in the kernel (evicted, or never
                        // made for want of room): not asked for again until the entry changes.
                        conn.framed = pass;
                        wanted.push(cookie);
                    }
                }
                None if state.flags & flags::WATCHED != 0 => {
                    // Neither upgraded nor adopted yet: no frames to take below.
                    self.open(cookie, state);
                    if let Some(conn) = self.conns.get_mut(&cookie) {
                        conn.synced = pass;
                        conn.changed = pass;
                        found += 1;
                    }
                }
                None => {}
            }
        }
        for (cookie, ws) in frames(&wanted) {
            if let Some(conn) = self.conns.get_mut(&cookie)
                && conn.synced == pass
                && (conn.upgrade.is_some() || conn.adopted)
            {
                conn.set_frames(ws);
                take_frame_counts(&mut self.aggregates, conn);
            }
        }
        self.frames_wanted = wanted;
        if found == self.conns.len() {
            // Every connection of the table is still in the kernel's: none to look for.
            return;
        }
        let gone: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.synced != pass)
            .map(|(&cookie, _)| cookie)
            .collect();
        for cookie in gone {
            if let Some(conn) = self.conns.remove(&cookie) {
                self.finish(cookie, conn);
            }
        }
    }

    /// Recomputes every verdict at `now_ns`, counts pings whose pong is overdue, logs verdict
    /// changes, and puts in `open` what the gauges need of each reported connection end. The
    /// views of [`Tracker::views`] are built only when asked for.
    pub fn judge(&mut self, now_ns: u64, open: &mut Vec<OpenEnd>) {
        open.clear();
        self.judged_ns = now_ns;
        for (&cookie, conn) in &mut self.conns {
            if !conn.reported() {
                continue;
            }
            conn.admit(&mut self.aggregates.ports);
            count_overdue_pings(conn, now_ns, self.pong_timeout_ns, &mut self.aggregates);
            let judgement = judge(&conn.state, conn.data_activity_ns(), now_ns, &self.thresholds);
            let verdict = judgement.verdict;
            let before = conn.judgement.map(|j| j.verdict);
            if before != Some(verdict) {
                conn.verdict_since_ns = now_ns;
                let s = &conn.state;
                info!(
                    cookie,
                    local = %socket_addr(s.family, &s.local_addr, s.local_port),
                    remote = %socket_addr(s.family, &s.remote_addr, s.remote_port),
                    role = role_name(conn.role()),
                    pid = s.pid,
                    comm = comm(s).as_deref().unwrap_or(""),
                    from = before.map_or("new", Verdict::as_str),
                    to = verdict.as_str(),
                    detail = %detail(conn, &judgement, now_ns),
                    "connection verdict changed"
                );
            }
            conn.judgement = Some(judgement);
            let s = &conn.state;
            open.push(OpenEnd {
                series: conn.series(),
                pid: (s.pid != 0).then_some(s.pid),
                verdict,
                send_queue: s.send_queue(),
                recv_queue: s.recv_queue(),
            });
        }
    }

    /// The reported connection ends as the last [`Tracker::judge`] saw them, in no order: they
    /// are sorted ([`ConnectionView::worst_first`]) only when someone asks for the list.
    pub fn views(&self) -> Vec<ConnectionView> {
        let now_ns = self.judged_ns;
        self.conns
            .iter()
            .filter(|(_, conn)| conn.reported())
            .filter_map(|(&cookie, conn)| Some(view(cookie, conn, &conn.judgement?, now_ns)))
            .collect()
    }

    /// [`Tracker::judge`], then [`Tracker::views`].
    #[cfg(test)]
    pub fn refresh(&mut self, now_ns: u64) -> Vec<ConnectionView> {
        let mut open = Vec::new();
        self.judge(now_ns, &mut open);
        self.views()
    }

    pub fn aggregates(&self) -> &Aggregates {
        &self.aggregates
    }

    /// Connection ends in the table, reported or still being classified.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Accounts for a connection that ended.
    fn finish(&mut self, cookie: u64, mut conn: Box<Conn>) {
        if conn.reported() {
            conn.admit(&mut self.aggregates.ports);
            // A ping left unanswered for the pong timeout by the time TCP ended is missed, even
            // when no refresh came between (a peer giving up on the pong closes at that moment).
            let ended_ns = conn.state.state_changed_ns;
            count_overdue_pings(&mut conn, ended_ns, self.pong_timeout_ns, &mut self.aggregates);
        }
        if conn.websocket() {
            take_frame_counts(&mut self.aggregates, &mut conn);
        }
        if conn.accepted || (conn.adopted && conn.reported()) {
            let outcome =
                if conn.close_frames == [true, true] { Outcome::Close } else { Outcome::Abort };
            self.aggregates.count(conn.series(), outcome);
            let reason = close_reason(&conn.state);
            *self.aggregates.closed.entry((conn.series(), reason)).or_default() += 1;
            let s = &conn.state;
            let what = NoteKind::Ended {
                outcome,
                reason,
                close_code: conn.close_code,
                last_activity_ns: s.last_write_ns.max(s.last_rx_ns).max(s.established_ns),
            };
            note(&mut self.notes, conn.id(cookie), s.state_changed_ns, what);
            info!(
                local = %socket_addr(s.family, &s.local_addr, s.local_port),
                remote = %socket_addr(s.family, &s.remote_addr, s.remote_port),
                role = role_name(conn.role()),
                pid = s.pid,
                outcome = outcome.as_str(),
                reason,
                // Left out when no close frame crossed.
                close_code = conn.close_code,
                closing_handshake = match conn.close_frames {
                    [true, true] => "completed",
                    [false, false] => "none",
                    _ => "never answered",
                },
                "connection closed"
            );
        } else if conn.handshake.as_deref().is_some_and(Handshake::upgrade_requested) {
            // Closed while the upgrade waited for its answer.
            conn.admit(&mut self.aggregates.ports);
            self.aggregates.count(conn.series(), Outcome::Reject);
            note(&mut self.notes, conn.id(cookie), conn.state.state_changed_ns, NoteKind::Reject);
        }
    }
}

/// Counts, once each, the pings of a reported connection still unanswered at `at_ns` after the
/// pong timeout.
fn count_overdue_pings(conn: &mut Conn, at_ns: u64, timeout_ns: u64, aggregates: &mut Aggregates) {
    if conn.outstanding.iter().all(VecDeque::is_empty) {
        return;
    }
    let series = conn.series();
    for ping in conn.outstanding.iter_mut().flatten() {
        if !ping.missed && at_ns.saturating_sub(ping.at_ns) >= timeout_ns {
            ping.missed = true;
            conn.pong_missed += 1;
            *aggregates.pong_missed.entry(series).or_default() += 1;
        }
    }
}

/// Keeps a note when notes are kept.
fn note(notes: &mut Option<Vec<Note>>, id: EndId, at_ns: u64, what: NoteKind) {
    if let Some(notes) = notes {
        notes.push(Note { id, at_ns, what });
    }
}

/// The `comm` the kernel stored, if any.
fn comm(state: &ConnState) -> Option<String> {
    let end = state.comm.iter().position(|&b| b == 0).unwrap_or(state.comm.len());
    (end > 0).then(|| String::from_utf8_lossy(&state.comm[..end]).into_owned())
}

fn count_accept(aggregates: &mut Aggregates, conn: &mut Conn) {
    if conn.accepted || !conn.reported() {
        return;
    }
    conn.accepted = true;
    conn.admit(&mut aggregates.ports);
    aggregates.count(conn.series(), Outcome::Accept);
}

/// Adds what the kernel counted since the last call to the aggregates.
fn take_frame_counts(aggregates: &mut Aggregates, conn: &mut Conn) {
    let Some(ws) = conn.frames.as_deref().copied() else {
        return;
    };
    conn.admit(&mut aggregates.ports);
    let series = conn.series();
    for (d, stream) in ws.dir.iter().enumerate() {
        let base = &mut conn.baseline;
        for (k, &n) in stream.frames.iter().enumerate() {
            let delta = n.wrapping_sub(base.frames[d][k]);
            if delta > 0 {
                *aggregates.messages.entry((series, DIRECTION_NAMES[d], k)).or_default() +=
                    u64::from(delta);
            }
        }
        base.frames[d] = stream.frames;

        let mut sizes = [0u32; MESSAGE_SIZE_BUCKETS];
        for (i, slot) in sizes.iter_mut().enumerate() {
            *slot = stream.message_sizes[i].wrapping_sub(base.sizes[d][i]);
        }
        if sizes.iter().any(|&n| n > 0) {
            let bytes = stream.message_bytes_total.wrapping_sub(base.bytes[d]);
            aggregates
                .message_sizes(series.0, DIRECTION_NAMES[d])
                .add_bucketed(&kernel_buckets(&sizes), bytes as f64);
        }
        base.sizes[d] = stream.message_sizes;
        base.bytes[d] = stream.message_bytes_total;

        // RSV1 marks a compressed message: a violation when the handshake, seen, agreed no
        // permessage-deflate (adopted connections' handshakes were not seen).
        let undeflated = conn.upgrade.as_ref().is_some_and(|u| {
            !u.extensions.as_deref().is_some_and(|e| e.contains("permessage-deflate"))
        });
        let rsv1 = stream.rsv1_frames.wrapping_sub(base.rsv1[d]);
        base.rsv1[d] = stream.rsv1_frames;
        let violations =
            stream.violations.wrapping_sub(base.violations[d]) + if undeflated { rsv1 } else { 0 };
        if violations > 0 {
            *aggregates.violations.entry(series).or_default() += u64::from(violations);
        }
        base.violations[d] = stream.violations;
        aggregates.tracking_lost += u64::from(stream.lost.wrapping_sub(base.lost[d]));
        base.lost[d] = stream.lost;
    }
}

/// Names a protocol from the first bytes a client sent.
pub fn sniff(first: &[u8]) -> &'static str {
    if first.starts_with(&[0x16, 0x03]) {
        "tls"
    } else if first.starts_with(b"PRI * HTTP/2.0") {
        "h2"
    } else if [&b"GET "[..], b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS "]
        .iter()
        .any(|m| first.starts_with(m))
    {
        "http"
    } else {
        "unknown"
    }
}

/// The verdict's evidence, with what the frames add: a ping left unanswered, a closing
/// handshake left half done.
fn detail(conn: &Conn, judgement: &Judgement, now_ns: u64) -> String {
    let mut detail = judgement.detail();
    if let Some(age) = conn.unanswered_ping_ns(now_ns) {
        let age = age as f64 / 1e9;
        detail.push_str(&if conn.pongs == 0 && conn.pings > 1 {
            format!(
                "; a ping unanswered for {age:.0} s, and no pong to any of {} pings",
                conn.pings
            )
        } else {
            format!("; a ping unanswered for {age:.0} s")
        });
    }
    if let Some(closing) = conn.unanswered_close(now_ns) {
        detail.push_str("; ");
        detail.push_str(&closing);
    }
    detail
}

fn view(cookie: u64, conn: &Conn, judgement: &Judgement, now_ns: u64) -> ConnectionView {
    let s = &conn.state;
    let age = |then: u64| (then != 0).then(|| seconds(now_ns.saturating_sub(then)));
    let comm = comm(s);
    let last_frame =
        conn.frames.as_ref().map_or(0, |ws| ws.dir[0].last_frame_ns.max(ws.dir[1].last_frame_ns));
    let upgrade = conn.upgrade.as_ref();
    ConnectionView {
        local_addr: Endpoint(socket_addr(s.family, &s.local_addr, s.local_port)),
        remote_addr: Endpoint(socket_addr(s.family, &s.remote_addr, s.remote_port)),
        role: role_name(conn.role()).into(),
        port: server_port(s),
        metric_port: conn.series().0,
        pid: (s.pid != 0).then_some(s.pid),
        comm,
        websocket: conn.websocket(),
        protocol: if conn.websocket() { "websocket" } else { conn.protocol }.into(),
        state: judgement.verdict,
        detail: detail(conn, judgement, now_ns),
        state_age_seconds: seconds(now_ns.saturating_sub(conn.verdict_since_ns)),
        tcp_state: tcp_state_name(s.tcp_state).into(),
        age_seconds: seconds(now_ns.saturating_sub(s.established_ns)),
        last_send_age_seconds: age(s.last_write_ns),
        last_recv_age_seconds: age(s.last_rx_ns),
        last_read_age_seconds: age(s.last_read_ns),
        send_queue_bytes: s.send_queue(),
        recv_queue_bytes: s.recv_queue(),
        bytes_sent: s.bytes_written,
        bytes_received: s.bytes_received(),
        path: upgrade.map(|u| u.path.split('?').next().unwrap_or_default().to_owned()),
        subprotocol: upgrade.and_then(|u| u.subprotocol.clone()),
        extensions: upgrade.and_then(|u| u.extensions.clone()),
        frames_tracked: conn.frames_tracked(),
        pings: conn.pings,
        pongs: conn.pongs,
        pong_missed: conn.pong_missed,
        last_pong_latency_seconds: conn.last_pong_latency_ns.map(seconds),
        last_frame_age_seconds: age(last_frame),
        close_code: conn.close_code,
        retransmits: s.total_retrans,
        zero_window: s.zero_window_since_ns != 0,
        adopted: conn.adopted,
        cookie,
        attribution: crate::k8s::Attribution::default(),
    }
}

fn seconds(ns: u64) -> f64 {
    (ns / 1_000) as f64 / 1e6
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
    use observer_common::EventHeader;

    use super::*;
    use crate::metrics::OTHER_PORTS;

    const S: u64 = 1_000_000_000;
    const REQUEST: &[u8] =
        b"GET /ws?token=secret HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nCookie: c\r\n\r\n";
    const RESPONSE: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";

    fn tracker() -> Tracker {
        Tracker::new(
            Thresholds {
                idle_after: Duration::from_secs(60),
                stall_after: Duration::from_secs(10),
            },
            Duration::from_secs(10),
        )
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
            flags: flags::HTTP_CANDIDATE | if watched { flags::WATCHED } else { 0 },
            ..ConnState::default()
        }
    }

    fn upgraded(t: &mut Tracker, cookie: u64, state: ConnState) {
        t.chunk(cookie, Direction::Ingress, 0, REQUEST, S, || Some(state));
        let action = t.chunk(cookie, Direction::Egress, 0, RESPONSE, S + S / 100, || None);
        assert_eq!(action, Some(KernelAction::StopForwarding(cookie)));
    }

    /// The kernel's `FRAMES` map as [`Tracker::sync`] reads it: only the cookies it asks for.
    fn kernel_frames(map: &[(u64, WsState)]) -> impl FnOnce(&[u64]) -> Vec<(u64, WsState)> + '_ {
        move |wanted| map.iter().filter(|(cookie, _)| wanted.contains(cookie)).copied().collect()
    }

    fn control(direction: Direction, op: u8, ts_ns: u64, close_code: u16) -> FrameEvent {
        FrameEvent {
            header: EventHeader { ts_ns, ..EventHeader::default() },
            opcode: op,
            direction: direction as u8,
            close_code,
            fin: 1,
            ..FrameEvent::default()
        }
    }

    #[test]
    fn handshake_makes_a_connection_reported_and_counted() {
        let mut t = tracker();
        let s = server(8080, false);
        assert_eq!(t.chunk(7, Direction::Ingress, 0, REQUEST, S, || Some(s)), None);
        assert!(t.refresh(2 * S).is_empty(), "not reported before the 101");
        t.chunk(7, Direction::Egress, 0, RESPONSE, S + S / 100, || unreachable!());
        let views = t.refresh(2 * S);
        assert_eq!(views.len(), 1);
        assert!(views[0].websocket);
        assert_eq!(views[0].protocol, "websocket");
        assert_eq!(views[0].path.as_deref(), Some("/ws"), "query string dropped");
        assert_eq!(views[0].local_addr.to_string(), "127.0.0.1:8080");
        let agg = t.aggregates();
        assert_eq!(agg.connections[&((8080, "server"), Outcome::Accept)], 1);
        assert_eq!(agg.handshake[&8080].count(), 1);
        t.close(7, s, WsState::default());
        assert_eq!(t.aggregates().connections[&((8080, "server"), Outcome::Abort)], 1);
        assert!(t.refresh(3 * S).is_empty());
    }

    #[test]
    fn plain_http_is_untracked_and_never_reported() {
        let mut t = tracker();
        let s = server(8080, false);
        let action = t.chunk(9, Direction::Ingress, 0, b"GET / HTTP/1.1\r\n\r\n", S, || Some(s));
        assert_eq!(action, Some(KernelAction::Untrack(9)));
        assert_eq!(t.len(), 0);
        assert!(t.aggregates().connections.is_empty());
    }

    #[test]
    fn refused_upgrade_counts_a_reject() {
        let mut t = tracker();
        let s = server(8080, false);
        t.chunk(9, Direction::Ingress, 0, REQUEST, S, || Some(s));
        let refusal = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            t.chunk(9, Direction::Egress, 0, refusal, S, || None),
            Some(KernelAction::Untrack(9))
        );
        assert_eq!(t.aggregates().connections[&((8080, "server"), Outcome::Reject)], 1);

        // Closed before any answer.
        t.chunk(10, Direction::Ingress, 0, REQUEST, S, || Some(s));
        t.close(10, s, WsState::default());
        assert_eq!(t.aggregates().connections[&((8080, "server"), Outcome::Reject)], 2);
    }

    #[test]
    fn client_end_reads_its_request_from_egress() {
        let mut t = tracker();
        let mut c = server(8080, false);
        c.role = Role::Client as u8;
        c.local_port = 50000;
        c.remote_port = 8080;
        t.chunk(5, Direction::Egress, 0, REQUEST, S, || Some(c));
        t.chunk(5, Direction::Ingress, 0, RESPONSE, S, || None);
        let views = t.refresh(2 * S);
        assert_eq!((&*views[0].role, views[0].port), ("client", 8080));
    }

    #[test]
    fn watched_port_is_reported_without_handshake_and_named_by_its_first_bytes() {
        let mut t = tracker();
        let mut tls = server(9000, true);
        tls.flags = flags::WATCHED;
        t.sync([(1, tls), (2, server(9001, false))], kernel_frames(&[]));
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00];
        assert_eq!(
            t.chunk(1, Direction::Ingress, 0, &hello, S, || None),
            Some(KernelAction::StopForwarding(1))
        );
        let views = t.refresh(2 * S);
        assert_eq!(views.len(), 1);
        assert!(!views[0].websocket);
        assert_eq!(views[0].protocol, "tls");
        t.sync([], kernel_frames(&[]));
        assert_eq!(t.aggregates().connections[&((9000, "server"), Outcome::Abort)], 1);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), "h2");
    }

    #[test]
    fn a_ping_overdue_when_tcp_ends_is_missed_without_a_refresh_between() {
        let mut t = tracker();
        upgraded(&mut t, 8, server(8080, false));
        // Pings at 20 s and 28 s; the peer gives up at 30 s, before any refresh saw the first
        // one overdue: only the first is past the 10 s pong timeout by then.
        t.frame(8, &control(Direction::Egress, opcode::PING, 20 * S, 0));
        t.frame(8, &control(Direction::Egress, opcode::PING, 28 * S, 0));
        assert_eq!(t.refresh(29 * S)[0].pong_missed, 0);
        let mut ended = server(8080, false);
        ended.state_changed_ns = 30 * S;
        t.close(8, ended, WsState::default());
        assert_eq!(t.aggregates().pong_missed[&(8080, "server")], 1);
    }

    #[test]
    fn pings_pair_with_pongs_and_overdue_ones_are_missed_once() {
        let mut t = tracker();
        upgraded(&mut t, 3, server(8080, false));
        // The server pings at 10 s; the pong comes back 2 ms later.
        t.frame(3, &control(Direction::Egress, opcode::PING, 10 * S, 0));
        t.frame(3, &control(Direction::Ingress, opcode::PONG, 10 * S + 2_000_000, 0));
        // The client pings at 20 s and 25 s and the server never answers: two misses.
        t.frame(3, &control(Direction::Ingress, opcode::PING, 20 * S, 0));
        t.frame(3, &control(Direction::Ingress, opcode::PING, 25 * S, 0));
        assert_eq!(t.refresh(29 * S)[0].pong_missed, 0);
        assert_eq!(t.refresh(30 * S)[0].pong_missed, 1);
        assert_eq!(t.refresh(35 * S)[0].pong_missed, 2);
        let view = &t.refresh(45 * S)[0];
        assert_eq!((view.pings, view.pongs, view.pong_missed), (3, 1, 2));
        assert_eq!(view.last_pong_latency_seconds, Some(0.002));
        let agg = t.aggregates();
        assert_eq!(agg.pong_missed[&(8080, "server")], 2);
        assert_eq!(agg.pong_latency[&(8080, "server")].count(), 1);
    }

    #[test]
    fn ports_past_the_label_limit_share_other_but_watched_ports_never_do() {
        let mut t = tracker();
        t.limit_port_labels(2);
        for (cookie, port) in [(1, 8001), (2, 8002), (3, 8003), (4, 8001)] {
            upgraded(&mut t, cookie, server(port, false));
        }
        let mut watched = server(9000, false);
        watched.flags = flags::WATCHED;
        t.open(5, watched);
        let views = t.refresh(S);
        let by_port = |port| views.iter().find(|v| v.port == port).unwrap().metric_port;
        assert_eq!((by_port(8001), by_port(8002), by_port(8003)), (8001, 8002, OTHER_PORTS));
        assert_eq!(by_port(9000), 9000);
        let accepted = &t.aggregates().connections;
        assert_eq!(accepted[&((8001, "server"), Outcome::Accept)], 2);
        assert_eq!(accepted[&((OTHER_PORTS, "server"), Outcome::Accept)], 1);
        assert!(!accepted.contains_key(&((8003, "server"), Outcome::Accept)));
        let mut open = Vec::new();
        t.judge(S, &mut open);
        let text = crate::metrics::render(&crate::metrics::Inputs {
            open: &open,
            pods: &crate::metrics::PodsByPid::new(),
            aggregates: t.aggregates(),
            events_lost: 0,
            maps: &[],
            last_refresh_unix_seconds: 0.0,
            hooks: &[],
            pod_labels: false,
        });
        assert!(text.contains("websocket_connections_active{port=\"other\",role=\"server\"} 1"));
        assert!(!text.contains("port=\"8003\""));
    }

    #[test]
    fn views_show_the_last_judgement_whenever_they_are_asked_for() {
        let mut t = tracker();
        upgraded(&mut t, 1, server(8080, false));
        let mut open = Vec::new();
        t.judge(70 * S, &mut open);
        assert_eq!(open.len(), 1);
        assert_eq!((open[0].series, open[0].verdict), ((8080, "server"), Verdict::Idle));
        // Judged once: a connection upgraded since waits for the next judgement, and the views
        // keep the ages and the evidence of the moment of judgement.
        upgraded(&mut t, 2, server(8081, false));
        let views = t.views();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].state, Verdict::Idle);
        assert_eq!(views[0].age_seconds, 69.0);
        assert_eq!(views[0].detail, "no application data either way for 69 s");
        t.judge(71 * S, &mut open);
        assert_eq!(t.views().len(), 2);
        assert_eq!(open.len(), 2);
    }

    #[test]
    fn a_peer_that_never_pongs_is_named_as_such() {
        let mut t = tracker();
        upgraded(&mut t, 3, server(8080, false));
        for at in [1, 2, 3] {
            t.frame(3, &control(Direction::Egress, opcode::PING, at * S, 0));
        }
        let detail = &t.refresh(20 * S)[0].detail;
        assert!(
            detail.ends_with("; a ping unanswered for 19 s, and no pong to any of 3 pings"),
            "{detail}"
        );
    }

    #[test]
    fn a_pong_answers_the_latest_ping_and_the_ones_before_it() {
        let mut t = tracker();
        upgraded(&mut t, 3, server(8080, false));
        // Three pings a second apart, one pong for the last: nothing missed, latency from it.
        for at in [1, 2, 3] {
            t.frame(3, &control(Direction::Egress, opcode::PING, at * S, 0));
        }
        t.frame(3, &control(Direction::Ingress, opcode::PONG, 3 * S + 5_000_000, 0));
        let view = &t.refresh(60 * S)[0];
        assert_eq!((view.pings, view.pongs, view.pong_missed), (3, 1, 0));
        assert_eq!(view.last_pong_latency_seconds, Some(0.005));

        // A peer that never answers a flood of pings: each one counted missed, once.
        for i in 0..100 {
            t.frame(3, &control(Direction::Egress, opcode::PING, 61 * S + i * 1_000_000, 0));
        }
        assert_eq!(t.refresh(62 * S)[0].pong_missed, 100 - MAX_OUTSTANDING_PINGS as u64);
        assert_eq!(t.refresh(80 * S)[0].pong_missed, 100);
        assert_eq!(t.refresh(90 * S)[0].pong_missed, 100);
    }

    #[test]
    fn notes_are_kept_only_when_asked_for() {
        let mut t = tracker();
        upgraded(&mut t, 3, server(8080, false));
        t.frame(3, &control(Direction::Egress, opcode::PING, 10 * S, 0));
        assert!(t.take_notes().is_empty(), "no notes unless asked");

        t.keep_notes();
        t.frame(3, &control(Direction::Ingress, opcode::PONG, 10 * S + 2_000_000, 0));
        t.frame(3, &control(Direction::Ingress, opcode::PING, 20 * S, 0));
        t.refresh(31 * S);
        t.close(3, server(8080, false), WsState::default());
        let notes = t.take_notes();
        let kinds: Vec<_> = notes.iter().map(|n| (n.at_ns, n.what.clone())).collect();
        assert_eq!(
            kinds[..2],
            [
                (
                    10 * S + 2_000_000,
                    NoteKind::Pong { direction: Direction::Ingress, latency_ns: Some(2_000_000) }
                ),
                (20 * S, NoteKind::Ping { direction: Direction::Ingress }),
            ]
        );
        assert_eq!(notes.len(), 3);
        assert!(matches!(
            notes[2].what,
            NoteKind::Ended { outcome: Outcome::Abort, reason: "clean", close_code: None, .. }
        ));
        assert!(notes.iter().all(|n| (n.id.cookie, n.id.port, n.id.role) == (3, 8080, "server")));
        assert!(t.take_notes().is_empty(), "taken once");
    }

    #[test]
    fn a_connection_gone_before_its_events_were_read_is_counted_from_its_close() {
        let mut t = tracker();
        // Opened, upgraded, closed cleanly while the agent read nothing: its kernel entry is gone.
        assert_eq!(t.chunk(5, Direction::Ingress, 0, REQUEST, S, || None), None);
        assert_eq!(t.chunk(5, Direction::Egress, 0, RESPONSE, S + S / 100, || None), None);
        t.frame(5, &control(Direction::Ingress, opcode::CLOSE, 2 * S, 1000));
        t.frame(5, &control(Direction::Egress, opcode::CLOSE, 2 * S, 1000));
        assert_eq!(t.len(), 0, "nothing is reported before its state is known");
        t.close(5, server(8080, false), WsState::default());
        let agg = t.aggregates();
        assert_eq!(agg.connections[&((8080, "server"), Outcome::Accept)], 1);
        assert_eq!(agg.connections[&((8080, "server"), Outcome::Close)], 1);
        assert_eq!(agg.handshake[&8080].count(), 1);
        assert_eq!(agg.closes[&((8080, "server"), "1000".to_owned(), "peer")], 1);
        assert_eq!(agg.events_unmatched, 0);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn held_events_whose_close_never_comes_are_dropped() {
        let mut t = tracker();
        t.chunk(6, Direction::Ingress, 0, REQUEST, S, || None);
        // A frame of a connection never seen at all is not held.
        t.frame(7, &control(Direction::Ingress, opcode::PING, 2 * S, 0));
        for _ in 0..3 {
            t.sync([], kernel_frames(&[]));
        }
        // Its close, too late: nothing to replay.
        t.close(6, server(8080, false), WsState::default());
        assert!(t.aggregates().connections.is_empty());
        assert_eq!(t.aggregates().events_unmatched, 0);
    }

    #[test]
    fn held_connections_are_bounded_and_the_excess_counted() {
        let mut t = tracker();
        for cookie in 0..MAX_EARLY_CONNS as u64 + 5 {
            t.chunk(cookie, Direction::Ingress, 0, REQUEST, S, || None);
        }
        assert_eq!(t.aggregates().events_unmatched, 5);
        t.close(3, server(8080, false), WsState::default());
        assert_eq!(t.aggregates().connections[&((8080, "server"), Outcome::Reject)], 1);
    }

    #[test]
    fn a_close_frame_left_unanswered_is_named_and_ends_as_an_abort() {
        let mut t = tracker();
        upgraded(&mut t, 4, server(8080, false));
        t.frame(4, &control(Direction::Egress, opcode::CLOSE, 5 * S, 1000));
        let view = &t.refresh(8 * S)[0];
        assert!(
            view.detail.ends_with("; closing: close frame sent 3 s ago, no close reply"),
            "{}",
            view.detail
        );
        t.close(4, server(8080, false), WsState::default());
        let agg = t.aggregates();
        assert_eq!(agg.closes[&((8080, "server"), "1000".to_owned(), "local")], 1);
        assert_eq!(agg.connections[&((8080, "server"), Outcome::Abort)], 1);
    }

    #[test]
    fn adopted_queues_are_corrected_once_the_connection_is_quiet() {
        let mut t = tracker();
        // Adopted with 100 bytes received and none unread; 10 more arrived and were read
        // before the entry existed: the kernel's count has them, the read count does not.
        let mut s = server(8080, true);
        s.flags |= flags::ADOPTED;
        s.tcp_bytes_received = 110;
        s.received_origin = 100;
        s.last_rx_ns = S;
        t.adopt(5, s, WsState::default());
        t.sync([(5, s)], kernel_frames(&[]));
        assert!(t.unverified_quiet(S + S / 10, S).is_empty(), "not quiet yet");
        assert_eq!(t.unverified_quiet(3 * S, S), vec![5]);
        assert_eq!(t.refresh(3 * S)[0].recv_queue_bytes, 10);
        t.verify_queues(5, 0, 0);
        assert!(t.unverified_quiet(4 * S, S).is_empty());
        t.sync([(5, s)], kernel_frames(&[]));
        assert_eq!(t.refresh(4 * S)[0].recv_queue_bytes, 0);
        // Later bytes count as before.
        s.tcp_bytes_received = 150;
        t.sync([(5, s)], kernel_frames(&[]));
        assert_eq!(t.refresh(5 * S)[0].recv_queue_bytes, 40);
    }

    #[test]
    fn close_frames_both_ways_make_a_clean_close() {
        let mut t = tracker();
        upgraded(&mut t, 4, server(8080, false));
        t.frame(4, &control(Direction::Ingress, opcode::CLOSE, 5 * S, 1001));
        t.frame(4, &control(Direction::Egress, opcode::CLOSE, 5 * S, 1001));
        assert_eq!(t.refresh(6 * S)[0].close_code, Some(1001));
        t.close(4, server(8080, false), WsState::default());
        let agg = t.aggregates();
        assert_eq!(agg.closes[&((8080, "server"), "1001".to_owned(), "peer")], 1);
        assert_eq!(agg.connections[&((8080, "server"), Outcome::Close)], 1);
    }

    #[test]
    fn kernel_frame_counts_become_deltas_and_data_frames_drive_activity() {
        let mut t = tracker();
        let s = server(8080, false);
        upgraded(&mut t, 6, s);
        let mut ws = WsState::default();
        for d in &mut ws.dir {
            d.phase = Phase::Frames as u8;
        }
        ws.dir[0].frames[kind::TEXT] = 5;
        ws.dir[0].message_sizes[0] = 5;
        ws.dir[0].message_bytes_total = 50;
        ws.dir[0].last_data_ns = 2 * S;
        ws.dir[1].frames[kind::PING] = 9;
        ws.dir[1].last_frame_ns = 100 * S;
        t.sync([(6, s)], kernel_frames(&[(6, ws)]));
        t.sync([(6, s)], kernel_frames(&[(6, ws)]));
        // Two more text messages came in: the entry changed with them.
        ws.dir[0].frames[kind::TEXT] = 7;
        let mut s = s;
        s.tcp_bytes_received += 20;
        s.bytes_read += 20;
        t.sync([(6, s)], kernel_frames(&[(6, ws)]));
        let agg = t.aggregates();
        assert_eq!(agg.messages[&((8080, "server"), "in", kind::TEXT)], 7);
        assert_eq!(agg.messages[&((8080, "server"), "out", kind::PING)], 9);
        assert_eq!(agg.message_sizes[&(8080, "in")].count(), 5);
        // Only pings for 98 s: idle at the application level, with the heartbeat visible.
        let view = &t.refresh(100 * S)[0];
        assert_eq!(view.state, Verdict::Idle);
        assert!(view.frames_tracked);
        assert_eq!(view.last_frame_age_seconds, Some(0.0));
    }

    #[test]
    fn frames_are_read_when_the_entry_changed_and_once_more_after() {
        let mut t = tracker();
        let mut s = server(8080, false);
        upgraded(&mut t, 6, s);
        let asked = std::cell::RefCell::new(Vec::new());
        let pass = |t: &mut Tracker, s: ConnState| {
            t.sync([(6, s)], |wanted: &[u64]| {
                asked.borrow_mut().push(wanted.to_vec());
                Vec::<(u64, WsState)>::new()
            });
        };
        // Never read: read. Then the entry stands still and its frames are not read again,
        // until it changes, and in the pass after that, for the frames the kernel was still
        // tracking while the changed entry was read.
        pass(&mut t, s);
        pass(&mut t, s);
        s.tcp_bytes_received += 10;
        pass(&mut t, s);
        pass(&mut t, s);
        pass(&mut t, s);
        assert_eq!(*asked.borrow(), vec![vec![6], vec![], vec![6], vec![6], vec![]]);
    }

    #[test]
    fn rsv1_is_a_violation_only_without_permessage_deflate() {
        for (extensions, expected) in [(None, Some(&2)), (Some("permessage-deflate"), None)] {
            let mut t = tracker();
            let s = server(8080, false);
            upgraded(&mut t, 8, s);
            t.conns.get_mut(&8).unwrap().upgrade.as_mut().unwrap().extensions =
                extensions.map(str::to_owned);
            let mut ws = WsState::default();
            ws.dir[0].rsv1_frames = 2;
            t.sync([(8, s)], kernel_frames(&[(8, ws)]));
            assert_eq!(
                t.aggregates().violations.get(&(8080, "server")),
                expected,
                "{extensions:?}"
            );
        }
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

    #[test]
    fn views_read_back_from_json_as_they_were() {
        let view = ConnectionView {
            local_addr: "[::1]:8080".parse().unwrap(),
            remote_addr: "10.0.0.1:41000".parse().unwrap(),
            role: "server".into(),
            tcp_state: "ESTABLISHED".into(),
            ..ConnectionView::default()
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["local_addr"], "[::1]:8080");
        assert_eq!(json["remote_addr"], "10.0.0.1:41000");
        assert_eq!(json["role"], "server");
        let back: ConnectionView = serde_json::from_value(json).unwrap();
        assert_eq!(back, view);
    }
}
