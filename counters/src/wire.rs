//! The counter protocol's messages to and from the engine's types: a call's plan becomes an
//! [`pb::ApplyRequest`], the service's answers an [`pb::ApplyReply`], and back. Every message
//! from the network is checked as it is read: a malformed one is a [`WireError`], never a
//! panic (the filter reads the service's answers, the service reads every proxy's plans).

use crate::pb;
use apim_edge_policies::{
    CounterName, CounterOp, CounterPlan, FixedWindows, Leasable, Millis, OpResult, OwnLimits,
    OwnVerdicts, OwnedOp, Verdict,
};
use pb::op::Kind as K;
use prost::Message;

/// What is wrong with a message: the field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message cannot be decoded: {0}")]
    Decode(String),
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("{field} is out of range: {value}")]
    Range { field: &'static str, value: i64 },
}

/// A call's plan, at the call's time, as the service receives it.
pub fn plan_request(plan: &CounterPlan, now: Millis) -> pb::ApplyRequest {
    pb::ApplyRequest {
        now_ms: now,
        ops: plan.ops.iter().map(|o| op_message(&o.op())).collect(),
        then_release: plan.then_release,
    }
}

/// [`plan_request`] encoded, as a proxy's callout sends it.
pub fn encode_plan(plan: &CounterPlan, now: Millis) -> Vec<u8> {
    plan_request(plan, now).encode_to_vec()
}

/// The plan and the call's time of a request.
pub fn request_plan(req: &pb::ApplyRequest) -> Result<(CounterPlan, Millis), WireError> {
    let ops = req.ops.iter().map(op_of).collect::<Result<Vec<_>, _>>()?;
    Ok((
        CounterPlan {
            ops,
            then_release: req.then_release,
        },
        req.now_ms,
    ))
}

/// The service's answers as a reply.
pub fn answers_reply(answers: &[OpResult]) -> pb::ApplyReply {
    pb::ApplyReply {
        answers: answers.iter().map(answer_message).collect(),
    }
}

/// The answers of an encoded reply, as a proxy reads them.
pub fn decode_answers(bytes: &[u8]) -> Result<Vec<OpResult>, WireError> {
    let reply = pb::ApplyReply::decode(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    reply.answers.iter().map(answer_of).collect()
}

fn counter(key: &CounterName<'_>) -> Option<pb::Counter> {
    let [kind, owner, name] = key.parts();
    Some(pb::Counter {
        kind: kind.into(),
        owner: owner.into(),
        name: name.into(),
    })
}

fn windows(w: &FixedWindows) -> Option<pb::Windows> {
    Some(pb::Windows {
        origin_ms: w.origin,
        period_ms: w.period,
        calls: w.calls,
        bandwidth_kb: w.bandwidth_kb,
    })
}

fn op_message(op: &CounterOp<'_>) -> pb::Op {
    let kind = match *op {
        CounterOp::SlidingAdmit {
            calls, period, n, ..
        } => K::SlidingAdmit(pb::SlidingAdmit {
            calls,
            period_ms: period,
            n,
        }),
        CounterOp::SlidingCheck { calls, period, .. } => K::SlidingCheck(pb::SlidingCheck {
            calls,
            period_ms: period,
        }),
        CounterOp::SlidingAdd { period, n, .. } => K::SlidingAdd(pb::SlidingAdd {
            period_ms: period,
            n,
        }),
        CounterOp::SlidingRelease { at, n, .. } => {
            K::SlidingRelease(pb::SlidingRelease { at_ms: at, n })
        }
        CounterOp::FixedAdmit { windows: w, n, .. } => K::FixedAdmit(pb::FixedAdmit {
            windows: windows(&w),
            n,
        }),
        CounterOp::FixedCheck { windows: w, .. } => K::FixedCheck(pb::FixedCheck {
            windows: windows(&w),
        }),
        CounterOp::FixedAdd {
            windows: w,
            calls,
            bytes,
            ..
        } => K::FixedAdd(pb::FixedAdd {
            windows: windows(&w),
            calls,
            bytes,
        }),
        CounterOp::FixedRelease {
            windows: w,
            start,
            n,
            ..
        } => K::FixedRelease(pb::FixedRelease {
            windows: windows(&w),
            start_ms: start,
            n,
        }),
        CounterOp::OwnAdmit { limits, .. } => K::OwnAdmit(pb::OwnAdmit {
            limits: Some(own_limits(&limits)),
        }),
        CounterOp::OwnRelease {
            rate_at, quota, n, ..
        } => K::OwnRelease(pb::OwnRelease {
            rate_at_ms: rate_at,
            quota_period_ms: quota.map(|q| q.0),
            quota_start_ms: quota.map(|q| q.1),
            n,
        }),
        CounterOp::Lease { admit, calls, .. } => K::Lease(pb::Lease {
            calls,
            admit: Some(match admit {
                Leasable::Sliding { calls, period } => {
                    pb::lease::Admit::Sliding(pb::RateAllowance {
                        calls,
                        period_ms: period,
                    })
                }
                Leasable::Fixed(w) => pb::lease::Admit::Fixed(pb::Windows {
                    origin_ms: w.origin,
                    period_ms: w.period,
                    calls: w.calls,
                    bandwidth_kb: w.bandwidth_kb,
                }),
                Leasable::Own(limits) => pb::lease::Admit::Own(own_limits(&limits)),
            }),
        }),
        CounterOp::OwnAddBytes {
            windows: w, bytes, ..
        } => K::OwnAddBytes(pb::OwnAddBytes {
            windows: windows(&w),
            bytes,
        }),
    };
    pb::Op {
        counter: counter(&op.key()),
        kind: Some(kind),
    }
}

fn own_limits(limits: &OwnLimits) -> pb::OwnLimits {
    pb::OwnLimits {
        rate: limits
            .rate
            .map(|(calls, period_ms)| pb::RateAllowance { calls, period_ms }),
        quota: limits.quota.as_ref().and_then(windows),
        quota_first: limits.quota_first,
    }
}

fn own_limits_of(
    l: &pb::OwnLimits,
    [rate_field, quota_field]: [&'static str; 2],
) -> Result<OwnLimits, WireError> {
    let rate = match &l.rate {
        Some(r) => Some((r.calls, period(rate_field, r.period_ms)?)),
        None => None,
    };
    let quota = match &l.quota {
        Some(q) => Some(windows_of(Some(q), quota_field)?),
        None => None,
    };
    Ok(OwnLimits {
        rate,
        quota,
        quota_first: l.quota_first,
    })
}

/// A period must be positive: the window rules divide by it.
fn period(field: &'static str, ms: i64) -> Result<Millis, WireError> {
    if ms > 0 {
        Ok(ms)
    } else {
        Err(WireError::Range { field, value: ms })
    }
}

fn windows_of(w: Option<&pb::Windows>, field: &'static str) -> Result<FixedWindows, WireError> {
    let w = w.ok_or(WireError::Missing(field))?;
    Ok(FixedWindows {
        origin: w.origin_ms,
        period: period(field, w.period_ms)?,
        calls: w.calls,
        bandwidth_kb: w.bandwidth_kb,
    })
}

fn op_of(m: &pb::Op) -> Result<OwnedOp, WireError> {
    let c = m.counter.as_ref().ok_or(WireError::Missing("op.counter"))?;
    let key = CounterName::new(&c.kind, &c.owner, &c.name);
    let op = match m.kind.as_ref().ok_or(WireError::Missing("op.kind"))? {
        K::SlidingAdmit(o) => CounterOp::SlidingAdmit {
            key,
            calls: o.calls,
            period: period("sliding_admit.period_ms", o.period_ms)?,
            n: o.n,
        },
        K::SlidingCheck(o) => CounterOp::SlidingCheck {
            key,
            calls: o.calls,
            period: period("sliding_check.period_ms", o.period_ms)?,
        },
        K::SlidingAdd(o) => CounterOp::SlidingAdd {
            key,
            period: period("sliding_add.period_ms", o.period_ms)?,
            n: o.n,
        },
        K::SlidingRelease(o) => CounterOp::SlidingRelease {
            key,
            at: o.at_ms,
            n: o.n,
        },
        K::FixedAdmit(o) => CounterOp::FixedAdmit {
            key,
            windows: windows_of(o.windows.as_ref(), "fixed_admit.windows")?,
            n: o.n,
        },
        K::FixedCheck(o) => CounterOp::FixedCheck {
            key,
            windows: windows_of(o.windows.as_ref(), "fixed_check.windows")?,
        },
        K::FixedAdd(o) => CounterOp::FixedAdd {
            key,
            windows: windows_of(o.windows.as_ref(), "fixed_add.windows")?,
            calls: o.calls,
            bytes: o.bytes,
        },
        K::FixedRelease(o) => CounterOp::FixedRelease {
            key,
            windows: windows_of(o.windows.as_ref(), "fixed_release.windows")?,
            start: o.start_ms,
            n: o.n,
        },
        K::OwnAdmit(o) => {
            let l = o
                .limits
                .as_ref()
                .ok_or(WireError::Missing("own_admit.limits"))?;
            CounterOp::OwnAdmit {
                key,
                limits: own_limits_of(l, ["own_admit.rate.period_ms", "own_admit.quota"])?,
            }
        }
        K::OwnRelease(o) => CounterOp::OwnRelease {
            key,
            rate_at: o.rate_at_ms,
            quota: match (o.quota_period_ms, o.quota_start_ms) {
                (Some(p), Some(s)) => Some((period("own_release.quota_period_ms", p)?, s)),
                (None, None) => None,
                _ => return Err(WireError::Missing("own_release.quota_start_ms")),
            },
            n: o.n,
        },
        K::Lease(o) => {
            use pb::lease::Admit;
            if o.calls == 0 {
                return Err(WireError::Range {
                    field: "lease.calls",
                    value: 0,
                });
            }
            let admit = match o.admit.as_ref().ok_or(WireError::Missing("lease.admit"))? {
                Admit::Sliding(r) => Leasable::Sliding {
                    calls: r.calls,
                    period: period("lease.sliding.period_ms", r.period_ms)?,
                },
                Admit::Fixed(w) => Leasable::Fixed(windows_of(Some(w), "lease.fixed")?),
                Admit::Own(l) => Leasable::Own(own_limits_of(
                    l,
                    ["lease.own.rate.period_ms", "lease.own.quota"],
                )?),
            };
            CounterOp::Lease {
                key,
                admit,
                calls: o.calls,
            }
        }
        K::OwnAddBytes(o) => CounterOp::OwnAddBytes {
            key,
            windows: windows_of(o.windows.as_ref(), "own_add_bytes.windows")?,
            bytes: o.bytes,
        },
    };
    Ok(op.into_owned())
}

fn verdict_message(v: &Verdict) -> pb::Verdict {
    use pb::verdict::Kind;
    pb::Verdict {
        kind: Some(match *v {
            Verdict::Admitted { remaining } => Kind::AdmittedRemaining(remaining),
            Verdict::RateLimited { wait } => Kind::RateLimitedWaitMs(wait),
            Verdict::QuotaExceeded { bandwidth, seconds } => {
                Kind::QuotaExceeded(pb::QuotaExceeded { bandwidth, seconds })
            }
        }),
    }
}

fn verdict_of(v: Option<&pb::Verdict>) -> Result<Verdict, WireError> {
    use pb::verdict::Kind;
    let kind = v
        .and_then(|v| v.kind.as_ref())
        .ok_or(WireError::Missing("verdict"))?;
    Ok(match kind {
        Kind::AdmittedRemaining(remaining) => Verdict::Admitted {
            remaining: *remaining,
        },
        Kind::RateLimitedWaitMs(wait) => Verdict::RateLimited { wait: *wait },
        Kind::QuotaExceeded(q) => Verdict::QuotaExceeded {
            bandwidth: q.bandwidth,
            seconds: q.seconds,
        },
    })
}

fn answer_message(a: &OpResult) -> pb::Answer {
    use pb::answer::Kind;
    pb::Answer {
        kind: Some(match a {
            OpResult::Verdict(v) => Kind::Verdict(verdict_message(v)),
            OpResult::Fixed(v, start) => Kind::Fixed(pb::FixedVerdict {
                verdict: Some(verdict_message(v)),
                start_ms: *start,
            }),
            OpResult::Own(o) => Kind::Own(pb::OwnVerdicts {
                rate: o.rate.as_ref().map(verdict_message),
                quota: o.quota.as_ref().map(|(v, _)| verdict_message(v)),
                quota_start_ms: o.quota.map(|(_, s)| s),
            }),
            OpResult::Done => Kind::Done(true),
        }),
    }
}

fn answer_of(a: &pb::Answer) -> Result<OpResult, WireError> {
    use pb::answer::Kind;
    Ok(
        match a.kind.as_ref().ok_or(WireError::Missing("answer.kind"))? {
            Kind::Verdict(v) => OpResult::Verdict(verdict_of(Some(v))?),
            Kind::Fixed(f) => OpResult::Fixed(verdict_of(f.verdict.as_ref())?, f.start_ms),
            Kind::Own(o) => OpResult::Own(OwnVerdicts {
                rate: match &o.rate {
                    Some(v) => Some(verdict_of(Some(v))?),
                    None => None,
                },
                quota: match (&o.quota, o.quota_start_ms) {
                    (Some(v), Some(s)) => Some((verdict_of(Some(v))?, s)),
                    (None, None) => None,
                    _ => return Err(WireError::Missing("own.quota_start_ms")),
                },
            }),
            Kind::Done(_) => OpResult::Done,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows() -> FixedWindows {
        FixedWindows {
            origin: 1_000,
            period: 3_600_000,
            calls: Some(300),
            bandwidth_kb: None,
        }
    }

    /// Every kind of operation and answer goes over the wire and comes back as it was.
    #[test]
    fn every_operation_and_answer_round_trips() {
        let key = CounterName::new("sl", "sub-1", "product:starter");
        let w = windows();
        let ops = [
            CounterOp::SlidingAdmit {
                key,
                calls: 5,
                period: 60_000,
                n: 1,
            },
            CounterOp::SlidingCheck {
                key,
                calls: 5,
                period: 60_000,
            },
            CounterOp::SlidingAdd {
                key,
                period: 60_000,
                n: 2,
            },
            CounterOp::SlidingRelease { key, at: 77, n: 1 },
            CounterOp::FixedAdmit {
                key,
                windows: w,
                n: 1,
            },
            CounterOp::FixedCheck { key, windows: w },
            CounterOp::FixedAdd {
                key,
                windows: w,
                calls: 1,
                bytes: 2048,
            },
            CounterOp::FixedRelease {
                key,
                windows: w,
                start: 1_000,
                n: 1,
            },
            CounterOp::OwnAdmit {
                key,
                limits: OwnLimits {
                    rate: Some((10, 1_000)),
                    quota: Some(w),
                    quota_first: true,
                },
            },
            CounterOp::OwnRelease {
                key,
                rate_at: Some(5),
                quota: Some((3_600_000, 1_000)),
                n: 1,
            },
            CounterOp::OwnRelease {
                key,
                rate_at: None,
                quota: None,
                n: 7,
            },
            CounterOp::Lease {
                key,
                admit: Leasable::Sliding {
                    calls: 1_000,
                    period: 61_000,
                },
                calls: 16,
            },
            CounterOp::Lease {
                key,
                admit: Leasable::Fixed(w),
                calls: 2,
            },
            CounterOp::Lease {
                key,
                admit: Leasable::Own(OwnLimits {
                    rate: Some((10, 1_000)),
                    quota: Some(w),
                    quota_first: false,
                }),
                calls: 64,
            },
            CounterOp::OwnAddBytes {
                key,
                windows: w,
                bytes: 10,
            },
        ];
        let plan = CounterPlan {
            ops: ops.iter().map(|o| o.into_owned()).collect(),
            then_release: true,
        };
        let bytes = encode_plan(&plan, 123);
        let req = pb::ApplyRequest::decode(&bytes[..]).unwrap();
        let (back, now) = request_plan(&req).unwrap();
        assert_eq!((back, now), (plan, 123));

        let answers = [
            OpResult::Verdict(Verdict::Admitted { remaining: 4 }),
            OpResult::Verdict(Verdict::RateLimited { wait: 1_500 }),
            OpResult::Fixed(
                Verdict::QuotaExceeded {
                    bandwidth: true,
                    seconds: 9,
                },
                1_000,
            ),
            OpResult::Own(OwnVerdicts {
                rate: Some(Verdict::Admitted { remaining: 1 }),
                quota: Some((Verdict::Admitted { remaining: 2 }, 1_000)),
            }),
            OpResult::Own(OwnVerdicts::default()),
            OpResult::Done,
        ];
        let bytes = answers_reply(&answers).encode_to_vec();
        assert_eq!(decode_answers(&bytes).unwrap(), answers);
    }

    #[test]
    fn malformed_messages_are_errors_that_name_the_field() {
        assert!(matches!(
            decode_answers(b"\xff\xff"),
            Err(WireError::Decode(_))
        ));
        let empty = pb::ApplyReply {
            answers: vec![pb::Answer { kind: None }],
        }
        .encode_to_vec();
        assert_eq!(
            decode_answers(&empty).unwrap_err().to_string(),
            "answer.kind is missing"
        );
        let req = pb::ApplyRequest {
            now_ms: 0,
            ops: vec![pb::Op {
                counter: Some(pb::Counter::default()),
                kind: Some(K::SlidingAdmit(pb::SlidingAdmit {
                    calls: 1,
                    period_ms: 0,
                    n: 1,
                })),
            }],
            then_release: false,
        };
        assert_eq!(
            request_plan(&req).unwrap_err().to_string(),
            "sliding_admit.period_ms is out of range: 0"
        );
        let req = pb::ApplyRequest {
            ops: vec![pb::Op {
                counter: None,
                kind: None,
            }],
            ..req
        };
        assert_eq!(
            request_plan(&req).unwrap_err().to_string(),
            "op.counter is missing"
        );
        let lease = |calls, admit| pb::ApplyRequest {
            now_ms: 0,
            ops: vec![pb::Op {
                counter: Some(pb::Counter::default()),
                kind: Some(K::Lease(pb::Lease { calls, admit })),
            }],
            then_release: false,
        };
        let rate = |period_ms| {
            Some(pb::lease::Admit::Sliding(pb::RateAllowance {
                calls: 5,
                period_ms,
            }))
        };
        let faults = [
            (lease(0, rate(1_000)), "lease.calls is out of range: 0"),
            (lease(4, None), "lease.admit is missing"),
            (
                lease(4, rate(-1)),
                "lease.sliding.period_ms is out of range: -1",
            ),
        ];
        for (req, fault) in faults {
            assert_eq!(request_plan(&req).unwrap_err().to_string(), fault);
        }
    }
}
