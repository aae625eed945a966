//! The simulated network: latency, loss, duplication, reordering, clogged links
//! and partitions. All randomness comes from the network's own RNG stream.

use crate::config::{Cut, NetConfig};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};
use std::collections::BTreeMap;

/// TCP's smallest retransmission timeout (Linux: 200 ms), doubled per retry.
const STREAM_RTO_MIN_MS: u64 = 200;

/// A partition in force, resolved to concrete sides.
#[derive(Clone, Debug)]
pub struct ActiveCut {
    pub id: u64,
    /// For Symmetric/OneWay: side A membership by slot (false = side B).
    side_a: Vec<bool>,
    kind: CutKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CutKind {
    Symmetric,
    OneWay,
    Isolate(u32),
}

/// What happens to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Dropped,
    /// Deliver after this many ms (and maybe a second copy after the other).
    Deliver(u64, Option<u64>),
}

pub struct Network {
    cfg: NetConfig,
    latency: LogNormal<f64>,
    cuts: Vec<ActiveCut>,
    /// (low slot, high slot) -> clogged until (ms).
    clogs: BTreeMap<(u32, u32), u64>,
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

impl Network {
    pub fn new(cfg: NetConfig) -> Network {
        let mu = cfg.latency_median_ms.max(0.1).ln();
        let latency = LogNormal::new(mu, cfg.latency_sigma.max(0.0)).expect("valid latency shape");
        Network {
            cfg,
            latency,
            cuts: Vec::new(),
            clogs: BTreeMap::new(),
            sent: 0,
            dropped: 0,
            duplicated: 0,
        }
    }

    fn one_latency(&self, rng: &mut ChaCha8Rng) -> u64 {
        let cap = self.cfg.latency_median_ms * 20.0;
        let mut ms = self.latency.sample(rng).min(cap).max(1.0) as u64;
        if self.cfg.reorder > 0.0 && rng.gen_bool(self.cfg.reorder.min(1.0)) {
            ms += rng.gen_range(0..=self.cfg.reorder_extra_ms);
        }
        ms
    }

    /// Decides the fate of a message from slot `a` to slot `b` sent at `now`.
    pub fn route(&mut self, rng: &mut ChaCha8Rng, now: u64, a: u32, b: u32) -> Fate {
        self.sent += 1;
        if self.blocked(a, b) || (self.cfg.loss > 0.0 && rng.gen_bool(self.cfg.loss.min(1.0))) {
            self.dropped += 1;
            return Fate::Dropped;
        }
        let key = (a.min(b), a.max(b));
        let hold = match self.clogs.get(&key) {
            Some(&until) if until > now => until - now,
            _ => 0,
        };
        let first = hold + self.one_latency(rng);
        let second = if self.cfg.duplicate > 0.0 && rng.gen_bool(self.cfg.duplicate.min(1.0)) {
            self.duplicated += 1;
            Some(hold + self.one_latency(rng))
        } else {
            None
        };
        Fate::Deliver(first, second)
    }

    /// The fate of a packet on an ordered, reliable stream (TCP) from `a`
    /// to `b`: a cut link loses it (the connection breaks); random loss only
    /// delays it by a retransmission timeout per lost try, as TCP turns loss
    /// into latency. `None` when lost.
    pub fn route_stream(&mut self, rng: &mut ChaCha8Rng, now: u64, a: u32, b: u32) -> Option<u64> {
        self.sent += 1;
        if self.blocked(a, b) {
            self.dropped += 1;
            return None;
        }
        let mut retransmit_ms = 0;
        let mut rto_ms = STREAM_RTO_MIN_MS;
        while self.cfg.loss > 0.0 && rng.gen_bool(self.cfg.loss.min(0.9)) && rto_ms < 64_000 {
            retransmit_ms += rto_ms;
            rto_ms *= 2;
        }
        let key = (a.min(b), a.max(b));
        let hold = match self.clogs.get(&key) {
            Some(&until) if until > now => until - now,
            _ => 0,
        };
        Some(hold + retransmit_ms + self.one_latency(rng))
    }

    fn blocked(&self, a: u32, b: u32) -> bool {
        self.cuts.iter().any(|c| {
            let side = |s: u32| c.side_a.get(s as usize).copied().unwrap_or(false);
            match c.kind {
                CutKind::Symmetric => side(a) != side(b),
                CutKind::OneWay => side(a) && !side(b),
                CutKind::Isolate(n) => a == n || b == n,
            }
        })
    }

    /// Starts a partition; `slots` is the current number of slots.
    pub fn cut(&mut self, rng: &mut ChaCha8Rng, id: u64, cut: Cut, slots: usize) {
        let (side_a, kind) = match cut {
            Cut::Symmetric { fraction } => (
                (0..slots)
                    .map(|_| rng.gen_bool(fraction.clamp(0.0, 1.0)))
                    .collect(),
                CutKind::Symmetric,
            ),
            Cut::OneWay { fraction } => (
                (0..slots)
                    .map(|_| rng.gen_bool(fraction.clamp(0.0, 1.0)))
                    .collect(),
                CutKind::OneWay,
            ),
            Cut::Isolate { node } => (Vec::new(), CutKind::Isolate(node)),
        };
        self.cuts.push(ActiveCut { id, side_a, kind });
    }

    pub fn end_cut(&mut self, id: u64) {
        self.cuts.retain(|c| c.id != id);
    }

    pub fn clog(&mut self, a: u32, b: u32, until: u64) {
        let e = self.clogs.entry((a.min(b), a.max(b))).or_insert(0);
        *e = (*e).max(until);
    }

    /// Ends every fault: partitions, clogs, loss, duplication and extra
    /// reordering. Latency (and its natural jitter) stays.
    pub fn heal(&mut self) {
        self.cuts.clear();
        self.clogs.clear();
        self.cfg.loss = 0.0;
        self.cfg.duplicate = 0.0;
        self.cfg.reorder = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn partitions_block_and_heal() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut n = Network::new(NetConfig::default());
        n.cut(&mut rng, 1, Cut::Isolate { node: 3 }, 10);
        assert_eq!(n.route(&mut rng, 0, 3, 4), Fate::Dropped);
        assert_eq!(n.route(&mut rng, 0, 4, 3), Fate::Dropped);
        assert!(matches!(n.route(&mut rng, 0, 4, 5), Fate::Deliver(..)));
        n.end_cut(1);
        assert!(matches!(n.route(&mut rng, 0, 3, 4), Fate::Deliver(..)));
    }

    #[test]
    fn one_way_cut_passes_the_other_way() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut n = Network::new(NetConfig::default());
        n.cut(&mut rng, 1, Cut::OneWay { fraction: 0.5 }, 64);
        let c = n.cuts[0].side_a.clone();
        let a = c.iter().position(|x| *x).unwrap() as u32;
        let b = c.iter().position(|x| !*x).unwrap() as u32;
        assert_eq!(n.route(&mut rng, 0, a, b), Fate::Dropped);
        assert!(matches!(n.route(&mut rng, 0, b, a), Fate::Deliver(..)));
    }

    #[test]
    fn clogged_link_holds_messages() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut n = Network::new(NetConfig::default());
        n.clog(1, 2, 10_000);
        match n.route(&mut rng, 0, 2, 1) {
            Fate::Deliver(ms, _) => assert!(ms >= 10_000),
            f => panic!("{f:?}"),
        }
    }
}
