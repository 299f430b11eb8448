"""``RefLoRALinear``: an ``nn.Linear`` drop-in whose LoRA adapter acts on reference rows only.

State-dict keys: ``weight``/``bias`` exactly as the base ``nn.Linear`` (so a diffusers Wan
checkpoint loads unchanged) plus PEFT-named adapters ``lora_A.weight [r, Din]`` and
``lora_B.weight [Dout, r]``. ``lora_B`` starts at zero: an untrained adapter is a no-op.

Folded inference (``fold_mode``): reference rows may use a cached ``W_ref = W + s B A``
instead of the low-rank path, i.e. two plain GEMMs (or, on the Triton backend, one GEMM that
picks ``W`` or ``W_ref`` per M tile). The cache is not part of the state dict, costs one
extra ``[Dout, Din]`` weight per layer, and is rebuilt whenever ``weight``, ``lora_A`` or
``lora_B`` change: in place (their autograd ``_version`` counters), by replacement of the
Parameter or of its ``.data`` (the key holds weak references to the Parameter objects and their
storages, never addresses, which the allocator reuses), in dtype, device, shape or strides, or
when the scale changes; :meth:`RefLoRALinear.unfold` drops it explicitly.

- ``"unfold"``: always the low-rank path (:func:`wildactor_kernels.ref_lora_linear`).
- ``"fold"``: always ``W_ref``; raises if autograd needs grads of ``weight``/``lora_*``
  (a folded weight would silently drop them). Grads of ``x`` and ``bias`` still flow.
- ``"auto"`` (default): unfolded whenever those grads are needed (training); in inference,
  folded only if :attr:`RefLoRALinear.AUTO_FOLD_INFERENCE` is True. It is False until GPU
  measurement (``benchmarks/bench_lora.py``) shows the folded path faster at the shapes
  that matter, so "auto" is unfolded for now.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._utils import autocast_active, check_num_video, check_tensor, resolve_backend
from .._validate import check_bool, check_int, check_real
from .op import ref_lora_linear

FOLD_MODES = ("auto", "fold", "unfold")


def folded_linear_torch(x: torch.Tensor, weight: torch.Tensor, weight_ref: torch.Tensor,
                        bias: torch.Tensor | None, num_video: int) -> torch.Tensor:
    """Two plain GEMMs: ``x_v W^T + b`` on video rows, ``x_r W_ref^T + b`` on reference rows.

    ``x [B, N, Din]``, ``weight, weight_ref [Dout, Din]``, ``bias [Dout] | None`` ->
    ``[B, N, Dout]``. Differentiable (through a concatenation when autograd records).
    """
    same_dtype = all(t is None or t.dtype == x.dtype for t in (weight, weight_ref, bias))
    records = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                              for t in (x, weight, weight_ref, bias))
    if records or not same_dtype or autocast_active(x.device):
        return torch.cat([F.linear(x[:, :num_video], weight, bias),
                          F.linear(x[:, num_video:], weight_ref, bias)], dim=1)
    # inference: each GEMM writes its rows of one output (out[b, rows] is contiguous), no cat
    bsz, n, _ = x.shape
    out = torch.empty((bsz, n, weight.shape[0]), device=x.device, dtype=x.dtype)
    for b in range(bsz):
        for rows, w in ((slice(0, num_video), weight), (slice(num_video, n), weight_ref)):
            if rows.start == rows.stop:
                continue
            if bias is None:
                torch.mm(x[b, rows], w.t(), out=out[b, rows])
            else:
                torch.addmm(bias, x[b, rows], w.t(), out=out[b, rows])
    return out


def ref_rows_input(x: object, num_video: object) -> tuple[torch.Tensor, int | None]:
    """The input rules of every layer with a reference-only adapter (:class:`RefLoRALinear`, and
    the FP8 and bitsandbytes layers built on it), checked in one place.

    Args:
        x: a floating-point tensor.
        num_video: None (no reference rows: ``x`` may have any shape ``[..., Din]``, as for
            ``nn.Linear``), or ``Nv`` in ``[0, N]``, when ``x`` must be ``[B, N, Din]`` or
            ``[N, Din]`` (one sample): rows ``n >= Nv`` of each sample are reference rows. Any
            other rank of ``x`` raises, since which rows are reference rows would be a guess.
    Returns:
        ``(x3, nv)``: with an int ``num_video``, ``x`` as ``[B, N, Din]`` (a 2-D ``x`` gets a batch
        dim of one; :func:`ref_rows_output` undoes it) and the checked ``Nv``; else ``(x, None)``.
    Raises:
        TypeError / ValueError naming ``x`` or ``num_video``.
    """
    check_tensor("x", x, floating=True)
    if num_video is None:
        return x, None
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be [B, N, Din] or [N, Din] (one sample) when num_video is given, "
                         f"got shape {tuple(x.shape)}")
    x3 = x if x.ndim == 3 else x.unsqueeze(0)
    return x3, check_num_video(num_video, x3.shape[1])


def ref_rows_output(x: torch.Tensor, y3: torch.Tensor) -> torch.Tensor:
    """``y3 [B, N, Dout]`` computed on :func:`ref_rows_input`'s ``x3``, in the shape of ``x``."""
    return y3 if x.ndim == 3 else y3.squeeze(0)


class RefLoRALinear(nn.Module):
    """Linear layer ``y = x W^T + b`` plus ``s (x_r A^T) B^T`` on rows ``n >= num_video``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        rank: adapter rank ``r`` (0 disables the adapter).
        alpha: LoRA alpha; the scale is ``alpha / r`` (default ``alpha = r``: scale 1).
        backend: default backend of the op (``"auto" | "triton" | "reference"``).

    Attributes:
        fold_mode: ``"auto" | "fold" | "unfold"`` (see the module docstring); default "auto".
        AUTO_FOLD_INFERENCE: class-wide switch of "auto" in inference (False until measured).
    """

    #: Whether ``fold_mode="auto"`` folds in inference. Flip only on a GPU measurement
    #: (benchmarks/bench_lora.py) showing the folded path faster than the unfolded kernel.
    AUTO_FOLD_INFERENCE: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 0,
                 alpha: float | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        in_features = check_int("in_features", in_features, minimum=0)
        out_features = check_int("out_features", out_features, minimum=0)
        rank = check_int("rank", rank, minimum=0)
        bias = check_bool("bias", bias)
        if alpha is not None:
            alpha = check_real("alpha", alpha, positive=True)
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else max(rank, 1))
        self.backend = backend
        if self.rank > 0:
            self.lora_A = nn.Linear(in_features, self.rank, bias=False, **fk)
            self.lora_B = nn.Linear(self.rank, out_features, bias=False, **fk)
        else:
            self.lora_A = self.lora_B = None
        self._fold_mode = "auto"
        self._fold_cache: tuple[tuple, torch.Tensor] | None = None  # (key, W_ref), not state
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank > 0 else 0.0

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform, B zero."""
        if self.rank > 0 and not self.lora_A.weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    # ------------------------------------------------------------------ folded inference
    @property
    def fold_mode(self) -> str:
        return self._fold_mode

    @fold_mode.setter
    def fold_mode(self, mode: str) -> None:
        if mode not in FOLD_MODES:
            raise ValueError(f"fold_mode must be one of {FOLD_MODES}, got {mode!r}")
        self._fold_mode = mode

    def fold(self) -> RefLoRALinear:
        """Switch to ``fold_mode="fold"`` and build ``W_ref`` now."""
        self.fold_mode = "fold"
        if self.rank > 0:
            self.folded_weight()
        return self

    def unfold(self) -> RefLoRALinear:
        """Switch to ``fold_mode="unfold"`` and free the cached ``W_ref``."""
        self.fold_mode = "unfold"
        self.invalidate_fold_cache()
        return self

    def invalidate_fold_cache(self) -> None:
        """Drop ``W_ref``; the next folded forward rebuilds it (needed only after changes the
        key does not see: in-place writes through ``.data`` or under ``torch.inference_mode``)."""
        self._fold_cache = None

    def _fold_key(self) -> tuple | None:
        """What ``W_ref`` was built from, in a form that cannot match a different tensor.

        Addresses are reused by the allocator (a Parameter swapped for a new one, or its
        ``.data`` replaced, may land on the freed address with the same version count), so the
        key holds weak references to each Parameter *object* and to its storage: a replaced
        Parameter or storage is dead or different, never equal. Versions catch in-place writes.
        """
        ps = (self.weight, self.lora_A.weight, self.lora_B.weight)
        try:
            versions = tuple(p._version for p in ps)
        except RuntimeError:  # inference tensors have no version counter: never cache
            return None
        try:
            owners = tuple((weakref.ref(p), weakref.ref(p.untyped_storage())) for p in ps)
        except TypeError:  # no weak reference to these objects (e.g. a tensor subclass): no cache
            return None
        return (versions, owners, tuple((p.dtype, p.shape, p.stride(), p.storage_offset()) for p in ps),
                self.weight.device, self.scale)

    def _cache_hit(self, key: tuple | None) -> bool:
        if key is None or self._fold_cache is None:
            return False
        old = self._fold_cache[0]
        # weakref equality compares the referents while both live; a dead one never matches
        same_owners = all(a() is not None and a() is b() and sa() is not None and sa() is sb()
                          for (a, sa), (b, sb) in zip(old[1], key[1]))
        return same_owners and old[0] == key[0] and old[2:] == key[2:]

    def __setattr__(self, name: str, value) -> None:
        # a swapped parameter or adapter invalidates W_ref at once (the key would catch it too)
        if name in ("weight", "lora_A", "lora_B", "alpha", "rank") and "_fold_cache" in self.__dict__:
            self.__dict__["_fold_cache"] = None
        super().__setattr__(name, value)

    @torch.no_grad()
    def folded_weight(self) -> torch.Tensor:
        """``W_ref = W + s B A`` ``[Dout, Din]`` in ``weight.dtype`` (cached, no grad)."""
        if self.rank == 0:
            raise RuntimeError("a rank-0 RefLoRALinear has no adapter to fold")
        key = self._fold_key()
        if self._cache_hit(key):
            return self._fold_cache[1]
        w, a, b = self.weight, self.lora_A.weight, self.lora_B.weight
        if a.dtype == w.dtype and b.dtype == w.dtype:
            w_ref = torch.addmm(w, b, a, alpha=self.scale)  # one rounding (fp32 epilogue)
        else:
            w_ref = torch.addmm(w.float(), b.float(), a.float(), alpha=self.scale).to(w.dtype)
        self._fold_cache = (key, w_ref) if key is not None else None
        return w_ref

    def _needs_param_grads(self) -> bool:
        return torch.is_grad_enabled() and (self.weight.requires_grad or self.lora_A.weight.requires_grad
                                            or self.lora_B.weight.requires_grad)

    def _use_fold(self) -> bool:
        if self._fold_mode == "unfold":
            return False
        if self._fold_mode == "fold":
            if self._needs_param_grads():
                raise RuntimeError(
                    "RefLoRALinear(fold_mode='fold') cannot train: weight/lora_A/lora_B need grads, "
                    "which a folded weight would drop. Use fold_mode='auto' or 'unfold', or run "
                    "under torch.no_grad() / with the parameters frozen.")
            return True
        return RefLoRALinear.AUTO_FOLD_INFERENCE and not self._needs_param_grads()

    def _apply(self, fn, recurse=True):
        self._fold_cache = None  # .to()/.half()/... : the cached W_ref would be stale
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, num_video: int | None = None) -> torch.Tensor:
        """Linear layer with the adapter on the reference rows.

        Args:
            x: ``[B, N, Din]`` (``B`` samples of ``N`` rows), or ``[N, Din]``: one sample.
            num_video: ``Nv`` in ``[0, N]``: rows ``n >= Nv`` of each sample get the adapter.
                None means no reference rows: a plain linear on ``x`` of any shape ``[..., Din]``
                (``nn.Linear``'s contract). With an int, ``x`` must be 2-D or 3-D: any other
                rank raises, since which rows are reference rows would be a guess.
        Returns:
            ``[..., Dout]`` with the leading dims of ``x``.
        """
        x3, num_video = ref_rows_input(x, num_video)
        self._check_input(x)
        if num_video is None or self.rank == 0 or num_video == x3.shape[1]:
            return F.linear(x, self.weight, self.bias)
        return ref_rows_output(x, self._adapted(x3, num_video))

    def _check_input(self, x: torch.Tensor) -> None:
        """The same errors whichever path runs (the plain linear included): a TypeError or
        ValueError naming ``x``, never a raw matmul error."""
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., Din] with Din = in_features = {self.in_features}, "
                             f"got {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but this layer's weight is on {self.weight.device}")
        if x.dtype != self.weight.dtype and not autocast_active(x.device):
            raise TypeError(f"x must have the dtype of this layer's weight ({self.weight.dtype}), got "
                            f"{x.dtype}: cast one of them, or run under torch.autocast")

    def _adapted(self, x: torch.Tensor, num_video: int) -> torch.Tensor:
        """``x [B, N, Din]`` with ``0 <= num_video < N`` and an adapter: ``[B, N, Dout]``."""
        if self._use_fold():
            w_ref = self.folded_weight()
            if resolve_backend(self.backend, x) == "triton":
                from .kernels import ref_folded_linear_triton

                return ref_folded_linear_triton(x, self.weight, w_ref, self.bias, num_video)
            return folded_linear_torch(x, self.weight, w_ref, self.bias, num_video)
        return ref_lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight,
                               self.scale, num_video, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha}, "
                f"fold_mode={self._fold_mode!r}")
