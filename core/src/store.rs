//! What a node stores: content-addressed blocks, signed records and block
//! tombstones, and the index a node keeps over what it has made durable.
//!
//! Every item is self-validating: a block by its hash, a record and a tombstone
//! by their signatures. A replica checks each one on every receipt (from a
//! client, a peer or anti-entropy), so whatever path an item took, a replica
//! stores it only if it would have accepted it first hand.

use crate::hash::Sha256;
use crate::id::Id;
use crate::record::{self, Record, RecordError, UserId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

/// SHA-256 of a block's stored (already encrypted) bytes.
pub type BlockId = [u8; 32];
/// SHA-256 summary of an item's version, compared by anti-entropy.
pub type Digest = [u8; 32];

/// Largest block a node accepts.
pub const BLOCK_MAX: usize = 1 << 20;

const TOMBSTONE_TAG: &[u8] = b"peerstore/tombstone/v1";
const RANGE_TAG: &[u8] = b"peerstore/range/v1";

/// An immutable, content-addressed block. `owner` is the user whose signed
/// tombstone may delete it; the first stored copy's owner is kept.
///
/// The bytes are private so that the id, worked out once from them and kept
/// beside them, can never disagree with them: a 1 MiB block's id is asked
/// for by its ring position, its index entry and its disk file, and hashing
/// it again each time was most of a node's work. A block that arrives over
/// the wire or from disk comes without an id and is hashed on first use, so
/// every receipt is still checked against its bytes.
///
/// The bytes are shared between clones: a node storing a block on itself
/// and sending it to two more replicas copied a whole 1 MiB for each.
#[derive(Clone, Serialize, Deserialize)]
pub struct Block {
    pub owner: UserId,
    #[serde(with = "shared_bytes")]
    data: Arc<Vec<u8>>,
    #[serde(skip)]
    id: OnceLock<BlockId>,
}

impl Block {
    pub fn new(owner: UserId, data: Vec<u8>) -> Block {
        Block {
            owner,
            data: Arc::new(data),
            id: OnceLock::new(),
        }
    }

    /// A block whose id the caller has just worked out from these very
    /// bytes (a client that sealed a chunk needed its id for the manifest),
    /// so it is not hashed again. Checked in builds with debug assertions.
    pub fn with_id(owner: UserId, data: Vec<u8>, id: BlockId) -> Block {
        debug_assert_eq!(sha256(&data), id, "a block's id is the hash of its bytes");
        Block {
            owner,
            data: Arc::new(data),
            id: OnceLock::from(id),
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The bytes, copied only if a clone of this block still shares them.
    pub fn into_data(self) -> Vec<u8> {
        Arc::try_unwrap(self.data).unwrap_or_else(|shared| (*shared).clone())
    }

    /// SHA-256 of the bytes.
    pub fn id(&self) -> BlockId {
        *self.id.get_or_init(|| sha256(&self.data))
    }

    /// Works out the ids of `blocks` not yet known, two at a time
    /// ([`crate::hash::update_two`]): about as fast as one alone where the
    /// CPU has the SHA extensions. Each is what [`Block::id`] would give.
    pub fn hash_ids(blocks: &[&Block]) {
        let mut todo = blocks.iter().filter(|b| b.id.get().is_none());
        while let Some(a) = todo.next() {
            let Some(b) = todo.next() else {
                a.id();
                break;
            };
            let (mut ha, mut hb) = (Sha256::new(), Sha256::new());
            crate::hash::update_two(&mut ha, &a.data, &mut hb, &b.data);
            let _ = a.id.set(ha.finalize());
            let _ = b.id.set(hb.finalize());
        }
    }

    /// Flips one bit of the bytes (the simulator's corruption in flight),
    /// forgetting the id so that it is worked out from the new bytes. Clones
    /// sharing the bytes keep them as they were.
    pub fn flip_bit(&mut self, byte: usize, bit: u8) {
        if let Some(b) = Arc::make_mut(&mut self.data).get_mut(byte) {
            *b ^= 1 << (bit % 8);
            self.id = OnceLock::new();
        }
    }
}

/// Serde for a block's shared bytes: the same encoding as
/// [`crate::session::wire_bytes`] (a plain byte string).
mod shared_bytes {
    use serde::{Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(bytes: &Arc<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        crate::session::wire_bytes::serialize(bytes, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Vec<u8>>, D::Error> {
        crate::session::wire_bytes::deserialize(d).map(Arc::new)
    }
}

impl PartialEq for Block {
    fn eq(&self, other: &Block) -> bool {
        self.owner == other.owner && self.data == other.data
    }
}

impl Eq for Block {}

impl std::fmt::Debug for Block {
    // Kilobytes of ciphertext help nobody in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("owner", &self.owner)
            .field("len", &self.data.len())
            .finish()
    }
}

/// A signed statement by a block's owner that the block is deleted. It
/// replaces the block on every replica and travels by anti-entropy like any
/// item, so a replica that was down when the delete happened cannot bring the
/// block back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub block: BlockId,
    /// SPKI DER of the owner's signing key; its SHA-1 is the owner's id.
    #[serde(with = "crate::session::wire_bytes")]
    pub owner_key: Vec<u8>,
    #[serde(with = "crate::session::wire_bytes")]
    pub sig: Vec<u8>,
}

impl Tombstone {
    pub fn new(
        rng: &mut impl rand_core::CryptoRngCore,
        owner: &record::Signer,
        block: BlockId,
    ) -> Tombstone {
        let sig = owner.sign(rng, &Self::signed_bytes(&block));
        Tombstone {
            block,
            owner_key: owner.public_der().to_vec(),
            sig,
        }
    }

    /// Tombstones for many blocks, made with one batch signature
    /// ([`record::Signer::sign_batch`]).
    pub fn new_batch(
        rng: &mut impl rand_core::CryptoRngCore,
        owner: &record::Signer,
        blocks: &[BlockId],
    ) -> Vec<Tombstone> {
        let msgs: Vec<Vec<u8>> = blocks.iter().map(Self::signed_bytes).collect();
        blocks
            .iter()
            .zip(owner.sign_batch(rng, &msgs))
            .map(|(block, sig)| Tombstone {
                block: *block,
                owner_key: owner.public_der().to_vec(),
                sig,
            })
            .collect()
    }

    fn signed_bytes(block: &BlockId) -> Vec<u8> {
        let mut m = Vec::with_capacity(TOMBSTONE_TAG.len() + 32);
        m.extend_from_slice(TOMBSTONE_TAG);
        m.extend_from_slice(block);
        m
    }

    pub fn owner(&self) -> UserId {
        record::user_id(&self.owner_key)
    }
}

/// Anything a replica stores under one ring position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    Block(Block),
    // Boxed: records are far bigger than the other variants, and items ride
    // inside every storage message.
    Record(Box<Record>),
    Tombstone(Tombstone),
}

/// Why a store or fetch failed. Sent over the wire, shown to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreError {
    /// The item failed validation (bad hash, bad signature, too large...).
    Invalid(String),
    /// The record's id is registered to another key (first registration wins).
    KeyTaken,
    /// The block was deleted by its owner.
    Deleted,
    /// The delete was not signed by the block's owner.
    NotOwner,
    /// The replica's disk is full.
    Full,
    /// The replica's disk failed the write.
    Io,
    /// The replica is at its in-flight limit; try again or elsewhere.
    Busy,
    /// Not enough replicas answered (the cluster is degraded).
    Unavailable { acks: u8, needed: u8 },
    /// The key's replicas could not be found.
    NoRoute(String),
    /// The node is not in a ring.
    NotJoined,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Invalid(why) => write!(f, "refused an invalid item: {why}"),
            StoreError::KeyTaken => write!(f, "this id is already registered to another key"),
            StoreError::Deleted => write!(f, "the block was deleted by its owner"),
            StoreError::NotOwner => write!(f, "only the block's owner may delete it"),
            StoreError::Full => write!(f, "a replica's disk is full"),
            StoreError::Io => write!(f, "a replica failed to write to its disk"),
            StoreError::Busy => write!(f, "a replica is overloaded; retry later"),
            StoreError::Unavailable { acks, needed } => write!(
                f,
                "only {acks} of the {needed} replicas needed confirmed the write"
            ),
            StoreError::NoRoute(why) => write!(f, "could not find the key's replicas: {why}"),
            StoreError::NotJoined => write!(f, "this node has not joined a ring"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<RecordError> for StoreError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::KeyTaken => StoreError::KeyTaken,
            e => StoreError::Invalid(e.to_string()),
        }
    }
}

pub use crate::hash::sha256;

/// A block's ring position: SHA-1 of its id.
pub fn block_position(id: &BlockId) -> Id {
    Id::hash(id)
}

impl Item {
    /// Where the item lives on the ring. A block's position is computed from
    /// its bytes, so it cannot be stored under a position it does not own.
    pub fn position(&self) -> Id {
        match self {
            Item::Block(b) => block_position(&b.id()),
            Item::Record(r) => r.position(),
            Item::Tombstone(t) => block_position(&t.block),
        }
    }

    /// [`Held::digest`] of this item's index entry, without making one
    /// (a record's would be a copy of it).
    pub fn digest(&self) -> Digest {
        match self {
            Item::Block(b) => b.id(),
            Item::Record(r) => r.digest(),
            Item::Tombstone(t) => tombstone_digest(t),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Item::Block(_) => "block",
            Item::Record(r) => r.kind(),
            Item::Tombstone(_) => "tombstone",
        }
    }

    /// Bytes this item costs on the wire and on disk (near enough for limits).
    pub fn size(&self) -> usize {
        match self {
            Item::Block(b) => b.data.len() + 20,
            Item::Record(r) => r.encoded_len(),
            Item::Tombstone(t) => 32 + t.owner_key.len() + t.sig.len(),
        }
    }

    /// Checks everything the item can say about itself: hash, size, every
    /// signature. Says nothing about what the replica already holds.
    pub fn validate(&self, min_key_bits: usize) -> Result<(), StoreError> {
        match self {
            Item::Block(b) => {
                if b.data.len() > BLOCK_MAX {
                    return Err(StoreError::Invalid(format!(
                        "block of {} bytes is over the {} byte limit",
                        b.data.len(),
                        BLOCK_MAX
                    )));
                }
                Ok(())
            }
            Item::Record(r) => Ok(r.verify(min_key_bits)?),
            Item::Tombstone(t) => {
                record::verify(
                    &t.owner_key,
                    &Tombstone::signed_bytes(&t.block),
                    &t.sig,
                    min_key_bits,
                )?;
                Ok(())
            }
        }
    }
}

/// What the index keeps per durable item. Block bytes stay on disk; records
/// and tombstones are small and kept whole (merges need them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    Block {
        id: BlockId,
        owner: UserId,
        size: u32,
    },
    Record(Box<Record>),
    Tombstone(Tombstone),
}

fn tombstone_digest(t: &Tombstone) -> Digest {
    let mut h = Sha256::new();
    h.update(TOMBSTONE_TAG);
    h.update(t.block);
    h.finalize()
}

impl Held {
    /// The index entry for a validated item.
    pub fn of(item: &Item) -> Held {
        match item {
            Item::Block(b) => Held::Block {
                id: b.id(),
                owner: b.owner,
                size: b.data.len() as u32,
            },
            Item::Record(r) => Held::Record(r.clone()),
            Item::Tombstone(t) => Held::Tombstone(t.clone()),
        }
    }

    /// Equal digests mean equal versions. A block's is its id; a tombstone's
    /// differs from its block's, so a delete shows up as a difference.
    pub fn digest(&self) -> Digest {
        match self {
            Held::Block { id, .. } => *id,
            Held::Record(r) => r.digest(),
            Held::Tombstone(t) => tombstone_digest(t),
        }
    }

    pub fn size(&self) -> usize {
        match self {
            Held::Block { size, .. } => *size as usize + 20,
            Held::Record(r) => r.encoded_len(),
            Held::Tombstone(t) => 32 + t.owner_key.len() + t.sig.len(),
        }
    }

    pub fn is_block(&self) -> bool {
        matches!(self, Held::Block { .. })
    }

    /// The whole item, for what the index keeps whole (a block's bytes are
    /// on disk: None).
    pub fn to_item(&self) -> Option<Item> {
        match self {
            Held::Record(r) => Some(Item::Record(r.clone())),
            Held::Tombstone(t) => Some(Item::Tombstone(t.clone())),
            Held::Block { .. } => None,
        }
    }
}

/// What storing `incoming` over `current` should do.
#[derive(Debug)]
pub enum Merge {
    /// Nothing new: the stored version already covers it.
    Unchanged,
    /// Write this item (the merge of both).
    Write(Item),
}

/// The merge rules of every kind, applied to a validated `incoming` item and
/// what the replica has (durable or about to be). Pure: the same inputs give
/// the same answer on every replica, which is what makes replicas converge.
pub fn merge(current: Option<&Item>, incoming: Item) -> Result<Merge, StoreError> {
    let Some(cur) = current else {
        return Ok(Merge::Write(incoming));
    };
    match (cur, incoming) {
        (Item::Block(_), Item::Block(_)) => Ok(Merge::Unchanged),
        (Item::Tombstone(_), Item::Block(_)) => Err(StoreError::Deleted),
        (Item::Tombstone(_), Item::Tombstone(_)) => Ok(Merge::Unchanged),
        (Item::Block(b), Item::Tombstone(t)) => {
            if t.owner() != b.owner {
                return Err(StoreError::NotOwner);
            }
            Ok(Merge::Write(Item::Tombstone(t)))
        }
        (Item::Record(r), Item::Record(inc)) => {
            let mut merged = r.clone();
            if merged.merge(*inc)? {
                Ok(Merge::Write(Item::Record(merged)))
            } else {
                Ok(Merge::Unchanged)
            }
        }
        (cur, inc) => Err(StoreError::Invalid(format!(
            "a {} cannot replace a {} at the same position",
            inc.kind(),
            cur.kind()
        ))),
    }
}

/// Like [`merge`], against an index entry (whose block bytes are on disk: a
/// block merges by id alone, so the bytes are never needed).
pub fn merge_held(current: Option<&Held>, incoming: Item) -> Result<Merge, StoreError> {
    match current {
        None => Ok(Merge::Write(incoming)),
        Some(Held::Block { owner, .. }) => match incoming {
            Item::Block(_) => Ok(Merge::Unchanged),
            Item::Tombstone(t) if t.owner() == *owner => Ok(Merge::Write(Item::Tombstone(t))),
            Item::Tombstone(_) => Err(StoreError::NotOwner),
            Item::Record(_) => Err(StoreError::Invalid(
                "a record cannot replace a block at the same position".into(),
            )),
        },
        Some(h) => merge(h.to_item().as_ref(), incoming),
    }
}

/// The durable index of one node: ring position -> item summary, ordered by
/// position so key ranges are cheap to walk.
#[derive(Clone, Debug, Default)]
pub struct Index {
    map: BTreeMap<Id, Held>,
    bytes: u64,
}

/// A digest of one key range and how many items it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeSummary {
    pub digest: Digest,
    pub count: u32,
}

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    pub fn get(&self, key: &Id) -> Option<&Held> {
        self.map.get(key)
    }

    pub fn insert(&mut self, key: Id, held: Held) {
        self.bytes += held.size() as u64;
        if let Some(old) = self.map.insert(key, held) {
            self.bytes -= old.size() as u64;
        }
    }

    pub fn remove(&mut self, key: &Id) -> Option<Held> {
        let old = self.map.remove(key)?;
        self.bytes -= old.size() as u64;
        Some(old)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of everything held (block bytes at their stored size).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Id, &Held)> {
        self.map.iter()
    }

    /// Positions strictly after `after` (all of them if `None`) in
    /// ascending order, not wrapping past zero: a listing in pages
    /// ([`crate::gate::ClientOp::Keys`]) resumes after the last key it was
    /// given and ends at the top of the ring, without walking what it
    /// already listed.
    pub fn keys_after(&self, after: Option<Id>) -> impl Iterator<Item = &Id> {
        let lo = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.map.range((lo, Bound::Unbounded)).map(|(k, _)| k)
    }

    /// Entries with positions in the ring interval (lo, hi], in ring order
    /// from lo. lo == hi means the whole ring.
    pub fn range(&self, lo: Id, hi: Id) -> impl Iterator<Item = (&Id, &Held)> {
        // Two B-tree ranges chained, the second empty unless the interval
        // wraps past zero: no allocation (anti-entropy walks ranges often).
        let (a, b) = if lo < hi {
            (
                self.map.range((Bound::Excluded(lo), Bound::Included(hi))),
                self.map.range(..Id::ZERO),
            )
        } else {
            (
                self.map.range((Bound::Excluded(lo), Bound::Unbounded)),
                self.map.range(..=hi),
            )
        };
        a.chain(b)
    }

    /// The first held position strictly after `from` in ring order (wrapping).
    pub fn next_after(&self, from: Id) -> Option<Id> {
        self.map
            .range((Bound::Excluded(from), Bound::Unbounded))
            .next()
            .or_else(|| self.map.iter().next())
            .map(|(k, _)| *k)
    }

    /// Digest and count of the range (lo, hi]: SHA-256 over the ordered
    /// (position, version digest) pairs, so two replicas agree exactly when
    /// they hold the same versions of the same keys.
    pub fn summarize(&self, lo: Id, hi: Id) -> RangeSummary {
        let mut h = Sha256::new();
        h.update(RANGE_TAG);
        let mut count = 0u32;
        for (k, v) in self.range(lo, hi) {
            h.update(k.as_bytes());
            h.update(v.digest());
            count += 1;
        }
        RangeSummary {
            digest: h.finalize(),
            count,
        }
    }

    /// (position, version digest) of every entry in (lo, hi].
    pub fn list(&self, lo: Id, hi: Id) -> Vec<(Id, Digest)> {
        self.range(lo, hi).map(|(k, v)| (*k, v.digest())).collect()
    }
}

/// Splits the ring interval (lo, hi] into `parts` consecutive intervals of
/// (almost) equal width. lo == hi is the whole ring.
pub fn split_range(lo: Id, hi: Id, parts: usize) -> Vec<(Id, Id)> {
    let parts = parts.max(1);
    let width = lo.distance_to(hi);
    let width = if width == Id::ZERO { Id::MAX } else { width };
    let step = width.div_small(parts as u32);
    let mut out = Vec::with_capacity(parts);
    let mut a = lo;
    for i in 0..parts {
        let b = if i + 1 == parts {
            hi
        } else {
            a.wrapping_add(step)
        };
        out.push((a, b));
        a = b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(v: u128) -> Id {
        Id::from_u128(v)
    }

    #[test]
    fn ids_hashed_in_pairs_are_each_blocks_own() {
        let known = Block::new(id(1), vec![9; 70]);
        let _ = known.id();
        let shared = Block::new(id(1), vec![4; 3000]);
        let blocks: Vec<Block> = vec![
            Block::new(id(1), vec![1; 5000]),
            Block::new(id(1), vec![2; 64]),
            known.clone(),
            Block::new(id(1), Vec::new()),
            shared.clone(),
            shared.clone(),
            Block::new(id(1), (0..100_000u32).map(|i| i as u8).collect()),
        ];
        let refs: Vec<&Block> = blocks.iter().chain([&shared]).collect();
        Block::hash_ids(&refs);
        for (i, b) in refs.iter().enumerate() {
            assert_eq!(b.id.get(), Some(&sha256(b.data())), "block {i}");
        }
        // Nothing to do, or one alone.
        Block::hash_ids(&[]);
        let one = Block::new(id(1), vec![3; 10]);
        Block::hash_ids(&[&one]);
        assert_eq!(one.id.get(), Some(&sha256(&[3; 10])));
    }

    #[test]
    fn clones_of_a_block_share_its_bytes_until_one_is_corrupted() {
        let a = Block::new(id(1), vec![5; 4096]);
        let want = a.id();
        let mut b = a.clone();
        assert!(std::ptr::eq(a.data().as_ptr(), b.data().as_ptr()), "shared");
        assert_eq!(b.id(), want);
        b.flip_bit(10, 3);
        assert_eq!(a.data()[10], 5, "the original keeps its bytes");
        assert_eq!(b.data()[10], 5 ^ 8);
        assert_ne!(b.id(), want, "the corrupted copy's id follows its bytes");
        assert_eq!(a.id(), want);
        // Taking the bytes out copies them only while they are shared.
        let c = a.clone();
        let before = c.data().as_ptr();
        drop(a);
        let taken = c.into_data();
        assert_eq!(taken.as_ptr(), before);
        // Encoded as a plain byte string, as before.
        let blk = Block::new(id(2), vec![1, 2, 3]);
        let mut want = postcard::to_allocvec(&id(2)).unwrap();
        want.extend_from_slice(&[3, 1, 2, 3]);
        assert_eq!(postcard::to_allocvec(&blk).unwrap(), want);
        assert_eq!(postcard::from_bytes::<Block>(&want).unwrap(), blk);
    }

    fn block(n: u8) -> Held {
        Held::Block {
            id: [n; 32],
            owner: Id::ZERO,
            size: 10,
        }
    }

    #[test]
    fn ranges_wrap_and_summaries_match_contents() {
        let mut a = Index::new();
        for v in [5u128, 10, 20, 30] {
            a.insert(id(v), block(v as u8));
        }
        let keys: Vec<u128> = a.range(id(20), id(10)).map(|(k, _)| k.low_u128()).collect();
        assert_eq!(keys, vec![30, 5, 10]);
        assert_eq!(
            a.range(id(5), id(5)).count(),
            4,
            "lo == hi is the whole ring"
        );
        let mut b = a.clone();
        assert_eq!(a.summarize(id(0), id(25)), b.summarize(id(0), id(25)));
        b.insert(id(7), block(7));
        assert_ne!(a.summarize(id(0), id(25)), b.summarize(id(0), id(25)));
        assert_eq!(a.summarize(id(10), id(25)), b.summarize(id(10), id(25)));
        assert_eq!(b.summarize(id(0), id(25)).count, 4);
        b.remove(&id(7));
        assert_eq!(a.summarize(id(0), id(25)), b.summarize(id(0), id(25)));
        assert_eq!(a.bytes(), b.bytes());
    }

    #[test]
    fn tombstones_signed_in_a_batch_validate_each_for_its_own_block() {
        use rand_chacha::rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let owner = record::Signer::generate(&mut rng, 1024).expect("key");
        let blocks: Vec<BlockId> = (0..3u8).map(|i| [i; 32]).collect();
        let ts = Tombstone::new_batch(&mut rng, &owner, &blocks);
        assert_eq!(ts.len(), 3);
        for (t, b) in ts.iter().zip(&blocks) {
            assert_eq!(t.block, *b);
            assert_eq!(Item::Tombstone(t.clone()).validate(1024), Ok(()));
        }
        let mut moved = ts[0].clone();
        moved.block = blocks[1];
        assert!(Item::Tombstone(moved).validate(1024).is_err());
    }

    #[test]
    fn split_covers_the_range_exactly() {
        for (lo, hi) in [(id(0), id(1600)), (Id::MAX, id(15)), (id(9), id(9))] {
            let parts = split_range(lo, hi, 16);
            assert_eq!(parts.len(), 16);
            assert_eq!(parts[0].0, lo);
            assert_eq!(parts[15].1, hi);
            for w in parts.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
        }
    }
}
