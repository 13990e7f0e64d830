"""datagen.py: positions, activations, splits, teachers, meta.json, and refusal of bad input; the readers of its files."""
import ast
import contextlib
import http.server
import json
import os
import re
import shutil
import threading
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import configurator
import datagen
import nla
from conftest import ROOT, broken_copy, run_script, synthetic_docs, zero_first_activation


def datagen_config(monkeypatch, *args):
    """`python datagen.py config/datagen_tiny.py *args` in-process: the config resolved by configurator from
    datagen's globals, as under __main__, and set as those globals through monkeypatch (restored after the test)."""
    config = configurator.configure(dict(vars(datagen)), [os.path.join(ROOT, 'config', 'datagen_tiny.py'), *map(str, args)])
    for name, value in config.items():
        monkeypatch.setattr(datagen, name, value)
    return config


def run_datagen(monkeypatch, *args):
    datagen.main(datagen_config(monkeypatch, *args))


def refusal(monkeypatch, *args):
    """The one line datagen.main stops with on these args: the SystemExit message a user sees on stderr (exit status 1).
    Any other exception escapes, as the traceback it would be on the command line."""
    config = datagen_config(monkeypatch, *args)
    with pytest.raises(SystemExit) as e:
        datagen.main(config)
    line = e.value.code
    assert isinstance(line, str) and line.startswith('datagen: ') and '\n' not in line, repr(line)
    return line


def read(out, split):
    return pq.read_table(os.path.join(out, f'{split}.parquet')).to_pydict()


def splits_by_block(out, size):
    """Block -> the splits holding its documents, for a corpus laid out in blocks of `size` consecutive documents
    (doc_id is a document's place in the corpus, so its block is doc_id // size)."""
    split_of = {}
    for s in nla.SPLITS:
        for doc_id in read(out, s)['doc_id']:
            split_of.setdefault(doc_id // size, set()).add(s)
    return split_of


def parquet_bytes(table, **kwargs):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue().to_pybytes()


def damaged_inside(raw):
    """A parquet whose footer reads but whose row groups are overwritten in the middle."""
    return raw[:len(raw) // 2] + b'\xff' * 200 + raw[len(raw) // 2 + 200:]


def null_first(column):
    """An edit of a split that makes its first row's `column` null, as a hand-edited or foreign file may have it."""
    def edit(table):
        values = [None] + table.column(column).to_pylist()[1:]
        return table.set_column(table.column_names.index(column), column, pa.array(values, table.schema.field(column).type))
    return edit


def null_inside_first_activation(table):
    acts = table.column('activation').combine_chunks()
    values = acts.flatten().to_pylist()
    values[3] = None
    return table.set_column(table.column_names.index('activation'), 'activation',
                            pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float32()), acts.type.list_size))


def test_writes_four_splits_and_meta(tiny_data, tiny_dir):
    meta = json.load(open(os.path.join(tiny_data, 'meta.json')))
    for key in ('base_model', 'layer', 'd_model', 'marker', 'marker_id', 'alpha', 'norm_quantiles', 'teacher',
                'av_prompt', 'ar_prompt', 'rows', 'config'):
        assert key in meta
    assert meta['layer'] == 1 and meta['d_model'] == 64 and meta['base_model'] == tiny_dir['llama']
    assert (meta['model_type'], meta['n_layers']) == ('llama', 4)
    tok = nla.load_tokenizer(tiny_dir['llama'])
    assert tok.encode(meta['marker'], add_special_tokens=False) == [meta['marker_id']]
    for s in nla.SPLITS:
        t = pq.read_table(os.path.join(tiny_data, f'{s}.parquet'))
        assert t.num_rows == meta['rows'][s] > 0
        assert str(t.schema.field('activation').type) == 'fixed_size_list<element: float>[64]'
        assert {'doc_id', 'position', 'context', 'activation', 'explanation'} <= set(t.column_names)
        assert (str(t.schema.field('doc_id').type), str(t.schema.field('position').type)) == ('int64', 'int32')
    assert not [f for f in os.listdir(tiny_data) if f.startswith('.datagen-tmp')]


def test_each_split_holds_its_fraction_of_the_documents(tiny_data):
    """400 documents in no groups, splits 0.3 / 0.3 / 0.3 / 0.1: each split within one document of its share."""
    fractions = json.load(open(os.path.join(tiny_data, 'meta.json')))['config']['splits']
    docs = {s: len(set(read(tiny_data, s)['doc_id'])) for s in nla.SPLITS}
    assert all(abs(docs[s] - fractions[s] * sum(docs.values())) <= 1 for s in nla.SPLITS), (docs, fractions)


def test_alpha_is_the_75th_percentile_of_activation_norms(tiny_data):
    meta = json.load(open(os.path.join(tiny_data, 'meta.json')))
    norms = np.linalg.norm(np.concatenate([np.array(read(tiny_data, s)['activation'], np.float32) for s in nla.SPLITS]), axis=1)
    want = {f'q{q:02d}': np.percentile(norms, q) for q in (5, 25, 50, 75, 95)}
    assert meta['norm_quantiles'] == pytest.approx(want, rel=1e-6) and meta['alpha'] == meta['norm_quantiles']['q75']


def test_splits_are_document_disjoint(tiny_data):
    docs = {s: set(read(tiny_data, s)['doc_id']) for s in nla.SPLITS}
    for i, a in enumerate(nla.SPLITS):
        for b in nla.SPLITS[i + 1:]:
            assert not docs[a] & docs[b], f"{a} and {b} share documents"


def test_explanations_for_every_split_but_rl(tiny_data):
    for s in nla.SPLITS:
        expl = read(tiny_data, s)['explanation']
        if s == 'rl':
            assert all(e == '' for e in expl)
        else:
            assert all(nla.extract_explanation(e) for e in expl)


def test_activations_equal_a_fresh_forward(tiny_data, tiny_dir):
    """The stored vectors are hidden_states[K+1] of the full model at the recorded positions."""
    model = nla.load_lm(tiny_dir['llama'], 'float32')
    tok = nla.load_tokenizer(tiny_dir['llama'])
    docs = synthetic_docs(400)
    rows = read(tiny_data, 'val')
    for i in range(0, len(rows['doc_id']), 7):
        ids = tok(docs[rows['doc_id'][i]], truncation=True, max_length=128)['input_ids']
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
        p = rows['position'][i]
        torch.testing.assert_close(torch.tensor(rows['activation'][i]), hs[p], atol=1e-4, rtol=1e-4)
        assert rows['context'][i] == tok.decode(ids[:p + 1], skip_special_tokens=True)


def test_positions_follow_the_contract(tiny_data):
    """At or after min_position, at most positions_per_doc per document, distinct."""
    for s in nla.SPLITS:
        rows = read(tiny_data, s)
        assert min(rows['position']) >= 20
        by_doc = {}
        for d, p in zip(rows['doc_id'], rows['position']):
            by_doc.setdefault(d, []).append(p)
        assert all(len(ps) <= 4 and len(set(ps)) == len(ps) for ps in by_doc.values())


def test_positions_are_deterministic_per_document():
    from datagen import draw_positions
    ids = list(range(100))
    every = lambda p: True
    a = draw_positions(ids, {0, 55}, text='a text', seed=1, positions_per_doc=5, min_position=50, ends_a_character=every)
    assert a == draw_positions(ids, {0, 55}, 'a text', 1, 5, 50, every) and min(a) >= 50
    assert a != draw_positions(ids, {0, 55}, 'another text', 1, 5, 50, every)
    assert a != draw_positions(ids, {0, 55}, 'a text', 2, 5, 50, every)


def test_a_position_may_be_min_position_itself():
    from datagen import draw_positions
    assert draw_positions(list(range(60)), set(), 'a text', 1, 100, 50, ends_a_character=lambda p: True) == list(range(50, 60))


def test_documents_that_open_alike_through_min_position_are_joined(tiny_dir, tmp_path, monkeypatch):
    """A row is drawn at min_position or after, so two documents agreeing on tokens 0..min_position can give one row."""
    seen, pairs = [], datagen.same_opening_pairs
    monkeypatch.setattr(datagen, 'same_opening_pairs', lambda docs_ids, n: seen.append(n) or pairs(docs_ids, n))
    run_on_jsonl(monkeypatch, tiny_dir, tmp_path, synthetic_docs(30))
    assert seen == [20 + 1]  # config/datagen_tiny.py: min_position = 20


def test_bfloat16_activations_are_stored_as_float32(tiny_dir, tmp_path, monkeypatch):
    run_on_jsonl(monkeypatch, tiny_dir, tmp_path, synthetic_docs(30), '--dtype=bfloat16')
    assert pq.read_schema(tmp_path / 'out' / 'val.parquet').field('activation').type == pa.list_(pa.float32(), 64)


def test_positions_end_a_character():
    """Of the positions >= 50, only the even ones end a character here: every position drawn is even."""
    from datagen import draw_positions
    drawn = draw_positions(list(range(100)), set(), 'a text', 1, 10, 50, ends_a_character=lambda p: p % 2 == 0)
    assert len(drawn) == 10 and all(p % 2 == 0 for p in drawn)


def test_contexts_of_text_in_characters_of_several_bytes_end_whole(tiny_dir, tmp_path, monkeypatch):
    """The test tokenizer has learnt no Japanese: each of its characters is 3 byte tokens. No context ends inside one."""
    docs = [d.replace(' ', ' 日本語の文章 ', 3) for d in synthetic_docs(30)]
    run_on_jsonl(monkeypatch, tiny_dir, tmp_path, docs, '--positions_per_doc=20')
    contexts = [c for s in nla.SPLITS for c in read(tmp_path / 'out', s)['context']]
    assert len(contexts) > 300 and not any(c.endswith('\ufffd') for c in contexts)
    assert sum(c[-1] in '日本語の文章' for c in contexts) > 10  # ending after a whole character is kept


def test_positions_skip_special_tokens():
    from datagen import draw_positions
    special = set(range(50, 97))  # of the positions >= 50, only 97, 98 and 99 hold ordinary tokens
    assert draw_positions(list(range(100)), special, text='a text', seed=1, positions_per_doc=5, min_position=50,
                          ends_a_character=lambda p: True) == [97, 98, 99]


def test_config_is_the_block_between_the_rules():
    """configure() takes datagen's lower-case globals of config types: any such global outside the config block
    would be a key that --key=value could set."""
    block = open(os.path.join(ROOT, 'datagen.py')).read().split('\n# ' + '-' * 77 + '\n')[1]
    names = {t.id for node in ast.parse(block).body if isinstance(node, ast.Assign) for t in node.targets}
    assert set(configurator.configure(dict(vars(datagen)), [])) == names


def test_progress_in_a_log_is_a_whole_line_every_30_seconds(capsys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(datagen, 'time', types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(datagen, '_progress_printed', 0.0)
    for done in range(1, 101):  # 100 updates a second apart; pytest's stderr is not a terminal
        clock[0] += 1
        datagen.progress(done, 100, 1000.0, 'docs')
    assert capsys.readouterr().err.split('\n') == [
        'docs 1/100 | 1.0/s | eta 99s', 'docs 31/100 | 1.0/s | eta 69s', 'docs 61/100 | 1.0/s | eta 39s',
        'docs 91/100 | 1.0/s | eta 9s', 'docs 100/100 | 1.0/s | eta 0s', '']


def run_on_jsonl(monkeypatch, tiny_dir, tmp_path, docs, *args):
    """datagen with the tiny Llama on a .jsonl corpus of these documents, into tmp_path/out; its meta.json."""
    corpus = tmp_path / 'c.jsonl'
    corpus.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    run_datagen(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}', *args)
    return json.load(open(tmp_path / 'out' / 'meta.json'))


def test_short_documents_are_skipped_and_counted(tiny_dir, tmp_path, monkeypatch):
    docs = synthetic_docs(30) + ['too short.', 'short too.', 'also short.']
    assert run_on_jsonl(monkeypatch, tiny_dir, tmp_path, docs)['docs_skipped'] == 3


def test_a_jsonl_corpus_may_start_with_a_byte_order_mark(tiny_dir, tmp_path, monkeypatch):
    corpus = tmp_path / 'c.jsonl'
    corpus.write_text('\ufeff' + ''.join(json.dumps({'text': d}) + '\n' for d in synthetic_docs(30)), encoding='utf-8')
    run_datagen(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}')
    assert sum(json.load(open(tmp_path / 'out' / 'meta.json'))['docs'].values()) == 30


def test_empty_and_null_texts_are_skipped_and_counted(tiny_dir, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / 'c.parquet'
    pq.write_table(pa.table({'text': synthetic_docs(30) + [None, '', '  \n']}), corpus)
    run_datagen(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}')
    assert 'corpus: 3 empty or null texts skipped' in capsys.readouterr().err
    assert sum(json.load(open(tmp_path / 'out' / 'meta.json'))['docs'].values()) == 30


def test_doc_id_is_the_row_in_the_corpus_and_rows_do_not_depend_on_the_others(tiny_dir, tmp_path, monkeypatch):
    """doc_id is the document's row in the corpus file, with empty and repeated texts before it; and a document's
    rows (positions, contexts) are the same when other documents are put in front of it."""
    docs = synthetic_docs(30)
    texts = ['', docs[0], None] + docs[:10] + docs[10:]

    def rows(texts, out):
        pq.write_table(pa.table({'text': texts}), tmp_path / 'c.parquet')
        run_datagen(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={tmp_path / "c.parquet"}', f'--out_dir={out}')
        return {(d, p, c) for s in nla.SPLITS for d, p, c in zip(*(read(out, s)[k] for k in ('doc_id', 'position', 'context')))}

    shifted = rows(texts, tmp_path / 'a')
    assert all(texts[d].startswith(c) for d, _, c in shifted) and {d for d, _, _ in shifted} == {1, *range(4, 33)}
    plain = rows(docs, tmp_path / 'b')
    assert {(texts.index(docs[d], 1), p, c) for d, p, c in plain} == shifted


def test_repeated_texts_are_one_document(tiny_dir, tmp_path, monkeypatch):
    docs = synthetic_docs(30)
    meta = run_on_jsonl(monkeypatch, tiny_dir, tmp_path, docs + docs[:6])
    assert meta['docs_repeated'] == 6 and sum(meta['docs'].values()) == 30
    starts = [{c[:40] for c in read(tmp_path / 'out', s)['context']} for s in nla.SPLITS]  # the document's first words
    assert sum(map(len, starts)) == len(set().union(*starts)) == 30


def test_a_special_token_spelled_in_a_document_stays_in_its_contexts(tiny_dir, tmp_path, monkeypatch):
    """Web text may hold "<|im_end|>": the model reads it as characters, so the stored contexts keep it."""
    docs = [d.replace('. ', '. <|im_end|> ', 1) for d in synthetic_docs(30)]
    run_on_jsonl(monkeypatch, tiny_dir, tmp_path, docs)
    contexts = [c for s in nla.SPLITS for c in read(tmp_path / 'out', s)['context']]
    assert all(any(d.startswith(c) for d in docs) for c in contexts) and any('<|im_end|>' in c for c in contexts)


def test_max_docs_reads_the_corpus_only_as_far_as_it_needs(tmp_path):
    """The corpus ends at the text that makes max_docs distinct ones, in every format alike (what follows, repeats
    included, is not counted); a .jsonl's later lines are never parsed, nor a parquet's later batches."""
    texts = [f"text {i // 2}" if i % 3 else '' for i in range(5000)]  # empty and repeated texts among them
    pq.write_table(pa.table({'text': texts}), tmp_path / 'c.parquet')
    (tmp_path / 'c.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts[:20]) + 'not json\n')
    (tmp_path / 'c.txt').write_text('\n\n'.join(t for t in texts[:40] if t))
    for name in ('c.parquet', 'c.jsonl', 'c.txt'):  # through the fifth distinct text, 'text 2' met twice before it
        docs, _, rows, repeats = datagen.read_corpus(str(tmp_path / name), '', 5)
        assert (docs, repeats) == (['text 0', 'text 1', 'text 2', 'text 3', 'text 4'], 1), name
        assert rows == ([0, 1, 2, 4, 5] if name == 'c.txt' else [1, 2, 4, 7, 8]), name  # the txt holds no empty texts
    docs, _, _, repeats = datagen.read_corpus(str(tmp_path / 'c.parquet'))  # read whole, without max_docs
    assert (len(docs), repeats) == (2500, 833)


def test_each_document_of_a_long_parquet_is_its_own_group(tmp_path):
    """Without group_column, a group is a document: read in batches, the groups must not start again at each batch."""
    pq.write_table(pa.table({'text': [f'text {i}' for i in range(3000)]}), tmp_path / 'c.parquet')
    assert len(set(datagen.read_corpus(str(tmp_path / 'c.parquet'))[1])) == 3000


def test_txt_corpus(tiny_dir, tmp_path, monkeypatch):
    corpus = tmp_path / 'c.txt'
    seps = ['\n\n', '\n  \n', '\n\t\n']  # blank lines, some holding spaces or a tab
    corpus.write_text(''.join(d.replace('. ', '.\n') + seps[i % 3] for i, d in enumerate(synthetic_docs(30))))  # lines within a document
    run_datagen(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}')
    assert sum(json.load(open(tmp_path / 'out' / 'meta.json'))['docs'].values()) == 30


@pytest.mark.parametrize('suffix', ['parquet', 'jsonl'])
def test_group_column_puts_each_group_in_one_split(tiny_dir, tmp_path, monkeypatch, suffix):
    """40 books of 3 documents."""
    table = pa.table({'text': synthetic_docs(120), 'source': [f'book {i // 3}' for i in range(120)]})
    corpus = tmp_path / f'c.{suffix}'
    if suffix == 'parquet':
        pq.write_table(table, corpus)
    else:
        corpus.write_text(''.join(json.dumps(row) + '\n' for row in table.to_pylist()))
    run_datagen(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}',
                '--group_column=source')
    split_of = splits_by_block(tmp_path / 'out', 3)  # book -> its documents' splits
    assert len(split_of) == 40 and all(len(v) == 1 for v in split_of.values()), split_of
    assert set().union(*split_of.values()) == set(nla.SPLITS)


def near_copies(n):
    """n documents, each followed by a near copy of itself (its first word changed): documents 2k and 2k + 1."""
    return [d for doc in synthetic_docs(n) for d in (doc, 'Meanwhile ' + doc.split(' ', 1)[1])]


def test_a_repeated_text_stays_in_its_first_group(tiny_dir, tmp_path, monkeypatch, capsys):
    """Books A and B of 10 documents, then A's first text again as book C: in C it would make a third group."""
    docs = synthetic_docs(20)
    table = pa.table({'text': docs + docs[:1], 'source': ['A'] * 10 + ['B'] * 10 + ['C']})
    pq.write_table(table, tmp_path / 'c.parquet')
    run_datagen(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={tmp_path / "c.parquet"}',
                f'--out_dir={tmp_path / "out"}', '--group_column=source', '--splits={"av_sft": 0.5, "ar_sft": 0, "rl": 0, "val": 0.5}')
    assert "\n2 groups by 'source'" in capsys.readouterr().err


def test_near_duplicates_go_to_one_split(tiny_dir, tmp_path, monkeypatch):
    meta = run_on_jsonl(monkeypatch, tiny_dir, tmp_path, near_copies(30))
    split_of = splits_by_block(tmp_path / 'out', 2)  # pair -> its documents' splits
    assert sum(meta['docs'].values()) == 60 and len(split_of) == 30
    assert all(len(v) == 1 for v in split_of.values()), split_of


def test_val_documents_mostly_in_training_are_counted(tiny_dir, tmp_path, monkeypatch, capsys):
    """With near_duplicate off, a val document is mostly in training exactly when its near copy is in a training split."""
    run_on_jsonl(monkeypatch, tiny_dir, tmp_path, near_copies(30), '--near_duplicate=0')
    val = set(read(tmp_path / 'out', 'val')['doc_id'])
    leaked = sum(doc_id ^ 1 not in val for doc_id in val)  # doc_id ^ 1: the other of its pair
    assert 0 < leaked and f"in training documents: {leaked} of {len(val)}\n" in capsys.readouterr().err


def test_near_duplicate_pairs_share_at_least_the_overlap():
    a = list(range(100))
    b = [7] + a[1:]  # one token changed: 87 of its 88 runs of 13 tokens are a's
    c = a[:40] + list(range(1000, 1060))  # 28 of its 88 runs are a's: below half, above 0.3
    d = list(range(2000, 2100))
    runs = [datagen.token_runs(ids) for ids in (a, b, c, d)]
    assert datagen.join_groups(['x', 'y', 'z', 'w'], datagen.near_duplicate_pairs(runs, 0.5)) == (['x', 'x', 'z', 'w'], 1)
    assert datagen.join_groups(['x', 'y', 'z', 'w'], datagen.near_duplicate_pairs(runs, 0.3)) == (['x', 'x', 'x', 'w'], 2)


def test_token_runs_are_every_run_of_13_tokens():
    assert datagen.token_runs(list(range(13))) == {hash(tuple(range(13)))} and len(datagen.token_runs(list(range(20)))) == 8


def test_a_short_document_inside_a_long_one_is_its_near_duplicate():
    """The overlap is a share of the smaller document's runs."""
    a = list(range(100))
    assert list(datagen.near_duplicate_pairs([datagen.token_runs(a), datagen.token_runs(a[:30])], 0.5)) == [(1, 0)]


def test_sharing_exactly_the_overlap_is_a_near_duplicate():
    a = list(range(100))
    x = a[:56] + list(range(1000, 1044))  # 44 of its 88 runs are a's: exactly half
    assert list(datagen.near_duplicate_pairs([datagen.token_runs(a), datagen.token_runs(x)], 0.5)) == [(1, 0)]


def test_runs_an_earlier_document_also_holds_count_toward_a_later_one():
    """c shares 63 of its 88 runs with b, 31 of which a holds first: all 63 count."""
    a = list(range(100))
    b = a[:43] + list(range(500, 557))  # 31 of its runs are a's: below half
    c = b[:75] + list(range(900, 925))
    assert list(datagen.near_duplicate_pairs([datagen.token_runs(ids) for ids in (a, b, c)], 0.5)) == [(2, 1)]


def test_documents_that_open_alike_are_paired_and_their_groups_joined_transitively():
    a, b = list(range(100)), list(range(30)) + list(range(1000, 1070))  # the same first 30 tokens
    c, d = list(range(29)) + [5000], list(range(2000, 2100))  # c differs at token 29
    assert list(datagen.same_opening_pairs([a, b, c, d, b[:40]], 30)) == [(1, 0), (4, 0)]
    assert list(datagen.same_opening_pairs([a, [9] + a[1:]], 30)) == []  # the first token counts too
    assert datagen.join_groups(['x', 'y', 'z', 'y', 'w'], [(1, 0), (4, 3)]) == (['x', 'x', 'z', 'x', 'x'], 2)


def test_documents_that_open_alike_go_to_one_split(tiny_dir, tmp_path, monkeypatch):
    """Three documents with the same 40-word opening and other text after it give the same rows at any position in
    the opening: near-duplicate joins off, they still go to one split, and no context is in two splits."""
    openings, tails = synthetic_docs(30, seed=1, words=(48, 48)), synthetic_docs(90, seed=2)
    docs = [' '.join(openings[k].split()[:40]) + ' ' + tails[3 * k + m] for k in range(30) for m in range(3)]
    run_on_jsonl(monkeypatch, tiny_dir, tmp_path, docs, '--near_duplicate=0', '--positions_per_doc=12')
    split_of = splits_by_block(tmp_path / 'out', 3)
    assert len(split_of) == 30 and all(len(v) == 1 for v in split_of.values()), split_of
    contexts = [set(read(tmp_path / 'out', s)['context']) for s in nla.SPLITS]
    assert all(not (contexts[i] & contexts[j]) for i in range(4) for j in range(i)), 'a row is in two splits'


@pytest.mark.parametrize('name, content, message', [
    ('c.parquet', parquet_bytes(pa.table({'text': synthetic_docs(5)})), "has no 'source' column (group_column"),
    ('c.parquet', parquet_bytes(pa.table({'text': synthetic_docs(3), 'source': ['a', None, 'b']})),
     "document 1 has no 'source' (group_column; 1 such)"),
    ('c.parquet', parquet_bytes(pa.table({'text': synthetic_docs(3), 'source': [1.0, float('nan'), float('nan')]})),
     "document 1 has no 'source' (group_column; 2 such)"),  # NaN, as numpy or polars may give a missing number: not one group
    ('c.jsonl', b'{"text": "a b", "source": "x"}\n{"text": "c d"}\n', "line 2 is not a JSON object with a 'text' key and a 'source' key"),
    ('c.txt', b'a b\n\nc d', "is a .txt, which has no columns: group_column must be ''"),
], ids=['parquet no column', 'parquet null group', 'parquet NaN group', 'jsonl no key', 'txt'])
def test_group_column_the_corpus_lacks_is_one_line(tiny_dir, tmp_path, monkeypatch, name, content, message):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    last = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}',
                   '--group_column=source')
    assert last.startswith(f"datagen: corpus '{corpus}") and message in last
    assert not (tmp_path / 'out').exists()


def test_replacing_other_data_is_noted(tiny_dir, tmp_path):
    args = ['datagen.py', 'config/datagen_tiny.py', f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}',
            f'--out_dir={tmp_path}']
    run_script(*args)
    old = json.load(open(tmp_path / 'meta.json'))['data_id']
    p = run_script(*args, '--seed=2')
    assert f'replaced data {old}' in p.stderr and old != json.load(open(tmp_path / 'meta.json'))['data_id']


def test_refusal_on_the_command_line_is_one_line_without_traceback(tiny_dir, tmp_path, monkeypatch):
    """The refusals below run datagen.main in-process; on the command line the same SystemExit is the last line
    of stderr, with a non-zero exit status and no traceback (run_script checks both)."""
    out = tmp_path / 'out'
    args = [f'--base_model={tiny_dir["llama"]}', '--corpus=/nonexistent.parquet', f'--out_dir={out}']
    p = run_script('datagen.py', 'config/datagen_tiny.py', *args, ok=False)
    line = "datagen: corpus '/nonexistent.parquet' not found"
    assert p.stderr.strip().splitlines()[-1] == line == refusal(monkeypatch, *args)
    assert not out.exists()


@pytest.mark.parametrize('args, message', [
    (['--corpus=/nonexistent.parquet'], "corpus '/nonexistent.parquet' not found"),
    (['--layer=4'], "layer 4 does not exist"),
    (['--splits={"av_sft": 0.5, "rl": 0.5}'], "splits must give fractions"),
    (['--splits={"av_sft": "0.3", "ar_sft": 0.3, "rl": 0.3, "val": 0.1}'], "splits must give fractions"),
    (['--splits={"av_sft": 0.4, "ar_sft": 0.3, "rl": 0.3, "val": 0}'], "splits['val'] is 0, but every stage"),
    (['--teacher=oracle'], "teacher must be"),
    (['--max_docs=2'], "got no document"),
    (['--max_docs=-5'], "max_docs must be >= 0"),
    (['--near_duplicate=1.5'], "near_duplicate must be in [0, 1], got 1.5"),
    (['--batch_size=0'], "batch_size must be >= 1"),
    (['--device=gpu'], "device must be 'auto'"),
    (['--positions_per_doc=0'], "positions_per_doc must be >= 1"),
    (['--min_position=128'], "must be below max_length=128"),
    (['--marker=@@@@@@@@'], "must be one"),
    (['--marker=<|im_start|>'], "times in the AV prompt, must be once"),
    (['--base_model=/nonexistent/model'], "base_model '/nonexistent/model' is not a model folder"),
    pytest.param(['--device=cuda'], "torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')),
])
def test_bad_input_one_line_and_no_output(tiny_dir, tmp_path, monkeypatch, args, message):
    out = tmp_path / 'out'
    line = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}',
                   f'--out_dir={out}', *args)
    assert message in line
    assert not out.exists() or not [f for f in os.listdir(out) if not f.startswith('teacher_cache')]


def test_a_model_folder_without_its_weights_is_one_line_and_no_output(tiny_dir, tmp_path, monkeypatch):
    model = tmp_path / 'model'
    shutil.copytree(tiny_dir['llama'], model, ignore=shutil.ignore_patterns('*.safetensors'))
    line = refusal(monkeypatch, f'--base_model={model}', f'--corpus={tiny_dir["corpus"]}', f'--out_dir={tmp_path / "out"}')
    assert f"base_model '{model}': its weights cannot be loaded: Error no file named model.safetensors" in line
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('name, content, message', [
    ('c.parquet', parquet_bytes(pa.table({'text': synthetic_docs(5)}))[:300], "Parquet magic bytes not found"),
    ('c.parquet', damaged_inside(parquet_bytes(pa.table({'text': synthetic_docs(300)}), row_group_size=50)),
     "Corrupt snappy compressed data"),
    ('c.parquet', parquet_bytes(pa.table({'text': [1, 2]})), "document 0 is int, not a string"),
    ('c.jsonl', b'{"text": "a b"}\nnot json\n', "line 2 is not a JSON object"),
    ('c.jsonl', b'{"text": "a b"}\n{"body": "c d"}\n', "line 2 is not a JSON object with a 'text' key"),
    ('c.jsonl', b'{"text": "a b"}\n{"text": "cut \\ud83d emoji"}\n', "line 2: its text holds a lone surrogate escape"),
    ('c.txt', b'caf\xe9 au lait', "'utf-8' codec can't decode"),
    ('folder.txt', None, "is a folder, not a file"),
    ('hf://foo', None, "must look like hf://OWNER/REPO/FILE.parquet"),
    ('hf://owner/repo/c.parquet', None, "could not be downloaded"),
    ('hf://an owner/repo/c.parquet', None, "could not be downloaded (HFValidationError)"),
], ids=['truncated parquet', 'damaged parquet', 'non-string text', 'jsonl not json', 'jsonl no text', 'jsonl surrogate',
        'txt not utf-8', 'folder',
        'malformed hf', 'hf offline', 'hf bad repo id'])
def test_unreadable_corpus_one_line(tiny_dir, tmp_path, monkeypatch, name, content, message):
    import huggingface_hub.constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # read once, when huggingface_hub is imported: so also its constant
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    corpus = name if name.startswith('hf://') else tmp_path / name
    if content is not None:
        corpus.write_bytes(content)
    elif not name.startswith('hf://'):
        corpus.mkdir()
    last = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}')
    assert last.startswith(f"datagen: corpus '{corpus}") and message in last
    assert not (tmp_path / 'out').exists()


def no_model_load(monkeypatch):
    """A check that must come before any work: loading the tokenizer (the first work) fails the test."""
    def load(name):
        raise AssertionError('the model was loaded before the check')
    monkeypatch.setattr(nla, 'load_tokenizer', load)


def test_a_missing_corpus_fails_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    def load(*args):
        raise AssertionError('the model was loaded before the corpus was read')
    monkeypatch.setattr(nla, 'load_backbone', load)
    line = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', '--corpus=/nonexistent.parquet', f'--out_dir={tmp_path / "out"}')
    assert line == "datagen: corpus '/nonexistent.parquet' not found"


@pytest.mark.parametrize('args, message', [
    (['--layer=4'], "layer 4 does not exist"),
    (['--dtype=fp8'], "dtype 'fp8' is not one of"),
    (['--teacher=api', '--api_base_url=http://localhost:8o8o/v1'], "api_base_url 'http://localhost:8o8o/v1': Port could not"),
    (['--teacher=api', '--api_base_url=http://127.0.0.1:9/v 1'], "api_base_url 'http://127.0.0.1:9/v 1' is not a valid URL"),
])
def test_a_bad_layer_dtype_or_url_fails_before_the_corpus_is_read(tiny_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    monkeypatch.setattr(datagen, 'read_corpus', lambda *a: pytest.fail('the corpus was read before the check'))
    assert message in refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}',
                              f'--out_dir={tmp_path / "out"}', *args)


def test_out_dir_that_is_a_file_fails_first(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    out.write_text('keep me')
    no_model_load(monkeypatch)
    line = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}', f'--out_dir={out}')
    assert f"out_dir '{out}' is a file" in line and out.read_text() == 'keep me'


def test_a_corpus_that_datagen_would_write_over_is_refused(tiny_dir, tmp_path, monkeypatch):
    (tmp_path / 'out').mkdir()
    corpus = tmp_path / 'out' / 'val.parquet'
    shutil.copy(tiny_dir['corpus'], corpus)
    no_model_load(monkeypatch)
    line = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}')
    assert "is a file that datagen would write over" in line
    assert corpus.read_bytes() == open(tiny_dir['corpus'], 'rb').read()


def test_out_dir_that_cannot_be_made_fails_first(tiny_dir, tmp_path, monkeypatch):
    (tmp_path / 'f').write_text('keep me')
    no_model_load(monkeypatch)
    line = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}', f'--out_dir={tmp_path / "f" / "out"}')
    assert f"cannot be made: '{tmp_path / 'f'}' is a file" in line and os.listdir(tmp_path) == ['f']


@pytest.mark.parametrize('args, message', [
    (['--seed=-1'], 'seed must be in [0, 2**32), got -1'),
    (['--teacher=api', '--api_base_url=api.example.com/v1'], "api_base_url must start with http:// or https://"),
])
def test_settings_refused_before_any_work(tiny_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    no_model_load(monkeypatch)
    line = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}', f'--out_dir={tmp_path / "out"}', *args)
    assert message in line and not (tmp_path / 'out').exists()


def test_splits_with_a_nan_fraction_are_refused(tiny_dir, tmp_path, monkeypatch):
    config = tmp_path / 'nan_splits.py'
    config.write_text("splits = {'av_sft': 0.3, 'ar_sft': 0.3, 'rl': 0.3, 'val': float('nan')}\n")
    no_model_load(monkeypatch)
    line = refusal(monkeypatch, config, f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}', f'--out_dir={tmp_path / "out"}')
    assert 'splits must give fractions' in line


def test_empty_corpus(tiny_dir, tmp_path, monkeypatch):
    corpus = tmp_path / 'empty.parquet'
    pq.write_table(pa.table({'text': pa.array([], pa.string())}), corpus)
    line = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={corpus}', f'--out_dir={tmp_path / "out"}')
    assert "has no documents" in line


def test_nan_activations_stop_datagen(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir['llama'])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float('nan')
    model.save_pretrained(tmp_path / 'nan_model')
    nla.load_tokenizer(tiny_dir['llama']).save_pretrained(tmp_path / 'nan_model')
    last = refusal(monkeypatch, f'--base_model={tmp_path / "nan_model"}', f'--corpus={tiny_dir["corpus"]}',
                   f'--out_dir={tmp_path / "out"}')
    assert 'NaN, inf or all zero' in last and not (tmp_path / 'out' / 'meta.json').exists()


@pytest.mark.parametrize('value', [float('nan'), 0.0])  # an all-zero row has no direction to inject
def test_nan_or_zero_activations_name_the_first_row(tiny_dir, tmp_path, monkeypatch, value):
    """Rows 7 and 12 bad: row 7 is the second document's fourth position (config/datagen_tiny.py: 4 per document)."""
    forward, drawn = datagen.activations, []

    def activations(backbone, docs_ids, doc_positions, *args):
        acts = forward(backbone, docs_ids, doc_positions, *args)
        acts[[7, 12]] = value
        drawn.append(doc_positions[1][3])
        return acts
    monkeypatch.setattr(datagen, 'activations', activations)
    last = refusal(monkeypatch, f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}', f'--out_dir={tmp_path / "out"}')
    assert f'2 activations are NaN, inf or all zero, the first at row 7 (doc_id 1, position {drawn[0]})' in last


class FakeTeacher(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        assert self.headers['Authorization'] == 'Bearer test-key'
        FakeTeacher.calls += 1
        if FakeTeacher.calls == 1:  # the first request is rate limited: the client must retry
            self.send_response(429)
            self.end_headers()
            return
        context = body['messages'][0]['content'].rsplit('<text>', 1)[1][:-len('</text>')]
        reply = {'choices': [{'message': {'content': f"<explanation>ends {context[-10:]}</explanation>"}}]}
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps(reply).encode())

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler):
    """A local server answering with `handler`, for as long as the block runs; yields its /v1 base URL."""
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f'http://127.0.0.1:{server.server_port}/v1'
    finally:
        server.shutdown()


@pytest.fixture
def teacher_url():
    FakeTeacher.calls = 0
    with serving(FakeTeacher) as url:
        yield url


def api_args(tiny_dir, out, url):
    """datagen's arguments after config/datagen_tiny.py for the api teacher; the key is OPENAI_API_KEY (the default api_key_env)."""
    return [f'--base_model={tiny_dir["llama"]}', f'--corpus={tiny_dir["corpus"]}', f'--out_dir={out}', '--teacher=api',
            f'--api_base_url={url}', '--max_docs=20', '--api_retries=2']


def test_api_teacher_retries_and_caches(tiny_dir, tmp_path, teacher_url, monkeypatch, capsys):
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    args = api_args(tiny_dir, tmp_path / 'out', teacher_url)
    run_datagen(monkeypatch, *args)
    first = FakeTeacher.calls
    rows = read(tmp_path / 'out', 'val')
    assert all(e.startswith('<explanation>ends ') for e in rows['explanation'])
    assert json.load(open(tmp_path / 'out' / 'meta.json'))['teacher'] == 'api'
    capsys.readouterr()
    run_datagen(monkeypatch, *args)
    assert FakeTeacher.calls == first  # all from the cache
    assert 'replaced data' not in capsys.readouterr().err  # the same data written again


def test_api_cache_is_not_used_for_another_endpoint(tiny_dir, tmp_path, teacher_url, monkeypatch):
    """Two servers may give one model name to different models: answers cached from one are not taken for the other's."""
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    run_datagen(monkeypatch, *api_args(tiny_dir, tmp_path / 'out', teacher_url))
    first = FakeTeacher.calls  # one rate-limited request, then one per context
    run_datagen(monkeypatch, *api_args(tiny_dir, tmp_path / 'out', teacher_url.replace('/v1', '/v2')))
    assert FakeTeacher.calls == 2 * first - 1, (first, FakeTeacher.calls)


class FlakyTeacher(http.server.BaseHTTPRequestHandler):
    """Its first answer fails as `first` says (a rate limit, a connection closed unanswered, an answer cut short), then it answers."""
    first, calls = '429', 0

    def do_POST(self):
        self.rfile.read(int(self.headers['Content-Length']))
        FlakyTeacher.calls += 1
        if FlakyTeacher.calls == 1 and FlakyTeacher.first == 'dropped':
            self.close_connection = True
            return
        self.send_response(429 if FlakyTeacher.calls == 1 and FlakyTeacher.first == '429' else 200)
        reply = json.dumps({'choices': [{'message': {'content': '<explanation>x</explanation>'}}]}).encode()
        self.send_header('Content-Length', str(len(reply)))
        self.end_headers()
        self.wfile.write(reply[:10] if FlakyTeacher.calls == 1 and FlakyTeacher.first == 'cut' else reply)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.mark.parametrize('first', ['429', 'dropped', 'cut'])
def test_api_call_retries_a_rate_limit_a_dropped_connection_and_a_cut_answer(monkeypatch, first):
    FlakyTeacher.first, FlakyTeacher.calls = first, 0
    with serving(FlakyTeacher) as url:
        monkeypatch.setattr(datagen, 'api_base_url', url)
        assert datagen.api_call('some context', 'test-key', threading.Event()) == '<explanation>x</explanation>'
    assert FlakyTeacher.calls == 2


class NotHTTP(http.server.BaseHTTPRequestHandler):
    """Answers as an SSH server would (an api_base_url with the wrong port): not a status line, so no HTTP at all."""
    calls = 0

    def handle(self):
        NotHTTP.calls += 1
        self.raw_requestline = self.rfile.readline()
        self.parse_request()
        # the whole request is read first: a socket closed with bytes unread is reset, and the client may see the reset
        self.rfile.read(int(self.headers['Content-Length']))
        self.wfile.write(b'SSH-2.0-OpenSSH_9.6\r\n')


class NoBackoff(threading.Event):
    def wait(self, timeout=None):
        return self.is_set()


def test_api_call_retries_an_answer_that_is_not_http_then_names_it(monkeypatch):
    NotHTTP.calls = 0
    monkeypatch.setattr(datagen, 'api_retries', 1)
    with serving(NotHTTP) as url:
        monkeypatch.setattr(datagen, 'api_base_url', url)
        with pytest.raises(SystemExit, match=r'unreachable after 2 tries: .*SSH-2\.0'):
            datagen.api_call('some context', 'test-key', NoBackoff())
    assert NotHTTP.calls == 2


class ChattyTeacher(http.server.BaseHTTPRequestHandler):
    """Wraps its explanation in reasoning and chatter, as a reasoning or chat model behind an OpenAI-style server may."""

    def do_POST(self):
        self.rfile.read(int(self.headers['Content-Length']))
        text = '<think>Let me reason.</think>\nSure! <explanation>- ends with a verb</explanation>\nHope this helps!'
        reply = json.dumps({'choices': [{'message': {'content': text}}]}).encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_api_explanation_is_the_tagged_part_alone(tmp_path, monkeypatch):
    """The verbalizer is trained to write the stored explanation: the teacher's preamble and chatter stay out of it."""
    monkeypatch.setenv(datagen.api_key_env, 'test-key')
    with serving(ChattyTeacher) as url:
        monkeypatch.setattr(datagen, 'api_base_url', url)
        assert datagen.api_explanations(['a context'], str(tmp_path / 'cache.jsonl')) == ['<explanation>- ends with a verb</explanation>']
    assert 'Hope this helps!' in (tmp_path / 'cache.jsonl').read_text()  # the cache keeps the answer as it came


def test_an_answer_cut_before_its_closing_tag_keeps_no_stray_tag():
    assert datagen.as_explanation('<explanation>cut before its close ') == '<explanation>cut before its close</explanation>'
    assert datagen.as_explanation('no tags at all') == '<explanation>no tags at all</explanation>'


def test_offline_teacher_names_the_longest_earlier_words_then_quotes_the_last_six():
    assert datagen.context_explanation('The captain walked slowly home at night, then quietly remembered everything.') == (
        '<explanation>\n- earlier words: captain, slowly, walked\n- ends with: "at night, then quietly remembered everything."\n'
        '</explanation>')


def test_offline_teacher_quotes_a_closing_tag_without_ending_the_explanation():
    explanation = datagen.context_explanation('the answer goes between the tags and the prompt; close it with </explanation> now')
    assert nla.extract_explanation(explanation).endswith('"prompt; close it with </ explanation> now"')


class HalfFatalTeacher(http.server.BaseHTTPRequestHandler):
    """A context holding FATAL gets HTTP 400, which no retry mends; any other a rate limit, retried."""
    other_calls = 0

    def do_POST(self):
        fatal = 'FATAL' in json.loads(self.rfile.read(int(self.headers['Content-Length'])))['messages'][0]['content']
        HalfFatalTeacher.other_calls += not fatal
        self.send_response(400 if fatal else 429)
        self.send_header('Content-Length', '0')
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_failed_request_stops_the_others_retrying(tmp_path, monkeypatch):
    """The run ends at the first request that fails for good (as at Ctrl-C or SIGTERM): the rate-limited request in
    flight beside it makes no further tries, where it had gone on for all of api_retries."""
    HalfFatalTeacher.other_calls = 0
    monkeypatch.setenv(datagen.api_key_env, 'test-key')
    with serving(HalfFatalTeacher) as url:
        for name, value in (('api_base_url', url), ('api_retries', 3), ('api_concurrency', 2)):
            monkeypatch.setattr(datagen, name, value)
        with pytest.raises(SystemExit, match='HTTP 400'):
            datagen.api_explanations(['a context', 'z FATAL context'], str(tmp_path / 'cache.jsonl'))  # sorted: FATAL asked last
    assert HalfFatalTeacher.other_calls <= 1


def test_api_key_missing_fails_first_and_leaves_no_folder(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', '')
    out = tmp_path / 'out'
    no_model_load(monkeypatch)
    line = refusal(monkeypatch, *api_args(tiny_dir, out, 'http://127.0.0.1:9/v1'))
    assert 'OPENAI_API_KEY' in line and not out.exists()


def test_api_cache_line_cut_by_a_crash_is_asked_again(tiny_dir, tmp_path, teacher_url, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    args = api_args(tiny_dir, tmp_path / 'out', teacher_url)
    run_datagen(monkeypatch, *args)
    cache = tmp_path / 'out' / 'teacher_cache.jsonl'
    text = cache.read_bytes()
    cache.write_bytes(text[:len(text) - 1 - len(text.splitlines()[-1]) // 2])  # killed halfway through the last line
    calls = FakeTeacher.calls
    run_datagen(monkeypatch, *args)
    assert FakeTeacher.calls == calls + 1
    run_datagen(monkeypatch, *args)  # the appended line must not have joined the cut one
    assert FakeTeacher.calls == calls + 1


def test_api_cache_line_that_is_not_json_is_named(tiny_dir, tmp_path, teacher_url, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    cache = tmp_path / 'out' / 'teacher_cache.jsonl'
    cache.parent.mkdir()
    cache.write_text('{"key": "a", "explanation": "b"}\n{"key": "c", "expl\n{"key": "d", "explanation": "e"}\n')
    last = refusal(monkeypatch, *api_args(tiny_dir, tmp_path / 'out', teacher_url))
    assert f"teacher cache '{cache}' line 2 is not a cache entry: delete that line or the file" in last


class NotATeacher(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers['Content-Length']))  # as NotHTTP: a request left unread may reset the answer
        self.send_response(200)  # a web page, as a wrong api_base_url would give
        self.end_headers()
        self.wfile.write(b'<html>hello</html>')

    def log_message(self, *args):
        pass


def test_an_answer_that_is_not_a_chat_completion_is_one_line_and_leaves_no_folder(tiny_dir, tmp_path):
    with serving(NotATeacher) as url:
        p = run_script('datagen.py', 'config/datagen_tiny.py', *api_args(tiny_dir, tmp_path / 'out' / 'l20', url),
                       ok=False, env={'OPENAI_API_KEY': 'test-key'})
    assert "answered with no chat completion text: b'<html>hello</html>'" in p.stderr.strip().splitlines()[-1]
    assert os.listdir(tmp_path) == []  # out/l20, made for the teacher's cache, empty, and removed with out/

# -----------------------------------------------------------------------------
# what train.py reads: nla.read_data_meta and nla.read_split


def test_data_id_is_a_hash_of_the_splits_and_meta(tmp_path):
    """The same tables and meta written again (to another out_dir, so with another config) keep their data_id;
    one changed value of a split or of meta gives another."""
    table, meta = pa.table({'x': [1.0, 2.0]}), {'marker': '*', 'config': {'out_dir': 'a'}}
    ids = []
    for name, t, m in (('a', table, meta), ('b', table, {**meta, 'config': {'out_dir': 'b'}}),
                       ('c', pa.table({'x': [1.0, 2.5]}), meta), ('d', table, {**meta, 'marker': '#'})):
        nla.write_data(str(tmp_path / name), {'val': t}, m)
        ids.append(json.load(open(tmp_path / name / 'meta.json'))['data_id'])
    assert ids[0] == ids[1] and len({ids[0], ids[2], ids[3]}) == 3


def test_check_data_id_passes_the_data_as_written_and_refuses_a_changed_file(tiny_data, tmp_path):
    meta = json.load(open(os.path.join(tiny_data, 'meta.json')))
    nla.check_data_id(tiny_data, meta)
    data = broken_copy(tiny_data, tmp_path)
    raw = bytearray((tmp_path / 'data' / 'rl.parquet').read_bytes())
    raw[len(raw) // 3] ^= 1  # parquet has no checksum: one flipped bit in a page reads as another number
    (tmp_path / 'data' / 'rl.parquet').write_bytes(bytes(raw))
    with pytest.raises(ValueError, match='its files are not those its meta.json was written with'):
        nla.check_data_id(data, meta)


def test_data_id_covers_the_whole_of_a_large_file(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    a.write_bytes(b'\0' * (3 << 20))
    b.write_bytes(b'\0' * ((3 << 20) - 1) + b'\1')
    assert nla.data_digest({}, [str(a)]) != nla.data_digest({}, [str(b)])


def test_check_data_id_names_a_missing_split(tiny_data, tmp_path):
    data = broken_copy(tiny_data, tmp_path)
    os.remove(os.path.join(data, 'rl.parquet'))
    with pytest.raises(ValueError, match=re.escape(f"{os.path.join(data, 'rl.parquet')} not found: run datagen.py again")):
        nla.check_data_id(data, json.load(open(os.path.join(data, 'meta.json'))))


def test_a_write_that_fails_midway_leaves_no_old_meta_beside_new_splits(tmp_path, monkeypatch):
    out = str(tmp_path / 'out')
    nla.write_data(out, {'val': pa.table({'x': [1.0]}), 'rl': pa.table({'x': [1.0]})}, {'config': {}})
    real, calls = os.replace, []

    def replace(a, b):  # the second split's rename fails (a full disk)
        calls.append(b)
        if len(calls) == 2:
            raise OSError(28, 'No space left on device')
        real(a, b)
    monkeypatch.setattr(nla.os, 'replace', replace)
    with pytest.raises(OSError, match='No space left'):
        nla.write_data(out, {'val': pa.table({'x': [2.0]}), 'rl': pa.table({'x': [2.0]})}, {'config': {}})
    assert not os.path.exists(os.path.join(out, 'meta.json'))


def test_write_data_removes_a_killed_runs_temporary_folder_and_no_other(tmp_path):
    (tmp_path / 'out' / '.datagen-tmp-k1ll3d').mkdir(parents=True)  # what a run killed while writing left behind
    (tmp_path / 'out' / '.datagen-tmp-k1ll3d' / 'val.parquet').write_text('half')
    (tmp_path / 'out' / '.tmp-build').mkdir()  # a user's
    nla.write_data(str(tmp_path / 'out'), {'val': pa.table({'x': [1.0]})}, {'config': {}})
    assert sorted(os.listdir(tmp_path / 'out')) == ['.tmp-build', 'meta.json', 'val.parquet']


@pytest.mark.parametrize('meta_edit, message', [
    (lambda m: json.dumps(m)[:40], 'is not JSON (cut short?)'),
    (lambda m: json.dumps([m]), 'is not a JSON object'),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != 'alpha'}), 'has no alpha'),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != 'data_id'}), 'has no data_id: it was written by another or an older'),
    (lambda m: json.dumps({**m, 'alpha': float('nan')}), 'alpha must be a finite number > 0'),
    (lambda m: json.dumps({**m, 'alpha': -5.0}), 'alpha must be a finite number > 0'),
    (lambda m: json.dumps({**m, 'alpha': 0}), 'alpha must be a finite number > 0'),
    (lambda m: json.dumps({**m, 'alpha': float('inf')}), 'alpha must be a finite number > 0'),
    (lambda m: json.dumps({**m, 'alpha': '250'}), 'alpha must be a finite number > 0'),
    (lambda m: json.dumps({**m, 'alpha': True}), 'alpha must be a finite number > 0'),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != 'marker_id'}), 'has no marker_id'),
    (lambda m: json.dumps({**m, 'd_model': 32}), "d_model 32 vs the model's 64"),
    (lambda m: json.dumps({**m, 'model_type': 'qwen3'}), "model_type 'qwen3' vs the model's 'llama'"),
    (lambda m: json.dumps({**m, 'layer': 9}), "layer 9 vs the model's 4 blocks"),
    (lambda m: json.dumps({**m, 'layer': '1'}), "layer '1' vs the model's 4 blocks"),
    (lambda m: json.dumps({**m, 'layer': -1}), "layer -1 vs the model's 4 blocks"),
    (lambda m: json.dumps({**m, 'layer': True}), "layer True vs the model's 4 blocks"),
    (lambda m: json.dumps({**m, 'marker': 7}), 'marker 7 is not token'),
    (lambda m: json.dumps({**m, 'marker_id': 5}), 'is not token 5 in this tokenizer'),
    (lambda m: json.dumps({**m, 'vocab_size': m['vocab_size'] + 1}), "vs the tokenizer's"),
])
def test_read_data_meta_refuses(tiny_dir, tiny_data, tmp_path, meta_edit, message):
    data = broken_copy(tiny_data, tmp_path, meta_edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        nla.read_data_meta(data, tiny_dir['llama'], nla.load_tokenizer(tiny_dir['llama']))


def test_data_of_a_tokenizer_with_an_added_token_is_read(tiny_dir, tmp_path, monkeypatch):
    """vocab_size counts added tokens (len(tokenizer), not tokenizer.vocab_size) on both sides of the contract."""
    model = tmp_path / 'model'
    shutil.copytree(tiny_dir['llama'], model)
    tok = nla.load_tokenizer(str(model))
    tok.add_tokens(['<image>'], special_tokens=True)  # within the embedding's rows
    tok.save_pretrained(model)
    meta = run_on_jsonl(monkeypatch, {'llama': str(model)}, tmp_path, synthetic_docs(30))
    assert meta['vocab_size'] == len(tok) == tok.vocab_size + 1
    assert nla.read_data_meta(str(tmp_path / 'out'), str(model), nla.load_tokenizer(str(model)))['vocab_size'] == len(tok)


def test_data_of_another_model_names_both(tiny_dir, tiny_data):
    with pytest.raises(ValueError, match=re.escape(f"does not fit base_model {tiny_dir['qwen3']} (it was made for {tiny_dir['llama']}): "
                                                   "model_type 'llama' vs the model's 'qwen3'")):
        nla.read_data_meta(tiny_data, tiny_dir['qwen3'], nla.load_tokenizer(tiny_dir['qwen3']))


@pytest.mark.parametrize('val, message', [
    ('cut', 'is not a split written by datagen.py'),
    (lambda t: t.slice(0, 0), 'has no rows'),
    (lambda t: t.drop_columns(['explanation']), 'is not a split written by datagen.py'),
    (zero_first_activation, 'row 0 has a NaN, inf or all-zero activation'),
    # pyarrow 25 (the newest for Python 3.10) refuses to read a null fixed-size list; 26 reads it, and read_split refuses it
    (null_first('activation'), ('column activation has 1 empty (null) rows', 'is not a split written by datagen.py (Expected all lists')),
    (null_first('context'), 'column context has 1 empty (null) rows'),
    (null_inside_first_activation, 'column activation has 1 null values inside its rows'),
    (lambda t: t.set_column(t.column_names.index('explanation'), 'explanation', pa.array(range(t.num_rows))),
     'column explanation must hold text, got int64'),
])
def test_read_split_refuses(tiny_data, tmp_path, val, message):
    data = broken_copy(tiny_data, tmp_path, val=val)
    with pytest.raises(ValueError, match='|'.join(map(re.escape, message if isinstance(message, tuple) else [message]))):
        nla.read_split(data, 'val', 64)


def test_read_split_reads_large_string_text(tiny_data, tmp_path):
    """polars and pandas write text as large_string."""
    data = broken_copy(tiny_data, tmp_path, val=lambda t: t.cast(pa.schema(
        [f.with_type(pa.large_string()) if f.name in ('context', 'explanation') else f for f in t.schema])))
    assert nla.read_split(data, 'val', 64)['context'] == nla.read_split(tiny_data, 'val', 64)['context']


def test_a_row_is_unusable_when_all_zero_or_not_finite_not_when_some_entries_are_zero():
    acts = np.array([[0.0, 1.0], [0.0, 0.0], [np.inf, 1.0], [1.0, np.nan]], np.float32)
    assert nla.unusable_rows(acts).tolist() == [1, 2, 3]


def test_read_split_refuses_another_width(tiny_data):
    with pytest.raises(ValueError, match="fixed-size lists of meta.json's d_model 32"):
        nla.read_split(tiny_data, 'val', 32)
