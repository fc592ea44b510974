//! A slab: values in a vector, found by an id that holds their index and
//! a generation, freed slots reused first. The epoll backend keeps its
//! in-flight operations here instead of in a hash map keyed by a counter:
//! an insert, a lookup and a removal are an index each, with no hashing,
//! no probing and, once the vector has grown to the shard's load, no
//! allocation.
//!
//! The generation makes an id that outlived its value (a timer heap entry,
//! a descriptor's waiting list) miss instead of finding the value that took
//! its slot since.

/// One slot: the generation of the id that may use it, and its value.
#[derive(Debug)]
struct Slot<T> {
    /// Bumped each time the slot is emptied: ids of earlier values miss.
    gen: u32,
    value: Option<T>,
}

/// Values by id; see the module docs.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Indexes of empty slots, the last freed on top.
    free: Vec<u32>,
    /// Values held.
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

/// An id: the generation in the high 32 bits, the index in the low 32.
fn id(index: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | u64::from(index)
}

fn parts(id: u64) -> (usize, u32) {
    ((id & u64::from(u32::MAX)) as usize, (id >> 32) as u32)
}

impl<T> Slab<T> {
    /// Stores `value`; returns its id.
    pub fn insert(&mut self, value: T) -> u64 {
        self.len += 1;
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.value = Some(value);
            return id(index, slot.gen);
        }
        // A shard holds far fewer than 2^32 operations at once (each holds
        // memory or a descriptor); past that the index would wrap.
        let index = self.slots.len() as u32;
        self.slots.push(Slot {
            gen: 0,
            value: Some(value),
        });
        id(index, 0)
    }

    /// The value of `id`, if it is still there.
    pub fn get(&self, id: u64) -> Option<&T> {
        let (index, gen) = parts(id);
        match self.slots.get(index) {
            Some(slot) if slot.gen == gen => slot.value.as_ref(),
            _ => None,
        }
    }

    /// The value of `id`, if it is still there, to change.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        let (index, gen) = parts(id);
        match self.slots.get_mut(index) {
            Some(slot) if slot.gen == gen => slot.value.as_mut(),
            _ => None,
        }
    }

    /// Takes the value of `id` out; its slot is free for another, under
    /// another id.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let (index, gen) = parts(id);
        let slot = self.slots.get_mut(index)?;
        if slot.gen != gen {
            return None;
        }
        let value = slot.value.take()?;
        slot.gen = slot.gen.wrapping_add(1);
        self.free.push(index as u32);
        self.len -= 1;
        Some(value)
    }

    /// How many values it holds.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn values_are_found_by_their_id_until_removed() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_ne!(a, b);
        assert_eq!(s.get(a), Some(&"a"));
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_reused_slot_does_not_answer_the_old_id() {
        let mut s = Slab::default();
        let a = s.insert(1);
        assert_eq!(s.remove(a), Some(1));
        let b = s.insert(2);
        // Same slot, new generation: the stale id misses.
        assert_eq!(a & u64::from(u32::MAX), b & u64::from(u32::MAX));
        assert_ne!(a, b);
        assert_eq!(s.get(a), None);
        assert_eq!(s.get_mut(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(b), Some(&2));
    }

    #[test]
    fn freed_slots_are_reused_before_the_vector_grows() {
        let mut s = Slab::default();
        let ids: Vec<u64> = (0..100).map(|i| s.insert(i)).collect();
        for id in &ids {
            s.remove(*id);
        }
        for i in 0..100 {
            s.insert(i);
        }
        assert_eq!(s.slots.len(), 100);
        assert_eq!(s.len(), 100);
    }
}
