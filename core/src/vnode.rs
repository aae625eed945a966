//! Virtual nodes: several ring positions per physical node, for load balance.
//!
//! With one position per node, the arc a node owns is the gap to its
//! predecessor. For N random ids these gaps are close to exponentially
//! distributed, so the largest arc is about ln N times the mean and a few
//! unlucky nodes hold several times their share of the keys. A physical node
//! that hosts v virtual nodes at v independent random positions owns v random
//! arcs; its share is a sum of v such gaps, which concentrates around the mean
//! (relative spread about 1/sqrt v). Chord SIGCOMM'01 §6.2 (Fig. 9) measures
//! this: with 10^4 nodes and 10^6 keys the 99th percentile of keys per node
//! falls from about 4.8x the mean with one position to about 1.6x with 20.
//!
//! Virtual node 0 is the node's normal id, so a node with one virtual node
//! sits exactly where it always did. The others are derived from the same
//! identity (the public key), so nobody can place them by choice any more
//! than they can choose their normal id.
//!
//! Replication over virtual nodes must skip positions of machines already
//! holding the key: the R positions that follow a key on the ring may belong
//! to fewer than R machines. [`replica_load`] applies that rule to a static
//! ring. Running, a machine runs one [`crate::Node`] per position, all at the
//! machine's one address (the address names the machine, the id the
//! position); the node's replica sets, anti-entropy partners and hand-off
//! targets keep one position per address (see `distinct_hosts` in the
//! replica module).

use crate::id::Id;
use sha1::{Digest, Sha1};

/// Domain separator between an identity and a virtual node index.
const VNODE_TAG: &[u8] = b"/vnode/";

/// Ring position of virtual node `index` of the physical node whose identity
/// (public key) is `identity`.
///
/// Index 0 is [`Id::hash`] of the identity, the node's ordinary id. Index
/// `i > 0` is SHA-1(identity || `"/vnode/"` || `i` as a big-endian `u32`):
/// independent, uniformly spread positions that anyone can recompute from the
/// identity and that the node cannot choose.
pub fn vnode_id(identity: &[u8], index: u32) -> Id {
    if index == 0 {
        return Id::hash(identity);
    }
    let mut h = Sha1::new();
    h.update(identity);
    h.update(VNODE_TAG);
    h.update(index.to_be_bytes());
    let mut out = [0u8; 20];
    out.copy_from_slice(&h.finalize());
    Id(out)
}

/// The first `count` virtual node ids of `identity` (index 0 first).
pub fn vnode_ids(identity: &[u8], count: u32) -> Vec<Id> {
    (0..count).map(|i| vnode_id(identity, i)).collect()
}

/// Replica set of `key` on a ring of virtual nodes sorted by id: the key's
/// successor and the following positions clockwise, skipping positions whose
/// physical node is already chosen, until `want` physical nodes are chosen.
/// `want` must not exceed the number of distinct physical nodes on the ring.
///
/// `tops[i]` is `ring[i].0.top_u64()`: searching the packed 64-bit prefixes
/// first keeps the binary search in cache on rings of 10^5 positions.
fn place(ring: &[(Id, u32)], tops: &[u64], key: Id, want: usize, out: &mut Vec<u32>) {
    out.clear();
    let n = ring.len();
    // Successor: the first position >= key, i.e. key in (pred, succ]. Every
    // position before the prefix search's answer is < key; among equal
    // prefixes the full ids decide.
    let kt = key.top_u64();
    let mut i = tops.partition_point(|t| *t < kt);
    while i < n && ring[i].0 < key {
        i += 1;
    }
    while out.len() < want {
        if i == n {
            i = 0;
        }
        let p = ring[i].1;
        if !out.contains(&p) {
            out.push(p);
        }
        i += 1;
    }
}

/// Keys held per physical node when each key is stored on `replicas`
/// distinct physical nodes of a ring of virtual nodes.
///
/// `vnodes` holds `(virtual node id, physical node index)` pairs, in any
/// order; indices must be below `physical`, the length of the result. A key's
/// replica set is its successor virtual node and the following ones
/// clockwise, skipping those whose physical node already holds the key, until
/// `replicas` distinct physical nodes hold it (fewer if the ring has fewer
/// physical nodes). With one virtual node per physical node and `replicas ==
/// 1` this is plain successor ownership.
///
/// Sorts the ring once and binary-searches it per key: O((V + K) log V) for V
/// virtual nodes and K keys, plus the short clockwise walks.
pub fn replica_load(
    vnodes: &[(Id, u32)],
    keys: impl Iterator<Item = Id>,
    replicas: usize,
    physical: usize,
) -> Vec<u64> {
    let mut load = vec![0u64; physical];
    let mut ring = vnodes.to_vec();
    ring.sort_unstable();
    let mut present = vec![false; physical];
    for &(_, p) in &ring {
        assert!(
            (p as usize) < physical,
            "physical node index {p} out of range (physical = {physical})"
        );
        present[p as usize] = true;
    }
    let want = replicas.min(present.iter().filter(|x| **x).count());
    if want == 0 {
        return load;
    }
    let tops: Vec<u64> = ring.iter().map(|(id, _)| id.top_u64()).collect();
    let mut set = Vec::with_capacity(want);
    for key in keys {
        place(&ring, &tops, key, want, &mut set);
        for &p in &set {
            load[p as usize] += 1;
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};

    fn id(v: u128) -> Id {
        Id::from_u128(v)
    }

    fn tops(ring: &[(Id, u32)]) -> Vec<u64> {
        ring.iter().map(|(id, _)| id.top_u64()).collect()
    }

    fn random_id(rng: &mut ChaCha8Rng) -> Id {
        let mut b = [0u8; 20];
        rng.fill_bytes(&mut b);
        Id(b)
    }

    #[test]
    fn index_zero_is_the_normal_id() {
        let key = b"some public key";
        assert_eq!(vnode_id(key, 0), Id::hash(key));
        let mut bytes = key.to_vec();
        bytes.extend_from_slice(b"/vnode/");
        bytes.extend_from_slice(&[0, 0, 0, 7]);
        assert_eq!(vnode_id(key, 7), Id::hash(&bytes));
        let ids = vnode_ids(key, 16);
        assert_eq!(ids.len(), 16);
        assert_eq!(ids[0], Id::hash(key));
        assert_eq!(ids[7], vnode_id(key, 7));
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 16, "positions are distinct");
        assert_ne!(vnode_id(b"another key", 1), vnode_id(key, 1));
        assert!(vnode_ids(key, 0).is_empty());
    }

    #[test]
    fn small_ring_exact() {
        // Positions 10 (p0), 20 (p1), 30 (p0), 40 (p2); given out of order.
        let vnodes = [(id(30), 0), (id(10), 0), (id(40), 2), (id(20), 1)];
        // Successor of each key: 5->10 p0, 10->10 p0, 15->20 p1, 25->30 p0,
        // 35->40 p2, 45->10 p0 (wraps), 0->10 p0.
        let keys = [5, 10, 15, 25, 35, 45, 0].map(id);
        let load = |r| replica_load(&vnodes, keys.iter().copied(), r, 3);
        assert_eq!(load(1), vec![5, 1, 1]);
        // R = 2: 5,10,45,0 -> {p0,p1}; 15 -> {p1,p0}; 25 -> {p0,p2};
        // 35 -> {p2,p0} (wraps to 10).
        assert_eq!(load(2), vec![7, 5, 2]);
        // R = 3 and beyond: every key on all three machines.
        assert_eq!(load(3), vec![7, 7, 7]);
        assert_eq!(load(5), vec![7, 7, 7]);
        assert_eq!(load(0), vec![0, 0, 0]);
    }

    #[test]
    fn skips_positions_of_chosen_machines() {
        // 10 and 20 both belong to p0: a key at 5 must go to p0 and then p1
        // at 30, not twice to p0.
        let ring = [(id(10), 0), (id(20), 0), (id(30), 1), (id(40), 2)];
        let t = tops(&ring);
        let mut out = Vec::new();
        place(&ring, &t, id(5), 2, &mut out);
        assert_eq!(out, vec![0, 1]);
        place(&ring, &t, id(15), 3, &mut out);
        assert_eq!(out, vec![0, 1, 2]);
        // Wrapping past the top: 45 -> 10 p0, 20 p0 skipped, 30 p1.
        place(&ring, &t, id(45), 2, &mut out);
        assert_eq!(out, vec![0, 1]);
        // Small ids share their 64-bit prefix (zero): the full ids decide.
        // Keys at the ends of the id space, ring position at MAX.
        let ring = [(id(10), 0), (Id::MAX, 1)];
        let t = tops(&ring);
        place(&ring, &t, Id::MAX, 1, &mut out);
        assert_eq!(out, vec![1]);
        place(&ring, &t, Id::ZERO, 2, &mut out);
        assert_eq!(out, vec![0, 1]);
        let vnodes = [(id(10), 0), (id(20), 0), (id(30), 1)];
        assert_eq!(
            replica_load(&vnodes, [5, 15, 25, 35].map(id).into_iter(), 2, 2),
            vec![4, 4]
        );
    }

    #[test]
    fn replicas_never_share_a_machine() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let physical = 12;
        let mut vnodes = Vec::new();
        for p in 0..physical {
            let mut ident = [0u8; 32];
            rng.fill_bytes(&mut ident);
            for v in vnode_ids(&ident, 8) {
                vnodes.push((v, p as u32));
            }
        }
        let mut ring = vnodes.clone();
        ring.sort_unstable();
        let t = tops(&ring);
        let keys: Vec<Id> = (0..2000).map(|_| random_id(&mut rng)).collect();
        let mut out = Vec::new();
        for &k in &keys {
            place(&ring, &t, k, 5, &mut out);
            let mut distinct = out.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 5, "key {k:?}: {out:?}");
            // The first replica is the key's successor position.
            let succ = ring.iter().find(|(v, _)| *v >= k).unwrap_or(&ring[0]);
            assert_eq!(out[0], succ.1);
        }
        let load = replica_load(&vnodes, keys.iter().copied(), 5, physical);
        assert_eq!(load.iter().sum::<u64>(), 5 * keys.len() as u64);
        assert!(load.iter().all(|l| *l <= keys.len() as u64));
        // Asking for more replicas than machines puts every key everywhere.
        let all = replica_load(&vnodes, keys.iter().copied(), 50, physical);
        assert!(all.iter().all(|l| *l == keys.len() as u64));
    }

    #[test]
    fn one_vnode_one_replica_is_successor_ownership() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let nodes: Vec<Id> = (0..50)
            .map(|_| {
                let mut ident = [0u8; 32];
                rng.fill_bytes(&mut ident);
                vnode_ids(&ident, 1)[0]
            })
            .collect();
        let vnodes: Vec<(Id, u32)> = nodes
            .iter()
            .enumerate()
            .map(|(i, v)| (*v, i as u32))
            .collect();
        let mut keys: Vec<Id> = (0..5000).map(|_| random_id(&mut rng)).collect();
        // Keys exactly on node ids belong to that node.
        keys.extend_from_slice(&nodes[..5]);
        let mut sorted = nodes.clone();
        sorted.sort();
        let mut expect = vec![0u64; nodes.len()];
        for &k in &keys {
            // Brute force: the node n with k in (pred(n), n].
            let owners: Vec<usize> = (0..sorted.len())
                .filter(|&j| {
                    let pred = sorted[(j + sorted.len() - 1) % sorted.len()];
                    k.in_open_closed(pred, sorted[j])
                })
                .collect();
            assert_eq!(owners.len(), 1);
            let owner = nodes.iter().position(|n| *n == sorted[owners[0]]).unwrap();
            expect[owner] += 1;
        }
        assert_eq!(
            replica_load(&vnodes, keys.iter().copied(), 1, nodes.len()),
            expect
        );
    }

    #[test]
    fn empty_ring_holds_nothing() {
        assert_eq!(replica_load(&[], [id(1)].into_iter(), 3, 2), vec![0, 0]);
    }
}
