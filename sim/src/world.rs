//! The deterministic simulator: one event queue ordered by (time, sequence),
//! independent seeded RNG streams (network, faults, workload, one per node),
//! the real `peerstore_core::Node` for every node, and checkers on the global
//! state. Same seed and same code give the same run, event for event.

use crate::check::{self, View, Violation};
use crate::config::{CheckMode, Cut, Fault, FaultKind, Session, SimConfig, Start};
use crate::net::{Fate, Network};
use crate::queue::EventQueue;
use crate::report::{LookupStats, Report, Sample, SecurityReport, ViolationReport};
use crate::storage::{Disk, Expect, Records, StorageReport};
use peerstore_core::gate::{ClientOp, ClientRequest, Gate, GateCmd, GateOutput, GateReply};
use peerstore_core::link::{LinkStats, Links};
use peerstore_core::{
    Addr, CmdId, CmdResult, Command, Event, Id, Input, Message, Node, NodeStats, Output, Peer,
    Signer, ID_BITS,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Weibull};
use std::collections::{BTreeMap, VecDeque};

#[derive(Clone, Debug)]
enum Ev {
    Deliver {
        to: u32,
        from: Peer,
        msg: Message,
    },
    /// Bytes on a secure link, for the machine whose head slot is `to`.
    Packet {
        to: u32,
        from: Addr,
        bytes: Vec<u8>,
    },
    /// Attacker machines try to store something.
    AttackPut,
    Wake {
        node: u32,
    },
    Fault(FaultKind),
    Restart {
        node: u32,
        incarnation: u32,
    },
    PartitionEnd {
        id: u64,
    },
    Depart {
        node: u32,
        incarnation: u32,
    },
    Arrive,
    StartJoin {
        node: u32,
        incarnation: u32,
    },
    Lookup,
    FailLookup,
    Sample,
    SafetyTick,
    Heal,
    DiskDone {
        node: u32,
        incarnation: u32,
        io: u64,
    },
    StorePut,
    StoreGet,
    RecordWrite,
    Register,
}

impl Ev {
    fn name(&self) -> &'static str {
        match self {
            Ev::Deliver { .. } => "deliver",
            Ev::Wake { .. } => "wake",
            Ev::Fault(_) => "fault",
            Ev::Restart { .. } => "restart",
            Ev::PartitionEnd { .. } => "partition ends",
            Ev::Depart { .. } => "depart",
            Ev::Arrive => "arrive",
            Ev::StartJoin { .. } => "start join",
            Ev::Lookup => "lookup",
            Ev::FailLookup => "lookup after failure",
            Ev::Sample => "sample",
            Ev::SafetyTick => "safety check",
            Ev::Heal => "heal",
            Ev::DiskDone { .. } => "disk done",
            Ev::StorePut => "client put",
            Ev::StoreGet => "client get",
            Ev::RecordWrite => "client record write",
            Ev::Register => "client registers users",
            Ev::Packet { .. } => "packet",
            Ev::AttackPut => "attacker put",
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Ev::Deliver { .. } => 1,
            Ev::Wake { .. } => 2,
            Ev::Fault(_) => 3,
            Ev::Restart { .. } => 4,
            Ev::PartitionEnd { .. } => 5,
            Ev::Depart { .. } => 6,
            Ev::Arrive => 7,
            Ev::StartJoin { .. } => 8,
            Ev::Lookup => 9,
            Ev::FailLookup => 10,
            Ev::Sample => 11,
            Ev::SafetyTick => 12,
            Ev::Heal => 13,
            Ev::DiskDone { .. } => 14,
            Ev::StorePut => 15,
            Ev::StoreGet => 16,
            Ev::RecordWrite => 17,
            Ev::Register => 18,
            Ev::Packet { .. } => 19,
            Ev::AttackPut => 20,
        }
    }
}

/// A popped event. The queue holds only slab indices, so it does not move
/// whole messages around.
struct Queued {
    at: u64,
    ev: Ev,
}

/// One node in a picture of the ring.
#[derive(Clone, Copy, Debug)]
pub struct RingPoint {
    pub id: Id,
    /// Live and joined.
    pub member: bool,
    pub succ: Option<Id>,
    pub pred: Option<Id>,
}

struct Slot {
    peer: Peer,
    /// The machine's first slot: every virtual node of a machine sits in
    /// the slots `head..head + vnodes` and answers at `Addr::Slot(head)`.
    head: u32,
    /// A machine without a trusted endorsement (with `--secure`).
    attacker: bool,
    /// With `--secure`: a machine that arrived later, unendorsed; it
    /// registers with a member before it joins.
    registers: bool,
    node: Option<Node>,
    incarnation: u32,
    member: bool,
    /// Churn departures are for good; crashed nodes may restart.
    departed: bool,
    /// Paused or cut off past the suspicion window until then (the fail
    /// guard counts the node as failed meanwhile).
    suspended_until: u64,
    /// When the node last became a member.
    joined_at: u64,
    /// What survives a crash (lost with the node when it departs for good).
    disk: Disk,
}

/// A slot's timer state, kept apart from [`Slot`]: most wakes find nothing
/// due (a reply cleared the request deadline they were armed for) and are
/// decided here, in a small dense array, without touching the node's state.
#[derive(Clone, Copy)]
struct Hot {
    /// When the queued wake that counts is due (`u64::MAX`: none).
    wake_at: u64,
    paused_until: u64,
    /// The node's `poll_timeout()` as of its last handling; `None` when
    /// something else has changed the node since (ask it).
    due: Option<Option<u64>>,
}

impl Hot {
    const IDLE: Hot = Hot {
        wake_at: u64::MAX,
        paused_until: 0,
        due: None,
    };

    /// This slot's queued wake, due at `now`, will run its node.
    fn runs_node_at(&self, now: u64) -> bool {
        self.wake_at == now
            && self.paused_until <= now
            && self.due.flatten().is_some_and(|t| t <= now)
    }
}

/// One line of the failure trace, kept compact and formatted only on failure.
#[derive(Clone, Debug)]
struct TraceRec {
    at: u64,
    node: u32,
    what: TraceWhat,
}

#[derive(Clone, Debug)]
enum TraceWhat {
    Deliver { kind: &'static str, from: Id },
    Fault(FaultKind),
    Event(&'static str),
}

impl std::fmt::Display for TraceRec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t={}ms ", self.at)?;
        if self.node != u32::MAX {
            write!(f, "node={} ", self.node)?;
        }
        match &self.what {
            TraceWhat::Deliver { kind, from } => write!(f, "deliver {kind} from {from:?}"),
            TraceWhat::Fault(k) => write!(f, "fault {k:?}"),
            TraceWhat::Event(name) => write!(f, "{name}"),
        }
    }
}

pub struct World {
    cfg: SimConfig,
    r: usize,
    node_cfg: std::sync::Arc<peerstore_core::Config>,
    now: u64,
    events: u64,
    /// Pending events (slab indices) in (time, sequence) order.
    queue: EventQueue<u32>,
    slab: Vec<Option<Ev>>,
    slab_free: Vec<u32>,
    slots: Vec<Slot>,
    /// Timer state of each slot, by slot index.
    hot: Vec<Hot>,
    /// The oracle: members (live and joined) by id.
    members: BTreeMap<Id, u32>,
    member_list: Vec<u32>,
    member_pos: Vec<usize>,
    net: Network,
    rng_net: ChaCha8Rng,
    rng_fault: ChaCha8Rng,
    rng_work: ChaCha8Rng,
    /// Client signatures (with `--secure`; its own stream, so other runs
    /// draw nothing from it).
    rng_sig: ChaCha8Rng,
    /// The client gate of each node that clients have used (with `--secure`).
    gates: BTreeMap<u32, Gate>,
    /// Node commands run for a gate: which node's gate, and its handle.
    gate_cmds: BTreeMap<CmdId, (u32, GateCmd)>,
    /// Requests from a client whose user never registered.
    rogue_cmds: std::collections::BTreeSet<CmdId>,
    /// Each simulated user's client (with `--secure`): its own links, at
    /// address `CLIENT_BASE + index`. Index `users().len()` is the user
    /// who never registered.
    clients: Vec<Links>,
    /// Calls a gate is working on: (node slot, gate client handle) to the
    /// client's address and its call id.
    gate_calls: BTreeMap<(u32, u64), (Addr, CmdId)>,
    next_gate_call: u64,
    next_cut: u64,
    trace: TraceHash,
    tail: VecDeque<TraceRec>,
    outbuf: Vec<Output>,
    dirty: bool,
    // workload
    next_cmd: CmdId,
    lookups: BTreeMap<CmdId, (u64, Id)>,
    lookup_stats: LookupStats,
    hops: Vec<u32>,
    fail_lookups_left: u64,
    frozen: bool,
    // outcome
    violations: u64,
    first_violation: Option<(u64, Violation)>,
    healed_at: Option<u64>,
    converged_at: Option<u64>,
    no_liveness: bool,
    stop: bool,
    samples: Vec<Sample>,
    node_ms: u128,
    last_sample_at: u64,
    retired_stats: NodeStats,
    crashes: u64,
    crashes_refused: u64,
    joins_failed: u64,
    /// (time, live principals) from the fail guard's last count.
    principals_cache: std::cell::Cell<Option<(u64, usize)>>,
    /// Secure links per machine (index: head / vnodes), with `--secure`.
    links: Vec<Option<Links>>,
    attacker_ids: std::collections::BTreeSet<Id>,
    /// Chains machines got by registering (what a node keeps on disk).
    chains: BTreeMap<usize, Vec<u8>>,
    /// When the last packet on each directed link arrives: links are
    /// ordered streams.
    link_fifo: BTreeMap<(u32, u32), u64>,
    /// Counters of links already dropped with their machines.
    retired_links: LinkStats,
    sec: SecurityReport,
    attack_cmds: std::collections::BTreeSet<CmdId>,
    /// Slot whose every output is printed (PEERSTORE_SIM_WATCH=slot), for
    /// replaying a failing seed.
    watch: Option<u32>,
    store: StoreSide,
    /// Key prefix whose durable copies are traced (PEERSTORE_SIM_KEY).
    watch_key: Option<String>,
}

/// The storage workload's state and the durability oracle.
#[derive(Default)]
struct StoreSide {
    records: Option<Records>,
    /// Client commands in flight: issued at, key, what an ack promises
    /// (None for a get).
    cmds: BTreeMap<CmdId, (u64, Id, Option<Expect>)>,
    /// Every acknowledged write, by key.
    acked: BTreeMap<Id, Vec<Expect>>,
    acked_keys: Vec<Id>,
    /// When durable copies of a key were lost for good.
    losses: BTreeMap<Id, Vec<u64>>,
    latencies: Vec<u64>,
    rep: StorageReport,
    repaired_at: Option<u64>,
    no_liveness: bool,
    /// Graceful leaves waiting for their hand-off to finish.
    leaving: BTreeMap<CmdId, u32>,
    /// Which node (slot, incarnation) runs each client command.
    cmd_node: BTreeMap<CmdId, (u32, u32)>,
    /// Repair bytes already sent by nodes that are gone.
    retired_repair_bytes: u64,
    /// Repair bytes sent before a scripted kill (the experiment counts
    /// only what the repair after it cost).
    repair_bytes_at_kill: Option<u64>,
    /// The read sweep after repair: keys still to read, replies awaited.
    final_reads: Vec<Id>,
    final_reads_waiting: u64,
}

/// A running 128-bit digest of every event (two independent 64-bit lanes).
/// Not cryptographic: it only has to tell two traces apart.
#[derive(Clone, Default)]
struct TraceHash {
    a: u64,
    b: u64,
    n: u64,
}

impl TraceHash {
    fn add(&mut self, word: u64) {
        self.n += 1;
        self.a = splitmix(self.a ^ word).rotate_left(17);
        self.b = splitmix(
            self.b
                .wrapping_add(word ^ self.n.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        );
    }

    fn finish(&self) -> String {
        format!(
            "{:016x}{:016x}",
            splitmix(self.a ^ self.n),
            splitmix(self.b)
        )
    }
}

/// Client addresses start here (machine heads are slot numbers below it).
const CLIENT_BASE: u32 = 1 << 30;
/// A client's hop to the node it calls (it runs beside it).
const CLIENT_HOP_MS: u64 = 1;

/// Asks the CPU to start loading the cache lines of `count` values at `p`.
#[inline(always)]
fn prefetch<T>(p: *const T, count: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let base = p as *const u8;
        for off in (0..std::mem::size_of::<T>() * count).step_by(64) {
            // SAFETY: a prefetch is only a hint: it never faults and never
            // reads into the program, whatever the address.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    base.wrapping_add(off) as *const i8,
                )
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, count);
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A seeded RNG for one named stream of a run.
fn stream(seed: u64, name: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix(seed ^ splitmix(name)))
}

impl World {
    pub fn new(mut cfg: SimConfig) -> World {
        let mut rng_fault = stream(cfg.seed, 2);
        if cfg.swarm {
            // Swarm testing: the fault mix itself comes from the seed.
            cfg.net.loss = rng_fault.gen_range(0.0..0.08);
            cfg.net.duplicate = rng_fault.gen_range(0.0..0.05);
            cfg.net.reorder = rng_fault.gen_range(0.0..0.3);
            cfg.net.latency_sigma = rng_fault.gen_range(0.1..1.0);
            cfg.rates.crash_per_s = rng_fault.gen_range(0.0..0.05);
            cfg.rates.pause_per_s = rng_fault.gen_range(0.0..0.05);
            cfg.rates.partition_per_s = rng_fault.gen_range(0.0..0.03);
            cfg.rates.clog_per_s = rng_fault.gen_range(0.0..0.05);
        }
        if cfg.secure {
            // Links run on ordered streams (TCP): no duplicates reach them.
            cfg.net.duplicate = 0.0;
        }
        let r = cfg.r();
        let node_cfg = std::sync::Arc::new(cfg.node_config());
        let net = Network::new(cfg.net.clone());
        World {
            r,
            node_cfg,
            now: 0,
            events: 0,
            queue: EventQueue::new(),
            slab: Vec::new(),
            slab_free: Vec::new(),
            slots: Vec::new(),
            hot: Vec::new(),
            members: BTreeMap::new(),
            member_list: Vec::new(),
            member_pos: Vec::new(),
            net,
            rng_net: stream(cfg.seed, 1),
            rng_fault,
            rng_work: stream(cfg.seed, 3),
            rng_sig: stream(cfg.seed, 7),
            gates: BTreeMap::new(),
            gate_cmds: BTreeMap::new(),
            rogue_cmds: Default::default(),
            clients: Vec::new(),
            gate_calls: BTreeMap::new(),
            next_gate_call: 0,
            next_cut: 0,
            trace: TraceHash::default(),
            tail: VecDeque::new(),
            outbuf: Vec::new(),
            dirty: false,
            next_cmd: 0,
            lookups: BTreeMap::new(),
            lookup_stats: LookupStats::default(),
            hops: Vec::new(),
            fail_lookups_left: 0,
            frozen: false,
            violations: 0,
            first_violation: None,
            healed_at: None,
            converged_at: None,
            no_liveness: false,
            stop: false,
            samples: Vec::new(),
            node_ms: 0,
            last_sample_at: 0,
            retired_stats: NodeStats::default(),
            crashes: 0,
            crashes_refused: 0,
            joins_failed: 0,
            principals_cache: std::cell::Cell::new(None),
            links: Vec::new(),
            attacker_ids: Default::default(),
            chains: BTreeMap::new(),
            link_fifo: BTreeMap::new(),
            retired_links: LinkStats::default(),
            sec: SecurityReport::default(),
            attack_cmds: Default::default(),
            watch: std::env::var("PEERSTORE_SIM_WATCH")
                .ok()
                .and_then(|v| v.parse().ok()),
            store: StoreSide::default(),
            watch_key: std::env::var("PEERSTORE_SIM_KEY").ok(),
            cfg,
        }
    }

    fn push(&mut self, at: u64, ev: Ev) {
        let idx = match self.slab_free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(ev);
                i
            }
            None => {
                self.slab.push(Some(ev));
                (self.slab.len() - 1) as u32
            }
        };
        self.queue.push(at, idx);
    }

    fn pop(&mut self) -> Option<Queued> {
        let (at, idx) = self.queue.pop()?;
        let ev = self.slab[idx as usize]
            .take()
            .expect("queued events are in the slab");
        self.slab_free.push(idx);
        Some(Queued { at, ev })
    }

    // ----- population ----------------------------------------------------------

    /// A new machine: `vnodes` slots whose ids derive from one identity
    /// (virtual node 0's id is the identity's plain hash). Returns its head.
    fn new_host(&mut self) -> u32 {
        let head = self.slots.len() as u32;
        let identity = if self.cfg.secure {
            // Ring ids derive from the machine's key, as in a real node.
            crate::secure::key_for(self.cfg.seed, self.machine(head) as u64)
                .public_der()
                .to_vec()
        } else {
            format!("peerstore-sim/{}/node/{head}", self.cfg.seed).into_bytes()
        };
        for i in 0..self.cfg.vnodes.max(1) as u32 {
            let id = peerstore_core::vnode::vnode_id(&identity, i);
            self.new_slot(head, id);
        }
        head
    }

    /// Machine number of slot `k`.
    fn machine(&self, k: u32) -> usize {
        k as usize / self.cfg.vnodes.max(1)
    }

    fn new_slot(&mut self, head: u32, id: Id) -> u32 {
        let k = self.slots.len() as u32;
        self.slots.push(Slot {
            peer: Peer {
                id,
                addr: Addr::Slot(head),
            },
            head,
            attacker: false,
            registers: false,
            node: None,
            incarnation: 0,
            member: false,
            departed: false,
            suspended_until: 0,
            joined_at: 0,
            disk: Disk::default(),
        });
        self.hot.push(Hot::IDLE);
        self.member_pos.push(usize::MAX);
        k
    }

    /// The slots of `k`'s machine (just `k` with one virtual node).
    fn host_slots(&self, k: u32) -> std::ops::Range<u32> {
        let head = self.slots[k as usize].head;
        head..head + self.cfg.vnodes.max(1) as u32
    }

    /// The running slots of `k`'s machine.
    fn host_live(&self, k: u32) -> Vec<u32> {
        self.host_slots(k)
            .filter(|&j| self.slots[j as usize].node.is_some())
            .collect()
    }

    fn fresh_node(&mut self, k: u32) {
        if self.cfg.secure {
            self.machine_up(k);
        }
        let slot = &mut self.slots[k as usize];
        slot.incarnation += 1;
        let seed = splitmix(self.cfg.seed ^ splitmix(((k as u64) << 20) | slot.incarnation as u64));
        slot.node = Some(Node::new(self.node_cfg.clone(), slot.peer, seed));
        self.hot[k as usize] = Hot::IDLE;
    }

    fn add_member(&mut self, k: u32) {
        let s = &mut self.slots[k as usize];
        if s.member {
            return;
        }
        s.member = true;
        s.joined_at = self.now;
        self.members.insert(s.peer.id, k);
        self.member_pos[k as usize] = self.member_list.len();
        self.member_list.push(k);
        self.dirty = true;
    }

    fn remove_member(&mut self, k: u32) {
        let s = &mut self.slots[k as usize];
        if !s.member {
            return;
        }
        s.member = false;
        self.members.remove(&s.peer.id);
        let pos = self.member_pos[k as usize];
        self.member_list.swap_remove(pos);
        if pos < self.member_list.len() {
            let moved = self.member_list[pos];
            self.member_pos[moved as usize] = pos;
        }
        self.member_pos[k as usize] = usize::MAX;
        self.dirty = true;
    }

    fn random_member(&mut self) -> Option<u32> {
        if self.member_list.is_empty() {
            return None;
        }
        let i = self.rng_work.gen_range(0..self.member_list.len());
        Some(self.member_list[i])
    }

    fn oracle_successor(&self, key: Id) -> Option<Id> {
        self.members
            .range(key..)
            .next()
            .or_else(|| self.members.iter().next())
            .map(|(id, _)| *id)
    }

    /// Removes a node's state (crash, departure), keeping its counters.
    fn retire(&mut self, k: u32) {
        self.remove_member(k);
        self.gates.remove(&k);
        self.gate_calls.retain(|(g, _), _| *g != k);
        let s = &mut self.slots[k as usize];
        if let Some(n) = s.node.take() {
            let st = n.stats();
            self.retired_stats.sent_maintenance += st.sent_maintenance;
            self.retired_stats.sent_lookup += st.sent_lookup;
            self.retired_stats.sent_replies += st.sent_replies;
            self.retired_stats.timeouts += st.timeouts;
            self.retired_stats.dropped_unexpected += st.dropped_unexpected;
            self.store.retired_repair_bytes += n.store_stats().repair_bytes_sent;
        }
        s.disk.crash();
        self.hot[k as usize] = Hot {
            paused_until: self.hot[k as usize].paused_until,
            ..Hot::IDLE
        };
        self.dirty = true;
        if self.cfg.secure && self.host_live(k).is_empty() {
            // The machine is down: its sessions die with it.
            let m = self.machine(k);
            if let Some(l) = self.links.get_mut(m).and_then(Option::take) {
                self.retired_links += l.stats();
            }
            // Its clients' connections close with it (as TCP's would).
            let head = Addr::Slot(self.slots[k as usize].head);
            for c in &mut self.clients {
                c.reset(head);
            }
        }
    }

    /// A machine (re)starts: new links, nothing of the old sessions.
    fn machine_up(&mut self, k: u32) {
        let m = self.machine(k);
        if self.links.len() <= m {
            self.links.resize_with(m + 1, || None);
        }
        if self.links[m].is_some() {
            return;
        }
        let head = self.slots[k as usize].head;
        let key = crate::secure::key_for(self.cfg.seed, m as u64);
        let inc = self.slots[k as usize].incarnation as u64;
        let seed = splitmix(self.cfg.seed ^ splitmix(((m as u64) << 24) | inc) ^ 0x11);
        use crate::secure::Credential;
        let credential = if self.slots[k as usize].attacker {
            if self.cfg.attackers_endorsed {
                Credential::Root
            } else {
                Credential::Rogue
            }
        } else if let Some(chain) = self.chains.get(&m) {
            Credential::Chain(chain.clone())
        } else if self.slots[k as usize].registers {
            Credential::None
        } else {
            Credential::Root
        };
        self.links[m] = Some(crate::secure::links(
            &key,
            &format!("slot:{head}"),
            credential,
            self.now,
            seed,
        ));
    }

    /// Puts a machine's outgoing packets on the network: each directed
    /// link is an ordered stream, so a packet never overtakes an earlier one.
    fn flush_links(&mut self, head: u32) {
        let m = self.machine(head);
        loop {
            let Some(p) = self
                .links
                .get_mut(m)
                .and_then(|l| l.as_mut()?.poll_packet())
            else {
                return;
            };
            let Addr::Slot(to) = p.to else { continue };
            if to >= CLIENT_BASE {
                // A client sits beside the node it calls: a fixed short hop,
                // in order, never lost.
                self.push(
                    self.now + CLIENT_HOP_MS,
                    Ev::Packet {
                        to,
                        from: Addr::Slot(head),
                        bytes: p.bytes,
                    },
                );
                continue;
            }
            if let Some(d) = self.net.route_stream(&mut self.rng_net, self.now, head, to) {
                let last = self.link_fifo.entry((head, to)).or_insert(0);
                let at = (self.now + d).max(*last);
                *last = at;
                self.push(
                    at,
                    Ev::Packet {
                        to,
                        from: Addr::Slot(head),
                        bytes: p.bytes,
                    },
                );
            }
        }
    }

    /// Bytes arrived at machine `head` on a secure link.
    fn on_packet(&mut self, head: u32, from: Addr, bytes: Vec<u8>) {
        if head >= CLIENT_BASE {
            return self.on_client_packet((head - CLIENT_BASE) as usize, from, bytes);
        }
        if self.host_live(head).is_empty() {
            return;
        }
        if self.hot[head as usize].paused_until > self.now {
            let at = self.hot[head as usize].paused_until;
            self.push(
                at,
                Ev::Packet {
                    to: head,
                    from,
                    bytes,
                },
            );
            return;
        }
        let m = self.machine(head);
        let Some(links) = self.links.get_mut(m).and_then(Option::as_mut) else {
            return;
        };
        let got = links.receive(self.now, from, &bytes);
        let mut registered = Vec::new();
        while let Some(peerstore_core::link::LinkEvent::Registered { known, .. }) =
            links.poll_event()
        {
            registered.push(known);
        }
        // Only the first registration starts the join and the round of
        // endorsements in turn (their answers are registrations too).
        if !registered.is_empty() && !self.chains.contains_key(&m) {
            let chain = links.credential().to_vec();
            self.chains.insert(m, chain);
            self.sec.registrations += 1;
            // Registered: join now, and ask a few of the machines it was
            // told about to endorse it in turn.
            for known in registered {
                for a in known.into_iter().take(2) {
                    if let Some(l) = self.links.get_mut(m).and_then(Option::as_mut) {
                        l.register(self.now, a, &format!("slot:{head}"));
                    }
                }
            }
            for j in self.host_slots(head) {
                let inc = self.slots[j as usize].incarnation;
                self.start_join(j, inc);
            }
        }
        self.flush_links(head);
        let from_attacker = match from {
            Addr::Slot(h) => self.slots.get(h as usize).is_some_and(|s| s.attacker),
            Addr::Tcp(_) => false,
        };
        for d in got {
            let Some(j) = self
                .host_slots(head)
                .find(|&j| self.slots[j as usize].peer.id == d.to)
            else {
                continue;
            };
            if self.slots[j as usize].node.is_none() {
                continue;
            }
            if from_attacker && !self.slots[j as usize].attacker {
                self.sec.attacker_messages_delivered += 1;
            }
            self.handle(
                j,
                Input::Message {
                    from: d.from,
                    msg: d.msg,
                },
            );
        }
        self.take_calls(head);
    }

    /// Hands the client calls that reached machine `head` to the gate of
    /// the node each names.
    fn take_calls(&mut self, head: u32) {
        let m = self.machine(head);
        let mut calls = Vec::new();
        while let Some(c) = self.links.get_mut(m).and_then(|l| l.as_mut()?.poll_call()) {
            calls.push(c);
        }
        for call in calls {
            // The node the request names (the gate refuses any other).
            let named = call.req.node().and_then(|node| {
                self.host_slots(head)
                    .find(|&j| self.slots[j as usize].peer.id == node)
            });
            let k = named.unwrap_or(head);
            if self.slots[k as usize].node.is_none() {
                let reply = GateReply::refusal(
                    &call.req,
                    peerstore_core::gate::GateError::Store(peerstore_core::StoreError::NotJoined),
                );
                if let Some(l) = self.links.get_mut(m).and_then(Option::as_mut) {
                    l.answer(call.from, call.id, &reply);
                }
                continue;
            }
            self.next_gate_call += 1;
            let handle = self.next_gate_call;
            self.gate_calls.insert((k, handle), (call.from, call.id));
            let me = self.slots[k as usize].peer.id;
            let cfg = peerstore_core::reqauth::GuardConfig {
                min_key_bits: crate::secure::SIM_KEY_BITS,
                ..Default::default()
            };
            self.gates
                .entry(k)
                .or_insert_with(|| Gate::new(me, cfg))
                .request(self.now, handle, call.req);
            self.pump_gate(k);
        }
        self.flush_links(head);
    }

    /// Bytes arrived at client `c` from a node.
    fn on_client_packet(&mut self, c: usize, from: Addr, bytes: Vec<u8>) {
        let Some(client) = self.clients.get_mut(c) else {
            return;
        };
        let _ = client.receive(self.now, from, &bytes);
        let mut answers = Vec::new();
        while let Some(a) = client.poll_answer() {
            answers.push(a);
        }
        self.flush_client(c);
        for (_, id, reply) in answers {
            self.on_answer(id, reply);
        }
    }

    /// Puts client `c`'s packets on its hop to the node it calls.
    fn flush_client(&mut self, c: usize) {
        while let Some(p) = self.clients.get_mut(c).and_then(Links::poll_packet) {
            let Addr::Slot(to) = p.to else { continue };
            self.push(
                self.now + CLIENT_HOP_MS,
                Ev::Packet {
                    to,
                    from: Addr::Slot(CLIENT_BASE + c as u32),
                    bytes: p.bytes,
                },
            );
        }
    }

    fn session_ms(&mut self) -> u64 {
        let live = self.cfg.nodes.max(1) as f64;
        let mean_ms = live / self.cfg.churn_per_s * 1000.0;
        let ms = match self.cfg.session {
            Session::Exp => Exp::new(1.0 / mean_ms)
                .expect("positive rate")
                .sample(&mut self.rng_work),
            // Weibull(k = 0.5) has mean scale * Gamma(1 + 1/k) = 2 * scale.
            Session::Weibull => Weibull::new(mean_ms / 2.0, 0.5)
                .expect("valid weibull")
                .sample(&mut self.rng_work),
        };
        ms.max(1.0) as u64
    }

    // ----- set-up -----------------------------------------------------------------

    fn setup(&mut self) {
        let v = self.cfg.vnodes.max(1);
        let hosts = self.cfg.nodes.max(1);
        for _ in 0..hosts {
            self.new_host();
        }
        let n = hosts * v;
        let base = match self.cfg.start {
            Start::Ideal => n,
            // Whole machines: enough to hold a full successor list.
            Start::Join => (self.r + 1).div_ceil(v).min(hosts) * v,
        };
        // The base ring: ideal pointers, installed directly (Zave's initialisation).
        let mut ids: Vec<(Id, u32)> = (0..base as u32)
            .map(|k| (self.slots[k as usize].peer.id, k))
            .collect();
        ids.sort_unstable();
        let sorted: Vec<Id> = ids.iter().map(|x| x.0).collect();
        let by_pos: Vec<Peer> = ids
            .iter()
            .map(|&(_, k)| self.slots[k as usize].peer)
            .collect();
        let m = by_pos.len();
        for (pos, &(_, k)) in ids.iter().enumerate() {
            self.fresh_node(k);
            let me = by_pos[pos];
            let succs: Vec<Peer> = (1..=self.r.min(m - 1))
                .map(|d| by_pos[(pos + d) % m])
                .collect();
            let pred = (m > 1).then(|| by_pos[(pos + m - 1) % m]);
            let fingers: Vec<Option<Peer>> = (0..ID_BITS)
                .map(|i| {
                    let t = me.id.add_pow2(i);
                    let j = match sorted.binary_search(&t) {
                        Ok(j) => j,
                        Err(j) => j % m,
                    };
                    Some(by_pos[j]).filter(|p| p.id != me.id)
                })
                .collect();
            self.slots[k as usize]
                .node
                .as_mut()
                .expect("fresh")
                .bootstrap(0, succs, pred, Some(fingers));
            self.after_handle(k);
        }
        for k in base as u32..n as u32 {
            self.fresh_node(k);
            let at = self.rng_work.gen_range(0..=self.cfg.join_spread_ms.max(1));
            self.push(
                at,
                Ev::StartJoin {
                    node: k,
                    incarnation: 1,
                },
            );
        }
        if self.cfg.churn_per_s > 0.0 {
            for k in (0..n as u32).step_by(v) {
                let at = self.session_ms();
                self.push(
                    at,
                    Ev::Depart {
                        node: k,
                        incarnation: 1,
                    },
                );
            }
            let gap = self.arrival_gap();
            self.push(gap, Ev::Arrive);
        }
        self.plan_faults();
        if self.cfg.secure && self.cfg.attackers > 0 {
            self.setup_attackers();
        }
        if self.cfg.lookups_per_node_per_min > 0.0 {
            let gap = self.lookup_gap();
            self.push(gap, Ev::Lookup);
        }
        if self.cfg.storage.enabled {
            self.setup_storage();
        }
        self.push(self.cfg.sample_ms, Ev::Sample);
        if let CheckMode::EveryMs(ms) = self.cfg.check {
            self.push(ms.max(1), Ev::SafetyTick);
        }
        self.push(self.cfg.duration_ms, Ev::Heal);
        if self.dirty {
            self.check_safety_now();
        }
    }

    fn plan_faults(&mut self) {
        let mut plan = self.cfg.plan.clone();
        let rates = self.cfg.rates.clone();
        let dur = self.cfg.duration_ms;
        let n = self.cfg.nodes.max(1) as u32;
        let draw = |rate: f64,
                    rng: &mut ChaCha8Rng,
                    f: &mut dyn FnMut(&mut ChaCha8Rng, u64) -> FaultKind| {
            let mut out = Vec::new();
            if rate <= 0.0 {
                return out;
            }
            let exp = Exp::new(rate / 1000.0).expect("positive");
            let mut t = 0.0;
            for _ in 0..1_000_000 {
                t += exp.sample(rng);
                if t as u64 >= dur {
                    break;
                }
                out.push(Fault {
                    at_ms: t as u64,
                    kind: f(rng, t as u64),
                });
            }
            out
        };
        let stab = self.cfg.stabilize_ms;
        let pmax = if rates.partition_max_ms > 0 {
            rates.partition_max_ms
        } else {
            self.cfg.suspect_ms / 2
        };
        let rng = &mut self.rng_fault;
        plan.extend(draw(rates.crash_per_s, rng, &mut |r, _| FaultKind::Crash {
            node: r.gen_range(0..n),
            down_ms: r.gen_range(stab..stab * 30),
        }));
        // Pauses, like partitions, stay inside the failure detector's window;
        // a longer one is a failure to the protocol and goes through the guard.
        plan.extend(draw(rates.pause_per_s, rng, &mut |r, _| FaultKind::Pause {
            node: r.gen_range(0..n),
            for_ms: r.gen_range(100..pmax.max(101)),
        }));
        plan.extend(draw(rates.partition_per_s, rng, &mut |r, _| {
            let cut = match r.gen_range(0..3) {
                0 => Cut::Symmetric {
                    fraction: r.gen_range(0.2..0.8),
                },
                1 => Cut::OneWay {
                    fraction: r.gen_range(0.2..0.8),
                },
                _ => Cut::Isolate {
                    node: r.gen_range(0..n),
                },
            };
            // An isolated node may stay cut off long: the ring routes around it.
            let for_ms = match cut {
                Cut::Isolate { .. } => r.gen_range(100..stab * 20),
                _ => r.gen_range(100..pmax.max(101)),
            };
            FaultKind::Partition { cut, for_ms }
        }));
        plan.extend(draw(rates.clog_per_s, rng, &mut |r, _| FaultKind::Clog {
            a: r.gen_range(0..n),
            b: r.gen_range(0..n),
            for_ms: r.gen_range(100..stab * 10),
        }));
        if self.cfg.fail_fraction > 0.0 {
            plan.push(Fault {
                at_ms: self.cfg.fail_at_ms,
                kind: FaultKind::MassFail {
                    fraction: self.cfg.fail_fraction,
                },
            });
        }
        if self.cfg.kill_adjacent > 0 {
            let node = self.rng_fault.gen_range(0..n);
            plan.push(Fault {
                at_ms: self.cfg.fail_at_ms,
                kind: FaultKind::KillRun {
                    node,
                    count: self.cfg.kill_adjacent,
                },
            });
        }
        plan.sort_by_key(|f| f.at_ms);
        for f in plan {
            if f.at_ms < self.cfg.duration_ms {
                self.push(f.at_ms, Ev::Fault(f.kind));
            }
        }
    }

    fn arrival_gap(&mut self) -> u64 {
        let exp = Exp::new(self.cfg.churn_per_s / 1000.0).expect("positive churn");
        (exp.sample(&mut self.rng_work) as u64).max(1)
    }

    fn lookup_gap(&mut self) -> u64 {
        let rate_per_ms =
            self.member_list.len().max(1) as f64 * self.cfg.lookups_per_node_per_min / 60_000.0;
        let exp = Exp::new(rate_per_ms).expect("positive");
        (exp.sample(&mut self.rng_work) as u64).max(1)
    }

    // ----- the loop -------------------------------------------------------------

    /// Runs to completion and reports.
    pub fn run(mut self) -> Report {
        let wall = std::time::Instant::now();
        self.setup();
        self.run_loop();
        self.report(wall.elapsed().as_millis() as u64)
    }

    fn record(&mut self, q: &Queued) {
        let (node, msg_tag, req, from) = match &q.ev {
            Ev::Deliver { to, from, msg } => {
                (*to, msg.tag(), msg.req().unwrap_or(0), from.id.top_u64())
            }
            Ev::Wake { node } | Ev::Restart { node, .. } | Ev::Depart { node, .. } => {
                (*node, 0, 0, 0)
            }
            Ev::StartJoin { node, .. } => (*node, 0, 0, 0),
            Ev::Packet { to, bytes, .. } => (*to, bytes.first().copied().unwrap_or(0), 0, 0),
            _ => (u32::MAX, 0, 0, 0),
        };
        self.trace.add(q.at);
        self.trace
            .add(((q.ev.tag() as u64) << 40) | ((msg_tag as u64) << 32) | node as u64);
        self.trace.add(req);
        self.trace.add(from);
        if self.cfg.trace_tail > 0 {
            if self.tail.len() >= self.cfg.trace_tail {
                self.tail.pop_front();
            }
            let what = match &q.ev {
                Ev::Deliver { from, msg, .. } => TraceWhat::Deliver {
                    kind: msg.kind(),
                    from: from.id,
                },
                Ev::Fault(f) => TraceWhat::Fault(*f),
                other => TraceWhat::Event(other.name()),
            };
            self.tail.push_back(TraceRec {
                at: q.at,
                node,
                what,
            });
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { to, from, msg } => {
                let Some(s) = self.slots.get(to as usize) else {
                    return;
                };
                if s.node.is_none() {
                    return;
                }
                let paused_until = self.hot[to as usize].paused_until;
                if paused_until > self.now {
                    let at = paused_until;
                    self.push(at, Ev::Deliver { to, from, msg });
                    return;
                }
                self.handle(to, Input::Message { from, msg });
            }
            Ev::Packet { to, from, bytes } => self.on_packet(to, from, bytes),
            Ev::AttackPut => self.attack_put(),
            Ev::Wake { node } => {
                // A wake superseded by an earlier one, or of a node that
                // crashed since, no longer counts (crashes reset `wake_at`).
                let h = &mut self.hot[node as usize];
                if h.wake_at != self.now {
                    return;
                }
                if h.paused_until > self.now {
                    h.wake_at = h.paused_until;
                    let at = h.paused_until;
                    self.push(at, Ev::Wake { node });
                    return;
                }
                h.wake_at = u64::MAX;
                // A wake armed for a request deadline that a reply has since
                // cleared finds nothing due: re-arm it for what is, and leave
                // the node untouched (a timeout with nothing due is a no-op).
                let due = match h.due {
                    Some(due) => due,
                    None => {
                        let s = &self.slots[node as usize];
                        s.node.as_ref().and_then(|n| n.poll_timeout())
                    }
                };
                if due.is_none_or(|t| t > self.now) {
                    if let Some(t) = due {
                        self.hot[node as usize].wake_at = t;
                        self.push(t, Ev::Wake { node });
                    }
                    return;
                }
                self.handle(node, Input::Timeout);
            }
            Ev::Fault(kind) => {
                if self.healed_at.is_none() {
                    self.fault(kind);
                }
            }
            Ev::Restart { node, incarnation } => {
                let s = &self.slots[node as usize];
                if s.incarnation == incarnation && s.node.is_none() && !s.departed {
                    self.fresh_node(node);
                    self.restore_from_disk(node);
                    let inc = self.slots[node as usize].incarnation;
                    self.start_join(node, inc);
                }
            }
            Ev::PartitionEnd { id } => self.net.end_cut(id),
            Ev::Depart { node, incarnation } => {
                if self.healed_at.is_none() {
                    self.depart(node, incarnation);
                }
            }
            Ev::Arrive => {
                let full = self.cfg.secure
                    && self.machine(self.slots.len() as u32) as u64 >= crate::secure::POOL;
                if self.healed_at.is_none() && !full {
                    let k = self.new_host();
                    for j in self.host_slots(k) {
                        self.slots[j as usize].registers = self.cfg.secure;
                    }
                    for j in self.host_slots(k) {
                        self.fresh_node(j);
                        self.start_join(j, 1);
                    }
                    let at = self.now + self.session_ms();
                    self.push(
                        at,
                        Ev::Depart {
                            node: k,
                            incarnation: 1,
                        },
                    );
                    let at = self.now + self.arrival_gap();
                    self.push(at, Ev::Arrive);
                }
            }
            Ev::StartJoin { node, incarnation } => self.start_join(node, incarnation),
            Ev::Lookup => {
                if self.healed_at.is_none() && !self.frozen {
                    if let Some(k) = self.random_member() {
                        let key = Id(self.rng_work.gen());
                        self.issue_lookup(k, key);
                    }
                    let at = self.now + self.lookup_gap();
                    self.push(at, Ev::Lookup);
                }
            }
            Ev::FailLookup => {
                if let Some(k) = self.random_member() {
                    let key = Id(self.rng_work.gen());
                    self.issue_lookup(k, key);
                }
            }
            Ev::Sample => self.sample(),
            Ev::SafetyTick => {
                if let CheckMode::EveryMs(ms) = self.cfg.check {
                    self.check_safety_now();
                    self.push(self.now + ms.max(1), Ev::SafetyTick);
                }
            }
            Ev::Heal => self.heal(),
            Ev::DiskDone {
                node,
                incarnation,
                io,
            } => {
                let cap = self.cfg.storage.disk_capacity_bytes;
                let s = &mut self.slots[node as usize];
                if s.incarnation != incarnation || s.node.is_none() {
                    return;
                }
                if let Some(result) = s.disk.complete(io, cap) {
                    if let Some(w) = &self.watch_key {
                        for (key, _) in s
                            .disk
                            .durable
                            .iter()
                            .filter(|(k, _)| format!("{k:?}").starts_with(w.as_str()))
                        {
                            eprintln!("t={} slot={node} durable {key:?}", self.now);
                        }
                    }
                    self.handle(node, Input::StorageDone { io, result });
                }
            }
            Ev::StorePut | Ev::StoreGet | Ev::RecordWrite | Ev::Register => {
                if self.healed_at.is_none() {
                    self.workload(ev);
                }
            }
        }
    }

    fn handle(&mut self, k: u32, input: Input) {
        let now = self.now;
        let Some(node) = self.slots[k as usize].node.as_mut() else {
            return;
        };
        let v0 = node.ring_version();
        node.handle(now, input);
        if node.ring_version() != v0 {
            self.dirty = true;
        }
        self.after_handle(k);
    }

    /// Drains a node's outputs and (re)arms its timer.
    fn after_handle(&mut self, k: u32) {
        let mut out = std::mem::take(&mut self.outbuf);
        let s = &mut self.slots[k as usize];
        let Some(node) = s.node.as_mut() else { return };
        while let Some(o) = node.poll_output() {
            out.push(o);
        }
        let due = node.poll_timeout();
        let h = &mut self.hot[k as usize];
        h.due = Some(due);
        if let Some(t) = due {
            let t = t.max(self.now);
            if t < h.wake_at {
                h.wake_at = t;
                self.push(t, Ev::Wake { node: k });
            }
        }
        let from = self.slots[k as usize].peer;
        if self.watch == Some(k) {
            for o in &out {
                eprintln!("t={} node={k} out {:?}", self.now, o);
            }
        }
        for o in out.drain(..) {
            match o {
                Output::Send { to, msg } => self.send(from, k, to, msg),
                Output::Reply { cmd, result } => self.on_reply(k, cmd, result),
                Output::Event(Event::Joined) => self.add_member(k),
                Output::Event(Event::SuccessorsLost) => {}
                Output::Storage { io, op } => {
                    let s = &mut self.slots[k as usize];
                    let at = s
                        .disk
                        .submit(self.now, self.cfg.storage.disk_latency_ms, io, op);
                    let incarnation = s.incarnation;
                    self.push(
                        at,
                        Ev::DiskDone {
                            node: k,
                            incarnation,
                            io,
                        },
                    );
                }
            }
        }
        self.outbuf = out;
    }

    fn send(&mut self, from: Peer, a: u32, to: Peer, mut msg: Message) {
        let Addr::Slot(head) = to.addr else { return };
        // A machine's virtual nodes share its address; the id picks one.
        let b = if self.cfg.vnodes <= 1 {
            head
        } else {
            match self
                .host_slots(head)
                .find(|&j| self.slots[j as usize].peer.id == to.id)
            {
                Some(b) => b,
                None => return,
            }
        };
        let a = self.slots[a as usize].head;
        if self.cfg.storage.corrupt > 0.0 {
            if let Message::Put {
                item: peerstore_core::Item::Block(blk),
                ..
            } = &mut msg
            {
                if !blk.data().is_empty() && self.rng_net.gen_bool(self.cfg.storage.corrupt) {
                    let i = self.rng_net.gen_range(0..blk.data().len());
                    // An i32 draw, as before the bytes went private: the same seed
                    // must keep making the same trace.
                    let bit = self.rng_net.gen_range(0..8i32) as u8;
                    blk.flip_bit(i, bit);
                    self.store.rep.corrupted_in_flight += 1;
                }
            }
        }
        if self.cfg.secure {
            if a == head {
                // Between virtual nodes of one machine: no network.
                self.push(self.now, Ev::Deliver { to: b, from, msg });
            } else {
                let m = self.machine(a);
                if let Some(l) = self.links.get_mut(m).and_then(Option::as_mut) {
                    l.send(self.now, from.id, to, &msg);
                }
                self.flush_links(a);
            }
            return;
        }
        match self.net.route(&mut self.rng_net, self.now, a, head) {
            Fate::Dropped => {}
            Fate::Deliver(d1, d2) => {
                if let Some(d2) = d2 {
                    self.push(
                        self.now + d2,
                        Ev::Deliver {
                            to: b,
                            from,
                            msg: msg.clone(),
                        },
                    );
                }
                self.push(self.now + d1, Ev::Deliver { to: b, from, msg });
            }
        }
    }

    fn on_reply(&mut self, k: u32, cmd: CmdId, result: CmdResult) {
        if let Some((g, gc)) = self.gate_cmds.remove(&cmd) {
            if let Some(gate) = self.gates.get_mut(&g) {
                gate.command_done(self.now, gc, result);
            }
            return self.pump_gate(g);
        }
        if self.attack_cmds.remove(&cmd) {
            if matches!(result, CmdResult::Put(Ok(_))) {
                self.sec.attack_puts_acked += 1;
            }
            return;
        }
        match result {
            CmdResult::Lookup(r) => {
                let Some((_, key)) = self.lookups.remove(&cmd) else {
                    return;
                };
                self.lookup_stats.count += 1;
                match r {
                    Ok(ok) => {
                        self.hops.push(ok.hops);
                        self.lookup_stats.timeouts_total += ok.timeouts as u64;
                        if Some(ok.owner.id) != self.oracle_successor(key) {
                            if std::env::var_os("PEERSTORE_SIM_DUMP").is_some() {
                                eprintln!(
                                    "wrong lookup at {} ms by slot {k} {:?}: key {:?} -> {:?}, true owner {:?} ({} hops, {} timeouts)",
                                    self.now,
                                    self.slots[k as usize].peer.id,
                                    key,
                                    ok.owner.id,
                                    self.oracle_successor(key),
                                    ok.hops,
                                    ok.timeouts
                                );
                            }
                            self.lookup_stats.wrong += 1;
                        }
                    }
                    Err(e) => {
                        if std::env::var_os("PEERSTORE_SIM_DUMP").is_some() {
                            eprintln!(
                                "failed lookup at {} ms by {:?}: key {:?}: {e}",
                                self.now, self.slots[k as usize].peer.id, key
                            );
                        }
                        self.lookup_stats.failed += 1
                    }
                }
            }
            CmdResult::Put(r) => self.on_put_reply(cmd, r),
            CmdResult::Get(r) => self.on_get_reply(cmd, r),
            CmdResult::Done => {
                if let Some(k) = self.store.leaving.remove(&cmd) {
                    self.retire(k);
                    self.lose_disk(k);
                }
            }
            CmdResult::JoinFailed(_) => {
                self.joins_failed += 1;
                // Try again later through someone else, as an operator would.
                let inc = self.slots[k as usize].incarnation;
                let at = self.now + 5_000;
                self.push(
                    at,
                    Ev::StartJoin {
                        node: k,
                        incarnation: inc,
                    },
                );
            }
            _ => {}
        }
    }

    fn command(&mut self, k: u32, c: Command) -> CmdId {
        self.next_cmd += 1;
        let id = self.next_cmd;
        self.handle(k, Input::Command(id, c));
        id
    }

    fn issue_lookup(&mut self, k: u32, key: Id) {
        self.next_cmd += 1;
        let id = self.next_cmd;
        self.lookups.insert(id, (self.now, key));
        self.handle(k, Input::Command(id, Command::Lookup { key }));
    }

    fn start_join(&mut self, k: u32, incarnation: u32) {
        let s = &self.slots[k as usize];
        if s.incarnation != incarnation || s.node.is_none() || s.member {
            return;
        }
        if s.node.as_ref().map(|n| n.status()) != Some(peerstore_core::Status::Idle) {
            return;
        }
        let Some(via) = self.random_member() else {
            return;
        };
        if self.cfg.secure && !self.secure_ready(k, via, incarnation) {
            return;
        }
        let via = self.slots[via as usize].peer;
        self.command(k, Command::Join { via });
    }

    /// With `--secure`, a machine needs an endorsement before it can join:
    /// one that has none registers with `via`'s machine (which its operator
    /// approved it on) and tries again a little later. Attackers try too,
    /// and no member admits them. True when `k` may join now.
    fn secure_ready(&mut self, k: u32, via: u32, incarnation: u32) -> bool {
        let m = self.machine(k);
        let endorsed = self
            .links
            .get(m)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.endorsed());
        let attacker = self.slots[k as usize].attacker;
        let may_present = !attacker || self.cfg.attackers_endorsed;
        if endorsed && may_present {
            return true;
        }
        let head = self.slots[k as usize].head;
        let entry = self.slots[via as usize].head;
        if !attacker {
            // The operator approves the new machine on its entry node.
            let key = crate::secure::key_for(self.cfg.seed, m as u64);
            let fp = peerstore_core::link::key_sha256(key.public_der());
            let em = self.machine(entry);
            if let Some(l) = self.links.get_mut(em).and_then(Option::as_mut) {
                l.admit(fp);
            }
        }
        if let Some(l) = self.links.get_mut(m).and_then(Option::as_mut) {
            l.register(self.now, Addr::Slot(entry), &format!("slot:{head}"));
        }
        self.flush_links(head);
        if attacker {
            // It tries the ring anyway.
            return true;
        }
        let at = self.now + 5_000;
        self.push(
            at,
            Ev::StartJoin {
                node: k,
                incarnation,
            },
        );
        false
    }

    // ----- faults -------------------------------------------------------------------

    fn pick_live(&mut self, n: u32) -> Option<u32> {
        if self.member_list.is_empty() {
            return None;
        }
        // Node numbers in plans are taken modulo the live population, in
        // member order, so they stay meaningful as membership changes.
        let mut ids: Vec<(Id, u32)> = self.members.iter().map(|(id, k)| (*id, *k)).collect();
        ids.sort_unstable();
        Some(ids[n as usize % ids.len()].1)
    }

    fn views(&self) -> Vec<View<'_>> {
        self.slots
            .iter()
            .filter(|s| s.member)
            .filter_map(|s| s.node.as_ref())
            .map(|n| View {
                id: n.me().id,
                succs: n.successors(),
                pred: n.predecessor(),
                fingers: n.fingers(),
            })
            .collect()
    }

    /// Zave's operating assumption for a failure: no member is left without a
    /// live successor, and a principal fails only while principals exceed r+1.
    fn may_fail(&self, k: u32) -> bool {
        self.may_fail_all(&[k])
    }

    /// The same for several nodes failing at once (a machine's virtual
    /// nodes): judged with all of them gone.
    fn may_fail_all(&self, ks: &[u32]) -> bool {
        if !self.cfg.fail_guard {
            return true;
        }
        let gone: Vec<Id> = ks.iter().map(|&k| self.slots[k as usize].peer.id).collect();
        // Nodes cut off or paused past the failure detector's window count as
        // failed already: the protocol cannot tell them from dead ones.
        // So do nodes handing off their data before a graceful leave: they
        // are as good as gone once the guard has let them go.
        let live = |id: &Id| {
            !gone.contains(id)
                && self.members.get(id).is_some_and(|&j| {
                    let s = &self.slots[j as usize];
                    s.suspended_until <= self.now && !s.departed
                })
        };
        for &k in ks {
            if !self.may_fail_lists(k, &gone, &live) {
                return false;
            }
        }
        self.may_fail_principals(&gone)
    }

    /// No member that lists `k` is left without a live successor, and no
    /// joiner is about to copy a list of only failed entries.
    fn may_fail_lists(&self, k: u32, gone: &[Id], live: &dyn Fn(&Id) -> bool) -> bool {
        let f = self.slots[k as usize].peer.id;
        // Who lists f? In a large ring, only nodes shortly before it (a list
        // spans r successors); in a small one, scan everybody.
        let holders: Vec<u32> = if self.members.len() > (8 * self.r).max(128) {
            let before = self
                .members
                .range(..f)
                .rev()
                .chain(self.members.range(f..).rev());
            before
                .map(|(_, &j)| j)
                .filter(|&j| !gone.contains(&self.slots[j as usize].peer.id))
                .take((3 * self.r).max(64))
                .collect()
        } else {
            self.member_list
                .iter()
                .copied()
                .filter(|&j| !gone.contains(&self.slots[j as usize].peer.id))
                .collect()
        };
        for j in holders {
            let s = &self.slots[j as usize];
            let n = s.node.as_ref().expect("members have state");
            // Judged on the first r entries: a spare entry past r (see the
            // core's `SPARE`) is extra safety the model does not count on,
            // and lists copied from this one carry r entries.
            let list = &n.successors()[..n.successors().len().min(self.r)];
            if list.iter().any(|p| p.id == f) && !list.iter().any(|p| live(&p.id)) {
                return false;
            }
        }
        // A joiner copies a list the moment it joins (atomic in Zave's model,
        // a round trip here): while one is joining just before f, f's
        // failure could hand it a list with no live entry. Wait for it.
        for s in self.slots.iter().filter(|s| {
            !s.attacker
                && s.node.as_ref().map(|n| n.status()) == Some(peerstore_core::Status::Joining)
        }) {
            let after = self
                .members
                .range(s.peer.id..)
                .chain(self.members.range(..s.peer.id))
                .take(self.r + 1);
            if after.map(|(id, _)| *id).any(|id| id == f) {
                return false;
            }
        }
        true
    }

    /// Principals stay above r+1 with every node of `gone` failed.
    fn may_fail_principals(&self, gone: &[Id]) -> bool {
        let live = |id: &Id| {
            self.members.get(id).is_some_and(|&j| {
                let s = &self.slots[j as usize];
                s.suspended_until <= self.now && !s.departed
            })
        };
        let cut = gone.len();
        // Counting principals costs O(N r log N). In a large ring their number
        // is far above r+1, so a recent count with a wide margin answers
        // without recounting.
        if let Some((at, count)) = self.principals_cache.get() {
            // Each allowed failure takes one off the cached count, joins add
            // nothing: the cache only ever errs towards refusing.
            if self.now.saturating_sub(at) < 30_000 && count > 3 * (self.r + 1) + cut - 1 {
                self.principals_cache.set(Some((at, count - cut)));
                return true;
            }
        }
        let views = self.views();
        // A node that rejoined moments ago under its old id can look like a
        // principal only because stale lists still name its old incarnation;
        // the guard does not lean on it until it has been a member a while.
        let settled = |id: &Id| {
            self.members.get(id).is_some_and(|&j| {
                let s = &self.slots[j as usize];
                s.joined_at == 0
                    || self.now.saturating_sub(s.joined_at) >= 10 * self.cfg.stabilize_ms
            })
        };
        let principals: Vec<Id> = check::principals(&views)
            .into_iter()
            .filter(|p| live(p) && settled(p))
            .collect();
        self.principals_cache
            .set(Some((self.now, principals.len())));
        let lost = principals.iter().filter(|p| gone.contains(p)).count();
        lost == 0 || principals.len() - lost > self.r
    }

    /// How long a node that was effectively failed (cut off, paused, or
    /// rejoining under its old id) takes to count again for the fail guard:
    /// its stale list spreads to its predecessor before it refreshes it.
    fn settle_ms(&self) -> u64 {
        10 * self.cfg.stabilize_ms
    }

    fn crash(&mut self, k: u32, guarded: bool) -> bool {
        if guarded && self.slots[k as usize].member && !self.may_fail(k) {
            self.crashes_refused += 1;
            return false;
        }
        self.crashes += 1;
        self.retire(k);
        if self.slots[k as usize].departed {
            self.lose_disk(k);
        }
        true
    }

    /// Whether the fail guard lets every running member of `k`'s machine
    /// fail at once.
    fn host_may_fail(&self, k: u32) -> bool {
        let members: Vec<u32> = self
            .host_live(k)
            .into_iter()
            .filter(|&j| self.slots[j as usize].member)
            .collect();
        members.is_empty() || self.may_fail_all(&members)
    }

    /// Crashes `k`'s whole machine; the slots that went down (none if the
    /// guard refused).
    fn crash_host(&mut self, k: u32, guarded: bool) -> Vec<u32> {
        if self.cfg.vnodes <= 1 {
            return if self.crash(k, guarded) {
                vec![k]
            } else {
                Vec::new()
            };
        }
        if guarded && !self.host_may_fail(k) {
            self.crashes_refused += 1;
            return Vec::new();
        }
        let down = self.host_live(k);
        for &j in &down {
            self.crash(j, false);
        }
        down
    }

    fn fault(&mut self, kind: FaultKind) {
        match kind {
            FaultKind::Crash { node, down_ms } => {
                if let Some(k) = self.pick_live(node) {
                    for j in self.crash_host(k, true) {
                        let inc = self.slots[j as usize].incarnation;
                        self.push(
                            self.now + down_ms,
                            Ev::Restart {
                                node: j,
                                incarnation: inc,
                            },
                        );
                    }
                }
            }
            FaultKind::Kill { node } => {
                if let Some(k) = self.pick_live(node) {
                    for j in self.crash_host(k, true) {
                        self.slots[j as usize].departed = true;
                        self.lose_disk(j);
                    }
                }
            }
            FaultKind::Pause { node, for_ms } => {
                if let Some(k) = self.pick_live(node) {
                    let host = self.host_live(k);
                    if for_ms >= self.cfg.suspect_ms / 2 {
                        if !self.host_may_fail(k) {
                            self.crashes_refused += 1;
                            return;
                        }
                        for &j in &host {
                            self.slots[j as usize].suspended_until =
                                self.now + for_ms + self.settle_ms();
                        }
                    }
                    for j in host {
                        let h = &mut self.hot[j as usize];
                        h.paused_until = h.paused_until.max(self.now + for_ms);
                    }
                }
            }
            FaultKind::Partition { cut, for_ms } => {
                let cut = match cut {
                    // Cut off for longer than the failure detector's window, a
                    // node is failed as far as anyone can tell: guard it.
                    // The network sees machines: the cut is on the head's link.
                    Cut::Isolate { node } => match self.pick_live(node) {
                        Some(k) if for_ms >= self.cfg.suspect_ms / 2 && !self.host_may_fail(k) => {
                            self.crashes_refused += 1;
                            return;
                        }
                        Some(k) if for_ms >= self.cfg.suspect_ms / 2 => {
                            for j in self.host_live(k) {
                                self.slots[j as usize].suspended_until =
                                    self.now + for_ms + self.settle_ms();
                            }
                            Cut::Isolate {
                                node: self.slots[k as usize].head,
                            }
                        }
                        Some(k) => Cut::Isolate {
                            node: self.slots[k as usize].head,
                        },
                        None => return,
                    },
                    c => c,
                };
                self.next_cut += 1;
                let id = self.next_cut;
                let slots = self.slots.len();
                self.net.cut(&mut self.rng_fault, id, cut, slots);
                self.push(self.now + for_ms, Ev::PartitionEnd { id });
            }
            FaultKind::Clog { a, b, for_ms } => {
                if let (Some(a), Some(b)) = (self.pick_live(a), self.pick_live(b)) {
                    let (a, b) = (self.slots[a as usize].head, self.slots[b as usize].head);
                    self.net.clog(a, b, self.now + for_ms);
                }
            }
            FaultKind::KillRun { node, count } => {
                let Some(first) = self.pick_live(node) else {
                    return;
                };
                let start = self.slots[first as usize].peer.id;
                let run: Vec<u32> = self
                    .members
                    .range(start..)
                    .chain(self.members.range(..start))
                    .take(count as usize)
                    .map(|(_, k)| *k)
                    .collect();
                self.store.repair_bytes_at_kill = Some(self.repair_bytes_now());
                for k in run {
                    for j in self.crash_host(k, false) {
                        self.slots[j as usize].departed = true;
                        self.lose_disk(j);
                    }
                }
            }
            FaultKind::MassFail { fraction } => {
                let mut live = self.member_list.clone();
                live.sort_unstable();
                let kill = ((live.len() as f64) * fraction).round() as usize;
                // A seeded shuffle picks who dies; the guard does not apply: this
                // experiment is about what happens when the assumption breaks.
                for i in 0..kill.min(live.len()) {
                    let j = self.rng_fault.gen_range(i..live.len());
                    live.swap(i, j);
                    for d in self.crash_host(live[i], false) {
                        self.slots[d as usize].departed = true;
                        self.lose_disk(d);
                    }
                }
                if self.cfg.lookups_after_fail > 0 {
                    self.frozen = true;
                    for k in self.member_list.clone() {
                        self.command(k, Command::SetMaintenance(false));
                    }
                    self.fail_lookups_left = self.cfg.lookups_after_fail;
                    // Issue them over ten simulated seconds.
                    for i in 0..self.cfg.lookups_after_fail {
                        let at = self.now + 1 + i * 10_000 / self.cfg.lookups_after_fail;
                        self.push(at, Ev::FailLookup);
                    }
                }
            }
        }
    }

    /// Machine `k` (its head) leaves for good: every virtual node leaves
    /// gracefully, or all crash.
    fn depart(&mut self, k: u32, incarnation: u32) {
        let s = &self.slots[k as usize];
        if s.incarnation != incarnation || s.departed || self.host_live(k).is_empty() {
            // Down (crashed): it stays, and departs with a later session.
            return;
        }
        let graceful = self
            .rng_work
            .gen_bool(self.cfg.graceful_fraction.clamp(0.0, 1.0));
        // A leave, like a crash, must not break Zave's operating assumption:
        // when the guard refuses, the departure is tried again a little later.
        if !self.host_may_fail(k) {
            self.crashes_refused += 1;
            let at = self.now + self.cfg.stabilize_ms * 5;
            self.push(
                at,
                Ev::Depart {
                    node: k,
                    incarnation,
                },
            );
            return;
        }
        for j in self.host_live(k) {
            if graceful && self.slots[j as usize].member {
                let cmd = self.command(j, Command::Leave);
                let handing_off = self.slots[j as usize]
                    .node
                    .as_ref()
                    .is_some_and(|n| n.status() != peerstore_core::Status::Left);
                if handing_off {
                    // It pushes its data to its successors first; it goes
                    // when the leave completes (see on_reply).
                    self.slots[j as usize].departed = true;
                    self.store.leaving.insert(cmd, j);
                    continue;
                }
            } else {
                self.crashes += 1;
            }
            self.slots[j as usize].departed = true;
            self.retire(j);
            self.lose_disk(j);
        }
    }

    /// A node gone for good takes its disk with it: every copy on it is lost.
    fn lose_disk(&mut self, k: u32) {
        let disk = std::mem::take(&mut self.slots[k as usize].disk);
        if let Some(w) = &self.watch_key {
            for key in disk
                .durable
                .keys()
                .filter(|k| format!("{k:?}").starts_with(w.as_str()))
            {
                eprintln!("t={} slot={k} LOST {key:?}", self.now);
            }
        }
        if disk.durable.is_empty() {
            return;
        }
        let id = self.slots[k as usize].peer.id;
        let head = self.slots[k as usize].head;
        let r = self.cfg.storage.replicas.max(1);
        for (key, item) in disk.durable {
            self.store.losses.entry(key).or_default().push(self.now);
            // The oracle: a copy on one of the key's R right nodes must be
            // re-created; a misplaced extra copy need not be. The right
            // nodes are the first R machines from the key; this copy was on
            // one if fewer than R other machines come before it (and none of
            // them is its own).
            let before: Vec<u32> = if key <= id {
                self.members
                    .range(key..id)
                    .map(|(_, j)| self.slots[*j as usize].head)
                    .take(r * self.cfg.vnodes.max(1))
                    .collect()
            } else {
                self.members
                    .range(key..)
                    .chain(self.members.range(..id))
                    .map(|(_, j)| self.slots[*j as usize].head)
                    .take(r * self.cfg.vnodes.max(1))
                    .collect()
            };
            let mut hosts: Vec<u32> = Vec::new();
            for h in before {
                if !hosts.contains(&h) {
                    hosts.push(h);
                }
                if hosts.len() >= r {
                    break;
                }
            }
            if hosts.len() < r && !hosts.contains(&head) {
                self.store.rep.oracle_repair_bytes += item.size() as u64;
            }
        }
    }

    /// A restarted node finds what its disk made durable.
    fn restore_from_disk(&mut self, k: u32) {
        let s = &mut self.slots[k as usize];
        let items: Vec<(Id, peerstore_core::Item)> = s
            .disk
            .durable
            .iter()
            .map(|(k, i)| (*k, i.clone()))
            .collect();
        let Some(node) = s.node.as_mut() else { return };
        self.hot[k as usize].due = None;
        for bad in node.restore(items) {
            if let Some(old) = s.disk.durable.remove(&bad) {
                s.disk.bytes -= old.size() as u64;
            }
        }
    }

    fn heal(&mut self) {
        self.net.heal();
        for h in self.hot.iter_mut() {
            h.paused_until = h.paused_until.min(self.now);
        }
        if self.frozen {
            self.frozen = false;
            for k in self.member_list.clone() {
                self.command(k, Command::SetMaintenance(true));
            }
        }
        self.healed_at = Some(self.now);
        if self.cfg.storage.enabled {
            // Faults stop: crashed nodes come back now with their disks, so
            // the repair phase judges a population that no longer changes.
            for k in 0..self.slots.len() as u32 {
                let s = &self.slots[k as usize];
                if s.node.is_none() && !s.departed {
                    self.fresh_node(k);
                    self.restore_from_disk(k);
                    let inc = self.slots[k as usize].incarnation;
                    self.start_join(k, inc);
                }
            }
        }
    }

    // ----- checkers --------------------------------------------------------------------

    fn check_safety_now(&mut self) {
        let views = self.views();
        let v = check::check_safety(&views, self.r);
        drop(views);
        if let Some(first) = v.into_iter().next() {
            if self.first_violation.is_none() && std::env::var_os("PEERSTORE_SIM_DUMP").is_some() {
                self.dump_ring();
            }
            self.violations += 1;
            if self.first_violation.is_none() {
                self.first_violation = Some((self.now, first));
            }
            if self.cfg.stop_on_violation {
                self.stop = true;
            }
        }
    }

    fn sample(&mut self) {
        if !self.attacker_ids.is_empty() {
            self.count_attacker_pointers();
        }
        if let Some(w) = self.watch_key.clone() {
            let keys: Vec<Id> = self
                .store
                .acked
                .keys()
                .filter(|k| format!("{k:?}").starts_with(w.as_str()))
                .copied()
                .collect();
            for key in keys {
                let right = self.right_nodes(key, self.cfg.storage.replicas);
                let desc: Vec<String> = right
                    .iter()
                    .map(|&k| {
                        let n = self.slots[k as usize].node.as_ref();
                        format!(
                            "{k}:{}:pred={:?}",
                            n.is_some_and(|n| n.store_index().get(&key).is_some()),
                            n.and_then(|n| n.predecessor()).map(|p| p.addr)
                        )
                    })
                    .collect();
                eprintln!("t={} right nodes of {key:?}: {desc:?}", self.now);
            }
        }
        let dt = self.now - self.last_sample_at;
        self.node_ms += dt as u128 * self.member_list.len() as u128;
        self.last_sample_at = self.now;
        let views = self.views();
        let rep = check::check_ideal(&views, self.r, false);
        let mut ideal = false;
        if let Some(healed) = self.healed_at {
            if rep.is_ideal() {
                ideal = check::check_ideal(&views, self.r, true).is_ideal();
            }
            drop(views);
            if ideal && self.converged_at.is_none() {
                self.converged_at = Some(self.now);
                self.stop = !self.cfg.storage.enabled;
            } else if let Some(c) = self.converged_at {
                // The ring is Ideal; now every key must get back to R copies.
                if self.store.repaired_at.is_some() {
                    // The read sweep is running; it stops the run.
                } else if self.storage_repaired() {
                    self.store.repaired_at = Some(self.now);
                    self.store.rep.repair_ms = Some(self.now - c);
                    self.start_final_reads();
                } else if self.now > c + self.cfg.storage.repair_bound_ms {
                    self.store.no_liveness = true;
                    self.stop = true;
                }
            } else if self.now > healed + self.cfg.converge_bound_ms {
                if std::env::var_os("PEERSTORE_SIM_DUMP").is_some() {
                    self.dump_ring();
                    self.dump_fingers();
                }
                self.no_liveness = true;
                self.stop = true;
            }
        } else {
            drop(views);
        }
        self.samples.push(Sample {
            t_ms: self.now,
            members: rep.members,
            pointer_accuracy: rep.pointer_accuracy(),
            lists_exact: 1.0 - rep.list_wrong as f64 / rep.members.max(1) as f64,
            violations: self.violations,
        });
        self.push(self.now + self.cfg.sample_ms, Ev::Sample);
    }

    /// Prints every node's pointers (set PEERSTORE_SIM_DUMP=1 when replaying a
    /// failing seed to see the state the checker rejected).
    fn dump_ring(&self) {
        let mut rows: Vec<_> = self.slots.iter().enumerate().collect();
        rows.sort_by_key(|(_, s)| s.peer.id);
        eprintln!("ring at {} ms:", self.now);
        for (k, s) in rows {
            match &s.node {
                Some(n) => eprintln!(
                    "  {:?} slot={k} member={} pending={} status={:?} pred={:?} succs={:?}",
                    s.peer.id,
                    s.member,
                    n.pending_requests(),
                    n.status(),
                    n.predecessor().map(|p| p.id),
                    n.successors().iter().map(|p| p.id).collect::<Vec<_>>()
                ),
                None => eprintln!("  {:?} slot={k} down", s.peer.id),
            }
        }
    }

    fn dump_fingers(&self) {
        let members = check::Members::new(self.members.keys().copied().collect());
        for s in self.slots.iter().filter(|s| s.member) {
            let n = s.node.as_ref().expect("member");
            for i in 0..ID_BITS {
                let want = members
                    .successor(n.me().id.add_pow2(i))
                    .filter(|w| *w != n.me().id);
                let have = n.fingers()[i].map(|p| p.id);
                if have != want {
                    eprintln!(
                        "  finger {:?}[{i}] = {:?}, want {:?}",
                        n.me().id,
                        have,
                        want
                    );
                }
            }
        }
    }

    // ----- results ---------------------------------------------------------------------

    /// Ring state for pictures.
    pub fn ring_snapshot(&self) -> Vec<RingPoint> {
        self.slots
            .iter()
            .map(|s| RingPoint {
                id: s.peer.id,
                member: s.member,
                succ: s
                    .node
                    .as_ref()
                    .and_then(|n| n.successors().first().map(|p| p.id)),
                pred: s.node.as_ref().and_then(|n| n.predecessor().map(|p| p.id)),
            })
            .collect()
    }

    fn report(mut self, wall_ms: u64) -> Report {
        let security = self.cfg.secure.then(|| self.security_report());
        let storage = self.cfg.storage.enabled.then(|| self.storage_report());
        let mut st = self.retired_stats.clone();
        for n in self.slots.iter().filter_map(|s| s.node.as_ref()) {
            let x = n.stats();
            st.sent_maintenance += x.sent_maintenance;
            st.sent_lookup += x.sent_lookup;
            st.sent_replies += x.sent_replies;
            st.timeouts += x.timeouts;
            st.dropped_unexpected += x.dropped_unexpected;
        }
        let node_s = (self.node_ms as f64 / 1000.0).max(1e-9);
        let mut hops = self.hops.clone();
        hops.sort_unstable();
        let pct = |p: f64| -> u32 {
            if hops.is_empty() {
                0
            } else {
                hops[((hops.len() as f64 - 1.0) * p).round() as usize]
            }
        };
        let ok = hops.len().max(1) as f64;
        let mut lookups = self.lookup_stats.clone();
        lookups.mean_hops = hops.iter().map(|h| *h as f64).sum::<f64>() / ok;
        lookups.p50_hops = pct(0.5);
        lookups.p99_hops = pct(0.99);
        lookups.mean_timeouts = lookups.timeouts_total as f64 / ok;
        let trace_hash = self.trace.finish();
        let trace_tail = self.tail.iter().map(|t| t.to_string()).collect();
        let converge_ms = match (self.healed_at, self.converged_at) {
            (Some(h), Some(c)) => Some(c - h),
            _ => None,
        };
        Report {
            seed: self.cfg.seed,
            nodes: self.cfg.nodes,
            vnodes: self.cfg.vnodes.max(1),
            successors: self.r,
            protocol: format!("{:?}", self.cfg.protocol).to_lowercase(),
            events: self.events,
            sim_ms: self.now,
            wall_ms,
            events_per_s: self.events as f64 / (wall_ms.max(1) as f64 / 1000.0),
            invariant_violations: ViolationReport {
                count: self.violations,
                first: self
                    .first_violation
                    .as_ref()
                    .map(|(t, v)| format!("at {t} ms: {v}")),
            },
            converged: self.converged_at.is_some(),
            no_liveness: self.no_liveness,
            converge_ms,
            converge_bound_ms: self.cfg.converge_bound_ms,
            lookups,
            messages_per_node_per_s: self.net.sent as f64 / node_s,
            maintenance_messages_per_node_per_s: st.sent_maintenance as f64 / node_s,
            messages_dropped: self.net.dropped,
            timeouts: st.timeouts,
            crashes: self.crashes,
            crashes_refused_by_guard: self.crashes_refused,
            joins_failed: self.joins_failed,
            members_at_end: self.member_list.len(),
            trace_hash,
            peak_rss_bytes: crate::report::peak_rss_bytes(),
            samples: self.samples,
            trace_tail,
            storage,
            security,
            config: self.cfg,
        }
    }
}

/// Runs one simulation and also hands back the final ring for pictures.
pub fn run_with_ring(cfg: SimConfig) -> (Report, Vec<RingPoint>) {
    let mut w = World::new(cfg);
    let wall = std::time::Instant::now();
    w.setup();
    w.run_loop();
    let ring = w.ring_snapshot();
    let rep = w.report(wall.elapsed().as_millis() as u64);
    (rep, ring)
}

impl World {
    /// Starts loading what the next events will touch while this one runs,
    /// in three stages over the events due at this same millisecond: the
    /// slab entry of the third, the node (and message) of the second, and
    /// the successor list of the first. At 10,000 nodes and more almost all
    /// of the simulator's time is waiting for memory, and this overlaps it.
    fn prefetch_next(&self) {
        if let Some(&i) = self.queue.peek_same_time(2) {
            prefetch(&self.slab[i as usize], 1);
        }
        if let Some(&i) = self.queue.peek_same_time(1) {
            let k = match &self.slab[i as usize] {
                Some(Ev::Deliver { to, msg, .. }) => {
                    if let Message::State { succs, .. } | Message::Next { succs, .. } = msg {
                        prefetch(succs.as_ptr(), succs.len());
                    }
                    Some(*to)
                }
                // Only a wake that will run the node needs it.
                Some(Ev::Wake { node }) => self.hot[*node as usize]
                    .runs_node_at(self.now)
                    .then_some(*node),
                _ => None,
            };
            if let Some(s) = k.and_then(|k| self.slots.get(k as usize)) {
                prefetch(s, 1);
            }
        }
        if let Some(&i) = self.queue.peek_same_time(0) {
            if let Some(Ev::Deliver {
                to,
                msg: Message::State { .. },
                ..
            }) = &self.slab[i as usize]
            {
                if let Some(n) = self.slots.get(*to as usize).and_then(|s| s.node.as_ref()) {
                    prefetch(n.successors().as_ptr(), n.successors().len());
                }
            }
        }
    }

    fn run_loop(&mut self) {
        let mut limit = self.cfg.duration_ms + self.cfg.converge_bound_ms + self.cfg.sample_ms;
        if self.cfg.storage.enabled {
            limit += self.cfg.storage.repair_bound_ms;
        }
        while let Some(q) = self.pop() {
            if q.at > limit || self.stop {
                break;
            }
            self.now = q.at;
            self.events += 1;
            self.prefetch_next();
            self.record(&q);
            self.dispatch(q.ev);
            if self.dirty {
                self.dirty = false;
                if self.cfg.check == CheckMode::EveryChange {
                    self.check_safety_now();
                }
            }
        }
        if self.healed_at.is_some() && self.converged_at.is_none() && self.first_violation.is_none()
        {
            self.no_liveness = true;
        }
        if self.cfg.storage.enabled
            && self.converged_at.is_some()
            && self.store.repaired_at.is_none()
        {
            self.store.no_liveness = true;
        }
    }
}

// ----- storage: workload, oracle and checkers ---------------------------------

impl World {
    fn setup_storage(&mut self) {
        let sc = self.cfg.storage.clone();
        self.store.records = Some(Records::new(&mut self.rng_work, sc.manifests, sc.writers));
        self.push(1_000, Ev::Register);
        if sc.preload_blocks > 0 {
            self.preload(sc.preload_blocks);
        }
        for (rate, ev) in [
            (sc.puts_per_s, Ev::StorePut),
            (sc.gets_per_s, Ev::StoreGet),
            (sc.record_writes_per_s, Ev::RecordWrite),
        ] {
            if rate > 0.0 {
                let at = 2_000 + self.gap_ms(rate);
                self.push(at, ev);
            }
        }
    }

    /// Places blocks straight on the disks of their R right nodes (and the
    /// nodes' indexes), as if written long ago: scale runs start full.
    fn preload(&mut self, count: u64) {
        let r = self.cfg.storage.replicas.max(1);
        let ids: Vec<(Id, u32)> = self.members.iter().map(|(i, k)| (*i, *k)).collect();
        if ids.is_empty() {
            return;
        }
        let owner = crate::storage::users()[0].user_id();
        for _ in 0..count {
            let item = self.random_block(owner);
            let key = item.position();
            if self.cfg.vnodes <= 1 {
                let start = ids.partition_point(|(i, _)| *i < key);
                for j in 0..r.min(ids.len()) {
                    let k = ids[(start + j) % ids.len()].1;
                    self.slots[k as usize].disk.preload(key, item.clone());
                }
            } else {
                for k in self.right_nodes(key, r) {
                    self.slots[k as usize].disk.preload(key, item.clone());
                }
            }
            if let peerstore_core::Item::Block(b) = &item {
                let id = b.id();
                self.store
                    .acked
                    .entry(key)
                    .or_default()
                    .push(Expect::Block(id));
                self.store.acked_keys.push(key);
            }
        }
        for &(_, k) in &ids {
            let s = &mut self.slots[k as usize];
            let items: Vec<(Id, peerstore_core::Item)> = s
                .disk
                .durable
                .iter()
                .map(|(a, b)| (*a, b.clone()))
                .collect();
            if let Some(n) = s.node.as_mut() {
                n.restore(items);
                self.hot[k as usize].due = None;
            }
        }
    }

    fn gap_ms(&mut self, rate_per_s: f64) -> u64 {
        let exp = Exp::new(rate_per_s / 1000.0).expect("positive rate");
        (exp.sample(&mut self.rng_work) as u64).max(1)
    }

    fn random_block(&mut self, owner: peerstore_core::UserId) -> peerstore_core::Item {
        let sc = &self.cfg.storage;
        let len = self
            .rng_work
            .gen_range(sc.block_min..=sc.block_max.max(sc.block_min));
        let data: Vec<u8> = (0..len).map(|_| self.rng_work.gen()).collect();
        peerstore_core::Item::Block(peerstore_core::Block::new(owner, data))
    }

    /// Issues a client command whose reply may come back at once.
    fn store_command(&mut self, k: u32, c: Command, key: Id, expect: Option<Expect>) {
        self.next_cmd += 1;
        let id = self.next_cmd;
        self.store.cmds.insert(id, (self.now, key, expect));
        let inc = self.slots[k as usize].incarnation;
        self.store.cmd_node.insert(id, (k, inc));
        if self.cfg.secure {
            // Clients sign their requests; the node's gate checks them.
            match c {
                Command::Put(item) => {
                    let signer = signer_for(&item);
                    return self.gate_request(k, id, ClientOp::Put(item), signer);
                }
                Command::Get(key) if self.is_block_key(&key) => {
                    let signer = &crate::storage::users()[0];
                    return self.gate_request(k, id, ClientOp::Get(key), signer);
                }
                c => return self.handle(k, Input::Command(id, c)),
            }
        }
        self.handle(k, Input::Command(id, c));
    }

    /// Whether `key` was acknowledged as a block (readable by any
    /// registered user; records are read by the users they list).
    fn is_block_key(&self, key: &Id) -> bool {
        self.store
            .acked
            .get(key)
            .and_then(|e| e.first())
            .is_some_and(|e| matches!(e, Expect::Block(_)))
    }

    /// A client's request `id`, signed by `signer`, to node `k`: sent by
    /// that user's client over its secure session to `k`'s machine, where
    /// the node's gate checks it; the answer comes back the same way.
    fn gate_request(&mut self, k: u32, id: CmdId, op: ClientOp, signer: &Signer) {
        let me = self.slots[k as usize].peer.id;
        let req = ClientRequest::new(signer, me, op, self.now, &mut self.rng_sig);
        if self.clients.is_empty() {
            let users = crate::storage::users();
            let everyone = users.iter().chain([crate::secure::rogue_user()]);
            self.clients = everyone
                .enumerate()
                .map(|(i, u)| {
                    crate::secure::client_links(u, splitmix(self.cfg.seed ^ 0xc11e ^ i as u64))
                })
                .collect();
        }
        let users = crate::storage::users();
        let c = users
            .iter()
            .position(|u| u.public_der() == signer.public_der())
            .unwrap_or(users.len());
        let node = Addr::Slot(self.slots[k as usize].head);
        self.clients[c].call(self.now, node, id, &req);
        self.flush_client(c);
    }

    /// Runs what node `k`'s gate asks for, and passes its answers on.
    fn pump_gate(&mut self, k: u32) {
        for _ in 0..10_000 {
            let Some(o) = self.gates.get_mut(&k).and_then(Gate::poll) else {
                return;
            };
            match o {
                GateOutput::Command(gc, c) => {
                    self.next_cmd += 1;
                    let id = self.next_cmd;
                    self.gate_cmds.insert(id, (k, gc));
                    self.handle(k, Input::Command(id, c));
                }
                GateOutput::Reply(handle, reply) => {
                    let Some((client, id)) = self.gate_calls.remove(&(k, handle)) else {
                        continue;
                    };
                    let m = self.machine(k);
                    if let Some(l) = self.links.get_mut(m).and_then(Option::as_mut) {
                        l.answer(client, id, &reply);
                    }
                    let head = self.slots[k as usize].head;
                    self.flush_links(head);
                }
            }
        }
    }

    /// A node's answer to the client call `client` reached the client.
    fn on_answer(&mut self, client: CmdId, reply: GateReply) {
        match reply {
            GateReply::Put(r) => {
                self.sec.gate_requests += 1;
                if matches!(&r, Err(e) if !matches!(e, peerstore_core::gate::GateError::Store(_))) {
                    self.sec.gate_refused += 1;
                }
                if self.rogue_cmds.remove(&client) {
                    if r.is_ok() {
                        self.sec.rogue_client_puts_acked += 1;
                    }
                    return;
                }
                let key = self
                    .store
                    .cmds
                    .get(&client)
                    .map(|c| c.1)
                    .unwrap_or_default();
                let r = r
                    .map(|()| peerstore_core::PutOk {
                        key,
                        acks: 0,
                        latency_ms: 0,
                    })
                    .map_err(gate_error);
                self.on_put_reply(client, r);
            }
            GateReply::Get(r) => {
                self.sec.gate_requests += 1;
                self.on_get_reply(client, r.map_err(gate_error));
            }
            // The simulated workload never asks for the ring's status or
            // a node's keys.
            GateReply::Status(_) | GateReply::Keys(_) => {}
        }
    }

    fn workload(&mut self, ev: Ev) {
        let sc = self.cfg.storage.clone();
        match ev {
            Ev::Register => {
                let regs = self
                    .store
                    .records
                    .as_ref()
                    .map(|r| r.registrations(&mut self.rng_work))
                    .unwrap_or_default();
                for (item, expect) in regs {
                    if let Some(k) = self.random_member() {
                        self.store.rep.record_writes += 1;
                        let key = item.position();
                        self.store_command(k, Command::Put(item), key, Some(expect));
                    }
                }
            }
            Ev::StorePut => {
                if let Some(k) = self.random_member() {
                    let owner = crate::storage::users()[0].user_id();
                    let item = self.random_block(owner);
                    let key = item.position();
                    let peerstore_core::Item::Block(b) = &item else {
                        unreachable!()
                    };
                    let expect = Expect::Block(b.id());
                    self.store.rep.puts += 1;
                    self.store_command(k, Command::Put(item), key, Some(expect));
                }
                let at = self.now + self.gap_ms(sc.puts_per_s);
                self.push(at, Ev::StorePut);
            }
            Ev::RecordWrite => {
                if let (Some(k), Some(mut recs)) = (self.random_member(), self.store.records.take())
                {
                    let (item, expect) = if self.rng_work.gen_bool(0.5) {
                        recs.manifest_write(&mut self.rng_work, sc.writers)
                    } else {
                        recs.tx_append(&mut self.rng_work, sc.writers as u64 + 1)
                    };
                    self.store.records = Some(recs);
                    self.store.rep.record_writes += 1;
                    let key = item.position();
                    self.store_command(k, Command::Put(item), key, Some(expect));
                }
                let at = self.now + self.gap_ms(sc.record_writes_per_s);
                self.push(at, Ev::RecordWrite);
            }
            Ev::StoreGet => {
                if !self.store.acked_keys.is_empty() {
                    if let Some(k) = self.random_member() {
                        let i = self.rng_work.gen_range(0..self.store.acked_keys.len());
                        let key = self.store.acked_keys[i];
                        self.store.rep.gets += 1;
                        self.store_command(k, Command::Get(key), key, None);
                    }
                }
                let at = self.now + self.gap_ms(sc.gets_per_s);
                self.push(at, Ev::StoreGet);
            }
            _ => unreachable!("not a workload event"),
        }
    }

    fn on_put_reply(
        &mut self,
        cmd: CmdId,
        r: Result<peerstore_core::PutOk, peerstore_core::StoreError>,
    ) {
        self.store.cmd_node.remove(&cmd);
        let Some((at, key, expect)) = self.store.cmds.remove(&cmd) else {
            return;
        };
        let is_block = matches!(expect, Some(Expect::Block(_)));
        match r {
            Ok(_) => {
                self.store.latencies.push(self.now - at);
                if is_block {
                    self.store.rep.puts_acked += 1;
                } else {
                    self.store.rep.record_writes_acked += 1;
                }
                let e = self.store.acked.entry(key).or_default();
                if e.is_empty() {
                    self.store.acked_keys.push(key);
                }
                if let Some(x) = expect {
                    e.push(x);
                }
            }
            Err(e) => {
                if std::env::var_os("PEERSTORE_SIM_DUMP").is_some() {
                    eprintln!("put of {key:?} failed at {} ms: {e}", self.now);
                }
                if is_block {
                    self.store.rep.puts_failed += 1;
                }
            }
        }
    }

    fn on_get_reply(
        &mut self,
        cmd: CmdId,
        r: Result<Option<peerstore_core::Item>, peerstore_core::StoreError>,
    ) {
        let Some((at, key, _)) = self.store.cmds.remove(&cmd) else {
            return;
        };
        if at == u64::MAX {
            // A read of the final sweep: it must find an acknowledged version.
            self.store.final_reads_waiting -= 1;
            let ok = match &r {
                Ok(Some(item)) => self
                    .store
                    .acked
                    .get(&key)
                    .is_some_and(|es| es.iter().all(|e| e.covered_by(item))),
                _ => false,
            };
            if ok {
                self.store.rep.final_reads_ok += 1;
            } else if self.loss_excused(&key) {
                // Its R copies were lost at once: checker (a) reports it.
            } else {
                self.store.rep.final_reads_failed += 1;
                if std::env::var_os("PEERSTORE_SIM_DUMP").is_some() {
                    eprintln!("final read of {key:?} failed: {r:?}");
                }
            }
            self.continue_final_reads();
            return;
        }
        match r {
            Ok(Some(_)) => self.store.rep.gets_found += 1,
            Ok(None) => self.store.rep.gets_missing += 1,
            Err(_) => self.store.rep.gets_failed += 1,
        }
    }

    /// The R right nodes of `key` (members in ring order from its successor).
    /// The key's R replicas as the ring stands: its successor and the
    /// following members, one per machine.
    fn right_nodes(&self, key: Id, r: usize) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::with_capacity(r);
        for (_, &k) in self.members.range(key..).chain(self.members.range(..key)) {
            if out.len() == r {
                break;
            }
            let head = self.slots[k as usize].head;
            if !out.iter().any(|&j| self.slots[j as usize].head == head) {
                out.push(k);
            }
        }
        out
    }

    /// (b) and (c): every key held anywhere is on all R of its right nodes,
    /// and their copies agree.
    fn replica_faults(&self) -> (u64, u64, u64) {
        let r = self.cfg.storage.replicas.max(1);
        let mut keys: BTreeMap<Id, ()> = BTreeMap::new();
        for &k in &self.member_list {
            if let Some(n) = self.slots[k as usize].node.as_ref() {
                for (key, _) in n.store_index().iter() {
                    keys.insert(*key, ());
                }
            }
        }
        let (mut under, mut divergent, mut misplaced) = (0, 0, 0);
        let mut holders_total = 0u64;
        for key in keys.keys() {
            let right = self.right_nodes(*key, r);
            let mut digests = Vec::with_capacity(r);
            let mut version = None;
            for &k in &right {
                let n = self.slots[k as usize].node.as_ref().expect("member");
                if let Some(h) = n.store_index().get(key) {
                    digests.push(h.digest());
                    version = Some(h);
                }
            }
            holders_total += digests.len() as u64;
            if digests.len() < right.len() {
                under += 1;
                if self.watch_key.as_deref() == Some("?") {
                    eprintln!("t={} under-replicated {key:?}", self.now);
                }
            }
            if digests.windows(2).any(|w| w[0] != w[1]) {
                divergent += 1;
            } else if let Some(v) = version {
                // A copy elsewhere must add nothing the right nodes lack, or
                // their agreement is not the end of the story.
                let stranded = self.member_list.iter().any(|&k| {
                    !right.contains(&k)
                        && self.slots[k as usize]
                            .node
                            .as_ref()
                            .and_then(|n| n.store_index().get(key))
                            .is_some_and(|h| !covers(v, h))
                });
                if stranded {
                    divergent += 1;
                }
            }
        }
        let copies: u64 = self
            .member_list
            .iter()
            .filter_map(|&k| self.slots[k as usize].node.as_ref())
            .map(|n| n.store_index().len() as u64)
            .sum();
        misplaced += copies.saturating_sub(holders_total);
        (under, divergent, misplaced)
    }

    /// Whether R durable copies of `key` were lost for good within one
    /// loss window (the one case where losing an acknowledged write is
    /// allowed).
    fn loss_excused(&self, key: &Id) -> bool {
        let r = self.cfg.storage.replicas.max(1);
        self.store.losses.get(key).is_some_and(|times| {
            times.len() >= r
                && times
                    .windows(r)
                    .any(|w| w[r - 1] - w[0] <= self.cfg.storage.loss_window_ms)
        })
    }

    fn repair_bytes_now(&self) -> u64 {
        self.store.retired_repair_bytes
            + self
                .slots
                .iter()
                .filter_map(|s| s.node.as_ref())
                .map(|n| n.store_stats().repair_bytes_sent)
                .sum::<u64>()
    }

    /// After repair: read back (up to 500) acknowledged keys through random
    /// nodes; the run ends when every read has answered.
    fn start_final_reads(&mut self) {
        let mut keys = self.store.acked_keys.clone();
        keys.sort_unstable();
        keys.dedup();
        let take = keys.len().min(500);
        for i in 0..take {
            let j = self.rng_work.gen_range(i..keys.len());
            keys.swap(i, j);
        }
        keys.truncate(take);
        self.store.final_reads = keys;
        self.continue_final_reads();
    }

    fn continue_final_reads(&mut self) {
        // A few at a time, so the sweep is a trickle, not a burst.
        while self.store.final_reads_waiting < 8 {
            let Some(key) = self.store.final_reads.pop() else {
                break;
            };
            let Some(k) = self.random_member() else {
                break;
            };
            self.store.final_reads_waiting += 1;
            self.next_cmd += 1;
            let id = self.next_cmd;
            self.store.cmds.insert(id, (u64::MAX, key, None));
            if self.cfg.secure && self.is_block_key(&key) {
                let signer = &crate::storage::users()[0];
                self.gate_request(k, id, ClientOp::Get(key), signer);
            } else {
                self.handle(k, Input::Command(id, Command::Get(key)));
            }
        }
        if self.store.final_reads_waiting == 0 && self.store.final_reads.is_empty() {
            self.stop = true;
        }
    }

    fn storage_repaired(&self) -> bool {
        // Work still under way changes the answer: a graceful leave handing
        // off, or a client write still trying replicas.
        let alive = |k: u32, inc: u32| {
            let s = &self.slots[k as usize];
            s.node.is_some() && s.incarnation == inc
        };
        let leaving = self
            .store
            .leaving
            .values()
            .any(|&k| self.slots[k as usize].node.is_some());
        let writing = self.store.cmds.iter().any(|(id, c)| {
            c.2.is_some()
                && self
                    .store
                    .cmd_node
                    .get(id)
                    .is_some_and(|&(k, inc)| alive(k, inc))
        });
        // A node still joining will move keys when it gets in.
        let joining = self
            .slots
            .iter()
            .any(|s| s.node.is_some() && !s.departed && !s.member && !s.attacker);
        if leaving || writing || joining {
            return false;
        }
        let (under, divergent, _) = self.replica_faults();
        under == 0 && divergent == 0
    }

    /// The end-of-run storage verdict: (a) through (d) and the figures.
    fn storage_report(&mut self) -> StorageReport {
        let mut rep = std::mem::take(&mut self.store.rep);
        // (a) Every acknowledged write is still on some live node's disk.
        for (key, expects) in &self.store.acked {
            for e in expects {
                let kept = self.member_list.iter().any(|&k| {
                    self.slots[k as usize]
                        .disk
                        .durable
                        .get(key)
                        .is_some_and(|item| e.covered_by(item))
                });
                if kept {
                    continue;
                }
                if self.loss_excused(key) {
                    rep.lost_excused += 1;
                } else {
                    rep.lost_acked += 1;
                    if rep.first_lost.is_none() {
                        let lost_at = self.store.losses.get(key).cloned().unwrap_or_default();
                        rep.first_lost = Some(format!(
                            "{key:?}: {e:?}; durable copies lost for good at {lost_at:?} ms"
                        ));
                    }
                }
            }
        }
        // (d) No disk holds a block that does not hash to its key.
        for s in &self.slots {
            for (key, item) in &s.disk.durable {
                if item.position() != *key {
                    rep.bad_blocks += 1;
                }
            }
        }
        let (under, divergent, misplaced) = self.replica_faults();
        rep.under_replicated = under;
        rep.divergent = divergent;
        rep.misplaced_copies = misplaced;
        rep.repaired = self.store.repaired_at.is_some();
        let mut lat = std::mem::take(&mut self.store.latencies);
        lat.sort_unstable();
        if !lat.is_empty() {
            rep.ack_latency_mean_ms = lat.iter().sum::<u64>() as f64 / lat.len() as f64;
            rep.ack_latency_p99_ms = lat[((lat.len() - 1) as f64 * 0.99).round() as usize];
        }
        // Per machine: its virtual nodes' bytes summed.
        let mut per_host: BTreeMap<u32, u64> = BTreeMap::new();
        for &k in &self.member_list {
            let s = &self.slots[k as usize];
            if let Some(n) = s.node.as_ref() {
                *per_host.entry(s.head).or_default() += n.store_index().bytes();
            }
        }
        let mut bytes: Vec<u64> = per_host.into_values().collect();
        bytes.sort_unstable();
        if !bytes.is_empty() {
            let mean = bytes.iter().sum::<u64>() as f64 / bytes.len() as f64;
            rep.bytes_per_node_mean = mean;
            if mean > 0.0 {
                rep.bytes_per_node_max_over_mean = *bytes.last().expect("non-empty") as f64 / mean;
                rep.bytes_per_node_p99_over_mean =
                    bytes[((bytes.len() - 1) as f64 * 0.99).round() as usize] as f64 / mean;
            }
        }
        rep.keys = self.store.acked.len() as u64;
        let mut repair = self.store.retired_repair_bytes;
        let mut refused = 0;
        for n in self.slots.iter().filter_map(|s| s.node.as_ref()) {
            repair += n.store_stats().repair_bytes_sent;
            refused += n.store_stats().invalid_refused;
        }
        if let Some(before) = self.store.repair_bytes_at_kill {
            repair -= before.min(repair);
        }
        rep.repair_bytes = repair;
        rep.corrupt_refused = refused;
        if rep.oracle_repair_bytes > 0 {
            rep.repair_over_oracle = Some(repair as f64 / rep.oracle_repair_bytes as f64);
        }
        if self.store.no_liveness {
            rep.repaired = false;
        }
        rep
    }
}

/// Whether the version `have` already contains everything in `other`.
fn covers(have: &peerstore_core::Held, other: &peerstore_core::Held) -> bool {
    if have.digest() == other.digest() {
        return true;
    }
    let (a, b) = (have.to_item(), other.to_item());
    match (a, b) {
        (Some(a), Some(b)) => matches!(
            peerstore_core::store::merge(Some(&a), b),
            Ok(peerstore_core::store::Merge::Unchanged)
        ),
        // A block on the right nodes and a block elsewhere under one key are
        // the same block.
        _ => have.is_block() && other.is_block(),
    }
}

// ----- security: attackers and link counters -----------------------------------

impl World {
    /// Machines with a chain to a root nobody trusts: they try to join
    /// through a random member, and (with storage) to store blocks.
    fn setup_attackers(&mut self) {
        for _ in 0..self.cfg.attackers {
            let head = self.new_host();
            for j in self.host_slots(head) {
                self.slots[j as usize].attacker = true;
                self.attacker_ids.insert(self.slots[j as usize].peer.id);
            }
            for j in self.host_slots(head) {
                self.fresh_node(j);
                let at = self
                    .rng_work
                    .gen_range(1_000..=self.cfg.join_spread_ms.max(2_000));
                self.push(
                    at,
                    Ev::StartJoin {
                        node: j,
                        incarnation: 1,
                    },
                );
            }
        }
        if self.cfg.storage.enabled {
            self.push(10_000, Ev::AttackPut);
        }
    }

    fn attack_put(&mut self) {
        if self.healed_at.is_some() {
            return;
        }
        let attackers: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&k| self.slots[k as usize].attacker && self.slots[k as usize].node.is_some())
            .collect();
        let owner = crate::storage::users()[0].user_id();
        for k in attackers {
            let item = self.random_block(owner);
            self.sec.attack_puts += 1;
            self.attack_cmds.insert(self.next_cmd + 1);
            self.command(k, Command::Put(item));
        }
        // And a client whose user never registered asks an honest node.
        if let Some(k) = self.random_member() {
            let rogue = crate::secure::rogue_user();
            let item = self.random_block(rogue.user_id());
            self.next_cmd += 1;
            let id = self.next_cmd;
            self.rogue_cmds.insert(id);
            self.sec.rogue_client_puts += 1;
            self.gate_request(k, id, ClientOp::Put(item), rogue);
        }
        self.push(self.now + 5_000, Ev::AttackPut);
    }

    /// Honest members whose pointers name an attacker (must never happen:
    /// nothing an attacker sends reaches them).
    fn count_attacker_pointers(&mut self) {
        let mut bad = 0;
        for &k in &self.member_list {
            let s = &self.slots[k as usize];
            if s.attacker {
                continue;
            }
            let Some(n) = s.node.as_ref() else { continue };
            let names = |p: &Peer| self.attacker_ids.contains(&p.id);
            if n.successors().iter().any(names)
                || n.predecessor().as_ref().is_some_and(names)
                || n.fingers().iter().flatten().any(names)
            {
                bad += 1;
            }
        }
        self.sec.attacker_pointers += bad;
    }

    fn security_report(&mut self) -> SecurityReport {
        self.count_attacker_pointers();
        let mut rep = std::mem::take(&mut self.sec);
        rep.links = self.retired_links.clone();
        for l in self.links.iter().flatten().chain(&self.clients) {
            rep.links += l.stats();
        }
        rep.attackers = self.cfg.attackers as u64;
        rep.attacker_members = self.slots.iter().filter(|s| s.attacker && s.member).count() as u64;
        rep
    }
}

/// The user a simulated client signs as for `item`: its owner or signer.
fn signer_for(item: &peerstore_core::Item) -> &'static Signer {
    use peerstore_core::{Item, Record};
    let users = crate::storage::users();
    let by_key = |der: &[u8]| users.iter().find(|u| u.public_der() == der);
    let found = match item {
        Item::Block(b) => users.iter().find(|u| u.user_id() == b.owner),
        Item::Tombstone(t) => by_key(&t.owner_key),
        Item::Record(r) => match r.as_ref() {
            Record::PubKey(pk) => by_key(&pk.signing_key),
            Record::Manifest(m) => by_key(&m.signer_key),
            Record::TxLog(l) => by_key(&l.owner_key),
        },
    };
    found.unwrap_or(&users[0])
}

/// A gate's refusal, as the store error the workload counts.
fn gate_error(e: peerstore_core::gate::GateError) -> peerstore_core::StoreError {
    match e {
        peerstore_core::gate::GateError::Store(e) => e,
        other => peerstore_core::StoreError::Invalid(other.to_string()),
    }
}
