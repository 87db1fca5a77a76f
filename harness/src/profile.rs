//! Host profiles: which proxy-wasm runtime the host stands in for.
//!
//! - [`Profile::Envoy`] (the default): Envoy 1.40, every host function of ABI 0.2.1, memory and
//!   CPU bounded only by the host's own deadline; a failed VM stays failed (503, or the
//!   upstream's answer under `FAIL_OPEN`).
//! - [`Profile::ServiceExtensions`]: Google's Service Extensions plugins (Cloud CDN, Media CDN,
//!   Application Load Balancers), as their documentation describes them. No shared data, shared
//!   queues, timers, custom metrics or outbound calls: those host functions answer
//!   `Unimplemented` (12), as proxy-wasm-cpp-host's defaults do. At most
//!   [`SERVICE_EXTENSIONS_MEMORY`] of linear memory per VM, and about 1 ms of normalised CPU per
//!   callback, enforced here as [`SERVICE_EXTENSIONS_FUEL`] units of wasmtime fuel (one unit is
//!   about one wasm instruction; the normalised platform is a 4 GHz processor, so 1 ms is taken
//!   as 4 million instructions). A plugin past either limit is terminated and its request gets
//!   500; the runtime then serves later requests from a fresh VM, whose state starts over.

use std::str::FromStr;

/// The runtime the host behaves as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    #[default]
    Envoy,
    ServiceExtensions,
}

/// Linear memory a Service Extensions VM may hold.
pub const SERVICE_EXTENSIONS_MEMORY: usize = 16 << 20;

/// Fuel one callback may burn under Service Extensions: 1 ms at 4 GHz, one instruction a cycle.
pub const SERVICE_EXTENSIONS_FUEL: u64 = 4_000_000;

/// The callbacks Service Extensions bills as invocations: the phases of a request.
pub const BILLED_CALLBACKS: &[&str] = &[
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_response_headers",
    "proxy_on_response_body",
];

/// The host functions Service Extensions does not offer.
pub const SERVICE_EXTENSIONS_UNIMPLEMENTED: &[&str] = &[
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_set_tick_period_milliseconds",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
];

impl Profile {
    /// The host functions that answer `Unimplemented` instead of doing their work.
    pub fn unimplemented(self) -> &'static [&'static str] {
        match self {
            Profile::Envoy => &[],
            Profile::ServiceExtensions => SERVICE_EXTENSIONS_UNIMPLEMENTED,
        }
    }

    /// The most linear memory a VM may hold (`None`: what wasm32 allows).
    pub fn memory_limit(self) -> Option<usize> {
        match self {
            Profile::Envoy => None,
            Profile::ServiceExtensions => Some(SERVICE_EXTENSIONS_MEMORY),
        }
    }

    /// The fuel one callback may burn (`None`: not metered). The budget holds for the
    /// invocations Service Extensions bills ([`BILLED_CALLBACKS`]); the others (VM start,
    /// configuration, completion) are metered without a limit.
    pub fn fuel_per_callback(self) -> Option<u64> {
        match self {
            Profile::Envoy => None,
            Profile::ServiceExtensions => Some(SERVICE_EXTENSIONS_FUEL),
        }
    }

    /// What the request a VM failed on gets: Envoy's failed plugin answers 503, Service
    /// Extensions 500.
    pub fn failed_status(self) -> u16 {
        match self {
            Profile::Envoy => 503,
            Profile::ServiceExtensions => 500,
        }
    }

    /// Whether a failed VM is replaced by a fresh one for later requests (Envoy keeps it
    /// failed).
    pub fn replaces_failed_vm(self) -> bool {
        self == Profile::ServiceExtensions
    }
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "envoy" => Ok(Profile::Envoy),
            "service-extensions" => Ok(Profile::ServiceExtensions),
            other => Err(format!(
                "unknown host profile {other:?}: envoy or service-extensions"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_by_their_documented_names() {
        assert_eq!("envoy".parse(), Ok(Profile::Envoy));
        assert_eq!("service-extensions".parse(), Ok(Profile::ServiceExtensions));
        assert!("cdn".parse::<Profile>().unwrap_err().contains("\"cdn\""));
    }

    #[test]
    fn envoy_offers_every_host_function_and_service_extensions_does_not() {
        assert!(Profile::Envoy.unimplemented().is_empty());
        let se = Profile::ServiceExtensions.unimplemented();
        for f in [
            "proxy_get_shared_data",
            "proxy_set_tick_period_milliseconds",
            "proxy_http_call",
            "proxy_define_metric",
            "proxy_register_shared_queue",
        ] {
            assert!(se.contains(&f), "{f}");
        }
        assert!(!se.contains(&"proxy_send_local_response"));
    }
}
