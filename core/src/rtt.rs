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

/// Per-peer round-trip estimators with a bounded table.
#[derive(Clone, Debug)]
pub struct RttTable {
    peers: Map<NodeId, (Estimator, u64)>,
    global: Option<Estimator>,
    peers_max: usize,
    rto_min_ms: u64,
    rto_max_ms: u64,
    rto_initial_ms: u64,
    /// Monotone counter used to evict the least recently updated entry.
    tick: u64,
    /// Consecutive timeouts per peer since its last answer (bounded like `peers`).
    silent: Map<NodeId, u32>,
}

impl RttTable {
    pub fn new(peers_max: usize, rto_min_ms: u64, rto_max_ms: u64, rto_initial_ms: u64) -> Self {
        assert!(peers_max > 0 && rto_min_ms <= rto_max_ms);
        RttTable {
            peers: Map::default(),
            global: None,
            peers_max,
            rto_min_ms,
            rto_max_ms,
            rto_initial_ms,
            tick: 0,
            silent: Map::default(),
        }
    }

    /// Records a round trip to `peer` that took `rtt_ms`.
    pub fn sample(&mut self, peer: NodeId, rtt_ms: u64) {
        let s = rtt_ms as f64;
        self.tick += 1;
        self.silent.remove(&peer);
        match self.global.as_mut() {
            Some(g) => g.update(s),
            None => self.global = Some(Estimator::first(s)),
        }
        if let Some((e, t)) = self.peers.get_mut(&peer) {
            e.update(s);
            *t = self.tick;
            return;
        }
        if self.peers.len() >= self.peers_max {
            // Evict the stalest quarter in one pass, so a node talking to many
            // peers pays for eviction rarely rather than on every sample.
            let mut ticks: Vec<u64> = self.peers.values().map(|(_, t)| *t).collect();
            let cut = ticks.len() / 4;
            let (_, nth, _) = ticks.select_nth_unstable(cut);
            let cutoff = *nth;
            self.peers.retain(|_, (_, t)| *t > cutoff);
        }
        self.peers.insert(peer, (Estimator::first(s), self.tick));
    }

    /// Records a timeout; returns how many in a row `peer` has now missed.
    pub fn missed(&mut self, peer: NodeId) -> u32 {
        if self.silent.len() >= self.peers_max && !self.silent.contains_key(&peer) {
            // Forget the lot: these are counts of consecutive misses, and a
            // peer that matters will miss again.
            self.silent.clear();
        }
        let n = self.silent.entry(peer).or_insert(0);
        *n += 1;
        *n
    }

    /// How long to wait for `peer` before declaring it unresponsive.
    pub fn timeout_ms(&self, peer: NodeId) -> u64 {
        let rto = match (self.peers.get(&peer), self.global.as_ref()) {
            // A peer's own estimate is trusted once it rests on a few samples;
            // a single fast sample would otherwise set a hair trigger.
            (Some((e, _)), _) if e.samples >= 3 => e.rto_ms(),
            (Some((e, _)), Some(g)) => e.rto_ms().max(2.0 * g.rto_ms()),
            (Some((e, _)), None) => e.rto_ms(),
            // Unknown peer: a generous multiple of what we see elsewhere.
            (None, Some(g)) => 2.0 * g.rto_ms(),
            (None, None) => self.rto_initial_ms as f64,
        };
        (rto.ceil() as u64).clamp(self.rto_min_ms, self.rto_max_ms)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
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
}
