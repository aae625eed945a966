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
//! all or nothing) and checksums its pages; a database it cannot open or
//! that fails its integrity check at start-up is moved to the quarantine
//! directory and replaced by an empty one: the items in it come back from
//! the other replicas, as any lost item does.

use peerstore_core::Id;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::io;
use std::path::Path;

/// The item file bytes, under a sequence number: each write takes the
/// next number, so a batch's values go to the end of this table, into
/// fresh pages, instead of each rewriting a page somewhere in a tree keyed
/// by ring position (random keys made redb write about 3.5 bytes per byte
/// stored, nearly all of it rewriting the neighbours of each new value).
const VALUES: TableDefinition<u64, &[u8]> = TableDefinition::new("values");
/// Ring position → the sequence number its bytes are under.
const INDEX: TableDefinition<[u8; 20], u64> = TableDefinition::new("index");

/// Page cache redb may keep (its default is 1 GiB; a node must stay small).
const CACHE_BYTES: usize = 4 << 20;

/// The open database.
pub(crate) struct Packed {
    db: Database,
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
    /// Anything else (another process has it, the disk failed): give up,
    /// keeping it as it is.
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
        let mut db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| open_error(path, e))?;
        match db.check_integrity() {
            Ok(_) => {}
            Err(e) => return Err(open_error(path, e)),
        }
        let packed = Packed { db };
        // The table exists from the first open on, so reads never meet a
        // missing table.
        let txn = packed.db.begin_write().map_err(|e| other(path, e))?;
        txn.open_table(VALUES).map_err(|e| other(path, e))?;
        txn.open_table(INDEX).map_err(|e| other(path, e))?;
        txn.commit().map_err(|e| other(path, e))?;
        Ok(packed)
    }

    /// The bytes stored under `key`.
    pub(crate) fn get(&self, key: &Id) -> Result<Option<Vec<u8>>, redb::Error> {
        let txn = self.db.begin_read()?;
        let Some(seq) = txn.open_table(INDEX)?.get(&key.0)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let values = txn.open_table(VALUES)?;
        Ok(values.get(&seq)?.map(|v| v.value().to_vec()))
    }

    /// How many bytes are stored under `key`.
    pub(crate) fn len_of(&self, key: &Id) -> Result<Option<u64>, redb::Error> {
        let txn = self.db.begin_read()?;
        let Some(seq) = txn.open_table(INDEX)?.get(&key.0)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let values = txn.open_table(VALUES)?;
        Ok(values.get(&seq)?.map(|v| v.value().len() as u64))
    }

    /// Stores every `(key, bytes)` pair in one transaction, durable when
    /// this returns. Returns the sizes of the values they replaced.
    pub(crate) fn put_all(&self, puts: &[(Id, Vec<u8>)]) -> Result<Vec<Option<u64>>, redb::Error> {
        let txn = self.db.begin_write()?;
        let mut old = Vec::with_capacity(puts.len());
        {
            let mut values = txn.open_table(VALUES)?;
            let mut index = txn.open_table(INDEX)?;
            let mut next = match values.last()? {
                Some((k, _)) => k.value().saturating_add(1),
                None => 0,
            };
            for (key, bytes) in puts {
                values.insert(&next, bytes.as_slice())?;
                let was = index.insert(&key.0, &next)?.map(|v| v.value());
                next = next.saturating_add(1);
                let was = match was {
                    Some(seq) => values.remove(&seq)?.map(|v| v.value().len() as u64),
                    None => None,
                };
                old.push(was);
            }
        }
        txn.commit()?;
        Ok(old)
    }

    /// Deletes every key in `keys` in one transaction, durable when this
    /// returns. Returns the sizes of the values deleted.
    pub(crate) fn delete_all(&self, keys: &[Id]) -> Result<Vec<Option<u64>>, redb::Error> {
        let txn = self.db.begin_write()?;
        let mut old = Vec::with_capacity(keys.len());
        {
            let mut values = txn.open_table(VALUES)?;
            let mut index = txn.open_table(INDEX)?;
            for key in keys {
                let was = index.remove(&key.0)?.map(|v| v.value());
                let was = match was {
                    Some(seq) => values.remove(&seq)?.map(|v| v.value().len() as u64),
                    None => None,
                };
                old.push(was);
            }
        }
        txn.commit()?;
        Ok(old)
    }

    /// The keys whose first byte is `first`, in order.
    pub(crate) fn keys_starting(&self, first: u8) -> Result<Vec<Id>, redb::Error> {
        let txn = self.db.begin_read()?;
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
    }

    /// How many items there are and their total size.
    pub(crate) fn tally(&self) -> Result<(u64, u64), redb::Error> {
        let txn = self.db.begin_read()?;
        let items = txn.open_table(INDEX)?.len()?;
        let table = txn.open_table(VALUES)?;
        let mut bytes = 0u64;
        for entry in table.iter()? {
            let (_, v) = entry?;
            bytes = bytes.saturating_add(v.value().len() as u64);
        }
        Ok((items, bytes))
    }
}

/// Sorts an open failure: damage, or something to give up on.
fn open_error(path: &Path, e: impl Into<redb::Error>) -> OpenError {
    let e: redb::Error = e.into();
    match e {
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::RepairAborted => OpenError::Damaged(e.to_string()),
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
    OpenError::Other(io::Error::new(
        kind,
        format!("opening {}: {e}", path.display()),
    ))
}

/// The I/O error inside a redb error, if that is what it is.
pub(crate) fn io_error(e: redb::Error) -> io::Error {
    match e {
        redb::Error::Io(io) => io,
        e => io::Error::other(e.to_string()),
    }
}
