//! Replicated storage driven by hand: a few cores wired by an in-memory
//! queue, each with a map for a disk, so each rule can be watched step by step.

use peerstore_core::record::{self, Signer};
use peerstore_core::store::Tombstone;
use peerstore_core::{
    Addr, Block, CmdResult, Command, Config, Id, Input, IoId, Item, Message, Node, Output, Peer,
    StorageOp, StorageResult, StoreError,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, VecDeque};
use std::sync::OnceLock;

fn users() -> &'static [Signer] {
    static U: OnceLock<Vec<Signer>> = OnceLock::new();
    U.get_or_init(|| {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        (0..2)
            .map(|_| Signer::generate(&mut rng, 1024).expect("keygen"))
            .collect()
    })
}

#[derive(Clone, Copy, PartialEq)]
enum DiskMode {
    Ok,
    Full,
    /// Reads return the block with one byte flipped.
    CorruptReads,
    /// Reads fail (EIO): the copy on disk is fine.
    FailedReads,
}

struct Cluster {
    nodes: Vec<Node>,
    disks: Vec<BTreeMap<Id, Item>>,
    modes: Vec<DiskMode>,
    /// Storage ops not yet completed, per node (released by `flush`).
    held: Vec<VecDeque<(IoId, StorageOp)>>,
    hold: Vec<bool>,
    queue: VecDeque<(usize, Peer, Message)>,
    replies: BTreeMap<u64, CmdResult>,
    /// Messages a test wants to intercept instead of delivering.
    drop_to: Option<usize>,
    intercepted: Vec<(Peer, Message)>,
    now: u64,
    next_cmd: u64,
}

fn cfg() -> Config {
    Config {
        successors_max: 4,
        min_key_bits: 1024,
        ..Config::default()
    }
}

impl Cluster {
    /// An ideal ring of `n` nodes with ids 100, 200, ..., one per machine.
    fn new(n: usize) -> Cluster {
        Cluster::on_machines(&(0..n as u32).collect::<Vec<_>>())
    }

    /// An ideal ring with ids 100, 200, ...; node i runs on machine
    /// `machine[i]` (virtual nodes of one machine share its address).
    fn on_machines(machine: &[u32]) -> Cluster {
        let n = machine.len();
        let peers: Vec<Peer> = (0..n)
            .map(|i| Peer {
                id: Id::from_u128(100 * (i as u128 + 1)),
                addr: Addr::Slot(machine[i]),
            })
            .collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut node = Node::new(cfg(), peers[i], i as u64);
            let succs = (1..=4.min(n - 1)).map(|d| peers[(i + d) % n]).collect();
            let pred = Some(peers[(i + n - 1) % n]);
            node.bootstrap(0, succs, pred, None);
            nodes.push(node);
        }
        Cluster {
            nodes,
            disks: vec![BTreeMap::new(); n],
            modes: vec![DiskMode::Ok; n],
            held: vec![VecDeque::new(); n],
            hold: vec![false; n],
            queue: VecDeque::new(),
            replies: BTreeMap::new(),
            drop_to: None,
            intercepted: Vec::new(),
            now: 0,
            next_cmd: 0,
        }
    }

    /// The node a message is for: the address names the machine, the id
    /// the virtual node on it.
    fn slot(&self, p: Peer) -> usize {
        self.nodes
            .iter()
            .position(|n| n.me() == p)
            .expect("messages go to known nodes")
    }

    fn drain(&mut self, i: usize) {
        while let Some(o) = self.nodes[i].poll_output() {
            match o {
                Output::Send { to, msg } => {
                    let from = self.nodes[i].me();
                    let t = self.slot(to);
                    self.queue.push_back((t, from, msg));
                }
                Output::Reply { cmd, result } => {
                    self.replies.insert(cmd, result);
                }
                Output::Event(_) => {}
                Output::Storage { io, op } => self.held[i].push_back((io, op)),
            }
        }
        if !self.hold[i] {
            self.flush(i);
        }
    }

    /// Completes node i's storage ops in order.
    fn flush(&mut self, i: usize) {
        while let Some((io, op)) = self.held[i].pop_front() {
            let result = match op {
                StorageOp::Write { key, item } => {
                    if self.modes[i] == DiskMode::Full {
                        StorageResult::Failed(StoreError::Full)
                    } else {
                        self.disks[i].insert(key, item);
                        StorageResult::Done
                    }
                }
                StorageOp::Remove { key } => {
                    self.disks[i].remove(&key);
                    StorageResult::Done
                }
                StorageOp::Read { .. } if self.modes[i] == DiskMode::FailedReads => {
                    StorageResult::Failed(StoreError::Io)
                }
                StorageOp::Read { key } => {
                    let mut item = self.disks[i].get(&key).cloned();
                    if self.modes[i] == DiskMode::CorruptReads {
                        if let Some(Item::Block(b)) = &mut item {
                            b.flip_bit(0, 7);
                        }
                    }
                    StorageResult::Read(item)
                }
            };
            self.nodes[i].handle(self.now, Input::StorageDone { io, result });
            self.drain(i);
        }
    }

    /// Delivers every queued message (bounded).
    fn settle(&mut self) {
        for _ in 0..100_000 {
            let Some((to, from, msg)) = self.queue.pop_front() else {
                return;
            };
            if self.drop_to == Some(to) {
                self.intercepted.push((from, msg));
                continue;
            }
            self.nodes[to].handle(self.now, Input::Message { from, msg });
            self.drain(to);
        }
        panic!("the cluster did not settle");
    }

    /// Advances time to `t`, firing timers in order.
    fn advance(&mut self, t: u64) {
        for _ in 0..100_000 {
            let next = (0..self.nodes.len())
                .filter_map(|i| self.nodes[i].poll_timeout().map(|d| (d, i)))
                .min();
            match next {
                Some((d, i)) if d <= t => {
                    self.now = self.now.max(d);
                    self.nodes[i].handle(self.now, Input::Timeout);
                    self.drain(i);
                    self.settle();
                }
                _ => {
                    self.now = t;
                    return;
                }
            }
        }
        panic!("timers did not settle");
    }

    fn command(&mut self, i: usize, c: Command) -> u64 {
        self.next_cmd += 1;
        let id = self.next_cmd;
        self.nodes[i].handle(self.now, Input::Command(id, c));
        self.drain(i);
        id
    }

    /// Node i restarts under the same id with `disk` as its durable state
    /// (its index rebuilt from it) and its ring pointers as they were.
    fn restart(&mut self, i: usize, disk: BTreeMap<Id, Item>, seed: u64) {
        let me = self.nodes[i].me();
        let (succs, pred) = (
            self.nodes[i].successors().to_vec(),
            self.nodes[i].predecessor(),
        );
        self.nodes[i] = Node::new(cfg(), me, seed);
        let items: Vec<(Id, Item)> = disk.iter().map(|(k, v)| (*k, v.clone())).collect();
        assert!(self.nodes[i].restore(items).is_empty(), "the disk is valid");
        self.nodes[i].bootstrap(self.now, succs, pred, None);
        self.disks[i] = disk;
    }

    /// Nodes whose durable index holds `key`.
    fn holders(&self, key: Id) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].store_index().get(&key).is_some())
            .collect()
    }
}

fn block(byte: u8, len: usize) -> Item {
    Item::Block(Block::new(users()[0].user_id(), vec![byte; len]))
}

fn key_of(item: &Item) -> Id {
    item.position()
}

#[test]
fn a_put_is_acknowledged_after_w_durable_copies_and_lands_on_r_replicas() {
    let mut c = Cluster::new(6);
    let item = block(1, 100);
    let key = key_of(&item);
    // Every disk holds its writes until released: no ack may come first.
    c.hold = vec![true; 6];
    let cmd = c.command(0, Command::Put(item.clone()));
    c.settle();
    assert!(
        !c.replies.contains_key(&cmd),
        "acked before anything was durable"
    );
    // Release the replicas one by one: the ack comes with the second.
    let mut released = 0;
    for i in 0..6 {
        if c.held[i].is_empty() {
            continue;
        }
        c.hold[i] = false;
        c.flush(i);
        c.settle();
        released += 1;
        if released == 1 {
            assert!(
                !c.replies.contains_key(&cmd),
                "acked after one durable copy"
            );
        }
    }
    match c.replies.get(&cmd) {
        Some(CmdResult::Put(Ok(ok))) => assert!(ok.acks >= 2, "{ok:?}"),
        other => panic!("put not acknowledged: {other:?}"),
    }
    // The key's successor (in this ring, SHA-1 positions wrap to node 0's
    // successor arc) and the next two hold it, nobody else.
    let holders = c.holders(key);
    assert_eq!(holders.len(), 3, "R = 3 copies: {holders:?}");
    // A read from any node returns it.
    for i in 0..6 {
        let g = c.command(i, Command::Get(key));
        c.settle();
        assert_eq!(
            c.replies.get(&g),
            Some(&CmdResult::Get(Ok(Some(item.clone()))))
        );
    }
}

#[test]
fn a_full_disk_is_an_error_the_client_sees() {
    let mut c = Cluster::new(5);
    c.modes = vec![DiskMode::Full; 5];
    let cmd = c.command(2, Command::Put(block(2, 10)));
    c.settle();
    assert_eq!(
        c.replies.get(&cmd),
        Some(&CmdResult::Put(Err(StoreError::Full)))
    );
    assert!(c.nodes.iter().all(|n| n.store_index().is_empty()));
}

#[test]
fn an_oversized_block_is_refused_before_anything_is_sent() {
    let mut c = Cluster::new(4);
    let cmd = c.command(
        0,
        Command::Put(block(3, peerstore_core::store::BLOCK_MAX + 1)),
    );
    assert!(matches!(
        c.replies.get(&cmd),
        Some(CmdResult::Put(Err(StoreError::Invalid(_))))
    ));
    assert!(c.queue.is_empty());
}

#[test]
fn an_item_sent_for_the_wrong_key_is_refused() {
    // A public key record lives at SHA-1 of its key: user 1's record can
    // never be stored where user 0's registration lives.
    let mut c = Cluster::new(4);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let rec1 = Item::Record(Box::new(record::new_pubkey_record(
        &mut rng,
        &users()[1],
        Vec::new(),
    )));
    let pos0 = record::pubkey_position(users()[0].public_der());
    let from = c.nodes[1].me();
    c.nodes[0].handle(
        0,
        Input::Message {
            from,
            msg: Message::Put {
                req: 9,
                key: pos0,
                item: rec1,
            },
        },
    );
    let out: Vec<Output> = std::iter::from_fn(|| c.nodes[0].poll_output()).collect();
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Send {
                msg: Message::PutAck {
                    req: 9,
                    result: Err(StoreError::Invalid(_))
                },
                ..
            }
        )),
        "{out:?}"
    );
    assert!(c.nodes[0].store_index().is_empty());
}

/// A version of user 0's file [5; 32] (access list by the owner, seeded
/// by `seed`), signed by user `signer` at Lamport clock `clock`.
fn manifest_of_file_5(seed: u64, signer: usize, clock: u64, body: &[u8]) -> Item {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let owner = &users()[0];
    let file_id = [5u8; 32];
    let pos = record::manifest_position(owner.user_id(), &file_id);
    let acl = record::new_acl(&mut rng, owner, pos, 1, Vec::new(), Vec::new());
    let rec = record::new_manifest(
        &mut rng,
        owner.public_der().to_vec(),
        file_id,
        acl,
        clock,
        &users()[signer],
        body.to_vec(),
    );
    Item::Record(Box::new(rec))
}

/// A manifest signed by someone who is neither the owner nor on its ACL.
fn forged_manifest() -> Item {
    manifest_of_file_5(2, 1, 7, b"evil")
}

/// The owner's transaction log carrying an entry signed by someone else.
fn forged_log() -> Item {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut log = record::new_txlog(&users()[0]);
    let entry = record::new_tx_entry(&mut rng, &users()[1], 1, 1, b"rm -rf".to_vec());
    log.entries.insert((1, 1), entry);
    Item::Record(Box::new(record::Record::TxLog(log)))
}

#[test]
fn a_forged_manifest_is_refused_first_hand_and_through_anti_entropy() {
    refused_everywhere(forged_manifest());
}

#[test]
fn a_forged_log_entry_is_refused_first_hand_and_through_anti_entropy() {
    refused_everywhere(forged_log());
}

fn refused_everywhere(forged: Item) {
    assert!(forged.validate(1024).is_err());
    let key = forged.position();
    let mut c = Cluster::new(4);
    let a = c.nodes[1].me();

    // First hand: a put of it.
    c.nodes[0].handle(
        0,
        Input::Message {
            from: a,
            msg: Message::Put {
                req: 1,
                key,
                item: forged.clone(),
            },
        },
    );
    let out: Vec<Output> = std::iter::from_fn(|| c.nodes[0].poll_output()).collect();
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Send {
            msg: Message::PutAck {
                result: Err(StoreError::Invalid(_)),
                ..
            },
            ..
        }
    )));

    // Through anti-entropy: node 0 syncs its range with node 1, which claims
    // to hold the key and then serves the forged record.
    c.drop_to = Some(1);
    let me0 = c.nodes[0].me().id;
    let mut sync = None;
    for step in 1..=80 {
        c.advance(step * 250);
        sync = c.intercepted.iter().find_map(|(from, m)| match m {
            Message::SyncRange { req, .. } if from.id == me0 => Some(*req),
            _ => None,
        });
        if sync.is_some() {
            break;
        }
    }
    let sync = sync.expect("node 0 syncs with its successor");
    let digest = peerstore_core::Held::of(&forged).digest();
    c.nodes[0].handle(
        c.now,
        Input::Message {
            from: a,
            msg: Message::SyncReply {
                req: sync,
                answer: peerstore_core::SyncAnswer::Keys(vec![(key, digest)]),
            },
        },
    );
    let out: Vec<Output> = std::iter::from_fn(|| c.nodes[0].poll_output()).collect();
    let get = out
        .iter()
        .find_map(|o| match o {
            Output::Send {
                msg: Message::Get { req, key: k },
                ..
            } if *k == key => Some(*req),
            _ => None,
        })
        .expect("node 0 fetches the key it lacks");
    c.nodes[0].handle(
        c.now,
        Input::Message {
            from: a,
            msg: Message::Got {
                req: get,
                result: Ok(Some(forged.clone())),
            },
        },
    );
    while c.nodes[0].poll_output().is_some() {}
    assert!(
        c.nodes[0].store_index().get(&key).is_none(),
        "stored a forged record"
    );
    assert!(c.nodes[0].store_stats().invalid_refused >= 2);
}

/// The owner's own manifest for the file `forged_manifest` forges.
fn owners_manifest() -> Item {
    manifest_of_file_5(3, 0, 1, b"mine")
}

/// A node reading a record checks the signature of the first good copy
/// and takes byte-identical copies from the other replicas on its digest;
/// a copy that differs in any byte is checked in full. Here the lying
/// replica answers last, after two good copies, with a newer version that
/// would win the merge if it were taken.
#[test]
fn a_forged_copy_of_a_record_is_refused_even_after_good_copies() {
    let good = owners_manifest();
    let forged = forged_manifest();
    assert!(good.validate(1024).is_ok() && forged.validate(1024).is_err());
    let key = good.position();
    assert_eq!(forged.position(), key);
    let mut c = Cluster::new(5);
    let put = c.command(0, Command::Put(good.clone()));
    c.settle();
    assert!(matches!(c.replies.get(&put), Some(CmdResult::Put(Ok(_)))));
    let holders = c.holders(key);
    assert_eq!(holders.len(), 3);
    let (reader, liar) = (holders[0], holders[2]);
    c.drop_to = Some(liar);
    let g = c.command(reader, Command::Get(key));
    c.settle();
    let me = c.nodes[reader].me().id;
    let req = c
        .intercepted
        .iter()
        .find_map(|(from, m)| match m {
            Message::Get { req, key: k } if from.id == me && *k == key => Some(*req),
            _ => None,
        })
        .expect("the reader asks every replica for a record");
    assert!(!c.replies.contains_key(&g), "the reader waits for the liar");
    let liar_peer = c.nodes[liar].me();
    c.nodes[reader].handle(
        c.now,
        Input::Message {
            from: liar_peer,
            msg: Message::Got {
                req,
                result: Ok(Some(forged)),
            },
        },
    );
    c.drain(reader);
    c.settle();
    assert_eq!(c.replies.get(&g), Some(&CmdResult::Get(Ok(Some(good)))));
}

#[test]
fn anti_entropy_brings_a_lost_copy_back_and_hand_off_removes_a_misplaced_one() {
    let mut c = Cluster::new(6);
    let item = block(4, 50);
    let key = key_of(&item);
    let cmd = c.command(3, Command::Put(item.clone()));
    c.settle();
    assert!(matches!(c.replies.get(&cmd), Some(CmdResult::Put(Ok(_)))));
    let holders = c.holders(key);
    assert_eq!(holders.len(), 3);
    // One replica loses its disk and comes back empty under the same id.
    let lost = holders[1];
    c.restart(lost, BTreeMap::new(), 99);
    assert_eq!(c.holders(key).len(), 2);
    // A misplaced copy on a node that is not a replica.
    let outsider = (0..6).find(|i| !holders.contains(i)).expect("6 > 3");
    let mut disk = c.disks[outsider].clone();
    disk.insert(key, item.clone());
    c.restart(outsider, disk, 98);
    c.advance(c.now + 120_000);
    let mut h = c.holders(key);
    h.sort_unstable();
    let mut want = holders.clone();
    want.sort_unstable();
    assert_eq!(h, want, "back on exactly its R replicas");
    assert!(
        !c.disks[outsider].contains_key(&key),
        "misplaced copy deleted from disk"
    );
}

#[test]
fn a_corrupt_copy_on_disk_is_never_served_and_is_replaced() {
    let mut c = Cluster::new(5);
    let item = block(6, 80);
    let key = key_of(&item);
    let cmd = c.command(0, Command::Put(item.clone()));
    c.settle();
    assert!(matches!(c.replies.get(&cmd), Some(CmdResult::Put(Ok(_)))));
    let holders = c.holders(key);
    let bad = holders[0];
    c.modes[bad] = DiskMode::CorruptReads;
    // Read through the corrupt replica itself: it must fall back to another.
    let g = c.command(bad, Command::Get(key));
    c.settle();
    assert_eq!(
        c.replies.get(&g),
        Some(&CmdResult::Get(Ok(Some(item.clone()))))
    );
    assert!(c.nodes[bad].store_stats().corrupt_detected >= 1);
    c.modes[bad] = DiskMode::Ok;
    c.advance(c.now + 120_000);
    assert_eq!(c.holders(key).len(), 3, "the corrupt copy was re-fetched");
    assert_eq!(c.disks[bad].get(&key), Some(&item));
}

#[test]
fn a_failed_disk_read_keeps_the_copy_and_the_read_falls_back() {
    let mut c = Cluster::new(5);
    let item = block(8, 80);
    let key = key_of(&item);
    let cmd = c.command(0, Command::Put(item.clone()));
    c.settle();
    assert!(matches!(c.replies.get(&cmd), Some(CmdResult::Put(Ok(_)))));
    let holders = c.holders(key);
    let flaky = holders[0];
    c.modes[flaky] = DiskMode::FailedReads;
    let g = c.command(flaky, Command::Get(key));
    c.settle();
    assert_eq!(
        c.replies.get(&g),
        Some(&CmdResult::Get(Ok(Some(item.clone())))),
        "another replica answered"
    );
    // A passing read error is not corruption: nothing is forgotten or
    // deleted, so nothing needs fetching again.
    assert_eq!(c.nodes[flaky].store_stats().corrupt_detected, 0);
    assert!(c.nodes[flaky].store_index().get(&key).is_some());
    assert_eq!(c.disks[flaky].get(&key), Some(&item));
}

#[test]
fn only_the_owner_can_delete_a_block_and_the_delete_reaches_every_replica() {
    let mut c = Cluster::new(5);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let item = block(7, 40);
    let key = key_of(&item);
    let Item::Block(b) = &item else {
        unreachable!()
    };
    let id = b.id();
    let cmd = c.command(0, Command::Put(item.clone()));
    c.settle();
    assert!(matches!(c.replies.get(&cmd), Some(CmdResult::Put(Ok(_)))));
    let stranger = Item::Tombstone(Tombstone::new(&mut rng, &users()[1], id));
    let d = c.command(1, Command::Put(stranger));
    c.settle();
    assert_eq!(
        c.replies.get(&d),
        Some(&CmdResult::Put(Err(StoreError::NotOwner)))
    );
    let owner = Item::Tombstone(Tombstone::new(&mut rng, &users()[0], id));
    let d = c.command(1, Command::Put(owner.clone()));
    c.settle();
    assert!(matches!(c.replies.get(&d), Some(CmdResult::Put(Ok(_)))));
    c.advance(c.now + 60_000);
    for i in c.holders(key) {
        assert!(matches!(c.disks[i].get(&key), Some(Item::Tombstone(_))));
    }
    // A put of the deleted block is refused.
    let again = c.command(2, Command::Put(item));
    c.settle();
    assert_eq!(
        c.replies.get(&again),
        Some(&CmdResult::Put(Err(StoreError::Deleted)))
    );
}

#[test]
fn replicas_go_to_distinct_machines_when_nodes_run_virtual_nodes() {
    // Positions 100..600; 100 and 200 are one machine, 300 and 400 another.
    // Every key here falls to 100 (SHA-1 positions are far above 600), so
    // the plain successor rule would put the copies on 100, 200, 300: two
    // on machine 0. One per machine means 100, 300, 500.
    let machines = [0, 0, 1, 1, 2, 3];
    let mut c = Cluster::on_machines(&machines);
    let item = block(9, 80);
    let key = key_of(&item);
    let cmd = c.command(3, Command::Put(item.clone()));
    c.settle();
    assert!(matches!(c.replies.get(&cmd), Some(CmdResult::Put(Ok(_)))));
    assert_eq!(c.holders(key), vec![0, 2, 4], "one copy per machine");

    // Anti-entropy keeps to the same rule: the copy on machine 1 is lost,
    // and the primary (100) restores it there, not on its own sibling 200.
    c.restart(2, BTreeMap::new(), 77);
    assert_eq!(c.holders(key), vec![0, 4]);
    c.advance(c.now + 120_000);
    assert_eq!(c.holders(key), vec![0, 2, 4], "repaired on machine 1");

    // A read from every node finds it.
    for i in 0..machines.len() {
        let g = c.command(i, Command::Get(key));
        c.settle();
        assert_eq!(
            c.replies.get(&g),
            Some(&CmdResult::Get(Ok(Some(item.clone())))),
            "read via node {i}"
        );
    }
}
