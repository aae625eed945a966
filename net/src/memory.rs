//! Keeping freed buffers for reuse instead of handing them back to the
//! kernel.
//!
//! Nodes and clients move data in buffers of about a megabyte (a block, a
//! sealed frame, a chunk), allocated and freed thousands of times a
//! second. glibc's malloc serves an allocation over its mmap threshold
//! (128 KiB at first, raised as large buffers are freed) from a fresh
//! mapping, and gives the top of a heap back to the kernel whenever more
//! than twice the threshold is free there. Either way the next buffer
//! lands on pages the kernel must fault in and zero again: a 200 × 1 MiB
//! backup cost the three nodes of a test ring about 90,000 page faults
//! (360 MiB of fresh pages) and the client 20,000 to 35,000, some 7 % of
//! the nodes' CPU time on the 2-core benchmark machine.
//!
//! [`keep_freed_memory`] fixes the threshold above any buffer the
//! programs allocate, lets a heap keep up to [`TRIM_THRESHOLD`] of free
//! memory at its top, and caps the number of heaps (arenas) at one per
//! core instead of glibc's eight, so that free memory kept by one thread's
//! heap is not idle while another's grows. On the benchmark ring, a
//! 200 × 1 MiB backup then cost the nodes 2,000 to 6,000 faults instead
//! of 60,000 to 110,000, 5 to 8 % less of their CPU time, and their peak
//! memory over backups and restores of 1 MiB and 256 MiB files was 45 to
//! 51 MiB against 52 to 55 MiB (glibc's own settings) and 67 to 73 MiB
//! (the same thresholds with eight heaps a core).
//!
//! On anything but glibc the call does nothing.

#![allow(unsafe_code)]

/// Allocations below this size come from a heap: above the largest
/// buffer (a frame, at most [`crate::TransportConfig::max_frame_bytes`],
/// about 2 MiB by default).
pub const MMAP_THRESHOLD: usize = 4 << 20;

/// Free memory a heap may keep at its top before glibc trims it: room for
/// the buffers of a batch in flight.
pub const TRIM_THRESHOLD: usize = 16 << 20;

/// Tunes the allocator as described in the module documentation. Returns
/// whether the allocator took the settings (false off glibc). Call it once
/// at start-up, before the program's threads do heavy allocation; calling
/// it again is harmless.
pub fn keep_freed_memory() -> bool {
    imp::keep_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::{MMAP_THRESHOLD, TRIM_THRESHOLD};

    pub fn keep_freed_memory() -> bool {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
        [
            (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int),
            (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int),
            (libc::M_ARENA_MAX, arenas),
        ]
        .into_iter()
        // SAFETY: mallopt only changes malloc's tuning parameters, under
        // malloc's own lock; it has no preconditions on the caller and
        // touches no memory of ours. All three values fit in a c_int.
        .all(|(param, value)| unsafe { libc::mallopt(param, value) } == 1)
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn keep_freed_memory() -> bool {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults taken so far by the calling thread.
    fn thread_faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a whole rusage into the pointer it is
        // given, which points at one.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
        assert_eq!(rc, 0, "getrusage(RUSAGE_THREAD) failed");
        // SAFETY: getrusage succeeded, so it filled the struct (which was
        // all zeros, a valid rusage, before that anyway).
        unsafe { usage.assume_init() }.ru_minflt
    }

    /// Page faults taken by `rounds` allocations of a 2 MiB buffer, each
    /// written through and freed, after one round to warm up.
    fn faults_for_buffers(rounds: usize) -> i64 {
        let churn = || {
            let mut v = vec![0u8; 2 << 20];
            for (i, b) in v.iter_mut().enumerate().step_by(4096) {
                *b = i as u8;
            }
            std::hint::black_box(&v);
        };
        churn();
        let before = thread_faults();
        for _ in 0..rounds {
            churn();
        }
        thread_faults() - before
    }

    #[test]
    fn freed_buffers_are_reused_without_new_page_faults() {
        // The test runs in a thread of its own, so the fault count is its
        // own. First glibc's behaviour at its start-up values, fixed so
        // that they do not adapt: every 2 MiB buffer is a fresh mapping,
        // about 512 faults each. That shows the count sees the faults.
        // SAFETY: as in `imp`.
        unsafe {
            assert_eq!(libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10), 1);
            assert_eq!(libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 10), 1);
        }
        let untuned = faults_for_buffers(8);
        assert!(
            untuned >= 8 * 256,
            "untuned allocator took only {untuned} faults for 8 fresh 2 MiB buffers"
        );

        assert!(keep_freed_memory(), "glibc refused the settings");
        let tuned = faults_for_buffers(8);
        assert!(
            tuned < 64,
            "tuned allocator took {tuned} faults for 8 reused 2 MiB buffers (untuned: {untuned})"
        );
    }
}
