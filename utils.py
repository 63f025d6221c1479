"""Small helpers shared by the scripts: user-facing errors, atomic writes, seeding."""
import json
import os
import random
import sys
import tempfile
from typing import Any, Callable

import numpy as np
import torch


class UserError(Exception):
    """Bad input or a missing file: the message is one line, shown to the user as is (no traceback)."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's `main`; a `UserError` becomes `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def first_line(e: BaseException) -> str:
    """"ExcType: first line of the message": an exception folded into a one-line UserError."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def atomic_write(path: str, write_fn: Callable[[str], None]) -> None:
    """Write `path` all-or-nothing: `write_fn(tmp)` writes a temp file in the same folder, then it is renamed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
