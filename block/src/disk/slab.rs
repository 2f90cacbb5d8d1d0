//! The table of requests in flight, indexed by request id.
//!
//! A request's id names its slot and that slot's generation: looking one up is an index and
//! a compare (a hash map's hashing, inserts and removals were 2-3% of the CPU time of
//! cached 4 KiB reads), and a late engine completion for a request that already finished
//! finds a newer generation in the slot and is ignored, as a missing key was before.

/// Bits of an id that name the slot; the generation sits above them. Slots are reused, so
/// their number is the most requests ever in flight at once (a device's queues bound it).
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Generations wrap within this mask, so ids fit the pipeline's 48-bit id space.
const GEN_MASK: u64 = (1 << 24) - 1;

struct Slot<T> {
    generation: u64,
    value: Option<T>,
}

/// Values by generational id.
pub(super) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    /// Store `value`; its id.
    pub(super) fn insert(&mut self, value: T) -> u64 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    value: None,
                });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[slot];
        s.generation = (s.generation + 1) & GEN_MASK;
        s.value = Some(value);
        self.len += 1;
        (s.generation << SLOT_BITS) | slot as u64
    }

    fn slot(&mut self, id: u64) -> Option<&mut Slot<T>> {
        let s = self.slots.get_mut((id & SLOT_MASK) as usize)?;
        (s.generation == id >> SLOT_BITS && s.value.is_some()).then_some(s)
    }

    /// The value stored under `id`, if it is still there.
    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.slot(id).and_then(|s| s.value.as_mut())
    }

    /// Take the value stored under `id` out.
    pub(super) fn remove(&mut self, id: u64) -> Option<T> {
        let value = self.slot(id)?.value.take();
        self.free.push((id & SLOT_MASK) as usize);
        self.len -= 1;
        value
    }

    /// Values stored.
    pub(super) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids find their values until removed; a reused slot's new id differs from the old
    /// one, which no longer finds anything.
    #[test]
    fn ids_outlive_their_slot_reuse() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(
            (s.get_mut(a).copied(), s.get_mut(b).copied()),
            (Some("a"), Some("b"))
        );
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None, "removed once");
        let c = s.insert("c");
        assert_ne!(c, a, "same slot, new generation");
        assert_eq!(c & SLOT_MASK, a & SLOT_MASK);
        assert_eq!(s.get_mut(a), None);
        assert_eq!(s.get_mut(c).copied(), Some("c"));
        assert_eq!(s.len(), 2);
        assert_eq!(s.get_mut(12345 << SLOT_BITS | 7), None, "unknown slot");
        assert!(c < 1 << 48, "ids fit the pipeline's id space");
    }

    /// Generations wrap inside their mask.
    #[test]
    fn generations_wrap() {
        let mut s = Slab::default();
        s.insert(0u8);
        s.slots[0].generation = GEN_MASK;
        s.remove(GEN_MASK << SLOT_BITS).unwrap();
        let id = s.insert(1);
        assert_eq!(id >> SLOT_BITS, 0);
        assert_eq!(s.get_mut(id).copied(), Some(1));
    }
}
