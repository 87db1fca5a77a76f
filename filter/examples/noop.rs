//! A proxy-wasm HTTP filter that does nothing: the baseline `envoy/bench.sh` compares apim-edge
//! with (the cost of a wasm filter itself, per call).

use proxy_wasm::traits::{Context, HttpContext};

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Noop) });
}}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}
