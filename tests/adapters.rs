//! Per-NPC LoRA adapters on the test model: validation, scale 0 is the base model, mixed
//! batches equal solo replies, state files name their adapter, and a persona's adapter can
//! change between replies. Those adapters are synthetic (random low-rank weights written by
//! `npc_native::write_synthetic_adapter`): real GGUF LoRAs that llama.cpp loads and applies,
//! which teach the model nothing. The last two tests run the adapters `tools/lora/train.py`
//! trained (`cargo xtask setup` and `test` train them): a style the model learned.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use npc_native::escalation::EscalationConfig;
use npc_native::{
    Event, NpcError, NpcId, Persona, PersonaAdapter, ReplyStats, Runtime, RuntimeConfig,
    SyntheticAdapter, write_synthetic_adapter,
};

const WAIT: Duration = Duration::from_secs(120);

/// A folder (the runtime's asset folder) with two synthetic adapters for the test model,
/// `a.gguf` and `b.gguf`.
fn adapter_dir(name: &str) -> PathBuf {
    let dir = common::scratch_dir(name);
    for (file, seed) in [("a.gguf", 1), ("b.gguf", 2)] {
        let settings = SyntheticAdapter {
            seed,
            ..SyntheticAdapter::default()
        };
        write_synthetic_adapter(&common::model_path(), &dir.join(file), &settings).unwrap();
    }
    dir
}

/// The test model with `adapters` declared, in the asset folder `dir`, generating exactly
/// what the model writes (no guard, no don't-know reminder).
fn start(dir: &Path, adapters: &[&str]) -> Runtime {
    start_with(dir, adapters, true)
}

/// [`start`], with prewarm on or off.
fn start_with(dir: &Path, adapters: &[&str], prewarm: bool) -> Runtime {
    start_model(&common::model_path(), dir, adapters, prewarm)
}

/// [`start_with`] on `model`.
fn start_model(model: &Path, dir: &Path, adapters: &[&str], prewarm: bool) -> Runtime {
    let mut config = RuntimeConfig::new(model)
        .with_assets_dir(dir)
        .with_prewarm(prewarm)
        .with_guard(false)
        .with_escalation(EscalationConfig {
            dont_know_reminder: false,
            grounding_check: false,
            ..EscalationConfig::default()
        });
    for adapter in adapters {
        config = config.with_adapter(*adapter);
    }
    let runtime = Runtime::start(config);
    match runtime.events().recv_timeout(WAIT) {
        Ok(Event::ModelLoaded(_)) => runtime,
        other => panic!("model did not load: {other:?}"),
    }
}

/// The blacksmith, greedy, replies capped at `tokens`, on `adapter` at `scale` (`None`: the
/// base model).
fn blacksmith(adapter: Option<(&str, f32)>, tokens: u32) -> Persona {
    let mut persona = common::persona("blacksmith");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(tokens);
    persona.adapter = adapter.map(|(path, scale)| PersonaAdapter {
        path: path.to_owned(),
        scale,
    });
    persona
}

/// The persona's outcome: `Ok` when accepted, the error when rejected.
fn set(runtime: &Runtime, npc: NpcId, persona: Persona) -> Result<(), NpcError> {
    runtime.set_persona(npc, persona).unwrap();
    match common::next_event(runtime, WAIT) {
        Event::PersonaAccepted { npc: got, .. } if got == npc => Ok(()),
        Event::PersonaRejected { npc: got, error } if got == npc => Err(error),
        other => panic!("expected the persona's outcome, got {other:?}"),
    }
}

fn reply(runtime: &Runtime, npc: NpcId, line: &str) -> (String, ReplyStats) {
    common::replies_at_once(runtime, &[npc], line, WAIT)
        .pop()
        .unwrap()
}

/// An adapter must be declared, be a GGUF LoRA, and be made for the model; each failure is
/// a `PersonaRejected` naming the file and saying why, and the runtime goes on serving.
#[test]
fn a_bad_adapter_is_rejected_naming_the_file() {
    let _serial = common::serial();
    let dir = adapter_dir("adapters-bad");
    // An adapter for another architecture (Qwen2's), and a file that is not GGUF.
    write_synthetic_adapter(
        &common::escalating_model_path(),
        &dir.join("qwen.gguf"),
        &SyntheticAdapter::default(),
    )
    .unwrap();
    std::fs::write(dir.join("text.gguf"), "not an adapter").unwrap();
    let runtime = start(&dir, &["a.gguf", "qwen.gguf", "text.gguf", "missing.gguf"]);
    let npc = NpcId(1);
    let rejected =
        |path: &str, scale: f32| match set(&runtime, npc, blacksmith(Some((path, scale)), 8)) {
            Err(NpcError::Adapter {
                path: named,
                reason,
            }) => {
                assert_eq!(named, Path::new(path));
                reason
            }
            other => panic!("{path}: expected an adapter error, got {other:?}"),
        };
    assert!(rejected("qwen.gguf", 1.0).contains("made for a qwen2 model; the model is llama"));
    assert!(rejected("text.gguf", 1.0).contains("not a GGUF"));
    assert!(rejected("missing.gguf", 1.0).contains("no such file"));
    assert!(rejected("b.gguf", 1.0).contains("not among the runtime's adapters"));
    // Even at scale 0 (which runs the base model) a bad adapter is refused.
    assert!(rejected("qwen.gguf", 0.0).contains("qwen2"));
    match set(&runtime, npc, blacksmith(Some(("a.gguf", 9.0)), 8)) {
        Err(NpcError::InvalidPersona(message)) => assert!(message.contains("scale 9"), "{message}"),
        other => panic!("expected an invalid scale, got {other:?}"),
    }
    set(&runtime, npc, blacksmith(Some(("a.gguf", 1.0)), 8)).unwrap();
    let (text, _) = reply(&runtime, npc, "Who are you?");
    assert!(!text.is_empty());
}

/// Scale 0 is the base model exactly; scale 1 changes the reply.
#[test]
fn scale_zero_replies_exactly_as_the_base_model() {
    let _serial = common::serial();
    let dir = adapter_dir("adapters-scale");
    let runtime = start(&dir, &["a.gguf"]);
    let line = "Good day! What do you sell?";
    let mut replies = Vec::new();
    for (npc, adapter) in [
        (1, None),
        (2, Some(("a.gguf", 0.0))),
        (3, Some(("a.gguf", 1.0))),
    ] {
        set(&runtime, NpcId(npc), blacksmith(adapter, 32)).unwrap();
        replies.push(reply(&runtime, NpcId(npc), line).0);
    }
    assert_eq!(replies[0], replies[1], "scale 0 is the base model");
    assert_ne!(replies[0], replies[2], "the adapter changes the reply");
}

/// Six NPCs over the base model and two adapters (one at two scales), asked at once, reply
/// as each does alone: a step decodes each adapter's NPCs in their own call, and a prompt
/// prefix is copied only from a sequence on the same adapter at the same scale.
///
/// Two NPCs on one adapter are not asserted to say the same: the second copies the first's
/// prompt and computes its last prompt token in a decode of one token, and llama.cpp's CPU
/// kernels round some products differently for one token than for many (tinyBLAS serves only
/// two or more); how the first NPC's prompt was cut into chunks follows the step budget timed
/// at start-up. A near-tie on adapter b flipped on one machine (AMD EPYC, AVX2) and not on
/// another.
#[test]
fn mixed_adapter_batches_equal_solo_replies() {
    let _serial = common::serial();
    let dir = adapter_dir("adapters-mixed");
    let adapters = [
        None,
        Some(("a.gguf", 1.0)),
        Some(("b.gguf", 1.0)),
        None,
        Some(("a.gguf", 0.5)),
        Some(("b.gguf", 1.0)),
    ];
    let npcs: Vec<NpcId> = (0..adapters.len() as u64).map(NpcId).collect();
    let line = "Who are you, and what do you make?";
    let replies = |together: bool| {
        // Without prewarm, the copies happen at reply time and the replies' stats show them.
        let runtime = start_with(&dir, &["a.gguf", "b.gguf"], false);
        for (&npc, &adapter) in npcs.iter().zip(&adapters) {
            set(&runtime, npc, blacksmith(adapter, 16)).unwrap();
        }
        if together {
            common::replies_at_once(&runtime, &npcs, line, WAIT)
        } else {
            npcs.iter().map(|&npc| reply(&runtime, npc, line)).collect()
        }
    };
    let solo = replies(false);
    let mixed = replies(true);
    for (at, (solo, mixed)) in solo.iter().zip(&mixed).enumerate() {
        assert_eq!(solo.0, mixed.0, "NPC {at} on {:?}", adapters[at]);
    }
    // Asked one at a time, NPCs 3 (base) and 5 (adapter b) copy the prefix of an earlier NPC
    // on theirs (0 and 2); NPC 4 (adapter a at 0.5) finds none at its scale.
    let shared: Vec<usize> = solo.iter().map(|(_, stats)| stats.shared_tokens).collect();
    for (at, &tokens) in shared.iter().enumerate() {
        assert_eq!(
            tokens > 0,
            at == 3 || at == 5,
            "NPC {at} on {:?} shared {tokens} tokens: {shared:?}",
            adapters[at]
        );
    }
    assert_ne!(solo[0].0, solo[1].0, "adapter a changes the reply");
    assert_ne!(solo[1].0, solo[2].0, "adapters a and b differ");
    assert_ne!(solo[1].0, solo[4].0, "scale 0.5 differs from scale 1");
}

/// A state file's header names the adapter its KV was computed with: loaded under the same
/// adapter the KV is restored (and the reply is the live one); under another, the
/// conversation loads and the KV is recomputed.
#[test]
fn a_state_saved_under_one_adapter_is_recomputed_under_another() {
    let _serial = common::serial();
    let dir = adapter_dir("adapters-state");
    let path = dir.join("brom.state");
    let question = "And how much is a horseshoe?";
    let live = start(&dir, &["a.gguf", "b.gguf"]);
    let npc = NpcId(1);
    set(&live, npc, blacksmith(Some(("a.gguf", 1.0)), 24)).unwrap();
    reply(&live, npc, "Good morning, Brom.");
    live.save_npc(npc, &path).unwrap();
    let saved = match common::next_event(&live, WAIT) {
        Event::NpcSaved { kv_tokens, .. } => kv_tokens,
        other => panic!("expected NpcSaved, got {other:?}"),
    };
    assert!(saved > 50);
    let (live_text, _) = reply(&live, npc, question);
    drop(live);

    let runtime = start(&dir, &["a.gguf", "b.gguf"]);
    let loaded = |npc: NpcId| match common::next_event(&runtime, WAIT) {
        Event::NpcLoaded {
            npc: got,
            turns,
            kv_tokens,
            kv_note,
            ..
        } if got == npc => (turns, kv_tokens, kv_note),
        other => panic!("expected NpcLoaded, got {other:?}"),
    };
    let same = NpcId(2);
    set(&runtime, same, blacksmith(Some(("a.gguf", 1.0)), 24)).unwrap();
    runtime.load_npc(same, &path).unwrap();
    assert_eq!(loaded(same), (1, saved, None));
    let (text, stats) = reply(&runtime, same, question);
    assert_eq!(text, live_text);
    assert!(stats.cached_tokens >= saved - 1, "{stats:?}");

    for (other, adapter) in [
        (NpcId(3), Some(("b.gguf", 1.0))),
        (NpcId(4), Some(("a.gguf", 0.5))),
        (NpcId(5), None),
    ] {
        set(&runtime, other, blacksmith(adapter, 24)).unwrap();
        runtime.load_npc(other, &path).unwrap();
        let (turns, kv_tokens, note) = loaded(other);
        assert_eq!((turns, kv_tokens), (1, 0), "{adapter:?}");
        let note = note.unwrap();
        assert!(note.contains("saved with the LoRA adapter"), "{note}");
    }
}

/// Changing a persona's adapter takes effect on its next reply, which is the reply of an
/// NPC that had that adapter all along and the same conversation (its KV computed under
/// the base model is not reused).
#[test]
fn a_reloaded_persona_changes_its_adapter_on_the_next_reply() {
    let _serial = common::serial();
    let dir = adapter_dir("adapters-reload");
    let path = dir.join("history.state");
    // No prewarm: a reply's cached tokens are then only what it found in the cache.
    let runtime = start_with(&dir, &["a.gguf"], false);
    let (switched, kept) = (NpcId(1), NpcId(2));
    for npc in [switched, kept] {
        set(&runtime, npc, blacksmith(None, 24)).unwrap();
        reply(&runtime, npc, "Good morning, Brom.");
    }
    runtime.save_npc(switched, &path).unwrap();
    assert!(matches!(
        common::next_event(&runtime, WAIT),
        Event::NpcSaved { .. }
    ));
    set(&runtime, switched, blacksmith(Some(("a.gguf", 1.0)), 24)).unwrap();
    let question = "What do you sell?";
    let (on_adapter, stats) = reply(&runtime, switched, question);
    let (on_base, _) = reply(&runtime, kept, question);
    assert_ne!(on_adapter, on_base);
    assert_eq!(
        stats.cached_tokens, 0,
        "base-model KV is not reused: {stats:?}"
    );

    // The same conversation, on the adapter from the start.
    let reference = NpcId(3);
    set(&runtime, reference, blacksmith(Some(("a.gguf", 1.0)), 24)).unwrap();
    runtime.load_npc(reference, &path).unwrap();
    assert!(matches!(
        common::next_event(&runtime, WAIT),
        Event::NpcLoaded { kv_tokens: 0, .. }
    ));
    assert_eq!(reply(&runtime, reference, question).0, on_adapter);

    // And back to the base model: none of its adapter KV is reused, only the persona
    // prefix a base-model NPC (`kept`) has computed is copied.
    set(&runtime, switched, blacksmith(None, 24)).unwrap();
    let (back, stats) = reply(&runtime, switched, "Thank you.");
    assert!(!back.is_empty());
    assert_eq!(stats.cached_tokens, stats.shared_tokens, "{stats:?}");
}

/// Lines the sea-talk adapter was not trained on (its pairs are `tools/lora/sea-talk/
/// pairs.txt`): the style it learned must carry over to them.
const UNSEEN_LINES: [&str; 20] = [
    "Good morning!",
    "How deep is the river?",
    "Where does this river go?",
    "Can two people cross at once?",
    "What is the fare for a child?",
    "Do you know the innkeeper?",
    "Is it going to rain?",
    "What do you do in winter?",
    "Have you lived here long?",
    "Can you row faster?",
    "Which way is the market?",
    "Do you have a map?",
    "What's your name?",
    "Is the ferry open on holidays?",
    "Have you ever lost a passenger?",
    "What is that bird over there?",
    "I need to get to the mill.",
    "Are you tired?",
    "Do you know any songs?",
    "Farewell, ferrywoman.",
];

/// How many of the unseen lines Mags answers with "Arr," on `adapter` (trained by
/// `tools/lora/train.py` for `model`) and without it; both sets of replies are printed.
fn sea_talk_share(model: &Path, adapter: &str) -> (usize, usize) {
    assert!(
        common::root().join("assets").join(adapter).is_file(),
        "assets/{adapter} is missing: `cargo xtask test` trains it (tools/lora/README.md)"
    );
    let runtime = start_model(model, &common::root().join("assets"), &[adapter], true);
    // The RPG's ferrywoman, whose persona names the default model's adapter.
    let mut mags = common::persona("ferrywoman");
    mags.adapter = None;
    let styled = |text: &str| {
        text.trim_start_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase()
            .starts_with("arr")
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for (at, line) in UNSEEN_LINES.iter().enumerate() {
        let (on, off) = (NpcId(2 * at as u64 + 1), NpcId(2 * at as u64 + 2));
        let mut adapted = mags.clone();
        adapted.adapter = Some(PersonaAdapter {
            path: adapter.into(),
            scale: 1.0,
        });
        set(&runtime, on, adapted).unwrap();
        set(&runtime, off, mags.clone()).unwrap();
        let replies = common::replies_at_once(&runtime, &[on, off], line, WAIT);
        with.push(replies[0].0.clone());
        without.push(replies[1].0.clone());
    }
    println!("on the adapter: {with:#?}\nwithout it: {without:#?}");
    let count = |replies: &[String]| replies.iter().filter(|r| styled(r)).count();
    (count(&with), count(&without))
}

/// The adapter trained for the test model (`cargo xtask test` trains it once and caches
/// it): Mags, whose persona says nothing of how she speaks, opens her replies with "Arr,"
/// on it. Asked 20 lines she never saw in training, with her sampling (the runtime's
/// temperature and seed), she does so in at least 18 (90 %) on the adapter and in at most
/// one (5 %) without it.
#[test]
fn the_trained_adapter_gives_its_style_to_unseen_lines() {
    let _serial = common::serial();
    let (with, without) =
        sea_talk_share(&common::model_path(), "adapters/sea-talk.smollm2-135m.gguf");
    assert!(with >= 18, "{with} of 20 on the adapter");
    assert!(without <= 1, "{without} of 20 without it");
}

/// The same on the default model, with the adapter the RPG demo's ferrywoman speaks
/// through (`cargo xtask setup` trains it).
#[test]
fn the_default_models_trained_adapter_gives_its_style_to_unseen_lines() {
    let _serial = common::serial();
    let (with, without) = sea_talk_share(
        &common::default_model_path(),
        "adapters/sea-talk.qwen2.5-coder-1.5b.gguf",
    );
    assert!(with >= 18, "{with} of 20 on the adapter");
    assert!(without <= 1, "{without} of 20 without it");
}
