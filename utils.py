"""Small helpers shared by the scripts: user-facing errors, atomic writes, jsonl logs, seeding and RNG states,
stopping on a signal, labelled image grids, timing and peak memory."""
import io
import json
import os
import random
import resource
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


def read_jsonl(path: str) -> list[dict]:
    """The records of a jsonl file (one JSON object per line); [] if there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: str, step: int) -> None:
    """Drop the records after `step` (written after the checkpoint a run resumes from)."""
    if os.path.isfile(path):
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(generator: torch.Generator) -> bytes:
    """This process's random states (Python, NumPy, torch CPU and CUDA, and `generator`), serialised with
    torch.save: plain bytes are what ranks can exchange (accelerate's `gather_object` cannot pickle tensors)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
             "torch": torch.get_rng_state(), "loss": generator.get_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def read_rng_state(blob: torch.Tensor) -> dict:
    """A uint8 tensor of `rng_state` bytes (as a checkpoint stores it) -> the dict of states."""
    return torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)


def set_rng_state(blob: torch.Tensor, generator: torch.Generator) -> None:
    """Restore the states `rng_state` saved (`blob` as in `read_rng_state`) into the globals and `generator`."""
    state = read_rng_state(blob)
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loss"])


class StopRequest:
    """SIGINT (Ctrl-C) / SIGTERM inside the `with` block sets `requested` (finish the step, checkpoint, stop);
    a second signal interrupts at once. Only installable from the main thread; elsewhere a no-op."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              "(again to stop at once)", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def load_torch_file(path: str, what: str) -> Any:
    """`torch.load` of a tensors-only file (weights_only: no code runs); an unreadable file is a one-line UserError
    naming `what` and the path."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, pickled objects, not a torch file at all
        raise UserError(f"cannot read {what} {path}: not a tensors-only torch file ({type(e).__name__})") from None


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """`text` broken at spaces into at most `max_lines` lines of at most `width` px ('~' ends a cut line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    lines = lines[:max_lines]
    for i, line in enumerate(lines):
        while draw.textlength(line, font=font) > width and len(line) > 1:
            line = line[:-2] + "~"
        lines[i] = line
    return lines


def save_grid(path: str, columns: Sequence[tuple[str, np.ndarray]], captions: Optional[Sequence[str]] = None,
              rows: Optional[int] = None, min_cell: int = 96, max_cell: int = 256) -> None:
    """A labelled grid PNG: one column per (title, images (N, H, W, 3) uint8) showing its first `rows` images,
    the titles on top ('\n' splits lines) and, given `captions`, row i's caption at its left. Cells are square,
    at least `min_cell` px (small images upscaled by nearest neighbour, so pixels stay visible), at most
    `max_cell` (LANCZOS)."""
    rows = min(rows or len(columns[0][1]), len(columns[0][1]))
    side = columns[0][1].shape[1]
    cell = min(max(side, min_cell), max_cell)
    font = ImageFont.load_default(size=12)
    title_h = 8 + 14 * max(len(title.splitlines()) for title, _ in columns)
    label_w = 200 if captions is not None else 0
    pitch = cell + 2  # a 2 px white line between cells
    grid = Image.new("RGB", (label_w + pitch * len(columns), title_h + pitch * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, (title, images) in enumerate(columns):
        lines = [_wrap(draw, line, font, cell - 8, 1)[0] for line in title.splitlines() if line.strip()]
        draw.multiline_text((label_w + c * pitch + 4, 4), "\n".join(lines), fill="black", font=font, spacing=2)
        for r in range(rows):
            tile = Image.fromarray(images[r])
            if side != cell:
                tile = tile.resize((cell, cell), Image.NEAREST if side < cell else Image.LANCZOS)
            grid.paste(tile, (label_w + c * pitch, title_h + r * pitch))
    for r, text in enumerate((captions or [])[:rows]):
        lines = _wrap(draw, text, font, label_w - 10, max(1, (cell - 8) // 14))
        draw.multiline_text((4, title_h + r * pitch + 4), "\n".join(lines), fill="black", font=font, spacing=2)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Mean wall time of fn() in seconds, after `warmup` untimed calls, synchronising the device."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident memory on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def release_memory() -> None:
    """Hand freed memory back to the system between the stages of one long process (the notebook): Python's
    garbage, CUDA's cached blocks and, on glibc, the freed heap it would otherwise keep resident (malloc_trim)."""
    import ctypes
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
