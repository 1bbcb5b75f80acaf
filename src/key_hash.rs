//! Maps keyed by what we choose ourselves: ids (handed out in sequence) and
//! addresses (spread by the allocator). No adversary picks these keys, so
//! the standard library's SipHash, built against such keys, is not needed;
//! it was a fifth of an interrupt's instructions (hook and caller together).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by an id or an address.
pub type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// Hashes one integer by multiplying it with a large odd constant (the
/// golden ratio's) and rotating: the product's high bits, which depend on
/// every bit of the key, end up low, where the table picks its bucket.
#[derive(Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_usize(&mut self, address: usize) {
        self.write_u64(address as u64);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}
