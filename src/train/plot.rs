//! The run's curves as SVG: training loss and the headline dev metric
//! against the optimiser step, side by side.
//!
//! Plotters renders without system fonts here (its SVG backend leaves the
//! glyphs to the viewer), so the plot costs no native dependency.

use std::path::Path;

use crate::Error;
use plotters::prelude::*;

/// The points of one run, as read from its `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Curves {
    /// `(step, mean training loss since the previous log line)`.
    pub loss: Vec<(u64, f64)>,
    /// `(step, headline dev metric)`; evaluations where it is undefined are
    /// left out.
    pub dev: Vec<(u64, f64)>,
    pub metric: String,
}

impl Curves {
    /// Reads the loss and `metric` lines of a `metrics.jsonl` text.
    pub fn from_metrics_jsonl(text: &str, metric: &str) -> Self {
        let mut curves = Curves {
            metric: metric.to_string(),
            ..Default::default()
        };
        for value in text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let Some(step) = value["step"].as_u64() else {
                continue;
            };
            if value["eval"].as_bool() == Some(true) {
                if let Some(v) = value["metrics"][metric].as_f64() {
                    curves.dev.push((step, v));
                }
            } else if let Some(loss) = value["loss"].as_f64() {
                curves.loss.push((step, loss));
            }
        }
        curves
    }
}

fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    // A flat series (one evaluation, say) gets a visible span around it
    // rather than a ±0.001 axis that looks empty.
    let pad = ((hi - lo) * 0.08).max(0.05 * hi.abs().max(lo.abs()).max(0.1));
    (lo - pad)..(hi + pad)
}

/// The step axis, padded on both sides so a point at the first or last
/// step is drawn whole.
fn step_range(max_step: u64) -> std::ops::Range<f64> {
    let max = max_step.max(1) as f64;
    let pad = (max * 0.03).max(0.5);
    -pad..max + pad
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    title: &str,
    y_name: &str,
    points: &[(u64, f64)],
    max_step: u64,
    color: RGBColor,
) -> DrawResult<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(step_range(max_step), range(points.iter().map(|p| p.1)))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| {
            // Steps are whole numbers: label only the integer ticks.
            if x.fract().abs() < 1e-9 && *x >= 0.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_desc(y_name)
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().map(|&(s, v)| (s as f64, v)),
        color.stroke_width(2),
    ))?;
    chart.draw_series(
        points
            .iter()
            .map(|&(s, v)| Circle::new((s as f64, v), 3, color.filled())),
    )?;
    Ok(())
}

/// The SVG text of the two panels.
pub fn render_svg(curves: &Curves) -> Result<String, Error> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 400)).into_drawing_area();
        let draw = || -> DrawResult<()> {
            root.fill(&WHITE)?;
            let (left, right) = root.split_horizontally(500);
            let max_step = curves
                .loss
                .iter()
                .chain(curves.dev.iter())
                .map(|p| p.0)
                .max()
                .unwrap_or(1);
            panel(&left, "training loss", "loss", &curves.loss, max_step, BLUE)?;
            let title = format!("dev {}", curves.metric);
            panel(&right, &title, &curves.metric, &curves.dev, max_step, RED)?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| format!("drawing the training curves: {e}"))?;
    }
    Ok(svg)
}

/// Renders `curves` and writes them to `path` atomically.
pub fn write_svg(path: &Path, curves: &Curves) -> Result<(), Error> {
    let svg = render_svg(curves)?;
    crate::io::write_atomic(path, svg.as_bytes()).map_err(Error::from)
}

/// Named `(x, y)` series on one chart (a figure such as rank against dev
/// score), each in its own colour, with a legend.
pub fn render_series_svg(
    title: &str,
    x_name: &str,
    y_name: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<String, Error> {
    const COLORS: [RGBColor; 6] = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (700, 450)).into_drawing_area();
        let draw = || -> DrawResult<()> {
            root.fill(&WHITE)?;
            let all = || series.iter().flat_map(|(_, p)| p.iter());
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(range(all().map(|p| p.0)), range(all().map(|p| p.1)))?;
            chart
                .configure_mesh()
                .x_desc(x_name)
                .y_desc(y_name)
                .light_line_style(WHITE.mix(0.0))
                .draw()?;
            for (i, (name, points)) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        color.stroke_width(2),
                    ))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| format!("drawing {title}: {e}"))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"{"step":10,"loss":0.9,"lr":1e-4}
{"step":20,"loss":0.7,"lr":1e-4}
{"eval":true,"step":20,"epoch":0,"metrics":{"accuracy":0.61,"f1":0.5}}
{"step":30,"loss":0.5,"lr":1e-4}
{"eval":true,"step":30,"epoch":0,"metrics":{"accuracy":null}}
{"eval":true,"step":40,"epoch":1,"metrics":{"accuracy":0.72}}
"#;

    #[test]
    fn reads_loss_and_headline_metric() {
        let c = Curves::from_metrics_jsonl(METRICS, "accuracy");
        assert_eq!(c.loss, vec![(10, 0.9), (20, 0.7), (30, 0.5)]);
        assert_eq!(c.dev, vec![(20, 0.61), (40, 0.72)]);
    }

    #[test]
    fn axes_are_padded_around_single_points() {
        let r = range([0.8028].into_iter());
        assert!(r.end - r.start > 0.05, "{r:?}");
        assert!(r.start < 0.8028 && r.end > 0.8028);
        let s = step_range(250);
        assert!(s.start < 0.0 && s.end > 250.0, "{s:?}");
    }

    #[test]
    fn renders_both_curves() {
        let svg = render_svg(&Curves::from_metrics_jsonl(METRICS, "accuracy")).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.contains("training loss") && svg.contains("dev accuracy"));
        // One line per panel through its points, one marker per point.
        let line = |color: &str| {
            svg.lines()
                .filter(|l| l.starts_with("<polyline") && l.contains(color))
                .map(|l| {
                    l.split("points=\"")
                        .nth(1)
                        .unwrap()
                        .split_whitespace()
                        .filter(|p| p.contains(','))
                        .count()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(line("#0000FF"), vec![3]);
        assert_eq!(line("#FF0000"), vec![2]);
        assert_eq!(svg.matches("<circle").count(), 5);
        // An empty run still renders (axes only) rather than failing.
        assert!(render_svg(&Curves::default()).is_ok());
    }

    #[test]
    fn renders_named_series_with_a_legend() {
        let series = vec![
            (
                "cola".to_string(),
                vec![(8.0, 82.0), (16.0, 82.8), (32.0, 83.0)],
            ),
            ("rte".to_string(), vec![(8.0, 70.7), (16.0, 69.3)]),
        ];
        let svg = render_series_svg("rank vs score", "rank r", "score", &series).unwrap();
        assert!(
            svg.contains("\ncola\n</text>") && svg.contains("\nrte\n</text>"),
            "{svg}"
        );
        assert_eq!(svg.matches("<circle").count(), 5);
    }
}
