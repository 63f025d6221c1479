"""Count the GPU memory of one CD training step (train.py) for a full student and LoRA students, per batch size,
with and without --grad-checkpointing. Nothing is allocated or computed: the networks are fake tensors (shapes
and dtypes only, torch's FakeTensorMode), so the 1.16B-parameter MicroDiT_XL_2 is counted on any machine.

    python bench_memory.py                                  # MicroDiT_XL_2 at 512 px, bf16: BENCHMARKS.md
    python bench_memory.py --preset tiny --lora-rank 0 8 --batch-size 32 64
    python bench_memory.py --dtype fp32 --precision fp32 --lora-rank 32 --batch-size 1 2   # train.py on the CPU
    python bench_memory.py --dmd                            # + the students of the one-step recipe (DMD)
    python bench_memory.py --scm                            # + the full students of --recipe scm and rcm
    python bench_memory.py --dmd --fsdp 2 4 8               # + the full students sharded over 2, 4, 8 GPUs

Counted, by default in the dtypes of a GPU run (teacher --dtype bf16, --precision bf16 autocast):
- weights and state: the teacher; a full student's fp32 weights, gradients, AdamW moments, EMA target and slow
  EMA; a LoRA student's base is the teacher itself, and the rest is adapters (three copies, one trained).
- with --dmd (train.py --dmd-weight): the fake denoiser's fp32 weights, gradients and AdamW moments (a full copy,
  or for a LoRA student a second adapter), and twice the activations (fixed and per sample): DMD's backward keeps
  the student's 1-step forward and the fake's training forward at once (CD's own backward comes first and has
  freed its activations).
- with --fsdp N (train.py --fsdp over N GPUs, full students): per GPU, 1/N of the trained networks' state (student,
  EMA target, slow EMA, fake) and the whole teacher, plus FSDP's gathered working set: fp32 weights of three blocks
  (the one computing, the one prefetched, one block's unsharded gradients before its reduce-scatter) and the root's
  own parameters (embedders, final layer) of two networks, which FSDP2 keeps gathered between forward and backward;
  the activations are those of one GPU's batch, as without sharding.
- activations: the tensors autograd keeps for the student's backward after one forward (saved_tensors_hooks, each
  storage once, parameters excluded), at batch 1 and 2, split into a part per sample and a fixed part (the
  autocast bf16 copies of fp32 weights). Attention is counted as the fused kernels keep it (q, k, v, output,
  logsumexp), not as the T x T matrix of the math path. With gradient checkpointing: what is kept outside the
  blocks, every block's input, and the largest block's saved tensors (the backward recomputes one at a time).
- with --scm (train.py --recipe scm / rcm): no EMA target (theta^- is the online student), the student's forward
  kept for its backward as in CD, and for the forward-mode JVP (--jvp forward) the math SDPA path's attention
  scores and probabilities with their tangents in the widest block, per sample (`jvp_attention_bytes`); the
  finite-difference JVP runs two no-grad forwards with the fused kernels (not counted, as the teacher's).
Not counted: the CUDA context and allocator slack (~0.5-1 GiB), the no-grad working memory of the teacher's
guided passes (batch 2B) and the target's, and the backward's transient gradients: leave room for them.
CPU autocast stands in for CUDA's: matmuls run in bf16 on both, but CUDA's LayerNorm outputs fp32 where the CPU's
keeps its input dtype, so the residual stream's normalised copies may count up to twice here.
"""
import argparse
from typing import Optional
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import microdit
from lora import add_adapters
from pipeline import DTYPES, PRESETS, get_preset
from recipes import PRECISIONS, state_bytes
from utils import run_cli

GIB = 2**30


class FusedAttentionStandIn(torch.autograd.Function):
    """What the fused SDPA kernels keep for the backward: q, k, v, the output, a float32 logsumexp (B, H, T)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def meta_student(preset_name: str, lora_rank: int, teacher_dtype: torch.dtype):
    """(network to call, the DiT, trained parameters, teacher parameters) on the meta device: a full fp32
    student, or the teacher in `teacher_dtype` with LoRA adapters of `lora_rank` (peft works on meta tensors)."""
    preset = get_preset(preset_name)
    with torch.device("meta"):
        dit = getattr(microdit, preset.dit_arch)(**preset.dit_kwargs)
    dit = dit.to(device="meta", dtype=torch.float32 if lora_rank == 0 else teacher_dtype)
    params = sum(p.numel() for p in dit.parameters())
    if lora_rank == 0:
        return dit, dit, params, params
    # the target and slow-EMA adapters only add their weights (counted in memory_row), not activations
    adapters = add_adapters(dit.requires_grad_(False), ["student"], lora_rank, float(lora_rank))
    return adapters["student"], dit, sum(p.numel() for p in adapters["student"].parameters()), params


def saved_bytes(net, dit, preset_name: str, batch: int, precision: str = "bf16") -> tuple[int, list[int], list[int]]:
    """One student forward at `batch` (under `precision`'s autocast, or in float32 for "fp32"): (bytes saved
    outside the transformer blocks, bytes saved inside each block, bytes of each block's input x)."""
    preset = get_preset(preset_name)
    blocks = dit.transformer_blocks()
    params = {p.untyped_storage()._cdata for p in dit.parameters()}  # a LoRA adapter's factors are the DiT's too
    seen, current, outside, inside, inputs = set(), [None], [0], [0] * len(blocks), [0] * len(blocks)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in seen and key not in params:
            seen.add(key)
            size = t.untyped_storage().nbytes()
            if current[0] is None:
                outside[0] += size
            else:
                inside[current[0]] += size
        return t

    def enter(i: int):
        def hook(module, args):
            current[0], inputs[i] = i, args[0].numel() * args[0].element_size()
        return hook

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda *_: current.__setitem__(0, None)) for b in blocks]
    x = torch.randn(batch, *preset.latent_shape)
    t, y = torch.randn(batch), torch.randn(batch, 1, 77, preset.dit_kwargs["caption_channels"])
    sdpa = lambda q, k, v: FusedAttentionStandIn.apply(q, k, v)  # noqa: E731
    autocast = torch.autocast("cpu", PRECISIONS[precision] or torch.float32, enabled=precision != "fp32")
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", sdpa), autocast, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, t, y)
    for h in handles:
        h.remove()
    return outside[0], inside, inputs


def jvp_attention_bytes(dit: torch.nn.Module, preset_name: str, precision: str) -> int:
    """Per sample, what a forward-mode JVP on the math SDPA path holds at once in the widest self-attention: the
    scores and the probabilities (H, T, T), each with its tangent, in the autocast dtype (a transient of the no-grad
    JVP, on top of the student's saved activations; T = the image tokens)."""
    preset = get_preset(preset_name)
    tokens = (preset.latent_shape[1] // preset.dit_kwargs.get("patch_size", 2)) ** 2
    heads = max(m.qkv.out_features // 3 // m.head_dim for m in dit.modules() if isinstance(m, microdit.SelfAttention))
    return 4 * heads * tokens**2 * (2 if precision == "bf16" else 4)


def fsdp_gathered_bytes(dit: torch.nn.Module) -> int:
    """FSDP's gathered working set per GPU (module docstring): fp32 weights of three of the largest blocks and the
    root's own parameters of two networks."""
    blocks = dit.transformer_blocks()
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    root = sum(p.numel() for p in dit.parameters()) - sum(sizes)
    return 4 * (3 * max(sizes) + 2 * root)


def memory_row(preset_name: str, lora_rank: int, teacher_dtype: torch.dtype, checkpointing: bool,
               precision: str = "bf16", dmd: bool = False, scm: Optional[str] = None, gpus: int = 1) -> dict:
    """GiB per GPU of the persistent state, the fixed activations and the activations per sample of one
    configuration (`dmd`: with the fake denoiser of train.py --dmd-weight; `scm`: train.py --recipe scm with --jvp
    `scm`, no EMA target and, for 'forward', the JVP's attention matrices per sample; `gpus` > 1: train.py --fsdp
    over that many; see the module docstring)."""
    net, dit, trained, base = meta_student(preset_name, lora_rank, teacher_dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        dit.to_empty(device="cpu")  # fake tensors in place of the meta ones (the same Parameter objects)
        counts = []
        for batch in (1, 2):
            outside, inside, inputs = saved_bytes(net, dit, preset_name, batch, precision)
            counts.append(outside + (sum(inputs) + max(inside) if checkpointing else sum(inside)))
    per_sample = counts[1] - counts[0]
    jvp = jvp_attention_bytes(dit, preset_name, precision) if scm == "forward" else 0
    # EMA target (not sCM's) and slow EMA; DMD's fake a trained copy or adapter; FSDP shards the trained state
    weights = state_bytes(base, trained, teacher_dtype, averages=1 if scm else 2, fake=dmd, shards=gpus)
    weights += fsdp_gathered_bytes(dit) if gpus > 1 else 0
    kind = (f"LoRA rank {lora_rank}" if lora_rank else "full") + (f" sCM ({scm} JVP)" if scm else "") \
        + (" + DMD" if dmd else "") + (f", FSDP over {gpus} GPUs" if gpus > 1 else "")
    copies = 2 if dmd else 1  # DMD's backward keeps two forwards of full-size networks (module docstring)
    return dict(student=kind, checkpointing=checkpointing, trained=trained, weights_gib=weights / GIB,
                fixed_gib=copies * (counts[0] - per_sample) / GIB,
                per_sample_gib=max(copies * per_sample, per_sample + jvp) / GIB)  # DMD's backward comes after sCM's


def total_gib(row: dict, batch: int) -> float:
    return row["weights_gib"] + row["fixed_gib"] + batch * row["per_sample_gib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="microdit-xl-512", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="the teacher's (and LoRA base's) dtype")
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS),
                        help="train.py's --precision: bf16 or fp16 autocast (GPU) or float32 throughout (its CPU "
                        "default)")
    parser.add_argument("--lora-rank", type=int, nargs="+", default=[0, 8, 32], help="0: the full student")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--dmd", action="store_true", help="also count each --lora-rank's student with the DMD fake "
                        "denoiser")
    parser.add_argument("--fsdp", type=int, nargs="*", default=[], metavar="GPUS", help="also count the full student "
                        "(with --dmd: and its DMD version) sharded over each of these GPU counts")
    parser.add_argument("--scm", action="store_true", help="also count the full student of --recipe scm (both "
                        "--jvp) and rcm (sCM + DMD, forward JVP)")
    args = parser.parse_args()

    rows = [memory_row(args.preset, rank, DTYPES[args.dtype], ckpt, args.precision) for rank in args.lora_rank
            for ckpt in (False, True)]
    rows += [memory_row(args.preset, rank, DTYPES[args.dtype], ckpt, args.precision, dmd=True)
             for rank in args.lora_rank for ckpt in (False, True)] if args.dmd else []
    rows += [memory_row(args.preset, 0, DTYPES[args.dtype], ckpt, args.precision, dmd=dmd, gpus=gpus)
             for dmd in ((False, True) if args.dmd else (False,)) for gpus in args.fsdp for ckpt in (False, True)]
    rows += [memory_row(args.preset, 0, DTYPES[args.dtype], ckpt, args.precision, dmd=dmd, scm=jvp)
             for jvp, dmd in (("forward", False), ("finite-difference", False), ("forward", True))
             for ckpt in (False, True)] if args.scm else []
    print(f"{args.preset}, teacher {args.dtype}, precision {args.precision}: GiB per GPU counted by bench_memory.py")
    print("| student | grad ckpt | trained params | weights + state | fixed act. | act. / sample | "
          + " | ".join(f"total, batch {b}" for b in args.batch_size) + " |")
    print("|---" * (6 + len(args.batch_size)) + "|")
    for r in rows:
        print(f"| {r['student']} | {'yes' if r['checkpointing'] else 'no'} | {r['trained'] / 1e6:.1f}M | "
              f"{r['weights_gib']:.2f} | {r['fixed_gib']:.2f} | {r['per_sample_gib']:.3f} | "
              + " | ".join(f"{total_gib(r, b):.1f}" for b in args.batch_size) + " |")


if __name__ == "__main__":
    run_cli(main)
