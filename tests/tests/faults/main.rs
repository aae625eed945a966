//! Faults and mistakes: a crashed node, bad bytes on the wire and on disk,
//! wrong arguments. One test binary, so cargo runs these tests side by
//! side (none of them races a tight clock); each file is one topic.

mod bad_input;
mod errors;
mod heal;
