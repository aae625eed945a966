//! A hand-driven network for scripted scenarios (counterexamples from the
//! literature, regression traces): nodes with periodic maintenance switched off,
//! messages delivered in FIFO order only when the script says so, time advanced
//! explicitly. Uses the same `Node` and the same checkers as the simulator.

use crate::check::{self, View, Violation};
use peerstore_core::{Addr, Command, Config, Id, Input, Message, Node, Output, Peer, Protocol};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub struct Script {
    cfg: Config,
    nodes: BTreeMap<u128, Node>,
    dead: BTreeSet<u128>,
    wire: VecDeque<(u128, Peer, Message)>,
    now: u64,
    cmd: u64,
}

/// The peer a script uses for id `v`.
pub fn peer(v: u128) -> Peer {
    Peer {
        id: Id::from_u128(v),
        addr: Addr::Slot(v as u32),
    }
}

impl Script {
    pub fn new(protocol: Protocol, successors: usize) -> Script {
        Script {
            cfg: Config {
                protocol,
                successors_max: successors,
                ..Config::default()
            },
            nodes: BTreeMap::new(),
            dead: BTreeSet::new(),
            wire: VecDeque::new(),
            now: 0,
            cmd: 0,
        }
    }

    fn add(&mut self, v: u128) {
        let mut n = Node::new(self.cfg.clone(), peer(v), v as u64);
        n.handle(self.now, Input::Command(0, Command::SetMaintenance(false)));
        self.nodes.insert(v, n);
        self.drain(v);
    }

    /// Node `v` starts a ring of its own.
    pub fn create(&mut self, v: u128) {
        self.add(v);
        self.command(v, Command::Create);
    }

    /// Node `v` joins through `via`; the lookup runs to completion.
    pub fn join(&mut self, v: u128, via: u128) {
        self.add(v);
        self.command(v, Command::Join { via: peer(via) });
        self.settle();
    }

    pub fn command(&mut self, v: u128, c: Command) {
        self.cmd += 1;
        if let Some(n) = self.nodes.get_mut(&v) {
            n.handle(self.now, Input::Command(self.cmd, c));
            // Scripted runs drive maintenance by hand; keep the timers off even
            // after a join switched the node to Joined.
            n.handle(self.now, Input::Command(0, Command::SetMaintenance(false)));
        }
        self.drain(v);
    }

    /// One stabilize round of `v`, delivered to completion.
    pub fn stabilize(&mut self, v: u128) {
        self.command(v, Command::Stabilize);
        self.settle();
    }

    pub fn crash(&mut self, v: u128) {
        self.dead.insert(v);
    }

    fn drain(&mut self, v: u128) {
        let Some(n) = self.nodes.get_mut(&v) else {
            return;
        };
        while let Some(o) = n.poll_output() {
            if let Output::Send { to, msg } = o {
                let Addr::Slot(t) = to.addr else { continue };
                self.wire.push_back((t as u128, peer(v), msg));
            }
        }
    }

    /// Delivers every message in flight (and those they cause), FIFO. Messages
    /// to crashed nodes are lost. Bounded so a livelock fails loudly.
    pub fn settle(&mut self) {
        for _ in 0..100_000 {
            let Some((to, from, msg)) = self.wire.pop_front() else {
                return;
            };
            if self.dead.contains(&to) || self.dead.contains(&from.id_u128()) {
                continue;
            }
            if let Some(n) = self.nodes.get_mut(&to) {
                if std::env::var_os("SCRIPT_TRACE").is_some() {
                    eprintln!("deliver {:?} -> {to}: {msg:?}", from.id);
                }
                n.handle(self.now, Input::Message { from, msg });
                self.drain(to);
            }
        }
        panic!("script did not settle within 100000 deliveries");
    }

    /// Lets `ms` pass: every live node's expired requests time out.
    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        let live: Vec<u128> = self.live();
        for v in live {
            if let Some(n) = self.nodes.get_mut(&v) {
                n.handle(self.now, Input::Timeout);
            }
            self.drain(v);
        }
        self.settle();
    }

    pub fn live(&self) -> Vec<u128> {
        self.nodes
            .keys()
            .copied()
            .filter(|v| !self.dead.contains(v))
            .collect()
    }

    pub fn node(&self, v: u128) -> &Node {
        &self.nodes[&v]
    }

    /// Runs periodic maintenance by hand: `rounds` of stabilize and predecessor
    /// checks on every live node, with enough time between them for timeouts
    /// and the failure detector's suspicion window.
    pub fn maintain(&mut self, rounds: usize) {
        for _ in 0..rounds {
            for v in self.live() {
                self.stabilize(v);
                self.advance(self.cfg.rto_max_ms + 1);
            }
            for v in self.live() {
                self.command(v, Command::CheckPredecessor);
                self.settle();
                self.advance(self.cfg.rto_max_ms + 1);
            }
        }
    }

    /// Zave's invariants on the live, joined nodes.
    pub fn violations(&self) -> Vec<Violation> {
        let views: Vec<View> = self
            .nodes
            .iter()
            .filter(|(v, n)| !self.dead.contains(v) && n.is_joined())
            .map(|(_, n)| View {
                id: n.me().id,
                succs: n.successors(),
                pred: n.predecessor(),
                fingers: n.fingers(),
            })
            .collect();
        check::check_safety(&views, self.cfg.successors_max)
    }
}

trait IdU128 {
    fn id_u128(&self) -> u128;
}

impl IdU128 for Peer {
    fn id_u128(&self) -> u128 {
        u128::from_be_bytes(self.id.0[4..].try_into().expect("16 bytes"))
    }
}

/// Zave's counterexample to the 2001 rules (her Alloy model of the original
/// protocol, r = 2): C joins A's one-node ring, B joins between A and C and
/// notifies C, then B fails. Under the 2001 rules A adopts the dead B as its
/// successor on C's word, loses C from its list, and can never get back: the
/// ring has a permanent gap. Under Zave's rules A asks B first, finds it dead,
/// and the ring heals. Returns the violations left after maintenance settles.
pub fn zave_join_then_fail(protocol: Protocol) -> (Script, Vec<Violation>) {
    const A: u128 = 10;
    const B: u128 = 20;
    const C: u128 = 30;
    let mut s = Script::new(protocol, 2);
    s.create(A);
    s.join(C, A);
    s.stabilize(C); // C learns A has no predecessor; notifies A: A.pred = C
    s.stabilize(A); // alone, A looks at its predecessor C and takes it as successor
    s.stabilize(C); // C.pred = A
    s.join(B, A); // B's successor is C
    s.stabilize(B); // B notifies C: C.pred = B
    s.crash(B);
    s.stabilize(A); // C says its predecessor is B, which lies between A and C
    s.advance(60_000);
    s.maintain(10);
    let v = s.violations();
    (s, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counterexample_breaks_chord2001_for_good() {
        let (s, v) = zave_join_then_fail(Protocol::Chord2001);
        assert!(
            v.contains(&Violation::NoBestSucc {
                node: Id::from_u128(10)
            }),
            "expected A to be left without a live successor, got {v:?}; A's list {:?}",
            s.node(10).successors()
        );
    }

    #[test]
    fn counterexample_heals_under_zave() {
        let (s, v) = zave_join_then_fail(Protocol::Zave);
        assert_eq!(v, vec![], "violations under Zave's rules");
        assert_eq!(s.node(10).successors()[0], peer(30));
        assert_eq!(s.node(30).successors()[0], peer(10));
        assert_eq!(s.node(10).predecessor(), Some(peer(30)));
        assert_eq!(s.node(30).predecessor(), Some(peer(10)));
    }
}
