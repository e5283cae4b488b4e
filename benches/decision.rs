//! In-process cost of one review: parse the AdmissionReview, decide, serialize the answer.
//!
//! `cargo bench --bench decision [-- FIXTURE.json ...]`. Default: `tests/data/update-new-template.json`
//! (a template change answered with a patch: the most expensive path) and
//! `tests/data/update-scale-only.json` (the common path). Fixtures are compacted first, as the API
//! server sends JSON. `FLEDGE_BENCH_RUNS` (default 50,000) sets the measured runs, e.g. few under
//! callgrind, which counts instructions per review repeatably:
//! `valgrind --tool=callgrind --toggle-collect='fledge::runtime::server::review' BENCH_BINARY`.
use std::hint::black_box;
use std::time::{Duration, Instant};

const WARMUP: usize = 2_000;
const DEFAULT: [&str; 2] = [
    "tests/data/update-new-template.json",
    "tests/data/update-scale-only.json",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut paths: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.ends_with(".json"))
        .collect();
    if paths.is_empty() {
        paths = DEFAULT.map(String::from).to_vec();
    }
    let runs = std::env::var("FLEDGE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000)
        .max(1);
    for path in paths {
        let body = compact(&std::fs::read(&path)?)?;
        measure(&path, &body, runs)?;
    }
    Ok(())
}

/// The JSON without whitespace.
pub fn compact(body: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(body)?)
}

fn measure(path: &str, body: &[u8], runs: usize) -> Result<(), Box<dyn std::error::Error>> {
    let policies = fledge::core::policy::PolicySnapshot::default();
    let review = |body: &[u8]| fledge::runtime::server::review(body, &policies).map_err(|e| e.0);
    let (label, answer) = review(body)?;
    println!(
        "{path}: {} bytes in, {} bytes out, decision {label}",
        body.len(),
        answer.len()
    );
    for _ in 0..WARMUP.min(runs) {
        black_box(review(black_box(body))?);
    }
    let mut samples = Vec::with_capacity(runs);
    let started = Instant::now();
    for _ in 0..runs {
        let t = Instant::now();
        black_box(review(black_box(body))?);
        samples.push(t.elapsed());
    }
    let total = started.elapsed();
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "  parse+decide+serialize, {runs} runs: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs; {:.0} reviews/s on one core",
        us(at(0.50)),
        us(at(0.90)),
        us(at(0.99)),
        us(at(0.999)),
        us(samples[samples.len() - 1]),
        runs as f64 / total.as_secs_f64()
    );
    println!(
        "  target p99 < 1000 µs: {}",
        if at(0.99) < Duration::from_millis(1) {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
