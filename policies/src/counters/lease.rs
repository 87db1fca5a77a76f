//! Leases of large limits, for counters a fleet shares (`docs/design.md`, "Leases"): instead
//! of asking the counter service about every call, a proxy asks once for a share of a limit
//! (a [`CounterOp::Lease`]: the call, and as many more as the limit leaves, up to a size) and
//! admits its next calls from that share, in its own store, until the share is spent or its
//! time is up. Every leased call was counted in the shared store before it was admitted, so
//! the fleet never admits more than a limit; it may admit less, by the shares left unspent.
//!
//! Which admissions lease ([`Leases::leasable`]): a sliding window, fixed windows of calls, or
//! a subscription's own limits of a document, of at least `minLimit` calls and weight 1. A
//! quota's share is spent within its window. A rate limit's share is spent within a hold `h`
//! of the instant it was counted at, and the rate limit is then asked over its period plus
//! `h`: any period of the limit's length then holds at most the limit's calls, wherever in
//! their holds the shares were spent.
//!
//! The size of a share follows the proxy's use: the first is the call alone, then twice what
//! the share was given in all when it runs out, else what the last one served. One worker at a
//! time asks for a counter's share; a call that finds none left meanwhile goes to the service
//! alone. A proxy holds less than the largest share unspent.
//!
//! A call's plan is divided ([`Leases::split`]): what this proxy's shares answer, and what is
//! sent. Once the service has answered, [`Leases::settle`] merges the answers in the plan's
//! order, keeps the shares granted, and gives back what the call spent when it is denied.

use super::op::{CounterOp, Leasable, OpResult};
use super::own::OwnVerdicts;
use super::{
    current, i64_at, u64_at, update, CounterName, CounterStore, FixedWindows, KeptName, State,
    StoreError, Verdict, EXPIRY, HEAD, LAYOUT_VERSION,
};
use crate::clock::Millis;
use crate::decide::shared::CounterPlan;
use crate::edge::config::Leases;

/// The kind a lease's counter is named by: the leased counter's kind after it.
const LEASE_KIND: &str = "lease:";

/// A share's state, after the [`HEAD`]: the calls left in it, the calls it was given in all,
/// its deadline, the shared counter's remaining calls as this proxy last saw them (the rate
/// limit's, the quota's), the quota window's start, until when a worker is asking for the
/// next share, and the time and size of the last grant.
const LEFT: usize = HEAD;
const GRANTED: usize = LEFT + 8;
const DEADLINE: usize = GRANTED + 8;
const RATE_LEFT: usize = DEADLINE + 8;
const QUOTA_LEFT: usize = RATE_LEFT + 8;
const START: usize = QUOTA_LEFT + 8;
const ASKING: usize = START + 8;
const GRANTED_AT: usize = ASKING + 8;
const LAST: usize = GRANTED_AT + 8;
const SHARE: usize = LAST + 8;

/// How long a share's state outlives its deadline, so that the next share is sized by it.
const REMEMBERED: Millis = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Share {
    left: u64,
    granted: u64,
    deadline: Millis,
    rate_left: u64,
    quota_left: u64,
    start: Millis,
    asking: Millis,
    granted_at: Millis,
    last: u64,
}

impl Default for Share {
    fn default() -> Self {
        Share {
            left: 0,
            granted: 0,
            deadline: Millis::MIN,
            rate_left: 0,
            quota_left: 0,
            start: 0,
            asking: Millis::MIN,
            granted_at: 0,
            last: 0,
        }
    }
}

impl Share {
    fn of(bytes: &[u8]) -> Share {
        if bytes.len() != SHARE || !current(bytes) {
            return Share::default();
        }
        Share {
            left: u64_at(bytes, LEFT),
            granted: u64_at(bytes, GRANTED),
            deadline: i64_at(bytes, DEADLINE),
            rate_left: u64_at(bytes, RATE_LEFT),
            quota_left: u64_at(bytes, QUOTA_LEFT),
            start: i64_at(bytes, START),
            asking: i64_at(bytes, ASKING),
            granted_at: i64_at(bytes, GRANTED_AT),
            last: u64_at(bytes, LAST),
        }
    }

    fn write(&self, state: &mut State<'_>) {
        let mut b = [0u8; SHARE];
        let expiry = self.deadline.max(self.asking).saturating_add(REMEMBERED);
        b[..EXPIRY].copy_from_slice(&expiry.to_le_bytes());
        b[EXPIRY] = LAYOUT_VERSION;
        let fields = [
            (LEFT, self.left.to_le_bytes()),
            (GRANTED, self.granted.to_le_bytes()),
            (DEADLINE, self.deadline.to_le_bytes()),
            (RATE_LEFT, self.rate_left.to_le_bytes()),
            (QUOTA_LEFT, self.quota_left.to_le_bytes()),
            (START, self.start.to_le_bytes()),
            (ASKING, self.asking.to_le_bytes()),
            (GRANTED_AT, self.granted_at.to_le_bytes()),
            (LAST, self.last.to_le_bytes()),
        ];
        for (at, bytes) in fields {
            b[at..at + 8].copy_from_slice(&bytes);
        }
        state.set(&b);
    }

    /// The answer a call spent from this share gets: what the shared counter had left when
    /// this proxy last heard, less what it has spent since (more than the fleet has left when
    /// other proxies spent too).
    fn answer(&self, admit: &Leasable) -> OpResult {
        let rate = Verdict::Admitted {
            remaining: self.rate_left,
        };
        let quota = Verdict::Admitted {
            remaining: self.quota_left,
        };
        match admit {
            Leasable::Sliding { .. } => OpResult::Verdict(rate),
            Leasable::Fixed(_) => OpResult::Fixed(quota, self.start),
            Leasable::Own(limits) => OpResult::Own(OwnVerdicts {
                rate: limits.rate.map(|_| rate),
                quota: limits.quota.map(|_| (quota, self.start)),
            }),
        }
    }

    /// The size of the next share: the call alone at first; twice the last when it ran out,
    /// else what it served.
    fn next_size(&self, most: u64) -> u64 {
        let size = match (self.granted, self.left) {
            (0, _) => 1,
            (granted, 0) => granted.saturating_mul(2),
            (granted, left) => granted.saturating_sub(left),
        };
        size.clamp(1, most)
    }
}

/// A call's plan divided between this proxy's shares and the counter service.
#[derive(Debug, Clone)]
pub struct LeasedPlan {
    parts: Vec<Part>,
    /// What goes to the service (nothing: the shares answered every operation).
    pub sent: CounterPlan,
}

#[derive(Debug, Clone)]
enum Part {
    /// Answered from this proxy's share of the counter.
    Spent { share: KeptName, answer: OpResult },
    /// Answered by the service's answer at `index`, with a share asked for.
    Sent { index: usize, asked: Option<Asked> },
}

#[derive(Debug, Clone)]
struct Asked {
    share: KeptName,
    admit: Leasable,
    calls: u64,
    /// This call marked the share as being asked for: it keeps what is granted.
    marked: bool,
    /// A rate limit's share is spent until then.
    hold_until: Option<Millis>,
}

impl Leases {
    /// How long a share of a rate limit of `period` may be spent.
    fn hold(&self, period: Millis) -> Millis {
        Millis::try_from(self.hold_ms)
            .unwrap_or(Millis::MAX)
            .min(period / 10)
    }

    /// The lease an admission takes, with its rate limit (if any) asked over its period and
    /// hold, and the hold; `None` for one that stays exact.
    pub fn leasable(&self, op: &CounterOp<'_>) -> Option<(Leasable, Option<Millis>)> {
        let big = |calls: u64| calls >= self.min_limit;
        let rate = |calls: u64, period: Millis| {
            let hold = self.hold(period);
            (big(calls) && hold > 0).then_some((calls, period + hold, hold))
        };
        let quota = |w: &FixedWindows| w.calls.is_some_and(big) && w.bandwidth_kb.is_none();
        match *op {
            CounterOp::SlidingAdmit {
                calls,
                period,
                n: 1,
                ..
            } => {
                let (calls, period, hold) = rate(calls, period)?;
                Some((Leasable::Sliding { calls, period }, Some(hold)))
            }
            CounterOp::FixedAdmit { windows, n: 1, .. } if quota(&windows) => {
                Some((Leasable::Fixed(windows), None))
            }
            CounterOp::OwnAdmit { limits, .. } => {
                let mut leased = limits;
                let mut held = None;
                if let Some((calls, period)) = limits.rate {
                    let (calls, period, hold) = rate(calls, period)?;
                    leased.rate = Some((calls, period));
                    held = Some(hold);
                }
                if limits.quota.as_ref().is_some_and(|w| !quota(w)) {
                    return None;
                }
                Some((Leasable::Own(leased), held))
            }
            _ => None,
        }
    }

    /// Divides a call's plan: each leasable admission is answered from this proxy's share when
    /// one is left, and otherwise sent as a lease (a worker already asking for that counter's
    /// share: as a lease of the call alone). The rest is sent as it is. `asking_for` bounds how
    /// long a share is marked as being asked for (the service's timeout).
    pub fn split(
        &self,
        plan: &CounterPlan,
        store: &dyn CounterStore,
        now: Millis,
        asking_for: Millis,
    ) -> Result<LeasedPlan, StoreError> {
        let mut leased = LeasedPlan {
            parts: Vec::with_capacity(plan.ops.len()),
            sent: CounterPlan {
                ops: Vec::new(),
                then_release: plan.then_release,
            },
        };
        // Unspent shares given back go first: applied whatever the call's limits answer.
        let mut unspent_back = Vec::new();
        for owned in &plan.ops {
            let op = owned.op();
            let index = leased.sent.ops.len();
            let Some((admit, hold)) = self.leasable(&op) else {
                leased.parts.push(Part::Sent { index, asked: None });
                leased.sent.ops.push(owned.clone());
                continue;
            };
            let key = op.key();
            let share = share_name(&key);
            let spent = update(store, &share.name(), |state| {
                let mut s = Share::of(state.bytes());
                if s.deadline > now && s.left > 0 {
                    s.left -= 1;
                    s.rate_left = s.rate_left.saturating_sub(1);
                    s.quota_left = s.quota_left.saturating_sub(1);
                    s.write(state);
                    return (true, Ok(s.answer(&admit)));
                }
                if s.asking > now {
                    return (false, Err((1, false, None)));
                }
                let calls = s.next_size(self.calls);
                // What a share left unspent when its time ran out goes back to the fleet.
                let unspent = (s.deadline <= now && s.left > 0).then(|| {
                    let back = (s.left.min(s.last), s.granted_at, s.start);
                    s.left = 0;
                    back
                });
                s.asking = now.saturating_add(asking_for);
                s.write(state);
                (true, Err((calls, true, unspent)))
            });
            match spent {
                Ok(Ok(answer)) => leased.parts.push(Part::Spent { share, answer }),
                Ok(Err((calls, marked, unspent))) => {
                    if let Some((n, at, start)) = unspent.filter(|u| u.0 > 0) {
                        unspent_back.push(give_back_unspent(key, admit, n, at, start).into_owned());
                    }
                    leased.parts.push(Part::Sent {
                        index,
                        asked: Some(Asked {
                            share,
                            admit,
                            calls,
                            marked,
                            hold_until: hold.map(|h| now.saturating_add(h)),
                        }),
                    });
                    leased
                        .sent
                        .ops
                        .push(CounterOp::Lease { key, admit, calls }.into_owned());
                }
                Err(e) => {
                    self.abandon(&leased, store, now);
                    return Err(e);
                }
            }
        }
        if !unspent_back.is_empty() {
            let shift = unspent_back.len();
            for part in &mut leased.parts {
                if let Part::Sent { index, .. } = part {
                    *index += shift;
                }
            }
            unspent_back.append(&mut leased.sent.ops);
            leased.sent.ops = unspent_back;
        }
        Ok(leased)
    }

    /// The answers to every operation of the call's plan, in its order, up to the first that
    /// denies: this proxy's shares' and the service's (`answers`, to `leased.sent`; none when
    /// nothing was sent). The shares granted are kept, unless the call is denied (by a limit,
    /// or after them: the service took everything back), when what the call spent from this
    /// proxy's shares is given back too.
    pub fn settle(
        &self,
        leased: &LeasedPlan,
        answers: &[OpResult],
        store: &dyn CounterStore,
        now: Millis,
    ) -> Vec<OpResult> {
        let mut merged = Vec::with_capacity(leased.parts.len());
        for part in &leased.parts {
            let answer = match part {
                Part::Spent { answer, .. } => *answer,
                Part::Sent { index, .. } => match answers.get(*index) {
                    Some(a) => *a,
                    None => break,
                },
            };
            merged.push(answer);
            if answer.denies() {
                break;
            }
        }
        let kept = merged.len() == leased.parts.len()
            && !merged.last().is_some_and(OpResult::denies)
            && !leased.sent.then_release;
        for part in &leased.parts {
            match part {
                Part::Spent { share, .. } if !kept => give_back(store, share, now),
                Part::Sent {
                    index,
                    asked: Some(asked),
                } if asked.marked => {
                    let granted = answers.get(*index).filter(|_| kept);
                    keep_share(store, asked, granted, now);
                }
                _ => {}
            }
        }
        merged
    }

    /// The call's plan could not be sent or answered: what it spent from this proxy's shares
    /// is given back, and its asks are withdrawn.
    pub fn abandon(&self, leased: &LeasedPlan, store: &dyn CounterStore, now: Millis) {
        for part in &leased.parts {
            match part {
                Part::Spent { share, .. } => give_back(store, share, now),
                Part::Sent {
                    asked: Some(asked), ..
                } if asked.marked => keep_share(store, asked, None, now),
                _ => {}
            }
        }
    }
}

/// The name of this proxy's share of counter `key`.
fn share_name(key: &CounterName<'_>) -> KeptName {
    let [kind, owner, name] = key.parts();
    KeptName::of(&CounterName::new(
        &format!("{LEASE_KIND}{kind}"),
        owner,
        name,
    ))
}

/// Takes back from the shared counter `n` calls a share granted at `at` (in the quota window
/// starting at `start`) and left unspent.
fn give_back_unspent<'a>(
    key: CounterName<'a>,
    admit: Leasable,
    n: u64,
    at: Millis,
    start: Millis,
) -> CounterOp<'a> {
    match admit {
        Leasable::Sliding { .. } => CounterOp::SlidingRelease {
            key,
            at,
            n: u32::try_from(n).unwrap_or(u32::MAX),
        },
        Leasable::Fixed(windows) => CounterOp::FixedRelease {
            key,
            windows,
            start,
            n,
        },
        Leasable::Own(limits) => CounterOp::OwnRelease {
            key,
            rate_at: limits.rate.map(|_| at),
            quota: limits.quota.map(|w| (w.period, start)),
            n,
        },
    }
}

/// Puts back a call spent from a share that still holds. Best effort: a failure under-admits.
fn give_back(store: &dyn CounterStore, share: &KeptName, now: Millis) {
    let _ = update(store, &share.name(), |state| {
        let mut s = Share::of(state.bytes());
        if s.deadline <= now {
            return (false, ());
        }
        s.left = s.left.saturating_add(1);
        s.rate_left = s.rate_left.saturating_add(1);
        s.quota_left = s.quota_left.saturating_add(1);
        s.write(state);
        (true, ())
    });
}

/// Ends an ask: keeps the share the service granted with `answer` (the call's own admission
/// and the rest, added to a share that still holds), or only withdraws the ask.
fn keep_share(store: &dyn CounterStore, asked: &Asked, answer: Option<&OpResult>, now: Millis) {
    let _ = update(store, &asked.share.name(), |state| {
        let mut s = Share::of(state.bytes());
        s.asking = Millis::MIN;
        // An answer of another kind than the lease (a bad answer, decided as the service
        // unreachable) keeps nothing.
        let seen = answer
            .filter(|a| !a.denies())
            .and_then(|a| Some((a, seen(&asked.admit, a)?)));
        if let Some((answer, (rate_left, quota_left, start, window_end))) = seen {
            let granted = asked.admit.granted(answer, asked.calls);
            let deadline = match (asked.hold_until, window_end) {
                (Some(h), Some(w)) => h.min(w),
                (Some(d), None) | (None, Some(d)) => d,
                (None, None) => now,
            };
            // The call that asked spent the first of its share.
            let spare = granted.saturating_sub(1);
            if s.deadline > now {
                s.left = s.left.saturating_add(spare);
                s.granted = s.granted.saturating_add(granted);
                s.deadline = s.deadline.min(deadline);
            } else {
                s.left = spare;
                s.granted = granted;
                s.deadline = deadline;
            }
            (s.rate_left, s.quota_left, s.start) = (rate_left, quota_left, start);
            (s.granted_at, s.last) = (now, granted);
        }
        s.write(state);
        (true, ())
    });
}

/// What a lease's answer says of its counter: the rate limit's and the quota's remaining calls
/// after the call, the quota window's start, and when that window ends; `None` for an answer
/// of another kind.
fn seen(admit: &Leasable, answer: &OpResult) -> Option<(u64, u64, Millis, Option<Millis>)> {
    let left = |v: &Verdict| match v {
        Verdict::Admitted { remaining } => *remaining,
        _ => 0,
    };
    Some(match (admit, answer) {
        (Leasable::Sliding { .. }, OpResult::Verdict(v)) => (left(v), 0, 0, None),
        (Leasable::Fixed(w), OpResult::Fixed(v, start)) => {
            (0, left(v), *start, Some(start.saturating_add(w.period)))
        }
        (Leasable::Own(limits), OpResult::Own(o)) => {
            let (quota_left, start) = o.quota.map_or((0, 0), |(v, s)| (left(&v), s));
            let end = limits
                .quota
                .zip(o.quota)
                .map(|(w, (_, s))| s.saturating_add(w.period));
            (o.rate.as_ref().map_or(0, left), quota_left, start, end)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::own::OwnLimits;
    use crate::counters::MemoryStore;
    use crate::decide::shared::apply_plan;
    use proptest::prelude::*;

    const QUOTA: u64 = 40;
    const RATE: u64 = 30;
    const PERIOD: Millis = 10_000;
    const PROXIES: usize = 3;

    fn leases(calls: u64) -> Leases {
        Leases {
            calls,
            min_limit: 10,
            hold_ms: 400,
        }
    }

    fn quota() -> FixedWindows {
        FixedWindows {
            origin: 0,
            period: PERIOD,
            calls: Some(QUOTA),
            bandwidth_kb: None,
        }
    }

    /// The admission of one call under counter `kind` (0: a quota, 1: a rate limit, 2: both as
    /// a subscription's own limits).
    fn admission(kind: u8) -> CounterOp<'static> {
        let key = CounterName::new("t", "test", "c");
        match kind {
            0 => CounterOp::FixedAdmit {
                key,
                windows: quota(),
                n: 1,
            },
            1 => CounterOp::SlidingAdmit {
                key,
                calls: RATE,
                period: PERIOD,
                n: 1,
            },
            _ => CounterOp::OwnAdmit {
                key,
                limits: OwnLimits {
                    rate: Some((RATE, PERIOD)),
                    quota: Some(quota()),
                    quota_first: false,
                },
            },
        }
    }

    /// One call of a proxy: its plan divided, the sent part applied to the shared store (or
    /// lost before it), and settled. Whether it was admitted, and whether a limit denied it.
    fn call(
        leases: &Leases,
        op: CounterOp<'_>,
        local: &MemoryStore,
        shared: &MemoryStore,
        now: Millis,
        then_release: bool,
        lost: bool,
    ) -> (bool, bool) {
        let plan = CounterPlan {
            ops: vec![op.into_owned()],
            then_release,
        };
        let leased = leases.split(&plan, local, now, 50).unwrap();
        let answers = if leased.sent.ops.is_empty() {
            Vec::new()
        } else if lost {
            leases.abandon(&leased, local, now);
            return (false, false);
        } else {
            apply_plan(&leased.sent, shared, now).unwrap()
        };
        let merged = leases.settle(&leased, &answers, local, now);
        let denied = merged.iter().any(OpResult::denies);
        assert_eq!(merged.len(), 1, "one answer for the call's one operation");
        (!denied && !then_release, denied)
    }

    #[test]
    fn a_busy_proxy_asks_the_service_about_few_of_its_calls() {
        let (local, shared) = (MemoryStore::new(), MemoryStore::new());
        let leases = Leases {
            min_limit: 10,
            ..leases(16)
        };
        let windows = FixedWindows {
            calls: Some(1_000),
            ..quota()
        };
        let op = CounterOp::FixedAdmit {
            key: CounterName::new("t", "test", "q"),
            windows,
            n: 1,
        };
        let mut asked = 0;
        for i in 0..200 {
            let plan = CounterPlan {
                ops: vec![op.into_owned()],
                then_release: false,
            };
            let leased = leases.split(&plan, &local, i, 50).unwrap();
            let answers = match leased.sent.ops.is_empty() {
                true => Vec::new(),
                false => {
                    asked += 1;
                    apply_plan(&leased.sent, &shared, i).unwrap()
                }
            };
            let merged = leases.settle(&leased, &answers, &local, i);
            assert!(!merged[0].denies());
        }
        // Shares of 1, 2 (3 in all while the window lasts), 6 (9 in all), then 16 at most:
        // 3 asks for 9 calls, 12 for the other 191.
        assert_eq!(asked, 15);
        // The shared counter holds every call admitted and the one call still unspent.
        let (v, _) = windows.admit(&shared, &op.key(), 200, 1).unwrap();
        assert_eq!(
            v,
            Verdict::Admitted {
                remaining: 1_000 - 201 - 1
            }
        );
    }

    #[test]
    fn what_a_rate_limits_share_left_unspent_goes_back_when_its_hold_ends() {
        let (local, shared) = (MemoryStore::new(), MemoryStore::new());
        let l = leases(8);
        let op = admission(1);
        // Shares of 1, then 2 and 6 (given 3, then 9 in all while the share held): six calls
        // admitted, nine counted, three left unspent.
        for t in 0..6 {
            assert_eq!(
                call(&l, op, &local, &shared, t, false, false),
                (true, false)
            );
        }
        let check = CounterOp::SlidingCheck {
            key: op.key(),
            calls: RATE,
            period: PERIOD + 400,
        };
        let left = |now| match check.apply(&shared, now).unwrap() {
            OpResult::Verdict(Verdict::Admitted { remaining }) => remaining,
            other => panic!("{other:?}"),
        };
        assert_eq!(left(6), RATE - 9);
        // After the hold, the next call gives the three back and takes a share of what the
        // shares served (6): six counted beyond the six spent.
        assert_eq!(
            call(&l, op, &local, &shared, 500, false, false),
            (true, false)
        );
        assert_eq!(left(500), RATE - 6 - 6);
    }

    #[test]
    fn an_answer_of_another_kind_keeps_no_share() {
        let (local, shared) = (MemoryStore::new(), MemoryStore::new());
        let l = leases(8);
        let op = admission(0);
        let plan = CounterPlan {
            ops: vec![op.into_owned()],
            then_release: false,
        };
        // Two calls, so that the second asks for a share of 2.
        for now in 0..2 {
            call(&l, op, &local, &shared, now, false, false);
        }
        let leased = l.split(&plan, &local, 2, 50).unwrap();
        assert!(
            leased.sent.ops.is_empty(),
            "the share of 2 serves the third call"
        );
        let leased = l.split(&plan, &local, 3, 50).unwrap();
        assert_eq!(leased.sent.ops.len(), 1, "spent: the fourth asks");
        let wrong = OpResult::Verdict(Verdict::Admitted { remaining: 30 });
        l.settle(&leased, &[wrong], &local, 3);
        let again = l.split(&plan, &local, 4, 50).unwrap();
        assert_eq!(
            again.sent.ops.len(),
            1,
            "no share was kept of the bad answer"
        );
    }

    #[test]
    fn small_limits_and_weighted_calls_stay_exact() {
        let l = leases(8);
        let key = CounterName::new("t", "test", "c");
        let small = CounterOp::SlidingAdmit {
            key,
            calls: 9,
            period: PERIOD,
            n: 1,
        };
        let weighted = CounterOp::FixedAdmit {
            key,
            windows: quota(),
            n: 2,
        };
        let bandwidth = CounterOp::FixedAdmit {
            key,
            windows: FixedWindows {
                bandwidth_kb: Some(10),
                ..quota()
            },
            n: 1,
        };
        for op in [small, weighted, bandwidth] {
            assert_eq!(l.leasable(&op), None, "{op:?}");
        }
        // A rate limit is asked over its period and its hold (at most a tenth of the period).
        assert_eq!(
            l.leasable(&admission(1)),
            Some((
                Leasable::Sliding {
                    calls: RATE,
                    period: PERIOD + 400
                },
                Some(400)
            ))
        );
    }

    proptest! {
        /// Three proxies with shares of up to `size` calls, calls at random times, some denied
        /// after their limits (taken back), some whose exchange is lost: no period of a rate
        /// limit and no quota window ever admits more than its limit, and a quota window that
        /// denied a call admitted all but the shares left unspent (`size - 1` per proxy).
        #[test]
        fn leases_never_over_admit(
            kind in 0u8..3,
            size in 2u64..8,
            calls in proptest::collection::vec(
                (0usize..PROXIES, 0i64..200, proptest::bool::weighted(0.05), proptest::bool::weighted(0.03)),
                1..400,
            ),
        ) {
            let leases = leases(size);
            let shared = MemoryStore::new();
            let locals: Vec<MemoryStore> = (0..PROXIES).map(|_| MemoryStore::new()).collect();
            let op = admission(kind);
            let (mut now, mut admitted, mut denied_in) = (0, Vec::new(), Vec::new());
            for (proxy, step, then_release, lost) in calls {
                now += step;
                let (ok, denied) = call(&leases, op, &locals[proxy], &shared, now, then_release, lost);
                if ok {
                    admitted.push(now);
                }
                if denied {
                    denied_in.push(now / PERIOD);
                }
            }
            if kind != 1 {
                let windows: std::collections::BTreeSet<i64> = admitted.iter().map(|t| t / PERIOD).collect();
                for w in windows {
                    let n = admitted.iter().filter(|t| *t / PERIOD == w).count() as u64;
                    prop_assert!(n <= QUOTA, "window {w} admitted {n}");
                    // With a rate limit beside the quota, a denial may be the rate limit's.
                    if kind == 0 && denied_in.contains(&w) {
                        prop_assert!(n >= QUOTA - PROXIES as u64 * (size - 1), "window {w} admitted only {n}");
                    }
                }
            }
            if kind != 0 {
                for &t in &admitted {
                    let n = admitted.iter().filter(|&&a| a > t - PERIOD && a <= t).count() as u64;
                    prop_assert!(n <= RATE, "{n} admitted in the period ending at {t}");
                }
            }
        }
    }
}
