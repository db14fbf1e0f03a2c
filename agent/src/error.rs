//! One error kind for the whole agent binary: what the API answers (its HTTP status) and what
//! the CLI exits with (its exit code) are two faces of the same [`ErrorKind`].
//!
//! Data flow: the node task and the handlers fail with an [`ApiError`] (a kind and a message
//! that names the next step) → the API sends it as `{"error": message}` with
//! [`ErrorKind::status`] → the CLI's client reads the status back with
//! [`ErrorKind::from_status`] into the same kind → `main` exits with [`ErrorKind::exit_code`].
//! Failures that never reach the agent (a usage error, an agent that cannot be reached) are
//! kinds too, so the CLI has one error type.

use lichen_crdt::StoreError;
use serde::{Deserialize, Serialize};

/// Exit codes of the CLI (documented in the README).
pub(crate) mod exit {
    /// Success.
    pub(crate) const OK: i32 = 0;
    /// Other failure (agent error, I/O).
    pub(crate) const FAILURE: i32 = 1;
    /// Usage error (bad arguments); also clap's code.
    pub(crate) const USAGE: i32 = 2;
    /// The agent cannot be reached.
    pub(crate) const UNREACHABLE: i32 = 3;
    /// The document or path does not exist.
    pub(crate) const NOT_FOUND: i32 = 4;
    /// This node is not allowed to do that (membership, role, scope), or the API token is
    /// read-only.
    pub(crate) const DENIED: i32 = 5;
    /// The request was invalid (value, path, name).
    pub(crate) const INVALID: i32 = 6;
    /// A conditional write (`--if-match`) was not made: the document's heads moved.
    pub(crate) const HEADS_MOVED: i32 = 7;
    /// The API refused the token (missing or wrong).
    pub(crate) const UNAUTHORIZED: i32 = 8;
}

/// What went wrong, as both an HTTP status and a CLI exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum ErrorKind {
    /// A value, path, name or parameter is invalid (400; exit 6).
    Invalid,
    /// No token or a wrong one (401; exit 8).
    Unauthorized,
    /// Not allowed: membership, role, scope, a read-only token, a foreign Host (403; exit 5).
    Denied,
    /// No such document, path or route (404; exit 4).
    NotFound,
    /// The route does not take this method (405; exit 6).
    MethodNotAllowed,
    /// The request body did not arrive in time (408; exit 1).
    Timeout,
    /// `If-Match` named heads the document no longer has (412; exit 7).
    HeadsMoved,
    /// The body or the value is too large (413; exit 6).
    TooLarge,
    /// The body is not JSON (415; exit 6).
    UnsupportedMedia,
    /// The JSON body lacks fields or breaks a membership rule (422; exit 6).
    Unprocessable,
    /// The agent failed (500; exit 1).
    Internal,
    /// The agent is shutting down, catching up after a restart, or full of connections
    /// (503; exit 1).
    Unavailable,
    /// The disk is full (507; exit 1).
    DiskFull,
    /// CLI only: bad arguments (exit 2; 400 if it were ever sent).
    Usage,
    /// CLI only: the agent cannot be reached (exit 3; never sent).
    Unreachable,
}

impl ErrorKind {
    /// The HTTP status the API answers with.
    pub(crate) fn status(self) -> u16 {
        match self {
            ErrorKind::Invalid | ErrorKind::Usage => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Denied => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Timeout => 408,
            ErrorKind::HeadsMoved => 412,
            ErrorKind::TooLarge => 413,
            ErrorKind::UnsupportedMedia => 415,
            ErrorKind::Unprocessable => 422,
            ErrorKind::Internal => 500,
            ErrorKind::Unreachable => 502,
            ErrorKind::Unavailable => 503,
            ErrorKind::DiskFull => 507,
        }
    }

    /// The kind an HTTP status stands for (the client's way back); an unknown status is
    /// [`ErrorKind::Internal`].
    pub(crate) fn from_status(status: u16) -> ErrorKind {
        match status {
            400 => ErrorKind::Invalid,
            401 => ErrorKind::Unauthorized,
            403 => ErrorKind::Denied,
            404 => ErrorKind::NotFound,
            405 => ErrorKind::MethodNotAllowed,
            408 => ErrorKind::Timeout,
            412 => ErrorKind::HeadsMoved,
            413 => ErrorKind::TooLarge,
            415 => ErrorKind::UnsupportedMedia,
            422 => ErrorKind::Unprocessable,
            502 => ErrorKind::Unreachable,
            503 => ErrorKind::Unavailable,
            507 => ErrorKind::DiskFull,
            _ => ErrorKind::Internal,
        }
    }

    /// The CLI's exit code.
    pub(crate) fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Usage => exit::USAGE,
            ErrorKind::Unreachable => exit::UNREACHABLE,
            ErrorKind::NotFound => exit::NOT_FOUND,
            ErrorKind::Denied => exit::DENIED,
            ErrorKind::Invalid
            | ErrorKind::MethodNotAllowed
            | ErrorKind::TooLarge
            | ErrorKind::UnsupportedMedia
            | ErrorKind::Unprocessable => exit::INVALID,
            ErrorKind::HeadsMoved => exit::HEADS_MOVED,
            ErrorKind::Unauthorized => exit::UNAUTHORIZED,
            ErrorKind::Timeout
            | ErrorKind::Internal
            | ErrorKind::Unavailable
            | ErrorKind::DiskFull => exit::FAILURE,
        }
    }
}

/// A failure with a message that names the next step. On the wire: `{"error": message}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ApiError {
    /// What kind of failure (the HTTP status, the exit code).
    #[serde(skip, default = "internal")]
    pub(crate) kind: ErrorKind,
    /// What happened and what to do.
    pub(crate) error: String,
}

fn internal() -> ErrorKind {
    ErrorKind::Internal
}

impl ApiError {
    /// An error of `kind` with `msg`.
    pub(crate) fn new(kind: ErrorKind, msg: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            error: msg.into(),
        }
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The CLI's exit code.
    pub(crate) fn code(&self) -> i32 {
        self.kind.exit_code()
    }

    /// The message.
    pub(crate) fn message(&self) -> &str {
        &self.error
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

impl std::error::Error for ApiError {}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let kind = match &e {
            StoreError::Denied(_) => ErrorKind::Denied,
            StoreError::NoSuchDocument(_) => ErrorKind::NotFound,
            StoreError::Invalid(_) | StoreError::Json(_) | StoreError::Rejected(_) => {
                ErrorKind::Invalid
            }
            StoreError::DiskFull => ErrorKind::DiskFull,
            _ => ErrorKind::Internal,
        };
        let mut msg = e.to_string();
        if let StoreError::Denied(_) = e {
            msg.push_str(" (see `lichen members ls` and ask an admin)");
        }
        ApiError::new(kind, msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_the_api_sends_reads_back_as_its_kind() {
        for k in [
            ErrorKind::Invalid,
            ErrorKind::Unauthorized,
            ErrorKind::Denied,
            ErrorKind::NotFound,
            ErrorKind::MethodNotAllowed,
            ErrorKind::Timeout,
            ErrorKind::HeadsMoved,
            ErrorKind::TooLarge,
            ErrorKind::UnsupportedMedia,
            ErrorKind::Unprocessable,
            ErrorKind::Internal,
            ErrorKind::Unavailable,
            ErrorKind::DiskFull,
            ErrorKind::Unreachable,
        ] {
            assert_eq!(ErrorKind::from_status(k.status()), k);
        }
        assert_eq!(ErrorKind::from_status(418), ErrorKind::Internal);
        assert_eq!(ErrorKind::Usage.exit_code(), exit::USAGE);
        assert_eq!(ErrorKind::HeadsMoved.exit_code(), exit::HEADS_MOVED);
    }
}
