//! Replicated storage on the ring (DHash-like): every item lives on its key's
//! successor and the next R-1 live successors.
//!
//! - **Writes.** A coordinator looks the key up, sends the item to the first R
//!   replicas and acknowledges its client once W of them have made it durable
//!   (a replica answers only after its disk said so). A replica that fails or
//!   is full is replaced by the next successor.
//! - **Reads.** The nearest replica first; a record is then read from the other
//!   replicas too and merged, and every replica found stale or empty is
//!   repaired with the result.
//! - **Anti-entropy.** Each node, as primary of (pred, me], compares that range
//!   with its next R-1 successors in turn: a digest of the range, then of
//!   sixteenths of it where they differ, then key lists once small. Whatever
//!   differs is pushed and fetched, so a new replica fills in, a returning one
//!   is reintegrated, and a lost copy is re-created once.
//! - **Hand-off.** A walk over held keys finds runs this node is no longer a
//!   replica for (it joined elsewhere, nodes arrived before it), pushes them to
//!   each of the R replicas, and deletes its copy only after all R confirmed.
//!   A graceful leave pushes everything to the successors before going.
//!
//! Every received item is validated (hash, signatures) before it is stored or
//! served, and disk reads are checked against the index, so a corrupt copy is
//! dropped and re-fetched rather than served. Every queue has a bound.

use super::{CmdId, CmdResult, Node, Output, Pending, Purpose, Status, Wait};
use crate::id::Id;
use crate::lookup::{LookupError, PeerState};
use crate::store::{self, merge_held, split_range, Digest, Held, Index, Item, Merge, StoreError};
use crate::wire::{Message, Peer, ReqId, SyncAnswer};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Identifies one storage operation the node asked its host to carry out.
pub type IoId = u64;
pub(super) type OpId = u64;
pub(super) type SessionId = u64;
type HandoffId = u64;

/// Most range requests one anti-entropy session may send (a guard against a
/// peer that keeps answering with splits).
const SESSION_REQUESTS_MAX: u32 = 4_096;
/// Most entries accepted in one key-list or split answer.
const ANSWER_ENTRIES_MAX: usize = 4_096;

/// What the host must do with the node's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageOp {
    /// Make `item` durable at `key`, replacing what is there. Writes and
    /// removes of one key must complete in the order they were issued.
    Write { key: Id, item: Item },
    /// Forget the item at `key`.
    Remove { key: Id },
    /// Read the item at `key`.
    Read { key: Id },
}

/// How a storage operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageResult {
    /// The write or remove is durable.
    Done,
    /// What a read found.
    Read(Option<Item>),
    /// The disk refused (`StoreError::Full` or `StoreError::Io`).
    Failed(StoreError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutOk {
    pub key: Id,
    /// Replicas that confirmed durability when the client was answered.
    pub acks: u8,
    pub latency_ms: u64,
}

/// Counters for reports and the checkers; none of them steer behaviour.
#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    pub puts_received: u64,
    pub invalid_refused: u64,
    pub busy_refused: u64,
    /// Bytes pushed to other replicas by anti-entropy, hand-off and read repair.
    pub repair_bytes_sent: u64,
    /// Bytes fetched from other replicas by anti-entropy.
    pub repair_bytes_fetched: u64,
    pub read_repairs: u64,
    pub handoff_removed: u64,
    /// Disk reads whose bytes did not match the index (dropped, re-fetched).
    pub corrupt_detected: u64,
    pub syncs_started: u64,
    pub syncs_equal: u64,
}

#[derive(Debug)]
enum Waiter {
    Peer { to: Peer, req: ReqId },
    Local(OpId),
    Nobody,
}

/// One key's write in flight, and the merged state to write after it.
#[derive(Debug)]
struct Writing {
    io: IoId,
    held: Held,
    waiters: Vec<Waiter>,
    next: Option<(Item, Held, Vec<Waiter>)>,
}

#[derive(Debug)]
enum ReadFor {
    Serve { to: Peer, req: ReqId },
    Push { sid: SessionId, to: Peer },
    Local(OpId),
}

#[derive(Debug)]
enum IoWait {
    Write {
        key: Id,
    },
    Remove,
    Read {
        key: Id,
        expect: Digest,
        then: ReadFor,
    },
}

#[derive(Debug)]
struct Session {
    peer: Peer,
    /// Push only (a hand-off): never fetch from the peer.
    handoff: Option<HandoffId>,
    outstanding: u32,
    requests: u32,
    failed: bool,
}

#[derive(Debug)]
struct Handoff {
    /// Keys (and the versions) the targets must confirm before we drop them.
    keys: Vec<(Id, Digest)>,
    /// The replica set the keys went to; a second lookup must name it again.
    targets: Vec<Id>,
    sessions_left: u32,
    failed: bool,
    leave: Option<CmdId>,
}

#[derive(Debug)]
struct PutOp {
    cmd: CmdId,
    key: Id,
    item: Item,
    started_ms: u64,
    targets: Vec<Peer>,
    next: usize,
    needed: u8,
    acks: u8,
    outstanding: u32,
    replied: bool,
    full: bool,
}

#[derive(Debug)]
struct GetOp {
    cmd: CmdId,
    key: Id,
    targets: Vec<Peer>,
    next: usize,
    outstanding: u32,
    /// The merged record (or the block) found so far.
    found: Option<Item>,
    /// A record was found: every replica is being asked.
    quorum: bool,
    /// Replicas that answered, with the digest of what they had.
    answers: Vec<(Peer, Option<Digest>)>,
    answered_any: bool,
}

#[derive(Debug)]
enum Op {
    Put(PutOp),
    Get(GetOp),
}

/// The storage half of a node.
#[derive(Debug, Default)]
pub(super) struct Storage {
    pub(super) index: Index,
    writing: BTreeMap<Id, Writing>,
    ios: BTreeMap<IoId, IoWait>,
    next_io: IoId,
    ops: BTreeMap<OpId, Op>,
    next_op: OpId,
    sessions: BTreeMap<SessionId, Session>,
    next_sid: SessionId,
    handoffs: BTreeMap<HandoffId, Handoff>,
    next_hid: HandoffId,
    /// Our predecessor changed: sync our primary range without waiting.
    pub(super) sync_soon: bool,
    sync_sid: Option<SessionId>,
    sync_turn: usize,
    /// Sync partners whose last session failed, skipped until then.
    sync_failed: BTreeMap<crate::id::NodeId, u64>,
    last_sync_ms: u64,
    next_sync_ms: u64,
    next_handoff_ms: u64,
    handoff_cursor: Id,
    handoff_busy: bool,
    leave_deadline_ms: Option<u64>,
    inflight_bytes: u64,
    tokens: u64,
    tokens_at_ms: u64,
    push_wake_ms: Option<u64>,
    pushes: VecDeque<(SessionId, Peer, Id)>,
    stats: StoreStats,
}

impl Node {
    // ----- views -----------------------------------------------------------

    /// What this node holds durably.
    pub fn store_index(&self) -> &Index {
        &self.store.index
    }

    pub fn store_stats(&self) -> &StoreStats {
        &self.store.stats
    }

    /// Writes handed to the disk and not yet durable.
    pub fn store_writes_in_flight(&self) -> usize {
        self.store.writing.len()
    }

    /// Rebuilds the index from what the disk holds after a restart (call it
    /// before the node serves). Items are validated like any received item;
    /// invalid ones are skipped and counted, and their keys returned so the
    /// host can delete them from the disk.
    pub fn restore(&mut self, items: impl IntoIterator<Item = (Id, Item)>) -> Vec<Id> {
        let mut bad = Vec::new();
        for (key, item) in items {
            if item.validate(self.cfg.min_key_bits).is_err() || item.position() != key {
                self.store.stats.corrupt_detected += 1;
                bad.push(key);
                continue;
            }
            let held = Held::of(&item);
            self.store.index.insert(key, held);
        }
        bad
    }

    // ----- scheduling ------------------------------------------------------

    pub(super) fn store_joined(&mut self, now_ms: u64) {
        if self.cfg.replicas <= 1 {
            // One copy: nothing to sync or hand off (and the ring's own
            // jitter draws stay as they are without storage).
            return;
        }
        self.store.next_sync_ms = now_ms + self.jittered(self.cfg.sync_ms);
        self.store.next_handoff_ms = now_ms + self.jittered(self.cfg.handoff_ms);
        self.store.handoff_cursor = self.me.id;
        self.store.sync_soon = true;
    }

    /// The earliest time storage work is due.
    pub(super) fn store_timeout(&self) -> u64 {
        if self.status != Status::Joined {
            return u64::MAX;
        }
        let s = &self.store;
        let mut t = s.push_wake_ms.unwrap_or(u64::MAX);
        if let Some(d) = s.leave_deadline_ms {
            t = t.min(d);
        }
        if self.maintenance && self.cfg.replicas > 1 {
            t = t.min(s.next_sync_ms).min(s.next_handoff_ms);
            if s.sync_soon && s.sync_sid.is_none() {
                t = t.min(s.last_sync_ms + self.cfg.sync_ms / 5);
            }
        }
        t
    }

    /// Runs whatever storage work is due; called after every input.
    pub(super) fn pump(&mut self, now_ms: u64) {
        if self.status != Status::Joined {
            return;
        }
        if let Some(d) = self.store.leave_deadline_ms {
            if now_ms >= d {
                self.store.leave_deadline_ms = None;
                let cmds: Vec<CmdId> = self
                    .store
                    .handoffs
                    .values()
                    .filter_map(|h| h.leave)
                    .collect();
                if let Some(cmd) = cmds.first() {
                    self.finish_leave(*cmd);
                    return;
                }
            }
        }
        if self.maintenance && self.cfg.replicas > 1 {
            let soon =
                self.store.sync_soon && now_ms >= self.store.last_sync_ms + self.cfg.sync_ms / 5;
            if (soon || now_ms >= self.store.next_sync_ms) && self.store.sync_sid.is_none() {
                self.store.next_sync_ms = now_ms + self.jittered(self.cfg.sync_ms);
                self.start_sync(now_ms);
            } else if now_ms >= self.store.next_sync_ms {
                self.store.next_sync_ms = now_ms + self.jittered(self.cfg.sync_ms);
            }
            if now_ms >= self.store.next_handoff_ms {
                self.store.next_handoff_ms = now_ms + self.jittered(self.cfg.handoff_ms);
                self.handoff_tick(now_ms);
            }
        }
        self.drain_pushes(now_ms);
    }

    // ----- the local store ---------------------------------------------------

    /// Merges a validated item into what we hold and writes the result; the
    /// waiter hears back once it is durable (or at once if nothing changed).
    fn apply_local(&mut self, now_ms: u64, key: Id, item: Item, waiter: Waiter) {
        let base = match self.store.writing.get(&key) {
            Some(w) => Some(w.next.as_ref().map_or(&w.held, |n| &n.1)),
            None => self.store.index.get(&key),
        };
        match merge_held(base, item) {
            Err(e) => self.respond(now_ms, waiter, Err(e)),
            Ok(Merge::Unchanged) => match self.store.writing.get_mut(&key) {
                Some(w) => match &mut w.next {
                    Some(n) => n.2.push(waiter),
                    None => w.waiters.push(waiter),
                },
                None => self.respond(now_ms, waiter, Ok(())),
            },
            Ok(Merge::Write(new)) => {
                let held = Held::of(&new);
                if let Some(w) = self.store.writing.get_mut(&key) {
                    let mut waiters = w.next.take().map(|n| n.2).unwrap_or_default();
                    waiters.push(waiter);
                    w.next = Some((new, held, waiters));
                    return;
                }
                let size = held.size() as u64;
                if self.store.inflight_bytes + size > self.cfg.inflight_bytes_max {
                    self.store.stats.busy_refused += 1;
                    return self.respond(now_ms, waiter, Err(StoreError::Busy));
                }
                self.issue_write(key, new, held, vec![waiter]);
            }
        }
    }

    fn issue_write(&mut self, key: Id, item: Item, held: Held, waiters: Vec<Waiter>) {
        let io = self.alloc_io();
        self.store.inflight_bytes += held.size() as u64;
        self.store.ios.insert(io, IoWait::Write { key });
        self.store.writing.insert(
            key,
            Writing {
                io,
                held,
                waiters,
                next: None,
            },
        );
        self.out.push_back(Output::Storage {
            io,
            op: StorageOp::Write { key, item },
        });
    }

    fn issue_remove(&mut self, key: Id) {
        let io = self.alloc_io();
        self.store.ios.insert(io, IoWait::Remove);
        self.out.push_back(Output::Storage {
            io,
            op: StorageOp::Remove { key },
        });
    }

    fn issue_read(&mut self, key: Id, expect: Digest, then: ReadFor) {
        let io = self.alloc_io();
        self.store
            .ios
            .insert(io, IoWait::Read { key, expect, then });
        self.out.push_back(Output::Storage {
            io,
            op: StorageOp::Read { key },
        });
    }

    fn alloc_io(&mut self) -> IoId {
        self.store.next_io += 1;
        self.store.next_io
    }

    pub(super) fn on_storage_done(&mut self, now_ms: u64, io: IoId, result: StorageResult) {
        let Some(wait) = self.store.ios.remove(&io) else {
            self.stats.dropped_unexpected += 1;
            return;
        };
        match wait {
            IoWait::Write { key } => {
                let Some(w) = self.store.writing.remove(&key) else {
                    return;
                };
                debug_assert_eq!(w.io, io, "one write per key in flight");
                self.store.inflight_bytes -= w.held.size() as u64;
                let res = match result {
                    StorageResult::Done => {
                        self.store.index.insert(key, w.held);
                        Ok(())
                    }
                    StorageResult::Failed(e) => Err(e),
                    StorageResult::Read(_) => Err(StoreError::Io),
                };
                for waiter in w.waiters {
                    self.respond(now_ms, waiter, res.clone());
                }
                if let Some((item, held, waiters)) = w.next {
                    self.issue_write(key, item, held, waiters);
                }
            }
            IoWait::Remove => {}
            IoWait::Read { key, expect, then } => {
                let found = match result {
                    // The disk failed to read (out of file handles, EIO):
                    // the copy may well be fine, so keep it in the index
                    // and tell whoever asked that this replica could not
                    // answer.
                    StorageResult::Failed(e) => Err(e),
                    StorageResult::Read(Some(item)) if item_digest_is(&item, &expect) => {
                        Ok(Some(item))
                    }
                    // The disk lost or mangled what the index says it holds:
                    // never serve it; forget it so anti-entropy fetches it again.
                    _ => {
                        if self.store.index.get(&key).map(|h| h.digest()) == Some(expect)
                            && !self.store.writing.contains_key(&key)
                        {
                            self.store.stats.corrupt_detected += 1;
                            self.store.index.remove(&key);
                            self.issue_remove(key);
                        }
                        Ok(None)
                    }
                };
                match then {
                    ReadFor::Serve { to, req } => {
                        self.stats.sent_replies += 1;
                        self.push_send(to, Message::Got { req, result: found });
                    }
                    ReadFor::Push { sid, to } => match found {
                        Ok(Some(item)) => self.send_push(now_ms, sid, to, key, item),
                        _ => self.session_step_done(now_ms, sid, false),
                    },
                    ReadFor::Local(op) => self.get_answer(now_ms, op, self.me, found),
                }
            }
        }
    }

    fn respond(&mut self, now_ms: u64, waiter: Waiter, result: Result<(), StoreError>) {
        match waiter {
            Waiter::Peer { to, req } => {
                self.stats.sent_replies += 1;
                self.push_send(to, Message::PutAck { req, result });
            }
            Waiter::Local(op) => self.put_ack(now_ms, op, result),
            Waiter::Nobody => {}
        }
    }

    /// The item at `key` if it can be had without the disk.
    fn held_item(&self, key: &Id) -> Option<Item> {
        self.store.index.get(key)?.to_item()
    }

    // ----- messages ------------------------------------------------------------

    pub(super) fn on_store_message(&mut self, now_ms: u64, from: Peer, msg: Message) {
        match msg {
            Message::Put { req, key, item } => {
                self.store.stats.puts_received += 1;
                if self.status != Status::Joined {
                    return self.push_send(
                        from,
                        Message::PutAck {
                            req,
                            result: Err(StoreError::NotJoined),
                        },
                    );
                }
                if let Err(e) = item.validate(self.cfg.min_key_bits) {
                    self.store.stats.invalid_refused += 1;
                    return self.push_send(
                        from,
                        Message::PutAck {
                            req,
                            result: Err(e),
                        },
                    );
                }
                if item.position() != key {
                    self.store.stats.invalid_refused += 1;
                    let e = StoreError::Invalid(
                        "the item does not belong at the key it was sent for".into(),
                    );
                    return self.push_send(
                        from,
                        Message::PutAck {
                            req,
                            result: Err(e),
                        },
                    );
                }
                self.apply_local(now_ms, key, item, Waiter::Peer { to: from, req });
            }
            Message::Get { req, key } => {
                if self.status != Status::Joined {
                    return self.push_send(
                        from,
                        Message::Got {
                            req,
                            result: Err(StoreError::NotJoined),
                        },
                    );
                }
                match self.store.index.get(&key) {
                    Some(Held::Block { id, .. }) => {
                        let id = *id;
                        self.issue_read(key, id, ReadFor::Serve { to: from, req });
                    }
                    _ => {
                        let item = self.held_item(&key);
                        self.stats.sent_replies += 1;
                        self.push_send(
                            from,
                            Message::Got {
                                req,
                                result: Ok(item),
                            },
                        );
                    }
                }
            }
            Message::SyncRange { req, lo, hi, mine } => {
                let answer = if self.status != Status::Joined {
                    SyncAnswer::Refused
                } else {
                    let theirs = self.store.index.summarize(lo, hi);
                    if theirs.digest == mine.digest {
                        SyncAnswer::Equal
                    } else if theirs.count as usize <= self.cfg.sync_keys_max
                        || lo.distance_to(hi) < Id::from_u128(self.cfg.sync_split as u128 * 2)
                    {
                        let mut l = self.store.index.list(lo, hi);
                        l.truncate(ANSWER_ENTRIES_MAX);
                        SyncAnswer::Keys(l)
                    } else {
                        SyncAnswer::Split(
                            split_range(lo, hi, self.cfg.sync_split)
                                .into_iter()
                                .map(|(a, b)| (a, b, self.store.index.summarize(a, b)))
                                .collect(),
                        )
                    }
                };
                self.stats.sent_replies += 1;
                self.push_send(from, Message::SyncReply { req, answer });
            }
            Message::PutAck { req, result } => {
                let Some(p) = self.take_pending(now_ms, req, from) else {
                    return;
                };
                match p.wait {
                    Wait::StorePut(op) => self.put_ack(now_ms, op, result),
                    Wait::Push(sid) => self.session_step_done(now_ms, sid, result.is_ok()),
                    Wait::Repair => {}
                    w => self.wrong_reply(now_ms, Pending { wait: w, ..p }),
                }
            }
            Message::Got { req, result } => {
                let Some(p) = self.take_pending(now_ms, req, from) else {
                    return;
                };
                match p.wait {
                    Wait::StoreGet(op) => self.get_answer(now_ms, op, from, result),
                    Wait::Fetch { sid, key } => {
                        if let Ok(Some(item)) = result {
                            if item.position() == key
                                && item.validate(self.cfg.min_key_bits).is_ok()
                            {
                                self.store.stats.repair_bytes_fetched += item.size() as u64;
                                self.apply_local(now_ms, key, item, Waiter::Nobody);
                            } else {
                                self.store.stats.invalid_refused += 1;
                            }
                        }
                        self.session_step_done(now_ms, sid, true);
                    }
                    w => self.wrong_reply(now_ms, Pending { wait: w, ..p }),
                }
            }
            Message::SyncReply { req, answer } => {
                let Some(p) = self.take_pending(now_ms, req, from) else {
                    return;
                };
                match p.wait {
                    Wait::Sync { sid, lo, hi } => self.on_sync_reply(now_ms, sid, lo, hi, answer),
                    w => self.wrong_reply(now_ms, Pending { wait: w, ..p }),
                }
            }
            _ => unreachable!("only storage messages are routed here"),
        }
    }

    /// A storage request timed out, or its peer is not a member, or it
    /// answered nonsense.
    pub(super) fn store_request_failed(&mut self, now_ms: u64, to: Peer, w: Wait) {
        match w {
            Wait::StorePut(op) => self.put_ack(
                now_ms,
                op,
                Err(StoreError::Unavailable { acks: 0, needed: 1 }),
            ),
            Wait::StoreGet(op) => self.get_answer(
                now_ms,
                op,
                to,
                Err(StoreError::Unavailable { acks: 0, needed: 1 }),
            ),
            Wait::Sync { sid, .. } | Wait::Push(sid) | Wait::Fetch { sid, .. } => {
                self.session_step_done(now_ms, sid, false)
            }
            _ => {}
        }
    }

    // ----- client puts ---------------------------------------------------------

    pub(super) fn start_put(&mut self, now_ms: u64, cmd: CmdId, item: Item) {
        if let Err(e) = self
            .store_admit()
            .and_then(|()| item.validate(self.cfg.min_key_bits))
        {
            return self.reply(cmd, CmdResult::Put(Err(e)));
        }
        let key = item.position();
        let op = self.alloc_op();
        self.store.ops.insert(
            op,
            Op::Put(PutOp {
                cmd,
                key,
                item,
                started_ms: now_ms,
                targets: Vec::new(),
                next: 0,
                needed: 0,
                acks: 0,
                outstanding: 0,
                replied: false,
                full: false,
            }),
        );
        self.start_lookup(now_ms, key, Purpose::Store(op));
    }

    pub(super) fn start_get(&mut self, now_ms: u64, cmd: CmdId, key: Id) {
        if let Err(e) = self.store_admit() {
            return self.reply(cmd, CmdResult::Get(Err(e)));
        }
        let op = self.alloc_op();
        self.store.ops.insert(
            op,
            Op::Get(GetOp {
                cmd,
                key,
                targets: Vec::new(),
                next: 0,
                outstanding: 0,
                found: None,
                quorum: false,
                answers: Vec::new(),
                answered_any: false,
            }),
        );
        self.start_lookup(now_ms, key, Purpose::Store(op));
    }

    /// Whether a client operation may start now.
    fn store_admit(&self) -> Result<(), StoreError> {
        if self.status != Status::Joined {
            return Err(StoreError::NotJoined);
        }
        if self.store.ops.len() >= self.cfg.store_ops_max
            || self.lookups.len() >= self.cfg.lookups_max
        {
            return Err(StoreError::Busy);
        }
        Ok(())
    }

    fn alloc_op(&mut self) -> OpId {
        self.store.next_op += 1;
        self.store.next_op
    }

    /// The key's successor and the nodes after it, as the lookup saw them
    /// (ourselves included where we belong), at most r+1 long, one position
    /// per machine: see [`distinct_hosts`].
    fn replica_list(&self, owner: Peer, state: Option<PeerState>) -> Vec<Peer> {
        let rest: Vec<Peer> = if owner.id == self.me.id {
            self.succs.to_vec()
        } else {
            match state {
                Some((_, succs)) => succs,
                None => Vec::new(),
            }
        };
        distinct_hosts(std::iter::once(owner).chain(rest))
            .take(self.cfg.successors_max + 1)
            .collect()
    }

    /// Our successors that can hold replicas beside us: one position per
    /// machine, none on our own machine.
    fn replica_successors(&self) -> impl Iterator<Item = Peer> + '_ {
        distinct_hosts(self.succs.iter().copied()).filter(|p| p.addr != self.me.addr)
    }

    pub(super) fn store_lookup_done(
        &mut self,
        now_ms: u64,
        op: OpId,
        result: Result<(Peer, Option<PeerState>), LookupError>,
    ) {
        let Some(o) = self.store.ops.get(&op) else {
            return;
        };
        let cmd = match o {
            Op::Put(p) => p.cmd,
            Op::Get(g) => g.cmd,
        };
        let (owner, state) = match result {
            Ok(x) => x,
            Err(e) => {
                let err = StoreError::NoRoute(e.to_string());
                let r = match self.store.ops.remove(&op) {
                    Some(Op::Put(_)) => CmdResult::Put(Err(err)),
                    _ => CmdResult::Get(Err(err)),
                };
                return self.reply(cmd, r);
            }
        };
        let mut targets = self.replica_list(owner, state);
        let r = self.cfg.replicas.max(1);
        match self.store.ops.get_mut(&op) {
            Some(Op::Put(p)) => {
                p.needed = self.cfg.write_quorum.clamp(1, r).min(targets.len()) as u8;
                p.targets = targets;
                for _ in 0..r {
                    self.put_next(now_ms, op);
                }
            }
            Some(Op::Get(_)) => {
                // Nearest first: ourselves, then by smoothed round trip.
                targets.truncate(r);
                targets.sort_by_key(|p| {
                    if p.id == self.me.id {
                        0
                    } else {
                        1 + self.rtt.timeout_ms(p.id)
                    }
                });
                if let Some(Op::Get(g)) = self.store.ops.get_mut(&op) {
                    g.targets = targets;
                }
                self.get_next(now_ms, op);
            }
            None => {}
        }
    }

    /// Sends the put to its next target, if any is left.
    fn put_next(&mut self, now_ms: u64, op: OpId) {
        let Some(Op::Put(p)) = self.store.ops.get_mut(&op) else {
            return;
        };
        let Some(to) = p.targets.get(p.next).copied() else {
            return;
        };
        p.next += 1;
        p.outstanding += 1;
        let item = p.item.clone();
        let key = p.key;
        if to.id == self.me.id {
            self.apply_local(now_ms, key, item, Waiter::Local(op));
        } else {
            self.request(
                now_ms,
                to,
                |req| Message::Put { req, key, item },
                Wait::StorePut(op),
                false,
            );
        }
    }

    fn put_ack(&mut self, now_ms: u64, op: OpId, result: Result<(), StoreError>) {
        let Some(Op::Put(p)) = self.store.ops.get_mut(&op) else {
            return;
        };
        p.outstanding -= 1;
        let mut reply = None;
        let mut retry = false;
        match result {
            Ok(()) => {
                p.acks += 1;
                if p.acks >= p.needed && !p.replied {
                    p.replied = true;
                    reply = Some(Ok(PutOk {
                        key: p.key,
                        acks: p.acks,
                        latency_ms: now_ms - p.started_ms,
                    }));
                }
            }
            // The item conflicts with what the replicas hold: none will take it.
            // (Invalid is not here: we validated the item before sending, so
            // a replica calling it invalid saw it corrupted in transit.)
            Err(e @ (StoreError::KeyTaken | StoreError::Deleted | StoreError::NotOwner)) => {
                if !p.replied {
                    p.replied = true;
                    reply = Some(Err(e));
                }
            }
            // This replica cannot take it now: the next successor stands in.
            Err(e) => {
                p.full |= e == StoreError::Full;
                retry = true;
            }
        }
        let cmd = p.cmd;
        if let Some(r) = reply {
            self.reply(cmd, CmdResult::Put(r));
        }
        if retry {
            self.put_next(now_ms, op);
        }
        let Some(Op::Put(p)) = self.store.ops.get(&op) else {
            return;
        };
        if p.outstanding == 0 {
            let Some(Op::Put(p)) = self.store.ops.remove(&op) else {
                unreachable!()
            };
            if !p.replied {
                let e = if p.full {
                    StoreError::Full
                } else {
                    StoreError::Unavailable {
                        acks: p.acks,
                        needed: p.needed,
                    }
                };
                self.reply(p.cmd, CmdResult::Put(Err(e)));
            }
        }
    }

    // ----- client gets ---------------------------------------------------------

    /// Asks the next replica in order (one at a time until something is found).
    fn get_next(&mut self, now_ms: u64, op: OpId) {
        let Some(Op::Get(g)) = self.store.ops.get_mut(&op) else {
            return;
        };
        match g.targets.get(g.next).copied() {
            Some(to) => {
                g.next += 1;
                g.outstanding += 1;
                let key = g.key;
                self.ask_replica(now_ms, op, to, key);
            }
            None if g.outstanding == 0 => self.finish_get(now_ms, op),
            None => {}
        }
    }

    fn ask_replica(&mut self, now_ms: u64, op: OpId, to: Peer, key: Id) {
        if to.id != self.me.id {
            return self.request(
                now_ms,
                to,
                |req| Message::Get { req, key },
                Wait::StoreGet(op),
                false,
            );
        }
        match self.store.index.get(&key) {
            Some(Held::Block { id, .. }) => {
                let id = *id;
                self.issue_read(key, id, ReadFor::Local(op));
            }
            _ => {
                let item = self.held_item(&key);
                self.get_answer(now_ms, op, self.me, Ok(item));
            }
        }
    }

    fn get_answer(
        &mut self,
        now_ms: u64,
        op: OpId,
        from: Peer,
        answer: Result<Option<Item>, StoreError>,
    ) {
        let min_bits = self.cfg.min_key_bits;
        let Some(Op::Get(g)) = self.store.ops.get_mut(&op) else {
            return;
        };
        g.outstanding -= 1;
        // A replica's answer counts only if it is valid and really is the
        // key. A record equal to one already found valid for this get is
        // valid too: its digest covers every byte, signature included.
        // Replicas mostly hold the same version, and checking its
        // signature once per copy was most of the work of serving a
        // manifest. (A tombstone's digest leaves its signature out: each
        // copy is checked.)
        let answer = answer.map(|o| {
            o.and_then(|item| {
                if item.position() != g.key {
                    return None;
                }
                let d = item.digest();
                let seen = matches!(item, Item::Record(_))
                    && g.answers.iter().any(|(_, had)| *had == Some(d));
                (seen || item.validate(min_bits).is_ok()).then_some((item, d))
            })
        });
        match answer {
            Err(_) => {}
            Ok(found) => {
                g.answered_any = true;
                g.answers.push((from, found.as_ref().map(|(_, d)| *d)));
                let found = found.map(|(item, _)| item);
                match (found, g.found.take()) {
                    (None, prev) => g.found = prev,
                    (Some(item), None) => g.found = Some(item),
                    (Some(item), Some(prev)) => {
                        g.found = Some(match store::merge(Some(&prev), item) {
                            Ok(Merge::Write(m)) => m,
                            _ => prev,
                        })
                    }
                }
            }
        }
        let is_record = matches!(g.found, Some(Item::Record(_)));
        if is_record && !g.quorum {
            // A record may be stale on one replica: ask all the others too.
            g.quorum = true;
            let rest: Vec<Peer> = g.targets[g.next..].to_vec();
            g.next = g.targets.len();
            g.outstanding += rest.len() as u32;
            let key = g.key;
            for to in rest {
                self.ask_replica(now_ms, op, to, key);
            }
        }
        let Some(Op::Get(g)) = self.store.ops.get(&op) else {
            return;
        };
        if g.found.is_some() && !g.quorum
            || g.outstanding == 0 && (g.quorum || g.next >= g.targets.len())
        {
            self.finish_get(now_ms, op);
        } else if g.found.is_none() && g.outstanding == 0 {
            self.get_next(now_ms, op);
        }
    }

    fn finish_get(&mut self, now_ms: u64, op: OpId) {
        let Some(Op::Get(g)) = self.store.ops.remove(&op) else {
            return;
        };
        // Read repair: whoever answered with nothing or an older version.
        let stale: Vec<Peer> = match &g.found {
            Some(item) => {
                let d = Some(item.digest());
                g.answers
                    .iter()
                    .filter(|(_, had)| *had != d)
                    .map(|(p, _)| *p)
                    .collect()
            }
            None => Vec::new(),
        };
        // The item goes into the answer itself unless a repair needs it
        // too (a 1 MiB copy per get otherwise).
        let (result, repair) = match g.found {
            Some(item) if stale.is_empty() => (Ok(Some(item)), None),
            Some(item) => (Ok(Some(item.clone())), Some(item)),
            None if g.answered_any => (Ok(None), None),
            None => (Err(StoreError::Unavailable { acks: 0, needed: 1 }), None),
        };
        self.reply(g.cmd, CmdResult::Get(result));
        if let Some(item) = repair {
            for p in stale {
                self.store.stats.read_repairs += 1;
                if p.id == self.me.id {
                    self.apply_local(now_ms, item.position(), item.clone(), Waiter::Nobody);
                } else {
                    self.store.stats.repair_bytes_sent += item.size() as u64;
                    let it = item.clone();
                    let key = g.key;
                    self.request(
                        now_ms,
                        p,
                        |req| Message::Put { req, key, item: it },
                        Wait::Repair,
                        false,
                    );
                }
            }
        }
    }

    // ----- anti-entropy ---------------------------------------------------------

    fn new_session(&mut self, peer: Peer, handoff: Option<HandoffId>) -> SessionId {
        self.store.next_sid += 1;
        let sid = self.store.next_sid;
        self.store.sessions.insert(
            sid,
            Session {
                peer,
                handoff,
                outstanding: 0,
                requests: 0,
                failed: false,
            },
        );
        sid
    }

    /// Syncs our primary range (pred, me] with the next of our first R-1
    /// successors.
    fn start_sync(&mut self, now_ms: u64) {
        self.store.sync_soon = false;
        self.store.last_sync_ms = now_ms;
        let Some(pred) = self.pred else {
            return;
        };
        // Our R-1 replica partners, except any whose last sync failed in
        // the last few periods: the successor after them stands in (the
        // copies it gets are handed back once the partner answers again),
        // so a silent replica does not leave a key at fewer copies.
        self.store.sync_failed.retain(|_, until| *until > now_ms);
        let want = self.cfg.replicas.saturating_sub(1);
        let partners: Vec<Peer> = self
            .replica_successors()
            .filter(|p| !self.store.sync_failed.contains_key(&p.id))
            .take(want)
            .collect();
        if partners.is_empty() {
            return;
        }
        let peer = partners[self.store.sync_turn % partners.len()];
        self.store.sync_turn = self.store.sync_turn.wrapping_add(1);
        self.store.stats.syncs_started += 1;
        let sid = self.new_session(peer, None);
        self.store.sync_sid = Some(sid);
        self.sync_range(now_ms, sid, pred.id, self.me.id);
    }

    /// Counts one more request of a session against its budget; the peer to
    /// send it to, or None if the session is gone or out of budget.
    fn session_request(&mut self, sid: SessionId) -> Option<Peer> {
        let s = self.store.sessions.get_mut(&sid)?;
        if s.requests >= SESSION_REQUESTS_MAX {
            s.failed = true;
            return None;
        }
        s.requests += 1;
        s.outstanding += 1;
        Some(s.peer)
    }

    fn sync_range(&mut self, now_ms: u64, sid: SessionId, lo: Id, hi: Id) {
        let Some(peer) = self.session_request(sid) else {
            return;
        };
        let mine = self.store.index.summarize(lo, hi);
        self.request(
            now_ms,
            peer,
            |req| Message::SyncRange { req, lo, hi, mine },
            Wait::Sync { sid, lo, hi },
            false,
        );
    }

    fn on_sync_reply(&mut self, now_ms: u64, sid: SessionId, lo: Id, hi: Id, answer: SyncAnswer) {
        let Some(s) = self.store.sessions.get(&sid) else {
            return;
        };
        let peer = s.peer;
        let push_only = s.handoff.is_some();
        let mut ok = true;
        match answer {
            SyncAnswer::Equal => self.store.stats.syncs_equal += 1,
            SyncAnswer::Refused => ok = false,
            SyncAnswer::Keys(theirs) => {
                if theirs.len() > ANSWER_ENTRIES_MAX {
                    ok = false;
                } else {
                    let theirs: BTreeMap<Id, Digest> = theirs
                        .into_iter()
                        .filter(|(k, _)| k.in_open_closed(lo, hi) || lo == hi)
                        .collect();
                    let mine: BTreeMap<Id, Digest> =
                        self.store.index.list(lo, hi).into_iter().collect();
                    for (k, d) in &mine {
                        if theirs.get(k) != Some(d) {
                            self.queue_push(sid, peer, *k);
                        }
                    }
                    if !push_only {
                        for (k, d) in &theirs {
                            if mine.get(k) != Some(d) {
                                self.fetch(now_ms, sid, peer, *k);
                            }
                        }
                    }
                }
            }
            SyncAnswer::Split(parts) => {
                // Accept only a chain of strictly narrower ranges from lo to hi:
                // anything else could recurse for ever.
                let width = lo.distance_to(hi);
                let chain_ok = !parts.is_empty()
                    && parts.len() <= ANSWER_ENTRIES_MAX
                    && parts.first().map(|p| p.0) == Some(lo)
                    && parts.last().map(|p| p.1) == Some(hi)
                    && parts.windows(2).all(|w| w[0].1 == w[1].0)
                    && parts.iter().all(|(a, b, _)| {
                        let w = a.distance_to(*b);
                        w != Id::ZERO && (width == Id::ZERO || w < width)
                    });
                if chain_ok {
                    for (a, b, theirs) in parts {
                        if self.store.index.summarize(a, b) != theirs {
                            self.sync_range(now_ms, sid, a, b);
                        }
                    }
                } else {
                    ok = false;
                }
            }
        }
        self.session_step_done(now_ms, sid, ok);
    }

    fn queue_push(&mut self, sid: SessionId, to: Peer, key: Id) {
        let Some(s) = self.store.sessions.get_mut(&sid) else {
            return;
        };
        if self.store.pushes.len() >= self.cfg.push_queue_max {
            s.failed = true; // incomplete: a later round finishes the job
            return;
        }
        s.outstanding += 1;
        self.store.pushes.push_back((sid, to, key));
    }

    fn fetch(&mut self, now_ms: u64, sid: SessionId, from: Peer, key: Id) {
        if self.session_request(sid).is_none() {
            return;
        }
        self.request(
            now_ms,
            from,
            |req| Message::Get { req, key },
            Wait::Fetch { sid, key },
            false,
        );
    }

    /// Sends queued pushes as the repair budget allows.
    fn drain_pushes(&mut self, now_ms: u64) {
        let rate = self.cfg.repair_bytes_per_s.max(1);
        let cap = rate.max(store::BLOCK_MAX as u64 + 1024);
        let elapsed = now_ms.saturating_sub(self.store.tokens_at_ms);
        self.store.tokens = (self.store.tokens + elapsed.saturating_mul(rate) / 1000).min(cap);
        self.store.tokens_at_ms = now_ms;
        self.store.push_wake_ms = None;
        while let Some(&(sid, to, key)) = self.store.pushes.front() {
            let Some(held) = self.store.index.get(&key) else {
                self.store.pushes.pop_front();
                self.session_step_done(now_ms, sid, false);
                continue;
            };
            let size = held.size() as u64;
            if size > self.store.tokens {
                let wait = (size - self.store.tokens) * 1000 / rate + 1;
                self.store.push_wake_ms = Some(now_ms + wait);
                return;
            }
            self.store.tokens -= size;
            self.store.pushes.pop_front();
            match held {
                Held::Block { id, .. } => {
                    let id = *id;
                    self.issue_read(key, id, ReadFor::Push { sid, to });
                }
                _ => {
                    let item = self.held_item(&key).expect("records are held whole");
                    self.send_push(now_ms, sid, to, key, item);
                }
            }
        }
    }

    fn send_push(&mut self, now_ms: u64, sid: SessionId, to: Peer, key: Id, item: Item) {
        self.store.stats.repair_bytes_sent += item.size() as u64;
        self.request(
            now_ms,
            to,
            |req| Message::Put { req, key, item },
            Wait::Push(sid),
            false,
        );
    }

    /// One request of a session finished (`ok` false: it failed).
    fn session_step_done(&mut self, now_ms: u64, sid: SessionId, ok: bool) {
        let Some(s) = self.store.sessions.get_mut(&sid) else {
            return;
        };
        s.failed |= !ok;
        s.outstanding = s.outstanding.saturating_sub(1);
        if s.outstanding > 0 {
            return;
        }
        let s = self.store.sessions.remove(&sid).expect("present");
        if self.store.sync_sid == Some(sid) {
            self.store.sync_sid = None;
            if s.failed {
                // Try the others (and a stand-in) soon rather than a
                // period later.
                self.store
                    .sync_failed
                    .insert(s.peer.id, now_ms + 3 * self.cfg.sync_ms);
                self.store.sync_soon = true;
            }
        }
        if let Some(hid) = s.handoff {
            if let Some(h) = self.store.handoffs.get_mut(&hid) {
                h.failed |= s.failed;
                h.sessions_left -= 1;
                if h.sessions_left == 0 {
                    self.complete_handoff(now_ms, hid);
                }
            }
        }
    }

    // ----- hand-off ------------------------------------------------------------

    /// Looks up who should hold the next run of keys outside our primary range.
    fn handoff_tick(&mut self, now_ms: u64) {
        if self.store.handoff_busy || self.store.leave_deadline_ms.is_some() {
            return;
        }
        let Some(pred) = self.pred else {
            return;
        };
        let mut k = match self.store.index.next_after(self.store.handoff_cursor) {
            Some(k) => k,
            None => return,
        };
        if k.in_open_closed(pred.id, self.me.id) {
            match self.store.index.next_after(self.me.id) {
                Some(k2) if !k2.in_open_closed(pred.id, self.me.id) => k = k2,
                _ => {
                    self.store.handoff_cursor = self.me.id;
                    return;
                }
            }
        }
        if self.lookups.len() >= self.cfg.lookups_max {
            return;
        }
        self.store.handoff_busy = true;
        self.start_lookup(now_ms, k, Purpose::Handoff(k));
    }

    pub(super) fn handoff_lookup_done(
        &mut self,
        now_ms: u64,
        key: Id,
        result: Result<(Peer, Option<PeerState>), LookupError>,
    ) {
        self.store.handoff_busy = false;
        let Ok((owner, state)) = result else {
            return;
        };
        let r = self.cfg.replicas.max(1);
        let mut set = self.replica_list(owner, state);
        set.truncate(r);
        if set.iter().any(|p| p.id == self.me.id) {
            // We are one of this run's replicas: skip to its end.
            self.store.handoff_cursor = owner.id;
            return;
        }
        if set.len() < r {
            self.store.handoff_cursor = key;
            return;
        }
        let lo = key.wrapping_sub(Id::from_u128(1));
        let mut hi = owner.id;
        let mut keys = self.store.index.list(lo, hi);
        if keys.len() > self.cfg.handoff_keys_max {
            keys.truncate(self.cfg.handoff_keys_max);
            hi = keys.last().expect("non-empty").0;
        }
        self.store.handoff_cursor = hi;
        if keys.is_empty() {
            return;
        }
        self.store.handoff_busy = true;
        self.start_handoff(
            now_ms,
            keys,
            set.into_iter().map(|p| (p, lo, hi)).collect(),
            None,
        );
    }

    fn start_handoff(
        &mut self,
        now_ms: u64,
        keys: Vec<(Id, Digest)>,
        targets: Vec<(Peer, Id, Id)>,
        leave: Option<CmdId>,
    ) {
        self.store.next_hid += 1;
        let hid = self.store.next_hid;
        self.store.handoffs.insert(
            hid,
            Handoff {
                keys,
                targets: targets.iter().map(|t| t.0.id).collect(),
                sessions_left: targets.len() as u32,
                failed: false,
                leave,
            },
        );
        for (peer, lo, hi) in targets {
            let sid = self.new_session(peer, Some(hid));
            self.sync_range(now_ms, sid, lo, hi);
        }
    }

    fn complete_handoff(&mut self, now_ms: u64, hid: HandoffId) {
        let Some(h) = self.store.handoffs.get(&hid) else {
            return;
        };
        if let Some(cmd) = h.leave {
            self.store.handoffs.remove(&hid);
            self.store.leave_deadline_ms = None;
            return self.finish_leave(cmd);
        }
        let first = h.keys.first().map(|k| k.0);
        match first {
            // Every target has the keys. Before deleting ours, ask again who
            // should hold them: the ring may have moved (or the first lookup
            // may have been wrong) while we pushed, and we may be a replica now.
            Some(k) if !h.failed && self.lookups.len() < self.cfg.lookups_max => {
                self.start_lookup(now_ms, k, Purpose::HandoffConfirm(hid));
            }
            _ => {
                self.store.handoffs.remove(&hid);
                self.store.handoff_busy = false;
            }
        }
    }

    pub(super) fn handoff_confirmed(
        &mut self,
        hid: HandoffId,
        result: Result<(Peer, Option<PeerState>), LookupError>,
    ) {
        self.store.handoff_busy = false;
        let Some(h) = self.store.handoffs.remove(&hid) else {
            return;
        };
        let Ok((owner, state)) = result else {
            return;
        };
        let mut set = self.replica_list(owner, state);
        set.truncate(self.cfg.replicas.max(1));
        let ids: Vec<Id> = set.iter().map(|p| p.id).collect();
        if ids != h.targets || ids.contains(&self.me.id) {
            return;
        }
        let primary = self.pred.map(|p| (p.id, self.me.id));
        for (k, d) in h.keys {
            if primary.is_some_and(|(a, b)| k.in_open_closed(a, b)) {
                continue;
            }
            if self.store.writing.contains_key(&k)
                || self.store.index.get(&k).map(|h| h.digest()) != Some(d)
            {
                continue;
            }
            self.store.index.remove(&k);
            self.store.stats.handoff_removed += 1;
            self.issue_remove(k);
        }
    }

    /// A graceful leave pushes what we hold to the successors that take over
    /// our ranges, then goes (or goes anyway at the deadline). True if the
    /// leave is now waiting on the hand-off.
    pub(super) fn start_leave_handoff(&mut self, now_ms: u64, cmd: CmdId) -> bool {
        if self.store.index.is_empty() || self.succs.is_empty() {
            return false;
        }
        let r = self.cfg.replicas.max(1);
        let me = self.me.id;
        let mut targets = Vec::new();
        // Not to our own machine's other positions: a machine leaves whole.
        let succs: Vec<Peer> = self.replica_successors().take(r).collect();
        for (i, s) in succs.iter().enumerate() {
            // The last of them only gains our own range; the others may gain
            // any range we held.
            let lo = match (i + 1 == r, self.pred) {
                (true, Some(p)) => p.id,
                _ => me,
            };
            targets.push((*s, lo, me));
        }
        self.store.leave_deadline_ms = Some(now_ms + self.cfg.leave_handoff_ms);
        self.start_handoff(now_ms, Vec::new(), targets, Some(cmd));
        true
    }
}

/// The peers in order, keeping only the first position of each machine.
///
/// A machine running several virtual nodes answers for all of them at one
/// address, so the address names the machine. Replicas on two positions of
/// one machine would be one copy as far as failures go: a replica set is the
/// key's successor and the following positions on machines not yet chosen.
/// With one position per machine this is the plain successor list.
pub(crate) fn distinct_hosts(peers: impl Iterator<Item = Peer>) -> impl Iterator<Item = Peer> {
    let mut seen = BTreeSet::new();
    peers.filter(move |p| seen.insert(p.addr))
}

/// Whether a read item is the version the index expects (a block is hashed).
fn item_digest_is(item: &Item, expect: &Digest) -> bool {
    item.digest() == *expect
}
