//! SHA-256 and HMAC-SHA256 for the bulk paths: block ids, frame and chunk
//! MACs, request digests, disk checksums.
//!
//! Every byte of a file is hashed several times on its way to three replicas
//! (its chunk MAC, its block id, a frame MAC per hop, its request digest), so
//! SHA-256 is most of what a client and a node spend their CPU on. These
//! run on `ring`'s assembly (AVX2 or SHA extensions where the CPU has them),
//! about twice the speed of the portable `sha2` code on the machines we
//! measured. The results are the same functions, checked against `sha2` and
//! `hmac` and the RFC 4231 vectors in the tests below; small, rare hashes
//! (handshake transcripts, signatures' digests) stay on `sha2`, which the
//! RSA code needs anyway.

use subtle::ConstantTimeEq;

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Incremental SHA-256.
#[derive(Clone)]
pub struct Sha256(ring::digest::Context);

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    pub fn update(&mut self, bytes: impl AsRef<[u8]>) {
        self.0.update(bytes.as_ref());
    }

    pub fn finalize(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256::new()
    }
}

/// The MAC did not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacError;

/// Incremental HMAC-SHA256.
pub struct HmacSha256(ring::hmac::Context);

impl HmacSha256 {
    /// HMAC takes keys of any length.
    pub fn new(key: &[u8]) -> HmacSha256 {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        HmacSha256(ring::hmac::Context::with_key(&key))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finalize(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.sign().as_ref());
        out
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

    #[test]
    fn sha256_matches_sha2_on_every_length_around_the_block_size() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..data.len() {
            let want: [u8; 32] = sha2::Sha256::digest(&data[..len]).into();
            assert_eq!(sha256(&data[..len]), want, "length {len}");
            let mut h = Sha256::new();
            let (a, b) = data[..len].split_at(len / 3);
            h.update(a);
            h.update(b);
            assert_eq!(h.finalize(), want, "length {len}, in two parts");
        }
    }

    #[test]
    fn hmac_matches_rfc_4231_and_the_hmac_crate() {
        // RFC 4231 test case 2.
        let mut m = HmacSha256::new(b"Jefe");
        m.update(b"what do ya want ");
        m.update(b"for nothing?");
        let want = unhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        assert_eq!(m.finalize().to_vec(), want);
        // Keys longer than the block size are hashed first (test case 6).
        let key = [0xaau8; 131];
        let msg = b"Test Using Larger Than Block-Size Key - Hash Key First";
        let mut m = HmacSha256::new(&key);
        m.update(msg);
        let want = unhex("60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
        assert_eq!(m.finalize().to_vec(), want);
        for len in [0usize, 1, 63, 64, 65, 1000] {
            let data = vec![len as u8; len];
            let mut a = HmacSha256::new(&data);
            a.update(&data);
            let mut b = <hmac::Hmac<sha2::Sha256>>::new_from_slice(&data).unwrap();
            b.update(&data);
            assert_eq!(a.finalize()[..], b.finalize().into_bytes()[..]);
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
