//! Iterative lookup of a key's successor.
//!
//! The querier drives every step, so it sees each hop and each timeout and can
//! fall back when a hop is dead. Routing asks the known node that most closely
//! precedes the key; a responder answers with its successor list and the nodes
//! it knows nearest before the key. Once a responder's successor list spans the
//! key, the lookup checks its candidate answer is alive (and asks it for its
//! predecessor, which catches a node that joined in between); a dead candidate
//! falls back to the next list entry, a dead hop to the next best candidate.

use crate::id::{Id, NodeId};
use crate::wire::Peer;
use std::collections::BTreeSet;

/// Identifies one lookup inside a node.
pub type LookupId = u64;

/// Why a lookup gave up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupError {
    /// Every candidate hop was dead or unjoined.
    NoRoute { hops: u32, timeouts: u32 },
    /// The hop or timeout budget ran out (a livelock guard).
    TooManySteps { hops: u32, timeouts: u32 },
    /// This node has not joined a ring and knows nobody to ask.
    NotJoined,
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::NoRoute { hops, timeouts } => {
                write!(
                    f,
                    "no live route to the key after {hops} hops and {timeouts} timeouts"
                )
            }
            LookupError::TooManySteps { hops, timeouts } => write!(
                f,
                "lookup gave up after {hops} hops and {timeouts} timeouts (step budget spent)"
            ),
            LookupError::NotJoined => write!(f, "this node has not joined a ring"),
        }
    }
}

/// What the lookup wants next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send `FindNext` (route) or `GetState` (verify) to this peer.
    Ask {
        to: Peer,
        verify: bool,
    },
    /// The key's successor, with its state when we asked it.
    Done {
        owner: Peer,
        owner_state: Option<(Option<Peer>, Vec<Peer>)>,
    },
    Failed(LookupError),
}

#[derive(Clone, Debug)]
pub(crate) struct Lookup {
    pub key: Id,
    pub started_ms: u64,
    pub hops: u32,
    pub timeouts: u32,
    me: NodeId,
    /// The querier may not be the answer (it is joining and not yet a member).
    exclude_me: bool,
    /// Route candidates, each strictly preceding the key.
    candidates: Vec<Peer>,
    /// Ids already asked or found dead.
    tried: BTreeSet<NodeId>,
    /// Verification queue: the candidate answer first, then its fallbacks.
    verify: Vec<Peer>,
    /// Answers already confirmed alive, most recent (closest to the key) last.
    confirmed: Vec<(Peer, Option<Peer>, Vec<Peer>)>,
    candidates_max: usize,
    hops_max: u32,
    timeouts_max: u32,
}

impl Lookup {
    pub fn new(
        key: Id,
        me: NodeId,
        exclude_me: bool,
        now_ms: u64,
        hops_max: u32,
        timeouts_max: u32,
    ) -> Self {
        Lookup {
            key,
            started_ms: now_ms,
            hops: 0,
            timeouts: 0,
            me,
            exclude_me,
            candidates: Vec::new(),
            tried: BTreeSet::new(),
            verify: Vec::new(),
            confirmed: Vec::new(),
            candidates_max: 48,
            hops_max,
            timeouts_max,
        }
    }

    /// Seeds the route with a node to start from (a joiner's entry node).
    pub fn add_start(&mut self, peer: Peer) {
        self.candidates.push(peer);
    }

    /// A responder `from` (or the querier itself, `local`) reports its successor
    /// list and closer nodes.
    pub fn on_next(&mut self, from: Peer, succs: &[Peer], closer: &[Peer], local: bool) -> Step {
        if !local {
            self.hops += 1;
        }
        self.tried.insert(from.id);
        if let Some(last) = succs.last() {
            if self.key.in_open_closed(from.id, last.id) {
                // The list spans the key: the answer is the first entry at or
                // after it, and the rest are its fallbacks.
                let mut prev = from.id;
                let mut start = succs.len();
                for (i, s) in succs.iter().enumerate() {
                    if self.key.in_open_closed(prev, s.id) {
                        start = i;
                        break;
                    }
                    prev = s.id;
                }
                self.verify = succs[start..].iter().rev().copied().collect();
                return self.next_step();
            }
        }
        let from_dist = from.id.distance_to(self.key);
        for p in succs.iter().chain(closer) {
            let d = p.id.distance_to(self.key);
            if d < from_dist && d != Id::ZERO && !self.tried.contains(&p.id) {
                self.candidates.push(*p);
            }
        }
        self.next_step()
    }

    /// The current verification target answered with its state.
    pub fn on_state(&mut self, from: Peer, pred: Option<Peer>, succs: Vec<Peer>) -> Step {
        self.hops += 1;
        self.tried.insert(from.id);
        if self.verify.last().map(|p| p.id) == Some(from.id) {
            self.verify.pop();
        }
        // A predecessor in [key, from) is a closer answer (a node that joined
        // after the list we read was made): check it before settling.
        let closer_pred = pred.filter(|p| {
            p.id != from.id
                && (p.id == self.key || p.id.in_open(self.key, from.id))
                && !self.tried.contains(&p.id)
        });
        self.confirmed.push((from, pred, succs));
        self.verify.clear();
        if let Some(p) = closer_pred {
            self.verify.push(p);
        }
        self.next_step()
    }

    /// The peer we were waiting for did not answer in time.
    pub fn on_timeout(&mut self, to: Peer) -> Step {
        self.timeouts += 1;
        self.tried.insert(to.id);
        if self.verify.last().map(|p| p.id) == Some(to.id) {
            self.verify.pop();
        }
        self.next_step()
    }

    fn next_step(&mut self) -> Step {
        if self.hops > self.hops_max || self.timeouts > self.timeouts_max {
            return Step::Failed(LookupError::TooManySteps {
                hops: self.hops,
                timeouts: self.timeouts,
            });
        }
        while let Some(&p) = self.verify.last() {
            if p.id == self.me {
                if self.exclude_me {
                    self.verify.pop();
                    continue;
                }
                return Step::Done {
                    owner: p,
                    owner_state: None,
                };
            }
            if self.tried.contains(&p.id) && !self.confirmed.iter().any(|c| c.0.id == p.id) {
                self.verify.pop();
                continue;
            }
            return Step::Ask {
                to: p,
                verify: true,
            };
        }
        if let Some((owner, pred, succs)) = self.confirmed.pop() {
            return Step::Done {
                owner,
                owner_state: Some((pred, succs)),
            };
        }
        // Route on: closest preceding candidate not yet tried.
        self.candidates.retain(|p| !self.tried.contains(&p.id));
        self.candidates.sort_by_key(|p| p.id.distance_to(self.key));
        self.candidates.dedup_by_key(|p| p.id);
        self.candidates.truncate(self.candidates_max);
        match self.candidates.first() {
            Some(&p) => {
                self.candidates.remove(0);
                Step::Ask {
                    to: p,
                    verify: false,
                }
            }
            None => Step::Failed(LookupError::NoRoute {
                hops: self.hops,
                timeouts: self.timeouts,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Addr;

    fn p(v: u128) -> Peer {
        Peer {
            id: Id::from_u128(v),
            addr: Addr::Slot(v as u32),
        }
    }

    #[test]
    fn local_list_spanning_key_goes_straight_to_verify() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        let step = l.on_next(p(10), &[p(20), p(30), p(40)], &[], true);
        assert_eq!(
            step,
            Step::Ask {
                to: p(30),
                verify: true
            }
        );
        // 30 answers, its predecessor is 20 (before the key): done.
        let step = l.on_state(p(30), Some(p(20)), vec![p(40)]);
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(30)));
        assert_eq!((l.hops, l.timeouts), (1, 0));
    }

    #[test]
    fn dead_answer_falls_back_to_next_entry() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        l.on_next(p(10), &[p(20), p(30), p(40)], &[], true);
        let step = l.on_timeout(p(30));
        assert_eq!(
            step,
            Step::Ask {
                to: p(40),
                verify: true
            }
        );
        let step = l.on_state(p(40), Some(p(20)), vec![]);
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(40)));
        assert_eq!(l.timeouts, 1);
    }

    #[test]
    fn newer_predecessor_is_preferred_and_dead_one_falls_back() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        l.on_next(p(10), &[p(20), p(30)], &[], true);
        // 30 says its predecessor is 27, which lies in [25, 30): ask 27.
        let step = l.on_state(p(30), Some(p(27)), vec![]);
        assert_eq!(
            step,
            Step::Ask {
                to: p(27),
                verify: true
            }
        );
        // 27 is dead: 30, already confirmed, is the answer.
        let step = l.on_timeout(p(27));
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(30)));
    }

    #[test]
    fn routing_skips_dead_hops_and_fails_without_route() {
        let mut l = Lookup::new(Id::from_u128(500), Id::from_u128(10), false, 0, 32, 32);
        let step = l.on_next(p(10), &[p(20)], &[p(400), p(300)], true);
        assert_eq!(
            step,
            Step::Ask {
                to: p(400),
                verify: false
            }
        );
        let step = l.on_timeout(p(400));
        assert_eq!(
            step,
            Step::Ask {
                to: p(300),
                verify: false
            }
        );
        let step = l.on_timeout(p(300));
        assert_eq!(
            step,
            Step::Ask {
                to: p(20),
                verify: false
            }
        );
        let step = l.on_timeout(p(20));
        assert!(matches!(step, Step::Failed(LookupError::NoRoute { .. })));
    }

    #[test]
    fn joiner_never_answers_itself() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(25), true, 0, 32, 32);
        l.add_start(p(10));
        assert_eq!(
            l.next_step(),
            Step::Ask {
                to: p(10),
                verify: false
            }
        );
        // A stale list still naming the joiner's old self: skip to the next.
        let step = l.on_next(p(10), &[p(20), p(25), p(30)], &[], false);
        assert_eq!(
            step,
            Step::Ask {
                to: p(30),
                verify: true
            }
        );
    }
}
