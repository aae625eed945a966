//! Fault plans are data: proptest draws them, shrinks any that break the ring
//! to a minimal plan, and keeps it in fault_plans.proptest-regressions so it
//! is replayed first on every later run.

mod common;

use peerstore_sim::{Cut, Fault, FaultKind};
use proptest::prelude::*;

fn fault() -> impl Strategy<Value = Fault> {
    let kind = prop_oneof![
        (0u32..64, 1_000u64..20_000).prop_map(|(node, down_ms)| FaultKind::Crash { node, down_ms }),
        (0u32..64).prop_map(|node| FaultKind::Kill { node }),
        (0u32..64, 100u64..1_400).prop_map(|(node, for_ms)| FaultKind::Pause { node, for_ms }),
        (0.2f64..0.8, 100u64..1_400).prop_map(|(fraction, for_ms)| FaultKind::Partition {
            cut: Cut::Symmetric { fraction },
            for_ms
        }),
        (0.2f64..0.8, 100u64..1_400).prop_map(|(fraction, for_ms)| FaultKind::Partition {
            cut: Cut::OneWay { fraction },
            for_ms
        }),
        (0u32..64, 100u64..30_000).prop_map(|(node, for_ms)| FaultKind::Partition {
            cut: Cut::Isolate { node },
            for_ms
        }),
        (0u32..64, 0u32..64, 100u64..20_000).prop_map(|(a, b, for_ms)| FaultKind::Clog {
            a,
            b,
            for_ms
        }),
    ];
    (0u64..90_000, kind).prop_map(|(at_ms, kind)| Fault { at_ms, kind })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: common::seeds(32) as u32,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_fault_plan_keeps_the_ring_safe_and_live(
        seed in 0u64..1_000_000,
        plan in proptest::collection::vec(fault(), 0..24),
        loss in 0.0f64..0.05,
    ) {
        let mut cfg = common::calm(20, seed);
        cfg.successors = 3;
        cfg.start = peerstore_sim::Start::Join;
        cfg.duration_ms = 100_000;
        cfg.churn_per_s = 0.02;
        cfg.net.loss = loss;
        cfg.net.reorder = 0.1;
        cfg.plan = plan;
        let rep = peerstore_sim::run(cfg);
        prop_assert!(rep.passed(), "{}", rep.summary());
    }
}
