"""Model FLOPs per training sample, counted once, and the achieved TFLOP/s and MFU they give.

Counted by torch's ``FlopCounterMode`` on one forward and backward of the recipe's own step, the model's parameters
and buffers swapped for meta tensors (no memory, no compute): the FLOPs of the matrix products and convolutions that
run, which is what MFU is measured in. A recipe whose model or step cannot run on meta tensors gives its own count
(``flops_per_sample(cfg)``), else there is none.
"""

from __future__ import annotations

import logging

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from launcher.errors import UserError
from launcher.recipe import Recipe

log = logging.getLogger(__name__)

# Dense peak TFLOP/s per device from the vendors' datasheets (without sparsity), per precision: a device is
# matched by the first name fragment its name contains, so a longer name comes before the fragment it holds.
# A device not listed gets no MFU: an invented peak gives numbers like 152% (torchtitan #2307).
_HOPPER_SXM = {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", _HOPPER_SXM),
    ("H200", _HOPPER_SXM),
    ("H800", _HOPPER_SXM),
    ("H20", {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    ("MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
)


# A count past this is a wrong formula (units, a missing division), not a model: the fastest device in the table
# would take ~7 minutes on one sample, and the TFLOP/s it gives would be absurd (1e300 logs 3.6e291 TFLOP/s).
MAX_FLOPS_PER_SAMPLE = 1e18


def matmul_precision(amp: str) -> str:
    """What the model's matrix products run in: the autocast dtype, else TF32 where torch allows it, else fp32."""
    if amp != "none":
        return amp
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "fp32"


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak in ``precision``, or None (the CPU, a device or precision not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks.get(precision)
    return None


def flops_per_sample(recipe: Recipe, cfg, model: torch.nn.Module, sample) -> float | None:
    """Forward and backward FLOPs of one training sample (the recipe's hook, else counted); None if not countable.

    Counted through the recipe's own step on ``model`` with meta copies of its parameters and buffers: no memory, no
    compute, no change to the model, and no second ``build_model`` (whose collectives, a download on rank 0 first,
    would wait for ranks that are not building).
    """
    given = recipe.flops_per_sample(cfg)
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not given > 0:  # NaN is not > 0
            raise UserError(f"recipe {recipe.name}: flops_per_sample(cfg) returned {given!r}: it must be a positive "
                            "number, the forward and backward FLOPs of one training sample")
        if given > MAX_FLOPS_PER_SAMPLE:
            raise UserError(f"recipe {recipe.name}: flops_per_sample(cfg) returned {given!r}: more than "
                            f"{MAX_FLOPS_PER_SAMPLE:.0e} FLOPs, minutes of the fastest device for one sample; it must "
                            "be the forward and backward FLOPs of one training sample")
        return float(given)
    try:
        on_meta = _OnMeta(model)
        # Two samples, not one: BatchNorm refuses a batch of one.
        batch = tree_map(lambda value: value.to("meta") if isinstance(value, torch.Tensor) else value,
                         (recipe.collate or default_collate)([sample, sample]))
        with FlopCounterMode(display=False) as counter:
            loss, _ = recipe.step(on_meta, batch)
            loss.backward()
    except UserError:  # the step returned what cannot be trained on (Recipe.step): said before the run starts
        raise
    except Exception as error:  # a model or step that needs real values: no count, and training goes on
        log.info("model FLOPs not counted (%s: %s): a recipe can give them as flops_per_sample(cfg)",
                 type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return None
    return counter.get_total_flops() / 2


class _OnMeta(torch.nn.Module):
    """``model`` called with meta copies of its parameters and buffers (``torch.func.functional_call``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.wrapped = [model]  # in a list: not a submodule, so nothing here moves or changes it
        self.state = {name: torch.empty_like(value, device="meta").requires_grad_(value.requires_grad)
                      for name, value in [*model.named_parameters(), *model.named_buffers()]}

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.wrapped[0], self.state, args, kwargs, tie_weights=True)


class Throughput:
    """A rate of samples as the throughput/* and perf/* metrics.

    perf/tflops is per device (the job's rate over its ``world_size`` devices), and perf/mfu its share of the device's
    peak, only where the peak is known.
    """

    def __init__(self, tokens_per_sample: int | None, flops_per_sample: float | None, peak: float | None,
                 world_size: int):
        self.tokens_per_sample, self.flops_per_sample = tokens_per_sample, flops_per_sample
        self.peak, self.world_size = peak, world_size

    def of(self, samples_per_s: float) -> dict:
        metrics = {"throughput/samples_per_s": samples_per_s}
        if self.tokens_per_sample is not None:
            metrics["throughput/tokens_per_s"] = samples_per_s * self.tokens_per_sample
        if self.flops_per_sample:
            tflops = samples_per_s * self.flops_per_sample / self.world_size / 1e12
            metrics["perf/tflops"] = tflops
            if self.peak:
                metrics["perf/mfu"] = tflops / self.peak
        return metrics
