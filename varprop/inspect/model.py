"""What replicate r runs: the model (a factory called, or an instance copied and re-initialised) and its
inputs and upstream gradient, each drawn under a generator seeded from varprop's tree; and the refusals
of what cannot be run (a device, an input shape, a factory that fails)."""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np

from ..errors import SpecError
from ..montecarlo.seeds import generator
from ..nn import inits
from . import load_torch


def load_model(ref: str, option: str = "model") -> Callable[..., Any]:
    """The callable ``"package.module:attribute"`` names (found from the working directory too)."""
    try:
        return inits.load_callable(ref)
    except ValueError as exc:
        raise SpecError(option, str(exc)) from None


def seed_of(seed: int, replicate: int, block: int) -> int:
    """A torch seed from varprop's tree: block 0 draws the model, block 1 the forward pass (dropout)."""
    return int(generator(seed, replicate, 0, "weights", block).integers(2**63))


def fork_rng(torch: Any, device: Any) -> Any:
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def error_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def build(model: Any, replicate: int, seed: int, device: Any, args: tuple = ()) -> Any:
    """Replicate r's model: the factory called (or the instance copied and every module's
    reset_parameters() called) under torch's generators seeded from the tree, restored afterwards."""
    torch = load_torch()
    with fork_rng(torch, device):
        torch.manual_seed(seed_of(seed, replicate, 0))
        if isinstance(model, torch.nn.Module):
            try:
                built = copy.deepcopy(model)
            except Exception as exc:
                raise SpecError("model", f"cannot copy the model to re-initialise it ({error_line(exc)}); "
                                "pass a factory that makes it instead") from exc
            for m in built.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
        else:
            try:
                built = model(*args)
            except (Exception, SystemExit) as exc:  # the user's code: one line with its message
                hint = " (--width-sweep calls it with the width)" if args and isinstance(exc, TypeError) else ""
                raise SpecError("model", f"{callable_name(model)}({', '.join(map(repr, args))}) "
                                + (f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else
                                   f"raised {error_line(exc)}") + hint) from exc
    if not isinstance(built, torch.nn.Module):
        raise SpecError("model", f"{callable_name(model)} returned {type(built).__name__}, not a torch.nn.Module")
    try:
        return built.to(device)
    except Exception as exc:
        raise SpecError("device", f"cannot move the model to {device} ({error_line(exc)})") from exc


def callable_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def not_reset(model: Any) -> list[str]:
    """Parameters of an instance that no reset_parameters() re-draws (the same in every replicate)."""
    covered = set()
    for m in model.modules():
        if callable(getattr(m, "reset_parameters", None)):
            covered.update(id(p) for p in m.parameters())
    return [n for n, p in model.named_parameters() if id(p) not in covered]


def parse_device(device: Any) -> Any:
    torch = load_torch()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SpecError("device", f"expected cpu, cuda or cuda:N, got {device!r} ({error_line(exc)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("device", f"CUDA was requested but this PyTorch ({torch.__version__}) sees no GPU; "
                        "use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SpecError("device", "MPS was requested but is not available; use --device cpu")
    return dev


def make_input(torch: Any, shape: tuple[int, ...], inputs: np.ndarray | None, seed: int, replicate: int,
                dtype: Any, device: Any) -> Any:
    if inputs is not None:
        x = torch.from_numpy(np.ascontiguousarray(inputs))
        return x.to(device, dtype if x.is_floating_point() else torch.int64)
    x = inits.standard_normal(generator(seed, replicate, 0, "inputs"), shape, np.float32)
    return torch.from_numpy(x).to(device, dtype)


def upstream(torch: Any, out: Any, seed: int, replicate: int, k: int) -> Any:
    """The N(0, 1) gradient entering the k-th floating output (simulate's g_L)."""
    g = inits.standard_normal(generator(seed, replicate, 0, "upstream", k), tuple(out.shape), np.float32)
    return torch.from_numpy(g).to(out.device, out.dtype)


def first_dtype(model: Any, torch: Any) -> Any:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())

