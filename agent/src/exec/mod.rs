//! `lichen exec`: run a program under the agent with a document as its environment
//! (envconsul's job, and consul-template's exec mode).
//!
//! ```text
//!  agent ──SSE ?watch──► watch thread (blocking client; reconnects, resumes from heads)
//!        ──Update──► supervisor (tokio, one thread) ──► child process
//!  SIGTERM / SIGINT / SIGHUP ──► supervisor ──forwarded──► child
//! ```
//!
//! * The child starts only once the document has a value at the path (never from nothing);
//!   its environment is this process's, plus the document's leaves as variables (naming:
//!   [`env`]), plus `LICHEN_DOC` and `LICHEN_HEADS` (which signed state it was started from).
//! * A change that alters the variables is debounced, then applied: `restart` stops the child
//!   (SIGTERM, SIGKILL after `--kill-timeout`) and starts it again with the new values;
//!   `signal:NAME` sends it that signal (for a program that re-reads its configuration from
//!   files rendered by the agent's bindings). A change that leaves the variables as they are
//!   does nothing; a document deleted or made unusable later keeps the child running with its
//!   last configuration, and the reason is printed.
//! * SIGTERM and SIGINT are forwarded and `lichen exec` then waits for the child (SIGKILL
//!   after `--kill-timeout`); SIGHUP is forwarded. `lichen exec` exits with the child's exit
//!   code (128 + N when the child was killed by signal N).
//! * If the agent goes away the child keeps running, and the watch reconnects (at most every
//!   5 s) and resumes from the last heads it saw.

mod env;
mod supervise;

use std::time::Duration;

pub(crate) use supervise::run;

/// What to do when the document's variables change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnChange {
    /// Stop the child and start it again with the new environment.
    Restart,
    /// Send the child this signal (its environment cannot change).
    Signal(rustix::process::Signal),
}

impl std::str::FromStr for OnChange {
    type Err = String;

    fn from_str(s: &str) -> Result<OnChange, String> {
        if s == "restart" {
            return Ok(OnChange::Restart);
        }
        let Some(name) = s.strip_prefix("signal:") else {
            return Err(format!(
                "`{s}`: use `restart` or `signal:NAME` (HUP, USR1, USR2, INT, TERM, QUIT, WINCH)"
            ));
        };
        signal_named(name).map(OnChange::Signal).ok_or_else(|| {
            format!("unknown signal `{name}`: use HUP, USR1, USR2, INT, TERM, QUIT or WINCH")
        })
    }
}

fn signal_named(name: &str) -> Option<rustix::process::Signal> {
    use rustix::process::Signal;
    let name = name.trim_start_matches("SIG");
    Some(match name {
        "HUP" => Signal::HUP,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "INT" => Signal::INT,
        "TERM" => Signal::TERM,
        "QUIT" => Signal::QUIT,
        "WINCH" => Signal::WINCH,
        _ => return None,
    })
}

/// A duration as `10s`, `500ms`, `2m` or a plain number of seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}`: give a duration such as 10s, 500ms or 2m");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if d > Duration::from_secs(3600) {
        return Err(format!("`{s}`: at most 1 hour"));
    }
    Ok(d)
}

/// Everything `lichen exec` was asked to do (its command line).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Options {
    /// Document to read.
    #[arg(long)]
    pub doc: String,
    /// Path of the object to read (default: the whole document).
    #[arg(long, default_value = "")]
    pub path: String,
    /// Prefix of every variable name.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// `restart`, or `signal:NAME` (HUP, USR1, USR2, INT, TERM, QUIT, WINCH).
    #[arg(long, default_value = "restart", value_parser = clap::value_parser!(OnChange))]
    pub on_change: OnChange,
    /// How long CMD may take to stop before it is killed (10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub kill_timeout: Duration,
    /// Changes within this window are applied once (10s, 500ms, 2m).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// The program and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_change_and_durations_parse_or_say_what_is_expected() {
        assert_eq!("restart".parse(), Ok(OnChange::Restart));
        assert_eq!(
            "signal:HUP".parse(),
            Ok(OnChange::Signal(rustix::process::Signal::HUP))
        );
        assert_eq!(
            "signal:SIGUSR1".parse(),
            Ok(OnChange::Signal(rustix::process::Signal::USR1))
        );
        assert!("signal:NOPE"
            .parse::<OnChange>()
            .unwrap_err()
            .contains("HUP"));
        assert!("reload"
            .parse::<OnChange>()
            .unwrap_err()
            .contains("restart"));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("99999m").is_err());
    }
}
