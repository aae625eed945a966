//! Tunables of one node. Every limit is explicit (TigerStyle): queues, retries,
//! list lengths and timeouts all have a number here.

use serde::{Deserialize, Serialize};

/// Which ring-maintenance rules a node follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Protocol {
    /// Zave's corrected Chord (IEEE TSE 2017): never adopt an unqueried pointer,
    /// join copies the successor's list, rectify replaces a dead predecessor.
    #[default]
    Zave,
    /// The 2001 rules, kept as a negative control: stabilize adopts the
    /// successor's predecessor without asking it, join keeps one successor,
    /// rectify never checks the old predecessor.
    Chord2001,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub protocol: Protocol,
    /// r: successor list length.
    pub successors_max: usize,
    pub stabilize_ms: u64,
    pub check_pred_ms: u64,
    /// One far finger is refreshed per tick.
    pub fix_fingers_ms: u64,
    /// Periods are drawn uniformly from [p*(1-j), p*(1+j)] so nodes do not
    /// synchronise; j in per-mille.
    pub jitter_permille: u64,
    /// A successor or predecessor is declared dead only after at least two
    /// consecutive timeouts spanning this long: shorter silences (a brief
    /// partition, a burst of loss) are ridden out.
    pub suspect_ms: u64,
    pub rto_min_ms: u64,
    pub rto_max_ms: u64,
    pub rto_initial_ms: u64,
    pub rtt_peers_max: usize,
    pub lookup_hops_max: u32,
    pub lookup_timeouts_max: u32,
    /// Concurrent lookups a node runs for commands; more are refused.
    pub lookups_max: usize,
    /// Closer nodes returned in one `Next` reply.
    pub closer_max: usize,
    /// Let lookups jump along successor lists (a responder whose list spans
    /// the key ends the route). Off, routing uses fingers and the first
    /// successor only, as in the Chord paper's path-length figures.
    pub route_via_successor_lists: bool,
    /// Wait before retrying a failed join.
    pub join_retry_ms: u64,
    pub join_attempts_max: u32,

    // ----- storage -----
    /// R: copies of every item, on the key's successor and the next R-1.
    pub replicas: usize,
    /// W: durable copies before a write is acknowledged.
    pub write_quorum: usize,
    /// Smallest RSA key a record or tombstone may be signed with.
    pub min_key_bits: usize,
    /// Added to a storage request's timeout (disk and transfer time).
    pub store_timeout_ms: u64,
    /// Anti-entropy period: each tick syncs our primary range with one of
    /// the next R-1 successors, in turn.
    pub sync_ms: u64,
    /// Hand-off walk period: each tick checks one run of held keys we may
    /// no longer be a replica for.
    pub handoff_ms: u64,
    /// A range with at most this many keys is answered with its key list;
    /// a bigger one is split into `sync_split` sub-range digests.
    pub sync_keys_max: usize,
    pub sync_split: usize,
    /// Repair traffic (anti-entropy pushes) per second, in bytes.
    pub repair_bytes_per_s: u64,
    /// Pushes queued for repair at most; more wait for the next round.
    pub push_queue_max: usize,
    /// Bytes of writes handed to the disk and not yet durable; a put past
    /// this is answered Busy.
    pub inflight_bytes_max: u64,
    /// Client puts and gets coordinated at once.
    pub store_ops_max: usize,
    /// Keys one hand-off moves at most.
    pub handoff_keys_max: usize,
    /// How long a graceful leave waits for its hand-off before going anyway.
    pub leave_handoff_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            protocol: Protocol::Zave,
            successors_max: 8,
            stabilize_ms: 1_000,
            check_pred_ms: 2_000,
            fix_fingers_ms: 1_000,
            jitter_permille: 250,
            suspect_ms: 3_000,
            rto_min_ms: 500,
            rto_max_ms: 5_000,
            rto_initial_ms: 1_000,
            rtt_peers_max: 256,
            lookup_hops_max: 64,
            lookup_timeouts_max: 32,
            lookups_max: 1_024,
            closer_max: 4,
            route_via_successor_lists: true,
            join_retry_ms: 2_000,
            join_attempts_max: 8,
            replicas: 3,
            write_quorum: 2,
            min_key_bits: crate::record::MIN_KEY_BITS_DEFAULT,
            store_timeout_ms: 5_000,
            sync_ms: 5_000,
            handoff_ms: 5_000,
            sync_keys_max: 128,
            sync_split: 16,
            repair_bytes_per_s: 16 << 20,
            push_queue_max: 4_096,
            inflight_bytes_max: 64 << 20,
            store_ops_max: 1_024,
            handoff_keys_max: 1_024,
            leave_handoff_ms: 30_000,
        }
    }
}

impl Config {
    /// The successor-list length the design asks for: 2*log2(N), at least 3.
    pub fn successors_for(expected_nodes: usize) -> usize {
        let log = (expected_nodes.max(2) as f64).log2().ceil() as usize;
        (2 * log).max(3)
    }
}
