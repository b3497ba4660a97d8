//! Log lines written to stderr by a thread of their own, in batches.
//!
//! A `write(2)` on stderr from an async worker is a system call on the request path (a stream's access
//! line is emitted as its body ends, right before hyper writes the last bytes to the client), and it
//! blocks the whole worker when stderr is a pipe to a slow reader (a busy journald, a stuck `| tee`).
//! [`LogWriter`] appends each formatted line to a buffer instead; a thread, woken by the first line of a
//! batch, writes the batch out [`FLUSH_EVERY`] later, or as soon as it holds [`FLUSH_BYTES`], as nginx's
//! `access_log … buffer= flush=` does. When the buffer is full ([`MAX_BYTES`]) lines are dropped and
//! counted, never waited for, and the count is reported with the next line that fits.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A buffer this full is written at once.
const FLUSH_BYTES: usize = 64 * 1024;
/// How often an idle writer thread checks that it is still needed.
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// Most bytes the buffer holds; lines beyond are dropped.
const MAX_BYTES: usize = 8 * 1024 * 1024;

struct Shared {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    /// Held while writing, so batches come out in order whoever writes them.
    out: Mutex<Box<dyn Write + Send>>,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// Writes what is buffered now, in order.
    fn write_out(&self) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let batch = std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()));
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
            let _ = out.flush();
        }
    }
}

/// A [`MakeWriter`] that buffers log lines for a background thread writing to stderr.
#[derive(Debug, Clone)]
pub(crate) struct LogWriter {
    shared: Arc<Shared>,
}

impl LogWriter {
    /// Starts the writer thread.
    pub(crate) fn stderr() -> io::Result<Self> {
        Self::to(Box::new(io::stderr()))
    }

    fn to(out: Box<dyn Write + Send>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            buf: Mutex::new(Vec::with_capacity(16 * 1024)),
            wake: Condvar::new(),
            out: Mutex::new(out),
            dropped: AtomicU64::new(0),
        });
        let s = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("streamgate-log".into())
            .spawn(move || loop {
                let Some(shared) = s.upgrade() else {
                    return;
                };
                {
                    // Idle: sleep until a first line comes (re-checking now and then whether the
                    // writer is gone). Then give more lines `FLUSH_EVERY` to join it.
                    let buf = shared.buf.lock().unwrap_or_else(|e| e.into_inner());
                    let (buf, _) = shared
                        .wake
                        .wait_timeout_while(buf, IDLE_CHECK, |b| b.is_empty())
                        .unwrap_or_else(|e| e.into_inner());
                    if buf.is_empty() {
                        continue;
                    }
                    let _ = shared
                        .wake
                        .wait_timeout_while(buf, FLUSH_EVERY, |b| b.len() < FLUSH_BYTES);
                }
                shared.write_out();
            })?;
        Ok(Self { shared })
    }

    /// Writes every line buffered so far, now, on the calling thread.
    pub(crate) fn flush(&self) {
        self.shared.write_out();
    }
}

/// The writer of one event. tracing-subscriber formats the whole line first and hands it over in one
/// `write_all`, so each `write` goes straight into the shared buffer: no copy of its own, and lines from
/// different threads never interleave.
#[derive(Debug)]
pub(crate) struct Line<'a> {
    shared: &'a Shared,
}

impl Write for Line<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if b.is_empty() {
            return Ok(0);
        }
        let s = self.shared;
        let mut buf = s.buf.lock().unwrap_or_else(|e| e.into_inner());
        if buf.len() + b.len() > MAX_BYTES {
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(b.len());
        }
        let dropped = s.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                buf,
                "streamgate: {dropped} log lines dropped: stderr was not keeping up"
            );
        }
        let was_empty = buf.is_empty();
        buf.extend_from_slice(b);
        // One wake-up per batch: for the first line, and when the batch is large.
        if was_empty || buf.len() >= FLUSH_BYTES {
            s.wake.notify_one();
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose output the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_come_out_whole_and_in_order() {
        let out = Sink::default();
        let w = LogWriter::to(Box::new(out.clone())).unwrap();
        for i in 0..5000 {
            let mut line = w.make_writer();
            write!(line, "line {i} ").unwrap();
            writeln!(line, "end").unwrap();
        }
        w.flush();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5000);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(*l, format!("line {i} end"));
        }
    }

    #[test]
    fn the_thread_writes_without_being_asked() {
        let out = Sink::default();
        let w = LogWriter::to(Box::new(out.clone())).unwrap();
        writeln!(w.make_writer(), "hello").unwrap();
        // Bounded wait for the thread's periodic write (50 ms); a flush would do it on this thread.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing written in 5 s"
            );
            std::thread::yield_now();
        }
        assert_eq!(&out.0.lock().unwrap()[..], b"hello\n");
    }

    #[test]
    fn a_full_buffer_drops_lines_and_says_so_later() {
        let out = Sink::default();
        let w = LogWriter::to(Box::new(out.clone())).unwrap();
        // Fill the buffer without letting the thread drain it: hold the output lock.
        let hold = w.shared.out.lock().unwrap();
        let big = vec![b'x'; MAX_BYTES / 2 + 1];
        for _ in 0..3 {
            let mut line = w.make_writer();
            line.write_all(&big).unwrap();
        }
        assert_eq!(w.shared.dropped.load(Ordering::Relaxed), 2);
        drop(hold);
        w.flush();
        writeln!(w.make_writer(), "after").unwrap();
        w.flush();
        let text = out.0.lock().unwrap();
        let tail = String::from_utf8_lossy(&text[text.len() - 80..]).into_owned();
        assert!(
            tail.ends_with("streamgate: 2 log lines dropped: stderr was not keeping up\nafter\n"),
            "{tail}"
        );
    }
}
