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
use std::collections::{BTreeMap, BTreeSet};

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

/// A node's (predecessor, successor list) as it reported them.
pub(crate) type PeerState = (Option<Peer>, Vec<Peer>);

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
        owner_state: Option<PeerState>,
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
    /// The querier's predecessor, checked like any answer's when the querier
    /// itself turns out to be the answer.
    my_pred: Option<Peer>,
    /// Route candidates, each strictly preceding the key, with its distance
    /// to the key: kept sorted farthest first (the next to ask is last), no
    /// id twice (the first offered stays).
    candidates: Vec<(Id, Peer)>,
    /// Ids asked as route hops (they answered or are pending).
    asked: BTreeSet<NodeId>,
    /// Ids that answered a verification.
    verified: BTreeSet<NodeId>,
    /// Timeouts per id. One timeout is enough to route around a hop, but a
    /// live node naming an id as its predecessor earns that id one retry: a
    /// lost message must not make a join skip a live node.
    strikes: BTreeMap<NodeId, u32>,
    /// Verification queue, next target last: (peer, strikes it may have had).
    verify: Vec<(Peer, u32)>,
    /// Answer candidates passed over after a single timeout. A lost message
    /// or a late reply looks like a dead node, so before a later candidate
    /// is settled on, each of these that lies before it is asked once more:
    /// otherwise one lost reply gives a wrong answer.
    skipped: Vec<Peer>,
    /// Join: the predecessor being asked for its list.
    join_pred: Option<Peer>,
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
            my_pred: None,
            candidates: Vec::new(),
            join_pred: None,
            asked: BTreeSet::new(),
            verified: BTreeSet::new(),
            strikes: BTreeMap::new(),
            verify: Vec::new(),
            skipped: Vec::new(),
            confirmed: Vec::new(),
            candidates_max: 48,
            hops_max,
            timeouts_max,
        }
    }

    pub fn set_my_pred(&mut self, pred: Option<Peer>) {
        self.my_pred = pred;
    }

    /// Seeds the route with a node to start from (a joiner's entry node).
    pub fn add_start(&mut self, peer: Peer) {
        self.add_candidate(peer);
    }

    fn add_candidate(&mut self, p: Peer) {
        let before = self.candidates.len();
        self.candidates.push((p.id.distance_to(self.key), p));
        self.sort_candidates(before);
    }

    /// Entries from `before` on were just appended: sorts the list back to
    /// farthest first with the first offer of each id. One stable sort of the
    /// sorted run plus the new entries, instead of an insertion each (a hot
    /// spot in large simulations).
    fn sort_candidates(&mut self, before: usize) {
        if self.candidates.len() == before {
            return;
        }
        // Stable: among equal distances (the same id) the earlier offer comes
        // first, and `dedup_by` keeps the first of each run.
        self.candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        self.candidates
            .dedup_by(|later, earlier| later.0 == earlier.0);
    }

    /// A responder `from` (or the querier itself, `local`) reports its successor
    /// list and closer nodes.
    pub fn on_next(&mut self, from: Peer, succs: &[Peer], closer: &[Peer], local: bool) -> Step {
        if !local {
            self.hops += 1;
        }
        self.asked.insert(from.id);
        if self.exclude_me {
            let list: Vec<Peer> = succs.iter().copied().filter(|p| p.id != self.me).collect();
            if let Some(start) = self.span_start(from.id, &list) {
                return self.join_from_list(from, list, start);
            }
        }
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
                self.verify = succs[start..].iter().rev().map(|p| (*p, 0)).collect();
                // If every answer candidate is dead, route on from the live
                // entries before the key: their lists reach further.
                let (key, strikes) = (self.key, &self.strikes);
                let before = self.candidates.len();
                self.candidates.extend(
                    succs[..start]
                        .iter()
                        .chain(closer)
                        .filter(|p| p.id.in_open(from.id, key) && !strikes.contains_key(&p.id))
                        .map(|p| (p.id.distance_to(key), *p)),
                );
                self.sort_candidates(before);
                return self.next_step();
            }
        }
        let from_dist = from.id.distance_to(self.key);
        let (key, asked, strikes) = (self.key, &self.asked, &self.strikes);
        let before = self.candidates.len();
        self.candidates.extend(
            succs
                .iter()
                .chain(closer)
                .map(|p| (p.id.distance_to(key), *p))
                .filter(|(d, p)| {
                    *d < from_dist
                        && *d != Id::ZERO
                        && !asked.contains(&p.id)
                        && !strikes.contains_key(&p.id)
                }),
        );
        self.sort_candidates(before);
        self.next_step()
    }

    /// Index of the first entry of `list` (held by `holder`) at or after the
    /// key, if the list spans the key.
    fn span_start(&self, holder: NodeId, list: &[Peer]) -> Option<usize> {
        let last = list.last()?;
        if !self.key.in_open_closed(holder, last.id) {
            return None;
        }
        let mut prev = holder;
        for (i, s) in list.iter().enumerate() {
            if self.key.in_open_closed(prev, s.id) {
                return Some(i);
            }
            prev = s.id;
        }
        None
    }

    /// Zave's join: copy the successor list of the key's predecessor `m`, a
    /// node with key in (m, m.succ[0]]. When the list we hold names a node
    /// after `holder` but still before the key, that node is the better
    /// predecessor: ask it. Only a list its holder just gave us is copied: it
    /// skips nothing its (live) holder does not skip and holds a live entry,
    /// so the join keeps Zave's invariant.
    fn join_from_list(&mut self, holder: Peer, list: Vec<Peer>, start: usize) -> Step {
        if start == 0 {
            self.join_pred = None;
            return Step::Done {
                owner: list[0],
                owner_state: Some((Some(holder), list[1..].to_vec())),
            };
        }
        if self.hops > self.hops_max || self.timeouts > self.timeouts_max {
            return Step::Failed(LookupError::TooManySteps {
                hops: self.hops,
                timeouts: self.timeouts,
            });
        }
        let m = list[start - 1];
        self.join_pred = Some(m);
        Step::Ask {
            to: m,
            verify: true,
        }
    }

    /// The current verification target answered with its state.
    pub fn on_state(&mut self, from: Peer, pred: Option<Peer>, succs: Vec<Peer>) -> Step {
        self.hops += 1;
        if self.join_pred.map(|p| p.id) == Some(from.id) {
            self.join_pred = None;
            // Its list either spans the key (copy it or step closer) or stops
            // short of it (route on from there, counted as this hop).
            return self.on_next(from, &succs, &[], true);
        }
        self.verified.insert(from.id);
        if self.verify.last().map(|p| p.0.id) == Some(from.id) {
            self.verify.pop();
        }
        self.settle(from, pred, succs);
        self.next_step()
    }

    /// `from` is alive and at or after the key. A predecessor of it in
    /// [key, from) is a closer answer (a node that joined after the list we
    /// read was made, or one whose reply was lost): check it before settling.
    fn settle(&mut self, from: Peer, pred: Option<Peer>, succs: Vec<Peer>) {
        let closer_pred = pred.filter(|p| {
            p.id != from.id
                && (p.id == self.key || p.id.in_open(self.key, from.id))
                && !self.verified.contains(&p.id)
                && self.strikes(p.id) <= 1
        });
        self.confirmed.push((from, pred, succs));
        self.verify.clear();
        // Each earlier candidate silent only once, and the predecessor the
        // live node names, get one more try, the one nearest the key first
        // (the queue's last entry is asked next).
        let key = self.key;
        let before = |p: &Peer| p.id == key || p.id.in_open(key, from.id);
        let mut retry: Vec<(Id, Peer)> = Vec::new();
        for p in std::mem::take(&mut self.skipped) {
            if before(&p) && self.strikes(p.id) == 1 && !self.verified.contains(&p.id) {
                retry.push((key.distance_to(p.id), p));
            }
        }
        if let Some(p) = closer_pred {
            // Named by a live node, a silent candidate earns one retry.
            retry.push((key.distance_to(p.id), p));
        }
        retry.sort_by_key(|r| std::cmp::Reverse(r.0));
        retry.dedup_by(|a, b| a.0 == b.0);
        self.verify.extend(retry.into_iter().map(|(_, p)| (p, 1)));
    }

    /// The peer answered that it is not in a ring: never an answer or a hop.
    pub fn on_not_member(&mut self, to: Peer) -> Step {
        if self.join_pred.map(|p| p.id) == Some(to.id) {
            self.join_pred = None;
            return Step::Failed(LookupError::NoRoute {
                hops: self.hops,
                timeouts: self.timeouts,
            });
        }
        *self.strikes.entry(to.id).or_insert(0) += 2;
        if self.verify.last().map(|p| p.0.id) == Some(to.id) {
            self.verify.pop();
        }
        self.next_step()
    }

    /// The peer we were waiting for did not answer in time.
    pub fn on_timeout(&mut self, to: Peer) -> Step {
        self.timeouts += 1;
        if self.join_pred.map(|p| p.id) == Some(to.id) {
            // The predecessor may only be slow: ask once more, then give this
            // join attempt up (the node retries later). Copying some other
            // list instead could leave the joiner with nothing but dead entries.
            *self.strikes.entry(to.id).or_insert(0) += 1;
            if self.strikes(to.id) <= 1 {
                return Step::Ask { to, verify: true };
            }
            self.join_pred = None;
            return Step::Failed(LookupError::NoRoute {
                hops: self.hops,
                timeouts: self.timeouts,
            });
        }
        // A verification target out of retries is given up on by next_step;
        // one with retries left is asked again.
        *self.strikes.entry(to.id).or_insert(0) += 1;
        self.next_step()
    }

    fn strikes(&self, id: NodeId) -> u32 {
        self.strikes.get(&id).copied().unwrap_or(0)
    }

    pub(crate) fn next_step(&mut self) -> Step {
        if self.hops > self.hops_max || self.timeouts > self.timeouts_max {
            return Step::Failed(LookupError::TooManySteps {
                hops: self.hops,
                timeouts: self.timeouts,
            });
        }
        while let Some(&(p, allowed)) = self.verify.last() {
            debug_assert!(
                self.verify.len() <= 4 * 64,
                "verify queue is bounded by list lengths"
            );
            if p.id == self.me {
                self.verify.pop();
                if self.exclude_me {
                    continue;
                }
                self.verified.insert(p.id);
                self.settle(p, self.my_pred, Vec::new());
                continue;
            }
            if self.strikes(p.id) > allowed {
                self.verify.pop();
                if allowed == 0 && self.strikes(p.id) == 1 {
                    self.skipped.push(p);
                }
                continue;
            }
            return Step::Ask {
                to: p,
                verify: true,
            };
        }
        if let Some((owner, pred, succs)) = self.confirmed.pop() {
            let owner_state = (owner.id != self.me).then_some((pred, succs));
            return Step::Done { owner, owner_state };
        }
        // Route on: closest preceding candidate not yet tried.
        let strikes = &self.strikes;
        self.candidates
            .retain(|(_, p)| !self.asked.contains(&p.id) && !strikes.contains_key(&p.id));
        let excess = self.candidates.len().saturating_sub(self.candidates_max);
        self.candidates.drain(..excess);
        match self.candidates.pop() {
            Some((_, p)) => Step::Ask {
                to: p,
                verify: false,
            },
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

    /// The lookup's next step: verify candidate `n`.
    fn ask(n: u128) -> Step {
        Step::Ask {
            to: p(n),
            verify: true,
        }
    }

    #[test]
    fn local_list_spanning_key_goes_straight_to_verify() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        let step = l.on_next(p(10), &[p(20), p(30), p(40)], &[], true);
        assert_eq!(step, ask(30));
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
        assert_eq!(step, ask(40));
        // 40 is alive; 30, silent once, is asked once more before 40 counts.
        let step = l.on_state(p(40), Some(p(20)), vec![]);
        assert_eq!(step, ask(30));
        let step = l.on_timeout(p(30));
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(40)));
        assert_eq!(l.timeouts, 2);
    }

    #[test]
    fn a_lost_reply_is_retried_even_when_the_next_node_names_another_pred() {
        // 30 is live but its reply is lost; 35 is dead; 40 still names the
        // dead 35 as its predecessor (no repair has run). Before this rule
        // the lookup answered 40: one lost reply made a wrong answer.
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        l.on_next(p(10), &[p(20), p(30), p(35), p(40)], &[], true);
        assert_eq!(l.on_timeout(p(30)), ask(35));
        assert_eq!(l.on_timeout(p(35)), ask(40));
        // Both silent candidates before 40 get a retry, nearest the key first.
        let step = l.on_state(p(40), Some(p(35)), vec![]);
        assert_eq!(step, ask(30));
        let step = l.on_state(p(30), Some(p(20)), vec![]);
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(30)));
        // Candidates get one retry only: silent twice, they are passed over.
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        l.on_next(p(10), &[p(20), p(30), p(35), p(40)], &[], true);
        l.on_timeout(p(30));
        l.on_timeout(p(35));
        l.on_state(p(40), Some(p(35)), vec![]);
        assert_eq!(l.on_timeout(p(30)), ask(35));
        let step = l.on_timeout(p(35));
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(40)));
        assert_eq!(l.timeouts, 4);
    }

    #[test]
    fn newer_predecessor_is_preferred_and_dead_one_falls_back() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        l.on_next(p(10), &[p(20), p(30)], &[], true);
        // 30 says its predecessor is 27, which lies in [25, 30): ask 27.
        let step = l.on_state(p(30), Some(p(27)), vec![]);
        assert_eq!(step, ask(27));
        // 27 is silent: named by a live node, it gets a second try...
        let step = l.on_timeout(p(27));
        assert_eq!(step, ask(27));
        // ...then 30, already confirmed, is the answer.
        let step = l.on_timeout(p(27));
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(30)));
    }

    #[test]
    fn a_lost_reply_does_not_skip_a_live_answer() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        l.on_next(p(10), &[p(20), p(30), p(40)], &[], true);
        // 30's reply is lost; 40 is asked next and names 30 as its predecessor.
        assert_eq!(l.on_timeout(p(30)), ask(40));
        let step = l.on_state(p(40), Some(p(30)), vec![]);
        assert_eq!(step, ask(30));
        let step = l.on_state(p(30), Some(p(20)), vec![]);
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(30)));
        // Had 30 timed out twice, 40 would have been the answer.
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(10), false, 0, 32, 32);
        l.on_next(p(10), &[p(20), p(30), p(40)], &[], true);
        l.on_timeout(p(30));
        l.on_state(p(40), Some(p(30)), vec![]);
        let step = l.on_timeout(p(30));
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(40)));
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
        // A stale list still naming the joiner's old self: it is left out.
        let step = l.on_next(p(10), &[p(25), p(30)], &[], false);
        assert_eq!(
            step,
            Step::Done {
                owner: p(30),
                owner_state: Some((Some(p(10)), vec![]))
            }
        );
    }

    #[test]
    fn join_copies_the_list_of_the_keys_predecessor() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(25), true, 0, 32, 32);
        l.add_start(p(10));
        l.next_step();
        // 10's list spans the key, but 20 lies between 10 and the key: ask 20.
        let step = l.on_next(p(10), &[p(20), p(30), p(40)], &[], false);
        assert_eq!(step, ask(20));
        // 20 knows 22, a newer node still before the key: ask 22 in turn.
        let step = l.on_state(p(20), Some(p(10)), vec![p(22), p(30), p(40)]);
        assert_eq!(step, ask(22));
        // 22 is the predecessor: its list is copied as is.
        let step = l.on_state(p(22), Some(p(20)), vec![p(28), p(30)]);
        assert_eq!(
            step,
            Step::Done {
                owner: p(28),
                owner_state: Some((Some(p(22)), vec![p(30)]))
            }
        );
    }

    #[test]
    fn join_gives_up_rather_than_copy_a_silent_nodes_list() {
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(25), true, 0, 32, 32);
        l.add_start(p(10));
        l.next_step();
        l.on_next(p(10), &[p(20), p(30), p(40)], &[], false);
        // 20 is silent: asked once more, then this attempt fails.
        assert_eq!(l.on_timeout(p(20)), ask(20));
        assert!(matches!(l.on_timeout(p(20)), Step::Failed(_)));
    }

    #[test]
    fn querier_as_answer_still_checks_its_predecessor() {
        // The list says 30 then us (40); 30's reply is lost; our predecessor is 30.
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(40), false, 0, 32, 32);
        l.set_my_pred(Some(p(30)));
        assert_eq!(l.on_next(p(20), &[p(30), p(40)], &[], false), ask(30));
        assert_eq!(l.on_timeout(p(30)), ask(30));
        let step = l.on_state(p(30), Some(p(20)), vec![]);
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(30)));
    }

    #[test]
    fn entry_node_can_still_be_the_answer() {
        // The joiner enters through 30, which turns out to be its successor.
        let mut l = Lookup::new(Id::from_u128(25), Id::from_u128(25), true, 0, 32, 32);
        l.add_start(p(30));
        assert_eq!(
            l.next_step(),
            Step::Ask {
                to: p(30),
                verify: false
            }
        );
        let step = l.on_next(p(30), &[p(40), p(10)], &[p(20)], false);
        assert_eq!(
            step,
            Step::Ask {
                to: p(20),
                verify: false
            }
        );
        let step = l.on_next(p(20), &[p(30), p(40)], &[], false);
        assert_eq!(
            step,
            Step::Done {
                owner: p(30),
                owner_state: Some((Some(p(20)), vec![p(40)]))
            }
        );
    }

    #[test]
    fn dead_last_entry_routes_on_from_live_ones() {
        // The key falls on the last entry of our list, which is dead: ask the
        // live entry before it, whose own list reaches further.
        let mut l = Lookup::new(Id::from_u128(35), Id::from_u128(10), false, 0, 32, 32);
        l.on_next(p(10), &[p(20), p(30), p(40)], &[], true);
        assert_eq!(
            l.on_timeout(p(40)),
            Step::Ask {
                to: p(30),
                verify: false
            }
        );
        let step = l.on_next(p(30), &[p(40), p(50)], &[], false);
        assert_eq!(step, ask(50));
        // 40 was silent once: it is asked again before 50 counts.
        let step = l.on_state(p(50), Some(p(30)), vec![]);
        assert_eq!(step, ask(40));
        let step = l.on_timeout(p(40));
        assert!(matches!(step, Step::Done { owner, .. } if owner == p(50)));
    }
}
