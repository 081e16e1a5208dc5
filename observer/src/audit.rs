//! `observer audit`: what a few minutes of watching say about each WebSocket service's heartbeat
//! and liveness, as findings with their evidence and a fix.
//!
//! This module is pure: it consumes the tracker's [`Note`]s (handshakes, pings, pongs, missed
//! pongs, ends) and each refresh's [`ConnectionView`]s, and turns them into a [`Report`]. The
//! event loop that feeds it lives in `agent.rs`; rendering lives in `audit/render.rs`.
//!
//! Silent stretches are sampled at each refresh from the last byte either way (written by the
//! application or received from the peer, pings and pongs included), and at the close of each
//! connection from its final state: a stretch that ended between two refreshes is counted up to
//! the earlier one, so it may be short by one refresh.

mod render;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use observer_common::Direction;
use serde::{Deserialize, Serialize};

pub use self::render::{markdown, text};
use crate::{
    conntrack::{ConnectionView, EndId, Endpoint, Note, NoteKind},
    metrics::Outcome,
    verdict::{Verdict, human_ns},
};

/// The thresholds behind the findings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Read timeout of a proxy in front of the services: a connection silent this long is cut.
    pub proxy_timeout_seconds: f64,
    /// Idle timeouts of NATs and load balancers on the way, shortest first.
    pub nat_timeouts_seconds: Vec<f64>,
    /// Pongs missing on this share of pings or more is a finding.
    pub pong_miss_ratio: f64,
    /// A connection end held in a verdict other than `active` or `idle` this long is dead.
    pub dead_after_seconds: f64,
    /// The run-time thresholds the verdicts were judged with.
    pub idle_after_seconds: f64,
    pub stall_after_seconds: f64,
    pub pong_timeout_seconds: f64,
    pub refresh_seconds: f64,
    /// Request paths are shown.
    pub show_paths: bool,
}

impl Settings {
    /// Every idle timeout a connection may meet, shortest first, with what it is.
    fn timeouts(&self) -> Vec<(f64, &'static str)> {
        let mut all: Vec<(f64, &'static str)> =
            self.nat_timeouts_seconds.iter().map(|&t| (t, "NAT idle timeout")).collect();
        all.push((self.proxy_timeout_seconds, "proxy read timeout"));
        // At equal values the proxy's name is kept: it is the one the user set alone.
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(a.1)));
        all.dedup_by(|a, b| a.0 == b.0);
        all
    }
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    /// When the audit started, RFC 3339 UTC.
    pub started_at: String,
    pub duration_seconds: f64,
    /// Stopped by SIGINT or SIGTERM before `--duration`.
    pub ended_early: bool,
    pub thresholds: Settings,
    /// Worst first.
    pub findings: Vec<Finding>,
    pub services: Vec<Service>,
}

/// A server port, seen from one side (`role`), and the process (or pod) on that side.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    pub port: u16,
    pub role: String,
    /// `comm` of the process; `?` when unknown.
    pub process: String,
    /// `namespace/pod` when the process runs in a Kubernetes pod.
    pub pod: Option<String>,
}

impl ServiceKey {
    pub fn name(&self) -> String {
        let who = self
            .pod
            .as_deref()
            .map_or_else(|| self.process.clone(), |pod| format!("{} (pod {pod})", self.process));
        format!("port {} {} {who}", self.port, self.role)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Service {
    #[serde(flatten)]
    pub key: ServiceKey,
    /// Request paths of the upgrades, without query strings; only with `--show-paths`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub paths: Option<Vec<String>>,
    /// Connection ends seen.
    pub connections: u64,
    /// Still open when the audit ended.
    pub open_at_end: u64,
    pub handshakes: Handshakes,
    pub heartbeat: Heartbeat,
    pub pongs: Pongs,
    /// Longest stretch with no byte either way (no data and no control frame), any connection.
    pub longest_silence_seconds: f64,
    /// Connections silent at least this long, per idle timeout.
    pub idle_past: Vec<IdlePast>,
    pub closes: Closes,
    /// Connection ends found dead.
    pub dead: Vec<Dead>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Handshakes {
    pub count: u64,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    /// Upgrades refused, or closed before an answer.
    pub rejects: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// `server`, `client`, `both` or `nobody`.
    pub who_pings: String,
    pub from_server: PingStats,
    pub from_client: PingStats,
}

/// Pings one side sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingStats {
    pub pings: u64,
    /// Time between successive pings on one connection: median, and the 10th and 90th
    /// percentiles as the spread; absent before two pings on one connection.
    pub interval_median_seconds: Option<f64>,
    pub interval_p10_seconds: Option<f64>,
    pub interval_p90_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pongs {
    /// Pongs that answered a ping.
    pub answered: u64,
    /// Pings left unanswered for the pong timeout (or until their connection closed).
    pub missed: u64,
    /// `missed` over pings sent, either way.
    pub miss_ratio: f64,
    pub latency_p50_seconds: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdlePast {
    pub timeout_seconds: f64,
    pub connections: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Closes {
    /// First close frame's code, by code.
    pub codes: BTreeMap<u16, u64>,
    /// Ended without a completed closing handshake.
    pub abnormal: u64,
    /// How TCP ended (`clean`, `reset_sent`, `reset_received`, `timeout`, `aborted`), by reason.
    pub reasons: BTreeMap<String, u64>,
}

/// A connection end found dead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dead {
    pub verdict: Verdict,
    pub detail: String,
    /// How long the verdict held, at most.
    pub for_seconds: f64,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub local_addr: Endpoint,
    pub remote_addr: Endpoint,
}

/// One thing to fix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub service: ServiceKey,
    /// `no_heartbeat`, `slow_heartbeat`, `pongs_missing` or `dead_connections`.
    pub kind: String,
    /// `critical` or `warning`.
    pub severity: String,
    pub summary: String,
    pub evidence: String,
    pub recommendation: String,
}

/// Who sent a ping or pong, by the end that saw it and the way it went.
fn sender(role: &str, direction: Direction) -> Side {
    match (role == "server", direction) {
        (true, Direction::Egress) | (false, Direction::Ingress) => Side::Server,
        _ => Side::Client,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server = 0,
    Client = 1,
}

/// What the audit knows of one connection end.
#[derive(Debug, Default)]
struct End {
    port: u16,
    role: &'static str,
    pid: Option<u32>,
    comm: Option<String>,
    pod: Option<String>,
    path: Option<String>,
    local_addr: Endpoint,
    remote_addr: Endpoint,
    /// Shown by the tracker (a WebSocket, or on a watched port), not only a refused upgrade.
    reported: bool,
    rejected: bool,
    ended: bool,
    handshake_seconds: Option<f64>,
    handshake_seen: bool,
    /// Ping times by the side that sent them.
    pings: [Vec<u64>; 2],
    /// Pongs by the side that sent them.
    pongs: [u64; 2],
    latencies: Vec<f64>,
    /// When the connection closed.
    ended_ns: Option<u64>,
    longest_silence_ns: u64,
    close_code: Option<u16>,
    outcome: Option<Outcome>,
    reason: Option<&'static str>,
    dead: Option<Dead>,
}

impl End {
    fn identify(&mut self, id: &EndId) {
        self.port = id.port;
        self.role = id.role;
        self.pid = id.pid.or(self.pid);
        self.comm = id.comm.clone().or(self.comm.take());
    }

    /// Pings left without a pong for `timeout_ns` at `now_ns` (or at the close). Pongs answer
    /// pings in order, so the pings due an answer and the pongs that came back are compared by
    /// count, each side's pings against the other side's pongs.
    fn missed(&self, now_ns: u64, timeout_ns: u64) -> u64 {
        let until = self.ended_ns.unwrap_or(now_ns);
        let mut missed = 0;
        for side in [Side::Server, Side::Client] {
            let due = self.pings[side as usize]
                .iter()
                .filter(|&&at| at.saturating_add(timeout_ns) <= until)
                .count() as u64;
            missed += due.saturating_sub(self.pongs[1 - side as usize]);
        }
        missed
    }

    fn key(&self) -> ServiceKey {
        ServiceKey {
            port: self.port,
            role: self.role.to_owned(),
            process: self.comm.clone().unwrap_or_else(|| "?".into()),
            pod: self.pod.clone(),
        }
    }
}

/// The audit in progress.
#[derive(Debug)]
pub struct Audit {
    settings: Settings,
    ends: HashMap<u64, End>,
    /// The latest time seen (`CLOCK_MONOTONIC` ns).
    now_ns: u64,
}

impl Audit {
    pub fn new(settings: Settings) -> Self {
        Self { settings, ends: HashMap::new(), now_ns: 0 }
    }

    /// Takes in what the tracker noted.
    pub fn notes(&mut self, notes: impl IntoIterator<Item = Note>) {
        for note in notes {
            self.now_ns = self.now_ns.max(note.at_ns);
            let end = self.ends.entry(note.id.cookie).or_default();
            end.identify(&note.id);
            match note.what {
                NoteKind::Handshake { seconds } => {
                    end.reported = true;
                    end.handshake_seen = true;
                    end.handshake_seconds = seconds;
                }
                NoteKind::Reject => end.rejected = true,
                NoteKind::Ping { direction } => {
                    end.reported = true;
                    end.pings[sender(end.role, direction) as usize].push(note.at_ns);
                }
                NoteKind::Pong { direction, latency_ns } => {
                    end.pongs[sender(end.role, direction) as usize] += 1;
                    if let Some(ns) = latency_ns {
                        end.latencies.push(ns as f64 / 1e9);
                    }
                }
                NoteKind::Ended { outcome, reason, close_code, last_activity_ns } => {
                    end.reported = true;
                    end.ended = true;
                    end.ended_ns = Some(note.at_ns);
                    end.outcome = Some(outcome);
                    end.reason = Some(reason);
                    end.close_code = close_code.or(end.close_code);
                    let silence = note.at_ns.saturating_sub(last_activity_ns);
                    end.longest_silence_ns = end.longest_silence_ns.max(silence);
                }
            }
        }
    }

    /// Takes in one refresh's connection ends, taken at `now_ns`.
    pub fn refresh(&mut self, views: &[ConnectionView], now_ns: u64) {
        self.now_ns = self.now_ns.max(now_ns);
        let dead_after = self.settings.dead_after_seconds;
        for view in views {
            let end = self.ends.entry(view.cookie).or_default();
            end.reported = true;
            end.port = view.port;
            end.role = if view.role == "client" { "client" } else { "server" };
            end.pid = view.pid.or(end.pid);
            end.comm = view.comm.clone().or(end.comm.take());
            if let (Some(ns), Some(pod)) = (&view.attribution.namespace, &view.attribution.pod) {
                end.pod = Some(format!("{ns}/{pod}"));
            }
            end.path = view.path.clone().or(end.path.take());
            end.local_addr = view.local_addr;
            end.remote_addr = view.remote_addr;
            end.close_code = view.close_code.or(end.close_code);

            // Silent since the last byte either way; the connection's age bounds it.
            let silence = [view.last_send_age_seconds, view.last_recv_age_seconds]
                .into_iter()
                .flatten()
                .fold(view.age_seconds, f64::min);
            let silence_ns = (silence * 1e9) as u64;
            end.longest_silence_ns = end.longest_silence_ns.max(silence_ns);

            let dead = !matches!(view.state, Verdict::Active | Verdict::Idle)
                && view.state_age_seconds >= dead_after;
            if dead {
                let worse = end.dead.as_ref().is_none_or(|d| {
                    (view.state, -view.state_age_seconds) <= (d.verdict, -d.for_seconds)
                });
                if worse {
                    end.dead = Some(Dead {
                        verdict: view.state,
                        detail: view.detail.clone(),
                        for_seconds: view.state_age_seconds,
                        pid: view.pid,
                        comm: view.comm.clone(),
                        local_addr: view.local_addr,
                        remote_addr: view.remote_addr,
                    });
                }
            }
        }
    }

    /// Findings so far, for the progress line.
    pub fn findings_so_far(&self) -> usize {
        self.services().iter().map(|s| findings(s, &self.settings).len()).sum()
    }

    /// Connection ends seen so far.
    pub fn connections_seen(&self) -> usize {
        self.ends.values().filter(|e| e.reported).count()
    }

    /// The report, after `duration`.
    pub fn report(&self, started_at: String, duration: Duration, ended_early: bool) -> Report {
        let services = self.services();
        let mut findings: Vec<Finding> =
            services.iter().flat_map(|s| findings(s, &self.settings)).collect();
        findings.sort_by(|a, b| {
            (severity_rank(&a.severity), &a.service, &a.kind).cmp(&(
                severity_rank(&b.severity),
                &b.service,
                &b.kind,
            ))
        });
        Report {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at,
            duration_seconds: round_us(duration.as_secs_f64()),
            ended_early,
            thresholds: self.settings.clone(),
            findings,
            services,
        }
    }

    fn services(&self) -> Vec<Service> {
        let mut groups: BTreeMap<ServiceKey, Vec<&End>> = BTreeMap::new();
        for end in self.ends.values() {
            if end.reported || end.rejected {
                groups.entry(end.key()).or_default().push(end);
            }
        }
        groups
            .into_iter()
            .map(|(key, ends)| service(key, &ends, &self.settings, self.now_ns))
            .collect()
    }
}

fn service(key: ServiceKey, ends: &[&End], settings: &Settings, now_ns: u64) -> Service {
    let reported: Vec<&End> = ends.iter().copied().filter(|e| e.reported).collect();

    let mut handshake_times: Vec<f64> =
        reported.iter().filter_map(|e| e.handshake_seconds).collect();
    let handshakes = Handshakes {
        count: reported.iter().filter(|e| e.handshake_seen).count() as u64,
        p50_seconds: percentile(&mut handshake_times, 0.5),
        p99_seconds: percentile(&mut handshake_times, 0.99),
        rejects: ends.iter().filter(|e| e.rejected && !e.reported).count() as u64,
    };

    let side = |s: Side| {
        // Pings seen at the same instant crossed in one segment: a retransmission that gathered
        // pings sent earlier (a cut link), not a ping rate.
        let mut intervals: Vec<f64> = reported
            .iter()
            .flat_map(|e| e.pings[s as usize].windows(2).map(|w| w[1].saturating_sub(w[0])))
            .filter(|&ns| ns > SAME_SEGMENT_NS)
            .map(|ns| ns as f64 / 1e9)
            .collect();
        PingStats {
            pings: reported.iter().map(|e| e.pings[s as usize].len() as u64).sum(),
            interval_median_seconds: percentile(&mut intervals, 0.5),
            interval_p10_seconds: percentile(&mut intervals, 0.1),
            interval_p90_seconds: percentile(&mut intervals, 0.9),
        }
    };
    let (from_server, from_client) = (side(Side::Server), side(Side::Client));
    let who_pings = match (from_server.pings > 0, from_client.pings > 0) {
        (true, true) => "both",
        (true, false) => "server",
        (false, true) => "client",
        (false, false) => "nobody",
    };

    let mut latencies: Vec<f64> = reported.iter().flat_map(|e| e.latencies.clone()).collect();
    let timeout_ns = (settings.pong_timeout_seconds * 1e9) as u64;
    let missed: u64 = reported.iter().map(|e| e.missed(now_ns, timeout_ns)).sum();
    let pings = from_server.pings + from_client.pings;
    let pongs = Pongs {
        answered: latencies.len() as u64,
        missed,
        miss_ratio: if pings == 0 { 0.0 } else { round_us(missed as f64 / pings as f64) },
        latency_p50_seconds: percentile(&mut latencies, 0.5),
        latency_p99_seconds: percentile(&mut latencies, 0.99),
    };

    let longest = reported.iter().map(|e| e.longest_silence_ns).max().unwrap_or(0);
    let idle_past = settings
        .timeouts()
        .into_iter()
        .map(|(t, _)| IdlePast {
            timeout_seconds: t,
            connections: reported.iter().filter(|e| e.longest_silence_ns as f64 / 1e9 >= t).count()
                as u64,
        })
        .collect();

    let mut closes = Closes::default();
    for end in &reported {
        if let Some(code) = end.close_code {
            *closes.codes.entry(code).or_default() += 1;
        }
        if end.outcome == Some(Outcome::Abort) {
            closes.abnormal += 1;
        }
        if let Some(reason) = end.reason {
            *closes.reasons.entry(reason.to_owned()).or_default() += 1;
        }
    }

    let mut dead: Vec<Dead> = reported.iter().filter_map(|e| e.dead.clone()).collect();
    dead.sort_by(|a, b| {
        (a.verdict, &a.local_addr, &a.remote_addr).cmp(&(b.verdict, &b.local_addr, &b.remote_addr))
    });

    let paths = settings.show_paths.then(|| {
        let set: BTreeSet<String> = reported.iter().filter_map(|e| e.path.clone()).collect();
        set.into_iter().collect()
    });

    Service {
        key,
        paths,
        connections: reported.len() as u64,
        open_at_end: reported.iter().filter(|e| !e.ended).count() as u64,
        handshakes,
        heartbeat: Heartbeat { who_pings: who_pings.to_owned(), from_server, from_client },
        pongs,
        longest_silence_seconds: round_us(longest as f64 / 1e9),
        idle_past,
        closes,
        dead,
    }
}

/// The findings about one service.
pub fn findings(service: &Service, settings: &Settings) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut found = |kind: &str, severity: &str, summary: String, evidence, recommendation| {
        out.push(Finding {
            service: service.key.clone(),
            kind: kind.to_owned(),
            severity: severity.to_owned(),
            summary,
            evidence,
            recommendation,
        });
    };
    if service.connections == 0 {
        return out;
    }
    let timeouts = settings.timeouts();
    let shortest = timeouts.first().map_or(f64::INFINITY, |t| t.0);
    let advice = ping_every(shortest);
    let hb = &service.heartbeat;
    let silence = service.longest_silence_seconds;
    let past = |limit: f64| -> String {
        let names: Vec<String> = timeouts
            .iter()
            .filter(|(t, _)| *t <= limit)
            .map(|(t, what)| format!("the {} {what}", timeout(*t)))
            .collect();
        join_or(&names)
    };

    if hb.who_pings == "nobody" {
        if silence >= shortest {
            found(
                "no_heartbeat",
                "critical",
                "no heartbeat in either direction".to_owned(),
                format!(
                    "no ping either way; connections sit silent for up to {}; {} of {} \
                     connections were silent past {}",
                    secs(silence),
                    service.idle_past.first().map_or(0, |p| p.connections),
                    service.connections,
                    timeout(shortest),
                ),
                format!(
                    "behind {} they will die silently: add a ping every {advice}",
                    past(silence)
                ),
            );
        } else {
            found(
                "no_heartbeat",
                "warning",
                "no heartbeat in either direction".to_owned(),
                format!(
                    "no ping either way; the longest silence seen so far, {}, is under the \
                     shortest idle timeout ({})",
                    secs(silence),
                    timeout(shortest)
                ),
                format!(
                    "a quiet spell longer than {} will cut them silently: add a ping every \
                     {advice}",
                    timeout(shortest)
                ),
            );
        }
    } else {
        let medians = [
            ("server", hb.from_server.interval_median_seconds),
            ("client", hb.from_client.interval_median_seconds),
        ];
        let fastest = medians
            .iter()
            .filter_map(|(who, m)| m.map(|m| (m, *who)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((interval, who)) = fastest
            && interval >= shortest
        {
            found(
                "slow_heartbeat",
                "warning",
                format!("pings every {}: longer than {}", secs(interval), past(interval)),
                format!(
                    "the {who} pings every {} (median), longest silence {}",
                    secs(interval),
                    secs(silence)
                ),
                format!("ping every {advice} or less"),
            );
        }
    }

    let pings = hb.from_server.pings + hb.from_client.pings;
    let pongs = &service.pongs;
    if pongs.missed > 0 && pongs.miss_ratio >= settings.pong_miss_ratio {
        let percent = pongs.missed as f64 * 100.0 / pings.max(1) as f64;
        found(
            "pongs_missing",
            "warning",
            format!("pongs missing on {} % of pings", trim(percent)),
            format!(
                "{} of {pings} pings had no pong within {}",
                pongs.missed,
                secs(settings.pong_timeout_seconds)
            ),
            "find why the peer does not answer: a blocked event loop, a library with automatic \
             pongs turned off, or a proxy that drops control frames"
                .to_owned(),
        );
    }

    let mut by_verdict: BTreeMap<Verdict, Vec<&Dead>> = BTreeMap::new();
    for dead in &service.dead {
        by_verdict.entry(dead.verdict).or_default().push(dead);
    }
    for (verdict, dead) in by_verdict {
        let mut processes: Vec<String> = dead
            .iter()
            .map(|d| match (d.pid, &d.comm) {
                (Some(pid), Some(comm)) => format!("{comm} pid {pid}"),
                (Some(pid), None) => format!("pid {pid}"),
                (None, Some(comm)) => comm.clone(),
                (None, None) => "unknown process".to_owned(),
            })
            .collect();
        processes.dedup();
        let longest = dead.iter().map(|d| d.for_seconds).fold(0.0, f64::max);
        let n = dead.len();
        found(
            "dead_connections",
            "critical",
            format!(
                "{n} connection{} {} for over {} ({})",
                if n == 1 { "" } else { "s" },
                verdict_phrase(verdict),
                secs(settings.dead_after_seconds),
                processes.join(", ")
            ),
            format!("up to {}; {}", secs(longest), dead[0].detail),
            dead_advice(verdict).to_owned(),
        );
    }
    out
}

fn verdict_phrase(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::PeerUnresponsive => "with an unresponsive peer",
        Verdict::Backpressured => "backpressured (the peer does not read)",
        Verdict::NotReading => "not read",
        Verdict::HalfClosed => "half-closed by the peer and left open",
        Verdict::Idle | Verdict::Active => "alive",
    }
}

fn dead_advice(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::PeerUnresponsive => {
            "the peer is gone and TCP alone takes up to 15 min to notice: ping with a pong \
             timeout and close on a miss"
        }
        Verdict::Backpressured => {
            "bound what is buffered per connection and close connections whose peer stops reading"
        }
        Verdict::NotReading => {
            "the process stopped reading its socket: look for a blocked event loop or a frozen \
             process; a peer that pings with a pong timeout closes such connections"
        }
        Verdict::HalfClosed => "close the socket when the peer ends its side (FIN)",
        Verdict::Idle | Verdict::Active => "",
    }
}

fn severity_rank(severity: &str) -> u8 {
    match severity {
        "critical" => 0,
        "warning" => 1,
        _ => 2,
    }
}

/// Pings closer than this came in one segment.
const SAME_SEGMENT_NS: u64 = 1_000_000;

/// The ping interval to recommend: half the shortest idle timeout, in whole seconds past 2 s.
fn ping_every(shortest: f64) -> String {
    let half = shortest / 2.0;
    secs(if half >= 2.0 { half.floor() } else { half })
}

/// A configured timeout as people set it: whole seconds stay seconds (`350 s`, not `5.8 min`).
pub fn timeout(seconds: f64) -> String {
    if seconds.fract() == 0.0 && (1.0..3600.0).contains(&seconds) {
        format!("{seconds} s")
    } else {
        secs(seconds)
    }
}

/// Seconds for people: `850 ms`, `12 s`, `120 s`, `14.0 min`, `2.0 h`.
pub fn secs(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if (1.0..600.0).contains(&s) { format!("{} s", s.round()) } else { human_ns((s * 1e9) as u64) }
}

/// A number without trailing zeros, at most one decimal.
fn trim(x: f64) -> String {
    let text = format!("{x:.1}");
    text.strip_suffix(".0").map_or(text.clone(), str::to_owned)
}

fn join_or(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Nearest-rank percentile `q` (0 to 1); sorts `values`.
fn percentile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(round_us(values[rank - 1]))
}

/// Rounded to the microsecond, so reports read and compare cleanly.
fn round_us(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests;
