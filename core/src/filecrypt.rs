//! Files at rest: chunk encryption, sealed metadata, key wrapping, sharing.
//!
//! The client encrypts before anything leaves it; nodes see only blocks of
//! ciphertext and a manifest whose body is ciphertext too.
//!
//! # Keys
//!
//! Every file has a random 256-bit [`FileKey`]. Two independent subkeys are
//! derived from it with HMAC-SHA256 under distinct labels: an AES-256 key and
//! an HMAC-SHA256 key. The file key reaches each permitted user wrapped with
//! RSA-OAEP(SHA-256) under that user's encryption key; the OAEP label binds
//! the wrapping to `(domain tag, file id, user id)`, so a wrapped key moved to
//! another file or another user's ACL entry does not unwrap. The owner's own
//! entry is sealed symmetrically instead, under a key derived from the
//! owner's private signing key and bound to the file and owner ids: only the
//! owner opens it, with no RSA operation.
//!
//! # Sealed chunk (one block)
//!
//! ```text
//! IV (16) || AES-256-CBC(PKCS#7)(chunk plaintext) || MAC (32)
//! MAC = HMAC-SHA256(mac key, tag "peerstore/chunk/v1" || file id (32)
//!                            || chunk index (u64 BE) || final flag (1) || IV || ciphertext)
//! ```
//!
//! A fresh random IV per chunk; the MAC is checked in constant time before
//! any decryption, and every failure is the one error
//! [`FileCryptError::BadChunk`]. Binding the file id, the index and the
//! final flag is what catches a chunk altered, moved to another position or
//! another file, and a file cut short or extended; the stream rules
//! ([`Decryptor`]) turn those into errors.
//!
//! A file of `n` bytes is `n / CHUNK_BYTES + 1` chunks: every chunk but the
//! last holds exactly [`CHUNK_BYTES`] = 1 MiB − 64 bytes and seals to exactly
//! [`BLOCK_MAX`] = 1 MiB (16 IV + 16 PKCS#7 block + 32 MAC = 64 bytes of
//! overhead). The final chunk holds the remaining 0..CHUNK_BYTES bytes (so a
//! file whose size is a multiple of the chunk size ends with an empty final
//! chunk) followed by `0x80 0x00…` padding up to
//! [`final_padded_len`]: Padmé rounding (at most 12 % larger, leaking
//! O(log log n) bits of the length) with a floor of 256 bytes and a ceiling of
//! `CHUNK_BYTES`.
//!
//! **What the nodes learn of a file's size**: the number of blocks (the size
//! rounded up to 1 MiB) and the final block's length (the remainder rounded up
//! by Padmé, to at least 256 bytes). Nothing else.
//!
//! # Sealed metadata (the manifest body)
//!
//! [`FileMeta`] (path, size, mtime, mode, chunk ids) is encoded with postcard,
//! padded with `0x80 0x00…` to a multiple of 256 bytes, and sealed exactly
//! like a chunk with the tag `"peerstore/meta/v1"` and only the file id as
//! context. Its length reveals the metadata size rounded up to 256 bytes.
//! Chunk ids (SHA-256 of each sealed chunk, the block ids) chain the owner's
//! manifest signature down to every block, so a reader holding the file key
//! still cannot substitute blocks under a manifest it did not sign.
//!
//! # Sharing and revocation
//!
//! * [`new_file_manifest`]: the owner's first version, ACL epoch 0, the owner
//!   as the only reader.
//! * [`share`]: one more reader entry, ACL epoch + 1, signed by the owner.
//! * [`revoke`]: a new version under a **new** file key. Revocation can only
//!   protect content the revoked user has not already read, and only if the
//!   content is re-encrypted, so the flow is:
//!   1. `(old_key, meta) = open_manifest(owner, manifest)`;
//!   2. `new_key = FileKey::generate(rng)`;
//!   3. stream every old block, in order, through a [`Rekeyer`], storing each
//!      new sealed chunk it returns; its [`Finished::chunk_ids`] are the new
//!      block ids;
//!   4. `revoke(.., new_key, FileMeta { chunks: new ids, ..meta }, ..)` and
//!      store that manifest (it wins: higher epoch);
//!   5. only then tombstone the old blocks.
//!
//!   A revoked user who kept the old key can still read old blocks until they
//!   are deleted, and anything they copied; nothing new.
//!
//! # Limits
//!
//! At most [`MAX_FILE_CHUNKS`] chunks (1 GiB and a little more: 1088 MiB
//! less 64 bytes a chunk) per file, because every
//! chunk id lives in the sealed metadata and the manifest is at most 64 KiB.
//! Bigger files need index blocks (not done yet).

use std::fmt;

use aes::Aes256;
use cbc::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use rand_core::CryptoRngCore;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPublicKey};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::identity::{hex, Identity};
use crate::record::{
    self, AclEntry, Manifest, PubKeyRecord, Record, RecordError, UserId, ABSOLUTE_MIN_KEY_BITS,
    MAX_KEY_BITS, MAX_RECORD_BYTES,
};
use crate::store::{self, BlockId, BLOCK_MAX};

use crate::hash::HmacSha256;

/// A file's random identifier (the manifest's `file_id`).
pub type FileId = [u8; 32];

const IV_BYTES: usize = 16;
const MAC_BYTES: usize = 32;
const AES_BLOCK: usize = 16;
/// Bytes a sealed chunk adds to a full chunk: IV, one PKCS#7 block, MAC.
pub const SEAL_OVERHEAD: usize = IV_BYTES + AES_BLOCK + MAC_BYTES;
/// Plaintext bytes in every chunk but the last: 1 MiB − 64, so that a full
/// chunk seals to exactly one maximal block.
pub const CHUNK_BYTES: usize = BLOCK_MAX - SEAL_OVERHEAD;
/// Smallest padded final chunk plaintext.
pub const MIN_FINAL_PADDED: usize = 256;
/// The sealed metadata's plaintext is padded to a multiple of this.
pub const META_PAD: usize = 256;
/// Most chunks one file may have.
pub const MAX_FILE_CHUNKS: usize = 1088;
/// Largest file, in bytes: `MAX_FILE_CHUNKS` chunks, the last one not full.
pub const MAX_FILE_BYTES: u64 = (MAX_FILE_CHUNKS * CHUNK_BYTES - 1) as u64;
/// Longest path in [`FileMeta`], in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest sealed metadata (a maximal path and chunk list).
pub const MAX_SEALED_META: usize = sealed_len(round_up(max_meta_encoding() + 1, META_PAD));

const _: () = assert!(round_up(CHUNK_BYTES, AES_BLOCK) == CHUNK_BYTES);
const _: () = assert!(sealed_len(CHUNK_BYTES) == BLOCK_MAX);
// Leaves 24 KiB of the manifest for keys, signatures and the ACL: about 50
// readers with 3072-bit keys.
const _: () = assert!(MAX_SEALED_META + 24 * 1024 <= MAX_RECORD_BYTES);

const TAG_ENC_KEY: &[u8] = b"peerstore/file-key/aes/v1";
const TAG_MAC_KEY: &[u8] = b"peerstore/file-key/hmac/v1";
const TAG_CHUNK: &[u8] = b"peerstore/chunk/v1";
const TAG_META: &[u8] = b"peerstore/meta/v1";
const TAG_WRAP: &str = "peerstore/file-key-wrap/v1";
const TAG_SELF_WRAP: &[u8] = b"peerstore/file-key-self-wrap/v1";
/// Marks an owner's own ACL entry wrapped symmetrically (see
/// [`owner_entry`]); with the fixed length below it cannot be mistaken for
/// an RSA-OAEP ciphertext (at least 128 bytes, and exactly the modulus size).
const SELF_WRAP_MARK: &[u8; 4] = b"SW1\0";
const SELF_WRAP_LEN: usize = SELF_WRAP_MARK.len() + sealed_len(32);
const _: () = assert!(SELF_WRAP_LEN < 128);

/// Length of a sealed message whose plaintext has `n` bytes.
const fn sealed_len(n: usize) -> usize {
    IV_BYTES + (n / AES_BLOCK + 1) * AES_BLOCK + MAC_BYTES
}

const fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Postcard size of the largest valid [`FileMeta`]: varint lengths and
/// integers at their widest.
const fn max_meta_encoding() -> usize {
    let path = 2 + MAX_PATH_BYTES;
    let size = 10;
    let mtime = 10;
    let mode = 5;
    let chunks = 2 + MAX_FILE_CHUNKS * 32;
    path + size + mtime + mode + chunks
}

/// Why a file operation failed. Crypto failures are deliberately coarse: one
/// error for every bad chunk, one for every bad metadata, one for every
/// failed unwrap, so no failure tells an attacker more than "no".
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileCryptError {
    /// A chunk failed authentication or does not belong at this position.
    #[error("a chunk failed authentication: it was altered, reordered, taken from another file or version, or a chunk before it is missing")]
    BadChunk,
    /// The stream ended before the final chunk.
    #[error("the file is truncated: its final chunk is missing")]
    Truncated,
    /// A chunk was offered after the final chunk.
    #[error("a chunk follows the file's final chunk")]
    TrailingChunk,
    /// The file is over [`MAX_FILE_BYTES`].
    #[error("file is larger than the 1.06 GiB (1088 chunk) limit of one manifest")]
    FileTooLarge,
    /// Sealed metadata failed authentication.
    #[error("file metadata failed authentication: altered, or sealed for another file or key")]
    BadMeta,
    /// Metadata that authenticated (or that is about to be sealed) breaks a rule.
    #[error("invalid file metadata: {0}")]
    InvalidMeta(&'static str),
    /// The user has no entry on the file's access list.
    #[error("you are not a reader of this file; ask its owner to share it with you")]
    NotReader,
    /// The wrapped file key could not be unwrapped (uniform on purpose).
    #[error("could not unwrap the file key")]
    UnwrapFailed,
    /// A reader's public key record does not verify or has no usable
    /// encryption key.
    #[error("the reader's public key record is invalid or has no usable encryption key")]
    BadReaderKey,
    /// No verified public key record was given for a reader who stays.
    #[error("no public key record was supplied for reader {0}; fetch it and retry")]
    MissingReaderKey(UserId),
    /// Only the owner may change a file's access list.
    #[error("only the file's owner can change its access list")]
    NotOwner,
    /// The owner's own entry cannot be revoked.
    #[error("the owner cannot revoke themself")]
    RevokeOwner,
    /// The user to revoke is not on the access list.
    #[error("user {0} is not on this file's access list")]
    NotListed(UserId),
    /// Revocation was asked to keep the old file key.
    #[error("revocation needs a new file key; the old one was passed")]
    KeyNotRotated,
    /// The manifest does not verify.
    #[error("manifest failed verification: {0}")]
    Manifest(RecordError),
    /// The new manifest would be over the record size limit.
    #[error("the manifest would exceed the 64 KiB record limit (too many readers or chunks)")]
    ManifestTooLarge,
    /// An epoch or clock counter would overflow.
    #[error("the manifest's epoch or clock counter is exhausted")]
    Exhausted,
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// A file's 256-bit secret key. `Debug` never shows it; zeroized on drop.
pub struct FileKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for FileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileKey(..)")
    }
}

impl PartialEq for FileKey {
    /// Constant time.
    fn eq(&self, other: &FileKey) -> bool {
        self.0.ct_eq(&*other.0).into()
    }
}

impl Eq for FileKey {}

impl FileKey {
    /// A fresh random key.
    pub fn generate(rng: &mut (impl CryptoRngCore + ?Sized)) -> FileKey {
        let mut key = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(&mut *key);
        FileKey(key)
    }

    /// A key made from a secret the caller derived (e.g.
    /// [`crate::identity::Identity::local_secret`]).
    pub fn from_secret(secret: Zeroizing<[u8; 32]>) -> FileKey {
        FileKey(secret)
    }

    fn subkeys(&self) -> Keys {
        Keys {
            enc: derive(&self.0, TAG_ENC_KEY),
            mac: derive(&self.0, TAG_MAC_KEY),
        }
    }
}

/// HMAC-SHA256(key, label): a PRF keyed by a uniformly random key, so
/// distinct labels give independent subkeys.
fn derive(key: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut mac = HmacSha256::new(key);
    mac.update(label);
    let mut tag = mac.finalize();
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&tag);
    tag.as_mut_slice().zeroize();
    out
}

/// The derived AES and HMAC keys.
struct Keys {
    enc: Zeroizing<[u8; 32]>,
    mac: Zeroizing<[u8; 32]>,
}

/// A fresh random file id.
pub fn new_file_id(rng: &mut (impl CryptoRngCore + ?Sized)) -> FileId {
    let mut id = [0u8; 32];
    rng.fill_bytes(&mut id);
    id
}

/// The block id of a sealed chunk: SHA-256 of its bytes.
pub fn chunk_id(sealed: &[u8]) -> BlockId {
    store::sha256(sealed)
}

// ---------------------------------------------------------------------------
// The sealing construction (AES-256-CBC then HMAC-SHA256)
// ---------------------------------------------------------------------------

/// MAC context of chunk `index` of file `file_id`.
fn chunk_header(file_id: &FileId, index: u64, last: bool) -> Vec<u8> {
    let mut h = Vec::with_capacity(1 + TAG_CHUNK.len() + 32 + 8 + 1);
    h.push(TAG_CHUNK.len() as u8);
    h.extend_from_slice(TAG_CHUNK);
    h.extend_from_slice(file_id);
    h.extend_from_slice(&index.to_be_bytes());
    h.push(u8::from(last));
    h
}

/// MAC context of the metadata of file `file_id`.
fn meta_header(file_id: &FileId) -> Vec<u8> {
    let mut h = Vec::with_capacity(1 + TAG_META.len() + 32);
    h.push(TAG_META.len() as u8);
    h.extend_from_slice(TAG_META);
    h.extend_from_slice(file_id);
    h
}

fn mac(keys: &Keys, header: &[u8], iv: &[u8], ciphertext: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new(&*keys.mac);
    mac.update(header);
    mac.update(iv);
    mac.update(ciphertext);
    mac
}

/// `IV || CBC(plaintext) || MAC(header || IV || ciphertext)`.
fn seal(
    rng: &mut (impl CryptoRngCore + ?Sized),
    keys: &Keys,
    header: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = encrypt(rng, keys, plaintext);
    let tag = mac(keys, header, &out[..IV_BYTES], &out[IV_BYTES..]).finalize();
    out.extend_from_slice(&tag);
    out
}

/// [`seal`], and the sealed chunk's id, hashed beside its MAC.
fn seal_with_id(
    rng: &mut (impl CryptoRngCore + ?Sized),
    keys: &Keys,
    header: &[u8],
    plaintext: &[u8],
) -> (Vec<u8>, BlockId) {
    let out = encrypt(rng, keys, plaintext);
    append_mac_and_id(keys, header, out)
}

/// `IV || CBC(plaintext)`, with room for the MAC.
fn encrypt(rng: &mut (impl CryptoRngCore + ?Sized), keys: &Keys, plaintext: &[u8]) -> Vec<u8> {
    let mut iv = [0u8; IV_BYTES];
    rng.fill_bytes(&mut iv);
    let total = sealed_len(plaintext.len());
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&iv);
    out.extend_from_slice(plaintext);
    out.resize(total - MAC_BYTES, 0);
    let ct_len = cbc::Encryptor::<Aes256>::new((&*keys.enc).into(), (&iv).into())
        .encrypt_padded_mut::<Pkcs7>(&mut out[IV_BYTES..], plaintext.len())
        .expect("buffer sized for PKCS#7 padding")
        .len();
    debug_assert_eq!(IV_BYTES + ct_len, total - MAC_BYTES);
    out
}

/// The MAC of `IV || ciphertext` under `header` and, hashed beside it
/// over the same bytes ([`crate::hash::update_two`]), the start of the
/// sealed chunk's id: SHA-256 of `IV || ciphertext` so far, the MAC to
/// follow.
fn mac_beside_id(
    keys: &Keys,
    header: &[u8],
    iv_and_ciphertext: &[u8],
) -> ([u8; 32], crate::hash::Sha256) {
    let mut mac = HmacSha256::new(&*keys.mac);
    mac.update(header);
    let mut id = crate::hash::Sha256::new();
    crate::hash::update_two(&mut mac, iv_and_ciphertext, &mut id, iv_and_ciphertext);
    (mac.finalize(), id)
}

/// Appends the MAC to `IV || ciphertext`: the sealed chunk and its id.
fn append_mac_and_id(keys: &Keys, header: &[u8], mut out: Vec<u8>) -> (Vec<u8>, BlockId) {
    let (tag, mut id) = mac_beside_id(keys, header, &out);
    out.extend_from_slice(&tag);
    id.update(tag);
    (out, id.finalize())
}

/// [`seal`] of each [`CHUNK_BYTES`] of `whole` as the non-final chunks
/// `first`, `first + 1`, … of the file: the same bytes for the same random
/// IVs (drawn in chunk order), with the chunks' CBC chains run side by side
/// ([`crate::lanes::cbc_encrypt_each`]): the AES unit works on a block of
/// each at once instead of waiting on each block's predecessor.
fn seal_full_chunks(
    rng: &mut (impl CryptoRngCore + ?Sized),
    keys: &Keys,
    file_id: &FileId,
    first: u64,
    whole: &[u8],
) -> Vec<(Vec<u8>, BlockId)> {
    let mut chunks = lay_out_full_chunks(rng, whole);
    let mut msgs: Vec<(&[u8; IV_BYTES], &mut [u8])> = chunks
        .iter_mut()
        .map(|LaidOut { iv, out }| (&*iv, &mut out[IV_BYTES..]))
        .collect();
    crate::lanes::cbc_encrypt_each(&keys.enc, &mut msgs);
    mac_full_chunks(keys, file_id, first, chunks)
}

/// A whole chunk laid out for sealing: `IV || plaintext || padding`, to
/// be encrypted after the IV in place and then MACed.
struct LaidOut {
    iv: [u8; IV_BYTES],
    out: Vec<u8>,
}

/// Each [`CHUNK_BYTES`] of `whole` laid out for sealing, IVs drawn in order.
fn lay_out_full_chunks(rng: &mut (impl CryptoRngCore + ?Sized), whole: &[u8]) -> Vec<LaidOut> {
    debug_assert!(whole.len().is_multiple_of(CHUNK_BYTES));
    whole
        .chunks_exact(CHUNK_BYTES)
        .map(|plain| {
            let mut iv = [0u8; IV_BYTES];
            rng.fill_bytes(&mut iv);
            let mut out = Vec::with_capacity(BLOCK_MAX);
            out.extend_from_slice(&iv);
            out.extend_from_slice(plain);
            // PKCS#7 of whole blocks: one block of 16s.
            out.resize(BLOCK_MAX - MAC_BYTES, AES_BLOCK as u8);
            LaidOut { iv, out }
        })
        .collect()
}

/// Appends the MAC to each encrypted chunk, chunk `first` onwards: the
/// sealed chunks and their ids.
fn mac_full_chunks(
    keys: &Keys,
    file_id: &FileId,
    first: u64,
    chunks: Vec<LaidOut>,
) -> Vec<(Vec<u8>, BlockId)> {
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, LaidOut { out, .. })| {
            append_mac_and_id(keys, &chunk_header(file_id, first + i as u64, false), out)
        })
        .collect()
}

/// Checks the MAC (constant time) and only then decrypts. `None` for any
/// failure, whatever it was.
fn open(keys: &Keys, header: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let (iv, ciphertext, tag) = split_sealed(sealed)?;
    mac(keys, header, iv, ciphertext).verify(tag).ok()?;
    decrypt(keys, iv, ciphertext)
}

/// What [`open_with_id`] found.
enum Opening {
    /// The sealed chunk is not the one with the expected id.
    WrongId,
    /// Its id is right (or was not asked for) but the MAC under this
    /// header is not.
    WrongMac,
    Open(Zeroizing<Vec<u8>>),
}

/// [`open`] of a chunk that must have the id `id`, checked (constant time)
/// beside the MAC ([`mac_beside_id`]), before anything is decrypted.
fn open_with_id(keys: &Keys, header: &[u8], sealed: &[u8], id: &BlockId) -> Opening {
    let Some((iv, ciphertext, tag)) = split_sealed(sealed) else {
        // Not the shape of a sealed chunk: no MAC to check (a full-size
        // block, the one case that tells the two apart, always has it).
        return Opening::WrongMac;
    };
    let (mac, mut hash) = mac_beside_id(keys, header, &sealed[..sealed.len() - MAC_BYTES]);
    hash.update(tag);
    if !bool::from(hash.finalize().ct_eq(id)) {
        return Opening::WrongId;
    }
    if !bool::from(mac.ct_eq(tag)) {
        return Opening::WrongMac;
    }
    match decrypt(keys, iv, ciphertext) {
        Some(plain) => Opening::Open(plain),
        None => Opening::WrongMac,
    }
}

/// `IV`, ciphertext and MAC of a sealed chunk of a possible length.
fn split_sealed(sealed: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    if sealed.len() < IV_BYTES + AES_BLOCK + MAC_BYTES {
        return None;
    }
    let ct_len = sealed.len() - IV_BYTES - MAC_BYTES;
    if round_up(ct_len, AES_BLOCK) != ct_len {
        return None;
    }
    let (iv, rest) = sealed.split_at(IV_BYTES);
    let (ciphertext, tag) = rest.split_at(rest.len() - MAC_BYTES);
    Some((iv, ciphertext, tag))
}

/// CBC decryption and PKCS#7 removal, after the MAC was checked.
fn decrypt(keys: &Keys, iv: &[u8], ciphertext: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let len = cbc::Decryptor::<Aes256>::new((&*keys.enc).into(), iv.into())
        .decrypt_padded_mut::<Pkcs7>(&mut buf)
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

/// Appends `0x80 0x00…` up to `padded` bytes (ISO/IEC 7816-4 padding).
fn pad(buf: &mut Vec<u8>, padded: usize) {
    debug_assert!(padded > buf.len());
    buf.push(0x80);
    buf.resize(padded, 0);
}

/// Length of the data before `0x80 0x00…` padding, if the padding is there.
fn unpadded_len(buf: &[u8]) -> Option<usize> {
    let last = buf.iter().rposition(|&b| b != 0)?;
    (buf[last] == 0x80).then_some(last)
}

/// The Padmé length of `n`: `n` rounded up so that only O(log log n) bits of
/// it remain, at most 12 % larger (Nikitin et al., "Reducing metadata leakage
/// from encrypted files and communication with PURBs", PETS 2019).
pub fn padme(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    let e = 63 - u64::from(n.leading_zeros()); // floor(log2 n)
    let s = 64 - u64::from(e.leading_zeros()); // floor(log2 e) + 1
    let mask = (1u64 << (e - s)) - 1;
    (n + mask) & !mask
}

/// Padded plaintext length of a final chunk holding `data_len` bytes
/// (`data_len < CHUNK_BYTES`): room for the `0x80` marker, at least
/// [`MIN_FINAL_PADDED`], Padmé-rounded, at most [`CHUNK_BYTES`].
pub fn final_padded_len(data_len: usize) -> usize {
    debug_assert!(data_len < CHUNK_BYTES);
    let n = (data_len + 1).max(MIN_FINAL_PADDED) as u64;
    (padme(n) as usize).min(CHUNK_BYTES)
}

/// Number of chunks of a file of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size / CHUNK_BYTES as u64 + 1
}

// ---------------------------------------------------------------------------
// Streaming encryption and decryption
// ---------------------------------------------------------------------------

/// What [`Encryptor::finish`] hands back. `Debug` shows sizes only.
pub struct Finished {
    /// The sealed final chunk (store it like the others).
    pub last_chunk: Vec<u8>,
    /// Block ids of all chunks in order, the last one included.
    pub chunk_ids: Vec<BlockId>,
    /// Plaintext bytes in the file.
    pub size: u64,
}

impl fmt::Debug for Finished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Finished")
            .field("last_chunk_len", &self.last_chunk.len())
            .field("chunks", &self.chunk_ids.len())
            .field("size", &self.size)
            .finish()
    }
}

/// Encrypts a file incrementally. Holds at most one chunk of plaintext
/// (zeroized on drop); each [`Encryptor::push`] returns the chunks it
/// completed. `Debug` shows progress only.
pub struct Encryptor {
    keys: Keys,
    file_id: FileId,
    buf: Zeroizing<Vec<u8>>,
    size: u64,
    chunk_ids: Vec<BlockId>,
}

impl fmt::Debug for Encryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encryptor")
            .field("size", &self.size)
            .field("chunks", &self.chunk_ids.len())
            .finish_non_exhaustive()
    }
}

impl Encryptor {
    pub fn new(key: &FileKey, file_id: FileId) -> Encryptor {
        Encryptor {
            keys: key.subkeys(),
            file_id,
            // Grown as data comes (see `make_room`): zeroing a whole
            // chunk's capacity on drop cost a small file more than sealing it.
            buf: Zeroizing::new(Vec::new()),
            size: 0,
            chunk_ids: Vec::new(),
        }
    }

    /// Takes more plaintext; returns the sealed chunks it filled (none or
    /// more; one per [`CHUNK_BYTES`] pushed). Refuses, consuming nothing,
    /// data that would take the file past [`MAX_FILE_BYTES`].
    pub fn push(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        mut data: &[u8],
    ) -> Result<Vec<Vec<u8>>, FileCryptError> {
        if self.size.saturating_add(data.len() as u64) > MAX_FILE_BYTES {
            return Err(FileCryptError::FileTooLarge);
        }
        self.size += data.len() as u64;
        let mut out = Vec::new();
        // Whole chunks straight from `data`, several at once (their CBC
        // chains interleaved), when nothing is buffered before them.
        // (A whole chunk is never the final one, which `finish` seals from
        // what is left, fewer than CHUNK_BYTES bytes and maybe none.)
        while self.buf.is_empty() && data.len() >= CHUNK_BYTES {
            let n = (data.len() / CHUNK_BYTES).min(crate::lanes::LANES);
            let (whole, rest) = data.split_at(n * CHUNK_BYTES);
            let first = self.chunk_ids.len() as u64;
            for (sealed, id) in seal_full_chunks(rng, &self.keys, &self.file_id, first, whole) {
                debug_assert_eq!(sealed.len(), BLOCK_MAX);
                self.chunk_ids.push(id);
                out.push(sealed);
            }
            data = rest;
        }
        while !data.is_empty() {
            let take = (CHUNK_BYTES - self.buf.len()).min(data.len());
            let need = self.buf.len() + take;
            make_room(&mut self.buf, need);
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_BYTES {
                // Never the final chunk: the final chunk is never full.
                let index = self.chunk_ids.len() as u64;
                let (sealed, id) = seal_with_id(
                    rng,
                    &self.keys,
                    &chunk_header(&self.file_id, index, false),
                    &self.buf,
                );
                debug_assert_eq!(sealed.len(), BLOCK_MAX);
                self.chunk_ids.push(id);
                out.push(sealed);
                self.buf.clear();
            }
        }
        debug_assert!(self.chunk_ids.len() < MAX_FILE_CHUNKS);
        Ok(out)
    }

    /// [`Encryptor::push`] of `items[i].1` to `items[i].0` for every `i`,
    /// in order: the same chunks for the same random bytes, but the whole
    /// chunks of all the files are encrypted together, a block of up to
    /// [`crate::lanes::LANES`] chunks at a time
    /// ([`crate::lanes::cbc_encrypt_keyed`]). A backup of many one-chunk
    /// files (each under its own key, so one CBC chain each) would otherwise
    /// wait on every block's predecessor. Returns each file's sealed
    /// chunks. Refuses, consuming nothing from any file, if any would pass
    /// [`MAX_FILE_BYTES`].
    pub fn push_each(
        rng: &mut (impl CryptoRngCore + ?Sized),
        items: &mut [(&mut Encryptor, &[u8])],
    ) -> Result<Vec<Vec<Vec<u8>>>, FileCryptError> {
        if items
            .iter()
            .any(|(e, data)| e.size.saturating_add(data.len() as u64) > MAX_FILE_BYTES)
        {
            return Err(FileCryptError::FileTooLarge);
        }
        // Per file: its whole chunks laid out (IVs drawn in file order, as
        // `push` would), or, after buffered bytes, what `push` sealed.
        let mut laid: Vec<Vec<LaidOut>> = Vec::with_capacity(items.len());
        let mut done: Vec<Vec<Vec<u8>>> = Vec::with_capacity(items.len());
        for (enc, data) in items.iter_mut() {
            if !enc.buf.is_empty() {
                laid.push(Vec::new());
                done.push(enc.push(rng, data)?);
                continue;
            }
            let whole = data.len() / CHUNK_BYTES * CHUNK_BYTES;
            laid.push(lay_out_full_chunks(rng, &data[..whole]));
            done.push(Vec::new());
            // The rest, less than a chunk, is buffered: nothing is sealed.
            let rest = enc.push(rng, &data[whole..])?;
            debug_assert!(rest.is_empty());
            enc.size += whole as u64;
        }
        let mut msgs: Vec<(&[u8; 32], &[u8; IV_BYTES], &mut [u8])> = Vec::new();
        for ((enc, _), chunks) in items.iter().zip(laid.iter_mut()) {
            for LaidOut { iv, out } in chunks.iter_mut() {
                msgs.push((&enc.keys.enc, iv, &mut out[IV_BYTES..]));
            }
        }
        crate::lanes::cbc_encrypt_keyed(&mut msgs);
        for (((enc, _), chunks), out) in items.iter_mut().zip(laid).zip(done.iter_mut()) {
            if chunks.is_empty() {
                continue;
            }
            let first = enc.chunk_ids.len() as u64;
            for (sealed, id) in mac_full_chunks(&enc.keys, &enc.file_id, first, chunks) {
                debug_assert_eq!(sealed.len(), BLOCK_MAX);
                enc.chunk_ids.push(id);
                out.push(sealed);
            }
        }
        Ok(done)
    }

    /// The ids of the chunks sealed so far, in order (those [`Encryptor::push`]
    /// returned last are the last ones).
    pub fn chunk_ids(&self) -> &[BlockId] {
        &self.chunk_ids
    }

    /// Seals the final chunk (the remaining bytes, padded).
    pub fn finish(mut self, rng: &mut (impl CryptoRngCore + ?Sized)) -> Finished {
        let padded = final_padded_len(self.buf.len());
        make_room(&mut self.buf, padded);
        pad(&mut self.buf, padded);
        let index = self.chunk_ids.len() as u64;
        let (last_chunk, id) = seal_with_id(
            rng,
            &self.keys,
            &chunk_header(&self.file_id, index, true),
            &self.buf,
        );
        self.chunk_ids.push(id);
        debug_assert_eq!(self.chunk_ids.len() as u64, chunk_count(self.size));
        Finished {
            last_chunk,
            chunk_ids: std::mem::take(&mut self.chunk_ids),
            size: self.size,
        }
    }
}

/// Makes `buf`'s capacity at least `need` (at most [`CHUNK_BYTES`] is ever
/// asked), by moving it into a new buffer at least twice as large: the old
/// one is zeroed as it drops, where a `Vec` growing in place would leave
/// plaintext behind in the memory it freed.
fn make_room(buf: &mut Zeroizing<Vec<u8>>, need: usize) {
    if buf.capacity() >= need {
        return;
    }
    let cap = need
        .max(2 * buf.capacity())
        .clamp(4096, CHUNK_BYTES.max(need));
    let mut bigger = Zeroizing::new(Vec::with_capacity(cap));
    bigger.extend_from_slice(buf);
    *buf = bigger;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StreamState {
    Open,
    Done,
    Failed,
}

/// Decrypts a file's sealed chunks, given in order, one at a time. Each
/// [`Decryptor::push`] returns that chunk's plaintext once its MAC verified,
/// before the rest of the file is seen: treat output as provisional (write
/// it to a temporary file) until [`Decryptor::finish`] succeeds. After any
/// error every later call fails too.
pub struct Decryptor {
    keys: Keys,
    file_id: FileId,
    index: u64,
    size: u64,
    state: StreamState,
    /// From [`Decryptor::for_meta`]: the block ids and size to insist on.
    expect: Option<(Vec<BlockId>, u64)>,
}

impl fmt::Debug for Decryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decryptor")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Decryptor {
    /// Checks chunks by their MACs alone.
    pub fn new(key: &FileKey, file_id: FileId) -> Decryptor {
        Decryptor {
            keys: key.subkeys(),
            file_id,
            index: 0,
            size: 0,
            state: StreamState::Open,
            expect: None,
        }
    }

    /// Also insists that chunk `i` hashes to `meta.chunks[i]` and that the
    /// file has `meta.size` bytes: the chunks are then exactly the ones the
    /// manifest's signer listed, not merely ones some key holder sealed.
    pub fn for_meta(key: &FileKey, file_id: FileId, meta: &FileMeta) -> Decryptor {
        let mut d = Decryptor::new(key, file_id);
        d.expect = Some((meta.chunks.clone(), meta.size));
        d
    }

    /// Verifies and decrypts the next chunk.
    pub fn push(&mut self, sealed: &[u8]) -> Result<Vec<u8>, FileCryptError> {
        match self.state {
            StreamState::Open => {}
            StreamState::Done => {
                self.state = StreamState::Failed;
                return Err(FileCryptError::TrailingChunk);
            }
            StreamState::Failed => return Err(FileCryptError::BadChunk),
        }
        match self.open_next(sealed) {
            Some(data) => Ok(data),
            None => {
                self.state = StreamState::Failed;
                Err(FileCryptError::BadChunk)
            }
        }
    }

    fn open_next(&mut self, sealed: &[u8]) -> Option<Vec<u8>> {
        let index = self.index;
        if index >= MAX_FILE_CHUNKS as u64 || sealed.len() > BLOCK_MAX {
            return None;
        }
        let expected = match &self.expect {
            Some((ids, _)) => Some(*ids.get(index as usize)?),
            None => None,
        };
        // Only a full-size block can be a non-final chunk.
        if sealed.len() == BLOCK_MAX {
            let header = chunk_header(&self.file_id, index, false);
            let opened = match &expected {
                Some(id) => match open_with_id(&self.keys, &header, sealed, id) {
                    Opening::WrongId => return None,
                    Opening::WrongMac => None,
                    Opening::Open(plain) => Some(plain),
                },
                None => open(&self.keys, &header, sealed),
            };
            if let Some(mut plain) = opened {
                if plain.len() != CHUNK_BYTES {
                    return None;
                }
                if let Some((ids, _)) = &self.expect {
                    if index + 1 >= ids.len() as u64 {
                        return None;
                    }
                }
                self.index += 1;
                self.size += CHUNK_BYTES as u64;
                return Some(std::mem::take(&mut *plain));
            }
        }
        let header = chunk_header(&self.file_id, index, true);
        let mut plain = match &expected {
            Some(id) if sealed.len() != BLOCK_MAX => {
                match open_with_id(&self.keys, &header, sealed, id) {
                    Opening::Open(plain) => plain,
                    Opening::WrongId | Opening::WrongMac => return None,
                }
            }
            // A full-size block's id was checked above.
            _ => open(&self.keys, &header, sealed)?,
        };
        let len = unpadded_len(&plain)?;
        // Canonical padding only, so one file has one final chunk form.
        if len >= CHUNK_BYTES || plain.len() != final_padded_len(len) {
            return None;
        }
        let size = self.size + len as u64;
        if let Some((ids, expected_size)) = &self.expect {
            if index + 1 != ids.len() as u64 || size != *expected_size {
                return None;
            }
        }
        plain.truncate(len);
        self.index += 1;
        self.size = size;
        self.state = StreamState::Done;
        Some(std::mem::take(&mut *plain))
    }

    /// Ends the stream: the file's size if the final chunk was seen.
    pub fn finish(self) -> Result<u64, FileCryptError> {
        match self.state {
            StreamState::Done => Ok(self.size),
            StreamState::Open => Err(FileCryptError::Truncated),
            StreamState::Failed => Err(FileCryptError::BadChunk),
        }
    }
}

/// Re-encrypts a file's chunks from one key to another, chunk by chunk (for
/// revocation). Each old chunk in gives at most one new chunk out.
#[derive(Debug)]
pub struct Rekeyer {
    dec: Decryptor,
    enc: Encryptor,
}

impl Rekeyer {
    /// Old chunks are checked against `meta` (see [`Decryptor::for_meta`]).
    pub fn new(old: &FileKey, new: &FileKey, file_id: FileId, meta: &FileMeta) -> Rekeyer {
        Rekeyer {
            dec: Decryptor::for_meta(old, file_id, meta),
            enc: Encryptor::new(new, file_id),
        }
    }

    /// The next old chunk in; the new chunks it completes out.
    pub fn push(
        &mut self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        old_sealed: &[u8],
    ) -> Result<Vec<Vec<u8>>, FileCryptError> {
        let plain = Zeroizing::new(self.dec.push(old_sealed)?);
        self.enc.push(rng, &plain)
    }

    /// The new final chunk and the new chunk ids, once every old chunk was in.
    pub fn finish(
        self,
        rng: &mut (impl CryptoRngCore + ?Sized),
    ) -> Result<Finished, FileCryptError> {
        self.dec.finish()?;
        Ok(self.enc.finish(rng))
    }
}

// ---------------------------------------------------------------------------
// File metadata
// ---------------------------------------------------------------------------

/// What a manifest's sealed body holds. `Debug` hides the path.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// The file's path relative to the synced folder (UTF-8, `/`-separated).
    pub path: String,
    /// Plaintext bytes.
    pub size: u64,
    /// Modification time, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// Unix permission bits (0 where unknown).
    pub mode: u32,
    /// Block ids of the sealed chunks in order; `chunk_count(size)` of them.
    pub chunks: Vec<BlockId>,
}

impl fmt::Debug for FileMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileMeta")
            .field("size", &self.size)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

impl FileMeta {
    fn check(&self) -> Result<(), FileCryptError> {
        if self.path.len() > MAX_PATH_BYTES {
            return Err(FileCryptError::InvalidMeta("path longer than 4096 bytes"));
        }
        if self.size > MAX_FILE_BYTES {
            return Err(FileCryptError::InvalidMeta("size over the file limit"));
        }
        if self.chunks.len() as u64 != chunk_count(self.size) {
            return Err(FileCryptError::InvalidMeta(
                "chunk count does not match the size",
            ));
        }
        Ok(())
    }
}

/// Seals `meta` under the file key for file `file_id` (the manifest body).
pub fn seal_meta(
    rng: &mut (impl CryptoRngCore + ?Sized),
    key: &FileKey,
    file_id: &FileId,
    meta: &FileMeta,
) -> Result<Vec<u8>, FileCryptError> {
    meta.check()?;
    let encoded = Zeroizing::new(
        postcard::to_allocvec(meta).expect("postcard encoding into a Vec cannot fail"),
    );
    let padded = round_up(encoded.len() + 1, META_PAD);
    let mut plain = Zeroizing::new(Vec::with_capacity(padded));
    plain.extend_from_slice(&encoded);
    pad(&mut plain, padded);
    let sealed = seal(rng, &key.subkeys(), &meta_header(file_id), &plain);
    debug_assert!(sealed.len() <= MAX_SEALED_META);
    Ok(sealed)
}

/// Opens a sealed manifest body. Never panics.
pub fn open_meta(
    key: &FileKey,
    file_id: &FileId,
    sealed: &[u8],
) -> Result<FileMeta, FileCryptError> {
    if sealed.len() > MAX_SEALED_META {
        return Err(FileCryptError::BadMeta);
    }
    let plain =
        open(&key.subkeys(), &meta_header(file_id), sealed).ok_or(FileCryptError::BadMeta)?;
    let invalid = FileCryptError::InvalidMeta("not canonically padded and encoded");
    let len = unpadded_len(&plain).ok_or(invalid)?;
    if round_up(len + 1, META_PAD) != plain.len() {
        return Err(invalid);
    }
    let meta: FileMeta = postcard::from_bytes(&plain[..len]).map_err(|_| invalid)?;
    let again = Zeroizing::new(
        postcard::to_allocvec(&meta).expect("postcard encoding into a Vec cannot fail"),
    );
    if again[..] != plain[..len] {
        return Err(invalid);
    }
    meta.check()?;
    Ok(meta)
}

// ---------------------------------------------------------------------------
// Key wrapping
// ---------------------------------------------------------------------------

/// The OAEP label: binds a wrapped key to one file and one user.
fn wrap_label(file_id: &FileId, user: &UserId) -> String {
    format!("{TAG_WRAP} file={} user={}", hex(file_id), hex(&user.0))
}

/// Wraps `key` for `user` with RSA-OAEP(SHA-256) under `enc_key_der` (SPKI
/// DER, `min_bits..=4096` bits). The caller vouches that the key is the
/// user's: take it from a verified public key record (as [`share`] does).
pub fn wrap_key(
    rng: &mut (impl CryptoRngCore + ?Sized),
    key: &FileKey,
    file_id: &FileId,
    user: &UserId,
    enc_key_der: &[u8],
    min_bits: usize,
) -> Result<Vec<u8>, FileCryptError> {
    let public =
        RsaPublicKey::from_public_key_der(enc_key_der).map_err(|_| FileCryptError::BadReaderKey)?;
    let bits = public.n().bits();
    if bits > MAX_KEY_BITS || bits < min_bits.max(ABSOLUTE_MIN_KEY_BITS) {
        return Err(FileCryptError::BadReaderKey);
    }
    let mut r = &mut *rng;
    public
        .encrypt(
            &mut r,
            Oaep::new_with_label::<Sha256, _>(wrap_label(file_id, user)),
            &key.0[..],
        )
        .map_err(|_| FileCryptError::BadReaderKey)
}

/// Unwraps a key wrapped for `identity` on file `file_id`, with blinded
/// RSA decryption. Every failure is [`FileCryptError::UnwrapFailed`].
pub fn unwrap_key(
    rng: &mut (impl CryptoRngCore + ?Sized),
    identity: &Identity,
    file_id: &FileId,
    wrapped: &[u8],
) -> Result<FileKey, FileCryptError> {
    if wrapped.len() == SELF_WRAP_LEN && wrapped.starts_with(SELF_WRAP_MARK) {
        let plain = open(
            &self_wrap_keys(identity),
            &self_wrap_header(file_id, &identity.user_id()),
            &wrapped[SELF_WRAP_MARK.len()..],
        )
        .ok_or(FileCryptError::UnwrapFailed)?;
        let bytes: [u8; 32] = plain[..]
            .try_into()
            .map_err(|_| FileCryptError::UnwrapFailed)?;
        return Ok(FileKey(Zeroizing::new(bytes)));
    }
    let mut r = &mut *rng;
    let plain = identity
        .encryption_key()
        .decrypt_blinded(
            &mut r,
            Oaep::new_with_label::<Sha256, _>(wrap_label(file_id, &identity.user_id())),
            wrapped,
        )
        .map(Zeroizing::new)
        .map_err(|_| FileCryptError::UnwrapFailed)?;
    let bytes: [u8; 32] = plain[..]
        .try_into()
        .map_err(|_| FileCryptError::UnwrapFailed)?;
    Ok(FileKey(Zeroizing::new(bytes)))
}

// ---------------------------------------------------------------------------
// Manifests: create, open, share, revoke
// ---------------------------------------------------------------------------

fn into_manifest(r: Record) -> Manifest {
    match r {
        Record::Manifest(m) => m,
        _ => unreachable!("new_manifest builds a manifest"),
    }
}

fn verify_manifest(manifest: &Manifest, min_bits: usize) -> Result<(), FileCryptError> {
    Record::Manifest(manifest.clone())
        .verify(min_bits)
        .map_err(FileCryptError::Manifest)
}

fn check_size(manifest: Manifest) -> Result<Manifest, FileCryptError> {
    let record = Record::Manifest(manifest);
    if record.encoded_len() > MAX_RECORD_BYTES {
        return Err(FileCryptError::ManifestTooLarge);
    }
    Ok(into_manifest(record))
}

/// The first version of a new file: `meta` sealed under `key`, the owner as
/// its only reader, ACL epoch 0, version `clock`.
pub fn new_file_manifest(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Identity,
    file_id: FileId,
    key: &FileKey,
    meta: &FileMeta,
    clock: u64,
) -> Result<Manifest, FileCryptError> {
    let mut ms = new_file_manifests(rng, owner, &[(file_id, key, meta)], clock);
    ms.pop().expect("one manifest asked, one made")
}

/// [`new_file_manifest`] for many files, `(file id, key, meta)` each, all
/// at version `clock`: two RSA signatures in all (one batch signature over
/// the ACLs, one over the versions; see
/// [`crate::record::Signer::sign_batch`]) instead of two per file, which
/// is what backing up many small files costs. One result per file: a file
/// whose manifest cannot be made fails alone.
pub fn new_file_manifests(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Identity,
    files: &[(FileId, &FileKey, &FileMeta)],
    clock: u64,
) -> Vec<Result<Manifest, FileCryptError>> {
    let mut out: Vec<Result<(), FileCryptError>> = Vec::with_capacity(files.len());
    let mut bodies = Vec::with_capacity(files.len());
    let mut acls = Vec::with_capacity(files.len());
    for (file_id, key, meta) in files {
        let made = seal_meta(rng, key, file_id, meta).and_then(|body| {
            let entry = owner_entry(rng, owner, key, file_id)?;
            let position = record::manifest_position(owner.user_id(), file_id);
            bodies.push((*file_id, body));
            acls.push((position, 0, vec![], vec![entry]));
            Ok(())
        });
        out.push(made);
    }
    let acls = record::new_acls(rng, owner.signer(), acls);
    let items = bodies
        .into_iter()
        .zip(acls)
        .map(|((file_id, body), acl)| {
            (
                owner.signing_public_der().to_vec(),
                file_id,
                acl,
                clock,
                body,
            )
        })
        .collect();
    let mut made = record::new_manifests(rng, owner.signer(), items).into_iter();
    out.into_iter()
        .map(|r| r.and_then(|()| check_size(made.next().expect("a manifest per sealed file"))))
        .collect()
}

/// The owner's own ACL entry. Only the owner ever opens it, so it needs no
/// public-key operation: the file key is sealed (AES-256-CBC + HMAC, as a
/// chunk) under a key derived from the owner's private signing key
/// ([`Identity::local_secret`]), bound to the file id and the owner's id.
/// Restoring a file then costs its owner no RSA decryption (milliseconds
/// each), and the owner's entry gives a remote party no RSA oracle.
/// Entries wrapped with RSA-OAEP (older manifests) still open.
fn owner_entry(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Identity,
    key: &FileKey,
    file_id: &FileId,
) -> Result<AclEntry, FileCryptError> {
    let mut wrapped = SELF_WRAP_MARK.to_vec();
    wrapped.extend(seal(
        rng,
        &self_wrap_keys(owner),
        &self_wrap_header(file_id, &owner.user_id()),
        &key.0[..],
    ));
    debug_assert_eq!(wrapped.len(), SELF_WRAP_LEN);
    Ok(AclEntry {
        user: owner.user_id(),
        wrapped_key: wrapped,
    })
}

fn self_wrap_keys(owner: &Identity) -> Keys {
    FileKey(owner.local_secret(TAG_SELF_WRAP)).subkeys()
}

fn self_wrap_header(file_id: &FileId, user: &UserId) -> Vec<u8> {
    let mut h = Vec::with_capacity(1 + TAG_SELF_WRAP.len() + 32 + 20);
    h.push(TAG_SELF_WRAP.len() as u8);
    h.extend_from_slice(TAG_SELF_WRAP);
    h.extend_from_slice(file_id);
    h.extend_from_slice(&user.0);
    h
}

/// A reader's view: verifies the manifest (owner's ACL signature, signer
/// allowed, version signature), finds the reader's entry, unwraps the file
/// key and opens the metadata.
pub fn open_manifest(
    rng: &mut (impl CryptoRngCore + ?Sized),
    identity: &Identity,
    manifest: &Manifest,
    min_bits: usize,
) -> Result<(FileKey, FileMeta), FileCryptError> {
    verify_manifest(manifest, min_bits)?;
    let entry = manifest
        .acl
        .reader(&identity.user_id())
        .ok_or(FileCryptError::NotReader)?;
    let key = unwrap_key(rng, identity, &manifest.file_id, &entry.wrapped_key)?;
    let meta = open_meta(&key, &manifest.file_id, &manifest.body)?;
    Ok((key, meta))
}

/// Checks a reader's public key record and returns `(user id, enc key DER)`.
fn reader_key(reader: &PubKeyRecord, min_bits: usize) -> Result<(UserId, &[u8]), FileCryptError> {
    if reader.enc_key.is_empty() {
        return Err(FileCryptError::BadReaderKey);
    }
    Record::PubKey(reader.clone())
        .verify(min_bits)
        .map_err(|_| FileCryptError::BadReaderKey)?;
    Ok((record::user_id(&reader.signing_key), &reader.enc_key))
}

fn check_owner(owner: &Identity, manifest: &Manifest) -> Result<(), FileCryptError> {
    if manifest.owner_key != owner.signing_public_der() {
        return Err(FileCryptError::NotOwner);
    }
    Ok(())
}

/// The next version's `(epoch, clock)`.
fn bump(manifest: &Manifest) -> Result<(u64, u64), FileCryptError> {
    let epoch = manifest.acl.epoch.checked_add(1);
    let clock = manifest.version.clock.checked_add(1);
    epoch.zip(clock).ok_or(FileCryptError::Exhausted)
}

/// The owner grants `reader` (their verified public key record) read access:
/// a new version with the file key wrapped for them, ACL epoch + 1. Sharing
/// again with a listed reader re-wraps for their current key.
pub fn share(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Identity,
    manifest: &Manifest,
    reader: &PubKeyRecord,
    min_bits: usize,
) -> Result<Manifest, FileCryptError> {
    let mut ms = share_many(rng, owner, std::slice::from_ref(manifest), reader, min_bits)?;
    Ok(ms.pop().expect("one manifest shared, one made"))
}

/// [`share`] for many files at once: two RSA signatures in all (one batch
/// over the new ACLs, one over the new versions) instead of two per file.
/// Fails as a whole if any manifest cannot be shared.
pub fn share_many(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Identity,
    manifests: &[Manifest],
    reader: &PubKeyRecord,
    min_bits: usize,
) -> Result<Vec<Manifest>, FileCryptError> {
    let (user, enc_key) = reader_key(reader, min_bits)?;
    let mut acls = Vec::with_capacity(manifests.len());
    let mut clocks = Vec::with_capacity(manifests.len());
    for manifest in manifests {
        check_owner(owner, manifest)?;
        verify_manifest(manifest, min_bits)?;
        let entry = manifest
            .acl
            .reader(&owner.user_id())
            .ok_or(FileCryptError::NotReader)?;
        let key = unwrap_key(rng, owner, &manifest.file_id, &entry.wrapped_key)?;
        let wrapped_key = wrap_key(rng, &key, &manifest.file_id, &user, enc_key, min_bits)?;
        let mut readers: Vec<AclEntry> = manifest
            .acl
            .readers
            .iter()
            .filter(|e| e.user != user)
            .cloned()
            .collect();
        readers.push(AclEntry { user, wrapped_key });
        let (epoch, clock) = bump(manifest)?;
        acls.push((
            manifest.position(),
            epoch,
            manifest.acl.writers.clone(),
            readers,
        ));
        clocks.push(clock);
    }
    let acls = record::new_acls(rng, owner.signer(), acls);
    let items = manifests
        .iter()
        .zip(acls)
        .zip(clocks)
        .map(|((m, acl), clock)| (m.owner_key.clone(), m.file_id, acl, clock, m.body.clone()))
        .collect();
    record::new_manifests(rng, owner.signer(), items)
        .into_iter()
        .map(check_size)
        .collect()
}

/// The owner withdraws `revoked`'s access: a new version under `new_key`
/// whose metadata is `new_meta` (chunk ids of the chunks re-encrypted with a
/// [`Rekeyer`]; see the module docs for the flow), every remaining reader
/// re-wrapped from `remaining` (their verified public key records), the
/// revoked user removed as reader and writer, ACL epoch + 1.
#[allow(clippy::too_many_arguments)]
pub fn revoke(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Identity,
    manifest: &Manifest,
    revoked: &UserId,
    remaining: &[PubKeyRecord],
    new_key: &FileKey,
    new_meta: &FileMeta,
    min_bits: usize,
) -> Result<Manifest, FileCryptError> {
    let mut ms = revoke_many(
        rng,
        owner,
        &[(manifest, new_key, new_meta)],
        revoked,
        remaining,
        min_bits,
    )?;
    Ok(ms.pop().expect("one manifest revoked, one made"))
}

/// One file for [`revoke_many`]: its manifest, its new key and its
/// metadata over the re-encrypted chunks.
pub type Rekeyed<'a> = (&'a Manifest, &'a FileKey, &'a FileMeta);

/// [`revoke`] for many files at once: two RSA signatures in all (one batch
/// over the new ACLs, one over the new versions) instead of two per file.
/// `remaining` holds the public key records of every reader left on any
/// of the files. Fails as a whole if any file cannot be revoked.
pub fn revoke_many(
    rng: &mut (impl CryptoRngCore + ?Sized),
    owner: &Identity,
    files: &[Rekeyed<'_>],
    revoked: &UserId,
    remaining: &[PubKeyRecord],
    min_bits: usize,
) -> Result<Vec<Manifest>, FileCryptError> {
    let owner_id = owner.user_id();
    if *revoked == owner_id {
        return Err(FileCryptError::RevokeOwner);
    }
    let mut acls = Vec::with_capacity(files.len());
    let mut rest = Vec::with_capacity(files.len());
    for &(manifest, new_key, new_meta) in files {
        check_owner(owner, manifest)?;
        verify_manifest(manifest, min_bits)?;
        if manifest.acl.reader(revoked).is_none() && !manifest.acl.allows_writer(revoked) {
            return Err(FileCryptError::NotListed(*revoked));
        }
        if let Some(entry) = manifest.acl.reader(&owner_id) {
            let old = unwrap_key(rng, owner, &manifest.file_id, &entry.wrapped_key)?;
            if old == *new_key {
                return Err(FileCryptError::KeyNotRotated);
            }
        }
        let file_id = manifest.file_id;
        let mut readers = vec![owner_entry(rng, owner, new_key, &file_id)?];
        for entry in &manifest.acl.readers {
            if entry.user == *revoked || entry.user == owner_id {
                continue;
            }
            let record = remaining
                .iter()
                .find(|r| record::user_id(&r.signing_key) == entry.user)
                .ok_or(FileCryptError::MissingReaderKey(entry.user))?;
            let (user, enc_key) = reader_key(record, min_bits)?;
            let wrapped_key = wrap_key(rng, new_key, &file_id, &user, enc_key, min_bits)?;
            readers.push(AclEntry { user, wrapped_key });
        }
        let writers = manifest
            .acl
            .writers
            .iter()
            .filter(|w| *w != revoked)
            .copied()
            .collect();
        let body = seal_meta(rng, new_key, &file_id, new_meta)?;
        let (epoch, clock) = bump(manifest)?;
        acls.push((manifest.position(), epoch, writers, readers));
        rest.push((manifest.owner_key.clone(), file_id, clock, body));
    }
    let acls = record::new_acls(rng, owner.signer(), acls);
    let items = rest
        .into_iter()
        .zip(acls)
        .map(|((owner_key, file_id, clock, body), acl)| (owner_key, file_id, acl, clock, body))
        .collect();
    record::new_manifests(rng, owner.signer(), items)
        .into_iter()
        .map(check_size)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{rng, test_identity, TEST_BITS};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    const FILE: FileId = [7; 32];
    const OTHER_FILE: FileId = [8; 32];
    const C: usize = CHUNK_BYTES;

    fn key(i: u64) -> FileKey {
        FileKey::generate(&mut rng(0xf11e_0000 + i))
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ seed)
            .collect()
    }

    /// All sealed chunks of `plain`, pushed in `piece`-byte pieces.
    fn encrypt(key: &FileKey, file_id: FileId, plain: &[u8], piece: usize) -> Sealed {
        let mut r = rng(plain.len() as u64 ^ u64::from(file_id[0]) ^ (piece as u64) << 40);
        let mut enc = Encryptor::new(key, file_id);
        let mut chunks = Vec::new();
        for p in plain.chunks(piece.max(1)) {
            chunks.extend(enc.push(&mut r, p).unwrap());
        }
        let fin = enc.finish(&mut r);
        chunks.push(fin.last_chunk);
        assert_eq!(
            fin.chunk_ids,
            chunks.iter().map(|c| chunk_id(c)).collect::<Vec<_>>()
        );
        assert_eq!(fin.size, plain.len() as u64);
        Sealed {
            chunks,
            ids: fin.chunk_ids,
        }
    }

    struct Sealed {
        chunks: Vec<Vec<u8>>,
        ids: Vec<BlockId>,
    }

    /// Whole chunks pushed together are sealed side by side (more than
    /// [`crate::lanes::LANES`] of them in two groups); from the same
    /// random bytes they are exactly the chunks sealed one at a time.
    #[test]
    fn chunks_sealed_together_are_the_chunks_sealed_one_by_one() {
        let k = key(5);
        let plain = data(10 * C + 5, 3);
        let sealed = |plain: &[u8], pieces: &[usize]| {
            let mut r = rng(77);
            let mut enc = Encryptor::new(&k, FILE);
            let mut chunks = Vec::new();
            let mut at = 0;
            for &n in pieces {
                chunks.extend(enc.push(&mut r, &plain[at..at + n]).unwrap());
                at += n;
            }
            assert_eq!(at, plain.len());
            let fin = enc.finish(&mut r);
            chunks.push(fin.last_chunk);
            assert_eq!(
                fin.chunk_ids,
                chunks.iter().map(|c| chunk_id(c)).collect::<Vec<_>>()
            );
            chunks
        };
        let one_by_one = sealed(
            &plain,
            &[C; 10].iter().copied().chain([5]).collect::<Vec<_>>(),
        );
        let together = sealed(&plain, &[10 * C + 5]);
        let exactly_whole = sealed(&plain, &[9 * C, C + 5]);
        let after_a_partial = sealed(&plain, &[100, 10 * C - 95]);
        assert_eq!(one_by_one.len(), 11);
        assert!(one_by_one == together, "all at once");
        assert!(
            one_by_one == exactly_whole,
            "nine whole chunks, then the rest"
        );
        assert!(one_by_one == after_a_partial, "a partial chunk first");
        let dec = Decryptor::new(&k, FILE);
        assert!(decrypt(dec, &together).unwrap() == plain);
        // A file of whole chunks ends with an empty final chunk either way.
        let whole = &plain[..2 * C];
        let two = sealed(whole, &[2 * C]);
        assert_eq!(two.len(), 3);
        assert!(two == sealed(whole, &[C, C]), "two whole chunks");
        assert!(decrypt(Decryptor::new(&k, FILE), &two).unwrap() == whole);
    }

    fn decrypt<'a>(
        mut dec: Decryptor,
        chunks: impl IntoIterator<Item = &'a Vec<u8>>,
    ) -> Result<Vec<u8>, FileCryptError> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend(dec.push(c)?);
        }
        let size = dec.finish()?;
        assert_eq!(size, out.len() as u64);
        Ok(out)
    }

    fn meta_for(path: &str, size: u64, ids: Vec<BlockId>) -> FileMeta {
        FileMeta {
            path: path.to_string(),
            size,
            mtime_ms: 1_700_000_000_000,
            mode: 0o644,
            chunks: ids,
        }
    }

    /// A three-chunk file (two full chunks and a short final one), and the
    /// same plaintext sealed as another file under the same key.
    fn three() -> &'static (Vec<u8>, Sealed, Sealed) {
        static T: OnceLock<(Vec<u8>, Sealed, Sealed)> = OnceLock::new();
        T.get_or_init(|| {
            let plain = data(2 * C + 1000, 1);
            let a = encrypt(&key(0), FILE, &plain, 1 << 16);
            let b = encrypt(&key(0), OTHER_FILE, &plain, 1 << 16);
            (plain, a, b)
        })
    }

    fn dec() -> Decryptor {
        Decryptor::new(&key(0), FILE)
    }

    // -- chunking round trips -----------------------------------------------

    #[test]
    fn round_trips_at_chunk_boundaries() {
        let k = key(1);
        for size in [0, 1, C - 1, C, C + 1, 3 * C] {
            let plain = data(size, 2);
            for piece in [100_003, C + 7] {
                let s = encrypt(&k, FILE, &plain, piece);
                assert_eq!(s.chunks.len() as u64, chunk_count(size as u64), "{size}");
                let (last, full) = s.chunks.split_last().unwrap();
                assert!(full.iter().all(|c| c.len() == BLOCK_MAX), "{size}");
                assert_eq!(last.len(), sealed_len(final_padded_len(size % C)), "{size}");
                assert!(last.len() <= BLOCK_MAX);
                let back = decrypt(Decryptor::new(&k, FILE), &s.chunks).unwrap();
                assert!(back == plain, "size {size}");
                let meta = meta_for("f", size as u64, s.ids.clone());
                let back = decrypt(Decryptor::for_meta(&k, FILE, &meta), &s.chunks).unwrap();
                assert!(back == plain, "size {size}");
            }
        }
        // A file of exactly one chunk's worth ends with an empty final chunk.
        assert_eq!(chunk_count(C as u64), 2);
        assert_eq!(chunk_count(C as u64 - 1), 1);
    }

    /// Several files pushed together give exactly the chunks, ids and
    /// final chunks that pushing each in turn gives (the same random bytes
    /// drawn in the same order): files of no whole chunk, one, several,
    /// more files than lanes, and a file with bytes already buffered.
    #[test]
    fn files_pushed_together_are_the_files_pushed_one_by_one() {
        let sizes = [
            0,
            5,
            C,
            C + 64,
            3 * C + 1,
            2 * C,
            77,
            C - 1,
            C + 1,
            4 * C,
            C,
        ];
        let plains: Vec<Vec<u8>> = (0..sizes.len()).map(|i| data(sizes[i], i as u8)).collect();
        let file_id = |i: usize| [i as u8 + 40; 32];
        // File 2 has 100 bytes buffered before the pushes compared.
        let start = |r: &mut rand_chacha::ChaCha20Rng| -> Vec<Encryptor> {
            (0..sizes.len())
                .map(|i| {
                    let mut e = Encryptor::new(&key(i as u64), file_id(i));
                    if i == 2 {
                        assert!(e.push(r, &[9; 100]).unwrap().is_empty());
                    }
                    e
                })
                .collect()
        };
        let finish = |encs: Vec<Encryptor>,
                      r: &mut rand_chacha::ChaCha20Rng|
         -> Vec<(Vec<u8>, Vec<BlockId>, u64)> {
            encs.into_iter()
                .map(|e| {
                    let f = e.finish(r);
                    (f.last_chunk, f.chunk_ids, f.size)
                })
                .collect()
        };

        let mut r = rng(91);
        let mut encs = start(&mut r);
        let one_by_one: Vec<Vec<Vec<u8>>> = encs
            .iter_mut()
            .zip(&plains)
            .map(|(e, p)| e.push(&mut r, p).unwrap())
            .collect();
        let one_by_one_fin = finish(encs, &mut r);

        let mut r = rng(91);
        let mut encs = start(&mut r);
        let mut items: Vec<(&mut Encryptor, &[u8])> = encs
            .iter_mut()
            .zip(&plains)
            .map(|(e, p)| (e, p.as_slice()))
            .collect();
        let together = Encryptor::push_each(&mut r, &mut items).unwrap();
        let together_fin = finish(encs, &mut r);

        assert_eq!(together.len(), sizes.len());
        for (i, (a, b)) in one_by_one.iter().zip(&together).enumerate() {
            assert_eq!(a.len(), b.len(), "file {i}: chunk count");
            assert!(a == b, "file {i}: chunks differ");
        }
        assert!(
            one_by_one_fin == together_fin,
            "final chunks, ids or sizes differ"
        );
        // And they open: file 4 (three whole chunks and a byte).
        let mut chunks = together[4].clone();
        chunks.push(together_fin[4].0.clone());
        let dec = Decryptor::new(&key(4), file_id(4));
        assert!(decrypt(dec, &chunks).unwrap() == plains[4]);
    }

    #[test]
    fn files_pushed_together_are_refused_whole_if_one_is_too_large() {
        let mut r = rng(5);
        let mut small = Encryptor::new(&key(1), FILE);
        let mut full = Encryptor::new(&key(2), FILE);
        full.size = MAX_FILE_BYTES - 10;
        let piece = data(C + 3, 1);
        let mut items: Vec<(&mut Encryptor, &[u8])> =
            vec![(&mut small, piece.as_slice()), (&mut full, &piece[..11])];
        assert_eq!(
            Encryptor::push_each(&mut r, &mut items).unwrap_err(),
            FileCryptError::FileTooLarge
        );
        assert_eq!(
            (small.size, small.chunk_ids.len()),
            (0, 0),
            "nothing consumed"
        );
        assert_eq!(full.size, MAX_FILE_BYTES - 10);
        let mut items: Vec<(&mut Encryptor, &[u8])> =
            vec![(&mut small, piece.as_slice()), (&mut full, &piece[..10])];
        let out = Encryptor::push_each(&mut r, &mut items).unwrap();
        assert_eq!((out[0].len(), out[1].len()), (1, 0));
        assert_eq!(full.size, MAX_FILE_BYTES);
    }

    #[test]
    fn encryptor_refuses_files_over_the_limit() {
        let k = key(2);
        let mut r = rng(3);
        let mut enc = Encryptor::new(&k, FILE);
        // Pretend MAX_FILE_CHUNKS - 1 full chunks went out already (pushing a
        // real gibibyte takes minutes in a debug build).
        enc.size = (MAX_FILE_CHUNKS as u64 - 1) * C as u64;
        enc.chunk_ids = vec![[0; 32]; MAX_FILE_CHUNKS - 1];
        let piece = vec![0u8; C];
        // Refused whole, consuming nothing.
        assert_eq!(
            enc.push(&mut r, &piece).unwrap_err(),
            FileCryptError::FileTooLarge
        );
        assert_eq!(enc.push(&mut r, &piece[..C - 1]).unwrap().len(), 0);
        assert_eq!(
            enc.push(&mut r, &[0]).unwrap_err(),
            FileCryptError::FileTooLarge
        );
        let fin = enc.finish(&mut r);
        assert_eq!(fin.size, MAX_FILE_BYTES);
        assert_eq!(fin.chunk_ids.len(), MAX_FILE_CHUNKS);
        assert_eq!(fin.last_chunk.len(), BLOCK_MAX);
    }

    #[test]
    fn padding_hides_the_final_length() {
        // Padmé: never shorter, at most 12 % longer, monotonic.
        let mut prev = 0;
        for n in (0..70_000u64).chain((1 << 20) - 300..(1 << 20) + 10) {
            let p = padme(n);
            assert!(p >= n && p >= prev, "{n}");
            assert!(p * 100 <= n * 112 || n < 2, "{n} -> {p}");
            prev = p;
        }
        assert_eq!(final_padded_len(0), MIN_FINAL_PADDED);
        assert_eq!(final_padded_len(255), MIN_FINAL_PADDED);
        assert_eq!(final_padded_len(C - 1), C);
        // Files of 1 and 200 bytes look the same; so do 1000 and 1010.
        assert_eq!(final_padded_len(1), final_padded_len(200));
        assert_eq!(final_padded_len(1000), final_padded_len(1010));
    }

    // -- attacks on chunks --------------------------------------------------

    #[test]
    fn altered_chunks_are_refused_in_every_region() {
        let (_, s, _) = three();
        for which in [1, 2] {
            let len = s.chunks[which].len();
            for pos in [0, 15, 16, 16 + 500, len - 33, len - 32, len - 1] {
                let mut chunks = s.chunks.clone();
                chunks[which][pos] ^= 0x01;
                let mut d = dec();
                assert!(d.push(&chunks[0]).is_ok());
                if which == 2 {
                    assert!(d.push(&chunks[1]).is_ok());
                }
                assert_eq!(
                    d.push(&chunks[which]),
                    Err(FileCryptError::BadChunk),
                    "chunk {which} byte {pos}"
                );
                // Poisoned from then on.
                assert_eq!(d.push(&s.chunks[2]), Err(FileCryptError::BadChunk));
                assert_eq!(d.finish(), Err(FileCryptError::BadChunk));
            }
        }
        // Truncated or extended bytes.
        let mut d = dec();
        assert_eq!(
            d.push(&s.chunks[0][..BLOCK_MAX - 16]),
            Err(FileCryptError::BadChunk)
        );
        let mut long = s.chunks[2].clone();
        long.extend_from_slice(&[0; 16]);
        let mut d = dec();
        d.push(&s.chunks[0]).unwrap();
        d.push(&s.chunks[1]).unwrap();
        assert_eq!(d.push(&long), Err(FileCryptError::BadChunk));
    }

    #[test]
    fn moved_dropped_and_appended_chunks_are_refused() {
        let (plain, s, other) = three();
        let c = &s.chunks;
        assert!(decrypt(dec(), c).unwrap() == *plain);
        // Moved between positions.
        assert_eq!(
            decrypt(dec(), [&c[1], &c[0], &c[2]]),
            Err(FileCryptError::BadChunk)
        );
        assert_eq!(
            decrypt(dec(), [&c[0], &c[0], &c[2]]),
            Err(FileCryptError::BadChunk)
        );
        // A middle chunk dropped.
        assert_eq!(
            decrypt(dec(), [&c[0], &c[2]]),
            Err(FileCryptError::BadChunk)
        );
        // The final chunk dropped, or everything after the first.
        assert_eq!(
            decrypt(dec(), [&c[0], &c[1]]),
            Err(FileCryptError::Truncated)
        );
        assert_eq!(decrypt(dec(), [&c[0]]), Err(FileCryptError::Truncated));
        assert_eq!(decrypt(dec(), []), Err(FileCryptError::Truncated));
        // Appended after the final chunk.
        assert_eq!(
            decrypt(dec(), [&c[0], &c[1], &c[2], &c[2]]),
            Err(FileCryptError::TrailingChunk)
        );
        assert_eq!(
            decrypt(dec(), [&c[0], &c[1], &c[2], &other.chunks[0]]),
            Err(FileCryptError::TrailingChunk)
        );
        // Moved from another file under the same key, same position.
        assert_eq!(
            decrypt(dec(), [&c[0], &other.chunks[1], &c[2]]),
            Err(FileCryptError::BadChunk)
        );
        assert_eq!(
            decrypt(dec(), [&c[0], &c[1], &other.chunks[2]]),
            Err(FileCryptError::BadChunk)
        );
        // The right file id but another key.
        assert_eq!(
            decrypt(Decryptor::new(&key(9), FILE), c),
            Err(FileCryptError::BadChunk)
        );
    }

    #[test]
    fn meta_pins_the_exact_chunks() {
        let (plain, s, _) = three();
        // The same plaintext sealed again (fresh IVs): every chunk passes its
        // MAC in place of the original, but is not the block the meta lists.
        let again = encrypt(&key(0), FILE, plain, C);
        assert_ne!(again.ids, s.ids);
        let mixed = [&s.chunks[0], &again.chunks[1], &s.chunks[2]];
        assert!(decrypt(dec(), mixed).is_ok());
        let meta = meta_for("f", plain.len() as u64, s.ids.clone());
        assert_eq!(
            decrypt(Decryptor::for_meta(&key(0), FILE, &meta), mixed),
            Err(FileCryptError::BadChunk)
        );
        // The final chunk too (its id is checked beside its MAC as well).
        let last_swapped = [&s.chunks[0], &s.chunks[1], &again.chunks[2]];
        assert!(decrypt(dec(), last_swapped).is_ok());
        assert_eq!(
            decrypt(Decryptor::for_meta(&key(0), FILE, &meta), last_swapped),
            Err(FileCryptError::BadChunk)
        );
        assert!(decrypt(Decryptor::for_meta(&key(0), FILE, &meta), &s.chunks).is_ok());
        // A meta claiming a different size is refused at the final chunk.
        let wrong = meta_for("f", plain.len() as u64 - 1, s.ids.clone());
        assert_eq!(
            decrypt(Decryptor::for_meta(&key(0), FILE, &wrong), &s.chunks),
            Err(FileCryptError::BadChunk)
        );
    }

    // -- metadata -----------------------------------------------------------

    #[test]
    fn meta_round_trips_padded() {
        let k = key(3);
        let (_, s, _) = three();
        let meta = meta_for("photos/2024/cat.jpg", 2 * C as u64 + 1000, s.ids.clone());
        let sealed = seal_meta(&mut rng(4), &k, &FILE, &meta).unwrap();
        assert_eq!(open_meta(&k, &FILE, &sealed), Ok(meta.clone()));
        assert_eq!((sealed.len() - SEAL_OVERHEAD) % META_PAD, 0);
        // Short and longer names seal to the same length.
        let mut short = meta.clone();
        short.path = "a".into();
        let mut longer = meta.clone();
        longer.path = "b".repeat(120);
        let len = |m: &FileMeta| seal_meta(&mut rng(5), &k, &FILE, m).unwrap().len();
        assert_eq!(len(&short), len(&longer));
        assert_eq!(len(&short), sealed.len());
        // The largest metadata fits the bound.
        let max = FileMeta {
            path: "x".repeat(MAX_PATH_BYTES),
            size: MAX_FILE_BYTES,
            mtime_ms: i64::MIN,
            mode: u32::MAX,
            chunks: vec![[0xff; 32]; MAX_FILE_CHUNKS],
        };
        let sealed_max = seal_meta(&mut rng(6), &k, &FILE, &max).unwrap();
        assert!(sealed_max.len() <= MAX_SEALED_META);
        assert_eq!(open_meta(&k, &FILE, &sealed_max), Ok(max));
        // Debug hides the path.
        assert!(!format!("{meta:?}").contains("cat"));
    }

    #[test]
    fn bad_meta_is_refused() {
        let k = key(3);
        let meta = meta_for("a/b", 5, vec![[1; 32]]);
        let sealed = seal_meta(&mut rng(7), &k, &FILE, &meta).unwrap();
        assert_eq!(
            open_meta(&key(4), &FILE, &sealed),
            Err(FileCryptError::BadMeta)
        );
        assert_eq!(
            open_meta(&k, &OTHER_FILE, &sealed),
            Err(FileCryptError::BadMeta)
        );
        assert_eq!(
            open_meta(&k, &FILE, &sealed[..sealed.len() - 1]),
            Err(FileCryptError::BadMeta)
        );
        assert_eq!(open_meta(&k, &FILE, &[]), Err(FileCryptError::BadMeta));
        // A chunk is not metadata, even under the same key and file.
        let small = encrypt(&k, FILE, b"hello", 5);
        assert_eq!(
            open_meta(&k, &FILE, &small.chunks[0]),
            Err(FileCryptError::BadMeta)
        );
        // And metadata is not a chunk.
        assert_eq!(
            Decryptor::new(&k, FILE).push(&sealed),
            Err(FileCryptError::BadChunk)
        );
        // Invalid metadata is refused before sealing.
        let bad_count = meta_for("a", 5, vec![]);
        assert!(matches!(
            seal_meta(&mut rng(8), &k, &FILE, &bad_count),
            Err(FileCryptError::InvalidMeta(_))
        ));
        let long_path = meta_for(&"p".repeat(MAX_PATH_BYTES + 1), 0, vec![[0; 32]]);
        assert!(matches!(
            seal_meta(&mut rng(8), &k, &FILE, &long_path),
            Err(FileCryptError::InvalidMeta(_))
        ));
    }

    // -- key wrapping ---------------------------------------------------------

    #[test]
    fn wrapped_keys_open_only_for_their_user_and_file() {
        let k = key(5);
        let (alice, bob) = (test_identity(1), test_identity(2));
        let w = wrap_key(
            &mut rng(9),
            &k,
            &FILE,
            &alice.user_id(),
            alice.enc_public_der(),
            TEST_BITS,
        )
        .unwrap();
        assert_eq!(unwrap_key(&mut rng(10), alice, &FILE, &w), Ok(k));
        let k = key(5);
        assert_eq!(
            unwrap_key(&mut rng(10), bob, &FILE, &w),
            Err(FileCryptError::UnwrapFailed)
        );
        assert_eq!(
            unwrap_key(&mut rng(10), alice, &OTHER_FILE, &w),
            Err(FileCryptError::UnwrapFailed)
        );
        // Wrapped under Alice's key but labelled for Bob: Alice cannot use it
        // as her own entry.
        let mislabelled = wrap_key(
            &mut rng(11),
            &k,
            &FILE,
            &bob.user_id(),
            alice.enc_public_der(),
            TEST_BITS,
        )
        .unwrap();
        assert_eq!(
            unwrap_key(&mut rng(12), alice, &FILE, &mislabelled),
            Err(FileCryptError::UnwrapFailed)
        );
        // Key policy.
        assert_eq!(
            wrap_key(
                &mut rng(13),
                &k,
                &FILE,
                &alice.user_id(),
                alice.enc_public_der(),
                2048
            ),
            Err(FileCryptError::BadReaderKey)
        );
        assert_eq!(
            wrap_key(
                &mut rng(13),
                &k,
                &FILE,
                &alice.user_id(),
                b"junk",
                TEST_BITS
            ),
            Err(FileCryptError::BadReaderKey)
        );
        assert_eq!(format!("{k:?}"), "FileKey(..)");
    }

    // -- manifests ----------------------------------------------------------

    fn pubkey(i: usize) -> PubKeyRecord {
        match test_identity(i).pubkey_record(&mut rng(100 + i as u64)) {
            Record::PubKey(p) => p,
            _ => unreachable!(),
        }
    }

    /// A small file owned by identity 0, its key, meta and chunks.
    fn small_file() -> (Manifest, FileKey, FileMeta, Sealed) {
        let owner = test_identity(0);
        let k = key(6);
        let plain = data(C + 10, 3);
        let s = encrypt(&k, FILE, &plain, C);
        let meta = meta_for("notes.txt", plain.len() as u64, s.ids.clone());
        let m = new_file_manifest(&mut rng(14), owner, FILE, &k, &meta, 1).unwrap();
        (m, k, meta, s)
    }

    #[test]
    fn the_owner_entry_is_sealed_for_the_owner_alone_and_bound_to_the_file() {
        let (owner, other) = (test_identity(0), test_identity(1));
        let k = key(40);
        let e = owner_entry(&mut rng(41), owner, &k, &FILE).unwrap();
        assert_eq!(e.user, owner.user_id());
        assert_eq!(e.wrapped_key.len(), SELF_WRAP_LEN, "no RSA ciphertext");
        assert_eq!(
            unwrap_key(&mut rng(42), owner, &FILE, &e.wrapped_key),
            Ok(key(40))
        );
        // Another identity, another file, any flipped bit: nothing opens.
        let fail = Err(FileCryptError::UnwrapFailed);
        assert_eq!(unwrap_key(&mut rng(42), other, &FILE, &e.wrapped_key), fail);
        assert_eq!(
            unwrap_key(&mut rng(42), owner, &OTHER_FILE, &e.wrapped_key),
            fail
        );
        for i in SELF_WRAP_MARK.len()..e.wrapped_key.len() {
            let mut bad = e.wrapped_key.clone();
            bad[i] ^= 1;
            assert_eq!(
                unwrap_key(&mut rng(42), owner, &FILE, &bad),
                fail,
                "byte {i}"
            );
        }
        // The older form, RSA-OAEP to the owner's own key, still opens.
        let oaep = wrap_key(
            &mut rng(43),
            &k,
            &FILE,
            &owner.user_id(),
            owner.enc_public_der(),
            TEST_BITS,
        )
        .unwrap();
        assert_eq!(unwrap_key(&mut rng(44), owner, &FILE, &oaep), Ok(key(40)));
    }

    #[test]
    fn files_made_in_a_batch_open_and_share_like_single_ones() {
        let (owner, reader) = (test_identity(0), test_identity(1));
        let keys: Vec<FileKey> = (0..4).map(|i| key(60 + i)).collect();
        let ids: Vec<FileId> = (0..4u8).map(|i| [i; 32]).collect();
        let metas: Vec<FileMeta> = (0..4)
            .map(|i| meta_for(&format!("f{i}"), 0, vec![[i as u8; 32]]))
            .collect();
        let files: Vec<(FileId, &FileKey, &FileMeta)> =
            (0..4).map(|i| (ids[i], &keys[i], &metas[i])).collect();
        let ms: Vec<Manifest> = new_file_manifests(&mut rng(61), owner, &files, 1)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ms.len(), 4);
        // A file whose metadata cannot be sealed fails alone.
        let huge = meta_for(&"x".repeat(MAX_RECORD_BYTES), 0, vec![[9; 32]]);
        let mixed = [files[0], ([9; 32], &keys[1], &huge), files[2]];
        let made = new_file_manifests(&mut rng(65), owner, &mixed, 1);
        assert!(made[0].is_ok() && made[2].is_ok());
        assert!(matches!(made[1], Err(FileCryptError::InvalidMeta(_))));
        assert_eq!(made[2].as_ref().unwrap().file_id, files[2].0);
        for (i, m) in ms.iter().enumerate() {
            assert_eq!(m.file_id, ids[i]);
            assert!(m.sig.len() > TEST_BITS / 8, "batch-signed");
            let (k, meta) = open_manifest(&mut rng(62), owner, m, TEST_BITS).unwrap();
            assert!(k == keys[i] && meta == metas[i]);
            let shared = share(&mut rng(63), owner, m, &pubkey(1), TEST_BITS).unwrap();
            let (k, _) = open_manifest(&mut rng(64), reader, &shared, TEST_BITS).unwrap();
            assert!(k == keys[i]);
        }
    }

    /// Three small files of `owner`'s, their manifests made in one batch;
    /// keys, file ids and randomness drawn from `seed`.
    fn three_files(owner: &Identity, seed: u64) -> (Vec<FileKey>, Vec<FileMeta>, Vec<Manifest>) {
        let keys: Vec<FileKey> = (0..3).map(|i| key(seed + i)).collect();
        let metas: Vec<FileMeta> = (0..3)
            .map(|i| meta_for(&format!("f{seed}-{i}"), 0, vec![[i as u8; 32]]))
            .collect();
        let files: Vec<(FileId, &FileKey, &FileMeta)> = (0..3)
            .map(|i| ([seed as u8 + i as u8; 32], &keys[i], &metas[i]))
            .collect();
        let ms = new_file_manifests(&mut rng(seed + 10), owner, &files, 1)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        (keys, metas, ms)
    }

    #[test]
    fn sharing_many_at_once_is_sharing_each() {
        let (owner, reader, stranger) = (test_identity(0), test_identity(1), test_identity(2));
        let (keys, metas, ms) = three_files(owner, 70);
        let shared = share_many(&mut rng(72), owner, &ms, &pubkey(1), TEST_BITS).unwrap();
        for (i, m) in shared.iter().enumerate() {
            assert_eq!(m.acl.epoch, ms[i].acl.epoch + 1);
            assert_eq!(m.version.clock, ms[i].version.clock + 1);
            assert_eq!(Record::Manifest(m.clone()).verify(TEST_BITS), Ok(()));
            let (k, meta) = open_manifest(&mut rng(73), reader, m, TEST_BITS).unwrap();
            assert!(k == keys[i] && meta == metas[i]);
            assert_eq!(
                open_manifest(&mut rng(74), stranger, m, TEST_BITS).unwrap_err(),
                FileCryptError::NotReader
            );
        }
        // One manifest the caller does not own fails the whole call.
        assert_eq!(
            share_many(&mut rng(75), reader, &shared, &pubkey(2), TEST_BITS).unwrap_err(),
            FileCryptError::NotOwner
        );
    }

    #[test]
    fn revoking_many_at_once_is_revoking_each() {
        let (owner, alice, bob) = (test_identity(0), test_identity(1), test_identity(2));
        let (keys, _, ms) = three_files(owner, 80);
        let ms = share_many(&mut rng(82), owner, &ms, &pubkey(1), TEST_BITS).unwrap();
        let ms = share_many(&mut rng(83), owner, &ms, &pubkey(2), TEST_BITS).unwrap();
        let new_keys: Vec<FileKey> = (0..3).map(|i| key(90 + i)).collect();
        let new_metas: Vec<FileMeta> = (0..3)
            .map(|i| meta_for(&format!("r{i}"), 0, vec![[0x40 + i as u8; 32]]))
            .collect();
        let batch: Vec<Rekeyed<'_>> = (0..3)
            .map(|i| (&ms[i], &new_keys[i], &new_metas[i]))
            .collect();
        let out = revoke_many(
            &mut rng(84),
            owner,
            &batch,
            &alice.user_id(),
            &[pubkey(2)],
            TEST_BITS,
        )
        .unwrap();
        for (i, m) in out.iter().enumerate() {
            assert!(m.sig.len() > TEST_BITS / 8, "batch-signed");
            assert_eq!(Record::Manifest(m.clone()).verify(TEST_BITS), Ok(()));
            assert_eq!(
                (m.acl.epoch, m.version.clock),
                (ms[i].acl.epoch + 1, ms[i].version.clock + 1)
            );
            assert_eq!(
                open_manifest(&mut rng(85), alice, m, TEST_BITS).unwrap_err(),
                FileCryptError::NotReader
            );
            for who in [owner, bob] {
                let (k, meta) = open_manifest(&mut rng(86), who, m, TEST_BITS).unwrap();
                assert!(k == new_keys[i] && meta == new_metas[i]);
            }
        }
        // One file that does not list the user fails the whole call, as
        // does one whose key was not rotated.
        let mixed: Vec<Rekeyed<'_>> = vec![batch[0], (&out[1], &new_keys[2], &new_metas[1])];
        assert_eq!(
            revoke_many(
                &mut rng(87),
                owner,
                &mixed,
                &alice.user_id(),
                &[pubkey(2)],
                TEST_BITS
            )
            .unwrap_err(),
            FileCryptError::NotListed(alice.user_id())
        );
        let stale: Vec<Rekeyed<'_>> = vec![batch[0], (&ms[1], &keys[1], &new_metas[1])];
        assert_eq!(
            revoke_many(
                &mut rng(88),
                owner,
                &stale,
                &alice.user_id(),
                &[pubkey(2)],
                TEST_BITS
            )
            .unwrap_err(),
            FileCryptError::KeyNotRotated
        );
    }

    #[test]
    fn share_then_reader_opens_and_others_are_refused() {
        let (owner, reader, stranger) = (test_identity(0), test_identity(1), test_identity(2));
        let (m, k, meta, _) = small_file();
        assert_eq!(Record::Manifest(m.clone()).verify(TEST_BITS), Ok(()));
        let (k0, meta0) = open_manifest(&mut rng(15), owner, &m, TEST_BITS).unwrap();
        assert!(k0 == k && meta0 == meta);
        assert_eq!(
            open_manifest(&mut rng(16), reader, &m, TEST_BITS).unwrap_err(),
            FileCryptError::NotReader
        );

        let shared = share(&mut rng(17), owner, &m, &pubkey(1), TEST_BITS).unwrap();
        assert_eq!(shared.acl.epoch, m.acl.epoch + 1);
        assert_eq!(shared.acl.readers.len(), 2);
        assert_eq!(Record::Manifest(shared.clone()).verify(TEST_BITS), Ok(()));
        let mut merged = Record::Manifest(m.clone());
        assert_eq!(merged.merge(Record::Manifest(shared.clone())), Ok(true));
        let (k1, meta1) = open_manifest(&mut rng(18), reader, &shared, TEST_BITS).unwrap();
        assert!(k1 == k && meta1 == meta);
        assert_eq!(
            open_manifest(&mut rng(19), stranger, &shared, TEST_BITS).unwrap_err(),
            FileCryptError::NotReader
        );
        // Sharing again re-wraps instead of adding a second entry.
        let again = share(&mut rng(20), owner, &shared, &pubkey(1), TEST_BITS).unwrap();
        assert_eq!(again.acl.readers.len(), 2);
        // Only the owner shares.
        assert_eq!(
            share(&mut rng(21), reader, &shared, &pubkey(2), TEST_BITS).unwrap_err(),
            FileCryptError::NotOwner
        );
        // A reader record that does not verify.
        let mut forged = pubkey(2);
        forged.enc_key = reader.enc_public_der().to_vec();
        assert_eq!(
            share(&mut rng(22), owner, &shared, &forged, TEST_BITS).unwrap_err(),
            FileCryptError::BadReaderKey
        );
    }

    #[test]
    fn manifests_not_signed_by_the_owner_are_refused() {
        let (owner, reader, stranger) = (test_identity(0), test_identity(1), test_identity(2));
        let (m, _, _, _) = small_file();
        let shared = share(&mut rng(23), owner, &m, &pubkey(1), TEST_BITS).unwrap();
        // A stranger signs a new version under the owner's ACL.
        let forged = into_manifest(record::new_manifest(
            &mut rng(24),
            shared.owner_key.clone(),
            FILE,
            shared.acl.clone(),
            shared.version.clock + 1,
            stranger.signer(),
            shared.body.clone(),
        ));
        assert_eq!(
            open_manifest(&mut rng(25), reader, &forged, TEST_BITS).unwrap_err(),
            FileCryptError::Manifest(RecordError::NotAllowed)
        );
        // A stranger signs an ACL adding themself (and the version).
        let mut readers = shared.acl.readers.clone();
        readers.push(AclEntry {
            user: stranger.user_id(),
            wrapped_key: vec![0; 128],
        });
        let acl = record::new_acl(
            &mut rng(26),
            stranger.signer(),
            shared.position(),
            shared.acl.epoch + 1,
            vec![stranger.user_id()],
            readers,
        );
        let mut forged = shared.clone();
        forged.acl = acl;
        assert_eq!(
            open_manifest(&mut rng(27), reader, &forged, TEST_BITS).unwrap_err(),
            FileCryptError::Manifest(RecordError::BadSignature)
        );
        // A body swapped under the owner's signature.
        let mut forged = shared.clone();
        forged.body[20] ^= 1;
        assert_eq!(
            open_manifest(&mut rng(28), reader, &forged, TEST_BITS).unwrap_err(),
            FileCryptError::Manifest(RecordError::BadSignature)
        );
        // Nobody but the owner can share, even with a forged manifest.
        assert_eq!(
            share(&mut rng(29), stranger, &shared, &pubkey(2), TEST_BITS).unwrap_err(),
            FileCryptError::NotOwner
        );
    }

    #[test]
    fn revoke_rotates_the_key_and_shuts_out_the_revoked_reader() {
        let (owner, alice, bob) = (test_identity(0), test_identity(1), test_identity(2));
        let (m, old_key, meta, old) = small_file();
        let m = share(&mut rng(30), owner, &m, &pubkey(1), TEST_BITS).unwrap();
        let m = share(&mut rng(31), owner, &m, &pubkey(2), TEST_BITS).unwrap();
        let m = into_manifest({
            // Alice is a writer too.
            let acl = record::new_acl(
                &mut rng(32),
                owner.signer(),
                m.position(),
                m.acl.epoch + 1,
                vec![alice.user_id()],
                m.acl.readers.clone(),
            );
            record::new_manifest(
                &mut rng(33),
                m.owner_key.clone(),
                FILE,
                acl,
                m.version.clock + 1,
                owner.signer(),
                m.body.clone(),
            )
        });

        // The owner re-encrypts every chunk under a new key.
        let (k, opened) = open_manifest(&mut rng(34), owner, &m, TEST_BITS).unwrap();
        assert!(k == old_key && opened == meta);
        let new_key = key(7);
        let mut rk = Rekeyer::new(&k, &new_key, FILE, &meta);
        let mut r = rng(35);
        let mut new_chunks = Vec::new();
        for c in &old.chunks {
            new_chunks.extend(rk.push(&mut r, c).unwrap());
        }
        let fin = rk.finish(&mut r).unwrap();
        new_chunks.push(fin.last_chunk);
        let new_meta = FileMeta {
            chunks: fin.chunk_ids,
            ..meta.clone()
        };

        // Error cases first.
        let revoke_with = |who: &UserId, remaining: &[PubKeyRecord], nk: &FileKey| {
            revoke(
                &mut rng(36),
                owner,
                &m,
                who,
                remaining,
                nk,
                &new_meta,
                TEST_BITS,
            )
        };
        assert_eq!(
            revoke_with(&alice.user_id(), &[], &new_key).unwrap_err(),
            FileCryptError::MissingReaderKey(bob.user_id())
        );
        assert_eq!(
            revoke_with(&owner.user_id(), &[pubkey(1), pubkey(2)], &new_key).unwrap_err(),
            FileCryptError::RevokeOwner
        );
        assert_eq!(
            revoke_with(
                &test_identity(3).user_id(),
                &[pubkey(1), pubkey(2)],
                &new_key
            )
            .unwrap_err(),
            FileCryptError::NotListed(test_identity(3).user_id())
        );
        assert_eq!(
            revoke_with(&alice.user_id(), &[pubkey(2)], &old_key).unwrap_err(),
            FileCryptError::KeyNotRotated
        );

        let m2 = revoke_with(&alice.user_id(), &[pubkey(2)], &new_key).unwrap();
        assert_eq!(m2.acl.epoch, m.acl.epoch + 1);
        assert!(m2.acl.reader(&alice.user_id()).is_none());
        assert!(!m2.acl.allows_writer(&alice.user_id()));
        let mut merged = Record::Manifest(m.clone());
        assert_eq!(merged.merge(Record::Manifest(m2.clone())), Ok(true));

        // Alice is out of the new version.
        assert_eq!(
            open_manifest(&mut rng(37), alice, &m2, TEST_BITS).unwrap_err(),
            FileCryptError::NotReader
        );
        // Bob and the owner read the new version with the new key.
        for who in [owner, bob] {
            let (kb, mb) = open_manifest(&mut rng(38), who, &m2, TEST_BITS).unwrap();
            assert!(kb == new_key && mb == new_meta);
            let plain = decrypt(Decryptor::for_meta(&kb, FILE, &mb), &new_chunks).unwrap();
            assert!(plain == data(C + 10, 3));
        }
        // Alice's old key opens none of the new chunks or the new metadata.
        let (alice_key, _) = open_manifest(&mut rng(39), alice, &m, TEST_BITS).unwrap();
        assert_eq!(
            decrypt(Decryptor::new(&alice_key, FILE), &new_chunks),
            Err(FileCryptError::BadChunk)
        );
        assert_eq!(
            open_meta(&alice_key, &FILE, &m2.body),
            Err(FileCryptError::BadMeta)
        );
        // Old chunks do not pass as new ones either.
        assert_eq!(
            decrypt(Decryptor::for_meta(&new_key, FILE, &new_meta), &old.chunks),
            Err(FileCryptError::BadChunk)
        );
    }

    // -- properties -----------------------------------------------------------

    fn small_sealed() -> &'static (Vec<u8>, Vec<u8>, Vec<u8>) {
        static S: OnceLock<(Vec<u8>, Vec<u8>, Vec<u8>)> = OnceLock::new();
        S.get_or_init(|| {
            let k = key(8);
            let chunk = encrypt(&k, FILE, &data(1000, 4), 1000).chunks.remove(0);
            let meta =
                seal_meta(&mut rng(40), &k, &FILE, &meta_for("x", 0, vec![[3; 32]])).unwrap();
            let alice = test_identity(1);
            let wrapped = wrap_key(
                &mut rng(41),
                &k,
                &FILE,
                &alice.user_id(),
                alice.enc_public_der(),
                TEST_BITS,
            )
            .unwrap();
            (chunk, meta, wrapped)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any single bit flipped in a sealed chunk or sealed metadata is
        /// refused.
        #[test]
        fn bit_flips_in_sealed_data_are_refused(bit in any::<prop::sample::Index>()) {
            let (chunk, meta, _) = small_sealed();
            let mut c = chunk.clone();
            let b = bit.index(c.len() * 8);
            c[b / 8] ^= 1 << (b % 8);
            prop_assert_eq!(Decryptor::new(&key(8), FILE).push(&c), Err(FileCryptError::BadChunk));
            let mut m = meta.clone();
            let b = bit.index(m.len() * 8);
            m[b / 8] ^= 1 << (b % 8);
            prop_assert_eq!(open_meta(&key(8), &FILE, &m), Err(FileCryptError::BadMeta));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn bit_flips_in_wrapped_keys_are_refused(bit in any::<prop::sample::Index>()) {
            let (_, _, wrapped) = small_sealed();
            let mut w = wrapped.clone();
            let b = bit.index(w.len() * 8);
            w[b / 8] ^= 1 << (b % 8);
            prop_assert_eq!(
                unwrap_key(&mut rng(42), test_identity(1), &FILE, &w),
                Err(FileCryptError::UnwrapFailed)
            );
        }

        /// Bits flipped in a full-size chunk (fewer cases: each is a MiB).
        #[test]
        fn bit_flips_in_full_chunks_are_refused(bit in any::<prop::sample::Index>()) {
            let (_, s, _) = three();
            let mut c = s.chunks[0].clone();
            let b = bit.index(c.len() * 8);
            c[b / 8] ^= 1 << (b % 8);
            prop_assert_eq!(dec().push(&c), Err(FileCryptError::BadChunk));
        }

        /// Arbitrary bytes never panic a decoder.
        #[test]
        fn junk_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let mut d = Decryptor::new(&key(8), FILE);
            prop_assert!(d.push(&bytes).is_err());
            prop_assert!(d.push(&bytes).is_err());
            prop_assert!(open_meta(&key(8), &FILE, &bytes).is_err());
            prop_assert!(unwrap_key(&mut rng(43), test_identity(1), &FILE, &bytes).is_err());
            let _ = wrap_key(&mut rng(44), &key(8), &FILE, &UserId::ZERO, &bytes, TEST_BITS);
        }
    }
}
