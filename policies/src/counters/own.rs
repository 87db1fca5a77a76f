//! A subscription's own counters of one policy document: the document's `rate-limit` and
//! `quota` (their calls and bandwidth, not the `<api>` and `<operation>` limits nested in them)
//! kept in one state, named once per (subscription, document).
//!
//! APIM's usual product policy is a rate limit followed by a quota, and a call under it then
//! reads, changes and writes one counter instead of two. The two are checked in the document's
//! order and counted in both or (when one denies) in neither, in one update, so nothing has to
//! be taken back. In the filter that is one slot read and written per call instead of two.
//!
//! The state: the [`HEAD`] (its expiry the later of its parts', and the layout's version), the
//! length of the quota's part (a byte, 0 or [`WINDOW`]), the quota's fixed window, then the rate
//! limit's sliding window to the end (last, as it grows and shrinks). Each part is in the layout
//! of a counter of its own.

use super::{
    count_admission, counter_expiry, current, forget_other_layout, release_in, release_window,
    sliding_verdict, update, window_bytes, Admissions, CounterName, CounterStore, FixedWindows,
    Millis, State, StoreError, Verdict, Window, EXPIRY, HEAD, LAYOUT_VERSION, WINDOW,
};

/// The bytes before the quota's part: the [`HEAD`] and the quota part's length.
const OWN_HEAD: usize = HEAD + 1;

/// The own limits of one document that one update counts a call in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnLimits {
    /// The rate limit's calls and period.
    pub rate: Option<(u64, Millis)>,
    pub quota: Option<FixedWindows>,
    /// The quota comes before the rate limit in the document (it is checked first).
    pub quota_first: bool,
}

/// What the limits of an [`OwnLimits`] said of a call. The first to deny ends the update: the
/// limit after it has no verdict, and nothing is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnVerdicts {
    pub rate: Option<Verdict>,
    /// The quota's verdict and the start of the window it counted in.
    pub quota: Option<(Verdict, Millis)>,
}

/// The quota part's length, once the state is in this layout.
fn quota_len(bytes: &[u8]) -> usize {
    usize::from(bytes[HEAD])
}

/// Whether a state is in this layout.
fn in_own_layout(b: &[u8]) -> bool {
    b.len() >= OWN_HEAD && current(b) && {
        let q = quota_len(b);
        (q == 0 || q == WINDOW) && b.len() >= OWN_HEAD + q
    }
}

/// Puts a state that is not in this layout (never written, or another build's) into it, empty;
/// true when it did.
fn into_own_layout(state: &mut State<'_>) -> bool {
    let fits = in_own_layout(state.bytes());
    if !fits {
        let mut empty = [0; OWN_HEAD];
        empty[EXPIRY] = LAYOUT_VERSION;
        state.set(&empty);
    }
    !fits
}

/// Writes the quota's window into its part (which is made the first time).
fn set_quota(state: &mut State<'_>, w: &Window, period: Millis) {
    let bytes = window_bytes(w, period);
    if quota_len(state.bytes()) == WINDOW {
        state.bytes_mut()[OWN_HEAD..OWN_HEAD + WINDOW].copy_from_slice(&bytes);
    } else {
        state.insert(OWN_HEAD, &bytes);
        state.bytes_mut()[HEAD] = WINDOW as u8;
    }
}

/// Sets the state's expiry to the later of its parts'.
fn refresh_expiry(state: &mut State<'_>) {
    let b = state.bytes();
    let q = quota_len(b);
    let expiry = [&b[OWN_HEAD..OWN_HEAD + q], &b[OWN_HEAD + q..]]
        .into_iter()
        .filter_map(counter_expiry)
        .max()
        .unwrap_or(Millis::MIN);
    state.bytes_mut()[..EXPIRY].copy_from_slice(&expiry.to_le_bytes());
}

impl OwnLimits {
    /// Admits a call of weight 1 under each limit, in the document's order, and counts it in
    /// every one or, when one denies, in none. The verdicts are written into `verdicts` (where
    /// the caller reads them, rather than moved out through the store's update).
    pub fn admit(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        now: Millis,
        verdicts: &mut OwnVerdicts,
    ) -> Result<(), StoreError> {
        self.admit_up_to(store, key, now, 1, verdicts)
    }

    /// [`admit`](Self::admit), counting not one call but as many as both limits leave, up to
    /// `most` (a lease, [`super::lease`]). The verdicts are those of the one call: what remains
    /// after it alone.
    pub(crate) fn admit_up_to(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        now: Millis,
        most: u64,
        verdicts: &mut OwnVerdicts,
    ) -> Result<(), StoreError> {
        store.update(key, &mut |state| {
            *verdicts = OwnVerdicts::default();
            let mut write = into_own_layout(state);
            let q = quota_len(state.bytes());
            // Every verdict before anything is counted.
            let mut quota_window = None;
            for quota in [self.quota_first, !self.quota_first] {
                let admitted = if quota {
                    let Some(windows) = &self.quota else { continue };
                    let (w, verdict) =
                        windows.admit_in(&state.bytes()[OWN_HEAD..OWN_HEAD + q], now, 1);
                    verdicts.quota = Some(verdict);
                    quota_window = w;
                    quota_window.is_some()
                } else {
                    let Some((calls, period)) = self.rate else {
                        continue;
                    };
                    let mut sliding = state.tail(OWN_HEAD + q);
                    write |= forget_other_layout(&mut sliding);
                    let a = Admissions::of(sliding.bytes());
                    let verdict = sliding_verdict(a, calls, period, now);
                    verdicts.rate = Some(verdict);
                    matches!(verdict, Verdict::Admitted { .. })
                };
                if !admitted {
                    return write;
                }
            }
            // The calls counted: one, or as many as both limits leave, up to `most`.
            let room = |v: Option<Verdict>, after: u64| match v {
                Some(Verdict::Admitted { remaining }) => remaining.saturating_add(after),
                _ => u64::MAX,
            };
            let n = most
                .min(room(verdicts.rate, 0))
                .min(room(verdicts.quota.map(|(v, _)| v), 1))
                .max(1);
            if let Some((_, period)) = self.rate {
                let n32 = u32::try_from(n).unwrap_or(u32::MAX);
                count_admission(&mut state.tail(OWN_HEAD + q), period, now, n32);
                if let Some(Verdict::Admitted { remaining }) = &mut verdicts.rate {
                    *remaining = remaining.saturating_sub(1);
                }
            }
            if let (Some(windows), Some(mut w)) = (&self.quota, quota_window) {
                w.count_more(n - 1);
                set_quota(state, &w, windows.period);
            }
            refresh_expiry(state);
            true
        })
    }
}

/// Takes back `n` calls counted by [`OwnLimits::admit`] (a later step denied the call) or
/// leased by [`OwnLimits::admit_up_to`]: the rate limit's admissions at `rate_at`, and the
/// quota's in the window starting at `quota.1` (of period `quota.0`). The admissions left are
/// the same or older: the expiry stands.
pub(crate) fn release(
    store: &dyn CounterStore,
    key: &CounterName<'_>,
    rate_at: Option<Millis>,
    quota: Option<(Millis, Millis)>,
    n: u64,
) -> Result<(), StoreError> {
    update(store, key, |state| {
        if !in_own_layout(state.bytes()) {
            return (false, ());
        }
        let q = quota_len(state.bytes());
        let mut write = false;
        if let Some((period, start)) = quota {
            if let Some(w) = release_window(&state.bytes()[OWN_HEAD..OWN_HEAD + q], start, n) {
                set_quota(state, &w, period);
                write = true;
            }
        }
        if let Some(at) = rate_at {
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            write |= release_in(&mut state.tail(OWN_HEAD + q), at, n);
        }
        (write, ())
    })
}

/// Adds an exchange's bytes to the quota's window at `now` (the completion of a call under a
/// bandwidth quota).
pub(crate) fn add_bytes(
    store: &dyn CounterStore,
    key: &CounterName<'_>,
    windows: &FixedWindows,
    now: Millis,
    bytes: u64,
) -> Result<(), StoreError> {
    if bytes == 0 {
        return Ok(());
    }
    update(store, key, |state| {
        into_own_layout(state);
        let q = quota_len(state.bytes());
        let w = windows.add_in(&state.bytes()[OWN_HEAD..OWN_HEAD + q], now, 0, bytes);
        set_quota(state, &w, windows.period);
        refresh_expiry(state);
        (true, ())
    })
}

#[cfg(test)]
mod tests {
    use super::super::{sliding_admit, sliding_release, MemoryStore, CLOCK_SKEW};
    use super::*;
    use proptest::prelude::*;

    /// A counter of the tests, named `t|test|{name}`.
    fn name(name: &'static str) -> CounterName<'static> {
        CounterName::new("t", "test", name)
    }

    /// A rate limit of `rate` calls in 100 s and a quota of `quota` calls a minute.
    fn limits(rate: u64, quota: u64, quota_first: bool) -> OwnLimits {
        OwnLimits {
            rate: Some((rate, 100_000)),
            quota: Some(FixedWindows {
                origin: 0,
                period: 60_000,
                calls: Some(quota),
                bandwidth_kb: None,
            }),
            quota_first,
        }
    }

    fn admit(s: &MemoryStore, l: &OwnLimits, now: Millis) -> OwnVerdicts {
        let mut v = OwnVerdicts::default();
        l.admit(s, &name("sl"), now, &mut v).unwrap();
        v
    }

    fn admitted(remaining: u64) -> Verdict {
        Verdict::Admitted { remaining }
    }

    #[test]
    fn a_call_is_counted_under_both_limits_or_neither() {
        let s = MemoryStore::new();
        let l = limits(3, 2, false);
        let both = |rate, quota| OwnVerdicts {
            rate: Some(rate),
            quota: Some((quota, 0)),
        };
        assert_eq!(admit(&s, &l, 0), both(admitted(2), admitted(1)));
        assert_eq!(admit(&s, &l, 1), both(admitted(1), admitted(0)));
        // The quota denies: the rate limit admitted, but counts nothing either.
        let denied = Verdict::QuotaExceeded {
            bandwidth: false,
            seconds: 60,
        };
        assert_eq!(admit(&s, &l, 2), both(admitted(1), denied));
        // The quota renews; the rate limit still holds the two calls admitted, not three.
        assert_eq!(
            admit(&s, &l, 60_000),
            OwnVerdicts {
                rate: Some(admitted(0)),
                quota: Some((admitted(1), 60_000)),
            }
        );
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_limit_first_in_the_document_is_asked_first() {
        for quota_first in [false, true] {
            let s = MemoryStore::new();
            let l = limits(1, 1, quota_first);
            admit(&s, &l, 0);
            let v = admit(&s, &l, 1_000);
            if quota_first {
                assert_eq!(v.rate, None);
                assert!(matches!(v.quota, Some((Verdict::QuotaExceeded { .. }, 0))));
            } else {
                assert_eq!(v.rate, Some(Verdict::RateLimited { wait: 99_000 }));
                assert_eq!(v.quota, None);
            }
        }
    }

    #[test]
    fn the_expiry_is_the_later_of_the_parts() {
        let s = MemoryStore::new();
        let l = limits(3, 2, false);
        admit(&s, &l, 30);
        // The rate limit's last admission outlives the quota's minute.
        let state = s.get(&name("sl")).unwrap().unwrap().0;
        assert_eq!(counter_expiry(&state), Some(30 + 100_000 + CLOCK_SKEW));
        assert_eq!(state[EXPIRY], LAYOUT_VERSION);
    }

    #[test]
    fn a_state_of_another_layout_version_counts_as_never_written() {
        let s = MemoryStore::new();
        let l = limits(1, 5, false);
        admit(&s, &l, 0);
        let mut state = s.get(&name("sl")).unwrap().unwrap().0;
        // The same bytes with another version: another build's, read as nothing counted.
        state[EXPIRY] = LAYOUT_VERSION + 1;
        let stale = State::new(&mut state.clone()).bytes().to_vec();
        assert!(s
            .compare_and_set(
                &name("sl"),
                &stale,
                s.get(&name("sl")).unwrap().map(|(_, v)| v)
            )
            .unwrap());
        assert_eq!(admit(&s, &l, 1).rate, Some(admitted(0)));
        assert_eq!(
            admit(&s, &l, 2).rate,
            Some(Verdict::RateLimited { wait: 99_999 })
        );
    }

    #[test]
    fn a_release_takes_the_call_back_from_both() {
        let s = MemoryStore::new();
        let l = limits(1, 1, false);
        let first = admit(&s, &l, 5);
        release(&s, &name("sl"), Some(5), Some((60_000, 0)), 1).unwrap();
        assert_eq!(admit(&s, &l, 6), first);
    }

    #[test]
    fn bandwidth_is_added_to_the_quota_alone() {
        let s = MemoryStore::new();
        let l = OwnLimits {
            rate: Some((5, 100_000)),
            quota: Some(FixedWindows {
                origin: 0,
                period: 60_000,
                calls: None,
                bandwidth_kb: Some(1),
            }),
            quota_first: false,
        };
        admit(&s, &l, 0);
        add_bytes(&s, &name("sl"), &l.quota.unwrap(), 0, 1024).unwrap();
        let v = admit(&s, &l, 1);
        assert_eq!(v.rate, Some(admitted(4)));
        assert!(matches!(
            v.quota,
            Some((
                Verdict::QuotaExceeded {
                    bandwidth: true,
                    ..
                },
                0
            ))
        ));
    }

    /// What the two limits said of a call: the first denial, or both remaining counts.
    fn said(rate: Option<Verdict>, quota: Option<Verdict>, quota_first: bool) -> String {
        let order = if quota_first {
            [quota, rate]
        } else {
            [rate, quota]
        };
        match order
            .into_iter()
            .flatten()
            .find(|v| !matches!(v, Verdict::Admitted { .. }))
        {
            Some(denied) => format!("{denied:?}"),
            None => format!("{rate:?} {quota:?}"),
        }
    }

    proptest! {
        /// One counter for both limits decides every call as two counters kept apart did:
        /// each limit asked in the document's order, what an earlier one counted taken back
        /// when a later one denies, and now and then a call taken back by a later step.
        #[test]
        fn one_counter_decides_as_two_kept_apart(
            rate in 1u64..6,
            quota in 1u64..9,
            quota_first in any::<bool>(),
            calls in proptest::collection::vec((0i64..40_000, any::<bool>()), 1..120),
        ) {
            let l = limits(rate, quota, quota_first);
            let windows = l.quota.unwrap();
            let (one, apart) = (MemoryStore::new(), MemoryStore::new());
            let mut now = 0;
            for (gap, taken_back) in calls {
                now += gap;
                let v = admit(&one, &l, now);
                // Two counters: each asked in order, the earlier one's call taken back when
                // the later one denies.
                let (mut r, mut q) = (None, None);
                for asking_quota in [quota_first, !quota_first] {
                    if asking_quota {
                        let (verdict, start) = windows.admit(&apart, &name("q"), now, 1).unwrap();
                        q = Some((verdict, start));
                        if !matches!(verdict, Verdict::Admitted { .. }) {
                            if r.is_some() {
                                sliding_release(&apart, &name("rl"), now, 1).unwrap();
                            }
                            break;
                        }
                    } else {
                        let verdict = sliding_admit(&apart, &name("rl"), rate, 100_000, now, 1).unwrap();
                        r = Some(verdict);
                        if !matches!(verdict, Verdict::Admitted { .. }) {
                            if let Some((_, start)) = q {
                                windows.release(&apart, &name("q"), start, 1).unwrap();
                            }
                            break;
                        }
                    }
                }
                let q = q.map(|(v, _)| v);
                prop_assert_eq!(
                    said(v.rate, v.quota.map(|(v, _)| v), quota_first),
                    said(r, q, quota_first),
                    "at {}", now
                );
                let all = said(v.rate, v.quota.map(|(v, _)| v), quota_first).starts_with("Some");
                if taken_back && all {
                    let start = v.quota.map(|(_, s)| s).unwrap();
                    release(&one, &name("sl"), Some(now), Some((60_000, start)), 1).unwrap();
                    sliding_release(&apart, &name("rl"), now, 1).unwrap();
                    windows.release(&apart, &name("q"), start, 1).unwrap();
                }
            }
        }
    }
}
