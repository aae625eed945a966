//! Small items packed into one embedded database file (redb), for
//! [`crate::disk::DiskStore`].
//!
//! Giving every item a file of its own costs a file creation (an inode, a
//! directory entry, a rename) for each, which for items of a few KiB is far
//! more than writing their bytes: backing up a thousand small files made
//! the nodes' disk threads the largest user of their CPU, nearly all of it
//! in the kernel creating files. Small items therefore go into one redb
//! database: a batch of them is one transaction, made durable by one
//! commit. Large blocks stay one file each, written around the page cache.
//!
//! The value under each key is exactly what an item file would hold (the
//! header with its digest, then the item), so every read checks it the same
//! way. redb itself keeps the file consistent across crashes (a commit is
//! all or nothing) and checksums its pages, which it checks when it
//! recovers a file and which the store has it check in full at every
//! start; a database it cannot open or that fails that check is moved to
//! the quarantine directory and replaced by an empty one: the items in it
//! come back from the other replicas, as any lost item does. A database of
//! another redb file format is refused instead (the node does not start):
//! that is a version mismatch to settle, not damage to throw away.
//!
//! After an I/O error (a full disk, say) redb refuses every later call on
//! that handle; the next call then drops it and opens the file again,
//! which rolls back to the last commit that made it to disk.

use peerstore_core::Id;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// The item file bytes, under a sequence number: each write takes the
/// next number, so a batch's values go to the end of this table, into
/// fresh pages, instead of each rewriting a page somewhere in a tree keyed
/// by ring position (random keys made redb write about 3.5 bytes per byte
/// stored, nearly all of it rewriting the neighbours of each new value).
const VALUES: TableDefinition<u64, &[u8]> = TableDefinition::new("values");
/// Ring position → the sequence number its bytes are under, and their
/// length (so sizes are known without reading the values).
const INDEX: TableDefinition<[u8; 20], (u64, u64)> = TableDefinition::new("index");

/// Page cache redb may keep (its default is 1 GiB; a node must stay small).
const CACHE_BYTES: usize = 4 << 20;

/// The open database.
pub(crate) struct Packed {
    path: PathBuf,
    /// `None` only while it is being opened again after an I/O error (or
    /// if that failed; the next call tries again).
    db: RwLock<Option<Database>>,
    /// The integrity check at open found damage and redb repaired it,
    /// possibly by going back to an earlier commit.
    repaired: bool,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Packed")
    }
}

/// Why the database at a path could not be used as it was.
pub(crate) enum OpenError {
    /// Its contents are damaged or not a database: set it aside and start
    /// an empty one.
    Damaged(String),
    /// Anything else (another process has it, the disk failed, another
    /// file format): give up, keeping it as it is.
    Other(io::Error),
}

impl Packed {
    /// Opens (creating if needed) the database at `path` and checks every
    /// page of it: a crash mid-commit is rolled back here, and damage done
    /// behind redb's back is found before anything is read.
    pub(crate) fn open(path: &Path) -> Result<Packed, OpenError> {
        // redb takes an empty file for a new database; but it writes its
        // header as it creates one, so an empty file is one cut short.
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() && m.len() == 0 => {
                return Err(OpenError::Damaged("empty file".into()))
            }
            _ => {}
        }
        let mut db = builder().create(path).map_err(|e| open_error(path, e))?;
        let repaired = match db.check_integrity() {
            Ok(clean) => !clean,
            Err(e) => return Err(open_error(path, e)),
        };
        // Both tables exist from the first open on, so reads never meet a
        // missing table.
        let txn = db.begin_write().map_err(|e| other(path, e))?;
        txn.open_table(VALUES).map_err(|e| other(path, e))?;
        txn.open_table(INDEX).map_err(|e| other(path, e))?;
        txn.commit().map_err(|e| other(path, e))?;
        Ok(Packed {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            repaired,
        })
    }

    /// Whether opening it repaired damage (see [`Packed::open`]).
    pub(crate) fn was_repaired(&self) -> bool {
        self.repaired
    }

    /// Runs `f` on the database. If redb refuses because an earlier call
    /// met an I/O error, the handle is dropped, the file opened again (redb
    /// recovers it to its last durable commit) and `f` run once more.
    fn run<T>(&self, f: impl Fn(&Database) -> Result<T, redb::Error>) -> Result<T, redb::Error> {
        {
            let db = self.db.read().unwrap_or_else(|p| p.into_inner());
            if let Some(db) = db.as_ref() {
                match f(db) {
                    Err(redb::Error::PreviousIo) => {}
                    r => return r,
                }
            }
        }
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        // The old handle goes first: it holds the file's lock.
        *slot = None;
        let db = builder().create(&self.path)?;
        f(slot.insert(db))
    }

    /// The bytes stored under `key`.    /// The bytes stored under `key`.
    pub(crate) fn get(&self, key: &Id) -> Result<Option<Vec<u8>>, redb::Error> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let Some((seq, _)) = txn.open_table(INDEX)?.get(&key.0)?.map(|v| v.value()) else {
                return Ok(None);
            };
            let values = txn.open_table(VALUES)?;
            match values.get(&seq)? {
                Some(v) => Ok(Some(v.value().to_vec())),
                None => Err(dangling(key)),
            }
        })
    }

    /// How many bytes are stored under `key`.
    pub(crate) fn len_of(&self, key: &Id) -> Result<Option<u64>, redb::Error> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let index = txn.open_table(INDEX)?;
            Ok(index.get(&key.0)?.map(|v| v.value().1))
        })
    }

    /// Stores every `(key, bytes)` pair in one transaction, durable when
    /// this returns. Returns the sizes of the values they replaced.
    pub(crate) fn put_all(&self, puts: &[(Id, Vec<u8>)]) -> Result<Vec<Option<u64>>, redb::Error> {
        self.run(|db| {
            let txn = db.begin_write()?;
            let mut old = Vec::with_capacity(puts.len());
            {
                let mut values = txn.open_table(VALUES)?;
                let mut index = txn.open_table(INDEX)?;
                let mut next = match values.last()? {
                    Some((k, _)) => k.value().checked_add(1),
                    None => Some(0),
                };
                for (key, bytes) in puts {
                    // 2^64 writes are out of reach; a last number that
                    // high is damage.
                    let seq = next.ok_or_else(|| {
                        redb::Error::Corrupted("the value sequence number is exhausted".into())
                    })?;
                    if values.insert(&seq, bytes.as_slice())?.is_some() {
                        return Err(redb::Error::Corrupted(format!(
                            "value {seq} was already taken"
                        )));
                    }
                    next = seq.checked_add(1);
                    let was = index
                        .insert(&key.0, &(seq, bytes.len() as u64))?
                        .map(|v| v.value());
                    if let Some((seq, _)) = was {
                        values.remove(&seq)?;
                    }
                    old.push(was.map(|(_, len)| len));
                }
            }
            txn.commit()?;
            Ok(old)
        })
    }

    /// Deletes every key in `keys` in one transaction, durable when this
    /// returns. Returns the sizes of the values deleted.
    pub(crate) fn delete_all(&self, keys: &[Id]) -> Result<Vec<Option<u64>>, redb::Error> {
        self.run(|db| {
            let txn = db.begin_write()?;
            let mut old = Vec::with_capacity(keys.len());
            {
                let mut values = txn.open_table(VALUES)?;
                let mut index = txn.open_table(INDEX)?;
                for key in keys {
                    let was = index.remove(&key.0)?.map(|v| v.value());
                    if let Some((seq, _)) = was {
                        values.remove(&seq)?;
                    }
                    old.push(was.map(|(_, len)| len));
                }
            }
            txn.commit()?;
            Ok(old)
        })
    }

    /// The keys whose first byte is `first`, in order.
    pub(crate) fn keys_starting(&self, first: u8) -> Result<Vec<Id>, redb::Error> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(INDEX)?;
            let mut lo = [0u8; 20];
            lo[0] = first;
            let mut keys = Vec::new();
            for entry in table.range(lo..)? {
                let (k, _) = entry?;
                let k = k.value();
                if k[0] != first {
                    break;
                }
                keys.push(Id(k));
            }
            Ok(keys)
        })
    }

    /// How many items there are and their total size (from the index
    /// alone: start-up does not read every value a second time after the
    /// integrity check).
    pub(crate) fn tally(&self) -> Result<(u64, u64), redb::Error> {
        self.run(|db| {
            let txn = db.begin_read()?;
            let index = txn.open_table(INDEX)?;
            let (mut items, mut bytes) = (0u64, 0u64);
            for entry in index.iter()? {
                let (_, v) = entry?;
                items += 1;
                bytes = bytes.saturating_add(v.value().1);
            }
            Ok((items, bytes))
        })
    }
}

fn builder() -> redb::Builder {
    let mut b = redb::Builder::new();
    b.set_cache_size(CACHE_BYTES);
    b
}

/// An index entry whose value is missing: the two tables change together,
/// so only damage does that.
fn dangling(key: &Id) -> redb::Error {
    redb::Error::Corrupted(format!("the index names a missing value for {key}"))
}

/// Sorts an open failure: damage, or something to give up on.
fn open_error(path: &Path, e: impl Into<redb::Error>) -> OpenError {
    let e: redb::Error = e.into();
    match e {
        // Another file format: written by a newer redb, or needing an
        // upgrade by this one. Not damage; the operator decides.
        redb::Error::UpgradeRequired(_) => other(path, e),
        redb::Error::Corrupted(ref why) if why.contains("file format version") => other(path, e),
        redb::Error::Corrupted(_) | redb::Error::RepairAborted => OpenError::Damaged(e.to_string()),
        redb::Error::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
            ) =>
        {
            OpenError::Damaged(io.to_string())
        }
        e => other(path, e),
    }
}

fn other(path: &Path, e: impl Into<redb::Error>) -> OpenError {
    let e: redb::Error = e.into();
    let kind = match &e {
        redb::Error::Io(io) => io.kind(),
        _ => io::ErrorKind::Other,
    };
    let hint = match &e {
        redb::Error::UpgradeRequired(_) | redb::Error::Corrupted(_) => {
            " (a redb file format this peerstore-node does not read: run the \
             peerstore-node that wrote it, or move the file aside to start with \
             an empty store whose items the other replicas send back)"
        }
        _ => "",
    };
    OpenError::Other(io::Error::new(
        kind,
        format!("opening {}: {e}{hint}", path.display()),
    ))
}

/// The I/O error inside a redb error, if that is what it is.
pub(crate) fn io_error(e: redb::Error) -> io::Error {
    match e {
        redb::Error::Io(io) => io,
        e => io::Error::other(e.to_string()),
    }
}
