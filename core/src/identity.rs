//! User and node identities: an RSA-PSS signing key, a separate RSA-OAEP
//! encryption key, and a certificate binding the second to the first.
//!
//! The signing key *is* the identity: its SPKI DER hashes (SHA-1) to the
//! user id and (SHA-256) to the fingerprint people compare out of band. The
//! encryption key only ever receives wrapped file keys and session keys; the
//! certificate, a PSS signature by the signing key over `(domain tag,
//! encryption SPKI DER)`, lets anyone holding the signing key check that the
//! encryption key belongs to it.
//!
//! # Key file layout
//!
//! One UTF-8 text file holds the identity as exactly three PEM blocks
//! (RFC 7468), in this order, each ended by a newline:
//!
//! ```text
//! -----BEGIN PRIVATE KEY-----            signing key, PKCS#8 (RSA-PSS use)
//! -----BEGIN PRIVATE KEY-----            encryption key, PKCS#8 (RSA-OAEP use)
//! -----BEGIN PEERSTORE ENCRYPTION KEY CERTIFICATE-----   the certificate
//! ```
//!
//! With a passphrase both key blocks are `ENCRYPTED PRIVATE KEY` instead:
//! PKCS#8 `EncryptedPrivateKeyInfo` with PBES2, scrypt (N = 2^17, r = 8,
//! p = 1, the `pkcs8` crate's defaults) and AES-256-CBC, each block with its
//! own random 16-byte salt and IV. The key blocks keep the standard labels so
//! `openssl pkey -in user.pem` reads the signing key (the first block); order,
//! not the label, says which key is which, and the certificate makes a swap
//! or substitution of the two keys fail to load. Nothing else may appear in
//! the file besides blank lines between blocks.
//!
//! The core does no IO: [`Identity::to_pem`] returns the text and the caller
//! **must create the file with mode 0600** (owner read/write only) before
//! writing secret bytes into it, e.g. `OpenOptions::new().mode(0o600)
//! .create_new(true)`, and should refuse to load a key file readable by
//! others.
//!
//! PBES2 has no integrity check of its own: a wrong passphrase is detected by
//! the padding and structure of what it decrypts to, so it is reported as
//! "wrong passphrase (or corrupted file)". Scrypt parameters are read from
//! the file, so they are bounded before any work is done.

use std::fmt;

use rand_core::CryptoRngCore;
use rsa::pkcs1;
use rsa::pkcs8::der::pem::LineEnding;
use rsa::pkcs8::der::{Decode, Encode};
use rsa::pkcs8::pkcs5::pbes2;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, EncryptedPrivateKeyInfo, PrivateKeyInfo};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::record::{
    self, Record, Signer, UserId, ABSOLUTE_MIN_KEY_BITS, MAX_KEY_BITS, MIN_KEY_BITS_DEFAULT,
};

/// Modulus size of a freshly generated user identity.
pub const USER_KEY_BITS: usize = 3072;
/// Modulus size of a freshly generated node identity.
pub const NODE_KEY_BITS: usize = 2048;

/// Largest key file [`Identity::from_pem`] looks at (a 4096-bit identity
/// with encrypted keys is about 7 KiB).
pub const MAX_PEM_BYTES: usize = 32 * 1024;

const TAG_ENC_CERT: &[u8] = b"peerstore/enc-key-cert/v1";

const LABEL_KEY: &str = "PRIVATE KEY";
const LABEL_ENCRYPTED_KEY: &str = "ENCRYPTED PRIVATE KEY";
const LABEL_CERT: &str = "PEERSTORE ENCRYPTION KEY CERTIFICATE";

/// scrypt cost written into new key files: log2(N) = 17, r = 8, p = 1
/// (128 MiB, a few hundred milliseconds per key).
const SCRYPT_LOG_N: u8 = 17;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;
/// Most scrypt memory (128 * r * N bytes) a key file may ask for: 256 MiB.
const SCRYPT_MAX_MEMORY: u64 = 256 * 1024 * 1024;
/// Most scrypt passes (N * r * p) a key file may ask for.
const SCRYPT_MAX_WORK: u64 = 1 << 22;
/// Most PBKDF2 iterations a key file may ask for (files from other tools).
const PBKDF2_MAX_ITERATIONS: u32 = 1 << 22;

/// Why an identity could not be built, loaded or saved. Messages name the
/// problem and what to do; they never contain key material.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The text is not an identity file at all.
    #[error("not a PeerStore identity file: {0}")]
    NotIdentity(&'static str),
    /// The file ends before its last PEM block is complete.
    #[error("identity file is truncated: {0}; restore it from a backup")]
    Truncated(&'static str),
    /// The file is bigger than any identity file.
    #[error("identity file is too large (more than 32 KiB)")]
    TooLarge,
    /// The keys are passphrase-protected and no passphrase was given.
    #[error("identity file is passphrase-protected: a passphrase is required")]
    PassphraseRequired,
    /// Decryption with the passphrase did not yield a key.
    #[error("wrong passphrase (or the identity file is corrupted)")]
    WrongPassphrase,
    /// The key encryption is not PBES2 with scrypt or PBKDF2-SHA256 and AES,
    /// or its cost parameters exceed the limits (256 MiB of scrypt memory).
    #[error("unsupported key encryption or excessive key-derivation cost parameters")]
    UnsupportedEncryption,
    /// A key block holds something other than an RSA private key.
    #[error("the {0} is not an RSA private key")]
    NotRsa(&'static str),
    /// A key block does not decode to a consistent RSA private key.
    #[error("the {0} is malformed (not a valid PKCS#8 RSA private key)")]
    BadKey(&'static str),
    /// A key is shorter than the minimum accepted.
    #[error("the {which} has {bits} bits, below the minimum of {min}; generate a new identity")]
    KeyTooSmall {
        which: &'static str,
        bits: usize,
        min: usize,
    },
    /// A key is longer than the maximum accepted.
    #[error("the {which} has {bits} bits, above the maximum of {max}")]
    KeyTooLarge {
        which: &'static str,
        bits: usize,
        max: usize,
    },
    /// The certificate does not bind the encryption key to the signing key.
    #[error("the encryption key certificate does not verify under the signing key (keys swapped, replaced or corrupted)")]
    BadEncCert,
    /// Signing and encryption keys must be distinct.
    #[error("the signing and encryption keys are the same key; they must be separate")]
    SameKey,
    /// Key generation or encoding failed inside the RSA or PKCS#8 code.
    #[error("key generation or encoding failed")]
    Internal,
}

/// Which key an error is about.
const SIGNING: &str = "signing key";
const ENCRYPTION: &str = "encryption key";

/// A user's or node's private identity. `Debug` shows the user id only.
/// Private keys are zeroized when dropped (by the `rsa` crate).
pub struct Identity {
    signing: Signer,
    /// The signing key again, for [`Identity::to_pem`] (`Signer` does not
    /// hand out its private key).
    signing_key: RsaPrivateKey,
    encryption: RsaPrivateKey,
    enc_public_der: Vec<u8>,
    enc_cert: Vec<u8>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("user", &self.signing.user_id())
            .field("signing_bits", &self.signing.bits())
            .field("encryption_bits", &self.encryption.n().bits())
            .finish_non_exhaustive()
    }
}

/// The message an encryption key certificate signs.
fn enc_cert_msg(enc_public_der: &[u8]) -> Vec<u8> {
    postcard::to_allocvec(&(TAG_ENC_CERT, enc_public_der))
        .expect("postcard encoding into a Vec cannot fail")
}

/// Checks that `cert` is the signing key's certificate for the encryption
/// key `enc_public_der` (both SPKI DER). Never panics.
pub fn verify_enc_cert(
    signing_public_der: &[u8],
    enc_public_der: &[u8],
    cert: &[u8],
    min_bits: usize,
) -> Result<(), IdentityError> {
    record::verify(
        signing_public_der,
        &enc_cert_msg(enc_public_der),
        cert,
        min_bits,
    )
    .map_err(|_| IdentityError::BadEncCert)
}

/// SHA-256 of a signing key's SPKI DER as 16 groups of 4 hex digits, the form
/// users read to each other to compare keys.
pub fn fingerprint(signing_public_der: &[u8]) -> String {
    let digest = Sha256::digest(signing_public_der);
    let hex = hex(&digest);
    let groups: Vec<&str> = (0..hex.len() / 4).map(|i| &hex[i * 4..i * 4 + 4]).collect();
    groups.join(" ")
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn check_bits(which: &'static str, bits: usize, min_bits: usize) -> Result<(), IdentityError> {
    if bits > MAX_KEY_BITS {
        return Err(IdentityError::KeyTooLarge {
            which,
            bits,
            max: MAX_KEY_BITS,
        });
    }
    let min = min_bits.max(ABSOLUTE_MIN_KEY_BITS);
    if bits < min {
        return Err(IdentityError::KeyTooSmall { which, bits, min });
    }
    Ok(())
}

impl Identity {
    /// Generates a fresh identity with two `bits`-bit keys, which must be
    /// [`MIN_KEY_BITS_DEFAULT`]`..=`[`MAX_KEY_BITS`] (use [`USER_KEY_BITS`] or
    /// [`NODE_KEY_BITS`]). Slow: seconds for 3072-bit keys.
    pub fn generate(
        rng: &mut (impl CryptoRngCore + ?Sized),
        bits: usize,
    ) -> Result<Identity, IdentityError> {
        Identity::generate_with_min_bits(rng, bits, MIN_KEY_BITS_DEFAULT)
    }

    /// [`Identity::generate`] with a lower floor, for fast tests.
    pub(crate) fn generate_with_min_bits(
        rng: &mut (impl CryptoRngCore + ?Sized),
        bits: usize,
        min_bits: usize,
    ) -> Result<Identity, IdentityError> {
        check_bits(SIGNING, bits, min_bits)?;
        let signing = RsaPrivateKey::new(rng, bits).map_err(|_| IdentityError::Internal)?;
        let encryption = RsaPrivateKey::new(rng, bits).map_err(|_| IdentityError::Internal)?;
        Identity::from_keys(rng, signing, encryption, min_bits)
    }

    /// Builds an identity from two existing keys, signing a new encryption
    /// key certificate.
    pub fn from_keys(
        rng: &mut (impl CryptoRngCore + ?Sized),
        signing: RsaPrivateKey,
        encryption: RsaPrivateKey,
        min_bits: usize,
    ) -> Result<Identity, IdentityError> {
        check_bits(SIGNING, signing.n().bits(), min_bits)?;
        check_bits(ENCRYPTION, encryption.n().bits(), min_bits)?;
        if signing.n() == encryption.n() {
            return Err(IdentityError::SameKey);
        }
        let signing_key = signing;
        let signing = Signer::try_from_private_key(signing_key.clone())
            .map_err(|_| IdentityError::Internal)?;
        let enc_public_der = encryption
            .to_public_key()
            .to_public_key_der()
            .map_err(|_| IdentityError::Internal)?
            .into_vec();
        let enc_cert = signing.sign(rng, &enc_cert_msg(&enc_public_der));
        Ok(Identity {
            signing,
            signing_key,
            encryption,
            enc_public_der,
            enc_cert,
        })
    }

    /// Signs with `ring` from now on, its salt from the operating system
    /// (see [`Signer::with_os_random`]): for the node and the client,
    /// which sign with `OsRng` anyway.
    pub fn with_os_random_signing(mut self) -> Identity {
        self.signing = self.signing.with_os_random();
        self
    }

    /// The signing key (RSA-PSS, blinded).
    pub fn signer(&self) -> &Signer {
        &self.signing
    }

    /// SHA-1 of the signing key's SPKI DER (see [`record::user_id`]).
    pub fn user_id(&self) -> UserId {
        self.signing.user_id()
    }

    /// SHA-256 of the signing key's SPKI DER in hex groups (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(self.signing.public_der())
    }

    /// SPKI DER of the signing key.
    pub fn signing_public_der(&self) -> &[u8] {
        self.signing.public_der()
    }

    /// SPKI DER of the encryption key.
    pub fn enc_public_der(&self) -> &[u8] {
        &self.enc_public_der
    }

    /// The signing key's signature over the encryption key.
    pub fn enc_cert(&self) -> &[u8] {
        &self.enc_cert
    }

    /// The private encryption key, for OAEP unwrapping inside the core.
    pub(crate) fn encryption_key(&self) -> &RsaPrivateKey {
        &self.encryption
    }

    /// The user's public key record (signing and encryption keys, self-signed)
    /// to register in the DHT.
    pub fn pubkey_record(&self, rng: &mut (impl CryptoRngCore + ?Sized)) -> Record {
        record::new_pubkey_record(rng, &self.signing, self.enc_public_der.clone())
    }

    /// A 256-bit secret that only holders of this identity can compute,
    /// the same on every machine holding the key file: HMAC-SHA256 keyed
    /// by SHA-256 of the signing key's private exponent, over `label`.
    /// Distinct labels give independent secrets (the client seals its
    /// transaction log entries with one).
    pub fn local_secret(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        use hmac::{Hmac, Mac};
        use rsa::traits::PrivateKeyParts;
        let d = Zeroizing::new(self.signing_key.d().to_bytes_be());
        let key = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(&*d)));
        let mut mac = <Hmac<Sha256>>::new_from_slice(&*key).expect("HMAC takes any key length");
        mac.update(b"peerstore/local-secret/v1");
        mac.update(label);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// The key file's text (see the module docs for the layout), with both
    /// keys encrypted under `passphrase` if one is given. The caller must
    /// write it to a file created with mode 0600.
    pub fn to_pem(
        &self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        passphrase: Option<&[u8]>,
    ) -> Result<Zeroizing<String>, IdentityError> {
        self.to_pem_with_log_n(rng, passphrase, SCRYPT_LOG_N)
    }

    /// [`Identity::to_pem`] with a chosen scrypt cost (tests use a cheap one).
    pub(crate) fn to_pem_with_log_n(
        &self,
        rng: &mut (impl CryptoRngCore + ?Sized),
        passphrase: Option<&[u8]>,
        log_n: u8,
    ) -> Result<Zeroizing<String>, IdentityError> {
        let signing: &RsaPrivateKey = self.signing_private();
        let blocks = [
            key_block(rng, signing, passphrase, log_n)?,
            key_block(rng, &self.encryption, passphrase, log_n)?,
            Zeroizing::new(
                rsa::pkcs8::der::pem::encode_string(LABEL_CERT, LineEnding::LF, &self.enc_cert)
                    .map_err(|_| IdentityError::Internal)?,
            ),
        ];
        // One allocation of the final size, so no copy of a key is left behind
        // in a freed buffer.
        let mut out = Zeroizing::new(String::with_capacity(blocks.iter().map(|b| b.len()).sum()));
        for b in &blocks {
            out.push_str(b);
        }
        Ok(out)
    }

    fn signing_private(&self) -> &RsaPrivateKey {
        &self.signing_key
    }

    /// Loads an identity from key file text. Refuses keys outside
    /// `min_bits..=`[`MAX_KEY_BITS`] (pass [`MIN_KEY_BITS_DEFAULT`] outside
    /// tests). `passphrase` is required if the keys are encrypted and ignored
    /// if not (see [`pem_is_encrypted`] to decide whether to prompt). Never
    /// panics, whatever the text.
    pub fn from_pem(
        pem: &str,
        passphrase: Option<&[u8]>,
        min_bits: usize,
    ) -> Result<Identity, IdentityError> {
        if pem.len() > MAX_PEM_BYTES {
            return Err(IdentityError::TooLarge);
        }
        let blocks = split_blocks(pem)?;
        let [(sig_label, sig_block), (enc_label, enc_block), (cert_label, cert_block)] = blocks;
        let encrypted = match (sig_label, enc_label) {
            (LABEL_KEY, LABEL_KEY) => false,
            (LABEL_ENCRYPTED_KEY, LABEL_ENCRYPTED_KEY) => true,
            (LABEL_KEY | LABEL_ENCRYPTED_KEY, LABEL_KEY | LABEL_ENCRYPTED_KEY) => {
                return Err(IdentityError::NotIdentity(
                    "one key is passphrase-protected and the other is not",
                ))
            }
            _ => {
                return Err(IdentityError::NotIdentity(
                    "the first two PEM blocks must be PKCS#8 private keys",
                ))
            }
        };
        if cert_label != LABEL_CERT {
            return Err(IdentityError::NotIdentity(
                "the third PEM block must be the encryption key certificate",
            ));
        }
        let passphrase = match (encrypted, passphrase) {
            (true, None) => return Err(IdentityError::PassphraseRequired),
            (true, Some(p)) => Some(p),
            (false, _) => None,
        };
        let signing = parse_key_block(sig_block, passphrase, SIGNING, min_bits)?;
        let encryption = parse_key_block(enc_block, passphrase, ENCRYPTION, min_bits)?;
        let (_, cert) = rsa::pkcs8::der::pem::decode_vec(cert_block.as_bytes())
            .map_err(|_| IdentityError::BadEncCert)?;
        if signing.n() == encryption.n() {
            return Err(IdentityError::SameKey);
        }
        let signing_key = signing;
        let signing = Signer::try_from_private_key(signing_key.clone())
            .map_err(|_| IdentityError::Internal)?;
        let enc_public_der = encryption
            .to_public_key()
            .to_public_key_der()
            .map_err(|_| IdentityError::Internal)?
            .into_vec();
        verify_enc_cert(signing.public_der(), &enc_public_der, &cert, min_bits)?;
        Ok(Identity {
            signing,
            signing_key,
            encryption,
            enc_public_der,
            enc_cert: cert,
        })
    }
}

/// Whether key file text holds passphrase-protected keys (so the caller
/// knows whether to prompt). False for anything that is not an identity.
pub fn pem_is_encrypted(pem: &str) -> bool {
    pem.len() <= MAX_PEM_BYTES && matches!(split_blocks(pem), Ok([(LABEL_ENCRYPTED_KEY, _), ..]))
}

/// One key as a PEM block, encrypted (PBES2, scrypt, AES-256-CBC) if a
/// passphrase is given.
fn key_block(
    rng: &mut (impl CryptoRngCore + ?Sized),
    key: &RsaPrivateKey,
    passphrase: Option<&[u8]>,
    log_n: u8,
) -> Result<Zeroizing<String>, IdentityError> {
    let der = key.to_pkcs8_der().map_err(|_| IdentityError::Internal)?;
    let Some(passphrase) = passphrase else {
        return der
            .to_pem(LABEL_KEY, LineEnding::LF)
            .map_err(|_| IdentityError::Internal);
    };
    let mut salt = [0u8; 16];
    let mut iv = [0u8; 16];
    rng.fill_bytes(&mut salt);
    rng.fill_bytes(&mut iv);
    let scrypt = rsa::pkcs8::pkcs5::scrypt::Params::new(log_n, SCRYPT_R, SCRYPT_P, 32)
        .map_err(|_| IdentityError::Internal)?;
    let params = pbes2::Parameters::scrypt_aes256cbc(scrypt, &salt, &iv)
        .map_err(|_| IdentityError::Internal)?;
    let encrypted_data = params
        .encrypt(passphrase, der.as_bytes())
        .map_err(|_| IdentityError::Internal)?;
    let info = EncryptedPrivateKeyInfo {
        encryption_algorithm: params.into(),
        encrypted_data: &encrypted_data,
    };
    let encoded = info.to_der().map_err(|_| IdentityError::Internal)?;
    rsa::pkcs8::der::pem::encode_string(LABEL_ENCRYPTED_KEY, LineEnding::LF, &encoded)
        .map(Zeroizing::new)
        .map_err(|_| IdentityError::Internal)
}

/// Splits the file into exactly three PEM blocks `(label, block text)`,
/// allowing only blank lines around them.
fn split_blocks(pem: &str) -> Result<[(&str, &str); 3], IdentityError> {
    let mut blocks: Vec<(&str, &str)> = Vec::with_capacity(3);
    let mut open: Option<(&str, usize)> = None;
    let mut offset = 0;
    for line in pem.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let text = line.trim_end_matches(['\n', '\r']);
        match open {
            None => {
                if text.trim().is_empty() {
                    continue;
                }
                let last = !line.ends_with('\n');
                let Some(label) = text
                    .strip_prefix("-----BEGIN ")
                    .and_then(|l| l.strip_suffix("-----"))
                else {
                    if last && ("-----BEGIN ".starts_with(text) || text.starts_with("-----BEGIN "))
                    {
                        return Err(IdentityError::Truncated(
                            "the file ends inside a BEGIN line",
                        ));
                    }
                    return Err(IdentityError::NotIdentity(
                        "text outside the PEM blocks (expected -----BEGIN ...-----)",
                    ));
                };
                if blocks.len() == 3 {
                    return Err(IdentityError::NotIdentity("more than three PEM blocks"));
                }
                open = Some((label, start));
            }
            Some((label, block_start)) => {
                if let Some(end) = text
                    .strip_prefix("-----END ")
                    .and_then(|l| l.strip_suffix("-----"))
                {
                    if end != label {
                        return Err(IdentityError::NotIdentity(
                            "PEM END line does not match its BEGIN line",
                        ));
                    }
                    blocks.push((label, &pem[block_start..offset]));
                    open = None;
                } else if text.starts_with("-----") {
                    if !line.ends_with('\n') {
                        return Err(IdentityError::Truncated("the file ends inside an END line"));
                    }
                    return Err(IdentityError::NotIdentity("PEM block is not closed"));
                }
            }
        }
    }
    if open.is_some() {
        return Err(IdentityError::Truncated(
            "the last PEM block has no END line",
        ));
    }
    match <[(&str, &str); 3]>::try_from(blocks) {
        Ok(b) => Ok(b),
        Err(b) if b.is_empty() => Err(IdentityError::NotIdentity("no PEM blocks found")),
        Err(_) => Err(IdentityError::Truncated(
            "fewer than three PEM blocks (two keys and a certificate)",
        )),
    }
}

/// Decodes one key block, decrypting it if a passphrase is given.
fn parse_key_block(
    block: &str,
    passphrase: Option<&[u8]>,
    which: &'static str,
    min_bits: usize,
) -> Result<RsaPrivateKey, IdentityError> {
    let (_, der) = rsa::pkcs8::der::pem::decode_vec(block.as_bytes())
        .map_err(|_| IdentityError::BadKey(which))?;
    let der = Zeroizing::new(der);
    let Some(passphrase) = passphrase else {
        return parse_private_key(&der, which, min_bits);
    };
    let info = EncryptedPrivateKeyInfo::from_der(&der).map_err(|_| IdentityError::BadKey(which))?;
    check_encryption_cost(&info)?;
    let mut buf = Zeroizing::new(info.encrypted_data.to_vec());
    let plain = info
        .encryption_algorithm
        .decrypt_in_place(passphrase, &mut buf)
        .map_err(|_| IdentityError::WrongPassphrase)?;
    // Garbage from a wrong passphrase that happens to unpad cleanly fails
    // here; a corrupted but correctly decrypted key is not distinguishable
    // from it without a MAC, which PBES2 lacks.
    parse_private_key(plain, which, min_bits).map_err(|e| match e {
        IdentityError::BadKey(_) | IdentityError::NotRsa(_) => IdentityError::WrongPassphrase,
        e => e,
    })
}

/// Refuses schemes other than PBES2 (scrypt or PBKDF2-SHA256, AES-CBC) and
/// cost parameters that would take unbounded time or memory.
fn check_encryption_cost(info: &EncryptedPrivateKeyInfo<'_>) -> Result<(), IdentityError> {
    let params = info
        .encryption_algorithm
        .pbes2()
        .ok_or(IdentityError::UnsupportedEncryption)?;
    match &params.kdf {
        pbes2::Kdf::Scrypt(s) => {
            let n = s.cost_parameter;
            let r = u64::from(s.block_size);
            let p = u64::from(s.parallelization);
            let memory = n.checked_mul(r).and_then(|x| x.checked_mul(128));
            let work = n.checked_mul(r).and_then(|x| x.checked_mul(p));
            match (memory, work) {
                (Some(m), Some(w)) if m <= SCRYPT_MAX_MEMORY && w <= SCRYPT_MAX_WORK => Ok(()),
                _ => Err(IdentityError::UnsupportedEncryption),
            }
        }
        pbes2::Kdf::Pbkdf2(p) => {
            if p.iteration_count <= PBKDF2_MAX_ITERATIONS
                && p.prf == pbes2::Pbkdf2Prf::HmacWithSha256
            {
                Ok(())
            } else {
                Err(IdentityError::UnsupportedEncryption)
            }
        }
        _ => Err(IdentityError::UnsupportedEncryption),
    }
}

/// Parses PKCS#8 DER into an RSA private key, checking the size before the
/// (costly) consistency checks.
fn parse_private_key(
    der: &[u8],
    which: &'static str,
    min_bits: usize,
) -> Result<RsaPrivateKey, IdentityError> {
    let info = PrivateKeyInfo::from_der(der).map_err(|_| IdentityError::BadKey(which))?;
    if info.algorithm.oid != pkcs1::ALGORITHM_OID {
        return Err(IdentityError::NotRsa(which));
    }
    let pkcs1_key = pkcs1::RsaPrivateKey::from_der(info.private_key)
        .map_err(|_| IdentityError::BadKey(which))?;
    let modulus = pkcs1_key.modulus.as_bytes();
    let bits = match modulus.first() {
        Some(&top) => modulus.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    };
    check_bits(which, bits, min_bits)?;
    // Validates n = p * q and the exponents.
    RsaPrivateKey::try_from(info).map_err(|_| IdentityError::BadKey(which))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::sync::OnceLock;

    /// Key size of the cached test identities (min_bits is set to match).
    pub(crate) const TEST_BITS: usize = 1024;
    /// scrypt cost for test key files: 1 MiB, milliseconds.
    const TEST_LOG_N: u8 = 10;

    pub(crate) fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    /// Test identities, generated once per process from fixed seeds.
    pub(crate) fn test_identity(i: usize) -> &'static Identity {
        const N: usize = 5;
        static IDS: [OnceLock<Identity>; N] = [const { OnceLock::new() }; N];
        IDS[i].get_or_init(|| {
            Identity::generate_with_min_bits(&mut rng(0x1d00 + i as u64), TEST_BITS, TEST_BITS)
                .expect("test identity")
        })
    }

    fn same(a: &Identity, b: &Identity) -> bool {
        a.signing.public_der() == b.signing.public_der()
            && a.signing_private() == b.signing_private()
            && a.encryption == b.encryption
            && a.enc_cert == b.enc_cert
    }

    fn plain_pem() -> &'static str {
        static PEM: OnceLock<Zeroizing<String>> = OnceLock::new();
        PEM.get_or_init(|| test_identity(0).to_pem(&mut rng(1), None).unwrap())
    }

    fn encrypted_pem() -> &'static str {
        static PEM: OnceLock<Zeroizing<String>> = OnceLock::new();
        PEM.get_or_init(|| {
            test_identity(0)
                .to_pem_with_log_n(&mut rng(2), Some(b"correct horse"), TEST_LOG_N)
                .unwrap()
        })
    }

    #[test]
    fn pem_round_trip_without_passphrase() {
        let pem = plain_pem();
        assert_eq!(pem.matches("-----BEGIN PRIVATE KEY-----").count(), 2);
        assert!(pem.contains("-----BEGIN PEERSTORE ENCRYPTION KEY CERTIFICATE-----"));
        assert!(!pem_is_encrypted(pem));
        let back = Identity::from_pem(pem, None, TEST_BITS).unwrap();
        assert!(same(&back, test_identity(0)));
        assert_eq!(back.user_id(), test_identity(0).user_id());
        // A passphrase for an unencrypted file is ignored.
        let back = Identity::from_pem(pem, Some(b"x"), TEST_BITS).unwrap();
        assert!(same(&back, test_identity(0)));
        // CRLF line endings load too.
        let crlf = pem.replace('\n', "\r\n");
        assert!(same(
            &Identity::from_pem(&crlf, None, TEST_BITS).unwrap(),
            test_identity(0)
        ));
    }

    #[test]
    fn pem_round_trip_with_passphrase() {
        let pem = encrypted_pem();
        assert_eq!(
            pem.matches("-----BEGIN ENCRYPTED PRIVATE KEY-----").count(),
            2
        );
        assert!(pem_is_encrypted(pem));
        let back = Identity::from_pem(pem, Some(b"correct horse"), TEST_BITS).unwrap();
        assert!(same(&back, test_identity(0)));
        assert_eq!(
            Identity::from_pem(pem, Some(b"correct horsf"), TEST_BITS).unwrap_err(),
            IdentityError::WrongPassphrase
        );
        assert_eq!(
            Identity::from_pem(pem, Some(b""), TEST_BITS).unwrap_err(),
            IdentityError::WrongPassphrase
        );
        assert_eq!(
            Identity::from_pem(pem, None, TEST_BITS).unwrap_err(),
            IdentityError::PassphraseRequired
        );
    }

    /// The production scrypt cost, once (a few hundred milliseconds per key).
    #[test]
    fn pem_round_trip_with_default_scrypt_cost() {
        let pem = test_identity(1).to_pem(&mut rng(3), Some(b"pw")).unwrap();
        let back = Identity::from_pem(&pem, Some(b"pw"), TEST_BITS).unwrap();
        assert!(same(&back, test_identity(1)));
    }

    #[test]
    fn the_standard_pkcs8_decoder_reads_the_signing_key() {
        use rsa::pkcs8::DecodePrivateKey;
        let pem = plain_pem();
        let first = &pem[..pem.find("-----END PRIVATE KEY-----\n").unwrap() + 26];
        let key = RsaPrivateKey::from_pkcs8_pem(first).unwrap();
        assert_eq!(&key, test_identity(0).signing_private());
        let pem = encrypted_pem();
        let end = "-----END ENCRYPTED PRIVATE KEY-----\n";
        let first = &pem[..pem.find(end).unwrap() + end.len()];
        let key = RsaPrivateKey::from_pkcs8_encrypted_pem(first, "correct horse").unwrap();
        assert_eq!(&key, test_identity(0).signing_private());
    }

    #[test]
    fn parse_errors_are_specific() {
        let pem = plain_pem();
        let err = |text: &str| Identity::from_pem(text, None, TEST_BITS).unwrap_err();
        assert!(matches!(err(""), IdentityError::NotIdentity(_)));
        assert!(matches!(err("hello\n"), IdentityError::NotIdentity(_)));
        assert!(matches!(
            err(&format!("comment\n{pem}")),
            IdentityError::NotIdentity(_)
        ));
        // Truncated anywhere: inside a block, or between blocks.
        for cut in [3, 10, 40, pem.len() / 2, pem.len() - 5, pem.len() - 3] {
            assert!(
                matches!(err(&pem[..cut]), IdentityError::Truncated(_)),
                "cut at {cut}: {:?}",
                err(&pem[..cut])
            );
        }
        let two_blocks = &pem[..pem.find("-----BEGIN PEERSTORE").unwrap()];
        assert!(matches!(err(two_blocks), IdentityError::Truncated(_)));
        // Too large.
        assert_eq!(
            err(&"\n".repeat(MAX_PEM_BYTES + 1)),
            IdentityError::TooLarge
        );
        // Keys swapped: the certificate no longer matches.
        let blocks = split_blocks(pem).unwrap();
        let swapped = format!("{}{}{}", blocks[1].1, blocks[0].1, blocks[2].1);
        assert_eq!(err(&swapped), IdentityError::BadEncCert);
        // The encryption key replaced by another identity's.
        let other = split_blocks(Box::leak(
            test_identity(1)
                .to_pem(&mut rng(4), None)
                .unwrap()
                .to_string()
                .into_boxed_str(),
        ))
        .unwrap();
        let replaced = format!("{}{}{}", blocks[0].1, other[1].1, blocks[2].1);
        assert_eq!(err(&replaced), IdentityError::BadEncCert);
        // A certificate from another identity.
        let replaced = format!("{}{}{}", blocks[0].1, blocks[1].1, other[2].1);
        assert_eq!(err(&replaced), IdentityError::BadEncCert);
        // The same key twice.
        let twice = format!("{}{}{}", blocks[0].1, blocks[0].1, blocks[2].1);
        assert_eq!(err(&twice), IdentityError::SameKey);
        // Mixed protection.
        let enc = split_blocks(encrypted_pem()).unwrap();
        let mixed = format!("{}{}{}", blocks[0].1, enc[1].1, blocks[2].1);
        assert!(matches!(err(&mixed), IdentityError::NotIdentity(_)));
        // A certificate where a key should be.
        let wrong = format!("{}{}{}", blocks[2].1, blocks[1].1, blocks[2].1);
        assert!(matches!(err(&wrong), IdentityError::NotIdentity(_)));
        // A key block holding garbage.
        let garbage = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let bad = format!("{garbage}{}{}", blocks[1].1, blocks[2].1);
        assert_eq!(err(&bad), IdentityError::BadKey(SIGNING));
    }

    #[test]
    fn key_size_limits_are_enforced() {
        // Loading 1024-bit keys under the production minimum.
        assert_eq!(
            Identity::from_pem(plain_pem(), None, MIN_KEY_BITS_DEFAULT).unwrap_err(),
            IdentityError::KeyTooSmall {
                which: SIGNING,
                bits: 1024,
                min: MIN_KEY_BITS_DEFAULT
            }
        );
        assert!(matches!(
            Identity::generate(&mut rng(5), 1024),
            Err(IdentityError::KeyTooSmall { .. })
        ));
        assert!(matches!(
            Identity::generate(&mut rng(5), 8192),
            Err(IdentityError::KeyTooLarge { .. })
        ));
        // A 512-bit key is refused even with min_bits 0.
        let small = RsaPrivateKey::new(&mut rng(6), 512).unwrap();
        let der = small.to_pkcs8_der().unwrap();
        assert!(matches!(
            parse_private_key(der.as_bytes(), SIGNING, 0),
            Err(IdentityError::KeyTooSmall { bits: 512, .. })
        ));
        // A 4200-bit modulus is refused before any arithmetic on it.
        let big = [0xc5u8; 525];
        let one = [1u8];
        let fake = pkcs1::RsaPrivateKey {
            modulus: pkcs1::UintRef::new(&big).unwrap(),
            public_exponent: pkcs1::UintRef::new(&[1, 0, 1]).unwrap(),
            private_exponent: pkcs1::UintRef::new(&big).unwrap(),
            prime1: pkcs1::UintRef::new(&one).unwrap(),
            prime2: pkcs1::UintRef::new(&one).unwrap(),
            exponent1: pkcs1::UintRef::new(&one).unwrap(),
            exponent2: pkcs1::UintRef::new(&one).unwrap(),
            coefficient: pkcs1::UintRef::new(&one).unwrap(),
            other_prime_infos: None,
        };
        let pkcs1_der = fake.to_der().unwrap();
        let info = PrivateKeyInfo::new(pkcs1::ALGORITHM_ID, &pkcs1_der);
        let der = info.to_der().unwrap();
        assert_eq!(
            parse_private_key(&der, ENCRYPTION, TEST_BITS).unwrap_err(),
            IdentityError::KeyTooLarge {
                which: ENCRYPTION,
                bits: 4200,
                max: MAX_KEY_BITS
            }
        );
    }

    #[test]
    fn excessive_scrypt_cost_is_refused_before_any_work() {
        let key = test_identity(0).signing_private();
        let der = key.to_pkcs8_der().unwrap();
        let salt = [1u8; 16];
        let iv = [2u8; 16];
        // log2(N) = 22 with r = 8: 4 GiB of memory.
        let scrypt = rsa::pkcs8::pkcs5::scrypt::Params::new(22, 8, 1, 32).unwrap();
        let params = pbes2::Parameters::scrypt_aes256cbc(scrypt, &salt, &iv).unwrap();
        // Encrypt with cheap parameters, then claim expensive ones.
        let cheap = rsa::pkcs8::pkcs5::scrypt::Params::new(4, 8, 1, 32).unwrap();
        let cheap = pbes2::Parameters::scrypt_aes256cbc(cheap, &salt, &iv).unwrap();
        let data = cheap.encrypt(b"pw", der.as_bytes()).unwrap();
        let info = EncryptedPrivateKeyInfo {
            encryption_algorithm: params.into(),
            encrypted_data: &data,
        };
        assert_eq!(
            check_encryption_cost(&info),
            Err(IdentityError::UnsupportedEncryption)
        );
        let block = rsa::pkcs8::der::pem::encode_string(
            LABEL_ENCRYPTED_KEY,
            LineEnding::LF,
            &info.to_der().unwrap(),
        )
        .unwrap();
        assert_eq!(
            parse_key_block(&block, Some(b"pw"), SIGNING, TEST_BITS).unwrap_err(),
            IdentityError::UnsupportedEncryption
        );
    }

    /// The production key size end to end. The seeded RNG makes the prime
    /// search the same work on every run (under 4 s here); the scrypt cost is
    /// the test one, the default cost has its own test.
    #[test]
    fn real_user_identity_round_trips() {
        let id = Identity::generate(&mut rng(8), USER_KEY_BITS).unwrap();
        assert_eq!(id.signer().bits(), USER_KEY_BITS);
        let pem = id
            .to_pem_with_log_n(&mut rng(9), Some(b"pw"), TEST_LOG_N)
            .unwrap();
        let back = Identity::from_pem(&pem, Some(b"pw"), MIN_KEY_BITS_DEFAULT).unwrap();
        assert!(same(&back, &id));
        assert_eq!(
            back.pubkey_record(&mut rng(10))
                .verify(MIN_KEY_BITS_DEFAULT),
            Ok(())
        );
    }

    #[test]
    fn local_secrets_are_per_identity_per_label_and_survive_the_key_file() {
        let (a, b) = (test_identity(0), test_identity(1));
        let s = a.local_secret(b"log");
        assert_eq!(*s, *a.local_secret(b"log"));
        assert_ne!(*s, *a.local_secret(b"other"));
        assert_ne!(*s, *b.local_secret(b"log"));
        let pem = a.to_pem_with_log_n(&mut rng(9), None, 1).expect("pem");
        let again = Identity::from_pem(&pem, None, TEST_BITS).expect("load");
        assert_eq!(*s, *again.local_secret(b"log"));
    }

    #[test]
    fn identity_parts_and_debug() {
        let id = test_identity(0);
        assert_eq!(id.user_id(), record::user_id(id.signing_public_der()));
        let fp = id.fingerprint();
        assert_eq!(fp.len(), 64 + 15);
        assert_eq!(fp.split(' ').count(), 16);
        assert_eq!(
            fp.replace(' ', ""),
            hex(&Sha256::digest(id.signing_public_der()))
        );
        assert_eq!(
            verify_enc_cert(
                id.signing_public_der(),
                id.enc_public_der(),
                id.enc_cert(),
                TEST_BITS
            ),
            Ok(())
        );
        assert_eq!(
            verify_enc_cert(
                id.signing_public_der(),
                test_identity(1).enc_public_der(),
                id.enc_cert(),
                TEST_BITS
            ),
            Err(IdentityError::BadEncCert)
        );
        let rec = id.pubkey_record(&mut rng(7));
        assert_eq!(rec.verify(TEST_BITS), Ok(()));
        let Record::PubKey(p) = &rec else {
            unreachable!()
        };
        assert_eq!(p.signing_key, id.signing_public_der());
        assert_eq!(p.enc_key, id.enc_public_der());
        let dbg = format!("{id:?}");
        assert!(dbg.starts_with("Identity"), "{dbg}");
        assert!(dbg.len() < 200, "{dbg}");
        assert!(!dbg.contains("BigUint") && !dbg.contains("primes"), "{dbg}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Flipping any bit of a key file either fails to load or loads the
        /// very same identity (a flip in a field the key parser ignores, such
        /// as a CRT coefficient it recomputes): never a different key.
        #[test]
        fn bit_flips_in_plain_pem_never_load_another_key(bit in any::<prop::sample::Index>()) {
            let mut bytes = plain_pem().as_bytes().to_vec();
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                if let Ok(id) = Identity::from_pem(text, None, TEST_BITS) {
                    prop_assert!(same(&id, test_identity(0)), "bit {} loaded another key", bit);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn bit_flips_in_encrypted_pem_never_load_another_key(bit in any::<prop::sample::Index>()) {
            let mut bytes = encrypted_pem().as_bytes().to_vec();
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                if let Ok(id) = Identity::from_pem(text, Some(b"correct horse"), TEST_BITS) {
                    prop_assert!(same(&id, test_identity(0)), "bit {} loaded another key", bit);
                }
            }
        }

        /// Arbitrary text, and PEM-shaped text with arbitrary contents, never
        /// panics the parser.
        #[test]
        fn junk_never_panics(
            junk in ".{0,400}",
            body in proptest::collection::vec(any::<u8>(), 0..600),
            label in 0usize..4,
        ) {
            let _ = Identity::from_pem(&junk, None, TEST_BITS);
            let _ = Identity::from_pem(&junk, Some(b"pw"), TEST_BITS);
            let _ = pem_is_encrypted(&junk);
            let labels = [LABEL_KEY, LABEL_ENCRYPTED_KEY, LABEL_CERT, "X"];
            let block = rsa::pkcs8::der::pem::encode_string(labels[label], LineEnding::LF, &body)
                .unwrap();
            let text = format!("{block}{block}{block}");
            let _ = Identity::from_pem(&text, None, TEST_BITS);
            let _ = Identity::from_pem(&text, Some(b"pw"), TEST_BITS);
            let blocks = split_blocks(plain_pem()).unwrap();
            let text = format!("{}{}{}", blocks[0].1, block, blocks[2].1);
            let _ = Identity::from_pem(&text, Some(b"pw"), TEST_BITS);
        }
    }
}
