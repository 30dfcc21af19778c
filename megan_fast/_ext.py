"""Loads the compiled kernels (megan_fast._C), which registers torch.ops.megan_fast.*.

The package stays importable when the extension was not built (for example a
plain source checkout): the ``native`` backend is then unavailable and ``auto``
falls back to the other backends.  ``megan-fast info`` reports why.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from megan_fast import _C  # noqa: F401  (import registers the ops)

    NATIVE_AVAILABLE = True
    NATIVE_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    NATIVE_AVAILABLE = False
    NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
