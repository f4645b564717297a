//! Segment header and the daemon-private allocator for blocks inside a
//! segment.
//!
//! A segment is one shared memfd mapping. Its first [`SEGMENT_HEADER_SIZE`]
//! bytes hold a [`SegmentHeader`]; FIFOs and message queues are carved out of
//! the rest by a [`SegmentAllocator`] that lives only in the daemon's private
//! memory, so an application can corrupt the blocks it was given but never
//! the bookkeeping.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Current ABI version; both sides must agree.
pub const ABI_VERSION: u32 = 5;
/// Magic at offset 0 of every segment: "HSTKSEG1" read as a little-endian
/// `u64`.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"HSTKSEG1");
/// Bytes reserved for the header at offset 0.
pub const SEGMENT_HEADER_SIZE: usize = 64;
/// Alignment (and size granularity) of every allocated block.
pub const SEGMENT_ALIGN: usize = 64;

/// The header at offset 0 of every segment (`#[repr(C)]`, 64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// [`SEGMENT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Segment id, as announced on the control socket.
    pub segment_id: u32,
    /// Total segment size in bytes, as announced on the control socket.
    pub size: u64,
    /// Reserved, zero.
    pub reserved: [u64; 5],
}

const _: () = assert!(std::mem::size_of::<SegmentHeader>() == SEGMENT_HEADER_SIZE);

/// Segment header and allocator errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum SegmentError {
    /// Not a hoststack segment.
    #[error("bad segment magic {0:#018x}")]
    BadMagic(u64),
    /// Written by a different ABI version.
    #[error("segment ABI version {0}, expected {ABI_VERSION}")]
    Version(u32),
    /// The header's id differs from the announced one.
    #[error("segment id {found} in header, expected {expected}")]
    IdMismatch {
        /// Announced id.
        expected: u32,
        /// Id in the header.
        found: u32,
    },
    /// The header's size differs from the mapped size.
    #[error("segment size {found} in header, expected {expected}")]
    SizeMismatch {
        /// Mapped size.
        expected: u64,
        /// Size in the header.
        found: u64,
    },
    /// The mapping cannot even hold a header.
    #[error("segment of {0} bytes is smaller than its header")]
    TooSmall(usize),
    /// [`SegmentAllocator::free`] of an offset that is already free.
    #[error("double free of segment offset {0}")]
    DoubleFree(u32),
    /// [`SegmentAllocator::free`] of an offset that was never allocated.
    #[error("free of unknown segment offset {0}")]
    UnknownOffset(u32),
}

impl SegmentHeader {
    /// Write a fresh header.
    ///
    /// # Safety
    /// `base` must point to at least [`SEGMENT_HEADER_SIZE`] writable bytes
    /// that nobody else accesses concurrently (alignment not required).
    pub unsafe fn init(base: *mut u8, id: u32, size: u64) {
        let h = SegmentHeader {
            magic: SEGMENT_MAGIC,
            abi_version: ABI_VERSION,
            segment_id: id,
            size,
            reserved: [0; 5],
        };
        // SAFETY: the caller guarantees room; the write is unaligned-safe.
        unsafe { base.cast::<SegmentHeader>().write_unaligned(h) };
    }

    /// Read the header of a mapping of `len` bytes (a copy: later writes by
    /// the peer do not affect it).
    ///
    /// # Safety
    /// `base` must point to at least `len` readable bytes.
    pub unsafe fn read(base: *const u8, len: usize) -> Result<Self, SegmentError> {
        if len < SEGMENT_HEADER_SIZE {
            return Err(SegmentError::TooSmall(len));
        }
        // SAFETY: `len >= SEGMENT_HEADER_SIZE` readable bytes per the caller;
        // every bit pattern is a valid `SegmentHeader` (plain integers).
        Ok(unsafe { base.cast::<SegmentHeader>().read_unaligned() })
    }

    /// Check a mapped segment of `len` bytes against the announced `id`:
    /// magic, ABI version, id and size must all match.
    ///
    /// # Safety
    /// `base` must point to at least `len` readable bytes.
    pub unsafe fn check(base: *const u8, len: usize, id: u32) -> Result<(), SegmentError> {
        // SAFETY: forwarded contract.
        let h = unsafe { Self::read(base, len) }?;
        h.validate(len, id)
    }

    /// Validate a header copy against the mapped `len` and announced `id`.
    pub fn validate(&self, len: usize, id: u32) -> Result<(), SegmentError> {
        if self.magic != SEGMENT_MAGIC {
            return Err(SegmentError::BadMagic(self.magic));
        }
        if self.abi_version != ABI_VERSION {
            return Err(SegmentError::Version(self.abi_version));
        }
        if self.segment_id != id {
            return Err(SegmentError::IdMismatch {
                expected: id,
                found: self.segment_id,
            });
        }
        if self.size != len as u64 {
            return Err(SegmentError::SizeMismatch {
                expected: len as u64,
                found: self.size,
            });
        }
        Ok(())
    }
}

/// Daemon-private allocator of [`SEGMENT_ALIGN`]-aligned blocks inside a
/// segment (never stored in the segment, so apps cannot corrupt it).
///
/// Best-fit over a free list indexed by size, with neighbouring free blocks
/// coalesced on free: O(log n) per operation, freed memory is always
/// reusable and a fully freed segment returns to one block. Offsets start at
/// [`SEGMENT_HEADER_SIZE`]; only offsets below 4 GiB are handed out.
#[derive(Debug, Clone)]
pub struct SegmentAllocator {
    /// Allocatable bytes (`end - SEGMENT_HEADER_SIZE`).
    capacity: usize,
    /// Free blocks by offset → length.
    free_by_off: BTreeMap<usize, usize>,
    /// Free blocks as (length, offset), for best fit.
    free_by_len: BTreeSet<(usize, usize)>,
    /// Live blocks by offset → length.
    live: HashMap<usize, usize>,
    used: usize,
}

impl SegmentAllocator {
    /// An allocator for a segment of `size` bytes (a trailing partial
    /// [`SEGMENT_ALIGN`] chunk is not used).
    pub fn new(size: usize) -> Self {
        let end = size.min(1 << 32) & !(SEGMENT_ALIGN - 1);
        let capacity = end.saturating_sub(SEGMENT_HEADER_SIZE);
        let mut a = SegmentAllocator {
            capacity,
            free_by_off: BTreeMap::new(),
            free_by_len: BTreeSet::new(),
            live: HashMap::new(),
            used: 0,
        };
        if capacity > 0 {
            a.insert_free(SEGMENT_HEADER_SIZE, capacity);
        }
        a
    }

    fn insert_free(&mut self, off: usize, len: usize) {
        self.free_by_off.insert(off, len);
        self.free_by_len.insert((len, off));
    }

    fn remove_free(&mut self, off: usize, len: usize) {
        self.free_by_off.remove(&off);
        self.free_by_len.remove(&(len, off));
    }

    /// Allocate `len` bytes (rounded up to [`SEGMENT_ALIGN`]); returns the
    /// block's 64-byte-aligned offset, or `None` if `len` is 0 or no free
    /// block is large enough.
    pub fn alloc(&mut self, len: usize) -> Option<u32> {
        if len == 0 {
            return None;
        }
        let need = len.checked_add(SEGMENT_ALIGN - 1)? & !(SEGMENT_ALIGN - 1);
        let &(blen, off) = self.free_by_len.range((need, 0)..).next()?;
        self.remove_free(off, blen);
        if blen > need {
            self.insert_free(off + need, blen - need);
        }
        self.live.insert(off, need);
        self.used += need;
        // `off < end <= 2^32` by construction.
        u32::try_from(off).ok()
    }

    /// Free a block returned by [`Self::alloc`], merging it with free
    /// neighbours. Unknown offsets and double frees are errors and leave the
    /// allocator unchanged.
    pub fn free(&mut self, offset: u32) -> Result<(), SegmentError> {
        let off = offset as usize;
        let Some(len) = self.live.remove(&off) else {
            let inside_free = self
                .free_by_off
                .range(..=off)
                .next_back()
                .is_some_and(|(&o, &l)| off < o + l);
            return Err(if inside_free {
                SegmentError::DoubleFree(offset)
            } else {
                SegmentError::UnknownOffset(offset)
            });
        };
        self.used -= len;
        let (mut start, mut size) = (off, len);
        if let Some((&po, &pl)) = self.free_by_off.range(..off).next_back() {
            if po + pl == off {
                self.remove_free(po, pl);
                start = po;
                size += pl;
            }
        }
        if let Some(&nl) = self.free_by_off.get(&(off + len)) {
            self.remove_free(off + len, nl);
            size += nl;
        }
        self.insert_free(start, size);
        Ok(())
    }

    /// Size of the live block at `offset` (rounded up), if any.
    pub fn block_len(&self, offset: u32) -> Option<usize> {
        self.live.get(&(offset as usize)).copied()
    }

    /// Bytes in live blocks (rounded up to [`SEGMENT_ALIGN`]).
    pub fn used(&self) -> usize {
        self.used
    }

    /// Free bytes in total (possibly fragmented; see
    /// [`Self::largest_free`]).
    pub fn free_bytes(&self) -> usize {
        self.capacity - self.used
    }

    /// The largest block [`Self::alloc`] could return right now.
    pub fn largest_free(&self) -> usize {
        self.free_by_len.last().map_or(0, |&(l, _)| l)
    }

    /// Total allocatable bytes (segment size minus header).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_errors() {
        let mut b = [0u8; 64];
        // SAFETY: 64-byte local buffer.
        unsafe {
            SegmentHeader::init(b.as_mut_ptr(), 3, 4096);
            assert_eq!(SegmentHeader::check(b.as_ptr(), 4096, 3), Ok(()));
            assert_eq!(
                SegmentHeader::check(b.as_ptr(), 4096, 4),
                Err(SegmentError::IdMismatch {
                    expected: 4,
                    found: 3
                })
            );
            assert_eq!(
                SegmentHeader::check(b.as_ptr(), 8192, 3),
                Err(SegmentError::SizeMismatch {
                    expected: 8192,
                    found: 4096
                })
            );
            assert_eq!(
                SegmentHeader::check(b.as_ptr(), 32, 3),
                Err(SegmentError::TooSmall(32))
            );
        }
        assert_eq!(&b[..8], b"HSTKSEG1");
        b[8] = 9;
        // SAFETY: as above.
        let r = unsafe { SegmentHeader::check(b.as_ptr(), 4096, 3) };
        assert_eq!(r, Err(SegmentError::Version(9)));
        b[0] = 0;
        // SAFETY: as above.
        let r = unsafe { SegmentHeader::check(b.as_ptr(), 4096, 3) };
        assert!(matches!(r, Err(SegmentError::BadMagic(_))));
    }

    #[test]
    fn alloc_free_reuse_and_bounds() {
        let mut a = SegmentAllocator::new(64 + 10 * 1024);
        assert_eq!(a.capacity(), 10 * 1024);
        let mut offs = Vec::new();
        while let Some(o) = a.alloc(1000) {
            assert_eq!(o % 64, 0);
            assert!(o as usize >= SEGMENT_HEADER_SIZE);
            assert_eq!(a.block_len(o), Some(1024));
            offs.push(o);
        }
        assert_eq!(offs.len(), 10);
        assert_eq!(a.free_bytes(), 0);
        assert_eq!(a.alloc(1), None);
        assert_eq!(a.alloc(0), None);
        assert_eq!(a.alloc(usize::MAX), None);
        for _ in 0..200 {
            let o = offs.pop().unwrap();
            a.free(o).unwrap();
            assert_eq!(a.free(o), Err(SegmentError::DoubleFree(o)));
            offs.push(a.alloc(1000).expect("freed block reused"));
        }
        assert_eq!(a.free(12_345), Err(SegmentError::UnknownOffset(12_345)));
        assert_eq!(a.free(0), Err(SegmentError::UnknownOffset(0)));
        assert_eq!(
            a.free(offs[0] + 64),
            Err(SegmentError::UnknownOffset(offs[0] + 64))
        );
    }

    #[test]
    fn coalescing_returns_to_one_block() {
        let mut a = SegmentAllocator::new(1 << 20);
        let cap = a.capacity();
        let mut offs: Vec<u32> = (0..100)
            .map(|i| a.alloc(64 * (i % 7 + 1)).unwrap())
            .collect();
        // Free in an interleaved order so merges happen on both sides.
        offs.sort_by_key(|o| (o / 64) % 3);
        for o in offs {
            a.free(o).unwrap();
        }
        assert_eq!(a.used(), 0);
        assert_eq!(a.largest_free(), cap);
        assert_eq!(a.alloc(cap), Some(SEGMENT_HEADER_SIZE as u32));
    }

    #[test]
    fn tiny_segments_do_not_underflow() {
        for size in [0, 1, 63, 64, 127] {
            let mut a = SegmentAllocator::new(size);
            assert_eq!(a.capacity(), 0);
            assert_eq!(a.free_bytes(), 0);
            assert_eq!(a.alloc(1), None);
            assert_eq!(a.free(64), Err(SegmentError::UnknownOffset(64)));
        }
        let mut a = SegmentAllocator::new(128);
        assert_eq!(a.alloc(64), Some(64));
        assert_eq!(a.alloc(1), None);
    }

    /// Random alloc/free against a byte-ownership model: blocks never
    /// overlap, stay in bounds and aligned, and accounting is exact.
    #[test]
    fn random_model() {
        const SIZE: usize = 256 * 1024;
        let mut a = SegmentAllocator::new(SIZE);
        let mut owner = vec![false; SIZE / 64];
        let mut live: Vec<(u32, usize)> = Vec::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (x >> 4) & 3 != 0 || live.is_empty() {
                let len = (x >> 8) as usize % 9000 + 1;
                if let Some(o) = a.alloc(len) {
                    let o = o as usize;
                    assert_eq!(o % 64, 0);
                    let n = len.div_ceil(64);
                    assert!(o >= 64 && o + n * 64 <= SIZE);
                    for c in &mut owner[o / 64..o / 64 + n] {
                        assert!(!*c, "overlap");
                        *c = true;
                    }
                    live.push((o as u32, n));
                } else {
                    assert!(a.largest_free() < len);
                }
            } else {
                let (o, n) = live.swap_remove((x >> 8) as usize % live.len());
                a.free(o).unwrap();
                owner[o as usize / 64..o as usize / 64 + n].fill(false);
            }
            assert_eq!(a.used(), live.iter().map(|l| l.1 * 64).sum::<usize>());
        }
        for (o, _) in live {
            a.free(o).unwrap();
        }
        assert_eq!(a.largest_free(), a.capacity());
    }
}
