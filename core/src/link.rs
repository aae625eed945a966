//! Secure links: every [`Message`] between machines travels inside a secure
//! session, and only from peers whose endorsement chain leads to a key this
//! machine trusts.
//!
//! A [`Links`] value belongs to one machine (all its virtual nodes share it,
//! as they share its address and identity key). It is sans-IO like the rest
//! of the core: the caller hands it messages to send ([`Links::send`]) and
//! packets that arrived ([`Links::receive`]), and drains packets to put on
//! the wire ([`Links::poll_packet`]). The simulator and the Tokio node drive
//! it the same way.
//!
//! ## Connections
//!
//! A connection carries data one way: from the machine that opened it (the
//! initiator) to the other (the responder), which only answers the
//! handshake. Each machine sends over its own connection to a peer and
//! receives over the peer's, so two machines that start talking at once
//! never race to share one. A connection lives on an ordered, reliable
//! stream (TCP in the node; a first-in first-out link in the simulator);
//! anything that breaks order kills the session, and the receiver answers
//! the next packet with a reset so the sender opens a new one.
//!
//! Packets start with one type byte:
//!
//! | type | direction | body |
//! |---|---|---|
//! | 0 | to responder | Hello |
//! | 1 | to responder | Auth |
//! | 2 | to responder | a session frame: postcard `(from id, to id, Message)` |
//! | 3 | to initiator | Challenge |
//! | 4 | to initiator | Finish |
//! | 5 | to initiator | reset: "I have no session for you; open a new one" |
//! | 6 | to initiator | a session frame from the responder (registration and client replies) |
//!
//! ## Registration
//!
//! A new machine has no endorsement. Its operator starts it trusting the
//! key of a node already in the ring (the entry) and has that node admit
//! the new key ([`Links::admit`], by SHA-256 fingerprint). The new machine
//! calls [`Links::register`]: the entry completes the handshake on
//! probation (the key is admitted, though not yet trusted), accepts only a
//! registration request on it, endorses the new key, learns it as trusted,
//! and answers on the same session with the chain (its endorsement, then
//! its own chain) and the machines it is connected to. The new machine
//! checks the chain against its own trust, presents it from then on, and
//! may register with each of those machines in turn: a machine with a
//! valid chain that asks is endorsed directly, and the shortest chain is
//! kept. [`Links::poll_event`] reports a completed registration.
//!
//! ## Clients
//!
//! A user's client opens a session with its user key and presents the
//! [`CLIENT_CREDENTIAL`] marker instead of an endorsement chain (the
//! credential is covered by the handshake signature, so the role is
//! proven, not assumed). A node gives such a peer a client session, on
//! which only calls travel: [`Links::call`] seals a signed
//! [`ClientRequest`] to the node, the node takes it from
//! [`Links::poll_call`] (the request must be signed by the very key that
//! proved itself in the handshake), hands it to its gate, and answers with
//! [`Links::answer`] on the same session; the client takes the answer from
//! [`Links::poll_answer`]. A client session never carries a Chord message
//! or a registration, and each has a bound on calls in progress. The
//! client checks the node's endorsement chain like any machine does, so it
//! talks only to nodes its trust leads to.
//!
//! ## Trust
//!
//! Both sides present their endorsement chain (see [`crate::endorse`]) as
//! the handshake credential. The responder checks the initiator's before it
//! sends Finish, the initiator checks the responder's on Finish; a peer
//! without a valid chain to a trusted key gets no session, so none of its
//! messages reaches a node. The transport vouches for `from` in every
//! delivered message: the sender's id must be one of the virtual node ids
//! of the key that proved itself in the handshake, and a message is only
//! sent to a peer id that belongs to the key at that address.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use crate::endorse::{decode_chain, encode_chain, endorse, TrustStore};
use crate::gate::{ClientRequest, GateError, GateReply};
use crate::id::Id;
use crate::record::Signer;
use crate::session::{
    HandshakeLimiter, Initiator, InitiatorWait, LimiterConfig, Opened, PeerIdentity, Responder,
    ResponderHandshake, Session, SessionConfig, SEAL_HEAD, SEAL_TAIL,
};
use crate::vnode::vnode_id;
use crate::wire::{Addr, Message, Peer};
use sha2::{Digest, Sha256};

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of a key's SPKI DER: what [`Links::admit`] takes.
pub fn key_sha256(key_der: &[u8]) -> [u8; 32] {
    sha256(key_der)
}

const HELLO: u8 = 0;
const AUTH: u8 = 1;
const FRAME: u8 = 2;
const CHALLENGE: u8 = 3;
const FINISH: u8 = 4;
const RESET: u8 = 5;
const FRAME_BACK: u8 = 6;

/// Machines named in a registration reply, at most.
const KNOWN_MAX: usize = 32;

/// What a client presents instead of an endorsement chain: "I am a user's
/// client, not a machine of the ring". Signed into the handshake.
pub const CLIENT_CREDENTIAL: &[u8] = b"peerstore/client/v1";

/// Parameters of a machine's links.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub session: SessionConfig,
    pub limiter: LimiterConfig,
    /// Messages held per peer while its handshake runs; the oldest go first.
    pub queue_max: usize,
    /// A handshake not done after this long is started again.
    pub handshake_timeout_ms: u64,
    /// Virtual node ids checked per key (ids `vnode_id(key, 0..vnodes_max)`).
    pub vnodes_max: u32,
    /// How long the endorsements this machine gives are valid.
    pub endorse_ttl_ms: u64,
    /// A machine whose own chain expires within this long asks a ring
    /// neighbour to endorse it again ([`crate::machine::Machine::tick`]),
    /// and takes a same-length or shorter chain that lasts longer.
    pub renew_before_ms: u64,
    /// Whether this machine opens client sessions for users' clients.
    pub serve_clients: bool,
    /// Calls one client session may have in progress; more are answered
    /// "busy" at once.
    pub client_calls_max: usize,
}

impl Default for LinkConfig {
    fn default() -> LinkConfig {
        LinkConfig {
            session: SessionConfig::default(),
            limiter: LimiterConfig::default(),
            queue_max: 1024,
            handshake_timeout_ms: 10_000,
            vnodes_max: 64,
            endorse_ttl_ms: 30 * 24 * 60 * 60 * 1000,
            renew_before_ms: 10 * 24 * 60 * 60 * 1000,
            serve_clients: true,
            client_calls_max: 64,
        }
    }
}

/// Counters, for reports and tests. `+=` adds another machine's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    pub handshakes_started: u64,
    pub handshakes_done: u64,
    /// Handshakes refused because the peer's endorsement chain did not
    /// lead to a trusted key (either side).
    pub refused_untrusted: u64,
    /// Hellos refused by the handshake rate limit.
    pub refused_rate: u64,
    /// Handshakes that failed cryptographically, or packets out of place.
    pub bad_handshakes: u64,
    /// Frames that failed to open (the session died), or whose sender id
    /// did not belong to the session's key.
    pub bad_frames: u64,
    /// Resets received (our session was gone at the peer).
    pub resets: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Messages dropped: queue full, no route, or addressed to an id the
    /// key at that address does not own.
    pub dropped: u64,
    /// Endorsements this machine gave on request.
    pub endorsements_given: u64,
    /// Endorsement chains this machine received and accepted.
    pub endorsements_received: u64,
    /// Client sessions opened for users' clients.
    pub client_sessions: u64,
    /// Calls taken from clients and handed to the caller.
    pub calls_received: u64,
    /// Calls refused by the links: over the session's bound, or signed
    /// by a key other than the session's.
    pub calls_refused: u64,
    /// Answers received (on a client's links).
    pub answers_received: u64,
}

impl std::ops::AddAssign<&LinkStats> for LinkStats {
    fn add_assign(&mut self, o: &LinkStats) {
        let LinkStats {
            handshakes_started,
            handshakes_done,
            refused_untrusted,
            refused_rate,
            bad_handshakes,
            bad_frames,
            resets,
            frames_sent,
            frames_received,
            dropped,
            endorsements_given,
            endorsements_received,
            client_sessions,
            calls_received,
            calls_refused,
            answers_received,
        } = o;
        self.handshakes_started += handshakes_started;
        self.handshakes_done += handshakes_done;
        self.refused_untrusted += refused_untrusted;
        self.refused_rate += refused_rate;
        self.bad_handshakes += bad_handshakes;
        self.bad_frames += bad_frames;
        self.resets += resets;
        self.frames_sent += frames_sent;
        self.frames_received += frames_received;
        self.dropped += dropped;
        self.endorsements_given += endorsements_given;
        self.endorsements_received += endorsements_received;
        self.client_sessions += client_sessions;
        self.calls_received += calls_received;
        self.calls_refused += calls_refused;
        self.answers_received += answers_received;
    }
}

/// Something the caller should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A registration with `by` succeeded: this machine now presents a
    /// chain of `chain_len` endorsements, and `by` named `known` machines
    /// to register with in turn.
    Registered {
        by: Addr,
        chain_len: usize,
        known: Vec<Addr>,
    },
}

/// A packet to put on the wire to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub to: Addr,
    pub bytes: Vec<u8>,
}

/// A message that arrived over a session, from a vouched-for sender, for
/// the virtual node `to` of this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub from: Peer,
    pub to: Id,
    pub msg: Message,
}

/// A client's request as the node receives it: `from` is the client's
/// session, `id` the client's handle for the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub from: Addr,
    pub id: u64,
    pub req: ClientRequest,
}

/// The earliest expiry of a chain's links.
fn chain_expires_ms(chain: &[crate::endorse::Endorsement]) -> u64 {
    chain.iter().map(|e| e.expires_ms).min().unwrap_or(0)
}

/// When an encoded credential stops being valid; `None` for no chain (or a
/// client's marker).
fn expiry_of(credential: &[u8]) -> Option<u64> {
    if credential.is_empty() || credential == CLIENT_CREDENTIAL {
        return None;
    }
    decode_chain(credential).ok().map(|c| chain_expires_ms(&c))
}

/// What a frame carries (the two forms encode alike).
#[derive(Serialize)]
enum PayloadRef<'a> {
    Msg { from: Id, to: Id, msg: &'a Message },
    Register { addr: &'a str },
    Endorsed { chain: &'a [u8], known: &'a [Addr] },
    Call { id: u64, req: &'a ClientRequest },
    Answer { id: u64, reply: &'a GateReply },
}

#[derive(Deserialize)]
enum Payload {
    Msg { from: Id, to: Id, msg: Message },
    Register { addr: String },
    Endorsed { chain: Vec<u8>, known: Vec<Addr> },
    Call { id: u64, req: ClientRequest },
    Answer { id: u64, reply: GateReply },
}

/// An open session and the ring ids its peer's key owns (its virtual
/// node ids, worked out once when the session opens).
struct Peered {
    session: Session,
    ids: Vec<Id>,
}

impl Peered {
    fn new(session: Session, vnodes_max: u32) -> Box<Peered> {
        let key = &session.peer().key_der;
        let ids = (0..vnodes_max.max(1)).map(|i| vnode_id(key, i)).collect();
        Box::new(Peered { session, ids })
    }

    fn owns(&self, id: Id) -> bool {
        self.ids.contains(&id)
    }
}

/// A payload laid out to be sealed ([`lay_out`]) and, for a message, the
/// peer id it is for.
type Queued = (Option<Id>, Vec<u8>);

/// Bytes before a laid-out payload: the packet's kind byte, then the
/// session frame's header and IV.
const LAID_HEAD: usize = 1 + SEAL_HEAD;

/// Encodes `value` after [`LAID_HEAD`] free bytes, in a buffer with room
/// for the frame's padding and MAC after it: the packet is then built
/// around the payload where it lies ([`Session::seal_laid_out`]). Encoding
/// into a growing vector, sealing a copy and copying the frame behind its
/// kind byte moved each 1 MiB block three times more per hop; on a backup
/// that was about a tenth of the nodes' CPU time. `None` if it does not
/// encode.
fn lay_out<T: Serialize + ?Sized>(value: &T) -> Option<Vec<u8>> {
    crate::wire::encode_after(LAID_HEAD, value, SEAL_TAIL).ok()
}

enum Outgoing {
    /// Hello sent; `init` is taken when the Challenge arrives.
    Hello {
        init: Option<Box<Initiator>>,
        queue: VecDeque<Queued>,
        since_ms: u64,
    },
    /// Auth sent; waiting for Finish.
    Auth {
        wait: Box<InitiatorWait>,
        queue: VecDeque<Queued>,
        since_ms: u64,
    },
    Open(Box<Peered>),
}

enum Incoming {
    Challenged(ResponderHandshake),
    Open(Box<Peered>),
    /// An admitted but not yet endorsed machine: only a registration
    /// request is accepted on this session.
    Probation(Box<Peered>),
    /// A user's client: only calls, at most `client_calls_max` at once.
    Client {
        p: Box<Peered>,
        calls: usize,
    },
}

/// One machine's secure links to its peers.
pub struct Links {
    cfg: LinkConfig,
    identity: Signer,
    credential: Vec<u8>,
    /// When `credential` stops being valid, worked out when it is set (a
    /// machine asks at every tick).
    credential_expires_ms: Option<u64>,
    trust: TrustStore,
    /// None on a client's links: a client only opens sessions.
    responder: Option<Responder>,
    limiter: HandshakeLimiter<Addr>,
    out: BTreeMap<Addr, Outgoing>,
    inc: BTreeMap<Addr, Incoming>,
    outbox: VecDeque<Packet>,
    /// SHA-256 of keys this machine endorses when they ask.
    admitted: BTreeSet<[u8; 32]>,
    events: VecDeque<LinkEvent>,
    calls: VecDeque<Call>,
    answers: VecDeque<(Addr, u64, GateReply)>,
    rng: ChaCha20Rng,
    stats: LinkStats,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("identity", &self.identity.user_id())
            .field("outgoing", &self.out.len())
            .field("incoming", &self.inc.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Links {
    /// Links for the machine whose identity is `identity`, presenting
    /// `credential` (its encoded endorsement chain), trusting `trust`, with
    /// `responder` answering handshakes. `seed` seeds the IVs and nonces.
    pub fn new(
        cfg: LinkConfig,
        identity: Signer,
        credential: Vec<u8>,
        trust: TrustStore,
        responder: Responder,
        seed: u64,
    ) -> Links {
        Links::build(cfg, identity, credential, trust, Some(responder), seed)
    }

    fn build(
        cfg: LinkConfig,
        identity: Signer,
        credential: Vec<u8>,
        trust: TrustStore,
        responder: Option<Responder>,
        seed: u64,
    ) -> Links {
        let limiter = HandshakeLimiter::new(cfg.limiter);
        Links {
            cfg,
            identity,
            credential_expires_ms: expiry_of(&credential),
            credential,
            trust,
            responder,
            limiter,
            out: BTreeMap::new(),
            inc: BTreeMap::new(),
            outbox: VecDeque::new(),
            admitted: BTreeSet::new(),
            events: VecDeque::new(),
            calls: VecDeque::new(),
            answers: VecDeque::new(),
            rng: ChaCha20Rng::seed_from_u64(seed),
            stats: LinkStats::default(),
        }
    }

    /// A user's client links: sessions as `user` (presenting
    /// [`CLIENT_CREDENTIAL`]) to nodes whose chains lead to `trust`; it
    /// answers no handshakes. `seed` seeds the IVs and nonces (a real
    /// client passes fresh OS randomness).
    pub fn client(cfg: LinkConfig, user: Signer, trust: TrustStore, seed: u64) -> Links {
        Links::build(cfg, user, CLIENT_CREDENTIAL.to_vec(), trust, None, seed)
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// Lets the machine whose key has this SHA-256 register here (the
    /// operator approved it).
    pub fn admit(&mut self, key_sha256: [u8; 32]) {
        self.admitted.insert(key_sha256);
    }

    /// The endorsement chain this machine presents (encoded; empty if none):
    /// what a node keeps on disk to present again after a restart.
    pub fn credential(&self) -> &[u8] {
        &self.credential
    }

    /// When this machine's endorsement chain stops being valid (the earliest
    /// expiry of its links); `None` without a chain.
    pub fn credential_expires_ms(&self) -> Option<u64> {
        self.credential_expires_ms
    }

    /// Whether this machine presents an endorsement chain.
    pub fn endorsed(&self) -> bool {
        !self.credential.is_empty() && self.credential != CLIENT_CREDENTIAL
    }

    /// Sends a client's signed request to the node at `node`; its answer
    /// comes back through [`Links::poll_answer`] with the same `id`.
    pub fn call(&mut self, now_ms: u64, node: Addr, id: u64, req: &ClientRequest) {
        match lay_out(&PayloadRef::Call { id, req }) {
            Some(laid) => self.enqueue(now_ms, node, None, laid),
            None => self.stats.dropped += 1,
        }
    }

    /// The next client request for the caller's gate (node side).
    pub fn poll_call(&mut self) -> Option<Call> {
        self.calls.pop_front()
    }

    /// Answers call `id` on the client session from `client` (node side).
    /// Dropped if the session is gone (the client will open a new one and
    /// ask again).
    pub fn answer(&mut self, client: Addr, id: u64, reply: &GateReply) {
        let Some(Incoming::Client { p, calls }) = self.inc.get_mut(&client) else {
            self.stats.dropped += 1;
            return;
        };
        *calls = calls.saturating_sub(1);
        let Some(laid) = lay_out(&PayloadRef::Answer { id, reply }) else {
            self.stats.dropped += 1;
            return;
        };
        match p.session.seal_laid_out(&mut self.rng, laid, 1) {
            Ok(packet) => {
                self.stats.frames_sent += 1;
                self.push_laid(client, FRAME_BACK, packet);
            }
            Err(_) => {
                self.stats.dropped += 1;
                self.inc.remove(&client);
            }
        }
    }

    /// The next answer to one of our calls (client side): the node it came
    /// from, the call's id, the reply.
    pub fn poll_answer(&mut self) -> Option<(Addr, u64, GateReply)> {
        self.answers.pop_front()
    }

    /// The next event for the caller.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Asks the machine at `entry` to endorse us; we can be reached at
    /// `my_addr`. The answer arrives as [`LinkEvent::Registered`].
    pub fn register(&mut self, now_ms: u64, entry: Addr, my_addr: &str) {
        match lay_out(&PayloadRef::Register { addr: my_addr }) {
            Some(laid) => self.enqueue(now_ms, entry, None, laid),
            None => self.stats.dropped += 1,
        }
    }

    /// The next packet to put on the wire.
    pub fn poll_packet(&mut self) -> Option<Packet> {
        self.outbox.pop_front()
    }

    fn trusted(&self, peer: &PeerIdentity, now_ms: u64) -> bool {
        match decode_chain(&peer.credential) {
            Ok(chain) => self
                .trust
                .verify_chain(&peer.key_der, peer.id, &chain, now_ms)
                .is_ok(),
            Err(_) => false,
        }
    }

    fn push(&mut self, to: Addr, kind: u8, body: &[u8]) {
        let mut bytes = Vec::with_capacity(1 + body.len());
        bytes.push(kind);
        bytes.extend_from_slice(body);
        self.outbox.push_back(Packet { to, bytes });
    }

    /// [`Links::push`] of a packet sealed from a laid-out payload, its
    /// kind byte still to fill in.
    fn push_laid(&mut self, to: Addr, kind: u8, mut bytes: Vec<u8>) {
        bytes[0] = kind;
        self.outbox.push_back(Packet { to, bytes });
    }

    /// Sends `msg` from our virtual node `from` to `to`: sealed at once if
    /// a session is open, else held while one is set up.
    pub fn send(&mut self, now_ms: u64, from: Id, to: Peer, msg: &Message) {
        let Some(laid) = lay_out(&PayloadRef::Msg {
            from,
            to: to.id,
            msg,
        }) else {
            self.stats.dropped += 1;
            return;
        };
        self.enqueue(now_ms, to.addr, Some(to.id), laid);
    }

    fn enqueue(&mut self, now_ms: u64, to: Addr, to_id: Option<Id>, laid: Vec<u8>) {
        let stale = match self.out.get(&to) {
            Some(Outgoing::Hello { since_ms, .. }) | Some(Outgoing::Auth { since_ms, .. }) => {
                now_ms.saturating_sub(*since_ms) >= self.cfg.handshake_timeout_ms
            }
            _ => false,
        };
        if stale {
            // The handshake got lost: start again, keeping what waits.
            let queue = match self.out.remove(&to) {
                Some(Outgoing::Hello { queue, .. }) | Some(Outgoing::Auth { queue, .. }) => queue,
                _ => VecDeque::new(),
            };
            self.start(now_ms, to, queue);
        }
        match self.out.get_mut(&to) {
            None => {
                let mut queue = VecDeque::new();
                queue.push_back((to_id, laid));
                self.start(now_ms, to, queue);
            }
            Some(Outgoing::Hello { queue, .. }) | Some(Outgoing::Auth { queue, .. }) => {
                if queue.len() >= self.cfg.queue_max {
                    queue.pop_front();
                    self.stats.dropped += 1;
                }
                queue.push_back((to_id, laid));
            }
            Some(Outgoing::Open(_)) => self.seal_to(to, to_id, laid),
        }
    }

    fn start(&mut self, now_ms: u64, to: Addr, queue: VecDeque<Queued>) {
        match Initiator::new(
            &mut self.rng,
            &self.cfg.session,
            &self.identity,
            self.credential.clone(),
        ) {
            Ok((init, hello)) => {
                self.stats.handshakes_started += 1;
                self.out.insert(
                    to,
                    Outgoing::Hello {
                        init: Some(Box::new(init)),
                        queue,
                        since_ms: now_ms,
                    },
                );
                self.push(to, HELLO, &hello);
            }
            Err(_) => self.stats.dropped += queue.len() as u64,
        }
    }

    /// Seals one laid-out payload on the open session to `to`; a message
    /// only if the session's key owns `to_id`.
    fn seal_to(&mut self, to: Addr, to_id: Option<Id>, laid: Vec<u8>) {
        let Some(Outgoing::Open(p)) = self.out.get_mut(&to) else {
            self.stats.dropped += 1;
            return;
        };
        if to_id.is_some_and(|id| !p.owns(id)) {
            // Someone else answers at that address.
            self.stats.dropped += 1;
            return;
        }
        match p.session.seal_laid_out(&mut self.rng, laid, 1) {
            Ok(packet) => {
                self.stats.frames_sent += 1;
                self.push_laid(to, FRAME, packet);
            }
            Err(_) => {
                // Too large, or the session is spent: drop it; the next
                // message opens a new one.
                self.stats.dropped += 1;
                self.out.remove(&to);
            }
        }
    }

    /// A packet from `from` arrived. Returns the messages it carried for our
    /// virtual nodes (checked: a session, a trusted peer, a sender id the
    /// peer's key owns); replies go to [`Links::poll_packet`].
    pub fn receive(&mut self, now_ms: u64, from: Addr, bytes: &[u8]) -> Vec<Delivery> {
        let Some((&kind, body)) = bytes.split_first() else {
            self.stats.bad_frames += 1;
            return Vec::new();
        };
        match kind {
            HELLO => self.on_hello(now_ms, from, body),
            AUTH => self.on_auth(now_ms, from, body),
            FRAME => return self.on_frame(now_ms, from, body),
            FRAME_BACK => self.on_frame_back(now_ms, from, body),
            CHALLENGE => self.on_challenge(now_ms, from, body),
            FINISH => self.on_finish(now_ms, from, body),
            RESET => {
                if matches!(self.out.get(&from), Some(Outgoing::Open(_))) {
                    self.stats.resets += 1;
                    self.out.remove(&from);
                }
            }
            _ => self.stats.bad_frames += 1,
        }
        Vec::new()
    }

    fn on_hello(&mut self, now_ms: u64, from: Addr, body: &[u8]) {
        if !self.limiter.allow(&from, now_ms) {
            self.stats.refused_rate += 1;
            return;
        }
        let Some(responder) = self.responder.as_mut() else {
            // A client answers no handshakes.
            self.stats.bad_handshakes += 1;
            return;
        };
        match responder.handle_hello(&mut self.rng, now_ms, body) {
            Ok((hs, challenge)) => {
                // A new connection from that address replaces the old one.
                self.inc.insert(from, Incoming::Challenged(hs));
                self.push(from, CHALLENGE, &challenge);
            }
            Err(_) => self.stats.bad_handshakes += 1,
        }
    }

    fn on_auth(&mut self, now_ms: u64, from: Addr, body: &[u8]) {
        let Some(Incoming::Challenged(hs)) = self.inc.remove(&from) else {
            self.stats.bad_handshakes += 1;
            return;
        };
        let Some(responder) = self.responder.as_mut() else {
            self.stats.bad_handshakes += 1;
            return;
        };
        match responder.handle_auth(&mut self.rng, now_ms, hs, body) {
            Ok((session, finish)) => {
                let vnodes_max = self.cfg.vnodes_max;
                let state = if session.peer().credential == CLIENT_CREDENTIAL {
                    if !self.cfg.serve_clients {
                        self.stats.refused_untrusted += 1;
                        return;
                    }
                    // A user's client: calls only (their signatures are the
                    // gate's to check).
                    self.stats.client_sessions += 1;
                    Incoming::Client {
                        p: Peered::new(session, 1),
                        calls: 0,
                    }
                } else if self.trusted(session.peer(), now_ms) {
                    Incoming::Open(Peered::new(session, vnodes_max))
                } else if self.admitted.contains(&sha256(&session.peer().key_der)) {
                    // Approved by the operator but not yet endorsed: it may
                    // only ask to register.
                    Incoming::Probation(Peered::new(session, vnodes_max))
                } else {
                    // Proven, but not endorsed by anyone we trust: no Finish,
                    // no session, nothing it sends reaches a node.
                    self.stats.refused_untrusted += 1;
                    return;
                };
                self.stats.handshakes_done += 1;
                self.inc.insert(from, state);
                self.push(from, FINISH, &finish);
            }
            Err(_) => self.stats.bad_handshakes += 1,
        }
    }

    fn on_frame(&mut self, now_ms: u64, from: Addr, body: &[u8]) -> Vec<Delivery> {
        let (p, probation) = match self.inc.get_mut(&from) {
            Some(Incoming::Open(p)) => (p, false),
            Some(Incoming::Probation(p)) => (p, true),
            Some(Incoming::Client { .. }) => {
                self.on_client_frame(from, body);
                return Vec::new();
            }
            _ => {
                // No session (we restarted, or it died): tell the sender.
                self.push(from, RESET, &[]);
                return Vec::new();
            }
        };
        let plain = match p.session.open(body) {
            Ok(Opened::Data(d)) => d,
            Ok(Opened::Close) => {
                self.inc.remove(&from);
                return Vec::new();
            }
            Err(_) => {
                self.stats.bad_frames += 1;
                self.inc.remove(&from);
                self.push(from, RESET, &[]);
                return Vec::new();
            }
        };
        let (sender, to, msg) = match postcard::from_bytes::<Payload>(&plain) {
            Ok(Payload::Msg { from, to, msg }) if !probation => (from, to, msg),
            Ok(Payload::Register { addr }) => {
                self.on_register(now_ms, from, addr);
                return Vec::new();
            }
            _ => {
                // Garbage, a reply sent the wrong way, or a message from a
                // machine still on probation.
                self.stats.bad_frames += 1;
                return Vec::new();
            }
        };
        let owned = matches!(self.inc.get(&from), Some(Incoming::Open(p)) if p.owns(sender));
        if !owned {
            // A machine speaking for an id that is not its own.
            self.stats.bad_frames += 1;
            return Vec::new();
        }
        self.stats.frames_received += 1;
        vec![Delivery {
            from: Peer {
                id: sender,
                addr: from,
            },
            to,
            msg,
        }]
    }

    /// A frame on a client session: a call, or nothing.
    fn on_client_frame(&mut self, from: Addr, body: &[u8]) {
        let Some(Incoming::Client { p, calls }) = self.inc.get_mut(&from) else {
            return;
        };
        let plain = match p.session.open(body) {
            Ok(Opened::Data(d)) => d,
            Ok(Opened::Close) => {
                self.inc.remove(&from);
                return;
            }
            Err(_) => {
                self.stats.bad_frames += 1;
                self.inc.remove(&from);
                self.push(from, RESET, &[]);
                return;
            }
        };
        let Ok(Payload::Call { id, req }) = postcard::from_bytes::<Payload>(&plain) else {
            // A Chord message, a registration or garbage: not on a client
            // session.
            self.stats.bad_frames += 1;
            return;
        };
        let refusal = if req.auth.user_key != p.session.peer().key_der {
            // Someone else's signed request, replayed over this session.
            Some(GateError::Auth(crate::reqauth::AuthError::WrongKey))
        } else if *calls >= self.cfg.client_calls_max {
            Some(GateError::Busy)
        } else {
            None
        };
        if let Some(e) = refusal {
            self.stats.calls_refused += 1;
            *calls += 1; // `answer` takes it back off
            let reply = GateReply::refusal(&req, e);
            self.answer(from, id, &reply);
            return;
        }
        *calls += 1;
        self.stats.calls_received += 1;
        self.calls.push_back(Call { from, id, req });
    }

    /// The machine on the incoming session from `from` asks for our
    /// endorsement: given if it is admitted or already trusted.
    fn on_register(&mut self, now_ms: u64, from: Addr, addr: String) {
        let Some(Incoming::Open(p) | Incoming::Probation(p)) = self.inc.get(&from) else {
            return;
        };
        let peer = p.session.peer().clone();
        let admitted = self.admitted.contains(&sha256(&peer.key_der));
        if !admitted && !self.trusted(&peer, now_ms) {
            self.stats.refused_untrusted += 1;
            return;
        }
        let own_chain = decode_chain(&self.credential).unwrap_or_default();
        let expires = now_ms.saturating_add(self.cfg.endorse_ttl_ms);
        let e = match endorse(
            &mut self.rng,
            &self.identity,
            &peer.key_der,
            peer.id,
            &addr,
            expires,
        ) {
            Ok(e) => e,
            Err(_) => {
                self.stats.refused_untrusted += 1;
                return;
            }
        };
        let mut chain = vec![e];
        chain.extend(own_chain);
        if self
            .trust
            .learn(&peer.key_der, peer.id, &chain, now_ms)
            .is_err()
        {
            // Our own chain does not lead to what we trust: nothing to give.
            self.stats.refused_untrusted += 1;
            return;
        }
        self.stats.endorsements_given += 1;
        let chain = encode_chain(&chain);
        let known: Vec<Addr> = self
            .out
            .iter()
            .filter(|(a, o)| **a != from && matches!(o, Outgoing::Open(_)))
            .map(|(a, _)| *a)
            .take(KNOWN_MAX)
            .collect();
        let Some(laid) = lay_out(&PayloadRef::Endorsed {
            chain: &chain,
            known: &known,
        }) else {
            return;
        };
        // Off probation: it is endorsed now.
        let Some(Incoming::Open(mut p) | Incoming::Probation(mut p)) = self.inc.remove(&from)
        else {
            return;
        };
        match p.session.seal_laid_out(&mut self.rng, laid, 1) {
            Ok(packet) => {
                self.push_laid(from, FRAME_BACK, packet);
                self.inc.insert(from, Incoming::Open(p));
            }
            Err(_) => self.stats.dropped += 1,
        }
    }

    /// A frame from the responder on our outgoing session: a registration
    /// reply.
    fn on_frame_back(&mut self, now_ms: u64, from: Addr, body: &[u8]) {
        let Some(Outgoing::Open(p)) = self.out.get_mut(&from) else {
            self.stats.bad_frames += 1;
            return;
        };
        let plain = match p.session.open(body) {
            Ok(Opened::Data(p)) => p,
            _ => {
                self.stats.bad_frames += 1;
                self.out.remove(&from);
                return;
            }
        };
        let (chain, known) = match postcard::from_bytes::<Payload>(&plain) {
            Ok(Payload::Endorsed { chain, known }) => (chain, known),
            Ok(Payload::Answer { id, reply }) if self.credential == CLIENT_CREDENTIAL => {
                self.stats.answers_received += 1;
                self.answers.push_back((from, id, reply));
                return;
            }
            _ => {
                self.stats.bad_frames += 1;
                return;
            }
        };
        let Ok(links) = decode_chain(&chain) else {
            self.stats.bad_frames += 1;
            return;
        };
        let me = self.identity.public_der().to_vec();
        if self
            .trust
            .verify_chain(&me, self.identity.user_id(), &links, now_ms)
            .is_err()
        {
            // A chain to nobody we trust is worth nothing to us.
            self.stats.refused_untrusted += 1;
            return;
        }
        self.stats.endorsements_received += 1;
        let current = decode_chain(&self.credential).ok();
        let shorter = current.as_ref().is_some_and(|c| links.len() < c.len());
        // A renewal: no longer than what we have, and it outlives it, which
        // is about to expire.
        let renews = current.as_ref().is_some_and(|c| {
            let now_until = chain_expires_ms(c);
            links.len() <= c.len()
                && now_until.saturating_sub(now_ms) < self.cfg.renew_before_ms
                && chain_expires_ms(&links) > now_until
        });
        if self.credential.is_empty() || shorter || renews {
            if let Some(r) = self.responder.as_mut() {
                if r.set_credential(chain.clone()).is_err() {
                    return;
                }
            }
            self.credential_expires_ms = expiry_of(&chain);
            self.credential = chain;
        }
        self.events.push_back(LinkEvent::Registered {
            by: from,
            chain_len: links.len(),
            known: known.into_iter().take(KNOWN_MAX).collect(),
        });
    }

    fn on_challenge(&mut self, now_ms: u64, from: Addr, body: &[u8]) {
        let Some(Outgoing::Hello {
            init,
            queue,
            since_ms,
        }) = self.out.get_mut(&from)
        else {
            self.stats.bad_handshakes += 1;
            return;
        };
        if init.as_ref().is_some_and(|i| !i.answers(body)) {
            // A late answer to a Hello we gave up on (or garbage): the
            // handshake under way is not spoiled by it.
            self.stats.bad_handshakes += 1;
            return;
        }
        let Some(initiator) = init.take() else {
            self.stats.bad_handshakes += 1;
            return;
        };
        let (queue, since_ms) = (std::mem::take(queue), *since_ms);
        match initiator.handle_challenge(&mut self.rng, now_ms, body) {
            Ok((wait, auth)) => {
                self.out.insert(
                    from,
                    Outgoing::Auth {
                        wait: Box::new(wait),
                        queue,
                        since_ms,
                    },
                );
                self.push(from, AUTH, &auth);
            }
            Err(_) => {
                self.stats.bad_handshakes += 1;
                self.stats.dropped += queue.len() as u64;
                self.out.remove(&from);
            }
        }
    }

    fn on_finish(&mut self, now_ms: u64, from: Addr, body: &[u8]) {
        let Some(Outgoing::Auth { .. }) = self.out.get(&from) else {
            self.stats.bad_handshakes += 1;
            return;
        };
        let Some(Outgoing::Auth { wait, queue, .. }) = self.out.remove(&from) else {
            return;
        };
        let session = match wait.handle_finish(body) {
            Ok(s) => s,
            Err(_) => {
                self.stats.bad_handshakes += 1;
                self.stats.dropped += queue.len() as u64;
                return;
            }
        };
        if !self.trusted(session.peer(), now_ms) {
            self.stats.refused_untrusted += 1;
            self.stats.dropped += queue.len() as u64;
            return;
        }
        self.stats.handshakes_done += 1;
        let peered = Peered::new(session, self.cfg.vnodes_max);
        self.out.insert(from, Outgoing::Open(peered));
        for (to_id, laid) in queue {
            self.seal_to(from, to_id, laid);
        }
    }

    /// Forgets every connection to and from `peer` (its machine is gone, or
    /// the stream under the connection broke).
    pub fn reset(&mut self, peer: Addr) {
        self.out.remove(&peer);
        self.inc.remove(&peer);
    }

    /// The ring id (first position) of the key on our open session to
    /// `peer`: how a machine that knows only an address learns whom it
    /// talks to.
    pub fn peer_id(&self, peer: Addr) -> Option<Id> {
        match self.out.get(&peer) {
            Some(Outgoing::Open(p)) => p.ids.first().copied(),
            _ => None,
        }
    }

    /// Ids of the peers with an open outgoing session (for tests).
    pub fn open_peers(&self) -> BTreeSet<Addr> {
        self.out
            .iter()
            .filter(|(_, o)| matches!(o, Outgoing::Open(_)))
            .map(|(a, _)| *a)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endorse::{encode_chain, endorse};
    use crate::wire::ReqId;
    use std::sync::OnceLock;

    const BITS: usize = 1024;
    const NOW: u64 = 1_000_000;
    const ROOT: usize = 0;

    #[test]
    fn a_laid_out_payload_is_its_encoding_after_the_head_with_room_to_seal() {
        let block = crate::store::Block::new(Id([3; 20]), vec![9; 70_000]);
        let msg = Message::Put {
            req: 5,
            key: Id([4; 20]),
            item: crate::store::Item::Block(block),
        };
        let payload = PayloadRef::Msg {
            from: Id([1; 20]),
            to: Id([2; 20]),
            msg: &msg,
        };
        let laid = lay_out(&payload).expect("encodes");
        let plain = postcard::to_allocvec(&payload).expect("encodes");
        assert_eq!(laid.len(), LAID_HEAD + plain.len());
        assert_eq!(&laid[LAID_HEAD..], &plain[..]);
        assert!(laid.capacity() >= laid.len() + SEAL_TAIL);
    }

    fn key(i: usize) -> &'static Signer {
        static KEYS: [OnceLock<Signer>; 5] = [const { OnceLock::new() }; 5];
        KEYS[i].get_or_init(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(0x11_0000 + i as u64);
            Signer::generate(&mut rng, BITS).expect("test key")
        })
    }

    fn cfg() -> LinkConfig {
        LinkConfig {
            session: SessionConfig {
                min_identity_bits: BITS,
                ephemeral_bits: BITS,
                min_ephemeral_bits: BITS,
                ..SessionConfig::default()
            },
            ..LinkConfig::default()
        }
    }

    fn addr(i: usize) -> Addr {
        Addr::Slot(i as u32)
    }

    /// Machine `i`, endorsed by the root unless `endorsed` is false.
    fn machine(i: usize, endorsed: bool) -> Links {
        let mut rng = ChaCha20Rng::seed_from_u64(i as u64);
        let s = key(i);
        let credential = if endorsed {
            let e = endorse(
                &mut rng,
                key(ROOT),
                s.public_der(),
                s.user_id(),
                &format!("{:?}", addr(i)),
                NOW + 86_400_000,
            )
            .expect("endorse");
            encode_chain(&[e])
        } else {
            // Endorsed by itself: a chain to nobody we trust.
            let e = endorse(
                &mut rng,
                s,
                s.public_der(),
                s.user_id(),
                "x",
                NOW + 86_400_000,
            )
            .expect("endorse");
            encode_chain(&[e])
        };
        let mut trust = TrustStore::new(BITS);
        trust.add_root(key(ROOT).public_der()).expect("root");
        let responder =
            Responder::new(&mut rng, NOW, &cfg().session, s, credential.clone()).expect("resp");
        Links::new(cfg(), s.clone(), credential, trust, responder, i as u64)
    }

    /// Machine `i` with no endorsement yet, trusting the root.
    fn newcomer(i: usize) -> Links {
        let mut rng = ChaCha20Rng::seed_from_u64(i as u64);
        let s = key(i);
        let mut trust = TrustStore::new(BITS);
        trust.add_root(key(ROOT).public_der()).expect("root");
        let responder = Responder::new(&mut rng, NOW, &cfg().session, s, Vec::new()).expect("resp");
        Links::new(cfg(), s.clone(), Vec::new(), trust, responder, i as u64)
    }

    fn fingerprint(i: usize) -> [u8; 32] {
        sha256(key(i).public_der())
    }

    fn peer(i: usize) -> Peer {
        Peer {
            id: vnode_id(key(i).public_der(), 0),
            addr: addr(i),
        }
    }

    fn ping(n: u64) -> Message {
        Message::GetState { req: n as ReqId }
    }

    /// Moves packets between machines until none is left (bounded);
    /// returns what was delivered, per machine. `drop_frame` drops the
    /// n-th frame packet seen (1-based) to exercise loss.
    fn run(ms: &mut [Links], mut swap_frames: bool) -> Vec<Vec<Delivery>> {
        let mut got = vec![Vec::new(); ms.len()];
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..ms.len() {
                let mut packets = Vec::new();
                while let Some(p) = ms[i].poll_packet() {
                    packets.push(p);
                }
                if swap_frames {
                    let frames: Vec<usize> = (0..packets.len())
                        .filter(|&j| packets[j].bytes[0] == FRAME)
                        .collect();
                    if frames.len() >= 2 {
                        packets.swap(frames[0], frames[1]);
                        swap_frames = false;
                    }
                }
                for p in packets {
                    moved = true;
                    let Addr::Slot(t) = p.to else { unreachable!() };
                    let d = ms[t as usize].receive(NOW, addr(i), &p.bytes);
                    got[t as usize].extend(d);
                }
            }
            if !moved {
                return got;
            }
        }
        panic!("links did not settle");
    }

    #[test]
    fn endorsed_machines_talk_both_ways_with_vouched_senders() {
        let mut ms = vec![machine(0, true), machine(1, true), machine(2, true)];
        ms[1].send(NOW, peer(1).id, peer(2), &ping(1));
        ms[1].send(NOW, peer(1).id, peer(2), &ping(2));
        ms[2].send(NOW, peer(2).id, peer(1), &ping(3));
        let got = run(&mut ms, false);
        assert_eq!(
            got[2],
            vec![
                Delivery {
                    from: peer(1),
                    to: peer(2).id,
                    msg: ping(1)
                },
                Delivery {
                    from: peer(1),
                    to: peer(2).id,
                    msg: ping(2)
                },
            ]
        );
        assert_eq!(
            got[1],
            vec![Delivery {
                from: peer(2),
                to: peer(1).id,
                msg: ping(3)
            }]
        );
        assert_eq!(ms[1].stats().handshakes_done, 2, "one each way");
        // A virtual node id of the same key is vouched for too.
        let v3 = Peer {
            id: vnode_id(key(1).public_der(), 3),
            addr: addr(1),
        };
        ms[1].send(NOW, v3.id, peer(2), &ping(4));
        let got = run(&mut ms, false);
        assert_eq!(
            got[2],
            vec![Delivery {
                from: v3,
                to: peer(2).id,
                msg: ping(4)
            }]
        );
    }

    #[test]
    fn an_unendorsed_machine_gets_no_session_either_way() {
        let mut ms = vec![machine(0, true), machine(1, true), machine(2, false)];
        // The stranger calls a member: refused before Finish.
        ms[2].send(NOW, peer(2).id, peer(1), &ping(1));
        // A member calls the stranger: refused on Finish.
        ms[1].send(NOW, peer(1).id, peer(2), &ping(2));
        let got = run(&mut ms, false);
        assert!(
            got[1].is_empty(),
            "nothing from the stranger reached a node"
        );
        assert!(got[2].is_empty(), "nothing was sent to the stranger");
        assert_eq!(ms[1].stats().refused_untrusted, 2);
        assert_eq!(ms[1].stats().handshakes_done, 0);
    }

    #[test]
    fn a_machine_cannot_speak_for_an_id_its_key_does_not_own() {
        let mut ms = vec![machine(0, true), machine(1, true), machine(2, true)];
        // Machine 1 claims machine 0's id.
        ms[1].send(NOW, peer(0).id, peer(2), &ping(1));
        let got = run(&mut ms, false);
        assert!(got[2].is_empty());
        assert_eq!(ms[2].stats().bad_frames, 1);
        // And a message for an id machine 2's key does not own is not sent
        // to machine 2's address.
        let wrong = Peer {
            id: peer(0).id,
            addr: addr(2),
        };
        ms[1].send(NOW, peer(1).id, wrong, &ping(2));
        let got = run(&mut ms, false);
        assert!(got[2].is_empty());
        assert_eq!(ms[1].stats().dropped, 1);
    }

    #[test]
    fn reordered_frames_kill_the_session_and_a_reset_opens_a_new_one() {
        let mut ms = vec![machine(0, true), machine(1, true), machine(2, true)];
        ms[1].send(NOW, peer(1).id, peer(2), &ping(1));
        run(&mut ms, false);
        ms[1].send(NOW, peer(1).id, peer(2), &ping(2));
        ms[1].send(NOW, peer(1).id, peer(2), &ping(3));
        let got = run(&mut ms, true);
        assert!(got[2].is_empty(), "out of order: neither delivered");
        assert_eq!(ms[2].stats().bad_frames, 1);
        assert_eq!(ms[1].stats().resets, 1);
        assert!(ms[1].open_peers().is_empty(), "the dead session is gone");
        ms[1].send(NOW, peer(1).id, peer(2), &ping(4));
        let got = run(&mut ms, false);
        assert_eq!(got[2].len(), 1, "a new session carries on");
        assert_eq!(ms[1].stats().handshakes_started, 2);
    }

    #[test]
    fn a_late_challenge_to_an_abandoned_hello_does_not_spoil_the_new_handshake() {
        let mut ms = vec![machine(0, true), machine(1, true), machine(2, true)];
        ms[1].send(NOW, peer(1).id, peer(2), &ping(1));
        // Hello 1 reaches 2; its Challenge is held up.
        let hello1 = ms[1].poll_packet().expect("hello 1");
        ms[2].receive(NOW, addr(1), &hello1.bytes);
        let challenge1 = ms[2].poll_packet().expect("challenge 1");
        // 1 gives up on it: the next message starts a new handshake.
        let later = NOW + cfg().handshake_timeout_ms;
        ms[1].send(later, peer(1).id, peer(2), &ping(2));
        let hello2 = ms[1].poll_packet().expect("hello 2");
        // The old Challenge arrives first, then the new handshake runs.
        ms[1].receive(later, addr(2), &challenge1.bytes);
        assert!(
            ms[1].poll_packet().is_none(),
            "the late challenge is not answered"
        );
        ms[2].receive(later, addr(1), &hello2.bytes);
        let got = run(&mut ms, false);
        let reqs: Vec<Message> = got[2].iter().map(|d| d.msg.clone()).collect();
        assert_eq!(reqs, vec![ping(1), ping(2)], "no second timeout needed");
    }

    #[test]
    fn a_lost_handshake_starts_again_after_the_timeout_with_its_queue() {
        let mut ms = vec![machine(0, true), machine(1, true), machine(2, true)];
        ms[1].send(NOW, peer(1).id, peer(2), &ping(1));
        while ms[1].poll_packet().is_some() {} // the Hello is lost
        ms[1].send(NOW + 1, peer(1).id, peer(2), &ping(2));
        assert!(run(&mut ms, false)[2].is_empty(), "still waiting");
        let later = NOW + cfg().handshake_timeout_ms;
        ms[1].send(later, peer(1).id, peer(2), &ping(3));
        let got = run(&mut ms, false);
        let reqs: Vec<Message> = got[2].iter().map(|d| d.msg.clone()).collect();
        assert_eq!(reqs, vec![ping(1), ping(2), ping(3)]);
    }

    #[test]
    fn an_admitted_machine_registers_and_then_talks_to_anyone() {
        let mut ms = vec![
            machine(0, true),
            machine(1, true),
            machine(2, true),
            newcomer(3),
        ];
        // Before: nobody lets it in.
        ms[3].send(NOW, peer(3).id, peer(2), &ping(1));
        assert!(run(&mut ms, false)[2].is_empty());
        assert_eq!(ms[2].stats().refused_untrusted, 1);
        // The operator approves it on machine 1; it registers there.
        ms[1].admit(fingerprint(3));
        ms[1].send(NOW, peer(1).id, peer(2), &ping(2)); // so 1 knows 2
        ms[3].register(NOW, addr(1), "slot:3");
        run(&mut ms, false);
        assert!(ms[3].endorsed());
        match ms[3].poll_event() {
            Some(LinkEvent::Registered {
                by,
                chain_len,
                known,
            }) => {
                assert_eq!(by, addr(1));
                assert_eq!(chain_len, 2, "machine 1's endorsement, then the root's");
                assert_eq!(known, vec![addr(2)]);
            }
            other => panic!("no registration: {other:?}"),
        }
        assert_eq!(ms[1].stats().endorsements_given, 1);
        // Now machine 2, which never heard of it, accepts it on the chain.
        // (The refused handshake had held the first message; the new one,
        // started after the timeout, carries it too.)
        let later = NOW + cfg().handshake_timeout_ms;
        ms[3].send(later, peer(3).id, peer(2), &ping(3));
        let got = run(&mut ms, false);
        let d = |n| Delivery {
            from: peer(3),
            to: peer(2).id,
            msg: ping(n),
        };
        assert_eq!(got[2], vec![d(1), d(3)]);
        // And machine 2 endorses it in turn when asked.
        ms[3].register(later, addr(2), "slot:3");
        run(&mut ms, false);
        assert!(matches!(
            ms[3].poll_event(),
            Some(LinkEvent::Registered { chain_len: 2, .. })
        ));
        assert_eq!(ms[2].stats().endorsements_given, 1);
    }

    #[test]
    fn a_machine_nobody_admitted_cannot_register() {
        let mut ms = vec![machine(0, true), machine(1, true), newcomer(2)];
        ms[2].register(NOW, addr(1), "slot:2");
        run(&mut ms, false);
        assert!(!ms[2].endorsed());
        assert_eq!(ms[2].poll_event(), None);
        assert_eq!(ms[1].stats().refused_untrusted, 1);
        assert_eq!(ms[1].stats().endorsements_given, 0);
    }

    #[test]
    fn on_probation_a_machine_can_only_ask_to_register() {
        let mut ms = vec![machine(0, true), machine(1, true), newcomer(2)];
        ms[1].admit(fingerprint(2));
        // Admitted, so the handshake completes, but a Chord message is
        // not delivered before registration.
        ms[2].send(NOW, peer(2).id, peer(1), &ping(1));
        let got = run(&mut ms, false);
        assert!(got[1].is_empty());
        assert_eq!(ms[1].stats().bad_frames, 1);
    }

    /// A user's client (user key `i`) trusting the root.
    fn client(i: usize) -> Links {
        let mut trust = TrustStore::new(BITS);
        trust.add_root(key(ROOT).public_der()).expect("root");
        Links::client(cfg(), key(i).clone(), trust, 100 + i as u64)
    }

    fn get_request(user: usize, node: usize, n: u8) -> ClientRequest {
        let mut rng = ChaCha20Rng::seed_from_u64(u64::from(n));
        let op = crate::gate::ClientOp::Get(Id([n; 20]));
        ClientRequest::new(key(user), peer(node).id, op, NOW, &mut rng)
    }

    fn calls(m: &mut Links) -> Vec<Call> {
        std::iter::from_fn(|| m.poll_call()).collect()
    }

    #[test]
    fn a_client_calls_a_node_over_a_session_and_gets_the_answer_back() {
        let mut ms = vec![machine(0, true), machine(1, true), client(2)];
        let req = get_request(2, 1, 1);
        ms[2].call(NOW, addr(1), 7, &req);
        run(&mut ms, false);
        let got = calls(&mut ms[1]);
        assert_eq!(
            got,
            vec![Call {
                from: addr(2),
                id: 7,
                req
            }]
        );
        assert_eq!(ms[1].stats().client_sessions, 1);
        let reply = GateReply::Get(Ok(None));
        ms[1].answer(addr(2), 7, &reply);
        run(&mut ms, false);
        assert_eq!(ms[2].poll_answer(), Some((addr(1), 7, reply)));
        assert_eq!(ms[2].poll_answer(), None);
        // A client is not an endorsed machine.
        assert!(!ms[2].endorsed());
    }

    #[test]
    fn a_client_session_carries_no_chord_messages_and_no_registration() {
        let mut ms = vec![machine(0, true), machine(1, true), client(2)];
        ms[1].admit(fingerprint(2)); // even admitted, a client stays a client
        ms[2].send(NOW, peer(2).id, peer(1), &ping(1));
        ms[2].register(NOW, addr(1), "slot:2");
        let got = run(&mut ms, false);
        assert!(got[1].is_empty(), "no Chord message from a client");
        assert_eq!(ms[1].stats().bad_frames, 2);
        assert_eq!(ms[1].stats().endorsements_given, 0);
        assert!(calls(&mut ms[1]).is_empty());
    }

    #[test]
    fn a_request_signed_by_another_key_is_answered_wrong_key_not_passed_on() {
        let mut ms = vec![machine(0, true), machine(1, true), client(2)];
        // User 3's signed request, captured and sent over user 2's session.
        let stolen = get_request(3, 1, 2);
        ms[2].call(NOW, addr(1), 9, &stolen);
        run(&mut ms, false);
        assert!(calls(&mut ms[1]).is_empty());
        assert_eq!(ms[1].stats().calls_refused, 1);
        assert_eq!(
            ms[2].poll_answer(),
            Some((
                addr(1),
                9,
                GateReply::Get(Err(GateError::Auth(crate::reqauth::AuthError::WrongKey)))
            ))
        );
    }

    #[test]
    fn calls_beyond_the_session_bound_are_answered_busy() {
        let mut ms = vec![machine(0, true), machine(1, true), client(2)];
        let max = cfg().client_calls_max;
        for n in 0..max + 2 {
            ms[2].call(NOW, addr(1), n as u64, &get_request(2, 1, n as u8));
        }
        run(&mut ms, false);
        assert_eq!(calls(&mut ms[1]).len(), max);
        let busy: Vec<u64> = std::iter::from_fn(|| ms[2].poll_answer())
            .map(|(_, id, r)| {
                assert_eq!(r, GateReply::Get(Err(GateError::Busy)));
                id
            })
            .collect();
        assert_eq!(busy, vec![max as u64, max as u64 + 1]);
        // Answering one frees a place.
        ms[1].answer(addr(2), 0, &GateReply::Get(Ok(None)));
        ms[2].call(NOW, addr(1), 1000, &get_request(2, 1, 200));
        run(&mut ms, false);
        assert_eq!(calls(&mut ms[1]).len(), 1);
    }

    #[test]
    fn a_client_talks_only_to_nodes_its_trust_leads_to_and_nodes_may_refuse_clients() {
        let mut ms = vec![machine(0, true), machine(1, false), client(2)];
        ms[2].call(NOW, addr(1), 1, &get_request(2, 1, 1));
        run(&mut ms, false);
        assert!(calls(&mut ms[1]).is_empty(), "sent nothing to a stranger");
        assert_eq!(ms[2].stats().refused_untrusted, 1);

        let mut ms = vec![machine(0, true), machine(1, true), client(2)];
        let mut c = cfg();
        c.serve_clients = false;
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let cred = ms[1].credential().to_vec();
        let responder = Responder::new(&mut rng, NOW, &c.session, key(1), cred.clone()).unwrap();
        let mut trust = TrustStore::new(BITS);
        trust.add_root(key(ROOT).public_der()).expect("root");
        ms[1] = Links::new(c, key(1).clone(), cred, trust, responder, 1);
        ms[2].call(NOW, addr(1), 1, &get_request(2, 1, 1));
        run(&mut ms, false);
        assert!(calls(&mut ms[1]).is_empty());
        assert_eq!(ms[1].stats().refused_untrusted, 1);
        assert_eq!(ms[1].stats().client_sessions, 0);
    }

    #[test]
    fn garbage_packets_change_nothing() {
        let mut ms = vec![machine(0, true), machine(1, true), machine(2, true)];
        ms[1].send(NOW, peer(1).id, peer(2), &ping(1));
        run(&mut ms, false);
        for junk in [
            &[][..],
            &[9, 9][..],
            &[FRAME, 1, 2, 3][..],
            &[AUTH][..],
            &[FINISH, 0][..],
        ] {
            assert!(ms[2].receive(NOW, addr(0), junk).is_empty());
        }
        // The session from machine 1 is untouched.
        ms[1].send(NOW, peer(1).id, peer(2), &ping(2));
        assert_eq!(run(&mut ms, false)[2].len(), 1);
    }
}
