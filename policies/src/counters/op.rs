//! Counter operations as data: each thing the engine asks of a counter while it decides or
//! completes a call (admit, check, add, release, for each kind of window), and what each
//! answers. The engine's window rules run in [`CounterOp::apply`] and nowhere else.
//!
//! Locally a call's operations are applied one by one as its program runs ([`Local`]). For
//! counters shared by a fleet (SPEC §7) the same operations are applied elsewhere, by a counter
//! service, to a store many proxies share: a call is then decided twice, first recording its
//! operations with every limit assumed to admit ([`Recording`]), then, once the service has
//! applied them all or nothing ([`apply_all_or_nothing`]), again with the service's answers
//! ([`Answered`]). Both passes make the same operations in the same order up to the first
//! denial, so the second decides exactly as a local decision on the shared store would.

use super::own::{self, OwnLimits, OwnVerdicts};
use super::{admit_weighed, encode_window, update};
use super::{sliding_add, sliding_admit, sliding_check, sliding_release, FixedWindows};
use super::{CounterName, CounterStore, KeptName, StoreError, Verdict};
use crate::clock::{window_start, Millis};
use std::cell::RefCell;

/// One operation on one counter, at the time of the call it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterOp<'a> {
    /// Admit a call of weight `n` when fewer than `calls` were admitted in the last `period`.
    SlidingAdmit {
        key: CounterName<'a>,
        calls: u64,
        period: Millis,
        n: u32,
    },
    /// Whether a call would be admitted, counting nothing.
    SlidingCheck {
        key: CounterName<'a>,
        calls: u64,
        period: Millis,
    },
    /// Count `n` calls unconditionally (an `increment-condition` that held).
    SlidingAdd {
        key: CounterName<'a>,
        period: Millis,
        n: u32,
    },
    /// Take back `n` admissions made at `at`.
    SlidingRelease {
        key: CounterName<'a>,
        at: Millis,
        n: u32,
    },
    FixedAdmit {
        key: CounterName<'a>,
        windows: FixedWindows,
        n: u64,
    },
    FixedCheck {
        key: CounterName<'a>,
        windows: FixedWindows,
    },
    FixedAdd {
        key: CounterName<'a>,
        windows: FixedWindows,
        calls: u64,
        bytes: u64,
    },
    /// Take back `n` calls counted in the window starting at `start`.
    FixedRelease {
        key: CounterName<'a>,
        windows: FixedWindows,
        start: Millis,
        n: u64,
    },
    /// A subscription's own rate limit and quota of a document, in one update.
    OwnAdmit {
        key: CounterName<'a>,
        limits: OwnLimits,
    },
    /// Take back `n` calls counted by an `OwnAdmit` (1) or leased by a `Lease` of one.
    OwnRelease {
        key: CounterName<'a>,
        rate_at: Option<Millis>,
        quota: Option<(Millis, Millis)>,
        n: u64,
    },
    OwnAddBytes {
        key: CounterName<'a>,
        windows: FixedWindows,
        bytes: u64,
    },
    /// Admit a call as `admit` would, answering what remains after it alone, and count as many
    /// more as the counter leaves, up to `calls` in all: a lease that the proxy which asked
    /// spends on its next calls without asking again ([`super::lease`]).
    Lease {
        key: CounterName<'a>,
        admit: Leasable,
        calls: u64,
    },
}

/// The admissions a proxy may lease: a call of weight 1 under a sliding window, fixed windows
/// of calls, or a subscription's own limits of a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leasable {
    Sliding { calls: u64, period: Millis },
    Fixed(FixedWindows),
    Own(OwnLimits),
}

impl Leasable {
    /// How many calls a lease of up to `calls` counted, from its answer: the call itself and
    /// as many more as remained, up to `calls`; none when it was denied.
    pub fn granted(&self, answer: &OpResult, calls: u64) -> u64 {
        if answer.denies() {
            return 0;
        }
        let room = |v: &Verdict| match v {
            Verdict::Admitted { remaining } => remaining.saturating_add(1),
            _ => 0,
        };
        let room = match answer {
            OpResult::Verdict(v) | OpResult::Fixed(v, _) => room(v),
            OpResult::Own(o) => o
                .rate
                .iter()
                .chain(o.quota.iter().map(|(v, _)| v))
                .map(room)
                .min()
                .unwrap_or(u64::MAX),
            OpResult::Done => 0,
        };
        calls.min(room).max(1)
    }
}

/// What an operation answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpResult {
    Verdict(Verdict),
    /// A fixed window's verdict, and the start of the window it counted in.
    Fixed(Verdict, Millis),
    Own(OwnVerdicts),
    Done,
}

impl OpResult {
    /// Whether the operation denied the call.
    pub fn denies(&self) -> bool {
        let denied = |v: &Verdict| !matches!(v, Verdict::Admitted { .. });
        match self {
            OpResult::Verdict(v) | OpResult::Fixed(v, _) => denied(v),
            OpResult::Own(o) => o
                .rate
                .iter()
                .chain(o.quota.iter().map(|(v, _)| v))
                .any(denied),
            OpResult::Done => false,
        }
    }
}

impl<'a> CounterOp<'a> {
    /// Applies the operation to `store` at `now`, with the engine's rules.
    pub fn apply(&self, store: &dyn CounterStore, now: Millis) -> Result<OpResult, StoreError> {
        Ok(match *self {
            CounterOp::SlidingAdmit {
                key,
                calls,
                period,
                n,
            } => OpResult::Verdict(sliding_admit(store, &key, calls, period, now, n)?),
            CounterOp::SlidingCheck { key, calls, period } => {
                OpResult::Verdict(sliding_check(store, &key, calls, period, now)?)
            }
            CounterOp::SlidingAdd { key, period, n } => {
                sliding_add(store, &key, period, now, n)?;
                OpResult::Done
            }
            CounterOp::SlidingRelease { key, at, n } => {
                sliding_release(store, &key, at, n)?;
                OpResult::Done
            }
            CounterOp::FixedAdmit { key, windows, n } => {
                let (v, start) = windows.admit(store, &key, now, n)?;
                OpResult::Fixed(v, start)
            }
            CounterOp::FixedCheck { key, windows } => {
                OpResult::Verdict(windows.check(store, &key, now)?)
            }
            CounterOp::FixedAdd {
                key,
                windows,
                calls,
                bytes,
            } => {
                windows.add(store, &key, now, calls, bytes)?;
                OpResult::Done
            }
            CounterOp::FixedRelease {
                key,
                windows,
                start,
                n,
            } => {
                windows.release(store, &key, start, n)?;
                OpResult::Done
            }
            CounterOp::OwnAdmit { key, limits } => {
                let mut verdicts = OwnVerdicts::default();
                limits.admit(store, &key, now, &mut verdicts)?;
                OpResult::Own(verdicts)
            }
            CounterOp::OwnRelease {
                key,
                rate_at,
                quota,
                n,
            } => {
                own::release(store, &key, rate_at, quota, n)?;
                OpResult::Done
            }
            CounterOp::OwnAddBytes {
                key,
                windows,
                bytes,
            } => {
                own::add_bytes(store, &key, &windows, now, bytes)?;
                OpResult::Done
            }
            CounterOp::Lease { key, admit, calls } => lease(store, &key, admit, calls, now)?,
        })
    }

    /// Takes back what the operation counted, when it admitted (`result`) and counted anything.
    fn undo(&self, result: &OpResult, now: Millis) -> Option<CounterOp<'a>> {
        match (*self, result) {
            (CounterOp::SlidingAdmit { key, n, .. }, OpResult::Verdict(v)) if !denied(v) => {
                Some(CounterOp::SlidingRelease { key, at: now, n })
            }
            (CounterOp::FixedAdmit { key, windows, n }, OpResult::Fixed(v, start))
                if !denied(v) =>
            {
                Some(CounterOp::FixedRelease {
                    key,
                    windows,
                    start: *start,
                    n,
                })
            }
            (CounterOp::OwnAdmit { key, limits }, OpResult::Own(o)) if !result.denies() => {
                Some(own_release(key, &limits, o, now, 1))
            }
            (CounterOp::Lease { key, admit, calls }, _) if !result.denies() => {
                let n = admit.granted(result, calls);
                match (admit, result) {
                    (Leasable::Sliding { .. }, _) => Some(CounterOp::SlidingRelease {
                        key,
                        at: now,
                        n: u32::try_from(n).unwrap_or(u32::MAX),
                    }),
                    (Leasable::Fixed(windows), OpResult::Fixed(_, start)) => {
                        Some(CounterOp::FixedRelease {
                            key,
                            windows,
                            start: *start,
                            n,
                        })
                    }
                    (Leasable::Own(limits), OpResult::Own(o)) => {
                        Some(own_release(key, &limits, o, now, n))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Whether this operation only takes back what another counted.
    pub(crate) fn is_release(&self) -> bool {
        matches!(
            self,
            CounterOp::SlidingRelease { .. }
                | CounterOp::FixedRelease { .. }
                | CounterOp::OwnRelease { .. }
        )
    }

    /// The answer a recording pass assumes: every limit admits.
    fn assumed(&self, now: Millis) -> OpResult {
        let admitted = Verdict::Admitted {
            remaining: u64::MAX,
        };
        match self {
            CounterOp::SlidingAdmit { .. }
            | CounterOp::SlidingCheck { .. }
            | CounterOp::FixedCheck { .. } => OpResult::Verdict(admitted),
            CounterOp::FixedAdmit { windows, .. } => {
                OpResult::Fixed(admitted, window_start(windows.origin, windows.period, now))
            }
            CounterOp::OwnAdmit { limits, .. }
            | CounterOp::Lease {
                admit: Leasable::Own(limits),
                ..
            } => OpResult::Own(OwnVerdicts {
                rate: limits.rate.map(|_| admitted),
                quota: limits
                    .quota
                    .map(|w| (admitted, window_start(w.origin, w.period, now))),
            }),
            CounterOp::Lease {
                admit: Leasable::Sliding { .. },
                ..
            } => OpResult::Verdict(admitted),
            CounterOp::Lease {
                admit: Leasable::Fixed(windows),
                ..
            } => OpResult::Fixed(admitted, window_start(windows.origin, windows.period, now)),
            _ => OpResult::Done,
        }
    }

    /// The operation with its counter's name owned, to keep or send.
    /// The operation with its counter's name owned, to keep or to send.
    pub fn into_owned(self) -> OwnedOp {
        OwnedOp {
            key: KeptName::of(&self.key()),
            op: self.with_key(CounterName::new("", "", "")),
        }
    }

    /// The counter the operation is on.
    pub fn key(&self) -> CounterName<'a> {
        match *self {
            CounterOp::SlidingAdmit { key, .. }
            | CounterOp::SlidingCheck { key, .. }
            | CounterOp::SlidingAdd { key, .. }
            | CounterOp::SlidingRelease { key, .. }
            | CounterOp::FixedAdmit { key, .. }
            | CounterOp::FixedCheck { key, .. }
            | CounterOp::FixedAdd { key, .. }
            | CounterOp::FixedRelease { key, .. }
            | CounterOp::OwnAdmit { key, .. }
            | CounterOp::OwnRelease { key, .. }
            | CounterOp::OwnAddBytes { key, .. }
            | CounterOp::Lease { key, .. } => key,
        }
    }

    /// The same operation on counter `key`.
    fn with_key<'b>(self, key: CounterName<'b>) -> CounterOp<'b> {
        match self {
            CounterOp::SlidingAdmit {
                calls, period, n, ..
            } => CounterOp::SlidingAdmit {
                key,
                calls,
                period,
                n,
            },
            CounterOp::SlidingCheck { calls, period, .. } => {
                CounterOp::SlidingCheck { key, calls, period }
            }
            CounterOp::SlidingAdd { period, n, .. } => CounterOp::SlidingAdd { key, period, n },
            CounterOp::SlidingRelease { at, n, .. } => CounterOp::SlidingRelease { key, at, n },
            CounterOp::FixedAdmit { windows, n, .. } => CounterOp::FixedAdmit { key, windows, n },
            CounterOp::FixedCheck { windows, .. } => CounterOp::FixedCheck { key, windows },
            CounterOp::FixedAdd {
                windows,
                calls,
                bytes,
                ..
            } => CounterOp::FixedAdd {
                key,
                windows,
                calls,
                bytes,
            },
            CounterOp::FixedRelease {
                windows, start, n, ..
            } => CounterOp::FixedRelease {
                key,
                windows,
                start,
                n,
            },
            CounterOp::OwnAdmit { limits, .. } => CounterOp::OwnAdmit { key, limits },
            CounterOp::OwnRelease {
                rate_at, quota, n, ..
            } => CounterOp::OwnRelease {
                key,
                rate_at,
                quota,
                n,
            },
            CounterOp::OwnAddBytes { windows, bytes, .. } => CounterOp::OwnAddBytes {
                key,
                windows,
                bytes,
            },
            CounterOp::Lease { admit, calls, .. } => CounterOp::Lease { key, admit, calls },
        }
    }
}

/// Takes back `n` calls an own-limits admission counted.
fn own_release<'a>(
    key: CounterName<'a>,
    limits: &OwnLimits,
    o: &OwnVerdicts,
    now: Millis,
    n: u64,
) -> CounterOp<'a> {
    CounterOp::OwnRelease {
        key,
        rate_at: limits.rate.map(|_| now),
        quota: limits.quota.zip(o.quota).map(|(w, (_, s))| (w.period, s)),
        n,
    }
}

/// A lease's admission, in one update of its counter: the call, then as many more as the
/// counter leaves, up to `calls`. Answered as the plain admission of the call alone.
fn lease(
    store: &dyn CounterStore,
    key: &CounterName<'_>,
    admit: Leasable,
    calls: u64,
    now: Millis,
) -> Result<OpResult, StoreError> {
    Ok(match admit {
        Leasable::Sliding {
            calls: limit,
            period,
        } => OpResult::Verdict(update(store, key, |state| {
            let most = |room: u64| u32::try_from(calls.min(room).max(1)).unwrap_or(u32::MAX);
            match admit_weighed(state, limit, period, now, most) {
                // Answered as the call alone: what remains after it.
                (write, Verdict::Admitted { remaining }, n) => (
                    write,
                    Verdict::Admitted {
                        remaining: (remaining + u64::from(n)).saturating_sub(1),
                    },
                ),
                (write, denied, _) => (write, denied),
            }
        })?),
        Leasable::Fixed(windows) => {
            let (v, start) = update(store, key, |state| {
                let (counted, verdict) = windows.admit_in(state.bytes(), now, 1);
                match counted {
                    Some(mut w) => {
                        let room = match verdict.0 {
                            Verdict::Admitted { remaining } => remaining.saturating_add(1),
                            _ => 1,
                        };
                        w.count_more(calls.min(room).max(1) - 1);
                        encode_window(&w, windows.period, state);
                        (true, verdict)
                    }
                    None => (false, verdict),
                }
            })?;
            OpResult::Fixed(v, start)
        }
        Leasable::Own(limits) => {
            let mut verdicts = OwnVerdicts::default();
            limits.admit_up_to(store, key, now, calls, &mut verdicts)?;
            OpResult::Own(verdicts)
        }
    })
}

fn denied(v: &Verdict) -> bool {
    !matches!(v, Verdict::Admitted { .. })
}

/// A [`CounterOp`] with its counter's name owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedOp {
    key: KeptName,
    /// The operation, its name left empty ([`OwnedOp::op`] puts `key` back).
    op: CounterOp<'static>,
}

impl OwnedOp {
    pub fn op(&self) -> CounterOp<'_> {
        self.op.with_key(self.key.name())
    }
}

/// Where a call's counter operations go while it is decided or completed.
pub(crate) trait Counting {
    fn count(&self, op: CounterOp<'_>, now: Millis) -> Result<OpResult, StoreError>;
}

/// Applied at once to a store of this proxy's.
pub(crate) struct Local<'s>(pub &'s dyn CounterStore);

impl Counting for Local<'_> {
    fn count(&self, op: CounterOp<'_>, now: Millis) -> Result<OpResult, StoreError> {
        op.apply(self.0, now)
    }
}

/// The first pass of a shared decision: records every operation but the releases, and answers
/// as if every limit admitted.
#[derive(Default)]
pub(crate) struct Recording {
    pub ops: RefCell<Vec<OwnedOp>>,
}

impl Counting for Recording {
    fn count(&self, op: CounterOp<'_>, now: Millis) -> Result<OpResult, StoreError> {
        if op.is_release() {
            return Ok(OpResult::Done);
        }
        self.ops.borrow_mut().push(op.into_owned());
        Ok(op.assumed(now))
    }
}

/// The second pass: answers each operation with what the counter service answered for it, in
/// order. Releases are answered without a look: the service took back what a denied call
/// counted.
pub(crate) struct Answered<'r> {
    pub answers: &'r [OpResult],
    pub next: std::cell::Cell<usize>,
}

impl Counting for Answered<'_> {
    fn count(&self, op: CounterOp<'_>, _now: Millis) -> Result<OpResult, StoreError> {
        if op.is_release() {
            return Ok(OpResult::Done);
        }
        let i = self.next.get();
        self.next.set(i + 1);
        self.answers.get(i).copied().ok_or_else(|| {
            StoreError::Unavailable(format!(
                "the counter service answered {} operations; the call made more",
                self.answers.len()
            ))
        })
    }
}

/// Applies a call's operations in order, all or nothing: at the first that denies, what the
/// earlier ones counted is taken back and the rest are not applied. With `then_release`
/// (the call is denied after its limits by a step that counts nothing, such as a header
/// check), what they counted is taken back even when none denies. The answers go up to and
/// including the one that denied.
pub(crate) fn apply_all_or_nothing(
    ops: &[CounterOp<'_>],
    store: &dyn CounterStore,
    now: Millis,
    then_release: bool,
) -> Result<Vec<OpResult>, StoreError> {
    let mut answers = Vec::with_capacity(ops.len());
    let mut undo = Vec::new();
    let mut denied = false;
    for op in ops {
        let result = op.apply(store, now)?;
        answers.push(result);
        if result.denies() {
            denied = true;
            break;
        }
        undo.extend(op.undo(&result, now));
    }
    if denied || then_release {
        for u in undo.iter().rev() {
            // Best effort, as a local release: a failed one under-admits, never over-admits.
            let _ = u.apply(store, now);
        }
    }
    Ok(answers)
}
