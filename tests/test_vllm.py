"""The vLLM path against stand-ins (vLLM itself is never needed here): the weight push, the engine
arguments, and the post-processing of the engine's samples."""
import sys
import types

import pytest
import torch

import nla
import train


class RecordingEngine:
    """Stands in for vllm.LLM: apply_model hands its own model to the function, as vLLM hands its."""

    def __init__(self):
        self.received = []

    def apply_model(self, func):
        return [func(self)]

    def load_weights(self, weights):
        self.received.append({name: w.clone() for name, w in weights})


def test_push_sends_merged_weights_under_hf_names(tiny_dir):
    torch.manual_seed(0)
    av = nla.add_lora(nla.load_lm(tiny_dir['qwen3'], 'float32'), 4, 8.0)
    hf_names = dict(nla.load_lm(tiny_dir['qwen3'], 'float32').named_parameters())
    base = {n: m.base.weight.clone() for n, m in nla.lora_layers(av)}
    engine = RecordingEngine()
    for _ in range(50):
        with torch.no_grad():
            for _, m in nla.lora_layers(av):
                m.lora_B.add_(torch.randn_like(m.lora_B) * 0.01)
        train.push_weights(engine, av)
    assert len(engine.received) == 50
    last = engine.received[-1]
    assert len(last) == 7 * av.config.num_hidden_layers
    for name, m in nla.lora_layers(av):
        w = last[f"{name}.weight"]
        assert f"{name}.weight" in hf_names and w.shape == hf_names[f"{name}.weight"].shape and w.dtype == m.base.weight.dtype
        torch.testing.assert_close(w, base[name] + m.scale * m.lora_B @ m.lora_A)
        assert torch.equal(m.base.weight, base[name])  # 50 pushes never touched W


def test_push_includes_the_frozen_sft_adapter(tiny_dir):
    av = nla.add_lora(nla.load_lm(tiny_dir['llama'], 'float32'), 4, 8.0)
    with torch.no_grad():
        for _, m in nla.lora_layers(av):
            m.lora_B.normal_()
    want = {f"{n}.weight": m.merged_weight() for n, m in nla.lora_layers(av)}
    nla.freeze_lora_(av)
    engine = RecordingEngine()
    train.push_weights(engine, av)
    for k, w in want.items():
        torch.testing.assert_close(engine.received[0][k], w, atol=1e-5, rtol=1e-5)


def test_engine_args_from_the_config(monkeypatch):
    for k, v in dict(base_model='m', dtype='bfloat16', seed=7, ddp_rank=1, ddp=True, vllm_gpu_memory=0.25,
                     max_new_tokens=96).items():
        monkeypatch.setattr(train, k, v)
    args = train.engine_args(40, 'cuda:1')
    assert args['enable_prompt_embeds'] is True and args['enable_prefix_caching'] is False
    assert args['max_model_len'] == 136 and args['gpu_memory_utilization'] == 0.25
    assert args['dtype'] == 'bfloat16' and args['seed'] == 8 and args['model'] == 'm'
    assert args['distributed_executor_backend'] == 'external_launcher'


def test_vllm_rollouts_postprocessing(monkeypatch):
    """Lengths, masks and log-probs from the engine's samples; prompts go in as CPU embeddings."""
    calls = {}

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm):
            calls['prompts'], calls['params'] = prompts, params
            lp = lambda ids: [{t: types.SimpleNamespace(logprob=-0.1 * (j + 1))} for j, t in enumerate(ids)]
            done = types.SimpleNamespace(token_ids=[5, 6, 2], logprobs=lp([5, 6, 2]), finish_reason='stop')
            cut = types.SimpleNamespace(token_ids=[7, 7, 7, 7], logprobs=lp([7, 7, 7, 7]), finish_reason='length')
            return [types.SimpleNamespace(outputs=[done, cut]) for _ in prompts]

    monkeypatch.setitem(sys.modules, 'vllm', types.SimpleNamespace(SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(train, 'max_new_tokens', 4)
    embeds = torch.randn(3, 5, 8)
    ids, mask, lengths, truncated, logp = train.vllm_rollouts(FakeLLM(), embeds, 2, [2], 0, (0, 3), 10)
    assert ids.shape == (6, 4) and lengths.tolist() == [3, 4] * 3 and truncated.tolist() == [False, True] * 3
    assert mask[0].tolist() == [1, 1, 1, 0] and ids[0].tolist() == [5, 6, 2, 0]
    assert logp[0].tolist() == pytest.approx([-0.1, -0.2, -0.3, 0.0])
    p = calls['params'][0]
    assert (p['temperature'], p['top_p'], p['top_k'], p['n'], p['logprobs']) == (1.0, 1.0, -1, 2, 0)
    assert p['stop_token_ids'] == [2] and len({q['seed'] for q in calls['params']}) == 3
    assert calls['prompts'][0]['prompt_embeds'].device.type == 'cpu'
    torch.testing.assert_close(calls['prompts'][1]['prompt_embeds'], embeds[1])


def test_wrong_vllm_version_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, 'vllm', types.SimpleNamespace(__version__='0.33.0'))
    with pytest.raises(SystemExit, match='written against vllm==0.26.0, this is 0.33.0'):
        train.start_engine(10, 'cuda')
