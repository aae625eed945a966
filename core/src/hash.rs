//! SHA-256 and HMAC-SHA256 for the bulk paths: block ids, frame and chunk
//! MACs, request digests, disk checksums.
//!
//! Every byte of a file is hashed several times on its way to three replicas
//! (its chunk MAC, its block id, a frame MAC per hop, its request digest), so
//! SHA-256 is most of what a client and a node spend their CPU on. On a
//! CPU with the x86 SHA extensions these run on them (through `sha2`'s
//! block function, and for two at once our own loop, `shani`); elsewhere
//! on `ring`'s assembly (AVX2 where the CPU has it), about twice the speed
//! of the portable `sha2` code on the machines we measured. The results
//! are the same functions, checked against `sha2` and `hmac` and the RFC
//! 4231 vectors in the tests below; small, rare hashes (handshake
//! transcripts, signatures' digests) stay on `sha2`, which the RSA code
//! needs anyway.
//!
//! Two hashes can run side by side ([`update_two`]): on the SHA extensions
//! one message leaves the SHA unit idle between dependent rounds, and a
//! second independent message fills the gaps, so the pair costs little
//! more than one. A frame's MAC over its two halves ([`crate::session`]),
//! a chunk's MAC and its block id over the same bytes
//! ([`crate::filecrypt`]), and blocks that arrive together
//! ([`crate::store::Block::hash_ids`]) use that. Where the CPU lacks the
//! extensions the hashes run one after the other on `ring`; the results
//! are the same either way.

use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
mod shani;

/// Whether [`update_two`] really runs two hashes at once here.
pub fn two_at_once() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        shani::available()
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// FIPS 180-4 initial hash value.
const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// A SHA-256 computation kept as its raw state, so its block function can
/// run beside another's. Single blocks go through `sha2`'s
/// `compress256` (SHA extensions where the CPU has them).
#[derive(Clone)]
struct Raw {
    state: [u32; 8],
    buf: [u8; 64],
    buffered: usize,
    /// Bytes absorbed so far.
    len: u64,
}

impl Raw {
    fn new() -> Raw {
        Raw {
            state: H0,
            buf: [0; 64],
            buffered: 0,
            len: 0,
        }
    }

    /// Absorbs whole blocks.
    fn blocks(&mut self, data: &[u8]) {
        debug_assert!(data.len().is_multiple_of(64));
        let n = data.len() / 64;
        // SAFETY: `GenericArray<u8, U64>` is a `[u8; 64]`, and `data`
        // holds `n` of them.
        let blocks =
            unsafe { std::slice::from_raw_parts(data.as_ptr() as *const GenericArray<u8, U64>, n) };
        sha2::compress256(&mut self.state, blocks);
    }

    /// Fills the partial block from `data`, absorbing it if it fills;
    /// returns what is left of `data`, which starts on a block boundary
    /// unless it is empty.
    fn top_up<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.buffered == 0 {
            return data;
        }
        let take = (64 - self.buffered).min(data.len());
        self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
        self.buffered += take;
        self.len += take as u64;
        if self.buffered == 64 {
            let buf = self.buf;
            self.blocks(&buf);
            self.buffered = 0;
        }
        &data[take..]
    }

    /// Absorbs the whole blocks of `data` (which starts on a boundary)
    /// and buffers the rest.
    fn rest(&mut self, data: &[u8]) {
        debug_assert!(self.buffered == 0 || data.is_empty());
        let whole = data.len() / 64 * 64;
        self.blocks(&data[..whole]);
        let tail = &data[whole..];
        self.buf[self.buffered..self.buffered + tail.len()].copy_from_slice(tail);
        self.buffered += tail.len();
        self.len += data.len() as u64;
    }

    fn update(&mut self, data: &[u8]) {
        let data = self.top_up(data);
        self.rest(data);
    }

    fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut block = [0u8; 64];
        block[..self.buffered].copy_from_slice(&self.buf[..self.buffered]);
        block[self.buffered] = 0x80;
        if self.buffered >= 56 {
            self.blocks(&block);
            block = [0u8; 64];
        }
        block[56..].copy_from_slice(&bits.to_be_bytes());
        self.blocks(&block);
        block.zeroize();
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // An HMAC's state after its key block is as good as the key.
        self.state.zeroize();
        self.buf.zeroize();
    }
}

/// Incremental SHA-256.
#[derive(Clone)]
pub struct Sha256(Engine);

#[derive(Clone)]
enum Engine {
    /// Raw state, on a CPU where two run at once.
    Raw(Raw),
    /// `ring`'s assembly (AVX2 where the CPU has it), elsewhere: about
    /// twice the speed of `sha2`'s portable code.
    Ring(ring::digest::Context),
}

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256::with_engine(two_at_once())
    }

    fn with_engine(raw: bool) -> Sha256 {
        Sha256(if raw {
            Engine::Raw(Raw::new())
        } else {
            Engine::Ring(ring::digest::Context::new(&ring::digest::SHA256))
        })
    }

    pub fn update(&mut self, bytes: impl AsRef<[u8]>) {
        match &mut self.0 {
            Engine::Raw(r) => r.update(bytes.as_ref()),
            Engine::Ring(c) => c.update(bytes.as_ref()),
        }
    }

    pub fn finalize(self) -> [u8; 32] {
        match self.0 {
            Engine::Raw(r) => r.finalize(),
            Engine::Ring(c) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(c.finish().as_ref());
                out
            }
        }
    }
}

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256::new()
    }
}

/// A hash computation [`update_two`] can feed: a [`Sha256`] or the inner
/// hash of an [`HmacSha256`].
pub trait Absorb {
    fn sha256(&mut self) -> &mut Sha256;
}

impl Absorb for Sha256 {
    fn sha256(&mut self) -> &mut Sha256 {
        self
    }
}

impl Absorb for HmacSha256 {
    fn sha256(&mut self) -> &mut Sha256 {
        &mut self.inner
    }
}

/// `a.update(da)` and `b.update(db)`, the bulk of both hashed together
/// where the CPU can (see the module doc): as fast as one alone when `da`
/// and `db` are about as long. `a` and `b` may hash the same bytes.
pub fn update_two(a: &mut impl Absorb, da: &[u8], b: &mut impl Absorb, db: &[u8]) {
    let (a, b) = (a.sha256(), b.sha256());
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if let (Engine::Raw(ra), Engine::Raw(rb)) = (&mut a.0, &mut b.0) {
        let (da, db) = (ra.top_up(da), rb.top_up(db));
        // A buffer still partial means its data ran out: nothing is left
        // to pair.
        let both = if ra.buffered == 0 && rb.buffered == 0 {
            da.len().min(db.len()) / 64 * 64
        } else {
            0
        };
        if both > 0 {
            shani::compress_two(&mut ra.state, &da[..both], &mut rb.state, &db[..both]);
            ra.len += both as u64;
            rb.len += both as u64;
        }
        ra.rest(&da[both..]);
        rb.rest(&db[both..]);
        return;
    }
    a.update(da);
    b.update(db);
}

/// The MAC did not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacError;

/// Incremental HMAC-SHA256 (RFC 2104 over [`Sha256`]).
#[derive(Clone)]
pub struct HmacSha256 {
    inner: Sha256,
    outer: Sha256,
}

impl HmacSha256 {
    /// HMAC takes keys of any length.
    pub fn new(key: &[u8]) -> HmacSha256 {
        HmacSha256::with_engine(two_at_once(), key)
    }

    fn with_engine(raw: bool, key: &[u8]) -> HmacSha256 {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            let mut h = Sha256::with_engine(raw);
            h.update(key);
            block[..32].copy_from_slice(&h.finalize());
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let mut pad = block.map(|b| b ^ 0x36);
        let mut inner = Sha256::with_engine(raw);
        inner.update(pad);
        pad = block.map(|b| b ^ 0x5c);
        let mut outer = Sha256::with_engine(raw);
        outer.update(pad);
        pad.zeroize();
        block.zeroize();
        HmacSha256 { inner, outer }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
    }

    pub fn finalize(self) -> [u8; 32] {
        let HmacSha256 { inner, mut outer } = self;
        outer.update(inner.finalize());
        outer.finalize()
    }

    /// Checks `tag` against the MAC in constant time (a tag of the wrong
    /// length fails, also without a early exit on its bytes).
    pub fn verify(self, tag: &[u8]) -> Result<(), MacError> {
        let mac = self.finalize();
        if tag.len() == mac.len() && bool::from(mac.ct_eq(tag)) {
            Ok(())
        } else {
            Err(MacError)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::Mac;
    use sha2::Digest;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Both engines where this CPU runs both (`ring` runs everywhere).
    fn engines() -> Vec<bool> {
        if two_at_once() {
            vec![true, false]
        } else {
            eprintln!("no SHA extensions on this CPU: only the ring engine is tested");
            vec![false]
        }
    }

    #[test]
    fn sha256_matches_sha2_on_every_length_around_the_block_size() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for raw in engines() {
            for len in 0..data.len() {
                let want: [u8; 32] = sha2::Sha256::digest(&data[..len]).into();
                assert_eq!(sha256(&data[..len]), want, "length {len}");
                let mut h = Sha256::with_engine(raw);
                let (a, b) = data[..len].split_at(len / 3);
                h.update(a);
                h.update(b);
                assert_eq!(h.finalize(), want, "length {len}, in two parts, raw {raw}");
                let mut h = Sha256::with_engine(raw);
                for byte in &data[..len] {
                    h.update([*byte]);
                }
                assert_eq!(h.finalize(), want, "length {len}, byte by byte, raw {raw}");
            }
        }
    }

    /// What `update_two` must give: each hash fed on its own by `sha2`.
    fn separately(pa: &[u8], da: &[u8], pb: &[u8], db: &[u8]) -> ([u8; 32], [u8; 32]) {
        let one = |p: &[u8], d: &[u8]| -> [u8; 32] {
            let mut h = sha2::Sha256::new();
            h.update(p);
            h.update(d);
            h.finalize().into()
        };
        (one(pa, da), one(pb, db))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Two hashes fed together, after prefixes that leave their
        /// buffers at any offset, with inputs of any lengths (equal or
        /// not, whole blocks or not, the same bytes or not), give what
        /// each gives alone; and again when more follows.
        #[test]
        fn two_at_once_is_each_alone(
            pa in 0usize..130, pb in 0usize..130,
            la in 0usize..1200, lb in 0usize..1200,
            same in proptest::bool::ANY, then in 0usize..100,
            seed in proptest::num::u8::ANY,
        ) {
            let bytes = |n: usize, s: u8| -> Vec<u8> {
                (0..n).map(|i| (i as u8).wrapping_mul(29).wrapping_add(s)).collect()
            };
            let (prefix_a, prefix_b) = (bytes(pa, seed), bytes(pb, seed ^ 0x55));
            let da = bytes(la, seed.wrapping_add(1));
            let db = if same { da.clone() } else { bytes(lb, seed.wrapping_add(2)) };
            let more = bytes(then, seed.wrapping_add(3));
            for raw in engines() {
                let mut a = Sha256::with_engine(raw);
                let mut b = Sha256::with_engine(raw);
                a.update(&prefix_a);
                b.update(&prefix_b);
                update_two(&mut a, &da, &mut b, &db);
                let (mut a2, mut b2) = (a.clone(), b.clone());
                let want = separately(&prefix_a, &da, &prefix_b, &db);
                proptest::prop_assert_eq!((a.finalize(), b.finalize()), want);
                update_two(&mut a2, &more, &mut b2, &more);
                let want_a: [u8; 32] = sha2::Sha256::new()
                    .chain_update(&prefix_a).chain_update(&da).chain_update(&more).finalize().into();
                let want_b: [u8; 32] = sha2::Sha256::new()
                    .chain_update(&prefix_b).chain_update(&db).chain_update(&more).finalize().into();
                proptest::prop_assert_eq!((a2.finalize(), b2.finalize()), (want_a, want_b));
            }
        }
    }

    #[test]
    fn an_hmac_and_a_hash_fed_together_are_each_alone() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 13) as u8).collect();
        for raw in engines() {
            for (key, len) in [
                (&b"k"[..], 0usize),
                (&[7u8; 64][..], 64),
                (&[9u8; 100][..], 4999),
            ] {
                let mut mac = HmacSha256::with_engine(raw, key);
                let mut h = Sha256::with_engine(raw);
                mac.update(b"context");
                update_two(&mut mac, &data[..len], &mut h, &data[..len]);
                let mut want_mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(key).unwrap();
                want_mac.update(b"context");
                want_mac.update(&data[..len]);
                assert_eq!(mac.finalize()[..], want_mac.finalize().into_bytes()[..]);
                assert_eq!(h.finalize()[..], sha2::Sha256::digest(&data[..len])[..]);
            }
        }
    }

    #[test]
    fn hmac_matches_rfc_4231_and_the_hmac_crate() {
        for raw in engines() {
            // RFC 4231 test case 2.
            let mut m = HmacSha256::with_engine(raw, b"Jefe");
            m.update(b"what do ya want ");
            m.update(b"for nothing?");
            let want = unhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
            assert_eq!(m.finalize().to_vec(), want);
            // Keys longer than the block size are hashed first (test case 6).
            let key = [0xaau8; 131];
            let msg = b"Test Using Larger Than Block-Size Key - Hash Key First";
            let mut m = HmacSha256::with_engine(raw, &key);
            m.update(msg);
            let want = unhex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
            assert_eq!(m.finalize().to_vec(), want);
            for len in [0usize, 1, 63, 64, 65, 1000] {
                let data = vec![len as u8; len];
                let mut a = HmacSha256::with_engine(raw, &data);
                a.update(&data);
                let mut b = <hmac::Hmac<sha2::Sha256>>::new_from_slice(&data).unwrap();
                b.update(&data);
                assert_eq!(a.finalize()[..], b.finalize().into_bytes()[..]);
            }
        }
    }

    #[test]
    fn verify_refuses_any_other_tag() {
        let tag = {
            let mut m = HmacSha256::new(b"k");
            m.update(b"message");
            m.finalize()
        };
        let check = |t: &[u8]| {
            let mut m = HmacSha256::new(b"k");
            m.update(b"message");
            m.verify(t)
        };
        assert_eq!(check(&tag), Ok(()));
        for i in 0..tag.len() {
            let mut bad = tag;
            bad[i] ^= 1;
            assert_eq!(check(&bad), Err(MacError));
        }
        assert_eq!(check(&tag[..31]), Err(MacError));
        assert_eq!(check(&[]), Err(MacError));
    }
}
