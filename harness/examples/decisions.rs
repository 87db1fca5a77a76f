//! The engine's admitted keyed call (as in `benches/engine.rs`), run a fixed number of times, for
//! instruction counts that this noisy machine cannot blur:
//!
//! ```text
//! cargo build --profile profiling --example decisions -p apim-edge-harness
//! valgrind --tool=callgrind target/profiling/examples/decisions 100000
//! valgrind --tool=callgrind target/profiling/examples/decisions 100000 1 1000
//! valgrind --tool=callgrind target/profiling/examples/decisions 100000 1 0 limited
//! ```
//!
//! Arguments: calls, how many subscribers take turns (10,000), milliseconds between calls (1),
//! and which call (`admitted`, the default; `limited`, a 429 once the first 1,000 calls have
//! used the rate limit up, those counted in; `invalid`, a 401). The second line is the engine
//! bench's one busy subscriber at a call a second; the third its 429.
//!
//! `starter` is the issue's own case instead ([`synth::starter`]): one subscriber under a
//! product of only a rate limit and a quota, the decision alone, once a second (the engine
//! bench's `starter/decision`): `decisions N 1 1000 starter`.
//!
//! It prints how many calls it made; callgrind's total over two runs of different lengths gives
//! the instructions per call (the difference divided by the difference in calls), without the
//! catalog load.

use apim_edge_harness::synth::{self, Sizes};
use apim_edge_policies::{Catalog, Completion, LoadOptions, MemoryStore, Outcome, Request};
use std::hint::black_box;

const SIZES: Sizes = Sizes {
    subscriptions: 10_000,
    apis: 100,
    products: 50,
};

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| -> anyhow::Result<usize> {
        Ok(std::env::args()
            .nth(i)
            .map(|n| n.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (calls, subscribers, step) = (
        arg(1, 100_000)?,
        arg(2, SIZES.subscriptions)?.clamp(1, SIZES.subscriptions),
        arg(3, 1)? as i64,
    );
    let (want, admitted_first) = match std::env::args().nth(4).as_deref() {
        None | Some("admitted") => (Outcome::Allowed, 0),
        // Product 0's rate limit is 1,000 calls a minute.
        Some("limited") => (Outcome::RateLimited, 1_000),
        Some("invalid") => (Outcome::InvalidKey, 0),
        Some("starter") => return starter(calls, step),
        Some(other) => {
            anyhow::bail!("unknown call '{other}': admitted, limited, invalid or starter")
        }
    };
    let catalog = Catalog::load(&synth::catalog(SIZES), LoadOptions::default())?;
    let callers = synth::Callers::new(SIZES);
    let done = Completion {
        status: 200,
        request_bytes: 0,
        response_bytes: 512,
    };
    let bad = vec![(
        "Ocp-Apim-Subscription-Key".to_string(),
        "not-a-key".to_string(),
    )];
    let store = MemoryStore::new();
    let start = 1_767_225_600_000i64;
    for k in 0..calls {
        let now = start + k as i64 * step;
        let i = k % subscribers;
        let req = match want {
            Outcome::InvalidKey => Request {
                headers: &bad,
                ..callers.request(i)
            },
            _ => callers.request(i),
        };
        let decided = catalog.decide(black_box(&req), now, &store);
        let d = decided.as_ref().map_err(Clone::clone)?;
        let expected = if k < admitted_first {
            Outcome::Allowed
        } else {
            want
        };
        anyhow::ensure!(d.outcome == expected, "call {k}: {:?}", d.outcome);
        if let Some(call) = d.call.as_ref().filter(|_| d.outcome == Outcome::Allowed) {
            black_box(catalog.respond(call, 200, &|_| false)?);
            catalog.complete(call, done, now, &store)?;
        }
    }
    println!(
        "{calls} calls, {} after the first {admitted_first}",
        want.as_str()
    );
    Ok(())
}

/// The issue's case: [`synth::starter`]'s call decided `calls` times, `step` ms apart.
fn starter(calls: usize, step: i64) -> anyhow::Result<()> {
    let catalog = Catalog::load(&synth::starter(), LoadOptions::default())?;
    let headers = synth::starter_headers();
    let req = synth::starter_request(&headers);
    let store = MemoryStore::new();
    let start = 1_767_225_600_000i64;
    for k in 0..calls {
        let decided = catalog.decide(black_box(&req), start + k as i64 * step, &store);
        let d = decided.as_ref().map_err(Clone::clone)?;
        anyhow::ensure!(d.outcome == Outcome::Allowed, "call {k}: {:?}", d.outcome);
        black_box(d);
    }
    println!("{calls} starter decisions");
    Ok(())
}
