//! Signed requests on a user's data, and the replay guard that checks them.
//!
//! A client proves each request that reads or changes a user's data with a
//! [`SignedRequest`]: the user's RSA-PSS signature over
//!
//! ```text
//! postcard((tag "peerstore/request/v1", user key SPKI DER,
//!           SHA-256(request bytes), nonce [16], timestamp_ms u64))
//! ```
//!
//! The request bytes themselves travel beside the envelope (a block put is a
//! megabyte; the envelope stays small) and the node hashes what it received.
//! A caller may instead sign and check its own collision-resistant digest of
//! what the request says ([`sign_batch_digests`],
//! [`ReplayGuard::check_digest`]): the client gate digests a block put by
//! the block's id, which both sides work out anyway.
//!
//! # Batches
//!
//! An RSA signature costs milliseconds, so a client streaming many requests
//! signs them in batches ([`sign_batch`]): one signature over
//!
//! ```text
//! postcard((tag "peerstore/request-batch/v1", user key SPKI DER,
//!           SHA-256(the batch's request digests, concatenated), nonce [16], timestamp_ms u64))
//! ```
//!
//! and every request of the batch carries that signature, the list of
//! digests and its own index. A node checks that the request's bytes hash
//! to the digest at its index and that the signature covers the list; the
//! replay guard remembers `(nonce, index)`, so each request of a batch is
//! accepted once and a request cannot be moved to another index. Still one
//! user signature over every request, its nonce and its timestamp.
//!
//! A node checks a request with a [`ReplayGuard`], passing the key registered
//! for the user (from the user's verified public key record, or `None` if
//! the user has none) and its own clock. The guard refuses, in this order:
//!
//! 1. no registered key: [`AuthError::UnknownUser`];
//! 2. a request key that is not the registered one: [`AuthError::WrongKey`];
//! 3. a timestamp outside `now ± window_ms` (or older than what the guard
//!    has already forgotten): [`AuthError::Stale`];
//! 4. a `(user, nonce)` seen within the window: [`AuthError::Replayed`];
//! 5. a bad signature (or unacceptable key size): [`AuthError::BadSignature`];
//! 6. no room to remember the nonce: [`AuthError::Busy`] (the whole guard is
//!    full) or [`AuthError::TooManyRequests`] (this user's share is full).
//!
//! Only a request that passed every check has its nonce recorded, so forged
//! requests cannot fill the table or burn a legitimate nonce.
//!
//! # Bounded memory
//!
//! A nonce is kept until its request's timestamp falls out of the window,
//! after which the timestamp check alone refuses a replay. The guard tracks
//! the highest `now_ms` it was given and never accepts a timestamp older
//! than `high_water − window`, so an evicted nonce cannot come back even if
//! the caller's clock steps backwards. When the table is full the guard
//! refuses new requests rather than forgetting nonces early: forgetting would
//! reopen a replay window, refusing only delays an honest client, who retries
//! with a fresh nonce. A per-user cap stops one user from filling the table
//! for everyone.
//!
//! A nonce is remembered per node: a request accepted by one replica can be
//! replayed to another replica within the window. Requests are therefore
//! meant to be idempotent at the DHT level (the same put or delete, applied
//! again), or must name their target inside the request bytes.

use std::collections::{BTreeMap, BTreeSet};

use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::record::{self, Signer, UserId, MAX_KEY_DER_BYTES, MIN_KEY_BITS_DEFAULT};

const TAG_REQUEST: &[u8] = b"peerstore/request/v1";
const TAG_BATCH: &[u8] = b"peerstore/request-batch/v1";

/// Most requests one batch signature covers.
pub const BATCH_MAX: usize = 64;

/// Largest encoded [`SignedRequest`] [`SignedRequest::decode`] accepts.
pub const MAX_SIGNED_REQUEST_BYTES: usize = 2 * MAX_KEY_DER_BYTES + 128 + 32 * BATCH_MAX + 8;

/// A user's signature on one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    /// SPKI DER of the user's signing key; its SHA-1 is the user id.
    #[serde(with = "crate::session::wire_bytes")]
    pub user_key: Vec<u8>,
    /// Random, never reused.
    pub nonce: [u8; 16],
    /// The client's clock when it signed, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// SHA-256 of the request bytes.
    pub body_digest: [u8; 32],
    /// RSA-PSS(SHA-256) by `user_key` over the message in the module docs.
    #[serde(with = "crate::session::wire_bytes")]
    pub sig: Vec<u8>,
    /// For a batch: every request's digest, in order (empty: signed alone).
    pub batch: Vec<[u8; 32]>,
    /// For a batch: this request's place in it.
    pub index: u32,
}

fn batch_msg(user_key: &[u8], digests: &[[u8; 32]], nonce: &[u8; 16], ts: u64) -> Vec<u8> {
    let mut h = Sha256::new();
    for d in digests {
        h.update(d);
    }
    let all: [u8; 32] = h.finalize().into();
    postcard::to_allocvec(&(TAG_BATCH, user_key, all, nonce, ts))
        .expect("postcard encoding into a Vec cannot fail")
}

/// Signs several requests (their bytes) with one signature; returns one
/// envelope per request, in order. At most [`BATCH_MAX`].
pub fn sign_batch(
    signer: &Signer,
    requests: &[&[u8]],
    now_ms: u64,
    rng: &mut (impl CryptoRngCore + ?Sized),
) -> Vec<SignedRequest> {
    let digests: Vec<[u8; 32]> = requests.iter().map(|r| crate::hash::sha256(r)).collect();
    sign_batch_digests(signer, digests, now_ms, rng)
}

/// Like [`sign_batch`], for requests whose digests the caller worked out
/// (a collision-resistant digest of everything the request says; the
/// verifier must work it out the same way, see
/// [`ReplayGuard::check_digest`]).
pub fn sign_batch_digests(
    signer: &Signer,
    digests: Vec<[u8; 32]>,
    now_ms: u64,
    rng: &mut (impl CryptoRngCore + ?Sized),
) -> Vec<SignedRequest> {
    assert!(
        digests.len() <= BATCH_MAX,
        "a batch is at most BATCH_MAX requests"
    );
    let mut nonce = [0u8; 16];
    rng.fill_bytes(&mut nonce);
    let user_key = signer.public_der().to_vec();
    let sig = signer.sign(rng, &batch_msg(&user_key, &digests, &nonce, now_ms));
    (0..digests.len())
        .map(|i| SignedRequest {
            user_key: user_key.clone(),
            nonce,
            timestamp_ms: now_ms,
            body_digest: digests[i],
            sig: sig.clone(),
            batch: digests.clone(),
            index: i as u32,
        })
        .collect()
}

fn signed_msg(user_key: &[u8], body_digest: &[u8; 32], nonce: &[u8; 16], ts: u64) -> Vec<u8> {
    postcard::to_allocvec(&(TAG_REQUEST, user_key, body_digest, nonce, ts))
        .expect("postcard encoding into a Vec cannot fail")
}

/// Signs `request` (the request's bytes) as `signer` at `now_ms` with a
/// fresh nonce from `rng`.
pub fn sign_request(
    signer: &Signer,
    request: &[u8],
    now_ms: u64,
    rng: &mut (impl CryptoRngCore + ?Sized),
) -> SignedRequest {
    sign_request_digest(signer, crate::hash::sha256(request), now_ms, rng)
}

/// Like [`sign_request`], for a request whose digest the caller worked out
/// (see [`sign_batch_digests`]).
pub fn sign_request_digest(
    signer: &Signer,
    body_digest: [u8; 32],
    now_ms: u64,
    rng: &mut (impl CryptoRngCore + ?Sized),
) -> SignedRequest {
    let mut nonce = [0u8; 16];
    rng.fill_bytes(&mut nonce);
    let user_key = signer.public_der().to_vec();
    let sig = signer.sign(rng, &signed_msg(&user_key, &body_digest, &nonce, now_ms));
    SignedRequest {
        user_key,
        nonce,
        timestamp_ms: now_ms,
        body_digest,
        sig,
        batch: Vec::new(),
        index: 0,
    }
}

impl SignedRequest {
    /// The user id the request claims: SHA-1 of `user_key`.
    pub fn user(&self) -> UserId {
        record::user_id(&self.user_key)
    }

    /// The canonical postcard encoding.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("postcard encoding into a Vec cannot fail")
    }

    /// Decodes [`SignedRequest::encode`]'s output, refusing oversized input,
    /// trailing bytes and non-canonical encodings. Does not verify. Never
    /// panics.
    pub fn decode(bytes: &[u8]) -> Result<SignedRequest, AuthError> {
        if bytes.len() > MAX_SIGNED_REQUEST_BYTES {
            return Err(AuthError::Malformed);
        }
        let (req, rest) =
            postcard::take_from_bytes::<SignedRequest>(bytes).map_err(|_| AuthError::Malformed)?;
        if !rest.is_empty() || req.encode() != bytes {
            return Err(AuthError::Malformed);
        }
        Ok(req)
    }
}

/// Why a request was refused. Each says what to do about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum AuthError {
    /// No public key record is registered for the user.
    #[error("unknown user: no public key is registered for this user id; register first")]
    UnknownUser,
    /// The request's key is not the key registered for the user.
    #[error("the request is signed with a key that is not the one registered for this user")]
    WrongKey,
    /// The timestamp is outside the accepted window.
    #[error("request timestamp is outside the accepted window; check the client's clock")]
    Stale,
    /// The nonce was already used within the window.
    #[error("replayed request: this nonce was already used")]
    Replayed,
    /// The signature does not verify (or the key is unacceptable).
    #[error("request signature does not verify")]
    BadSignature,
    /// The guard's nonce table is full.
    #[error("server busy: too many recent requests; retry shortly")]
    Busy,
    /// This user's share of the nonce table is full.
    #[error("too many requests from this user in the window; slow down and retry")]
    TooManyRequests,
    /// The envelope is not a canonical encoding.
    #[error("malformed signed request")]
    Malformed,
}

/// [`ReplayGuard`] settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardConfig {
    /// Accepted clock difference either way, in milliseconds.
    pub window_ms: u64,
    /// Most nonces remembered in all.
    pub entries_max: usize,
    /// Most nonces remembered per user.
    pub entries_per_user_max: usize,
    /// Smallest accepted user key, in bits.
    pub min_key_bits: usize,
}

impl Default for GuardConfig {
    fn default() -> GuardConfig {
        GuardConfig {
            window_ms: 120_000,
            entries_max: 65_536,
            entries_per_user_max: 16_384,
            min_key_bits: MIN_KEY_BITS_DEFAULT,
        }
    }
}

/// Remembers recent nonces to refuse replays; see the module docs. Sans-IO:
/// time is the `now_ms` argument.
#[derive(Debug)]
pub struct ReplayGuard {
    config: GuardConfig,
    /// `(timestamp_ms, user, nonce)`, oldest first, for eviction.
    by_time: BTreeSet<(u64, UserId, [u8; 16])>,
    /// `(user, nonce)` to what was accepted under it, for the replay check.
    /// A batch takes one entry, however many of its requests arrive.
    seen: BTreeMap<(UserId, [u8; 16]), Seen>,
    per_user: BTreeMap<UserId, usize>,
    high_water_ms: u64,
    verifications: u64,
}

/// What the guard remembers of one nonce.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// The indexes already accepted (bit `i` for request `i` of a batch; a
    /// lone request is index 0).
    mask: u64,
    /// SHA-256 of the signed message and the signature that were verified:
    /// the other requests of a batch carry the same pair, and need no second
    /// RSA verification (it cost the node milliseconds per 1 MiB block).
    verified: [u8; 32],
}

fn verified_digest(msg: &[u8], sig: &[u8]) -> [u8; 32] {
    let mut h = crate::hash::Sha256::new();
    h.update((msg.len() as u64).to_be_bytes());
    h.update(msg);
    h.update(sig);
    h.finalize()
}

impl ReplayGuard {
    pub fn new(config: GuardConfig) -> ReplayGuard {
        assert!(config.entries_max > 0 && config.entries_per_user_max > 0);
        ReplayGuard {
            config,
            by_time: BTreeSet::new(),
            seen: BTreeMap::new(),
            per_user: BTreeMap::new(),
            high_water_ms: 0,
            verifications: 0,
        }
    }

    /// Nonces currently remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// RSA signature verifications done so far.
    pub fn verifications(&self) -> u64 {
        self.verifications
    }

    /// Checks `req` for the request bytes `request`, given the key registered
    /// for the claimed user (`None`: no record), and on success remembers its
    /// nonce. See the module docs for the order of checks.
    pub fn check(
        &mut self,
        req: &SignedRequest,
        request: &[u8],
        registered_key: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let digest = crate::hash::sha256(request);
        self.check_digest(req, &digest, registered_key, now_ms)
    }

    /// Like [`ReplayGuard::check`], for a request whose digest the caller
    /// worked out from what the request says (as the signer did, see
    /// [`sign_batch_digests`]).
    pub fn check_digest(
        &mut self,
        req: &SignedRequest,
        body_digest: &[u8; 32],
        registered_key: Option<&[u8]>,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let body_digest = *body_digest;
        self.high_water_ms = self.high_water_ms.max(now_ms);
        self.evict();
        let registered = registered_key.ok_or(AuthError::UnknownUser)?;
        if req.user_key != registered {
            return Err(AuthError::WrongKey);
        }
        let window = self.config.window_ms;
        let oldest = now_ms
            .saturating_sub(window)
            .max(self.high_water_ms.saturating_sub(window));
        let newest = now_ms.saturating_add(window);
        if req.timestamp_ms < oldest || req.timestamp_ms > newest {
            return Err(AuthError::Stale);
        }
        let user = req.user();
        let nonce = req.nonce;
        if req.index as usize >= BATCH_MAX {
            return Err(AuthError::Malformed);
        }
        let bit = 1u64 << req.index;
        let seen = self.seen.get(&(user, nonce)).copied();
        let used = seen.map(|s| s.mask);
        if used.is_some_and(|mask| mask & bit != 0) {
            return Err(AuthError::Replayed);
        }
        if body_digest != req.body_digest {
            return Err(AuthError::BadSignature);
        }
        let msg = if req.batch.is_empty() {
            if req.index != 0 {
                // A lone request has no place in a batch: only one
                // encoding of it is accepted.
                return Err(AuthError::Malformed);
            }
            signed_msg(
                &req.user_key,
                &req.body_digest,
                &req.nonce,
                req.timestamp_ms,
            )
        } else {
            let at = req.batch.get(req.index as usize);
            if req.batch.len() > BATCH_MAX || at != Some(&body_digest) {
                return Err(AuthError::BadSignature);
            }
            batch_msg(&req.user_key, &req.batch, &req.nonce, req.timestamp_ms)
        };
        let verified = verified_digest(&msg, &req.sig);
        // The user key is the registered one (checked above) and is in the
        // message, as are the nonce and the timestamp: the same message and
        // signature were verified already.
        if seen.is_none_or(|s| s.verified != verified) {
            self.verifications += 1;
            record::verify(&req.user_key, &msg, &req.sig, self.config.min_key_bits)
                .map_err(|_| AuthError::BadSignature)?;
        }
        if let Some(entry) = self.seen.get_mut(&(user, nonce)) {
            // Another request of a batch already remembered.
            entry.mask |= bit;
            return Ok(());
        }
        if self.seen.len() >= self.config.entries_max {
            return Err(AuthError::Busy);
        }
        let count = self.per_user.entry(user).or_insert(0);
        if *count >= self.config.entries_per_user_max {
            return Err(AuthError::TooManyRequests);
        }
        *count += 1;
        self.seen.insert(
            (user, nonce),
            Seen {
                mask: bit,
                verified,
            },
        );
        self.by_time.insert((req.timestamp_ms, user, nonce));
        debug_assert_eq!(self.seen.len(), self.by_time.len());
        Ok(())
    }

    /// Forgets nonces whose timestamps no check can accept any more.
    fn evict(&mut self) {
        let oldest = self.high_water_ms.saturating_sub(self.config.window_ms);
        while let Some(&(ts, user, nonce)) = self.by_time.first() {
            if ts >= oldest {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&(user, nonce));
            if let Some(count) = self.per_user.get_mut(&user) {
                *count -= 1;
                if *count == 0 {
                    self.per_user.remove(&user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{rng, test_identity, TEST_BITS};
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000_000;
    const REQ: &[u8] = b"put block 42";

    fn guard() -> ReplayGuard {
        ReplayGuard::new(GuardConfig {
            min_key_bits: TEST_BITS,
            ..GuardConfig::default()
        })
    }

    fn alice() -> &'static Signer {
        test_identity(0).signer()
    }

    fn alice_key() -> Option<&'static [u8]> {
        Some(alice().public_der())
    }

    fn signed(seed: u64, at: u64) -> SignedRequest {
        sign_request(alice(), REQ, at, &mut rng(seed))
    }

    #[test]
    fn each_request_of_a_batch_passes_once_and_only_at_its_own_index() {
        let bodies: [&[u8]; 3] = [b"put a", b"put b", b"get c"];
        let reqs = sign_batch(alice(), &bodies, NOW, &mut rng(7));
        assert_eq!(reqs.len(), 3);
        assert!(
            reqs.windows(2).all(|w| w[0].sig == w[1].sig),
            "one signature"
        );
        let mut g = guard();
        for (r, b) in reqs.iter().zip(bodies) {
            assert_eq!(g.check(r, b, alice_key(), NOW), Ok(()));
        }
        assert_eq!(g.len(), 1, "a batch takes one place in the table");
        assert_eq!(g.verifications(), 1, "one RSA verification per batch");
        // Each once.
        assert_eq!(
            g.check(&reqs[1], bodies[1], alice_key(), NOW),
            Err(AuthError::Replayed)
        );
        // Another body under a batch envelope, or an envelope moved to
        // another index, does not verify.
        let mut g = guard();
        assert_eq!(
            g.check(&reqs[0], bodies[1], alice_key(), NOW),
            Err(AuthError::BadSignature)
        );
        let mut moved = reqs[0].clone();
        moved.index = 1;
        moved.body_digest = reqs[1].body_digest;
        assert_eq!(
            g.check(&moved, bodies[1], alice_key(), NOW),
            Ok(()),
            "that is just request 1 again, and it was not yet used here"
        );
        assert_eq!(
            g.check(&reqs[1], bodies[1], alice_key(), NOW),
            Err(AuthError::Replayed),
            "so request 1 is now spent"
        );
        // A list of digests changed after signing fails, also where the
        // batch's first request was already verified and remembered.
        let mut forged = reqs[2].clone();
        forged.batch[0] = [9; 32];
        assert_eq!(
            guard().check(&forged, bodies[2], alice_key(), NOW),
            Err(AuthError::BadSignature)
        );
        let mut g = guard();
        assert_eq!(g.check(&reqs[0], bodies[0], alice_key(), NOW), Ok(()));
        let mut forged = reqs[2].clone();
        forged.batch[2] = crate::hash::sha256(b"get d");
        forged.body_digest = forged.batch[2];
        assert_eq!(
            g.check(&forged, b"get d", alice_key(), NOW),
            Err(AuthError::BadSignature)
        );
        let mut resigned = reqs[2].clone();
        resigned.sig[0] ^= 1;
        assert_eq!(
            g.check(&resigned, bodies[2], alice_key(), NOW),
            Err(AuthError::BadSignature),
            "the remembered verification was of another signature"
        );
        let mut later = reqs[2].clone();
        later.timestamp_ms += 1;
        assert_eq!(
            g.check(&later, bodies[2], alice_key(), NOW),
            Err(AuthError::BadSignature),
            "nor of another timestamp"
        );
        assert_eq!(g.check(&reqs[2], bodies[2], alice_key(), NOW), Ok(()));
        assert_eq!(g.verifications(), 4);
        // Envelopes round-trip through the canonical decoder.
        assert_eq!(
            SignedRequest::decode(&reqs[2].encode()),
            Ok(reqs[2].clone())
        );
    }

    #[test]
    fn a_fresh_request_passes_once() {
        let mut g = guard();
        let req = signed(1, NOW);
        assert_eq!(req.user(), alice().user_id());
        assert_eq!(g.check(&req, REQ, alice_key(), NOW), Ok(()));
        assert_eq!(g.len(), 1);
        // Replayed: same request again, later but within the window.
        assert_eq!(
            g.check(&req, REQ, alice_key(), NOW + 1000),
            Err(AuthError::Replayed)
        );
        // A second request with its own nonce is fine.
        assert_eq!(g.check(&signed(2, NOW), REQ, alice_key(), NOW), Ok(()));
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let mut g = guard();
        let w = GuardConfig::default().window_ms;
        assert_eq!(
            g.check(&signed(3, NOW - w - 1), REQ, alice_key(), NOW),
            Err(AuthError::Stale)
        );
        assert_eq!(
            g.check(&signed(4, NOW + w + 1), REQ, alice_key(), NOW),
            Err(AuthError::Stale)
        );
        assert_eq!(g.check(&signed(5, NOW - w), REQ, alice_key(), NOW), Ok(()));
        assert_eq!(g.check(&signed(6, NOW + w), REQ, alice_key(), NOW), Ok(()));
        // A replay after the window closes is refused as stale, and by then
        // the nonce has been forgotten.
        let req = signed(7, NOW);
        assert_eq!(g.check(&req, REQ, alice_key(), NOW), Ok(()));
        assert_eq!(
            g.check(&req, REQ, alice_key(), NOW + w + 1),
            Err(AuthError::Stale)
        );
        assert!(g.seen.keys().all(|(_, n)| *n != req.nonce));
        // The clock stepping back does not reopen the forgotten window.
        assert_eq!(g.check(&req, REQ, alice_key(), NOW), Err(AuthError::Stale));
    }

    #[test]
    fn unknown_users_and_other_keys_are_refused() {
        let mut g = guard();
        let req = signed(8, NOW);
        assert_eq!(g.check(&req, REQ, None, NOW), Err(AuthError::UnknownUser));
        // Signed by Mallory but presented for Alice's registered key.
        let mallory = test_identity(2).signer();
        let forged = sign_request(mallory, REQ, NOW, &mut rng(9));
        assert_eq!(
            g.check(&forged, REQ, alice_key(), NOW),
            Err(AuthError::WrongKey)
        );
        // Alice's key claimed, Mallory's signature.
        let mut forged = forged;
        forged.user_key = alice().public_der().to_vec();
        assert_eq!(
            g.check(&forged, REQ, alice_key(), NOW),
            Err(AuthError::BadSignature)
        );
        // Alice's signature over other request bytes.
        assert_eq!(
            g.check(&req, b"delete everything", alice_key(), NOW),
            Err(AuthError::BadSignature)
        );
        // Fields changed after signing.
        for f in [
            |r: &mut SignedRequest| r.nonce[0] ^= 1,
            |r: &mut SignedRequest| r.timestamp_ms += 1,
            |r: &mut SignedRequest| r.sig[5] ^= 1,
        ] {
            let mut r = req.clone();
            f(&mut r);
            assert_eq!(
                g.check(&r, REQ, alice_key(), NOW),
                Err(AuthError::BadSignature)
            );
        }
        // Weak keys are refused by policy.
        let mut strict = ReplayGuard::new(GuardConfig::default());
        assert_eq!(
            strict.check(&req, REQ, alice_key(), NOW),
            Err(AuthError::BadSignature)
        );
        // None of those burned the nonce.
        assert!(g.is_empty());
        assert_eq!(g.check(&req, REQ, alice_key(), NOW), Ok(()));
    }

    #[test]
    fn a_full_guard_refuses_rather_than_forgets() {
        let mut g = ReplayGuard::new(GuardConfig {
            window_ms: 1000,
            entries_max: 3,
            entries_per_user_max: 2,
            min_key_bits: TEST_BITS,
        });
        let bob = test_identity(1).signer();
        let bob_req = |seed, at| sign_request(bob, REQ, at, &mut rng(seed));
        assert_eq!(g.check(&signed(10, NOW), REQ, alice_key(), NOW), Ok(()));
        assert_eq!(g.check(&signed(11, NOW), REQ, alice_key(), NOW), Ok(()));
        assert_eq!(
            g.check(&signed(12, NOW), REQ, alice_key(), NOW),
            Err(AuthError::TooManyRequests)
        );
        let bk = Some(bob.public_der());
        assert_eq!(g.check(&bob_req(13, NOW), REQ, bk, NOW), Ok(()));
        assert_eq!(
            g.check(&bob_req(14, NOW), REQ, bk, NOW),
            Err(AuthError::Busy)
        );
        assert_eq!(g.len(), 3);
        // Once the window passes the entries are evicted and room returns.
        assert_eq!(
            g.check(&bob_req(14, NOW + 1001), REQ, bk, NOW + 1001),
            Ok(())
        );
        assert_eq!(g.len(), 1);
        assert_eq!(
            g.check(&signed(12, NOW + 1001), REQ, alice_key(), NOW + 1001),
            Ok(())
        );
    }

    #[test]
    fn envelopes_round_trip_canonically() {
        let req = signed(15, NOW);
        let bytes = req.encode();
        assert_eq!(SignedRequest::decode(&bytes), Ok(req));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(SignedRequest::decode(&long), Err(AuthError::Malformed));
        assert_eq!(SignedRequest::decode(&[]), Err(AuthError::Malformed));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// A flipped bit anywhere in the envelope never passes.
        #[test]
        fn bit_flips_never_pass(bit in any::<prop::sample::Index>()) {
            let req = signed(16, NOW);
            let mut bytes = req.encode();
            let b = bit.index(bytes.len() * 8);
            bytes[b / 8] ^= 1 << (b % 8);
            if let Ok(r) = SignedRequest::decode(&bytes) {
                prop_assert!(guard().check(&r, REQ, alice_key(), NOW).is_err());
            }
        }

        #[test]
        fn junk_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(r) = SignedRequest::decode(&bytes) {
                let _ = guard().check(&r, &bytes, alice_key(), NOW);
                let _ = guard().check(&r, &bytes, Some(&r.user_key), NOW);
            }
        }
    }
}
