//! The liveness rules: what a connection end's kernel counters say about it.

use std::{fmt, time::Duration};

use observer_common::{ConnState, ends};
use serde::{Deserialize, Serialize};

/// The state of one connection end, worst first.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Data sent is not acknowledged for the stall threshold and nothing at all comes back from
    /// the peer: it vanished, the link is cut, or a NAT dropped the flow.
    PeerUnresponsive,
    /// The send queue does not drain for the stall threshold while the peer keeps answering with
    /// a zero or small window: the peer's application is not reading.
    Backpressured,
    /// Bytes sit unread in the receive queue and the application has not read for the stall
    /// threshold.
    NotReading,
    /// The peer closed its side (FIN) and the local application has kept the socket open for
    /// the idle threshold.
    HalfClosed,
    /// No application data in either direction for the idle threshold.
    Idle,
    /// Application data in either direction within the idle threshold.
    #[default]
    Active,
}

impl Verdict {
    pub const ALL: [Self; 6] = [
        Self::PeerUnresponsive,
        Self::Backpressured,
        Self::NotReading,
        Self::HalfClosed,
        Self::Idle,
        Self::Active,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PeerUnresponsive => "peer_unresponsive",
            Self::Backpressured => "backpressured",
            Self::NotReading => "not_reading",
            Self::HalfClosed => "half_closed",
            Self::Idle => "idle",
            Self::Active => "active",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Thresholds of the rules.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub idle_after: Duration,
    pub stall_after: Duration,
}

/// A verdict and the figures behind it. The one-sentence [`Judgement::detail`] is written from
/// them only when someone reads it: every connection end is judged at every refresh, and most
/// judgements are never shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judgement {
    pub verdict: Verdict,
    pub evidence: Evidence,
    /// How long ago the peer sent its FIN, when it did and the verdict is not `half_closed`,
    /// which says so itself.
    pub since_fin_ns: Option<u64>,
}

/// What a verdict rests on; durations are nanoseconds up to the moment of judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Bytes unacknowledged for `stuck_ns` while the peer advertises a zero window.
    ZeroWindow { unacked: u64, stuck_ns: u64, zero_ns: u64 },
    /// Bytes unacknowledged for `stuck_ns` while the peer still answers, with a small window.
    SmallWindow { unacked: u64, stuck_ns: u64, quiet_ns: u64, window: u32 },
    /// Bytes unacknowledged for `stuck_ns` and nothing from the peer for `quiet_ns`.
    Silent { unacked: u64, stuck_ns: u64, retransmits: u32, quiet_ns: u64 },
    /// Bytes unread for `unread_ns`; `frozen` when nothing was written either.
    Unread { unread: u64, unread_ns: u64, last_write_ns: u64, frozen: bool },
    /// The peer's FIN `since_fin_ns` ago, the socket still open.
    CloseWait { since_fin_ns: u64 },
    /// No application data for `quiet_ns`, past the idle threshold.
    Quiet { quiet_ns: u64 },
    /// Application data `quiet_ns` ago.
    Data { quiet_ns: u64 },
}

impl Judgement {
    /// One short sentence of the evidence, e.g. "41 KiB unacked for 12 s, 6 retransmissions,
    /// nothing from the peer for 12 s".
    pub fn detail(&self) -> String {
        let mut detail = match self.evidence {
            Evidence::ZeroWindow { unacked, stuck_ns, zero_ns } => format!(
                "{}, the peer has advertised a zero window for {}",
                unacked_for(unacked, stuck_ns),
                human_ns(zero_ns)
            ),
            Evidence::SmallWindow { unacked, stuck_ns, quiet_ns, window } => format!(
                "{}, the peer answers ({} ago) with a window of {window}",
                unacked_for(unacked, stuck_ns),
                human_ns(quiet_ns)
            ),
            Evidence::Silent { unacked, stuck_ns, retransmits, quiet_ns } => {
                // Without a retransmission counted yet, the silence itself is the evidence.
                let retransmissions = match retransmits {
                    0 => "no retransmission counted yet".to_string(),
                    1 => "1 retransmission".to_string(),
                    n => format!("{n} retransmissions"),
                };
                format!(
                    "{}, {retransmissions}, nothing from the peer for {}",
                    unacked_for(unacked, stuck_ns),
                    human_ns(quiet_ns)
                )
            }
            Evidence::Unread { unread, unread_ns, last_write_ns, frozen } => {
                let unread = format!("{} unread for {}", human_bytes(unread), human_ns(unread_ns));
                if frozen {
                    format!(
                        "{unread} and nothing written for {}: the process looks frozen",
                        human_ns(last_write_ns)
                    )
                } else {
                    format!(
                        "{unread} while it still writes ({} ago): it stopped reading",
                        human_ns(last_write_ns)
                    )
                }
            }
            Evidence::CloseWait { since_fin_ns } => format!(
                "the peer closed its side {} ago and the socket is still open: a CLOSE_WAIT leak",
                human_ns(since_fin_ns)
            ),
            Evidence::Quiet { quiet_ns } => {
                format!("no application data either way for {}", human_ns(quiet_ns))
            }
            Evidence::Data { quiet_ns } => format!("application data {} ago", human_ns(quiet_ns)),
        };
        if let Some(since_fin) = self.since_fin_ns {
            detail.push_str(&format!(
                "; the peer closed its side {} ago, the local end is still open",
                human_ns(since_fin)
            ));
        }
        detail
    }
}

fn unacked_for(unacked: u64, stuck_ns: u64) -> String {
    format!("{} unacked for {}", human_bytes(unacked), human_ns(stuck_ns))
}

/// Nanoseconds from `then` to `now`; zero when `then` is in the future.
fn since(now_ns: u64, then_ns: u64) -> u64 {
    now_ns.saturating_sub(then_ns)
}

/// A duration for people: `850 ms`, `12 s`, `3.5 min`, `2.0 h`.
pub fn human_ns(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    if s < 1.0 {
        format!("{} ms", (s * 1000.0).round())
    } else if s < 120.0 {
        format!("{} s", s.round())
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// A byte count for people: `512 B`, `41 KiB`, `3.2 MiB`.
fn human_bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else if n < 1024 * 1024 {
        format!("{} KiB", n / 1024)
    } else {
        format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
    }
}

const TCP_CLOSE_WAIT: u8 = 8;

/// Decides the verdict of one connection end at `now_ns` (`CLOCK_MONOTONIC`), worst rule first.
///
/// `data_activity_ns` is the last data frame either way when frames are tracked: pings and pongs
/// keep a connection alive but are not application data. Without it, any byte written by the
/// application or received from the peer counts.
pub fn judge(
    state: &ConnState,
    data_activity_ns: Option<u64>,
    now_ns: u64,
    thresholds: &Thresholds,
) -> Judgement {
    let at = |then: u64| since(now_ns, then.max(state.established_ns));
    // The peer's FIN is news at once, whatever else holds; the socket left open past the idle
    // threshold is a leak.
    let since_fin = (state.tcp_state == TCP_CLOSE_WAIT).then(|| at(state.state_changed_ns));
    let (verdict, evidence) = judge_open(state, data_activity_ns, now_ns, thresholds, since_fin);
    let since_fin_ns = since_fin.filter(|_| verdict != Verdict::HalfClosed);
    Judgement { verdict, evidence, since_fin_ns }
}

/// The verdict rules in priority order, the peer's FIN aside.
fn judge_open(
    state: &ConnState,
    data_activity_ns: Option<u64>,
    now_ns: u64,
    thresholds: &Thresholds,
    since_fin: Option<u64>,
) -> (Verdict, Evidence) {
    let stall = thresholds.stall_after.as_nanos() as u64;
    let idle = thresholds.idle_after.as_nanos() as u64;
    let at = |then: u64| since(now_ns, then.max(state.established_ns));

    // The send queue has not moved: the bytes have waited since they were written or since the
    // last acknowledgement, whichever is later.
    let unacked = state.send_queue();
    let stuck_ns = at(state.unacked_since_ns.max(state.last_ack_ns));
    if unacked > 0 && stuck_ns >= stall {
        let quiet_ns = at(state.last_ingress_ns);
        if state.zero_window_since_ns != 0 {
            let zero_ns = since(now_ns, state.zero_window_since_ns);
            return (Verdict::Backpressured, Evidence::ZeroWindow { unacked, stuck_ns, zero_ns });
        }
        // Retransmissions while the bytes waited are the evidence; without any (a long
        // retransmission timeout), twice the threshold of silence is.
        let retransmitted = state.last_retrans_ns >= state.unacked_since_ns.max(state.last_ack_ns)
            && state.last_retrans_ns != 0;
        if quiet_ns < stall {
            let window = state.peer_window;
            let evidence = Evidence::SmallWindow { unacked, stuck_ns, quiet_ns, window };
            return (Verdict::Backpressured, evidence);
        }
        if retransmitted || quiet_ns >= 2 * stall {
            let retransmits = state.total_retrans;
            let evidence = Evidence::Silent { unacked, stuck_ns, retransmits, quiet_ns };
            return (Verdict::PeerUnresponsive, evidence);
        }
        // Silent, but not yet for long enough without a retransmission to say why.
    }

    // Unread since the later of: the bytes started waiting, the application last read.
    let unread = state.recv_queue();
    let unread_ns = at(state.unread_since_ns.max(state.last_read_ns));
    if unread > 0 && unread_ns >= stall {
        let last_write_ns = at(state.last_write_ns);
        let frozen = last_write_ns >= stall;
        return (
            Verdict::NotReading,
            Evidence::Unread { unread, unread_ns, last_write_ns, frozen },
        );
    }

    if let Some(since_fin_ns) = since_fin.filter(|&ns| ns >= idle) {
        return (Verdict::HalfClosed, Evidence::CloseWait { since_fin_ns });
    }

    let last_data = data_activity_ns
        .unwrap_or_else(|| state.last_write_ns.max(state.last_rx_ns).max(state.established_ns));
    let quiet_ns = since(now_ns, last_data);
    if quiet_ns >= idle {
        (Verdict::Idle, Evidence::Quiet { quiet_ns })
    } else {
        (Verdict::Active, Evidence::Data { quiet_ns })
    }
}

/// How a connection ended, for `websocket_connections_closed_total{reason}`.
pub fn close_reason(state: &ConnState) -> &'static str {
    let rst_sent = state.ends & ends::RST_SENT != 0;
    let rst_received = state.ends & ends::RST_RECEIVED != 0;
    if rst_received {
        "reset_received"
    } else if state.recv_queue() > 0 {
        // Closed by the application with bytes it never read: the kernel resets (and reaches
        // `TCP_CLOSE` before sending the reset, so the reset itself may go unseen).
        "aborted"
    } else if rst_sent {
        "reset_sent"
    } else if state.final_packets_out > 0 || state.send_queue() > 0 {
        // Ended with data never acknowledged and no reset: TCP gave up retransmitting.
        "timeout"
    } else {
        "clean"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const T: Thresholds =
        Thresholds { idle_after: Duration::from_secs(60), stall_after: Duration::from_secs(10) };

    fn conn() -> ConnState {
        ConnState { established_ns: 100 * S, ..ConnState::default() }
    }

    #[test]
    fn fresh_connection_is_active_until_idle_threshold() {
        let c = conn();
        assert_eq!(judge(&c, None, 100 * S, &T).verdict, Verdict::Active);
        assert_eq!(judge(&c, None, 159 * S, &T).verdict, Verdict::Active);
        assert_eq!(judge(&c, None, 160 * S, &T).verdict, Verdict::Idle);
    }

    #[test]
    fn data_either_way_keeps_it_active() {
        let mut c = conn();
        c.last_write_ns = 200 * S;
        assert_eq!(judge(&c, None, 250 * S, &T).verdict, Verdict::Active);
        assert_eq!(judge(&c, None, 260 * S, &T).verdict, Verdict::Idle);
        c.last_rx_ns = 255 * S;
        c.tcp_bytes_received = 10;
        c.bytes_read = 10;
        assert_eq!(judge(&c, None, 260 * S, &T).verdict, Verdict::Active);
    }

    #[test]
    fn unread_bytes_past_stall_threshold_mean_not_reading() {
        let mut c = conn();
        c.tcp_bytes_received = 5000;
        c.bytes_read = 1000;
        c.last_read_ns = 110 * S;
        c.unread_since_ns = 112 * S;
        c.last_rx_ns = 125 * S;
        assert_eq!(judge(&c, None, 121 * S, &T).verdict, Verdict::Active);
        assert_eq!(judge(&c, None, 122 * S, &T).verdict, Verdict::NotReading);
    }

    #[test]
    fn a_reader_that_keeps_up_slowly_is_not_flagged() {
        let mut c = conn();
        c.tcp_bytes_received = 5000;
        c.bytes_read = 4000;
        c.unread_since_ns = 101 * S;
        c.last_read_ns = 150 * S;
        c.last_rx_ns = 150 * S;
        assert_eq!(judge(&c, None, 155 * S, &T).verdict, Verdict::Active);
    }

    #[test]
    fn empty_receive_queue_is_never_not_reading() {
        let mut c = conn();
        c.tcp_bytes_received = 5000;
        c.bytes_read = 5000;
        c.last_read_ns = 101 * S;
        assert_eq!(judge(&c, None, 300 * S, &T).verdict, Verdict::Idle);
    }

    #[test]
    fn frame_activity_replaces_byte_activity() {
        let mut c = conn();
        c.last_write_ns = 200 * S; // heartbeat bytes
        assert_eq!(judge(&c, Some(100 * S), 200 * S, &T).verdict, Verdict::Idle);
        assert_eq!(judge(&c, Some(150 * S), 200 * S, &T).verdict, Verdict::Active);
    }

    #[test]
    fn worst_sorts_first() {
        let mut all = Verdict::ALL.to_vec();
        all.reverse();
        all.sort();
        assert_eq!(all, Verdict::ALL);
    }

    /// A connection that wrote 40 KiB at 110 s, none of it acknowledged.
    fn stuck() -> ConnState {
        let mut c = conn();
        c.bytes_written = 41_000;
        c.last_write_ns = 110 * S;
        c.unacked_since_ns = 110 * S;
        c.last_ingress_ns = 105 * S;
        c.total_retrans = 6;
        c.last_retrans_ns = 116 * S;
        c
    }

    #[test]
    fn silence_from_the_peer_with_unacked_data_is_peer_unresponsive() {
        let c = stuck();
        assert_eq!(judge(&c, None, 119 * S, &T).verdict, Verdict::Active);
        let j = judge(&c, None, 122 * S, &T);
        assert_eq!(j.verdict, Verdict::PeerUnresponsive);
        assert_eq!(
            j.detail(),
            "40 KiB unacked for 12 s, 6 retransmissions, nothing from the peer for 17 s"
        );
    }

    #[test]
    fn without_a_retransmission_silence_must_last_twice_as_long() {
        let mut c = stuck();
        c.last_retrans_ns = 0;
        c.last_ingress_ns = 110 * S;
        assert_eq!(judge(&c, None, 125 * S, &T).verdict, Verdict::Active);
        assert_eq!(judge(&c, None, 130 * S, &T).verdict, Verdict::PeerUnresponsive);
    }

    #[test]
    fn a_peer_that_answers_with_a_zero_window_is_backpressure_not_loss() {
        let mut c = stuck();
        c.last_ingress_ns = 121 * S;
        c.zero_window_since_ns = 111 * S;
        c.total_retrans = 0;
        let j = judge(&c, None, 122 * S, &T);
        assert_eq!(j.verdict, Verdict::Backpressured);
        assert!(j.detail().contains("zero window for 11 s"), "{}", j.detail());
        // Even when its window probes are answered rarely (persist backoff).
        c.last_ingress_ns = 100 * S;
        assert_eq!(judge(&c, None, 122 * S, &T).verdict, Verdict::Backpressured);
    }

    #[test]
    fn acknowledgements_that_keep_coming_keep_a_busy_sender_active() {
        let mut c = stuck();
        c.last_ack_ns = 121 * S;
        c.tcp_bytes_acked = 20_000;
        c.last_ingress_ns = 121 * S;
        assert_eq!(judge(&c, None, 122 * S, &T).verdict, Verdict::Active);
    }

    #[test]
    fn frozen_and_stopped_reading_are_told_apart() {
        let mut c = conn();
        c.tcp_bytes_received = 5000;
        c.unread_since_ns = 101 * S;
        c.last_write_ns = 101 * S;
        assert!(judge(&c, None, 120 * S, &T).detail().contains("frozen"));
        c.last_write_ns = 119 * S;
        let j = judge(&c, None, 120 * S, &T);
        assert_eq!(j.verdict, Verdict::NotReading);
        assert!(j.detail().contains("stopped reading"), "{}", j.detail());
    }

    #[test]
    fn close_wait_left_open_becomes_half_closed_after_the_idle_threshold() {
        let mut c = conn();
        c.tcp_state = TCP_CLOSE_WAIT;
        c.state_changed_ns = 130 * S;
        c.last_rx_ns = 130 * S;
        let early = judge(&c, None, 131 * S, &T);
        assert_eq!(early.verdict, Verdict::Active);
        assert!(
            early
                .detail()
                .ends_with("; the peer closed its side 1 s ago, the local end is still open")
        );
        assert_eq!(judge(&c, None, 189 * S, &T).verdict, Verdict::Active);
        let late = judge(&c, None, 190 * S, &T);
        assert_eq!(late.verdict, Verdict::HalfClosed);
        assert!(late.detail().ends_with("a CLOSE_WAIT leak"), "{}", late.detail());
    }

    #[test]
    fn the_peers_fin_is_named_whatever_the_verdict() {
        let mut c = conn();
        c.tcp_state = TCP_CLOSE_WAIT;
        c.state_changed_ns = 130 * S;
        c.tcp_bytes_received = 5000;
        c.unread_since_ns = 101 * S;
        c.last_write_ns = 101 * S;
        // Unread bytes outrank the FIN, before and after the idle threshold; the FIN is still said.
        for now in [131, 200] {
            let j = judge(&c, None, now * S, &T);
            assert_eq!(j.verdict, Verdict::NotReading);
            let fin = format!("; the peer closed its side {} s ago", now - 130);
            assert!(j.detail().contains(&fin), "{}", j.detail());
        }
    }

    #[test]
    fn silence_without_a_counted_retransmission_says_so() {
        let mut c = stuck();
        c.last_retrans_ns = 0;
        c.total_retrans = 0;
        let j = judge(&c, None, 130 * S, &T);
        assert_eq!(j.verdict, Verdict::PeerUnresponsive);
        assert_eq!(
            j.detail(),
            "40 KiB unacked for 20 s, no retransmission counted yet, nothing from the peer for 25 s"
        );
    }

    #[test]
    fn close_reasons() {
        let mut c = conn();
        assert_eq!(close_reason(&c), "clean");
        c.bytes_written = 10;
        assert_eq!(close_reason(&c), "timeout");
        c.ends = ends::RST_RECEIVED;
        assert_eq!(close_reason(&c), "reset_received");
        c.ends = ends::RST_SENT;
        assert_eq!(close_reason(&c), "reset_sent");
        c.tcp_bytes_received = 100;
        assert_eq!(close_reason(&c), "aborted");
        c.ends = 0;
        assert_eq!(close_reason(&c), "aborted", "the reset after TCP_CLOSE is not seen");
    }
}
