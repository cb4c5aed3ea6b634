//! Every kernel compiles with NVRTC, in both precisions, for the GPUs we target. Runs without
//! a GPU: CI puts the `nvidia-cuda-nvrtc` wheel's library on LD_LIBRARY_PATH and sets
//! QLORA_REQUIRE_NVRTC=1, so a kernel that does not compile fails CI.

use qlora_cuda::{compile, nvrtc_present, Precision};

#[test]
fn kernels_compile_for_hopper_and_ampere() {
    if !nvrtc_present() {
        assert!(
            std::env::var_os("QLORA_REQUIRE_NVRTC").is_none(),
            "QLORA_REQUIRE_NVRTC is set but libnvrtc.so.13 could not be loaded (LD_LIBRARY_PATH?)"
        );
        eprintln!("skipped: libnvrtc not found (set LD_LIBRARY_PATH to the nvidia-cuda-nvrtc wheel's lib)");
        return;
    }
    for arch in ["sm_90", "sm_80"] {
        for p in [Precision::F32, Precision::Bf16] {
            let cubin = compile(arch, p).unwrap_or_else(|e| panic!("{arch} {p:?}: {e}"));
            // An ELF image holding every kernel by name.
            assert_eq!(&cubin[..4], b"\x7fELF", "{arch} {p:?}: not a cubin");
            for name in qlora_cuda::KERNEL_NAMES {
                assert!(
                    cubin
                        .windows(name.len() + 1)
                        .any(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0),
                    "{arch} {p:?}: kernel {name} missing from the cubin"
                );
            }
        }
    }
}

#[test]
fn a_broken_kernel_is_a_compile_error_with_the_log() {
    if !nvrtc_present() {
        return;
    }
    let e = qlora_cuda::compile_source(
        "extern \"C\" __global__ void k() { undefined_thing(); }",
        "sm_90",
        Precision::F32,
    )
    .expect_err("must not compile");
    assert!(e.to_string().contains("undefined_thing"), "{e}");
}
