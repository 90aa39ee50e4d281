//! The RPG demo in a real window: run under Xvfb with Mesa's software Vulkan and `--voice`, it
//! walks to the blacksmith, asks for a horseshoe on the real default model, saves a screenshot
//! and exits. The picture must not be blank, the speech bubble must hold text-coloured pixels
//! in proportion to the letters of the reply it shows, and the blacksmith must have spoken
//! with his Piper voice (no audio device here: into the speech buffer) without a problem.
//!
//! Needs `xvfb-run` and Mesa's Vulkan driver (`cargo xtask setup` installs them) and the
//! example built with the `demo` feature:
//! `cargo test --release -p bevy_npc_ai --features demo --test rpg_screenshot`.
//! With `NPC_AI_UPDATE_SCREENSHOT=1` the picture is also copied to `docs/rpg.png`.
//!
//! With the `cloud` feature as well (as `cargo xtask test` builds it), the same scripted visit
//! runs with `--remote` against a real `llama-server` serving the default model, and the
//! blacksmith's reply must come from the server.

mod common;
#[cfg(feature = "cloud")]
#[path = "common/servers.rs"]
mod servers;

use std::fs::File;
use std::io::BufReader;
use std::process::Command;

struct Picture {
    width: usize,
    height: usize,
    rgb: Vec<[u8; 3]>,
}

fn read_png(path: &std::path::Path) -> Picture {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buffer = vec![0; reader.output_buffer_size().expect("fits memory")];
    let info = reader.next_frame(&mut buffer).expect("one frame");
    let channels = info.color_type.samples();
    assert!(channels >= 3, "colour image, got {:?}", info.color_type);
    let rgb = buffer[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    Picture {
        width: info.width as usize,
        height: info.height as usize,
        rgb,
    }
}

/// Runs the demo's scripted visit under Xvfb, saving its screenshot to `shot`, with `args`
/// after the script's and `envs` set; panics with its log if it fails.
fn run_scripted_demo(shot: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) {
    let output = Command::new("xvfb-run")
        .args(["-a", "-s", "-screen 0 1280x720x24"])
        .arg(common::example_binary("rpg"))
        .arg("--script")
        .arg(shot)
        .args(args)
        .envs(envs.iter().copied())
        .env("WGPU_BACKEND", "vulkan")
        .output()
        .expect("xvfb-run runs (cargo xtask setup installs it)");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the demo failed:\n{log}");
}

#[test]
fn the_scripted_demo_draws_the_village_and_a_speech_bubble_with_text() {
    let _serial = common::serial();
    let dir = common::scratch_dir("rpg-screenshot");
    let shot = dir.join("rpg.png");
    run_scripted_demo(&shot, &["--threads", "2", "--voice"], &[]);
    let picture = read_png(&shot);
    assert_eq!((picture.width, picture.height), (1280, 720));

    // Not blank: many colours, and no single colour covers almost everything.
    let mut colours: Vec<[u8; 3]> = picture.rgb.clone();
    colours.sort_unstable();
    colours.dedup();
    assert!(colours.len() > 200, "only {} colours", colours.len());
    let grass = picture.rgb[picture.width * 600 + 640];
    let same = picture.rgb.iter().filter(|p| **p == grass).count();
    assert!(
        same * 10 < picture.rgb.len() * 9,
        "the picture is one colour"
    );

    // The bubble: its rectangle is noted by the demo beside the PNG.
    let note = std::fs::read_to_string(shot.with_extension("txt")).expect("bubble note");
    let numbers = |key: &str| -> Vec<f32> {
        note.lines()
            .find_map(|l| l.strip_prefix(key))
            .expect(key)
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let bubble = numbers("bubble ");
    let text = numbers("text_rgb ");
    let (left, top, width, height) = (bubble[0], bubble[1], bubble[2], bubble[3]);
    assert!(
        width > 100.0 && height > 20.0,
        "a bubble with text: {bubble:?}"
    );
    let mut inked = 0;
    let mut paper = 0;
    for y in top.max(0.0) as usize..((top + height) as usize).min(picture.height) {
        for x in left.max(0.0) as usize..((left + width) as usize).min(picture.width) {
            let p = picture.rgb[y * picture.width + x];
            let distance: i32 = (0..3)
                .map(|c| (i32::from(p[c]) - text[c] as i32).abs())
                .sum();
            if distance < 60 {
                inked += 1;
            }
            if p.iter().all(|&c| c > 220) {
                paper += 1;
            }
        }
    }
    // What the bubble shows, as the demo noted it: its ink must match its letters.
    let shown = note
        .lines()
        .find_map(|line| line.strip_prefix("shown "))
        .unwrap_or_default();
    let letters = shown.chars().filter(|c| c.is_alphanumeric()).count();
    println!(
        "bubble {bubble:?} showing {shown:?} ({letters} letters): {inked} text-coloured pixels, \
         {paper} bubble pixels; {} colours",
        colours.len()
    );
    assert!(paper > 1000, "the bubble is drawn: {paper} light pixels");
    assert!(letters > 0, "the bubble shows the reply: {shown:?}");
    // Only the cores of the antialiased 16-pixel glyphs are within the colour distance: "Oh, I
    // can do that." gave 75 pixels for 12 letters (6.3 a letter). An empty or unrendered
    // bubble gives none; 3 a letter leaves room for thin letters (i, l, t) in any reply.
    assert!(
        inked >= 3 * letters,
        "the bubble holds its {letters} letters: {inked} text-coloured pixels"
    );

    // Speech: at least the reply's first sentence, with no fallback or failure. (Push-to-talk
    // is on too: there is no microphone here, reported once, and nobody talks.)
    let speech = std::fs::read_to_string(shot.with_extension("speech.txt")).expect("speech note");
    println!("speech note:\n{speech}");
    let spoken: Vec<u64> = speech
        .lines()
        .find_map(|l| l.strip_prefix("spoken "))
        .expect("spoken line")
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        spoken[0] >= 1 && spoken[1] > 0,
        "the blacksmith spoke: {speech}"
    );
    let synthesis_problems: Vec<&str> = speech
        .lines()
        .filter(|l| {
            l.starts_with("problem ") && !l.contains("microphone") && !l.contains("voice helper")
        })
        .collect();
    assert!(synthesis_problems.is_empty(), "{synthesis_problems:?}");

    if std::env::var_os("NPC_AI_UPDATE_SCREENSHOT").is_some() {
        let docs = common::root().join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(&shot, docs.join("rpg.png")).unwrap();
    }
}

/// `--remote`: the villagers' replies come from a real `llama-server` (the default model),
/// while the demo runs as it does on the local model; then again with
/// `NPC_AI_REMOTE_ONLY=1`, the local model's weights not loaded at all.
#[cfg(feature = "cloud")]
#[test]
fn the_scripted_demo_talks_through_an_inference_server_with_remote() {
    let _serial = common::serial();
    // Two slots of 2,048 tokens: the demo's context is 1,536 per NPC, and the blacksmith and
    // a chattering villager may ask at once.
    let server =
        servers::LlamaServer::start_serving(&common::default_model_path(), None, 1, 2, 4096);
    let dir = common::scratch_dir("rpg-remote");
    for only in ["0", "1"] {
        let shot = dir.join(format!("rpg-{only}.png"));
        run_scripted_demo(
            &shot,
            &["--threads", "1", "--remote", &server.base_url()],
            &[("NPC_AI_REMOTE_ONLY", only)],
        );
        let note = std::fs::read_to_string(shot.with_extension("txt")).expect("bubble note");
        println!("NPC_AI_REMOTE_ONLY={only}:\n{note}");
        let line = |key: &str| {
            note.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(line("source "), "Some(Remote)", "{note}");
        let shown = line("shown ");
        assert!(
            shown.chars().any(char::is_alphanumeric),
            "the bubble shows the server's reply: {note}"
        );
    }
}
