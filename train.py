"""
Train a Natural Language Autoencoder: SFT warm starts of the verbalizer (AV) and the reconstructor
(AR), then GRPO on the AV with the AR trained alongside, and held-out evaluation. One stage per run.

    python train.py config/sft_av_smollm2.py      # AV: activation -> warm-start explanation
    python train.py config/sft_ar_smollm2.py      # AR: explanation -> activation
    python train.py config/sft_ar_smollm2.py --ar_input=context --out_dir=out/smollm2/sft_ar_context
    python train.py config/rl_smollm2.py          # GRPO from the two SFT outputs
    python train.py config/eval_smollm2.py        # held-out metrics of a checkpoint
    torchrun --nproc_per_node=4 train.py config/rl_qwen3_8b.py --lr=1e-4

GRPO here is on-policy: one optimizer step per batch of rollouts, so there is no PPO ratio or clip
and no value function. The AV's reward is -mse of the AR's reconstruction (the AR as it was before
this step's update), -2 for a rollout with no explanation or that hit the length cap. The KL is k3
to the SFT verbalizer, whose LoRA is frozen beside the base weights at the start of RL (a fresh one
is trained on top), so "adapter off" is the reference. Data parallelism is by hand: every rank holds
both models, takes a slice of each batch, and sums gradients in flat buckets before clipping.
"""
import fcntl
import importlib.util
import json
import logging
import math
import os
import pickle
import random
import signal
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist
# imported after init_process_group (from_pretrained does), its functions bind the live group as a default
# argument: the gloo group and its threads then outlive destroy_process_group, and a rank may abort at exit
import torch.distributed.nn  # noqa: F401
from safetensors.torch import load_file
from transformers import GenerationConfig, StaticCache

import configurator
import nla

# -----------------------------------------------------------------------------
# stage
stage = 'sft_av'  # 'sft_av', 'sft_ar', 'rl' or 'eval'
# I/O
data_dir = 'data/smollm2_l20'  # made by datagen.py
out_dir = 'out/sft_av'
base_model = 'HuggingFaceTB/SmolLM2-135M-Instruct'  # must be the model the data was made with
init_av = ''  # an out_dir whose av.safetensors starts the AV ('' = fresh LoRA)
init_ar = ''  # an out_dir whose ar.safetensors starts the AR ('' = fresh, identity head)
context_ar = ''  # an out_dir of sft_ar with ar_input='context': evaluation adds the context ceiling
resume = False  # continue the run in out_dir from its ckpt.pt
wandb_log = False  # mirror log.jsonl to wandb
wandb_project = 'nla'
wandb_run_name = ''
# model (a fresh AV or AR takes these; a loaded one keeps those it was saved with)
lora_rank = 32
lora_alpha = 64.0
rslora = False  # scale alpha/sqrt(rank) instead of alpha/rank
ar_lora_rank = 0  # 0: the AR trains in full (blocks and head, embedding frozen); > 0: LoRA on its blocks
ar_input = 'explanation'  # 'explanation', or 'context' for the context-ceiling control
ar_max_tokens = 256  # text tokens a fresh AR reads, in training and after; a longer text keeps its end
gradient_checkpointing = False
# optimizer (AdamW; warmup then cosine to lr * min_lr_frac)
lr = 1e-4  # the AV's
ar_lr = 1e-4
weight_decay = 0.0
warmup_steps = 10
min_lr_frac = 0.1  # 1.0: constant after warmup
grad_clip = 1.0
max_steps = 0  # optimizer steps; 0 = `epochs` passes over the split (SFT only)
epochs = 1
batch_size = 32  # SFT rows per step, over all ranks
micro_batch = 16  # rows or rollouts per forward/backward on one rank
max_bad_steps = 3  # consecutive non-finite steps that stop the run
# rl
batch_prompts = 32  # activations per GRPO step, over all ranks
group_size = 8  # rollouts per activation: 32 * 8 = 256 rollouts per step
max_new_tokens = 128
length_slack = 16  # the length penalty starts at max_new_tokens - length_slack tokens
length_penalty = 0.01  # reward lost per token past that (in the reward's units)
kl_coef = 0.05
logratio_clamp = 10.0  # |log pi_ref - log pi| is clamped before k3
temperature = 1.0  # the loss assumes sampling from the true policy: keep 1.0 / 1.0 / 0
top_p = 1.0
top_k = 0
gen_batch_size = 512  # rollouts per generate call (HF)
gen_cache = 'dynamic'  # HF KV cache: 'dynamic' or 'static' (fixed size; transformers compiles it on a GPU)
rollout = 'hf'  # 'hf': transformers' generate; 'vllm': one vLLM engine per rank, fed prompt_embeds
vllm_gpu_memory = 0.3  # share of the GPU the engine may take (its weights and KV cache); the trainer has the rest
max_logprob_diff = 0.5  # rollouts whose mean |logp_vllm - logp_trainer| is above this are left out of the loss
# evaluation and checkpoints
eval_interval = 50  # steps; also at step 0 and at the last step
eval_rows = 256  # val rows evaluated
eval_examples = 5  # rows printed with their explanation
ckpt_interval = 100
log_interval = 1
# system
device = 'auto'  # 'auto', 'cpu', 'cuda'; under torchrun each rank takes cuda:LOCAL_RANK
dtype = 'bfloat16'  # 'float32', 'bfloat16' or 'float16'
seed = 1337
# -----------------------------------------------------------------------------
config = configurator.configure(globals()) if __name__ == '__main__' else {}  # config files, then --key=value
ddp = int(os.environ.get('RANK', -1)) != -1  # launched by torchrun; the process group starts in main()
ddp_rank = int(os.environ.get('RANK', 0))
ddp_local_rank = int(os.environ.get('LOCAL_RANK', 0))
ddp_world_size = int(os.environ.get('WORLD_SIZE', 1))
master_process = ddp_rank == 0
# -----------------------------------------------------------------------------


def fail(msg):
    raise SystemExit(f"train: {msg}")


def checked(fn, *args):
    """fn(*args), its ValueError (bad data, weights or model) said in one line."""
    try:
        return fn(*args)
    except ValueError as e:
        fail(str(e))


def print0(*args, **kwargs):
    if master_process:
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# data

def take_rows(cursor, count, n):
    """The next `count` row indices of an endless stream of seeded per-epoch shuffles, and the new
    cursor. The cursor (rows consumed) is all a resumed run needs to continue with the same batches."""
    idx = []
    while len(idx) < count:
        epoch, pos = divmod(cursor, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        k = min(count - len(idx), n - pos)
        idx += order[pos:pos + k].tolist()
        cursor += k
    return idx, cursor


def rank_slice(idx):
    """This rank's contiguous share of a global batch (a prompt's group is made on one rank)."""
    per_rank = len(idx) // ddp_world_size
    return idx[ddp_rank * per_rank:(ddp_rank + 1) * per_rank]

# -----------------------------------------------------------------------------
# models


def read_init(path, needs, data_meta):
    """The metadata of a weights file a stage starts from: it must hold the keys in `needs` to rebuild the model,
    and have been made for the data's model and layer."""
    meta = checked(nla.read_meta, path, [*needs, 'data_id'], data_meta)
    if meta.get('base_model', base_model) != base_model:  # same architecture, so it loads: the weights may differ
        print0(f"train: note: {path} was trained on {meta['base_model']}, this run loads {base_model}: if their "
               "weights differ, its adapters or head do not fit them", file=sys.stderr)
    if meta['data_id'] != data_meta['data_id']:
        print0(f"train: note: {path} was trained on other data than {data_dir} (data_id {meta['data_id']}, not "
               f"{data_meta['data_id']}): if the two share documents, val rows here may have been its training rows",
               file=sys.stderr)
    return meta


def build_av(init, data_meta, tokenizer, dev):
    """The verbalizer: base LM + LoRA, from init/av.safetensors when given. Returns (model, frozen adapters, meta)."""
    path = os.path.join(init, 'av.safetensors') if init else ''
    meta = {'lora_rank': lora_rank, 'lora_alpha': lora_alpha, 'rslora': rslora}
    meta = read_init(path, meta, data_meta) if init else meta
    av = checked(nla.load_lm, base_model, dtype, dev)
    checked(nla.add_lora, av, meta['lora_rank'], meta['lora_alpha'], meta['rslora'])
    frozen = checked(nla.load_av, av, path) if init else []
    av.generation_config = GenerationConfig(  # ours alone: no sampling defaults of the model's leak in
        do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
        eos_token_id=nla.end_token_ids(av, tokenizer), pad_token_id=tokenizer.pad_token_id)
    if gradient_checkpointing:
        av.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    return av, frozen, meta


def build_ar(init, data_meta, reads, dev):
    """The reconstructor of ar_input `reads`, from init/ar.safetensors when given. Returns (model, its meta)."""
    path = os.path.join(init, 'ar.safetensors') if init else ''
    meta = {'ar_lora_rank': ar_lora_rank, 'lora_alpha': lora_alpha, 'rslora': rslora, 'ar_input': ar_input,
            'ar_max_tokens': ar_max_tokens}
    meta = read_init(path, meta, data_meta) if init else meta
    if meta['ar_input'] != reads:
        fail(f"{path} is an AR of ar_input='{meta['ar_input']}', used here where one of ar_input='{reads}' is needed")
    ar = checked(nla.load_reconstructor, base_model, data_meta['layer'], dtype, dev, meta['ar_lora_rank'], meta['lora_alpha'], meta['rslora'])
    if init:
        checked(nla.load_trainable, ar, load_file(path), path)
    ar.max_tokens = meta['ar_max_tokens']  # each AR reads texts cut as in its training
    if gradient_checkpointing:
        ar.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
    return ar, meta


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]

# -----------------------------------------------------------------------------
# the pieces every stage uses


def lr_at(step, base, total):
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return base * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def global_sum(values, dev):
    """Sum a list of numbers (or one tensor) over ranks, in float64."""
    t = torch.as_tensor(values, dtype=torch.float64, device=dev).clone()
    if ddp:
        dist.all_reduce(t)
    return t


def allreduce_grads(params, bucket_numel=1 << 25):
    """Sum gradients over ranks in flat buckets, one collective per bucket. Each loss here is divided
    by its global count (rows, tokens or rollouts of the whole batch), so the sum is the global mean
    and every rank ends with the same gradient: the skip decision on a non-finite one is joint."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not ddp:
        return
    grads = [p.grad for p in params]
    while grads:
        bucket, numel = [], 0
        while grads and (not bucket or numel + grads[0].numel() <= bucket_numel) and grads[0].dtype == (bucket or grads)[0].dtype:
            numel += grads[0].numel()
            bucket.append(grads.pop(0))
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


def optimizer_step(params, opt, lr_now):
    """Sync, clip, step. Returns (grad norm, whether the step was taken)."""
    allreduce_grads(params)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    ok = bool(torch.isfinite(norm))
    if ok:
        for group in opt.param_groups:
            group['lr'] = lr_now
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm), ok


def clock(dev):
    """time.time() once the device has run the work queued so far, so that each part of a step is billed its own."""
    if torch.device(dev).type == 'cuda':
        torch.cuda.synchronize(dev)
    return time.time()


def decode(tokenizer, ids, lengths):
    return tokenizer.batch_decode([r[:n] for r, n in zip(ids.tolist(), lengths.tolist())], skip_special_tokens=True)


def ar_texts(data, rows, source):
    if source == 'context':
        return [data['context'][r] for r in rows]
    return [nla.extract_explanation(data['explanation'][r]) or '' for r in rows]


def ar_predict(ar, tokenizer, texts, dev):
    """(N, d) fp32 AR predictions, in micro-batches; each text keeps its last ar.max_tokens tokens."""
    preds = []
    for i in range(0, len(texts), micro_batch):
        ids, mask = nla.ar_inputs(tokenizer, texts[i:i + micro_batch], ar.max_tokens, dev)
        preds.append(ar(ids, mask))
    return torch.cat(preds) if preds else torch.zeros(0, ar.head.weight.shape[0], device=dev)

# -----------------------------------------------------------------------------
# GRPO pieces: rollouts() -> score() -> advantages() -> policy_loss(), then the AR step


def sample_seed(seed_key, row):
    """The seed of the sampling that starts at `row` of the global batch: from (seed, seed_key, row), where seed_key
    tells the draw apart ((0, step) for a GRPO step, (1, step) for an eval)."""
    return int(np.random.SeedSequence([seed, *seed_key, row]).generate_state(1)[0])


@torch.no_grad()
def rollouts(av, prompt_embeds, n_per_prompt, end_ids, pad_id, seed_key, first_row):
    """Sample n_per_prompt responses per prompt in chunks of gen_batch_size, each chunk seeded by its first row, so a
    resumed run, or the same batch split over more ranks (when gen_batch_size divides each rank's share), draws the
    same rollouts. Returns ids (N, T), the mask of response tokens (the end token included), lengths, and whether each
    hit the cap with no end token."""
    x = prompt_embeds.repeat_interleave(n_per_prompt, 0)  # (N, P, d)
    attn = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    chunks = []
    for i in range(0, x.shape[0], gen_batch_size):
        torch.manual_seed(sample_seed(seed_key, first_row + i))
        chunk = x[i:i + gen_batch_size]
        out = av.generate(inputs_embeds=chunk, attention_mask=attn[i:i + gen_batch_size], **cache_kwargs(av, chunk.shape[:2]))
        chunks.append(torch.nn.functional.pad(out, (0, max_new_tokens - out.shape[1]), value=pad_id))
    ids = torch.cat(chunks)  # (N, T)
    return (ids, *response_mask(ids, end_ids))


def cache_kwargs(av, shape):
    """generate's KV cache argument for prompts of `shape` (batch, length): none for gen_cache='dynamic' (generate makes
    one), else a fixed-size cache made once per shape, kept for the run and emptied before each use. One made anew at
    every call (as cache_implementation='static' does) lies at new addresses, so on a GPU the CUDA graph of the compiled
    decode step would be recorded again at every call, with no end (torch 2.11 to 2.15 do not count a moved
    mark_static_address tensor against their cap on re-recordings)."""
    if gen_cache == 'dynamic':
        return {}
    caches = av.__dict__.setdefault('static_caches', {})  # kept with the model they were made for
    if shape not in caches:
        caches[shape] = StaticCache(config=av.config, max_cache_len=shape[1] + max_new_tokens)
    caches[shape].reset()
    return {'past_key_values': caches[shape]}  # transformers 5.24 renames it `cache`, and warns once of this name until 6.0


def response_mask(ids, end_ids):
    """The explicit mask of each response's tokens through its first end token (all of them when it
    hit the cap), its length, and whether it hit the cap with no end token."""
    is_end = torch.isin(ids, torch.tensor(end_ids, device=ids.device))
    has_end = is_end.any(1)
    lengths = torch.where(has_end, is_end.int().argmax(1) + 1, ids.shape[1])
    mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()
    return mask, lengths, ~has_end

# -----------------------------------------------------------------------------
# vLLM: written against vllm==0.26.0 (which pins torch 2.11). Stock vLLM serves the verbalizer because the
# activation replaces an input embedding: prompts go in as prompt_embeds, built by nla.inject like the HF path's.
VLLM_VERSION = '0.26.0'


def engine_args(prompt_len):
    """The vllm.LLM arguments of this run's engine. vLLM takes no device: one process runs it on cuda:0 (or, with
    vLLM's CPU build, the CPU), and under torchrun (external launcher) each rank on cuda:LOCAL_RANK, its own GPU."""
    return dict(model=base_model, tokenizer=base_model, dtype=dtype, seed=seed + ddp_rank, enable_prompt_embeds=True,
                enable_prefix_caching=False,  # not shown safe for prompts given as embeddings
                # prompts are short and come all at once, so splitting one gains nothing; and the CPU build cannot
                # rewind a seeded sampler over a split prompt (it fails with "CPU Generator does not use offset")
                enable_chunked_prefill=False,
                gpu_memory_utilization=vllm_gpu_memory, max_model_len=prompt_len + max_new_tokens,
                # under torchrun every rank runs its own single-GPU engine inside the trainer process
                distributed_executor_backend='external_launcher' if ddp else None)


def start_engine(prompt_len, dev):
    # in-process engine core: the weight push hands it this process's tensors directly, with no copy and no pickling
    os.environ['VLLM_ENABLE_V1_MULTIPROCESSING'] = '0'
    os.environ.setdefault('VLLM_USE_FLASHINFER_SAMPLER', '0')
    os.environ['VLLM_USE_V2_MODEL_RUNNER'] = '0'  # its V2 runner takes no prompt_embeds (0.26 raises when asked for it)
    import vllm
    if vllm.__version__ != VLLM_VERSION:
        fail(f"rollout='vllm' was written against vllm=={VLLM_VERSION}, this is {vllm.__version__}")
    from vllm.platforms import current_platform
    if current_platform.device_type != torch.device(dev).type:
        fail(f"this vllm build runs on '{current_platform.device_type or 'no device'}', the trainer on '{dev}'")
    # every push reloads the whole checkpoint; the rotary cache and a tied lm_head have no weights in it,
    # and vLLM's reload would warn of them at every step
    logging.getLogger('vllm.model_executor.model_loader.reload.layerwise').setLevel(logging.ERROR)
    torch.cuda.empty_cache()  # vLLM wants vllm_gpu_memory of the whole GPU free at start; cached blocks count as used
    engine = vllm.LLM(**engine_args(prompt_len))
    logging.getLogger('vllm.v1.worker.gpu_model_runner').setLevel(logging.WARNING)  # it reports every push's time
    return engine


def engine_weights(av):
    """(HF name, tensor) for every weight of the policy, as its checkpoint names them: merged_weight() (W +
    frozen adapters + s*B*A, in the model dtype) for each LoRA-adapted Linear, every other weight as it is.
    Made one at a time as the engine takes them; with vLLM filling one layer at a time, a push needs about two
    layers' weights of extra memory."""
    lora = dict(nla.lora_layers(av))
    for name, p in av.named_parameters():  # a tied weight comes once
        owner, _, leaf = name.rpartition('.')
        if owner in lora:  # lora_A, lora_B: folded into the merged weight
            continue
        layer = owner.removesuffix('.base')
        if layer in lora:
            yield f"{layer}.{leaf}", lora[layer].merged_weight() if leaf == 'weight' else p
        else:
            yield name, p


def push_weights(engine, av):
    """The policy's weights go to the engine as tensors on this device (GPU -> GPU, no disk) through vLLM's
    in-place reload: its load_weights maps q/k/v and gate/up into its fused layers, then each layer's post-load
    processing runs again (by vLLM 0.26's source a no-op on a GPU; the CPU build packs the new weights for its kernels)."""
    engine.collective_rpc('reload_weights', kwargs={'weights_iterator': engine_weights(av)})


def vllm_rollouts(engine, prompt_embeds, n_per_prompt, end_ids, pad_id, seed_key, first_row):
    """rollouts() on the engine, sampling exactly as the HF path (T = 1, top_p 1, top_k off), each prompt
    seeded from (seed, seed_key, its first row). Also returns the sampler's log-probs (N, T)."""
    from vllm import SamplingParams
    prompts = [{'prompt_embeds': e.detach().to('cpu').contiguous()} for e in prompt_embeds]  # (P, d), model dtype
    params = [SamplingParams(n=n_per_prompt, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=max_new_tokens,
                             stop_token_ids=end_ids, logprobs=0, detokenize=False,
                             seed=sample_seed(seed_key, first_row + i * n_per_prompt))
              for i in range(len(prompts))]
    samples = [c for out in engine.generate(prompts, params, use_tqdm=False) for c in out.outputs]
    N, dev = len(samples), prompt_embeds.device
    ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long)
    logp = torch.zeros(N, max_new_tokens)
    for i, c in enumerate(samples):
        ids[i, :len(c.token_ids)] = torch.tensor(c.token_ids)
        logp[i, :len(c.token_ids)] = torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
    ids, logp = ids.to(dev), logp.to(dev)
    return (ids, *response_mask(ids, end_ids), logp)


@torch.no_grad()
def score(ar, tokenizer, texts, truncated, lengths, acts, dev):
    """Rewards (N,) from the AR as it is now: nla.reward (-mse) of its reconstruction, nla.FAIL_REWARD for a missing
    explanation or a truncated rollout, and a hinge penalty on length past max_new_tokens - length_slack, where `lengths`
    counts each response's tokens through its end token (tags and any text outside them included).
    Also returns the valid mask, the extracted explanations and the predictions of the valid rows."""
    explanations = [nla.extract_explanation(t) for t in texts]
    valid = torch.tensor([e is not None and not t for e, t in zip(explanations, truncated.tolist())], device=dev)
    rewards = torch.full((len(texts),), nla.FAIL_REWARD, device=dev)
    idx = torch.nonzero(valid).flatten()
    preds = ar_predict(ar, tokenizer, [explanations[i] for i in idx.tolist()], dev)
    over = (lengths[idx] - (max_new_tokens - length_slack)).clamp(min=0).float()
    rewards[idx] = nla.reward(preds, acts[idx]) - length_penalty * over
    return rewards, valid, explanations, preds


def advantages(rewards, group_size):
    """(r - group mean) / (group std + 1e-6), std with Bessel's correction as in TRL. In float64, so
    that a group of equal rewards gets advantages of exactly 0 (a float32 mean can be off by one ulp,
    which the division would blow up into a push of a few hundredths)."""
    r = rewards.double().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1).to(rewards.dtype)


def policy_loss(logp, ref_logp, adv, mask, kl_coef, logratio_clamp):
    """Per token -A * log pi + kl_coef * k3(pi || ref), k3 = exp(r) - r - 1 with r = log ref - log pi
    (clamped); token mean per rollout. Returns per-rollout losses (N,) and per-rollout KL (N,)."""
    log_ratio = (ref_logp - logp).clamp(-logratio_clamp, logratio_clamp)
    k3 = log_ratio.exp() - log_ratio - 1
    n_tokens = mask.sum(1).clamp(min=1)
    loss = ((-adv[:, None] * logp + kl_coef * k3) * mask).sum(1) / n_tokens
    return loss, ((k3 * mask).sum(1) / n_tokens).detach()


def ar_step(ar, tokenizer, texts, acts, opt, lr_now, dev):
    """One MSE step of the AR on (text, activation) pairs; the loss is a mean over the global batch."""
    n_global = global_sum([len(texts)], dev).item()
    if n_global == 0:
        return float('nan'), float('nan'), True
    loss_sum = 0.0
    ar.train(gradient_checkpointing)
    for i in range(0, len(texts), micro_batch):
        ids, mask = nla.ar_inputs(tokenizer, texts[i:i + micro_batch], ar.max_tokens, dev)
        loss = nla.mse(ar(ids, mask), acts[i:i + micro_batch]).sum() / n_global
        loss.backward()
        loss_sum += loss.item()
    norm, ok = optimizer_step(trainable(ar), opt, lr_now)
    return global_sum([loss_sum], dev).item(), norm, ok

# -----------------------------------------------------------------------------
# evaluation


def eval_shard(n_val):
    """This rank's contiguous share of the first eval_rows val rows: the ranks' shares differ by at most one row and
    together are all of them, so an eval under torchrun scores the rows one process would."""
    n = min(eval_rows, n_val)
    if n < ddp_world_size:
        fail(f"eval_rows={eval_rows} and a val split of {n_val} rows leave nothing for some of the {ddp_world_size} ranks")
    return list(range(ddp_rank * n // ddp_world_size, (ddp_rank + 1) * n // ddp_world_size))


def evaluate(run, val, step):
    """Round-trip FVE on the val split (document-disjoint from training), with the shuffled control,
    the AR on the teacher's explanations and, given a context AR, the context ceiling. Rows are
    sharded over ranks and gathered."""
    tokenizer, dev = run.tokenizer, run.dev
    run.av.eval()
    run.ar.eval()
    rows = eval_shard(len(val['acts']))
    acts = val['acts'][rows].to(dev)
    with torch.no_grad():
        embeds = nla.inject(run.av, run.prompt_ids, run.marker_pos, acts, run.alpha)
        ids, _, lengths, _, _ = run.sample(embeds, 1, run.end_ids, tokenizer.pad_token_id, (1, step), rows[0])
        texts = decode(tokenizer, ids, lengths)
        lengths = lengths.tolist()
        explanations = [nla.extract_explanation(t) for t in texts]
        preds = ar_predict(run.ar, tokenizer, [e or '' for e in explanations], dev)
        teacher = ar_predict(run.ar, tokenizer, ar_texts(val, rows, 'explanation'), dev)
        ctx = None if run.ctx_ar is None else ar_predict(run.ctx_ar, tokenizer, ar_texts(val, rows, 'context'), dev)
    local = {'rows': rows, 'texts': texts, 'lengths': lengths, 'extracted': [e is not None for e in explanations],
             'acts': acts.cpu(), 'preds': preds.cpu(), 'teacher': teacher.cpu(), 'ctx': None if ctx is None else ctx.cpu()}
    shards = [local]
    if ddp:
        shards = [None] * ddp_world_size
        dist.all_gather_object(shards, local)
    cat = lambda k: torch.cat([s[k] for s in shards])
    acts, preds = cat('acts'), cat('preds')
    record = {'stage': 'eval', 'step': step, 'fve': nla.fve(preds, acts), 'fve_shuffled': nla.fve_shuffled(preds, acts, seed),
              'fve_teacher': nla.fve(cat('teacher'), acts),
              'extraction_rate': float(np.mean(sum((s['extracted'] for s in shards), []))),
              'mean_len': float(np.mean(sum((s['lengths'] for s in shards), []))), 'rows': len(acts)}
    if run.ctx_ar is not None:
        record['fve_context'] = nla.fve(cat('ctx'), acts)
    row_fve = nla.fve_rows(preds, acts)
    all_rows, all_texts = sum((s['rows'] for s in shards), []), sum((s['texts'] for s in shards), [])
    examples = []
    for j in range(min(eval_examples, len(all_rows))):
        context = val['context'][all_rows[j]].replace('\n', ' ')
        examples.append({'context_end': context[-80:], 'explanation': all_texts[j], 'fve': float(row_fve[j])})
    return record, examples


# -----------------------------------------------------------------------------
# checkpoints and logs


def check_ranks_agree(run, dev):
    """Every rank must hold the same trainable weights; a difference means a bug, caught here."""
    models = [m for m, opt in ((run.av, run.av_opt), (run.ar, run.ar_opt)) if opt is not None]
    local = torch.stack([torch.stack([p.detach().double().sum() for p in trainable(m)]).sum() for m in models]).to(dev)
    every = [torch.zeros_like(local) for _ in range(ddp_world_size)]
    dist.all_gather(every, local)
    if not all(torch.equal(every[0], e) for e in every):
        fail(f"ranks hold different weights at step {run.step}: {[e.tolist() for e in every]}")


def save_checkpoint(run):
    """Called by every rank at once; rank 0 writes."""
    if ddp:
        check_ranks_agree(run, run.dev)
    if master_process:
        write_checkpoint(run)
    if ddp:  # the other ranks wait for the writes: one that exits first would have torchrun kill rank 0 mid-write
        dist.barrier()


def write_checkpoint(run):
    """Trainable weights as safetensors (what a later stage's init_av/init_ar reads) and ckpt.pt with
    everything a resume needs. Each file is written to a temporary name, then renamed (nla.replacing)."""
    meta = {'stage': stage, 'step': run.step, 'base_model': base_model, **{k: run.meta[k] for k in (*nla.MODEL_AND_LAYER, 'data_id')}}
    if run.av_opt is not None:
        nla.save_av(run.av, os.path.join(out_dir, 'av.safetensors'), run.av_frozen, {**run.av_meta, **meta})
    if run.ar_opt is not None:
        nla.save_weights(os.path.join(out_dir, 'ar.safetensors'), nla.trainable_state(run.ar),
                         {**run.ar_meta, **meta})
    ckpt = {'step': run.step, 'eval_step': run.eval_step, 'cursor': run.cursor, 'bad_steps': run.bad_steps, 'skipped': run.skipped, 'config': run.config,
            'data_id': run.meta['data_id'], 'av_frozen': run.av_frozen, 'built': build_settings(run),
            'av': None if run.av_opt is None else nla.trainable_state(run.av),
            'ar': None if run.ar_opt is None else nla.trainable_state(run.ar),
            'av_opt': None if run.av_opt is None else run.av_opt.state_dict(),
            'ar_opt': None if run.ar_opt is None else run.ar_opt.state_dict(),
            'rng': {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate(),
                    'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    with nla.replacing(os.path.join(out_dir, 'ckpt.pt')) as tmp:
        torch.save(ckpt, tmp)


def build_settings(run):
    """How the models were built (from the config, or from an init's metadata): a resume must build them alike."""
    return {'av': [run.av_meta.get(k) for k in ('lora_rank', 'lora_alpha', 'rslora')],
            'ar': [run.ar_meta.get(k) for k in ('ar_lora_rank', 'lora_alpha', 'rslora', 'ar_max_tokens')]}


# what a resumed run may change: when it stops, how often it reports, how it fits the machine, and where its folders
# are (the data is checked by its data_id, the inits by their adapters' settings and init_av by its frozen adapters)
RESUMABLE = ('resume', 'out_dir', 'data_dir', 'init_av', 'init_ar', 'context_ar', 'max_steps', 'eval_interval',
             'eval_examples', 'ckpt_interval', 'log_interval', 'wandb_log', 'wandb_project', 'wandb_run_name', 'device',
             'micro_batch', 'gradient_checkpointing', 'gen_cache', 'vllm_gpu_memory')


def load_checkpoint(run):
    path = os.path.join(out_dir, 'ckpt.pt')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        fail(f"{path} cannot be read (cut short by a crash?): resume from a copy, or start again")
    missing = sorted({'data_id', 'av_frozen', 'built'} - ckpt.keys())
    if missing:
        fail(f"{path} was written by an older train.py (it has no {', '.join(missing)}): start the run again")
    if ckpt['data_id'] != run.meta['data_id']:
        fail(f"{path} was made on data {ckpt['data_id']}, but {data_dir} now holds data {run.meta['data_id']} "
             "(made again by datagen.py with other settings?): resume on the data the run started on, or start again")
    if len(ckpt['av_frozen']) != len(run.av_frozen) or not all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                                                               for a, b in zip(ckpt['av_frozen'], run.av_frozen)):
        fail(f"{path}: the adapters of init_av={init_av} (frozen under the live one, the KL reference in rl) "
             "are not those the run started from (trained again?): resume from the same init_av, or start again")
    saved = ckpt['config']
    added = sorted(k for k in set(run.config) - set(saved) if k not in RESUMABLE)
    if added:  # the code the run began with may not have done what the new setting's default does
        fail(f"{path} was made by a train.py without the setting(s) {', '.join(added)}: start the run again")
    removed = sorted(k for k in set(saved) - set(run.config) if k not in RESUMABLE)
    if removed:  # and this code cannot do what a removed setting's value asked for
        fail(f"{path} was made with the setting(s) {', '.join(removed)}, which this train.py does not have: start the run again")
    changed = sorted(k for k in run.config if k not in RESUMABLE and saved[k] != run.config[k])
    if changed:
        fail(f"{path} was made with {', '.join(f'{k}={saved[k]!r}' for k in changed)}: "
             f"resume with the same settings (only {', '.join(RESUMABLE[1:])} may change)")
    if ckpt['built'] != build_settings(run):
        fail(f"{path}: its models were built with {ckpt['built']} (rank, alpha, rslora; the AR's text tokens), the inits "
             f"given now build {build_settings(run)}: resume with the init_av and init_ar the run started from")
    if ckpt['step'] > run.total:
        fail(f"{path} is at step {ckpt['step']}, past this run's last step, {run.total}: resume with a larger max_steps")
    for model, opt, key in ((run.av, run.av_opt, 'av'), (run.ar, run.ar_opt, 'ar')):
        if opt is not None:
            checked(nla.load_trainable, model, ckpt[key], path)
            opt.load_state_dict(ckpt[f"{key}_opt"])
    run.step, run.cursor, run.bad_steps, run.skipped = ckpt['step'], ckpt['cursor'], ckpt['bad_steps'], ckpt['skipped']
    run.eval_step = ckpt.get('eval_step', run.step)  # older checkpoints were saved after their step's eval
    torch.set_rng_state(ckpt['rng']['torch'])
    np.random.set_state(ckpt['rng']['numpy'])
    random.setstate(ckpt['rng']['python'])
    if ckpt['rng']['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt['rng']['cuda'][:torch.cuda.device_count()])  # torchrun shows every rank all GPUs
    log_path = os.path.join(out_dir, 'log.jsonl')
    if master_process and os.path.isfile(log_path):  # steps logged after the checkpoint are run and logged again
        try:  # UnicodeDecodeError is a ValueError
            with open(log_path) as f:
                # a last line cut by a crash has no newline: dropped, as are the steps and the eval that will run again
                lines = [line for line in f if line.endswith('\n')]
            records = [json.loads(line) for line in lines]
            lines = [line for line, r in zip(lines, records) if r['step'] <= (run.eval_step if r['stage'] == 'eval' else run.step)]
        except (ValueError, KeyError, TypeError):
            fail(f"{log_path} holds a line that is not a log record (damaged, or edited?): delete it, then resume")
        with nla.replacing(log_path) as tmp, open(tmp, 'w') as f:
            f.writelines(lines)
    print0(f"resumed {path} at step {run.step}" + (f": the run's last step (max_steps={run.total}), so nothing is left "
                                                    "to do; a larger max_steps continues it" if run.eval_step == run.step == run.total else ''))


def lock_out_dir():
    """A lock on out_dir (made if need be), held while the run lives: a second run on it (a job submitted twice, a resume
    of a run thought dead) would write its steps among this one's, or be told by the checks to delete its log."""
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"{out_dir} is in use by another run: wait for it to end, or choose another out_dir")
    except OSError:  # a file system without locks
        pass
    return fd


def log(run, record):
    """One JSON line in log.jsonl, mirrored to wandb (a no-op unless wandb_log) under keys named by stage: an rl step and
    the eval at that step both have an `fve`, and wandb keeps one value per key and step. Master only."""
    if not master_process:
        return
    record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}  # strict JSON
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record, allow_nan=False) + '\n')
    run.wandb_log({f"{record['stage']}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != 'step'},
                  step=record['step'])


def fmt(record, skip=('stage', 'step')):
    return ' | '.join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k not in skip)


def print_examples(examples):
    for ex in examples:
        print0(f"  ...{ex['context_end'][-60:]!r}\n     -> {ex['explanation'][:160]!r} | fve {ex['fve']:.3f}")


def run_loop(run, total, update, evaluate_fn):
    """Steps run.step..total: evaluate every eval_interval and at the end, checkpoint every
    ckpt_interval and at the end, stop the run after max_bad_steps non-finite steps in a row.
    A SIGTERM or Ctrl-C (run.stop) is heeded before each eval and each step: the steps made are saved, then the run ends."""
    start, t_start = run.step, time.time()

    def stop_if_asked(saved):
        asked = torch.tensor([run.stop], device=run.dev)
        if ddp:  # every rank stops at the same place, and rank 0 names a signal even if another rank got it
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        if asked.item() == 0:
            return
        name = signal.Signals(asked.item()).name
        if run.step > start and not saved:
            save_checkpoint(run)
        if not master_process:  # every rank stops here; rank 0 says why
            raise SystemExit(1)
        if run.step > 0:
            fail(f"stopped by {name} at step {run.step}: {out_dir}/ckpt.pt holds it, --resume=True continues")
        if os.path.exists(os.path.join(out_dir, 'log.jsonl')):  # a step-0 eval: a rerun makes it again
            os.remove(os.path.join(out_dir, 'log.jsonl'))
        fail(f"stopped by {name} before the first step: only config.json is written, and the same command starts again")

    while True:
        step = run.step
        stop_if_asked(saved=False)
        evaluated = (step % eval_interval == 0 or step == total) and run.eval_step != step  # a resume may find it made
        if evaluated:
            record, examples = evaluate_fn(step)
            print0(f"eval {step:05d} | {fmt(record)}")
            print_examples(examples)
            log(run, record)
            run.eval_step = step
        # a resume's eval at the last step is saved too (no later save would keep it)
        saved = (step > start and (step % ckpt_interval == 0 or step == total)) or (evaluated and step == total > 0)
        if saved:
            save_checkpoint(run)
        if step >= total:
            return
        if evaluated or saved:  # a SIGTERM may have come while they ran; otherwise the check above still holds
            stop_if_asked(saved)
        t0 = time.time()
        record = update(step)
        run.step += 1
        if record.pop('ok'):
            run.bad_steps = 0
        else:
            run.bad_steps += 1
            run.skipped += 1
            if run.bad_steps >= max_bad_steps:
                fail(f"{run.bad_steps} steps in a row had a non-finite loss or gradient (last at step {step}); stopping")
        eta = (time.time() - t_start) / (run.step - start) * (total - run.step)
        record = {'stage': stage, 'step': run.step, **record, 'skipped': run.skipped, 'dt': time.time() - t0}
        if run.step % log_interval == 0 or run.step == total:
            print0(f"step {run.step:05d}/{total:05d} | {fmt(record)} | eta {eta / 60:.1f}m")
            log(run, record)

# -----------------------------------------------------------------------------
# the stages


def sft_steps(n_rows):
    total = max_steps or epochs * n_rows // batch_size
    if total == 0:
        fail(f"{epochs} epoch(s) of {n_rows} rows make no step of batch_size={batch_size}: set max_steps or a smaller batch")
    return total


def sft_av(run):
    """The AV learns to write the warm-start explanation for the injected activation: cross-entropy
    on the response tokens (the end token included), prompt and padding masked."""
    train, val, dev, tok = run.train, run.val, run.dev, run.tokenizer
    total = run.total

    def targets(data, rows):
        return [nla.encode_text(tok, data['explanation'][r], add_special_tokens=False) + [tok.eos_token_id] for r in rows]

    def ce(data, rows, backward, n_tokens):
        loss_sum = 0.0
        for i in range(0, len(rows), micro_batch):
            ids, mask = nla.pad_right(targets(data, rows[i:i + micro_batch]), tok.pad_token_id, dev)
            embeds = nla.inject(run.av, run.prompt_ids, run.marker_pos, data['acts'][rows[i:i + micro_batch]], run.alpha)
            logp, _ = nla.response_logprobs(run.av, embeds, ids, mask)
            loss = -(logp * mask).sum() / n_tokens
            if backward:
                loss.backward()
            loss_sum += loss.item()
        return global_sum([loss_sum], dev).item()

    def update(step):
        idx, run.cursor = take_rows(run.cursor, batch_size, len(train['acts']))
        rows = rank_slice(idx)
        n_tokens = global_sum([sum(len(t) for t in targets(train, rows))], dev).item()
        run.av.train(gradient_checkpointing)  # HF checkpoints only in train mode; eval mode keeps dropout off
        loss = ce(train, rows, True, n_tokens)
        lr_now = lr_at(step, lr, total)
        norm, ok = optimizer_step(trainable(run.av), run.av_opt, lr_now)
        return {'ok': ok, 'loss': loss, 'grad_norm': norm, 'lr': lr_now}

    @torch.no_grad()
    def evaluate_fn(step):
        rows = eval_shard(len(val['acts']))
        run.av.eval()
        n_tokens = global_sum([sum(len(t) for t in targets(val, rows))], dev).item()
        return {'stage': 'eval', 'step': step, 'val_loss': ce(val, rows, False, n_tokens)}, []

    run_loop(run, total, update, evaluate_fn)


def sft_ar(run):
    """The AR learns text -> activation with the normalised MSE; ar_input='context' trains the
    context-ceiling control on the raw context instead of the explanation."""
    train, val, dev = run.train, run.val, run.dev
    total = run.total

    def update(step):
        idx, run.cursor = take_rows(run.cursor, batch_size, len(train['acts']))
        rows = rank_slice(idx)
        lr_now = lr_at(step, ar_lr, total)
        loss, norm, ok = ar_step(run.ar, run.tokenizer, ar_texts(train, rows, ar_input), train['acts'][rows].to(dev),
                                 run.ar_opt, lr_now, dev)
        return {'ok': ok, 'loss': loss, 'grad_norm': norm, 'lr': lr_now}

    @torch.no_grad()
    def evaluate_fn(step):
        run.ar.eval()
        rows = list(range(min(eval_rows, len(val['acts']))))  # every rank scores all rows: cheap next to training
        preds, acts = ar_predict(run.ar, run.tokenizer, ar_texts(val, rows, ar_input), dev).cpu(), val['acts'][rows]
        return {'stage': 'eval', 'step': step, 'fve': nla.fve(preds, acts), 'fve_shuffled': nla.fve_shuffled(preds, acts, seed),
                'val_mse': float(nla.mse(preds, acts).mean())}, []

    run_loop(run, total, update, evaluate_fn)


def rl(run):
    """GRPO: rollouts() -> score() -> advantages() -> policy_loss() -> ar_step(), once per step."""
    data, val, dev, tok = run.train, run.val, run.dev, run.tokenizer
    pad_id = tok.pad_token_id

    def update(step):
        t0 = clock(dev)
        idx, run.cursor = take_rows(run.cursor, batch_prompts, len(data['acts']))
        rows = rank_slice(idx)
        acts = data['acts'][rows].to(dev)
        run.av.eval()
        embeds = nla.inject(run.av, run.prompt_ids, run.marker_pos, acts, run.alpha)  # (B, P, d)
        ids, mask, lengths, truncated, sampler_logp = run.sample(embeds, group_size, run.end_ids, pad_id, (0, step),
                                                                 ddp_rank * len(rows) * group_size)
        T = int(lengths.max())
        ids, mask = ids[:, :T], mask[:, :T]
        texts = decode(tok, ids, lengths)
        t_gen = clock(dev)
        acts = acts.repeat_interleave(group_size, 0)  # (N, d)
        run.ar.eval()
        rewards, valid, explanations, preds = score(run.ar, tok, texts, truncated, lengths, acts, dev)
        adv = advantages(rewards, group_size)
        t_score = clock(dev)

        n_global = len(texts) * ddp_world_size
        kl, entropy = torch.zeros(len(texts), device=dev), torch.zeros(len(texts), device=dev)
        logp_diff, kept = torch.zeros(len(texts), device=dev), torch.ones(len(texts), device=dev)
        run.av.train(gradient_checkpointing)
        embeds = embeds.repeat_interleave(group_size, 0)  # (N, P, d), one row per rollout
        for i in range(0, len(texts), micro_batch):
            sl = slice(i, i + micro_batch)
            x = embeds[sl]
            with torch.no_grad(), nla.lora_disabled(run.av):
                ref_logp, _ = nla.response_logprobs(run.av, x, ids[sl], mask[sl])
            logp, ent = nla.response_logprobs(run.av, x, ids[sl], mask[sl], with_entropy=True)
            if sampler_logp is not None:  # the engine sampled from what the trainer thinks is the policy?
                logp_diff[sl] = ((logp.detach() - sampler_logp[sl, :T]).abs() * mask[sl]).sum(1) / mask[sl].sum(1)
                kept[sl] = (logp_diff[sl] <= max_logprob_diff).float()
            loss, kl[sl] = policy_loss(logp, ref_logp, adv[sl], mask[sl], kl_coef, logratio_clamp)
            (loss * kept[sl]).sum().div(n_global).backward()
            entropy[sl] = (ent * mask[sl]).sum(1) / mask[sl].sum(1)
        lr_now = lr_at(step, lr, max_steps)
        av_norm, av_ok = optimizer_step(trainable(run.av), run.av_opt, lr_now)
        if run.engine is not None:
            push_weights(run.engine, run.av)
        t_av = clock(dev)

        vi = torch.nonzero(valid).flatten().tolist()
        ar_lr_now = lr_at(step, ar_lr, max_steps)
        ar_loss, ar_norm, ar_ok = ar_step(run.ar, tok, [explanations[i] for i in vi], acts[vi], run.ar_opt, ar_lr_now, dev)
        t_ar = clock(dev)

        # every logged number but the timings (this rank's) is over the global batch: local sums, summed over ranks, then divided
        err_sum, u_sum, n_valid = nla.fve_stats(preds, acts[vi])
        u_sum = global_sum(u_sum, dev)
        groups = rewards.view(-1, group_size)
        local = {'reward': rewards.sum(), 'reward_sq': rewards.pow(2).sum(), 'rollouts': len(texts), 'valid': n_valid,
                 'extracted': sum(e is not None for e in explanations), 'truncated': truncated.sum(), 'tokens': lengths.sum(),
                 'kl': kl.sum(), 'entropy': entropy.sum(), 'groups': groups.shape[0],
                 'equal_groups': (groups.max(1).values - groups.min(1).values < 1e-8).sum(), 'sq_err': err_sum,
                 't_gen': t_gen - t0, 'logp_diff': logp_diff.sum(), 'dropped': len(texts) - kept.sum()}
        s = dict(zip(local, global_sum(list(local.values()), dev).tolist()))
        n, mean_reward = s['rollouts'], s['reward'] / s['rollouts']
        record = {'ok': av_ok and ar_ok, 'reward': mean_reward, 'reward_std': math.sqrt(max(s['reward_sq'] / n - mean_reward ** 2, 0)),
                  'fve': nla.fve_from_stats(s['sq_err'], u_sum, s['valid']),
                  'extraction_rate': s['extracted'] / n, 'truncation_rate': s['truncated'] / n, 'mean_len': s['tokens'] / n,
                  'kl': s['kl'] / n, 'entropy': s['entropy'] / n, 'zero_adv_frac': s['equal_groups'] / s['groups'],
                  'av_grad_norm': av_norm, 'ar_grad_norm': ar_norm, 'ar_loss': ar_loss, 'lr': lr_now, 'ar_lr': ar_lr_now,
                  't_gen': t_gen - t0, 't_score': t_score - t_gen, 't_av': t_av - t_score, 't_ar': t_ar - t_av,
                  'rollout_tok_s': s['tokens'] / (s['t_gen'] / ddp_world_size)}
        if run.engine is not None:
            record.update(sampler_logp_diff=s['logp_diff'] / n, sampler_dropped=int(s['dropped']))
        return record

    run_loop(run, max_steps, update, lambda step: evaluate(run, val, step))


def eval_stage(run):
    """Held-out metrics of init_av and init_ar: a run of no steps."""
    run_loop(run, 0, None, lambda step: evaluate(run, run.val, step))

# -----------------------------------------------------------------------------


def check_config():
    """Derived sizes and settings, checked once before any work. Returns the device to run on, and rank 0's lock on
    out_dir if it exists."""
    for name, allowed in (('stage', ('sft_av', 'sft_ar', 'rl', 'eval')), ('gen_cache', ('dynamic', 'static')),
                          ('rollout', ('hf', 'vllm')), ('ar_input', ('explanation', 'context')), ('dtype', tuple(nla.DTYPES))):
        if globals()[name] not in allowed:
            fail(f"{name} must be one of {', '.join(map(repr, allowed))}, got {globals()[name]!r}")
    if (temperature, top_p, top_k) != (1.0, 1.0, 0):
        fail(f"GRPO's loss assumes samples from the true policy: temperature 1, top_p 1, top_k 0 (got {temperature}, {top_p}, {top_k})")
    if rollout == 'vllm' and not ddp and device not in ('auto', 'cpu', 'cuda', 'cuda:0'):
        fail(f"rollout='vllm' in one process runs its engine on cuda:0, so device='{device}' would split the run: "
             "choose the GPU with CUDA_VISIBLE_DEVICES instead")
    if rollout == 'vllm' and stage in ('rl', 'eval') and importlib.util.find_spec('vllm') is None:
        fail(f"rollout='vllm' needs vLLM, which is not installed: pip install vllm=={VLLM_VERSION}")
    if wandb_log and importlib.util.find_spec('wandb') is None:
        fail("wandb_log=True needs wandb, which is not installed: pip install wandb")
    if dtype == 'float16' and stage != 'eval':
        fail("dtype='float16' needs loss scaling, which this trainer does not do: use 'bfloat16' or 'float32'")
    if stage == 'rl' and group_size < 2:
        fail(f"group_size={group_size}: GRPO compares rollouts within a group, so it needs at least 2")
    run_device = checked(nla.resolve_device, device)
    for name in ('batch_size', 'micro_batch', 'batch_prompts', 'group_size', 'max_new_tokens', 'gen_batch_size', 'epochs',
                 'eval_interval', 'eval_rows', 'ckpt_interval', 'log_interval', 'max_bad_steps', 'ar_max_tokens', 'lora_rank'):
        if globals()[name] < 1:
            fail(f"{name} must be at least 1, got {globals()[name]}")
    for name in ('max_steps', 'warmup_steps', 'lr', 'ar_lr', 'weight_decay', 'ar_lora_rank', 'eval_examples',
                 'length_penalty', 'length_slack', 'kl_coef'):
        if globals()[name] < 0:
            fail(f"{name} must not be negative, got {globals()[name]}")
    for name in ('grad_clip', 'max_logprob_diff', 'logratio_clamp', 'lora_alpha'):
        if globals()[name] <= 0:
            fail(f"{name} must be positive, got {globals()[name]}")
    if not 0 <= seed < 2**32:  # numpy's seeds
        fail(f"seed must be in [0, 2**32), got {seed}")
    if not 0 < vllm_gpu_memory <= 1 or not 0 <= min_lr_frac <= 1:
        fail(f"vllm_gpu_memory must be in (0, 1] and min_lr_frac in [0, 1], got {vllm_gpu_memory} and {min_lr_frac}")
    name, value = ('batch_prompts', batch_prompts) if stage == 'rl' else ('batch_size', batch_size)  # the other goes unused
    if stage != 'eval' and value % ddp_world_size:
        fail(f"{name}={value} must divide by the number of ranks, {ddp_world_size}")
    if stage == 'rl' and max_steps <= 0:
        fail("stage 'rl' needs max_steps > 0")
    if stage in ('rl', 'eval') and (not init_av or not init_ar):
        fail(f"stage '{stage}' needs init_av and init_ar (the sft_av and sft_ar out_dirs)")
    unused = {'sft_av': ('init_ar', 'context_ar'), 'sft_ar': ('init_av', 'context_ar')}.get(stage, ())
    for name in unused:
        if globals()[name]:
            fail(f"stage '{stage}' does not use {name} (given {globals()[name]!r}): leave it out")
    checked(nla.check_out_dir, out_dir)
    for name in ('base_model', 'init_av', 'init_ar', 'context_ar'):  # a model's config.json, say, would be lost
        if globals()[name] and os.path.isdir(globals()[name]) and os.path.isdir(out_dir) and os.path.samefile(globals()[name], out_dir):
            fail(f"out_dir '{out_dir}' is the {name} folder: the run would write over what it reads; choose another out_dir")
    lock = lock_out_dir() if master_process and os.path.isdir(out_dir) else None  # before its files are judged
    has_ckpt = os.path.isfile(os.path.join(out_dir, 'ckpt.pt'))
    if resume and not has_ckpt:
        fail(f"resume=True but {os.path.join(out_dir, 'ckpt.pt')} does not exist")
    if not resume and has_ckpt:
        fail(f"{out_dir} holds another run's ckpt.pt: " + ("choose another out_dir" if stage == 'eval' else
                                                            "pass --resume=True to continue it, or choose another out_dir"))
    if not resume and os.path.exists(os.path.join(out_dir, 'log.jsonl')):
        fail(f"{out_dir} holds the log.jsonl of an eval or of a run that died before its first checkpoint: "
             "delete it or choose another out_dir")
    return run_device, lock


def main(config):
    dev, lock = check_config()
    if ddp:
        dev = f"cuda:{ddp_local_rank}" if dev.startswith('cuda') else 'cpu'
        if dev.startswith('cuda'):
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.startswith('cuda') else 'gloo')
        dist.barrier()  # every rank has checked out_dir before rank 0 writes to it
    # SDPA's cuDNN kernel (its first choice on an H100 from torch 2.11) gives NaN gradients when a mask is passed, as for
    # the AV's responses and the AR's padded texts, the length is 64 mod 128 and a row's attention logits are all very
    # negative (pytorch/pytorch#196678): off on every torch (which release fixes it is not known here), SDPA picks another
    torch.backends.cuda.enable_cudnn_sdp(False)
    if master_process:
        print(json.dumps(config))
    tokenizer = checked(nla.load_tokenizer, base_model)
    meta = checked(nla.read_data_meta, data_dir, base_model, tokenizer)
    if meta['base_model'] != base_model:  # architecture and tokenizer are checked to match; the weights cannot be yet
        print0(f"train: note: {data_dir} was made with {meta['base_model']}, this run loads {base_model}: "
               "if their weights differ, the data's activations are not this model's", file=sys.stderr)
    torch.manual_seed(seed)  # the same fresh LoRA on every rank
    np.random.seed(seed)
    random.seed(seed)

    run = types.SimpleNamespace()  # the run's objects, passed to the stage
    run.config, run.meta, run.tokenizer, run.dev, run.d = config, meta, tokenizer, dev, meta['d_model']
    run.prompt_ids, run.marker_pos = nla.av_prompt(tokenizer, meta['marker'])
    run.alpha = meta['alpha']
    train_split = {'sft_av': 'av_sft', 'sft_ar': 'ar_sft', 'rl': 'rl', 'eval': None}[stage]
    run.train = checked(nla.read_split, data_dir, train_split, run.d) if train_split else None  # every input is read before out_dir is written
    run.val = checked(nla.read_split, data_dir, 'val', run.d)
    checked(nla.check_data_id, data_dir, meta)
    run.total = sft_steps(len(run.train['acts'])) if stage in ('sft_av', 'sft_ar') else max_steps
    eval_shard(len(run.val['acts']))  # fails if an eval would leave a rank no rows
    run.av = run.ar = run.ctx_ar = run.av_opt = run.ar_opt = run.engine = None
    run.av_frozen, run.av_meta, run.ar_meta = [], {}, {}
    run.step, run.eval_step, run.cursor, run.bad_steps, run.skipped = 0, -1, 0, 0, 0
    if stage in ('sft_av', 'rl', 'eval'):
        run.av, run.av_frozen, run.av_meta = build_av(init_av, meta, tokenizer, dev)
        run.end_ids = nla.end_token_ids(run.av, tokenizer)
        if stage == 'rl':  # the SFT adapter becomes the frozen reference; a fresh one is trained on top
            run.av_frozen.append(nla.trainable_state(run.av))
            nla.freeze_lora_(run.av)
        if stage != 'eval':
            run.av_opt = torch.optim.AdamW(trainable(run.av), lr=lr, weight_decay=weight_decay)
    if stage in ('sft_ar', 'rl', 'eval'):
        run.ar, run.ar_meta = build_ar(init_ar, meta, ar_input if stage == 'sft_ar' else 'explanation', dev)
        if stage != 'eval':
            run.ar_opt = torch.optim.AdamW(trainable(run.ar), lr=ar_lr, weight_decay=weight_decay)
    steps = run.av_meta.get('step'), run.ar_meta.get('step')
    if stage in ('rl', 'eval') and os.path.samefile(init_av, init_ar) and steps[0] != steps[1]:
        fail(f"{init_av} holds av.safetensors of step {steps[0]} and ar.safetensors of step {steps[1]} "
             "(a crash between their writes?): resume that run, which writes both again")
    if context_ar and stage in ('rl', 'eval'):  # the context ceiling: an sft_ar run with ar_input='context'
        run.ctx_ar, _ = build_ar(context_ar, meta, 'context', dev)
    if stage in ('rl', 'eval'):  # the engine starts last, once every model has loaded
        run.engine = start_engine(len(run.prompt_ids), dev) if rollout == 'vllm' else None
        if run.engine is not None:
            run.sample = lambda *args: vllm_rollouts(run.engine, *args)
        else:
            run.sample = lambda *args: rollouts(run.av, *args) + (None,)
    if master_process and lock is None:  # no out_dir at the checks: made and locked now (the fd stays open until exit)
        lock_out_dir()
    if resume:
        load_checkpoint(run)
    if master_process:
        configurator.save_config(config, out_dir)
    if run.engine is not None:  # the engine loaded the base checkpoint: give it the policy, frozen SFT adapter included
        push_weights(run.engine, run.av)
    run.wandb_log = lambda *args, **kwargs: None
    if wandb_log and master_process:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
        run.wandb_log = wandb.log
    run.stop = 0  # the number of a SIGTERM (timeout, a scheduler's preemption, torchrun passing one on) or a Ctrl-C

    def ask_to_stop(number, _):  # run_loop stops at the next step or eval, with a checkpoint
        run.stop = number
        if number == signal.SIGINT:  # a second Ctrl-C stops at once, unsaved
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if master_process:  # os.write: a print here could land inside another print; torchrun kills its ranks itself
                os.write(2, b"train: Ctrl-C: stopping at the end of this step, with a checkpoint" +
                         (b"\n" if ddp else b" (Ctrl-C again: at once)\n"))
    nla.on_stop_signals(ask_to_stop)
    {'sft_av': sft_av, 'sft_ar': sft_ar, 'rl': rl, 'eval': eval_stage}[stage](run)


if __name__ == '__main__':
    try:
        main(config)
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()
