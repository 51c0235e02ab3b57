//! KV memory: one buffer per layer and per key/value laid out `[slot, kv_heads, capacity, head_dim]`, and the
//! prefix cache of finished sequences' states.
//!
//! Rows `0..n` of the buffers are the running sequences, so a batched step binds one contiguous view of them.

/// The shape of one token's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Floats per head per position.
    pub head_dim: usize,
}

impl KvLayout {
    /// Floats of state per token over all layers, keys and values.
    pub fn floats_per_token(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim
    }
}

/// The per-layer buffers (keys and values interleaved: `k0, v0, k1, v1, …`).
pub struct KvBuffers {
    layout: KvLayout,
    slots: usize,
    capacity: usize,
    bufs: Vec<Vec<f32>>,
}

impl KvBuffers {
    /// Zeroed buffers for `slots` sequences of `capacity` positions (untouched pages cost no memory).
    pub fn new(layout: KvLayout, slots: usize, capacity: usize) -> Self {
        let len = slots * layout.kv_heads * capacity * layout.head_dim;
        Self {
            layout,
            slots,
            capacity,
            bufs: (0..layout.layers * 2).map(|_| vec![0.0; len]).collect(),
        }
    }

    /// Sequences the buffers hold.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions per sequence.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Floats per slot in one buffer.
    fn row(&self) -> usize {
        self.layout.kv_heads * self.capacity * self.layout.head_dim
    }

    /// Start of `slot` in buffer `buf` (`2 * layer` for keys, `2 * layer + 1` for values).
    pub fn slot_ptr(&mut self, buf: usize, slot: usize) -> *mut f32 {
        assert!(slot < self.slots, "slot {slot} of {}", self.slots);
        let offset = slot * self.row();
        self.bufs[buf][offset..].as_mut_ptr()
    }

    /// Buffers with room for `slots` × `capacity` holding the first `lens[i]` positions of slots `0..lens.len()`.
    pub fn grown(&self, slots: usize, capacity: usize, lens: &[usize]) -> Self {
        let mut out = Self::new(self.layout, slots, capacity);
        for (slot, &len) in lens.iter().enumerate() {
            let saved = self.save(slot, len);
            out.load(slot, &saved, len);
        }
        out
    }

    /// Copies the first `len` positions of slot `from` over slot `to`.
    pub fn copy_slot(&mut self, from: usize, to: usize, len: usize) {
        let (row, hd, cap) = (self.row(), self.layout.head_dim, self.capacity);
        for buf in &mut self.bufs {
            for h in 0..self.layout.kv_heads {
                let src = from * row + h * cap * hd;
                let dst = to * row + h * cap * hd;
                buf.copy_within(src..src + len * hd, dst);
            }
        }
    }

    /// The first `len` positions of `slot`, compactly (`[buf][head][position][dim]`).
    pub fn save(&self, slot: usize, len: usize) -> Vec<f32> {
        let (row, hd, cap) = (self.row(), self.layout.head_dim, self.capacity);
        let mut out = Vec::with_capacity(len * self.layout.floats_per_token());
        for buf in &self.bufs {
            for h in 0..self.layout.kv_heads {
                let src = slot * row + h * cap * hd;
                out.extend_from_slice(&buf[src..src + len * hd]);
            }
        }
        out
    }

    /// Writes the first `len` positions of a [`KvBuffers::save`]d state (which may be longer) into `slot`.
    pub fn load(&mut self, slot: usize, saved: &[f32], len: usize) {
        let (row, hd, cap, heads) = (self.row(), self.layout.head_dim, self.capacity, self.layout.kv_heads);
        let saved_len = saved.len() / self.layout.floats_per_token();
        assert!(len <= saved_len && len <= cap, "load {len} of {saved_len} into {cap}");
        for (b, buf) in self.bufs.iter_mut().enumerate() {
            for h in 0..heads {
                let src = (b * heads + h) * saved_len * hd;
                let dst = slot * row + h * cap * hd;
                buf[dst..dst + len * hd].copy_from_slice(&saved[src..src + len * hd]);
            }
        }
    }
}

/// A finished sequence's tokens and state.
struct Entry {
    scope: u64,
    tokens: Vec<u32>,
    state: Vec<f32>,
    last_used: u64,
}

/// Finished sequences' states, reused by prompts of the same scope (API key) that start with the same tokens; least
/// recently used go first.
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    used: usize,
    clock: u64,
}

/// Shorter shared prefixes are recomputed: copying them saves less than it costs.
pub const MIN_PREFIX: usize = 4;

impl PrefixCache {
    /// A cache holding at most `budget_floats` floats of state (0 disables it).
    pub fn new(budget_floats: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget: budget_floats,
            used: 0,
            clock: 0,
        }
    }

    /// Whether it may hold anything.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    /// Floats held now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The longest cached prefix of `prompt`, leaving at least its last two tokens to compute: `(state, length)`.
    /// The model must produce logits for the last one; and ONNX Runtime's `GroupQueryAttention` (`KERNELS=ort`) sums
    /// a one-row forward in another order than a forward of several rows, so there too a prompt sent again gets the
    /// bits it got the first time.
    pub fn lookup(&mut self, scope: u64, prompt: &[u32]) -> Option<(&[f32], usize)> {
        let limit = prompt.len().saturating_sub(2);
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.scope == scope)
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(_, len)| len)?;
        if len < MIN_PREFIX {
            return None;
        }
        self.clock += 1;
        let entry = &mut self.entries[best];
        entry.last_used = self.clock;
        Some((&entry.state, len))
    }

    /// Keeps the state of `tokens`; entries it extends are dropped, then the least recently used until it fits.
    pub fn insert(&mut self, scope: u64, tokens: Vec<u32>, state: Vec<f32>) {
        if tokens.len() < MIN_PREFIX || state.len() > self.budget {
            return;
        }
        self.clock += 1;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.scope == scope && e.tokens.starts_with(&tokens))
        {
            e.last_used = self.clock; // already covered by a longer entry
            return;
        }
        let before = self.entries.len();
        self.entries
            .retain(|e| e.scope != scope || !tokens.starts_with(&e.tokens));
        if self.entries.len() != before {
            self.used = self.entries.iter().map(|e| e.state.len()).sum();
        }
        while self.used + state.len() > self.budget {
            let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used) else {
                break;
            };
            self.used -= self.entries.swap_remove(oldest).state.len();
        }
        self.used += state.len();
        self.entries.push(Entry {
            scope,
            tokens,
            state,
            last_used: self.clock,
        });
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: KvLayout = KvLayout {
        layers: 2,
        kv_heads: 3,
        head_dim: 4,
    };

    fn fill(kv: &mut KvBuffers, slot: usize, len: usize, base: f32) {
        let saved: Vec<f32> = (0..len * L.floats_per_token()).map(|i| base + i as f32).collect();
        kv.load(slot, &saved, len);
    }

    #[test]
    fn save_load_grow_and_copy_keep_every_position() {
        let mut kv = KvBuffers::new(L, 2, 8);
        fill(&mut kv, 0, 5, 0.0);
        fill(&mut kv, 1, 3, 1000.0);
        let (a, b) = (kv.save(0, 5), kv.save(1, 3));
        let grown = kv.grown(4, 16, &[5, 3]);
        assert_eq!(grown.save(0, 5), a);
        assert_eq!(grown.save(1, 3), b);
        kv.copy_slot(1, 0, 3);
        assert_eq!(kv.save(0, 3), b);
        // Loading a prefix of a longer saved state takes its first positions of every head.
        let mut small = KvBuffers::new(L, 1, 8);
        small.load(0, &a, 2);
        let first_two: Vec<f32> = a
            .chunks(5 * L.head_dim)
            .flat_map(|head| head[..2 * L.head_dim].to_vec())
            .collect();
        assert_eq!(small.save(0, 2), first_two);
    }

    #[test]
    fn the_prefix_cache_finds_the_longest_prefix_and_evicts_the_least_recently_used() {
        let per = L.floats_per_token();
        let mut c = PrefixCache::new(20 * per);
        c.insert(7, vec![1, 2, 3, 4, 5, 6], vec![0.0; 6 * per]);
        c.insert(7, vec![1, 2, 3, 4, 9, 9, 9, 9], vec![1.0; 8 * per]);
        assert_eq!(c.lookup(7, &[1, 2, 3, 4, 5, 6, 7, 8]).map(|(_, n)| n), Some(6));
        // At least two tokens are left to compute, and short matches are not worth it.
        assert_eq!(c.lookup(7, &[1, 2, 3, 4, 5, 6, 7]).map(|(_, n)| n), Some(5));
        assert_eq!(c.lookup(7, &[1, 2, 3, 4, 5, 6]).map(|(_, n)| n), Some(4));
        assert_eq!(c.lookup(7, &[1, 2, 3, 7, 7]), None);
        // A growing chat: the longer sequence replaces the one it extends.
        c.insert(7, vec![1, 2, 3, 4, 5, 6, 7, 8], vec![2.0; 8 * per]);
        assert_eq!(c.used(), 16 * per);
        // Over budget: the least recently used ([1,2,3,4,9,…]) goes.
        c.insert(7, vec![5, 5, 5, 5, 5], vec![3.0; 5 * per]);
        assert_eq!(c.used(), 13 * per);
        assert_eq!(c.lookup(7, &[1, 2, 3, 4, 9, 9, 9, 9, 1]).map(|(_, n)| n), Some(4));
        assert_eq!(c.lookup(7, &[5, 5, 5, 5, 5, 1, 2]).map(|(_, n)| n), Some(5));
        assert!(!PrefixCache::new(0).enabled());
        // Another scope (API key) never sees these entries.
        assert_eq!(c.lookup(8, &[5, 5, 5, 5, 5, 1]), None);
    }
}
