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

    /// Allocates `layout` for the engine without admission (zero-sized requests get a dangling,
    /// aligned pointer) and charges it when the global allocator does not.
    fn place(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            let dangling = NonNull::new(layout.align() as *mut u8).ok_or(AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(dangling, 0));
        }
        let ptr = {
            let _guard = EngineGuard::enter(self.engine);
            // SAFETY: non-zero size (checked above). This is the global allocator (the governed
            // one when installed), which charges the block to the guard's engine.
            unsafe { std::alloc::alloc(layout) }
        };
        let ptr = NonNull::new(ptr).ok_or(AllocError)?;
        if !self.allocator_charges() {
            self.gov.charge(self.engine, layout.size() as u64);
        }
        Ok(NonNull::slice_from_raw_parts(ptr, layout.size()))
    }

    /// Copies `len` bytes of the block at `ptr` into `fresh`, frees the old block, returns
    /// `fresh`.
    ///
    /// # Safety
    /// `ptr` is live for `old` and was allocated by this handle; `fresh` is a distinct block of
    /// at least `len` bytes; `len <= old.size()`.
    unsafe fn move_block(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        fresh: NonNull<[u8]>,
        len: usize,
    ) -> NonNull<[u8]> {
        // SAFETY: per the contract, both blocks are valid for `len` bytes and do not overlap,
        // and `ptr` may be deallocated with `old`.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.cast().as_ptr(), len);
            self.deallocate(ptr, old);
        }
        fresh
    }

    /// Credits memory this handle charged itself (standalone governors only): exactly what was
    /// charged for it, so it cannot be refused.
    fn uncharge(&self, bytes: u64) {
        if !self.allocator_charges() {
            let credited = self.gov.credit(self.engine, bytes);
            debug_assert!(credited.is_ok(), "{credited:?}");
        }
    }
}

// SAFETY: `allocate` returns blocks from the global allocator with exactly the requested
// layout (or a dangling, aligned pointer for zero-sized requests, never passed on), and
// `deallocate` returns each block to it with the layout it was allocated with, as
// `allocator-api2` requires. Clones share the governor, so a block may be freed through any of
// them.
unsafe impl Allocator for EngineAllocator {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let admission = self
            .gov
            .reserve(self.engine, layout.size() as u64)
            .map_err(|_| AllocError)?;
        let block = self.place(layout);
        drop(admission);
        block
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 || old.align() != new.align() {
            let fresh = self.allocate(new)?;
            // SAFETY: `ptr` is live for `old` (the caller's contract); `fresh` holds at least
            // `old.size()` bytes.
            return Ok(unsafe { self.move_block(ptr, old, fresh, old.size()) });
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
            let fresh = self.place(new)?;
            // SAFETY: `ptr` is live for `old` (the caller's contract); `fresh` holds
            // `new.size()` bytes, no more than `old.size()`.
            return Ok(unsafe { self.move_block(ptr, old, fresh, new.size()) });
        }
        // SAFETY: `ptr` is live for `old` (the caller's contract); `new.size()` is non-zero,
        // not larger than `old.size()`, with the same alignment.
        let q = unsafe { std::alloc::realloc(ptr.as_ptr(), old, new.size()) };
        let q = NonNull::new(q).ok_or(AllocError)?;
        self.uncharge((old.size() - new.size()) as u64);
        Ok(NonNull::slice_from_raw_parts(q, new.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        // SAFETY: `ptr` was allocated by `allocate` above, through the global allocator, with
        // this layout.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        self.uncharge(layout.size() as u64);
    }
}
