//! Which catalog model a bench runs: `NPC_BENCH_MODEL=<catalog id>`, else the catalog's
//! default model. `cargo xtask setup --model ID` fetches the others.
// Each bench uses what it needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use npc_native::catalog::{self, CatalogModel};

/// The catalog model this run measures.
pub fn catalog_model() -> &'static CatalogModel {
    match std::env::var("NPC_BENCH_MODEL") {
        Ok(id) => catalog::find(&id).unwrap_or_else(|| {
            let ids: Vec<&str> = catalog::MODELS.iter().map(|m| m.id).collect();
            panic!(
                "NPC_BENCH_MODEL={id:?} is not in the catalog ({})",
                ids.join(", ")
            )
        }),
        Err(_) => &catalog::DEFAULT_MODEL,
    }
}

/// The file of `model` in the project's `assets/models/`, which must exist.
pub fn file_of(model: &CatalogModel) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets")
        .join(model.asset_path());
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup --model {}`",
        path.display(),
        model.id
    );
    path
}

/// The file of the model this run measures.
pub fn path() -> PathBuf {
    file_of(catalog_model())
}

/// Its display name, for table headers.
pub fn name() -> &'static str {
    catalog_model().display_name
}
