"""Per-sample clipping for any model through Opacus' ``GradSampleModule``.

fedcare's own :class:`~fedcare.training.dp_sgd.GhostClipper` is faster but covers
only stacks of Linear, ReLU and Dropout. Every other model (a CNN, a study's own
module) takes this path: Opacus' hooks record each row's gradient for the layers it
supports (Linear, Conv2d, GroupNorm, LayerNorm, InstanceNorm, Embedding, among
others), and each row's gradient is clipped before the sum. A layer that mixes the
rows of a batch (BatchNorm) would leak one patient's data into another's gradient,
so a model with one is refused before any step.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fedcare.training.dp_sgd import UnsupportedModelError


def refuse_batch_norm(model: nn.Module) -> None:
    """Refuse a model whose BatchNorm mixes the patients of a batch."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModelError(
                f"DP-SGD cannot clip per patient through BatchNorm ('{name}' mixes the "
                "rows of a batch): use GroupNorm or LayerNorm"
            )


class GradSampleClipper:
    """Per-sample clipped gradient sums for one model, through Opacus' hooks.

    Same call as :class:`~fedcare.training.dp_sgd.GhostClipper`: the sum over rows of
    each row's gradient clipped to ``max_grad_norm``, in ``model.parameters()`` order,
    and the summed loss.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        # Opacus is imported here: only DP studies with such a model pay for it.
        from opacus import GradSampleModule

        refuse_batch_norm(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if len(self.params) != len(list(model.parameters())):
            raise UnsupportedModelError("DP-SGD trains every parameter; unfreeze them all")
        try:
            self.sampled = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"DP-SGD cannot clip this model per patient: {exc}"
            ) from exc
        self.max_grad_norm = max_grad_norm

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        if x.shape[0] == 0:
            return [torch.zeros_like(p) for p in self.params], 0.0
        for p in self.params:
            p.grad = None
            p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' per-row gradients
        with warnings.catch_warnings():
            # Opacus' hooks fire on module outputs, as meant: the inputs need no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            logits: torch.Tensor = self.sampled(x).reshape(-1)
            loss: torch.Tensor = nn.functional.binary_cross_entropy_with_logits(
                logits, y, reduction="sum"
            )
            torch.autograd.backward(loss)
        rows = x.shape[0]
        samples = [p.grad_sample for p in self.params]  # type: ignore[attr-defined]
        squared = torch.zeros(rows, dtype=x.dtype)
        for sample in samples:
            squared += sample.reshape(rows, -1).pow(2).sum(1)
        factor = (self.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)
        sums = [torch.einsum("i,i...->...", factor, sample) for sample in samples]
        for p in self.params:
            p.grad = None
            p.grad_sample = None  # type: ignore[attr-defined]
        return sums, float(loss.detach())
