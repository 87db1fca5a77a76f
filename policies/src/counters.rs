//! Counters: the state behind rate limits and quotas, and the only state shared between calls.
//!
//! The engine keeps every counting rule here and asks of the host only a [`CounterStore`]:
//! versioned bytes under a key with compare-and-swap, which proxy-wasm shared data provides
//! directly. Every change is a read, a decision and a conditional write, retried a bounded
//! number of times, so concurrent workers never over-admit.
//!
//! Two kinds of state:
//! - a **sliding window** (`rate-limit`, `rate-limit-by-key`): the admissions inside the last
//!   period, at most `calls` of them, so memory per counter is bounded by the limit;
//! - a **fixed window** (`quota`, `quota-by-key`): the window's start, calls and bytes.

use crate::clock::{ceil_seconds, window_start, Millis, NEVER_SECONDS};
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;
use std::sync::Mutex;

/// How many times a counter update is retried when other workers keep writing first.
pub const MAX_ATTEMPTS: u32 = 64;

/// What a counter update's `change` decided: write the bytes it put in `next`, or nothing.
pub type Change<'c> = dyn FnMut(Option<&[u8]>, &mut Vec<u8>) -> bool + 'c;

/// Versioned bytes with compare-and-swap: what the engine needs of shared state.
pub trait CounterStore {
    /// The counter's bytes and version, or `None` when it was never written.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes `value` if the counter is still at `version` (`None`: still never written).
    /// `Ok(false)` when another writer came first.
    fn compare_and_set(
        &self,
        key: &str,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError>;

    /// Reads the counter and calls `change` with its bytes (`None`: never written) and an empty
    /// buffer. When `change` returns true, the buffer becomes the counter's bytes, provided
    /// nothing else wrote the counter in between; otherwise `change` runs again on what is there
    /// now. The default is a compare-and-swap loop over [`get`](Self::get) and
    /// [`compare_and_set`](Self::compare_and_set), retried at most [`MAX_ATTEMPTS`] times; a
    /// store that can update in place under its own lock may do so.
    fn update(&self, key: &str, change: &mut Change<'_>) -> Result<(), StoreError> {
        let mut next = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            let current = self.get(key)?;
            let (bytes, version) = match &current {
                Some((b, v)) => (Some(b.as_slice()), Some(*v)),
                None => (None, None),
            };
            next.clear();
            if !change(bytes, &mut next) || self.compare_and_set(key, &next, version)? {
                return Ok(());
            }
        }
        Err(StoreError::Contended(key.to_string()))
    }
}

/// A counter could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
    #[error("counter '{0}' stayed contended after {MAX_ATTEMPTS} attempts")]
    Contended(String),
}

/// One counter of a [`MemoryStore`]: its name and its state in one allocation, so that finding
/// it and reading it touch one place.
struct Counter {
    /// The name's bytes, then the state's.
    bytes: Vec<u8>,
    name_len: usize,
    version: u32,
}

impl Counter {
    fn name(&self) -> &[u8] {
        &self.bytes[..self.name_len]
    }

    fn state(&self) -> &[u8] {
        &self.bytes[self.name_len..]
    }

    fn set_state(&mut self, state: &[u8], version: u32) {
        self.bytes.truncate(self.name_len);
        self.bytes.extend_from_slice(state);
        self.version = version;
    }
}

/// Counters in memory, safe to share between threads: the native engine's store. An update
/// runs under its lock, in place.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Counters>,
}

#[derive(Default)]
struct Counters {
    table: HashTable<Counter>,
    hasher: DefaultHashBuilder,
    /// The last version handed out.
    version: u32,
    /// The buffer an update writes the new state into, kept so that a steady update
    /// allocates nothing.
    spare: Vec<u8>,
}

impl Counters {
    fn hash(&self, name: &str) -> u64 {
        self.hasher.hash_one(name.as_bytes())
    }

    fn find(&self, name: &str) -> Option<&Counter> {
        self.table
            .find(self.hash(name), |c| c.name() == name.as_bytes())
    }

    fn insert(&mut self, name: &str, state: &[u8]) {
        let mut bytes = Vec::with_capacity(name.len() + state.len());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(state);
        let version = next_version(&mut self.version);
        let counter = Counter {
            bytes,
            name_len: name.len(),
            version,
        };
        let hasher = &self.hasher;
        self.table
            .insert_unique(hasher.hash_one(name.as_bytes()), counter, |c| {
                hasher.hash_one(c.name())
            });
    }
}

/// Hands out the next version (never 0, which means "never written" on the wire).
fn next_version(last: &mut u32) -> u32 {
    *last = last.wrapping_add(1).max(1);
    *last
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many counters exist.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.table.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn counters(&self) -> Result<std::sync::MutexGuard<'_, Counters>, StoreError> {
        self.inner
            .lock()
            .map_err(|_| StoreError::Unavailable("poisoned".into()))
    }
}

impl CounterStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let g = self.counters()?;
        Ok(g.find(key).map(|c| (c.state().to_vec(), c.version)))
    }

    fn compare_and_set(
        &self,
        key: &str,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        let mut guard = self.counters()?;
        let g = &mut *guard;
        let hash = g.hash(key);
        match g.table.find_mut(hash, |c| c.name() == key.as_bytes()) {
            Some(c) if Some(c.version) == version => {
                c.set_state(value, next_version(&mut g.version));
                Ok(true)
            }
            None if version.is_none() => {
                g.insert(key, value);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn update(&self, key: &str, change: &mut Change<'_>) -> Result<(), StoreError> {
        let mut guard = self.counters()?;
        let g = &mut *guard;
        g.spare.clear();
        let hash = g.hash(key);
        match g.table.find_mut(hash, |c| c.name() == key.as_bytes()) {
            Some(c) => {
                if change(Some(c.state()), &mut g.spare) {
                    c.set_state(&g.spare, next_version(&mut g.version));
                }
            }
            None => {
                if change(None, &mut g.spare) {
                    let state = std::mem::take(&mut g.spare);
                    g.insert(key, &state);
                    g.spare = state;
                }
            }
        }
        Ok(())
    }
}

/// Reads, changes and conditionally writes a counter until the write wins (the store's
/// [`CounterStore::update`]). `change` writes the new bytes into its buffer and returns whether
/// to write them, and the result.
fn update<T>(
    store: &dyn CounterStore,
    key: &str,
    mut change: impl FnMut(Option<&[u8]>, &mut Vec<u8>) -> (bool, T),
) -> Result<T, StoreError> {
    let mut out = None;
    store.update(key, &mut |bytes, next| {
        let (write, result) = change(bytes, next);
        out = Some(result);
        write
    })?;
    out.ok_or_else(|| StoreError::Unavailable(format!("counter '{key}' was never read")))
}

/// What a limit says of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Admitted; this many calls remain in the window.
    Admitted { remaining: u64 },
    /// Denied; the wait until a call would be admitted.
    RateLimited { wait: Millis },
    /// Quota exhausted (by calls or by bandwidth); whole seconds until it renews.
    QuotaExceeded { bandwidth: bool, seconds: u64 },
}

// ---- sliding window ----

/// Every counter state starts with the instant after which it is as good as absent, so that a
/// store that must bound its memory can drop expired states without knowing their kind.
const EXPIRY: usize = 8;

/// When a counter state expires (it then counts as never written).
pub fn counter_expiry(bytes: &[u8]) -> Option<Millis> {
    let head: [u8; EXPIRY] = bytes.get(..EXPIRY)?.try_into().ok()?;
    Some(i64::from_le_bytes(head))
}

/// The bytes of one admission in a sliding-window state: its time, then its count.
const ADMISSION: usize = 12;

/// The admissions a sliding-window state holds, `(time, count)`, oldest first, read straight
/// from its bytes (12 bytes each after the expiry): nothing is decoded into a list.
fn admissions(bytes: Option<&[u8]>) -> impl Iterator<Item = (Millis, u32)> + '_ {
    bytes
        .and_then(|b| b.get(EXPIRY..))
        .unwrap_or(&[])
        .chunks_exact(ADMISSION)
        .map(admission)
}

/// One admission's time and count, from its [`ADMISSION`] bytes.
fn admission(entry: &[u8]) -> (Millis, u32) {
    let mut t = [0u8; 8];
    t.copy_from_slice(&entry[..8]);
    let mut n = [0u8; 4];
    n.copy_from_slice(&entry[8..ADMISSION]);
    (i64::from_le_bytes(t), u32::from_le_bytes(n))
}

#[cfg(test)]
fn decode_sliding(bytes: Option<&[u8]>) -> Vec<(Millis, u32)> {
    admissions(bytes).collect()
}

/// What the admissions inside `(now - period, now]` add up to (later ones, from a worker whose
/// clock runs ahead, count too: never over-admit).
struct Tally {
    used: u64,
    /// The latest admission kept.
    latest: Option<Millis>,
    /// The admissions kept are exactly the entries from this one on (the state is in time
    /// order, as every state this build writes is), so they can be copied in one piece.
    live_suffix: Option<usize>,
}

/// How far workers' clocks may disagree without a worker behind counting less than it should:
/// a write keeps admissions this much longer than its own window needs, for a worker whose
/// clock has not reached them yet.
pub(crate) const CLOCK_SKEW: Millis = 1_000;

/// Admissions after this instant are kept when a state is written at `now`.
fn kept_after(period: Millis, now: Millis) -> Millis {
    now.saturating_sub(period).saturating_sub(CLOCK_SKEW)
}

fn tally(bytes: Option<&[u8]>, period: Millis, now: Millis) -> Tally {
    let floor = now.saturating_sub(period);
    let keep = kept_after(period, now);
    // One pass without branches on the data: this runs on every call, over every admission
    // in the window.
    let (mut used, mut dropped, mut previous, mut in_order) = (0u64, 0usize, Millis::MIN, true);
    let body = bytes.and_then(|b| b.get(EXPIRY..)).unwrap_or(&[]);
    for entry in body.chunks_exact(ADMISSION) {
        let (at, n) = admission(entry);
        used += if at > floor { u64::from(n) } else { 0 };
        dropped += usize::from(at <= keep);
        in_order &= at >= previous;
        previous = at;
    }
    // In time order the latest is the last, and the entries dropped are the first ones.
    let latest = if in_order {
        previous
    } else {
        admissions(bytes)
            .map(|(at, _)| at)
            .max()
            .unwrap_or(Millis::MIN)
    };
    Tally {
        used,
        latest: (latest > keep).then_some(latest),
        live_suffix: in_order.then_some(dropped),
    }
}

/// Admitted while fewer than `calls` were; else the wait until the oldest admission in the
/// window leaves it.
fn sliding_verdict(
    bytes: Option<&[u8]>,
    t: &Tally,
    calls: u64,
    period: Millis,
    now: Millis,
) -> Verdict {
    if t.used < calls {
        return Verdict::Admitted {
            remaining: calls - t.used,
        };
    }
    let floor = now.saturating_sub(period);
    let oldest = admissions(bytes)
        .map(|(at, _)| at)
        .filter(|&at| at > floor)
        .min();
    Verdict::RateLimited {
        wait: (oldest.unwrap_or(now) + period - now).max(1),
    }
}

/// The state after counting `n` admissions at `now`: the admissions kept (the window, and
/// [`CLOCK_SKEW`] before it), with `n` merged into an entry of the same instant, and the expiry
/// of the latest, written into `out`. They are copied in one piece when they are a suffix of
/// the state (see [`Tally`]), else a run at a time.
fn with_admission(
    bytes: Option<&[u8]>,
    t: &Tally,
    period: Millis,
    now: Millis,
    n: u32,
    out: &mut Vec<u8>,
) {
    let floor = kept_after(period, now);
    let body = bytes.and_then(|b| b.get(EXPIRY..)).unwrap_or(&[]);
    let body = &body[..body.len() - body.len() % ADMISSION];
    out.reserve(EXPIRY + body.len() + ADMISSION);
    out.extend_from_slice(&[0; EXPIRY]);
    let latest = t.latest.map_or(now, |l| l.max(now));
    match t.live_suffix {
        Some(first) => {
            out.extend_from_slice(body.get(first.saturating_mul(ADMISSION)..).unwrap_or(&[]))
        }
        None => {
            let mut run: Option<usize> = None;
            for (i, (at, _)) in admissions(bytes).enumerate() {
                let offset = i * ADMISSION;
                if at > floor {
                    run.get_or_insert(offset);
                } else if let Some(start) = run.take() {
                    out.extend_from_slice(&body[start..offset]);
                }
            }
            if let Some(start) = run {
                out.extend_from_slice(&body[start..]);
            }
        }
    }
    let expiry = latest.saturating_add(period).saturating_add(CLOCK_SKEW);
    out[..EXPIRY].copy_from_slice(&expiry.to_le_bytes());
    // Merge into the entry of this instant, else insert after the last entry before it: the
    // state stays in time order (the usual place is the end), so the next tally can copy it in
    // one piece.
    let after = out[EXPIRY..]
        .chunks_exact(ADMISSION)
        .rposition(|c| admission(c).0 <= now)
        .map_or(0, |i| i + 1);
    let at = EXPIRY + after * ADMISSION;
    if after > 0 && out[at - ADMISSION..at - 4] == now.to_le_bytes() {
        let entry = &mut out[at - 4..at];
        let mut count = [0u8; 4];
        count.copy_from_slice(entry);
        let count = u32::from_le_bytes(count).saturating_add(n);
        entry.copy_from_slice(&count.to_le_bytes());
    } else {
        let mut entry = [0u8; ADMISSION];
        entry[..8].copy_from_slice(&now.to_le_bytes());
        entry[8..].copy_from_slice(&n.to_le_bytes());
        out.splice(at..at, entry);
    }
}

/// Admits a call of weight `n` if fewer than `calls` were admitted in `(now - period, now]`.
pub(crate) fn sliding_admit(
    store: &dyn CounterStore,
    key: &str,
    calls: u64,
    period: Millis,
    now: Millis,
    n: u32,
) -> Result<Verdict, StoreError> {
    update(store, key, |bytes, out| {
        let t = tally(bytes, period, now);
        match sliding_verdict(bytes, &t, calls, period, now) {
            Verdict::Admitted { .. } => {
                with_admission(bytes, &t, period, now, n, out);
                let used = t.used + u64::from(n);
                (
                    true,
                    Verdict::Admitted {
                        remaining: calls.saturating_sub(used),
                    },
                )
            }
            denied => (false, denied),
        }
    })
}

/// Whether a call would be admitted, without counting it (counted later, at completion).
pub(crate) fn sliding_check(
    store: &dyn CounterStore,
    key: &str,
    calls: u64,
    period: Millis,
    now: Millis,
) -> Result<Verdict, StoreError> {
    let current = store.get(key)?;
    let bytes = current.as_ref().map(|(b, _)| b.as_slice());
    Ok(sliding_verdict(
        bytes,
        &tally(bytes, period, now),
        calls,
        period,
        now,
    ))
}

/// Counts `n` calls at `now` unconditionally (an `increment-condition` that held).
pub(crate) fn sliding_add(
    store: &dyn CounterStore,
    key: &str,
    period: Millis,
    now: Millis,
    n: u32,
) -> Result<(), StoreError> {
    update(store, key, |bytes, out| {
        let t = tally(bytes, period, now);
        with_admission(bytes, &t, period, now, n, out);
        (true, ())
    })
}

/// Takes back an admission made at `at` (a later limit denied the call).
pub(crate) fn sliding_release(
    store: &dyn CounterStore,
    key: &str,
    at: Millis,
    n: u32,
) -> Result<(), StoreError> {
    update(store, key, |bytes, out| {
        let Some(b) = bytes.filter(|b| b.len() >= EXPIRY) else {
            return (false, ());
        };
        if !admissions(bytes).any(|(t, count)| t == at && count >= n) {
            return (false, ());
        }
        // The admissions left are the same or older: the expiry stands.
        out.extend_from_slice(&b[..EXPIRY]);
        let mut released = false;
        for (t, mut count) in admissions(bytes) {
            if t == at && count >= n && !released {
                count -= n;
                released = true;
                if count == 0 {
                    continue;
                }
            }
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        (true, ())
    })
}

// ---- fixed window ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Window {
    start: Millis,
    calls: u64,
    bytes: u64,
}

fn decode_window(bytes: Option<&[u8]>) -> Option<Window> {
    let b = bytes?.get(EXPIRY..)?;
    if b.len() != 24 {
        return None;
    }
    let num = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i..i + 8]);
        x
    };
    Some(Window {
        start: i64::from_le_bytes(num(0)),
        calls: u64::from_le_bytes(num(8)),
        bytes: u64::from_le_bytes(num(16)),
    })
}

fn encode_window(w: &Window, period: Millis, out: &mut Vec<u8>) {
    let expiry = if period <= 0 {
        Millis::MAX
    } else {
        w.start.saturating_add(period).saturating_add(CLOCK_SKEW)
    };
    out.extend_from_slice(&expiry.to_le_bytes());
    out.extend_from_slice(&w.start.to_le_bytes());
    out.extend_from_slice(&w.calls.to_le_bytes());
    out.extend_from_slice(&w.bytes.to_le_bytes());
}

/// Fixed windows of `period` from `origin`, allowing `calls` and/or `bandwidth_kb`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FixedWindows {
    pub origin: Millis,
    pub period: Millis,
    pub calls: Option<u64>,
    pub bandwidth_kb: Option<u64>,
}

impl FixedWindows {
    fn current(&self, bytes: Option<&[u8]>, now: Millis) -> Window {
        let start = window_start(self.origin, self.period, now);
        match decode_window(bytes) {
            // A worker whose clock is behind counts in the window a worker ahead has begun,
            // rather than starting its own over it.
            Some(w) if w.start >= start => w,
            _ => Window {
                start,
                ..Window::default()
            },
        }
    }

    fn seconds_left(&self, w: &Window, now: Millis) -> u64 {
        if self.period <= 0 {
            NEVER_SECONDS
        } else {
            ceil_seconds(w.start + self.period - now).max(1)
        }
    }

    fn verdict(&self, w: &Window, now: Millis) -> Verdict {
        if let Some(calls) = self.calls {
            if w.calls >= calls {
                return Verdict::QuotaExceeded {
                    bandwidth: false,
                    seconds: self.seconds_left(w, now),
                };
            }
        }
        if let Some(kb) = self.bandwidth_kb {
            if w.bytes >= kb.saturating_mul(1024) {
                return Verdict::QuotaExceeded {
                    bandwidth: true,
                    seconds: self.seconds_left(w, now),
                };
            }
        }
        Verdict::Admitted {
            remaining: self
                .calls
                .map(|c| c.saturating_sub(w.calls))
                .unwrap_or(u64::MAX),
        }
    }

    /// Admits and counts a call of weight `n`; returns the verdict and the window it counted in.
    pub fn admit(
        &self,
        store: &dyn CounterStore,
        key: &str,
        now: Millis,
        n: u64,
    ) -> Result<(Verdict, Millis), StoreError> {
        update(store, key, |bytes, out| {
            let mut w = self.current(bytes, now);
            match self.verdict(&w, now) {
                Verdict::Admitted { .. } => {
                    w.calls += n;
                    let remaining = self
                        .calls
                        .map(|c| c.saturating_sub(w.calls))
                        .unwrap_or(u64::MAX);
                    encode_window(&w, self.period, out);
                    (true, (Verdict::Admitted { remaining }, w.start))
                }
                denied => (false, (denied, w.start)),
            }
        })
    }

    /// Whether a call would be admitted, without counting it.
    pub fn check(
        &self,
        store: &dyn CounterStore,
        key: &str,
        now: Millis,
    ) -> Result<Verdict, StoreError> {
        let current = store.get(key)?;
        let w = self.current(current.as_ref().map(|(b, _)| b.as_slice()), now);
        Ok(self.verdict(&w, now))
    }

    /// Adds calls and bytes at `now` unconditionally (completion).
    pub fn add(
        &self,
        store: &dyn CounterStore,
        key: &str,
        now: Millis,
        calls: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        if calls == 0 && bytes == 0 {
            return Ok(());
        }
        update(store, key, |current, out| {
            let mut w = self.current(current, now);
            w.calls = w.calls.saturating_add(calls);
            w.bytes = w.bytes.saturating_add(bytes);
            encode_window(&w, self.period, out);
            (true, ())
        })
    }

    /// Takes back `n` calls counted in the window starting at `start`.
    pub fn release(
        &self,
        store: &dyn CounterStore,
        key: &str,
        start: Millis,
        n: u64,
    ) -> Result<(), StoreError> {
        update(store, key, |bytes, out| match decode_window(bytes) {
            Some(mut w) if w.start == start && w.calls >= n => {
                w.calls -= n;
                encode_window(&w, self.period, out);
                (true, ())
            }
            _ => (false, ()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let admit = |now| sliding_admit(&s, "k", 2, 10_000, now, 1).unwrap();
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
            sliding_admit(&s, "k", 10, 1000, 7, 1).unwrap();
        }
        assert_eq!(s.get("k").unwrap().unwrap().0.len(), EXPIRY + 12);
        sliding_release(&s, "k", 7, 1).unwrap();
        assert_eq!(
            decode_sliding(Some(&s.get("k").unwrap().unwrap().0)),
            vec![(7, 2)]
        );
    }

    #[test]
    fn states_carry_their_expiry() {
        let s = MemoryStore::new();
        sliding_admit(&s, "r", 5, 1_000, 10, 1).unwrap();
        sliding_admit(&s, "r", 5, 1_000, 20, 1).unwrap();
        assert_eq!(
            counter_expiry(&s.get("r").unwrap().unwrap().0),
            Some(1_020 + CLOCK_SKEW)
        );
        let q = per_minute(1, None);
        q.admit(&s, "q", 61_000, 1).unwrap();
        assert_eq!(
            counter_expiry(&s.get("q").unwrap().unwrap().0),
            Some(120_000 + CLOCK_SKEW)
        );
        let forever = FixedWindows { period: 0, ..q };
        forever.admit(&s, "f", 5, 1).unwrap();
        assert_eq!(
            counter_expiry(&s.get("f").unwrap().unwrap().0),
            Some(Millis::MAX)
        );
    }

    #[test]
    fn admissions_out_of_time_order() {
        // Another worker's clock runs behind: its admission goes before a later one, so the
        // state stays in time order.
        let s = MemoryStore::new();
        let admit = |now| sliding_admit(&s, "k", 10, 1_000, now, 1).unwrap();
        admit(1_000);
        admit(10);
        admit(1_000);
        let state = |s: &MemoryStore| s.get("k").unwrap().unwrap().0;
        assert_eq!(decode_sliding(Some(&state(&s))), vec![(10, 1), (1_000, 2)]);
        assert_eq!(counter_expiry(&state(&s)), Some(2_000 + CLOCK_SKEW));
        // At 1,500 the admission at 10 has left the window (it no longer counts), but it is
        // kept for a worker whose clock is up to CLOCK_SKEW behind.
        assert_eq!(admit(1_500), Verdict::Admitted { remaining: 7 });
        assert_eq!(
            decode_sliding(Some(&state(&s))),
            vec![(10, 1), (1_000, 2), (1_500, 1)]
        );
        // At 2,100 it is dropped; the admissions at 1,000 are kept but count no more.
        assert_eq!(admit(2_100), Verdict::Admitted { remaining: 8 });
        assert_eq!(
            decode_sliding(Some(&state(&s))),
            vec![(1_000, 2), (1_500, 1), (2_100, 1)]
        );
        assert_eq!(counter_expiry(&state(&s)), Some(3_100 + CLOCK_SKEW));
    }

    #[test]
    fn a_state_out_of_time_order_still_counts_exactly() {
        // A state written out of order (by an earlier version of the filter, say): entries
        // inside the window come before and after one that has left it.
        let s = MemoryStore::new();
        let mut bytes = 9_000i64.to_le_bytes().to_vec();
        for (at, n) in [(1_500i64, 2u32), (100, 1), (1_200, 1), (50, 4)] {
            bytes.extend_from_slice(&at.to_le_bytes());
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        assert!(s.compare_and_set("k", &bytes, None).unwrap());
        // At 2,150 with a 1 s window: 1,500 and 1,200 count (3 of 5); 100 and 50 are past the
        // window and the skew, and are dropped.
        assert_eq!(
            sliding_admit(&s, "k", 5, 1_000, 2_150, 1).unwrap(),
            Verdict::Admitted { remaining: 1 }
        );
        let state = s.get("k").unwrap().unwrap().0;
        assert_eq!(
            decode_sliding(Some(&state)),
            vec![(1_500, 2), (1_200, 1), (2_150, 1)]
        );
        assert_eq!(
            sliding_admit(&s, "k", 5, 1_000, 2_150, 1).unwrap(),
            Verdict::Admitted { remaining: 0 }
        );
        assert_eq!(
            sliding_admit(&s, "k", 5, 1_000, 2_150, 1).unwrap(),
            Verdict::RateLimited { wait: 50 }
        );
    }

    #[test]
    fn a_worker_behind_counts_in_the_window_a_worker_ahead_began() {
        let s = MemoryStore::new();
        let q = per_minute(2, None);
        // Ahead: the first call of the window starting at 60,000.
        assert!(matches!(
            q.admit(&s, "q", 60_000, 1).unwrap().0,
            Verdict::Admitted { remaining: 1 }
        ));
        // Behind by 5 ms: its clock is still in the window before, yet it must not start that
        // window over the newer one.
        assert_eq!(
            q.admit(&s, "q", 59_995, 1).unwrap(),
            (Verdict::Admitted { remaining: 0 }, 60_000)
        );
        assert!(matches!(
            q.admit(&s, "q", 60_001, 1).unwrap().0,
            Verdict::QuotaExceeded { .. }
        ));
    }

    #[test]
    fn release_restores_a_slot() {
        let s = MemoryStore::new();
        sliding_admit(&s, "k", 1, 1000, 5, 1).unwrap();
        sliding_release(&s, "k", 5, 1).unwrap();
        assert_eq!(
            sliding_admit(&s, "k", 1, 1000, 6, 1).unwrap(),
            Verdict::Admitted { remaining: 0 }
        );
    }

    /// A store with only `get` and `compare_and_set`: the trait's own `update`, as the filter's
    /// shared data had before it read each slot once.
    struct CasOnly(MemoryStore);

    impl CounterStore for CasOnly {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            self.0.get(key)
        }
        fn compare_and_set(
            &self,
            key: &str,
            value: &[u8],
            version: Option<u32>,
        ) -> Result<bool, StoreError> {
            self.0.compare_and_set(key, value, version)
        }
    }

    /// Every write loses to another writer.
    struct AlwaysBeaten;

    impl CounterStore for AlwaysBeaten {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(None)
        }
        fn compare_and_set(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<bool, StoreError> {
            Ok(false)
        }
    }

    #[test]
    fn an_update_that_always_loses_is_an_error_after_the_last_attempt() {
        let mut attempts = 0;
        let e = AlwaysBeaten
            .update("rl|s|x", &mut |_, next| {
                attempts += 1;
                next.push(1);
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
            move |_: Option<&[u8]>, next: &mut Vec<u8>| {
                next.extend_from_slice(bytes);
                true
            }
        };
        s.update("a", &mut write(b"one")).unwrap();
        let (_, v1) = s.get("a").unwrap().unwrap();
        s.update("a", &mut write(b"two!")).unwrap();
        let (bytes, v2) = s.get("a").unwrap().unwrap();
        assert_eq!((bytes.as_slice(), v2 > v1), (&b"two!"[..], true));
        // The change sees the current bytes; declining writes nothing and keeps the version.
        let mut seen = None;
        s.update("a", &mut |b, _| {
            seen = b.map(<[u8]>::to_vec);
            false
        })
        .unwrap();
        assert_eq!(seen.as_deref(), Some(&b"two!"[..]));
        assert_eq!(s.get("a").unwrap().unwrap().1, v2);
        s.update("b", &mut |_, _| false).unwrap();
        assert_eq!(s.get("b").unwrap(), None);
    }

    #[test]
    fn memory_store_cas() {
        let s = MemoryStore::new();
        assert!(s.compare_and_set("a", b"1", None).unwrap());
        assert!(!s.compare_and_set("a", b"2", None).unwrap());
        let (_, v) = s.get("a").unwrap().unwrap();
        assert!(!s.compare_and_set("a", b"2", Some(v + 1)).unwrap());
        assert!(s.compare_and_set("a", b"2", Some(v)).unwrap());
        assert_eq!(s.get("a").unwrap().unwrap().0, b"2");
    }

    #[test]
    fn fixed_window_calls_and_bandwidth() {
        let s = MemoryStore::new();
        let q = per_minute(2, Some(1));
        assert!(matches!(
            q.admit(&s, "q", 1_000, 1).unwrap().0,
            Verdict::Admitted { remaining: 1 }
        ));
        q.add(&s, "q", 1_500, 0, 1024).unwrap();
        assert_eq!(
            q.admit(&s, "q", 2_000, 1).unwrap().0,
            Verdict::QuotaExceeded {
                bandwidth: true,
                seconds: 58
            }
        );
        // The next window renews both.
        assert!(matches!(
            q.admit(&s, "q", 60_000, 1).unwrap().0,
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

    proptest! {
        #[test]
        fn sliding_matches_the_reference(
            mut gaps in proptest::collection::vec(0i64..3_000, 1..200),
            calls in 1u64..8,
            period in 1_000i64..10_000,
        ) {
            let mut t = 1_700_000_000_000;
            for g in gaps.iter_mut() { t += *g; *g = t; }
            let s = MemoryStore::new();
            let got: Vec<bool> = gaps.iter().map(|&t| matches!(sliding_admit(&s, "k", calls, period, t, 1).unwrap(), Verdict::Admitted { .. })).collect();
            prop_assert_eq!(&got, &naive_sliding(&gaps, calls, period));
            // The compare-and-swap loop counts the same as the in-place update.
            let cas = CasOnly(MemoryStore::new());
            let by_cas: Vec<bool> = gaps.iter().map(|&t| matches!(sliding_admit(&cas, "k", calls, period, t, 1).unwrap(), Verdict::Admitted { .. })).collect();
            prop_assert_eq!(by_cas, got);
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
            let got: Vec<bool> = times.iter().map(|&t| matches!(sliding_admit(&s, "k", calls, period, t, 1).unwrap(), Verdict::Admitted { .. })).collect();
            // Whatever order the admissions came in, the state is kept in time order.
            let kept = decode_sliding(s.get("k").unwrap().map(|(b, _)| b).as_deref());
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
            let got: Vec<bool> = gaps.iter().map(|&t| matches!(q.admit(&s, "k", t, 1).unwrap().0, Verdict::Admitted { .. })).collect();
            prop_assert_eq!(&got, &naive_fixed(&gaps, calls, origin, period));
            let cas = CasOnly(MemoryStore::new());
            let by_cas: Vec<bool> = gaps.iter().map(|&t| matches!(q.admit(&cas, "k", t, 1).unwrap().0, Verdict::Admitted { .. })).collect();
            prop_assert_eq!(by_cas, got);
        }
    }
}
