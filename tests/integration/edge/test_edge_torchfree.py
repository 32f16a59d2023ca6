"""Without torch, Codec.decode says what it returns and which call is torch-free (issue 31
item 8), in a subprocess where importing torch fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

NO_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is not installed here ({name})")
        return None
sys.meta_path.insert(0, _NoTorch())
"""


def test_decode_without_torch_names_decode_numpy():
    code = NO_TORCH + textwrap.dedent(
        """
        import numpy as np
        from splitinfer.compression import get_codec
        from splitinfer.errors import CodecError
        codec = get_codec("f32")
        blob = codec.encode([np.ones((1, 4), dtype=np.float32)])
        assert codec.decode_numpy(blob)[0].sum() == 4
        try:
            codec.decode(blob)
        except CodecError as exc:
            print(exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (
        "returns torch tensors" in done.stdout and "decode_numpy(blob) is the torch-free call" in done.stdout
    )
