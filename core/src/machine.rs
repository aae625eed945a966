//! One real machine of the ring as a value: its Chord node, its secure
//! links and its client gate, wired together the way the daemon runs them.
//!
//! The daemon (`peerstore-node`, through `peerstore-net`) owns sockets,
//! clocks and the disk; everything else happens here, sans-IO, so a test
//! can wire a few machines together in memory and watch a ring form, a
//! node register, a client store and read. Inputs: packets
//! ([`Machine::receive`]), time ([`Machine::tick`]), finished disk work
//! ([`Machine::storage_done`]). Outputs ([`Machine::poll`]): packets to
//! put on the wire, disk work to carry out, and events worth logging.
//!
//! A machine holds one ring position (its id is [`vnode_id`](crate::vnode::vnode_id) of its key,
//! index 0). Everything a peer sends arrives through [`Links`], so only
//! endorsed machines reach the node and only clients' signed requests
//! reach the gate. A client's [`ClientOp::Status`] and
//! [`ClientOp::Keys`] are answered here, from the node's own view, without
//! the DHT.
//!
//! Joining: a machine that is not yet endorsed first registers with its
//! entry (which its operator admitted it on), and joins once the entry
//! answers; one that already presents a chain registers anyway (an
//! endorsed machine is endorsed again directly), which is how it learns
//! the entry's ring id before it joins through it.

use std::collections::{BTreeMap, VecDeque};

use crate::config::Config;
use crate::gate::{ClientBody, ClientOp, Gate, GateCmd, GateOutput, GateReply, RingStatus};
use crate::id::Id;
use crate::link::{Call, Delivery, LinkConfig, LinkEvent, Links, Packet};
use crate::node::{
    CmdId, CmdResult, Command, Event, Input, IoId, Node, Output, StateAnswer, Status,
};
use crate::node::{StorageOp, StorageResult};
use crate::reqauth::GuardConfig;
use crate::store::{Block, Index, Item};
use crate::wire::{Addr, Peer};

/// Settings of a machine.
#[derive(Clone, Debug, Default)]
pub struct MachineConfig {
    pub node: Config,
    pub link: LinkConfig,
    pub guard: GuardConfig,
}

/// Something the daemon should do or know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineOutput {
    /// Put these bytes on the wire to `to`.
    Packet(Packet),
    /// Carry out this disk operation; answer with [`Machine::storage_done`].
    /// Operations must complete in the order they were given.
    Storage { io: IoId, op: StorageOp },
    /// Worth a log line.
    Event(MachineEvent),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineEvent {
    /// The entry endorsed us; `chain` is the credential to keep on disk.
    Registered {
        by: Addr,
        chain_len: usize,
        chain: Vec<u8>,
    },
    /// The node is in the ring.
    Joined { successor: Peer },
    /// The join failed; the daemon may try again.
    JoinFailed(String),
    /// The node lost every successor and is alone.
    SuccessorsLost,
    /// The answer to [`Machine::ask_state`]: `None` if `peer` was silent,
    /// else whether it is in a ring and its predecessor.
    PeerState { peer: Peer, state: StateAnswer },
}

/// Why a join is under way.
#[derive(Clone, Debug)]
struct Joining {
    entry: Addr,
    /// Our own address as others should reach us.
    my_addr: String,
    /// The join command once it is sent.
    cmd: Option<CmdId>,
}

/// A machine: node, links, gate.
pub struct Machine {
    node: Node,
    links: Links,
    gate: Gate,
    /// Gate handle of a call -> the client's session and its call id.
    calls: BTreeMap<u64, (Addr, u64)>,
    next_call: u64,
    /// Node commands run for the gate.
    gate_cmds: BTreeMap<CmdId, GateCmd>,
    next_cmd: CmdId,
    joining: Option<Joining>,
    /// Questions from [`Machine::ask_state`] awaiting their answer.
    asks: BTreeMap<CmdId, Peer>,
    /// Our address as others reach us, once we joined through someone.
    my_addr: Option<String>,
    /// No endorsement renewal is asked for before this time.
    next_renew_ms: u64,
    renew_before_ms: u64,
    out: VecDeque<MachineOutput>,
    now_ms: u64,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("me", &self.node.me())
            .field("status", &self.node.status())
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// A machine at `addr` whose links are `links` (built from its identity,
    /// credential and trust). `seed` seeds the node's own jitter.
    pub fn new(cfg: MachineConfig, links: Links, id: Id, addr: Addr, seed: u64) -> Machine {
        let me = Peer { id, addr };
        let renew_before_ms = cfg.link.renew_before_ms;
        Machine {
            node: Node::new(cfg.node, me, seed),
            links,
            gate: Gate::new(id, cfg.guard),
            calls: BTreeMap::new(),
            next_call: 0,
            gate_cmds: BTreeMap::new(),
            next_cmd: 0,
            joining: None,
            asks: BTreeMap::new(),
            my_addr: None,
            next_renew_ms: 0,
            renew_before_ms,
            out: VecDeque::new(),
            now_ms: 0,
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn links(&self) -> &Links {
        &self.links
    }

    /// Lets the machine whose key has this SHA-256 register here.
    pub fn admit(&mut self, key_sha256: [u8; 32]) {
        self.links.admit(key_sha256);
    }

    /// Rebuilds the node's index from the disk (before serving); returns
    /// the keys of invalid items for the daemon to delete.
    pub fn restore(&mut self, items: impl IntoIterator<Item = (Id, Item)>) -> Vec<Id> {
        self.node.restore(items)
    }

    /// Starts a new ring with this machine as its only member, dropping
    /// a join under way.
    pub fn create(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.joining = None;
        self.command(Command::Create);
    }

    /// Asks `peer` (a ring position we remember) whether it is in a ring;
    /// the answer comes as [`MachineEvent::PeerState`].
    pub fn ask_state(&mut self, now_ms: u64, peer: Peer) {
        self.now_ms = now_ms;
        self.next_cmd += 1;
        let id = self.next_cmd;
        self.asks.insert(id, peer);
        self.node
            .handle(now_ms, Input::Command(id, Command::AskState { peer }));
        self.drain();
    }

    /// Joins the ring the machine at `entry` belongs to: registers there
    /// first, then joins through it. We are reachable at `my_addr`.
    pub fn join(&mut self, now_ms: u64, entry: Addr, my_addr: &str) {
        self.now_ms = now_ms;
        self.joining = Some(Joining {
            entry,
            my_addr: my_addr.to_string(),
            cmd: None,
        });
        self.my_addr = Some(my_addr.to_string());
        self.links.register(now_ms, entry, my_addr);
        self.flush();
    }

    /// Leaves gracefully: hands keys off and tells the neighbours.
    pub fn leave(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.command(Command::Leave);
    }

    /// The ring as this node sees it.
    pub fn status(&self) -> RingStatus {
        let mut fingers: Vec<Peer> = self.node.fingers().iter().flatten().copied().collect();
        fingers.sort();
        fingers.dedup();
        let index = self.node.store_index();
        RingStatus {
            me: self.node.me(),
            joined: self.node.status() == Status::Joined,
            successors: self.node.successors().to_vec(),
            predecessor: self.node.predecessor(),
            fingers,
            items: index.len() as u64,
            bytes: index.bytes(),
            replicas: self.node.config().replicas.clamp(1, u8::MAX.into()) as u8,
        }
    }

    /// A page of the keys this node holds (the answer to
    /// [`ClientOp::Keys`]): at most [`crate::gate::KEYS_PAGE`], ascending,
    /// strictly after `after`.
    pub fn keys(&self, after: Option<Id>) -> Vec<Id> {
        keys_page(self.node.store_index(), after, crate::gate::KEYS_PAGE)
    }

    /// When the machine next wants [`Machine::tick`].
    pub fn poll_timeout(&self) -> Option<u64> {
        self.node.poll_timeout()
    }

    /// Time passed.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.node.handle(now_ms, Input::Timeout);
        self.drain();
        self.renew_endorsement(now_ms);
    }

    /// Endorsements expire (30 days by default): a machine whose chain
    /// expires within `renew_before_ms` asks the machine that endorsed it
    /// (the next link of its chain names it and its address) to endorse it
    /// again, at most every sixteenth of that window, until a chain that
    /// lasts longer arrives. The chain keeps its length, so the new one is
    /// taken ([`crate::link`]). A ring's root never expires.
    fn renew_endorsement(&mut self, now_ms: u64) {
        let Some(until) = self.links.credential_expires_ms() else {
            return;
        };
        if until.saturating_sub(now_ms) >= self.renew_before_ms || now_ms < self.next_renew_ms {
            return;
        }
        let Some(my_addr) = self.my_addr.clone() else {
            return;
        };
        let chain = crate::endorse::decode_chain(self.links.credential()).unwrap_or_default();
        let Some(endorser) = chain.get(1).and_then(|e| Addr::parse(&e.subject_addr)) else {
            return;
        };
        self.next_renew_ms = now_ms + (self.renew_before_ms / 16).max(1);
        self.links.register(now_ms, endorser, &my_addr);
        self.flush();
    }

    /// A packet arrived from `from`.
    pub fn receive(&mut self, now_ms: u64, from: Addr, bytes: &[u8]) {
        self.receive_all(now_ms, &[(from, bytes)]);
    }

    /// Packets that arrived together, oldest first: what [`Machine::receive`]
    /// of each in turn does, except that packets are opened ahead of
    /// handling, so the ids of the blocks they carry for this node are
    /// hashed two at a time ([`Block::hash_ids`]). A node is slowest at
    /// hashing the blocks it is sent, one after the other otherwise.
    ///
    /// Looking ahead is safe for messages and calls: the node and the
    /// gate see them in the same order, and what they send goes out after
    /// (a later packet that resets a peer drops a reply that the reset
    /// would have made useless anyway). It is not for link events, which
    /// read the links' state as their packet left it (a registration
    /// answered, then a reset from the same peer, would find the session
    /// gone); so a packet that raises one is handled, with everything
    /// opened before it, before the next is opened.
    pub fn receive_all(&mut self, now_ms: u64, packets: &[(Addr, &[u8])]) {
        self.now_ms = now_ms;
        let mut opened = Vec::with_capacity(packets.len());
        for (from, bytes) in packets {
            let deliveries = self.links.receive(now_ms, *from, bytes);
            let events: Vec<_> = std::iter::from_fn(|| self.links.poll_event()).collect();
            let calls: Vec<_> = std::iter::from_fn(|| self.links.poll_call()).collect();
            let raised = !events.is_empty();
            opened.push((deliveries, events, calls));
            if raised {
                self.handle_opened(now_ms, std::mem::take(&mut opened));
            }
        }
        self.handle_opened(now_ms, opened);
    }

    /// Handles opened packets in order, as [`Machine::receive`] would have
    /// right after opening each.
    fn handle_opened(&mut self, now_ms: u64, opened: Vec<Opened>) {
        if opened.len() > 1 {
            let me = self.node.me().id;
            let blocks: Vec<&Block> = opened
                .iter()
                .flat_map(|(deliveries, _, _)| deliveries.iter())
                .filter(|d| d.to == me)
                .filter_map(|d| d.msg.block())
                .collect();
            Block::hash_ids(&blocks);
        }
        for (deliveries, events, calls) in opened {
            for d in deliveries {
                if d.to == self.node.me().id {
                    self.node.handle(
                        now_ms,
                        Input::Message {
                            from: d.from,
                            msg: d.msg,
                        },
                    );
                }
            }
            // Then, as `receive` always did, whatever handling those
            // raised, until none is left.
            for e in events {
                self.on_link_event(e);
            }
            while let Some(e) = self.links.poll_event() {
                self.on_link_event(e);
            }
            for call in calls {
                self.on_call(call);
            }
            while let Some(call) = self.links.poll_call() {
                self.on_call(call);
            }
            self.drain();
        }
    }

    /// The connection to or from `peer` broke: its sessions are gone.
    pub fn disconnected(&mut self, peer: Addr) {
        self.links.reset(peer);
    }

    /// A disk operation finished.
    pub fn storage_done(&mut self, now_ms: u64, io: IoId, result: StorageResult) {
        self.now_ms = now_ms;
        self.node.handle(now_ms, Input::StorageDone { io, result });
        self.drain();
    }

    /// The next thing for the daemon to do.
    pub fn poll(&mut self) -> Option<MachineOutput> {
        self.out.pop_front()
    }

    fn command(&mut self, c: Command) -> CmdId {
        self.next_cmd += 1;
        let id = self.next_cmd;
        self.node.handle(self.now_ms, Input::Command(id, c));
        self.drain();
        id
    }

    fn on_link_event(&mut self, e: LinkEvent) {
        let LinkEvent::Registered { by, chain_len, .. } = e;
        self.out
            .push_back(MachineOutput::Event(MachineEvent::Registered {
                by,
                chain_len,
                chain: self.links.credential().to_vec(),
            }));
        let Some(j) = self.joining.as_mut() else {
            return;
        };
        if j.entry != by || j.cmd.is_some() {
            return;
        }
        let Some(id) = self.links.peer_id(by) else {
            return;
        };
        self.next_cmd += 1;
        let cmd = self.next_cmd;
        j.cmd = Some(cmd);
        let via = Peer { id, addr: by };
        self.node
            .handle(self.now_ms, Input::Command(cmd, Command::Join { via }));
    }

    fn on_call(&mut self, call: Call) {
        // Questions about this node alone are answered from its own state;
        // everything else goes through the gate.
        // Only the body's head is decoded to tell: a block put's body is a
        // megabyte, which the gate decodes (once) if it is one.
        let own = match op_index(&call.req.body) {
            Some(OP_STATUS | OP_KEYS) => match postcard::from_bytes::<ClientBody>(&call.req.body) {
                Ok(ClientBody {
                    op: ClientOp::Status,
                    ..
                }) => Some(GateReply::Status(Box::new(self.status()))),
                Ok(ClientBody {
                    op: ClientOp::Keys { after },
                    ..
                }) => Some(GateReply::Keys(self.keys(after))),
                _ => None,
            },
            _ => None,
        };
        if let Some(reply) = own {
            self.links.answer(call.from, call.id, &reply);
            return;
        }
        self.next_call += 1;
        let handle = self.next_call;
        self.calls.insert(handle, (call.from, call.id));
        self.gate.request(self.now_ms, handle, call.req);
    }

    /// Runs node outputs and gate outputs to a standstill, then collects
    /// the packets.
    fn drain(&mut self) {
        for _ in 0..1_000_000 {
            if let Some(o) = self.node.poll_output() {
                self.on_node_output(o);
                continue;
            }
            if let Some(g) = self.gate.poll() {
                self.on_gate_output(g);
                continue;
            }
            break;
        }
        self.flush();
    }

    fn flush(&mut self) {
        while let Some(p) = self.links.poll_packet() {
            self.out.push_back(MachineOutput::Packet(p));
        }
    }

    fn on_node_output(&mut self, o: Output) {
        match o {
            Output::Send { to, msg } => {
                let from = self.node.me().id;
                self.links.send(self.now_ms, from, to, &msg);
            }
            Output::Storage { io, op } => self.out.push_back(MachineOutput::Storage { io, op }),
            // However the node got in (this join, or an earlier one the
            // daemon gave up on too soon), the join is over.
            Output::Event(Event::Joined) => {
                if self.joining.take().is_some() {
                    if let Some(&successor) = self.node.successors().first() {
                        self.out
                            .push_back(MachineOutput::Event(MachineEvent::Joined { successor }));
                    }
                }
            }
            Output::Event(Event::SuccessorsLost) => self
                .out
                .push_back(MachineOutput::Event(MachineEvent::SuccessorsLost)),
            Output::Reply { cmd, result } => {
                if let Some(gc) = self.gate_cmds.remove(&cmd) {
                    self.gate.command_done(self.now_ms, gc, result);
                    return;
                }
                if let Some(peer) = self.asks.remove(&cmd) {
                    let state = match result {
                        CmdResult::State(s) => s,
                        _ => None,
                    };
                    self.out
                        .push_back(MachineOutput::Event(MachineEvent::PeerState {
                            peer,
                            state,
                        }));
                    return;
                }
                let joined = self.joining.as_ref().is_some_and(|j| j.cmd == Some(cmd));
                if !joined {
                    return;
                }
                let event = match result {
                    CmdResult::Joined { successor } => {
                        self.joining = None;
                        MachineEvent::Joined { successor }
                    }
                    other => {
                        if let Some(j) = self.joining.as_mut() {
                            j.cmd = None;
                        }
                        MachineEvent::JoinFailed(format!("{other:?}"))
                    }
                };
                self.out.push_back(MachineOutput::Event(event));
            }
        }
    }

    fn on_gate_output(&mut self, g: GateOutput) {
        match g {
            GateOutput::Command(gc, c) => {
                self.next_cmd += 1;
                let id = self.next_cmd;
                self.gate_cmds.insert(id, gc);
                self.node.handle(self.now_ms, Input::Command(id, c));
            }
            GateOutput::Reply(handle, reply) => {
                if let Some((client, id)) = self.calls.remove(&handle) {
                    self.links.answer(client, id, &reply);
                }
            }
        }
    }

    /// Whether a join is waiting (for the daemon's retry policy).
    pub fn join_pending(&self) -> bool {
        self.joining.is_some() && !self.node.is_joined()
    }

    /// Asks the entry again (a lost registration or a failed join).
    pub fn retry_join(&mut self, now_ms: u64) {
        let Some(j) = self.joining.clone() else {
            return;
        };
        self.join(now_ms, j.entry, &j.my_addr);
    }
}

/// At most `max` keys of `index`, ascending, strictly after `after` (a
/// parameter so that tests can page with small pages).
fn keys_page(index: &Index, after: Option<Id>, max: usize) -> Vec<Id> {
    index.keys_after(after).take(max).copied().collect()
}

/// What opening one packet gave: the messages it carried, the link
/// events and the client calls it raised.
type Opened = (Vec<Delivery>, Vec<LinkEvent>, Vec<Call>);

/// The start of an encoded [`ClientBody`]: the node, then which
/// operation (postcard writes an enum's variant index as a varint `u32`),
/// leaving the operation's contents undecoded.
#[derive(serde::Deserialize)]
struct BodyHead {
    _node: Id,
    op: u32,
}

/// [`ClientOp::Status`]'s and [`ClientOp::Keys`]'s variant indexes (checked
/// against the encoder in the tests).
const OP_STATUS: u32 = 2;
const OP_KEYS: u32 = 3;

/// Which operation an encoded [`ClientBody`] holds, if it starts like one.
fn op_index(body: &[u8]) -> Option<u32> {
    postcard::take_from_bytes::<BodyHead>(body)
        .ok()
        .map(|(h, _)| h.op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endorse::{encode_chain, endorse, TrustStore};
    use crate::link::key_sha256;
    use crate::record::Signer;
    use crate::session::{Responder, SessionConfig};
    use crate::store::Block;
    use crate::vnode::vnode_id;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::sync::OnceLock;

    #[test]
    fn the_body_head_names_the_operation_as_the_full_decoding_does() {
        let block = Item::Block(Block::new(Id::from_u128(9), vec![7; 5000]));
        let cases = [
            (ClientOp::Put(block), None),
            (ClientOp::Get(Id::from_u128(3)), None),
            (ClientOp::Status, Some(OP_STATUS)),
            (ClientOp::Keys { after: None }, Some(OP_KEYS)),
            (
                ClientOp::Keys {
                    after: Some(Id::MAX),
                },
                Some(OP_KEYS),
            ),
        ];
        for (i, (op, own)) in cases.into_iter().enumerate() {
            let body = postcard::to_allocvec(&ClientBody {
                node: Id::from_u128(77),
                op,
            })
            .unwrap();
            let index = op_index(&body).expect("a body's head decodes");
            assert_eq!(index as usize, [0, 1, 2, 3, 3][i], "case {i}");
            assert_eq!(
                own.is_some(),
                matches!(index, OP_STATUS | OP_KEYS),
                "case {i}"
            );
        }
        assert_eq!(op_index(&[]), None);
        assert_eq!(op_index(&[1, 2, 3]), None);
    }

    const BITS: usize = 1024;
    const T0: u64 = 1_700_000_000_000;

    fn key(i: usize) -> &'static Signer {
        static KEYS: [OnceLock<Signer>; 6] = [const { OnceLock::new() }; 6];
        KEYS[i].get_or_init(|| {
            let mut rng = ChaCha20Rng::seed_from_u64(0x3a_0000 + i as u64);
            Signer::generate(&mut rng, BITS).expect("test key")
        })
    }

    fn cfg() -> MachineConfig {
        let mut c = MachineConfig::default();
        c.node.min_key_bits = BITS;
        c.node.successors_max = 4;
        c.guard.min_key_bits = BITS;
        c.link.session = SessionConfig {
            min_identity_bits: BITS,
            ephemeral_bits: BITS,
            min_ephemeral_bits: BITS,
            ..SessionConfig::default()
        };
        c
    }

    fn addr(i: usize) -> Addr {
        Addr::Slot(i as u32)
    }

    fn trust() -> TrustStore {
        let mut t = TrustStore::new(BITS);
        t.add_root(key(0).public_der()).expect("root");
        t
    }

    /// Machine `i`; machine 0 is the ring's root (endorsed by itself).
    fn machine(i: usize) -> Machine {
        machine_with(i, None)
    }

    /// Machine `i` presenting `credential` (a restart), else as [`machine`].
    fn machine_with(i: usize, credential: Option<Vec<u8>>) -> Machine {
        let mut rng = ChaCha20Rng::seed_from_u64(i as u64);
        let s = key(i);
        let credential = if let Some(c) = credential {
            c
        } else if i == 0 {
            let e = endorse(
                &mut rng,
                s,
                s.public_der(),
                s.user_id(),
                "slot:0",
                u64::MAX / 2,
            )
            .expect("endorse");
            encode_chain(&[e])
        } else {
            Vec::new()
        };
        let c = cfg();
        let responder = Responder::new(&mut rng, T0, &c.link.session, s, credential.clone())
            .expect("responder");
        let links = Links::new(
            c.link.clone(),
            s.clone(),
            credential,
            trust(),
            responder,
            7 + i as u64,
        );
        Machine::new(c, links, vnode_id(s.public_der(), 0), addr(i), i as u64)
    }

    /// Moves packets between machines (and a client at index `ms.len()`)
    /// and advances time to the next deadline, until `until` or `done`.
    struct Net {
        ms: Vec<Machine>,
        client: Links,
        now: u64,
        answers: Vec<(u64, GateReply)>,
        storage: Vec<BTreeMap<Id, Item>>,
        events: Vec<(usize, MachineEvent)>,
        /// Packets to a machine wait for the end of each round and go in
        /// together ([`Machine::receive_all`]), as a busy daemon takes them.
        batched: bool,
        /// Those waiting, per machine.
        queued: Vec<Vec<(Addr, Vec<u8>)>>,
        /// The most packets one `receive_all` took.
        largest_batch: usize,
        /// `(to, from)`: while machine `to` is not yet registered, every
        /// batch it takes that holds an answer on its own session from
        /// machine `from` (its registration's, the first there is) ends
        /// with a reset from `from` (counted in `resets`).
        reset_after: Option<(usize, usize)>,
        resets: usize,
    }

    impl Net {
        fn new(n: usize) -> Net {
            Net {
                ms: (0..n).map(machine).collect(),
                client: Links::client(cfg().link, key(5).clone(), trust(), 99),
                now: T0,
                answers: Vec::new(),
                storage: vec![BTreeMap::new(); n],
                events: Vec::new(),
                batched: false,
                queued: vec![Vec::new(); n],
                largest_batch: 0,
                reset_after: None,
                resets: 0,
            }
        }

        fn client_addr(&self) -> Addr {
            addr(self.ms.len())
        }

        /// Delivers everything in flight (bounded).
        fn settle(&mut self) {
            for _ in 0..10_000 {
                let mut moved = false;
                for i in 0..self.ms.len() {
                    while let Some(o) = self.ms[i].poll() {
                        moved = true;
                        match o {
                            MachineOutput::Packet(p) => self.deliver(addr(i), p),
                            MachineOutput::Storage { io, op } => {
                                let r = match op {
                                    StorageOp::Write { key, item } => {
                                        self.storage[i].insert(key, item);
                                        StorageResult::Done
                                    }
                                    StorageOp::Remove { key } => {
                                        self.storage[i].remove(&key);
                                        StorageResult::Done
                                    }
                                    StorageOp::Read { key } => {
                                        StorageResult::Read(self.storage[i].get(&key).cloned())
                                    }
                                };
                                self.ms[i].storage_done(self.now, io, r);
                            }
                            MachineOutput::Event(e) => self.events.push((i, e)),
                        }
                    }
                }
                while let Some(p) = self.client.poll_packet() {
                    moved = true;
                    let from = self.client_addr();
                    self.deliver(from, p);
                }
                while let Some((_, id, r)) = self.client.poll_answer() {
                    self.answers.push((id, r));
                }
                for t in 0..self.ms.len() {
                    let mut packets = std::mem::take(&mut self.queued[t]);
                    if let Some((to, from)) = self.reset_after {
                        if t == to
                            && !self.ms[t].links().endorsed()
                            && packets.iter().any(|(f, b)| {
                                *f == addr(from) && b.first() == Some(&FRAME_BACK_KIND)
                            })
                        {
                            packets.push((addr(from), vec![RESET_KIND]));
                            self.resets += 1;
                        }
                    }
                    if !packets.is_empty() {
                        moved = true;
                        self.largest_batch = self.largest_batch.max(packets.len());
                        let refs: Vec<(Addr, &[u8])> =
                            packets.iter().map(|(f, b)| (*f, &b[..])).collect();
                        self.ms[t].receive_all(self.now, &refs);
                    }
                }
                if !moved {
                    return;
                }
            }
            panic!("machines did not settle");
        }

        fn deliver(&mut self, from: Addr, p: Packet) {
            let Addr::Slot(t) = p.to else { unreachable!() };
            let t = t as usize;
            if t == self.ms.len() {
                self.client.receive(self.now, from, &p.bytes);
            } else if self.batched {
                self.queued[t].push((from, p.bytes));
            } else {
                self.ms[t].receive(self.now, from, &p.bytes);
            }
        }

        /// Runs for `ms` of time, waking machines at their deadlines.
        fn run_for(&mut self, ms: u64) {
            let end = self.now + ms;
            self.settle();
            for _ in 0..1_000_000 {
                let next = self.ms.iter().filter_map(Machine::poll_timeout).min();
                let Some(next) = next.filter(|&t| t <= end) else {
                    break;
                };
                self.now = self.now.max(next);
                for m in &mut self.ms {
                    if m.poll_timeout().is_some_and(|t| t <= self.now) {
                        m.tick(self.now);
                    }
                }
                self.settle();
            }
            self.now = end;
        }

        fn call(&mut self, to: usize, id: u64, op: ClientOp) -> GateReply {
            let mut rng = ChaCha20Rng::seed_from_u64(id);
            let node = self.ms[to].node().me().id;
            let req = crate::gate::ClientRequest::new(key(5), node, op, self.now, &mut rng);
            self.client.call(self.now, addr(to), id, &req);
            self.run_for(2_000);
            let i = self
                .answers
                .iter()
                .position(|(a, _)| *a == id)
                .expect("answered");
            self.answers.remove(i).1
        }
    }

    fn ring_ok(net: &Net) -> bool {
        let mut ids: Vec<Id> = net.ms.iter().map(|m| m.node().me().id).collect();
        ids.sort();
        net.ms.iter().all(|m| {
            let me = m.node().me().id;
            let i = ids.iter().position(|x| *x == me).expect("member");
            let next = ids[(i + 1) % ids.len()];
            m.node().is_joined() && m.node().successors().first().map(|p| p.id) == Some(next)
        })
    }

    /// `n` machines: 0 creates the ring and admits the others, which
    /// register and join through it one by one; then `settle_ms` more.
    fn formed_ring(n: usize, settle_ms: u64) -> Net {
        formed_ring_with(n, settle_ms, false)
    }

    /// [`formed_ring`], the packets to machines batched or not.
    fn formed_ring_with(n: usize, settle_ms: u64, batched: bool) -> Net {
        let mut net = Net::new(n);
        net.batched = batched;
        net.ms[0].create(net.now);
        for i in 1..n {
            net.ms[0].admit(key_sha256(key(i).public_der()));
            let now = net.now;
            net.ms[i].join(now, addr(0), &format!("slot:{i}"));
            net.run_for(3_000);
        }
        net.run_for(settle_ms);
        assert!(ring_ok(&net), "ring did not form");
        net
    }

    #[test]
    fn a_machine_renews_its_endorsement_before_it_expires() {
        const DAY: u64 = 24 * 60 * 60 * 1000;
        let mut net = formed_ring(3, 20_000);
        let first = net.ms[1].links().credential_expires_ms().expect("endorsed");
        assert!(first > net.now + 29 * DAY && first <= net.now + 30 * DAY);
        assert_eq!(
            net.ms[0].links().credential_expires_ms(),
            Some(u64::MAX / 2),
            "the root's own chain does not expire"
        );
        // Nothing happens while the chain has more than ten days left.
        net.now += 19 * DAY;
        net.run_for(5_000);
        assert_eq!(net.ms[1].links().credential_expires_ms(), Some(first));
        // With under ten days left each machine asks its endorser again and
        // takes the new chain, as long as the old one.
        net.now += 2 * DAY;
        net.run_for(5_000);
        for i in 1..3 {
            let renewed = net.ms[i].links().credential_expires_ms().expect("endorsed");
            assert!(
                renewed > net.now + 29 * DAY,
                "machine {i} renewed: {renewed} vs now {}",
                net.now
            );
            let chain = crate::endorse::decode_chain(net.ms[i].links().credential()).unwrap();
            assert_eq!(chain.len(), 2, "same length as before");
        }
        // Past the first chain's expiry the ring still works.
        net.now = first + DAY;
        net.run_for(20_000);
        assert!(
            ring_ok(&net),
            "ring broke after the old endorsements expired"
        );
    }

    #[test]
    fn machines_register_join_and_serve_a_client_over_sessions() {
        serve_a_client(false);
    }

    /// The same when every machine takes what arrived in a round at once.
    #[test]
    fn machines_taking_packets_in_batches_serve_a_client_the_same() {
        let net = serve_a_client(true);
        assert!(net.largest_batch > 1, "packets did go in together");
    }

    fn serve_a_client(batched: bool) -> Net {
        let mut net = formed_ring_with(4, 60_000, batched);
        for m in &net.ms[1..] {
            assert!(m.links().endorsed(), "registered before joining");
        }
        // The client asks any node for the ring.
        match net.call(2, 1, ClientOp::Status) {
            GateReply::Status(st) => {
                assert!(st.joined);
                assert_eq!(st.me, net.ms[2].node().me());
                assert_eq!(st.successors.len(), 3);
            }
            other => panic!("{other:?}"),
        }
        // Unregistered, its writes are refused...
        let block = Item::Block(Block::new(key(5).user_id(), vec![7; 100]));
        let put = net.call(1, 2, ClientOp::Put(block.clone()));
        assert!(
            matches!(&put, GateReply::Put(Err(crate::gate::GateError::Auth(_)))),
            "{put:?}"
        );
        // ...until it registers its key; then a block goes in and comes out.
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let rec = crate::record::new_pubkey_record(&mut rng, key(5), Vec::new());
        let reg = net.call(3, 3, ClientOp::Put(Item::Record(Box::new(rec))));
        assert_eq!(reg, GateReply::Put(Ok(())));
        assert_eq!(
            net.call(1, 4, ClientOp::Put(block.clone())),
            GateReply::Put(Ok(()))
        );
        let at = block.position();
        assert_eq!(
            net.call(3, 5, ClientOp::Get(at)),
            GateReply::Get(Ok(Some(block)))
        );
        let copies = net.storage.iter().filter(|s| s.contains_key(&at)).count();
        assert_eq!(copies, 3, "R = 3 replicas");
        // Several blocks at once, through one node: with batching, the
        // replicas take them in together and hash their ids in pairs.
        let blocks: Vec<Item> = (0..5u8)
            .map(|i| Item::Block(Block::new(key(5).user_id(), vec![i; 5000 + usize::from(i)])))
            .collect();
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let node = net.ms[0].node().me().id;
        for (i, b) in blocks.iter().enumerate() {
            let req = crate::gate::ClientRequest::new(
                key(5),
                node,
                ClientOp::Put(b.clone()),
                net.now,
                &mut rng,
            );
            net.client.call(net.now, addr(0), 10 + i as u64, &req);
        }
        net.run_for(2_000);
        for (i, b) in blocks.iter().enumerate() {
            let at = b.position();
            assert!(
                net.answers
                    .contains(&(10 + i as u64, GateReply::Put(Ok(())))),
                "block {i} stored"
            );
            let held: Vec<&Item> = net.storage.iter().filter_map(|s| s.get(&at)).collect();
            assert_eq!(held.len(), 3, "block {i}: R = 3 replicas");
            for item in held {
                let Item::Block(h) = item else {
                    panic!("a block")
                };
                assert_eq!(h.id(), crate::hash::sha256(h.data()), "block {i}'s id");
                assert_eq!(item, b);
            }
        }
        net
    }

    /// A link packet of kind "reset" (no body): the sender has no session
    /// for us; we drop ours to it.
    const RESET_KIND: u8 = 5;
    /// A link packet carrying a frame back on the receiver's own session
    /// (an answer to its call).
    const FRAME_BACK_KIND: u8 = 6;

    /// A registration answered and then a reset from the same entry, both
    /// taken in one batch: the joiner still asks to join (the answer's
    /// event is handled before the reset is opened).
    #[test]
    fn a_reset_right_after_the_registration_answer_does_not_lose_the_join() {
        let mut net = Net::new(2);
        net.batched = true;
        net.reset_after = Some((1, 0));
        net.ms[0].create(net.now);
        net.ms[0].admit(key_sha256(key(1).public_der()));
        let now = net.now;
        net.ms[1].join(now, addr(0), "slot:1");
        net.run_for(30_000);
        assert!(net.resets > 0, "a reset went in behind the answer");
        assert!(net.ms[1].links().endorsed());
        assert!(ring_ok(&net), "the joiner joined");
    }

    /// The page of keys machine 2 answers a client's call `id` with.
    fn keys(net: &mut Net, id: u64, after: Option<Id>) -> Vec<Id> {
        match net.call(2, id, ClientOp::Keys { after }) {
            GateReply::Keys(page) => page,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_client_lists_a_nodes_keys_page_by_page() {
        let mut net = formed_ring(3, 20_000);
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let rec = crate::record::new_pubkey_record(&mut rng, key(5), Vec::new());
        let reg = net.call(0, 1, ClientOp::Put(Item::Record(Box::new(rec))));
        assert_eq!(reg, GateReply::Put(Ok(())));
        for i in 0..6u8 {
            let block = Item::Block(Block::new(key(5).user_id(), vec![i; 50]));
            let put = net.call(1, 10 + u64::from(i), ClientOp::Put(block));
            assert_eq!(put, GateReply::Put(Ok(())));
        }
        let held: Vec<Id> = net.ms[2]
            .node()
            .store_index()
            .iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(held.len(), 7, "three copies on three machines: all here");
        // One page holds them all, in order; the page after the last key
        // is empty, the end.
        assert_eq!(keys(&mut net, 20, None), held);
        let last = held.last().copied();
        assert_eq!(keys(&mut net, 21, last), Vec::<Id>::new());
        // Strictly after the key given, which need not be one held.
        assert_eq!(keys(&mut net, 22, Some(held[2])), held[3..]);
        assert_eq!(keys(&mut net, 23, Some(Id::ZERO)), held);
        assert_eq!(keys(&mut net, 24, Some(Id::MAX)), Vec::<Id>::new());
        // Pages of three: three, three, one, then the empty page.
        let index = net.ms[2].node().store_index();
        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = keys_page(index, after, 3);
            if page.is_empty() {
                break;
            }
            after = page.last().copied();
            pages.push(page);
        }
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
        assert_eq!(pages.concat(), held);
    }

    /// What machine `i` heard from `peer` through [`Machine::ask_state`].
    fn heard(net: &Net, i: usize, peer: Peer) -> Vec<StateAnswer> {
        net.events
            .iter()
            .filter_map(|(m, e)| match e {
                MachineEvent::PeerState { peer: p, state } if *m == i && *p == peer => Some(*state),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_whole_ring_restarted_answers_out_of_ring_until_one_creates_it_again() {
        let mut net = formed_ring(3, 20_000);
        let me = |net: &Net, i: usize| net.ms[i].node().me();
        // In the ring: a member, with its predecessor.
        let now = net.now;
        let p2 = me(&net, 2);
        net.ms[1].ask_state(now, p2);
        net.run_for(2_000);
        let pred2 = net.ms[2].node().predecessor();
        assert!(pred2.is_some());
        assert_eq!(heard(&net, 1, p2), vec![Some((true, pred2))]);

        // Every machine stops and starts again with its credential and its
        // disk, but no ring state.
        let creds: Vec<Vec<u8>> = net
            .ms
            .iter()
            .map(|m| m.links().credential().to_vec())
            .collect();
        let preds: Vec<Peer> = (0..3)
            .map(|i| net.ms[i].node().predecessor().unwrap())
            .collect();
        for (i, c) in creds.into_iter().enumerate() {
            net.ms[i] = machine_with(i, Some(c));
        }
        net.events.clear();
        // Each tries to rejoin through the machine after it: nobody is in
        // a ring, so nobody gets in.
        let ids: Vec<Id> = (0..3).map(|i| me(&net, i).id).collect();
        let next = |i: usize| -> usize {
            (0..3)
                .filter(|&j| j != i)
                .min_by_key(|&j| ids[j].wrapping_sub(ids[i]))
                .unwrap()
        };
        for i in 0..3 {
            let now = net.now;
            net.ms[i].join(now, addr(next(i)), &format!("slot:{i}"));
        }
        net.run_for(30_000);
        assert!(net.ms.iter().all(|m| !m.node().is_joined()));
        // Asked, each says it is out of any ring; one with a wrong id at a
        // right address (a stale memory) gets no answer.
        let lowest = (0..3).min_by_key(|&i| ids[i]).unwrap();
        assert!(
            preds[lowest].id > ids[lowest],
            "the lowest one's predecessor wraps"
        );
        let now = net.now;
        for j in (0..3).filter(|&j| j != lowest) {
            let p = me(&net, j);
            net.ms[lowest].ask_state(now, p);
        }
        let stale = Peer {
            id: Id::from_u128(12345),
            addr: addr(next(lowest)),
        };
        net.ms[lowest].ask_state(now, stale);
        net.run_for(10_000);
        for j in (0..3).filter(|&j| j != lowest) {
            assert_eq!(heard(&net, lowest, me(&net, j)), vec![Some((false, None))]);
        }
        assert_eq!(heard(&net, lowest, stale), vec![None]);
        // The lowest creates the ring again, dropping its own join; the
        // others' joins go through as soon as it is in a ring.
        assert!(net.ms[lowest].join_pending());
        let now = net.now;
        net.ms[lowest].create(now);
        assert!(net.ms[lowest].node().is_joined());
        assert!(!net.ms[lowest].join_pending());
        for i in (0..3).filter(|&i| i != lowest) {
            let now = net.now;
            net.ms[i].join(now, addr(lowest), &format!("slot:{i}"));
            net.run_for(3_000);
        }
        net.run_for(20_000);
        assert!(ring_ok(&net), "the ring formed again");
    }

    /// The daemon moves a join that seems stuck to another entry; if the
    /// first one gets through after all, the machine is in the ring and
    /// no join is pending (the daemon would otherwise keep restarting a
    /// join, and resetting its links, for ever).
    #[test]
    fn a_join_that_gets_in_after_the_daemon_moved_on_still_counts() {
        let mut net = Net::new(3);
        net.ms[0].admit(key_sha256(key(1).public_der()));
        // Machine 0 is not in a ring yet: machine 1 registers there, but
        // its join finds no ring and keeps retrying.
        let now = net.now;
        net.ms[1].join(now, addr(0), "slot:1");
        net.run_for(3_000);
        assert!(net.ms[1].join_pending() && !net.ms[1].node().is_joined());
        // The daemon gives up on machine 0 and asks machine 2 (which is not
        // endorsed and never answers usefully)...
        let now = net.now;
        net.ms[1].join(now, addr(2), "slot:1");
        // ...while machine 0 starts its ring: the join still retrying
        // inside the node gets in.
        net.ms[0].create(now);
        net.run_for(20_000);
        assert!(net.ms[1].node().is_joined(), "the first join got in");
        assert!(!net.ms[1].join_pending(), "and the machine knows it");
        assert!(net
            .events
            .iter()
            .any(|(i, e)| *i == 1 && matches!(e, MachineEvent::Joined { .. })));
    }

    #[test]
    fn a_machine_nobody_admitted_never_joins() {
        let mut net = Net::new(2);
        net.ms[0].create(net.now);
        let now = net.now;
        net.ms[1].join(now, addr(0), "slot:1");
        net.run_for(30_000);
        assert!(!net.ms[1].node().is_joined());
        assert!(net.ms[1].join_pending());
        let stranger = net.ms[1].node().me();
        assert!(!net.ms[0].node().successors().contains(&stranger));
        assert_eq!(net.ms[0].links().stats().refused_untrusted, 1);
    }
}
