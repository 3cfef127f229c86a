//! Progress of long work: a bar on a terminal (with the feature `progress-bar`), and plain periodic
//! log lines otherwise — when standard error is not a terminal (a log file, CI, `nohup`), where a
//! bar's redraws are either lost or garbage, or when the program left the bar crate out.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[cfg(feature = "progress-bar")]
use indicatif::{ProgressBar, ProgressStyle};

/// How often the plain form prints a line.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A progress report over `len` units of `what` (steps, sets, images).
pub struct Progress {
    kind: Kind,
}

enum Kind {
    #[cfg(feature = "progress-bar")]
    Bar(ProgressBar),
    Log(Mutex<LogState>),
    Hidden,
}

struct LogState {
    what: String,
    len: u64,
    pos: u64,
    message: String,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// A bar when standard error is a terminal (and the feature `progress-bar` is on), else a line
    /// every 10 s and one at the end.
    pub fn new(len: u64, what: &str) -> Self {
        if cfg!(feature = "progress-bar") && std::io::stderr().is_terminal() {
            Self::bar(len, what)
        } else {
            Self::log(len, what)
        }
    }

    /// Nothing shown (library callers that report themselves, tests).
    pub fn hidden() -> Self {
        Self { kind: Kind::Hidden }
    }

    /// Always the bar (indicatif draws nothing when standard error is not a terminal); the log
    /// lines in a build without the feature `progress-bar`.
    #[cfg(not(feature = "progress-bar"))]
    pub fn bar(len: u64, what: &str) -> Self {
        Self::log(len, what)
    }

    /// Always the bar (indicatif draws nothing when standard error is not a terminal).
    #[cfg(feature = "progress-bar")]
    pub fn bar(len: u64, what: &str) -> Self {
        let bar = ProgressBar::new(len);
        let template =
            format!("{{spinner}} [{{elapsed_precise}}<{{eta_precise}}] {{bar:30}} {{pos}}/{{len}} {what}  {{msg}}");
        bar.set_style(ProgressStyle::with_template(&template).expect("valid template"));
        Self { kind: Kind::Bar(bar) }
    }

    /// Always the plain log lines.
    pub fn log(len: u64, what: &str) -> Self {
        let now = Instant::now();
        let state =
            LogState { what: what.to_string(), len, pos: 0, message: String::new(), started: now, last_line: now };
        Self { kind: Kind::Log(Mutex::new(state)) }
    }

    pub fn set_position(&self, pos: u64) {
        match &self.kind {
            #[cfg(feature = "progress-bar")]
            Kind::Bar(bar) => bar.set_position(pos),
            Kind::Log(state) => {
                let mut s = state.lock().expect("not poisoned");
                s.pos = pos;
                if s.last_line.elapsed() >= LOG_EVERY {
                    s.last_line = Instant::now();
                    eprintln!("{}", s.line());
                }
            }
            Kind::Hidden => {}
        }
    }

    /// Text shown after the count (losses, rates).
    pub fn set_message(&self, message: String) {
        match &self.kind {
            #[cfg(feature = "progress-bar")]
            Kind::Bar(bar) => bar.set_message(message),
            Kind::Log(state) => state.lock().expect("not poisoned").message = message,
            Kind::Hidden => {}
        }
    }

    /// Clears the bar, or prints the final log line.
    pub fn finish(&self) {
        match &self.kind {
            #[cfg(feature = "progress-bar")]
            Kind::Bar(bar) => bar.finish_and_clear(),
            Kind::Log(state) => eprintln!("{}", state.lock().expect("not poisoned").line()),
            Kind::Hidden => {}
        }
    }
}

impl LogState {
    /// `[  12 s] 40/300 steps (13 %)  loss 1.2345`.
    fn line(&self) -> String {
        let share = (100 * self.pos).checked_div(self.len).unwrap_or(100);
        let mut line = format!(
            "[{:>5.0} s] {}/{} {} ({share} %)",
            self.started.elapsed().as_secs_f64(),
            self.pos,
            self.len,
            self.what
        );
        if !self.message.is_empty() {
            line.push_str("  ");
            line.push_str(&self.message);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_say_where_the_work_is() {
        let p = Progress::log(300, "steps");
        p.set_position(40);
        p.set_message("loss 1.2345".into());
        let Kind::Log(state) = &p.kind else { panic!("the log form") };
        let line = state.lock().unwrap().line();
        assert!(line.ends_with("40/300 steps (13 %)  loss 1.2345"), "{line}");
    }
}
