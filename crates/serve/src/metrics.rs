//! Counters, gauges and histograms for `GET /metrics`, in Prometheus' text format (version
//! 0.0.4). A handful of fixed series, so a small writer of our own rather than a metrics crate.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket counts (not cumulative), then +Inf; the sum.
    state: Mutex<(Vec<u64>, f64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            state: Mutex::new((vec![0; bounds.len() + 1], 0.0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0[i] += 1;
        s.1 += v;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&s.0) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        cum += s.0[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", s.1);
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

pub struct Metrics {
    /// Finished HTTP requests by endpoint and status code.
    requests: Mutex<Vec<(String, u16, u64)>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Requests waiting for a slot.
    pub queued: AtomicU64,
    /// Requests being generated.
    pub running: AtomicU64,
    /// Requests stopped because their client went away.
    pub cancelled: AtomicU64,
    /// Requests ended by an error inside the engine.
    pub errors: AtomicU64,
    pub ttft: Histogram,
    pub token_time: Histogram,
    pub queue_time: Histogram,
    pub e2e: Histogram,
    pub batch_size: Histogram,
    /// Engine steps run, and the time they spent in each phase (nanoseconds): the batched
    /// forward (the backend, with its copies), sampling, and streaming the results.
    pub steps: AtomicU64,
    pub forward_ns: AtomicU64,
    pub sample_ns: AtomicU64,
    pub emit_ns: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(Vec::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BUCKETS),
            token_time: Histogram::new(LATENCY_BUCKETS),
            queue_time: Histogram::new(LATENCY_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            batch_size: Histogram::new(BATCH_BUCKETS),
            steps: AtomicU64::new(0),
            forward_ns: AtomicU64::new(0),
            sample_ns: AtomicU64::new(0),
            emit_ns: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        match r.iter_mut().find(|(e, s, _)| e == endpoint && *s == status) {
            Some(x) => x.2 += 1,
            None => r.push((endpoint.to_string(), status, 1)),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP qlora_requests_total HTTP requests answered, by endpoint and status.\n# TYPE qlora_requests_total counter"
        );
        for (e, s, n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "qlora_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        let counters = [
            (
                "qlora_prompt_tokens_total",
                "Prompt tokens prefilled.",
                &self.prompt_tokens,
                "counter",
            ),
            (
                "qlora_generation_tokens_total",
                "Tokens generated.",
                &self.generation_tokens,
                "counter",
            ),
            (
                "qlora_cancelled_total",
                "Requests stopped because the client disconnected.",
                &self.cancelled,
                "counter",
            ),
            (
                "qlora_engine_errors_total",
                "Requests ended by an engine error.",
                &self.errors,
                "counter",
            ),
            (
                "qlora_engine_steps_total",
                "Engine steps (one batched forward each).",
                &self.steps,
                "counter",
            ),
            (
                "qlora_queue_depth",
                "Requests waiting for a slot.",
                &self.queued,
                "gauge",
            ),
            (
                "qlora_running",
                "Requests being generated.",
                &self.running,
                "gauge",
            ),
        ];
        for (name, help, v, kind) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP qlora_engine_seconds_total Engine time by step phase: the batched forward, sampling, streaming.\n# TYPE qlora_engine_seconds_total counter"
        );
        for (phase, ns) in [
            ("forward", &self.forward_ns),
            ("sample", &self.sample_ns),
            ("emit", &self.emit_ns),
        ] {
            let _ = writeln!(
                out,
                "qlora_engine_seconds_total{{phase=\"{phase}\"}} {}",
                ns.load(Ordering::Relaxed) as f64 * 1e-9
            );
        }
        self.ttft.write(
            &mut out,
            "qlora_time_to_first_token_seconds",
            "From arrival to the first generated token.",
        );
        self.token_time.write(
            &mut out,
            "qlora_time_per_output_token_seconds",
            "Between consecutive generated tokens of a request.",
        );
        self.queue_time.write(
            &mut out,
            "qlora_queue_time_seconds",
            "From arrival to admission into the running batch.",
        );
        self.e2e.write(
            &mut out,
            "qlora_request_duration_seconds",
            "From arrival to the last byte of a generation request.",
        );
        self.batch_size.write(
            &mut out,
            "qlora_batch_size",
            "Requests in the running batch at each engine step.",
        );
        out
    }
}
