//! Helpers shared by the disk store's test binaries.

use peerstore_core::store::sha256;
use peerstore_core::{Id, Item, StorageOp, Tombstone};

/// A tombstone (the disk does not check signatures; the core does).
pub fn tombstone(seed: u64) -> (Id, Item) {
    let item = Item::Tombstone(Tombstone {
        block: sha256(&seed.to_le_bytes()),
        owner_key: vec![seed as u8; 40],
        sig: vec![7; 64],
    });
    (item.position(), item)
}

/// The write of `(key, item)`.
pub fn write_op((key, item): &(Id, Item)) -> StorageOp {
    StorageOp::Write {
        key: *key,
        item: item.clone(),
    }
}
