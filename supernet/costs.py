"""What a sub-network costs: MACs, parameters and deployed bytes (``docs/METHODS.md`` section 3).

A mixin of :class:`~supernet.network.SuperNetwork`: every cost is asked of the adapted layers
(each adapter counts its base and itself at its choices) and, under elastic width, of the layers
as the configuration cuts them (:meth:`~supernet.network.SuperNetwork.cuts`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from supernet.bases import is_adaptable, layer_shape


def _cut_shape(shape: tuple[int, int], cut) -> tuple[int, int]:
    """``(in, out)`` of a layer after an elastic-width cut (None: uncut)."""
    if cut is None:
        return shape
    keep_in, keep_out = cut
    return (shape[0] if keep_in is None else len(keep_in), shape[1] if keep_out is None else len(keep_out))


class CostsMixin:
    """The cost methods of the super-network (needs ``model``, ``adapters``, ``head_modules``,
    ``space``, ``width``, ``config``, ``active_config``, ``adapter_choices`` and ``cuts``)."""

    def _cost(self, name: str, cut, method: str, choices: dict, **kw) -> int:
        """An adapter's cost (``method``) at ``choices``, on its base cut as ``cut`` says (memoised:
        a cut copies the kept weights)."""
        adapter = self.adapters[name]
        if cut is None:
            return getattr(adapter, method)(choices, **kw)
        key = (name, *(None if k is None else len(k) for k in cut), method,
               tuple(sorted((k, str(v)) for k, v in adapter.choices(choices).items())), tuple(sorted(kw.items())))
        if key not in self._costs:
            self._costs[key] = getattr(adapter.cut(*cut), method)(choices, **kw)
        return self._costs[key]

    def head_params(self) -> int:
        return sum(p.numel() for n in self.head_modules for p in self.model.get_submodule(n).parameters())

    def trainable_params(self, config: Mapping[str, object] | None = None) -> int:
        """Parameters a sub-network trains on top of the base: each adapter's at its choice
        (LoRA: ``r * (in + out)``) plus the head (shared by every sub-network)."""
        config = self.active_config() if config is None else self.space.validate(config)
        choices, cuts = self.adapter_choices(config), self.cuts(config)
        return self.head_params() + sum(self._cost(n, cuts.get(n), "adapter_params", choices[n]) for n in self.adapters)

    def shipped_params(self, config: Mapping[str, object] | None = None) -> int:
        """Parameters a sub-network ships beside the base (the ``params`` objective): as
        :meth:`trainable_params`, but an update folded into its base (``sparse``, ``qa-sparse``)
        ships no factors of its own."""
        config = self.active_config() if config is None else self.space.validate(config)
        choices, cuts = self.adapter_choices(config), self.cuts(config)
        return self.head_params() + sum(self._cost(n, cuts.get(n), "shipped_params", choices[n]) for n in self.adapters)

    def _inside_adapter(self, name: str) -> bool:
        return any(name.startswith(a + ".") for a in self.adapters)

    def _linear_rows(self, seq_len: int) -> dict[str, int]:
        """Rows (tokens) each linear layer and each adapter sees for one sequence of ``seq_len`` tokens."""
        if seq_len in self._rows:
            return self._rows[seq_len]
        rows: dict[str, int] = {}
        hooks = []
        for name, module in self.model.named_modules():
            if name in self.adapters or is_adaptable(module) and not self._inside_adapter(name):
                fan_in = module.in_features if name in self.adapters else layer_shape(module)[0]

                def hook(mod, inputs, output, name=name, fan_in=fan_in):
                    rows[name] = rows.get(name, 0) + inputs[0].numel() // fan_in

                hooks.append(module.register_forward_hook(hook))
        device = next(self.model.parameters()).device
        ids = torch.ones(1, seq_len, dtype=torch.long, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        self._rows[seq_len] = rows
        return rows

    def macs(self, config: Mapping[str, object] | None = None, seq_len: int = 64, merged: bool = False) -> int:
        """Multiply-accumulates of one forward pass over one sequence of ``seq_len`` tokens.

        ``docs/METHODS.md`` section 3: a linear layer costs ``rows * in * out`` (rows = the
        tokens it sees, measured once with hooks: all ``seq_len`` for block layers, one for a
        pooler or classifier on the first token); an adapted layer asks its adapter, which counts
        its base's non-zeros (a pruned base costs ``rows * nnz(W)``) and, unless merged,
        ``rows * r * (in + out)``; attention adds ``2 * T^2 * d`` per layer (scores and
        weighted sum). Embeddings, norms and softmax are not counted. ``merged``: the adapters
        are folded into the base weights (an exported merged model), so they add nothing.
        """
        config = self.active_config() if config is None else self.space.validate(config)
        rows = self._linear_rows(seq_len)
        cuts = self.cuts(config)
        total = 0
        for name, module in self.model.named_modules():
            if is_adaptable(module) and not self._inside_adapter(name):
                fan_in, fan_out = _cut_shape(layer_shape(module), cuts.get(name))
                total += rows.get(name, 0) * fan_in * fan_out
        for n, choices in self.adapter_choices(config).items():
            total += rows.get(n, 0) * self._cost(n, cuts.get(n), "macs_per_token", choices, merged=merged)
        if self.width is not None and self.width.attention_blocks():  # each block's kept heads
            heads = self.width.kept_heads(config)
            return int(total + sum(2 * seq_len * seq_len * heads[b.name] * b.head_dim
                                   for b in self.width.attention_blocks()))
        cfg = getattr(self.model, "config", None)
        hidden = getattr(cfg, "hidden_size", None)
        layers = getattr(cfg, "num_hidden_layers", None)
        if hidden and layers:
            total += 2 * seq_len * seq_len * hidden * layers
        return int(total)

    def size(self, config: Mapping[str, object] | None = None, merged: bool | None = None) -> int:
        """Deployed bytes of the sub-network: every parameter outside the adapted layers at its
        dtype, plus each adapted layer as it ships (its base at its precision and sparsity, and
        the adapter merged into it or beside it). ``merged`` None: merged when the updates pass
        through the bases (they are always folded in), else the compressed base with the factors."""
        config = self.active_config() if config is None else self.space.validate(config)
        merged = self.config.merge != "plain" if merged is None else merged
        cuts = self.cuts(config)
        total = sum(p.numel() * p.element_size() for n, p in self.model.named_parameters()
                    if not self._inside_adapter(n))
        for name, (keep_in, keep_out) in cuts.items():  # narrowed layers without an adapter
            if name not in self.adapters:
                layer = self.model.get_submodule(name)
                fan_in, fan_out = layer_shape(layer)
                kin, kout = _cut_shape((fan_in, fan_out), (keep_in, keep_out))
                size = layer.weight.element_size()
                total -= (fan_in * fan_out - kin * kout) * size
                if layer.bias is not None:
                    total -= (fan_out - kout) * layer.bias.element_size()
        for n, choices in self.adapter_choices(config).items():
            total += self._cost(n, cuts.get(n), "nbytes", choices, merged=merged)
        return int(total)
