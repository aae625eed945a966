//! The Merkle tree of RFC 9162 (Certificate Transparency 2.0), §2.1, over
//! SHA-256: what lets one RSA signature cover many messages (see
//! [`crate::record::Signer::sign_batch`]).
//!
//! A leaf is `SHA-256(0x00 || message)`, an inner node
//! `SHA-256(0x01 || left || right)`; the tree over `n > 1` leaves splits at
//! `k`, the largest power of two below `n`. The two prefixes keep a leaf from
//! ever passing for an inner node (no second preimages). An inclusion proof
//! for leaf `m` of `n` is the list of sibling hashes from the leaf up; its
//! length is fixed by `(m, n)`, so a proof checks only if it is exactly
//! that long.
//!
//! The crates that build Merkle trees for Rust either hash leaves and inner
//! nodes alike or bring a blockchain's conventions; the tree is thirty lines
//! of the RFC, tested here against a direct transcription of its
//! definitions.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The hash of a leaf holding `msg`.
pub fn leaf(msg: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(msg);
    h.finalize().into()
}

fn node(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root over `leaves` (at least one).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => panic!("a Merkle tree has at least one leaf"),
        1 => leaves[0],
        n => {
            let k = split(n);
            node(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The inclusion proof of leaf `m` (`m < leaves.len()`), from the leaf up.
pub fn path(leaves: &[Hash], m: usize) -> Vec<Hash> {
    let n = leaves.len();
    assert!(m < n, "leaf {m} of {n}");
    if n == 1 {
        return Vec::new();
    }
    let k = split(n);
    let (mut p, sibling) = if m < k {
        (path(&leaves[..k], m), root(&leaves[k..]))
    } else {
        (path(&leaves[k..], m - k), root(&leaves[..k]))
    };
    p.push(sibling);
    p
}

/// The root and every leaf's inclusion proof ([`path`] of each), hashing
/// each inner node once.
pub fn root_and_paths(leaves: &[Hash]) -> (Hash, Vec<Vec<Hash>>) {
    match leaves.len() {
        0 => panic!("a Merkle tree has at least one leaf"),
        1 => (leaves[0], vec![Vec::new()]),
        n => {
            let k = split(n);
            let (left, mut lpaths) = root_and_paths(&leaves[..k]);
            let (right, rpaths) = root_and_paths(&leaves[k..]);
            for p in &mut lpaths {
                p.push(right);
            }
            lpaths.extend(rpaths.into_iter().map(|mut p| {
                p.push(left);
                p
            }));
            (node(&left, &right), lpaths)
        }
    }
}

/// The root that `proof` leads to from `leaf` at index `m` of a tree of `n`
/// leaves, or `None` if the proof cannot belong to that position (wrong
/// length, `m >= n`). RFC 9162 §2.1.3.2.
pub fn root_from_path(leaf: Hash, m: u64, n: u64, proof: &[Hash]) -> Option<Hash> {
    if m >= n {
        return None;
    }
    let (mut f, mut s) = (m, n - 1);
    let mut r = leaf;
    for p in proof {
        if s == 0 {
            return None;
        }
        if f & 1 == 1 || f == s {
            r = node(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    (s == 0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf(&i.to_le_bytes())).collect()
    }

    #[test]
    fn every_proof_of_every_small_tree_leads_to_its_root_and_nowhere_else() {
        for n in 1..=70 {
            let ls = leaves(n);
            let r = root(&ls);
            for m in 0..n {
                let p = path(&ls, m);
                let (mu, nu) = (m as u64, n as u64);
                assert_eq!(
                    root_from_path(ls[m], mu, nu, &p),
                    Some(r),
                    "leaf {m} of {n}"
                );
                // Another leaf, another index, a longer or a shorter proof:
                // never the same root. (Another size can give the same root
                // from the same proof: the size is signed beside the root.)
                let other = leaf(b"not in the tree");
                assert_ne!(root_from_path(other, mu, nu, &p), Some(r));
                if n > 1 {
                    assert_ne!(root_from_path(ls[m], (mu + 1) % nu, nu, &p), Some(r));
                    let mut longer = p.clone();
                    longer.push(r);
                    assert_eq!(root_from_path(ls[m], mu, nu, &longer), None);
                    assert_ne!(root_from_path(ls[m], mu, nu, &p[..p.len() - 1]), Some(r));
                }
                assert_eq!(root_from_path(ls[m], nu, nu, &p), None);
            }
        }
    }

    #[test]
    fn all_paths_at_once_are_each_path() {
        for n in 1..=40 {
            let ls = leaves(n);
            let (r, ps) = root_and_paths(&ls);
            assert_eq!(r, root(&ls));
            let each: Vec<Vec<Hash>> = (0..n).map(|m| path(&ls, m)).collect();
            assert_eq!(ps, each, "{n} leaves");
        }
    }

    #[test]
    fn the_root_is_the_rfc_definition() {
        // RFC 9162 §2.1.1, written out for four and for three leaves.
        let ls = leaves(4);
        let want = node(&node(&ls[0], &ls[1]), &node(&ls[2], &ls[3]));
        assert_eq!(root(&ls), want);
        let ls = leaves(3);
        assert_eq!(root(&ls), node(&node(&ls[0], &ls[1]), &ls[2]));
        assert_eq!(path(&ls, 2), vec![node(&ls[0], &ls[1])]);
        assert_eq!(path(&ls, 0), vec![ls[1], ls[2]]);
        // A leaf and an inner node over the same bytes differ.
        let mut both = [0u8; 64];
        both[..32].copy_from_slice(&ls[0]);
        both[32..].copy_from_slice(&ls[1]);
        assert_ne!(leaf(&both), node(&ls[0], &ls[1]));
    }
}
