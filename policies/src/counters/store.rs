//! The counter store: versioned bytes under a name, with compare-and-swap ([`CounterStore`]),
//! the change an update makes ([`State`]), counter names handed over in their parts
//! ([`CounterName`]), and the in-memory store of the native engine and the tests
//! ([`MemoryStore`]), its memory bounded by dropping expired states.

use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::{BuildHasher, Hasher};
use std::ops::Range;
use std::sync::Mutex;

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
    pub(crate) fn tail(&mut self, at: usize) -> State<'_> {
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

/// The kind of a `rate-limit-by-key` counter: its owner is the limit, its name the key value.
pub const BY_KEY_RATE: &str = "rlk";
/// The kind of a `quota-by-key` counter.
pub const BY_KEY_QUOTA: &str = "qk";

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

    /// The name's parts: kind, owner, name.
    pub fn parts(&self) -> [&'a str; 3] {
        self.parts
    }

    /// Whether the name's last part is a value taken from a request (a by-key limit's
    /// `counter-key`), which may be a secret (a subscription key, a token): a store outside
    /// the proxy keeps such a name only as a digest.
    pub fn holds_request_value(&self) -> bool {
        matches!(self.parts[0], BY_KEY_RATE | BY_KEY_QUOTA)
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
    pub(crate) fn split(&self) -> [usize; 2] {
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
pub(crate) struct Counter {
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
pub(crate) struct Counters {
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
pub(crate) fn next_version(last: &mut u32) -> u32 {
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
pub(crate) fn update<T>(
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
