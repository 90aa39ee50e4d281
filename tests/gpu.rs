//! The runtime on a GPU through llama.cpp's Vulkan backend (feature `vulkan`). Run by
//! `cargo xtask gpu-check`, which builds the feature and runs this file; on a machine without
//! a GPU, Mesa's software Vulkan driver (lavapipe) is the device (llama.cpp skips CPU-type
//! Vulkan devices unless `GGML_VK_VISIBLE_DEVICES` names them, as the check does), so this
//! checks the Vulkan path itself (shaders, offload, buffers), not GPU speed. The test model
//! (SmolLM2-135M).
//!
//! - every layer on the device, found by the fit (`gpu_layers` unset);
//! - several NPCs decode together, and a saved state loads back and is reused;
//! - (`tests/gpu_logits.rs`: the device's logits are the CPU's along a greedy reply);
//! - without a Vulkan driver the model runs on the CPU and says why (a child process, since
//!   llama.cpp looks for devices once per process);
//! - a file that is not a model is reported, as on the CPU.

mod common;

use std::time::Duration;

use npc_native::{Event, ModelInfo, NpcId, Persona, ReplyStats, Runtime, RuntimeConfig};

const WAIT: Duration = Duration::from_secs(300);

/// The test model's layers and its output layer: all of them on the device.
const ALL_LAYERS: u32 = 31;

fn start(config: RuntimeConfig) -> (Runtime, ModelInfo) {
    let runtime = Runtime::start(config);
    match runtime.events().recv_timeout(WAIT) {
        Ok(Event::ModelLoaded(info)) => (runtime, info),
        other => panic!("model did not load: {other:?}"),
    }
}

fn next_event(runtime: &Runtime) -> Event {
    common::next_event(runtime, WAIT)
}

fn greedy(name: &str, tokens: u32) -> Persona {
    let mut persona = common::persona(name);
    persona.sampling.temperature = Some(0.0);
    persona.sampling.max_tokens = Some(tokens);
    persona
}

fn accept(runtime: &Runtime, npc: NpcId, persona: Persona) {
    runtime.set_persona(npc, persona).unwrap();
    match next_event(runtime) {
        Event::PersonaAccepted { npc: got, .. } if got == npc => {}
        other => panic!("persona not accepted: {other:?}"),
    }
}

fn replies(runtime: &Runtime, npcs: &[NpcId], line: &str) -> Vec<(String, ReplyStats)> {
    common::replies_at_once(runtime, npcs, line, WAIT)
}

/// The runtime with every layer it fits on the Vulkan device. Flash attention off: Mesa
/// 22.3's lavapipe (Debian 12's) crashed (SIGSEGV in its own threads) running llama.cpp's
/// flash-attention shaders on a batch of four NPCs, and passed with it off; one NPC ran
/// either way.
fn on_vulkan() -> (Runtime, ModelInfo) {
    let (runtime, info) =
        start(RuntimeConfig::new(common::model_path()).with_flash_attention(false));
    assert_eq!(info.cpu_fallback, None, "{info:?}");
    assert!(info.device.starts_with("Vulkan"), "{info:?}");
    (runtime, info)
}

#[test]
fn the_fit_puts_every_layer_of_a_small_model_on_the_device() {
    let _serial = common::serial();
    let (_runtime, info) = on_vulkan();
    eprintln!("device: {}, {} layers", info.device, info.gpu_layers);
    assert_eq!(info.gpu_layers, ALL_LAYERS);
}

#[test]
fn npcs_decode_together_and_a_saved_state_loads_back_on_the_device() {
    let _serial = common::serial();
    let (runtime, _) = on_vulkan();
    let npcs: Vec<_> = (1..=4).map(NpcId).collect();
    for (&npc, name) in npcs
        .iter()
        .zip(["blacksmith", "innkeeper", "guard", "healer"])
    {
        accept(&runtime, npc, greedy(name, 16));
    }
    let first = replies(&runtime, &npcs, "Who are you?");
    for (text, stats) in &first {
        assert!(!text.is_empty() && stats.generated_tokens > 0, "{first:?}");
    }
    let path = common::scratch_dir("gpu").join("brom.state");
    runtime.save_npc(NpcId(1), &path).unwrap();
    let kv_tokens = match next_event(&runtime) {
        Event::NpcSaved { kv_tokens, .. } => kv_tokens,
        other => panic!("expected NpcSaved, got {other:?}"),
    };
    assert!(
        kv_tokens > 50,
        "the KV state was saved ({kv_tokens} tokens)"
    );
    drop(runtime);

    let (runtime, _) = on_vulkan();
    accept(&runtime, NpcId(9), greedy("blacksmith", 16));
    runtime.load_npc(NpcId(9), &path).unwrap();
    match next_event(&runtime) {
        Event::NpcLoaded {
            kv_tokens: restored,
            kv_note,
            ..
        } => assert_eq!((restored, kv_note), (kv_tokens, None)),
        other => panic!("expected NpcLoaded, got {other:?}"),
    }
    let (text, stats) = replies(&runtime, &[NpcId(9)], "And a horseshoe?").remove(0);
    assert!(!text.is_empty());
    assert!(
        stats.cached_tokens >= kv_tokens,
        "the restored state was reused: {} cached of {kv_tokens}",
        stats.cached_tokens
    );
}

/// Set by the parent test for the child it starts.
const NO_DRIVER: &str = "NPC_TEST_NO_VULKAN_DRIVER";

#[test]
fn without_a_vulkan_driver_the_model_runs_on_the_cpu_and_says_why() {
    let _serial = common::serial();
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new(exe)
        .args([
            "--exact",
            "no_driver_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        // The Vulkan loader reads its drivers from here: a file that does not exist leaves
        // it none.
        .env("VK_ICD_FILENAMES", "/nonexistent/vulkan_icd.json")
        .env("VK_DRIVER_FILES", "/nonexistent/vulkan_icd.json")
        // Naming a device index makes llama.cpp's Vulkan backend throw when the index is
        // not there; without the variable it just finds no device.
        .env_remove("GGML_VK_VISIBLE_DEVICES")
        .env(NO_DRIVER, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the child ran: {text}");
}

/// Run only by the test above, in a process whose Vulkan loader has no driver.
#[test]
#[ignore = "started by without_a_vulkan_driver_the_model_runs_on_the_cpu_and_says_why"]
fn no_driver_child() {
    assert_eq!(
        std::env::var(NO_DRIVER).as_deref(),
        Ok("1"),
        "run by the parent test"
    );
    let (runtime, info) = start(RuntimeConfig::new(common::model_path()));
    eprintln!("{info:?}");
    assert_eq!(info.device, "CPU");
    assert_eq!(info.gpu_layers, 0);
    let reason = info.cpu_fallback.expect("the fallback says why");
    assert!(reason.contains("found no GPU"), "{reason}");
    accept(&runtime, NpcId(1), greedy("blacksmith", 8));
    let (text, _) = replies(&runtime, &[NpcId(1)], "Hello!").remove(0);
    assert!(!text.is_empty(), "the CPU answers");
}

/// A file that is not a model is reported as on the CPU build (the runtime checks it before
/// llama.cpp's fit or load reads it), not retried on the CPU and not an abort.
#[test]
fn a_file_that_is_not_gguf_is_reported_on_a_gpu_build() {
    let path = common::scratch_dir("gpu-not-gguf").join("model.gguf");
    std::fs::write(&path, "this is a text file, not a model").unwrap();
    let runtime = Runtime::start(RuntimeConfig::new(&path));
    match runtime.events().recv_timeout(WAIT) {
        Ok(Event::ModelFailed(npc_native::ModelError::NotGguf(_))) => {}
        other => panic!("expected NotGguf, got {other:?}"),
    }
}
