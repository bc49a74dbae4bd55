//! Attributing async tasks: enter an engine on every poll.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::{EngineGuard, EngineId};

pin_project_lite::pin_project! {
    /// A future that runs every poll of the inner future, and its drop, inside an
    /// [`EngineGuard`], so its allocations are attributed to one engine whichever worker
    /// thread polls or drops it. Made by [`EngineExt::in_engine`].
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct InEngine<F> {
        // Dropped by hand inside the guard (as `tracing`'s `Instrumented` does with its span):
        // a field's own drop would run after the guard is gone.
        #[pin]
        inner: ManuallyDrop<F>,
        engine: EngineId,
    }

    impl<F> PinnedDrop for InEngine<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let _guard = EngineGuard::enter(*this.engine);
            // SAFETY: 1. `inner` is dropped exactly once: here, and `ManuallyDrop` keeps it
            // from being dropped again with the struct; 2. it is dropped in place, never moved
            // out of its pinned location (`get_unchecked_mut` only gives the reference);
            // 3. nothing uses it after this line.
            unsafe { ManuallyDrop::drop(this.inner.get_unchecked_mut()) }
        }
    }
}

impl<F: Future> Future for InEngine<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _guard = EngineGuard::enter(*this.engine);
        // SAFETY: projecting `Pin<&mut ManuallyDrop<F>>` to `Pin<&mut F>` is structural:
        // `ManuallyDrop` is a transparent wrapper, `inner` is never moved out (it is dropped
        // in place by `PinnedDrop`), and no `&mut F` is handed out elsewhere.
        let inner = unsafe { this.inner.map_unchecked_mut(|f| &mut **f) };
        inner.poll(cx)
    }
}

/// Attributes a future's allocations to an engine, like `tracing`'s `Instrument`.
///
/// ```
/// use nodedb_mem::{EngineExt, EngineId, current_engine};
///
/// let task = async { current_engine() }.in_engine(EngineId::Vector);
/// # let engine = futures_lite_block_on(task);
/// # assert_eq!(engine, EngineId::Vector);
/// # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     let waker = std::task::Waker::noop();
/// #     let mut cx = std::task::Context::from_waker(&waker);
/// #     let mut f = std::pin::pin!(f);
/// #     loop {
/// #         if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; }
/// #     }
/// # }
/// ```
pub trait EngineExt: Sized {
    /// Wraps `self` so every poll runs inside `EngineGuard::enter(engine)`.
    fn in_engine(self, engine: EngineId) -> InEngine<Self> {
        InEngine {
            inner: ManuallyDrop::new(self),
            engine,
        }
    }
}

impl<F: Future> EngineExt for F {}
