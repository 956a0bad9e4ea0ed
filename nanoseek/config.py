"""Model configuration: one dataclass with Hugging Face `deepseek_v3` field names, plus named presets.

`ModelConfig.from_hf(dict)` reads any `deepseek_v3` (or `deepseek_v2`) `config.json`, old style
(`rope_theta` + `rope_scaling`) or new style (`rope_parameters`); `to_hf()` writes one that `transformers`,
vLLM and SGLang read (`deepseek_v2` for V2's softmax router, which their DeepseekV3 classes do not implement).
The defaults are DeepSeek-V3 (671B); `PRESETS` holds the named sizes we train.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


class ConfigError(ValueError):
    """A config.json or preset we cannot use; the message is meant for the user."""


POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                  "moe_intermediate_size", "moe_layer_freq")
OPTIONAL_SIZES = ("q_lora_rank",)  # None: queries from one full-rank q_proj (V2-Lite)
FLAGS = ("tie_word_embeddings", "attention_bias", "rope_interleave", "norm_topk_prob", "seq_aux")  # true / false
YARN_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "attention_factor")
FLOATS = ("rope_theta", "rms_norm_eps", "routed_scaling_factor", "initializer_range", "aux_loss_alpha")
COUNTS = ("qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace",
          "num_nextn_predict_layers")  # >= 0; the expert counts may also be None (0 / None: a dense model)


@dataclass
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------------------------
    vocab_size: int = 129280  # rows of the embedding and the output head
    hidden_size: int = 7168  # width of the residual stream
    num_hidden_layers: int = 61  # transformer blocks, not counting MTP layers
    intermediate_size: int = 18432  # dense SwiGLU width (first_k_dense_replace layers)
    rms_norm_eps: float = 1e-6  # added to the mean square in every RMSNorm
    hidden_act: str = "silu"  # the SwiGLU gate's activation: only silu is accepted
    tie_word_embeddings: bool = False  # True: the output head shares the embedding matrix
    # --- Multi-head Latent Attention -----------------------------------------------------------------------
    num_attention_heads: int = 128  # query heads; every head reads the same latent
    num_key_value_heads: int = 128  # MLA has no GQA; kept for HF compatibility
    q_lora_rank: int | None = 1536  # None: queries come from one full-rank q_proj (V2-Lite)
    kv_lora_rank: int = 512  # width of the cached latent c_kv
    qk_nope_head_dim: int = 128  # per-head query/key width without position
    qk_rope_head_dim: int = 64  # per-head query width (and shared key width) that carries RoPE
    v_head_dim: int = 128  # per-head value width
    attention_bias: bool = False  # biases on the attention projections (V3: none)
    # --- RoPE ----------------------------------------------------------------------------------------------
    max_position_embeddings: int = 163840  # the longest context, prompt and answer together
    rope_theta: float = 10000.0  # RoPE base: the slowest pair turns once in ~2π·theta positions
    rope_scaling: dict | None = field(  # YaRN context extension (None: plain RoPE)
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
        }
    )
    # DeepSeek's (2i, 2i+1) pairs; False: rotate-half pairs (i, i + d/2), read by transformers' deepseek_v3 only
    # (vLLM and SGLang always rotate interleaved pairs)
    rope_interleave: bool = True
    # --- DeepSeekMoE ---------------------------------------------------------------------------------------
    n_routed_experts: int | None = 256  # experts a router chooses from (0 / None: a dense model)
    n_shared_experts: int | None = 1  # experts every token goes through, beside the routed ones
    num_experts_per_tok: int | None = 8  # routed experts each token uses (top-k)
    moe_intermediate_size: int = 2048  # SwiGLU width of one expert
    first_k_dense_replace: int = 3  # layers [0, k) use a dense MLP, the rest MoE
    moe_layer_freq: int = 1  # every k-th layer is MoE; only 1 is accepted (what HF's classes read)
    n_group: int | None = 8  # experts are split into groups; tokens may use only topk_group of them
    topk_group: int | None = 4
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # "noaux_tc" (V3, biased choice), "group_limited_greedy" (V2), "greedy"
    norm_topk_prob: bool = True  # rescale the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 2.5  # multiplies the routed experts' weighted sum
    aux_loss_alpha: float = 0.0001  # weight of the sequence-wise balance loss (0 turns it off)
    seq_aux: bool = True  # balance loss per sequence (V3); False turns it off (V2's batch-wise loss is not built)
    # --- multi-token prediction ----------------------------------------------------------------------------
    num_nextn_predict_layers: int = 1  # MTP depth: extra layers predicting tokens 2.. ahead (0: off)
    # --- bookkeeping ---------------------------------------------------------------------------------------
    initializer_range: float = 0.02  # std of the normal init of weight matrices
    bos_token_id: int | None = 0  # token ids as the tokenizer numbers them
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"  # the dtype the weights are stored in
    quantization_config: dict | None = None  # e.g. {"quant_method": "fp8", "weight_block_size": [128, 128]}

    def __post_init__(self) -> None:
        # transformers spells rope_scaling's kind "type" or "rope_type" (which wins): one spelling, "type", so no
        # reader misses YaRN; plain RoPE is None
        rs = self.rope_scaling
        if isinstance(rs, dict):
            kind = rs.get("rope_type", rs.get("type"))
            if kind is None and rs:  # a factor without its kind: dropping it would silently be plain RoPE
                raise ConfigError(f"rope_scaling {rs!r} has no type: write \"type\": \"yarn\" (or null for plain "
                                  "RoPE)")
            rs = {k: v for k, v in rs.items() if k != "rope_type"} | {"type": kind}
            self.rope_scaling = None if kind in ("default", None) else rs
        self.validate()

    # ------------------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MTP layers (index >= num_hidden_layers) follow the same rule, as in DeepSeek-V3."""
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale² when YaRN sets mscale_all_dim (DeepSeek's long-context correction)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if rs.get("mscale_all_dim"):
            m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731  (True is an int to Python)

        for name in POSITIVE_SIZES:  # a string from --set hidden_size=abc, or a zero, would fail deep in a reshape
            value = getattr(self, name)
            if value is None and name in OPTIONAL_SIZES:
                continue
            need(whole(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name in COUNTS:
            value = getattr(self, name)
            need((value is None and name.startswith(("n_", "num_experts"))) or (whole(value) and value >= 0),
                 f"{name} must be a non-negative integer, got {value!r}")
        need(whole(self.num_key_value_heads) and self.num_key_value_heads == self.num_attention_heads,
             f"num_key_value_heads {self.num_key_value_heads!r} must equal num_attention_heads "
             f"{self.num_attention_heads!r} (MLA has no grouped keys; transformers would repeat them and fail)")
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            need(value is None or (whole(value) and value >= 1),
                 f"{name} must be a positive integer or null, got {value!r}")
        is_id = lambda v: v is None or (whole(v) and v >= 0)  # noqa: E731
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            need(is_id(value) or (name == "eos_token_id" and isinstance(value, list) and value
                                  and all(v is not None and is_id(v) for v in value)),
                 f"{name} must be a token id (a non-negative integer) or null, got {value!r}")
        for name in FLAGS:  # the string "False" (--set attention_bias=False) would count as true
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            value = getattr(self, name)
            need(number(value) and value > 0, f"{name} must be a positive number, got {value!r}")
        for name in ("initializer_range", "aux_loss_alpha"):
            value = getattr(self, name)
            need(number(value) and value >= 0, f"{name} must be a non-negative number, got {value!r}")
        need(self.quantization_config is None or isinstance(self.quantization_config, dict),
             f"quantization_config must be an object or null, got {self.quantization_config!r}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not implemented (DeepSeek-V3 uses silu)")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (RoPE rotates pairs)")
        need(self.scoring_func in ("sigmoid", "softmax"), f"scoring_func {self.scoring_func!r} is not sigmoid/softmax")
        need(
            self.topk_method in ("noaux_tc", "group_limited_greedy", "greedy"),
            f"topk_method {self.topk_method!r} is not noaux_tc/group_limited_greedy/greedy",
        )
        # the two routers transformers, vLLM and SGLang implement: V3's, and V2's (written as deepseek_v2)
        need((self.scoring_func == "sigmoid") == (self.topk_method == "noaux_tc"),
             "routing is V3's (scoring_func sigmoid, topk_method noaux_tc) or V2's (softmax, greedy or "
             f"group_limited_greedy), not {self.scoring_func} with {self.topk_method}")
        need(self.moe_layer_freq == 1, "moe_layer_freq must be 1 (as in every DeepSeek model: other values are "
                                       "not read by transformers, vLLM or SGLang)")
        if self.n_routed_experts:
            need(bool(self.num_experts_per_tok), "num_experts_per_tok must be at least 1 in a model with experts")
            g = self.n_group or 1
            need(self.n_routed_experts % g == 0, "n_routed_experts must be divisible by n_group")
            need(g == 1 or self.topk_method != "noaux_tc" or self.n_routed_experts // g >= 2,
                 "noaux_tc routing scores a group by its top 2 experts: n_group must leave at least 2 experts a group")
            need(1 <= (self.topk_group or 1) <= g, "topk_group must be in [1, n_group]")
            need(
                (self.num_experts_per_tok or 0) <= (self.topk_group or 1) * (self.n_routed_experts // g),
                "num_experts_per_tok exceeds the experts in topk_group groups",
            )
        rs = self.rope_scaling
        need(rs is None or isinstance(rs, dict), f"rope_scaling must be an object or null, got {rs!r}")
        if rs is not None:
            kind = rs.get("type")
            need(kind == "yarn", f"rope_scaling type {kind!r} is not supported (yarn only)")
            if kind == "yarn":
                need(isinstance(rs.get("factor"), (int, float)) and not isinstance(rs["factor"], bool)
                     and rs["factor"] >= 1, f"rope_scaling (yarn) needs a number 'factor' >= 1, got "
                                            f"{rs.get('factor')!r}")
                bad = [k for k in YARN_NUMBERS if rs.get(k) is not None and
                       (isinstance(rs[k], bool) or not isinstance(rs[k], (int, float)))]
                need(not bad, f"rope_scaling {', '.join(bad)} must be numbers")

    def check_portable(self) -> None:
        """For a new model: ConfigError where transformers' deepseek_v2, which a softmax (V2) router is written as,
        would read it as another model: it never renormalises the router's top-k weights (nor does DeepSeek's V3
        code) and always rotates interleaved pairs. (A model made so before this check still loads here.)"""
        if self.scoring_func == "softmax" and self.norm_topk_prob:
            raise ConfigError("a softmax (V2) router takes norm_topk_prob false, as every DeepSeek-V2 model does")
        if self.scoring_func == "softmax" and not self.rope_interleave:
            raise ConfigError("a softmax (V2) router takes rope_interleave true (deepseek_v2 has no other RoPE layout)")

    # --- Hugging Face config.json ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt == "kimi_k2" and "DeepseekV3ForCausalLM" in (d.get("architectures") or []):
            mt = "deepseek_v3"  # Moonshot's Kimi-K2 releases: DeepSeek-V3's architecture under their own model_type
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {mt!r} is not a DeepSeek-V3 architecture (expected one of {SUPPORTED_MODEL_TYPES})")
        d = dict(d)
        # New-style transformers configs keep theta and scaling together in rope_parameters.
        rp = d.pop("rope_parameters", None)
        if rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"rope_parameters must be an object or null, got {rp!r}")
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")} | {"type": kind}
        d["rope_scaling"] = d.get("rope_scaling") or None  # (its spelling is settled in __post_init__)
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        if mt == "deepseek_v2":  # V2 defaults differ from V3's where V2 configs leave fields out
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("num_nextn_predict_layers", 0)
            d.setdefault("rope_interleave", True)
            d.setdefault("norm_topk_prob", False)
            d.setdefault("routed_scaling_factor", 1.0)
        d.setdefault("num_nextn_predict_layers", 0)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        if kwargs.get("torch_dtype") is not None:
            kwargs["torch_dtype"] = str(kwargs["torch_dtype"]).replace("torch.", "")
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in FLOATS:  # transformers' configs are strict dataclasses: a routed_scaling_factor of 2 is refused
            d[name] = float(d[name])
        if d["quantization_config"] is None:
            del d["quantization_config"]
        # transformers reads the MoE sizes as integers and picks dense layers by first_k_dense_replace alone
        for name, none in (("n_routed_experts", 0), ("n_shared_experts", 0), ("num_experts_per_tok", 1),
                           ("n_group", 1), ("topk_group", 1)):
            d[name] = none if d[name] is None else d[name]
        if not self.n_routed_experts:  # no experts anywhere: every layer (MTP's too) below first_k_dense_replace
            d["first_k_dense_replace"] = max(self.first_k_dense_replace,
                                             self.num_hidden_layers + self.num_nextn_predict_layers)
        if self.scoring_func == "softmax":  # V2's router: transformers' DeepseekV3 would route with V3's
            return {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", **d}
        return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **d}

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes`; a new num_attention_heads brings num_key_value_heads along (MLA: always equal)."""
        if "num_attention_heads" in changes:
            changes.setdefault("num_key_value_heads", changes["num_attention_heads"])
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# --- presets --------------------------------------------------------------------------------------------------
# cpu-tiny: under a million parameters, every V3 feature switched on (MLA with q_lora, grouped sigmoid routing,
# shared expert, a dense first layer, one MTP module). Sized for 2 CPU cores: at equal wall-clock it learns the task
# suite faster than a 2× wider model (more optimiser steps beat more width here). The rope part of each head is 16
# wide, not 8: with 8 only two of its four frequencies resolve offsets inside a 128-token row, and copying the right
# digit of the question needs them (level-1 pass@1 0.31 against 0.15 at 800 steps, bench/results/pretrain_cpu.md).
PRESETS: dict[str, ModelConfig] = {
    "cpu-tiny": ModelConfig(
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=4,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=512,
        rope_scaling=None,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=1,
        torch_dtype="float32",
    ),
    # small: ~244M total / ~127M active (+18M MTP), for one GPU.
    "small": ModelConfig(
        vocab_size=32768,
        hidden_size=768,
        num_hidden_layers=12,
        intermediate_size=2048,
        num_attention_heads=12,
        num_key_value_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=2048,
        rope_scaling=None,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        moe_intermediate_size=384,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
    ),
    # DeepSeek-V2-Lite's shapes (16B total / 2.4B active) in the V3 architecture's vocabulary of fields.
    "v2-lite": ModelConfig(
        vocab_size=102400,
        hidden_size=2048,
        num_hidden_layers=27,
        intermediate_size=10944,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=163840,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 4096,
        },
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        moe_intermediate_size=1408,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=0,
        bos_token_id=100000,
        eos_token_id=100001,
    ),
    "v3-671b": ModelConfig(),  # the dataclass defaults: DeepSeek-V3's config.json, but the paper's α 1e-4
    # (its config.json ships aux_loss_alpha 0.001)
}
# cpu-student: the distillation student of the CPU speedrun, under half cpu-tiny's active parameters (217k vs 444k).
# Dense (every layer `first_k_dense_replace`, as DeepSeek's distilled students were dense) and without MTP: on 2 cores
# a step takes 0.65x the time of the same width with MoE + MTP, and it learns more per minute (bench/results/
# pretrain_cpu.md: level-1 arithmetic 0.815 after 3000 AdamW steps in 213 s, against 0.49 after 2000 MoE+MTP steps in
# 219 s; with Muon, 2000 steps reach 0.91).
PRESETS["cpu-student"] = PRESETS["cpu-tiny"].replace(
    hidden_size=64, num_hidden_layers=3, first_k_dense_replace=3, intermediate_size=192, q_lora_rank=32,
    kv_lora_rank=24, qk_nope_head_dim=12, v_head_dim=12, num_nextn_predict_layers=0,
)


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
