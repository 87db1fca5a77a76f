//! The Redis store of counters a fleet shares. The window rules are the engine's
//! ([`apply_plan`]): this module only reads counter states from Redis and writes them back, with
//! a compare-and-set script, so that no update is lost between proxies.
//!
//! A call's counters are applied in one of two ways:
//! - **as one transaction** when they share a hash tag (always on a single Redis; on a Redis
//!   Cluster when they are the counters of one subscription): every state is read at once
//!   (`MGET`), the plan is applied to those states here, and one script writes back what
//!   changed, only if nothing was changed meanwhile; else the call is applied again. A plan that
//!   changes nothing (a call already past its quota) is decided at the read alone.
//! - **counter by counter** when a Redis Cluster keeps them on different shards: each
//!   operation is its own compare-and-set, and at a denial what the earlier ones counted is
//!   given back, as a proxy does with its own counters.
//!
//! Keys: `apim-edge:{TAG}:KIND:NAME`, where the tag is the counter's owner (a subscription's
//! identifier) so that a subscription's counters share a slot, and a by-key counter's value
//! (which may be a secret) is kept only as a SHA-256 digest. Every key carries a TTL to the end
//! of its state's windows, taken from the state itself, so Redis holds live windows only.

use crate::metrics::Metrics;
use apim_edge_policies::{
    apply_plan, counter_expiry, CounterName, CounterPlan, CounterStore, Millis, OpResult,
    StoreError,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many times a call's transaction is tried when other calls keep changing its counters
/// first (each try reads the states again).
pub const MAX_ATTEMPTS: u32 = 64;

/// Writes a call's counters when none changed since they were read. `KEYS`: the counters;
/// `ARGV`, three per key: the state read (`''` for none: no state is empty), the state to
/// write, and its TTL in milliseconds (`-1`: leave it, `0`: delete it). Answers 1, or, when
/// one changed, every state as it is now (`''` for none), to be tried again from.
const COMPARE_AND_SET: &str = r"
local held, changed = {}, false
for i = 1, #KEYS do
  held[i] = redis.call('GET', KEYS[i]) or ''
  if held[i] ~= ARGV[3 * i - 2] then changed = true end
end
if changed then return held end
for i = 1, #KEYS do
  local ttl = tonumber(ARGV[3 * i])
  if ttl == 0 then
    redis.call('DEL', KEYS[i])
  elseif ttl > 0 then
    redis.call('SET', KEYS[i], ARGV[3 * i - 1], 'PX', ttl)
  end
end
return 1
";

/// The Redis key of a counter, and its hash tag.
pub fn redis_key(name: &CounterName<'_>) -> String {
    let [kind, owner, rest] = name.parts();
    if name.holds_request_value() {
        return format!("apim-edge:{{{}}}:{kind}:{owner}", digest(rest));
    }
    if owner.is_empty() || owner.contains(['{', '}']) {
        return format!("apim-edge:{{{}}}:{kind}:{rest}", digest(owner));
    }
    format!("apim-edge:{{{owner}}}:{kind}:{rest}")
}

/// The hash tag of a key made by [`redis_key`]: keys of one tag share a Redis Cluster slot.
pub fn tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or(key, |(t, _)| t)
}

fn digest(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// How a plan is applied (`--apply`): the default, or counter by counter always (to compare).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ApplyMode {
    /// One transaction per call where its counters share a tag.
    Transaction,
    /// A compare-and-set per counter, as across shards.
    PerCounter,
}

/// A connection to Redis or to a Redis Cluster; reconnects by itself.
#[derive(Clone)]
pub enum Redis {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Redis {
    /// Connects to `url` (`redis://host:port`); the connection is made lazily, so the service
    /// starts while Redis is down and serves once it is up.
    pub fn single(url: &str, timeout: Duration) -> redis::RedisResult<Redis> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        Ok(Redis::Single(ConnectionManager::new_lazy_with_config(
            client, config,
        )?))
    }

    /// Connects to a Redis Cluster through any of its `nodes`.
    pub async fn cluster(nodes: &[String], timeout: Duration) -> redis::RedisResult<Redis> {
        let client = ClusterClient::builder(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()?;
        Ok(Redis::Cluster(client.get_async_connection().await?))
    }
}

/// Runs `$call` on a connection `$c` of `$redis`, whichever kind it is.
macro_rules! on_redis {
    ($redis:expr, $c:ident => $call:expr) => {
        async {
            match $redis.clone() {
                Redis::Single(mut $c) => $call.await,
                Redis::Cluster(mut $c) => $call.await,
            }
        }
    };
}

/// Counters a fleet shares, kept in Redis.
pub struct SharedStore {
    redis: Redis,
    script: redis::Script,
    mode: ApplyMode,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// Calls of one tag are applied one at a time by this service (striped by the tags' hashes):
    /// they would only conflict in Redis otherwise. Calls of other replicas may still conflict,
    /// and are tried again.
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// The states this replica last read or wrote, by key: a call is decided from them and
    /// written in one round trip, the script checking they are still Redis' (one read more
    /// when they are not). Bounded: emptied when it reaches [`CACHED_STATES`].
    cache: std::sync::Mutex<HashMap<String, Option<Vec<u8>>>>,
}

/// How many counter states a replica keeps between calls.
pub const CACHED_STATES: usize = 100_000;

const STRIPES: usize = 1024;

impl SharedStore {
    pub fn new(redis: Redis, mode: ApplyMode, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        SharedStore {
            redis,
            script: redis::Script::new(COMPARE_AND_SET),
            mode,
            timeout,
            metrics,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            cache: std::sync::Mutex::default(),
        }
    }

    /// Applies a call's plan at the call's time `now`, all or nothing; answers each operation
    /// up to the first that denies.
    pub async fn apply(
        self: &Arc<Self>,
        plan: CounterPlan,
        now: Millis,
    ) -> Result<Vec<OpResult>, StoreError> {
        let (names, keys) = plan_counters(&plan);
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // One server holds every key; a cluster, those of one tag in one slot.
        let one_slot =
            matches!(self.redis, Redis::Single(_)) || keys.iter().all(|k| tag(k) == tag(&keys[0]));
        // This replica applies calls of one tag one at a time: they would only conflict in
        // Redis otherwise. Stripes are taken in order, so that two calls never wait on each
        // other.
        let mut stripes: Vec<usize> = keys.iter().map(|k| stripe(tag(k))).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut turns = Vec::with_capacity(stripes.len());
        for s in stripes {
            turns.push(self.stripes[s].lock().await);
        }
        if one_slot && self.mode == ApplyMode::Transaction {
            return self.transact(&plan, names, &keys, now).await;
        }
        // Counter by counter: the engine's all-or-nothing over a store whose every read and
        // write is a call to Redis, on a thread that may wait for them.
        let store = self.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let counters = PerCounter {
                store: &store,
                handle,
                now,
                reads: RefCell::default(),
            };
            apply_plan(&plan, &counters, now)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("the call's task failed: {e}")))?
    }

    async fn transact(
        &self,
        plan: &CounterPlan,
        names: Vec<String>,
        keys: &[String],
        now: Millis,
    ) -> Result<Vec<OpResult>, StoreError> {
        let mut read = self.cached(keys);
        let mut fresh = read.is_none();
        for _ in 0..MAX_ATTEMPTS {
            let held = match read.take() {
                Some(held) => held,
                None => {
                    fresh = true;
                    self.read(keys).await?
                }
            };
            let overlay = Overlay {
                counters: RefCell::new(
                    names
                        .iter()
                        .cloned()
                        .zip(held)
                        .map(|(name, held)| Held {
                            name,
                            now: held.clone(),
                            read: held,
                        })
                        .collect(),
                ),
            };
            let answers = apply_plan(plan, &overlay, now)?;
            let counters = overlay.counters.into_inner();
            if counters.iter().all(|c| c.now == c.read) {
                // Decided on what was read: from Redis, or read again.
                if fresh {
                    self.remember(keys, counters.into_iter().map(|c| c.read));
                    return Ok(answers);
                }
                continue;
            }
            let mut invocation = self.script.prepare_invoke();
            for (key, c) in keys.iter().zip(&counters) {
                invocation
                    .key(key)
                    .arg(c.read.as_deref().unwrap_or_default());
                match (&c.now, c.now != c.read) {
                    (Some(state), true) => invocation.arg(&state[..]).arg(ttl(state, now)),
                    (None, true) => invocation.arg("").arg(0),
                    _ => invocation.arg("").arg(-1),
                };
            }
            let written: redis::Value = self
                .timed(on_redis!(self.redis, c => invocation.invoke_async(&mut c)))
                .await?;
            if let redis::Value::Int(1) = written {
                self.remember(keys, counters.into_iter().map(|c| c.now));
                return Ok(answers);
            }
            // Changed meanwhile (or not what this replica remembered): again, from the states
            // the script answered.
            if fresh {
                self.metrics.conflicts.inc();
            }
            read = states(&written, keys.len());
            if let Some(held) = &read {
                self.remember(keys, held.iter().cloned());
            }
            fresh = true;
        }
        Err(StoreError::Contended(keys.join(", ")))
    }

    /// The states of `keys` as this replica last saw them, when it has them all.
    fn cached(&self, keys: &[String]) -> Option<Vec<Option<Vec<u8>>>> {
        let cache = self.cache.lock().ok()?;
        keys.iter().map(|k| cache.get(k).cloned()).collect()
    }

    fn remember(&self, keys: &[String], states: impl Iterator<Item = Option<Vec<u8>>>) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() + keys.len() > CACHED_STATES {
            cache.clear();
        }
        for (k, state) in keys.iter().zip(states) {
            cache.insert(k.clone(), state);
        }
    }

    async fn read(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut mget = redis::cmd("MGET");
        for k in keys {
            mget.arg(k);
        }
        self.timed(on_redis!(self.redis, c => mget.query_async(&mut c)))
            .await
    }

    /// A call to Redis, timed for the latency metric, bounded by the timeout.
    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, call).await;
        self.metrics
            .redis_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics.redis_errors.inc();
                Err(StoreError::Unavailable(format!("redis: {e}")))
            }
            Err(_) => {
                self.metrics.redis_errors.inc();
                Err(StoreError::Unavailable(format!(
                    "redis: no answer within {} ms",
                    self.timeout.as_millis()
                )))
            }
        }
    }
}

/// The states a compare-and-set script answered when they had changed (`''`: none).
fn states(answer: &redis::Value, n: usize) -> Option<Vec<Option<Vec<u8>>>> {
    let redis::Value::Array(items) = answer else {
        return None;
    };
    let states: Option<Vec<Option<Vec<u8>>>> = items
        .iter()
        .map(|v| match v {
            redis::Value::BulkString(b) if b.is_empty() => Some(None),
            redis::Value::BulkString(b) => Some(Some(b.clone())),
            redis::Value::Nil => Some(None),
            _ => None,
        })
        .collect();
    states.filter(|s| s.len() == n)
}

/// The TTL of a state written at `now`: to the end of its windows (at least 1 ms).
fn ttl(state: &[u8], now: Millis) -> i64 {
    match counter_expiry(state) {
        Some(expiry) => (expiry - now).max(1),
        // Not a state of the engine's layout; never reached. A day bounds it all the same.
        None => 86_400_000,
    }
}

fn stripe(tag: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tag.hash(&mut h);
    (h.finish() as usize) % STRIPES
}

/// The distinct counters a plan meets, in the order it meets them: their names (as text) and
/// their Redis keys.
fn plan_counters(plan: &CounterPlan) -> (Vec<String>, Vec<String>) {
    let (mut names, mut keys) = (Vec::new(), Vec::new());
    for op in &plan.ops {
        let key = op.op().key();
        let name = key.to_string();
        if !names.contains(&name) {
            names.push(name);
            keys.push(redis_key(&key));
        }
    }
    (names, keys)
}

/// A counter of a transaction: its state as read, and as the plan leaves it.
struct Held {
    name: String,
    read: Option<Vec<u8>>,
    now: Option<Vec<u8>>,
}

/// A call's counters as read from Redis, changed in place by the engine's rules: nothing is
/// written to Redis until the whole plan is applied.
struct Overlay {
    counters: RefCell<Vec<Held>>,
}

impl Overlay {
    fn index(&self, key: &CounterName<'_>) -> Result<usize, StoreError> {
        self.counters
            .borrow()
            .iter()
            .position(|c| key.is(c.name.as_bytes()))
            .ok_or_else(|| StoreError::Unavailable(format!("counter '{key}' was not read")))
    }
}

impl CounterStore for Overlay {
    fn get(&self, key: &CounterName<'_>) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let i = self.index(key)?;
        Ok(self.counters.borrow()[i].now.clone().map(|s| (s, 0)))
    }

    fn compare_and_set(
        &self,
        key: &CounterName<'_>,
        value: &[u8],
        _version: Option<u32>,
    ) -> Result<bool, StoreError> {
        // One call's plan, applied by one thread: nothing else writes here.
        let i = self.index(key)?;
        self.counters.borrow_mut()[i].now = Some(value.to_vec());
        Ok(true)
    }
}

/// Counters read and written one by one in Redis, each write a compare-and-set against what
/// was read (the version is the read's index).
struct PerCounter<'s> {
    store: &'s SharedStore,
    handle: tokio::runtime::Handle,
    now: Millis,
    reads: RefCell<Vec<Option<Vec<u8>>>>,
}

impl CounterStore for PerCounter<'_> {
    fn get(&self, key: &CounterName<'_>) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let keys = [redis_key(key)];
        let mut held = self.handle.block_on(self.store.read(&keys))?;
        let state = held.pop().flatten();
        let mut reads = self.reads.borrow_mut();
        reads.push(state.clone());
        let version = (reads.len() - 1) as u32;
        Ok(state.map(|s| (s, version)))
    }

    fn compare_and_set(
        &self,
        key: &CounterName<'_>,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        let read = match version {
            Some(v) => self.reads.borrow().get(v as usize).cloned().flatten(),
            None => None,
        };
        let mut invocation = self.store.script.prepare_invoke();
        invocation
            .key(redis_key(key))
            .arg(read.as_deref().unwrap_or_default())
            .arg(value)
            .arg(ttl(value, self.now));
        let written: redis::Value = self.handle.block_on(
            self.store
                .timed(on_redis!(self.store.redis, c => invocation.invoke_async(&mut c))),
        )?;
        let done = matches!(written, redis::Value::Int(1));
        if !done {
            self.store.metrics.conflicts.inc();
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_no_request_value_and_share_a_tag_per_subscription() {
        let own = redis_key(&CounterName::new("sl", "sub-1", "product:starter"));
        assert_eq!(own, "apim-edge:{sub-1}:sl:product:starter");
        let rate = redis_key(&CounterName::new("rl", "sub-1", "api:echo/get"));
        assert_eq!(tag(&own), tag(&rate));
        let secret = "f3a9c0ffee-subscription-key";
        let keyed = redis_key(&CounterName::new("rlk", "product:p/0", secret));
        assert!(!keyed.contains(secret), "{keyed}");
        assert!(keyed.starts_with("apim-edge:{") && keyed.ends_with(":rlk:product:p/0"));
        // The same value under a quota-by-key shares the rate limit's slot.
        let quota = redis_key(&CounterName::new("qk", "api:a/1", secret));
        assert_eq!(tag(&keyed), tag(&quota));
        // An owner that would break the tag is digested too.
        let odd = redis_key(&CounterName::new("sl", "a}b", "x"));
        assert!(!odd.contains("a}b"));
    }
}
