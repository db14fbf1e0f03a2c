//! Check and reload commands: run a configured program with a timeout and report a failure
//! as one readable line.
//!
//! Why it exists: both the check (run on the staged file before it replaces the real one, and
//! in `sync` mode on a local edit before it propagates) and the reload (run after the file
//! changed) are external programs that may hang, fail or not exist. None of that may stop the
//! agent: the program runs without a shell (argv as configured, the file path appended for a
//! check), stdin is closed, stdout and stderr are captured (the first 4 KiB of each, for the
//! log line), and after `timeout` the child is killed. Children it leaves behind in the
//! background are not tracked.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// Bytes of output kept for the error message.
const KEEP: usize = 4096;

/// A command that failed: a one-line description, and its exit code if it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommandError {
    /// The exit code, when the program ran and exited with one.
    pub(crate) code: Option<i32>,
    /// What happened, with the start of the program's output.
    pub message: String,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for CommandError {
    fn from(message: String) -> CommandError {
        CommandError {
            code: None,
            message,
        }
    }
}

#[cfg(test)]
impl CommandError {
    /// Whether the message contains `s` (for tests and log filters).
    pub(crate) fn contains(&self, s: &str) -> bool {
        self.message.contains(s)
    }
}

/// Run `argv` (plus `arg`, if given) with `env` added, and wait at most `timeout`.
/// `Err` is a one-line description of the failure (with the exit code, if there is one).
pub(super) async fn run(
    argv: &[String],
    arg: Option<&Path>,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<(), CommandError> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".to_string().into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(a) = arg {
        cmd.arg(a);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| CommandError::from(format!("cannot start `{program}`: {e}")))?;
    let out = child.stdout.take().map(|s| tokio::spawn(read_some(s)));
    let err = child.stderr.take().map(|s| tokio::spawn(read_some(s)));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("`{program}` failed: {e}").into()),
        Err(_) => {
            let _ = child.kill().await;
            return Err(format!(
                "`{program}` did not finish within {} ms and was killed",
                timeout.as_millis()
            )
            .into());
        }
    };
    if status.success() {
        return Ok(());
    }
    // The output of a process that has exited is available at once, unless something it
    // started holds the pipes open: do not wait for that.
    let mut text = String::new();
    for h in [err, out].into_iter().flatten() {
        if let Ok(Ok(bytes)) = tokio::time::timeout(Duration::from_millis(200), h).await {
            let s = String::from_utf8_lossy(&bytes);
            let s = s.trim();
            if !s.is_empty() && text.is_empty() {
                text = s.replace('\n', " | ");
            }
        }
    }
    let code = match status.code() {
        Some(c) => format!("exit status {c}"),
        None => "killed by a signal".to_string(),
    };
    let message = if text.is_empty() {
        format!("`{program}` failed ({code})")
    } else {
        format!("`{program}` failed ({code}): {text}")
    };
    Err(CommandError {
        code: status.code(),
        message,
    })
}

/// Read up to [`KEEP`] bytes, then drain the rest so the child never blocks on a full pipe.
async fn read_some(mut r: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = KEEP.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn success_failure_timeout_and_missing_program() {
        let t = Duration::from_secs(5);
        assert_eq!(run(&argv(&["true"]), None, &[], t).await, Ok(()));
        let e = run(
            &argv(&["sh", "-c", "echo bad line >&2; exit 3"]),
            None,
            &[],
            t,
        )
        .await
        .unwrap_err();
        assert!(e.contains("exit status 3") && e.contains("bad line"), "{e}");
        assert_eq!(e.code, Some(3));
        let e = run(
            &argv(&["sleep", "10"]),
            None,
            &[],
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(e.contains("killed"), "{e}");
        let e = run(&argv(&["/no/such/program"]), None, &[], t)
            .await
            .unwrap_err();
        assert!(e.contains("cannot start"), "{e}");
        // The file argument and the environment reach the program.
        let e = run(
            &argv(&["sh", "-c", "echo \"$X $0\" >&2; exit 1"]),
            Some(Path::new("/some/file")),
            &[("X", "y")],
            t,
        )
        .await
        .unwrap_err();
        assert!(e.contains("y /some/file"), "{e}");
    }
}
