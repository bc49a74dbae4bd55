//! Attributing async tasks: enter an engine on every poll.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::{EngineGuard, EngineId};

pin_project_lite::pin_project! {
    /// A future that runs every poll of the inner future (and its drop) inside an
    /// [`EngineGuard`], so its allocations are attributed to one engine whichever worker
    /// thread polls it. Made by [`EngineExt::in_engine`].
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct InEngine<F> {
        #[pin]
        inner: F,
        engine: EngineId,
    }

    impl<F> PinnedDrop for InEngine<F> {
        fn drop(this: Pin<&mut Self>) {
            // The inner future is dropped after this body; its frees are credited to the
            // owners by address anyway, but allocations made while it drops are the engine's.
            let _guard = EngineGuard::enter(this.engine);
        }
    }
}

impl<F: Future> Future for InEngine<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _guard = EngineGuard::enter(*this.engine);
        this.inner.poll(cx)
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
            inner: self,
            engine,
        }
    }
}

impl<F: Future> EngineExt for F {}
