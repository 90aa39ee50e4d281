//! Drawing the village with shapes and text, the keyboard, the F3 overlay and the scripted
//! screenshot. Everything that needs a window lives here; the rules are in `game.rs`.

use std::path::PathBuf;

use bevy::input::ButtonState;
use bevy::input::keyboard::{Key, KeyboardInput};
use bevy::prelude::*;
use bevy::render::view::screenshot::{Screenshot, save_to_disk};
use bevy::sprite::Anchor;
use bevy::text::TextBounds;
use bevy_npc_ai::prelude::*;

use crate::game::{
    BOUNDS, Bubble, Controls, Conversation, DebugStats, GATE_HALF_WIDTH, Gate, Player, Script,
    VILLAGERS, Village, Villager, WALL_Y,
};

/// Width of a speech bubble's text, in pixels.
const BUBBLE_WIDTH: f32 = 300.0;
/// The speech bubble's text colour (sRGB bytes), which the screenshot check looks for.
pub const BUBBLE_TEXT_RGB: [u8; 3] = [20, 24, 70];
/// The speech bubble's background colour (sRGB bytes).
pub const BUBBLE_BACKGROUND_RGB: [u8; 3] = [250, 248, 235];
/// Window size.
pub const WINDOW: (u32, u32) = (1280, 720);

fn rgb(c: [u8; 3]) -> Color {
    Color::srgb_u8(c[0], c[1], c[2])
}

/// Where the scripted run saves its screenshot; set with `--script`.
#[derive(Resource, Clone, Debug)]
pub struct ScreenshotPlan {
    /// The PNG to write.
    pub path: PathBuf,
    /// Give up (and exit with an error) after this many frames.
    pub max_frames: u32,
    /// Frames so far.
    pub frames: u32,
    /// The capture was requested.
    pub requested: bool,
}

/// Draws the village and maps the keyboard onto [`Controls`].
pub struct VillageViewPlugin;

impl Plugin for VillageViewPlugin {
    fn build(&self, app: &mut App) {
        app.insert_resource(ClearColor(Color::srgb(0.33, 0.5, 0.28)))
            .add_systems(Startup, (spawn_scenery, spawn_ui))
            .add_systems(
                Update,
                (
                    dress_new_entities,
                    keyboard_controls.before(crate::game::VillageInput),
                    follow_bubbles,
                    show_gate,
                    update_ui,
                    scripted_screenshot,
                ),
            );
    }
}

/// Marks the text of a villager's bubble.
#[derive(Component)]
struct BubbleText(Entity);
/// Marks the background of a villager's bubble.
#[derive(Component)]
struct BubbleBackground(Entity);
/// Marks a villager's name tag.
#[derive(Component)]
struct NameTag(Entity);
#[derive(Component)]
struct InventoryText;
#[derive(Component)]
struct PromptText;
#[derive(Component)]
struct OverlayText;
#[derive(Component)]
struct LogText;

fn spawn_scenery(mut commands: Commands) {
    commands.spawn(Camera2d);
    let rect = |commands: &mut Commands, color: Color, at: Vec2, size: Vec2, z: f32| {
        commands.spawn((
            Sprite::from_color(color, size),
            Transform::from_translation(at.extend(z)),
        ));
    };
    // Paths.
    let sand = Color::srgb(0.78, 0.7, 0.5);
    rect(
        &mut commands,
        sand,
        Vec2::new(0.0, -40.0),
        Vec2::new(1280.0, 50.0),
        0.0,
    );
    rect(
        &mut commands,
        sand,
        Vec2::new(0.0, 60.0),
        Vec2::new(60.0, 380.0),
        0.0,
    );
    // Outside the wall.
    rect(
        &mut commands,
        Color::srgb(0.25, 0.4, 0.22),
        Vec2::new(0.0, (WALL_Y + BOUNDS.y + 40.0) / 2.0),
        Vec2::new(1280.0, BOUNDS.y + 40.0 - WALL_Y),
        0.0,
    );
    // The wall, with a gap for the gate.
    let wall = Color::srgb(0.45, 0.45, 0.48);
    let half = 640.0 - GATE_HALF_WIDTH;
    for side in [-1.0, 1.0] {
        rect(
            &mut commands,
            wall,
            Vec2::new(side * (GATE_HALF_WIDTH + half / 2.0), WALL_Y),
            Vec2::new(half, 24.0),
            0.2,
        );
    }
    // Buildings: forge, inn, healer's hut.
    rect(
        &mut commands,
        Color::srgb(0.3, 0.28, 0.28),
        Vec2::new(-470.0, 60.0),
        Vec2::new(170.0, 120.0),
        0.1,
    );
    rect(
        &mut commands,
        Color::srgb(1.0, 0.5, 0.1),
        Vec2::new(-430.0, 40.0),
        Vec2::new(30.0, 20.0),
        0.15,
    );
    rect(
        &mut commands,
        Color::srgb(0.5, 0.32, 0.2),
        Vec2::new(370.0, 110.0),
        Vec2::new(200.0, 120.0),
        0.1,
    );
    rect(
        &mut commands,
        Color::srgb(0.55, 0.5, 0.35),
        Vec2::new(540.0, -230.0),
        Vec2::new(140.0, 100.0),
        0.1,
    );
    // The river's bank, where Mags keeps her ferry.
    rect(
        &mut commands,
        Color::srgb(0.2, 0.4, 0.65),
        Vec2::new(-150.0, -268.0),
        Vec2::new(300.0, 46.0),
        0.1,
    );
    let label = |commands: &mut Commands, text: &str, at: Vec2| {
        commands.spawn((
            Text2d::new(text),
            TextFont::from_font_size(14.0),
            TextColor(Color::srgb(0.95, 0.92, 0.8)),
            Transform::from_translation(at.extend(0.3)),
        ));
    };
    label(&mut commands, "FORGE", Vec2::new(-470.0, 100.0));
    label(&mut commands, "THE INN", Vec2::new(370.0, 150.0));
    label(&mut commands, "HEALER", Vec2::new(540.0, -200.0));
    label(&mut commands, "FERRY", Vec2::new(-150.0, -268.0));
    label(&mut commands, "NORTH GATE", Vec2::new(0.0, WALL_Y + 30.0));
}

fn spawn_ui(mut commands: Commands) {
    let text = |size: f32| (TextFont::from_font_size(size), TextColor(Color::WHITE));
    commands.spawn((
        Node {
            position_type: PositionType::Absolute,
            bottom: px(0.0),
            left: px(0.0),
            right: px(0.0),
            padding: UiRect::all(px(8.0)),
            flex_direction: FlexDirection::Column,
            row_gap: px(4.0),
            ..default()
        },
        BackgroundColor(Color::srgba(0.0, 0.0, 0.0, 0.65)),
        children![
            (Text::new(""), text(16.0), PromptText),
            (Text::new(""), text(14.0), LogText),
            (Text::new(""), text(18.0), InventoryText),
        ],
    ));
    commands.spawn((
        Node {
            position_type: PositionType::Absolute,
            top: px(8.0),
            right: px(8.0),
            padding: UiRect::all(px(6.0)),
            ..default()
        },
        BackgroundColor(Color::srgba(0.0, 0.0, 0.0, 0.6)),
        Text::new(""),
        text(14.0),
        OverlayText,
    ));
    commands.spawn((
        Node {
            position_type: PositionType::Absolute,
            top: px(8.0),
            left: px(8.0),
            ..default()
        },
        Text::new("WASD walk | E talk | Enter send | Esc leave | F3 debug"),
        text(14.0),
    ));
}

/// Gives the game's bare entities their shapes, name tags and bubbles.
#[allow(clippy::type_complexity)]
fn dress_new_entities(
    mut commands: Commands,
    players: Query<Entity, Added<Player>>,
    villagers: Query<(Entity, &Villager), Added<Villager>>,
    gates: Query<Entity, Added<Gate>>,
) {
    for player in &players {
        commands.entity(player).insert((
            Sprite::from_color(Color::srgb(0.95, 0.95, 0.3), Vec2::splat(26.0)),
            Visibility::default(),
        ));
        commands.spawn((
            Text2d::new("You"),
            TextFont::from_font_size(13.0),
            TextColor(Color::WHITE),
            Transform::from_xyz(0.0, -26.0, 0.1),
            ChildOf(player),
        ));
    }
    for (entity, villager) in &villagers {
        let [r, g, b] = VILLAGERS[villager.index].color;
        commands.entity(entity).insert((
            Sprite::from_color(Color::srgb(r, g, b), Vec2::splat(32.0)),
            Visibility::default(),
        ));
        commands.spawn((
            Text2d::new(villager.name.clone()),
            TextFont::from_font_size(14.0),
            TextColor(Color::WHITE),
            Transform::from_xyz(0.0, -30.0, 0.1),
            NameTag(entity),
            ChildOf(entity),
        ));
        // The bubble is not a child: it is placed above the villager and kept on screen.
        commands.spawn((
            Sprite::from_color(rgb(BUBBLE_BACKGROUND_RGB), Vec2::ZERO),
            Anchor::BOTTOM_CENTER,
            Transform::from_xyz(0.0, 0.0, 5.0),
            Visibility::Hidden,
            BubbleBackground(entity),
        ));
        commands.spawn((
            Text2d::new(""),
            TextFont::from_font_size(16.0),
            TextColor(rgb(BUBBLE_TEXT_RGB)),
            TextLayout::justify(Justify::Left),
            TextBounds::new_horizontal(BUBBLE_WIDTH),
            Anchor::BOTTOM_CENTER,
            Transform::from_xyz(0.0, 0.0, 6.0),
            Visibility::Hidden,
            BubbleText(entity),
        ));
    }
    for gate in &gates {
        commands.entity(gate).insert((
            Sprite::from_color(
                Color::srgb(0.45, 0.28, 0.12),
                Vec2::new(GATE_HALF_WIDTH * 2.0, 20.0),
            ),
            Visibility::default(),
        ));
    }
}

/// The on-screen rectangle of the bubble of `villager` (window pixels, origin top left), when
/// it is shown.
fn bubble_anchor(villager: Vec2) -> Vec2 {
    let x = villager.x.clamp(
        -(WINDOW.0 as f32) / 2.0 + BUBBLE_WIDTH / 2.0 + 12.0,
        WINDOW.0 as f32 / 2.0 - BUBBLE_WIDTH / 2.0 - 12.0,
    );
    Vec2::new(x, villager.y + 30.0)
}

#[allow(clippy::type_complexity)]
fn follow_bubbles(
    villagers: Query<
        (&Transform, &Bubble, &Villager),
        (Without<BubbleText>, Without<BubbleBackground>),
    >,
    mut texts: Query<
        (
            &BubbleText,
            &mut Text2d,
            &mut Transform,
            &mut Visibility,
            &bevy::text::TextLayoutInfo,
        ),
        Without<BubbleBackground>,
    >,
    mut backgrounds: Query<
        (
            &BubbleBackground,
            &mut Sprite,
            &mut Transform,
            &mut Visibility,
        ),
        Without<BubbleText>,
    >,
    mut tags: Query<(&NameTag, &mut Text2d), Without<BubbleText>>,
) {
    let mut sizes = Vec::new();
    for (owner, mut text, mut transform, mut visibility, layout) in &mut texts {
        let Ok((at, bubble, _)) = villagers.get(owner.0) else {
            continue;
        };
        let shown = !bubble.text.trim().is_empty();
        // Long replies show their last words, so bubbles stay small.
        let shown_text = tail_of(&bubble.text, 200);
        if text.0 != shown_text {
            text.0 = shown_text;
        }
        let anchor = bubble_anchor(at.translation.truncate());
        transform.translation = (anchor + Vec2::new(0.0, 8.0)).extend(6.0);
        visibility.set_if_neq(if shown {
            Visibility::Visible
        } else {
            Visibility::Hidden
        });
        sizes.push((owner.0, shown, anchor, layout.size));
    }
    for (owner, mut sprite, mut transform, mut visibility) in &mut backgrounds {
        let Some(&(_, shown, anchor, size)) = sizes.iter().find(|(o, ..)| *o == owner.0) else {
            continue;
        };
        sprite.custom_size = Some(Vec2::new(BUBBLE_WIDTH + 16.0, size.y + 16.0));
        transform.translation = anchor.extend(5.0);
        visibility.set_if_neq(if shown {
            Visibility::Visible
        } else {
            Visibility::Hidden
        });
    }
    for (tag, mut text) in &mut tags {
        if let Ok((_, _, villager)) = villagers.get(tag.0)
            && text.0 != villager.name
        {
            text.0.clone_from(&villager.name);
        }
    }
}

fn tail_of(text: &str, max_chars: usize) -> String {
    let text = text.replace('\n', " ");
    let count = text.chars().count();
    if count <= max_chars {
        return text;
    }
    let tail: String = text.chars().skip(count - max_chars).collect();
    format!("...{}", tail.trim_start())
}

fn show_gate(village: Res<Village>, mut gates: Query<(&mut Sprite, &mut Transform), With<Gate>>) {
    for (mut sprite, mut transform) in &mut gates {
        let (color, x) = if village.gate_open {
            (Color::srgb(0.3, 0.2, 0.1), GATE_HALF_WIDTH * 1.6)
        } else {
            (Color::srgb(0.45, 0.28, 0.12), 0.0)
        };
        sprite.color = color;
        transform.translation.x = x;
        sprite.custom_size = Some(Vec2::new(
            if village.gate_open {
                16.0
            } else {
                GATE_HALF_WIDTH * 2.0
            },
            20.0,
        ));
    }
}

#[allow(clippy::too_many_arguments)]
fn keyboard_controls(
    keys: Res<ButtonInput<KeyCode>>,
    mut typed: MessageReader<KeyboardInput>,
    mut controls: ResMut<Controls>,
    mut conversation: ResMut<Conversation>,
    mut stats: ResMut<DebugStats>,
    script: Option<Res<Script>>,
) {
    if keys.just_pressed(KeyCode::F3) {
        stats.visible = !stats.visible;
    }
    if script.is_some() {
        return; // The script drives.
    }
    if conversation.with.is_some() {
        controls.movement = Vec2::ZERO;
        for key in typed.read() {
            if key.state != ButtonState::Pressed {
                continue;
            }
            match &key.logical_key {
                Key::Enter => controls.say = Some(std::mem::take(&mut conversation.typing)),
                Key::Escape => controls.leave = true,
                Key::Backspace => {
                    conversation.typing.pop();
                }
                _ => {
                    if let Some(text) = &key.text
                        && conversation.typing.chars().count() < 200
                    {
                        conversation
                            .typing
                            .extend(text.chars().filter(|c| !c.is_control()));
                    }
                }
            }
        }
        return;
    }
    typed.clear();
    let mut movement = Vec2::ZERO;
    for (key, dir) in [
        (KeyCode::KeyW, Vec2::Y),
        (KeyCode::KeyS, -Vec2::Y),
        (KeyCode::KeyA, -Vec2::X),
        (KeyCode::KeyD, Vec2::X),
        (KeyCode::ArrowUp, Vec2::Y),
        (KeyCode::ArrowDown, -Vec2::Y),
        (KeyCode::ArrowLeft, -Vec2::X),
        (KeyCode::ArrowRight, Vec2::X),
    ] {
        if keys.pressed(key) {
            movement += dir;
        }
    }
    controls.movement = movement;
    if keys.just_pressed(KeyCode::KeyE) {
        controls.talk = true;
    }
}

#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn update_ui(
    village: Res<Village>,
    conversation: Res<Conversation>,
    stats: Res<DebugStats>,
    chatter: Res<crate::game::Chatter>,
    status: Res<NpcAiStatus>,
    meter: Res<NpcCostMeter>,
    villagers: Query<&Villager>,
    mut texts: ParamSet<(
        Query<&mut Text, With<InventoryText>>,
        Query<&mut Text, With<PromptText>>,
        Query<(&mut Text, &mut Visibility), With<OverlayText>>,
        Query<&mut Text, With<LogText>>,
    )>,
) {
    let inventory = if village.inventory.is_empty() {
        "(empty)".to_owned()
    } else {
        village.inventory.join(", ")
    };
    let gate = if village.gate_open { "open" } else { "shut" };
    set(
        &mut texts.p0(),
        format!(
            "Gold: {}   Inventory: {inventory}   North gate: {gate}",
            village.gold
        ),
    );
    let name = |npc: Entity| {
        villagers
            .get(npc)
            .map(|v| v.name.clone())
            .unwrap_or_default()
    };
    let prompt = match (conversation.with, conversation.nearby, &*status) {
        (_, _, NpcAiStatus::Loading) => "Loading the model…".to_owned(),
        (_, _, NpcAiStatus::Failed(error)) => format!("The model failed to load: {error}"),
        (Some(npc), ..) => format!(
            "Talking to {} (Enter to send, Esc to leave)   You: {}{}",
            name(npc),
            if conversation.typing.is_empty() {
                &conversation.player_line
            } else {
                &conversation.typing
            },
            if conversation.typing.is_empty() {
                ""
            } else {
                "_"
            },
        ),
        (None, Some(npc), _) => format!("Press E to talk to {}", name(npc)),
        (None, None, _) => "Walk up to a villager.".to_owned(),
    };
    set(&mut texts.p1(), prompt);
    set(
        &mut texts.p3(),
        village.log.last().cloned().unwrap_or_default(),
    );
    let mut overlay = texts.p2();
    if let Ok((mut text, mut visibility)) = overlay.single_mut() {
        visibility.set_if_neq(if stats.visible {
            Visibility::Visible
        } else {
            Visibility::Hidden
        });
        let reuse = if stats.prompt_tokens == 0 {
            0.0
        } else {
            100.0 * stats.cached_tokens as f64 / stats.prompt_tokens as f64
        };
        let value = format!(
            "tokens/s (last reply): {:.1}\nKV reuse: {} of {} prompt tokens ({reuse:.0}%)\npending requests: {}\nreplies: {}\nactions requested/approved: {}/{}\nvillager chatter: {} exchanges, {} interrupted\ncost so far: ${:.4} (local compute priced at ${:.2}/h), ${:.3} per player-hour at 5 lines/min\nspeech: {} sentences, {} characters, real-time factor {:.2}, ${:.5} local vs ${:.4} on a cloud voice",
            stats.tokens_per_second,
            stats.cached_tokens,
            stats.prompt_tokens,
            stats.pending,
            stats.replies,
            stats.actions.0,
            stats.actions.1,
            chatter.exchanges,
            chatter.interrupted,
            meter.total().total_cost(&meter.prices),
            meter.prices.local_per_hour,
            meter.per_player_hour(300.0),
            meter.total().spoken_sentences,
            meter.total().spoken_characters,
            meter.total().speech_real_time_factor(),
            meter.total().speech_cost(&meter.prices),
            meter.total().cloud_speech_equivalent(&meter.prices),
        );
        if text.0 != value {
            text.0 = value;
        }
    }
}

fn set(query: &mut Query<&mut Text, impl bevy::ecs::query::QueryFilter>, value: String) {
    if let Ok(mut text) = query.single_mut()
        && text.0 != value
    {
        text.0 = value;
    }
}

/// With `--script`: once the script is over, saves a screenshot and a note of where the
/// speaking villager's bubble is, then exits.
fn scripted_screenshot(
    mut commands: Commands,
    plan: Option<ResMut<ScreenshotPlan>>,
    script: Option<Res<Script>>,
    (conversation, bubbles): (Res<Conversation>, Query<&Bubble>),
    backgrounds: Query<(&BubbleBackground, &Transform, &Sprite)>,
    texts: Query<(&BubbleText, &Text2d)>,
    mut exit: MessageWriter<AppExit>,
) {
    let (Some(mut plan), Some(script)) = (plan, script) else {
        return;
    };
    plan.frames += 1;
    if plan.frames > plan.max_frames {
        error!(
            "the scripted run did not finish in {} frames",
            plan.max_frames
        );
        exit.write(AppExit::error());
        return;
    }
    if plan.requested {
        if plan.path.is_file() {
            exit.write(AppExit::Success);
        }
        return;
    }
    if !script.done {
        return;
    }
    // The bubble of the villager the player talks to, in window pixels (origin top left).
    let Some(npc) = conversation.with else { return };
    let Some((_, transform, sprite)) = backgrounds.iter().find(|(owner, ..)| owner.0 == npc) else {
        return;
    };
    let size = sprite.custom_size.unwrap_or_default();
    let bottom_center = transform.translation.truncate();
    let left = bottom_center.x - size.x / 2.0 + WINDOW.0 as f32 / 2.0;
    let top = WINDOW.1 as f32 / 2.0 - (bottom_center.y + size.y);
    let shown = texts
        .iter()
        .find(|(owner, _)| owner.0 == npc)
        .map(|(_, text)| text.0.replace('\n', " "))
        .unwrap_or_default();
    let note = format!(
        "bubble {} {} {} {}\ntext_rgb {} {} {}\nshown {shown}\nsource {:?}\n",
        left.round(),
        top.round(),
        size.x.round(),
        size.y.round(),
        BUBBLE_TEXT_RGB[0],
        BUBBLE_TEXT_RGB[1],
        BUBBLE_TEXT_RGB[2],
        // The source of the reply in this villager's bubble (not of chatter elsewhere).
        bubbles.get(npc).ok().and_then(|bubble| bubble.source),
    );
    if let Err(err) = std::fs::write(plan.path.with_extension("txt"), note) {
        error!("cannot write the bubble note: {err}");
    }
    let _ = std::fs::remove_file(&plan.path);
    commands
        .spawn(Screenshot::primary_window())
        .observe(save_to_disk(plan.path.clone()));
    plan.requested = true;
}
