//! An allocator for binaries (feature `mimalloc`): mimalloc, set to keep freed memory for reuse.
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: ldm::alloc::MiMalloc = ldm::alloc::MiMalloc;
//!
//! fn main() {
//!     ldm::alloc::keep_freed_memory();
//!     // ...
//! }
//! ```
//!
//! glibc's malloc and mimalloc's default purging hand large buffers back to the OS soon after they
//! are freed, and the next step's tensors then fault in freshly zeroed pages. Measured on a 2-core
//! machine, a quarter of an SD UNet training step went to the kernel's page clearing (`ldm bench
//! --workload unet-train-32`: 15.2 s with glibc, 9.8 s with this, peak 7.6 GiB → 8.4 GiB; the
//! inference step `unet-32` 3.7 s → 2.9 s). The cost: the resident size no longer shrinks after a
//! peak. The `ldm` binary and the examples use it.

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (libmimalloc-sys names the options around
/// it, 14 and 16, but not this one).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Turns mimalloc's purging of freed memory off, unless `MIMALLOC_PURGE_DELAY` is set (then that
/// wins). The option's default, 10 ms in mimalloc 2 and 1000 ms in mimalloc 3, is checked first,
/// so a different option at that index is left alone; 1000 ms is not enough, a training step is
/// longer. Only has an effect when [`MiMalloc`] is the global allocator.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: reading and setting a mimalloc option by index; no pointers involved.
    unsafe {
        if matches!(
            libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            10 | 1000
        ) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}
