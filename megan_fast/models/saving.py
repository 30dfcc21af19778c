"""Writing a model folder: ``config.json`` and ``model.safetensors`` (docs/DESIGN.md sections 3 and 5).

The folder is what :func:`megan_fast.models.load_model` and every
``--checkpoint`` read.  Nothing here decides where a user's files may be
written: the commands check their outputs and write through
:mod:`megan_fast.outputs` (a temporary folder renamed into place), and pass
their mark (``written_by``), which both files carry.
"""

from __future__ import annotations

import json
import os
import re

from torch import Tensor, nn

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model: nn.Module, directory: str | os.PathLike, written_by: str | None = None) -> None:
    """Writes ``model``'s config (``model.config_dict()``) and weights into ``directory`` (created if needed).

    ``written_by``: a mark put in both files, in the config as a ``written_by`` entry (which the reader drops)
    and in the safetensors header's metadata.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", **({"written_by": written_by} if written_by else {})}
    _save_safetensors(state, os.path.join(directory, WEIGHTS_NAME), meta)
    config = {**model.config_dict(), **({"written_by": written_by} if written_by else {})}
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2) + "\n")


def _save_safetensors(state: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``; a failed write (a full disk) is the OSError it is, not a SafetensorError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(state, path, metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        errno_ = int(code.group(1))
        raise OSError(errno_, os.strerror(errno_), path) from None
