//! Loading and compiling a big synthetic catalog (100,000 subscriptions, 1,000 APIs and 500
//! products, each with a policy): the time from JSON text to a ready catalog (criterion), and
//! the memory the loaded catalog holds (a counting allocator: live bytes after the load minus
//! before, with the JSON text and every temporary freed). And one policy document of the
//! largest size read, 256 KiB (goal: loaded in ≤ 50 ms).

use apim_edge_harness::synth::{self, Sizes};
use apim_edge_policies::{Catalog, LoadOptions};
use criterion::{criterion_group, criterion_main, Criterion};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SIZES: Sizes = Sizes {
    subscriptions: 100_000,
    apis: 1_000,
    products: 500,
};

fn bench(c: &mut Criterion) {
    let text = serde_json::to_string(&synth::catalog(SIZES)).unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    let catalog = Catalog::load_str(&text, LoadOptions::default()).unwrap();
    let held = LIVE.load(Ordering::Relaxed) - before;
    let s = catalog.summary();
    eprintln!(
        "catalog of {} subscriptions, {} APIs, {} products ({} programs, {} bytes of JSON): {:.1} MiB held",
        s.subscriptions,
        s.apis,
        s.products,
        s.programs,
        text.len(),
        held as f64 / (1024.0 * 1024.0)
    );
    drop(catalog);

    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    group.bench_function("100k subscriptions, 1k APIs, 500 products", |b| {
        b.iter(|| Catalog::load_str(&text, LoadOptions::default()).unwrap())
    });
    let big = largest_document();
    group.bench_function("one 256 KiB policy document", |b| {
        b.iter(|| Catalog::load_str(&big, LoadOptions::default()).unwrap())
    });
    group.finish();
}

/// A catalog whose one product policy is as large as a policy document may be: `set-header`
/// elements with expressions, one to a line, up to 256 KiB.
fn largest_document() -> String {
    let mut policy = String::from("<policies><inbound>\n");
    let closing = "</inbound></policies>";
    let mut i = 0;
    loop {
        let el = format!(
            "<set-header name=\"x-h{i}\" exists-action=\"override\"><value>@(context.Request.Method + \"-{i}\")</value></set-header>\n"
        );
        if policy.len() + el.len() + closing.len() > 256 * 1024 {
            break;
        }
        policy.push_str(&el);
        i += 1;
    }
    policy.push_str(closing);
    serde_json::json!({
        "apis": [{"name": "a", "path": "a"}],
        "products": [{"name": "p", "apis": ["a"], "policy": policy}],
    })
    .to_string()
}

criterion_group!(benches, bench);
criterion_main!(benches);
