//! The Bevy plugin, headless (`MinimalPlugins` + `AssetPlugin`), on a real model (the test
//! model).

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bevy::prelude::*;
use bevy_npc_ai::NpcAiStatus;
use bevy_npc_ai::npc_native::{DebugHook, FinishReason, ModelError, NpcError, Request};
use bevy_npc_ai::prelude::*;

/// Upper bound on frames a test waits for anything (with a 5 ms pause per frame: ~2 min).
const MAX_FRAMES: usize = 24_000;

/// What the observers and readers saw.
#[derive(Resource, Default)]
struct Seen {
    replies: Vec<NpcReplied>,
    cancelled: Vec<Entity>,
    personas_applied: Vec<Entity>,
    deltas: String,
    errors: Vec<NpcAiError>,
}

fn record_messages(
    mut seen: ResMut<Seen>,
    mut deltas: MessageReader<NpcReplyDelta>,
    mut errors: MessageReader<NpcAiError>,
) {
    for delta in deltas.read() {
        seen.deltas.push_str(&delta.text);
    }
    seen.errors.extend(errors.read().cloned());
}

fn app_with(assets: &Path, plugin: NpcAiPlugin) -> App {
    let mut app = App::new();
    app.add_plugins((
        MinimalPlugins,
        AssetPlugin {
            file_path: assets.display().to_string(),
            watch_for_changes_override: Some(true),
            ..default()
        },
        plugin,
    ))
    .init_resource::<Seen>()
    .add_systems(Update, record_messages.after(NpcAiSystems::ReceiveEvents))
    .add_observer(|replied: On<NpcReplied>, mut seen: ResMut<Seen>| {
        seen.replies.push(replied.event().clone());
    })
    .add_observer(|cancelled: On<NpcReplyCancelled>, mut seen: ResMut<Seen>| {
        seen.cancelled.push(cancelled.entity);
    })
    .add_observer(|applied: On<NpcPersonaApplied>, mut seen: ResMut<Seen>| {
        seen.personas_applied.push(applied.entity);
    });
    app
}

fn default_app() -> App {
    app_with(
        &common::root().join("assets"),
        NpcAiPlugin::default().with_model(common::model_path()),
    )
}

/// Runs frames until `done` holds; panics after [`MAX_FRAMES`].
fn update_until(app: &mut App, what: &str, done: impl Fn(&mut App) -> bool) {
    for _ in 0..MAX_FRAMES {
        app.update();
        if done(app) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("gave up waiting for {what}");
}

fn seen(app: &App) -> &Seen {
    app.world().resource::<Seen>()
}

fn spawn_npc(app: &mut App, persona: &str) -> Entity {
    let handle = app
        .world()
        .resource::<AssetServer>()
        .load(persona.to_owned());
    let npc = app.world_mut().spawn(Npc::new(handle)).id();
    update_until(app, "the persona to be applied", |app| {
        seen(app).personas_applied.contains(&npc)
    });
    npc
}

fn say(app: &mut App, npc: Entity, text: &str) {
    app.world_mut().write_message(PlayerSaid {
        npc,
        text: text.into(),
    });
}

fn wait_for_reply(app: &mut App, count: usize) -> NpcReplied {
    update_until(app, "a reply", |app| seen(app).replies.len() >= count);
    seen(app).replies[count - 1].clone()
}

#[test]
fn an_npc_replies_in_a_headless_app_while_frames_run() {
    let _serial = common::serial();
    let mut app = default_app();
    let npc = spawn_npc(&mut app, "personas/blacksmith.persona.ron");
    assert!(matches!(
        app.world().resource::<NpcAiStatus>(),
        NpcAiStatus::Ready(_)
    ));
    say(&mut app, npc, "How much does an iron sword cost?");
    app.update();
    assert_eq!(
        *app.world().get::<NpcState>(npc).unwrap(),
        NpcState::Thinking
    );
    let replied = wait_for_reply(&mut app, 1);
    assert_eq!(replied.entity, npc);
    assert!(!replied.text.is_empty());
    assert_eq!(
        seen(&app).deltas.trim(),
        replied.text,
        "deltas stream the whole reply"
    );
    assert_eq!(*app.world().get::<NpcState>(npc).unwrap(), NpcState::Idle);
    let history = &app.world().get::<DialogueHistory>(npc).unwrap().lines;
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].text, "How much does an iron sword cost?");
    assert_eq!(history[1].text, replied.text);
    assert!(seen(&app).errors.is_empty(), "{:?}", seen(&app).errors);
}

#[test]
fn a_line_sent_before_the_persona_loads_waits_for_it() {
    let _serial = common::serial();
    let mut app = default_app();
    let handle = app
        .world()
        .resource::<AssetServer>()
        .load("personas/healer.persona.ron");
    let npc = app.world_mut().spawn(Npc::new(handle)).id();
    say(&mut app, npc, "Good morning, sister.");
    let replied = wait_for_reply(&mut app, 1);
    assert_eq!(replied.entity, npc);
    assert!(seen(&app).errors.is_empty(), "{:?}", seen(&app).errors);
}

#[test]
fn a_line_to_an_npc_whose_persona_fails_to_load_is_an_error() {
    let _serial = common::serial();
    let dir = common::scratch_dir("broken-persona");
    std::fs::write(dir.join("broken.persona.ron"), "(name: \"A\"").unwrap();
    let mut app = app_with(
        &dir,
        NpcAiPlugin::default().with_model(common::model_path()),
    );
    let handle = app
        .world()
        .resource::<AssetServer>()
        .load("broken.persona.ron");
    let npc = app.world_mut().spawn(Npc::new(handle)).id();
    say(&mut app, npc, "Hello?");
    update_until(&mut app, "the failure", |app| {
        seen(app).errors.iter().any(|e| {
            matches!(e, NpcAiError::ReplyFailed { npc: n, error: NpcError::InvalidPersona(_) } if *n == npc)
        })
    });
}

#[test]
fn the_frame_never_waits_on_a_blocked_worker() {
    let _serial = common::serial();
    let mut app = default_app();
    let npc = spawn_npc(&mut app, "personas/guard.persona.ron");
    // Hold the worker behind a gate, then talk to it.
    let (open, gate) = crossbeam_channel::bounded::<()>(1);
    app.world()
        .resource::<bevy_npc_ai::RuntimeHandle>()
        .runtime()
        .send(Request::Debug(DebugHook::WaitFor(gate)))
        .unwrap();
    say(&mut app, npc, "State the toll.");
    // Every one of these updates returns although the worker cannot make progress.
    for _ in 0..200 {
        app.update();
    }
    assert!(seen(&app).replies.is_empty());
    assert_eq!(
        *app.world().get::<NpcState>(npc).unwrap(),
        NpcState::Thinking
    );
    open.send(()).unwrap();
    let replied = wait_for_reply(&mut app, 1);
    assert_eq!(replied.entity, npc);
}

#[test]
fn cancel_reply_stops_the_npc() {
    let _serial = common::serial();
    let mut app = default_app();
    let npc = spawn_npc(&mut app, "personas/innkeeper.persona.ron");
    say(
        &mut app,
        npc,
        "Tell me a very long story about the village.",
    );
    update_until(&mut app, "the NPC to start speaking", |app| {
        *app.world().get::<NpcState>(npc).unwrap() == NpcState::Speaking
    });
    app.world_mut().write_message(CancelReply { npc });
    update_until(&mut app, "the cancellation", |app| {
        seen(app).cancelled.contains(&npc)
    });
    assert_eq!(*app.world().get::<NpcState>(npc).unwrap(), NpcState::Idle);
    assert!(seen(&app).replies.is_empty());
}

#[test]
fn a_line_to_an_entity_that_is_not_an_npc_is_an_error() {
    let _serial = common::serial();
    let mut app = default_app();
    let stranger = app.world_mut().spawn_empty().id();
    say(&mut app, stranger, "Hello?");
    update_until(&mut app, "an error", |app| !seen(app).errors.is_empty());
    assert!(matches!(seen(&app).errors[0], NpcAiError::UnknownNpc(e) if e == stranger));
}

#[test]
fn bad_player_lines_are_typed_errors() {
    let _serial = common::serial();
    let mut app = default_app();
    let npc = spawn_npc(&mut app, "personas/healer.persona.ron");
    say(&mut app, npc, "");
    say(&mut app, npc, &"x".repeat(10_000));
    update_until(&mut app, "two errors", |app| seen(app).errors.len() >= 2);
    let errors: Vec<_> = seen(&app).errors.iter().map(ToString::to_string).collect();
    assert!(
        matches!(
            &seen(&app).errors[0],
            NpcAiError::ReplyFailed {
                error: NpcError::EmptyLine,
                ..
            }
        ),
        "{errors:?}"
    );
    assert!(
        matches!(
            &seen(&app).errors[1],
            NpcAiError::ReplyFailed {
                error: NpcError::LineTooLong { chars: 10_000, .. },
                ..
            }
        ),
        "{errors:?}"
    );
    assert_eq!(*app.world().get::<NpcState>(npc).unwrap(), NpcState::Idle);
}

#[test]
fn a_missing_model_is_reported_and_the_game_keeps_running() {
    let _serial = common::serial();
    let mut app = app_with(
        &common::root().join("assets"),
        NpcAiPlugin::default().with_model("/nonexistent/model.gguf"),
    );
    update_until(&mut app, "the model failure", |app| {
        matches!(
            app.world().resource::<NpcAiStatus>(),
            NpcAiStatus::Failed(_)
        )
    });
    let handle = app
        .world()
        .resource::<AssetServer>()
        .load("personas/guard.persona.ron");
    let npc = app.world_mut().spawn(Npc::new(handle)).id();
    say(&mut app, npc, "Hello?");
    update_until(&mut app, "the reply to fail", |app| {
        seen(app).errors.iter().any(|e| {
            matches!(
                e,
                NpcAiError::ReplyFailed {
                    error: NpcError::ModelUnavailable(_),
                    ..
                }
            )
        })
    });
    assert!(
        seen(&app)
            .errors
            .iter()
            .any(|e| matches!(e, NpcAiError::ModelFailed(_)))
    );
}

#[test]
fn a_catalog_model_is_found_in_the_asset_plugins_folder() {
    let _serial = common::serial();
    // The AssetPlugin reads the project's assets; the plugin finds the model there by id,
    // whatever the working directory (cargo runs tests in the crate's folder, not the root).
    let test_model = bevy_npc_ai::npc_native::catalog::TEST_MODEL;
    let mut app = app_with(
        &common::root().join("assets"),
        NpcAiPlugin::default().with_catalog_model(test_model.id),
    );
    update_until(&mut app, "the model", |app| {
        !matches!(app.world().resource::<NpcAiStatus>(), NpcAiStatus::Loading)
    });
    match app.world().resource::<NpcAiStatus>() {
        NpcAiStatus::Ready(info) => {
            assert_eq!(info.catalog_id, Some(test_model.id));
            assert_eq!(
                info.path,
                common::root().join("assets").join(test_model.asset_path())
            );
        }
        other => panic!("the catalog model did not load: {other:?}"),
    }
    let npc = spawn_npc(&mut app, "personas/guard.persona.ron");
    say(&mut app, npc, "Good morning.");
    let reply = wait_for_reply(&mut app, 1);
    assert!(reply.stats.generated_tokens > 0);

    // An id the catalog does not have is reported, naming the ids it has.
    let mut app = app_with(
        &common::root().join("assets"),
        NpcAiPlugin::default().with_catalog_model("llama-70b"),
    );
    update_until(&mut app, "the model failure", |app| {
        matches!(
            app.world().resource::<NpcAiStatus>(),
            NpcAiStatus::Failed(_)
        )
    });
    let NpcAiStatus::Failed(error) = app.world().resource::<NpcAiStatus>() else {
        unreachable!()
    };
    assert!(
        matches!(error, ModelError::UnknownCatalogModel(id) if id == "llama-70b"),
        "{error:?}"
    );
    assert!(error.to_string().contains(test_model.id), "{error}");
}

#[test]
fn a_dead_worker_is_reported_once_and_the_game_keeps_running() {
    let _serial = common::serial();
    let mut app = default_app();
    let npc = spawn_npc(&mut app, "personas/guard.persona.ron");
    app.world()
        .resource::<bevy_npc_ai::RuntimeHandle>()
        .runtime()
        .send(Request::Debug(DebugHook::Panic))
        .unwrap();
    update_until(&mut app, "the worker's death", |app| {
        matches!(
            app.world().resource::<NpcAiStatus>(),
            NpcAiStatus::WorkerDied(_)
        )
    });
    // Talking to the dead worker is an error, not a panic or a hang.
    say(&mut app, npc, "Are you there?");
    for _ in 0..50 {
        app.update();
    }
    let deaths = seen(&app)
        .errors
        .iter()
        .filter(|e| matches!(e, NpcAiError::WorkerDied { .. }))
        .count();
    assert_eq!(deaths, 1, "{:?}", seen(&app).errors);
}

#[test]
fn despawning_an_npc_is_harmless_mid_reply() {
    let _serial = common::serial();
    let mut app = default_app();
    let npc = spawn_npc(&mut app, "personas/blacksmith.persona.ron");
    let other = spawn_npc(&mut app, "personas/guard.persona.ron");
    say(&mut app, npc, "Tell me a long story.");
    app.update();
    app.world_mut().despawn(npc);
    say(&mut app, other, "Good day.");
    let replied = wait_for_reply(&mut app, 1);
    assert_eq!(
        replied.entity, other,
        "the despawned NPC's reply is dropped"
    );
}

// ---- Persona files ----

const GOOD_PERSONA: &str = r#"(
    name: "Test Smith",
    role: "a blacksmith",
    knowledge: ["A horseshoe costs 3 gold."],
    sampling: (temperature: 0.0, max_tokens: 48),
)"#;

#[test]
fn every_shipped_persona_loads() {
    let _serial = common::serial();
    let mut app = default_app();
    for name in ["blacksmith", "innkeeper", "guard", "healer"] {
        let npc = spawn_npc(&mut app, &format!("personas/{name}.persona.ron"));
        assert!(seen(&app).personas_applied.contains(&npc));
    }
    assert!(seen(&app).errors.is_empty(), "{:?}", seen(&app).errors);
}

#[test]
fn each_kind_of_persona_mistake_names_line_column_and_field() {
    let _serial = common::serial();
    let dir = common::scratch_dir("persona-errors");
    let cases = [
        (
            "unknown_field",
            "(\n  name: \"A\",\n  role: \"b\",\n  mood: \"grim\",\n)",
            "4:",
            "mood",
        ),
        (
            "wrong_type",
            "(\n  name: \"A\",\n  role: \"b\",\n  knowledge: \"one fact\",\n)",
            "4:",
            "knowledge",
        ),
        ("missing_field", "(\n  name: \"A\",\n)", "3:", "role"),
        (
            "syntax",
            "(\n  name: \"A\"\n  role: \"b\",\n)",
            "3:",
            "name",
        ),
        (
            "bad_value",
            "(\n  name: \"A\",\n  role: \"b\",\n  sampling: (\n    temperature: -1.0,\n  ),\n)",
            "5:",
            "temperature",
        ),
    ];
    for (name, source, _, _) in &cases {
        std::fs::write(dir.join(format!("{name}.persona.ron")), source).unwrap();
    }
    let mut app = app_with(
        &dir,
        NpcAiPlugin::default().with_model(common::model_path()),
    );
    let handles: Vec<Handle<Persona>> = cases
        .iter()
        .map(|(name, ..)| {
            app.world()
                .resource::<AssetServer>()
                .load(format!("{name}.persona.ron"))
        })
        .collect();
    update_until(&mut app, "every load error", |app| {
        seen(app).errors.len() >= cases.len()
    });
    for (name, _, line, field) in cases {
        let message = seen(&app)
            .errors
            .iter()
            .find_map(|e| match e {
                NpcAiError::PersonaLoad { path, message } if path.starts_with(name) => {
                    Some(message.clone())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no error for {name}"));
        let located = format!("{name}.persona.ron:{line}");
        assert!(message.contains(&located), "{name}: {message}");
        assert!(message.contains(&format!("`{field}`")), "{name}: {message}");
    }
    drop(handles);
}

#[test]
fn hot_reload_changes_the_next_reply_and_a_broken_edit_keeps_the_last_good_one() {
    let _serial = common::serial();
    let dir = common::scratch_dir("hot-reload");
    let file = dir.join("smith.persona.ron");
    std::fs::write(&file, GOOD_PERSONA).unwrap();
    let mut app = app_with(
        &dir,
        NpcAiPlugin::default().with_model(common::model_path()),
    );
    let npc = spawn_npc(&mut app, "smith.persona.ron");
    say(&mut app, npc, "What do you sell?");
    let first = wait_for_reply(&mut app, 1);
    assert!(first.stats.generated_tokens > 1);

    // The designer caps replies at one token: the next reply obeys.
    std::fs::write(
        &file,
        GOOD_PERSONA.replace("max_tokens: 48", "max_tokens: 1"),
    )
    .unwrap();
    update_until(&mut app, "the reload", |app| {
        seen(app)
            .personas_applied
            .iter()
            .filter(|e| **e == npc)
            .count()
            >= 2
    });
    say(&mut app, npc, "What do you sell?");
    let second = wait_for_reply(&mut app, 2);
    assert_eq!(
        (second.stats.generated_tokens, second.stats.finish),
        (1, FinishReason::MaxTokens)
    );

    // A broken edit is reported with its position, and the last good persona stays live.
    std::fs::write(&file, GOOD_PERSONA.replace("name:", "nme:")).unwrap();
    update_until(&mut app, "the reload error", |app| {
        seen(app)
            .errors
            .iter()
            .any(|e| matches!(e, NpcAiError::PersonaLoad { .. }))
    });
    let error = seen(&app).errors[0].to_string();
    assert!(
        error.contains("smith.persona.ron:2:") && error.contains("`nme`"),
        "{error}"
    );
    say(&mut app, npc, "What do you sell?");
    let third = wait_for_reply(&mut app, 3);
    assert_eq!(
        third.stats.generated_tokens, 1,
        "still the last good persona"
    );
}

// ---- Save and load with the game ----

#[test]
fn npc_state_survives_save_and_load_and_the_first_reply_costs_only_new_tokens() {
    let _serial = common::serial();
    let path = common::scratch_dir("plugin-save").join("saves/brom.state");
    let mut app = default_app();
    let saved = Arc::new(Mutex::new(None));
    let saved_in = saved.clone();
    app.add_observer(move |event: On<NpcStateSaved>| {
        *saved_in.lock().unwrap() = Some(event.bytes);
    });
    let npc = spawn_npc(&mut app, "personas/blacksmith.persona.ron");
    say(&mut app, npc, "Good morning, Brom.");
    let first = wait_for_reply(&mut app, 1);
    app.world_mut().write_message(SaveNpcState {
        npc,
        path: path.clone(),
    });
    update_until(&mut app, "the save", |_| saved.lock().unwrap().is_some());
    assert!(path.is_file());
    drop(app);

    // A new game session: spawn the NPC and load its state in the same frame.
    let mut app = default_app();
    let loaded = Arc::new(Mutex::new(None));
    let loaded_in = loaded.clone();
    app.add_observer(move |event: On<NpcStateLoaded>| {
        *loaded_in.lock().unwrap() = Some(event.event().clone());
    });
    let handle = app
        .world()
        .resource::<AssetServer>()
        .load("personas/blacksmith.persona.ron");
    let npc = app.world_mut().spawn(Npc::new(handle)).id();
    app.world_mut().write_message(LoadNpcState { npc, path });
    update_until(&mut app, "the load", |_| loaded.lock().unwrap().is_some());
    let event = loaded.lock().unwrap().clone().unwrap();
    assert_eq!((event.turns, event.kv_note), (1, None));
    assert!(event.kv_tokens >= first.stats.prompt_tokens);
    say(&mut app, npc, "What do you sell?");
    let reply = wait_for_reply(&mut app, 1);
    assert!(
        reply.stats.cached_tokens >= event.kv_tokens - 1,
        "after a load only the new turn is computed: {:?}",
        reply.stats
    );
    assert!(seen(&app).errors.is_empty(), "{:?}", seen(&app).errors);
}

#[test]
fn the_cost_meter_resource_counts_local_and_fallback_replies() {
    use bevy_npc_ai::NpcCostMeter;
    use bevy_npc_ai::npc_native::escalation::DEFAULT_FALLBACK_LINE;
    use bevy_npc_ai::npc_native::{EscalationConfig, ReplySource};
    let _serial = common::serial();
    // Escalation on without a cloud: questions outside the persona's knowledge get the
    // fallback line, in character.
    let mut app = app_with(
        &common::root().join("assets"),
        NpcAiPlugin::default()
            .with_model(common::model_path())
            .with_escalation(EscalationConfig::enabled(None)),
    );
    let npc = spawn_npc(&mut app, "personas/blacksmith.persona.ron");
    say(&mut app, npc, "How much does an iron sword cost?");
    let local = wait_for_reply(&mut app, 1);
    assert_eq!(local.stats.source, ReplySource::Local, "{}", local.text);
    say(&mut app, npc, "What is the capital of France?");
    let fallback = wait_for_reply(&mut app, 2);
    assert_eq!(fallback.stats.source, ReplySource::Fallback);
    assert_eq!(fallback.text, DEFAULT_FALLBACK_LINE);
    let meter = app.world().resource::<NpcCostMeter>();
    let totals = meter.entity(npc).expect("the NPC is metered");
    assert_eq!(
        (
            totals.replies,
            totals.local_replies,
            totals.fallback_replies
        ),
        (2, 1, 1)
    );
    assert_eq!(
        totals.prefilled_tokens + totals.reused_tokens,
        local.stats.prompt_tokens as u64
    );
    assert_eq!(totals.generated_tokens, local.stats.generated_tokens as u64);
    assert!(totals.local_compute > Duration::ZERO);
    assert_eq!(meter.total(), totals);
    assert!(meter.per_player_hour(300.0) > 0.0);
}
