//! The gRPC service: reads a call's plan, has the store apply it, answers.

use crate::metrics::Metrics;
use crate::pb::counters_server::Counters;
use crate::pb::{ApplyReply, ApplyRequest};
use crate::store::SharedStore;
use crate::wire;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct CounterService {
    pub store: Arc<SharedStore>,
    pub metrics: Arc<Metrics>,
}

#[tonic::async_trait]
impl Counters for CounterService {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyReply>, Status> {
        self.metrics.calls.inc();
        let (plan, now) = wire::request_plan(request.get_ref()).map_err(|e| {
            self.metrics.errors.inc();
            Status::invalid_argument(e.to_string())
        })?;
        match self.store.apply(plan, now).await {
            Ok(answers) => {
                if answers.iter().any(|a| a.denies()) {
                    self.metrics.denials.inc();
                }
                Ok(Response::new(wire::answers_reply(&answers)))
            }
            Err(e) => {
                self.metrics.errors.inc();
                eprintln!("apim-edge-counters: {e}");
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}
