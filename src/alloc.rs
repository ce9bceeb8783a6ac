//! The global allocator: mimalloc, for every binary built on this crate (the proxy, its
//! tests and benchmarks, so they measure what production runs).
//!
//! Against glibc's malloc it takes a tenth of the instructions off a login, whose task and
//! I/O registration are cache-line aligned allocations that glibc serves slowly. Built with
//! `no_thp`, it turns transparent huge pages off for the process: with them, idle clients
//! cost twice the memory.
//!
//! The `mimalloc` crate's allocator enters mimalloc through its aligned functions for every
//! layout; for blocks over 1 KiB (the buffers) those take a generic path before the plain
//! one. Ordinary layouts go straight to `mi_malloc` here, by the rule mimalloc applies
//! itself: an alignment up to 16 bytes and no larger than the size is met by every block.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

pub struct MiMalloc;

/// mimalloc's `MI_MAX_ALIGN_SIZE`.
const NATURAL_ALIGN: usize = 16;

fn natural(align: usize, size: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

// SAFETY: every function passes the layout's size and alignment to the mimalloc entry point
// that honours them (the plain ones only where mimalloc guarantees the alignment), and
// frees with mi_free, which takes blocks of all of them.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if natural(layout.align(), layout.size()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if natural(layout.align(), layout.size()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of the functions above.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; the new block keeps the old alignment.
        unsafe {
            if natural(layout.align(), new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_gets_its_alignment() {
        let a = MiMalloc;
        for align in [1, 2, 8, 16, 32, 64, 4096] {
            for size in [1, 7, 8, 16, 24, 100, 1024, 1025, 8192, 100_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; freed with the same allocator.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xa5, size);
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {size} align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    let grown = a.realloc(p, layout, size * 3);
                    assert_eq!(grown as usize % align, 0, "realloc {size} align {align}");
                    assert!(
                        std::slice::from_raw_parts(grown, size)
                            .iter()
                            .all(|&b| b == 0xa5)
                    );
                    a.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
