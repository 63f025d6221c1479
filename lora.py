"""LoRA students (Hu et al. 2021, arXiv 2106.09685) as in LCM-LoRA (Luo et al. 2023, arXiv 2311.05556): one copy of
the teacher's DiT carries peft adapters for the student, its EMA target, its slow EMA and (--dmd-weight) DMD's
fake denoiser, and `Adapter` makes each of them (and the teacher: no adapter) a network of its own, so train.py
distils with the base weights held once.

Adapted layers (LORA_TARGETS): in every DiT block of the backbone and the patch mixer, the self-attention's qkv and
output projections, the cross-attention's q, kv and output projections, the dense SwiGLU FFN's w1, w2, w3 and the
adaLN modulation; the final layer's modulation and projection; the timestep embedder's MLP. The modulations and
the timestep path are what makes the network behave differently at one noise level than at another, which a
1-step student needs at sigma_max (without them a rank-32 student did not take DMD's 1-step gain on the shapes lab,
BENCHMARKS.md). The expert-choice MoE FFNs (expert tensors, not Linear layers), their gates, the caption embedders
and blocks keep the teacher's weights.
"""
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch
from peft import LoraConfig
from peft.functional import cast_adapter_dtype, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

LORA_TARGETS = (r"(blocks|patch_mixer)\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|mlp\.w[123]|"
                r"adaLN_modulation\.1)|final_layer\.(adaLN_modulation\.1|linear)|t_embedder\.mlp\.[02]")


def select_adapter(dit: nn.Module, name: Optional[str]) -> Optional[str]:
    """Make adapter `name` (None: none, the teacher) the one every LoRA layer of `dit` applies; returns the one
    selected before (nothing is done if it is the same).

    peft's own switches (set_adapter, enable_adapters) also reset requires_grad of every adapter's factors, which
    would drop the gradient of an adapter whose forward ran before another was selected (two trainable adapters,
    the student and DMD's fake, run in one step) and which torch.func.jvp refuses inside its function: so the two
    attributes those switches set are set here, and requires_grad is set once (`add_adapters`)."""
    before = getattr(dit, "lora_selected", ())
    if before != (name,):
        object.__setattr__(dit, "lora_selected", (name,))
        for layer in lora_layers(dit).values():
            layer._disable_adapters = name is None
            if name is not None:
                layer._active_adapter = [name]
    return before[0] if before else None


def lora_layers(dit: nn.Module) -> dict[str, LoraLayer]:
    """{module name: LoRA layer} of `dit`, listed once."""
    if "lora_layer_list" not in dit.__dict__:
        object.__setattr__(dit, "lora_layer_list", {n: m for n, m in dit.named_modules() if isinstance(m, LoraLayer)})
    return dit.lora_layer_list


def recompute_context(dit: nn.Module) -> Callable[[], tuple[ContextManager, ContextManager]]:
    """torch.utils.checkpoint's context_fn for a block of `dit`: its recomputation in the backward pass runs with
    the adapter that was selected in its forward (another network may have run on the shared DiT since)."""
    def context_fn() -> tuple[ContextManager, ContextManager]:
        at_forward = getattr(dit, "lora_selected", (None,))[0]

        @contextmanager
        def recompute() -> Iterator[None]:
            before = select_adapter(dit, at_forward)
            try:
                yield
            finally:
                select_adapter(dit, before)
        return nullcontext(), recompute()
    return context_fn


class Adapter(nn.Module):
    """The shared DiT run with one named adapter, or with none (`name` None: the base network, the teacher).

    Its parameters and state dict are that adapter's LoRA factors only (keys "<layer>/lora_A", "/" for "."), so it
    is optimised, EMA-updated (`cd_utils.ema_update`) and checkpointed as a whole network would be. Each call first
    selects its adapter (`select_adapter`), so a call runs the network it stands for whatever ran before; the
    backward pass needs no selection (gradient checkpointing recomputes a block with the adapter of its forward:
    `recompute_context`).
    """

    def __init__(self, dit: nn.Module, name: Optional[str]):
        super().__init__()
        object.__setattr__(self, "dit", dit)  # not a submodule: .to(), parameters() and state_dict() skip the base
        self.name = name
        self.layers = list(lora_layers(dit).items())
        self.factors = nn.ParameterDict({} if name is None else {
            f"{layer_name}.{factor}".replace(".", "/"): getattr(m, factor)[name].weight
            for layer_name, m in self.layers for factor in ("lora_A", "lora_B")})

    def select(self) -> None:
        """Make this adapter (or none) the one every LoRA layer of the DiT applies."""
        select_adapter(self.dit, self.name)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        self.select()
        return self.dit(*args, **kwargs)

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The factors in peft's file layout: "<layer>.lora_A.weight" (rank, in), "<layer>.lora_B.weight"
        (out, rank)."""
        return {key.replace("/", ".") + ".weight": p.detach() for key, p in self.factors.items()}


def add_adapters(dit: nn.Module, names: list[str], rank: int, alpha: float,
                 trainable: Sequence[str] = ("student",)) -> dict[Optional[str], Adapter]:
    """Inject one LoRA adapter per name into `dit` (float32 whatever the DiT's dtype, dropout 0) and return
    {name: Adapter} plus {None: the teacher}. The adapters in `trainable` (the student; DMD's fake) get
    requires_grad; every other one starts as a copy of names[0] (the target and slow EMA of the student).

    peft's initialisation: A Kaiming-uniform (from the global torch RNG), B = 0, so each adapter's network starts
    equal to the teacher. The update of a layer is (alpha / rank) B A (Hu et al. 2021, eq. 3).
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
    for name in names:
        with warnings.catch_warnings():  # peft warns that a second adapter makes a multi-adapter model: it does
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, dit, adapter_name=name)
        cast_adapter_dtype(dit, name)  # peft casts new adapters to the base layer's dtype; train them in fp32
    dit.__dict__.pop("lora_layer_list", None)
    adapters = {name: Adapter(dit, name) for name in names}
    with torch.no_grad():
        for name in names:
            adapters[name].requires_grad_(name in trainable)
            if name not in trainable:
                for p, source in zip(adapters[name].parameters(), adapters[names[0]].parameters(), strict=True):
                    p.copy_(source)
    adapters[names[0]].select()
    return {**adapters, None: Adapter(dit, None)}
