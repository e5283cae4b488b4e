//! In-process cost of one review: parse the AdmissionReview, decide, serialize the answer.
//!
//! `cargo bench --bench decision [-- FIXTURE.json]` (default: tests/data/update-new-template.json,
//! a template change that produces a patch: the most expensive path).
use std::hint::black_box;
use std::time::{Duration, Instant};

const WARMUP: usize = 2_000;
const SAMPLES: usize = 50_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".json"))
        .unwrap_or_else(|| "tests/data/update-new-template.json".to_owned());
    let body = std::fs::read(&path)?;
    let (label, answer) = fledge::server::review(&body).map_err(|e| e.0)?;
    println!(
        "review {path}: {} bytes in, {} bytes out, decision {label}",
        body.len(),
        answer.len()
    );
    for _ in 0..WARMUP {
        black_box(fledge::server::review(black_box(&body)).map_err(|e| e.0)?);
    }
    let mut samples = Vec::with_capacity(SAMPLES);
    let started = Instant::now();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        black_box(fledge::server::review(black_box(&body)).map_err(|e| e.0)?);
        samples.push(t.elapsed());
    }
    let total = started.elapsed();
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "parse+decide+serialize over {SAMPLES} runs: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs; {:.0} reviews/s on one core",
        us(at(0.50)),
        us(at(0.90)),
        us(at(0.99)),
        us(at(0.999)),
        us(samples[samples.len() - 1]),
        SAMPLES as f64 / total.as_secs_f64()
    );
    println!(
        "target p99 < 1000 µs: {}",
        if at(0.99) < Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
