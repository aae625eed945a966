//! Failure detection by timeouts: per-peer smoothed round-trip time (RFC 6298),
//! timeout = srtt + 4 * rttvar, clamped. Peers we have never timed fall back to
//! an estimator fed by every sample, so a new peer gets a realistic timeout.

use crate::id::NodeId;
use rustc_hash::FxHashMap;

/// Fixed-key hashing: the table's order never reaches an output (eviction
/// picks by age), and a fixed key keeps runs reproducible all the same. Keys
/// are ring ids (digests) and the table is bounded, so a fast non-keyed hash
/// is enough; SipHash here was a tenth of simulator time.
type Map<K, V> = FxHashMap<K, V>;

#[derive(Clone, Copy, Debug)]
struct Estimator {
    srtt_ms: f64,
    rttvar_ms: f64,
    samples: u32,
}

impl Estimator {
    fn first(sample_ms: f64) -> Self {
        Estimator {
            srtt_ms: sample_ms,
            rttvar_ms: sample_ms / 2.0,
            samples: 1,
        }
    }

    fn update(&mut self, sample_ms: f64) {
        self.samples = self.samples.saturating_add(1);
        self.rttvar_ms = 0.75 * self.rttvar_ms + 0.25 * (self.srtt_ms - sample_ms).abs();
        self.srtt_ms = 0.875 * self.srtt_ms + 0.125 * sample_ms;
    }

    fn rto_ms(&self) -> f64 {
        self.srtt_ms + 4.0 * self.rttvar_ms
    }
}

/// What the table knows of one peer.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Meaningful once `est.samples > 0`; a peer that has only ever missed
    /// has no estimate of its own.
    est: Estimator,
    /// When the entry was last sampled or missed, for eviction.
    tick: u64,
    /// Consecutive timeouts since the peer last answered.
    silent: u32,
}

impl Entry {
    const NEW: Entry = Entry {
        est: Estimator {
            srtt_ms: 0.0,
            rttvar_ms: 0.0,
            samples: 0,
        },
        tick: 0,
        silent: 0,
    };
}

/// Per-peer round-trip estimators with a bounded table.
///
/// The two peers sampled or missed most recently live inline, the rest in a
/// hash map. A node asks its first successor every stabilize round, so that
/// peer's entry stays inline: in a simulation of tens of thousands of nodes,
/// the map's memory is rarely in cache and reaching it was a tenth of the
/// run time.
#[derive(Clone, Debug)]
pub struct RttTable {
    hot: [Option<(NodeId, Entry)>; 2],
    peers: Map<NodeId, Entry>,
    global: Option<Estimator>,
    peers_max: usize,
    rto_min_ms: u64,
    rto_max_ms: u64,
    rto_initial_ms: u64,
    /// Monotone counter used to evict the least recently updated entry.
    tick: u64,
}

impl RttTable {
    pub fn new(peers_max: usize, rto_min_ms: u64, rto_max_ms: u64, rto_initial_ms: u64) -> Self {
        assert!(peers_max > 0 && rto_min_ms <= rto_max_ms);
        RttTable {
            hot: [None, None],
            peers: Map::default(),
            global: None,
            peers_max,
            rto_min_ms,
            rto_max_ms,
            rto_initial_ms,
            tick: 0,
        }
    }

    /// Which inline slot holds `peer`, if one does.
    fn hot_index(&self, peer: NodeId) -> Option<usize> {
        self.hot
            .iter()
            .position(|h| h.is_some_and(|(id, _)| id == peer))
    }

    fn entry(&self, peer: NodeId) -> Option<&Entry> {
        match self.hot_index(peer) {
            Some(i) => self.hot[i].as_ref().map(|(_, e)| e),
            None => self.peers.get(&peer),
        }
    }

    /// The entry for `peer`, moved inline (made one if there is none), with
    /// its tick renewed.
    fn touch(&mut self, peer: NodeId) -> &mut Entry {
        self.tick += 1;
        let tick = self.tick;
        let i = match self.hot_index(peer) {
            Some(i) => i,
            None => {
                let e = match self.peers.remove(&peer) {
                    Some(e) => e,
                    None => {
                        if self.len() >= self.peers_max {
                            self.evict();
                        }
                        Entry::NEW
                    }
                };
                // The inline slot touched longer ago goes back to the map.
                let i = match &self.hot {
                    [None, _] => 0,
                    [_, None] => 1,
                    [Some(a), Some(b)] => usize::from(a.1.tick > b.1.tick),
                };
                if let Some((id, old)) = self.hot[i].replace((peer, e)) {
                    self.peers.insert(id, old);
                }
                i
            }
        };
        let e = &mut self.hot[i].as_mut().expect("just placed").1;
        e.tick = tick;
        e
    }

    /// Drops the stalest quarter in one pass, so a node talking to many
    /// peers pays for eviction rarely rather than on every new peer.
    fn evict(&mut self) {
        let hot = self.hot.iter().flatten().map(|(_, e)| e.tick);
        let mut ticks: Vec<u64> = self.peers.values().map(|e| e.tick).chain(hot).collect();
        let cut = ticks.len() / 4;
        let (_, nth, _) = ticks.select_nth_unstable(cut);
        let cutoff = *nth;
        self.peers.retain(|_, e| e.tick > cutoff);
        for h in self.hot.iter_mut() {
            if h.is_some_and(|(_, e)| e.tick <= cutoff) {
                *h = None;
            }
        }
    }

    /// Records a round trip to `peer` that took `rtt_ms`.
    pub fn sample(&mut self, peer: NodeId, rtt_ms: u64) {
        let s = rtt_ms as f64;
        match self.global.as_mut() {
            Some(g) => g.update(s),
            None => self.global = Some(Estimator::first(s)),
        }
        let e = self.touch(peer);
        e.silent = 0;
        if e.est.samples == 0 {
            e.est = Estimator::first(s);
        } else {
            e.est.update(s);
        }
    }

    /// Records a timeout; returns how many in a row `peer` has now missed.
    pub fn missed(&mut self, peer: NodeId) -> u32 {
        let e = self.touch(peer);
        e.silent = e.silent.saturating_add(1);
        e.silent
    }

    /// How long to wait for `peer` before declaring it unresponsive.
    pub fn timeout_ms(&self, peer: NodeId) -> u64 {
        let own = self.entry(peer).map(|e| e.est).filter(|e| e.samples > 0);
        let rto = match (own, self.global.as_ref()) {
            // A peer's own estimate is trusted once it rests on a few samples;
            // a single fast sample would otherwise set a hair trigger.
            (Some(e), _) if e.samples >= 3 => e.rto_ms(),
            (Some(e), Some(g)) => e.rto_ms().max(2.0 * g.rto_ms()),
            (Some(e), None) => e.rto_ms(),
            // Unknown peer: a generous multiple of what we see elsewhere.
            (None, Some(g)) => 2.0 * g.rto_ms(),
            (None, None) => self.rto_initial_ms as f64,
        };
        (rto.ceil() as u64).clamp(self.rto_min_ms, self.rto_max_ms)
    }

    /// Peers the table holds something for (an estimate or a miss count).
    pub fn len(&self) -> usize {
        self.peers.len() + self.hot.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_follows_samples_and_clamps() {
        let mut t = RttTable::new(4, 50, 5_000, 1_000);
        let p = NodeId::from_u128(7);
        assert_eq!(t.timeout_ms(p), 1_000);
        for _ in 0..50 {
            t.sample(p, 100);
        }
        // Steady 100 ms samples: rttvar decays towards 0, timeout towards srtt.
        let rto = t.timeout_ms(p);
        assert!((100..=110).contains(&rto), "rto {rto}");
        // A jittery peer gets a longer timeout.
        let q = NodeId::from_u128(8);
        for i in 0..50 {
            t.sample(q, if i % 2 == 0 { 50 } else { 250 });
        }
        assert!(t.timeout_ms(q) > 300, "rto {}", t.timeout_ms(q));
        // Tiny RTTs are clamped to the floor.
        let r = NodeId::from_u128(9);
        for _ in 0..50 {
            t.sample(r, 1);
        }
        assert_eq!(t.timeout_ms(r), 50);
    }

    #[test]
    fn table_is_bounded() {
        let mut t = RttTable::new(3, 10, 1000, 500);
        for i in 0..10 {
            t.sample(NodeId::from_u128(i), 20);
        }
        assert_eq!(t.len(), 3);
        // Unknown peers get twice the global estimate, not the initial guess.
        assert!(t.timeout_ms(NodeId::from_u128(99)) < 500);
    }

    #[test]
    fn misses_count_until_an_answer() {
        let mut t = RttTable::new(8, 10, 1000, 500);
        let (a, b, c) = (
            NodeId::from_u128(1),
            NodeId::from_u128(2),
            NodeId::from_u128(3),
        );
        assert_eq!(t.missed(a), 1);
        // Other peers passing through the inline slots do not reset a's count.
        t.sample(b, 20);
        t.sample(c, 20);
        assert_eq!(t.missed(a), 2);
        t.sample(a, 30);
        assert_eq!(t.missed(a), 1);
        // A peer that has only missed has no estimate of its own.
        let d = NodeId::from_u128(4);
        t.missed(d);
        assert_eq!(t.timeout_ms(d), t.timeout_ms(NodeId::from_u128(99)));
    }

    proptest::proptest! {
        /// Inline slots or map, the table answers as a plain map of
        /// estimators and miss counts would (while it is not full).
        #[test]
        fn answers_like_a_plain_map(ops in proptest::collection::vec((0u8..6, 0u8..3, 1u64..400), 0..300)) {
            let mut t = RttTable::new(64, 10, 5_000, 700);
            let mut model: std::collections::HashMap<u8, (Option<Estimator>, u32)> = Default::default();
            let mut global: Option<Estimator> = None;
            for (p, op, ms) in ops {
                let id = NodeId::from_u128(p as u128 + 1);
                match op {
                    0 => {
                        t.sample(id, ms);
                        let s = ms as f64;
                        match global.as_mut() { Some(g) => g.update(s), None => global = Some(Estimator::first(s)) }
                        let m = model.entry(p).or_insert((None, 0));
                        m.1 = 0;
                        match m.0.as_mut() { Some(e) => e.update(s), None => m.0 = Some(Estimator::first(s)) }
                    }
                    1 => {
                        let m = model.entry(p).or_insert((None, 0));
                        m.1 += 1;
                        proptest::prop_assert_eq!(t.missed(id), m.1);
                    }
                    _ => {
                        let own = model.get(&p).and_then(|m| m.0);
                        let rto = match (own, global.as_ref()) {
                            (Some(e), _) if e.samples >= 3 => e.rto_ms(),
                            (Some(e), Some(g)) => e.rto_ms().max(2.0 * g.rto_ms()),
                            (Some(e), None) => e.rto_ms(),
                            (None, Some(g)) => 2.0 * g.rto_ms(),
                            (None, None) => 700.0,
                        };
                        proptest::prop_assert_eq!(t.timeout_ms(id), (rto.ceil() as u64).clamp(10, 5_000));
                    }
                }
                proptest::prop_assert_eq!(t.len(), model.len());
            }
        }
    }
}
