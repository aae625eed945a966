//! The client gate: a node acts on a user's request only when the user is
//! registered, the request carries that user's fresh, unreplayed signature,
//! names this node, and the user may do what it asks.
//!
//! Sans-IO, beside a [`crate::Node`]: the caller hands the gate a client's
//! request ([`Gate::request`]); the gate asks for DHT work through
//! [`GateOutput::Command`] (the caller runs it on the node and returns the
//! result with [`Gate::command_done`]) and answers the client through
//! [`GateOutput::Reply`]. The order of work for one request:
//!
//! 1. decode it (malformed: refused, nothing fetched);
//! 2. fetch the caller's public key record from the DHT (none: `UnknownUser`,
//!    so a request with an unknown or missing caller acts on nothing) — a
//!    registration is the one request checked against the key it registers;
//! 3. check the signature, freshness and nonce ([`ReplayGuard`]) and that
//!    the request names this node (a request captured on its way to one
//!    node cannot be replayed to another);
//! 4. check the operation against the caller: a block is stored only under
//!    its owner's id, a delete only by the owner, a key record only by its
//!    own key, a transaction log only by its owner; a manifest only as
//!    signed by the owner or a writer its ACL names (replicas check that
//!    too);
//! 5. run it; a read of a manifest is answered only to a user the
//!    manifest lists (owner, writer or reader), a read of a transaction log
//!    only to its owner. Blocks are ciphertext and readable by any
//!    registered user.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::id::Id;
use crate::node::{CmdResult, Command};
use crate::record::{self, Record, UserId};
use crate::reqauth::{AuthError, GuardConfig, ReplayGuard, SignedRequest};
use crate::store::{Item, StoreError};

/// What a client asks a node to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientOp {
    /// Store an item (block, record or tombstone) on its replicas.
    Put(Item),
    /// Read the item at a ring position.
    Get(Id),
    /// The ring as the node sees it. Answered by the machine, not the
    /// gate (see [`crate::machine`]): any client with a session may ask.
    Status,
    /// The keys the node holds, in ascending order, strictly after
    /// `after` (from the lowest if `None`), at most [`KEYS_PAGE`] of them;
    /// an empty page is the end. Answered by the machine, like `Status`,
    /// from the node's own index, so a test can count a key's copies
    /// whatever way a node lays its store out on disk. It reveals ring
    /// positions only (hashes); reading any item is still a `Get` the gate
    /// checks.
    Keys { after: Option<Id> },
}

/// Keys in one answer to [`ClientOp::Keys`] at most: 2048 ids are about
/// 40 KiB encoded, far below the 2 MiB + 64 KiB frame a connection takes
/// (`TransportConfig::max_frame_bytes` in peerstore-net), so a page never
/// comes near the limit and one request costs the node little work.
pub const KEYS_PAGE: usize = 2048;

/// The ring as one node sees it (the answer to [`ClientOp::Status`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingStatus {
    pub me: crate::wire::Peer,
    pub joined: bool,
    pub successors: Vec<crate::wire::Peer>,
    pub predecessor: Option<crate::wire::Peer>,
    /// Distinct peers in the finger table.
    pub fingers: Vec<crate::wire::Peer>,
    pub items: u64,
    pub bytes: u64,
    /// Copies the ring keeps of each key (the node's configured R): a
    /// client may send a key's get or put to any of the key's successor
    /// and the R - 1 nodes after it.
    pub replicas: u8,
}

/// The bytes a client signs: the node it addresses and the operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientBody {
    /// The id of the node the request is for.
    pub node: Id,
    pub op: ClientOp,
}

/// [`ClientBody`] borrowing its operation: encodes to the same bytes, so a
/// client signs what it keeps without copying it.
#[derive(Serialize)]
struct ClientBodyRef<'a> {
    node: Id,
    op: &'a ClientOp,
}

const TAG_PUT_BLOCK: &[u8] = b"peerstore/request/put-block/v1";

/// What the client's signature covers: for a block put, SHA-256 over a tag,
/// the node, the block's owner and the block's id (itself SHA-256 of the
/// bytes, which the client and the node both need anyway), so a 1 MiB block
/// is not hashed once more on each side just to be signed; for anything
/// else, SHA-256 of the encoded body. Either way it is a collision-resistant
/// digest of everything the body says.
fn body_digest(node: Id, op: &ClientOp, encoded: &[u8]) -> [u8; 32] {
    match op {
        ClientOp::Put(Item::Block(b)) => {
            let mut h = crate::hash::Sha256::new();
            h.update(TAG_PUT_BLOCK);
            h.update(node.as_bytes());
            h.update(b.owner.as_bytes());
            h.update(b.id());
            h.finalize()
        }
        _ => crate::hash::sha256(encoded),
    }
}

impl ClientBody {
    /// The digest the signature covers (see [`ClientRequest::batch_to`]);
    /// `encoded` is the body as received.
    pub fn digest(&self, encoded: &[u8]) -> [u8; 32] {
        body_digest(self.node, &self.op, encoded)
    }
}

/// The encoded body and the digest its signature covers.
fn encode_body(node: Id, op: &ClientOp) -> (Vec<u8>, [u8; 32]) {
    let encoded = crate::wire::encode_after(0, &ClientBodyRef { node, op }, 0)
        .expect("postcard encoding into a Vec cannot fail");
    let digest = body_digest(node, op, &encoded);
    (encoded, digest)
}

/// A client's request: the signed envelope and the body it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRequest {
    pub auth: SignedRequest,
    /// postcard of [`ClientBody`].
    #[serde(with = "crate::session::wire_bytes")]
    pub body: Vec<u8>,
}

impl ClientRequest {
    /// Signs `op` for `node` as `signer`.
    pub fn new(
        signer: &crate::Signer,
        node: Id,
        op: ClientOp,
        now_ms: u64,
        rng: &mut (impl rand_core::CryptoRngCore + ?Sized),
    ) -> ClientRequest {
        let (body, digest) = encode_body(node, &op);
        let auth = crate::reqauth::sign_request_digest(signer, digest, now_ms, rng);
        ClientRequest { auth, body }
    }

    /// Signs several operations, each for its own node, with one
    /// signature (each node checks its own request's place in the signed
    /// list); at most [`crate::reqauth::BATCH_MAX`]. The operations are
    /// borrowed: the caller may keep them (to send one again elsewhere).
    pub fn batch_to(
        signer: &crate::Signer,
        ops: &[(Id, &ClientOp)],
        now_ms: u64,
        rng: &mut (impl rand_core::CryptoRngCore + ?Sized),
    ) -> Vec<ClientRequest> {
        let (bodies, digests): (Vec<Vec<u8>>, Vec<[u8; 32]>) =
            ops.iter().map(|(node, op)| encode_body(*node, op)).unzip();
        let auths = crate::reqauth::sign_batch_digests(signer, digests, now_ms, rng);
        auths
            .into_iter()
            .zip(bodies)
            .map(|(auth, body)| ClientRequest { auth, body })
            .collect()
    }

    /// The node the request names, if its body decodes (unverified: the
    /// gate checks the signature).
    pub fn node(&self) -> Option<Id> {
        postcard::from_bytes::<ClientBody>(&self.body)
            .ok()
            .map(|b| b.node)
    }
}

/// Why a request was refused. Nothing was stored or read for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum GateError {
    #[error("request refused: {0}")]
    Auth(#[from] AuthError),
    #[error("request is for another node; sign it for the node you send it to")]
    WrongNode,
    #[error("you may not store this: {0}")]
    NotYours(String),
    #[error("you are not listed on this file's manifest; ask its owner to share it")]
    NotReader,
    #[error("this transaction log belongs to another user")]
    NotOwner,
    #[error("the store failed: {0}")]
    Store(StoreError),
    #[error("the gate is busy; retry shortly")]
    Busy,
}

/// The answer to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GateReply {
    Put(Result<(), GateError>),
    Get(Result<Option<Item>, GateError>),
    Status(Box<RingStatus>),
    /// A page of the node's keys (see [`ClientOp::Keys`]).
    Keys(Vec<Id>),
}

impl GateReply {
    /// `e` as the answer to `req`, shaped like the answer it asked for.
    pub fn refusal(req: &ClientRequest, e: GateError) -> GateReply {
        match postcard::from_bytes::<ClientBody>(&req.body) {
            Ok(ClientBody {
                op: ClientOp::Get(_),
                ..
            }) => GateReply::Get(Err(e)),
            _ => GateReply::Put(Err(e)),
        }
    }
}

/// A client connection or request handle chosen by the caller.
pub type ClientId = u64;
/// The gate's handle for a command it asked the caller to run.
pub type GateCmd = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateOutput {
    /// Run this on the node; give the result to [`Gate::command_done`].
    Command(GateCmd, Command),
    /// Send this to the client.
    Reply(ClientId, GateReply),
}

enum Pending {
    /// Fetching the caller's key record.
    Key {
        client: ClientId,
        req: Box<ClientRequest>,
        body: Box<ClientBody>,
    },
    /// Running the operation for `user`.
    Op {
        client: ClientId,
        user: UserId,
        is_get: bool,
    },
}

/// Requests in progress at most (then `Busy`).
pub const GATE_PENDING_MAX: usize = 4096;

/// A node's client gate.
pub struct Gate {
    me: Id,
    guard: ReplayGuard,
    pending: BTreeMap<GateCmd, Pending>,
    next: GateCmd,
    out: VecDeque<GateOutput>,
}

impl Gate {
    /// The gate of the node `me`.
    pub fn new(me: Id, config: GuardConfig) -> Gate {
        Gate {
            me,
            guard: ReplayGuard::new(config),
            pending: BTreeMap::new(),
            next: 0,
            out: VecDeque::new(),
        }
    }

    pub fn poll(&mut self) -> Option<GateOutput> {
        self.out.pop_front()
    }

    fn command(&mut self, c: Command, p: Pending) {
        self.next += 1;
        self.pending.insert(self.next, p);
        self.out.push_back(GateOutput::Command(self.next, c));
    }

    fn reply(&mut self, client: ClientId, is_get: bool, r: Result<Option<Item>, GateError>) {
        let reply = if is_get {
            GateReply::Get(r)
        } else {
            GateReply::Put(r.map(|_| ()))
        };
        self.out.push_back(GateOutput::Reply(client, reply));
    }

    /// A client's request arrived.
    pub fn request(&mut self, now_ms: u64, client: ClientId, req: ClientRequest) {
        let body: ClientBody = match postcard::from_bytes(&req.body) {
            Ok(b) => b,
            Err(_) => return self.reply(client, false, Err(AuthError::Malformed.into())),
        };
        let is_get = matches!(body.op, ClientOp::Get(_));
        if self.pending.len() >= GATE_PENDING_MAX {
            return self.reply(client, is_get, Err(GateError::Busy));
        }
        // A registration is checked against the key it registers: there is
        // nothing in the DHT yet to check it against.
        if let ClientOp::Put(Item::Record(r)) = &body.op {
            if let Record::PubKey(pk) = r.as_ref() {
                if pk.signing_key == req.auth.user_key {
                    let key = pk.signing_key.clone();
                    return self.admit(now_ms, client, req, body, Some(key));
                }
            }
        }
        let at = record::pubkey_position(&req.auth.user_key);
        self.command(
            Command::Get(at),
            Pending::Key {
                client,
                req: Box::new(req),
                body: Box::new(body),
            },
        );
    }

    /// The node finished a command the gate asked for.
    pub fn command_done(&mut self, now_ms: u64, cmd: GateCmd, result: CmdResult) {
        match self.pending.remove(&cmd) {
            Some(Pending::Key { client, req, body }) => {
                let registered = match result {
                    CmdResult::Get(Ok(Some(Item::Record(r)))) => match *r {
                        Record::PubKey(pk) => Some(pk.signing_key),
                        _ => None,
                    },
                    CmdResult::Get(Err(e)) => {
                        let is_get = matches!(body.op, ClientOp::Get(_));
                        return self.reply(client, is_get, Err(GateError::Store(e)));
                    }
                    _ => None,
                };
                self.admit(now_ms, client, *req, *body, registered);
            }
            Some(Pending::Op {
                client,
                user,
                is_get,
            }) => {
                let r = match result {
                    CmdResult::Put(Ok(_)) => Ok(None),
                    CmdResult::Put(Err(e)) | CmdResult::Get(Err(e)) => Err(GateError::Store(e)),
                    CmdResult::Get(Ok(item)) => may_read(user, item),
                    _ => Err(GateError::Busy),
                };
                self.reply(client, is_get, r);
            }
            None => {}
        }
    }

    fn admit(
        &mut self,
        now_ms: u64,
        client: ClientId,
        req: ClientRequest,
        body: ClientBody,
        registered: Option<Vec<u8>>,
    ) {
        let is_get = matches!(body.op, ClientOp::Get(_));
        let digest = body.digest(&req.body);
        if let Err(e) = self
            .guard
            .check_digest(&req.auth, &digest, registered.as_deref(), now_ms)
        {
            return self.reply(client, is_get, Err(e.into()));
        }
        if body.node != self.me {
            return self.reply(client, is_get, Err(GateError::WrongNode));
        }
        let user = req.auth.user();
        let command = match body.op {
            ClientOp::Status | ClientOp::Keys { .. } => {
                // The machine answers these; one that reaches the gate is
                // not something it does.
                return self.reply(client, false, Err(AuthError::Malformed.into()));
            }
            ClientOp::Get(key) => Command::Get(key),
            ClientOp::Put(item) => {
                if let Err(e) = may_store(user, &item) {
                    return self.reply(client, false, Err(e));
                }
                Command::Put(item)
            }
        };
        self.command(
            command,
            Pending::Op {
                client,
                user,
                is_get,
            },
        );
    }
}

/// Whether `user` may store `item` (signatures are the replicas' check).
fn may_store(user: UserId, item: &Item) -> Result<(), GateError> {
    match item {
        Item::Block(b) if b.owner != user => Err(GateError::NotYours(
            "a block is stored under its owner's id".into(),
        )),
        Item::Tombstone(t) if record::user_id(&t.owner_key) != user => Err(GateError::NotYours(
            "only a block's owner deletes it".into(),
        )),
        Item::Record(r) => match r.as_ref() {
            Record::PubKey(pk) if record::user_id(&pk.signing_key) != user => Err(
                GateError::NotYours("a key record is registered by its own key".into()),
            ),
            Record::TxLog(l) if record::user_id(&l.owner_key) != user => Err(GateError::NotYours(
                "a transaction log is its owner's".into(),
            )),
            Record::Manifest(m) if record::user_id(&m.signer_key) != user => {
                Err(GateError::NotYours(
                    "a manifest version is stored by the user who signed it".into(),
                ))
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// What `user` may see of a read.
fn may_read(user: UserId, item: Option<Item>) -> Result<Option<Item>, GateError> {
    if let Some(Item::Record(r)) = &item {
        match r.as_ref() {
            Record::Manifest(m) => {
                let listed = m.owner_id() == user
                    || m.acl.allows_writer(&user)
                    || m.acl.reader(&user).is_some();
                if !listed {
                    return Err(GateError::NotReader);
                }
            }
            Record::TxLog(l) if record::user_id(&l.owner_key) != user => {
                return Err(GateError::NotOwner);
            }
            _ => {}
        }
    }
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::PutOk;
    use crate::record::{manifest_position, new_acl, new_manifest, new_pubkey_record, AclEntry};
    use crate::store::Block;
    use crate::Signer;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::sync::OnceLock;

    const NOW: u64 = 1_700_000_000_000;
    const ME: Id = Id([7; 20]);

    fn user(i: usize) -> &'static Signer {
        static U: [OnceLock<Signer>; 3] = [const { OnceLock::new() }; 3];
        U[i].get_or_init(|| {
            Signer::generate(&mut ChaCha20Rng::seed_from_u64(0x6a7e + i as u64), 1024).expect("key")
        })
    }

    /// A fresh stream per call: every request gets its own nonce.
    fn rng() -> ChaCha20Rng {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(5);
        ChaCha20Rng::seed_from_u64(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    /// A gate over a map standing in for the DHT; what it stored is
    /// visible to the test.
    struct Fixture {
        gate: Gate,
        dht: BTreeMap<Id, Item>,
        replies: Vec<(ClientId, GateReply)>,
        puts: usize,
    }

    impl Fixture {
        fn new() -> Fixture {
            let cfg = GuardConfig {
                min_key_bits: 1024,
                ..GuardConfig::default()
            };
            Fixture {
                gate: Gate::new(ME, cfg),
                dht: BTreeMap::new(),
                replies: Vec::new(),
                puts: 0,
            }
        }

        fn ask(&mut self, client: ClientId, req: ClientRequest) -> GateReply {
            self.gate.request(NOW, client, req);
            for _ in 0..10 {
                while let Some(o) = self.gate.poll() {
                    match o {
                        GateOutput::Command(c, Command::Get(k)) => {
                            let r = CmdResult::Get(Ok(self.dht.get(&k).cloned()));
                            self.gate.command_done(NOW, c, r);
                        }
                        GateOutput::Command(c, Command::Put(item)) => {
                            self.puts += 1;
                            let key = item.position();
                            self.dht.insert(key, item);
                            let ok = PutOk {
                                key,
                                acks: 2,
                                latency_ms: 1,
                            };
                            self.gate.command_done(NOW, c, CmdResult::Put(Ok(ok)));
                        }
                        GateOutput::Command(_, other) => panic!("unexpected {other:?}"),
                        GateOutput::Reply(c, r) => self.replies.push((c, r)),
                    }
                }
            }
            let (c, r) = self.replies.pop().expect("a reply");
            assert_eq!(c, client);
            r
        }

        fn register(&mut self, i: usize) {
            let rec = new_pubkey_record(&mut rng(), user(i), Vec::new());
            let op = ClientOp::Put(Item::Record(Box::new(rec)));
            let r = self.ask(1, ClientRequest::new(user(i), ME, op, NOW, &mut rng()));
            assert_eq!(r, GateReply::Put(Ok(())));
        }
    }

    fn block(owner: usize) -> Item {
        Item::Block(Block::new(user(owner).user_id(), vec![owner as u8; 64]))
    }

    fn put(i: usize, item: Item) -> ClientRequest {
        ClientRequest::new(user(i), ME, ClientOp::Put(item), NOW, &mut rng())
    }

    fn get(i: usize, key: Id) -> ClientRequest {
        ClientRequest::new(user(i), ME, ClientOp::Get(key), NOW, &mut rng())
    }

    #[test]
    fn an_unknown_caller_acts_on_nothing() {
        let mut f = Fixture::new();
        let r = f.ask(1, put(0, block(0)));
        assert_eq!(
            r,
            GateReply::Put(Err(GateError::Auth(AuthError::UnknownUser)))
        );
        assert_eq!(f.puts, 0);
        // A missing caller: a request with no valid envelope.
        let mut bad = put(0, block(0));
        bad.body = vec![0xff; 3];
        assert!(matches!(
            f.ask(2, bad),
            GateReply::Put(Err(GateError::Auth(_)))
        ));
        assert_eq!(f.puts, 0);
    }

    #[test]
    fn status_and_key_listings_are_the_machines_to_answer_not_the_gates() {
        let mut f = Fixture::new();
        f.register(0);
        let puts = f.puts;
        let ops = [ClientOp::Status, ClientOp::Keys { after: None }];
        for (i, op) in ops.into_iter().enumerate() {
            let r = f.ask(
                i as u64 + 1,
                ClientRequest::new(user(0), ME, op, NOW, &mut rng()),
            );
            assert_eq!(
                r,
                GateReply::Put(Err(GateError::Auth(AuthError::Malformed)))
            );
        }
        assert_eq!(f.puts, puts);
    }

    #[test]
    fn a_registered_user_stores_and_reads_its_blocks() {
        let mut f = Fixture::new();
        f.register(0);
        assert_eq!(f.ask(1, put(0, block(0))), GateReply::Put(Ok(())));
        let key = block(0).position();
        assert_eq!(f.ask(2, get(0, key)), GateReply::Get(Ok(Some(block(0)))));
    }

    #[test]
    fn one_signature_covers_requests_to_several_nodes_each_served_only_by_its_own() {
        let mut f = Fixture::new();
        f.register(0);
        let other = Id([8; 20]);
        let (put, elsewhere, get) = (
            ClientOp::Put(block(0)),
            ClientOp::Get(Id([3; 20])),
            ClientOp::Get(block(0).position()),
        );
        let ops = [(ME, &put), (other, &elsewhere), (ME, &get)];
        let reqs = ClientRequest::batch_to(user(0), &ops, NOW, &mut rng());
        assert_eq!(reqs.len(), 3);
        assert!(reqs.iter().all(|r| r.auth.sig == reqs[0].auth.sig));
        assert_eq!(f.ask(1, reqs[0].clone()), GateReply::Put(Ok(())));
        assert_eq!(
            f.ask(2, reqs[1].clone()),
            GateReply::Get(Err(GateError::WrongNode)),
            "the request for another node is refused here"
        );
        assert_eq!(
            f.ask(3, reqs[2].clone()),
            GateReply::Get(Ok(Some(block(0))))
        );
        // The one for this node cannot be moved to another's place.
        let mut moved = reqs[1].clone();
        moved.body = reqs[2].body.clone();
        assert!(matches!(
            f.ask(4, moved),
            GateReply::Get(Err(GateError::Auth(_)))
        ));
    }

    #[test]
    fn replayed_stale_misdirected_and_foreign_requests_are_refused() {
        let mut f = Fixture::new();
        f.register(0);
        f.register(1);
        let req = put(0, block(0));
        assert_eq!(f.ask(1, req.clone()), GateReply::Put(Ok(())));
        let puts = f.puts;
        assert_eq!(
            f.ask(2, req),
            GateReply::Put(Err(GateError::Auth(AuthError::Replayed)))
        );
        let stale = ClientRequest::new(
            user(0),
            ME,
            ClientOp::Get(Id([1; 20])),
            NOW - 600_000,
            &mut rng(),
        );
        assert_eq!(
            f.ask(3, stale),
            GateReply::Get(Err(GateError::Auth(AuthError::Stale)))
        );
        let other_node = ClientRequest::new(
            user(0),
            Id([8; 20]),
            ClientOp::Get(Id([1; 20])),
            NOW,
            &mut rng(),
        );
        assert_eq!(
            f.ask(4, other_node),
            GateReply::Get(Err(GateError::WrongNode))
        );
        // User 1 stores a block claiming user 0 as owner.
        assert!(matches!(
            f.ask(5, put(1, block(0))),
            GateReply::Put(Err(GateError::NotYours(_)))
        ));
        // User 1 signs a request with its key but claims user 0's record.
        let mut forged = put(1, block(1));
        forged.auth.user_key = user(0).public_der().to_vec();
        assert!(matches!(
            f.ask(6, forged),
            GateReply::Put(Err(GateError::Auth(_)))
        ));
        assert_eq!(f.puts, puts, "nothing stored by any refused request");
    }

    #[test]
    fn registering_a_second_key_for_someone_else_is_refused() {
        let mut f = Fixture::new();
        f.register(0);
        f.register(1);
        let puts = f.puts;
        // User 1 tries to store user 0's key record under its own request.
        let rec = new_pubkey_record(&mut rng(), user(0), Vec::new());
        let r = f.ask(1, put(1, Item::Record(Box::new(rec))));
        assert!(
            matches!(r, GateReply::Put(Err(GateError::NotYours(_)))),
            "{r:?}"
        );
        assert_eq!(f.puts, puts);
    }

    #[test]
    fn a_manifest_is_read_only_by_users_it_lists() {
        let mut f = Fixture::new();
        for i in 0..3 {
            f.register(i);
        }
        let owner = user(0);
        let file_id = [3u8; 32];
        let pos = manifest_position(owner.user_id(), &file_id);
        let readers = vec![AclEntry {
            user: user(1).user_id(),
            wrapped_key: vec![1, 2, 3],
        }];
        let acl = new_acl(&mut rng(), owner, pos, 1, Vec::new(), readers);
        let m = new_manifest(
            &mut rng(),
            owner.public_der().to_vec(),
            file_id,
            acl,
            1,
            owner,
            vec![9],
        );
        assert_eq!(
            f.ask(1, put(0, Item::Record(Box::new(m.clone())))),
            GateReply::Put(Ok(()))
        );
        let want = GateReply::Get(Ok(Some(Item::Record(Box::new(m)))));
        assert_eq!(f.ask(2, get(0, pos)), want, "the owner reads");
        assert_eq!(f.ask(3, get(1, pos)), want, "a listed reader reads");
        assert_eq!(
            f.ask(4, get(2, pos)),
            GateReply::Get(Err(GateError::NotReader)),
            "a user the manifest does not list is refused by the node"
        );
    }
}
