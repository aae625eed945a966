//! The 160-bit identifier ring.
//!
//! Node ids and key positions are SHA-1 digests read as big-endian unsigned
//! integers modulo 2^160. All interval tests are on the circle, so "between"
//! always means "reached first when walking clockwise from the left bound".

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use std::fmt;

/// Number of bits in an identifier (and so the number of finger entries).
pub const ID_BITS: usize = 160;

/// A point on the identifier ring: a node id or a key position.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Id(pub [u8; 20]);

impl Ord for Id {
    // Numeric order of the big-endian value; compared as integers because a
    // byte-wise memcmp call dominated simulator profiles.
    #[inline]
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl PartialOrd for Id {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A node's identifier (SHA-1 of its public key in the real system).
pub type NodeId = Id;

impl Id {
    pub const ZERO: Id = Id([0; 20]);
    pub const MAX: Id = Id([0xff; 20]);

    /// The ring position of arbitrary bytes: SHA-1 of them.
    pub fn hash(bytes: &[u8]) -> Id {
        let digest = Sha1::digest(bytes);
        let mut out = [0u8; 20];
        out.copy_from_slice(&digest);
        Id(out)
    }

    /// Builds an id from a `u128` placed in the low bits (tests, small rings).
    pub fn from_u128(v: u128) -> Id {
        let mut out = [0u8; 20];
        out[4..].copy_from_slice(&v.to_be_bytes());
        Id(out)
    }

    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// The low 128 bits (tests, small rings).
    pub fn low_u128(self) -> u128 {
        self.parts().1
    }

    /// floor(self / d) for a small divisor (splitting key ranges).
    pub fn div_small(self, d: u32) -> Id {
        assert!(d > 0, "division by zero");
        let mut out = [0u8; 20];
        let mut rem: u64 = 0;
        for (i, b) in self.0.iter().enumerate() {
            let cur = (rem << 8) | *b as u64;
            out[i] = (cur / d as u64) as u8;
            rem = cur % d as u64;
        }
        Id(out)
    }

    /// Split into (high 32 bits, low 128 bits) for fast arithmetic.
    #[inline]
    fn parts(self) -> (u32, u128) {
        let hi = u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]);
        let mut lo = [0u8; 16];
        lo.copy_from_slice(&self.0[4..]);
        (hi, u128::from_be_bytes(lo))
    }

    #[inline]
    fn from_parts(hi: u32, lo: u128) -> Id {
        let mut out = [0u8; 20];
        out[..4].copy_from_slice(&hi.to_be_bytes());
        out[4..].copy_from_slice(&lo.to_be_bytes());
        Id(out)
    }

    /// `self + other` modulo 2^160.
    #[inline]
    pub fn wrapping_add(self, other: Id) -> Id {
        let (ah, al) = self.parts();
        let (bh, bl) = other.parts();
        let (lo, carry) = al.overflowing_add(bl);
        let hi = ah.wrapping_add(bh).wrapping_add(carry as u32);
        Id::from_parts(hi, lo)
    }

    /// `self - other` modulo 2^160.
    #[inline]
    pub fn wrapping_sub(self, other: Id) -> Id {
        let (ah, al) = self.parts();
        let (bh, bl) = other.parts();
        let (lo, borrow) = al.overflowing_sub(bl);
        let hi = ah.wrapping_sub(bh).wrapping_sub(borrow as u32);
        Id::from_parts(hi, lo)
    }

    /// 2^i as an id, for `i < 160`.
    pub fn pow2(i: usize) -> Id {
        assert!(i < ID_BITS, "finger index {i} out of range");
        let mut out = [0u8; 20];
        let byte = 19 - i / 8;
        out[byte] = 1 << (i % 8);
        Id(out)
    }

    /// `self + 2^i` modulo 2^160: the target of finger `i`.
    pub fn add_pow2(self, i: usize) -> Id {
        self.wrapping_add(Id::pow2(i))
    }

    /// Clockwise distance from `self` to `to` (0 when equal).
    #[inline]
    pub fn distance_to(self, to: Id) -> Id {
        to.wrapping_sub(self)
    }

    /// `self` lies strictly inside the open arc `(a, b)`. When `a == b` the arc is
    /// the whole ring except `a`.
    #[inline]
    pub fn in_open(self, a: Id, b: Id) -> bool {
        if a == b {
            return self != a;
        }
        let d = a.distance_to(self);
        d != Id::ZERO && d < a.distance_to(b)
    }

    /// `self` lies in the half-open arc `(a, b]`. When `a == b` this is the whole ring.
    #[inline]
    pub fn in_open_closed(self, a: Id, b: Id) -> bool {
        if a == b {
            return true;
        }
        let d = a.distance_to(self);
        d != Id::ZERO && d <= a.distance_to(b)
    }

    /// The top 64 bits, for plotting and cheap ordering-independent summaries.
    pub fn top_u64(self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }

    /// Position on the ring as a fraction of the full circle in [0, 1).
    pub fn as_fraction(self) -> f64 {
        self.top_u64() as f64 / 18_446_744_073_709_551_616.0
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Small ids (tests and scripted scenarios) print as numbers.
        if self.0[..12].iter().all(|b| *b == 0) {
            return write!(
                f,
                "#{}",
                u64::from_be_bytes(self.0[12..].try_into().expect("8"))
            );
        }
        // Eight hex digits identify a node among thousands; the full id is noise.
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Parses the form [`fmt::Display`] prints: 40 hex digits.
impl std::str::FromStr for Id {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Id, Self::Err> {
        let s = s.as_bytes();
        if s.len() != 40 {
            return Err("an id is 40 hex digits");
        }
        let mut out = [0u8; 20];
        for (o, pair) in out.iter_mut().zip(s.chunks(2)) {
            let digit = |c: u8| (c as char).to_digit(16).ok_or("an id is 40 hex digits");
            *o = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(Id(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_refuses_what_is_not_an_id() {
        let ok = "00".repeat(20);
        assert!(ok.parse::<Id>().is_ok());
        for bad in [
            "",
            "0",
            &"0".repeat(39),
            &"0".repeat(41),
            &format!("{}g", "0".repeat(39)),
        ] {
            assert!(bad.parse::<Id>().is_err(), "{bad:?}");
        }
        // Multi-byte characters of the right byte length are not digits.
        assert!(format!("{}é", "0".repeat(38)).parse::<Id>().is_err());
    }

    fn arb_id() -> impl Strategy<Value = Id> {
        prop_oneof![
            any::<[u8; 20]>().prop_map(Id),
            // Small values and values near the wrap point stress carries.
            (0u128..16).prop_map(Id::from_u128),
            (0u128..16).prop_map(|v| Id::MAX.wrapping_sub(Id::from_u128(v))),
        ]
    }

    /// Reference model: 160-bit values as (u32, u128) compared via big integers in u128 pairs
    /// is what we implement, so the model uses byte-wise schoolbook arithmetic instead.
    fn model_add(a: Id, b: Id) -> Id {
        let mut out = [0u8; 20];
        let mut carry = 0u16;
        for i in (0..20).rev() {
            let s = a.0[i] as u16 + b.0[i] as u16 + carry;
            out[i] = s as u8;
            carry = s >> 8;
        }
        Id(out)
    }

    #[test]
    fn pow2_positions() {
        assert_eq!(Id::pow2(0), Id::from_u128(1));
        assert_eq!(Id::pow2(127), Id::from_u128(1 << 127));
        assert_eq!(Id::pow2(159).0[0], 0x80);
        assert_eq!(Id::MAX.wrapping_add(Id::from_u128(1)), Id::ZERO);
    }

    #[test]
    fn arcs_at_the_edges() {
        let a = Id::from_u128(10);
        let b = Id::from_u128(20);
        assert!(Id::from_u128(15).in_open(a, b));
        assert!(!a.in_open(a, b));
        assert!(!b.in_open(a, b));
        assert!(b.in_open_closed(a, b));
        assert!(!a.in_open_closed(a, b));
        // Wrapping arc (20, 10) contains 0 and MAX.
        assert!(Id::ZERO.in_open(b, a));
        assert!(Id::MAX.in_open(b, a));
        // Degenerate arcs: the whole ring (but the point itself when open).
        assert!(b.in_open(a, a));
        assert!(!a.in_open(a, a));
        assert!(a.in_open_closed(a, a));
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(a in arb_id()) {
            prop_assert_eq!(a.to_string().parse::<Id>(), Ok(a));
        }

        #[test]
        fn add_matches_model(a in arb_id(), b in arb_id()) {
            prop_assert_eq!(a.wrapping_add(b), model_add(a, b));
        }

        #[test]
        fn sub_inverts_add(a in arb_id(), b in arb_id()) {
            prop_assert_eq!(a.wrapping_add(b).wrapping_sub(b), a);
            prop_assert_eq!(a.distance_to(b).wrapping_add(a), b);
        }

        #[test]
        fn distances_around_the_ring_sum_to_zero(a in arb_id(), b in arb_id()) {
            // d(a,b) + d(b,a) == 2^160 == 0 (mod 2^160)
            prop_assert_eq!(a.distance_to(b).wrapping_add(b.distance_to(a)), Id::ZERO);
        }

        #[test]
        fn open_arc_partitions_the_ring(a in arb_id(), b in arb_id(), x in arb_id()) {
            prop_assume!(a != b);
            // Exactly one of: x == a, x == b, x in (a,b), x in (b,a).
            let count = [x == a, x == b, x.in_open(a, b), x.in_open(b, a)]
                .iter().filter(|v| **v).count();
            prop_assert_eq!(count, 1);
            prop_assert_eq!(x.in_open_closed(a, b), x.in_open(a, b) || x == b);
        }

        #[test]
        fn order_is_numeric(a in arb_id(), b in arb_id()) {
            prop_assert_eq!(a.cmp(&b), a.0.cmp(&b.0));
        }

        #[test]
        fn finger_target_is_pow2_ahead(a in arb_id(), i in 0usize..160) {
            let t = a.add_pow2(i);
            prop_assert_eq!(a.distance_to(t), Id::pow2(i));
            prop_assert!(t.in_open_closed(a, t));
        }
    }
}
