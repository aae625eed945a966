//! Secure sessions: an authenticated key exchange, then encrypted, MACed,
//! sequenced frames. A sans-IO value: bytes in, bytes out, with the time
//! (`now_ms`) and a crypto RNG passed in by the caller.
//!
//! # Handshake: four messages
//!
//! ```text
//! Initiator I                                       Responder R
//! Hello     { nonce_i }                        ->
//!                                              <-   Challenge { nonce_i, nonce_r, key_R, cert_R, cred_R }
//! Auth      { key_I, wrapped, cred_I, sig_I }  ->
//!                                              <-   Finish { sig_R, confirm }
//! ```
//!
//! * `key_I`, `key_R`: identity keys (SPKI DER); the peer ids are their SHA-1.
//! * The Challenge echoes `nonce_i`, so an initiator that gave up on a slow
//!   handshake and sent a new Hello can tell a late Challenge to the old one
//!   ([`Initiator::answers`]) and ignore it, instead of answering it and
//!   spoiling the new handshake. (The transcript covers the Hello anyway;
//!   the echo only lets I see the mismatch before R does.)
//! * `cert_R`: R's *ephemeral key certificate*: a short-lived RSA encryption
//!   key (SPKI DER), its `not_after_ms`, and R's identity signature over
//!   (tag, id_R, key, not_after_ms). R rotates it every
//!   [`SessionConfig::rotation_ms`] and keeps the previous one for
//!   [`SessionConfig::grace_ms`] so handshakes in flight complete.
//! * `wrapped`: a fresh 32-byte session secret chosen by I, RSA-OAEP(SHA-256,
//!   labelled) to R's ephemeral key.
//! * `transcript` = SHA-256 over a tag and the length-prefixed Hello and
//!   Challenge bytes, `key_I`, `wrapped` and `cred_I`: both nonces, both keys
//!   (so both ids), R's certificate, the wrapped secret and both credentials.
//! * `sig_I`, `sig_R`: RSA-PSS(SHA-256) by each identity key over
//!   (role tag, transcript, id_I, id_R). The role tags differ, so neither
//!   signature can be reflected as the other.
//! * `confirm`: HMAC under a key derived with the session keys, so I knows R
//!   decrypted the same secret.
//!
//! What each piece protects against:
//!
//! * Fresh nonces in the signed transcript: replaying any recorded message
//!   into a new handshake fails signature verification.
//! * Signatures cover the whole transcript: a man in the middle who changes
//!   anything (swaps the ephemeral key, the wrapped secret, a credential, a
//!   nonce) is caught by [`HandshakeError::BadSignature`] or, for the
//!   certificate, [`HandshakeError::BadCertificate`].
//! * Ephemeral encryption keys: the secret is wrapped to a key R discards
//!   after rotation plus grace, so a later theft of R's identity key (or of
//!   R's whole state) does not open recorded sessions. Forward secrecy thus
//!   holds per rotation period, not per session.
//! * Marvin (RUSTSEC-2023-0071, no fixed `rsa` release): decryption is
//!   blinded, and R never reports a failed decryption. It continues with a
//!   random secret instead (implicit rejection), so a forger learns nothing
//!   about the padding from R's answer: the peer simply cannot use the keys.
//!   Callers must still rate-limit handshakes ([`HandshakeLimiter`]).
//!
//! # Trust decision
//!
//! Each side sends an opaque credential (PeerStore puts an encoded
//! endorsement chain there, see [`crate::endorse`]) covered by its
//! signature. The session proves the peer holds `key`; whether that key is
//! welcome is the caller's decision: inspect [`Session::peer`] and drop the
//! session if not. The responder learns the verified initiator before it
//! sends Finish, so a responder that refuses simply never sends Finish.
//!
//! # Keys
//!
//! HKDF-SHA256 (RFC 5869, over the `hmac` crate): `PRK = Extract(salt =
//! tag || nonce_i || nonce_r, secret)`, then `Expand(PRK, transcript, 160)`
//! gives AES-256 and HMAC-SHA256 keys for I->R, the same for R->I, and the
//! confirmation key. All key material is zeroized on drop and never appears
//! in `Debug` output.
//!
//! # Frames
//!
//! ```text
//! version u8 | kind u8 (0 data, 1 close) | iv [16] | ciphertext [16 k] | tag [32]
//! ctx = version || kind || direction u8 || seq u64 BE || iv
//! ciphertext under 4 KiB:
//!   tag = HMAC-SHA256(mac key, "peerstore/session/v1/frame" || ctx || ciphertext)
//! otherwise, with ciphertext = half_0 || half_1 cut at a 16-byte boundary
//! (half_0 = 16 * floor(len / 32) bytes):
//!   t_i = HMAC-SHA256(mac key, "peerstore/session/v3/frame-half" || ctx
//!                     || len(ciphertext) u64 BE || i u8 || half_i)
//!   tag = HMAC-SHA256(mac key, "peerstore/session/v3/frame-halves" || t_0 || t_1)
//! ```
//!
//! AES-256-CBC with PKCS#7 padding and a fresh random IV per frame,
//! encrypt-then-MAC; the MAC is checked in constant time before anything is
//! decrypted. The CBC runs as [`crate::lanes`]: eight interleaved chains
//! whose IVs are derived from the frame's IV (version 2; version 1 was one
//! chain, and ran at a third of the speed). Every ciphertext byte is under
//! HMAC-SHA256 with the session's MAC key either way; a long frame's two
//! halves are MACed side by side ([`crate::hash::update_two`]), about
//! twice as fast as one HMAC over all of it where the CPU has the SHA
//! extensions (version 3). The halves' HMACs are the PRF on inputs no other
//! frame or half has (tag, direction, sequence number, half index), and
//! the tag is the PRF of the pair, so a forger must still predict HMAC on
//! an input never MACed. Sequence numbers are implicit (never sent): each direction
//! counts its frames, so a replayed, reordered, dropped or foreign frame fails
//! the MAC. Every failure is the one [`SessionError::BadFrame`], after which
//! the session is dead (keys wiped). A close frame lets the receiver tell a
//! clean end from a truncated stream. After every
//! [`SessionConfig::rekey_after_frames`] frames a direction's keys are
//! replaced by a one-way function of themselves (both sides count, so no
//! message is needed), and old keys cannot be recovered from new ones.
//! Frame length is checked against [`Session::max_frame_bytes`] before any
//! allocation.
//!
//! # Handshake messages on the wire
//!
//! `kind u8 | version u8 | postcard(body)`; byte strings are a varint
//! length and the bytes. Decoders check the total length first, then every
//! length against the bytes actually present before allocating, refuse
//! trailing bytes, and never panic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rand_core::CryptoRngCore;
use rsa::pkcs8::EncodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::id::Id;
use crate::record::{
    self, RngRef, Signer, ABSOLUTE_MIN_KEY_BITS, MAX_KEY_BITS, MAX_KEY_DER_BYTES,
    MIN_KEY_BITS_DEFAULT,
};

use crate::hash::HmacSha256;
use crate::lanes::LaneCbc;
use cbc::cipher::block_padding::{Pkcs7, RawPadding};

/// Version byte of handshake messages and frames.
pub const PROTOCOL_VERSION: u8 = 3;

const KIND_HELLO: u8 = 1;
const KIND_CHALLENGE: u8 = 2;
const KIND_AUTH: u8 = 3;
const KIND_FINISH: u8 = 4;

const FRAME_DATA: u8 = 0;
const FRAME_CLOSE: u8 = 1;

const NONCE_BYTES: usize = 32;
const SECRET_BYTES: usize = 32;
const KEY_BYTES: usize = 32;
const IV_BYTES: usize = 16;
const BLOCK_BYTES: usize = 16;
const MAC_BYTES: usize = 32;
const FRAME_HEADER_BYTES: usize = 2;
/// Bytes of a frame before its plaintext: the header and the IV (see
/// [`Session::seal_laid_out`]).
pub const SEAL_HEAD: usize = FRAME_HEADER_BYTES + IV_BYTES;
/// Bytes a frame adds after its plaintext at most: padding and the MAC.
pub const SEAL_TAIL: usize = BLOCK_BYTES + MAC_BYTES;
/// Shortest possible frame: header, IV, one block, MAC.
const FRAME_MIN_BYTES: usize = FRAME_HEADER_BYTES + IV_BYTES + BLOCK_BYTES + MAC_BYTES;
const MAX_SIG_BYTES: usize = MAX_KEY_BITS / 8;
/// Bound on a handshake message minus its credential: at most two keys and
/// two signature-sized fields (a signature or a wrapped secret), plus nonces,
/// an expiry, length prefixes and the header.
const HANDSHAKE_FIXED_MAX: usize = 2 * MAX_KEY_DER_BYTES + 2 * MAX_SIG_BYTES + 512;

const TAG_CERT: &[u8] = b"peerstore/session/v1/ephemeral-cert";
const TAG_TRANSCRIPT: &[u8] = b"peerstore/session/v1/transcript";
const TAG_SIG_INITIATOR: &[u8] = b"peerstore/session/v1/initiator-signature";
const TAG_SIG_RESPONDER: &[u8] = b"peerstore/session/v1/responder-signature";
const TAG_KDF: &[u8] = b"peerstore/session/v1/keys";
const TAG_CONFIRM: &[u8] = b"peerstore/session/v1/confirm";
const TAG_SESSION_ID: &[u8] = b"peerstore/session/v1/session-id";
const TAG_REKEY: &[u8] = b"peerstore/session/v1/rekey";
const TAG_FRAME: &[u8] = b"peerstore/session/v1/frame";
const TAG_FRAME_HALF: &[u8] = b"peerstore/session/v3/frame-half";
const TAG_FRAME_HALVES: &[u8] = b"peerstore/session/v3/frame-halves";
/// Ciphertexts from this long on are MACed in two halves.
const MAC_HALVES_FROM: usize = 4096;
const OAEP_LABEL: &str = "peerstore/session/v1/secret";

// ---------------------------------------------------------------------------
// Configuration and errors
// ---------------------------------------------------------------------------

/// Session parameters. [`SessionConfig::default`] is the production policy;
/// tests lower the key sizes. Both ends must agree on
/// `rekey_after_frames` (it is a protocol constant that tests shrink).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Smallest peer identity key accepted, in bits.
    pub min_identity_bits: usize,
    /// Size of the ephemeral keys a [`Responder`] generates, in bits.
    pub ephemeral_bits: usize,
    /// Smallest peer ephemeral key accepted, in bits.
    pub min_ephemeral_bits: usize,
    /// How long a responder uses one ephemeral key.
    pub rotation_ms: u64,
    /// How long a retired ephemeral key is kept for handshakes in flight.
    pub grace_ms: u64,
    /// How far past `not_after_ms` an initiator still accepts a certificate
    /// (clocks differ between machines).
    pub clock_skew_ms: u64,
    /// Largest credential either side may present.
    pub max_credential_bytes: usize,
    /// Largest frame plaintext.
    pub max_frame_plaintext: usize,
    /// Frames per direction between key ratchets; must match the peer's.
    pub rekey_after_frames: u64,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        SessionConfig {
            min_identity_bits: MIN_KEY_BITS_DEFAULT,
            ephemeral_bits: 2048,
            min_ephemeral_bits: 2048,
            rotation_ms: 60 * 60 * 1000,
            grace_ms: 2 * 60 * 1000,
            clock_skew_ms: 5 * 60 * 1000,
            max_credential_bytes: 32 * 1024,
            max_frame_plaintext: 16 * 1024 * 1024,
            rekey_after_frames: 1 << 32,
        }
    }
}

impl SessionConfig {
    /// Largest handshake message either side sends or accepts under this
    /// configuration (for the transport's framing).
    pub fn max_handshake_message_bytes(&self) -> usize {
        HANDSHAKE_FIXED_MAX.saturating_add(self.max_credential_bytes)
    }

    /// Largest frame [`Session::open`] accepts under this configuration.
    pub fn max_frame_bytes(&self) -> usize {
        frame_len(self.max_frame_plaintext)
    }
}

/// Why a handshake failed. None of these says anything about the result of
/// an RSA decryption (see the module docs on Marvin).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The bytes are not the expected message, or exceed a size limit.
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks session protocol version {0}, this node speaks version 1; upgrade one side"
    )]
    Version(u8),
    /// A key is malformed or outside the size policy.
    #[error(
        "peer's identity or ephemeral key is malformed or smaller than the configured minimum"
    )]
    BadKey,
    /// The ephemeral key certificate is not signed by the presented identity.
    #[error("ephemeral key certificate is not signed by the peer's identity key (tampering or a man in the middle)")]
    BadCertificate,
    /// The ephemeral key certificate has expired.
    #[error("peer's ephemeral key certificate has expired (peer overdue for rotation, or clocks disagree)")]
    CertificateExpired,
    /// A transcript signature does not verify under the presented identity.
    #[error("transcript signature does not verify under the peer's identity key (tampering, replay or a man in the middle)")]
    BadSignature,
    /// The responder's key confirmation does not match.
    #[error("responder derived different session keys (tampering or a man in the middle)")]
    KeyConfirmation,
    /// The ephemeral key this handshake used was rotated away.
    #[error("the ephemeral key this handshake used has been discarded; start a new handshake")]
    EphemeralKeyGone,
    /// The responder's current ephemeral key has expired: the caller has not
    /// called [`Responder::maybe_rotate`] on time.
    #[error("ephemeral key expired; call Responder::maybe_rotate at Responder::next_rotation_ms")]
    RotationOverdue,
    /// A credential exceeds [`SessionConfig::max_credential_bytes`].
    #[error("credential is larger than the configured maximum")]
    CredentialTooLarge,
    /// Generating an ephemeral key failed, or a supplied one is out of policy.
    #[error("could not create an ephemeral key of the configured size")]
    KeyGeneration,
}

/// Why a frame could not be sealed or opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The frame was refused: corrupt, forged, replayed, reordered, after a
    /// dropped frame, from another session, or oversized. Deliberately one
    /// error for all. The session is now dead; open a new one.
    #[error("frame rejected (corrupt, forged, replayed, reordered or from another session); the session is closed, open a new one")]
    BadFrame,
    /// The session is closed: after a bad frame, a close frame, or
    /// [`Session::abort`].
    #[error("session is closed; open a new one")]
    Closed,
    /// The plaintext exceeds [`SessionConfig::max_frame_plaintext`].
    #[error("plaintext exceeds the frame size limit; split it")]
    TooLarge,
    /// 2^64 frames in one direction: never in practice.
    #[error("sequence numbers exhausted; open a new session")]
    Exhausted,
}

// ---------------------------------------------------------------------------
// Wire encoding
// ---------------------------------------------------------------------------

/// Serde adapter for `Vec<u8>` fields: postcard byte strings (varint length,
/// then the bytes; the same bytes as a `Vec<u8>` sequence). Decoding checks
/// the length against the input before allocating exactly that much,
/// unlike serde's `Vec` impl, which pre-allocates up to 1 MiB on a claim.
pub(crate) mod wire_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Hello {
    nonce: [u8; NONCE_BYTES],
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct EphemeralCert {
    /// SPKI DER of the ephemeral RSA encryption key.
    #[serde(with = "wire_bytes")]
    key: Vec<u8>,
    not_after_ms: u64,
    /// By the identity key over [`cert_message`].
    #[serde(with = "wire_bytes")]
    sig: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Challenge {
    /// The Hello's nonce, echoed.
    echo: [u8; NONCE_BYTES],
    nonce: [u8; NONCE_BYTES],
    #[serde(with = "wire_bytes")]
    identity_key: Vec<u8>,
    cert: EphemeralCert,
    #[serde(with = "wire_bytes")]
    credential: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Auth {
    #[serde(with = "wire_bytes")]
    identity_key: Vec<u8>,
    #[serde(with = "wire_bytes")]
    wrapped_secret: Vec<u8>,
    #[serde(with = "wire_bytes")]
    credential: Vec<u8>,
    #[serde(with = "wire_bytes")]
    sig: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Finish {
    #[serde(with = "wire_bytes")]
    sig: Vec<u8>,
    confirm: [u8; MAC_BYTES],
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("postcard encoding into a Vec cannot fail")
}

fn encode_msg<T: Serialize>(kind: u8, body: &T) -> Vec<u8> {
    let mut out = vec![kind, PROTOCOL_VERSION];
    out.extend_from_slice(&encode(body));
    out
}

fn decode_msg<T: DeserializeOwned>(
    kind: u8,
    bytes: &[u8],
    max_bytes: usize,
) -> Result<T, HandshakeError> {
    if bytes.len() > max_bytes {
        return Err(HandshakeError::Malformed("message too large"));
    }
    let [got_kind, version, body @ ..] = bytes else {
        return Err(HandshakeError::Malformed("message too short"));
    };
    if *got_kind != kind {
        return Err(HandshakeError::Malformed("unexpected message kind"));
    }
    if *version != PROTOCOL_VERSION {
        return Err(HandshakeError::Version(*version));
    }
    let (value, rest) = postcard::take_from_bytes::<T>(body)
        .map_err(|_| HandshakeError::Malformed("undecodable message"))?;
    if !rest.is_empty() {
        return Err(HandshakeError::Malformed("trailing bytes after message"));
    }
    Ok(value)
}

// ---------------------------------------------------------------------------
// Key schedule
// ---------------------------------------------------------------------------

fn hmac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new(key)
}

/// HKDF-Extract (RFC 5869) with SHA-256.
fn hkdf_extract(salt: &[u8], ikm: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut m = hmac(salt);
    m.update(ikm);
    Zeroizing::new(m.finalize())
}

/// HKDF-Expand (RFC 5869) with SHA-256; `out` at most 255 blocks.
fn hkdf_expand(prk: &[u8; 32], info: &[u8], out: &mut [u8]) {
    assert!(out.len() <= 255 * 32, "HKDF-Expand output too long");
    let mut t = Zeroizing::new([0u8; 32]);
    for (i, chunk) in out.chunks_mut(32).enumerate() {
        let mut m = hmac(prk);
        if i > 0 {
            m.update(&t[..]);
        }
        m.update(info);
        m.update(&[(i + 1) as u8]);
        t.copy_from_slice(&m.finalize());
        chunk.copy_from_slice(&t[..chunk.len()]);
    }
}

/// One direction's AES-256 and HMAC-SHA256 keys.
#[derive(Zeroize, ZeroizeOnDrop)]
struct DirectionKeys {
    enc: [u8; KEY_BYTES],
    mac: [u8; KEY_BYTES],
}

impl DirectionKeys {
    fn from_slice(okm: &[u8]) -> DirectionKeys {
        let mut k = DirectionKeys {
            enc: [0; KEY_BYTES],
            mac: [0; KEY_BYTES],
        };
        k.enc.copy_from_slice(&okm[..KEY_BYTES]);
        k.mac.copy_from_slice(&okm[KEY_BYTES..2 * KEY_BYTES]);
        k
    }

    /// The next keys: a one-way function of these, the direction and the
    /// frame count, so both ends agree and old keys stay out of reach.
    fn ratchet(&self, direction: u8, seq: u64) -> DirectionKeys {
        let mut ikm = Zeroizing::new([0u8; 2 * KEY_BYTES]);
        ikm[..KEY_BYTES].copy_from_slice(&self.enc);
        ikm[KEY_BYTES..].copy_from_slice(&self.mac);
        let prk = hkdf_extract(TAG_REKEY, &ikm[..]);
        let mut info = [0u8; 9];
        info[0] = direction;
        info[1..].copy_from_slice(&seq.to_be_bytes());
        let mut okm = Zeroizing::new([0u8; 2 * KEY_BYTES]);
        hkdf_expand(&prk, &info, &mut okm[..]);
        DirectionKeys::from_slice(&okm[..])
    }
}

/// Everything the handshake derives from the secret.
struct KeySchedule {
    i2r: DirectionKeys,
    r2i: DirectionKeys,
    confirm_key: Zeroizing<[u8; KEY_BYTES]>,
}

fn derive_keys(
    secret: &[u8; SECRET_BYTES],
    nonce_i: &[u8; NONCE_BYTES],
    nonce_r: &[u8; NONCE_BYTES],
    transcript: &[u8; 32],
) -> KeySchedule {
    let mut salt = Vec::with_capacity(TAG_KDF.len() + 2 * NONCE_BYTES);
    salt.extend_from_slice(TAG_KDF);
    salt.extend_from_slice(nonce_i);
    salt.extend_from_slice(nonce_r);
    let prk = hkdf_extract(&salt, secret);
    let mut okm = Zeroizing::new([0u8; 5 * KEY_BYTES]);
    hkdf_expand(&prk, transcript, &mut okm[..]);
    let mut confirm_key = Zeroizing::new([0u8; KEY_BYTES]);
    confirm_key.copy_from_slice(&okm[4 * KEY_BYTES..]);
    KeySchedule {
        i2r: DirectionKeys::from_slice(&okm[..2 * KEY_BYTES]),
        r2i: DirectionKeys::from_slice(&okm[2 * KEY_BYTES..4 * KEY_BYTES]),
        confirm_key,
    }
}

fn confirm_tag(confirm_key: &[u8; KEY_BYTES], transcript: &[u8; 32]) -> [u8; MAC_BYTES] {
    let mut m = hmac(confirm_key);
    m.update(TAG_CONFIRM);
    m.update(transcript);
    m.finalize()
}

/// Length-prefixed hashing of the handshake, absorbed as it happens.
#[derive(Clone)]
struct Transcript(Sha256);

impl Transcript {
    fn new(hello: &[u8], challenge: &[u8]) -> Transcript {
        let mut t = Transcript(Sha256::new());
        t.absorb(TAG_TRANSCRIPT);
        t.absorb(hello);
        t.absorb(challenge);
        t
    }

    fn absorb(&mut self, part: &[u8]) {
        self.0.update((part.len() as u64).to_be_bytes());
        self.0.update(part);
    }

    fn finish(mut self, identity_key: &[u8], wrapped: &[u8], credential: &[u8]) -> [u8; 32] {
        self.absorb(identity_key);
        self.absorb(wrapped);
        self.absorb(credential);
        self.0.finalize().into()
    }
}

fn signature_message(role_tag: &[u8], transcript: &[u8; 32], id_i: Id, id_r: Id) -> Vec<u8> {
    encode(&(role_tag, transcript, id_i, id_r))
}

fn cert_message(identity: Id, ephemeral_key: &[u8], not_after_ms: u64) -> Vec<u8> {
    encode(&(TAG_CERT, identity, ephemeral_key, not_after_ms))
}

fn oaep() -> Oaep {
    Oaep::new_with_label::<Sha256, _>(OAEP_LABEL)
}

fn session_id(transcript: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TAG_SESSION_ID);
    h.update(transcript);
    h.finalize().into()
}

// ---------------------------------------------------------------------------
// The peer, as the handshake proved it
// ---------------------------------------------------------------------------

/// Which end of the handshake this side was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

/// The peer of a completed handshake: it proved possession of `key_der`.
/// Whether to trust it (e.g. by verifying `credential` as an endorsement
/// chain) is the caller's decision.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The peer's identity key, SPKI DER.
    pub key_der: Vec<u8>,
    /// SHA-1 of `key_der`: the peer's ring id.
    pub id: Id,
    /// The opaque credential the peer presented (covered by its signature).
    pub credential: Vec<u8>,
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("id", &self.id)
            .field("credential_len", &self.credential.len())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Initiator
// ---------------------------------------------------------------------------

/// The initiator before the Challenge: holds its nonce and the Hello it sent.
pub struct Initiator {
    config: SessionConfig,
    identity: Signer,
    credential: Vec<u8>,
    nonce: [u8; NONCE_BYTES],
    hello: Vec<u8>,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initiator")
            .field("identity", &self.identity.user_id())
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// Starts a handshake as `identity`, presenting `credential`. Returns
    /// the state to keep and the Hello to send.
    pub fn new(
        rng: &mut (impl CryptoRngCore + ?Sized),
        config: &SessionConfig,
        identity: &Signer,
        credential: Vec<u8>,
    ) -> Result<(Initiator, Vec<u8>), HandshakeError> {
        if credential.len() > config.max_credential_bytes {
            return Err(HandshakeError::CredentialTooLarge);
        }
        let mut nonce = [0u8; NONCE_BYTES];
        rng.fill_bytes(&mut nonce);
        let hello = encode_msg(KIND_HELLO, &Hello { nonce });
        let state = Initiator {
            config: config.clone(),
            identity: identity.clone(),
            credential,
            nonce,
            hello: hello.clone(),
        };
        Ok((state, hello))
    }

    /// Checks the responder's Challenge (identity key, ephemeral key
    /// certificate and its expiry at `now_ms`), wraps a fresh secret to the
    /// ephemeral key and signs the transcript. Returns the state to keep and
    /// the Auth to send.
    /// Whether `challenge` answers this initiator's Hello (and not an
    /// earlier one the caller gave up on). Decodes it; checks nothing else.
    pub fn answers(&self, challenge: &[u8]) -> bool {
        decode_msg::<Challenge>(
            KIND_CHALLENGE,
            challenge,
            self.config.max_handshake_message_bytes(),
        )
        .is_ok_and(|c| c.echo == self.nonce)
    }

    pub fn handle_challenge(
        self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        now_ms: u64,
        challenge: &[u8],
    ) -> Result<(InitiatorWait, Vec<u8>), HandshakeError> {
        let cfg = &self.config;
        let c: Challenge =
            decode_msg(KIND_CHALLENGE, challenge, cfg.max_handshake_message_bytes())?;
        if c.echo != self.nonce {
            return Err(HandshakeError::Malformed("a challenge to another hello"));
        }
        if c.credential.len() > cfg.max_credential_bytes {
            return Err(HandshakeError::CredentialTooLarge);
        }
        record::parse_public_key(&c.identity_key, cfg.min_identity_bits)
            .map_err(|_| HandshakeError::BadKey)?;
        let id_r = Id::hash(&c.identity_key);
        let cert_msg = cert_message(id_r, &c.cert.key, c.cert.not_after_ms);
        record::verify(
            &c.identity_key,
            &cert_msg,
            &c.cert.sig,
            cfg.min_identity_bits,
        )
        .map_err(|_| HandshakeError::BadCertificate)?;
        if now_ms > c.cert.not_after_ms.saturating_add(cfg.clock_skew_ms) {
            return Err(HandshakeError::CertificateExpired);
        }
        let ephemeral: RsaPublicKey = record::parse_public_key(&c.cert.key, cfg.min_ephemeral_bits)
            .map_err(|_| HandshakeError::BadKey)?
            .as_ref()
            .clone();

        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        rng.fill_bytes(&mut secret[..]);
        let wrapped = ephemeral
            .encrypt(&mut RngRef(rng), oaep(), &secret[..])
            .map_err(|_| HandshakeError::BadKey)?;

        let identity_key = self.identity.public_der();
        let transcript = Transcript::new(&self.hello, challenge).finish(
            identity_key,
            &wrapped,
            &self.credential,
        );
        let id_i = self.identity.user_id();
        let sig = self.identity.sign(
            rng,
            &signature_message(TAG_SIG_INITIATOR, &transcript, id_i, id_r),
        );
        let auth = encode_msg(
            KIND_AUTH,
            &Auth {
                identity_key: identity_key.to_vec(),
                wrapped_secret: wrapped,
                credential: self.credential.clone(),
                sig,
            },
        );
        let keys = derive_keys(&secret, &self.nonce, &c.nonce, &transcript);
        let wait = InitiatorWait {
            id_i,
            peer: PeerIdentity {
                key_der: c.identity_key,
                id: id_r,
                credential: c.credential,
            },
            transcript,
            keys,
            config: self.config,
        };
        Ok((wait, auth))
    }
}

/// The initiator after sending Auth, waiting for Finish.
pub struct InitiatorWait {
    config: SessionConfig,
    id_i: Id,
    peer: PeerIdentity,
    transcript: [u8; 32],
    keys: KeySchedule,
}

impl fmt::Debug for InitiatorWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InitiatorWait")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl InitiatorWait {
    /// Who the responder *claims* to be (identity and certificate checked,
    /// possession not yet proven): lets a caller give up early on a peer it
    /// would refuse anyway.
    pub fn claimed_peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Verifies the responder's transcript signature and key confirmation;
    /// on success the session is open and [`Session::peer`] is proven.
    pub fn handle_finish(self, finish: &[u8]) -> Result<Session, HandshakeError> {
        let f: Finish = decode_msg(
            KIND_FINISH,
            finish,
            self.config.max_handshake_message_bytes(),
        )?;
        let msg = signature_message(TAG_SIG_RESPONDER, &self.transcript, self.id_i, self.peer.id);
        record::verify(
            &self.peer.key_der,
            &msg,
            &f.sig,
            self.config.min_identity_bits,
        )
        .map_err(|_| HandshakeError::BadSignature)?;
        let expected = confirm_tag(&self.keys.confirm_key, &self.transcript);
        if !bool::from(expected.ct_eq(&f.confirm)) {
            return Err(HandshakeError::KeyConfirmation);
        }
        Ok(Session::new(
            Role::Initiator,
            self.peer,
            &self.transcript,
            self.keys,
            &self.config,
        ))
    }
}

// ---------------------------------------------------------------------------
// Responder
// ---------------------------------------------------------------------------

/// An ephemeral encryption key and its certificate.
struct EphemeralKey {
    private: RsaPrivateKey, // zeroized on drop by the rsa crate
    fingerprint: [u8; 32],  // SHA-256 of the public SPKI DER
    cert: EphemeralCert,
    created_ms: u64,
    /// Not used for handshakes from this time on, and dropped at the next
    /// [`Responder::maybe_rotate`].
    discard_at_ms: u64,
}

/// A node's listening side: its identity, credential and ephemeral keys.
/// One value serves every incoming handshake; each handshake in flight is a
/// [`ResponderHandshake`].
///
/// Rotation is the caller's duty, sans-IO style: call
/// [`Responder::maybe_rotate`] whenever `now_ms` reaches
/// [`Responder::next_rotation_ms`]. Generating a key takes a while (a
/// 2048-bit RSA key: tens to hundreds of ms); a caller that must not block
/// can generate one elsewhere and pass it to [`Responder::rotate_with`].
pub struct Responder {
    config: SessionConfig,
    identity: Signer,
    credential: Vec<u8>,
    current: EphemeralKey,
    previous: Option<EphemeralKey>,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("identity", &self.identity.user_id())
            .field("ephemeral_created_ms", &self.current.created_ms)
            .field("has_previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

fn generate_ephemeral(
    rng: &mut (impl CryptoRngCore + ?Sized),
    bits: usize,
) -> Result<RsaPrivateKey, HandshakeError> {
    if !(ABSOLUTE_MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
        return Err(HandshakeError::KeyGeneration);
    }
    RsaPrivateKey::new(&mut RngRef(rng), bits).map_err(|_| HandshakeError::KeyGeneration)
}

impl Responder {
    /// A responder with a freshly generated ephemeral key.
    pub fn new(
        rng: &mut (impl CryptoRngCore + ?Sized),
        now_ms: u64,
        config: &SessionConfig,
        identity: &Signer,
        credential: Vec<u8>,
    ) -> Result<Responder, HandshakeError> {
        let key = generate_ephemeral(rng, config.ephemeral_bits)?;
        Responder::with_ephemeral_key(rng, now_ms, config, identity, credential, key)
    }

    /// A responder whose first ephemeral key is `key`.
    pub fn with_ephemeral_key(
        rng: &mut (impl CryptoRngCore + ?Sized),
        now_ms: u64,
        config: &SessionConfig,
        identity: &Signer,
        credential: Vec<u8>,
        key: RsaPrivateKey,
    ) -> Result<Responder, HandshakeError> {
        if credential.len() > config.max_credential_bytes {
            return Err(HandshakeError::CredentialTooLarge);
        }
        let current = certify(rng, now_ms, config, identity, key)?;
        Ok(Responder {
            config: config.clone(),
            identity: identity.clone(),
            credential,
            current,
            previous: None,
        })
    }

    /// Presents `credential` from now on (e.g. a new endorsement chain
    /// after registration). Handshakes already answered keep the old one.
    pub fn set_credential(&mut self, credential: Vec<u8>) -> Result<(), HandshakeError> {
        if credential.len() > self.config.max_credential_bytes {
            return Err(HandshakeError::CredentialTooLarge);
        }
        self.credential = credential;
        Ok(())
    }

    /// When [`Responder::maybe_rotate`] next has work: the current key's
    /// rotation time or the previous key's discard time, whichever is first.
    pub fn next_rotation_ms(&self) -> u64 {
        let rotate_at = self
            .current
            .created_ms
            .saturating_add(self.config.rotation_ms);
        match &self.previous {
            Some(p) => rotate_at.min(p.discard_at_ms),
            None => rotate_at,
        }
    }

    /// Whether the current key is due for replacement at `now_ms`.
    pub fn needs_rotation(&self, now_ms: u64) -> bool {
        now_ms
            >= self
                .current
                .created_ms
                .saturating_add(self.config.rotation_ms)
    }

    /// Discards the previous key once its grace has passed, and rotates
    /// (generating a key) if due. Returns whether it rotated.
    pub fn maybe_rotate(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        now_ms: u64,
    ) -> Result<bool, HandshakeError> {
        self.discard_expired(now_ms);
        if !self.needs_rotation(now_ms) {
            return Ok(false);
        }
        let key = generate_ephemeral(rng, self.config.ephemeral_bits)?;
        self.rotate_with(rng, now_ms, key)?;
        Ok(true)
    }

    /// Rotates now to `key`: the current key becomes the previous one (kept
    /// for [`SessionConfig::grace_ms`]); the old previous key is dropped.
    pub fn rotate_with(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        now_ms: u64,
        key: RsaPrivateKey,
    ) -> Result<(), HandshakeError> {
        let next = certify(rng, now_ms, &self.config, &self.identity, key)?;
        let mut retired = std::mem::replace(&mut self.current, next);
        retired.discard_at_ms = retired
            .discard_at_ms
            .min(now_ms.saturating_add(self.config.grace_ms));
        // Dropping the old previous key zeroizes it.
        self.previous = Some(retired);
        self.discard_expired(now_ms);
        Ok(())
    }

    fn discard_expired(&mut self, now_ms: u64) {
        if self
            .previous
            .as_ref()
            .is_some_and(|p| now_ms >= p.discard_at_ms)
        {
            self.previous = None;
        }
    }

    /// The ephemeral key with this fingerprint, if still usable at `now_ms`.
    fn ephemeral(&self, fingerprint: &[u8; 32], now_ms: u64) -> Option<&EphemeralKey> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|k| &k.fingerprint == fingerprint && now_ms < k.discard_at_ms)
    }

    /// Answers a Hello with a Challenge (no private-key operation). Returns
    /// the per-handshake state to keep and the Challenge to send.
    pub fn handle_hello(
        &self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        now_ms: u64,
        hello: &[u8],
    ) -> Result<(ResponderHandshake, Vec<u8>), HandshakeError> {
        let h: Hello = decode_msg(KIND_HELLO, hello, self.config.max_handshake_message_bytes())?;
        if now_ms >= self.current.discard_at_ms {
            return Err(HandshakeError::RotationOverdue);
        }
        let mut nonce = [0u8; NONCE_BYTES];
        rng.fill_bytes(&mut nonce);
        let challenge = encode_msg(
            KIND_CHALLENGE,
            &Challenge {
                echo: h.nonce,
                nonce,
                identity_key: self.identity.public_der().to_vec(),
                cert: self.current.cert.clone(),
                credential: self.credential.clone(),
            },
        );
        let state = ResponderHandshake {
            transcript: Transcript::new(hello, &challenge),
            nonce_i: h.nonce,
            nonce_r: nonce,
            fingerprint: self.current.fingerprint,
        };
        Ok((state, challenge))
    }

    /// Verifies the initiator's Auth and completes the handshake. Returns
    /// the open session and the Finish to send. Inspect
    /// [`Session::peer`] first: if the peer is not welcome, drop both and
    /// never send Finish.
    ///
    /// A wrapped secret that does not decrypt is not reported (that would
    /// be a padding oracle): the session gets random keys, and the
    /// initiator's key confirmation fails instead.
    pub fn handle_auth(
        &self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        now_ms: u64,
        handshake: ResponderHandshake,
        auth: &[u8],
    ) -> Result<(Session, Vec<u8>), HandshakeError> {
        let cfg = &self.config;
        let a: Auth = decode_msg(KIND_AUTH, auth, cfg.max_handshake_message_bytes())?;
        if a.credential.len() > cfg.max_credential_bytes {
            return Err(HandshakeError::CredentialTooLarge);
        }
        record::parse_public_key(&a.identity_key, cfg.min_identity_bits)
            .map_err(|_| HandshakeError::BadKey)?;
        let id_i = Id::hash(&a.identity_key);
        let id_r = self.identity.user_id();
        let transcript =
            handshake
                .transcript
                .finish(&a.identity_key, &a.wrapped_secret, &a.credential);
        record::verify(
            &a.identity_key,
            &signature_message(TAG_SIG_INITIATOR, &transcript, id_i, id_r),
            &a.sig,
            cfg.min_identity_bits,
        )
        .map_err(|_| HandshakeError::BadSignature)?;
        let key = self
            .ephemeral(&handshake.fingerprint, now_ms)
            .ok_or(HandshakeError::EphemeralKeyGone)?;

        // Implicit rejection: draw the fallback before decrypting so the
        // RNG is used the same way whatever the outcome.
        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        rng.fill_bytes(&mut secret[..]);
        if let Ok(plain) = key
            .private
            .decrypt_blinded(&mut RngRef(rng), oaep(), &a.wrapped_secret)
        {
            let plain = Zeroizing::new(plain);
            if plain.len() == SECRET_BYTES {
                secret.copy_from_slice(&plain);
            }
        }

        let keys = derive_keys(&secret, &handshake.nonce_i, &handshake.nonce_r, &transcript);
        let sig = self.identity.sign(
            rng,
            &signature_message(TAG_SIG_RESPONDER, &transcript, id_i, id_r),
        );
        let finish = encode_msg(
            KIND_FINISH,
            &Finish {
                sig,
                confirm: confirm_tag(&keys.confirm_key, &transcript),
            },
        );
        let peer = PeerIdentity {
            key_der: a.identity_key,
            id: id_i,
            credential: a.credential,
        };
        let session = Session::new(Role::Responder, peer, &transcript, keys, cfg);
        Ok((session, finish))
    }
}

fn certify(
    rng: &mut (impl CryptoRngCore + ?Sized),
    now_ms: u64,
    config: &SessionConfig,
    identity: &Signer,
    key: RsaPrivateKey,
) -> Result<EphemeralKey, HandshakeError> {
    let bits = key.n().bits();
    if !(ABSOLUTE_MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
        return Err(HandshakeError::KeyGeneration);
    }
    let der = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|_| HandshakeError::KeyGeneration)?
        .into_vec();
    debug_assert!(der.len() <= MAX_KEY_DER_BYTES);
    let not_after_ms = now_ms
        .saturating_add(config.rotation_ms)
        .saturating_add(config.grace_ms);
    let sig = identity.sign(rng, &cert_message(identity.user_id(), &der, not_after_ms));
    Ok(EphemeralKey {
        private: key,
        fingerprint: Sha256::digest(&der).into(),
        cert: EphemeralCert {
            key: der,
            not_after_ms,
            sig,
        },
        created_ms: now_ms,
        discard_at_ms: not_after_ms,
    })
}

/// One handshake in flight at the responder, between Challenge and Auth.
/// Small (a hash state, two nonces, a key fingerprint), so many can wait.
pub struct ResponderHandshake {
    transcript: Transcript,
    nonce_i: [u8; NONCE_BYTES],
    nonce_r: [u8; NONCE_BYTES],
    fingerprint: [u8; 32],
}

impl fmt::Debug for ResponderHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponderHandshake").finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------

/// One direction of a session: keys, frame counter and direction byte.
struct Half {
    keys: DirectionKeys,
    seq: u64,
    /// Frames left under the current keys.
    until_rekey: u64,
    direction: u8,
}

impl Half {
    /// The frame's MAC (see the module doc, "Frames"): one HMAC over the
    /// whole frame when it is short, otherwise an HMAC of each half of the
    /// ciphertext, computed side by side ([`crate::hash::update_two`]), and
    /// an HMAC of the two.
    fn tag(&self, header: &[u8], iv: &[u8], ciphertext: &[u8]) -> [u8; MAC_BYTES] {
        let keyed = hmac(&self.keys.mac);
        // A domain tag, then the frame's context.
        let context = |tag: &[u8]| {
            let mut m = keyed.clone();
            m.update(tag);
            m.update(header);
            m.update(&[self.direction]);
            m.update(&self.seq.to_be_bytes());
            m.update(iv);
            m
        };
        if ciphertext.len() < MAC_HALVES_FROM {
            let mut m = context(TAG_FRAME);
            m.update(ciphertext);
            return m.finalize();
        }
        let (first, second) = ciphertext.split_at(ciphertext.len() / 2 / BLOCK_BYTES * BLOCK_BYTES);
        let half = |index: u8| {
            let mut m = context(TAG_FRAME_HALF);
            m.update(&(ciphertext.len() as u64).to_be_bytes());
            m.update(&[index]);
            m
        };
        let (mut m0, mut m1) = (half(0), half(1));
        crate::hash::update_two(&mut m0, first, &mut m1, second);
        let mut m = keyed;
        m.update(TAG_FRAME_HALVES);
        m.update(&m0.finalize());
        m.update(&m1.finalize());
        m.finalize()
    }

    /// Counts a frame; ratchets the keys every `rekey_after` frames.
    fn advance(&mut self, rekey_after: u64) {
        self.seq += 1;
        self.until_rekey -= 1;
        if self.until_rekey == 0 {
            self.keys = self.keys.ratchet(self.direction, self.seq);
            self.until_rekey = rekey_after;
        }
    }

    fn wipe(&mut self) {
        self.keys.zeroize();
    }
}

const DIRECTION_I2R: u8 = 0;
const DIRECTION_R2I: u8 = 1;

/// What [`Session::open`] found in a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application bytes.
    Data(Vec<u8>),
    /// The peer closed its direction cleanly; nothing more will come.
    Close,
}

/// An open secure session: seal outgoing frames, open incoming ones.
pub struct Session {
    role: Role,
    peer: PeerIdentity,
    session_id: [u8; 32],
    send: Half,
    recv: Half,
    max_plaintext: usize,
    rekey_after: u64,
    sent_close: bool,
    peer_closed: bool,
    dead: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("peer", &self.peer)
            .field("sent", &self.send.seq)
            .field("received", &self.recv.seq)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

/// Frame length for a plaintext of `len` bytes.
fn frame_len(len: usize) -> usize {
    let padded = (len / BLOCK_BYTES + 1) * BLOCK_BYTES;
    FRAME_HEADER_BYTES + IV_BYTES + padded + MAC_BYTES
}

impl Session {
    fn new(
        role: Role,
        peer: PeerIdentity,
        transcript: &[u8; 32],
        keys: KeySchedule,
        config: &SessionConfig,
    ) -> Session {
        let rekey_after = config.rekey_after_frames.max(1);
        let KeySchedule { i2r, r2i, .. } = keys;
        let i2r = Half {
            keys: i2r,
            seq: 0,
            until_rekey: rekey_after,
            direction: DIRECTION_I2R,
        };
        let r2i = Half {
            keys: r2i,
            seq: 0,
            until_rekey: rekey_after,
            direction: DIRECTION_R2I,
        };
        let (send, recv) = match role {
            Role::Initiator => (i2r, r2i),
            Role::Responder => (r2i, i2r),
        };
        Session {
            role,
            peer,
            session_id: session_id(transcript),
            send,
            recv,
            max_plaintext: config.max_frame_plaintext,
            rekey_after,
            sent_close: false,
            peer_closed: false,
            dead: false,
        }
    }

    /// The peer, proven by the handshake.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Which end of the handshake this side was.
    pub fn role(&self) -> Role {
        self.role
    }

    /// A public value both ends share and no other session has (for logs
    /// and for binding application data to this session). Not a key.
    pub fn session_id(&self) -> &[u8; 32] {
        &self.session_id
    }

    /// Frames sealed so far.
    pub fn frames_sent(&self) -> u64 {
        self.send.seq
    }

    /// Frames opened so far.
    pub fn frames_received(&self) -> u64 {
        self.recv.seq
    }

    /// Whether the session refused a frame or was aborted (keys wiped).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Whether the peer sent a close frame.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Largest frame [`Session::open`] accepts; anything longer is refused
    /// before allocation (the transport should refuse it before reading it).
    pub fn max_frame_bytes(&self) -> usize {
        frame_len(self.max_plaintext)
    }

    /// Wipes the keys; every later call fails with [`SessionError::Closed`].
    pub fn abort(&mut self) {
        self.dead = true;
        self.send.wipe();
        self.recv.wipe();
    }

    /// Encrypts and authenticates `plaintext` as the next frame.
    pub fn seal(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SessionError> {
        self.seal_kind(rng, FRAME_DATA, plaintext)
    }

    /// [`Session::seal`] of a plaintext the caller laid out in `buf`: the
    /// plaintext starts at `at + SEAL_HEAD`, where the frame will start at
    /// `at`; the first `at` bytes are the caller's, kept as they are and
    /// not part of the frame. The frame is built around the plaintext in
    /// place (the same bytes [`Session::seal`] makes), so a 1 MiB block is
    /// not copied to be sealed; with [`SEAL_TAIL`] bytes of spare capacity
    /// after the plaintext nothing is reallocated either. Returns `buf`
    /// holding the caller's bytes and then the frame. Panics if `buf` is
    /// shorter than `at + SEAL_HEAD` (a caller bug).
    pub fn seal_laid_out(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        buf: Vec<u8>,
        at: usize,
    ) -> Result<Vec<u8>, SessionError> {
        self.seal_kind_laid_out(rng, FRAME_DATA, buf, at)
    }

    /// A close frame: tells the peer this direction ended cleanly. Sealing
    /// afterwards fails with [`SessionError::Closed`].
    pub fn seal_close(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
    ) -> Result<Vec<u8>, SessionError> {
        let frame = self.seal_kind(rng, FRAME_CLOSE, &[])?;
        self.sent_close = true;
        Ok(frame)
    }

    fn seal_kind(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        kind: u8,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SessionError> {
        let mut buf = Vec::with_capacity(frame_len(plaintext.len()));
        buf.resize(SEAL_HEAD, 0);
        buf.extend_from_slice(plaintext);
        self.seal_kind_laid_out(rng, kind, buf, 0)
    }

    fn seal_kind_laid_out(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        kind: u8,
        mut buf: Vec<u8>,
        at: usize,
    ) -> Result<Vec<u8>, SessionError> {
        let body_start = at + SEAL_HEAD;
        assert!(
            buf.len() >= body_start,
            "a laid-out plaintext starts after the frame's header and IV"
        );
        if self.dead || self.sent_close {
            return Err(SessionError::Closed);
        }
        let plain_len = buf.len() - body_start;
        if plain_len > self.max_plaintext {
            return Err(SessionError::TooLarge);
        }
        if self.send.seq == u64::MAX {
            return Err(SessionError::Exhausted);
        }
        let total = at + frame_len(plain_len);
        buf.reserve_exact(total - buf.len());
        buf[at] = PROTOCOL_VERSION;
        buf[at + 1] = kind;
        let mut iv = [0u8; IV_BYTES];
        rng.fill_bytes(&mut iv);
        buf[at + FRAME_HEADER_BYTES..body_start].copy_from_slice(&iv);
        buf.resize(total - MAC_BYTES, 0);
        let last = total - MAC_BYTES - BLOCK_BYTES;
        Pkcs7::raw_pad(&mut buf[last..], body_start + plain_len - last);
        LaneCbc::new(&self.send.keys.enc).encrypt(&iv, &mut buf[body_start..]);
        let (header, rest) = buf[at..].split_at(FRAME_HEADER_BYTES);
        let (iv_part, ciphertext) = rest.split_at(IV_BYTES);
        let tag = self.send.tag(header, iv_part, ciphertext);
        buf.extend_from_slice(&tag);
        debug_assert_eq!(buf.len(), total);
        self.send.advance(self.rekey_after);
        Ok(buf)
    }

    /// Authenticates and decrypts the next frame from the peer. Any failure
    /// is [`SessionError::BadFrame`] and kills the session.
    pub fn open(&mut self, frame: &[u8]) -> Result<Opened, SessionError> {
        if self.dead || self.peer_closed {
            return Err(SessionError::Closed);
        }
        match self.open_inner(frame) {
            Some(opened) => {
                if opened == Opened::Close {
                    self.peer_closed = true;
                }
                Ok(opened)
            }
            None => {
                self.abort();
                Err(SessionError::BadFrame)
            }
        }
    }

    fn open_inner(&mut self, frame: &[u8]) -> Option<Opened> {
        if frame.len() < FRAME_MIN_BYTES || frame.len() > self.max_frame_bytes() {
            return None;
        }
        if self.recv.seq == u64::MAX {
            return None;
        }
        let (body, tag) = frame.split_at(frame.len() - MAC_BYTES);
        let (header, rest) = body.split_at(FRAME_HEADER_BYTES);
        let (iv, ciphertext) = rest.split_at(IV_BYTES);
        if ciphertext.len() % BLOCK_BYTES != 0 {
            return None;
        }
        // Constant-time comparison, before anything is decrypted.
        if !bool::from(self.recv.tag(header, iv, ciphertext).ct_eq(tag)) {
            return None;
        }
        let kind = match header {
            [PROTOCOL_VERSION, k @ (FRAME_DATA | FRAME_CLOSE)] => *k,
            _ => return None,
        };
        let iv: &[u8; IV_BYTES] = iv.try_into().ok()?;
        let mut plain = vec![0; ciphertext.len()];
        LaneCbc::new(&self.recv.keys.enc).decrypt(iv, ciphertext, &mut plain);
        let last = plain.len().checked_sub(BLOCK_BYTES)?;
        let kept = Pkcs7::raw_unpad(&plain[last..]).ok()?.len();
        plain.truncate(last + kept);
        if kind == FRAME_CLOSE && !plain.is_empty() {
            return None;
        }
        self.recv.advance(self.rekey_after);
        Some(if kind == FRAME_CLOSE {
            Opened::Close
        } else {
            Opened::Data(plain)
        })
    }
}

// ---------------------------------------------------------------------------
// Handshake rate limiting
// ---------------------------------------------------------------------------

/// Parameters of a [`HandshakeLimiter`]: a token bucket per key (peer
/// address or id) and one for everything, each `burst` deep and refilled
/// with one token every `interval_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimiterConfig {
    pub per_key_burst: u32,
    pub per_key_interval_ms: u64,
    pub global_burst: u32,
    pub global_interval_ms: u64,
    /// Most keys tracked at once (memory bound).
    pub keys_max: usize,
}

impl Default for LimiterConfig {
    /// 4 handshakes at once then one a second per key; 64 at once then 100
    /// a second in total; 10,000 keys tracked.
    fn default() -> LimiterConfig {
        LimiterConfig {
            per_key_burst: 4,
            per_key_interval_ms: 1000,
            global_burst: 64,
            global_interval_ms: 10,
            keys_max: 10_000,
        }
    }
}

/// Sans-IO handshake rate limiter. Ask [`HandshakeLimiter::allow`] before
/// the expensive step (handling an Auth: an RSA decryption and signature);
/// a refusal should drop the connection.
///
/// Each bucket is one number, its theoretical arrival time (the GCRA form
/// of a token bucket): a request is allowed if the bucket would not
/// overflow, and refused requests consume nothing. At most `keys_max` keys
/// are tracked; a key whose bucket has refilled is forgotten (it is
/// indistinguishable from a new key), and beyond that the fullest buckets
/// are evicted first. Eviction gives an attacker with many addresses fresh
/// buckets, which is what the global bucket is for.
#[derive(Clone, Debug)]
pub struct HandshakeLimiter<K: Ord + Clone> {
    config: LimiterConfig,
    tat: BTreeMap<K, u64>,
    by_tat: BTreeSet<(u64, K)>,
    global_tat: u64,
}

impl<K: Ord + Clone> HandshakeLimiter<K> {
    pub fn new(config: LimiterConfig) -> HandshakeLimiter<K> {
        HandshakeLimiter {
            config,
            tat: BTreeMap::new(),
            by_tat: BTreeSet::new(),
            global_tat: 0,
        }
    }

    /// Keys currently tracked.
    pub fn tracked(&self) -> usize {
        self.tat.len()
    }

    /// Whether a handshake from `key` may proceed at `now_ms`; if so, it is
    /// counted.
    pub fn allow(&mut self, key: &K, now_ms: u64) -> bool {
        let cfg = self.config;
        let per_key_tolerance = cfg
            .per_key_interval_ms
            .saturating_mul(u64::from(cfg.per_key_burst.saturating_sub(1)));
        let global_tolerance = cfg
            .global_interval_ms
            .saturating_mul(u64::from(cfg.global_burst.saturating_sub(1)));
        if cfg.per_key_burst == 0 || cfg.global_burst == 0 {
            return false;
        }
        let key_tat = self.tat.get(key).copied().unwrap_or(0).max(now_ms);
        if key_tat - now_ms > per_key_tolerance {
            return false;
        }
        let global_tat = self.global_tat.max(now_ms);
        if global_tat - now_ms > global_tolerance {
            return false;
        }
        self.global_tat = global_tat.saturating_add(cfg.global_interval_ms);
        let new_tat = key_tat.saturating_add(cfg.per_key_interval_ms);
        if let Some(old) = self.tat.insert(key.clone(), new_tat) {
            self.by_tat.remove(&(old, key.clone()));
        }
        self.by_tat.insert((new_tat, key.clone()));
        self.evict(now_ms, key);
        debug_assert_eq!(self.tat.len(), self.by_tat.len());
        true
    }

    fn evict(&mut self, now_ms: u64, keep: &K) {
        // Refilled buckets carry no information.
        while let Some((tat, k)) = self.by_tat.first().cloned() {
            if tat > now_ms {
                break;
            }
            self.by_tat.pop_first();
            self.tat.remove(&k);
        }
        while self.tat.len() > self.config.keys_max {
            let victim = self.by_tat.iter().find(|(_, k)| k != keep).cloned();
            let Some((tat, k)) = victim else { break };
            self.by_tat.remove(&(tat, k.clone()));
            self.tat.remove(&k);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use std::sync::OnceLock;

    /// Records, tombstones and request signatures carry their byte fields
    /// through [`wire_bytes`]; before, they were plain `Vec<u8>` sequences.
    /// postcard writes both as a length and the raw bytes, so what was
    /// stored or signed before reads the same and encodes to the same bytes.
    #[test]
    fn byte_strings_encode_as_plain_byte_vectors_did() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Plain(u8, Vec<u8>, u8);
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Bytes(u8, #[serde(with = "wire_bytes")] Vec<u8>, u8);
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let v: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let plain = postcard::to_allocvec(&Plain(1, v.clone(), 2)).unwrap();
            let bytes = postcard::to_allocvec(&Bytes(1, v.clone(), 2)).unwrap();
            assert_eq!(plain, bytes, "length {len}");
            assert_eq!(
                postcard::from_bytes::<Bytes>(&plain).unwrap(),
                Bytes(1, v.clone(), 2)
            );
            assert_eq!(
                postcard::from_bytes::<Plain>(&bytes).unwrap(),
                Plain(1, v, 2)
            );
        }
    }

    const BITS: usize = 1024;
    const ALICE: usize = 0;
    const BOB: usize = 1;
    const MALLORY: usize = 2;

    /// Identity keys, generated once per process from fixed seeds.
    fn identity(i: usize) -> &'static Signer {
        const N: usize = 3;
        static KEYS: [OnceLock<Signer>; N] = [const { OnceLock::new() }; N];
        KEYS[i].get_or_init(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(0x5e55_0000 + i as u64);
            Signer::generate(&mut rng, BITS).expect("test identity")
        })
    }

    /// Ephemeral keys, generated once per process from fixed seeds.
    fn ephemeral(i: usize) -> RsaPrivateKey {
        const N: usize = 4;
        static KEYS: [OnceLock<RsaPrivateKey>; N] = [const { OnceLock::new() }; N];
        KEYS[i]
            .get_or_init(|| {
                let mut rng = ChaCha20Rng::seed_from_u64(0xe9e9_0000 + i as u64);
                RsaPrivateKey::new(&mut rng, BITS).expect("test ephemeral key")
            })
            .clone()
    }

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    fn cfg() -> SessionConfig {
        SessionConfig {
            min_identity_bits: BITS,
            ephemeral_bits: BITS,
            min_ephemeral_bits: BITS,
            rotation_ms: 1000,
            grace_ms: 100,
            clock_skew_ms: 10,
            max_credential_bytes: 1024,
            max_frame_plaintext: 4096,
            rekey_after_frames: 1 << 32,
        }
    }

    fn responder_at(config: &SessionConfig, who: usize, eph: usize, now_ms: u64) -> Responder {
        Responder::with_ephemeral_key(
            &mut rng(7),
            now_ms,
            config,
            identity(who),
            b"cred-bob".to_vec(),
            ephemeral(eph),
        )
        .expect("responder")
    }

    /// Bob's responder as of time 0, shared by the cheap tests.
    fn bob() -> &'static Responder {
        static R: OnceLock<Responder> = OnceLock::new();
        R.get_or_init(|| responder_at(&cfg(), BOB, 0, 0))
    }

    /// The four messages of one handshake.
    #[derive(Clone, Debug, Default)]
    struct Wire {
        hello: Vec<u8>,
        challenge: Vec<u8>,
        auth: Vec<u8>,
        finish: Vec<u8>,
    }

    /// Runs a handshake from `who` to `resp`; `tamper(step, bytes)` may
    /// alter message `step` (0 hello .. 3 finish) in flight.
    fn run_with(
        resp: &Responder,
        who: usize,
        now_ms: u64,
        seed: u64,
        mut tamper: impl FnMut(usize, &mut Vec<u8>),
    ) -> (Result<(Session, Session), HandshakeError>, Wire) {
        let mut r = rng(seed);
        let mut wire = Wire::default();
        let result = (|| {
            let (init, mut hello) =
                Initiator::new(&mut r, &resp.config, identity(who), b"cred-alice".to_vec())?;
            tamper(0, &mut hello);
            wire.hello = hello.clone();
            let (pending, mut challenge) = resp.handle_hello(&mut r, now_ms, &hello)?;
            tamper(1, &mut challenge);
            wire.challenge = challenge.clone();
            let (wait, mut auth) = init.handle_challenge(&mut r, now_ms, &challenge)?;
            tamper(2, &mut auth);
            wire.auth = auth.clone();
            let (server, mut finish) = resp.handle_auth(&mut r, now_ms, pending, &auth)?;
            tamper(3, &mut finish);
            wire.finish = finish.clone();
            let client = wait.handle_finish(&finish)?;
            Ok((client, server))
        })();
        (result, wire)
    }

    fn run(resp: &Responder, who: usize, now_ms: u64, seed: u64) -> (Session, Session, Wire) {
        let (result, wire) = run_with(resp, who, now_ms, seed, |_, _| {});
        let (a, b) = result.expect("handshake");
        (a, b, wire)
    }

    /// A session pair straight from the key schedule (no RSA): cheap enough
    /// for thousands of property-test cases.
    fn pair(seed: u64, config: &SessionConfig) -> (Session, Session) {
        let mut r = rng(seed);
        let mut secret = [0u8; 32];
        let mut ni = [0u8; 32];
        let mut nr = [0u8; 32];
        let mut t = [0u8; 32];
        for b in [&mut secret, &mut ni, &mut nr, &mut t] {
            r.fill_bytes(b);
        }
        let peer = PeerIdentity {
            key_der: vec![],
            id: Id::ZERO,
            credential: vec![],
        };
        let a = Session::new(
            Role::Initiator,
            peer.clone(),
            &t,
            derive_keys(&secret, &ni, &nr, &t),
            config,
        );
        let b = Session::new(
            Role::Responder,
            peer,
            &t,
            derive_keys(&secret, &ni, &nr, &t),
            config,
        );
        (a, b)
    }

    fn data(o: Result<Opened, SessionError>) -> Vec<u8> {
        match o {
            Ok(Opened::Data(d)) => d,
            other => panic!("expected data, got {other:?}"),
        }
    }

    fn decode_challenge(bytes: &[u8]) -> Challenge {
        decode_msg(KIND_CHALLENGE, bytes, usize::MAX).expect("challenge")
    }

    fn decode_auth(bytes: &[u8]) -> Auth {
        decode_msg(KIND_AUTH, bytes, usize::MAX).expect("auth")
    }

    // -- key schedule --------------------------------------------------------

    #[test]
    fn hkdf_matches_rfc5869_test_case_1() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let prk = hkdf_extract(&salt, &ikm);
        assert_eq!(
            hex(&prk[..]),
            "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
        );
        let mut okm = [0u8; 42];
        hkdf_expand(&prk, &info, &mut okm);
        assert_eq!(
            hex(&okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    // -- handshake -----------------------------------------------------------

    #[test]
    fn handshake_proves_both_identities_and_frames_flow_both_ways() {
        let (mut alice, mut bob_s, _) = run(bob(), ALICE, 10, 1);
        assert_eq!(alice.peer().key_der, identity(BOB).public_der());
        assert_eq!(alice.peer().id, identity(BOB).user_id());
        assert_eq!(alice.peer().credential, b"cred-bob");
        assert_eq!(bob_s.peer().key_der, identity(ALICE).public_der());
        assert_eq!(bob_s.peer().id, identity(ALICE).user_id());
        assert_eq!(bob_s.peer().credential, b"cred-alice");
        assert_eq!(alice.session_id(), bob_s.session_id());
        assert_eq!(alice.role(), Role::Initiator);
        assert_eq!(bob_s.role(), Role::Responder);

        let mut r = rng(2);
        // Around the lane boundaries (8 blocks of 16 bytes) and the largest frame.
        let lens = [0, 1, 15, 16, 17, 127, 128, 129, 1000, 4095, 4096];
        for len in lens {
            let msg: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let f = alice.seal(&mut r, &msg).expect("seal");
            assert_eq!(f.len(), frame_len(len));
            assert_eq!(data(bob_s.open(&f)), msg);
            let g = bob_s.seal(&mut r, &msg).expect("seal");
            assert_eq!(data(alice.open(&g)), msg);
        }
        assert_eq!(alice.frames_sent(), lens.len() as u64);
        assert_eq!(alice.frames_received(), lens.len() as u64);

        // Same plaintext, fresh IV: different frames.
        let f1 = alice.seal(&mut r, b"same").expect("seal");
        let f2 = alice.seal(&mut r, b"same").expect("seal");
        assert_ne!(f1[2..18], f2[2..18]);
    }

    /// A frame whose MAC is right but whose padding is not (only someone
    /// holding the keys could make one) is still refused, never cut wrong.
    #[test]
    fn a_well_maced_frame_with_bad_padding_is_refused() {
        for last in [0u8, 17, 2] {
            let (alice, mut bob_s, _) = run(bob(), ALICE, 10, 1);
            let mut body = vec![5u8; 2 * BLOCK_BYTES];
            *body.last_mut().unwrap() = last;
            if last == 2 {
                // Says two bytes of padding, but the one before is not 2.
                body[2 * BLOCK_BYTES - 2] = 3;
            }
            let iv = [9u8; IV_BYTES];
            LaneCbc::new(&alice.send.keys.enc).encrypt(&iv, &mut body);
            let header = [PROTOCOL_VERSION, FRAME_DATA];
            let tag = alice.send.tag(&header, &iv, &body);
            let frame = [&header[..], &iv, &body, &tag].concat();
            assert_eq!(
                bob_s.open(&frame),
                Err(SessionError::BadFrame),
                "last byte {last}"
            );
        }
    }

    #[test]
    fn two_handshakes_give_unrelated_sessions() {
        let (mut a1, _, _) = run(bob(), ALICE, 10, 1);
        let (_, mut b2, _) = run(bob(), ALICE, 10, 2);
        assert_ne!(a1.session_id(), b2.session_id());
        // A frame from one session is refused by another.
        let f = a1.seal(&mut rng(3), b"hello").expect("seal");
        assert_eq!(b2.open(&f), Err(SessionError::BadFrame));
        assert!(b2.is_dead());
    }

    #[test]
    fn auth_signed_by_a_key_other_than_the_presented_one_is_refused() {
        // Mallory relays Alice's handshake but re-signs the transcript with
        // her own key, still presenting Alice's key.
        let (result, _) = run_with(bob(), ALICE, 10, 4, |step, bytes| {
            if step == 2 {
                let mut a = decode_auth(bytes);
                let mut r = rng(5);
                a.sig = identity(MALLORY).sign(&mut r, b"anything");
                *bytes = encode_msg(KIND_AUTH, &a);
            }
        });
        assert_eq!(result.err(), Some(HandshakeError::BadSignature));

        // The converse: Mallory presents her key with Alice's signature.
        let (result, _) = run_with(bob(), ALICE, 10, 6, |step, bytes| {
            if step == 2 {
                let mut a = decode_auth(bytes);
                a.identity_key = identity(MALLORY).public_der().to_vec();
                *bytes = encode_msg(KIND_AUTH, &a);
            }
        });
        assert_eq!(result.err(), Some(HandshakeError::BadSignature));
    }

    #[test]
    fn finish_signed_by_another_key_or_with_wrong_confirmation_is_refused() {
        let (result, wire) = run_with(bob(), ALICE, 10, 7, |step, bytes| {
            if step == 3 {
                let mut f: Finish = decode_msg(KIND_FINISH, bytes, usize::MAX).expect("finish");
                f.sig = identity(MALLORY).sign(&mut rng(8), b"anything");
                *bytes = encode_msg(KIND_FINISH, &f);
            }
        });
        assert!(!wire.finish.is_empty());
        assert_eq!(result.err(), Some(HandshakeError::BadSignature));

        let (result, _) = run_with(bob(), ALICE, 10, 9, |step, bytes| {
            if step == 3 {
                let mut f: Finish = decode_msg(KIND_FINISH, bytes, usize::MAX).expect("finish");
                f.confirm[0] ^= 1;
                *bytes = encode_msg(KIND_FINISH, &f);
            }
        });
        assert_eq!(result.err(), Some(HandshakeError::KeyConfirmation));
    }

    #[test]
    fn certificate_not_signed_by_the_responder_identity_is_refused() {
        // Mallory certifies an ephemeral key of hers under Bob's name.
        let (result, _) = run_with(bob(), ALICE, 10, 10, |step, bytes| {
            if step == 1 {
                let mut c = decode_challenge(bytes);
                let der = ephemeral(3)
                    .to_public_key()
                    .to_public_key_der()
                    .expect("der")
                    .into_vec();
                c.cert.sig = identity(MALLORY).sign(
                    &mut rng(11),
                    &cert_message(identity(BOB).user_id(), &der, c.cert.not_after_ms),
                );
                c.cert.key = der;
                *bytes = encode_msg(KIND_CHALLENGE, &c);
            }
        });
        assert_eq!(result.err(), Some(HandshakeError::BadCertificate));
    }

    #[test]
    fn expired_certificates_are_refused() {
        let c = cfg();
        let not_after = c.rotation_ms + c.grace_ms; // bob()'s key dates from 0
                                                    // Within clock skew: accepted.
        let mut r = rng(12);
        let (init, hello) = Initiator::new(&mut r, &c, identity(ALICE), vec![]).expect("initiator");
        let (_, challenge) = bob().handle_hello(&mut r, 0, &hello).expect("challenge");
        assert!(init
            .handle_challenge(&mut r, not_after + c.clock_skew_ms, &challenge)
            .is_ok());
        // The same certificate presented later: refused.
        let (init, hello) = Initiator::new(&mut r, &c, identity(ALICE), vec![]).expect("initiator");
        let (_, challenge) = bob().handle_hello(&mut r, 0, &hello).expect("challenge");
        assert_eq!(
            init.handle_challenge(&mut r, not_after + c.clock_skew_ms + 1, &challenge)
                .err(),
            Some(HandshakeError::CertificateExpired)
        );
        // A certificate re-dated by someone else: bad signature.
        let (init, hello) = Initiator::new(&mut r, &c, identity(ALICE), vec![]).expect("initiator");
        let (_, challenge) = bob().handle_hello(&mut r, 0, &hello).expect("challenge");
        let mut forged = decode_challenge(&challenge);
        forged.cert.not_after_ms = u64::MAX;
        assert_eq!(
            init.handle_challenge(&mut r, 5, &encode_msg(KIND_CHALLENGE, &forged))
                .err(),
            Some(HandshakeError::BadCertificate)
        );
    }

    #[test]
    fn mitm_swapping_the_ephemeral_key_is_refused() {
        // Swap in Mallory's ephemeral key, keeping Bob's certificate signature.
        let (result, _) = run_with(bob(), ALICE, 10, 13, |step, bytes| {
            if step == 1 {
                let mut c = decode_challenge(bytes);
                c.cert.key = ephemeral(3)
                    .to_public_key()
                    .to_public_key_der()
                    .expect("der")
                    .into_vec();
                *bytes = encode_msg(KIND_CHALLENGE, &c);
            }
        });
        assert_eq!(result.err(), Some(HandshakeError::BadCertificate));

        // Mallory answers as herself (her identity, her certified key) and
        // relays Alice's Auth to Bob: Bob's transcript differs, so Alice's
        // signature does not verify for him.
        let mallory = responder_at(&cfg(), MALLORY, 3, 0);
        let mut r = rng(14);
        let (init, hello) =
            Initiator::new(&mut r, &cfg(), identity(ALICE), vec![]).expect("initiator");
        let (bob_pending, _) = bob().handle_hello(&mut r, 10, &hello).expect("bob");
        let (_, mallory_challenge) = mallory.handle_hello(&mut r, 10, &hello).expect("mallory");
        let (wait, auth) = init
            .handle_challenge(&mut r, 10, &mallory_challenge)
            .expect("alice talks to mallory, knowingly");
        assert_eq!(wait.claimed_peer().id, identity(MALLORY).user_id());
        assert_eq!(
            bob().handle_auth(&mut r, 10, bob_pending, &auth).err(),
            Some(HandshakeError::BadSignature)
        );
    }

    #[test]
    fn mitm_swapping_the_wrapped_secret_is_refused() {
        let (result, _) = run_with(bob(), ALICE, 10, 15, |step, bytes| {
            if step == 2 {
                let mut a = decode_auth(bytes);
                let eph = ephemeral(0).to_public_key();
                a.wrapped_secret = eph.encrypt(&mut rng(16), oaep(), &[9u8; 32]).expect("wrap");
                *bytes = encode_msg(KIND_AUTH, &a);
            }
        });
        assert_eq!(result.err(), Some(HandshakeError::BadSignature));
    }

    #[test]
    fn replayed_handshake_messages_are_refused() {
        let (_, _, old) = run(bob(), ALICE, 10, 17);
        // A recorded Auth replayed into a fresh handshake (new nonce_r).
        let mut r = rng(18);
        let (pending, _) = bob()
            .handle_hello(&mut r, 20, &old.hello)
            .expect("challenge");
        assert_eq!(
            bob().handle_auth(&mut r, 20, pending, &old.auth).err(),
            Some(HandshakeError::BadSignature)
        );
        // A recorded Challenge replayed to a fresh initiator answers
        // another Hello: refused before anything is spent on it.
        let (init, _) = Initiator::new(&mut r, &cfg(), identity(ALICE), vec![]).expect("init");
        assert!(!init.answers(&old.challenge));
        assert_eq!(
            init.handle_challenge(&mut r, 20, &old.challenge).err(),
            Some(HandshakeError::Malformed("a challenge to another hello"))
        );
        // With the echo forged to match, the recorded Finish still fails:
        // the transcript holds this Hello.
        let (init, hello) = Initiator::new(&mut r, &cfg(), identity(ALICE), vec![]).expect("init");
        let mut c = decode_challenge(&old.challenge);
        c.echo = decode_msg::<Hello>(KIND_HELLO, &hello, 1 << 16)
            .expect("hello")
            .nonce;
        let forged = encode_msg(KIND_CHALLENGE, &c);
        assert!(init.answers(&forged));
        let (wait, _) = init
            .handle_challenge(&mut r, 20, &forged)
            .expect("a challenge is public; its echo is not signed on its own");
        assert_eq!(
            wait.handle_finish(&old.finish).err(),
            Some(HandshakeError::BadSignature)
        );
    }

    #[test]
    fn undecryptable_secret_is_not_reported_by_the_responder() {
        // Mallory, a legitimate identity, sends a wrapped secret that is not
        // a valid OAEP ciphertext (wrong contents, then wrong length) and
        // signs the transcript properly. Bob answers as if all were well:
        // the outcome is only visible as a key mismatch.
        for garbage_len in [128usize, 5] {
            let mut r = rng(19);
            let (init, hello) =
                Initiator::new(&mut r, &cfg(), identity(MALLORY), vec![]).expect("init");
            let (pending, challenge) = bob().handle_hello(&mut r, 10, &hello).expect("hello");
            let (wait, auth) = init.handle_challenge(&mut r, 10, &challenge).expect("auth");
            let mut a = decode_auth(&auth);
            a.wrapped_secret = vec![0x42; garbage_len];
            let t = Transcript::new(&hello, &challenge).finish(
                &a.identity_key,
                &a.wrapped_secret,
                &a.credential,
            );
            a.sig = identity(MALLORY).sign(
                &mut r,
                &signature_message(
                    TAG_SIG_INITIATOR,
                    &t,
                    identity(MALLORY).user_id(),
                    identity(BOB).user_id(),
                ),
            );
            let (_, finish) = bob()
                .handle_auth(&mut r, 10, pending, &encode_msg(KIND_AUTH, &a))
                .expect("no decryption oracle");
            assert_eq!(
                wait.handle_finish(&finish).err(),
                Some(HandshakeError::BadSignature),
                "Mallory's own keys were for another transcript"
            );
        }
    }

    #[test]
    fn messages_out_of_order_or_of_another_version_are_refused() {
        let (_, _, w) = run(bob(), ALICE, 10, 20);
        let mut r = rng(21);
        assert_eq!(
            bob().handle_hello(&mut r, 10, &w.auth).err(),
            Some(HandshakeError::Malformed("unexpected message kind"))
        );
        // Another version, older (the one-chain frames of version 1) or newer.
        for other in [1, PROTOCOL_VERSION + 1] {
            let mut hello = w.hello.clone();
            hello[1] = other;
            assert_eq!(
                bob().handle_hello(&mut r, 10, &hello).err(),
                Some(HandshakeError::Version(other))
            );
        }
        let mut trailing = w.hello.clone();
        trailing.push(0);
        assert!(matches!(
            bob().handle_hello(&mut r, 10, &trailing),
            Err(HandshakeError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_credentials_and_weak_keys_are_refused() {
        let c = cfg();
        let mut r = rng(22);
        assert_eq!(
            Initiator::new(
                &mut r,
                &c,
                identity(ALICE),
                vec![0; c.max_credential_bytes + 1]
            )
            .err(),
            Some(HandshakeError::CredentialTooLarge)
        );
        // A node that demands 2048-bit identities refuses Bob's 1024-bit key.
        let strict = SessionConfig {
            min_identity_bits: 2048,
            ..cfg()
        };
        let (init, hello) = Initiator::new(&mut r, &strict, identity(ALICE), vec![]).expect("i");
        let (_, challenge) = bob().handle_hello(&mut r, 10, &hello).expect("challenge");
        assert_eq!(
            init.handle_challenge(&mut r, 10, &challenge).err(),
            Some(HandshakeError::BadKey)
        );
    }

    // -- ephemeral keys and forward secrecy ----------------------------------

    #[test]
    fn handshakes_in_flight_survive_one_rotation_within_grace() {
        let mut resp = responder_at(&cfg(), BOB, 0, 0);
        let mut r = rng(23);
        let (init, hello) = Initiator::new(&mut r, &cfg(), identity(ALICE), vec![]).expect("i");
        let (pending, challenge) = resp.handle_hello(&mut r, 990, &hello).expect("hello");
        let (wait, auth) = init.handle_challenge(&mut r, 990, &challenge).expect("c");
        resp.rotate_with(&mut r, 1000, ephemeral(1))
            .expect("rotate");
        let (_, finish) = resp
            .handle_auth(&mut r, 1050, pending, &auth)
            .expect("auth");
        assert!(wait.handle_finish(&finish).is_ok());
    }

    #[test]
    fn rotation_discards_old_keys_so_recorded_handshakes_stay_closed() {
        let mut resp = responder_at(&cfg(), BOB, 0, 0);
        let mut r = rng(24);
        // Record a handshake and keep the responder's half-way state too.
        let (init, hello) = Initiator::new(&mut r, &cfg(), identity(ALICE), vec![]).expect("i");
        let (pending, challenge) = resp.handle_hello(&mut r, 10, &hello).expect("hello");
        let (_, auth) = init.handle_challenge(&mut r, 10, &challenge).expect("c");
        let wrapped = decode_auth(&auth).wrapped_secret;
        // Control: today the responder can unwrap it.
        assert_eq!(
            resp.current
                .private
                .decrypt_blinded(&mut r, oaep(), &wrapped)
                .map(|s| s.len()),
            Ok(32)
        );

        // Rotate, then let the grace window pass.
        resp.rotate_with(&mut r, 1000, ephemeral(1))
            .expect("rotate");
        assert!(resp.previous.is_some());
        assert!(!resp.maybe_rotate(&mut r, 1099).expect("no-op"));
        assert!(resp.previous.is_some());
        assert!(!resp.maybe_rotate(&mut r, 1100).expect("discard"));
        assert!(resp.previous.is_none());
        assert_eq!(resp.next_rotation_ms(), 2000);

        // Nothing the responder still holds opens the recorded secret...
        for k in std::iter::once(&resp.current).chain(resp.previous.as_ref()) {
            assert!(k.private.decrypt_blinded(&mut r, oaep(), &wrapped).is_err());
        }
        // ...and replaying the handshake finds its key gone.
        assert_eq!(
            resp.handle_auth(&mut r, 1100, pending, &auth).err(),
            Some(HandshakeError::EphemeralKeyGone)
        );
    }

    #[test]
    fn a_responder_that_is_not_rotated_stops_answering() {
        let mut resp = responder_at(&cfg(), BOB, 0, 0);
        let mut r = rng(25);
        let (_, hello) = Initiator::new(&mut r, &cfg(), identity(ALICE), vec![]).expect("i");
        assert!(resp.needs_rotation(1000));
        assert_eq!(
            resp.handle_hello(&mut r, 1100, &hello).err(),
            Some(HandshakeError::RotationOverdue)
        );
        // maybe_rotate generates a fresh key and the responder answers again.
        assert!(resp.maybe_rotate(&mut r, 1100).expect("rotate"));
        assert!(!resp.needs_rotation(1100));
        assert!(resp.handle_hello(&mut r, 1100, &hello).is_ok());
        let (a, b, _) = run(&resp, ALICE, 1150, 26);
        assert_eq!(a.session_id(), b.session_id());
    }

    // -- frames ---------------------------------------------------------------

    #[test]
    fn every_tampered_byte_is_refused() {
        let frame = pair(30, &cfg())
            .0
            .seal(&mut rng(31), &[7u8; 40])
            .expect("seal");
        for pos in 0..frame.len() {
            for xor in [0x01u8, 0x80] {
                let (mut a, mut b) = pair(30, &cfg());
                let f = a.seal(&mut rng(31), &[7u8; 40]).expect("seal");
                assert_eq!(f, frame);
                let mut bad = f.clone();
                bad[pos] ^= xor;
                assert_eq!(b.open(&bad), Err(SessionError::BadFrame), "byte {pos}");
                // The session is dead: even the genuine frame is refused now.
                assert_eq!(b.open(&f), Err(SessionError::Closed));
                assert_eq!(b.seal(&mut rng(1), b"x"), Err(SessionError::Closed));
            }
        }
        // Shortened and lengthened frames too.
        for cut in [1, 16, 32, frame.len() - FRAME_MIN_BYTES + 1] {
            let (_, mut b) = pair(30, &cfg());
            assert_eq!(
                b.open(&frame[..frame.len() - cut]),
                Err(SessionError::BadFrame)
            );
        }
        let (_, mut b) = pair(30, &cfg());
        let mut longer = frame.clone();
        longer.extend_from_slice(&[0; 16]);
        assert_eq!(b.open(&longer), Err(SessionError::BadFrame));
    }

    /// The documented MAC of a frame, computed here with the `hmac` crate.
    fn documented_tag(mac_key: &[u8], direction: u8, seq: u64, frame: &[u8]) -> Vec<u8> {
        use hmac::Mac;
        let mac = || <hmac::Hmac<sha2::Sha256>>::new_from_slice(mac_key).unwrap();
        let (header, rest) = frame.split_at(FRAME_HEADER_BYTES);
        let (iv, rest) = rest.split_at(IV_BYTES);
        let ciphertext = &rest[..rest.len() - MAC_BYTES];
        let ctx = [header, &[direction], &seq.to_be_bytes(), iv].concat();
        if ciphertext.len() < 4096 {
            let mut m = mac();
            m.update(b"peerstore/session/v1/frame");
            m.update(&ctx);
            m.update(ciphertext);
            return m.finalize().into_bytes().to_vec();
        }
        let cut = 16 * (ciphertext.len() / 32);
        let mut both = mac();
        both.update(b"peerstore/session/v3/frame-halves");
        for (i, part) in [&ciphertext[..cut], &ciphertext[cut..]]
            .into_iter()
            .enumerate()
        {
            let mut m = mac();
            m.update(b"peerstore/session/v3/frame-half");
            m.update(&ctx);
            m.update(&(ciphertext.len() as u64).to_be_bytes());
            m.update(&[i as u8]);
            m.update(part);
            both.update(&m.finalize().into_bytes());
        }
        both.finalize().into_bytes().to_vec()
    }

    /// Short frames carry one HMAC over everything, long ones the HMAC of
    /// their halves' HMACs, exactly as the module doc says, on either side
    /// of the 4 KiB cut and for a 1 MiB frame; every one opens.
    #[test]
    fn frames_are_maced_as_documented_whole_or_in_halves() {
        let config = SessionConfig {
            max_frame_plaintext: 1 << 20,
            ..cfg()
        };
        let (mut a, mut b) = pair(40, &config);
        let mut r = rng(41);
        for len in [
            0,
            100,
            4063,
            4064,
            4079,
            4080,
            4095,
            4096,
            5000,
            65_536,
            1 << 20,
        ] {
            let msg: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let (key, direction, seq) = (a.send.keys.mac.to_vec(), a.send.direction, a.send.seq);
            let f = a.seal(&mut r, &msg).expect("seal");
            assert_eq!(
                f[f.len() - MAC_BYTES..],
                documented_tag(&key, direction, seq, &f)[..],
                "plaintext of {len} bytes"
            );
            assert_eq!(data(b.open(&f)), msg, "plaintext of {len} bytes");
        }
    }

    /// A byte changed anywhere in a long frame (either half, either side
    /// of the cut, the IV, the header, the tag) kills the session.
    #[test]
    fn every_tampered_place_in_a_long_frame_is_refused() {
        let config = SessionConfig {
            max_frame_plaintext: 1 << 20,
            ..cfg()
        };
        let msg = vec![3u8; 10_000];
        let frame = pair(42, &config).0.seal(&mut rng(43), &msg).expect("seal");
        let ct_len = frame.len() - FRAME_HEADER_BYTES - IV_BYTES - MAC_BYTES;
        let cut = FRAME_HEADER_BYTES + IV_BYTES + 16 * (ct_len / 32);
        let places = [
            0,
            1,
            2,
            17,
            18,
            19,
            cut - 1,
            cut,
            cut + 1,
            frame.len() - MAC_BYTES - 1,
            frame.len() - MAC_BYTES,
            frame.len() - 1,
        ];
        for pos in places {
            let (_, mut b) = pair(42, &config);
            let mut bad = frame.clone();
            bad[pos] ^= 0x10;
            assert_eq!(b.open(&bad), Err(SessionError::BadFrame), "byte {pos}");
            assert_eq!(b.open(&frame), Err(SessionError::Closed));
        }
        // The halves swapped (equal lengths here) are refused too.
        let (_, mut b) = pair(42, &config);
        let start = FRAME_HEADER_BYTES + IV_BYTES;
        let mut swapped = frame.clone();
        let (first, second) = (
            frame[start..cut].to_vec(),
            frame[cut..start + ct_len].to_vec(),
        );
        assert_eq!(first.len(), second.len());
        swapped[start..start + ct_len].copy_from_slice(&[second, first].concat());
        assert_ne!(swapped, frame);
        assert_eq!(b.open(&swapped), Err(SessionError::BadFrame));
        let (_, mut b) = pair(42, &config);
        assert_eq!(data(b.open(&frame)), msg);
    }

    #[test]
    fn replayed_reordered_and_dropped_frames_are_refused() {
        let mut r = rng(32);
        // Replay.
        let (mut a, mut b) = pair(33, &cfg());
        let f1 = a.seal(&mut r, b"one").expect("seal");
        assert_eq!(data(b.open(&f1)), b"one");
        assert_eq!(b.open(&f1), Err(SessionError::BadFrame));
        // Reorder.
        let (mut a, mut b) = pair(33, &cfg());
        let f1 = a.seal(&mut r, b"one").expect("seal");
        let f2 = a.seal(&mut r, b"two").expect("seal");
        assert_eq!(b.open(&f2), Err(SessionError::BadFrame));
        assert_eq!(b.open(&f1), Err(SessionError::Closed));
        // Drop in the middle.
        let (mut a, mut b) = pair(33, &cfg());
        let f1 = a.seal(&mut r, b"one").expect("seal");
        let _f2 = a.seal(&mut r, b"two").expect("seal");
        let f3 = a.seal(&mut r, b"three").expect("seal");
        assert_eq!(data(b.open(&f1)), b"one");
        assert_eq!(b.open(&f3), Err(SessionError::BadFrame));
        // Reflection: a frame sent back to its sender.
        let (mut a, _) = pair(33, &cfg());
        let f1 = a.seal(&mut r, b"one").expect("seal");
        assert_eq!(a.open(&f1), Err(SessionError::BadFrame));
    }

    #[test]
    fn close_frames_tell_a_clean_end_from_truncation() {
        let mut r = rng(34);
        let (mut a, mut b) = pair(35, &cfg());
        let f1 = a.seal(&mut r, b"one").expect("seal");
        let close = a.seal_close(&mut r).expect("close");
        assert_eq!(a.seal(&mut r, b"more"), Err(SessionError::Closed));
        assert_eq!(data(b.open(&f1)), b"one");
        // Cut here, the stream is truncated: b has not seen a close.
        assert!(!b.peer_closed());
        assert_eq!(b.open(&close), Ok(Opened::Close));
        assert!(b.peer_closed());
        assert_eq!(b.open(&f1), Err(SessionError::Closed));
        // The other direction still works (half close).
        let g = b.seal(&mut r, b"bye").expect("seal");
        assert_eq!(data(a.open(&g)), b"bye");
    }

    #[test]
    fn size_limits_are_enforced_on_both_ends() {
        let c = cfg();
        let mut r = rng(36);
        let (mut a, mut b) = pair(37, &c);
        assert_eq!(
            a.seal(&mut r, &vec![0; c.max_frame_plaintext + 1]),
            Err(SessionError::TooLarge)
        );
        assert_eq!(a.max_frame_bytes(), c.max_frame_bytes());
        let f = a
            .seal(&mut r, &vec![1; c.max_frame_plaintext])
            .expect("max");
        assert_eq!(f.len(), a.max_frame_bytes());
        assert_eq!(data(b.open(&f)).len(), c.max_frame_plaintext);
        let (_, mut b) = pair(37, &c);
        assert_eq!(
            b.open(&vec![0; b.max_frame_bytes() + 16]),
            Err(SessionError::BadFrame)
        );
    }

    #[test]
    fn a_laid_out_plaintext_seals_to_the_frame_seal_makes_in_place() {
        let c = SessionConfig {
            max_frame_plaintext: 100_000,
            ..cfg()
        };
        for (len, at) in [(0, 0), (1, 1), (15, 3), (16, 1), (1000, 1), (70_000, 1)] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            // The same session state and IV draw: the same frame.
            let (mut a1, _) = pair(60, &c);
            let (mut a2, mut b) = pair(60, &c);
            let want = a1.seal(&mut rng(61), &plain).expect("seal");
            let mut buf = Vec::with_capacity(at + SEAL_HEAD + len + SEAL_TAIL);
            buf.extend((0..at).map(|i| 0xA0 + i as u8));
            buf.resize(at + SEAL_HEAD, 0xEE);
            buf.extend_from_slice(&plain);
            let before = buf.as_ptr();
            let got = a2
                .seal_laid_out(&mut rng(61), buf, at)
                .expect("seal laid out");
            assert_eq!(got.as_ptr(), before, "len {len}: sealed where it lay");
            assert!(
                got[..at]
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == 0xA0 + i as u8),
                "len {len}: the caller's bytes are kept"
            );
            assert_eq!(&got[at..], &want[..], "len {len}");
            assert_eq!(data(b.open(&got[at..])), plain, "len {len}");
        }
        // Sizes and a closed session are checked as for seal.
        let (mut a, _) = pair(62, &c);
        let mut big = vec![0; 1 + SEAL_HEAD];
        big.resize(1 + SEAL_HEAD + c.max_frame_plaintext + 1, 1);
        assert_eq!(
            a.seal_laid_out(&mut rng(63), big, 1),
            Err(SessionError::TooLarge)
        );
        a.seal_close(&mut rng(63)).expect("close");
        assert_eq!(
            a.seal_laid_out(&mut rng(63), vec![0; SEAL_HEAD], 0),
            Err(SessionError::Closed)
        );
    }

    #[test]
    fn keys_ratchet_every_n_frames_and_both_sides_follow() {
        let c = SessionConfig {
            rekey_after_frames: 3,
            ..cfg()
        };
        let mut r = rng(38);
        let (mut a, mut b) = pair(39, &c);
        let first_key = a.send.keys.enc;
        for i in 0..10u8 {
            let f = a.seal(&mut r, &[i]).expect("seal");
            assert_eq!(data(b.open(&f)), [i]);
            let g = b.seal(&mut r, &[i]).expect("seal");
            assert_eq!(data(a.open(&g)), [i]);
        }
        assert_ne!(a.send.keys.enc, first_key);
        assert_eq!(a.send.keys.enc, b.recv.keys.enc);
        // The same frames under a peer that does not ratchet fail at the
        // first frame after the ratchet point: the value must match.
        let (mut a, mut b) = pair(39, &c);
        let (_, mut b_never) = pair(39, &cfg());
        for i in 0..4u8 {
            let f = a.seal(&mut r, &[i]).expect("seal");
            assert_eq!(data(b.open(&f)), [i]);
            let result = b_never.open(&f);
            assert_eq!(result.is_ok(), i < 3, "frame {i}");
        }
    }

    #[test]
    fn abort_wipes_keys() {
        let (mut a, _) = pair(40, &cfg());
        a.abort();
        assert!(a.is_dead());
        assert_eq!(a.send.keys.enc, [0; 32]);
        assert_eq!(a.recv.keys.mac, [0; 32]);
        assert_eq!(a.seal(&mut rng(1), b"x"), Err(SessionError::Closed));
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let (a, _, _) = run(bob(), ALICE, 10, 41);
        let (init, _) = Initiator::new(&mut rng(42), &cfg(), identity(ALICE), vec![]).expect("i");
        for s in [
            format!("{a:?}"),
            format!("{:?}", bob()),
            format!("{init:?}"),
        ] {
            assert!(s.len() < 400, "{s}");
            assert!(!s.contains("BigUint") && !s.contains("enc"), "{s}");
        }
    }

    // -- rate limiting ---------------------------------------------------------

    fn limiter(keys_max: usize) -> HandshakeLimiter<u32> {
        HandshakeLimiter::new(LimiterConfig {
            per_key_burst: 3,
            per_key_interval_ms: 100,
            global_burst: 10,
            global_interval_ms: 10,
            keys_max,
        })
    }

    #[test]
    fn limiter_allows_a_burst_then_refills_at_the_rate() {
        let mut l = limiter(100);
        assert!(l.allow(&1, 1000));
        assert!(l.allow(&1, 1000));
        assert!(l.allow(&1, 1000));
        assert!(!l.allow(&1, 1000));
        assert!(!l.allow(&1, 1099));
        // Refused attempts did not consume: one token back after 100 ms.
        assert!(l.allow(&1, 1100));
        assert!(!l.allow(&1, 1100));
        // Another key is independent.
        assert!(l.allow(&2, 1100));
        // Long idle: a full burst again.
        for _ in 0..3 {
            assert!(l.allow(&1, 5000));
        }
        assert!(!l.allow(&1, 5000));
    }

    #[test]
    fn limiter_global_cap_holds_across_keys() {
        let mut l = limiter(1000);
        let allowed = (0..100u32).filter(|k| l.allow(k, 1000)).count();
        assert_eq!(allowed, 10);
        // The global bucket refills at one per 10 ms.
        assert!(l.allow(&500, 1010));
        assert!(!l.allow(&501, 1010));
    }

    #[test]
    fn limiter_memory_is_bounded() {
        let mut l = limiter(5);
        for k in 0..50u32 {
            l.allow(&k, u64::from(k) * 20);
            assert!(l.tracked() <= 5);
        }
        // Refilled buckets are forgotten.
        l.allow(&999, 1_000_000);
        assert_eq!(l.tracked(), 1);
        // Time going backwards neither panics nor grants anything: the
        // buckets are ahead of the clock, so they count as empty.
        assert!(!l.allow(&999, 0));
        assert!(!l.allow(&1000, 0));
        assert!(l.allow(&999, 1_000_100));
    }

    #[test]
    fn limiter_with_zero_burst_refuses_everything() {
        let mut l: HandshakeLimiter<u32> = HandshakeLimiter::new(LimiterConfig {
            per_key_burst: 0,
            ..LimiterConfig::default()
        });
        assert!(!l.allow(&1, 0));
    }

    // -- property tests ---------------------------------------------------------

    /// Cases for the fuzzing properties: `PEERSTORE_FUZZ_CASES` runs them
    /// longer (e.g. a million) than the default that CI runs.
    pub(crate) fn fuzz_cases(default: u32) -> u32 {
        std::env::var("PEERSTORE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases(10_000)))]

        /// Flipping any single bit of any frame is detected.
        #[test]
        fn any_bit_flip_is_detected(
            len in 0usize..200,
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
            seed in any::<u64>(),
        ) {
            let (mut a, mut b) = pair(seed, &cfg());
            let mut f = a.seal(&mut rng(seed), &vec![0x5a; len]).expect("seal");
            let i = pos.index(f.len());
            f[i] ^= 1 << bit;
            prop_assert_eq!(b.open(&f), Err(SessionError::BadFrame));
        }

        /// Arbitrary bytes never panic a decoder or `Session::open`.
        #[test]
        fn arbitrary_bytes_never_panic_decoders(
            bytes in proptest::collection::vec(any::<u8>(), 0..700),
            kind in 0u8..6,
        ) {
            let bytes = as_message(bytes, kind);
            let max = usize::MAX;
            let _ = decode_msg::<Hello>(KIND_HELLO, &bytes, max);
            let _ = decode_msg::<Challenge>(KIND_CHALLENGE, &bytes, max);
            let _ = decode_msg::<Auth>(KIND_AUTH, &bytes, max);
            let _ = decode_msg::<Finish>(KIND_FINISH, &bytes, max);
            let (_, mut s) = pair(2, &cfg());
            prop_assert!(s.open(&bytes).is_err());
        }
    }

    /// Half the cases look like a message of some kind and version 1, so the
    /// body decoder is reached.
    fn as_message(mut bytes: Vec<u8>, kind: u8) -> Vec<u8> {
        if kind < 5 && bytes.len() >= 2 {
            bytes[0] = kind;
            bytes[1] = PROTOCOL_VERSION;
        }
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases(2_000)))]

        /// Arbitrary bytes never panic a handshake handler, and are refused
        /// where a signed message is expected.
        #[test]
        fn arbitrary_bytes_never_panic_handlers(
            bytes in proptest::collection::vec(any::<u8>(), 0..700),
            kind in 0u8..6,
        ) {
            let bytes = as_message(bytes, kind);
            let mut r = rng(1);
            let _ = bob().handle_hello(&mut r, 10, &bytes);
            let hello = encode_msg(KIND_HELLO, &Hello { nonce: [0; 32] });
            let (pending, _) = bob().handle_hello(&mut r, 10, &hello).expect("hello");
            prop_assert!(bob().handle_auth(&mut r, 10, pending, &bytes).is_err());
            let (init, _) = Initiator::new(&mut r, &cfg(), identity(ALICE), vec![]).expect("init");
            prop_assert!(init.handle_challenge(&mut r, 10, &bytes).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Changing any byte of any handshake message in flight stops the
        /// handshake from completing; decoding never panics on the way.
        #[test]
        fn tampered_handshakes_never_complete(
            step in 0usize..4,
            pos in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let (result, _) = run_with(bob(), ALICE, 10, 50, |s, bytes| {
                if s == step {
                    let i = pos.index(bytes.len());
                    bytes[i] ^= xor;
                }
            });
            prop_assert!(result.is_err());
        }

        /// Garbage Finish messages are refused.
        #[test]
        fn arbitrary_finish_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (result, _) = run_with(bob(), ALICE, 10, 51, |s, b| {
                if s == 3 {
                    b.clone_from(&bytes);
                }
            });
            prop_assert!(result.is_err());
        }
    }
}
