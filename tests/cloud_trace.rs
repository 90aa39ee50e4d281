//! The API key and `ureq`'s wire-level logging, against the real `llama-server` on loopback.
//!
//! `ureq_proto` logs every byte of a request at `TRACE`, 16 bytes a line, headers included.
//! This binary turns on every target at `TRACE` (its own binary, because the log filter is
//! global to a process) and shows both halves: a request without a key is dumped byte by
//! byte, so a key would be too; a request with a key is therefore not sent at all, and the
//! key appears nowhere in the log, not even re-assembled from the dump's lines.

mod common;
#[path = "common/logs.rs"]
mod logs;
#[path = "common/servers.rs"]
mod servers;

use std::time::Duration;

use npc_native::cloud::{CloudClient, CloudError};
use npc_native::escalation::DEFAULT_FALLBACK_LINE;
use npc_native::{
    CloudConfig, EscalationConfig, Event, NpcId, ReplySource, Runtime, RuntimeConfig,
};
use servers::LlamaServer;

const KEY: &str = "sk-trace-DO-NOT-LEAK-51c2e8";

/// The printable column of `ureq_proto`'s dump lines, joined: the bytes it logged, with
/// the unprintable ones as '.'.
fn reassembled_wire(logged: &str) -> String {
    logged
        .lines()
        .filter(|line| line.contains("ureq_proto"))
        .filter_map(|line| line.rsplit(' ').next())
        .collect()
}

#[test]
fn with_wire_tracing_on_a_keyed_request_is_not_sent_and_the_key_is_never_logged() {
    let logs = logs::capture("trace");
    let server = LlamaServer::start(&common::model_path(), None);
    let mut config = CloudConfig::new(server.base_url(), "default");
    config.read_timeout = Duration::from_secs(60);
    let messages = [("user".to_owned(), "Say hello in three words.".to_owned())];

    // No key: the request goes out and its bytes are in the log.
    let reply = CloudClient::new(config.clone())
        .chat_stream(&messages, 8, &|| false, &mut |_| true)
        .expect("llama-server replies");
    assert!(!reply.text.is_empty());
    let logged = logs::text(&logs);
    let wire = reassembled_wire(&logged);
    assert!(
        wire.contains("POST./v1/chat/completions") && wire.contains("accept:.text/event-stream"),
        "ureq's wire dump was not captured, so this test would prove nothing:\n{wire}"
    );

    // A key: refused before anything is sent.
    let keyed = config.clone().with_api_key(KEY);
    let refused =
        CloudClient::new(keyed.clone()).chat_stream(&messages, 8, &|| false, &mut |_| true);
    assert_eq!(refused, Err(CloudError::KeyWouldBeLogged));

    // In the runtime the refusal is an in-character fallback, like any cloud failure.
    let mut persona = common::persona("blacksmith");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(40);
    persona.escalation.always_topics = vec!["dragon".into()];
    let runtime = Runtime::start(
        RuntimeConfig::new(common::model_path())
            .with_escalation(EscalationConfig::enabled(Some(keyed))),
    );
    runtime.set_persona(NpcId(1), persona).unwrap();
    runtime.say(NpcId(1), "Tell me about the dragon.").unwrap();
    let (text, source) = loop {
        match runtime
            .events()
            .recv_timeout(Duration::from_secs(600))
            .expect("the runtime answers")
        {
            Event::Replied { text, stats, .. } => break (text, stats.source),
            Event::Failed { error, .. } => panic!("the line failed: {error}"),
            _ => {}
        }
    };
    assert_eq!(source, ReplySource::Fallback);
    assert_eq!(text, DEFAULT_FALLBACK_LINE);
    drop(runtime);

    let logged = logs::text(&logs);
    assert!(!logged.contains(KEY), "the key was logged");
    assert!(
        !reassembled_wire(&logged).contains(&KEY[..12]),
        "the key was logged in ureq's wire dump"
    );
}
