//! The disk store: round trips, restarts, every kind of damage, capacity and
//! I/O failures, in both places an item can be kept: small items packed into
//! one database (`packed.redb`), large ones in a file each. Everything is
//! deterministic: fixed data, fixed seeds.

mod common;

use common::{tombstone, write_op};
use peerstore_core::store::sha256;
use peerstore_core::{Block, Id, Item, StorageOp, StorageResult, StoreError, Tombstone};
use peerstore_net::dio::DIRECT_MIN;
use peerstore_node::disk::{DiskConfig, DiskStore, HEADER_LEN};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// Bytes of data that make a block large enough for a file of its own (its
/// encoding is over the store's 64 KiB threshold). Every test that relies on
/// that also checks it (`place(..) == Some(false)`), so a change of the
/// threshold cannot quietly turn a test of files into one of the database.
const LARGE: usize = 70_000;
const _: () = assert!(LARGE > DIRECT_MIN);

/// A block of `len` pseudo-random bytes (xorshift from `seed`).
fn block(seed: u64, len: usize) -> (Id, Item) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let item = Item::Block(Block::new(Id::from_u128(u128::from(seed)), data));
    (item.position(), item)
}

/// A tombstone of the block `b`, so at the block's key, with a signature of
/// `sig_len` bytes: the disk checks no signatures, so a long one makes a
/// tombstone large enough for a file, and a key can move from the database
/// to a file and back.
fn tombstone_of(b: &Item, sig_len: usize) -> (Id, Item) {
    let Item::Block(b) = b else {
        panic!("not a block")
    };
    let item = Item::Tombstone(Tombstone {
        block: b.id(),
        owner_key: vec![1; 40],
        sig: vec![2; sig_len],
    });
    (item.position(), item)
}

/// The same block under another owner: the same key, other bytes.
fn other_owner(b: &Item, owner: u128) -> Item {
    let Item::Block(b) = b else {
        panic!("not a block")
    };
    let mut b = b.clone();
    b.owner = Id::from_u128(owner);
    Item::Block(b)
}

/// An item's bytes in the format of the module documentation (format 2):
/// what the store keeps in an item file or a packed value.
fn encode(item: &Item) -> Vec<u8> {
    let payload = postcard::to_allocvec(item).unwrap();
    let digest = match item {
        Item::Block(b) => {
            let mut m = b"peerstore/disk/block/v2".to_vec();
            m.extend_from_slice(b.owner.as_bytes());
            m.extend_from_slice(&b.id());
            sha256(&m)
        }
        _ => sha256(&payload),
    };
    let mut out = b"PSI1".to_vec();
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&digest);
    out.extend_from_slice(&payload);
    out
}

fn open(dir: &Path) -> DiskStore {
    DiskStore::open(dir, DiskConfig::default()).expect("open the store")
}

fn open_with_capacity(dir: &Path, cap: u64) -> DiskStore {
    DiskStore::open(
        dir,
        DiskConfig {
            capacity_bytes: Some(cap),
        },
    )
    .expect("open the store")
}

fn put(s: &mut DiskStore, it: &(Id, Item)) {
    let r = s.apply(write_op(it));
    assert_eq!(r, StorageResult::Done);
}

fn get(s: &DiskStore, key: &Id) -> StorageResult {
    // `apply` needs `&mut`; reads are the same through `read`.
    match s.read(key) {
        Ok(found) => StorageResult::Read(found),
        Err(e) => StorageResult::Failed(e),
    }
}

/// Where the store keeps `key`: `Some(true)` packed, `Some(false)` in a
/// file, `None` nowhere.
fn place(s: &DiskStore, key: &Id) -> Option<bool> {
    s.is_packed(key).expect("look the key up")
}

/// The running counts agree with a count afresh of the database and files.
#[track_caller]
fn assert_counts(s: &DiskStore) {
    let st = s.stats();
    assert_eq!(s.recount().expect("recount"), (st.items, st.bytes));
}

/// What one item costs the store (its encoding), measured in a store of
/// its own.
fn stored_size(item: &(Id, Item)) -> u64 {
    let probe = TempDir::new().unwrap();
    let mut s = open(probe.path());
    put(&mut s, item);
    s.stats().bytes
}

fn scan_all(s: &DiskStore) -> BTreeMap<Id, Item> {
    let mut out = BTreeMap::new();
    let mut last = None;
    for (key, item) in s.scan() {
        assert!(last < Some(key), "scan yields keys in order, once each");
        last = Some(key);
        out.insert(key, item);
    }
    out
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Copies the tree at `from` to `to` (files and directories only).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn quarantined(dir: &Path) -> usize {
    fs::read_dir(dir.join("quarantine")).unwrap().count()
}

/// The names in the quarantine directory, sorted.
fn quarantine_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn temps(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join("items"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Items written are read back as they were, from the database (small
/// ones) or from their own file (large ones); removes take them out of
/// either place, removing what is not there is done too, and the counters
/// follow.
#[test]
fn write_read_remove_round_trip() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let b = block(1, 5000);
    let t = tombstone(2);
    let empty = block(3, 0);
    let large = block(4, LARGE);
    for (it, packed) in [(&b, true), (&t, true), (&empty, true), (&large, false)] {
        assert_eq!(get(&s, &it.0), StorageResult::Read(None));
        assert_eq!(place(&s, &it.0), None);
        put(&mut s, it);
        assert_eq!(get(&s, &it.0), StorageResult::Read(Some(it.1.clone())));
        assert_eq!(place(&s, &it.0), Some(packed));
        assert_eq!(s.item_path(&it.0).is_file(), !packed);
    }
    assert!(s.packed_path().is_file());
    // The documented format, in the file.
    assert_eq!(fs::read(s.item_path(&large.0)).unwrap(), encode(&large.1));
    let st = s.stats();
    assert_eq!(st.items, 4);
    assert_counts(&s);
    assert!(st.bytes > 5000 + LARGE as u64 + 4 * HEADER_LEN);

    for gone in [&b, &large] {
        let key = gone.0;
        assert_eq!(s.apply(StorageOp::Remove { key }), StorageResult::Done);
        assert_eq!(s.apply(StorageOp::Read { key }), StorageResult::Read(None));
        assert_eq!(place(&s, &key), None);
        assert!(!s.item_path(&key).exists());
        // Removing what is not there is done too.
        assert_eq!(s.apply(StorageOp::Remove { key }), StorageResult::Done);
    }
    let st = s.stats();
    assert_eq!(st.items, 2);
    assert_counts(&s);
    assert_eq!((st.corrupt_found, st.io_errors), (0, 0));
    assert!(temps(tmp.path()).is_empty());
    assert!(files(&tmp.path().join("items")).is_empty());
    assert_eq!(scan_all(&s), BTreeMap::from([t.clone(), empty.clone()]));
}

/// Writing a key again replaces its item and keeps the count, whether the
/// new item stays where the old one was or moves: a large block replaced by
/// its small tombstone moves out of its file into the database, a
/// tombstone large enough for a file moves out again, and so on. Nothing is
/// left in the place a key moved out of, also after a reopen.
#[test]
fn overwrite_replaces_and_keeps_the_count() {
    for len in [3000, LARGE] {
        let tmp = TempDir::new().unwrap();
        let mut s = open(tmp.path());
        let small = len < LARGE;
        let (key, item) = block(4, len);
        put(&mut s, &(key, item.clone()));
        assert_eq!(place(&s, &key), Some(small));
        // Same bytes, another owner: the same key.
        let other = other_owner(&item, 99);
        assert_eq!(other.position(), key);
        put(&mut s, &(key, other.clone()));
        assert_eq!(get(&s, &key), StorageResult::Read(Some(other.clone())));
        assert_eq!(place(&s, &key), Some(small));
        assert_eq!(s.stats().items, 1);
        assert_counts(&s);
        // A delete replaces the block with its (much smaller) tombstone,
        // which is packed.
        let tomb = tombstone_of(&item, 64);
        assert_eq!(tomb.0, key);
        put(&mut s, &tomb);
        assert_eq!(get(&s, &key), StorageResult::Read(Some(tomb.1.clone())));
        assert_eq!(place(&s, &key), Some(true));
        assert!(!s.item_path(&key).exists());
        let st = s.stats();
        assert_eq!(st.items, 1);
        assert_counts(&s);
        assert!(st.bytes < 1000);
        // A tombstone too large to be packed gets a file.
        let fat = tombstone_of(&item, LARGE);
        put(&mut s, &fat);
        assert_eq!(get(&s, &key), StorageResult::Read(Some(fat.1.clone())));
        assert_eq!(place(&s, &key), Some(false));
        assert!(s.item_path(&key).is_file());
        assert_eq!(s.stats().items, 1);
        assert_counts(&s);
        // And back into the database.
        put(&mut s, &tomb);
        assert_eq!(get(&s, &key), StorageResult::Read(Some(tomb.1.clone())));
        assert_eq!(place(&s, &key), Some(true));
        assert!(!s.item_path(&key).exists());
        assert_counts(&s);
        // The block again, where a block of its size goes.
        put(&mut s, &(key, other.clone()));
        assert_eq!(get(&s, &key), StorageResult::Read(Some(other.clone())));
        assert_eq!(place(&s, &key), Some(small));
        assert_eq!(s.item_path(&key).exists(), !small);
        let before = s.stats();
        assert_eq!(before.items, 1);
        assert_counts(&s);
        drop(s);
        let s = open(tmp.path());
        let st = s.stats();
        assert_eq!((st.items, st.bytes), (before.items, before.bytes));
        assert_counts(&s);
        assert_eq!(scan_all(&s), BTreeMap::from([(key, other.clone())]));
        assert_eq!((st.corrupt_found, st.io_errors), (0, 0));
    }
}

/// The threshold is where the module documentation puts it: an item whose
/// encoding (header and payload) is under 64 KiB is packed, one of 64 KiB
/// or more gets a file; both read back, and a key moves across the line
/// when it is written again.
#[test]
fn items_are_packed_up_to_the_threshold_and_get_files_from_it() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    // The data length whose block encodes to exactly `DIRECT_MIN` bytes.
    let at = (DIRECT_MIN - 100..DIRECT_MIN)
        .find(|&len| encode(&block(60, len).1).len() == DIRECT_MIN)
        .expect("a length at the threshold");
    for (seed, len, packed) in [(60, at - 1, true), (61, at, false), (62, at + 1, false)] {
        let it = block(seed, len);
        put(&mut s, &it);
        assert_eq!(place(&s, &it.0), Some(packed), "{len} bytes of data");
        assert_eq!(get(&s, &it.0), StorageResult::Read(Some(it.1.clone())));
    }
    assert_counts(&s);
    // A tombstone growing across the line and shrinking back.
    let t = |sig_len: usize| tombstone_of(&block(63, 10).1, sig_len);
    let sig_at = (DIRECT_MIN - 200..DIRECT_MIN)
        .find(|&n| encode(&t(n).1).len() == DIRECT_MIN)
        .expect("a signature length at the threshold");
    for (sig_len, packed) in [(sig_at - 1, true), (sig_at, false), (sig_at - 1, true)] {
        let it = t(sig_len);
        put(&mut s, &it);
        assert_eq!(place(&s, &it.0), Some(packed), "signature of {sig_len}");
        assert_eq!(s.item_path(&it.0).exists(), !packed);
        assert_eq!(get(&s, &it.0), StorageResult::Read(Some(it.1.clone())));
        assert_counts(&s);
    }
    drop(s);
    let s = open(tmp.path());
    assert_eq!(scan_all(&s).len(), 4);
    assert_counts(&s);
}

/// Writes and removes of one key take effect in the order they are issued,
/// for a packed item, an item in a file, and a key moving between them.
#[test]
fn operations_on_one_key_take_effect_in_issue_order() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    for len in [100, LARGE] {
        let (key, item) = block(5, len);
        let ops = [
            StorageOp::Write {
                key,
                item: item.clone(),
            },
            StorageOp::Remove { key },
            StorageOp::Write {
                key,
                item: item.clone(),
            },
        ];
        for op in ops {
            assert_eq!(s.apply(op), StorageResult::Done);
        }
        assert_eq!(get(&s, &key), StorageResult::Read(Some(item)));
        assert_eq!(place(&s, &key), Some(len < LARGE));
        assert_eq!(s.apply(StorageOp::Remove { key }), StorageResult::Done);
        assert_eq!(get(&s, &key), StorageResult::Read(None));
    }
    // A large block, its tombstone, a large tombstone, removed, the block.
    let (key, item) = block(6, LARGE);
    let tomb = tombstone_of(&item, 64).1;
    let fat = tombstone_of(&item, LARGE).1;
    let w = |item: &Item| StorageOp::Write {
        key,
        item: item.clone(),
    };
    for (op, want, at) in [
        (w(&item), Some(&item), Some(false)),
        (w(&tomb), Some(&tomb), Some(true)),
        (w(&fat), Some(&fat), Some(false)),
        (StorageOp::Remove { key }, None, None),
        (w(&tomb), Some(&tomb), Some(true)),
        (StorageOp::Remove { key }, None, None),
        (w(&item), Some(&item), Some(false)),
    ] {
        assert_eq!(s.apply(op), StorageResult::Done);
        assert_eq!(get(&s, &key), StorageResult::Read(want.cloned()));
        assert_eq!(place(&s, &key), at);
        assert_counts(&s);
    }
}

/// An item written under a key other than its own is refused, whether it
/// would be packed or get a file, and leaves nothing behind.
#[test]
fn an_item_under_another_key_is_refused() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    for len in [100, LARGE] {
        let (_, item) = block(6, len);
        let (wrong, _) = block(7, len);
        let r = s.apply(StorageOp::Write {
            key: wrong,
            item: item.clone(),
        });
        assert!(matches!(r, StorageResult::Failed(StoreError::Invalid(_))));
        assert_eq!(get(&s, &wrong), StorageResult::Read(None));
        assert_eq!(place(&s, &wrong), None);
        assert!(files(&tmp.path().join("items")).is_empty());
        assert_eq!(s.stats().items, 0);
        assert_eq!(s.recount().unwrap(), (0, 0));
    }
}

/// After a restart the store finds every item, packed or in a file, with
/// the right counts, and not the ones removed before it.
#[test]
fn a_reopened_store_finds_everything() {
    let tmp = TempDir::new().unwrap();
    let mut want = BTreeMap::new();
    let is_large = |seed: u64| seed % 4 == 1;
    {
        let mut s = open(tmp.path());
        for seed in 0..60 {
            let it = if seed % 3 == 0 {
                tombstone(seed)
            } else if is_large(seed) {
                block(seed, LARGE + seed as usize)
            } else {
                block(seed, (seed as usize * 97) % 4000)
            };
            put(&mut s, &it);
            assert_eq!(place(&s, &it.0), Some(!is_large(seed) || seed % 3 == 0));
            want.insert(it.0, it.1);
        }
        // Some removed before the restart stay removed.
        for key in want.keys().copied().step_by(7).collect::<Vec<_>>() {
            assert_eq!(s.apply(StorageOp::Remove { key }), StorageResult::Done);
            want.remove(&key);
        }
    }
    let s = open(tmp.path());
    let st = s.stats();
    assert_eq!(st.items, want.len() as u64);
    assert_counts(&s);
    assert_eq!(scan_all(&s), want);
    let mut in_files = 0;
    for (key, item) in &want {
        assert_eq!(get(&s, key), StorageResult::Read(Some(item.clone())));
        let packed = place(&s, key).expect("still there");
        assert_eq!(packed, !s.item_path(key).exists());
        in_files += usize::from(!packed);
    }
    assert_eq!(in_files, files(&tmp.path().join("items")).len());
    assert!(in_files >= 5 && in_files < want.len() - 5, "{in_files}");
    // A scan can stop early, and scanning again gives the same.
    assert_eq!(s.scan().take(3).count(), 3);
    assert_eq!(scan_all(&s), want);
    let st = s.stats();
    assert_eq!(
        (st.corrupt_found, st.io_errors, st.temps_removed),
        (0, 0, 0)
    );
}

/// Many small writes, in groups and one by one, with overwrites and
/// removes: all packed, and after a restart all there with the right
/// counts.
#[test]
fn a_reopened_store_finds_many_small_items() {
    let tmp = TempDir::new().unwrap();
    let mut want = BTreeMap::new();
    let before = {
        let mut s = open(tmp.path());
        let items: Vec<(Id, Item)> = (0..3000u64)
            .map(|seed| {
                if seed % 2 == 0 {
                    tombstone(seed)
                } else {
                    block(seed, (seed as usize * 13) % 3000)
                }
            })
            .collect();
        for chunk in items.chunks(250) {
            let ops = chunk.iter().map(write_op).collect();
            let results = s.apply_batch(ops);
            assert!(results.iter().all(|r| *r == StorageResult::Done));
            want.extend(chunk.iter().cloned());
        }
        // One at a time: overwrites with another owner, and removes.
        for (key, item) in items.iter().skip(1).step_by(10) {
            let other = other_owner(item, 4242);
            put(&mut s, &(*key, other.clone()));
            want.insert(*key, other);
        }
        for (key, _) in items.iter().step_by(9) {
            assert_eq!(
                s.apply(StorageOp::Remove { key: *key }),
                StorageResult::Done
            );
            want.remove(key);
        }
        assert_eq!(s.stats().items, want.len() as u64);
        assert_counts(&s);
        s.stats()
    };
    let s = open(tmp.path());
    let st = s.stats();
    assert_eq!((st.items, st.bytes), (before.items, before.bytes));
    assert_counts(&s);
    assert!(files(&tmp.path().join("items")).is_empty(), "all packed");
    assert_eq!(scan_all(&s), want);
    for (key, item) in want.iter().step_by(17) {
        assert_eq!(get(&s, key), StorageResult::Read(Some(item.clone())));
        assert_eq!(place(&s, key), Some(true));
    }
    assert_eq!((st.corrupt_found, st.io_errors), (0, 0));
}

/// A directory that does not exist yet opens as an empty store, with its
/// shard directories, quarantine and database made.
#[test]
fn an_empty_or_missing_directory_opens_empty() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("not/yet/there");
    let s = open(&dir);
    assert_eq!(s.scan().count(), 0);
    assert_eq!(s.stats(), Default::default());
    assert_eq!(s.recount().unwrap(), (0, 0));
    assert!(dir.join("items/00").is_dir() && dir.join("items/ff").is_dir());
    assert!(dir.join("quarantine").is_dir());
    assert_eq!(s.packed_path(), dir.join("packed.redb"));
    assert!(s.packed_path().is_file());
}

/// While a store has the directory open, a second one is refused (the
/// database is locked) without harming anything: the first goes on
/// working, nothing is quarantined, and once it is closed the directory
/// opens with everything in it.
#[test]
fn a_second_store_on_the_same_directory_is_refused_and_harms_nothing() {
    let tmp = TempDir::new().unwrap();
    let (small, large) = (tombstone(8), block(9, LARGE));
    let mut s = open(tmp.path());
    put(&mut s, &small);
    put(&mut s, &large);
    assert!(DiskStore::open(tmp.path(), DiskConfig::default()).is_err());
    assert_eq!(quarantined(tmp.path()), 0);
    assert_eq!(
        get(&s, &small.0),
        StorageResult::Read(Some(small.1.clone()))
    );
    assert_eq!(place(&s, &large.0), Some(false));
    let more = tombstone(10);
    put(&mut s, &more);
    drop(s);
    let s = open(tmp.path());
    assert_eq!(
        scan_all(&s),
        BTreeMap::from([small.clone(), large.clone(), more.clone()])
    );
    assert_eq!(s.stats().corrupt_found, 0);
    assert_counts(&s);
}

// ----- damage to item files ---------------------------------------------------

/// How the damage is to be found.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// A read by the running store.
    Read,
    /// A scan after a restart.
    Scan,
}

/// Stores three items, the middle one (and one other) large enough for a
/// file of its own, lets `damage` harm the middle one's file (returning the
/// key whose file is now bad), and checks that the damage is found,
/// quarantined, never returned, and leaves the other two (one packed, one
/// in a file) alone.
fn assert_detected(damage: impl Fn(&DiskStore, &Id) -> Id) {
    for via in [Via::Read, Via::Scan] {
        let tmp = TempDir::new().unwrap();
        let items = [block(10, 2000), block(11, LARGE), block(12, LARGE + 700)];
        let mut s = open(tmp.path());
        for it in &items {
            put(&mut s, it);
        }
        assert_eq!(place(&s, &items[0].0), Some(true));
        assert_eq!(place(&s, &items[1].0), Some(false), "the victim is a file");
        assert_eq!(place(&s, &items[2].0), Some(false));
        let bad = damage(&s, &items[1].0);
        let s = match via {
            Via::Read => {
                assert_eq!(get(&s, &bad), StorageResult::Read(None), "{via:?}");
                s
            }
            Via::Scan => {
                drop(s);
                let s = open(tmp.path());
                let found = scan_all(&s);
                let want: BTreeMap<_, _> = [&items[0], &items[2]]
                    .into_iter()
                    .map(|(k, i)| (*k, i.clone()))
                    .collect();
                assert_eq!(found, want, "{via:?}");
                // Accounting is exact once the damage is counted at open.
                assert_counts(&s);
                assert_eq!(s.stats().items, 2, "{via:?}");
                s
            }
        };
        let st = s.stats();
        assert_eq!(st.corrupt_found, 1, "{via:?}");
        assert_eq!(st.io_errors, 0, "{via:?}: {:?}", st.last_error);
        let why = st.last_corrupt.expect("the corruption is reported");
        assert!(why.contains(&bad.to_string()), "{why}");
        assert_eq!(quarantined(tmp.path()), 1, "{via:?}");
        assert!(!s.item_path(&bad).exists(), "{via:?}");
        // Found once, gone for good; the others untouched.
        assert_eq!(get(&s, &bad), StorageResult::Read(None));
        assert_eq!(get(&s, &items[1].0), StorageResult::Read(None));
        assert_eq!(place(&s, &items[1].0), None);
        for it in [&items[0], &items[2]] {
            assert_eq!(get(&s, &it.0), StorageResult::Read(Some(it.1.clone())));
        }
        assert_eq!(scan_all(&s).len(), 2);
        assert_eq!(s.stats().corrupt_found, 1);
        // The key can be written again.
        let mut s = s;
        put(&mut s, &items[1]);
        assert_eq!(
            get(&s, &items[1].0),
            StorageResult::Read(Some(items[1].1.clone()))
        );
        assert_eq!(place(&s, &items[1].0), Some(false));
    }
}

fn mangle(s: &DiskStore, key: &Id, f: impl FnOnce(&mut Vec<u8>)) -> Id {
    let path = s.item_path(key);
    let mut bytes = fs::read(&path).unwrap();
    f(&mut bytes);
    fs::write(&path, bytes).unwrap();
    *key
}

/// An item file cut short (by one byte, to the header, inside the header)
/// is found and quarantined.
#[test]
fn a_truncated_file_is_detected() {
    assert_detected(|s, k| mangle(s, k, |b| b.truncate(b.len() - 1)));
    assert_detected(|s, k| mangle(s, k, |b| b.truncate(HEADER_LEN as usize)));
    assert_detected(|s, k| mangle(s, k, |b| b.truncate(HEADER_LEN as usize / 2)));
}

/// An empty item file is found and quarantined.
#[test]
fn an_empty_file_is_detected() {
    assert_detected(|s, k| mangle(s, k, |b| b.clear()));
}

/// A flipped byte anywhere in an item file is found and quarantined.
#[test]
fn a_flipped_byte_is_detected() {
    // In the payload, the hash, the length, the version and the magic.
    for at in [60, 47, 20, 9, 5, 0] {
        assert_detected(|s, k| mangle(s, k, |b| b[at] ^= 0x10));
    }
    assert_detected(|s, k| mangle(s, k, |b| *b.last_mut().unwrap() ^= 1));
}

/// Garbage, trailing bytes, and a well-formed header over something that is
/// not an item are found and quarantined.
#[test]
fn garbage_is_detected() {
    assert_detected(|s, k| {
        mangle(s, k, |b| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = (i as u8).wrapping_mul(31);
            }
        })
    });
    assert_detected(|s, k| mangle(s, k, |b| b.extend_from_slice(b"trailing")));
    // A well-formed header over a payload that is not an item.
    assert_detected(|s, k| {
        mangle(s, k, |b| {
            let payload = b"\xff\xff\xff\xff\xff\xff not an item".to_vec();
            b.truncate(8);
            b.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            b.extend_from_slice(&sha256(&payload));
            b.extend_from_slice(&payload);
        })
    });
}

/// A valid item file moved to another key's name is found: the item does
/// not belong there.
#[test]
fn a_file_renamed_to_another_key_is_detected() {
    assert_detected(|s, k| {
        let (other, _) = block(13, 10);
        fs::rename(s.item_path(k), s.item_path(&other)).unwrap();
        other
    });
}

/// A directory where an item file belongs is found and quarantined.
#[test]
fn a_directory_where_an_item_belongs_is_detected() {
    assert_detected(|s, k| {
        let (other, _) = block(14, 10);
        fs::create_dir_all(s.item_path(&other).join("inside")).unwrap();
        fs::remove_file(s.item_path(k)).unwrap();
        other
    });
}

/// Names in the items tree that are not item files in their right shard
/// are quarantined by the scan; the real items (a file and a packed one)
/// are untouched.
#[test]
fn stray_names_in_the_items_tree_are_quarantined() {
    let tmp = TempDir::new().unwrap();
    let (key, item) = block(15, LARGE);
    let small = tombstone(15);
    {
        let mut s = open(tmp.path());
        put(&mut s, &(key, item.clone()));
        put(&mut s, &small);
        assert_eq!(place(&s, &key), Some(false));
        let good = fs::read(s.item_path(&key)).unwrap();
        let shard = s.item_path(&key).parent().unwrap().to_path_buf();
        // A valid item file under a wrong name, an uppercase name, a name
        // that is not hex, and the right name in the wrong shard.
        fs::write(shard.join("README"), b"hello").unwrap();
        fs::write(shard.join(key.to_string().to_uppercase()), &good).unwrap();
        let wrong_shard = if key.0[0] == 0 { "01" } else { "00" };
        fs::write(
            tmp.path()
                .join("items")
                .join(wrong_shard)
                .join(key.to_string()),
            &good,
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let name = std::ffi::OsStr::from_bytes(b"\xff\xfe-not-utf8");
            fs::write(shard.join(name), b"x").unwrap();
        }
    }
    let s = open(tmp.path());
    assert_eq!(s.stats().items, 2);
    assert_eq!(
        scan_all(&s),
        BTreeMap::from([(key, item.clone()), small.clone()]),
        "only the real items"
    );
    let strays = if cfg!(unix) { 4 } else { 3 };
    assert_eq!(s.stats().corrupt_found, strays);
    assert_eq!(quarantined(tmp.path()), strays as usize);
    assert_eq!(files(&tmp.path().join("items")), vec![s.item_path(&key)]);
    assert_counts(&s);
    assert_eq!(get(&s, &key), StorageResult::Read(Some(item)));
    assert_eq!(get(&s, &small.0), StorageResult::Read(Some(small.1)));
}

/// The same item file found bad twice leaves two copies in quarantine.
#[test]
fn the_same_bad_name_twice_keeps_both_copies_in_quarantine() {
    let tmp = TempDir::new().unwrap();
    let (key, item) = block(16, LARGE);
    let mut s = open(tmp.path());
    for _ in 0..2 {
        put(&mut s, &(key, item.clone()));
        assert_eq!(place(&s, &key), Some(false));
        mangle(&s, &key, |b| b[50] ^= 1);
        assert_eq!(get(&s, &key), StorageResult::Read(None));
    }
    assert_eq!(quarantined(tmp.path()), 2);
    assert_eq!(s.stats().corrupt_found, 2);
}

/// Temporary files of writes a crash interrupted are deleted on open and
/// their writes never show; the other items (in a file and packed) stay.
#[test]
fn leftover_temp_files_are_deleted_on_open() {
    let tmp = TempDir::new().unwrap();
    let kept = block(17, LARGE);
    let packed = tombstone(17);
    let (lost, _) = block(18, LARGE);
    {
        let mut s = open(tmp.path());
        put(&mut s, &kept);
        put(&mut s, &packed);
        put(&mut s, &block(18, LARGE));
        assert_eq!(place(&s, &lost), Some(false));
        // A crash after the temporary file was complete but before the
        // rename: the write was never acknowledged.
        let good = fs::read(s.item_path(&lost)).unwrap();
        let shard = s.item_path(&lost).parent().unwrap().to_path_buf();
        fs::remove_file(s.item_path(&lost)).unwrap();
        fs::write(shard.join(format!(".tmp-{lost}-1")), &good).unwrap();
        // A crash mid-write.
        fs::write(shard.join(format!(".tmp-{lost}-2")), &good[..10]).unwrap();
        fs::write(shard.join(".tmp-"), b"").unwrap();
    }
    let s = open(tmp.path());
    let st = s.stats();
    assert_eq!(st.temps_removed, 3);
    assert!(temps(tmp.path()).is_empty());
    assert_eq!(scan_all(&s), BTreeMap::from([kept.clone(), packed.clone()]));
    assert_eq!(get(&s, &lost), StorageResult::Read(None));
    let st = s.stats();
    assert_eq!((st.items, st.corrupt_found, st.io_errors), (2, 0, 0));
    assert_counts(&s);
}

// ----- a stale file --------------------------------------------------------------

/// A crash while a key moves from its file into the database (the packed
/// copy durable, the file not yet unlinked) leaves it in both places. The
/// packed copy is the newer and wins: the next open deletes the file and
/// counts only the packed copy, and reads and scans give the packed item.
/// The crash is simulated by putting the old file back with the store
/// closed.
#[test]
fn a_stale_file_left_by_a_move_into_the_database_is_deleted_on_open() {
    let tmp = TempDir::new().unwrap();
    let big = block(19, LARGE);
    let tomb = tombstone_of(&big.1, 64);
    let other = block(20, LARGE);
    let old = {
        let mut s = open(tmp.path());
        put(&mut s, &big);
        put(&mut s, &other);
        assert_eq!(place(&s, &big.0), Some(false));
        let old = fs::read(s.item_path(&big.0)).unwrap();
        put(&mut s, &tomb);
        assert_eq!(place(&s, &big.0), Some(true));
        assert!(!s.item_path(&big.0).exists());
        fs::write(s.item_path(&big.0), &old).unwrap();
        old
    };
    let s = open(tmp.path());
    assert!(!s.item_path(&big.0).exists(), "deleted on open");
    let st = s.stats();
    assert_eq!(st.items, 2);
    assert_counts(&s);
    assert_eq!(get(&s, &big.0), StorageResult::Read(Some(tomb.1.clone())));
    assert_eq!(place(&s, &big.0), Some(true));
    assert_eq!(scan_all(&s), BTreeMap::from([tomb.clone(), other.clone()]));
    // Not damage: nothing is quarantined.
    let st = s.stats();
    assert_eq!((st.corrupt_found, st.io_errors), (0, 0));
    assert_eq!(quarantined(tmp.path()), 0);

    // One that turns up under the running store: reads prefer the packed
    // copy, and the scan deletes the file.
    fs::write(s.item_path(&big.0), &old).unwrap();
    assert_eq!(get(&s, &big.0), StorageResult::Read(Some(tomb.1.clone())));
    assert_eq!(scan_all(&s), BTreeMap::from([tomb.clone(), other.clone()]));
    assert!(!s.item_path(&big.0).exists(), "deleted by the scan");
    assert_eq!(s.stats().corrupt_found, 0);
    // The store counts a stale file it deletes at run time as one of its
    // own (what a failed unlink leaves); this one was put there behind its
    // back, so the counts are exact again after the next open.
    drop(s);
    let s = open(tmp.path());
    assert_counts(&s);
    assert_eq!(s.stats().items, 2);
}

/// A stale file beside a packed copy must never come back: whatever left
/// it there (a write moving the key into the database whose unlink of the
/// old file failed, so that it answered `Io` with its packed copy already
/// committed; or a stale file that open could not delete), once the key is
/// removed the store holds nothing at it. Here the file turns up under the
/// running store and the key is removed before any scan has seen it.
/// (Fails as the store stands: a remove of a packed key deletes it from
/// the database only, and reads then find the old file.)
#[test]
fn a_removed_key_does_not_bring_back_a_stale_file() {
    let tmp = TempDir::new().unwrap();
    let big = block(21, LARGE);
    let tomb = tombstone_of(&big.1, 64);
    let mut s = open(tmp.path());
    put(&mut s, &big);
    assert_eq!(place(&s, &big.0), Some(false));
    let old = fs::read(s.item_path(&big.0)).unwrap();
    put(&mut s, &tomb);
    assert_eq!(place(&s, &big.0), Some(true));
    fs::write(s.item_path(&big.0), &old).unwrap();
    assert_eq!(get(&s, &big.0), StorageResult::Read(Some(tomb.1.clone())));
    assert_eq!(
        s.apply(StorageOp::Remove { key: big.0 }),
        StorageResult::Done
    );
    assert_eq!(
        get(&s, &big.0),
        StorageResult::Read(None),
        "the removed key reads as the old block from its stale file"
    );
    assert_eq!(place(&s, &big.0), None);
    assert_eq!(scan_all(&s), BTreeMap::new());
}

// ----- damage to the database -------------------------------------------------

/// Stores two packed items and one in a file, puts `bad` into the database
/// as the packed value of the first (as if the disk had changed it), and
/// checks that the damage is found by a read or by a scan after a restart,
/// copied into quarantine as `packed-<key>.0`, deleted, never returned,
/// and leaves the others alone; the key can be written again.
fn assert_packed_detected(what: &str, bad: impl Fn(&[u8]) -> Vec<u8>) {
    for via in [Via::Read, Via::Scan] {
        let tmp = TempDir::new().unwrap();
        let items = [tombstone(50), block(51, 2000), block(52, LARGE)];
        let victim = &items[0];
        let mut s = open(tmp.path());
        for it in &items {
            put(&mut s, it);
        }
        assert_eq!(place(&s, &victim.0), Some(true), "the victim is packed");
        assert_eq!(place(&s, &items[1].0), Some(true));
        assert_eq!(place(&s, &items[2].0), Some(false));
        let bad = bad(&encode(&victim.1));
        s.damage_packed(&victim.0, &bad).unwrap();
        let s = match via {
            Via::Read => {
                assert_eq!(get(&s, &victim.0), StorageResult::Read(None), "{what}");
                // (The bytes are off by what the damage changed, as for a
                // file changed behind the store's back, until it reopens.)
                assert_eq!(s.stats().items, 2, "{what}");
                s
            }
            Via::Scan => {
                drop(s);
                let s = open(tmp.path());
                let want: BTreeMap<_, _> = items[1..].iter().cloned().collect();
                assert_eq!(scan_all(&s), want, "{what}");
                assert_eq!(s.stats().items, 2, "{what}");
                assert_counts(&s);
                s
            }
        };
        let st = s.stats();
        assert_eq!(st.corrupt_found, 1, "{what} {via:?}");
        assert_eq!(st.io_errors, 0, "{what} {via:?}: {:?}", st.last_error);
        let why = st.last_corrupt.expect("the corruption is reported");
        assert!(why.contains(&victim.0.to_string()), "{why}");
        let kept = format!("packed-{}.0", victim.0);
        assert_eq!(quarantine_names(tmp.path()), vec![kept.clone()], "{what}");
        assert_eq!(
            fs::read(tmp.path().join("quarantine").join(&kept)).unwrap(),
            bad,
            "{what}: the bad value is kept as it was"
        );
        // Gone for good; the others untouched.
        assert_eq!(place(&s, &victim.0), None, "{what}");
        assert_eq!(get(&s, &victim.0), StorageResult::Read(None));
        for it in &items[1..] {
            assert_eq!(get(&s, &it.0), StorageResult::Read(Some(it.1.clone())));
        }
        assert_eq!(scan_all(&s).len(), 2);
        assert_eq!(s.stats().corrupt_found, 1);
        assert!(files(&tmp.path().join("items")) == vec![s.item_path(&items[2].0)]);
        // The key can be written again.
        let mut s = s;
        put(&mut s, victim);
        assert_eq!(
            get(&s, &victim.0),
            StorageResult::Read(Some(victim.1.clone()))
        );
        assert_eq!(place(&s, &victim.0), Some(true));
        if let Via::Scan = via {
            assert_counts(&s);
        }
    }
}

/// The test's encoding is the store's: a value put into the database in the
/// documented format (format 2, or format 1 which is still read) reads
/// back as the item, and nothing is counted as corrupt.
#[test]
fn a_packed_value_in_the_documented_format_reads_back() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    for it in [tombstone(53), block(54, 3000)] {
        put(&mut s, &it);
        s.damage_packed(&it.0, &encode(&it.1)).unwrap();
        assert_eq!(get(&s, &it.0), StorageResult::Read(Some(it.1.clone())));
        // Format 1: the payload's digest for every item.
        let payload = postcard::to_allocvec(&it.1).unwrap();
        let mut v1 = b"PSI1".to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        v1.extend_from_slice(&sha256(&payload));
        v1.extend_from_slice(&payload);
        s.damage_packed(&it.0, &v1).unwrap();
        assert_eq!(get(&s, &it.0), StorageResult::Read(Some(it.1.clone())));
    }
    assert_eq!(s.stats().corrupt_found, 0);
    assert_eq!(quarantined(tmp.path()), 0);
    assert_eq!(scan_all(&s).len(), 2);
}

/// A packed value with a byte flipped (in the magic, version, length,
/// digest or payload) is found and quarantined.
#[test]
fn a_packed_value_with_a_flipped_byte_is_detected() {
    for at in [0, 5, 9, 20, 47, 48, 60] {
        assert_packed_detected(&format!("flip at {at}"), |b| {
            let mut b = b.to_vec();
            b[at] ^= 0x10;
            b
        });
    }
    assert_packed_detected("flip of the last byte", |b| {
        let mut b = b.to_vec();
        *b.last_mut().unwrap() ^= 1;
        b
    });
}

/// A packed value cut short, empty, extended, overwritten with garbage, a
/// well-formed header over something that is not an item, or another
/// key's valid item is found and quarantined.
#[test]
fn a_packed_value_cut_empty_garbage_or_misplaced_is_detected() {
    assert_packed_detected("cut by one", |b| b[..b.len() - 1].to_vec());
    assert_packed_detected("cut to the header", |b| b[..HEADER_LEN as usize].to_vec());
    assert_packed_detected("cut in the header", |b| b[..10].to_vec());
    assert_packed_detected("empty", |_| Vec::new());
    assert_packed_detected("trailing bytes", |b| [b, &b"trailing"[..]].concat());
    assert_packed_detected("garbage", |b| {
        (0..b.len()).map(|i| (i as u8).wrapping_mul(31)).collect()
    });
    assert_packed_detected("not an item", |b| {
        let payload = b"\xff\xff\xff\xff\xff\xff not an item".to_vec();
        let mut out = b[..8].to_vec();
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&sha256(&payload));
        out.extend_from_slice(&payload);
        out
    });
    assert_packed_detected("another key's item", |_| encode(&tombstone(55).1));
}

/// The same key's packed value found bad twice leaves two copies in
/// quarantine.
#[test]
fn the_same_bad_packed_value_twice_keeps_both_copies_in_quarantine() {
    let tmp = TempDir::new().unwrap();
    let it = tombstone(56);
    let mut s = open(tmp.path());
    for n in 0..2u8 {
        put(&mut s, &it);
        let mut bad = encode(&it.1);
        bad[50] ^= 1 + n;
        s.damage_packed(&it.0, &bad).unwrap();
        assert_eq!(get(&s, &it.0), StorageResult::Read(None));
        assert_eq!(place(&s, &it.0), None);
    }
    assert_eq!(
        quarantine_names(tmp.path()),
        vec![format!("packed-{}.0", it.0), format!("packed-{}.1", it.0)]
    );
    assert_eq!(s.stats().corrupt_found, 2);
}

/// A database file damaged while the store was closed (cut short at
/// several points, overwritten with zeros or garbage, thirty damages in
/// all, byte flips at places of a fixed seed among them) never makes the
/// store panic or fail to open, and never makes it serve anything that was
/// not written: every item it yields, by scan or read, is byte for byte
/// what was written at its key. The items in files are all still there.
/// A database it set aside is in `quarantine/packed.redb.0` as it was
/// found (but for redb's recovery flags) and counted as corrupt; one that
/// is not a database at all is always set aside. Afterwards the store
/// works and keeps what it is given across a restart.
#[test]
fn a_damaged_database_file_never_serves_anything_wrong() {
    let root = TempDir::new().unwrap();
    let template = root.path().join("template");
    let mut want: BTreeMap<Id, Item> = BTreeMap::new();
    let large: Vec<(Id, Item)> = (0..4)
        .map(|i| block(300 + i, LARGE + 100 * i as usize))
        .collect();
    {
        let mut s = open(&template);
        // Several transactions, each key written once.
        let small: Vec<(Id, Item)> = (0..150u64)
            .map(|seed| {
                if seed % 3 == 0 {
                    block(seed + 400, 100 + (seed as usize * 211) % 5000)
                } else {
                    tombstone(seed + 400)
                }
            })
            .collect();
        for chunk in small.chunks(40) {
            let ops = chunk.iter().map(write_op).collect();
            assert!(s.apply_batch(ops).iter().all(|r| *r == StorageResult::Done));
        }
        for it in small.iter().take(10) {
            put(&mut s, it);
        }
        // The last transaction adds keys: a damage that rolls it back
        // shows as items missing.
        let last: Vec<(Id, Item)> = (0..10).map(|seed| tombstone(seed + 600)).collect();
        let ops = last.iter().map(write_op).collect();
        assert!(s.apply_batch(ops).iter().all(|r| *r == StorageResult::Done));
        want.extend(last);
        for it in &large {
            put(&mut s, it);
            assert_eq!(place(&s, &it.0), Some(false));
        }
        want.extend(small);
        want.extend(large.iter().cloned());
        assert_eq!(scan_all(&s), want);
    }
    let good = fs::read(template.join("packed.redb")).unwrap();
    let len = good.len();

    let mut x = 0xDA7A_BA5E_u64;
    let mut damages: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [0, 1, 100, 511, 4096, len / 3, len / 2, len - 1] {
        damages.push((format!("cut to {cut} of {len} bytes"), good[..cut].to_vec()));
    }
    damages.push(("zeros".into(), vec![0; len]));
    let garbage: Vec<u8> = (0..len).map(|_| xorshift(&mut x) as u8).collect();
    damages.push(("garbage".into(), garbage));
    damages.push((
        "garbage header".into(),
        [
            &(0..512)
                .map(|_| xorshift(&mut x) as u8)
                .collect::<Vec<u8>>()[..],
            &good[512..],
        ]
        .concat(),
    ));
    damages.push(("not a database".into(), b"not a database\n".to_vec()));
    // redb's god byte (at 9): which commit slot is the primary, and
    // whether the file needs recovery.
    for mask in [1u8, 2] {
        let mut bad = good.clone();
        bad[9] ^= mask;
        damages.push((format!("god byte ^ {mask}"), bad));
    }
    // Bytes flipped in the super-header (its first 512 bytes) and in pages
    // in use (where the bytes are not zero).
    let used: Vec<usize> = (512..len).filter(|&i| good[i] != 0).collect();
    for i in 0..16 {
        let at = if i < 5 {
            (xorshift(&mut x) % 512) as usize
        } else {
            used[(xorshift(&mut x) % used.len() as u64) as usize]
        };
        let mask = (xorshift(&mut x) % 255 + 1) as u8;
        let mut bad = good.clone();
        bad[at] ^= mask;
        damages.push((format!("byte {at} ^ {mask:#04x}"), bad));
    }
    assert_eq!(damages.len(), 30);

    let mut outcomes = Vec::new();
    for (n, (what, bad)) in damages.iter().enumerate() {
        let dir = root.path().join(format!("case-{n}"));
        copy_tree(&template, &dir);
        fs::write(dir.join("packed.redb"), bad).unwrap();
        let opened = std::panic::catch_unwind(|| DiskStore::open(&dir, DiskConfig::default()));
        let mut s = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("{what}: the store does not open: {e}"),
            Err(_) => panic!("{what}: opening the store panicked"),
        };
        let st = s.stats();
        let names = quarantine_names(&dir);
        let replaced = names.iter().any(|n| n == "packed.redb.0");
        if ["zeros", "garbage", "garbage header", "not a database"].contains(&what.as_str()) {
            assert!(replaced, "{what}: not set aside");
        }
        if replaced {
            assert!(st.corrupt_found >= 1, "{what}");
            // As it was found, but for the flags in redb's god byte (at 9),
            // which redb sets when it opens a file to recover it.
            let kept = fs::read(dir.join("quarantine/packed.redb.0")).unwrap();
            let differ: Vec<usize> = (0..kept.len().max(bad.len()))
                .filter(|&i| kept.get(i) != bad.get(i))
                .collect();
            assert!(
                differ.is_empty() || differ == [9],
                "{what}: the database set aside is not the damaged file: {differ:?}"
            );
        }
        let found = scan_all(&s);
        for (key, item) in &found {
            assert_eq!(
                want.get(key),
                Some(item),
                "{what}: served what was not written"
            );
        }
        for (key, item) in &want {
            match get(&s, key) {
                StorageResult::Read(None) => assert!(!found.contains_key(key), "{what}"),
                StorageResult::Read(Some(got)) => assert_eq!(&got, item, "{what}"),
                r => panic!("{what}: reading {key}: {r:?}"),
            }
        }
        for (key, item) in &large {
            assert_eq!(found.get(key), Some(item), "{what}: a file item lost");
        }
        // Anything else set aside is a packed value found bad, counted.
        let others = names
            .iter()
            .filter(|n| !n.starts_with("packed.redb."))
            .count();
        assert!(
            names.iter().all(|n| n.starts_with("packed")),
            "{what}: {names:?}"
        );
        assert!(
            s.stats().corrupt_found >= u64::from(replaced) + others as u64,
            "{what}"
        );
        assert_counts(&s);
        let missing = want.len() - found.len();
        outcomes.push(format!(
            "{what}: replaced {replaced}, missing {missing}, corrupt_found {}",
            s.stats().corrupt_found
        ));

        // It works, and keeps what it is given.
        let (new_small, new_large) = (tombstone(999), block(998, LARGE));
        put(&mut s, &new_small);
        put(&mut s, &new_large);
        assert_eq!(place(&s, &new_small.0), Some(true));
        drop(s);
        let s = open(&dir);
        assert_eq!(
            get(&s, &new_small.0),
            StorageResult::Read(Some(new_small.1.clone()))
        );
        assert_eq!(
            get(&s, &new_large.0),
            StorageResult::Read(Some(new_large.1.clone()))
        );
        assert_eq!(scan_all(&s).len(), found.len() + 2, "{what}");
        drop(s);
        fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{}", outcomes.join("\n"));
}

// ----- capacity and failures -------------------------------------------------

/// Writes that would take the store past its capacity fail `Full`, leave
/// nothing behind, and the store goes on working; room freed lets them
/// through, and the limit holds across a restart. Packed items and files
/// count alike, alone and together.
#[test]
fn past_the_capacity_writes_fail_full_and_the_store_stays_usable() {
    for len in [1000, LARGE] {
        let tmp = TempDir::new().unwrap();
        let size = stored_size(&block(20, len));
        let cap = 2 * size + size / 2;
        let mut s = open_with_capacity(tmp.path(), cap);
        let (a, b, c) = (block(20, len), block(21, len), block(22, len));
        put(&mut s, &a);
        put(&mut s, &b);
        assert_eq!(place(&s, &a.0), Some(len < LARGE));
        let full = s.apply(write_op(&c));
        assert_eq!(full, StorageResult::Failed(StoreError::Full));
        assert_eq!(get(&s, &c.0), StorageResult::Read(None));
        assert_eq!(place(&s, &c.0), None);
        assert!(temps(tmp.path()).is_empty(), "no temporary file left");
        let st = s.stats();
        assert_eq!((st.items, st.bytes, st.full_refused), (2, 2 * size, 1));
        assert_eq!(st.io_errors, 0);
        assert_counts(&s);

        // Replacing an item with one of the same size fits at the limit.
        put(&mut s, &a);
        // One item bigger than the whole capacity never fits.
        let huge = block(23, cap as usize);
        assert_eq!(
            s.apply(StorageOp::Write {
                key: huge.0,
                item: huge.1
            }),
            StorageResult::Failed(StoreError::Full)
        );
        // Freeing room lets the refused write through.
        assert_eq!(s.apply(StorageOp::Remove { key: a.0 }), StorageResult::Done);
        put(&mut s, &c);
        assert_eq!(get(&s, &c.0), StorageResult::Read(Some(c.1.clone())));
        assert_eq!(get(&s, &b.0), StorageResult::Read(Some(b.1.clone())));
        assert_counts(&s);
        assert!(temps(tmp.path()).is_empty());

        // The limit holds across a restart.
        drop(s);
        let mut s = open_with_capacity(tmp.path(), cap);
        assert_eq!(s.stats().bytes, 2 * size);
        assert_eq!(
            s.apply(StorageOp::Write {
                key: a.0,
                item: a.1
            }),
            StorageResult::Failed(StoreError::Full)
        );
    }

    // Packed items and files share one budget.
    let tmp = TempDir::new().unwrap();
    let (small, large, small2) = (block(24, 1000), block(25, LARGE), block(26, 1000));
    let (ss, sl) = (stored_size(&small), stored_size(&large));
    let mut s = open_with_capacity(tmp.path(), ss + sl + ss / 2);
    put(&mut s, &small);
    put(&mut s, &large);
    assert_eq!(
        (place(&s, &small.0), place(&s, &large.0)),
        (Some(true), Some(false))
    );
    let w = write_op;
    assert_eq!(s.apply(w(&small2)), StorageResult::Failed(StoreError::Full));
    // Removing the file makes room for a packed item, and the other way.
    assert_eq!(
        s.apply(StorageOp::Remove { key: large.0 }),
        StorageResult::Done
    );
    put(&mut s, &small2);
    assert_eq!(s.apply(w(&large)), StorageResult::Failed(StoreError::Full));
    assert_eq!(
        s.apply(StorageOp::Remove { key: small.0 }),
        StorageResult::Done
    );
    assert_eq!(
        s.apply(StorageOp::Remove { key: small2.0 }),
        StorageResult::Done
    );
    put(&mut s, &large);
    let st = s.stats();
    assert_eq!((st.items, st.bytes, st.full_refused), (1, sl, 2));
    assert_counts(&s);
}

/// An I/O failure answers `Io`, is counted and kept for the logs, and does
/// not stop the store: items elsewhere (and packed ones, whatever their
/// shard) are still served, and a restart repairs the broken shard.
#[test]
fn io_failures_answer_io_are_counted_and_do_not_stop_the_store() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let victim = block(30, LARGE);
    let other = (31..)
        .map(|seed| block(seed, LARGE))
        .find(|(k, _)| k.0[0] != victim.0 .0[0])
        .unwrap();
    // A packed item in the victim's shard.
    let neighbour = (1000..)
        .map(tombstone)
        .find(|(k, _)| k.0[0] == victim.0 .0[0])
        .unwrap();
    put(&mut s, &neighbour);
    // The victim's shard directory is replaced by a file under the running
    // store: every operation on its files there fails.
    let shard = s.item_path(&victim.0).parent().unwrap().to_path_buf();
    fs::remove_dir(&shard).unwrap();
    fs::write(&shard, b"not a directory").unwrap();

    let r = s.apply(write_op(&victim));
    assert_eq!(r, StorageResult::Failed(StoreError::Io));
    assert_eq!(
        s.apply(StorageOp::Read { key: victim.0 }),
        StorageResult::Failed(StoreError::Io)
    );
    assert_eq!(
        s.apply(StorageOp::Remove { key: victim.0 }),
        StorageResult::Failed(StoreError::Io)
    );
    let st = s.stats();
    assert_eq!(st.io_errors, 3);
    let msg = st.last_error.expect("the failure is kept for the logs");
    assert!(msg.contains(&victim.0.to_string()), "{msg}");
    assert_eq!(st.items, 1);
    // The packed neighbour does not need the directory.
    assert_eq!(
        get(&s, &neighbour.0),
        StorageResult::Read(Some(neighbour.1.clone()))
    );
    // The rest of the store works, and a scan just skips the broken shard's
    // files.
    put(&mut s, &other);
    assert_eq!(place(&s, &other.0), Some(false));
    assert_eq!(
        scan_all(&s),
        BTreeMap::from([other.clone(), neighbour.clone()])
    );
    assert!(s.stats().io_errors > 3);

    // A restart moves the stray file aside and makes the shard again.
    drop(s);
    let mut s = open(tmp.path());
    assert_eq!(s.stats().corrupt_found, 1);
    assert_eq!(quarantined(tmp.path()), 1);
    put(&mut s, &victim);
    assert_eq!(place(&s, &victim.0), Some(false));
    assert_eq!(
        scan_all(&s),
        BTreeMap::from([other.clone(), victim.clone(), neighbour.clone()])
    );
    assert_eq!(s.stats().io_errors, 0);
    assert_counts(&s);
}

// ----- any damage -------------------------------------------------------------

#[derive(Clone, Debug)]
enum Damage {
    /// XOR masks (never zero) at distinct positions.
    Flips(Vec<(prop::sample::Index, u8)>),
    Truncate(prop::sample::Index),
    Append(Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
            .prop_map(Damage::Flips),
        2 => any::<prop::sample::Index>().prop_map(Damage::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Append),
    ]
}

fn apply_damage(bytes: &mut Vec<u8>, d: &Damage) {
    match d {
        Damage::Flips(flips) => {
            let mut seen = std::collections::BTreeSet::new();
            for (at, mask) in flips {
                let at = at.index(bytes.len());
                if seen.insert(at) {
                    bytes[at] ^= mask;
                }
            }
        }
        // Any shorter length, down to empty.
        Damage::Truncate(to) => bytes.truncate(to.index(bytes.len())),
        Damage::Append(more) => bytes.extend_from_slice(more),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        rng_seed: RngSeed::Fixed(0x5EED_D15C),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Whatever bytes change anywhere in a stored file (of a large block or
    /// of a tombstone large enough for a file), and however it is cut or
    /// extended, the damage is found and the item never returned; the
    /// bystanders, one packed and one in a file, are untouched.
    #[test]
    fn any_damage_anywhere_is_detected(
        seed in 100u64..10_000,
        len in 0usize..3000,
        is_block in any::<bool>(),
        d in damage(),
    ) {
        let tmp = TempDir::new().unwrap();
        let mut s = open(tmp.path());
        let victim = if is_block {
            block(seed, LARGE + len)
        } else {
            tombstone_of(&block(seed, 10).1, LARGE + len)
        };
        let bystanders = [block(seed + 1, 50), block(seed + 2, LARGE)];
        put(&mut s, &victim);
        for b in &bystanders {
            put(&mut s, b);
        }
        prop_assert_eq!(place(&s, &victim.0), Some(false));
        prop_assert_eq!(place(&s, &bystanders[0].0), Some(true));
        mangle(&s, &victim.0, |b| apply_damage(b, &d));

        prop_assert_eq!(get(&s, &victim.0), StorageResult::Read(None));
        prop_assert_eq!(s.stats().corrupt_found, 1);
        prop_assert_eq!(quarantined(tmp.path()), 1);
        for b in &bystanders {
            prop_assert_eq!(get(&s, &b.0), StorageResult::Read(Some(b.1.clone())));
        }

        // Found by the scan after a restart as well.
        put(&mut s, &victim);
        mangle(&s, &victim.0, |b| apply_damage(b, &d));
        drop(s);
        let s = open(tmp.path());
        prop_assert_eq!(scan_all(&s), bystanders.iter().cloned().collect::<BTreeMap<_, _>>());
        prop_assert_eq!(s.stats().corrupt_found, 1);
        prop_assert_eq!(quarantined(tmp.path()), 2);
        let st = s.stats();
        prop_assert_eq!(s.recount().unwrap(), (st.items, st.bytes));
    }
}

// ----- group commit -------------------------------------------------------------

/// A tombstone at `seed`'s key whose bytes (and size) depend on `version`:
/// the same key written with different contents. Version 3 is large enough
/// for a file.
fn tombstone_v(seed: u64, version: u8) -> (Id, Item) {
    let sig_len = if version == 3 {
        LARGE
    } else {
        16 + usize::from(version) * 7
    };
    let item = Item::Tombstone(Tombstone {
        block: sha256(&seed.to_le_bytes()),
        owner_key: vec![seed as u8; 40],
        sig: vec![version; sig_len],
    });
    (item.position(), item)
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, u8),
    Remove(u64),
    Read(u64),
}

/// The item at key `k` in version `v`. Key 0 holds a large block (versions
/// 0 and 1: two owners) in a file or its small tombstone (versions 2 and 3)
/// in the database, so it moves between the two; keys 1 and 2 small blocks;
/// keys 3..6 tombstones in versions, one of them in a file.
fn group_item(k: u64, v: u8) -> (Id, Item) {
    match k {
        0 => {
            let (key, b) = block(1000, LARGE);
            match v {
                0 => (key, b),
                1 => (key, other_owner(&b, 77)),
                _ => tombstone_of(&b, 16 + usize::from(v)),
            }
        }
        1 | 2 => block(1000 + k, 100 + 37 * k as usize),
        _ => tombstone_v(k, v),
    }
}

fn storage_op(op: &Op) -> StorageOp {
    match *op {
        Op::Write(k, v) => {
            let (key, item) = group_item(k, v);
            StorageOp::Write { key, item }
        }
        Op::Remove(k) => StorageOp::Remove {
            key: group_item(k, 0).0,
        },
        Op::Read(k) => StorageOp::Read {
            key: group_item(k, 0).0,
        },
    }
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0u64..6, 0u8..4).prop_map(|(k, v)| Op::Write(k, v)),
        2 => (0u64..6).prop_map(Op::Remove),
        2 => (0u64..6).prop_map(Op::Read),
    ];
    prop::collection::vec(op, 1..40)
}

/// Operations applied in groups give exactly the answers, contents and
/// counters of the same operations applied one at a time, with items packed,
/// in files, and keys moving between the two. (Two stores serve every case,
/// emptied first: making a store's 256 shard directories is the slow part
/// of a case.)
#[test]
fn a_group_commit_is_the_same_as_one_at_a_time() {
    use proptest::test_runner::{Config, TestRunner};
    for (k, v, packed) in [
        (0, 0, false),
        (0, 2, true),
        (1, 0, true),
        (3, 3, false),
        (3, 2, true),
    ] {
        let probe = TempDir::new().unwrap();
        let mut s = open(probe.path());
        let it = group_item(k, v);
        put(&mut s, &it);
        assert_eq!(place(&s, &it.0), Some(packed), "key {k} version {v}");
    }
    let (one_dir, group_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    // The group's store is reopened in every case; the old one is closed
    // first (the database takes a lock).
    let stores = std::cell::RefCell::new((open(one_dir.path()), Some(open(group_dir.path()))));
    let mut runner = TestRunner::new(Config {
        cases: 64,
        rng_seed: RngSeed::Fixed(0x6A0C_0441),
        failure_persistence: None,
        ..Config::default()
    });
    let cuts = prop::collection::vec(1usize..12, 1..8);
    let result = runner.run(&(ops(), cuts), |(ops, cuts)| {
        let (one, slot) = &mut *stores.borrow_mut();
        let group = slot.as_mut().expect("the group's store is open");
        for k in 0..6 {
            let clear = storage_op(&Op::Remove(k));
            prop_assert_eq!(one.apply(clear.clone()), StorageResult::Done);
            prop_assert_eq!(group.apply(clear), StorageResult::Done);
        }
        let want: Vec<StorageResult> = ops.iter().map(|op| one.apply(storage_op(op))).collect();
        let mut got = Vec::new();
        let mut rest: &[Op] = &ops;
        for c in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at((*c).min(rest.len()));
            got.extend(group.apply_batch(now.iter().map(storage_op).collect()));
            rest = later;
        }
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(scan_all(group), scan_all(one));
        for k in 0..6 {
            let key = group_item(k, 0).0;
            prop_assert_eq!(place(group, &key), place(one, &key));
        }
        let (g, o) = (group.stats(), one.stats());
        prop_assert_eq!((g.items, g.bytes), (o.items, o.bytes));
        prop_assert_eq!(group.recount().unwrap(), (g.items, g.bytes));
        prop_assert_eq!(one.recount().unwrap(), (o.items, o.bytes));
        prop_assert!(temps(group_dir.path()).is_empty());
        prop_assert_eq!(g.io_errors + g.corrupt_found, 0);
        // And it all survives a restart.
        *slot = None;
        let group = slot.insert(open(group_dir.path()));
        prop_assert_eq!(scan_all(group), scan_all(one));
        let g = group.stats();
        prop_assert_eq!((g.items, g.bytes), (o.items, o.bytes));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A group keeps to the capacity: of three new items where two fit, the
/// third is refused alone; a remove earlier in a group makes room for a
/// write after it; an item for another key fails alone. For packed items,
/// files, and the two mixed.
#[test]
fn a_group_keeps_to_the_capacity_and_counts_what_it_frees() {
    for (la, lb) in [(1000, 1000), (LARGE, LARGE), (1000, LARGE), (LARGE, 1000)] {
        let tmp = TempDir::new().unwrap();
        // a and c are alike, and so are b and d.
        let (a, b, c, d) = (block(30, la), block(31, lb), block(32, la), block(33, lb));
        let (sa, sb) = (stored_size(&a), stored_size(&b));
        let mut s = open_with_capacity(tmp.path(), sa + sb + sa.min(sb) / 2);
        let w = write_op;
        // Three new items where two fit: the third is refused, alone.
        let r = s.apply_batch(vec![w(&a), w(&b), w(&c), StorageOp::Read { key: b.0 }]);
        assert_eq!(
            r,
            vec![
                StorageResult::Done,
                StorageResult::Done,
                StorageResult::Failed(StoreError::Full),
                StorageResult::Read(Some(b.1.clone())),
            ],
            "{la} {lb}"
        );
        assert_eq!(place(&s, &a.0), Some(la < LARGE));
        assert_eq!(place(&s, &b.0), Some(lb < LARGE));
        // A remove earlier in the group makes room for a write after it; an
        // item bound for another key fails alone.
        let wrong = StorageOp::Write {
            key: a.0,
            item: d.1.clone(),
        };
        let r = s.apply_batch(vec![StorageOp::Remove { key: a.0 }, wrong, w(&c)]);
        assert_eq!(r[0], StorageResult::Done);
        assert!(matches!(
            r[1],
            StorageResult::Failed(StoreError::Invalid(_))
        ));
        assert_eq!(r[2], StorageResult::Done);
        assert_eq!(scan_all(&s), BTreeMap::from([b.clone(), c.clone()]));
        let st = s.stats();
        assert_eq!((st.items, st.bytes, st.full_refused), (2, sa + sb, 1));
        assert_counts(&s);
        assert!(temps(tmp.path()).is_empty());
    }
}

/// A batch's reads of keys nothing before them in the batch touches are
/// answered first, before any write's result (so a node can send them on
/// while the writes are synced); a read after a write or remove of its key
/// still sees that write or remove; every result matches its operation.
/// Files and packed items alike.
#[test]
fn untouched_reads_are_answered_first_and_the_rest_in_issue_order() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let (a, b, c, d, e) = (
        block(40, 100_000),
        block(41, LARGE),
        block(42, LARGE),
        block(43, 1000),
        tombstone(44),
    );
    put(&mut s, &a);
    put(&mut s, &b);
    put(&mut s, &e);
    assert_eq!(place(&s, &a.0), Some(false));
    assert_eq!(place(&s, &b.0), Some(false));
    assert_eq!(place(&s, &e.0), Some(true));
    let w = write_op;
    let ops = vec![
        w(&c),
        StorageOp::Read { key: a.0 },
        StorageOp::Remove { key: b.0 },
        StorageOp::Read { key: b.0 },
        StorageOp::Read { key: c.0 },
        StorageOp::Read { key: d.0 },
        w(&d),
        StorageOp::Read { key: e.0 },
    ];
    let mut order = Vec::new();
    let mut results = vec![None; ops.len()];
    s.apply_batch_each(ops, |i, r| {
        order.push(i);
        results[i] = Some(r);
    });
    // Reads 1 (a), 5 (d, not yet written) and 7 (e) touch nothing earlier
    // in the batch: first. Then everything else in issue order.
    assert_eq!(order, vec![1, 5, 7, 0, 2, 3, 4, 6]);
    let results: Vec<StorageResult> = results.into_iter().map(Option::unwrap).collect();
    assert_eq!(
        results,
        vec![
            StorageResult::Done,
            StorageResult::Read(Some(a.1.clone())),
            StorageResult::Done,
            StorageResult::Read(None),
            StorageResult::Read(Some(c.1.clone())),
            StorageResult::Read(None),
            StorageResult::Done,
            StorageResult::Read(Some(e.1.clone())),
        ]
    );
    assert_eq!(
        scan_all(&s),
        BTreeMap::from([a.clone(), c.clone(), d.clone(), e.clone()])
    );
    assert_eq!(place(&s, &c.0), Some(false));
    assert_eq!(place(&s, &d.0), Some(true));
    // apply_batch gives the same results, in the operations' order.
    let again = s.apply_batch(vec![
        StorageOp::Read { key: d.0 },
        StorageOp::Remove { key: d.0 },
        StorageOp::Read { key: e.0 },
    ]);
    assert_eq!(
        again,
        vec![
            StorageResult::Read(Some(d.1.clone())),
            StorageResult::Done,
            StorageResult::Read(Some(e.1.clone()))
        ]
    );
    assert_counts(&s);
}

/// A database in a redb file format this build does not read (here: both
/// commit slots claiming format 4, as a newer redb might write) is not
/// damage: the store refuses to open, says why, and leaves the file where
/// and as it was, with nothing quarantined. Throwing it away would lose
/// every small item of every node that was upgraded or rolled back
/// together.
#[test]
fn a_database_of_another_file_format_is_refused_not_thrown_away() {
    let tmp = TempDir::new().unwrap();
    {
        let mut s = open(tmp.path());
        put(&mut s, &tombstone(7));
    }
    let path = tmp.path().join("packed.redb");
    let mut bytes = fs::read(&path).unwrap();
    // redb 4's two commit slots start at 64 and 192, each with its format
    // version first.
    assert_eq!((bytes[64], bytes[192]), (3, 3), "redb's header layout");
    bytes[64] = 4;
    bytes[192] = 4;
    fs::write(&path, &bytes).unwrap();
    let err = DiskStore::open(tmp.path(), DiskConfig::default()).expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("file format"), "{msg}");
    assert!(msg.contains("packed.redb"), "{msg}");
    assert_eq!(fs::read(&path).unwrap(), bytes, "left as it was");
    assert_eq!(quarantined(tmp.path()), 0);
}
