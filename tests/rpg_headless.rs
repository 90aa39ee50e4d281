//! The RPG demo's game logic without a window (`MinimalPlugins`), on the real default model:
//! walk to the blacksmith, be greeted, talk, watch the reply stream into the speech bubble,
//! and see the item the blacksmith hands over (an approved action) arrive in the inventory.

mod common;

#[path = "../examples/rpg/game.rs"]
#[allow(dead_code)]
mod game;

use std::time::{Duration, Instant};

use bevy::prelude::*;
use bevy_npc_ai::prelude::*;

use game::{Bubble, Controls, Conversation, Player, VILLAGERS, Village, Villager};

/// Sampling seeds tried in turn. Whether the model hands the item over within the lines below
/// depends on the seed (and on every change to prompts and batching): on the default model,
/// seed 3 did on the first line when the model changed (on SmolLM2, seeds 3 and 4 of 1–5 did). The test needs one of them to, and checks
/// the whole path for it: streaming, the hidden action line, the game's verdict, the
/// inventory and the gold. `RPG_TEST_SEED` tries only the given seed.
const SEEDS: [u32; 5] = [3, 4, 1, 2, 5];

/// What the test saw besides the game's own state.
#[derive(Resource, Default)]
struct Seen {
    deltas: Vec<(Entity, String)>,
    replies: Vec<NpcReplied>,
    actions: Vec<NpcActionRequested>,
    errors: Vec<String>,
}

fn record(
    mut seen: ResMut<Seen>,
    mut deltas: MessageReader<NpcReplyDelta>,
    mut errors: MessageReader<NpcAiError>,
) {
    for delta in deltas.read() {
        seen.deltas.push((delta.npc, delta.text.clone()));
    }
    seen.errors.extend(errors.read().map(ToString::to_string));
}

/// Runs frames (5 ms apart) until `done`; panics after three minutes.
fn update_until(app: &mut App, what: &str, done: impl Fn(&mut App) -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(180) {
        app.update();
        if done(app) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("gave up waiting for {what}");
}

fn player_at(app: &mut App) -> Vec2 {
    let mut query = app.world_mut().query_filtered::<&Transform, With<Player>>();
    query.single(app.world()).unwrap().translation.truncate()
}

#[test]
fn walk_to_the_blacksmith_talk_and_receive_the_item_he_hands_over() {
    let _serial = common::serial();
    let seeds: Vec<u32> = match std::env::var("RPG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => SEEDS.to_vec(),
    };
    for &seed in &seeds {
        if handed_over_with(seed) {
            return;
        }
        println!("seed {seed}: Brom never handed anything over; trying the next seed");
    }
    panic!("Brom never handed anything over with seeds {seeds:?}");
}

/// One playthrough with `seed`: `false` if Brom never hands anything over (the other checks
/// fail the test outright).
fn handed_over_with(seed: u32) -> bool {
    let mut app = App::new();
    app.add_plugins((
        MinimalPlugins,
        AssetPlugin {
            file_path: common::root().join("assets").display().to_string(),
            ..default()
        },
        // What the villagers say: on the default model, as the demo runs it.
        NpcAiPlugin::default()
            .with_model(common::default_model_path())
            .with_context_size(1536)
            .with_sampling(SamplingParams {
                seed: Some(seed),
                ..SamplingParams::default()
            })
            .with_adapter(game::FERRY_ADAPTER),
        game::VillageGamePlugin,
    ))
    .init_resource::<Seen>()
    .add_systems(Update, record.after(NpcAiSystems::ReceiveEvents))
    .add_observer(|reply: On<NpcReplied>, mut seen: ResMut<Seen>| {
        seen.replies.push(reply.event().clone());
    })
    .add_observer(|action: On<NpcActionRequested>, mut seen: ResMut<Seen>| {
        seen.actions.push(action.event().clone());
    });
    update_until(&mut app, "the model", |app| {
        matches!(app.world().resource::<NpcAiStatus>(), NpcAiStatus::Ready(_))
    });
    let smith = {
        let mut query = app.world_mut().query::<(Entity, &Villager)>();
        query
            .iter(app.world())
            .find(|(_, v)| v.index == 0)
            .map(|(e, _)| e)
            .unwrap()
    };

    // Walk there with the same controls the keyboard drives.
    let target = VILLAGERS[0].position + Vec2::new(60.0, 0.0);
    let start = player_at(&mut app);
    update_until(&mut app, "the walk to the forge", |app| {
        let to = target - player_at(app);
        app.world_mut().resource_mut::<Controls>().movement = to;
        to.length() < 8.0
    });
    app.world_mut().resource_mut::<Controls>().movement = Vec2::ZERO;
    assert!(
        start.distance(player_at(&mut app)) > 300.0,
        "the player walked"
    );
    update_until(&mut app, "the greeting", |app| {
        app.world().resource::<Conversation>().nearby == Some(smith)
            && !app.world().get::<Bubble>(smith).unwrap().text.is_empty()
    });
    let greeting = app.world().get::<Bubble>(smith).unwrap().text.clone();
    assert_eq!(greeting, common::persona("blacksmith").greeting);

    // E, then lines, until Brom hands something over (the model decides when; the seed is
    // fixed, so this is reproducible).
    app.world_mut().resource_mut::<Controls>().talk = true;
    app.update();
    assert_eq!(app.world().resource::<Conversation>().with, Some(smith));
    let gold_before = app.world().resource::<Village>().gold;
    let lines = [
        "Here are 3 gold coins. Please give me a horseshoe.",
        "I paid you. Hand me the horseshoe, please.",
        "Give me the horseshoe now, friend.",
        "One horseshoe, please. Here is the gold.",
        "I will buy an iron sword. Here are 40 gold coins.",
        "Sell me the horseshoe, friend. The gold is on your anvil.",
        "Please hand me the iron sword I paid for.",
        "Give me a steel shield, here is the gold.",
    ];
    for line in lines {
        let from_smith = |app: &App| {
            let seen = app.world().resource::<Seen>();
            seen.replies.iter().filter(|r| r.entity == smith).count()
        };
        let replies = from_smith(&app);
        app.world_mut().resource_mut::<Controls>().say = Some(line.into());
        update_until(&mut app, "the reply", |app| from_smith(app) > replies);
        let seen = app.world().resource::<Seen>();
        // (The innkeeper and the healer chat meanwhile; their replies are not Brom's.)
        let reply = seen.replies.iter().rfind(|r| r.entity == smith).unwrap();
        // The bubble holds exactly what streamed, and the action line never showed.
        let streamed: String = seen
            .deltas
            .iter()
            .filter(|(npc, _)| *npc == smith)
            .map(|(_, t)| t.as_str())
            .collect();
        assert!(
            streamed.contains(reply.text.as_str()),
            "{streamed:?} / {reply:?}"
        );
        assert!(!streamed.contains("[ACTION]"), "{streamed:?}");
        assert_eq!(app.world().get::<Bubble>(smith).unwrap().text, reply.text);
        println!(
            "Brom: {:?} actions so far: {}",
            reply.text,
            seen.actions.len()
        );
        if !app.world().resource::<Village>().inventory.is_empty() {
            break;
        }
        app.world_mut().resource_mut::<Seen>().deltas.clear();
    }
    let seen = app.world().resource::<Seen>();
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    let chatter = app.world().resource::<game::Chatter>();
    println!(
        "villager chatter meanwhile: {} exchanges, {} interrupted",
        chatter.exchanges, chatter.interrupted
    );
    let Some(action) = seen.actions.iter().find(|a| a.action.name == "give_item") else {
        println!("actions: {:?}", seen.actions);
        return false;
    };
    let item = action.action.text_arg("item").unwrap().to_owned();
    let village = app.world().resource::<Village>();
    println!("inventory: {:?}; log: {:?}", village.inventory, village.log);
    assert_eq!(
        village.inventory.first(),
        Some(&item),
        "the item is in the inventory"
    );
    assert_eq!(village.gold, gold_before - game::price_of(&item).unwrap());
    true
}
