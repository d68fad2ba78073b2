"""Convert the pytorch-fid InceptionV3 weights (a PyTorch state dict) to this project's ``.npz``.

    python -m ncode_jax.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

Reading the ``.pth`` file needs PyTorch (``pip install -e ".[torch]"``); the conversion itself is
plain numpy (:func:`convert_state_dict`). Mapping, for every ``BasicConv2d`` layer ``L`` of the
state dict (torchvision names, e.g. ``Mixed_6b.branch7x7_2``)::

    L.conv.weight       (O, I, kh, kw)  → L/conv/kernel (kh, kw, I, O)
    L.bn.weight                         → L/bn/scale
    L.bn.bias                           → L/bn/bias
    L.bn.running_mean                   → L/bn/mean
    L.bn.running_var                    → L/bn/var

``fc.*`` (the 1008-way classifier), ``AuxLogits.*`` and ``*.num_batches_tracked`` are dropped;
any other key is an error. The result is checked against
:func:`ncode_jax.metrics.inception.inception_param_shapes` before it is written. See
``docs/inception_weights.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

import numpy as np

__all__ = ["convert_state_dict", "main", "read_torch_state_dict"]

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_DROPPED_PREFIXES = ("fc.", "AuxLogits.")


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid / torchvision InceptionV3 state dict (numpy arrays) → flat ``.npz`` arrays."""
    from .inception import _check_flat

    flat: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")  # saved from a DataParallel wrapper
        if key.startswith(_DROPPED_PREFIXES) or key.endswith(".num_batches_tracked"):
            continue
        parts = key.split(".")
        value = np.asarray(value, dtype=np.float32)
        if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight" and value.ndim == 4:
            flat["/".join(parts[:-2]) + "/conv/kernel"] = value.transpose(2, 3, 1, 0)
        elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN:
            flat["/".join(parts[:-2]) + "/bn/" + _BN[parts[-1]]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unexpected entries in the state dict (not an InceptionV3 BasicConv2d conv/bn array): "
            f"{unknown[:8]}{'...' if len(unknown) > 8 else ''}"
        )
    _check_flat(flat, "converted state dict")
    return flat


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a ``.pth`` state dict with PyTorch (tensors only, ``weights_only=True``)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading a .pth file needs PyTorch: pip install -e '.[torch]' (or convert the state dict "
            "to numpy arrays elsewhere and call convert_state_dict)"
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ncode_jax.metrics.convert_inception",
        description="Convert pytorch-fid's InceptionV3 weights (.pth) to the .npz read by "
        "ncode_jax.metrics.inception.load_inception_params.",
    )
    parser.add_argument("input", help="PyTorch state dict, e.g. pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("output", help="output .npz")
    args = parser.parse_args(argv)

    from .inception import load_inception_params, save_inception_params, unflatten_params

    flat = convert_state_dict(read_torch_state_dict(args.input))
    save_inception_params(unflatten_params(flat), args.output)
    load_inception_params(args.output)  # read back through the checked loader
    n = sum(v.size for v in flat.values())
    print(f"wrote {args.output}: {len(flat)} arrays, {n:,} numbers", file=sys.stdout)


if __name__ == "__main__":
    main()
