//! PeerStore's networking: the Tokio side of the sans-IO core.
//!
//! [`transport`] moves the secure-link packets of [`peerstore_core::link`]
//! between machines over TCP. It never looks inside them: authenticity,
//! ordering checks and retransmission live in the core. [`keyfile`] reads
//! and writes the key files nodes and users keep on disk. [`dio`] writes
//! and reads large files around the page cache: a node's blocks, a
//! client's restored files. [`memory`] tunes the allocator so that the
//! megabyte buffers they all use are reused rather than faulted in anew
//! (the only unsafe code in the crate: one libc call).

#![deny(unsafe_code)]

pub mod dio;
pub mod keyfile;
pub mod memory;
pub mod transport;

pub use transport::{NetEvent, SendError, Transport, TransportConfig, TransportStats};
