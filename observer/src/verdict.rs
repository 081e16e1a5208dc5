//! The liveness rules: what a connection end's kernel counters say about it.

use std::{fmt, time::Duration};

use observer_common::ConnState;
use serde::{Deserialize, Serialize};

/// The state of one connection end, worst first.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Bytes sit unread in the receive queue and the application has not read for the stall
    /// threshold.
    NotReading,
    /// No application data in either direction for the idle threshold.
    Idle,
    /// Application data in either direction within the idle threshold.
    #[default]
    Active,
}

impl Verdict {
    pub const ALL: [Self; 3] = [Self::NotReading, Self::Idle, Self::Active];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotReading => "not_reading",
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

/// Nanoseconds from `then` to `now`; zero when `then` is in the future.
fn since(now_ns: u64, then_ns: u64) -> u64 {
    now_ns.saturating_sub(then_ns)
}

/// Decides the verdict of one connection end at `now_ns` (`CLOCK_MONOTONIC`).
///
/// `data_activity_ns` is the last data frame either way when frames are tracked: pings and pongs
/// keep a connection alive but are not application data. Without it, any byte written by the
/// application or received from the peer counts.
pub fn judge(
    state: &ConnState,
    data_activity_ns: Option<u64>,
    now_ns: u64,
    thresholds: &Thresholds,
) -> Verdict {
    let stall = thresholds.stall_after.as_nanos() as u64;
    let idle = thresholds.idle_after.as_nanos() as u64;

    // Unread since the later of: the bytes started waiting, the application last read.
    let waiting_since = state.unread_since_ns.max(state.last_read_ns).max(state.established_ns);
    if state.recv_queue() > 0 && since(now_ns, waiting_since) >= stall {
        return Verdict::NotReading;
    }

    let last_data = data_activity_ns
        .unwrap_or_else(|| state.last_write_ns.max(state.last_rx_ns).max(state.established_ns));
    if since(now_ns, last_data) >= idle { Verdict::Idle } else { Verdict::Active }
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
        assert_eq!(judge(&c, None, 100 * S, &T), Verdict::Active);
        assert_eq!(judge(&c, None, 159 * S, &T), Verdict::Active);
        assert_eq!(judge(&c, None, 160 * S, &T), Verdict::Idle);
    }

    #[test]
    fn data_either_way_keeps_it_active() {
        let mut c = conn();
        c.last_write_ns = 200 * S;
        assert_eq!(judge(&c, None, 250 * S, &T), Verdict::Active);
        assert_eq!(judge(&c, None, 260 * S, &T), Verdict::Idle);
        c.last_rx_ns = 255 * S;
        c.tcp_bytes_received = 10;
        c.bytes_read = 10;
        assert_eq!(judge(&c, None, 260 * S, &T), Verdict::Active);
    }

    #[test]
    fn unread_bytes_past_stall_threshold_mean_not_reading() {
        let mut c = conn();
        c.tcp_bytes_received = 5000;
        c.bytes_read = 1000;
        c.last_read_ns = 110 * S;
        c.unread_since_ns = 112 * S;
        c.last_rx_ns = 125 * S;
        assert_eq!(judge(&c, None, 121 * S, &T), Verdict::Active);
        assert_eq!(judge(&c, None, 122 * S, &T), Verdict::NotReading);
    }

    #[test]
    fn a_reader_that_keeps_up_slowly_is_not_flagged() {
        let mut c = conn();
        c.tcp_bytes_received = 5000;
        c.bytes_read = 4000;
        c.unread_since_ns = 101 * S;
        c.last_read_ns = 150 * S;
        c.last_rx_ns = 150 * S;
        assert_eq!(judge(&c, None, 155 * S, &T), Verdict::Active);
    }

    #[test]
    fn empty_receive_queue_is_never_not_reading() {
        let mut c = conn();
        c.tcp_bytes_received = 5000;
        c.bytes_read = 5000;
        c.last_read_ns = 101 * S;
        assert_eq!(judge(&c, None, 300 * S, &T), Verdict::Idle);
    }

    #[test]
    fn frame_activity_replaces_byte_activity() {
        let mut c = conn();
        c.last_write_ns = 200 * S; // heartbeat bytes
        assert_eq!(judge(&c, Some(100 * S), 200 * S, &T), Verdict::Idle);
        assert_eq!(judge(&c, Some(150 * S), 200 * S, &T), Verdict::Active);
    }

    #[test]
    fn worst_sorts_first() {
        let mut all = vec![Verdict::Active, Verdict::NotReading, Verdict::Idle];
        all.sort();
        assert_eq!(all, Verdict::ALL);
    }
}
