//! Progress of transfers on stderr.

use std::sync::Arc;

/// Progress on stderr: a bar or spinner on a terminal, nothing otherwise.
/// Each phase gets a fresh bar of its kind; `finish` clears it.
#[derive(Clone)]
pub struct Progress {
    target: Arc<dyn Fn() -> indicatif::ProgressDrawTarget + Send + Sync>,
    current: Arc<std::sync::Mutex<Option<(Phase, indicatif::ProgressBar)>>>,
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Objects,
    Bytes,
    Waiting,
}

impl Progress {
    pub fn new(ui: &crate::Ui) -> Progress {
        use std::io::IsTerminal;
        let shown = !ui.quiet && std::io::stderr().is_terminal();
        Progress::drawing_to(move || {
            if shown { indicatif::ProgressDrawTarget::stderr() } else { indicatif::ProgressDrawTarget::hidden() }
        })
    }

    pub(super) fn drawing_to(target: impl Fn() -> indicatif::ProgressDrawTarget + Send + Sync + 'static) -> Progress {
        Progress { target: Arc::new(target), current: Default::default() }
    }

    /// The bar of the current phase, a new one when the phase changes.
    fn bar(&self, phase: Phase, stage: &str) -> indicatif::ProgressBar {
        let mut current = self.current.lock().unwrap();
        let bar = match current.take() {
            Some((p, bar)) if p == phase => bar,
            old => {
                if let Some((_, bar)) = old {
                    bar.finish_and_clear();
                }
                let bar = indicatif::ProgressBar::with_draw_target(None, (self.target)());
                let template = match phase {
                    Phase::Objects => "{prefix:>9} [{bar:30}] {pos}/{len} objects {msg}",
                    Phase::Bytes => "{prefix:>9} [{bar:30}] {bytes}/{total_bytes}, {bytes_per_sec}",
                    Phase::Waiting => "{spinner} {prefix} ({elapsed})",
                };
                bar.set_style(
                    indicatif::ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "),
                );
                if phase == Phase::Waiting {
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                }
                bar
            }
        };
        bar.set_prefix(stage.to_owned());
        *current = Some((phase, bar.clone()));
        bar
    }

    pub(super) fn objects(&self, stage: &str, current: usize, total: usize) -> indicatif::ProgressBar {
        let bar = self.bar(Phase::Objects, stage);
        bar.set_length(total as u64);
        bar.set_position(current as u64);
        bar
    }

    pub(super) fn transfer(&self, stage: &str, current: usize, total: usize, bytes: usize) -> bool {
        let bar = self.objects(stage, current, total);
        let secs = bar.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!(
            "{}, {}/s",
            indicatif::HumanBytes(bytes as u64),
            indicatif::HumanBytes((bytes as f64 / secs) as u64)
        ));
        true
    }

    fn bytes(&self, stage: &str, current: u64, total: u64) {
        let bar = self.bar(Phase::Bytes, stage);
        bar.set_length(total);
        bar.set_position(current);
    }

    /// A spinner while the VM works on something that reports no progress.
    pub(super) fn waiting(&self, what: &str) {
        self.bar(Phase::Waiting, what);
    }

    pub(super) fn finish(&self) {
        if let Some((_, bar)) = self.current.lock().unwrap().take() {
            bar.finish_and_clear();
        }
    }
}

/// A writer that reports the bytes through it as progress.
pub(super) struct Counted<W> {
    inner: W,
    sent: u64,
    total: u64,
    progress: Progress,
}

impl<W> Counted<W> {
    /// Counts what goes through `inner` toward `total` bytes.
    pub(super) fn new(inner: W, total: u64, progress: &Progress) -> Counted<W> {
        Counted { inner, sent: 0, total, progress: progress.clone() }
    }
}

impl<W: std::io::Write> std::io::Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sent += n as u64;
        self.progress.bytes("Sending", self.sent, self.total);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// What a terminal shows: each phase in turn, nothing once finished.
    #[test]
    fn progress_shows_each_phase_then_clears() {
        let term = indicatif::InMemoryTerm::new(4, 100);
        let t = term.clone();
        let progress = Progress::drawing_to(move || indicatif::ProgressDrawTarget::term_like(Box::new(t.clone())));
        progress.objects("Counting", 5, 10);
        assert!(
            term.contents().contains("Counting [") && term.contents().contains("5/10 objects"),
            "{}",
            term.contents()
        );
        progress.bytes("Sending", 3 << 20, 8 << 20);
        let shown = term.contents();
        assert!(shown.contains("Sending") && shown.contains("3.00 MiB/8.00 MiB"), "{shown}");
        assert!(!shown.contains("Counting"), "{shown}");
        progress.waiting("Checking out");
        let shown = term.contents();
        assert!(shown.contains("Checking out (") && !shown.contains("Sending"), "{shown}");
        progress.finish();
        assert_eq!(term.contents().trim(), "");
        // A later phase draws again (a finished bar would not).
        progress.objects("Packing", 1, 2);
        assert!(term.contents().contains("Packing"), "{}", term.contents());
    }
}
