//! A dependency-free SVG bar chart of hoststack/kernel ratios.

/// Horizontal bars, one per `(label, ratio)`, on a log scale centred on
/// 1.0x (green right of it: hoststack better; red left: worse).
pub fn svg(title: &str, bars: &[(String, f64)]) -> String {
    let (w, label_w, row_h, top) = (1100.0, 620.0, 22.0, 50.0);
    let plot_w = w - label_w - 60.0;
    let h = top + row_h * bars.len() as f64 + 40.0;
    // log2 scale from 1/8x to 8x.
    let span = 3.0f64;
    let x_of = |r: f64| {
        let l = r.max(1e-9).log2().clamp(-span, span);
        label_w + (l + span) / (2.0 * span) * plot_w
    };
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"24\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        esc(title)
    );
    for t in [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0] {
        let x = x_of(t);
        let stroke = if t == 1.0 { "#000" } else { "#ddd" };
        o.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{stroke}\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{t}x</text>\n",
            top - 8.0,
            h - 30.0,
            h - 14.0
        ));
    }
    let one = x_of(1.0);
    for (i, (label, r)) in bars.iter().enumerate() {
        let y = top + i as f64 * row_h;
        let x = x_of(*r);
        let (x0, x1, fill) = if *r >= 1.0 {
            (one, x, "#2e8b57")
        } else {
            (x, one, "#c0392b")
        };
        let label: String = label.chars().take(95).collect();
        o.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{fill}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{r:.2}x</text>\n",
            label_w - 8.0,
            y + row_h * 0.7,
            esc(&label),
            y + 3.0,
            (x1 - x0).max(1.0),
            row_h - 6.0,
            x1.max(x0) + 4.0,
            y + row_h * 0.7
        ));
    }
    o.push_str("</svg>\n");
    o
}
