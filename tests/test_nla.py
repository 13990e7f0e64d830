"""nla.py: LoRA, injection, the reconstructor, the metrics and save/load, on tiny random models (its data readers: test_datagen.py)."""
import json
import math
import os
import re
import shutil
import time
import types

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import nla
from conftest import tiny_gpt2


@pytest.fixture(params=['llama', 'qwen3', 'gemma3'])
def family(request):
    return request.param


def lm_with_lora(path, rank=4, seed=0):
    torch.manual_seed(seed)
    return nla.add_lora(nla.load_lm(path, 'float32'), rank, 8.0)


def randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in nla.lora_layers(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_lora_wraps_every_attention_and_mlp_linear(tiny_dir, family):
    """All seven projections of every block are adapted (q, k, v, o, gate, up, down)."""
    model = lm_with_lora(tiny_dir[family])
    names = {name.rsplit('.', 1)[1] for name, _ in nla.lora_layers(model)}
    assert names == {'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'}
    assert len(nla.lora_layers(model)) == 7 * model.config.num_hidden_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(nla.lora_layers(model)) and all('lora_' in n for n in trainable)


def test_fresh_lora_equals_base_exactly(tiny_dir, family):
    """B = 0 at the start, so the adapted model's logits are bit-identical to the base's."""
    base = nla.load_lm(tiny_dir[family], 'float32')
    model = lm_with_lora(tiny_dir[family])
    ids = torch.randint(0, 300, (2, 12))
    assert torch.equal(base(ids).logits, model(ids).logits)


def test_merged_weight_matches_adapted_forward(tiny_dir, family):
    """A model whose Linears carry merged_weight() gives the adapted model's outputs; W is unchanged."""
    model = lm_with_lora(tiny_dir[family])
    randomize_lora(model)
    before = {n: m.base.weight.clone() for n, m in nla.lora_layers(model)}
    merged = nla.load_lm(tiny_dir[family], 'float32')
    with torch.no_grad():
        for name, m in nla.lora_layers(model):
            merged.get_submodule(name).weight.copy_(m.merged_weight())
    ids = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(ids).logits, nla.load_lm(tiny_dir[family], 'float32')(ids).logits)
    assert all(torch.equal(before[n], m.base.weight) for n, m in nla.lora_layers(model))


def test_merged_weight_is_fp32_math_cast_to_base_dtype():
    base = torch.nn.Linear(8, 6).to(torch.bfloat16)
    layer = nla.LoRALinear(base, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    want = (base.weight.float() + 2.0 * layer.lora_B @ layer.lora_A).to(torch.bfloat16)
    assert layer.merged_weight().dtype == torch.bfloat16
    assert torch.equal(layer.merged_weight(), want)


def test_rslora_scale():
    layer = nla.LoRALinear(torch.nn.Linear(8, 8), rank=4, alpha=8.0, rslora=True)
    assert layer.scale == 8.0 / math.sqrt(4)
    assert nla.LoRALinear(torch.nn.Linear(8, 8), rank=4, alpha=8.0).scale == 2.0


def test_lora_disabled_gives_base_outputs(tiny_dir):
    base = nla.load_lm(tiny_dir['llama'], 'float32')
    model = lm_with_lora(tiny_dir['llama'])
    randomize_lora(model)
    ids = torch.randint(0, 300, (2, 12))
    with nla.lora_disabled(model):
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert not torch.equal(model(ids).logits, base(ids).logits)


def test_lora_disabled_turns_the_adapters_back_on_after_an_exception():
    """A caller that catches an error raised inside (a retry after running out of memory) keeps the policy, not the reference."""
    model = torch.nn.Sequential(nla.LoRALinear(torch.nn.Linear(4, 4), rank=2, alpha=4.0))
    with pytest.raises(RuntimeError, match='inside'):
        with nla.lora_disabled(model):
            raise RuntimeError('inside')
    assert all(m.enabled for _, m in nla.lora_layers(model))


def test_freeze_lora_makes_disabled_the_old_policy(tiny_dir):
    """After freeze_lora_, the model is unchanged and `lora_disabled` is the pre-freeze adapted model."""
    model = lm_with_lora(tiny_dir['llama'])
    randomize_lora(model)
    ids = torch.randint(0, 300, (2, 12))
    want = model(ids).logits
    nla.freeze_lora_(model)
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    with nla.lora_disabled(model):
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    assert all(torch.count_nonzero(m.lora_B) == 0 for _, m in nla.lora_layers(model))


def test_injection_replaces_only_the_marker(tiny_dir, family):
    tok = nla.load_tokenizer(tiny_dir[family])
    model = lm_with_lora(tiny_dir[family])
    ids, pos = nla.av_prompt(tok, '@')
    assert ids[pos] == tok.encode('@', add_special_tokens=False)[0]
    acts = torch.randn(3, model.config.hidden_size) * 50
    x = nla.inject(model, ids, pos, acts, alpha=7.0)
    plain = model.get_input_embeddings()(torch.tensor(ids))
    torch.testing.assert_close(x[:, pos], 7.0 * acts / acts.norm(dim=-1, keepdim=True))
    keep = [i for i in range(len(ids)) if i != pos]
    assert torch.equal(x[:, keep], plain[keep].expand(3, -1, -1))


def test_gradients_reach_lora_and_activation_through_injection(tiny_dir):
    tok = nla.load_tokenizer(tiny_dir['llama'])
    model = lm_with_lora(tiny_dir['llama'])
    ids, pos = nla.av_prompt(tok, '@')
    acts = torch.randn(2, model.config.hidden_size, requires_grad=True)
    logits = model(inputs_embeds=nla.inject(model, ids, pos, acts, 5.0)).logits
    logits[:, -1].logsumexp(-1).sum().backward()
    assert acts.grad is not None and acts.grad.abs().sum() > 0
    assert all(m.lora_B.grad.abs().sum() > 0 for _, m in nla.lora_layers(model))  # a fresh B = 0 gives A no gradient yet


def test_marker_must_be_one_token_and_occur_once(tiny_dir):
    tok = nla.load_tokenizer(tiny_dir['llama'])
    with pytest.raises(ValueError, match='must be one'):
        nla.av_prompt(tok, 'zqxj@@ww')
    with pytest.raises(ValueError, match=r"marker 'e' occurs \d+ times in the AV prompt"):
        nla.av_prompt(tok, 'e')  # occurs all over the prompt text


def test_a_marker_token_the_tokenizer_also_gives_elsewhere_is_refused():
    class Folding:  # a tokenizer whose normalizer folds 'D' onto the marker's token
        chat_template = None

        def encode(self, text, add_special_tokens=False):
            return [ord('@') if c in '@D' else ord(c) for c in text]
    with pytest.raises(ValueError, match=re.escape("marker token 64 ('@') occurs 2 times")):
        nla.av_prompt(Folding(), '@')


def test_a_chat_prompt_gets_no_second_bos(tiny_dir):
    """A template that writes the BOS itself (Llama 3's), with a tokenizer that also adds one: the prompt holds one."""
    from tokenizers import processors
    tok = nla.load_tokenizer(tiny_dir['llama'])
    bos = tok.convert_tokens_to_ids('<|endoftext|>')
    tok.chat_template = '<|endoftext|>' + tok.chat_template
    tok._tokenizer.post_processor = processors.TemplateProcessing(single='<|endoftext|> $A', special_tokens=[('<|endoftext|>', bos)])
    assert tok.encode('x')[0] == bos and nla.av_prompt(tok, '@')[0].count(bos) == 1


def test_prompt_holds_no_date_of_the_day_it_is_made(tiny_dir):
    """Llama 3.x templates write today's date unless given one: the AV's prompt must not change from day to day."""
    tok = nla.load_tokenizer(tiny_dir['llama'])
    tok.chat_template = ("{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
                         "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n" + tok.chat_template)
    text = tok.decode(nla.av_prompt(tok, '@')[0])
    assert 'Today Date: ' in text and time.strftime('%d %b %Y') not in text


def test_prompt_without_chat_template_is_plain_text(tiny_dir):
    tok = nla.load_tokenizer(tiny_dir['llama'])
    tok.chat_template = None
    ids, pos = nla.av_prompt(tok, '@')
    assert '<|im_start|>' not in tok.decode(ids) and 'explanation' in tok.decode(ids)


def test_reconstructor_reads_hidden_states_k_plus_1(tiny_dir, family):
    """The AR's last-token state, before normalisation and head, is the full model's hidden_states[K+1]; a fresh AR
    predicts it scaled to norm sqrt(d)."""
    layer = 1
    full = nla.load_lm(tiny_dir[family], 'float32')
    ar = nla.load_reconstructor(tiny_dir[family], layer, 'float32')
    tok = nla.load_tokenizer(tiny_dir[family])
    ids, mask = nla.ar_inputs(tok, ['a short one', 'a much longer explanation of the text here'], 64, 'cpu')
    got = ar.last_hidden(ids, mask)
    for i in range(2):
        n = int(mask[i].sum())
        want = full(ids[i:i + 1, :n], output_hidden_states=True).hidden_states[layer + 1][0, -1]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    assert len(nla.find_blocks(ar.backbone)[1]) == layer + 1  # the upper blocks were never built
    assert torch.equal(ar.head.weight, torch.eye(full.config.hidden_size)) and ar.head.weight.dtype == torch.float32
    d = full.config.hidden_size
    torch.testing.assert_close(ar(ids, mask), got * math.sqrt(d) / got.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_reconstructor_full_or_lora_trainables(tiny_dir):
    full = nla.load_reconstructor(tiny_dir['llama'], 1, 'float32')
    names = [n for n, p in full.named_parameters() if p.requires_grad]
    assert 'head.weight' in names and not any('embed' in n for n in names) and any('layers.1.' in n for n in names)
    lora = nla.load_reconstructor(tiny_dir['llama'], 1, 'float32', lora_rank=4)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert 'head.weight' in names and all('lora_' in n for n in names if n != 'head.weight')
    assert len(names) == 2 * len(nla.lora_layers(lora)) + 1 > 1


def test_blocks_are_the_language_model_s_beside_a_vision_tower_as_deep(tiny_dir):
    """A multimodal Gemma3 whose vision encoder has as many layers as its text model: LoRA goes on the text blocks."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, sliding_window=8)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    _, blocks = nla.find_blocks(model)
    assert blocks is model.model.language_model.layers
    assert all('language_model' in name for name, _ in nla.lora_layers(nla.add_lora(model, 4, 8.0)))


def test_lora_refuses_blocks_without_linear_layers():
    with pytest.raises(ValueError, match='hold no nn.Linear for LoRA to wrap'):
        nla.add_lora(tiny_gpt2(), 4, 8.0)


@pytest.mark.parametrize('name', ['mps', 'meta'])
def test_resolve_device_refuses_what_the_trainer_cannot_use(name):
    """Devices torch knows but this code does not run on (mps passed once and failed later with a traceback)."""
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        nla.resolve_device(name)


def test_a_long_text_keeps_its_end_in_the_ar_input(tiny_dir):
    """Cut to its last max_text_tokens: the end is the part nearest the activation's token."""
    tok = nla.load_tokenizer(tiny_dir['llama'])
    text = 'the king walked to the river and the old captain smiled at the dark sea'
    ids = nla.encode_text(tok, text, add_special_tokens=False)
    before, after = nla.AR_TEMPLATE.split('{explanation}')
    want = tok.encode(before, add_special_tokens=True) + ids[-4:] + tok.encode(after, add_special_tokens=False)
    assert len(ids) > 8 and ids[-4:] != ids[:4]
    assert nla.ar_inputs(tok, [text], 4, 'cpu')[0][0].tolist() == want


def test_response_logprobs_are_each_tokens_next_token_logprob(tiny_dir, family):
    """Response token t's log-prob is the log-softmax of the model's last logits on the prompt and the tokens before t:
    the shift by one and logits_to_keep line up, and right padding changes no real token's value."""
    av = lm_with_lora(tiny_dir[family])
    randomize_lora(av)
    prompt = torch.randn(2, 5, av.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 300, (2, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        logp, _ = nla.response_logprobs(av, prompt, ids, mask)
        for i in range(2):
            for t in range(int(mask[i].sum())):
                x = torch.cat([prompt[i:i + 1], av.get_input_embeddings()(ids[i:i + 1, :t])], 1)
                want = av(inputs_embeds=x).logits[0, -1].float().log_softmax(-1)[ids[i, t]]
                torch.testing.assert_close(logp[i, t], want, rtol=1e-4, atol=1e-4)


def test_scoring_forwards_keep_no_kv_cache(tiny_dir):
    """The log-prob and reconstructor forwards never decode on, so they build no cache (a whole batch's K/V)."""
    caches = []
    av, ar = lm_with_lora(tiny_dir['llama']), nla.load_reconstructor(tiny_dir['llama'], 1, 'float32')
    for model in (av, ar.backbone):
        model.register_forward_hook(lambda m, args, out: caches.append(out.past_key_values))
    tok = nla.load_tokenizer(tiny_dir['llama'])
    ids, mask = nla.ar_inputs(tok, ['a short one', 'a longer explanation here'], 64, 'cpu')
    ar(ids, mask)
    nla.response_logprobs(av, av.get_input_embeddings()(ids), ids, mask)
    assert caches == [None, None]


def test_a_tokenizer_without_an_end_token_is_refused(tiny_dir, tmp_path):
    tok = nla.load_tokenizer(tiny_dir['llama'])
    tok.eos_token = tok.pad_token = None
    tok.save_pretrained(tmp_path)
    shutil.copy(os.path.join(tiny_dir['llama'], 'config.json'), tmp_path)  # a model folder, but for its tokenizer
    with pytest.raises(ValueError, match='its tokenizer has no end-of-sequence token'):
        nla.load_tokenizer(str(tmp_path))


def test_a_model_folder_without_tokenizer_files_is_one_line(tiny_dir, tmp_path):
    for f in ('config.json', 'model.safetensors'):
        shutil.copy(os.path.join(tiny_dir['llama'], f), tmp_path)
    with pytest.raises(ValueError, match=f"base_model '{re.escape(str(tmp_path))}': its tokenizer cannot be loaded: ") as e:
        nla.load_tokenizer(str(tmp_path))
    assert '\n' not in str(e.value)


def test_a_model_folder_with_a_broken_config_is_named_with_its_error(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir['llama'], tmp_path / 'model')
    (tmp_path / 'model' / 'config.json').write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=r"config\.json' is not a valid JSON file") as e:
        nla.load_tokenizer(str(tmp_path / 'model'))
    assert '\n' not in str(e.value)


def test_a_model_type_transformers_does_not_know_is_one_line(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir['llama'], tmp_path / 'model')
    config = json.loads((tmp_path / 'model' / 'config.json').read_text())
    (tmp_path / 'model' / 'config.json').write_text(json.dumps({**config, 'model_type': 'nosuchmodel'}))
    with pytest.raises(ValueError, match="its config cannot be loaded: .*model type `nosuchmodel`") as e:
        nla.model_signature(str(tmp_path / 'model'), nla.load_tokenizer(tiny_dir['llama']))
    assert '\n' not in str(e.value)


def test_a_token_past_the_embedding_is_refused_unless_text_cannot_give_it(tiny_dir):
    tok = nla.load_tokenizer(tiny_dir['llama'])
    rows = len(tok)  # the conftest model's embedding fits its tokenizer
    tok.add_tokens(['<image>'], special_tokens=True)  # as Gemma 3's: its spelling in a text is read as text
    assert nla.model_signature(tiny_dir['llama'], tok)['d_model'] == 64
    tok.add_tokens(['<added>'])  # a text holding "<added>" gives its id
    with pytest.raises(ValueError, match=f"its tokenizer gives token {rows + 1}, past its embedding's {rows} rows"):
        nla.model_signature(tiny_dir['llama'], tok)


@pytest.mark.parametrize('add', [lambda tok: tok.add_tokens(['<added>']),
                                 lambda tok: tok.add_special_tokens({'pad_token': '<pad>'})],  # text never gives it; padding does
                         ids=['text', 'pad'])
def test_a_token_one_past_the_embedding_is_refused(tiny_dir, add):
    tok = nla.load_tokenizer(tiny_dir['llama'])
    rows = len(tok)
    add(tok)
    with pytest.raises(ValueError, match=f"its tokenizer gives token {rows}, past its embedding's {rows} rows"):
        nla.model_signature(tiny_dir['llama'], tok)


def test_missing_layer_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match='layer 9 does not exist'):
        nla.load_backbone(tiny_dir['llama'], 10, 'float32')
    with pytest.raises(ValueError, match='layer -1 does not exist'):
        nla.check_layer(tiny_dir['llama'], -1, 4)


def test_two_candidate_final_norms_are_refused():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8)])
            self.norm, self.other_norm = nn.LayerNorm(8), nn.LayerNorm(8)

        def get_input_embeddings(self):
            return self.embed
    lm = LM()
    with pytest.raises(ValueError, match=re.escape("expected one final norm, found ['norm', 'other_norm']")):
        nla.find_final_norm(lm, lm.layers)


def test_end_tokens_are_the_generation_config_s_and_the_tokenizer_s():
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=[7, 3]))
    assert nla.end_token_ids(model, types.SimpleNamespace(eos_token_id=5)) == [3, 5, 7]


@pytest.mark.parametrize('edit, message', [
    (lambda w: w.pop('model.layers.0.mlp.up_proj.weight'), '1 tensors are missing from its weights or of another shape, first '),
    (lambda w: w.update({'model.layers.0.mlp.up_proj.weight': w['model.layers.0.mlp.up_proj.weight'][:8]}),
     'up_proj.weight ((8, 64) in the file, (128, 64) in the model)'),
])
@pytest.mark.parametrize('load', [lambda m: nla.load_lm(m, 'float32'), lambda m: nla.load_backbone(m, 1, 'float32')])
def test_weights_that_do_not_fill_the_model_are_refused(tiny_dir, tmp_path, edit, message, load):
    """transformers starts a missing or misshapen tensor at random with a warning: the activations would be noise."""
    model = tmp_path / 'model'
    shutil.copytree(tiny_dir['llama'], model)
    weights = load_file(model / 'model.safetensors')
    edit(weights)
    save_file(weights, model / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ValueError, match=re.escape(message)):
        load(str(model))


def test_mse_scale_and_reward():
    """Normalised to sqrt(d): aligned 0, orthogonal 2, opposite 4, whatever the norms; reward = -mse."""
    a = torch.tensor([[3.0, 0, 0, 0]])
    assert nla.mse(a * 5, a).item() == pytest.approx(0)
    assert nla.mse(torch.tensor([[0, 0.1, 0, 0]]), a).item() == pytest.approx(2)
    assert nla.mse(-a, a).item() == pytest.approx(4)
    assert nla.reward(torch.tensor([[0, 1.0, 0, 0]]), a).item() == pytest.approx(-2)
    assert nla.FAIL_REWARD == -2.0


def test_fve_perfect_and_hand_computed():
    torch.manual_seed(0)
    target = torch.randn(50, 16) + 0.5
    assert nla.fve(target * 3, target) == pytest.approx(1.0)
    pred = target + torch.randn(50, 16)
    u = target / target.norm(dim=1, keepdim=True)
    p = pred / pred.norm(dim=1, keepdim=True)
    want = 1 - ((u - p) ** 2).sum(1).mean() / ((u - u.mean(0)) ** 2).sum(1).mean()
    assert nla.fve(pred, target) == pytest.approx(want.item(), abs=1e-6)
    assert nla.fve_rows(pred, target).mean().item() == pytest.approx(want.item(), abs=1e-6)


def test_fve_of_the_mean_predictor_is_at_most_zero():
    """The mean direction is the best constant prediction: FVE = 1 - 2/(1 + ||mean u||) <= 0, -> 0 as the
    data concentrate. (p^ is unit-normalised, so a constant can never reach 0 exactly.)"""
    torch.manual_seed(0)
    target = torch.randn(200, 16) + 2.0
    u = target / target.norm(dim=1, keepdim=True)
    m = u.mean(0)
    got = nla.fve(m.expand(200, -1), target)
    assert got == pytest.approx(1 - 2 / (1 + m.norm().item()), abs=1e-6)
    assert got <= 0
    assert nla.fve((m + 0.3 * torch.randn(16)).expand(200, -1), target) < got  # any other constant is worse


def test_fve_of_one_row_is_nan():
    """One vector has no variance: its FVE (and the shuffled control's, which pairs it with itself) is undefined."""
    one = torch.randn(1, 8)
    assert math.isnan(nla.fve(one + 0.1, one)) and math.isnan(nla.fve_shuffled(one, one, 0))


def test_fve_of_one_repeated_target_is_nan():
    """An rl step whose valid rollouts all come from one prompt: its targets have no variance, and round-off in
    1 - ||mean u^||^2 must not become an FVE of +-1e16."""
    torch.manual_seed(0)
    target = torch.randn(1, 16).expand(8, -1)
    for seed in range(5):
        pred = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
        assert math.isnan(nla.fve(pred, target)) and all(math.isnan(x) for x in nla.fve_rows(pred, target).tolist())


def test_fve_stats_sum_across_shards():
    torch.manual_seed(0)
    target, pred = torch.randn(40, 8), torch.randn(40, 8)
    a, b = nla.fve_stats(pred[:15], target[:15]), nla.fve_stats(pred[15:], target[15:])
    assert nla.fve_from_stats(a[0] + b[0], a[1] + b[1], a[2] + b[2]) == pytest.approx(nla.fve(pred, target))


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_shuffled_control_is_a_derangement(seed):
    """One-hot rows: each row paired with another gives ||u - p||^2 = 2, so FVE = 1 - 2 / (1 - 1/6) exactly;
    a row left paired with itself would score higher."""
    acts = torch.eye(6)
    assert nla.fve_shuffled(acts.clone(), acts, seed) == pytest.approx(1 - 2 / (1 - 1 / 6))


def test_shuffled_control_is_fixed_by_its_seed():
    """The eval's control is reproducible: the same seed pairs the rows alike, another seed otherwise."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    assert nla.fve_shuffled(pred, target, 5) == nla.fve_shuffled(pred, target, 5) != nla.fve_shuffled(pred, target, 6)


def test_a_special_token_spelled_in_text_is_read_as_text(tiny_dir):
    """The tokenizer alone reads "<|im_end|>" in a text as the end token; encode_text, and the AR's inputs built with
    it, read its characters, and decoding gives the text back."""
    tok = nla.load_tokenizer(tiny_dir['llama'])
    text = "the page ends <|im_end|> and goes on"
    assert tok.eos_token_id in tok.encode(text, add_special_tokens=False)
    ids = nla.encode_text(tok, text, add_special_tokens=False)
    assert tok.eos_token_id not in ids and tok.decode(ids, skip_special_tokens=True) == text
    ar_ids, _ = nla.ar_inputs(tok, [text], 64, 'cpu')
    assert tok.eos_token_id not in ar_ids[0].tolist()
    assert tok.eos_token_id in tok.encode("<|im_end|>", add_special_tokens=False)  # the default is restored after


def test_extract_explanation():
    assert nla.extract_explanation("x <explanation> a\nb </explanation> <explanation>c</explanation>") == "a\nb"
    assert nla.extract_explanation("<explanation>never closed") is None
    assert nla.extract_explanation("") is None


def test_av_save_load_bit_identical(tiny_dir, tmp_path):
    """A reloaded AV, including an adapter frozen before, gives bit-identical logits."""
    model = lm_with_lora(tiny_dir['llama'])
    randomize_lora(model, 1)
    merged = [nla.trainable_state(model)]
    nla.freeze_lora_(model)
    randomize_lora(model, 2)
    nla.save_av(model, tmp_path / 'av.safetensors', merged, {'lora_rank': 4})
    fresh = lm_with_lora(tiny_dir['llama'], seed=1)  # its own lora_A: the file must give it the saved one
    back = nla.load_av(fresh, tmp_path / 'av.safetensors')
    ids = torch.randint(0, 300, (2, 12))
    assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert len(back) == 1 and nla.read_meta(tmp_path / 'av.safetensors') == {'lora_rank': 4}


@pytest.mark.parametrize('tensors, message', [({'lm_head.weight': torch.zeros(2)}, "holds 'lm_head.weight'"),
                                              ({}, 'holds no tensors')])
def test_load_av_refuses_a_file_not_made_by_save_av(tiny_dir, tmp_path, tensors, message):
    nla.save_weights(tmp_path / 'av.safetensors', tensors, {'lora_rank': 4})
    with pytest.raises(ValueError, match=message):
        nla.load_av(lm_with_lora(tiny_dir['llama']), tmp_path / 'av.safetensors')


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    path = tmp_path / 'ckpt.pt'
    path.write_text('the last checkpoint')
    with pytest.raises(OSError, match='No space left'):
        with nla.replacing(path) as tmp:
            with open(tmp, 'w') as f:
                f.write('half of the n')
            raise OSError(28, 'No space left on device')
    assert path.read_text() == 'the last checkpoint' and os.listdir(tmp_path) == ['ckpt.pt']
    with nla.replacing(path) as tmp, open(tmp, 'w') as f:
        f.write('the next checkpoint')
    assert path.read_text() == 'the next checkpoint' and os.listdir(tmp_path) == ['ckpt.pt']


def test_a_write_replaces_what_a_killed_write_left(tmp_path):
    """SIGKILL runs no finally: the next write to the same path removes its temporary file."""
    (tmp_path / 'ckpt.pt.tmp').write_text('half of a write killed by SIGKILL')
    with nla.replacing(tmp_path / 'ckpt.pt') as tmp, open(tmp, 'w') as f:
        f.write('the next checkpoint')
    assert os.listdir(tmp_path) == ['ckpt.pt']


SIGNATURE = {'model_type': 'llama', 'n_layers': 4, 'd_model': 64, 'layer': 1}


@pytest.mark.parametrize('meta, needs, data_meta, message', [
    ({'lora_rank': 4, **SIGNATURE}, ['lora_rank'], SIGNATURE, None),
    (None, [], None, 'is not a safetensors file written by this train.py'),
    ({'lora_rank': 4, **SIGNATURE}, ['lora_rank', 'ar_max_tokens'], None, 'has no ar_max_tokens in its metadata'),
    ({'lora_rank': 4}, ['lora_rank'], SIGNATURE, 'has no d_model, layer, model_type, n_layers in its metadata'),
    ({'lora_rank': 4, **SIGNATURE}, [], {**SIGNATURE, 'layer': 2}, "another model or layer: layer 1, the data's is 2"),
    ({'lora_rank': 4, **SIGNATURE}, [], {**SIGNATURE, 'model_type': 'qwen3'}, "model_type 'llama', the data's is 'qwen3'"),
    ({'lora_rank': 4, **SIGNATURE}, [], {**SIGNATURE, 'd_model': 128}, "d_model 64, the data's is 128"),
])
def test_read_meta_checks_what_a_stage_needs(tmp_path, meta, needs, data_meta, message):
    path = tmp_path / 'av.safetensors'
    if meta is None:
        path.write_text('not weights')
    else:
        nla.save_weights(path, {'w': torch.zeros(2)}, meta)
    if message is None:
        assert nla.read_meta(path, needs, data_meta) == meta
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            nla.read_meta(path, needs, data_meta)


def test_read_meta_of_a_missing_file_says_so(tmp_path):
    """A ValueError, which train.py says in one line (a FileNotFoundError would be a traceback)."""
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'av.safetensors'} not found")):
        nla.read_meta(tmp_path / 'av.safetensors')


def test_weights_holding_nan_are_refused(tiny_dir):
    ar = nla.load_reconstructor(tiny_dir['llama'], 1, 'float32')
    state = nla.trainable_state(ar)
    state['head.weight'][3, 5] = float('nan')
    with pytest.raises(ValueError, match=re.escape('init_ar: head.weight holds NaN or inf')):
        nla.load_trainable(ar, state, 'init_ar')


def test_ar_save_load_bit_identical(tiny_dir, tmp_path):
    torch.manual_seed(0)
    ar = nla.load_reconstructor(tiny_dir['qwen3'], 1, 'float32')
    with torch.no_grad():
        for p in ar.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    nla.save_weights(tmp_path / 'ar.safetensors', nla.trainable_state(ar))
    fresh = nla.load_reconstructor(tiny_dir['qwen3'], 1, 'float32')
    nla.load_trainable(fresh, load_file(tmp_path / 'ar.safetensors'), 'ar')
    tok = nla.load_tokenizer(tiny_dir['qwen3'])
    ids, mask = nla.ar_inputs(tok, ['one text', 'and another'], 32, 'cpu')
    assert torch.equal(ar(ids, mask), fresh(ids, mask))


def test_load_trainable_refuses_other_shapes(tiny_dir):
    ar = nla.load_reconstructor(tiny_dir['llama'], 1, 'float32', lora_rank=4)
    other = nla.trainable_state(nla.load_reconstructor(tiny_dir['llama'], 1, 'float32', lora_rank=2))
    with pytest.raises(ValueError, match='shape'):
        nla.load_trainable(ar, other, 'ar.safetensors')
    with pytest.raises(ValueError, match='do not fit'):
        nla.load_trainable(ar, {'head.weight': torch.eye(64)}, 'ar.safetensors')
    with pytest.raises(ValueError, match=re.escape("unexpected ['head.bias']")):
        nla.load_trainable(ar, {**nla.trainable_state(ar), 'head.bias': torch.zeros(64)}, 'ar.safetensors')


def test_frozen_adapter_survives_bf16(tiny_dir):
    """A small SFT update is kept exactly when frozen, where merging it into bf16 weights would round it away."""
    model = nla.add_lora(nla.load_lm(tiny_dir['llama'], 'bfloat16'), 4, 8.0)
    layer = nla.lora_layers(model)[0][1]
    with torch.no_grad():
        layer.lora_B.fill_(1e-5)
    want = layer.scale * layer.lora_B @ layer.lora_A
    nla.freeze_lora_(model)
    assert layer.ref_A.dtype == layer.ref_B.dtype == torch.float32
    torch.testing.assert_close(layer.ref_B @ layer.ref_A, want, rtol=1e-5, atol=0)  # entries of at most 1e-5: no absolute slack
    assert torch.equal(layer.base.weight, nla.load_lm(tiny_dir['llama'], 'bfloat16').model.layers[0].self_attn.q_proj.weight)


def test_full_ar_keeps_fp32_weights_and_runs_in_the_run_dtype(tiny_dir):
    """fp32 master weights, matmuls under bf16 autocast: close to the fp32 forward, but not equal to it."""
    ar = nla.load_reconstructor(tiny_dir['llama'], 1, 'bfloat16')
    assert all(p.dtype == torch.float32 for p in ar.parameters())
    tok = nla.load_tokenizer(tiny_dir['llama'])
    ids, mask = nla.ar_inputs(tok, ['some text', 'and more text here'], 16, 'cpu')
    fp32 = nla.load_reconstructor(tiny_dir['llama'], 1, 'float32')
    got, want = ar.last_hidden(ids, mask).float(), fp32.last_hidden(ids, mask)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.05)
    lora = nla.load_reconstructor(tiny_dir['llama'], 1, 'bfloat16', lora_rank=4)
    assert lora.backbone.get_input_embeddings().weight.dtype == torch.bfloat16


def test_pad_right_masks_by_position_not_by_id():
    """A pad id that is also a real token (the end token) stays unmasked where it is real."""
    ids, mask = nla.pad_right([[4, 2], [7, 8, 9, 2]], pad_id=2, device='cpu')
    assert ids.tolist() == [[4, 2, 2, 2], [7, 8, 9, 2]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_check_out_dir_refuses_what_cannot_be_made_and_creates_nothing(tmp_path):
    (tmp_path / 'f').write_text('x')
    for path, message in (('', 'out_dir is empty'), (tmp_path / 'f', 'is a file, not a folder'),
                          (tmp_path / 'f' / 'sub', f"cannot be made: '{tmp_path / 'f'}' is a file")):
        with pytest.raises(ValueError, match=re.escape(message)):
            nla.check_out_dir(str(path))
    nla.check_out_dir(str(tmp_path / 'a' / 'b'))  # can be made: passes, and makes nothing
    assert os.listdir(tmp_path) == ['f']


def test_check_out_dir_refuses_a_parent_without_write_permission(tmp_path, monkeypatch):
    real = os.access  # the tests may run as root, who may write anywhere: the check is shown its answer
    monkeypatch.setattr(nla.os, 'access', lambda path, mode: False if mode & os.W_OK else real(path, mode))
    with pytest.raises(ValueError, match=re.escape(f"no write permission in '{tmp_path}'")):
        nla.check_out_dir(str(tmp_path / 'out'))


def test_load_tokenizer_names_a_folder_that_is_not_a_model(tiny_data):
    with pytest.raises(ValueError, match=re.escape(f"base_model '{tiny_data}' is a folder without config.json")):
        nla.load_tokenizer(tiny_data)
