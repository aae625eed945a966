//! The user's files in the ring: backup, restore, list, remove, share,
//! revoke.
//!
//! # What is stored
//!
//! * Every file is encrypted on this machine before anything leaves it
//!   ([`peerstore_core::filecrypt`]): a fresh random key and file id per
//!   backed-up version, 1 MiB sealed chunks stored as blocks owned by the
//!   user, and a manifest (owner-signed, access list with the key wrapped
//!   for each reader, sealed metadata: path, size, mtime, mode, chunk ids).
//! * The user's **namespace** is their transaction log, a grow-only set
//!   of owner-signed entries in the DHT. Each entry holds a batch of
//!   operations (`put path -> file id, size, mtime` or `rm path`), sealed
//!   with a key only this user's key file can derive
//!   ([`Identity::local_secret`]), so nodes learn neither names nor sizes
//!   from it. Entries are ordered by (Lamport clock, client id); replaying
//!   them gives the current catalog. Writing the log sends only the new
//!   entries: replicas merge logs by union.
//!
//! A file's log entry is written only after its blocks and its manifest
//! were acknowledged by W replicas, so whatever `ls` lists can be
//! restored. A backup that stops half-way leaves blocks nobody lists (they
//! cost space, not correctness).
//!
//! # Streams and memory
//!
//! Files are read and sealed one chunk at a time, and restored one chunk at
//! a time in order (out-of-order answers wait in a bounded window), into a
//! temporary file renamed into place only after the last chunk verified.
//! At most [`WINDOW`] requests and [`WINDOW_BYTES`] of blocks are in
//! flight ([`RESTORE_WINDOW_BYTES`] for a restore's chunks), so memory
//! stays flat whatever the file size.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use peerstore_core::filecrypt::{
    self, Decryptor, Encryptor, FileId, FileKey, FileMeta, Rekeyer, CHUNK_BYTES,
};
use peerstore_core::gate::{ClientOp, GateError, GateReply};
use peerstore_core::identity::Identity;
use peerstore_core::record::{self, Manifest, PubKeyRecord, Record, UserId};
use peerstore_core::reqauth::AuthError;
use peerstore_core::store::{sha256, Block, BlockId, Tombstone};
use peerstore_core::{Id, Item, StoreError};
use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::conn::NodeClient;
use peerstore_net::dio::{AlignedBuf, DirectWriter};

/// Requests in flight at most, queued ones included: room for a full
/// signed batch on the wire while the next one fills (see
/// [`crate::conn::LOW_WATER`]), when requests are small.
pub const WINDOW: usize = crate::conn::WINDOW;
/// Bytes of blocks in flight at most (sent, or expected in answers): 24
/// requests of 1 MiB.
pub const WINDOW_BYTES: u64 = 24 << 20;
/// Chunks of one file asked for and not yet written, at most.
const CHUNKS_IN_FLIGHT: usize = (WINDOW_BYTES / CHUNK_BYTES as u64) as usize;
/// Bytes of chunks a restore asks for and has not yet handed to its
/// writer, at most: twice a backup's window. A restore holds nothing else
/// of size (a backup also holds the chunks it is sealing), and the larger
/// window keeps the nodes busier: a 256 MiB restore from a 3-node ring ran
/// at 201 MB/s instead of 185 (means of six runs each), with the client at
/// 28–43 MiB peak RSS.
pub const RESTORE_WINDOW_BYTES: u64 = 2 * WINDOW_BYTES;
const RESTORE_CHUNKS_IN_FLIGHT: usize = (RESTORE_WINDOW_BYTES / CHUNK_BYTES as u64) as usize;
const _: () = assert!(
    RESTORE_CHUNKS_IN_FLIGHT < WINDOW,
    "room for the window's gets"
);
/// Files at most this large and of one chunk are restored a group at a
/// time, their chunks fetched together (and held until the group is
/// written: [`RESTORE_GROUP`] of them, at most 4 MiB).
const GROUP_FILE_BYTES: u64 = 64 << 10;
/// Plaintext bytes of operations per log entry (an entry body is at most
/// 4 KiB sealed).
const ENTRY_PLAIN_MAX: usize = 3_000;
/// Log entries written at once while a backup runs, so a long backup
/// that is interrupted keeps what it finished.
const LOG_FLUSH_OPS: usize = 256;
/// Files of one to a few chunks staged to be sealed together, at most
/// (their chunks' CBC chains run side by side: see
/// [`Encryptor::push_each`])…
const STAGE_FILES: usize = peerstore_core::lanes::LANES;
/// … and at most this many bytes of them.
const STAGE_BYTES: usize = 8 * CHUNK_BYTES;

/// Chunks of a large file read and sealed at once: their CBC chains run side
/// by side, and each is copied once instead of twice (client CPU for a
/// 256 MiB backup: 1.14–1.20 s, against 1.22–1.29 s one chunk at a time).
const READ_CHUNKS: usize = 4;
/// Files whose manifests are signed together at most (one RSA signature
/// over their access lists, one over their versions: small files used to
/// cost two each, 80 % of a small-file backup's time).
const MANIFEST_BATCH: usize = 64;
/// Bytes of stored files that wait for their manifests at most: past this
/// the waiting ones are signed at once, so an interrupted backup of large
/// files loses little.
const MANIFEST_WAIT_BYTES: u64 = 64 << 20;

const LOG_LABEL: &[u8] = b"txlog";
const LOG_ENTRY_TAG: &[u8] = b"peerstore/txlog-entry/v1";

/// One operation in the user's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogOp {
    Put {
        path: String,
        file_id: FileId,
        size: u64,
        mtime_ms: i64,
    },
    Rm {
        path: String,
    },
}

/// A file the catalog lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub file_id: FileId,
    pub size: u64,
    pub mtime_ms: i64,
}

/// The user's namespace as the log says it is now.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub files: BTreeMap<String, Entry>,
    /// Highest Lamport clock in the log.
    pub clock: u64,
}

impl Catalog {
    /// Entries at `path` or under it (`path` a file, or a directory
    /// prefix); everything for an empty path.
    pub fn under(&self, path: &str) -> Vec<(&String, &Entry)> {
        let dir = format!("{}/", path.trim_end_matches('/'));
        self.files
            .iter()
            .filter(|(p, _)| path.is_empty() || *p == path || p.starts_with(&dir) || dir == "/")
            .collect()
    }

    /// The catalog's name for a path the user typed. Backups record
    /// absolute, canonical paths, so a relative path is taken from the
    /// current directory, `.` and `..` are resolved, and where the path
    /// exists here its symbolic links are resolved too; the first of
    /// these spellings that names something backed up wins. With nothing
    /// backed up under any of them, the absolute spelling (for the error
    /// message).
    pub fn resolve(&self, typed: &str) -> String {
        self.resolve_in(typed, &std::env::current_dir().unwrap_or_default())
    }

    /// [`Catalog::resolve`] with the current directory given.
    pub fn resolve_in(&self, typed: &str, cwd: &Path) -> String {
        let candidates = path_spellings(typed, cwd);
        candidates
            .iter()
            .find(|c| !self.under(c).is_empty())
            .or(candidates.get(1))
            .or(candidates.first())
            .cloned()
            .unwrap_or_default()
    }

    /// Copies of the entries at or under `path`; an error if there are
    /// none.
    pub fn pick(&self, path: &str) -> Result<Vec<(String, Entry)>> {
        let chosen: Vec<(String, Entry)> = self
            .under(path)
            .into_iter()
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        if chosen.is_empty() {
            bail!("nothing backed up at {path} (see `peerstore ls`)");
        }
        Ok(chosen)
    }

    fn apply(&mut self, op: LogOp) {
        match op {
            LogOp::Put {
                path,
                file_id,
                size,
                mtime_ms,
            } => {
                self.files.insert(
                    path,
                    Entry {
                        file_id,
                        size,
                        mtime_ms,
                    },
                );
            }
            LogOp::Rm { path } => {
                self.files.remove(&path);
            }
        }
    }
}

/// What a reply said, as a result.
fn put_result(r: GateReply) -> Result<()> {
    match r {
        GateReply::Put(Ok(())) => Ok(()),
        GateReply::Put(Err(e)) => Err(explain(e)),
        other => bail!("unexpected answer to a store request: {other:?}"),
    }
}

fn get_result(r: GateReply) -> Result<Option<Item>> {
    match r {
        GateReply::Get(Ok(item)) => Ok(item),
        GateReply::Get(Err(e)) => Err(explain(e)),
        other => bail!("unexpected answer to a read request: {other:?}"),
    }
}

fn explain(e: GateError) -> anyhow::Error {
    match e {
        GateError::Auth(AuthError::UnknownUser) => {
            anyhow!("this user is not registered in the ring yet: run `peerstore register`")
        }
        GateError::Store(StoreError::Unavailable { acks, needed }) => anyhow!(
            "only {acks} of the {needed} replicas needed confirmed the write in time: too few nodes are up, or they are overloaded; run the command again (what was stored is kept)"
        ),
        GateError::Store(StoreError::Full) => {
            anyhow!("a replica's disk is full: free space on the nodes or add nodes")
        }
        other => anyhow!("{other}"),
    }
}

fn mtime_ms(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(unix)]
fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn mode_of(_meta: &std::fs::Metadata) -> u32 {
    0
}

/// Progress of long work, shown by the caller (a bar, or nothing).
pub trait Progress {
    /// `n` more bytes done.
    fn bytes(&self, n: u64);
    /// A line of news (a file skipped, an error on one file).
    fn note(&self, line: &str);
}

/// No progress shown.
pub struct Quiet;

impl Progress for Quiet {
    fn bytes(&self, _n: u64) {}
    fn note(&self, _line: &str) {}
}

/// What a backup did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupReport {
    pub files_stored: u64,
    pub files_unchanged: u64,
    pub bytes_stored: u64,
    /// Files that could not be backed up, with why.
    pub failed: Vec<(String, String)>,
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub files: u64,
    pub bytes: u64,
    pub failed: Vec<(String, String)>,
}

/// A file being backed up: its place in [`Run::files`], its key and
/// encryptor, and what its metadata will say.
struct Backing {
    at: usize,
    key: FileKey,
    enc: Encryptor,
    path: String,
    mtime_ms: i64,
    mode: u32,
}

/// Records that `file` could not be backed up, and why.
fn file_failed(run: &mut Run, file: Backing, e: anyhow::Error, progress: &dyn Progress) {
    progress.note(&format!("failed {}: {e:#}", file.path));
    run.report.failed.push((file.path, format!("{e:#}")));
    run.files[file.at].failed = true;
}

/// A file being backed up.
struct Pending {
    path: String,
    file_id: FileId,
    size: u64,
    mtime_ms: i64,
    blocks_left: usize,
    /// Its key and metadata, once every chunk is sealed. Once every block
    /// is acked too, the file waits in [`Run::ready`] for its manifest.
    sealed: Option<(FileKey, FileMeta)>,
    failed: bool,
}

/// A backup under way: the files in flight, what each call was for, the
/// log operations of files done, and the report.
#[derive(Default)]
struct Run {
    files: Vec<Pending>,
    calls: HashMap<u64, CallFor>,
    done_ops: Vec<LogOp>,
    /// Files whose blocks are all stored, waiting for their manifests to be
    /// signed together, and their bytes.
    ready: Vec<usize>,
    ready_bytes: u64,
    /// Bytes of blocks sent and not yet answered.
    inflight_bytes: u64,
    report: BackupReport,
}

enum CallFor {
    /// A block of the file, and its size.
    Block(usize, u64),
    Manifest(usize),
}

/// A user's session with the ring.
pub struct Files {
    c: NodeClient,
    id: Identity,
    client_id: u64,
    min_bits: usize,
}

impl Files {
    pub fn new(c: NodeClient, id: Identity) -> Files {
        Files {
            c,
            id,
            client_id: OsRng.next_u64(),
            min_bits: record::MIN_KEY_BITS_DEFAULT,
        }
    }

    pub fn client(&mut self) -> &mut NodeClient {
        &mut self.c
    }

    pub fn user_id(&self) -> UserId {
        self.id.user_id()
    }

    async fn put(&mut self, item: Item) -> Result<()> {
        put_result(self.c.call(ClientOp::Put(item)).await?)
    }

    async fn get(&mut self, key: Id) -> Result<Option<Item>> {
        get_result(self.c.call(ClientOp::Get(key)).await?)
    }

    /// Stores this user's public key record (first registration of an id
    /// wins, for ever). Returns false if it was already registered.
    pub async fn register(&mut self) -> Result<bool> {
        let at = record::pubkey_position(self.id.signing_public_der());
        if let Ok(Some(Item::Record(r))) = self.get(at).await {
            if let Record::PubKey(pk) = *r {
                if pk.signing_key == self.id.signing_public_der() {
                    return Ok(false);
                }
            }
        }
        let rec = self.id.pubkey_record(&mut OsRng);
        self.put(Item::Record(Box::new(rec)))
            .await
            .context("registering your public key")?;
        Ok(true)
    }

    /// A user's public key record, by key file or user id.
    pub async fn pubkey(&mut self, user: UserId) -> Result<PubKeyRecord> {
        match self.get(user).await? {
            Some(Item::Record(r)) => match *r {
                Record::PubKey(pk) if record::user_id(&pk.signing_key) == user => Ok(pk),
                _ => bail!("the ring holds no public key record for user {user}"),
            },
            _ => bail!(
                "user {user} is not registered in the ring (they must run `peerstore register`)"
            ),
        }
    }

    fn log_key(&self) -> FileKey {
        FileKey::from_secret(self.id.local_secret(LOG_LABEL))
    }

    fn entry_file_id(clock: u64, client: u64) -> FileId {
        let mut m = Vec::with_capacity(LOG_ENTRY_TAG.len() + 16);
        m.extend_from_slice(LOG_ENTRY_TAG);
        m.extend_from_slice(&clock.to_be_bytes());
        m.extend_from_slice(&client.to_be_bytes());
        sha256(&m)
    }

    /// The user's namespace, from the transaction log.
    pub async fn catalog(&mut self) -> Result<Catalog> {
        let at = record::txlog_position(self.id.signing_public_der());
        let mut cat = Catalog::default();
        let log = match self.get(at).await.context("reading your file list")? {
            None => return Ok(cat),
            Some(Item::Record(r)) => match *r {
                Record::TxLog(l) => l,
                _ => bail!("the ring holds something other than your log at its position"),
            },
            Some(_) => bail!("the ring holds something other than your log at its position"),
        };
        let key = self.log_key();
        for ((clock, client), e) in &log.entries {
            cat.clock = cat.clock.max(*clock);
            let mut dec = Decryptor::new(&key, Self::entry_file_id(*clock, *client));
            let plain = dec
                .push(&e.body)
                .and_then(|p| dec.finish().map(|_| p))
                .map_err(|_| {
                    anyhow!("a log entry failed to open: was it written with another key file?")
                })?;
            let ops: Vec<LogOp> = postcard::from_bytes(&plain)
                .map_err(|_| anyhow!("a log entry is not readable by this version"))?;
            for op in ops {
                cat.apply(op);
            }
        }
        Ok(cat)
    }

    /// Appends `ops` to the log (in entries of at most 4 KiB), after
    /// `cat.clock`, and applies them to `cat`.
    pub async fn append(&mut self, cat: &mut Catalog, ops: Vec<LogOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let key = self.log_key();
        let mut entries: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        let mut batch: Vec<LogOp> = Vec::new();
        let mut batch_len = 0;
        let seal = |batch: &mut Vec<LogOp>, cat: &mut Catalog| -> Result<(u64, u64, Vec<u8>)> {
            cat.clock += 1;
            let plain = postcard::to_allocvec(&*batch).context("encoding log operations")?;
            let mut enc = Encryptor::new(&key, Self::entry_file_id(cat.clock, self.client_id));
            let more = enc.push(&mut OsRng, &plain)?;
            debug_assert!(more.is_empty(), "an entry is one chunk");
            let body = enc.finish(&mut OsRng).last_chunk;
            for op in batch.drain(..) {
                cat.apply(op);
            }
            Ok((cat.clock, self.client_id, body))
        };
        for op in ops {
            let len = postcard::to_allocvec(&op).map(|v| v.len()).unwrap_or(0);
            if batch_len + len > ENTRY_PLAIN_MAX && !batch.is_empty() {
                entries.push(seal(&mut batch, cat)?);
                batch_len = 0;
            }
            batch_len += len;
            batch.push(op);
        }
        if !batch.is_empty() {
            entries.push(seal(&mut batch, cat)?);
        }
        let entries = record::new_tx_entries(&mut OsRng, self.id.signer(), entries);
        let rec = record::new_txlog_record(self.id.signer(), entries)
            .map_err(|e| anyhow!("building the log: {e}"))?;
        self.put(Item::Record(Box::new(rec)))
            .await
            .context("writing your file list")
    }

    /// Backs up every regular file under `root` (recursively; symbolic
    /// links are not followed). Files whose size and mtime match the
    /// catalog are skipped.
    pub async fn backup(&mut self, root: &Path, progress: &dyn Progress) -> Result<BackupReport> {
        let root = root.canonicalize().with_context(|| {
            format!(
                "cannot back up {}: no such file or directory",
                root.display()
            )
        })?;
        let mut cat = self.catalog().await?;
        let mut run = Run::default();
        let mut buf = vec![0u8; CHUNK_BYTES * READ_CHUNKS];
        // Files read whole, waiting to be sealed together, and their bytes.
        let mut staged: Vec<(Backing, Vec<u8>)> = Vec::new();

        for entry in walkdir::WalkDir::new(&root)
            .follow_links(false)
            .sort_by_file_name()
        {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let p = e
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    progress.note(&format!("skipped {p}: {e}"));
                    run.report.failed.push((p, e.to_string()));
                    continue;
                }
            };
            if !entry.file_type().is_file() {
                continue;
            }
            let Some(path) = entry.path().to_str().map(str::to_owned) else {
                let p = entry.path().display().to_string();
                progress.note(&format!("skipped {p}: the name is not UTF-8"));
                run.report.failed.push((p, "name is not UTF-8".into()));
                continue;
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    run.report.failed.push((path, e.to_string()));
                    continue;
                }
            };
            let (size, mtime) = (meta.len(), mtime_ms(&meta));
            if cat
                .files
                .get(&path)
                .is_some_and(|e| e.size == size && e.mtime_ms == mtime)
            {
                run.report.files_unchanged += 1;
                progress.bytes(size);
                continue;
            }
            if size > filecrypt::MAX_FILE_BYTES {
                progress.note(&format!(
                    "skipped {path}: larger than the 1088 MiB limit of one file"
                ));
                run.report
                    .failed
                    .push((path, "larger than the 1088 MiB limit of one file".into()));
                continue;
            }
            let mut f = match File::open(entry.path()) {
                Ok(f) => f,
                Err(e) => {
                    progress.note(&format!("skipped {path}: {e}"));
                    run.report.failed.push((path, e.to_string()));
                    continue;
                }
            };
            let key = FileKey::generate(&mut OsRng);
            let file_id = filecrypt::new_file_id(&mut OsRng);
            let at = run.files.len();
            run.files.push(Pending {
                path: path.clone(),
                file_id,
                size,
                mtime_ms: mtime,
                blocks_left: 0,
                sealed: None,
                failed: false,
            });
            let mut file = Backing {
                at,
                enc: Encryptor::new(&key, file_id),
                key,
                path,
                mtime_ms: mtime,
                mode: mode_of(&meta),
            };
            let mut first = Vec::new();
            // A file of one to a few chunks is read whole and sealed with
            // others: each file has its own key, so alone its chunk's CBC
            // chain would run one block after another.
            if (CHUNK_BYTES as u64..buf.len() as u64).contains(&size) {
                // One byte more than the size, to see a file that grew.
                let mut data = vec![0u8; size as usize + 1];
                match read_full(&mut f, &mut data) {
                    Err(e) => {
                        let e = anyhow!("reading {}: {e}", file.path);
                        file_failed(&mut run, file, e, progress);
                        continue;
                    }
                    Ok(n) if n as u64 <= size => {
                        data.truncate(n);
                        staged.push((file, data));
                        let staged_bytes: usize = staged.iter().map(|(_, d)| d.len()).sum();
                        if staged.len() >= STAGE_FILES || staged_bytes >= STAGE_BYTES {
                            self.seal_staged(&mut run, &mut cat, &mut staged, progress)
                                .await?;
                        }
                        continue;
                    }
                    Ok(n) => {
                        // It grew since its size was read: stream it,
                        // starting with what was read.
                        data.truncate(n);
                        first = data;
                    }
                }
            }
            match self
                .stream_file(&mut run, &mut file, &mut f, &first, &mut buf, progress)
                .await?
            {
                Ok(total) => {
                    self.file_sealed(&mut run, &mut cat, file, total, progress)
                        .await?
                }
                Err(e) => file_failed(&mut run, file, e, progress),
            }
        }
        self.seal_staged(&mut run, &mut cat, &mut staged, progress)
            .await?;
        loop {
            while self.c.in_flight() > 0 {
                let (id, r) = self.c.next_answer().await?;
                self.on_backup_answer(&mut run, id, r, progress).await?;
            }
            if run.ready.is_empty() {
                break;
            }
            self.send_manifests(&mut run, progress).await?;
        }
        let ops = std::mem::take(&mut run.done_ops);
        self.append(&mut cat, ops).await?;
        Ok(run.report)
    }

    /// Seals and sends `first`, then the rest of `f` read through `buf`.
    /// Returns the file's length, or why it could not be read or sealed;
    /// the outer error is the connection's, which ends the backup.
    async fn stream_file(
        &mut self,
        run: &mut Run,
        file: &mut Backing,
        f: &mut File,
        first: &[u8],
        buf: &mut [u8],
        progress: &dyn Progress,
    ) -> Result<Result<u64>> {
        let mut total = 0u64;
        let mut piece = first;
        let mut at_end = false;
        loop {
            total += piece.len() as u64;
            let chunks = match file.enc.push(&mut OsRng, piece) {
                Ok(c) => c,
                Err(e) => return Ok(Err(anyhow!("{}: {e}", file.path))),
            };
            self.send_chunks(run, file, chunks, progress).await?;
            if at_end {
                return Ok(Ok(total));
            }
            let n = match read_full(f, buf) {
                Ok(n) => n,
                Err(e) => return Ok(Err(anyhow!("reading {}: {e}", file.path))),
            };
            at_end = n < buf.len();
            piece = &buf[..n];
        }
    }

    /// Seals the files staged by [`Files::backup`] together
    /// ([`Encryptor::push_each`]) and sends them.
    async fn seal_staged(
        &mut self,
        run: &mut Run,
        cat: &mut Catalog,
        staged: &mut Vec<(Backing, Vec<u8>)>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let mut items: Vec<(&mut Encryptor, &[u8])> = staged
            .iter_mut()
            .map(|(file, data)| (&mut file.enc, data.as_slice()))
            .collect();
        let sealed = Encryptor::push_each(&mut OsRng, &mut items);
        match sealed {
            Ok(all) => {
                for ((file, data), chunks) in staged.drain(..).zip(all) {
                    let total = data.len() as u64;
                    drop(data);
                    self.send_chunks(run, &file, chunks, progress).await?;
                    self.file_sealed(run, cat, file, total, progress).await?;
                }
            }
            Err(e) => {
                for (file, _) in staged.drain(..) {
                    let e = anyhow!("{}: {e}", file.path);
                    file_failed(run, file, e, progress);
                }
            }
        }
        Ok(())
    }

    /// Sends the chunks `file`'s encryptor has just sealed.
    async fn send_chunks(
        &mut self,
        run: &mut Run,
        file: &Backing,
        chunks: Vec<Vec<u8>>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let owner = self.id.user_id();
        let ids = file.enc.chunk_ids();
        let blocks: Vec<Block> = ids[ids.len() - chunks.len()..]
            .iter()
            .zip(chunks)
            .map(|(id, sealed)| Block::with_id(owner, sealed, *id))
            .collect();
        for block in blocks {
            self.send_block(run, file.at, block, progress).await?;
        }
        Ok(())
    }

    /// Seals `file`'s final chunk, sends it, and records what the file's
    /// manifest will say once all its blocks are stored.
    async fn file_sealed(
        &mut self,
        run: &mut Run,
        cat: &mut Catalog,
        file: Backing,
        total: u64,
        progress: &dyn Progress,
    ) -> Result<()> {
        let fin = file.enc.finish(&mut OsRng);
        let last_id = *fin.chunk_ids.last().expect("a file has a final chunk");
        let last = Block::with_id(self.id.user_id(), fin.last_chunk, last_id);
        let meta = FileMeta {
            path: file.path,
            size: total,
            mtime_ms: file.mtime_ms,
            mode: file.mode,
            chunks: fin.chunk_ids,
        };
        run.files[file.at].size = total;
        run.files[file.at].sealed = Some((file.key, meta));
        self.send_block(run, file.at, last, progress).await?;
        if run.done_ops.len() >= LOG_FLUSH_OPS {
            let ops = std::mem::take(&mut run.done_ops);
            self.append(cat, ops).await?;
        }
        Ok(())
    }

    async fn send_block(
        &mut self,
        run: &mut Run,
        at: usize,
        block: Block,
        progress: &dyn Progress,
    ) -> Result<()> {
        let len = block.data().len() as u64;
        while self.c.in_flight() >= WINDOW
            || (run.inflight_bytes + len > WINDOW_BYTES && self.c.in_flight() > 0)
        {
            let (id, r) = self.c.next_answer().await?;
            self.on_backup_answer(run, id, r, progress).await?;
        }
        run.files[at].blocks_left += 1;
        run.inflight_bytes += len;
        let id = self.c.submit(ClientOp::Put(Item::Block(block))).await?;
        run.calls.insert(id, CallFor::Block(at, len));
        Ok(())
    }

    async fn on_backup_answer(
        &mut self,
        run: &mut Run,
        id: u64,
        r: GateReply,
        progress: &dyn Progress,
    ) -> Result<()> {
        let Some(what) = run.calls.remove(&id) else {
            return Ok(());
        };
        let ok = put_result(r);
        match what {
            CallFor::Block(at, len) => {
                run.inflight_bytes -= len;
                let f = &mut run.files[at];
                f.blocks_left -= 1;
                if let Err(e) = ok {
                    if !f.failed {
                        progress.note(&format!("failed {}: {e:#}", f.path));
                        run.report.failed.push((f.path.clone(), format!("{e:#}")));
                        f.failed = true;
                    }
                    return Ok(());
                }
                if f.blocks_left == 0 && !f.failed && f.sealed.is_some() {
                    run.ready.push(at);
                    run.ready_bytes += f.size;
                    if run.ready.len() >= MANIFEST_BATCH || run.ready_bytes >= MANIFEST_WAIT_BYTES {
                        self.send_manifests(run, progress).await?;
                    }
                }
            }
            CallFor::Manifest(at) => {
                let f = &mut run.files[at];
                match ok {
                    Ok(()) => {
                        run.report.files_stored += 1;
                        run.report.bytes_stored += f.size;
                        progress.bytes(f.size);
                        run.done_ops.push(LogOp::Put {
                            path: f.path.clone(),
                            file_id: f.file_id,
                            size: f.size,
                            mtime_ms: f.mtime_ms,
                        });
                    }
                    Err(e) => {
                        progress.note(&format!("failed {}: {e:#}", f.path));
                        run.report.failed.push((f.path.clone(), format!("{e:#}")));
                        f.failed = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the manifests of the files in [`Run::ready`], signed together,
    /// and sends them.
    async fn send_manifests(&mut self, run: &mut Run, progress: &dyn Progress) -> Result<()> {
        let ready = std::mem::take(&mut run.ready);
        run.ready_bytes = 0;
        let sealed: Vec<(usize, FileKey, FileMeta)> = ready
            .into_iter()
            .filter_map(|at| {
                let (key, meta) = run.files[at].sealed.take()?;
                Some((at, key, meta))
            })
            .collect();
        let files: Vec<(FileId, &FileKey, &FileMeta)> = sealed
            .iter()
            .map(|(at, key, meta)| (run.files[*at].file_id, key, meta))
            .collect();
        let manifests = filecrypt::new_file_manifests(&mut OsRng, &self.id, &files, 1);
        for ((at, _, _), m) in sealed.iter().zip(manifests) {
            match m {
                Ok(m) => {
                    let item = Item::Record(Box::new(Record::Manifest(m)));
                    let id = self.c.submit(ClientOp::Put(item)).await?;
                    run.calls.insert(id, CallFor::Manifest(*at));
                }
                // Its metadata too large for a manifest (a path near the
                // size limit): that file alone fails.
                Err(e) => {
                    let f = &mut run.files[*at];
                    progress.note(&format!("failed {}: {e}", f.path));
                    run.report.failed.push((f.path.clone(), format!("{e}")));
                    f.failed = true;
                }
            }
        }
        Ok(())
    }

    /// A manifest by position, opened for this user.
    async fn open(&mut self, at: Id) -> Result<Opened> {
        let item = self.get(at).await?;
        self.open_item(item)
    }

    /// A fetched manifest, verified and opened for this user.
    fn open_item(&self, item: Option<Item>) -> Result<Opened> {
        let m = match item {
            Some(Item::Record(r)) => match *r {
                Record::Manifest(m) => m,
                _ => bail!("not a file manifest"),
            },
            Some(_) => bail!("not a file manifest"),
            None => bail!("the ring has no such file (was it removed?)"),
        };
        let (key, meta) = filecrypt::open_manifest(&mut OsRng, &self.id, &m, self.min_bits)
            .map_err(|e| anyhow!("{e}"))?;
        Ok((m, key, meta))
    }

    fn own_manifest(&self, file_id: &FileId) -> Id {
        record::manifest_position(self.id.user_id(), file_id)
    }

    /// Restores every catalog file at or under `path` into `dest`:
    /// `dest/<path relative to the parent of path>`, so restoring
    /// `/home/a/docs` to `/tmp/r` gives `/tmp/r/docs/...`.
    pub async fn restore(
        &mut self,
        path: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<RestoreReport> {
        let cat = self.catalog().await?;
        let path = &cat.resolve(path);
        let chosen = cat.pick(path)?;
        let base = Path::new(path.trim_end_matches('/'))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut report = RestoreReport::default();
        let fail = |report: &mut RestoreReport, p: &str, err: anyhow::Error| {
            progress.note(&format!("failed {p}: {err:#}"));
            report.failed.push((p.to_string(), format!("{err:#}")));
        };
        let tally = |report: &mut RestoreReport, i: usize, r: Result<u64>| match r {
            Ok(n) => {
                report.files += 1;
                report.bytes += n;
            }
            Err(err) => fail(report, &chosen[i].0, err),
        };
        let targets: Vec<PathBuf> = chosen
            .iter()
            .map(|(p, _)| {
                let rel = Path::new(p).strip_prefix(&base).unwrap_or(Path::new(p));
                dest.join(rel.strip_prefix("/").unwrap_or(rel))
            })
            .collect();
        // Small one-chunk files streamed (see restore_small); the larger
        // ones a batch at a time as their manifests come in, their chunks
        // in one window across the files.
        let mut next = 0;
        while next < chosen.len() {
            let (mut small, large, after) = self
                .restore_small(&chosen, &targets, next, progress)
                .await?;
            next = after;
            small.sort_by_key(|(i, _)| *i);
            for (i, r) in small {
                tally(&mut report, i, r);
            }
            let (at, rest): (Vec<usize>, Vec<(PathBuf, Opened)>) = large
                .into_iter()
                .map(|(i, o)| (i, (targets[i].clone(), o)))
                .unzip();
            let results = self.restore_many(rest, progress).await?;
            for (i, r) in at.into_iter().zip(results) {
                tally(&mut report, i, r);
            }
        }
        Ok(report)
    }

    /// Restores the small one-chunk files among `files` from `first` on
    /// (each to the target at the same place in `targets`) with one
    /// window of gets across them all: a file's chunk is asked for as soon
    /// as its manifest arrives, while the next files' manifests are in
    /// flight, and the chunks are decrypted, checked and written on a
    /// thread of their own ([`write_small`]), which puts them in place
    /// [`RESTORE_GROUP`] at a time. (A group's manifests, then its chunks,
    /// then its writes, each waiting for the last, left the nodes idle
    /// while the client wrote and the other way round.) It stops asking
    /// for manifests once [`RESTORE_GROUP`] larger files are opened, which
    /// it hands back for [`Files::restore_many`] with the index to go on
    /// from. The small files' results come by index into `files`. An error
    /// of the connection ends it all, once what was fetched is in place.
    async fn restore_small(
        &mut self,
        files: &[(String, Entry)],
        targets: &[PathBuf],
        first: usize,
        progress: &dyn Progress,
    ) -> Result<(Vec<(usize, Result<u64>)>, Vec<(usize, Opened)>, usize)> {
        let (tx, rx) = tokio::sync::mpsc::channel(SMALL_WRITE_QUEUE);
        let (news_tx, mut news) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::task::spawn_blocking(move || write_small(rx, news_tx));
        let mut out = Fed::default();
        let fed = self
            .feed_small(files, targets, first, &tx, &mut out, || {
                while let Ok(n) = news.try_recv() {
                    progress.bytes(n);
                }
            })
            .await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| anyhow!("the restore's writer failed: {e}"))?;
        while let Ok(n) = news.try_recv() {
            progress.bytes(n);
        }
        let next = fed?;
        out.done.extend(written);
        Ok((out.done, out.large, next))
    }

    /// The network side of [`Files::restore_small`]: fetches manifests
    /// and chunks and hands each small file's chunk to the writer on `tx`.
    /// Files that fail before that, and larger files, opened, go in `out`.
    /// Returns the index of the first file not asked for.
    async fn feed_small(
        &mut self,
        files: &[(String, Entry)],
        targets: &[PathBuf],
        first: usize,
        tx: &tokio::sync::mpsc::Sender<SmallFile>,
        out: &mut Fed,
        mut news: impl FnMut(),
    ) -> Result<usize> {
        enum Want {
            Manifest(usize),
            Chunk(usize, Box<Opened>),
        }
        let mut calls: HashMap<u64, Want> = HashMap::new();
        let mut next = first;
        while next < files.len() && out.large.len() < RESTORE_GROUP || !calls.is_empty() {
            // Every manifest answered frees the slot its chunk's get takes.
            // Larger files wait, opened, for restore_many: at most a group
            // and the window's worth.
            while next < files.len()
                && out.large.len() < RESTORE_GROUP
                && self.c.in_flight() < WINDOW
            {
                let at = self.own_manifest(&files[next].1.file_id);
                let id = self.c.submit(ClientOp::Get(at)).await?;
                calls.insert(id, Want::Manifest(next));
                next += 1;
            }
            let (id, r) = self.c.next_answer().await?;
            match calls.remove(&id) {
                None => {}
                Some(Want::Manifest(i)) => match get_result(r).and_then(|m| self.open_item(m)) {
                    Ok(o) if o.2.chunks.len() == 1 && o.2.size <= GROUP_FILE_BYTES => {
                        let at = filecrypt_block_position(&o.2.chunks[0]);
                        let id = self.c.submit(ClientOp::Get(at)).await?;
                        calls.insert(id, Want::Chunk(i, Box::new(o)));
                    }
                    Ok(o) => out.large.push((i, o)),
                    Err(err) => out.done.push((i, Err(err))),
                },
                Some(Want::Chunk(i, opened)) => {
                    let chunk = get_result(r).and_then(block_data);
                    let file = SmallFile {
                        at: i,
                        target: targets[i].clone(),
                        opened,
                        chunk,
                    };
                    if tx.send(file).await.is_err() {
                        bail!("the restore's writer stopped");
                    }
                }
            }
            news();
        }
        Ok(next)
    }

    /// Restores opened files, each to its target, with one window of chunk
    /// gets across them: a file's chunks are written in order, and the
    /// next files' are asked for while this one's arrive (one file at a
    /// time cost a round trip or more per file). At most
    /// [`RESTORE_CHUNKS_IN_FLIGHT`] chunks are asked for and not yet handed to the
    /// writer, and [`WRITE_QUEUE`] more wait for it. One result per file,
    /// in order; an error of the connection ends it all, once the files
    /// written whole are in place.
    ///
    /// Decrypting, checking and writing run on threads of their own
    /// ([`write_chunks`]): on this task they took more than half of a
    /// restore's time, during which no answer was read off the network.
    async fn restore_many(
        &mut self,
        files: Vec<(PathBuf, Opened)>,
        progress: &dyn Progress,
    ) -> Result<Vec<Result<u64>>> {
        let seq: Vec<Id> = files
            .iter()
            .flat_map(|(_, (_, _, meta))| meta.chunks.iter().map(filecrypt_block_position))
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
        let (news_tx, mut news) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::task::spawn_blocking(move || write_chunks(files, rx, news_tx));
        self.c.set_low_water(Some(RESTORE_CHUNKS_IN_FLIGHT / 2));
        let fetched = self.fetch_chunks(&seq, tx, &mut news, progress).await;
        self.c.set_low_water(None);
        let results = writer
            .await
            .map_err(|e| anyhow!("the restore's writer failed: {e}"))?;
        // Files written whole go in place even if the connection failed
        // (their temporary files were left behind before).
        let results = commit_files(results);
        fetched?;
        while let Ok(n) = news.try_recv() {
            progress.bytes(n);
        }
        Ok(results)
    }

    /// The network side of [`Files::restore_many`]: gets the chunks at
    /// `seq` and hands them to the writer on `tx` in order.
    async fn fetch_chunks(
        &mut self,
        seq: &[Id],
        tx: tokio::sync::mpsc::Sender<Result<Vec<u8>>>,
        news: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let mut by_call: HashMap<u64, usize> = HashMap::new();
        let mut ready: BTreeMap<usize, Result<Vec<u8>>> = BTreeMap::new();
        let (mut next_send, mut next_write) = (0usize, 0usize);
        let mut sent = Ok(());
        while next_write < seq.len() && sent.is_ok() {
            while next_send < seq.len()
                && next_send - next_write < RESTORE_CHUNKS_IN_FLIGHT
                && self.c.in_flight() < WINDOW
            {
                let id = self.c.submit(ClientOp::Get(seq[next_send])).await?;
                by_call.insert(id, next_send);
                next_send += 1;
            }
            let (id, r) = self.c.next_answer().await?;
            let Some(i) = by_call.remove(&id) else {
                continue;
            };
            ready.insert(i, get_result(r).and_then(block_data));
            while let Some(data) = ready.remove(&next_write) {
                next_write += 1;
                if tx.send(data).await.is_err() {
                    sent = Err(anyhow!("the restore's writer stopped"));
                    break;
                }
            }
            while let Ok(n) = news.try_recv() {
                progress.bytes(n);
            }
        }
        sent
    }

    /// Fetches the manifests of a group of our files together and opens
    /// each; one result per file, in order.
    async fn open_group(&mut self, group: &[(String, Entry)]) -> Result<Vec<Result<Opened>>> {
        let positions: Vec<Id> = group
            .iter()
            .map(|(_, e)| self.own_manifest(&e.file_id))
            .collect();
        Ok(self
            .get_many(&positions)
            .await?
            .into_iter()
            .map(|item| item.and_then(|i| self.open_item(i)))
            .collect())
    }

    /// Stores new manifest versions together; each result in order.
    async fn put_manifests(&mut self, ms: Vec<Manifest>) -> Result<Vec<Result<()>>> {
        let items = ms
            .into_iter()
            .map(|m| Item::Record(Box::new(Record::Manifest(m))))
            .collect();
        self.put_many(items).await
    }

    /// Puts several small items at once (a window in flight); each result
    /// in the order given.
    async fn put_many(&mut self, items: Vec<Item>) -> Result<Vec<Result<()>>> {
        let ops = items.into_iter().map(ClientOp::Put).collect();
        Ok(self
            .call_many(ops)
            .await?
            .into_iter()
            .map(|r| r.and_then(put_result))
            .collect())
    }

    /// Gets several items at once (a window in flight); each answer in
    /// the order asked.
    async fn get_many(&mut self, keys: &[Id]) -> Result<Vec<Result<Option<Item>>>> {
        let ops = keys.iter().map(|k| ClientOp::Get(*k)).collect();
        Ok(self
            .call_many(ops)
            .await?
            .into_iter()
            .map(|r| r.and_then(get_result))
            .collect())
    }

    /// Sends `ops` with a window in flight; each reply in the order given.
    async fn call_many(&mut self, ops: Vec<ClientOp>) -> Result<Vec<Result<GateReply>>> {
        let mut out: Vec<Option<GateReply>> = ops.iter().map(|_| None).collect();
        let mut by_call: HashMap<u64, usize> = HashMap::new();
        let mut ops = ops.into_iter().enumerate().peekable();
        while ops.peek().is_some() || !by_call.is_empty() {
            while self.c.in_flight() < WINDOW {
                let Some((i, op)) = ops.next() else {
                    break;
                };
                let id = self.c.submit(op).await?;
                by_call.insert(id, i);
            }
            let (id, r) = self.c.next_answer().await?;
            if let Some(i) = by_call.remove(&id) {
                out[i] = Some(r);
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.ok_or_else(|| anyhow!("no answer")))
            .collect())
    }

    /// Restores a file someone shared (`OWNER:FILE` as `share` printed)
    /// to `dest` (or into it, if it is a directory).
    pub async fn restore_shared(
        &mut self,
        link: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<RestoreReport> {
        let at = parse_link(link)?;
        let target = if dest.is_dir() {
            let (_, _, meta) = self.open(at).await?;
            let name = Path::new(&meta.path)
                .file_name()
                .map(|n| n.to_os_string())
                .unwrap_or_else(|| "shared-file".into());
            dest.join(name)
        } else {
            dest.to_path_buf()
        };
        let n = self.restore_file(at, &target, progress).await?;
        Ok(RestoreReport {
            files: 1,
            bytes: n,
            failed: Vec::new(),
        })
    }

    /// Fetches, verifies and writes one file; returns its size.
    async fn restore_file(
        &mut self,
        at: Id,
        target: &Path,
        progress: &dyn Progress,
    ) -> Result<u64> {
        let opened = self.open(at).await?;
        let mut r = self
            .restore_many(vec![(target.to_path_buf(), opened)], progress)
            .await?;
        r.pop().expect("one file asked, one result")
    }

    /// Removes every catalog file at or under `path`: the log forgets them
    /// and their blocks get owner-signed tombstones (replicas drop them).
    pub async fn rm(&mut self, path: &str) -> Result<u64> {
        let mut cat = self.catalog().await?;
        let path = &cat.resolve(path);
        let chosen = cat.pick(path)?;
        let ops = chosen
            .iter()
            .map(|(p, _)| LogOp::Rm { path: p.clone() })
            .collect();
        self.append(&mut cat, ops).await?;
        // A group of files at a time: their manifests fetched together,
        // then all their blocks' tombstones signed in one batch.
        for group in chosen.chunks(RESTORE_GROUP) {
            let mut chunks: Vec<BlockId> = Vec::new();
            // A manifest that cannot be read leaves its blocks behind (as it
            // always did); the file is gone from the list either way.
            for (_, _, meta) in self.open_group(group).await?.into_iter().flatten() {
                chunks.extend(meta.chunks);
            }
            self.tombstone(&chunks).await?;
        }
        Ok(chosen.len() as u64)
    }

    async fn tombstone(&mut self, chunks: &[BlockId]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        for t in Tombstone::new_batch(&mut OsRng, self.id.signer(), chunks) {
            while self.c.in_flight() >= WINDOW {
                let (_, r) = self.c.next_answer().await?;
                put_result(r)?;
            }
            self.c.submit(ClientOp::Put(Item::Tombstone(t))).await?;
        }
        while self.c.in_flight() > 0 {
            let (_, r) = self.c.next_answer().await?;
            put_result(r)?;
        }
        Ok(())
    }

    /// Lets `reader` read every file at or under `path`; returns the links
    /// (`OWNER:FILE`) the reader restores them by.
    pub async fn share(&mut self, path: &str, reader: UserId) -> Result<Vec<(String, String)>> {
        let cat = self.catalog().await?;
        let path = &cat.resolve(path);
        let chosen = cat.pick(path)?;
        let rec = self.pubkey(reader).await?;
        let mut links = Vec::new();
        // A group of files at a time: their manifests fetched together,
        // the new versions signed in one batch and stored together.
        for group in chosen.chunks(RESTORE_GROUP) {
            let mut ms = Vec::with_capacity(group.len());
            for ((p, _), item) in group.iter().zip(self.open_group(group).await?) {
                let (m, _, _) = item.with_context(|| format!("sharing {p}"))?;
                ms.push(m);
            }
            let shared = filecrypt::share_many(&mut OsRng, &self.id, &ms, &rec, self.min_bits)
                .map_err(|e| anyhow!("sharing under {path}: {e}"))?;
            for ((p, e), r) in group.iter().zip(self.put_manifests(shared).await?) {
                r.with_context(|| format!("sharing {p}"))?;
                links.push((p.clone(), link(self.id.user_id(), &e.file_id)));
            }
        }
        Ok(links)
    }

    /// Takes `user`'s access away from every file at or under `path`: each
    /// file gets a new key, its content is re-encrypted, a new manifest
    /// without them is stored, and the old blocks are deleted. A group of
    /// files at a time: manifests fetched together, small files' chunks
    /// fetched and stored together, the new versions signed in one batch,
    /// the old chunks' tombstones in another.
    pub async fn revoke(&mut self, path: &str, user: UserId) -> Result<u64> {
        let cat = self.catalog().await?;
        let path = &cat.resolve(path);
        let chosen = cat.pick(path)?;
        let me = self.id.user_id();
        let mut pubkeys: HashMap<UserId, PubKeyRecord> = HashMap::new();
        let mut count = 0;
        for group in chosen.chunks(RESTORE_GROUP) {
            let mut listed: Vec<(String, Opened)> = Vec::new();
            for ((p, _), item) in group.iter().zip(self.open_group(group).await?) {
                let (m, key, meta) = item.with_context(|| format!("revoking on {p}"))?;
                if m.acl.reader(&user).is_some() || m.acl.allows_writer(&user) {
                    listed.push((p.clone(), (m, key, meta)));
                }
            }
            if listed.is_empty() {
                continue;
            }
            // Every file's content under a new key.
            let small: Vec<usize> = (0..listed.len())
                .filter(|&i| {
                    let meta = &listed[i].1 .2;
                    meta.chunks.len() == 1 && meta.size <= GROUP_FILE_BYTES
                })
                .collect();
            let at: Vec<Id> = small
                .iter()
                .map(|&i| filecrypt_block_position(&listed[i].1 .2.chunks[0]))
                .collect();
            let mut fetched: HashMap<usize, Vec<u8>> = HashMap::new();
            for (&i, r) in small.iter().zip(self.get_many(&at).await?) {
                let data = r
                    .and_then(block_data)
                    .with_context(|| format!("{}: cannot re-encrypt", listed[i].0))?;
                fetched.insert(i, data);
            }
            let mut new_keys = Vec::with_capacity(listed.len());
            let mut new_metas = Vec::with_capacity(listed.len());
            let mut blocks: Vec<Item> = Vec::new();
            for (i, (p, (m, old_key, meta))) in listed.iter().enumerate() {
                let new_key = FileKey::generate(&mut OsRng);
                let mut rk = Rekeyer::new(old_key, &new_key, m.file_id, meta);
                if let Some(data) = fetched.remove(&i) {
                    // A small file's one chunk, fetched with its group.
                    for sealed in rk
                        .push(&mut OsRng, &data)
                        .map_err(|e| anyhow!("{p}: {e}"))?
                    {
                        self.put(Item::Block(Block::new(me, sealed))).await?;
                    }
                } else {
                    // A large file: its chunks a group at a time, each group
                    // fetched and stored with a window in flight (memory
                    // stays flat: two groups of chunks at most).
                    for group in meta.chunks.chunks(REKEY_CHUNKS) {
                        let at: Vec<Id> = group.iter().map(filecrypt_block_position).collect();
                        let mut sealed_blocks = Vec::with_capacity(group.len());
                        for r in self.get_many(&at).await? {
                            let data = r
                                .and_then(block_data)
                                .with_context(|| format!("{p}: cannot re-encrypt"))?;
                            for sealed in rk
                                .push(&mut OsRng, &data)
                                .map_err(|e| anyhow!("{p}: {e}"))?
                            {
                                sealed_blocks.push(Item::Block(Block::new(me, sealed)));
                            }
                        }
                        for r in self.put_many(sealed_blocks).await? {
                            r.with_context(|| format!("re-encrypting {p}"))?;
                        }
                    }
                }
                let fin = rk.finish(&mut OsRng).map_err(|e| anyhow!("{p}: {e}"))?;
                blocks.push(Item::Block(Block::new(me, fin.last_chunk)));
                new_keys.push(new_key);
                new_metas.push(FileMeta {
                    chunks: fin.chunk_ids,
                    ..meta.clone()
                });
            }
            for ((p, _), r) in listed.iter().zip(self.put_many(blocks).await?) {
                r.with_context(|| format!("re-encrypting {p}"))?;
            }
            // The readers who stay get the new keys.
            for (_, (m, _, _)) in &listed {
                for r in &m.acl.readers {
                    if r.user != user && r.user != me && !pubkeys.contains_key(&r.user) {
                        let rec = self.pubkey(r.user).await?;
                        pubkeys.insert(r.user, rec);
                    }
                }
            }
            let remaining: Vec<PubKeyRecord> = pubkeys.values().cloned().collect();
            let batch: Vec<filecrypt::Rekeyed<'_>> = listed
                .iter()
                .zip(new_keys.iter().zip(&new_metas))
                .map(|((_, (m, _, _)), (k, meta))| (m, k, meta))
                .collect();
            let revoked = filecrypt::revoke_many(
                &mut OsRng,
                &self.id,
                &batch,
                &user,
                &remaining,
                self.min_bits,
            )
            .map_err(|e| anyhow!("revoking under {path}: {e}"))?;
            for ((p, _), r) in listed.iter().zip(self.put_manifests(revoked).await?) {
                r.with_context(|| format!("revoking on {p}"))?;
            }
            let old: Vec<BlockId> = listed
                .iter()
                .flat_map(|(_, (_, _, meta))| meta.chunks.iter().copied())
                .collect();
            self.tombstone(&old).await?;
            count += listed.len() as u64;
        }
        Ok(count)
    }
}

/// A manifest opened for this user: the manifest, the file key, the
/// metadata.
type Opened = (Manifest, FileKey, FileMeta);

/// Files whose manifests a restore fetches together.
const RESTORE_GROUP: usize = 64;

/// Chunks waiting for a restore's writer at most.
const WRITE_QUEUE: usize = 4;

/// Small files waiting for a restore's writer at most (each at most
/// [`GROUP_FILE_BYTES`]).
const SMALL_WRITE_QUEUE: usize = 64;

/// What [`Files::restore_small`] found before the writer: files that
/// failed, with their places, and larger files, opened.
#[derive(Default)]
struct Fed {
    done: Vec<(usize, Result<u64>)>,
    large: Vec<(usize, Opened)>,
}

/// A small file's chunk, fetched, for [`write_small`].
struct SmallFile {
    /// Its place among the files restored.
    at: usize,
    target: PathBuf,
    opened: Box<Opened>,
    chunk: Result<Vec<u8>>,
}

/// A restore's writer for small one-chunk files: each is decrypted,
/// checked and written to a temporary file as it arrives, and put in place
/// with [`commit_files`] [`RESTORE_GROUP`] at a time and when the input
/// ends. The plaintext bytes written go out on `news`. One result per
/// file, with its place.
fn write_small(
    mut files: tokio::sync::mpsc::Receiver<SmallFile>,
    news: tokio::sync::mpsc::UnboundedSender<u64>,
) -> Vec<(usize, Result<u64>)> {
    let mut results = Vec::new();
    let mut batch: Vec<(usize, Result<Finished>)> = Vec::new();
    let commit = |batch: &mut Vec<(usize, Result<Finished>)>, results: &mut Vec<_>| {
        let (at, done): (Vec<usize>, Vec<Result<Finished>>) = batch.drain(..).unzip();
        results.extend(at.into_iter().zip(commit_files(done)));
    };
    while let Some(f) = files.blocking_recv() {
        let (m, key, meta) = *f.opened;
        let finished = f.chunk.and_then(|c| {
            write_file(&f.target, &meta, |out| {
                let mut dec = Decryptor::for_meta(&key, m.file_id, &meta);
                let plain = dec.push(&c).map_err(|e| anyhow!("{e}"))?;
                out.write_all(&plain)?;
                dec.finish().map_err(|e| anyhow!("{e}"))?;
                let _ = news.send(plain.len() as u64);
                Ok(())
            })
        });
        batch.push((f.at, finished));
        if batch.len() >= RESTORE_GROUP {
            commit(&mut batch, &mut results);
        }
    }
    commit(&mut batch, &mut results);
    results
}

/// A restore's writer: the chunks of `files` arrive on `chunks` in order
/// (every chunk of the first file, then of the next); each is checked and
/// decrypted here and written to its file's temporary file by a thread of
/// its own ([`write_plain`]), so that the checks go on while a file's
/// direct write waits for the device (2 to 3 ms a megabyte here: a
/// restore of 1 MiB files, one write each, left the other core idle a
/// fifth of the time). The plaintext bytes written go out on `news` as
/// they are. One result per file; a file whose chunks never all came (the
/// restore stopped) gets an error.
fn write_chunks(
    files: Vec<(PathBuf, Opened)>,
    mut chunks: tokio::sync::mpsc::Receiver<Result<Vec<u8>>>,
    news: tokio::sync::mpsc::UnboundedSender<u64>,
) -> Vec<Result<Finished>> {
    let targets: Vec<(PathBuf, FileMeta)> = files
        .iter()
        .map(|(t, (_, _, meta))| (t.clone(), meta.clone()))
        .collect();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(PLAIN_QUEUE);
    let writer = std::thread::Builder::new()
        .name("restore-write".into())
        .spawn(move || write_plain(&targets, rx, news));
    let writer = match writer {
        Ok(w) => w,
        Err(e) => {
            let e = format!("cannot start the restore's writing thread: {e}");
            return files.iter().map(|_| Err(anyhow!("{e}"))).collect();
        }
    };
    let mut stopped = false;
    for (at, (_, (m, key, meta))) in files.iter().enumerate() {
        let mut dec = Some(Decryptor::for_meta(key, m.file_id, meta));
        let mut verdict = Ok(());
        for _ in 0..meta.chunks.len() {
            let Some(data) = (!stopped).then(|| chunks.blocking_recv()).flatten() else {
                stopped = true;
                verdict = Err(anyhow!("no answer"));
                break;
            };
            let Some(d) = dec.as_mut() else {
                continue; // this file failed already: skip its other chunks
            };
            match data.and_then(|sealed| d.push(&sealed).map_err(|e| anyhow!("{e}"))) {
                Ok(plain) => {
                    if tx.send(Piece::Plain(at, plain)).is_err() {
                        break; // the writing thread stopped: its results say why
                    }
                }
                Err(e) => {
                    verdict = Err(e);
                    dec = None;
                }
            }
        }
        if let (Ok(()), Some(d)) = (&verdict, dec) {
            verdict = d.finish().map(|_| ()).map_err(|e| anyhow!("{e}"));
        }
        if tx.send(Piece::End(at, verdict)).is_err() {
            break;
        }
    }
    drop(tx);
    let mut results = writer
        .join()
        .unwrap_or_else(|_| vec![Err(anyhow!("the restore's writing thread failed"))]);
    // One result per file, whatever the thread managed.
    results.truncate(files.len());
    while results.len() < files.len() {
        results.push(Err(anyhow!("the restore's writing thread stopped")));
    }
    results
}

/// What the restore's checking side hands its writing thread: a file's
/// next plaintext, or the end of a file with the checks' verdict on it.
enum Piece {
    Plain(usize, Vec<u8>),
    End(usize, Result<()>),
}

/// Decrypted chunks waiting for the restore's writing thread at most.
const PLAIN_QUEUE: usize = 4;

/// The writing side of [`write_chunks`]: writes each file's plaintext
/// into a temporary file beside its target and finishes the file when its
/// verdict is good; deletes it otherwise. One result per file, in order.
fn write_plain(
    targets: &[(PathBuf, FileMeta)],
    pieces: std::sync::mpsc::Receiver<Piece>,
    news: tokio::sync::mpsc::UnboundedSender<u64>,
) -> Vec<Result<Finished>> {
    let mut results: Vec<Result<Finished>> = Vec::with_capacity(targets.len());
    // One buffer for every large file's direct writes, in turn.
    let mut spare = Some(AlignedBuf::new());
    // The file being written: its temporary file and writer, or the error
    // that stopped it.
    let mut open: Option<Result<(PathBuf, DirectWriter)>> = None;
    for piece in pieces {
        match piece {
            Piece::Plain(at, plain) => {
                let (target, meta) = &targets[at];
                let file = open.get_or_insert_with(|| {
                    partial_file(target).map(|(tmp, out)| {
                        let buf = spare.take().unwrap_or_default();
                        (tmp, DirectWriter::new(out, buf, true, meta.size))
                    })
                });
                if let Ok((tmp, out)) = file {
                    match out.write_all(&plain) {
                        Ok(()) => {
                            let _ = news.send(plain.len() as u64);
                        }
                        Err(e) => {
                            let _ = std::fs::remove_file(&*tmp);
                            *file =
                                Err(anyhow!(e)
                                    .context(format!("cannot write {}", target.display())));
                        }
                    }
                }
            }
            Piece::End(at, verdict) => {
                let (target, meta) = &targets[at];
                let outcome = match (open.take(), verdict) {
                    (Some(Err(e)), _) => Err(e),
                    (None, Err(e)) => Err(e),
                    // Checked whole but never handed over (the checking
                    // side stopped when this thread's queue broke).
                    (None, Ok(())) => Err(anyhow!("no data for {}", target.display())),
                    (Some(Ok((tmp, out))), verdict) => match out.finish() {
                        Ok((out, buf, _)) => {
                            spare = Some(buf);
                            finish_file(tmp, out, target, meta, verdict)
                        }
                        Err(e) => {
                            let _ = std::fs::remove_file(&tmp);
                            verdict
                                .and(Err(anyhow!(e)
                                    .context(format!("cannot write {}", target.display()))))
                        }
                    },
                };
                results.push(outcome);
            }
        }
    }
    if let Some(Ok((tmp, out))) = open.take() {
        drop(out);
        let _ = std::fs::remove_file(&tmp);
    }
    results
}

/// Chunks of a large file that `revoke` re-encrypts together: a third of
/// the transfer window, so the fetched and the sealed copies of a group stay
/// well inside it.
const REKEY_CHUNKS: usize = CHUNKS_IN_FLIGHT / 3;

fn block_data(item: Option<Item>) -> Result<Vec<u8>> {
    match item {
        Some(Item::Block(b)) => Ok(b.into_data()),
        Some(Item::Tombstone(_)) => bail!("a chunk of this file was deleted by its owner"),
        _ => bail!("a chunk of this file is missing from the ring"),
    }
}

/// The temporary file a restore writes before it renames it into place.
fn partial_file(target: &Path) -> Result<(PathBuf, File)> {
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = target.with_file_name(format!(".{name}.peerstore-partial"));
    let out = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    Ok((tmp, out))
}

/// A restored file fully written and verified in its temporary file,
/// waiting for [`commit_files`] to make it durable and put it in place.
struct Finished {
    tmp: PathBuf,
    target: PathBuf,
    size: u64,
}

/// Gives a fully written and verified temporary file the file's time and
/// mode; on an error, deletes it.
fn finish_file(
    tmp: PathBuf,
    out: File,
    target: &Path,
    meta: &FileMeta,
    written: Result<()>,
) -> Result<Finished> {
    if let Err(e) = written {
        drop(out);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let mtime = UNIX_EPOCH + std::time::Duration::from_millis(meta.mtime_ms.max(0) as u64);
    let _ = out.set_modified(mtime);
    #[cfg(unix)]
    if meta.mode != 0 {
        use std::os::unix::fs::PermissionsExt;
        let _ = out.set_permissions(std::fs::Permissions::from_mode(meta.mode));
    }
    Ok(Finished {
        tmp,
        target: target.to_path_buf(),
        size: meta.size,
    })
}

/// Makes finished files durable together and renames each into place: on
/// Linux one `syncfs` of each file system they are on (one sync for a
/// group of files instead of one each), elsewhere an fsync of each. If
/// that fails, every file of the group fails; a file that cannot be
/// renamed fails alone. A failed file's temporary file is deleted.
fn commit_files(done: Vec<Result<Finished>>) -> Vec<Result<u64>> {
    let sync = |f: &Finished| {
        #[cfg(target_os = "linux")]
        let r = File::open(&f.tmp).and_then(|h| rustix::fs::syncfs(&h).map_err(Into::into));
        #[cfg(not(target_os = "linux"))]
        let r = File::open(&f.tmp).and_then(|h| h.sync_all());
        r.with_context(|| format!("cannot sync {}", f.target.display()))
    };
    let synced: Result<()> = {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::MetadataExt;
            let mut devices = Vec::new();
            done.iter().flatten().try_for_each(|f| {
                let dev = std::fs::metadata(&f.tmp)
                    .with_context(|| format!("cannot sync {}", f.target.display()))?
                    .dev();
                if devices.contains(&dev) {
                    return Ok(());
                }
                devices.push(dev);
                sync(f)
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            done.iter().flatten().try_for_each(sync)
        }
    };
    done.into_iter()
        .map(|r| {
            let f = r?;
            if let Err(e) = &synced {
                let _ = std::fs::remove_file(&f.tmp);
                bail!("{e:#}");
            }
            if let Err(e) = std::fs::rename(&f.tmp, &f.target) {
                let _ = std::fs::remove_file(&f.tmp);
                return Err(e).with_context(|| format!("cannot write {}", f.target.display()));
            }
            Ok(f.size)
        })
        .collect()
}

/// Writes a file through `fill` with [`partial_file`] and [`finish_file`]
/// (not yet in place: see [`commit_files`]).
fn write_file(
    target: &Path,
    meta: &FileMeta,
    fill: impl FnOnce(&mut File) -> Result<()>,
) -> Result<Finished> {
    let (tmp, mut out) = partial_file(target)?;
    let r = fill(&mut out);
    finish_file(tmp, out, target, meta, r)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn filecrypt_block_position(id: &BlockId) -> Id {
    peerstore_core::store::block_position(id)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `OWNER:FILE` for a shared file.
pub fn link(owner: UserId, file_id: &FileId) -> String {
    format!("{}:{}", hex(&owner.0), hex(file_id))
}

/// The manifest position of a link.
pub fn parse_link(s: &str) -> Result<Id> {
    let (o, f) = s.split_once(':').ok_or_else(|| {
        anyhow!("'{s}' is not a share link (OWNER:FILE, as `peerstore share` prints)")
    })?;
    let owner = unhex::<20>(o).ok_or_else(|| anyhow!("'{o}' is not a user id (40 hex digits)"))?;
    let file = unhex::<32>(f).ok_or_else(|| anyhow!("'{f}' is not a file id (64 hex digits)"))?;
    Ok(record::manifest_position(Id(owner), &file))
}

/// A user named by a public key file or a user id (40 hex digits).
pub fn parse_user(s: &str) -> Result<UserId> {
    if let Some(id) = unhex::<20>(s) {
        return Ok(Id(id));
    }
    let path = PathBuf::from(s);
    if path.exists() {
        let der = crate::keyfile::read_public(&path)?;
        return Ok(record::user_id(&der));
    }
    bail!("'{s}' is neither a user id (40 hex digits, as `peerstore whoami` prints) nor a public key file")
}

/// The ways a typed path may be spelled in the catalog, best first: as
/// typed, absolute with `.` and `..` resolved (against `cwd`), and
/// canonical where it exists on this machine. Empty stays empty (all).
fn path_spellings(typed: &str, cwd: &Path) -> Vec<String> {
    if typed.is_empty() {
        return vec![String::new()];
    }
    let joined = cwd.join(typed);
    let mut out = vec![typed.to_string(), lexical(&joined)];
    if let Ok(c) = joined.canonicalize() {
        out.push(c.to_string_lossy().into_owned());
    }
    out
}

/// `p` with `.` and `..` resolved without touching the file system.
fn lexical(p: &Path) -> String {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out.to_string_lossy().into_owned()
}

/// Now, as Unix-epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_files_go_in_place_together_and_failures_leave_nothing() {
        let dir = tempfile::TempDir::new().unwrap();
        let meta = |size: u64| FileMeta {
            path: String::new(),
            size,
            mtime_ms: 1_600_000_000_000,
            mode: 0o640,
            chunks: Vec::new(),
        };
        let mut done = Vec::new();
        for (name, body) in [("a", &b"alpha"[..]), ("b", b"bravo!")] {
            let target = dir.path().join(name);
            done.push(write_file(&target, &meta(body.len() as u64), |out| {
                out.write_all(body)?;
                Ok(())
            }));
        }
        // Not in place before the commit.
        assert!(!dir.path().join("a").exists());
        // A file whose contents failed, and one whose place is taken by a
        // directory (its rename fails).
        done.push(write_file(&dir.path().join("c"), &meta(1), |_| {
            bail!("a chunk of this file is missing from the ring")
        }));
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d").join("x"), b"keep").unwrap();
        done.push(write_file(&dir.path().join("d"), &meta(4), |out| {
            out.write_all(b"dddd")?;
            Ok(())
        }));
        let r = commit_files(done);
        assert_eq!(r[0].as_ref().unwrap(), &5);
        assert_eq!(r[1].as_ref().unwrap(), &6);
        assert!(format!("{:#}", r[2].as_ref().unwrap_err()).contains("missing from the ring"));
        assert!(format!("{:#}", r[3].as_ref().unwrap_err()).contains("cannot write"));
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"alpha");
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b"bravo!");
        let m = std::fs::metadata(dir.path().join("b")).unwrap();
        assert_eq!(
            m.modified().unwrap(),
            UNIX_EPOCH + std::time::Duration::from_millis(1_600_000_000_000)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(m.permissions().mode() & 0o777, 0o640);
        }
        // Only the results are left: no temporary file, the directory untouched.
        let names = names_in(dir.path());
        assert_eq!(names, ["a", "b", "d"]);
        assert_eq!(
            std::fs::read(dir.path().join("d").join("x")).unwrap(),
            b"keep"
        );
        assert!(commit_files(Vec::new()).is_empty());
    }

    /// A file of `len` bytes sealed under a fresh key: what restore opens,
    /// and its sealed chunks.
    fn sealed_file(len: usize, seed: u8) -> (Opened, Vec<Vec<u8>>, Vec<u8>) {
        let plain: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let key = FileKey::generate(&mut OsRng);
        let file_id = [seed; 32];
        let mut enc = Encryptor::new(&key, file_id);
        let mut chunks = enc.push(&mut OsRng, &plain).unwrap();
        let fin = enc.finish(&mut OsRng);
        chunks.push(fin.last_chunk);
        let meta = FileMeta {
            path: String::new(),
            size: fin.size,
            mtime_ms: 1_600_000_000_000,
            mode: 0o600,
            chunks: fin.chunk_ids,
        };
        let m = Manifest {
            owner_key: Vec::new(),
            file_id,
            acl: record::Acl {
                epoch: 0,
                writers: Vec::new(),
                readers: Vec::new(),
                sig: Vec::new(),
            },
            version: record::Version {
                clock: 0,
                writer: Id([0; 20]),
            },
            signer_key: Vec::new(),
            body: Vec::new(),
            sig: Vec::new(),
        };
        ((m, key, meta), chunks, plain)
    }

    /// A closed queue holding `chunks`, as a restore's writer takes them.
    fn chunk_queue(
        chunks: impl Iterator<Item = Vec<u8>>,
    ) -> tokio::sync::mpsc::Receiver<Result<Vec<u8>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        for chunk in chunks {
            tx.try_send(Ok(chunk)).unwrap();
        }
        rx
    }

    /// The names in `dir`, sorted.
    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_file_the_restore_cannot_create_fails_alone() {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(dir.path().join("not-a-dir"), b"x").unwrap();
        let (a, a_chunks, _) = sealed_file(CHUNK_BYTES + 3, 11);
        let (b, b_chunks, b_plain) = sealed_file(CHUNK_BYTES + 5, 13);
        let files = vec![
            (dir.path().join("not-a-dir").join("a"), a),
            (dir.path().join("b"), b),
        ];
        let rx = chunk_queue(a_chunks.into_iter().chain(b_chunks));
        let (news_tx, _news) = tokio::sync::mpsc::unbounded_channel();
        let r = commit_files(write_chunks(files, rx, news_tx));
        let err = format!("{:#}", r[0].as_ref().unwrap_err());
        assert!(err.contains("cannot create"), "{err}");
        assert_eq!(*r[1].as_ref().unwrap(), b_plain.len() as u64);
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), b_plain);
        assert_eq!(names_in(dir.path()), ["b", "not-a-dir"]);
    }

    #[test]
    fn the_restore_writer_writes_good_files_and_leaves_nothing_of_bad_ones() {
        let dir = tempfile::TempDir::new().unwrap();
        let (a, a_chunks, a_plain) = sealed_file(CHUNK_BYTES * 2 + 5, 3);
        let (b, mut b_chunks, _) = sealed_file(CHUNK_BYTES + 7, 5);
        let (c, c_chunks, c_plain) = sealed_file(10, 7);
        let (d, d_chunks, _) = sealed_file(CHUNK_BYTES + 9, 9);
        assert_eq!(a_chunks.len(), 3);
        // b's first chunk tampered with; d's last never arrives.
        b_chunks[0][40] ^= 1;
        let target = |n: &str| dir.path().join(n);
        let files = vec![
            (target("a"), a),
            (target("b"), b),
            (target("c"), c),
            (target("d"), d),
        ];
        let all = a_chunks.into_iter().chain(b_chunks).chain(c_chunks);
        let rx = chunk_queue(all.chain(d_chunks.into_iter().take(1)));
        let (news_tx, mut news) = tokio::sync::mpsc::unbounded_channel();
        let r = write_chunks(files, rx, news_tx);
        assert_eq!(r.len(), 4);
        let mut shown = 0;
        while let Ok(n) = news.try_recv() {
            shown += n;
        }
        let r = commit_files(r);
        assert_eq!(*r[0].as_ref().unwrap(), a_plain.len() as u64);
        assert!(r[1].is_err(), "a tampered chunk fails its file");
        assert_eq!(*r[2].as_ref().unwrap(), 10);
        assert!(r[3].is_err(), "a file missing its last chunk fails");
        assert_eq!(std::fs::read(target("a")).unwrap(), a_plain);
        assert_eq!(std::fs::read(target("c")).unwrap(), c_plain);
        // Progress counted what was written, d's first chunk included.
        assert_eq!(shown, (a_plain.len() + 10 + CHUNK_BYTES) as u64);
        // Nothing else is left: no temporary files, no b, no d.
        assert_eq!(names_in(dir.path()), ["a", "c"]);
    }

    #[test]
    fn the_catalog_follows_puts_and_removes_and_prefixes_mean_directories() {
        let mut c = Catalog::default();
        let put = |p: &str, n: u8| LogOp::Put {
            path: p.into(),
            file_id: [n; 32],
            size: u64::from(n),
            mtime_ms: 0,
        };
        c.apply(put("/a/x", 1));
        c.apply(put("/a/y", 2));
        c.apply(put("/ab/z", 3));
        c.apply(put("/a/x", 4));
        assert_eq!(c.files["/a/x"].size, 4, "a later put wins");
        let under: Vec<&String> = c.under("/a").into_iter().map(|(p, _)| p).collect();
        assert_eq!(under, vec!["/a/x", "/a/y"], "/ab is not under /a");
        assert_eq!(c.under("/a/y").len(), 1);
        assert_eq!(c.under("").len(), 3);
        assert_eq!(c.under("/").len(), 3);
        c.apply(LogOp::Rm {
            path: "/a/x".into(),
        });
        assert_eq!(c.under("/a").len(), 1);
    }

    #[test]
    fn typed_paths_resolve_against_the_current_directory() {
        let cwd = Path::new("/home/me/work");
        assert_eq!(path_spellings("", cwd), vec![String::new()]);
        let s = path_spellings("data/./big/../large/", cwd);
        assert_eq!(s[0], "data/./big/../large/");
        assert_eq!(s[1], "/home/me/work/data/large");
        assert_eq!(path_spellings("../../../..", cwd)[1], "/");
        assert_eq!(path_spellings("/abs/x", cwd)[1], "/abs/x");
        // Where the path exists, its canonical spelling is a candidate.
        let dir = tempfile::TempDir::new().unwrap();
        let real = dir.path().canonicalize().unwrap();
        let s = path_spellings(".", &real);
        assert_eq!(s.last().unwrap(), &real.to_string_lossy().into_owned());

        let mut c = Catalog::default();
        let at = format!("{}/docs/a.txt", real.display());
        c.apply(LogOp::Put {
            path: at.clone(),
            file_id: [1; 32],
            size: 1,
            mtime_ms: 0,
        });
        std::fs::create_dir(real.join("docs")).unwrap();
        let (rel, missing) = (
            c.resolve_in("docs", &real),
            c.resolve_in("nope/../gone", &real),
        );
        assert_eq!(rel, format!("{}/docs", real.display()));
        assert_eq!(c.pick(&rel).unwrap()[0].0, at);
        assert_eq!(missing, format!("{}/gone", real.display()));
        assert_eq!(
            c.resolve(&at),
            at,
            "an absolute catalog path stays as it is"
        );
    }

    #[test]
    fn links_and_user_ids_parse_back_and_garbage_is_a_clear_error() {
        let owner = Id([7; 20]);
        let l = link(owner, &[9; 32]);
        assert_eq!(
            parse_link(&l).unwrap(),
            record::manifest_position(owner, &[9; 32])
        );
        for bad in ["", "xyz", "00:11", &format!("{}:zz", hex(&[1; 20]))] {
            assert!(parse_link(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_user(&hex(&[3; 20])).unwrap(), Id([3; 20]));
        assert!(parse_user("/no/such/key.pem").is_err());
    }
}
