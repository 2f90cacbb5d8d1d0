//! `--chart FILE.svg`: a self-contained grouped bar chart. One group per
//! disk x job, a Platter bar and a QEMU bar in each, IOPS on a log scale
//! (4 KiB and 128 KiB jobs differ by orders of magnitude), the ratio above
//! each group, disks separated by a rule and named on top.
//!
//! ```text
//!   IOPS   | data-raw-none         | data-qcow2 ...
//!   10^4 - |  x1.02   x0.97        |
//!          |  P Q     P Q          |
//!   10^3 - |  # #     # .          |
//!          +--------------------------
//!             randread-4k-qd1 ...
//! ```
//!
//! Only bars are `<rect class="bar ...">` elements; each has a `<title>`
//! with its value, so a browser shows the number on hover.

use std::fmt::Write;

use super::results::DiskResult;

const BAR_W: f64 = 14.0;
const GROUP_GAP: f64 = 12.0;
const DISK_GAP: f64 = 16.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 84.0;
const PLOT_H: f64 = 260.0;
const BOTTOM: f64 = 120.0;
const PLATTER_COLOUR: &str = "#2a6fb0";
const QEMU_COLOUR: &str = "#e08a2c";

/// Escape text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart as SVG text.
pub fn render(title: &str, disks: &[DiskResult]) -> String {
    let values: Vec<f64> = disks
        .iter()
        .flat_map(|d| d.jobs.iter())
        .flat_map(|j| [j.platter, j.qemu])
        .flatten()
        .map(|s| s.iops)
        .filter(|v| *v > 0.0)
        .collect();
    // Decades that cover every value; at least one.
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(0.0, f64::max);
    let (lo_dec, hi_dec) = if values.is_empty() {
        (0, 1)
    } else {
        let l = lo.log10().floor() as i32;
        (l, (hi.log10().ceil() as i32).max(l + 1))
    };
    let y = |v: f64| -> f64 {
        let t =
            (v.max(10f64.powi(lo_dec)).log10() - f64::from(lo_dec)) / f64::from(hi_dec - lo_dec);
        TOP + PLOT_H * (1.0 - t)
    };
    let group_w = 2.0 * BAR_W + GROUP_GAP;
    let groups: usize = disks.iter().map(|d| d.jobs.len()).sum();
    let plot_w = group_w * groups as f64 + DISK_GAP * disks.len().saturating_sub(1) as f64;
    let width = (LEFT + plot_w + RIGHT).max(420.0);
    let height = TOP + PLOT_H + BOTTOM;

    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <style>.bar.platter{{fill:{PLATTER_COLOUR}}}.bar.qemu{{fill:{QEMU_COLOUR}}}\
         .grid{{stroke:#ddd}}.axis{{stroke:#333}}.rule{{stroke:#999;stroke-dasharray:3 3}}</style>\n\
         <text x=\"{LEFT}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        esc(title)
    );
    // Legend: coloured text, so bars stay the only rectangles.
    let _ = writeln!(
        s,
        "<text x=\"{LEFT}\" y=\"38\"><tspan fill=\"{PLATTER_COLOUR}\">&#9632; Platter</tspan>  \
         <tspan fill=\"{QEMU_COLOUR}\">&#9632; QEMU</tspan>  IOPS, log scale; \
         above each pair: Platter/QEMU</text>"
    );
    for d in lo_dec..=hi_dec {
        let yy = y(10f64.powi(d));
        let _ = writeln!(
            s,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 6.0,
            yy + 4.0,
            decade_label(d)
        );
    }
    let mut x = LEFT;
    for (k, d) in disks.iter().enumerate() {
        if k > 0 {
            let rx = x - DISK_GAP / 2.0;
            let _ = writeln!(
                s,
                "<line class=\"rule\" x1=\"{rx:.1}\" x2=\"{rx:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>",
                TOP - 20.0,
                TOP + PLOT_H
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-weight=\"bold\"><title>{}</title>{}</text>",
            x + 2.0,
            TOP - 24.0,
            esc(&d.describe()),
            esc(&d.id)
        );
        for j in &d.jobs {
            for (i, (sample, who)) in [(j.platter, "platter"), (j.qemu, "qemu")]
                .into_iter()
                .enumerate()
            {
                let Some(v) = sample.map(|s| s.iops).filter(|v| *v > 0.0) else {
                    continue;
                };
                let bx = x + GROUP_GAP / 2.0 + BAR_W * i as f64;
                // The smallest value may sit on the bottom decade: keep it visible.
                let top = y(v).min(TOP + PLOT_H - 2.0);
                let _ = writeln!(
                    s,
                    "<rect class=\"bar {who}\" x=\"{bx:.1}\" y=\"{top:.1}\" width=\"{BAR_W}\" \
                     height=\"{:.1}\"><title>{} {} {who}: {v:.0} IOPS</title></rect>",
                    TOP + PLOT_H - top,
                    esc(&d.id),
                    esc(&j.job)
                );
            }
            let cx = x + group_w / 2.0;
            if let Some(r) = j.ratio() {
                let _ = writeln!(
                    s,
                    "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{r:.2}</text>",
                    TOP - 6.0
                );
            }
            let ly = TOP + PLOT_H + 10.0;
            let _ = writeln!(
                s,
                "<text x=\"{cx:.1}\" y=\"{ly:.1}\" text-anchor=\"end\" \
                 transform=\"rotate(-50 {cx:.1} {ly:.1})\">{}</text>",
                esc(&j.job)
            );
            x += group_w;
        }
        x += DISK_GAP;
    }
    let _ = writeln!(
        s,
        "<line class=\"axis\" x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{:.1}\"/>\
         <line class=\"axis\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>\n</svg>",
        TOP + PLOT_H,
        LEFT + plot_w,
        TOP + PLOT_H,
        TOP + PLOT_H
    );
    s
}

/// `1`, `10`, `100`, `1k`, `10k`, `100k`, `1M`, ...
fn decade_label(d: i32) -> String {
    match d {
        i32::MIN..=-1 => format!("{}", 10f64.powi(d)),
        0..=2 => format!("{}", 10u64.pow(d as u32)),
        3..=5 => format!("{}k", 10u64.pow(d as u32 - 3)),
        _ => format!("{}M", 10u64.pow((d - 6).max(0) as u32)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::results::tests::disk;
    use super::*;

    #[test]
    fn one_rect_per_bar_and_well_formed() {
        let disks = [
            disk(
                "a&b",
                &[
                    ("randread-4k-qd1", 1500.0, Some(1000.0)),
                    ("read-128k-qd8", 90.0, Some(100.0)),
                ],
            ),
            disk("c", &[("randread-4k-qd1", 20000.0, None)]),
        ];
        let s = render("Platter vs <QEMU>", &disks);
        assert!(s.starts_with("<svg "));
        assert!(s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<rect").count(), 5);
        assert_eq!(s.matches("class=\"bar platter\"").count(), 3);
        assert_eq!(s.matches("class=\"bar qemu\"").count(), 2);
        assert!(s.contains("a&amp;b") && s.contains("&lt;QEMU&gt;") && !s.contains("a&b"));
        assert!(s.contains(">1.50</text>") && s.contains(">0.90</text>"));
        // Decades 10 .. 100k cover 90 .. 20000.
        assert!(
            s.contains(">10</text>") && s.contains(">100k</text>"),
            "{s}"
        );
        // Every element that opens closes.
        for tag in ["rect", "text", "title"] {
            assert_eq!(
                s.matches(&format!("<{tag}")).count(),
                s.matches(&format!("</{tag}>")).count(),
                "{tag}"
            );
        }
    }

    #[test]
    fn bars_grow_with_iops() {
        let s = render("t", &[disk("a", &[("j", 100.0, Some(10000.0))])]);
        let heights: Vec<f64> = s
            .match_indices("height=\"")
            .skip(1) // the <svg> element's own height
            .map(|(i, m)| {
                let rest = &s[i + m.len()..];
                rest[..rest.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert_eq!(heights.len(), 2);
        assert!(heights[1] > heights[0] * 1.5, "{heights:?}");
        assert_eq!(decade_label(4), "10k");
        assert_eq!(decade_label(7), "10M");
    }
}
