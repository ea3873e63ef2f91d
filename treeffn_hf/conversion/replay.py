"""Walk calibration windows through a model's decoder layers one layer at a time.

Sequential (GPTQ-style) fitting needs, for layer i, the MLP inputs that the model with its
already-fitted layers 0..i-1 produces. Rerunning the model from the start for every layer costs
L/2 forwards; `LayerReplay` instead keeps the hidden states between layers and runs one decoder
layer per call, with the same arguments (mask, rotary embeddings) the model passes it.
"""

from __future__ import annotations

import torch

from ..architectures import layout_of


class _Captured(Exception):
    pass


class LayerReplay:
    """The residual stream of `windows` (sequences, tokens) entering decoder layer `next_layer`."""

    def __init__(self, model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> None:
        arch = layout_of(model.config)
        self.layers = arch.decoder_layers(model)
        self.mlp_attr = arch.mlp_attr
        self.next_layer = 0
        self.batches: list[tuple[torch.Tensor, dict]] = []
        device = next(model.parameters()).device

        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.batches.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _Captured

        hook = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for start in range(0, windows.shape[0], batch_size):
                    try:
                        model(windows[start : start + batch_size].to(device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            hook.remove()

    @torch.no_grad()
    def run_layer(self, advance: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Run decoder layer `next_layer` over every window; returns its MLP's (inputs, outputs)
        as (tokens, hidden) float32 rows. With `advance`, the stream moves past the layer."""
        index = self.next_layer
        layer = self.layers[index]
        inputs, outputs = [], []

        def record(module, args, output):
            inputs.append(args[0].reshape(-1, args[0].shape[-1]).float())
            outputs.append(output.reshape(-1, output.shape[-1]).float())

        hook = getattr(layer, self.mlp_attr).register_forward_hook(record)
        try:
            moved = []
            for hidden, kwargs in self.batches:
                out = layer(hidden, **kwargs)
                moved.append((out[0] if isinstance(out, tuple) else out, kwargs))
        finally:
            hook.remove()
        if advance:
            self.batches = moved
            self.next_layer += 1
        return torch.cat(inputs), torch.cat(outputs)
