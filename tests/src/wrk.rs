//! wrk's text output, parsed once for the tests and the benchmark harness.

use anyhow::{Context, Result};

/// What one wrk run reported.
#[derive(Debug, Default, Clone, Copy)]
pub struct WrkRun {
    /// Completed requests ("N requests in ...").
    pub requests: u64,
    /// "Requests/sec:".
    pub rps: f64,
    /// Latency percentiles in ms (`--latency`; NaN without it).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors: connect, read, write, timeout.
    pub errors: [u64; 4],
    /// "Non-2xx or 3xx responses:".
    pub non_2xx: u64,
}

impl WrkRun {
    /// Parse wrk's stdout; fails if it has no request count or rate.
    pub fn parse(text: &str) -> Result<WrkRun> {
        let requests = text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no request count in wrk output:\n{text}"))?;
        let rps = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
        let mut r = WrkRun {
            requests,
            rps,
            p50_ms: latency_ms(text, "50%"),
            p99_ms: latency_ms(text, "99%"),
            ..WrkRun::default()
        };
        for l in text.lines() {
            if let Some(rest) = l.trim().strip_prefix("Socket errors:") {
                for (i, p) in rest.split(',').enumerate().take(4) {
                    r.errors[i] = p
                        .split_whitespace()
                        .last()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(1);
                }
            }
            if let Some(rest) = l.trim().strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx = rest.trim().parse().unwrap_or(1);
            }
        }
        Ok(r)
    }

    /// Socket errors plus non-2xx responses.
    pub fn bad(&self) -> u64 {
        self.errors.iter().sum::<u64>() + self.non_2xx
    }
}

fn latency_ms(out: &str, pct: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(pct))
        .map(|v| v.trim())
        .and_then(|v| {
            let (num, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
            let n: f64 = num.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                "m" => n * 60_000.0,
                _ => n,
            })
        })
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_rates_latency_and_errors() {
        let out = "Running 2s test @ http://x/\n  1 threads and 8 connections\n  Latency Distribution\n     50%  250.00us\n     99%    1.50ms\n  64148 requests in 6.00s, 18.60MB read\n  Socket errors: connect 0, read 8, write 0, timeout 2\n  Non-2xx or 3xx responses: 3\nRequests/sec:  10687.75\n";
        let w = WrkRun::parse(out).unwrap();
        assert_eq!(w.requests, 64148);
        assert_eq!(w.rps, 10687.75);
        assert_eq!((w.p50_ms, w.p99_ms), (0.25, 1.5));
        assert_eq!(w.errors, [0, 8, 0, 2]);
        assert_eq!(w.bad(), 13);
        assert!(WrkRun::parse("nothing").is_err());
    }
}
