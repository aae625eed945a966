//! The requests a node is waiting on, keyed by request id, each with its
//! deadline.
//!
//! A node usually waits on a handful of requests (a stabilize, a finger
//! check, a lookup step), so the table is two short arrays kept inline in the
//! node and searched linearly: no allocation and no pointer to chase in the
//! common case, which matters when a simulation holds tens of thousands of
//! nodes that no cache can keep. Ids and deadlines sit apart from the values,
//! so a search reads 16 bytes per request. Past the inline size the arrays
//! spill to the heap and every operation stays linear in the number waiting.

use crate::wire::ReqId;
use smallvec::SmallVec;

const INLINE: usize = 4;

#[derive(Clone, Debug)]
pub(crate) struct ReqTable<V> {
    /// (request id, deadline), parallel to `vals`.
    keys: SmallVec<[(ReqId, u64); INLINE]>,
    vals: SmallVec<[V; INLINE]>,
}

impl<V> Default for ReqTable<V> {
    fn default() -> Self {
        ReqTable {
            keys: SmallVec::new(),
            vals: SmallVec::new(),
        }
    }
}

impl<V> ReqTable<V> {
    fn index(&self, req: ReqId) -> Option<usize> {
        self.keys.iter().position(|(r, _)| *r == req)
    }

    /// Waits on `req` until `deadline_ms`; an entry already under `req` is
    /// replaced.
    pub fn insert(&mut self, req: ReqId, deadline_ms: u64, v: V) {
        if let Some(i) = self.index(req) {
            self.keys[i].1 = deadline_ms;
            self.vals[i] = v;
            return;
        }
        self.keys.push((req, deadline_ms));
        self.vals.push(v);
    }

    pub fn get(&self, req: ReqId) -> Option<&V> {
        self.index(req).map(|i| &self.vals[i])
    }

    pub fn remove(&mut self, req: ReqId) -> Option<V> {
        let i = self.index(req)?;
        self.keys.swap_remove(i);
        Some(self.vals.swap_remove(i))
    }

    /// The request due first: least (deadline, id), the order timeouts are
    /// handled in.
    pub fn earliest(&self) -> Option<(u64, ReqId)> {
        self.keys.iter().map(|&(r, d)| (d, r)).min()
    }

    /// Removes and returns the request due first if it is due by `now_ms`.
    pub fn pop_expired(&mut self, now_ms: u64) -> Option<V> {
        match self.earliest() {
            Some((d, r)) if d <= now_ms => self.remove(r),
            _ => None,
        }
    }

    #[cfg(test)]
    pub fn deadline(&self, req: ReqId) -> Option<u64> {
        self.index(req).map(|i| self.keys[i].1)
    }

    /// Every request and what it waits for, in no particular order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (ReqId, &V)> {
        self.keys.iter().map(|k| k.0).zip(self.vals.iter())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn clear(&mut self) {
        self.keys.clear();
        self.vals.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u8),
        Remove(u8),
        PopExpired(u8),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (any::<u8>(), any::<u8>()).prop_map(|(r, d)| Op::Insert(r % 24, d)),
            4 => any::<u8>().prop_map(|r| Op::Remove(r % 24)),
            3 => any::<u8>().prop_map(Op::PopExpired),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Behaves exactly like the map of requests plus the ordered set of
        /// (deadline, id) it replaces, inline and spilled alike.
        #[test]
        fn matches_a_map_and_a_deadline_set(ops in proptest::collection::vec(op(), 0..200)) {
            let mut t: ReqTable<u32> = ReqTable::default();
            let mut map: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
            let mut set: BTreeSet<(u64, u64)> = BTreeSet::new();
            for (n, o) in ops.into_iter().enumerate() {
                let n = n as u32;
                match o {
                    Op::Insert(r, d) => {
                        let (r, d) = (r as u64, d as u64);
                        if let Some((old, _)) = map.insert(r, (d, n)) {
                            set.remove(&(old, r));
                        }
                        set.insert((d, r));
                        t.insert(r, d, n);
                    }
                    Op::Remove(r) => {
                        let r = r as u64;
                        let want = map.remove(&r).map(|(d, v)| {
                            set.remove(&(d, r));
                            v
                        });
                        prop_assert_eq!(t.remove(r), want);
                    }
                    Op::PopExpired(now) => {
                        let now = now as u64;
                        let want = match set.first().copied() {
                            Some((d, r)) if d <= now => {
                                set.remove(&(d, r));
                                map.remove(&r).map(|(_, v)| v)
                            }
                            _ => None,
                        };
                        prop_assert_eq!(t.pop_expired(now), want);
                    }
                    Op::Clear => {
                        map.clear();
                        set.clear();
                        t.clear();
                    }
                }
                prop_assert_eq!(t.len(), map.len());
                prop_assert_eq!(t.earliest(), set.first().copied());
                for (r, (_, v)) in &map {
                    prop_assert_eq!(t.get(*r), Some(v));
                }
            }
        }
    }
}
