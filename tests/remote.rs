//! NPC replies served by an inference server ([`RemoteConfig`]): llama.cpp's real
//! `llama-server` on loopback serving the same test model the runtime loads, and loopback
//! servers that fail the ways a server can (down, garbage, 429, a stream that breaks, a
//! scripted stream for what the runtime must still do above the model: actions, the secret
//! guard). Feature `cloud`; `cargo xtask test` builds `llama-server` and runs these.

mod common;
#[path = "common/servers.rs"]
mod servers;

use std::time::Duration;

use npc_native::{
    Backend, CloudConfig, Event, FinishReason, NpcId, Persona, RemoteConfig, ReplySource,
    ReplyStats, RequestId, Runtime, RuntimeConfig,
};
use servers::{LlamaServer, MisbehavingServer, Misbehaviour};

fn remote(base_url: String) -> RemoteConfig {
    let mut server = CloudConfig::new(base_url, "default");
    server.connect_timeout = Duration::from_secs(2);
    server.read_timeout = Duration::from_secs(60);
    server.max_retries = 1;
    server.backoff = Duration::from_millis(20);
    RemoteConfig::for_server(server)
}

/// A remote configuration that gives up fast (for servers that fail).
fn impatient(base_url: String) -> RemoteConfig {
    let mut config = remote(base_url);
    config.server.read_timeout = Duration::from_millis(400);
    config
}

fn start(remote: RemoteConfig) -> Runtime {
    let runtime = Runtime::start(
        RuntimeConfig::new(common::model_path())
            .with_slots(4)
            .with_remote(remote),
    );
    match runtime.events().recv_timeout(Duration::from_secs(120)) {
        // The local model stays loaded by default (the fallback, the summaries).
        Ok(Event::ModelLoaded(info)) if info.generates_locally() => runtime,
        other => panic!("model did not load: {other:?}"),
    }
}

fn greedy(name: &str) -> Persona {
    let mut persona = common::persona(name);
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(40);
    persona
}

fn add_npc(runtime: &Runtime, npc: NpcId, persona: Persona) {
    runtime.set_persona(npc, persona).unwrap();
    match runtime.events().recv_timeout(Duration::from_secs(60)) {
        Ok(Event::PersonaAccepted { npc: got, .. }) if got == npc => {}
        other => panic!("persona not accepted: {other:?}"),
    }
}

/// Everything the game heard about one line.
#[derive(Debug, Default)]
struct Heard {
    streamed: String,
    text: String,
    stats: Option<ReplyStats>,
    actions: Vec<String>,
    failed: Option<String>,
    cancelled: bool,
    terminal_events: usize,
}

/// Collects the events of `request` until its terminal event (and checks there is one).
fn hear(runtime: &Runtime, request: RequestId) -> Heard {
    hear_all(runtime, &[request]).remove(0)
}

/// Collects the events of every request in `requests` until each has its terminal event,
/// then checks for a moment that none gets a second one.
fn hear_all(runtime: &Runtime, requests: &[RequestId]) -> Vec<Heard> {
    let mut heard: Vec<Heard> = requests.iter().map(|_| Heard::default()).collect();
    let at = |r: RequestId| requests.iter().position(|&q| q == r);
    let take = |event: Event, heard: &mut Vec<Heard>| match event {
        Event::Delta { request, text, .. } => {
            if let Some(i) = at(request) {
                heard[i].streamed.push_str(&text);
            }
        }
        Event::ActionRequested {
            request, action, ..
        } => {
            if let Some(i) = at(request) {
                heard[i].actions.push(action.name.clone());
            }
        }
        Event::Replied {
            request,
            text,
            stats,
            ..
        } => {
            if let Some(i) = at(request) {
                heard[i].text = text;
                heard[i].stats = Some(stats);
                heard[i].terminal_events += 1;
            }
        }
        Event::Failed { request, error, .. } => {
            if let Some(i) = at(request) {
                heard[i].failed = Some(error.to_string());
                heard[i].terminal_events += 1;
            }
        }
        Event::Cancelled { request, .. } => {
            if let Some(i) = at(request) {
                heard[i].cancelled = true;
                heard[i].terminal_events += 1;
            }
        }
        _ => {}
    };
    while heard.iter().any(|h| h.terminal_events == 0) {
        match runtime.events().recv_timeout(Duration::from_secs(180)) {
            Ok(event) => take(event, &mut heard),
            Err(err) => panic!("no terminal event for one of {requests:?}: {err}: {heard:?}"),
        }
    }
    // Anything more about these requests would be a second terminal event.
    while let Ok(event) = runtime.events().recv_timeout(Duration::from_millis(200)) {
        take(event, &mut heard);
    }
    for h in &heard {
        assert_eq!(h.terminal_events, 1, "{h:?}");
    }
    heard
}

fn ask(runtime: &Runtime, npc: NpcId, line: &str) -> Heard {
    let request = runtime.say(npc, line).unwrap();
    hear(runtime, request)
}

fn stats(heard: &Heard) -> &ReplyStats {
    heard
        .stats
        .as_ref()
        .unwrap_or_else(|| panic!("no reply: {heard:?}"))
}

#[test]
fn a_remote_npc_is_served_by_llama_server_and_its_prompt_prefix_stays_cached() {
    let _serial = common::serial();
    let server = LlamaServer::start_on_all_cores(&common::model_path());
    let runtime = start(remote(server.base_url()));
    let npc = NpcId(1);
    add_npc(&runtime, npc, greedy("blacksmith"));
    let lines = [
        "Hello there.",
        "What do you sell?",
        "How much is a sword?",
        "Thank you.",
    ];
    for (turn, line) in lines.iter().enumerate() {
        let heard = ask(&runtime, npc, line);
        let stats = stats(&heard);
        assert_eq!(stats.source, ReplySource::Remote, "{heard:?}");
        assert!(!heard.text.is_empty(), "{heard:?}");
        assert_eq!(
            heard.streamed.trim(),
            heard.text,
            "what streamed is the reply"
        );
        assert!(
            stats.generated_tokens > 0 && stats.prompt_tokens > 50,
            "{stats:?}"
        );
        assert!(
            stats.confidence.is_none(),
            "no logits from a server: {stats:?}"
        );
        if turn > 0 {
            // The persona and earlier turns come first and byte-identical: the server's
            // prefix cache holds all but the newest turn.
            let share = stats.cached_tokens as f64 / stats.prompt_tokens as f64;
            assert!(share >= 0.8, "turn {turn}: {share:.2} cached ({stats:?})");
        }
    }
    // The conversation the runtime keeps is the server's replies: a save holds them all.
    let dir = common::scratch_dir("remote-save");
    let path = dir.join("brom.npc");
    runtime.save_npc(npc, path.clone()).unwrap();
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(30)) {
            Ok(Event::NpcSaved { kv_tokens, .. }) => {
                assert_eq!(kv_tokens, 0, "no local KV state for a remote NPC");
                break;
            }
            Ok(Event::NpcSaveFailed { error, .. }) => panic!("{error}"),
            Ok(_) => {}
            Err(err) => panic!("{err}"),
        }
    }
    runtime.load_npc(npc, path).unwrap();
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(30)) {
            Ok(Event::NpcLoaded { turns, .. }) => {
                assert_eq!(turns, lines.len());
                break;
            }
            Ok(Event::NpcLoadFailed { error, .. }) => panic!("{error}"),
            Ok(_) => {}
            Err(err) => panic!("{err}"),
        }
    }
}

#[test]
fn local_and_remote_npcs_coexist_and_a_persona_reload_switches_the_backend() {
    let _serial = common::serial();
    let server = LlamaServer::start_on_all_cores(&common::model_path());
    let runtime = start(remote(server.base_url()).for_all_npcs(false));
    let (local, remote) = (NpcId(1), NpcId(2));
    add_npc(&runtime, local, greedy("blacksmith"));
    let mut on_server = greedy("guard");
    on_server.backend = Some(Backend::Remote);
    add_npc(&runtime, remote, on_server.clone());
    // Both at once: one on the local model, one on the server.
    let first = runtime.say(local, "Hello.").unwrap();
    let second = runtime.say(remote, "Hello.").unwrap();
    let both = hear_all(&runtime, &[first, second]);
    assert_eq!(stats(&both[0]).source, ReplySource::Local, "{both:?}");
    assert_eq!(stats(&both[1]).source, ReplySource::Remote, "{both:?}");
    // Hot reload: the guard's next reply is local.
    on_server.backend = Some(Backend::Local);
    add_npc(&runtime, remote, on_server);
    assert_eq!(
        stats(&ask(&runtime, remote, "Open the gate.")).source,
        ReplySource::Local
    );
}

/// The server has no LoRA adapter: an NPC on one stays on the local model while every other
/// NPC runs on the server, unless its persona asks for the server.
#[test]
fn an_npc_on_a_lora_adapter_stays_on_the_local_model() {
    let _serial = common::serial();
    let server = LlamaServer::start_on_all_cores(&common::model_path());
    let dir = common::scratch_dir("remote-adapter");
    npc_native::write_synthetic_adapter(
        &common::model_path(),
        &dir.join("a.gguf"),
        &npc_native::SyntheticAdapter::default(),
    )
    .unwrap();
    let runtime = Runtime::start(
        RuntimeConfig::new(common::model_path())
            .with_slots(4)
            .with_assets_dir(&dir)
            .with_adapter("a.gguf")
            .with_remote(remote(server.base_url())),
    );
    assert!(matches!(
        runtime.events().recv_timeout(Duration::from_secs(120)),
        Ok(Event::ModelLoaded(_))
    ));
    let on_adapter = |backend: Option<Backend>| {
        let mut persona = greedy("blacksmith");
        persona.adapter = Some(npc_native::PersonaAdapter {
            path: "a.gguf".into(),
            scale: 1.0,
        });
        persona.backend = backend;
        persona
    };
    let (plain, adapted, sent) = (NpcId(1), NpcId(2), NpcId(3));
    add_npc(&runtime, plain, greedy("blacksmith"));
    add_npc(&runtime, adapted, on_adapter(None));
    add_npc(&runtime, sent, on_adapter(Some(Backend::Remote)));
    for (npc, source) in [
        (plain, ReplySource::Remote),
        (adapted, ReplySource::Local),
        (sent, ReplySource::Remote),
    ] {
        assert_eq!(
            stats(&ask(&runtime, npc, "Hello.")).source,
            source,
            "{npc:?}"
        );
    }
}

/// This process's resident memory (Linux's `/proc/self/statm`), in bytes.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux's /proc");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Waits for the event `pick` takes (skipping others), or fails after 60 s.
fn wait_for<T>(runtime: &Runtime, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(60)) {
            Ok(event) => {
                if let Some(found) = pick(event) {
                    return found;
                }
            }
            Err(err) => panic!("the event did not come: {err}"),
        }
    }
}

/// `RemoteConfig::local_model` off: the runtime reads the file's vocabulary and template
/// alone (no weights), the server answers every NPC (one whose persona asks for the local
/// model too) from a prompt its cache keeps, a save carries the conversation to another
/// NPC, and once the server is gone the NPC says its don't-know line.
#[test]
fn without_a_local_model_every_npc_is_served_remotely_and_a_failed_line_gets_the_dont_know_line() {
    let _serial = common::serial();
    let server = LlamaServer::start_on_all_cores(&common::model_path());
    let config = RuntimeConfig::new(common::model_path())
        .with_slots(4)
        .with_remote(remote(server.base_url()).with_local_model(false));
    let context_size = config.context_size;
    let before = resident_bytes();
    let runtime = Runtime::start(config);
    let info = wait_for(&runtime, |event| match event {
        Event::ModelLoaded(info) => Some(info),
        Event::ModelFailed(error) => panic!("{error}"),
        _ => None,
    });
    assert_eq!(info.device, "none", "{info:?}");
    assert!(!info.generates_locally());
    assert_eq!(info.context_per_npc, context_size);
    // No weights, no KV cache: the process grows by the vocabulary, not the model.
    let grown = resident_bytes().saturating_sub(before);
    let file = std::fs::metadata(common::model_path()).unwrap().len();
    println!("resident memory grew by {grown} bytes; the model file is {file}");
    assert!(
        grown < file / 2,
        "grew by {grown} bytes, the file is {file}"
    );
    let (brom, guard, heir) = (NpcId(1), NpcId(2), NpcId(3));
    add_npc(&runtime, brom, greedy("blacksmith"));
    let mut wants_local = greedy("guard");
    wants_local.backend = Some(Backend::Local);
    add_npc(&runtime, guard, wants_local);
    let first = runtime.say(brom, "Hello there.").unwrap();
    let second = runtime.say(guard, "Hello.").unwrap();
    for heard in hear_all(&runtime, &[first, second]) {
        assert_eq!(stats(&heard).source, ReplySource::Remote, "{heard:?}");
        assert!(!heard.text.trim().is_empty(), "{heard:?}");
    }
    let again = ask(&runtime, brom, "What do you sell?");
    assert_eq!(stats(&again).source, ReplySource::Remote, "{again:?}");
    assert!(
        stats(&again).cached_tokens > 0,
        "the server's cache held the first turn's prefix: {again:?}"
    );
    let dir = common::scratch_dir("remote-only");
    let file = dir.join("brom.npc");
    runtime.save_npc(brom, &file).unwrap();
    wait_for(&runtime, |event| match event {
        Event::NpcSaved { npc, .. } if npc == brom => Some(()),
        Event::NpcSaveFailed { error, .. } => panic!("{error}"),
        _ => None,
    });
    add_npc(&runtime, heir, greedy("blacksmith"));
    runtime.load_npc(heir, &file).unwrap();
    let turns = wait_for(&runtime, |event| match event {
        Event::NpcLoaded { npc, turns, .. } if npc == heir => Some(turns),
        Event::NpcLoadFailed { error, .. } => panic!("{error}"),
        _ => None,
    });
    assert_eq!(turns, 2);
    let heard = ask(&runtime, heir, "Hello again.");
    assert_eq!(stats(&heard).source, ReplySource::Remote, "{heard:?}");
    drop(server);
    let heard = ask(&runtime, brom, "Anything else?");
    assert_eq!(stats(&heard).source, ReplySource::Fallback, "{heard:?}");
    assert!(!heard.text.trim().is_empty(), "{heard:?}");
}

#[test]
fn when_the_server_is_down_the_local_model_answers_or_the_npc_says_it_does_not_know() {
    let _serial = common::serial();
    let nowhere = format!("http://127.0.0.1:{}/v1", servers::free_port());
    let runtime = start(impatient(nowhere.clone()));
    add_npc(&runtime, NpcId(1), greedy("blacksmith"));
    let heard = ask(&runtime, NpcId(1), "What do you sell?");
    assert_eq!(stats(&heard).source, ReplySource::Local, "{heard:?}");
    assert!(!heard.text.is_empty());
    drop(runtime);
    let runtime = start(impatient(nowhere).with_local_fallback(false));
    add_npc(&runtime, NpcId(1), greedy("blacksmith"));
    let heard = ask(&runtime, NpcId(1), "What do you sell?");
    assert_eq!(stats(&heard).source, ReplySource::Fallback, "{heard:?}");
    assert!(!heard.text.is_empty());
    // The game goes on: the next line gets the same graceful answer, not an error.
    let again = ask(&runtime, NpcId(1), "Anything else?");
    assert_eq!(stats(&again).source, ReplySource::Fallback, "{again:?}");
}

#[test]
fn garbage_falls_back_and_rate_limits_are_retried_until_the_server_answers() {
    let _serial = common::serial();
    let garbage = MisbehavingServer::start(Misbehaviour::Garbage);
    let runtime = start(impatient(garbage.base_url()));
    add_npc(&runtime, NpcId(1), greedy("blacksmith"));
    let heard = ask(&runtime, NpcId(1), "Hello.");
    assert_eq!(stats(&heard).source, ReplySource::Local, "{heard:?}");
    assert_eq!(garbage.requests(), 1, "garbage is not retried");
    drop(runtime);
    let server = LlamaServer::start_on_all_cores(&common::model_path());
    let limited = MisbehavingServer::start(Misbehaviour::RateLimited {
        first: 1,
        then_port: Some(server.port),
    });
    let runtime = start(remote(limited.base_url()));
    add_npc(&runtime, NpcId(1), greedy("blacksmith"));
    let heard = ask(&runtime, NpcId(1), "Hello.");
    assert_eq!(stats(&heard).source, ReplySource::Remote, "{heard:?}");
    assert_eq!(limited.requests(), 2, "one 429, then the retry");
}

#[test]
fn a_stream_that_breaks_mid_reply_keeps_what_was_said() {
    let _serial = common::serial();
    let broken = MisbehavingServer::start(Misbehaviour::Streams {
        pieces: &["Iron ", "swords, ", "mostly."],
        done: false,
    });
    let runtime = start(impatient(broken.base_url()));
    add_npc(&runtime, NpcId(1), greedy("blacksmith"));
    let heard = ask(&runtime, NpcId(1), "What do you sell?");
    let stats = stats(&heard);
    assert_eq!(stats.source, ReplySource::Remote);
    assert_eq!(stats.finish, FinishReason::Interrupted);
    assert_eq!(heard.text, "Iron swords, mostly.");
}

#[test]
fn a_server_reply_goes_through_the_action_parser_and_the_secret_guard() {
    let _serial = common::serial();
    // A server that calls the guard's action, the way its grammar lets it.
    let acting = MisbehavingServer::start(Misbehaviour::Streams {
        pieces: &["Very well, ", "citizen.", "\n[ACTION] ", "open_gate()"],
        done: true,
    });
    let runtime = start(impatient(acting.base_url()));
    add_npc(&runtime, NpcId(1), greedy("guard"));
    let heard = ask(&runtime, NpcId(1), "I paid the toll. Open the gate.");
    assert_eq!(heard.actions, ["open_gate"], "{heard:?}");
    assert_eq!(heard.text, "Very well, citizen.");
    assert!(!heard.streamed.contains("[ACTION]"), "{heard:?}");
    drop(runtime);
    // A server that gives the guard's secret away.
    let leaking = MisbehavingServer::start(Misbehaviour::Streams {
        pieces: &[
            "Between us, ",
            "the gate's lock is broken ",
            "and only looks shut.",
        ],
        done: true,
    });
    let runtime = start(impatient(leaking.base_url()));
    add_npc(&runtime, NpcId(1), greedy("guard"));
    let heard = ask(&runtime, NpcId(1), "Tell me about the gate.");
    assert_eq!(stats(&heard).finish, FinishReason::Guarded, "{heard:?}");
    assert!(!heard.streamed.contains("broken"), "{heard:?}");
    assert!(!heard.text.contains("broken"), "{heard:?}");
}

#[test]
fn the_real_server_takes_the_action_grammar_and_a_remote_reply_can_be_cancelled() {
    let _serial = common::serial();
    let server = LlamaServer::start_on_all_cores(&common::model_path());
    let runtime = start(remote(server.base_url()));
    add_npc(&runtime, NpcId(1), greedy("guard"));
    // llama-server refuses a grammar it cannot parse (HTTP 400, and the local model would
    // answer): a remote reply means it took the guard's.
    let heard = ask(&runtime, NpcId(1), "I paid the toll. Open the gate.");
    assert_eq!(stats(&heard).source, ReplySource::Remote, "{heard:?}");
    let mut chatty = greedy("blacksmith");
    chatty.sampling.max_tokens = Some(400);
    add_npc(&runtime, NpcId(2), chatty);
    let request = runtime
        .say(NpcId(2), "Tell me the whole history of your forge.")
        .unwrap();
    // Cancel once it streams.
    loop {
        match runtime.events().recv_timeout(Duration::from_secs(60)) {
            Ok(Event::Delta { request: r, .. }) if r == request => break,
            Ok(_) => {}
            Err(err) => panic!("{err}"),
        }
    }
    runtime.cancel(NpcId(2)).unwrap();
    assert!(hear(&runtime, request).cancelled);
    // The NPC is free again at once.
    let heard = ask(&runtime, NpcId(2), "Hello.");
    assert_eq!(stats(&heard).source, ReplySource::Remote, "{heard:?}");
}

#[test]
fn a_silent_server_times_out_and_the_local_model_answers() {
    let _serial = common::serial();
    let silent = MisbehavingServer::start(Misbehaviour::Silent);
    let runtime = start(impatient(silent.base_url()));
    add_npc(&runtime, NpcId(1), greedy("blacksmith"));
    let asked = std::time::Instant::now();
    let heard = ask(&runtime, NpcId(1), "What do you sell?");
    assert_eq!(stats(&heard).source, ReplySource::Local, "{heard:?}");
    // Two attempts of 400 ms each (the read timeout), then the local reply.
    assert_eq!(silent.requests(), 2);
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "{:?}",
        asked.elapsed()
    );
}

/// The chat example on the server with `--remote`, the local model loaded, then also with
/// `NPC_AI_REMOTE_ONLY=1`, which reads only the model's vocabulary.
#[test]
fn the_chat_example_runs_its_npc_on_a_server_with_one_flag() {
    let _serial = common::serial();
    let server = LlamaServer::start_on_all_cores(&common::model_path());
    for only in ["0", "1"] {
        let mut child = std::process::Command::new(common::example_binary("chat"))
            .args(["--persona", "assets/personas/blacksmith.persona.ron"])
            .arg("--model")
            .arg(common::model_path())
            .args(["--remote", &server.base_url()])
            .env("NPC_AI_REMOTE_ONLY", only)
            .current_dir(common::root())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the chat example");
        let mut stdin = child.stdin.take().unwrap();
        use std::io::Write;
        writeln!(stdin, "Hello there.").unwrap();
        writeln!(stdin, "What do you sell?").unwrap();
        drop(stdin);
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert_eq!(
            stderr.contains("read for its vocabulary and template"),
            only == "1",
            "NPC_AI_REMOTE_ONLY={only}: {stderr}"
        );
        let stats: Vec<&str> = stdout
            .lines()
            .filter(|line| line.contains("prompt tokens cached]"))
            .collect();
        assert_eq!(stats.len(), 2, "{stdout}");
        assert!(
            stats.iter().all(|line| line.contains("[Remote: ")),
            "both replies came from the server: {stdout}"
        );
        // The cost report at the end counts the server's tokens.
        assert!(stdout.contains("inference server: 2 replies"), "{stdout}");
    }
}
