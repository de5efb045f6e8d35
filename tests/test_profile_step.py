"""benchmarks/profile_step.py (issue 16's step profile): the CPU smoke run end to end, and the
kernel categorisation and device-time accounting its GPU run relies on, on synthetic profiler
events with the kernel names an H100/H200 shows."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_step.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and steadier under load


@pytest.fixture(scope="module")
def profile_step():
    spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile_step"] = module  # before exec: dataclasses and pickling look the module up
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run_profiles_mdm_and_ar(profile_step, tmp_path):
    out = tmp_path / "p"
    report = profile_step.main(["--device", "cpu", "--size", "tiny-0.1M", "--batch", "4", "--seq-len", "64",
                                "--steps", "2", "--time-steps", "4", "--lightning-steps", "4", "--phase-steps", "1",
                                "--data-bytes", "400000", "--out", str(out)])
    saved = json.loads((out / "profile.json").read_text())
    assert saved["objectives"].keys() == {"mdm", "ar"} == report["objectives"].keys()
    for result in saved["objectives"].values():
        assert "error" not in result, result.get("traceback")
        host = result["profile"]["host"]
        assert set(host["categories"]) == set(profile_step.CATEGORIES)
        total = host["profiler_total_ms_per_step"]
        categorised = sum(c["ms_per_step"] for c in host["categories"].values())
        assert total > 0 and categorised == pytest.approx(total, rel=0.03)
        assert sum(c["fraction"] for c in host["categories"].values()) == pytest.approx(1.0, abs=1e-6)
        assert host["categories"]["matmul"]["ms_per_step"] > 0
        assert host["categories"]["optimizer"]["ms_per_step"] > 0
        assert host["categories"]["loss and masking"]["ms_per_step"] > 0
        assert "lightning" in result and "error" not in result["lightning"], result["lightning"]
        assert isinstance(result["lightning"]["overhead_ms"], float)
        assert result["lightning"]["step_ms"] > 0
        assert result["bare"]["step_ms"] > 0 and result["bare"]["tokens_per_s"] > 0 and result["bare"]["mfu"] > 0
        assert result["optimizer"]["fused"] and result["optimizer"]["from"] == "configure_optimizers"
        assert result["compile"] is False  # off on a CPU by default
    data = saved["data_loading"]
    assert "fetch_ms_per_batch" in data or "skipped" in data
    assert "| matmul |" in saved["markdown"] and "Lightning overhead" in saved["markdown"]
    assert "== mdm: top-30 ops" in (out / "profile_ops.txt").read_text()


@pytest.mark.parametrize("kernel,chain,expected", [
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT", ["aten::mm", "aten::linear"], "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas", ["aten::addmm"], "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x1_tn_align8>", [], "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t>>",
     ["aten::_flash_attention_forward", "aten::_scaled_dot_product_flash_attention"], "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", [], "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", ["aten::_efficient_attention_backward"], "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", [],
     "attention"),
    ("triton_tem_fused_flex_attention_0", [], "attention"),
    ("triton_poi_fused__to_copy_add_cat_mul_neg_slice_0", ["triton_poi_fused__to_copy_add_cat_mul_neg_slice_0",
                                                          "## Call CompiledFxGraph abc ##"], "compiled fused (triton)"),
    ("triton_red_fused__fused_rms_norm_backward_1", [], "compiled fused (triton)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     ["aten::_fused_adamw_", "Optimizer.step#AdamW.step"], "optimizer"),
    ("void at::native::reduce_kernel<512, 1, ReduceOp<float, NormTwoOps<float>>>",
     ["aten::linalg_vector_norm", "lldiff/optimizer", "lldiff/step"], "optimizer"),
    ("void at::native::lpnorm_cleanup<float, 1, float, float>", ["aten::_foreach_norm"], "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", [], "communication"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long>",
     ["aten::index_select", "aten::embedding", "lldiff/backbone"], "embedding"),
    ("void at::native::embedding_backward_feature_kernel<float, float, long>",
     ["aten::embedding_dense_backward", "EmbeddingBackward0"], "embedding"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>",
     ["aten::_log_softmax", "aten::log_softmax", "aten::cross_entropy_loss", "lldiff/head_loss", "lldiff/backbone"],
     "loss and masking"),
    ("void at::native::nll_loss_backward_reduce_cuda_kernel_2d<float, long>",
     ["aten::nll_loss_backward", "NllLossBackward0"], "loss and masking"),
    ("void at::native::distribution_elementwise_grid_stride_kernel<float, 4>",
     ["aten::uniform_", "aten::rand", "lldiff/forward_loss", "lldiff/step"], "loss and masking"),
    ("void at::native::vectorized_elementwise_kernel<4, CompareLTFunctor<float>>",
     ["aten::lt", "lldiff/forward_loss"], "loss and masking"),
    ("Memcpy DtoH (Device -> Pageable)", ["aten::nonzero", "lldiff/head_loss", "lldiff/backbone"],
     "loss and masking"),
    ("void at::native::index_put_kernel_impl<...>", ["aten::index_put_", "IndexBackward0"], "loss and masking"),
    ("void at::native::vectorized_elementwise_kernel<4, MulFunctor<float>>",
     ["aten::mul", "lldiff/backbone", "lldiff/forward_loss"], "elementwise (norm/RoPE/SwiGLU)"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", ["aten::_fused_rms_norm"],
     "elementwise (norm/RoPE/SwiGLU)"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", ["aten::cat"],
     "elementwise (norm/RoPE/SwiGLU)"),
    ("some_new_kernel_nobody_knows", [], "other"),
    (None, ["autograd::engine::evaluate_function: MmBackward0"], "other"),
    (None, ["aten::mm", "MmBackward0"], "matmul"),
    (None, ["## Call CompiledFxGraph f3k2 ##", "CompiledFunction"], "compiled fused (triton)"),
])
def test_categorise_gpu_and_cpu_names(profile_step, kernel, chain, expected):
    assert profile_step.categorise(kernel, chain) == expected


def _event(name, device, start, duration, *, id=0, linked=0, parent=None, kernels=(), annotation=False):
    return SimpleNamespace(name=name, device_type=f"DeviceType.{device}", id=id, linked_correlation_id=linked,
                           cpu_parent=parent, kernels=list(kernels), is_user_annotation=annotation, is_async=False,
                           is_legacy=False, self_cpu_time_total=duration if device == "CPU" else 0,
                           time_range=SimpleNamespace(start=start, elapsed_us=lambda d=duration: d))


def _kernel(name, duration):
    return SimpleNamespace(name=name, device=0, duration=duration)


@pytest.mark.parametrize("linked", [True, False])
def test_device_breakdown_counts_each_kernel_once_by_its_launcher(profile_step, linked):
    """Kernels reach their launching op through the linked correlation id, or (a torch without it)
    through the ops' kernel lists in launch order; a record_function range's device-side copy is
    not counted; categories sum to the device total."""
    step = _event("lldiff/step", "CPU", 0, 100, id=1)
    backbone = _event("lldiff/backbone", "CPU", 1, 50, id=2, parent=step)
    mm = _event("aten::mm", "CPU", 2, 5, id=3, parent=backbone, kernels=[_kernel("nvjet_gemm", 40)])
    mul_backbone = _event("aten::mul", "CPU", 3, 1, id=4, parent=backbone, kernels=[_kernel("elementwise_mul", 7)])
    head = _event("lldiff/head_loss", "CPU", 4, 10, id=5, parent=backbone)
    mul_loss = _event("aten::mul", "CPU", 5, 1, id=6, parent=head, kernels=[_kernel("elementwise_mul", 3)])
    adam = _event("aten::_fused_adamw_", "CPU", 60, 2, id=7, parent=step,
                  kernels=[_kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 11)])
    cpu = [step, backbone, mm, mul_backbone, head, mul_loss, adam]
    ids = (lambda e: e.id) if linked else (lambda e: 0)
    gpu = [
        _event("nvjet_gemm", "CUDA", 10, 40, linked=ids(mm)),
        _event("elementwise_mul", "CUDA", 50, 7, linked=ids(mul_backbone)),
        _event("elementwise_mul", "CUDA", 57, 3, linked=ids(mul_loss)),
        _event("multi_tensor_apply_kernel<FusedAdamMathFunctor>", "CUDA", 70, 11, linked=ids(adam)),
        _event("triton_poi_fused_add_0", "CUDA", 80, 9),  # linked to no op
        _event("lldiff/step", "CUDA", 10, 90, annotation=True),  # gpu_user_annotation: a span, not a kernel
    ]
    result = profile_step.breakdown(cpu + gpu, device=True, steps=1)
    cats = {name: c["ms_per_step"] * 1e3 for name, c in result["categories"].items()}
    assert cats["matmul"] == pytest.approx(40)
    assert cats["elementwise (norm/RoPE/SwiGLU)"] == pytest.approx(7)
    assert cats["loss and masking"] == pytest.approx(3)
    assert cats["optimizer"] == pytest.approx(11)
    assert cats["compiled fused (triton)"] == pytest.approx(9)
    assert result["total_ms_per_step"] * 1e3 == pytest.approx(70)
    assert sum(cats.values()) == pytest.approx(70)


def test_a_failing_compile_is_recorded_and_the_objective_profiled_eager(profile_step, tmp_path, monkeypatch):
    """On a GPU the blocks compile by default; should compiling fail there, the objective runs again
    without it rather than losing its profile."""
    real = profile_step.make_module

    def make_module(name, args):
        if args.compile_on:
            raise RuntimeError("simulated inductor failure")
        return real(name, args)

    monkeypatch.setattr(profile_step, "make_module", make_module)
    report = profile_step.main(["--device", "cpu", "--compile", "on", "--objectives", "ar", "--size", "tiny-0.1M",
                                "--vocab", "512", "--batch", "2", "--seq-len", "32", "--steps", "1", "--time-steps", "2",
                                "--lightning-steps", "2", "--phase-steps", "1", "--data", "off",
                                "--out", str(tmp_path)])
    result = report["objectives"]["ar"]
    assert "simulated inductor failure" in result["compile_failed"]["error"]
    assert result["compile"] is False and result["profile"]["host"]["categories"]["matmul"]["ms_per_step"] > 0


def test_lightning_overhead_is_measured_under_bf16_mixed_with_clipping(profile_step):
    """The Lightning fit clips gradients under bf16-mixed with the fused AdamW (which Lightning
    refused before lldiff.optim declined to unscale in the fused kernel)."""
    import torch

    args = profile_step.parse_args(["--device", "cpu", "--size", "tiny-0.1M", "--vocab", "512", "--batch", "2",
                                    "--seq-len", "32", "--warmup", "1", "--lightning-steps", "2"])
    args.precision = "bf16-mixed"  # what CUDA runs; the CPU's bf16 autocast goes through the same plugin
    module = profile_step.make_module("ar", args)
    rows = torch.randint(0, args.vocab, (2, 33), generator=torch.Generator().manual_seed(0))
    assert profile_step.lightning_step(module, rows, args)["step_ms"] > 0
