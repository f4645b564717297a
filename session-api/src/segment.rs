//! Segment header and the daemon-private allocator for blocks inside a
//! segment.

/// Current ABI version; both sides must agree.
pub const ABI_VERSION: u32 = 1;
/// Magic at offset 0 of every segment: "HSTKSEG1".
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"HSTKSEG1");
/// Bytes reserved for the header.
pub const SEGMENT_HEADER_SIZE: usize = 64;
const ALIGN: usize = 64;

/// The header at offset 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SegmentHeader {
    /// [`SEGMENT_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Segment id.
    pub segment_id: u32,
    /// Total size in bytes.
    pub size: u64,
    /// Reserved (zero).
    pub reserved: [u64; 5],
}

/// Header validation errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    /// Not a hoststack segment.
    #[error("bad segment magic")]
    BadMagic,
    /// Different ABI.
    #[error("segment ABI version {0}, expected {ABI_VERSION}")]
    Version(u32),
    /// Id or size disagree with what was announced.
    #[error("segment header mismatch: {0}")]
    Mismatch(&'static str),
    /// Allocator misuse.
    #[error("invalid free of offset {0}")]
    BadFree(u32),
}

impl SegmentHeader {
    /// Write a header.
    ///
    /// # Safety
    /// `base` must point to at least [`SEGMENT_HEADER_SIZE`] writable bytes.
    pub unsafe fn init(base: *mut u8, id: u32, size: u64) {
        let h = SegmentHeader {
            magic: SEGMENT_MAGIC,
            abi_version: ABI_VERSION,
            segment_id: id,
            size,
            reserved: [0; 5],
        };
        // SAFETY: caller guarantees room; unaligned write for generality.
        unsafe { (base as *mut SegmentHeader).write_unaligned(h) };
    }

    /// Check a mapped segment against what was announced.
    ///
    /// # Safety
    /// `base` must point to at least [`SEGMENT_HEADER_SIZE`] readable bytes.
    pub unsafe fn check(base: *const u8, len: usize, id: u32) -> Result<(), SegmentError> {
        // SAFETY: caller guarantees the header is readable.
        let h = unsafe { (base as *const SegmentHeader).read_unaligned() };
        if h.magic != SEGMENT_MAGIC {
            return Err(SegmentError::BadMagic);
        }
        if h.abi_version != ABI_VERSION {
            return Err(SegmentError::Version(h.abi_version));
        }
        if h.segment_id != id {
            return Err(SegmentError::Mismatch("id"));
        }
        if h.size != len as u64 {
            return Err(SegmentError::Mismatch("size"));
        }
        Ok(())
    }
}

/// Daemon-private allocator of 64-byte aligned blocks (never stored in the
/// segment, so apps cannot corrupt it). Exact-size free lists over a bump
/// pointer: FIFO blocks come in a few sizes, and freed blocks are reused.
#[derive(Debug)]
pub struct SegmentAllocator {
    size: usize,
    bump: usize,
    live: std::collections::HashMap<u32, usize>,
    free: std::collections::HashMap<usize, Vec<u32>>,
    used: usize,
}

impl SegmentAllocator {
    /// For a segment of `size` bytes.
    pub fn new(size: usize) -> Self {
        SegmentAllocator {
            size,
            bump: SEGMENT_HEADER_SIZE,
            live: Default::default(),
            free: Default::default(),
            used: SEGMENT_HEADER_SIZE,
        }
    }

    /// Allocate `len` bytes; the offset is 64-byte aligned.
    pub fn alloc(&mut self, len: usize) -> Option<u32> {
        let len = len.checked_add(ALIGN - 1)? & !(ALIGN - 1);
        if len == 0 {
            return None;
        }
        let off = match self.free.get_mut(&len).and_then(|v| v.pop()) {
            Some(o) => o,
            None => {
                let end = self.bump.checked_add(len)?;
                if end > self.size || end > u32::MAX as usize {
                    return None;
                }
                let o = self.bump as u32;
                self.bump = end;
                o
            }
        };
        self.live.insert(off, len);
        self.used += len;
        Some(off)
    }

    /// Free a block returned by [`SegmentAllocator::alloc`].
    pub fn free(&mut self, off: u32) -> Result<(), SegmentError> {
        let len = self.live.remove(&off).ok_or(SegmentError::BadFree(off))?;
        self.used -= len;
        self.free.entry(len).or_default().push(off);
        Ok(())
    }

    /// Bytes in use (header included).
    pub fn used(&self) -> usize {
        self.used
    }

    /// Bytes never yet handed out plus freed bytes.
    pub fn free_bytes(&self) -> usize {
        self.size - self.used
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
            assert_eq!(SegmentHeader::check(b.as_ptr(), 4096, 4), Err(SegmentError::Mismatch("id")));
            assert_eq!(SegmentHeader::check(b.as_ptr(), 8192, 3), Err(SegmentError::Mismatch("size")));
            b[8] = 9;
            assert_eq!(SegmentHeader::check(b.as_ptr(), 4096, 3), Err(SegmentError::Version(9)));
            b[0] = 0;
            assert_eq!(SegmentHeader::check(b.as_ptr(), 4096, 3), Err(SegmentError::BadMagic));
        }
    }

    #[test]
    fn alloc_free_reuse_and_bounds() {
        let mut a = SegmentAllocator::new(64 + 10 * 1024);
        let mut offs = Vec::new();
        while let Some(o) = a.alloc(1000) {
            assert_eq!(o % 64, 0);
            assert!(o as usize >= SEGMENT_HEADER_SIZE);
            offs.push(o);
        }
        assert_eq!(offs.len(), 10);
        assert!(a.alloc(1).is_none() || a.free_bytes() > 0);
        for _ in 0..200 {
            let o = offs.pop().unwrap();
            a.free(o).unwrap();
            assert_eq!(a.free(o), Err(SegmentError::BadFree(o)), "double free");
            offs.push(a.alloc(1000).expect("freed block reused"));
        }
        assert_eq!(a.free(12345), Err(SegmentError::BadFree(12345)));
    }
}
