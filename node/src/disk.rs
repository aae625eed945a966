//! The node's crash-safe disk store: it carries out the core's storage effects
//! ([`StorageOp`]) and answers them ([`StorageResult`]).
//!
//! # Layout
//!
//! ```text
//! DATA_DIR/packed.redb                items under 64 KiB, in one redb database
//! DATA_DIR/items/xx/<40 hex digits>   one file per larger item; xx = the key's first byte
//! DATA_DIR/quarantine/                files and values found corrupt, kept for an operator
//! ```
//!
//! An item whose encoding (below) is under [`DIRECT_MIN`] (64 KiB: manifests,
//! key records, tombstones, most transaction logs, blocks of small files)
//! is packed into one embedded database with the others (see
//! [`crate::packed`]): a batch of them is one transaction, where a file each
//! cost the kernel an inode, a directory entry and a rename apiece, which
//! was most of what a node spent on a backup of many small files. Larger
//! items (the blocks of larger files) get a file each: memory stays flat
//! (an item is read, checked and dropped on its own, whatever the store's
//! size), a write is a single atomic rename, and the bytes go around the
//! page cache. The 256 shard directories keep directories small.
//!
//! A key is in one place at a time. An item moving between them (a block
//! file replaced by its small tombstone, say) is written to its new place,
//! made durable, and only then removed from the old one. Should a crash or
//! a failed unlink leave a key in both, the packed copy wins and the file
//! is deleted when found: moving into the database, the packed copy is the
//! newer; moving out, the write to the file was never acknowledged (the
//! database delete is its last step), so keeping the old packed copy is
//! as if it never happened.
//!
//! Each file (and each packed value) is a 48-byte header followed by the
//! postcard encoding of the [`Item`]:
//!
//! ```text
//! magic "PSI1" | format version u32 LE | payload length u64 LE | digest
//! ```
//!
//! The digest covers the whole item. In format 2 (what is written) a
//! block's digest is SHA-256 of a tag, its owner and its id, the id being
//! SHA-256 of its bytes, which the core has already worked out: a 1 MiB
//! block is not hashed a second time to be written. Every other item's
//! digest is SHA-256 of the payload, as in format 1, which is still read.
//!
//! Files of [`DIRECT_MIN`] and more are written around the page cache where the file
//! system allows it ([`peerstore_net::dio`]): a node holds other people's
//! ciphertext, which it rarely reads back soon, and copying every block into
//! new cache pages cost more CPU than anything else it did with the block.
//! They are read the same way, into one reused buffer: a block is read
//! when a client restores it or a replica needs it, rarely twice in a row.
//!
//! # Guarantees
//!
//! - **A write is durable when it says `Done`.** A large item goes to a
//!   temporary file in the key's shard directory, that file is synced,
//!   renamed over the final name, and then the directory is synced (the
//!   rename only changes the directory; until that is synced a crash could
//!   bring back the old version or no file at all). A small item is
//!   inserted in a database transaction whose commit is durable when it
//!   returns. A remove likewise unlinks and syncs, or commits its delete,
//!   before it says `Done`.
//! - **Writes that queue up are committed together.** The daemon hands the
//!   store every operation waiting for the disk at once
//!   ([`DiskStore::apply_batch`]): all the temporary files are written and
//!   made durable with one sync, the small items go into the database in
//!   one transaction, then the renames and unlinks are made durable with
//!   a second sync (on Linux `syncfs` of the store's file system;
//!   elsewhere an fsync of each file and directory), then keys that left
//!   the database are deleted in a second transaction. Nothing in the
//!   batch is answered before its last step is durable.
//! - **Nothing torn is ever seen.** Readers see the old file or the new one,
//!   never a mix: rename replaces a name atomically, and a database commit
//!   is all or nothing. A crash mid-write leaves only a temporary file,
//!   which [`DiskStore::open`] deletes (that write was never acknowledged),
//!   or a commit that redb rolls back when it opens.
//! - **Nothing corrupt is ever returned.** Every read checks the magic, the
//!   version, the length, that the payload decodes, its digest, and that
//!   the item's own ring position is the key it is stored under (a file
//!   moved to another key is corrupt too). A file or value failing any
//!   check is counted, moved to (or copied into) `quarantine/` and reported
//!   as absent, so the core drops it from its index and anti-entropy
//!   fetches a good copy from another replica. The database's own pages
//!   are checked when the store opens ([`crate::packed`]); a damaged
//!   database is set aside whole in the same way. Signatures are not
//!   checked here: the core validates every item it restores or receives.
//! - **Writes and removes of one key complete in issue order**: operations are
//!   synchronous and need `&mut self`.
//! - **The capacity is a budget**: a write that would take the sum of item
//!   sizes (headers included) past [`DiskConfig::capacity_bytes`], or that
//!   meets a full disk or quota, fails with [`StoreError::Full`] and leaves
//!   no temporary file (one whose unlink failed too is deleted by the next
//!   open). Other I/O failures answer [`StoreError::Io`] and are counted,
//!   with the last one kept for the logs ([`DiskStats::last_error`]).
//! - No panics on any disk content, no unsafe code, and nothing here ever
//!   records an item's contents: messages name paths, keys and reasons only.
//!   (For the database this rests on redb: its pages are all checked at
//!   open, so what it parses afterwards is what it wrote, unless the file
//!   is changed behind the running node's back.)
//!
//! It relies on the file system honouring fsync and atomic rename within a
//! directory (ext4, XFS, btrfs, APFS do), and on one process using a data
//! directory at a time (the database is locked; a second store opened on
//! it fails).

use crate::packed::{self, Packed};
use peerstore_core::hash::{sha256, Sha256};
use peerstore_core::{Id, Item, StorageOp, StorageResult, StoreError};
use peerstore_net::dio::{self, AlignedBuf, Io, DIRECT_MIN};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

const MAGIC: [u8; 4] = *b"PSI1";
/// Format 1 digests every item's payload; format 2 digests a block by its id.
const FORMAT_VERSION: u32 = 2;
const BLOCK_DIGEST_TAG: &[u8] = b"peerstore/disk/block/v2";
/// Bytes before the payload: magic, version, length, digest.
pub const HEADER_LEN: u64 = 4 + 4 + 8 + 32;
/// Largest payload stored or read. Items are at most about 1 MiB (blocks and
/// transaction logs); the slack keeps a future format change readable while
/// still bounding what a damaged file can make a read allocate.
pub const PAYLOAD_MAX: u64 = 4 << 20;

const ITEMS_DIR: &str = "items";
/// The database of small items.
const PACKED_FILE: &str = "packed.redb";
const QUARANTINE_DIR: &str = "quarantine";
/// Names of temporary files start with this; no item name does.
const TMP_PREFIX: &str = ".tmp-";
const SHARDS: usize = 256;
/// Tries at finding a free name in the quarantine directory.
const QUARANTINE_NAME_TRIES: u32 = 10_000;

/// How the store is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskConfig {
    /// Most bytes the items may take together (headers included), packed
    /// and in files; `None` for no limit besides the disk's. The database
    /// file takes more than its items (page rounding, free pages it keeps
    /// for reuse), so leave the disk some room beyond this.
    pub capacity_bytes: Option<u64>,
}

/// A snapshot of the store's counters. `items` and `bytes` are summed from
/// the database and the files at open and then follow what the store itself
/// does; a file changed behind its back is corrected for when it is found
/// bad, exactly so after the next open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Items held, packed and in files (files not yet found corrupt included).
    pub items: u64,
    /// Their total size in bytes, headers included: what the capacity limits.
    pub bytes: u64,
    /// Files, packed values and databases found corrupt (and quarantined)
    /// since the store was opened.
    pub corrupt_found: u64,
    /// I/O failures other than a full disk since the store was opened.
    pub io_errors: u64,
    /// Writes refused because the capacity or the disk was full.
    pub full_refused: u64,
    /// Temporary files of interrupted writes deleted.
    pub temps_removed: u64,
    /// The last I/O failure, for the logs (paths and OS errors only).
    pub last_error: Option<String>,
    /// The last corrupt file found: where it went and why.
    pub last_corrupt: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    items: AtomicU64,
    bytes: AtomicU64,
    corrupt_found: AtomicU64,
    io_errors: AtomicU64,
    full_refused: AtomicU64,
    temps_removed: AtomicU64,
    last_error: Mutex<Option<String>>,
    last_corrupt: Mutex<Option<String>>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn sub(c: &AtomicU64, n: u64) {
    // Saturating: a counter must never wrap whatever the disk did behind our back.
    let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

fn set(slot: &Mutex<Option<String>>, msg: String) {
    // A poisoned lock only means another thread panicked mid-assignment of a
    // string; the slot is still usable.
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
}

fn get(slot: &Mutex<Option<String>>) -> Option<String> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The node's on-disk item store. See the module documentation.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
    items_dir: PathBuf,
    quarantine_dir: PathBuf,
    cfg: DiskConfig,
    /// Makes temporary file names unique within this process.
    next_tmp: u64,
    counters: Counters,
    /// Where every item file is encoded before it is written: one buffer,
    /// reused, aligned for direct I/O.
    wbuf: AlignedBuf,
    /// Where large item files are read ([`DiskStore::read`] takes `&self`).
    rbuf: Mutex<AlignedBuf>,
    /// Whether to try reading and writing around the page cache
    /// ([`peerstore_net::dio`]); cleared the first time the file system refuses.
    direct: AtomicBool,
    /// The small items.
    packed: Packed,
    /// The database was repaired or replaced when the store opened: stale
    /// files are quarantined rather than deleted ([`DiskStore::remove_stale`]).
    cautious: bool,
}

/// A write whose bytes sit in a temporary file, to be renamed into place.
#[derive(Debug)]
struct Staged {
    key: Id,
    tmp: PathBuf,
    size: u64,
}

/// Where an item is kept, and its size there.
#[derive(Clone, Copy, Debug)]
enum At {
    Nowhere,
    Packed(u64),
    File(u64),
}

impl At {
    fn size(&self) -> u64 {
        match self {
            At::Nowhere => 0,
            At::Packed(n) | At::File(n) => *n,
        }
    }
}

/// What one write or remove of a run will do ([`DiskStore::commit_run`]).
#[derive(Debug)]
enum Plan {
    /// Into the database; `old` is what it replaces.
    Pack {
        key: Id,
        bytes: Vec<u8>,
        old: At,
    },
    /// Into a file, from the temporary file it is staged in.
    File {
        staged: Staged,
        old: At,
    },
    Remove {
        key: Id,
        at: At,
    },
}

/// What loading one item file found.
enum Loaded {
    Missing,
    /// This many bytes, at the start of the read buffer; `direct_refused`
    /// if a direct read was tried and the file system refused it.
    Bytes {
        len: usize,
        direct_refused: bool,
    },
    Bad(String),
}

impl DiskStore {
    /// Opens (creating if needed) the store under `dir`: makes the
    /// directories, opens and checks the database of small items (setting
    /// aside a damaged one, refusing one of another file format), deletes
    /// temporary files left by a crash and item files the database has a
    /// newer copy of, and sums the sizes of what is held. Item contents
    /// are checked later, by [`DiskStore::scan`] and by every read.
    pub fn open(dir: impl AsRef<Path>, cfg: DiskConfig) -> io::Result<DiskStore> {
        let dir = dir.as_ref().to_path_buf();
        let items_dir = dir.join(ITEMS_DIR);
        let quarantine_dir = dir.join(QUARANTINE_DIR);
        for d in [&dir, &items_dir, &quarantine_dir] {
            fs::create_dir_all(d).map_err(|e| context("creating", d, e))?;
        }
        let counters = Counters::default();
        let (packed, replaced) = open_packed(&dir.join(PACKED_FILE), &quarantine_dir, &counters)?;
        let cautious = replaced || packed.was_repaired();
        if packed.was_repaired() {
            add(&counters.corrupt_found, 1);
            set(
                &counters.last_corrupt,
                format!(
                    "{}: damaged pages found and repaired at start-up",
                    dir.join(PACKED_FILE).display()
                ),
            );
        }
        let store = DiskStore {
            items_dir,
            quarantine_dir,
            dir,
            cfg,
            next_tmp: 0,
            counters,
            wbuf: AlignedBuf::new(),
            rbuf: Mutex::new(AlignedBuf::new()),
            direct: AtomicBool::new(true),
            packed,
            cautious,
        };
        let (n, bytes) = store
            .packed
            .tally()
            .map_err(|e| context("reading", &store.dir.join(PACKED_FILE), packed::io_error(e)))?;
        add(&store.counters.items, n);
        add(&store.counters.bytes, bytes);
        for shard in 0..SHARDS {
            let name = shard_name(shard);
            let path = store.items_dir.join(&name);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    // Something else sits where a shard belongs: keep it for
                    // the operator and make the directory.
                    store.quarantine(&path, &name, "not a directory", false);
                    fs::create_dir(&path).map_err(|e| context("creating", &path, e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&path).map_err(|e| context("creating", &path, e))?;
                }
                Err(e) => return Err(context("inspecting", &path, e)),
            }
        }
        // New directory entries are durable only once their parents are synced.
        sync_dir(&store.items_dir).map_err(|e| context("syncing", &store.items_dir, e))?;
        sync_dir(&store.dir).map_err(|e| context("syncing", &store.dir, e))?;
        if let Some(parent) = store.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(|e| context("syncing", parent, e))?;
        }
        for shard in 0..SHARDS {
            store.tally_shard(shard)?;
        }
        Ok(store)
    }

    /// Counts one shard's item files and deletes its temporary files.
    fn tally_shard(&self, shard: usize) -> io::Result<()> {
        let path = self.items_dir.join(shard_name(shard));
        let entries = fs::read_dir(&path).map_err(|e| context("listing", &path, e))?;
        // The shard's packed keys, listed once (in order). Not knowing them,
        // no file is taken for stale.
        let packed = self.packed.keys_starting(shard as u8).unwrap_or_default();
        for entry in entries {
            let entry = entry.map_err(|e| context("listing", &path, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TMP_PREFIX) {
                self.remove_temp(&entry.path());
            } else if let Some(key) = parse_key(name).filter(|k| usize::from(k.0[0]) == shard) {
                // Left by a crash while the item moved into the database:
                // the packed copy is the newer. Counted (as a file) only if
                // it cannot be removed.
                if packed.binary_search(&key).is_ok() && self.remove_stale(&entry.path(), false) {
                    continue;
                }
                // Vanished or unreadable entries are left to scan and reads.
                if let Ok(m) = fs::symlink_metadata(entry.path()) {
                    if m.is_file() {
                        add(&self.counters.items, 1);
                        add(&self.counters.bytes, m.len());
                    }
                }
            }
        }
        Ok(())
    }

    /// Carries out one storage effect of the core.
    pub fn apply(&mut self, op: StorageOp) -> StorageResult {
        match op {
            StorageOp::Read { key } => match self.read(&key) {
                Ok(found) => StorageResult::Read(found),
                Err(e) => StorageResult::Failed(e),
            },
            op => self
                .commit_run(vec![op])
                .pop()
                .unwrap_or(StorageResult::Failed(StoreError::Io)),
        }
    }

    /// Carries out storage effects in order and makes them durable together
    /// (group commit): the operations are cut into runs that touch each key
    /// at most once, and each run costs two syncs and up to two database
    /// commits whatever its length (see `commit_run`) instead of as many
    /// per write. The guarantees are those of [`DiskStore::apply`] one by
    /// one: nothing is answered before it is durable, a failed sync or
    /// commit fails every write or remove waiting on it, and a reader sees
    /// each key as the operations before it in the batch left it.
    pub fn apply_batch(&mut self, ops: Vec<StorageOp>) -> Vec<StorageResult> {
        let mut results: Vec<Option<StorageResult>> = vec![None; ops.len()];
        self.apply_batch_each(ops, |i, r| results[i] = Some(r));
        results
            .into_iter()
            .map(|r| r.unwrap_or(StorageResult::Failed(StoreError::Io)))
            .collect()
    }

    /// [`DiskStore::apply_batch`], handing each result to `done` (with the
    /// operation's place in `ops`) as soon as it is known instead of all at
    /// the end. A read of a key that no operation before it in the batch
    /// writes or removes sees the same store whenever it runs, so such
    /// reads run first and are answered at once: a restore's reads arrive
    /// in batches of dozens of 1 MiB blocks, and answering them together
    /// kept the node idle while the disk read them all and then the disk
    /// idle while the node sent them. The rest go through the group commit.
    pub fn apply_batch_each(
        &mut self,
        ops: Vec<StorageOp>,
        mut done: impl FnMut(usize, StorageResult),
    ) {
        let mut touched: BTreeSet<Id> = BTreeSet::new();
        let mut rest: Vec<(usize, StorageOp)> = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                StorageOp::Read { key } if !touched.contains(&key) => {
                    done(i, self.apply(StorageOp::Read { key }))
                }
                StorageOp::Write { key, .. } | StorageOp::Remove { key } => {
                    touched.insert(key);
                    rest.push((i, op));
                }
                StorageOp::Read { .. } => rest.push((i, op)),
            }
        }
        let (places, rest): (Vec<usize>, Vec<StorageOp>) = rest.into_iter().unzip();
        for (i, r) in places.into_iter().zip(self.group_commit(rest)) {
            done(i, r);
        }
    }

    /// The group commit behind [`DiskStore::apply_batch_each`]: the
    /// operations are cut into runs in which no key is written or removed
    /// twice (nor read after it is), and each run is committed as one.
    fn group_commit(&mut self, ops: Vec<StorageOp>) -> Vec<StorageResult> {
        let mut results = Vec::with_capacity(ops.len());
        let mut run: Vec<StorageOp> = Vec::new();
        let mut touched: BTreeSet<Id> = BTreeSet::new();
        for op in ops {
            let (key, changes) = match &op {
                StorageOp::Write { key, .. } | StorageOp::Remove { key } => (*key, true),
                StorageOp::Read { key } => (*key, false),
            };
            if touched.contains(&key) {
                results.extend(self.commit_run(std::mem::take(&mut run)));
                touched.clear();
            }
            if changes {
                touched.insert(key);
            }
            run.push(op);
        }
        results.extend(self.commit_run(run));
        results
    }

    /// Commits operations on distinct keys together:
    ///
    /// 1. reads are answered (no other operation of the run touches their
    ///    keys, so when does not matter);
    /// 2. every write is encoded and checked against the capacity; large
    ///    ones are written to temporary files, then all of those synced;
    /// 3. the small ones go into the database in one transaction;
    /// 4. the temporary files are renamed into place and the files of
    ///    removed keys, and of keys now packed, unlinked; then synced;
    /// 5. removed keys, and keys now in files, leave the database in a
    ///    second transaction.
    ///
    /// Each step only starts once the one before is durable, so a crash
    /// anywhere leaves every key as it was or as the run left it, or (for
    /// a key moving between the database and a file) in both places, where
    /// the packed copy wins and is the newer one (see the module
    /// documentation). Nothing is answered before its last step is durable.
    fn commit_run(&mut self, ops: Vec<StorageOp>) -> Vec<StorageResult> {
        let mut results: Vec<Option<StorageResult>> = vec![None; ops.len()];
        let mut plans: Vec<Option<Plan>> = (0..ops.len()).map(|_| None).collect();
        let (mut grown, mut freed) = (0u64, 0u64);
        for (i, op) in ops.into_iter().enumerate() {
            let planned = match op {
                StorageOp::Read { key } => {
                    results[i] = Some(match self.read(&key) {
                        Ok(found) => StorageResult::Read(found),
                        Err(e) => StorageResult::Failed(e),
                    });
                    continue;
                }
                StorageOp::Write { key, item } => self.prepare(&key, &item, grown, freed),
                StorageOp::Remove { key } => self.where_is(&key).map(|at| Plan::Remove { key, at }),
            };
            match planned {
                Ok(plan) => {
                    match &plan {
                        Plan::Pack { bytes, old, .. } => {
                            grown = grown.saturating_add(bytes.len() as u64);
                            freed = freed.saturating_add(old.size());
                        }
                        Plan::File { staged, old } => {
                            grown = grown.saturating_add(staged.size);
                            freed = freed.saturating_add(old.size());
                        }
                        Plan::Remove { at, .. } => freed = freed.saturating_add(at.size()),
                    }
                    plans[i] = Some(plan);
                }
                Err(e) => results[i] = Some(StorageResult::Failed(e)),
            }
        }
        let fail = |results: &mut Vec<Option<StorageResult>>, i: usize, e: &StoreError| {
            results[i] = Some(StorageResult::Failed(e.clone()));
        };
        // 2. The large writes' bytes durable before any name points at them.
        let temps: Vec<PathBuf> = plans
            .iter()
            .filter_map(|p| match p {
                Some(Plan::File { staged, .. }) => Some(staged.tmp.clone()),
                _ => None,
            })
            .collect();
        if !temps.is_empty() {
            if let Err(e) = self.sync_all(&temps) {
                for (i, p) in plans.iter_mut().enumerate() {
                    if let Some(Plan::File { staged, .. }) = p {
                        let _ = fs::remove_file(&staged.tmp);
                        *p = None;
                        fail(&mut results, i, &e);
                    }
                }
            }
        }
        // 3. The small writes, in one transaction.
        let (places, puts): (Vec<usize>, Vec<(Id, Vec<u8>)>) = plans
            .iter_mut()
            .enumerate()
            .filter_map(|(i, p)| match p {
                Some(Plan::Pack { key, bytes, .. }) => Some((i, (*key, std::mem::take(bytes)))),
                _ => None,
            })
            .unzip();
        if !puts.is_empty() {
            match self.packed.put_all(&puts) {
                Ok(old) => {
                    for ((_, bytes), old) in puts.iter().zip(old) {
                        match old {
                            Some(old) => sub(&self.counters.bytes, old),
                            None => add(&self.counters.items, 1),
                        }
                        add(&self.counters.bytes, bytes.len() as u64);
                    }
                }
                Err(e) => {
                    let e = self.db_failed("writing to", e);
                    for i in places {
                        plans[i] = None;
                        fail(&mut results, i, &e);
                    }
                }
            }
        }
        // 4. Renames and unlinks, then synced.
        let mut changed: Vec<usize> = Vec::new();
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (i, p) in plans.iter_mut().enumerate() {
            let Some(plan) = p.as_mut() else { continue };
            let step = match plan {
                Plan::File { staged, .. } => {
                    let key = staged.key;
                    let st = Staged {
                        key,
                        tmp: std::mem::take(&mut staged.tmp),
                        size: staged.size,
                    };
                    self.commit(st).map(|()| Some(key))
                }
                // A file this write replaces: stale now that the packed
                // copy is durable.
                Plan::Pack {
                    key,
                    old: At::File(_),
                    ..
                } => self.unlink(key).map(|()| Some(*key)),
                // Every remove unlinks and syncs, whatever it found: an
                // earlier remove may have unlinked the file and then failed
                // to sync, and a packed key may have a stale file beside it
                // (a move into the database whose unlink failed) that must
                // not come back once the packed copy is gone.
                Plan::Remove { key, .. } => self.unlink(key).map(|()| Some(*key)),
                _ => Ok(None),
            };
            match step {
                Ok(Some(key)) => {
                    changed.push(i);
                    let shard = self.shard_dir(&key);
                    if !dirs.contains(&shard) {
                        dirs.push(shard);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    *p = None;
                    fail(&mut results, i, &e);
                }
            }
        }
        if !changed.is_empty() {
            if let Err(e) = self.sync_all(&dirs) {
                for i in changed {
                    plans[i] = None;
                    fail(&mut results, i, &e);
                }
            }
        }
        // 5. Keys leaving the database.
        let dels: Vec<(usize, Id)> = plans
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match p {
                Some(Plan::File {
                    staged,
                    old: At::Packed(_),
                }) => Some((i, staged.key)),
                Some(Plan::Remove {
                    key,
                    at: At::Packed(_),
                }) => Some((i, *key)),
                _ => None,
            })
            .collect();
        if !dels.is_empty() {
            let (places, keys): (Vec<usize>, Vec<Id>) = dels.into_iter().unzip();
            match self.packed.delete_all(&keys) {
                Ok(old) => {
                    for size in old.into_iter().flatten() {
                        sub(&self.counters.items, 1);
                        sub(&self.counters.bytes, size);
                    }
                }
                Err(e) => {
                    let e = self.db_failed("deleting from", e);
                    for i in places {
                        plans[i] = None;
                        fail(&mut results, i, &e);
                    }
                }
            }
        }
        for (i, p) in plans.into_iter().enumerate() {
            if p.is_some() {
                results[i] = Some(StorageResult::Done);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(StorageResult::Failed(StoreError::Io)))
            .collect()
    }

    /// Where the item at `key` is now, if anywhere.
    fn where_is(&self, key: &Id) -> Result<At, StoreError> {
        match self.packed.len_of(key) {
            Ok(Some(size)) => return Ok(At::Packed(size)),
            Ok(None) => {}
            Err(e) => return Err(self.db_failed("reading", e)),
        }
        Ok(match self.size_of(&self.item_path(key))? {
            Some(size) => At::File(size),
            None => At::Nowhere,
        })
    }

    /// Checks a write, encodes it and decides where it goes: the bytes of
    /// a small item, kept for the database; a large one's written to a
    /// temporary file beside its final name (not yet synced). `grown` and
    /// `freed` are what the operations before it in the run, not yet
    /// carried out, will add to and take from the store's size.
    fn prepare(
        &mut self,
        key: &Id,
        item: &Item,
        grown: u64,
        freed: u64,
    ) -> Result<Plan, StoreError> {
        let position = item.position();
        if position != *key {
            return Err(StoreError::Invalid(format!(
                "a {} belonging at {position} cannot be stored at {key}",
                item.kind()
            )));
        }
        let len = encode_into(item, &mut self.wbuf)?;
        let size = len as u64;
        let old = self.where_is(key)?;
        if let Some(cap) = self.cfg.capacity_bytes {
            let used = self.counters.bytes.load(Ordering::Relaxed);
            let after = used
                .saturating_add(grown)
                .saturating_sub(freed)
                .saturating_sub(old.size())
                .saturating_add(size);
            if after > cap {
                add(&self.counters.full_refused, 1);
                return Err(StoreError::Full);
            }
        }
        if len < DIRECT_MIN {
            return Ok(Plan::Pack {
                key: *key,
                bytes: self.wbuf.filled(len).to_vec(),
                old,
            });
        }
        self.next_tmp += 1;
        let tmp = self
            .shard_dir(key)
            .join(format!("{TMP_PREFIX}{key}-{}", self.next_tmp));
        let direct = self.direct.load(Ordering::Relaxed);
        match dio::write_file(&tmp, self.wbuf.filled(len), false, direct) {
            // The file system refused direct I/O: stop asking.
            Ok(Io::Buffered) if direct => self.direct.store(false, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => {
                // Best effort: a temporary file that survives is deleted on open.
                let _ = fs::remove_file(&tmp);
                return Err(self.failed("writing", &tmp, e));
            }
        }
        Ok(Plan::File {
            staged: Staged {
                key: *key,
                tmp,
                size,
            },
            old,
        })
    }

    /// Renames a staged write into place (not yet synced).
    fn commit(&mut self, st: Staged) -> Result<(), StoreError> {
        let path = self.item_path(&st.key);
        let old = match self.size_of(&path) {
            Ok(old) => old,
            Err(e) => {
                let _ = fs::remove_file(&st.tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&st.tmp, &path) {
            let _ = fs::remove_file(&st.tmp);
            return Err(self.failed("renaming into", &path, e));
        }
        match old {
            Some(old) => sub(&self.counters.bytes, old),
            None => add(&self.counters.items, 1),
        }
        add(&self.counters.bytes, st.size);
        Ok(())
    }

    /// The size of the item file at `path`, if there is one.
    fn size_of(&self, path: &Path) -> Result<Option<u64>, StoreError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.failed("inspecting", path, e)),
        }
    }

    /// Makes the files and directories in `paths` durable, with what was
    /// written under the store before: on Linux one `syncfs` of the file
    /// system the store is on, elsewhere an fsync of each.
    fn sync_all(&self, paths: &[PathBuf]) -> Result<(), StoreError> {
        #[cfg(target_os = "linux")]
        {
            let _ = paths;
            let dir = &self.items_dir;
            let f = File::open(dir).map_err(|e| self.failed("opening", dir, e))?;
            rustix::fs::syncfs(&f).map_err(|e| self.failed("syncing", dir, e.into()))
        }
        #[cfg(not(target_os = "linux"))]
        {
            for p in paths {
                let r = if p.is_dir() {
                    sync_dir(p)
                } else {
                    File::open(p).and_then(|f| f.sync_all())
                };
                r.map_err(|e| self.failed("syncing", p, e))?;
            }
            Ok(())
        }
    }

    /// Unlinks the item file at `key` (not yet synced).
    fn unlink(&mut self, key: &Id) -> Result<(), StoreError> {
        let path = self.item_path(key);
        match fs::symlink_metadata(&path) {
            Ok(m) => {
                fs::remove_file(&path).map_err(|e| self.failed("removing", &path, e))?;
                if m.is_file() {
                    sub(&self.counters.items, 1);
                    sub(&self.counters.bytes, m.len());
                }
            }
            // Still sync: an earlier remove may have unlinked the file and
            // then failed to sync.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.failed("inspecting", &path, e)),
        }
        Ok(())
    }

    /// Reads the item at `key`. A corrupt file or packed value is
    /// quarantined and reads as `None`; only a failing disk gives an error.
    pub fn read(&self, key: &Id) -> Result<Option<Item>, StoreError> {
        match self.packed.get(key) {
            Ok(Some(bytes)) => {
                return match check(key, &bytes) {
                    Ok(item) => Ok(Some(item)),
                    Err(why) => {
                        self.quarantine_packed(key, &bytes, &why);
                        Ok(None)
                    }
                };
            }
            Ok(None) => {}
            Err(e) => return Err(self.db_failed("reading", e)),
        }
        self.read_file(key)
    }

    /// Reads the item file at `key` (what [`DiskStore::read`] falls back
    /// to when the database has no copy).
    fn read_file(&self, key: &Id) -> Result<Option<Item>, StoreError> {
        let path = self.item_path(key);
        // A panic elsewhere cannot leave the buffer inconsistent: every
        // read fills it afresh.
        let mut buf = self.rbuf.lock().unwrap_or_else(|p| p.into_inner());
        let direct = self.direct.load(Ordering::Relaxed);
        match load(&path, &mut buf, direct) {
            Ok(Loaded::Missing) => Ok(None),
            Ok(Loaded::Bad(why)) => {
                self.quarantine(&path, &shard_name(key.0[0].into()), &why, true);
                Ok(None)
            }
            Ok(Loaded::Bytes {
                len,
                direct_refused,
            }) => {
                if direct_refused {
                    self.direct.store(false, Ordering::Relaxed);
                }
                match check(key, buf.filled(len)) {
                    Ok(item) => Ok(Some(item)),
                    Err(why) => {
                        self.quarantine(&path, &shard_name(key.0[0].into()), &why, true);
                        Ok(None)
                    }
                }
            }
            Err(e) => Err(self.failed("reading", &path, e)),
        }
    }

    /// Every valid item, in key order, read one file at a time (memory stays
    /// flat whatever the store's size; one shard's file names are listed at a
    /// time). Corrupt files and stray names are quarantined on the way;
    /// unreadable files and shards are counted as I/O errors and skipped. This
    /// is what [`peerstore_core::Node::restore`] is fed at start-up.
    pub fn scan(&self) -> Scan<'_> {
        Scan {
            store: self,
            next_shard: 0,
            shard: 0,
            entries: Vec::new().into_iter(),
            packed: Some(Vec::new()),
        }
    }

    /// The counters now.
    pub fn stats(&self) -> DiskStats {
        let c = &self.counters;
        DiskStats {
            items: c.items.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            corrupt_found: c.corrupt_found.load(Ordering::Relaxed),
            io_errors: c.io_errors.load(Ordering::Relaxed),
            full_refused: c.full_refused.load(Ordering::Relaxed),
            temps_removed: c.temps_removed.load(Ordering::Relaxed),
            last_error: get(&c.last_error),
            last_corrupt: get(&c.last_corrupt),
        }
    }

    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where corrupt files are moved.
    pub fn quarantine_dir(&self) -> &Path {
        &self.quarantine_dir
    }

    /// The database file that holds the small items.
    pub fn packed_path(&self) -> PathBuf {
        self.dir.join(PACKED_FILE)
    }

    /// Where the item at `key` is kept: `Some(true)` in the database of
    /// small items, `Some(false)` in its own file, `None` nowhere.
    pub fn is_packed(&self, key: &Id) -> Result<Option<bool>, StoreError> {
        Ok(match self.where_is(key)? {
            At::Nowhere => None,
            At::Packed(_) => Some(true),
            At::File(_) => Some(false),
        })
    }

    /// Counts the items and bytes afresh from the database and the item
    /// files (what [`DiskStore::stats`] keeps track of as it goes), for
    /// checking the running counts. Temporary and stray files are not
    /// counted; files the database has a newer copy of are.
    pub fn recount(&self) -> io::Result<(u64, u64)> {
        let (mut items, mut bytes) = self
            .packed
            .tally()
            .map_err(|e| context("reading", &self.packed_path(), packed::io_error(e)))?;
        for shard in 0..SHARDS {
            let path = self.items_dir.join(shard_name(shard));
            let entries = match fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(context("listing", &path, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| context("listing", &path, e))?;
                let name = entry.file_name();
                let is_item = name
                    .to_str()
                    .and_then(parse_key)
                    .is_some_and(|k| usize::from(k.0[0]) == shard);
                if let Ok(m) = fs::symlink_metadata(entry.path()) {
                    if is_item && m.is_file() {
                        items += 1;
                        bytes += m.len();
                    }
                }
            }
        }
        Ok((items, bytes))
    }

    /// For tests of damage: stores `bytes` as they are under `key` in the
    /// database of small items, as if the disk had changed them there
    /// (redb checksums its pages, so nothing outside it can).
    #[doc(hidden)]
    pub fn damage_packed(&mut self, key: &Id, bytes: &[u8]) -> Result<(), StoreError> {
        self.packed
            .put_all(&[(*key, bytes.to_vec())])
            .map(|_| ())
            .map_err(|e| self.db_failed("writing to", e))
    }

    /// The file that holds (or would hold) the item at `key`.
    pub fn item_path(&self, key: &Id) -> PathBuf {
        self.shard_dir(key).join(key.to_string())
    }

    fn shard_dir(&self, key: &Id) -> PathBuf {
        self.items_dir.join(shard_name(key.0[0].into()))
    }

    /// Checks one directory entry of shard `shard` for the scan.
    /// `packed` is the shard's packed keys in order, `None` if they could
    /// not be listed.
    fn scan_entry(
        &self,
        shard: usize,
        name: OsString,
        packed: Option<&[Id]>,
    ) -> Option<(Id, Item)> {
        let shard_name = shard_name(shard);
        let path = self.items_dir.join(&shard_name).join(&name);
        let Some(name) = name.to_str() else {
            self.quarantine(&path, &shard_name, "not an item file name", false);
            return None;
        };
        if name.starts_with(TMP_PREFIX) {
            // Only a crash leaves these, and open deleted those; one found
            // now was put there by something else. Not an acknowledged write.
            self.remove_temp(&path);
            return None;
        }
        let Some(key) = parse_key(name) else {
            self.quarantine(&path, &shard_name, "not an item file name", false);
            return None;
        };
        if usize::from(key.0[0]) != shard {
            self.quarantine(&path, &shard_name, "item file in the wrong shard", false);
            return None;
        }
        match packed {
            Some(keys) if keys.binary_search(&key).is_err() => {}
            Some(_) => {
                // The packed copy is the newer (and the scan yields it).
                self.remove_stale(&path, true);
                return None;
            }
            // Not knowing whether the database has it, yield nothing: the
            // packed copy would be the newer.
            None => return None,
        }
        match self.read_file(&key) {
            Ok(found) => found.map(|item| (key, item)),
            Err(_) => None,
        }
    }

    fn remove_temp(&self, path: &Path) {
        match fs::remove_file(path) {
            Ok(()) => add(&self.counters.temps_removed, 1),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                let _ = self.failed("removing", path, e);
            }
        }
    }

    /// Moves a bad file out of the items tree, keeping it for an operator.
    /// `counted`: the file has an item name in its right shard, so its size
    /// is in the counters.
    fn quarantine(&self, path: &Path, shard_name: &str, why: &str, counted: bool) {
        add(&self.counters.corrupt_found, 1);
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base: String = format!("{shard_name}-{file_name}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .take(120)
            .collect();
        let shown = format!("{ITEMS_DIR}/{shard_name}/{file_name}");
        let size = fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        let Some(dest) = free_quarantine_name(&self.quarantine_dir, &base) else {
            set(
                &self.counters.last_corrupt,
                format!("{shown}: {why}; left in place (no free quarantine name)"),
            );
            return;
        };
        if let Err(e) = fs::rename(path, &dest) {
            let _ = self.failed("quarantining", path, e);
            set(
                &self.counters.last_corrupt,
                format!("{shown}: {why}; left in place (could not be moved)"),
            );
            return;
        }
        if counted {
            if let Some(size) = size {
                sub(&self.counters.items, 1);
                sub(&self.counters.bytes, size);
            }
        }
        set(
            &self.counters.last_corrupt,
            format!("{shown}: {why}; moved to {}", dest.display()),
        );
        // Best effort: should the move be lost in a crash, the file is simply
        // found corrupt again.
        if let Some(parent) = path.parent() {
            let _ = sync_dir(parent);
        }
        let _ = sync_dir(&self.quarantine_dir);
    }

    /// Deletes an item file the database holds a newer copy of; `counted`
    /// if its size is in the counters. After a start-up that repaired or
    /// replaced the database (which may have gone back to an earlier
    /// commit, whose copy is then the older) it is moved to quarantine
    /// instead, so nothing is destroyed on a guess. Says whether the file
    /// is gone from the items tree.
    fn remove_stale(&self, path: &Path, counted: bool) -> bool {
        let size = fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        if self.cautious {
            let shard = path
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            self.quarantine(
                path,
                &shard,
                "a packed copy of this item exists, and the database was repaired or replaced at start-up",
                counted,
            );
            return !path.exists();
        }
        match fs::remove_file(path) {
            Ok(()) => {
                if let (true, Some(size)) = (counted, size) {
                    sub(&self.counters.items, 1);
                    sub(&self.counters.bytes, size);
                }
                if let Some(parent) = path.parent() {
                    let _ = sync_dir(parent);
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                let _ = self.failed("removing", path, e);
                false
            }
        }
    }

    /// Moves a corrupt packed value out of the database into a file in the
    /// quarantine directory, keeping it for an operator. A file the key
    /// may also have is older still, so it goes too.
    fn quarantine_packed(&self, key: &Id, bytes: &[u8], why: &str) {
        add(&self.counters.corrupt_found, 1);
        let shown = format!("{PACKED_FILE} item {key}");
        let kept =
            free_quarantine_name(&self.quarantine_dir, &format!("packed-{key}")).and_then(|dest| {
                let copied = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dest)
                    .and_then(|mut f| {
                        use std::io::Write;
                        f.write_all(bytes).and_then(|()| f.sync_all())
                    });
                match copied {
                    Ok(()) => Some(dest),
                    Err(e) => {
                        let _ = self.failed("quarantining", &dest, e);
                        None
                    }
                }
            });
        let _ = sync_dir(&self.quarantine_dir);
        match self.packed.delete_all(&[*key]) {
            Ok(old) => {
                for size in old.into_iter().flatten() {
                    sub(&self.counters.items, 1);
                    sub(&self.counters.bytes, size);
                }
                self.remove_stale(&self.item_path(key), true);
                let whither = match kept {
                    Some(p) => format!("copied to {}", p.display()),
                    None => "not copied (no quarantine file could be written)".into(),
                };
                set(
                    &self.counters.last_corrupt,
                    format!("{shown}: {why}; {whither} and deleted"),
                );
            }
            Err(e) => {
                let _ = self.db_failed("deleting from", e);
                set(
                    &self.counters.last_corrupt,
                    format!("{shown}: {why}; left in place (could not be deleted)"),
                );
            }
        }
    }

    /// Counts a failure of the database and says how to answer it.
    fn db_failed(&self, what: &str, e: redb::Error) -> StoreError {
        let path = self.dir.join(PACKED_FILE);
        self.failed(what, &path, packed::io_error(e))
    }

    /// Counts a failure and says how to answer it.
    fn failed(&self, what: &str, path: &Path, e: io::Error) -> StoreError {
        set(
            &self.counters.last_error,
            format!("{what} {}: {e}", path.display()),
        );
        if is_full(&e) {
            add(&self.counters.full_refused, 1);
            StoreError::Full
        } else {
            add(&self.counters.io_errors, 1);
            StoreError::Io
        }
    }
}

/// The iterator [`DiskStore::scan`] returns.
#[derive(Debug)]
pub struct Scan<'a> {
    store: &'a DiskStore,
    next_shard: usize,
    shard: usize,
    entries: std::vec::IntoIter<Entry>,
    /// The current shard's packed keys, in order (`None`: not listed).
    packed: Option<Vec<Id>>,
}

/// One thing in a shard: a packed key, or a name in its directory.
#[derive(Debug)]
enum Entry {
    Packed(Id),
    File(OsString),
}

impl Iterator for Scan<'_> {
    type Item = (Id, Item);

    fn next(&mut self) -> Option<(Id, Item)> {
        loop {
            if let Some(entry) = self.entries.next() {
                let found = match entry {
                    Entry::Packed(key) => match self.store.read(&key) {
                        Ok(found) => found.map(|item| (key, item)),
                        Err(_) => None,
                    },
                    Entry::File(name) => {
                        self.store
                            .scan_entry(self.shard, name, self.packed.as_deref())
                    }
                };
                if found.is_some() {
                    return found;
                }
                continue;
            }
            if self.next_shard >= SHARDS {
                return None;
            }
            self.shard = self.next_shard;
            self.next_shard += 1;
            // Names are listed before any file is moved: a directory changed
            // while it is being read may skip or repeat entries.
            let path = self.store.items_dir.join(shard_name(self.shard));
            let mut names = Vec::new();
            match fs::read_dir(&path) {
                Ok(entries) => {
                    for entry in entries {
                        match entry {
                            Ok(entry) => names.push(entry.file_name()),
                            Err(e) => {
                                let _ = self.store.failed("listing", &path, e);
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    let _ = self.store.failed("listing", &path, e);
                }
            }
            let mut entries: Vec<(String, Entry)> = names
                .into_iter()
                .map(|n| (n.to_string_lossy().into_owned(), Entry::File(n)))
                .collect();
            self.packed = match self.store.packed.keys_starting(self.shard as u8) {
                Ok(keys) => Some(keys),
                Err(e) => {
                    let _ = self.store.db_failed("listing", e);
                    None
                }
            };
            let packed = self.packed.iter().flatten();
            entries.extend(packed.map(|k| (k.to_string(), Entry::Packed(*k))));
            // Key order (a file whose key is packed too yields nothing).
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            self.entries = entries
                .into_iter()
                .map(|(_, e)| e)
                .collect::<Vec<_>>()
                .into_iter();
        }
    }
}

fn shard_name(shard: usize) -> String {
    format!("{shard:02x}")
}

/// The first `BASE.N` in `dir` that names nothing yet.
fn free_quarantine_name(dir: &Path, base: &str) -> Option<PathBuf> {
    (0..QUARANTINE_NAME_TRIES)
        .map(|n| dir.join(format!("{base}.{n}")))
        .find(|p| matches!(fs::symlink_metadata(p), Err(e) if e.kind() == io::ErrorKind::NotFound))
}

/// Opens the database of small items at `path`. One that is damaged (or
/// not a database at all) is moved into `quarantine` and an empty one
/// started in its place: what it held comes back from the other replicas.
fn open_packed(path: &Path, quarantine: &Path, counters: &Counters) -> io::Result<(Packed, bool)> {
    let why = match Packed::open(path) {
        Ok(p) => return Ok((p, false)),
        Err(packed::OpenError::Other(e)) => return Err(e),
        Err(packed::OpenError::Damaged(why)) => why,
    };
    add(&counters.corrupt_found, 1);
    let dest = free_quarantine_name(quarantine, PACKED_FILE).ok_or_else(|| {
        io::Error::other(format!(
            "{} is damaged ({why}) and there is no free name in {} to move it to",
            path.display(),
            quarantine.display()
        ))
    })?;
    fs::rename(path, &dest).map_err(|e| context("quarantining", path, e))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent).map_err(|e| context("syncing", parent, e))?;
    }
    set(
        &counters.last_corrupt,
        format!("{}: {why}; moved to {}", path.display(), dest.display()),
    );
    match Packed::open(path) {
        Ok(p) => Ok((p, true)),
        Err(packed::OpenError::Other(e)) => Err(e),
        Err(packed::OpenError::Damaged(why)) => Err(io::Error::other(format!(
            "a new database at {} is damaged at once: {why}",
            path.display()
        ))),
    }
}

/// The key an item file name stands for: exactly 40 lowercase hex digits.
fn parse_key(name: &str) -> Option<Id> {
    let b = name.as_bytes();
    if b.len() != 40 {
        return None;
    }
    let mut out = [0u8; 20];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(Id(out))
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Reads an item file whole into `buf`, refusing anything but a regular
/// file of a plausible size. Files of [`DIRECT_MIN`] and more are read
/// around the page cache if `direct`.
fn load(path: &Path, buf: &mut AlignedBuf, direct: bool) -> io::Result<Loaded> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Ok(Loaded::Bad("not a regular file".into()));
    }
    let limit = HEADER_LEN + PAYLOAD_MAX;
    if meta.len() > limit {
        return Ok(Loaded::Bad(format!(
            "{} bytes, over the {limit} byte limit",
            meta.len()
        )));
    }
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(e) => return Err(e),
    };
    let direct = direct && meta.len() >= DIRECT_MIN as u64;
    // Bounded even if the file grew since the stat: a longer file reads
    // as more than the limit, which the length check refuses.
    let (n, how) = dio::read_file(&mut file, buf, limit as usize, direct)?;
    Ok(Loaded::Bytes {
        len: n,
        direct_refused: direct && how == Io::Buffered,
    })
}

/// Checks an item file's bytes and decodes the item in them; says what is
/// wrong otherwise.
fn check(key: &Id, bytes: &[u8]) -> Result<Item, String> {
    let Some((header, payload)) = bytes.split_at_checked(HEADER_LEN as usize) else {
        return Err(format!("{} bytes, shorter than a header", bytes.len()));
    };
    let (magic, rest) = header.split_at(4);
    let (version, rest) = rest.split_at(4);
    let (len, hash) = rest.split_at(8);
    if magic != MAGIC {
        return Err("bad magic".into());
    }
    let version = u32::from_le_bytes(version.try_into().map_err(|_| "bad header")?);
    if version != 1 && version != FORMAT_VERSION {
        return Err(format!("unknown format version {version}"));
    }
    let len = u64::from_le_bytes(len.try_into().map_err(|_| "bad header")?);
    if len != payload.len() as u64 {
        return Err(format!(
            "header says {len} payload bytes, the file holds {}",
            payload.len()
        ));
    }
    // Decoding first is safe: postcard checks every length against the
    // input, and the payload is bounded by the file's size.
    let item = match postcard::take_from_bytes::<Item>(payload) {
        Ok((item, [])) => item,
        Ok(_) => return Err("trailing bytes after the item".into()),
        Err(_) => return Err("payload does not decode".into()),
    };
    let expect = match (version, &item) {
        (FORMAT_VERSION, Item::Block(b)) => block_digest(b),
        _ => sha256(payload),
    };
    if expect.as_slice() != hash {
        return Err("payload hash mismatch".into());
    }
    if item.position() != *key {
        return Err("the item belongs at another key".into());
    }
    Ok(item)
}

/// A block's format-2 digest: its owner and its id (so its bytes), under a
/// tag. The variant and the length prefixes around them are checked by the
/// decoding, and the id again by the key the file is under.
fn block_digest(b: &peerstore_core::Block) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(BLOCK_DIGEST_TAG);
    h.update(b.owner.as_bytes());
    h.update(b.id());
    h.finalize()
}

/// Encodes an item file at the start of `buf`: the header, then the
/// postcard encoding of `item`. Returns the file's length.
fn encode_into(item: &Item, buf: &mut AlignedBuf) -> Result<usize, StoreError> {
    let header = HEADER_LEN as usize;
    let out = buf.slice_mut(header + PAYLOAD_MAX as usize);
    let len = match postcard::to_slice(item, &mut out[header..header + PAYLOAD_MAX as usize]) {
        Ok(payload) => payload.len(),
        Err(postcard::Error::SerializeBufferFull) => {
            return Err(StoreError::Invalid(format!(
                "item of about {} bytes is over the {PAYLOAD_MAX} byte store limit",
                item.size()
            )))
        }
        Err(e) => return Err(StoreError::Invalid(format!("cannot encode the item: {e}"))),
    };
    let hash = match item {
        Item::Block(b) => block_digest(b),
        _ => sha256(&out[header..header + len]),
    };
    out[0..4].copy_from_slice(&MAGIC);
    out[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    out[16..header].copy_from_slice(&hash);
    Ok(header + len)
}

/// An item file's bytes, as [`encode_into`] writes them.
#[cfg(test)]
fn encode(item: &Item) -> Result<Vec<u8>, StoreError> {
    let mut buf = AlignedBuf::new();
    let len = encode_into(item, &mut buf)?;
    Ok(buf.filled(len).to_vec())
}

/// Makes a directory's entries (creations, renames, unlinks) durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Elsewhere directories cannot be opened to sync; renames there are as
/// durable as the platform makes them.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

fn context(what: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    //! The file format alone, without touching a disk: every damage to an
    //! encoded item is caught by [`check`]. (`tests/disk.rs` covers the store.)

    use super::*;
    use peerstore_core::{Block, Tombstone};
    use proptest::prelude::*;
    use proptest::test_runner::RngSeed;

    fn block(data: Vec<u8>) -> Item {
        Item::Block(Block::new(Id::from_u128(7), data))
    }

    fn tombstone(b: u8) -> Item {
        Item::Tombstone(Tombstone {
            block: [b; 32],
            owner_key: vec![b; 40],
            sig: vec![b.wrapping_add(1); 64],
        })
    }

    #[test]
    fn the_store_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<DiskStore>();
    }

    #[test]
    fn the_header_is_as_documented() {
        let item = block(vec![1, 2, 3]);
        let bytes = encode(&item).unwrap();
        let payload = postcard::to_allocvec(&item).unwrap();
        assert_eq!(&bytes[..4], b"PSI1");
        assert_eq!(bytes[4..8], 2u32.to_le_bytes());
        assert_eq!(bytes[8..16], (payload.len() as u64).to_le_bytes());
        let Item::Block(b) = &item else {
            unreachable!()
        };
        let mut digest = BLOCK_DIGEST_TAG.to_vec();
        digest.extend_from_slice(b.owner.as_bytes());
        digest.extend_from_slice(&sha256(b.data()));
        assert_eq!(bytes[16..48], sha256(&digest));
        assert_eq!(bytes[48..], payload[..]);
        assert_eq!(check(&item.position(), &bytes), Ok(item));
        // Other items digest their payload.
        let t = tombstone(4);
        let bytes = encode(&t).unwrap();
        let payload = postcard::to_allocvec(&t).unwrap();
        assert_eq!(bytes[16..48], sha256(&payload));
        assert_eq!(check(&t.position(), &bytes), Ok(t));
    }

    #[test]
    fn format_1_files_are_still_read_and_checked() {
        for item in [block(vec![5; 300]), tombstone(6)] {
            let payload = postcard::to_allocvec(&item).unwrap();
            let mut v1 = b"PSI1".to_vec();
            v1.extend_from_slice(&1u32.to_le_bytes());
            v1.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            v1.extend_from_slice(&sha256(&payload));
            v1.extend_from_slice(&payload);
            assert_eq!(check(&item.position(), &v1).as_ref(), Ok(&item));
            let last = v1.len() - 1;
            v1[last] ^= 1;
            assert!(check(&item.position(), &v1).is_err());
        }
    }

    #[test]
    fn every_single_flip_and_every_cut_is_caught() {
        for item in [block(vec![]), block((0..=255).collect()), tombstone(3)] {
            let key = item.position();
            let good = encode(&item).unwrap();
            assert_eq!(check(&key, &good).as_ref(), Ok(&item));
            for at in 0..good.len() {
                for bit in 0..8 {
                    let mut bad = good.clone();
                    bad[at] ^= 1 << bit;
                    assert!(check(&key, &bad).is_err(), "flip of bit {bit} at {at}");
                }
            }
            for len in 0..good.len() {
                assert!(check(&key, &good[..len]).is_err(), "cut to {len}");
            }
            let mut longer = good.clone();
            longer.push(0);
            assert!(check(&key, &longer).is_err());
            let other = tombstone(9).position();
            assert!(check(&other, &good).is_err(), "under another key");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 2_000,
            rng_seed: RngSeed::Fixed(0x0D15_C0DE),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_damage_is_always_caught(
            data in prop::collection::vec(any::<u8>(), 0..2048),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..6),
            cut in prop::option::of(any::<prop::sample::Index>()),
            tail in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            prop_assume!(!flips.is_empty() || cut.is_some() || !tail.is_empty());
            let item = block(data);
            let key = item.position();
            let good = encode(&item).unwrap();
            let mut bad = good.clone();
            // Flips at distinct positions (two masks at one byte could cancel).
            let mut at_seen = std::collections::BTreeSet::new();
            for (at, mask) in &flips {
                let at = at.index(bad.len());
                if at_seen.insert(at) {
                    bad[at] ^= mask;
                }
            }
            if let Some(cut) = cut {
                bad.truncate(cut.index(bad.len()));
            }
            bad.extend_from_slice(&tail);
            prop_assume!(bad != good);
            prop_assert!(check(&key, &bad).is_err());
        }
    }
}
