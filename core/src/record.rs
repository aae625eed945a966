//! Signed, versioned, self-validating records: the DHT's small mutable objects.
//!
//! Three kinds live on the ring beside the immutable blocks:
//!
//! * [`PubKeyRecord`]: a user's public keys. Its position is the user id,
//!   SHA-1 of the signing key's SPKI DER, so the id *is* the key: the first
//!   registration of an id wins and another key can never replace it.
//! * [`Manifest`]: a file's current version and its access list ([`Acl`]),
//!   signed by the owner or by a writer the owner's ACL names. Newest wins.
//! * [`TxLog`]: a user's transaction log, a grow-only set of owner-signed
//!   entries merged by union and ordered by `(clock, client)`.
//!
//! # Validation is self-contained
//!
//! [`Record::verify`] checks every signature, key size, size limit and the
//! binding of each signature to the record's ring position. A record that
//! passes is valid at every replica whatever else that replica holds, so
//! replicas never need to agree on history to agree on validity, and a node
//! can verify before it stores *and* before it serves.
//!
//! # Merge rules form a join semilattice
//!
//! [`Record::merge`] is commutative, associative and idempotent for every kind,
//! so replicas that saw the same set of writes in any order hold byte-identical
//! records (same [`Record::digest`]), which is what anti-entropy compares.
//!
//! * PubKey: a different signing key is refused ([`RecordError::KeyTaken`]).
//!   Two records for the same key (an equivocating or re-signing user) are
//!   ordered by digest, the smaller wins. Rotating the encryption key is not
//!   supported by this version of the record (it has no version field).
//! * Manifest: the greater `(acl.epoch, version.clock, version.writer)` wins;
//!   on equal keys (equivocation) the smaller digest wins. The epoch comes
//!   first so that once the owner publishes a new ACL, nothing signed under an
//!   older ACL can win again: a revoked writer cannot outbid the owner with a
//!   huge clock. (A writer that is *still* on the ACL can; the owner's remedy
//!   is a new epoch.)
//! * TxLog: union keyed by `(clock, client)`; two different entries under the
//!   same key (only the owner can make them) resolve to the smaller entry
//!   digest. A union that would break the limits is refused with
//!   [`RecordError::TooLarge`] and leaves the log unchanged.
//!
//! A replica serving a *subset* of a log, or an older manifest, cannot be
//! prevented by signatures alone; reads that consult several replicas and
//! merge what they get (read repair) defeat it.
//!
//! # Encoding and signatures
//!
//! Records are encoded with postcard. [`Record::decode`] accepts only the
//! canonical encoding (it re-encodes and compares), so bytes and records are
//! in one-to-one correspondence and the digest of a record is the SHA-256 of
//! the bytes on the wire. Every signature is RSA-PSS with SHA-256 (salt length
//! 32) over the postcard encoding of a tuple that starts with a per-kind
//! domain tag, so a signature for one purpose is never valid for another.
//! Signing uses blinded private-key operations with randomness passed in by
//! the caller: this module never touches OS randomness.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use rand_core::CryptoRngCore;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::pss::{BlindedSigningKey, Signature, VerifyingKey};
use rsa::signature::{RandomizedSigner, SignatureEncoding, Verifier};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::Id;
use crate::merkle;

/// A user's identifier: SHA-1 of the user's signing public key (SPKI DER).
pub type UserId = Id;

/// The key-size policy a production replica applies.
pub const MIN_KEY_BITS_DEFAULT: usize = 2048;
/// Largest accepted RSA modulus, in bits (bounds verification cost).
pub const MAX_KEY_BITS: usize = 4096;
/// Floor under any `min_bits` a caller passes: below this, RSA-PSS with
/// SHA-256 and a 32-byte salt does not even fit, and nothing is secure.
pub const ABSOLUTE_MIN_KEY_BITS: usize = 1024;
/// Longest accepted SPKI DER (a 4096-bit key encodes in 550 bytes).
pub const MAX_KEY_DER_BYTES: usize = 1024;
/// Largest encoded [`Record::PubKey`] or [`Record::Manifest`].
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Most entries a transaction log may hold.
pub const MAX_TXLOG_ENTRIES: usize = 4096;
/// Largest encoded [`Record::TxLog`].
pub const MAX_TXLOG_BYTES: usize = 1024 * 1024;
/// Largest body of one transaction log entry.
pub const MAX_TX_ENTRY_BODY: usize = 4096;
/// Largest input [`Record::decode`] looks at.
pub const MAX_ENCODED_BYTES: usize = MAX_TXLOG_BYTES;

const TAG_PUBKEY: &[u8] = b"peerstore/pubkey/v1";
const TAG_ACL: &[u8] = b"peerstore/acl/v1";
const TAG_MANIFEST: &[u8] = b"peerstore/manifest/v1";
const TAG_TX_ENTRY: &[u8] = b"peerstore/tx-entry/v1";
const TAG_SIG_BATCH: &[u8] = b"peerstore/signature-batch/v1";

/// Most messages one batch signature covers ([`Signer::sign_batch`]); a
/// proof is then at most 10 hashes long.
pub const SIG_BATCH_MAX: usize = 1024;

/// Why a record was refused. Messages name the rule, never key material.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A public key is not a canonical DER RSA SubjectPublicKeyInfo of at most
    /// [`MAX_KEY_BITS`] bits with a valid modulus and exponent.
    #[error("malformed or unsupported public key (expected a canonical RSA SubjectPublicKeyInfo of at most 4096 bits)")]
    BadKey,
    /// A public key is shorter than the replica's minimum.
    #[error("public key is shorter than the required minimum size")]
    WeakKey,
    /// A signature does not verify under the key it claims.
    #[error("signature does not verify")]
    BadSignature,
    /// A manifest signer is neither the owner nor a writer on the owner's ACL.
    #[error("signer is neither the owner nor a writer on the owner's access list")]
    NotAllowed,
    /// A public key record for this user id already exists with another key.
    #[error("user id is already registered with a different key")]
    KeyTaken,
    /// Records of different kinds or positions cannot be merged.
    #[error("records differ in kind, owner or ring position")]
    Mismatch,
    /// A size limit (record, log entries, log bytes, entry body) is exceeded.
    #[error("record exceeds a size limit")]
    TooLarge,
    /// The bytes or the structure are not a well-formed record.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

// ---------------------------------------------------------------------------
// Keys and signatures
// ---------------------------------------------------------------------------

/// The user id of a signing key: SHA-1 of its SPKI DER.
pub fn user_id(signing_key_der: &[u8]) -> UserId {
    Id::hash(signing_key_der)
}

/// A private signing key: RSA-PSS with SHA-256 and blinded private-key
/// operations. `Debug` shows the user id and size only, never key material.
#[derive(Clone)]
pub struct Signer {
    key: BlindedSigningKey<Sha256>,
    /// The same key for `ring`, whose signing is about four times faster,
    /// when the host asked for it ([`Signer::with_os_random`]).
    fast: Option<Arc<ring::signature::RsaKeyPair>>,
    public_der: Vec<u8>,
    id: UserId,
    bits: usize,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("user", &self.id)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Generates a fresh key of `bits` bits from `rng`.
    pub fn generate(
        rng: &mut (impl CryptoRngCore + ?Sized),
        bits: usize,
    ) -> Result<Signer, RecordError> {
        check_bits(bits, ABSOLUTE_MIN_KEY_BITS)?;
        let key = RsaPrivateKey::new(&mut RngRef(rng), bits).map_err(|_| RecordError::BadKey)?;
        Signer::try_from_private_key(key)
    }

    /// Wraps an existing key, refusing sizes outside
    /// [`ABSOLUTE_MIN_KEY_BITS`]`..=`[`MAX_KEY_BITS`].
    pub fn try_from_private_key(key: RsaPrivateKey) -> Result<Signer, RecordError> {
        let bits = key.n().bits();
        check_bits(bits, ABSOLUTE_MIN_KEY_BITS)?;
        let public_der = key
            .to_public_key()
            .to_public_key_der()
            .map_err(|_| RecordError::BadKey)?
            .into_vec();
        Ok(Signer {
            key: BlindedSigningKey::new(key),
            fast: None,
            id: user_id(&public_der),
            public_der,
            bits,
        })
    }

    /// Wraps an existing key.
    ///
    /// # Panics
    /// If the key is smaller than [`ABSOLUTE_MIN_KEY_BITS`] or larger than
    /// [`MAX_KEY_BITS`]; use [`Signer::try_from_private_key`] for keys that
    /// come from outside the program.
    pub fn from_private_key(key: RsaPrivateKey) -> Signer {
        Signer::try_from_private_key(key).expect("RSA key size outside 1024..=4096 bits")
    }

    /// This signer, signing with `ring` from now on where `ring` takes the
    /// key (2048 to 8192 bits): the same RSA-PSS(SHA-256) signatures with a
    /// 32-byte salt, made in about a quarter of the time (2.3 ms instead of
    /// 8.5 for a 3072-bit key on the test machine). `ring`'s private-key
    /// operation is constant-time. Its salt comes from the operating
    /// system's generator, so the `rng` passed to [`Signer::sign`] is then
    /// unused: for hosts that sign with `OsRng` anyway (the node and the
    /// client), never for runs that must replay from a seed. A key `ring`
    /// refuses keeps signing as before.
    pub fn with_os_random(mut self) -> Signer {
        use rsa::pkcs8::EncodePrivateKey;
        let private: &RsaPrivateKey = self.key.as_ref();
        self.fast = private
            .to_pkcs8_der()
            .ok()
            .and_then(|der| ring::signature::RsaKeyPair::from_pkcs8(der.as_bytes()).ok())
            .map(Arc::new);
        self
    }

    /// Whether [`Signer::with_os_random`] took.
    pub fn signs_with_os_random(&self) -> bool {
        self.fast.is_some()
    }

    /// The public key as SPKI DER.
    pub fn public_der(&self) -> &[u8] {
        &self.public_der
    }

    /// SHA-1 of [`Signer::public_der`].
    pub fn user_id(&self) -> UserId {
        self.id
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// RSA-PSS(SHA-256) signature over `msg`.
    pub fn sign(&self, rng: &mut (impl CryptoRngCore + ?Sized), msg: &[u8]) -> Vec<u8> {
        if let Some(kp) = &self.fast {
            let mut sig = vec![0; kp.public().modulus_len()];
            let os = ring::rand::SystemRandom::new();
            if kp
                .sign(&ring::signature::RSA_PSS_SHA256, &os, msg, &mut sig)
                .is_ok()
            {
                return sig;
            }
        }
        self.key
            .try_sign_with_rng(&mut RngRef(rng), msg)
            // Only fails when the modulus is too small for the PSS encoding,
            // which the constructors rule out.
            .expect("RSA-PSS signing with a key of at least 1024 bits")
            .to_vec()
    }

    /// One signature for each of `msgs`, made with one RSA operation per
    /// [`SIG_BATCH_MAX`] messages: a Merkle tree ([`crate::merkle`]) over
    /// the messages, the tree's size and root signed as
    /// `(tag "peerstore/signature-batch/v1", size u32, root)`, and each
    /// message's signature that root signature with the message's index
    /// and inclusion proof (`BatchSig`). [`verify`] accepts either form
    /// wherever a signature goes; a verifier that has seen the root
    /// signature once checks the next message of the batch with a few
    /// hashes. A lone message gets a plain signature.
    pub fn sign_batch(
        &self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        msgs: &[impl AsRef<[u8]>],
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::with_capacity(msgs.len());
        for batch in msgs.chunks(SIG_BATCH_MAX) {
            if let [msg] = batch {
                out.push(self.sign(rng, msg.as_ref()));
                continue;
            }
            let leaves: Vec<merkle::Hash> =
                batch.iter().map(|m| merkle::leaf(m.as_ref())).collect();
            let count = batch.len() as u32;
            let (root, paths) = merkle::root_and_paths(&leaves);
            let sig = self.sign(rng, &batch_root_msg(count, &root));
            for (index, path) in paths.into_iter().enumerate() {
                out.push(encode(&BatchSig {
                    count,
                    index: index as u32,
                    path,
                    sig: sig.clone(),
                }));
            }
        }
        out
    }
}

/// The signature of one message of a batch ([`Signer::sign_batch`]), as its
/// bytes travel in any record's `sig` field: postcard of this. Always longer
/// than the key's modulus, which is exactly how long a plain signature is.
#[derive(Serialize, Deserialize)]
struct BatchSig {
    /// Messages in the batch, at least 2.
    count: u32,
    /// This message's place in the batch.
    index: u32,
    /// Inclusion proof of the message's leaf, from the leaf up.
    path: Vec<merkle::Hash>,
    /// RSA-PSS over [`batch_root_msg`].
    #[serde(with = "crate::session::wire_bytes")]
    sig: Vec<u8>,
}

fn batch_root_msg(count: u32, root: &merkle::Hash) -> Vec<u8> {
    encode(&(TAG_SIG_BATCH, count, root))
}

/// Lets `?Sized` RNGs (`&mut dyn CryptoRngCore`) be passed to the rsa crate,
/// whose `impl CryptoRngCore` arguments must be sized.
pub(crate) struct RngRef<'a, R: ?Sized>(pub(crate) &'a mut R);

impl<R: CryptoRngCore + ?Sized> rand_core::RngCore for RngRef<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.try_fill_bytes(dest)
    }
}

impl<R: CryptoRngCore + ?Sized> rand_core::CryptoRng for RngRef<'_, R> {}

fn check_bits(bits: usize, min_bits: usize) -> Result<(), RecordError> {
    if bits > MAX_KEY_BITS {
        return Err(RecordError::BadKey);
    }
    if bits < min_bits.max(ABSOLUTE_MIN_KEY_BITS) {
        return Err(RecordError::WeakKey);
    }
    Ok(())
}

/// Parses an SPKI DER RSA public key and applies the size policy.
pub(crate) fn parse_public_key(
    der: &[u8],
    min_bits: usize,
) -> Result<VerifyingKey<Sha256>, RecordError> {
    if der.is_empty() || der.len() > MAX_KEY_DER_BYTES {
        return Err(RecordError::BadKey);
    }
    // The rsa crate checks the modulus is odd and at most 4096 bits and the
    // exponent odd, in 3..2^33 and below the modulus.
    let key = RsaPublicKey::from_public_key_der(der).map_err(|_| RecordError::BadKey)?;
    // One key, one encoding, one user id: refuse anything the encoder would
    // not have produced byte for byte.
    let canonical = key.to_public_key_der().map_err(|_| RecordError::BadKey)?;
    if canonical.as_bytes() != der {
        return Err(RecordError::BadKey);
    }
    check_bits(key.n().bits(), min_bits)?;
    Ok(VerifyingKey::new(key))
}

fn verify_parsed(key: &VerifyingKey<Sha256>, msg: &[u8], sig: &[u8]) -> Result<(), RecordError> {
    let public: &RsaPublicKey = key.as_ref();
    if sig.len() > public.size() {
        return verify_batched(key, msg, sig);
    }
    verify_rsa(key, msg, sig)
}

/// A [`BatchSig`]: canonical bytes, a proof of exactly the length its place
/// needs, and a valid signature over the root the proof leads to.
fn verify_batched(key: &VerifyingKey<Sha256>, msg: &[u8], sig: &[u8]) -> Result<(), RecordError> {
    let bad = RecordError::BadSignature;
    // A batch of the greatest size with a 4096-bit key: well under this.
    if sig.len() > 1024 {
        return Err(bad);
    }
    let b: BatchSig = postcard::from_bytes(sig).map_err(|_| bad)?;
    // One batch signature, one encoding: no one can re-encode a record's
    // signature into other bytes that still verify.
    if encode(&b) != sig || b.count < 2 || b.count as usize > SIG_BATCH_MAX {
        return Err(bad);
    }
    let root = merkle::root_from_path(
        merkle::leaf(msg),
        u64::from(b.index),
        u64::from(b.count),
        &b.path,
    )
    .ok_or(bad)?;
    verify_rsa(key, &batch_root_msg(b.count, &root), &b.sig)
}

fn verify_rsa(key: &VerifyingKey<Sha256>, msg: &[u8], sig: &[u8]) -> Result<(), RecordError> {
    let public: &RsaPublicKey = key.as_ref();
    if sig.len() != public.size() {
        return Err(RecordError::BadSignature);
    }
    let (n, e) = (public.n().to_bytes_be(), public.e().to_bytes_be());
    let seen = verified_digest(&n, &e, msg, sig);
    if verified_before(&seen) {
        return Ok(());
    }
    if public.n().bits() >= RING_MIN_BITS {
        // ring's verifier: the same RSA-PSS(SHA-256) check with a 32-byte
        // salt: 70 µs at 3072 bits on this machine, the rsa crate 650 µs.
        let components = ring::signature::RsaPublicKeyComponents { n, e };
        components
            .verify(&ring::signature::RSA_PSS_2048_8192_SHA256, msg, sig)
            .map_err(|_| RecordError::BadSignature)?;
    } else {
        let parsed = Signature::try_from(sig).map_err(|_| RecordError::BadSignature)?;
        key.verify(msg, &parsed)
            .map_err(|_| RecordError::BadSignature)?;
    }
    remember_verified(seen);
    Ok(())
}

/// Smallest modulus ring verifies; smaller keys (below the production
/// policy, accepted only where a caller lowers `min_bits`, as tests do) go
/// through the rsa crate.
const RING_MIN_BITS: usize = 2048;

/// Signatures that verified lately, by [`verified_digest`]: a process sees
/// the same signature again and again (a replica checks a record when it
/// is stored, again when it is read back and when another replica's copy
/// answers a read; a client checks a batch signature for every record it
/// covers), and each RSA-3072 check costs 70 µs with ring (650 µs with
/// the rsa crate, which checks keys under 2048 bits). Only
/// successes are remembered, so a forged signature is checked every time,
/// exactly as before; the bound keeps memory fixed (about 2.5 MiB).
const VERIFIED_MEMO: usize = 32_768;

static VERIFIED: std::sync::Mutex<Option<lru::LruCache<[u8; 32], ()>>> =
    std::sync::Mutex::new(None);

/// SHA-256 over everything a verification depends on (modulus, exponent,
/// message, signature), each length-prefixed: equal digests mean the same
/// verification, whose answer is the same.
fn verified_digest(n: &[u8], e: &[u8], msg: &[u8], sig: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"peerstore/verified-signature/v1");
    for part in [n, e, msg, sig] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

fn verified_before(d: &[u8; 32]) -> bool {
    let mut memo = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    memo.as_mut().is_some_and(|m| m.get(d).is_some())
}

fn remember_verified(d: [u8; 32]) {
    let mut memo = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    memo.get_or_insert_with(|| {
        lru::LruCache::new(std::num::NonZeroUsize::new(VERIFIED_MEMO).expect("nonzero"))
    })
    .put(d, ());
}

/// Verifies an RSA-PSS(SHA-256) signature by the SPKI DER key `public_der`,
/// whose modulus must have `min_bits..=MAX_KEY_BITS` bits (and never fewer
/// than [`ABSOLUTE_MIN_KEY_BITS`]). Never panics, whatever the bytes.
pub fn verify(
    public_der: &[u8],
    msg: &[u8],
    sig: &[u8],
    min_bits: usize,
) -> Result<(), RecordError> {
    let key = parse_public_key(public_der, min_bits)?;
    verify_parsed(&key, msg, sig)
}

// ---------------------------------------------------------------------------
// Record types
// ---------------------------------------------------------------------------

/// A user's public keys, self-signed by the signing key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PubKeyRecord {
    /// SPKI DER of the user's signing key; its SHA-1 is the user id.
    #[serde(with = "crate::session::wire_bytes")]
    pub signing_key: Vec<u8>,
    /// SPKI DER of the user's encryption (OAEP) key; may be empty.
    #[serde(with = "crate::session::wire_bytes")]
    pub enc_key: Vec<u8>,
    /// By `signing_key` over `(domain tag, signing_key, enc_key)`.
    #[serde(with = "crate::session::wire_bytes")]
    pub sig: Vec<u8>,
}

/// A manifest's access list, signed by the file's owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acl {
    /// Bumped by the owner on every change; a higher epoch beats anything
    /// signed under a lower one.
    pub epoch: u64,
    /// Users besides the owner who may sign new versions. Strictly ascending.
    pub writers: Vec<UserId>,
    /// Users who may read, each with the file key wrapped for them. Strictly
    /// ascending by user.
    pub readers: Vec<AclEntry>,
    /// By the owner over `(domain tag, manifest position, epoch, writers, readers)`.
    #[serde(with = "crate::session::wire_bytes")]
    pub sig: Vec<u8>,
}

/// One reader of a file: the file key wrapped (RSA-OAEP) with the reader's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclEntry {
    pub user: UserId,
    #[serde(with = "crate::session::wire_bytes")]
    pub wrapped_key: Vec<u8>,
}

/// A manifest version: Lamport clock, then the writer's user id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub clock: u64,
    pub writer: UserId,
}

/// A file manifest: newest version wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// SPKI DER of the owner's signing key.
    #[serde(with = "crate::session::wire_bytes")]
    pub owner_key: Vec<u8>,
    /// The owner's name for the file (random, so positions reveal nothing).
    pub file_id: [u8; 32],
    pub acl: Acl,
    /// `version.writer` must be the user id of `signer_key`.
    pub version: Version,
    /// SPKI DER of the key that signed this version: the owner's or a writer's.
    #[serde(with = "crate::session::wire_bytes")]
    pub signer_key: Vec<u8>,
    /// Opaque to the DHT (encrypted by the client).
    #[serde(with = "crate::session::wire_bytes")]
    pub body: Vec<u8>,
    /// By `signer_key` over `(domain tag, position, acl digest, version, body)`.
    #[serde(with = "crate::session::wire_bytes")]
    pub sig: Vec<u8>,
}

/// A user's transaction log: a grow-only set of owner-signed entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxLog {
    /// SPKI DER of the owner's signing key.
    #[serde(with = "crate::session::wire_bytes")]
    pub owner_key: Vec<u8>,
    /// Keyed by `(clock, client)`, which must equal the entry's own fields.
    pub entries: BTreeMap<(u64, u64), TxEntry>,
}

/// One transaction log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxEntry {
    pub clock: u64,
    pub client: u64,
    /// Opaque to the DHT (encrypted by the client); at most [`MAX_TX_ENTRY_BODY`].
    #[serde(with = "crate::session::wire_bytes")]
    pub body: Vec<u8>,
    /// By the owner over `(domain tag, log position, clock, client, body)`.
    #[serde(with = "crate::session::wire_bytes")]
    pub sig: Vec<u8>,
}

/// Any record the DHT stores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    PubKey(PubKeyRecord),
    Manifest(Manifest),
    TxLog(TxLog),
}

/// Borrowing twin of [`Record`]: encodes byte for byte like it (same variant
/// indices), so a digest can be taken without cloning.
#[derive(Serialize)]
enum RecordRef<'a> {
    PubKey(&'a PubKeyRecord),
    Manifest(&'a Manifest),
    #[allow(dead_code)] // kept so the variant indices match `Record`
    TxLog(&'a TxLog),
}

impl From<PubKeyRecord> for Record {
    fn from(r: PubKeyRecord) -> Record {
        Record::PubKey(r)
    }
}

impl From<Manifest> for Record {
    fn from(m: Manifest) -> Record {
        Record::Manifest(m)
    }
}

impl From<TxLog> for Record {
    fn from(l: TxLog) -> Record {
        Record::TxLog(l)
    }
}

// ---------------------------------------------------------------------------
// Positions
// ---------------------------------------------------------------------------

/// Ring position of a user's public key record: the user id.
pub fn pubkey_position(signing_key_der: &[u8]) -> Id {
    user_id(signing_key_der)
}

/// Ring position of a manifest: SHA-1("peerstore-manifest" || owner || file_id).
pub fn manifest_position(owner: UserId, file_id: &[u8; 32]) -> Id {
    let mut bytes = Vec::with_capacity(18 + 20 + 32);
    bytes.extend_from_slice(b"peerstore-manifest");
    bytes.extend_from_slice(&owner.0);
    bytes.extend_from_slice(file_id);
    Id::hash(&bytes)
}

/// Ring position of a user's transaction log (DESIGN.md): SHA-1 of the
/// signing key's SPKI DER followed by "-transaction-log".
pub fn txlog_position(signing_key_der: &[u8]) -> Id {
    let mut bytes = Vec::with_capacity(signing_key_der.len() + 16);
    bytes.extend_from_slice(signing_key_der);
    bytes.extend_from_slice(b"-transaction-log");
    Id::hash(&bytes)
}

// ---------------------------------------------------------------------------
// Encoding helpers and signed messages
// ---------------------------------------------------------------------------

fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("postcard encoding of record types into a Vec cannot fail")
}

fn encoded_size<T: Serialize + ?Sized>(value: &T) -> usize {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .expect("postcard size of record types cannot fail")
}

fn sha256<T: Serialize + ?Sized>(value: &T) -> [u8; 32] {
    Sha256::digest(encode(value)).into()
}

/// Bytes of postcard's varint encoding of `n` (an integer or a length).
fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// Bytes of postcard's encoding of a byte string: length prefix and bytes.
fn bytes_len(b: &[u8]) -> usize {
    varint_len(b.len() as u64) + b.len()
}

/// Bytes of a log's map key `(clock, client)`.
fn log_key_len(key: &(u64, u64)) -> usize {
    varint_len(key.0) + varint_len(key.1)
}

fn pubkey_msg(signing_key: &[u8], enc_key: &[u8]) -> Vec<u8> {
    encode(&(TAG_PUBKEY, signing_key, enc_key))
}

fn acl_msg(position: Id, epoch: u64, writers: &[UserId], readers: &[AclEntry]) -> Vec<u8> {
    encode(&(TAG_ACL, position, epoch, writers, readers))
}

fn manifest_msg(position: Id, acl_digest: &[u8; 32], version: &Version, body: &[u8]) -> Vec<u8> {
    encode(&(TAG_MANIFEST, position, acl_digest, version, body))
}

fn tx_entry_msg(log_position: Id, clock: u64, client: u64, body: &[u8]) -> Vec<u8> {
    encode(&(TAG_TX_ENTRY, log_position, clock, client, body))
}

// ---------------------------------------------------------------------------
// Constructors that sign
// ---------------------------------------------------------------------------

/// The signer's public key record, with `enc_key_der` (SPKI DER, may be
/// empty) as the encryption key.
pub fn new_pubkey_record(
    rng: &mut (impl CryptoRngCore + ?Sized),
    signer: &Signer,
    enc_key_der: Vec<u8>,
) -> Record {
    let signing_key = signer.public_der().to_vec();
    let sig = signer.sign(rng, &pubkey_msg(&signing_key, &enc_key_der));
    Record::PubKey(PubKeyRecord {
        signing_key,
        enc_key: enc_key_der,
        sig,
    })
}

/// An ACL signed by `owner` for the manifest at `position` (see
/// [`manifest_position`]). Writers and readers are sorted and de-duplicated
/// (the first entry for a reader is kept).
pub fn new_acl(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Signer,
    position: Id,
    epoch: u64,
    writers: Vec<UserId>,
    readers: Vec<AclEntry>,
) -> Acl {
    let mut acls = new_acls(rng, owner, vec![(position, epoch, writers, readers)]);
    acls.pop().expect("one ACL asked, one made")
}

/// What [`new_acls`] makes an ACL of: `(manifest position, epoch, writers,
/// readers)`.
pub type AclParts = (Id, u64, Vec<UserId>, Vec<AclEntry>);

/// What [`new_manifests`] makes a manifest of: `(owner key, file id, acl,
/// clock, body)`.
pub type ManifestParts = (Vec<u8>, [u8; 32], Acl, u64, Vec<u8>);

/// [`new_acl`] for many manifests at once, with one batch signature
/// ([`Signer::sign_batch`]).
pub fn new_acls(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Signer,
    items: Vec<AclParts>,
) -> Vec<Acl> {
    let mut acls = Vec::with_capacity(items.len());
    let mut msgs = Vec::with_capacity(items.len());
    for (position, epoch, mut writers, mut readers) in items {
        writers.sort();
        writers.dedup();
        readers.sort_by_key(|e| e.user);
        readers.dedup_by(|later, first| later.user == first.user);
        msgs.push(acl_msg(position, epoch, &writers, &readers));
        acls.push(Acl {
            epoch,
            writers,
            readers,
            sig: Vec::new(),
        });
    }
    for (acl, sig) in acls.iter_mut().zip(owner.sign_batch(rng, &msgs)) {
        acl.sig = sig;
    }
    acls
}

/// A manifest version `clock` written by `signer` (the owner or a writer on
/// `acl`). The version's writer is the signer's user id.
pub fn new_manifest(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner_key_der: Vec<u8>,
    file_id: [u8; 32],
    acl: Acl,
    clock: u64,
    signer: &Signer,
    body: Vec<u8>,
) -> Record {
    let mut ms = new_manifests(
        rng,
        signer,
        vec![(owner_key_der, file_id, acl, clock, body)],
    );
    Record::Manifest(ms.pop().expect("one manifest asked, one made"))
}

/// [`new_manifest`] for many manifests at once, with one batch signature
/// ([`Signer::sign_batch`]).
pub fn new_manifests(
    rng: &mut (impl CryptoRngCore + ?Sized),
    signer: &Signer,
    items: Vec<ManifestParts>,
) -> Vec<Manifest> {
    let mut ms = Vec::with_capacity(items.len());
    let mut msgs = Vec::with_capacity(items.len());
    for (owner_key, file_id, acl, clock, body) in items {
        let position = manifest_position(user_id(&owner_key), &file_id);
        let version = Version {
            clock,
            writer: signer.user_id(),
        };
        msgs.push(manifest_msg(position, &acl.digest(), &version, &body));
        ms.push(Manifest {
            owner_key,
            file_id,
            acl,
            version,
            signer_key: signer.public_der().to_vec(),
            body,
            sig: Vec::new(),
        });
    }
    for (m, sig) in ms.iter_mut().zip(signer.sign_batch(rng, &msgs)) {
        m.sig = sig;
    }
    ms
}

/// An empty transaction log for `owner`; add entries with [`TxLog::insert`]
/// and wrap with `Record::from`.
pub fn new_txlog(owner: &Signer) -> TxLog {
    TxLog {
        owner_key: owner.public_der().to_vec(),
        entries: BTreeMap::new(),
    }
}

/// A transaction log entry signed by `owner` for the owner's log.
pub fn new_tx_entry(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Signer,
    clock: u64,
    client: u64,
    body: Vec<u8>,
) -> TxEntry {
    let position = txlog_position(owner.public_der());
    let sig = owner.sign(rng, &tx_entry_msg(position, clock, client, &body));
    TxEntry {
        clock,
        client,
        body,
        sig,
    }
}

/// [`new_tx_entry`] for many entries at once, `(clock, client, body)`
/// each, with one batch signature ([`Signer::sign_batch`]).
pub fn new_tx_entries(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Signer,
    items: Vec<(u64, u64, Vec<u8>)>,
) -> Vec<TxEntry> {
    let position = txlog_position(owner.public_der());
    let msgs: Vec<Vec<u8>> = items
        .iter()
        .map(|(clock, client, body)| tx_entry_msg(position, *clock, *client, body))
        .collect();
    let sigs = owner.sign_batch(rng, &msgs);
    items
        .into_iter()
        .zip(sigs)
        .map(|((clock, client, body), sig)| TxEntry {
            clock,
            client,
            body,
            sig,
        })
        .collect()
}

/// A log record for `owner` holding `entries` (merged by the log's rule).
pub fn new_txlog_record(
    owner: &Signer,
    entries: impl IntoIterator<Item = TxEntry>,
) -> Result<Record, RecordError> {
    let mut log = new_txlog(owner);
    for entry in entries {
        log.insert(entry)?;
    }
    Ok(Record::TxLog(log))
}

// ---------------------------------------------------------------------------
// Per-kind behaviour
// ---------------------------------------------------------------------------

impl Acl {
    /// SHA-256 of the ACL's encoding (signature included); manifests sign it.
    pub fn digest(&self) -> [u8; 32] {
        sha256(self)
    }

    /// `user` may sign versions under this ACL (the owner always may).
    pub fn allows_writer(&self, user: &UserId) -> bool {
        self.writers.binary_search(user).is_ok()
    }

    /// The reader entry for `user`, if any.
    pub fn reader(&self, user: &UserId) -> Option<&AclEntry> {
        self.readers
            .binary_search_by(|e| e.user.cmp(user))
            .ok()
            .map(|i| &self.readers[i])
    }

    fn check_canonical(&self) -> Result<(), RecordError> {
        if !self.writers.windows(2).all(|w| w[0] < w[1]) {
            return Err(RecordError::Malformed("ACL writers not strictly ascending"));
        }
        if !self.readers.windows(2).all(|w| w[0].user < w[1].user) {
            return Err(RecordError::Malformed("ACL readers not strictly ascending"));
        }
        Ok(())
    }
}

impl Manifest {
    /// The owner's user id.
    pub fn owner_id(&self) -> UserId {
        user_id(&self.owner_key)
    }

    /// Ring position: [`manifest_position`] of owner and file id.
    pub fn position(&self) -> Id {
        manifest_position(self.owner_id(), &self.file_id)
    }

    /// The merge order before the digest tie-break: `(epoch, clock, writer)`.
    pub fn order_key(&self) -> (u64, Version) {
        (self.acl.epoch, self.version)
    }

    fn verify(&self, min_bits: usize) -> Result<(), RecordError> {
        let owner_key = parse_public_key(&self.owner_key, min_bits)?;
        let position = self.position();
        self.acl.check_canonical()?;
        verify_parsed(
            &owner_key,
            &acl_msg(
                position,
                self.acl.epoch,
                &self.acl.writers,
                &self.acl.readers,
            ),
            &self.acl.sig,
        )?;
        let is_owner = self.signer_key == self.owner_key;
        let signer = user_id(&self.signer_key);
        if !is_owner && !self.acl.allows_writer(&signer) {
            return Err(RecordError::NotAllowed);
        }
        let signer_key = if is_owner {
            owner_key
        } else {
            parse_public_key(&self.signer_key, min_bits)?
        };
        verify_parsed(
            &signer_key,
            &manifest_msg(position, &self.acl.digest(), &self.version, &self.body),
            &self.sig,
        )?;
        // Signed, so only the signer could have put a wrong writer here; still
        // refused so nobody can borrow another writer's id for tie-breaks.
        if self.version.writer != signer {
            return Err(RecordError::Malformed("version writer is not the signer"));
        }
        Ok(())
    }
}

impl TxEntry {
    /// SHA-256 of the entry's encoding: the tie-break between two different
    /// entries under one `(clock, client)`.
    pub fn digest(&self) -> [u8; 32] {
        sha256(self)
    }

    /// Encoded size, by arithmetic (a test checks it against postcard).
    fn encoded_len(&self) -> usize {
        varint_len(self.clock)
            + varint_len(self.client)
            + bytes_len(&self.body)
            + bytes_len(&self.sig)
    }
}

impl TxLog {
    /// Ring position: [`txlog_position`] of the owner key.
    pub fn position(&self) -> Id {
        txlog_position(&self.owner_key)
    }

    /// Adds one entry (already signed by the owner, see [`new_tx_entry`]) by
    /// the merge rule; `Ok(true)` when the log changed. Refuses with
    /// [`RecordError::TooLarge`] (log unchanged) past the limits.
    pub fn insert(&mut self, entry: TxEntry) -> Result<bool, RecordError> {
        if entry.body.len() > MAX_TX_ENTRY_BODY {
            return Err(RecordError::TooLarge);
        }
        let mut entries = BTreeMap::new();
        entries.insert((entry.clock, entry.client), entry);
        self.merge_entries(entries)
    }

    /// Encoded size of the log as a [`Record`] (what the byte limit bounds).
    ///
    /// Computed from lengths rather than by walking the bytes, so growing a
    /// full log one entry at a time stays cheap.
    fn record_len(&self) -> usize {
        // One byte of enum discriminant, then the log.
        let entries: usize = self
            .entries
            .iter()
            .map(|(k, e)| log_key_len(k) + e.encoded_len())
            .sum();
        1 + bytes_len(&self.owner_key) + varint_len(self.entries.len() as u64) + entries
    }

    fn check_limits(&self) -> Result<(), RecordError> {
        if self.entries.len() > MAX_TXLOG_ENTRIES {
            return Err(RecordError::TooLarge);
        }
        if self
            .entries
            .values()
            .any(|e| e.body.len() > MAX_TX_ENTRY_BODY)
        {
            return Err(RecordError::TooLarge);
        }
        if self.record_len() > MAX_TXLOG_BYTES {
            return Err(RecordError::TooLarge);
        }
        Ok(())
    }

    /// Verifies the log, skipping entries equal to ones in `known` (a log
    /// under the same owner key this replica already verified).
    fn verify_skipping(&self, known: Option<&TxLog>, min_bits: usize) -> Result<(), RecordError> {
        self.check_limits()?;
        for (key, entry) in &self.entries {
            if *key != (entry.clock, entry.client) {
                return Err(RecordError::Malformed(
                    "log key differs from the entry's clock and client",
                ));
            }
        }
        let owner_key = parse_public_key(&self.owner_key, min_bits)?;
        let known = known.filter(|k| k.owner_key == self.owner_key);
        let position = self.position();
        for (key, entry) in &self.entries {
            if known.and_then(|k| k.entries.get(key)) == Some(entry) {
                continue;
            }
            verify_parsed(
                &owner_key,
                &tx_entry_msg(position, entry.clock, entry.client, &entry.body),
                &entry.sig,
            )?;
        }
        Ok(())
    }

    /// Union with `incoming`; all or nothing under the limits.
    fn merge_entries(
        &mut self,
        incoming: BTreeMap<(u64, u64), TxEntry>,
    ) -> Result<bool, RecordError> {
        let mut changes = Vec::new();
        let mut added = 0usize;
        let mut add_bytes = 0usize;
        let mut remove_bytes = 0usize;
        for (key, entry) in incoming {
            match self.entries.get(&key) {
                None => {
                    added += 1;
                    add_bytes += log_key_len(&key) + entry.encoded_len();
                    changes.push((key, entry));
                }
                Some(old) if *old == entry => {}
                Some(old) => {
                    if entry.digest() < old.digest() {
                        remove_bytes += old.encoded_len();
                        add_bytes += entry.encoded_len();
                        changes.push((key, entry));
                    }
                }
            }
        }
        if changes.is_empty() {
            return Ok(false);
        }
        let count = self.entries.len() + added;
        if count > MAX_TXLOG_ENTRIES {
            return Err(RecordError::TooLarge);
        }
        let len = self.record_len() - varint_len(self.entries.len() as u64)
            + varint_len(count as u64)
            + add_bytes
            - remove_bytes;
        if len > MAX_TXLOG_BYTES {
            return Err(RecordError::TooLarge);
        }
        self.entries.extend(changes);
        debug_assert_eq!(self.entries.len(), count);
        Ok(true)
    }
}

// ---------------------------------------------------------------------------
// Record
// ---------------------------------------------------------------------------

impl Record {
    /// The ring position, derived from the contents.
    pub fn position(&self) -> Id {
        match self {
            Record::PubKey(r) => pubkey_position(&r.signing_key),
            Record::Manifest(m) => m.position(),
            Record::TxLog(l) => l.position(),
        }
    }

    /// A short name of the kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::PubKey(_) => "pubkey",
            Record::Manifest(_) => "manifest",
            Record::TxLog(_) => "txlog",
        }
    }

    /// The owner's user id: the key holder for a public key record, the
    /// owner of a manifest or log.
    pub fn owner(&self) -> UserId {
        match self {
            Record::PubKey(r) => user_id(&r.signing_key),
            Record::Manifest(m) => m.owner_id(),
            Record::TxLog(l) => user_id(&l.owner_key),
        }
    }

    /// Full, self-contained validation: every signature, key sizes
    /// (`min_bits`, see [`verify`]), size limits and the binding of every
    /// signature to the record's position. A record that passes is valid at
    /// every replica regardless of what else the replica holds. Never panics.
    pub fn verify(&self, min_bits: usize) -> Result<(), RecordError> {
        self.verify_given(None, min_bits)
    }

    /// [`Record::verify`], trusting what `known` already holds: entries of a
    /// transaction log equal to entries of `known` are not re-checked, and a
    /// record equal to `known` passes at once. `known` must be a record this
    /// replica verified itself under the same `min_bits`; the result is then
    /// the same as `verify`, for a fraction of the RSA work when a log grows.
    pub fn verify_given(&self, known: Option<&Record>, min_bits: usize) -> Result<(), RecordError> {
        if known == Some(self) {
            return Ok(());
        }
        match self {
            Record::PubKey(r) => {
                if self.encoded_len() > MAX_RECORD_BYTES {
                    return Err(RecordError::TooLarge);
                }
                let key = parse_public_key(&r.signing_key, min_bits)?;
                if !r.enc_key.is_empty() {
                    parse_public_key(&r.enc_key, min_bits)?;
                }
                verify_parsed(&key, &pubkey_msg(&r.signing_key, &r.enc_key), &r.sig)
            }
            Record::Manifest(m) => {
                if self.encoded_len() > MAX_RECORD_BYTES {
                    return Err(RecordError::TooLarge);
                }
                m.verify(min_bits)
            }
            Record::TxLog(l) => {
                let known = match known {
                    Some(Record::TxLog(k)) => Some(k),
                    _ => None,
                };
                l.verify_skipping(known, min_bits)
            }
        }
    }

    /// Merges `incoming` (already verified) into `self` by the kind's rule;
    /// `Ok(true)` when `self` changed. On any error `self` is unchanged.
    ///
    /// * different kinds or positions: [`RecordError::Mismatch`];
    /// * public keys: a different signing key is [`RecordError::KeyTaken`]
    ///   (first registration wins; checked before the position, so a
    ///   mis-filed record for another id is refused the same way);
    /// * manifests: greater `(acl.epoch, version.clock, version.writer)` wins,
    ///   equal keys resolve to the smaller digest;
    /// * logs: union; past the limits [`RecordError::TooLarge`].
    pub fn merge(&mut self, incoming: Record) -> Result<bool, RecordError> {
        if let (Record::PubKey(a), Record::PubKey(b)) = (&*self, &incoming) {
            if a.signing_key != b.signing_key {
                return Err(RecordError::KeyTaken);
            }
        }
        if self.kind() != incoming.kind() || self.position() != incoming.position() {
            return Err(RecordError::Mismatch);
        }
        match (self, incoming) {
            (Record::PubKey(a), Record::PubKey(b)) => {
                if *a == b {
                    return Ok(false);
                }
                if sha256(&RecordRef::PubKey(&b)) < sha256(&RecordRef::PubKey(a)) {
                    *a = b;
                    return Ok(true);
                }
                Ok(false)
            }
            (Record::Manifest(a), Record::Manifest(b)) => {
                if a.owner_key != b.owner_key || a.file_id != b.file_id {
                    return Err(RecordError::Mismatch);
                }
                let wins = match b.order_key().cmp(&a.order_key()) {
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Less => false,
                    std::cmp::Ordering::Equal => {
                        *a != b
                            && sha256(&RecordRef::Manifest(&b)) < sha256(&RecordRef::Manifest(a))
                    }
                };
                if wins {
                    *a = b;
                }
                Ok(wins)
            }
            (Record::TxLog(a), Record::TxLog(b)) => {
                if a.owner_key != b.owner_key {
                    return Err(RecordError::Mismatch);
                }
                a.merge_entries(b.entries)
            }
            _ => Err(RecordError::Mismatch),
        }
    }

    /// SHA-256 of the canonical encoding: equal digests iff equal records.
    pub fn digest(&self) -> [u8; 32] {
        sha256(self)
    }

    /// Length of [`Record::encode`]'s output, computed without allocating.
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::TxLog(l) => l.record_len(),
            _ => encoded_size(self),
        }
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes the canonical encoding, refusing trailing bytes and any
    /// non-canonical form (so one record has exactly one encoding). Does not
    /// verify: call [`Record::verify`]. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        if bytes.len() > MAX_ENCODED_BYTES {
            return Err(RecordError::TooLarge);
        }
        let (record, rest) = postcard::take_from_bytes::<Record>(bytes)
            .map_err(|_| RecordError::Malformed("undecodable record"))?;
        if !rest.is_empty() {
            return Err(RecordError::Malformed("trailing bytes after record"));
        }
        if record.encoded_len() != bytes.len() || record.encode() != bytes {
            return Err(RecordError::Malformed("non-canonical encoding"));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::sync::OnceLock;

    /// The key size most tests use, with `min_bits` set to match.
    const TEST_BITS: usize = 1024;

    /// Test keys, generated once per process from fixed seeds.
    fn key(i: usize) -> &'static Signer {
        const N: usize = 6;
        static KEYS: [OnceLock<Signer>; N] = [const { OnceLock::new() }; N];
        KEYS[i].get_or_init(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(0x5eed_0000 + i as u64);
            Signer::generate(&mut rng, TEST_BITS).expect("test key")
        })
    }

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    const FILE: [u8; 32] = [7; 32];

    fn owner() -> &'static Signer {
        key(0)
    }
    fn writer() -> &'static Signer {
        key(1)
    }
    fn stranger() -> &'static Signer {
        key(2)
    }

    fn position() -> Id {
        manifest_position(owner().user_id(), &FILE)
    }

    fn acl(epoch: u64, writers: Vec<UserId>) -> Acl {
        let readers = vec![AclEntry {
            user: key(3).user_id(),
            wrapped_key: vec![1, 2, 3],
        }];
        new_acl(
            &mut rng(epoch),
            owner(),
            position(),
            epoch,
            writers,
            readers,
        )
    }

    fn manifest(acl: &Acl, clock: u64, signer: &Signer, body: &[u8]) -> Record {
        new_manifest(
            &mut rng(clock ^ 0xabc),
            owner().public_der().to_vec(),
            FILE,
            acl.clone(),
            clock,
            signer,
            body.to_vec(),
        )
    }

    fn as_manifest(r: &mut Record) -> &mut Manifest {
        match r {
            Record::Manifest(m) => m,
            _ => panic!("not a manifest"),
        }
    }

    fn as_log(r: &mut Record) -> &mut TxLog {
        match r {
            Record::TxLog(l) => l,
            _ => panic!("not a log"),
        }
    }

    fn entry(clock: u64, client: u64, body: &[u8]) -> TxEntry {
        new_tx_entry(
            &mut rng(clock.wrapping_mul(1000).wrapping_add(client)),
            owner(),
            clock,
            client,
            body.to_vec(),
        )
    }

    // -- keys and signatures ------------------------------------------------

    #[test]
    fn signer_debug_hides_key_material() {
        let s = format!("{:?}", owner());
        assert!(s.starts_with("Signer"), "{s}");
        assert!(s.len() < 200, "{s}");
        assert!(!s.contains("BigUint") && !s.contains("primes"), "{s}");
    }

    /// `ring`'s signatures are the same RSA-PSS(SHA-256) the rsa crate
    /// verifies, single and batched; a key `ring` refuses (1024 bits, the
    /// tests' size) keeps signing with the rsa crate.
    #[test]
    fn signatures_made_with_ring_verify_like_any_other() {
        let key = RsaPrivateKey::new(&mut RngRef(&mut rng(40)), 2048).unwrap();
        let fast = Signer::from_private_key(key).with_os_random();
        assert!(fast.signs_with_os_random());
        let sig = fast.sign(&mut rng(41), b"message");
        assert_eq!(sig.len(), 256);
        assert_eq!(verify(fast.public_der(), b"message", &sig, 2048), Ok(()));
        assert_eq!(
            verify(fast.public_der(), b"messagE", &sig, 2048),
            Err(RecordError::BadSignature)
        );
        let msgs = [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()];
        for (m, sig) in msgs.iter().zip(fast.sign_batch(&mut rng(42), &msgs)) {
            assert_eq!(verify(fast.public_der(), m, &sig, 2048), Ok(()));
        }
        // The salt is fresh each time: two signatures of one message differ.
        assert_ne!(fast.sign(&mut rng(41), b"m"), fast.sign(&mut rng(41), b"m"));

        let small = owner().clone().with_os_random();
        assert!(!small.signs_with_os_random());
        let sig = small.sign(&mut rng(43), b"message");
        assert_eq!(sig, owner().sign(&mut rng(43), b"message"), "still seeded");
        assert_eq!(verify(small.public_der(), b"message", &sig, 1024), Ok(()));
    }

    #[test]
    fn verify_rejects_junk_without_panicking() {
        let msg = b"hello";
        let sig = owner().sign(&mut rng(1), msg);
        assert_eq!(verify(owner().public_der(), msg, &sig, TEST_BITS), Ok(()));
        assert_eq!(
            verify(owner().public_der(), b"hellO", &sig, TEST_BITS),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            verify(owner().public_der(), msg, &[], TEST_BITS),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            verify(owner().public_der(), msg, &[0xff; 128], TEST_BITS),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            verify(owner().public_der(), msg, &[0xff; 5000], TEST_BITS),
            Err(RecordError::BadSignature)
        );
        assert_eq!(verify(&[], msg, &sig, TEST_BITS), Err(RecordError::BadKey));
        assert_eq!(
            verify(&[0x30, 0x82, 0xff, 0xff], msg, &sig, TEST_BITS),
            Err(RecordError::BadKey)
        );
        assert_eq!(
            verify(&[0u8; 4096], msg, &sig, TEST_BITS),
            Err(RecordError::BadKey)
        );
        // Even a caller asking for no minimum gets the absolute floor.
        assert_eq!(verify(owner().public_der(), msg, &sig, 0), Ok(()));
        assert_eq!(
            verify(owner().public_der(), msg, &sig, MIN_KEY_BITS_DEFAULT),
            Err(RecordError::WeakKey)
        );
        let mut rng = rng(2);
        assert_eq!(
            Signer::generate(&mut rng, 512).err(),
            Some(RecordError::WeakKey)
        );
        assert_eq!(
            Signer::generate(&mut rng, 8192).err(),
            Some(RecordError::BadKey)
        );
    }

    #[test]
    fn dyn_rng_can_sign() {
        let mut chacha = rng(3);
        let dyn_rng: &mut dyn CryptoRngCore = &mut chacha;
        let sig = owner().sign(dyn_rng, b"m");
        assert_eq!(verify(owner().public_der(), b"m", &sig, TEST_BITS), Ok(()));
    }

    /// Keys of 2048 bits and more are checked by ring's verifier, smaller
    /// ones by the rsa crate's. Both accept what either signer made, and
    /// both refuse any other message or any changed signature byte.
    #[test]
    fn both_verifiers_agree_on_what_both_signers_make() {
        let rsa_crate = |key: &Signer, msg: &[u8], sig: &[u8]| -> bool {
            let v = parse_public_key(key.public_der(), ABSOLUTE_MIN_KEY_BITS).expect("key");
            Signature::try_from(sig).is_ok_and(|s| v.verify(msg, &s).is_ok())
        };
        let big = Signer::generate(&mut rng(3072), 2048).expect("2048-bit key");
        for signer in [big.clone(), big.with_os_random(), owner().clone()] {
            let sig = signer.sign(&mut rng(9), b"the message");
            assert_eq!(
                verify(signer.public_der(), b"the message", &sig, TEST_BITS),
                Ok(())
            );
            assert!(rsa_crate(&signer, b"the message", &sig));
            for (msg, at) in [(&b"the message"[..], sig.len() / 2), (b"another", 0)] {
                let mut bad = sig.clone();
                if msg == b"the message" {
                    bad[at] ^= 1;
                }
                assert_eq!(
                    verify(signer.public_der(), msg, &bad, TEST_BITS),
                    Err(RecordError::BadSignature)
                );
                assert!(!rsa_crate(&signer, msg, &bad));
            }
        }
    }

    /// The production policy: 2048-bit keys pass, 1024-bit keys are weak.
    #[test]
    fn default_policy_at_2048_bits_rejects_1024() {
        let big = Signer::generate(&mut rng(2048), 2048).expect("2048-bit key");
        assert_eq!(big.bits(), 2048);
        let good = new_pubkey_record(&mut rng(4), &big, Vec::new());
        assert_eq!(good.verify(MIN_KEY_BITS_DEFAULT), Ok(()));
        let weak = new_pubkey_record(&mut rng(5), owner(), Vec::new());
        assert_eq!(weak.verify(MIN_KEY_BITS_DEFAULT), Err(RecordError::WeakKey));
        // A 2048-bit record whose encryption key is weak is refused too.
        let weak_enc = new_pubkey_record(&mut rng(6), &big, owner().public_der().to_vec());
        assert_eq!(
            weak_enc.verify(MIN_KEY_BITS_DEFAULT),
            Err(RecordError::WeakKey)
        );
        // A manifest written by a weak writer under a strong owner.
        let pos = manifest_position(big.user_id(), &FILE);
        let acl = new_acl(&mut rng(7), &big, pos, 1, vec![owner().user_id()], vec![]);
        let m = new_manifest(
            &mut rng(8),
            big.public_der().to_vec(),
            FILE,
            acl.clone(),
            1,
            &big,
            b"x".to_vec(),
        );
        assert_eq!(m.verify(MIN_KEY_BITS_DEFAULT), Ok(()));
        let m = new_manifest(
            &mut rng(9),
            big.public_der().to_vec(),
            FILE,
            acl,
            2,
            owner(),
            b"x".to_vec(),
        );
        assert_eq!(m.verify(MIN_KEY_BITS_DEFAULT), Err(RecordError::WeakKey));
        assert_eq!(m.verify(TEST_BITS), Ok(()));
    }

    // -- public key records -------------------------------------------------

    #[test]
    fn pubkey_record_verifies_and_roundtrips() {
        let r = new_pubkey_record(&mut rng(10), owner(), key(5).public_der().to_vec());
        assert_eq!(r.verify(TEST_BITS), Ok(()));
        assert_eq!(r.kind(), "pubkey");
        assert_eq!(r.position(), owner().user_id());
        assert_eq!(r.position(), pubkey_position(owner().public_der()));
        assert_eq!(r.owner(), owner().user_id());
        let bytes = r.encode();
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(Record::decode(&bytes), Ok(r.clone()));
        assert_eq!(r.digest(), <[u8; 32]>::from(Sha256::digest(&bytes)));
        // Without an encryption key is fine too.
        let r = new_pubkey_record(&mut rng(11), owner(), Vec::new());
        assert_eq!(r.verify(TEST_BITS), Ok(()));
    }

    #[test]
    fn pubkey_first_registration_wins() {
        let first = new_pubkey_record(&mut rng(12), owner(), Vec::new());
        let mut held = first.clone();
        let other = new_pubkey_record(&mut rng(13), stranger(), Vec::new());
        assert_eq!(held.merge(other.clone()), Err(RecordError::KeyTaken));
        assert_eq!(held, first);
        // Even when someone files it under the first key's position: a record
        // claiming the owner's key but signed by another key does not verify.
        let Record::PubKey(mut forged) = other else {
            unreachable!()
        };
        forged.signing_key = owner().public_der().to_vec();
        let forged = Record::PubKey(forged);
        assert_eq!(forged.position(), first.position());
        assert_eq!(forged.verify(TEST_BITS), Err(RecordError::BadSignature));
        // Re-registering the same key converges whatever the order.
        let again = new_pubkey_record(&mut rng(14), owner(), Vec::new());
        let (mut a, mut b) = (first.clone(), again.clone());
        a.merge(again).unwrap();
        b.merge(first).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.clone().merge(a.clone()), Ok(false));
    }

    #[test]
    fn pubkey_tampering_is_caught() {
        let Record::PubKey(good) =
            new_pubkey_record(&mut rng(15), owner(), key(5).public_der().to_vec())
        else {
            unreachable!()
        };
        let mut r = good.clone();
        r.enc_key = key(4).public_der().to_vec();
        assert_eq!(
            Record::PubKey(r).verify(TEST_BITS),
            Err(RecordError::BadSignature)
        );
        let mut r = good.clone();
        r.enc_key = b"not a key".to_vec();
        assert_eq!(
            Record::PubKey(r).verify(TEST_BITS),
            Err(RecordError::BadKey)
        );
        let mut r = good.clone();
        r.sig.clear();
        assert_eq!(
            Record::PubKey(r).verify(TEST_BITS),
            Err(RecordError::BadSignature)
        );
        let mut r = good;
        r.enc_key = vec![0; MAX_RECORD_BYTES];
        assert_eq!(
            Record::PubKey(r).verify(TEST_BITS),
            Err(RecordError::TooLarge)
        );
    }

    // -- manifests ----------------------------------------------------------

    #[test]
    fn manifest_owner_and_writers_may_sign_others_may_not() {
        let acl1 = acl(1, vec![writer().user_id()]);
        let by_owner = manifest(&acl1, 1, owner(), b"v1");
        assert_eq!(by_owner.verify(TEST_BITS), Ok(()));
        assert_eq!(by_owner.kind(), "manifest");
        assert_eq!(by_owner.position(), position());
        assert_eq!(by_owner.owner(), owner().user_id());
        let by_writer = manifest(&acl1, 2, writer(), b"v2");
        assert_eq!(by_writer.verify(TEST_BITS), Ok(()));
        let by_stranger = manifest(&acl1, 3, stranger(), b"v3");
        assert_eq!(by_stranger.verify(TEST_BITS), Err(RecordError::NotAllowed));
        assert!(acl1.reader(&key(3).user_id()).is_some());
        assert!(acl1.reader(&key(4).user_id()).is_none());
    }

    #[test]
    fn batch_signatures_verify_each_message_and_nothing_else() {
        let msgs: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + i as usize]).collect();
        let sigs = owner().sign_batch(&mut rng(40), &msgs);
        assert_eq!(sigs.len(), 5);
        let pk = owner().public_der();
        for (i, sig) in sigs.iter().enumerate() {
            assert!(
                sig.len() > TEST_BITS / 8,
                "a batch signature is longer than a plain one"
            );
            assert_eq!(verify(pk, &msgs[i], sig, TEST_BITS), Ok(()));
            // Another message of the batch, another key, a flipped byte
            // anywhere, a byte more or less: refused.
            assert_eq!(
                verify(pk, &msgs[(i + 1) % 5], sig, TEST_BITS),
                Err(RecordError::BadSignature)
            );
            assert_eq!(
                verify(writer().public_der(), &msgs[i], sig, TEST_BITS),
                Err(RecordError::BadSignature)
            );
            for at in (0..sig.len()).step_by(7) {
                let mut bad = sig.clone();
                bad[at] ^= 0x20;
                assert!(verify(pk, &msgs[i], &bad, TEST_BITS).is_err(), "byte {at}");
            }
            let mut longer = sig.clone();
            longer.push(0);
            assert!(verify(pk, &msgs[i], &longer, TEST_BITS).is_err());
            assert!(verify(pk, &msgs[i], &sig[..sig.len() - 1], TEST_BITS).is_err());
        }
        // The root signature alone is no signature of any message, nor of
        // the root message taken for a plain one's message.
        let b: BatchSig = postcard::from_bytes(&sigs[0]).expect("decodes");
        for m in &msgs {
            assert_eq!(
                verify(pk, m, &b.sig, TEST_BITS),
                Err(RecordError::BadSignature)
            );
        }
        // A lone message gets a plain signature; a one-leaf "batch" is
        // refused even though its proof is trivially right.
        let one = owner().sign_batch(&mut rng(41), &[b"alone"]);
        assert_eq!(one[0].len(), TEST_BITS / 8);
        assert_eq!(verify(pk, b"alone", &one[0], TEST_BITS), Ok(()));
        let lone = BatchSig {
            count: 1,
            index: 0,
            path: vec![],
            sig: owner().sign(&mut rng(42), &batch_root_msg(1, &merkle::leaf(b"alone"))),
        };
        assert_eq!(
            verify(pk, b"alone", &encode(&lone), TEST_BITS),
            Err(RecordError::BadSignature)
        );
    }

    #[test]
    fn log_entries_signed_in_a_batch_verify_and_stay_bound_to_their_place() {
        let items = (1..=4u64).map(|c| (c, 9, vec![c as u8; 20])).collect();
        let entries = new_tx_entries(&mut rng(70), owner(), items);
        let log = new_txlog_record(owner(), entries.clone()).expect("log");
        assert_eq!(log.verify(TEST_BITS), Ok(()));
        // An entry's signature on another entry's body: refused.
        let mut swapped = entries.clone();
        swapped[0].body = swapped[1].body.clone();
        let bad = new_txlog_record(owner(), swapped).expect("log");
        assert_eq!(bad.verify(TEST_BITS), Err(RecordError::BadSignature));
    }

    #[test]
    fn manifests_and_acls_signed_in_a_batch_are_records_like_any_other() {
        let files: Vec<[u8; 32]> = (0..3u8).map(|i| [i; 32]).collect();
        let acls = new_acls(
            &mut rng(50),
            owner(),
            files
                .iter()
                .map(|f| (manifest_position(owner().user_id(), f), 0, vec![], vec![]))
                .collect(),
        );
        let ms = new_manifests(
            &mut rng(51),
            owner(),
            files
                .iter()
                .zip(acls)
                .map(|(f, acl)| (owner().public_der().to_vec(), *f, acl, 1, f.to_vec()))
                .collect(),
        );
        for m in &ms {
            let r = Record::Manifest(m.clone());
            assert_eq!(r.verify(TEST_BITS), Ok(()));
            assert_eq!(Record::decode(&r.encode()), Ok(r.clone()));
        }
        // A manifest's signature does not carry over to its neighbour's
        // ACL and body, nor its ACL to the neighbour's position.
        let mut swapped = ms[0].clone();
        swapped.sig = ms[1].sig.clone();
        assert_eq!(
            Record::Manifest(swapped).verify(TEST_BITS),
            Err(RecordError::BadSignature)
        );
        let mut moved = ms[0].clone();
        moved.file_id = files[1];
        assert_eq!(
            Record::Manifest(moved).verify(TEST_BITS),
            Err(RecordError::BadSignature)
        );
    }

    #[test]
    fn manifest_tampering_is_caught() {
        let acl1 = acl(1, vec![writer().user_id()]);
        let good = manifest(&acl1, 5, writer(), b"body");
        let tamper = |f: &dyn Fn(&mut Manifest)| {
            let mut r = good.clone();
            f(as_manifest(&mut r));
            r.verify(TEST_BITS)
        };
        assert_eq!(tamper(&|_| {}), Ok(()));
        assert_eq!(tamper(&|m| m.body.push(0)), Err(RecordError::BadSignature));
        assert_eq!(
            tamper(&|m| m.version.clock += 1),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            tamper(&|m| m.version.writer = owner().user_id()),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            tamper(&|m| m.acl.epoch += 1),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            tamper(&|m| m.acl.readers[0].wrapped_key.push(9)),
            Err(RecordError::BadSignature)
        );
        // Adding oneself to the writers breaks the owner's ACL signature.
        assert_eq!(
            tamper(&|m| {
                m.acl.writers.push(stranger().user_id());
                m.acl.writers.sort();
            }),
            Err(RecordError::BadSignature)
        );
        // A validly re-signed ACL of the same epoch still breaks the writer's
        // signature, which covers the exact ACL.
        let resigned = new_acl(
            &mut rng(999),
            owner(),
            position(),
            1,
            acl1.writers.clone(),
            acl1.readers.clone(),
        );
        assert_ne!(resigned, acl1, "PSS signatures are randomised");
        let r = resigned.clone();
        assert_eq!(
            tamper(&move |m| m.acl = r.clone()),
            Err(RecordError::BadSignature)
        );
        // Moving it to another file changes the position every signature covers.
        assert_eq!(
            tamper(&|m| m.file_id[0] ^= 1),
            Err(RecordError::BadSignature)
        );
        // Claiming the owner signed it.
        assert_eq!(
            tamper(&|m| m.signer_key = owner().public_der().to_vec()),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            tamper(&|m| m.acl.writers.push(m.acl.writers[0])),
            Err(RecordError::Malformed("ACL writers not strictly ascending"))
        );
        assert_eq!(
            tamper(&|m| m.owner_key.pop().map(drop).unwrap()),
            Err(RecordError::BadKey)
        );
        assert_eq!(
            tamper(&|m| m.body = vec![0; MAX_RECORD_BYTES]),
            Err(RecordError::TooLarge)
        );
    }

    #[test]
    fn manifest_writer_must_be_the_signer() {
        // A writer who signs a version naming another writer is refused.
        let acl1 = acl(1, vec![writer().user_id(), stranger().user_id()]);
        let Record::Manifest(mut m) = manifest(&acl1, 1, writer(), b"x") else {
            unreachable!()
        };
        m.version.writer = stranger().user_id();
        m.sig = writer().sign(
            &mut rng(16),
            &manifest_msg(m.position(), &m.acl.digest(), &m.version, &m.body),
        );
        assert_eq!(
            Record::Manifest(m).verify(TEST_BITS),
            Err(RecordError::Malformed("version writer is not the signer"))
        );
    }

    #[test]
    fn manifest_merge_picks_newest() {
        let acl1 = acl(1, vec![writer().user_id()]);
        let v1 = manifest(&acl1, 1, owner(), b"v1");
        let v2 = manifest(&acl1, 2, writer(), b"v2");
        let mut held = v1.clone();
        assert_eq!(held.merge(v2.clone()), Ok(true));
        assert_eq!(held, v2);
        assert_eq!(held.merge(v1.clone()), Ok(false));
        assert_eq!(held, v2);
        assert_eq!(held.merge(v2.clone()), Ok(false));
        // Another file, another kind: refused, nothing changes.
        let other_file = new_manifest(
            &mut rng(17),
            owner().public_der().to_vec(),
            [8; 32],
            acl1.clone(),
            9,
            owner(),
            vec![],
        );
        assert_eq!(held.merge(other_file), Err(RecordError::Mismatch));
        let pk = new_pubkey_record(&mut rng(18), owner(), vec![]);
        assert_eq!(held.merge(pk.clone()), Err(RecordError::Mismatch));
        let mut pk2 = pk;
        assert_eq!(pk2.merge(v1), Err(RecordError::Mismatch));
        assert_eq!(held, v2);
    }

    #[test]
    fn revoked_writer_cannot_win() {
        let acl1 = acl(1, vec![writer().user_id()]);
        let acl2 = acl(2, vec![]);
        let revoking = manifest(&acl2, 3, owner(), b"after revoke");
        assert_eq!(revoking.verify(TEST_BITS), Ok(()));
        // The revoked writer keeps the old ACL and signs a huge clock.
        let late = manifest(&acl1, u64::MAX, writer(), b"evil");
        assert_eq!(late.verify(TEST_BITS), Ok(()), "valid under its own ACL");
        // Nor can it sign under the new ACL.
        assert_eq!(
            manifest(&acl2, 4, writer(), b"x").verify(TEST_BITS),
            Err(RecordError::NotAllowed)
        );
        let mut a = revoking.clone();
        assert_eq!(a.merge(late.clone()), Ok(false));
        let mut b = late;
        assert_eq!(b.merge(revoking.clone()), Ok(true));
        assert_eq!(a, revoking);
        assert_eq!(b, revoking);
    }

    /// A small universe of valid manifests: ordinary versions, a revocation,
    /// a revoked writer's late write and two equivocating versions.
    fn manifest_universe() -> &'static [Record] {
        static U: OnceLock<Vec<Record>> = OnceLock::new();
        U.get_or_init(|| {
            let acl1 = acl(1, vec![writer().user_id(), stranger().user_id()]);
            let acl1b = acl(1, vec![writer().user_id()]); // owner equivocates on epoch 1
            let acl2 = acl(2, vec![stranger().user_id()]);
            let all = vec![
                manifest(&acl1, 1, owner(), b"a"),
                manifest(&acl1, 2, writer(), b"b"),
                manifest(&acl1, 2, stranger(), b"c"),
                manifest(&acl1, 7, writer(), b"d"),
                manifest(&acl1, 7, writer(), b"d'"), // equivocation
                manifest(&acl1b, 7, writer(), b"d"), // same version, other ACL
                manifest(&acl2, 3, owner(), b"e"),
                manifest(&acl2, 4, stranger(), b"f"),
                manifest(&acl2, 4, stranger(), b"f'"),
                manifest(&acl1, 99, writer(), b"revoked"),
            ];
            for r in &all {
                r.verify(TEST_BITS).expect("universe record verifies");
            }
            all
        })
    }

    fn log_universe() -> &'static [TxEntry] {
        static U: OnceLock<Vec<TxEntry>> = OnceLock::new();
        U.get_or_init(|| {
            vec![
                entry(1, 1, b"a"),
                entry(1, 2, b"b"),
                entry(2, 1, b"c"),
                entry(2, 1, b"c'"), // same key, different entry
                entry(3, 7, b"d"),
                entry(3, 7, b""),
                entry(u64::MAX, u64::MAX, b"e"),
                entry(0, 0, b"f"),
            ]
        })
    }

    fn fold(records: impl IntoIterator<Item = Record>) -> Record {
        let mut it = records.into_iter();
        let mut acc = it.next().expect("non-empty");
        for r in it {
            acc.merge(r).expect("merge");
        }
        acc
    }

    // -- transaction logs ---------------------------------------------------

    #[test]
    fn txlog_verifies_and_refuses_bad_entries() {
        let good = new_txlog_record(owner(), [entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
        assert_eq!(good.verify(TEST_BITS), Ok(()));
        assert_eq!(good.kind(), "txlog");
        assert_eq!(good.position(), txlog_position(owner().public_der()));
        assert_eq!(Record::decode(&good.encode()), Ok(good.clone()));
        // An empty log is valid (and harmless: union with it changes nothing).
        assert_eq!(Record::from(new_txlog(owner())).verify(TEST_BITS), Ok(()));
        let check = |f: &dyn Fn(&mut TxLog)| {
            let mut r = good.clone();
            f(as_log(&mut r));
            r.verify(TEST_BITS)
        };
        // An entry signed by someone else.
        assert_eq!(
            check(&|l| {
                let e = new_tx_entry(&mut rng(19), stranger(), 5, 5, b"x".to_vec());
                l.entries.insert((5, 5), e);
            }),
            Err(RecordError::BadSignature)
        );
        // An entry of the owner's moved to another log (another owner key).
        assert_eq!(
            check(&|l| l.owner_key = stranger().public_der().to_vec()),
            Err(RecordError::BadSignature)
        );
        assert_eq!(
            check(&|l| l.entries.get_mut(&(1, 1)).unwrap().body.push(1)),
            Err(RecordError::BadSignature)
        );
        // An entry filed under a key that is not its own.
        assert_eq!(
            check(&|l| {
                let e = l.entries.remove(&(1, 1)).unwrap();
                l.entries.insert((1, 9), e);
            }),
            Err(RecordError::Malformed(
                "log key differs from the entry's clock and client"
            ))
        );
        // The bad entry cannot even be merged in through verify_given.
        let mut bad = good.clone();
        let e = new_tx_entry(&mut rng(20), stranger(), 6, 6, b"x".to_vec());
        as_log(&mut bad).entries.insert((6, 6), e);
        assert_eq!(
            bad.verify_given(Some(&good), TEST_BITS),
            Err(RecordError::BadSignature)
        );
        let mut grown = good.clone();
        as_log(&mut grown).insert(entry(9, 9, b"z")).unwrap();
        assert_eq!(grown.verify_given(Some(&good), TEST_BITS), Ok(()));
        assert_eq!(good.verify_given(Some(&good), TEST_BITS), Ok(()));
    }

    #[test]
    fn txlog_limits_are_enforced() {
        // Limits are checked before any signature, so unsigned fillers do.
        let filler = |clock: u64, len: usize| TxEntry {
            clock,
            client: 0,
            body: vec![0; len],
            sig: vec![0; 128],
        };
        let mut log = new_txlog(owner());
        for c in 0..MAX_TXLOG_ENTRIES as u64 {
            assert_eq!(log.insert(filler(c, 0)), Ok(true));
        }
        let full = log.clone();
        assert_eq!(log.insert(filler(u64::MAX, 0)), Err(RecordError::TooLarge));
        assert_eq!(log, full);
        // Replacing an existing key is not growth.
        let mut over = full.clone();
        over.entries.insert((u64::MAX, 0), filler(u64::MAX, 0));
        assert_eq!(
            Record::from(over.clone()).verify(TEST_BITS),
            Err(RecordError::TooLarge)
        );
        let mut held = Record::from(full.clone());
        assert_eq!(held.merge(Record::from(over)), Err(RecordError::TooLarge));
        assert_eq!(held, Record::from(full));

        // Entry body limit.
        let mut log = new_txlog(owner());
        assert_eq!(
            log.insert(filler(1, MAX_TX_ENTRY_BODY + 1)),
            Err(RecordError::TooLarge)
        );
        log.entries.insert((1, 0), filler(1, MAX_TX_ENTRY_BODY + 1));
        assert_eq!(
            Record::from(log).verify(TEST_BITS),
            Err(RecordError::TooLarge)
        );

        // Byte limit: big entries fill a mebibyte well before 4096 entries.
        let mut log = new_txlog(owner());
        let mut c = 0;
        loop {
            match log.insert(filler(c, MAX_TX_ENTRY_BODY)) {
                Ok(true) => c += 1,
                Err(RecordError::TooLarge) => {
                    assert_eq!(log.entries.len() as u64, c, "unchanged on refusal");
                    let held = Record::from(log.clone());
                    assert!(held.encoded_len() <= MAX_TXLOG_BYTES);
                    assert_eq!(held.encoded_len(), held.encode().len());
                    let mut over = log.clone();
                    over.entries.insert((c, 0), filler(c, MAX_TX_ENTRY_BODY));
                    assert!(Record::from(over.clone()).encoded_len() > MAX_TXLOG_BYTES);
                    assert_eq!(
                        Record::from(over).verify(TEST_BITS),
                        Err(RecordError::TooLarge)
                    );
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(c > 200 && c < 300, "{c}");
    }

    #[test]
    fn txlog_incremental_size_matches_encoding() {
        let mut log = new_txlog(owner());
        for (i, e) in log_universe().iter().enumerate() {
            log.insert(e.clone()).unwrap();
            // Vary lengths across varint boundaries too.
            log.insert(TxEntry {
                clock: 1000 + i as u64,
                client: 1 << (i * 9),
                body: vec![1; i * 40],
                sig: vec![2; 128],
            })
            .unwrap();
            assert_eq!(log.record_len(), Record::from(log.clone()).encode().len());
            assert_eq!(log.record_len(), encoded_size(&Record::from(log.clone())));
        }
        for n in [
            0u64,
            1,
            127,
            128,
            129,
            16383,
            16384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            assert_eq!(varint_len(n), encode(&n).len(), "{n}");
            assert_eq!(varint_len(n), encode(&(n as usize)).len(), "{n}");
        }
    }

    #[test]
    fn record_ref_encodes_like_record() {
        let pk = new_pubkey_record(&mut rng(21), owner(), vec![]);
        let Record::PubKey(p) = &pk else {
            unreachable!()
        };
        assert_eq!(encode(&RecordRef::PubKey(p)), pk.encode());
        let m = &manifest_universe()[0];
        let Record::Manifest(mm) = m else {
            unreachable!()
        };
        assert_eq!(encode(&RecordRef::Manifest(mm)), m.encode());
        let l = Record::from(new_txlog(owner()));
        let Record::TxLog(ll) = &l else {
            unreachable!()
        };
        assert_eq!(encode(&RecordRef::TxLog(ll)), l.encode());
    }

    #[test]
    fn decode_refuses_trailing_and_non_canonical_bytes() {
        let r = new_pubkey_record(&mut rng(22), owner(), vec![]);
        let mut bytes = r.encode();
        bytes.push(0);
        assert_eq!(
            Record::decode(&bytes),
            Err(RecordError::Malformed("trailing bytes after record"))
        );
        // The variant index 0 spelled as a two-byte varint.
        let mut long = vec![0x80, 0x00];
        long.extend_from_slice(&r.encode()[1..]);
        assert_eq!(
            Record::decode(&long),
            Err(RecordError::Malformed("non-canonical encoding"))
        );
        assert!(Record::decode(&[]).is_err());
        assert!(Record::decode(&[2, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert_eq!(
            Record::decode(&vec![0; MAX_ENCODED_BYTES + 1]),
            Err(RecordError::TooLarge)
        );
    }

    // -- properties ---------------------------------------------------------

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any order, grouping and repetition of merges gives the same result:
        /// the maximum of the universe's order.
        #[test]
        fn manifest_merge_converges(order in proptest::collection::vec(0usize..10, 1..20)) {
            let u = manifest_universe();
            let merged = fold(order.iter().map(|&i| u[i].clone()));
            // Reference: merge the chosen set in index order.
            let mut set = order.clone();
            set.sort();
            set.dedup();
            let reference = fold(set.iter().map(|&i| u[i].clone()));
            prop_assert_eq!(merged.digest(), reference.digest());
            // Grouping: merge the two halves separately, then together.
            let mid = order.len() / 2;
            if mid > 0 {
                let mut left = fold(order[..mid].iter().map(|&i| u[i].clone()));
                let right = fold(order[mid..].iter().map(|&i| u[i].clone()));
                left.merge(right).unwrap();
                prop_assert_eq!(left.digest(), reference.digest());
            }
            // Idempotent.
            let mut again = merged.clone();
            prop_assert_eq!(again.merge(merged.clone()), Ok(false));
            prop_assert_eq!(again.digest(), merged.digest());
        }

        /// Logs built from any subsets and merged in any order converge to the
        /// union (with the smaller-digest rule inside a key).
        #[test]
        fn txlog_union_converges(
            parts in proptest::collection::vec(proptest::collection::vec(0usize..8, 0..6), 1..6),
            perm in proptest::collection::vec(any::<u32>(), 6),
        ) {
            let u = log_universe();
            let records: Vec<Record> = parts
                .iter()
                .map(|p| new_txlog_record(owner(), p.iter().map(|&i| u[i].clone())).unwrap())
                .collect();
            let mut order: Vec<usize> = (0..records.len()).collect();
            order.sort_by_key(|&i| perm[i]);
            let merged = fold(order.iter().map(|&i| records[i].clone()));
            let forward = fold(records.iter().cloned());
            prop_assert_eq!(merged.digest(), forward.digest());
            prop_assert_eq!(merged.verify(TEST_BITS), Ok(()));
            // The union, resolved per key by the smallest digest.
            let mut expected = BTreeMap::new();
            for &i in parts.iter().flatten() {
                let e = &u[i];
                expected
                    .entry((e.clock, e.client))
                    .and_modify(|old: &mut TxEntry| {
                        if e.digest() < old.digest() {
                            *old = e.clone();
                        }
                    })
                    .or_insert_with(|| e.clone());
            }
            let Record::TxLog(l) = &merged else { unreachable!() };
            prop_assert_eq!(&l.entries, &expected);
            let mut again = merged.clone();
            prop_assert_eq!(again.merge(merged.clone()), Ok(false));
        }

        /// Flipping any single bit of a valid record's encoding never yields a
        /// different record that verifies.
        #[test]
        fn bit_flips_never_verify(which in 0usize..5, bit in any::<prop::sample::Index>()) {
            let r = &bitflip_universe()[which];
            let mut bytes = r.encode();
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            if let Ok(flipped) = Record::decode(&bytes) {
                prop_assert_ne!(flipped.digest(), r.digest());
                prop_assert!(flipped.verify(TEST_BITS).is_err(), "bit {} verified", bit);
            }
        }

        /// Arbitrary bytes never panic decode, verify or merge.
        #[test]
        fn junk_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(r) = Record::decode(&bytes) {
                let _ = r.verify(TEST_BITS);
                let mut held = bitflip_universe()[0].clone();
                let _ = held.merge(r);
            }
            let _ = verify(&bytes, b"m", &bytes, TEST_BITS);
            let _ = verify(owner().public_der(), b"m", &bytes, TEST_BITS);
        }

        /// Corrupted key DER is refused, never accepted as another key.
        #[test]
        fn corrupted_keys_are_refused(bit in any::<prop::sample::Index>()) {
            let sig = owner().sign(&mut rng(23), b"m");
            let mut der = owner().public_der().to_vec();
            let bit = bit.index(der.len() * 8);
            der[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(verify(&der, b"m", &sig, TEST_BITS).is_err());
        }
    }

    fn bitflip_universe() -> &'static [Record] {
        static U: OnceLock<Vec<Record>> = OnceLock::new();
        U.get_or_init(|| {
            let m = manifest_universe();
            let log = new_txlog_record(owner(), log_universe().iter().take(3).cloned()).unwrap();
            vec![
                new_pubkey_record(&mut rng(24), owner(), key(5).public_der().to_vec()),
                new_pubkey_record(&mut rng(25), owner(), vec![]),
                m[0].clone(),
                m[1].clone(),
                log,
            ]
        })
    }
}
