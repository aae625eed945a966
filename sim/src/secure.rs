//! Identities, endorsements and secure links for simulated machines.
//!
//! With `--secure` every machine has an RSA identity (1024 bits: real
//! handshakes and signatures, sized for simulation speed), its ring ids
//! derive from that key, an operator root endorses every honest machine,
//! and all traffic between machines runs through [`Links`]: handshakes,
//! trust checks and sealed frames. Attacker machines present a chain to a
//! root nobody trusts.
//!
//! RSA key generation dominates the cost, so keys come from a process-wide
//! pool: pool entry `i` is always the same key, and a run uses the entries
//! `(machine + 37 * seed) mod POOL`, distinct within a run.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use peerstore_core::endorse::{encode_chain, endorse, TrustStore};
use peerstore_core::link::{LinkConfig, Links};
use peerstore_core::session::{Responder, SessionConfig};
use peerstore_core::{Id, Signer};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rsa::RsaPrivateKey;

/// Key size in the simulator.
pub const SIM_KEY_BITS: usize = 1024;
/// Distinct machine keys: at most this many machines per run.
pub const POOL: u64 = 512;
/// Endorsements last the whole run.
const EXPIRES_MS: u64 = u64::MAX / 2;

fn pool() -> &'static Mutex<BTreeMap<u64, Signer>> {
    static P: OnceLock<Mutex<BTreeMap<u64, Signer>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn generate(seed: u64) -> Signer {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    Signer::generate(&mut rng, SIM_KEY_BITS).expect("1024-bit keys generate")
}

/// Pool key `i` (generated on first use, then shared).
pub fn machine_key(i: u64) -> Signer {
    if let Some(k) = pool().lock().expect("pool lock").get(&i) {
        return k.clone();
    }
    let k = generate(0x5ec0_0000 + i);
    pool()
        .lock()
        .expect("pool lock")
        .entry(i)
        .or_insert(k)
        .clone()
}

/// The key of machine number `machine` in the run with `seed`.
pub fn key_for(seed: u64, machine: u64) -> Signer {
    machine_key((machine + seed.wrapping_mul(37)) % POOL)
}

/// The operators' root: it endorses every honest machine.
pub fn root() -> &'static Signer {
    static R: OnceLock<Signer> = OnceLock::new();
    R.get_or_init(|| generate(0x5ec0_7007))
}

/// A root nobody trusts: what attackers get their chains from.
fn rogue_root() -> &'static Signer {
    static R: OnceLock<Signer> = OnceLock::new();
    R.get_or_init(|| generate(0x5ec0_0bad))
}

/// A user who never registers: its requests must act on nothing.
pub fn rogue_user() -> &'static Signer {
    static R: OnceLock<Signer> = OnceLock::new();
    R.get_or_init(|| generate(0x5ec0_0b0b))
}

/// One ephemeral key for every simulated responder (each certifies it with
/// its own identity; forward secrecy is not what the simulator studies).
fn ephemeral() -> &'static RsaPrivateKey {
    static E: OnceLock<RsaPrivateKey> = OnceLock::new();
    E.get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(0x5ec0_e9e9);
        RsaPrivateKey::new(&mut rng, SIM_KEY_BITS).expect("ephemeral key")
    })
}

pub fn link_config() -> LinkConfig {
    LinkConfig {
        session: SessionConfig {
            min_identity_bits: SIM_KEY_BITS,
            ephemeral_bits: SIM_KEY_BITS,
            min_ephemeral_bits: SIM_KEY_BITS,
            // Simulated time starts at 0: keep the ephemeral key valid.
            rotation_ms: u64::MAX / 4,
            ..SessionConfig::default()
        },
        // A lost handshake packet is noticed at the next send after this
        // (simulated latencies are tens of ms; TCP retries a SYN after 1 s).
        handshake_timeout_ms: 1_500,
        ..LinkConfig::default()
    }
}

/// What a simulated machine presents.
#[derive(Clone, Debug)]
pub enum Credential {
    /// Endorsed by the operators' root (the machines the ring starts with).
    Root,
    /// Endorsed by a root nobody trusts (attackers).
    Rogue,
    /// Nothing yet: it must register with a member first.
    None,
    /// The chain it got by registering (kept across restarts).
    Chain(Vec<u8>),
}

/// The links of a machine with `key`, reachable at `addr`, presenting
/// `credential`; every machine trusts the operators' root.
pub fn links(key: &Signer, addr: &str, credential: Credential, now_ms: u64, seed: u64) -> Links {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let id: Id = key.user_id();
    let mut by = |endorser: &Signer| {
        let e = endorse(&mut rng, endorser, key.public_der(), id, addr, EXPIRES_MS)
            .expect("ids match their keys");
        encode_chain(&[e])
    };
    let credential = match credential {
        Credential::Root => by(root()),
        Credential::Rogue => by(rogue_root()),
        Credential::None => Vec::new(),
        Credential::Chain(c) => c,
    };
    let mut trust = TrustStore::new(SIM_KEY_BITS);
    trust.add_root(root().public_der()).expect("root key");
    let cfg = link_config();
    let responder = Responder::with_ephemeral_key(
        &mut rng,
        now_ms,
        &cfg.session,
        key,
        credential.clone(),
        ephemeral().clone(),
    )
    .expect("responder");
    Links::new(cfg, key.clone(), credential, trust, responder, seed)
}

/// The links of a user's client: sessions as `user` to nodes endorsed
/// under the operators' root.
pub fn client_links(user: &Signer, seed: u64) -> Links {
    let mut trust = TrustStore::new(SIM_KEY_BITS);
    trust.add_root(root().public_der()).expect("root key");
    Links::client(link_config(), user.clone(), trust, seed)
}
