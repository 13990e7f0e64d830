"""
Natural Language Autoencoder model code: a hand-written LoRA, the verbalizer (AV) with activation
injection, the truncated-backbone reconstructor (AR), the metrics, save/load, and the data files that
datagen.py writes and train.py reads. No training loop.

An activation h is the output of decoder block K (HF's hidden_states[K+1]) at one token.
  AV: the base LM + LoRA. The input embedding of one marker token in a fixed prompt is *replaced* by
      alpha * h / ||h||, and the model writes "<explanation>...</explanation>".
  AR: blocks 0..K of the same LM, final norm dropped, reading the last token of
      "Summary of the following text: <text>{explanation}</text> <summary>", normalised to sqrt(d),
      then a d x d linear head that starts as the identity.
Every stage calls the formulas here (inject, response_logprobs, normalize, mse, reward, fve) and nowhere else.
"""
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

AV_USER = ("Here is an activation vector from inside a language model: {marker}\n"
           "Describe what it encodes as 2-3 short snippets inside <explanation></explanation> tags.")
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
FAIL_REWARD = -2.0  # the reward of a rollout with no explanation or that hit the length cap
SPLITS = ('av_sft', 'ar_sft', 'rl', 'val')  # made of disjoint sets of documents
MODEL_AND_LAYER = ('model_type', 'n_layers', 'd_model', 'layer')  # data and weights record the model and layer they were made for
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# -----------------------------------------------------------------------------
# loading and finding the parts of any HF decoder-only LM by its structure


def torch_dtype(name):
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name):
    """'auto' is cuda when torch sees a GPU, else cpu; a device torch does not know or cannot use raises ValueError."""
    dev = ('cuda' if torch.cuda.is_available() else 'cpu') if name == 'auto' else name
    try:
        parsed = torch.device(dev)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ('cpu', 'cuda'):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got '{name}'")
    if parsed.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device='{name}' but torch sees no CUDA device")
    if parsed.type == 'cuda' and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device='{name}' but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def first_line(error):
    """An exception's message cut to its first line (its type's name when it has none), for one-line refusals."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_tokenizer(name):
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, 'config.json')):
        raise ValueError(f"base_model '{name}' is a folder without config.json, not a model folder")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        if os.path.isdir(name):  # a model folder with a broken file: transformers names it
            raise ValueError(f"base_model '{name}': {first_line(e)}") from None
        raise ValueError(f"base_model '{name}' is not a model folder, and the hub did not give it ({type(e).__name__})") from e
    except ValueError as e:  # no tokenizer files, an unknown model_type
        raise ValueError(f"base_model '{name}': its tokenizer cannot be loaded: {' '.join(str(e).split())}") from None
    if tok.eos_token_id is None:  # the AV's responses end with it, and padding falls back to it
        raise ValueError(f"base_model '{name}': its tokenizer has no end-of-sequence token")
    if tok.pad_token_id is None:  # padding is always masked explicitly, so any id will do
        tok.pad_token = tok.eos_token
    return tok


def model_signature(name, tokenizer):
    """What data and weights record of the model they were made with, so that another one is refused. The tokenizer
    must give no id past the embedding from text or padding (tokens added, the model not resized, would fail mid-forward);
    an added special token may lie past it (Gemma 3's image token): encode_text reads its spelling as text."""
    try:
        cfg = AutoConfig.from_pretrained(name).get_text_config()
    except (OSError, ValueError) as e:
        raise ValueError(f"base_model '{name}': its config cannot be loaded: {' '.join(str(e).split())}") from None
    rows = getattr(cfg, 'vocab_size', None)
    reached = max(tokenizer.vocab_size - 1, tokenizer.eos_token_id, tokenizer.pad_token_id,
                  *(i for i, token in tokenizer.added_tokens_decoder.items() if not token.special))
    if rows and reached >= rows:
        raise ValueError(f"base_model '{name}': its tokenizer gives token {reached}, past its embedding's {rows} rows "
                         "(tokens added, the model not resized?)")
    return {'model_type': cfg.model_type, 'n_layers': cfg.num_hidden_layers, 'd_model': cfg.hidden_size}


def check_layer(name, layer, n_layers):
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} does not exist: {name} has blocks 0..{n_layers - 1}")


def from_pretrained(cls, name, **kwargs):
    """cls.from_pretrained(name). A model folder without weights, a cut weights file, and weights that leave tensors
    missing or of another shape (transformers would start those at random) are said in one line; weights the model
    does not use (a cut backbone's upper blocks) are skipped silently."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report: what matters in it is checked here
    try:
        model, info = cls.from_pretrained(name, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"base_model '{name}': its weights cannot be loaded: {first_line(e)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    bad = sorted(info['missing_keys']) + [f"{k} ({tuple(a)} in the file, {tuple(b)} in the model)"
                                          for k, a, b in info['mismatched_keys']]
    if bad:
        raise ValueError(f"base_model '{name}': {len(bad)} tensors are missing from its weights or of another "
                         f"shape, first {bad[0]}: its files do not match its config.json")
    return model


def load_lm(name, dtype='bfloat16', device='cpu'):
    """The full causal LM (the verbalizer's base), frozen."""
    model = from_pretrained(AutoModelForCausalLM, name, dtype=torch_dtype(dtype)).to(device)
    model.requires_grad_(False)
    return model


def find_blocks(model):
    """(module holding the decoder blocks, the blocks): the ModuleList as long as the config's layer count
    beside the input embedding (a vision tower's layers may be as many)."""
    n_layers = model.config.get_text_config().num_hidden_layers
    embedding = model.get_input_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            parent = model.get_submodule(name.rsplit('.', 1)[0]) if '.' in name else model
            if any(child is embedding for child in parent.children()):
                return parent, module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {n_layers} decoder blocks found")


def find_final_norm(backbone, blocks):
    """The backbone's one direct child, besides the embedding and the blocks, with a 1-D weight of size d."""
    d = backbone.get_input_embeddings().weight.shape[1]
    found = [name for name, child in backbone.named_children()
             if child is not blocks and child is not backbone.get_input_embeddings()
             and getattr(child, 'weight', None) is not None and tuple(child.weight.shape) == (d,)]
    if len(found) != 1:
        raise ValueError(f"{type(backbone).__name__}: expected one final norm, found {found}")
    return found[0]


def load_backbone(name, n_blocks, dtype='bfloat16', device='cpu'):
    """Blocks 0..n_blocks-1 of an LM with the final norm replaced by identity: its last_hidden_state
    is the output of block n_blocks-1. The config is cut before loading, so upper blocks are never built."""
    config = AutoConfig.from_pretrained(name)
    text_config = config.get_text_config()
    check_layer(name, n_blocks - 1, text_config.num_hidden_layers)
    text_config.num_hidden_layers = n_blocks
    if getattr(text_config, 'layer_types', None):  # per-layer attention kinds (sliding/full) must match the count
        text_config.layer_types = text_config.layer_types[:n_blocks]
    backbone = from_pretrained(AutoModel, name, config=config, dtype=torch_dtype(dtype))
    parent, blocks = find_blocks(backbone)
    setattr(parent, find_final_norm(parent, blocks), nn.Identity())
    backbone.requires_grad_(False)
    return backbone.to(device)


def end_token_ids(model, tokenizer):
    """Every token that ends a response: the generation config's eos ids and the tokenizer's eos."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})

# -----------------------------------------------------------------------------
# LoRA


class LoRALinear(nn.Module):
    """y = W x + s * B A x with W frozen; B = 0 at the start so a fresh adapter is exactly the base.
    A and B are kept in fp32 (they are what the optimizer updates) and cast to x's dtype in forward.
    Adapters frozen by freeze_lora_ stay low-rank beside W (ref_B @ ref_A, scale folded in), never
    merged into a bf16 W, where small updates would round away."""

    def __init__(self, base, rank, alpha, rslora=False):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=base.weight.device))
        self.register_buffer('ref_A', None)
        self.register_buffer('ref_B', None)
        self.enabled = True
        self.reset_adapter()

    def reset_adapter(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's choice
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        y = self.base(x)
        if self.ref_A is not None:
            y = y + F.linear(F.linear(x, self.ref_A.to(x.dtype)), self.ref_B.to(x.dtype))
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    @torch.no_grad()
    def merged_weight(self):
        """W + frozen adapters + s * B A, out of place, in fp32, cast to W's dtype. W itself is never changed."""
        w = self.base.weight
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())
        if self.ref_A is not None:
            delta += self.ref_B.float() @ self.ref_A.float()
        return (w.float() + delta).to(w.dtype)


def add_lora(module, rank, alpha, rslora=False):
    """Wrap every nn.Linear inside the decoder blocks (attention and MLP) with a LoRALinear."""
    _, blocks = find_blocks(module)
    targets = [(name, m) for name, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    if not targets:  # GPT-2's projections, for one, are Conv1D
        raise ValueError(f"{type(module).__name__}: its decoder blocks hold no nn.Linear for LoRA to wrap")
    for name, linear in targets:
        parent_name, _, child = name.rpartition('.')
        parent = blocks.get_submodule(parent_name) if parent_name else blocks
        setattr(parent, child, LoRALinear(linear, rank, alpha, rslora))
    return module


def lora_layers(module):
    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def lora_disabled(module):
    """The live adapters off: the base model, or after freeze_lora_ the frozen (reference) policy."""
    layers = [m for _, m in lora_layers(module)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


@torch.no_grad()
def freeze_lora_(module):
    """Freeze the live adapters (appended to the frozen low-rank stack) and start fresh ones (B = 0).
    GRPO does this to the SFT verbalizer, so that `lora_disabled` is the SFT policy: the KL reference."""
    for _, m in lora_layers(module):
        a, b = m.scale * m.lora_A.detach().float(), m.lora_B.detach().float().clone()  # reset_adapter zeroes B in place
        m.ref_A = a if m.ref_A is None else torch.cat([m.ref_A, a])
        m.ref_B = b if m.ref_B is None else torch.cat([m.ref_B, b], 1)
        m.reset_adapter()

# -----------------------------------------------------------------------------
# verbalizer: the prompt and the injection


def av_prompt(tokenizer, marker):
    """(prompt token ids, index of the marker). The prompt is split at the marker and both sides are
    tokenized apart, so the marker is one token at a known place whatever the merges around it."""
    marker_ids = tokenizer.encode(marker, add_special_tokens=False)
    if len(marker_ids) != 1:
        raise ValueError(f"marker {marker!r} is {len(marker_ids)} tokens for this tokenizer, must be one")
    user = AV_USER.format(marker=marker)
    if tokenizer.chat_template:
        # date_string: Llama 3.x templates otherwise write today's date into the prompt, which would then differ
        # between the runs of SFT, RL and eval made on different days
        text = tokenizer.apply_chat_template([{'role': 'user', 'content': user}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False, date_string='26 Jul 2024')
        special = False  # the template writes its own BOS where the model wants one
    else:
        text, special = user + "\n", True
    if text.count(marker) != 1:
        raise ValueError(f"marker {marker!r} occurs {text.count(marker)} times in the AV prompt, must be once")
    before, after = text.split(marker)
    ids = tokenizer.encode(before, add_special_tokens=special)
    pos = len(ids)
    ids = ids + marker_ids + tokenizer.encode(after, add_special_tokens=False)
    if ids.count(marker_ids[0]) != 1:
        raise ValueError(f"marker token {marker_ids[0]} ({marker!r}) occurs {ids.count(marker_ids[0])} times in the AV prompt")
    return ids, pos


def inject(model, prompt_ids, marker_pos, acts, alpha):
    """(B, P, d) input embeddings of the AV prompt with the marker's embedding replaced by alpha * h/||h||."""
    embed = model.get_input_embeddings()
    ids = torch.as_tensor(prompt_ids, device=embed.weight.device)
    x = embed(ids).unsqueeze(0).repeat(acts.shape[0], 1, 1)  # (B, P, d)
    h = acts.to(device=x.device, dtype=torch.float32)
    x[:, marker_pos] = (alpha * h / h.norm(dim=-1, keepdim=True)).to(x.dtype)
    return x


def response_logprobs(av, prompt_embeds, resp_ids, resp_mask, with_entropy=False):
    """(N, T) fp32 log-probs of each response token given the injected prompt and the tokens before
    it, and, if asked, (N, T) entropies (detached; else None). Logits are made only at the response
    positions."""
    N, T = resp_ids.shape
    x = torch.cat([prompt_embeds, av.get_input_embeddings()(resp_ids)], 1)  # (N, P+T, d)
    mask = torch.cat([torch.ones(N, prompt_embeds.shape[1], dtype=resp_mask.dtype, device=resp_mask.device), resp_mask], 1)
    logits = av(inputs_embeds=x, attention_mask=mask, logits_to_keep=T + 1, use_cache=False).logits[:, :-1].float()  # (N, T, V)
    logp = logits.log_softmax(-1)
    token_logp = logp.gather(-1, resp_ids.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return token_logp, None
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


def encode_text(tokenizer, text, **kwargs):
    """Token ids of free text (a corpus document, a context, an explanation). A special token's spelling in it is
    text: an "<|im_end|>" in a web page is read as its characters, not as the end token (which the decoded context
    would then leave out, and the AV would learn to write mid-explanation)."""
    return tokenizer(text, split_special_tokens=True, **kwargs)['input_ids']


def extract_explanation(text):
    m = re.search(r"<explanation>(.*?)</explanation>", text, re.DOTALL)
    return None if m is None else m.group(1).strip()

# -----------------------------------------------------------------------------
# reconstructor


class Reconstructor(nn.Module):
    """Blocks 0..K of the LM (final norm = identity) -> last token -> normalise to sqrt(d) -> fp32 head.
    The blocks run under autocast to `compute_dtype` unless it is fp32 (weights trained in full are kept in fp32)."""

    def __init__(self, backbone, compute_dtype=torch.float32):
        super().__init__()
        self.backbone = backbone
        self.compute_dtype = compute_dtype
        d = backbone.get_input_embeddings().weight.shape[1]
        self.head = nn.Linear(d, d, bias=False, device=backbone.device, dtype=torch.float32)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(d))

    def last_hidden(self, input_ids, attention_mask):
        """(B, d) output of block K at each row's last real token (rows are right-padded)."""
        with torch.autocast(input_ids.device.type, self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, d)
        last = attention_mask.sum(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]

    def forward(self, input_ids, attention_mask):
        return self.head(normalize(self.last_hidden(input_ids, attention_mask).float()))


def ar_inputs(tokenizer, texts, max_text_tokens, device):
    """Right-padded ids and mask of AR_TEMPLATE around each text; a long text keeps its end, the part
    nearest the activation's token."""
    before, after = AR_TEMPLATE.split("{explanation}")
    pre = tokenizer.encode(before, add_special_tokens=True)
    post = tokenizer.encode(after, add_special_tokens=False)
    rows = [pre + encode_text(tokenizer, t, add_special_tokens=False)[-max_text_tokens:] + post for t in texts]
    return pad_right(rows, tokenizer.pad_token_id, device)


def pad_right(rows, pad_id, device):
    """(N, T) right-padded ids and the explicit (N, T) mask of real tokens: padding is never found by
    comparing ids (a pad id may also be a real token, such as the end token)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def load_reconstructor(name, layer, dtype='bfloat16', device='cpu', lora_rank=0, lora_alpha=1.0, rslora=False):
    """The AR for activations of block `layer`; trainable in full (lora_rank=0: blocks and head; the
    embedding stays frozen) or as LoRA on the blocks plus the head. Trained in full, its weights are
    kept in fp32 and run under autocast: AdamW updates of bf16 weights mostly round away."""
    weights_dtype = dtype if lora_rank else 'float32'
    ar = Reconstructor(load_backbone(name, layer + 1, weights_dtype, device), torch_dtype(dtype))
    if lora_rank:
        add_lora(ar.backbone, lora_rank, lora_alpha, rslora)
    else:
        find_blocks(ar.backbone)[1].requires_grad_(True)
    ar.head.requires_grad_(True)
    return ar

# -----------------------------------------------------------------------------
# metrics: the one place each formula lives


def normalize(x):
    """Scale each row to norm sqrt(d), so a coordinate is O(1) whatever the model."""
    x = x.float()
    return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True))


def mse(pred, target):
    """(B,) mean over dims of (pred - target)^2 after both are normalised to norm sqrt(d).
    Equal to ||p^ - u^||^2 of the unit vectors: 0 when aligned, 2 when orthogonal, 4 when opposite."""
    return (normalize(pred) - normalize(target)).pow(2).mean(-1)


def reward(pred, target):
    return -mse(pred, target)


def fve_stats(pred, target):
    """Sufficient statistics of FVE, summable across batches and ranks: (sum ||u^ - p^||^2, sum u^, n)."""
    u = target.double() / target.double().norm(dim=-1, keepdim=True)
    p = pred.double() / pred.double().norm(dim=-1, keepdim=True)
    return (u - p).pow(2).sum(), u.sum(0), u.shape[0]


def fve_from_stats(sq_err_sum, u_sum, n):
    # FVE = 1 - E||u^ - p^||^2 / E||u^ - mean(u^)||^2, with u^ = h/||h||, p^ = pred/||pred||, means over the set.
    # As ||u^|| = 1, the denominator E||u^ - mean u^||^2 = 1 - ||mean u^||^2. Any constant prediction scores <= 0.
    variance = 1 - (u_sum / n).pow(2).sum() if n else 0
    if variance < 1e-9:  # one vector, or one repeated (an rl step whose valid rollouts share one prompt): nothing to explain
        return float('nan')
    return float(1 - (sq_err_sum / n) / variance)


def fve(pred, target):
    return fve_from_stats(*fve_stats(pred, target))


def fve_rows(pred, target):
    """(N,) each row's share of FVE: 1 - ||u^_i - p^_i||^2 / E||u^ - mean u^||^2; their mean is fve()."""
    _, u_sum, n = fve_stats(pred, target)
    return torch.tensor([fve_from_stats(n * err, u_sum, n) for err in mse(pred, target).double()])


def fve_shuffled(pred, target, seed):
    """The control: FVE when every row is paired with another row's reconstruction (a seeded derangement)."""
    order = np.random.default_rng(seed).permutation(len(target))
    shuffled = torch.empty_like(pred)
    shuffled[order] = pred[np.roll(order, 1)]
    return fve(shuffled, target)

# -----------------------------------------------------------------------------
# saving and loading trainable weights (safetensors, written atomically)


def trainable_state(module):
    return {n: p.detach().to('cpu', copy=True).contiguous() for n, p in module.named_parameters() if p.requires_grad}


@contextmanager
def replacing(path):
    """A temporary name to write path's new content to: renamed onto path once written, removed if the write fails,
    so path is never half-written and a failed write (a full disk) leaves no partial file taking the space."""
    tmp = f"{path}.tmp"  # one name: the next write replaces what a killed one (SIGKILL: no finally) left
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_weights(path, tensors, meta=None):
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in (meta or {}).items()})


def load_trainable(module, tensors, what):
    """Copy `tensors` into the module's trainable parameters; the names and shapes must match exactly, and the
    values be finite."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{what}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != tensors[n].shape:
                raise ValueError(f"{what}: {n} has shape {tuple(tensors[n].shape)}, the model wants {tuple(p.shape)}")
            if not torch.isfinite(tensors[n]).all():
                raise ValueError(f"{what}: {n} holds NaN or inf")
            p.copy_(tensors[n])


def save_av(model, path, frozen, meta=None):
    """The live adapter, plus every adapter frozen before it (`frozen`, oldest first), so one file
    rebuilds the whole verbalizer from the base model."""
    tensors = {f"adapter{i}.{n}": t for i, state in enumerate(frozen + [trainable_state(model)]) for n, t in state.items()}
    save_weights(path, tensors, meta)


def load_av(model, path):
    """Load a save_av file into a model with fresh LoRA: freezes the earlier adapters, loads the live
    one, and returns the frozen states (pass them back to save_av). The model's LoRA must have the rank,
    alpha and rslora the file records (train.build_av reads them from it): freezing folds in its scale."""
    tensors = load_file(path)
    keys = {k: re.fullmatch(r'adapter(\d+)\.(.+)', k) for k in tensors}  # save_av's names: (i, name)
    foreign = [k for k, m in keys.items() if m is None]
    if foreign or not tensors:
        raise ValueError(f"{path} holds {repr(foreign[0]) if foreign else 'no tensors'}: an AV file holds adapter<i>.<name> tensors")
    states = [{} for _ in range(1 + max(int(m[1]) for m in keys.values()))]
    for k, m in keys.items():
        states[int(m[1])][m[2]] = tensors[k]
    for state in states[:-1]:
        load_trainable(model, state, path)
        freeze_lora_(model)
    load_trainable(model, states[-1], path)
    return states[:-1]


def read_meta(path, needs=(), data_meta=None):
    """The metadata save_weights wrote. It must hold the keys in `needs`, and given data_meta, have been
    made for the data's model and layer. Anything else raises ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found")
    try:
        with safe_open(path, 'pt') as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, ValueError):  # ValueError: metadata that save_weights did not write
        raise ValueError(f"{path} is not a safetensors file written by this train.py (cut short, or another file?)") from None
    missing = sorted({*needs, *(MODEL_AND_LAYER if data_meta else ())} - meta.keys())
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} in its metadata: "
                         "it was written by another or an older train.py; run that stage again")
    wrong = [f"{k} {meta[k]!r}, the data's is {data_meta[k]!r}" for k in MODEL_AND_LAYER if data_meta and meta[k] != data_meta[k]]
    if wrong:
        raise ValueError(f"{path} was made for another model or layer: {'; '.join(wrong)}")
    return meta

# -----------------------------------------------------------------------------
# the data: datagen.py writes it, train.py reads it; both sides of the contract are here


def on_stop_signals(handler):
    """Ctrl-C and SIGTERM call handler(number, frame), except one ignored at start: as Python leaves it (a script's
    background job ignores Ctrl-C)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, handler)


def missing_folders(path):
    """path and the folders above it that do not exist yet, deepest first."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def check_out_dir(path):
    """An out_dir that is a folder or can be made one, checked before the work (nothing is created here)."""
    if not path:
        raise ValueError("out_dir is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"out_dir '{path}' is a file, not a folder")
    missing = missing_folders(path)
    parent = os.path.dirname(missing[-1]) if missing else os.path.abspath(path)  # the folder out_dir is made in
    if not os.path.isdir(parent):
        raise ValueError(f"out_dir '{path}' cannot be made: '{parent}' is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir '{path}' cannot be made or written: no write permission in '{parent}'")


def unusable_rows(acts):
    """Indices of the rows of a (rows, d) array that no stage can use: NaN, inf, or all zero (h/|h| has no direction)."""
    return np.flatnonzero(~np.isfinite(acts).all(1) | (acts == 0).all(1))


def split_path(data_dir, split):
    return os.path.join(data_dir, f"{split}.parquet")


def write_data(out_dir, tables, meta):
    """Each split's table as out_dir/{split}.parquet, and meta.json with a data_id: a hash of the parquets and of
    meta but its `config` (which names out_dir), so a run can tell when its data changed. Every file goes to a
    temporary folder first, then is renamed into place, meta.json last and after the old one is gone: readers never
    see new parquets described by an old meta. Returns the data_id."""
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, '.datagen-tmp-*')):  # what a run killed while writing left behind
        shutil.rmtree(old, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix='.datagen-tmp-', dir=out_dir)  # a name of its own: a folder of the user's is kept
    try:
        for split, table in tables.items():
            pq.write_table(table, split_path(tmp, split))
        data_id = data_digest(meta, [split_path(tmp, split) for split in tables])
        with open(os.path.join(tmp, 'meta.json'), 'w') as f:
            json.dump({**meta, 'data_id': data_id}, f, indent=2)
        if os.path.exists(os.path.join(out_dir, 'meta.json')):
            os.remove(os.path.join(out_dir, 'meta.json'))
        for split in tables:
            os.replace(split_path(tmp, split), split_path(out_dir, split))
        os.replace(os.path.join(tmp, 'meta.json'), os.path.join(out_dir, 'meta.json'))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_id


def data_digest(meta, paths):
    """The data_id of meta (but its config and data_id) and the split files at paths."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k not in ('config', 'data_id')}, sort_keys=True).encode())
    for path in paths:
        file_digest = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                file_digest.update(block)
        digest.update(file_digest.digest())
    return digest.hexdigest()[:16]


def check_data_id(data_dir, meta):
    """The four splits in data_dir must be the files meta.json was written with: parquet has no checksums, so a
    damaged page of activations can read as finite numbers, and a split copied from other data reads as well."""
    paths = [split_path(data_dir, split) for split in SPLITS]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{missing[0]} not found: run datagen.py again")
    if data_digest(meta, paths) != meta['data_id']:
        raise ValueError(f"data {data_dir}: its files are not those its meta.json was written with (data_id "
                         f"{meta['data_id']}): changed, damaged or copied from other data; run datagen.py again")


def read_data_meta(data_dir, base_model, tokenizer):
    """data_dir/meta.json, which must hold what train.py reads of it and have been made for this model and
    tokenizer (checked before any model loads). Anything else raises ValueError."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: run datagen.py first")
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError:
        raise ValueError(f"{path} is not JSON (cut short?): run datagen.py again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a JSON object: run datagen.py again")
    missing = sorted({*MODEL_AND_LAYER, 'base_model', 'vocab_size', 'marker', 'marker_id', 'alpha', 'data_id'} - meta.keys())
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: it was written by another or an older datagen.py; run it again")
    if type(meta['alpha']) not in (int, float) or not 0 < meta['alpha'] < math.inf:  # JSON's true, a bool, is an int to isinstance
        raise ValueError(f"{path}: alpha must be a finite number > 0, got {meta['alpha']}")
    signature = model_signature(base_model, tokenizer)
    problems = [f"{k} {meta[k]!r} vs the model's {v!r}" for k, v in signature.items() if meta[k] != v]
    if type(meta['layer']) is not int or not 0 <= meta['layer'] < signature['n_layers']:
        problems.append(f"layer {meta['layer']!r} vs the model's {signature['n_layers']} blocks")
    if meta['vocab_size'] != len(tokenizer):
        problems.append(f"vocab size {meta['vocab_size']} vs the tokenizer's {len(tokenizer)}")
    if not isinstance(meta['marker'], str) or tokenizer.encode(meta['marker'], add_special_tokens=False) != [meta['marker_id']]:
        problems.append(f"marker {meta['marker']!r} is not token {meta['marker_id']} in this tokenizer")
    if problems:
        made = f" (it was made for {meta['base_model']})" if meta['base_model'] != base_model else ''
        raise ValueError(f"data {data_dir} does not fit base_model {base_model}{made}: " + "; ".join(problems))
    return meta


def read_split(data_dir, split, d_model):
    """One split: activations (N, d) float32, and the contexts and explanations as lists."""
    path = split_path(data_dir, split)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: run datagen.py first")
    try:
        table = pq.read_table(path, columns=['activation', 'context', 'explanation'])
    except (OSError, ValueError) as e:  # a cut or foreign file; ArrowInvalid is a ValueError
        raise ValueError(f"{path} is not a split written by datagen.py ({first_line(e)})") from None
    if table.num_rows == 0:
        raise ValueError(f"{path} has no rows")
    acts = table.column('activation').combine_chunks()
    if getattr(acts.type, 'list_size', None) != d_model:
        raise ValueError(f"{path}: activations must be fixed-size lists of meta.json's d_model {d_model}, got {acts.type}")
    nulls = [c for c in table.column_names if table.column(c).null_count]
    if nulls:  # flatten() would skip a null activation and pair every later row with the wrong text
        raise ValueError(f"{path}: column {nulls[0]} has {table.column(nulls[0]).null_count} empty (null) rows")
    values = acts.flatten()
    if values.null_count:
        raise ValueError(f"{path}: column activation has {values.null_count} null values inside its rows")
    acts = values.to_numpy().reshape(-1, d_model)
    bad = unusable_rows(acts)
    if len(bad):
        raise ValueError(f"{path}: row {bad[0]} has a NaN, inf or all-zero activation")
    acts = torch.from_numpy(acts.copy())
    for name in ('context', 'explanation'):
        if not pa.types.is_string(table.column(name).type) and not pa.types.is_large_string(table.column(name).type):
            raise ValueError(f"{path}: column {name} must hold text, got {table.column(name).type}")
    return {'acts': acts, 'context': table.column('context').to_pylist(),
            'explanation': table.column('explanation').to_pylist()}
