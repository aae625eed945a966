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

/// Alignment of the buffer, of every direct write's length and offset.
pub const ALIGN: usize = 4096;

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
    if how == Io::Direct {
        let aligned = len - len % ALIGN;
        match f.write_all(&bytes[..aligned]) {
            Ok(()) => {
                set_direct(&f, false)?;
                f.write_all(&bytes[aligned..])?;
            }
            // Refused after all (an alignment the device wants larger than
            // ALIGN, or a file system that accepts the flag but not the
            // write): start again buffered.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                drop(f);
                how = Io::Buffered;
                f = open(path, false)?.0;
                f.write_all(bytes)?;
            }
            Err(e) => return Err(e),
        }
    } else {
        f.write_all(bytes)?;
    }
    if sync {
        f.sync_all()?;
    }
    Ok(how)
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
    let want = round_up(max + 1);
    let mut how = if try_direct && set_direct(f, true).is_ok() {
        Io::Direct
    } else {
        Io::Buffered
    };
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
    if direct && set_direct(&f, true).is_ok() {
        return Ok((f, Io::Direct));
    }
    Ok((f, Io::Buffered))
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
        // Where the file system takes O_DIRECT (ext4, XFS: the test machines),
        // the direct path must have been the one exercised.
        #[cfg(target_os = "linux")]
        if supports_direct(dir.path()) {
            assert!(
                seen_direct,
                "no write went direct on a file system that takes it"
            );
        }
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
        #[cfg(target_os = "linux")]
        if supports_direct(dir.path()) {
            assert!(
                seen_direct,
                "no read went direct on a file system that takes it"
            );
        }
    }

    #[cfg(target_os = "linux")]
    fn supports_direct(dir: &Path) -> bool {
        let f = File::create(dir.join("probe")).unwrap();
        set_direct(&f, true).is_ok()
    }
}
