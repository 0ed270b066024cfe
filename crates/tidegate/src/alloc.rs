//! The process's allocator: mimalloc, called the way std calls the system
//! allocator. A layout whose alignment the size already gives (at most 16
//! bytes, and no more than the size) takes plain `mi_malloc`, which
//! mimalloc guarantees is aligned that far (`mi_malloc_is_naturally_aligned`
//! in its source); only larger alignments take the `_aligned` calls. The
//! `mimalloc` crate sends every allocation down the aligned path, which cost
//! about 60 instructions an allocation more here (`scripts/bench-instructions.sh`).
//!
//! Why mimalloc at all: a proxied request allocates about 19 times (hyper's
//! read buffers among them), and glibc's malloc spent some 4 800
//! instructions a request on that against mimalloc's 2 000.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};

use libmimalloc_sys as mi;

/// `MI_MAX_ALIGN_SIZE`: mimalloc aligns a block of at least this size this far.
const MIN_ALIGN: usize = 16;

/// mimalloc as the global allocator.
#[derive(Debug)]
pub(crate) struct MiMalloc;

/// Whether plain `mi_malloc(size)` is aligned enough for `align`.
fn natural(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

// SAFETY: every call hands mimalloc a size (and, on the aligned path, a
// power-of-two alignment) from a valid `Layout`; a pointer is only ever
// freed or resized by mimalloc, which allocated it; mimalloc returns null
// on failure, as `GlobalAlloc` requires.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if natural(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if natural(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if natural(layout.align(), new_size) {
            mi::mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
        }
    }
}

/// Transparent huge pages off for the process, before its first
/// allocation. mimalloc asks for them on its arenas (`madvise`), and then
/// every 2 MiB of an arena it touches is resident whole: under load the
/// gateway's peak RSS was 26 to 28 MiB with them and is 15 MiB without,
/// for no CPU per request that `bench-proxy.sh` could tell apart (side by
/// side, one worker). This is what `MIMALLOC_ALLOW_THP=0` does, done
/// before `main` because mimalloc reads its options when it loads.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static NO_HUGE_PAGES: extern "C" fn() = no_huge_pages;

#[cfg(target_os = "linux")]
extern "C" fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and sets one flag
    // of the process; nothing is read or written through a pointer.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::MiMalloc;

    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off_before_main() {
        // SAFETY: PR_GET_THP_DISABLE reads one flag of the process.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }

    #[test]
    fn every_block_has_its_layouts_alignment_through_growth() {
        for align in [1, 2, 8, 16, 32, 64, 4096] {
            for size in [1, 7, 8, 12, 16, 24, 40, 100, 1000, 5000, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; the block is freed by the same allocator.
                unsafe {
                    let p = MiMalloc.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xa5, size);
                    let q = MiMalloc.realloc(p, layout, size * 3);
                    assert_eq!(q as usize % align, 0, "grown {size} align {align}");
                    assert_eq!(*q.add(size - 1), 0xa5, "contents kept");
                    MiMalloc.dealloc(q, Layout::from_size_align(size * 3, align).unwrap());
                    let z = MiMalloc.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    MiMalloc.dealloc(z, layout);
                }
            }
        }
    }
}
