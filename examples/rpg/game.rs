//! The village's rules and state, without any rendering: the player walks, talks, NPCs greet,
//! stream replies into speech bubbles, chat among themselves, and ask for actions that the game
//! approves or refuses. Runs headless under `MinimalPlugins` (see `tests/rpg_headless.rs`);
//! `view.rs` draws it and maps the keyboard onto [`Controls`].

use bevy::platform::collections::HashSet;
use bevy::prelude::*;
use bevy_npc_ai::RuntimeHandle;
use bevy_npc_ai::npc_native::{NpcId, Priority, ReplySource, SayOptions};
use bevy_npc_ai::prelude::*;

/// How close the player must be to talk (world units).
pub const TALK_RADIUS: f32 = 90.0;
/// Walking speed (world units per second).
pub const PLAYER_SPEED: f32 = 260.0;
/// Half the village's size; the player stays inside.
pub const BOUNDS: Vec2 = Vec2::new(620.0, 340.0);
/// The wall with the north gate, at this height.
pub const WALL_Y: f32 = 250.0;
/// Half the gate's width.
pub const GATE_HALF_WIDTH: f32 = 60.0;
/// Where the player starts.
pub const PLAYER_START: Vec2 = Vec2::new(0.0, -220.0);
/// Two idle villagers this close hold conversations of their own.
pub const CHAT_RADIUS: f32 = 300.0;
/// Exchanges in one villager-to-villager conversation.
pub const CHAT_TURNS: u32 = 3;

/// One villager of the demo: which shipped persona it speaks as and where it stands.
pub struct VillagerSpec {
    /// The persona file under `assets/`.
    pub persona: &'static str,
    /// Name shown until the persona loads.
    pub name: &'static str,
    /// Where it stands.
    pub position: Vec2,
    /// Its colour (sRGB).
    pub color: [f32; 3],
}

/// The LoRA adapter Mags the ferrywoman speaks through (trained for the default model by
/// `cargo xtask setup`; tools/lora/README.md).
pub const FERRY_ADAPTER: &str = "adapters/sea-talk.qwen2.5-coder-1.5b.gguf";

/// The five shipped personas; the ferrywoman's runs on [`FERRY_ADAPTER`]. She stands more
/// than [`CHAT_RADIUS`] from everyone, so she talks only with the player.
pub const VILLAGERS: [VillagerSpec; 5] = [
    VillagerSpec {
        persona: "personas/blacksmith.persona.ron",
        name: "Brom Ironhand",
        position: Vec2::new(-380.0, -40.0),
        color: [0.75, 0.35, 0.2],
    },
    VillagerSpec {
        persona: "personas/guard.persona.ron",
        name: "Captain Hale",
        position: Vec2::new(110.0, 195.0),
        color: [0.3, 0.4, 0.75],
    },
    VillagerSpec {
        persona: "personas/innkeeper.persona.ron",
        name: "Marta",
        position: Vec2::new(300.0, 20.0),
        color: [0.7, 0.55, 0.2],
    },
    VillagerSpec {
        persona: "personas/healer.persona.ron",
        name: "Healer",
        position: Vec2::new(420.0, -150.0),
        color: [0.35, 0.65, 0.4],
    },
    VillagerSpec {
        persona: "personas/ferrywoman.persona.ron",
        name: "Mags",
        position: Vec2::new(-90.0, -200.0),
        color: [0.25, 0.6, 0.75],
    },
];

/// Item prices the game charges when the blacksmith hands something over.
pub fn price_of(item: &str) -> Option<u32> {
    match item {
        "horseshoe" => Some(3),
        "iron sword" => Some(40),
        "steel shield" => Some(55),
        _ => None,
    }
}

/// The player.
#[derive(Component)]
pub struct Player;

/// A villager: its spec index and whether it has greeted the player yet.
#[derive(Component)]
pub struct Villager {
    /// Index into [`VILLAGERS`].
    pub index: usize,
    /// The name on its tag (the persona's, once loaded).
    pub name: String,
    /// Greeted the player already.
    pub greeted: bool,
}

/// What a villager is saying now, shown in its speech bubble.
#[derive(Component, Default, Debug, Clone)]
pub struct Bubble {
    /// The text so far (streamed).
    pub text: String,
    /// Whether the text is still streaming.
    pub streaming: bool,
    /// The reply ended this frame: its text is whole, later deltas of it are in it already.
    pub finished_this_frame: bool,
    /// Where this villager's last reply came from.
    pub source: Option<ReplySource>,
}

/// The gate in the wall.
#[derive(Component)]
pub struct Gate;

/// What the player wants this frame: filled by the keyboard (`view.rs`), a [`Script`] or a
/// test, consumed by the game's systems.
#[derive(Resource, Default, Debug, Clone)]
pub struct Controls {
    /// Walking direction (any length; normalised).
    pub movement: Vec2,
    /// Start talking to the nearest villager.
    pub talk: bool,
    /// Stop talking.
    pub leave: bool,
    /// A line typed to the villager the player talks to.
    pub say: Option<String>,
}

/// The player's belongings and the state of the world that actions change.
#[derive(Resource, Debug, Clone)]
pub struct Village {
    /// Gold coins.
    pub gold: u32,
    /// Items, in the order received.
    pub inventory: Vec<String>,
    /// Whether the north gate is open.
    pub gate_open: bool,
    /// What happened, newest last ("Brom gives you a horseshoe").
    pub log: Vec<String>,
}

impl Default for Village {
    fn default() -> Self {
        Self {
            gold: 60,
            inventory: Vec::new(),
            gate_open: false,
            log: Vec::new(),
        }
    }
}

/// Who the player is near and talking to.
#[derive(Resource, Default, Debug, Clone)]
pub struct Conversation {
    /// The nearest villager within [`TALK_RADIUS`].
    pub nearby: Option<Entity>,
    /// The villager the player is talking to.
    pub with: Option<Entity>,
    /// The player's last line.
    pub player_line: String,
    /// Being typed (the view shows it).
    pub typing: String,
}

/// Villager-to-villager chatter in progress.
#[derive(Resource, Default, Debug)]
pub struct Chatter {
    /// The two talking: (speaker of the last line, listener who answers next).
    pub pair: Option<(Entity, Entity)>,
    /// Exchanges left.
    pub turns_left: u32,
    /// Seconds until chatter may start again.
    pub cooldown: f32,
    /// Exchanges completed since the start (for the overlay and tests).
    pub exchanges: u32,
    /// Conversations interrupted by the player.
    pub interrupted: u32,
}

/// Numbers for the F3 overlay.
#[derive(Resource, Default, Debug, Clone)]
pub struct DebugStats {
    /// Whether the overlay is shown.
    pub visible: bool,
    /// Tokens per second of the last reply.
    pub tokens_per_second: f64,
    /// Prompt tokens of the last reply found in the KV cache.
    pub cached_tokens: usize,
    /// Prompt tokens of the last reply.
    pub prompt_tokens: usize,
    /// Replies completed.
    pub replies: u32,
    /// NPCs thinking or speaking now.
    pub pending: usize,
    /// Actions requested, approved.
    pub actions: (u32, u32),
    /// Where the last reply came from (the local model, an inference server, ...).
    pub source: Option<ReplySource>,
}

/// A scripted session (for the screenshot run): steps run in order, one at a time.
#[derive(Resource, Default, Debug)]
pub struct Script {
    /// Steps left, next first.
    pub steps: std::collections::VecDeque<Step>,
    /// Frames spent on the current step.
    pub frames: u32,
    /// Set when the script is over.
    pub done: bool,
}

/// One step of a [`Script`].
#[derive(Debug, Clone)]
pub enum Step {
    /// Walk until within reach of this point.
    WalkTo(Vec2),
    /// Press the talk key.
    Talk,
    /// Type and send a line.
    Say(String),
    /// Wait until the villager the player talks to has finished its reply.
    AwaitReply,
    /// Wait this many frames.
    Frames(u32),
}

impl Script {
    /// The screenshot's conversation: walk to the blacksmith, ask for a horseshoe, wait.
    #[must_use]
    pub fn blacksmith_visit() -> Self {
        let smith = VILLAGERS[0].position + Vec2::new(60.0, 0.0);
        Self {
            steps: [
                Step::WalkTo(smith),
                Step::Frames(5),
                Step::Talk,
                Step::Frames(3),
                Step::Say("Here are 3 gold coins. Please give me a horseshoe.".into()),
                Step::AwaitReply,
                Step::Frames(10),
            ]
            .into(),
            frames: 0,
            done: false,
        }
    }
}

/// The game's systems that consume [`Controls`]; input systems run before it.
#[derive(SystemSet, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VillageInput;

/// The demo's rules and state. Needs `NpcAiPlugin` and an asset server with the personas.
pub struct VillageGamePlugin;

impl Plugin for VillageGamePlugin {
    fn build(&self, app: &mut App) {
        app.init_resource::<Controls>()
            .init_resource::<Village>()
            .init_resource::<Conversation>()
            .init_resource::<Chatter>()
            .init_resource::<DebugStats>()
            .init_resource::<PersonasApplied>()
            .add_observer(track_personas)
            .add_systems(Startup, spawn_village)
            .add_systems(
                Update,
                (
                    run_script,
                    move_player,
                    find_nearby,
                    talk_and_leave,
                    send_line,
                    villager_chatter,
                )
                    .chain()
                    .in_set(VillageInput)
                    .before(NpcAiSystems::SendRequests),
            )
            .add_systems(
                Update,
                (stream_into_bubbles, count_pending).after(NpcAiSystems::ReceiveEvents),
            )
            .add_observer(reply_done)
            .add_observer(judge_action);
    }
}

fn spawn_village(mut commands: Commands, assets: Res<AssetServer>) {
    commands.spawn((
        Player,
        Transform::from_translation(PLAYER_START.extend(2.0)),
    ));
    for (index, spec) in VILLAGERS.iter().enumerate() {
        commands.spawn((
            Npc::new(assets.load(spec.persona)),
            Villager {
                index,
                name: spec.name.to_owned(),
                greeted: false,
            },
            Bubble::default(),
            Transform::from_translation(spec.position.extend(1.0)),
        ));
    }
    commands.spawn((Gate, Transform::from_xyz(0.0, WALL_Y, 0.5)));
}

fn run_script(
    script: Option<ResMut<Script>>,
    mut controls: ResMut<Controls>,
    player: Query<&Transform, With<Player>>,
    conversation: Res<Conversation>,
    npcs: Query<(&NpcState, &Bubble)>,
) {
    let Some(mut script) = script else { return };
    controls.movement = Vec2::ZERO;
    let Some(step) = script.steps.front().cloned() else {
        script.done = true;
        return;
    };
    script.frames += 1;
    let finished = match step {
        Step::WalkTo(target) => {
            let at = player
                .single()
                .map(|t| t.translation.truncate())
                .unwrap_or_default();
            let to = target - at;
            if to.length() < 8.0 {
                true
            } else {
                controls.movement = to;
                false
            }
        }
        Step::Talk => {
            controls.talk = true;
            true
        }
        Step::Say(line) => {
            controls.say = Some(line);
            true
        }
        Step::AwaitReply => conversation.with.is_some_and(|npc| {
            // Wait for the line to be taken up, then for the reply to end.
            npcs.get(npc).is_ok_and(|(state, bubble)| {
                script.frames > 2 && *state == NpcState::Idle && !bubble.text.is_empty()
            })
        }),
        Step::Frames(n) => script.frames >= n,
    };
    if finished {
        script.steps.pop_front();
        script.frames = 0;
    }
}

fn move_player(
    time: Res<Time>,
    controls: Res<Controls>,
    village: Res<Village>,
    conversation: Res<Conversation>,
    mut player: Query<&mut Transform, With<Player>>,
) {
    let Ok(mut transform) = player.single_mut() else {
        return;
    };
    if conversation.with.is_some() && controls.say.is_none() && !controls.leave {
        // Talking: the player stands still (typing must not walk).
        if controls.movement == Vec2::ZERO {
            return;
        }
    }
    let step = controls.movement.normalize_or_zero() * PLAYER_SPEED * time.delta_secs();
    let mut next = (transform.translation.truncate() + step).clamp(-BOUNDS, BOUNDS);
    // The wall: only through the gate, and only when it is open.
    let crosses = (transform.translation.y < WALL_Y) != (next.y < WALL_Y);
    if crosses && !(village.gate_open && next.x.abs() < GATE_HALF_WIDTH) {
        next.y = transform.translation.y;
    }
    transform.translation = next.extend(transform.translation.z);
}

#[allow(clippy::type_complexity)]
fn find_nearby(
    mut conversation: ResMut<Conversation>,
    player: Query<&Transform, With<Player>>,
    mut villagers: Query<(Entity, &Transform, &mut Villager, &mut Bubble, &Npc), Without<Player>>,
    personas: Res<Assets<bevy_npc_ai::Persona>>,
) {
    let Ok(player) = player.single() else { return };
    let at = player.translation.truncate();
    let mut nearest: Option<(Entity, f32)> = None;
    for (entity, transform, mut villager, mut bubble, npc) in &mut villagers {
        let persona = personas.get(&npc.persona);
        if let Some(persona) = persona
            && villager.name != persona.0.name
        {
            villager.name = persona.0.name.clone();
        }
        let distance = transform.translation.truncate().distance(at);
        if distance <= TALK_RADIUS && nearest.is_none_or(|(_, d)| distance < d) {
            nearest = Some((entity, distance));
        }
        // Greet on approach, once, with the persona's own greeting.
        if distance <= TALK_RADIUS * 1.5
            && !villager.greeted
            && !bubble.streaming
            && let Some(persona) = persona
        {
            villager.greeted = true;
            bubble.text = persona.0.greeting.clone();
        }
    }
    conversation.nearby = nearest.map(|(entity, _)| entity);
    // Walking away ends the conversation.
    if let Some(with) = conversation.with
        && let Ok((_, transform, ..)) = villagers.get(with)
        && transform.translation.truncate().distance(at) > TALK_RADIUS * 2.0
    {
        conversation.with = None;
    }
}

fn talk_and_leave(
    mut controls: ResMut<Controls>,
    mut conversation: ResMut<Conversation>,
    mut chatter: ResMut<Chatter>,
    mut cancel: MessageWriter<CancelReply>,
) {
    if std::mem::take(&mut controls.leave) {
        conversation.with = None;
        conversation.typing.clear();
    }
    if std::mem::take(&mut controls.talk)
        && conversation.with.is_none()
        && let Some(npc) = conversation.nearby
    {
        conversation.with = Some(npc);
        // The player interrupts any chatter of this villager.
        if let Some((a, b)) = chatter.pair
            && (a == npc || b == npc)
        {
            cancel.write(CancelReply { npc: a });
            cancel.write(CancelReply { npc: b });
            chatter.pair = None;
            chatter.interrupted += 1;
            chatter.cooldown = 15.0;
        }
    }
}

fn send_line(
    mut controls: ResMut<Controls>,
    mut conversation: ResMut<Conversation>,
    mut bubbles: Query<&mut Bubble>,
    mut say: MessageWriter<PlayerSaid>,
) {
    let Some(line) = controls.say.take() else {
        return;
    };
    let Some(npc) = conversation.with else {
        return;
    };
    let line = line.trim().to_owned();
    if line.is_empty() {
        return;
    }
    if let Ok(mut bubble) = bubbles.get_mut(npc) {
        bubble.text.clear();
        bubble.streaming = true;
    }
    conversation.player_line = line.clone();
    say.write(PlayerSaid { npc, text: line });
}

/// Two idle villagers near each other talk, at background priority, until the player speaks
/// to one of them.
#[allow(clippy::too_many_arguments)]
fn villager_chatter(
    time: Res<Time>,
    mut chatter: ResMut<Chatter>,
    conversation: Res<Conversation>,
    handle: Res<RuntimeHandle>,
    status: Res<NpcAiStatus>,
    mut villagers: Query<(Entity, &Transform, &Villager, &NpcState, &mut Bubble)>,
    applied: Res<PersonasApplied>,
) {
    chatter.cooldown -= time.delta_secs();
    if chatter.pair.is_some() || chatter.cooldown > 0.0 || !matches!(*status, NpcAiStatus::Ready(_))
    {
        return;
    }
    let busy =
        |entity: Entity| conversation.with == Some(entity) || conversation.nearby == Some(entity);
    let idle: Vec<(Entity, Vec2, String)> = villagers
        .iter()
        .filter(|(entity, _, _, state, bubble)| {
            **state == NpcState::Idle
                && !bubble.streaming
                && !busy(*entity)
                && applied.0.contains(entity)
        })
        .map(|(entity, transform, villager, ..)| {
            (
                entity,
                transform.translation.truncate(),
                villager.name.clone(),
            )
        })
        .collect();
    for (i, (a, at_a, name_a)) in idle.iter().enumerate() {
        for (b, at_b, _) in &idle[i + 1..] {
            if at_a.distance(*at_b) > CHAT_RADIUS {
                continue;
            }
            let opener = format!("{name_a} says to you: Good day, neighbour! Any news today?");
            if let Ok((.., mut bubble)) = villagers.get_mut(*a) {
                bubble.text = "Good day, neighbour! Any news today?".into();
            }
            if send_chatter(&handle, *b, opener) {
                chatter.pair = Some((*a, *b));
                chatter.turns_left = CHAT_TURNS;
            }
            return;
        }
    }
}

/// The NPCs whose persona the worker has accepted (chatter waits for them).
#[derive(Resource, Default, Debug)]
pub struct PersonasApplied(pub HashSet<Entity>);

fn send_chatter(handle: &RuntimeHandle, to: Entity, line: String) -> bool {
    let options = SayOptions {
        priority: Priority::Background,
        deadline: None,
    };
    handle
        .runtime()
        .say_with(NpcId(to.to_bits()), line, options)
        .is_ok()
}

fn stream_into_bubbles(mut deltas: MessageReader<NpcReplyDelta>, mut bubbles: Query<&mut Bubble>) {
    for delta in deltas.read() {
        if let Ok(mut bubble) = bubbles.get_mut(delta.npc) {
            if bubble.finished_this_frame {
                // `NpcReplied` (an observer) came first this frame, and its text holds this
                // delta already: a reply's last words may arrive in the same frame as its end.
                continue;
            }
            if !bubble.streaming {
                // First words of a reply (a chatter line, say): start a fresh bubble.
                bubble.text.clear();
                bubble.streaming = true;
            }
            bubble.text.push_str(&delta.text);
        }
    }
    for mut bubble in &mut bubbles {
        bubble.finished_this_frame = false;
    }
}

fn count_pending(mut stats: ResMut<DebugStats>, npcs: Query<&NpcState>) {
    stats.pending = npcs.iter().filter(|s| **s != NpcState::Idle).count();
}

fn reply_done(
    reply: On<NpcReplied>,
    mut stats: ResMut<DebugStats>,
    mut chatter: ResMut<Chatter>,
    handle: Res<RuntimeHandle>,
    mut bubbles: Query<&mut Bubble>,
    villagers: Query<&Villager>,
) {
    stats.replies += 1;
    stats.tokens_per_second = reply.stats.tokens_per_second();
    stats.cached_tokens = reply.stats.cached_tokens;
    stats.prompt_tokens = reply.stats.prompt_tokens;
    stats.source = Some(reply.stats.source);
    if let Ok(mut bubble) = bubbles.get_mut(reply.entity) {
        bubble.streaming = false;
        bubble.finished_this_frame = true;
        bubble.text = reply.text.clone();
        bubble.source = Some(reply.stats.source);
    }
    // Chatter: the listener answered; now the other one answers it.
    if let Some((speaker, listener)) = chatter.pair
        && listener == reply.entity
    {
        chatter.exchanges += 1;
        chatter.turns_left = chatter.turns_left.saturating_sub(1);
        let name = villagers
            .get(listener)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        if chatter.turns_left == 0 || reply.text.is_empty() {
            chatter.pair = None;
            chatter.cooldown = 20.0;
        } else if send_chatter(
            &handle,
            speaker,
            format!("{name} says to you: {}", reply.text),
        ) {
            chatter.pair = Some((listener, speaker));
        } else {
            chatter.pair = None;
        }
    }
}

fn judge_action(
    request: On<NpcActionRequested>,
    mut village: ResMut<Village>,
    mut stats: ResMut<DebugStats>,
    villagers: Query<&Villager>,
    mut outcomes: MessageWriter<ActionOutcome>,
) {
    let npc = request.entity;
    let action = request.action.clone();
    let who = villagers
        .get(npc)
        .map(|v| v.name.clone())
        .unwrap_or_default();
    stats.actions.0 += 1;
    let verdict: Result<String, String> = match action.name.as_str() {
        "give_item" => {
            let item = action.text_arg("item").unwrap_or_default().to_owned();
            match price_of(&item) {
                Some(price) if village.gold >= price => {
                    village.gold -= price;
                    village.inventory.push(item.clone());
                    Ok(format!("{who} hands you a {item} for {price} gold."))
                }
                Some(price) => Err(format!(
                    "the player has only {} of {price} gold",
                    village.gold
                )),
                None => Err(format!("there is no {item} in the forge")),
            }
        }
        "open_gate" if village.gate_open => Err("the gate is already open".into()),
        "open_gate" => {
            village.gate_open = true;
            Ok(format!("{who} opens the north gate."))
        }
        "close_gate" if !village.gate_open => Err("the gate is already shut".into()),
        "close_gate" => {
            village.gate_open = false;
            Ok(format!("{who} shuts the north gate."))
        }
        "set_price" => Ok(format!(
            "{who} offers a price of {} gold.",
            action.integer_arg("gold").unwrap_or_default()
        )),
        other => Err(format!("the game does not know how to {other}")),
    };
    match verdict {
        Ok(what) => {
            stats.actions.1 += 1;
            village.log.push(what);
            outcomes.write(ActionOutcome::approve(npc, action));
        }
        Err(why) => {
            village
                .log
                .push(format!("{who} tried {action}, refused: {why}."));
            outcomes.write(ActionOutcome::reject(npc, action, why));
        }
    }
}

/// Records accepted personas for [`villager_chatter`].
pub fn track_personas(applied: On<NpcPersonaApplied>, mut set: ResMut<PersonasApplied>) {
    set.0.insert(applied.entity);
}
