//! The disk store: round trips, restarts, every kind of damage, capacity and
//! I/O failures. Everything is deterministic: fixed data, fixed seeds.

use peerstore_core::store::sha256;
use peerstore_core::{Block, Id, Item, StorageOp, StorageResult, StoreError, Tombstone};
use peerstore_node::disk::{DiskConfig, DiskStore, HEADER_LEN};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

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

/// A tombstone (the disk does not check signatures; the core does).
fn tombstone(seed: u64) -> (Id, Item) {
    let item = Item::Tombstone(Tombstone {
        block: sha256(&seed.to_le_bytes()),
        owner_key: vec![seed as u8; 40],
        sig: vec![7; 64],
    });
    (item.position(), item)
}

fn open(dir: &Path) -> DiskStore {
    DiskStore::open(dir, DiskConfig::default()).expect("open the store")
}

fn put(s: &mut DiskStore, (key, item): &(Id, Item)) {
    let r = s.apply(StorageOp::Write {
        key: *key,
        item: item.clone(),
    });
    assert_eq!(r, StorageResult::Done);
}

fn get(s: &DiskStore, key: &Id) -> StorageResult {
    // `apply` needs `&mut`; reads are the same through `read`.
    match s.read(key) {
        Ok(found) => StorageResult::Read(found),
        Err(e) => StorageResult::Failed(e),
    }
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

fn quarantined(dir: &Path) -> usize {
    fs::read_dir(dir.join("quarantine")).unwrap().count()
}

/// What the item files really take, to check the store's accounting.
fn bytes_on_disk(dir: &Path) -> u64 {
    files(&dir.join("items"))
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

fn temps(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join("items"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

#[test]
fn write_read_remove_round_trip() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let b = block(1, 5000);
    let t = tombstone(2);
    let empty = block(3, 0);
    for it in [&b, &t, &empty] {
        assert_eq!(get(&s, &it.0), StorageResult::Read(None));
        put(&mut s, it);
        assert_eq!(get(&s, &it.0), StorageResult::Read(Some(it.1.clone())));
        assert!(s.item_path(&it.0).is_file());
    }
    let st = s.stats();
    assert_eq!(st.items, 3);
    assert_eq!(st.bytes, bytes_on_disk(tmp.path()));
    assert!(st.bytes > 5000 + 3 * HEADER_LEN);

    assert_eq!(s.apply(StorageOp::Remove { key: b.0 }), StorageResult::Done);
    assert_eq!(
        s.apply(StorageOp::Read { key: b.0 }),
        StorageResult::Read(None)
    );
    assert!(!s.item_path(&b.0).exists());
    // Removing what is not there is done too.
    assert_eq!(s.apply(StorageOp::Remove { key: b.0 }), StorageResult::Done);
    let st = s.stats();
    assert_eq!(st.items, 2);
    assert_eq!(st.bytes, bytes_on_disk(tmp.path()));
    assert_eq!((st.corrupt_found, st.io_errors), (0, 0));
    assert!(temps(tmp.path()).is_empty());
}

#[test]
fn overwrite_replaces_and_keeps_the_count() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let (key, item) = block(4, 3000);
    put(&mut s, &(key, item.clone()));
    // Same bytes, another owner: the same key.
    let Item::Block(mut other) = item.clone() else {
        unreachable!()
    };
    other.owner = Id::from_u128(99);
    let other = Item::Block(other);
    assert_eq!(other.position(), key);
    put(&mut s, &(key, other.clone()));
    assert_eq!(get(&s, &key), StorageResult::Read(Some(other)));
    // A delete replaces the block with its (much smaller) tombstone.
    let Item::Block(b) = &item else {
        unreachable!()
    };
    let tomb = Item::Tombstone(Tombstone {
        block: b.id(),
        owner_key: vec![1; 40],
        sig: vec![2; 64],
    });
    assert_eq!(tomb.position(), key);
    put(&mut s, &(key, tomb.clone()));
    assert_eq!(get(&s, &key), StorageResult::Read(Some(tomb)));
    let st = s.stats();
    assert_eq!(st.items, 1);
    assert_eq!(st.bytes, bytes_on_disk(tmp.path()));
    assert!(st.bytes < 1000);
}

#[test]
fn operations_on_one_key_take_effect_in_issue_order() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let (key, item) = block(5, 100);
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
    assert_eq!(s.apply(StorageOp::Remove { key }), StorageResult::Done);
    assert_eq!(get(&s, &key), StorageResult::Read(None));
}

#[test]
fn an_item_under_another_key_is_refused() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let (_, item) = block(6, 100);
    let (wrong, _) = block(7, 100);
    let r = s.apply(StorageOp::Write {
        key: wrong,
        item: item.clone(),
    });
    assert!(matches!(r, StorageResult::Failed(StoreError::Invalid(_))));
    assert_eq!(get(&s, &wrong), StorageResult::Read(None));
    assert!(files(&tmp.path().join("items")).is_empty());
    assert_eq!(s.stats().items, 0);
}

#[test]
fn a_reopened_store_finds_everything() {
    let tmp = TempDir::new().unwrap();
    let mut want = BTreeMap::new();
    {
        let mut s = open(tmp.path());
        for seed in 0..60 {
            let it = if seed % 3 == 0 {
                tombstone(seed)
            } else {
                block(seed, (seed as usize * 97) % 4000)
            };
            put(&mut s, &it);
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
    assert_eq!(st.bytes, bytes_on_disk(tmp.path()));
    assert_eq!(scan_all(&s), want);
    for (key, item) in &want {
        assert_eq!(get(&s, key), StorageResult::Read(Some(item.clone())));
    }
    // A scan can stop early, and scanning again gives the same.
    assert_eq!(s.scan().take(3).count(), 3);
    assert_eq!(scan_all(&s), want);
    let st = s.stats();
    assert_eq!(
        (st.corrupt_found, st.io_errors, st.temps_removed),
        (0, 0, 0)
    );
}

#[test]
fn an_empty_or_missing_directory_opens_empty() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("not/yet/there");
    let s = open(&dir);
    assert_eq!(s.scan().count(), 0);
    assert_eq!(s.stats(), Default::default());
    assert!(dir.join("items/00").is_dir() && dir.join("items/ff").is_dir());
    assert!(dir.join("quarantine").is_dir());
}

// ----- damage ---------------------------------------------------------------

/// How the damage is to be found.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// A read by the running store.
    Read,
    /// A scan after a restart.
    Scan,
}

/// Stores three items, lets `damage` harm the middle one's file (returning
/// the key whose file is now bad), and checks that the damage is found,
/// quarantined, never returned, and leaves the other two alone.
fn assert_detected(damage: impl Fn(&DiskStore, &Id) -> Id) {
    for via in [Via::Read, Via::Scan] {
        let tmp = TempDir::new().unwrap();
        let items = [block(10, 2000), tombstone(11), block(12, 700)];
        let mut s = open(tmp.path());
        for it in &items {
            put(&mut s, it);
        }
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
                assert_eq!(s.stats().bytes, bytes_on_disk(tmp.path()), "{via:?}");
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
    }
}

fn mangle(s: &DiskStore, key: &Id, f: impl FnOnce(&mut Vec<u8>)) -> Id {
    let path = s.item_path(key);
    let mut bytes = fs::read(&path).unwrap();
    f(&mut bytes);
    fs::write(&path, bytes).unwrap();
    *key
}

#[test]
fn a_truncated_file_is_detected() {
    assert_detected(|s, k| mangle(s, k, |b| b.truncate(b.len() - 1)));
    assert_detected(|s, k| mangle(s, k, |b| b.truncate(HEADER_LEN as usize)));
    assert_detected(|s, k| mangle(s, k, |b| b.truncate(HEADER_LEN as usize / 2)));
}

#[test]
fn an_empty_file_is_detected() {
    assert_detected(|s, k| mangle(s, k, |b| b.clear()));
}

#[test]
fn a_flipped_byte_is_detected() {
    // In the payload, the hash, the length, the version and the magic.
    for at in [60, 47, 20, 9, 5, 0] {
        assert_detected(|s, k| mangle(s, k, |b| b[at] ^= 0x10));
    }
    assert_detected(|s, k| mangle(s, k, |b| *b.last_mut().unwrap() ^= 1));
}

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

#[test]
fn a_file_renamed_to_another_key_is_detected() {
    assert_detected(|s, k| {
        let (other, _) = block(13, 10);
        fs::rename(s.item_path(k), s.item_path(&other)).unwrap();
        other
    });
}

#[test]
fn a_directory_where_an_item_belongs_is_detected() {
    assert_detected(|s, k| {
        let (other, _) = block(14, 10);
        fs::create_dir_all(s.item_path(&other).join("inside")).unwrap();
        fs::remove_file(s.item_path(k)).unwrap();
        other
    });
}

#[test]
fn stray_names_in_the_items_tree_are_quarantined() {
    let tmp = TempDir::new().unwrap();
    let (key, item) = block(15, 100);
    {
        let mut s = open(tmp.path());
        put(&mut s, &(key, item.clone()));
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
    assert_eq!(s.stats().items, 1);
    assert_eq!(
        scan_all(&s),
        BTreeMap::from([(key, item.clone())]),
        "only the real item"
    );
    let strays = if cfg!(unix) { 4 } else { 3 };
    assert_eq!(s.stats().corrupt_found, strays);
    assert_eq!(quarantined(tmp.path()), strays as usize);
    assert_eq!(files(&tmp.path().join("items")), vec![s.item_path(&key)]);
    assert_eq!(s.stats().bytes, bytes_on_disk(tmp.path()));
    assert_eq!(get(&s, &key), StorageResult::Read(Some(item)));
}

#[test]
fn the_same_bad_name_twice_keeps_both_copies_in_quarantine() {
    let tmp = TempDir::new().unwrap();
    let (key, item) = block(16, 100);
    let mut s = open(tmp.path());
    for _ in 0..2 {
        put(&mut s, &(key, item.clone()));
        mangle(&s, &key, |b| b[50] ^= 1);
        assert_eq!(get(&s, &key), StorageResult::Read(None));
    }
    assert_eq!(quarantined(tmp.path()), 2);
    assert_eq!(s.stats().corrupt_found, 2);
}

#[test]
fn leftover_temp_files_are_deleted_on_open() {
    let tmp = TempDir::new().unwrap();
    let kept = block(17, 500);
    let (lost, _) = block(18, 500);
    {
        let mut s = open(tmp.path());
        put(&mut s, &kept);
        put(&mut s, &block(18, 500));
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
    assert_eq!(scan_all(&s), BTreeMap::from([kept.clone()]));
    assert_eq!(get(&s, &lost), StorageResult::Read(None));
    let st = s.stats();
    assert_eq!((st.items, st.corrupt_found, st.io_errors), (1, 0, 0));
    assert_eq!(st.bytes, bytes_on_disk(tmp.path()));
}

// ----- capacity and failures -------------------------------------------------

#[test]
fn past_the_capacity_writes_fail_full_and_the_store_stays_usable() {
    let tmp = TempDir::new().unwrap();
    let size = {
        let probe = TempDir::new().unwrap();
        let mut s = open(probe.path());
        put(&mut s, &block(20, 1000));
        s.stats().bytes
    };
    let cap = 2 * size + size / 2;
    let mut s = DiskStore::open(
        tmp.path(),
        DiskConfig {
            capacity_bytes: Some(cap),
        },
    )
    .unwrap();
    let (a, b, c) = (block(20, 1000), block(21, 1000), block(22, 1000));
    put(&mut s, &a);
    put(&mut s, &b);
    let full = s.apply(StorageOp::Write {
        key: c.0,
        item: c.1.clone(),
    });
    assert_eq!(full, StorageResult::Failed(StoreError::Full));
    assert_eq!(get(&s, &c.0), StorageResult::Read(None));
    assert!(temps(tmp.path()).is_empty(), "no temporary file left");
    let st = s.stats();
    assert_eq!((st.items, st.bytes, st.full_refused), (2, 2 * size, 1));
    assert_eq!(st.io_errors, 0);

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
    assert_eq!(s.stats().bytes, bytes_on_disk(tmp.path()));

    // The limit holds across a restart.
    drop(s);
    let mut s = DiskStore::open(
        tmp.path(),
        DiskConfig {
            capacity_bytes: Some(cap),
        },
    )
    .unwrap();
    assert_eq!(s.stats().bytes, 2 * size);
    assert_eq!(
        s.apply(StorageOp::Write {
            key: a.0,
            item: a.1
        }),
        StorageResult::Failed(StoreError::Full)
    );
}

#[test]
fn io_failures_answer_io_are_counted_and_do_not_stop_the_store() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let victim = block(30, 100);
    let other = (31..)
        .map(|seed| block(seed, 100))
        .find(|(k, _)| k.0[0] != victim.0 .0[0])
        .unwrap();
    // The victim's shard directory is replaced by a file under the running
    // store: every operation there fails.
    let shard = s.item_path(&victim.0).parent().unwrap().to_path_buf();
    fs::remove_dir(&shard).unwrap();
    fs::write(&shard, b"not a directory").unwrap();

    let r = s.apply(StorageOp::Write {
        key: victim.0,
        item: victim.1.clone(),
    });
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
    assert_eq!(st.items, 0);
    // The rest of the store works, and a scan just skips the broken shard.
    put(&mut s, &other);
    assert_eq!(scan_all(&s), BTreeMap::from([other.clone()]));
    assert!(s.stats().io_errors > 3);

    // A restart moves the stray file aside and makes the shard again.
    drop(s);
    let mut s = open(tmp.path());
    assert_eq!(s.stats().corrupt_found, 1);
    assert_eq!(quarantined(tmp.path()), 1);
    put(&mut s, &victim);
    assert_eq!(
        scan_all(&s),
        BTreeMap::from([other.clone(), victim.clone()])
    );
    assert_eq!(s.stats().io_errors, 0);
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

    /// Whatever bytes change anywhere in a stored file, and however it is cut
    /// or extended, the damage is found and the item never returned.
    #[test]
    fn any_damage_anywhere_is_detected(
        seed in 100u64..10_000,
        len in 0usize..3000,
        is_block in any::<bool>(),
        d in damage(),
    ) {
        let tmp = TempDir::new().unwrap();
        let mut s = open(tmp.path());
        let victim = if is_block { block(seed, len) } else { tombstone(seed) };
        let bystander = block(seed + 1, 50);
        put(&mut s, &victim);
        put(&mut s, &bystander);
        mangle(&s, &victim.0, |b| apply_damage(b, &d));

        prop_assert_eq!(get(&s, &victim.0), StorageResult::Read(None));
        prop_assert_eq!(s.stats().corrupt_found, 1);
        prop_assert_eq!(quarantined(tmp.path()), 1);
        prop_assert_eq!(
            get(&s, &bystander.0),
            StorageResult::Read(Some(bystander.1.clone()))
        );

        // Found by the scan after a restart as well.
        put(&mut s, &victim);
        mangle(&s, &victim.0, |b| apply_damage(b, &d));
        drop(s);
        let s = open(tmp.path());
        prop_assert_eq!(scan_all(&s), BTreeMap::from([bystander]));
        prop_assert_eq!(s.stats().corrupt_found, 1);
        prop_assert_eq!(quarantined(tmp.path()), 2);
        prop_assert_eq!(s.stats().bytes, bytes_on_disk(tmp.path()));
    }
}

// ----- group commit -------------------------------------------------------------

/// A tombstone at `seed`'s key whose bytes (and size) depend on `version`:
/// the same key written with different contents.
fn tombstone_v(seed: u64, version: u8) -> (Id, Item) {
    let item = Item::Tombstone(Tombstone {
        block: sha256(&seed.to_le_bytes()),
        owner_key: vec![seed as u8; 40],
        sig: vec![version; 16 + usize::from(version) * 7],
    });
    (item.position(), item)
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, u8),
    Remove(u64),
    Read(u64),
}

/// Keys 0..3 hold blocks (one content each), 3..6 tombstones in versions.
fn storage_op(op: &Op) -> StorageOp {
    let item = |k: u64, v: u8| {
        if k < 3 {
            block(1000 + k, 100 + 37 * k as usize)
        } else {
            tombstone_v(k, v)
        }
    };
    match *op {
        Op::Write(k, v) => {
            let (key, item) = item(k, v);
            StorageOp::Write { key, item }
        }
        Op::Remove(k) => StorageOp::Remove { key: item(k, 0).0 },
        Op::Read(k) => StorageOp::Read { key: item(k, 0).0 },
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
/// counters of the same operations applied one at a time. (Two stores serve
/// every case, emptied first: making a store's 256 shard directories is
/// the slow part of a case.)
#[test]
fn a_group_commit_is_the_same_as_one_at_a_time() {
    use proptest::test_runner::{Config, TestRunner};
    let (one_dir, group_dir) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let stores = std::cell::RefCell::new((open(one_dir.path()), open(group_dir.path())));
    let mut runner = TestRunner::new(Config {
        cases: 64,
        rng_seed: RngSeed::Fixed(0x6A0C_0441),
        failure_persistence: None,
        ..Config::default()
    });
    let cuts = prop::collection::vec(1usize..12, 1..8);
    let result = runner.run(&(ops(), cuts), |(ops, cuts)| {
        let (one, group) = &mut *stores.borrow_mut();
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
        let (g, o) = (group.stats(), one.stats());
        prop_assert_eq!((g.items, g.bytes), (o.items, o.bytes));
        prop_assert_eq!(g.bytes, bytes_on_disk(group_dir.path()));
        prop_assert!(temps(group_dir.path()).is_empty());
        prop_assert_eq!(g.io_errors + g.corrupt_found, 0);
        // And it all survives a restart.
        *group = open(group_dir.path());
        prop_assert_eq!(scan_all(group), scan_all(one));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn a_group_keeps_to_the_capacity_and_counts_what_it_frees() {
    let size = {
        let probe = TempDir::new().unwrap();
        let mut s = open(probe.path());
        put(&mut s, &block(30, 1000));
        s.stats().bytes
    };
    let tmp = TempDir::new().unwrap();
    let mut s = DiskStore::open(
        tmp.path(),
        DiskConfig {
            capacity_bytes: Some(2 * size + size / 2),
        },
    )
    .unwrap();
    let (a, b, c, d) = (
        block(30, 1000),
        block(31, 1000),
        block(32, 1000),
        block(33, 1000),
    );
    let w = |x: &(Id, Item)| StorageOp::Write {
        key: x.0,
        item: x.1.clone(),
    };
    // Three new items where two fit: the third is refused, alone.
    let r = s.apply_batch(vec![w(&a), w(&b), w(&c), StorageOp::Read { key: b.0 }]);
    assert_eq!(
        r,
        vec![
            StorageResult::Done,
            StorageResult::Done,
            StorageResult::Failed(StoreError::Full),
            StorageResult::Read(Some(b.1.clone())),
        ]
    );
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
    assert_eq!((st.items, st.bytes, st.full_refused), (2, 2 * size, 1));
    assert_eq!(st.bytes, bytes_on_disk(tmp.path()));
    assert!(temps(tmp.path()).is_empty());
}

/// A batch's reads of keys nothing before them in the batch touches are
/// answered first, before any write's result (so a node can send them on
/// while the writes are synced); a read after a write or remove of its key
/// still sees that write or remove; every result matches its operation.
#[test]
fn untouched_reads_are_answered_first_and_the_rest_in_issue_order() {
    let tmp = TempDir::new().unwrap();
    let mut s = open(tmp.path());
    let (a, b, c, d) = (
        block(40, 100_000),
        block(41, 1000),
        block(42, 1000),
        block(43, 1000),
    );
    put(&mut s, &a);
    put(&mut s, &b);
    let w = |x: &(Id, Item)| StorageOp::Write {
        key: x.0,
        item: x.1.clone(),
    };
    let ops = vec![
        w(&c),
        StorageOp::Read { key: a.0 },
        StorageOp::Remove { key: b.0 },
        StorageOp::Read { key: b.0 },
        StorageOp::Read { key: c.0 },
        StorageOp::Read { key: d.0 },
        w(&d),
    ];
    let mut order = Vec::new();
    let mut results = vec![None; ops.len()];
    s.apply_batch_each(ops, |i, r| {
        order.push(i);
        results[i] = Some(r);
    });
    // Reads 1 (a) and 5 (d, not yet written) touch nothing earlier in the
    // batch: first. Then everything else in issue order.
    assert_eq!(order, vec![1, 5, 0, 2, 3, 4, 6]);
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
        ]
    );
    assert_eq!(
        scan_all(&s),
        BTreeMap::from([a.clone(), c.clone(), d.clone()])
    );
    // apply_batch gives the same results, in the operations' order.
    let again = s.apply_batch(vec![
        StorageOp::Read { key: d.0 },
        StorageOp::Remove { key: d.0 },
    ]);
    assert_eq!(
        again,
        vec![StorageResult::Read(Some(d.1.clone())), StorageResult::Done]
    );
}
