//! The simulator's event queue: items come out in (time, insertion) order,
//! exactly as from a binary heap keyed on (time, sequence number), but without
//! the heap's cache-missing sift on every pop.
//!
//! The near future (the next [`WHEEL_MS`] milliseconds) is a timing wheel: one
//! FIFO bucket per millisecond. Anything later waits in a heap and moves into
//! its bucket as soon as its time comes within the wheel's reach, which is
//! before any item for that time can be pushed into the bucket directly; so
//! each bucket holds its items in insertion order, and insertion order is
//! sequence order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// Milliseconds the wheel covers. Timers, timeouts and message delays fall
/// inside it; only rare far events (churn, faults, the end) take the heap.
pub const WHEEL_MS: u64 = 8192;

/// An item beyond the wheel, ordered by (time, sequence).
struct Far<T> {
    at: u64,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Far<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Far<T> {}
impl<T> PartialOrd for Far<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Far<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A min-queue on (time, insertion order) whose times never go backwards:
/// an item may not be pushed earlier than the last item popped.
pub struct EventQueue<T> {
    /// Bucket `t % WHEEL_MS` holds the items due at `t`, for `t` in
    /// `[base, base + WHEEL_MS)`.
    wheel: Vec<VecDeque<T>>,
    base: u64,
    in_wheel: usize,
    far: BinaryHeap<Reverse<Far<T>>>,
    seq: u64,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> EventQueue<T> {
    pub fn new() -> Self {
        EventQueue {
            wheel: (0..WHEEL_MS).map(|_| VecDeque::new()).collect(),
            base: 0,
            in_wheel: 0,
            far: BinaryHeap::new(),
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.in_wheel + self.far.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `item` for time `at`.
    ///
    /// # Panics
    /// If `at` is before the time of the last item popped: simulated time
    /// never runs backwards, and such an item has no place in the order.
    pub fn push(&mut self, at: u64, item: T) {
        assert!(
            at >= self.base,
            "event for {at} ms pushed after time {} ms was reached",
            self.base
        );
        self.seq += 1;
        if at - self.base < WHEEL_MS {
            self.wheel[(at % WHEEL_MS) as usize].push_back(item);
            self.in_wheel += 1;
        } else {
            self.far.push(Reverse(Far {
                at,
                seq: self.seq,
                item,
            }));
        }
    }

    /// The earliest item and its time (the first pushed among equal times).
    pub fn pop(&mut self) -> Option<(u64, T)> {
        loop {
            if self.in_wheel == 0 {
                // Nothing near: jump to the first far item.
                self.base = self.far.peek()?.0.at;
                self.pull_far();
            }
            if let Some(item) = self.wheel[(self.base % WHEEL_MS) as usize].pop_front() {
                self.in_wheel -= 1;
                return Some((self.base, item));
            }
            self.base += 1;
            self.pull_far();
        }
    }

    /// The `k`-th item after the last one popped, if it is due at the same
    /// time (a hint for prefetching; `None` says nothing about later items).
    pub fn peek_same_time(&self, k: usize) -> Option<&T> {
        self.wheel[(self.base % WHEEL_MS) as usize].get(k)
    }

    /// Moves far items that the wheel now reaches into their buckets, in
    /// (time, sequence) order: before anything for their time can be pushed
    /// there directly.
    fn pull_far(&mut self) {
        let reach = self.base + WHEEL_MS;
        while self.far.peek().is_some_and(|f| f.0.at < reach) {
            let Reverse(f) = self.far.pop().expect("peeked");
            self.wheel[(f.at % WHEEL_MS) as usize].push_back(f.item);
            self.in_wheel += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Operations on a queue: push at `now + delay`, or pop.
    #[derive(Clone, Debug)]
    enum Op {
        Push(u64),
        Pop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..20).prop_map(Op::Push),
            2 => (0u64..3 * WHEEL_MS).prop_map(Op::Push),
            1 => (0u64..50 * WHEEL_MS).prop_map(Op::Push),
            1 => Just(Op::Push(WHEEL_MS - 1)),
            1 => Just(Op::Push(WHEEL_MS)),
            4 => Just(Op::Pop),
        ]
    }

    #[test]
    fn peek_same_time_sees_only_what_is_due_now() {
        let mut q = EventQueue::new();
        for (at, x) in [(5, 'a'), (5, 'b'), (6, 'd'), (5, 'c')] {
            q.push(at, x);
        }
        assert_eq!(q.pop(), Some((5, 'a')));
        assert_eq!(q.peek_same_time(0), Some(&'b'));
        assert_eq!(q.peek_same_time(1), Some(&'c'));
        assert_eq!(q.peek_same_time(2), None, "d is due later");
        assert_eq!(q.pop(), Some((5, 'b')));
        assert_eq!(q.pop(), Some((5, 'c')));
        assert_eq!(q.peek_same_time(0), None);
        assert_eq!(q.pop(), Some((6, 'd')));
    }

    proptest! {
        /// Same items in the same order as a heap on (time, sequence).
        #[test]
        fn pops_in_time_then_insertion_order(ops in proptest::collection::vec(op(), 0..400)) {
            let mut q = EventQueue::new();
            let mut model: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
            let mut now = 0;
            let mut next = 0u64;
            for o in ops.iter().chain(std::iter::repeat_n(&Op::Pop, 400)) {
                match o {
                    Op::Push(d) => {
                        next += 1;
                        q.push(now + d, next);
                        model.push(Reverse((now + d, next)));
                    }
                    Op::Pop => {
                        let want = model.pop().map(|Reverse(x)| x);
                        let got = q.pop();
                        prop_assert_eq!(got, want);
                        if let Some((t, _)) = got {
                            now = t;
                        }
                    }
                }
                prop_assert_eq!(q.len(), model.len());
            }
        }
    }

    #[test]
    fn far_items_keep_their_place_among_later_pushes() {
        let mut q = EventQueue::new();
        q.push(3 * WHEEL_MS, "far, first");
        q.push(1, "near");
        assert_eq!(q.pop(), Some((1, "near")));
        // Once time reaches within a wheel of the far item, a push for the
        // same time comes after it.
        q.push(2 * WHEEL_MS + 5, "bridge");
        assert_eq!(q.pop(), Some((2 * WHEEL_MS + 5, "bridge")));
        q.push(3 * WHEEL_MS, "same time, later");
        assert_eq!(q.pop(), Some((3 * WHEEL_MS, "far, first")));
        assert_eq!(q.pop(), Some((3 * WHEEL_MS, "same time, later")));
        assert_eq!(q.pop(), None);
        assert!(q.is_empty());
    }

    #[test]
    #[should_panic(expected = "pushed after time")]
    fn a_push_into_the_past_is_refused() {
        let mut q = EventQueue::new();
        q.push(10, ());
        q.pop();
        q.push(9, ());
    }
}
