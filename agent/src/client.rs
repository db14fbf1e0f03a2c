//! The CLI's client for the local HTTP API (blocking, ureq). Every failure is mapped to an
//! exit code and a message that names the next step.

use std::io::BufRead;
use std::time::Duration;

use serde_json::Value;

/// Exit codes of the CLI (documented in the README).
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Other failure (agent error, I/O).
    pub const FAILURE: i32 = 1;
    /// Usage error (bad arguments); also clap's code.
    pub const USAGE: i32 = 2;
    /// The agent cannot be reached.
    pub const UNREACHABLE: i32 = 3;
    /// The document or path does not exist.
    pub const NOT_FOUND: i32 = 4;
    /// This node is not allowed to do that (membership, role, scope).
    pub const DENIED: i32 = 5;
    /// The request was invalid (value, path, name).
    pub const INVALID: i32 = 6;
}

/// A failed request.
#[derive(Debug)]
pub struct ClientError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ClientError {}

/// Client of one agent's API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(api: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build();
        Client {
            base: format!("http://{api}"),
            agent: ureq::Agent::new_with_config(config),
        }
    }

    fn unreachable(&self, e: ureq::Error) -> ClientError {
        ClientError {
            code: exit::UNREACHABLE,
            message: format!(
                "cannot reach the lichen agent at {} ({e}): is `lichen run` running? (set --api or LICHEN_API for another address)",
                self.base
            ),
        }
    }

    fn finish(
        &self,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut resp = r.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let body: Value = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_json()
            .unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = body
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("agent answered HTTP {status}"));
        let code = match status {
            404 => exit::NOT_FOUND,
            403 => exit::DENIED,
            400 | 413 | 422 => exit::INVALID,
            _ => exit::FAILURE,
        };
        Err(ClientError { code, message })
    }

    pub fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, ClientError> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        self.finish(req.call())
    }

    pub fn put(
        &self,
        path: &str,
        query: &[(&str, &str)],
        body: &Value,
    ) -> Result<Value, ClientError> {
        let mut req = self.agent.put(format!("{}{path}", self.base));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        self.finish(req.send_json(body))
    }

    pub fn delete(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, ClientError> {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        self.finish(req.call())
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.finish(
            self.agent
                .post(format!("{}{path}", self.base))
                .send_json(body),
        )
    }

    /// POST without a body and take the answer as bytes (a backup; up to 16 GiB).
    pub fn post_for_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let mut resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .send_empty()
            .map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return resp
                .body_mut()
                .with_config()
                .limit(16 << 30)
                .read_to_vec()
                .map_err(|e| ClientError {
                    code: exit::FAILURE,
                    message: format!("reading the agent's answer failed: {e}"),
                });
        }
        self.finish(Ok(resp)).map(|_| Vec::new())
    }

    /// Follow a Server-Sent Events stream, calling `on_event` with each event's JSON data.
    /// Returns when the stream ends or `on_event` returns false.
    pub fn sse(
        &self,
        path: &str,
        query: &[(&str, &str)],
        mut on_event: impl FnMut(Value) -> bool,
    ) -> Result<(), ClientError> {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(None)
            .build();
        let agent = ureq::Agent::new_with_config(config);
        let mut req = agent.get(format!("{}{path}", self.base));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        let resp = req.call().map_err(|e| self.unreachable(e))?;
        if resp.status().as_u16() != 200 {
            return self.finish(Ok(resp)).map(|_| ());
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let mut data = String::new();
        for line in reader.lines() {
            let line = line.map_err(|e| ClientError {
                code: exit::UNREACHABLE,
                message: format!("watch stream broke: {e}"),
            })?;
            if let Some(d) = line.strip_prefix("data:") {
                data.push_str(d.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                data.clear();
                if !on_event(v) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
