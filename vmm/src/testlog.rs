//! Test support: a logger that counts, per thread, the log lines each test
//! produces (tests run on their own threads), so a test can assert that a
//! guest flood yields a bounded number of lines.

use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

struct Counter;

impl log::Log for Counter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        if r.level() <= log::Level::Warn {
            let line = r.args().to_string();
            let _ = LINES.try_with(|l| l.borrow_mut().push(line));
        }
    }
    fn flush(&self) {}
}

/// Installs the counting logger (once per test binary) and forgets the
/// lines this thread logged so far.
pub(crate) fn start() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        static COUNTER: Counter = Counter;
        if log::set_logger(&COUNTER).is_ok() {
            log::set_max_level(log::LevelFilter::Warn);
        }
    });
    LINES.with(|l| l.borrow_mut().clear());
}

/// The warning and error lines this thread logged since [`start`].
pub(crate) fn lines() -> Vec<String> {
    LINES.with(|l| l.borrow().clone())
}
