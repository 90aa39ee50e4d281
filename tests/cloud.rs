//! Escalation to a cloud model, against llama.cpp's real `llama-server` on loopback, and
//! loopback servers that fail the ways a paid API can (down, silent, garbage, 429). The tests
//! of what escalation answers run the NPC on a smaller catalog model and serve the catalog's
//! largest as the cloud, so the cloud knows what the NPC does not; the tests of mechanics
//! (streaming, cancelling, caps, the key, failures) serve and run the small test model.
//! Feature `cloud`; `cargo xtask test` builds `llama-server` and runs these.

mod common;
#[path = "common/logs.rs"]
mod logs;
#[path = "common/servers.rs"]
mod servers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use npc_native::cloud::{CloudClient, CloudError};
use npc_native::escalation::{DEFAULT_DONT_KNOW, DEFAULT_FALLBACK_LINE};
use npc_native::{
    CloudConfig, CloudRole, EscalationConfig, Event, NpcId, Persona, ReplySource, ReplyStats,
    Runtime, RuntimeConfig,
};
use servers::{LlamaServer, MisbehavingServer, Misbehaviour};

const KEY: &str = "sk-test-DO-NOT-LEAK-7f3a9c";

/// Everything logged in this test binary, at every level, by every crate (ureq's wire-level
/// `TRACE` output excepted, see docs/dialogue.md), for the key test to search.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| logs::capture("trace,ureq=debug"))
        .clone()
}

fn messages(question: &str) -> Vec<(String, String)> {
    vec![
        (
            "system".into(),
            "You are Brom, the blacksmith of Oakvale. Answer in one short sentence.".into(),
        ),
        ("user".into(), question.into()),
    ]
}

fn fast_config(base_url: String) -> CloudConfig {
    let mut config = CloudConfig::new(base_url, "default");
    config.connect_timeout = Duration::from_secs(2);
    config.read_timeout = Duration::from_millis(400);
    config.total_timeout = Duration::from_secs(60);
    config.max_retries = 1;
    config.backoff = Duration::from_millis(20);
    config
}

fn llama_config(server: &LlamaServer) -> CloudConfig {
    let mut config = CloudConfig::new(server.base_url(), "default");
    config.read_timeout = Duration::from_secs(60);
    config
}

// --- The client on its own ---------------------------------------------------------------

#[test]
fn streams_a_reply_from_llama_server() {
    let _serial = common::serial();
    captured_logs();
    let server = LlamaServer::start(&common::model_path(), None);
    let client = CloudClient::new(llama_config(&server));
    let mut deltas = Vec::new();
    let reply = client
        .chat_stream(&messages("What do you sell?"), 32, &|| false, &mut |d| {
            deltas.push(d.to_owned());
            true
        })
        .expect("llama-server answers");
    assert!(deltas.len() > 1, "the reply streamed in pieces: {deltas:?}");
    assert_eq!(deltas.concat(), reply.text);
    assert!(!reply.text.trim().is_empty());
    assert!(reply.prompt_tokens.is_some_and(|n| n > 10), "{reply:?}");
    assert!(
        reply
            .completion_tokens
            .is_some_and(|n| (1..=32).contains(&n)),
        "{reply:?}"
    );
}

#[test]
fn a_stream_stops_when_cancelled() {
    let _serial = common::serial();
    let server = LlamaServer::start(&common::model_path(), None);
    let client = CloudClient::new(llama_config(&server));
    // Stopped from the delta callback after the first piece.
    let mut pieces = 0;
    let result = client.chat_stream(
        &messages("Tell me a long story."),
        200,
        &|| false,
        &mut |_| {
            pieces += 1;
            false
        },
    );
    assert_eq!(result, Err(CloudError::Cancelled));
    assert_eq!(pieces, 1);
    // Stopped by the flag while streaming.
    let flag = AtomicBool::new(false);
    let mut after_flag = 0;
    let result = client.chat_stream(
        &messages("Tell me a long story."),
        200,
        &|| flag.load(Ordering::SeqCst),
        &mut |_| {
            if flag.swap(true, Ordering::SeqCst) {
                after_flag += 1;
            }
            true
        },
    );
    assert_eq!(result, Err(CloudError::Cancelled));
    assert!(after_flag <= 1, "{after_flag} pieces after cancelling");
}

#[test]
fn a_silent_server_times_out_after_retries() {
    let silent = MisbehavingServer::start(Misbehaviour::Silent);
    let client = CloudClient::new(fast_config(silent.base_url()));
    let result = client.chat_stream(&messages("Hello?"), 16, &|| false, &mut |_| true);
    assert!(matches!(result, Err(CloudError::Timeout(_))), "{result:?}");
    assert_eq!(silent.requests(), 2, "one attempt and one retry");
}

#[test]
fn a_server_that_is_down_is_a_connection_error() {
    let port = servers::free_port();
    let client = CloudClient::new(fast_config(format!("http://127.0.0.1:{port}/v1")));
    let result = client.chat_stream(&messages("Hello?"), 16, &|| false, &mut |_| true);
    assert!(
        matches!(result, Err(CloudError::Connection(_))),
        "{result:?}"
    );
}

#[test]
fn garbage_is_refused_without_retrying() {
    for mode in [Misbehaviour::Garbage, Misbehaviour::GarbageEvents] {
        let server = MisbehavingServer::start(mode);
        let client = CloudClient::new(fast_config(server.base_url()));
        let mut deltas = 0;
        let result = client.chat_stream(&messages("Hello?"), 16, &|| false, &mut |_| {
            deltas += 1;
            true
        });
        assert!(
            matches!(result, Err(CloudError::BadResponse(_))),
            "{mode:?}: {result:?}"
        );
        assert_eq!((deltas, server.requests()), (0, 1), "{mode:?}");
    }
}

#[test]
fn rate_limits_are_retried_then_served_by_the_real_server() {
    let _serial = common::serial();
    let server = LlamaServer::start(&common::model_path(), None);
    // Two 429s, then the real server: two retries get through.
    let limited = MisbehavingServer::start(Misbehaviour::RateLimited {
        first: 2,
        then_port: Some(server.port),
    });
    let mut config = llama_config(&server);
    config.base_url = limited.base_url();
    config.max_retries = 2;
    config.backoff = Duration::from_millis(10);
    let reply = CloudClient::new(config.clone())
        .chat_stream(&messages("What do you sell?"), 16, &|| false, &mut |_| true)
        .expect("the third attempt reaches llama-server");
    assert!(!reply.text.trim().is_empty());
    assert_eq!(limited.requests(), 3);
    // Always 429: the client gives up after its retries.
    let always = MisbehavingServer::start(Misbehaviour::RateLimited {
        first: usize::MAX,
        then_port: None,
    });
    config.base_url = always.base_url();
    let result =
        CloudClient::new(config).chat_stream(&messages("Hi"), 16, &|| false, &mut |_| true);
    assert_eq!(result, Err(CloudError::Status(429)));
    assert_eq!(always.requests(), 3);
}

// --- Escalation in the runtime ------------------------------------------------------------

fn blacksmith() -> Persona {
    let mut persona = common::persona("blacksmith");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(40);
    persona
}

fn runtime_with(escalation: EscalationConfig) -> Runtime {
    runtime_on(common::model_path(), escalation)
}

fn runtime_on(model: std::path::PathBuf, escalation: EscalationConfig) -> Runtime {
    loaded(
        RuntimeConfig::new(model)
            .with_slots(4)
            .with_escalation(escalation),
    )
}

/// The runtime `config` starts, once its model has loaded.
fn loaded(config: RuntimeConfig) -> Runtime {
    let runtime = Runtime::start(config);
    match runtime.events().recv_timeout(Duration::from_secs(120)) {
        Ok(Event::ModelLoaded(_)) => runtime,
        other => panic!("model did not load: {other:?}"),
    }
}

/// A runtime escalating to `server` with `role`, and the blacksmith as NPC 1.
fn blacksmith_escalating(server: &LlamaServer, role: CloudRole) -> Runtime {
    let mut escalation = EscalationConfig::enabled(Some(llama_config(server)));
    escalation.cloud_role = role;
    let runtime = runtime_with(escalation);
    add_npc(&runtime, NpcId(1), blacksmith());
    runtime
}

/// `llama-server` serving the catalog's largest model, the stand-in for a cloud model, on
/// the machine's cores (the NPC's runtime waits while it answers).
fn stronger_cloud() -> LlamaServer {
    LlamaServer::start_on_all_cores(&common::cloud_standin_path())
}

/// A runtime on the smaller escalating model that escalates to `server` with `role`.
fn escalating_to_a_stronger_cloud(server: &LlamaServer, role: CloudRole) -> Runtime {
    let mut escalation = EscalationConfig::enabled(Some(llama_config(server)));
    escalation.cloud_role = role;
    // Its tests read the confidence of local replies, which no threshold reads here.
    loaded(
        RuntimeConfig::new(common::escalating_model_path())
            .with_slots(4)
            .with_escalation(escalation)
            .with_confidence_for_every_reply(true),
    )
}

fn add_npc(runtime: &Runtime, npc: NpcId, persona: Persona) {
    runtime.set_persona(npc, persona).unwrap();
    match runtime.events().recv_timeout(Duration::from_secs(60)) {
        Ok(Event::PersonaAccepted { npc: got, .. }) if got == npc => {}
        other => panic!("persona not accepted: {other:?}"),
    }
}

/// The reply to `request`: its streamed text, final text and stats.
fn reply(runtime: &Runtime, request: npc_native::RequestId) -> (String, String, ReplyStats) {
    let mut streamed = String::new();
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(180)) {
            Ok(Event::Delta {
                request: r, text, ..
            }) if r == request => streamed.push_str(&text),
            Ok(Event::Replied {
                request: r,
                text,
                stats,
                ..
            }) if r == request => return (streamed, text, stats),
            Ok(Event::Failed {
                request: r, error, ..
            }) if r == request => panic!("the reply failed: {error}"),
            Ok(_) => {}
            Err(err) => panic!("no reply: {err}"),
        }
    }
}

fn ask(runtime: &Runtime, npc: NpcId, line: &str) -> (String, String, ReplyStats) {
    let request = runtime.say(npc, line).unwrap();
    reply(runtime, request)
}

const IN_KNOWLEDGE: &str = "How much does an iron sword cost?";
const OUT_OF_KNOWLEDGE: &str = "What is the capital of France?";

#[test]
fn out_of_knowledge_questions_escalate_and_known_ones_stay_local() {
    let _serial = common::serial();
    captured_logs();
    let server = stronger_cloud();
    let runtime = escalating_to_a_stronger_cloud(&server, CloudRole::Speak);
    let npc = NpcId(1);
    add_npc(&runtime, npc, blacksmith());
    let (_, local, stats) = ask(&runtime, npc, IN_KNOWLEDGE);
    assert_eq!(stats.source, ReplySource::Local, "{local}");
    assert!(
        local.contains("40"),
        "the smaller model knows its price: {local}"
    );
    let confidence = stats
        .confidence
        .expect("local replies carry their confidence");
    // Every sampled token is scored, the end-of-turn token included.
    assert!(
        (stats.generated_tokens..=stats.generated_tokens + 1).contains(&confidence.tokens),
        "{confidence:?} {stats:?}"
    );
    assert!(confidence.p10_prob > 0.0 && confidence.p10_prob <= 1.0);
    let (streamed, cloud, stats) = ask(&runtime, npc, OUT_OF_KNOWLEDGE);
    assert_eq!(stats.source, ReplySource::Cloud, "{cloud}");
    assert_eq!(streamed.trim(), cloud);
    // The stronger model knows what the NPC's does not.
    assert!(cloud.contains("Paris"), "{cloud}");
    // A question about the game's own world the cloud cannot know either: it says so, and the
    // player hears the NPC's own don't-know line, never the cloud's "I don't know".
    let (streamed, line, unknown) = ask(&runtime, npc, "Which dragon burned the eastern farms?");
    assert_eq!(unknown.source, ReplySource::Fallback, "{line}");
    assert!(
        line == DEFAULT_FALLBACK_LINE || DEFAULT_DONT_KNOW.contains(&line.as_str()),
        "{line}"
    );
    assert_eq!(streamed, line, "only the NPC's line was streamed");
    let paid = unknown.cloud_fact.expect("the cloud call is counted");
    assert!(
        paid.prompt_tokens > 50 && paid.completion_tokens > 0,
        "{paid:?}"
    );
    assert!(
        stats.prompt_tokens > 50,
        "the persona prompt went along: {stats:?}"
    );
    assert!(stats.generated_tokens > 0);
    // The cloud's answer is part of the conversation: the next local prompt holds it.
    let (_, _, next) = ask(&runtime, npc, "And a horseshoe?");
    assert_eq!(next.source, ReplySource::Local);
    assert!(next.prompt_tokens > stats.generated_tokens, "{next:?}");
}

#[test]
fn with_the_inform_role_the_cloud_supplies_a_fact_and_the_local_model_voices_it() {
    let _serial = common::serial();
    let server = stronger_cloud();
    let runtime = escalating_to_a_stronger_cloud(&server, CloudRole::Inform);
    let npc = NpcId(1);
    add_npc(&runtime, npc, blacksmith());
    let (streamed, text, stats) = ask(&runtime, npc, OUT_OF_KNOWLEDGE);
    assert_eq!(stats.source, ReplySource::Informed, "{text}");
    assert_eq!(streamed.trim(), text);
    assert!(!text.is_empty());
    // The local model wrote the rest (perhaps only its end-of-turn token), with the fact as
    // a note before the line.
    assert!(stats.confidence.is_some_and(|c| c.tokens >= 1), "{stats:?}");
    assert!(stats.lore_entries >= 1, "{stats:?}");
    // Its first token is the fact, after the cloud's answer.
    assert!(stats.time_to_first_token > Duration::ZERO, "{stats:?}");
    // The cloud saw a short prompt and wrote a short answer: no persona, no history.
    let fact = stats.cloud_fact.expect("the cloud's tokens are reported");
    assert!(
        (10..120).contains(&fact.prompt_tokens),
        "{fact:?}: a short prompt"
    );
    assert!(
        (1..=u64::from(EscalationConfig::default().fact_max_tokens))
            .contains(&fact.completion_tokens),
        "{fact:?}"
    );
    // The NPC remembers the fact: asked again, it knows and stays local.
    runtime.inspect(npc).unwrap();
    let memories = loop {
        match runtime.events().recv_timeout(Duration::from_secs(60)) {
            Ok(Event::Mind { memories, .. }) => break memories,
            Ok(_) => {}
            Err(err) => panic!("no mind: {err}"),
        }
    };
    let learned = memories
        .iter()
        .find_map(|m| {
            m.text
                .strip_prefix(&format!("Asked \"{OUT_OF_KNOWLEDGE}\", you found out: "))
        })
        .unwrap_or_else(|| panic!("the fact is remembered: {memories:?}"));
    assert!(
        learned.contains("Paris"),
        "the stronger model's fact: {learned}"
    );
    // The reply opens with the fact, then the local model goes on in character.
    assert!(text.starts_with(learned), "{text:?} opens with {learned:?}");
    // Asked again in other words, it stays local and opens with the same fact: no cloud.
    let (_, again, stats) = ask(&runtime, npc, "So, what's the capital of France?");
    assert_eq!(stats.source, ReplySource::Local, "{again}");
    assert_eq!(stats.cloud_fact, None);
    assert!(
        again.starts_with(learned),
        "{again:?} opens with {learned:?}"
    );
    // A question the persona knows never goes out.
    let (_, local, stats) = ask(&runtime, npc, IN_KNOWLEDGE);
    assert_eq!(stats.source, ReplySource::Local, "{local}");
}

#[test]
fn the_cloud_reply_can_be_cancelled() {
    let _serial = common::serial();
    let server = LlamaServer::start(&common::model_path(), None);
    for role in [CloudRole::Speak, CloudRole::Inform] {
        cancel_a_cloud_reply(&server, role);
    }
}

fn cancel_a_cloud_reply(server: &LlamaServer, role: CloudRole) {
    let runtime = blacksmith_escalating(server, role);
    let npc = NpcId(1);
    let request = runtime.say(npc, OUT_OF_KNOWLEDGE).unwrap();
    runtime.cancel(npc).unwrap();
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(60)) {
            Ok(Event::Cancelled { request: r, .. }) if r == request => break,
            Ok(Event::Replied { request: r, .. }) if r == request => {
                panic!("{role:?}: a cancelled reply completed")
            }
            Ok(_) => {}
            Err(err) => panic!("no answer to the cancel: {err}"),
        }
    }
    // The NPC is free again and answers the next line.
    let (_, text, _) = ask(&runtime, npc, IN_KNOWLEDGE);
    assert!(!text.is_empty());
    // Nothing more arrives for the cancelled reply.
    while let Ok(event) = runtime.events().recv_timeout(Duration::from_millis(500)) {
        if let Event::Delta { request: r, .. } | Event::Replied { request: r, .. } = event {
            assert_ne!(r, request, "{role:?}: an event for the cancelled reply");
        }
    }
}

#[test]
fn a_fact_that_arrives_for_a_cancelled_line_is_dropped() {
    let _serial = common::serial();
    let server = LlamaServer::start(&common::model_path(), None);
    let runtime = blacksmith_escalating(&server, CloudRole::Inform);
    let npc = NpcId(1);
    let request = runtime.say(npc, OUT_OF_KNOWLEDGE).unwrap();
    // The worker sends the line to the cloud, then waits here while the fact comes back
    // (well under a second on loopback); the cancel reaches it after the fact has.
    let gate = common::hold(&runtime);
    std::thread::sleep(Duration::from_secs(3));
    runtime.cancel(npc).unwrap();
    drop(gate);
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(60)) {
            Ok(Event::Cancelled { request: r, .. }) if r == request => break,
            Ok(Event::Delta { request: r, .. } | Event::Replied { request: r, .. })
                if r == request =>
            {
                panic!("the cancelled line was answered")
            }
            Ok(_) => {}
            Err(err) => panic!("no answer to the cancel: {err}"),
        }
    }
    // The NPC is free, learned nothing, and nothing more arrives for the cancelled line.
    let (_, text, stats) = ask(&runtime, npc, IN_KNOWLEDGE);
    assert_eq!(stats.source, ReplySource::Local, "{text}");
    runtime.inspect(npc).unwrap();
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(60)) {
            Ok(Event::Mind { memories, .. }) => {
                assert!(
                    memories.iter().all(|m| !m.text.contains(OUT_OF_KNOWLEDGE)),
                    "{memories:?}"
                );
                break;
            }
            Ok(Event::Delta { request: r, .. } | Event::Replied { request: r, .. }) => {
                assert_ne!(r, request, "an event for the cancelled line");
            }
            Ok(_) => {}
            Err(err) => panic!("no mind: {err}"),
        }
    }
}

#[test]
fn a_failing_cloud_gets_the_fallback_line_and_the_game_goes_on() {
    let _serial = common::serial();
    let silent = MisbehavingServer::start(Misbehaviour::Silent);
    let garbage = MisbehavingServer::start(Misbehaviour::Garbage);
    let limited = MisbehavingServer::start(Misbehaviour::RateLimited {
        first: usize::MAX,
        then_port: None,
    });
    let down = format!("http://127.0.0.1:{}/v1", servers::free_port());
    let cases = [
        ("down", down),
        ("silent", silent.base_url()),
        ("garbage", garbage.base_url()),
        ("429", limited.base_url()),
    ];
    for role in [CloudRole::Speak, CloudRole::Inform] {
        for (what, url) in &cases {
            let what = format!("{what}, {role:?}");
            let mut escalation = EscalationConfig::enabled(Some(fast_config(url.clone())));
            escalation.cloud_role = role;
            fallback_then_local(escalation, &what);
        }
    }
}

/// An out-of-knowledge line gets the persona's fallback line; a known one stays local.
fn fallback_then_local(escalation: EscalationConfig, what: &str) {
    let runtime = runtime_with(escalation);
    let npc = NpcId(1);
    let mut persona = blacksmith();
    persona.escalation.fallback_line = Some("Can't help you there, friend.".into());
    add_npc(&runtime, npc, persona);
    let (streamed, text, stats) = ask(&runtime, npc, OUT_OF_KNOWLEDGE);
    assert_eq!(stats.source, ReplySource::Fallback, "{what}");
    assert_eq!(text, "Can't help you there, friend.", "{what}");
    assert_eq!(streamed, text, "{what}");
    let (_, local, stats) = ask(&runtime, npc, IN_KNOWLEDGE);
    assert_eq!(stats.source, ReplySource::Local, "{what}: {local}");
    assert!(!local.is_empty(), "{what}");
}

#[test]
fn a_question_the_npcs_lore_answers_stays_local() {
    let _serial = common::serial();
    // No cloud: a line that escalates gets the fallback line, which shows the routing.
    let runtime = runtime_with(EscalationConfig::enabled(None));
    let npc = NpcId(1);
    let mut persona = blacksmith();
    persona.lore_entries = vec![npc_native::LoreEntry {
        id: "inn".into(),
        title: "The Golden Goose".into(),
        text: "Marta runs the Golden Goose inn by the village well.".into(),
        keywords: Vec::new(),
    }];
    add_npc(&runtime, npc, persona.clone());
    let question = "Who runs the Golden Goose inn?";
    let (_, text, stats) = ask(&runtime, npc, question);
    assert_eq!(stats.source, ReplySource::Local, "{text}");
    assert!(
        stats.lore_entries >= 1,
        "the entry was in the prompt: {stats:?}"
    );
    let (_, text, stats) = ask(&runtime, npc, OUT_OF_KNOWLEDGE);
    assert_eq!(stats.source, ReplySource::Fallback, "{text}");
    // With lore off for this NPC (`retrieve: 0`) the entry is not in its prompt: not known.
    persona.retrieve = Some(0);
    add_npc(&runtime, NpcId(2), persona);
    let (_, text, stats) = ask(&runtime, NpcId(2), question);
    assert_eq!(stats.source, ReplySource::Fallback, "{text}");
}

#[test]
fn offline_mode_and_builds_without_a_cloud_answer_in_character() {
    let _serial = common::serial();
    let mut offline = EscalationConfig::enabled(Some(fast_config("http://127.0.0.1:9/v1".into())));
    offline.offline = true;
    for escalation in [offline, EscalationConfig::enabled(None)] {
        let runtime = runtime_with(escalation);
        add_npc(&runtime, NpcId(1), blacksmith());
        let (_, text, stats) = ask(&runtime, NpcId(1), OUT_OF_KNOWLEDGE);
        assert_eq!(
            (text.as_str(), stats.source),
            (DEFAULT_FALLBACK_LINE, ReplySource::Fallback)
        );
    }
}

#[test]
fn spend_cap_and_rate_limit_hold_under_a_burst() {
    let _serial = common::serial();
    let server = LlamaServer::start(&common::model_path(), None);
    // Rate limit: 2 escalations a minute, 6 NPCs ask at once.
    let mut rate = EscalationConfig::enabled(Some(llama_config(&server)));
    rate.max_escalations_per_minute = 2;
    rate.cloud_max_tokens = 16;
    // Spend cap: room for one escalation an hour. Its estimate is about $0.0012 (the
    // compressed persona prompt, ~300 characters at 4 characters a token and $10/M, plus
    // 16 tokens at $30/M).
    let mut spend = EscalationConfig::enabled(Some(llama_config(&server)));
    spend.max_spend_per_hour = 0.002;
    spend.cloud_max_tokens = 16;
    for (what, escalation, allowed) in [("rate limit", rate, 2), ("spend cap", spend, 1)] {
        let runtime = runtime_with(escalation);
        let npcs: Vec<NpcId> = (1..=6).map(NpcId).collect();
        for &npc in &npcs {
            add_npc(&runtime, npc, blacksmith());
        }
        let requests: Vec<_> = npcs
            .iter()
            .map(|&npc| runtime.say(npc, OUT_OF_KNOWLEDGE).unwrap())
            .collect();
        // Replies come in any order: fallbacks at once, cloud replies later.
        let mut sources = Vec::new();
        while sources.len() < requests.len() {
            match runtime.events().recv_timeout(Duration::from_secs(180)) {
                Ok(Event::Replied { request, stats, .. }) if requests.contains(&request) => {
                    sources.push(stats.source);
                }
                Ok(Event::Failed { error, .. }) => panic!("{what}: a reply failed: {error}"),
                Ok(_) => {}
                Err(err) => panic!("{what}: no reply: {err}"),
            }
        }
        let cloud = sources.iter().filter(|s| **s == ReplySource::Cloud).count();
        let fallback = sources
            .iter()
            .filter(|s| **s == ReplySource::Fallback)
            .count();
        assert_eq!(
            (cloud, fallback),
            (allowed, 6 - allowed),
            "{what}: {sources:?}"
        );
        // Still capped after the burst has finished.
        let (_, _, stats) = ask(&runtime, NpcId(1), "Who rules the kingdom beyond the sea?");
        assert_eq!(stats.source, ReplySource::Fallback, "{what}");
    }
}

#[test]
fn the_api_key_never_reaches_logs_debug_output_or_save_files() {
    let _serial = common::serial();
    let logs = captured_logs();
    // The server demands the key: a reply proves it was sent.
    let server = LlamaServer::start(&common::model_path(), Some(KEY));
    let config = llama_config(&server).with_api_key(KEY);
    let limited = MisbehavingServer::start(Misbehaviour::RateLimited {
        first: usize::MAX,
        then_port: None,
    });
    let mut failing = fast_config(limited.base_url()).with_api_key(KEY);
    failing.max_retries = 1;
    let runtime = runtime_with(EscalationConfig::enabled(Some(config.clone())));
    let npc = NpcId(1);
    add_npc(&runtime, npc, blacksmith());
    let (_, _, stats) = ask(&runtime, npc, OUT_OF_KNOWLEDGE);
    assert_eq!(
        stats.source,
        ReplySource::Cloud,
        "llama-server accepted the key"
    );
    let dir = common::scratch_dir("cloud-key");
    let save = dir.join("brom.npc");
    runtime.save_npc(npc, &save).unwrap();
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(60)) {
            Ok(Event::NpcSaved { .. }) => break,
            Ok(Event::NpcSaveFailed { error, .. }) => panic!("{error}"),
            Ok(_) => {}
            Err(err) => panic!("{err}"),
        }
    }
    drop(runtime);
    // A wrong key is refused by the server, and that is logged too.
    let wrong = llama_config(&server).with_api_key("sk-wrong");
    let runtime = runtime_with(EscalationConfig::enabled(Some(wrong)));
    add_npc(&runtime, npc, blacksmith());
    assert_eq!(
        ask(&runtime, npc, OUT_OF_KNOWLEDGE).2.source,
        ReplySource::Fallback
    );
    drop(runtime);
    let runtime = runtime_with(EscalationConfig::enabled(Some(failing.clone())));
    add_npc(&runtime, npc, blacksmith());
    assert_eq!(
        ask(&runtime, npc, OUT_OF_KNOWLEDGE).2.source,
        ReplySource::Fallback
    );
    drop(runtime);
    let saved = std::fs::read(&save).unwrap();
    assert!(!saved.windows(KEY.len()).any(|w| w == KEY.as_bytes()));
    let logged = logs::text(&logs);
    assert!(
        logged.contains("cloud reply failed"),
        "the failures were logged"
    );
    assert!(!logged.contains(KEY), "the key was logged");
    let debug = format!(
        "{config:?} {failing:?} {:?} {:?}",
        RuntimeConfig::default().with_escalation(EscalationConfig::enabled(Some(config.clone()))),
        CloudClient::new(config.clone())
    );
    assert!(!debug.contains(KEY), "{debug}");
}

#[test]
fn a_confidence_threshold_holds_local_replies_and_escalates_unsure_ones() {
    let _serial = common::serial();
    let server = LlamaServer::start(&common::model_path(), None);
    // Threshold 1.0: every reply has some token below probability 1, so every held reply is
    // replaced by the cloud's; threshold 0.0: none is, and each goes out as one delta.
    for (threshold, expected) in [(1.0, ReplySource::Cloud), (0.0, ReplySource::Local)] {
        let mut policy = EscalationConfig::enabled(Some(llama_config(&server)));
        policy.min_confidence = Some(threshold);
        let runtime = runtime_with(policy);
        add_npc(&runtime, NpcId(1), blacksmith());
        let request = runtime.say(NpcId(1), IN_KNOWLEDGE).unwrap();
        let mut deltas = Vec::new();
        let (text, stats) = loop {
            match runtime.events().recv_timeout(Duration::from_secs(180)) {
                Ok(Event::Delta {
                    request: r, text, ..
                }) if r == request => deltas.push(text),
                Ok(Event::Replied {
                    request: r,
                    text,
                    stats,
                    ..
                }) if r == request => break (text, stats),
                Ok(_) => {}
                Err(err) => panic!("no reply: {err}"),
            }
        };
        assert_eq!(stats.source, expected, "threshold {threshold}: {text}");
        assert_eq!(
            deltas.concat().trim(),
            text,
            "only the kept reply was streamed"
        );
        if expected == ReplySource::Local {
            assert_eq!(deltas.len(), 1, "a held local reply arrives as one delta");
            assert!(stats.confidence.is_some());
        }
    }
}
