//! Writing large item files around the page cache (`O_DIRECT` on Linux).
//!
//! A node stores other people's ciphertext that it will rarely read back
//! soon. Written through the page cache, every megabyte is first copied
//! into newly allocated cache pages, which costs more CPU than anything
//! else the node does with the block (on a virtual machine whose host
//! hands out guest memory lazily, several milliseconds per megabyte), and
//! then sits in memory pushing out what the machine does use. Written
//! with `O_DIRECT`, the disk reads the bytes straight from one buffer the
//! store keeps and reuses.
//!
//! `O_DIRECT` wants the buffer address, the file offset and the length
//! aligned to the device's logical block size. [`AlignedBuf`] hands out a
//! slice aligned to [`ALIGN`] (4 KiB, a multiple of every common logical
//! block size) inside an ordinary `Vec`, so no unsafe code is needed. The
//! aligned prefix of a file is written direct; the last partial block is
//! written after switching the descriptor back to buffered mode, so files
//! keep their exact length and format.
//!
//! Durability is unchanged: a direct write has reached the device (not
//! necessarily its volatile cache) when it returns, and the caller still
//! syncs the file or the file system before it says `Done`, which commits
//! the file's size and extents and flushes the device cache.
//!
//! Where direct I/O is refused (tmpfs, some network file systems, other
//! platforms) the write falls back to an ordinary buffered write and the
//! store stops trying.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

/// Alignment of the buffer, of every direct write's length and offset.
pub const ALIGN: usize = 4096;

/// Files at least this long are worth writing (and reading) direct. A
/// direct write waits for the device, which costs a small file more than
/// the page-cache copy it saves.
pub const DIRECT_MIN: usize = 64 << 10;

/// A reusable byte buffer whose [`AlignedBuf::slice_mut`] starts on an
/// [`ALIGN`] boundary.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
}

impl AlignedBuf {
    /// An empty buffer; memory is taken on first use.
    pub fn new() -> AlignedBuf {
        AlignedBuf { raw: Vec::new() }
    }

    /// A zero-initialised-once slice of at least `len` bytes (rounded up
    /// to a multiple of [`ALIGN`]) starting on an [`ALIGN`] boundary. The
    /// contents are whatever the last user left.
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        let want = round_up(len);
        let off = self.raw.as_ptr().align_offset(ALIGN);
        if off.checked_add(want).is_none_or(|end| end > self.raw.len()) {
            // Grow to fit with room for the alignment; the old contents
            // are not needed.
            self.raw = vec![0; want + ALIGN];
        }
        let off = self.raw.as_ptr().align_offset(ALIGN);
        &mut self.raw[off..off + want]
    }

    /// The first `len` bytes of the aligned slice, as the last
    /// [`AlignedBuf::slice_mut`] of at least `len` bytes left them.
    pub fn filled(&self, len: usize) -> &[u8] {
        if len == 0 {
            return &[];
        }
        let off = self.raw.as_ptr().align_offset(ALIGN);
        &self.raw[off..off + len]
    }
}

/// `len` rounded up to a multiple of [`ALIGN`].
fn round_up(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN
}

/// How a file was written or read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// The aligned part went around the page cache.
    Direct,
    /// Through the page cache: not asked for, or the file system refused.
    Buffered,
}

/// Creates (or truncates) `path` holding `bytes`, fsyncing it if `sync`.
/// `bytes` must start on an [`ALIGN`] boundary (as
/// [`AlignedBuf::slice_mut`] gives) to be written direct; when `try_direct`
/// is false, or the file system refuses, it is written buffered.
pub fn write_file(path: &Path, bytes: &[u8], sync: bool, try_direct: bool) -> io::Result<Io> {
    let len = bytes.len();
    let (mut f, mut how) = open(path, try_direct && len >= ALIGN)?;
    let aligned = len - len % ALIGN;
    write_all(&mut f, &bytes[..aligned], &mut how)?;
    if how == Io::Direct {
        set_direct(&f, false)?;
    }
    f.write_all(&bytes[aligned..])?;
    if sync {
        f.sync_all()?;
    }
    Ok(how)
}

/// Writes all of `bytes` at the file's offset, direct if `how` says so.
/// Direct writes refused with `EINVAL` (an alignment the device wants
/// larger than [`ALIGN`], a buffer not aligned, a file system that takes
/// the flag but not the write) go on buffered from where they stopped,
/// and `how` says so from then on.
fn write_all(f: &mut File, bytes: &[u8], how: &mut Io) -> io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        match f.write(&bytes[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidInput && *how == Io::Direct => {
                set_direct(f, false)?;
                *how = Io::Buffered;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a new file front to back, around the page cache where the file
/// system allows: bytes gather in an aligned buffer of [`STREAM_BUF`], and
/// a thread of the writer's own writes each full buffer direct while the
/// caller fills the next (a direct write waits for the device: 2 to 3 ms a
/// megabyte here, about as long as decrypting it). [`DirectWriter::finish`]
/// writes the last partial block buffered, so the file gets its exact
/// length. A restore writes the files it gets back this way: through the
/// page cache, every megabyte was first copied into new cache pages and
/// then flushed by the final sync while the restore waited.
#[derive(Debug)]
pub struct DirectWriter {
    file: File,
    buf: AlignedBuf,
    held: usize,
    how: Io,
    /// The thread writing full buffers, if there is one.
    away: Option<Away>,
}

#[derive(Debug)]
struct Away {
    full: SyncSender<(AlignedBuf, usize)>,
    empty: Receiver<AlignedBuf>,
    worker: JoinHandle<io::Result<Io>>,
}

/// What a [`DirectWriter`] gathers before it writes.
pub const STREAM_BUF: usize = 1 << 20;

impl DirectWriter {
    /// Writes into `file` (new or empty, at offset 0) with `buf` as its
    /// first buffer. `len` is what the file is expected to hold: direct
    /// from [`DIRECT_MIN`] if `try_direct` and the file system takes it,
    /// by a helper thread only beyond one buffer (nothing would overlap).
    pub fn new(file: File, buf: AlignedBuf, try_direct: bool, len: u64) -> DirectWriter {
        let direct = try_direct && len >= DIRECT_MIN as u64;
        let how = go_direct(&file, direct);
        // The thread writes through a second handle on the same open file
        // (same offset, same flags). Without one, this thread writes.
        let away = (how == Io::Direct && len > STREAM_BUF as u64)
            .then(|| file.try_clone().ok())
            .flatten()
            .and_then(|theirs| {
                let (full, todo) = sync_channel::<(AlignedBuf, usize)>(1);
                let (done, empty) = sync_channel::<AlignedBuf>(2);
                let _ = done.send(AlignedBuf::new());
                let worker = thread::Builder::new()
                    .name("direct-write".into())
                    .spawn(move || {
                        let (mut file, mut how) = (theirs, Io::Direct);
                        for (b, n) in todo {
                            write_all(&mut file, b.filled(n), &mut how)?;
                            let _ = done.send(b);
                        }
                        Ok(how)
                    })
                    .ok()?;
                Some(Away {
                    full,
                    empty,
                    worker,
                })
            });
        DirectWriter {
            file,
            buf,
            held: 0,
            how,
            away,
        }
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.how == Io::Buffered && self.held == 0 {
            return self.file.write_all(bytes);
        }
        while !bytes.is_empty() {
            let room = &mut self.buf.slice_mut(STREAM_BUF)[self.held..];
            let take = room.len().min(bytes.len());
            room[..take].copy_from_slice(&bytes[..take]);
            self.held += take;
            bytes = &bytes[take..];
            if self.held == STREAM_BUF {
                self.drain()?;
            }
        }
        Ok(())
    }

    /// Writes out (or hands the thread) the whole blocks held; the rest
    /// moves to the front of the buffer.
    fn drain(&mut self) -> io::Result<()> {
        let n = self.held - self.held % ALIGN;
        if n == 0 {
            return Ok(());
        }
        let tail = self.held - n;
        match &self.away {
            None => {
                write_all(&mut self.file, self.buf.filled(n), &mut self.how)?;
                self.buf.slice_mut(STREAM_BUF).copy_within(n..self.held, 0);
            }
            Some(away) => {
                let Ok(mut next) = away.empty.recv() else {
                    return Err(self.stop());
                };
                next.slice_mut(STREAM_BUF)[..tail]
                    .copy_from_slice(&self.buf.filled(self.held)[n..]);
                let full = std::mem::replace(&mut self.buf, next);
                if away.full.send((full, n)).is_err() {
                    return Err(self.stop());
                }
            }
        }
        self.held = tail;
        Ok(())
    }

    /// Waits for the thread to write what it was given; its error, or the
    /// error of a thread that stopped.
    fn stop(&mut self) -> io::Error {
        match self.join() {
            Err(e) => e,
            Ok(()) => io::Error::other("the writing thread stopped"),
        }
    }

    /// Lets the thread finish and takes over from it.
    fn join(&mut self) -> io::Result<()> {
        let Some(Away { full, worker, .. }) = self.away.take() else {
            return Ok(());
        };
        drop(full);
        let how = worker
            .join()
            .map_err(|_| io::Error::other("the writing thread panicked"))??;
        self.how = how;
        Ok(())
    }

    /// Writes what is held (the last partial block buffered) and gives
    /// back the file (not synced), a buffer for the next file and how the
    /// bytes went out.
    pub fn finish(mut self) -> io::Result<(File, AlignedBuf, Io)> {
        self.drain()?;
        self.join()?;
        if self.how == Io::Direct {
            set_direct(&self.file, false)?;
        }
        self.file.write_all(self.buf.filled(self.held))?;
        Ok((self.file, self.buf, self.how))
    }
}

/// Reads `f` from its start into `buf`: the whole file if it is at most
/// `max` bytes, otherwise more than `max` bytes (so the caller sees it is
/// too long without reading it all). Direct if `try_direct` and the file
/// system takes it; buffered otherwise. Returns how many bytes were read
/// ([`AlignedBuf::filled`]).
pub fn read_file(
    f: &mut File,
    buf: &mut AlignedBuf,
    max: usize,
    try_direct: bool,
) -> io::Result<(usize, Io)> {
    use std::io::Read as _;
    // As far as the file's size (plus a byte, to see it if it grew): a
    // direct read past the end of a file has the kernel zero the rest of
    // the buffer, and reading up to `max` (4 MiB for a 1 MiB block) spent
    // more time zeroing than reading.
    let size = f.metadata()?.len();
    let want = round_up(usize::try_from(size).unwrap_or(usize::MAX).min(max) + 1);
    let mut how = go_direct(f, try_direct);
    let out = buf.slice_mut(want);
    let mut filled = 0;
    while filled < want {
        match f.read(&mut out[filled..want]) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                // Direct reads come in whole aligned blocks; a short one
                // is the end of the file.
                if how == Io::Direct && n % ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Refused after all (see write_file): nothing was read, so the
            // offset is still 0; go on buffered.
            Err(e)
                if how == Io::Direct && e.kind() == io::ErrorKind::InvalidInput && filled == 0 =>
            {
                set_direct(f, false)?;
                how = Io::Buffered;
            }
            Err(e) => return Err(e),
        }
    }
    Ok((filled, how))
}

/// Opens `path` to be written from its start; with `O_DIRECT` if `direct`
/// and the file system takes it.
fn open(path: &Path, direct: bool) -> io::Result<(File, Io)> {
    let mut o = OpenOptions::new();
    o.write(true).create(true).truncate(true);
    let f = o.open(path)?;
    let how = go_direct(&f, direct);
    Ok((f, how))
}

/// Turns `O_DIRECT` on if `want` and the file system takes it; says which.
fn go_direct(f: &File, want: bool) -> Io {
    if want && set_direct(f, true).is_ok() {
        Io::Direct
    } else {
        Io::Buffered
    }
}

/// Turns `O_DIRECT` on or off on an open file (Linux); elsewhere says it
/// is not supported.
#[cfg(target_os = "linux")]
fn set_direct(f: &File, on: bool) -> io::Result<()> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let mut flags = fcntl_getfl(f)?;
    flags.set(OFlags::DIRECT, on);
    fcntl_setfl(f, flags)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_direct(_f: &File, on: bool) -> io::Result<()> {
    if on {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_is_aligned_long_enough_and_reused() {
        let mut b = AlignedBuf::new();
        for len in [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 5, 100] {
            let s = b.slice_mut(len);
            assert_eq!(s.as_ptr().align_offset(ALIGN), 0, "len {len}");
            assert!(s.len() >= len && s.len().is_multiple_of(ALIGN), "len {len}");
        }
        let p = b.slice_mut(ALIGN).as_ptr();
        assert_eq!(b.slice_mut(2 * ALIGN).as_ptr(), p, "grown when it fits");
    }

    #[test]
    fn files_of_every_awkward_length_come_back_exact() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = AlignedBuf::new();
        let mut seen_direct = false;
        for (i, len) in [
            0,
            1,
            511,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            5 * ALIGN + 17,
            1 << 20,
        ]
        .into_iter()
        .enumerate()
        {
            let s = b.slice_mut(len);
            for (j, byte) in s.iter_mut().enumerate() {
                *byte = (j * 7 + i) as u8;
            }
            let want = s[..len].to_vec();
            for direct in [true, false] {
                let path = dir.path().join(format!("f{i}-{direct}"));
                // A longer file first: the write must truncate it.
                std::fs::write(&path, vec![0xEE; len + 3 * ALIGN]).unwrap();
                let how = write_file(&path, &b.slice_mut(len)[..len], true, direct).unwrap();
                if !direct || len < ALIGN {
                    assert_eq!(how, Io::Buffered, "len {len}");
                }
                seen_direct |= how == Io::Direct;
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    want,
                    "len {len} direct {direct}"
                );
            }
        }
        assert_direct_exercised(dir.path(), seen_direct, "write");
    }

    #[test]
    fn an_unaligned_buffer_still_lands_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = AlignedBuf::new();
        let s = b.slice_mut(3 * ALIGN);
        s.iter_mut().enumerate().for_each(|(j, x)| *x = j as u8);
        let want = s[1..1 + 2 * ALIGN].to_vec();
        let path = dir.path().join("odd");
        // Misaligned by one byte: the kernel refuses the direct write with
        // EINVAL and the file is written buffered instead.
        let how = write_file(&path, &s[1..1 + 2 * ALIGN], false, true).unwrap();
        assert_eq!(how, Io::Buffered);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn reads_give_back_exactly_the_file_and_flag_a_long_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = AlignedBuf::new();
        let mut seen_direct = false;
        for len in [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 5 * ALIGN + 17, 1 << 20] {
            let want: Vec<u8> = (0..len).map(|j| (j * 13 + len) as u8).collect();
            let path = dir.path().join(format!("r{len}"));
            std::fs::write(&path, &want).unwrap();
            for direct in [true, false] {
                // Room for the whole file.
                let mut f = File::open(&path).unwrap();
                let (n, how) = read_file(&mut f, &mut b, (1 << 20) + 5, direct).unwrap();
                assert_eq!(b.filled(n), &want[..], "len {len} direct {direct}");
                if !direct {
                    assert_eq!(how, Io::Buffered);
                }
                seen_direct |= how == Io::Direct;
                // A limit below the file's length: more than the limit comes
                // back, so the caller can refuse it.
                if len > 0 {
                    let mut f = File::open(&path).unwrap();
                    let (n, _) = read_file(&mut f, &mut b, len - 1, direct).unwrap();
                    assert!(n > len - 1 && n <= len, "len {len} direct {direct}: {n}");
                    assert_eq!(b.filled(n), &want[..n]);
                }
            }
        }
        assert_direct_exercised(dir.path(), seen_direct, "read");
    }

    #[test]
    fn streamed_files_come_back_exact_however_they_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = AlignedBuf::new();
        let mut seen_direct = false;
        for len in [
            0,
            1,
            ALIGN - 1,
            ALIGN + 3,
            STREAM_BUF,
            STREAM_BUF + 1,
            3 * STREAM_BUF - 5,
        ] {
            let want: Vec<u8> = (0..len).map(|j| (j * 31 + len) as u8).collect();
            for piece in [1usize, 1000, ALIGN, STREAM_BUF, STREAM_BUF + 7] {
                if piece == 1 && len > 2 * ALIGN {
                    continue; // a byte at a time: slow and no different
                }
                for direct in [true, false] {
                    let path = dir.path().join(format!("s{len}-{piece}-{direct}"));
                    let f = File::create(&path).unwrap();
                    let mut w = DirectWriter::new(f, buf, direct, len as u64);
                    for part in want.chunks(piece) {
                        w.write_all(part).unwrap();
                    }
                    let (f, b, how) = w.finish().unwrap();
                    if !direct || len < DIRECT_MIN {
                        assert_eq!(how, Io::Buffered, "len {len}");
                    }
                    seen_direct |= how == Io::Direct;
                    buf = b;
                    drop(f);
                    assert_eq!(
                        std::fs::read(&path).unwrap(),
                        want,
                        "len {len} piece {piece} direct {direct}"
                    );
                }
            }
        }
        assert_direct_exercised(dir.path(), seen_direct, "stream");
    }

    /// Where the file system takes O_DIRECT (ext4, XFS: the test
    /// machines), the direct path must have been the one exercised.
    fn assert_direct_exercised(dir: &Path, seen_direct: bool, what: &str) {
        #[cfg(target_os = "linux")]
        if supports_direct(dir) {
            assert!(
                seen_direct,
                "no {what} went direct on a file system that takes it"
            );
        }
        let _ = (dir, seen_direct, what);
    }

    #[cfg(target_os = "linux")]
    fn supports_direct(dir: &Path) -> bool {
        let f = File::create(dir.join("probe")).unwrap();
        set_direct(&f, true).is_ok()
    }
}
