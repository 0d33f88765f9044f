//! Line charts as PNG, drawn in Rust (no Python at run time): the loss and acceptance curves of
//! the model card and the per-position acceptance of `eval`.

use std::convert::Infallible;
use std::path::Path;

use embedded_graphics::mono_font::ascii::FONT_6X10;
use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, PrimitiveStyle, Rectangle};
use embedded_graphics::text::Text;

use crate::error::{Error, Result};

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, drawn in order.
    pub points: Vec<(f64, f64)>,
}

/// Colours for successive series.
const PALETTE: [Rgb888; 8] = [
    Rgb888::new(31, 119, 180),
    Rgb888::new(214, 39, 40),
    Rgb888::new(44, 160, 44),
    Rgb888::new(255, 127, 14),
    Rgb888::new(148, 103, 189),
    Rgb888::new(140, 86, 75),
    Rgb888::new(227, 119, 194),
    Rgb888::new(127, 127, 127),
];

struct Canvas {
    w: u32,
    h: u32,
    rgb: Vec<u8>,
}

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.w, self.h)
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(&mut self, pixels: I) -> std::result::Result<(), Infallible> {
        for Pixel(p, c) in pixels {
            if p.x >= 0 && p.y >= 0 && (p.x as u32) < self.w && (p.y as u32) < self.h {
                let i = 3 * (p.y as usize * self.w as usize + p.x as usize);
                self.rgb[i..i + 3].copy_from_slice(&[c.r(), c.g(), c.b()]);
            }
        }
        Ok(())
    }
}

/// A tick label: short, fixed precision chosen from the axis span.
fn label(v: f64, span: f64) -> String {
    if span >= 100.0 || v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if span >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Draws `series` into a 720×420 PNG at `path`.
pub fn line_chart(path: &Path, title: &str, x_label: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let (w, h) = (720u32, 420u32);
    let mut c = Canvas { w, h, rgb: vec![255; (w * h * 3) as usize] };
    let (left, right, top, bottom) = (70i32, 20i32, 34i32, 46i32);
    let (pw, ph) = (w as i32 - left - right, h as i32 - top - bottom);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    (y0, y1) = (y0 - pad, y1 + pad);
    let to_px =
        |x: f64, y: f64| Point::new(left + ((x - x0) / (x1 - x0) * pw as f64) as i32, top + ph - ((y - y0) / (y1 - y0) * ph as f64) as i32);
    let black = Rgb888::BLACK;
    let grey = Rgb888::new(220, 220, 220);
    let text = MonoTextStyle::new(&FONT_6X10, black);
    let _ = Text::new(title, Point::new(left, 20), text).draw(&mut c);
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        let px = to_px(xv, y0);
        let py = to_px(x0, yv);
        let _ = Line::new(Point::new(px.x, top), Point::new(px.x, top + ph)).into_styled(PrimitiveStyle::with_stroke(grey, 1)).draw(&mut c);
        let _ =
            Line::new(Point::new(left, py.y), Point::new(left + pw, py.y)).into_styled(PrimitiveStyle::with_stroke(grey, 1)).draw(&mut c);
        let _ = Text::new(&label(xv, x1 - x0), Point::new(px.x - 10, top + ph + 14), text).draw(&mut c);
        let _ = Text::new(&label(yv, y1 - y0), Point::new(4, py.y + 3), text).draw(&mut c);
    }
    let _ = Rectangle::new(Point::new(left, top), Size::new(pw as u32, ph as u32))
        .into_styled(PrimitiveStyle::with_stroke(black, 1))
        .draw(&mut c);
    let _ = Text::new(x_label, Point::new(left + pw / 2 - 3 * x_label.len() as i32, h as i32 - 10), text).draw(&mut c);
    let _ = Text::new(y_label, Point::new(4, top - 6), text).draw(&mut c);
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let style = PrimitiveStyle::with_stroke(color, 2);
        let pts: Vec<Point> = s.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|&(x, y)| to_px(x, y)).collect();
        for w in pts.windows(2) {
            let _ = Line::new(w[0], w[1]).into_styled(style).draw(&mut c);
        }
        if pts.len() == 1 {
            let _ = Rectangle::new(pts[0] - Point::new(2, 2), Size::new(5, 5)).into_styled(PrimitiveStyle::with_fill(color)).draw(&mut c);
        }
        let ly = top + 12 + 14 * i as i32;
        let lx = left + pw - 150;
        let _ = Line::new(Point::new(lx, ly - 3), Point::new(lx + 18, ly - 3)).into_styled(style).draw(&mut c);
        let _ = Text::new(&s.name, Point::new(lx + 24, ly), text).draw(&mut c);
    }
    write_png(path, &c)
}

fn write_png(path: &Path, c: &Canvas) -> Result<()> {
    crate::util::fs::write_atomic_with(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), c.w, c.h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| Error::io(tmp, std::io::Error::other(e.to_string()));
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(&c.rgb).map_err(err)?;
        w.finish().map_err(err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_the_drawn_series() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        let s = vec![Series { name: "loss".into(), points: (0..20).map(|i| (i as f64, 1.0 / (1.0 + i as f64))).collect() }];
        line_chart(&p, "title", "step", "loss", &s).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        r.next_frame(&mut buf).unwrap();
        // Some pixels carry the first palette colour: the series was drawn.
        assert!(buf.chunks(3).any(|px| px == [31, 119, 180]));
    }
}
