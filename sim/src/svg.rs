//! A picture of a run for people: the ring (members on a circle by id, successor
//! pointers as chords, predecessor pointers as dashed chords, dead or unjoined
//! nodes as red crosses) beside a convergence plot over simulated time.

use crate::report::Report;
use crate::world::RingPoint;
use peerstore_core::Id;
use std::collections::HashMap;
use std::fmt::Write;

const W: f64 = 1200.0;
const H: f64 = 600.0;

/// Renders the final ring and the convergence plot as one SVG document.
pub fn render(report: &Report, ring: &[RingPoint]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    s.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    ring_panel(&mut s, report, ring);
    plot_panel(&mut s, report);
    s.push_str("</svg>\n");
    s
}

fn point(id: Id, cx: f64, cy: f64, rad: f64) -> (f64, f64) {
    let a = id.as_fraction() * std::f64::consts::TAU - std::f64::consts::FRAC_PI_2;
    (cx + rad * a.cos(), cy + rad * a.sin())
}

fn ring_panel(s: &mut String, report: &Report, ring: &[RingPoint]) {
    let (cx, cy, rad) = (300.0, 320.0, 240.0);
    let (verdict, colour) = if report.passed() {
        ("held", "#222")
    } else {
        ("FAILED", "#d22")
    };
    let _ = write!(
        s,
        r#"<text x="20" y="24" font-size="15" fill="{colour}">Ring at end: seed {} · {} nodes · r={} · {} · {verdict}</text>"#,
        report.seed, report.members_at_end, report.successors, report.protocol
    );
    let _ = write!(
        s,
        r##"<circle cx="{cx}" cy="{cy}" r="{rad}" fill="none" stroke="#ccc"/>"##
    );
    let alive: HashMap<Id, bool> = ring.iter().map(|p| (p.id, p.member)).collect();
    // Thin lines for big rings so a broken pointer still stands out.
    let width = if ring.len() > 500 { 0.3 } else { 1.0 };
    for p in ring {
        if !p.member {
            continue;
        }
        let (x1, y1) = point(p.id, cx, cy, rad);
        if let Some(sc) = p.succ {
            let (x2, y2) = point(sc, cx, cy, rad);
            let ok = alive.get(&sc).copied().unwrap_or(false);
            let colour = if ok { "#2a7" } else { "#d22" };
            let _ = write!(
                s,
                r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{colour}" stroke-width="{width}"/>"#
            );
        }
        if let Some(pr) = p.pred {
            let (x2, y2) = point(pr, cx, cy, rad - 8.0);
            let _ = write!(
                s,
                r##"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="#57c" stroke-width="{width}" stroke-dasharray="3,3" opacity="0.6"/>"##
            );
        }
    }
    for p in ring {
        let (x, y) = point(p.id, cx, cy, rad);
        if p.member {
            let _ = write!(
                s,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="#222"/>"##
            );
        } else {
            let _ = write!(
                s,
                r##"<path d="M{:.1} {:.1} L{:.1} {:.1} M{:.1} {:.1} L{:.1} {:.1}" stroke="#d22" stroke-width="1.2"/>"##,
                x - 3.0,
                y - 3.0,
                x + 3.0,
                y + 3.0,
                x - 3.0,
                y + 3.0,
                x + 3.0,
                y - 3.0
            );
        }
    }
    s.push_str(r##"<text x="20" y="585" fill="#2a7">— successor</text><text x="120" y="585" fill="#57c">- - predecessor</text><text x="250" y="585" fill="#d22">✕ dead / pointer to dead</text>"##);
}

fn plot_panel(s: &mut String, report: &Report) {
    let (x0, y0, w, h) = (660.0, 80.0, 500.0, 420.0);
    let _ = write!(
        s,
        r#"<text x="{x0}" y="24" font-size="15">Convergence over simulated time</text>"#
    );
    let _ = write!(
        s,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##
    );
    let samples = &report.samples;
    let t_max = samples.last().map(|p| p.t_ms).unwrap_or(1).max(1) as f64;
    let xy = |t: u64, v: f64| {
        (
            x0 + w * t as f64 / t_max,
            y0 + h * (1.0 - v.clamp(0.0, 1.0)),
        )
    };
    for (field, colour, label, dy) in [
        (0usize, "#2a7", "successor+predecessor correct", 0.0),
        (1, "#e90", "successor list exact", 16.0),
    ] {
        let mut d = String::new();
        for (i, p) in samples.iter().enumerate() {
            let v = if field == 0 {
                p.pointer_accuracy
            } else {
                p.lists_exact
            };
            let (x, y) = xy(p.t_ms, v);
            let _ = write!(d, "{}{x:.1} {y:.1} ", if i == 0 { "M" } else { "L" });
        }
        let _ = write!(
            s,
            r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#
        );
        // Legend above the frame, where no line can run through it.
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" fill="{colour}">{label}</text>"#,
            x0,
            y0 - 30.0 + dy
        );
    }
    // A red tick wherever the checkers found a broken invariant.
    let mut prev = 0;
    for p in samples {
        if p.violations > prev {
            let (x, _) = xy(p.t_ms, 0.0);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#d22" stroke-width="2"/>"##,
                y0 + h - 14.0,
                y0 + h
            );
        }
        prev = p.violations;
    }
    let heal = report.config.duration_ms;
    {
        if (heal as f64) <= t_max {
            let (x, _) = xy(heal, 0.0);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{}" stroke="#888" stroke-dasharray="4,4"/><text x="{:.1}" y="{}" fill="#666">healed</text>"##,
                y0 + h,
                x + 4.0,
                y0 + h - 6.0
            );
        }
    }
    let _ = write!(
        s,
        r##"<text x="{x0}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">{:.0} s</text><text x="{}" y="{}" text-anchor="end">1.0</text><text x="{}" y="{}" text-anchor="end">0</text>"##,
        y0 + h + 16.0,
        x0 + w,
        y0 + h + 16.0,
        t_max / 1000.0,
        x0 - 4.0,
        y0 + 4.0,
        x0 - 4.0,
        y0 + h
    );
    let verdict = match (report.converged, report.converge_ms) {
        (true, Some(ms)) => format!("ideal {ms} ms after healing"),
        _ if report.no_liveness => "NO LIVENESS".to_string(),
        _ => "liveness not checked".to_string(),
    };
    let _ = write!(
        s,
        r#"<text x="{x0}" y="{}">invariant violations: {} · {verdict}</text><text x="{x0}" y="{}">lookups {} ({} failed, {} wrong), mean hops {:.2}</text>"#,
        y0 + h + 40.0,
        report.invariant_violations.count,
        y0 + h + 58.0,
        report.lookups.count,
        report.lookups.failed,
        report.lookups.wrong,
        report.lookups.mean_hops
    );
}
