//! The controller's clock: the system's, or one a test (or a dry run) moves by hand. Pauses,
//! promotion windows and measurement schedules all read it, so time can be driven through it.

use std::sync::{Arc, Mutex, PoisonError};

use futures::Stream;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;

#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// `None`: the system clock.
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    now: Mutex<Timestamp>,
    moved: watch::Sender<()>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that stands at `start` until [`Clock::set`] moves it.
    pub fn manual(start: Timestamp) -> Clock {
        Clock {
            manual: Some(Arc::new(Manual {
                now: Mutex::new(start),
                moved: watch::channel(()).0,
            })),
        }
    }

    pub fn now(&self) -> Timestamp {
        match &self.manual {
            None => Timestamp::now(),
            Some(m) => *m.now.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    /// Moves a manual clock (a system clock ignores it) and tells [`Clock::moves`].
    pub fn set(&self, to: Timestamp) {
        if let Some(m) = &self.manual {
            *m.now.lock().unwrap_or_else(PoisonError::into_inner) = to;
            m.moved.send_replace(());
        }
    }

    /// Yields whenever a manual clock is moved: what was due by then is looked at again. Never
    /// yields for the system clock, whose time passes by itself.
    pub fn moves(&self) -> impl Stream<Item = ()> + Send + 'static {
        let rx = self.manual.as_ref().map(|m| m.moved.subscribe());
        futures::stream::unfold(rx, |rx| async move {
            let mut rx = rx?;
            rx.changed().await.ok()?;
            Some(((), Some(rx)))
        })
    }
}
