//! Captures everything a test binary logs through `tracing` (and `log`, through its bridge)
//! into a buffer the test can search.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Installs, once per process, a global subscriber with `filter` writing into the returned
/// buffer.
pub fn capture(filter: &str) -> Arc<Mutex<Vec<u8>>> {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&logs);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_writer(move || LogWriter(Arc::clone(&sink)))
        .try_init();
    logs
}

/// The text logged so far.
pub fn text(logs: &Mutex<Vec<u8>>) -> String {
    let bytes = logs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    String::from_utf8_lossy(&bytes).into_owned()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
