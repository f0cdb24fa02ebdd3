"""Weights from a file: a trained `final_model.pt` or a compressed artifact, as a checked state_dict."""
from __future__ import annotations

from pathlib import Path

import torch

from pgolf.errors import PgolfError


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a `.pt` file (torch.save of tensors) or any pgolf artifact; one PgolfError
    naming the file for whatever is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: not found")
    if path.suffix == ".pt":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
            raise PgolfError(f"{path}: not a readable state_dict ({type(e).__name__})") from None
    else:
        from pgolf.artifact.qstate import load_artifact

        state = load_artifact(path.read_bytes(), str(path))
    return check_state(state, path)


def check_state(state, path: str | Path) -> dict[str, torch.Tensor]:
    """`state` if it is a dict of tensors by name, else one error naming `path`."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise PgolfError(f"{path}: holds a {type(state).__name__}, not a state_dict of named tensors")
    return state
