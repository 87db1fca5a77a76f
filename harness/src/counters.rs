//! The counter service for replays in the wasmtime host (`apim-edge replay --wasm --counters
//! ADDR`): the filter's gRPC callouts to `apim_edge.counters.v1.Counters` go to a real
//! `apim-edge-counters` at ADDR, so that VMs in several host processes share one Redis as a
//! fleet of proxies does. Time in the calls is the replay's virtual clock (the service takes
//! the call's time), so runs stay deterministic. The filter's `timeoutMs` is not applied: the
//! host waits for each answer.

use crate::host::{Answer, Callout, CalloutKind};
use anyhow::{Context, Result};
use apim_edge_counters::pb::counters_client::CountersClient;
use apim_edge_counters::pb::ApplyRequest;
use apim_edge_counters::{APPLY, SERVICE};
use prost::Message;
use tonic::transport::Channel;

pub struct CounterForwarder {
    runtime: tokio::runtime::Runtime,
    client: CountersClient<Channel>,
}

impl CounterForwarder {
    /// A forwarder to the service at `addr` (`HOST:PORT`); connects on the first call.
    pub fn new(addr: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for the counter service's client")?;
        let endpoint = Channel::from_shared(format!("http://{addr}"))
            .with_context(|| format!("--counters {addr}: not an address"))?;
        let channel = {
            let _in = runtime.enter();
            endpoint.connect_lazy()
        };
        Ok(CounterForwarder {
            runtime,
            client: CountersClient::new(channel),
        })
    }

    /// The answer to a callout for the counter service (a failed call is `Some(None)`, as an
    /// unreachable service); `None` for any other callout.
    pub fn forward(&self, c: &Callout) -> Option<Option<Answer>> {
        match &c.kind {
            CalloutKind::Grpc { service, method } if service == SERVICE && method == APPLY => {}
            _ => return None,
        }
        let Ok(request) = ApplyRequest::decode(&c.body[..]) else {
            return Some(Some(Answer {
                status: 3, // INVALID_ARGUMENT
                headers: Vec::new(),
                body: Vec::new(),
            }));
        };
        let mut client = self.client.clone();
        let reply = self.runtime.block_on(client.apply(request));
        Some(Some(match reply {
            Ok(r) => Answer {
                status: 0,
                headers: Vec::new(),
                body: r.into_inner().encode_to_vec(),
            },
            Err(status) => Answer {
                status: status.code() as u16,
                headers: Vec::new(),
                body: Vec::new(),
            },
        }))
    }
}
