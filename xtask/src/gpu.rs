//! `cargo xtask gpu-check`: the `vulkan` feature built and its tests (`tests/gpu.rs`) run on
//! this machine's Vulkan driver: Mesa's software one (lavapipe) where there is no GPU.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Result, cache_dir, cargo, install_apt, missing_apt_packages, run, sha256};

/// Debian packages the Vulkan build needs besides the project's: the shader compiler,
/// SPIR-V headers, the loader's development files (their C headers; the C++ ones are too
/// old, see [`HEADERS_DEB`]) and Mesa's drivers.
const VULKAN_APT_PACKAGES: &[&str] = &[
    "glslc",
    "spirv-headers",
    "libvulkan-dev",
    "mesa-vulkan-drivers",
    "libvulkan1",
];

/// Vulkan's C++ headers (`vulkan.hpp`) new enough for llama.cpp's Vulkan backend, which
/// uses `VK_EXT_layer_settings` (headers 1.3.261 and later; Debian 12 has 1.3.239): Debian
/// 13's `libvulkan-dev` package, its headers only, pinned by hash. The loader the build
/// links and the tests run is the system's.
const HEADERS_DEB: &str =
    "http://deb.debian.org/debian/pool/main/v/vulkan-loader/libvulkan-dev_1.4.309.0-1_amd64.deb";
const HEADERS_DEB_SHA256: &str = "8d329d465e16168afff58b1bd0dd6db46aac2cc3f56054a481b25a04e90b345a";

/// The system's Vulkan loader, which the build links (`lib/libvulkan.so` in the SDK folder).
const SYSTEM_LOADER: &str = "/usr/lib/x86_64-linux-gnu/libvulkan.so.1";

/// Installs what the Vulkan build needs, builds the `vulkan` feature and runs its tests.
/// `args` go to the test binary.
pub fn check(args: &[String]) -> Result {
    let missing = missing_apt_packages(VULKAN_APT_PACKAGES);
    if missing.is_empty() {
        println!("[gpu-check 1/3] Vulkan build packages: already installed");
    } else {
        println!(
            "[gpu-check 1/3] Vulkan build packages: installing {}",
            missing.join(" ")
        );
        install_apt(&missing)?;
    }
    let sdk = vulkan_sdk()?;
    println!("[gpu-check 2/3] Vulkan headers 1.4.309: {}", sdk.display());
    println!(
        "[gpu-check 3/3] building the vulkan feature (the first build compiles llama.cpp's \
         Vulkan shaders: about 12 minutes on 2 cores) and running tests/gpu.rs and tests/gpu_logits.rs"
    );
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![sdk.join("bin")];
    paths.extend(env::split_paths(&path));
    let mut command = cargo();
    command
        .args([
            "test",
            "--release",
            "-p",
            "npc_native",
            "--features",
            "vulkan",
            "--test",
            "gpu",
            "--test",
            "gpu_logits",
            "--",
            "--test-threads=1",
            "--nocapture",
        ])
        .args(args)
        .env("VULKAN_SDK", &sdk)
        .env(
            "PATH",
            env::join_paths(paths).map_err(|e| format!("PATH: {e}"))?,
        );
    // llama.cpp's Vulkan backend passes over CPU-type devices (lavapipe) unless they are
    // named; the first device is the only one on a machine without a GPU.
    if env::var_os("GGML_VK_VISIBLE_DEVICES").is_none() {
        command.env("GGML_VK_VISIBLE_DEVICES", "0");
    }
    run(&mut command)
}

/// A folder laid out as the Vulkan SDK is (`include/`, `lib/libvulkan.so`, `bin/glslc`),
/// which llama.cpp's build finds through `VULKAN_SDK`: the pinned headers, the system's
/// loader and shader compiler. Made once in the cache.
fn vulkan_sdk() -> Result<PathBuf> {
    let root = cache_dir().join("vulkan-sdk");
    let sdk = root.join("1.4.309");
    let header = sdk.join("include/vulkan/vulkan.hpp");
    if header.is_file() {
        return Ok(sdk);
    }
    fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let deb = root.join("libvulkan-dev_1.4.309.0-1_amd64.deb");
    if sha256(&deb).as_deref() != Some(HEADERS_DEB_SHA256) {
        println!("[gpu-check] fetching the Vulkan headers: {HEADERS_DEB}");
        run(Command::new("curl")
            .args(["-fsSL", "--retry", "3", "-o"])
            .arg(&deb)
            .arg(HEADERS_DEB))?;
    }
    match sha256(&deb) {
        Some(got) if got == HEADERS_DEB_SHA256 => {}
        got => {
            let _ = fs::remove_file(&deb);
            return Err(format!(
                "{HEADERS_DEB} has sha256 {}, expected {HEADERS_DEB_SHA256}: deleted",
                got.unwrap_or_else(|| "(unreadable)".into())
            ));
        }
    }
    let unpacked = root.join("unpacked");
    let _ = fs::remove_dir_all(&unpacked);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let staged = root.join("1.4.309.partial");
    let _ = fs::remove_dir_all(&staged);
    for dir in ["lib", "bin"] {
        fs::create_dir_all(staged.join(dir)).map_err(|e| format!("{dir}: {e}"))?;
    }
    fs::rename(unpacked.join("usr/include"), staged.join("include"))
        .map_err(|e| format!("the package holds no headers: {e}"))?;
    let glslc = find_on_path("glslc").ok_or("glslc is not installed")?;
    if !Path::new(SYSTEM_LOADER).is_file() {
        return Err(format!(
            "no Vulkan loader at {SYSTEM_LOADER}: the check is written for x86-64 Debian"
        ));
    }
    let link = |from: &Path, to: PathBuf| {
        std::os::unix::fs::symlink(from, &to).map_err(|e| format!("{}: {e}", to.display()))
    };
    link(Path::new(SYSTEM_LOADER), staged.join("lib/libvulkan.so"))?;
    link(&glslc, staged.join("bin/glslc"))?;
    let _ = fs::remove_dir_all(&unpacked);
    let _ = fs::remove_dir_all(&sdk);
    fs::rename(&staged, &sdk).map_err(|e| format!("{}: {e}", sdk.display()))?;
    Ok(sdk)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}
