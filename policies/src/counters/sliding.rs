//! Sliding windows (`rate-limit`, `rate-limit-by-key`): a call at `t` is admitted when fewer
//! than `calls` were admitted in `(t - period, t]`.

use super::*;

/// A sliding-window state: the [`HEAD`], the running count before its first entry (`u32`),
/// then one entry of [`ADMISSION`] bytes per instant with admissions, in time order: the instant
/// (`i64`) and the running count of admissions up to and including it (`u32`, wrapping). The
/// admissions from any entry on are then one subtraction, and the entry where a window begins
/// one binary search.
pub(crate) const SLIDING_HEAD: usize = HEAD + 4;

/// The bytes of one entry of a sliding-window state: its instant, then the running count.
pub(crate) const ADMISSION: usize = 12;

/// Entries that have left the window and the skew are dropped once there are this many (or as
/// many as are kept), so that a call does not move the whole state each time one leaves.
pub(crate) const DROP_BATCH: usize = 32;

/// Admissions after this instant are kept when a state is written at `now`.
pub(crate) fn kept_after(period: Millis, now: Millis) -> Millis {
    now.saturating_sub(period).saturating_sub(CLOCK_SKEW)
}

/// A sliding-window state's entries, read where they lie.
#[derive(Clone, Copy)]
pub(crate) struct Admissions<'b> {
    /// The running count before the first entry.
    base: u32,
    entries: &'b [u8],
}

impl<'b> Admissions<'b> {
    /// The entries of a state; none when it is not a sliding-window state of this layout
    /// ([`is_sliding`]).
    pub(crate) fn of(bytes: &'b [u8]) -> Self {
        match bytes.get(SLIDING_HEAD..) {
            Some(entries) if is_sliding(bytes) => Admissions {
                base: u32_at(bytes, HEAD),
                entries,
            },
            _ => Admissions {
                base: 0,
                entries: &[],
            },
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len() / ADMISSION
    }

    pub(crate) fn at(&self, i: usize) -> Millis {
        i64_at(self.entries, i * ADMISSION)
    }

    pub(crate) fn running(&self, i: usize) -> u32 {
        u32_at(self.entries, i * ADMISSION + 8)
    }

    /// The running count before entry `i`.
    pub(crate) fn before(&self, i: usize) -> u32 {
        match i {
            0 => self.base,
            _ => self.running(i - 1),
        }
    }

    /// The admissions of entry `i`.
    pub(crate) fn count(&self, i: usize) -> u32 {
        self.running(i).wrapping_sub(self.before(i))
    }

    /// The first entry later than `t` (the number of entries at or before it): the standard
    /// library's binary search, which picks each half without a branch to mispredict.
    pub(crate) fn first_after(&self, t: Millis) -> usize {
        let (entries, _) = self.entries.as_chunks::<ADMISSION>();
        entries.partition_point(|&[a, b, c, d, e, f, g, h, ..]| {
            i64::from_le_bytes([a, b, c, d, e, f, g, h]) <= t
        })
    }

    /// The admissions from entry `i` on.
    pub(crate) fn since(&self, i: usize) -> u64 {
        match self.len() {
            n if i < n => u64::from(self.running(n - 1).wrapping_sub(self.before(i))),
            _ => 0,
        }
    }

    pub(crate) fn latest(&self) -> Option<Millis> {
        self.len().checked_sub(1).map(|i| self.at(i))
    }

    #[cfg(test)]
    pub(crate) fn iter(self) -> impl Iterator<Item = (Millis, u32)> + 'b {
        (0..self.len()).map(move |i| (self.at(i), self.count(i)))
    }
}

/// Whether a state is a sliding-window state of this layout: the head, then whole entries.
pub(crate) fn is_sliding(bytes: &[u8]) -> bool {
    current(bytes)
        && bytes.len() >= SLIDING_HEAD
        && (bytes.len() - SLIDING_HEAD).is_multiple_of(ADMISSION)
}

/// Drops a state that is not a sliding-window state of this layout (another build's), so that
/// it reads as never written; true when it did.
pub(crate) fn forget_other_layout(state: &mut State<'_>) -> bool {
    let other = !state.bytes().is_empty() && !is_sliding(state.bytes());
    if other {
        state.set(&[]);
    }
    other
}

/// A sliding-window state with no admission.
pub(crate) fn empty_sliding() -> [u8; SLIDING_HEAD] {
    let mut head = [0; SLIDING_HEAD];
    head[EXPIRY] = LAYOUT_VERSION;
    head
}

#[cfg(test)]
pub(crate) fn decode_sliding(bytes: Option<&[u8]>) -> Vec<(Millis, u32)> {
    Admissions::of(bytes.unwrap_or(&[])).iter().collect()
}

/// Admitted while fewer than `calls` were admitted in `(now - period, now]` (later ones, from
/// a worker whose clock runs ahead, count too: never over-admit); else the wait until the oldest
/// admission in the window leaves it.
pub(crate) fn sliding_verdict(
    a: Admissions<'_>,
    calls: u64,
    period: Millis,
    now: Millis,
) -> Verdict {
    let first = a.first_after(now.saturating_sub(period));
    let used = a.since(first);
    if used < calls {
        return Verdict::Admitted {
            remaining: calls - used,
        };
    }
    let oldest = if first < a.len() { a.at(first) } else { now };
    Verdict::RateLimited {
        wait: (oldest + period - now).max(1),
    }
}

/// Adds `delta` to the running counts of entries `from..` of a state in this layout (they
/// wrap, so taking `n` away is adding `n.wrapping_neg()`).
pub(crate) fn add_running(state: &mut State<'_>, from: usize, delta: u32) {
    let entries = &mut state.bytes_mut()[SLIDING_HEAD..];
    for e in entries.chunks_exact_mut(ADMISSION).skip(from) {
        let r = u32_at(e, 8).wrapping_add(delta);
        e[8..].copy_from_slice(&r.to_le_bytes());
    }
}

/// Counts `n` admissions at `now` in a state in this layout: merged into the entry of that
/// instant, else a new entry in its place in time order (the usual place is the end). Then the
/// expiry follows the latest entry, and the entries that have left the window and the skew are
/// dropped once there are [`DROP_BATCH`] of them, or as many as are kept.
pub(crate) fn count_admission(state: &mut State<'_>, period: Millis, now: Millis, n: u32) {
    if !is_sliding(state.bytes()) {
        state.set(&empty_sliding());
    }
    let a = Admissions::of(state.bytes());
    let (len, latest) = (a.len(), a.latest().map_or(now, |l| l.max(now)));
    // In time order, the usual place is the end.
    let place = if latest == now {
        len
    } else {
        a.first_after(now)
    };
    let merge = place > 0 && a.at(place - 1) == now;
    // The entries that have left are dropped once there are DROP_BATCH of them, or as many as
    // are kept. Entries are in time order, so each condition is one look at one entry; only
    // when one holds are they counted (the new admission goes after them, so neither their
    // number nor the running count before the first one kept changes).
    let kept_after = kept_after(period, now);
    let total = len + usize::from(!merge);
    let half = total.div_ceil(2);
    let due = (len >= DROP_BATCH && a.at(DROP_BATCH - 1) <= kept_after)
        || ((1..=len).contains(&half) && a.at(half - 1) <= kept_after);
    let dead = if due { a.first_after(kept_after) } else { 0 };
    let base = a.before(dead);
    if merge {
        add_running(state, place - 1, n);
    } else {
        let mut entry = [0u8; ADMISSION];
        entry[..8].copy_from_slice(&now.to_le_bytes());
        entry[8..].copy_from_slice(&a.before(place).wrapping_add(n).to_le_bytes());
        let at = SLIDING_HEAD + place * ADMISSION;
        state.insert(at, &entry);
        if place < len {
            add_running(state, place + 1, n);
        }
    }
    let expiry = latest.saturating_add(period).saturating_add(CLOCK_SKEW);
    state.bytes_mut()[..EXPIRY].copy_from_slice(&expiry.to_le_bytes());
    if dead > 0 {
        state.bytes_mut()[HEAD..SLIDING_HEAD].copy_from_slice(&base.to_le_bytes());
        state.remove(SLIDING_HEAD..SLIDING_HEAD + dead * ADMISSION);
    }
}

/// Admits a call of weight `n` if fewer than `calls` were admitted in `(now - period, now]`.
pub(crate) fn sliding_admit(
    store: &dyn CounterStore,
    key: &CounterName<'_>,
    calls: u64,
    period: Millis,
    now: Millis,
    n: u32,
) -> Result<Verdict, StoreError> {
    update(store, key, |state| admit_in(state, calls, period, now, n))
}

/// [`sliding_admit`]'s change of a sliding-window state: whether to write it, and the verdict.
pub(crate) fn admit_in(
    state: &mut State<'_>,
    calls: u64,
    period: Millis,
    now: Millis,
    n: u32,
) -> (bool, Verdict) {
    let (write, verdict, _) = admit_weighed(state, calls, period, now, |_| n);
    (write, verdict)
}

/// [`admit_in`] with the weight chosen from the calls the window has room for (a lease takes
/// as many as it may): whether to write, the verdict (what remains after the weight), and the
/// weight counted.
pub(crate) fn admit_weighed(
    state: &mut State<'_>,
    calls: u64,
    period: Millis,
    now: Millis,
    weight: impl FnOnce(u64) -> u32,
) -> (bool, Verdict, u32) {
    let rewritten = forget_other_layout(state);
    match sliding_verdict(Admissions::of(state.bytes()), calls, period, now) {
        Verdict::Admitted { remaining } => {
            let n = weight(remaining);
            count_admission(state, period, now, n);
            let remaining = remaining.saturating_sub(u64::from(n));
            (true, Verdict::Admitted { remaining }, n)
        }
        denied => (rewritten, denied, 0),
    }
}

/// Whether a call would be admitted, without counting it (counted later, at completion).
pub(crate) fn sliding_check(
    store: &dyn CounterStore,
    key: &CounterName<'_>,
    calls: u64,
    period: Millis,
    now: Millis,
) -> Result<Verdict, StoreError> {
    let current = store.get(key)?;
    let bytes = current.as_ref().map_or(&[][..], |(b, _)| b.as_slice());
    Ok(sliding_verdict(Admissions::of(bytes), calls, period, now))
}

/// Counts `n` calls at `now` unconditionally (an `increment-condition` that held).
pub(crate) fn sliding_add(
    store: &dyn CounterStore,
    key: &CounterName<'_>,
    period: Millis,
    now: Millis,
    n: u32,
) -> Result<(), StoreError> {
    update(store, key, |state| {
        count_admission(state, period, now, n);
        (true, ())
    })
}

/// Takes back `n` admissions made at `at` (a later limit denied the call). The admissions left
/// are the same or older: the expiry stands.
pub(crate) fn sliding_release(
    store: &dyn CounterStore,
    key: &CounterName<'_>,
    at: Millis,
    n: u32,
) -> Result<(), StoreError> {
    update(store, key, |state| (release_in(state, at, n), ()))
}

/// [`sliding_release`]'s change of a sliding-window state: whether to write it.
pub(crate) fn release_in(state: &mut State<'_>, at: Millis, n: u32) -> bool {
    let a = Admissions::of(state.bytes());
    let i = match a.first_after(at).checked_sub(1) {
        Some(i) if a.at(i) == at && a.count(i) >= n => i,
        _ => return false,
    };
    let emptied = a.count(i) == n;
    add_running(state, i, n.wrapping_neg());
    if emptied {
        let from = SLIDING_HEAD + i * ADMISSION;
        state.remove(from..from + ADMISSION);
    }
    true
}
