//! Counters on proxy-wasm shared data, with memory bounded.
//!
//! Envoy's shared data is the only state its worker VMs share, it offers compare-and-swap, and it
//! can never delete a key. So counters do not get a key each: every counter hashes (FNV-1a,
//! the same in every VM) to one of [`SLOTS`] slot keys, created when the filter is configured,
//! and a slot holds the states of its counters. Each write to a slot drops the states that have
//! expired (see `apim_edge_policies::counter_expiry`), and a slot never grows past
//! [`SLOT_BYTES`]: a write that would is refused, and `failureMode` decides the call. The
//! shared memory the counters can take is therefore at most `SLOTS × SLOT_BYTES` (64 MiB),
//! however many distinct `counter-key` values (client IPs, say) are seen.
//!
//! A counter's version is its slot's CAS value, so a write fails, and is retried by the engine,
//! when anything in the slot changed since the read: never a lost update.

use apim_edge_policies::{
    counter_expiry, Change, CounterName, CounterStore, Millis, State, StoreError, MAX_ATTEMPTS,
};
use arrayvec::ArrayString;
use std::cell::RefCell;

/// How many slot keys hold counters.
pub const SLOTS: u32 = 1024;
/// The most bytes one slot may hold.
pub const SLOT_BYTES: usize = 64 * 1024;

/// Shared data as the proxy offers it: a missing key has no CAS value, and `set` with
/// `cas: None` (0 on the wire) writes unconditionally.
pub trait SharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    /// `Ok(false)` on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
}

/// FNV-1a of the name's text, read piece by piece (the same as of the joined text).
fn fnv1a(name: &CounterName<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.pieces().into_iter().flatten() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The shared-data key of a slot.
pub fn slot_key(slot: u32) -> String {
    slot_key_text(slot).to_string()
}

/// [`slot_key`] on the stack: it is needed on every counter update.
fn slot_key_text(slot: u32) -> ArrayString<32> {
    let mut key = ArrayString::new();
    key.push_str("apim-edge/counters/");
    key.push_str(itoa::Buffer::new().format(slot));
    key
}

thread_local! {
    /// The buffers a counter update builds a counter's state and its slot in, kept from call
    /// to call (a VM is one thread). A buffer grown past twice a slot's size is let go.
    static UPDATE_BUFFERS: RefCell<(Vec<u8>, Vec<u8>)> = RefCell::default();
}

fn slot_of(counter: &CounterName<'_>) -> u32 {
    (fnv1a(counter) % u64::from(SLOTS)) as u32
}

/// The CAS a slot is created with: shared data creates a missing key whatever the CAS, and
/// refuses this one on a key that exists (its CAS would have to be exactly this value). So a
/// slot another worker created, and counted in, between our read and our write is left as it
/// is; a write without a CAS would empty it and forget its counts.
const CREATE_ONLY: u32 = u32::MAX;

/// Creates every slot that does not exist yet. Called from `on_configure`; other workers may
/// be creating slots and counting at the same time (they start and take traffic each at its
/// own pace), so a slot that exists, or comes to exist meanwhile, is left as it is.
pub fn create_slots(shared: &dyn SharedData) -> Result<u32, StoreError> {
    let mut created = 0;
    for slot in 0..SLOTS {
        let key = slot_key(slot);
        if shared.get(&key)?.1.is_none() && shared.set(&key, &[], Some(CREATE_ONLY))? {
            created += 1;
        }
    }
    Ok(created)
}

/// A slot's entries: `[u16 name length][name][u32 state length][state]`, repeated.
fn entries(slot: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = slot;
    std::iter::from_fn(move || {
        let name_len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let name = rest.get(2..2 + name_len)?;
        let at = 2 + name_len;
        let state_len = u32::from_le_bytes(rest.get(at..at + 4)?.try_into().ok()?) as usize;
        let state = rest.get(at + 4..at + 4 + state_len)?;
        rest = &rest[at + 4 + state_len..];
        Some((name, state))
    })
}

fn push_entry(out: &mut Vec<u8>, name: &[&[u8]], state: &[u8]) {
    let name_len: usize = name.iter().map(|piece| piece.len()).sum();
    out.extend_from_slice(&(name_len as u16).to_le_bytes());
    for piece in name {
        out.extend_from_slice(piece);
    }
    out.extend_from_slice(&(state.len() as u32).to_le_bytes());
    out.extend_from_slice(state);
}

/// The engine's counter store over slots of shared data, at one instant (for expiry).
pub struct SlotStore<'a> {
    shared: &'a dyn SharedData,
    now: Millis,
}

impl<'a> SlotStore<'a> {
    pub fn new(shared: &'a dyn SharedData, now: Millis) -> Self {
        SlotStore { shared, now }
    }

    fn read_slot(&self, slot_name: &str) -> Result<(Vec<u8>, Option<u32>), StoreError> {
        let (bytes, cas) = self.shared.get(slot_name)?;
        Ok((bytes.unwrap_or_default(), cas))
    }

    /// The slot `slot` with `key`'s state replaced by `state`, and the expired states of
    /// other counters dropped, written into `out`. Refused when it would not fit.
    fn rebuild(
        &self,
        slot: u32,
        bytes: &[u8],
        key: &CounterName<'_>,
        state: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        if key.text_len() > usize::from(u16::MAX) {
            return Err(StoreError::Unavailable("counter name too long".into()));
        }
        out.clear();
        out.reserve(bytes.len() + key.text_len() + state.len() + 6);
        for (name, other) in entries(bytes) {
            let expired = counter_expiry(other).is_none_or(|e| e <= self.now);
            if !key.is(name) && !expired {
                push_entry(out, &[name], other);
            }
        }
        push_entry(out, &key.pieces(), state);
        if out.len() > SLOT_BYTES {
            return Err(StoreError::Unavailable(format!(
                "counter slot {slot} is full ({SLOT_BYTES} bytes of live counters)"
            )));
        }
        Ok(())
    }
}

impl CounterStore for SlotStore<'_> {
    fn get(&self, key: &CounterName<'_>) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let slot_name = slot_key(slot_of(key));
        let (bytes, cas) = self.read_slot(&slot_name)?;
        let Some(cas) = cas else {
            return Err(StoreError::Unavailable(format!(
                "counter slot {} was never created",
                slot_of(key)
            )));
        };
        let state = entries(&bytes)
            .find(|(name, _)| key.is(name))
            .map(|(_, s)| s.to_vec())
            .unwrap_or_default();
        // A counter never written reads as empty, at the slot's version.
        Ok(Some((state, cas)))
    }

    fn compare_and_set(
        &self,
        key: &CounterName<'_>,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        let slot = slot_of(key);
        let slot_name = slot_key(slot);
        let (bytes, cas) = self.read_slot(&slot_name)?;
        if cas.is_none() || cas != version {
            return Ok(false);
        }
        let mut out = Vec::new();
        self.rebuild(slot, &bytes, key, value, &mut out)?;
        self.shared.set(&slot_name, &out, cas)
    }

    /// One read of the slot per attempt: the counter's state is copied out of the slot for
    /// `change`, and the slot is rebuilt around the new state.
    fn update(&self, key: &CounterName<'_>, change: &mut Change<'_>) -> Result<(), StoreError> {
        let (mut next, mut out) = UPDATE_BUFFERS.take();
        let updated = self.update_with(key, change, &mut next, &mut out);
        for buffer in [&mut next, &mut out] {
            if buffer.capacity() > 2 * SLOT_BYTES {
                *buffer = Vec::new();
            }
        }
        UPDATE_BUFFERS.set((next, out));
        updated
    }
}

impl SlotStore<'_> {
    /// [`CounterStore::update`] with the buffers it builds in.
    fn update_with(
        &self,
        key: &CounterName<'_>,
        change: &mut Change<'_>,
        next: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        let slot = slot_of(key);
        let slot_key = slot_key_text(slot);
        let slot_name = slot_key.as_str();
        for _ in 0..MAX_ATTEMPTS {
            let (bytes, cas) = self.read_slot(slot_name)?;
            let Some(cas) = cas else {
                return Err(StoreError::Unavailable(format!(
                    "counter slot {slot} was never created"
                )));
            };
            let state = entries(&bytes)
                .find(|(name, _)| key.is(name))
                .map_or(&[][..], |(_, s)| s);
            next.clear();
            next.extend_from_slice(state);
            if !change(&mut State::new(next)) {
                return Ok(());
            }
            self.rebuild(slot, &bytes, key, next, out)?;
            if self.shared.set(slot_name, out, Some(cas))? {
                return Ok(());
            }
        }
        Err(StoreError::Contended(key.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Result<(), Box<dyn std::error::Error>>;
    use crate::testing::EnvoyLike;

    /// Shared data as a worker saw it a moment ago: every slot still missing, while another
    /// worker has since created it and counted in it.
    struct SeenBefore<'a>(&'a dyn SharedData);

    impl SharedData for SeenBefore<'_> {
        fn get(&self, _: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            Ok((None, None))
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            self.0.set(key, value, cas)
        }
    }

    /// A worker that creates slots while another has just created them and counted: the
    /// counts stay (a regression: a 200-call quota once admitted 268 in the wasmtime host with
    /// four parallel workers, one of them still starting).
    #[test]
    fn creating_slots_never_empties_one_another_worker_counts_in() -> R {
        let shared = EnvoyLike::default();
        create_slots(&shared)?;
        let key = slot_key(7);
        let (_, cas) = shared.get(&key)?;
        assert!(shared.set(&key, b"counted", cas)?);
        // Slots that really are missing are created all the same.
        let fresh = EnvoyLike::default();
        assert_eq!(create_slots(&SeenBefore(&fresh))?, SLOTS);
        assert_eq!(create_slots(&SeenBefore(&shared))?, 0);
        assert_eq!(shared.get(&key)?.0.as_deref(), Some(&b"counted"[..]));
        Ok(())
    }

    fn state(expiry: Millis, body: &[u8]) -> Vec<u8> {
        let mut s = expiry.to_le_bytes().to_vec();
        s.extend_from_slice(body);
        s
    }

    #[test]
    fn a_counter_is_in_the_slot_of_its_name_as_one_text() {
        // As builds that were handed the name joined put it: FNV-1a of the text.
        let text_slot = |text: &str| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in text.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            (h % u64::from(SLOTS)) as u32
        };
        for (kind, owner, name) in [
            ("sl", "sub-1", "product:starter"),
            ("rlk", "60000", "10.0.0.1"),
            ("q", "", ""),
        ] {
            let n = CounterName::new(kind, owner, name);
            assert_eq!(slot_of(&n), text_slot(&format!("{kind}|{owner}|{name}")));
        }
    }

    #[test]
    fn a_slots_key_is_its_number_behind_the_prefix() {
        for slot in [0, 7, 10, 99, 1023, SLOTS - 1, u32::MAX] {
            assert_eq!(slot_key(slot), format!("apim-edge/counters/{slot}"));
        }
    }

    #[test]
    fn slots_are_created_once() -> R {
        let shared = EnvoyLike::default();
        assert_eq!(create_slots(&shared)?, SLOTS);
        assert_eq!(create_slots(&shared)?, 0);
        Ok(())
    }

    #[test]
    fn a_counter_round_trips_and_stale_versions_fail() -> R {
        let shared = EnvoyLike::default();
        create_slots(&shared)?;
        let store = SlotStore::new(&shared, 0);
        let key = &CounterName::new("rl", "s", "a");
        let (empty, v) = store.get(key)?.ok_or("absent")?;
        assert!(empty.is_empty());
        assert!(store.compare_and_set(key, &state(100, b"x"), Some(v))?);
        assert!(!store.compare_and_set(key, &state(100, b"y"), Some(v))?);
        let (got, _) = store.get(key)?.ok_or("absent")?;
        assert_eq!(got, state(100, b"x"));
        Ok(())
    }

    #[test]
    fn expired_counters_are_dropped_and_a_slot_never_overflows() -> R {
        let shared = EnvoyLike::default();
        create_slots(&shared)?;
        // Many distinct keys (client IPs) over time, each state living 50 ms. A slot drops
        // expired states whenever it is written, so what it holds does not grow with the
        // number of keys seen: about one state per slot, not one per key.
        let big = vec![0u8; 1000];
        let held = |shared: &EnvoyLike| -> Result<Vec<usize>, StoreError> {
            (0..SLOTS)
                .map(|s| Ok(shared.get(&slot_key(s))?.0.unwrap_or_default().len()))
                .collect()
        };
        let mut totals = Vec::new();
        for round in 0..2u32 {
            for i in 0..20_000u32 {
                let n = round * 20_000 + i;
                let now = i64::from(n) * 10;
                let store = SlotStore::new(&shared, now);
                let ip = format!("10.{}.{}.{}", n >> 16, (n >> 8) & 255, n & 255);
                let key = CounterName::new("rlk", "60000", &ip);
                let (_, v) = store.get(&key)?.ok_or("absent")?;
                assert!(store.compare_and_set(&key, &state(now + 50, &big), Some(v))?);
            }
            let sizes = held(&shared)?;
            assert!(sizes.iter().all(|&b| b <= SLOT_BYTES));
            totals.push(sizes.iter().sum::<usize>());
        }
        let per_slot = 1000 + 8 + 30 + 6;
        assert!(totals[0] <= SLOTS as usize * per_slot * 2, "{totals:?}");
        assert!(totals[1] <= SLOTS as usize * per_slot * 2, "{totals:?}");
        // A slot full of live counters refuses a write instead of evicting one.
        let store = SlotStore::new(&shared, 0);
        let mut refused = false;
        let same_slot = (0..)
            .map(|i| format!("live-{i}"))
            .filter(|k| slot_of(&CounterName::new("t", "s", k)) == 7);
        for name in same_slot.take(100) {
            let key = CounterName::new("t", "s", &name);
            let (_, v) = store.get(&key)?.ok_or("absent")?;
            match store.compare_and_set(&key, &state(Millis::MAX, &big), Some(v)) {
                Ok(true) => {}
                Ok(false) => return Err("a write lost with no contention".into()),
                Err(e) => {
                    assert!(e.to_string().contains("is full"), "{e}");
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused);
        Ok(())
    }

    /// Another worker writes the same slot between this update's read and its write.
    struct Interleaved<'a> {
        inner: &'a EnvoyLike,
        other: std::cell::Cell<Option<(CounterName<'static>, &'static [u8])>>,
    }

    impl SharedData for Interleaved<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            let read = self.inner.get(key)?;
            if let Some((counter, state)) = self.other.take() {
                let other = SlotStore::new(self.inner, 0);
                other.update(&counter, &mut |current| {
                    current.set(state);
                    true
                })?;
            }
            Ok(read)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn an_update_that_loses_the_race_runs_again_on_what_won() -> R {
        let shared = EnvoyLike::default();
        create_slots(&shared)?;
        // Two counters in one slot.
        let mut same_slot = (0..)
            .map(|i| format!("c-{i}"))
            .filter(|k| slot_of(&CounterName::new("t", "s", k)) == 3);
        let (mine, theirs) = (same_slot.next().ok_or("")?, same_slot.next().ok_or("")?);
        let mine = CounterName::new("t", "s", &mine);
        let theirs = CounterName::new("t", "s", Box::leak(theirs.into_boxed_str()));
        let interleaved = Interleaved {
            inner: &shared,
            other: std::cell::Cell::new(Some((theirs, b"\xff\xff\xff\xff\xff\xff\xff\x7ftheirs"))),
        };
        let store = SlotStore::new(&interleaved, 0);
        let mut seen = Vec::new();
        store.update(&mine, &mut |current| {
            seen.push(current.bytes().to_vec());
            current.set(&state(100, b"mine"));
            true
        })?;
        // The first attempt lost to the other write and ran again, on the counter as it is
        // (never written: empty); both states are there.
        assert_eq!(seen, vec![Vec::<u8>::new(), Vec::new()]);
        let plain = SlotStore::new(&shared, 0);
        assert_eq!(plain.get(&mine)?.ok_or("")?.0, state(100, b"mine"));
        assert!(plain.get(&theirs)?.ok_or("")?.0.ends_with(b"theirs"));
        // A change that writes nothing leaves the slot as it is.
        let before = shared.get(&slot_key(3))?;
        store.update(&mine, &mut |_| false)?;
        assert_eq!(shared.get(&slot_key(3))?, before);
        Ok(())
    }

    /// The engine deciding subscription `s`'s calls (key `k`) to API `a` in product `p`, whose
    /// policy is `policy`, on freshly created slots.
    struct OnSlots {
        catalog: apim_edge_policies::Catalog,
        shared: EnvoyLike,
        headers: Vec<(String, String)>,
    }

    impl OnSlots {
        fn new(policy: &str) -> Result<Self, Box<dyn std::error::Error>> {
            use apim_edge_policies::{Catalog, LoadOptions};
            let doc = serde_json::json!({
                "apis": [{"name": "a", "path": "a"}],
                "products": [{"name": "p", "apis": ["a"], "policy": policy}],
                "subscriptions": [{"name": "s", "scope": "/products/p", "primaryKey": "k"}]
            });
            let shared = EnvoyLike::default();
            create_slots(&shared)?;
            Ok(OnSlots {
                catalog: Catalog::load(&doc, LoadOptions::default())?,
                shared,
                headers: vec![("ocp-apim-subscription-key".to_string(), "k".to_string())],
            })
        }

        /// The call at `t`, on a slot store of that instant.
        fn decide(
            &self,
            t: Millis,
        ) -> Result<apim_edge_policies::Outcome, apim_edge_policies::EngineError> {
            let req = apim_edge_policies::Request {
                method: "GET",
                host: "h",
                path: "/a/x",
                query: "",
                headers: &self.headers,
                client_ip: None,
            };
            let store = SlotStore::new(&self.shared, t);
            Ok(self.catalog.decide(&req, t, &store)?.outcome)
        }
    }

    #[test]
    fn the_engine_counts_exactly_on_slots() -> R {
        use apim_edge_policies::Outcome;
        let engine = OnSlots::new(
            "<policies><inbound><quota calls=\"3\" renewal-period=\"3600\" /></inbound></policies>",
        )?;
        let outcomes = (0..5)
            .map(|t| engine.decide(t))
            .collect::<Result<Vec<Outcome>, _>>()?;
        assert_eq!(outcomes[..3], [Outcome::Allowed; 3]);
        assert_eq!(outcomes[3..], [Outcome::QuotaExceeded; 2]);
        Ok(())
    }

    /// The known limit the README states: a sliding window holds 12 bytes per distinct
    /// millisecond with admissions in it, so a rate limit of 10,000 calls a minute outgrows a
    /// slot after about 5,400 admissions at distinct instants. The write is then refused (an
    /// error, for `failureMode` to decide), never truncated into fewer admissions.
    #[test]
    fn a_sliding_window_larger_than_a_slot_is_refused_not_truncated() -> R {
        use apim_edge_policies::Outcome;
        let engine = OnSlots::new(
            "<policies><inbound><rate-limit calls=\"10000\" renewal-period=\"60\" /></inbound></policies>",
        )?;
        let mut admitted = 0;
        let refused = loop {
            match engine.decide(admitted) {
                Ok(outcome) => {
                    assert_eq!(outcome, Outcome::Allowed);
                    admitted += 1;
                }
                Err(e) => break e,
            }
            assert!(admitted < 10_000, "never refused");
        };
        assert!(refused.to_string().contains("is full"), "{refused}");
        let most = (SLOT_BYTES / 12) as i64;
        assert!((most - 20..most).contains(&admitted), "{admitted}");
        // Nothing was dropped to make room: the next call is refused too.
        assert!(engine.decide(admitted + 1).is_err());
        Ok(())
    }
}
