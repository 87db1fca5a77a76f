//! Counting a call under the limits of its program: the subscription's own `rate-limit` and
//! `quota` (with their nested `api` and `operation` limits), `rate-limit-by-key` and
//! `quota-by-key`; what an admission reserves (taken back when a later step denies the call),
//! what it leaves for the completion, and the remaining-calls headers it sets.

use super::*;
use crate::catalog::Catalog;
use crate::clock::Millis;
use crate::counters::own::{OwnLimits, OwnVerdicts};
use crate::counters::{CounterName, FixedWindows, KeptName, Verdict, BY_KEY_QUOTA, BY_KEY_RATE};
use crate::expr::{Facts, Value};
use crate::policy::{KeyedLimit, Nested, Step, SubscriptionLimit, Text};
use crate::response::{self, LocalResponse};
use arrayvec::ArrayString;
use smallvec::SmallVec;
use std::borrow::Cow;

/// Work left for the completion of an allowed call.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    /// Add the exchange's bytes to a quota window.
    Bandwidth {
        key: KeptName,
        windows: FixedWindows,
    },
    /// Add them to the quota's part of a subscription's own counters of a document.
    OwnBandwidth {
        key: KeptName,
        windows: FixedWindows,
    },
    /// `rate-limit-by-key` with an `increment-condition`.
    SlidingIf {
        key: KeptName,
        period: Millis,
        n: u32,
        condition: u32,
    },
    /// `quota-by-key` with an `increment-condition`.
    FixedIf {
        key: KeptName,
        windows: FixedWindows,
        n: u64,
        condition: u32,
        bandwidth: bool,
    },
}

/// A counted admission, taken back when a later limit denies the call.
#[derive(Debug, Clone)]
pub(crate) enum Reservation<'a> {
    /// In a subscription's own counters of a document: the rate limit's admission at
    /// `rate_at`, the quota's in the window of `(period, start)`.
    Own {
        owner: &'a str,
        document: &'a str,
        rate_at: Option<Millis>,
        quota: Option<(Millis, Millis)>,
    },
    Sliding {
        counter: Counter<'a>,
        at: Millis,
        n: u32,
    },
    Fixed {
        counter: Counter<'a>,
        windows: FixedWindows,
        start: Millis,
        n: u64,
    },
}

/// A counter as a limit names it: the parts of its name. A reservation keeps these rather than
/// the name, which it needs only when a call is denied.
#[derive(Debug, Clone)]
pub(crate) struct Counter<'a> {
    pub(crate) kind: &'static str,
    pub(crate) owner: &'a str,
    pub(crate) name: Cow<'a, str>,
}

impl Counter<'_> {
    /// The counter's stable name, `kind|owner|name` (`rl|sub-1|product:starter/rate-limit`).
    pub(crate) fn name(&self) -> CounterName<'_> {
        CounterName::new(self.kind, self.owner, &self.name)
    }
}

/// The kind of a subscription's own counters of a document (`sl|sub-1|product:starter`).
pub(crate) const OWN_KIND: &str = "sl";

/// A remaining-calls or total-calls header of the allowed response: the limit step that names
/// it, and the value's digits (kept here, so that the response borrows them rather than
/// allocates).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LimitHeader {
    pub(crate) step: u32,
    pub(crate) total: bool,
    pub(crate) value: Digits,
}

/// The decimal digits of a number (a u64 has at most 20), kept where the response borrows them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Digits(ArrayString<20>);

impl Digits {
    /// Writes `value`'s digits where they are kept.
    pub(crate) fn set(&mut self, value: u64) {
        self.0.clear();
        // A u64 has at most 20 digits: the push always fits.
        let _ = self.0.try_push_str(itoa::Buffer::new().format(value));
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

pub(crate) fn nested_matches(n: &Nested, name: &str, display: &str) -> bool {
    n.id.as_deref()
        .is_some_and(|id| id.eq_ignore_ascii_case(name))
        || n.name
            .as_deref()
            .is_some_and(|x| x.eq_ignore_ascii_case(name) || x == display)
}

/// Denial from a limit's verdict; a 429 names its wait in the limit's `retry_after_header`.
pub(crate) fn limit_denial(
    v: Verdict,
    retry_after_header: impl FnOnce() -> Cow<'static, str>,
) -> Option<(Outcome, LocalResponse)> {
    match v {
        Verdict::Admitted { .. } => None,
        Verdict::RateLimited { wait } => Some((
            Outcome::RateLimited,
            response::rate_limited(wait, retry_after_header()),
        )),
        Verdict::QuotaExceeded { bandwidth, seconds } => Some((
            if bandwidth {
                Outcome::BandwidthExceeded
            } else {
                Outcome::QuotaExceeded
            },
            response::quota_exceeded(bandwidth, seconds),
        )),
    }
}

/// One run of a request program.
pub(crate) struct Run<'a, 's, C: Counting + ?Sized> {
    pub(crate) catalog: &'a Catalog,
    /// Where the call's counter operations go: a local store, or the passes of a decision on
    /// counters a fleet shares ([`crate::counters::op`]).
    pub(crate) counting: &'s C,
    pub(crate) now: Millis,
    pub(crate) reservations: SmallVec<[Reservation<'a>; 2]>,
    /// The step being run must reserve what it counts ([`crate::catalog::StepPlan`]).
    pub(crate) reserve: bool,
    /// The by-key counters this call has met, so that each counts the call once however many
    /// policies name the same key value (APIM: "if multiple policies would increment the same
    /// key value, it is incremented only once per request").
    pub(crate) keyed: SmallVec<[KeyedCount<'a>; 1]>,
}

/// A by-key counter a call has met: by kind, window and key value, and the weight it counted
/// the call with (none yet when its `increment-condition` leaves that to the completion).
#[derive(Debug, Clone)]
pub(crate) struct KeyedCount<'a> {
    pub(crate) kind: &'static str,
    pub(crate) window: &'a str,
    pub(crate) value: Cow<'a, str>,
    pub(crate) counted: u64,
}

impl<'a, C: Counting + ?Sized> Run<'a, '_, C> {
    pub(crate) fn release_all(&mut self) {
        for r in self.reservations.drain(..).rev() {
            // Best effort: a failed release under-admits, never over-admits.
            let _ = match r {
                Reservation::Own {
                    owner,
                    document,
                    rate_at,
                    quota,
                } => self.counting.count(
                    CounterOp::OwnRelease {
                        key: CounterName::new(OWN_KIND, owner, document),
                        rate_at,
                        quota,
                        n: 1,
                    },
                    self.now,
                ),
                Reservation::Sliding { counter, at, n } => self.counting.count(
                    CounterOp::SlidingRelease {
                        key: counter.name(),
                        at,
                        n,
                    },
                    self.now,
                ),
                Reservation::Fixed {
                    counter,
                    windows,
                    start,
                    n,
                } => self.counting.count(
                    CounterOp::FixedRelease {
                        key: counter.name(),
                        windows,
                        start,
                        n,
                    },
                    self.now,
                ),
            };
        }
    }

    /// `rate-limit` and `quota` steps of one document: one alone, or the two when they stand
    /// side by side without nested limits. Their own counters are counted in one update (see
    /// [`own`]); then a lone limit's nested counters that match, each on its own.
    pub(crate) fn subscription_limits(
        &mut self,
        limits: &[(u32, &'a SubscriptionLimit, bool)],
        own: Option<&OwnLimits>,
        call: &mut CallContext,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        let Some(sub) = call.id.subscription else {
            return Ok(None); // counted per subscription: keyless calls are not limited
        };
        let subscription = &self.catalog.subscriptions[sub.index()];
        // Each limit's headline: the remaining and total calls of its first counter with calls.
        let mut headlines: [Option<(u64, u64)>; 2] = [None; 2];
        if let Some(&(mut own)) = own {
            if let Some(q) = &mut own.quota {
                q.origin = subscription.origin;
            }
            let mut verdicts = OwnVerdicts::default();
            let document = &limits[0].1.document;
            self.admit_own(
                &subscription.counter_id,
                document,
                &own,
                call,
                &mut verdicts,
            )?;
            for (i, &(_, limit, quota)) in limits.iter().enumerate() {
                let verdict = match quota {
                    true => verdicts.quota.map(|(v, _)| v),
                    false => verdicts.rate,
                };
                let Some(verdict) = verdict else { continue };
                if let Some(denial) = limit_denial(verdict, || limit.retry_after_header.clone()) {
                    return Ok(Some(denial));
                }
                if let (Verdict::Admitted { remaining }, Some(calls)) =
                    (verdict, limit.allowance.and_then(|a| a.calls))
                {
                    headlines[i] = Some((remaining, calls));
                }
            }
        }
        if let [(_, limit, quota)] = *limits {
            if let Some(denial) = self.nested_limits(limit, quota, call, &mut headlines[0])? {
                return Ok(Some(denial));
            }
        }
        // Read where they lie: copied out, the headlines' bytes would be loaded wider than they
        // were just stored, and wait for the stores.
        for (&(step, limit, _), headline) in limits.iter().zip(&headlines) {
            let named = limit.remaining_header.is_some() || limit.total_header.is_some();
            if let (&Some((remaining, total)), true) = (headline, named) {
                self.limit_headers(
                    call,
                    step,
                    [&limit.remaining_header, &limit.total_header],
                    remaining,
                    total,
                );
            }
        }
        Ok(None)
    }

    /// A subscription's own counters of `document` ([`own`]): one update, reserved as one
    /// when the step's plan says so.
    pub(crate) fn admit_own(
        &mut self,
        owner: &'a str,
        document: &'a str,
        own: &OwnLimits,
        call: &mut CallContext,
        verdicts: &mut OwnVerdicts,
    ) -> Result<(), EngineError> {
        let key = &CounterName::new(OWN_KIND, owner, document);
        *verdicts = own_verdicts(self.counting.count(
            CounterOp::OwnAdmit {
                key: *key,
                limits: *own,
            },
            self.now,
        )?)?;
        let admitted = |v: Option<Verdict>| v.is_none_or(|v| matches!(v, Verdict::Admitted { .. }));
        if admitted(verdicts.rate) && admitted(verdicts.quota.map(|(v, _)| v)) {
            if let Some(windows) = own.quota.filter(|w| w.bandwidth_kb.is_some()) {
                call.pend(Pending::OwnBandwidth {
                    key: KeptName::of(key),
                    windows,
                });
            }
            if !self.reserve {
                return Ok(());
            }
            self.reservations.push(Reservation::Own {
                owner,
                document,
                rate_at: own.rate.map(|_| self.now),
                quota: own
                    .quota
                    .zip(verdicts.quota)
                    .map(|(w, (_, start))| (w.period, start)),
            });
        }
        Ok(())
    }

    /// The `<api>` limits nested in a `rate-limit` or `quota` that match the call, and their
    /// `<operation>` limits that match, each counted on its own. `headline` is set by the first
    /// with calls, unless the limit's own counter set it.
    pub(crate) fn nested_limits(
        &mut self,
        limit: &'a SubscriptionLimit,
        quota: bool,
        call: &mut CallContext,
        headline: &mut Option<(u64, u64)>,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        if limit.nested.is_empty() {
            return Ok(None);
        }
        let Some(sub) = call.id.subscription else {
            return Ok(None);
        };
        let c = self.catalog;
        let subscription = &c.subscriptions[sub.index()];
        let api = &c.apis[call.id.api.index()];
        let op = call.id.operation.map(|o| &api.operations[o.index()]);
        let mut counters: SmallVec<[(&str, crate::policy::Allowance); 4]> = SmallVec::new();
        for n in &limit.nested {
            if nested_matches(n, &api.name, &api.display_name) {
                counters.push((&n.counter, n.allowance));
                if let Some(op) = op {
                    for o in &n.operations {
                        if nested_matches(o, &op.name, &op.display_name) {
                            counters.push((&o.counter, o.allowance));
                        }
                    }
                }
            }
        }
        for &(counter, a) in &counters {
            let counter = Counter {
                kind: if quota { "q" } else { "rl" },
                owner: &subscription.counter_id,
                name: Cow::Borrowed(counter),
            };
            let verdict = if quota {
                let windows = FixedWindows {
                    origin: subscription.origin,
                    period: a.period,
                    calls: a.calls,
                    bandwidth_kb: a.bandwidth_kb,
                };
                self.admit_fixed(counter, windows, 1, call)?
            } else {
                self.admit_sliding(counter, a.calls.unwrap_or(u64::MAX), a.period, 1)?
            };
            if let Some(denial) = limit_denial(verdict, || limit.retry_after_header.clone()) {
                return Ok(Some(denial));
            }
            if let (Verdict::Admitted { remaining }, None, Some(calls)) =
                (verdict, *headline, a.calls)
            {
                *headline = Some((remaining, calls));
            }
        }
        Ok(None)
    }

    pub(crate) fn keyed_limit(
        &mut self,
        step: u32,
        limit: &'a KeyedLimit,
        quota: bool,
        call: &mut CallContext,
        facts: &dyn Facts,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        let value = eval_text(&limit.counter_key, facts)?;
        let n: u64 = match &limit.increment_count {
            Text::Literal(l) => l.parse().unwrap_or(1),
            Text::Expr(e) => match e.eval(facts)? {
                Value::Int(i) => i.max(0) as u64,
                _ => 1,
            },
        };
        let a = limit.allowance;
        let kind = if quota { BY_KEY_QUOTA } else { BY_KEY_RATE };
        if let Some(met) = self
            .keyed
            .iter()
            .find(|k| k.kind == kind && k.window == limit.window && k.value == value)
        {
            // Counted (or left to count) by an earlier policy of this call: this one only
            // checks its own limit, with the call's weight already in the counter.
            let already = met.counted;
            return self.keyed_check(step, limit, quota, value, already, call);
        }
        self.keyed.push(KeyedCount {
            kind,
            window: &limit.window,
            value: value.clone(),
            counted: if limit.increment_condition.is_some() {
                0
            } else {
                n
            },
        });
        let verdict = if quota {
            let counter = Counter {
                kind: BY_KEY_QUOTA,
                owner: &limit.window,
                name: value,
            };
            let windows = FixedWindows {
                origin: limit.first_period_start,
                period: a.period,
                calls: a.calls,
                bandwidth_kb: a.bandwidth_kb,
            };
            match &limit.increment_condition {
                None => self.admit_fixed(counter, windows, n, call)?,
                Some(_) => {
                    let key = &counter.name();
                    let v = verdict(
                        self.counting
                            .count(CounterOp::FixedCheck { key: *key, windows }, self.now)?,
                    )?;
                    call.pend(Pending::FixedIf {
                        key: KeptName::of(key),
                        windows,
                        n,
                        condition: step,
                        bandwidth: a.bandwidth_kb.is_some(),
                    });
                    v
                }
            }
        } else {
            let counter = Counter {
                kind: BY_KEY_RATE,
                owner: &limit.window,
                name: value,
            };
            let calls = a.calls.unwrap_or(u64::MAX);
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            match &limit.increment_condition {
                None => self.admit_sliding(counter, calls, a.period, n)?,
                Some(_) => {
                    let key = &counter.name();
                    let check = CounterOp::SlidingCheck {
                        key: *key,
                        calls,
                        period: a.period,
                    };
                    let v = verdict(self.counting.count(check, self.now)?)?;
                    call.pend(Pending::SlidingIf {
                        key: KeptName::of(key),
                        period: a.period,
                        n,
                        condition: step,
                    });
                    v
                }
            }
        };
        if let Some(denial) = limit_denial(verdict, || limit.retry_after_header.clone()) {
            // A denied call leaves nothing to count at completion.
            if let Some(later) = &mut call.later {
                later.pending.retain(|p| !matches!(p, Pending::SlidingIf { condition, .. } | Pending::FixedIf { condition, .. } if *condition == step));
            }
            return Ok(Some(denial));
        }
        if let (Verdict::Admitted { remaining }, Some(calls)) = (verdict, a.calls) {
            let remaining = if limit.increment_condition.is_some() {
                remaining.saturating_sub(n)
            } else {
                remaining
            };
            self.limit_headers(
                call,
                step,
                [&limit.remaining_header, &limit.total_header],
                remaining,
                calls,
            );
        }
        Ok(None)
    }
}

impl<'a, C: Counting + ?Sized> Run<'a, '_, C> {
    /// A by-key limit whose counter an earlier policy of this call has met: the counter
    /// already holds `already` of this call's weight, so the limit admits when what it holds
    /// without them is under the limit. Nothing is counted or left to count.
    pub(crate) fn keyed_check(
        &mut self,
        step: u32,
        limit: &'a KeyedLimit,
        quota: bool,
        value: Cow<'a, str>,
        already: u64,
        call: &mut CallContext,
    ) -> Result<Option<(Outcome, LocalResponse)>, EngineError> {
        let a = limit.allowance;
        let calls = a.calls.map(|c| c.saturating_add(already));
        let verdict = if quota {
            let windows = FixedWindows {
                origin: limit.first_period_start,
                period: a.period,
                calls,
                bandwidth_kb: a.bandwidth_kb,
            };
            let key = CounterName::new(BY_KEY_QUOTA, &limit.window, &value);
            verdict(
                self.counting
                    .count(CounterOp::FixedCheck { key, windows }, self.now)?,
            )?
        } else {
            let check = CounterOp::SlidingCheck {
                key: CounterName::new(BY_KEY_RATE, &limit.window, &value),
                calls: calls.unwrap_or(u64::MAX),
                period: a.period,
            };
            verdict(self.counting.count(check, self.now)?)?
        };
        if let Some(denial) = limit_denial(verdict, || limit.retry_after_header.clone()) {
            return Ok(Some(denial));
        }
        if let (Verdict::Admitted { remaining }, Some(calls)) = (verdict, a.calls) {
            self.limit_headers(
                call,
                step,
                [&limit.remaining_header, &limit.total_header],
                remaining.saturating_sub(already),
                calls,
            );
        }
        Ok(None)
    }

    /// Counts a call of weight `n` in fixed windows. An admission is reserved (taken back if a
    /// later limit denies the call) and, for a bandwidth quota, left for the completion.
    pub(crate) fn admit_fixed(
        &mut self,
        counter: Counter<'a>,
        windows: FixedWindows,
        n: u64,
        call: &mut CallContext,
    ) -> Result<Verdict, EngineError> {
        let key = &counter.name();
        let admit = CounterOp::FixedAdmit {
            key: *key,
            windows,
            n,
        };
        let (v, start) = match self.counting.count(admit, self.now)? {
            OpResult::Fixed(v, start) => (v, start),
            other => return Err(mismatch(other).into()),
        };
        if matches!(v, Verdict::Admitted { .. }) {
            if windows.bandwidth_kb.is_some() {
                call.pend(Pending::Bandwidth {
                    key: KeptName::of(key),
                    windows,
                });
            }
            self.reservations.push(Reservation::Fixed {
                counter,
                windows,
                start,
                n,
            });
        }
        Ok(v)
    }

    /// Counts a call of weight `n` in a sliding window, reserved as in [`Self::admit_fixed`].
    pub(crate) fn admit_sliding(
        &mut self,
        counter: Counter<'a>,
        calls: u64,
        period: Millis,
        n: u32,
    ) -> Result<Verdict, EngineError> {
        let key = &counter.name();
        let admit = CounterOp::SlidingAdmit {
            key: *key,
            calls,
            period,
            n,
        };
        let v = verdict(self.counting.count(admit, self.now)?)?;
        if matches!(v, Verdict::Admitted { .. }) {
            self.reservations.push(Reservation::Sliding {
                counter,
                at: self.now,
                n,
            });
        }
        Ok(v)
    }

    /// Records the remaining-calls and total-calls headers of limit `step` (those it names); a
    /// later limit's header of the same name replaces an earlier one. A count above the limit
    /// is one nobody counted (shared counters unreachable under `onUnavailable: "allow"`): no
    /// remaining-calls header is made of it.
    pub(crate) fn limit_headers(
        &self,
        call: &mut CallContext,
        step: u32,
        [remaining, total]: [&Option<String>; 2],
        left: u64,
        calls: u64,
    ) {
        if let (Some(name), true) = (remaining, left <= calls) {
            self.limit_header(call, step, false, name, left);
        }
        if let Some(name) = total {
            self.limit_header(call, step, true, name, calls);
        }
    }

    pub(crate) fn limit_header(
        &self,
        call: &mut CallContext,
        step: u32,
        total: bool,
        name: &str,
        value: u64,
    ) {
        if !call.limit_headers.is_empty() {
            call.limit_headers
                .retain(|h| self.catalog.limit_header_name(h) != Some(name));
        }
        call.limit_headers.push(LimitHeader {
            step,
            total,
            value: Digits::default(),
        });
        // The digits are set where they are kept ([`Digits::set`]), not moved in afterwards.
        if let Some(h) = call.limit_headers.last_mut() {
            h.value.set(value);
        }
    }
}

impl Catalog {
    pub(crate) fn limit_header_name(&self, h: &LimitHeader) -> Option<&str> {
        let (remaining, total) = match &self.steps[h.step as usize] {
            Step::RateLimit(l) | Step::Quota(l) => (&l.remaining_header, &l.total_header),
            Step::RateLimitByKey(k) | Step::QuotaByKey(k) => (&k.remaining_header, &k.total_header),
            _ => return None,
        };
        if h.total { total } else { remaining }.as_deref()
    }
}

/// A counter's answer that is not of the operation's kind (a counter service's bad answer).
pub(crate) fn mismatch(got: OpResult) -> StoreError {
    StoreError::Unavailable(format!(
        "a counter answered {got:?} to an operation of another kind"
    ))
}

pub(crate) fn verdict(r: OpResult) -> Result<Verdict, StoreError> {
    match r {
        OpResult::Verdict(v) => Ok(v),
        other => Err(mismatch(other)),
    }
}

fn own_verdicts(r: OpResult) -> Result<OwnVerdicts, StoreError> {
    match r {
        OpResult::Own(v) => Ok(v),
        other => Err(mismatch(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A header's value is the number's decimal text, for every u64: short ones (made in
        /// a register) and long ones (digit by digit), and the 16 digits between.
        #[test]
        fn digits_are_the_numbers_decimal_text(
            v in prop_oneof![0..1_000u64, 0..10u64.pow(16), 10u64.pow(15)..10u64.pow(17), any::<u64>()]
        ) {
            let mut digits = Digits::default();
            digits.set(v);
            prop_assert_eq!(digits.as_str(), v.to_string());
        }
    }

    #[test]
    fn digits_at_the_edges() {
        // Set over longer digits too: the old ones do not show.
        let mut digits = Digits::default();
        let edge = 10u64.pow(16);
        for v in [
            u64::MAX,
            0,
            9,
            10,
            99,
            100,
            999_999,
            edge - 1,
            edge,
            u64::MAX,
            7,
        ] {
            digits.set(v);
            assert_eq!(digits.as_str(), v.to_string());
        }
    }
}
