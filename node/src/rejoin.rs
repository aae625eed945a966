//! Coming back after a restart: the ring positions a node remembers, and
//! the rule that lets a whole ring that stopped start again by itself.
//!
//! A member saves its successors and its predecessor (address and ring id)
//! in its data directory. On the next start it rejoins through them. If
//! every node of a ring stopped, none of them is a member any more and
//! each join fails: somebody has to start the ring again, and only one
//! node may, or the ring splits in two.
//!
//! That node is the ring's lowest: the one whose predecessor's id is
//! greater than its own (the predecessor pointer wraps past zero there and
//! nowhere else). It starts the ring again only when the ring it remembers
//! is gone: its predecessor answered that it is not in a ring, no
//! remembered peer answered that it is, and more than half of them
//! answered at all. Everyone else keeps trying its remembered peers and
//! joins the restarted ring through whichever of them is back in it.
//!
//! If the lowest node never comes back, nobody restarts the ring: its
//! operator starts one node with `--create` (or `--join` to a live node).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use peerstore_core::wire::{Addr, Peer};
use peerstore_core::Id;

/// What a node remembers of its place in the ring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Remembered {
    /// Successors, nearest first; the id is missing in files written
    /// before ids were saved.
    pub succs: Vec<(SocketAddr, Option<Id>)>,
    pub pred: Option<Peer>,
}

impl Remembered {
    /// Reads the peers file: one successor per line ("ADDR [ID]"), and a
    /// line "pred ADDR ID". Lines that do not parse are skipped (the file
    /// is only a hint), as is `me`.
    pub fn parse(text: &str, me: SocketAddr) -> Remembered {
        let mut r = Remembered::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("pred") => {
                    let addr = words.next().and_then(|a| a.parse::<SocketAddr>().ok());
                    let id = words.next().and_then(|i| i.parse::<Id>().ok());
                    if let (Some(addr), Some(id)) = (addr, id) {
                        if addr != me {
                            r.pred = Some(Peer {
                                id,
                                addr: Addr::from(addr),
                            });
                        }
                    }
                }
                Some(a) => {
                    let Ok(addr) = a.parse::<SocketAddr>() else {
                        continue;
                    };
                    let id = words.next().and_then(|i| i.parse::<Id>().ok());
                    if addr != me && !r.succs.iter().any(|(x, _)| *x == addr) {
                        r.succs.push((addr, id));
                    }
                }
                None => {}
            }
        }
        r
    }

    /// The file's text for these successors and predecessor (`me` and
    /// peers not on TCP left out). `None` if there is nothing to save.
    pub fn render(succs: &[Peer], pred: Option<Peer>, me: SocketAddr) -> Option<String> {
        let tcp = |p: &Peer| match p.addr {
            Addr::Tcp(a) if a != me => Some((a.socket(), p.id)),
            _ => None,
        };
        let mut lines: Vec<String> = Vec::new();
        let mut seen: Vec<SocketAddr> = Vec::new();
        for (a, id) in succs.iter().filter_map(tcp) {
            if !seen.contains(&a) {
                seen.push(a);
                lines.push(format!("{a} {id}"));
            }
        }
        if lines.is_empty() {
            return None;
        }
        if let Some((a, id)) = pred.as_ref().and_then(tcp) {
            lines.push(format!("pred {a} {id}"));
        }
        Some(lines.join("\n") + "\n")
    }

    /// Addresses to try joining through, nearest successor first, then
    /// the predecessor.
    pub fn entries(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self.succs.iter().map(|(a, _)| *a).collect();
        if let Some(a) = self.pred.and_then(|p| p.addr.socket()) {
            if !v.contains(&a) {
                v.push(a);
            }
        }
        v
    }

    /// The remembered peers whose ids we know (successors and predecessor).
    pub fn peers(&self) -> Vec<Peer> {
        let mut v: Vec<Peer> = self
            .succs
            .iter()
            .filter_map(|(a, id)| {
                id.map(|id| Peer {
                    id,
                    addr: Addr::from(*a),
                })
            })
            .collect();
        if let Some(p) = self.pred {
            if !v.iter().any(|x| x.id == p.id) {
                v.push(p);
            }
        }
        v
    }
}

/// What a remembered peer last said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Heard {
    Member,
    NotMember,
    Silent,
}

/// A restarting node's rounds of asking its remembered peers whether they
/// are in a ring: to join through one that is, and, for the ring's lowest
/// node, to see that the ring is gone.
#[derive(Clone, Debug)]
pub struct Rejoin {
    /// Our predecessor, if its id is above ours (we are the lowest).
    lowest_of: Option<Peer>,
    peers: Vec<Peer>,
    heard: BTreeMap<Id, Heard>,
}

impl Rejoin {
    /// `None` if no peer's id is remembered (nothing to ask).
    pub fn new(me: Id, remembered: &Remembered) -> Option<Rejoin> {
        let peers = remembered.peers();
        if peers.is_empty() {
            return None;
        }
        Some(Rejoin {
            lowest_of: remembered.pred.filter(|p| p.id > me),
            peers,
            heard: BTreeMap::new(),
        })
    }

    /// Whether this node would restart the ring: it remembers a
    /// predecessor whose id is above its own.
    pub fn is_lowest(&self) -> bool {
        self.lowest_of.is_some()
    }

    /// The peers to ask (each round).
    pub fn peers(&self) -> &[Peer] {
        &self.peers
    }

    /// A peer's answer to "are you in a ring?" (`None`: silent). Returns
    /// the peer if it is in one: join through it.
    pub fn heard(&mut self, peer: Peer, member: Option<bool>) -> Option<Peer> {
        if !self
            .peers
            .iter()
            .any(|p| p.id == peer.id && p.addr == peer.addr)
        {
            return None;
        }
        let h = match member {
            Some(true) => Heard::Member,
            Some(false) => Heard::NotMember,
            None => Heard::Silent,
        };
        self.heard.insert(peer.id, h);
        (h == Heard::Member).then_some(peer)
    }

    /// Whether the ring is gone and this node should start it again:
    /// only the lowest node, once its predecessor and most of its peers
    /// answered that they are out of any ring and none that it is in one.
    pub fn ring_is_gone(&self) -> bool {
        let Some(pred) = self.lowest_of else {
            return false;
        };
        let count = |h: Heard| self.heard.values().filter(|x| **x == h).count();
        self.heard.get(&pred.id) == Some(&Heard::NotMember)
            && count(Heard::Member) == 0
            && 2 * count(Heard::NotMember) > self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn peer(id: u128, port: u16) -> Peer {
        Peer {
            id: Id::from_u128(id),
            addr: Addr::from(sock(port)),
        }
    }

    const ME: u16 = 7000;

    #[test]
    fn the_file_round_trips_and_skips_what_it_cannot_read() {
        let succs = [peer(20, 7002), peer(30, 7003), peer(20, 7002), peer(5, ME)];
        let text = Remembered::render(&succs, Some(peer(90, 7009)), sock(ME)).unwrap();
        let r = Remembered::parse(&text, sock(ME));
        assert_eq!(
            r.succs,
            vec![
                (sock(7002), Some(Id::from_u128(20))),
                (sock(7003), Some(Id::from_u128(30)))
            ]
        );
        assert_eq!(r.pred, Some(peer(90, 7009)));
        assert_eq!(r.entries(), vec![sock(7002), sock(7003), sock(7009)]);
        // Only ourselves: nothing worth saving.
        assert_eq!(Remembered::render(&[peer(5, ME)], None, sock(ME)), None);
        // The old format (addresses only) still gives entries, but no ids.
        let old = Remembered::parse("127.0.0.1:7002\n127.0.0.1:7003\n", sock(ME));
        assert_eq!(old.entries(), vec![sock(7002), sock(7003)]);
        assert!(old.peers().is_empty());
        // Garbage lines are skipped.
        let junk = Remembered::parse(
            "nonsense\npred 127.0.0.1:7009\npred x y\n\n127.0.0.1:7004 zz\n",
            sock(ME),
        );
        assert_eq!(junk.succs, vec![(sock(7004), None)]);
        assert_eq!(junk.pred, None);
    }

    fn remembered(pred: Peer, succs: &[Peer]) -> Remembered {
        let text = Remembered::render(succs, Some(pred), sock(ME)).unwrap();
        Remembered::parse(&text, sock(ME))
    }

    #[test]
    fn only_the_lowest_node_may_restart_the_ring() {
        let me = Id::from_u128(10);
        let succs = [peer(20, 7002), peer(30, 7003)];
        // Predecessor above us: the pointer wraps here; we are the lowest.
        let lowest = Rejoin::new(me, &remembered(peer(90, 7009), &succs)).unwrap();
        assert!(lowest.is_lowest());
        // Predecessor below us: somebody else is. We never restart the
        // ring, whatever we hear, but we join through whoever is in one.
        let mut other = Rejoin::new(me, &remembered(peer(5, 7001), &succs)).unwrap();
        assert!(!other.is_lowest());
        for p in [peer(5, 7001), peer(20, 7002), peer(30, 7003)] {
            assert_eq!(other.heard(p, Some(false)), None);
        }
        assert!(!other.ring_is_gone());
        assert_eq!(
            other.heard(peer(30, 7003), Some(true)),
            Some(peer(30, 7003))
        );
        // No predecessor remembered: never lowest.
        let text = Remembered::render(&succs, None, sock(ME)).unwrap();
        let no_pred = Rejoin::new(me, &Remembered::parse(&text, sock(ME))).unwrap();
        assert!(!no_pred.is_lowest());
        // No ids at all (the old file format): nothing to ask.
        assert!(Rejoin::new(me, &Remembered::parse("127.0.0.1:7002\n", sock(ME))).is_none());
    }

    #[test]
    fn the_ring_is_gone_only_when_the_predecessor_and_most_peers_say_so() {
        let me = Id::from_u128(10);
        let (a, b, c, pred) = (
            peer(20, 7002),
            peer(30, 7003),
            peer(40, 7004),
            peer(90, 7009),
        );
        let mut r = Rejoin::new(me, &remembered(pred, &[a, b, c])).unwrap();
        assert_eq!(r.peers().len(), 4);
        assert!(!r.ring_is_gone(), "nothing heard yet");
        assert!(r.is_lowest());
        r.heard(a, Some(false));
        r.heard(b, Some(false));
        assert!(!r.ring_is_gone(), "the predecessor has not answered");
        r.heard(pred, None);
        assert!(!r.ring_is_gone(), "a silent predecessor may be in a ring");
        r.heard(pred, Some(false));
        assert!(r.ring_is_gone(), "3 of 4 are out of any ring");
        r.heard(c, Some(true));
        assert!(!r.ring_is_gone(), "one of them is in a ring: join it");
        r.heard(c, None);
        assert!(r.ring_is_gone());
        r.heard(b, None);
        assert!(!r.ring_is_gone(), "2 of 4 is not a majority");
        // Answers from strangers (or from a remembered address that now
        // holds another id) do not count.
        r.heard(peer(41, 7004), Some(false));
        r.heard(peer(30, 7999), Some(false));
        assert!(!r.ring_is_gone());
    }
}
