//! Every PEFT reference adapter opens and plans against its tiny model without a problem.

use qlora_lora::{open_adapters, ModelShapes};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn every_reference_adapter_plans_cleanly() {
    let mut n = 0;
    for e in std::fs::read_dir(root().join("peft")).unwrap() {
        let case = e.unwrap().path();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap())
                .unwrap();
        let base = meta["base"].as_str().unwrap();
        let spec: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root().join("tiny").join(base).join("spec.json")).unwrap(),
        )
        .unwrap();
        let cfg: qlora_io::ModelConfig = serde_json::from_value(spec["config"].clone()).unwrap();
        let shapes = ModelShapes::from_config(&cfg);
        let adapters = open_adapters(&case.join("adapter")).unwrap();
        assert_eq!(
            adapters.len(),
            meta["adapters"].as_array().unwrap().len(),
            "{case:?}"
        );
        for a in &adapters {
            let plan = a
                .plan(&shapes)
                .unwrap_or_else(|p| panic!("{case:?}: {p:?}"));
            assert!(
                !plan.linear.is_empty() || !plan.embedding.is_empty(),
                "{case:?}"
            );
            n += 1;
        }
    }
    assert!(n >= 18);
}
