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

use crate::clock::{ceil_seconds, window_start, Millis, NEVER_SECONDS};
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;
use std::sync::Mutex;

pub(crate) mod own;

/// How many times a counter update is retried when other workers keep writing first.
pub const MAX_ATTEMPTS: u32 = 64;

/// A counter update's change: it edits the counter's state in place and says whether to write
/// it. When it returns false it must leave the state as it found it (a store may hand it the
/// counter's own bytes).
pub type Change<'c> = dyn FnMut(&mut State<'_>) -> bool + 'c;

/// A counter's state as an update sees it, to be changed in place: the counter's bytes, empty
/// when it was never written.
pub struct State<'a> {
    /// The state is `buf[start..]` (a store may keep other bytes, the counter's name, first).
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl<'a> State<'a> {
    /// All of `buf` as a counter's state.
    pub fn new(buf: &'a mut Vec<u8>) -> Self {
        State { buf, start: 0 }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }

    /// Puts `bytes` at offset `at` of the state (the usual place, the end, is an append).
    /// Of a length known when it is built, so that the copy is of that length, not a call.
    #[inline]
    pub fn insert<const N: usize>(&mut self, at: usize, bytes: &[u8; N]) {
        let (at, len) = (self.start + at, self.buf.len());
        if at == len {
            self.buf.extend_from_slice(bytes);
            return;
        }
        // The bytes after `at` move up to make room.
        self.buf.resize(len + bytes.len(), 0);
        self.buf.copy_within(at..len, at + bytes.len());
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Takes the state's bytes in `range` out.
    pub fn remove(&mut self, range: Range<usize>) {
        self.buf
            .drain(self.start + range.start..self.start + range.end);
    }

    /// The part of the state from `at` on, as a state of its own.
    fn tail(&mut self, at: usize) -> State<'_> {
        State {
            buf: self.buf,
            start: self.start + at,
        }
    }

    /// Replaces the whole state.
    pub fn set(&mut self, bytes: &[u8]) {
        self.buf.truncate(self.start);
        self.buf.extend_from_slice(bytes);
    }
}

/// A counter's name, `kind|owner|name` (`sl|sub-1|product:starter`), in the three parts a limit
/// knows it by. A store is handed the parts, so that no call joins them: the memory store
/// hashes and compares them where they lie, and the filter's slots hash them as one text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterName<'a> {
    parts: [&'a str; 3],
}

impl<'a> CounterName<'a> {
    pub const fn new(kind: &'a str, owner: &'a str, name: &'a str) -> Self {
        CounterName {
            parts: [kind, owner, name],
        }
    }

    /// The name's bytes in order, the separators included: what a store that keeps it as one
    /// text writes or hashes.
    pub fn pieces(&self) -> [&'a [u8]; 5] {
        let [kind, owner, name] = self.parts;
        [
            kind.as_bytes(),
            b"|",
            owner.as_bytes(),
            b"|",
            name.as_bytes(),
        ]
    }

    /// Where the name's parts end in its text: the lengths of the kind and the owner.
    fn split(&self) -> [usize; 2] {
        [self.parts[0].len(), self.parts[1].len()]
    }

    /// The length of the name as one text.
    pub fn text_len(&self) -> usize {
        let [kind, owner, name] = self.parts;
        kind.len() + owner.len() + name.len() + 2
    }

    /// Whether `text` is this name as one text, compared part by part where it lies.
    pub fn is(&self, text: &[u8]) -> bool {
        let [kind, owner, name] = self.parts.map(str::as_bytes);
        let (k, o) = (kind.len(), owner.len());
        text.len() == self.text_len()
            && &text[..k] == kind
            && text[k] == b'|'
            && &text[k + 1..k + 1 + o] == owner
            && text[k + 1 + o] == b'|'
            && &text[k + 2 + o..] == name
    }

    /// The name as one text, appended to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        for piece in self.pieces() {
            out.extend_from_slice(piece);
        }
    }
}

impl std::fmt::Display for CounterName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [kind, owner, name] = self.parts;
        write!(f, "{kind}|{owner}|{name}")
    }
}

/// A counter's name kept past the call that named it (for work left to the completion): the
/// name as one text, and where its parts end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeptName {
    text: String,
    kind: usize,
    owner: usize,
}

impl KeptName {
    pub(crate) fn of(name: &CounterName<'_>) -> Self {
        let [kind, owner, _] = name.parts;
        KeptName {
            text: name.to_string(),
            kind: kind.len(),
            owner: owner.len(),
        }
    }

    pub(crate) fn name(&self) -> CounterName<'_> {
        let (kind, rest) = self.text.split_at(self.kind);
        let (owner, name) = rest[1..].split_at(self.owner);
        CounterName::new(kind, owner, &name[1..])
    }
}

/// Versioned bytes with compare-and-swap: what the engine needs of shared state.
pub trait CounterStore {
    /// The counter's bytes and version, or `None` when it was never written.
    fn get(&self, key: &CounterName<'_>) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes `value` if the counter is still at `version` (`None`: still never written).
    /// `Ok(false)` when another writer came first.
    fn compare_and_set(
        &self,
        key: &CounterName<'_>,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError>;

    /// Reads the counter and calls `change` on its state (empty: never written). When
    /// `change` returns true, what it left becomes the counter's bytes, provided nothing else
    /// wrote the counter in between; otherwise `change` runs again on what is there now. The
    /// default is a compare-and-swap loop over [`get`](Self::get) and
    /// [`compare_and_set`](Self::compare_and_set), retried at most [`MAX_ATTEMPTS`] times; a
    /// store that can update in place under its own lock may do so.
    fn update(&self, key: &CounterName<'_>, change: &mut Change<'_>) -> Result<(), StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let (mut bytes, version) = match self.get(key)? {
                Some((b, v)) => (b, Some(v)),
                None => (Vec::new(), None),
            };
            if !change(&mut State::new(&mut bytes)) || self.compare_and_set(key, &bytes, version)? {
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
    /// Where the name's parts end ([`CounterName::split`]): a counter is its parts, as its
    /// hash is theirs, even where a `|` inside one would make two names one text.
    split: [usize; 2],
    /// The name's hash ([`Counters::hash`]), kept for the table to grow by.
    hash: u64,
    version: u32,
}

impl Counter {
    fn name(&self) -> &[u8] {
        &self.bytes[..self.name_len]
    }

    /// Whether the counter is named `name`: the same split, so the same separators, and the
    /// same parts between them.
    #[inline]
    fn is_named(&self, name: &CounterName<'_>) -> bool {
        let [kind, owner, rest] = name.parts.map(str::as_bytes);
        let [k, o] = self.split;
        let text = self.name();
        [k, o] == name.split()
            && &text[k + o + 2..] == rest
            && &text[k + 1..k + 1 + o] == owner
            && &text[..k] == kind
    }

    fn state(&self) -> &[u8] {
        &self.bytes[self.name_len..]
    }

    /// The state, to be changed in place.
    fn state_mut(&mut self) -> State<'_> {
        State {
            buf: &mut self.bytes,
            start: self.name_len,
        }
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
}

impl Counters {
    /// The hash of a name's parts (which part ends where is in the name's identity, not in
    /// its hash: see [`Counter::is_named`]).
    #[inline]
    fn hash(&self, name: &CounterName<'_>) -> u64 {
        let mut h = self.hasher.build_hasher();
        for part in name.parts {
            h.write(part.as_bytes());
        }
        h.finish()
    }

    fn find(&self, name: &CounterName<'_>) -> Option<&Counter> {
        self.table.find(self.hash(name), |c| c.is_named(name))
    }

    fn insert(&mut self, name: &CounterName<'_>, hash: u64, state: &[u8]) {
        let mut bytes = Vec::with_capacity(name.text_len() + state.len());
        name.write_to(&mut bytes);
        bytes.extend_from_slice(state);
        self.insert_counter(bytes, name, hash);
    }

    /// Adds a counter named `name` (of this hash), whose bytes are the name's text, then its
    /// state.
    fn insert_counter(&mut self, bytes: Vec<u8>, name: &CounterName<'_>, hash: u64) {
        let version = next_version(&mut self.version);
        let counter = Counter {
            bytes,
            name_len: name.text_len(),
            split: name.split(),
            hash,
            version,
        };
        self.table.insert_unique(hash, counter, |c| c.hash);
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
    fn get(&self, key: &CounterName<'_>) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let g = self.counters()?;
        Ok(g.find(key).map(|c| (c.state().to_vec(), c.version)))
    }

    fn compare_and_set(
        &self,
        key: &CounterName<'_>,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        let mut guard = self.counters()?;
        let g = &mut *guard;
        let hash = g.hash(key);
        match g.table.find_mut(hash, |c| c.is_named(key)) {
            Some(c) if Some(c.version) == version => {
                c.set_state(value, next_version(&mut g.version));
                Ok(true)
            }
            None if version.is_none() => {
                g.insert(key, hash, value);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Changes the counter where it lies, under the lock: nothing is copied in or out.
    fn update(&self, key: &CounterName<'_>, change: &mut Change<'_>) -> Result<(), StoreError> {
        let mut guard = self.counters()?;
        let g = &mut *guard;
        let hash = g.hash(key);
        match g.table.find_mut(hash, |c| c.is_named(key)) {
            Some(c) => {
                if change(&mut c.state_mut()) {
                    c.version = next_version(&mut g.version);
                }
            }
            None => {
                let mut bytes = Vec::with_capacity(key.text_len());
                key.write_to(&mut bytes);
                let name_len = bytes.len();
                let mut state = State {
                    buf: &mut bytes,
                    start: name_len,
                };
                if change(&mut state) {
                    g.insert_counter(bytes, key, hash);
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
    key: &CounterName<'_>,
    mut change: impl FnMut(&mut State<'_>) -> (bool, T),
) -> Result<T, StoreError> {
    let mut out = None;
    store.update(key, &mut |state| {
        let (write, result) = change(state);
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

/// Then the version of the states' layout: a state of another version (written by another
/// build) reads as never written. Builds before this byte were never released, and nothing of
/// theirs is carried over.
pub(crate) const LAYOUT_VERSION: u8 = 1;

/// The bytes every state starts with: its expiry and its layout's version.
const HEAD: usize = EXPIRY + 1;

/// Whether a state is of this build's layout version.
fn current(bytes: &[u8]) -> bool {
    bytes.len() >= HEAD && bytes[EXPIRY] == LAYOUT_VERSION
}

/// When a counter state expires (it then counts as never written).
pub fn counter_expiry(bytes: &[u8]) -> Option<Millis> {
    let head: [u8; EXPIRY] = bytes.get(..EXPIRY)?.try_into().ok()?;
    Some(i64::from_le_bytes(head))
}

/// A sliding-window state: the [`HEAD`], the running count before its first entry (`u32`),
/// then one entry of [`ADMISSION`] bytes per instant with admissions, in time order: the instant
/// (`i64`) and the running count of admissions up to and including it (`u32`, wrapping). The
/// admissions from any entry on are then one subtraction, and the entry where a window begins
/// one binary search.
const SLIDING_HEAD: usize = HEAD + 4;

/// The bytes of one entry of a sliding-window state: its instant, then the running count.
const ADMISSION: usize = 12;

/// Entries that have left the window and the skew are dropped once there are this many (or as
/// many as are kept), so that a call does not move the whole state each time one leaves.
const DROP_BATCH: usize = 32;

/// How far workers' clocks may disagree without a worker behind counting less than it should:
/// a write keeps admissions this much longer than its own window needs, for a worker whose
/// clock has not reached them yet.
pub(crate) const CLOCK_SKEW: Millis = 1_000;

/// Admissions after this instant are kept when a state is written at `now`.
fn kept_after(period: Millis, now: Millis) -> Millis {
    now.saturating_sub(period).saturating_sub(CLOCK_SKEW)
}

fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// A sliding-window state's entries, read where they lie.
#[derive(Clone, Copy)]
struct Admissions<'b> {
    /// The running count before the first entry.
    base: u32,
    entries: &'b [u8],
}

impl<'b> Admissions<'b> {
    /// The entries of a state; none when it is not a sliding-window state of this layout
    /// ([`is_sliding`]).
    fn of(bytes: &'b [u8]) -> Self {
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

    fn len(&self) -> usize {
        self.entries.len() / ADMISSION
    }

    fn at(&self, i: usize) -> Millis {
        i64_at(self.entries, i * ADMISSION)
    }

    fn running(&self, i: usize) -> u32 {
        u32_at(self.entries, i * ADMISSION + 8)
    }

    /// The running count before entry `i`.
    fn before(&self, i: usize) -> u32 {
        match i {
            0 => self.base,
            _ => self.running(i - 1),
        }
    }

    /// The admissions of entry `i`.
    fn count(&self, i: usize) -> u32 {
        self.running(i).wrapping_sub(self.before(i))
    }

    /// The first entry later than `t` (the number of entries at or before it): the standard
    /// library's binary search, which picks each half without a branch to mispredict.
    fn first_after(&self, t: Millis) -> usize {
        let (entries, _) = self.entries.as_chunks::<ADMISSION>();
        entries.partition_point(|&[a, b, c, d, e, f, g, h, ..]| {
            i64::from_le_bytes([a, b, c, d, e, f, g, h]) <= t
        })
    }

    /// The admissions from entry `i` on.
    fn since(&self, i: usize) -> u64 {
        match self.len() {
            n if i < n => u64::from(self.running(n - 1).wrapping_sub(self.before(i))),
            _ => 0,
        }
    }

    fn latest(&self) -> Option<Millis> {
        self.len().checked_sub(1).map(|i| self.at(i))
    }

    #[cfg(test)]
    fn iter(self) -> impl Iterator<Item = (Millis, u32)> + 'b {
        (0..self.len()).map(move |i| (self.at(i), self.count(i)))
    }
}

/// Whether a state is a sliding-window state of this layout: the head, then whole entries.
fn is_sliding(bytes: &[u8]) -> bool {
    current(bytes)
        && bytes.len() >= SLIDING_HEAD
        && (bytes.len() - SLIDING_HEAD).is_multiple_of(ADMISSION)
}

/// Drops a state that is not a sliding-window state of this layout (another build's), so that
/// it reads as never written; true when it did.
fn forget_other_layout(state: &mut State<'_>) -> bool {
    let other = !state.bytes().is_empty() && !is_sliding(state.bytes());
    if other {
        state.set(&[]);
    }
    other
}

/// A sliding-window state with no admission.
fn empty_sliding() -> [u8; SLIDING_HEAD] {
    let mut head = [0; SLIDING_HEAD];
    head[EXPIRY] = LAYOUT_VERSION;
    head
}

#[cfg(test)]
fn decode_sliding(bytes: Option<&[u8]>) -> Vec<(Millis, u32)> {
    Admissions::of(bytes.unwrap_or(&[])).iter().collect()
}

/// Admitted while fewer than `calls` were admitted in `(now - period, now]` (later ones, from
/// a worker whose clock runs ahead, count too: never over-admit); else the wait until the oldest
/// admission in the window leaves it.
fn sliding_verdict(a: Admissions<'_>, calls: u64, period: Millis, now: Millis) -> Verdict {
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
fn add_running(state: &mut State<'_>, from: usize, delta: u32) {
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
fn count_admission(state: &mut State<'_>, period: Millis, now: Millis, n: u32) {
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
fn admit_in(
    state: &mut State<'_>,
    calls: u64,
    period: Millis,
    now: Millis,
    n: u32,
) -> (bool, Verdict) {
    let rewritten = forget_other_layout(state);
    match sliding_verdict(Admissions::of(state.bytes()), calls, period, now) {
        Verdict::Admitted { remaining } => {
            count_admission(state, period, now, n);
            let remaining = remaining.saturating_sub(u64::from(n));
            (true, Verdict::Admitted { remaining })
        }
        denied => (rewritten, denied),
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
fn release_in(state: &mut State<'_>, at: Millis, n: u32) -> bool {
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

// ---- fixed window ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Window {
    start: Millis,
    calls: u64,
    bytes: u64,
}

/// A fixed window's state (the [`HEAD`], then start, calls and bytes); `None` when never
/// written (or written in another layout).
fn decode_window(bytes: &[u8]) -> Option<Window> {
    if bytes.len() != WINDOW || !current(bytes) {
        return None;
    }
    Some(Window {
        start: i64_at(bytes, HEAD),
        calls: u64_at(bytes, HEAD + 8),
        bytes: u64_at(bytes, HEAD + 16),
    })
}

/// The bytes of a fixed window's state.
const WINDOW: usize = HEAD + 24;

/// Writes window `w` as the state.
fn encode_window(w: &Window, period: Millis, state: &mut State<'_>) {
    state.set(&window_bytes(w, period));
}

/// Window `w` as a state's bytes.
fn window_bytes(w: &Window, period: Millis) -> [u8; WINDOW] {
    let expiry = if period <= 0 {
        Millis::MAX
    } else {
        w.start.saturating_add(period).saturating_add(CLOCK_SKEW)
    };
    let mut out = [0u8; WINDOW];
    out[..EXPIRY].copy_from_slice(&expiry.to_le_bytes());
    out[EXPIRY] = LAYOUT_VERSION;
    out[HEAD..HEAD + 8].copy_from_slice(&w.start.to_le_bytes());
    for (i, x) in [w.calls, w.bytes].into_iter().enumerate() {
        out[HEAD + 8 + i * 8..HEAD + 16 + i * 8].copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Fixed windows of `period` from `origin`, allowing `calls` and/or `bandwidth_kb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FixedWindows {
    pub origin: Millis,
    pub period: Millis,
    pub calls: Option<u64>,
    pub bandwidth_kb: Option<u64>,
}

impl FixedWindows {
    fn current(&self, bytes: &[u8], now: Millis) -> Window {
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
        key: &CounterName<'_>,
        now: Millis,
        n: u64,
    ) -> Result<(Verdict, Millis), StoreError> {
        update(store, key, |state| {
            let (counted, verdict) = self.admit_in(state.bytes(), now, n);
            if let Some(w) = &counted {
                encode_window(w, self.period, state);
            }
            (counted.is_some(), verdict)
        })
    }

    /// [`admit`](Self::admit) on a window's bytes: the window to write when the call is
    /// counted, the verdict, and the window's start.
    fn admit_in(&self, bytes: &[u8], now: Millis, n: u64) -> (Option<Window>, (Verdict, Millis)) {
        let mut w = self.current(bytes, now);
        match self.verdict(&w, now) {
            Verdict::Admitted { .. } => {
                w.calls += n;
                let remaining = self
                    .calls
                    .map(|c| c.saturating_sub(w.calls))
                    .unwrap_or(u64::MAX);
                (Some(w), (Verdict::Admitted { remaining }, w.start))
            }
            denied => (None, (denied, w.start)),
        }
    }

    /// Whether a call would be admitted, without counting it.
    pub fn check(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        now: Millis,
    ) -> Result<Verdict, StoreError> {
        let current = store.get(key)?;
        let w = self.current(current.as_ref().map_or(&[][..], |(b, _)| b), now);
        Ok(self.verdict(&w, now))
    }

    /// Adds calls and bytes at `now` unconditionally (completion).
    pub fn add(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        now: Millis,
        calls: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        if calls == 0 && bytes == 0 {
            return Ok(());
        }
        update(store, key, |state| {
            let w = self.add_in(state.bytes(), now, calls, bytes);
            encode_window(&w, self.period, state);
            (true, ())
        })
    }

    /// [`add`](Self::add) on a window's bytes: the window to write.
    fn add_in(&self, state: &[u8], now: Millis, calls: u64, bytes: u64) -> Window {
        let mut w = self.current(state, now);
        w.calls = w.calls.saturating_add(calls);
        w.bytes = w.bytes.saturating_add(bytes);
        w
    }

    /// Takes back `n` calls counted in the window starting at `start`.
    pub fn release(
        &self,
        store: &dyn CounterStore,
        key: &CounterName<'_>,
        start: Millis,
        n: u64,
    ) -> Result<(), StoreError> {
        update(store, key, |state| {
            match release_window(state.bytes(), start, n) {
                Some(w) => {
                    encode_window(&w, self.period, state);
                    (true, ())
                }
                None => (false, ()),
            }
        })
    }
}

/// [`FixedWindows::release`] on a window's bytes: the window to write, if the calls were
/// counted in it.
fn release_window(bytes: &[u8], start: Millis, n: u64) -> Option<Window> {
    match decode_window(bytes) {
        Some(mut w) if w.start == start && w.calls >= n => {
            w.calls -= n;
            Some(w)
        }
        _ => None,
    }
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
