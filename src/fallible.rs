//! A per-engine `allocator-api2` allocator that refuses past the engine's budget.

use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};

use crate::governor::MemoryGovernor;
use crate::{EngineGuard, EngineId};

/// An allocator handle for one engine whose `allocate` fails with [`AllocError`] when the
/// request does not fit the engine's budget (or the global ceiling), instead of going over it.
/// Collections built on `allocator-api2` — `allocator_api2::vec::Vec`,
/// `hashbrown::HashMap` with its `allocator-api2` feature — then fail cleanly from
/// `try_reserve` / `try_insert`-style calls, and the caller can spill.
///
/// Use it for the data structures that grow with the input (hash tables of a GROUP BY, sort
/// buffers, ingest batches): there, a refusal is a signal to act on. Ordinary allocations
/// elsewhere keep using the global allocator, which never refuses (over budget it counts the
/// excess and raises pressure).
///
/// Admission is a reservation of the request's size, held only while the block is allocated
/// under the engine's guard. With an installed governor the global allocator then charges the
/// block, and the reservation is released, so no byte counts twice for longer than that
/// instant. With a standalone governor (no global allocator bound) the handle charges and
/// credits the block itself.
///
/// ```
/// use allocator_api2::vec::Vec;
/// use nodedb_mem::{EngineAllocator, EngineId, MemoryGovernor};
///
/// let gov = MemoryGovernor::builder()
///     .global_ceiling(64 << 20)
///     .budget(EngineId::Query, 1u64 << 20)
///     .build()?;
/// let mut v: Vec<u8, _> = Vec::new_in(EngineAllocator::new(&gov, EngineId::Query));
/// assert!(v.try_reserve_exact(512 << 10).is_ok());
/// assert!(v.try_reserve_exact(2 << 20).is_err()); // past the 1 MiB budget: refused
/// assert_eq!(gov.usage(EngineId::Query), 512 << 10);
/// # Ok::<(), nodedb_mem::MemError>(())
/// ```
#[derive(Clone)]
pub struct EngineAllocator {
    gov: MemoryGovernor,
    engine: EngineId,
}

impl fmt::Debug for EngineAllocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineAllocator")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl EngineAllocator {
    /// A handle that allocates for `engine` under `gov`'s budgets.
    pub fn new(gov: &MemoryGovernor, engine: EngineId) -> EngineAllocator {
        EngineAllocator {
            gov: gov.clone(),
            engine,
        }
    }

    /// The engine this handle allocates for.
    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// Whether the global allocator charges what this handle allocates (an installed
    /// governor); otherwise the handle charges it itself.
    fn allocator_charges(&self) -> bool {
        self.gov.is_installed()
    }
}

// SAFETY: `allocate` returns blocks from the global allocator with exactly the requested
// layout (or a dangling, aligned pointer for zero-sized requests, never passed on), and
// `deallocate` returns each block to it with the layout it was allocated with, as
// `allocator-api2` requires. Clones share the governor, so a block may be freed through any of
// them.
unsafe impl Allocator for EngineAllocator {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            let dangling = NonNull::new(layout.align() as *mut u8).ok_or(AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(dangling, 0));
        }
        let bytes = layout.size() as u64;
        let admission = self
            .gov
            .reserve(self.engine, bytes)
            .map_err(|_| AllocError)?;
        let ptr = {
            let _guard = EngineGuard::enter(self.engine);
            // SAFETY: non-zero size (checked above). This is the global allocator (the governed
            // one when installed), which charges the block to the guard's engine.
            unsafe { std::alloc::alloc(layout) }
        };
        let ptr = NonNull::new(ptr).ok_or(AllocError)?;
        if !self.allocator_charges() {
            self.gov.charge(self.engine, bytes);
        }
        drop(admission);
        Ok(NonNull::slice_from_raw_parts(ptr, layout.size()))
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 || old.align() != new.align() {
            let fresh = self.allocate(new)?;
            // SAFETY: both blocks are valid for `old.size()` bytes and do not overlap; the old
            // one was allocated here with `old`.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.cast().as_ptr(), old.size());
                self.deallocate(ptr, old);
            }
            return Ok(fresh);
        }
        // Admission for the growth only; `realloc` keeps the block's owner.
        let extra = (new.size() - old.size()) as u64;
        let admission = self
            .gov
            .reserve(self.engine, extra)
            .map_err(|_| AllocError)?;
        // SAFETY: `ptr` is live for `old` (the caller's contract), `new.size()` is non-zero and
        // not smaller than `old.size()`, and the alignment is unchanged.
        let q = unsafe { std::alloc::realloc(ptr.as_ptr(), old, new.size()) };
        let q = NonNull::new(q).ok_or(AllocError)?;
        if !self.allocator_charges() {
            self.gov.charge(self.engine, extra);
        }
        drop(admission);
        Ok(NonNull::slice_from_raw_parts(q, new.size()))
    }

    /// Shrinking never asks for admission (it gives memory back), so it succeeds even when the
    /// engine is over its budget.
    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if new.size() == 0 || old.align() != new.align() {
            // SAFETY: `ptr` is live for `old`; the new block is at least `new.size()` long.
            unsafe {
                let fresh = if new.size() == 0 {
                    self.allocate(new)?
                } else {
                    let _guard = EngineGuard::enter(self.engine);
                    let p = NonNull::new(std::alloc::alloc(new)).ok_or(AllocError)?;
                    if !self.allocator_charges() {
                        self.gov.charge(self.engine, new.size() as u64);
                    }
                    NonNull::slice_from_raw_parts(p, new.size())
                };
                std::ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.cast().as_ptr(), new.size());
                self.deallocate(ptr, old);
                return Ok(fresh);
            }
        }
        // SAFETY: `ptr` is live for `old` (the caller's contract); `new.size()` is non-zero,
        // not larger than `old.size()`, with the same alignment.
        let q = unsafe { std::alloc::realloc(ptr.as_ptr(), old, new.size()) };
        let q = NonNull::new(q).ok_or(AllocError)?;
        if !self.allocator_charges() {
            // What `allocate`/`grow` charged for the released part: cannot be refused.
            let credited = self
                .gov
                .credit(self.engine, (old.size() - new.size()) as u64);
            debug_assert!(credited.is_ok(), "{credited:?}");
        }
        Ok(NonNull::slice_from_raw_parts(q, new.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // SAFETY: `ptr` was allocated by `allocate` above, through the global allocator, with
        // this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        if !self.allocator_charges() {
            // Exactly what `allocate` charged for this block: cannot be refused.
            let credited = self.gov.credit(self.engine, layout.size() as u64);
            debug_assert!(credited.is_ok(), "{credited:?}");
        }
    }
}
