//! Pictures without a plotting library: line charts of training curves and a small bitmap font
//! for labels (used by training's `loss.png` and by the mask and candidate pictures).

/// The series colours, in order (matplotlib's first six).
pub const COLOURS: [[u8; 3]; 6] =
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75]];

/// Draws `(x, y)` series as lines on shared axes (x: step, y: value, min/max labelled) with a
/// legend naming each by `names`.
pub fn line_chart(title: &str, names: &[&str], series: &[Vec<(f64, f64)>]) -> image::RgbImage {
    let (w, h) = (720u32, 420u32);
    let (left, right, top, bottom) = (70u32, 20u32, 40u32, 40u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let points: Vec<&(f64, f64)> = series.iter().flatten().filter(|(_, y)| y.is_finite()).collect();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in &points {
        (x0, x1, y0, y1) = (x0.min(*x), x1.max(*x), y0.min(*y), y1.max(*y));
    }
    if points.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let (pw, ph) = ((w - left - right) as f64, (h - top - bottom) as f64);
    let to_px =
        |x: f64, y: f64| (left as f64 + (x - x0) / (x1 - x0) * pw, top as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph);
    let grey = image::Rgb([120, 120, 120]);
    draw_line(&mut img, (left as f64, top as f64), (left as f64, top as f64 + ph), grey);
    draw_line(&mut img, (left as f64, top as f64 + ph), (left as f64 + pw, top as f64 + ph), grey);
    for (k, s) in series.iter().enumerate() {
        let colour = image::Rgb(COLOURS[k % COLOURS.len()]);
        let finite: Vec<_> = s.iter().filter(|(_, y)| y.is_finite()).collect();
        for pair in finite.windows(2) {
            draw_line(&mut img, to_px(pair[0].0, pair[0].1), to_px(pair[1].0, pair[1].1), colour);
        }
        if finite.len() == 1 {
            let (x, y) = to_px(finite[0].0, finite[0].1);
            draw_line(&mut img, (x - 2.0, y), (x + 2.0, y), colour);
        }
        let ly = top + 6 + 12 * k as u32;
        draw_line(&mut img, ((w - 180) as f64, ly as f64 + 3.0), ((w - 160) as f64, ly as f64 + 3.0), colour);
        draw_text(&mut img, w - 155, ly, names.get(k).copied().unwrap_or("?"), colour);
    }
    let black = image::Rgb([0, 0, 0]);
    draw_text(&mut img, left, 14, title, black);
    draw_text(&mut img, 4, top, &format_num(y1), black);
    draw_text(&mut img, 4, top + ph as u32 - 6, &format_num(y0), black);
    draw_text(&mut img, left, h - bottom + 8, &format_num(x0), black);
    let x1_label = format_num(x1);
    draw_text(&mut img, w - right - 6 * x1_label.len() as u32, h - bottom + 8, &x1_label, black);
    draw_text(&mut img, left + pw as u32 / 2 - 12, h - bottom + 22, "step", black);
    img
}

fn format_num(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// A line two pixels thick from `a` to `b` (points outside the image are skipped).
pub fn draw_line(img: &mut image::RgbImage, a: (f64, f64), b: (f64, f64), colour: image::Rgb<u8>) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        for (dx, dy) in [(0, 0), (0, 1)] {
            let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, colour);
            }
        }
    }
}

/// A 5×7 bitmap font for labels: digits, lower-case letters and a few signs (upper case is drawn
/// as lower case; anything else as a blank).
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '+' => [0, 4, 4, 31, 4, 4, 0],
        '_' => [0, 0, 0, 0, 0, 0, 31],
        '/' => [1, 1, 2, 4, 8, 16, 16],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        '=' => [0, 0, 31, 0, 31, 0, 0],
        'a' => [0, 0, 14, 1, 15, 17, 15],
        'b' => [16, 16, 22, 25, 17, 17, 30],
        'c' => [0, 0, 14, 16, 16, 17, 14],
        'd' => [1, 1, 13, 19, 17, 17, 15],
        'e' => [0, 0, 14, 17, 31, 16, 14],
        'f' => [6, 9, 8, 28, 8, 8, 8],
        'g' => [0, 15, 17, 17, 15, 1, 14],
        'h' => [16, 16, 22, 25, 17, 17, 17],
        'i' => [4, 0, 12, 4, 4, 4, 14],
        'j' => [2, 0, 6, 2, 2, 18, 12],
        'k' => [16, 16, 18, 20, 24, 20, 18],
        'l' => [12, 4, 4, 4, 4, 4, 14],
        'm' => [0, 0, 26, 21, 21, 17, 17],
        'n' => [0, 0, 22, 25, 17, 17, 17],
        'o' => [0, 0, 14, 17, 17, 17, 14],
        'p' => [0, 0, 30, 17, 30, 16, 16],
        'q' => [0, 0, 13, 19, 15, 1, 1],
        'r' => [0, 0, 22, 25, 16, 16, 16],
        's' => [0, 0, 14, 16, 14, 1, 30],
        't' => [8, 8, 28, 8, 8, 9, 6],
        'u' => [0, 0, 17, 17, 17, 19, 13],
        'v' => [0, 0, 17, 17, 17, 10, 4],
        'w' => [0, 0, 17, 17, 21, 21, 10],
        'x' => [0, 0, 17, 10, 4, 10, 17],
        'y' => [0, 0, 17, 17, 15, 1, 14],
        'z' => [0, 0, 31, 2, 4, 8, 31],
        _ => [0; 7],
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, 6 px per character.
pub fn draw_text(img: &mut image::RgbImage, x: u32, y: u32, text: &str, colour: image::Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        for (dy, row) in rows.iter().enumerate() {
            for dx in 0..5u32 {
                if row & (1 << (4 - dx)) != 0 {
                    let (px, py) = (x + 6 * i as u32 + dx, y + dy as u32);
                    if px < img.width() && py < img.height() {
                        img.put_pixel(px, py, colour);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_lines_draw_pixels_in_their_colour() {
        let mut img = image::RgbImage::from_pixel(60, 20, image::Rgb([255, 255, 255]));
        draw_text(&mut img, 2, 2, "0.5 step", image::Rgb([0, 0, 0]));
        let inked = img.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(inked > 20, "{inked} px of text");
        draw_line(&mut img, (0.0, 15.0), (59.0, 15.0), image::Rgb([1, 2, 3]));
        assert_eq!(img.pixels().filter(|p| p.0 == [1, 2, 3]).count(), 2 * 60, "two pixels thick");
        let chart = line_chart("t", &["a"], &[vec![(0.0, 1.0), (10.0, 0.5)]]);
        assert!(chart.pixels().filter(|p| p.0 == COLOURS[0]).count() > 100, "the curve is drawn");
    }
}
