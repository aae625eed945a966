//! Global checkers over a snapshot of every node (Zave's invariants and the
//! Ideal state). Definitions follow Zave's Alloy model of corrected Chord:
//!
//! - a *member* is a live node that has joined; dead entries may remain in lists;
//! - `bestSucc(m)` is the first member in `m`'s successor list;
//! - a *ring member* returns to itself by following bestSucc; the others are
//!   *appendages*;
//! - `p` is *skipped* by `m` if `p` lies strictly between two adjacent entries of
//!   `[m] + succs(m)` (dead entries included); a *principal* is a member nobody
//!   skips.

use peerstore_core::{Id, Peer, ID_BITS};
use rustc_hash::FxHashMap;
use std::fmt;

/// One node as the checkers see it.
#[derive(Clone, Debug)]
pub struct View<'a> {
    pub id: Id,
    pub succs: &'a [Peer],
    pub pred: Option<Peer>,
    pub fingers: &'a [Option<Peer>],
}

/// A broken safety invariant, described for a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    NoBestSucc {
        node: Id,
    },
    UnorderedSuccessorList {
        node: Id,
    },
    Duplicates {
        node: Id,
    },
    NoRing,
    SeveralRings {
        rings: usize,
    },
    UnorderedRing {
        from: Id,
        to: Id,
        skipped: Id,
    },
    DisconnectedAppendage {
        node: Id,
    },
    TooFewPrincipals {
        principals: usize,
        needed: usize,
        /// One skipped member and a member whose list skips it.
        example: Option<(Id, Id)>,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NoBestSucc { node } => {
                write!(f, "member {node:?} has no live successor (every member needs a bestSucc)")
            }
            Violation::UnorderedSuccessorList { node } => {
                write!(f, "successor list of {node:?} is out of ring order (OrderedSuccessorLists)")
            }
            Violation::Duplicates { node } => {
                write!(f, "successor list of {node:?} repeats an entry or names itself (NoDuplicates)")
            }
            Violation::NoRing => write!(f, "no member lies on a bestSucc cycle (AtLeastOneRing)"),
            Violation::SeveralRings { rings } => {
                write!(f, "{rings} separate bestSucc cycles (AtMostOneRing)")
            }
            Violation::UnorderedRing { from, to, skipped } => write!(
                f,
                "ring member {from:?} points to {to:?} but ring member {skipped:?} lies between (OrderedRing)"
            ),
            Violation::DisconnectedAppendage { node } => {
                write!(f, "appendage {node:?} cannot reach the ring (ConnectedAppendages)")
            }
            Violation::TooFewPrincipals {
                principals,
                needed,
                example,
            } => {
                write!(f, "only {principals} principal members, need at least r+1 = {needed}")?;
                if let Some((m, by)) = example {
                    write!(f, " (e.g. {m:?} is skipped by {by:?})")?;
                }
                Ok(())
            }
        }
    }
}

/// Member ids in ring order, for successor queries.
pub struct Members {
    sorted: Vec<Id>,
}

impl Members {
    pub fn new(mut ids: Vec<Id>) -> Members {
        ids.sort_unstable();
        ids.dedup();
        Members { sorted: ids }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    pub fn contains(&self, id: Id) -> bool {
        self.sorted.binary_search(&id).is_ok()
    }

    fn index_of_successor(&self, key: Id) -> usize {
        match self.sorted.binary_search(&key) {
            Ok(i) => i,
            Err(i) if i == self.sorted.len() => 0,
            Err(i) => i,
        }
    }

    /// The first member at or after `key`, clockwise.
    pub fn successor(&self, key: Id) -> Option<Id> {
        (!self.sorted.is_empty()).then(|| self.sorted[self.index_of_successor(key)])
    }

    /// The `k`-th member strictly after member `id` (k = 1 is its successor).
    pub fn nth_after(&self, id: Id, k: usize) -> Id {
        let i = self.sorted.binary_search(&id).expect("a member");
        self.sorted[(i + k) % self.sorted.len()]
    }

    /// Members strictly inside the arc (a, b), as index ranges in `sorted`.
    fn strictly_between(&self, a: Id, b: Id, mut visit: impl FnMut(usize)) {
        let n = self.sorted.len();
        if n == 0 || a == b {
            return;
        }
        let start = match self.sorted.binary_search(&a) {
            Ok(i) => i + 1,
            Err(i) => i,
        };
        let mut i = start % n;
        for _ in 0..n {
            let x = self.sorted[i];
            if !x.in_open(a, b) {
                break;
            }
            visit(i);
            i = (i + 1) % n;
        }
    }
}

fn best_succ(v: &View, members: &Members) -> Option<Id> {
    v.succs
        .iter()
        .map(|p| p.id)
        .find(|id| members.contains(*id))
}

/// Checks every safety invariant; `r` is the successor-list length.
/// Returns every violation found (empty when safe).
pub fn check_safety(views: &[View], r: usize) -> Vec<Violation> {
    let members = Members::new(views.iter().map(|v| v.id).collect());
    let mut out = Vec::new();
    let index: FxHashMap<Id, usize> = views.iter().enumerate().map(|(i, v)| (v.id, i)).collect();

    // Local properties and bestSucc.
    let mut best: Vec<Option<usize>> = Vec::with_capacity(views.len());
    for v in views {
        let mut prev = Id::ZERO;
        for (k, p) in v.succs.iter().enumerate() {
            let d = v.id.distance_to(p.id);
            // While distances rise strictly, an entry cannot repeat an earlier
            // one: only a non-rising entry needs the scan for a duplicate.
            let rising = k == 0 || d > prev;
            if d == Id::ZERO || (!rising && v.succs[..k].iter().any(|q| q.id == p.id)) {
                out.push(Violation::Duplicates { node: v.id });
                break;
            }
            if !rising {
                out.push(Violation::UnorderedSuccessorList { node: v.id });
                break;
            }
            prev = d;
        }
        let b = best_succ(v, &members);
        if b.is_none() && views.len() > 1 {
            out.push(Violation::NoBestSucc { node: v.id });
        }
        best.push(b.and_then(|id| index.get(&id).copied()));
    }

    // Rings: cycles of the bestSucc functional graph.
    // state: 0 unvisited, 1 on current path, 2 done; ring_of marks cycle members.
    let n = views.len();
    let mut state = vec![0u8; n];
    let mut on_ring = vec![false; n];
    let mut reaches_ring = vec![false; n];
    let mut cycles: Vec<Vec<usize>> = Vec::new();
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        let mut path = Vec::new();
        let mut cur = Some(start);
        while let Some(c) = cur {
            if state[c] == 1 {
                // Found a new cycle: the suffix of the path from c.
                let pos = path.iter().position(|&x| x == c).expect("on path");
                let cyc: Vec<usize> = path[pos..].to_vec();
                for &x in &cyc {
                    on_ring[x] = true;
                }
                cycles.push(cyc);
                break;
            }
            if state[c] == 2 {
                break;
            }
            state[c] = 1;
            path.push(c);
            cur = best[c];
        }
        // Everything on this path reaches a ring iff its end does.
        let end_reaches = match cur {
            Some(c) => on_ring[c] || reaches_ring[c],
            None => false,
        };
        for &x in &path {
            state[x] = 2;
            reaches_ring[x] = on_ring[x] || end_reaches;
        }
    }
    if n > 1 {
        match cycles.len() {
            0 => out.push(Violation::NoRing),
            1 => {}
            k => out.push(Violation::SeveralRings { rings: k }),
        }
    }
    // OrderedRing: a cycle that goes round the identifier space exactly once.
    for cyc in &cycles {
        if cyc.len() < 2 {
            continue;
        }
        let wraps = cyc
            .iter()
            .filter(|&&i| views[best[i].expect("on cycle")].id <= views[i].id)
            .count();
        if wraps != 1 {
            // Name one offending edge: a ring member strictly inside an edge.
            let ring_ids = Members::new(cyc.iter().map(|&i| views[i].id).collect());
            for &i in cyc {
                let to = views[best[i].expect("on cycle")].id;
                let mut skipped = None;
                ring_ids.strictly_between(views[i].id, to, |k| {
                    skipped.get_or_insert(ring_ids.sorted[k]);
                });
                if let Some(s) = skipped {
                    out.push(Violation::UnorderedRing {
                        from: views[i].id,
                        to,
                        skipped: s,
                    });
                    break;
                }
            }
        }
    }
    for (i, v) in views.iter().enumerate() {
        if !reaches_ring[i] && best[i].is_some() {
            out.push(Violation::DisconnectedAppendage { node: v.id });
        }
    }

    let skips = skips_among(views, &members);
    let principals = skips.iter().filter(|(_, by)| by.is_none()).count();
    if principals < r + 1 && members.len() > r {
        let example = skips.iter().find_map(|(id, by)| by.map(|b| (*id, b)));
        out.push(Violation::TooFewPrincipals {
            principals,
            needed: r + 1,
            example,
        });
    }
    out
}

/// The principal members (members no member's extended list skips).
pub fn principals(views: &[View]) -> Vec<Id> {
    skips(views)
        .into_iter()
        .filter(|(_, by)| by.is_none())
        .map(|(id, _)| id)
        .collect()
}

/// Every member with one member that skips it, if any.
fn skips(views: &[View]) -> Vec<(Id, Option<Id>)> {
    skips_among(views, &Members::new(views.iter().map(|v| v.id).collect()))
}

/// [`skips`] with the members (the views' ids) already sorted.
fn skips_among(views: &[View], members: &Members) -> Vec<(Id, Option<Id>)> {
    let n = members.len();
    let mut skipped: Vec<Option<Id>> = vec![None; n];
    for v in views {
        // Walk the list along the sorted members: for a correct list each
        // entry is the very next member, so no search is needed.
        let mut a = v.id;
        let mut next = members
            .sorted
            .binary_search(&v.id)
            .map(|i| (i + 1) % n)
            .ok();
        for p in v.succs {
            let start = match next {
                Some(i) => i,
                None => match members.sorted.binary_search(&a) {
                    Ok(i) => (i + 1) % n,
                    Err(i) => i % n,
                },
            };
            let mut i = start;
            for _ in 0..n {
                let x = members.sorted[i];
                if !x.in_open(a, p.id) {
                    break;
                }
                skipped[i].get_or_insert(v.id);
                i = (i + 1) % n;
            }
            next = (members.sorted[i] == p.id).then_some((i + 1) % n);
            a = p.id;
        }
    }
    members.sorted.iter().copied().zip(skipped).collect()
}

/// How far from Ideal the ring is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct IdealReport {
    pub members: usize,
    pub succ_wrong: usize,
    pub list_wrong: usize,
    pub pred_wrong: usize,
    pub fingers_wrong: usize,
}

impl IdealReport {
    pub fn is_ideal(&self) -> bool {
        self.succ_wrong == 0
            && self.list_wrong == 0
            && self.pred_wrong == 0
            && self.fingers_wrong == 0
    }
    /// Fraction of members whose first successor and predecessor are right.
    pub fn pointer_accuracy(&self) -> f64 {
        if self.members == 0 {
            return 1.0;
        }
        let bad = self.succ_wrong.max(self.pred_wrong);
        1.0 - bad as f64 / self.members as f64
    }
}

/// Compares every member with the ideal ring: pred/succ agree, lists hold the
/// next r members exactly, fingers are the true successors of their targets.
/// `with_fingers` off skips the (costlier) finger check.
pub fn check_ideal(views: &[View], r: usize, with_fingers: bool) -> IdealReport {
    let members = Members::new(views.iter().map(|v| v.id).collect());
    let n = members.len();
    let mut rep = IdealReport {
        members: n,
        ..Default::default()
    };
    let want_len = r.min(n.saturating_sub(1));
    for v in views {
        // Views are members, so their own position is found once.
        let at = members
            .sorted
            .binary_search(&v.id)
            .expect("a view is a member");
        let nth = |k: usize| members.sorted[(at + k) % n];
        let succ0 = v.succs.first().map(|p| p.id);
        let true_succ = (n > 1).then(|| nth(1));
        if succ0 != true_succ {
            rep.succ_wrong += 1;
        }
        let list_ok = v.succs.len() == want_len
            && v.succs.iter().enumerate().all(|(k, p)| p.id == nth(k + 1));
        if !list_ok {
            rep.list_wrong += 1;
        }
        let true_pred = (n > 1).then(|| nth(n - 1));
        if v.pred.map(|p| p.id) != true_pred {
            rep.pred_wrong += 1;
        }
        if with_fingers {
            let bad = (0..ID_BITS).any(|i| {
                let want = members.successor(v.id.add_pow2(i)).filter(|w| *w != v.id);
                v.fingers[i].map(|p| p.id) != want
            });
            if bad {
                rep.fingers_wrong += 1;
            }
        }
    }
    rep
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerstore_core::Addr;

    fn p(v: u128) -> Peer {
        Peer {
            id: Id::from_u128(v),
            addr: Addr::Slot(v as u32),
        }
    }

    struct Owned {
        id: u128,
        succs: Vec<Peer>,
        pred: Option<Peer>,
        fingers: Vec<Option<Peer>>,
    }

    fn views(o: &[Owned]) -> Vec<View<'_>> {
        o.iter()
            .map(|x| View {
                id: Id::from_u128(x.id),
                succs: &x.succs,
                pred: x.pred,
                fingers: &x.fingers,
            })
            .collect()
    }

    fn ideal(ids: &[u128], r: usize) -> Vec<Owned> {
        let n = ids.len();
        (0..n)
            .map(|i| {
                let members = Members::new(ids.iter().map(|v| Id::from_u128(*v)).collect());
                let me = Id::from_u128(ids[i]);
                let fingers = (0..ID_BITS)
                    .map(|k| {
                        members
                            .successor(me.add_pow2(k))
                            .filter(|w| *w != me)
                            .map(|id| {
                                let v = ids.iter().find(|v| Id::from_u128(**v) == id).unwrap();
                                p(*v)
                            })
                    })
                    .collect();
                Owned {
                    id: ids[i],
                    succs: (1..=r).map(|k| p(ids[(i + k) % n])).collect(),
                    pred: Some(p(ids[(i + n - 1) % n])),
                    fingers,
                }
            })
            .collect()
    }

    #[test]
    fn ideal_ring_is_safe_and_ideal() {
        let o = ideal(&[10, 20, 30, 40, 50], 3);
        assert_eq!(check_safety(&views(&o), 3), vec![]);
        assert!(check_ideal(&views(&o), 3, true).is_ideal());
    }

    #[test]
    fn two_rings_are_caught() {
        let mut o = ideal(&[10, 20, 30, 40, 50, 60], 2);
        // 10 -> 30 -> 50 -> 10 and 20 -> 40 -> 60 -> 20.
        for x in o.iter_mut() {
            let a = (x.id + 20 - 10) % 60 + 10;
            let b = (x.id + 40 - 10) % 60 + 10;
            x.succs = vec![p(a), p(b)];
        }
        let v = check_safety(&views(&o), 2);
        assert!(v.contains(&Violation::SeveralRings { rings: 2 }), "{v:?}");
    }

    #[test]
    fn unordered_ring_and_lists_are_caught() {
        let mut o = ideal(&[10, 20, 30, 40], 2);
        o[0].succs = vec![p(30), p(20)]; // 10 -> 30 skips 20 and is out of order
        let v = check_safety(&views(&o), 2);
        assert!(
            v.iter()
                .any(|x| matches!(x, Violation::UnorderedSuccessorList { .. })),
            "{v:?}"
        );
        // A ring that laps twice: 10 -> 30 -> 10? Use 4 nodes each skipping one.
        let mut o = ideal(&[10, 20, 30, 40, 50], 1);
        for x in o.iter_mut() {
            let next = (x.id + 20 - 10) % 50 + 10;
            x.succs = vec![p(next)];
        }
        let v = check_safety(&views(&o), 1);
        assert!(
            v.iter()
                .any(|x| matches!(x, Violation::UnorderedRing { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn member_without_live_successor_and_principals() {
        let mut o = ideal(&[10, 20, 30, 40], 2);
        o[0].succs = vec![p(25)]; // 25 is not a member
        let v = check_safety(&views(&o), 2);
        assert!(
            v.contains(&Violation::NoBestSucc {
                node: Id::from_u128(10)
            }),
            "{v:?}"
        );
        // 10 skips 20 and 30 -> only 10 and 40 are principals; r=2 needs 3.
        let mut o = ideal(&[10, 20, 30, 40], 2);
        o[0].succs = vec![p(40)];
        let v = check_safety(&views(&o), 2);
        assert!(
            v.iter()
                .any(|x| matches!(x, Violation::TooFewPrincipals { .. })),
            "{v:?}"
        );
    }

    #[test]
    fn ideal_detects_wrong_pointers() {
        let mut o = ideal(&[10, 20, 30, 40, 50], 3);
        o[2].pred = Some(p(10));
        o[3].fingers[0] = None;
        let rep = check_ideal(&views(&o), 3, true);
        assert_eq!(
            (rep.pred_wrong, rep.fingers_wrong, rep.succ_wrong),
            (1, 1, 0)
        );
        assert!(!rep.is_ideal());
    }
}
