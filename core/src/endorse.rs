//! Web-of-trust endorsements for nodes.
//!
//! A node joins by registering with a node that is already trusted; that node
//! signs an [`Endorsement`] of the newcomer: the SHA-256 of its public key
//! (SPKI DER), its ring id, its address and an expiry. Other nodes accept a
//! peer when its endorsement chain leads to a key in their [`TrustStore`]:
//! the operator's roots, or keys the store has itself learned are endorsed.
//!
//! # Chains are leaf first
//!
//! `chain[0]` endorses the subject; `chain[k + 1]` endorses `chain[k]`'s
//! endorser; the walk stops at the first endorser the store trusts, and links
//! after it are ignored. Each link must be unexpired, signed by its endorser,
//! and name exactly the key it vouches for: both the SHA-256 of that key's DER
//! and its id ([`Id::hash`] of the DER). Chains longer than
//! [`MAX_CHAIN_LEN`] are refused before any signature is checked, which bounds
//! the work a peer can cause to eight RSA verifications.
//!
//! # What an endorsement does not say
//!
//! The address is signed so a caller can compare it with where it connected,
//! but this module does not: addresses change with NAT and restarts, and the
//! caller knows which address it dialled. Revocation is by expiry only; keep
//! expiries short (days) and re-endorse.
//!
//! # Encoding
//!
//! [`encode_chain`] / [`decode_chain`] use postcard: a varint count, then each
//! endorsement. Decoding checks the count before allocating, refuses
//! oversized fields and trailing bytes, and accepts only the canonical
//! encoding. An encoded chain is what a node puts in the secure session's
//! credential (see [`crate::session`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::Id;
use crate::record::{self, Signer, MAX_KEY_BITS, MAX_KEY_DER_BYTES};
use crate::session::wire_bytes;

/// Domain tag of the signed message: a signature for anything else never
/// verifies as an endorsement.
pub const TAG_ENDORSE: &[u8] = b"peerstore/endorse/v1";
/// Most links a chain may have.
pub const MAX_CHAIN_LEN: usize = 8;
/// Longest endorsed address, in bytes.
pub const MAX_ADDR_BYTES: usize = 256;
/// Longest signature (a [`MAX_KEY_BITS`] key).
const MAX_SIG_BYTES: usize = MAX_KEY_BITS / 8;
/// Upper bound on one encoded endorsement (fields plus length prefixes).
pub const MAX_ENDORSEMENT_BYTES: usize =
    MAX_KEY_DER_BYTES + 32 + 20 + MAX_ADDR_BYTES + MAX_SIG_BYTES + 32;
/// Largest input [`decode_chain`] looks at.
pub const MAX_CHAIN_BYTES: usize = 1 + MAX_CHAIN_LEN * MAX_ENDORSEMENT_BYTES;
/// Default bound on keys a [`TrustStore`] learns (roots are not counted).
pub const LEARNED_MAX_DEFAULT: usize = 4096;

/// Why a chain or an endorsement was refused. `link` is the index in the
/// chain (0 = the endorsement of the subject itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The chain ends (or is empty) without reaching a trusted key.
    #[error("no endorsement leads to a trusted key; register with a trusted node first")]
    Untrusted,
    /// A link's expiry has passed.
    #[error("endorsement {link} of the chain has expired; ask its endorser to renew it")]
    Expired { link: usize },
    /// A link's signature does not verify under its endorser's key.
    #[error("endorsement {link} of the chain has a signature that does not verify")]
    BadSignature { link: usize },
    /// A link vouches for a different key or id than the one it should.
    #[error("endorsement {link} of the chain is for a different key or id than expected")]
    WrongSubject { link: usize },
    /// More than [`MAX_CHAIN_LEN`] links.
    #[error("endorsement chain is longer than 8 links")]
    TooLong,
    /// A key is malformed, or outside the size policy.
    #[error("malformed or too small public key")]
    BadKey,
    /// The bytes are not a well-formed chain.
    #[error("malformed endorsement chain: {0}")]
    Malformed(&'static str),
}

/// A signed statement: "the key with this SHA-256, at this id and address, is
/// a member until `expires_ms`".
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endorsement {
    /// SPKI DER of the endorser's identity key.
    #[serde(with = "wire_bytes")]
    pub endorser_key: Vec<u8>,
    /// SHA-256 of the subject's SPKI DER.
    pub subject_key_sha256: [u8; 32],
    /// The subject's ring id: SHA-1 of its SPKI DER.
    pub subject_id: Id,
    /// Where the subject listens (e.g. "203.0.113.7:4100").
    pub subject_addr: String,
    /// Valid while `now_ms < expires_ms`.
    pub expires_ms: u64,
    /// RSA-PSS(SHA-256) by `endorser_key` over [`TAG_ENDORSE`] and the fields.
    #[serde(with = "wire_bytes")]
    pub sig: Vec<u8>,
}

impl fmt::Debug for Endorsement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endorsement")
            .field("endorser", &Id::hash(&self.endorser_key))
            .field("subject", &self.subject_id)
            .field("addr", &self.subject_addr)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn signed_message(key_sha256: &[u8; 32], id: &Id, addr: &str, expires_ms: u64) -> Vec<u8> {
    postcard::to_allocvec(&(TAG_ENDORSE, key_sha256, id, addr, expires_ms))
        .expect("postcard encoding into a Vec cannot fail")
}

/// `signer` endorses the key `subject_key_der` at `subject_id` and
/// `subject_addr` until `expires_ms`. Refuses an id that is not the key's
/// (so an endorser cannot be talked into vouching for a chosen ring
/// position) and an over-long address.
pub fn endorse(
    rng: &mut (impl CryptoRngCore + ?Sized),
    signer: &Signer,
    subject_key_der: &[u8],
    subject_id: Id,
    subject_addr: &str,
    expires_ms: u64,
) -> Result<Endorsement, TrustError> {
    if subject_key_der.is_empty() || subject_key_der.len() > MAX_KEY_DER_BYTES {
        return Err(TrustError::BadKey);
    }
    if Id::hash(subject_key_der) != subject_id {
        return Err(TrustError::WrongSubject { link: 0 });
    }
    if subject_addr.len() > MAX_ADDR_BYTES {
        return Err(TrustError::Malformed("address longer than 256 bytes"));
    }
    let key_sha256 = sha256(subject_key_der);
    let msg = signed_message(&key_sha256, &subject_id, subject_addr, expires_ms);
    Ok(Endorsement {
        endorser_key: signer.public_der().to_vec(),
        subject_key_sha256: key_sha256,
        subject_id,
        subject_addr: subject_addr.to_owned(),
        expires_ms,
        sig: signer.sign(rng, &msg),
    })
}

impl Endorsement {
    /// Ring id of the endorser.
    pub fn endorser_id(&self) -> Id {
        Id::hash(&self.endorser_key)
    }

    /// Checks the signature alone (no expiry, no subject, no trust).
    pub fn verify_signature(&self, min_key_bits: usize) -> Result<(), record::RecordError> {
        let msg = signed_message(
            &self.subject_key_sha256,
            &self.subject_id,
            &self.subject_addr,
            self.expires_ms,
        );
        record::verify(&self.endorser_key, &msg, &self.sig, min_key_bits)
    }

    fn check_sizes(&self) -> Result<(), TrustError> {
        if self.endorser_key.len() > MAX_KEY_DER_BYTES
            || self.sig.len() > MAX_SIG_BYTES
            || self.subject_addr.len() > MAX_ADDR_BYTES
        {
            return Err(TrustError::Malformed("endorsement field too long"));
        }
        Ok(())
    }
}

/// The canonical encoding of a chain (the session credential).
pub fn encode_chain(chain: &[Endorsement]) -> Vec<u8> {
    postcard::to_allocvec(chain).expect("postcard encoding into a Vec cannot fail")
}

/// Decodes [`encode_chain`]'s output. Never panics; allocates at most what
/// [`MAX_CHAIN_LEN`] endorsements of the input's own size need.
pub fn decode_chain(bytes: &[u8]) -> Result<Vec<Endorsement>, TrustError> {
    if bytes.len() > MAX_CHAIN_BYTES {
        return Err(TrustError::TooLong);
    }
    let (count, mut rest) = postcard::take_from_bytes::<u32>(bytes)
        .map_err(|_| TrustError::Malformed("undecodable chain length"))?;
    let count = usize::try_from(count).map_err(|_| TrustError::TooLong)?;
    if count > MAX_CHAIN_LEN {
        return Err(TrustError::TooLong);
    }
    let mut chain = Vec::with_capacity(count);
    for _ in 0..count {
        let (link, tail) = postcard::take_from_bytes::<Endorsement>(rest)
            .map_err(|_| TrustError::Malformed("undecodable endorsement"))?;
        link.check_sizes()?;
        chain.push(link);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(TrustError::Malformed("trailing bytes after chain"));
    }
    if encode_chain(&chain) != bytes {
        return Err(TrustError::Malformed("non-canonical encoding"));
    }
    Ok(chain)
}

/// The keys a node trusts: the operator's roots (never expire) and keys it
/// learned are endorsed (until their chain's earliest expiry). Keys are held
/// as SHA-256 of their SPKI DER.
#[derive(Clone, Debug)]
pub struct TrustStore {
    min_key_bits: usize,
    roots: BTreeSet<[u8; 32]>,
    /// Key digest -> expiry (ms).
    learned: BTreeMap<[u8; 32], u64>,
    learned_max: usize,
}

impl TrustStore {
    /// An empty store that accepts keys of at least `min_key_bits` bits
    /// (production: [`record::MIN_KEY_BITS_DEFAULT`]).
    pub fn new(min_key_bits: usize) -> TrustStore {
        TrustStore {
            min_key_bits,
            roots: BTreeSet::new(),
            learned: BTreeMap::new(),
            learned_max: LEARNED_MAX_DEFAULT,
        }
    }

    /// Bounds the learned keys (when full, the soonest to expire is evicted).
    pub fn with_learned_max(mut self, learned_max: usize) -> TrustStore {
        self.learned_max = learned_max;
        self
    }

    /// Trusts `key_der` permanently (an operator-configured root).
    pub fn add_root(&mut self, key_der: &[u8]) -> Result<(), TrustError> {
        record::parse_public_key(key_der, self.min_key_bits).map_err(|_| TrustError::BadKey)?;
        self.roots.insert(sha256(key_der));
        Ok(())
    }

    /// Whether `key_der` is a root or a learned key still valid at `now_ms`.
    pub fn is_trusted(&self, key_der: &[u8], now_ms: u64) -> bool {
        self.trusted_until(&sha256(key_der), now_ms).is_some()
    }

    /// Roots and unexpired learned keys, counted.
    pub fn len(&self) -> usize {
        self.roots.len() + self.learned.len()
    }

    /// Whether the store trusts nothing at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn trusted_until(&self, key_sha256: &[u8; 32], now_ms: u64) -> Option<u64> {
        if self.roots.contains(key_sha256) {
            return Some(u64::MAX);
        }
        self.learned
            .get(key_sha256)
            .copied()
            .filter(|&expires_ms| now_ms < expires_ms)
    }

    /// Accepts `subject_key_der` at `subject_id` if it is trusted itself or
    /// `chain` (leaf first, see the module docs) leads from it to a trusted
    /// key, every link unexpired at `now_ms`.
    pub fn verify_chain(
        &self,
        subject_key_der: &[u8],
        subject_id: Id,
        chain: &[Endorsement],
        now_ms: u64,
    ) -> Result<(), TrustError> {
        self.check_chain(subject_key_der, subject_id, chain, now_ms)
            .map(|_| ())
    }

    /// Returns when the acceptance runs out: the earliest expiry on the path.
    fn check_chain(
        &self,
        subject_key_der: &[u8],
        subject_id: Id,
        chain: &[Endorsement],
        now_ms: u64,
    ) -> Result<u64, TrustError> {
        if chain.len() > MAX_CHAIN_LEN {
            return Err(TrustError::TooLong);
        }
        if subject_key_der.is_empty() || subject_key_der.len() > MAX_KEY_DER_BYTES {
            return Err(TrustError::BadKey);
        }
        if Id::hash(subject_key_der) != subject_id {
            return Err(TrustError::WrongSubject { link: 0 });
        }
        let mut current_sha256 = sha256(subject_key_der);
        if let Some(until) = self.trusted_until(&current_sha256, now_ms) {
            return Ok(until);
        }
        // The key the current link must vouch for, with its id.
        let mut current_id = subject_id;
        let mut until = u64::MAX;
        for (link, e) in chain.iter().enumerate() {
            e.check_sizes()?;
            if now_ms >= e.expires_ms {
                return Err(TrustError::Expired { link });
            }
            if e.subject_key_sha256 != current_sha256 || e.subject_id != current_id {
                return Err(TrustError::WrongSubject { link });
            }
            match e.verify_signature(self.min_key_bits) {
                Ok(()) => {}
                Err(record::RecordError::BadKey | record::RecordError::WeakKey) => {
                    return Err(TrustError::BadKey)
                }
                Err(_) => return Err(TrustError::BadSignature { link }),
            }
            until = until.min(e.expires_ms);
            current_sha256 = sha256(&e.endorser_key);
            current_id = Id::hash(&e.endorser_key);
            if let Some(endorser_until) = self.trusted_until(&current_sha256, now_ms) {
                return Ok(until.min(endorser_until));
            }
        }
        Err(TrustError::Untrusted)
    }

    /// Verifies like [`TrustStore::verify_chain`] and then trusts the subject
    /// as an endorser too, until the earliest expiry on its path (returned).
    pub fn learn(
        &mut self,
        subject_key_der: &[u8],
        subject_id: Id,
        chain: &[Endorsement],
        now_ms: u64,
    ) -> Result<u64, TrustError> {
        let until = self.check_chain(subject_key_der, subject_id, chain, now_ms)?;
        let key = sha256(subject_key_der);
        if self.roots.contains(&key) {
            return Ok(until);
        }
        if !self.learned.contains_key(&key) && self.learned.len() >= self.learned_max {
            self.forget_expired(now_ms);
            if self.learned.len() >= self.learned_max {
                let soonest = self
                    .learned
                    .iter()
                    .min_by_key(|(k, &expires_ms)| (expires_ms, **k))
                    .map(|(k, _)| *k);
                match soonest {
                    Some(k) => {
                        self.learned.remove(&k);
                    }
                    // learned_max == 0: learn nothing.
                    None => return Ok(until),
                }
            }
        }
        let entry = self.learned.entry(key).or_insert(until);
        *entry = (*entry).max(until);
        Ok(until)
    }

    /// Drops learned keys whose acceptance ran out.
    pub fn forget_expired(&mut self, now_ms: u64) {
        self.learned
            .retain(|_, &mut expires_ms| now_ms < expires_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::sync::OnceLock;

    const BITS: usize = 1024;

    /// 0 root, 1 intermediate, 2 subject, 3 stranger, 4 other root.
    fn key(i: usize) -> &'static Signer {
        const N: usize = 5;
        static KEYS: [OnceLock<Signer>; N] = [const { OnceLock::new() }; N];
        KEYS[i].get_or_init(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(0xe4d0_0000 + i as u64);
            Signer::generate(&mut rng, BITS).expect("test key")
        })
    }

    fn rng() -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(99)
    }

    fn endorse_of(by: usize, subject: usize, expires_ms: u64) -> Endorsement {
        let s = key(subject);
        endorse(
            &mut rng(),
            key(by),
            s.public_der(),
            s.user_id(),
            "127.0.0.1:4100",
            expires_ms,
        )
        .expect("endorse")
    }

    fn store() -> TrustStore {
        let mut t = TrustStore::new(BITS);
        t.add_root(key(0).public_der()).expect("root");
        t
    }

    fn check(t: &TrustStore, chain: &[Endorsement], now_ms: u64) -> Result<(), TrustError> {
        let s = key(2);
        t.verify_chain(s.public_der(), s.user_id(), chain, now_ms)
    }

    #[test]
    fn direct_and_two_link_chains_are_accepted() {
        let t = store();
        assert_eq!(check(&t, &[endorse_of(0, 2, 1000)], 10), Ok(()));
        let chain = [endorse_of(1, 2, 1000), endorse_of(0, 1, 1000)];
        assert_eq!(check(&t, &chain, 999), Ok(()));
        // A root needs no chain.
        assert_eq!(
            t.verify_chain(key(0).public_der(), key(0).user_id(), &[], 5),
            Ok(())
        );
    }

    #[test]
    fn missing_chain_and_untrusted_root_are_refused() {
        let t = store();
        assert_eq!(check(&t, &[], 10), Err(TrustError::Untrusted));
        // Endorsed, but by a root this store does not trust.
        assert_eq!(
            check(&t, &[endorse_of(4, 2, 1000)], 10),
            Err(TrustError::Untrusted)
        );
        // A chain that stops at an untrusted intermediate.
        assert_eq!(
            check(&t, &[endorse_of(1, 2, 1000)], 10),
            Err(TrustError::Untrusted)
        );
    }

    #[test]
    fn expired_links_are_refused() {
        let t = store();
        assert_eq!(
            check(&t, &[endorse_of(0, 2, 1000)], 1000),
            Err(TrustError::Expired { link: 0 })
        );
        let chain = [endorse_of(1, 2, 5000), endorse_of(0, 1, 1000)];
        assert_eq!(
            check(&t, &chain, 2000),
            Err(TrustError::Expired { link: 1 })
        );
    }

    #[test]
    fn forged_and_altered_endorsements_are_refused() {
        let t = store();
        // The stranger signs but claims to be the root.
        let mut forged = endorse_of(3, 2, 1000);
        forged.endorser_key = key(0).public_der().to_vec();
        assert_eq!(
            check(&t, &[forged], 10),
            Err(TrustError::BadSignature { link: 0 })
        );
        // Expiry stretched after signing.
        let mut stretched = endorse_of(0, 2, 1000);
        stretched.expires_ms = u64::MAX;
        assert_eq!(
            check(&t, &[stretched], 10),
            Err(TrustError::BadSignature { link: 0 })
        );
        // Address changed after signing.
        let mut moved = endorse_of(0, 2, 1000);
        moved.subject_addr = "198.51.100.1:1".into();
        assert_eq!(
            check(&t, &[moved], 10),
            Err(TrustError::BadSignature { link: 0 })
        );
        // Garbage endorser key.
        let mut junk = endorse_of(0, 2, 1000);
        junk.endorser_key = vec![1, 2, 3];
        assert_eq!(check(&t, &[junk], 10), Err(TrustError::BadKey));
    }

    #[test]
    fn endorsements_of_other_subjects_are_refused() {
        let t = store();
        // Someone else's endorsement presented by the subject.
        assert_eq!(
            check(&t, &[endorse_of(0, 3, 1000)], 10),
            Err(TrustError::WrongSubject { link: 0 })
        );
        // The second link vouches for someone other than the first endorser.
        let chain = [endorse_of(1, 2, 1000), endorse_of(0, 3, 1000)];
        assert_eq!(
            check(&t, &chain, 10),
            Err(TrustError::WrongSubject { link: 1 })
        );
        // The subject claims an id that is not its key's.
        let s = key(2);
        assert_eq!(
            t.verify_chain(
                s.public_der(),
                key(3).user_id(),
                &[endorse_of(0, 2, 1000)],
                10
            ),
            Err(TrustError::WrongSubject { link: 0 })
        );
        // The endorser refuses to sign a chosen id.
        assert_eq!(
            endorse(&mut rng(), key(0), s.public_der(), Id::from_u128(7), "", 1),
            Err(TrustError::WrongSubject { link: 0 })
        );
    }

    #[test]
    fn long_chains_are_refused_before_any_verification() {
        let t = store();
        let chain = vec![endorse_of(0, 2, 1000); MAX_CHAIN_LEN + 1];
        assert_eq!(check(&t, &chain, 10), Err(TrustError::TooLong));
        let bytes = encode_chain(&chain);
        assert_eq!(decode_chain(&bytes), Err(TrustError::TooLong));
    }

    #[test]
    fn learned_keys_endorse_until_their_chain_expires() {
        let mut t = store();
        // The intermediate is learned from the root's endorsement.
        let until = t
            .learn(
                key(1).public_der(),
                key(1).user_id(),
                &[endorse_of(0, 1, 500)],
                10,
            )
            .expect("learn");
        assert_eq!(until, 500);
        assert!(t.is_trusted(key(1).public_der(), 499));
        // Now one link from it suffices.
        assert_eq!(check(&t, &[endorse_of(1, 2, 1000)], 100), Ok(()));
        assert_eq!(
            check(&t, &[endorse_of(1, 2, 1000)], 500),
            Err(TrustError::Untrusted)
        );
        t.forget_expired(500);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn learned_keys_are_bounded() {
        let mut t = store().with_learned_max(1);
        t.learn(
            key(1).public_der(),
            key(1).user_id(),
            &[endorse_of(0, 1, 500)],
            0,
        )
        .expect("learn");
        t.learn(
            key(2).public_der(),
            key(2).user_id(),
            &[endorse_of(0, 2, 900)],
            0,
        )
        .expect("learn");
        assert_eq!(t.len(), 2);
        assert!(!t.is_trusted(key(1).public_der(), 0));
        assert!(t.is_trusted(key(2).public_der(), 0));
    }

    #[test]
    fn chains_round_trip_and_debug_is_short() {
        let chain = vec![endorse_of(1, 2, 1000), endorse_of(0, 1, 1000)];
        let bytes = encode_chain(&chain);
        assert_eq!(decode_chain(&bytes).as_deref(), Ok(&chain[..]));
        assert_eq!(decode_chain(&encode_chain(&[])), Ok(vec![]));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode_chain(&trailing),
            Err(TrustError::Malformed(_))
        ));
        let s = format!("{:?}", chain[0]);
        assert!(s.len() < 300, "{s}");
    }

    #[test]
    fn huge_counts_and_lengths_are_refused_without_allocating() {
        // Count u32::MAX, nothing after it.
        assert_eq!(
            decode_chain(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(TrustError::TooLong)
        );
        // One link whose key claims 2^31 bytes.
        assert!(matches!(
            decode_chain(&[1, 0x80, 0x80, 0x80, 0x80, 0x08]),
            Err(TrustError::Malformed(_))
        ));
        assert_eq!(
            decode_chain(&vec![0; MAX_CHAIN_BYTES + 1]),
            Err(TrustError::TooLong)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::session::tests::fuzz_cases(10_000)))]

        #[test]
        fn decode_chain_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_chain(&bytes);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Any single-byte change to a valid encoded chain either fails to
        /// decode or fails verification.
        #[test]
        fn mutated_chains_never_verify(pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
            static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
            let bytes = BYTES.get_or_init(|| {
                encode_chain(&[endorse_of(1, 2, 1000), endorse_of(0, 1, 1000)])
            });
            let mut m = bytes.clone();
            let i = pos.index(m.len());
            m[i] ^= xor;
            if let Ok(chain) = decode_chain(&m) {
                prop_assert!(check(&store(), &chain, 10).is_err());
            }
        }
    }
}
