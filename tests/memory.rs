//! Lore retrieval, budgets, long-term memory and the rolling summary, against a real model
//! (the test model; the model-written summary tests the default model).

mod common;

use std::time::Duration;

use npc_native::{
    Event, LoreBook, LoreIndex, NpcError, NpcId, Persona, Priority, ReplyStats, Runtime,
    RuntimeConfig, SayOptions,
};

const WAIT: Duration = Duration::from_secs(120);

fn start() -> Runtime {
    start_on(common::model_path())
}

/// A runtime on the default model, for the tests that need what it writes (a summary the
/// 135M test model writes is refused as often as not, depending on the last bits of its
/// arithmetic on the machine's CPU).
fn start_default() -> Runtime {
    start_on(common::default_model_path())
}

fn start_on(model: std::path::PathBuf) -> Runtime {
    let config = RuntimeConfig::new(model).with_assets_dir(common::root().join("assets"));
    let runtime = Runtime::start(config);
    match runtime.events().recv_timeout(WAIT) {
        Ok(Event::ModelLoaded(_)) => runtime,
        other => panic!("model did not load: {other:?}"),
    }
}

fn next_event(runtime: &Runtime) -> Event {
    runtime
        .events()
        .recv_timeout(WAIT)
        .expect("the worker answers within two minutes")
}

/// The blacksmith, greedy, short replies, reading the shipped Oakvale lore.
fn blacksmith_with_lore() -> Persona {
    let mut persona = common::persona("blacksmith");
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(32);
    persona.lore = Some("lore/oakvale.lore.ron".into());
    persona
}

fn set_persona(runtime: &Runtime, npc: NpcId, persona: Persona) -> Result<usize, NpcError> {
    runtime.set_persona(npc, persona).unwrap();
    match next_event(runtime) {
        Event::PersonaAccepted { prefix_tokens, .. } => Ok(prefix_tokens),
        Event::PersonaRejected { error, .. } => Err(error),
        other => panic!("unexpected {other:?}"),
    }
}

fn reply(runtime: &Runtime, npc: NpcId, line: &str) -> (String, ReplyStats) {
    let request = runtime.say(npc, line).unwrap();
    loop {
        match next_event(runtime) {
            Event::Replied {
                request: r,
                text,
                stats,
                ..
            } if r == request => return (text, stats),
            Event::Failed { error, .. } => panic!("no reply to {line:?}: {error}"),
            Event::WorkerDied { reason } => panic!("worker died: {reason}"),
            _ => {}
        }
    }
}

#[derive(Debug, PartialEq)]
struct Mind {
    memories: Vec<String>,
    summary: Vec<String>,
    summarised_turns: usize,
    lore_entries: usize,
    written_summary: Option<String>,
}

fn mind(runtime: &Runtime, npc: NpcId) -> Mind {
    runtime.inspect(npc).unwrap();
    loop {
        match next_event(runtime) {
            Event::Mind {
                memories,
                summary,
                summarised_turns,
                lore_entries,
                written_summary,
                ..
            } => {
                return Mind {
                    memories: memories.into_iter().map(|m| m.text).collect(),
                    summary,
                    summarised_turns,
                    lore_entries,
                    written_summary,
                };
            }
            // A background summary may finish at any time.
            Event::SummaryWritten { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn the_shipped_lore_answers_paraphrased_questions() {
    let book = LoreBook::load(&common::root().join("assets/lore/oakvale.lore.ron"))
        .expect("shipped lore parses");
    let index = LoreIndex::new(book.entries);
    let top = |query: &str| {
        let hits = index.search(query, 3);
        hits.iter()
            .map(|hit| index.entry(hit.index).unwrap().id.clone())
            .collect::<Vec<_>>()
    };
    for (question, expected) in [
        ("What's the price of one of your blades?", "brom-prices"),
        ("Who is in charge of this village?", "mayor"),
        ("Where does the iron ore come from?", "greyfang-mine"),
        (
            "Is it safe to walk to the mine? I heard about wolves.",
            "wolves",
        ),
        ("What do I get for killing the wolf leader?", "wolf-bounty"),
        ("How much for a bed at the inn tonight?", "inn-prices"),
        ("Where can I find moonpetal?", "moonpetal"),
        ("When does the caravan from Riverford arrive?", "caravan"),
    ] {
        let found = top(question);
        assert!(
            found.contains(&expected.to_owned()),
            "{question}: {found:?}"
        );
    }
    assert!(index.best_match("hmm").is_none());
}

/// The eval's question set (`tests/data/oakvale_conversation.ron`): every lore question's
/// answer is in the entries the retriever puts in its turn.
#[test]
fn the_retriever_finds_the_answer_to_every_lore_question_of_the_eval() {
    #[derive(serde::Deserialize)]
    struct Workload {
        turns: Vec<Line>,
    }
    #[derive(serde::Deserialize)]
    struct Line {
        say: String,
        #[serde(default)]
        expect: Vec<String>,
        #[serde(default)]
        about: Option<About>,
    }
    #[derive(serde::Deserialize, PartialEq)]
    enum About {
        Lore,
        Player,
    }
    let source =
        std::fs::read_to_string(common::root().join("tests/data/oakvale_conversation.ron"))
            .unwrap();
    let workload: Workload = ron::Options::default()
        .with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
        .from_str(&source)
        .expect("the question set parses");
    assert!(
        workload
            .turns
            .iter()
            .any(|line| line.about == Some(About::Player))
    );
    assert_eq!(workload.turns.len(), 30);
    let book = LoreBook::load(&common::root().join("assets/lore/oakvale.lore.ron")).unwrap();
    let index = LoreIndex::new(book.entries);
    let questions: Vec<&Line> = workload
        .turns
        .iter()
        .filter(|line| line.about == Some(About::Lore))
        .collect();
    assert!(questions.len() >= 10);
    for line in questions {
        let notes: String = index
            .search(&line.say, npc_native::DEFAULT_RETRIEVE as usize)
            .iter()
            .map(|hit| index.entry(hit.index).unwrap().text.to_lowercase())
            .collect();
        assert!(
            line.expect
                .iter()
                .any(|answer| notes.contains(&answer.to_lowercase())),
            "{}: {notes}",
            line.say
        );
    }
}

#[test]
fn lore_enters_the_new_turn_and_earlier_turns_stay_cached() {
    let _serial = common::serial();
    let runtime = start();
    let npc = NpcId(1);
    let prefix = set_persona(&runtime, npc, blacksmith_with_lore()).expect("accepted");
    assert_eq!(mind(&runtime, npc).lore_entries, 99);

    let (_, first) = reply(&runtime, npc, "Who is the mayor of this village?");
    assert!(first.lore_entries > 0, "{first:?}");
    let (_, second) = reply(&runtime, npc, "What does a steel shield cost?");
    let (_, third) = reply(&runtime, npc, "And where does your iron ore come from?");
    for stats in [&second, &third] {
        assert!(stats.lore_entries > 0, "{stats:?}");
        // Lore sits in the new turn, so the persona (and the turns before the previous one)
        // never leave the cache.
        assert!(
            stats.cached_tokens >= prefix - 8,
            "{stats:?} prefix {prefix}"
        );
    }
    // The first turn stays cached on the third: only the previous exchange (stored with the
    // plain line) and the new turn are computed.
    assert!(
        third.cached_tokens > second.cached_tokens + 10,
        "{second:?} {third:?}"
    );

    // A persona without lore keeps the old behaviour: the line alone.
    let plain = NpcId(2);
    let mut persona = blacksmith_with_lore();
    persona.lore = None;
    set_persona(&runtime, plain, persona).unwrap();
    let (_, stats) = reply(&runtime, plain, "Who is the mayor of this village?");
    assert_eq!((stats.lore_entries, stats.memories), (0, 0));
}

#[test]
fn a_budget_smaller_than_the_persona_is_refused_when_set() {
    let _serial = common::serial();
    let runtime = start();
    let mut persona = blacksmith_with_lore();
    persona.prompt_budget = Some(40);
    match set_persona(&runtime, NpcId(1), persona) {
        Err(NpcError::InvalidPersona(message)) => {
            assert!(message.contains("prompt_budget is 40 tokens"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let mut persona = blacksmith_with_lore();
    persona.lore = Some("lore/missing.lore.ron".into());
    match set_persona(&runtime, NpcId(1), persona) {
        Err(NpcError::InvalidPersona(message)) => {
            assert!(message.contains("missing.lore.ron"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The NPC was never accepted, so it cannot talk; a fitting budget is accepted.
    let mut persona = blacksmith_with_lore();
    persona.prompt_budget = Some(480);
    set_persona(&runtime, NpcId(1), persona).expect("a fitting budget is accepted");
    let (_, stats) = reply(
        &runtime,
        NpcId(1),
        "Tell me about the wolves and the mine road.",
    );
    assert!(stats.prompt_tokens <= 480, "{stats:?}");
}

#[test]
fn a_tight_budget_drops_lore_and_reports_it() {
    let _serial = common::serial();
    let runtime = start();
    let mut persona = blacksmith_with_lore();
    let prefix = set_persona(&runtime, NpcId(1), persona.clone()).unwrap();
    persona.retrieve = Some(6);
    persona.prompt_budget = Some(u32::try_from(prefix).unwrap() + 90);
    set_persona(&runtime, NpcId(1), persona).unwrap();
    let (_, stats) = reply(
        &runtime,
        NpcId(1),
        "Tell me about the wolves on the mine road.",
    );
    assert!(stats.dropped_lore > 0, "{stats:?}");
    assert!(stats.prompt_tokens <= prefix + 90, "{stats:?}");
}

#[test]
fn memories_survive_save_and_load() {
    let _serial = common::serial();
    let dir = common::scratch_dir("memories");
    let path = dir.join("brom.npc");
    let npc = NpcId(7);
    {
        let runtime = start();
        set_persona(&runtime, npc, blacksmith_with_lore()).unwrap();
        runtime
            .remember(npc, "The player saved the mill from a fire.", 7)
            .unwrap();
        assert!(matches!(
            next_event(&runtime),
            Event::Remembered { memories: 1, .. }
        ));
        // Extracted from what the player says.
        reply(
            &runtime,
            npc,
            "Hello! My name is Aria and I come from Riverford.",
        );
        let memories = mind(&runtime, npc).memories;
        assert_eq!(
            memories,
            [
                "The player saved the mill from a fire.",
                "The player's name is Aria.",
                "The player comes from Riverford."
            ]
        );
        let (_, stats) = reply(&runtime, npc, "Do you remember what happened at the mill?");
        assert!(stats.memories >= 2, "{stats:?}");
        runtime.save_npc(npc, &path).unwrap();
        assert!(matches!(next_event(&runtime), Event::NpcSaved { .. }));
        runtime.remember(NpcId(99), "nobody", 5).unwrap();
        assert!(matches!(
            next_event(&runtime),
            Event::RememberFailed {
                error: NpcError::UnknownNpc(_),
                ..
            }
        ));
    }
    // A new game session: a fresh runtime knows nothing until the save is loaded.
    let runtime = start();
    set_persona(&runtime, npc, blacksmith_with_lore()).unwrap();
    assert!(mind(&runtime, npc).memories.is_empty());
    runtime.load_npc(npc, &path).unwrap();
    assert!(matches!(
        next_event(&runtime),
        Event::NpcLoaded { turns: 2, .. }
    ));
    let after = mind(&runtime, npc).memories;
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(after.contains(&"The player's name is Aria.".to_owned()));
    let (_, stats) = reply(&runtime, npc, "Do you remember what happened at the mill?");
    assert!(stats.memories >= 2, "{stats:?}");
}

/// Saves the blacksmith after a memory and two turns; returns the file's bytes.
fn save_brom(runtime: &Runtime, npc: NpcId, path: &std::path::Path) -> Vec<u8> {
    runtime
        .remember(npc, "The player saved the mill from a fire.", 7)
        .unwrap();
    assert!(matches!(next_event(runtime), Event::Remembered { .. }));
    reply(runtime, npc, "Hello! My name is Aria.");
    reply(runtime, npc, "Do you remember what happened at the mill?");
    runtime.save_npc(npc, path).unwrap();
    assert!(matches!(next_event(runtime), Event::NpcSaved { .. }));
    std::fs::read(path).unwrap()
}

fn load(runtime: &Runtime, npc: NpcId, path: &std::path::Path) -> Event {
    runtime.load_npc(npc, path).unwrap();
    next_event(runtime)
}

#[test]
fn a_damaged_memory_section_keeps_the_conversation_and_its_cache() {
    let _serial = common::serial();
    let dir = common::scratch_dir("damaged-mind");
    let path = dir.join("brom.npc");
    let npc = NpcId(4);
    let runtime = start();
    let prefix = set_persona(&runtime, npc, blacksmith_with_lore()).unwrap();
    let good = save_brom(&runtime, npc, &path);
    // The memory section is the file's last; its RON opens with `(memories:(`.
    let mind_at = good
        .windows(11)
        .rposition(|w| w == b"(memories:(")
        .expect("the memory section");

    // Broken syntax: the mind is lost, the conversation and the KV are not.
    let mut bytes = good.clone();
    bytes[mind_at] = b'#';
    std::fs::write(&path, &bytes).unwrap();
    match load(&runtime, npc, &path) {
        Event::NpcLoaded {
            turns,
            kv_tokens,
            kv_note,
            mind_note,
            ..
        } => {
            assert_eq!((turns, kv_note), (2, None));
            assert!(kv_tokens > prefix, "{kv_tokens}");
            let note = mind_note.expect("the damage is reported");
            assert!(note.contains("memories not restored"), "{note}");
        }
        other => panic!("expected NpcLoaded, got {other:?}"),
    }
    let mind_now = mind(&runtime, npc);
    assert!(mind_now.memories.is_empty(), "{:?}", mind_now.memories);
    // The next reply reuses the restored cache: the persona and the first exchange.
    let (text, stats) = reply(&runtime, npc, "What do you sell?");
    assert!(!text.trim().is_empty());
    assert!(stats.cached_tokens > prefix, "{stats:?} prefix {prefix}");
    assert_eq!(stats.memories, 0, "{stats:?}");

    // A flipped letter inside a memory: its checksum fails, what still parses is kept.
    let mut bytes = good.clone();
    let mill = bytes[mind_at..]
        .windows(4)
        .position(|w| w == b"mill")
        .unwrap()
        + mind_at;
    bytes[mill + 1] = b'a';
    std::fs::write(&path, &bytes).unwrap();
    match load(&runtime, npc, &path) {
        Event::NpcLoaded {
            turns, mind_note, ..
        } => {
            assert_eq!(turns, 2);
            assert!(mind_note.unwrap().contains("checksum"));
        }
        other => panic!("expected NpcLoaded, got {other:?}"),
    }
    let memories = mind(&runtime, npc).memories;
    assert!(
        memories.contains(&"The player saved the mall from a fire.".to_owned()),
        "{memories:?}"
    );

    // The file as saved loads cleanly.
    std::fs::write(&path, &good).unwrap();
    assert!(matches!(
        load(&runtime, npc, &path),
        Event::NpcLoaded {
            mind_note: None,
            turns: 2,
            ..
        }
    ));
    assert_eq!(mind(&runtime, npc).memories.len(), 2);
}

#[test]
fn the_summary_is_triggered_at_the_budget_and_keeps_named_facts() {
    let _serial = common::serial();
    let runtime = start();
    let npc = NpcId(3);
    let mut persona = blacksmith_with_lore();
    persona.retrieve = Some(1);
    persona.sampling.max_tokens = Some(24);
    let prefix = set_persona(&runtime, npc, persona.clone()).unwrap();
    let budget = prefix + 260;
    persona.prompt_budget = Some(u32::try_from(budget).unwrap());
    set_persona(&runtime, npc, persona).unwrap();

    reply(&runtime, npc, FOLDING_LINES[0]);
    reply(&runtime, npc, FOLDING_LINES[1]);
    let small_talk = &FOLDING_LINES[2..10];
    let mut first_fold = None;
    for (at, line) in small_talk.iter().enumerate() {
        let (_, stats) = reply(&runtime, npc, line);
        assert!(stats.prompt_tokens <= budget, "{stats:?}");
        if stats.dropped_turns > 0 && first_fold.is_none() {
            first_fold = Some((at + 2, stats));
        }
    }
    let (turn, stats) = first_fold.expect("the conversation outgrew its budget and was folded");
    assert!(turn >= 3, "folded at turn {turn} {stats:?}");
    let mind = mind(&runtime, npc);
    assert!(mind.summarised_turns >= 2, "{}", mind.summarised_turns);
    assert_eq!(
        mind.summary[..2],
        [
            "My sister Wren Holloway lives in Riverford.",
            "I owe Marta 12 silver for the stew."
        ]
    );
    // Small talk carries no names or numbers and is not kept.
    assert!(
        !mind.summary.iter().any(|s| s.contains("weather")),
        "{:?}",
        mind.summary
    );
}

#[test]
fn lore_is_compressed_once_and_then_read_from_the_disk_cache() {
    let _serial = common::serial();
    let cache = common::scratch_dir("compressed-lore");
    let config = RuntimeConfig::new(common::model_path())
        .with_assets_dir(common::root().join("assets"))
        .with_cache_dir(&cache);
    let runtime = Runtime::start(config);
    assert!(matches!(
        runtime.events().recv_timeout(WAIT),
        Ok(Event::ModelLoaded(_))
    ));
    let mut persona = blacksmith_with_lore();
    persona.compress_lore = Some(0.5);
    // Compressing runs the model over all 6,000+ lore tokens once; on a loaded 2-core machine
    // that can take minutes, so this wait only guards against a hang.
    let slow = Duration::from_secs(1800);
    runtime.set_persona(NpcId(1), persona.clone()).unwrap();
    assert!(matches!(
        runtime.events().recv_timeout(slow),
        Ok(Event::PersonaAccepted { .. })
    ));
    let compression = |runtime: &Runtime| {
        runtime.inspect(NpcId(1)).unwrap();
        match next_event(runtime) {
            Event::Mind {
                lore_compression, ..
            } => lore_compression.expect("the lore was compressed"),
            other => panic!("unexpected {other:?}"),
        }
    };
    let (before, after, cached) = compression(&runtime);
    assert!(!cached);
    assert!(before > 6000, "{before}");
    // Half the tokens, plus every token with a digit.
    assert!(
        after < before * 6 / 10 && after >= before / 2,
        "{before} -> {after}"
    );
    // The same lore again (a hot reload, or the next game session): from the cache.
    set_persona(&runtime, NpcId(1), persona.clone()).unwrap();
    assert_eq!(compression(&runtime), (before, after, true));
    let (_, stats) = reply(&runtime, NpcId(1), "How much does a room at the inn cost?");
    assert!(stats.lore_entries > 0, "{stats:?}");
    persona.compress_lore = Some(2.0);
    assert!(matches!(
        set_persona(&runtime, NpcId(1), persona),
        Err(NpcError::InvalidPersona(_))
    ));
}

/// The blacksmith without lore or recalled memories (each turn is the player's line alone,
/// so a turn's prompt is a prefix of the next one's), short greedy replies, and a budget
/// that folds the conversation after a few turns.
fn folding_blacksmith(runtime: &Runtime, npc: NpcId) -> (Persona, usize) {
    let mut persona = blacksmith_with_lore();
    persona.lore = None;
    persona.recall = Some(0);
    persona.sampling.max_tokens = Some(24);
    let prefix = set_persona(runtime, npc, persona.clone()).unwrap();
    persona.prompt_budget = Some(u32::try_from(prefix + 300).unwrap());
    (persona, prefix)
}

const FOLDING_LINES: [&str; 14] = [
    "My sister Wren Holloway lives in Riverford.",
    "I owe Marta 12 silver for the stew.",
    "Nice weather today, is it not?",
    "How is the forge doing?",
    "Do you like your work?",
    "What do you think of the village?",
    "Is the fire hot today?",
    "Have you eaten yet?",
    "Do you ever rest?",
    "Is it busy today?",
    "Do you sell nails?",
    "Are your tools old?",
    "Do you have an apprentice?",
    "Is the smoke bad today?",
];

fn written_after(runtime: &Runtime, npc: NpcId) -> (usize, Option<String>) {
    loop {
        match next_event(runtime) {
            Event::SummaryWritten {
                npc: n,
                summarised_turns,
                text,
            } if n == npc => return (summarised_turns, text),
            Event::WorkerDied { reason } => panic!("worker died: {reason}"),
            _ => {}
        }
    }
}

#[test]
fn the_model_writes_part_of_the_summary_in_the_background_after_the_replies() {
    let _serial = common::serial();
    let runtime = start_default();
    let (npc, other) = (NpcId(5), NpcId(6));
    let (persona, _) = folding_blacksmith(&runtime, npc);
    set_persona(&runtime, npc, persona.clone()).unwrap();
    let mut chatter = persona.clone();
    chatter.prompt_budget = None;
    set_persona(&runtime, other, chatter).unwrap();
    let background = SayOptions {
        priority: Priority::Background,
        deadline: None,
    };

    // Each line goes in together with a background line to another NPC: the worker is held
    // until both are queued. The turn that folds makes a summary job due while the other
    // reply still waits, and that reply (the lowest priority a game can ask for) still goes
    // first: the job runs only when no reply is queued or in progress.
    let mut folded = None;
    for line in FOLDING_LINES {
        let gate = common::hold(&runtime);
        let mine = runtime.say(npc, line).unwrap();
        let theirs = runtime
            .say_with(other, "Good day to you.", background)
            .unwrap();
        gate.send(()).unwrap();
        let mut order = Vec::new();
        let mut stats = None;
        while order.len() < 2 {
            match next_event(&runtime) {
                Event::Replied {
                    request, stats: s, ..
                } => {
                    if request == mine {
                        stats = Some(s);
                    }
                    order.push(format!("replied {}", request.0));
                }
                Event::SummaryWritten { npc: n, .. } => order.push(format!("summary {}", n.0)),
                Event::Failed { error, .. } => panic!("{line:?}: {error}"),
                _ => {}
            }
        }
        let stats = stats.expect("the NPC replied");
        assert!(
            stats.prompt_tokens <= persona.prompt_budget.unwrap() as usize,
            "{stats:?}"
        );
        if stats.dropped_turns > 0 {
            // Both replies, in either order, and nothing else in between.
            order.sort();
            let mut expected = [
                format!("replied {}", mine.0),
                format!("replied {}", theirs.0),
            ];
            expected.sort();
            assert_eq!(order, expected);
            folded = Some(stats);
            break;
        }
    }
    let folded = folded.expect("the conversation outgrew its budget and was folded");
    let (covered, text) = written_after(&runtime, npc);
    assert_eq!(covered, folded.dropped_turns);
    let text = text.expect("the model's summary passed validation");
    let after_job = mind(&runtime, npc);
    assert_eq!(after_job.written_summary.as_deref(), Some(text.as_str()));
    assert!(!text.is_empty() && text.len() <= 320, "{text}");
    // The named facts are kept word for word, whatever the model wrote.
    assert_eq!(
        after_job.summary[..2],
        [
            "My sister Wren Holloway lives in Riverford.",
            "I owe Marta 12 silver for the stew."
        ]
    );

    // The block changed once (the written part arrived), so the next turn recomputes from
    // it; from then on it is the same bytes, and the turn after reuses all of the previous
    // turn's prompt, the system block included.
    let (_, first) = reply(&runtime, npc, "What do you sell?");
    let (_, second) = reply(&runtime, npc, "Is iron cheap here?");
    assert_eq!(first.dropped_turns, folded.dropped_turns, "{first:?}");
    assert_eq!(second.dropped_turns, folded.dropped_turns, "{second:?}");
    assert!(
        second.cached_tokens >= first.prompt_tokens,
        "{first:?} {second:?}"
    );
    assert!(
        second.cached_tokens > first.cached_tokens + 40,
        "{first:?} {second:?}"
    );
    assert_eq!(mind(&runtime, npc), after_job);
}

#[test]
fn a_summary_not_yet_written_at_save_is_written_after_load() {
    let _serial = common::serial();
    let dir = common::scratch_dir("summary-save");
    let path = dir.join("brom.npc");
    let npc = NpcId(8);
    let runtime = start_default();
    let (persona, _) = folding_blacksmith(&runtime, npc);
    // Saved by a game with model summaries off: the file holds the extractive summary only.
    let mut off = persona.clone();
    off.model_summary = Some(false);
    set_persona(&runtime, npc, off).unwrap();
    let mut folded = 0;
    for line in FOLDING_LINES {
        let (_, stats) = reply(&runtime, npc, line);
        if stats.dropped_turns > 0 {
            folded = stats.dropped_turns;
            break;
        }
    }
    assert!(folded > 0, "the conversation was folded");
    let before = mind(&runtime, npc);
    assert_eq!(before.written_summary, None);
    runtime.save_npc(npc, &path).unwrap();
    assert!(matches!(next_event(&runtime), Event::NpcSaved { .. }));
    drop(runtime);

    // Loaded with summaries on: the job is derived from the saved summary and runs.
    let runtime = start_default();
    set_persona(&runtime, npc, persona).unwrap();
    runtime.load_npc(npc, &path).unwrap();
    assert!(matches!(
        next_event(&runtime),
        Event::NpcLoaded {
            mind_note: None,
            ..
        }
    ));
    let (covered, text) = written_after(&runtime, npc);
    assert_eq!(covered, folded);
    let after = mind(&runtime, npc);
    assert_eq!(after.written_summary, text);
    assert!(after.written_summary.is_some(), "{after:?}");
    assert_eq!(after.summary, before.summary);
    assert_eq!(after.summarised_turns, before.summarised_turns);
}
