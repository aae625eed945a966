//! Secure sessions and endorsements together, through the public API only:
//! two nodes endorsed by an operator's root open a session, each verifies
//! the other's endorsement chain (the session credential), and an
//! unendorsed node is refused even though its handshake is cryptographically
//! sound.

use std::sync::OnceLock;

use peerstore_core::endorse::{decode_chain, encode_chain, endorse, TrustError, TrustStore};
use peerstore_core::session::{
    HandshakeLimiter, Initiator, LimiterConfig, Opened, PeerIdentity, Responder, Session,
    SessionConfig,
};
use peerstore_core::Signer;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const BITS: usize = 1024;
const ROOT: usize = 0;
const NODE_A: usize = 1;
const NODE_B: usize = 2;
const LONER: usize = 3;
const NOW_MS: u64 = 1_000_000;
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

fn key(i: usize) -> &'static Signer {
    const N: usize = 4;
    static KEYS: [OnceLock<Signer>; N] = [const { OnceLock::new() }; N];
    KEYS[i].get_or_init(|| {
        let mut rng = ChaCha20Rng::seed_from_u64(0x7e57_0000 + i as u64);
        Signer::generate(&mut rng, BITS).expect("test key")
    })
}

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

fn config() -> SessionConfig {
    SessionConfig {
        min_identity_bits: BITS,
        ephemeral_bits: BITS,
        min_ephemeral_bits: BITS,
        ..SessionConfig::default()
    }
}

/// What a node presents: its chain from the root, encoded.
fn credential(node: usize) -> Vec<u8> {
    let s = key(node);
    let e = endorse(
        &mut rng(node as u64),
        key(ROOT),
        s.public_der(),
        s.user_id(),
        "127.0.0.1:4100",
        NOW_MS + DAY_MS,
    )
    .expect("endorse");
    encode_chain(&[e])
}

fn trust() -> TrustStore {
    let mut t = TrustStore::new(BITS);
    t.add_root(key(ROOT).public_der()).expect("root");
    t
}

/// The caller's trust decision on a proven peer.
fn accept(peer: &PeerIdentity) -> Result<(), TrustError> {
    let chain = decode_chain(&peer.credential)?;
    trust().verify_chain(&peer.key_der, peer.id, &chain, NOW_MS)
}

/// Runs a handshake from `initiator` to a responder for `responder`.
fn connect(initiator: usize, init_cred: Vec<u8>, responder: &Responder) -> (Session, Session) {
    let mut r = rng(99);
    let (init, hello) =
        Initiator::new(&mut r, &config(), key(initiator), init_cred).expect("initiator");
    let (pending, challenge) = responder
        .handle_hello(&mut r, NOW_MS, &hello)
        .expect("challenge");
    let (wait, auth) = init
        .handle_challenge(&mut r, NOW_MS, &challenge)
        .expect("auth");
    let (server, finish) = responder
        .handle_auth(&mut r, NOW_MS, pending, &auth)
        .expect("finish");
    let client = wait.handle_finish(&finish).expect("session");
    (client, server)
}

fn responder(node: usize, cred: Vec<u8>) -> Responder {
    Responder::new(&mut rng(7), NOW_MS, &config(), key(node), cred).expect("responder")
}

#[test]
fn endorsed_nodes_connect_verify_each_other_and_talk() {
    let b = responder(NODE_B, credential(NODE_B));
    let (mut a_side, mut b_side) = connect(NODE_A, credential(NODE_A), &b);
    assert_eq!(accept(a_side.peer()), Ok(()));
    assert_eq!(accept(b_side.peer()), Ok(()));
    assert_eq!(a_side.peer().id, key(NODE_B).user_id());
    assert_eq!(b_side.peer().id, key(NODE_A).user_id());

    let mut r = rng(5);
    let f = a_side.seal(&mut r, b"find_successor").expect("seal");
    assert_eq!(
        b_side.open(&f),
        Ok(Opened::Data(b"find_successor".to_vec()))
    );
    let g = b_side.seal(&mut r, b"node 42").expect("seal");
    assert_eq!(a_side.open(&g), Ok(Opened::Data(b"node 42".to_vec())));
}

#[test]
fn unendorsed_or_self_endorsed_nodes_are_refused_by_the_caller() {
    let b = responder(NODE_B, credential(NODE_B));
    // No credential at all.
    let (_, b_side) = connect(LONER, encode_chain(&[]), &b);
    assert_eq!(accept(b_side.peer()), Err(TrustError::Untrusted));
    // A chain the loner signed itself: its root is not trusted.
    let s = key(LONER);
    let own =
        endorse(&mut rng(1), s, s.public_der(), s.user_id(), "x", NOW_MS + 1).expect("endorse");
    let (_, b_side) = connect(LONER, encode_chain(&[own]), &b);
    assert_eq!(accept(b_side.peer()), Err(TrustError::Untrusted));
    // Node A's genuine credential presented by the loner: wrong subject.
    let (_, b_side) = connect(LONER, credential(NODE_A), &b);
    assert_eq!(
        accept(b_side.peer()),
        Err(TrustError::WrongSubject { link: 0 })
    );
}

#[test]
fn a_limiter_throttles_handshake_floods() {
    let mut limiter: HandshakeLimiter<&str> = HandshakeLimiter::new(LimiterConfig::default());
    let allowed = (0..100)
        .filter(|_| limiter.allow(&"198.51.100.7", NOW_MS))
        .count();
    assert_eq!(allowed, LimiterConfig::default().per_key_burst as usize);
}
