//! What a run reports: JSON for scripts (serde), a summary line for people.

use crate::config::SimConfig;
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct LookupStats {
    pub count: u64,
    pub failed: u64,
    pub wrong: u64,
    pub mean_hops: f64,
    pub p50_hops: u32,
    pub p99_hops: u32,
    pub mean_timeouts: f64,
    #[serde(skip)]
    pub timeouts_total: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ViolationReport {
    /// Checks (global states) that broke at least one invariant.
    pub count: u64,
    /// The first one, described.
    pub first: Option<String>,
}

/// One point of the convergence plot.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub members: usize,
    /// Fraction of members whose successor and predecessor are both right.
    pub pointer_accuracy: f64,
    /// Fraction of members whose whole successor list is exact.
    pub lists_exact: f64,
    pub violations: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub nodes: usize,
    /// Virtual nodes per machine.
    pub vnodes: usize,
    pub successors: usize,
    pub protocol: String,
    pub events: u64,
    pub sim_ms: u64,
    pub wall_ms: u64,
    pub events_per_s: f64,
    pub invariant_violations: ViolationReport,
    pub converged: bool,
    pub no_liveness: bool,
    pub converge_ms: Option<u64>,
    pub converge_bound_ms: u64,
    pub lookups: LookupStats,
    pub messages_per_node_per_s: f64,
    pub maintenance_messages_per_node_per_s: f64,
    pub messages_dropped: u64,
    pub timeouts: u64,
    pub crashes: u64,
    pub crashes_refused_by_guard: u64,
    pub joins_failed: u64,
    pub members_at_end: usize,
    pub trace_hash: String,
    pub peak_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
    pub trace_tail: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::storage::StorageReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security: Option<SecurityReport>,
    pub config: SimConfig,
}

/// Secure links and attackers (with `--secure`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SecurityReport {
    /// Every machine's link counters, summed (handshakes completed are
    /// counted at both ends).
    pub links: peerstore_core::link::LinkStats,
    /// Machines that arrived unendorsed and registered with a member.
    pub registrations: u64,
    pub attackers: u64,
    /// Attacker nodes that became ring members (must be 0).
    pub attacker_members: u64,
    /// Honest members' successor, predecessor or finger pointers naming an
    /// attacker, seen at any sample (must be 0).
    pub attacker_pointers: u64,
    /// Messages from attacker nodes that reached an honest node (must be 0).
    pub attacker_messages_delivered: u64,
    pub attack_puts: u64,
    /// Attacker puts acknowledged (must be 0).
    pub attack_puts_acked: u64,
    /// Client requests checked by node gates (signed by the client's user).
    pub gate_requests: u64,
    /// Refused by a gate (unknown user, bad or replayed signature, not
    /// the user's to store or read), as opposed to failing in the store.
    pub gate_refused: u64,
    /// Puts from a client whose user never registered.
    pub rogue_client_puts: u64,
    /// ...acknowledged (must be 0).
    pub rogue_client_puts_acked: u64,
}

impl SecurityReport {
    pub fn passed(&self) -> bool {
        self.attacker_members == 0
            && self.attacker_pointers == 0
            && self.attacker_messages_delivered == 0
            && self.attack_puts_acked == 0
            && self.rogue_client_puts_acked == 0
            && (self.attackers == 0 || self.links.refused_untrusted > 0)
    }
}

impl Report {
    /// True when the run upheld every safety invariant and, if it healed,
    /// converged within the bound.
    pub fn passed(&self) -> bool {
        self.invariant_violations.count == 0
            && !self.no_liveness
            && match &self.storage {
                None => true,
                Some(s) => s.passed() && s.repaired,
            }
            && match &self.security {
                None => true,
                Some(s) => s.passed(),
            }
    }

    /// A few lines for a person; a failure names the seed and how to replay it.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "seed {} | {} nodes, r={}, {} | {} events in {} ms simulated, {} ms wall ({:.0} events/s)\n",
            self.seed,
            self.nodes,
            self.successors,
            self.protocol,
            self.events,
            self.sim_ms,
            self.wall_ms,
            self.events_per_s
        );
        s += &format!(
            "lookups: {} done, {} failed, {} wrong, hops mean {:.2} p50 {} p99 {}, timeouts/lookup {:.3}\n",
            self.lookups.count,
            self.lookups.failed,
            self.lookups.wrong,
            self.lookups.mean_hops,
            self.lookups.p50_hops,
            self.lookups.p99_hops,
            self.lookups.mean_timeouts
        );
        s += &format!(
            "messages/node/s: {:.2} (maintenance {:.2}); crashes {} (guard refused {}); members at end {}\n",
            self.messages_per_node_per_s,
            self.maintenance_messages_per_node_per_s,
            self.crashes,
            self.crashes_refused_by_guard,
            self.members_at_end
        );
        match &self.invariant_violations.first {
            Some(first) => {
                s += &format!(
                    "INVARIANT VIOLATED ({} checks failed); first {first}\n",
                    self.invariant_violations.count
                )
            }
            None => s += "invariants: held after every check\n",
        }
        match (self.converged, self.converge_ms) {
            (true, Some(ms)) => {
                s += &format!("converged to the ideal ring {ms} ms after healing\n")
            }
            _ if self.no_liveness => {
                s += &format!(
                    "NO LIVENESS: not ideal within {} ms of healing\n",
                    self.converge_bound_ms
                )
            }
            _ => s += "did not reach the liveness phase\n",
        }
        if let Some(sec) = &self.security {
            s += &format!(
                "secure links: {} handshakes started, {} completed (counting both ends), {} refused untrusted, {} frames, {} bad frames, {} resets\n",
                sec.links.handshakes_started, sec.links.handshakes_done, sec.links.refused_untrusted,
                sec.links.frames_received, sec.links.bad_frames, sec.links.resets
            );
            if sec.registrations > 0 {
                s += &format!(
                    "registration: {} machines arrived unendorsed and registered; {} endorsements given\n",
                    sec.registrations, sec.links.endorsements_given
                );
            }
            if sec.attackers > 0 {
                s += &format!(
                    "attackers: {} machines; {} became members, {} honest pointers to them, {} of their messages delivered, {} of {} puts acked\n",
                    sec.attackers, sec.attacker_members, sec.attacker_pointers,
                    sec.attacker_messages_delivered, sec.attack_puts_acked, sec.attack_puts
                );
            }
            s += &format!(
                "client gates: {} signed requests over {} client sessions ({} calls taken, {} refused by the links), {} refused by gates; unregistered client: {} puts, {} acked\n",
                sec.gate_requests, sec.links.client_sessions, sec.links.calls_received,
                sec.links.calls_refused, sec.gate_refused, sec.rogue_client_puts, sec.rogue_client_puts_acked
            );
            if !sec.passed() {
                s += "SECURITY FAILED: an unendorsed machine got in\n";
            }
        }
        if let Some(st) = &self.storage {
            s += &format!(
                "storage: {} of {} block puts acked ({} failed), {} of {} record writes acked; ack latency mean {:.0} ms p99 {} ms\n",
                st.puts_acked, st.puts, st.puts_failed, st.record_writes_acked, st.record_writes,
                st.ack_latency_mean_ms, st.ack_latency_p99_ms
            );
            s += &format!(
                "gets: {} found, {} missing, {} failed; bytes/node mean {:.0}, max/mean {:.2}, p99/mean {:.2}; repair bytes {} (oracle {}{})\n",
                st.gets_found, st.gets_missing, st.gets_failed, st.bytes_per_node_mean,
                st.bytes_per_node_max_over_mean, st.bytes_per_node_p99_over_mean, st.repair_bytes,
                st.oracle_repair_bytes,
                st.repair_over_oracle.map(|r| format!(", {r:.2}x")).unwrap_or_default()
            );
            s += &format!(
                "durability: {} acked writes lost ({} excused: R copies lost at once), {} keys under-replicated, {} divergent records, {} bad blocks stored, {} misplaced copies; corrupted in flight {} (refused {})\n",
                st.lost_acked, st.lost_excused, st.under_replicated, st.divergent, st.bad_blocks,
                st.misplaced_copies, st.corrupted_in_flight, st.corrupt_refused
            );
            match (st.repaired, st.repair_ms) {
                (true, Some(ms)) => {
                    s += &format!(
                        "every key back on its R replicas {ms} ms after the ring was ideal; read back {} acked keys, {} failed\n",
                        st.final_reads_ok, st.final_reads_failed
                    )
                }
                _ => {
                    s +=
                        "STORAGE NOT REPAIRED: keys not back on their R replicas within the bound\n"
                }
            }
            if let Some(l) = &st.first_lost {
                s += &format!("LOST ACKNOWLEDGED WRITE: {l}\n");
            }
        }
        s += &format!("trace hash {}\n", self.trace_hash);
        if !self.passed() {
            s += &format!(
                "replay with: peerstore-sim --seed {} (same flags)\nconfig: {}\nlast events:\n",
                self.seed,
                serde_json::to_string(&self.config).unwrap_or_default()
            );
            for l in &self.trace_tail {
                s += &format!("  {l}\n");
            }
        }
        s
    }
}

/// Peak resident set size of this process (Linux), if it can be read.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
