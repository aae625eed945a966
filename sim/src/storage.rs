//! The simulator's storage side: a disk per node where a crash loses every
//! write not yet durable, a client workload (blocks, and records written
//! concurrently by several users), and the ledger of acknowledged writes the
//! durability checkers judge the run by.

use peerstore_core::record::{self, Acl, Record, Signer, UserId, Version};
use peerstore_core::store::BlockId;
use peerstore_core::{Id, IoId, Item, StorageOp, StorageResult, StoreError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The storage workload and model of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StorageConfig {
    pub enabled: bool,
    /// R and W.
    pub replicas: usize,
    pub write_quorum: usize,
    /// Client operations across the whole ring, per simulated second.
    pub puts_per_s: f64,
    pub gets_per_s: f64,
    pub record_writes_per_s: f64,
    /// Block sizes are uniform in this range (bytes).
    pub block_min: usize,
    pub block_max: usize,
    /// Manifests written concurrently by `writers` users each.
    pub manifests: usize,
    pub writers: usize,
    /// Time a disk takes to make one write durable.
    pub disk_latency_ms: u64,
    /// Disk size per node; a write past it fails as "disk full".
    pub disk_capacity_bytes: u64,
    pub sync_ms: u64,
    /// Probability a block in flight has one byte flipped (replicas must refuse it).
    pub corrupt: f64,
    /// After the ring is Ideal, every key must be on its R replicas within this.
    pub repair_bound_ms: u64,
    /// Losing R copies of a key within this window excuses losing the key.
    pub loss_window_ms: u64,
    /// Blocks placed directly on their replicas before the run (scale runs).
    pub preload_blocks: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            enabled: false,
            replicas: 3,
            write_quorum: 2,
            puts_per_s: 2.0,
            gets_per_s: 1.0,
            record_writes_per_s: 0.5,
            block_min: 64,
            block_max: 1024,
            manifests: 2,
            writers: 3,
            disk_latency_ms: 5,
            disk_capacity_bytes: 1 << 30,
            sync_ms: 5_000,
            corrupt: 0.0,
            repair_bound_ms: 300_000,
            loss_window_ms: 60_000,
            preload_blocks: 0,
        }
    }
}

/// One node's disk. Operations complete in the order issued; a crash drops
/// every one not yet complete (the durable map is what survives).
#[derive(Debug, Default)]
pub struct Disk {
    pub durable: BTreeMap<Id, Item>,
    pub bytes: u64,
    pending: BTreeMap<IoId, StorageOp>,
    busy_until: u64,
}

impl Disk {
    /// Accepts an operation; returns when it completes.
    pub fn submit(&mut self, now: u64, latency: u64, io: IoId, op: StorageOp) -> u64 {
        let lat = match op {
            StorageOp::Read { .. } => 0,
            _ => latency,
        };
        let at = (now + lat).max(self.busy_until);
        self.busy_until = at;
        self.pending.insert(io, op);
        at
    }

    /// Completes an operation (if the node has not crashed since).
    pub fn complete(&mut self, io: IoId, capacity: u64) -> Option<StorageResult> {
        let op = self.pending.remove(&io)?;
        Some(match op {
            StorageOp::Write { key, item } => {
                let size = item.size() as u64;
                let old = self.durable.get(&key).map_or(0, |i| i.size() as u64);
                if self.bytes - old + size > capacity {
                    StorageResult::Failed(StoreError::Full)
                } else {
                    self.bytes = self.bytes - old + size;
                    self.durable.insert(key, item);
                    StorageResult::Done
                }
            }
            StorageOp::Remove { key } => {
                if let Some(old) = self.durable.remove(&key) {
                    self.bytes -= old.size() as u64;
                }
                StorageResult::Done
            }
            StorageOp::Read { key } => StorageResult::Read(self.durable.get(&key).cloned()),
        })
    }

    /// Power loss: nothing in flight was made durable.
    pub fn crash(&mut self) {
        self.pending.clear();
        self.busy_until = 0;
    }

    /// Puts an item straight on the disk (pre-loading a scale run).
    pub fn preload(&mut self, key: Id, item: Item) {
        self.bytes += item.size() as u64;
        self.durable.insert(key, item);
    }
}

/// What an acknowledged write promised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    Block(BlockId),
    /// A manifest at least this new (epoch, version).
    Manifest((u64, Version)),
    /// A transaction log holding this entry.
    TxEntry((u64, u64)),
    PubKey(Vec<u8>),
}

impl Expect {
    /// Whether a stored item keeps the promise.
    pub fn covered_by(&self, item: &Item) -> bool {
        match (self, item) {
            (Expect::Block(id), Item::Block(b)) => b.id() == *id,
            (Expect::Block(id), Item::Tombstone(t)) => t.block == *id,
            (e, Item::Record(r)) => match (e, &**r) {
                (Expect::Manifest(k), Record::Manifest(m)) => m.order_key() >= *k,
                (Expect::TxEntry(k), Record::TxLog(l)) => l.entries.contains_key(k),
                (Expect::PubKey(key), Record::PubKey(p)) => p.signing_key == *key,
                _ => false,
            },
            _ => false,
        }
    }
}

/// The users of the workload: signing keys made once per process from a
/// fixed seed (1024-bit: the simulator signs thousands of records; the
/// node's real default is 2048).
pub fn users() -> &'static [Signer] {
    static USERS: OnceLock<Vec<Signer>> = OnceLock::new();
    USERS.get_or_init(|| {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0005);
        (0..4)
            .map(|_| Signer::generate(&mut rng, 1024).expect("key generation"))
            .collect()
    })
}

/// The record writers: one owner, writers on its manifests' ACLs.
pub struct Records {
    /// Per manifest: (file id, owner-signed ACL, highest clock issued).
    manifests: Vec<([u8; 32], Acl, u64)>,
    tx_clock: u64,
}

impl Records {
    pub fn new(rng: &mut ChaCha8Rng, manifests: usize, writers: usize) -> Records {
        use rand::Rng;
        let us = users();
        let owner = &us[0];
        let writer_ids: Vec<UserId> = us[1..].iter().take(writers).map(|s| s.user_id()).collect();
        let manifests = (0..manifests.max(1))
            .map(|_| {
                let file_id: [u8; 32] = rng.gen();
                let pos = record::manifest_position(owner.user_id(), &file_id);
                let acl = record::new_acl(rng, owner, pos, 1, writer_ids.clone(), Vec::new());
                (file_id, acl, 0)
            })
            .collect();
        Records {
            manifests,
            tx_clock: 0,
        }
    }

    /// Every user's public key record.
    pub fn registrations(&self, rng: &mut ChaCha8Rng) -> Vec<(Item, Expect)> {
        users()
            .iter()
            .map(|u| {
                (
                    Item::Record(Box::new(record::new_pubkey_record(rng, u, Vec::new()))),
                    Expect::PubKey(u.public_der().to_vec()),
                )
            })
            .collect()
    }

    /// A new version of a manifest by one of its writers. Writers that act at
    /// once pick the same clock: the version order breaks the tie.
    pub fn manifest_write(&mut self, rng: &mut ChaCha8Rng, writers: usize) -> (Item, Expect) {
        use rand::Rng;
        let us = users();
        let m = rng.gen_range(0..self.manifests.len());
        let w = rng.gen_range(0..=writers.min(us.len() - 1));
        let concurrent = rng.gen_bool(0.3);
        let (file_id, acl, clock) = &mut self.manifests[m];
        if !concurrent || *clock == 0 {
            *clock += 1;
        }
        let body: Vec<u8> = (0..rng.gen_range(16..256)).map(|_| rng.gen()).collect();
        let rec = record::new_manifest(
            rng,
            us[0].public_der().to_vec(),
            *file_id,
            acl.clone(),
            *clock,
            &us[w],
            body,
        );
        let Record::Manifest(man) = &rec else {
            unreachable!("new_manifest makes a manifest")
        };
        let expect = Expect::Manifest(man.order_key());
        (Item::Record(Box::new(rec)), expect)
    }

    /// One entry appended to the owner's transaction log by one of its clients.
    pub fn tx_append(&mut self, rng: &mut ChaCha8Rng, clients: u64) -> (Item, Expect) {
        use rand::Rng;
        self.tx_clock += 1;
        let client = rng.gen_range(0..clients.max(1));
        let body: Vec<u8> = (0..rng.gen_range(16..128)).map(|_| rng.gen()).collect();
        let owner = &users()[0];
        let e = record::new_tx_entry(rng, owner, self.tx_clock, client, body);
        let key = (e.clock, e.client);
        let rec = record::new_txlog_record(owner, [e]).expect("one small entry fits");
        (Item::Record(Box::new(rec)), Expect::TxEntry(key))
    }
}

/// Storage results of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StorageReport {
    pub puts: u64,
    pub puts_acked: u64,
    pub puts_failed: u64,
    pub record_writes: u64,
    pub record_writes_acked: u64,
    pub gets: u64,
    pub gets_found: u64,
    pub gets_missing: u64,
    pub gets_failed: u64,
    pub ack_latency_mean_ms: f64,
    pub ack_latency_p99_ms: u64,
    /// (a) acknowledged writes missing at the end, beyond those excused by R
    /// copies lost at once.
    pub lost_acked: u64,
    pub lost_excused: u64,
    pub first_lost: Option<String>,
    /// (b) keys not on all R of their right replicas at the end.
    pub under_replicated: u64,
    /// (c) records whose replicas disagree at the end.
    pub divergent: u64,
    /// (d) stored blocks whose bytes do not hash to their position.
    pub bad_blocks: u64,
    pub repaired: bool,
    pub repair_ms: Option<u64>,
    pub keys: u64,
    pub bytes_per_node_mean: f64,
    pub bytes_per_node_max_over_mean: f64,
    pub bytes_per_node_p99_over_mean: f64,
    pub repair_bytes: u64,
    /// Bytes of the replicas that were lost for good (the least any repair
    /// must copy).
    pub oracle_repair_bytes: u64,
    pub repair_over_oracle: Option<f64>,
    /// The read sweep after repair: acknowledged keys read back through
    /// random nodes.
    pub final_reads_ok: u64,
    pub final_reads_failed: u64,
    pub corrupted_in_flight: u64,
    pub corrupt_refused: u64,
    pub misplaced_copies: u64,
}

impl StorageReport {
    pub fn passed(&self) -> bool {
        self.lost_acked == 0
            && self.divergent == 0
            && self.bad_blocks == 0
            && self.under_replicated == 0
            && self.final_reads_failed == 0
    }
}
