//! A blocking client for OpenAI-compatible `/v1/chat/completions` with streaming (SSE), for
//! escalations. Feature `cloud`.
//!
//! Runs on its own thread (one per escalated reply), never on the worker's decode loop.
//! Connect, read and total timeouts; retries with exponential backoff on 429, 5xx,
//! connection errors and timeouts while nothing has been streamed yet; cancellation checked
//! between stream reads and during backoff. The API key goes only into the `Authorization`
//! header: never into logs, errors or `Debug` output.

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use crate::config::escalation::CloudConfig;

/// Why a cloud reply failed. Never contains the API key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CloudError {
    /// The caller cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The server answered with an error status (after any retries).
    #[error("the server answered HTTP {0}")]
    Status(u16),
    /// No connection, or it broke before a reply started (after any retries).
    #[error("connection failed: {0}")]
    Connection(String),
    /// A timeout before the reply started (after any retries).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server's answer is not an OpenAI-compatible stream.
    #[error("unusable response: {0}")]
    BadResponse(String),
    /// The request was not sent because it carries an API key and the process logs what
    /// `ureq` writes to the socket (`TRACE` for the `ureq_proto` target), which would put the
    /// key in the log.
    #[error(
        "not sent: TRACE logging is on for ureq_proto, which logs request headers and would \
         log the API key; set ureq_proto to DEBUG or above"
    )]
    KeyWouldBeLogged,
    /// The stream broke after part of the reply had arrived.
    #[error("the stream broke after part of the reply: {reason}")]
    Interrupted {
        /// The text received before the break.
        partial: String,
        /// What broke.
        reason: String,
    },
}

/// A finished cloud reply.
#[derive(Clone, Debug, PartialEq)]
pub struct CloudReply {
    /// The whole text.
    pub text: String,
    /// Prompt tokens, as the server counted them (when it reports usage).
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, as the server counted them.
    pub completion_tokens: Option<u64>,
    /// About four characters a token: used when the server reports no usage.
    pub estimated_prompt_tokens: u64,
    /// Content chunks received.
    pub streamed_chunks: usize,
    /// The server stopped at the token limit.
    pub truncated: bool,
    /// Prompt tokens the server took from its prefix cache, when it says (OpenAI's
    /// `usage.prompt_tokens_details.cached_tokens`, or llama-server's `timings.cache_n`).
    pub cached_tokens: Option<u64>,
}

/// A client for one OpenAI-compatible endpoint.
pub struct CloudClient {
    agent: ureq::Agent,
    config: CloudConfig,
}

impl std::fmt::Debug for CloudClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `CloudConfig`'s Debug redacts the key.
        f.debug_struct("CloudClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One attempt's failure, and whether another attempt may help.
enum Attempt {
    Retry(CloudError, Option<Duration>),
    Fail(CloudError),
}

impl CloudClient {
    /// A client for `config`'s endpoint.
    #[must_use]
    pub fn new(config: CloudConfig) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_recv_response(Some(config.read_timeout))
            .timeout_per_read(Some(config.read_timeout))
            .timeout_global(Some(config.total_timeout))
            .build()
            .new_agent();
        Self { agent, config }
    }

    /// The endpoint's configuration.
    #[must_use]
    pub fn config(&self) -> &CloudConfig {
        &self.config
    }

    /// Sends `messages` ((role, content) pairs) and streams the reply: `on_delta` gets each
    /// piece of text and returns `false` to stop. `cancelled` is polled between reads and
    /// during backoff.
    ///
    /// # Errors
    /// A [`CloudError`]; [`CloudError::Cancelled`] when `cancelled` turned true or `on_delta`
    /// returned `false`.
    pub fn chat_stream(
        &self,
        messages: &[(String, String)],
        max_tokens: u32,
        cancelled: &dyn Fn() -> bool,
        on_delta: &mut dyn FnMut(&str) -> bool,
    ) -> Result<CloudReply, CloudError> {
        self.chat_stream_with(
            messages,
            max_tokens,
            &serde_json::Map::new(),
            cancelled,
            on_delta,
        )
    }

    /// [`CloudClient::chat_stream`] with more fields in the request body (sampling settings,
    /// stop strings, a grammar); they replace the standard fields of the same name.
    ///
    /// # Errors
    /// As [`CloudClient::chat_stream`].
    pub fn chat_stream_with(
        &self,
        messages: &[(String, String)],
        max_tokens: u32,
        extra: &serde_json::Map<String, serde_json::Value>,
        cancelled: &dyn Fn() -> bool,
        on_delta: &mut dyn FnMut(&str) -> bool,
    ) -> Result<CloudReply, CloudError> {
        let mut body = serde_json::json!({
            "model": self.config.model,
            "messages": messages
                .iter()
                .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                .collect::<Vec<_>>(),
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": max_tokens,
        });
        if let Some(fields) = body.as_object_mut() {
            for (key, value) in extra {
                fields.insert(key.clone(), value.clone());
            }
        }
        let body = body.to_string();
        let estimated_prompt_tokens = messages
            .iter()
            .map(|(_, content)| content.len() as u64 / 4 + 4)
            .sum();
        let mut attempt = 0;
        loop {
            if cancelled() {
                return Err(CloudError::Cancelled);
            }
            match self.attempt(&body, cancelled, on_delta) {
                Ok(mut reply) => {
                    reply.estimated_prompt_tokens = estimated_prompt_tokens;
                    return Ok(reply);
                }
                Err(Attempt::Fail(error)) => return Err(error),
                Err(Attempt::Retry(error, retry_after)) => {
                    if attempt >= self.config.max_retries {
                        return Err(error);
                    }
                    let backoff = self.config.backoff.saturating_mul(1 << attempt.min(16));
                    let wait = retry_after
                        .filter(|d| *d <= Duration::from_secs(30))
                        .unwrap_or(backoff);
                    tracing::debug!(
                        "cloud attempt {} failed ({error}); retrying in {wait:?}",
                        attempt + 1
                    );
                    attempt += 1;
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        if cancelled() {
                            return Err(CloudError::Cancelled);
                        }
                        std::thread::sleep(
                            until
                                .saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(20)),
                        );
                    }
                }
            }
        }
    }

    fn attempt(
        &self,
        body: &str,
        cancelled: &dyn Fn() -> bool,
        on_delta: &mut dyn FnMut(&str) -> bool,
    ) -> Result<CloudReply, Attempt> {
        let url = format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        );
        let mut request = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", "text/event-stream");
        if let Some(key) = &self.config.api_key {
            if wire_logging_enabled() {
                return Err(Attempt::Fail(CloudError::KeyWouldBeLogged));
            }
            request = request.header("Authorization", format!("Bearer {}", key.expose()));
        }
        let response = request.send(body).map_err(classify)?;
        let status = response.status().as_u16();
        if status == 429 || status >= 500 {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(Attempt::Retry(CloudError::Status(status), retry_after));
        }
        if !(200..300).contains(&status) {
            return Err(Attempt::Fail(CloudError::Status(status)));
        }
        let mut reader = BufReader::new(response.into_body().into_reader());
        let mut reply = CloudReply {
            text: String::new(),
            prompt_tokens: None,
            completion_tokens: None,
            estimated_prompt_tokens: 0,
            streamed_chunks: 0,
            truncated: false,
            cached_tokens: None,
        };
        let mut done = false;
        let mut line = Vec::new();
        loop {
            if cancelled() {
                return Err(Attempt::Fail(CloudError::Cancelled));
            }
            match read_line(&mut reader, &mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) => {
                    let reason = err.to_string();
                    return Err(if reply.text.is_empty() {
                        Attempt::Retry(CloudError::Timeout(reason), None)
                    } else {
                        Attempt::Fail(CloudError::Interrupted {
                            partial: reply.text,
                            reason,
                        })
                    });
                }
            }
            let text = String::from_utf8_lossy(&line);
            match sse_event(&text, &mut reply) {
                Ok(SseEvent::Skip) => {}
                Ok(SseEvent::Done) => {
                    done = true;
                    break;
                }
                Ok(SseEvent::Deltas(deltas)) => {
                    for delta in deltas {
                        reply.text.push_str(&delta);
                        reply.streamed_chunks += 1;
                        if !on_delta(&delta) {
                            return Err(Attempt::Fail(CloudError::Cancelled));
                        }
                    }
                }
                Err(what) => return Err(Attempt::Fail(bad(&reply, what))),
            }
        }
        if !done {
            let reason = "the stream ended before [DONE]".to_owned();
            return Err(Attempt::Fail(if reply.text.is_empty() {
                CloudError::BadResponse(reason)
            } else {
                CloudError::Interrupted {
                    partial: reply.text,
                    reason,
                }
            }));
        }
        Ok(reply)
    }
}

/// The longest line of a server-sent event stream read (a chunk of a few tokens is a few
/// hundred bytes): a server that never ends a line cannot make the game allocate without
/// bound.
const MAX_SSE_LINE: usize = 1 << 20;

/// Reads one line (without its `\n`) into `line`, at most [`MAX_SSE_LINE`] bytes; returns the
/// bytes consumed, 0 at the end of the stream.
fn read_line(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<usize> {
    line.clear();
    let read = reader
        .by_ref()
        .take(MAX_SSE_LINE as u64 + 1)
        .read_until(b'\n', line)?;
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_SSE_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("an event line longer than {MAX_SSE_LINE} bytes"),
        ));
    }
    Ok(read)
}

/// What one line of an OpenAI-compatible chat stream says.
#[derive(Debug, PartialEq)]
enum SseEvent {
    /// A comment, a blank line, an `event:`/`id:`/`retry:` field, a usage-only chunk.
    Skip,
    /// `data: [DONE]`.
    Done,
    /// Content deltas, in order.
    Deltas(Vec<String>),
}

/// Reads one line of the stream, recording usage and a length stop in `reply`.
///
/// # Errors
/// What is wrong with the line (it ends the reply).
fn sse_event(line: &str, reply: &mut CloudReply) -> Result<SseEvent, &'static str> {
    let line = line.trim();
    if line.is_empty() || line.starts_with(':') {
        return Ok(SseEvent::Skip);
    }
    let Some(data) = line.strip_prefix("data:") else {
        if line.starts_with("event:") || line.starts_with("id:") || line.starts_with("retry:") {
            return Ok(SseEvent::Skip);
        }
        return Err("a line that is not server-sent events");
    };
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(SseEvent::Done);
    }
    let chunk: serde_json::Value =
        serde_json::from_str(data).map_err(|_| "an event that is not JSON")?;
    if chunk.get("error").is_some() {
        return Err("the stream reported an error");
    }
    if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
        reply.prompt_tokens = usage
            .get("prompt_tokens")
            .and_then(serde_json::Value::as_u64);
        reply.completion_tokens = usage
            .get("completion_tokens")
            .and_then(serde_json::Value::as_u64);
        if let Some(cached) = usage
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(serde_json::Value::as_u64)
        {
            reply.cached_tokens = Some(cached);
        }
    }
    // llama-server's own counters, on its last chunk.
    if let Some(cached) = chunk
        .get("timings")
        .and_then(|t| t.get("cache_n"))
        .and_then(serde_json::Value::as_u64)
    {
        reply.cached_tokens = Some(cached);
    }
    let Some(choices) = chunk.get("choices").and_then(|c| c.as_array()) else {
        if chunk.get("usage").is_some() || chunk.get("timings").is_some() {
            return Ok(SseEvent::Skip);
        }
        return Err("an event without choices");
    };
    let mut deltas = Vec::new();
    for choice in choices {
        if choice.get("finish_reason").and_then(|r| r.as_str()) == Some("length") {
            reply.truncated = true;
        }
        if let Some(text) = choice
            .get("delta")
            .and_then(|d| d.get("content"))
            .and_then(|c| c.as_str())
            && !text.is_empty()
        {
            deltas.push(text.to_owned());
        }
    }
    Ok(SseEvent::Deltas(deltas))
}

fn bad(reply: &CloudReply, what: &str) -> CloudError {
    if reply.text.is_empty() {
        CloudError::BadResponse(what.to_owned())
    } else {
        CloudError::Interrupted {
            partial: reply.text.clone(),
            reason: what.to_owned(),
        }
    }
}

/// Sorts a transport error into retryable or not. Its text never holds the key (ureq's
/// errors name the host at most).
fn classify(error: ureq::Error) -> Attempt {
    match error {
        ureq::Error::Timeout(which) => {
            Attempt::Retry(CloudError::Timeout(format!("{which:?}")), None)
        }
        ureq::Error::Io(err) => Attempt::Retry(CloudError::Connection(err.to_string()), None),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            Attempt::Retry(CloudError::Connection(error.to_string()), None)
        }
        other => Attempt::Fail(CloudError::Connection(other.to_string())),
    }
}

/// The log target under which `ureq_proto` writes every byte of a request (its headers
/// included) at `TRACE`, 16 bytes a line.
const WIRE_LOG_TARGET: &str = "ureq_proto::util";

/// Whether the installed `log` logger (or `tracing`, through its `log` bridge) would record
/// `ureq`'s wire dump: asked the way `ureq_proto`'s own `trace!` asks.
fn wire_logging_enabled() -> bool {
    log::log_enabled!(target: WIRE_LOG_TARGET, log::Level::Trace)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn reply() -> CloudReply {
        CloudReply {
            text: String::new(),
            prompt_tokens: None,
            completion_tokens: None,
            estimated_prompt_tokens: 0,
            streamed_chunks: 0,
            truncated: false,
            cached_tokens: None,
        }
    }

    /// The text of `lines` read as a stream, how it ended (`[DONE]`, an error, or nothing),
    /// and what the reply recorded.
    fn replay(
        lines: impl IntoIterator<Item = String>,
    ) -> (String, Option<Result<(), &'static str>>, CloudReply) {
        let mut reply = reply();
        let mut text = String::new();
        for line in lines {
            match sse_event(&line, &mut reply) {
                Ok(SseEvent::Deltas(deltas)) => text.extend(deltas),
                Ok(SseEvent::Skip) => {}
                Ok(SseEvent::Done) => return (text, Some(Ok(())), reply),
                Err(why) => return (text, Some(Err(why)), reply),
            }
        }
        (text, None, reply)
    }

    /// The lines a real stream is made of, and ones a broken server sends.
    fn line() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,30}".prop_map(|t| format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":{}}}}}]}}",
                serde_json::Value::String(t)
            )),
            Just("data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}".to_owned()),
            Just("data: {\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3}}".to_owned()),
            Just("data: {\"choices\":[],\"timings\":{\"cache_n\":40,\"prompt_n\":2}}".to_owned()),
            Just(": keep-alive".to_owned()),
            Just(String::new()),
            Just("event: message".to_owned()),
            Just("data: [DONE]".to_owned()),
            Just("data: {\"error\":{\"message\":\"overloaded\"}}".to_owned()),
            ".{0,40}",
            "data: .{0,40}",
        ]
    }

    #[test]
    fn the_servers_cache_count_is_read_from_usage_or_from_llama_servers_timings() {
        let mut with_usage = reply();
        let line = r#"data: {"choices":[],"usage":{"prompt_tokens":50,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":40}}}"#;
        assert_eq!(
            sse_event(line, &mut with_usage),
            Ok(SseEvent::Deltas(Vec::new()))
        );
        assert_eq!(with_usage.cached_tokens, Some(40));
        assert_eq!(with_usage.prompt_tokens, Some(50));
        let mut with_timings = reply();
        let line = r#"data: {"timings":{"cache_n":45,"prompt_n":5}}"#;
        assert_eq!(sse_event(line, &mut with_timings), Ok(SseEvent::Skip));
        assert_eq!(with_timings.cached_tokens, Some(45));
        // Neither: unknown, not zero.
        let mut plain = reply();
        let line = r#"data: {"choices":[{"delta":{"content":"Hi"}}]}"#;
        assert!(sse_event(line, &mut plain).is_ok());
        assert_eq!(plain.cached_tokens, None);
    }

    #[test]
    fn a_line_longer_than_the_limit_is_an_error_and_a_normal_one_is_not() {
        let mut line = Vec::new();
        let long = vec![b'x'; MAX_SSE_LINE + 10];
        let err = read_line(&mut long.as_slice(), &mut line).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        assert!(line.len() <= MAX_SSE_LINE + 1);
        let mut input: &[u8] = b"data: [DONE]\nnext";
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 13);
        assert_eq!(line, b"data: [DONE]");
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 4);
        assert_eq!(line, b"next");
        assert_eq!(read_line(&mut input, &mut line).unwrap(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_line_is_an_event_or_a_reason_never_a_panic(line in line()) {
            let mut reply = reply();
            match sse_event(&line, &mut reply) {
                Ok(SseEvent::Deltas(deltas)) => prop_assert!(deltas.iter().all(|d| !d.is_empty())),
                Ok(_) => {}
                Err(why) => prop_assert!(!why.is_empty()),
            }
        }

        #[test]
        fn the_text_is_the_content_of_the_events_before_done_however_the_bytes_arrive(
            lines in proptest::collection::vec(line(), 0..12),
            chunk in 1usize..64,
        ) {
            // The reference: each line on its own.
            let (expected, expected_end, by_line) = replay(lines.iter().cloned());
            // The same stream read through `read_line` in small reads.
            let wire = lines.join("\n");
            let mut reader = BufReader::with_capacity(chunk, wire.as_bytes());
            let mut line = Vec::new();
            let streamed = std::iter::from_fn(|| {
                (read_line(&mut reader, &mut line).unwrap() > 0)
                    .then(|| String::from_utf8_lossy(&line).into_owned())
            });
            let (got, end, by_stream) = replay(streamed);
            prop_assert_eq!(got, expected);
            prop_assert_eq!(end, expected_end);
            prop_assert_eq!(by_stream.truncated, by_line.truncated);
            prop_assert_eq!(by_stream.prompt_tokens, by_line.prompt_tokens);
        }
    }
}
