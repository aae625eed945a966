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
