//! Timer wheel for flow deadlines: O(1) insert, expiry in time order by
//! millisecond.
//!
//! smoltcp re-arms a connection's deadline on nearly every segment (delayed
//! ACK, retransmission), so a loaded daemon inserts one or two deadlines per
//! request. A binary heap paid O(log n) cache-missing steps per insert and
//! pop; at 10 000 connections its `pop` alone was 4% of the server CPU.
//! Here deadlines fall into one-millisecond slots of a ring covering the next
//! [`SLOTS`] ms; later ones wait in a heap (retransmission backoff, keepalive,
//! TIME-WAIT) and move into the ring as it turns. A bitmap finds occupied
//! slots without walking empty ones.
//!
//! Entries are never removed early: the caller remembers each key's live
//! deadline and ignores stale entries (lazy deletion).

use smoltcp::time::Instant;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Slots in the ring, one millisecond each (power of two).
pub const SLOTS: usize = 4096;
const WORDS: usize = SLOTS / 64;

/// Deadlines keyed by `K`.
pub struct Wheel<K> {
    slots: Vec<Vec<(Instant, K)>>,
    /// Earliest deadline in each slot (valid while the slot is non-empty).
    mins: Vec<Instant>,
    occupied: [u64; WORDS],
    /// The ring covers ticks `cursor .. cursor + SLOTS`; deadlines before
    /// `cursor` are filed under it (already due).
    cursor: i64,
    far: BinaryHeap<Reverse<(Instant, K)>>,
    len: usize,
}

fn tick(t: Instant) -> i64 {
    t.total_micros().div_euclid(1000)
}

fn index(tick: i64) -> usize {
    tick.rem_euclid(SLOTS as i64) as usize
}

impl<K: Copy + Ord> Wheel<K> {
    /// An empty wheel whose ring starts at `now`.
    pub fn new(now: Instant) -> Self {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            mins: vec![Instant::from_micros(0); SLOTS],
            occupied: [0; WORDS],
            cursor: tick(now),
            far: BinaryHeap::new(),
            len: 0,
        }
    }

    /// Entries held (live and stale).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedule `key` at `at`.
    pub fn push(&mut self, at: Instant, key: K) {
        let k = tick(at).max(self.cursor);
        if k - self.cursor < SLOTS as i64 {
            self.put(k, at, key);
        } else {
            self.far.push(Reverse((at, key)));
        }
        self.len += 1;
    }

    fn put(&mut self, k: i64, at: Instant, key: K) {
        let i = index(k);
        let slot = &mut self.slots[i];
        if slot.is_empty() || at < self.mins[i] {
            self.mins[i] = at;
        }
        slot.push((at, key));
        self.occupied[i / 64] |= 1 << (i % 64);
    }

    /// The first occupied slot at or after the cursor, as a tick.
    fn first_occupied(&self) -> Option<i64> {
        let start = index(self.cursor);
        // Walk the bitmap once around the ring, beginning at `start`.
        for step in 0..=WORDS {
            let w = (start / 64 + step) % WORDS;
            let mut bits = self.occupied[w];
            if step == 0 {
                bits &= !0u64 << (start % 64);
            } else if step == WORDS {
                bits &= (1u64 << (start % 64)).wrapping_sub(1);
            }
            if bits != 0 {
                let i = w * 64 + bits.trailing_zeros() as usize;
                let ahead = (i + SLOTS - start) % SLOTS;
                return Some(self.cursor + ahead as i64);
            }
        }
        None
    }

    /// The earliest deadline held, if any.
    pub fn next(&self) -> Option<Instant> {
        let near = self.first_occupied().map(|k| self.mins[index(k)]);
        let far = self.far.peek().map(|Reverse((t, _))| *t);
        match (near, far) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Move every entry due at `now` (deadline <= now) into `out`, at most
    /// `limit` of them (the rest stay for the next call), slot by slot
    /// from the earliest.
    pub fn expire(&mut self, now: Instant, limit: usize, out: &mut Vec<(Instant, K)>) {
        let now_tick = tick(now);
        let mut taken = 0usize;
        loop {
            while let Some(k) = self.first_occupied() {
                if k > now_tick || taken >= limit {
                    break;
                }
                let i = index(k);
                let slot = &mut self.slots[i];
                let mut j = 0;
                let mut min: Option<Instant> = None;
                while j < slot.len() {
                    let (at, key) = slot[j];
                    if at <= now && taken < limit {
                        out.push((at, key));
                        taken += 1;
                        slot.swap_remove(j);
                    } else {
                        min = Some(min.map_or(at, |m| m.min(at)));
                        j += 1;
                    }
                }
                match min {
                    Some(m) => {
                        // Not yet due, or over the limit: stays.
                        self.mins[i] = m;
                        self.cursor = self.cursor.max(k);
                        break;
                    }
                    None => {
                        self.occupied[i / 64] &= !(1 << (i % 64));
                        // Not past `now`: deadlines pushed later in this
                        // millisecond must land in a slot the next call scans.
                        self.cursor = self.cursor.max(k);
                    }
                }
            }
            if taken >= limit {
                break;
            }
            // Nothing due is left in the ring: it may start at `now`.
            self.cursor = self.cursor.max(now_tick);
            // Far deadlines the ring now covers move into it; due ones (the
            // daemon was idle longer than the ring's span) go round again.
            let mut due = false;
            while let Some(Reverse((at, key))) = self.far.peek().copied() {
                let k = tick(at).max(self.cursor);
                if k - self.cursor >= SLOTS as i64 {
                    break;
                }
                self.far.pop();
                self.put(k, at, key);
                due |= at <= now;
            }
            if !due {
                break;
            }
        }
        self.len -= taken;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: deadlines not yet handed out.
    fn check_against_reference(seed: u64, limit: usize) {
        let mut rng = seed;
        let mut rand = move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 33
        };
        let start = Instant::from_millis(1_000);
        let mut w: Wheel<u32> = Wheel::new(start);
        let mut pending: Vec<(Instant, u32)> = Vec::new();
        let mut now = start;
        let mut out = Vec::new();
        for round in 0..3000u32 {
            // Deadlines: mostly within 20 ms, some seconds out (beyond the
            // ring), some already past.
            for n in 0..(rand() % 4) {
                let at = match rand() % 10 {
                    0 => now + smoltcp::time::Duration::from_millis(4000 + rand() % 9000),
                    1 => Instant::from_micros(now.total_micros() - (rand() % 3000) as i64),
                    _ => now + smoltcp::time::Duration::from_micros(rand() % 20_000),
                };
                let key = round * 4 + n as u32;
                w.push(at, key);
                pending.push((at, key));
            }
            assert_eq!(w.len(), pending.len());
            assert_eq!(w.next(), pending.iter().map(|p| p.0).min());
            // Time moves by up to 3 ms, sometimes by 6 s (an idle daemon).
            let step = if rand() % 500 == 0 {
                6_000_000
            } else {
                rand() % 3000
            };
            now += smoltcp::time::Duration::from_micros(step);
            out.clear();
            w.expire(now, limit, &mut out);
            let due = pending.iter().filter(|p| p.0 <= now).count();
            assert_eq!(out.len(), due.min(limit), "round {round}");
            for e in &out {
                assert!(e.0 <= now, "handed out early");
                let pos = pending
                    .iter()
                    .position(|p| p == e)
                    .expect("handed out twice");
                pending.swap_remove(pos);
            }
        }
        // Drain everything.
        now += smoltcp::time::Duration::from_secs(60);
        while !pending.is_empty() {
            out.clear();
            w.expire(now, limit, &mut out);
            assert!(!out.is_empty());
            for e in &out {
                let pos = pending
                    .iter()
                    .position(|p| p == e)
                    .expect("handed out twice");
                pending.swap_remove(pos);
            }
        }
        assert!(w.is_empty());
        assert_eq!(w.next(), None);
    }

    #[test]
    fn hands_out_each_deadline_once_and_never_early() {
        for seed in 1..4 {
            check_against_reference(seed, usize::MAX);
        }
    }

    #[test]
    fn a_limit_leaves_the_rest_for_the_next_call() {
        check_against_reference(7, 2);
    }

    #[test]
    fn far_deadlines_come_back_in_time() {
        let t0 = Instant::from_millis(0);
        let mut w = Wheel::new(t0);
        w.push(Instant::from_millis(10_000), 1u8);
        w.push(Instant::from_millis(5), 2u8);
        assert_eq!(w.next(), Some(Instant::from_millis(5)));
        let mut out = Vec::new();
        w.expire(Instant::from_millis(9_999), usize::MAX, &mut out);
        assert_eq!(out, vec![(Instant::from_millis(5), 2)]);
        assert_eq!(w.next(), Some(Instant::from_millis(10_000)));
        out.clear();
        w.expire(Instant::from_millis(10_000), usize::MAX, &mut out);
        assert_eq!(out, vec![(Instant::from_millis(10_000), 1)]);
        assert!(w.is_empty());
    }
}
