"""FP8 linear layers and the module swap that installs them, the torchao way (docs/design.md §7).

A frozen config dataclass (:class:`Float8Config`) and a module-swap function with a filter
(:func:`convert_to_fp8_linear`) that replaces ``nn.Linear`` layers by :class:`Float8Linear`
and :class:`~wildactor_kernels.RefLoRALinear` layers by :class:`Float8RefLoRALinear` (FP8 base,
high-precision reference-only adapter on top, same PEFT keys). The GEMM maths are
:func:`~wildactor_kernels.quant.linear.fp8_linear`'s. Which GEMM path a layer takes is never
silent: ``logger.warning`` at first use, ``layer.gemm_path`` / ``layer.fallback_reason``.

:class:`RefLoRAMixin` is the reference-only adapter on top of any quantized base linear (the
bitsandbytes layers of :mod:`wildactor_kernels.model.quant` use it too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .._utils import BACKENDS, warn_once
from ..lora.module import RefLoRALinear, ref_rows_input, ref_rows_output
from .linear import GEMMS, Fp8LinearFn, resolve_fp8_gemm
from .reference import FP8_DTYPE, quantize_weight_fp8

logger = logging.getLogger("wildactor_kernels")

__all__ = ["Float8Config", "Float8Linear", "Float8RefLoRALinear", "RefLoRAMixin", "convert_to_fp8_linear"]


# =========================================================================== config
@dataclass(frozen=True)
class Float8Config:
    """FP8 (e4m3) weights per output channel, activations per token, rowwise-scaled GEMM.

    Attributes:
        gemm: ``"auto"`` (rowwise ``torch._scaled_mm`` on CUDA sm_89+, emulated elsewhere, with
            a warning), ``"scaled_mm"`` (always; it also runs on CPU with torch >= 2.5), or
            ``"emulate"`` (fp32 matmul of the FP8 codes, any device).
        act_backend: backend of the per-token activation quantization
            (``"auto" | "triton" | "reference"``).
        use_fast_accum: ``_scaled_mm`` fast accumulation (torchao's inference default).
    """

    gemm: str = "auto"
    act_backend: str = "auto"
    use_fast_accum: bool = True

    def __post_init__(self) -> None:
        if self.gemm not in GEMMS:
            raise ValueError(f"Float8Config.gemm must be one of {GEMMS}, got {self.gemm!r}")
        if self.act_backend not in BACKENDS:
            raise ValueError(f"Float8Config.act_backend must be 'auto', 'triton' or 'reference', "
                             f"got {self.act_backend!r}")


# =========================================================================== FP8 modules
class Float8Linear(nn.Module):
    """``nn.Linear`` replacement with float8_e4m3fn weights and per-token FP8 activations.

    State: ``weight [N, K]`` float8_e4m3fn (frozen parameter), ``weight_scale [N, 1]`` fp32
    buffer (``W ~ weight * weight_scale``), ``bias [N]`` (frozen, original dtype) or None.
    ``forward(x [..., K]) -> [..., N]`` in ``x.dtype``; gradients flow to ``x`` (and to the bias
    when it requires grad) through the dequantized weight.

    Attributes set at first use: ``gemm_path`` (``"scaled_mm"`` or ``"emulate"``) and
    ``fallback_reason`` (None, or why the fast path does not run).

    ``.to(dtype)`` / ``.half()`` leave the FP8 weight and its fp32 scales alone (a float cast of
    the codes would silently drop the scales); device moves apply to them as usual.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: Float8Config | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.config = config or Float8Config()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, 1, device=device, dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.gemm_path: str | None = None
        self.fallback_reason: str | None = None
        self._fuse_bias = True

    @classmethod
    def from_float(cls, lin: nn.Module, config: Float8Config | None = None) -> Float8Linear:
        """Quantize ``lin`` (``nn.Linear`` or anything with ``weight [N, K]`` and ``bias``)."""
        w = lin.weight
        new = cls(w.shape[1], w.shape[0], bias=lin.bias is not None, config=config,
                  device=w.device, dtype=w.dtype)
        new._copy_base_from(lin)
        return new

    def _copy_base_from(self, lin: nn.Module) -> None:
        q, s = quantize_weight_fp8(lin.weight.detach())
        self.weight.data = q
        self.weight_scale.copy_(s)
        if lin.bias is not None:
            self.bias.data = lin.bias.detach().clone()
        self.resolve_path(lin.weight.device)

    # ---------------------------------------------------------------- GEMM path
    def resolve_path(self, device: torch.device, warn: bool = False) -> str:
        """Decide (and record) the GEMM path for ``device``; with ``warn``, log (once per
        distinct reason) when ``gemm="auto"`` cannot take the fast path."""
        path, reason = resolve_fp8_gemm(self.config.gemm, device)
        self._path_device = torch.device(device).type
        if (path, reason) != (self.gemm_path, self.fallback_reason):
            self.gemm_path, self.fallback_reason = path, reason
            self._fuse_bias = True
            if warn and reason is not None and self.config.gemm == "auto":
                warn_once(f"Float8Linear: {reason}")
        return path

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm_path is None or getattr(self, "_path_device", None) != x.device.type:
            self.resolve_path(x.device, warn=True)
        cfg = self.config
        if self.gemm_path == "scaled_mm":
            try:
                return Fp8LinearFn.apply(x, self.weight, self.weight_scale, self.bias, "scaled_mm",
                                          cfg.act_backend, cfg.use_fast_accum, self._fuse_bias)
            except torch.cuda.OutOfMemoryError:
                raise  # not a missing feature: the emulated path would need even more memory
            except RuntimeError as e:  # e.g. a torch build without rowwise-scaled FP8 GEMMs
                if self._fuse_bias and self.bias is not None:
                    self._fuse_bias = False
                    logger.warning("Float8Linear: torch._scaled_mm with a fused bias failed (%s); adding "
                                   "the bias after the GEMM", str(e).splitlines()[0])
                    return self._base(x)
                self.gemm_path = "emulate"
                self.fallback_reason = f"torch._scaled_mm failed at run time: {str(e).splitlines()[0]}"
                logger.warning("Float8Linear: %s; using the emulated FP8 GEMM", self.fallback_reason)
        return Fp8LinearFn.apply(x, self.weight, self.weight_scale, self.bias, "emulate",
                                  cfg.act_backend, cfg.use_fast_accum, True)

    def forward(self, x: torch.Tensor, num_video: int | None = None) -> torch.Tensor:
        return self._base(x)

    # ---------------------------------------------------------------- dtype safety
    def _apply(self, fn, recurse=True):
        keep = {"weight": self.weight.detach(), "weight_scale": self.weight_scale.detach()}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            cur = getattr(self, name)
            if cur.dtype != old.dtype:  # a dtype cast: undo it, keep the device move
                fixed = old.to(cur.device)
                if name == "weight":
                    self.weight = nn.Parameter(fixed, requires_grad=False)
                else:
                    self.weight_scale = fixed
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != FP8_DTYPE and w.is_floating_point():
            # a float checkpoint (e.g. diffusers Wan): quantize it as the conversion does
            q, s = quantize_weight_fp8(w)
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = q, s
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight=float8_e4m3fn per-channel, act=per-token, "
                f"gemm={self.gemm_path}")


class RefLoRAMixin:
    """Reference-only adapter kept in high precision on top of a quantized base linear.

    Same attributes and PEFT keys as :class:`RefLoRALinear` (``rank``, ``alpha``, ``scale``,
    ``lora_A.weight [r, Din]``, ``lora_B.weight [Dout, r]``); the adapter modules are the
    original ones (trainable as before). ``y[:, Nv:] += s * B(A(x[:, Nv:]))``.
    """

    def _take_lora(self, src: nn.Module | None) -> None:
        rank = int(getattr(src, "rank", 0) or 0)
        self.rank = rank
        self.alpha = float(getattr(src, "alpha", max(rank, 1)))
        self.backend = getattr(src, "backend", "auto")
        if rank > 0:
            self.lora_A, self.lora_B = src.lora_A, src.lora_B
        else:
            self.lora_A = self.lora_B = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank > 0 else 0.0

    def _ref_forward(self, x: torch.Tensor, num_video: int | None,
                     base: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``base(x)`` (the quantized linear) plus the adapter on the reference rows, with the
        input rules of :class:`RefLoRALinear` (:func:`~wildactor_kernels.lora.module.ref_rows_input`):
        ``num_video=None`` is a plain linear on ``x [..., Din]``; with an int, ``x`` is
        ``[B, N, Din]`` or ``[N, Din]`` (one sample) and ``num_video`` lies in ``[0, N]``, else
        a TypeError/ValueError naming the argument."""
        x3, num_video = ref_rows_input(x, num_video)
        if num_video is None:
            return base(x)
        return ref_rows_output(x, self._add_ref_lora(x3, base(x3), num_video))

    def _add_ref_lora(self, x: torch.Tensor, y: torch.Tensor, num_video: int) -> torch.Tensor:
        """``y [B, N, Dout] = base(x [B, N, Din])`` plus ``s B A x`` on rows ``>= num_video``
        (``num_video`` already checked by :func:`ref_rows_input`)."""
        if self.rank == 0 or num_video == x.shape[1]:
            return y
        x_r = x[:, num_video:]
        delta = self.lora_B(self.lora_A(x_r.to(self.lora_A.weight.dtype))) * self.scale
        return torch.cat([y[:, :num_video], y[:, num_video:] + delta.to(y.dtype)], dim=1)


class Float8RefLoRALinear(RefLoRAMixin, Float8Linear):
    """FP8 version of :class:`~wildactor_kernels.RefLoRALinear`: FP8 base for every row, bf16
    (original dtype) reference-only adapter on top. ``forward(x, num_video=None)`` with the input
    rules of ``RefLoRALinear.forward`` (``x [B, N, Din]`` or ``[N, Din]`` with a ``num_video``)."""

    @classmethod
    def from_float(cls, lin: nn.Module, config: Float8Config | None = None) -> Float8RefLoRALinear:
        new = super().from_float(lin, config)
        new._take_lora(lin)
        return new

    def forward(self, x: torch.Tensor, num_video: int | None = None) -> torch.Tensor:
        return self._ref_forward(x, num_video, self._base)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}"


# =========================================================================== module swap
def _is_float_linear(module: nn.Module) -> bool:
    if not isinstance(module, (nn.Linear, RefLoRALinear)):
        return False
    w = getattr(module, "weight", None)
    # a layer quantized by other means (bitsandbytes int8/nf4 subclass nn.Linear) is not float
    return isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype != FP8_DTYPE


def convert_to_fp8_linear(module: nn.Module, config: Float8Config | None = None,
                          module_filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap the float linears of ``module`` for FP8 ones, in place.

    Args:
        module: any module; every float ``nn.Linear`` becomes a :class:`Float8Linear` and every
            :class:`~wildactor_kernels.RefLoRALinear` a :class:`Float8RefLoRALinear` (its
            adapter modules are kept as they are). Layers already quantized are left alone.
        config: the :class:`Float8Config` of the new layers (default ``Float8Config()``).
        module_filter_fn: ``(module, fqn) -> bool`` choosing which of those layers to convert
            (default: all of them but the adapters ``lora_A`` / ``lora_B`` of a
            ``RefLoRALinear``, which stay trainable in high precision). ``fqn`` is the name in
            ``module.named_modules()``, ``""`` for ``module`` itself.
    Returns:
        ``module``, or the new layer when ``module`` itself is a converted linear.
    """
    config = config if config is not None else Float8Config()
    if not isinstance(config, Float8Config):
        raise TypeError(f"config must be a Float8Config, got {type(config).__name__}")
    if module_filter_fn is None:
        adapters = {id(a) for mod in module.modules() if isinstance(mod, RefLoRALinear)
                    for a in (mod.lora_A, mod.lora_B) if a is not None}
        module_filter_fn = lambda mod, fqn: id(mod) not in adapters
    targets = [(fqn, mod) for fqn, mod in module.named_modules()
               if _is_float_linear(mod) and module_filter_fn(mod, fqn)]
    root = module
    for fqn, mod in targets:
        cls = Float8RefLoRALinear if isinstance(mod, RefLoRALinear) else Float8Linear
        new = cls.from_float(mod, config)
        new.train(mod.training)
        if not fqn:
            root = new
            continue
        parent_name, _, child = fqn.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, new)
    return root
