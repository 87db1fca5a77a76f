//! Counters a fleet shares (SPEC §7): the exchange with the counter service. A call's plan
//! goes out with `dispatch_grpc_call` to the service's cluster; its answers come back in the
//! gRPC receive buffer. The decisions around it are the engine's
//! ([`apim_edge_policies::Catalog::plan`], `decide_answered`, `decide_unavailable`).

use apim_edge_counters::{wire, APPLY, SERVICE};
use apim_edge_policies::{
    CounterPlan, CounterStore, LeasedPlan, Leases, Millis, OnUnavailable, OpResult, SharedCounters,
    StoreError,
};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, Status};
use std::time::Duration;

/// The counter service as this VM calls it.
pub struct CounterService {
    /// The upstream as the ABI names it: Envoy's `GrpcService` (the cluster and the
    /// authority), serialized.
    upstream: String,
    pub timeout: Duration,
    pub on_unavailable: OnUnavailable,
    /// Leases of large limits, spent from this proxy's shared data.
    lease: Option<Leases>,
}

/// The gRPC status of a call that ran out of time.
pub const DEADLINE_EXCEEDED: u32 = 4;

/// Envoy's `envoy.config.core.v3.GrpcService`, the part that names an Envoy cluster.
#[derive(Clone, PartialEq, prost::Message)]
struct GrpcService {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpc>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyGrpc {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(string, tag = "2")]
    authority: String,
}

impl CounterService {
    pub fn new(config: &SharedCounters) -> Self {
        use prost::Message;
        let service = GrpcService {
            envoy_grpc: Some(EnvoyGrpc {
                cluster_name: config.cluster.clone(),
                authority: config.authority.clone(),
            }),
        }
        .encode_to_vec();
        // The SDK takes the upstream as text: a serialized service that is not (lengths of 128
        // and more) falls back to the cluster's name, which Envoy also takes.
        let upstream = String::from_utf8(service).unwrap_or_else(|_| config.cluster.clone());
        CounterService {
            upstream,
            timeout: Duration::from_millis(config.timeout_ms),
            on_unavailable: config.on_unavailable,
            lease: config.lease,
        }
    }

    /// With leases, a call's plan divided between this proxy's leases (in `store`) and the
    /// service; `None` without leases.
    pub fn split(
        &self,
        plan: &CounterPlan,
        store: &dyn CounterStore,
        now: Millis,
    ) -> Result<Option<LeasedPlan>, StoreError> {
        let Some(leases) = &self.lease else {
            return Ok(None);
        };
        let asking_for = self.timeout.as_millis() as Millis;
        leases.split(plan, store, now, asking_for).map(Some)
    }

    /// The answers to a divided plan's every operation, from the service's `answers` to what
    /// was sent and the leases' (see [`Leases::settle`]); a failed exchange gives back what the
    /// call spent from the leases.
    pub fn settle(
        &self,
        leased: &LeasedPlan,
        answers: Result<Vec<OpResult>, String>,
        store: &dyn CounterStore,
        now: Millis,
    ) -> Result<Vec<OpResult>, String> {
        let Some(leases) = &self.lease else {
            return answers;
        };
        match answers {
            Ok(answers) => Ok(leases.settle(leased, &answers, store, now)),
            Err(why) => {
                leases.abandon(leased, store, now);
                Err(why)
            }
        }
    }

    /// Sends a plan; the answer arrives in the calling context's `on_grpc_call_response`.
    pub fn send(&self, plan: &CounterPlan, now: Millis) -> Result<u32, Status> {
        let message = wire::encode_plan(plan, now);
        hostcalls::dispatch_grpc_call(
            &self.upstream,
            SERVICE,
            APPLY,
            Vec::new(),
            Some(&message),
            self.timeout,
        )
    }
}

/// The service's answers to a plan, from a successful call's receive buffer.
pub fn answers(size: usize) -> Result<Vec<OpResult>, String> {
    let body = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
        .map_err(|s| format!("cannot read the answer: {s:?}"))?
        .unwrap_or_default();
    wire::decode_answers(&body).map_err(|e| e.to_string())
}
