//! One Chord node as a value: one door in ([`Node::handle`]), one door out
//! ([`Node::poll_output`]), time as an argument.
//!
//! Ring maintenance follows Zave's corrected Chord: a node adopts a pointer only
//! after querying it live; stabilize takes `[s] + s.succs` from the live first
//! successor `s`, then asks `s`'s predecessor `x` (if it lies between) and adopts
//! `[x] + x.succs` only if `x` answers; rectify takes a notifier as predecessor
//! if it lies between the old one and self, or if the old one is found dead.
//! Maintenance is strictly periodic (one stabilize, one predecessor check and one
//! finger lookup in flight at most), so churn cannot raise a node's message rate.

use crate::config::{Config, Protocol};
use crate::id::{Id, NodeId, ID_BITS};
use crate::lookup::{Lookup, LookupError, LookupId, PeerState, Step};
use crate::reqtable::ReqTable;
use crate::rtt::RttTable;
use crate::store::{Item, StoreError};
use crate::wire::{Message, Peer, ReqId};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Longest chain of witnesses asked about one suspect successor (each hop
/// walks from a witness to its predecessor, towards the suspect).
const CONFIRM_HOPS_MAX: u8 = 16;

/// A closer node `x` that stabilize finds is adopted with one entry of its
/// list more than the usual `r`. Its answer may be stale: `x` and the first
/// entries of its list may have left while it travelled (nobody tells us: we
/// were not yet `x`'s predecessor), and the entry that `r` would cut off can
/// be the only live one. The next answer from a live successor makes the list
/// `r` long again; entries that fail go as usual. Lists are read from others
/// with their spare: a node rejoining under its old id drops its old self
/// from the list it copies and needs the entry after it.
const SPARE: usize = 1;
/// How many other nodes try a suspect before we drop it (SWIM's k).
const PROBE_WITNESSES: usize = 3;
/// Questions in a last look at a suspect before it is dropped.
const LAST_LOOK_TRIES: u8 = 2;
/// Probes a node runs at once for others; more are ignored.
const PROBES_SERVED_MAX: usize = 8;

/// The indirect probes of one suspect, see [`Wait::Probe`].
struct ProbeRound {
    id: u32,
    suspect: Peer,
    outstanding: usize,
    dead: usize,
    started_ms: u64,
}

#[path = "replica.rs"]
mod replica;
pub use replica::{IoId, PutOk, StorageOp, StorageResult, StoreStats};
use replica::{OpId, SessionId, Storage};

/// A caller-chosen id for a command; its reply carries it back.
pub type CmdId = u64;

/// Everything that can happen to a node.
#[derive(Clone, Debug)]
pub enum Input {
    /// A message from a peer (the transport vouches for `from`).
    Message { from: Peer, msg: Message },
    /// Time has reached the deadline [`Node::poll_timeout`] asked for (or later).
    Timeout,
    /// A request from the application or an operator.
    Command(CmdId, Command),
    /// A storage effect the node asked for ([`Output::Storage`]) has finished.
    StorageDone { io: IoId, result: StorageResult },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Start a new ring with this node as its only member.
    Create,
    /// Join the ring `via` belongs to: look up our own id, copy that successor's list.
    Join { via: Peer },
    /// Find the node responsible for `key`.
    Lookup { key: Id },
    /// Leave gracefully: tell the neighbours, then stop answering.
    Leave,
    /// Run one stabilize round now (operators and scripted tests).
    Stabilize,
    /// Check the predecessor now (operators and scripted tests).
    CheckPredecessor,
    /// Turn periodic maintenance off or on (experiments measuring lookups
    /// "before any repair").
    SetMaintenance(bool),
    /// Store an item on its R replicas; answered once W made it durable.
    Put(Item),
    /// Read the item at a ring position from its nearest replica.
    Get(crate::id::Id),
    /// Ask `peer` whether it is in a ring and whom it counts as its
    /// predecessor (answered in any state: a restarting node uses it to
    /// decide whether the ring it remembers still exists).
    AskState { peer: Peer },
}

/// Effects for the caller to carry out.
#[derive(Clone, Debug)]
pub enum Output {
    Send {
        to: Peer,
        msg: Message,
    },
    Reply {
        cmd: CmdId,
        result: CmdResult,
    },
    Event(Event),
    /// Carry out a storage operation; answer with [`Input::StorageDone`].
    Storage {
        io: IoId,
        op: StorageOp,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdResult {
    Done,
    Joined {
        successor: Peer,
    },
    JoinFailed(LookupError),
    Lookup(Result<LookupOk, LookupError>),
    /// The command does not apply in the node's current state.
    Refused(&'static str),
    Put(Result<PutOk, StoreError>),
    Get(Result<Option<Item>, StoreError>),
    /// The answer to [`Command::AskState`].
    State(StateAnswer),
}

/// A peer's answer to [`Command::AskState`]: `None` if it did not answer in
/// time, else whether it is in a ring and its predecessor.
pub type StateAnswer = Option<(bool, Option<Peer>)>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupOk {
    pub key: Id,
    pub owner: Peer,
    pub hops: u32,
    pub timeouts: u32,
    pub latency_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Joined,
    /// The node dropped its last live successor candidate and is alone.
    SuccessorsLost,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Idle,
    Joining,
    Joined,
    Left,
}

/// Counters for reports; none of them steer behaviour.
#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    pub sent_maintenance: u64,
    pub sent_lookup: u64,
    pub sent_replies: u64,
    pub sent_storage: u64,
    pub timeouts: u64,
    pub dropped_unexpected: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    Stabilize,
    /// Before dropping a silent first successor, ask the node after it whether
    /// it still counts the suspect as its predecessor: a second opinion over a
    /// different path. Only a positive answer ("my predecessor is no longer the
    /// suspect or anything after it") drops the suspect; silence keeps it, so a
    /// node cut off from everyone keeps its list instead of skipping live nodes.
    /// `hops` counts every witness asked, `answered` those that replied.
    ConfirmDead {
        suspect: Peer,
        hops: u8,
        answered: u8,
    },
    /// Before dropping a first successor the walk above found gone, ask up
    /// to [`PROBE_WITNESSES`] other nodes to reach it: the walk's evidence
    /// says only that the suspect is silent to us and that the witness has
    /// not heard it lately, and a clogged path looks exactly like that.
    /// One "alive" keeps the suspect; it goes only if a witness that
    /// answered found it gone and none found it alive.
    Probe {
        round: u32,
    },
    /// We are that other node: asking `target` on `origin`'s behalf.
    ProbeFor {
        origin: Peer,
        origin_req: ReqId,
    },
    StabilizeCandidate,
    /// A probe round found the first successor gone, but only after waiting
    /// out a silent witness for longer than a suspicion window: one last
    /// question to it before it is dropped. A suspect that restarted and
    /// joined again meanwhile is a live successor that must be kept.
    /// Asked up to [`LAST_LOOK_TRIES`] times: one lost reply is not a
    /// death.
    LastLook {
        suspect: Peer,
        tries: u8,
    },
    CheckPred,
    RectifyProbe {
        candidate: Peer,
    },
    Lookup(LookupId),
    /// Fix-fingers: is far finger `i` still the successor of its target?
    /// One GetState to the finger answers it in a steady ring; a lookup runs
    /// only when it is not.
    FingerCheck(usize),
    /// A coordinated client write or read waiting on one replica.
    StorePut(OpId),
    StoreGet(OpId),
    /// Anti-entropy: a range digest, a push, a fetch.
    Sync {
        sid: SessionId,
        lo: Id,
        hi: Id,
    },
    Push(SessionId),
    Fetch {
        sid: SessionId,
        key: Id,
    },
    /// A read-repair push nobody waits on.
    Repair,
    /// An operator's [`Command::AskState`].
    AskState(CmdId),
}

impl Wait {
    fn is_storage(&self) -> bool {
        matches!(
            self,
            Wait::StorePut(_)
                | Wait::StoreGet(_)
                | Wait::Sync { .. }
                | Wait::Push(_)
                | Wait::Fetch { .. }
                | Wait::Repair
        )
    }
}

#[derive(Clone, Debug)]
struct Pending {
    to: Peer,
    sent_ms: u64,
    wait: Wait,
}

#[derive(Clone, Copy, Debug)]
enum Purpose {
    Command(CmdId),
    Join {
        cmd: Option<CmdId>,
        via: Peer,
        attempt: u32,
    },
    Finger(usize),
    /// A client put or get looking for its replicas.
    Store(OpId),
    /// The hand-off walk asking who should hold a key we have.
    Handoff(Id),
    /// Asking again once the keys were handed off, before deleting ours.
    HandoffConfirm(u64),
}

#[derive(Clone, Debug)]
struct Running {
    lookup: Lookup,
    purpose: Purpose,
}

pub struct Node {
    cfg: Arc<Config>,
    me: Peer,
    rng: ChaCha8Rng,
    status: Status,
    /// Replaced whole, never edited in place, and shared with the replies
    /// that carry it.
    succs: Arc<[Peer]>,
    pred: Option<Peer>,
    fingers: Vec<Option<Peer>>,
    /// Lowest finger index whose target lies beyond the successor list.
    far_low: usize,
    far_cursor: usize,
    maintenance: bool,
    next_stabilize_ms: u64,
    next_check_pred_ms: u64,
    next_fix_ms: u64,
    join_retry: Option<(u64, Purpose)>,
    stabilizing: bool,
    checking_pred: bool,
    probing_pred: bool,
    fixing_finger: bool,
    /// (consecutive timeouts, time of the first) for the first successor and
    /// the predecessor: the failure detector's suspicion state.
    succ_fails: (u32, u64),
    pred_fails: (u32, u64),
    /// When the first successor last went silent (cleared when it answers).
    succ_silent_since: Option<u64>,
    /// The indirect probes of a suspect we are about to drop, if any.
    probe_round: Option<ProbeRound>,
    next_probe_round: u32,
    /// Probes we are running for others (bounded: a probe costs a request).
    probes_serving: usize,
    /// When any peer last answered one of our requests, and when a request
    /// to someone other than our first successor last timed out: both
    /// silent together means we were the one cut off.
    last_reply_ms: u64,
    last_other_timeout_ms: u64,
    /// When our predecessor last sent us anything.
    pred_heard_ms: u64,
    pending: ReqTable<Pending>,
    lookups: BTreeMap<LookupId, Running>,
    next_req: ReqId,
    next_lookup: LookupId,
    rtt: RttTable,
    out: VecDeque<Output>,
    ring_version: u64,
    stats: NodeStats,
    store: Storage,
}

impl Node {
    /// A node that has not joined anything yet. `seed` drives its jitter and
    /// request ids; nothing else about it is random.
    ///
    /// `cfg` may be an `Arc` shared by many nodes (the simulator runs
    /// thousands with one configuration: one copy stays in cache).
    pub fn new(cfg: impl Into<Arc<Config>>, me: Peer, seed: u64) -> Node {
        let cfg: Arc<Config> = cfg.into();
        assert!(
            cfg.successors_max >= 1,
            "successor list length must be >= 1"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Request ids start at a random point so replies meant for an earlier
        // incarnation of this node are not mistaken for current ones.
        let next_req = rng.next_u64() >> 1;
        let rtt = RttTable::new(
            cfg.rtt_peers_max,
            cfg.rto_min_ms,
            cfg.rto_max_ms,
            cfg.rto_initial_ms,
        );
        Node {
            cfg,
            me,
            rng,
            status: Status::Idle,
            succs: Arc::default(),
            pred: None,
            fingers: vec![None; ID_BITS],
            far_low: 0,
            far_cursor: ID_BITS - 1,
            maintenance: true,
            next_stabilize_ms: u64::MAX,
            next_check_pred_ms: u64::MAX,
            next_fix_ms: u64::MAX,
            join_retry: None,
            stabilizing: false,
            checking_pred: false,
            probing_pred: false,
            fixing_finger: false,
            succ_fails: (0, 0),
            pred_fails: (0, 0),
            succ_silent_since: None,
            probe_round: None,
            next_probe_round: 0,
            probes_serving: 0,
            last_reply_ms: 0,
            last_other_timeout_ms: 0,
            pred_heard_ms: 0,
            pending: ReqTable::default(),
            lookups: BTreeMap::new(),
            next_req,
            next_lookup: 0,
            rtt,
            out: VecDeque::new(),
            ring_version: 0,
            stats: NodeStats::default(),
            store: Storage::default(),
        }
    }

    /// Installs a known-correct ring position (Zave's initialisation: a network
    /// starts as an ideal ring of at least r+1 members). `fingers`, if given, are
    /// the exact finger table (index i = successor of id + 2^i).
    pub fn bootstrap(
        &mut self,
        now_ms: u64,
        succs: Vec<Peer>,
        pred: Option<Peer>,
        fingers: Option<Vec<Option<Peer>>>,
    ) {
        assert_eq!(self.status, Status::Idle, "bootstrap only a fresh node");
        let succs = self.sanitize(succs.into_iter());
        self.set_succs(succs);
        self.set_pred(pred);
        if let Some(f) = fingers {
            assert_eq!(f.len(), ID_BITS);
            for (i, p) in f.into_iter().enumerate().skip(self.far_low) {
                self.fingers[i] = p.filter(|p| p.id != self.me.id);
            }
        }
        self.become_joined(now_ms);
    }

    // ----- the two doors -------------------------------------------------

    pub fn handle(&mut self, now_ms: u64, input: Input) {
        if self.status == Status::Left {
            return;
        }
        match input {
            Input::Message { from, msg } => self.on_message(now_ms, from, msg),
            Input::Timeout => self.on_timeout(now_ms),
            Input::Command(cmd, c) => self.on_command(now_ms, cmd, c),
            Input::StorageDone { io, result } => self.on_storage_done(now_ms, io, result),
        }
        self.pump(now_ms);
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The earliest time the node wants [`Input::Timeout`], if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.status == Status::Left {
            return None;
        }
        let mut t = self.pending.earliest().map_or(u64::MAX, |(d, _)| d);
        if self.status == Status::Joined && self.maintenance {
            t = t
                .min(self.next_stabilize_ms)
                .min(self.next_check_pred_ms)
                .min(self.next_fix_ms);
        }
        if let Some((at, _)) = self.join_retry {
            t = t.min(at);
        }
        t = t.min(self.store_timeout());
        (t != u64::MAX).then_some(t)
    }

    // ----- read-only views (reports, checkers, `peerstore ring`) ---------

    pub fn me(&self) -> Peer {
        self.me
    }
    pub fn status(&self) -> Status {
        self.status
    }
    pub fn is_joined(&self) -> bool {
        self.status == Status::Joined
    }
    pub fn successors(&self) -> &[Peer] {
        &self.succs
    }
    pub fn predecessor(&self) -> Option<Peer> {
        self.pred
    }
    /// Finger `i` targets `id + 2^i`.
    pub fn fingers(&self) -> &[Option<Peer>] {
        &self.fingers
    }
    /// Bumped whenever the successor list or predecessor changes.
    pub fn ring_version(&self) -> u64 {
        self.ring_version
    }
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    // ----- commands ------------------------------------------------------

    fn on_command(&mut self, now_ms: u64, cmd: CmdId, c: Command) {
        match c {
            Command::Create => {
                if self.status == Status::Joining {
                    // The operator (or the daemon's restart rule) decided
                    // that no ring is left to join: drop the join.
                    self.abandon_join();
                }
                if self.status != Status::Idle {
                    return self.reply(cmd, CmdResult::Refused("node is already in a ring"));
                }
                self.become_joined(now_ms);
                self.reply(cmd, CmdResult::Done);
            }
            Command::Join { via } => {
                if self.status == Status::Joined {
                    return self.reply(cmd, CmdResult::Refused("node is already in a ring"));
                }
                if via.id == self.me.id {
                    return self.reply(cmd, CmdResult::Refused("cannot join through oneself"));
                }
                if self.status == Status::Joining {
                    // Asked to join through another node (the daemon moves
                    // on from an entry that does not answer): the join under
                    // way is dropped, its command answered, and this one
                    // starts afresh.
                    self.abandon_join();
                }
                self.status = Status::Joining;
                self.start_join(
                    now_ms,
                    Purpose::Join {
                        cmd: Some(cmd),
                        via,
                        attempt: 1,
                    },
                );
            }
            Command::AskState { peer } => {
                if peer.id == self.me.id {
                    return self.reply(cmd, CmdResult::Refused("cannot ask oneself"));
                }
                self.request(
                    now_ms,
                    peer,
                    |req| Message::GetState { req },
                    Wait::AskState(cmd),
                    false,
                );
            }
            Command::Lookup { key } => {
                if self.status != Status::Joined {
                    return self.reply(cmd, CmdResult::Lookup(Err(LookupError::NotJoined)));
                }
                if self.lookups.len() >= self.cfg.lookups_max {
                    return self.reply(cmd, CmdResult::Refused("too many lookups in flight"));
                }
                self.start_lookup(now_ms, key, Purpose::Command(cmd));
            }
            Command::Leave => {
                if self.status == Status::Joined && self.start_leave_handoff(now_ms, cmd) {
                    return;
                }
                self.finish_leave(cmd);
            }
            Command::Stabilize => {
                if self.status == Status::Joined && !self.stabilizing {
                    self.start_stabilize(now_ms);
                }
                self.reply(cmd, CmdResult::Done);
            }
            Command::CheckPredecessor => {
                if self.status == Status::Joined && !self.checking_pred {
                    self.start_check_pred(now_ms);
                }
                self.reply(cmd, CmdResult::Done);
            }
            Command::SetMaintenance(on) => {
                self.maintenance = on;
                self.reply(cmd, CmdResult::Done);
            }
            Command::Put(item) => self.start_put(now_ms, cmd, item),
            Command::Get(key) => self.start_get(now_ms, cmd, key),
        }
    }

    /// Tells the neighbours we are going and stops answering.
    fn finish_leave(&mut self, cmd: CmdId) {
        if self.status == Status::Joined {
            let mut told = BTreeSet::new();
            let targets: Vec<Peer> = self
                .pred
                .iter()
                .chain(self.succs.first())
                .copied()
                .collect();
            for p in targets {
                if told.insert(p.id) {
                    self.send_maintenance(p, Message::Leaving);
                }
            }
        }
        self.status = Status::Left;
        self.pending.clear();
        self.probe_round = None;
        self.probes_serving = 0;
        self.lookups.clear();
        self.reply(cmd, CmdResult::Done);
    }

    fn become_joined(&mut self, now_ms: u64) {
        self.status = Status::Joined;
        self.next_stabilize_ms = now_ms + self.jittered(self.cfg.stabilize_ms);
        self.next_check_pred_ms = now_ms + self.jittered(self.cfg.check_pred_ms);
        self.next_fix_ms = now_ms + self.jittered(self.cfg.fix_fingers_ms);
        self.store_joined(now_ms);
        self.out.push_back(Output::Event(Event::Joined));
    }

    /// Drops the join under way (its lookup and any retry waiting), failing
    /// its command.
    fn abandon_join(&mut self) {
        let mut cmds = Vec::new();
        self.lookups.retain(|_, r| match r.purpose {
            Purpose::Join { cmd, .. } => {
                cmds.extend(cmd);
                false
            }
            _ => true,
        });
        if let Some((_, Purpose::Join { cmd, .. })) = self.join_retry.take() {
            cmds.extend(cmd);
        }
        for cmd in cmds {
            self.reply(
                cmd,
                CmdResult::Refused("the join was restarted through another node"),
            );
        }
        self.status = Status::Idle;
    }

    fn start_join(&mut self, now_ms: u64, purpose: Purpose) {
        let Purpose::Join { via, .. } = purpose else {
            unreachable!("start_join takes a join purpose");
        };
        let mut lookup = Lookup::new(
            self.me.id,
            self.me.id,
            true,
            now_ms,
            self.cfg.lookup_hops_max,
            self.cfg.lookup_timeouts_max,
        );
        lookup.add_start(via);
        let lid = self.alloc_lookup();
        self.lookups.insert(lid, Running { lookup, purpose });
        let step = self
            .lookups
            .get_mut(&lid)
            .expect("just inserted")
            .lookup
            .on_next(self.me, &[], &[], true);
        self.drive(now_ms, lid, step);
    }

    fn start_lookup(&mut self, now_ms: u64, key: Id, purpose: Purpose) {
        let lid = self.alloc_lookup();
        let mut lookup = Lookup::new(
            key,
            self.me.id,
            false,
            now_ms,
            self.cfg.lookup_hops_max,
            self.cfg.lookup_timeouts_max,
        );
        lookup.set_my_pred(self.pred);
        // Keys in (pred, me] are ours without asking anyone.
        let step = match self.pred {
            Some(p) if key.in_open_closed(p.id, self.me.id) => Step::Done {
                owner: self.me,
                owner_state: None,
            },
            _ => {
                let succs = self.succs_or_self();
                let succs = if self.cfg.route_via_successor_lists {
                    &succs[..]
                } else {
                    &succs[..1]
                };
                let closer = self.closest_preceding(key);
                lookup.on_next(self.me, succs, &closer, true)
            }
        };
        self.lookups.insert(lid, Running { lookup, purpose });
        self.drive(now_ms, lid, step);
    }

    fn alloc_lookup(&mut self) -> LookupId {
        self.next_lookup += 1;
        self.next_lookup
    }

    /// Carries out a lookup's next step.
    fn drive(&mut self, now_ms: u64, lid: LookupId, step: Step) {
        match step {
            Step::Ask { to, verify } => {
                let key = self.lookups[&lid].lookup.key;
                let maintenance = matches!(self.lookups[&lid].purpose, Purpose::Finger(_));
                let mk = move |req| {
                    if verify {
                        Message::GetState { req }
                    } else {
                        Message::FindNext { req, key }
                    }
                };
                self.request(now_ms, to, mk, Wait::Lookup(lid), maintenance);
            }
            Step::Done { owner, owner_state } => {
                let run = self.lookups.remove(&lid).expect("driven lookup exists");
                self.finish(now_ms, run, Ok((owner, owner_state)));
            }
            Step::Failed(e) => {
                let run = self.lookups.remove(&lid).expect("driven lookup exists");
                self.finish(now_ms, run, Err(e));
            }
        }
    }

    fn finish(
        &mut self,
        now_ms: u64,
        run: Running,
        result: Result<(Peer, Option<PeerState>), LookupError>,
    ) {
        let l = &run.lookup;
        match run.purpose {
            Purpose::Command(cmd) => {
                let r = result.map(|(owner, _)| LookupOk {
                    key: l.key,
                    owner,
                    hops: l.hops,
                    timeouts: l.timeouts,
                    latency_ms: now_ms - l.started_ms,
                });
                self.reply(cmd, CmdResult::Lookup(r));
            }
            Purpose::Store(op) => self.store_lookup_done(now_ms, op, result),
            Purpose::Handoff(key) => self.handoff_lookup_done(now_ms, key, result),
            Purpose::HandoffConfirm(hid) => self.handoff_confirmed(hid, result),
            Purpose::Finger(i) => {
                self.fixing_finger = false;
                if let Ok((owner, _)) = result {
                    if i >= self.far_low && owner.id != self.me.id {
                        self.fingers[i] = Some(owner);
                    }
                }
            }
            Purpose::Join { cmd, via, attempt } => match result {
                Ok((owner, state)) => {
                    let succs = match (self.cfg.protocol, state) {
                        // Zave: the copied list of the key's predecessor.
                        (Protocol::Zave, Some((_, list))) => {
                            self.sanitize(std::iter::once(owner).chain(list))
                        }
                        _ => self.sanitize(std::iter::once(owner)),
                    };
                    self.set_succs(succs);
                    self.become_joined(now_ms);
                    // Tell the successor at once rather than at the first
                    // stabilize: lookups checking its predecessor then find us
                    // a period sooner. Notify is only ever a hint (rectify checks).
                    if let Some(first) = self.succs.first().copied() {
                        self.send_maintenance(first, Message::Notify);
                    }
                    if let Some(cmd) = cmd {
                        self.reply(cmd, CmdResult::Joined { successor: owner });
                    }
                }
                Err(e) if attempt >= self.cfg.join_attempts_max => {
                    self.status = Status::Idle;
                    if let Some(cmd) = cmd {
                        self.reply(cmd, CmdResult::JoinFailed(e));
                    }
                }
                Err(_) => {
                    let retry = Purpose::Join {
                        cmd,
                        via,
                        attempt: attempt + 1,
                    };
                    self.join_retry = Some((now_ms + self.cfg.join_retry_ms, retry));
                }
            },
        }
    }

    // ----- timers ----------------------------------------------------------

    fn on_timeout(&mut self, now_ms: u64) {
        // Expired requests first: their outcome may change what maintenance does.
        while let Some(p) = self.pending.pop_expired(now_ms) {
            self.request_timed_out(now_ms, p);
        }
        if let Some((at, purpose)) = self.join_retry {
            if at <= now_ms && self.status == Status::Joining {
                self.join_retry = None;
                self.start_join(now_ms, purpose);
            }
        }
        if self.status != Status::Joined || !self.maintenance {
            return;
        }
        if self.next_stabilize_ms <= now_ms {
            self.next_stabilize_ms = now_ms + self.jittered(self.cfg.stabilize_ms);
            if !self.stabilizing {
                self.start_stabilize(now_ms);
            }
        }
        if self.next_check_pred_ms <= now_ms {
            self.next_check_pred_ms = now_ms + self.jittered(self.cfg.check_pred_ms);
            let heard_recently = self.pred.is_some()
                && now_ms.saturating_sub(self.pred_heard_ms) < self.cfg.check_pred_ms;
            if !self.checking_pred && !heard_recently {
                self.start_check_pred(now_ms);
            }
        }
        if self.next_fix_ms <= now_ms {
            self.next_fix_ms = now_ms + self.jittered(self.cfg.fix_fingers_ms);
            if !self.fixing_finger {
                self.start_fix_finger(now_ms);
            }
        }
    }

    fn request_timed_out(&mut self, now_ms: u64, p: Pending) {
        self.stats.timeouts += 1;
        // Entries of our list behind a silent successor are no sign that we
        // are the one cut off: adjacent nodes often fail together, and the
        // check of a silent successor asks them first.
        if !self.succs.iter().any(|x| x.id == p.to.id) {
            self.last_other_timeout_ms = now_ms;
        }
        // One late reply is common on a jittery path; two in a row is a pattern.
        if self.rtt.missed(p.to.id) >= 2 {
            self.forget_finger(p.to.id);
        }
        match p.wait {
            Wait::Stabilize => {
                self.stabilizing = false;
                if self.succs.first().map(|s| s.id) == Some(p.to.id) {
                    self.succ_silent_since.get_or_insert(p.sent_ms);
                    // Never drop the last entry: with nothing left the node would
                    // become a ring of its own. A live list entry is the only way back.
                    if Self::suspect(&mut self.succ_fails, p.sent_ms, now_ms, self.cfg.suspect_ms)
                        && self.succs.len() > 1
                    {
                        let witness = self.succs[1];
                        self.confirm_dead(now_ms, p.to, witness, 1, 0);
                    }
                }
            }
            Wait::ConfirmDead {
                suspect,
                hops,
                answered,
            } => {
                // The witness is silent too: ask the next entry after it, or
                // give up without evidence (and keep the suspect).
                self.stabilizing = false;
                let after = self
                    .succs
                    .iter()
                    .position(|x| x.id == p.to.id)
                    .and_then(|i| self.succs.get(i + 1))
                    .copied();
                if let Some(next) = after.filter(|_| hops < CONFIRM_HOPS_MAX) {
                    self.confirm_dead(now_ms, suspect, next, hops + 1, answered);
                }
            }
            Wait::Probe { round } => self.probe_answered(now_ms, round, None),
            Wait::LastLook { suspect, tries } if tries < LAST_LOOK_TRIES => {
                self.last_look_ask(now_ms, suspect, tries + 1)
            }
            Wait::LastLook { suspect, .. } => self.last_look(suspect, false),
            Wait::ProbeFor { origin, origin_req } => self.probe_done(origin, origin_req, false),
            Wait::StabilizeCandidate => {
                // x did not answer: keep the list we have, notify our successor.
                self.stabilizing = false;
                if let Some(s) = self.succs.first().copied() {
                    self.send_maintenance(s, Message::Notify);
                }
            }
            Wait::CheckPred => {
                self.checking_pred = false;
                if self.pred.map(|x| x.id) == Some(p.to.id)
                    && Self::suspect(&mut self.pred_fails, p.sent_ms, now_ms, self.cfg.suspect_ms)
                {
                    self.set_pred(None);
                }
            }
            Wait::RectifyProbe { candidate } => {
                // The old predecessor loses only once the failure detector
                // agrees it is dead (one timeout is one lost message).
                self.probing_pred = false;
                if self.pred.map(|x| x.id) == Some(p.to.id)
                    && Self::suspect(&mut self.pred_fails, p.sent_ms, now_ms, self.cfg.suspect_ms)
                {
                    self.set_pred(Some(candidate));
                }
            }
            Wait::Lookup(lid) => {
                if let Some(run) = self.lookups.get_mut(&lid) {
                    let step = run.lookup.on_timeout(p.to);
                    self.drive(now_ms, lid, step);
                }
            }
            Wait::AskState(cmd) => self.reply(cmd, CmdResult::State(None)),
            Wait::FingerCheck(i) => self.finger_checked(now_ms, i, p.to, None),
            w if w.is_storage() => self.store_request_failed(now_ms, p.to, w),
            _ => unreachable!("every wait kind is handled above"),
        }
    }

    /// The peer answered, but not the question we asked (a confused or
    /// hostile peer): counted, and the request failed as if it had timed out,
    /// so whatever waits on it moves on.
    fn wrong_reply(&mut self, now_ms: u64, p: Pending) {
        self.stats.dropped_unexpected += 1;
        self.request_timed_out(now_ms, p);
    }

    /// The peer answered, but it is not in a ring (it restarted, or is still
    /// joining): as good as dead for ring pointers, and known at once.
    fn not_a_member(&mut self, now_ms: u64, p: Pending) {
        match p.wait {
            Wait::Stabilize => {
                self.stabilizing = false;
                self.drop_first_successor(p.to);
            }
            Wait::CheckPred => {
                self.checking_pred = false;
                if self.pred.map(|x| x.id) == Some(p.to.id) {
                    self.set_pred(None);
                }
            }
            Wait::RectifyProbe { candidate } => {
                self.probing_pred = false;
                if self.pred.map(|x| x.id) == Some(p.to.id) {
                    self.set_pred(Some(candidate));
                }
            }
            Wait::Lookup(lid) => {
                if let Some(run) = self.lookups.get_mut(&lid) {
                    let step = run.lookup.on_not_member(p.to);
                    self.drive(now_ms, lid, step);
                }
            }
            Wait::ProbeFor { origin, origin_req } => self.probe_done(origin, origin_req, false),
            Wait::AskState(cmd) => self.reply(cmd, CmdResult::State(Some((false, None)))),
            Wait::FingerCheck(i) => self.finger_checked(now_ms, i, p.to, None),
            // A witness or candidate outside the ring tells us nothing.
            Wait::LastLook { suspect, .. } => self.last_look(suspect, false),
            Wait::StabilizeCandidate | Wait::ConfirmDead { .. } | Wait::Probe { .. } => {
                self.request_timed_out(now_ms, p)
            }
            w => self.store_request_failed(now_ms, p.to, w),
        }
    }

    fn confirm_dead(&mut self, now_ms: u64, suspect: Peer, witness: Peer, hops: u8, answered: u8) {
        if witness.id == self.me.id || witness.id == suspect.id {
            return;
        }
        self.stabilizing = true;
        self.request(
            now_ms,
            witness,
            |req| Message::GetState { req },
            Wait::ConfirmDead {
                suspect,
                hops,
                answered,
            },
            true,
        );
    }

    /// Asks up to [`PROBE_WITNESSES`] nodes (the witness that just answered,
    /// then our list after the suspect) to reach `suspect` for us.
    fn start_probe(&mut self, now_ms: u64, suspect: Peer, witness: Peer) {
        let mut asked: Vec<Peer> = Vec::with_capacity(PROBE_WITNESSES);
        for w in std::iter::once(witness).chain(self.succs.iter().skip(1).copied()) {
            if asked.len() == PROBE_WITNESSES {
                break;
            }
            if w.id != self.me.id && w.id != suspect.id && !asked.iter().any(|a| a.id == w.id) {
                asked.push(w);
            }
        }
        if asked.is_empty() {
            // Nobody else to ask: the walk's evidence stands alone.
            return self.drop_first_successor(suspect);
        }
        self.next_probe_round = self.next_probe_round.wrapping_add(1);
        let round = self.next_probe_round;
        self.probe_round = Some(ProbeRound {
            id: round,
            suspect,
            outstanding: asked.len(),
            dead: 0,
            started_ms: now_ms,
        });
        self.stabilizing = true;
        for w in asked {
            self.request(
                now_ms,
                w,
                |req| Message::Probe {
                    req,
                    target: suspect,
                },
                Wait::Probe { round },
                true,
            );
        }
    }

    /// One witness's verdict on the suspect of probe round `round`: alive,
    /// gone, or no answer (`None`).
    fn probe_answered(&mut self, now_ms: u64, round: u32, alive: Option<bool>) {
        let Some(r) = self.probe_round.as_mut().filter(|r| r.id == round) else {
            return;
        };
        match alive {
            Some(true) => {
                // Alive to someone: the silence is our path's, not the node's.
                self.probe_round = None;
                self.stabilizing = false;
                self.succ_fails = (0, 0);
                return;
            }
            Some(false) => r.dead += 1,
            None => {}
        }
        r.outstanding = r.outstanding.saturating_sub(1);
        if r.outstanding == 0 {
            let r = self.probe_round.take().expect("present");
            let still_first = self.succs.first().map(|s| s.id) == Some(r.suspect.id);
            let stale = now_ms.saturating_sub(r.started_ms) >= self.cfg.suspect_ms;
            if r.dead > 0 && still_first && !stale {
                self.stabilizing = false;
                self.drop_first_successor(r.suspect);
            } else if r.dead > 0 && still_first {
                // Evidence older than a suspicion window (the round waited
                // out a silent witness) is refreshed first: still
                // stabilizing, so nothing else changes the list meanwhile.
                self.last_look_ask(now_ms, r.suspect, 1);
            } else {
                self.stabilizing = false;
            }
        }
    }

    /// Try `tries` of a [`Wait::LastLook`] at `suspect`.
    fn last_look_ask(&mut self, now_ms: u64, suspect: Peer, tries: u8) {
        self.request(
            now_ms,
            suspect,
            |req| Message::GetState { req },
            Wait::LastLook { suspect, tries },
            true,
        );
    }

    /// The answer to a [`Wait::LastLook`]: `alive` if the suspect answered
    /// as a ring member.
    fn last_look(&mut self, suspect: Peer, alive: bool) {
        self.stabilizing = false;
        if alive {
            self.succ_fails = (0, 0);
            self.succ_silent_since = None;
        } else {
            self.drop_first_successor(suspect);
        }
    }

    /// We asked `target` for `origin`: tell it what we found.
    fn probe_done(&mut self, origin: Peer, origin_req: ReqId, alive: bool) {
        self.probes_serving = self.probes_serving.saturating_sub(1);
        self.push_send(
            origin,
            Message::ProbeResult {
                req: origin_req,
                alive,
            },
        );
    }

    fn drop_first_successor(&mut self, suspect: Peer) {
        if self.succs.len() > 1 && self.succs[0].id == suspect.id {
            let s = self.succs[1..].to_vec();
            self.set_succs(s);
        }
    }

    /// Records one more timeout of a request sent at `sent_ms`; true once the
    /// peer has been silent for `suspect_ms` across at least two timeouts.
    fn suspect(state: &mut (u32, u64), sent_ms: u64, now_ms: u64, suspect_ms: u64) -> bool {
        if state.0 == 0 {
            state.1 = sent_ms;
        }
        state.0 += 1;
        if state.0 >= 2 && now_ms.saturating_sub(state.1) >= suspect_ms {
            *state = (0, 0);
            return true;
        }
        false
    }

    // ----- maintenance -------------------------------------------------------

    fn start_stabilize(&mut self, now_ms: u64) {
        match (self.succs.first().copied(), self.pred) {
            (Some(s), _) => {
                self.stabilizing = true;
                self.request(
                    now_ms,
                    s,
                    |req| Message::GetState { req },
                    Wait::Stabilize,
                    true,
                );
            }
            // Alone: our own predecessor is the "x between us and our successor".
            (None, Some(x)) => match self.cfg.protocol {
                Protocol::Zave => {
                    self.stabilizing = true;
                    self.request(
                        now_ms,
                        x,
                        |req| Message::GetState { req },
                        Wait::StabilizeCandidate,
                        true,
                    );
                }
                Protocol::Chord2001 => {
                    self.set_succs(vec![x]);
                    self.send_maintenance(x, Message::Notify);
                }
            },
            (None, None) => {}
        }
    }

    fn on_stabilize_reply(&mut self, now_ms: u64, s: Peer, x: Option<Peer>, list: &[Peer]) {
        if self.succs.first().map(|p| p.id) != Some(s.id) {
            // Our list changed while we asked (a Leaving, say): start afresh next tick.
            self.stabilizing = false;
            return;
        }
        self.succ_fails = (0, 0);
        self.succ_silent_since = None;
        // Notify only tells s what it may not know: if s already has us as
        // its predecessor there is nothing to say (a third of stabilize's
        // messages in a steady ring).
        let already_pred = x.map(|x| x.id) == Some(self.me.id);
        let x = x.filter(|x| x.id.in_open(self.me.id, s.id));
        match self.cfg.protocol {
            Protocol::Zave => {
                self.adopt_succs(std::iter::once(s).chain(list.iter().copied()));
                match x {
                    Some(x) => self.request(
                        now_ms,
                        x,
                        |req| Message::GetState { req },
                        Wait::StabilizeCandidate,
                        true,
                    ),
                    None => {
                        self.stabilizing = false;
                        if !already_pred {
                            self.send_maintenance(s, Message::Notify);
                        }
                    }
                }
            }
            Protocol::Chord2001 => {
                self.stabilizing = false;
                match x {
                    // Adopted on s's word alone; the rest of the list is kept as is.
                    Some(x) => {
                        let mut l = self.succs.to_vec();
                        l[0] = x;
                        let l = self.sanitize(l.into_iter());
                        self.set_succs(l);
                        self.send_maintenance(x, Message::Notify);
                    }
                    None => {
                        let list = self.sanitize(std::iter::once(s).chain(list.iter().copied()));
                        self.set_succs(list);
                        self.send_maintenance(s, Message::Notify);
                    }
                }
            }
        }
    }

    fn start_check_pred(&mut self, now_ms: u64) {
        if let Some(p) = self.pred {
            self.checking_pred = true;
            self.request(
                now_ms,
                p,
                |req| Message::GetState { req },
                Wait::CheckPred,
                true,
            );
        }
    }

    fn start_fix_finger(&mut self, now_ms: u64) {
        if self.far_low >= ID_BITS {
            return; // the successor list covers every finger
        }
        if self.far_cursor < self.far_low || self.far_cursor >= ID_BITS {
            self.far_cursor = ID_BITS - 1;
        }
        let i = self.far_cursor;
        self.far_cursor = if i == self.far_low {
            ID_BITS - 1
        } else {
            i - 1
        };
        self.fixing_finger = true;
        match self.fingers[i] {
            // The finger holds if its predecessor precedes the target: one
            // round trip instead of a lookup's several.
            Some(f) if f.id != self.me.id => self.request(
                now_ms,
                f,
                |req| Message::GetState { req },
                Wait::FingerCheck(i),
                true,
            ),
            _ => self.start_lookup(now_ms, self.me.id.add_pow2(i), Purpose::Finger(i)),
        }
    }

    /// The answer to a finger check: `pred` is the finger's predecessor, if
    /// it is a member and answered at all.
    fn finger_checked(&mut self, now_ms: u64, i: usize, finger: Peer, pred: Option<Option<Peer>>) {
        let target = self.me.id.add_pow2(i);
        let holds = matches!(pred, Some(Some(x)) if target.in_open_closed(x.id, finger.id));
        if holds || i < self.far_low {
            // Still right, or the successor list covers it now.
            self.fixing_finger = false;
        } else {
            self.start_lookup(now_ms, target, Purpose::Finger(i));
        }
    }

    fn rectify(&mut self, now_ms: u64, n: Peer) {
        if n.id == self.me.id {
            return;
        }
        match self.pred {
            None => self.set_pred(Some(n)),
            Some(p) if p.id == n.id => {}
            Some(p) if n.id.in_open(p.id, self.me.id) => self.set_pred(Some(n)),
            Some(p) => {
                // Zave: the old predecessor loses only if it is dead; ask it.
                if self.cfg.protocol == Protocol::Zave && !self.probing_pred {
                    self.probing_pred = true;
                    self.request(
                        now_ms,
                        p,
                        |req| Message::GetState { req },
                        Wait::RectifyProbe { candidate: n },
                        true,
                    );
                }
            }
        }
    }

    // ----- messages ------------------------------------------------------------

    fn on_message(&mut self, now_ms: u64, from: Peer, msg: Message) {
        if from.id == self.me.id {
            self.stats.dropped_unexpected += 1;
            return;
        }
        if self.pred.map(|p| p.id) == Some(from.id) {
            // Our predecessor stabilizes with us every period: that is the
            // liveness check, and a separate ping would only repeat it.
            self.pred_heard_ms = now_ms;
            self.pred_fails = (0, 0);
        }
        match msg {
            Message::GetState { req } => {
                let member = self.status == Status::Joined;
                let (pred, succs) = if member {
                    (self.pred, self.succs.clone())
                } else {
                    (None, Arc::default())
                };
                self.stats.sent_replies += 1;
                self.push_send(
                    from,
                    Message::State {
                        req,
                        member,
                        pred,
                        succs,
                    },
                );
            }
            Message::FindNext { req, key } => {
                let (succs, closer) = if self.status == Status::Joined {
                    (self.succs_or_self(), self.closest_preceding(key))
                } else {
                    (Arc::default(), Vec::new())
                };
                self.stats.sent_replies += 1;
                self.push_send(from, Message::Next { req, succs, closer });
            }
            Message::Notify => {
                if self.status == Status::Joined {
                    self.rectify(now_ms, from);
                }
            }
            Message::Leaving => {
                self.forget_finger(from.id);
                if self.succs.iter().any(|s| s.id == from.id) {
                    let l: Vec<Peer> = self
                        .succs
                        .iter()
                        .copied()
                        .filter(|s| s.id != from.id)
                        .collect();
                    if l.is_empty() {
                        self.out.push_back(Output::Event(Event::SuccessorsLost));
                    }
                    self.set_succs(l);
                }
                if self.pred.map(|p| p.id) == Some(from.id) {
                    self.set_pred(None);
                }
            }
            Message::State {
                req,
                member,
                pred,
                succs,
            } => {
                let Some(p) = self.take_pending(now_ms, req, from) else {
                    return;
                };
                if !member {
                    return self.not_a_member(now_ms, p);
                }
                let pred = pred.filter(|x| x.id != from.id);
                // A list may carry one spare entry (see [`SPARE`]): a joiner
                // whose old self is in it needs the entry after.
                let succs =
                    &succs[..Self::sanitized_len(from.id, self.cfg.successors_max + SPARE, &succs)];
                match p.wait {
                    Wait::Stabilize => self.on_stabilize_reply(now_ms, from, pred, succs),
                    Wait::StabilizeCandidate => {
                        self.stabilizing = false;
                        // One entry more than usual: see [`SPARE`].
                        let l = Self::sanitize_iter(
                            self.me.id,
                            self.cfg.successors_max + SPARE,
                            std::iter::once(from).chain(succs.iter().copied()),
                        );
                        self.set_succs(l);
                        if pred.map(|x| x.id) != Some(self.me.id) {
                            self.send_maintenance(from, Message::Notify);
                        }
                    }
                    Wait::CheckPred => {
                        self.checking_pred = false;
                        self.pred_fails = (0, 0);
                    }
                    Wait::FingerCheck(i) => self.finger_checked(now_ms, i, from, Some(pred)),
                    Wait::LastLook { suspect, .. } => self.last_look(suspect, true),
                    Wait::ConfirmDead {
                        suspect,
                        hops,
                        answered,
                    } => {
                        self.stabilizing = false;
                        let answered = answered.saturating_add(1);
                        match pred {
                            Some(x) if x.id == suspect.id => {} // alive to its successor
                            // A node between the suspect and the witness: it is
                            // the one to ask.
                            Some(x)
                                if x.id.in_open(suspect.id, from.id) && hops < CONFIRM_HOPS_MAX =>
                            {
                                self.confirm_dead(now_ms, suspect, x, hops + 1, answered)
                            }
                            // The walk from the witness back towards the suspect
                            // is longer than we will go: our list is badly stale.
                            // A suspect silent for three suspicion windows goes
                            // (the alternative, keeping it, would stall repair).
                            // Only a walk mostly made of answers counts: one
                            // that bounced between silent witnesses says
                            // nothing about the suspect.
                            Some(x) if x.id.in_open(suspect.id, from.id) => {
                                let silent_ms = self
                                    .succ_silent_since
                                    .map_or(0, |t| now_ms.saturating_sub(t));
                                if silent_ms >= 3 * self.cfg.suspect_ms
                                    && answered >= CONFIRM_HOPS_MAX / 2
                                {
                                    self.start_probe(now_ms, suspect, from);
                                }
                            }
                            // The witness has lost its predecessor: no evidence
                            // yet. Offer ourselves; if the suspect is alive it
                            // will win the witness back with its own notify.
                            None => self.send_maintenance(from, Message::Notify),
                            // The witness's predecessor now lies before the
                            // suspect: it has replaced the suspect (or we
                            // offered ourselves and nobody has won it back).
                            Some(_) => self.start_probe(now_ms, suspect, from),
                        }
                    }
                    Wait::RectifyProbe { .. } => self.probing_pred = false,
                    Wait::ProbeFor { origin, origin_req } => {
                        self.probe_done(origin, origin_req, true)
                    }
                    Wait::AskState(cmd) => self.reply(cmd, CmdResult::State(Some((true, pred)))),
                    Wait::Lookup(lid) => {
                        if let Some(run) = self.lookups.get_mut(&lid) {
                            let step = run.lookup.on_state(from, pred, succs.to_vec());
                            self.drive(now_ms, lid, step);
                        }
                    } // A State where we asked a storage question: a confused peer.
                    w => self.wrong_reply(now_ms, Pending { wait: w, ..p }),
                }
            }
            Message::Put { .. }
            | Message::PutAck { .. }
            | Message::Get { .. }
            | Message::Got { .. }
            | Message::SyncRange { .. }
            | Message::SyncReply { .. } => self.on_store_message(now_ms, from, msg),
            Message::Probe { req, target } => {
                if self.status != Status::Joined {
                    return;
                }
                if target.id == self.me.id {
                    return self.push_send(from, Message::ProbeResult { req, alive: true });
                }
                if self.probes_serving >= PROBES_SERVED_MAX || target.id == from.id {
                    self.stats.dropped_unexpected += 1;
                    return;
                }
                self.probes_serving += 1;
                self.request(
                    now_ms,
                    target,
                    |req| Message::GetState { req },
                    Wait::ProbeFor {
                        origin: from,
                        origin_req: req,
                    },
                    true,
                );
            }
            Message::ProbeResult { req, alive } => {
                let Some(p) = self.take_pending(now_ms, req, from) else {
                    return;
                };
                match p.wait {
                    Wait::Probe { round } => self.probe_answered(now_ms, round, Some(alive)),
                    w => self.wrong_reply(now_ms, Pending { wait: w, ..p }),
                }
            }
            Message::Next { req, succs, closer } => {
                let Some(p) = self.take_pending(now_ms, req, from) else {
                    return;
                };
                let Wait::Lookup(lid) = p.wait else {
                    // A Next where we asked for State: a confused or hostile peer.
                    return self.wrong_reply(now_ms, p);
                };
                // A responder alone in its ring names itself as its successor.
                let alone = succs.len() == 1 && succs[0].id == from.id;
                let mut keep = if alone {
                    1
                } else {
                    Self::sanitized_len(from.id, self.cfg.successors_max + SPARE, &succs)
                };
                let mut closer = closer;
                closer.truncate(self.cfg.closer_max);
                if let Some(run) = self.lookups.get_mut(&lid) {
                    if !self.cfg.route_via_successor_lists
                        && !matches!(run.purpose, Purpose::Join { .. })
                    {
                        keep = keep.min(1);
                    }
                    let step = run.lookup.on_next(from, &succs[..keep], &closer, false);
                    self.drive(now_ms, lid, step);
                }
            }
        }
    }

    /// Matches a reply to its request: same request id and same peer. Anything
    /// else (late, duplicated, forged) is dropped and counted.
    fn take_pending(&mut self, now_ms: u64, req: ReqId, from: Peer) -> Option<Pending> {
        match self.pending.get(req) {
            Some(p) if p.to.id == from.id => {
                let p = self.pending.remove(req).expect("present");
                // If nobody at all answered us for a suspicion window while
                // others timed out too, the silence was ours (we were cut
                // off), not our successor's.
                if now_ms.saturating_sub(self.last_reply_ms) >= self.cfg.suspect_ms
                    && self.last_other_timeout_ms > self.last_reply_ms
                    && self.succ_silent_since.is_some()
                {
                    self.succ_silent_since = Some(now_ms);
                }
                self.last_reply_ms = now_ms;
                // Storage replies include disk time and transfer time, and a
                // probe's answer waits for a third node: they would teach the
                // failure detector the wrong round trip.
                if !p.wait.is_storage() && !matches!(p.wait, Wait::Probe { .. }) {
                    self.rtt.sample(from.id, now_ms.saturating_sub(p.sent_ms));
                }
                Some(p)
            }
            _ => {
                self.stats.dropped_unexpected += 1;
                None
            }
        }
    }

    // ----- helpers ---------------------------------------------------------------

    fn request(
        &mut self,
        now_ms: u64,
        to: Peer,
        mk: impl FnOnce(ReqId) -> Message,
        wait: Wait,
        maintenance: bool,
    ) {
        debug_assert_ne!(to.id, self.me.id, "a node never sends requests to itself");
        self.next_req = self.next_req.wrapping_add(1);
        let req = self.next_req;
        let msg = mk(req);
        let mut deadline_ms = now_ms + self.rtt.timeout_ms(to.id);
        if matches!(wait, Wait::Probe { .. }) {
            // The witness waits for the suspect before it answers.
            deadline_ms += self.cfg.rto_max_ms;
        }
        if wait.is_storage() {
            // Room for the replica's disk and the transfer: a quarter second
            // plus a millisecond per KiB carried, at most store_timeout_ms.
            // A lost small write is retried elsewhere within about an RTO,
            // which keeps the window with only W copies short.
            let carried = match &msg {
                Message::Put { item, .. } => item.size() as u64,
                _ => 0,
            };
            deadline_ms += (250 + carried / 1024).min(self.cfg.store_timeout_ms);
        }
        let wait_is_storage = wait.is_storage();
        self.pending.insert(
            req,
            deadline_ms,
            Pending {
                to,
                sent_ms: now_ms,
                wait,
            },
        );
        if wait_is_storage {
            self.stats.sent_storage += 1;
        } else if maintenance {
            self.stats.sent_maintenance += 1;
        } else {
            self.stats.sent_lookup += 1;
        }
        self.push_send(to, msg);
    }

    fn send_maintenance(&mut self, to: Peer, msg: Message) {
        self.stats.sent_maintenance += 1;
        self.push_send(to, msg);
    }

    fn push_send(&mut self, to: Peer, msg: Message) {
        self.out.push_back(Output::Send { to, msg });
    }

    fn reply(&mut self, cmd: CmdId, result: CmdResult) {
        self.out.push_back(Output::Reply { cmd, result });
    }

    fn jittered(&mut self, period_ms: u64) -> u64 {
        let j = period_ms * self.cfg.jitter_permille / 1000;
        if j == 0 {
            return period_ms.max(1);
        }
        (period_ms - j + self.rng.next_u64() % (2 * j + 1)).max(1)
    }

    fn succs_or_self(&self) -> Arc<[Peer]> {
        if self.succs.is_empty() {
            Arc::new([self.me])
        } else {
            self.succs.clone()
        }
    }

    /// The known nodes that most closely precede `key`, best first.
    fn closest_preceding(&self, key: Id) -> Vec<Peer> {
        let max = self.cfg.closer_max;
        let mut c: Vec<Peer> = Vec::with_capacity(2 * max);
        // Fingers from the farthest down: the first in (me, key) is the best
        // finger, and the next distinct ones follow in order.
        let mut last: Option<NodeId> = None;
        for p in self.fingers.iter().rev().flatten() {
            if c.len() >= max {
                break;
            }
            if last == Some(p.id) {
                continue;
            }
            last = Some(p.id);
            if p.id.in_open(self.me.id, key) {
                c.push(*p);
            }
        }
        let from_list = if self.cfg.route_via_successor_lists {
            &self.succs[..]
        } else {
            &self.succs[..self.succs.len().min(1)]
        };
        for p in from_list.iter().rev() {
            if p.id.in_open(self.me.id, key) && !c.iter().any(|x| x.id == p.id) {
                c.push(*p);
                if c.len() >= 2 * max {
                    break;
                }
            }
        }
        c.sort_by_key(|p| p.id.distance_to(key));
        c.truncate(max);
        c
    }

    fn sanitize(&self, list: impl Iterator<Item = Peer>) -> Vec<Peer> {
        Self::sanitize_iter(self.me.id, self.cfg.successors_max, list)
    }

    /// How much of `list` (a list `origin` sent) `sanitize_iter` would keep:
    /// the same cut, read in place.
    fn sanitized_len(origin: NodeId, max: usize, list: &[Peer]) -> usize {
        let mut keep = 0;
        let mut prev = Id::ZERO;
        for p in list.iter().take(max) {
            let d = origin.distance_to(p.id);
            if d == Id::ZERO || (keep > 0 && d <= prev) {
                break;
            }
            prev = d;
            keep += 1;
        }
        keep
    }

    /// Keeps the prefix of `list` that is in strict ring order after `origin`
    /// (no duplicates, never `origin` itself), at most `max` long. A correct
    /// peer's list passes whole; a wrapped or forged one is cut where it breaks.
    fn sanitize_iter(origin: NodeId, max: usize, list: impl Iterator<Item = Peer>) -> Vec<Peer> {
        Self::sanitize_onto(origin, max, Vec::with_capacity(max), Id::ZERO, list)
    }

    /// `sanitize_iter` continued: `out` is an already sanitized prefix whose
    /// last entry lies `prev` after `origin`.
    fn sanitize_onto(
        origin: NodeId,
        max: usize,
        mut out: Vec<Peer>,
        mut prev: Id,
        list: impl Iterator<Item = Peer>,
    ) -> Vec<Peer> {
        for p in list {
            if out.len() >= max {
                break;
            }
            let d = origin.distance_to(p.id);
            if d == Id::ZERO || (!out.is_empty() && d <= prev) {
                break;
            }
            prev = d;
            out.push(p);
        }
        out
    }

    /// `set_succs(self.sanitize(list))`, without building a new list while
    /// the sanitized one matches ours: in a steady ring that is nearly every
    /// stabilize reply, and the list is `r` peers long.
    fn adopt_succs(&mut self, mut list: impl Iterator<Item = Peer>) {
        let max = self.cfg.successors_max;
        let origin = self.me.id;
        let mut prev = Id::ZERO;
        let mut k = 0;
        while k < max {
            let Some(p) = list.next() else { break };
            let d = origin.distance_to(p.id);
            if d == Id::ZERO || (k > 0 && d <= prev) {
                break;
            }
            if self.succs.get(k) != Some(&p) {
                let mut out = Vec::with_capacity(max);
                out.extend_from_slice(&self.succs[..k]);
                out.push(p);
                let out = Self::sanitize_onto(origin, max, out, d, list);
                self.set_succs(out);
                return;
            }
            prev = d;
            k += 1;
        }
        if k != self.succs.len() {
            let out = self.succs[..k].to_vec();
            self.set_succs(out);
        }
    }

    fn set_succs(&mut self, succs: Vec<Peer>) {
        debug_assert!(succs.len() <= self.cfg.successors_max + SPARE);
        debug_assert!(succs.iter().all(|p| p.id != self.me.id));
        if succs[..] != self.succs[..] {
            if self.succs.first().map(|s| s.id) != succs.first().map(|s| s.id) {
                self.succ_fails = (0, 0);
                self.succ_silent_since = None;
            }
            self.succs = succs.into();
            self.ring_version += 1;
            self.refresh_fingers_from_succs();
        }
    }

    fn set_pred(&mut self, pred: Option<Peer>) {
        let pred = pred.filter(|p| p.id != self.me.id);
        if pred != self.pred {
            // A new predecessor changes our primary range: sync it soon.
            self.store.sync_soon = true;
            self.pred = pred;
            self.pred_fails = (0, 0);
            self.ring_version += 1;
        }
    }

    /// Fingers whose targets fall inside the successor list's span are read off
    /// the list; only the far ones need lookups.
    fn refresh_fingers_from_succs(&mut self) {
        let mut j = 0;
        let mut prev = self.me.id;
        let mut i = 0;
        while i < ID_BITS {
            let t = self.me.id.add_pow2(i);
            while j < self.succs.len() && !t.in_open_closed(prev, self.succs[j].id) {
                prev = self.succs[j].id;
                j += 1;
            }
            if j >= self.succs.len() {
                break;
            }
            self.fingers[i] = Some(self.succs[j]);
            i += 1;
        }
        self.far_low = i;
        // Far fingers that now point inside the list's span are stale copies.
        for f in self.fingers[i..].iter_mut() {
            if f.map(|p| p.id == self.me.id).unwrap_or(false) {
                *f = None;
            }
        }
    }

    /// Drops a silent peer from the far fingers. Fingers read off the successor
    /// list stay: the list has its own, slower failure detector.
    fn forget_finger(&mut self, id: NodeId) {
        for f in self.fingers[self.far_low..].iter_mut() {
            if f.map(|p| p.id) == Some(id) {
                *f = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Addr;

    fn peer(v: u128) -> Peer {
        Peer {
            id: Id::from_u128(v),
            addr: Addr::Slot(v as u32),
        }
    }

    fn cfg() -> Config {
        Config {
            successors_max: 3,
            ..Config::default()
        }
    }

    fn drain(n: &mut Node) -> Vec<Output> {
        std::iter::from_fn(|| n.poll_output()).collect()
    }

    /// `from`, a member, answers our request `req` with its predecessor
    /// and successor list.
    fn deliver_state(
        n: &mut Node,
        now: u64,
        from: Peer,
        req: ReqId,
        pred: Option<Peer>,
        succs: Vec<Peer>,
    ) {
        let msg = Message::State {
            req,
            member: true,
            pred,
            succs: succs.into(),
        };
        n.handle(now, Input::Message { from, msg });
    }

    /// `from` answers our request `req`: it is not in a ring.
    fn deliver_not_member(n: &mut Node, now: u64, from: Peer, req: ReqId) {
        let msg = Message::State {
            req,
            member: false,
            pred: None,
            succs: Arc::default(),
        };
        n.handle(now, Input::Message { from, msg });
    }

    #[test]
    fn sanitize_cuts_at_wrap_duplicates_and_self() {
        let me = Id::from_u128(10);
        let l = vec![peer(20), peer(30), peer(30), peer(40)];
        assert_eq!(
            Node::sanitize_iter(me, 8, l.into_iter()),
            vec![peer(20), peer(30)]
        );
        // 5 lies past the wrap, so after 20 going clockwise from 10; 40 then breaks order.
        let l = vec![peer(20), peer(5), peer(40)];
        assert_eq!(
            Node::sanitize_iter(me, 8, l.into_iter()),
            vec![peer(20), peer(5)]
        );
        let l = vec![peer(20), peer(10), peer(40)];
        assert_eq!(Node::sanitize_iter(me, 8, l.into_iter()), vec![peer(20)]);
        let l = vec![peer(20), peer(30), peer(40), peer(50)];
        assert_eq!(Node::sanitize_iter(me, 3, l.into_iter()).len(), 3);
    }

    proptest::proptest! {
        /// The in-place shortcuts cut and adopt exactly what the plain
        /// sanitize would: `sanitized_len` its length, `adopt_succs` its
        /// list, and the ring version moves only when the list changes.
        #[test]
        fn adopting_in_place_matches_sanitize(
            own in proptest::collection::vec(0u128..64, 0..8),
            incoming in proptest::collection::vec(0u128..64, 0..10),
            max in 1usize..8,
        ) {
            let me = Id::from_u128(10);
            let incoming: Vec<Peer> = incoming.into_iter().map(peer).collect();
            let want = Node::sanitize_iter(me, max, incoming.iter().copied());
            proptest::prop_assert_eq!(Node::sanitized_len(me, max, &incoming), want.len());
            let mut n = Node::new(
                Config { successors_max: max, ..Config::default() },
                peer(10),
                1,
            );
            let own = Node::sanitize_iter(me, max, own.into_iter().map(peer));
            n.set_succs(own.clone());
            let v0 = n.ring_version();
            n.adopt_succs(incoming.iter().copied());
            proptest::prop_assert_eq!(n.successors(), &want[..]);
            proptest::prop_assert_eq!(n.ring_version() != v0, own != want);
        }
    }

    /// Node 10 with list `succs` and predecessor `pred` stabilizes; its
    /// successor 30 answers that its predecessor is 20, between them.
    fn told_of_20_by_30(succs: Vec<Peer>, pred: Peer) -> Node {
        let mut n = Node::new(cfg(), peer(10), 1);
        n.bootstrap(0, succs, Some(pred), None);
        drain(&mut n);
        n.handle(0, Input::Command(1, Command::Stabilize));
        let req = state_req(&drain(&mut n), peer(30));
        deliver_state(
            &mut n,
            5,
            peer(30),
            req,
            Some(peer(20)),
            vec![peer(40), peer(50)],
        );
        n
    }

    #[test]
    fn stabilize_queries_candidate_before_adopting() {
        // 30 says its predecessor is 20, between us: we must ask 20 first.
        let mut n = told_of_20_by_30(vec![peer(30), peer(40)], peer(50));
        assert_eq!(n.successors(), &[peer(30), peer(40), peer(50)]);
        let out = drain(&mut n);
        assert!(out.iter().any(
            |o| matches!(o, Output::Send { to, msg: Message::GetState { .. } } if *to == peer(20))
        ));
        // 20 never answers: the list stays, and 30 is notified.
        n.handle(100_000, Input::Timeout);
        assert_eq!(n.successors()[0], peer(30));
        let out = drain(&mut n);
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Send { to, msg: Message::Notify } if *to == peer(30))));
    }

    /// The request id of the `GetState` just sent to `to`.
    fn state_req(out: &[Output], to: Peer) -> ReqId {
        out.iter()
            .find_map(|o| match o {
                Output::Send {
                    to: t,
                    msg: Message::GetState { req },
                } if *t == to => Some(*req),
                _ => None,
            })
            .expect("a state request to that peer")
    }

    /// Node 10 (r = 3) with [30, 40, 50] hears from 30 of a closer node,
    /// 20, and adopts 20 with 20's list [30, 40, 45].
    fn adopted_closer_node() -> Node {
        let mut n = told_of_20_by_30(vec![peer(30), peer(40), peer(50)], peer(5));
        let req = state_req(&drain(&mut n), peer(20));
        deliver_state(
            &mut n,
            10,
            peer(20),
            req,
            Some(peer(10)),
            vec![peer(30), peer(40), peer(45)],
        );
        n
    }

    #[test]
    fn a_closer_node_is_adopted_with_one_spare_entry_of_its_list() {
        // Found by the simulator (24 nodes, r = 2): the closer node's answer
        // was stale, it and the first entry of its list had left by the time
        // it arrived, and the entry that r cut off was the only live one.
        // The spare comes from 20's list (45), never from ours (50): a list
        // may skip only what its source skipped.
        let mut n = adopted_closer_node();
        assert_eq!(n.successors(), &[peer(20), peer(30), peer(40), peer(45)]);

        // 20 answers the next stabilize: the list is r long again.
        n.handle(1_000, Input::Command(2, Command::Stabilize));
        let req = state_req(&drain(&mut n), peer(20));
        deliver_state(
            &mut n,
            1_005,
            peer(20),
            req,
            Some(peer(10)),
            vec![peer(30), peer(40), peer(45)],
        );
        assert_eq!(n.successors(), &[peer(20), peer(30), peer(40)]);
    }

    #[test]
    fn the_spare_entry_carries_a_node_whose_other_entries_all_failed() {
        // 20, 30 and 40 fail right after 10 adopted [20, 30, 40, 45]: only
        // the spare, 45, and the predecessor, 5, still answer. Without the
        // spare, 10 would hold r dead entries and no way round them.
        let mut n = adopted_closer_node();
        let (mut t, mut next_round, mut round) = (10, 1_000, 2);
        for _ in 0..100_000 {
            if n.successors().first() == Some(&peer(45)) {
                break;
            }
            let next = n.poll_timeout().unwrap_or(u64::MAX).min(next_round);
            t = t.max(next);
            if t >= next_round {
                n.handle(t, Input::Command(round, Command::Stabilize));
                (round, next_round) = (round + 1, next_round + 1_000);
            } else {
                n.handle(t, Input::Timeout);
            }
            // 45 and 5 answer at once; the failed nodes never do.
            loop {
                let out = drain(&mut n);
                if out.is_empty() {
                    break;
                }
                for o in out {
                    let Output::Send { to, msg } = o else {
                        continue;
                    };
                    let (pred, succs) = match to {
                        p if p == peer(45) => (peer(10), vec![peer(60), peer(5)]),
                        p if p == peer(5) => (peer(60), vec![peer(10), peer(45)]),
                        _ => continue,
                    };
                    let reply = match msg {
                        Message::GetState { req } => Message::State {
                            req,
                            member: true,
                            pred: Some(pred),
                            succs: succs.into(),
                        },
                        Message::FindNext { req, .. } => Message::Next {
                            req,
                            succs: succs.into(),
                            closer: Vec::new(),
                        },
                        // They cannot reach the failed nodes either.
                        Message::Probe { req, .. } => Message::ProbeResult { req, alive: false },
                        _ => continue,
                    };
                    n.handle(
                        t + 1,
                        Input::Message {
                            from: to,
                            msg: reply,
                        },
                    );
                }
            }
        }
        assert_eq!(
            n.successors().first(),
            Some(&peer(45)),
            "still {:?} at {t} ms",
            n.successors()
        );
    }

    #[test]
    fn silence_from_list_entries_does_not_restart_the_successor_clock() {
        // Found by the simulator (32 nodes, r = 3): a node whose first two
        // entries had crashed took the witness's silence for its own (cut
        // off), restarted the clock every round and kept a dead successor
        // for good. Silence from the list itself is no sign of being cut off.
        let mut n = Node::new(cfg(), peer(10), 1);
        n.bootstrap(0, vec![peer(30), peer(40), peer(50)], Some(peer(5)), None);
        drain(&mut n);
        // Our predecessor, 5, answers at once; 30, 40 and 50 never do.
        let step = |n: &mut Node, t: u64, input: Input| {
            n.handle(t, input);
            let out = drain(n);
            for o in &out {
                if let Output::Send {
                    to,
                    msg: Message::GetState { req },
                } = o
                {
                    if *to == peer(5) {
                        deliver_state(n, t + 1, peer(5), *req, None, vec![peer(10)]);
                    }
                }
            }
            out
        };
        let suspect = n.cfg.suspect_ms;
        let mut t = 0;
        // 30 silent through two stabilize rounds a suspicion window apart:
        // its check asks the next entry, 40.
        let mut out = Vec::new();
        for round in 1..=2 {
            step(&mut n, t, Input::Command(round, Command::Stabilize));
            t += suspect + 1;
            out = step(&mut n, t, Input::Timeout);
        }
        let since = n.succ_silent_since.expect("30 is suspected");
        state_req(&out, peer(40));
        // 40 is silent, and our predecessor's next answer comes a
        // suspicion window after its last.
        t += suspect + 1;
        assert!(
            n.last_reply_ms + suspect <= t + 1,
            "the test needs a quiet spell"
        );
        step(&mut n, t, Input::Timeout);
        assert_eq!(n.last_reply_ms, t + 1, "5 answered");
        assert_eq!(n.succ_silent_since, Some(since));
    }

    #[test]
    fn chord2001_adopts_unqueried_predecessor() {
        let mut n = Node::new(
            Config {
                protocol: Protocol::Chord2001,
                ..cfg()
            },
            peer(10),
            1,
        );
        n.bootstrap(0, vec![peer(30), peer(40)], Some(peer(50)), None);
        drain(&mut n);
        n.handle(0, Input::Command(1, Command::Stabilize));
        let req = drain(&mut n)
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    msg: Message::GetState { req },
                    ..
                } => Some(*req),
                _ => None,
            })
            .unwrap();
        deliver_state(&mut n, 5, peer(30), req, Some(peer(20)), vec![peer(40)]);
        assert_eq!(n.successors()[0], peer(20));
    }

    #[test]
    fn replies_from_the_wrong_peer_are_dropped() {
        let mut n = Node::new(cfg(), peer(10), 1);
        n.bootstrap(0, vec![peer(30)], Some(peer(50)), None);
        drain(&mut n);
        n.handle(0, Input::Command(1, Command::Stabilize));
        let req = drain(&mut n)
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    msg: Message::GetState { req },
                    ..
                } => Some(*req),
                _ => None,
            })
            .unwrap();
        deliver_state(&mut n, 1, peer(99), req, Some(peer(20)), vec![peer(40)]);
        assert_eq!(n.successors(), &[peer(30)]);
        assert_eq!(n.stats().dropped_unexpected, 1);
    }

    #[test]
    fn rectify_replaces_only_a_dead_predecessor() {
        let mut n = Node::new(cfg(), peer(100), 1);
        n.bootstrap(0, vec![peer(200)], Some(peer(90)), None);
        // Only the probes of this test, no periodic checks.
        n.handle(0, Input::Command(9, Command::SetMaintenance(false)));
        drain(&mut n);
        // 50 is not between 90 and 100: probe 90 instead of taking 50.
        n.handle(
            1,
            Input::Message {
                from: peer(50),
                msg: Message::Notify,
            },
        );
        assert_eq!(n.predecessor(), Some(peer(90)));
        let req = drain(&mut n)
            .iter()
            .find_map(|o| match o {
                Output::Send {
                    to,
                    msg: Message::GetState { req },
                } if *to == peer(90) => Some(*req),
                _ => None,
            })
            .expect("probes the old predecessor");
        deliver_state(&mut n, 2, peer(90), req, None, vec![]);
        assert_eq!(n.predecessor(), Some(peer(90)));
        // Now 90 stays silent. One timeout is not enough (a lost message)...
        n.handle(
            3,
            Input::Message {
                from: peer(50),
                msg: Message::Notify,
            },
        );
        drain(&mut n);
        n.handle(10_000, Input::Timeout);
        assert_eq!(n.predecessor(), Some(peer(90)));
        // ...but silence across the suspicion window is: 50 takes its place.
        n.handle(
            20_000,
            Input::Message {
                from: peer(50),
                msg: Message::Notify,
            },
        );
        drain(&mut n);
        n.handle(30_000, Input::Timeout);
        assert_eq!(n.predecessor(), Some(peer(50)));
    }

    #[test]
    fn fingers_inside_successor_span_come_from_the_list() {
        let mut n = Node::new(cfg(), peer(0), 1);
        n.bootstrap(0, vec![peer(3), peer(8), peer(1000)], None, None);
        let f = n.fingers();
        assert_eq!(f[0], Some(peer(3))); // target 1
        assert_eq!(f[1], Some(peer(3))); // target 2
        assert_eq!(f[2], Some(peer(8))); // target 4
        assert_eq!(f[3], Some(peer(8))); // target 8
        assert_eq!(f[4], Some(peer(1000))); // target 16
        assert_eq!(f[9], Some(peer(1000))); // target 512
        assert_eq!(f[10], None); // target 1024: beyond the list
    }

    /// Node 0 with the list [3, 8, 1000] and far finger 159 at `f`; runs
    /// its first fix-fingers tick and returns what it sent.
    fn fix_tick_with_far_finger(f: Peer) -> (Node, Vec<(Peer, Message)>) {
        let mut fingers = vec![None; ID_BITS];
        fingers[159] = Some(f);
        let mut n = Node::new(cfg(), peer(0), 1);
        n.bootstrap(0, vec![peer(3), peer(8), peer(1000)], None, Some(fingers));
        drain(&mut n);
        n.handle(10 * Config::default().fix_fingers_ms, Input::Timeout);
        let sent = drain(&mut n)
            .into_iter()
            .filter_map(|o| match o {
                Output::Send { to, msg } => Some((to, msg)),
                _ => None,
            })
            .collect();
        (n, sent)
    }

    fn far(offset: i64) -> Peer {
        let base = Id::ZERO.add_pow2(159);
        let id = if offset >= 0 {
            base.wrapping_add(Id::from_u128(offset as u128))
        } else {
            base.wrapping_sub(Id::from_u128(offset.unsigned_abs() as u128))
        };
        Peer {
            id,
            addr: Addr::Slot((7_000 + offset) as u32),
        }
    }

    #[test]
    fn a_far_finger_that_still_holds_costs_one_round_trip() {
        let f = far(5);
        let (mut n, sent) = fix_tick_with_far_finger(f);
        let req = sent
            .iter()
            .find_map(|(to, m)| match m {
                Message::GetState { req } if to.id == f.id => Some(*req),
                _ => None,
            })
            .expect("the finger is asked for its state");
        assert!(!sent
            .iter()
            .any(|(_, m)| matches!(m, Message::FindNext { .. })));
        // Its predecessor precedes the target 2^159: the finger is right.
        deliver_state(&mut n, 20_000, f, req, Some(far(-1)), vec![]);
        let after = drain(&mut n);
        assert!(
            !after.iter().any(|o| matches!(o, Output::Send { .. })),
            "no lookup follows: {after:?}"
        );
        assert_eq!(n.fingers()[159], Some(f));
    }

    #[test]
    fn a_stale_or_departed_far_finger_is_looked_up() {
        let target = Id::ZERO.add_pow2(159);
        let looked_up = |out: Vec<Output>| {
            out.iter().any(|o| {
                matches!(o, Output::Send { msg: Message::FindNext { key, .. }, .. } if *key == target)
            })
        };
        // The finger's request, if it is under way.
        let f = far(5);
        let asked = |n: &Node| {
            n.pending
                .iter()
                .find(|(_, p)| p.to.id == f.id && matches!(p.wait, Wait::FingerCheck(159)))
                .map(|(r, _)| (r, n.pending.deadline(r).expect("waiting")))
                .expect("the finger is asked")
        };
        // A node joined between the target and the finger.
        let (mut n, _) = fix_tick_with_far_finger(f);
        let (req, _) = asked(&n);
        deliver_state(&mut n, 20_000, f, req, Some(far(2)), vec![]);
        assert!(looked_up(drain(&mut n)), "a closer node means a lookup");
        // The finger left the ring.
        let (mut n, _) = fix_tick_with_far_finger(f);
        let (req, _) = asked(&n);
        deliver_not_member(&mut n, 20_000, f, req);
        assert!(
            looked_up(drain(&mut n)),
            "a finger out of the ring means a lookup"
        );
        // The finger is silent.
        let (mut n, _) = fix_tick_with_far_finger(f);
        let (_, deadline) = asked(&n);
        n.handle(deadline, Input::Timeout);
        assert!(looked_up(drain(&mut n)), "a silent finger means a lookup");
    }

    #[test]
    fn garbage_replies_never_panic() {
        let mut n = Node::new(cfg(), peer(10), 1);
        n.bootstrap(0, vec![peer(30)], Some(peer(5)), None);
        for req in 0..50u64 {
            for msg in [
                Message::State {
                    req,
                    member: true,
                    pred: Some(peer(10)),
                    succs: vec![peer(10); 100].into(),
                },
                Message::Next {
                    req,
                    succs: vec![peer(1); 100].into(),
                    closer: vec![peer(2); 100],
                },
                Message::Leaving,
                Message::Notify,
            ] {
                n.handle(
                    req,
                    Input::Message {
                        from: peer(30),
                        msg,
                    },
                );
            }
        }
        assert!(n.successors().len() <= 3);
        assert!(n.successors().iter().all(|p| p.id != n.me().id));
    }

    #[test]
    fn a_join_through_another_entry_replaces_the_one_under_way() {
        // 10 and 20 form a ring; 15 first tries to join through 99, which
        // never answers, then through 10.
        let mut w = quiet_ring(&[10, 20]);
        let mut n = Node::new(cfg(), peer(15), 15);
        n.handle(0, Input::Command(1, Command::Join { via: peer(99) }));
        let first = drain(&mut n);
        assert!(
            first
                .iter()
                .any(|o| matches!(o, Output::Send { to, .. } if *to == peer(99))),
            "asks 99 first"
        );
        assert_eq!(n.status(), Status::Joining);
        n.handle(10, Input::Command(2, Command::Join { via: peer(10) }));
        let out = drain(&mut n);
        assert!(
            out.iter().any(|o| matches!(
                o,
                Output::Reply {
                    cmd: 1,
                    result: CmdResult::Refused(_)
                }
            )),
            "the first join's command is answered: {out:?}"
        );
        // Deliver the new join's messages between 15 and the ring.
        let mut joined = false;
        let mut pending: Vec<Output> = out;
        for _ in 0..50 {
            let mut next = Vec::new();
            for o in pending.drain(..) {
                match o {
                    Output::Send { to, msg } => {
                        if let Some(m) = w.get_mut(&to.id) {
                            m.handle(
                                20,
                                Input::Message {
                                    from: peer(15),
                                    msg,
                                },
                            );
                            for r in drain(m) {
                                if let Output::Send { to, msg } = r {
                                    if to.id == Id::from_u128(15) {
                                        n.handle(20, Input::Message { from: m.me(), msg });
                                    }
                                }
                            }
                            next.extend(drain(&mut n));
                        }
                    }
                    Output::Reply {
                        cmd: 2,
                        result: CmdResult::Joined { .. },
                    } => joined = true,
                    _ => {}
                }
            }
            if next.is_empty() {
                break;
            }
            pending = next;
        }
        assert!(joined, "the second join completes");
        assert_eq!(n.status(), Status::Joined);
        assert_eq!(n.successors()[0], peer(20));
    }

    // ----- the indirect probe ------------------------------------------------

    /// Four nodes in a ring, maintenance off: only what a test asks for runs.
    fn quiet_ring(ids: &[u128]) -> BTreeMap<Id, Node> {
        let mut w = BTreeMap::new();
        for (i, &me) in ids.iter().enumerate() {
            let succs = (1..ids.len())
                .map(|k| peer(ids[(i + k) % ids.len()]))
                .take(3)
                .collect();
            let pred = peer(ids[(i + ids.len() - 1) % ids.len()]);
            let mut n = Node::new(cfg(), peer(me), me as u64);
            n.bootstrap(0, succs, Some(pred), None);
            n.handle(0, Input::Command(0, Command::SetMaintenance(false)));
            drain(&mut n);
            w.insert(Id::from_u128(me), n);
        }
        w
    }

    /// Delivers messages until none are left, except those between `a` and
    /// `b` (a clogged path), which are lost. Returns how many were delivered.
    fn pump(w: &mut BTreeMap<Id, Node>, now_ms: u64, clog: (u128, u128)) -> usize {
        let (a, b) = (Id::from_u128(clog.0), Id::from_u128(clog.1));
        let mut delivered = 0;
        for _ in 0..1000 {
            let mut sends = Vec::new();
            for (id, n) in w.iter_mut() {
                for o in drain(n) {
                    if let Output::Send { to, msg } = o {
                        sends.push((n.me(), *id, to, msg));
                    }
                }
            }
            if sends.is_empty() {
                return delivered;
            }
            for (from, fid, to, msg) in sends {
                let clogged = (fid == a && to.id == b) || (fid == b && to.id == a);
                if let (false, Some(n)) = (clogged, w.get_mut(&to.id)) {
                    delivered += 1;
                    n.handle(now_ms, Input::Message { from, msg });
                }
            }
        }
        panic!("messages still flowing after 1000 rounds");
    }

    /// Runs stabilize rounds on `who` (each followed by the timeout of its
    /// request) until its first successor changes or `rounds` run out.
    fn stabilize_rounds(
        w: &mut BTreeMap<Id, Node>,
        who: u128,
        mut now_ms: u64,
        rounds: usize,
        clog: (u128, u128),
    ) -> u64 {
        let id = Id::from_u128(who);
        let first = w[&id].successors()[0];
        for _ in 0..rounds {
            let n = w.get_mut(&id).expect("in the world");
            n.handle(now_ms, Input::Command(1, Command::Stabilize));
            pump(w, now_ms, clog);
            now_ms += 10_000;
            // Everyone else's requests expire first (a witness answers its
            // probe before the asker gives up on it).
            for (other, n) in w.iter_mut() {
                if *other != id {
                    n.handle(now_ms, Input::Timeout);
                }
            }
            pump(w, now_ms, clog);
            w.get_mut(&id)
                .expect("in the world")
                .handle(now_ms, Input::Timeout);
            pump(w, now_ms, clog);
            if w[&id].successors()[0] != first {
                break;
            }
        }
        now_ms
    }

    #[test]
    fn a_successor_behind_a_clogged_path_is_kept() {
        // 10 cannot reach 30, everyone else can; 40 has just joined and has
        // no predecessor yet, so it takes 10's notify (the case that once
        // made 10 drop a live 30 on 40's word alone).
        let mut w = quiet_ring(&[10, 30, 40, 50]);
        w.get_mut(&Id::from_u128(40)).unwrap().pred = None;
        stabilize_rounds(&mut w, 10, 0, 12, (10, 30));
        let n = &w[&Id::from_u128(10)];
        assert_eq!(n.successors()[0], peer(30), "a live successor was dropped");
        assert_eq!(w[&Id::from_u128(40)].predecessor(), Some(peer(10)));
        assert!(n.stats().timeouts >= 4, "the clog never bit");
        // The probes did run: 40 and 50 reached 30 for 10.
        assert_eq!(w[&Id::from_u128(40)].probes_serving, 0);
        assert!(n.probe_round.is_none() && !n.stabilizing);
    }

    #[test]
    fn a_successor_gone_for_everyone_is_dropped() {
        // 30 has crashed: the witnesses cannot reach it either.
        let mut w = quiet_ring(&[10, 30, 40, 50]);
        w.remove(&Id::from_u128(30));
        w.get_mut(&Id::from_u128(40)).unwrap().pred = None;
        stabilize_rounds(&mut w, 10, 0, 12, (0, 0));
        assert!(
            w[&Id::from_u128(40)].stats().timeouts > 0,
            "no witness tried 30"
        );
        assert_eq!(w[&Id::from_u128(10)].successors()[0], peer(40));
    }

    /// Drives a lone node (successors 30, 40, 50; 30 silent) to the point
    /// where it asks others to probe 30, and returns the probes it sent.
    fn origin_probing() -> (Node, Vec<(Peer, ReqId)>, u64) {
        let mut n = Node::new(cfg(), peer(10), 1);
        n.bootstrap(0, vec![peer(30), peer(40), peer(50)], Some(peer(5)), None);
        n.handle(0, Input::Command(0, Command::SetMaintenance(false)));
        drain(&mut n);
        let mut now = 0;
        for _ in 0..2 {
            n.handle(now, Input::Command(1, Command::Stabilize));
            drain(&mut n);
            now += 10_000;
            n.handle(now, Input::Timeout);
        }
        // The walk asks 40, which names a predecessor before 30.
        let req = drain(&mut n)
            .into_iter()
            .find_map(|o| match o {
                Output::Send {
                    to,
                    msg: Message::GetState { req },
                } if to == peer(40) => Some(req),
                _ => None,
            })
            .expect("asks the next entry about 30");
        deliver_state(&mut n, now, peer(40), req, Some(peer(10)), vec![peer(50)]);
        let probes: Vec<(Peer, ReqId)> = drain(&mut n)
            .into_iter()
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    msg: Message::Probe { req, target },
                } => {
                    assert_eq!(target, peer(30));
                    Some((to, req))
                }
                _ => None,
            })
            .collect();
        (n, probes, now)
    }

    fn result(n: &mut Node, now: u64, (to, req): (Peer, ReqId), alive: bool) {
        n.handle(
            now,
            Input::Message {
                from: to,
                msg: Message::ProbeResult { req, alive },
            },
        );
    }

    #[test]
    fn the_probe_asks_the_witness_then_the_rest_of_the_list() {
        let (n, probes, _) = origin_probing();
        let to: Vec<Peer> = probes.iter().map(|p| p.0).collect();
        assert_eq!(to, vec![peer(40), peer(50)]);
        assert_eq!(
            n.successors()[0],
            peer(30),
            "nothing dropped before the verdict"
        );
        assert!(n.stabilizing, "no new round while the probe runs");
    }

    #[test]
    fn one_alive_answer_keeps_the_suspect() {
        let (mut n, probes, now) = origin_probing();
        result(&mut n, now + 1, probes[0], false);
        result(&mut n, now + 2, probes[1], true);
        assert_eq!(n.successors()[0], peer(30));
        assert!(!n.stabilizing && n.probe_round.is_none());
    }

    /// The last look at 30 after a dead verdict: its request and deadline.
    fn last_look_sent(n: &mut Node) -> (ReqId, u64) {
        assert_eq!(n.successors()[0], peer(30), "kept until the last look");
        assert!(n.stabilizing, "nothing else changes the list meanwhile");
        let req = drain(n)
            .into_iter()
            .find_map(|o| match o {
                Output::Send {
                    to,
                    msg: Message::GetState { req },
                } if to == peer(30) => Some(req),
                _ => None,
            })
            .expect("the suspect is asked once more");
        (req, n.pending.deadline(req).expect("asked"))
    }

    /// A dead verdict whose other witness never answers, then a first last
    /// look at 30 that times out: the node and that look's deadline.
    fn last_look_missed_once() -> (Node, u64) {
        let (mut n, probes, now) = origin_probing();
        result(&mut n, now + 1, probes[0], false);
        assert_eq!(n.successors()[0], peer(30), "waits for every witness");
        n.handle(now + 60_000, Input::Timeout);
        let (_, deadline) = last_look_sent(&mut n);
        n.handle(deadline, Input::Timeout);
        (n, deadline)
    }

    #[test]
    fn a_dead_verdict_with_no_alive_answer_drops_the_suspect() {
        // The other witness never answers; nor does 30, asked once more
        // (twice: one lost reply is not a death).
        let (mut n, _) = last_look_missed_once();
        assert_eq!(n.successors()[0], peer(30), "one silent try keeps it");
        assert!(n.stabilizing);
        let (_, deadline) = last_look_sent(&mut n);
        n.handle(deadline, Input::Timeout);
        assert_eq!(n.successors()[0], peer(40));
        assert!(!n.stabilizing);
    }

    #[test]
    fn a_last_look_answered_on_the_second_try_keeps_the_suspect() {
        let (mut n, deadline) = last_look_missed_once();
        let (req, _) = last_look_sent(&mut n);
        deliver_state(&mut n, deadline + 1, peer(30), req, None, vec![peer(40)]);
        assert_eq!(n.successors()[0], peer(30));
        assert!(!n.stabilizing);
    }

    #[test]
    fn a_suspect_back_in_the_ring_by_the_verdict_stays() {
        // 30 restarted and joined again while the round waited out a witness.
        let (mut n, probes, now) = origin_probing();
        result(&mut n, now + 1, probes[0], false);
        n.handle(now + 60_000, Input::Timeout);
        let (req, _) = last_look_sent(&mut n);
        deliver_state(&mut n, now + 60_001, peer(30), req, None, vec![peer(40)]);
        assert_eq!(n.successors()[0], peer(30));
        assert!(!n.stabilizing);
        // Out of the ring (still joining): it goes.
        let (mut n, probes, now) = origin_probing();
        result(&mut n, now + 1, probes[0], false);
        n.handle(now + 60_000, Input::Timeout);
        let (req, _) = last_look_sent(&mut n);
        deliver_not_member(&mut n, now + 60_001, peer(30), req);
        assert_eq!(n.successors()[0], peer(40));
        assert!(!n.stabilizing);
    }

    #[test]
    fn silence_from_every_witness_is_no_evidence() {
        let (mut n, _, now) = origin_probing();
        n.handle(now + 60_000, Input::Timeout);
        assert_eq!(n.successors()[0], peer(30));
        assert!(!n.stabilizing && n.probe_round.is_none());
    }

    #[test]
    fn a_wrong_kind_of_reply_fails_the_request_instead_of_wedging_it() {
        let (mut n, probes, now) = origin_probing();
        let (to, req) = probes[1];
        // 50 answers the probe with a State: counted, and taken as no answer.
        deliver_state(&mut n, now + 1, to, req, None, vec![]);
        assert_eq!(n.stats().dropped_unexpected, 1);
        // A verdict within a suspicion window of the round's start: at once.
        result(&mut n, now + 2, probes[0], false);
        assert_eq!(n.successors()[0], peer(40));
        assert!(!n.stabilizing, "stabilization moves on");
    }

    /// A witness (40) asked by 10 to reach 30, and what it sends.
    fn witness_asked(target: u128) -> (Node, Vec<Output>) {
        let mut n = Node::new(cfg(), peer(40), 4);
        n.bootstrap(0, vec![peer(50), peer(10)], Some(peer(30)), None);
        n.handle(0, Input::Command(0, Command::SetMaintenance(false)));
        drain(&mut n);
        n.handle(
            1,
            Input::Message {
                from: peer(10),
                msg: Message::Probe {
                    req: 77,
                    target: peer(target),
                },
            },
        );
        let out = drain(&mut n);
        (n, out)
    }

    fn probe_result_to_10(out: &[Output]) -> Option<bool> {
        out.iter().find_map(|o| match o {
            Output::Send {
                to,
                msg: Message::ProbeResult { req: 77, alive },
            } if *to == peer(10) => Some(*alive),
            _ => None,
        })
    }

    fn get_state_to(out: &[Output], p: Peer) -> Option<ReqId> {
        out.iter().find_map(|o| match o {
            Output::Send {
                to,
                msg: Message::GetState { req },
            } if *to == p => Some(*req),
            _ => None,
        })
    }

    #[test]
    fn a_witness_reports_what_it_found() {
        // 30 answers: alive.
        let (mut n, out) = witness_asked(30);
        let req = get_state_to(&out, peer(30)).expect("the witness asks 30");
        deliver_state(&mut n, 2, peer(30), req, Some(peer(10)), vec![peer(40)]);
        assert_eq!(probe_result_to_10(&drain(&mut n)), Some(true));
        assert_eq!(n.probes_serving, 0);

        // 30 is silent: gone.
        let (mut n, _) = witness_asked(30);
        n.handle(60_000, Input::Timeout);
        assert_eq!(probe_result_to_10(&drain(&mut n)), Some(false));
        assert_eq!(n.probes_serving, 0);

        // 30 answers but is not in a ring (it restarted): gone.
        let (mut n, out) = witness_asked(30);
        let req = get_state_to(&out, peer(30)).expect("the witness asks 30");
        deliver_not_member(&mut n, 2, peer(30), req);
        assert_eq!(probe_result_to_10(&drain(&mut n)), Some(false));

        // Asked about itself: alive at once, no request.
        let (n, out) = witness_asked(40);
        assert_eq!(probe_result_to_10(&out), Some(true));
        assert_eq!(n.probes_serving, 0);

        // Asked about the asker: ignored.
        let (_, out) = witness_asked(10);
        assert!(out.is_empty());
    }

    #[test]
    fn a_witness_serves_a_bounded_number_of_probes() {
        let mut n = Node::new(cfg(), peer(40), 4);
        n.bootstrap(0, vec![peer(50)], Some(peer(30)), None);
        n.handle(0, Input::Command(0, Command::SetMaintenance(false)));
        drain(&mut n);
        for i in 0..PROBES_SERVED_MAX as u128 + 5 {
            n.handle(
                1,
                Input::Message {
                    from: peer(10),
                    msg: Message::Probe {
                        req: i as u64,
                        target: peer(1000 + i),
                    },
                },
            );
        }
        let asked = drain(&mut n)
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    Output::Send {
                        msg: Message::GetState { .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(asked, PROBES_SERVED_MAX);
        assert_eq!(n.stats().dropped_unexpected, 5);
        // Once they time out, the witness serves again.
        n.handle(60_000, Input::Timeout);
        assert_eq!(n.probes_serving, 0);
    }
}
