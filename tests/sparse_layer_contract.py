"""The contract every sparse layer keeps, written once and run over every spec of every method
(peft's shared tester is the model): the fast path equals the reference, no weight off the
selection gets a gradient, and the fast path reads no row outside those its byte report claims
(rows it claims to skip are poisoned with NaN, which a read would spread).

A subclass says how to build a layer (`make_layer`), which specs to run (`SPECS`), and which rows
of which weight tables a batch reads (`claimed_rows`: from the layer's own routing or byte report).
"""

import pytest
import torch

from .conftest import assert_fast_path_matches_reference


class SparseLayerContract:
    SPECS: list = []
    HIDDEN: int = 24

    def make_layer(self, spec, dtype=torch.float64) -> torch.nn.Module:
        raise NotImplementedError

    def claimed_rows(self, layer, x: torch.Tensor) -> list[tuple[torch.nn.Parameter, torch.Tensor, int]]:
        """(weight, boolean mask over its slices along `dim`, dim): what the fast path reads for x."""
        raise NotImplementedError

    def gradient_rows(self, layer, x: torch.Tensor) -> list[tuple[torch.nn.Parameter, torch.Tensor, int]]:
        """The same for the slices that may get a gradient on x (the selection)."""
        return self.claimed_rows(layer, x)

    def pytest_generate_tests(self, metafunc):
        if "spec" in metafunc.fixturenames:
            metafunc.parametrize("spec", self.SPECS, ids=[self.spec_id(s) for s in self.SPECS])

    def spec_id(self, spec) -> str:
        return str(spec)

    @pytest.mark.parametrize("tokens", [1, 7, 33], ids=lambda n: f"N{n}")
    def test_fast_path_equals_reference(self, spec, tokens):
        assert_fast_path_matches_reference(self.make_layer(spec), torch.randn(tokens, self.HIDDEN, dtype=torch.float64))

    def test_no_gradient_off_the_selection(self, spec):
        layer = self.make_layer(spec)
        x = torch.randn(1, self.HIDDEN, dtype=torch.float64)  # one token: some rows stay off its selection
        layer(x).sum().backward()
        checked = 0
        for weight, rows, dim in self.gradient_rows(layer, x):
            assert weight.grad is not None
            assert torch.count_nonzero(weight.grad.index_select(dim, (~rows).nonzero().flatten())) == 0
            checked += int((~rows).sum())
        if not checked:
            pytest.skip("this layer computes every stored row for this token: nothing lies off its selection")

    @pytest.mark.parametrize("tokens", [1, 4], ids=lambda n: f"N{n}")
    def test_the_fast_path_reads_only_the_rows_it_claims(self, spec, tokens):
        layer = self.make_layer(spec)
        x = torch.randn(tokens, self.HIDDEN, dtype=torch.float64)
        with torch.no_grad():
            layer.force_path = "reference"
            want = layer(x)
            for weight, rows, dim in self.claimed_rows(layer, x):
                weight.index_fill_(dim, (~rows).nonzero().flatten(), float("nan"))
            layer.force_path = "torch"
            got = layer(x)
        assert torch.isfinite(got).all(), "the fast path read a row it claims to skip"
        torch.testing.assert_close(got, want)
