//! Every metric observer exports: the aggregates the table feeds, and their rendering in the
//! Prometheus text format.
//!
//! Names follow `prefix_name_unit[_total]`. Labels are the server `port`, the `role`, the frame
//! `direction` (`in` to the socket, `out` of it) and `opcode`, the verdict `state`, the `result`,
//! and the close `code` (exact for the codes RFC 6455 defines, grouped by range otherwise) with
//! its `initiator`: the number of series is bounded by the ports seen, never by connections,
//! processes, addresses or anything a peer sends. With `--pod-labels`, the gauges of open
//! connections also carry the Kubernetes `namespace` and `pod`: one series per port, role and pod
//! that has an open connection now, so the count follows the pods running on the node.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::{Display, Write as _},
};

use observer_common::frame::{MESSAGE_SIZE_BOUNDS, MESSAGE_SIZE_BUCKETS, kind};

use crate::verdict::Verdict;

/// `(server port, role)`; the port is [`OTHER_PORTS`] for ports past the label limit.
pub type SeriesKey = (u16, &'static str);

/// The `port` of series whose server port came after the first `--max-port-labels` ones: no
/// server listens on port 0, so it cannot clash. Written `other`.
pub const OTHER_PORTS: u16 = 0;

/// Which server ports get a `port` label of their own: every watched port, and the first
/// `limit` others seen, in the order they were first counted. Later ones share `other`, so a
/// host whose clients reach WebSocket servers on many ports still has a bounded number of series.
#[derive(Debug)]
pub struct PortLabels {
    limit: usize,
    labelled: BTreeSet<u16>,
    /// Ports that fell into `other`, for the log.
    folded: BTreeSet<u16>,
}

impl Default for PortLabels {
    fn default() -> Self {
        Self::new(DEFAULT_PORT_LABELS)
    }
}

/// Default of `--max-port-labels`.
pub const DEFAULT_PORT_LABELS: usize = 64;

impl PortLabels {
    pub fn new(limit: usize) -> Self {
        Self { limit, labelled: BTreeSet::new(), folded: BTreeSet::new() }
    }

    /// Changes the limit; ports already labelled keep their label.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// The `port` label value for a connection end of server `port`.
    pub fn label(&mut self, port: u16, watched: bool) -> u16 {
        if watched || self.labelled.contains(&port) {
            return port;
        }
        if self.labelled.len() < self.limit {
            self.labelled.insert(port);
            return port;
        }
        if self.folded.insert(port) {
            tracing::info!(
                port,
                limit = self.limit,
                "more server ports than --max-port-labels: counted as port=\"other\""
            );
        }
        OTHER_PORTS
    }
}

/// A `port` label value as written.
struct PortLabel(u16);

impl Display for PortLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            OTHER_PORTS => f.write_str("other"),
            port => write!(f, "{port}"),
        }
    }
}

/// How a connection end's WebSocket life went, for `websocket_connections_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// The upgrade was answered with 101 (or the connection opened on a watched port).
    Accept,
    /// The upgrade was answered with another status, or the connection closed before an answer.
    Reject,
    /// TCP ended after close frames went both ways.
    Close,
    /// TCP ended (FIN or RST) without a completed closing handshake.
    Abort,
}

impl Outcome {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Reject => "reject",
            Self::Close => "close",
            Self::Abort => "abort",
        }
    }
}

/// Bucket bounds of `websocket_handshake_duration_seconds`: 1 ms to 10 s.
pub const HANDSHAKE_BUCKETS: [f64; 13] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Bucket bounds of `websocket_pong_latency_seconds`: 100 µs to 10 s.
pub const PONG_BUCKETS: [f64; 12] =
    [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 10.0];

/// A cumulative histogram with fixed bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    pub fn observe(&mut self, value: f64) {
        let i = self.bounds.iter().position(|b| value <= *b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += value;
    }

    /// Adds `n` observations already bucketed by the same bounds, summing to `sum`.
    pub fn add_bucketed(&mut self, counts: &[u64], sum: f64) {
        for (mine, n) in self.counts.iter_mut().zip(counts) {
            *mine += n;
        }
        self.sum += sum;
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Byte bounds of `websocket_message_size_bytes`, as the kernel buckets them.
static MESSAGE_BOUNDS: [f64; MESSAGE_SIZE_BOUNDS.len()] = {
    let mut out = [0.0; MESSAGE_SIZE_BOUNDS.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = MESSAGE_SIZE_BOUNDS[i] as f64;
        i += 1;
    }
    out
};

/// The label value of a close status code: exact for codes RFC 6455 defines or registers,
/// grouped for the ranges left to libraries and applications, `invalid` otherwise.
pub fn close_code_label(code: u16) -> String {
    match code {
        1000..=1015 => code.to_string(),
        3000..=3999 => "3xxx".into(),
        4000..=4999 => "4xxx".into(),
        _ => "invalid".into(),
    }
}

/// Counters and histograms accumulated over the agent's life.
#[derive(Debug, Default)]
pub struct Aggregates {
    /// Every `(port, role)` ever reported, so gauges drop to zero instead of vanishing.
    pub known: BTreeSet<SeriesKey>,
    pub connections: BTreeMap<(SeriesKey, Outcome), u64>,
    /// `((port, role), direction, frame kind)`.
    pub messages: BTreeMap<(SeriesKey, &'static str, usize), u64>,
    /// `(port, direction)`.
    pub message_sizes: BTreeMap<(u16, &'static str), Histogram>,
    pub handshake: BTreeMap<u16, Histogram>,
    pub pong_latency: BTreeMap<SeriesKey, Histogram>,
    pub pong_missed: BTreeMap<SeriesKey, u64>,
    /// `((port, role), code label, initiator)`.
    pub closes: BTreeMap<(SeriesKey, String, &'static str), u64>,
    pub violations: BTreeMap<SeriesKey, u64>,
    /// `((port, role), reason)` of connections that ended.
    pub closed: BTreeMap<(SeriesKey, &'static str), u64>,
    /// Times frame tracking of a direction was lost.
    pub tracking_lost: u64,
    /// Kernel events dropped because too many closed connections' events were held.
    pub events_unmatched: u64,
    /// Which ports have a label of their own.
    pub ports: PortLabels,
}

impl Aggregates {
    pub fn count(&mut self, key: SeriesKey, outcome: Outcome) {
        self.known.insert(key);
        *self.connections.entry((key, outcome)).or_default() += 1;
    }

    pub fn handshake(&mut self, port: u16, seconds: f64) {
        self.handshake
            .entry(port)
            .or_insert_with(|| Histogram::new(&HANDSHAKE_BUCKETS))
            .observe(seconds);
    }

    pub fn pong(&mut self, key: SeriesKey, seconds: f64) {
        self.pong_latency
            .entry(key)
            .or_insert_with(|| Histogram::new(&PONG_BUCKETS))
            .observe(seconds);
    }

    pub fn message_sizes(&mut self, port: u16, direction: &'static str) -> &mut Histogram {
        self.message_sizes
            .entry((port, direction))
            .or_insert_with(|| Histogram::new(&MESSAGE_BOUNDS))
    }
}

/// What the gauges need of one reported connection end, as of the last refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenEnd {
    pub series: SeriesKey,
    /// The process holding it, by which its pod is found.
    pub pid: Option<u32>,
    pub verdict: Verdict,
    pub send_queue: u64,
    pub recv_queue: u64,
}

/// `(namespace, pod)` of the processes that hold connections and run in a pod.
pub type PodsByPid = HashMap<u32, (String, String)>;

/// What one rendering needs besides the aggregates.
pub struct Inputs<'a> {
    pub open: &'a [OpenEnd],
    /// Consulted only with `pod_labels`.
    pub pods: &'a PodsByPid,
    pub aggregates: &'a Aggregates,
    pub events_lost: u64,
    /// Each kernel map the agent keeps below its limit: its fill and evictions, and the entries
    /// the kernel programs could not insert because it was full.
    pub maps: &'a [MapInputs],
    pub last_refresh_unix_seconds: f64,
    /// Optional kernel programs, and whether each is attached.
    pub hooks: &'a [(&'static str, bool)],
    /// Break the gauges of open connections down by `namespace` and `pod`.
    pub pod_labels: bool,
}

/// One kernel map in [`Inputs::maps`].
pub struct MapInputs {
    pub name: &'static str,
    pub usage: crate::evict::Usage,
    pub insert_failures: u64,
}

/// `(namespace, pod)` of a gauge series; `None` without `--pod-labels` or outside any pod.
type PodKey<'a> = Option<(&'a str, &'a str)>;

#[derive(Default)]
struct PerSeries {
    open: u64,
    by_state: [u64; Verdict::ALL.len()],
    send_queue: u64,
    recv_queue: u64,
}

type Labels<'a> = [(&'a str, &'a dyn Display)];

/// Renders the whole exposition.
pub fn render(inputs: &Inputs<'_>) -> String {
    let agg = inputs.aggregates;
    let mut series: BTreeMap<(SeriesKey, PodKey<'_>), PerSeries> = BTreeMap::new();
    for end in inputs.open {
        let pod = if inputs.pod_labels {
            let pod = end.pid.and_then(|pid| inputs.pods.get(&pid));
            pod.map(|(namespace, pod)| (namespace.as_str(), pod.as_str()))
        } else {
            None
        };
        let s = series.entry((end.series, pod)).or_default();
        s.open += 1;
        s.by_state[Verdict::ALL.iter().position(|v| *v == end.verdict).unwrap_or(0)] += 1;
        s.send_queue += end.send_queue;
        s.recv_queue += end.recv_queue;
    }
    // Known ports and roles with no open connection show zeros rather than vanishing.
    for &key in &agg.known {
        if !series.keys().any(|(k, _)| *k == key) {
            series.insert((key, None), PerSeries::default());
        }
    }

    let mut out = String::with_capacity(8192);
    let o = &mut out;

    family(o, "websocket_connections_active", "gauge", "Open WebSocket connection ends.");
    for (((port, role), pod), s) in &series {
        let port = PortLabel(*port);
        let labels = with_pod(&[("port", &port), ("role", role)], pod);
        sample(o, "websocket_connections_active", &labels, s.open);
    }

    family(
        o,
        "websocket_connections_total",
        "counter",
        "WebSocket connection ends by how they started (accept, reject) and ended (close, abort).",
    );
    for (((port, role), outcome), n) in &agg.connections {
        let labels: &Labels =
            &[("port", &PortLabel(*port)), ("role", role), ("result", &outcome.as_str())];
        sample(o, "websocket_connections_total", labels, *n);
    }

    family(
        o,
        "websocket_connections_by_state",
        "gauge",
        "Open WebSocket connection ends by liveness verdict.",
    );
    for (((port, role), pod), s) in &series {
        for (i, verdict) in Verdict::ALL.iter().enumerate() {
            let port = PortLabel(*port);
            let labels = with_pod(&[("port", &port), ("role", role), ("state", verdict)], pod);
            sample(o, "websocket_connections_by_state", &labels, s.by_state[i]);
        }
    }

    family(
        o,
        "websocket_buffered_amount_bytes",
        "gauge",
        "Bytes written by applications and not yet acknowledged by the peer, summed.",
    );
    for (((port, role), pod), s) in &series {
        let port = PortLabel(*port);
        let labels = with_pod(&[("port", &port), ("role", role)], pod);
        sample(o, "websocket_buffered_amount_bytes", &labels, s.send_queue);
    }

    family(
        o,
        "websocket_receive_queue_bytes",
        "gauge",
        "Bytes received from the peer and not yet read by the application, summed.",
    );
    for (((port, role), pod), s) in &series {
        let port = PortLabel(*port);
        let labels = with_pod(&[("port", &port), ("role", role)], pod);
        sample(o, "websocket_receive_queue_bytes", &labels, s.recv_queue);
    }

    family(
        o,
        "websocket_handshake_duration_seconds",
        "histogram",
        "Time from the first byte of the upgrade request to the end of the response headers.",
    );
    for (port, h) in &agg.handshake {
        histogram(o, "websocket_handshake_duration_seconds", &[("port", &PortLabel(*port))], h);
    }

    family(
        o,
        "websocket_messages_total",
        "counter",
        "WebSocket frames by direction (in to the socket, out of it) and opcode.",
    );
    for (((port, role), direction, k), n) in &agg.messages {
        let opcode = kind::NAMES[*k];
        let labels: &Labels = &[
            ("port", &PortLabel(*port)),
            ("role", role),
            ("direction", direction),
            ("opcode", &opcode),
        ];
        sample(o, "websocket_messages_total", labels, *n);
    }

    family(
        o,
        "websocket_message_size_bytes",
        "histogram",
        "Sizes of whole data messages (all their fragments), by direction.",
    );
    for ((port, direction), h) in &agg.message_sizes {
        histogram(
            o,
            "websocket_message_size_bytes",
            &[("port", &PortLabel(*port)), ("direction", direction)],
            h,
        );
    }

    family(
        o,
        "websocket_pong_latency_seconds",
        "histogram",
        "Time from a ping to its pong, for pings in either direction.",
    );
    for ((port, role), h) in &agg.pong_latency {
        histogram(
            o,
            "websocket_pong_latency_seconds",
            &[("port", &PortLabel(*port)), ("role", role)],
            h,
        );
    }

    family(
        o,
        "websocket_pong_missed_total",
        "counter",
        "Pings left unanswered for the pong timeout.",
    );
    for ((port, role), n) in &agg.pong_missed {
        sample(
            o,
            "websocket_pong_missed_total",
            &[("port", &PortLabel(*port)), ("role", role)],
            *n,
        );
    }

    family(
        o,
        "websocket_close_total",
        "counter",
        "Closing handshakes by the first close frame's code and who sent it (local or peer).",
    );
    for (((port, role), code, initiator), n) in &agg.closes {
        let labels: &Labels = &[
            ("port", &PortLabel(*port)),
            ("role", role),
            ("code", code),
            ("initiator", initiator),
        ];
        sample(o, "websocket_close_total", labels, *n);
    }

    family(
        o,
        "websocket_protocol_violations_total",
        "counter",
        "Frames breaking RFC 6455 framing rules (reserved opcode, bad masking, fragmented control).",
    );
    for ((port, role), n) in &agg.violations {
        sample(
            o,
            "websocket_protocol_violations_total",
            &[("port", &PortLabel(*port)), ("role", role)],
            *n,
        );
    }

    family(
        o,
        "websocket_connections_closed_total",
        "counter",
        "WebSocket connection ends by how TCP ended: clean, reset_sent, reset_received, timeout \
         (retransmissions gave up), aborted (closed with data unread).",
    );
    for (((port, role), reason), n) in &agg.closed {
        let labels: &Labels = &[("port", &PortLabel(*port)), ("role", role), ("reason", reason)];
        sample(o, "websocket_connections_closed_total", labels, *n);
    }

    family(o, "observer_build_info", "gauge", "Build of the running agent.");
    sample(o, "observer_build_info", &[("version", &env!("CARGO_PKG_VERSION"))], 1);

    family(
        o,
        "observer_events_lost_total",
        "counter",
        "Kernel events dropped because the ring buffer was full.",
    );
    sample(o, "observer_events_lost_total", &[], inputs.events_lost);

    family(o, "observer_map_capacity", "gauge", "Most entries a kernel map holds (set by flags).");
    for map in inputs.maps {
        sample(o, "observer_map_capacity", &[("map", &map.name)], u64::from(map.usage.capacity));
    }
    family(o, "observer_map_entries", "gauge", "Entries in a kernel map at the last refresh.");
    for map in inputs.maps {
        sample(o, "observer_map_entries", &[("map", &map.name)], map.usage.entries);
    }
    family(
        o,
        "observer_map_evictions_total",
        "counter",
        "Entries the agent evicted from a nearly full kernel map: conns (the connection stops \
         being watched) or frames (it loses frame counts only); longest idle non-WebSocket first.",
    );
    for map in inputs.maps {
        sample(o, "observer_map_evictions_total", &[("map", &map.name)], map.usage.evictions);
    }
    family(
        o,
        "observer_map_insert_failures_total",
        "counter",
        "Connections the kernel programs could not add to a full map: conns (not watched at \
         all) or frames (no frame counts).",
    );
    for map in inputs.maps {
        sample(o, "observer_map_insert_failures_total", &[("map", &map.name)], map.insert_failures);
    }

    family(
        o,
        "observer_frame_tracking_lost_total",
        "counter",
        "Stream directions whose frame boundaries were lost (bytes the kernel never saw).",
    );
    sample(o, "observer_frame_tracking_lost_total", &[], agg.tracking_lost);

    family(
        o,
        "observer_events_unmatched_total",
        "counter",
        "Kernel events dropped unread because too many connections that had closed before \
         their events were read were waiting for their close event.",
    );
    sample(o, "observer_events_unmatched_total", &[], agg.events_unmatched);

    family(
        o,
        "observer_hook_attached",
        "gauge",
        "Whether an optional kernel program is attached (1) or not (0, with what is lost logged).",
    );
    for (program, attached) in inputs.hooks {
        sample(o, "observer_hook_attached", &[("program", program)], u64::from(*attached));
    }

    family(
        o,
        "observer_last_refresh_timestamp_seconds",
        "gauge",
        "Unix time of the last completed refresh of all verdicts.",
    );
    let _ = writeln!(
        o,
        "observer_last_refresh_timestamp_seconds {:.3}",
        inputs.last_refresh_unix_seconds
    );
    out
}

/// `labels`, followed by `namespace` and `pod` when the series belongs to a pod.
fn with_pod<'a>(labels: &Labels<'a>, pod: &'a PodKey<'a>) -> Vec<(&'a str, &'a dyn Display)> {
    let mut all = labels.to_vec();
    if let Some((namespace, name)) = pod {
        all.push(("namespace", namespace));
        all.push(("pod", name));
    }
    all
}

/// Appends how long the refresh that rendered `out` took, rendering included.
pub fn append_refresh_duration(out: &mut String, seconds: f64) {
    family(
        out,
        "observer_refresh_duration_seconds",
        "gauge",
        "Duration of the last refresh: reading the kernel map, verdicts and rendering.",
    );
    let _ = writeln!(out, "observer_refresh_duration_seconds {seconds:.6}");
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &Labels, value: u64) {
    out.push_str(name);
    write_labels(out, labels, None);
    let _ = writeln!(out, " {value}");
}

fn histogram(out: &mut String, name: &str, labels: &Labels, h: &Histogram) {
    let mut cumulative = 0;
    for (i, n) in h.counts.iter().enumerate() {
        cumulative += n;
        let le = h.bounds.get(i).map_or("+Inf".to_owned(), |b| format!("{b}"));
        let _ = write!(out, "{name}_bucket");
        write_labels(out, labels, Some(&le));
        let _ = writeln!(out, " {cumulative}");
    }
    let _ = write!(out, "{name}_sum");
    write_labels(out, labels, None);
    let _ = writeln!(out, " {}", h.sum);
    let _ = write!(out, "{name}_count");
    write_labels(out, labels, None);
    let _ = writeln!(out, " {cumulative}");
}

fn write_labels(out: &mut String, labels: &Labels, le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    let pairs =
        labels.iter().map(|(k, v)| (*k, v.to_string())).chain(le.map(|le| ("le", le.to_owned())));
    for (key, value) in pairs {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{key}=\"{}\"", escape(&value));
    }
    out.push('}');
}

/// Escapes a label value as the text format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Kernel message-size buckets as counts for [`Histogram::add_bucketed`].
pub fn kernel_buckets(counts: &[u32; MESSAGE_SIZE_BUCKETS]) -> [u64; MESSAGE_SIZE_BUCKETS] {
    counts.map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(port: u16, role: &'static str, verdict: Verdict, sendq: u64, recvq: u64) -> OpenEnd {
        OpenEnd { series: (port, role), pid: None, verdict, send_queue: sendq, recv_queue: recvq }
    }

    fn render_with(open: &[OpenEnd], agg: &Aggregates) -> String {
        render(&Inputs {
            open,
            pods: &PodsByPid::new(),
            aggregates: agg,
            events_lost: 4,
            maps: &[MapInputs {
                name: "conns",
                usage: crate::evict::Usage { capacity: 1024, entries: 1000, evictions: 7 },
                insert_failures: 2,
            }],
            last_refresh_unix_seconds: 1_700_000_000.5,
            hooks: &[("observer_rst_in", true), ("observer_rst_out", false)],
            pod_labels: false,
        })
    }

    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(text.lines().any(|l| l == *line), "missing {line:?} in\n{text}");
        }
        // Every sample line belongs to a family declared with HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name.trim_end_matches("_bucket").trim_end_matches("_sum");
            let family = family.trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {family} ")),
                "undeclared {name}"
            );
        }
    }

    #[test]
    fn renders_aggregates_per_port_and_role() {
        let connections = [
            conn(8080, "server", Verdict::Active, 10, 0),
            conn(8080, "server", Verdict::NotReading, 5, 700),
            conn(8080, "client", Verdict::Idle, 0, 0),
        ];
        let mut agg = Aggregates::default();
        agg.count((8080, "server"), Outcome::Accept);
        agg.count((8080, "server"), Outcome::Accept);
        agg.count((8080, "server"), Outcome::Abort);
        agg.known.insert((9090, "server"));
        let text = render_with(&connections, &agg);
        assert_lines(
            &text,
            &[
                "websocket_connections_active{port=\"8080\",role=\"server\"} 2",
                "websocket_connections_active{port=\"8080\",role=\"client\"} 1",
                "websocket_connections_active{port=\"9090\",role=\"server\"} 0",
                "websocket_connections_total{port=\"8080\",role=\"server\",result=\"accept\"} 2",
                "websocket_connections_total{port=\"8080\",role=\"server\",result=\"abort\"} 1",
                "websocket_connections_by_state{port=\"8080\",role=\"server\",state=\"not_reading\"} 1",
                "websocket_connections_by_state{port=\"8080\",role=\"server\",state=\"idle\"} 0",
                "websocket_connections_by_state{port=\"8080\",role=\"client\",state=\"idle\"} 1",
                "websocket_buffered_amount_bytes{port=\"8080\",role=\"server\"} 15",
                "websocket_receive_queue_bytes{port=\"8080\",role=\"server\"} 700",
                "observer_events_lost_total 4",
                "observer_map_capacity{map=\"conns\"} 1024",
                "observer_map_entries{map=\"conns\"} 1000",
                "observer_map_evictions_total{map=\"conns\"} 7",
                "observer_map_insert_failures_total{map=\"conns\"} 2",
                "observer_hook_attached{program=\"observer_rst_out\"} 0",
                "observer_last_refresh_timestamp_seconds 1700000000.500",
            ],
        );
    }

    #[test]
    fn renders_histograms_and_frame_counters() {
        let mut agg = Aggregates::default();
        agg.handshake(8080, 0.003);
        agg.handshake(8080, 20.0);
        agg.pong((8080, "client"), 0.0002);
        *agg.messages.entry(((8080, "server"), "in", kind::PING)).or_default() += 3;
        let mut buckets = [0u32; MESSAGE_SIZE_BUCKETS];
        buckets[0] = 2;
        buckets[MESSAGE_SIZE_BUCKETS - 1] = 1;
        agg.message_sizes(8080, "out").add_bucketed(&kernel_buckets(&buckets), 100.0);
        *agg.closes.entry(((8080, "server"), close_code_label(1011), "peer")).or_default() += 1;
        let text = render_with(&[], &agg);
        assert_lines(
            &text,
            &[
                "websocket_handshake_duration_seconds_bucket{port=\"8080\",le=\"0.0025\"} 0",
                "websocket_handshake_duration_seconds_bucket{port=\"8080\",le=\"0.005\"} 1",
                "websocket_handshake_duration_seconds_bucket{port=\"8080\",le=\"10\"} 1",
                "websocket_handshake_duration_seconds_bucket{port=\"8080\",le=\"+Inf\"} 2",
                "websocket_handshake_duration_seconds_count{port=\"8080\"} 2",
                "websocket_pong_latency_seconds_bucket{port=\"8080\",role=\"client\",le=\"0.0005\"} 1",
                "websocket_messages_total{port=\"8080\",role=\"server\",direction=\"in\",opcode=\"ping\"} 3",
                "websocket_message_size_bytes_bucket{port=\"8080\",direction=\"out\",le=\"64\"} 2",
                "websocket_message_size_bytes_bucket{port=\"8080\",direction=\"out\",le=\"+Inf\"} 3",
                "websocket_message_size_bytes_sum{port=\"8080\",direction=\"out\"} 100",
                "websocket_close_total{port=\"8080\",role=\"server\",code=\"1011\",initiator=\"peer\"} 1",
            ],
        );
    }

    #[test]
    fn pod_labels_split_gauges_by_pod_and_only_when_asked() {
        let in_pod =
            |pid| OpenEnd { pid: Some(pid), ..conn(8080, "server", Verdict::Active, 3, 0) };
        // Two processes in cart-1, one in cart-2, one in no pod.
        let pods = PodsByPid::from([
            (1, ("shop".to_owned(), "cart-1".to_owned())),
            (2, ("shop".to_owned(), "cart-1".to_owned())),
            (3, ("shop".to_owned(), "cart-2".to_owned())),
        ]);
        let connections = [in_pod(1), in_pod(2), in_pod(3)];
        let mut agg = Aggregates::default();
        agg.known.insert((8080, "server"));
        agg.known.insert((9090, "client"));
        let inputs = |pod_labels| Inputs {
            open: &connections,
            pods: &pods,
            aggregates: &agg,
            events_lost: 0,
            maps: &[],
            last_refresh_unix_seconds: 0.0,
            hooks: &[],
            pod_labels,
        };

        let text = render(&inputs(true));
        assert_lines(
            &text,
            &[
                "websocket_connections_active{port=\"8080\",role=\"server\",namespace=\"shop\",pod=\"cart-1\"} 2",
                "websocket_connections_active{port=\"8080\",role=\"server\",namespace=\"shop\",pod=\"cart-2\"} 1",
                "websocket_connections_by_state{port=\"8080\",role=\"server\",state=\"active\",namespace=\"shop\",pod=\"cart-1\"} 2",
                "websocket_buffered_amount_bytes{port=\"8080\",role=\"server\",namespace=\"shop\",pod=\"cart-1\"} 6",
                "websocket_receive_queue_bytes{port=\"8080\",role=\"server\",namespace=\"shop\",pod=\"cart-2\"} 0",
                "websocket_connections_active{port=\"9090\",role=\"client\"} 0",
            ],
        );
        // No unlabelled zero beside the pod series of the same port and role, and never a
        // container ID.
        assert!(!text.contains("websocket_connections_active{port=\"8080\",role=\"server\"}"));
        assert!(!text.contains("abab"));

        let text = render(&inputs(false));
        assert!(!text.contains("pod="), "{text}");
        assert!(text.contains("websocket_connections_active{port=\"8080\",role=\"server\"} 3\n"));
    }

    #[test]
    fn close_codes_are_bounded() {
        assert_eq!(close_code_label(1000), "1000");
        assert_eq!(close_code_label(4321), "4xxx");
        assert_eq!(close_code_label(3001), "3xxx");
        assert_eq!(close_code_label(1006), "1006");
        assert_eq!(close_code_label(0), "invalid");
        assert_eq!(close_code_label(65535), "invalid");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
