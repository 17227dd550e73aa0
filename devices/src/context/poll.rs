//! Adaptive polling of an iothread's loop, after QEMU's (`-object iothread,poll-max-ns=,
//! poll-grow=,poll-shrink=`): before it blocks in `epoll_wait`, the loop polls its sources (every
//! registered descriptor: the virtqueues' ioeventfds, the disks' completion eventfds, the wake-up
//! eventfd of bottom halves) with non-blocking waits for up to a window of time, so that
//! an event arriving soon is picked up without the thread going to sleep and being woken; and it
//! asks the polled handlers' sources (the virtqueues' avail rings) whether they have work, which
//! lets a queue leave the guest's notifications off while the loop polls (poll mode, see
//! [`super::Context::polling`]).
//!
//! Each source has a window of its own (every registered descriptor, and the wake-up of bottom
//! halves), and the loop polls for the longest, as QEMU's handlers each have theirs: a source's
//! window adapts only to its own events, so a source whose events come late (a rare bottom
//! half) does not stop the loop polling for one whose events come soon (a busy queue's
//! requests or completions). A window adapts to how long the loop waited before that event,
//! `block_ns` (polling and blocking together), as QEMU's does: an event within the window
//! leaves it as it is; one that came later than `poll-max-ns` shrinks it (divided by
//! `poll-shrink`, or back to zero when that is 0); one that came after the window but within
//! `poll-max-ns` grows it (multiplied by `poll-grow`, 2 when that is 0, starting from 4 µs),
//! never past `poll-max-ns`. `poll-max-ns=0` turns polling off: the loop blocks at once.
//!
//! The settings are atomics shared by the iothread and whoever changes them at run time (QMP
//! `qom-set`): the loop reads them once per iteration and restarts every window from zero when
//! they change. Polling holds no lock (the context is acquired only to dispatch), so a thread
//! crossing over to the context is never held up by it, and a bottom half or a stop request
//! ends it as soon as its descriptor becomes ready.

use std::sync::atomic::{AtomicU64, Ordering};

/// QEMU's default `poll-max-ns`.
const DEFAULT_POLL_MAX_NS: u64 = 32_768;
/// The window a growing poll starts from, in nanoseconds (QEMU's 4 µs).
const INITIAL_WINDOW_NS: u64 = 4_000;
/// What a `poll-grow` of 0 multiplies the window by.
const DEFAULT_GROW: u64 = 2;

/// An iothread's polling settings, as `-object iothread` sets them and `qom-set` changes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollSettings {
    /// The longest window, in nanoseconds; 0 turns polling off.
    pub max_ns: u64,
    /// What the window is multiplied by when it grows; 0 means 2.
    pub grow: u64,
    /// What the window is divided by when it shrinks; 0 means back to no window.
    pub shrink: u64,
    /// The most requests an engine should submit at once; 0 means the engine's own choice.
    pub aio_max_batch: u64,
}

impl Default for PollSettings {
    /// QEMU's defaults.
    fn default() -> Self {
        PollSettings {
            max_ns: DEFAULT_POLL_MAX_NS,
            grow: 0,
            shrink: 0,
            aio_max_batch: 0,
        }
    }
}

impl PollSettings {
    /// The value of one setting.
    pub fn get(&self, setting: PollSetting) -> u64 {
        match setting {
            PollSetting::MaxNs => self.max_ns,
            PollSetting::Grow => self.grow,
            PollSetting::Shrink => self.shrink,
            PollSetting::AioMaxBatch => self.aio_max_batch,
        }
    }

    /// Changes one setting.
    pub fn set(&mut self, setting: PollSetting, value: u64) {
        let field = match setting {
            PollSetting::MaxNs => &mut self.max_ns,
            PollSetting::Grow => &mut self.grow,
            PollSetting::Shrink => &mut self.shrink,
            PollSetting::AioMaxBatch => &mut self.aio_max_batch,
        };
        *field = value;
    }
}

/// One of the settings, by its QEMU property name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollSetting {
    /// `poll-max-ns`.
    MaxNs,
    /// `poll-grow`.
    Grow,
    /// `poll-shrink`.
    Shrink,
    /// `aio-max-batch`.
    AioMaxBatch,
}

impl PollSetting {
    /// Every setting, in the order `qom-list` gives them.
    pub const ALL: [PollSetting; 4] = [
        PollSetting::AioMaxBatch,
        PollSetting::MaxNs,
        PollSetting::Grow,
        PollSetting::Shrink,
    ];

    /// The QEMU property name.
    pub fn name(self) -> &'static str {
        match self {
            PollSetting::MaxNs => "poll-max-ns",
            PollSetting::Grow => "poll-grow",
            PollSetting::Shrink => "poll-shrink",
            PollSetting::AioMaxBatch => "aio-max-batch",
        }
    }

    /// The setting with this property name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// The settings shared between an iothread and the threads that read or change them.
#[derive(Debug)]
pub(crate) struct SharedSettings {
    /// By [`PollSetting::ALL`]'s order.
    values: [AtomicU64; 4],
    /// Bumped on every change, so the loop knows to restart its window.
    generation: AtomicU64,
}

impl SharedSettings {
    pub(crate) fn new(s: PollSettings) -> Self {
        SharedSettings {
            values: PollSetting::ALL.map(|setting| AtomicU64::new(s.get(setting))),
            generation: AtomicU64::new(0),
        }
    }

    pub(crate) fn get(&self) -> PollSettings {
        let mut s = PollSettings::default();
        for (setting, value) in PollSetting::ALL.into_iter().zip(&self.values) {
            s.set(setting, value.load(Ordering::Relaxed));
        }
        s
    }

    pub(crate) fn set(&self, setting: PollSetting, value: u64) {
        if let Some(i) = PollSetting::ALL.iter().position(|&s| s == setting) {
            self.values[i].store(value, Ordering::Relaxed);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// The current polling window of a loop and how it adapts (see the module documentation).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PollWindow {
    ns: u64,
}

impl PollWindow {
    /// How long to poll before blocking, in nanoseconds, under `settings`.
    pub(crate) fn ns(self, settings: &PollSettings) -> u64 {
        self.ns.min(settings.max_ns)
    }

    /// A window of `ns` nanoseconds (tests).
    #[cfg(test)]
    pub(crate) fn of(ns: u64) -> Self {
        PollWindow { ns }
    }

    /// Back to no window (the settings changed).
    pub(crate) fn reset(&mut self) {
        self.ns = 0;
    }

    /// Adapts the window to an iteration whose event came `block_ns` after the loop began
    /// waiting for it.
    pub(crate) fn adjust(&mut self, settings: &PollSettings, block_ns: u64) {
        if settings.max_ns == 0 {
            self.ns = 0;
        } else if block_ns <= self.ns {
            // Found within the window: the window fits.
        } else if block_ns > settings.max_ns {
            self.ns = match settings.shrink {
                0 => 0,
                shrink => self.ns / shrink,
            };
        } else if self.ns < settings.max_ns {
            let grow = match settings.grow {
                0 => DEFAULT_GROW,
                grow => grow,
            };
            self.ns = match self.ns {
                0 => INITIAL_WINDOW_NS,
                ns => ns.saturating_mul(grow),
            }
            .min(settings.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_ns: u64, grow: u64, shrink: u64) -> PollSettings {
        PollSettings {
            max_ns,
            grow,
            shrink,
            aio_max_batch: 0,
        }
    }

    /// The windows after each of `blocks` in turn.
    fn windows(s: &PollSettings, blocks: &[u64]) -> Vec<u64> {
        let mut w = PollWindow::default();
        blocks
            .iter()
            .map(|&b| {
                w.adjust(s, b);
                w.ns(s)
            })
            .collect()
    }

    #[test]
    fn defaults_are_qemu_s() {
        assert_eq!(PollSettings::default(), settings(32_768, 0, 0));
    }

    #[test]
    fn events_just_after_the_window_grow_it_by_two_up_to_the_cap() {
        let s = PollSettings::default();
        assert_eq!(
            windows(&s, &[10_000; 6]),
            [4_000, 8_000, 16_000, 16_000, 16_000, 16_000],
            "grows while the event comes after the window, then stays"
        );
        assert_eq!(
            windows(&s, &[30_000; 6]),
            [4_000, 8_000, 16_000, 32_000, 32_000, 32_000]
        );
        assert_eq!(
            windows(&s, &[32_768; 6]),
            [4_000, 8_000, 16_000, 32_000, 32_768, 32_768],
            "capped at poll-max-ns"
        );
    }

    #[test]
    fn poll_grow_multiplies() {
        let s = settings(1_000_000, 10, 0);
        assert_eq!(
            windows(&s, &[900_000; 4]),
            [4_000, 40_000, 400_000, 1_000_000]
        );
    }

    #[test]
    fn a_late_event_shrinks_the_window_to_zero_or_by_poll_shrink() {
        let s = PollSettings::default();
        assert_eq!(
            windows(&s, &[30_000, 30_000, 30_000, 1_000_000]),
            [4_000, 8_000, 16_000, 0]
        );
        let s = settings(100_000, 0, 4);
        assert_eq!(
            windows(
                &s,
                &[90_000, 90_000, 90_000, 90_000, 90_000, 1_000_000, 1_000_000]
            ),
            [4_000, 8_000, 16_000, 32_000, 64_000, 16_000, 4_000]
        );
    }

    #[test]
    fn an_event_within_the_window_leaves_it() {
        let s = PollSettings::default();
        assert_eq!(
            windows(&s, &[30_000, 30_000, 1, 0, 8_000]),
            [4_000, 8_000, 8_000, 8_000, 8_000]
        );
    }

    #[test]
    fn poll_max_ns_zero_means_no_window_at_all() {
        let s = settings(0, 0, 0);
        assert_eq!(windows(&s, &[0, 1, 10_000, 1_000_000]), [0; 4]);
        // Turning it off mid-way drops a window already grown.
        let mut w = PollWindow::default();
        let on = PollSettings::default();
        w.adjust(&on, 10_000);
        assert_eq!(w.ns(&on), 4_000);
        assert_eq!(w.ns(&s), 0, "a lower cap applies at once");
        w.adjust(&s, 10);
        assert_eq!(w.ns(&on), 0);
    }

    #[test]
    fn lowering_the_cap_caps_the_window() {
        let mut w = PollWindow::default();
        let on = PollSettings::default();
        for _ in 0..4 {
            w.adjust(&on, 30_000);
        }
        assert_eq!(w.ns(&on), 32_000);
        let low = settings(10_000, 0, 0);
        assert_eq!(w.ns(&low), 10_000);
    }

    #[test]
    fn huge_settings_saturate() {
        let s = settings(u64::MAX, u64::MAX, 0);
        assert_eq!(windows(&s, &[u64::MAX - 1; 3]), [4_000, u64::MAX, u64::MAX]);
    }

    #[test]
    fn shared_settings_count_changes() {
        let shared = SharedSettings::new(PollSettings::default());
        let g = shared.generation();
        shared.set(PollSetting::Shrink, 3);
        assert_ne!(shared.generation(), g);
        assert_eq!(shared.get().shrink, 3);
        assert_eq!(PollSetting::from_name("poll-grow"), Some(PollSetting::Grow));
        assert_eq!(PollSetting::from_name("poll"), None);
    }
}
