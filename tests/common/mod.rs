//! Helpers shared by the integration tests. Every test runs a real model: tests of mechanics
//! (scheduling, caching, saving, bad input) the catalog's small test model, tests of what NPCs
//! say the default model (both fetched by `cargo xtask test`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// The project root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The file of a catalog model in `assets/models/`, or a clear panic telling how to fetch it.
pub fn catalog_model_path(model: &npc_native::catalog::CatalogModel) -> PathBuf {
    let path = root().join("assets").join(model.asset_path());
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup --model {}` (the README's test command does)",
        path.display(),
        model.id
    );
    path
}

/// The model tests of mechanics run: the catalog's test model (SmolLM2-135M), fast enough
/// that a reply takes a fraction of a second.
pub fn model_path() -> PathBuf {
    catalog_model_path(&npc_native::catalog::TEST_MODEL)
}

/// The default model, for tests of what an NPC says.
pub fn default_model_path() -> PathBuf {
    catalog_model_path(&npc_native::catalog::DEFAULT_MODEL)
}

/// The model an NPC runs in the tests of what escalation does: smaller than the stand-in
/// cloud ([`cloud_standin_path`]), so escalating reaches a model that knows more.
pub fn escalating_model_path() -> PathBuf {
    catalog_model_path(&npc_native::catalog::ESCALATING_MODEL)
}

/// The model `llama-server` serves as the cloud in the tests of what escalation does: the
/// catalog's largest.
pub fn cloud_standin_path() -> PathBuf {
    catalog_model_path(&npc_native::catalog::CLOUD_STANDIN_MODEL)
}

/// An example binary cargo built beside the running test (`target/<profile>/examples/NAME`).
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("tests live in target/<profile>/deps");
    let binary = profile.join("examples").join(name);
    assert!(
        binary.is_file(),
        "{} is missing: `cargo test` builds the examples first (the RPG needs `--features demo`)",
        binary.display()
    );
    binary
}

/// A shipped persona file's text.
pub fn persona_source(name: &str) -> String {
    let path = root().join(format!("assets/personas/{name}.persona.ron"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A shipped persona.
pub fn persona(name: &str) -> npc_native::Persona {
    npc_native::Persona::from_ron(&persona_source(name), Some(name))
        .expect("shipped persona parses")
}

/// Tests that run the model take this lock: each runtime uses every core, so running two at
/// once only makes both slow.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh scratch directory under the system's temporary directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bevy_npc_ai-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Blocks the worker until the returned sender sends or is dropped, so a test can queue
/// several requests that the worker then sees at once.
pub fn hold(runtime: &npc_native::Runtime) -> crossbeam_channel::Sender<()> {
    let (open, gate) = crossbeam_channel::bounded(1);
    runtime
        .send(npc_native::Request::Debug(npc_native::DebugHook::WaitFor(
            gate,
        )))
        .expect("the worker takes requests");
    open
}

/// The worker's next event within `wait`, passing over [`npc_native::Event::Prewarmed`].
pub fn next_event(runtime: &npc_native::Runtime, wait: std::time::Duration) -> npc_native::Event {
    loop {
        match runtime
            .events()
            .recv_timeout(wait)
            .expect("the worker answers in time")
        {
            npc_native::Event::Prewarmed { .. } => {}
            event => return event,
        }
    }
}

/// The replies to `line` of every NPC in `npcs`, asked at once (so they decode together),
/// in the order of `npcs`; panics on a failed reply.
pub fn replies_at_once(
    runtime: &npc_native::Runtime,
    npcs: &[npc_native::NpcId],
    line: &str,
    wait: std::time::Duration,
) -> Vec<(String, npc_native::ReplyStats)> {
    let requests: Vec<_> = npcs
        .iter()
        .map(|&npc| runtime.say(npc, line).unwrap())
        .collect();
    let mut replies = vec![None; requests.len()];
    while replies.iter().any(Option::is_none) {
        match next_event(runtime, wait) {
            npc_native::Event::Replied {
                request,
                text,
                stats,
                ..
            } => {
                let at = requests.iter().position(|&r| r == request).unwrap();
                replies[at] = Some((text, stats));
            }
            npc_native::Event::Failed { error, .. } => panic!("{error}"),
            _ => {}
        }
    }
    replies.into_iter().map(Option::unwrap).collect()
}
