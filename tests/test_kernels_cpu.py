"""The C kernel of the nested micro-gated MLP against its naive PyTorch twin and the layer's own
reference.

`mgs_nested_naive` rounds the tokens to two int8 planes as the kernel does, so the kernel is held
to it at float32 accumulation tolerances (scores and outputs within 5e-5 of the largest). Against
the layer's exact float32 reference the rounding shows as scores within 1e-3 of the largest, the
values on the kernel's own selection within 1e-4, and most tokens' outputs within 1e-3 (the
selection differs at the threshold). A wrong index or scale is off by far more.
"""

import pytest
import torch
import torch.nn.functional as F

from treeffn_hf import MGSSpec, MicroGatedMLP
from treeffn_hf.conversion.budgets import calibrate_threshold
from treeffn_hf.conversion.surgery import sparse_mlp_state
from treeffn_hf.modeling import mgs_kernels_cpu, mgs_reference
from treeffn_hf.modeling.dispatch import choose_path

from .conftest import run_python

pytestmark = pytest.mark.skipif(
    mgs_kernels_cpu.library_error() is not None, reason=f"CPU kernel unavailable: {mgs_kernels_cpu.library_error()}")


def nested_layer(hidden=128, intermediate=200, group_size=64, density=0.5, seed=0,
                 down_format="int8_rows") -> MicroGatedMLP:
    generator = torch.Generator().manual_seed(seed)
    dense = [torch.nn.Linear(a, b, bias=False) for a, b in ((hidden, intermediate),) * 2 + ((intermediate, hidden),)]
    with torch.no_grad():
        for linear in dense:
            linear.weight.normal_(0, 0.3, generator=generator)
    spec = MGSSpec(density=density, predictor="nested", group_size=group_size, selection="threshold",
                   down_format="int8_rows" if down_format == "int8_rows" else "bf16")
    layer = MicroGatedMLP(hidden, intermediate, spec, torch.nn.SiLU())
    layer.load_state_dict(sparse_mlp_state(layer.spec, *dense), strict=False)
    layer.requires_grad_(False).eval()
    if down_format == "float32":  # off every grid the conversion puts down_proj on: the kernel reads float32
        layer.down_proj.weight.add_(1e-6 * torch.randn(layer.down_proj.weight.shape, generator=generator))
    calibrate_threshold(layer, torch.randn(512, hidden, generator=generator), density)
    return layer


DOWN_FORMATS = ("int8_rows", "bf16", "float32")


def masked_dense(layer: MicroGatedMLP, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return layer.down_proj(F.silu(layer.gate_proj(x)) * layer.up_proj(x) * mask)


SHAPES = [(64, 96, 64), (128, 200, 64), (192, 333, 64), (256, 160, 128), (576, 1536, 64)]


def relative_to_largest(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want).abs() / want.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)).max())


@pytest.mark.parametrize("hidden,intermediate,group_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("down_format", DOWN_FORMATS)
def test_kernel_equals_its_naive_twin(hidden, intermediate, group_size, tokens, down_format):
    layer = nested_layer(hidden, intermediate, group_size, down_format=down_format)
    assert mgs_kernels_cpu.kernel_down_format(layer) == down_format
    x = torch.randn(tokens, hidden) * torch.rand(tokens, 1) * 4  # tokens of different scales
    scores, counts = torch.empty(tokens, intermediate), torch.empty(tokens, dtype=torch.int32)
    out, selected = mgs_kernels_cpu.mgs_nested_cpu(layer, x, counts, scores)
    chosen = scores > layer.gate_threshold
    want_out, want_scores = mgs_reference.mgs_nested_naive(layer, x, selected=chosen)

    assert relative_to_largest(scores, want_scores) < 5e-5
    assert torch.equal(counts, chosen.sum(dim=1, dtype=torch.int32)) and selected == chosen.sum()
    assert 0 < chosen.float().mean() < 1
    clear = (want_scores - layer.gate_threshold).abs() > 1e-4 * want_scores.abs().amax(dim=1, keepdim=True)
    assert torch.equal(chosen[clear], (want_scores > layer.gate_threshold)[clear])
    assert relative_to_largest(out, want_out) < 5e-5


@pytest.mark.parametrize("hidden,intermediate,group_size", SHAPES[1:], ids=lambda v: str(v))
def test_kernel_stays_close_to_the_exact_reference(hidden, intermediate, group_size):
    layer = nested_layer(hidden, intermediate, group_size, density=0.8)
    x = torch.randn(64, hidden)
    scores = torch.empty(64, intermediate)
    out, _ = mgs_kernels_cpu.mgs_nested_cpu(layer, x, scores=scores)
    exact_scores = (F.silu(F.linear(x, layer.micro_gate.dequantized()[:intermediate]))
                    * F.linear(x, layer.micro_gate.dequantized()[intermediate:])).abs()
    assert relative_to_largest(scores, exact_scores) < 1e-3
    # on its own selection the kernel's values are float32's but for the ~16-bit tokens ...
    values_error = relative_error(out, masked_dense(layer, x, scores > layer.gate_threshold))
    assert values_error.median() < 1e-4 and values_error.max() < 1e-3
    # ... and its selection differs from the exact one only at the threshold, where neurons carry little
    with torch.no_grad():
        layer.force_path = "reference"
        exact = layer(x)
    error = relative_error(out, exact)
    assert error.median() < 1e-3 and (error < 1e-2).float().mean() > 0.9


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got - want).norm(dim=-1) / want.norm(dim=-1)


@pytest.mark.parametrize("hidden,intermediate,group_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", [1, 7, 8, 9, 33, 130])
def test_scoring_gemm_equals_the_naive_twin_and_the_fused_kernel(hidden, intermediate, group_size, tokens):
    layer = nested_layer(hidden, intermediate, group_size)
    x = torch.randn(tokens, hidden) * torch.rand(tokens, 1) * 4
    got = mgs_kernels_cpu.nested_scores_cpu(layer, x)
    assert relative_to_largest(got, mgs_reference.mgs_nested_naive(layer, x)[1]) < 5e-5
    fused = torch.empty(tokens, intermediate)
    mgs_kernels_cpu.mgs_nested_cpu(layer, x, scores=fused)
    assert relative_to_largest(got, fused) < 5e-6  # the same integer sums, scaled in another order


AMX = mgs_kernels_cpu.amx_machine_reason() is None
needs_amx = pytest.mark.skipif(not AMX, reason=f"no AMX here: {mgs_kernels_cpu.amx_machine_reason()}")


@needs_amx
@pytest.mark.parametrize("hidden,intermediate,group_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", [1, 5, 16, 17, 100])
def test_amx_kernel_equals_the_fused_kernel_and_the_naive_twin(hidden, intermediate, group_size, tokens):
    layer = nested_layer(hidden, intermediate, group_size, down_format="bf16")
    x = torch.randn(tokens, hidden) * torch.rand(tokens, 1) * 4
    results = {}
    for name, kernel in (("fused", mgs_kernels_cpu.mgs_nested_cpu), ("amx", mgs_kernels_cpu.mgs_nested_amx)):
        scores, counts = torch.empty(tokens, intermediate), torch.empty(tokens, dtype=torch.int32)
        out, selected = kernel(layer, x, counts, scores)
        results[name] = out, selected, counts, scores
    (fused, fused_selected, fused_counts, fused_scores), (out, selected, counts, scores) = results["fused"], results["amx"]
    # the same int32 sums and float32 scaling: the scores agree to rounding, so the selections agree
    assert relative_to_largest(scores, fused_scores) < 5e-6
    chosen = scores > layer.gate_threshold
    assert torch.equal(chosen, fused_scores > layer.gate_threshold) and 0 < chosen.float().mean() < 1
    assert torch.equal(counts, fused_counts) and selected == fused_selected == chosen.sum()
    assert relative_to_largest(out, fused) < 5e-6  # down_proj against h in three bf16 parts: float32's products
    assert relative_to_largest(out, mgs_reference.mgs_nested_naive(layer, x, selected=chosen)[0]) < 5e-5


@needs_amx
@pytest.mark.parametrize("down_format", ["int8_rows", "float32"])
def test_amx_needs_bf16_down_proj_and_forcing_it_elsewhere_is_an_error(down_format):
    layer = nested_layer(down_format=down_format)
    x = torch.randn(32, 128)
    assert "bf16 values" in mgs_kernels_cpu.amx_unavailable_reason(layer, x)
    with torch.no_grad():
        layer(x)
        assert layer.last_path == "cpu"  # the fused kernel, which reads any down_proj
        layer.force_path = "cpu:amx"
        with pytest.raises(RuntimeError, match="bf16 values"):
            layer(x)


def expected_cpu_path(layer, tokens: int) -> str:
    policy = layer.kernel_policy
    if AMX and tokens >= policy.cpu_amx_min_tokens:
        return "cpu:amx"
    return "cpu" if tokens <= policy.cpu_fused_max_tokens else "cpu:scores"


@pytest.mark.parametrize("amx_min_tokens", [8, float("inf")], ids=["amx_from_8", "amx_off"])
def test_layer_dispatches_cpu_batches_to_the_kernel_and_matches_the_reference(amx_min_tokens):
    layer = nested_layer()
    layer.kernel_policy = layer.kernel_policy.replace(cpu_amx_min_tokens=amx_min_tokens)
    for tokens in (1, 8, mgs_kernels_cpu.MAX_TOKENS, mgs_kernels_cpu.MAX_TOKENS + 1, 300):
        path = expected_cpu_path(layer, tokens)
        x = torch.randn(1, tokens, 256)[..., ::2]  # a strided view: the kernel must copy it
        with torch.no_grad():
            got = layer(x)
            assert layer.last_path == path
            twin = mgs_reference.mgs_nested_naive(layer, x.reshape(tokens, 128))[0]
            layer.force_path = "reference"
            exact = layer(x)
            layer.force_path = None
        if path in ("cpu", "cpu:amx"):
            assert relative_to_largest(got, twin.reshape(x.shape)) < 5e-5
        else:  # a float32 model: float32 GEMMs on the kernel's selection; a bf16 one: bf16 GEMMs
            chosen = mgs_kernels_cpu.nested_scores_cpu(layer, x[0]) > layer.gate_threshold
            want = masked_dense(layer, x.reshape(tokens, 128), chosen)
            torch.testing.assert_close(got, want.reshape(x.shape))
            with torch.no_grad():
                in_bf16 = layer(x.bfloat16()).float()
            assert layer.last_path == path  # bf16 rounding, and the selection of tokens rounded to bf16
            assert relative_error(in_bf16[0], want).median() < 1e-2
            error = relative_error(got[0], exact[0])  # off the exact selection only at the threshold
            assert error.median() < 1e-3 and (error < 1e-2).float().mean() >= 0.75  # 9 tokens at the switch
    layer.force_path = "cpu"  # forced, the fused kernel takes any batch: each token as in decode
    x = torch.randn(mgs_kernels_cpu.MAX_TOKENS + 9, 128)
    scores = torch.empty(x.shape[0], 200)
    with torch.no_grad():
        got = layer(x)
        assert layer.last_path == "cpu"
        torch.testing.assert_close(got, mgs_kernels_cpu.mgs_nested_cpu(layer, x, scores=scores)[0])
    twin = mgs_reference.mgs_nested_naive(layer, x, selected=scores > layer.gate_threshold)[0]
    assert relative_to_largest(got, twin) < 5e-5
    layer.force_path = None
    layer.reset_density()
    with torch.no_grad():
        x = torch.randn(19, 128)
        layer(x[:1]), layer(x[1:3]), layer(x[3:])  # the fused kernel, then AMX where the CPU has it
        assert layer.last_path == expected_cpu_path(layer, 16)
        scores = mgs_reference.mgs_nested_naive(layer, x)[1]
    assert layer.measured_units() == pytest.approx((scores > layer.gate_threshold).sum().item() / 19, abs=0.2)


def test_training_takes_the_reference_path_and_forcing_the_kernel_there_is_an_error():
    layer = nested_layer().train().requires_grad_(True)
    x = torch.randn(2, 128)
    layer(x).sum().backward()
    assert layer.last_path == "reference" and layer.down_proj.weight.grad is not None
    layer.force_path = "cpu"
    with pytest.raises(RuntimeError, match="forward-only"):
        layer(x)


def test_changed_weights_or_threshold_are_picked_up():
    layer = nested_layer()
    x = torch.randn(1, 128)
    with torch.no_grad():
        before, *_ = mgs_kernels_cpu.mgs_nested_cpu(layer, x)
        layer.down_proj.weight.mul_(2)
        doubled, *_ = mgs_kernels_cpu.mgs_nested_cpu(layer, x)
        torch.testing.assert_close(doubled, 2 * before)
        layer.gate_threshold.fill_(float("inf"))
        nothing, count = mgs_kernels_cpu.mgs_nested_cpu(layer, x)
        assert count == 0 and torch.count_nonzero(nothing) == 0
        layer.gate_threshold.fill_(0.0)
        everything, count = mgs_kernels_cpu.mgs_nested_cpu(layer, x)
        scores = mgs_reference.mgs_nested_naive(layer, x)[1]
        assert count == (scores > 0).sum().item()
        layer.up_proj.weight.mul_(-1)
        layer.requantize()  # new codes and low nibbles
        scores = torch.empty(1, 200)
        flipped, _ = mgs_kernels_cpu.mgs_nested_cpu(layer, x, scores=scores)
        assert relative_to_largest(flipped, mgs_reference.mgs_nested_naive(layer, x, selected=scores > 0)[0]) < 5e-5
        assert (flipped - everything).abs().max() > 0.1


def test_a_layer_that_ran_the_kernel_deep_copies_and_pickles():
    import copy
    import io

    layer = nested_layer()
    x = torch.randn(1, 128)
    with torch.no_grad():
        want, _ = mgs_kernels_cpu.mgs_nested_cpu(layer, x)
        twin = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (twin, loaded):
            torch.testing.assert_close(other(x), want)
            assert other.last_path == "cpu"


@pytest.mark.parametrize("hidden,intermediate,group_size", [(128, 200, 64), (256, 160, 128)], ids=str)
@pytest.mark.parametrize("down_format", ["int8_rows", "bf16"])
def test_the_stated_runtime_copies_are_what_the_kernel_holds(hidden, intermediate, group_size, down_format):
    from treeffn_hf.modeling.dispatch import runtime_copy_bytes

    layer = nested_layer(hidden, intermediate, group_size, down_format=down_format)
    with torch.no_grad():
        layer(torch.randn(100, hidden).bfloat16())  # a bf16 model's many tokens: bf16 GEMMs over a bf16 copy
        assert layer.last_path == ("cpu:amx" if AMX and down_format == "bf16" else "cpu:scores")
        layer(torch.randn(1, hidden)), layer(torch.randn(8, hidden))
    amx = AMX and down_format == "bf16"
    assert layer.last_path == ("cpu:amx" if amx else "cpu") and mgs_kernels_cpu.kernel_down_format(layer) == down_format
    own = {t.data_ptr() for t in (*layer.parameters(), *layer.buffers())}
    held = [t for t in mgs_kernels_cpu._operands(layer)[0][1][1:] if t.numel() and t.data_ptr() not in own]
    held += [] if amx else list(layer.__dict__["_bf16_weights"][1])  # the many-token path's bf16 GEMM operands
    # the low nibbles, the scoring blocks and their scales and zeros, down_proj's int8 rows and their
    # scales or its bf16 copy, the three bf16 matrices of the many-token path; with AMX (which then takes
    # the many tokens) both nibbles unpacked, its scales and zeros, and down_proj in tiles
    assert len(held) == {"int8_rows": 9, "bf16": 10 if amx else 8}[down_format]
    assert sum(t.numel() * t.element_size() for t in held) == runtime_copy_bytes(layer)["cpu"]


def test_weights_off_the_nested_grid_are_refused_with_a_reason():
    layer = nested_layer()
    x = torch.randn(1, 128)
    with torch.no_grad():
        layer.gate_proj.weight.add_(1e-3)  # as training without requantize() would leave them
        assert "nested 8-bit grid" in mgs_kernels_cpu.cpu_kernel_unavailable_reason(layer, x)
        assert choose_path(layer, x) == "torch"
        layer.force_path = "cpu"
        with pytest.raises(RuntimeError, match="nested 8-bit grid"):
            layer(x)


@pytest.mark.parametrize("change,reason", [
    (lambda layer: layer.to(torch.bfloat16), "float32"),
    (lambda layer: setattr(layer, "act_fn", torch.nn.GELU()), "SiLU"),
])
def test_unsupported_layers_take_the_torch_path(change, reason):
    layer = nested_layer()
    change(layer)
    x = torch.randn(1, 128, dtype=layer.gate_proj.weight.dtype)
    assert reason in mgs_kernels_cpu.cpu_kernel_unavailable_reason(layer, x)
    with torch.no_grad():
        layer(x)
    assert layer.last_path == "torch"
    for spec in (MGSSpec(density=0.5, predictor="linear"), MGSSpec(density=0.5, selection="top_k"),
                 MGSSpec(density=0.5, predictor="quantized", selection="threshold")):
        other = MicroGatedMLP(128, 200, spec, torch.nn.SiLU()).eval()
        assert "nested predictor with threshold" in mgs_kernels_cpu.cpu_kernel_unavailable_reason(other)


def test_a_compiler_failure_is_reported_and_the_torch_path_runs(tmp_path):
    code = """
import torch
from treeffn_hf.modeling import mgs_kernels_cpu
from tests.test_kernels_cpu import nested_layer
layer = nested_layer()
with torch.no_grad():
    layer(torch.randn(1, 128))
print(layer.last_path, '|', mgs_kernels_cpu.cpu_kernel_unavailable_reason(layer))
"""
    result = run_python(code, env={"CC": "false", "TREEFFN_KERNEL_CACHE": str(tmp_path)})
    path, reason = result.stdout.strip().split(" | ")
    assert path == "torch" and reason.startswith("the C kernel did not compile")


@pytest.mark.parametrize("hidden,intermediate,group_size", [(64, 96, 64), (192, 333, 64), (256, 160, 128)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
@pytest.mark.parametrize("down_format", DOWN_FORMATS)
def test_the_bytes_the_layer_reports_are_the_bytes_the_kernel_touches(hidden, intermediate, group_size, tokens,
                                                                      down_format):
    """The counting build marks every weight byte the kernel's reads touch; the layer's byte
    report (`bytes_read`, its `cost`) must name exactly those, per operand, below and above the
    scoring GEMM's token count, so a read the report leaves out (or one it claims) fails here."""
    layer = nested_layer(hidden, intermediate, group_size, density=0.05, down_format=down_format)
    layer.kernel_policy = layer.kernel_policy.replace(cpu_fused_max_tokens=16)  # the fused kernel's report at 16
    x = torch.randn(tokens, hidden)
    scores = torch.empty(tokens, intermediate)
    want, _ = mgs_kernels_cpu.mgs_nested_cpu(layer, x, scores=scores)
    out, selected, touched = mgs_kernels_cpu.touched_bytes(layer, x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # the counting build computes the same
    union = int((scores > layer.gate_threshold).any(dim=0).sum())
    assert 0 < union < intermediate
    reported = layer.bytes_read(tokens, union)
    assert touched.pop("stray") == 0
    assert {name: count for name, count in touched.items() if count} == reported
    if tokens == 1:
        cost = layer.cost()
        assert cost.active_weight_bytes == sum(layer.bytes_read(1, cost.active_units).values())


def test_a_nested_checkpoint_loaded_in_bf16_keeps_its_grid_and_runs_the_kernel_on_bf16_tokens(tmp_path):
    """dtype=bfloat16 casts attention and embeddings, not the nested layer's float32 weights (bf16
    cannot hold its 8-bit grid): the kernel runs on the bf16 tokens, rounded back to bf16."""
    from transformers import AutoModelForCausalLM

    import treeffn_hf

    from .conftest import tiny_dense_model

    dense = tiny_dense_model("llama", hidden_size=128, intermediate_size=200, head_dim=32)
    model = treeffn_hf.convert(dense, MGSSpec(density=0.5, predictor="nested", group_size=64), progress=False)
    for _, mlp in model.sparse_mlps():
        calibrate_threshold(mlp, torch.randn(256, 128), 0.5)
    model.config.sparse_mlp = {**model.config.sparse_mlp, "selection": "threshold"}
    model.save_pretrained(tmp_path)
    loaded = {dtype: AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
              for dtype in (torch.float32, torch.bfloat16)}
    bf16 = loaded[torch.bfloat16]
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    for _, mlp in bf16.sparse_mlps():
        assert {p.dtype for p in mlp.parameters()} == {torch.float32}
    hidden = torch.randn(1, 3, 128).bfloat16()
    for (_, mlp16), (_, mlp32) in zip(bf16.sparse_mlps(), loaded[torch.float32].sparse_mlps()):
        with torch.no_grad():
            got, want = mlp16(hidden), mlp32(hidden.float())
        assert mlp16.last_path == "cpu" and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)
    ids = torch.tensor([[5, 9, 13, 2, 40]])
    with torch.no_grad():
        logits = {dtype: m(ids).logits.float() for dtype, m in loaded.items()}
    assert (logits[torch.bfloat16] - logits[torch.float32]).abs().max() < 0.05 * logits[torch.float32].abs().max()


@pytest.mark.parametrize("down_format", DOWN_FORMATS)
def test_a_tokens_output_does_not_depend_on_its_batch(down_format):
    """A served batch must decode as each request alone would: the fused kernel's sums for a token
    are the same, bit for bit, whatever the other tokens of the call selected."""
    layer = nested_layer(256, 333, 64, density=0.5, down_format=down_format)
    x = torch.randn(5, 256)
    together, _ = mgs_kernels_cpu.mgs_nested_cpu(layer, x)
    for t in range(5):
        alone, _ = mgs_kernels_cpu.mgs_nested_cpu(layer, x[t:t + 1])
        assert torch.equal(alone[0], together[t])


@pytest.mark.parametrize("hidden,intermediate,group_size", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("tokens", [1, 7, 16, 33, 64])
def test_bf16_tokens_give_the_float32_entry_rounded_to_bf16(hidden, intermediate, group_size, tokens):
    """The bf16 entry point widens the tokens and rounds the output inside the C call, to nearest
    even as PyTorch does: bit for bit the float32 entry on the same tokens, rounded by PyTorch."""
    layer = nested_layer(hidden, intermediate, group_size)
    x = (torch.randn(tokens, hidden) * 3).bfloat16()
    got, selected = mgs_kernels_cpu.mgs_nested_cpu(layer, x)
    want, want_selected = mgs_kernels_cpu.mgs_nested_cpu(layer, x.float())
    assert got.dtype == torch.bfloat16 and selected == want_selected
    assert torch.equal(got, want.bfloat16())


def test_the_decode_shortcut_takes_the_kernel_only_where_the_dispatch_would():
    """`decode_step` skips `choose_path` for a decode step; wherever it answers, the dispatch would
    have taken the fused kernel, and the output is the kernel's."""
    layer = nested_layer()
    answered = set()
    for grad, forced, tokens, dtype in [(False, None, 1, torch.bfloat16), (False, None, 1, torch.float32),
                                        (False, None, 7, torch.float32), (False, "cpu", 1, torch.float32),
                                        (True, None, 1, torch.float32), (False, "cpu:scores", 1, torch.float32),
                                        (False, "reference", 1, torch.float32), (False, None, 8, torch.float32),
                                        (False, None, mgs_kernels_cpu.MAX_TOKENS + 1, torch.float32),
                                        (False, None, 1, torch.float16)]:
        layer.force_path = forced
        x = torch.randn(tokens, 128).to(dtype)
        with torch.set_grad_enabled(grad):
            fast = mgs_kernels_cpu.decode_step(layer, x)
        if fast is not None:
            answered.add((forced, tokens, dtype))
            with torch.no_grad():
                assert choose_path(layer, x) == "cpu"
            assert torch.equal(fast[0], mgs_kernels_cpu.mgs_nested_cpu(layer, x)[0])
    # from the AMX switch point (8 tokens) on, the dispatch decides, AMX or not
    assert answered == {(None, 1, torch.bfloat16), (None, 1, torch.float32), (None, 7, torch.float32),
                        ("cpu", 1, torch.float32)}
    layer.force_path = None
    layer.kernel_policy = layer.kernel_policy.replace(cpu_amx_min_tokens=1)  # AMX from 1 token: no shortcut
    assert mgs_kernels_cpu.decode_step(layer, torch.randn(1, 128)) is None
