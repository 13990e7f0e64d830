"""vLLM on a real GPU (skipped unless vllm imports and CUDA is present): the engine, fed the same
prompt_embeds, samples what the HF policy would, and a push makes its weights the merged ones."""
import importlib.util

import pytest
import torch

import nla
import train

pytestmark = pytest.mark.skipif(importlib.util.find_spec('vllm') is None or not torch.cuda.is_available(),
                                reason='needs vllm and a CUDA GPU')


@pytest.fixture(scope='module')
def engine_and_av(tiny_dir):
    train.base_model, train.dtype, train.max_new_tokens, train.vllm_gpu_memory = tiny_dir['llama'], 'float32', 32, 0.2
    tok = nla.load_tokenizer(tiny_dir['llama'])
    av = nla.add_lora(nla.load_lm(tiny_dir['llama'], 'float32', 'cuda'), 4, 8.0)
    with torch.no_grad():
        for _, m in nla.lora_layers(av):
            m.lora_B.normal_(std=0.02)
    prompt_ids, pos = nla.av_prompt(tok, '@')
    engine = train.start_engine(len(prompt_ids))
    train.push_weights(engine, av)
    return engine, av, tok, prompt_ids, pos


def test_engine_and_hf_agree_on_logprobs(engine_and_av):
    engine, av, tok, prompt_ids, pos = engine_and_av
    embeds = nla.inject(av, prompt_ids, pos, torch.randn(8, 64, device='cuda'), 2.0)
    ids, mask, lengths, _, vllm_logp = train.vllm_rollouts(engine, embeds, 2, nla.end_token_ids(av, tok), tok.pad_token_id, (0, 0), 0)
    with torch.no_grad():
        hf_logp, _ = train.response_logprobs(av, embeds.repeat_interleave(2, 0), ids, mask)
    diff = ((hf_logp - vllm_logp).abs() * mask).sum() / mask.sum()
    assert diff < 0.02, diff


def test_pushed_weights_are_the_engine_weights(engine_and_av):
    engine, av, *_ = engine_and_av
    name, m = nla.lora_layers(av)[0]
    got = engine.apply_model(lambda model: model.state_dict()['model.layers.0.self_attn.qkv_proj.weight'][:m.base.out_features].cpu())[0]
    torch.testing.assert_close(got, m.merged_weight().cpu())
