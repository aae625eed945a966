//! After an I/O error in the database of small items, the store recovers
//! by itself: redb refuses every call on a handle once one of its writes
//! failed, and the store then opens the file again.
//!
//! The failure is made with the process's file size limit (`RLIMIT_FSIZE`),
//! which fails every write past it with `EFBIG`; that limit is the whole
//! process's, so this test has a binary of its own.

#![cfg(target_os = "linux")]

mod common;

use common::{tombstone, write_op};
use peerstore_core::{Id, Item, StorageResult, StoreError};
use peerstore_node::disk::{DiskConfig, DiskStore};
use tempfile::TempDir;

fn write(s: &mut DiskStore, it: &(Id, Item)) -> StorageResult {
    s.apply(write_op(it))
}

fn file_size_limit(bytes: libc::rlim_t) -> libc::rlim_t {
    // SAFETY: plain calls on values owned here; ignoring SIGXFSZ makes a
    // write past the limit fail with EFBIG instead of killing the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut old), 0);
        let new = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &new), 0);
        old.rlim_cur
    }
}

#[test]
fn the_store_recovers_from_a_failed_database_write() {
    let tmp = TempDir::new().unwrap();
    let (a, b) = (tombstone(1), tombstone(2));
    let mut s = DiskStore::open(tmp.path(), DiskConfig::default()).unwrap();
    assert_eq!(write(&mut s, &a), StorageResult::Done);
    assert_eq!(s.is_packed(&a.0), Ok(Some(true)));

    // Every database write fails now.
    let before = file_size_limit(4096);
    let failed = write(&mut s, &b);
    file_size_limit(before);
    assert_eq!(failed, StorageResult::Failed(StoreError::Io));
    assert!(s.stats().io_errors >= 1);

    // The disk is fine again: the store opens the database anew and goes
    // on, with what was committed and without the failed write.
    assert_eq!(s.read(&a.0), Ok(Some(a.1.clone())));
    assert_eq!(s.read(&b.0), Ok(None));
    assert_eq!(write(&mut s, &b), StorageResult::Done);
    assert_eq!(s.read(&b.0), Ok(Some(b.1.clone())));
    drop(s);
    let s = DiskStore::open(tmp.path(), DiskConfig::default()).unwrap();
    assert_eq!(s.read(&a.0), Ok(Some(a.1.clone())));
    assert_eq!(s.read(&b.0), Ok(Some(b.1.clone())));
    assert_eq!(s.stats().items, 2);
}
