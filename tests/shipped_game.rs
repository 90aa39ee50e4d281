//! A game as it is shipped: the README's example (`examples/quickstart.rs`) copied into a
//! folder with its `assets/` beside it (personas and the default model), started from another
//! working directory with no `cargo` environment, as a launcher or a shortcut starts it. It
//! must find its model and persona and reply; with the model missing it must say so and exit,
//! not sit silent.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bevy_npc_ai::npc_native::catalog::DEFAULT_MODEL;

/// Longest a run may take before the test calls it a hang.
const LIMIT: Duration = Duration::from_secs(300);

/// Hard-links `from` to `to`, or copies it where a link is impossible.
fn place(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

/// A shipped game in `dir`: the executable, `assets/personas/` and, if `with_model`,
/// `assets/models/<the default model>`.
fn ship(dir: &Path, with_model: bool) -> PathBuf {
    let game = dir.join("game");
    let exe = game.join("quickstart");
    place(&common::example_binary("quickstart"), &exe);
    let personas = common::root().join("assets/personas");
    for entry in std::fs::read_dir(&personas).unwrap() {
        let path = entry.unwrap().path();
        place(
            &path,
            &game.join("assets/personas").join(path.file_name().unwrap()),
        );
    }
    if with_model {
        place(
            &common::default_model_path(),
            &game.join("assets").join(DEFAULT_MODEL.asset_path()),
        );
    }
    exe
}

/// Runs `exe` from `cwd` without cargo's environment; panics if it runs past [`LIMIT`].
fn run_from(exe: &Path, cwd: &Path) -> (Output, Duration) {
    std::fs::create_dir_all(cwd).unwrap();
    let started = Instant::now();
    let mut child = Command::new(exe)
        .arg("How much is a horseshoe?")
        .current_dir(cwd)
        .env_remove("CARGO_MANIFEST_DIR")
        .env_remove("BEVY_ASSET_ROOT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the shipped game");
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("the shipped game ran past {LIMIT:?} without finishing");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child.wait_with_output().unwrap(), started.elapsed())
}

#[test]
fn a_shipped_game_started_from_another_directory_finds_its_model_and_replies() {
    let _serial = common::serial();
    let dir = common::scratch_dir("shipped");
    let exe = ship(&dir, true);
    let (output, _) = run_from(&exe, &dir.join("elsewhere"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let reply = stdout.lines().next().unwrap_or_default();
    println!("Brom: {reply}");
    assert!(
        reply.contains('3'),
        "the blacksmith knows a horseshoe costs 3 gold: {stdout:?}"
    );
    assert!(stdout.contains("tok/s]"), "{stdout}");
}

#[test]
fn a_shipped_game_without_its_model_says_so_and_exits() {
    let _serial = common::serial();
    let dir = common::scratch_dir("shipped-no-model");
    let exe = ship(&dir, false);
    let (output, took) = run_from(&exe, &dir.join("elsewhere"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it must fail: {stderr}");
    let expected = dir.join("game/assets").join(DEFAULT_MODEL.asset_path());
    assert!(
        stderr.contains(&format!("model file not found: {}", expected.display())),
        "the error names the file where it was looked for: {stderr}"
    );
    assert!(
        stderr.contains(&format!("cargo xtask setup --model {}", DEFAULT_MODEL.id)),
        "and how to get it: {stderr}"
    );
    println!("failed as it should after {took:?}: {stderr}");
}
