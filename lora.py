"""LoRA students (Hu et al. 2021, arXiv 2106.09685) as in LCM-LoRA (Luo et al. 2023, arXiv 2311.05556): one copy of
the teacher's DiT carries peft adapters for the student, its EMA target and its slow EMA, and `Adapter` makes each
of them (and the teacher: no adapter) a network of its own, so train.py distils with the base weights held once.

Adapted layers (LORA_TARGETS): in every DiT block of the backbone and the patch mixer, the self-attention's qkv and
output projections, the cross-attention's q, kv and output projections and the dense SwiGLU FFN's w1, w2, w3. The
expert-choice MoE FFNs (expert tensors, not Linear layers), their gates, the adaLN modulations, the embedders, the
caption blocks and the final layer keep the teacher's weights.
"""
import warnings
from typing import Optional

import torch
from peft import LoraConfig
from peft.functional import cast_adapter_dtype, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

LORA_TARGETS = r"(blocks|patch_mixer)\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|mlp\.w[123])"


class Adapter(nn.Module):
    """The shared DiT run with one named adapter, or with none (`name` None: the base network, the teacher).

    Its parameters and state dict are that adapter's LoRA factors only (keys "<layer>/lora_A", "/" for "."), so it
    is optimised, EMA-updated (`cd_utils.ema_update`) and checkpointed as a whole network would be. Each call first
    makes its adapter the active one in every LoRA layer (peft's set_adapter, which also gives requires_grad to the
    trainable adapter alone), so a call runs the network it stands for whatever ran before, and the state stays
    in place for the backward pass (gradient checkpointing recomputes the student's blocks there).
    """

    def __init__(self, dit: nn.Module, name: Optional[str], trainable: bool = False):
        super().__init__()
        object.__setattr__(self, "dit", dit)  # not a submodule: .to(), parameters() and state_dict() skip the base
        self.name, self.trainable = name, trainable
        self.layers = [(layer_name, m) for layer_name, m in dit.named_modules() if isinstance(m, LoraLayer)]
        self.factors = nn.ParameterDict({} if name is None else {
            f"{layer_name}.{factor}".replace(".", "/"): getattr(m, factor)[name].weight
            for layer_name, m in self.layers for factor in ("lora_A", "lora_B")})

    def select(self) -> None:
        """Make this adapter (or none) the one every LoRA layer of the DiT applies (nothing to do if it is)."""
        if getattr(self.dit, "selected_adapter", ()) == (self.name,):
            return
        object.__setattr__(self.dit, "selected_adapter", (self.name,))
        for _, layer in self.layers:
            layer.enable_adapters(self.name is not None)
            if self.name is not None:
                layer.set_adapter(self.name, inference_mode=not self.trainable)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        self.select()
        return self.dit(*args, **kwargs)

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The factors in peft's file layout: "<layer>.lora_A.weight" (rank, in), "<layer>.lora_B.weight"
        (out, rank)."""
        return {key.replace("/", ".") + ".weight": p.detach() for key, p in self.factors.items()}


def add_adapters(dit: nn.Module, names: list[str], rank: int, alpha: float) -> dict[Optional[str], Adapter]:
    """Inject one LoRA adapter per name into `dit` (float32 whatever the DiT's dtype, dropout 0) and return
    {name: Adapter} plus {None: the teacher}; names[0] is the trainable one and every other starts as a copy of it.

    peft's initialisation: A Kaiming-uniform (from the global torch RNG), B = 0, so each adapter's network starts
    equal to the teacher. The update of a layer is (alpha / rank) B A (Hu et al. 2021, eq. 3).
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
    for i, name in enumerate(names):
        with warnings.catch_warnings():  # peft warns that a second adapter makes a multi-adapter model: it does
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, dit, adapter_name=name)
        cast_adapter_dtype(dit, name)  # peft casts new adapters to the base layer's dtype; train them in fp32
    adapters = {name: Adapter(dit, name, trainable=i == 0) for i, name in enumerate(names)}
    with torch.no_grad():
        for name in names[1:]:
            for p, source in zip(adapters[name].parameters(), adapters[names[0]].parameters(), strict=True):
                p.copy_(source)
    adapters[names[0]].select()
    return {**adapters, None: Adapter(dit, None)}
