//! Keeping the kernel maps below their size limits.
//!
//! `CONNS` holds an entry for every TCP connection end of the host and `FRAMES` one for every
//! connection that may carry WebSocket. Both are plain preallocated hash maps with a size fixed
//! at load time: BPF's LRU maps evict by recent use per CPU, drop fresh entries well before the
//! map is full, and say nothing when they do. Instead, at each refresh the agent looks at how
//! full each map is; above the high-water mark (nine tenths) it evicts entries down to the
//! low-water mark (eight tenths), which leaves the kernel programs room for the connections that
//! open before the next refresh. Connections not known to be WebSocket go first, the longest idle
//! first; WebSocket connections, the ones observer exists to report, go last, again the longest
//! idle first. Every eviction is counted, and an evicted connection is not adopted again while it
//! lives.
//!
//! A connection evicted from `CONNS` is no longer watched at all. One evicted from `FRAMES` only
//! loses its frame counts; its liveness is still watched.

use std::collections::HashSet;

use observer_common::{ConnState, flags};

/// The maps the agent evicts from, as named in `observer_map_evictions_total{map}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    Conns,
    Frames,
}

impl Map {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Conns => "conns",
            Self::Frames => "frames",
        }
    }
}

/// Entries to remove at this refresh.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Connections to forget entirely: remove from every map.
    pub conns: Vec<u64>,
    /// Connections whose frame tracking to drop.
    pub frames: Vec<u64>,
}

/// Fill and evictions of one map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub capacity: u32,
    /// Entries at the last refresh, before evicting.
    pub entries: u64,
    pub evictions: u64,
}

/// Decides what to evict and remembers what it evicted.
#[derive(Debug)]
pub struct Evictor {
    usage: [Usage; 2],
    /// Evicted from `CONNS` and maybe still open: never adopted again.
    gone_conns: HashSet<u64>,
    /// Still in `CONNS`, no longer in `FRAMES`.
    gone_frames: HashSet<u64>,
}

impl Evictor {
    pub fn new(conns_capacity: u32, frames_capacity: u32) -> Self {
        let usage = |capacity| Usage { capacity, ..Usage::default() };
        Self {
            usage: [usage(conns_capacity), usage(frames_capacity)],
            gone_conns: HashSet::new(),
            gone_frames: HashSet::new(),
        }
    }

    pub fn usage(&self, map: Map) -> Usage {
        self.usage[map as usize]
    }

    /// Whether the connection was evicted; adoption skips it.
    pub fn was_evicted(&self, cookie: u64) -> bool {
        self.gone_conns.contains(&cookie)
    }

    /// Forgets evicted connections that no longer exist (`alive` is the kernel's socket table).
    pub fn retain_alive(&mut self, alive: impl Fn(u64) -> bool) {
        self.gone_conns.retain(|&cookie| alive(cookie));
    }

    /// What to evict from the maps given every `CONNS` entry. `websocket` tells the connections
    /// known to carry WebSocket.
    pub fn plan(&mut self, entries: &[(u64, ConnState)], websocket: impl Fn(u64) -> bool) -> Plan {
        let conns = self.victims(Map::Conns, entries.iter(), &websocket);
        // `FRAMES` holds the connections whose request opened with `G`, and the adopted ones.
        if !self.gone_frames.is_empty() {
            let present: HashSet<u64> = entries.iter().map(|(cookie, _)| *cookie).collect();
            self.gone_frames.retain(|cookie| present.contains(cookie));
        }
        let evicted: HashSet<u64> = conns.iter().copied().collect();
        let framed = entries.iter().filter(|(cookie, state)| {
            state.flags & (flags::HTTP_CANDIDATE | flags::ADOPTED) != 0
                && !self.gone_frames.contains(cookie)
                && !evicted.contains(cookie)
        });
        let framed: Vec<_> = framed.collect();
        let frames = self.victims(Map::Frames, framed.into_iter(), &websocket);
        self.gone_conns.extend(&conns);
        self.gone_frames.extend(&frames);
        Plan { conns, frames }
    }

    fn victims<'a>(
        &mut self,
        map: Map,
        entries: impl Iterator<Item = &'a (u64, ConnState)>,
        websocket: &impl Fn(u64) -> bool,
    ) -> Vec<u64> {
        let entries: Vec<_> = entries.collect();
        let usage = &mut self.usage[map as usize];
        usage.entries = entries.len() as u64;
        let capacity = u64::from(usage.capacity);
        let (high, low) = (capacity * 9 / 10, capacity * 8 / 10);
        if usage.entries <= high {
            return Vec::new();
        }
        // Ranked only when something must go: most refreshes stop above.
        let mut ranked: Vec<(bool, u64, u64)> = entries
            .into_iter()
            .map(|(cookie, state)| (websocket(*cookie), last_activity_ns(state), *cookie))
            .collect();
        let excess = (usage.entries - low) as usize;
        // Not WebSocket before WebSocket, then the longest idle first.
        ranked.select_nth_unstable(excess - 1);
        ranked.truncate(excess);
        usage.evictions += excess as u64;
        ranked.into_iter().map(|(_, _, cookie)| cookie).collect()
    }
}

/// The latest sign of life of a connection end, from either side.
fn last_activity_ns(state: &ConnState) -> u64 {
    [
        state.established_ns,
        state.last_write_ns,
        state.last_read_ns,
        state.last_rx_ns,
        state.last_ack_ns,
        state.last_ingress_ns,
        state.state_changed_ns,
    ]
    .into_iter()
    .max()
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cookie: u64, last_ns: u64, flags: u8) -> (u64, ConnState) {
        (
            cookie,
            ConnState { established_ns: 1, last_read_ns: last_ns, flags, ..Default::default() },
        )
    }

    #[test]
    fn below_the_high_water_mark_nothing_goes() {
        let mut evictor = Evictor::new(10, 10);
        let entries: Vec<_> = (0..9).map(|c| entry(c, c, 0)).collect();
        assert_eq!(evictor.plan(&entries, |_| false), Plan::default());
        assert_eq!(evictor.usage(Map::Conns), Usage { capacity: 10, entries: 9, evictions: 0 });
    }

    #[test]
    fn plain_connections_go_before_websockets_each_longest_idle_first() {
        let mut evictor = Evictor::new(10, 100);
        // Cookies 0..5 are WebSocket and idle the longest; 5..10 are plain, 9 the most idle.
        let mut entries: Vec<_> = (0..5).map(|c| entry(c, c, 0)).collect();
        entries.extend((5..10).map(|c| entry(c, 100 - c, 0)));
        entries.push(entry(10, 50, 0));
        let plan = evictor.plan(&entries, |c| c < 5);
        // 11 entries, high water 9, low water 8: three go, the plain ones idle longest.
        let mut conns = plan.conns.clone();
        conns.sort_unstable();
        assert_eq!(conns, vec![8, 9, 10]);
        assert!(plan.frames.is_empty());
        assert_eq!(evictor.usage(Map::Conns).evictions, 3);
        assert!(evictor.was_evicted(9) && !evictor.was_evicted(0));

        // With only WebSockets left, the longest idle WebSocket goes.
        let entries: Vec<_> = (0..10).map(|c| entry(c, c, 0)).collect();
        let mut plan = evictor.plan(&entries, |_| true);
        plan.conns.sort_unstable();
        assert_eq!(plan.conns, vec![0, 1]);
        assert_eq!(evictor.usage(Map::Conns).evictions, 5);
    }

    #[test]
    fn frames_are_evicted_among_framed_connections_and_not_twice() {
        let mut evictor = Evictor::new(100, 4);
        let mut entries: Vec<_> = (0..5).map(|c| entry(c, c, flags::HTTP_CANDIDATE)).collect();
        entries.push(entry(5, 0, flags::WATCHED)); // No frame tracking: not counted.
        let plan = evictor.plan(&entries, |c| c != 3);
        // Five framed entries over a high water of 3: down to 3, the non-WebSocket one first.
        assert_eq!(plan.conns, Vec::<u64>::new());
        let mut frames = plan.frames;
        frames.sort_unstable();
        assert_eq!(frames, vec![0, 3]);
        assert_eq!(evictor.usage(Map::Frames).evictions, 2);
        // Their frame entries are gone: the next refresh counts three, and evicts nothing.
        assert_eq!(evictor.plan(&entries, |c| c != 3), Plan::default());
        assert_eq!(evictor.usage(Map::Frames).entries, 3);
    }

    #[test]
    fn evicted_connections_are_remembered_while_they_live() {
        let mut evictor = Evictor::new(2, 2);
        let entries: Vec<_> = (0..3).map(|c| entry(c, c, 0)).collect();
        let plan = evictor.plan(&entries, |_| false);
        assert_eq!(plan.conns.len(), 2);
        assert!(plan.conns.iter().all(|&c| evictor.was_evicted(c)));
        evictor.retain_alive(|c| c == plan.conns[0]);
        assert!(evictor.was_evicted(plan.conns[0]));
        assert!(!evictor.was_evicted(plan.conns[1]));
    }

    #[test]
    fn activity_counts_from_either_side() {
        let state =
            ConnState { established_ns: 5, last_ack_ns: 9, last_write_ns: 7, ..Default::default() };
        assert_eq!(last_activity_ns(&state), 9);
    }
}
