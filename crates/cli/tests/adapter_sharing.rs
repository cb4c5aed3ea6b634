//! Adapters whose files carry a copy of the base's own tensor (PEFT saves a tied embedding's or
//! head's `base_layer.weight` beside an adapter that targets it) share the base's weights:
//! `plan::drop_unchanged_replacements` drops exactly the copies that equal the stored tensor,
//! and the adapter put on a clone of the base gives the logits of the adapter loaded with its
//! replacements, bit for bit. A trained copy (`modules_to_save`) stays a replacement.

mod common;
use common::*;
use qlora_model::{CpuDecoder, Decoder, Logits, Model};

fn case_adapter(case: &str) -> std::path::PathBuf {
    repo_root()
        .join("tests/fixtures/peft")
        .join(case)
        .join("adapter")
}

#[test]
fn copies_of_base_tensors_are_not_replacements() {
    let tmp = temp_dir("sharing");
    let dir = tmp.join("llama-64");
    write_model(&spec("llama-64"), &dir);
    let base = {
        let mut src = qlora_io::ModelSource::open(&dir).unwrap();
        Model::load(&mut src).unwrap()
    };
    let toks = [1u32, 5, 17, 3, 42, 8, 23, 60];
    for (case, shares) in [
        ("brev", true),
        ("lm-head-target", true),
        ("embedding-lora", true),
        ("embedding-dora", true),
        ("modules-to-save", false),
    ] {
        let mut w = Vec::new();
        let mut planned =
            qlora_model::plan::plan_adapters(&base.config, &dir, &[case_adapter(case)], &mut w)
                .unwrap();
        assert!(
            planned.iter().any(|(_, p)| !p.replacements.is_empty()),
            "{case}: the fixture carries base tensors"
        );
        // The adapter as loaded with its replacements in place.
        let mut src = qlora_io::ModelSource::open(&dir).unwrap();
        qlora_model::plan::apply_replacements(&mut src, &planned).unwrap();
        let mut full = Model::load(&mut src).unwrap();
        qlora_model::plan::apply_planned(&mut full, &planned, false, &mut w).unwrap();
        let want = CpuDecoder::new(&full).step(&toks, Logits::All).unwrap();
        let src = qlora_io::ModelSource::open(&dir).unwrap();
        let n = qlora_model::plan::drop_unchanged_replacements(&src, &mut planned);
        let left = planned.iter().any(|(_, p)| !p.replacements.is_empty());
        assert_eq!(!left, shares, "{case}: {n} dropped");
        if shares {
            let mut m = base.clone();
            qlora_model::plan::apply_planned(&mut m, &planned, false, &mut w).unwrap();
            assert!(m.shares_base(&base), "{case}");
            let got = CpuDecoder::new(&m).step(&toks, Logits::All).unwrap();
            assert_eq!(
                got.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
                "{case}: sharing the base changes the logits"
            );
        }
    }
}
