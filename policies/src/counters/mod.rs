//! Counters: the state behind rate limits and quotas, and the only state shared between calls.
//!
//! The engine keeps every counting rule here and asks of the host only a [`CounterStore`]:
//! versioned bytes under a name ([`CounterName`], handed over in its parts) with
//! compare-and-swap, which proxy-wasm shared data provides directly. Every change is a read, a decision and a conditional write, retried a bounded
//! number of times, so concurrent workers never over-admit.
//!
//! Two kinds of state:
//! - a **sliding window** (`rate-limit`, `rate-limit-by-key`): one entry per instant with
//!   admissions inside the last period (and [`CLOCK_SKEW`] before it), each with the running
//!   count of admissions, so that a call costs the same however many its window holds, and
//!   memory per counter is bounded by the limit;
//! - a **fixed window** (`quota`, `quota-by-key`): the window's start, calls and bytes.
//!
//! A subscription's own `rate-limit` and `quota` counters of one policy document are one state
//! holding one of each ([`own`]), so that a call under both is one update.
//!
//! Its rooms: [`store`] (the store trait and the in-memory store), [`sliding`] and [`fixed`]
//! (the two kinds of window), [`own`] (a subscription's own limits of a document as one state),
//! [`op`] (counter operations as data) and [`lease`] (shares of large limits a proxy spends
//! locally, for counters a fleet shares).
//! Here: what every state starts with (its expiry and its layout's version) and the verdicts.

use crate::clock::Millis;

mod fixed;
pub(crate) mod lease;
pub(crate) mod op;
pub(crate) mod own;
mod sliding;
mod store;

pub use fixed::FixedWindows;
pub(crate) use fixed::*;
pub(crate) use sliding::*;
pub(crate) use store::{update, KeptName};
pub use store::{
    Change, CounterName, CounterStore, MemoryStore, State, StoreError, BY_KEY_QUOTA, BY_KEY_RATE,
    MAX_ATTEMPTS,
};

/// What a limit says of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted; this many calls remain in the window.
    Admitted { remaining: u64 },
    /// Denied; the wait until a call would be admitted.
    RateLimited { wait: Millis },
    /// Quota exhausted (by calls or by bandwidth); whole seconds until it renews.
    QuotaExceeded { bandwidth: bool, seconds: u64 },
}

/// Every counter state starts with the instant after which it is as good as absent, so that a
/// store that must bound its memory can drop expired states without knowing their kind.
pub(crate) const EXPIRY: usize = 8;

/// Then the version of the states' layout: a state of another version (written by another
/// build) reads as never written. Builds before this byte were never released, and nothing of
/// theirs is carried over.
pub(crate) const LAYOUT_VERSION: u8 = 1;

/// The bytes every state starts with: its expiry and its layout's version.
pub(crate) const HEAD: usize = EXPIRY + 1;

/// Whether a state is of this build's layout version.
pub(crate) fn current(bytes: &[u8]) -> bool {
    bytes.len() >= HEAD && bytes[EXPIRY] == LAYOUT_VERSION
}

/// When a counter state expires (it then counts as never written).
pub fn counter_expiry(bytes: &[u8]) -> Option<Millis> {
    let head: [u8; EXPIRY] = bytes.get(..EXPIRY)?.try_into().ok()?;
    Some(i64::from_le_bytes(head))
}

/// How far workers' clocks may disagree without a worker behind counting less than it should:
/// a write keeps admissions this much longer than its own window needs, for a worker whose
/// clock has not reached them yet.
pub(crate) const CLOCK_SKEW: Millis = 1_000;

pub(crate) fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(x)
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A counter of the tests, named `t|test|{name}`.
    fn name(name: &'static str) -> CounterName<'static> {
        CounterName::new("t", "test", name)
    }

    /// Minute-long fixed windows from the epoch.
    fn per_minute(calls: u64, bandwidth_kb: Option<u64>) -> FixedWindows {
        FixedWindows {
            origin: 0,
            period: 60_000,
            calls: Some(calls),
            bandwidth_kb,
        }
    }
    use proptest::prelude::*;

    #[test]
    fn sliding_window_edges() {
        let s = MemoryStore::new();
        let admit = |now| sliding_admit(&s, &name("k"), 2, 10_000, now, 1).unwrap();
        assert_eq!(admit(0), Verdict::Admitted { remaining: 1 });
        assert_eq!(admit(4_000), Verdict::Admitted { remaining: 0 });
        assert_eq!(admit(9_999), Verdict::RateLimited { wait: 1 });
        // At 10 000 the call at 0 has left (t - period, t].
        assert_eq!(admit(10_000), Verdict::Admitted { remaining: 0 });
        assert_eq!(admit(10_000), Verdict::RateLimited { wait: 4_000 });
    }

    #[test]
    fn admissions_at_one_instant_share_an_entry() {
        let s = MemoryStore::new();
        for _ in 0..3 {
            sliding_admit(&s, &name("k"), 10, 1000, 7, 1).unwrap();
        }
        assert_eq!(
            s.get(&name("k")).unwrap().unwrap().0.len(),
            SLIDING_HEAD + ADMISSION
        );
        sliding_release(&s, &name("k"), 7, 1).unwrap();
        assert_eq!(
            decode_sliding(Some(&s.get(&name("k")).unwrap().unwrap().0)),
            vec![(7, 2)]
        );
    }

    #[test]
    fn states_carry_their_expiry() {
        let s = MemoryStore::new();
        sliding_admit(&s, &name("r"), 5, 1_000, 10, 1).unwrap();
        sliding_admit(&s, &name("r"), 5, 1_000, 20, 1).unwrap();
        assert_eq!(
            counter_expiry(&s.get(&name("r")).unwrap().unwrap().0),
            Some(1_020 + CLOCK_SKEW)
        );
        let q = per_minute(1, None);
        q.admit(&s, &name("q"), 61_000, 1).unwrap();
        assert_eq!(
            counter_expiry(&s.get(&name("q")).unwrap().unwrap().0),
            Some(120_000 + CLOCK_SKEW)
        );
        let forever = FixedWindows { period: 0, ..q };
        forever.admit(&s, &name("f"), 5, 1).unwrap();
        assert_eq!(
            counter_expiry(&s.get(&name("f")).unwrap().unwrap().0),
            Some(Millis::MAX)
        );
    }

    #[test]
    fn admissions_out_of_time_order() {
        // Another worker's clock runs behind: its admission goes before a later one, so the
        // state stays in time order.
        let s = MemoryStore::new();
        let admit = |now| sliding_admit(&s, &name("k"), 10, 1_000, now, 1).unwrap();
        admit(1_000);
        admit(10);
        admit(1_000);
        let state = |s: &MemoryStore| s.get(&name("k")).unwrap().unwrap().0;
        assert_eq!(decode_sliding(Some(&state(&s))), vec![(10, 1), (1_000, 2)]);
        assert_eq!(counter_expiry(&state(&s)), Some(2_000 + CLOCK_SKEW));
        // At 1,500 the admission at 10 has left the window (it no longer counts), but it is
        // kept for a worker whose clock is up to CLOCK_SKEW behind.
        assert_eq!(admit(1_500), Verdict::Admitted { remaining: 7 });
        assert_eq!(
            decode_sliding(Some(&state(&s))),
            vec![(10, 1), (1_000, 2), (1_500, 1)]
        );
        // At 2,100 it has left the skew too, and the admissions at 1,000 count no more; the
        // entries that left are dropped once there are as many as are kept (or DROP_BATCH).
        assert_eq!(admit(2_100), Verdict::Admitted { remaining: 8 });
        assert_eq!(
            decode_sliding(Some(&state(&s))),
            vec![(10, 1), (1_000, 2), (1_500, 1), (2_100, 1)]
        );
        assert_eq!(counter_expiry(&state(&s)), Some(3_100 + CLOCK_SKEW));
        // At 3,100 two have left and three are kept; at 3,600 three have left and three are
        // kept, and the three are dropped.
        assert_eq!(admit(3_100), Verdict::Admitted { remaining: 9 });
        assert_eq!(decode_sliding(Some(&state(&s))).len(), 5);
        assert_eq!(admit(3_600), Verdict::Admitted { remaining: 8 });
        assert_eq!(
            decode_sliding(Some(&state(&s))),
            vec![(2_100, 1), (3_100, 1), (3_600, 1)]
        );
        // The running counts carry on from the entries dropped.
        assert_eq!(admit(3_600), Verdict::Admitted { remaining: 7 });
        assert_eq!(admit(3_601), Verdict::Admitted { remaining: 6 });
    }

    #[test]
    fn a_worker_behind_counts_in_the_window_a_worker_ahead_began() {
        let s = MemoryStore::new();
        let q = per_minute(2, None);
        // Ahead: the first call of the window starting at 60,000.
        assert!(matches!(
            q.admit(&s, &name("q"), 60_000, 1).unwrap().0,
            Verdict::Admitted { remaining: 1 }
        ));
        // Behind by 5 ms: its clock is still in the window before, yet it must not start that
        // window over the newer one.
        assert_eq!(
            q.admit(&s, &name("q"), 59_995, 1).unwrap(),
            (Verdict::Admitted { remaining: 0 }, 60_000)
        );
        assert!(matches!(
            q.admit(&s, &name("q"), 60_001, 1).unwrap().0,
            Verdict::QuotaExceeded { .. }
        ));
    }

    #[test]
    fn release_restores_a_slot() {
        let s = MemoryStore::new();
        sliding_admit(&s, &name("k"), 1, 1000, 5, 1).unwrap();
        sliding_release(&s, &name("k"), 5, 1).unwrap();
        assert_eq!(
            sliding_admit(&s, &name("k"), 1, 1000, 6, 1).unwrap(),
            Verdict::Admitted { remaining: 0 }
        );
    }

    #[test]
    fn a_window_that_was_idle_keeps_only_its_new_admission() {
        let s = MemoryStore::new();
        sliding_admit(&s, &name("k"), 5, 1_000, 0, 1).unwrap();
        // Past the window and the skew, the one entry left is as many as are kept: dropped.
        sliding_admit(&s, &name("k"), 5, 1_000, 5_000, 1).unwrap();
        let state = s.get(&name("k")).unwrap().unwrap().0;
        assert_eq!(decode_sliding(Some(&state)), vec![(5_000, 1)]);
        assert_eq!(state.len(), SLIDING_HEAD + ADMISSION);
    }

    #[test]
    fn releasing_an_admission_keeps_the_others_counted() {
        let s = MemoryStore::new();
        for now in [5, 6, 6, 7] {
            sliding_admit(&s, &name("k"), 10, 1_000, now, 1).unwrap();
        }
        sliding_release(&s, &name("k"), 6, 2).unwrap();
        // Nothing to take back at 9: nothing changes.
        sliding_release(&s, &name("k"), 9, 1).unwrap();
        let state = |s: &MemoryStore| decode_sliding(Some(&s.get(&name("k")).unwrap().unwrap().0));
        assert_eq!(state(&s), vec![(5, 1), (7, 1)]);
        assert_eq!(
            sliding_admit(&s, &name("k"), 10, 1_000, 8, 1).unwrap(),
            Verdict::Admitted { remaining: 7 }
        );
        // More than was admitted at 5 is not taken back.
        sliding_release(&s, &name("k"), 5, 2).unwrap();
        assert_eq!(state(&s), vec![(5, 1), (7, 1), (8, 1)]);
    }

    /// A store with only `get` and `compare_and_set`: the trait's own `update`, as the filter's
    /// shared data had before it read each slot once.
    struct CasOnly(MemoryStore);

    impl CounterStore for CasOnly {
        fn get(&self, key: &CounterName<'_>) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            self.0.get(key)
        }
        fn compare_and_set(
            &self,
            key: &CounterName<'_>,
            value: &[u8],
            version: Option<u32>,
        ) -> Result<bool, StoreError> {
            self.0.compare_and_set(key, value, version)
        }
    }

    /// Every write loses to another writer.
    struct AlwaysBeaten;

    impl CounterStore for AlwaysBeaten {
        fn get(&self, _: &CounterName<'_>) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(None)
        }
        fn compare_and_set(
            &self,
            _: &CounterName<'_>,
            _: &[u8],
            _: Option<u32>,
        ) -> Result<bool, StoreError> {
            Ok(false)
        }
    }

    #[test]
    fn an_update_that_always_loses_is_an_error_after_the_last_attempt() {
        let mut attempts = 0;
        let e = AlwaysBeaten
            .update(&CounterName::new("rl", "s", "x"), &mut |state| {
                attempts += 1;
                state.set(&[1]);
                true
            })
            .unwrap_err();
        assert_eq!(e, StoreError::Contended("rl|s|x".into()));
        assert_eq!(attempts, MAX_ATTEMPTS);
    }

    #[test]
    fn memory_store_updates_in_place() {
        let s = MemoryStore::new();
        let write = |bytes: &'static [u8]| {
            move |state: &mut State<'_>| {
                state.set(bytes);
                true
            }
        };
        s.update(&name("a"), &mut write(b"one")).unwrap();
        let (_, v1) = s.get(&name("a")).unwrap().unwrap();
        s.update(&name("a"), &mut write(b"two!")).unwrap();
        let (bytes, v2) = s.get(&name("a")).unwrap().unwrap();
        assert_eq!((bytes.as_slice(), v2 > v1), (&b"two!"[..], true));
        // The change sees the current bytes; declining writes nothing and keeps the version.
        let mut seen = None;
        s.update(&name("a"), &mut |state| {
            seen = Some(state.bytes().to_vec());
            false
        })
        .unwrap();
        assert_eq!(seen.as_deref(), Some(&b"two!"[..]));
        assert_eq!(s.get(&name("a")).unwrap().unwrap().1, v2);
        // A counter never written is seen empty.
        s.update(&name("b"), &mut |state| {
            assert!(state.bytes().is_empty());
            false
        })
        .unwrap();
        assert_eq!(s.get(&name("b")).unwrap(), None);
    }

    #[test]
    fn a_counter_name_is_its_parts_joined_by_bars() {
        let n = CounterName::new("sl", "sub-1", "product:starter");
        assert_eq!(n.to_string(), "sl|sub-1|product:starter");
        assert_eq!(n.text_len(), "sl|sub-1|product:starter".len());
        let mut text = b"x".to_vec();
        n.write_to(&mut text);
        assert_eq!(text, b"xsl|sub-1|product:starter");
        assert!(n.is(b"sl|sub-1|product:starter"));
        for other in [
            "sl|sub-1|product:starteR",
            "sl|sub-1|product:starte",
            "sl|sub-2|product:starter",
            "sl+sub-1|product:starter",
            "sl|sub-1+product:starter",
            "q|sub-1|product:starter",
            "",
        ] {
            assert!(!n.is(other.as_bytes()), "{other}");
        }
        // Kept past the call, it names the same counter.
        let kept = KeptName::of(&n);
        assert_eq!(kept.name(), n);
        let keyed = CounterName::new("rlk", "60000", "a|b");
        assert_eq!(KeptName::of(&keyed).name(), keyed);
    }

    #[test]
    fn the_memory_store_finds_a_counter_by_its_parts() {
        let s = MemoryStore::new();
        let write = |name: &CounterName<'_>, bytes: &'static [u8]| {
            s.update(name, &mut |state| {
                state.set(bytes);
                true
            })
            .unwrap()
        };
        write(&CounterName::new("sl", "sub-1", "product:starter"), b"one");
        write(&CounterName::new("sl", "sub-10", "product:starter"), b"two");
        // One text (`sl|a|b|c`) split in two ways: two counters.
        write(&CounterName::new("sl", "a", "b|c"), b"three");
        write(&CounterName::new("sl", "a|b", "c"), b"four");
        let read = |kind, owner, name| {
            s.get(&CounterName::new(kind, owner, name))
                .unwrap()
                .map(|(b, _)| b)
        };
        assert_eq!(
            read("sl", "sub-1", "product:starter").as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(
            read("sl", "sub-10", "product:starter").as_deref(),
            Some(&b"two"[..])
        );
        assert_eq!(read("sl", "a", "b|c").as_deref(), Some(&b"three"[..]));
        assert_eq!(read("sl", "a|b", "c").as_deref(), Some(&b"four"[..]));
        assert_eq!(read("sl", "sub-1", "product:starteR"), None);
        assert_eq!(read("q", "sub-1", "product:starter"), None);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn memory_store_cas() {
        let s = MemoryStore::new();
        assert!(s.compare_and_set(&name("a"), b"1", None).unwrap());
        assert!(!s.compare_and_set(&name("a"), b"2", None).unwrap());
        let (_, v) = s.get(&name("a")).unwrap().unwrap();
        assert!(!s.compare_and_set(&name("a"), b"2", Some(v + 1)).unwrap());
        assert!(s.compare_and_set(&name("a"), b"2", Some(v)).unwrap());
        assert_eq!(s.get(&name("a")).unwrap().unwrap().0, b"2");
    }

    #[test]
    fn fixed_window_calls_and_bandwidth() {
        let s = MemoryStore::new();
        let q = per_minute(2, Some(1));
        assert!(matches!(
            q.admit(&s, &name("q"), 1_000, 1).unwrap().0,
            Verdict::Admitted { remaining: 1 }
        ));
        q.add(&s, &name("q"), 1_500, 0, 1024).unwrap();
        assert_eq!(
            q.admit(&s, &name("q"), 2_000, 1).unwrap().0,
            Verdict::QuotaExceeded {
                bandwidth: true,
                seconds: 58
            }
        );
        // The next window renews both.
        assert!(matches!(
            q.admit(&s, &name("q"), 60_000, 1).unwrap().0,
            Verdict::Admitted { remaining: 1 }
        ));
    }

    /// The reference: admissions kept in full, counted naively.
    fn naive_sliding(times: &[Millis], calls: u64, period: Millis) -> Vec<bool> {
        let mut admitted: Vec<Millis> = Vec::new();
        times
            .iter()
            .map(|&t| {
                let in_window = admitted
                    .iter()
                    .filter(|&&a| a > t - period && a <= t)
                    .count() as u64;
                let ok = in_window < calls;
                if ok {
                    admitted.push(t);
                }
                ok
            })
            .collect()
    }

    fn naive_fixed(times: &[Millis], calls: u64, origin: Millis, period: Millis) -> Vec<bool> {
        let mut counts: std::collections::HashMap<i64, u64> = Default::default();
        times
            .iter()
            .map(|&t| {
                let window = (t - origin).div_euclid(period);
                let c = counts.entry(window).or_default();
                let ok = *c < calls;
                if ok {
                    *c += 1;
                }
                ok
            })
            .collect()
    }

    /// Turns gaps between calls into the calls' instants, from a day in 2023.
    fn gaps_to_instants(gaps: &mut [Millis]) {
        let mut t = 1_700_000_000_000;
        for g in gaps.iter_mut() {
            t += *g;
            *g = t;
        }
    }

    proptest! {
        #[test]
        fn sliding_matches_the_reference(
            mut gaps in proptest::collection::vec(0i64..3_000, 1..200),
            calls in 1u64..8,
            period in 1_000i64..10_000,
        ) {
            gaps_to_instants(&mut gaps);
            let s = MemoryStore::new();
            let got: Vec<bool> = gaps.iter().map(|&t| matches!(sliding_admit(&s, &name("k"), calls, period, t, 1).unwrap(), Verdict::Admitted { .. })).collect();
            prop_assert_eq!(&got, &naive_sliding(&gaps, calls, period));
            // The compare-and-swap loop counts the same as the in-place update.
            let cas = CasOnly(MemoryStore::new());
            let by_cas: Vec<bool> = gaps.iter().map(|&t| matches!(sliding_admit(&cas, &name("k"), calls, period, t, 1).unwrap(), Verdict::Admitted { .. })).collect();
            prop_assert_eq!(by_cas, got);
        }

        /// Many admissions in a window: counted as the reference counts them, and the entries
        /// that have left the window and the skew never pile up past [`DROP_BATCH`], nor past as
        /// many as are kept.
        #[test]
        fn a_busy_window_counts_exactly_and_stays_bounded(
            mut gaps in proptest::collection::vec(0i64..40, 1..600),
            calls in 1u64..120,
            period in 1_000i64..3_000,
        ) {
            gaps_to_instants(&mut gaps);
            let s = MemoryStore::new();
            let mut got = Vec::new();
            for &t in &gaps {
                let admitted = matches!(sliding_admit(&s, &name("k"), calls, period, t, 1).unwrap(), Verdict::Admitted { .. });
                got.push(admitted);
                let state = s.get(&name("k")).unwrap().unwrap().0;
                let a = Admissions::of(&state);
                let dead = a.first_after(kept_after(period, t));
                if admitted {
                    prop_assert!(dead < DROP_BATCH && (dead == 0 || dead < a.len() - dead), "{} of {}", dead, a.len());
                }
                prop_assert!(a.iter().map(|(_, n)| u64::from(n)).sum::<u64>() == a.since(0));
            }
            prop_assert_eq!(&got, &naive_sliding(&gaps, calls, period));
        }

        /// Weighted admissions, some taken back at once (a later limit denied the call), in the
        /// memory store and through compare-and-swap: the same verdicts and remaining calls as
        /// a plain list of what was admitted and not taken back.
        #[test]
        fn admissions_and_releases_match_the_reference(
            ops in proptest::collection::vec((0i64..60, 1u32..4, any::<bool>()), 1..400),
            calls in 1u64..40,
            period in 1_000i64..3_000,
        ) {
            let (s, cas) = (MemoryStore::new(), CasOnly(MemoryStore::new()));
            let mut admitted: Vec<(Millis, u32)> = Vec::new();
            let mut t = 1_700_000_000_000;
            for (gap, n, release) in ops {
                t += gap;
                let used: u64 = admitted.iter().filter(|&&(at, _)| at > t - period).map(|&(_, k)| u64::from(k)).sum();
                let want = if used < calls {
                    Verdict::Admitted { remaining: calls.saturating_sub(used + u64::from(n)) }
                } else {
                    let oldest = admitted.iter().map(|&(at, _)| at).filter(|&at| at > t - period).min().unwrap_or(t);
                    Verdict::RateLimited { wait: (oldest + period - t).max(1) }
                };
                for store in [&s as &dyn CounterStore, &cas] {
                    prop_assert_eq!(sliding_admit(store, &name("k"), calls, period, t, n).unwrap(), want);
                    if release && used < calls {
                        sliding_release(store, &name("k"), t, n).unwrap();
                    }
                }
                if !release && used < calls {
                    admitted.push((t, n));
                }
            }
        }

        /// Workers whose clocks disagree by less than CLOCK_SKEW: a call counts every admission
        /// after `t - period`, later ones included (never over-admit).
        #[test]
        fn sliding_with_clocks_that_disagree(
            steps in proptest::collection::vec((0i64..2_000, -CLOCK_SKEW / 2..CLOCK_SKEW / 2), 1..200),
            calls in 1u64..8,
            period in 1_000i64..10_000,
        ) {
            let mut t = 1_700_000_000_000;
            let times: Vec<Millis> = steps.iter().map(|(gap, skew)| { t += gap; t + skew }).collect();
            let s = MemoryStore::new();
            let got: Vec<bool> = times.iter().map(|&t| matches!(sliding_admit(&s, &name("k"), calls, period, t, 1).unwrap(), Verdict::Admitted { .. })).collect();
            // Whatever order the admissions came in, the state is kept in time order.
            let kept = decode_sliding(s.get(&name("k")).unwrap().map(|(b, _)| b).as_deref());
            prop_assert!(kept.windows(2).all(|w| w[0].0 < w[1].0), "{:?}", kept);
            let mut admitted: Vec<Millis> = Vec::new();
            let want: Vec<bool> = times.iter().map(|&t| {
                let ok = (admitted.iter().filter(|&&a| a > t - period).count() as u64) < calls;
                if ok { admitted.push(t); }
                ok
            }).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn fixed_matches_the_reference(
            mut gaps in proptest::collection::vec(0i64..5_000, 1..200),
            calls in 1u64..8,
            period in 1_000i64..20_000,
            origin in -100_000i64..100_000,
        ) {
            let mut t = 0;
            for g in gaps.iter_mut() { t += *g; *g = t; }
            let s = MemoryStore::new();
            let q = FixedWindows { origin, period, calls: Some(calls), bandwidth_kb: None };
            let got: Vec<bool> = gaps.iter().map(|&t| matches!(q.admit(&s, &name("k"), t, 1).unwrap().0, Verdict::Admitted { .. })).collect();
            prop_assert_eq!(&got, &naive_fixed(&gaps, calls, origin, period));
            let cas = CasOnly(MemoryStore::new());
            let by_cas: Vec<bool> = gaps.iter().map(|&t| matches!(q.admit(&cas, &name("k"), t, 1).unwrap().0, Verdict::Admitted { .. })).collect();
            prop_assert_eq!(by_cas, got);
        }
    }
}
