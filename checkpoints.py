"""train.py's checkpoints: everything a run needs to continue exactly (networks, optimizer, schedule, fp16 loss
scale, every process's RNG states), written atomically, the last few kept.

Two formats in OUT_DIR/checkpoints:
    ckpt_NNNNNN.pt    one torch file written by the main process (one process, or DDP: every rank holds it all)
    ckpt_NNNNNN.dcp/  a torch.distributed.checkpoint folder (--fsdp): every rank writes its own shards of the
                      student, its EMAs, the fake denoiser and the AdamW moments, so no rank gathers the whole
                      state; state.pt beside them holds the rest (step, RNG states, schedule)
A run resumes with as many processes as wrote the checkpoint: the data and noise streams depend on that number.
"""
import argparse
import dataclasses
import os
import shutil
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule

from cd_utils import CDConfig
from utils import UserError, atomic_write, first_line, load_torch_file, rng_state

CKPT_DIR = "checkpoints"
SHARDED_STATE_FILE = "state.pt"  # in a sharded checkpoint's folder: step, RNG states, schedule, loss scale
TRAINED = ("student", "weighting", "fake")  # the networks the optimizer updates, in its parameter order


def checkpoint_path(out_dir: str, step: int, sharded: bool = False) -> str:
    return os.path.join(out_dir, CKPT_DIR, f"ckpt_{step:06d}.{'dcp' if sharded else 'pt'}")


def list_checkpoints(out_dir: str) -> list[str]:
    """Checkpoint paths (files and sharded folders) in OUT_DIR/checkpoints, oldest first."""
    folder = os.path.join(out_dir, CKPT_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.startswith("ckpt_") and n.endswith((".pt", ".dcp")))


def resolve_resume(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh run (which must not clobber existing checkpoints)."""
    existing = list_checkpoints(args.out_dir)
    if args.resume is None:
        if existing:
            raise UserError(f"{args.out_dir} already has checkpoints: pass --resume auto to continue them, or "
                            "choose another --out-dir")
        return None
    if args.resume == "auto":
        path = existing[-1] if existing else None
    elif not os.path.exists(args.resume):
        raise UserError(f"checkpoint not found: {args.resume}")
    else:
        path = args.resume
    if path is not None and path.endswith(".dcp") != bool(args.fsdp):
        raise UserError(f"{path} was written {'with' if path.endswith('.dcp') else 'without'} --fsdp: resume it "
                        "the same way")
    return path


def is_sharded(nets: dict) -> bool:
    return isinstance(nets["student"], FSDPModule)


def save_checkpoint(accelerator: Accelerator, out_dir: str, step: int, nets: dict, optim: dict,
                    gen: torch.Generator, cd: CDConfig, keep: int) -> str:
    """`nets` ({"student", "target", "ema", "fake", "weighting"}: module or None), `optim` ({"optimizer",
    "scheduler", "scaler"}) and every process's RNG states at `step`, written atomically (to a temporary name, then
    renamed); all but the newest `keep` checkpoints are deleted. Every process calls it."""
    sharded = is_sharded(nets)
    path = checkpoint_path(out_dir, step, sharded)
    rngs = gather_object([rng_state(gen)])
    state = dict(step=step, world_size=accelerator.num_processes, cd=dataclasses.asdict(cd),
                 rng=[torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in rngs],
                 **{k: v.state_dict() for k, v in optim.items() if not (sharded and k == "optimizer")})
    if sharded:  # the sharded tensors through DCP, every process its own; the rest as in a .pt, from the main one
        tmp = f"{path}.tmp"
        if accelerator.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)  # a save that was killed
        accelerator.wait_for_everyone()
        dcp.save(_sharded_state(nets, optim["optimizer"]), checkpoint_id=tmp)
        if accelerator.is_main_process:
            torch.save(state, os.path.join(tmp, SHARDED_STATE_FILE))
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
    elif accelerator.is_main_process:
        state.update({k: net.state_dict() if net is not None else None for k, net in nets.items()})
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    if accelerator.is_main_process:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(path: str, world: int, nets: dict, optim: dict) -> tuple[int, list[torch.Tensor]]:
    """Restore `nets` and `optim` (optimizer, schedule, fp16 loss scaler) from `path`; returns (step, every
    process's RNG blob, uint8 tensors). Under --fsdp every process calls it and reads its own shards."""
    if path.endswith(".dcp"):
        return _load_sharded(path, world, nets, optim)
    ckpt = load_torch_file(path, "checkpoint")
    _check_world(path, ckpt["world_size"], world)
    for key, net in nets.items():
        if net is not None:
            if ckpt[key] is None:
                raise UserError(f"{path} has no {key} network: resume with the same --target-decay/--ema")
            try:
                net.load_state_dict(ckpt[key])
            except RuntimeError as e:
                raise UserError(f"{path} does not fit this run's {key} network ({first_line(e)[:200]}): resume "
                                "with the same --preset and --lora-rank") from None
    for key, obj in optim.items():
        try:
            obj.load_state_dict(ckpt.get(key, {}))
        except RuntimeError:  # the fp16 scaler's state from a run in another --precision
            raise UserError(f"{path} has no {key} state of this run: resume with the same --precision") from None
    return ckpt["step"], ckpt["rng"]


def _check_world(path: str, saved: int, world: int) -> None:
    if saved != world:
        raise UserError(f"{path} was written by {saved} processes; resume it with as many (now {world}) to continue "
                        "the same data and noise streams")


def _load_sharded(path: str, world: int, nets: dict, optim: dict) -> tuple[int, list[torch.Tensor]]:
    state = load_torch_file(os.path.join(path, SHARDED_STATE_FILE), "checkpoint state")
    _check_world(path, state["world_size"], world)
    shards = _sharded_state(nets, optim["optimizer"])  # filled in place by dcp.load
    try:
        dcp.load(shards, checkpoint_id=path)
    except Exception as e:  # a network this checkpoint does not hold, or of other shapes
        raise UserError(f"{path} does not fit this run ({first_line(e)[:200]}): resume with the same --preset, "
                        "--target-decay, --ema and --dmd-weight") from None
    for key, net in nets.items():
        if net is not None:
            set_model_state_dict(net, shards[key])
    set_optimizer_state_dict(trained_networks(nets), optim["optimizer"], shards["optimizer"])
    for key, obj in optim.items():
        if key != "optimizer":
            obj.load_state_dict(state.get(key, {}))
    return state["step"], state["rng"]


def _sharded_state(nets: dict, optimizer: torch.optim.Optimizer) -> dict:
    """What DCP saves and loads of a sharded run: every network's and the optimizer's state dicts, this process's
    shards."""
    return dict(optimizer=get_optimizer_state_dict(trained_networks(nets), optimizer),
                **{k: get_model_state_dict(net) for k, net in nets.items() if net is not None})


def trained_networks(nets: dict) -> nn.ModuleDict:
    """The networks the optimizer updates, as one module (the optimizer's parameters get their names from it)."""
    return nn.ModuleDict({k: nets[k] for k in TRAINED if nets.get(k) is not None})


def full_network(net: nn.Module, make: Callable[[], nn.Module], is_main: bool,
                 device: torch.device) -> Optional[nn.Module]:
    """`net` whole on the main process: itself, or for an FSDP-sharded one a plain copy on `device` (`make()`
    builds the module; the weights are gathered from every process through the CPU, so every process calls this)
    and None elsewhere. For validation and the exported student file."""
    if not isinstance(net, FSDPModule):
        return net
    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    whole = make()
    whole.load_state_dict(state)
    return whole.to(device).eval().requires_grad_(False)
