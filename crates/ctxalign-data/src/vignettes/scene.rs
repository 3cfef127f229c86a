//! Scene graphs of the Vignettes world and their rendering.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    Grey,
    Blue,
    Beige,
    Green,
}

pub const SHAPES: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Diamond];
pub const COLORS: [Color; 6] = [Color::Red, Color::Green, Color::Blue, Color::Yellow, Color::Purple, Color::Orange];
pub const SIZES: [Size; 2] = [Size::Small, Size::Large];
pub const BACKGROUNDS: [Background; 4] = [Background::Grey, Background::Blue, Background::Beige, Background::Green];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
        }
    }
}

impl Color {
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }

    fn rgb(self) -> [f32; 3] {
        match self {
            Color::Red => [220., 40., 40.],
            Color::Green => [40., 170., 60.],
            Color::Blue => [40., 80., 220.],
            Color::Yellow => [240., 210., 40.],
            Color::Purple => [140., 50., 170.],
            Color::Orange => [245., 140., 30.],
        }
    }
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }
}

impl Background {
    pub fn name(self) -> &'static str {
        match self {
            Background::Grey => "grey",
            Background::Blue => "blue",
            Background::Beige => "beige",
            Background::Green => "green",
        }
    }

    fn rgb(self) -> [f32; 3] {
        match self {
            Background::Grey => [200., 200., 200.],
            Background::Blue => [190., 210., 235.],
            Background::Beige => [235., 222., 195.],
            Background::Green => [200., 228., 200.],
        }
    }
}

/// One object; positions are fractions of the image side, (0, 0) top-left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    pub x: f64,
    pub y: f64,
    /// Rotation in radians (squares, triangles and diamonds).
    pub angle: f64,
    /// Fraction of the object's pixels not covered by objects in front of it (set by [`render`]).
    #[serde(default)]
    pub visible: f64,
    /// Objects (indices) covering at least 3 % of this one (set by [`render`]).
    #[serde(default)]
    pub hidden_by: Vec<usize>,
}

impl Object {
    /// Radius as a fraction of the image side.
    pub fn radius(&self) -> f64 {
        match self.size {
            Size::Small => 0.085,
            Size::Large => 0.15,
        }
    }
}

/// A scene: background and objects in drawing order (later objects are in front).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    /// Brightness shift of the background gradient, −1..1 (variation without changing its name).
    pub shade: f64,
    pub objects: Vec<Object>,
}

/// Signed distance (pixels) from `p` to the object's outline; negative inside.
fn signed_distance(o: &Object, side: f64, px: f64, py: f64) -> f64 {
    let (cx, cy, r) = (o.x * side, o.y * side, o.radius() * side);
    let (dx, dy) = (px - cx, py - cy);
    if o.shape == Shape::Circle {
        return (dx * dx + dy * dy).sqrt() - r;
    }
    // Convex polygons: the largest signed distance to an edge line.
    let (s, c) = o.angle.sin_cos();
    let (lx, ly) = (c * dx + s * dy, -s * dx + c * dy); // into the object's frame
    match o.shape {
        Shape::Square => {
            let h = r * 0.85;
            (lx.abs() - h).max(ly.abs() - h)
        }
        Shape::Diamond => {
            let (a, b) = (r * 1.1, r * 0.75); // half-diagonals
            (lx.abs() / a + ly.abs() / b - 1.0) * (a * b) / (a * a + b * b).sqrt()
        }
        Shape::Triangle => {
            let rr = r * 1.15; // circumradius; apex up in the object's frame
            let inr = rr * 0.5;
            let mut d = f64::MIN;
            for k in 0..3 {
                let t = std::f64::consts::PI / 2.0 + k as f64 * 2.0 * std::f64::consts::PI / 3.0;
                // Outward normal of the edge opposite vertex k points away from it.
                let (nx, ny) = (-t.cos(), t.sin());
                d = d.max(lx * nx + ly * ny - inr);
            }
            d
        }
        Shape::Circle => unreachable!(),
    }
}

/// Renders `scene` at `side × side` pixels (anti-aliased by signed-distance coverage) and fills in
/// each object's `visible` fraction and `hidden_by` list.
pub fn render(scene: &mut Scene, side: u32) -> RgbImage {
    let n = side as usize;
    let s = side as f64;
    let base = scene.background.rgb();
    let shade = scene.shade * 12.0;
    let mut buf: Vec<[f32; 3]> = (0..n * n)
        .map(|i| {
            let y = (i / n) as f32 / n as f32;
            let g = shade as f32 + 14.0 * (0.5 - y); // vertical gradient
            [base[0] + g, base[1] + g, base[2] + g]
        })
        .collect();
    // Top-most object whose coverage at the pixel centre exceeds one half.
    let mut owner: Vec<i32> = vec![-1; n * n];
    let mut area = vec![0usize; scene.objects.len()];
    let mut covered_by = vec![vec![0usize; scene.objects.len()]; scene.objects.len()];
    for (k, o) in scene.objects.iter().enumerate() {
        let col = o.color.rgb();
        let reach = (o.radius() * 1.2 * s + 2.0) as i64;
        let (cx, cy) = ((o.x * s) as i64, (o.y * s) as i64);
        for py in (cy - reach).max(0)..(cy + reach).min(n as i64) {
            for px in (cx - reach).max(0)..(cx + reach).min(n as i64) {
                let d = signed_distance(o, s, px as f64 + 0.5, py as f64 + 0.5);
                let cov = (0.5 - d).clamp(0.0, 1.0) as f32;
                if cov <= 0.0 {
                    continue;
                }
                let i = py as usize * n + px as usize;
                for c in 0..3 {
                    buf[i][c] = buf[i][c] * (1.0 - cov) + col[c] * cov;
                }
                if cov > 0.5 {
                    if owner[i] >= 0 {
                        covered_by[owner[i] as usize][k] += 1;
                    }
                    owner[i] = k as i32;
                    area[k] += 1;
                }
            }
        }
    }
    let mut visible = vec![0usize; scene.objects.len()];
    for &o in &owner {
        if o >= 0 {
            visible[o as usize] += 1;
        }
    }
    for (k, o) in scene.objects.iter_mut().enumerate() {
        o.visible = if area[k] == 0 { 0.0 } else { visible[k] as f64 / area[k] as f64 };
        o.hidden_by = (0..covered_by.len())
            .filter(|&j| area[k] > 0 && covered_by[k][j] as f64 >= 0.03 * area[k] as f64)
            .collect();
    }
    let mut img = RgbImage::new(side, side);
    for (i, p) in img.pixels_mut().enumerate() {
        *p = image::Rgb(buf[i].map(|v| v.round().clamp(0.0, 255.0) as u8));
    }
    img
}

/// A random object kept inside the canvas.
pub fn random_object(rng: &mut Rng) -> Object {
    let size = *rng.pick(&SIZES);
    let mut o = Object {
        shape: *rng.pick(&SHAPES),
        color: *rng.pick(&COLORS),
        size,
        x: 0.0,
        y: 0.0,
        angle: rng.range_f64(-0.5, 0.5),
        visible: 1.0,
        hidden_by: vec![],
    };
    place(&mut o, rng);
    o
}

/// Moves `o` to a random position inside the canvas.
pub fn place(o: &mut Object, rng: &mut Rng) {
    let m = o.radius() + 0.02;
    o.x = rng.range_f64(m, 1.0 - m);
    o.y = rng.range_f64(m, 1.0 - m);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occlusion_is_measured() {
        let obj = |x, color| Object {
            shape: Shape::Square,
            color,
            size: Size::Large,
            x,
            y: 0.5,
            angle: 0.0,
            visible: 0.0,
            hidden_by: vec![],
        };
        let mut scene = Scene {
            background: Background::Grey,
            shade: 0.0,
            objects: vec![obj(0.4, Color::Red), obj(0.55, Color::Blue), obj(0.9, Color::Green)],
        };
        let img = render(&mut scene, 96);
        let [a, b, c] = [&scene.objects[0], &scene.objects[1], &scene.objects[2]];
        assert!(a.visible > 0.3 && a.visible < 0.8, "{}", a.visible);
        assert_eq!(a.hidden_by, vec![1]);
        assert_eq!(b.visible, 1.0);
        assert!(c.visible > 0.99 && c.hidden_by.is_empty());
        // The pixel at the blue square's centre is blue.
        let p = img.get_pixel((0.55 * 96.0) as u32, 48);
        assert!(p[2] > 200 && p[0] < 60, "{p:?}");
    }
}
